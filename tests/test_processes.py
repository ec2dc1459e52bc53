"""``twistd callme --processes N``: supervised workers of one server id (real twistd, real broker).

Every worker is a child of the twistd process; the tests find them through
/proc, kill them, and check that none outlives a test.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import new_server_id
from test_twistd import Processes, call_when_serving, conflicting_queue, pid_alive, wait_for
from twisted.internet.defer import Deferred, DeferredList, gatherResults

from txcallme.tap import KILL_MARGIN

START_TIMEOUT = 30.0

WORKER_MODULE = """
import os
import time
from pathlib import Path


def pid():
    return os.getpid()


def work(seconds):
    time.sleep(seconds)
    return os.getpid()


def slow(seconds, marker):
    Path(marker).touch()
    time.sleep(seconds)
    return os.getpid()
"""


#: every worker pid any test has seen, killed at teardown if still alive
_seen: set[int] = set()


def children(pid: int) -> set[int]:
    """The live (not zombie) child processes of *pid* (remembered for teardown)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    _seen.update(found)
    return found


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """twistd processes, and every worker they started, killed at teardown."""
    helper = Processes(tmp_path)
    try:
        yield helper
    finally:
        for process in helper.children:
            children(process.pid)
        helper.kill_all()
        for pid in _seen:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        _seen.clear()


def start(processes: Processes, tmp_path: Path, server_id: str, n: int,
          *extra: str) -> Any:
    """Start ``twistd -n callme --processes N`` serving WORKER_MODULE; (process, log)."""
    (tmp_path / "workermod.py").write_text(textwrap.dedent(WORKER_MODULE))
    process, log = processes.twistd("--pidfile=", "-n", "callme", "--server-id", server_id,
                                    "--module", "workermod", "--processes", str(n), *extra,
                                    cwd=tmp_path)
    return process, log


async def wait_for_workers(process: Any, n: int, log: Path) -> set[int]:
    """Wait until twistd has *n* worker processes; their pids."""
    await wait_for(lambda: process.poll() is not None or len(children(process.pid)) == n,
                   START_TIMEOUT, f"{n} workers")
    assert process.poll() is None, log.read_text()
    return children(process.pid)


async def answering_pids(proxy: Any, server_id: str, expected: set[int],
                         process: Any) -> set[int]:
    """Call pid() until every pid in *expected* has answered; the pids seen."""
    seen: set[int] = set()
    deadline = time.monotonic() + START_TIMEOUT
    while not expected <= seen:
        assert time.monotonic() < deadline, f"only {seen} of {expected} answered"
        seen.add(await call_when_serving(proxy, server_id, "pid",
                                         alive=lambda: process.poll() is None))
    return seen


@pytest_twisted.ensureDeferred
async def test_killed_worker_is_replaced(processes: Processes, services: Any,
                                         tmp_path: Path) -> None:
    """A worker killed with SIGKILL is restarted: a new pid answers, there are 2 workers again."""
    server_id = new_server_id()
    process, log = start(processes, tmp_path, server_id, 2)
    workers = await wait_for_workers(process, 2, log)
    proxy = services.proxy(timeout=10)
    await answering_pids(proxy, server_id, workers, process)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    await wait_for(lambda: victim not in children(process.pid)
                   and len(children(process.pid)) == 2, START_TIMEOUT, "a new worker")
    replacement = children(process.pid) - workers
    assert len(replacement) == 1, (workers, children(process.pid))
    await answering_pids(proxy, server_id, replacement, process)
    assert "worker-" in log.read_text() and "restarting it" in log.read_text()


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_every_worker_and_leaves_no_process(
        processes: Processes, services: Any, tmp_path: Path) -> None:
    """SIGTERM while each of 2 workers runs a slow call: both calls are answered,
    then every worker and twistd exit; no process is left."""
    server_id = new_server_id()
    process, log = start(processes, tmp_path, server_id, 2, "--threads", "1")
    workers = await wait_for_workers(process, 2, log)
    proxy = services.proxy(timeout=30)
    await answering_pids(proxy, server_id, workers, process)
    markers = [tmp_path / f"started-{i}" for i in range(2)]
    calls = [proxy.call(server_id, "slow", 3, str(marker)) for marker in markers]
    await wait_for(lambda: all(m.exists() for m in markers), 20, "both slow calls to start")
    process.send_signal(signal.SIGTERM)
    results = await DeferredList(calls, consumeErrors=True)
    assert [ok for ok, _ in results] == [True, True], results
    assert {pid for _, pid in results} == workers  # one slow call in each worker
    await wait_for(lambda: process.poll() is not None, 30, "twistd to exit")
    assert process.returncode in (0, -signal.SIGTERM), log.read_text()
    assert not [pid for pid in workers if pid_alive(pid)]
    assert "stopping 2 workers" in log.read_text()


