"""Unit tests for ``txcallme.tap``: twistd options and makeService (no broker)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.usage import UsageError

from txcallme._wire import RESERVED_PREFIX
from txcallme.errors import BrokerUnreachable, DeclarationRefused
from txcallme.service import DEFAULT_DELIVERY_LIMIT, DEFAULT_QUEUE_EXPIRES, CallmeServerService
from txcallme.tap import (
    EXIT_START_FAILED,
    FAILED_START_STOP_TIMEOUT,
    KILL_MARGIN,
    JSONLogging,
    Options,
    ServerRunner,
    WorkerMonitor,
    make_server,
    makeService,
    worker_command,
)

ModuleWriter = Callable[[str], str]

ADD = """
def add(a, b):
    return a + b
"""


def write_module(directory: Path, source: str, created: list[str]) -> str:
    name = f"tapmod_{uuid.uuid4().hex[:10]}"
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()
    created.append(name)
    return name


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleWriter]:
    """Writes a uniquely named, importable module into tmp_path; returns its name."""
    monkeypatch.delenv("CALLME_AMQP_URL", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []
    yield lambda source: write_module(tmp_path, source, created)
    for name in created:
        sys.modules.pop(name, None)


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_server_id_required(module: ModuleWriter) -> None:
    """Without --server-id, parsing fails with a UsageError naming the option."""
    with pytest.raises(UsageError, match="--server-id"):
        parse("--module", module(ADD))


def test_module_required() -> None:
    """Without --module, parsing fails with a UsageError naming the option."""
    with pytest.raises(UsageError, match="--module"):
        parse("--server-id", "foo")


def test_module_not_importable() -> None:
    """A module that cannot be imported is a UsageError naming it."""
    with pytest.raises(UsageError, match="cannot import module 'no_such_module_xyz'"):
        parse("--server-id", "foo", "--module", "no_such_module_xyz")


def test_module_raising_at_import(module: ModuleWriter) -> None:
    """A module whose import raises is a UsageError with the module and the error."""
    name = module("raise RuntimeError('broken at import')\n")
    with pytest.raises(UsageError, match=f"{name}.*RuntimeError: broken at import"):
        parse("--server-id", "foo", "--module", name)


def test_module_with_nothing_to_expose(module: ModuleWriter) -> None:
    """A module without public functions is a UsageError."""
    name = module("VALUE = 1\n\ndef _private():\n    pass\n")
    with pytest.raises(UsageError, match=f"{name}.*exposes no functions"):
        parse("--server-id", "foo", "--module", name)


def test_all_is_honoured(module: ModuleWriter) -> None:
    """With __all__, exactly the listed names are exposed."""
    name = module(ADD + """
__all__ = ["add", "Multiplier"]

def sub(a, b):
    return a - b

class Multiplier:
    def __call__(self, a, b):
        return a * b
""")
    options = parse("--server-id", "foo", "--module", name)
    assert sorted(options["functions"]) == ["Multiplier", "add"]


def test_all_naming_a_non_callable(module: ModuleWriter) -> None:
    """A non-callable name in __all__ is a UsageError naming it."""
    name = module(ADD + '\n__all__ = ["add", "LIMIT"]\nLIMIT = 10\n')
    with pytest.raises(UsageError, match="'LIMIT', which is not callable"):
        parse("--server-id", "foo", "--module", name)


def test_public_functions_without_all(module: ModuleWriter) -> None:
    """Without __all__, public functions defined in the module are exposed, and
    neither imported functions nor _private ones (nor classes) are."""
    name = module(ADD + """
from os.path import join
from textwrap import dedent as unindent

def _helper():
    pass

class Thing:
    pass
""")
    options = parse("--server-id", "foo", "--module", name)
    assert sorted(options["functions"]) == ["add"]


def test_module_in_current_directory(tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A module in the current directory imports, as with ``python -m``."""
    monkeypatch.delenv("CALLME_AMQP_URL", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != ""])
    monkeypatch.chdir(tmp_path)
    created: list[str] = []
    name = write_module(tmp_path, ADD, created)
    try:
        options = parse("--server-id", "foo", "--module", name)
    finally:
        sys.modules.pop(name, None)
    assert list(options["functions"]) == ["add"]
    assert options["functions"]["add"](1, 1) == 2


