"""The observability seam without a broker: the off path, spans, metrics, Prometheus text."""

from __future__ import annotations

import subprocess
import sys
import timeit
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from txcallme import _wire, observe
from txcallme._prometheus import Counter, Gauge, Histogram, Registry
from txcallme.errors import (
    InvalidRequest,
    RequestExpired,
    RpcTimeout,
    UnknownMethod,
    qualified_name,
)
from txcallme.serializers import JSON

pytestmark = pytest.mark.timeout(60)


class Telemetry:
    """Private SDK providers handed to txcallme with observe.configure()."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def finished(self) -> list[Any]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += list(metric.data.data_points)
        return found


def telemetry_on() -> Iterator[Telemetry]:
    """Tracing, OTel metrics and Prometheus on; everything off again afterwards."""
    observe.reset()
    t = Telemetry()
    observe.configure(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
    observe.enable_prometheus()
    yield t
    observe.reset()
    t.tracer_provider.shutdown()
    t.meter_provider.shutdown()


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """Tracing, OTel metrics and Prometheus on; everything off again afterwards."""
    yield from telemetry_on()


@pytest.fixture
def off() -> Iterator[None]:
    """Nothing switched on (this process never sets global OTel providers)."""
    observe.reset()
    yield
    observe.reset()


def families() -> dict[str, Any]:
    """Parsed families by exposed name (counters under their ``_total`` name)."""
    found = {}
    for family in text_string_to_metric_families(observe.prometheus_text()):
        found[family.name + ("_total" if family.type == "counter" else "")] = family
    return found


def samples(name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of one family keyed by (sample name, sorted labels)."""
    family = families()[name]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


# -- off -------------------------------------------------------------------------------


def test_off_observers_hand_out_the_null_call(off: None) -> None:
    """With nothing switched on, every call gets the one shared null object."""
    client = observe.ClientObserver()
    server = observe.ServerObserver("s", {"add": None})
    assert not client.live and not server.live
    assert client.client_call("s", "add", "1") is observe.NULL_CALL
    assert server.server_call("add", "1", {"traceparent": "x"}) is observe.NULL_CALL
    null = observe.NULL_CALL
    assert null.headers() is None
    assert null.run(lambda a, b: a + b, 1, 2) == 3
    assert null.replied(b"body") == b"body"
    failure = Failure(ValueError("x"))
    assert null.done(failure) is failure


def test_off_records_nothing(off: None) -> None:
    """Observers made while off record nothing, even if Prometheus is enabled later."""
    client = observe.ClientObserver()
    server = observe.ServerObserver("s", {"add": None}, busy_threads=lambda: 3)
    observe.enable_prometheus()
    client.client_call("s", "add", "1").done(1)
    client.reconnected()
    server.refused("stale", "add", "1")
    server.redelivered()
    server.reconnected()
    recorded = [(s.name, s.value) for f in families().values() for s in f.samples]
    assert recorded == [("txcallme_client_reconnections_total", 0)]


def test_off_cost_per_call(off: None) -> None:
    """Off, a client call plus its finish and a server dispatch cost well under 5 us."""
    client = observe.ClientObserver()
    server = observe.ServerObserver("s", {"add": None})

    def one() -> None:
        call = client.client_call("s", "add", "1a")
        if call.live:
            raise AssertionError("live while off")
        server.server_call("add", "1a", None).run(len, "ab")

    per_call = min(timeit.repeat(one, number=20_000, repeat=5)) / 20_000
    assert per_call < 5e-6, f"{per_call * 1e9:.0f} ns per call"


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()


def test_off_does_not_import_opentelemetry() -> None:
    """A process that never imported OpenTelemetry gets null observers without importing it."""
    out = _run("import sys\nfrom txcallme import observe, Proxy\n"
               "o = observe.ClientObserver()\n"
               "print(o.live, observe.ServerObserver('s', {}).live,"
               " any(m.startswith('opentelemetry') for m in sys.modules))")
    assert out == "False False False"


def test_off_with_opentelemetry_but_no_provider() -> None:
    """OpenTelemetry imported but no global provider set: the observers are off."""
    out = _run("import opentelemetry.trace, opentelemetry.metrics\n"
               "from txcallme import observe\n"
               "print(observe.ClientObserver().live)")
    assert out == "False"


