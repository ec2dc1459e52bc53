"""txamqp's protocol and factory with txcallme's frame pipeline.

txamqp supplies the factory (the way txcallme connects) and the connection
handshake on channel 0 (start, tune, open, close). Everything else is
replaced: frames are split and decoded by :mod:`txcallme.amqp.codec`
(every field-table type, bodies always bytes), and every frame on channels 1
and up goes straight to its :class:`~txcallme.amqp.channel.Channel` (control
answers, deliveries, returns, confirms, broker closes and cancels), found in
the one channel table of the :class:`~txcallme.amqp.channel.Connection`
(:attr:`Protocol.connection`). Heartbeats are written as precomputed bytes.
An exception while encoding a channel-0 frame drops the connection instead of
silencing txamqp's writer.
"""

from __future__ import annotations

import math
import platform
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed as Closed  # re-exported for handshake
from txamqp.client import TwistedDelegate
from txamqp.connection import Body, Frame, Header, Heartbeat, Method
from txamqp.factory import AMQFactory
from txamqp.message import Message
from txamqp.protocol import AMQClient

from txcallme._version import __version__
from txcallme.amqp import codec as _codec
from txcallme.amqp import frames as _frames
from txcallme.amqp import properties as _properties
from txcallme.amqp.channel import Connection, Delivery, Returned
from txcallme.amqp.params import ConnectionParams
from txcallme.amqp.spec import load_spec, tables
from txcallme.errors import BrokerConnectionLost, channel_error

log = Logger(namespace="callme.connection")

_DELIVER, _RETURN, _ACK, _NACK = (60, 60), (60, 50), (60, 80), (60, 120)

__all__ = ["Closed", "Protocol", "ProtocolFactory", "load_spec"]


class _Delegate(TwistedDelegate):
    """Connection handshake and broker-initiated methods on channel 0."""

    def connection_start(self, ch: Any, msg: Message) -> None:
        client: Protocol = self.client
        params = client.params
        server = msg.server_properties
        client.connection.server_properties = server if isinstance(server, dict) else {}
        client.phase = "login"
        properties = {
            "product": "txcallme", "version": __version__,
            "platform": f"Python {platform.python_version()}",
            "capabilities": {
                "authentication_failure_close": True, "publisher_confirms": True,
                "basic.nack": True, "consumer_cancel_notify": True,
                "connection.blocked": True,
            },
        }
        if params.external_auth:
            mechanism, response = "EXTERNAL", b""
        else:
            mechanism = "PLAIN"
            response = b"\0" + params.user.encode() + b"\0" + params.password.encode()
        client.login_sent = True
        ch.connection_start_ok(client_properties=properties, mechanism=mechanism,
                               response=response, locale="en_US")

    def connection_tune(self, ch: Any, msg: Message) -> None:
        client: Protocol = self.client
        ours = client.params.frame_max
        frame_max = min(ours, msg.frame_max) if msg.frame_max else ours
        heartbeat = math.ceil(client.params.heartbeat)  # params refuse 0 < heartbeat < 1
        if heartbeat and msg.heartbeat:
            heartbeat = min(heartbeat, msg.heartbeat)
        client.MAX_LENGTH = frame_max
        ch.connection_tune_ok(msg.channel_max or 2047, frame_max, heartbeat)
        client.channel_max = msg.channel_max or 2047
        client.heartbeat = heartbeat
        client.phase = "vhost open"
        client.start_heartbeat(heartbeat)
        client.started.fire()

    def connection_close(self, ch: Any, msg: Message) -> None:
        self.client.close_reason = (msg.reply_code, _text(msg.reply_text))
        super().connection_close(ch, msg)

    def connection_blocked(self, ch: Any, msg: Message) -> None:
        self.client.connection.set_blocked(_text(msg.reason))

    def connection_unblocked(self, ch: Any, msg: Message) -> None:
        self.client.connection.set_blocked(None)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Partial:
    """A content method whose header and body frames are still arriving."""

    __slots__ = ("key", "args", "properties", "size", "chunks", "received", "problem")

    def __init__(self, key: tuple[int, int], args: tuple[Any, ...]) -> None:
        self.key = key
        self.args = args
        self.properties: dict[str, Any] = {}
        self.size = 0
        self.chunks: list[bytes] = []
        self.received = 0
        self.problem: str | None = None


