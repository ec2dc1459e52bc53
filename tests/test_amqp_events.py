"""Broker events, one by one, at the channel and session level: the real
txcallme AMQP client against the scripted broker (tests/scripted.py) on a Clock."""

from __future__ import annotations

import random
from typing import Any

from scripted import ScriptedBroker, long_name
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from txcallme.amqp import (
    BrokerEndpoint,
    Channel,
    ChannelState,
    Connection,
    Delivery,
    Outcome,
    PublishOutcome,
    Session,
    connection_params,
)
from txcallme.errors import (
    AccessRefused,
    BrokerConnectionLost,
    CallmeError,
    ChannelError,
    ConnectTimeout,
    EncodeError,
    NotFound,
    OperationTimeout,
)


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = ScriptedBroker()
        self.connection: Connection = self.broker.connection()
        self.channel: Channel = self.broker.run(self.connection.open_channel())

    def confirming(self) -> tuple[Channel, list[tuple[int, PublishOutcome]]]:
        channel = self.channel
        self.broker.run(channel.confirm_select())
        outcomes: list[tuple[int, PublishOutcome]] = []
        channel.on_outcome = lambda seq, outcome: outcomes.append((seq, outcome))
        return channel, outcomes

    def capture_logs(self) -> list[LogEvent]:
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events


class LifecycleTests(_Base):
    """Channel states: opening, open, closing, closed with a reason."""

    def test_open(self) -> None:
        """open_channel fires with an OPEN channel registered in the one channel table."""
        self.assertIs(self.channel.state, ChannelState.OPEN)
        self.assertIs(self.connection.channels[self.channel.id], self.channel)

    def test_client_close(self) -> None:
        """close() sends channel.close, goes CLOSING, then CLOSED on close-ok; the id is freed."""
        d = self.channel.close()
        self.assertIs(self.channel.state, ChannelState.CLOSING)
        self.broker.run(d)
        self.assertIs(self.channel.state, ChannelState.CLOSED)
        self.assertNotIn(self.channel.id, self.connection.channels)
        self.assertEqual(len(self.broker.peer.sent("channel.close")), 1)

    def test_close_twice_shares_one_close(self) -> None:
        """Two close() calls send one channel.close and both fire."""
        d1, d2 = self.channel.close(), self.channel.close()
        self.broker.flush()
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(len(self.broker.peer.sent("channel.close")), 1)

    def test_close_without_answer(self) -> None:
        """A close the broker never answers still fires after control_timeout; the id stays
        reserved."""
        self.broker.silence("channel.close")
        d = self.channel.close()
        self.broker.advance(29)
        self.assertNoResult(d)
        self.broker.advance(2)
        self.successResultOf(d)
        self.assertIs(self.channel.state, ChannelState.CLOSED)
        self.assertIn(self.channel.id, self.connection.channels)
        self.assertNotEqual(self.broker.run(self.connection.open_channel()).id, self.channel.id)

    def test_open_refused(self) -> None:
        """A channel.open refused by the broker fails with its error; the channel is CLOSED."""
        self.broker.refuse("channel.open", 403, "ACCESS_REFUSED - no channel for you")
        d = self.connection.open_channel()
        self.broker.flush()
        self.failureResultOf(d, AccessRefused)

    def test_open_timeout(self) -> None:
        """A channel.open the broker never answers fails with OperationTimeout naming it."""
        self.broker.silence("channel.open")
        d = self.connection.open_channel()
        self.broker.advance(31)
        error = self.failureResultOf(d, OperationTimeout).value
        self.assertEqual(error.operation, "channel.open")
        self.assertIn("channel.open", str(error))

    def test_publish_on_closed_channel_raises(self) -> None:
        """publish() on a closed channel raises its close reason and writes nothing."""
        self.broker.run(self.channel.close())
        written = len(self.broker.peer.published)
        self.assertRaises(BrokerConnectionLost, self.channel.publish, "ex", "k", b"x", {})
        self.broker.flush()
        self.assertEqual(len(self.broker.peer.published), written)


