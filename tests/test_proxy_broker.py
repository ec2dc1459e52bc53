"""Integration tests of the Proxy against broker events on the local RabbitMQ
(issue 9 scenarios on the caller side): only the test's own connections,
queues and exchanges are touched."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from _brokerctl import ctl, rand
from conftest import Services, broker_connect, new_server_id, sleep
from twisted.internet import defer, threads

import txcallme
import txcallme.proxy


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def add(a: int, b: int) -> int:
    return a + b


def connection_pid(owner: Any) -> str:
    """The broker's pid of *owner*'s current connection, found by its local port."""
    connection = owner._session.connection
    assert connection is not None, "not connected"
    port = connection.protocol.transport.getHost().port
    out = ctl("list_connections", "pid", "peer_port")
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1] == str(port):
            return fields[0]
    raise AssertionError(f"no broker connection from port {port}: {out!r}")


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll *predicate* every 0.1 s; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.1)


@pytest_twisted.ensureDeferred
async def test_server_connection_closed_calls_answered_once(services: Services,
                                                            sid: str) -> None:
    """16 calls in flight survive `rabbitmqctl close_connection` of the server's
    connection: each is answered exactly once, none fails with ServerUnavailable."""
    svc = await services.start_server(sid, {"slow": slow, "add": add}, threading=True, threads=16)
    proxy = await services.ready_proxy(timeout=60)
    outcomes: list[list[Any]] = [[] for _ in range(16)]
    calls = []
    for i in range(16):
        d = proxy.call(sid, "slow", 4)
        d.addBoth(outcomes[i].append)
        calls.append(d)
    await sleep(1.0)  # every request delivered and running
    old = svc._session.connection
    ctl("close_connection", connection_pid(svc), "txcallme test: close the server")
    # calls made while the server is away may fail with ServerUnavailable (their own
    # requests are refused), and must not take the 16 delivered ones with them
    probes = []
    while svc._session.connection in (None, old):
        probes.append(proxy.call(sid, "add", 1, 1))
        await sleep(0.05)
    await defer.DeferredList(calls)
    for ok, value in await defer.DeferredList(probes, consumeErrors=True):
        assert ok and value == 2 or value.check(txcallme.ServerUnavailable), value
    assert [len(o) for o in outcomes] == [1] * 16
    assert [o[0] for o in outcomes] == [4] * 16, outcomes
    assert proxy.pending_count == 0
    assert await proxy.call(sid, "add", 1, 1) == 2


async def slow_async(seconds: float) -> float:
    await sleep(seconds)
    return seconds


@pytest_twisted.ensureDeferred
async def test_reply_queue_deleted_fails_at_once_and_recovers(services: Services,
                                                              sid: str) -> None:
    """Deleting the Proxy's reply queue fails the calls in flight at once with a clear
    error (not a timeout); a new reply queue serves the next calls."""
    await services.start_server(sid, {"slow_async": slow_async, "add": add})
    proxy = await services.ready_proxy(timeout=60)
    old = proxy.queue
    calls = [proxy.call(sid, "slow_async", 3) for _ in range(4)]
    await sleep(0.5)
    start = time.monotonic()
    ctl("delete_queue", old)
    for ok, value in await defer.DeferredList(calls, consumeErrors=True):
        assert not ok and value.check(txcallme.BrokerConnectionLost), value
        assert f"reply queue {old}" in str(value.value)
    assert time.monotonic() - start < 20  # the broker's cancel, not the 60 s timeout
    assert await proxy.call(sid, "add", 1, 1) == 2
    assert proxy.queue != old
    assert old not in ctl("list_queues", "name").split()
    # the server still ran the 4 calls; their replies reach nothing (the reply
    # exchange went with its queue) and the server acks the requests anyway: none
    # is requeued or left unacknowledged on its queue
    queue = f"server_{sid}_queue"

    def counts() -> tuple[str, str] | None:
        for line in ctl("list_queues", "name", "messages_ready",
                        "messages_unacknowledged").splitlines():
            fields = line.split()
            if fields[:1] == [queue]:
                return fields[1], fields[2]
        return None

    deadline = time.monotonic() + 30
    left = await threads.deferToThread(counts)
    while left != ("0", "0"):
        assert time.monotonic() < deadline, f"{queue}: ready, unacknowledged = {left}"
        await sleep(0.5)
        left = await threads.deferToThread(counts)


@pytest_twisted.ensureDeferred
async def test_proxy_reconnects_with_fresh_reply_names(services: Services, sid: str) -> None:
    """After its connection is closed the Proxy declares new reply names (no 405
    RESOURCE_LOCKED on the old exclusive queue) and calls work again."""
    await services.start_server(sid, {"add": add})
    proxy = await services.ready_proxy(timeout=30)
    old = (proxy.exchange, proxy.queue)
    before = proxy._session.connection
    ctl("close_connection", connection_pid(proxy), "txcallme test: close the proxy")
    await wait_for(lambda: proxy._session.connection not in (None, before), 30,
                   "the proxy's reconnection")
    assert (proxy.exchange, proxy.queue) != old
    assert proxy.exchange.startswith("client_guest_ex_")
    assert await proxy.call(sid, "add", 2, 3) == 5


@pytest_twisted.ensureDeferred
async def test_connection_closed_again_during_republish_grace(
        services: Services, sid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9 scenario 4: after `rabbitmqctl close_connection` of the Proxy's
    connection a call to a server not back yet waits for its re-publish (grace
    period); the connection is closed again meanwhile; the call goes out on the
    next connection and is answered once the server starts (not a timeout).

    The re-publish delay is raised for the second close, so that the call is
    known to be waiting (not in flight) while rabbitmqctl closes the connection."""
    proxy = await services.ready_proxy(timeout=60)
    first = proxy._session.connection
    ctl("close_connection", connection_pid(proxy), "txcallme test: close the proxy")
    await wait_for(lambda: proxy._live is not None and proxy._session.connection
                   not in (None, first), 30, "the proxy's first reconnection")
    second = proxy._session.connection
    pid = connection_pid(proxy)  # (rabbitmqctl blocks the reactor: before the call)
    monkeypatch.setattr(txcallme.proxy, "RECONNECT_GRACE", 120.0)
    monkeypatch.setattr(txcallme.proxy, "RETRY_DELAY", 30.0)
    call = proxy.call(sid, "add", 2, 3)
    outcome: list[Any] = []
    call.addBoth(outcome.append)
    await wait_for(lambda: bool(proxy._retry) or bool(outcome), 10,
                   "the call's request to come back (no server yet)")
    assert outcome == [] and len(proxy._retry) == 1  # waiting for its re-publish
    ctl("close_connection", pid, "txcallme test: close the proxy again")
    monkeypatch.setattr(txcallme.proxy, "RETRY_DELAY", 0.25)
    await wait_for(lambda: proxy._live is not None and proxy._session.connection
                   not in (None, first, second), 30, "the proxy's second reconnection")
    await sleep(0.5)
    assert outcome == []  # published again on the new connection, still no server
    await services.start_server(sid, {"add": add})
    start = time.monotonic()
    await wait_for(lambda: bool(outcome), 30, "the call's answer")
    assert outcome == [5], outcome
    assert time.monotonic() - start < 20


