"""Unit tests for txcallme.amqp.publisher.ConfirmedPublisher, driven by a fake channel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from txcallme.amqp.channel import Outcome, PublishOutcome, Returned
from txcallme.amqp.publisher import ConfirmedPublisher
from txcallme.errors import (
    AccessRefused,
    BrokerConnectionLost,
    CallmeError,
    ChannelError,
    NotFound,
    PublishLost,
    Unroutable,
)

NOT_FOUND_TEXT = "NOT_FOUND - no exchange 'bad_ex' in vhost '/'"


class FakeChannel:
    """The part of txcallme.amqp.channel.Channel that ConfirmedPublisher uses."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        self.close_calls = 0
        self.confirming = False
        self.published: list[tuple[str, str, bytes, dict[str, Any], bool]] = []
        self.on_close: list[Callable[[CallmeError], None]] = []
        self.on_outcome: Callable[[int, PublishOutcome], None] | None = None
        self.unconfirmed: dict[int, tuple[str, str, Any]] = {}
        self.returns: dict[int, Returned] = {}
        self.confirm_select_result: Deferred[None] = succeed(None)

    def confirm_select(self) -> Deferred[None]:
        self.confirming = True
        return self.confirm_select_result

    @property
    def next_publish_seq(self) -> int:
        return len(self.published) + 1 if self.confirming else 0

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: dict[str, Any], mandatory: bool = False) -> int:
        assert not self.closed, "publish on a closed channel"
        assert self.confirming, "publish before confirm.select"
        if len(exchange.encode()) > 255:
            raise ValueError(f"shortstr longer than 255 bytes: {exchange[:40]!r}...")
        self.published.append((exchange, routing_key, body, properties, mandatory))
        seq = len(self.published)
        self.unconfirmed[seq] = (exchange, routing_key, properties.get("correlation_id"))
        return seq

    def close(self) -> Deferred[None]:
        self.close_calls += 1
        self.broker_closes(BrokerConnectionLost("channel closed by txcallme"))
        return succeed(None)

    # -- driven by the tests, as the broker would ----------------------------

    def ack(self, tag: int, multiple: bool = False) -> None:
        self._confirm(tag, multiple, True)

    def nack(self, tag: int, multiple: bool = False) -> None:
        self._confirm(tag, multiple, False)

    def _confirm(self, tag: int, multiple: bool, ok: bool) -> None:
        assert self.on_outcome is not None
        tags = sorted(t for t in self.unconfirmed if t <= tag) if multiple else (
            [tag] if tag in self.unconfirmed else [])
        for t in tags:
            del self.unconfirmed[t]
            returned = self.returns.pop(t, None)
            if not ok:
                outcome = PublishOutcome.NACKED
            elif returned is not None:
                outcome = PublishOutcome(Outcome.RETURNED, "312 NO_ROUTE", returned)
            else:
                outcome = PublishOutcome.TAKEN
            self.on_outcome(t, outcome)

    def basic_return(self, exchange: str, routing_key: str, corr: str) -> None:
        for t, key in sorted(self.unconfirmed.items()):
            if key == (exchange, routing_key, corr) and t not in self.returns:
                self.returns[t] = Returned(312, "NO_ROUTE", exchange, routing_key,
                                           {"correlation_id": corr})
                return

    def broker_closes(self, error: CallmeError) -> None:
        if self.closed:
            return
        self.closed = True
        lost = PublishOutcome(Outcome.LOST, str(error), error=error)
        for t in sorted(self.unconfirmed):
            if self.on_outcome is not None:
                self.on_outcome(t, lost)
        self.unconfirmed.clear()
        for callback in self.on_close:
            callback(error)

    def bodies(self) -> list[bytes]:
        return [body for _, _, body, _, _ in self.published]


class FakeConnection:
    """Opens FakeChannels; either at once or when the test says so."""

    def __init__(self, immediate: bool = True) -> None:
        self.immediate = immediate
        self.channels: list[FakeChannel] = []
        self.opening: list[Deferred[FakeChannel]] = []

    def open_channel(self) -> Deferred[FakeChannel]:
        channel = FakeChannel(len(self.channels) + 1)
        self.channels.append(channel)
        if self.immediate:
            return succeed(channel)
        d: Deferred[FakeChannel] = Deferred()
        self.opening.append(d)
        return d

    def finish_opening(self) -> FakeChannel:
        """Fire the oldest pending open with its channel."""
        d = self.opening.pop(0)
        channel = self.channels[len(self.channels) - len(self.opening) - 1]
        d.callback(channel)
        return channel


