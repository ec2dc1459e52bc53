"""Observability: OpenTelemetry traces and metrics, and Prometheus text.

The seam the RPC layer calls: a :class:`~txcallme.Proxy` makes one
:class:`ClientObserver`, a server service one :class:`ServerObserver`. Each
call asks its observer for a call object (:meth:`ClientObserver.client_call`,
:meth:`ServerObserver.server_call`) and finishes it once.

What is switched on is decided when an observer is created:

- tracing, when ``opentelemetry-api`` is imported and a global tracer provider
  is set (``opentelemetry.trace.set_tracer_provider``), or one was given to
  :func:`configure`;
- OpenTelemetry metrics, likewise with the global meter provider;
- Prometheus text, after :func:`enable_prometheus` (which the ``/metrics``
  resource and ``twistd callme --metrics-port`` call).

With none of them the observers hand out :data:`NULL_CALL`, a shared object
whose methods do nothing, so the cost of the seam is a method call or two per
RPC. Set providers (or enable Prometheus) before creating proxies and services.

Span and metric names follow the OpenTelemetry RPC and messaging semantic
conventions; README.rst ("Observability") lists them.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from txcallme import _prometheus, _wire
from txcallme._version import __version__
from txcallme.errors import (
    AccessRefused,
    BrokerConnectionLost,
    CallmeError,
    InvalidRequest,
    PayloadTooLarge,
    ProxyClosed,
    RemoteError,
    RequestExpired,
    RpcTimeout,
    ServerUnavailable,
    UnknownMethod,
    qualified_name,
)
from txcallme.serializers import JSON, Serializer

__all__ = [
    "Call",
    "ClientCall",
    "ClientObserver",
    "configure",
    "DURATION_BUCKETS",
    "enable_everything",
    "enable_prometheus",
    "NULL_CALL",
    "OTHER",
    "prometheus_text",
    "REFUSAL_REASONS",
    "reset",
    "RPC_SYSTEM",
    "ServerCall",
    "ServerObserver",
    "client_outcome",
    "Everything",
    "metrics_resource",
    "metrics_service",
    "pool_busy",
    "refusal_reason",
    "with_metrics",
]

#: ``rpc.system.name`` of txcallme's spans and metrics.
RPC_SYSTEM = "txcallme"
#: The method name methods a server does not have collapse to (labels, ``rpc.method``).
OTHER = "_OTHER"
#: Histogram bucket bounds in seconds: the semantic conventions' advisory buckets.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0)
#: Why a server refuses a request without running it.
REFUSAL_REASONS = ("stale", "invalid", "too_large")
PREFIX = "txcallme_"
#: What the server's in-flight gauge counts (a request is observed from its receipt).
SERVER_IN_FLIGHT_HELP = "Requests received and not answered yet (running or waiting for a thread)."

T = TypeVar("T")


# -- the null objects: everything off ---------------------------------------------


class Call:
    """What an observer hands out for one call. This base class does nothing:
    :data:`NULL_CALL`, its one instance, is what every call gets when nothing
    is switched on (``live`` is False); :class:`ClientCall` and
    :class:`ServerCall` do the work."""

    __slots__ = ()
    live = False

    def headers(self) -> dict[str, str] | None:
        return None

    def done(self, result: T) -> T:
        return result

    def finish(self, outcome: str, error: BaseException | None = None) -> None:
        pass

    def run(self, func: Callable[..., T], *args: Any) -> T:
        return func(*args)

    def replied(self, body: bytes) -> bytes:
        return body

    def refuse(self, reason: str, error: BaseException | None = None) -> None:
        pass

    def requeued(self) -> None:
        pass


#: What observers return for every call when nothing is switched on.
NULL_CALL = Call()


# -- what is switched on --------------------------------------------------------------


class _Overrides:
    tracer_provider: Any = None
    meter_provider: Any = None


_overrides = _Overrides()
_cache: dict[tuple[str, int], tuple[Any, Any]] = {}


def configure(*, tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Use these providers instead of the global ones for observers created from
    now on (tests, benchmarks, or an application that keeps its providers
    private). ``None`` means: the global provider, if one is set."""
    _overrides.tracer_provider = tracer_provider
    _overrides.meter_provider = meter_provider


