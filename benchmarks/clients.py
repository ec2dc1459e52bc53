"""Benchmark clients: ``python -m benchmarks.clients KIND SERVER_ID [options]``.

Runs one workload against a server started by ``benchmarks.servers`` and
prints one JSON line of results (calls/s, p50/p99 latency, CPU per call).

Kinds: txcallme (add(1, 1)), txcallme-echo (``--value``: a string of
``--payload`` bytes, the records document, or a string of the records'
size, echoed), txcallme-blob (a small request, a reply of ``--reply-bytes``),
txcallme-threads (the blocking 10 ms handler), soak (add(1, 1) for a long
run, with the client's RSS every second), twistd (the CPU-bound ``burn``),
memory (RSS per pending call), floor-pika, floor-txamqp (raw echo),
aiopika, pika-blocking, pika-twisted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from typing import Any

from benchmarks import common, floor, peers

PENDING = 10_000


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.clients")
    p.add_argument("kind")
    p.add_argument("server_id")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--payload", type=int, default=0, help="body size in bytes (echo)")
    p.add_argument("--duration", type=float, default=2.5)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--max-calls", type=int, default=100_000)
    p.add_argument("--pending", type=int, default=PENDING, help="memory: calls left pending")
    p.add_argument("--value", choices=["string", "records", "records-size-string"],
                   default="string", help="txcallme-echo: what is echoed")
    p.add_argument("--reply-bytes", type=int, default=1_000_000, help="txcallme-blob")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="txcallme: the Proxy's call timeout (the soak keeps the default 60 s: "
                        "what finished calls may leave behind lives that long)")
    p.add_argument("--direct-reply-to", action="store_true",
                   help="txcallme: Proxy(direct_reply_to=True), replies through RabbitMQ's "
                        "Direct Reply-to")
    p.add_argument("--observe", nargs="?", const="everything", default=None,
                   choices=common.OBSERVE_MODES,
                   help="txcallme: observability on (everything, prometheus only, or 1 %% sampled)")
    return p.parse_args(argv)


def echo_value(args: argparse.Namespace) -> Any:
    if args.value == "records":
        return common.records()
    if args.value == "records-size-string":
        return "x" * (common.records_size() - 2)  # the same bytes on the wire, quotes included
    return "x" * args.payload


async def txcallme_client(args: argparse.Namespace, rec: common.Recorder) -> dict[str, Any]:
    from twisted.internet.task import LoopingCall

    from benchmarks import _tw
    from txcallme import Proxy

    common.enable_observe(args.observe)
    options = {"direct_reply_to": True} if args.direct_reply_to else {}
    proxy = Proxy(common.HOST, common.PORT, common.USER, common.PASSWORD,
                  timeout=args.timeout, **options)
    await proxy.when_ready()
    sid = args.server_id
    rss = common.RSSSampler()
    sampling = LoopingCall(rss.sample)
    if args.kind == "txcallme-echo":
        value = echo_value(args)

        def call() -> Any:
            return proxy.call(sid, "echo", value)
    elif args.kind == "txcallme-blob":
        size = args.reply_bytes

        def call() -> Any:
            return proxy.call(sid, "blob", size)
    elif args.kind == "twistd":
        def call() -> Any:
            return proxy.call(sid, "burn")
    elif args.kind == "txcallme-threads":
        def call() -> Any:
            return proxy.call(sid, "sleepy")
    else:
        def call() -> Any:
            return proxy.call(sid, "add", 1, 1)
    if args.kind == "soak":
        sampling.start(1.0)
    result = await _tw.drive_twisted(call, args.concurrency, rec)
    if sampling.running:
        sampling.stop()
        rss.sample()
        result.update(rss_samples=rss.samples,
                      client_rss_start=common.rss_at(rss.samples, rec.wall0),
                      client_rss_end=rss.samples[-1][1])
    await proxy.close()
    return result


async def memory_client(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import _tw
    from txcallme import Proxy

    proxy = Proxy(common.HOST, common.PORT, common.USER, common.PASSWORD, timeout=600)
    await proxy.when_ready()
    sid = args.server_id
    for _ in range(200):  # warm up: channel open, code paths, allocator pools
        await proxy.call(sid, "add", 1, 1)
    gc.collect()
    rss0 = common.rss_bytes()
    t0 = time.perf_counter()
    calls = [proxy.invoke(sid, "hold", timeout=600) for _ in range(args.pending)]
    for d in calls:
        d.addErrback(lambda _: None)
    issued = time.perf_counter() - t0
    await _tw.sleep(1.0)  # let the transport flush every request to the broker
    gc.collect()
    rss1 = common.rss_bytes()
    pending = proxy.pending_count
    await proxy.close()
    return {"side": "client", "pending": pending, "issue_s": issued,
            "rss_before": rss0, "rss_after": rss1,
            "rss_bytes_per_pending_call": (rss1 - rss0) / args.pending}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    rec = common.Recorder(args.duration, args.max_calls, args.warmup)
    body = b"x" * args.payload if args.payload else b'{"method": "add", "args": [1, 1]}'
    kind = args.kind
    if kind == "aiopika":
        common.emit(peers.aiopika_client(args.server_id, args.concurrency, rec))
        return
    if kind == "pika-blocking":
        common.emit(peers.pika_blocking_client(args.server_id, rec))
        return
    from benchmarks import _tw

    if kind == "memory":
        _tw.run_client(lambda: memory_client(args))
    elif kind.startswith("txcallme") or kind in ("soak", "twistd"):
        _tw.run_client(lambda: txcallme_client(args, rec))
    elif kind in ("floor-pika", "floor-txamqp", "pika-twisted"):
        if kind == "pika-twisted":
            body = json.dumps([1, 1]).encode()
        cls = floor.TxamqpClient if kind == "floor-txamqp" else floor.PikaClient
        client = cls(args.server_id, body)

        async def run() -> dict[str, Any]:
            await client.connect()
            return await _tw.drive_twisted(client.call, args.concurrency, rec)
        _tw.run_client(run)
    else:
        raise SystemExit(f"unknown client kind {kind!r}")


if __name__ == "__main__":
    assert asyncio  # aio-pika clients run their own loop
    main()
