"""``callme``: call, ping, describe and serve txcallme servers from a shell.

    callme call SERVER METHOD [ARGS...] [--kwargs JSON] [--timeout SECONDS]
    callme ping SERVER [--count N]
    callme describe SERVER
    callme stats SERVER [--json] [--count N]
    callme serve MODULE --server-id ID [--threads N] [--prefetch N] [--ssl ...]

ARGS are JSON literals (``1``, ``"a"``, ``[1, 2]``, ``null``); anything that is
not valid JSON is passed as a plain string. ``call`` prints the result as JSON.
``serve`` takes the options of ``twistd callme`` and runs in the foreground
until SIGINT or SIGTERM, letting running calls finish.

The broker is ``--amqp-url`` (before the subcommand), else the
``CALLME_AMQP_URL`` environment variable, else ``amqp://guest:guest@localhost`` (vhost ``/``).

Exit codes:
    0  success
    1  the remote function raised an exception (type, message and remote
       traceback on stderr)
    2  usage error
    3  the broker cannot be reached
    4  the broker refused the login (user, password or vhost)
    5  the broker refused access (permissions)
    6  no server serves that server id
    7  no reply within the timeout
    8  any other txcallme error (connection lost, TLS, bad reply)
    130  interrupted (Ctrl-C, SIGINT) before the command finished; 143 for SIGTERM
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python import usage

from txcallme import _introspect, _wire, tap
from txcallme.amqp import connection_params
from txcallme.errors import (
    AccessRefused,
    AuthenticationError,
    BrokerUnreachable,
    CallmeError,
    RemoteError,
    RpcTimeout,
    ServerUnavailable,
)
from txcallme.errors import qualified_name as _qualified_name
from txcallme.proxy import Proxy

EXIT_OK = 0
EXIT_REMOTE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_ACCESS = 5
EXIT_NO_SERVER = 6
EXIT_TIMEOUT = 7
EXIT_ERROR = 8
#: 128 + the signal number, as shells report a command killed by a signal.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM

EPILOG = """\
exit codes: 0 ok, 1 remote exception, 2 usage error, 3 broker unreachable,
4 login refused, 5 access refused, 6 no such server, 7 timeout, 8 other error,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
The broker is --amqp-url, else $CALLME_AMQP_URL, else amqp://guest:guest@localhost (vhost /)."""

log = Logger(namespace="callme.cli")


class _UsageError(Exception):
    pass


