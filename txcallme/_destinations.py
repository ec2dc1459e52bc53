"""One confirming channel per destination server for a Proxy's requests.

A publish to a missing (404) or forbidden (403) exchange closes its channel,
and the broker drops whatever was pipelined after it on that channel. Giving
each destination server its own channel confines that to the calls made to
that server. The channel is in confirm mode and tells the outcome of each
publish (:class:`~txcallme.amqp.PublishOutcome`), so the Proxy knows which
requests the broker took: those keep waiting for their replies whatever
happens to the channel later. A request counts as refused only when it came
back (basic.return), was nacked, was never written, or is the one whose
publish the broker refused (404/403) when it closed the channel.

A request still unconfirmed when the broker closes the channel is of unknown
fate: the broker handles a channel's publishes in order, so those written
before the refused one were routed (and may be running), those after it were
dropped. The refused one cannot be told apart from the ones after it, but the
last one written is always one of the two (never run): only that one is
refused; the others are reported *lost* and their calls keep waiting for their
replies (which come on the reply queue, not on this channel) until their own
timeouts. When the whole connection is lost, every unconfirmed request is
refused with that error at once (the Proxy fails in-flight calls then anyway).

That ambiguity is kept to a race (the exchange deleted between two publishes):
until the broker has given an outcome for one request on a channel (so the
exchange existed), only one request at a time is written on it and the others
wait. A 404/403 then refuses exactly the one written; the waiting ones were
never written and are refused with it, so a Proxy that calls a missing server,
or reconnects before its servers have declared their exchanges again, knows
every request's fate at once (and may publish it again).

Per request this costs one entry in a dict (confirm number -> correlation
id), no Deferred.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure

from txcallme._wire import DIRECT_REPLY_TO
from txcallme.amqp import Channel, Connection, Delivery, Outcome, PublishOutcome
from txcallme.errors import BrokerConnectionLost, CallmeError, ChannelError

#: (confirm number, correlation id) of a request
Sent = tuple[int, str]


class Destination:
    """The request channel for one server id, opened on first use.

    Callbacks into the owner:

    - *returned(destination, corr)*: a request came back unroutable;
    - *refused(destination, sent, error)*: the broker nacked requests, or the
      channel failed to open or died before confirming them (a 404/403 names
      the destination's exchange);
    - *lost(destination, sent, error)*: the channel died before the broker
      confirmed these requests, which may have been routed: their fate is
      unknown (they must not be reported as refused);
    - *closed(destination, error)*: when the channel is gone.

    *taken(destination)* is called once at the next request the broker takes
    after :attr:`want_taken` is set.

    With *replies*, the channel also consumes RabbitMQ's Direct Reply-to
    pseudo-queue (no-ack) before the first request, and hands each reply to it.
    """

    def __init__(self, connection: Connection, exchange: str, routing_key: str,
                 returned: Callable[[Destination, str], None],
                 refused: Callable[[Destination, list[Sent], CallmeError], None],
                 closed: Callable[[Destination, CallmeError], None], *,
                 replies: Callable[[Delivery], None] | None = None,
                 taken: Callable[[Destination], None] | None = None,
                 lost: Callable[[Destination, list[Sent], CallmeError], None] | None = None,
                 server_id: str | None = None) -> None:
        self._connection = connection
        self._replies = replies
        self._taken = taken
        #: call *taken(destination)* at the next request the broker takes
        self.want_taken = False
        self.exchange = exchange
        self.routing_key = routing_key
        #: the server id its requests are for (the routing key unless given)
        self.server_id = routing_key if server_id is None else server_id
        self._returned = returned
        self._refused = refused
        self._closed = closed
        self._lost = lost
        self.channel: Channel | None = None
        self.dead = False
        self._opening = False
        self._seq = 0
        #: requests not written yet: the channel is opening, or no outcome has
        #: come on it yet and one request is already written
        self._waiting: deque[tuple[str, bytes, dict[str, Any]]] = deque()
        self._sent: dict[int, str] = {}
        #: the broker gave an outcome on this channel: its exchange existed
        self._known = False
        self._flushing = False
        self._publishing = False
        #: unconfirmed when the broker closed the channel with a 404/403: one of
        #: them (or one before them) was refused; decided when the channel closes
        self._closed_on: list[Sent] = []

    @property
    def unconfirmed(self) -> int:
        """Requests sent or waiting to be sent, not confirmed yet."""
        return len(self._sent) + len(self._waiting)

    def send(self, corr: str, body: bytes, properties: dict[str, Any]) -> int:
        """Publish now if the channel is open, else when it is; return the
        request's confirm number (0 while it waits for the channel).

        The outcome comes back through the callbacks, possibly before this
        returns (an in-memory broker answers synchronously).
        """
        channel = self.channel
        if channel is None:
            if self.dead:
                self._refused(self, [(0, corr)], CallmeError("the request channel is closed"))
                return 0
            self._waiting.append((corr, body, properties))
            if not self._opening:
                self._opening = True
                d = self._connection.open_channel()
                d.addCallback(self._configure)
                d.addCallbacks(self._opened, self._open_failed)
            return 0
        if not self._known and (self._sent or self._publishing):
            self._waiting.append((corr, body, properties))  # one at a time, for now
            return 0
        # Only this object publishes on the channel, in confirm mode from the
        # start: publish() numbers them 1, 2, ... Record the number before
        # writing, as the outcome may arrive during the write.
        self._seq = seq = self._seq + 1
        self._sent[seq] = corr
        self._publishing = True
        try:
            channel.publish(self.exchange, self.routing_key, body, properties, True)
        except Exception as e:  # closed under us, or unencodable
            self._seq -= 1
            if self._sent.pop(seq, None) is not None:
                self._refused(self, [(seq, corr)], e if isinstance(e, CallmeError)
                              else CallmeError(f"cannot publish the request: {e}"))
            return 0
        finally:
            self._publishing = False
        if self._known and self._waiting:
            self._flush()  # the outcome came during the write
        return seq

    def _flush(self) -> None:
        """Write the waiting requests the channel may take now."""
        if self._flushing:
            return
        self._flushing = True
        try:
            waiting = self._waiting
            while waiting and self.channel is not None and (self._known or not self._sent):
                self.send(*waiting.popleft())
        finally:
            self._flushing = False

    def withdraw(self, corr: str, seq: int) -> None:
        """A call ended before its request was written: never write it
        (waiting for the channel, or held while the connection is blocked)."""
        if seq == 0:
            if self._waiting:
                self._waiting = deque(w for w in self._waiting if w[0] != corr)
            return
        channel = self.channel
        if channel is not None and self._connection.blocked_reason is not None \
                and self._sent.get(seq) == corr and channel.withdraw(seq):
            del self._sent[seq]

    def _configure(self, channel: Channel) -> Any:
        d = channel.confirm_select()
        replies = self._replies
        if replies is not None:  # Direct Reply-to: consumed on the publishing channel
            d.addCallback(lambda _: channel.consume(DIRECT_REPLY_TO, replies, no_ack=True))
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
        channel.on_outcome = self._on_outcome
        channel.on_close.append(lambda error: self._on_close(channel, error))
        self._flush()  # after a close, each is refused at once

    def _open_failed(self, reason: Failure) -> None:
        self._opening = False
        error = reason.value
        self._die(error if isinstance(error, CallmeError) else CallmeError(str(error)))

    def _on_outcome(self, seq: int, outcome: PublishOutcome) -> None:
        corr = self._sent.pop(seq, None)
        if corr is None:
            return
        kind = outcome.kind
        if not self._known and kind is not Outcome.LOST:
            self._known = True  # the exchange existed: pipeline from now on
            if self._waiting and not self._publishing:
                self._flush()
        if kind is Outcome.TAKEN:
            if self.want_taken:
                self.want_taken = False
                if self._taken is not None:
                    self._taken(self)
            return
        if kind is Outcome.RETURNED:
            self._returned(self, corr)
        elif kind is Outcome.NACKED:
            self._refused(self, [(seq, corr)],
                          CallmeError("the broker refused the request (nack)"))
        else:  # LOST: the channel or connection died before the confirm
            error = outcome.error
            if not isinstance(error, CallmeError):
                error = CallmeError(outcome.reason or "request lost")
            if isinstance(error, ChannelError):
                # the broker closed the channel: maybe routed, maybe this one's
                # refusal, maybe dropped after it; decided in _die
                self._closed_on.append((seq, corr))
            elif isinstance(error, BrokerConnectionLost):
                # the connection is gone (the Proxy fails its in-flight calls)
                self._refused(self, [(seq, corr)], error)
            else:
                self._report_lost([(seq, corr)], error)

    def _on_close(self, channel: Channel, error: CallmeError) -> None:
        if self.channel is channel:
            self.channel = None
            self._die(error)

    def _die(self, error: CallmeError) -> None:
        self.dead = True
        unknown, self._closed_on = self._closed_on, []
        unknown.extend(self._sent.items())  # written, and no outcome came
        self._sent.clear()
        refused = [(0, corr) for corr, _, _ in self._waiting]  # never written
        self._waiting.clear()
        if unknown and isinstance(error, ChannelError) and error.code in (403, 404):
            # the broker refused a publish of this channel (all go to one
            # exchange): the last one written is the refused one or was dropped
            # after it, never run; those before it may have been routed
            unknown.sort()
            refused.insert(0, unknown.pop())
        elif unknown and isinstance(error, BrokerConnectionLost):
            refused[:0] = unknown  # the connection is gone
            unknown = []
        if unknown:
            self._report_lost(unknown, error)
        if refused:
            self._refused(self, refused, error)
        self._closed(self, error)

    def _report_lost(self, sent: list[Sent], error: CallmeError) -> None:
        if self._lost is not None:
            self._lost(self, sent, error)

    def close(self) -> None:
        """Close the channel; nothing is reported for what it held."""
        self.dead = True
        self._waiting.clear()
        self._sent.clear()
        self._closed_on.clear()
        channel, self.channel = self.channel, None
        if channel is not None and not channel.closed:
            channel.close()
