"""Reserved introspection calls, and several broker addresses tried in turn."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted
from conftest import new_server_id, track_proxy
from twisted.internet import reactor
from twisted.internet import threads as twisted_threads
from twisted.internet.defer import Deferred

import txcallme
from txcallme._introspect import SAMPLES, Stats, percentile
from txcallme._wire import Request
from txcallme.serializers import JSON
from txcallme.server import Dispatcher


async def _serve(sid: str, **kw: object) -> txcallme.CallmeServerService:
    svc = txcallme.CallmeServerService(sid, reactor=reactor, **kw)

    @svc.register_function
    def add(a: int, b: int = 2) -> int:
        """Add two numbers.

        More text that describe leaves out."""
        return a + b

    svc.startService()
    await svc.when_ready()
    return svc


@pytest_twisted.ensureDeferred
async def test_ping_and_describe() -> None:
    """Every server answers __callme__.ping and __callme__.describe by default."""
    sid = new_server_id()
    svc = await _serve(sid)
    proxy = track_proxy(txcallme.Proxy(timeout=5, reactor=reactor))
    try:
        ping = await proxy.call(sid, "__callme__.ping")
        assert ping["server_id"] == sid and ping["instance"] and ping["version"]
        described = await proxy.call(sid, "__callme__.describe")
        assert described["functions"] == [{
            "name": "add", "signature": "(a: 'int', b: 'int' = 2) -> 'int'",
            "doc": "Add two numbers.", "blocking": False}]
    finally:
        await proxy.close()
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_introspection_can_be_turned_off() -> None:
    """introspection=False: the reserved names are unknown methods like any other."""
    sid = new_server_id()
    svc = await _serve(sid, introspection=False)
    proxy = track_proxy(txcallme.Proxy(timeout=5, reactor=reactor))
    try:
        with pytest.raises(txcallme.UnknownMethod):
            await proxy.call(sid, "__callme__.ping")
        assert await proxy.call(sid, "add", 1) == 3
    finally:
        await proxy.close()
        await svc.stopService()


def test_reserved_names_cannot_be_registered() -> None:
    """Users cannot register functions under the reserved prefix."""
    svc = txcallme.CallmeServerService(new_server_id(), reactor=reactor)
    with pytest.raises(ValueError, match="reserved"):
        svc.register_function(lambda: 1, "__callme__.ping")


@pytest_twisted.ensureDeferred
async def test_addresses_tried_in_turn() -> None:
    """With a dead address first in the list, Proxy and server connect through the next."""
    sid = new_server_id()
    hosts = ["127.0.0.1:1", "127.0.0.1:5672"]
    svc = await _serve(sid, amqp_host=hosts)
    proxy = track_proxy(txcallme.Proxy(amqp_host=hosts, timeout=5, reactor=reactor))
    try:
        assert await proxy.use_server(sid).add(1, 1) == 2
    finally:
        await proxy.close()
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_all_addresses_dead_fails_fast() -> None:
    """When every address is dead, the first connection fails naming the last one tried."""
    proxy = txcallme.Proxy(amqp_host=["127.0.0.1:1", "127.0.0.1:2"], timeout=5,
                           reactor=reactor)
    try:
        with pytest.raises(txcallme.BrokerUnreachable, match="127.0.0.1:2"):
            await proxy.when_ready()
    finally:
        await proxy.close()


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_percentile_nearest_rank() -> None:
    """p50/p99 are nearest-rank percentiles; none of an empty list."""
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99)) == (50.0, 99.0)
    assert percentile([3.0], 0.99) == 3.0 and percentile([], 0.5) is None


def test_stats_measure_every_dispatched_call() -> None:
    """Stats around a Dispatcher count calls, errors (raised, bad arguments, unknown
    methods) and durations per method, and calls in flight; reserved calls are not counted."""
    clock = FakeClock()
    dispatcher = Dispatcher(JSON)
    stats = Stats(clock=clock)
    stats.wrap(dispatcher)
    pending: list[Deferred[int]] = []

    def slow() -> Deferred[int]:
        d: Deferred[int] = Deferred()
        pending.append(d)
        return d

    dispatcher.register(lambda a, b: a + b, "add")
    dispatcher.register(lambda: 1 / 0, "fail")
    dispatcher.register(slow, "slow")
    dispatcher.register(lambda: "pong", "__callme__.ping", reserved=True)

    def call(method: str, *args: Any) -> Deferred[bytes]:
        return dispatcher.dispatch(Request(method, list(args), {}, None))

    call("add", 1, 2)
    call("add", 1)          # bad arguments: an error reply
    call("fail")
    call("nope")
    call("__callme__.ping")
    running = call("slow")
    assert stats.in_flight == 1
    clock.now += 0.25
    pending[0].callback(7)
    assert b'"result"' in running.result  # type: ignore[attr-defined]
    snap = stats.snapshot()
    assert snap["in_flight"] == 0 and snap["uptime"] == 0.25
    assert snap["methods"] == {
        "_OTHER": {"calls": 1, "errors": 1, "p50_ms": 0.0, "p99_ms": 0.0},
        "add": {"calls": 2, "errors": 1, "p50_ms": 0.0, "p99_ms": 0.0},
        "fail": {"calls": 1, "errors": 1, "p50_ms": 0.0, "p99_ms": 0.0},
        "slow": {"calls": 1, "errors": 0, "p50_ms": 250.0, "p99_ms": 250.0}}
    assert snap["total"]["calls"] == 5 and snap["total"]["errors"] == 3
    assert snap["total"]["p99_ms"] == 250.0


def test_stats_keep_a_bounded_sample() -> None:
    """A method's durations are the last SAMPLES ones, however many calls it had."""
    stats = Stats(clock=FakeClock())
    for i in range(SAMPLES + 500):
        stats.record("m", float(i), True)
    snap = stats.snapshot()["methods"]["m"]
    assert snap["calls"] == SAMPLES + 500
    assert len(stats.methods["m"].durations) == SAMPLES
    assert snap["p50_ms"] == (500 + SAMPLES // 2 - 1) * 1000


@pytest_twisted.ensureDeferred
async def test_stats_through_the_broker() -> None:
    """__callme__.stats answers the instance, uptime and the calls made so far; methods
    the server lacks are counted as _OTHER, as the metrics label them."""
    sid = new_server_id()
    svc = await _serve(sid)
    proxy = track_proxy(txcallme.Proxy(timeout=5, reactor=reactor))
    try:
        for _ in range(3):
            assert await proxy.call(sid, "add", 1) == 3
        with pytest.raises(TypeError):
            await proxy.call(sid, "add")
        with pytest.raises(txcallme.UnknownMethod):
            await proxy.call(sid, "drop_tables")
        ping = await proxy.call(sid, "__callme__.ping")
        stats = await proxy.call(sid, "__callme__.stats")
        assert stats["instance"] == ping["instance"] and stats["server_id"] == sid
        assert stats["uptime"] > 0 and stats["in_flight"] == 0
        assert stats["methods"]["add"]["calls"] == 4
        assert stats["methods"]["add"]["errors"] == 1
        # unknown methods under the metrics' label value (observe.OTHER), not their names
        assert sorted(stats["methods"]) == ["_OTHER", "add"]
        assert stats["methods"]["_OTHER"]["calls"] == stats["methods"]["_OTHER"]["errors"] == 1
    finally:
        await proxy.close()
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_stats_report_the_thread_pool() -> None:
    """A threaded server's stats give its pool size and the threads busy in a blocking call."""
    sid = new_server_id()
    gate, entered = threading.Event(), threading.Event()

    def hold() -> str:
        entered.set()
        gate.wait(20)
        return "done"

    svc = txcallme.CallmeServerService(sid, amqp_host="127.0.0.1", threading=True, threads=3,
                                       reactor=reactor)
    svc.register_function(hold, name="hold")
    svc.startService()
    proxy = track_proxy(txcallme.Proxy(timeout=20, reactor=reactor))
    try:
        await svc.when_ready()
        held = proxy.call(sid, "hold")
        assert await twisted_threads.deferToThread(entered.wait, 10)
        stats = await proxy.call(sid, "__callme__.stats")
        assert stats["pool_threads"] == 3
        assert stats["pool_busy"] == 1
        assert stats["in_flight"] == 1
        gate.set()
        assert await held == "done"
    finally:
        gate.set()
        await proxy.close()
        await svc.stopService()