def test_global_providers_switch_it_on() -> None:
    """Global SDK tracer and meter providers, set before the observer, switch it on."""
    out = _run(
        "from opentelemetry import trace, metrics\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import "
        "InMemorySpanExporter\n"
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
        "e = InMemorySpanExporter(); tp = TracerProvider()\n"
        "tp.add_span_processor(SimpleSpanProcessor(e)); trace.set_tracer_provider(tp)\n"
        "r = InMemoryMetricReader()\n"
        "metrics.set_meter_provider(MeterProvider(metric_readers=[r]))\n"
        "from txcallme import observe\n"
        "c = observe.ClientObserver().client_call('s', 'add', '1'); c.done(2)\n"
        "names = [m.name for rm in r.get_metrics_data().resource_metrics"
        " for sm in rm.scope_metrics for m in sm.metrics]\n"
        "print([s.name for s in e.get_finished_spans()], 'rpc.client.call.duration' in names)")
    assert out == "['s/add'] True"


# -- client spans ----------------------------------------------------------------------


def test_client_span_attributes_and_headers(telemetry: Telemetry) -> None:
    """A client call is one CLIENT span named server/method; its headers carry its context."""
    call = observe.ClientObserver().client_call("fooserver", "add", "1f")
    headers = call.headers()
    assert headers is not None and call.headers() == headers
    call.done(3)
    [span] = telemetry.finished()
    assert span.name == "fooserver/add" and span.kind is SpanKind.CLIENT
    assert dict(span.attributes) == {
        "rpc.system.name": "txcallme", "rpc.method": "fooserver/add",
        "messaging.system": "rabbitmq", "messaging.destination.name": "server_fooserver_ex",
        "messaging.rabbitmq.destination.routing_key": "fooserver",
        "messaging.message.conversation_id": "1f"}
    assert span.status.status_code is StatusCode.UNSET
    trace_id = format(span.context.trace_id, "032x")
    span_id = format(span.context.span_id, "016x")
    flags = format(span.context.trace_flags, "02x")
    assert headers["traceparent"] == f"00-{trace_id}-{span_id}-{flags}"
    assert list(span.events) == []


def test_client_timeout_span(telemetry: Telemetry) -> None:
    """A timed-out call ends its span with status ERROR, error.type and the exception."""
    call = observe.ClientObserver().client_call("fooserver", "slow", "2")
    failure = Failure(RpcTimeout("fooserver", "slow", 1.0))
    assert call.done(failure) is failure
    [span] = telemetry.finished()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "txcallme.errors.RpcTimeout"
    [event] = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "txcallme.errors.RpcTimeout"


def test_client_metrics_and_cardinality(telemetry: Telemetry) -> None:
    """Client durations are counted by server, method and outcome; unknown methods as _OTHER."""
    observer = observe.ClientObserver()
    for i in range(3):
        observer.client_call("s1", "add", str(i)).done(i)
    observer.client_call("s1", "nope", "9").done(Failure(UnknownMethod("no nope")))
    observer.client_call("s1", "div", "10").done(Failure(ZeroDivisionError()))
    pending = observer.client_call("s1", "add", "11")
    got = samples("txcallme_client_call_duration_seconds")
    count = "txcallme_client_call_duration_seconds_count"
    assert got[(count, (("method", "add"), ("outcome", "ok"), ("server_id", "s1")))] == 3
    assert got[(count, (("method", "_OTHER"), ("outcome", "unknown_method"),
                        ("server_id", "s1")))] == 1
    assert got[(count, (("method", "div"), ("outcome", "error"), ("server_id", "s1")))] == 1
    assert not any(dict(labels).get("method") == "nope" for _, labels in got)
    assert samples("txcallme_client_calls_in_flight") == {
        ("txcallme_client_calls_in_flight", (("server_id", "s1"),)): 1}
    pending.done(1)
    [point] = [p for p in telemetry.points("rpc.client.call.duration")
               if p.attributes["txcallme.outcome"] == "ok"]
    assert point.count == 4 and tuple(point.explicit_bounds) == observe.DURATION_BUCKETS
    assert point.attributes["rpc.method"] == "s1/add"
    [other] = [p for p in telemetry.points("rpc.client.call.duration")
               if p.attributes["txcallme.outcome"] == "unknown_method"]
    assert other.attributes["rpc.method"] == "_OTHER"