def _tracer_provider() -> Any:
    if _overrides.tracer_provider is not None:
        return _overrides.tracer_provider
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # nobody imported OpenTelemetry, so nobody set a provider
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider


def _meter_provider() -> Any:
    if _overrides.meter_provider is not None:
        return _overrides.meter_provider
    metrics = sys.modules.get("opentelemetry.metrics")
    if metrics is None:
        return None
    provider = metrics.get_meter_provider()
    if isinstance(provider, metrics.NoOpMeterProvider) or type(
            provider).__name__ == "_ProxyMeterProvider":
        return None
    return provider


def _cached(kind: str, provider: Any, make: Callable[[Any], Any]) -> Any:
    if provider is None:
        return None
    key = (kind, id(provider))
    hit = _cache.get(key)
    if hit is None or hit[0] is not provider:
        hit = _cache[key] = (provider, make(provider))
    return hit[1]


class _Tracing:
    """The tracer and the propagation functions, for one tracer provider."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.tracer = provider.get_tracer("txcallme", __version__)
        self.inject = propagate.inject
        self.extract = propagate.extract
        self.set_span_in_context = trace.set_span_in_context
        self.use_span = trace.use_span
        self.CLIENT = SpanKind.CLIENT
        self.SERVER = SpanKind.SERVER
        self.Status = Status
        self.ERROR = StatusCode.ERROR


def _histogram(meter: Any, name: str, description: str) -> Any:
    try:
        return meter.create_histogram(name, unit="s", description=description,
                                      explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
    except TypeError:  # opentelemetry-api before 1.23: no advisory parameter
        return meter.create_histogram(name, unit="s", description=description)


class _OtelMetrics:
    """OpenTelemetry instruments, for one meter provider."""

    def __init__(self, provider: Any) -> None:
        meter = provider.get_meter("txcallme", __version__)
        self.client_duration = _histogram(
            meter, "rpc.client.call.duration", "Duration of outgoing txcallme calls.")
        self.server_duration = _histogram(
            meter, "rpc.server.call.duration", "Duration of incoming txcallme calls.")
        # calls in flight are counted here and observed at collection time: an
        # up-down counter's add() per call start and end costs more than the call
        self.client_active: dict[str, int] = {}
        self.server_active: dict[str, int] = {}
        meter.create_observable_up_down_counter(
            "txcallme.client.active_calls", callbacks=[self._client_active], unit="{call}",
            description="Calls waiting for a reply.")
        meter.create_observable_up_down_counter(
            "txcallme.server.active_calls", callbacks=[self._server_active], unit="{call}",
            description=SERVER_IN_FLIGHT_HELP)
        self.refused = meter.create_counter(
            "txcallme.server.refused_requests", unit="{request}",
            description="Requests not run: stale, invalid or too large.")
        self.redelivered = meter.create_counter(
            "txcallme.server.redeliveries", unit="{request}",
            description="Requests the broker delivered again.")
        self.reconnections = meter.create_counter(
            "txcallme.reconnections", unit="{reconnection}",
            description="Broker connections made again after a loss.")
        meter.create_observable_gauge(
            "txcallme.server.pool.busy_threads", callbacks=[self._busy], unit="{thread}",
            description="Threads of a server's pool running a call.")

        self._attributes: dict[tuple[str, str, str, str | None], dict[str, str]] = {}

    def attributes(self, server_id: str, method: str, outcome: str,
                   error_type: str | None) -> dict[str, str]:
        """The (cached, bounded) attributes of one duration measurement."""
        key = (server_id, method, outcome, error_type)
        found = self._attributes.get(key)
        if found is None:
            found = {"rpc.system.name": RPC_SYSTEM, "txcallme.server_id": server_id,
                     "rpc.method": f"{server_id}/{method}" if method != OTHER else OTHER,
                     "txcallme.outcome": outcome}
            if error_type is not None:
                found["error.type"] = error_type
            if len(self._attributes) < 10_000:
                self._attributes[key] = found
        return found

    @staticmethod
    def _observations(counts: Iterable[tuple[str, int]]) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        for server_id, value in counts:
            yield Observation(value, {"rpc.system.name": RPC_SYSTEM,
                                      "txcallme.server_id": server_id})

    def _busy(self, options: Any) -> Iterable[Any]:
        return self._observations(_busy_threads())

    def _client_active(self, options: Any) -> Iterable[Any]:
        return self._observations(list(self.client_active.items()))

    def _server_active(self, options: Any) -> Iterable[Any]:
        return self._observations(list(self.server_active.items()))


class _PrometheusMetrics:
    """The Prometheus families, in one registry."""

    def __init__(self) -> None:
        P = _prometheus  # noqa: N806
        self.registry = P.Registry()
        call = ("server_id", "method", "outcome")
        self.client_duration = P.Histogram(
            PREFIX + "client_call_duration_seconds",
            "Duration of outgoing calls, from the call to its reply or failure.", call,
            DURATION_BUCKETS)
        self.client_in_flight = P.Gauge(PREFIX + "client_calls_in_flight",
                                        "Calls waiting for a reply.", ("server_id",))
        self.client_reconnections = P.Counter(
            PREFIX + "client_reconnections_total",
            "Proxy connections made again after a loss.")
        self.server_duration = P.Histogram(
            PREFIX + "server_call_duration_seconds",
            "Duration of incoming calls, from delivery to the reply.", call,
            DURATION_BUCKETS)
        self.server_in_flight = P.Gauge(PREFIX + "server_calls_in_flight",
                                        SERVER_IN_FLIGHT_HELP, ("server_id",))
        self.refused = P.Counter(PREFIX + "server_requests_refused_total",
                                 "Requests not run, by reason (stale, invalid, too_large).",
                                 ("server_id", "reason"))
        self.redeliveries = P.Counter(PREFIX + "server_redeliveries_total",
                                      "Requests the broker delivered again.", ("server_id",))
        self.server_reconnections = P.Counter(
            PREFIX + "server_reconnections_total",
            "Server connections made again after a loss.", ("server_id",))
        self.pool_busy = P.Gauge(PREFIX + "server_pool_threads_busy",
                                 "Threads of the server's pool running a call.", ("server_id",))
        self.pool_busy.callbacks.append(
            lambda: [((server_id,), busy) for server_id, busy in _busy_threads()])
        for metric in (self.client_duration, self.client_in_flight, self.client_reconnections,
                       self.server_duration, self.server_in_flight, self.refused,
                       self.redeliveries, self.server_reconnections, self.pool_busy):
            self.registry.register(metric)


_prom = _PrometheusMetrics()
_prom_enabled = False
_servers: weakref.WeakSet[ServerObserver] = weakref.WeakSet()


def _busy_threads() -> list[tuple[str, int]]:
    totals: dict[str, int] = {}
    for server in list(_servers):
        if server.busy_threads is not None:
            totals[server.server_id] = totals.get(server.server_id, 0) + server.busy_threads()
    return sorted(totals.items())


def enable_prometheus() -> _prometheus.Registry:
    """Record Prometheus metrics from observers created from now on; returns the
    registry (its ``render()`` is the text a scrape gets)."""
    global _prom_enabled
    _prom_enabled = True
    return _prom.registry


def prometheus_text() -> str:
    """The Prometheus text exposition of everything recorded so far."""
    return _prom.registry.render()


def reset() -> None:
    """Everything off again, recorded values forgotten (for tests)."""
    global _prom_enabled
    _prom_enabled = False
    configure()
    _cache.clear()
    _servers.clear()
    _prom.registry.reset()


class _Signals:
    __slots__ = ("tracing", "otel", "prom")

    def __init__(self) -> None:
        self.tracing: _Tracing | None = _cached("trace", _tracer_provider(), _Tracing)
        self.otel: _OtelMetrics | None = _cached("metrics", _meter_provider(), _OtelMetrics)
        self.prom: _PrometheusMetrics | None = _prom if _prom_enabled else None

    @property
    def live(self) -> bool:
        return self.tracing is not None or self.otel is not None or self.prom is not None


def _base_attributes(server_id: str) -> dict[str, Any]:
    return {"rpc.system.name": RPC_SYSTEM, "messaging.system": "rabbitmq",
            "messaging.destination.name": _wire.server_exchange(server_id),
            "messaging.rabbitmq.destination.routing_key": server_id}


def _fail_span(tracing: _Tracing, span: Any, error_type: str, message: str,
               error: BaseException | None, traceback: str | None = None) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(tracing.Status(tracing.ERROR, f"{error_type}: {message}"))
    if error is not None:
        span.record_exception(error)
    else:
        span.add_event("exception", {"exception.type": error_type,
                                     "exception.message": message,
                                     "exception.stacktrace": traceback or ""})


# -- the client side --------------------------------------------------------------------


def client_outcome(error: BaseException | None) -> str:
    """The outcome label of a finished call: ``ok``, ``error`` (the remote function
    raised), ``unknown_method``, ``timeout``, ``unavailable``, ``refused``,
    ``connection_lost``, ``closed``, ``cancelled`` or ``failed``."""
    if error is None:
        return "ok"
    for kind, outcome in _CLIENT_OUTCOMES:
        if isinstance(error, kind):
            return outcome
    return "failed" if isinstance(error, CallmeError) else "error"


_CLIENT_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (RemoteError, "error"), (UnknownMethod, "unknown_method"), (RpcTimeout, "timeout"),
    (ServerUnavailable, "unavailable"), (AccessRefused, "refused"),
    (BrokerConnectionLost, "connection_lost"), (ProxyClosed, "closed"),
    (CancelledError, "cancelled"))


class ClientObserver:
    """What a Proxy reports to: one per Proxy."""

    def __init__(self) -> None:
        self._signals = _Signals()
        #: False when nothing is switched on: every call gets :data:`NULL_CALL`.
        self.live = self._signals.live

    def client_call(self, server_id: str, method: str,
                    correlation_id: str) -> Call:
        """Observe one call, started now; finish it with ``done`` or ``finish``."""
        if not self.live:
            return NULL_CALL
        return ClientCall(self._signals, server_id, method, correlation_id)

    def reconnected(self) -> None:
        """The proxy's broker connection came back after a loss."""
        signals = self._signals
        if signals.prom is not None:
            signals.prom.client_reconnections.inc()
        if signals.otel is not None:
            signals.otel.reconnections.add(1, {"txcallme.role": "client"})


