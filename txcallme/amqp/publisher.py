"""Publishing with publisher confirms, so a caller learns which messages the
broker took and which it refused.

A publish to an exchange that is missing (404) or forbidden (403) closes the
channel it was sent on, and the broker silently drops whatever was pipelined
after it. :class:`ConfirmedPublisher` keeps every unconfirmed message; when
its channel dies it fails the messages sent to the exchange the broker named,
and (with ``replay=True``) publishes the others again on a fresh channel, so
one bad destination never takes other messages down with it.

It is built on the channel's per-publish outcomes
(:attr:`~txcallme.amqp.channel.Channel.on_outcome`); the errors say which
outcome it was: :class:`~txcallme.errors.Unroutable` (returned),
:class:`~txcallme.errors.PublishNacked` (a ChannelError),
:class:`~txcallme.errors.PublishLost` (a BrokerConnectionLost: the channel or
connection died before the confirm, and the message was not re-published), or
the channel's own error (NotFound, AccessRefused) for the message that caused
the channel's close.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcallme.amqp.channel import Channel, Outcome, PublishOutcome, Returned
from txcallme.errors import (
    BrokerConnectionLost,
    CallmeError,
    ChannelError,
    PublishLost,
    PublishNacked,
    Unroutable,
)

log = Logger(namespace="callme.connection")

#: How many times one message is published again after channels died under it
#: (another message's refusal each time) before it fails with PublishLost.
MAX_REPLAYS = 5


@attrs.define(slots=True, eq=False)
class _Message:
    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    mandatory: bool
    done: Deferred[None]
    returned: Returned | None = None
    #: times it was published again after its channel died under it
    replays: int = 0


class ConfirmedPublisher:
    """Publishes on one confirming channel, opened on demand."""

    def __init__(self, open_channel: Callable[[], Deferred[Channel]], *,
                 replay: bool) -> None:
        self._open_channel = open_channel
        self._replay = replay
        self._channel: Channel | None = None
        self._opening: Deferred[Channel] | None = None
        self._waiting: list[_Message] = []
        self._unconfirmed: OrderedDict[int, _Message] = OrderedDict()
        self._lost: list[_Message] = []
        self._closed = False

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: dict[str, Any], mandatory: bool = False) -> Deferred[None]:
        """Fires when the broker confirms; fails with Unroutable (mandatory and
        nothing bound), AccessRefused/NotFound (the exchange), PublishNacked
        (a ChannelError), PublishLost or BrokerConnectionLost, EncodeError
        (names or properties AMQP cannot carry)."""
        message = _Message(exchange, routing_key, body, properties, mandatory, Deferred())
        if self._closed:
            message.done.errback(BrokerConnectionLost("publisher is closed"))
        else:
            self._send(message)
        return message.done

    @property
    def in_flight(self) -> int:
        return len(self._unconfirmed) + len(self._waiting)

    def _send(self, message: _Message) -> None:
        channel = self._channel
        if channel is None:
            self._waiting.append(message)
            self._ensure_channel()
            return
        # Record before the write: the confirm can arrive during it (in-memory broker).
        tag = channel.next_publish_seq
        self._unconfirmed[tag] = message
        try:
            sent = channel.publish(message.exchange, message.routing_key, message.body,
                                   message.properties, message.mandatory)
        except Exception as e:  # a name over 255 bytes, a channel closed under us
            if self._unconfirmed.get(tag) is message:
                del self._unconfirmed[tag]
            message.done.errback(e)
            return
        assert sent == tag, (sent, tag)

    def _ensure_channel(self) -> None:
        if self._opening is not None or self._closed:
            return
        self._opening = d = self._open_channel()

        async def configure(channel: Channel) -> Channel:
            await channel.confirm_select()
            return channel

        d.addCallback(lambda ch: Deferred.fromCoroutine(configure(ch)))
        d.addCallbacks(self._opened, self._open_failed)

    def _opened(self, channel: Channel) -> None:
        self._opening = None
        if self._closed:
            channel.close()
            return
        self._channel = channel
        channel.on_outcome = self._outcome
        channel.on_close.append(lambda error: self._channel_closed(channel, error))
        waiting, self._waiting = self._waiting, []
        for message in waiting:
            self._send(message)

    def _open_failed(self, reason: Failure) -> None:
        self._opening = None
        waiting, self._waiting = self._waiting, []
        for message in waiting:
            message.done.errback(reason)

    def _outcome(self, seq: int, outcome: PublishOutcome) -> None:
        message = self._unconfirmed.pop(seq, None)
        if message is None:
            return
        kind = outcome.kind
        if kind is Outcome.TAKEN:
            message.done.callback(None)
        elif kind is Outcome.RETURNED:
            r = outcome.returned
            assert r is not None
            message.returned = r
            message.done.errback(Unroutable(r.exchange, r.routing_key, r.reply_text))
        elif kind is Outcome.NACKED:
            message.done.errback(PublishNacked())
        else:  # LOST: decided when the channel's close arrives, right after
            self._lost.append(message)

    def _channel_closed(self, channel: Channel, error: CallmeError) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        pending = self._lost + list(self._unconfirmed.values())
        self._lost = []
        self._unconfirmed.clear()
        bad = getattr(error, "object", "")
        refused = isinstance(error, ChannelError)
        replayable = self._replay and refused and not self._closed
        # The broker names the default exchange "" as 'amq.default' in its errors.
        named = [m for m in pending if bad and (m.exchange or "amq.default") == bad]
        again: list[_Message] = []
        for index, message in enumerate(pending):
            # the refused one: named by the error, else (no name, or no message of
            # that name) the first pending one, so nothing is replayed forever
            culprit = refused and (message in named if named else index == 0)
            if culprit:
                message.done.errback(error)
            elif replayable and message.replays < MAX_REPLAYS:
                message.replays += 1
                again.append(message)
            else:
                message.done.errback(PublishLost(error))
        if again:
            log.info("re-publishing {n} messages after channel error {error}",
                     n=len(again), error=error)
            self._waiting[:0] = again
            self._ensure_channel()

    def close(self) -> Deferred[None]:
        """Fail what is unconfirmed (PublishLost) and close the channel."""
        self._closed = True
        error = PublishLost(text="publisher closed before the broker confirmed")
        for message in [*self._lost, *self._unconfirmed.values(), *self._waiting]:
            if not message.done.called:
                message.done.errback(error)
        self._unconfirmed.clear()
        self._lost.clear()
        self._waiting.clear()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.closed:
            return channel.close()
        return succeed(None)