def test_client_finish_once(telemetry: Telemetry) -> None:
    """A call finished twice (reply after cancel) is counted and ended once."""
    call = observe.ClientObserver().client_call("s", "add", "1")
    call.finish("cancelled")
    call.finish("ok")
    assert len(telemetry.finished()) == 1
    assert samples("txcallme_client_call_duration_seconds")[
        ("txcallme_client_call_duration_seconds_count",
         (("method", "add"), ("outcome", "cancelled"), ("server_id", "s")))] == 1


@pytest.mark.parametrize(("error", "outcome"), [
    (None, "ok"), (RpcTimeout("s", "m", 1), "timeout"), (UnknownMethod("x"), "unknown_method"),
    (ZeroDivisionError(), "error"), (InvalidRequest("bad reply"), "failed")])
def test_client_outcomes(error: BaseException | None, outcome: str) -> None:
    """Each kind of ending has one outcome label."""
    assert observe.client_outcome(error) == outcome


# -- server spans ---------------------------------------------------------------------


def test_server_span_is_child_of_client_span(telemetry: Telemetry) -> None:
    """The server span continues the trace in the request headers, as a child."""
    client = observe.ClientObserver().client_call("s", "add", "7")
    headers = client.headers()
    server = observe.ServerObserver("s", {"add": None})
    call = server.server_call("add", "7", dict(headers or {}))
    body = call.run(lambda: _wire.encode_result(JSON, 3))
    assert call.replied(body) is body
    client.done(3)
    server_span, client_span = telemetry.finished()
    assert server_span.kind is SpanKind.SERVER and server_span.name == "s/add"
    assert server_span.parent.span_id == client_span.context.span_id
    assert server_span.context.trace_id == client_span.context.trace_id
    assert server_span.attributes["messaging.operation.type"] == "process"
    assert server_span.attributes["messaging.message.conversation_id"] == "7"


def test_server_run_makes_the_span_current(telemetry: Telemetry) -> None:
    """Spans a handler starts inside run() are children of the server span."""
    call = observe.ServerObserver("s", {"add": None}).server_call("add", "1", None)
    tracer = telemetry.tracer_provider.get_tracer("handler")

    def handler() -> bytes:
        with tracer.start_as_current_span("inner"):
            return _wire.encode_result(JSON, 1)

    call.replied(call.run(handler))
    inner, outer = telemetry.finished()
    assert inner.parent.span_id == outer.context.span_id


def test_server_error_reply(telemetry: Telemetry) -> None:
    """An error reply ends the server span in ERROR with the remote type and traceback."""
    server = observe.ServerObserver("s", {"div": None})
    call = server.server_call("div", "1", None)
    body = _wire.encode_error(JSON, {"type": "ZeroDivisionError", "message": "division by zero",
                                     "args": [], "traceback": "Traceback ...\n"})
    call.replied(body)
    [span] = telemetry.finished()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ZeroDivisionError"
    [event] = span.events
    assert event.attributes["exception.stacktrace"] == "Traceback ...\n"
    assert samples("txcallme_server_call_duration_seconds")[
        ("txcallme_server_call_duration_seconds_count",
         (("method", "div"), ("outcome", "error"), ("server_id", "s")))] == 1


def test_server_unknown_method(telemetry: Telemetry) -> None:
    """A method the server lacks: span named txcallme, rpc.method _OTHER, label _OTHER."""
    server = observe.ServerObserver("s", {"add": None})
    call = server.server_call("drop_tables", "1", None)
    error = UnknownMethod("no function 'drop_tables' on this server")
    call.replied(_wire.encode_error(JSON, _wire.error_description(error, False)))
    [span] = telemetry.finished()
    assert span.name == "txcallme"
    assert span.attributes["rpc.method"] == "_OTHER"
    assert span.attributes["rpc.method_original"] == "s/drop_tables"
    assert span.attributes["error.type"] == "txcallme.errors.UnknownMethod"
    got = samples("txcallme_server_call_duration_seconds")
    assert got[("txcallme_server_call_duration_seconds_count",
                (("method", "_OTHER"), ("outcome", "unknown_method"), ("server_id", "s")))] == 1


