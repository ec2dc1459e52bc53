"""Fault injection on a throwaway RabbitMQ node: broker restart, server kill -9,
server SIGTERM, client connection abort.

Every scenario counts, for each call, how its Deferred ended: answered (with the
right value), failed with a txcallme error (a CallmeError), failed otherwise,
never fired within its timeout plus a margin (lost), or fired more than once
(duplicate; a second delivery inside the library shows up as a logged
AlreadyCalledError, also counted). Lost, duplicate, wrong and unclear must be 0.
The counts are printed (``pytest -s``) and written to /tmp/txcallme-faults.json.

Servers are ``twistd -n callme`` subprocesses; the shared broker on 5672 is never
used here. Every process started here is killed at teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import pytest_twisted
from rabbitnode import RabbitNode
from twisted.internet import reactor, task, threads
from twisted.internet.defer import AlreadyCalledError, Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from txcallme import BrokerConnectionLost, CallmeError, Proxy, ServerUnavailable

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TWISTD = Path(sys.executable).with_name("twistd")
RESULTS_FILE = Path("/tmp/txcallme-faults.json")
#: How long after its timeout a call may still fire before it counts as lost.
MARGIN = 5.0
#: A call failed "promptly" by a connection drop fires within this many seconds.
PROMPT = 3.0
SERVE_TIMEOUT = 30.0

FAULTAPP = '''\
"""Functions served by the fault-injection tests."""

import os
import re
import time


def add(a, b):
    return a + b


def slow(x, delay=0.05):
    time.sleep(delay)
    return x


def slow_tagged(x, delay=0.05):
    """slow(), also saying which process ran it and when it finished."""
    time.sleep(delay)
    return [x, os.getpid(), time.time()]
'''


def now() -> float:
    return time.monotonic()


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll *predicate* on the reactor until true; fail after *timeout* seconds."""
    deadline = now() + timeout
    while not predicate():
        if now() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await sleep(0.05)


def new_server_id() -> str:
    return f"faults-{uuid4().hex[:8]}"


# --- counting calls ------------------------------------------------------------------


class Call:
    """One tracked call and how its Deferred ended."""

    __slots__ = ("expected", "timeout", "issued", "fires", "fired_at", "value", "error",
                 "tags")

    def __init__(self, expected: Any, timeout: float, tags: dict[str, Any]) -> None:
        self.expected = expected
        self.timeout = timeout
        self.issued = now()
        self.fires = 0
        self.fired_at: float | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.tags = tags

    @property
    def answered(self) -> bool:
        return self.fires > 0 and self.error is None

    def failed_with(self, kind: type[BaseException]) -> bool:
        return self.error is not None and isinstance(self.error, kind)


class Tally:
    """Counts the outcomes of a scenario's calls."""

    def __init__(self, name: str, check: Callable[[Any, Any], bool] | None = None) -> None:
        self.name = name
        self.calls: list[Call] = []
        self._check = check or (lambda value, expected: value == expected)

    def track(self, d: Deferred[Any], expected: Any, timeout: float, **tags: Any) -> Call:
        call = Call(expected, timeout, tags)
        self.calls.append(call)

        def fired(result: Any) -> None:
            call.fires += 1
            call.fired_at = now()
            if isinstance(result, Failure):
                call.error = result.value
            else:
                call.value = result

        d.addBoth(fired)
        return call

    def count(self, predicate: Callable[[Call], bool]) -> int:
        return sum(1 for c in self.calls if predicate(c))

    @property
    def answered(self) -> int:
        return self.count(lambda c: c.answered)

    @property
    def unfired(self) -> int:
        return self.count(lambda c: c.fires == 0)

    async def settle(self) -> None:
        """Wait until every call fired, or until each had its timeout plus MARGIN."""
        deadline = max((c.issued + c.timeout + MARGIN for c in self.calls), default=now())
        while self.unfired and now() < deadline:
            await sleep(0.1)

    def summary(self, events: LogEvents | None = None) -> dict[str, Any]:
        errors = Counter(type(c.error).__name__ for c in self.calls if c.error is not None)
        result = {
            "calls": len(self.calls),
            "answered": self.count(lambda c: c.answered and self._check(c.value, c.expected)),
            "wrong_value": self.count(
                lambda c: c.answered and not self._check(c.value, c.expected)),
            "failed_clearly": self.count(lambda c: c.failed_with(CallmeError)),
            "failed_other": self.count(
                lambda c: c.error is not None and not isinstance(c.error, CallmeError)),
            "lost": self.unfired,
            "duplicates": self.count(lambda c: c.fires > 1) + (
                events.already_called if events else 0),
            "errors": dict(errors),
        }
        if events is not None:
            result["late_replies_dropped_by_proxy"] = events.dropped_replies
            result["failures_logged_in_test_process"] = len(events.failures)
        return result


