"""The ``callme`` command line, run as subprocesses against a ``twistd callme`` server.

Nothing here runs a reactor in the pytest process: every command and server is
a child process (killed at teardown if still alive).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _brokerctl import ctl, rand
from conftest import BROKER_HOST, BROKER_PORT, new_server_id

from txcallme import cli

TWISTD = Path(sys.executable).with_name("twistd")
BROKER_URL = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F"
START_TIMEOUT = 20.0

APP = '''\
"""Functions served for the CLI tests."""
import time


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


def echo(*args, **kwargs):
    """Return the arguments."""
    return {"args": list(args), "kwargs": kwargs}
'''


def env(**extra: str) -> dict[str, str]:
    """The environment for child processes: the test broker, unbuffered output."""
    return {**os.environ, "CALLME_AMQP_URL": BROKER_URL, "PYTHONUNBUFFERED": "1", **extra}


def callme(*args: str, timeout: float = 30, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m txcallme.cli ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "txcallme.cli", *args], env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout, check=False)


def wait_for_log(process: subprocess.Popen[bytes], log: Path, text: str) -> None:
    """Wait until *text* appears in *log*; fail if the process exits first."""
    deadline = time.monotonic() + START_TIMEOUT
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {text!r} (exit status {process.poll()}):\n"
                        + log.read_text(errors="replace"))
        time.sleep(0.1)


class Children:
    """Child processes killed at teardown if still alive."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(args, cwd=cwd, env=env(), stdout=out,
                                       stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the served module ``cliapp``."""
    path = tmp_path_factory.mktemp("cliapp")
    (path / "cliapp.py").write_text(APP)
    return path


@pytest.fixture
def children() -> Iterator[Children]:
    """A :class:`Children`; its processes are killed at teardown."""
    helper = Children()
    try:
        yield helper
    finally:
        helper.kill_all()


@pytest.fixture(scope="module")
def server(app_dir: Path) -> Iterator[tuple[str, int]]:
    """A ``twistd -n callme`` serving cliapp: (server id, pid)."""
    helper = Children()
    server_id = new_server_id()
    log = app_dir / f"{server_id}.log"
    process = helper.start([str(TWISTD), "--pidfile=", "-n", "callme", "--server-id", server_id,
                            "--module", "cliapp"], app_dir, log)
    try:
        wait_for_log(process, log, f"serving {server_id!r}")
        yield server_id, process.pid
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        helper.kill_all()


# -- call ------------------------------------------------------------------------


def test_call_prints_json_result(server: tuple[str, int]) -> None:
    """``callme call SERVER add 1 2`` prints 3 and exits 0."""
    done = callme("call", server[0], "add", "1", "2")
    assert (done.returncode, done.stdout, done.stderr) == (0, "3\n", "")


def test_call_json_args_and_kwargs(server: tuple[str, int]) -> None:
    """Arguments are JSON literals (else strings) and --kwargs is a JSON object."""
    done = callme("call", server[0], "echo", "1", '"x"', "hello", "[1, 2]", "null", "-2.5",
                  "--kwargs", '{"k": true, "n": {"a": 1}}')
    assert done.returncode == 0, done.stderr
    assert done.stdout == ('{"args": [1, "x", "hello", [1, 2], null, -2.5], '
                           '"kwargs": {"k": true, "n": {"a": 1}}}\n')


def test_call_remote_exception(server: tuple[str, int]) -> None:
    """A remote ValueError exits 1 with its type, message and remote traceback on stderr."""
    done = callme("call", server[0], "fail", "boom")
    assert done.returncode == cli.EXIT_REMOTE
    assert done.stdout == ""
    assert "Traceback (most recent call last)" in done.stderr
    assert "raise ValueError(message)" in done.stderr
    assert done.stderr.splitlines()[-1] == "callme: remote exception ValueError: boom"


def test_call_unknown_method(server: tuple[str, int]) -> None:
    """Calling a function the server lacks is a remote UnknownMethod, exit 1."""
    done = callme("call", server[0], "nothing_here")
    assert done.returncode == cli.EXIT_REMOTE
    assert "UnknownMethod" in done.stderr and "nothing_here" in done.stderr


# -- ping / describe ---------------------------------------------------------------


def test_ping_shows_times_and_instance(server: tuple[str, int]) -> None:
    """``ping --count 2`` prints two round trips and the one twistd instance that answered."""
    done = callme("ping", server[0], "--count", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    assert all(" ms" in line and f":{server[1]}:" in line for line in lines[:2])
    assert lines[2].startswith("1 instance(s) answered: ") and f":{server[1]}:" in lines[2]


def test_describe_shows_signatures_and_docs(server: tuple[str, int]) -> None:
    """``describe`` lists each function as name(signature) and its first doc line."""
    done = callme("describe", server[0])
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert "add(a, b)  Return a + b." in lines
    assert "fail(message)  Raise ValueError with *message*." in lines
    assert "echo(*args, **kwargs)  Return the arguments." in lines
    assert not any("__callme__" in line for line in lines)


# -- exit codes --------------------------------------------------------------------


def test_unreachable_broker_exits_3() -> None:
    """A broker that cannot be reached exits 3 with one line on stderr."""
    done = callme("--amqp-url", "amqp://guest:guest@127.0.0.1:1/", "call", "x", "add")
    assert done.returncode == cli.EXIT_UNREACHABLE
    assert done.stderr.startswith("callme: cannot reach the AMQP broker at 127.0.0.1:1")
    assert len(done.stderr.splitlines()) == 1


def test_bad_password_exits_4() -> None:
    """A refused login (password from CALLME_AMQP_URL) exits 4 with one line on stderr."""
    done = callme("ping", "x", CALLME_AMQP_URL=f"amqp://guest:wrong@{BROKER_HOST}/%2F")
    assert done.returncode == cli.EXIT_AUTH
    assert done.stderr.startswith("callme: the broker refused login for user 'guest'")
    assert len(done.stderr.splitlines()) == 1


def test_access_refused_exits_5() -> None:
    """A user without permissions on the vhost exits 5 with one line on stderr."""
    user, password = f"cli_noperm_{rand()}", rand()
    ctl("add_user", user, password)
    try:
        ctl("set_permissions", "-p", "/", user, "^$", "^$", "^$")
        done = callme("--amqp-url", f"amqp://{user}:{password}@{BROKER_HOST}/%2F",
                      "call", "x", "add")
    finally:
        ctl("delete_user", user)
    assert done.returncode == cli.EXIT_ACCESS
    assert done.stderr.startswith("callme: access refused: 403 ACCESS_REFUSED")
    assert len(done.stderr.splitlines()) == 1


def test_missing_server_exits_6() -> None:
    """A server id nobody serves exits 6 at once."""
    start = time.monotonic()
    done = callme("call", new_server_id(), "add", "1", "2", "--timeout", "20")
    assert done.returncode == cli.EXIT_NO_SERVER
    assert done.stderr.startswith("callme: no server is serving")
    assert time.monotonic() - start < 10


def test_timeout_exits_7(server: tuple[str, int]) -> None:
    """No reply within --timeout exits 7."""
    done = callme("call", server[0], "slow", "3", "--timeout", "0.5")
    assert done.returncode == cli.EXIT_TIMEOUT
    assert done.stderr == f"callme: call {server[0]}.slow got no reply within 0.5 s\n"


@pytest.mark.parametrize("argv", [
    [], ["call"], ["call", "x", "add", "--kwargs", "[1]"], ["call", "x", "add", "--timeout", "0"],
    ["--amqp-url", "http://nope", "call", "x", "add"], ["serve", "cliapp"], ["nonsense"],
    ["call", "a b", "add"], ["ping", ""], ["describe", "x" * 300],
])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    """Bad command lines exit 2 without contacting a server."""
    assert cli.main(argv) == cli.EXIT_USAGE


def test_help_documents_exit_codes() -> None:
    """``callme --help`` lists the exit codes."""
    done = callme("--help")
    assert done.returncode == 0
    assert "3 broker unreachable" in done.stdout and "7 timeout" in done.stdout
    assert "8 other error" in done.stdout and "130 interrupted" in done.stdout


def test_invalid_server_id_is_a_usage_error() -> None:
    """A server id AMQP cannot name exits 2 with the reason, not 8 "unexpected error"."""
    done = callme("call", "a b", "add")
    assert done.returncode == cli.EXIT_USAGE
    assert "without white space" in done.stderr and "unexpected" not in done.stderr


def interrupt(args: list[str], ready: str, signum: int, tmp_path: Path,
              children: Children) -> tuple[int, str]:
    """Start ``callme -v ARGS``, send *signum* once *ready* is in its output; (status, output)."""
    log = tmp_path / "callme.log"
    process = children.start([sys.executable, "-m", "txcallme.cli", "-v", *args], tmp_path, log)
    wait_for_log(process, log, ready)
    time.sleep(0.5)  # the request is on its way
    process.send_signal(signum)
    status = process.wait(20)
    return status, log.read_text()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_call_exits_128_plus_signal(server: tuple[str, int], tmp_path: Path,
                                                  children: Children, signum: int,
                                                  code: int) -> None:
    """Ctrl-C (or SIGTERM) while ``callme call`` waits for a reply exits 130 (143), not 0."""
    status, output = interrupt(["call", server[0], "slow", "5"], "connected to", signum,
                               tmp_path, children)
    assert status == code, output
    assert output.splitlines()[-1].startswith("callme: interrupted" if code == 130
                                              else "callme: terminated"), output


def test_ctrl_c_during_ping_exits_130(server: tuple[str, int], tmp_path: Path,
                                      children: Children) -> None:
    """Ctrl-C during a long ``callme ping`` exits 130 after the replies printed so far."""
    status, output = interrupt(["ping", server[0], "--count", "100000"], "seq=1 ",
                               signal.SIGINT, tmp_path, children)
    assert status == cli.EXIT_INTERRUPTED, output
    assert "callme: interrupted" in output


def test_ctrl_c_during_describe_exits_130(server: tuple[str, int], tmp_path: Path,
                                          children: Children) -> None:
    """Ctrl-C while ``callme describe`` waits for its answer exits 130, printing no
    listing (the server is paused, so the answer cannot come first)."""
    os.kill(server[1], signal.SIGSTOP)
    try:
        status, output = interrupt(["describe", server[0], "--timeout", "60"],
                                   "connected to", signal.SIGINT, tmp_path, children)
    finally:
        os.kill(server[1], signal.SIGCONT)
    assert status == cli.EXIT_INTERRUPTED, output
    assert output.splitlines()[-1].startswith("callme: interrupted"), output
    assert "add(a, b)" not in output, output


def test_parse_arg() -> None:
    """JSON literals become values; anything else stays a string."""
    assert [cli.parse_arg(a) for a in ("1", "true", '"1"', "[1]", "a b", "{")] == [
        1, True, "1", [1], "a b", "{"]


def test_console_script(server: tuple[str, int]) -> None:
    """The installed ``callme`` script runs the same main()."""
    script = Path(sys.executable).with_name("callme")
    done = subprocess.run([str(script), "call", server[0], "add", '"a"', '"b"'], env=env(),
                          capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout) == (0, '"ab"\n'), done.stderr


# -- serve -------------------------------------------------------------------------


def test_serve_then_sigterm(app_dir: Path, children: Children, tmp_path: Path) -> None:
    """``callme serve`` answers calls and exits 0 soon after SIGTERM."""
    server_id = new_server_id()
    log = tmp_path / "serve.log"
    process = children.start([sys.executable, "-m", "txcallme.cli", "serve", "cliapp",
                              "--server-id", server_id, "--threads", "2"], app_dir, log)
    wait_for_log(process, log, f"serving {server_id!r} on ")
    done = callme("call", server_id, "add", "20", "22")
    assert (done.returncode, done.stdout) == (0, "42\n"), done.stderr
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert "Received SIGTERM" in log.read_text()


def test_serve_unreachable_exits_3(app_dir: Path, children: Children, tmp_path: Path) -> None:
    """``callme serve`` with an unreachable broker exits 3 instead of retrying forever."""
    log = tmp_path / "serve.log"
    process = children.start([sys.executable, "-m", "txcallme.cli", "--amqp-url",
                              "amqp://guest:guest@127.0.0.1:1", "serve", "cliapp",
                              "--server-id", "x"], app_dir, log)
    assert process.wait(15) == cli.EXIT_UNREACHABLE
    assert "callme: cannot reach the AMQP broker" in log.read_text()


def test_serve_refused_declaration_exits_with_reason(app_dir: Path, children: Children,
                                                     tmp_path: Path) -> None:
    """``callme serve`` whose queue the broker refuses (406, pre-declared with other
    flags) exits 8 at once with the broker's reason and what to do, not retrying."""
    import pika

    server_id = new_server_id()
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    try:
        channel = connection.channel()
        channel.queue_declare(f"server_{server_id}_queue", durable=True)
        log = tmp_path / "serve.log"
        process = children.start([sys.executable, "-m", "txcallme.cli", "serve", "cliapp",
                                  "--server-id", server_id], app_dir, log)
        status = process.wait(20)
        text = log.read_text()
        assert status == cli.EXIT_ERROR, text
        [line] = [line for line in text.splitlines() if line.startswith("callme: ")]
        assert line.startswith("callme: DeclarationRefused: ") and "406" in line, text
        assert "rabbitmqctl delete_queue" in line, text
    finally:
        channel.queue_delete(f"server_{server_id}_queue")
        channel.exchange_delete(f"server_{server_id}_ex")
        connection.close()