def props(corr: str) -> dict[str, Any]:
    return {"correlation_id": corr, "content_type": "application/json"}


class PublisherTestCase(SynchronousTestCase):
    """A publisher on a FakeConnection."""

    replay = True

    def setUp(self) -> None:
        self.connection = FakeConnection()
        self.publisher = ConfirmedPublisher(self.connection.open_channel,  # type: ignore[arg-type]
                                            replay=self.replay)

    def publish(self, exchange: str, body: bytes, mandatory: bool = False) -> Deferred[None]:
        return self.publisher.publish(exchange, "rk", body, props(body.decode()), mandatory)

    @property
    def channel(self) -> FakeChannel:
        return self.connection.channels[-1]


class OpeningTests(PublisherTestCase):
    """Publishing before and while the channel opens."""

    def setUp(self) -> None:
        super().setUp()
        self.connection.immediate = False

    def test_waits_for_channel(self) -> None:
        """A publish before the channel is open is sent once it is, in order."""
        d1 = self.publish("ex", b"1")
        d2 = self.publish("ex", b"2", mandatory=True)
        self.assertEqual(len(self.connection.channels), 1, "one channel opened, not two")
        self.assertEqual(self.publisher.in_flight, 2)
        self.assertNoResult(d1)
        channel = self.connection.finish_opening()
        self.assertEqual(channel.published, [
            ("ex", "rk", b"1", props("1"), False),
            ("ex", "rk", b"2", props("2"), True),
        ])
        self.assertNoResult(d1)
        channel.ack(1)
        channel.ack(2)
        self.assertIsNone(self.successResultOf(d1))
        self.assertIsNone(self.successResultOf(d2))
        self.assertEqual(self.publisher.in_flight, 0)

    def test_waits_for_confirm_select(self) -> None:
        """Nothing is sent until confirm.select is answered."""
        d = self.publish("ex", b"1")
        self.connection.immediate = True
        pending: Deferred[None] = Deferred()
        channel = self.connection.channels[0]
        channel.confirm_select_result = pending
        self.connection.finish_opening()
        self.assertEqual(channel.published, [])
        pending.callback(None)
        self.assertEqual(channel.bodies(), [b"1"])
        channel.ack(1)
        self.successResultOf(d)

    def test_open_failure(self) -> None:
        """If the channel cannot be opened, waiting publishes fail with the reason."""
        d = self.publish("ex", b"1")
        self.connection.opening.pop(0).errback(BrokerConnectionLost("gone"))
        self.failureResultOf(d, BrokerConnectionLost)
        self.assertEqual(self.publisher.in_flight, 0)

    def test_confirm_select_failure(self) -> None:
        """If confirm.select fails, waiting publishes fail with the reason."""
        d = self.publish("ex", b"1")
        self.connection.channels[0].confirm_select_result = Deferred()
        channel = self.connection.finish_opening()
        channel.confirm_select_result.errback(ChannelError(540, "NOT_IMPLEMENTED"))
        self.failureResultOf(d, ChannelError)

    def test_refused_publish_does_not_strand_others(self) -> None:
        """A message the channel refuses to encode fails alone; those queued behind it go out.

        Channel.publish raises synchronously (ValueError from the frame codec
        for a name over 255 bytes, or the close error on a closed channel).
        """
        d_bad = self.publish("x" * 256, b"1")
        d_good = self.publish("ex", b"2")
        channel = self.connection.finish_opening()
        self.failureResultOf(d_bad, ValueError)
        self.assertEqual(channel.bodies(), [b"2"])
        channel.ack(1)
        self.successResultOf(d_good)

    def test_refused_publish_returns_failed_deferred(self) -> None:
        """On an open channel, a publish the channel refuses fails its Deferred, not the caller."""
        self.publish("ex", b"1")
        channel = self.connection.finish_opening()
        d = self.publish("x" * 256, b"2")
        self.failureResultOf(d, ValueError)
        self.assertEqual(channel.bodies(), [b"1"])

    def test_reuses_channel(self) -> None:
        """Later publishes go on the same open channel."""
        self.publish("ex", b"1")
        channel = self.connection.finish_opening()
        self.publish("ex", b"2")
        self.assertEqual(len(self.connection.channels), 1)
        self.assertEqual(channel.bodies(), [b"1", b"2"])


