"""``twistd callme``: serve the public functions of a module under a server id.

``twistd -n callme --server-id fooserver --module app``
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import IO, Any, TypeVar

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    eventFromJSON,
    jsonFileLogObserver,
)
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.runner.procmon import ProcessMonitor

from txcallme.amqp import TLSSettings, connection_params
from txcallme.service import (
    DEFAULT_DELIVERY_LIMIT,
    DEFAULT_QUEUE_EXPIRES,
    QUEUE_TYPES,
    CallmeServerService,
)

log = Logger(namespace="callme.server")

LOG_FORMATS = ("text", "json")


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"not a TCP port: {value}")
    return port


def _seconds(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"must be a positive number of seconds: {value}")
    return number


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be 1 or more: {value}")
    return number


def _queue_type(value: str) -> str:
    if value not in QUEUE_TYPES:
        raise ValueError(f"must be one of {', '.join(QUEUE_TYPES)}: {value}")
    return value


def _queue_expires(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"--queue-expires must be a positive number of seconds: {value}")
    return number


def _delivery_limit(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"--delivery-limit must be a whole number, 1 or more: {value}")
    return number


def _log_format(value: str) -> str:
    if value not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}: {value}")
    return value


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must be 0 or more: {value}")
    return number


class Options(usage.Options):
    synopsis = "--server-id ID --module MODULE [options]"
    longdesc = (
        "Serve the public functions of MODULE (its __all__, or the public functions "
        "defined in it) over AMQP under server id ID. The broker comes from --amqp-url, "
        "the CALLME_AMQP_URL environment variable, or the --amqp-* options."
    )
    optParameters: list[list[Any]] = [
        ["server-id", "s", None, "Server id to serve (required)."],
        ["module", "m", None, "Importable module whose functions to serve (required)."],
        ["amqp-url", "u", None, "Broker URL, amqp[s]://user:pass@host:port/vhost; give it "
         "once per cluster node to try them in turn."],
        ["amqp-host", None, "localhost", "Broker host (several: comma-separated)."],
        ["amqp-port", None, None, "Broker port [default: 5672, 5671 with --ssl].", _port],
        ["amqp-user", None, "guest", "Broker user."],
        ["amqp-password", None, "guest", "Broker password."],
        ["amqp-vhost", None, "/", "Broker virtual host."],
        ["threads", "t", 10, "Threads for blocking functions; 0 runs them on the reactor.",
         _count],
        ["prefetch", None, None, "Requests taken at once [default: 2 x threads, or 100].", _count],
        ["ssl-ca", None, None, "CA certificate file (PEM) to verify the broker."],
        ["ssl-cert", None, None, "Client certificate file (PEM)."],
        ["ssl-key", None, None, "Client private key file (PEM)."],
        ["queue-type", None, "classic", "Server queue: classic (one node) or quorum "
         "(replicated over a cluster).", _queue_type],
        ["queue-expires", None, None, "With --queue-type quorum: seconds the queue stays "
         f"once no instance consumes it [default: {DEFAULT_QUEUE_EXPIRES:g}].", _queue_expires],
        ["delivery-limit", None, None, "With --queue-type quorum: times one request may run "
         "without an answer (its server died) before it is answered with an error "
         f"[default: {DEFAULT_DELIVERY_LIMIT}].", _delivery_limit],
        ["stop-timeout", None, 60.0, "Seconds a stop waits for running calls.", _seconds],
        ["processes", "p", 1, "Worker processes serving the server id, supervised and "
         "restarted if they die.", _at_least_one],
        ["metrics-port", None, None, "Serve Prometheus metrics at http://INTERFACE:PORT/"
         "metrics (with --processes, worker k uses PORT+k-1).", _port],
        ["metrics-interface", None, "127.0.0.1", "Interface for --metrics-port."],
        ["log-format", None, "text", "Log as text or json (one JSON event a line, "
         "twisted.logger's eventAsJSON).", _log_format],
    ]
    optFlags = [
        ["ssl", None, "Connect with TLS."],
        ["no-verify-hostname", None, "Do not check the broker certificate's host name."],
        ["shuffle-hosts", None, "Try the broker nodes in a random order (spreads "
         "instances over a cluster)."],
        ["callme-compat", None, "Also answer unmodified callme 0.2.0 Proxies (their "
         "requests are pickles: only for callers you trust)."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["amqp-urls"] = []
        self.argv: list[str] = []

    def parseOptions(self, options: list[str] | None = None) -> None:  # noqa: N802
        """Parse *options* (default ``sys.argv[1:]``), keeping them for workers."""
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(self.argv)  # type: ignore[no-untyped-call]

    def opt_amqp_url(self, url: str) -> None:
        """Broker URL; several for the nodes of a cluster."""
        self["amqp-urls"].append(url)
        self["amqp-url"] = url

    def postOptions(self) -> None:  # noqa: N802
        if not self["server-id"]:
            raise usage.UsageError("--server-id is required")
        if not self["module"]:
            raise usage.UsageError("--module is required")
        if not self["amqp-urls"] and os.environ.get("CALLME_AMQP_URL"):
            self["amqp-urls"] = [os.environ["CALLME_AMQP_URL"]]
        try:
            self["params"] = _params(self)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["callme-compat"] and self["queue-type"] != "classic":
            raise usage.UsageError("--callme-compat needs --queue-type classic (callme's "
                                   "queue flags)")
        for option in ("queue-expires", "delivery-limit"):
            if self[option] is not None and self["queue-type"] != "quorum":
                raise usage.UsageError(f"--{option} applies to --queue-type quorum only")
        module = import_module(self["module"])
        self["functions"] = exposed_functions(module)


def import_module(name: str) -> ModuleType:
    """Import *name*, with the current directory importable as ``python -m`` has it."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise usage.UsageError(f"cannot import module {name!r}: {e}") from None
    except Exception as e:
        raise usage.UsageError(
            f"importing module {name!r} failed: {type(e).__name__}: {e}") from None