@pytest_twisted.ensureDeferred
async def test_durable_server_queue_without_consumer_fails_fast(services: Services,
                                                                sid: str) -> None:
    """A stopped durable server: the call the broker took waits and is run once a
    server consumes again; after a confirmed count of 0, new calls fail fast unsent."""
    svc = await services.start_server(sid, {"add": add}, durable=True)
    proxy = await services.ready_proxy(timeout=30)
    try:
        assert await proxy.call(sid, "add", 1, 1) == 2
        await svc.stopService()
        await sleep(1.2)  # past the last check's second
        waiting = proxy.invoke(sid, "add", [2, 2], timeout=60)  # taken: must wait
        confirmed = time.monotonic()
        while proxy._checks[sid].empty_at is None:  # counted 0 twice, a second apart
            assert time.monotonic() - confirmed < 10, "no confirmed count of 0"
            await sleep(0.05)
        assert not waiting.called
        start = time.monotonic()
        for _ in range(3):
            try:
                await proxy.call(sid, "add", 1, 2)
            except txcallme.ServerUnavailable as e:
                assert "no server consumes its queue" in str(e)
            else:
                raise AssertionError("a call to a stopped durable server was answered")
        assert time.monotonic() - start < 10
        assert not waiting.called
        await services.start_server(sid, {"add": add}, durable=True)
        assert await waiting == 4  # the taken request ran once a server consumed
    finally:
        conn = await broker_connect()
        try:
            ch = await conn.open_channel()
            await ch.delete_queue(f"server_{sid}_queue")
            await ch.delete_exchange(f"server_{sid}_ex")
        finally:
            await conn.close()


@pytest_twisted.ensureDeferred
async def test_reply_exchange_deleted_recovers(services: Services, sid: str) -> None:
    """Deleting the Proxy's reply exchange is noticed within seconds: calls whose
    replies are lost fail with a clear error (not a 60 s timeout), later calls work."""
    await services.start_server(sid, {"slow_async": slow_async, "add": add})
    proxy = await services.ready_proxy(timeout=60)
    old = proxy.exchange
    conn = await broker_connect()
    try:
        ch = await conn.open_channel()
        await ch.delete_exchange(old)
    finally:
        await conn.close()
    start = time.monotonic()
    lost = 0
    while proxy.exchange == old:
        assert time.monotonic() - start < 20, "the deleted reply exchange went unnoticed"
        try:
            await proxy.call(sid, "slow_async", 0.5)
        except txcallme.BrokerConnectionLost as e:
            assert f"its exchange {old} was deleted" in str(e)
            lost += 1
    assert lost >= 1
    assert await proxy.call(sid, "add", 1, 1) == 2


