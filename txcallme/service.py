"""CallmeServerService: a Twisted service that serves one server id.

Lifecycle: connect (and reconnect), declare the server's exchange and queue,
consume with a prefetch tied to the concurrency limit, reply, ack only after
the reply is confirmed, and on stop: stop consuming, finish in-flight calls,
stop the thread pool, close.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from txcallme import _introspect, _wire
from txcallme.amqp import (
    Acker,
    Channel,
    ConfirmedPublisher,
    Connection,
    ConnectionParams,
    Delivery,
    Session,
    TLSSettings,
    connection_params,
)
from txcallme.errors import (
    CallmeError,
    ChannelError,
    DeclarationRefused,
    DeliveryLimitReached,
    InvalidRequest,
    PayloadTooLarge,
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


class CallmeServerService(Service):
    """Serve registered functions under *server_id* over AMQP.

    ``threading=True`` (callme's ``threaded=True``) runs plain functions in the
    service's own pool of *threads* threads; ``async def`` functions and
    functions returning Deferreds run on the reactor. ``introspection=False``
    turns off the reserved ``__callme__.ping`` / ``__callme__.describe`` calls.

    ``ack="after_reply"`` (default, at-least-once): a request is acked after its
    reply is confirmed, so a server that dies mid-call has it redelivered to
    another instance. ``ack="on_receipt"`` (at-most-once) acks before running.
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
        self._pool = ThreadPool(0, threads, name=self.name) if threading else None
        self.dispatcher = Dispatcher(serializer, reactor=reactor, thread_pool=self._pool)
        if introspection:
            _introspect.install(self.dispatcher, server_id)
        self._session = Session(reactor, self.params, self._prepare, self._lost,
                                name=f"server {server_id!r}", max_body_size=max_body_size,
                                log=log)
        self._replies: ConfirmedPublisher | None = None
        self._consumer: tuple[Channel, str] | None = None
        self._acker: Acker | None = None
        self._in_flight = 0
        self._drained: list[Deferred[None]] = []
        self._stopping = False
        self._fatal: DeclarationRefused | None = None
        self._served = False

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

    def startService(self) -> None:  # noqa: N802
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        self._fatal = None
        self._served = False  # refusals are fatal until the first successful start
        if self._pool is not None:
            self._pool.start()
        self._session.start()

    def when_ready(self) -> Deferred[Connection]:
        """Fires once the server consumes requests; fails with the first
        connection error (BrokerUnreachable, AuthenticationError, TLSError), or
        with :class:`~txcallme.errors.DeclarationRefused` (saying what to do)
        when the broker refuses the server's queue on the first start."""
        if self._fatal is not None:
            return fail(self._fatal)
        return self._session.ready()

    def stopService(self) -> Deferred[None]:  # noqa: N802
        """Stop consuming, let running calls finish and reply, then close.

        Fires when the connection is closed; requests not started are requeued.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._consumer is not None:
            channel, tag = self._consumer
            self._consumer = None
            try:
                await channel.cancel(tag)
            except CallmeError:
                pass
        if self._in_flight:
            log.info("waiting for {n} running calls to finish", n=self._in_flight)
            d: Deferred[None] = Deferred()
            self._drained.append(d)
            d.addTimeout(self.stop_timeout, self._reactor)
            try:
                await d
            except DeferTimeoutError:
                log.error("{n} calls still running after {s} s: closing anyway; the broker "
                          "requeues their requests", n=self._in_flight, s=self.stop_timeout)
        if self._pool is not None:
            self._pool.stop()
        if self._acker is not None:
            self._acker.flush()
        if self._replies is not None:
            await self._replies.close()
        await self._session.stop()

    async def _prepare(self, connection: Connection) -> None:
        decl = self.declarations
        channel = await connection.open_channel()
        await channel.qos(self.prefetch)  # per consumer: global QoS is gone in RabbitMQ 4.3
        acker = Acker(channel, self._reactor)
        try:
            await decl.declare(channel)
            tag = await channel.consume(decl.queue, lambda d: self._request(acker, d))
        except ChannelError as e:
            if e.code not in REFUSAL_CODES:
                raise
            raise self._refused(e) from None
        self._replies = ConfirmedPublisher(connection.open_channel, replay=True)
        self._acker = acker
        self._served = True
        self._consumer = (channel, tag)
        log.info("serving {server_id!r}: {names}", server_id=self.server_id,
                 names=", ".join(self.dispatcher.handlers))

    def _refused(self, error: ChannelError) -> DeclarationRefused:
        refusal = DeclarationRefused(self.server_id, error.code, error.text, refusal_hint(
            error.code, self.declarations, self.params.user, self.params.vhost))
        if not self._served:
            # The first start: fatal. when_ready() fails with it; no retry loop.
            self._fatal = refusal
            log.error("{error} Not retrying: this is the first start.", error=refusal)
            self._reactor.callLater(0, self._session.stop)
        # On a reconnection the session logs it at error and retries with backoff.
        return refusal

    def _lost(self, error: CallmeError) -> None:
        self._consumer = None
        self._replies = None
        self._acker = None

    # -- one request -------------------------------------------------------------

    def _request(self, acker: Acker, delivery: Delivery) -> None:
        tag = delivery.delivery_tag
        acker.received(tag)
        if self._stopping:
            acker.reject(tag, requeue=True)
            return
        if self.ack == "on_receipt":
            acker.ack(tag)
        props = delivery.properties
        reply_to = props.get("reply_to")
        corr = props.get("correlation_id")
        try:
            request = self._decode(delivery)
        except InvalidRequest as e:
            log.warn("bad request (correlation id {corr!r}, reply_to {reply_to!r}): {error}",
                     corr=corr, reply_to=reply_to, error=e)
            if reply_to:
                body = _wire.encode_error(self.serializer, _wire.error_description(e, False))
                self._reply(acker, tag, reply_to, corr, body)
            else:
                self._done(acker, tag)
            return
        if not reply_to:
            log.warn("request {method!r} has no reply_to: not run", method=request.method)
            self._done(acker, tag)
            return
        limit = self.declarations.delivery_limit
        if limit is not None and delivery.redelivered and _delivery_count(props) >= limit:
            log.error("request {method!r} (correlation id {corr!r}) was delivered {n} times "
                      "without an answer (it keeps crashing servers?): answered with an "
                      "error, not run again", method=request.method, corr=corr,
                      n=_delivery_count(props))
            error = DeliveryLimitReached(
                f"{request.method}() was delivered {_delivery_count(props)} times without "
                f"an answer (servers died running it): not run again")
            body = _wire.encode_error(self.serializer, _wire.error_description(error, False))
            self._reply(acker, tag, reply_to, corr, body)
            return
        if request.deadline is not None and time.time() > request.deadline:
            log.info("request {method!r} expired before it started: not run",
                     method=request.method)
            self._done(acker, tag)
            return
        self._in_flight += 1
        d = self.dispatcher.dispatch(request, lambda: CallContext(
            self.server_id, request.method, corr, reply_to, delivery.redelivered,
            request.deadline))
        d.addCallback(lambda body: self._reply(acker, tag, reply_to, corr, body))
        d.addErrback(lambda f: log.failure("dispatch failed", f))
        d.addBoth(self._finished)

    def _done(self, acker: Acker, tag: int) -> None:
        """The request is dealt with: ack it (if not already acked on receipt)."""
        if self.ack == "after_reply":
            acker.ack(tag)

    def _decode(self, delivery: Delivery) -> _wire.Request:
        if delivery.problem:
            if delivery.size > self.max_body_size:
                raise PayloadTooLarge(f"request of {delivery.size} bytes is over the "
                                      f"{self.max_body_size} byte limit")
            raise InvalidRequest(delivery.problem)
        content_type = delivery.properties.get("content_type")
        if content_type and content_type != self.serializer.content_type:
            raise InvalidRequest(f"content type {content_type!r} not accepted; this server "
                                 f"reads {self.serializer.content_type!r}")
        return _wire.decode_request(self.serializer, delivery.body)

    def _reply(self, acker: Acker, tag: int, reply_to: str, corr: Any,
               body: bytes) -> Deferred[None]:
        props: dict[str, Any] = {"content_type": self.serializer.content_type}
        if corr is not None:
            props["correlation_id"] = corr
        replies = self._replies
        if replies is None:  # the connection is gone; the broker will redeliver
            return succeed(None)
        d = replies.publish(reply_to, reply_to, body, props)

        def failed(reason: Any) -> None:
            log.warn("cannot reply to {reply_to!r}: {error}", reply_to=reply_to,
                     error=reason.value)

        d.addErrback(failed)
        d.addCallback(lambda _: self._done(acker, tag))
        return d

    def _finished(self, _: Any) -> None:
        self._in_flight -= 1
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
