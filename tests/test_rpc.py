"""Integration tests: Proxy and CallmeServerService against the real broker."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from conftest import Services, broker_connect, new_server_id, sleep
from twisted.internet import defer, reactor, task

import txcallme
from txcallme import _wire


def add(a: int, b: int) -> int:
    return a + b


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def slow_async(seconds: float) -> float:
    await sleep(seconds)
    return seconds


class MyError(Exception):
    """A user exception type raised by a remote handler."""


# --- calling -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_use_server_attribute_call(services: Services, sid: str) -> None:
    """proxy.use_server(sid).add(1, 1) fires with 2."""
    await services.start_server(sid, {"add": add})
    proxy = services.proxy()
    assert await proxy.use_server(sid).add(1, 1) == 2


@pytest_twisted.ensureDeferred
async def test_call_with_server_and_method(services: Services, sid: str) -> None:
    """proxy.call(sid, 'add', 1, 1) fires with 2."""
    await services.start_server(sid, {"add": add})
    proxy = services.proxy()
    assert await proxy.call(sid, "add", 1, 1) == 2


@pytest_twisted.ensureDeferred
async def test_keyword_arguments(services: Services, sid: str) -> None:
    """Keyword arguments reach the remote function by name."""
    await services.start_server(sid, {"sub": lambda a, b: a - b})
    proxy = services.proxy()
    assert await proxy.call(sid, "sub", b=1, a=10) == 9
    assert await proxy.use_server(sid).sub(10, b=3) == 7


@pytest_twisted.ensureDeferred
async def test_remote_kwargs_named_like_call_options(services: Services, sid: str) -> None:
    """Remote kwargs named server_id/method/timeout are passed through, not consumed."""

    def f(server_id: Any = None, method: Any = None, timeout: Any = None) -> list[Any]:
        return [server_id, method, timeout]

    await services.start_server(sid, {"f": f})
    proxy = services.proxy()
    assert await proxy.call(sid, "f", server_id=1, method=2) == [1, 2, None]
    assert await proxy.call(sid, "f", server_id=1, method=2, timeout=3) == [1, 2, 3]
    assert await proxy.use_server(sid).f(server_id="a", method="b", timeout="c") == [
        "a", "b", "c"]


@pytest_twisted.ensureDeferred
async def test_use_server_timeout_is_per_view(services: Services, sid: str) -> None:
    """use_server(sid, timeout=...) returns a new object and leaves proxy.timeout alone."""
    await services.start_server(sid, {"add": add})
    proxy = services.proxy()
    first = proxy.use_server(sid, timeout=1.5)
    second = proxy.use_server(sid, timeout=1.5)
    assert first is not second
    assert proxy.timeout == 5
    assert await first.add(2, 3) == 5
    assert proxy.timeout == 5


@pytest_twisted.ensureDeferred
async def test_dotted_names(services: Services, sid: str) -> None:
    """A function registered as 'math.add' is called as use_server(sid).math.add."""
    svc = services.server(sid)
    svc.register_function(add, name="math.add")
    await svc.when_ready()
    proxy = services.proxy()
    assert await proxy.use_server(sid).math.add(1, 2) == 3
    assert await proxy.call(sid, "math.add", 4, 5) == 9


@pytest_twisted.ensureDeferred
async def test_register_function_decorator_forms(services: Services, sid: str) -> None:
    """@register_function and @register_function(name=...) both expose the function."""
    svc = services.server(sid)

    @svc.register_function
    def double(x: int) -> int:
        return 2 * x

    @svc.register_function(name="x")
    def triple(x: int) -> int:
        return 3 * x

    assert double(2) == 4 and triple(2) == 6  # the decorators return the function
    await svc.when_ready()
    proxy = services.proxy()
    remote = proxy.use_server(sid)
    assert await remote.double(5) == 10
    assert await remote.x(5) == 15
    with pytest.raises(txcallme.UnknownMethod):
        await remote.triple(5)


@pytest_twisted.ensureDeferred
async def test_thousand_concurrent_calls(services: Services, sid: str) -> None:
    """1,000 calls in flight on one Proxy all get their own answer; none stay pending."""
    await services.start_server(sid, {"add": add})
    proxy = services.proxy()
    calls = [proxy.call(sid, "add", i, i) for i in range(1000)]
    assert proxy.pending_count == 1000
    results = await defer.gatherResults(calls, consumeErrors=True)
    assert results == [2 * i for i in range(1000)]
    assert proxy.pending_count == 0


@pytest_twisted.ensureDeferred
async def test_two_proxies_two_servers(services: Services) -> None:
    """Two Proxies calling two servers at once each get their own correct answers."""
    sid_a, sid_b = services_ids = (new_server_id(), new_server_id())
    await services.start_server(sid_a, {"who": lambda x: ["a", x]})
    await services.start_server(sid_b, {"who": lambda x: ["b", x]})
    p1, p2 = services.proxy(), services.proxy()
    calls = []
    expected = []
    for i in range(50):
        for proxy, tag in ((p1, 1), (p2, 2)):
            for server_id, name in zip(services_ids, "ab", strict=True):
                calls.append(proxy.call(server_id, "who", [tag, i]))
                expected.append([name, [tag, i]])
    assert await defer.gatherResults(calls, consumeErrors=True) == expected
    assert p1.pending_count == p2.pending_count == 0


# --- remote errors -------------------------------------------------------------------


def divide_by_zero() -> float:
    return 1 / 0


def lookup_missing() -> Any:
    return {}["nope"]


def bad_value() -> int:
    return int("not a number")


def bad_type() -> Any:
    return 1 + "1"  # type: ignore[operator]


def raise_my_error() -> None:
    raise MyError("custom failure", 42)


ERROR_FUNCS = {
    "divide_by_zero": divide_by_zero,
    "lookup_missing": lookup_missing,
    "bad_value": bad_value,
    "bad_type": bad_type,
    "raise_my_error": raise_my_error,
    "unserializable": lambda: object(),
    "add": add,
}


@pytest.mark.parametrize(
    "method, exc_type",
    [
        ("divide_by_zero", ZeroDivisionError),
        ("lookup_missing", KeyError),
        ("bad_value", ValueError),
        ("bad_type", TypeError),
    ],
)
@pytest_twisted.ensureDeferred
async def test_builtin_remote_errors(services: Services, sid: str, method: str,
                                     exc_type: type[Exception]) -> None:
    """A builtin exception raised remotely arrives as its type with remote_traceback."""
    await services.start_server(sid, ERROR_FUNCS)
    proxy = services.proxy()
    with pytest.raises(exc_type) as info:
        await proxy.call(sid, method)
    assert type(info.value) is exc_type
    assert method in info.value.remote_traceback  # type: ignore[attr-defined]
    assert await proxy.call(sid, "add", 1, 1) == 2


@pytest_twisted.ensureDeferred
async def test_user_exception_becomes_remote_error(services: Services, sid: str) -> None:
    """An unregistered user exception type arrives as RemoteError with its details."""
    await services.start_server(sid, ERROR_FUNCS)
    proxy = services.proxy()
    with pytest.raises(txcallme.RemoteError) as info:
        await proxy.call(sid, "raise_my_error")
    err = info.value
    assert err.type_name.endswith("MyError")
    assert err.type_name == f"{MyError.__module__}.MyError"
    assert err.message == str(MyError("custom failure", 42))
    assert err.remote_args == ("custom failure", 42)
    assert "raise_my_error" in err.remote_traceback
    assert await proxy.call(sid, "add", 1, 1) == 2


@pytest_twisted.ensureDeferred
async def test_registered_user_exception_is_rebuilt(services: Services, sid: str) -> None:
    """A user exception type registered with proxy.errors is rebuilt as itself."""
    await services.start_server(sid, ERROR_FUNCS)
    proxy = services.proxy()
    proxy.errors.register(MyError)
    with pytest.raises(MyError) as info:
        await proxy.call(sid, "raise_my_error")
    assert info.value.args == ("custom failure", 42)
    assert "raise_my_error" in info.value.remote_traceback  # type: ignore[attr-defined]
    assert await proxy.call(sid, "add", 1, 1) == 2


@pytest_twisted.ensureDeferred
async def test_unknown_method(services: Services, sid: str) -> None:
    """Calling a name the server does not have fails with UnknownMethod."""
    await services.start_server(sid, ERROR_FUNCS)
    proxy = services.proxy()
    with pytest.raises(txcallme.UnknownMethod, match="no_such_function"):
        await proxy.call(sid, "no_such_function", 1)
    assert await proxy.call(sid, "add", 1, 1) == 2


@pytest_twisted.ensureDeferred
async def test_wrong_arguments(services: Services, sid: str) -> None:
    """Calling with missing or extra arguments fails with a TypeError naming them."""
    await services.start_server(sid, ERROR_FUNCS)
    proxy = services.proxy()
    with pytest.raises(TypeError, match="'b'"):
        await proxy.call(sid, "add", 1)
    with pytest.raises(TypeError, match="'c'"):
        await proxy.call(sid, "add", 1, 2, c=3)
    assert await proxy.call(sid, "add", 1, 1) == 2


@pytest_twisted.ensureDeferred
async def test_unserializable_result(services: Services, sid: str) -> None:
    """A result the serializer cannot encode fails the call with SerializationError."""
    await services.start_server(sid, ERROR_FUNCS)
    proxy = services.proxy()
    with pytest.raises(txcallme.SerializationError, match="unserializable"):
        await proxy.call(sid, "unserializable")
    assert await proxy.call(sid, "add", 1, 1) == 2


# --- handlers ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_plain_handler_runs_on_reactor_thread(services: Services, sid: str) -> None:
    """With threading=False a plain function runs on the reactor (main) thread."""

    def where() -> bool:
        return threading.current_thread() is threading.main_thread()

    await services.start_server(sid, {"where": where}, threading=False)
    proxy = services.proxy()
    assert await proxy.call(sid, "where") is True


@pytest_twisted.ensureDeferred
async def test_coroutine_handler(services: Services, sid: str) -> None:
    """An async def handler is awaited and its return value is the result."""
    await services.start_server(sid, {"slow_async": slow_async})
    proxy = services.proxy()
    assert await proxy.call(sid, "slow_async", 0.05) == 0.05


@pytest_twisted.ensureDeferred
async def test_deferred_handler(services: Services, sid: str) -> None:
    """A handler returning a Deferred replies with the Deferred's result."""

    def later(x: int) -> Any:
        return task.deferLater(reactor, 0.05, lambda: x * 10)

    await services.start_server(sid, {"later": later})
    proxy = services.proxy()
    assert await proxy.call(sid, "later", 4) == 40


