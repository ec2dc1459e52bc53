"""One confirming channel per destination server for a Proxy's requests.

A publish to a missing (404) or forbidden (403) exchange closes its channel,
and the broker drops whatever was pipelined after it on that channel. Giving
each destination server its own channel confines that to the calls made to
that server. The channel is in confirm mode, so the Proxy knows which
requests the broker took: those keep waiting for their replies whatever
happens to the channel later; only a request that came back (basic.return),
was nacked, or was still unconfirmed when the channel died counts as refused.

Per request this costs one ``(tag, correlation id)`` tuple in a deque, no
Deferred; the broker's ``multiple`` acks pop runs of them at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure

from txcallme.amqp import Channel, Connection, Returned
from txcallme.errors import CallmeError

#: (confirm tag, correlation id) of a request the broker has not confirmed yet
Sent = tuple[int, str]


class Destination:
    """The request channel for one server id, opened on first use.

    Callbacks into the owner:

    - *returned(destination, corr)*: a request came back unroutable;
    - *refused(destination, sent, error)*: the broker nacked requests
      (``sent`` lists ``(tag, corr)``), or the channel failed to open or was
      closed before confirming them (their fate is unknown to the broker's
      client; a 404/403 names the destination as the culprit);
    - *closed(destination, error)*: after *refused*, when the channel is gone.
    """

    def __init__(self, connection: Connection, exchange: str, routing_key: str,
                 returned: Callable[[Destination, str], None],
                 refused: Callable[[Destination, list[Sent], CallmeError], None],
                 closed: Callable[[Destination, CallmeError], None]) -> None:
        self._connection = connection
        self.exchange = exchange
        self.routing_key = routing_key
        self._returned = returned
        self._refused = refused
        self._closed = closed
        self.channel: Channel | None = None
        self.dead = False
        self._opening = False
        self._tag = 0
        self._waiting: list[tuple[str, bytes, dict[str, Any]]] = []
        self._unconfirmed: deque[Sent] = deque()

    @property
    def unconfirmed(self) -> int:
        """Requests sent or waiting to be sent, not confirmed yet."""
        return len(self._unconfirmed) + len(self._waiting)

    def send(self, corr: str, body: bytes, properties: dict[str, Any]) -> None:
        """Publish now if the channel is open, else when it is.

        The outcome comes back through the callbacks, possibly before this
        returns (an in-memory broker answers synchronously).
        """
        channel = self.channel
        if channel is None:
            if self.dead:
                self._refused(self, [(0, corr)], CallmeError("the request channel is closed"))
                return
            self._waiting.append((corr, body, properties))
            if not self._opening:
                self._opening = True
                d = self._connection.open_channel()
                d.addCallback(self._configure)
                d.addCallbacks(self._opened, self._open_failed)
            return
        # Only this object publishes on the channel, in confirm mode from the
        # start: the broker's tag is our count. Record it before writing, as
        # the confirm may arrive during the write.
        self._tag += 1
        entry = (self._tag, corr)
        self._unconfirmed.append(entry)
        try:
            channel.publish(self.exchange, self.routing_key, body, properties, True)
        except Exception as e:  # closed under us
            if self._unconfirmed and self._unconfirmed[-1] is entry:
                self._unconfirmed.pop()
                self._refused(self, [entry], e if isinstance(e, CallmeError)
                              else CallmeError(f"cannot publish the request: {e}"))

    def forget(self, corr: str) -> None:
        """A call ended before its request was written: never write it."""
        self._waiting = [w for w in self._waiting if w[0] != corr]

    def _configure(self, channel: Channel) -> Any:
        d = channel.confirm_select()
        d.addCallback(lambda _: channel)

        def failed(reason: Failure) -> Failure:
            channel.close()
            return reason
        d.addErrback(failed)
        return d

    def _opened(self, channel: Channel) -> None:
        self._opening = False
        if self.dead:
            channel.close()
            return
        self.channel = channel
        channel.on_return = self._on_return
        channel.on_confirm = self._on_confirm
        channel.on_close.append(lambda error: self._on_close(channel, error))
        waiting, self._waiting = self._waiting, []
        for corr, body, properties in waiting:
            self.send(corr, body, properties)  # after a close, each is refused at once

    def _open_failed(self, reason: Failure) -> None:
        self._opening = False
        error = reason.value
        self._die(error if isinstance(error, CallmeError) else CallmeError(str(error)))

    def _on_return(self, message: Returned) -> None:
        corr = message.properties.get("correlation_id")
        if isinstance(corr, str):
            self._returned(self, corr)

    def _on_confirm(self, tag: int, multiple: bool, ok: bool) -> None:
        pending = self._unconfirmed
        done: list[Sent] = []
        if multiple:
            while pending and pending[0][0] <= tag:
                done.append(pending.popleft())
        elif pending and pending[0][0] == tag:
            done.append(pending.popleft())
        else:  # out of order: rare
            for entry in pending:
                if entry[0] == tag:
                    pending.remove(entry)
                    done.append(entry)
                    break
        if not ok and done:
            self._refused(self, done, CallmeError("the broker refused the request (nack)"))

    def _on_close(self, channel: Channel, error: CallmeError) -> None:
        if self.channel is channel:
            self.channel = None
            self._die(error)

    def _die(self, error: CallmeError) -> None:
        self.dead = True
        lost = list(self._unconfirmed)
        self._unconfirmed.clear()
        lost.extend((0, corr) for corr, _, _ in self._waiting)
        self._waiting.clear()
        if lost:
            self._refused(self, lost, error)
        self._closed(self, error)

    def close(self) -> None:
        """Close the channel; nothing is reported for what it held."""
        self.dead = True
        self._waiting.clear()
        self._unconfirmed.clear()
        channel, self.channel = self.channel, None
        if channel is not None and not channel.closed:
            channel.close()
