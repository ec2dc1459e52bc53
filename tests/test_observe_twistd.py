"""``twistd callme --metrics-port``: a real twistd serves /metrics while it serves calls."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from conftest import Services, sleep
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.python import usage
from twisted.web.client import Agent, readBody

from txcallme import ServerUnavailable, tap

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:Using readBody")]

TWISTD = Path(sys.executable).with_name("twistd")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def twistd(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """twistd children, killed at teardown if still alive."""
    children: list[subprocess.Popen[bytes]] = []
    yield children
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait(10)


async def scrape(port: int) -> str:
    response = await Agent(reactor).request(
        b"GET", f"http://127.0.0.1:{port}/metrics".encode())
    assert response.code == 200
    return (await readBody(response)).decode()


@pytest_twisted.ensureDeferred
async def test_twistd_serves_metrics(twistd: list[subprocess.Popen[bytes]], tmp_path: Path,
                                     services: Services, sid: str) -> None:
    """A scrape of ``twistd callme --metrics-port`` counts the calls it served."""
    port = free_port()
    log = tmp_path / "twistd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(TWISTD), "--pidfile=", "-n", "callme", "--server-id", sid, "--module", "app",
             "--metrics-port", str(port), "--metrics-interface", "127.0.0.1"],
            cwd=EXAMPLES, stdout=out, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    twistd.append(process)
    proxy = await services.ready_proxy(timeout=10)
    end = time.monotonic() + 60
    while True:
        assert process.poll() is None, log.read_text()
        try:
            assert await proxy.call(sid, "add", 1, 1) == 2
            break
        except ServerUnavailable:
            assert time.monotonic() < end, log.read_text()
            await sleep(0.2)
    for i in range(4):
        assert await proxy.call(sid, "add", i, 1) == i + 1
    text = await scrape(port)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    key = ("txcallme_server_call_duration_seconds_count",
           (("method", "add"), ("outcome", "ok"), ("server_id", sid)))
    assert got[key] == 5
    assert got[("txcallme_server_calls_in_flight", (("server_id", sid),))] == 0
    assert got[("txcallme_server_pool_threads_busy", (("server_id", sid),))] == 0
    process.send_signal(signal.SIGTERM)
    for _ in range(300):
        if process.poll() is not None:
            break
        await sleep(0.1)
    assert process.poll() in (0, -signal.SIGTERM), log.read_text()


def test_metrics_options_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """--metrics-port/--metrics-interface parse; 127.0.0.1 is the default interface."""
    monkeypatch.chdir(EXAMPLES)
    options = tap.Options()
    options.parseOptions(["--server-id", "x", "--module", "app", "--metrics-port", "9464"])
    assert options["metrics-port"] == 9464 and options["metrics-interface"] == "127.0.0.1"
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions(["--server-id", "x", "--module", "app",
                                    "--metrics-port", "0"])