def test_several_amqp_urls_try_the_next_node(server: tuple[str, int]) -> None:
    """``--amqp-url`` given twice (a dead node first) reaches the server through the second."""
    done = callme("--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2F", "--amqp-url", BROKER_URL,
                  "call", server[0], "add", "1", "2")
    assert (done.returncode, done.stdout) == (0, "3\n"), done.stderr


def test_stats_table_and_json(server: tuple[str, int]) -> None:
    """``callme stats`` shows each instance's calls per method (the 2 just made), as a
    table and as JSON."""
    def echo_calls() -> int:
        done = callme("stats", server[0], "--json", "--count", "2")
        assert done.returncode == 0, done.stderr
        [instance] = json.loads(done.stdout)["instances"]
        assert instance["server_id"] == server[0] and instance["uptime"] > 0
        return int(instance["methods"].get("echo", {}).get("calls", 0))

    before = echo_calls()
    for _ in range(2):
        assert callme("call", server[0], "echo", "1").returncode == 0
    assert echo_calls() == before + 2
    table = callme("stats", server[0])
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"1 instance(s) of {server[0]} answered"
    assert "in flight, pool threads busy" in lines[1]
    assert lines[2].split() == ["INSTANCE", "METHOD", "CALLS", "ERRORS", "P50", "MS", "P99", "MS"]
    assert any(line.split()[1:3] == ["echo", str(before + 2)] for line in lines[3:]), lines