@pytest_twisted.ensureDeferred
async def test_threaded_handler_runs_off_main_thread(services: Services, sid: str) -> None:
    """With threading=True a blocking handler runs in a pool thread, not the main one."""

    def where() -> list[Any]:
        time.sleep(0.01)
        return [threading.current_thread() is threading.main_thread(),
                threading.current_thread().name]

    await services.start_server(sid, {"where": where}, threading=True)
    proxy = services.proxy()
    on_main, name = await proxy.call(sid, "where")
    assert on_main is False
    assert name != threading.main_thread().name


@pytest_twisted.ensureDeferred
async def test_threads_run_in_parallel_reactor_responsive(services: Services,
                                                          sid: str) -> None:
    """threads=8 runs 8 blocking 0.5 s calls together while the reactor keeps ticking."""
    await services.start_server(sid, {"slow": slow}, threading=True, threads=8)
    proxy = services.proxy()
    await proxy.call(sid, "slow", 0)  # warm up the connection and channels
    ticks = []
    loop = task.LoopingCall(lambda: ticks.append(time.monotonic()))
    loop.start(0.02, now=False)
    try:
        start = time.monotonic()
        results = await defer.gatherResults(
            [proxy.call(sid, "slow", 0.5) for _ in range(8)], consumeErrors=True)
        elapsed = time.monotonic() - start
    finally:
        loop.stop()
    assert results == [0.5] * 8
    # one after another they would take 4 s; the bound leaves room for a loaded machine
    assert elapsed < 3.0, f"8 parallel 0.5 s calls took {elapsed:.2f} s"
    assert len(ticks) >= 5, f"reactor ticked only {len(ticks)} times in {elapsed:.2f} s"