def exposed_functions(module: ModuleType) -> dict[str, Callable[..., Any]]:
    """``__all__`` if the module defines it, else its public functions."""
    names = getattr(module, "__all__", None)
    if names is not None:
        functions = {}
        for name in names:
            obj = getattr(module, name, None)
            if not callable(obj):
                raise usage.UsageError(
                    f"{module.__name__}.__all__ names {name!r}, which is not callable")
            functions[name] = obj
    else:
        functions = {
            name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and inspect.isfunction(obj)
            and obj.__module__ == module.__name__
        }
    if not functions:
        raise usage.UsageError(f"module {module.__name__!r} exposes no functions")
    return functions


def _params(options: Options) -> Any:
    tls = None
    if options["ssl"] or options["ssl-ca"] or options["ssl-cert"]:
        tls = TLSSettings(ca_file=options["ssl-ca"], cert_file=options["ssl-cert"],
                          key_file=options["ssl-key"],
                          verify_hostname=not options["no-verify-hostname"])
    return connection_params(
        options["amqp-host"].split(","), options["amqp-port"], options["amqp-user"],
        options["amqp-password"], options["amqp-vhost"], amqp_url=options["amqp-urls"] or None,
        ssl=tls or False, shuffle_hosts=True if options["shuffle-hosts"] else None)


#: twistd's exit status when the server's first start fails (refused declaration,
#: login, unreachable broker): systemd and scripts see a failure, not a clean stop.
EXIT_START_FAILED = 1

#: Seconds twistd waits for the server to stop after a failed first start.
FAILED_START_STOP_TIMEOUT = 5.0


def _exit_at_interpreter_end(status: int) -> None:
    """Make the process exit with *status* once twistd has finished its own
    clean-up (pidfile, "Server Shut Down."): twistd has no API for an exit
    status, so the last step of the interpreter's exit sets it."""

    def exit_now() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)

    atexit.register(exit_now)


class ServerRunner(MultiService):
    """What ``twistd callme`` runs: the server service (and its helpers).

    If the server's *first* start fails (``when_ready()`` fails: a refused
    declaration, login or permission, an unreachable broker), the error is
    logged at critical level, the reactor stops (stopping the services) and the
    process exits with :data:`EXIT_START_FAILED`. Later reconnections are the
    server's business: it logs and retries them.
    """

    def __init__(self, server: CallmeServerService, *, reactor: Any = None,
                 exit: Callable[[int], None] = _exit_at_interpreter_end,
                 fatal_start: bool = True) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._exit = exit
        self.server = server
        #: False: the caller deals with a failed first start (``callme serve``)
        self.fatal_start = fatal_start
        #: the error that stopped the first start, if one did
        self.start_error: BaseException | None = None
        server.setServiceParent(self)  # type: ignore[no-untyped-call]

    def startService(self) -> None:  # noqa: N802
        super().startService()  # type: ignore[no-untyped-call]
        if self.fatal_start:
            self.server.when_ready().addErrback(self._first_start_failed)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        """Stop the services; after a failed first start (nothing to drain), give
        up waiting after :data:`FAILED_START_STOP_TIMEOUT` seconds."""
        d: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]
        if self.start_error is None:
            return d

        def gave_up(failure: Failure) -> None:
            log.warn("the server did not stop within {s} s of its failed start: exiting "
                     "anyway ({error})", s=FAILED_START_STOP_TIMEOUT, error=failure.value)

        d.addTimeout(FAILED_START_STOP_TIMEOUT, self._reactor)
        return d.addErrback(gave_up)

    def _first_start_failed(self, failure: Failure) -> None:
        if not self.running or self.start_error is not None:
            return  # being stopped anyway (SIGTERM before the server was ready)
        self.start_error = failure.value
        log.critical("server {server_id!r} cannot start: {error}; exiting with status "
                     "{status}", server_id=self.server.server_id, error=failure.value,
                     status=EXIT_START_FAILED)
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exit,
                                            EXIT_START_FAILED)
        self._reactor.callWhenRunning(self._reactor.stop)