# -- argument parsing ------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callme", description="Call, inspect and serve txcallme (callme) RPC servers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amqp-url", metavar="URL", action="append",
                        help="broker URL, amqp[s]://user:pass@host:port/vhost; repeat it "
                             "for the nodes of a cluster (tried in turn)")
    parser.add_argument("--shuffle-hosts", action="store_true",
                        help="try the broker nodes in a random order")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log connection events to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    call = commands.add_parser("call", help="call METHOD on SERVER and print the result",
                               epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    call.add_argument("server", metavar="SERVER", type=_server_id, help="server id")
    call.add_argument("method", metavar="METHOD", help="function name (dotted names too)")
    call.add_argument("args", metavar="ARGS", nargs="*",
                      help="positional arguments as JSON literals (else strings)")
    call.add_argument("--kwargs", metavar="JSON", type=_json_object, default={},
                      help='keyword arguments as a JSON object, e.g. \'{"x": 1}\'')
    call.add_argument("--timeout", metavar="SECONDS", type=_positive, default=10.0,
                      help="seconds to wait for the reply (default: 10)")

    ping = commands.add_parser("ping", help="round-trip times and instances of SERVER",
                               epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    ping.add_argument("server", metavar="SERVER", type=_server_id, help="server id")
    ping.add_argument("--count", "-c", metavar="N", type=int, default=3,
                      help="number of pings (default: 3)")
    ping.add_argument("--timeout", metavar="SECONDS", type=_positive, default=10.0,
                      help="seconds to wait for each reply (default: 10)")

    describe = commands.add_parser("describe", help="list the functions SERVER offers",
                                   epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    describe.add_argument("server", metavar="SERVER", type=_server_id, help="server id")
    describe.add_argument("--timeout", metavar="SECONDS", type=_positive, default=10.0,
                          help="seconds to wait for the reply (default: 10)")

    stats = commands.add_parser(
        "stats", help="calls, errors, latency and load of every instance of SERVER",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    stats.add_argument("server", metavar="SERVER", type=_server_id, help="server id")
    stats.add_argument("--count", "-c", metavar="N", type=int, default=10,
                       help="requests to send; each instance answers some (default: 10)")
    stats.add_argument("--json", action="store_true", help="print JSON for scripts")
    stats.add_argument("--timeout", metavar="SECONDS", type=_positive, default=10.0,
                       help="seconds to wait for each reply (default: 10)")

    serve = commands.add_parser(
        "serve", add_help=False, prefix_chars="\0",
        help="serve MODULE's functions (options of twistd callme; serve --help)")
    serve.add_argument("options", nargs=argparse.REMAINDER)
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _server_id(text: str) -> str:
    try:
        return _wire.check_server_id(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def parse_arg(text: str) -> Any:
    """A command-line argument as a JSON literal, or as the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class ServeOptions(tap.Options):
    """``twistd callme``'s options, with MODULE also accepted as an argument."""

    synopsis = "callme serve MODULE --server-id ID [options]"

    def parseArgs(self, module: str | None = None) -> None:  # noqa: N802
        if module is not None:
            if self["module"] and self["module"] != module:
                raise usage.UsageError(f"two modules given: {module!r} and "
                                       f"{self['module']!r}")
            self["module"] = module


# -- running -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``callme`` command line; return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    env_url = os.environ.get("CALLME_AMQP_URL")
    urls: list[str] = args.amqp_url or ([env_url] if env_url else [])
    if args.command == "serve":
        return _serve(args.options, urls, args.shuffle_hosts)
    shuffle = True if args.shuffle_hosts else None
    try:  # a bad URL is a usage error
        params = connection_params(amqp_url=urls or None, shuffle_hosts=shuffle)
    except ValueError as e:
        return _fail(EXIT_USAGE, f"bad broker URL: {e}")
    # Without -v, errors reach the user as one line each (below), not as logs.
    observers: list[Any] = [textFileLogObserver(sys.stderr)] if args.verbose else []
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    command = {"call": _call, "ping": _ping, "describe": _describe,
               "stats": _stats}[args.command]
    return _react(lambda reactor: _with_proxy(reactor, {"params": params}, command, args),
                  interruptible=True)


def _react(main: Callable[[Any], Coroutine[Any, Any, int]], *,
           interruptible: bool = False) -> int:
    """Run *main* under ``task.react``; its exit code.

    A signal that stops the reactor before *main* finishes gives 128 + the
    signal number if *interruptible* (a call cut short is not a success), else
    0 (``serve``: SIGINT/SIGTERM is how it is meant to stop).
    """
    codes: list[int] = []
    signals: list[int] = []

    def note_signals() -> None:
        # Twisted's handlers stop the reactor; ours note which signal came first.
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)
            if callable(previous):
                def handler(number: int, frame: Any, previous: Any = previous) -> None:
                    signals.append(number)
                    previous(number, frame)

                signal.signal(signum, handler)

    def run(reactor: Any) -> Deferred[Any]:
        reactor.callWhenRunning(note_signals)
        d = Deferred.fromCoroutine(main(reactor))
        d.addCallback(codes.append)
        return d

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:  # main failed unexpectedly (react logged it)
            return EXIT_ERROR
    if codes:
        return codes[0]
    # No code: the reactor was stopped (SIGINT/SIGTERM) before main finished.
    if interruptible:
        if signals and signals[0] == signal.SIGTERM:
            return _fail(EXIT_TERMINATED, "terminated")
        return _fail(EXIT_INTERRUPTED, "interrupted")
    return EXIT_OK


async def _with_proxy(reactor: Any, proxy_kwargs: dict[str, Any],
                      command: Callable[[Proxy, argparse.Namespace],
                                        Coroutine[Any, Any, int]],
                      args: argparse.Namespace) -> int:
    proxy = Proxy(timeout=args.timeout, reactor=reactor, **proxy_kwargs)
    try:
        return await command(proxy, args)
    except BaseException as e:
        return _report(e)
    finally:
        # One reactor turn first: closing straight from a failed first connect
        # re-enters ClientService's state machine (see tests/test_connect.py).
        await task.deferLater(reactor, 0, lambda: None)
        await proxy.close()


async def _call(proxy: Proxy, args: argparse.Namespace) -> int:
    values = [parse_arg(text) for text in args.args]
    result = await proxy.invoke(args.server, args.method, values, args.kwargs)
    print(json.dumps(result))
    return EXIT_OK


async def _ping(proxy: Proxy, args: argparse.Namespace) -> int:
    instances: dict[str, int] = {}
    for number in range(1, max(args.count, 1) + 1):
        start = time.perf_counter()
        reply = await proxy.invoke(args.server, _introspect.PING)
        ms = (time.perf_counter() - start) * 1000
        instance = str(reply.get("instance", "?"))
        instances[instance] = instances.get(instance, 0) + 1
        print(f"reply from {args.server} ({instance}, txcallme "
              f"{reply.get('version', '?')}): seq={number} time={ms:.1f} ms", flush=True)
    print(f"{len(instances)} instance(s) answered: " + ", ".join(
        f"{name} ({count}x)" for name, count in instances.items()))
    return EXIT_OK


async def _describe(proxy: Proxy, args: argparse.Namespace) -> int:
    info = await proxy.invoke(args.server, _introspect.DESCRIBE)
    print(f"{info.get('server_id', args.server)} ({info.get('instance', '?')}):")
    for function in info.get("functions", []):
        doc = function.get("doc") or ""
        line = f"  {function['name']}{function.get('signature', '(...)')}"
        print(f"{line}  {doc}" if doc else line)
    return EXIT_OK


async def _stats(proxy: Proxy, args: argparse.Namespace) -> int:
    instances: dict[str, dict[str, Any]] = {}
    for _ in range(max(args.count, 1)):  # the broker spreads them over the instances
        reply = await proxy.invoke(args.server, _introspect.STATS)
        instances[str(reply.get("instance", "?"))] = reply
    if args.json:
        print(json.dumps({"server_id": args.server,
                          "instances": [instances[name] for name in sorted(instances)]},
                         indent=2))
        return EXIT_OK
    print(f"{len(instances)} instance(s) of {args.server} answered")
    rows = [("INSTANCE", "METHOD", "CALLS", "ERRORS", "P50 MS", "P99 MS")]
    for name in sorted(instances):
        stat = instances[name]
        threads = stat.get("pool_threads")
        pool = f"{stat.get('pool_busy', 0)}/{threads}" if threads else \
            str(stat.get("pool_busy", 0))
        print(f"{name}: up {_duration(stat.get('uptime', 0))}, "
              f"{stat.get('in_flight', 0)} in flight, pool threads busy {pool}")
        for method, numbers in [*stat.get("methods", {}).items(),
                                ("(all)", stat.get("total", {}))]:
            rows.append((name, method, str(numbers.get("calls", 0)),
                         str(numbers.get("errors", 0)), _ms(numbers.get("p50_ms")),
                         _ms(numbers.get("p99_ms"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    return EXIT_OK


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _report(error: BaseException) -> int:
    """Print one clear message on stderr; the exit code for *error*."""
    if isinstance(error, BrokerUnreachable):
        return _fail(EXIT_UNREACHABLE, str(error))
    if isinstance(error, AuthenticationError):
        return _fail(EXIT_AUTH, str(error))
    if isinstance(error, AccessRefused):
        return _fail(EXIT_ACCESS, f"access refused: {error}")
    if isinstance(error, ServerUnavailable):
        return _fail(EXIT_NO_SERVER, str(error))
    if isinstance(error, RpcTimeout):
        return _fail(EXIT_TIMEOUT, str(error))
    remote_traceback = getattr(error, "remote_traceback", None)
    if remote_traceback is not None:
        if isinstance(error, RemoteError):
            type_name, message = error.type_name, error.message
        else:
            type_name = getattr(error, "remote_type", None) or _qualified_name(type(error))
            message = str(error)
        if remote_traceback:
            sys.stderr.write("Remote traceback:\n" + remote_traceback.rstrip() + "\n")
        return _fail(EXIT_REMOTE, f"remote exception {type_name}: {message}")
    if isinstance(error, CallmeError):
        return _fail(EXIT_ERROR, f"{type(error).__name__}: {error}")
    if isinstance(error, Exception):
        return _fail(EXIT_ERROR, f"unexpected error: {type(error).__name__}: {error}")
    raise error


def _fail(code: int, message: str) -> int:
    sys.stderr.write(f"callme: {message}\n")
    sys.stderr.flush()
    return code


# -- serve -----------------------------------------------------------------------


def _serve(argv: Sequence[str], urls: Sequence[str], shuffle_hosts: bool) -> int:
    options = ServeOptions()
    argv = list(argv)
    if argv and not argv[0].startswith("-"):  # getopt stops at the first argument
        argv[:1] = ["--module", argv[0]]
    if urls and not any(a == "-u" or a.startswith("--amqp-url") for a in argv):
        argv[:0] = [f"--amqp-url={url}" for url in urls]
    if shuffle_hosts:
        argv[:0] = ["--shuffle-hosts"]
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        return _fail(EXIT_USAGE, f"serve: {e} (see callme serve --help)")
    except SystemExit as e:  # --help
        return EXIT_OK if not e.code else EXIT_USAGE
    observers: list[Any] = [tap.json_observer(sys.stderr) if options["log-format"] == "json"
                            else textFileLogObserver(sys.stderr)]
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    if options["processes"] > 1:
        monitor = tap.worker_monitor(options)
        return _react(lambda reactor: _run_workers(reactor, monitor))
    runner = tap.make_runner(options, fatal_start=False)
    return _react(lambda reactor: _run_service(reactor, runner))


async def _run_workers(reactor: Any, monitor: tap.WorkerMonitor) -> int:
    monitor.startService()
    reactor.addSystemEventTrigger("before", "shutdown", monitor.stopService)
    log.info("running {n} workers; SIGINT or SIGTERM stops", n=len(monitor.commands))
    await Deferred()  # the reactor stops on a signal; the trigger stops the workers
    return EXIT_OK


async def _run_service(reactor: Any, runner: tap.ServerRunner) -> int:
    service = runner.server

    def stop() -> Any:
        return runner.stopService() if runner.running else None

    runner.startService()
    trigger = reactor.addSystemEventTrigger("before", "shutdown", stop)
    try:
        await service.when_ready()
    except CallmeError as e:
        reactor.removeSystemEventTrigger(trigger)
        await task.deferLater(reactor, 0, lambda: None)  # as in _with_proxy
        stopping = stop()
        if stopping is not None:  # nothing to drain: do not wait long
            stopping.addTimeout(tap.FAILED_START_STOP_TIMEOUT, reactor)
            stopping.addErrback(lambda _: None)
            await stopping
        return _report(e)
    log.info("serving {server_id!r} on {broker}; SIGINT or SIGTERM stops",
             server_id=service.server_id, broker=service.params.describe())
    await Deferred()  # the reactor stops on a signal; the trigger stops the service
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
