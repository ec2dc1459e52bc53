"""What a Proxy call sees when its request's channel dies before the broker
confirmed the request: the real Proxy and the real server over the scripted
broker (tests/scripted.py) on a Clock.

RabbitMQ handles a channel's publishes in order: when a publish to a missing
(404) or forbidden (403) exchange closes the channel, the publishes before it
were routed (and may be running), those after it were dropped. So a request
still unconfirmed at the close is of unknown fate: its call keeps waiting for
its reply (which comes on the reply queue, not on the request channel) until
its own timeout; only the refused publish fails at once. README promises that
"a call that failed with ServerUnavailable was never run".
"""

from __future__ import annotations

from typing import Any

from scripted import BrokerPeer, Queue, ScriptedBroker
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from txcallme import CallmeServerService, Proxy
from txcallme._wire import DIRECT_REPLY_TO
from txcallme.errors import (
    AccessRefused,
    BrokerConnectionLost,
    RpcTimeout,
    ServerUnavailable,
)

EXCHANGE = "server_s_ex"


def _confirm_all(peer: BrokerPeer) -> None:
    """Ack every publish on *peer*'s confirming channels (auto_confirm was off)."""
    for channel, count in list(peer.confirming.items()):
        if count:
            peer.ack(channel, count, multiple=True)


class _Base(SynchronousTestCase):
    direct_reply_to = False

    def setUp(self) -> None:
        self.broker = broker = ScriptedBroker()
        #: how many times the server ran a request
        self.runs = 0
        self.hanging: list[Deferred[Any]] = []
        self.server = CallmeServerService("s", params=broker.params(), reactor=broker.clock,
                                          threading=False)
        self.server.register_function(self.slow, "slow")
        self.server.register_function(self.hang, "hang")
        self.server.startService()
        broker.run(self.server.when_ready())
        self.server_peer = broker.peer
        if self.direct_reply_to:  # the pseudo-queue, as a plain queue of the scripted broker
            broker.queues[DIRECT_REPLY_TO] = Queue(DIRECT_REPLY_TO)
        self.proxy = Proxy(params=broker.params(), reactor=broker.clock, timeout=30,
                           direct_reply_to=self.direct_reply_to)
        broker.run(self.proxy.when_ready())
        self.proxy_peer = broker.peer
        self.assertIsNot(self.proxy_peer, self.server_peer)
        # One confirmed call first: until the broker has given an outcome on the
        # request channel, the Proxy writes one request at a time on it.
        warm = self.proxy.call("s", "slow", 0)
        broker.flush()
        self.assertEqual(self.successResultOf(warm), "ok")
        self.runs = 0

    def tearDown(self) -> None:
        broker = self.broker
        broker.auto_confirm = True
        for d in self.hanging:
            if not d.called:
                d.callback("late")
        broker.flush()
        for peer in broker.peers:
            _confirm_all(peer)
        broker.advance(6)  # the slow calls end and reply (confirmed now)
        broker.run(self.proxy.close())
        broker.run(self.server.stopService())
        self.assertEqual(broker.clock.getDelayedCalls(), [])

    def slow(self, delay: float) -> Deferred[str]:
        self.runs += 1
        return deferLater(self.broker.clock, delay, lambda: "ok")

    def hang(self) -> Deferred[str]:
        self.runs += 1
        d: Deferred[str] = Deferred()
        self.hanging.append(d)
        return d

    def routed_unconfirmed(self, method: str, *args: Any, timeout: float = 30) -> Deferred[Any]:
        """A call whose request the server receives but the broker does not confirm."""
        self.broker.auto_confirm = False
        d = self.proxy.invoke("s", method, args, timeout=timeout)
        self.broker.flush()
        self.assertEqual(self.runs, 1)  # delivered: the server runs it
        self.assertNoResult(d)
        return d

    def refused_call(self, forbidden: bool = False) -> Deferred[Any]:
        """The exchange goes; the next call's publish closes the request channel."""
        (self.broker.forbidden_exchanges if forbidden else self.broker.missing_exchanges).add(
            EXCHANGE)
        d = self.proxy.call("s", "slow", 1)
        self.broker.flush()
        publishes = [m for m in self.proxy_peer.methods if m.name == "basic.publish"]
        self.assertEqual(len(publishes), 3)  # the warm-up call's, the routed one's, this
        return d


