"""Call deadlines for a Proxy: one indexed heap and one timer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Deadline:
    """A handle on one entry of :class:`Deadlines` (to remove it)."""

    __slots__ = ("when", "corr", "index")

    def __init__(self, when: float, corr: str, index: int) -> None:
        self.when = when
        self.corr = corr
        self.index = index


class Deadlines:
    """Call deadlines in one heap with a single timer, instead of a timer and
    timeout callbacks per call (cheaper per call and per pending call).

    The heap is indexed: :meth:`remove` takes a finished call's entry out at
    once (O(log n)), so the heap only ever holds pending calls. The timer
    always waits for the earliest deadline, also when *expire* adds or
    removes entries while the timer is being handled.
    """

    def __init__(self, clock: Any, expire: Callable[[str], None]) -> None:
        self._clock = clock
        self._expire = expire
        self._heap: list[Deadline] = []
        self._timer: Any = None
        self._firing = False

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, corr: str) -> Deadline:
        heap = self._heap
        entry = Deadline(when, corr, len(heap))
        heap.append(entry)
        self._up(entry.index)
        if not self._firing and heap[0] is entry:
            self._schedule()
        return entry

    def remove(self, entry: Deadline) -> None:
        heap = self._heap
        index = entry.index
        if index < 0 or index >= len(heap) or heap[index] is not entry:
            return
        entry.index = -1
        last = heap.pop()
        if last is not entry:
            heap[index] = last
            last.index = index
            self._down(index)
            self._up(last.index)
        if not heap and not self._firing:
            self._cancel()  # nothing left to wait for: nothing left in the clock

    def clear(self) -> None:
        for entry in self._heap:
            entry.index = -1
        self._heap.clear()
        self._cancel()

    # -- the timer -----------------------------------------------------------

    def _cancel(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        """Wait for the earliest deadline (and only it)."""
        delay = max(0.0, self._heap[0].when - self._clock.seconds())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self._clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._firing = True
        try:
            now = self._clock.seconds()
            heap = self._heap
            while heap and heap[0].when <= now:
                entry = heap[0]
                self.remove(entry)
                self._expire(entry.corr)  # may add or remove entries
        finally:
            self._firing = False
            if self._heap:
                self._schedule()
            else:
                self._cancel()

    # -- heap maintenance ----------------------------------------------------

    def _up(self, index: int) -> None:
        heap = self._heap
        entry = heap[index]
        while index > 0:
            parent = (index - 1) >> 1
            above = heap[parent]
            if above.when <= entry.when:
                break
            heap[index] = above
            above.index = index
            index = parent
        heap[index] = entry
        entry.index = index

    def _down(self, index: int) -> None:
        heap = self._heap
        size = len(heap)
        entry = heap[index]
        while True:
            child = 2 * index + 1
            if child >= size:
                break
            if child + 1 < size and heap[child + 1].when < heap[child].when:
                child += 1
            below = heap[child]
            if entry.when <= below.when:
                break
            heap[index] = below
            below.index = index
            index = child
        heap[index] = entry
        entry.index = index
