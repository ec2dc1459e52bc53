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
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MARKER = "TXCALLME_RABBITNODE"
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
        self.directory = Path(tempfile.mkdtemp(prefix="txcallme-rabbit-"))
        self.start_times: list[float] = []
        self._cleaned = False
        self._reap_orphans = reap
        self._write_files()

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
        })
        return env

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NODE ARGS``."""
        with self._adopting():
            result = subprocess.run(["rabbitmqctl", "-n", self.nodename, *args],
                                    env=self.env(), capture_output=True, text=True,
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
            result = subprocess.run(["rabbitmq-server", "-detached"], env=self.env(),
                                    capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RabbitNodeError(f"rabbitmq-server -detached failed ({result.returncode}): "
                                  f"{result.stdout}{result.stderr}")
        # await_startup gives up at once while the node is not registered in epmd:
        # wait for the AMQP listener (started late in the boot) first.
        while not port_open(self.port):
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
        d.chmod(0o755)
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(d)], check=True)

    @contextlib.contextmanager
    def _adopting(self) -> Iterator[None]:
        """Make this process the reaper of orphans started meanwhile.

        ``rabbitmq-server -detached`` and the CLI leave orphans (the node's beam,
        CLI helpers); PID 1 here does not reap them, so dead ones would stay as
        zombies. Started within this block, they become this process's
        children, and :meth:`_reap` reaps them once they die.
        """
        libc = None
        if self._reap_orphans:
            with contextlib.suppress(Exception):
                libc = ctypes.CDLL(None, use_errno=True)
                before = ctypes.c_int(0)
                libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0)
                if before.value:
                    libc = None  # already a subreaper: leave it so
                else:
                    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        try:
            yield
        finally:
            if libc is not None:
                libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

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