class ClientCall(Call):
    """One observed call on a Proxy: a CLIENT span covering the whole call (the
    request's trace headers come from it), and its duration and outcome."""

    __slots__ = ("_signals", "server_id", "method", "_start", "_span", "_headers", "_ended")
    live = True

    def __init__(self, signals: _Signals, server_id: str, method: str,
                 correlation_id: str) -> None:
        self._signals = signals
        self.server_id = server_id
        self.method = method
        self._headers: dict[str, str] | None = None
        self._ended = False
        self._span: Any = None
        tracing = signals.tracing
        if tracing is not None:
            attributes = _base_attributes(server_id)
            attributes["rpc.method"] = name = f"{server_id}/{method}"
            attributes["messaging.message.conversation_id"] = correlation_id
            self._span = tracing.tracer.start_span(name, kind=tracing.CLIENT,
                                                   attributes=attributes)
        if signals.prom is not None:
            signals.prom.client_in_flight.inc((server_id,))
        if signals.otel is not None:
            active = signals.otel.client_active
            active[server_id] = active.get(server_id, 0) + 1
        self._start = time.perf_counter()

    def headers(self) -> dict[str, str] | None:
        """The trace context as AMQP ``headers`` entries (``traceparent``,
        ``tracestate``), or None without tracing. Called for each publish."""
        tracing = self._signals.tracing
        if tracing is None or self._span is None:
            return None
        if self._headers is None:
            carrier: dict[str, str] = {}
            tracing.inject(carrier, context=tracing.set_span_in_context(self._span))
            self._headers = carrier
        return self._headers

    def done(self, result: T) -> T:
        """A callback/errback for the call's Deferred: finish with its outcome and
        pass the result (or Failure) on unchanged."""
        error = result.value if isinstance(result, Failure) else None
        self.finish(client_outcome(error), error)
        return result

    def finish(self, outcome: str, error: BaseException | None = None) -> None:
        """End the call (once; later calls are ignored)."""
        if self._ended:
            return
        self._ended = True
        duration = time.perf_counter() - self._start
        signals = self._signals
        method = OTHER if outcome == "unknown_method" else self.method
        if signals.prom is not None:
            signals.prom.client_in_flight.dec((self.server_id,))
            signals.prom.client_duration.observe((self.server_id, method, outcome), duration)
        otel = signals.otel
        if otel is not None:
            otel.client_active[self.server_id] -= 1
            otel.client_duration.record(duration, otel.attributes(
                self.server_id, method, outcome,
                _error_type(error) if error is not None else None))
        span, tracing = self._span, signals.tracing
        if span is not None and tracing is not None:
            if error is not None:
                _fail_span(tracing, span, _error_type(error), str(error), error)
            span.end()