class LogEvents:
    """Counts library log events that reveal duplicate or late replies."""

    def __init__(self) -> None:
        self.dropped_replies = 0
        self.already_called = 0
        self.failures: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        fmt = event.get("log_format") or ""
        if event.get("log_namespace") == "callme.proxy" and "dropping a reply" in fmt:
            self.dropped_replies += 1
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            if failure.check(AlreadyCalledError):
                self.already_called += 1
            self.failures.append(failure.getTraceback())


def record(name: str, data: dict[str, Any]) -> None:
    """Print a scenario's counts and merge them into RESULTS_FILE."""
    print(f"\n[faults] {name}: {json.dumps(data, sort_keys=True)}")
    try:
        results = json.loads(RESULTS_FILE.read_text())
    except (OSError, ValueError):
        results = {}
    results[name] = data
    RESULTS_FILE.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def assert_clean(summary: dict[str, Any]) -> None:
    assert summary["lost"] == 0, summary
    assert summary["duplicates"] == 0, summary
    assert summary["wrong_value"] == 0, summary
    assert summary["failed_other"] == 0, summary


# --- servers in subprocesses ---------------------------------------------------------


class Server:
    def __init__(self, process: subprocess.Popen[bytes], log: Path, server_id: str) -> None:
        self.process = process
        self.log = log
        self.server_id = server_id

    @property
    def pid(self) -> int:
        return self.process.pid

    def serving_count(self) -> int:
        """How many times the server announced it is consuming (once per connection)."""
        try:
            return self.log.read_text(errors="replace").count(f"serving {self.server_id!r}")
        except OSError:
            return 0

    def alive(self) -> bool:
        return self.process.poll() is None

    async def serving(self, times: int = 1, timeout: float = SERVE_TIMEOUT) -> None:
        deadline = now() + timeout
        while self.serving_count() < times:
            assert self.alive(), f"twistd exited early:\n{self.log.read_text()}"
            assert now() < deadline, f"not serving after {timeout:g} s:\n{self.log.read_text()}"
            await sleep(0.1)


class Servers:
    """``twistd -n callme`` subprocesses, all killed at teardown."""

    def __init__(self, node: RabbitNode, appdir: Path, logdir: Path) -> None:
        self.node = node
        self.appdir = appdir
        self.logdir = logdir
        self.started: list[Server] = []

    def start(self, server_id: str, module: str = "faultapp", *, cwd: Path | None = None,
              threads: int = 8) -> Server:
        log = self.logdir / f"twistd-{len(self.started)}-{server_id}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(TWISTD), "--pidfile=", "-n", "callme", "--server-id", server_id,
                 "--module", module, "--amqp-url", self.node.url, "--threads", str(threads)],
                cwd=cwd or self.appdir, stdout=out, stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "CALLME_AMQP_URL"})
        server = Server(process, log, server_id)
        self.started.append(server)
        return server

    def problems(self) -> dict[str, int]:
        """Warnings, errors and tracebacks the servers logged (timestamps cut off)."""
        found: Counter[str] = Counter()
        for server in self.started:
            try:
                text = server.log.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if re.search(r"#(warn|error|critical)\]|Traceback|Unhandled", line):
                    found[line.split(" ", 1)[-1][:160]] += 1
        return dict(found)

    def kill_all(self) -> None:
        for server in self.started:
            if server.process.poll() is None:
                server.process.kill()
            server.process.wait(timeout=30)


