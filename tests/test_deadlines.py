"""The Proxy's deadline heap: one timer, expiries in order, nothing left in the clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txcallme._deadlines import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.expired: list[str] = []
        self.deadlines = Deadlines(self.clock, self.expired.append)

    def test_expire_in_order_with_one_timer(self) -> None:
        """Deadlines expire in time order, with at most one delayed call at a time."""
        self.deadlines.add(5.0, "b")
        self.deadlines.add(3.0, "a")  # earlier than the timer's: it is moved up
        self.deadlines.add(7.0, "c")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(3.0)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(2.0)
        self.assertEqual(self.expired, ["a", "b"])
        self.clock.advance(2.0)
        self.assertEqual(self.expired, ["a", "b", "c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_same_deadline_expires_together(self) -> None:
        """Calls sharing a deadline expire in one timer run."""
        for corr in "xyz":
            self.deadlines.add(1.0, corr)
        self.clock.advance(1.0)
        self.assertEqual(sorted(self.expired), ["x", "y", "z"])

    def test_clear_cancels_the_timer(self) -> None:
        """clear() forgets every deadline and leaves nothing in the clock."""
        self.deadlines.add(1.0, "a")
        self.deadlines.clear()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(2.0)
        self.assertEqual(self.expired, [])
