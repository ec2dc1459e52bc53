"""Test doubles for code that uses txcallme, with no broker.

:class:`MemoryBroker` runs the real :class:`~txcallme.Proxy` and the real
:class:`~txcallme.CallmeServerService` over :mod:`txcallme.amqp.memory`, an
in-memory AMQP broker that speaks real frames (as treq's ``StubTreq`` drives
the real HTTP client). So requests, replies, remote exceptions (types,
tracebacks, the allow-list), argument errors, unknown methods, unserializable
results, timeouts and unroutable calls behave exactly as they do over a
broker: it is the same code. Everything runs on the broker's clock: pass a
:class:`twisted.internet.task.Clock` and advance it for timeouts.

Servers run their functions on the clock's "reactor thread" (no thread pool:
``threading`` is off), so results are there as soon as the call returns::

    broker = MemoryBroker(clock)
    server = broker.server("fooserver")
    server.register_function(lambda a, b: a + b, "add")
    proxy = broker.proxy(timeout=5)
    d = proxy.use_server("fooserver").add(1, 1)   # already fired with 2

:attr:`MemoryBroker.amqp` is the AMQP broker itself, for broker events in
tests: ``delete_queue``, ``close_connections``, ``drop_connections``,
``block``/``unblock``, ``nack_next``.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from txcallme.amqp import ConnectionParams, connection_params
from txcallme.amqp import MemoryBroker as AMQPMemoryBroker
from txcallme.proxy import Proxy
from txcallme.serializers import JSON, Serializer
from txcallme.service import CallmeServerService


class MemoryServer(CallmeServerService):
    """A :class:`~txcallme.CallmeServerService` on a :class:`MemoryBroker`,
    started when made; :meth:`stop` stops it."""

    def stop(self) -> Deferred[None]:
        """Stop serving (``stopService``): later calls fail with ServerUnavailable."""
        d = self.stopService()
        self._memory.settle()
        return d

    _memory: MemoryBroker


class MemoryBroker:
    """Real Proxies and servers connected in memory, on one clock."""

    def __init__(self, clock: Any = None) -> None:
        self.clock: Any = clock if clock is not None else Clock()
        #: the in-memory AMQP broker (operator controls for broker events)
        self.amqp = AMQPMemoryBroker(self.clock)
        self.params: ConnectionParams = attrs.evolve(
            connection_params("memory"), heartbeat=0, connector=self.amqp.connector())
        self.servers: list[MemoryServer] = []
        self.proxies: list[Proxy] = []

    def server(self, server_id: str, serializer: Serializer = JSON,
               **options: Any) -> MemoryServer:
        """A started server for *server_id*; register functions on it.

        *options* are :class:`~txcallme.CallmeServerService`'s (``threading``
        is refused: functions run on the clock, synchronously)."""
        if options.get("threading") or options.get("threaded"):
            raise ValueError("MemoryBroker servers run functions on the clock; "
                             "threading is not available")
        server = MemoryServer(server_id, params=self.params, serializer=serializer,
                              reactor=self.clock, **options)
        server._memory = self
        server.startService()
        self.servers.append(server)
        self.settle()
        return server

    def proxy(self, timeout: float = 60.0, serializer: Serializer = JSON,
              **options: Any) -> Proxy:
        """A connected :class:`~txcallme.Proxy`; *options* are its keyword arguments."""
        proxy = Proxy(timeout=timeout, serializer=serializer, params=self.params,
                      reactor=self.clock, **options)
        self.proxies.append(proxy)
        self.settle()
        return proxy

    def settle(self) -> None:
        """Run what is due now on the clock (zero-delay calls such as acks)."""
        self.clock.advance(0)
