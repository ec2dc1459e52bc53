"""A broker connection that comes back: Twisted's ClientService with the AMQP
handshake and the owner's set-up (declares, consumers) as the preparation step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcallme._amqp import ProtocolFactory, handshake
from txcallme._channel import Connection
from txcallme._endpoint import BrokerEndpoint
from txcallme._params import ConnectionParams
from txcallme.errors import CallmeError

log = Logger(namespace="callme.connection")


class Session:
    """Keeps one live, prepared :class:`Connection` to the broker.

    *prepare* is called with each new connection (declare, consume); the
    connection counts as ready when it succeeds. *lost* is called with an
    error each time a ready connection drops.
    """

    def __init__(self, reactor: Any, params: ConnectionParams,
                 prepare: Callable[[Connection], Awaitable[Any]],
                 lost: Callable[[CallmeError], None], *, name: str,
                 max_body_size: int | None = None) -> None:
        self._reactor = reactor
        self._params = params
        self._prepare = prepare
        self._lost = lost
        self._name = name
        self._max_body_size = max_body_size
        self.connection: Connection | None = None
        self.ever_connected = False
        self.last_error: Failure | None = None
        self._endpoint = BrokerEndpoint(reactor, params)
        self._service = ClientService(
            self._endpoint,  # type: ignore[arg-type]  # zope @implementer
            ProtocolFactory(params, reactor),
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=10.0, factor=2.0),
            clock=reactor, prepareConnection=self._prepare_protocol,
        )
        self._service._log = Logger(namespace="callme.connection")

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection."""
        connection, self.connection = self.connection, None
        d: Deferred[Any] = Deferred.fromCoroutine(self._stop(connection))
        return d

    async def _stop(self, connection: Connection | None) -> None:
        if connection is not None:
            await connection.close()
        await self._service.stopService()

    def ready(self) -> Deferred[Connection]:
        """Fires with the ready connection.

        Before the first successful connection, fails with the first
        attempt's error (BrokerUnreachable, AuthenticationError, ...); after
        it, waits through reconnections.
        """
        if self.connection is not None and not self.connection.lost:
            return succeed(self.connection)
        if not self._service.running:
            return fail(CallmeError(f"{self._name} is not running"))
        failures = None if self.ever_connected else 1
        d = self._service.whenConnected(failAfterFailures=failures)
        return d.addCallback(lambda _: self._current())

    def _current(self) -> Connection:
        if self.connection is None:
            raise CallmeError(f"{self._name}: the broker connection dropped again")
        return self.connection

    def _prepare_protocol(self, proto: Any) -> Deferred[Any]:
        proto.transport.addr_for_errors = self._endpoint.last_address
        proto.max_body_size = self._max_body_size

        async def run() -> None:
            try:
                connection = await handshake(proto)
                await self._prepare(connection)
            except Exception as e:
                self.last_error = Failure(e)
                log.error("{name}: cannot connect to {broker}: {error}", name=self._name,
                          broker=self._params.describe(), error=e)
                raise
            self.connection = connection
            self.ever_connected = True
            self.last_error = None
            proto.on_lost.append(lambda error: self._connection_lost(connection, error))
            log.info("{name}: connected to {broker}", name=self._name,
                     broker=self._params.describe())

        return Deferred.fromCoroutine(run())

    def _connection_lost(self, connection: Connection, error: CallmeError) -> None:
        if self.connection is connection:
            self.connection = None
            if self._service.running:
                log.warn("{name}: lost the broker connection; reconnecting", name=self._name)
            self._lost(error)