class ConfirmTests(PublisherTestCase):
    """Acks, nacks and returns."""

    def test_ack(self) -> None:
        """An ack fires that message's Deferred, and only that one."""
        d1 = self.publish("ex", b"1")
        d2 = self.publish("ex", b"2")
        self.channel.ack(2)
        self.assertNoResult(d1)
        self.assertIsNone(self.successResultOf(d2))
        self.assertEqual(self.publisher.in_flight, 1)

    def test_multiple_ack(self) -> None:
        """multiple=True confirms every message up to and including the tag."""
        ds = [self.publish("ex", str(i).encode()) for i in range(1, 5)]
        self.channel.ack(3, multiple=True)
        for d in ds[:3]:
            self.assertIsNone(self.successResultOf(d))
        self.assertNoResult(ds[3])
        self.assertEqual(self.publisher.in_flight, 1)

    def test_unknown_ack_ignored(self) -> None:
        """An ack for a tag not in flight changes nothing."""
        d = self.publish("ex", b"1")
        self.channel.ack(7)
        self.assertNoResult(d)

    def test_nack(self) -> None:
        """A nack fails the message with ChannelError."""
        d = self.publish("ex", b"1")
        self.channel.nack(1)
        failure = self.failureResultOf(d, ChannelError)
        self.assertNotIsInstance(failure.value, (NotFound, AccessRefused))

    def test_multiple_nack(self) -> None:
        """A multiple nack fails every message up to the tag."""
        d1, d2, d3 = (self.publish("ex", b) for b in (b"1", b"2", b"3"))
        self.channel.nack(2, multiple=True)
        self.failureResultOf(d1, ChannelError)
        self.failureResultOf(d2, ChannelError)
        self.assertNoResult(d3)

    def test_returned_then_ack(self) -> None:
        """A basic.return followed by its ack fails with Unroutable."""
        d1 = self.publish("server_x_ex", b"1", mandatory=True)
        d2 = self.publish("server_x_ex", b"2", mandatory=True)
        self.channel.basic_return("server_x_ex", "rk", "2")
        self.channel.ack(2, multiple=True)
        self.assertIsNone(self.successResultOf(d1))
        failure = self.failureResultOf(d2, Unroutable)
        self.assertEqual((failure.value.exchange, failure.value.routing_key),
                         ("server_x_ex", "rk"))
        self.assertIn("NO_ROUTE", str(failure.value))

    def test_return_for_other_message_ignored(self) -> None:
        """A return that matches no unconfirmed message fails nothing."""
        d = self.publish("ex", b"1", mandatory=True)
        self.channel.basic_return("ex", "rk", "other")
        self.channel.basic_return("other_ex", "rk", "1")
        self.channel.ack(1)
        self.assertIsNone(self.successResultOf(d))


