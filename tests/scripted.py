"""A scripted broker: the REAL txcallme AMQP client over an in-memory transport.

Nothing of txcallme is replaced: :class:`ScriptedBroker` plays the broker's side
of AMQP 0-9-1, frame by frame, over a ``StringTransport``, on a ``Clock``. It
answers the handshake and control methods by itself (unless told otherwise),
routes publishes to the queues the client declared and bound, and lets a test
inject every broker event: deliveries, basic.return, acks and nacks, basic.cancel,
channel.close with any code, connection.close, connection.blocked/unblocked,
silence (for timeouts) and heartbeat loss.

Quick start (a ``SynchronousTestCase``)::

    broker = ScriptedBroker()
    connection = broker.connection()           # a logged-in txcallme Connection
    channel = broker.run(connection.open_channel())
    broker.run(channel.declare_queue("q"))
    broker.peer.sent("queue.declare")[-1].args["queue"]  # -> "q"

    # anything that takes ConnectionParams runs over the broker:
    proxy = Proxy(params=broker.params(), reactor=broker.clock)
    broker.flush()

Driving time and I/O: nothing happens until :meth:`ScriptedBroker.flush`
(exchange bytes both ways and run the clock's due calls until quiet) or
:meth:`ScriptedBroker.advance` (move the clock, flushing as it goes).
:meth:`ScriptedBroker.run` flushes and returns a Deferred's result (or raises
its failure; AssertionError if it has not fired).

Scripting the broker's answers (``name`` is ``"class.method"`` as in the spec):

- ``broker.refuse(name, code, text)``: answer the next *name* with channel.close
  (``connection=True``: connection.close, as 541 or 530 do), ``times`` times
  (``None``: always); ``when=lambda args: ...`` picks which ones.
- ``broker.silence(name)``: never answer *name* (timeouts); also handshake steps
  (``"connection.start-ok"``: stall after connection.start).
- ``broker.auto_confirm`` (default True): ack each publish on a confirming
  channel as it arrives (False: call ``peer.ack``/``peer.nack`` yourself).
- ``broker.missing_exchanges``: publishes to these close the channel with 404;
  ``broker.forbidden_exchanges``: with 403.
- ``broker.refuse_connections = True``: the next connects fail (ConnectionRefusedError).
- ``broker.server_properties``: the connection.start properties (``cluster_name``...).

Events on one connection (``broker.peer`` is the latest :class:`BrokerPeer`,
``broker.peers`` all of them): ``deliver``, ``basic_return``, ``ack``, ``nack``,
``cancel_consumer``, ``close_channel``, ``close_connection``, ``blocked``,
``unblocked``, ``heartbeat``, ``drop`` (the network goes), ``send`` (any method).

What the client wrote: ``peer.methods`` (every :class:`Sent` method, in order),
``peer.sent(name)``, ``peer.published`` (:class:`Published` messages with
exchange, routing key, properties, body, mandatory and confirm number),
``peer.client_acks`` (``(channel, tag, multiple)``), ``peer.rejects``
(``(channel, tag, requeue)``), ``peer.heartbeats_received``.

Routing (shared by all connections of one broker): exchanges and queues the
client declares exist; ``queue.bind`` binds; a publish to ``""`` goes to the
queue named by its routing key, else to the queues bound with that key; a
message reaches a consumer of its queue (round robin) or waits in the queue
(``broker.queues[name].messages``) until one consumes. An unroutable
mandatory publish comes back as basic.return 312 NO_ROUTE before its ack.
Exclusive queues go with their connection. Not modelled: acks/redelivery of
delivered messages, auto-delete, TTL, prefetch.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from txcallme.amqp import Connection, ConnectionParams, connect
from txcallme.amqp import frames as _frames
from txcallme.amqp import properties as _properties
from txcallme.amqp.spec import tables

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


@attrs.define
class Sent:
    """A method frame the client wrote."""

    channel: int
    name: str
    args: dict[str, Any]


@attrs.define
class Published:
    """A basic.publish the client wrote (method, header and body)."""

    channel: int
    exchange: str
    routing_key: str
    mandatory: bool
    properties: dict[str, Any]
    body: bytes
    #: its confirm sequence number on a confirming channel, else 0
    seq: int = 0


@attrs.define
class _Rule:
    name: str
    action: str  # "refuse" | "silence"
    code: int = 0
    text: str = ""
    connection: bool = False
    times: int | None = 1
    when: Callable[[dict[str, Any]], bool] | None = None


@attrs.define
class Queue:
    """A queue of the scripted broker."""

    name: str
    exclusive_to: BrokerPeer | None = None
    messages: deque[Published] = attrs.Factory(deque)
    consumers: list[tuple[BrokerPeer, int, str]] = attrs.Factory(list)
    turn: int = 0


class _Transport(StringTransport):
    """The client's transport: what it writes waits for the broker's next flush."""

    def __init__(self, peer: BrokerPeer) -> None:
        super().__init__()
        self.peer = peer
        self.connected = True

    def loseConnection(self) -> None:  # noqa: N802
        if not self.disconnecting:
            super().loseConnection()
            self.peer.lose(ierror.ConnectionDone("connection closed by the client"))

    def abortConnection(self) -> None:  # noqa: N802
        if not self.disconnecting:
            super().abortConnection()
            self.peer.lose(ierror.ConnectionLost("connection aborted by the client"))


class BrokerPeer:
    """The broker's end of one client connection."""

    def __init__(self, broker: ScriptedBroker, protocol: Any, number: int) -> None:
        self.broker = broker
        self.protocol = protocol
        self.number = number
        self.transport = _Transport(self)
        self.methods: list[Sent] = []
        self.published: list[Published] = []
        self.client_acks: list[tuple[int, int, bool]] = []
        self.rejects: list[tuple[int, int, bool]] = []
        self.heartbeats_received = 0
        self.header_received = False
        self.open_channels: set[int] = set()
        self.confirming: dict[int, int] = {}  # channel -> publishes counted
        self.delivery_tags: dict[int, int] = {}
        self.consumers: dict[str, tuple[int, str]] = {}  # tag -> (channel, queue)
        self.closing_channels: set[int] = set()  # the broker sent channel.close
        self.connected = True
        self._inbox = bytearray()
        self._outbox: list[bytes] = []
        self._lost: Failure | None = None
        self._content: dict[int, list[Any]] = {}

    def __repr__(self) -> str:
        return f"<BrokerPeer {self.number}{'' if self.connected else ' (gone)'}>"

    # -- what the client wrote ------------------------------------------------

    def sent(self, name: str, channel: int | None = None) -> list[Sent]:
        """The methods named *name* the client wrote (on *channel*, if given)."""
        return [m for m in self.methods
                if m.name == name and (channel is None or m.channel == channel)]

    def names(self) -> list[str]:
        """The names of every method the client wrote, in order."""
        return [m.name for m in self.methods]

    # -- broker events ----------------------------------------------------------

    def send(self, channel: int, name: str, **args: Any) -> None:
        """Write any method frame to the client."""
        payload = tables().encode_method(name, args)
        self._outbox.append(_frames.frame(_frames.FRAME_METHOD, channel, payload))

    def send_content(self, channel: int, name: str, body: bytes,
                     properties: dict[str, Any] | None = None, **args: Any) -> None:
        self.send(channel, name, **args)
        props = _properties.encode_properties(tables().props, properties or {})
        self._outbox.append(_frames.content_frames(channel, 60, body, props, 131072))

    def deliver(self, channel: int, consumer_tag: str, body: bytes,
                properties: dict[str, Any] | None = None, *, delivery_tag: int | None = None,
                redelivered: bool = False, exchange: str = "", routing_key: str = "") -> int:
        """basic.deliver to the client; returns the delivery tag used."""
        if delivery_tag is None:
            delivery_tag = self.delivery_tags.get(channel, 0) + 1
        self.delivery_tags[channel] = max(delivery_tag, self.delivery_tags.get(channel, 0))
        self.send_content(channel, "basic.deliver", body, properties,
                          consumer_tag=consumer_tag, delivery_tag=delivery_tag,
                          redelivered=redelivered, exchange=exchange, routing_key=routing_key)
        return delivery_tag

    def basic_return(self, channel: int, body: bytes, properties: dict[str, Any] | None = None,
                     *, code: int = 312, text: str = "NO_ROUTE", exchange: str = "",
                     routing_key: str = "") -> None:
        """basic.return of a message to the client."""
        self.send_content(channel, "basic.return", body, properties, reply_code=code,
                          reply_text=text, exchange=exchange, routing_key=routing_key)

    def ack(self, channel: int, seq: int, multiple: bool = False) -> None:
        """Confirm publish *seq* (and all before it with *multiple*)."""
        self.send(channel, "basic.ack", delivery_tag=seq, multiple=multiple)

    def nack(self, channel: int, seq: int, multiple: bool = False) -> None:
        self.send(channel, "basic.nack", delivery_tag=seq, multiple=multiple, requeue=False)

    def cancel_consumer(self, channel: int, consumer_tag: str) -> None:
        """The broker cancels a consumer (its queue was deleted)."""
        self.consumers.pop(consumer_tag, None)
        for queue in self.broker.queues.values():
            queue.consumers = [c for c in queue.consumers if c[2] != consumer_tag]
        self.send(channel, "basic.cancel", consumer_tag=consumer_tag, nowait=True)

    def close_channel(self, channel: int, code: int, text: str, class_id: int = 0,
                      method_id: int = 0) -> None:
        """channel.close from the broker (404, 403, 405, 406, ...)."""
        self.closing_channels.add(channel)
        self._forget_channel(channel)
        self.send(channel, "channel.close", reply_code=code, reply_text=text,
                  class_id=class_id, method_id=method_id)

    def close_connection(self, code: int, text: str, class_id: int = 0,
                         method_id: int = 0) -> None:
        """connection.close from the broker (320, 541, 530, ...)."""
        self.send(0, "connection.close", reply_code=code, reply_text=text,
                  class_id=class_id, method_id=method_id)

    def blocked(self, reason: str = "low on memory") -> None:
        self.send(0, "connection.blocked", reason=reason)

    def unblocked(self) -> None:
        self.send(0, "connection.unblocked")

    def heartbeat(self) -> None:
        self._outbox.append(_frames.frame(_frames.FRAME_HEARTBEAT, 0, b""))

    def drop(self, reason: str = "network gone") -> None:
        """The TCP connection goes away without a close."""
        self.lose(ierror.ConnectionLost(reason))

    # -- machinery ----------------------------------------------------------------

    def lose(self, exc: Exception) -> None:
        if self._lost is None and self.connected:
            self._lost = Failure(exc)

    def _forget_channel(self, channel: int) -> None:
        self.open_channels.discard(channel)
        self.confirming.pop(channel, None)
        for tag, (ch, _) in list(self.consumers.items()):
            if ch == channel:
                del self.consumers[tag]
                for queue in self.broker.queues.values():
                    queue.consumers = [c for c in queue.consumers if c[2] != tag]

    def step(self) -> bool:
        """Process what the client wrote, deliver what is for it; True if anything moved."""
        moved = False
        if not self.connected:
            return False
        data = self.transport.value()
        if data:
            self.transport.clear()
            self._inbox += data
            self._read()
            moved = True
        if self._outbox and self.connected:
            out, self._outbox = b"".join(self._outbox), []
            self.protocol.dataReceived(out)
            moved = True
        if self._lost is not None and not self._outbox:
            self._disconnect()
            moved = True
        return moved

    def _disconnect(self) -> None:
        reason, self._lost = self._lost, None
        if not self.connected or reason is None:
            return
        self.connected = False
        self.transport.connected = False
        for queue in self.broker.queues.values():
            queue.consumers = [c for c in queue.consumers if c[0] is not self]
        self.consumers.clear()
        for name, queue in list(self.broker.queues.items()):
            if queue.exclusive_to is self:
                self.broker.delete_queue(name)
        self.protocol.connectionLost(reason)

    def _read(self) -> None:
        buf = self._inbox
        if not self.header_received:
            if len(buf) < 8:
                return
            header = bytes(buf[:8])
            del buf[:8]
            self.header_received = True
            assert header[:4] == b"AMQP", header
            if not self.broker.is_silenced("connection.start", {}):
                self.send(0, "connection.start", version_major=0, version_minor=9,
                          server_properties=self.broker.server_properties,
                          mechanisms=b"PLAIN EXTERNAL", locales=b"en_US")
        pos = 0
        while True:
            found = _frames.split_frame(buf, pos)
            if found is None:
                break
            kind, channel, start, end = found
            self._frame(kind, channel, bytes(buf[start:end]))
            pos = end + 1
        del buf[:pos]

    def _frame(self, kind: int, channel: int, payload: bytes) -> None:
        spec = tables()
        if kind == _frames.FRAME_HEARTBEAT:
            self.heartbeats_received += 1
        elif kind == _frames.FRAME_METHOD:
            info, args = spec.decode_method(payload)
            if info.content:
                self._content[channel] = [info, args, None, 0, []]
                return
            self.methods.append(Sent(channel, info.name, args))
            self._method(channel, info.name, args)
        elif kind == _frames.FRAME_HEADER:
            _, size, props = _frames.decode_content_header(payload, spec.props)
            partial = self._content[channel]
            partial[2], partial[3] = props, size
            if size == 0:
                self._content_done(channel)
        elif kind == _frames.FRAME_BODY:
            partial = self._content[channel]
            partial[4].append(payload)
            if sum(map(len, partial[4])) >= partial[3]:
                self._content_done(channel)

    def _content_done(self, channel: int) -> None:
        info, args, props, _, chunks = self._content.pop(channel)
        if info.name != "basic.publish" or channel in self.closing_channels:
            return
        seq = 0
        if channel in self.confirming:
            seq = self.confirming[channel] = self.confirming[channel] + 1
        message = Published(channel, args["exchange"], args["routing_key"],
                            bool(args["mandatory"]), props, b"".join(chunks), seq)
        self.published.append(message)
        self.methods.append(Sent(channel, "basic.publish", args))
        self.broker.route(self, message)

    def _method(self, channel: int, name: str, args: dict[str, Any]) -> None:
        broker = self.broker
        if channel in self.closing_channels:
            if name in ("channel.close-ok", "channel.close"):
                self.closing_channels.discard(channel)
                if name == "channel.close":
                    self.send(channel, "channel.close-ok")
            return
        if name == "basic.ack":
            self.client_acks.append((channel, args["delivery_tag"], args["multiple"]))
            return
        if name in ("basic.reject", "basic.nack"):
            self.rejects.append((channel, args["delivery_tag"], args["requeue"]))
            return
        if name in ("connection.start-ok", "connection.tune-ok", "connection.close-ok"):
            if name == "connection.close-ok":
                self.lose(ierror.ConnectionDone("closed by the broker"))
                return
            if name == "connection.start-ok" and not broker.is_silenced(name, args):
                self.send(0, "connection.tune", channel_max=broker.channel_max,
                          frame_max=broker.frame_max, heartbeat=broker.heartbeat)
            return
        rule = broker.rule_for(name, args)
        if rule is not None:
            if rule.action == "silence":
                return
            if rule.connection:
                self.close_connection(rule.code, rule.text, *tables().by_name[name].key)
            else:
                self.close_channel(channel, rule.code, rule.text, *tables().by_name[name].key)
            return
        answer = getattr(self, "_on_" + name.replace(".", "_").replace("-", "_"), None)
        if answer is not None:
            answer(channel, args)

    # -- automatic answers ------------------------------------------------------------

    def _on_connection_open(self, channel: int, args: dict[str, Any]) -> None:
        self.send(0, "connection.open-ok")

    def _on_connection_close(self, channel: int, args: dict[str, Any]) -> None:
        self.send(0, "connection.close-ok")
        self.lose(ierror.ConnectionDone("connection closed cleanly"))

    def _on_channel_open(self, channel: int, args: dict[str, Any]) -> None:
        self.open_channels.add(channel)
        self.send(channel, "channel.open-ok")

    def _on_channel_close(self, channel: int, args: dict[str, Any]) -> None:
        self._forget_channel(channel)
        self.send(channel, "channel.close-ok")

    def _on_channel_close_ok(self, channel: int, args: dict[str, Any]) -> None:
        pass

    def _on_confirm_select(self, channel: int, args: dict[str, Any]) -> None:
        self.confirming.setdefault(channel, 0)
        self.send(channel, "confirm.select-ok")

    def _on_basic_qos(self, channel: int, args: dict[str, Any]) -> None:
        self.send(channel, "basic.qos-ok")

    def _on_exchange_declare(self, channel: int, args: dict[str, Any]) -> None:
        self.broker.exchanges.add(args["exchange"])
        self.broker.missing_exchanges.discard(args["exchange"])
        self.send(channel, "exchange.declare-ok")

    def _on_exchange_delete(self, channel: int, args: dict[str, Any]) -> None:
        self.broker.delete_exchange(args["exchange"])
        self.send(channel, "exchange.delete-ok")

    def _on_queue_declare(self, channel: int, args: dict[str, Any]) -> None:
        broker = self.broker
        name = args["queue"] or f"amq.gen-{next(broker.counter)}"
        queue = broker.queues.get(name)
        if queue is None:
            if args["passive"]:
                self.close_channel(channel, 404, f"NOT_FOUND - no queue '{name}' in vhost '/'",
                                   50, 10)
                return
            queue = broker.queues[name] = Queue(name, self if args["exclusive"] else None)
        self.send(channel, "queue.declare-ok", queue=name, message_count=len(queue.messages),
                  consumer_count=len(queue.consumers))

    def _on_queue_bind(self, channel: int, args: dict[str, Any]) -> None:
        self.broker.bindings.setdefault((args["exchange"], args["routing_key"]),
                                        set()).add(args["queue"])
        self.send(channel, "queue.bind-ok")

    def _on_queue_delete(self, channel: int, args: dict[str, Any]) -> None:
        queue = self.broker.queues.get(args["queue"])
        count = len(queue.messages) if queue else 0
        self.broker.delete_queue(args["queue"])
        self.send(channel, "queue.delete-ok", message_count=count)

    def _on_basic_consume(self, channel: int, args: dict[str, Any]) -> None:
        broker = self.broker
        name = args["queue"]
        queue = broker.queues.get(name)
        if queue is None:
            self.close_channel(channel, 404, f"NOT_FOUND - no queue '{name}' in vhost '/'",
                               60, 20)
            return
        tag = args["consumer_tag"] or f"ctag-{next(broker.counter)}"
        self.consumers[tag] = (channel, name)
        queue.consumers.append((self, channel, tag))
        self.send(channel, "basic.consume-ok", consumer_tag=tag)
        broker.drain(queue)

    def _on_basic_cancel(self, channel: int, args: dict[str, Any]) -> None:
        tag = args["consumer_tag"]
        self.consumers.pop(tag, None)
        for queue in self.broker.queues.values():
            queue.consumers = [c for c in queue.consumers if c[2] != tag]
        self.send(channel, "basic.cancel-ok", consumer_tag=tag)


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, broker: ScriptedBroker) -> None:
        self.broker = broker

    def connect(self, protocolFactory: Any) -> Deferred[Any]:  # noqa: N803
        broker = self.broker
        if broker.refuse_connections:
            return fail(ierror.ConnectionRefusedError("scripted broker refuses connections"))
        protocol = protocolFactory.buildProtocol(None)
        peer = BrokerPeer(broker, protocol, len(broker.peers) + 1)
        broker.peers.append(peer)
        protocol.makeConnection(peer.transport)
        return succeed(protocol)


