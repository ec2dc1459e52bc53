"""Test doubles for code that uses txcallme, with no broker.

:class:`MemoryBroker` connects :class:`MemoryServer` s and
:class:`MemoryProxy` s in memory. Calls go through the same request/reply
encoding, dispatcher and remote-error rebuilding as the real thing, so
results, remote exceptions (types, tracebacks, the allow-list), argument
errors, unknown methods, unserializable results and timeouts behave as they
do over AMQP. Timeouts run on the broker's clock: pass a
:class:`twisted.internet.task.Clock` and advance it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txcallme import _wire
from txcallme.errors import ProxyClosed, RemoteErrorRegistry, RpcTimeout, ServerUnavailable
from txcallme.proxy import ServerProxy, settle
from txcallme.serializers import JSON, Serializer
from txcallme.server import CallContext, Dispatcher

F = TypeVar("F", bound=Callable[..., Any])


class MemoryBroker:
    """Routes in-memory calls from proxies to servers by server id."""

    def __init__(self, clock: Any = None) -> None:
        self.clock: Any = clock if clock is not None else Clock()
        self.servers: dict[str, MemoryServer] = {}

    def server(self, server_id: str, serializer: Serializer = JSON) -> MemoryServer:
        """A started server for *server_id*; register functions on it."""
        server = MemoryServer(self, _wire.check_server_id(server_id), serializer)
        self.servers[server_id] = server
        return server

    def proxy(self, timeout: float = 60.0, serializer: Serializer = JSON) -> MemoryProxy:
        return MemoryProxy(self, timeout, serializer)


class MemoryServer:
    """Registers functions like :class:`~txcallme.CallmeServerService`; all of
    them run synchronously on the caller's thread (there is no thread pool)."""

    def __init__(self, broker: MemoryBroker, server_id: str, serializer: Serializer) -> None:
        self.broker = broker
        self.server_id = server_id
        self.dispatcher = Dispatcher(serializer)
        self.calls = 0

    def register_function(self, func: F | None = None, name: str | None = None, *,
                          with_context: bool = False) -> Any:
        """Same forms as ``CallmeServerService.register_function``."""
        if func is None:
            return lambda f: self.register_function(f, name, with_context=with_context)
        self.dispatcher.register(func, name, with_context=with_context)
        return func

    def stop(self) -> None:
        """Remove the server: later calls fail with ServerUnavailable."""
        if self.broker.servers.get(self.server_id) is self:
            del self.broker.servers[self.server_id]

    def handle(self, body: bytes, corr: str) -> Deferred[bytes]:
        self.calls += 1
        request = _wire.decode_request(self.dispatcher.serializer, body)
        return self.dispatcher.dispatch(request, lambda: CallContext(
            self.server_id, request.method, corr, "memory", False, request.deadline))


class MemoryProxy:
    """The :class:`~txcallme.Proxy` API over a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, timeout: float, serializer: Serializer) -> None:
        self.broker = broker
        self.timeout = timeout
        self.serializer = serializer
        self.errors = RemoteErrorRegistry()
        self._pending: dict[str, Deferred[Any]] = {}
        self._ids = 0
        self._closed = False

    def use_server(self, server_id: str, timeout: float | None = None) -> ServerProxy:
        return ServerProxy(self, _wire.check_server_id(server_id), timeout)

    def call(self, server_id: str, method: str, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self.invoke(server_id, method, args, kwargs)

    def invoke(self, server_id: str, method: str, args: Sequence[Any] = (),
               kwargs: dict[str, Any] | None = None, *,
               timeout: float | None = None) -> Deferred[Any]:
        if self._closed:
            return fail(ProxyClosed("the proxy is closed"))
        timeout = self.timeout if timeout is None else timeout
        server = self.broker.servers.get(server_id)
        if server is None:
            return fail(ServerUnavailable(server_id, "no such server in the memory broker"))
        try:
            body = _wire.encode_request(self.serializer, _wire.Request(
                method, list(args), dict(kwargs or {}), time.time() + timeout))
        except Exception as e:
            return fail(e)
        self._ids += 1
        corr = f"{self._ids:x}"
        d: Deferred[Any] = Deferred(lambda _: self._forget(corr))
        self._pending[corr] = d
        d.addTimeout(timeout, self.broker.clock, onTimeoutCancel=lambda result, t: Failure(
            RpcTimeout(server_id, method, t)))
        server.handle(body, corr).addCallback(self._replied, corr)
        return d

    def _replied(self, body: bytes, corr: str) -> None:
        d = self._pending.pop(corr, None)
        if d is not None:
            settle(d, self.serializer, self.errors, body)

    def _forget(self, corr: str) -> None:
        self._pending.pop(corr, None)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def when_ready(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        self._closed = True
        for corr in list(self._pending):
            d = self._pending.pop(corr)
            d.errback(ProxyClosed("the proxy was closed"))
        return succeed(None)
