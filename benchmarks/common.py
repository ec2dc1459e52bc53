"""Shared pieces of the benchmark processes: broker settings, the READY and
result protocol between the orchestrator and its children, CPU and memory
readings, and the call drivers (one at a time, or N calls in flight).

A server process prints ``READY`` once it consumes, then, when it receives
SIGTERM, one JSON line with its CPU time and call count since READY. A client
process prints one JSON line with its results.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HOST = os.environ.get("BENCH_AMQP_HOST", "127.0.0.1")
PORT = int(os.environ.get("BENCH_AMQP_PORT", "5672"))
USER = os.environ.get("BENCH_AMQP_USER", "guest")
PASSWORD = os.environ.get("BENCH_AMQP_PASSWORD", "guest")
SPEC_PATH = Path(__file__).resolve().parent.parent / "txcallme" / "amqp0-9-1.xml"


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line for the orchestrator."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def ready() -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    """User plus system CPU time of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes() -> int:
    """Current resident set size, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class ServerStats:
    """Counts calls and CPU time from READY until SIGTERM."""

    def __init__(self) -> None:
        self.calls = 0
        self._cpu0 = 0.0

    def start(self) -> None:
        self._cpu0 = cpu_seconds()
        ready()

    def report(self) -> None:
        cpu = cpu_seconds() - self._cpu0
        per_call = cpu / self.calls * 1e6 if self.calls else None
        emit({"side": "server", "calls": self.calls, "cpu_s": cpu,
              "server_cpu_us_per_call": per_call})


class Recorder:
    """Latencies and counts of the measured (post warm-up) calls."""

    def __init__(self, duration: float, max_calls: int, warmup: float) -> None:
        self.duration = duration
        self.max_calls = max_calls
        self.warmup = warmup
        self.latencies: list[float] = []
        self.errors = 0
        self.t0 = 0.0
        self.t_end = 0.0
        self.cpu0 = 0.0
        self.measuring = False

    def begin(self) -> None:
        self.measuring = True
        self.latencies = []
        self.t0 = time.perf_counter()
        self.cpu0 = cpu_seconds()

    def done(self) -> bool:
        return self.measuring and (len(self.latencies) >= self.max_calls
                                   or time.perf_counter() - self.t0 >= self.duration)

    def finish(self) -> None:
        self.t_end = time.perf_counter()
        self.cpu = cpu_seconds() - self.cpu0

    def result(self, **extra: Any) -> dict[str, Any]:
        n = len(self.latencies)
        elapsed = self.t_end - self.t0
        lat = sorted(self.latencies)
        out = {"side": "client", "calls": n, "seconds": elapsed, "errors": self.errors,
               "calls_per_s": n / elapsed if elapsed else None,
               "p50_ms": percentile(lat, 0.50) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3,
               "client_cpu_us_per_call": self.cpu / n * 1e6 if n else None}
        out.update(extra)
        return out


async def drive(call: Callable[[], Awaitable[Any]], concurrency: int, rec: Recorder,
                sleep: Callable[[float], Awaitable[Any]],
                gather: Callable[[list[Any]], Awaitable[Any]]) -> dict[str, Any]:
    """Keep *concurrency* calls going: warm up, then measure until done.

    Works with Twisted (``call`` returns a Deferred; the caller runs this under
    ``Deferred.fromCoroutine``) and with asyncio alike: *sleep* and *gather*
    come from the event loop in use.
    """

    async def worker() -> None:
        while not rec.done():
            t = time.perf_counter()
            try:
                await call()
            except Exception as e:  # counted, the first one reported
                if not rec.errors:
                    sys.stderr.write(f"call failed: {e!r}\n")
                rec.errors += 1
                if rec.errors > 1000:
                    return
                continue
            if rec.measuring and not rec.t_end:
                rec.latencies.append(time.perf_counter() - t)
        if not rec.t_end:
            rec.finish()

    running = gather([worker() for _ in range(concurrency)])
    await sleep(rec.warmup)
    rec.begin()
    await running
    return rec.result(concurrency=concurrency)


def drive_sync(call: Callable[[], Any], rec: Recorder) -> dict[str, Any]:
    """One call at a time, blocking: warm up, then measure."""
    t_warm = time.perf_counter() + rec.warmup
    while time.perf_counter() < t_warm:
        call()
    rec.begin()
    while not rec.done():
        t = time.perf_counter()
        call()
        rec.latencies.append(time.perf_counter() - t)
    rec.finish()
    return rec.result(concurrency=1)
