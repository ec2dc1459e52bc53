"""The only module that imports txamqp.

txamqp supplies the spec model, the channel RPC machinery for control methods
(declare, bind, qos, consume, close) and the factory. Its per-frame pipeline
is replaced here: frames are split and decoded by :mod:`txcallme.amqp.codec`
(every field-table type, bodies always bytes), deliveries, returns and
publisher confirms are dispatched synchronously to callbacks instead of
through locks, queues and ``inlineCallbacks``, and publishes and acks are
written as precomputed bytes. Connection set-up turns the broker's refusals
into :class:`~txcallme.errors.AuthenticationError`.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp import spec as txspec
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
from txcallme.amqp.channel import Channel, Delivery, Returned
from txcallme.amqp.params import ConnectionParams
from txcallme.errors import (
    BrokerConnectionLost,
    CallmeError,
    channel_error,
)

log = Logger(namespace="callme.connection")

SPEC_PATH = Path(__file__).with_name("amqp0-9-1.xml")
_DELIVER, _RETURN, _ACK, _NACK = (60, 60), (60, 50), (60, 80), (60, 120)


@lru_cache(maxsize=1)
def load_spec() -> Any:
    """The project's AMQP 0-9-1 spec, loaded once per process."""
    spec = txspec.load(str(SPEC_PATH))
    spec.txcallme_methods = {
        (m.klass.id, m.id): (m, tuple(f.type for f in m.fields))
        for c in spec.classes for m in c.methods
    }
    spec.txcallme_types = {m: types for m, types in spec.txcallme_methods.values()}
    basic = spec.classes.byname["basic"]
    spec.txcallme_props = tuple((txspec.pythonize(f.name), f.type) for f in basic.fields)
    spec.txcallme_raw_props = tuple((f.name, f.type) for f in basic.fields)
    return spec


