"""A throwaway RabbitMQ node for tests that stop, restart or kill the broker.

:class:`RabbitNode` starts a separate node next to the machine's shared broker
(which it never touches): its own node name, AMQP and distribution ports, data
and log directories, ``rabbitmq.conf`` and enabled-plugins file, all in a temp
directory owned by the ``rabbitmq`` user (the Debian wrappers switch to that
user, with ``HOME=/var/lib/rabbitmq``, so the CLI and the node share the
machine's Erlang cookie and ``rabbitmqctl -n NODE`` just works as root).

Every OS process of the node carries ``TXCALLME_RABBITNODE=<node name>`` in
its environment; :meth:`RabbitNode.stop`, :meth:`kill` and :meth:`cleanup`
use it to make sure nothing of the node is left running. The methods block
(a start takes seconds): from a reactor thread, call them through
``twisted.internet.threads.deferToThread``.

    node = RabbitNode()
    node.start()
    try:
        ...  # connect to node.url
        node.restart()
    finally:
        node.cleanup()

:class:`RabbitCluster` starts several such nodes in parallel and joins them
into one cluster (``stop_app``, ``join_cluster``, ``start_app``), for tests
that lose a node of a cluster:

    with RabbitCluster(3) as cluster:
        ...  # connect to cluster.hosts(first=cluster.nodes[1])
        cluster.stop_node(cluster.nodes[0])
        cluster.start_node(cluster.nodes[0])

Nodes are also cleaned up at interpreter exit, and :func:`sweep_orphans`
removes the nodes (processes and directories) of test runs that died without
cleaning up, e.g. after a SIGKILL.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

MARKER = "TXCALLME_RABBITNODE"
#: ``<pid>:<start time>`` of the process that started the node.
OWNER_MARKER = "TXCALLME_RABBITNODE_OWNER"
DIR_PREFIX = "txcallme-rabbit-"
HOST = "127.0.0.1"
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
try:
    _RABBITMQ_UID = pwd.getpwnam("rabbitmq").pw_uid
except KeyError:
    _RABBITMQ_UID = -1


class RabbitNodeError(RuntimeError):
    """The node did not start or stop as asked."""


def free_port(low: int = 20000, high: int = 45000) -> int:
    """A TCP port in [low, high) nobody listens on now.

    Distribution ports stay below 45000 because ``rabbitmqctl`` takes its own
    distribution port from ``RABBITMQ_DIST_PORT + 10000`` upwards.
    """
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        if not port_open(port) and not port_open(port + 10000):
            return port
    raise RabbitNodeError(f"no free port in [{low}, {high})")


def port_open(port: int, host: str = HOST) -> bool:
    """True if something accepts TCP connections on *host*:*port*."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    """True while *pid* runs; a zombie counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_time(pid: int) -> str | None:
    """The start time of *pid* (clock ticks since boot), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_token() -> str:
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _owner_alive(token: str) -> bool:
    pid, _, started = token.partition(":")
    return pid.isdigit() and pid_alive(int(pid)) and _start_time(int(pid)) == started


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def sweep_orphans() -> list[str]:
    """Kill the nodes, and remove the directories, of test processes that are gone.

    A test run killed with SIGKILL cannot clean up; its nodes keep running
    (and its directories stay) until this finds them by their
    ``TXCALLME_RABBITNODE_OWNER`` marker. Nodes of live test processes are
    left alone. Returns the node names it cleaned up.
    """
    orphans: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        env = _environ(int(entry.name))
        owner, nodename = env.get(OWNER_MARKER), env.get(MARKER)
        if owner and nodename and not _owner_alive(owner):
            try:
                if (entry / "comm").read_text().strip() == "epmd":
                    continue  # possibly shared with other nodes; epmd is harmless
            except OSError:
                continue
            orphans.setdefault(nodename, []).append(int(entry.name))
    for pids in orphans.values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for directory in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        try:
            owner = (directory / "owner").read_text().strip()
        except OSError:
            continue
        if not _owner_alive(owner):
            shutil.rmtree(directory, ignore_errors=True)
    return sorted(orphans)


_subreaper_lock = threading.Lock()
_subreaper_users = 0
_subreaper_set_by_us = False


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """Make this process the reaper of orphans started meanwhile (thread-safe).

    ``rabbitmq-server -detached`` and the CLI leave orphans (the node's beam,
    CLI helpers); PID 1 here does not reap them, so dead ones would stay as
    zombies. Started within this block, they become this process's children,
    and :meth:`RabbitNode._reap` reaps them once they die. Nested and
    concurrent uses (nodes started in parallel threads) share one setting,
    undone when the last of them ends.
    """
    global _subreaper_users, _subreaper_set_by_us
    with _subreaper_lock:
        if _subreaper_users == 0:
            with contextlib.suppress(Exception):
                libc = ctypes.CDLL(None, use_errno=True)
                before = ctypes.c_int(0)
                libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0)
                if not before.value:  # already a subreaper: leave it so
                    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
                    _subreaper_set_by_us = True
        _subreaper_users += 1
    try:
        yield
    finally:
        with _subreaper_lock:
            _subreaper_users -= 1
            if _subreaper_users == 0 and _subreaper_set_by_us:
                with contextlib.suppress(Exception):
                    ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
                _subreaper_set_by_us = False


#: Nodes not cleaned up yet, cleaned up at interpreter exit (e.g. after Ctrl-C).
_live_nodes: weakref.WeakSet[RabbitNode] = weakref.WeakSet()


@atexit.register
def _cleanup_live_nodes() -> None:
    for node in list(_live_nodes):
        with contextlib.suppress(Exception):
            node.cleanup()


class RabbitNode:
    """A separate RabbitMQ node on free ports, in its own temp directory.

    *config_lines* are appended to the node's ``rabbitmq.conf`` (new-style
    ``key = value`` lines, e.g. TLS listeners); *plugins* are enabled by name.
    """

    def __init__(self, *, name: str | None = None, config_lines: Iterable[str] = (),
                 plugins: Iterable[str] = (), start_timeout: float = 60.0,
                 stop_timeout: float = 30.0, reap: bool = True) -> None:
        """*reap*: adopt and reap the node's daemon processes (see :meth:`_adopting`)."""
        self.nodename = name or f"txcallme-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.config_lines = list(config_lines)
        self.plugins = list(plugins)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.directory = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
        self.start_times: list[float] = []
        #: True between :meth:`stop_app` and :meth:`start_app` (the VM runs, RabbitMQ not).
        self.app_stopped = False
        self._cleaned = False
        self._reap_orphans = reap
        self._owner = _owner_token()
        self._write_files()
        _live_nodes.add(self)

    # -- public API ------------------------------------------------------------

    @property
    def url(self) -> str:
        """The node's AMQP URL for guest on the default vhost."""
        return f"amqp://guest:guest@{HOST}:{self.port}/%2F"

    @property
    def pid_file(self) -> Path:
        return self.directory / "node.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "log" / f"{self.nodename}.log"

    def env(self) -> dict[str, str]:
        """The environment for ``rabbitmq-server`` / ``rabbitmqctl`` on this node."""
        d = self.directory
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update({
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            MARKER: self.nodename,
            OWNER_MARKER: self._owner,
        })
        return env

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NODE ARGS``."""
        with self._adopting():
            # cwd "/": the wrappers switch to the rabbitmq user, who may not
            # be able to enter the caller's directory.
            result = subprocess.run(["rabbitmqctl", "-n", self.nodename, *args],
                                    env=self.env(), capture_output=True, text=True, cwd="/",
                                    timeout=timeout)
        self._reap()
        if check and result.returncode != 0:
            raise RabbitNodeError(f"rabbitmqctl {' '.join(args)} on {self.nodename} failed "
                                  f"({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def start(self) -> float:
        """Start the node and wait until it has booted; returns the seconds it took."""
        if self._cleaned:
            raise RabbitNodeError("this node was cleaned up")
        if self.running():
            return 0.0
        began = time.monotonic()
        deadline = began + self.start_timeout
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        with self._adopting():
            result = subprocess.run(["rabbitmq-server", "-detached"], env=self.env(), cwd="/",
                                    capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RabbitNodeError(f"rabbitmq-server -detached failed ({result.returncode}): "
                                  f"{result.stdout}{result.stderr}")
        # await_startup gives up at once while the node is not registered in epmd:
        # wait for the AMQP listener (started late in the boot) first.
        while not port_open(self.port):
            if self._cleaned:
                raise RabbitNodeError(f"{self.nodename} was cleaned up while starting")
            if time.monotonic() > deadline:
                self._kill_all()
                raise RabbitNodeError(f"{self.nodename} did not listen on {self.port} within "
                                      f"{self.start_timeout:g} s; log tail:\n{self._log_tail()}")
            pid = self.pid()
            if pid is not None and not pid_alive(pid):
                raise RabbitNodeError(f"{self.nodename} died while booting; log tail:\n"
                                      f"{self._log_tail()}")
            time.sleep(0.2)
        left = max(5, int(deadline - time.monotonic()))
        self.ctl("await_startup", "--timeout", str(left), timeout=left + 30)
        took = time.monotonic() - began
        self.start_times.append(took)
        self.app_stopped = False
        return took

    def stop(self) -> None:
        """Stop the node cleanly; kill what is left of it if that does not work."""
        if self.running():
            try:
                # Not `stop PIDFILE`: it would wait for the dead beam to be reaped by us.
                self.ctl("stop", timeout=self.stop_timeout, check=False)
            except subprocess.TimeoutExpired:
                pass
            self._wait_down(self.stop_timeout)
        self._kill_all()

    def stop_app(self) -> None:
        """Stop the RabbitMQ application, leaving the Erlang VM up (``stop_app``).

        To the rest of a cluster the node is down: its client connections are
        closed, its queue replicas stop. :meth:`start_app` brings it back.
        """
        self.ctl("stop_app", timeout=self.stop_timeout + 30)
        self.app_stopped = True

    def start_app(self) -> float:
        """Start the application again after :meth:`stop_app`; returns the seconds it took."""
        began = time.monotonic()
        self.ctl("start_app", timeout=self.start_timeout + 30)
        self.ctl("await_startup", "--timeout", str(int(self.start_timeout)),
                 timeout=self.start_timeout + 30)
        self.app_stopped = False
        took = time.monotonic() - began
        self.start_times.append(took)
        return took

    def restart(self) -> float:
        """Stop, then start again on the same ports and data; returns the start time."""
        self.stop()
        return self.start()

    def kill(self) -> None:
        """Hard crash: SIGKILL the node's beam process (and then its helpers)."""
        pid = self.pid()
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        self._wait_down(10)
        self._kill_all()

    def running(self) -> bool:
        """True while the node's beam process lives."""
        pid = self.pid()
        return (pid is not None and pid_alive(pid)) or bool(self.processes())

    def pid(self) -> int | None:
        """The beam process id from the node's pid file."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def processes(self) -> list[int]:
        """Live OS processes started for this node (beam, erl_child_setup, CLI, ...)."""
        wanted = f"{MARKER}={self.nodename}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if wanted in environ.split(b"\0") and pid_alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def cleanup(self) -> None:
        """Stop the node, make sure none of its processes remain, remove its files."""
        if self._cleaned:
            return
        try:
            self.stop()
        finally:
            self._kill_all()
            self._cleaned = True
            _live_nodes.discard(self)
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<RabbitNode {self.nodename} amqp port {self.port}>"

    # -- internals ---------------------------------------------------------------

    def _write_files(self) -> None:
        d = self.directory
        (d / "mnesia").mkdir()
        (d / "log").mkdir()
        lines = [f"listeners.tcp.default = {HOST}:{self.port}", *self.config_lines]
        (d / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        plugins = ",".join(self.plugins)
        (d / "enabled_plugins").write_text(f"[{plugins}].\n")
        (d / "owner").write_text(self._owner + "\n")
        d.chmod(0o755)
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(d)], check=True)

    @contextlib.contextmanager
    def _adopting(self) -> Iterator[None]:
        """Reap the orphans of what runs in this block (see :func:`adopting_orphans`)."""
        if not self._reap_orphans:
            yield
            return
        with adopting_orphans():
            yield

    def _wait_down(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._reap()
            pid = self.pid()
            if not (pid is not None and pid_alive(pid)) and not port_open(self.port):
                return True
            time.sleep(0.1)
        return False

    def _kill_all(self) -> None:
        """SIGKILL every remaining process of the node (never another node's)."""
        for _ in range(50):
            pids = [p for p in self.processes() if not self._shared_epmd(p)]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        else:
            raise RabbitNodeError(f"processes of {self.nodename} survive SIGKILL")
        self._reap()

    def _shared_epmd(self, pid: int) -> bool:
        """An epmd this node started, that other nodes now use too: leave it."""
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return False
        if name != "epmd":
            return False
        out = subprocess.run(["epmd", "-names"], capture_output=True, text=True).stdout
        short = self.nodename.split("@")[0]
        return any(line.startswith("name ") and f"name {short} " not in line
                   for line in out.splitlines())

    def _reap(self) -> None:
        """Reap dead broker processes re-parented to this (subreaper) process.

        Only zombies of the ``rabbitmq`` user: the rabbitmq wrappers leave such
        orphans (beam, erl_child_setup, CLI helpers); this process's own
        children (twistd, ...) run as another user and are left to their owners.
        """
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                uid = entry.stat().st_uid
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == me and uid == _RABBITMQ_UID:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry.name), os.WNOHANG)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


