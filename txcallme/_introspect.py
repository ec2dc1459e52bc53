"""Reserved calls every server answers unless told not to:
``__callme__.ping``, ``__callme__.describe`` and ``__callme__.stats``.

The numbers ``stats`` reports come from :class:`Stats`, which :func:`install`
puts around the dispatcher's ``dispatch``: every request the service hands to
the dispatcher is measured, from the start of dispatch to its reply body
(result or error envelope), unknown methods and bad arguments included.
"""

from __future__ import annotations

import inspect
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from txcallme import observe
from txcallme._version import __version__
from txcallme._wire import RESERVED_PREFIX, Request
from txcallme.serializers import Serializer
from txcallme.server import CallContext, Dispatcher

PING = RESERVED_PREFIX + "ping"
DESCRIBE = RESERVED_PREFIX + "describe"
STATS = RESERVED_PREFIX + "stats"

#: Durations kept per method for the percentiles (the most recent ones).
SAMPLES = 1024

#: Methods a server does not have are counted under this name: the metrics' own
#: (``observe.OTHER``), so a stats table and a scrape name them alike.
OTHER = observe.OTHER


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of *sorted_values* (None if empty)."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * fraction // 1))  # ceil
    return sorted_values[int(rank) - 1]


class MethodStats:
    """Calls, errors and recent durations of one method."""

    __slots__ = ("calls", "errors", "durations")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.durations: deque[float] = deque(maxlen=SAMPLES)

    def snapshot(self) -> dict[str, Any]:
        ordered = sorted(self.durations)
        p50, p99 = percentile(ordered, 0.50), percentile(ordered, 0.99)
        return {"calls": self.calls, "errors": self.errors,
                "p50_ms": None if p50 is None else round(p50 * 1000, 3),
                "p99_ms": None if p99 is None else round(p99 * 1000, 3)}


class Stats:
    """What one server instance has done since it was created.

    :meth:`record` is the one entry point (``ok`` False for an error reply);
    :meth:`started` / :meth:`finished` count calls in flight. Reserved
    ``__callme__.*`` calls are not counted.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 busy_threads: Callable[[], int] | None = None,
                 threads: int | None = None) -> None:
        self._clock = clock
        self._born = clock()
        self.methods: dict[str, MethodStats] = {}
        self.in_flight = 0
        #: blocking calls running now (each holds one pool thread)
        self.blocking_in_flight = 0
        self._busy_threads = busy_threads
        self.threads = threads

    def record(self, method: str, seconds: float, ok: bool) -> None:
        """Count one finished call of *method* that took *seconds*."""
        stats = self.methods.get(method)
        if stats is None:
            stats = self.methods[method] = MethodStats()
        stats.calls += 1
        if not ok:
            stats.errors += 1
        stats.durations.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        """The numbers as JSON-ready values."""
        busy = self._busy_threads() if self._busy_threads is not None \
            else self.blocking_in_flight
        every = MethodStats()
        for stats in self.methods.values():
            every.calls += stats.calls
            every.errors += stats.errors
            every.durations.extend(stats.durations)
        return {"uptime": round(self._clock() - self._born, 3),
                "in_flight": self.in_flight, "pool_busy": busy, "pool_threads": self.threads,
                "total": every.snapshot(),
                "methods": {name: stats.snapshot()
                            for name, stats in sorted(self.methods.items())}}

    def wrap(self, dispatcher: Dispatcher) -> None:
        """Measure every call *dispatcher* runs (its ``dispatch``, replaced on
        this instance by a measuring one)."""
        dispatch = dispatcher.dispatch
        ok_prefix = _ok_prefix(dispatcher.serializer)
        serializer = dispatcher.serializer
        clock = self._clock

        def measured(request: Request,
                     context: Callable[[], CallContext] | None = None) -> Deferred[bytes]:
            method = request.method
            if method.startswith(RESERVED_PREFIX):
                return dispatch(request, context)
            handler = dispatcher.handlers.get(method)
            name = method if handler is not None else OTHER
            blocking = handler is not None and handler.blocking
            start = clock()
            self.in_flight += 1
            self.blocking_in_flight += blocking

            def done(body: bytes) -> bytes:
                self.in_flight -= 1
                self.blocking_in_flight -= blocking
                self.record(name, clock() - start, _is_result(body, ok_prefix, serializer))
                return body

            return dispatch(request, context).addCallback(done)

        dispatcher.dispatch = measured  # type: ignore[method-assign]


def _ok_prefix(serializer: Serializer) -> bytes | None:
    probe = serializer.dumps({"result": None})
    return probe[:9] if probe.startswith(b'{"result"') else None


def _is_result(body: bytes, ok_prefix: bytes | None, serializer: Serializer) -> bool:
    if ok_prefix is not None:
        return body.startswith(ok_prefix)
    try:
        return "result" in serializer.loads(body)
    except Exception:
        return False


def install(dispatcher: Dispatcher, server_id: str, *,
            busy_threads: Callable[[], int] | None = None,
            threads: int | None = None) -> Stats:
    """Register the reserved ping/describe/stats functions on *dispatcher* and
    measure its calls; the :class:`Stats` it feeds.

    *busy_threads* reads the pool's busy threads (default: the blocking calls
    running, each of which holds one); *threads* is the pool's size.
    """
    instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    stats = Stats(busy_threads=busy_threads, threads=threads)
    stats.wrap(dispatcher)

    def ping() -> dict[str, Any]:
        return {"server_id": server_id, "instance": instance, "version": __version__}

    def describe() -> dict[str, Any]:
        functions = []
        for name, handler in sorted(dispatcher.handlers.items()):
            if name.startswith(RESERVED_PREFIX):
                continue
            doc = inspect.getdoc(handler.func) or ""
            functions.append({
                "name": name,
                "signature": str(handler.signature) if handler.signature else "(...)",
                "doc": doc.strip().splitlines()[0] if doc.strip() else "",
                "blocking": handler.blocking,
            })
        return {"server_id": server_id, "instance": instance, "functions": functions}

    def report() -> dict[str, Any]:
        return {"server_id": server_id, "instance": instance, "version": __version__,
                **stats.snapshot()}

    dispatcher.register(ping, PING, blocking=False, reserved=True)
    dispatcher.register(describe, DESCRIBE, blocking=False, reserved=True)
    dispatcher.register(report, STATS, blocking=False, reserved=True)
    return stats
