"""Typed, Deferred-returning views of an AMQP connection and its channels.

:class:`Channel` wraps a txamqp channel: control methods go through txamqp's
RPC machinery (and come back as txcallme errors), while the per-call methods
(publish, ack, reject) write precomputed frames directly. Deliveries, returns
and publisher confirms arrive as synchronous callbacks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txcallme.amqp import codec as _codec
from txcallme.amqp import frames as _frames
from txcallme.amqp import properties as _properties
from txcallme.errors import BrokerConnectionLost, CallmeError, channel_error

log = Logger(namespace="callme.connection")

_ACK_ARGS = struct.Struct(">QB")


@attrs.define(slots=True)
class Delivery:
    """A message delivered to a consumer."""

    body: bytes
    properties: dict[str, Any]
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    consumer_tag: str
    #: why the message could not be read whole (oversized, bad properties), or None
    problem: str | None = None
    size: int = 0


@attrs.define(slots=True)
class Returned:
    """A mandatory message the broker could not route (basic.return)."""

    reply_code: int
    reply_text: str
    exchange: str
    routing_key: str
    properties: dict[str, Any]


def _broker_error(exc: Exception) -> CallmeError:
    """Turn txamqp's Closed(Message) / other exceptions into txcallme errors."""
    if isinstance(exc, CallmeError):
        return exc
    reason = exc.args[0] if exc.args else None
    code = getattr(reason, "reply_code", None)
    if code is not None and reason is not None:
        text = reason.reply_text
        return channel_error(code, text.decode() if isinstance(text, bytes) else str(text))
    return BrokerConnectionLost(f"channel closed: {reason!r}")


class Channel:
    """One AMQP channel. Create with :meth:`Connection.open_channel`."""

    def __init__(self, connection: Connection, txchannel: Any) -> None:
        self.connection = connection
        self.id: int = txchannel.id
        self._ch = txchannel
        self._proto = connection.protocol
        self.closed = False
        self.close_error: CallmeError | None = None
        self.confirming = False
        self._next_tag = 0
        self._consumers: dict[str, Callable[[Delivery], None]] = {}
        self.on_close: list[Callable[[CallmeError], None]] = []
        self.on_return: Callable[[Returned], None] | None = None
        self.on_confirm: Callable[[int, bool, bool], None] | None = None
        self.on_consumer_cancelled: Callable[[str], None] | None = None

    async def _rpc(self, name: str, **kwargs: Any) -> Any:
        if self.closed:
            raise self.close_error or BrokerConnectionLost("channel is closed")
        try:
            return await getattr(self._ch, name)(**kwargs)
        except Exception as e:
            raise _broker_error(e) from None

    # -- control methods (each fires when the broker answers) ----------------

    def declare_exchange(self, name: str, type: str = "direct", *, passive: bool = False,
                         durable: bool = False, auto_delete: bool = False) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._rpc(
            "exchange_declare", exchange=name, type=type, passive=passive, durable=durable,
            auto_delete=auto_delete))

    def declare_queue(self, name: str, *, passive: bool = False, durable: bool = False,
                      exclusive: bool = False, auto_delete: bool = False,
                      arguments: dict[str, Any] | None = None) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._rpc(
            "queue_declare", queue=name, passive=passive, durable=durable, exclusive=exclusive,
            auto_delete=auto_delete, arguments=arguments or {}))

    def bind_queue(self, queue: str, exchange: str, routing_key: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._rpc(
            "queue_bind", queue=queue, exchange=exchange, routing_key=routing_key))

    def delete_queue(self, name: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._rpc("queue_delete", queue=name))

    def delete_exchange(self, name: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._rpc("exchange_delete", exchange=name))

    def qos(self, prefetch_count: int) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._rpc("basic_qos", prefetch_count=prefetch_count))

    def confirm_select(self) -> Deferred[Any]:
        async def run() -> None:
            await self._rpc("confirm_select")
            self.confirming = True
        return Deferred.fromCoroutine(run())

    def consume(self, queue: str, callback: Callable[[Delivery], None], *,
                no_ack: bool = False, exclusive: bool = False) -> Deferred[str]:
        """Start consuming; fires with the consumer tag."""
        async def run() -> str:
            ok = await self._rpc("basic_consume", queue=queue, no_ack=no_ack,
                                 exclusive=exclusive)
            tag = ok.consumer_tag
            tag = tag.decode() if isinstance(tag, bytes) else str(tag)
            self._consumers[tag] = callback
            return tag
        return Deferred.fromCoroutine(run())

    def cancel(self, consumer_tag: str) -> Deferred[Any]:
        async def run() -> None:
            await self._rpc("basic_cancel", consumer_tag=consumer_tag)
            self._consumers.pop(consumer_tag, None)
        return Deferred.fromCoroutine(run())

    def close(self) -> Deferred[None]:
        """Close the channel (channel.close / close-ok); never fails."""
        async def run() -> None:
            if self.closed:
                return
            try:
                await self._rpc("channel_close", reply_code=200, reply_text="bye")
            except CallmeError:
                pass
            self._mark_closed(BrokerConnectionLost("channel closed by txcallme"))
            self._ch.close(None)
            self._proto.channels.pop(self.id, None)
            self._proto.wrappers.pop(self.id, None)
        return Deferred.fromCoroutine(run())

    # -- per-call methods: no round trip, no Deferred -------------------------

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: dict[str, Any], mandatory: bool = False) -> int:
        """Send a message; return its confirm sequence number (0 if not confirming)."""
        if self.closed:
            raise self.close_error or BrokerConnectionLost("channel is closed")
        ch = self.id
        args = (b"\x00\x00" + _codec.encode_shortstr(exchange)
                + _codec.encode_shortstr(routing_key) + (b"\x01" if mandatory else b"\x00"))
        props = _properties.encode_properties(self._proto.spec.txcallme_props, properties)
        self._proto.write(_frames.method_frame(ch, 60, 40, args)
                          + _frames.content_frames(ch, 60, body, props, self._proto.MAX_LENGTH))
        if self.confirming:
            self._next_tag += 1
            return self._next_tag
        return 0

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        if not self.closed:
            self._proto.write(_frames.method_frame(
                self.id, 60, 80,
                _ACK_ARGS.pack(delivery_tag, 1 if multiple else 0)))

    def reject(self, delivery_tag: int, requeue: bool) -> None:
        if not self.closed:
            self._proto.write(_frames.method_frame(
                self.id, 60, 90, _ACK_ARGS.pack(delivery_tag, 1 if requeue else 0)))

    # -- called by the protocol ------------------------------------------------

    def delivered(self, delivery: Delivery) -> None:
        callback = self._consumers.get(delivery.consumer_tag)
        if callback is None:
            log.warn("delivery for unknown consumer {tag}", tag=delivery.consumer_tag)
            return
        try:
            callback(delivery)
        except Exception:
            log.failure("consumer callback failed")

    def returned(self, message: Returned) -> None:
        if self.on_return is not None:
            self.on_return(message)

    def confirmed(self, tag: int, multiple: bool, ok: bool) -> None:
        if self.on_confirm is not None:
            self.on_confirm(tag, multiple, ok)

    def consumer_cancelled(self, tag: str) -> None:
        self._consumers.pop(tag, None)
        if self.on_consumer_cancelled is not None:
            self.on_consumer_cancelled(tag)

    def closed_by_broker(self, error: CallmeError) -> None:
        self._mark_closed(error)

    def _mark_closed(self, error: CallmeError) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        self._consumers.clear()
        for callback in self.on_close:
            try:
                callback(error)
            except Exception:
                log.failure("channel close callback failed")