# --- timeouts, cancellation, unavailability ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_timeout_and_late_reply_dropped(services: Services, sid: str) -> None:
    """A call outliving its timeout fails with RpcTimeout; the late reply is dropped."""
    await services.start_server(sid, {"slow_async": slow_async, "add": add})
    proxy = services.proxy()
    start = time.monotonic()
    with pytest.raises(txcallme.RpcTimeout) as info:
        await proxy.use_server(sid, timeout=0.3).slow_async(4)
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 3.0, elapsed  # well before the handler's 4 s
    assert info.value.server_id == sid and info.value.method == "slow_async"
    assert proxy.pending_count == 0
    await sleep(4.0)  # the handler finishes and its reply arrives late
    assert proxy.pending_count == 0
    assert await proxy.call(sid, "add", 1, 1) == 2


@pytest_twisted.ensureDeferred
async def test_cancel_call(services: Services, sid: str) -> None:
    """Cancelling a call's Deferred fails it with CancelledError and forgets it."""
    await services.start_server(sid, {"slow_async": slow_async, "add": add})
    proxy = services.proxy()
    await proxy.when_ready()
    d = proxy.call(sid, "slow_async", 0.5)
    await sleep(0.1)
    assert proxy.pending_count == 1
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert proxy.pending_count == 0
    await sleep(0.6)  # the reply to the cancelled call arrives and is dropped
    assert proxy.pending_count == 0
    assert await proxy.call(sid, "add", 1, 1) == 2


