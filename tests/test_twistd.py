"""``twistd callme`` end to end: plugin listing, foreground, daemon, graceful stop.

Each twistd runs as a subprocess against the real broker; the Proxy parts are
pytest-twisted tests that never block the reactor (they poll with deferLater).
Every process started here is killed at teardown if it is still alive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import BROKER_HOST, BROKER_PORT, broker_connect, new_server_id, sleep
from twisted.internet.defer import CancelledError, Deferred

from txcallme import NotFound, RpcTimeout, ServerUnavailable

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TWISTD = Path(sys.executable).with_name("twistd")
BROKER_URL = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def pid_alive(pid: int) -> bool:
    """True while *pid* runs (a zombie, not reaped by a lazy init, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Processes:
    """twistd processes (children or daemons) killed at teardown if alive."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.children: list[subprocess.Popen[bytes]] = []
        self.pidfiles: list[Path] = []

    def twistd(self, *args: str, cwd: Path = EXAMPLES, log: str = "twistd.log",
               ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``twistd ARGS``; its stdout and stderr go to a file in tmp_path."""
        log_path = self.tmp_path / log
        env = dict(os.environ, CALLME_AMQP_URL=BROKER_URL)
        with log_path.open("wb") as out:
            process = subprocess.Popen([str(TWISTD), *args], cwd=cwd, env=env, stdout=out,
                                       stderr=subprocess.STDOUT)
        self.children.append(process)
        return process, log_path

    def kill_all(self) -> None:
        for process in self.children:
            if process.poll() is None:
                process.kill()
                process.wait()
        for pidfile in self.pidfiles:
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                continue
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """A :class:`Processes`; everything it started is killed at teardown."""
    helper = Processes(tmp_path)
    try:
        yield helper
    finally:
        helper.kill_all()


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll *predicate* every 0.1 s on the reactor; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(0.1)


async def call_when_serving(proxy: Any, server_id: str, method: str, *args: Any,
                            alive: Any = lambda: True) -> Any:
    """Call until the server answers (it may not be consuming yet)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert alive(), "twistd died before serving"
        try:
            return await proxy.invoke(server_id, method, args, timeout=2)
        except (ServerUnavailable, RpcTimeout):
            if time.monotonic() > deadline:
                raise
            await sleep(0.2)


async def queue_exists(name: str) -> bool:
    """Whether the broker has queue *name* (passive declare)."""
    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        try:
            await channel.declare_queue(name, passive=True)
        except NotFound:
            return False
        await channel.close()
        return True
    finally:
        await connection.close()


def stopped_by_sigterm(status: int | None) -> bool:
    """twistd re-raises SIGTERM after a clean shutdown (see NOTES-amqp.md)."""
    return status in (0, -signal.SIGTERM)


def test_help_lists_callme() -> None:
    """``twistd --help`` lists the callme plugin."""
    result = subprocess.run([str(TWISTD), "--help"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    commands = [line.split()[0] for line in result.stdout.splitlines()
                if line.startswith("    ") and line.split()]
    assert "callme" in commands, result.stdout


def test_callme_help() -> None:
    """``twistd callme --help`` documents the required options."""
    result = subprocess.run([str(TWISTD), "callme", "--help"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "--server-id" in result.stdout
    assert "--module" in result.stdout


def test_usage_error_exits_non_zero(tmp_path: Path) -> None:
    """A bad --module makes twistd exit non-zero and name the module."""
    result = subprocess.run(
        [str(TWISTD), "--pidfile=", "-n", "callme", "--server-id", "x", "--module",
         "no_such_module_xyz"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "no_such_module_xyz" in result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_foreground(processes: Processes, services: Any) -> None:
    """``twistd -n callme --module app`` serves add(1, 1); SIGTERM stops it and
    its queue goes away."""
    server_id = new_server_id()
    process, log = processes.twistd("--pidfile=", "-n", "callme", "--server-id", server_id,
                                    "--module", "app")
    proxy = services.proxy()
    result = await call_when_serving(proxy, server_id, "add", 1, 1,
                                     alive=lambda: process.poll() is None)
    assert result == 2
    process.send_signal(signal.SIGTERM)
    await wait_for(lambda: process.poll() is not None, STOP_TIMEOUT, "twistd to exit")
    assert stopped_by_sigterm(process.returncode), log.read_text()
    assert "serving" in log.read_text()
    assert not await queue_exists(f"server_{server_id}_queue")
    with pytest.raises(ServerUnavailable):
        await proxy.call(server_id, "add", 1, 1)


@pytest_twisted.ensureDeferred
async def test_daemon(processes: Processes, services: Any, tmp_path: Path) -> None:
    """Daemonized twistd writes its pidfile and logfile, serves, and
    ``kill -TERM $(cat pidfile)`` stops it and removes the pidfile."""
    server_id = new_server_id()
    pidfile = tmp_path / "callme.pid"
    logfile = tmp_path / "callme.log"
    processes.pidfiles.append(pidfile)
    launcher, out = processes.twistd("--pidfile", str(pidfile), "--logfile", str(logfile),
                                     "callme", "--server-id", server_id, "--module", "app")
    await wait_for(lambda: launcher.poll() is not None, START_TIMEOUT, "twistd to daemonize")
    assert launcher.returncode == 0, out.read_text()
    await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), START_TIMEOUT,
                   "the pidfile")
    pid = int(pidfile.read_text())
    assert pid != launcher.pid
    proxy = services.proxy()
    assert await call_when_serving(proxy, server_id, "add", 1, 1,
                                   alive=lambda: pid_alive(pid)) == 2
    assert "serving" in logfile.read_text()
    kill = subprocess.run(["sh", "-c", f"kill -TERM $(cat '{pidfile}')"], timeout=10)
    assert kill.returncode == 0
    await wait_for(lambda: not pid_alive(pid), STOP_TIMEOUT, f"pid {pid} to exit")
    assert not pidfile.exists()
    assert "Server Shut Down" in logfile.read_text()


SLOW_MODULE = """
import time
from pathlib import Path

def add(a, b):
    return a + b

def slow(seconds, marker):
    Path(marker).touch()
    time.sleep(seconds)
    return f"slept {seconds}"
"""


@pytest_twisted.ensureDeferred
async def test_sigterm_waits_for_running_call(processes: Processes, services: Any,
                                              tmp_path: Path) -> None:
    """SIGTERM during a slow threaded call: the call still gets its answer, then
    twistd exits."""
    server_id = new_server_id()
    (tmp_path / "slowmod.py").write_text(textwrap.dedent(SLOW_MODULE))
    marker = tmp_path / "started"
    process, log = processes.twistd("--pidfile=", "-n", "callme", "--server-id", server_id,
                                    "--module", "slowmod", "--threads", "2", cwd=tmp_path)
    proxy = services.proxy(timeout=15)
    assert await call_when_serving(proxy, server_id, "add", 1, 1,
                                   alive=lambda: process.poll() is None) == 2
    answered: list[float] = []
    call = proxy.call(server_id, "slow", 2, str(marker))
    call.addCallback(lambda result: answered.append(time.monotonic()) or result)
    await wait_for(marker.exists, 10, "the slow call to start")
    process.send_signal(signal.SIGTERM)
    exited: list[float] = []

    def gone() -> bool:
        if process.poll() is None:
            return False
        exited.append(time.monotonic())
        return True

    watching = Deferred.fromCoroutine(wait_for(gone, STOP_TIMEOUT, "twistd to exit"))
    assert await call == "slept 2"
    await watching
    assert stopped_by_sigterm(process.returncode), log.read_text()
    assert answered[0] <= exited[0]
    assert "waiting for 1 running calls to finish" in log.read_text()


STUCK_MODULE = """
import threading
from pathlib import Path

FOREVER = threading.Event()

def add(a, b):
    return a + b

def stuck(marker):
    Path(marker).touch()
    FOREVER.wait()  # never set
"""


async def messages_ready(name: str) -> int:
    """Messages ready in queue *name* (passive declare)."""
    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        ok = await channel.declare_queue(name, passive=True)
        await channel.close()
        return int(ok.message_count)
    finally:
        await connection.close()


@pytest_twisted.ensureDeferred
async def test_sigterm_with_a_stuck_call_exits_after_stop_timeout(
        processes: Processes, services: Any, tmp_path: Path) -> None:
    """SIGTERM while a threaded call is blocked for good: ``twistd -n callme`` waits
    --stop-timeout for it, then exits (its worker thread does not hold the process)
    and the request goes back to the queue (a quorum queue here, which stays)."""
    server_id = new_server_id()
    queue = f"server_{server_id}_queue"
    (tmp_path / "stuckmod.py").write_text(textwrap.dedent(STUCK_MODULE))
    marker = tmp_path / "started"
    try:
        process, log = processes.twistd(
            "--pidfile=", "-n", "callme", "--server-id", server_id, "--module", "stuckmod",
            "--threads", "2", "--stop-timeout", "1", "--queue-type", "quorum", cwd=tmp_path)
        proxy = services.proxy(timeout=120)
        assert await call_when_serving(proxy, server_id, "add", 1, 1,
                                       alive=lambda: process.poll() is None) == 2
        call = proxy.call(server_id, "stuck", str(marker))
        await wait_for(marker.exists, 10, "the stuck call to start")
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await wait_for(lambda: process.poll() is not None, 15, "twistd to exit")
        elapsed = time.monotonic() - signalled
        text = log.read_text()
        assert stopped_by_sigterm(process.returncode), text
        assert elapsed >= 0.9, (elapsed, text)  # it waited --stop-timeout for the call
        assert "1 calls still running after 1.0 s: closing anyway" in text, text
        # the broker requeues the unacked request when the connection closes
        await wait_for_value(lambda: messages_ready(queue), 1, 10, "the request requeued")
        call.cancel()  # its request was taken: it waits for a reply until cancelled
        with pytest.raises(CancelledError):
            await call
    finally:
        await conflicting_queue(server_id, create=False)  # deletes queue and exchange


async def wait_for_value(get: Any, expected: Any, timeout: float, what: str) -> None:
    """Poll the coroutine function *get* every 0.2 s until it returns *expected*."""
    deadline = time.monotonic() + timeout
    while (value := await get()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: got {value!r}, not {expected!r} after {timeout} s")
        await sleep(0.2)


async def conflicting_queue(server_id: str, create: bool) -> None:
    """Pre-declare (or delete) the server's queue, and delete its exchange, as an
    old deployment or another tool might have left them: durable, not auto-delete."""
    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        if create:
            await channel.declare_queue(f"server_{server_id}_queue", durable=True)
        else:
            await channel.delete_queue(f"server_{server_id}_queue")
            await channel.delete_exchange(f"server_{server_id}_ex")
        await channel.close()
    finally:
        await connection.close()


@pytest_twisted.ensureDeferred
async def test_refused_first_start_exits_non_zero(processes: Processes) -> None:
    """A server queue the broker refuses to redeclare (406) on the first start makes
    ``twistd -n callme`` exit 1 soon, with the broker's reason and what to do."""
    server_id = new_server_id()
    await conflicting_queue(server_id, create=True)
    try:
        process, log = processes.twistd("--pidfile=", "-n", "callme", "--server-id",
                                        server_id, "--module", "app")
        await wait_for(lambda: process.poll() is not None, START_TIMEOUT, "twistd to exit")
        text = log.read_text()
        assert process.returncode == 1, text
        assert "cannot start: " in text and "406" in text, text
        assert "Server Shut Down" in text  # twistd's own clean-up ran first
    finally:
        await conflicting_queue(server_id, create=False)


@pytest_twisted.ensureDeferred
async def test_unreachable_first_start_exits_non_zero(processes: Processes) -> None:
    """An unreachable broker on the first start makes ``twistd -n callme`` exit 1 with
    the address it could not reach, instead of retrying forever."""
    process, log = processes.twistd("--pidfile=", "-n", "callme", "--server-id", "x",
                                    "--module", "app", "--amqp-url",
                                    "amqp://guest:guest@127.0.0.1:1/")
    await wait_for(lambda: process.poll() is not None, START_TIMEOUT, "twistd to exit")
    text = log.read_text()
    assert process.returncode == 1, text
    assert "cannot start: cannot reach the AMQP broker at 127.0.0.1:1" in text, text


def json_events(log: Path) -> list[dict[str, Any]]:
    """Every line of *log* parsed as JSON (a line that does not parse fails the test)."""
    events = []
    for line in log.read_text().splitlines():
        if line:
            events.append(json.loads(line))
    return events


@pytest_twisted.ensureDeferred
async def test_log_format_json(processes: Processes, services: Any) -> None:
    """``--log-format json``: every line twistd writes is one JSON event, fields included
    (the serving event carries server_id), from start-up to "Server Shut Down."."""
    server_id = new_server_id()
    process, log = processes.twistd("--pidfile=", "-n", "callme", "--server-id", server_id,
                                    "--module", "app", "--log-format", "json")
    proxy = services.proxy()
    assert await call_when_serving(proxy, server_id, "add", 1, 1,
                                   alive=lambda: process.poll() is None) == 2
    process.send_signal(signal.SIGTERM)
    await wait_for(lambda: process.poll() is not None, STOP_TIMEOUT, "twistd to exit")
    events = json_events(log)
    serving = [e for e in events if e.get("log_namespace") == "callme.server"
               and e.get("log_format", "").startswith("serving ")]
    assert [e["server_id"] for e in serving] == [server_id], events
    assert events[-1]["log_format"] == "Server Shut Down."


@pytest_twisted.ensureDeferred
async def test_log_format_json_with_workers(processes: Processes, services: Any) -> None:
    """``--log-format json --processes 2``: workers' events reach twistd's log as JSON
    events of their own, each naming its worker."""
    server_id = new_server_id()
    process, log = processes.twistd("--pidfile=", "-n", "callme", "--server-id", server_id,
                                    "--module", "app", "--log-format", "json",
                                    "--processes", "2")
    proxy = services.proxy()
    assert await call_when_serving(proxy, server_id, "add", 1, 1,
                                   alive=lambda: process.poll() is None) == 2
    await wait_for(lambda: log.read_text().count('"serving {server_id!r}') >= 2,
                   START_TIMEOUT, "both workers to serve")
    process.send_signal(signal.SIGTERM)
    await wait_for(lambda: process.poll() is not None, STOP_TIMEOUT, "twistd to exit")
    serving = [e for e in json_events(log) if e.get("log_namespace") == "callme.server"
               and e.get("log_format", "").startswith("serving ")]
    assert sorted(e["worker"] for e in serving) == ["worker-1", "worker-2"], serving
    assert {e["server_id"] for e in serving} == {server_id}


def free_ports(n: int) -> int:
    """The first of *n* consecutive TCP ports nothing listens on right now."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        try:
            for port in range(first + 1, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first


def scrape(port: int, timeout: float = START_TIMEOUT) -> list[Any]:
    """GET /metrics on *port* (retrying until it listens); the parsed metric families."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                assert response.status == 200
                return list(text_string_to_metric_families(response.read().decode()))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_port(processes: Processes, workers: int) -> None:
    """``--metrics-port`` serves Prometheus text at /metrics (worker k of --processes on
    PORT+k-1), which prometheus_client parses, with txcallme's server families."""
    port = free_ports(workers)
    process, log = processes.twistd("--pidfile=", "-n", "callme", "--server-id",
                                    new_server_id(), "--module", "app", "--metrics-port",
                                    str(port), "--processes", str(workers))
    for k in range(workers):
        names = {family.name for family in scrape(port + k)}
        assert "txcallme_server_call_duration_seconds" in names, (names, log.read_text())
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    process.wait(STOP_TIMEOUT)
