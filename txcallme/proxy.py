"""Proxy: call functions on txcallme (and callme) servers; every call returns
a Deferred.

Many calls share one connection and one reply queue; replies are matched by
correlation id. Requests go out with publisher confirms and ``mandatory`` on
one channel per destination server, so a missing or forbidden server fails
only the calls made to it, at once.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcallme import _wire
from txcallme._deadlines import Deadlines
from txcallme._destinations import Destination
from txcallme.amqp import (
    Connection,
    ConnectionParams,
    Delivery,
    Session,
    TLSSettings,
    connection_params,
)
from txcallme.errors import (
    CallmeError,
    InvalidRequest,
    NotFound,
    ProxyClosed,
    RemoteErrorRegistry,
    RpcTimeout,
    ServerUnavailable,
)
from txcallme.serializers import JSON, Serializer

log = Logger(namespace="callme.proxy")

#: Seconds after a (re)connection during which an unroutable request is
#: published again instead of failing with ServerUnavailable.
RECONNECT_GRACE = 5.0
RETRY_DELAY = 0.25


@attrs.define(slots=True, eq=False)
class _Call:
    server_id: str
    method: str
    deferred: Deferred[Any]
    timeout: float
    deadline: float
    body: bytes
    destination: Destination | None = None


class Proxy:
    """A client for txcallme servers. It connects when created.

    Parameters follow callme's ``Proxy``; ``timeout`` (seconds) is the
    default for every call.
    """

    def __init__(
        self,
        amqp_host: str | Sequence[str] = "localhost",
        amqp_port: int | None = None,
        amqp_user: str = "guest",
        amqp_password: str = "guest",
        amqp_vhost: str = "/",
        timeout: float = 60.0,
        *,
        amqp_url: str | None = None,
        ssl: bool | TLSSettings = False,
        params: ConnectionParams | None = None,
        serializer: Serializer = JSON,
        max_body_size: int = 64 * 1024 * 1024,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.params = params or connection_params(
            amqp_host, amqp_port, amqp_user, amqp_password, amqp_vhost,
            amqp_url=amqp_url, ssl=ssl)
        self.timeout = timeout
        self.serializer = serializer
        self.errors = RemoteErrorRegistry()
        uid = uuid.uuid4().hex
        self.exchange = _wire.client_exchange(self.params.user, uid)
        self.queue = _wire.client_queue(self.params.user, uid)
        self._ids = itertools.count(1)
        self._pending: dict[str, _Call] = {}
        self._deadlines = Deadlines(reactor, self._expire)
        self._destinations: dict[str, Destination] = {}
        self._connection: Connection | None = None
        self._connected_at: float | None = None
        self._closed = False
        self._session = Session(reactor, self.params, self._prepare, self._lost,
                                name="proxy", max_body_size=max_body_size, log=log)
        self._session.start()

    # -- public API ------------------------------------------------------------

    def use_server(self, server_id: str, timeout: float | None = None) -> ServerProxy:
        """A view of this proxy bound to *server_id* (and a default timeout)."""
        return ServerProxy(self, _wire.check_server_id(server_id), timeout)

    def call(self, server_id: str, method: str, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Call *method* on *server_id* with the proxy's default timeout.

        Fires with the result; fails with the remote exception (rebuilt, see
        :attr:`errors`), RpcTimeout, ServerUnavailable, AccessRefused,
        BrokerUnreachable, AuthenticationError, BrokerConnectionLost or
        ProxyClosed. Cancelling the Deferred abandons the call.
        """
        return self.invoke(server_id, method, args, kwargs)

    def invoke(self, server_id: str, method: str, args: Sequence[Any] = (),
               kwargs: dict[str, Any] | None = None, *,
               timeout: float | None = None) -> Deferred[Any]:
        """Like :meth:`call`, with arguments as values and a per-call timeout."""
        if self._closed:
            return fail(ProxyClosed("the proxy is closed"))
        timeout = self.timeout if timeout is None else timeout
        if timeout <= 0:
            return fail(ValueError("timeout must be positive"))
        if server_id not in self._destinations:  # known destinations were checked
            try:
                _wire.check_server_id(server_id)
            except ValueError as e:
                return fail(e)
        now = self._reactor.seconds()
        deadline = now + timeout
        try:
            body = _wire.encode_request(self.serializer, _wire.Request(
                method, list(args), dict(kwargs or {}), time.time() + timeout))
        except CallmeError as e:
            return fail(e)
        corr = f"{next(self._ids):x}"
        d: Deferred[Any] = Deferred(lambda _: self._forget(corr))
        call = _Call(server_id, method, d, timeout, deadline, body)
        self._pending[corr] = call
        self._deadlines.add(deadline, corr)
        connection = self._connection
        if connection is not None:
            self._publish(connection, corr, call, body)
        else:
            ready = self._session.ready()
            ready.addCallbacks(lambda conn: self._publish(conn, corr, call, body),
                               lambda f: self._fail(corr, f))
        return d

    def close(self) -> Deferred[None]:
        """Fail calls in flight with ProxyClosed and close the connection."""
        if self._closed:
            return succeed(None)
        self._closed = True
        for corr in list(self._pending):
            self._fail(corr, Failure(ProxyClosed("the proxy was closed")))
        for destination in self._destinations.values():
            destination.close()
        self._destinations.clear()
        self._deadlines.clear()
        return self._session.stop()

    def when_ready(self) -> Deferred[Connection]:
        """Fires when connected and consuming replies (first connect fails fast)."""
        return self._session.ready()

    @property
    def pending_count(self) -> int:
        """Calls waiting for a reply."""
        return len(self._pending)

    # -- internals ---------------------------------------------------------------

    async def _prepare(self, connection: Connection) -> None:
        channel = await connection.open_channel()
        await channel.declare_exchange(self.exchange, "direct", auto_delete=True)
        await channel.declare_queue(self.queue, exclusive=True, auto_delete=True)
        await channel.bind_queue(self.queue, self.exchange, self.exchange)
        await channel.consume(self.queue, self._reply, no_ack=True, exclusive=True)
        self._destinations = {}
        self._connection = connection
        # a grace period for servers to come back applies to reconnections only
        self._connected_at = self._reactor.seconds() if self._session.ever_connected else None

    def _lost(self, error: CallmeError) -> None:
        self._connection = None
        self._destinations = {}
        for corr, call in list(self._pending.items()):
            if call.destination is not None:
                self._fail(corr, Failure(error))

    def _publish(self, connection: Connection, corr: str, call: _Call, body: bytes) -> None:
        if corr not in self._pending:
            return
        connection = self._connection or connection  # reconnected meanwhile
        destination = self._destinations.get(call.server_id)
        if destination is None:
            destination = self._destinations[call.server_id] = Destination(
                connection, _wire.server_exchange(call.server_id), call.server_id,
                self._returned, self._destination_closed)
        call.destination = destination
        remaining = call.deadline - self._reactor.seconds()
        destination.send(body, {
            "content_type": self.serializer.content_type, "correlation_id": corr,
            "reply_to": self.exchange, "expiration": str(max(1, int(remaining * 1000)))})

    def _returned(self, corr: str) -> None:
        call = self._pending.get(corr)
        if call is not None and not self._retry_after_reconnect(corr):
            self._fail(corr, Failure(ServerUnavailable(call.server_id, "no queue is bound")))

    def _retry_after_reconnect(self, corr: str) -> bool:
        """Just after a reconnection the servers may not be back yet (a restarted
        broker loses their queues): publish again shortly instead of failing."""
        now = self._reactor.seconds()
        if self._connected_at is None or now - self._connected_at > RECONNECT_GRACE:
            return False
        self._reactor.callLater(RETRY_DELAY, self._republish, corr)
        return True

    def _republish(self, corr: str) -> None:
        call = self._pending.get(corr)
        if call is not None and self._connection is not None:
            self._publish(self._connection, corr, call, call.body)

    def _destination_closed(self, destination: Destination, error: CallmeError) -> None:
        if self._destinations.get(destination.routing_key) is destination:
            del self._destinations[destination.routing_key]
        if isinstance(error, NotFound):
            error = ServerUnavailable(destination.routing_key,
                                      f"exchange {destination.exchange} not found")
        unroutable = isinstance(error, ServerUnavailable)
        for corr, call in list(self._pending.items()):
            if call.destination is destination:
                call.destination = None
                if not (unroutable and self._retry_after_reconnect(corr)):
                    self._fail(corr, Failure(error))

    def _expire(self, corr: str) -> None:
        call = self._pending.pop(corr, None)
        if call is not None:
            call.deferred.errback(RpcTimeout(call.server_id, call.method, call.timeout))
            self._idle()

    def _idle(self) -> None:
        if not self._pending:
            self._deadlines.clear()

    def _forget(self, corr: str) -> None:
        self._pending.pop(corr, None)
        self._idle()

    def _fail(self, corr: str, reason: Failure) -> None:
        call = self._pending.pop(corr, None)
        if call is not None and not call.deferred.called:
            call.deferred.errback(reason)
        self._idle()

    def _reply(self, delivery: Delivery) -> None:
        corr = delivery.properties.get("correlation_id")
        call = self._pending.pop(corr, None) if isinstance(corr, str) else None
        if call is None:
            log.info("dropping a reply for no pending call (late or foreign), "
                     "correlation id {corr!r}", corr=corr)
            return
        if not self._pending:
            self._deadlines.clear()
        if delivery.problem:
            call.deferred.errback(InvalidRequest(f"unreadable reply: {delivery.problem}"))
        else:
            settle(call.deferred, self.serializer, self.errors, delivery.body)


