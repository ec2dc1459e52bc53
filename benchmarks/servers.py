"""Benchmark servers: ``python -m benchmarks.servers KIND SERVER_ID``.

Prints READY once consuming; on SIGTERM prints one JSON line (CPU time and
calls since READY) and exits.

Kinds: txcallme (add, echo on the reactor), txcallme-threads (a 10 ms
blocking sleep in a 32-thread pool), txcallme-hold (calls wait until
shutdown: the memory workload), floor-pika, floor-txamqp (raw echo),
aiopika (aio-pika RPC), pika-tutorial (blocking pika).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from benchmarks import _tw, common, floor, peers

THREADS = 32


async def txcallme_server(stats: common.ServerStats, server_id: str, kind: str) -> Any:
    from twisted.internet.defer import Deferred

    from txcallme import CallmeServerService

    threaded = kind == "txcallme-threads"
    service = CallmeServerService(server_id, common.HOST, common.PORT, common.USER,
                                  common.PASSWORD, threading=threaded, threads=THREADS)
    held: list[Deferred[None]] = []
    lock = threading.Lock()

    def add(a: int, b: int) -> int:
        stats.calls += 1
        return a + b

    def echo(value: Any) -> Any:
        stats.calls += 1
        return value

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


def main(argv: list[str]) -> None:
    kind, server_id = argv
    if kind.startswith("txcallme"):
        _tw.run_server(lambda stats: txcallme_server(stats, server_id, kind))
    elif kind == "floor-pika":
        _tw.run_server(lambda stats: floor.pika_server(stats, server_id))
    elif kind == "floor-txamqp":
        _tw.run_server(lambda stats: floor.txamqp_server(stats, server_id))
    elif kind == "aiopika":
        peers.aiopika_server(server_id)
    elif kind == "pika-tutorial":
        peers.pika_tutorial_server(server_id)
    else:
        raise SystemExit(f"unknown server kind {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