class Proxies:
    def __init__(self, node: RabbitNode) -> None:
        self.node = node
        self.made: list[Proxy] = []

    async def ready(self, timeout: float) -> Proxy:
        proxy = Proxy(amqp_url=self.node.url, timeout=timeout)
        self.made.append(proxy)
        await proxy.when_ready().addTimeout(30, reactor)
        return proxy


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    """One separate RabbitMQ node for the module, always cleaned up."""
    RESULTS_FILE.write_text("{}\n")
    began = now()
    rabbit = RabbitNode()
    try:
        took = rabbit.start()
        record("node", {"nodename": rabbit.nodename, "port": rabbit.port,
                        "start_seconds": round(took, 1)})
        yield rabbit
    finally:
        rabbit.cleanup()
        left = rabbit.processes()
        record("node", {"nodename": rabbit.nodename, "port": rabbit.port,
                        "start_seconds": [round(t, 1) for t in rabbit.start_times],
                        "processes_left_after_cleanup": left,
                        "module_seconds": round(now() - began, 1)})
        assert not left, f"node processes left behind: {left}"


@pytest.fixture(scope="module")
def appdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faultapp")
    (path / "faultapp.py").write_text(textwrap.dedent(FAULTAPP))
    return path


@pytest.fixture
def servers(node: RabbitNode, appdir: Path, tmp_path: Path) -> Iterator[Servers]:
    helper = Servers(node, appdir, tmp_path)
    try:
        yield helper
    finally:
        helper.kill_all()


@pytest_twisted.async_yield_fixture
async def proxies(node: RabbitNode) -> Any:
    helper = Proxies(node)
    try:
        yield helper
    finally:
        await sleep(0)
        for proxy in helper.made:
            await proxy.close().addTimeout(15, reactor)


@pytest.fixture
def events() -> Iterator[LogEvents]:
    observer = LogEvents()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


# --- scenarios -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_connection_abort(servers: Servers, proxies: Proxies,
                                       events: LogEvents) -> None:
    """Aborting the Proxy's connection fails its 50 in-flight calls at once with
    BrokerConnectionLost; the Proxy reconnects and new calls are answered."""
    sid = new_server_id()
    server = servers.start(sid)
    await server.serving()
    proxy = await proxies.ready(timeout=30)
    assert await proxy.call(sid, "slow", -1, delay=0) == -1

    in_flight = Tally("abort.in_flight")
    for i in range(50):
        in_flight.track(proxy.call(sid, "slow", i, delay=0.5), i, 30)
    await sleep(0.5)
    assert in_flight.unfired == 50, "the calls were meant to be in flight"
    aborted = now()
    proxy._session.connection.protocol.transport.abortConnection()
    await in_flight.settle()

    await proxy.when_ready().addTimeout(20, reactor)
    reconnected = now() - aborted
    after = Tally("abort.after")
    for i in range(20):
        after.track(proxy.call(sid, "slow", 1000 + i, delay=0), 1000 + i, 30)
    await after.settle()

    slowest = max(c.fired_at - aborted for c in in_flight.calls if c.fired_at is not None)
    data = {"in_flight": in_flight.summary(events), "after_reconnect": after.summary(),
            "slowest_in_flight_failure_s": round(slowest, 2),
            "reconnected_after_s": round(reconnected, 2)}
    data["server_log_problems"] = servers.problems()
    record("d_client_abort", data)
    assert_clean(data["in_flight"])
    assert in_flight.count(lambda c: c.failed_with(BrokerConnectionLost)) == 50, data
    assert slowest < PROMPT, data
    assert_clean(data["after_reconnect"])
    assert after.answered == 20, data
    assert proxy.pending_count == 0


