"""Connections and channels: one channel lifecycle, and what became of each publish.

Every channel goes through one state machine, owned here::

    OPENING --open-ok--> OPEN --close()--> CLOSING --close-ok--> CLOSED
        \\                  \\--channel.close from the broker, connection lost--> CLOSED
         \\--refused, timed out, connection lost--> CLOSED

:attr:`Channel.state` is a :class:`ChannelState`; :attr:`Channel.close_error`
is the reason once it is closed (a :class:`~txcallme.errors.ChannelError` with
the broker's code, :class:`~txcallme.errors.BrokerConnectionLost`,
:class:`~txcallme.errors.OperationTimeout`). Callbacks in
:attr:`Channel.on_close` are called once, with that reason.

**Control operations** (``open_channel``, ``declare_*``, ``bind_queue``,
``qos``, ``consume``, ``cancel``, ``confirm_select``, ``delete_*``, ``close``)
are written by this module (not by txamqp's channel machinery) and answered in
order. Each has a timeout, :attr:`Connection.control_timeout` (from
``ConnectionParams.control_timeout``, 30 s by default, on the protocol's clock):
a silent broker fails the operation with
:class:`~txcallme.errors.OperationTimeout` naming it, and the channel, now out
of step, is closed with that error. Arguments that AMQP cannot carry (a name
over 255 bytes) fail that operation alone with
:class:`~txcallme.errors.EncodeError` before anything is written; the channel
and later operations are unaffected.

**Publishes** (:meth:`Channel.publish`) write precomputed frames, no round
trip. On a confirming channel (after :meth:`Channel.confirm_select`) it returns
a sequence number (1, 2, ...) and, for each, calls :attr:`Channel.on_outcome`
``(seq, outcome)`` exactly once with a :class:`PublishOutcome`:

- ``PublishOutcome.TAKEN`` (``kind is Outcome.TAKEN``): acked, not returned;
- ``kind is Outcome.RETURNED``: came back as basic.return (the broker sends it
  before the ack of a mandatory publish); ``outcome.returned`` is the
  :class:`Returned`, with code, text and the message's properties;
- ``PublishOutcome.NACKED``: the broker nacked it;
- ``kind is Outcome.LOST``: the channel or connection died before the broker
  confirmed it; ``outcome.error`` says why.

The bookkeeping is one small tuple per unconfirmed publish; ``TAKEN`` and
``NACKED`` are shared instances, and one ``LOST`` instance serves every publish
lost with a channel.

**Flow control.** While the broker blocks the connection (``connection.blocked``,
a memory or disk alarm), :attr:`Connection.blocked_reason` is the broker's
reason (``None`` otherwise) and each callback in :attr:`Connection.on_blocked` is
called with the reason on block and ``None`` on unblock (one warn log per
block). Publishes are then held by the connection, not written, and written in
order on unblock. :meth:`Channel.withdraw` takes back a held publish (by the
number ``publish`` returned) so a caller whose own timeout fired never sends it
later; a withdrawn publish has no outcome.

Deliveries, returns and confirms arrive as synchronous callbacks
(:meth:`Channel.consume`, :attr:`Channel.on_return`, :attr:`Channel.on_confirm`
with the broker's raw tags, :attr:`Channel.on_consumer_cancelled` for a
broker's basic.cancel).
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcallme.amqp import codec as _codec
from txcallme.amqp import frames as _frames
from txcallme.amqp import properties as _properties
from txcallme.amqp.spec import MethodInfo, tables
from txcallme.errors import (
    BrokerConnectionLost,
    CallmeError,
    EncodeError,
    OperationTimeout,
    channel_error,
)

log = Logger(namespace="callme.connection")

_ACK_ARGS = struct.Struct(">QB")
_ENCODE_ERRORS = (ValueError, TypeError, KeyError, OverflowError, struct.error)


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


@attrs.frozen
class QueueDeclared:
    """The broker's answer to queue.declare."""

    queue: str
    message_count: int
    consumer_count: int


