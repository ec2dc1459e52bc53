"""Helpers for integration tests that need broker administration or a second client.

``rabbitmqctl`` wrappers (vhosts, users, permissions, object listings) run as
subprocesses; each call takes about a second, so several can run at once with
:func:`ctl_many`. :class:`RawClient` is a hand-driven txcallme connection with
its own reply exchange and queue, for publishing what a Proxy never would.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet import defer, reactor

from txcallme import _wire, connection_params
from txcallme.amqp import session as _amqp
from txcallme.amqp.channel import Channel, Connection, Delivery

BROKER_HOST = "127.0.0.1"
CTL_TIMEOUT = 60


def rand() -> str:
    """A short random suffix for names that must not collide between runs."""
    return secrets.token_hex(4)


def ctl(*args: str, check: bool = True) -> str:
    """Run ``rabbitmqctl -q ARGS``; return its stdout."""
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=CTL_TIMEOUT, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr or done.stdout}")
    return done.stdout


def ctl_many(commands: Iterable[Sequence[str]], check: bool = True) -> None:
    """Run several ``rabbitmqctl`` commands concurrently; raise if any failed."""
    running = [(cmd, subprocess.Popen(["rabbitmqctl", "-q", *cmd], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
               for cmd in commands]
    errors = []
    for cmd, process in running:
        out, _ = process.communicate(timeout=CTL_TIMEOUT)
        if process.returncode != 0:
            errors.append(f"rabbitmqctl {' '.join(cmd)}: {out.strip()}")
    if check and errors:
        raise RuntimeError("; ".join(errors))


def broker_objects(vhost: str, prefixes: tuple[str, ...] = ("server_", "client_")) -> set[str]:
    """Names of queues and exchanges in *vhost* starting with one of *prefixes*."""
    names: set[str] = set()
    for what in ("list_queues", "list_exchanges"):
        out = ctl(what, "-p", vhost, "name")
        names.update(line.strip() for line in out.splitlines())
    return {name for name in names if name.startswith(prefixes)}


def request_body(method: str, *args: Any, **kwargs: Any) -> bytes:
    """A valid JSON request body."""
    return json.dumps({"method": method, "args": list(args), "kwargs": kwargs}).encode()


class RawClient:
    """A plain connection with its own reply exchange/queue, driven by hand.

    Replies (and anything else published to :attr:`exchange`) are awaited one by
    one with :meth:`next_reply` or taken at once with :meth:`take_all`.
    """

    def __init__(self, user: str = "guest", password: str = "guest", vhost: str = "/",
                 name: str | None = None) -> None:
        self.params = connection_params(BROKER_HOST, None, user, password, vhost)
        suffix = name or f"hostile{rand()}"
        self.exchange = _wire.client_exchange(user, suffix)
        self.queue = _wire.client_queue(user, suffix)
        self._queue: defer.DeferredQueue[Delivery] = defer.DeferredQueue()
        self.connection: Connection | None = None
        self.channel: Channel | None = None
        self._declared = False

    async def open(self, reply_queue: bool = True) -> RawClient:
        """Connect; with *reply_queue*, declare, bind and consume the reply queue."""
        self.connection = await _amqp.connect(reactor, self.params)
        self.channel = await self.connection.open_channel()
        if reply_queue:
            ch = self.channel
            await ch.declare_exchange(self.exchange, "direct", auto_delete=True)
            await ch.declare_queue(self.queue, exclusive=True, auto_delete=True)
            await ch.bind_queue(self.queue, self.exchange, self.exchange)
            await ch.consume(self.queue, self._got, no_ack=True, exclusive=True)
            self._declared = True
        return self

    def _got(self, delivery: Delivery) -> None:
        self._queue.put(delivery)

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: dict[str, Any]) -> None:
        """Publish one message as is (no confirm)."""
        assert self.channel is not None and not self.channel.closed, "channel closed"
        self.channel.publish(exchange, routing_key, body, properties)

    def send(self, server_id: str, body: bytes, **properties: Any) -> None:
        """Publish *body* straight to *server_id*'s exchange."""
        self.publish(_wire.server_exchange(server_id), server_id, body, properties)

    def next_reply(self, timeout: float = 5.0) -> defer.Deferred[Delivery]:
        """Fires with the next message on the reply queue; fails after *timeout*."""
        d = self._queue.get()
        d.addTimeout(timeout, reactor)
        return d

    def take_all(self) -> list[Delivery]:
        """Every message received and not yet taken by :meth:`next_reply`, oldest first."""
        got = list(self._queue.pending)
        self._queue.pending.clear()
        return got

    async def message_count(self, queue: str) -> int:
        """Messages ready in *queue* (a passive declare on a throwaway channel)."""
        assert self.connection is not None
        ch = await self.connection.open_channel()
        try:
            ok = await ch.declare_queue(queue, passive=True)
        finally:
            await ch.close()
        return int(ok.message_count)

    async def close(self) -> None:
        """Delete the reply exchange (the queue is exclusive) and disconnect."""
        conn, self.connection = self.connection, None
        if conn is None:
            return
        if self._declared and not conn.lost:
            try:
                ch = await conn.open_channel()
                await ch.delete_exchange(self.exchange)
                await ch.close()
            except Exception:  # best effort: the exchange is auto-delete anyway
                pass
        await conn.close()