def makeService(options: Options) -> Service:  # noqa: N802
    """The service ``twistd callme`` runs for parsed *options*: the server, or
    with ``--processes N`` (N > 1) a :class:`WorkerMonitor` of N workers."""
    service: Service
    if options["processes"] > 1:
        service = worker_monitor(options)
    else:
        service = make_runner(options)
    if options["log-format"] == "json":
        return JSONLogging(service, _twistd_log_file(options))
    return service


def make_runner(options: Options, *, fatal_start: bool = True) -> ServerRunner:
    """The server of *options* in a :class:`ServerRunner`, with its metrics
    service (``--metrics-port``) and, in a worker, the supervisor watch."""
    metrics = None
    if options["metrics-port"]:  # before the server: its metrics are recorded
        from txcallme import observe

        metrics = observe.metrics_service(options["metrics-port"],
                                          options["metrics-interface"])
    runner = ServerRunner(make_server(options), fatal_start=fatal_start)
    if metrics is not None:
        metrics.setServiceParent(runner)
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor:
        _watch_supervisor(runner, int(supervisor))
    return runner


# -- --log-format json -------------------------------------------------------------


def json_observer(out: IO[Any]) -> FileLogObserver:
    """One JSON object per line (``eventAsJSON``), no record separator."""
    return jsonFileLogObserver(out, recordSeparator="")


def _twistd_log_file(options: Options) -> Callable[[], IO[Any]]:
    """Where twistd would log: ``--logfile`` (``-`` is stdout), else stdout with
    ``--nodaemon``, else ``twistd.log``."""
    parent = getattr(options, "parent", None)
    logfile = parent.get("logfile") if parent is not None else "-"
    nodaemon = parent.get("nodaemon") if parent is not None else True

    def opener() -> IO[Any]:
        if logfile == "-" or (not logfile and nodaemon):
            return sys.stdout
        return LogFile.fromFullPath(logfile or "twistd.log")  # type: ignore[no-any-return]

    return opener


class JSONLogging(MultiService):
    """Wraps the service of ``--log-format json``: when twistd attaches it to its
    application, it sets the application's log observer (twistd's documented
    hook, read when logging starts) to :func:`json_observer` on twistd's log file."""

    def __init__(self, service: Service, out: Callable[[], IO[Any]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._out = out
        self.service = service
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:  # noqa: N802
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, json_observer(self._out()))
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]


