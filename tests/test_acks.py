"""Acker: acks coalesced per reactor turn, never covering an unfinished delivery."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txcallme.amqp.acks import Acker


class FakeChannel:
    """Records the acks and rejects written to it."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.sent.append(("ack", tag, multiple))

    def reject(self, tag: int, requeue: bool) -> None:
        self.sent.append(("reject", tag, requeue))


class AckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.channel = FakeChannel()
        self.acker = Acker(self.channel, self.clock)  # type: ignore[arg-type]
        for tag in range(1, 6):
            self.acker.received(tag)

    def test_contiguous_acks_become_one_multiple_ack(self) -> None:
        """Tags finished in one turn below every open tag go out as one multiple ack."""
        for tag in (2, 1, 3):
            self.acker.ack(tag)
        self.assertEqual(self.channel.sent, [])  # not before the end of the turn
        self.clock.advance(0)
        self.assertEqual(self.channel.sent, [("ack", 3, True)])

    def test_acks_above_an_open_tag_go_one_by_one(self) -> None:
        """A finished tag above an unfinished one is acked alone, so the open one is not."""
        self.acker.ack(1)
        self.acker.ack(4)
        self.clock.advance(0)
        self.assertEqual(self.channel.sent, [("ack", 1, True), ("ack", 4, False)])
        self.acker.ack(2)
        self.acker.ack(3)
        self.acker.ack(5)
        self.clock.advance(0)
        self.assertEqual(self.channel.sent[2:], [("ack", 5, True)])

    def test_rejected_tags_do_not_hold_acks_back(self) -> None:
        """A rejected delivery is no longer open: later tags can be acked as multiple."""
        self.acker.reject(1, requeue=True)
        self.acker.ack(2)
        self.clock.advance(0)
        self.assertEqual(self.channel.sent, [("reject", 1, True), ("ack", 2, True)])

    def test_flush_sends_now_and_leaves_no_timer(self) -> None:
        """flush() sends what waits and cancels the end-of-turn call."""
        self.acker.ack(1)
        self.acker.flush()
        self.assertEqual(self.channel.sent, [("ack", 1, True)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
