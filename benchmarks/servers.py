"""Benchmark servers: ``python -m benchmarks.servers KIND SERVER_ID [options]``.

Prints READY once consuming; on SIGTERM prints one JSON line (CPU time and
calls since READY, and RSS samples taken every second) and exits.

Kinds: txcallme (add, echo, blob on the reactor), txcallme-threads (a 10 ms
blocking sleep in a 32-thread pool), txcallme-hold (calls wait until
shutdown: the memory workload), floor-pika, floor-txamqp (raw echo, or a
reply of ``--reply-bytes``), aiopika (aio-pika RPC), pika-tutorial (blocking
pika), twistd (``twistd -n callme`` serving benchmarks.handlers, with
``--processes``).
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from benchmarks import _tw, common, floor, peers

THREADS = 32


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.servers")
    p.add_argument("kind")
    p.add_argument("server_id")
    p.add_argument("--reply-bytes", type=int, default=0,
                   help="floor servers: reply with this many bytes instead of echoing")
    p.add_argument("--observe", nargs="?", const="everything", default=None,
                   choices=common.OBSERVE_MODES,
                   help="txcallme: observability on (everything, prometheus only, or 1 %% sampled)")
    p.add_argument("--processes", type=int, default=1, help="twistd: --processes")
    return p.parse_args(argv)


async def txcallme_server(stats: common.ServerStats, args: argparse.Namespace) -> Any:
    from twisted.internet.defer import Deferred

    from txcallme import CallmeServerService

    common.enable_observe(args.observe)
    kind = args.kind
    threaded = kind == "txcallme-threads"
    service = CallmeServerService(args.server_id, common.HOST, common.PORT, common.USER,
                                  common.PASSWORD, threading=threaded, threads=THREADS)
    held: list[Deferred[None]] = []
    lock = threading.Lock()
    blobs: dict[int, str] = {}

    def add(a: int, b: int) -> int:
        stats.calls += 1
        return a + b

    def echo(value: Any) -> Any:
        stats.calls += 1
        return value

    def blob(size: int) -> str:
        """A large result for a small request (built once per size)."""
        stats.calls += 1
        if size not in blobs:
            blobs[size] = "x" * size
        return blobs[size]

    def sleepy() -> None:
        time.sleep(0.010)
        with lock:
            stats.calls += 1

    def hold() -> Deferred[None]:
        stats.calls += 1
        d: Deferred[None] = Deferred()
        held.append(d)
        return d

    service.register_function(add, blocking=False)
    service.register_function(echo, blocking=False)
    service.register_function(blob, blocking=False)
    service.register_function(hold, blocking=False)
    if threaded:
        service.register_function(sleepy, blocking=True)
    service.startService()
    await service.when_ready()

    async def stop() -> None:
        for d in held:
            d.callback(None)
        await service.stopService()
    return stop


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    kind = args.kind
    if kind.startswith("txcallme"):
        _tw.run_server(lambda stats: txcallme_server(stats, args))
    elif kind == "floor-pika":
        _tw.run_server(lambda stats: floor.pika_server(stats, args.server_id, args.reply_bytes))
    elif kind == "floor-txamqp":
        _tw.run_server(lambda stats: floor.txamqp_server(stats, args.server_id,
                                                         args.reply_bytes))
    elif kind == "twistd":
        from benchmarks import processes

        processes.twistd_server(args.server_id, args.processes)
    elif kind == "aiopika":
        peers.aiopika_server(args.server_id)
    elif kind == "pika-tutorial":
        peers.pika_tutorial_server(args.server_id)
    else:
        raise SystemExit(f"unknown server kind {kind!r}")


if __name__ == "__main__":
    main()
