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
from array import array
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HOST = os.environ.get("BENCH_AMQP_HOST", "127.0.0.1")
PORT = int(os.environ.get("BENCH_AMQP_PORT", "5672"))
USER = os.environ.get("BENCH_AMQP_USER", "guest")
PASSWORD = os.environ.get("BENCH_AMQP_PASSWORD", "guest")
SPEC_PATH = Path(__file__).resolve().parent.parent / "txcallme" / "amqp" / "amqp0-9-1.xml"


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


def records(count: int = 1000) -> list[dict[str, Any]]:
    """The records workload's document: *count* small dicts, about 100 bytes each
    as JSON (an id, a name, an email, a score, a flag and two tags)."""
    return [{"id": i, "name": f"user-{i:05d}", "email": f"user{i}@example.com",
             "score": round((i * 7919 % 10007) / 100.07, 2), "active": i % 3 == 0,
             "tags": ["a", "b"]}
            for i in range(count)]


def records_size(count: int = 1000) -> int:
    """Bytes of the records document as JSON (what the string echo of the same
    size sends)."""
    return len(json.dumps(records(count), separators=(",", ":")))


class RSSSampler:
    """RSS of this process every *interval* seconds, with wall-clock times (so
    the orchestrator can line up a server's samples with a client's phases)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []

    def sample(self) -> None:
        self.samples.append((time.time(), rss_bytes()))


def rss_at(samples: list[Any], when: float) -> int | None:
    """The sample nearest to wall-clock time *when*."""
    if not samples:
        return None
    return int(min(samples, key=lambda s: abs(s[0] - when))[1])


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

    def report(self, **extra: Any) -> None:
        cpu = cpu_seconds() - self._cpu0
        per_call = cpu / self.calls * 1e6 if self.calls else None
        emit({"side": "server", "calls": self.calls, "cpu_s": cpu,
              "server_cpu_us_per_call": per_call, **extra})


#: latencies kept per run (the most recent ones); preallocated, so a long run's
#: RSS does not grow with its call count
KEEP_LATENCIES = 200_000


class Recorder:
    """Latencies and counts of the measured (post warm-up) calls."""

    def __init__(self, duration: float, max_calls: int, warmup: float) -> None:
        self.duration = duration
        self.max_calls = max_calls
        self.warmup = warmup
        self.calls = 0
        self._kept = array("d", bytes(8 * KEEP_LATENCIES))
        self.errors = 0
        self.t0 = 0.0
        self.t_end = 0.0
        self.cpu0 = 0.0
        self.measuring = False
        self.wall0 = 0.0
        self.wall1 = 0.0

    @property
    def latencies(self) -> list[float]:
        return list(self._kept[:min(self.calls, KEEP_LATENCIES)])

    def add(self, latency: float) -> None:
        self._kept[self.calls % KEEP_LATENCIES] = latency
        self.calls += 1

    def begin(self) -> None:
        self.measuring = True
        self.calls = 0
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        self.cpu0 = cpu_seconds()

    def done(self) -> bool:
        return self.measuring and (self.calls >= self.max_calls
                                   or time.perf_counter() - self.t0 >= self.duration)

    def finish(self) -> None:
        self.t_end = time.perf_counter()
        self.wall1 = time.time()
        self.cpu = cpu_seconds() - self.cpu0

    def result(self, **extra: Any) -> dict[str, Any]:
        n = self.calls
        elapsed = self.t_end - self.t0
        lat = sorted(self.latencies)
        out = {"side": "client", "calls": n, "seconds": elapsed, "errors": self.errors,
               "calls_per_s": n / elapsed if elapsed else None,
               "p50_ms": percentile(lat, 0.50) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3,
               "client_cpu_us_per_call": self.cpu / n * 1e6 if n else None,
               "measured_from": self.wall0, "measured_until": self.wall1}
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
                rec.add(time.perf_counter() - t)
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
        rec.add(time.perf_counter() - t)
    rec.finish()
    return rec.result(concurrency=1)


#: --observe modes: what each side switches on before creating its Proxy / service
OBSERVE_MODES = ("everything", "prometheus", "sampled")


def enable_observe(mode: str | None) -> None:
    """Switch on observability for *mode*: ``everything`` (all traces recorded,
    OpenTelemetry metrics, Prometheus), ``sampled`` (the same with 1 % of traces
    sampled) or ``prometheus`` (Prometheus metrics only)."""
    if not mode:
        return
    from txcallme import observe

    if mode == "prometheus":
        observe.enable_prometheus()
    elif mode == "sampled":
        observe.enable_everything(sample_ratio=0.01)
    else:
        observe.enable_everything()
