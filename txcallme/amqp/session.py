"""A broker connection that comes back.

Connect (addresses in turn), log in, run the owner's set-up (declares,
consumers) within ``ConnectionParams.prepare_timeout``; on failure or loss,
retry with exponential backoff. A failed set-up is logged at error with its
reason; before the first success it also fails :meth:`Session.ready`
waiters. Every connection log line names the node reached
(:attr:`Connection.node`: ``host:port`` and the broker's cluster name). This is a
small loop of our own rather than Twisted's ``ClientService``: ClientService
leaves a connection whose preparation failed open and then raises
``NoTransition`` when it closes, and fails ``whenConnected`` waiters in the
middle of a state change, so a waiter cannot stop the service from its errback.
:meth:`Session.stop` may be called from inside the owner's set-up (a refusal the
owner declares fatal): the set-up ends, its connection is closed, nothing is
retried and no "reconnecting" is logged.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcallme.amqp.channel import Connection
from txcallme.amqp.endpoint import BrokerEndpoint
from txcallme.amqp.handshake import handshake
from txcallme.amqp.params import ConnectionParams
from txcallme.amqp.protocol import ProtocolFactory
from txcallme.errors import CallmeError, OperationTimeout


def backoff(attempt: int, initial: float = 0.5, maximum: float = 10.0) -> float:
    """Seconds to wait before retry *attempt* (1-based), with 0-10% jitter."""
    delay: float = min(initial * 2 ** (attempt - 1), maximum)
    return delay * (1 + random.random() / 10)


class _Attempt:
    """One connect-login-prepare attempt of a :class:`Session`."""

    def __init__(self) -> None:
        self.deferred: Deferred[Connection] | None = None
        #: the owner's set-up is running on this attempt's connection
        self.preparing = False
        #: stop() calls waiting for this abandoned attempt to end and close
        self.closed: list[Deferred[None]] = []

    def ended(self, _: Any = None) -> None:
        waiters, self.closed = self.closed, []
        for d in waiters:
            d.callback(None)


class Session:
    """Keeps one live, prepared :class:`Connection` to the broker.

    *prepare* runs on each new connection (declare, consume); the connection
    is ready when it succeeds. *lost* is called with an error each time a
    ready connection drops.
    """

    def __init__(self, reactor: Any, params: ConnectionParams,
                 prepare: Callable[[Connection], Awaitable[Any]],
                 lost: Callable[[CallmeError], None], *, name: str,
                 max_body_size: int | None = None, log: Logger | None = None) -> None:
        self._reactor = reactor
        self._params = params
        self._prepare = prepare
        self._lost = lost
        self._name = name
        self._log = log or Logger(namespace="callme.connection")
        self._max_body_size = max_body_size
        self._endpoint = BrokerEndpoint(reactor, params)
        self._factory = ProtocolFactory(params, reactor)
        self.connection: Connection | None = None
        self.ever_connected = False
        self.last_error: Failure | None = None
        self.running = False
        self._failures = 0
        self._attempt: _Attempt | None = None
        self._retry: Any = None
        self._waiters: list[tuple[Deferred[Connection], bool]] = []
        self._logged_in: Connection | None = None

    def start(self) -> None:
        if not self.running:
            self.running = True
            self._connect()

    def ready(self) -> Deferred[Connection]:
        """Fires with the ready connection.

        Before the first successful connection, fails with the first failed
        attempt's error (BrokerUnreachable, AuthenticationError, AccessRefused,
        ...); after it, waits through reconnections.
        """
        if self.connection is not None and not self.connection.lost:
            return succeed(self.connection)
        if not self.running:
            return fail(CallmeError(f"{self._name} is not running"))
        if not self.ever_connected and self.last_error is not None:
            return fail(self.last_error)  # the first connection has not worked yet
        d: Deferred[Connection] = Deferred()
        self._waiters.append((d, not self.ever_connected))
        return d

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection; fires when closed.

        Safe to call from inside the owner's *prepare* (a refusal it declares
        fatal): from then on the session is not running, so the end of that
        connection, whoever closes it, is not reported as "reconnecting"; the
        set-up's connection is closed once *prepare* returns (or cancelled on
        the next turn if it is still waiting).
        """
        self.running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        attempt, self._attempt = self._attempt, None
        waiting: Deferred[None] | None = None
        if attempt is not None and attempt.deferred is not None:
            if attempt.preparing:
                # Cancelling now could throw into the owner's code while it runs
                # (stop() called from prepare): cancel on the next turn. By then a
                # prepare that returned has had its connection closed as abandoned.
                waiting = Deferred()
                attempt.closed.append(waiting)
                self._reactor.callLater(0, attempt.deferred.cancel)
            else:
                attempt.deferred.cancel()
        waiters, self._waiters = self._waiters, []
        for d, _ in waiters:
            d.errback(CallmeError(f"{self._name} was stopped"))
        connection, self.connection = self.connection, None
        if connection is not None:
            return connection.close()
        return waiting if waiting is not None else succeed(None)

    # -- the loop ------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        attempt = self._attempt = _Attempt()
        attempt.deferred = Deferred.fromCoroutine(self._try_once(attempt))
        attempt.deferred.addCallbacks(self._connected, self._failed, callbackArgs=(attempt,),
                                      errbackArgs=(attempt,))

    async def _try_once(self, attempt: _Attempt) -> Connection:
        proto = await self._endpoint.connect(self._factory)
        proto.connection.address = self._endpoint.last_address
        proto.max_body_size = self._max_body_size
        self._logged_in = None
        try:
            connection = await handshake(proto)
            self._logged_in = connection
            attempt.preparing = True
            try:
                await self._prepared(connection)
            finally:
                attempt.preparing = False
        except BaseException:
            proto.transport.abortConnection()
            raise
        return connection

    async def _prepared(self, connection: Connection) -> None:
        """Run the owner's set-up, bounded by ``prepare_timeout``."""
        timeout = self._params.prepare_timeout
        d = Deferred.fromCoroutine(_awaited(self._prepare(connection)))
        timed_out: list[bool] = []

        def give_up() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._reactor.callLater(timeout, give_up)
        try:
            await d
        except CancelledError:
            if timed_out:
                raise OperationTimeout(f"{self._name} set-up", timeout,
                                       f"on {connection.node}") from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    def _connected(self, connection: Connection, attempt: _Attempt) -> None:
        if attempt is not self._attempt:  # stop() abandoned it (maybe from prepare)
            connection.close().addBoth(attempt.ended)
            return
        self._attempt = None
        self._failures = 0
        self.connection = connection
        self.ever_connected = True
        self.last_error = None
        connection.protocol.on_lost.append(lambda e: self._connection_lost(connection, e))
        self._log.info("{name}: connected to {node} ({broker})", name=self._name,
                       node=connection.node, broker=self._params.describe())
        waiters, self._waiters = self._waiters, []
        for d, _ in waiters:
            d.callback(connection)

    def _failed(self, reason: Failure, attempt: _Attempt) -> None:
        if attempt is not self._attempt:
            # stop() cancelled the attempt (and failed the waiters): whatever the
            # cancel turned into (a HostnameEndpoint still resolving fails with
            # "DNS lookup failed: Couldn't find the hostname"), it is no news.
            attempt.ended()
            return
        self._attempt = None
        self.last_error = reason
        self._failures += 1
        logged_in, self._logged_in = self._logged_in, None
        if logged_in is not None:  # the broker took the login, the set-up failed
            self._failures = max(self._failures, 1)
            delay = backoff(self._failures)
            self._log.error("{name}: set-up on {node} failed: {error}; retrying in "
                            "{delay:.1f} s", name=self._name, node=logged_in.node,
                            error=reason.value, delay=delay)
            if self.running:
                self._retry = self._reactor.callLater(delay, self._connect)
            self._fail_fast_waiters(reason)
            return
        hosts = len(self._params.hosts)
        host, port = self._endpoint.last_address
        if self._failures % hosts:  # try the next address at once
            self._log.warn("{name}: cannot connect to {host}:{port}: {error}; trying the "
                           "next broker address", name=self._name, host=host, port=port,
                           error=reason.value)
            if self.running:
                self._retry = self._reactor.callLater(0, self._connect)
            return
        delay = backoff(self._failures // hosts)
        self._log.error(
            "{name}: cannot connect to {broker} (last tried {host}:{port}): {error}; "
            "retrying in {delay:.1f} s", name=self._name, broker=self._params.describe(),
            host=host, port=port, error=reason.value, delay=delay)
        if self.running:
            self._retry = self._reactor.callLater(delay, self._connect)
        self._fail_fast_waiters(reason)

    def _fail_fast_waiters(self, reason: Failure) -> None:
        failing = [d for d, fail_fast in self._waiters if fail_fast]
        self._waiters = [(d, ff) for d, ff in self._waiters if not ff]
        for d in failing:
            d.errback(reason)

    def _connection_lost(self, connection: Connection, error: CallmeError) -> None:
        if self.connection is not connection:
            return
        self.connection = None
        if self.running:
            self._log.warn("{name}: lost the connection to {node}: {error}; reconnecting",
                           name=self._name, node=connection.node, error=error)
            self._retry = self._reactor.callLater(backoff(1, initial=0.1), self._connect)
        self._lost(error)


def connect(reactor: Any, params: ConnectionParams) -> Deferred[Connection]:
    """Connect once (no reconnection): fires with a :class:`Connection`.

    Fails with BrokerUnreachable, AuthenticationError or TLSError.
    """
    async def run() -> Connection:
        endpoint = BrokerEndpoint(reactor, params)
        proto = await endpoint.connect(ProtocolFactory(params, reactor))
        proto.connection.address = endpoint.last_address
        return await handshake(proto)

    return Deferred.fromCoroutine(run())


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
