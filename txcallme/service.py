"""CallmeServerService: a Twisted service that serves one server id.

Lifecycle: connect (and reconnect), declare the server's exchange and queue,
consume with a per-consumer prefetch tied to the concurrency limit, reply, ack
only after the reply is confirmed; when the broker cancels the consumer or
closes its channel, declare and consume again with backoff. On stop: stop
consuming (and never consume again, whatever the connection does), send the
requests not started back to the queue, let running calls finish within
``stop_timeout``, close, and stop the thread pool without waiting for stuck
threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from threading import Thread
from typing import Any, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from txcallme import _introspect, _wire, callme_compat, observe
from txcallme._wire import DIRECT_REPLY_TO
from txcallme.amqp import (
    Acker,
    Channel,
    ConfirmedPublisher,
    Connection,
    ConnectionParams,
    Delivery,
    Session,
    TLSSettings,
    backoff,
    connection_params,
)
from txcallme.callme_compat import CallmeDispatcher
from txcallme.errors import (
    AccessRefused,
    BrokerConnectionLost,
    CallmeError,
    ChannelError,
    DeclarationRefused,
    DeliveryLimitReached,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PublishNacked,
    ServiceError,
    Unroutable,
)
from txcallme.serializers import JSON, Serializer
from txcallme.server import CallContext, Dispatcher

log = Logger(namespace="callme.server")

F = TypeVar("F", bound=Callable[..., Any])

#: Default largest request body a server reads (bytes).
DEFAULT_MAX_BODY_SIZE = 16 * 1024 * 1024
#: Default lease of a quorum server queue once no instance consumes it (seconds).
DEFAULT_QUEUE_EXPIRES = 300.0
#: Default deliveries of one request to quorum queue consumers before it is refused.
DEFAULT_DELIVERY_LIMIT = 10
QUEUE_TYPES = ("classic", "quorum")
#: Reply codes of a refused declaration: fatal on a first start, retried after.
REFUSAL_CODES = (403, 405, 406, 541)
#: Seconds between two checks that the server's exchange still exists (a deleted
#: exchange, unlike a deleted queue, cancels no consumer: nothing else notices).
REPAIR_INTERVAL = 15.0
#: Seconds between two warnings about a caller's clock being behind this server's.
SKEW_WARNING_INTERVAL = 60.0

@attrs.frozen
class ServerDeclarations:
    """The exchange, queue and binding a server declares, with their flags.

    Every queue is durable (RabbitMQ 4.3 refuses transient non-exclusive
    queues with 541). Build with :meth:`for_server`.
    """

    exchange: str
    queue: str
    routing_key: str
    queue_type: str
    exchange_durable: bool
    exchange_auto_delete: bool
    queue_durable: bool
    queue_auto_delete: bool
    queue_arguments: dict[str, Any]
    #: requests delivered this many times are answered with an error, not run
    #: (quorum queues count deliveries in ``x-delivery-count``); None: no limit
    delivery_limit: int | None

    @classmethod
    def for_server(cls, server_id: str, *, queue_type: str = "classic",
                   durable: bool = False, queue_expires: float = DEFAULT_QUEUE_EXPIRES,
                   delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> ServerDeclarations:
        """The declarations of *server_id*; raise ValueError for bad options.

        - classic, ``durable=False``: a durable, auto-delete queue (gone with the
          last instance's consumer) bound to a transient auto-delete exchange;
        - classic, ``durable=True``: durable exchange and queue that stay;
        - quorum: ``x-queue-type=quorum`` (durable, never exclusive or
          auto-delete), ``x-expires`` lease, ``x-delivery-limit``; a durable
          exchange that goes with its last binding (when the queue expires).
        """
        exchange, queue = _wire.server_exchange(server_id), _wire.server_queue(server_id)
        if queue_type == "classic":
            return cls(exchange, queue, server_id, queue_type, durable, not durable,
                       True, not durable, {}, None)
        if queue_type != "quorum":
            raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
        if not queue_expires > 0:
            raise ValueError("queue_expires must be a positive number of seconds")
        if isinstance(delivery_limit, bool) or not isinstance(delivery_limit, int) \
                or delivery_limit < 1:
            raise ValueError("delivery_limit must be an integer of at least 1")
        arguments = {"x-queue-type": "quorum", "x-expires": max(1, round(queue_expires * 1000)),
                     "x-delivery-limit": delivery_limit}
        return cls(exchange, queue, server_id, queue_type, True, not durable, True, False,
                   arguments, delivery_limit)

    async def declare(self, channel: Channel) -> None:
        """Declare the exchange and the queue and bind them on *channel*."""
        await channel.declare_exchange(self.exchange, "direct", durable=self.exchange_durable,
                                       auto_delete=self.exchange_auto_delete)
        await channel.declare_queue(self.queue, durable=self.queue_durable,
                                    auto_delete=self.queue_auto_delete,
                                    arguments=dict(self.queue_arguments))
        await channel.bind_queue(self.queue, self.exchange, self.routing_key)


class _DaemonThreadPool(ThreadPool):
    """A ThreadPool whose workers do not keep the process alive: a function stuck
    past ``stop_timeout`` must not stop ``twistd`` from exiting."""

    @staticmethod
    def threadFactory(*args: Any, **kwargs: Any) -> Thread:  # type: ignore[override]  # noqa: N802
        return Thread(*args, daemon=True, **kwargs)


class _Workers:
    """The service's thread pool: a fresh pool of daemon threads per start (a
    stopped ThreadPool cannot be started again), stopped without joining
    threads that are still stuck in a function."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads = threads
        self.name = name
        self.pool: ThreadPool | None = None

    def start(self) -> None:
        if self.pool is None:
            self.pool = _DaemonThreadPool(0, self.threads, name=self.name)
            self.pool.start()

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], None],  # noqa: N802,N803
                                 func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        if self.pool is None:
            raise ServiceError("the server's thread pool is stopped")
        self.pool.callInThreadWithCallback(onResult, func, *args, **kw)

    def busy(self) -> int:
        """Threads of the pool running a function now (0 when stopped)."""
        pool = self.pool
        return len(pool.working) if pool is not None else 0

    def stop(self, busy: int) -> None:
        """Stop the pool; with *busy* threads still running, join them on a
        thread of their own, never on the reactor's."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if busy:
            Thread(target=pool.stop, name=f"{self.name}-stop", daemon=True).start()
        else:
            pool.stop()


@attrs.define(eq=False)
class _Call:
    """One request between its receipt and its end (reply confirmed, or requeued)."""

    acker: Acker
    tag: int
    request: _wire.Request
    reply_to: str
    corr: Any
    redelivered: bool
    #: the deadline this server uses (its own clock), or None
    deadline: float | None
    #: ``receipt-relative deadline - absolute deadline``: clock skew plus queue time
    skew: float | None
    blocking: bool = False
    #: a callme 0.2.0 request (pickle): answered in callme's format
    callme: bool = False
    #: the message's headers table (the caller's trace context), and what observes the run
    headers: Any = None
    observed: observe.Call = observe.NULL_CALL


@attrs.define(eq=False)
class _Consumer:
    channel: Channel
    acker: Acker
    tag: str


class CallmeServerService(Service):
    """Serve registered functions under *server_id* over AMQP.

    ``threading=True`` (callme's ``threaded=True``) runs plain functions in the
    service's own pool of *threads* threads; ``async def`` functions,
    ``inlineCallbacks``-decorated functions and functions registered with
    ``blocking=False`` run on the reactor. ``introspection=False`` turns off
    the reserved ``__callme__.ping`` / ``__callme__.describe`` calls.

    ``ack="after_reply"`` (default, at-least-once): a request is acked after its
    reply is confirmed, so a server that dies mid-call has it redelivered to
    another instance; a reply the broker nacks sends the request back to the
    queue. ``ack="on_receipt"`` (at-most-once) acks before running.
    ``stop_timeout``: how long :meth:`stopService` waits for running calls.

    Declarations (see :class:`ServerDeclarations`): every queue is durable, as
    RabbitMQ 4.3 refuses transient non-exclusive queues. ``queue_type="classic"``
    (default): a durable, auto-delete queue that goes with the last instance,
    so a call to a stopped server fails fast; ``durable=True`` keeps it (and
    the exchange) when no instance runs. ``queue_type="quorum"``: a replicated
    quorum queue, removed by an ``x-expires`` lease of *queue_expires* seconds
    once no instance consumes it; a request delivered *delivery_limit* times
    without an answer (it keeps crashing servers) is answered with an error
    instead of being run again, and the broker drops it after one more.
    """

    def __init__(
        self,
        server_id: str,
        amqp_host: str | Sequence[str] = "localhost",
        amqp_port: int | None = None,
        amqp_user: str = "guest",
        amqp_password: str = "guest",
        amqp_vhost: str = "/",
        threading: bool = False,
        threads: int = 10,
        *,
        threaded: bool | None = None,
        amqp_url: str | None = None,
        ssl: bool | TLSSettings = False,
        params: ConnectionParams | None = None,
        serializer: Serializer = JSON,
        prefetch: int | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        introspection: bool = True,
        ack: str = "after_reply",
        durable: bool = False,
        queue_type: str = "classic",
        queue_expires: float = DEFAULT_QUEUE_EXPIRES,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        stop_timeout: float = 60.0,
        callme_compat: bool = False,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.server_id = _wire.check_server_id(server_id)
        self.name = f"callme-{server_id}"
        self._reactor = reactor
        self.params = params or connection_params(
            amqp_host, amqp_port, amqp_user, amqp_password, amqp_vhost,
            amqp_url=amqp_url, ssl=ssl)
        if threaded is not None:
            threading = threaded
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.threading = threading
        self.threads = threads
        self.prefetch = prefetch or (2 * threads if threading else 100)
        self.max_body_size = max_body_size
        if ack not in ("after_reply", "on_receipt"):
            raise ValueError("ack must be 'after_reply' (at-least-once) or 'on_receipt' "
                             "(at-most-once)")
        self.ack = ack
        self.durable = durable
        self.declarations = ServerDeclarations.for_server(
            self.server_id, queue_type=queue_type, durable=durable,
            queue_expires=queue_expires, delivery_limit=delivery_limit)
        self.queue_type = queue_type
        self.stop_timeout = stop_timeout
        self.serializer = serializer
        self._workers = _Workers(threads, self.name) if threading else None
        self.dispatcher = Dispatcher(serializer, reactor=reactor, thread_pool=self._workers)
        if introspection:
            workers = self._workers
            _introspect.install(self.dispatcher, server_id,
                                busy_threads=workers.busy if workers is not None else None,
                                threads=threads if workers is not None else None)
        #: also answer unmodified callme 0.2.0 Proxies (pickle), told apart by
        #: content type; declares callme's flags (see txcallme.callme_compat)
        self.callme_compat = callme_compat
        self._callme: CallmeDispatcher | None = None
        if callme_compat:
            if queue_type != "classic":
                raise ValueError("callme_compat=True needs queue_type='classic' (callme's "
                                 "queue flags)")
            self._callme = CallmeDispatcher(
                self.dispatcher, reactor=reactor, thread_pool=self._workers)
        self._observer = observe.ServerObserver(
            server_id, self.dispatcher.handlers, serializer=serializer,
            busy_threads=(lambda: self._blocking_running) if threading else None)
        self._session = Session(reactor, self.params, self._prepare, self._lost,
                                name=f"server {server_id!r}", max_body_size=max_body_size,
                                log=log)
        self._connection: Connection | None = None
        self._replies: ConfirmedPublisher | None = None
        self._consumer: _Consumer | None = None
        self._ackers: list[Acker] = []
        self._recovery: Any = None
        self._repair: Any = None
        #: seconds between checks of the server's exchange (re-declared and bound
        #: again, logged at warn, when it was deleted); 0 or None: no checks
        self.repair_interval: float | None = REPAIR_INTERVAL
        self._in_flight = 0
        self._blocking_running = 0
        self._waiting: deque[_Call] = deque()
        self._drained: list[Deferred[None]] = []
        # Declare-and-consume runs in flight, and who waits for them to end: a stop
        # waits, so a queue declared but not yet consumed is consumed and cancelled
        # (RabbitMQ auto-deletes only a queue that had a consumer).
        self._setups = 0
        self._setups_done: list[Deferred[None]] = []
        self._stopping = False
        self._stop_d: Deferred[None] | None = None
        self._stop_waiters: list[Deferred[None]] = []
        self._fatal: DeclarationRefused | None = None
        self._ready_waiters: list[Deferred[Connection]] = []
        self._served = False
        self._skew_warned_at: float | None = None
        #: requests sent back to the queue by the last stop without being started
        self.requeued_on_stop = 0

    # -- registration ----------------------------------------------------------

    def register_function(self, func: F | None = None, name: str | None = None, *,
                          blocking: bool | None = None, with_context: bool = False) -> Any:
        """Expose *func* under *name* (dotted names allowed).

        Usable as ``register_function(f)``, ``@register_function`` or
        ``@register_function(name="math.add")``; returns the function.
        ``blocking`` forces where a plain function runs (thread pool or
        reactor); ``with_context=True`` passes a
        :class:`~txcallme.server.CallContext` as the keyword ``context``.
        """
        if func is None:
            return lambda f: self.register_function(f, name, blocking=blocking,
                                                    with_context=with_context)
        self.dispatcher.register(func, name, blocking=blocking, with_context=with_context)
        return func

    # -- lifecycle -------------------------------------------------------------

    @property
    def consuming(self) -> bool:
        """True while the server consumes requests."""
        return self._consumer is not None

    def startService(self) -> None:  # noqa: N802
        """Connect and serve; may follow a :meth:`stopService` (even one still running)."""
        super().startService()  # type: ignore[no-untyped-call]
        if self._stop_d is not None:  # a stop is still running: start after it
            self._stop_d.addBoth(lambda _: self._start() if self.running else None)
        else:
            self._start()

    def _start(self) -> None:
        self._stopping = False
        self._fatal = None
        self._served = False  # refusals are fatal until the first successful start
        if self._workers is not None:
            self._workers.start()
        self._session.start()

    def when_ready(self) -> Deferred[Connection]:
        """Fires once the server consumes requests; fails with the first
        connection error (BrokerUnreachable, AuthenticationError, TLSError), or
        with :class:`~txcallme.errors.DeclarationRefused` (saying what to do)
        when the broker refuses the server's queue on the first start."""
        if self._fatal is not None:
            return fail(self._fatal)
        ready = self._session.ready()
        if ready.called:
            return ready
        mine: Deferred[Connection] = Deferred()
        self._ready_waiters.append(mine)

        def settle(result: Any) -> None:
            if mine in self._ready_waiters:
                self._ready_waiters.remove(mine)
            if not mine.called:  # a refusal on the first start fails it first
                mine.callback(result) if not isinstance(result, Failure) else \
                    mine.errback(result)

        ready.addBoth(settle)
        return mine

    def stopService(self) -> Deferred[None]:  # noqa: N802
        """Stop consuming, send requests not started back to the queue, let running
        calls finish and reply (up to ``stop_timeout``), then close.

        Fires when the connection is closed; concurrent calls share that outcome.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)  # before: the stop may finish at once
        if self._stop_d is None:
            self._stopping = True
            stop = Deferred.fromCoroutine(self._stop())
            if not stop.called:
                self._stop_d = stop
            stop.addBoth(self._stopped)
        return waiter

    def _stopped(self, result: Any) -> Any:
        self._stop_d = None
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)
        if isinstance(result, Failure):
            log.failure("stopping the server failed", result)
        return None

    async def _stop(self) -> None:
        self._cancel_recovery()
        self._cancel_repair()
        consumer, self._consumer = self._consumer, None
        if consumer is not None and not consumer.channel.closed:
            try:
                await consumer.channel.cancel(consumer.tag)
            except CallmeError:
                pass
        waiting, self._waiting = list(self._waiting), deque()
        for call in waiting:
            call.observed.requeued()
            call.acker.release(call.tag)
        self.requeued_on_stop = len(waiting)
        if waiting:
            log.info("stopping: {n} requests not started go back to the queue",
                     n=len(waiting))
        # One stop_timeout bounds both waits below.
        deadline = self._reactor.seconds() + self.stop_timeout
        # A declare-and-consume in flight: let it end (each step is bounded by the
        # channel's control timeout), so its consumer is cancelled before the close.
        # A close between queue.declare and basic.consume would leave a durable
        # auto-delete queue that never had a consumer, for good.
        if self._setups and not await self._within(self._setups_done, deadline):
            log.warn("stopping: the consumer set-up did not end within {s} s; "
                     "closing anyway", s=self.stop_timeout)
        if self._in_flight:
            log.info("waiting for {n} running calls to finish", n=self._in_flight)
            if not await self._within(self._drained, deadline):
                log.error("{n} calls still running after {s} s: closing anyway; the broker "
                          "requeues their requests", n=self._in_flight, s=self.stop_timeout)
        for acker in self._ackers:
            acker.flush()
        self._ackers = []
        replies, self._replies = self._replies, None
        if replies is not None:
            await replies.close()
        await self._session.stop()
        self._connection = None
        if self._workers is not None:
            self._workers.stop(self._blocking_running)

    async def _within(self, waiters: list[Deferred[None]], deadline: float) -> bool:
        """Wait, until *deadline*, for a Deferred appended to *waiters* to fire;
        False if the deadline came first."""
        d: Deferred[None] = Deferred()
        waiters.append(d)
        d.addTimeout(max(0.0, deadline - self._reactor.seconds()), self._reactor)
        try:
            await d
        except DeferTimeoutError:
            return False
        return True

    async def _prepare(self, connection: Connection) -> None:
        self._connection = connection
        self._replies = ConfirmedPublisher(connection.open_channel, replay=True)
        if self._stopping:
            # Running calls may still reply over this connection; nothing new is taken.
            log.warn("reconnected while stopping: not consuming again")
            return
        try:
            await self._consume(connection)
        except DeclarationRefused:
            if self._fatal is None:
                raise  # after the first start: the session retries with backoff
            # The first start: fatal. Stop the session now, from inside the set-up:
            # it closes this connection once the set-up returns, and neither
            # retries nor logs "reconnecting" (when_ready() has already failed).
            self._session.stop()
            return
        if self._stopping:
            return  # its consumer was cancelled: no exchange check to schedule
        if self._served:
            self._observer.reconnected()
        self._served = True
        self._schedule_repair(connection)
        log.info("serving {server_id!r}: {names}", server_id=self.server_id,
                 names=", ".join(self.dispatcher.handlers))

    async def _consume(self, connection: Connection, channel: Channel | None = None,
                       acker: Acker | None = None) -> None:
        """Declare and consume on *channel* (a new one if None or closed); a stop
        waits for this to end."""
        self._setups += 1
        try:
            await self._set_up(connection, channel, acker)
        finally:
            self._setups -= 1
            if not self._setups:
                waiters, self._setups_done = self._setups_done, []
                for d in waiters:
                    if not d.called:  # not given up on by stop_timeout
                        d.callback(None)

    async def _set_up(self, connection: Connection, channel: Channel | None,
                      acker: Acker | None) -> None:
        if channel is None or acker is None or channel.closed:
            channel = await connection.open_channel()
            await channel.qos(self.prefetch)  # per consumer: global QoS is gone in 4.3
            acker = Acker(channel, self._reactor)
            self._ackers = [a for a in self._ackers if not a.channel.closed] + [acker]
            ch, ack = channel, acker
            channel.on_close.append(lambda error: self._consumer_closed(connection, ch, error))
            channel.on_consumer_cancelled = \
                lambda tag: self._consumer_cancelled(connection, ch, ack, tag)
        used = acker
        try:
            await self._declare(channel)
            tag = await channel.consume(self.declarations.queue,
                                        lambda d: self._request(used, d))
        except ChannelError as e:
            if e.code not in REFUSAL_CODES:
                raise
            raise self._refused(e) from None
        if self._stopping:  # stopService began while this consumer was being set up
            try:
                await channel.cancel(tag)
            except CallmeError:
                pass
            return
        self._consumer = _Consumer(channel, acker, tag)

    async def _declare(self, channel: Channel) -> None:
        """Declare the server's exchange and queue and bind them (callme's flags in
        compat mode)."""
        if self._callme is not None:
            await callme_compat.declare_server(channel, self.server_id, durable=self.durable)
        else:
            await self.declarations.declare(channel)

    def _refused(self, error: ChannelError) -> DeclarationRefused:
        refusal = DeclarationRefused(self.server_id, error.code, error.text, refusal_hint(
            error.code, self.declarations, self.params.user, self.params.vhost))
        if not self._served:
            # The first start: fatal. when_ready() fails with it; no retry loop.
            self._fatal = refusal
            log.error("{error} Not retrying: this is the first start.", error=refusal)
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.errback(refusal)
        # Later it is logged at error and retried with backoff.
        return refusal

    # -- an exchange that was deleted -----------------------------------------

    def _schedule_repair(self, connection: Connection) -> None:
        self._cancel_repair()
        if self.repair_interval:
            self._repair = self._reactor.callLater(self.repair_interval, self._check_exchange,
                                                   connection)

    def _cancel_repair(self) -> None:
        if self._repair is not None and self._repair.active():
            self._repair.cancel()
        self._repair = None

    def _check_exchange(self, connection: Connection) -> None:
        self._repair = None
        if self._stopping or connection.lost or self._connection is not connection:
            return
        d = Deferred.fromCoroutine(self._repair_exchange(connection))

        def failed(reason: Failure) -> None:
            if not (self._stopping or connection.lost):
                log.warn("cannot check the exchange {exchange}: {error}",
                         exchange=self.declarations.exchange, error=reason.value)

        def again(_: Any) -> None:
            if not (self._stopping or connection.lost) and self._connection is connection:
                self._schedule_repair(connection)

        d.addErrback(failed).addBoth(again)

    async def _repair_exchange(self, connection: Connection) -> bool:
        """Passive-declare the server's exchange on a channel of its own (a 404
        closes it); when it is gone, declare and bind again. True if re-created."""
        decl = self.declarations
        channel = await connection.open_channel()
        try:
            await channel.declare_exchange(decl.exchange, "direct", passive=True)
        except NotFound:
            pass
        else:
            await channel.close()
            return False
        log.warn("the exchange {exchange} was deleted (its queue {queue} stayed): "
                 "declaring and binding it again", exchange=decl.exchange, queue=decl.queue)
        channel = await connection.open_channel()
        try:
            await self._declare(channel)
        finally:
            if not channel.closed:
                await channel.close()
        log.info("declared and bound {exchange} again", exchange=decl.exchange)
        return True

    # -- consumers that come back ---------------------------------------------

    def _consumer_cancelled(self, connection: Connection, channel: Channel, acker: Acker,
                            tag: str) -> None:
        consumer = self._consumer
        if consumer is None or consumer.channel is not channel or consumer.tag != tag:
            return
        self._consumer = None
        if self._stopping:
            return
        log.warn("the broker cancelled the consumer of {queue} (queue deleted or "
                 "unavailable): declaring it and consuming again",
                 queue=self.declarations.queue)
        self._schedule_recovery(connection, channel, acker, 1)

    def _consumer_closed(self, connection: Connection, channel: Channel,
                         error: CallmeError) -> None:
        self._drop_waiting(lambda c: c.acker.channel is channel)
        consumer = self._consumer
        if consumer is None or consumer.channel is not channel:
            return
        self._consumer = None
        if self._stopping or connection.lost or not isinstance(error, ChannelError):
            return  # a lost connection is the session's to bring back
        log.warn("the broker closed the consumer channel of {queue}: {error}; "
                 "consuming again", queue=self.declarations.queue, error=error)
        self._schedule_recovery(connection, None, None, 1)

    def _schedule_recovery(self, connection: Connection, channel: Channel | None,
                           acker: Acker | None, attempt: int) -> None:
        self._cancel_recovery()
        delay = backoff(attempt, initial=0.2)
        self._recovery = self._reactor.callLater(
            delay, self._recover, connection, channel, acker, attempt)

    def _cancel_recovery(self) -> None:
        if self._recovery is not None and self._recovery.active():
            self._recovery.cancel()
        self._recovery = None

    def _recover(self, connection: Connection, channel: Channel | None, acker: Acker | None,
                 attempt: int) -> None:
        self._recovery = None
        if self._stopping or connection.lost or self._connection is not connection:
            return
        d = Deferred.fromCoroutine(self._consume(connection, channel, acker))

        def done(_: Any) -> None:
            log.warn("consuming {queue} again (attempt {attempt})",
                     queue=self.declarations.queue, attempt=attempt)

        def failed(reason: Failure) -> None:
            if self._stopping or connection.lost or self._connection is not connection:
                return
            level = log.error if reason.check(DeclarationRefused) else log.warn
            level("cannot consume {queue} again: {error}; retrying with backoff",
                  queue=self.declarations.queue, error=reason.value)
            self._schedule_recovery(connection, None, None, attempt + 1)

        d.addCallbacks(done, failed)

    def _lost(self, error: CallmeError) -> None:
        self._cancel_recovery()
        self._cancel_repair()
        self._connection = None
        self._consumer = None
        self._replies = None
        self._drop_waiting(lambda c: c.acker.channel.closed)

    def _drop_waiting(self, gone: Callable[[_Call], bool]) -> None:
        """Forget the waiting requests whose channel closed (the broker requeues them,
        unacked): their observed calls end as requeued, no longer in flight."""
        kept: deque[_Call] = deque()
        for call in self._waiting:
            if gone(call):
                call.observed.requeued()
            else:
                kept.append(call)
        self._waiting = kept

    # -- one request -------------------------------------------------------------

    def _request(self, acker: Acker, delivery: Delivery) -> None:
        tag = delivery.delivery_tag
        acker.received(tag)
        if self._stopping:
            acker.release(tag)
            return
        received = self._reactor.seconds()
        if self.ack == "on_receipt":
            acker.ack(tag)
        props = delivery.properties
        reply_to = props.get("reply_to")
        corr = props.get("correlation_id")
        callme = self._callme is not None and \
            props.get("content_type") == callme_compat.CONTENT_TYPE
        if delivery.redelivered:
            self._observer.redelivered()
        try:
            request = self._decode(delivery, callme)
        except InvalidRequest as e:
            self._observer.refused(observe.refusal_reason(e), None, corr, props.get("headers"), e)
            log.warn("bad request (correlation id {corr!r}, reply_to {reply_to!r}): {error}",
                     corr=corr, reply_to=reply_to, error=e, server_id=self.server_id,
                     method=None, correlation_id=corr)
            if reply_to:
                body = callme_compat.encode_error(e) if callme else \
                    _wire.encode_error(self.serializer, _wire.error_description(e, False))
                self._reply(_Call(acker, tag, _wire.Request("", [], {}), reply_to, corr,
                                  delivery.redelivered, None, None, callme=callme), body)
            else:
                self._done(acker, tag)
            return
        if not reply_to:
            self._observer.refused("invalid", request.method, corr, props.get("headers"),
                                   InvalidRequest("request has no reply_to: not run"))
            log.warn("request {method!r} has no reply_to: not run", method=request.method,
                     server_id=self.server_id, correlation_id=corr)
            self._done(acker, tag)
            return
        deadline, skew = self._deadline(request, props, received, corr)
        call = _Call(acker, tag, request, reply_to, corr, delivery.redelivered, deadline, skew,
                     callme=callme)
        call.headers = props.get("headers")
        limit = self.declarations.delivery_limit
        if limit is not None and delivery.redelivered and _delivery_count(props) >= limit:
            log.error("request {method!r} (correlation id {corr!r}) was delivered {n} times "
                      "without an answer (it keeps crashing servers?): answered with an "
                      "error, not run again", method=request.method, corr=corr,
                      n=_delivery_count(props), server_id=self.server_id, correlation_id=corr)
            error = DeliveryLimitReached(
                f"{request.method}() was delivered {_delivery_count(props)} times without "
                f"an answer (servers died running it): not run again")
            body = _wire.encode_error(self.serializer, _wire.error_description(error, False))
            self._reply(call, body)
            return
        handler = self.dispatcher.handlers.get(request.method)
        call.blocking = handler is not None and handler.blocking
        # Observed from receipt: the span and duration include the wait for a thread.
        call.observed = self._observer.server_call(request.method, corr, call.headers)
        if call.blocking and self._blocking_running >= self.threads:
            self._waiting.append(call)  # not started: goes back to the queue on stop
            return
        self._start_call(call)

    def _deadline(self, request: _wire.Request, props: dict[str, Any], received: float,
                  corr: Any = None) -> tuple[float | None, float | None]:
        """The deadline to use: receipt + ``expiration`` first (immune to clock skew),
        bounded by the body's absolute ``deadline`` unless that had already passed
        at receipt (the broker still delivered it: the clocks disagree)."""
        relative: float | None = None
        expiration = props.get("expiration")
        if expiration is not None:
            try:
                relative = received + max(0, int(expiration)) / 1000.0
            except (TypeError, ValueError):
                relative = None
        absolute = request.deadline
        if relative is None:
            return absolute, None
        if absolute is None:
            return relative, None
        skew = relative - absolute
        if absolute < received:
            if self._skew_warned_at is None or \
                    received - self._skew_warned_at >= SKEW_WARNING_INTERVAL:
                self._skew_warned_at = received
                log.warn("request {method!r} arrived {late:.3f} s after its absolute "
                         "deadline but within its expiration: this server's clock seems "
                         "ahead of the caller's by about {skew:.3f} s; using the "
                         "receipt-relative deadline", method=request.method,
                         late=received - absolute, skew=skew, server_id=self.server_id,
                         correlation_id=corr)
            return relative, skew
        return min(relative, absolute), skew

    def _start_call(self, call: _Call) -> None:
        now = self._reactor.seconds()
        request = call.request
        if call.deadline is not None and now > call.deadline:
            log.warn("request {method!r} (correlation id {corr!r}) is {late:.3f} s past its "
                     "deadline: not run (estimated clock skew plus queue time: {skew})",
                     method=request.method, corr=call.corr, late=now - call.deadline,
                     skew="unknown" if call.skew is None else f"{call.skew:.3f} s",
                     server_id=self.server_id, correlation_id=call.corr)
            call.observed.refuse("stale")
            self._done(call.acker, call.tag)
            return
        self._in_flight += 1
        if call.blocking:
            self._blocking_running += 1
        try:
            dispatcher = self._callme if call.callme and self._callme else self.dispatcher
            d = call.observed.run(dispatcher.dispatch, request, lambda: CallContext(
                self.server_id, request.method, call.corr, call.reply_to, call.redelivered,
                call.deadline))
        except Exception as e:  # dispatch never fails; if it did, still answer
            log.failure("cannot start {method}", method=request.method,
                        server_id=self.server_id, correlation_id=call.corr)
            error = ServiceError(f"the server could not start {request.method}(): {e}")
            d = succeed(_wire.encode_error(self.serializer, _wire.error_description(error,
                                                                                    False)))
        d.addBoth(self._dispatched, call)  # one callback: a sync call runs it at once

    def _dispatched(self, body: bytes | Failure, call: _Call) -> None:
        """The reply body is there: send it; the call ends once the reply is settled."""
        if not isinstance(body, Failure):
            try:
                if call.observed.live:  # the span and metrics end with the reply body
                    body = call.observed.replied(body)
                self._reply(call, body).addBoth(self._settled, call)
                return
            except Exception:
                body = Failure()
        self._settled(body, call)

    def _settled(self, result: Any, call: _Call) -> None:
        if isinstance(result, Failure):
            log.failure("dispatch failed", result, server_id=self.server_id,
                        method=call.request.method, correlation_id=call.corr)
        self._finished(None, call)

    def _done(self, acker: Acker, tag: int) -> None:
        """The request is dealt with: ack it (if not already acked on receipt)."""
        if self.ack == "after_reply":
            acker.ack(tag)

    def _decode(self, delivery: Delivery, callme: bool = False) -> _wire.Request:
        if delivery.problem:
            if delivery.size > self.max_body_size:
                raise PayloadTooLarge(f"request of {delivery.size} bytes is over the "
                                      f"{self.max_body_size} byte limit")
            raise InvalidRequest(delivery.problem)
        if callme:
            return callme_compat.decode_request(delivery.body)
        content_type = delivery.properties.get("content_type")
        if content_type and content_type != self.serializer.content_type:
            raise InvalidRequest(f"content type {content_type!r} not accepted; this server "
                                 f"reads {self.serializer.content_type!r}")
        return _wire.decode_request(self.serializer, delivery.body)

    def _reply(self, call: _Call, body: bytes) -> Deferred[None]:
        props: dict[str, Any] = {"content_type": callme_compat.CONTENT_TYPE if call.callme
                                 else self.serializer.content_type}
        if call.corr is not None:
            props["correlation_id"] = call.corr
        replies = self._replies
        if replies is None:  # the connection is gone; the broker will redeliver
            return succeed(None)
        reply_to = call.reply_to
        if reply_to.startswith(DIRECT_REPLY_TO):
            # Direct Reply-to: the caller's channel takes it through the default exchange.
            d = replies.publish("", reply_to, body, props)
        else:
            key = callme_compat.ROUTING_KEY if call.callme else reply_to  # callme binds ''
            d = replies.publish(reply_to, key, body, props)
        return d.addCallbacks(self._replied, self._reply_failed, callbackArgs=(call,),
                              errbackArgs=(call,))

    def _replied(self, _: Any, call: _Call) -> None:
        if self.ack == "after_reply":
            call.acker.ack(call.tag)

    def _reply_failed(self, reason: Failure, call: _Call) -> None:
        error = reason.value
        if isinstance(error, PublishNacked) or (
                isinstance(error, BrokerConnectionLost) and self.ack == "after_reply"):
            # Not taken (or maybe not): after_reply, the request goes back to the
            # queue and is answered again, by this instance or another
            # (at-least-once); on_receipt, it was acked already and the reply is lost.
            if self.ack == "after_reply":
                log.warn("reply to {reply_to!r} not taken by the broker ({error}): the "
                         "request goes back to the queue", reply_to=call.reply_to,
                         error=error, **self._fields(call))
                call.acker.reject(call.tag, requeue=True)
            else:
                log.warn("reply to {reply_to!r} not taken by the broker ({error}): the reply "
                         "is lost (ack='on_receipt': the request was acked when it came)",
                         reply_to=call.reply_to, error=error, **self._fields(call))
            return
        if isinstance(error, (Unroutable, NotFound)):
            log.info("caller {reply_to!r} is gone; reply dropped: {error}",
                     reply_to=call.reply_to, error=error)
        elif isinstance(error, AccessRefused):
            log.warn("may not reply to {reply_to!r}: {error}", reply_to=call.reply_to,
                     error=error, **self._fields(call))
        else:
            log.warn("cannot reply to {reply_to!r}: {error}", reply_to=call.reply_to,
                     error=error, **self._fields(call))
        self._done(call.acker, call.tag)  # retrying cannot help

    def _fields(self, call: _Call) -> dict[str, Any]:
        """The fields a warn/error event about *call* carries (for log aggregation);
        a request that could not be decoded has no method: None."""
        return {"server_id": self.server_id, "method": call.request.method or None,
                "correlation_id": call.corr}

    def _finished(self, _: Any, call: _Call) -> None:
        self._in_flight -= 1
        if call.blocking:
            self._blocking_running -= 1
            while self._waiting and self._blocking_running < self.threads \
                    and not self._stopping:
                self._start_call(self._waiting.popleft())
        if not self._in_flight and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                if not d.called:  # not given up on by stop_timeout
                    d.callback(None)


def _delivery_count(properties: dict[str, Any]) -> int:
    """Earlier deliveries of a message, as quorum queues count them (0 if unknown)."""
    headers = properties.get("headers") or {}
    count = headers.get("x-delivery-count", 0) if isinstance(headers, dict) else 0
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def refusal_hint(code: int, decl: ServerDeclarations, user: str, vhost: str) -> str:
    """What an operator can do about a refused declaration (reply *code*)."""
    if code == 406:
        return (f"Queue {decl.queue!r} or exchange {decl.exchange!r} already exists with "
                f"other flags or arguments (an older txcallme declared transient queues; "
                f"another instance may use another queue_type or durable setting). Run "
                f"every instance of the server with the same options, or migrate: stop "
                f"all instances (an auto-delete queue goes with the last one) or delete "
                f"the old queue with `rabbitmqctl delete_queue -p {vhost} {decl.queue}` "
                f"once its requests are drained (its auto-delete exchange goes with it), "
                f"then start the new version.")
    if code == 403:
        ours = f"server_{decl.routing_key}_.*"
        return (f"User {user!r} may not declare, bind or consume the server's objects on "
                f"vhost {vhost!r}. Grant it: `rabbitmqctl set_permissions -p {vhost} {user} "
                f"\"{ours}\" \"{ours}|client_.*_ex_.*\" \"{ours}\"`.")
    if code == 405:
        return (f"Queue {decl.queue!r} is locked by another connection (an exclusive queue "
                f"of that name, or a consumer with exclusive access): stop what holds it "
                f"or use another server id.")
    return ("The broker refused a feature (RabbitMQ 4.3 denies the deprecated "
            "transient_nonexcl_queues): use queue_type='classic' (durable auto-delete, the "
            "default) or 'quorum', or check `rabbitmq-diagnostics "
            "check_if_any_deprecated_features_are_used` and the broker log.")