class ChannelState(enum.Enum):
    """Where a :class:`Channel` is in its lifecycle."""

    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Outcome(enum.Enum):
    """What became of one publish on a confirming channel."""

    TAKEN = "taken"
    RETURNED = "returned"
    NACKED = "nacked"
    LOST = "lost"


@attrs.frozen(slots=True)
class PublishOutcome:
    """What became of one publish: :attr:`kind`, and why (see the module docstring)."""

    TAKEN: ClassVar[PublishOutcome]
    NACKED: ClassVar[PublishOutcome]

    kind: Outcome
    reason: str = ""
    #: the basic.return, for ``Outcome.RETURNED``
    returned: Returned | None = None
    #: the channel's or connection's error, for ``Outcome.LOST``
    error: CallmeError | None = None

    @property
    def taken(self) -> bool:
        return self.kind is Outcome.TAKEN


PublishOutcome.TAKEN = PublishOutcome(Outcome.TAKEN)
PublishOutcome.NACKED = PublishOutcome(Outcome.NACKED, "the broker nacked the message")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Rpc:
    """A control operation waiting for its answer."""

    __slots__ = ("name", "responses", "deferred", "timer")

    def __init__(self, name: str, responses: tuple[str, ...],
                 deferred: Deferred[dict[str, Any]]) -> None:
        self.name = name
        self.responses = responses
        self.deferred = deferred
        self.timer: Any = None


_Match = tuple[str, str, Any] | None