class BrokerCloseTests(_Base):
    """channel.close from the broker, with each code a refusal can carry."""

    def refused(self, code: int, text: str) -> CallmeError:
        self.broker.refuse("queue.declare", code, text)
        closes: list[CallmeError] = []
        self.channel.on_close.append(closes.append)
        d = self.channel.declare_queue("q")
        self.broker.flush()
        error = self.failureResultOf(d, ChannelError).value
        self.assertIs(self.channel.state, ChannelState.CLOSED)
        self.assertIs(self.channel.close_error, error)
        self.assertEqual(closes, [error])
        self.assertEqual(len(self.broker.peer.sent("channel.close-ok")), 1)
        self.assertNotIn(self.channel.id, self.connection.channels)
        return error

    def test_404(self) -> None:
        """404 fails the operation with NotFound naming the object."""
        error = self.refused(404, "NOT_FOUND - no queue 'q' in vhost '/'")
        self.assertIsInstance(error, NotFound)
        self.assertEqual(error.object, "q")  # type: ignore[attr-defined]

    def test_403(self) -> None:
        """403 fails the operation with AccessRefused naming the user."""
        error = self.refused(403, "ACCESS_REFUSED - access to queue 'q' in vhost '/' refused "
                                  "for user 'bob'")
        self.assertIsInstance(error, AccessRefused)
        self.assertEqual(error.user, "bob")  # type: ignore[attr-defined]

    def test_405(self) -> None:
        """405 RESOURCE_LOCKED fails the operation with a ChannelError of code 405."""
        error = self.refused(405, "RESOURCE_LOCKED - cannot obtain exclusive access to "
                                  "locked queue 'q' in vhost '/'")
        self.assertEqual(error.code, 405)  # type: ignore[attr-defined]

    def test_406(self) -> None:
        """406 PRECONDITION_FAILED fails the operation with a ChannelError of code 406."""
        error = self.refused(406, "PRECONDITION_FAILED - inequivalent arg 'durable' for "
                                  "queue 'q' in vhost '/'")
        self.assertEqual(error.code, 406)  # type: ignore[attr-defined]

    def test_pending_operations_fail_with_the_close(self) -> None:
        """Operations pipelined behind the refused one fail with the same error."""
        self.broker.refuse("queue.declare", 404, "NOT_FOUND - no queue 'q' in vhost '/'")
        d1 = self.channel.declare_queue("q")
        d2 = self.channel.bind_queue("q", "ex", "k")
        self.broker.flush()
        e1 = self.failureResultOf(d1, NotFound).value
        self.assertIs(self.failureResultOf(d2, NotFound).value, e1)

    def test_other_channels_unaffected(self) -> None:
        """A channel closed by the broker leaves the connection's other channels working."""
        other = self.broker.run(self.connection.open_channel())
        self.refused(404, "NOT_FOUND - no queue 'q' in vhost '/'")
        self.assertEqual(self.broker.run(other.declare_queue("q2")).queue, "q2")

    def test_541_connection_close(self) -> None:
        """A connection.close 541 fails the pending operation with code 541 and every channel
        with BrokerConnectionLost naming the close."""
        self.broker.refuse("queue.declare", 541, "INTERNAL_ERROR - transient_nonexcl_queues",
                           connection=True)
        other = self.broker.run(self.connection.open_channel())
        d = self.channel.declare_queue("q")
        self.broker.flush()
        error = self.failureResultOf(d, ChannelError).value
        self.assertEqual(error.code, 541)  # type: ignore[attr-defined]
        self.assertTrue(self.connection.lost)
        self.assertIsInstance(other.close_error, BrokerConnectionLost)
        self.assertIn("541", str(other.close_error))