def settle(d: Deferred[Any], serializer: Serializer, errors: RemoteErrorRegistry,
           body: bytes) -> None:
    """Fire *d* from a reply body: the result, or the rebuilt remote exception."""
    try:
        reply = _wire.decode_reply(serializer, body)
    except InvalidRequest as e:
        d.errback(e)
        return
    if reply.ok:
        d.callback(reply.value)
    else:
        err = reply.error
        d.errback(errors.rebuild(err["type"], err["message"], err["args"], err["traceback"]))


class Invoker(Protocol):
    """What :class:`ServerProxy` needs: anything with Proxy's ``invoke`` (the
    Deferred one, the blocking one, the in-memory one)."""

    def invoke(self, server_id: str, method: str, args: Sequence[Any] = (),
               kwargs: dict[str, Any] | None = None, *,
               timeout: float | None = None) -> Any: ...


class ServerProxy:
    """``proxy.use_server('foo')``: attribute access names remote functions;
    calling one returns what the proxy's ``invoke`` returns (a Deferred, or the
    result for :class:`txcallme.blocking.Proxy`)."""

    def __init__(self, proxy: Invoker, server_id: str, timeout: float | None) -> None:
        self._proxy = proxy
        self._server_id = server_id
        self._timeout = timeout

    def __getattr__(self, name: str) -> _RemoteMethod:
        if name.startswith("__"):
            raise AttributeError(name)
        return _RemoteMethod(self._proxy, self._server_id, name, self._timeout)

    def __repr__(self) -> str:
        return f"<ServerProxy {self._server_id!r}>"


class _RemoteMethod:
    def __init__(self, proxy: Invoker, server_id: str, name: str, timeout: float | None) -> None:
        self._proxy = proxy
        self._server_id = server_id
        self._name = name
        self._timeout = timeout

    def __getattr__(self, name: str) -> _RemoteMethod:
        if name.startswith("__"):
            raise AttributeError(name)
        return _RemoteMethod(self._proxy, self._server_id, f"{self._name}.{name}",
                             self._timeout)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._proxy.invoke(self._server_id, self._name, args, kwargs,
                                  timeout=self._timeout)