@pytest_twisted.ensureDeferred
async def test_kill_one_of_two_servers(servers: Servers, proxies: Proxies,
                                       events: LogEvents) -> None:
    """kill -9 of one of two servers during 500 calls: its unacked requests go to the
    other one; every call is answered exactly once, none lost."""
    sid = new_server_id()
    victim, survivor = servers.start(sid), servers.start(sid)
    await victim.serving()
    await survivor.serving()
    proxy = await proxies.ready(timeout=60)

    tally = Tally("kill9", check=lambda value, expected: value[0] == expected)
    for i in range(500):
        tally.track(proxy.call(sid, "slow_tagged", i), i, 60)
    await wait_for(lambda: tally.answered >= 100, 30, "100 answers")
    killed_after = tally.answered
    victim.process.send_signal(signal.SIGKILL)
    await tally.settle()
    await wait_for(lambda: not victim.alive(), 10, "the killed server to go")

    by_pid = Counter(c.value[1] for c in tally.calls if c.answered)
    data = tally.summary(events)
    data.update({"answered_before_kill": killed_after,
                 "answered_by_victim": by_pid[victim.pid],
                 "answered_by_survivor": by_pid[survivor.pid]})
    data["server_log_problems"] = servers.problems()
    record("b_kill9_server", data)
    assert_clean(data)
    assert data["answered"] == 500, data
    assert by_pid[victim.pid] > 0 and by_pid[survivor.pid] > 0, data
    assert victim.process.returncode == -signal.SIGKILL


@pytest_twisted.ensureDeferred
async def test_sigterm_one_of_two_servers(servers: Servers, proxies: Proxies,
                                          events: LogEvents) -> None:
    """SIGTERM to one of two servers during 200 calls: its running calls finish and
    reply, its unstarted requests go to the other; all 200 answered, none lost."""
    sid = new_server_id()
    leaving, staying = servers.start(sid), servers.start(sid)
    await leaving.serving()
    await staying.serving()
    proxy = await proxies.ready(timeout=60)

    tally = Tally("sigterm", check=lambda value, expected: value[0] == expected)
    for i in range(200):
        tally.track(proxy.call(sid, "slow_tagged", i, delay=0.2), i, 60)
    await wait_for(lambda: tally.answered >= 30, 30, "30 answers")
    termed_at = time.time()
    leaving.process.send_signal(signal.SIGTERM)
    await tally.settle()
    await wait_for(lambda: not leaving.alive(), 20, "the SIGTERMed server to exit")

    answers = [c.value for c in tally.calls if c.answered]
    drained = sum(1 for _, pid, done in answers if pid == leaving.pid and done > termed_at)
    data = tally.summary(events)
    data.update({
        "answered_by_leaving": sum(1 for _, pid, _ in answers if pid == leaving.pid),
        "finished_by_leaving_after_sigterm": drained,
        "answered_by_staying": sum(1 for _, pid, _ in answers if pid == staying.pid),
        "leaving_exit_status": leaving.process.returncode,
    })
    data["server_log_problems"] = servers.problems()
    record("c_sigterm_server", data)
    assert_clean(data)
    assert data["answered"] == 200, data
    assert drained > 0, data
    assert data["late_replies_dropped_by_proxy"] == 0, data
    assert leaving.process.returncode in (0, -signal.SIGTERM), data


STREAM_SECONDS = 26.0
RATE = 20.0
RESTART_AT = 4.0
CALL_TIMEOUT = 25.0


