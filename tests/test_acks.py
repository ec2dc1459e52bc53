"""Acker: acks coalesced per reactor turn, never covering an unfinished delivery."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
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

    def nack(self, tag: int, requeue: bool) -> None:
        self.sent.append(("nack", tag, requeue))


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

    def test_released_tags_do_not_hold_acks_back(self) -> None:
        """A delivery given back (nack, requeued) is no longer open either."""
        self.acker.release(1)
        self.acker.ack(3)
        self.clock.advance(0)  # 2 is open
        self.acker.ack(2)
        self.clock.advance(0)
        self.assertEqual(self.channel.sent, [("nack", 1, True), ("ack", 3, False),
                                             ("ack", 2, True)])

    def test_flush_sends_now_and_leaves_no_timer(self) -> None:
        """flush() sends what waits and cancels the end-of-turn call."""
        self.acker.ack(1)
        self.acker.flush()
        self.assertEqual(self.channel.sent, [("ack", 1, True)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_out_of_order_completion(self) -> None:
        """Tags finishing in any order: each turn's multiple ack stops below the lowest open tag,
        and the tags above it go alone until the gap closes."""
        for tag in range(6, 11):
            self.acker.received(tag)
        self.acker.ack(3)
        self.acker.ack(5)
        self.clock.advance(0)  # 1 and 2 open: nothing below them
        self.assertEqual(self.channel.sent, [("ack", 3, False), ("ack", 5, False)])
        self.acker.ack(2)
        self.acker.ack(9)
        self.clock.advance(0)  # 1 still open
        self.assertEqual(self.channel.sent[2:], [("ack", 2, False), ("ack", 9, False)])
        self.acker.ack(1)
        self.acker.ack(7)
        self.clock.advance(0)  # now 4 is the lowest open: 1 goes as multiple (covers 2, 3)
        self.assertEqual(self.channel.sent[4:], [("ack", 1, True), ("ack", 7, False)])
        self.acker.ack(4)
        self.clock.advance(0)  # 6 is the lowest open
        self.assertEqual(self.channel.sent[6:], [("ack", 4, True)])
        self.acker.reject(6, requeue=False)
        self.acker.ack(8)
        self.clock.advance(0)  # 10 is the lowest open
        self.assertEqual(self.channel.sent[7:], [("reject", 6, False), ("ack", 8, True)])
        self.acker.ack(10)
        self.clock.advance(0)
        self.assertEqual(self.channel.sent[9:], [("ack", 10, True)])

    def test_long_open_tag_holds_back_many(self) -> None:
        """One delivery open while thousands after it finish: none of them is covered by a
        multiple ack until it finishes, and the bookkeeping does not keep them all."""
        for tag in range(2, 6):
            self.acker.ack(tag)
        self.clock.advance(0)
        for tag in range(6, 5006):
            self.acker.received(tag)
            self.acker.ack(tag)
            self.clock.advance(0)
        self.assertEqual(len(self.channel.sent), 5004)
        self.assertTrue(all(not multiple for _, _, multiple in self.channel.sent))
        self.assertLess(len(self.acker._order), 100)  # finished tags were dropped
        self.acker.received(5006)
        self.acker.ack(1)
        self.clock.advance(0)
        self.assertEqual(self.channel.sent[-1], ("ack", 1, True))
        self.acker.ack(5006)
        self.clock.advance(0)
        self.assertEqual(self.channel.sent[-1], ("ack", 5006, True))


    def test_tags_received_out_of_order(self) -> None:
        """Tags received out of increasing order still hold back the acks above them."""
        acker = Acker(self.channel, self.clock)  # type: ignore[arg-type]
        for tag in (7, 10, 3, 5):
            acker.received(tag)
        acker.ack(10)
        acker.ack(5)
        self.clock.advance(0)  # 3 is open: both go alone
        self.assertEqual(self.channel.sent, [("ack", 10, False), ("ack", 5, False)])
        acker.ack(3)
        self.clock.advance(0)  # 7 is open: one multiple ack up to 3 (which also covers 5)
        self.assertEqual(self.channel.sent[2:], [("ack", 3, True)])

class ReferenceAcker:
    """The plain algorithm: the lowest open tag is min() of the open set."""

    def __init__(self, channel: FakeChannel) -> None:
        self.channel, self.open, self.done = channel, set[int](), list[int]()

    def flush(self) -> None:
        done, self.done = self.done, []
        if not done:
            return
        self.open.difference_update(done)
        low = min(self.open) if self.open else None
        below = [t for t in done if low is None or t < low]
        if below:
            self.channel.ack(max(below), multiple=True)
        for tag in done:
            if low is not None and tag > low:
                self.channel.ack(tag)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["receive", "ack", "reject", "flush"]),
                          st.integers(0, 40)), max_size=120))
def test_same_acks_as_min_over_open_tags(steps: list[tuple[str, int]]) -> None:
    """Any interleaving of deliveries (in increasing tag order), acks and rejects in any
    order, and flushes, sends exactly what taking min() of the open tags would send."""
    clock, channel, reference_channel = Clock(), FakeChannel(), FakeChannel()
    acker = Acker(channel, clock)  # type: ignore[arg-type]
    reference = ReferenceAcker(reference_channel)
    next_tag, unfinished = 1, list[int]()
    for action, pick in steps:
        if action == "receive":
            acker.received(next_tag)
            reference.open.add(next_tag)
            unfinished.append(next_tag)
            next_tag += 1
        elif action == "flush":
            acker.flush()
            reference.flush()
        elif unfinished:
            tag = unfinished.pop(pick % len(unfinished))
            if action == "ack":
                acker.ack(tag)
                reference.done.append(tag)
            else:
                acker.reject(tag, requeue=True)
                reference.open.discard(tag)
                reference_channel.reject(tag, True)
        assert channel.sent == reference_channel.sent
    acker.flush()
    reference.flush()
    assert channel.sent == reference_channel.sent
