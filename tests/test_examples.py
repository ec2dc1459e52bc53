"""The examples run, print what they promise and exit 0 (real broker)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import new_server_id

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 30


def run_example(name: str, *args: str, cwd: Path = EXAMPLES.parent,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Popen objects killed at teardown if still running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for_line(process: subprocess.Popen[str], text: str, timeout: float) -> str:
    """Read *process*'s stdout until a line contains *text*."""
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"no {text!r} from the server; output: {''.join(seen)!r}")


@pytest.mark.parametrize("cwd", ["root", "examples"])
def test_getting_started_pair(processes: list[subprocess.Popen[str]], cwd: str) -> None:
    """The getting-started client gets 1 + 1 = 2 from the server, which stops on SIGTERM."""
    server_id = new_server_id()
    where = EXAMPLES.parent if cwd == "root" else EXAMPLES
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "getting_started_server.py"), server_id],
        cwd=where, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    processes.append(server)
    wait_for_line(server, "ready", TIMEOUT)
    client = run_example("getting_started_client.py", server_id, cwd=where)
    assert client.returncode == 0, client.stderr
    assert client.stdout.strip() == "1 + 1 = 2"
    server.send_signal(signal.SIGTERM)
    out, _ = server.communicate(timeout=TIMEOUT)
    assert server.returncode == 0, out
    assert "stopped" in out


def test_threaded_server() -> None:
    """Eight 0.2 s blocking calls run in parallel in the server's 8 threads."""
    result = run_example("threaded_server.py")
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"8 calls of 0\.2 s in (\d+\.\d+) s", result.stdout.strip())
    assert match, result.stdout
    assert 0.2 <= float(match.group(1)) < 1.2  # one after another: 1.6 s


def test_async_handler() -> None:
    """An async def handler awaiting deferLater answers through a Proxy."""
    result = run_example("async_handler.py", cwd=EXAMPLES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "delayed_greeting('world', delay=0.2) = 'hello, world'"


@pytest.mark.parametrize("cwd", ["root", "examples"])
def test_demo(cwd: str) -> None:
    """make demo: twistd callme serves app.add, prints add(1, 1) = 2, stops on SIGTERM."""
    result = run_example("demo.py", cwd=EXAMPLES.parent if cwd == "root" else EXAMPLES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "add(1, 1) = 2" in result.stdout.splitlines()
    assert "twistd stopped" in result.stdout


def test_demo_fails_clearly() -> None:
    """With a wrong password the demo exits 1 with the login error, and no traceback."""
    env = dict(os.environ, CALLME_AMQP_URL="amqp://guest:wrong@127.0.0.1:5672/%2F")
    result = run_example("demo.py", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "demo failed:" in result.stderr
    assert "refused login" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