class Protocol(AMQClient):
    """txamqp's client with txcallme's frame pipeline.

    :attr:`connection` is the one :class:`Connection` of this protocol
    (channel table, flow control, server properties); :attr:`phase` is where
    the handshake is (``"tcp"``, ``"amqp header"``, ``"login"``,
    ``"vhost open"``, ``"open"``), for timeout errors.
    """

    def __init__(self, delegate: Any, params: ConnectionParams, clock: Any) -> None:
        super().__init__(delegate, params.vhost, load_spec(), heartbeat=0, clock=clock)
        self.params = params
        self.tables = tables()
        self.connection = Connection(self, params)
        self.close_reason: tuple[int, str] | None = None
        self.login_sent = False
        self.phase = "tcp"
        self.channel_max = 2047
        self.heartbeat = 0
        self.max_body_size: int | None = None
        self.on_lost: list[Any] = []
        self._buffer = bytearray()
        self._partial: dict[int, _Partial] = {}
        self._last_received = clock.seconds()
        self._heartbeat_loops: list[LoopingCall] = []
        self.lost_reason: Failure | None = None

    def connectionMade(self) -> None:  # noqa: N802
        # Requests, replies and acks are small writes: do not let Nagle hold them.
        transport = self.transport
        while transport is not None:
            if hasattr(transport, "setTcpNoDelay"):
                transport.setTcpNoDelay(True)
                break
            transport = getattr(transport, "transport", None)
        self.phase = "amqp header"
        self._last_received = self.clock.seconds()
        super().connectionMade()

    # -- incoming ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._last_received = self.clock.seconds()
        buf = self._buffer
        if buf:  # a frame started in an earlier read
            buf += data
            try:
                if _frames.split_frame(buf, 0) is None:
                    return  # still incomplete: keep accumulating, copy nothing
            except Exception:
                log.failure("bad frame from the broker; dropping the connection")
                self.transport.abortConnection()
                return
            view = bytes(buf)
            buf.clear()
        else:
            view = bytes(data)
        if view[:4] == b"AMQP":
            log.error("broker refused the protocol version: {header!r}", header=view[:8])
            self.transport.loseConnection()
            return
        pos = 0
        try:
            while True:
                found = _frames.split_frame(view, pos)
                if found is None:
                    break
                kind, channel, start, end = found
                self._frame(kind, channel, view[start:end])
                pos = end + 1
                if self.transport.disconnecting:
                    break
        except Exception:
            log.failure("bad frame from the broker; dropping the connection")
            self.transport.abortConnection()
            return
        if pos < len(view):
            buf += view[pos:]

    def _frame(self, kind: int, channel: int, payload: bytes) -> None:
        if kind == _frames.FRAME_METHOD:
            key = _frames.decode_method_head(payload)
            if channel:
                if key == _DELIVER:
                    self._partial[channel] = _Partial(key, _frames.decode_deliver(payload))
                    return
                if key == _ACK or key == _NACK:
                    wrapper = self.connection.channels.get(channel)
                    if wrapper is not None:
                        tag, multiple = _frames.decode_ack(payload)
                        wrapper.confirmed(tag, multiple, key == _ACK)
                    return
            info = self.tables.by_key[key]
            args = _codec.decode_arguments(info.types, payload, 4)
            if channel == 0:
                self._channel_now(0).dispatch(Frame(0, Method(info.txmethod, *args)),
                                              self.work)
                return
            if info.content:
                self._partial[channel] = _Partial(key, args)
                return
            wrapper = self.connection.channels.get(channel)
            if wrapper is None:
                log.warn("{name} for unknown channel {id}", name=info.name, id=channel)
            else:
                wrapper.method_received(info, args)
        elif kind == _frames.FRAME_HEADER:
            self._header(channel, payload)
        elif kind == _frames.FRAME_BODY:
            partial = self._partial[channel]
            if partial.problem is None:
                partial.chunks.append(payload)
            partial.received += len(payload)
            if partial.received >= partial.size:
                self._content_done(channel)

    def _header(self, channel: int, payload: bytes) -> None:
        partial = self._partial[channel]
        try:
            _, partial.size, partial.properties = _frames.decode_content_header(
                payload, self.tables.props)
        except (_codec.DecodeError, KeyError, ValueError) as e:
            _, partial.size = _frames.decode_content_header_size(payload)
            partial.problem = f"undecodable message properties: {e}"
        if self.max_body_size is not None and partial.size > self.max_body_size:
            # too large: keep the properties (to answer), do not buffer the body
            partial.problem = f"body of {partial.size} bytes is over the size limit"
        if partial.size == 0:
            self._content_done(channel)

    def _content_done(self, channel: int) -> None:
        partial = self._partial.pop(channel)
        wrapper = self.connection.channels.get(channel)
        if wrapper is None or wrapper.closed:
            return
        chunks = partial.chunks
        body = b"".join(chunks) if len(chunks) != 1 else chunks[0]
        props, args = partial.properties, partial.args
        if partial.key == _DELIVER:
            tag, dtag, redelivered, exchange, rkey = args
            wrapper.delivered(Delivery(body, props, dtag, redelivered, exchange, rkey, tag,
                                       partial.problem, partial.size))
        elif partial.key == _RETURN:
            wrapper.returned(Returned(args[0], _text(args[1]), args[2], args[3], props))
        else:
            log.warn("ignoring unexpected content method {key}", key=partial.key)

    def _channel_now(self, channel_id: int) -> Any:
        ch = self.channels.get(channel_id)
        if ch is None:
            ch = self.channels[channel_id] = self.channelFactory(channel_id, self.outgoing, self)
        return ch

    # -- outgoing ------------------------------------------------------------

    def _pack_frame(self, frame: Frame) -> bytes:
        payload = frame.payload
        if isinstance(payload, Method):
            method = payload.method
            args = _codec.encode_arguments(self.tables.types[method], payload.args)
            return _frames.method_frame(frame.channel, method.klass.id, method.id, args)
        if isinstance(payload, Header):
            props = _properties.encode_properties(self.tables.raw_props, payload.properties)
            return _frames.frame(_frames.FRAME_HEADER, frame.channel,
                                _frames.CONTENT_HEAD.pack(payload.klass.id, 0, payload.size)
                                + props)
        if isinstance(payload, Body):
            return _frames.frame(_frames.FRAME_BODY, frame.channel, payload.content)
        if isinstance(payload, Heartbeat):
            return _frames.frame(_frames.FRAME_HEARTBEAT, 0, b"")
        raise TypeError(f"cannot encode {payload!r}")

    def writer(self, frame: Frame) -> None:
        # txamqp's writer stops for good if one frame raises: keep it alive.
        try:
            self.send_frame(frame)
        except Exception:
            log.failure("cannot encode a connection frame; dropping the connection")
            if self.transport is not None:
                self.transport.abortConnection()
        finally:
            self.outgoing.get().addCallback(self.writer)

    def send_frame(self, frame: Frame) -> None:
        self.transport.write(self._pack_frame(frame))

    def write(self, data: bytes) -> None:
        """Write precomputed frames (publishes, acks, control methods) to the transport."""
        self.transport.write(data)

    def write_parts(self, parts: list[bytes]) -> None:
        """Write frames given as pieces (a publish), without joining them first."""
        self.transport.writeSequence(parts)

    # -- heartbeats ----------------------------------------------------------

    def start_heartbeat(self, interval: int) -> None:
        if interval <= 0:
            return
        beat = _frames.frame(_frames.FRAME_HEARTBEAT, 0, b"")
        send = LoopingCall(self.transport.write, beat)
        check = LoopingCall(self._check_heartbeat, interval)
        for loop, every in ((send, interval / 2.0), (check, interval)):
            loop.clock = self.clock
            loop.start(every, now=False)
            self._heartbeat_loops.append(loop)

    def _check_heartbeat(self, interval: int) -> None:
        if self.clock.seconds() - self._last_received > 2 * interval:
            log.warn("no frame from the broker {node} for {s} s: dropping the connection",
                     node=self.connection.node, s=2 * interval)
            self.transport.abortConnection()

    # -- closing ---------------------------------------------------------------

    def channel_failed(self, channel: Any, reason: Failure) -> None:
        pass  # only channel 0 goes through txamqp; the connection close handles it

    def do_close(self, reason: Any) -> None:
        # txamqp iterates the live dict while closing channels can change it.
        for ch in list(self.channels.values()):
            ch.close(reason)
        for queue in list(self.queues.values()):
            queue.close()
        self.delegate.close(reason)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        for loop in self._heartbeat_loops:
            if loop.running:
                loop.stop()
        self.lost_reason = reason
        if self.close_reason is not None:
            code, text = self.close_reason
            error = BrokerConnectionLost(f"broker closed the connection: {code} {text}")
            rpc_error = channel_error(code, text)
        else:
            error = BrokerConnectionLost(
                f"connection to the broker lost: {reason.getErrorMessage()}")
            rpc_error = None
        connection = self.connection
        connection.blocked_reason = None
        connection.lost_all(error, rpc_error)
        super().connectionLost(reason)
        for callback in self.on_lost:
            callback(error)


class ProtocolFactory(AMQFactory):
    """txamqp's factory, building :class:`Protocol` with the project's spec."""

    protocol = Protocol
    noisy = False

    def __init__(self, params: ConnectionParams, clock: Any) -> None:
        # AMQFactory.__init__ would parse a spec file on every instance.
        self._spec = load_spec()
        self._clock = clock
        self._vhost = params.vhost
        self._heartbeat = params.heartbeat
        self.params = params

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        proto = Protocol(_Delegate(), self.params, self._clock)
        proto.factory = self
        return proto