@pytest_twisted.ensureDeferred
async def test_missing_server_fails_fast(services: Services, sid: str) -> None:
    """A call to an unserved id fails with ServerUnavailable at once; others succeed."""
    await services.start_server(sid, {"add": add})
    proxy = await services.ready_proxy(timeout=5)
    missing = new_server_id()
    start = time.monotonic()
    with pytest.raises(txcallme.ServerUnavailable) as info:
        await proxy.call(missing, "add", 1, 1)
    assert time.monotonic() - start < 4.0  # the call's timeout is 5 s
    assert info.value.server_id == missing

    calls = []
    for i in range(50):
        calls.append(proxy.call(sid, "add", i, 1))
        if i % 10 == 5:
            calls.append(proxy.call(missing, "add", i, 1))
    start = time.monotonic()
    results = await defer.DeferredList(calls, consumeErrors=True)
    assert time.monotonic() - start < 4.0
    good = [value for ok, value in results if ok]
    bad = [value for ok, value in results if not ok]
    assert good == [i + 1 for i in range(50)]
    assert len(bad) == 5
    for failure in bad:
        assert failure.check(txcallme.ServerUnavailable), failure
    assert proxy.pending_count == 0


@pytest_twisted.ensureDeferred
async def test_calls_before_connected_wait(services: Services, sid: str) -> None:
    """Calls made right after creating a Proxy wait for the connection, then succeed."""
    await services.start_server(sid, {"add": add})
    proxy = services.proxy()
    calls = [proxy.call(sid, "add", i, 1) for i in range(20)]
    assert await defer.gatherResults(calls, consumeErrors=True) == [
        i + 1 for i in range(20)]