class ControlPlaneTests(_Base):
    """Control operations are bounded, and a bad frame fails only its operation."""

    def test_declare_timeout(self) -> None:
        """A declare the broker never answers fails after control_timeout with
        OperationTimeout naming queue.declare, and closes the (out of step) channel."""
        self.broker.silence("queue.declare", times=1)
        d = self.channel.declare_queue("q")
        self.broker.advance(29.5)
        self.assertNoResult(d)
        self.broker.advance(1)
        error = self.failureResultOf(d, OperationTimeout).value
        self.assertEqual(error.operation, "queue.declare")
        self.assertIs(self.channel.state, ChannelState.CLOSED)
        fresh = self.broker.run(self.connection.open_channel())
        self.assertEqual(self.broker.run(fresh.declare_queue("q2")).queue, "q2")

    def test_control_timeout_setting(self) -> None:
        """ConnectionParams.control_timeout sets the bound."""
        broker = ScriptedBroker()
        connection = broker.connection(control_timeout=2.0)
        channel = broker.run(connection.open_channel())
        broker.silence("basic.qos")
        d = channel.qos(10)
        broker.advance(2.5)
        self.assertEqual(self.failureResultOf(d, OperationTimeout).value.operation, "basic.qos")

    def test_each_operation_times_out(self) -> None:
        """bind, qos, consume, cancel and confirm.select each fail with their own name."""
        calls: dict[str, Any] = {
            "queue.bind": lambda ch: ch.bind_queue("q", "ex", "k"),
            "basic.qos": lambda ch: ch.qos(1),
            "basic.consume": lambda ch: ch.consume("q", lambda d: None),
            "basic.cancel": lambda ch: ch.cancel("ctag"),
            "confirm.select": lambda ch: ch.confirm_select(),
            "exchange.declare": lambda ch: ch.declare_exchange("ex"),
        }
        self.broker.run(self.channel.declare_queue("q"))
        for name, call in calls.items():
            channel = self.broker.run(self.connection.open_channel())
            self.broker.silence(name, times=1)
            d = call(channel)
            self.broker.advance(31)
            self.assertEqual(self.failureResultOf(d, OperationTimeout).value.operation, name)

    def test_long_name_fails_only_its_declare(self) -> None:
        """A 300-byte queue name fails its declare with EncodeError naming it, writes
        nothing, and the next declare on the same channel works."""
        before = len(self.broker.peer.methods)
        d = self.channel.declare_queue(long_name(300))
        error = self.failureResultOf(d, EncodeError).value
        self.assertEqual(error.operation, "queue.declare")
        self.assertIn("255", str(error))
        self.broker.flush()
        self.assertEqual(len(self.broker.peer.methods), before)
        self.assertEqual(self.broker.run(self.channel.declare_queue("fine")).queue, "fine")
        self.assertIs(self.channel.state, ChannelState.OPEN)

    def test_long_exchange_name_publish(self) -> None:
        """A publish to a 300-byte exchange name raises EncodeError (a ValueError) and
        later publishes go out."""
        channel, outcomes = self.confirming()
        with self.assertRaises(ValueError):
            channel.publish(long_name(), "k", b"x", {})
        self.assertEqual(channel.publish("", "k", b"y", {}), 1)
        self.broker.flush()
        self.assertEqual([p.body for p in self.broker.peer.published], [b"y"])

    def test_bad_table_value_fails_only_its_declare(self) -> None:
        """A queue argument AMQP cannot encode fails that declare with EncodeError only."""
        d = self.channel.declare_queue("q", arguments={"x-bad": object()})
        self.failureResultOf(d, EncodeError)
        self.assertEqual(self.broker.run(self.channel.declare_queue("q")).queue, "q")


