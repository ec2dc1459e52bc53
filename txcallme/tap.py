"""``twistd callme``: serve the public functions of a module under a server id.

``twistd -n callme --server-id fooserver --module app``
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from txcallme.amqp import TLSSettings, connection_params
from txcallme.service import CallmeServerService

log = Logger(namespace="callme.server")


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"not a TCP port: {value}")
    return port


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
        ["amqp-url", "u", None, "Broker URL, amqp[s]://user:pass@host:port/vhost."],
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
    ]
    optFlags = [
        ["ssl", None, "Connect with TLS."],
        ["no-verify-hostname", None, "Do not check the broker certificate's host name."],
    ]

    def postOptions(self) -> None:  # noqa: N802
        if not self["server-id"]:
            raise usage.UsageError("--server-id is required")
        if not self["module"]:
            raise usage.UsageError("--module is required")
        if not self["amqp-url"] and os.environ.get("CALLME_AMQP_URL"):
            self["amqp-url"] = os.environ["CALLME_AMQP_URL"]
        try:
            self["params"] = _params(self)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
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
        options["amqp-password"], options["amqp-vhost"], amqp_url=options["amqp-url"],
        ssl=tls or False)


#: twistd's exit status when the server's first start fails (refused declaration,
#: login, unreachable broker): systemd and scripts see a failure, not a clean stop.
EXIT_START_FAILED = 1


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
                 exit: Callable[[int], None] = _exit_at_interpreter_end) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._exit = exit
        self.server = server
        #: the error that stopped the first start, if one did
        self.start_error: BaseException | None = None
        server.setServiceParent(self)  # type: ignore[no-untyped-call]

    def startService(self) -> None:  # noqa: N802
        super().startService()  # type: ignore[no-untyped-call]
        self.server.when_ready().addErrback(self._first_start_failed)

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


def makeService(options: Options) -> ServerRunner:  # noqa: N802
    """The service ``twistd callme`` runs for parsed *options*."""
    return ServerRunner(make_server(options))


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
        threads=max(threads, 1), prefetch=options["prefetch"])
    for name, func in options["functions"].items():
        service.register_function(func, name)
    return service