@pytest_twisted.ensureDeferred
async def test_close_fails_pending_and_later_calls(services: Services, sid: str) -> None:
    """proxy.close() fails calls in flight and every later call with ProxyClosed."""
    await services.start_server(sid, {"slow_async": slow_async})
    proxy = await services.ready_proxy()
    pending = [proxy.call(sid, "slow_async", 0.5) for _ in range(3)]
    await sleep(0.05)
    await proxy.close()
    for d in pending:
        with pytest.raises(txcallme.ProxyClosed):
            await d
    assert proxy.pending_count == 0
    with pytest.raises(txcallme.ProxyClosed):
        await proxy.call(sid, "slow_async", 0)
    with pytest.raises(txcallme.ProxyClosed):
        await proxy.use_server(sid).slow_async(0)


@pytest_twisted.ensureDeferred
async def test_stop_service_finishes_in_flight_calls(services: Services, sid: str) -> None:
    """stopService lets running calls finish and reply, and fires only after them."""
    svc = await services.start_server(sid, {"slow": slow}, threading=True)
    proxy = await services.ready_proxy()
    order: list[str] = []
    calls = []
    for i in range(5):
        d = proxy.call(sid, "slow", 0.3)
        d.addCallback(lambda result, i=i: order.append(f"call{i}") or result)
        calls.append(d)
    await sleep(0.1)
    stopped = svc.stopService()
    stopped.addCallback(lambda _: order.append("stopped"))
    results = await defer.gatherResults(calls, consumeErrors=True)
    await stopped
    assert results == [0.3] * 5
    assert order[-1] == "stopped"
    assert sorted(order[:-1]) == [f"call{i}" for i in range(5)]


# --- the broker objects and the wire --------------------------------------------------------


async def _exists(conn: Any, kind: str, name: str) -> bool:
    ch = await conn.open_channel()
    try:
        if kind == "queue":
            await ch.declare_queue(name, passive=True)
        else:
            await ch.declare_exchange(name, passive=True)
    except txcallme.NotFound:
        return False
    await ch.close()
    return True


@pytest_twisted.ensureDeferred
async def test_server_queue_and_exchange_lifetime(services: Services, sid: str) -> None:
    """The server's queue/exchange exist while it runs and are gone after stopService."""
    svc = await services.start_server(sid, {"add": add})
    proxy = await services.ready_proxy()
    uid = proxy.queue.rsplit("_", 1)[1]
    assert proxy.queue == f"client_guest_queue_{uid}"
    assert proxy.exchange == f"client_guest_ex_{uid}"
    conn = await broker_connect()
    try:
        assert await _exists(conn, "exchange", f"server_{sid}_ex")
        assert await _exists(conn, "queue", f"server_{sid}_queue")
        assert await _exists(conn, "exchange", proxy.exchange)
        await svc.stopService()
        assert not await _exists(conn, "queue", f"server_{sid}_queue")
        assert not await _exists(conn, "exchange", f"server_{sid}_ex")
    finally:
        await conn.close()


@pytest_twisted.ensureDeferred
async def test_hand_published_request_gets_reply(services: Services, sid: str) -> None:
    """A request published by hand per the wire protocol gets a correct reply."""
    await services.start_server(sid, {"add": add})
    conn = await broker_connect()
    reply_name = f"t-manual-{sid}"
    try:
        ch = await conn.open_channel()
        await ch.declare_exchange(reply_name, "direct", auto_delete=True)
        await ch.declare_queue(reply_name, exclusive=True, auto_delete=True)
        await ch.bind_queue(reply_name, reply_name, reply_name)
        got: defer.Deferred[Any] = defer.Deferred()
        await ch.consume(reply_name, lambda delivery: got.callback(delivery) if not got.called
                         else None, no_ack=True)
        body = json.dumps({"method": "add", "args": [1, 2], "kwargs": {}}).encode()
        ch.publish(_wire.server_exchange(sid), sid, body,
                   {"reply_to": reply_name, "correlation_id": "x1",
                    "content_type": "application/json"})
        delivery = await got.addTimeout(5, reactor)
        assert json.loads(delivery.body) == {"result": 3}
        assert delivery.properties.get("correlation_id") == "x1"
        await ch.delete_exchange(reply_name)
    finally:
        await conn.close()