def test_amqp_url(module: ModuleWriter) -> None:
    """--amqp-url sets host, port, user, password and vhost."""
    options = parse("--server-id", "foo", "--module", module(ADD),
                    "--amqp-url", "amqp://bob:secret@broker.example:5673/prod")
    params = options["params"]
    assert params.hosts == (("broker.example", 5673),)
    assert (params.user, params.password, params.vhost) == ("bob", "secret", "prod")


def test_amqp_url_from_environment(module: ModuleWriter,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --amqp-url, CALLME_AMQP_URL gives the broker."""
    monkeypatch.setenv("CALLME_AMQP_URL", "amqp://eve:pw@env.example:5674/%2Fstaging")
    params = parse("--server-id", "foo", "--module", module(ADD))["params"]
    assert params.hosts == (("env.example", 5674),)
    assert (params.user, params.vhost) == ("eve", "/staging")


def test_amqp_url_option_wins_over_environment(module: ModuleWriter,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--amqp-url takes precedence over CALLME_AMQP_URL."""
    monkeypatch.setenv("CALLME_AMQP_URL", "amqp://eve:pw@env.example:5674/")
    params = parse("--server-id", "foo", "--module", module(ADD),
                   "--amqp-url", "amqp://bob:pw@cli.example/")["params"]
    assert params.host == "cli.example"


def test_default_broker(module: ModuleWriter) -> None:
    """With no URL at all, the broker is guest@localhost:5672 on vhost /."""
    params = parse("--server-id", "foo", "--module", module(ADD))["params"]
    assert params.hosts == (("localhost", 5672),)
    assert (params.user, params.vhost) == ("guest", "/")


def test_bad_amqp_url(module: ModuleWriter) -> None:
    """A URL that is not amqp:// or amqps:// is a UsageError."""
    with pytest.raises(UsageError, match="not an AMQP URL"):
        parse("--server-id", "foo", "--module", module(ADD), "--amqp-url", "http://x/")


def test_negative_threads(module: ModuleWriter) -> None:
    """--threads below 0 is a UsageError."""
    with pytest.raises(UsageError):
        parse("--server-id", "foo", "--module", module(ADD), "--threads", "-1")


def test_threads_zero_runs_on_reactor(module: ModuleWriter) -> None:
    """--threads 0 gives a service without threading."""
    service = make_server(parse("--server-id", "foo", "--module", module(ADD),
                                "--threads", "0"))
    assert service.threading is False


def test_threads_zero_warns_about_heartbeats(module: ModuleWriter) -> None:
    """--threads 0 logs one warning at start-up naming the heartbeat risk and the fix;
    --threads 1 logs none."""
    name = module(ADD)
    with capturedLogs() as events:
        make_server(parse("--server-id", "foo", "--module", name, "--threads", "0",
                          "--amqp-url", "amqp://localhost/?heartbeat=30"))
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    text = formatEvent(warnings[0])
    assert "heartbeat" in text and "60 s" in text and "--threads 1" in text, text
    assert warnings[0]["server_id"] == "foo"
    with capturedLogs() as events:
        make_server(parse("--server-id", "foo", "--module", name, "--threads", "1"))
    assert [e for e in events if e["log_level"] == LogLevel.warn] == []


def test_threads_four(module: ModuleWriter) -> None:
    """--threads 4 gives a threading service with 4 threads."""
    service = make_server(parse("--server-id", "foo", "--module", module(ADD),
                                "--threads", "4"))
    assert service.threading is True
    assert service.threads == 4


def test_make_service(module: ModuleWriter) -> None:
    """makeService returns a CallmeServerService serving the module's functions."""
    name = module(ADD + "\ndef mul(a, b):\n    return a * b\n")
    service = make_server(parse("--server-id", "calc", "--module", name))
    assert isinstance(service, CallmeServerService)
    assert service.server_id == "calc"
    exposed = [n for n in service.dispatcher.handlers if not n.startswith(RESERVED_PREFIX)]
    assert sorted(exposed) == ["add", "mul"]
    assert service.dispatcher.handlers["add"].func(2, 3) == 5
    assert not service.running


def test_plugin_points_at_tap() -> None:
    """The twistd plugin is named callme and loads txcallme.tap lazily."""
    from twisted.plugins.callme_plugin import callme

    assert callme.tapname == "callme"
    assert callme.module == "txcallme.tap"


class FakeServer(Service):
    """Stands in for CallmeServerService: a when_ready() Deferred the test fires."""

    def __init__(self) -> None:
        self.server_id = "foo"
        self.ready: Deferred[None] = Deferred()

    def when_ready(self) -> Deferred[None]:
        return self.ready


class FakeReactor(Clock):
    """A Clock that records stop() and system event triggers; running from the start."""

    def __init__(self) -> None:
        super().__init__()
        self.running = True
        self.stopped = False
        self.triggers: list[tuple[str, str, Any, tuple[Any, ...]]] = []

    def callWhenRunning(self, f: Any, *args: Any) -> None:  # noqa: N802
        assert self.running
        f(*args)

    def addSystemEventTrigger(self, phase: str, event: str, f: Any,  # noqa: N802
                              *args: Any) -> None:
        self.triggers.append((phase, event, f, args))

    def stop(self) -> None:
        self.stopped = True


def runner() -> tuple[ServerRunner, FakeServer, FakeReactor, list[int]]:
    server, reactor, exits = FakeServer(), FakeReactor(), []
    service = ServerRunner(server, reactor=reactor, exit=exits.append)  # type: ignore[arg-type]
    return service, server, reactor, exits


def test_first_start_failure_stops_twistd_with_status() -> None:
    """A failing first start logs the error at critical, stops the reactor and exits
    with EXIT_START_FAILED from an 'after shutdown' trigger (after the clean-up)."""
    service, server, reactor, exits = runner()
    service.startService()
    assert server.running and not reactor.stopped
    with capturedLogs() as events:
        server.ready.errback(DeclarationRefused("foo", 406, "PRECONDITION_FAILED - x",
                                                "delete the old queue"))
    assert reactor.stopped
    [(phase, event, exit_, args)] = reactor.triggers
    assert (phase, event, args) == ("after", "shutdown", (EXIT_START_FAILED,))
    assert exits == []  # not before twistd's own shutdown
    exit_(*args)
    assert exits == [EXIT_START_FAILED] != [0]
    [critical] = [e for e in events if e["log_level"] == LogLevel.critical]
    text = formatEvent(critical)
    assert "406 PRECONDITION_FAILED" in text and "delete the old queue" in text, text
    assert isinstance(service.start_error, DeclarationRefused)


def test_ready_server_keeps_running() -> None:
    """A first start that succeeds stops nothing and sets no exit status."""
    service, server, reactor, exits = runner()
    service.startService()
    server.ready.callback(None)
    assert (reactor.stopped, reactor.triggers, service.start_error) == (False, [], None)


def test_failure_after_stop_is_not_fatal() -> None:
    """when_ready failing because twistd is already stopping sets no exit status."""
    service, server, reactor, exits = runner()
    service.startService()
    service.stopService()
    server.ready.errback(BrokerUnreachable("localhost", 5672, "connection refused"))
    assert (reactor.stopped, reactor.triggers) == (False, [])


def test_make_service_wraps_the_server(module: ModuleWriter) -> None:
    """makeService gives twistd a ServerRunner around the module's server."""
    service = makeService(parse("--server-id", "calc", "--module", module(ADD)))
    assert isinstance(service, ServerRunner)
    assert isinstance(service.server, CallmeServerService)
    assert service.server.server_id == "calc" and list(service) == [service.server]


def test_several_amqp_urls_and_shuffle(module: ModuleWriter) -> None:
    """--amqp-url given once per cluster node gives every node, in order; --shuffle-hosts
    turns on the random order."""
    name = module(ADD)
    options = parse("--server-id", "foo", "--module", name, "-u", "amqp://u:p@n1:5672/v",
                    "--amqp-url", "amqp://u:p@n2:5673/v", "--amqp-url=amqp://u:p@n3/v")
    assert options["params"].hosts == (("n1", 5672), ("n2", 5673), ("n3", 5672))
    assert options["params"].shuffle_hosts is False
    shuffled = parse("--server-id", "foo", "--module", name, "--shuffle-hosts",
                     "-u", "amqp://u:p@n1/v", "-u", "amqp://u:p@n2/v")
    assert shuffled["params"].shuffle_hosts is True


def test_amqp_urls_must_agree(module: ModuleWriter) -> None:
    """Node URLs that differ in more than the host are a UsageError."""
    with pytest.raises(UsageError, match="differs"):
        parse("--server-id", "foo", "--module", module(ADD), "-u", "amqp://u:p@n1/v",
              "-u", "amqp://other:p@n2/v")


def test_queue_type_and_stop_timeout(module: ModuleWriter) -> None:
    """--queue-type quorum and --stop-timeout reach the service; other queue types are
    a UsageError."""
    name = module(ADD)
    server = make_server(parse("--server-id", "foo", "--module", name, "--queue-type",
                               "quorum", "--stop-timeout", "7.5"))
    assert (server.queue_type, server.stop_timeout) == ("quorum", 7.5)
    assert make_server(parse("--server-id", "foo", "--module", name)).queue_type == "classic"
    with pytest.raises(UsageError, match="classic, quorum"):
        parse("--server-id", "foo", "--module", name, "--queue-type", "stream")


def test_queue_expires_and_delivery_limit(module: ModuleWriter) -> None:
    """--queue-expires and --delivery-limit reach the quorum queue's declaration (x-expires
    in ms, x-delivery-limit) and its delivery limit; without them the service defaults."""
    name = module(ADD)
    server = make_server(parse("--server-id", "foo", "--module", name, "--queue-type",
                               "quorum", "--queue-expires", "90.5", "--delivery-limit", "3"))
    assert server.declarations.queue_arguments == {
        "x-queue-type": "quorum", "x-expires": 90500, "x-delivery-limit": 3}
    assert server.declarations.delivery_limit == 3
    default = make_server(parse("--server-id", "foo", "--module", name, "--queue-type",
                                "quorum"))
    assert default.declarations.queue_arguments == {
        "x-queue-type": "quorum", "x-expires": round(DEFAULT_QUEUE_EXPIRES * 1000),
        "x-delivery-limit": DEFAULT_DELIVERY_LIMIT}


@pytest.mark.parametrize("option, value", [
    ("--queue-expires", "0"), ("--queue-expires", "-5"), ("--queue-expires", "soon"),
    ("--queue-expires", "nan"), ("--queue-expires", "inf"),
    ("--delivery-limit", "0"), ("--delivery-limit", "-1"), ("--delivery-limit", "2.5"),
    ("--delivery-limit", "many"),
])
def test_bad_queue_expires_or_delivery_limit(module: ModuleWriter, option: str,
                                              value: str) -> None:
    """A lease that is not a positive number of seconds, or a delivery limit that is not a
    whole number of at least 1, is a UsageError naming the option and the value."""
    with pytest.raises(UsageError) as info:
        parse("--server-id", "foo", "--module", module(ADD), "--queue-type", "quorum",
              option, value)
    message = str(info.value)
    assert option in message and message.endswith(f": {value}"), message
    expected = "positive number of seconds" if option == "--queue-expires" else "1 or more"
    assert expected in message, message


@pytest.mark.parametrize("option, value", [("--queue-expires", "60"),
                                           ("--delivery-limit", "5")])
def test_quorum_options_need_quorum(module: ModuleWriter, option: str, value: str) -> None:
    """--queue-expires and --delivery-limit with a classic queue (the default or given)
    are a UsageError rather than silently ignored."""
    name = module(ADD)
    for queue_type in ([], ["--queue-type", "classic"]):
        with pytest.raises(UsageError, match=f"{option} applies to --queue-type quorum only"):
            parse("--server-id", "foo", "--module", name, *queue_type, option, value)


def test_processes_gives_a_worker_monitor(module: ModuleWriter, tmp_path: Path) -> None:
    """--processes 3 gives a WorkerMonitor of 3 workers, each running this command's
    options as one process, killed stop_timeout + KILL_MARGIN after SIGTERM."""
    name = module(ADD)
    argv = ["--server-id", "foo", "--module", name, "--processes", "3", "--stop-timeout", "2"]
    service = makeService(parse(*argv))
    assert isinstance(service, WorkerMonitor)
    assert service.killTime == 2 + KILL_MARGIN
    assert sorted(service.commands) == ["worker-1", "worker-2", "worker-3"]
    args, env = service.commands["worker-1"]
    assert args == [sys.executable, "-m", "twisted", "--log-format", "text", "callme", *argv,
                    "--processes=1"]
    assert env["TXCALLME_SUPERVISOR_PID"] == str(os.getpid())
    with pytest.raises(UsageError):
        parse("--server-id", "foo", "--module", name, "--processes", "0")


def test_log_format_json_sets_the_application_observer(module: ModuleWriter) -> None:
    """--log-format json wraps the service so that, attached to twistd's application,
    it sets a JSON observer writing one event per line; other formats are a UsageError."""
    import io

    from twisted.application.service import Application
    from twisted.logger import ILogObserver, Logger

    name = module(ADD)
    service = makeService(parse("--server-id", "foo", "--module", name, "--log-format",
                                "json"))
    assert isinstance(service, JSONLogging) and isinstance(service.service, ServerRunner)
    out = io.StringIO()  # where twistd's log file would be
    service = JSONLogging(service.service, lambda: out)
    application = Application("callme")
    service.setServiceParent(application)
    observer = ILogObserver(application)
    Logger(namespace="t", observer=observer).info("hello {who}", who="you")
    [line] = out.getvalue().splitlines()
    event = json.loads(line)
    assert (event["who"], event["log_format"]) == ("you", "hello {who}")
    with pytest.raises(UsageError, match="text, json"):
        parse("--server-id", "foo", "--module", name, "--log-format", "xml")


def test_metrics_port_per_worker(module: ModuleWriter) -> None:
    """With --processes 3 --metrics-port 9100, worker k serves metrics on 9100+k-1."""
    options = parse("--server-id", "foo", "--module", module(ADD), "--processes", "3",
                    "--metrics-port", "9100")
    assert [worker_command(options, k)[-1] for k in (1, 2, 3)] == [
        "--metrics-port=9100", "--metrics-port=9101", "--metrics-port=9102"]
    assert options["metrics-interface"] == "127.0.0.1"


class StuckServer(FakeServer):
    """A server whose stopService never fires."""

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        return Deferred()


def test_stop_after_failed_start_is_bounded() -> None:
    """After a failed first start, twistd's stop waits at most FAILED_START_STOP_TIMEOUT
    for the server (nothing to drain), so the process exits even if the server hangs."""
    server, reactor = StuckServer(), FakeReactor()
    service = ServerRunner(server, reactor=reactor, exit=lambda status: None)  # type: ignore[arg-type]
    service.startService()
    server.ready.errback(BrokerUnreachable("localhost", 5672, "connection refused"))
    stopping = service.stopService()
    reactor.advance(FAILED_START_STOP_TIMEOUT - 0.1)
    assert not stopping.called
    reactor.advance(0.2)
    assert stopping.called and reactor.getDelayedCalls() == []


def test_stop_after_good_start_waits_for_the_server() -> None:
    """A server that started normally gets all the time its own stop takes."""
    server, reactor = StuckServer(), FakeReactor()
    service = ServerRunner(server, reactor=reactor, exit=lambda status: None)  # type: ignore[arg-type]
    service.startService()
    server.ready.callback(None)
    stopping = service.stopService()
    reactor.advance(FAILED_START_STOP_TIMEOUT * 100)
    assert not stopping.called


def test_callme_compat(module: ModuleWriter) -> None:
    """--callme-compat reaches the service (off by default); with a quorum queue it is
    a UsageError."""
    name = module(ADD)
    assert make_server(parse("--server-id", "foo", "--module", name,
                             "--callme-compat")).callme_compat is True
    assert make_server(parse("--server-id", "foo", "--module", name)).callme_compat is False
    with pytest.raises(UsageError, match="classic"):
        parse("--server-id", "foo", "--module", name, "--callme-compat", "--queue-type",
              "quorum")