def _error_type(error: BaseException) -> str:
    if isinstance(error, RemoteError):
        return error.type_name
    return qualified_name(type(error))


# -- the server side -------------------------------------------------------------------


class ServerObserver:
    """What a server service reports to: one per service.

    *methods* is the live mapping of registered names (others collapse to
    :data:`OTHER`); *busy_threads* reads how many pool threads run a call.
    """

    def __init__(self, server_id: str, methods: Mapping[str, Any], *,
                 busy_threads: Callable[[], int] | None = None,
                 serializer: Serializer = JSON) -> None:
        self.server_id = server_id
        self.methods = methods
        self.busy_threads = busy_threads
        self.serializer = serializer
        self._signals = _Signals()
        self.live = self._signals.live
        self._ok_prefix = b'{"result"' if serializer.content_type == JSON.content_type else None
        if self.live:
            _servers.add(self)

    def server_call(self, method: str, correlation_id: Any,
                    headers: Any) -> Call:
        """Observe one request from its receipt (*headers*: the message's
        ``headers`` table, where the caller's trace context travels): its span
        and duration include any wait for a pool thread. End it with
        :meth:`~ServerCall.replied`, :meth:`~ServerCall.finish`,
        :meth:`~ServerCall.refuse` (not run after all) or
        :meth:`~ServerCall.requeued` (sent back to the queue unrun)."""
        if not self.live:
            return NULL_CALL
        return ServerCall(self, method, correlation_id, headers)

    def refused(self, reason: str, method: str | None = None, correlation_id: Any = None,
                headers: Any = None, error: BaseException | None = None) -> None:
        """A request was not run: *reason* is ``stale``, ``invalid`` or ``too_large``."""
        if not self.live:
            return
        tracing = self._signals.tracing
        span = (_server_span(self, tracing, method, correlation_id, headers)
                if tracing is not None else None)
        self._refused(reason, method, span, error)

    def _refused(self, reason: str, method: str | None, span: Any,
                 error: BaseException | None) -> None:
        signals = self._signals
        if signals.prom is not None:
            signals.prom.refused.inc((self.server_id, reason))
        if signals.otel is not None:
            signals.otel.refused.add(1, {"rpc.system.name": RPC_SYSTEM,
                                         "txcallme.server_id": self.server_id,
                                         "txcallme.reason": reason})
        tracing = signals.tracing
        if tracing is not None and span is not None:
            if error is None:
                error = (RequestExpired(f"request {method!r} reached the server after its "
                                        "caller's deadline: not run") if reason == "stale"
                         else PayloadTooLarge("request refused: too large")
                         if reason == "too_large"
                         else InvalidRequest(f"request refused: {reason}"))
            span.set_attribute("txcallme.refused", reason)
            _fail_span(tracing, span, qualified_name(type(error)), str(error), error)
            span.end()

    def redelivered(self) -> None:
        """The broker delivered a request again (a server died mid-call)."""
        signals = self._signals
        if signals.prom is not None:
            signals.prom.redeliveries.inc((self.server_id,))
        if signals.otel is not None:
            signals.otel.redelivered.add(1, {"rpc.system.name": RPC_SYSTEM,
                                             "txcallme.server_id": self.server_id})

    def reconnected(self) -> None:
        """The service's broker connection came back after a loss."""
        signals = self._signals
        if signals.prom is not None:
            signals.prom.server_reconnections.inc((self.server_id,))
        if signals.otel is not None:
            signals.otel.reconnections.add(1, {"txcallme.role": "server",
                                               "txcallme.server_id": self.server_id})