class OutcomeTests(_Base):
    """What became of each publish on a confirming channel."""

    def setUp(self) -> None:
        super().setUp()
        self.broker.auto_confirm = False
        self.ch, self.outcomes = self.confirming()

    def kinds(self) -> list[tuple[int, Outcome]]:
        return [(seq, o.kind) for seq, o in self.outcomes]

    def test_taken(self) -> None:
        """An ack without a return is TAKEN, once."""
        seq = self.ch.publish("", "q", b"x", {})
        self.broker.flush()
        self.assertEqual(self.outcomes, [])
        self.broker.peer.ack(self.ch.id, seq)
        self.broker.flush()
        self.assertEqual(self.outcomes, [(1, PublishOutcome.TAKEN)])

    def test_multiple_ack(self) -> None:
        """A multiple ack settles every publish up to its tag, in order."""
        for _ in range(3):
            self.ch.publish("", "q", b"x", {})
        self.broker.flush()
        self.broker.peer.ack(self.ch.id, 2, multiple=True)
        self.broker.flush()
        self.assertEqual(self.kinds(), [(1, Outcome.TAKEN), (2, Outcome.TAKEN)])
        self.assertEqual(self.ch.unconfirmed, 1)

    def test_returned(self) -> None:
        """A mandatory publish that comes back (return before ack) is RETURNED, with the
        code, text and the message's properties (correlation id)."""
        self.broker.run(self.ch.declare_queue("q"))
        self.broker.run(self.ch.bind_queue("q", "ex", "a"))  # the broker routes both
        self.ch.publish("ex", "a", b"1", {"correlation_id": "c1"}, mandatory=True)
        seq = self.ch.publish("ex", "a", b"2", {"correlation_id": "c2"}, mandatory=True)
        self.broker.flush()
        self.broker.peer.basic_return(self.ch.id, b"2", {"correlation_id": "c2"},
                                      exchange="ex", routing_key="a")
        self.broker.peer.ack(self.ch.id, seq, multiple=True)
        self.broker.flush()
        self.assertEqual(self.kinds(), [(1, Outcome.TAKEN), (2, Outcome.RETURNED)])
        returned = self.outcomes[1][1].returned
        assert returned is not None
        self.assertEqual((returned.reply_code, returned.reply_text), (312, "NO_ROUTE"))
        self.assertEqual(returned.properties["correlation_id"], "c2")
        self.assertIn("312", self.outcomes[1][1].reason)

    def test_returned_by_routing(self) -> None:
        """With the broker routing and confirming, an unroutable mandatory publish is
        RETURNED and a routable one TAKEN."""
        self.broker.auto_confirm = True
        self.broker.run(self.ch.declare_queue("q"))
        self.ch.publish("", "q", b"ok", {}, mandatory=True)
        self.ch.publish("", "nowhere", b"no", {"correlation_id": "z"}, mandatory=True)
        self.broker.flush()
        self.assertEqual(self.kinds(), [(1, Outcome.TAKEN), (2, Outcome.RETURNED)])

    def test_nacked(self) -> None:
        """A nack is NACKED."""
        seq = self.ch.publish("", "q", b"x", {})
        self.broker.flush()
        self.broker.peer.nack(self.ch.id, seq)
        self.broker.flush()
        self.assertEqual(self.outcomes, [(1, PublishOutcome.NACKED)])

    def test_lost_on_channel_close(self) -> None:
        """Publishes unconfirmed when the broker closes the channel (404 on a publish)
        are LOST, with the channel's error."""
        self.broker.missing_exchanges.add("gone")
        self.ch.publish("", "q", b"1", {})
        self.ch.publish("gone", "k", b"2", {})
        self.broker.flush()
        self.assertEqual(self.kinds(), [(1, Outcome.LOST), (2, Outcome.LOST)])
        self.assertIsInstance(self.outcomes[0][1].error, NotFound)

    def test_lost_on_connection_drop(self) -> None:
        """Publishes unconfirmed when the connection drops are LOST with BrokerConnectionLost."""
        self.ch.publish("", "q", b"1", {})
        self.broker.flush()
        self.broker.peer.drop()
        self.broker.flush()
        self.assertEqual(self.kinds(), [(1, Outcome.LOST)])
        self.assertIsInstance(self.outcomes[0][1].error, BrokerConnectionLost)

    def test_each_publish_told_once(self) -> None:
        """An ack after the channel died, or a repeated ack, tells nothing more."""
        seq = self.ch.publish("", "q", b"1", {})
        self.broker.flush()
        self.broker.peer.ack(self.ch.id, seq)
        self.broker.peer.ack(self.ch.id, seq)
        self.broker.flush()
        self.assertEqual(len(self.outcomes), 1)