class ChannelClosedTests(PublisherTestCase):
    """The broker closes the channel while messages are unconfirmed (replay=True)."""

    def _publish_mixed(self) -> dict[bytes, Deferred[None]]:
        return {body: self.publish(exchange, body) for exchange, body in (
            ("good_ex", b"g1"), ("bad_ex", b"b1"), ("good_ex", b"g2"), ("bad_ex", b"b2"))}

    def test_replay(self) -> None:
        """Messages to the missing exchange fail with NotFound; others go on a new channel."""
        ds = self._publish_mixed()
        first = self.channel
        first.ack(1)
        self.assertIsNone(self.successResultOf(ds[b"g1"]))
        first.broker_closes(NotFound(404, NOT_FOUND_TEXT))
        for body in (b"b1", b"b2"):
            failure = self.failureResultOf(ds[body], NotFound)
            self.assertEqual(failure.value.object, "bad_ex")
        self.assertEqual(len(self.connection.channels), 2)
        second = self.channel
        self.assertIsNot(second, first)
        self.assertEqual([(ex, body) for ex, _, body, _, _ in second.published],
                         [("good_ex", b"g2")])
        self.assertNoResult(ds[b"g2"])
        first.ack(3)  # a stray confirm from the dead channel changes nothing
        self.assertNoResult(ds[b"g2"])
        second.ack(1)
        self.assertIsNone(self.successResultOf(ds[b"g2"]))
        self.assertEqual(self.publisher.in_flight, 0)

    def test_replay_before_new_publishes(self) -> None:
        """Replayed messages are sent before ones published while the channel reopened."""
        self.connection.immediate = False
        d_old = self.publish("good_ex", b"old")
        d_bad = self.publish("bad_ex", b"bad")
        first = self.connection.finish_opening()
        first.broker_closes(NotFound(404, NOT_FOUND_TEXT))
        self.failureResultOf(d_bad, NotFound)
        d_new = self.publish("good_ex", b"new")
        second = self.connection.finish_opening()
        self.assertEqual(second.bodies(), [b"old", b"new"])
        second.ack(2, multiple=True)
        self.successResultOf(d_old)
        self.successResultOf(d_new)

    def test_new_channel_used_afterwards(self) -> None:
        """After a channel error, later publishes use the new channel."""
        d_bad = self.publish("bad_ex", b"b1")
        self.channel.broker_closes(NotFound(404, NOT_FOUND_TEXT))
        self.failureResultOf(d_bad, NotFound)
        d = self.publish("good_ex", b"g1")
        self.assertEqual(len(self.connection.channels), 2)
        self.assertEqual(self.channel.bodies(), [b"g1"])
        self.channel.ack(1)
        self.successResultOf(d)

    def test_access_refused(self) -> None:
        """A 403 for one exchange fails its messages with AccessRefused and replays others."""
        d_bad = self.publish("server_bar_ex", b"b")
        d_good = self.publish("good_ex", b"g")
        self.channel.broker_closes(AccessRefused(
            403, "ACCESS_REFUSED - access to exchange 'server_bar_ex' in vhost 'v' "
                 "refused for user 'olivia'"))
        self.failureResultOf(d_bad, AccessRefused)
        self.assertEqual(self.channel.bodies(), [b"g"])
        self.channel.ack(1)
        self.successResultOf(d_good)

    def test_default_exchange_refused_by_name(self) -> None:
        """A 403 naming 'amq.default' (how RabbitMQ names the default exchange "",
        e.g. a Direct Reply-to reply without write on amq.default) fails the
        message published to "", and replays the others; it is not replayed."""
        d_direct = self.publish("", b"d")
        d_good = self.publish("good_ex", b"g")
        self.channel.broker_closes(AccessRefused(
            403, "ACCESS_REFUSED - access to exchange 'amq.default' in vhost '/' "
                 "refused for user 'carl'"))
        self.failureResultOf(d_direct, AccessRefused)
        self.assertEqual(self.channel.bodies(), [b"g"])
        self.channel.ack(1)
        self.successResultOf(d_good)
        self.assertEqual(len(self.connection.channels), 2)

    def test_named_object_matching_nothing_fails_first(self) -> None:
        """An error naming an exchange no pending message went to fails the oldest
        one (never replays everything again, which would loop)."""
        d1 = self.publish("ex", b"1")
        d2 = self.publish("ex", b"2")
        self.channel.broker_closes(NotFound(404, "NOT_FOUND - no exchange 'other_ex' "
                                                 "in vhost '/'"))
        self.failureResultOf(d1, NotFound)
        self.assertEqual(self.channel.bodies(), [b"2"])
        self.assertNoResult(d2)

    def test_replays_are_bounded(self) -> None:
        """A message whose channels keep dying under it (other messages' refusals)
        is published again at most MAX_REPLAYS times, then fails with PublishLost."""
        from txcallme.amqp.publisher import MAX_REPLAYS

        d = self.publish("good_ex", b"g")
        for n in range(MAX_REPLAYS + 1):
            bad = self.publish("bad_ex", b"b%d" % n)
            self.channel.broker_closes(NotFound(404, NOT_FOUND_TEXT))
            self.failureResultOf(bad, NotFound)
        self.failureResultOf(d, PublishLost)
        self.assertEqual(len(self.connection.channels), MAX_REPLAYS + 1)

    def test_no_named_object_fails_first(self) -> None:
        """A channel error naming no exchange fails the oldest message and replays the rest."""
        d1 = self.publish("ex", b"1")
        d2 = self.publish("ex", b"2")
        self.channel.broker_closes(ChannelError(406, "PRECONDITION_FAILED - whatever"))
        self.failureResultOf(d1, ChannelError)
        self.assertEqual(self.channel.bodies(), [b"2"])
        self.assertNoResult(d2)

    def test_connection_lost(self) -> None:
        """Losing the connection fails every unconfirmed message; nothing is replayed."""
        ds = self._publish_mixed()
        self.channel.broker_closes(BrokerConnectionLost("connection lost"))
        for d in ds.values():
            self.failureResultOf(d, BrokerConnectionLost)
        self.assertEqual(len(self.connection.channels), 1)
        self.assertEqual(self.publisher.in_flight, 0)


