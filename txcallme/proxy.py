"""Proxy: call functions on txcallme (and callme) servers; every call returns
a Deferred.

Many calls share one connection and one reply queue; replies are matched by
correlation id (96 random bits, so replies cannot be aimed at a call by
guessing). Requests go out with ``mandatory`` on one confirming channel per
destination server: a call fails with ServerUnavailable only when its own
request came back or was refused; a request the broker took keeps waiting for
its reply (the server may answer over a new connection) until the call's
timeout or until the Proxy's own connection is lost.

Each connection gets reply names of its own; when the broker deletes the reply
queue (or closes its channel) the Proxy fails the calls whose replies may be
lost, declares a new reply queue with backoff, and serves new calls.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcallme import _wire, callme_compat, observe
from txcallme._deadlines import Deadline, Deadlines
from txcallme._destinations import Destination, Sent
from txcallme.amqp import (
    Channel,
    Connection,
    ConnectionParams,
    Delivery,
    Session,
    TLSSettings,
    backoff,
    connection_params,
)
from txcallme.errors import (
    BrokerConnectionLost,
    CallmeError,
    ChannelError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
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
#: Seconds between two checks of one server queue's consumer count.
CONSUMER_CHECK_INTERVAL = 1.0
#: Seconds between two checks (while calls are made) that the reply exchange
#: still exists: deleting it sends no notice to the reply queue's consumer.
REPLY_CHECK_INTERVAL = 2.0
#: request bodies shorter than this are copied to their exact size before they
#: are kept for the call's lifetime
_COPY_BELOW = 64 * 1024


@attrs.define(slots=True, eq=False)
class _ConsumerCheck:
    """What is known of one server id's queue's consumers, and the next check.

    A count of 0 is trusted only once a second passive declare about a second
    later confirms it (RabbitMQ reports 0 for a quorum queue during a leader
    election, and for a queue whose consumers are coming back); only then do
    new calls fail fast, without being published. A request the broker took is
    never failed for a count: its call waits for its reply until its timeout.
    """

    #: when the last passive declare was sent (at most one a second)
    at: float = float("-inf")
    #: the queue was counted with no consumer once; a second count confirms it
    suspect: bool = False
    #: when the no-consumer count was confirmed (None: not confirmed)
    empty_at: float | None = None
    #: a check starts at the next request the broker takes for this server id
    armed: bool = False
    #: a passive declare is under way
    running: bool = False
    #: a call was failed fast since the last declare (so check again)
    demand: bool = False
    #: the delayed call of the next declare (confirmation or refresh)
    timer: Any = None
    #: the last count was 0 (said in the RpcTimeout of calls that waited)
    no_consumer: bool = False

    def reset(self) -> None:
        self.suspect = self.armed = self.running = self.demand = False
        self.empty_at = None
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


@attrs.define(slots=True, eq=False)
class _Call:
    server_id: str
    method: str
    deferred: Deferred[Any]
    timeout: float
    deadline: float
    body: bytes
    entry: Deadline | None = None
    #: where its request is (sent or confirmed); None while it is not out
    destination: Destination | None = None
    observed: observe.Call | None = None
    #: its confirm number on that destination (0: waiting for the channel)
    seq: int = 0
    #: why its request's channel closed before the broker confirmed it (the
    #: request may have been routed: the call waits for its reply)
    unconfirmed: str | None = None


class Proxy:
    """A client for txcallme servers. It connects when created.

    Parameters follow callme's ``Proxy``; ``timeout`` (seconds) is the
    default for every call. ``direct_reply_to=True`` takes replies through
    RabbitMQ's Direct Reply-to (``amq.rabbitmq.reply-to``, consumed no-ack on
    each request channel): no reply exchange or queue is declared, so the
    client needs no configure permission; replies are at-most-once, and a
    request channel that closes loses the replies of its calls (they fail
    with BrokerConnectionLost). Servers reply to it through the default
    exchange.
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
        direct_reply_to: bool = False,
        callme_compat: bool = False,
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
        self.max_body_size = max_body_size
        self.errors = RemoteErrorRegistry()
        #: called with (exchange, queue) each time the Proxy picks new reply
        #: names (a new connection, a re-created reply queue)
        self.on_reply_names: list[Callable[[str, str], None]] = []
        #: replies come through RabbitMQ's Direct Reply-to (no reply queue)
        self.direct_reply_to = direct_reply_to
        #: speak callme 0.2.0's format (pickle, routing key '') to callme Servers
        self.callme_compat = callme_compat
        if callme_compat and direct_reply_to:
            raise ValueError("callme_compat=True cannot use direct_reply_to: callme "
                             "servers declare the reply exchange")
        self.exchange = ""
        self.queue = ""
        if not direct_reply_to:
            check_reply_user(self.params.user)
            self._new_names()
        self._reply_to = _wire.DIRECT_REPLY_TO if direct_reply_to else self.exchange
        self._names_used = False
        self._pending: dict[str, _Call] = {}
        self._deadlines = Deadlines(reactor, self._expire)
        self._unsent: dict[str, None] = {}  # waiting for a connection with a reply queue
        self._retry: dict[str, None] = {}  # returned after a reconnection: sent again soon
        self._retry_timer: Any = None
        self._first: Deferred[Connection] | None = None
        self._destinations: dict[str, Destination] = {}
        self._connection: Connection | None = None
        #: the connection, while its reply queue is consumed
        self._live: Connection | None = None
        self._reply_channel: Channel | None = None
        self._recover_timer: Any = None
        self._recover_attempts = 0
        self._connected_at: float | None = None
        self._checks: dict[str, _ConsumerCheck] = {}
        self._reply_checked_at = float("-inf")
        self._control: Channel | None = None
        self._closed = False
        self._observer = observe.ClientObserver()
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
        BrokerUnreachable, AuthenticationError, BrokerConnectionLost,
        PayloadTooLarge or ProxyClosed. Cancelling the Deferred abandons the
        call: a request not yet published is never published; one already
        published is not withdrawn (the server may still run it; its reply is
        dropped).
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
        deadline = self._reactor.seconds() + timeout
        try:
            if self.callme_compat:  # TypeError for keyword arguments
                body = callme_compat.encode_request(method, args, kwargs)
            else:
                body = _wire.encode_request(self.serializer, _wire.Request(
                    method, list(args), dict(kwargs or {}), time.time() + timeout))
        except (CallmeError, TypeError) as e:
            return fail(e)
        if len(body) < _COPY_BELOW:
            # kept until the reply (for a re-publish): orjson's bytes keep their whole
            # buffer (about 4 KiB however short); an exact copy costs ~1 us
            body = bytes(memoryview(body))
        corr = os.urandom(12).hex()  # 96 random bits: not guessable
        d: Deferred[Any] = Deferred(lambda _: self._forget(corr))
        call = _Call(server_id, method, d, timeout, deadline, body)
        observed = self._observer.client_call(server_id, method, corr)
        if observed.live:  # the span and metrics end when d fires
            call.observed = observed
            d.addBoth(observed.done)
        self._pending[corr] = call
        call.entry = self._deadlines.add(deadline, corr)
        if self._live is not None:
            self._publish(corr, call)
        else:
            self._wait(corr)
        return d

    def close(self) -> Deferred[None]:
        """Fail calls in flight with ProxyClosed and close the connection.

        Fires when the connection is closed; nothing of the Proxy is left in
        the reactor afterwards.
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        for corr in list(self._pending):
            self._fail(corr, Failure(ProxyClosed("the proxy was closed")))
        for destination in self._destinations.values():
            destination.close()
        self._destinations.clear()
        self._deadlines.clear()
        self._cancel_timers()
        for check in self._checks.values():
            check.reset()
        return self._session.stop()

    def when_ready(self) -> Deferred[Connection]:
        """Fires when connected and consuming replies (first connect fails fast)."""
        return self._session.ready()

    @property
    def pending_count(self) -> int:
        """Calls waiting for a reply."""
        return len(self._pending)

    # -- connections and the reply queue ---------------------------------------

    def _new_names(self) -> None:
        uid = uuid.uuid4().hex
        self.exchange = self._reply_to = _wire.client_exchange(self.params.user, uid)
        self.queue = _wire.client_queue(self.params.user, uid)
        for callback in self.on_reply_names:
            callback(self.exchange, self.queue)

    async def _prepare(self, connection: Connection) -> None:
        self._connection = connection
        self._destinations = {}
        if self.direct_reply_to:  # each request channel consumes its own replies
            self._live = connection
        else:
            await self._consume_replies(connection)
        # a grace period for servers to come back applies to reconnections only
        self._connected_at = self._reactor.seconds() if self._session.ever_connected else None
        if self._session.ever_connected:
            self._observer.reconnected()
        self._flush()

    async def _consume_replies(self, connection: Connection) -> None:
        """Declare fresh reply names on *connection* and consume them."""
        if self._names_used:  # never the same exclusive queue name twice (405 LOCKED)
            self._new_names()
        self._names_used = True
        exchange, queue = self.exchange, self.queue
        channel = await connection.open_channel()
        try:
            await channel.declare_exchange(exchange, "direct", auto_delete=True)
            await channel.declare_queue(queue, exclusive=True, auto_delete=True)
            await channel.bind_queue(queue, exchange, exchange)
            if self.callme_compat:  # callme servers reply with routing key ''
                await channel.bind_queue(queue, exchange, callme_compat.ROUTING_KEY)
            await channel.consume(queue, self._reply, no_ack=True, exclusive=True)
        except BaseException:
            channel.close()
            raise
        channel.on_consumer_cancelled = lambda tag: self._replies_lost(
            channel, "the broker cancelled its consumer (queue deleted?)")
        channel.on_close.append(lambda error: self._reply_channel_closed(channel, error))
        self._reply_channel = channel
        self._live = connection

    def _reply_channel_closed(self, channel: Channel, error: CallmeError) -> None:
        # a connection that drops or closes closes every channel: _lost handles that
        if isinstance(error, ChannelError) and error.code < 500 and error.code != 320:
            self._replies_lost(channel, f"the broker closed its channel: {error}")

    def _replies_lost(self, channel: Channel, why: str) -> None:
        if channel is not self._reply_channel or self._closed:
            return
        self._reply_channel = None
        connection, self._live = self._live, None
        queue = self.queue
        log.warn("reply queue {queue} lost: {why}; failing {n} calls whose replies may be "
                 "lost and declaring a new reply queue", queue=queue, why=why,
                 n=sum(1 for c in self._pending.values() if c.destination is not None))
        error = BrokerConnectionLost(
            f"the Proxy's reply queue {queue} was lost ({why}): the reply to this call "
            "may be lost")
        for corr, call in list(self._pending.items()):
            if call.destination is not None:
                self._fail(corr, Failure(error))
        if not channel.closed:
            channel.close()
        if connection is not None and not connection.lost:
            self._schedule_recover(connection)

    def _schedule_recover(self, connection: Connection) -> None:
        self._recover_attempts += 1
        delay = backoff(self._recover_attempts, initial=0.1)
        self._recover_timer = self._reactor.callLater(delay, self._recover, connection)

    def _recover(self, connection: Connection) -> None:
        self._recover_timer = None
        if self._closed or connection is not self._connection or connection.lost:
            return

        def done(_: Any) -> None:
            self._recover_attempts = 0
            log.info("new reply queue {queue} consumed", queue=self.queue)
            self._flush()

        def failed(reason: Failure) -> None:
            if self._closed or connection is not self._connection or connection.lost:
                return
            log.warn("cannot declare a new reply queue: {error}; retrying",
                     error=reason.value)
            self._schedule_recover(connection)

        Deferred.fromCoroutine(self._consume_replies(connection)).addCallbacks(done, failed)

    def _lost(self, error: CallmeError) -> None:
        self._connection = None
        self._control = None
        self._live = None
        self._reply_channel = None
        self._destinations = {}
        if self._recover_timer is not None and self._recover_timer.active():
            self._recover_timer.cancel()
        self._recover_timer = None
        for check in self._checks.values():  # counted again on the next connection
            check.reset()
        for corr, call in list(self._pending.items()):
            if call.destination is not None:
                self._fail(corr, Failure(error))
        # calls waiting to be published again go out on the next connection
        if self._retry_timer is not None and self._retry_timer.active():
            self._retry_timer.cancel()
        self._retry_timer = None
        retry, self._retry = self._retry, {}
        for corr in retry:
            if corr in self._pending:
                self._unsent[corr] = None

    def _cancel_timers(self) -> None:
        for timer in (self._retry_timer, self._recover_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._retry_timer = self._recover_timer = None
        self._retry.clear()
        self._unsent.clear()

    # -- publishing --------------------------------------------------------------

    def _wait(self, corr: str) -> None:
        """Publish when a connection with a reply queue is there."""
        self._unsent[corr] = None
        if not self._session.ever_connected and self._first is None:
            # before the first connection, calls fail with its error
            self._first = d = self._session.ready()
            d.addCallbacks(self._first_done, self._first_failed)

    def _first_done(self, connection: Connection) -> None:
        self._first = None
        self._flush()

    def _first_failed(self, reason: Failure) -> None:
        self._first = None
        unsent, self._unsent = self._unsent, {}
        for corr in unsent:
            self._fail(corr, reason)

    def _flush(self) -> None:
        if self._live is None or not self._unsent:
            return
        unsent, self._unsent = self._unsent, {}
        for corr in unsent:
            call = self._pending.get(corr)
            if call is None:
                continue
            if self._live is None:  # lost while publishing
                self._unsent[corr] = None
            else:
                self._publish(corr, call)

    def _publish(self, corr: str, call: _Call) -> None:
        connection = self._live
        assert connection is not None
        server_id = call.server_id
        check = self._checks.get(server_id)
        now = self._reactor.seconds()
        if check is None:
            check = self._checks[server_id] = _ConsumerCheck()
        elif check.empty_at is not None:
            # confirmed twice that nobody consumes it: fail fast, publish nothing
            check.demand = True
            self._fail(corr, Failure(self._no_consumer(server_id)))
            return
        destination = self._destinations.get(call.server_id)
        if destination is None or destination.dead:
            destination = self._destinations[call.server_id] = Destination(
                connection, _wire.server_exchange(call.server_id),
                callme_compat.ROUTING_KEY if self.callme_compat else call.server_id,
                self._returned, self._refused, self._destination_closed,
                replies=self._reply if self.direct_reply_to else None, taken=self._taken,
                lost=self._unconfirmed)
        call.destination = destination
        call.seq = 0
        call.unconfirmed = None
        # a server queue that takes requests may have no consumer: count them
        # (once the broker has taken this request, so missing queues, whose
        # requests come back, are never declared passively)
        if not (check.armed or check.running or check.timer is not None) \
                and now - check.at >= CONSUMER_CHECK_INTERVAL and not self._in_grace(now):
            check.armed = True
            destination.want_taken = True
        remaining = call.deadline - now
        call.seq = destination.send(corr, call.body, {
            "content_type": callme_compat.CONTENT_TYPE if self.callme_compat
            else self.serializer.content_type, "correlation_id": corr,
            "reply_to": self._reply_to, "expiration": str(max(1, int(remaining * 1000))),
            "headers": call.observed.headers() if call.observed is not None else None})
        if now - self._reply_checked_at >= REPLY_CHECK_INTERVAL and not self.direct_reply_to:
            self._check_reply_exchange(connection, now)

    def _taken(self, destination: Destination) -> None:
        check = self._checks.get(_server_id(destination))
        if check is not None and check.armed and not check.running:
            check.armed = False
            self._start_count(_server_id(destination), check)

    def _start_count(self, server_id: str, check: _ConsumerCheck) -> None:
        connection = self._live
        if connection is None or self._closed:
            check.reset()
            return
        check.at = self._reactor.seconds()
        check.running = True
        check.demand = False
        Deferred.fromCoroutine(self._count_consumers(connection, server_id, check))

    def _recount(self, server_id: str, check: _ConsumerCheck) -> None:
        """The confirmation (or, while confirmed, the refresh) a second later."""
        check.timer = None
        if check.empty_at is not None and not check.demand:
            check.reset()  # no call wanted it since: the next call is published
            return
        self._start_count(server_id, check)

    # -- checks with passive declares ------------------------------------------

    def _check_reply_exchange(self, connection: Connection, now: float) -> None:
        self._reply_checked_at = now
        Deferred.fromCoroutine(self._reply_exchange_exists(connection))

    async def _reply_exchange_exists(self, connection: Connection) -> None:
        """Passive exchange.declare of the reply exchange; if it is gone, the
        replies to every call out are lost: handle it as a lost reply queue."""
        channel = self._reply_channel
        exchange = self.exchange
        try:
            control = await self._control_channel(connection)
            await control.declare_exchange(exchange, "direct", passive=True)
        except NotFound:
            if channel is not None and channel is self._reply_channel:
                self._replies_lost(channel, f"its exchange {exchange} was deleted")
        except CallmeError:
            pass


    @staticmethod
    def _no_consumer(server_id: str) -> ServerUnavailable:
        return ServerUnavailable(server_id, f"no server consumes its queue "
                                 f"{_wire.server_queue(server_id)}")

    async def _control_channel(self, connection: Connection) -> Channel:
        """The channel for passive declares (one per connection; reopened after
        a 404 closed it)."""
        channel = self._control
        if channel is None or channel.closed or channel.connection is not connection:
            channel = await connection.open_channel()
            current = self._control
            if current is not None and not current.closed and current.connection is connection:
                channel.close()  # another check opened one meanwhile
                return current
            self._control = channel
        return channel

    async def _count_consumers(self, connection: Connection, server_id: str,
                               check: _ConsumerCheck) -> None:
        """A passive queue.declare of *server_id*'s queue. A first count of 0
        is confirmed by a second one about a second later; only a confirmed 0
        makes new calls fail fast (and is refreshed each second while they
        come). Calls already published are never failed for it."""
        count: int | None = None
        try:
            channel = await self._control_channel(connection)
            declared = await channel.declare_queue(_wire.server_queue(server_id), passive=True)
            count = declared.consumer_count
        except CallmeError:  # no such queue (requests come back as returns), or lost
            pass
        check.running = False
        check.no_consumer = count == 0
        if self._closed or count is None or count:
            check.reset()
            return
        if check.empty_at is None and not check.suspect:
            check.suspect = True  # 0 once: maybe an election, or consumers coming back
        else:
            check.empty_at = self._reactor.seconds()
        check.timer = self._reactor.callLater(
            CONSUMER_CHECK_INTERVAL, self._recount, server_id, check)

    def _returned(self, destination: Destination, corr: str) -> None:
        call = self._pending.get(corr)
        if call is None or call.destination is not destination:
            return
        call.destination = None
        if not self._retry_after_reconnect(corr):
            self._fail(corr, Failure(ServerUnavailable(call.server_id, "no queue is bound")))

    def _refused(self, destination: Destination, sent: list[Sent], error: CallmeError) -> None:
        server_id = _server_id(destination)
        if isinstance(error, NotFound):
            error = ServerUnavailable(server_id, f"exchange {destination.exchange} not found")
        elif not isinstance(error, (ChannelError, BrokerConnectionLost)):
            error = ServerUnavailable(server_id, str(error))
        unroutable = isinstance(error, ServerUnavailable)
        for _, corr in sent:
            call = self._pending.get(corr)
            if call is None or call.destination is not destination:
                continue
            call.destination = None
            if not (unroutable and self._retry_after_reconnect(corr)):
                self._fail(corr, Failure(error))

    def _unconfirmed(self, destination: Destination, sent: list[Sent],
                     error: CallmeError) -> None:
        """The broker closed the request channel before it confirmed these
        requests: they may have been routed (and may be running), so their
        calls keep waiting for their replies until their own timeouts."""
        n = 0
        for _, corr in sent:
            call = self._pending.get(corr)
            if call is not None and call.destination is destination:
                call.unconfirmed = str(error)
                n += 1
        if n:
            log.info("the request channel to {server_id} closed ({error}) before the broker "
                     "confirmed {n} requests, which may have been routed: their calls wait "
                     "for their replies", server_id=_server_id(destination), error=error, n=n)

    def _in_grace(self, now: float) -> bool:
        return self._connected_at is not None and now - self._connected_at <= RECONNECT_GRACE

    def _retry_after_reconnect(self, corr: str) -> bool:
        """Just after a reconnection the servers may not be back yet (a restarted
        broker loses their queues): publish again shortly instead of failing."""
        if not self._in_grace(self._reactor.seconds()):
            return False
        self._retry[corr] = None
        if self._retry_timer is None:
            self._retry_timer = self._reactor.callLater(RETRY_DELAY, self._republish)
        return True

    def _republish(self) -> None:
        self._retry_timer = None
        retry, self._retry = self._retry, {}
        self._unsent.update(retry)
        self._flush()

    def _destination_closed(self, destination: Destination, error: CallmeError) -> None:
        if self._destinations.get(_server_id(destination)) is destination:
            del self._destinations[_server_id(destination)]
        check = self._checks.get(_server_id(destination))
        if destination.want_taken and check is not None and check.armed:
            check.armed = False  # its count waited for a request this channel never took
        if self.direct_reply_to and not self._closed:
            # the channel was also where the replies came: those are lost
            lost = BrokerConnectionLost(
                f"the channel of this call's request closed before its reply ({error}); "
                "with Direct Reply-to the reply is lost")
            for corr, call in list(self._pending.items()):
                if call.destination is destination:
                    self._fail(corr, Failure(lost))

    # -- the end of a call -----------------------------------------------------

    def _finish(self, corr: str) -> _Call | None:
        """Take *corr* out of every per-call structure; return its call."""
        call = self._pending.pop(corr, None)
        if call is None:
            return None
        if call.entry is not None:
            self._deadlines.remove(call.entry)
            call.entry = None
        if self._unsent:
            self._unsent.pop(corr, None)
        if self._retry:
            self._retry.pop(corr, None)
        destination = call.destination
        if destination is not None:
            destination.withdraw(corr, call.seq)  # not written yet: never write it
        return call

    def _expire(self, corr: str) -> None:
        call = self._pending.get(corr)
        if call is not None:
            call.entry = None  # already out of the heap
            self._finish(corr)
            error = RpcTimeout(call.server_id, call.method, call.timeout)
            connection = self._connection
            now = self._reactor.seconds()
            if call.destination is not None and self._live is not None \
                    and not self.direct_reply_to \
                    and now - self._reply_checked_at >= CONSUMER_CHECK_INTERVAL:
                self._check_reply_exchange(self._live, now)  # was the reply lost?
            if call.unconfirmed is not None:
                error.args = (f"{error}: the channel of its request closed before the broker "
                              f"confirmed it ({call.unconfirmed}); the server may have run "
                              "it",)
            check = self._checks.get(call.server_id)
            if check is not None and check.no_consumer:
                error.args = (f"{error}: its server queue "
                              f"{_wire.server_queue(call.server_id)} had no consumer "
                              "when last checked",)
            blocked = connection.blocked_reason if connection is not None else None
            if blocked is not None:
                error.args = (f"{error}: the broker is blocking publishes on this "
                              f"connection ({blocked})",)
            call.deferred.errback(error)

    def _forget(self, corr: str) -> None:
        self._finish(corr)

    def _fail(self, corr: str, reason: Failure) -> None:
        call = self._finish(corr)
        if call is not None and not call.deferred.called:
            call.deferred.errback(reason)

    def _reply(self, delivery: Delivery) -> None:
        if delivery.exchange != self.exchange:
            log.debug("dropping a reply sent to an old reply exchange {exchange}",
                      exchange=delivery.exchange)
            return
        corr = delivery.properties.get("correlation_id")
        call = self._finish(corr) if isinstance(corr, str) else None
        if call is None:
            log.info("dropping a reply for no pending call (late or foreign), "
                     "correlation id {corr!r}", corr=corr)
            return
        if delivery.problem:
            if delivery.size > self.max_body_size:
                call.deferred.errback(PayloadTooLarge(
                    f"the reply to {call.server_id}.{call.method} is {delivery.size} bytes, "
                    f"over this Proxy's max_body_size of {self.max_body_size} bytes (caller "
                    "side; the server sent it): raise Proxy(max_body_size=...) or return "
                    "less"))
            else:
                call.deferred.errback(InvalidRequest(f"unreadable reply: {delivery.problem}"))
        elif self.callme_compat and \
                delivery.properties.get("content_type") == callme_compat.CONTENT_TYPE:
            callme_compat.settle(call.deferred, self.errors, delivery.body)
        else:
            settle(call.deferred, self.serializer, self.errors, delivery.body)


def check_reply_user(user: str) -> str:
    """Refuse an AMQP user name that makes the reply object names longer than
    AMQP's 255 bytes (they carry the user name and a 32-character uid): the
    Proxy could never declare them. Direct Reply-to declares none."""
    name = _wire.client_queue(user, "0" * 32)  # the longer of the two names
    size = len(name.encode("utf-8"))
    if size > 255:
        limit = 255 - (size - len(user.encode("utf-8")))
        raise ValueError(
            f"the AMQP user name is {len(user.encode('utf-8'))} bytes (UTF-8): this Proxy's "
            f"reply queue name client_<user>_queue_<uid> would be {size} bytes, over AMQP's "
            f"limit of 255; use a user name of at most {limit} bytes, or "
            "direct_reply_to=True (no reply objects are declared)")
    return user


def _server_id(destination: Destination) -> str:
    """The server id a destination sends to (its routing key is ``''`` for callme)."""
    return destination.exchange[len("server_"):-len("_ex")]


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