def test_serve_processes(app_dir: Path, children: Children, tmp_path: Path) -> None:
    """``callme serve --processes 2`` runs two instances (ping sees both); SIGTERM stops
    them and exits 0."""
    server_id = new_server_id()
    log = tmp_path / "serve.log"
    process = children.start([sys.executable, "-m", "txcallme.cli", "serve", "cliapp",
                              "--server-id", server_id, "--processes", "2"], app_dir, log)
    deadline = time.monotonic() + START_TIMEOUT
    while log.read_text().count(f"serving {server_id!r}") < 2:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    done = callme("ping", server_id, "--count", "6")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("2 instance(s) answered"), done.stdout
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, log.read_text()


HOLD_APP = '''\
"""Functions for the two-instance stats test."""
import os
import time


def add(a, b):
    """Return a + b."""
    return a + b


def hold(started, release):
    """Create *started*, then wait (at most 120 s) until *release* exists."""
    open(started, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.path.exists(release)
'''


def test_stats_every_instance(children: Children, tmp_path: Path) -> None:
    """``callme stats --json`` reports both instances of one server id, each with its own
    calls: A (alone) serves 3 adds, then holds its only request slot (--threads 1
    --prefetch 1) in ``hold`` while B, started then, serves the next 2 adds."""
    (tmp_path / "holdapp.py").write_text(HOLD_APP)
    server_id = new_server_id()
    started, release = tmp_path / "started", tmp_path / "release"
    servers: list[subprocess.Popen[bytes]] = []

    def start(name: str, *options: str) -> None:
        log = tmp_path / f"{name}.log"
        servers.append(children.start(
            [str(TWISTD), "--pidfile=", "-n", "callme", "--server-id", server_id,
             "--module", "holdapp", *options], tmp_path, log))
        wait_for_log(servers[-1], log, f"serving {server_id!r}")

    def add(n: int) -> None:
        done = callme("call", server_id, "add", str(n), "1", "--timeout", "30")
        assert (done.returncode, done.stdout) == (0, f"{n + 1}\n"), done.stderr

    try:
        start("a", "--threads", "1", "--prefetch", "1")
        ping = callme("ping", server_id, "--count", "1")
        assert ping.returncode == 0, ping.stderr
        instance_a = ping.stdout.split("(", 1)[1].split(",", 1)[0]
        for n in range(3):
            add(n)
        holding = children.start([sys.executable, "-m", "txcallme.cli", "call", server_id,
                                  "hold", str(started), str(release), "--timeout", "150"],
                                 tmp_path, tmp_path / "hold.log")
        deadline = time.monotonic() + START_TIMEOUT
        while not started.exists():
            assert holding.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "hold.log").read_text()
            time.sleep(0.1)
        start("b")
        for n in range(3, 5):
            add(n)  # A has no room: both go to B
        assert holding.poll() is None, "hold returned early: A was free for B's calls"
        release.touch()
        assert holding.wait(30) == 0, (tmp_path / "hold.log").read_text()
        assert (tmp_path / "hold.log").read_text() == "true\n"

        done = callme("stats", server_id, "--json", "--count", "20", "--timeout", "30",
                      timeout=120)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["server_id"] == server_id
        instances = report["instances"]
        assert len(instances) == 2, instances
        ids = [stat["instance"] for stat in instances]
        assert len(set(ids)) == 2 and instance_a in ids, (ids, instance_a)
        assert all(stat["server_id"] == server_id and stat["uptime"] > 0
                   for stat in instances)
        calls = {stat["instance"]: {method: numbers["calls"]
                                    for method, numbers in stat["methods"].items()}
                 for stat in instances}
        [instance_b] = set(ids) - {instance_a}
        assert calls[instance_a] == {"add": 3, "hold": 1}, calls
        assert calls[instance_b] == {"add": 2}, calls
        assert sum(c.get("add", 0) for c in calls.values()) == 5  # the adds made
    finally:
        for process in servers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in servers:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                pass
