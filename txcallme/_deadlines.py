"""Call deadlines for a Proxy: one heap and one timer."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class Deadlines:
    """Call deadlines in one heap with a single timer, instead of a timer and
    timeout callbacks per call (cheaper per call and per pending call)."""

    def __init__(self, clock: Any, expire: Callable[[str], None]) -> None:
        self._clock = clock
        self._expire = expire
        self._heap: list[tuple[float, str]] = []
        self._timer: Any = None

    def add(self, deadline: float, corr: str) -> None:
        heapq.heappush(self._heap, (deadline, corr))
        if self._timer is None:
            self._timer = self._clock.callLater(deadline - self._clock.seconds(), self._fire)
        elif self._heap[0][1] == corr:  # earlier than what the timer waits for
            self._timer.reset(max(0.0, deadline - self._clock.seconds()))

    def clear(self) -> None:
        self._heap.clear()
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        heap = self._heap
        while heap and heap[0][0] <= now:
            self._expire(heapq.heappop(heap)[1])
        if heap and self._timer is None:
            self._timer = self._clock.callLater(heap[0][0] - now, self._fire)
