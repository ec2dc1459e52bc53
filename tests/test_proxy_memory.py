"""The real Proxy (and server) over txcallme.amqp.memory's in-memory broker on
a Clock: what each broker event does to the calls in flight, deterministically."""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from txcallme import CallmeServerService, Proxy
from txcallme.amqp import connection_params
from txcallme.amqp.memory import MemoryBroker
from txcallme.errors import (
    BrokerConnectionLost,
    BrokerUnreachable,
    PayloadTooLarge,
    ProxyClosed,
    RpcTimeout,
    ServerUnavailable,
)


class MemoryEndpoint:
    """The broker's endpoint, with the address a Session logs."""

    #: while True, connection attempts are refused (the broker is away)
    down = False

    def __init__(self, broker: MemoryBroker) -> None:
        self._endpoint = broker.endpoint()

    def connect(self, factory: Any) -> Any:
        if self.down:
            return fail(BrokerUnreachable("memory", 5672, "down for the test"))
        return self._endpoint.connect(factory)


class Rig:
    """A Clock, an in-memory broker, and Proxies/servers connected to it."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker(self.clock)
        self.servers: list[CallmeServerService] = []
        self.endpoints: list[MemoryEndpoint] = []

    def params(self, endpoint: Any = None) -> Any:
        """Connection params that reach the in-memory broker (through *endpoint*)."""
        endpoint = endpoint or MemoryEndpoint(self.broker)
        self.endpoints.append(endpoint)
        return attrs.evolve(connection_params("memory"), connector=lambda reactor: endpoint)

    def proxy(self, endpoint: Any = None, **kw: Any) -> Proxy:
        kw.setdefault("timeout", 30)
        proxy = Proxy(reactor=self.clock, params=self.params(endpoint), **kw)
        self.settle()
        return proxy

    def server(self, server_id: str, funcs: dict[str, Any], **kw: Any) -> CallmeServerService:
        svc = CallmeServerService(server_id, reactor=self.clock, params=self.params(), **kw)
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


class HeldEndpoint(MemoryEndpoint):
    """Connects only when :meth:`release` is called (a slow broker)."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.gate: Deferred[None] = Deferred()

    def connect(self, factory: Any) -> Any:
        d = Deferred()
        self.gate.addCallback(lambda _: self._endpoint.connect(factory).chainDeferred(d))
        return d

    def release(self) -> None:
        self.gate.callback(None)


def requests_in(rig: Rig, server_id: str) -> int:
    """Requests waiting in *server_id*'s queue on the in-memory broker."""
    queue = rig.broker.queues.get(f"server_{server_id}_queue")
    return 0 if queue is None else len(queue.messages)


def queued_args(rig: Rig, server_id: str) -> list[Any]:
    """The args of each request waiting in *server_id*'s queue, oldest first."""
    queue = rig.broker.queues[f"server_{server_id}_queue"]
    return [json.loads(m.body)["args"] for m in queue.messages]


def hold_channel_opens(connection: Any) -> Any:
    """Make *connection*'s channel opens wait (a slow broker) until the returned
    function is called; the opens then go ahead."""
    gate: Deferred[None] = Deferred()
    real_open = connection.open_channel

    def held_open() -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        gate.addCallback(lambda _: real_open().chainDeferred(d))
        return d

    connection.open_channel = held_open
    return lambda: gate.callback(None)


class ReplyQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = Rig()

    def test_deleted_reply_queue_fails_calls_at_once_and_recovers(self) -> None:
        """basic.cancel of the reply queue fails the calls in flight at once (not a
        timeout), a new reply queue is declared with a new name, new calls work."""
        rig = self.rig
        rig.server("s1", {"slow": slow(rig)})
        proxy = rig.proxy()
        old_queue, old_exchange = proxy.queue, proxy.exchange
        names: list[tuple[str, str]] = []
        proxy.on_reply_names.append(lambda e, q: names.append((e, q)))
        calls = [Outcome(proxy.call("s1", "slow", 5, i)) for i in range(3)]
        rig.settle(0.1)
        rig.broker.delete_queue(old_queue)
        rig.settle(0)
        for call in calls:
            self.assertIsInstance(call.value, BrokerConnectionLost)
            self.assertIn(f"reply queue {old_queue}", str(call.value))
        during = Outcome(proxy.call("s1", "slow", 0, "during"))  # waits for the new queue
        rig.settle(1.0)
        self.assertEqual(names, [(proxy.exchange, proxy.queue)])
        self.assertNotEqual(proxy.queue, old_queue)
        self.assertNotIn(old_exchange, rig.broker.exchanges)
        self.assertIn(proxy.queue, rig.broker.queues)
        self.assertEqual(during.value, "during")
        after = Outcome(proxy.call("s1", "slow", 0, "after"))
        rig.settle(0.1)
        self.assertEqual(after.value, "after")
        rig.settle(6)  # the replies to the failed calls arrive at the old name: dropped
        self.assertEqual(proxy.pending_count, 0)
        self.assertEqual([len(c.results) for c in calls], [1, 1, 1])

    def test_deleted_reply_exchange_is_noticed_and_recreated(self) -> None:
        """Deleting the reply exchange (no notice to the consumer) is found by a passive
        declare within seconds: calls out fail with a clear error before their timeout,
        new reply names are declared, later calls work."""
        rig = self.rig
        rig.server("s1", {"slow": slow(rig)})
        proxy = rig.proxy(timeout=30)
        warm = Outcome(proxy.call("s1", "slow", 0, "warm"))
        rig.settle(0.1)
        self.assertEqual(warm.value, "warm")
        old_exchange, old_queue = proxy.exchange, proxy.queue
        rig.broker.delete_exchange(old_exchange)
        calls = []
        for i in range(5):  # a call every second; their replies have nowhere to go
            calls.append(Outcome(proxy.call("s1", "slow", 0.5, i)))
            rig.settle(1.0)
        rig.settle(1.0)
        values = [c.value for c in calls]  # all fired long before the 30 s timeout
        lost = [v for v in values if isinstance(v, BrokerConnectionLost)]
        self.assertTrue(lost)
        for value in lost:
            self.assertIn(f"its exchange {old_exchange} was deleted", str(value))
        self.assertEqual(values[len(lost):], list(range(len(lost), 5)))  # answered after
        self.assertNotEqual(proxy.exchange, old_exchange)
        self.assertNotIn(old_queue, rig.broker.queues)
        rig.settle(1.0)
        after = Outcome(proxy.call("s1", "slow", 0, "after"))
        rig.settle(0.1)
        self.assertEqual(after.value, "after")

    def test_fresh_reply_names_per_connection(self) -> None:
        """Each connection declares reply names of its own; the old ones are gone."""
        rig = self.rig
        rig.server("s1", {"slow": slow(rig)})
        proxy = rig.proxy()
        first = (proxy.exchange, proxy.queue)
        rig.broker.drop_connections()
        rig.settle(2)
        second = (proxy.exchange, proxy.queue)
        self.assertNotEqual(first, second)
        self.assertNotIn(first[1], rig.broker.queues)
        self.assertIn(second[1], rig.broker.queues)
        call = Outcome(proxy.call("s1", "slow", 0, "x"))
        rig.settle(0.1)
        self.assertEqual(call.value, "x")

    def test_reconnection_during_republish_grace_publishes_again(self) -> None:
        """A call waiting for its re-publish after a reconnection is published on the
        next connection when the connection drops again, and is answered."""
        rig = self.rig
        proxy = rig.proxy()
        rig.broker.drop_connections()
        rig.settle(2)  # reconnected: the grace period runs; no server yet
        call = Outcome(proxy.call("s1", "slow", 0, "x"))
        rig.settle(0.01)  # returned: waits for its re-publish
        self.assertEqual(call.results, [])
        rig.endpoints[0].down = True  # the re-publish timer fires while disconnected
        rig.broker.drop_connections()
        rig.settle(1)
        self.assertEqual(call.results, [])
        rig.endpoints[0].down = False
        rig.server("s1", {"slow": slow(rig)})
        rig.settle(12)
        self.assertEqual(call.value, "x")


class CallLifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = Rig()

    def test_correlation_ids_have_96_random_bits(self) -> None:
        """Correlation ids are 24 hex digits, 96 random bits each: not a counter, nor a
        short random part padded to 96 bits."""
        rig = self.rig
        seen: list[str] = []

        def corr(context: Any) -> str:
            seen.append(context.correlation_id)
            return "ok"

        svc = CallmeServerService("s1", reactor=rig.clock, params=rig.params())
        svc.register_function(corr, name="corr", with_context=True, blocking=False)
        svc.startService()
        proxy = rig.proxy()
        for _ in range(50):
            proxy.call("s1", "corr")
        rig.settle(0.1)
        self.assertEqual(len(seen), 50)
        self.assertEqual(len(set(seen)), 50)
        for value in seen:
            self.assertEqual(len(value), 24)
            int(value, 16)
        self.assertNotIn("1", seen)
        ids = [int(value, 16) for value in seen]
        # not a counter (however formatted): consecutive ids differ in about half of
        # their 96 bits (Binomial(96, 1/2): below 20 has odds of about 3e-9 a pair)
        distances = [bin(a ^ b).count("1") for a, b in pairwise(ids)]
        self.assertGreaterEqual(min(distances), 20, distances)
        # and all 96 bits are random: each takes both values across 50 ids
        # (a fixed bit has odds of 2**-49)
        varying = 0
        for a in ids:
            varying |= a ^ ids[0]
        self.assertEqual(varying, 2**96 - 1, f"{varying:096b}")

    def test_retry_on_timeout_keeps_the_timer_at_the_earliest_deadline(self) -> None:
        """An errback that calls again on RpcTimeout (while the timer runs) does not
        delay the other calls' timeouts."""
        rig = self.rig
        proxy = rig.proxy()
        rig.server("s1", {"slow": slow(rig)})
        first = proxy.invoke("s1", "slow", (100, "a"), timeout=1)
        retried: list[Any] = []
        first.addErrback(lambda f: f.trap(RpcTimeout) and retried.append(
            proxy.invoke("s1", "slow", (100, "b"), timeout=60)))
        other = Outcome(proxy.invoke("s1", "slow", (100, "c"), timeout=2))
        rig.settle(1.01)
        self.assertEqual(len(retried), 1)
        self.assertEqual(other.results, [])
        rig.settle(1.0)
        self.assertIsInstance(other.value, RpcTimeout)  # at 2 s, not at 61 s

    def test_finished_calls_leave_every_structure(self) -> None:
        """After many answered calls no per-call entry is left (deadline heap included)."""
        rig = self.rig
        rig.server("s1", {"slow": slow(rig)}, prefetch=1000)
        proxy = rig.proxy(timeout=3600)
        for _ in range(4):  # 800 calls: under the server's prefetch (see report)
            outcomes = [Outcome(proxy.call("s1", "slow", 0, i)) for i in range(200)]
            rig.settle(0.1)
            self.assertEqual([o.value for o in outcomes], list(range(200)))
            self.assertEqual(len(proxy._deadlines), 0)
        self.assertEqual(proxy.pending_count, 0)
        self.assertEqual((proxy._unsent, proxy._retry), ({}, {}))
        self.assertEqual(proxy._destinations["s1"].unconfirmed, 0)
        pending = [Outcome(proxy.call("s1", "slow", 10, i)) for i in range(5)]
        rig.settle(0.1)
        self.assertEqual(len(proxy._deadlines), 5)
        rig.settle(11)
        self.assertEqual([o.value for o in pending], list(range(5)))
        self.assertEqual(len(proxy._deadlines), 0)

    def test_reply_over_max_body_size_is_payload_too_large(self) -> None:
        """A reply over the Proxy's max_body_size fails with PayloadTooLarge naming
        the limit and the side."""
        rig = self.rig
        rig.server("s1", {"big": lambda n: "x" * n})
        proxy = rig.proxy(max_body_size=1000)
        call = Outcome(proxy.call("s1", "big", 5000))
        rig.settle(0.1)
        self.assertIsInstance(call.value, PayloadTooLarge)
        self.assertIn("max_body_size of 1000 bytes", str(call.value))
        self.assertIn("caller side", str(call.value))
        small = Outcome(proxy.call("s1", "big", 10))
        rig.settle(0.1)
        self.assertEqual(small.value, "x" * 10)

    def test_cancelled_while_waiting_for_the_connection_is_never_published(self) -> None:
        """A call cancelled while it waits for the connection is never published;
        the call made with it is."""
        rig = self.rig
        rig.server("s1", {"slow": slow(rig)}, durable=True)
        rig.servers[0].stopService()  # the queue stays (durable): count what reaches it
        rig.settle(0.1)
        held = HeldEndpoint(rig.broker)
        proxy = rig.proxy(held)
        kept = Outcome(proxy.call("s1", "slow", 0, "kept"))
        cancelled_d = proxy.call("s1", "slow", 0, "cancelled")
        cancelled = Outcome(cancelled_d)
        self.assertIsNone(proxy._live)  # both wait for the connection
        cancelled_d.cancel()
        self.assertIsInstance(cancelled.value, CancelledError)
        held.release()
        rig.settle(0.1)
        self.assertEqual(queued_args(rig, "s1"), [[0, "kept"]])
        self.assertEqual(kept.results, [])  # taken by the broker: waits for a server
        self.assertEqual(proxy.pending_count, 1)
        proxy.close()
        rig.settle(0)
        self.assertIsInstance(kept.value, ProxyClosed)

    def test_cancelled_while_waiting_for_its_channel_is_never_published(self) -> None:
        """A call cancelled while it waits for its destination's channel to open
        (connected, nothing published yet) is never published; the one before it is."""
        rig = self.rig
        rig.server("s1", {"slow": slow(rig)}, durable=True)
        rig.servers[0].stopService()
        rig.settle(0.1)
        proxy = rig.proxy()
        assert proxy._live is not None
        release = hold_channel_opens(proxy._live)
        kept = Outcome(proxy.call("s1", "slow", 0, "kept"))
        cancelled_d = proxy.call("s1", "slow", 0, "cancelled")
        cancelled = Outcome(cancelled_d)
        destination = proxy._destinations["s1"]
        self.assertIsNone(destination.channel)
        self.assertEqual(destination.unconfirmed, 2)  # both wait for the channel
        cancelled_d.cancel()
        self.assertIsInstance(cancelled.value, CancelledError)
        self.assertEqual(queued_args(rig, "s1"), [])
        release()
        rig.settle(0.1)
        self.assertIsNotNone(destination.channel)
        self.assertEqual(queued_args(rig, "s1"), [[0, "kept"]])
        self.assertEqual(kept.results, [])
        self.assertEqual(proxy.pending_count, 1)
        proxy.close()
        rig.settle(0)
        self.assertIsInstance(kept.value, ProxyClosed)

    def test_nothing_left_in_the_reactor_after_close(self) -> None:
        """close() leaves no delayed call of the Proxy (re-publish timers included)."""
        rig = self.rig
        proxy = rig.proxy()
        rig.broker.drop_connections()
        rig.settle(2)  # reconnected: in the re-publish grace period
        calls = [Outcome(proxy.call("s1", "slow", 0, i)) for i in range(3)]
        rig.settle(0.01)  # returned: re-publish timer pending
        self.assertTrue(rig.clock.getDelayedCalls())
        proxy.close()
        rig.settle(0)
        self.assertEqual(rig.clock.getDelayedCalls(), [])
        for call in calls:
            self.assertEqual(type(call.value).__name__, "ProxyClosed")