class CancelTests(_Base):
    """basic.cancel from the broker (queue deleted)."""

    def test_cancel_notifies(self) -> None:
        """A broker basic.cancel calls on_consumer_cancelled; later deliveries to the tag
        do not reach the old callback."""
        got: list[Delivery] = []
        cancelled: list[str] = []
        self.channel.on_consumer_cancelled = cancelled.append
        self.broker.run(self.channel.declare_queue("q"))
        tag = self.broker.run(self.channel.consume("q", got.append))
        self.broker.delete_queue("q")
        self.broker.flush()
        self.assertEqual(cancelled, [tag])
        self.broker.peer.deliver(self.channel.id, tag, b"late")
        self.broker.flush()
        self.assertEqual(got, [])
        self.assertIs(self.channel.state, ChannelState.OPEN)

    def test_delivery_properties(self) -> None:
        """A delivery carries body, properties, tag, redelivered flag and consumer tag."""
        got: list[Delivery] = []
        self.broker.run(self.channel.declare_queue("q"))
        tag = self.broker.run(self.channel.consume("q", got.append))
        self.broker.peer.deliver(self.channel.id, tag, b"body",
                                 {"correlation_id": "c", "reply_to": "r"}, redelivered=True)
        self.broker.flush()
        [d] = got
        self.assertEqual((d.body, d.properties, d.delivery_tag, d.redelivered, d.consumer_tag),
                         (b"body", {"correlation_id": "c", "reply_to": "r"}, 1, True, tag))