class RabbitCluster:
    """*size* :class:`RabbitNode` s on this machine joined into one cluster.

    :meth:`start` boots the nodes in parallel, joins every other node to the
    first and waits until ``cluster_status`` lists all of them as running;
    :meth:`cleanup` (also on failure, and at interpreter exit) stops them all
    and checks that no process of theirs is left. Blocking, like RabbitNode.
    """

    def __init__(self, size: int = 3, *, prefix: str = "txcallme-cluster",
                 start_timeout: float = 120.0, stop_timeout: float = 30.0) -> None:
        if size < 2:
            raise ValueError("a cluster needs at least two nodes")
        tag = secrets.token_hex(3)
        self.nodes = [RabbitNode(name=f"{prefix}-{tag}-{i}@localhost",
                                 start_timeout=start_timeout, stop_timeout=stop_timeout)
                      for i in range(size)]
        self.start_timeout = start_timeout
        #: What each step took (seconds), for reports.
        self.timings: dict[str, float] = {}
        #: Set when SIGINT/SIGTERM cleaned the cluster up (see :meth:`cleanup_on_signals`).
        self.interrupted = False
        self._cleaning = False

    # -- addresses -----------------------------------------------------------------

    def node(self, name: str) -> RabbitNode:
        """The node called *name* (``txcallme-cluster-...@localhost``)."""
        for node in self.nodes:
            if node.nodename == name:
                return node
        raise KeyError(name)

    def node_on_port(self, port: int) -> RabbitNode:
        """The node whose AMQP listener is *port*."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def hosts(self, first: RabbitNode | None = None) -> list[str]:
        """``host:port`` of every node, *first* first, then the others in ring order.

        As ``amqp_host=``: a client connects to *first* and, when it loses it,
        to the next node of the list.
        """
        i = self.nodes.index(first) if first is not None else 0
        ring = self.nodes[i:] + self.nodes[:i]
        return [f"{HOST}:{node.port}" for node in ring]

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> float:
        """Boot, join and check the cluster; returns the seconds it took."""
        began = time.monotonic()
        with adopting_orphans():
            self._parallel(lambda node: node.start(), self.nodes)
            self.timings["boot"] = time.monotonic() - began
            seed = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", seed.nodename)
                node.ctl("start_app")
            self.wait_running(self.nodes, self.start_timeout)
        took = time.monotonic() - began
        self.timings["start"] = took
        return took

    def cleanup(self) -> list[int]:
        """Stop every node and remove its files; returns processes left (always []).

        Raises RabbitNodeError if a node could not be stopped, or if any
        process of the nodes or any of their names in epmd is left.
        """
        if self._cleaning:
            return []
        self._cleaning = True
        began = time.monotonic()
        try:
            with adopting_orphans():
                errors = self._parallel(lambda node: node.cleanup(), self.nodes, collect=True)
        finally:
            self._cleaning = False
        left = self.processes()
        names = self.registered()
        self.timings["cleanup"] = time.monotonic() - began
        if errors or left or names:
            raise RabbitNodeError(f"cluster cleanup: errors {errors}, processes left {left}, "
                                  f"names still in epmd {names}")
        return left

    def processes(self) -> list[int]:
        """Live processes of any node, found by their environment marker.

        (``pgrep -f NODENAME`` finds nothing: RabbitMQ 3.10 gives the node its
        name through the environment, not the command line.)
        """
        return sorted({pid for node in self.nodes for pid in node.processes()})

    def registered(self) -> list[str]:
        """Short names of these nodes that epmd still lists."""
        out = subprocess.run(["epmd", "-names"], capture_output=True, text=True).stdout
        listed = {line.split()[1] for line in out.splitlines() if line.startswith("name ")}
        return sorted(listed & {node.nodename.split("@")[0] for node in self.nodes})

    @contextlib.contextmanager
    def cleanup_on_signals(self) -> Iterator[None]:
        """While in this block, SIGINT and SIGTERM first clean the cluster up.

        Under a running Twisted reactor (pytest-twisted) the KeyboardInterrupt
        of a Ctrl-C is caught and logged by the reactor's main loop and the
        tests go on, so the nodes would outlive a Ctrl-C by minutes. Here the
        handler stops and removes the nodes at once, sets :attr:`interrupted`,
        then raises KeyboardInterrupt (SIGINT) or dies of SIGTERM as usual.
        Only in the main thread (signal handlers cannot be set elsewhere).
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            self.interrupted = True
            if not self._cleaning:
                with contextlib.suppress(Exception):
                    self.cleanup()
            if signum == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

    # -- losing and regaining a node -------------------------------------------------

    def stop_node(self, node: RabbitNode, how: str = "stop") -> float:
        """Take *node* out: ``stop`` (clean shutdown), ``stop_app`` (the VM stays)
        or ``kill`` (SIGKILL, a crash). Returns the seconds it took."""
        began = time.monotonic()
        if how == "stop":
            node.stop()
        elif how == "stop_app":
            node.stop_app()
        elif how == "kill":
            node.kill()
        else:
            raise ValueError(f"how must be stop, stop_app or kill, not {how!r}")
        return time.monotonic() - began

    def start_node(self, node: RabbitNode) -> float:
        """Bring *node* back and wait until the cluster shows every node running."""
        began = time.monotonic()
        if node.app_stopped:
            node.start_app()
        else:
            node.start()
        self.wait_running(self.nodes, self.start_timeout)
        return time.monotonic() - began

    # -- what the cluster says -------------------------------------------------------

    def _via(self, via: RabbitNode | None) -> RabbitNode:
        if via is not None:
            return via
        for node in self.nodes:
            if node.running() and not node.app_stopped:
                return node
        raise RabbitNodeError("no node of the cluster is running")

    def running_nodes(self, via: RabbitNode | None = None) -> set[str]:
        """The node names ``cluster_status`` (asked of *via*) lists as running."""
        out = self._via(via).ctl("cluster_status", "--formatter", "json", timeout=60).stdout
        return set(json.loads(out).get("running_nodes", []))

    def wait_running(self, nodes: Sequence[RabbitNode], timeout: float) -> None:
        """Wait until every one of *nodes* sees exactly *nodes* running."""
        want = {node.nodename for node in nodes}
        deadline = time.monotonic() + timeout
        seen: dict[str, set[str]] = {}
        while True:
            if self.interrupted:
                raise RabbitNodeError("interrupted: the cluster was cleaned up")
            try:
                seen = {node.nodename: self.running_nodes(node) for node in nodes}
            except RabbitNodeError as e:
                seen = {"error": {str(e)[:300]}}
            if all(view == want for view in seen.values()):
                return
            if time.monotonic() > deadline:
                raise RabbitNodeError(f"cluster not all running after {timeout:g} s: "
                                      f"want {sorted(want)}, seen {seen}")
            time.sleep(0.5)

    def queues(self, *fields: str, via: RabbitNode | None = None,
               vhost: str = "/") -> list[dict[str, Any]]:
        """``rabbitmqctl list_queues`` rows (``name`` plus *fields*) as dicts."""
        out = self._via(via).ctl("list_queues", "-q", "-p", vhost, "--formatter", "json",
                                 "name", *fields, timeout=60).stdout
        rows: list[dict[str, Any]] = json.loads(out or "[]")
        return rows

    def queue(self, name: str, *fields: str, via: RabbitNode | None = None) -> dict[str, Any]:
        """One queue's ``list_queues`` row; KeyError if the cluster does not list it."""
        for row in self.queues(*fields, via=via):
            if row.get("name") == name:
                return row
        raise KeyError(name)

    def quorum_leader(self, queue: str, via: RabbitNode | None = None) -> RabbitNode:
        """The node that leads the quorum queue *queue* now."""
        row = self.queue(queue, "type", "leader", "members", via=via)
        if row.get("type") != "quorum":
            raise RabbitNodeError(f"{queue} is not a quorum queue: {row}")
        return self.node(row["leader"])

    # -- internals -------------------------------------------------------------------

    def _parallel(self, work: Callable[[RabbitNode], Any], nodes: Sequence[RabbitNode],
                  collect: bool = False) -> list[str]:
        """Run *work* on every node at once; raise the first error (or collect them all)."""
        errors: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
            futures = {pool.submit(work, node): node for node in nodes}
            for future in concurrent.futures.as_completed(futures):
                error = future.exception()
                if error is not None:
                    errors.append(f"{futures[future].nodename}: {error}")
        if errors and not collect:
            raise RabbitNodeError("; ".join(errors))
        return errors
