"""Peers: aio-pika's RPC pattern and a pika tutorial-style RPC.

aio-pika: ``aio_pika.patterns.RPC`` on both sides (its defaults: pickle,
publisher confirms, ``mandatory``). pika tutorial: a blocking-pika server
that decodes JSON, adds and replies, acking after the reply (prefetch 64
instead of the tutorial's 1, so in-flight calls are not serialized by acks);
clients are blocking pika (one call at a time) or pika's Twisted adapter
(:class:`benchmarks.floor.PikaClient` with a JSON body) for calls in flight.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from typing import Any

from benchmarks import common

# -- aio-pika RPC ----------------------------------------------------------------------


def _url() -> str:
    return f"amqp://{common.USER}:{common.PASSWORD}@{common.HOST}:{common.PORT}/"


def aiopika_server(server_id: str) -> None:
    asyncio.run(_aiopika_server(server_id))


async def _aiopika_server(server_id: str) -> None:
    import aio_pika
    from aio_pika.patterns import RPC

    stats = common.ServerStats()
    conn = await aio_pika.connect(_url())
    rpc = await RPC.create(await conn.channel())

    async def add(*, a: int, b: int) -> int:
        stats.calls += 1
        return a + b

    await rpc.register(f"{server_id}.add", add, auto_delete=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    stats.start()
    await stop.wait()
    stats.report()
    await conn.close()


def aiopika_client(server_id: str, concurrency: int, rec: common.Recorder) -> dict[str, Any]:
    return asyncio.run(_aiopika_client(server_id, concurrency, rec))


async def _aiopika_client(server_id: str, concurrency: int,
                          rec: common.Recorder) -> dict[str, Any]:
    import aio_pika
    from aio_pika.patterns import RPC

    conn = await aio_pika.connect(_url())
    rpc = await RPC.create(await conn.channel())
    name = f"{server_id}.add"

    def call() -> Any:
        return rpc.call(name, kwargs={"a": 1, "b": 1})

    async def gather(coroutines: list[Any]) -> Any:
        return await asyncio.gather(*coroutines)

    result = await common.drive(call, concurrency, rec, asyncio.sleep, gather)
    await conn.close()
    return result


# -- pika tutorial RPC -----------------------------------------------------------------


def _blocking_connection() -> Any:
    import pika

    return pika.BlockingConnection(pika.ConnectionParameters(
        common.HOST, common.PORT,
        credentials=pika.PlainCredentials(common.USER, common.PASSWORD)))


def pika_tutorial_server(server_id: str) -> None:
    import pika

    stats = common.ServerStats()
    conn = _blocking_connection()
    ch = conn.channel()
    ch.queue_declare(queue=server_id, exclusive=True, auto_delete=True)
    ch.basic_qos(prefetch_count=64)

    def on_request(ch: Any, method: Any, props: Any, body: bytes) -> None:
        a, b = json.loads(body)
        ch.basic_publish("", props.reply_to, json.dumps(a + b).encode(),
                         pika.BasicProperties(correlation_id=props.correlation_id))
        ch.basic_ack(method.delivery_tag)
        stats.calls += 1

    ch.basic_consume(queue=server_id, on_message_callback=on_request)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    stats.start()
    while not stopping:
        conn.process_data_events(time_limit=0.2)
    stats.report()
    conn.close()


def pika_blocking_client(server_id: str, rec: common.Recorder) -> dict[str, Any]:
    import pika

    conn = _blocking_connection()
    ch = conn.channel()
    reply_to = ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    response: list[bytes] = []
    corr = [""]

    def on_response(ch: Any, method: Any, props: Any, body: bytes) -> None:
        if props.correlation_id == corr[0]:
            response.append(body)

    ch.basic_consume(queue=reply_to, on_message_callback=on_response, auto_ack=True)
    body = json.dumps([1, 1]).encode()

    def call() -> Any:
        corr[0] = uuid.uuid4().hex
        response.clear()
        ch.basic_publish("", server_id, body, pika.BasicProperties(
            reply_to=reply_to, correlation_id=corr[0]))
        while not response:
            conn.process_data_events(time_limit=None)
        return json.loads(response[0])

    result = common.drive_sync(call, rec)
    conn.close()
    return result