class Channel:
    """One AMQP channel. Create with :meth:`Connection.open_channel`."""

    def __init__(self, connection: Connection, channel_id: int) -> None:
        self.connection = connection
        self.id = channel_id
        self._proto = connection.protocol
        self.state = ChannelState.OPENING
        self.close_error: CallmeError | None = None
        self.confirming = False
        self._next_tag = 0  # numbers handed out by publish()
        self._broker_seq = 0  # the broker's numbering (differs after a withdraw)
        self._unconfirmed: OrderedDict[int, tuple[int, _Match]] = OrderedDict()
        self._returns: dict[int, Returned] = {}
        self._held = 0
        self._rpcs: deque[_Rpc] = deque()
        self._heads: dict[tuple[str, str, bool], bytes] = {}
        self._props_fields = tables().props
        self._closing: list[Deferred[None]] | None = None
        self._consumers: dict[str, Callable[[Delivery], None]] = {}
        self._consumer_seq = 0  # client-chosen consumer tags: txcallme.<n>
        self.on_close: list[Callable[[CallmeError], None]] = []
        self.on_return: Callable[[Returned], None] | None = None
        self.on_confirm: Callable[[int, bool, bool], None] | None = None
        self.on_outcome: Callable[[int, PublishOutcome], None] | None = None
        self.on_consumer_cancelled: Callable[[str], None] | None = None

    def __repr__(self) -> str:
        return f"<Channel {self.id} {self.state.value}>"

    @property
    def closed(self) -> bool:
        """True once the channel is CLOSED (see :attr:`close_error`)."""
        return self.state is ChannelState.CLOSED

    @property
    def unconfirmed(self) -> int:
        """Publishes written and not yet confirmed, plus those held while blocked."""
        return len(self._unconfirmed) + self._held

    # -- control methods (each fires when the broker answers) ----------------

    def _call(self, name: str, arguments: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Send one control method; fire with the answer's arguments."""
        if self.state is ChannelState.CLOSED or (
                self.state is ChannelState.CLOSING and name != "channel.close"):
            return fail(self._closed_error())
        spec = tables()
        try:
            payload = spec.encode_method(name, arguments)
        except _ENCODE_ERRORS as e:
            return fail(EncodeError(name, str(e).strip("'\"")))
        info = spec.by_name[name]
        d: Deferred[dict[str, Any]] = Deferred()
        rpc = _Rpc(name, info.responses, d)
        timeout = self.connection.control_timeout
        if timeout:
            rpc.timer = self._proto.clock.callLater(timeout, self._timed_out, rpc)
        self._rpcs.append(rpc)
        self._proto.write(_frames.frame(_frames.FRAME_METHOD, self.id, payload))
        return d

    def _closed_error(self) -> CallmeError:
        return self.close_error or BrokerConnectionLost(f"channel {self.id} is closed")

    def _timed_out(self, rpc: _Rpc) -> None:
        rpc.timer = None
        error = OperationTimeout(rpc.name, self.connection.control_timeout,
                                 f"channel {self.id}")
        log.warn("{error}: closing the channel", error=error)
        try:
            self._rpcs.remove(rpc)
        except ValueError:
            pass
        rpc.deferred.errback(error)
        # The channel is out of step with the broker: close it (its id stays
        # reserved until the broker's close-ok, if it ever comes).
        if self.state is not ChannelState.CLOSED:
            if self.state is not ChannelState.CLOSING:
                self._send_close()
            self._mark_closed(error)
            self._finish_close()

    def _send_close(self) -> None:
        payload = tables().encode_method("channel.close", {"reply_code": 200,
                                                           "reply_text": "bye"})
        self._proto.write(_frames.frame(_frames.FRAME_METHOD, self.id, payload))

    def _open(self) -> Deferred[None]:
        d = self._call("channel.open", {})

        def opened(_: Any) -> None:
            if self.state is ChannelState.OPENING:
                self.state = ChannelState.OPEN
            elif self.close_error is not None:
                raise self.close_error

        return d.addCallback(opened)

    def declare_exchange(self, name: str, type: str = "direct", *, passive: bool = False,
                         durable: bool = False, auto_delete: bool = False,
                         arguments: dict[str, Any] | None = None) -> Deferred[None]:
        """exchange.declare; fires with None, fails with a ChannelError (the channel
        is then closed), OperationTimeout or EncodeError."""
        return self._call("exchange.declare", {
            "exchange": name, "type": type, "passive": passive, "durable": durable,
            "auto_delete": auto_delete, "arguments": arguments or {}}).addCallback(_none)

    def declare_queue(self, name: str, *, passive: bool = False, durable: bool = False,
                      exclusive: bool = False, auto_delete: bool = False,
                      arguments: dict[str, Any] | None = None) -> Deferred[QueueDeclared]:
        """queue.declare; fires with :class:`QueueDeclared` (name, message and
        consumer counts)."""
        return self._call("queue.declare", {
            "queue": name, "passive": passive, "durable": durable, "exclusive": exclusive,
            "auto_delete": auto_delete, "arguments": arguments or {}}).addCallback(
            lambda ok: QueueDeclared(_text(ok["queue"]), ok["message_count"],
                                     ok["consumer_count"]))

    def bind_queue(self, queue: str, exchange: str, routing_key: str) -> Deferred[None]:
        return self._call("queue.bind", {"queue": queue, "exchange": exchange,
                                         "routing_key": routing_key}).addCallback(_none)

    def delete_queue(self, name: str) -> Deferred[None]:
        return self._call("queue.delete", {"queue": name}).addCallback(_none)

    def delete_exchange(self, name: str) -> Deferred[None]:
        return self._call("exchange.delete", {"exchange": name}).addCallback(_none)

    def qos(self, prefetch_count: int) -> Deferred[None]:
        """Per-consumer prefetch (basic.qos, global off)."""
        return self._call("basic.qos", {"prefetch_count": prefetch_count}).addCallback(_none)

    def confirm_select(self) -> Deferred[None]:
        """Turn publisher confirms on. Publishes after this call are numbered from 1
        (the broker counts from the select, which it processes first)."""
        if self.state is ChannelState.OPEN and not self.confirming:
            self.confirming = True
            self._next_tag = self._broker_seq = 0
        return self._call("confirm.select", {}).addCallback(_none)

    def consume(self, queue: str, callback: Callable[[Delivery], None], *,
                no_ack: bool = False, exclusive: bool = False) -> Deferred[str]:
        """Start consuming; fires with the consumer tag.

        The tag is chosen here (``txcallme.<n>``, unique on the channel) and the
        callback registered before basic.consume is written: a broker may send
        deliveries right after consume-ok, before this Deferred's callbacks run
        (the in-memory broker does so inside the write). A failed consume
        unregisters it.
        """
        self._consumer_seq += 1
        tag = f"txcallme.{self._consumer_seq}"
        self._consumers[tag] = callback

        def failed(reason: Failure) -> Failure:
            if self._consumers.get(tag) is callback:
                del self._consumers[tag]
            return reason
        return self._call("basic.consume", {"queue": queue, "consumer_tag": tag,
                                            "no_ack": no_ack, "exclusive": exclusive}
                          ).addCallbacks(lambda _: tag, failed)

    def cancel(self, consumer_tag: str) -> Deferred[None]:
        """basic.cancel; fires when the broker confirms no more deliveries come."""
        def cancelled(_: Any) -> None:
            self._consumers.pop(consumer_tag, None)
        return self._call("basic.cancel", {"consumer_tag": consumer_tag}).addCallback(
            cancelled)

    def close(self) -> Deferred[None]:
        """Close the channel (channel.close / close-ok); never fails.

        Fires when the broker answered, or after ``control_timeout``, or when the
        connection is gone.
        """
        if self.state is ChannelState.CLOSED:
            return succeed(None)
        d: Deferred[None] = Deferred()
        if self._closing is not None:
            self._closing.append(d)
            return d
        self._closing = [d]
        self.state = ChannelState.CLOSING
        self._call("channel.close", {"reply_code": 200, "reply_text": "bye"}).addErrback(
            lambda _: None)
        return d

    # -- per-call methods: no round trip, no Deferred -------------------------

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: dict[str, Any], mandatory: bool = False) -> int:
        """Send a message; return its confirm sequence number (0 if not confirming).

        Raises the channel's close error if it is not open, and EncodeError
        (a ValueError) if the names or properties cannot be encoded; nothing is
        written then. While the connection is blocked, the message is held (see
        :meth:`withdraw`).
        """
        if self.state is not ChannelState.OPEN:
            raise self._closed_error()
        head = self._heads.get((exchange, routing_key, mandatory))
        try:
            if head is None:
                head = self._publish_head(exchange, routing_key, mandatory)
            props = _properties.encode_properties(self._props_fields, properties)
            if not isinstance(body, (bytes, bytearray)):
                raise TypeError(f"body must be bytes, not {type(body).__name__}")
        except _ENCODE_ERRORS as e:
            raise EncodeError("basic.publish", str(e).strip("'\"")) from None
        parts = _frames.content_parts(self.id, 60, body, props, self._proto.MAX_LENGTH)
        parts.insert(0, head)
        connection = self.connection
        if self.confirming:
            self._next_tag = seq = self._next_tag + 1
            match = (exchange, routing_key, properties.get("correlation_id")) if mandatory \
                else None
            if connection.blocked_reason is not None:
                connection.hold(self, seq, match, parts)
            else:
                self._write_confirmed(seq, match, parts)
            return seq
        if connection.blocked_reason is not None:
            connection.hold(self, 0, None, parts)
        else:
            self._proto.write_parts(parts)
        return 0

    def _publish_head(self, exchange: str, routing_key: str, mandatory: bool) -> bytes:
        """The basic.publish method frame for a destination, built once."""
        args = (b"\x00\x00" + _codec.encode_shortstr(exchange)
                + _codec.encode_shortstr(routing_key) + (b"\x01" if mandatory else b"\x00"))
        head = _frames.method_frame(self.id, 60, 40, args)
        if len(self._heads) >= 1024:
            self._heads.clear()
        self._heads[(exchange, routing_key, mandatory)] = head
        return head

    @property
    def next_publish_seq(self) -> int:
        """The confirm sequence number the next :meth:`publish` will return
        (0 if not confirming): record it before publishing, since the outcome
        can arrive during the write."""
        return self._next_tag + 1 if self.confirming else 0

    def _write_confirmed(self, seq: int, match: _Match, parts: list[bytes]) -> None:
        self._broker_seq = broker_seq = self._broker_seq + 1
        self._unconfirmed[broker_seq] = (seq, match)
        self._proto.write_parts(parts)

    def withdraw(self, seq: int) -> bool:
        """Take back a publish held while the connection is blocked.

        Returns True if it was still held (it will never be sent, and gets no
        outcome), False if it was already written (its outcome will come).
        """
        return self.connection.withdraw(self, seq)

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        if self.state is ChannelState.OPEN:
            self._proto.write(_frames.method_frame(
                self.id, 60, 80, _ACK_ARGS.pack(delivery_tag, 1 if multiple else 0)))

    def reject(self, delivery_tag: int, requeue: bool) -> None:
        """basic.reject: the delivery failed (RabbitMQ 4.3 counts it toward a
        quorum queue's delivery limit)."""
        if self.state is ChannelState.OPEN:
            self._proto.write(_frames.method_frame(
                self.id, 60, 90, _ACK_ARGS.pack(delivery_tag, 1 if requeue else 0)))

    def nack(self, delivery_tag: int, requeue: bool, multiple: bool = False) -> None:
        """basic.nack (a RabbitMQ extension): the delivery was not processed
        (RabbitMQ 4.3 does not count it toward a quorum queue's delivery limit)."""
        if self.state is ChannelState.OPEN:
            self._proto.write(_frames.method_frame(
                self.id, 60, 120, _ACK_ARGS.pack(
                    delivery_tag, (1 if multiple else 0) | (2 if requeue else 0))))

    # -- called by the protocol ------------------------------------------------

    def method_received(self, info: MethodInfo, values: tuple[Any, ...]) -> None:
        """A method frame without content for this channel."""
        name = info.name
        if name == "channel.close":
            args = dict(zip(info.fields, values, strict=True))
            self._proto.write(_frames.frame(
                _frames.FRAME_METHOD, self.id, tables().encode_method("channel.close-ok", {})))
            error = channel_error(args["reply_code"], _text(args["reply_text"]))
            if self.state is not ChannelState.CLOSING:
                code = args["reply_code"]
                if self._rpcs or (self._unconfirmed and code in (403, 404)):
                    # a refusal the caller gets as the error of its control method
                    # or publish (a passive declare's 404, a missing exchange): info
                    log.info("broker closed channel {id}: {error}", id=self.id, error=error)
                else:
                    log.warn("broker closed channel {id}: {error}", id=self.id, error=error)
            self._mark_closed(error)
            self._finish_close()
            self.connection.release(self)
            return
        if name == "channel.close-ok":
            self._mark_closed(BrokerConnectionLost(f"channel {self.id} closed by txcallme"))
            self._finish_close()
            self.connection.release(self)
            return
        if self.state is ChannelState.CLOSED:
            return  # after our close: discard everything but close / close-ok
        if name == "basic.cancel":
            args = dict(zip(info.fields, values, strict=True))
            tag = _text(args["consumer_tag"])
            if not args.get("nowait"):
                self._proto.write(_frames.frame(
                    _frames.FRAME_METHOD, self.id,
                    tables().encode_method("basic.cancel-ok", {"consumer_tag": tag})))
            self.consumer_cancelled(tag)
            return
        if name == "channel.flow":
            self._proto.write(_frames.frame(
                _frames.FRAME_METHOD, self.id,
                tables().encode_method("channel.flow-ok", {"active": values[0]})))
            return
        rpcs = self._rpcs
        if rpcs and name in rpcs[0].responses:
            rpc = rpcs.popleft()
            if rpc.timer is not None:
                rpc.timer.cancel()
            rpc.deferred.callback(dict(zip(info.fields, values, strict=True)))
            return
        log.warn("unexpected {name} on channel {id}", name=name, id=self.id)

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
        if self.confirming and self._unconfirmed:
            key = (message.exchange, message.routing_key,
                   message.properties.get("correlation_id"))
            returns = self._returns
            for broker_seq, (_, match) in self._unconfirmed.items():
                if match == key and broker_seq not in returns:
                    returns[broker_seq] = message
                    break
        if self.on_return is not None:
            try:
                self.on_return(message)
            except Exception:
                log.failure("return callback failed")

    def confirmed(self, tag: int, multiple: bool, ok: bool) -> None:
        unconfirmed = self._unconfirmed
        if multiple:
            while unconfirmed:
                broker_seq = next(iter(unconfirmed))
                if broker_seq > tag:
                    break
                seq, _ = unconfirmed.popitem(last=False)[1]
                self._settle(broker_seq, seq, ok)
        else:
            entry = unconfirmed.pop(tag, None)
            if entry is not None:
                self._settle(tag, entry[0], ok)
        if self.on_confirm is not None:
            try:
                self.on_confirm(tag, multiple, ok)
            except Exception:
                log.failure("confirm callback failed")

    def _settle(self, broker_seq: int, seq: int, ok: bool) -> None:
        returned = self._returns.pop(broker_seq, None) if self._returns else None
        if not ok:
            outcome = PublishOutcome.NACKED
        elif returned is None:
            outcome = PublishOutcome.TAKEN
        else:
            outcome = PublishOutcome(Outcome.RETURNED, f"{returned.reply_code} "
                                     f"{returned.reply_text}", returned)
        self._tell(seq, outcome)

    def _tell(self, seq: int, outcome: PublishOutcome) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(seq, outcome)
            except Exception:
                log.failure("publish outcome callback failed")

    def consumer_cancelled(self, tag: str) -> None:
        self._consumers.pop(tag, None)
        log.warn("broker cancelled consumer {tag} on channel {id}", tag=tag, id=self.id)
        if self.on_consumer_cancelled is not None:
            try:
                self.on_consumer_cancelled(tag)
            except Exception:
                log.failure("consumer cancel callback failed")

    def closed_by_broker(self, error: CallmeError, rpc_error: CallmeError | None = None) -> None:
        """The connection is gone (*rpc_error*: what pending operations fail with)."""
        self._mark_closed(error, rpc_error)
        self._finish_close()

    def _finish_close(self) -> None:
        waiters, self._closing = self._closing, None
        for d in waiters or ():
            d.callback(None)

    def _mark_closed(self, error: CallmeError, rpc_error: CallmeError | None = None) -> None:
        if self.state is ChannelState.CLOSED:
            return
        self.state = ChannelState.CLOSED
        self.close_error = error
        self._consumers.clear()
        rpcs, self._rpcs = self._rpcs, deque()
        for rpc in rpcs:
            if rpc.timer is not None:
                rpc.timer.cancel()
            if rpc.name == "channel.close":
                rpc.deferred.callback({})
            else:
                rpc.deferred.errback(rpc_error or error)
        lost = PublishOutcome(Outcome.LOST, str(error), error=error)
        held = self.connection.drop_held(self) if self._held else []
        unconfirmed, self._unconfirmed = self._unconfirmed, OrderedDict()
        returns, self._returns = self._returns, {}
        for broker_seq, (seq, _) in unconfirmed.items():
            returned = returns.get(broker_seq)
            self._tell(seq, lost if returned is None else PublishOutcome(
                Outcome.RETURNED, f"{returned.reply_code} {returned.reply_text}", returned))
        for seq in held:
            if seq:
                self._tell(seq, lost)
        for callback in self.on_close:
            try:
                callback(error)
            except Exception:
                log.failure("channel close callback failed")