@pytest_twisted.ensureDeferred
async def test_broker_restart_during_stream(node: RabbitNode, servers: Servers,
                                            proxies: Proxies, events: LogEvents) -> None:
    """A broker restart during 20 calls/s: calls in flight fail at once with
    BrokerConnectionLost, calls made while disconnected wait for the reconnect,
    servers and Proxy come back and later calls are answered."""
    sid_add, sid_slow = new_server_id(), new_server_id()
    adder = servers.start(sid_add, "app", cwd=EXAMPLES)
    sleeper = servers.start(sid_slow)
    await adder.serving()
    await sleeper.serving()
    proxy = await proxies.ready(timeout=CALL_TIMEOUT)
    assert await proxy.call(sid_add, "add", 1, 2) == 3

    stream = Tally("restart.stream")
    in_flight = Tally("restart.in_flight")
    times: dict[str, float] = {}
    restart: Deferred[float] | None = None
    began = now()
    issued = 0
    while now() - began < STREAM_SECONDS:
        t = now()
        if restart is None and t - began >= RESTART_AT:
            for k in range(16):  # 8 running on the server, 8 waiting in its queue
                in_flight.track(proxy.call(sid_slow, "slow", k, delay=3), k, CALL_TIMEOUT)
            await sleep(0.3)
            times["restart"] = now()
            restart = threads.deferToThread(node.restart)
        connected = proxy._session.connection is not None
        if "restart" in times and "down" not in times and not connected:
            times["down"] = now()
        if "down" in times and "up" not in times and connected:
            times["up"] = now()
        if "up" in times and "servers" not in times and (
                adder.serving_count() >= 2 and sleeper.serving_count() >= 2):
            times["servers"] = now()
        if "restart" not in times:
            phase = "before"
        elif "down" not in times:
            phase = "dropping"
        elif not connected:
            phase = "disconnected"
        elif "servers" not in times:
            phase = "reconnecting"
        else:
            phase = "after"
        while issued < (now() - began) * RATE:
            stream.track(proxy.call(sid_add, "add", issued, 1), issued + 1, CALL_TIMEOUT,
                         phase=phase)
            issued += 1
        await sleep(0.02)
    await stream.settle()
    await in_flight.settle()
    assert restart is not None
    await wait_for(lambda: restart.called, 60, "the broker restart")
    restart_seconds = await restart
    assert await proxy.call(sid_slow, "slow", 7, delay=0) == 7

    phases = {}
    for phase in ("before", "dropping", "disconnected", "reconnecting", "after"):
        part = Tally(phase)
        part.calls = [c for c in stream.calls if c.tags["phase"] == phase]
        phases[phase] = part
    down = times.get("down", float("inf"))
    slowest = max((c.fired_at - down for c in in_flight.calls if c.fired_at is not None),
                  default=None)
    up = times.get("up", float("inf"))
    waited_ok = phases["disconnected"].count(
        lambda c: c.fires == 1 and c.fired_at is not None and c.fired_at >= up - 0.1)
    data = {
        "stream": stream.summary(events),
        "phases": {name: part.summary() for name, part in phases.items()},
        "in_flight": in_flight.summary(),
        "slowest_in_flight_failure_after_drop_s": slowest and round(slowest, 2),
        "timeline_s": {k: round(v - began, 2) for k, v in sorted(times.items(),
                                                                 key=lambda kv: kv[1])},
        "node_restart_start_seconds": round(restart_seconds, 1),
        "disconnected_calls_that_waited_for_reconnect": waited_ok,
    }
    data["server_log_problems"] = servers.problems()
    record("a_broker_restart", data)
    assert {"down", "up", "servers"} <= set(times), data
    assert_clean(data["stream"])
    assert_clean(data["in_flight"])
    # Calls in flight at the drop fail at once, not after their 25 s timeout.
    assert in_flight.count(lambda c: c.failed_with(BrokerConnectionLost)) == 16, data
    assert slowest is not None and slowest < PROMPT, data
    # Calls made while disconnected waited for the reconnect (none failed before
    # it) and then were answered, or refused clearly if their server was not back.
    disconnected = phases["disconnected"]
    assert disconnected.calls, data
    assert waited_ok == len(disconnected.calls), data
    assert disconnected.count(
        lambda c: not (c.answered or c.failed_with(ServerUnavailable))) == 0, data
    # Once the Proxy and both servers are back, every call is answered.
    assert phases["before"].answered == len(phases["before"].calls), data
    assert phases["after"].calls and phases["after"].answered == len(phases["after"].calls), data
