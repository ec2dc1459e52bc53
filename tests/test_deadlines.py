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

    def test_add_from_expire_keeps_the_timer_at_the_earliest(self) -> None:
        """An expiry that adds a later deadline (a retry) leaves the timer at the
        earliest pending deadline, not at the new one."""
        def expire(corr: str) -> None:
            self.expired.append(corr)
            if corr == "a":
                self.deadlines.add(self.clock.seconds() + 60, "retry")

        self.deadlines = Deadlines(self.clock, expire)
        self.deadlines.add(1.0, "a")
        self.deadlines.add(2.0, "b")
        self.clock.advance(1.0)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(1.0)
        self.assertEqual(self.expired, ["a", "b"])  # at 2 s, not at 61 s
        self.clock.advance(59.0)
        self.assertEqual(self.expired, ["a", "b", "retry"])

    def test_removed_entries_leave_the_heap_at_once(self) -> None:
        """remove() takes an entry out at once: the heap holds only pending deadlines,
        and the last removal leaves nothing in the clock."""
        entries = [self.deadlines.add(3600.0 + (i * 7919) % 1000, f"c{i}")
                   for i in range(10_000)]
        for entry in entries[::2]:
            self.deadlines.remove(entry)
        self.assertEqual(len(self.deadlines), 5_000)
        self.deadlines.remove(entries[0])  # twice: no effect
        self.assertEqual(len(self.deadlines), 5_000)
        for entry in entries[1::2]:
            self.deadlines.remove(entry)
        self.assertEqual(len(self.deadlines), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expiry_order_after_removals(self) -> None:
        """After arbitrary removals the rest still expire in deadline order."""
        entries = {corr: self.deadlines.add(when, corr)
                   for corr, when in [("e", 5.0), ("a", 1.0), ("d", 4.0), ("b", 2.0),
                                      ("c", 3.0)]}
        self.deadlines.remove(entries["a"])
        self.deadlines.remove(entries["d"])
        self.clock.advance(10.0)
        self.assertEqual(self.expired, ["b", "c", "e"])
