"""An in-memory AMQP 0-9-1 broker that speaks real frames, for tests.

:class:`MemoryBroker` plays the broker's side of the protocol over an
in-memory transport: the client is txcallme's real protocol, channels,
publisher and session, so what a test sees is what a real connection does,
minus the network. It knows nothing about RPC.

What it implements: connection and channel set-up and close, ``direct`` and
``fanout`` exchanges (and the default exchange), queues (exclusive,
auto-delete, server-named), bindings, ``basic.qos`` (per channel),
consume/cancel, publish with ``mandatory`` (``basic.return`` 312 NO_ROUTE),
publisher confirms, ack/reject/nack with requeue, per-message
``expiration`` (checked when a message reaches a consumer, on the broker's
clock), passive declares (404), inequivalent redeclares (406) and exclusive
queues of other connections (405), each closing the channel as RabbitMQ does.

Operator controls for tests: :meth:`MemoryBroker.delete_queue` (consumers get
``basic.cancel``), :meth:`~MemoryBroker.delete_exchange`,
:meth:`~MemoryBroker.close_connections` (``connection.close`` 320),
:meth:`~MemoryBroker.drop_connections` (the transport is lost),
:meth:`~MemoryBroker.block` / :meth:`~MemoryBroker.unblock`
(``connection.blocked``; publishes are held until unblocked) and
:meth:`~MemoryBroker.nack_next` (the next confirms are nacks).

Delivery is synchronous but never re-entrant: bytes written by either side
are queued and delivered in order until both sides are quiet, before the
write that started it returns.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from txcallme.amqp import codec, frames, properties

_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
_PUBLISH_HEAD = b"\x00\x3c\x00\x28"  # basic.publish (60, 40)

#: Argument types of the methods the broker reads and writes, by (class, method).
_ARGS: dict[tuple[int, int], tuple[str, ...]] = {
    (10, 10): ("octet", "octet", "table", "longstr", "longstr"),  # start
    (10, 11): ("table", "shortstr", "longstr", "shortstr"),  # start-ok
    (10, 30): ("short", "long", "short"),  # tune
    (10, 31): ("short", "long", "short"),  # tune-ok
    (10, 40): ("shortstr", "shortstr", "bit"),  # open
    (10, 41): ("shortstr",),  # open-ok
    (10, 50): ("short", "shortstr", "short", "short"),  # close
    (10, 51): (),  # close-ok
    (10, 60): ("shortstr",),  # blocked
    (10, 61): (),  # unblocked
    (20, 10): ("shortstr",),  # channel.open
    (20, 11): ("longstr",),  # channel.open-ok
    (20, 40): ("short", "shortstr", "short", "short"),  # channel.close
    (20, 41): (),  # channel.close-ok
    (40, 10): ("short", "shortstr", "shortstr", "bit", "bit", "bit", "bit", "bit", "table"),
    (40, 11): (),
    (40, 20): ("short", "shortstr", "bit", "bit"),  # exchange.delete
    (40, 21): (),
    (50, 10): ("short", "shortstr", "bit", "bit", "bit", "bit", "bit", "table"),
    (50, 11): ("shortstr", "long", "long"),
    (50, 20): ("short", "shortstr", "shortstr", "shortstr", "bit", "table"),  # bind
    (50, 21): (),
    (50, 40): ("short", "shortstr", "bit", "bit", "bit"),  # queue.delete
    (50, 41): ("long",),
    (50, 50): ("short", "shortstr", "shortstr", "shortstr", "table"),  # unbind
    (50, 51): (),
    (60, 10): ("long", "short", "bit"),  # qos
    (60, 11): (),
    (60, 20): ("short", "shortstr", "shortstr", "bit", "bit", "bit", "bit", "table"),
    (60, 21): ("shortstr",),
    (60, 30): ("shortstr", "bit"),  # cancel
    (60, 31): ("shortstr",),
    (60, 40): ("short", "shortstr", "shortstr", "bit", "bit"),  # publish
    (60, 50): ("short", "shortstr", "shortstr", "shortstr"),  # return
    (60, 60): ("shortstr", "longlong", "bit", "shortstr", "shortstr"),  # deliver
    (60, 80): ("longlong", "bit"),  # ack
    (60, 90): ("longlong", "bit"),  # reject
    (60, 120): ("longlong", "bit", "bit"),  # nack
    (85, 10): ("bit",),  # confirm.select
    (85, 11): (),
}

#: Basic content properties in wire order (name, type).
BASIC_PROPERTIES: tuple[tuple[str, str], ...] = (
    ("content_type", "shortstr"), ("content_encoding", "shortstr"), ("headers", "table"),
    ("delivery_mode", "octet"), ("priority", "octet"), ("correlation_id", "shortstr"),
    ("reply_to", "shortstr"), ("expiration", "shortstr"), ("message_id", "shortstr"),
    ("timestamp", "timestamp"), ("type", "shortstr"), ("user_id", "shortstr"),
    ("app_id", "shortstr"), ("cluster_id", "shortstr"),
)


class _Refused(Exception):
    """A method the broker answers by closing the channel (or connection)."""

    def __init__(self, code: int, text: str, connection: bool = False) -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text
        self.connection = connection


@attrs.define(eq=False)
class Message:
    """A message in a queue: the raw header payload and body, as published."""

    exchange: str
    routing_key: str
    header: bytes
    body: bytes
    properties: dict[str, Any]
    expires_at: float | None = None
    redelivered: bool = False


@attrs.define(eq=False)
class Queue:
    """A queue on the memory broker."""

    name: str
    durable: bool
    exclusive: bool
    auto_delete: bool
    arguments: dict[str, Any]
    owner: _BrokerConnection | None
    messages: deque[Message] = attrs.Factory(deque)
    consumers: list[_Consumer] = attrs.Factory(list)
    had_consumer: bool = False


@attrs.define(eq=False)
class Exchange:
    """An exchange on the memory broker (direct or fanout)."""

    name: str
    type: str
    durable: bool
    auto_delete: bool
    bindings: dict[str, set[str]] = attrs.Factory(dict)  # routing key -> queue names

    def route(self, routing_key: str) -> set[str]:
        if self.type == "fanout":
            return set().union(*self.bindings.values()) if self.bindings else set()
        return set(self.bindings.get(routing_key, ()))


@attrs.define(eq=False)
class _Consumer:
    tag: str
    queue: Queue
    channel: _BrokerChannel
    no_ack: bool


@attrs.define(eq=False)
class _BrokerChannel:
    id: int
    connection: _BrokerConnection
    prefetch: int = 0
    confirming: bool = False
    confirm_seq: int = 0
    delivery_seq: int = 0
    closing: bool = False
    consumers: dict[str, _Consumer] = attrs.Factory(dict)
    unacked: dict[int, tuple[Queue, Message]] = attrs.Factory(dict)
    publishing: tuple[str, str, bool] | None = None
    header: bytes = b""
    size: int = 0
    chunks: list[bytes] = attrs.Factory(list)


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        if protocol is None:
            raise ValueError("the factory built no protocol")
        self._broker.attach(protocol)
        return succeed(protocol)


class _Transport:
    """One side of an in-memory connection."""

    def __init__(self, broker: MemoryBroker, deliver: Callable[[bytes], None],
                 lost: Callable[[], None]) -> None:
        self._broker = broker
        self._deliver = deliver
        self._lost = lost
        self.connected = True
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        if self.connected and not self.disconnecting and data:
            self._broker.pump(self._deliver, bytes(data))

    def writeSequence(self, data: Sequence[bytes]) -> None:  # noqa: N802
        self.write(b"".join(data))

    def loseConnection(self) -> None:  # noqa: N802
        if self.connected and not self.disconnecting:
            self.disconnecting = True
            self._broker.pump(lambda _: self._lost(), b"")

    abortConnection = loseConnection  # noqa: N815

    def getPeer(self) -> Any:  # noqa: N802
        return ("memory", 5672)

    getHost = getPeer  # noqa: N815


class MemoryBroker:
    """A broker in memory. Connect with :meth:`endpoint` (an
    ``IStreamClientEndpoint``) or :meth:`connector`."""

    def __init__(self, clock: Any = None) -> None:
        self.clock: Any = clock if clock is not None else Clock()
        self.exchanges: dict[str, Exchange] = {
            "": Exchange("", "direct", True, False),
            "amq.direct": Exchange("amq.direct", "direct", True, False),
        }
        self.queues: dict[str, Queue] = {}
        self.connections: list[_BrokerConnection] = []
        self.blocked: str | None = None
        self._nacks = 0
        self._names = itertools.count(1)
        self._pending: deque[tuple[Callable[[bytes], None], bytes]] = deque()
        self._pumping = False

    # -- connecting ----------------------------------------------------------

    def endpoint(self) -> Any:
        """An ``IStreamClientEndpoint`` whose ``connect(factory)`` connects to this broker."""
        return _Endpoint(self)

    def connector(self) -> Callable[[Any], Any]:
        """``reactor -> endpoint``, the form a connection's *connector* takes."""
        return lambda reactor: _Endpoint(self)

    def attach(self, protocol: Any) -> None:
        """Connect a client *protocol* to the broker."""
        conn = _BrokerConnection(self)
        client_side = _Transport(self, conn.data_received, lambda: self._lost(conn))
        broker_side = _Transport(self, protocol.dataReceived, lambda: self._lost(conn))
        conn.client = protocol
        conn.transport = broker_side
        conn.client_transport = client_side
        self.connections.append(conn)
        protocol.makeConnection(client_side)
        self.pump(lambda _: None, b"")

    def pump(self, deliver: Callable[[bytes], None], data: bytes) -> None:
        """Queue *data* for *deliver*; deliver everything queued unless already
        delivering (so no protocol is re-entered from its own write)."""
        self._pending.append((deliver, data))
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._pending:
                target, chunk = self._pending.popleft()
                target(chunk)
        finally:
            self._pumping = False

    # -- operator controls ---------------------------------------------------

    def delete_queue(self, name: str) -> None:
        """Delete queue *name* as an operator would: its consumers get basic.cancel."""
        queue = self.queues.pop(name)
        for consumer in list(queue.consumers):
            consumer.channel.consumers.pop(consumer.tag, None)
            consumer.channel.connection.send_method(
                consumer.channel.id, (60, 30), (consumer.tag, True))  # no-wait, as RabbitMQ
        queue.consumers.clear()
        self._unbind_everywhere(name)

    def delete_exchange(self, name: str) -> None:
        """Delete exchange *name* (its bindings go with it)."""
        del self.exchanges[name]

    def close_connections(self, code: int = 320, text: str = "CONNECTION_FORCED - closed "
                          "via management plugin") -> None:
        """Close every client connection with ``connection.close``."""
        for conn in list(self.connections):
            conn.close_connection(code, text)

    def drop_connections(self) -> None:
        """Lose every client connection without a close handshake."""
        for conn in list(self.connections):
            conn.client_transport.loseConnection()

    def block(self, reason: str = "low on memory") -> None:
        """Send connection.blocked; hold publishes until :meth:`unblock`."""
        self.blocked = reason
        for conn in list(self.connections):
            conn.send_method(0, (10, 60), (reason,))

    def unblock(self) -> None:
        """Send connection.unblocked and process the held publishes."""
        self.blocked = None
        for conn in list(self.connections):
            conn.send_method(0, (10, 61), ())
        for conn in list(self.connections):
            conn.release_held()

    def nack_next(self, count: int = 1) -> None:
        """Answer the next *count* confirmed publishes with basic.nack."""
        self._nacks += count

    def queue_names(self) -> list[str]:
        return sorted(self.queues)

    # -- used by connections -------------------------------------------------

    def take_nack(self) -> bool:
        if self._nacks:
            self._nacks -= 1
            return True
        return False

    def new_name(self, prefix: str) -> str:
        return f"{prefix}{next(self._names)}"

    def _lost(self, conn: _BrokerConnection) -> None:
        if conn not in self.connections:
            return
        self.connections.remove(conn)
        conn.teardown()
        for transport in (conn.transport, conn.client_transport):
            transport.connected = False
        conn.client.connectionLost(Failure(ConnectionDone("memory connection closed")))

    def _unbind_everywhere(self, queue: str) -> None:
        for name, exchange in list(self.exchanges.items()):
            changed = False
            for key, queues in list(exchange.bindings.items()):
                if queue in queues:
                    queues.discard(queue)
                    changed = True
                    if not queues:
                        del exchange.bindings[key]
            if changed and exchange.auto_delete and not exchange.bindings:
                del self.exchanges[name]

    def queue_gone(self, queue: Queue) -> None:
        if self.queues.get(queue.name) is queue:
            del self.queues[queue.name]
            self._unbind_everywhere(queue.name)

    def dispatch(self, queue: Queue) -> None:
        """Deliver ready messages of *queue* to its consumers, round-robin."""
        while queue.messages and queue.consumers:
            ready = [c for c in queue.consumers if c.no_ack or not c.channel.prefetch
                     or len(c.channel.unacked) < c.channel.prefetch]
            if not ready:
                return  # every consumer is at its prefetch limit
            message = queue.messages.popleft()
            if message.expires_at is not None and self.clock.seconds() >= message.expires_at:
                continue
            consumer = ready[0]
            queue.consumers.remove(consumer)
            queue.consumers.append(consumer)  # round-robin
            consumer.channel.connection.deliver(consumer, message)