def _none(_: Any) -> None:
    return None


class Connection:
    """A logged-in AMQP connection (see :func:`txcallme.amqp.session.connect`).

    Owns the table of its channels (:attr:`channels`, by id), the flow-control
    state (:attr:`blocked_reason`, :attr:`on_blocked`) and the publishes held
    while blocked. :attr:`server_properties` are the broker's connection.start
    properties; :attr:`node` names the broker node reached (``host:port`` and the
    cluster name when the broker gives one).
    """

    def __init__(self, protocol: Any, params: Any) -> None:
        self.protocol = protocol
        self.params = params
        self.user: str = params.user
        self.control_timeout: float = getattr(params, "control_timeout", 30.0)
        self.channels: dict[int, Channel] = {}
        self.blocked_reason: str | None = None
        self.on_blocked: list[Callable[[str | None], None]] = []
        self.server_properties: dict[str, Any] = {}
        self.address: tuple[str, int] = params.hosts[0]
        self._held: deque[tuple[Channel, int, _Match, list[bytes]]] = deque()
        self._last_id = 0

    @property
    def lost(self) -> bool:
        return bool(self.protocol.closed)

    @property
    def node(self) -> str:
        """``host:port`` reached, with the broker's cluster name and version if known."""
        host, port = self.address
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        props = self.server_properties
        extra = [f"{key} {_text(props[key])}" for key in ("cluster_name", "version")
                 if props.get(key)]
        return where + (f" ({', '.join(extra)})" if extra else "")

    def open_channel(self) -> Deferred[Channel]:
        """Open a new channel; fires with an OPEN :class:`Channel`.

        Fails with BrokerConnectionLost, OperationTimeout, or CallmeError when
        every channel id is in use.
        """
        proto = self.protocol
        if proto.closed:
            return fail(BrokerConnectionLost("connection to the broker is closed"))
        try:
            channel_id = self._free_id()
        except CallmeError as e:
            return fail(e)
        channel = self.channels[channel_id] = Channel(self, channel_id)
        return channel._open().addCallback(lambda _: channel)

    def _free_id(self) -> int:
        used = self.channels
        limit = self.protocol.channel_max
        for _ in range(limit):
            self._last_id = self._last_id % limit + 1
            if self._last_id not in used:
                return self._last_id
        raise CallmeError(f"all {limit} channels of the connection are in use")

    def release(self, channel: Channel) -> None:
        """The broker is done with *channel*'s id (close / close-ok)."""
        if self.channels.get(channel.id) is channel:
            del self.channels[channel.id]

    def lost_all(self, error: CallmeError, rpc_error: CallmeError | None = None) -> None:
        """The connection is gone: close every channel with *error*."""
        channels = list(self.channels.values())
        self.channels.clear()
        for channel in channels:
            channel.closed_by_broker(error, rpc_error)
        self._held.clear()

    # -- flow control --------------------------------------------------------

    def set_blocked(self, reason: str | None) -> None:
        """connection.blocked (*reason*) or connection.unblocked (None)."""
        was = self.blocked_reason
        if reason is not None:
            reason = reason or "no reason given"
            if was is None:
                log.warn("broker {node} blocks publishes on this connection: {reason}",
                         node=self.node, reason=reason)
            self.blocked_reason = reason
        else:
            if was is None:
                return
            log.info("broker {node} unblocked this connection; sending {n} held publishes",
                     node=self.node, n=len(self._held))
            self.blocked_reason = None
            held, self._held = self._held, deque()
            for channel, seq, match, data in held:
                channel._held -= 1
                if channel.state is not ChannelState.OPEN:
                    continue
                if seq and channel.confirming:
                    channel._write_confirmed(seq, match, data)
                else:
                    self.protocol.write_parts(data)
        for callback in list(self.on_blocked):
            try:
                callback(self.blocked_reason)
            except Exception:
                log.failure("blocked callback failed")

    def hold(self, channel: Channel, seq: int, match: _Match, data: list[bytes]) -> None:
        """Keep a publish until the connection is unblocked."""
        channel._held += 1
        self._held.append((channel, seq, match, data))

    def withdraw(self, channel: Channel, seq: int) -> bool:
        """Drop a held publish (see :meth:`Channel.withdraw`)."""
        if not seq or not channel._held:
            return False
        for index, item in enumerate(self._held):
            if item[0] is channel and item[1] == seq:
                del self._held[index]
                channel._held -= 1
                return True
        return False

    def drop_held(self, channel: Channel) -> list[int]:
        """Drop every publish held for *channel*; return their numbers."""
        kept: deque[tuple[Channel, int, _Match, list[bytes]]] = deque()
        dropped = []
        for item in self._held:
            if item[0] is channel:
                dropped.append(item[1])
            else:
                kept.append(item)
        self._held = kept
        channel._held = 0
        return dropped

    @property
    def held(self) -> int:
        """Publishes held while the connection is blocked."""
        return len(self._held)

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