class ScriptedBroker:
    """The broker side of every connection the client opens to it (see the module doc)."""

    def __init__(self, clock: Clock | None = None, *, heartbeat: int = 0,
                 server_properties: dict[str, Any] | None = None) -> None:
        self.clock = clock or Clock()
        self.peers: list[BrokerPeer] = []
        self.heartbeat = heartbeat
        self.channel_max = 2047
        self.frame_max = 131072
        self.server_properties: dict[str, Any] = server_properties or {
            "product": "RabbitMQ", "version": "3.10.8", "cluster_name": "rabbit@scripted",
            "capabilities": {"publisher_confirms": True, "consumer_cancel_notify": True,
                             "connection.blocked": True, "basic.nack": True}}
        self.auto_confirm = True
        self.refuse_connections = False
        self.missing_exchanges: set[str] = set()
        self.forbidden_exchanges: set[str] = set()
        self.exchanges: set[str] = set()
        self.queues: dict[str, Queue] = {}
        self.bindings: dict[tuple[str, str], set[str]] = {}
        self.counter = itertools.count(1)
        self._rules: list[_Rule] = []

    # -- connecting -----------------------------------------------------------------

    def connector(self, reactor: Any) -> IStreamClientEndpoint:
        """For ``ConnectionParams(connector=...)``."""
        return _Endpoint(self)

    def params(self, **overrides: Any) -> ConnectionParams:
        """ConnectionParams that connect to this broker (heartbeat off by default)."""
        kwargs: dict[str, Any] = {"hosts": (("scripted", 5672),), "heartbeat": 0,
                                  "connector": self.connector}
        kwargs.update(overrides)
        return ConnectionParams(**kwargs)

    def connection(self, **overrides: Any) -> Connection:
        """A logged-in :class:`Connection` (one connect, no reconnection)."""
        result: Connection = self.run(connect(self.clock, self.params(**overrides)))
        return result

    @property
    def peer(self) -> BrokerPeer:
        """The broker end of the latest connection."""
        assert self.peers, "no connection was made to the scripted broker"
        return self.peers[-1]

    # -- time and I/O ---------------------------------------------------------------

    def flush(self, limit: int = 10000) -> None:
        """Exchange frames both ways and run due clock calls until nothing moves."""
        for _ in range(limit):
            moved = False
            for peer in list(self.peers):
                moved = peer.step() or moved
            if any(call.getTime() <= self.clock.seconds() for call in self.clock.getDelayedCalls()):
                self.clock.advance(0)
                moved = True
            if not moved:
                return
        raise AssertionError(f"scripted broker: no quiet state after {limit} steps")

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Move the clock by *seconds* in steps of at most *step*, flushing as it goes."""
        self.flush()
        remaining = seconds
        while remaining > 1e-9:
            delta = min(step, remaining)
            self.clock.advance(delta)
            remaining -= delta
            self.flush()

    def run(self, d: Deferred[Any]) -> Any:
        """Flush, then return *d*'s result or raise its failure."""
        self.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        if not results:
            raise AssertionError(f"{d!r} has not fired")
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    # -- scripting answers ------------------------------------------------------------

    def refuse(self, name: str, code: int, text: str, *, connection: bool = False,
               times: int | None = 1,
               when: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Answer the next *name* (``times`` of them; None: all) with a channel.close
        (or connection.close) carrying *code* and *text*."""
        self._rules.append(_Rule(name, "refuse", code, text, connection, times, when))

    def silence(self, name: str, *, times: int | None = None,
                when: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Never answer *name* (``times``: only that many of them)."""
        self._rules.append(_Rule(name, "silence", times=times, when=when))

    def rule_for(self, name: str, args: dict[str, Any]) -> _Rule | None:
        for rule in self._rules:
            if rule.name == name and (rule.when is None or rule.when(args)):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self._rules.remove(rule)
                return rule
        return None

    def is_silenced(self, name: str, args: dict[str, Any]) -> bool:
        rule = self.rule_for(name, args)
        return rule is not None and rule.action == "silence"

    # -- routing -----------------------------------------------------------------------

    def delete_queue(self, name: str) -> None:
        """Delete a queue: its consumers get basic.cancel (as RabbitMQ does)."""
        queue = self.queues.pop(name, None)
        if queue is None:
            return
        for peer, channel, tag in queue.consumers:
            if peer.connected:
                peer.consumers.pop(tag, None)
                peer.send(channel, "basic.cancel", consumer_tag=tag, nowait=True)
        for queues in self.bindings.values():
            queues.discard(name)

    def delete_exchange(self, name: str) -> None:
        self.exchanges.discard(name)
        for key in [k for k in self.bindings if k[0] == name]:
            del self.bindings[key]

    def route(self, peer: BrokerPeer, message: Published) -> None:
        channel = message.channel
        exchange = message.exchange
        for names, code, word in ((self.forbidden_exchanges, 403, "ACCESS_REFUSED - access to"),
                                  (self.missing_exchanges, 404, "NOT_FOUND - no")):
            if exchange in names:
                text = (f"{word} exchange '{exchange}' in vhost '/'" if code == 404 else
                        f"{word} exchange '{exchange}' in vhost '/' refused for user 'guest'")
                peer.close_channel(channel, code, text, 60, 40)
                return
        if exchange == "":
            targets = [message.routing_key] if message.routing_key in self.queues else []
        else:
            targets = sorted(self.bindings.get((exchange, message.routing_key), ()))
        if not targets and message.mandatory:
            peer.basic_return(channel, message.body, message.properties,
                              exchange=exchange, routing_key=message.routing_key)
        for name in targets:
            queue = self.queues[name]
            queue.messages.append(message)
            self.drain(queue)
        if message.seq and self.auto_confirm:
            peer.ack(channel, message.seq)

    def drain(self, queue: Queue) -> None:
        """Deliver waiting messages of *queue* to its consumers, round robin."""
        while queue.messages and queue.consumers:
            peer, channel, tag = queue.consumers[queue.turn % len(queue.consumers)]
            queue.turn += 1
            message = queue.messages.popleft()
            peer.deliver(channel, tag, message.body, message.properties,
                         exchange=message.exchange, routing_key=message.routing_key)


def long_name(length: int = 300) -> str:
    """A name AMQP cannot carry (shortstr limit is 255 bytes)."""
    return "x" * length


__all__ = ["BrokerPeer", "Published", "Queue", "ScriptedBroker", "Sent", "long_name"]