class LaterRefusalTests(_Base):
    """auto_confirm=False, then a 404 (or 403) on a later publish to the same server."""

    def test_earlier_call_gets_its_reply(self) -> None:
        """The routed request keeps waiting and gets the server's reply; only the
        404'ing call fails with ServerUnavailable."""
        d1 = self.routed_unconfirmed("slow", 5)
        d2 = self.refused_call()
        self.failureResultOf(d2, ServerUnavailable)
        self.assertNoResult(d1)
        self.assertEqual(self.runs, 1)  # the refused request never reached the server
        self.broker.advance(5)
        self.assertEqual(self.successResultOf(d1), "ok")

    def test_earlier_call_times_out_if_nobody_replies(self) -> None:
        """Without a reply the earlier call ends with RpcTimeout at its own
        timeout (saying its channel closed before the confirm), never with
        ServerUnavailable."""
        d1 = self.routed_unconfirmed("hang", timeout=10)
        d2 = self.refused_call()
        self.failureResultOf(d2, ServerUnavailable)
        self.broker.advance(9.5)
        self.assertNoResult(d1)
        self.broker.advance(1)
        error = self.failureResultOf(d1, RpcTimeout).value
        self.assertIn("closed before the broker confirmed it", str(error))
        self.assertIn("404", str(error))

    def test_403_refuses_only_its_own_call(self) -> None:
        """The same with a 403: the refused call gets AccessRefused, the earlier
        one its reply."""
        d1 = self.routed_unconfirmed("slow", 5)
        d2 = self.refused_call(forbidden=True)
        self.assertEqual(self.failureResultOf(d2, AccessRefused).value.code, 403)
        self.assertNoResult(d1)
        self.broker.advance(5)
        self.assertEqual(self.successResultOf(d1), "ok")

    def test_only_the_last_unconfirmed_request_is_refused(self) -> None:
        """Two requests pipelined after the exchange went: the broker refuses the
        first and drops the second, but the client cannot tell which one the
        404 was for. The last one written is never run either way, so it alone
        fails with ServerUnavailable; the other may have been routed as far as
        the client knows, so it waits (here: until its timeout)."""
        d1 = self.routed_unconfirmed("hang", timeout=10)
        self.broker.missing_exchanges.add(EXCHANGE)
        d2 = self.proxy.invoke("s", "slow", (1,), timeout=10)
        d3 = self.proxy.invoke("s", "slow", (1,), timeout=10)
        self.broker.flush()
        self.failureResultOf(d3, ServerUnavailable)
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        self.broker.advance(10.5)
        self.failureResultOf(d1, RpcTimeout)
        self.failureResultOf(d2, RpcTimeout)
        self.assertEqual(self.runs, 1)

    def test_new_calls_after_the_close_fail_fast(self) -> None:
        """A call made after the refusal opens a new channel and is refused on
        its own (the exchange is still missing); the waiting call is unaffected."""
        d1 = self.routed_unconfirmed("slow", 5)
        self.failureResultOf(self.refused_call(), ServerUnavailable)
        d3 = self.proxy.call("s", "slow", 1)
        self.broker.flush()
        self.failureResultOf(d3, ServerUnavailable)
        self.broker.advance(5)
        self.assertEqual(self.successResultOf(d1), "ok")


class ConnectionLostTests(_Base):
    """The Proxy's own connection lost: in-flight calls fail at once (README)."""

    def test_unconfirmed_call_fails_with_connection_lost(self) -> None:
        d1 = self.routed_unconfirmed("slow", 5)
        self.proxy_peer.drop()
        self.broker.flush()
        self.failureResultOf(d1, BrokerConnectionLost)

    def test_connection_close_fails_in_flight_calls(self) -> None:
        """connection.close (320, as ``rabbitmqctl close_connection``) likewise."""
        d1 = self.routed_unconfirmed("slow", 5)
        self.proxy_peer.close_connection(320, "CONNECTION_FORCED - closed via management")
        self.broker.flush()
        self.failureResultOf(d1, BrokerConnectionLost)


class DirectReplyToTests(_Base):
    """With Direct Reply-to the reply would come on the closed channel: the
    earlier call fails with BrokerConnectionLost (reply lost), not
    ServerUnavailable."""

    direct_reply_to = True

    def test_earlier_call_fails_with_connection_lost(self) -> None:
        d1 = self.routed_unconfirmed("slow", 5)
        d2 = self.refused_call()
        self.failureResultOf(d2, ServerUnavailable)
        error = self.failureResultOf(d1, BrokerConnectionLost).value
        self.assertIn("Direct Reply-to", str(error))