class NoReplayTests(PublisherTestCase):
    """The broker closes the channel while messages are unconfirmed (replay=False)."""

    replay = False

    def test_all_fail(self) -> None:
        """Without replay the culprit fails with the channel error, the others with PublishLost."""
        ds = [self.publish(ex, body) for ex, body in (
            ("good_ex", b"g1"), ("bad_ex", b"b1"), ("good_ex", b"g2"))]
        error = NotFound(404, NOT_FOUND_TEXT)
        self.channel.broker_closes(error)
        self.failureResultOf(ds[1], NotFound)
        for d in (ds[0], ds[2]):
            lost = self.failureResultOf(d, PublishLost).value
            self.assertIs(lost.cause, error)
        self.assertEqual(len(self.connection.channels), 1)
        self.assertEqual(self.publisher.in_flight, 0)

    def test_later_publish_opens_new_channel(self) -> None:
        """After a failed channel the next publish opens a fresh one."""
        d_bad = self.publish("bad_ex", b"b1")
        self.channel.broker_closes(NotFound(404, NOT_FOUND_TEXT))
        self.failureResultOf(d_bad, NotFound)
        d = self.publish("good_ex", b"g1")
        self.assertEqual(len(self.connection.channels), 2)
        self.channel.ack(1)
        self.successResultOf(d)


class CloseTests(PublisherTestCase):
    """ConfirmedPublisher.close."""

    def test_close_fails_unconfirmed(self) -> None:
        """close() fails unconfirmed messages and closes the channel."""
        d1 = self.publish("ex", b"1")
        d2 = self.publish("ex", b"2")
        self.channel.ack(1)
        channel = self.channel
        self.successResultOf(self.publisher.close())
        self.successResultOf(d1)
        self.failureResultOf(d2, BrokerConnectionLost)
        self.assertEqual(channel.close_calls, 1)
        self.assertEqual(self.publisher.in_flight, 0)
        self.assertEqual(len(self.connection.channels), 1, "no replay after close")

    def test_close_fails_waiting(self) -> None:
        """close() fails messages still waiting for a channel; the late channel is closed."""
        self.connection.immediate = False
        d = self.publish("ex", b"1")
        self.successResultOf(self.publisher.close())
        self.failureResultOf(d, BrokerConnectionLost)
        channel = self.connection.finish_opening()
        self.assertEqual(channel.published, [])
        self.assertEqual(channel.close_calls, 1)

    def test_publish_after_close(self) -> None:
        """Publishing after close() fails at once and opens nothing."""
        self.successResultOf(self.publisher.close())
        self.failureResultOf(self.publish("ex", b"1"), BrokerConnectionLost)
        self.assertEqual(self.connection.channels, [])

    def test_close_twice(self) -> None:
        """close() may be called twice."""
        d = self.publish("ex", b"1")
        self.successResultOf(self.publisher.close())
        self.successResultOf(self.publisher.close())
        self.failureResultOf(d, BrokerConnectionLost)
