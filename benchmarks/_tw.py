"""Twisted plumbing for benchmark processes: run a client coroutine, run a
server until SIGTERM, and the Twisted flavour of the call driver."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall, deferLater, react

from benchmarks.common import Recorder, RSSSampler, ServerStats, drive, emit


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def gather(coroutines: list[Coroutine[Any, Any, Any]]) -> Deferred[Any]:
    return DeferredList([Deferred.fromCoroutine(c) for c in coroutines],
                        fireOnOneErrback=True, consumeErrors=True)


async def drive_twisted(call: Callable[[], Deferred[Any]], concurrency: int,
                        rec: Recorder) -> dict[str, Any]:
    return await drive(call, concurrency, rec, sleep, gather)


def run_client(main: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Run *main* on the reactor and print its result as one JSON line."""

    async def wrapped(_reactor: Any) -> None:
        emit(await main())

    react(lambda r: Deferred.fromCoroutine(wrapped(r)))


def run_server(start: Callable[[ServerStats], Awaitable[Callable[[], Awaitable[Any]] | None]],
               ) -> None:
    """Start a server, print READY, and on SIGTERM stop it and print its stats
    (with its RSS, sampled every second from READY on)."""
    stats = ServerStats()
    stopper: list[Callable[[], Awaitable[Any]]] = []
    rss = RSSSampler()
    sampling = LoopingCall(rss.sample)

    async def begin() -> None:
        try:
            stop = await start(stats)
        except Exception as e:
            import sys
            sys.stderr.write(f"server failed to start: {e!r}\n")
            reactor.stop()
            return
        if stop is not None:
            stopper.append(stop)
        stats.start()
        sampling.start(1.0)

    async def end() -> None:
        if sampling.running:
            sampling.stop()
        rss.sample()
        stats.report(rss_samples=rss.samples)
        for stop in stopper:
            try:
                await Deferred.fromCoroutine(_timeout(stop(), 10))
            except Exception:
                pass

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(begin()))
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: Deferred.fromCoroutine(end()))
    reactor.run()


async def _timeout(awaitable: Awaitable[Any], seconds: float) -> Any:
    d = Deferred.fromCoroutine(_await(awaitable))
    d.addTimeout(seconds, reactor)
    return await d


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
