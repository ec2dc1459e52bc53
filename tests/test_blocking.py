"""txcallme.blocking.Proxy against a ``twistd callme`` server, from subprocess scripts.

The blocking Proxy runs the global reactor in a crochet thread. pytest-twisted
runs that same global reactor in a greenlet of the main thread, so the two
cannot share the pytest process: each test here is a small script run with
``python``, which exits non-zero (with a traceback) when an assertion fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BROKER_HOST, BROKER_PORT, new_server_id

TWISTD = Path(sys.executable).with_name("twistd")
BROKER_URL = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F"
START_TIMEOUT = 20.0

APP = '''\
"""Functions served for the blocking Proxy tests."""
import time

__all__ = ["add", "fail", "slow", "custom", "maths.add"]


class Custom(Exception):
    pass


def add(a, b):
    """Return a + b."""
    return a + b


def fail(message):
    """Raise ValueError with *message*."""
    raise ValueError(message)


def slow(seconds):
    """Sleep *seconds*, then return them."""
    time.sleep(seconds)
    return seconds


def custom(code):
    """Raise Custom(code)."""
    raise Custom(code)


globals()["maths.add"] = add
'''

#: Every script starts with this: names the server and the broker.
PRELUDE = f"""\
import os, sys, threading, time
from txcallme.blocking import Proxy
import txcallme
SID = os.environ["SID"]
HOST = {BROKER_HOST!r}
"""


@pytest.fixture(scope="module")
def sid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server id of a ``twistd -n callme`` serving the test module."""
    path = tmp_path_factory.mktemp("blockapp")
    (path / "blockapp.py").write_text(APP)
    server_id = new_server_id()
    log = path / "twistd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(TWISTD), "--pidfile=", "-n", "callme", "--server-id", server_id, "--module",
             "blockapp"], cwd=path, env=dict(os.environ, CALLME_AMQP_URL=BROKER_URL),
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while f"serving {server_id!r}" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("twistd did not start serving:\n" + log.read_text())
            time.sleep(0.1)
        yield server_id
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def script(tmp_path: Path, server_id: str, body: str) -> subprocess.Popen[str]:
    """Start PRELUDE + *body* as a Python script (stdout and stderr piped)."""
    path = tmp_path / "script.py"
    path.write_text(PRELUDE + textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(path)], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env=dict(os.environ, SID=server_id, PYTHONUNBUFFERED="1"))


def run(tmp_path: Path, server_id: str, body: str, timeout: float = 60,
        quiet: bool = True) -> str:
    """Run the script to completion; assert it exited 0 (with an empty stderr if
    *quiet*); its stdout."""
    process = script(tmp_path, server_id, body)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, f"{out}\n{err}"
    assert not (quiet and err), err
    return out


def test_result_and_names(sid: str, tmp_path: Path) -> None:
    """use_server().add(1, 1) returns 2; call, invoke and dotted names work too."""
    out = run(tmp_path, sid, """
        proxy = Proxy(amqp_host=HOST, timeout=10)
        server = proxy.use_server(SID)
        assert server.add(1, 1) == 2
        assert server.add(a="x", b="y") == "xy"
        assert server.maths.add(2, 3) == 5
        assert proxy.call(SID, "add", [1], [2]) == [1, 2]
        assert proxy.invoke(SID, "maths.add", (4, 5), timeout=5) == 9
        assert proxy.call(SID, "__callme__.ping")["server_id"] == SID
        print("ok")
    """)
    assert out == "ok\n"


def test_remote_exceptions(sid: str, tmp_path: Path) -> None:
    """Remote errors raise the same rebuilt types as the async Proxy, with the traceback."""
    out = run(tmp_path, sid, """
        from txcallme import RemoteError, UnknownMethod
        proxy = Proxy(amqp_host=HOST, timeout=10)
        server = proxy.use_server(SID)
        try:
            server.fail("boom")
        except ValueError as e:
            assert e.args == ("boom",) and "raise ValueError(message)" in e.remote_traceback
        else:
            raise AssertionError("no ValueError")
        for call, kind in [(lambda: server.nothing(), UnknownMethod),
                           (lambda: server.add(1), TypeError),
                           (lambda: server.custom(7), RemoteError)]:
            try:
                call()
            except kind:
                pass
            else:
                raise AssertionError(f"no {kind}")

        class Local(Exception):
            pass

        proxy.errors.register(Local, "blockapp.Custom")
        try:
            server.custom(7)
        except Local as e:
            assert e.args == (7,)
        print("ok")
    """)
    assert out == "ok\n"


def test_timeout_and_unavailable(sid: str, tmp_path: Path) -> None:
    """A slow call raises RpcTimeout after its timeout (not at once, not when the
    function returns); a missing server ServerUnavailable."""
    out = run(tmp_path, sid, """
        import txcallme.blocking
        from txcallme import RpcTimeout, ServerUnavailable
        # only the call's own timeout (in the reactor) may fire, not the caller's
        # backstop at timeout + WAIT_MARGIN
        txcallme.blocking.WAIT_MARGIN = 60.0
        proxy = Proxy(amqp_host=HOST, timeout=10)
        proxy.use_server(SID).add(0, 0)
        start = time.monotonic()
        try:
            proxy.use_server(SID, timeout=1.0).slow(12)
        except RpcTimeout as e:
            assert (e.server_id, e.method, e.timeout) == (SID, "slow", 1.0)
        else:
            raise AssertionError("no RpcTimeout")
        elapsed = time.monotonic() - start
        # at its 1 s timeout (0.9: the deadline is on time.time(), this on the
        # monotonic clock); long before slow(12) returns, however loaded the machine
        assert 0.9 <= elapsed < 8, elapsed
        try:
            proxy.call(SID + "-missing", "add", 1, 1)
        except ServerUnavailable:
            pass
        else:
            raise AssertionError("no ServerUnavailable")
        assert proxy.use_server(SID).add(2, 2) == 4
        print("ok")
    """, quiet=False)  # the AMQP layer logs the 404 of the missing server's exchange
    assert out == "ok\n"