class LongUserNameTests(SynchronousTestCase):
    """A user name that makes the reply names exceed AMQP's 255 bytes is refused
    by the constructor (it used to retry its set-up forever on an EncodeError)."""

    def test_over_the_limit_refused(self) -> None:
        broker = ScriptedBroker()
        for user in ("u" * 210, "\u00e9" * 105):  # 210 bytes either way
            with self.assertRaises(ValueError) as caught:
                Proxy(params=broker.params(user=user), reactor=broker.clock)
            message = str(caught.exception)
            self.assertIn("at most 209 bytes", message)
            self.assertIn("255", message)
        self.assertEqual(broker.peers, [])  # nothing connected
        self.assertEqual(broker.clock.getDelayedCalls(), [])

    def test_at_the_limit_works(self) -> None:
        """209 bytes: a 255-byte reply queue name, declared and consumed; a call works."""
        broker = ScriptedBroker()
        server = CallmeServerService("s", params=broker.params(), reactor=broker.clock,
                                     threading=False)
        server.register_function(lambda: "ok", "f")
        server.startService()
        broker.run(server.when_ready())
        proxy = Proxy(params=broker.params(user="u" * 209), reactor=broker.clock)
        broker.run(proxy.when_ready())
        self.assertEqual(len(proxy.queue.encode()), 255)
        self.assertEqual(broker.run(proxy.call("s", "f")), "ok")
        broker.run(proxy.close())
        broker.run(server.stopService())

    def test_direct_reply_to_has_no_limit(self) -> None:
        """With Direct Reply-to no reply names are made: the long user is accepted."""
        broker = ScriptedBroker()
        proxy = Proxy(params=broker.params(user="u" * 300), reactor=broker.clock,
                      direct_reply_to=True)
        broker.run(proxy.close())


class ConsumerCountAfterCloseTests(_Base):
    def test_count_armed_on_a_closed_channel_is_armed_again(self) -> None:
        """A consumer count waiting for a request the closed channel never confirmed
        is not left pending for good: the next request the broker takes on the new
        channel starts it (a passive queue.declare of the server queue)."""
        def counts() -> int:
            return sum(1 for m in self.proxy_peer.sent("queue.declare")
                       if m.args["passive"] and m.args["queue"] == "server_s_queue")

        self.broker.advance(1.5)  # past the warm-up call's count
        before = counts()
        self.routed_unconfirmed("slow", 5)  # armed the count; never confirmed
        self.failureResultOf(self.refused_call(), ServerUnavailable)
        self.assertEqual(counts(), before)
        self.broker.missing_exchanges.discard(EXCHANGE)
        self.broker.auto_confirm = True
        self.broker.advance(1.5)
        d = self.proxy.call("s", "slow", 0)
        self.broker.flush()
        self.assertEqual(counts(), before + 1)
        self.broker.advance(1)
        self.assertEqual(self.successResultOf(d), "ok")


class FirstRequestTests(_Base):
    """Until the broker has given an outcome for one request on a destination
    channel (so its exchange existed), the Proxy writes one request at a time on
    it: a 404 then refuses exactly that one, and the others were never written."""

    def requests_to(self, peer: BrokerPeer, exchange: str) -> list[Any]:
        return [p for p in peer.published if p.exchange == exchange]

    def test_calls_to_a_missing_server_fail_at_once_one_written(self) -> None:
        self.broker.missing_exchanges.add("server_nobody_ex")
        calls = [self.proxy.call("nobody", "slow", 0) for _ in range(5)]
        self.broker.flush()
        for d in calls:
            self.failureResultOf(d, ServerUnavailable)
        self.assertEqual(len(self.requests_to(self.proxy_peer, "server_nobody_ex")), 1)

    def test_pipelined_once_the_first_request_has_an_outcome(self) -> None:
        broker = self.broker
        proxy = Proxy(params=broker.params(), reactor=broker.clock, timeout=30)
        broker.run(proxy.when_ready())
        peer = broker.peer
        broker.auto_confirm = False
        first = [proxy.call("s", "slow", 0) for _ in range(3)]
        broker.flush()
        written = self.requests_to(peer, EXCHANGE)
        self.assertEqual(len(written), 1)  # the others wait for its outcome
        peer.ack(written[0].channel, written[0].seq)
        broker.flush()
        self.assertEqual(len(self.requests_to(peer, EXCHANGE)), 3)
        more = [proxy.call("s", "slow", 0) for _ in range(3)]
        broker.flush()
        self.assertEqual(len(self.requests_to(peer, EXCHANGE)), 6)  # no waiting now
        _confirm_all(peer)
        broker.flush()
        self.assertEqual([self.successResultOf(d) for d in first + more], ["ok"] * 6)
        broker.run(proxy.close())