class FlowControlTests(SynchronousTestCase):
    def test_blocked_connection_holds_calls_and_times_out_clearly(self) -> None:
        """While the broker blocks publishes, calls wait; one that times out says the
        broker is blocking and why, and its request is never sent; others go on unblock."""
        rig = Rig()
        ran: list[str] = []

        def record(value: str) -> str:
            ran.append(value)
            return value

        rig.server("s1", {"record": record})
        proxy = rig.proxy()
        self.assertEqual(Outcome(proxy.call("s1", "record", "warm")).value, "warm")
        rig.broker.block("low on memory")
        rig.settle(0)
        short = Outcome(proxy.invoke("s1", "record", ("short",), timeout=1))
        long = Outcome(proxy.invoke("s1", "record", ("long",), timeout=30))
        rig.settle(1.1)
        self.assertIsInstance(short.value, RpcTimeout)
        self.assertIn("the broker is blocking publishes", str(short.value))
        self.assertIn("low on memory", str(short.value))
        self.assertEqual(long.results, [])
        rig.broker.unblock()
        rig.settle(0.1)
        self.assertEqual(long.value, "long")
        self.assertEqual(ran, ["warm", "long"])


class NoConsumerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = Rig()
        rig = self.rig
        self.server = rig.server("s1", {"echo": lambda x: x}, durable=True)
        self.proxy = rig.proxy()
        self.assertEqual(Outcome(self.proxy.call("s1", "echo", 1)).value, 1)
        self.checks: list[str] = []
        count = self.proxy._count_consumers

        def counting(connection: Any, server_id: str, check: Any) -> Any:
            self.checks.append(server_id)
            return count(connection, server_id, check)

        self.proxy._count_consumers = counting  # type: ignore[method-assign]
        rig.settle(1.5)

    def test_durable_queue_without_consumer_fails_fast(self) -> None:
        """A call the broker took for a queue nobody consumes waits (RpcTimeout saying
        so); once a second count confirms 0, new calls fail fast and are not published."""
        rig, proxy = self.rig, self.proxy
        self.server.stopService()
        rig.settle(0.1)
        self.assertIn("server_s1_queue", rig.broker.queues)  # the queue stays
        queue = rig.broker.queues["server_s1_queue"]
        first = Outcome(proxy.invoke("s1", "echo", [2], timeout=5))
        rig.settle(0.5)
        self.assertEqual(first.results, [])  # taken by the broker: it waits
        self.assertEqual(self.checks, ["s1"])  # one count of 0: not trusted yet
        unconfirmed = Outcome(proxy.invoke("s1", "echo", [3], timeout=5))
        rig.settle(0.7)  # the confirming count a second after the first
        self.assertEqual(self.checks, ["s1", "s1"])
        self.assertEqual(unconfirmed.results, [])  # published before the confirmation
        queued = len(queue.messages)
        self.assertEqual(queued, 2)
        more = [Outcome(proxy.call("s1", "echo", i)) for i in range(10)]
        rig.settle(0)
        for call in more:
            self.assertIsInstance(call.value, ServerUnavailable)
            self.assertIn("no server consumes its queue server_s1_queue", str(call.value))
        self.assertEqual(len(queue.messages), queued)  # none of them was published
        rig.settle(4.5)
        self.assertIsInstance(first.value, RpcTimeout)
        self.assertIn("server_s1_queue had no consumer when last checked", str(first.value))
        self.assertIsInstance(unconfirmed.value, RpcTimeout)
        self.assertEqual(proxy.pending_count, 0)

    def test_single_zero_count_fails_nothing(self) -> None:
        """One count of 0 (an election, consumers coming back) followed by a count with
        consumers fails no call: every call in that window is answered."""
        rig, proxy = self.rig, self.proxy
        self.server.stopService()
        rig.settle(0.1)
        waiting = Outcome(proxy.call("s1", "echo", "a"))
        rig.settle(0.2)
        self.assertEqual(self.checks, ["s1"])  # counted 0 once
        rig.server("s1", {"echo": lambda x: x}, durable=True)
        calls = [Outcome(proxy.call("s1", "echo", "b")) for _ in range(5)]
        rig.settle(2)
        self.assertEqual(self.checks, ["s1", "s1"])  # the second count saw a consumer
        self.assertEqual([c.value for c in calls], ["b"] * 5)
        self.assertNotIsInstance(waiting.results[0] if waiting.results else None,
                                 Failure)  # taken before any count: never failed for it
        later = Outcome(proxy.call("s1", "echo", "c"))
        rig.settle(0.1)
        self.assertEqual(later.value, "c")

    def test_checked_at_most_once_a_second(self) -> None:
        """Under a steady stream of calls the consumer count is checked at most once
        a second per server id, and calls to a consumed queue are answered."""
        rig, proxy = self.rig, self.proxy
        calls = []
        for _ in range(50):  # 5 s of calls, 10 a second
            calls.append(Outcome(proxy.call("s1", "echo", "x")))
            rig.settle(0.1)
        self.assertEqual([c.value for c in calls], ["x"] * 50)
        self.assertGreaterEqual(len(self.checks), 4)
        self.assertLessEqual(len(self.checks), 6)

    def test_server_back_serves_again(self) -> None:
        """While calls fail fast the count is refreshed once a second; once a server
        consumes the queue again, new calls are published and answered."""
        rig, proxy = self.rig, self.proxy
        self.server.stopService()
        rig.settle(0.1)
        Outcome(proxy.invoke("s1", "echo", [1], timeout=3))
        rig.settle(1.5)  # confirmed: no consumer
        for _ in range(20):  # 2 s of calls failing fast keep the check refreshed
            self.assertIsInstance(Outcome(proxy.call("s1", "echo", 2)).value,
                                  ServerUnavailable)
            rig.settle(0.1)
        self.assertEqual(len(self.checks), 4)  # 2 to confirm, 1 refresh a second
        rig.server("s1", {"echo": lambda x: x}, durable=True)
        rig.settle(1.1)
        call = Outcome(proxy.call("s1", "echo", 3))
        rig.settle(0.1)
        self.assertEqual(call.value, 3)
        self.assertEqual(len(self.checks), 5)

    def test_missing_server_queue_is_never_declared_passively(self) -> None:
        """Calls to a server id with no queue come back (ServerUnavailable) and cause
        no passive declare, hence no 404 channel closes, however many are made."""
        rig, proxy = self.rig, self.proxy
        calls = []
        for _ in range(30):
            calls.append(Outcome(proxy.call("nobody", "echo", 1)))
            rig.settle(0.1)
        for call in calls:
            self.assertIsInstance(call.value, ServerUnavailable)
        self.assertEqual(self.checks, [])