def test_shared_by_threads(sid: str, tmp_path: Path) -> None:
    """16 threads x 200 calls on one shared Proxy all get their own, correct result."""
    out = run(tmp_path, sid, """
        proxy = Proxy(amqp_host=HOST, timeout=30)
        server = proxy.use_server(SID)
        wrong, done = [], []

        def work(n):
            for i in range(200):
                result = server.add(n * 1000, i)
                if result != n * 1000 + i:
                    wrong.append((n, i, result))
            done.append(n)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wrong == [] and sorted(done) == list(range(16)), (wrong, done)
        proxy.close()
        print("ok")
    """, timeout=120)
    assert out == "ok\n"


def test_interpreter_exits_cleanly(sid: str, tmp_path: Path) -> None:
    """Without close(), the interpreter exits 0 within seconds of the last call, silently."""
    process = script(tmp_path, sid, """
        proxy = Proxy(amqp_host=HOST, timeout=10)
        assert proxy.use_server(SID).add(1, 1) == 2
        print("last call done")
    """)
    try:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline() == "last call done\n", process.stderr.read()
        start = time.monotonic()
        assert process.wait(10) == 0
        assert time.monotonic() - start < 3
        assert process.stderr.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_reactor_thread_refused(sid: str, tmp_path: Path) -> None:
    """A call from the reactor thread raises RuntimeError at once instead of deadlocking."""
    out = run(tmp_path, sid, """
        import crochet
        proxy = Proxy(amqp_host=HOST, timeout=10)

        @crochet.wait_for(timeout=5)
        def in_reactor():
            try:
                proxy.use_server(SID).add(1, 1)
            except RuntimeError as e:
                return str(e)

        message = in_reactor()
        assert "reactor thread" in message and "deadlock" in message, message
        assert proxy.use_server(SID).add(1, 1) == 2
        print("ok")
    """)
    assert out == "ok\n"


def test_close_and_context_manager(sid: str, tmp_path: Path) -> None:
    """After close() (or leaving a with block) calls raise ProxyClosed; close is idempotent."""
    out = run(tmp_path, sid, """
        with Proxy(amqp_host=HOST, timeout=10) as proxy:
            assert proxy.use_server(SID).add(1, 2) == 3
        for _ in range(2):
            try:
                proxy.use_server(SID).add(1, 2)
            except txcallme.ProxyClosed:
                pass
            else:
                raise AssertionError("no ProxyClosed")
            proxy.close()
        print("ok")
    """)
    assert out == "ok\n"


def test_unreachable_broker(sid: str, tmp_path: Path) -> None:
    """A broker that cannot be reached raises BrokerUnreachable promptly."""
    out = run(tmp_path, sid, """
        proxy = Proxy(amqp_url="amqp://guest:guest@127.0.0.1:1/", timeout=10)
        start = time.monotonic()
        try:
            proxy.call(SID, "add", 1, 1)
        except txcallme.BrokerUnreachable:
            pass
        else:
            raise AssertionError("no BrokerUnreachable")
        assert time.monotonic() - start < 5
        print("ok")
    """, quiet=False)  # crochet passes the library's connection error log to logging
    assert out == "ok\n"


def test_worker_thread_of_a_running_reactor(sid: str, tmp_path: Path) -> None:
    """In a program that runs the reactor itself, threads use that reactor (crochet.no_setup)."""
    out = run(tmp_path, sid, """
        from twisted.internet import task, threads

        async def main(reactor):
            def blocking():
                proxy = Proxy(amqp_host=HOST, timeout=10)
                return proxy.use_server(SID).add(20, 22)

            assert await threads.deferToThread(blocking) == 42
            print("ok")

        task.react(lambda reactor: __import__("twisted.internet.defer").internet.defer
                   .Deferred.fromCoroutine(main(reactor)))
    """)
    assert out == "ok\n"


def test_constructor_giving_up_leaves_nothing_open(sid: str, tmp_path: Path) -> None:
    """A constructor that gives up waiting on a busy reactor raises ProxyClosed, and the
    async Proxy it asked for is closed once the reactor runs it (never left open)."""
    out = run(tmp_path, sid, """
        import crochet
        import txcallme.blocking as blocking
        from twisted.internet import reactor

        made, closed = [], []

        class Tracked(blocking.AsyncProxy):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

            def close(self):
                closed.append(self)
                return super().close()

        blocking.AsyncProxy = Tracked
        blocking.WAIT_MARGIN = 0.5
        crochet.setup()
        reactor.callFromThread(time.sleep, 2)  # the reactor thread is busy for 2 s
        try:
            Proxy(amqp_host=HOST, timeout=10)
        except txcallme.ProxyClosed as e:
            assert "did not create the proxy" in str(e), e
        else:
            raise AssertionError("no ProxyClosed")
        time.sleep(3)

        @crochet.wait_for(timeout=5)
        def check():
            return len(made), len(closed)

        assert check() == (1, 1), check()
        print("ok")
    """, quiet=False)  # closing while connecting logs the cancelled connect attempt
    assert out == "ok\n"
