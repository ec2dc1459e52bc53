"""The floor: a raw request/reply echo through the broker, with no RPC layer.

The server consumes (no ack) from its queue and publishes each body back to
``reply_to`` on the default exchange with the same correlation id (or, for
the large-result floor, a reply of ``--reply-bytes`` bytes); the client
matches replies by correlation id. No confirms, no ``mandatory``, no
serialization. Two Twisted stacks: pika's Twisted adapter and stock txamqp
(``AMQClient`` + ``TwistedDelegate``, with txcallme's spec file).
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientCreator

from benchmarks import common

# -- pika, Twisted adapter ----------------------------------------------------------


async def pika_channel() -> tuple[Any, Any]:
    import pika
    from pika.adapters.twisted_connection import TwistedProtocolConnection

    params = pika.ConnectionParameters(
        common.HOST, common.PORT,
        credentials=pika.PlainCredentials(common.USER, common.PASSWORD))
    conn = await ClientCreator(reactor, TwistedProtocolConnection, params).connectTCP(
        common.HOST, common.PORT)
    await conn.ready
    return conn, await conn.channel()


async def pika_server(stats: common.ServerStats, server_id: str, reply_bytes: int = 0) -> Any:
    import pika

    reply = b"x" * reply_bytes if reply_bytes else None

    conn, ch = await pika_channel()
    await ch.queue_declare(queue=server_id, exclusive=True, auto_delete=True)
    queue, _tag = await ch.basic_consume(queue=server_id, auto_ack=True)

    async def serve() -> None:
        while True:
            msg = await queue.get()
            props = msg.properties
            ch.basic_publish("", props.reply_to, reply or msg.body,
                             pika.BasicProperties(correlation_id=props.correlation_id))
            stats.calls += 1

    Deferred.fromCoroutine(serve()).addErrback(lambda _: None)

    async def stop() -> None:
        conn.transport.loseConnection()
    return stop


class PikaClient:
    """Raw echo (or pika-tutorial JSON RPC) client on pika's Twisted adapter."""

    def __init__(self, server_id: str, body: bytes) -> None:
        self.server_id = server_id
        self.body = body
        self.pending: dict[str, Deferred[bytes]] = {}
        self.ids = itertools.count(1)

    async def connect(self) -> None:
        conn, self.ch = await pika_channel()
        ok = await self.ch.queue_declare(queue="", exclusive=True, auto_delete=True)
        self.reply_to = ok.method.queue
        queue, _tag = await self.ch.basic_consume(queue=self.reply_to, auto_ack=True)
        Deferred.fromCoroutine(self._read(queue)).addErrback(lambda _: None)

    async def _read(self, queue: Any) -> None:
        while True:
            msg = await queue.get()
            d = self.pending.pop(msg.properties.correlation_id, None)
            if d is not None:
                d.callback(msg.body)

    def call(self) -> Deferred[bytes]:
        import pika

        corr = str(next(self.ids))
        d: Deferred[bytes] = Deferred()
        self.pending[corr] = d
        self.ch.basic_publish("", self.server_id, self.body, pika.BasicProperties(
            correlation_id=corr, reply_to=self.reply_to))
        return d


# -- stock txamqp --------------------------------------------------------------------


async def txamqp_channel() -> tuple[Any, Any]:
    from txamqp import spec
    from txamqp.client import TwistedDelegate
    from txamqp.protocol import AMQClient

    conn = await ClientCreator(
        reactor, AMQClient, delegate=TwistedDelegate(), vhost="/",
        spec=spec.load(str(common.SPEC_PATH))).connectTCP(common.HOST, common.PORT)
    await conn.authenticate(common.USER, common.PASSWORD)
    ch = await conn.channel(1)
    await ch.channel_open()
    return conn, ch


def _bytes(body: Any) -> bytes:
    return body.encode() if isinstance(body, str) else body


async def txamqp_server(stats: common.ServerStats, server_id: str,
                        reply_bytes: int = 0) -> Any:
    from txamqp.content import Content

    reply = b"x" * reply_bytes if reply_bytes else None

    conn, ch = await txamqp_channel()
    await ch.queue_declare(queue=server_id, exclusive=True, auto_delete=True)
    ok = await ch.basic_consume(queue=server_id, no_ack=True)
    queue = await conn.queue(ok.consumer_tag)

    async def serve() -> None:
        while True:
            msg = await queue.get()
            props = msg.content.properties
            ch.basic_publish(exchange="", routing_key=props["reply-to"], content=Content(
                reply or _bytes(msg.content.body),
                properties={"correlation-id": props["correlation-id"]}))
            stats.calls += 1

    Deferred.fromCoroutine(serve()).addErrback(lambda _: None)

    async def stop() -> None:
        conn.transport.loseConnection()
    return stop


class TxamqpClient:
    """Raw echo client on stock txamqp."""

    def __init__(self, server_id: str, body: bytes) -> None:
        self.server_id = server_id
        self.body = body
        self.pending: dict[str, Deferred[bytes]] = {}
        self.ids = itertools.count(1)

    async def connect(self) -> None:
        conn, self.ch = await txamqp_channel()
        ok = await self.ch.queue_declare(queue="", exclusive=True, auto_delete=True)
        self.reply_to = ok.queue
        consume = await self.ch.basic_consume(queue=self.reply_to, no_ack=True)
        queue = await conn.queue(consume.consumer_tag)
        Deferred.fromCoroutine(self._read(queue)).addErrback(lambda _: None)

    async def _read(self, queue: Any) -> None:
        while True:
            msg = await queue.get()
            d = self.pending.pop(msg.content.properties["correlation-id"], None)
            if d is not None:
                d.callback(_bytes(msg.content.body))

    def call(self) -> Deferred[bytes]:
        from txamqp.content import Content

        corr = str(next(self.ids))
        d: Deferred[bytes] = Deferred()
        self.pending[corr] = d
        self.ch.basic_publish(exchange="", routing_key=self.server_id, content=Content(
            self.body, properties={"correlation-id": corr, "reply-to": self.reply_to}))
        return d
