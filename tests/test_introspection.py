"""Reserved introspection calls, and several broker addresses tried in turn."""

from __future__ import annotations

import pytest
import pytest_twisted
from conftest import new_server_id, track_proxy
from twisted.internet import reactor

import txcallme


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
