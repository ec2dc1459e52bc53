"""Issue 9 scenario 9 on a broker node of the test's own: connection.blocked holds
publishes, a call times out saying so, and unblock delivers (the main broker is never
alarmed)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import pytest_twisted
from rabbitnode import RabbitNode
from twisted.internet import reactor, task, threads

from txcallme import CallmeServerService, Proxy
from txcallme.errors import RpcTimeout


async def _until(predicate: Callable[[], bool], limit: float) -> None:
    """Poll *predicate* every 0.2 s until true, for at most *limit* seconds."""
    waited = 0.0
    while not predicate():
        assert waited < limit, "condition not reached"
        await task.deferLater(reactor, 0.2, lambda: None)
        waited += 0.2


@pytest.mark.timeout(150)
@pytest_twisted.ensureDeferred
async def test_blocked_node_holds_publishes_until_unblocked() -> None:
    """A memory alarm blocks the Proxy: a call times out naming the block; unblock delivers."""
    node = RabbitNode()
    await threads.deferToThread(node.start)
    server = proxy = None
    try:
        server = CallmeServerService("blocked_node", amqp_url=node.url, threading=False)
        server.register_function(lambda a, b: a + b, "add")
        server.startService()
        await server.when_ready()
        proxy = Proxy(amqp_url=node.url, timeout=3)
        connection = await proxy.when_ready()
        assert await proxy.use_server("blocked_node").add(1, 2) == 3
        await threads.deferToThread(node.ctl, "set_vm_memory_high_watermark", "0.00001")
        # RabbitMQ blocks (and tells) a connection at its first publish after the alarm
        with pytest.raises(RpcTimeout, match="blocking publishes"):
            await proxy.use_server("blocked_node", timeout=20).add(2, 3)
        assert connection.blocked_reason is not None
        held = proxy.use_server("blocked_node", timeout=60).add(3, 4)
        await threads.deferToThread(node.ctl, "set_vm_memory_high_watermark", "0.4")
        await _until(lambda: connection.blocked_reason is None, 30)
        assert await held == 7
    finally:
        if proxy is not None:
            await proxy.close()
        if server is not None:
            await server.stopService()
        await threads.deferToThread(node.cleanup)
