"""``twistd callme``: serve the public functions of a module under a server id.

``twistd -n callme --server-id fooserver --module app``
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

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


def makeService(options: Options) -> CallmeServerService:  # noqa: N802
    """The server service for parsed *options*."""
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