class _BrokerConnection:
    """The broker's side of one client connection."""

    client: Any
    transport: _Transport
    client_transport: _Transport

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.channels: dict[int, _BrokerChannel] = {}
        self._buffer = bytearray()
        self._greeted = False
        self._closing = False
        self._held: list[tuple[int, int, bytes]] = []
        self.client_properties: dict[str, Any] = {}

    # -- writing -------------------------------------------------------------

    def send_method(self, channel: int, key: tuple[int, int], args: Sequence[Any]) -> None:
        self.transport.write(frames.method_frame(
            channel, key[0], key[1], codec.encode_arguments(_ARGS[key], args)))

    def close_connection(self, code: int, text: str) -> None:
        self._closing = True
        self.send_method(0, (10, 50), (code, text, 0, 0))

    # -- reading -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        if not self._greeted:
            if len(buf) < 8:
                return
            if bytes(buf[:4]) != b"AMQP":  # txamqp sends AMQP 1 1 0 9; RabbitMQ takes it
                self.transport.write(_PROTOCOL_HEADER)
                self.transport.loseConnection()
                return
            del buf[:8]
            self._greeted = True
            self.send_method(0, (10, 10), (0, 9, {"product": "txcallme memory broker",
                                                  "capabilities": {"publisher_confirms": True,
                                                                   "consumer_cancel_notify": True,
                                                                   "connection.blocked": True}},
                                           b"PLAIN AMQPLAIN EXTERNAL", b"en_US"))
        pos = 0
        while True:
            found = frames.split_frame(buf, pos)
            if found is None:
                break
            kind, channel, start, end = found
            payload = bytes(buf[start:end])
            pos = end + 1
            self._frame(kind, channel, payload)
        del buf[:pos]

    def _frame(self, kind: int, channel_id: int, payload: bytes) -> None:
        if kind == frames.FRAME_HEARTBEAT:
            return
        if self._held or (self.broker.blocked is not None and kind == frames.FRAME_METHOD
                          and payload[:4] == _PUBLISH_HEAD):
            # a blocked connection is not read from once it publishes
            self._held.append((kind, channel_id, payload))
            return
        if kind == frames.FRAME_METHOD:
            key = frames.decode_method_head(payload)
            self._method(channel_id, key, codec.decode_arguments(_ARGS[key], payload, 4))
        elif kind == frames.FRAME_HEADER:
            self._header(channel_id, payload)
        elif kind == frames.FRAME_BODY:
            self._body(channel_id, payload)

    def release_held(self) -> None:
        held, self._held = self._held, []
        for kind, channel_id, payload in held:
            self._frame(kind, channel_id, payload)

    def _method(self, channel_id: int, key: tuple[int, int], args: tuple[Any, ...]) -> None:
        if channel_id == 0:
            self._connection_method(key, args)
            return
        channel = self.channels.get(channel_id)
        if key == (20, 10):
            self.channels[channel_id] = _BrokerChannel(channel_id, self)
            self.send_method(channel_id, (20, 11), (b"",))
            return
        if channel is None:
            self.close_connection(504, f"CHANNEL_ERROR - channel {channel_id} is not open")
            return
        if channel.closing:
            if key == (20, 41):
                del self.channels[channel_id]
            return  # RabbitMQ drops everything but close-ok on a closing channel
        try:
            self._channel_method(channel, key, args)
        except _Refused as e:
            self._refuse(channel, e, key)

    def _refuse(self, channel: _BrokerChannel, error: _Refused, key: tuple[int, int]) -> None:
        if error.connection:
            self.close_connection(error.code, error.text)
            return
        self._release_channel(channel)
        channel.closing = True
        self.send_method(channel.id, (20, 40), (error.code, error.text, key[0], key[1]))

    def _connection_method(self, key: tuple[int, int], args: tuple[Any, ...]) -> None:
        if key == (10, 11):
            self.client_properties = args[0]
            self.send_method(0, (10, 30), (2047, 131072, 0))
        elif key == (10, 31):
            pass
        elif key == (10, 40):
            self.send_method(0, (10, 41), ("",))
        elif key == (10, 50):
            self.send_method(0, (10, 51), ())
            self.transport.loseConnection()
        elif key == (10, 51):
            self.transport.loseConnection()

    def _channel_method(self, channel: _BrokerChannel, key: tuple[int, int],
                        args: tuple[Any, ...]) -> None:
        broker = self.broker
        cid = channel.id
        if key == (20, 40):  # client closes the channel
            self._release_channel(channel)
            del self.channels[cid]
            self.send_method(cid, (20, 41), ())
        elif key == (40, 10):
            _, name, type_, passive, durable, auto_delete, _, nowait, _ = args
            existing = broker.exchanges.get(name)
            if passive:
                if existing is None:
                    raise _Refused(404, f"NOT_FOUND - no exchange '{name}' in vhost '/'")
            elif existing is None:
                if type_ not in ("direct", "fanout"):
                    raise _Refused(503, f"COMMAND_INVALID - unknown exchange type '{type_}'",
                                   connection=True)
                broker.exchanges[name] = Exchange(name, type_, durable, auto_delete)
            elif (existing.type, existing.durable, existing.auto_delete) != (
                    type_, durable, auto_delete):
                raise _Refused(406, f"PRECONDITION_FAILED - inequivalent arg for exchange "
                               f"'{name}' in vhost '/'")
            if not nowait:
                self.send_method(cid, (40, 11), ())
        elif key == (40, 20):
            _, name, _, nowait = args
            broker.exchanges.pop(name, None)
            if not nowait:
                self.send_method(cid, (40, 21), ())
        elif key == (50, 10):
            self._declare_queue(channel, args)
        elif key == (50, 20):
            _, qname, ename, rkey, nowait, _ = args
            exchange = broker.exchanges.get(ename)
            if qname not in broker.queues:
                raise _Refused(404, f"NOT_FOUND - no queue '{qname}' in vhost '/'")
            if exchange is None:
                raise _Refused(404, f"NOT_FOUND - no exchange '{ename}' in vhost '/'")
            exchange.bindings.setdefault(rkey, set()).add(qname)
            if not nowait:
                self.send_method(cid, (50, 21), ())
        elif key == (50, 50):
            _, qname, ename, rkey, _ = args
            exchange = broker.exchanges.get(ename)
            if exchange is not None:
                exchange.bindings.get(rkey, set()).discard(qname)
            self.send_method(cid, (50, 51), ())
        elif key == (50, 40):
            _, qname, _, _, nowait = args
            queue = broker.queues.get(qname)
            count = len(queue.messages) if queue else 0
            if queue is not None:
                broker.delete_queue(qname)
            if not nowait:
                self.send_method(cid, (50, 41), (count,))
        elif key == (60, 10):
            channel.prefetch = args[1]
            self.send_method(cid, (60, 11), ())
        elif key == (60, 20):
            self._consume(channel, args)
        elif key == (60, 30):
            tag, nowait = args
            consumer = channel.consumers.pop(tag, None)
            if consumer is not None:
                self._drop_consumer(consumer)
            if not nowait:
                self.send_method(cid, (60, 31), (tag,))
        elif key == (60, 40):
            _, ename, rkey, mandatory, _ = args
            if ename not in broker.exchanges:
                raise _Refused(404, f"NOT_FOUND - no exchange '{ename}' in vhost '/'")
            channel.publishing = (ename, rkey, mandatory)
        elif key in ((60, 80), (60, 90), (60, 120)):
            self._settle(channel, key, args)
        elif key == (85, 10):
            channel.confirming = True
            if not args[0]:
                self.send_method(cid, (85, 11), ())
        else:
            raise _Refused(540, f"NOT_IMPLEMENTED - method {key} in the memory broker",
                           connection=True)

    def _declare_queue(self, channel: _BrokerChannel, args: tuple[Any, ...]) -> None:
        broker = self.broker
        _, name, passive, durable, exclusive, auto_delete, nowait, arguments = args
        queue = broker.queues.get(name) if name else None
        if queue is not None and queue.exclusive and queue.owner is not self:
            raise _Refused(405, f"RESOURCE_LOCKED - cannot obtain exclusive access to locked "
                           f"queue '{name}' in vhost '/'")
        if passive:
            if queue is None:
                raise _Refused(404, f"NOT_FOUND - no queue '{name}' in vhost '/'")
        elif queue is None:
            name = name or broker.new_name("amq.gen-")
            queue = broker.queues[name] = Queue(name, durable, exclusive, auto_delete,
                                                dict(arguments), self if exclusive else None)
        elif (queue.durable, queue.exclusive, queue.auto_delete, queue.arguments) != (
                durable, exclusive, auto_delete, dict(arguments)):
            raise _Refused(406, f"PRECONDITION_FAILED - inequivalent arg for queue '{name}' "
                           f"in vhost '/'")
        if not nowait:
            self.send_method(channel.id, (50, 11),
                             (queue.name, len(queue.messages), len(queue.consumers)))

    def _consume(self, channel: _BrokerChannel, args: tuple[Any, ...]) -> None:
        _, qname, tag, _, no_ack, exclusive, nowait, _ = args
        queue = self.broker.queues.get(qname)
        if queue is None:
            raise _Refused(404, f"NOT_FOUND - no queue '{qname}' in vhost '/'")
        if queue.exclusive and queue.owner is not self:
            raise _Refused(405, f"RESOURCE_LOCKED - cannot obtain exclusive access to locked "
                           f"queue '{qname}' in vhost '/'")
        tag = tag or self.broker.new_name("amq.ctag-")
        consumer = _Consumer(tag, queue, channel, no_ack)
        channel.consumers[tag] = consumer
        queue.consumers.append(consumer)
        queue.had_consumer = True
        if not nowait:
            self.send_method(channel.id, (60, 21), (tag,))
        self.broker.dispatch(queue)

    def _header(self, channel_id: int, payload: bytes) -> None:
        channel = self.channels.get(channel_id)
        if channel is None or channel.closing or channel.publishing is None:
            return
        _, _, size = frames.CONTENT_HEAD.unpack_from(payload, 0)
        channel.header = payload
        channel.size = size
        channel.chunks = []
        if size == 0:
            self._published(channel)

    def _body(self, channel_id: int, payload: bytes) -> None:
        channel = self.channels.get(channel_id)
        if channel is None or channel.closing or channel.publishing is None:
            return
        channel.chunks.append(payload)
        if sum(map(len, channel.chunks)) >= channel.size:
            self._published(channel)

    def _published(self, channel: _BrokerChannel) -> None:
        broker = self.broker
        assert channel.publishing is not None
        ename, rkey, mandatory = channel.publishing
        channel.publishing = None
        body = b"".join(channel.chunks)
        reader = codec.Reader(channel.header, frames.CONTENT_HEAD.size)
        props = properties.decode_properties(BASIC_PROPERTIES, reader)
        expires = None
        if props.get("expiration"):
            expires = broker.clock.seconds() + int(props["expiration"]) / 1000.0
        exchange = broker.exchanges.get(ename)
        names = ({rkey} if rkey in broker.queues else set()) if ename == "" else (
            exchange.route(rkey) if exchange is not None else set())
        queues = [broker.queues[n] for n in sorted(names) if n in broker.queues]
        if not queues and mandatory:
            self.transport.write(frames.method_frame(
                channel.id, 60, 50, codec.encode_arguments(
                    _ARGS[(60, 50)], (312, "NO_ROUTE", ename, rkey)))
                + frames.frame(frames.FRAME_HEADER, channel.id, channel.header)
                + (frames.frame(frames.FRAME_BODY, channel.id, body) if body else b""))
        if channel.confirming:
            channel.confirm_seq += 1
            nack = broker.take_nack()
            self.send_method(channel.id, (60, 120) if nack else (60, 80),
                             (channel.confirm_seq, False, False) if nack
                             else (channel.confirm_seq, False))
            if nack:
                return
        for queue in queues:
            queue.messages.append(Message(ename, rkey, channel.header, body, props, expires))
            broker.dispatch(queue)

    def deliver(self, consumer: _Consumer, message: Message) -> None:
        channel = consumer.channel
        channel.delivery_seq += 1
        tag = channel.delivery_seq
        if not consumer.no_ack:
            channel.unacked[tag] = (consumer.queue, message)
        self.transport.write(
            frames.method_frame(channel.id, 60, 60, codec.encode_arguments(
                _ARGS[(60, 60)], (consumer.tag, tag, message.redelivered, message.exchange,
                                  message.routing_key)))
            + frames.frame(frames.FRAME_HEADER, channel.id, message.header)
            + (frames.frame(frames.FRAME_BODY, channel.id, message.body)
               if message.body else b""))

    def _settle(self, channel: _BrokerChannel, key: tuple[int, int],
                args: tuple[Any, ...]) -> None:
        tag = args[0]
        multiple = key != (60, 90) and args[1]
        requeue = key != (60, 80) and args[-1]
        if tag not in channel.unacked and not (multiple and tag == 0):
            raise _Refused(406, f"PRECONDITION_FAILED - unknown delivery tag {tag}")
        tags = sorted(t for t in channel.unacked if tag == 0 or t <= tag) if multiple else [tag]
        touched: list[Queue] = []
        for t in tags:
            queue, message = channel.unacked.pop(t)
            if requeue and self.broker.queues.get(queue.name) is queue:
                message.redelivered = True
                queue.messages.appendleft(message)
            touched.append(queue)
        for queue in dict.fromkeys(touched):
            self.broker.dispatch(queue)
        for queue in {c.queue for c in channel.consumers.values()}:
            self.broker.dispatch(queue)

    # -- releasing -------------------------------------------------------------

    def _drop_consumer(self, consumer: _Consumer) -> None:
        queue = consumer.queue
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        if queue.auto_delete and queue.had_consumer and not queue.consumers:
            self.broker.queue_gone(queue)

    def _release_channel(self, channel: _BrokerChannel) -> None:
        for consumer in list(channel.consumers.values()):
            self._drop_consumer(consumer)
        channel.consumers.clear()
        touched = []
        for _, (queue, message) in sorted(channel.unacked.items(), reverse=True):
            if self.broker.queues.get(queue.name) is queue:
                message.redelivered = True
                queue.messages.appendleft(message)
                touched.append(queue)
        channel.unacked.clear()
        for queue in dict.fromkeys(touched):
            self.broker.dispatch(queue)

    def teardown(self) -> None:
        for channel in list(self.channels.values()):
            self._release_channel(channel)
        self.channels.clear()
        for queue in list(self.broker.queues.values()):
            if queue.exclusive and queue.owner is self:
                self.broker.queue_gone(queue)