def _text_headers(headers: Any) -> dict[str, str]:
    """Only the text entries of a headers table (other clients send anything)."""
    if not isinstance(headers, dict):
        return {}
    return {k: v for k, v in headers.items() if isinstance(k, str) and isinstance(v, str)}


def _server_span(observer: ServerObserver, tracing: _Tracing, method: str | None,
                 correlation_id: Any, headers: Any) -> Any:
    known = method is not None and method in observer.methods
    attributes = _base_attributes(observer.server_id)
    attributes["messaging.operation.type"] = "process"
    if known:
        attributes["rpc.method"] = name = f"{observer.server_id}/{method}"
    else:
        attributes["rpc.method"] = OTHER
        name = RPC_SYSTEM
        if method is not None:
            attributes["rpc.method_original"] = f"{observer.server_id}/{method}"
    if isinstance(correlation_id, str):
        attributes["messaging.message.conversation_id"] = correlation_id
    try:
        parent = tracing.extract(_text_headers(headers))
    except Exception:  # a hostile traceparent must not stop the request
        parent = None
    return tracing.tracer.start_span(name, context=parent, kind=tracing.SERVER,
                                     attributes=attributes)


class ServerCall(Call):
    """One observed request on a server: a SERVER span (a child of the caller's
    span when the request carries its context), duration and outcome."""

    __slots__ = ("_observer", "method", "_original", "_start", "_span", "_ended")
    live = True

    def __init__(self, observer: ServerObserver, method: str, correlation_id: Any,
                 headers: Any) -> None:
        self._observer = observer
        self.method = method if method in observer.methods else OTHER
        self._original = method
        self._ended = False
        signals = observer._signals
        tracing = signals.tracing
        self._span = (_server_span(observer, tracing, method, correlation_id, headers)
                      if tracing is not None else None)
        if signals.prom is not None:
            signals.prom.server_in_flight.inc((observer.server_id,))
        if signals.otel is not None:
            active = signals.otel.server_active
            active[observer.server_id] = active.get(observer.server_id, 0) + 1
        self._start = time.perf_counter()

    def run(self, func: Callable[..., T], *args: Any) -> T:
        """Call ``func(*args)`` (the dispatch) with this call's span current, so
        spans the handler makes on the reactor are its children."""
        tracing = self._observer._signals.tracing
        if self._span is None or tracing is None:
            return func(*args)
        with tracing.use_span(self._span, end_on_exit=False, record_exception=False,
                              set_status_on_exception=False):
            return func(*args)

    def replied(self, body: bytes) -> bytes:
        """A callback for the dispatch's Deferred (which fires with the reply
        body): finish with the outcome the body says, pass the body on."""
        if self._ended:
            return body
        prefix = self._observer._ok_prefix
        if prefix is not None and body[:len(prefix)] == prefix:
            self.finish("ok")
            return body
        try:
            reply = _wire.decode_reply(self._observer.serializer, body)
        except Exception:
            self.finish("ok")
            return body
        if reply.ok:
            self.finish("ok")
        else:
            self._finish_remote(reply.error)
        return body

    def refuse(self, reason: str, error: BaseException | None = None) -> None:
        """The request is not run after all (*reason* ``stale``: its deadline passed
        while it waited): counted as refused, not as a call."""
        if self._leave():
            self._observer._refused(reason, self._original, self._span, error)

    def _leave(self) -> bool:
        """End this call's time in flight, once: False if it had ended already."""
        if self._ended:
            return False
        self._ended = True
        observer = self._observer
        signals = observer._signals
        if signals.prom is not None:
            signals.prom.server_in_flight.dec((observer.server_id,))
        if signals.otel is not None:
            signals.otel.server_active[observer.server_id] -= 1
        return True

    def requeued(self) -> None:
        """The request goes back to the queue unrun (the server stops, or the
        channel it came on closed while it waited for a thread): no longer in
        flight, neither a call nor a refusal; its span ends with
        ``txcallme.requeued`` = True (another delivery gets a span of its own)."""
        if self._leave() and self._span is not None:
            self._span.set_attribute("txcallme.requeued", True)
            self._span.end()

    def _finish_remote(self, error: dict[str, Any]) -> None:
        error_type = error["type"]
        outcome = "unknown_method" if error_type == qualified_name(UnknownMethod) else "error"
        self._record(outcome, error_type)
        tracing = self._observer._signals.tracing
        if self._span is not None and tracing is not None:
            _fail_span(tracing, self._span, error_type, error["message"], None,
                       error.get("traceback"))
            self._span.end()

    def finish(self, outcome: str, error: BaseException | None = None) -> None:
        """End the request (once) with *outcome* (``ok``, ``error``, ...)."""
        if self._ended:
            return
        self._record(outcome, _error_type(error) if error is not None else None)
        tracing = self._observer._signals.tracing
        if self._span is not None and tracing is not None:
            if error is not None:
                _fail_span(tracing, self._span, _error_type(error), str(error), error)
            self._span.end()

    def _record(self, outcome: str, error_type: str | None) -> None:
        self._ended = True
        duration = time.perf_counter() - self._start
        observer = self._observer
        signals = observer._signals
        server_id = observer.server_id
        if signals.prom is not None:
            signals.prom.server_in_flight.dec((server_id,))
            signals.prom.server_duration.observe((server_id, self.method, outcome), duration)
        otel = signals.otel
        if otel is not None:
            otel.server_active[server_id] -= 1
            otel.server_duration.record(duration, otel.attributes(
                server_id, self.method, outcome, error_type))


