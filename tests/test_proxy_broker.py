"""Integration tests of the Proxy against broker events on the local RabbitMQ
(issue 9 scenarios on the caller side): only the test's own connections,
queues and exchanges are touched."""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted
from _brokerctl import ctl
from conftest import Services, sleep
from twisted.internet import defer

import txcallme


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
