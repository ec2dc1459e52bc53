"""Acknowledging a server's requests, coalesced per reactor turn.

Requests finished in the same reactor turn whose delivery tags are below every
tag still open are acknowledged with one ``basic.ack`` (``multiple``); the
others one by one. Fewer frames for the broker, and no request acked before it
is finished.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from typing import Any

from txcallme.amqp.channel import Channel


class Acker:
    """Acks and rejects for the deliveries of one consuming channel.

    The open tags are a set (what is open) and a deque of tags in increasing
    order (which is lowest): delivery tags arrive in increasing order, so
    received() appends; finished tags leave the deque lazily, when they reach
    its front, and the deque is rebuilt when finished tags stuck behind a
    long-open one outnumber the open ones.
    """

    def __init__(self, channel: Channel, clock: Any) -> None:
        self.channel = channel
        self._clock = clock
        self._open: set[int] = set()
        self._order: deque[int] = deque()  # sorted; holds every open tag, and finished ones
        self._done: list[int] = []
        self._flush_call: Any = None

    def received(self, tag: int) -> None:
        """A delivery that will be acked or rejected later."""
        self._open.add(tag)
        order = self._order
        if order and tag < order[-1]:
            insort(order, tag)  # not in increasing order (never seen from a broker)
        else:
            order.append(tag)

    def ack(self, tag: int) -> None:
        """Acknowledge *tag* at the end of this reactor turn."""
        self._done.append(tag)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)

    def reject(self, tag: int, requeue: bool) -> None:
        """The request failed (basic.reject: RabbitMQ 4.3 counts it toward a
        quorum queue's delivery limit)."""
        self._open.discard(tag)
        self.channel.reject(tag, requeue)

    def release(self, tag: int) -> None:
        """Give an unprocessed request back to the queue (basic.nack with
        requeue: not counted toward a delivery limit)."""
        self._open.discard(tag)
        self.channel.nack(tag, requeue=True)

    def _lowest_open(self) -> int | None:
        """The lowest open tag, or None."""
        still_open, order = self._open, self._order
        while order and order[0] not in still_open:
            order.popleft()
        if len(order) > 2 * len(still_open) + 64:
            # finished tags stuck behind a long-open one: drop them (the deque stays sorted)
            self._order = order = deque(t for t in order if t in still_open)
        return order[0] if order else None

    def flush(self) -> None:
        """Send the acks waiting for the end of the turn now."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        done, self._done = self._done, []
        if not done:
            return
        self._open.difference_update(done)
        lowest_open = self._lowest_open()
        below = [t for t in done if lowest_open is None or t < lowest_open]
        if below:
            self.channel.ack(max(below), multiple=True)
        if len(below) < len(done):
            for tag in done:
                if lowest_open is not None and tag > lowest_open:
                    self.channel.ack(tag)