@pytest_twisted.ensureDeferred
async def test_direct_reply_to(services: Services, sid: str) -> None:
    """With direct_reply_to=True the Proxy declares no reply objects, sends
    reply_to=amq.rabbitmq.reply-to, and gets replies published to the default
    exchange (by a hand-made server here)."""
    conn = await broker_connect()
    seen: list[Any] = []
    try:
        ch = await conn.open_channel()
        await ch.declare_exchange(f"server_{sid}_ex", "direct", auto_delete=True)
        await ch.declare_queue(f"server_{sid}_queue", durable=True, auto_delete=True)
        await ch.bind_queue(f"server_{sid}_queue", f"server_{sid}_ex", sid)

        def answer(delivery: Any) -> None:
            request = json.loads(delivery.body)
            seen.append(delivery.properties.get("reply_to"))
            ch.publish("", delivery.properties["reply_to"],
                       json.dumps({"result": sum(request["args"])}).encode(),
                       {"correlation_id": delivery.properties["correlation_id"],
                        "content_type": "application/json"})

        await ch.consume(f"server_{sid}_queue", answer, no_ack=True)
        before = set(ctl("list_queues", "name").split())
        proxy = await services.ready_proxy(direct_reply_to=True, timeout=10)
        assert (proxy.exchange, proxy.queue) == ("", "")
        results = await defer.gatherResults([proxy.call(sid, "add", i, 1) for i in range(20)])
        assert results == [i + 1 for i in range(20)]
        assert all(r.startswith("amq.rabbitmq.reply-to.") for r in seen), seen[:2]
        assert not {q for q in set(ctl("list_queues", "name").split()) - before
                    if q.startswith("client_")}
        assert proxy.pending_count == 0
    finally:
        await conn.close()


def readme_direct_reply_grant() -> tuple[str, str, str]:
    """The client's (olivia's) permissions for Direct Reply-to, as README gives them."""
    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    for line in readme.splitlines():
        words = shlex.split(line.strip()) if "set_permissions" in line else []
        if words[4:5] == ["olivia"] and words[5] == "^$":
            return words[5], words[6], words[7]
    raise AssertionError("README gives no Direct Reply-to grant for the client")


@pytest_twisted.ensureDeferred
async def test_direct_reply_to_with_readme_permissions(services: Services, sid: str) -> None:
    """A client user with only README's Direct Reply-to grant (no configure, no read)
    calls a server through Direct Reply-to."""
    configure, write, read = readme_direct_reply_grant()
    user = f"t-direct-{rand()}"
    ctl("add_user", user, "pw")
    try:
        ctl("set_permissions", "-p", "/", user, configure, write.replace("fooserver", sid),
            read)
        conn = await broker_connect()
        try:
            ch = await conn.open_channel()
            await ch.declare_exchange(f"server_{sid}_ex", "direct", auto_delete=True)
            await ch.declare_queue(f"server_{sid}_queue", durable=True, auto_delete=True)
            await ch.bind_queue(f"server_{sid}_queue", f"server_{sid}_ex", sid)
            await ch.consume(f"server_{sid}_queue", lambda d: ch.publish(
                "", d.properties["reply_to"], b'{"result": 42}',
                {"correlation_id": d.properties["correlation_id"],
                 "content_type": "application/json"}), no_ack=True)
            proxy = await services.ready_proxy(amqp_user=user, amqp_password="pw",
                                               direct_reply_to=True, timeout=10)
            assert await proxy.call(sid, "anything") == 42
            with pytest.raises(txcallme.AccessRefused):  # and nothing else
                await proxy.call(new_server_id(), "anything")
        finally:
            await conn.close()
    finally:
        ctl("delete_user", user)


@pytest_twisted.ensureDeferred
async def test_direct_reply_to_channel_closed_fails_its_calls(services: Services,
                                                              sid: str) -> None:
    """With Direct Reply-to, a request channel closed by a 404 fails the calls whose
    replies were due on it with BrokerConnectionLost at once (at-most-once)."""
    conn = await broker_connect()
    try:
        ch = await conn.open_channel()
        await ch.declare_exchange(f"server_{sid}_ex", "direct", auto_delete=False)
        await ch.declare_queue(f"server_{sid}_queue", durable=True, auto_delete=True)
        await ch.bind_queue(f"server_{sid}_queue", f"server_{sid}_ex", sid)
        await ch.consume(f"server_{sid}_queue", lambda d: None, no_ack=True)  # never answers
        proxy = await services.ready_proxy(direct_reply_to=True, timeout=30)
        waiting = [proxy.call(sid, "f") for _ in range(3)]
        await sleep(0.5)  # taken by the broker
        await ch.delete_exchange(f"server_{sid}_ex")
        start = time.monotonic()
        with pytest.raises(txcallme.ServerUnavailable):
            await proxy.call(sid, "f")  # its own request: 404
        for ok, value in await defer.DeferredList(waiting, consumeErrors=True):
            assert not ok and value.check(txcallme.BrokerConnectionLost), value
            assert "Direct Reply-to" in str(value.value)
        assert time.monotonic() - start < 10
        await ch.delete_queue(f"server_{sid}_queue")
    finally:
        await conn.close()