@pytest.mark.parametrize("headers", [
    None, {"traceparent": b"\xff"}, {"traceparent": "garbage"}, {"traceparent": ["x"]},
    {1: 2}, "not a table", {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"}])
def test_server_hostile_headers(telemetry: Telemetry, headers: Any) -> None:
    """Any headers table gives a root server span (never an exception)."""
    call = observe.ServerObserver("s", {"add": None}).server_call("add", "1", headers)
    call.replied(_wire.encode_result(JSON, 1))
    [span] = telemetry.finished()
    assert span.parent is None


def test_refusals(telemetry: Telemetry) -> None:
    """Stale, invalid and too-large requests are counted and each ends an ERROR span."""
    server = observe.ServerObserver("s", {"add": None})
    server.refused("stale", "add", "1")
    server.refused("invalid", None, "2", None, InvalidRequest("bad JSON"))
    server.refused("too_large", None, None)
    server.refused("stale", "add", "3")
    got = samples("txcallme_server_requests_refused_total")
    name = "txcallme_server_requests_refused_total"
    assert got == {(name, (("reason", "invalid"), ("server_id", "s"))): 1,
                   (name, (("reason", "stale"), ("server_id", "s"))): 2,
                   (name, (("reason", "too_large"), ("server_id", "s"))): 1}
    spans = telemetry.finished()
    assert [s.attributes["txcallme.refused"] for s in spans] == [
        "stale", "invalid", "too_large", "stale"]
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)
    assert spans[0].attributes["error.type"] == "txcallme.errors.RequestExpired"
    assert spans[0].name == "s/add"
    assert spans[1].attributes["error.type"] == "txcallme.errors.InvalidRequest"
    assert spans[1].name == "txcallme"
    [given] = spans[1].events  # the error passed in is the one recorded
    assert given.attributes["exception.message"] == "bad JSON"
    # without an error, each reason records its own exception type
    assert spans[2].attributes["error.type"] == "txcallme.errors.PayloadTooLarge"
    [stale] = spans[0].events
    assert stale.attributes["exception.type"] == qualified_name(RequestExpired)
    assert "'add' reached the server after its caller's deadline" in stale.attributes[
        "exception.message"]


def test_counters_and_pool_gauge(telemetry: Telemetry) -> None:
    """Redeliveries, reconnections and busy pool threads reach Prometheus and OTel."""
    busy = [2]
    server = observe.ServerObserver("s", {}, busy_threads=lambda: busy[0])
    server.redelivered()
    server.reconnected()
    observe.ClientObserver().reconnected()
    assert samples("txcallme_server_redeliveries_total") == {
        ("txcallme_server_redeliveries_total", (("server_id", "s"),)): 1}
    assert samples("txcallme_server_reconnections_total") == {
        ("txcallme_server_reconnections_total", (("server_id", "s"),)): 1}
    assert samples("txcallme_client_reconnections_total") == {
        ("txcallme_client_reconnections_total", ()): 1}
    assert samples("txcallme_server_pool_threads_busy") == {
        ("txcallme_server_pool_threads_busy", (("server_id", "s"),)): 2}
    busy[0] = 5
    [point] = telemetry.points("txcallme.server.pool.busy_threads")
    assert point.value == 5
    assert [p.value for p in telemetry.points("txcallme.reconnections")] == [1, 1]


# -- Prometheus text ----------------------------------------------------------------------


def test_exposition_parses() -> None:
    """Histograms, counters and gauges render as text prometheus_client parses back."""
    registry = Registry()
    hist = Histogram("x_seconds", "A histogram.", ("a",), (0.1, 1.0))
    counter = Counter("y_total", "A counter\nwith a newline.", ("b",))
    gauge = Gauge("z", "A gauge.")
    for metric in (hist, counter, gauge):
        registry.register(metric)
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(('quote" back\\slash\nnew',), value)
    counter.inc(("v",), 2)
    gauge.inc()
    gauge.callbacks.append(lambda: [((), 4.0)])
    parsed = {f.name: f for f in text_string_to_metric_families(registry.render())}
    got = {(s.name, s.labels.get("le")): s.value for s in parsed["x_seconds"].samples}
    assert got == {("x_seconds_bucket", "0.1"): 2, ("x_seconds_bucket", "1.0"): 3,
                   ("x_seconds_bucket", "+Inf"): 4, ("x_seconds_count", None): 4,
                   ("x_seconds_sum", None): 3.65}
    assert {s.labels["a"] for s in parsed["x_seconds"].samples} == {'quote" back\\slash\nnew'}
    assert parsed["y"].type == "counter" and parsed["y"].samples[0].value == 2
    assert parsed["z"].samples[0].value == 5
    with pytest.raises(ValueError):
        registry.register(Gauge("z", "again"))


def test_metrics_resource(telemetry: Telemetry) -> None:
    """GET /metrics answers the registry in the text format with its content type."""
    observe.ClientObserver().client_call("s", "add", "1").done(1)
    request = DummyRequest([b""])
    body = observe.metrics_resource().render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/plain; version=0.0.4; charset=utf-8"]
    assert body.decode() == observe.prometheus_text()
    assert 'txcallme_client_call_duration_seconds_count{server_id="s",method="add",' \
           'outcome="ok"} 1' in body.decode()


# -- README.rst's Observability blocks (checked by tests/test_readme.py) -----------------


def check_readme_block(text: str) -> None:
    """A README literal block of the Observability section says what the code does."""
    if text.startswith("trace "):
        check_span_tree(text)
    else:
        check_scrape_excerpt(text)


def check_span_tree(text: str) -> None:
    """The span tree: a CLIENT span, its traceparent header, its child SERVER span,
    with the names the code gives them."""
    import re

    lines = text.splitlines()
    trace_id = re.match(r"trace ([0-9a-f]{32}):", lines[0]).group(1)  # type: ignore[union-attr]
    client = re.match(r"(\S+)  CLIENT .* span ([0-9a-f]{16})$", lines[1])
    assert client is not None
    assert re.search(rf"traceparent: 00-{trace_id}-{client.group(2)}-[0-9a-f]{{2}}$", text,
                     re.MULTILINE)
    server = re.search(r"\|-- (\S+)  SERVER .* span [0-9a-f]{16}, parent ([0-9a-f]{16})$",
                       text, re.MULTILINE)
    assert server is not None and server.group(2) == client.group(2)
    t = Telemetry()
    observe.configure(tracer_provider=t.tracer_provider)
    try:
        call = observe.ClientObserver().client_call("fooserver", "add", "1")
        observed = observe.ServerObserver("fooserver", {"add": None}).server_call(
            "add", "1", call.headers())
        observed.replied(_wire.encode_result(JSON, 3))
        call.done(3)
    finally:
        observe.reset()
    server_span, client_span = t.finished()
    assert (client.group(1), server.group(1)) == (client_span.name, server_span.name)
    assert "server_fooserver_ex" in text and "routing key fooserver" in text


def check_scrape_excerpt(text: str) -> None:
    """The scrape excerpt parses, and every family, type, help text and label in it is
    the code's."""
    registry = observe.enable_prometheus()
    try:
        parsed = list(text_string_to_metric_families(text))
    finally:
        observe.reset()
    assert len(parsed) >= 5
    for family in parsed:
        name = family.name + ("_total" if family.type == "counter" else "")
        metric = registry.metrics[name]
        assert (family.type, family.documentation) == (metric.kind, metric.help), name
        for sample in family.samples:
            assert set(sample.labels) <= {*metric.labelnames, "le"}, sample


def test_server_call_refused_after_receipt(telemetry: Telemetry) -> None:
    """A request that went stale while waiting for a thread is counted as refused, once,
    and its span (started at receipt) ends as a refusal."""
    server = observe.ServerObserver("s", {"add": None})
    call = server.server_call("add", "1", None)
    call.refuse("stale")
    call.refuse("stale")
    call.replied(_wire.encode_result(JSON, 1))
    [span] = telemetry.finished()
    assert span.attributes["txcallme.refused"] == "stale"
    assert span.attributes["error.type"] == "txcallme.errors.RequestExpired"
    assert samples("txcallme_server_requests_refused_total") == {
        ("txcallme_server_requests_refused_total", (("reason", "stale"), ("server_id", "s"))): 1}
    assert samples("txcallme_server_calls_in_flight") == {
        ("txcallme_server_calls_in_flight", (("server_id", "s"),)): 0}
    assert "txcallme_server_call_duration_seconds_count" not in str(
        samples("txcallme_server_call_duration_seconds"))
    assert observe.NULL_CALL.refuse("stale") is None
