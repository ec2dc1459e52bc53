"""The server answers Proxies that take replies through RabbitMQ's Direct Reply-to
(reply_to ``amq.rabbitmq.reply-to.*``: the default exchange, routing key = reply_to)."""

from __future__ import annotations

import pytest
import pytest_twisted
from conftest import Services
from twisted.internet.defer import gatherResults

import txcallme


def bad(x: int) -> int:
    """Raise ValueError with *x* in the message."""
    raise ValueError(f"bad {x}")


@pytest_twisted.ensureDeferred
async def test_direct_reply_to_results(services: Services, sid: str) -> None:
    """A real server answers a Proxy(direct_reply_to=True) with results."""
    await services.start_server(sid, {"add": lambda a, b: a + b})
    proxy = await services.ready_proxy(direct_reply_to=True, timeout=10)
    assert await proxy.call(sid, "add", 2, 3) == 5


@pytest_twisted.ensureDeferred
async def test_direct_reply_to_remote_errors(services: Services, sid: str) -> None:
    """A handler's exception reaches a Direct Reply-to caller as that exception."""
    await services.start_server(sid, {"bad": bad})
    proxy = await services.ready_proxy(direct_reply_to=True, timeout=10)
    with pytest.raises(ValueError, match="bad 7"):
        await proxy.call(sid, "bad", 7)
    with pytest.raises(txcallme.UnknownMethod):
        await proxy.call(sid, "missing")


@pytest_twisted.ensureDeferred
async def test_direct_reply_to_many_in_flight(services: Services, sid: str) -> None:
    """200 concurrent Direct Reply-to calls, threaded server, each get their own result."""
    await services.start_server(sid, {"double": lambda x: 2 * x}, threading=True, threads=4)
    proxy = await services.ready_proxy(direct_reply_to=True, timeout=20)
    results = await gatherResults([proxy.call(sid, "double", i) for i in range(200)])
    assert results == [2 * i for i in range(200)]