class _WorkerLog(Logger):
    """ProcessMonitor's logger: a worker's line that is a JSON log event (workers
    log JSON under ``--log-format json``) is re-emitted as that event, with
    ``worker`` added, instead of as text wrapping it."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        line = kwargs.get("line")
        if isinstance(line, str):
            line = line.lstrip("\x1e")  # twist's JSON records start with RS (RFC 7464)
        if isinstance(line, str) and line.startswith("{") and "tag" in kwargs:
            try:
                event = eventFromJSON(line)
            except ValueError:
                pass
            else:
                event["worker"] = kwargs["tag"]
                publish: Callable[[dict[str, Any]], None] = self.observer
                publish(event)
                return
        super().emit(level, format, **kwargs)


# -- --processes: supervised workers -----------------------------------------------

#: Set in a worker's environment to its supervisor's pid: a worker whose
#: supervisor is gone (killed with SIGKILL) stops instead of living on.
SUPERVISOR_ENV = "TXCALLME_SUPERVISOR_PID"

#: Seconds between a worker's checks that its supervisor still runs.
SUPERVISOR_CHECK_INTERVAL = 1.0

#: Seconds a worker gets beyond ``--stop-timeout`` before SIGKILL.
KILL_MARGIN = 5.0


def _watch_supervisor(runner: ServerRunner, supervisor: int) -> None:
    def check() -> None:
        if os.getppid() != supervisor:
            log.error("the supervisor (pid {pid}) is gone: stopping", pid=supervisor)
            runner._reactor.stop()

    TimerService(SUPERVISOR_CHECK_INTERVAL, check).setServiceParent(runner)


def worker_command(options: Options, number: int) -> list[str]:
    """The command line of worker *number* (1-based): this ``twistd callme``'s own
    options, run by ``python -m twisted`` (``twist``) as one process."""
    args = [sys.executable, "-m", "twisted", "--log-format", options["log-format"], "callme",
            *options.argv, "--processes=1"]
    if options["metrics-port"]:
        args.append(f"--metrics-port={options['metrics-port'] + number - 1}")
    return args


class WorkerMonitor(ProcessMonitor):
    """Runs the workers of ``--processes N`` and restarts one that dies.

    Stopping (SIGTERM to twistd) sends SIGTERM to every worker, which drains
    like a single server (up to ``--stop-timeout``); a worker still running
    ``KILL_MARGIN`` seconds later is killed. :meth:`stopService` fires when
    every worker has exited. A worker whose *first* start fails (it exits with
    :data:`EXIT_START_FAILED`: a refused declaration or login, an unreachable
    broker) stops them all, and twistd exits with that status: every worker
    has the same options, so the others would fail the same way.
    """

    log = _WorkerLog()

    def __init__(self, *, reactor: Any = None,
                 exit: Callable[[int], None] = _exit_at_interpreter_end) -> None:
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(reactor)
        self._exit = exit
        self._launches: dict[str, int] = {}
        self._all_exited: list[Deferred[None]] = []
        self.start_failed: str | None = None
        #: each worker's command line and environment, by name
        self.commands: dict[str, tuple[list[str], dict[str, str]]] = {}

    def add_worker(self, name: str, args: list[str], env: dict[str, str], cwd: str) -> None:
        """Run (and supervise) *args* as worker *name*."""
        self.commands[name] = (args, env)
        self.addProcess(name, args, env=env, cwd=cwd)

    def startProcess(self, name: str) -> None:  # noqa: N802
        if name not in self.protocols:
            self._launches[name] = self._launches.get(name, 0) + 1
        super().startProcess(name)

    def _monitoredProcessExited(self, name: str, reason: Failure | None = None) -> None:
        status = getattr(reason.value, "exitCode", None) if reason is not None else None
        first = self._launches.get(name) == 1
        if self.running and first and status == EXIT_START_FAILED \
                and self.start_failed is None:
            self.start_failed = name
            log.critical("worker {name} could not start (exit status {status}, see its "
                         "log above): stopping every worker", name=name, status=status)
            self._reactor.addSystemEventTrigger("after", "shutdown", self._exit,
                                                EXIT_START_FAILED)
            self._reactor.callWhenRunning(self._reactor.stop)
        elif self.running:
            log.warn("worker {name} exited ({reason}): restarting it", name=name,
                     reason=reason.getErrorMessage() if reason is not None else "?")
        super()._monitoredProcessExited(name, reason)
        if not self.protocols and self._all_exited:
            waiting, self._all_exited = self._all_exited, []
            for d in waiting:
                d.callback(None)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]  # noqa: N802
        """SIGTERM every worker; fires once all have exited (killed after killTime)."""
        super().stopService()
        d: Deferred[None] = Deferred()
        if self.protocols:
            log.info("stopping {n} workers", n=len(self.protocols))
            self._all_exited.append(d)
        else:
            d.callback(None)
        return d


def worker_monitor(options: Options, *, reactor: Any = None) -> WorkerMonitor:
    """A :class:`WorkerMonitor` running ``--processes`` workers for *options*."""
    monitor = WorkerMonitor(reactor=reactor)
    monitor.setName(f"callme-{options['server-id']}-workers")  # type: ignore[no-untyped-call]
    monitor.killTime = options["stop-timeout"] + KILL_MARGIN
    env = dict(os.environ, **{SUPERVISOR_ENV: str(os.getpid())})
    for number in range(1, options["processes"] + 1):
        monitor.add_worker(f"worker-{number}", worker_command(options, number), env,
                           os.getcwd())
    return monitor


_T = TypeVar("_T")


def _given(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def make_server(options: Options) -> CallmeServerService:
    """The server service for parsed *options* (without twistd's runner)."""
    threads = options["threads"]
    heartbeat = options["params"].heartbeat
    if threads == 0 and heartbeat:
        log.warn(
            "--threads 0: every function runs on the reactor thread, which also sends "
            "heartbeats; a function that runs longer than about {twice} s (two heartbeat "
            "intervals) makes the broker drop the connection and redeliver the call, in a "
            "loop. Use --threads 1 or more for functions that block.",
            twice=f"{2 * heartbeat:g}", server_id=options["server-id"])
    service = CallmeServerService(
        options["server-id"], params=options["params"], threading=threads > 0,
        threads=max(threads, 1), prefetch=options["prefetch"],
        queue_type=options["queue-type"], stop_timeout=options["stop-timeout"],
        queue_expires=_given(options["queue-expires"], DEFAULT_QUEUE_EXPIRES),
        delivery_limit=_given(options["delivery-limit"], DEFAULT_DELIVERY_LIMIT),
        callme_compat=bool(options["callme-compat"]))
    for name, func in options["functions"].items():
        service.register_function(func, name)
    return service