class _Delegate(TwistedDelegate):
    """Connection handshake and broker-initiated methods."""

    def connection_start(self, ch: Any, msg: Message) -> None:
        params: ConnectionParams = self.client.params
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
        self.client.login_sent = True
        ch.connection_start_ok(client_properties=properties, mechanism=mechanism,
                               response=response, locale="en_US")

    def connection_tune(self, ch: Any, msg: Message) -> None:
        client: Protocol = self.client
        ours = client.params.frame_max
        frame_max = min(ours, msg.frame_max) if msg.frame_max else ours
        heartbeat = int(client.params.heartbeat)
        if heartbeat and msg.heartbeat:
            heartbeat = min(heartbeat, msg.heartbeat)
        client.MAX_LENGTH = frame_max
        ch.connection_tune_ok(msg.channel_max or 2047, frame_max, heartbeat)
        client.channel_max = msg.channel_max or 2047
        client.start_heartbeat(heartbeat)
        client.started.fire()

    def channel_close(self, ch: Any, msg: Message) -> None:
        ch.channel_close_ok()
        ch.do_close(msg)

    def connection_close(self, ch: Any, msg: Message) -> None:
        self.client.close_reason = (msg.reply_code, _text(msg.reply_text))
        super().connection_close(ch, msg)

    def basic_cancel(self, ch: Any, msg: Message) -> None:
        wrapper = self.client.wrappers.get(ch.id)
        if wrapper is not None:
            wrapper.consumer_cancelled(_text(msg.consumer_tag))

    def connection_blocked(self, ch: Any, msg: Message) -> None:
        log.warn("broker blocked this connection: {reason}", reason=_text(msg.reason))

    def connection_unblocked(self, ch: Any, msg: Message) -> None:
        log.info("broker unblocked this connection")


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
    """txamqp's client with txcallme's frame pipeline."""

    def __init__(self, delegate: Any, params: ConnectionParams, clock: Any) -> None:
        super().__init__(delegate, params.vhost, load_spec(), heartbeat=0, clock=clock)
        self.params = params
        self.wrappers: dict[int, Channel] = {}
        self.close_reason: tuple[int, str] | None = None
        self.login_sent = False
        self.channel_max = 2047
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
        super().connectionMade()

    # -- incoming ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._last_received = self.clock.seconds()
        buf = self._buffer
        buf += data
        if buf[:4] == b"AMQP":
            log.error("broker refused the protocol version: {header!r}", header=bytes(buf[:8]))
            self.transport.loseConnection()
            return
        pos = 0
        try:
            while True:
                found = _frames.split_frame(buf, pos)
                if found is None:
                    break
                kind, channel, start, end = found
                self._frame(kind, channel, bytes(buf[start:end]))
                pos = end + 1
                if self.transport.disconnecting:
                    break
        except Exception:
            log.failure("bad frame from the broker; dropping the connection")
            self.transport.abortConnection()
        del buf[:pos]

    def _frame(self, kind: int, channel: int, payload: bytes) -> None:
        if kind == _frames.FRAME_METHOD:
            key = _frames.decode_method_head(payload)
            method, types = self.spec.txcallme_methods[key]
            args = _codec.decode_arguments(types, payload, 4)
            if method.content:
                self._partial[channel] = _Partial(key, args)
            elif key == _ACK or key == _NACK:
                wrapper = self.wrappers.get(channel)
                if wrapper is not None:
                    wrapper.confirmed(args[0], args[1], key == _ACK)
            else:
                self._channel_now(channel).dispatch(Frame(channel, Method(method, *args)),
                                                    self.work)
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
                payload, self.spec.txcallme_props)
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
        wrapper = self.wrappers.get(channel)
        if wrapper is None:
            return
        chunks = partial.chunks
        body = b"".join(chunks) if len(chunks) != 1 else chunks[0]
        props, args = partial.properties, partial.args
        if partial.key == _DELIVER:
            tag, dtag, redelivered, exchange, rkey = args
            wrapper.delivered(Delivery(body, props, dtag, redelivered, exchange, rkey, tag,
                                       partial.problem, partial.size))
        elif partial.key == _RETURN:
            wrapper.returned(Returned(args[0], args[1], args[2], args[3], props))
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
            args = _codec.encode_arguments(self.spec.txcallme_types[method], payload.args)
            return _frames.method_frame(frame.channel, method.klass.id, method.id, args)
        if isinstance(payload, Header):
            props = _properties.encode_properties(self.spec.txcallme_raw_props, payload.properties)
            return _frames.frame(_frames.FRAME_HEADER, frame.channel,
                                _frames.CONTENT_HEAD.pack(payload.klass.id, 0, payload.size)
                                + props)
        if isinstance(payload, Body):
            return _frames.frame(_frames.FRAME_BODY, frame.channel, payload.content)
        if isinstance(payload, Heartbeat):
            return _frames.frame(_frames.FRAME_HEARTBEAT, 0, b"")
        raise TypeError(f"cannot encode {payload!r}")

    def send_frame(self, frame: Frame) -> None:
        self.transport.write(self._pack_frame(frame))

    def write(self, data: bytes) -> None:
        """Write precomputed frames (publishes, acks) straight to the transport."""
        self.transport.write(data)

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
            log.warn("no frame from the broker for {s} s: dropping the connection",
                     s=2 * interval)
            self.transport.abortConnection()

    # -- channels and closing ------------------------------------------------

    def channel_failed(self, channel: Any, reason: Failure) -> None:
        wrapper = self.wrappers.pop(channel.id, None)
        self.channels.pop(channel.id, None)
        msg = reason.value
        error: CallmeError
        if isinstance(msg, Message):
            error = channel_error(msg.reply_code, _text(msg.reply_text))
        else:
            error = BrokerConnectionLost(str(msg))
        if wrapper is not None:
            wrapper.closed_by_broker(error)

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
        error = BrokerConnectionLost(f"connection to the broker lost: {reason.getErrorMessage()}")
        for wrapper in list(self.wrappers.values()):
            wrapper.closed_by_broker(error)
        self.wrappers.clear()
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
