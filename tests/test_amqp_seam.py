"""The connector seam: the real Proxy and the real server run over the scripted broker
given as ``ConnectionParams(connector=...)``, with no constructor change."""

from __future__ import annotations

from scripted import ScriptedBroker
from twisted.trial.unittest import SynchronousTestCase

from txcallme import CallmeServerService, Proxy
from txcallme.errors import ServerUnavailable


def add(a: int, b: int) -> int:
    return a + b


class SeamTests(SynchronousTestCase):
    """Proxy(params=...) and CallmeServerService(params=...) over an in-memory broker."""

    def setUp(self) -> None:
        self.broker = ScriptedBroker()
        self.server = CallmeServerService("seam", params=self.broker.params(),
                                          reactor=self.broker.clock, threading=False)
        self.server.register_function(add, "add")
        self.server.startService()
        self.broker.run(self.server.when_ready())
        self.proxy = Proxy(params=self.broker.params(), reactor=self.broker.clock)

    def tearDown(self) -> None:
        self.broker.run(self.proxy.close())
        self.broker.run(self.server.stopService())

    def test_call(self) -> None:
        """A call goes through the scripted broker to the server and back."""
        self.assertEqual(self.broker.run(self.proxy.use_server("seam").add(2, 3)), 5)
        [server_peer, proxy_peer] = self.broker.peers
        self.assertEqual(len(proxy_peer.published), 1)
        self.assertEqual(len(server_peer.published), 1)  # the reply
        self.assertEqual(len(server_peer.client_acks), 1)  # the request, acked

    def test_unknown_server(self) -> None:
        """A call to a server id nothing consumes fails with ServerUnavailable."""
        d = self.proxy.use_server("nobody").add(1, 2)
        self.broker.advance(10)
        self.failureResultOf(d, ServerUnavailable)
