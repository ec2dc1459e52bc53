"""The real Proxy (and server) over txcallme.amqp.memory's in-memory broker on
a Clock: what each broker event does to the calls in flight, deterministically."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txcallme import CallmeServerService, Proxy
from txcallme.amqp import Session
from txcallme.amqp.memory import MemoryBroker
from txcallme.errors import (
    BrokerConnectionLost,
    ServerUnavailable,
)


class MemoryEndpoint:
    """The broker's endpoint, with the address a Session logs."""

    last_address = ("memory", 5672)

    def __init__(self, broker: MemoryBroker) -> None:
        self._endpoint = broker.endpoint()

    def connect(self, factory: Any) -> Any:
        return self._endpoint.connect(factory)


class Rig:
    """A Clock, an in-memory broker, and Proxies/servers connected to it."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker(self.clock)
        self.servers: list[CallmeServerService] = []

    def proxy(self, **kw: Any) -> Proxy:
        broker = self.broker

        class MemoryProxy(Proxy):
            def _make_session(self, reactor: Any, max_body_size: int) -> Session:
                session = super()._make_session(reactor, max_body_size)
                session._endpoint = MemoryEndpoint(broker)  # type: ignore[assignment]
                return session

        kw.setdefault("timeout", 30)
        proxy = MemoryProxy(reactor=self.clock, **kw)
        self.settle()
        return proxy

    def server(self, server_id: str, funcs: dict[str, Any], **kw: Any) -> CallmeServerService:
        svc = CallmeServerService(server_id, reactor=self.clock, **kw)
        svc._session._endpoint = MemoryEndpoint(self.broker)  # type: ignore[assignment]
        for name, func in funcs.items():
            svc.register_function(func, name=name, blocking=False)
        svc.startService()
        self.servers.append(svc)
        self.settle()
        return svc

    def later(self, seconds: float, value: Any) -> Deferred[Any]:
        """A Deferred firing with *value* after *seconds* on the rig's clock."""
        d: Deferred[Any] = Deferred()
        self.clock.callLater(seconds, d.callback, value)
        return d

    def settle(self, seconds: float = 0.0) -> None:
        """Run the clock by *seconds* in small steps (zero-delay calls included)."""
        self.clock.advance(0)
        steps = int(seconds / 0.05)
        for _ in range(steps):
            self.clock.advance(0.05)
        self.clock.advance(0)


class Outcome:
    """Every result a Deferred fired with (to check it fired exactly once)."""

    def __init__(self, d: Deferred[Any]) -> None:
        self.results: list[Any] = []
        d.addBoth(self.results.append)

    @property
    def value(self) -> Any:
        assert len(self.results) == 1, self.results
        result = self.results[0]
        return result.value if hasattr(result, "value") and hasattr(result, "check") else result


def slow(rig: Rig) -> Any:
    return lambda seconds, value: rig.later(seconds, value)


class ServerEventTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = Rig()

    def test_taken_requests_survive_a_404_on_the_same_destination(self) -> None:
        """A later call to a vanished server fails alone: the calls whose requests
        the broker took keep waiting and get their replies."""
        rig = self.rig
        svc = rig.server("s1", {"slow": slow(rig)})
        proxy = rig.proxy()
        calls = [Outcome(proxy.call("s1", "slow", 5, i)) for i in range(4)]
        rig.settle(0.1)
        # the operator deletes the server's exchange: a new call gets 404
        rig.broker.delete_exchange("server_s1_ex")
        late = Outcome(proxy.call("s1", "slow", 0, "x"))
        rig.settle(0.1)
        self.assertIsInstance(late.value, ServerUnavailable)
        rig.settle(6)
        self.assertEqual([c.value for c in calls], [0, 1, 2, 3])
        self.assertEqual(proxy.pending_count, 0)
        del svc

    def test_returned_request_fails_only_its_call(self) -> None:
        """A request that comes back unroutable fails its own call with ServerUnavailable."""
        rig = self.rig
        rig.server("s1", {"slow": slow(rig)})
        proxy = rig.proxy()
        running = Outcome(proxy.call("s1", "slow", 2, "a"))
        rig.settle(0.1)
        unbound = Outcome(proxy.call("nobody", "slow", 0, "b"))
        rig.settle(0.1)
        self.assertIsInstance(unbound.value, ServerUnavailable)
        self.assertEqual(running.results, [])
        rig.settle(3)
        self.assertEqual(running.value, "a")

    def test_nacked_request_fails_with_server_unavailable(self) -> None:
        """A request the broker nacks fails its call with ServerUnavailable; the next works."""
        rig = self.rig
        rig.server("s1", {"slow": slow(rig)})
        proxy = rig.proxy()
        rig.broker.nack_next()
        nacked = Outcome(proxy.call("s1", "slow", 0, "a"))
        rig.settle(0.1)
        self.assertIsInstance(nacked.value, ServerUnavailable)
        self.assertIn("nack", str(nacked.value))
        ok = Outcome(proxy.call("s1", "slow", 0, "b"))
        rig.settle(0.1)
        self.assertEqual(ok.value, "b")

    def test_proxy_connection_lost_fails_published_calls(self) -> None:
        """The Proxy's own connection dropping fails the calls whose requests were out."""
        rig = self.rig
        rig.server("s1", {"slow": slow(rig)})
        proxy = rig.proxy()
        call = Outcome(proxy.call("s1", "slow", 5, "a"))
        rig.settle(0.1)
        proxy._session.connection.protocol.transport.loseConnection()  # type: ignore[union-attr]
        rig.settle(0.1)
        self.assertIsInstance(call.value, BrokerConnectionLost)