@pytest_twisted.ensureDeferred
async def test_workers_stop_when_their_supervisor_is_killed(
        processes: Processes, services: Any, tmp_path: Path) -> None:
    """README: a worker that loses its supervisor (twistd killed with SIGKILL, so it
    cannot stop them) notices and stops by itself; no worker is left."""
    server_id = new_server_id()
    process, log = start(processes, tmp_path, server_id, 2)
    workers = await wait_for_workers(process, 2, log)
    proxy = services.proxy(timeout=10)
    await answering_pids(proxy, server_id, workers, process)
    process.kill()
    process.wait(10)
    await wait_for(lambda: not any(pid_alive(pid) for pid in workers), 20,
                   "the orphaned workers to stop")


@pytest_twisted.ensureDeferred
async def test_stuck_worker_is_killed_after_stop_timeout(
        processes: Processes, services: Any, tmp_path: Path) -> None:
    """A worker whose call outlasts --stop-timeout is gone (stopped or killed) within
    stop_timeout + KILL_MARGIN of SIGTERM, and twistd exits; no process is left."""
    server_id = new_server_id()
    process, log = start(processes, tmp_path, server_id, 2, "--threads", "1",
                         "--stop-timeout", "1")
    workers = await wait_for_workers(process, 2, log)
    proxy = services.proxy(timeout=60)
    await answering_pids(proxy, server_id, workers, process)
    marker = tmp_path / "started"
    stuck = proxy.call(server_id, "slow", 600, str(marker))
    stuck.addErrback(lambda f: f.trap(Exception))
    await wait_for(marker.exists, 20, "the stuck call to start")
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    await wait_for(lambda: process.poll() is not None, 1 + KILL_MARGIN + 15, "twistd to exit")
    assert time.monotonic() - sent < 1 + KILL_MARGIN + 10
    assert not [pid for pid in workers if pid_alive(pid)], log.read_text()
    await proxy.close()


@pytest_twisted.ensureDeferred
async def test_four_workers_share_load_fairly(processes: Processes, services: Any,
                                              tmp_path: Path) -> None:
    """400 calls of a blocking handler (16 in flight) over 4 workers with one thread
    each: every worker answers within 25 % of an even share (100)."""
    server_id = new_server_id()
    process, log = start(processes, tmp_path, server_id, 4, "--threads", "1")
    workers = await wait_for_workers(process, 4, log)
    proxy = services.proxy(timeout=60)
    await answering_pids(proxy, server_id, workers, process)
    counts: Counter[int] = Counter()
    total, in_flight = 400, 16

    async def caller(n: int) -> None:
        for _ in range(n):
            counts[await proxy.call(server_id, "work", 0.02)] += 1

    await gatherResults([Deferred.fromCoroutine(caller(total // in_flight))
                         for _ in range(in_flight)])
    assert sum(counts.values()) == total
    assert set(counts) == workers, counts
    share = total / len(workers)
    assert all(0.75 * share <= c <= 1.25 * share for c in counts.values()), counts
    print("calls per worker:", sorted(counts.values()))



@pytest_twisted.ensureDeferred
async def test_refused_first_start_of_the_workers_exits_non_zero(
        processes: Processes, tmp_path: Path) -> None:
    """Workers whose first start is refused (406: the queue exists with other flags) make
    ``twistd callme --processes 2`` exit 1, with no worker left, instead of restarting them."""
    server_id = new_server_id()
    await conflicting_queue(server_id, create=True)
    try:
        process, log = start(processes, tmp_path, server_id, 2)
        await wait_for(lambda: process.poll() is not None, START_TIMEOUT, "twistd to exit")
        text = log.read_text()
        assert process.returncode == 1, text
        assert "could not start" in text and "406" in text, text
        assert not [pid for pid in _seen if pid_alive(pid)]
    finally:
        await conflicting_queue(server_id, create=False)
