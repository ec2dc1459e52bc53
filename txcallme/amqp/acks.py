"""Acknowledging a server's requests, coalesced per reactor turn.

Requests finished in the same reactor turn whose delivery tags are below every
tag still open are acknowledged with one ``basic.ack`` (``multiple``); the
others one by one. Fewer frames for the broker, and no request acked before it
is finished.
"""

from __future__ import annotations

from typing import Any

from txcallme.amqp.channel import Channel


class Acker:
    """Acks and rejects for the deliveries of one consuming channel."""

    def __init__(self, channel: Channel, clock: Any) -> None:
        self.channel = channel
        self._clock = clock
        self._open: set[int] = set()
        self._done: list[int] = []
        self._flush_call: Any = None

    def received(self, tag: int) -> None:
        """A delivery that will be acked or rejected later."""
        self._open.add(tag)

    def ack(self, tag: int) -> None:
        """Acknowledge *tag* at the end of this reactor turn."""
        self._done.append(tag)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)

    def reject(self, tag: int, requeue: bool) -> None:
        self._open.discard(tag)
        self.channel.reject(tag, requeue)

    def flush(self) -> None:
        """Send the acks waiting for the end of the turn now."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        done, self._done = self._done, []
        if not done:
            return
        still_open = self._open
        still_open.difference_update(done)
        lowest_open = min(still_open) if still_open else None
        below = [t for t in done if lowest_open is None or t < lowest_open]
        if below:
            self.channel.ack(max(below), multiple=True)
        if len(below) < len(done):
            for tag in done:
                if lowest_open is not None and tag > lowest_open:
                    self.channel.ack(tag)