class Connection:
    """A logged-in AMQP connection (see :func:`txcallme.amqp.session.connect`)."""

    def __init__(self, protocol: Any, params: Any) -> None:
        self.protocol = protocol
        self.params = params
        self.user: str = params.user
        self._last_id = 0

    @property
    def lost(self) -> bool:
        return bool(self.protocol.closed)

    def open_channel(self) -> Deferred[Channel]:
        """Open a new channel; fires with a :class:`Channel`."""
        async def run() -> Channel:
            proto = self.protocol
            if proto.closed:
                raise BrokerConnectionLost("connection to the broker is closed")
            channel_id = self._free_id()
            txchannel = proto._channel_now(channel_id)
            wrapper = Channel(self, txchannel)
            proto.wrappers[channel_id] = wrapper
            try:
                await txchannel.channel_open()
            except Exception as e:
                proto.wrappers.pop(channel_id, None)
                proto.channels.pop(channel_id, None)
                raise _broker_error(e) from None
            return wrapper
        return Deferred.fromCoroutine(run())

    def _free_id(self) -> int:
        used = self.protocol.channels
        limit = self.protocol.channel_max
        for _ in range(limit):
            self._last_id = self._last_id % limit + 1
            if self._last_id not in used:
                return self._last_id
        raise CallmeError(f"all {limit} channels of the connection are in use")

    def close(self) -> Deferred[None]:
        """Close the connection cleanly; fires when the socket is closed."""
        async def run() -> None:
            proto = self.protocol
            if not proto.closed and proto.transport is not None:
                try:
                    await proto.close(None, within=5)
                except Exception:
                    log.failure("error while closing the connection")
            if proto.transport is not None and proto.transport.connected:
                await proto.disconnected.wait()
        return Deferred.fromCoroutine(run())