class BlockedTests(_Base):
    """connection.blocked / unblocked: publishes held by the connection."""

    def setUp(self) -> None:
        super().setUp()
        self.ch, self.outcomes = self.confirming()
        self.calls: list[str | None] = []
        self.connection.on_blocked.append(self.calls.append)

    def test_block_and_unblock(self) -> None:
        """blocked_reason is the broker's reason while blocked, callbacks get it, then None."""
        self.broker.peer.blocked("low on memory")
        self.broker.flush()
        self.assertEqual(self.connection.blocked_reason, "low on memory")
        self.broker.peer.unblocked()
        self.broker.flush()
        self.assertIsNone(self.connection.blocked_reason)
        self.assertEqual(self.calls, ["low on memory", None])

    def test_publishes_held_then_sent_in_order(self) -> None:
        """While blocked nothing is written; on unblock held publishes go out in order and
        are confirmed."""
        self.broker.run(self.ch.declare_queue("q"))
        self.broker.peer.blocked("disk")
        self.broker.flush()
        seqs = [self.ch.publish("", "q", body, {}) for body in (b"1", b"2", b"3")]
        self.broker.flush()
        self.assertEqual(self.broker.peer.published, [])
        self.assertEqual(self.connection.held, 3)
        self.broker.peer.unblocked()
        self.broker.flush()
        self.assertEqual([p.body for p in self.broker.peer.published], [b"1", b"2", b"3"])
        self.assertEqual([s for s, _ in self.outcomes], seqs)

    def test_withdraw(self) -> None:
        """A withdrawn held publish is never sent and gets no outcome; the others' numbers
        still match the broker's confirms."""
        self.broker.peer.blocked("disk")
        self.broker.flush()
        s1 = self.ch.publish("", "q", b"1", {})
        s2 = self.ch.publish("", "q", b"2", {})
        s3 = self.ch.publish("", "q", b"3", {})
        self.assertTrue(self.ch.withdraw(s2))
        self.assertFalse(self.ch.withdraw(s2))
        self.broker.peer.unblocked()
        self.broker.flush()
        self.assertEqual([p.body for p in self.broker.peer.published], [b"1", b"3"])
        self.assertEqual([(s, o.kind) for s, o in self.outcomes],
                         [(s1, Outcome.TAKEN), (s3, Outcome.TAKEN)])
        self.assertFalse(self.ch.withdraw(s3))

    def test_one_warning_per_block(self) -> None:
        """A block is logged at warn once, even if the broker repeats it."""
        events = self.capture_logs()
        self.broker.peer.blocked("memory")
        self.broker.peer.blocked("memory")
        self.broker.flush()
        warnings = [e for e in events if e.get("log_level") is not None
                    and e["log_level"].name == "warn" and "blocks" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_held_publishes_lost_with_the_channel(self) -> None:
        """Held publishes of a channel that dies are LOST and never sent."""
        self.broker.peer.blocked("memory")
        self.broker.flush()
        seq = self.ch.publish("", "q", b"1", {})
        self.broker.peer.drop()
        self.broker.flush()
        self.assertEqual([(s, o.kind) for s, o in self.outcomes], [(seq, Outcome.LOST)])
        self.assertEqual(self.connection.held, 0)


class HeartbeatTests(SynchronousTestCase):
    """Heartbeat loss."""

    def test_silent_broker_dropped(self) -> None:
        """With heartbeat 2 s, a broker silent for over 4 s loses the connection and its
        channels are closed with BrokerConnectionLost."""
        broker = ScriptedBroker(heartbeat=2)
        connection = broker.connection(heartbeat=2)
        channel = broker.run(connection.open_channel())
        broker.advance(3)
        self.assertFalse(connection.lost)
        self.assertGreater(broker.peer.heartbeats_received, 0)
        broker.advance(3)
        self.assertTrue(connection.lost)
        self.assertIsInstance(channel.close_error, BrokerConnectionLost)

    def test_broker_heartbeats_keep_it(self) -> None:
        """A broker that sends heartbeats keeps the connection."""
        broker = ScriptedBroker(heartbeat=2)
        connection = broker.connection(heartbeat=2)
        for _ in range(10):
            broker.peer.heartbeat()
            broker.advance(1)
        self.assertFalse(connection.lost)


class ConnectTests(SynchronousTestCase):
    """The handshake's timeouts and the node the connection names."""

    def test_timeout_after_start_is_not_auth(self) -> None:
        """A broker silent after connection.start fails with ConnectTimeout naming the
        login phase (not AuthenticationError)."""
        broker = ScriptedBroker()
        broker.silence("connection.start-ok")
        from txcallme.amqp import connect
        d = connect(broker.clock, broker.params(connect_timeout=5))
        broker.advance(6)
        error = self.failureResultOf(d, ConnectTimeout).value
        self.assertEqual(error.phase, "login")
        self.assertIn("login", str(error))

    def test_timeout_before_start(self) -> None:
        """A broker that never sends connection.start: ConnectTimeout in the header phase."""
        broker = ScriptedBroker()
        broker.silence("connection.start")
        from txcallme.amqp import connect
        d = connect(broker.clock, broker.params(connect_timeout=5))
        broker.advance(6)
        self.assertEqual(self.failureResultOf(d, ConnectTimeout).value.phase, "amqp header")

    def test_timeout_at_vhost_open(self) -> None:
        """A broker that never answers connection.open: ConnectTimeout in the vhost phase."""
        broker = ScriptedBroker()
        broker.silence("connection.open")
        from txcallme.amqp import connect
        d = connect(broker.clock, broker.params(connect_timeout=5))
        broker.advance(6)
        self.assertEqual(self.failureResultOf(d, ConnectTimeout).value.phase, "vhost open")

    def test_node_named(self) -> None:
        """Connection.node names host:port and the broker's cluster name."""
        broker = ScriptedBroker()
        connection = broker.connection()
        self.assertIn("scripted:5672", connection.node)
        self.assertIn("rabbit@scripted", connection.node)


class SessionTests(SynchronousTestCase):
    """Session over the scripted broker, through the ConnectionParams connector seam."""

    def make(self, prepare: Any, **params: Any) -> tuple[ScriptedBroker, Session,
                                                         list[CallmeError]]:
        broker = ScriptedBroker()
        lost: list[CallmeError] = []
        session = Session(broker.clock, broker.params(**params), prepare, lost.append,
                          name="test")
        self.addCleanup(lambda: (session.stop(), broker.flush()))
        return broker, session, lost

    def test_connector_seam(self) -> None:
        """A Session given a connector connects through it and runs its set-up."""
        prepared: list[Connection] = []

        async def prepare(connection: Connection) -> None:
            channel = await connection.open_channel()
            await channel.declare_queue("sq")
            prepared.append(connection)

        broker, session, _ = self.make(prepare)
        session.start()
        connection = broker.run(session.ready())
        self.assertEqual(prepared, [connection])
        self.assertIn("sq", broker.queues)

    def test_prepare_timeout_first_connect(self) -> None:
        """A set-up that hangs fails ready() with OperationTimeout on the first connect."""
        async def prepare(connection: Connection) -> None:
            await Deferred()

        broker, session, _ = self.make(prepare, prepare_timeout=5)
        session.start()
        d = session.ready()
        broker.advance(6)
        self.assertIn("set-up", str(self.failureResultOf(d, OperationTimeout).value))

    def test_failed_prepare_logged_and_retried_on_reconnect(self) -> None:
        """After a drop, a set-up refused by the broker is logged at error and retried with
        backoff until it works."""
        attempts: list[int] = []

        async def prepare(connection: Connection) -> None:
            attempts.append(1)
            channel = await connection.open_channel()
            await channel.declare_queue("sq")

        broker, session, lost = self.make(prepare)
        session.start()
        broker.run(session.ready())
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        broker.refuse("queue.declare", 406, "PRECONDITION_FAILED - inequivalent arg", times=2)
        broker.peer.drop()
        broker.advance(10)
        self.assertEqual(len(lost), 1)
        self.assertEqual(len(attempts), 4)  # first, two refused, then fine
        self.assertIsNotNone(session.connection)
        errors = [e for e in events if e.get("log_level") is not None
                  and e["log_level"].name == "error"]
        self.assertTrue(errors)
        self.assertIn("406", str(errors[0].get("error")))

    def test_reconnect_log_names_node(self) -> None:
        """The connected and lost log lines name the node reached."""
        async def prepare(connection: Connection) -> None:
            pass

        broker, session, _ = self.make(prepare)
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        session.start()
        broker.run(session.ready())
        broker.peer.drop()
        broker.flush()
        nodes = [e["node"] for e in events if "node" in e]
        self.assertEqual(len(nodes), 2)
        for node in nodes:
            self.assertIn("scripted:5672 (cluster_name rabbit@scripted", node)


class ShuffleTests(SynchronousTestCase):
    """shuffle_hosts spreads instances over a cluster's nodes."""

    HOSTS = ["n1:5672", "n2:5672", "n3:5672", "n4:5672"]

    def test_in_order_by_default(self) -> None:
        """Without shuffle_hosts the hosts are tried in the given order."""
        endpoint = BrokerEndpoint(None, connection_params(self.HOSTS))
        self.assertEqual([h for h, _ in endpoint.hosts], ["n1", "n2", "n3", "n4"])

    def test_shuffled(self) -> None:
        """With shuffle_hosts each endpoint takes its own order of the same hosts."""
        params = connection_params(self.HOSTS, shuffle_hosts=True)
        orders = {BrokerEndpoint(None, params, random.Random(seed)).hosts for seed in range(20)}
        self.assertGreater(len(orders), 1)
        for order in orders:
            self.assertEqual(sorted(order), sorted(params.hosts))


class ReconnectDuringPrepareTests(SynchronousTestCase):
    """The connection drops at each step of a Session's set-up: it comes back ready."""

    STEPS = ("channel.open", "basic.qos", "exchange.declare", "queue.declare", "queue.bind",
             "basic.consume", "confirm.select")

    def test_each_step(self) -> None:
        """A drop while any set-up step waits fails that step with BrokerConnectionLost and
        the Session reconnects, runs the whole set-up again and is ready."""
        for step in self.STEPS:
            broker = ScriptedBroker()
            failures: list[BaseException] = []

            async def prepare(connection: Connection,
                              failures: list[BaseException] = failures) -> None:
                try:
                    channel = await connection.open_channel()
                    await channel.qos(5)
                    await channel.declare_exchange("ex")
                    await channel.declare_queue("q")
                    await channel.bind_queue("q", "ex", "k")
                    await channel.consume("q", lambda d: None)
                    await channel.confirm_select()
                except CallmeError as e:
                    failures.append(e)
                    raise

            session = Session(broker.clock, broker.params(), prepare, lambda e: None,
                              name=step)
            session.start()
            broker.run(session.ready())
            broker.silence(step, times=1)
            broker.peer.drop()  # reconnects, and the set-up stalls at *step*
            broker.advance(1)
            self.assertEqual(len(broker.peers), 2, step)
            d = session.ready()
            self.assertNoResult(d)
            broker.peer.drop()
            broker.advance(2)
            connection = self.successResultOf(d)
            self.assertIs(connection.protocol, broker.peers[2].protocol, step)
            self.assertEqual(len(failures), 1, step)
            self.assertIsInstance(failures[0], BrokerConnectionLost, step)
            session.stop()
            broker.flush()


class ConfirmedPublisherTests(SynchronousTestCase):
    """ConfirmedPublisher on a real Channel: failures distinguishable by type."""

    def setUp(self) -> None:
        from txcallme.amqp import ConfirmedPublisher
        self.broker = ScriptedBroker()
        self.broker.auto_confirm = False
        self.connection = self.broker.connection()
        self.publisher = ConfirmedPublisher(self.connection.open_channel, replay=True)

    def test_nack_is_publish_nacked(self) -> None:
        """A nacked message fails with PublishNacked (a ChannelError)."""
        from txcallme.errors import PublishNacked
        d = self.publisher.publish("", "q", b"x", {})
        self.broker.flush()
        [message] = self.broker.peer.published
        self.broker.peer.nack(message.channel, message.seq)
        self.broker.flush()
        self.failureResultOf(d, PublishNacked)

    def test_connection_loss_is_publish_lost(self) -> None:
        """An unconfirmed message whose connection drops fails with PublishLost."""
        from txcallme.errors import PublishLost
        d = self.publisher.publish("", "q", b"x", {})
        self.broker.flush()
        self.broker.peer.drop()
        self.broker.flush()
        self.failureResultOf(d, PublishLost)

    def test_replay_after_404(self) -> None:
        """A 404 fails the message to the missing exchange with NotFound; the unconfirmed
        others are published again, in order, on a new channel and confirmed."""
        self.broker.missing_exchanges.add("gone")
        warm_up = self.publisher.publish("", "q", b"warm-up", {})
        self.broker.flush()  # the channel is open now
        good = self.publisher.publish("", "q", b"good", {})
        bad = self.publisher.publish("gone", "k", b"bad", {})
        after = self.publisher.publish("", "q", b"after", {})
        self.broker.flush()
        self.failureResultOf(bad, NotFound)
        self.assertNoResult(good)
        last = self.broker.peer.published[-1]
        self.broker.peer.ack(last.channel, last.seq, multiple=True)
        self.broker.flush()
        self.successResultOf(warm_up)  # unconfirmed when the channel died: replayed too
        self.successResultOf(good)
        self.successResultOf(after)
        self.assertEqual([p.body for p in self.broker.peer.published],
                         [b"warm-up", b"good", b"bad",  # "after" was dropped with the channel
                          b"warm-up", b"good", b"after"])


class _ResolvingConnector:
    """A connector whose connect, like HostnameEndpoint's still resolving, fails with a
    DNS lookup error when cancelled."""

    def __init__(self, reactor: Any) -> None:
        self.attempts: list[Deferred[Any]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        from twisted.internet.error import DNSLookupError

        def cancel(d: Deferred[Any]) -> None:
            d.errback(DNSLookupError("Couldn't find the hostname '127.0.0.1'"))
        d: Deferred[Any] = Deferred(cancel)
        self.attempts.append(d)
        return d


class CancelledConnectTests(SynchronousTestCase):
    """Stopping a session while it is still connecting is quiet."""

    def test_stop_while_connecting_logs_nothing(self) -> None:
        """A connect cancelled by stop() logs no 'cannot connect' / DNS lookup failure."""
        from twisted.internet.task import Clock

        from txcallme.amqp import ConnectionParams
        from txcallme.amqp.session import Session
        connectors: list[_ResolvingConnector] = []

        def connector(reactor: Any) -> _ResolvingConnector:
            connectors.append(_ResolvingConnector(reactor))
            return connectors[-1]
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        session = Session(clock, ConnectionParams(hosts=(("127.0.0.1", 5672),),
                                                  connector=connector),
                          lambda c: Deferred.fromCoroutine(_nothing()), lambda e: None,
                          name="test")
        session.start()
        ready = session.ready()
        ready.addErrback(lambda f: None)
        self.successResultOf(session.stop())
        self.assertEqual(len(connectors[0].attempts), 1)
        self.assertEqual([e.get("log_format") for e in events
                          if e.get("log_namespace", "").startswith("callme")], [])
        self.assertEqual(clock.getDelayedCalls(), [])


async def _nothing() -> None:
    return None