def pool_busy(pool: Any) -> Callable[[], int] | None:
    """A *busy_threads* reader for a Twisted ``ThreadPool`` (None for no pool)."""
    if pool is None:
        return None
    return lambda: len(pool.working)


# -- switching everything on (benchmarks) --------------------------------------------


class Everything:
    """What :func:`enable_everything` switched on; ``shutdown()`` switches it off."""

    def __init__(self, tracer_provider: Any, meter_provider: Any, span_exporter: Any,
                 metric_reader: Any) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.span_exporter = span_exporter
        self.metric_reader = metric_reader

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        reset()


def enable_everything(span_exporter: Any = None, *, sample_ratio: float = 1.0) -> Everything:
    """Switch on tracing, OpenTelemetry metrics and Prometheus for observers
    created from now on, with the OpenTelemetry SDK (``opentelemetry-sdk``):
    spans go through a ``BatchSpanProcessor`` to *span_exporter* (default: one
    that drops them), a ``ParentBased(TraceIdRatioBased(sample_ratio))`` sampler
    keeps that share of new traces, metrics are aggregated for an in-memory reader. For
    benchmarks measuring the cost of observability; call it before creating
    proxies and services."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class _Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    exporter = span_exporter if span_exporter is not None else _Drop()
    tracer_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    configure(tracer_provider=tracer_provider, meter_provider=meter_provider)
    enable_prometheus()
    return Everything(tracer_provider, meter_provider, exporter, reader)


# -- /metrics over HTTP -------------------------------------------------------------------


def metrics_resource() -> Any:
    """A ``twisted.web`` resource rendering the Prometheus text (and
    :func:`enable_prometheus`)."""
    from txcallme._metrics_http import MetricsResource

    return MetricsResource(enable_prometheus())


def metrics_service(port: int, interface: str = "127.0.0.1", *, reactor: Any = None) -> Any:
    """A Twisted service serving ``http://INTERFACE:PORT/metrics`` (and
    :func:`enable_prometheus`). Create it before the services it reports on."""
    from txcallme._metrics_http import metrics_service as make

    return make(enable_prometheus(), port, interface, reactor)


def with_metrics(service: Any, metrics: Any) -> Any:
    """One service that starts and stops *service* and the *metrics* service."""
    from twisted.application.service import MultiService

    both = MultiService()
    both.setName(getattr(service, "name", None) or "callme")
    metrics.setServiceParent(both)
    service.setServiceParent(both)
    return both


# PayloadTooLarge is what makes a refusal "too_large" rather than "invalid".
def refusal_reason(error: InvalidRequest) -> str:
    """``too_large`` for :class:`~txcallme.errors.PayloadTooLarge`, else ``invalid``."""
    return "too_large" if isinstance(error, PayloadTooLarge) else "invalid"
