"""What the server declares: queues RabbitMQ 4.3 accepts (durable or exclusive), queue
types, per-consumer prefetch only, and refusals reported clearly."""

from __future__ import annotations

import json
import time
from typing import Any

import conftest
import pytest
import pytest_twisted
from _brokerctl import ctl
from conftest import Services, broker_connect, sleep
from scripted import ScriptedBroker
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import LogLevel, capturedLogs, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import txcallme
from txcallme import _wire
from txcallme.amqp import session as session_module
from txcallme.amqp.session import Session
from txcallme.errors import ChannelError, DeclarationRefused, DeliveryLimitReached
from txcallme.service import ServerDeclarations, refusal_hint

QUEUE_COLUMNS = ("name", "durable", "exclusive", "auto_delete", "arguments")


def _list_json(what: str, *columns: str) -> list[dict[str, Any]]:
    out = ctl(what, "-p", "/", *columns, "--formatter", "json")
    return list(json.loads(out or "[]"))


async def queues() -> dict[str, dict[str, Any]]:
    """``rabbitmqctl list_queues name durable exclusive auto_delete arguments``, by name."""
    rows = await threads.deferToThread(_list_json, "list_queues", *QUEUE_COLUMNS)
    for row in rows:
        row["arguments"] = {name: value for name, _, value in row["arguments"]}
    return {row["name"]: row for row in rows}


def _transient_non_exclusive(rows: dict[str, dict[str, Any]]) -> list[str]:
    """txcallme queues RabbitMQ 4.3 would refuse (541): neither durable nor exclusive."""
    return sorted(name for name, row in rows.items()
                  if name.startswith(conftest.LEAK_PREFIXES)
                  and row["durable"] is not True and row["exclusive"] is not True)


async def delete_queue(name: str) -> None:
    """Delete a queue (a durable or quorum one this test made) and its exchange."""
    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        await channel.delete_queue(name)
        await channel.delete_exchange(name.replace("_queue", "_ex"))
        await channel.close()
    finally:
        await connection.close()


@pytest_twisted.ensureDeferred
async def test_every_queue_is_durable_or_exclusive(services: Services) -> None:
    """After the main scenarios, no txcallme queue is transient and non-exclusive."""
    classic, kept, quorum = (conftest.new_server_id() for _ in range(3))
    add = {"add": lambda a, b: a + b}
    await services.start_server(classic, add)
    await services.start_server(classic, add, threading=True, threads=2)  # 2nd instance
    await services.start_server(kept, add, durable=True)
    await services.start_server(quorum, add, queue_type="quorum")
    proxy = await services.ready_proxy()
    try:
        for server_id in (classic, kept, quorum):
            assert await proxy.use_server(server_id).add(2, 3) == 5
        assert await proxy.call(classic, "__callme__.ping") is not None
        rows = await queues()
        ours = [_wire.server_queue(s) for s in (classic, kept, quorum)] + [proxy.queue]
        assert sorted(set(ours) - set(rows)) == []  # the listing shows every queue of ours
        assert _transient_non_exclusive(rows) == []
        assert rows[_wire.server_queue(classic)]["durable"] is True
        assert rows[_wire.server_queue(classic)]["auto_delete"] is True
        assert rows[_wire.server_queue(kept)]["auto_delete"] is False
        assert rows[proxy.queue]["exclusive"] is True
        assert rows[_wire.server_queue(quorum)]["arguments"]["x-queue-type"] == "quorum"
    finally:
        for svc in services.servers:
            await svc.stopService()
        await delete_queue(_wire.server_queue(kept))
        await delete_queue(_wire.server_queue(quorum))


@pytest_twisted.ensureDeferred
async def test_stopped_classic_server_fails_fast(services: Services, sid: str) -> None:
    """The default queue goes with the last instance: a later call is ServerUnavailable."""
    svc = await services.start_server(sid, {"one": lambda: 1})
    proxy = await services.ready_proxy(timeout=20)
    assert await proxy.call(sid, "one") == 1
    await svc.stopService()
    for _ in range(50):  # the broker deletes the auto-delete queue asynchronously
        if _wire.server_queue(sid) not in await queues():
            break
        await sleep(0.1)
    started = time.monotonic()
    with pytest.raises(txcallme.ServerUnavailable):
        await proxy.call(sid, "one")
    assert time.monotonic() - started < 10  # not the 20 s timeout


@pytest_twisted.ensureDeferred
async def test_quorum_queue_arguments_and_lease(services: Services, sid: str) -> None:
    """queue_type='quorum' declares a quorum queue with an x-expires lease and a delivery
    limit; it outlives its last instance until the lease runs out."""
    queue = _wire.server_queue(sid)
    try:
        svc = await services.start_server(sid, {"one": lambda: 1}, queue_type="quorum",
                                          queue_expires=3, delivery_limit=4)
        row = (await queues())[queue]
        assert row["durable"] is True and row["auto_delete"] is False
        assert row["arguments"] == {"x-queue-type": "quorum", "x-expires": 3000,
                                    "x-delivery-limit": 4}
        await svc.stopService()
        assert queue in await queues()  # still there: the lease, not auto-delete
        for _ in range(100):
            if queue not in await queues():
                break
            await sleep(0.2)
        assert queue not in await queues()
    finally:
        await delete_queue(queue)


@pytest_twisted.ensureDeferred
async def test_quorum_delivery_limit_answers_a_poison_request(services: Services,
                                                               sid: str) -> None:
    """A request whose server dies every time runs delivery_limit times, then the caller
    gets DeliveryLimitReached instead of endless retries."""
    runs: list[bool] = []
    svc: txcallme.CallmeServerService | None = None

    def crash() -> Any:
        runs.append(True)
        assert svc is not None and svc._session.connection is not None
        transport = svc._session.connection.protocol.transport
        reactor.callLater(0, transport.abortConnection)  # the server "dies" mid-call
        return Deferred()  # never answered

    try:
        svc = await services.start_server(sid, {"crash": crash}, queue_type="quorum",
                                          delivery_limit=2, stop_timeout=1)  # never end
        proxy = await services.ready_proxy(timeout=60)
        with pytest.raises(DeliveryLimitReached) as info:
            await proxy.call(sid, "crash")
        assert "not run again" in str(info.value)  # rebuilt as itself (allow-listed)
        assert len(runs) == 2
    finally:
        if svc is not None:
            await svc.stopService()
        await delete_queue(_wire.server_queue(sid))


@pytest_twisted.ensureDeferred
async def test_prefetch_is_per_consumer(services: Services, sid: str) -> None:
    """The server's prefetch is a per-consumer limit; no channel of it uses global QoS."""
    await services.start_server(sid, {"one": lambda: 1}, prefetch=7)
    consumers = await threads.deferToThread(
        _list_json, "list_consumers", "queue_name", "channel_pid", "prefetch_count")
    ours = [c for c in consumers if c["queue_name"] == _wire.server_queue(sid)]
    assert [c["prefetch_count"] for c in ours] == [7]
    channels = await threads.deferToThread(
        _list_json, "list_channels", "pid", "global_prefetch_count")
    by_pid = {c["pid"]: c for c in channels}
    assert by_pid[ours[0]["channel_pid"]]["global_prefetch_count"] == 0


class DeclarationFlagsTests(SynchronousTestCase):
    """ServerDeclarations.for_server: the flags of each configuration."""

    def test_classic_default_is_durable_auto_delete(self) -> None:
        """Default: a durable, auto-delete queue (accepted by 4.3, gone with its last consumer)."""
        d = ServerDeclarations.for_server("x")
        self.assertEqual((d.queue, d.queue_durable, d.queue_auto_delete, d.queue_arguments),
                         ("server_x_queue", True, True, {}))
        self.assertEqual((d.exchange_durable, d.exchange_auto_delete), (False, True))
        self.assertIsNone(d.delivery_limit)

    def test_classic_durable_stays(self) -> None:
        """durable=True: exchange and queue durable and not auto-delete, as before."""
        d = ServerDeclarations.for_server("x", durable=True)
        self.assertEqual((d.exchange_durable, d.exchange_auto_delete, d.queue_durable,
                          d.queue_auto_delete), (True, False, True, False))

    def test_quorum(self) -> None:
        """quorum: durable, not auto-delete, with x-expires (ms) and x-delivery-limit."""
        d = ServerDeclarations.for_server("x", queue_type="quorum", queue_expires=1.5,
                                          delivery_limit=3)
        self.assertEqual((d.queue_durable, d.queue_auto_delete, d.delivery_limit),
                         (True, False, 3))
        self.assertEqual(d.queue_arguments, {"x-queue-type": "quorum", "x-expires": 1500,
                                             "x-delivery-limit": 3})

    def test_bad_options(self) -> None:
        """Unknown queue types and non-positive leases or limits are refused."""
        for kw in ({"queue_type": "stream"}, {"queue_type": "quorum", "queue_expires": 0},
                   {"queue_type": "quorum", "delivery_limit": 0},
                   {"queue_type": "quorum", "delivery_limit": True}):
            with self.assertRaises(ValueError):
                ServerDeclarations.for_server("x", **kw)  # type: ignore[arg-type]


# --- refusals ------------------------------------------------------------------------


async def declare_old_queue(server_id: str) -> None:
    """The queue as txcallme 0.x declared it: transient, auto-delete (never consumed, so
    it stays)."""
    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        await channel.declare_queue(_wire.server_queue(server_id), auto_delete=True)
        await channel.close()
    finally:
        await connection.close()


class ErrorLog:
    """Collects error-level events of the server's logger while installed."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.error and \
                str(event.get("log_namespace", "")).startswith("callme."):
            self.events.append(event)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


@pytest_twisted.ensureDeferred
async def test_inequivalent_queue_on_first_start_is_fatal(services: Services, sid: str) -> None:
    """406 on the first start: when_ready() fails with DeclarationRefused that names the
    queue and says how to migrate, and the server stops retrying."""
    await declare_old_queue(sid)
    try:
        svc = services.server(sid, {"one": lambda: 1})
        with pytest.raises(DeclarationRefused) as info:
            await svc.when_ready()
        message = str(info.value)
        assert info.value.code == 406
        assert _wire.server_queue(sid) in message and "rabbitmqctl delete_queue" in message
        await sleep(1.5)  # no retry loop: nothing reconnects
        assert not svc._session.running
        with pytest.raises(DeclarationRefused):
            await svc.when_ready()  # later callers get the same clear error
    finally:
        await delete_queue(_wire.server_queue(sid))


@pytest_twisted.ensureDeferred
async def test_access_refused_on_first_start_names_the_permission_line(
        services: Services, sid: str) -> None:
    """403 on the first start: the error gives the set_permissions line to run."""
    user, password = f"t-decl-{sid}", "pw"
    await threads.deferToThread(ctl, "add_user", user, password)
    try:
        await threads.deferToThread(ctl, "set_permissions", "-p", "/", user, "^$", ".*", ".*")
        svc = services.server(sid, {"one": lambda: 1}, amqp_user=user, amqp_password=password)
        with pytest.raises(DeclarationRefused) as info:
            await svc.when_ready()
        assert info.value.code == 403
        assert (f'rabbitmqctl set_permissions -p / {user} "server_{sid}_.*"'
                in str(info.value)), str(info.value)
    finally:
        await threads.deferToThread(ctl, "delete_user", user)


@pytest_twisted.ensureDeferred
async def test_refusal_on_reconnection_is_logged_and_retried(services: Services,
                                                              sid: str) -> None:
    """406 after a reconnection is logged at error and retried with backoff until the
    conflicting queue is gone; then the server serves again."""
    errors = ErrorLog()
    svc = await services.start_server(sid, {"one": lambda: 1})
    proxy = await services.ready_proxy(timeout=30)
    globalLogPublisher.addObserver(errors)
    try:
        # an operator re-creates the queue with other flags, then the connection drops
        connection = svc._session.connection
        assert connection is not None
        await delete_queue(_wire.server_queue(sid))
        await declare_old_queue(sid)
        connection.protocol.transport.abortConnection()
        for _ in range(100):
            if any("406" in t for t in errors.texts()):
                break
            await sleep(0.1)
        assert any("406" in t and "retrying" in t for t in errors.texts()), errors.texts()
        assert svc._session.running  # still trying: not the first start
        await delete_queue(_wire.server_queue(sid))
        await svc.when_ready()
        assert await proxy.call(sid, "one") == 1
    finally:
        globalLogPublisher.removeObserver(errors)


def test_refusal_hints() -> None:
    """Each refusal code gets advice naming the option, the permission or the migration."""
    decl = ServerDeclarations.for_server("foo")
    assert "set_permissions -p v carl" in refusal_hint(403, decl, "carl", "v")
    assert "delete_queue -p v server_foo_queue" in refusal_hint(406, decl, "carl", "v")
    assert "another server id" in refusal_hint(405, decl, "carl", "v")
    assert "queue_type" in refusal_hint(541, decl, "carl", "v")


@pytest.mark.parametrize("threading", [False, True])
@pytest_twisted.ensureDeferred
async def test_stop_after_refused_first_start_fires_and_log_is_consistent(
        services: Services, sid: str, threading: bool) -> None:
    """After when_ready() failed with DeclarationRefused, stopService() fires at once
    and the error log says "not retrying" with no "retrying in" after it."""
    await declare_old_queue(sid)
    errors = ErrorLog()
    globalLogPublisher.addObserver(errors)
    try:
        svc = services.server(sid, {"one": lambda: 1}, threading=threading)
        with pytest.raises(DeclarationRefused):
            await svc.when_ready()
        stopped = svc.stopService()
        timer = reactor.callLater(5, stopped.cancel)
        await stopped  # CancelledError here: the stop hung
        assert timer.active()
        timer.cancel()
        texts = errors.texts()
        assert any("Not retrying" in t for t in texts), texts
        assert not any("retrying in" in t for t in texts), texts
    finally:
        globalLogPublisher.removeObserver(errors)
        await delete_queue(_wire.server_queue(sid))


# --- refusals over the scripted broker (a Clock; no RabbitMQ) ------------------------

#: What RabbitMQ 4.3 answers a transient non-exclusive queue.declare with (connection.close).
TEXT_541 = ("INTERNAL_ERROR - Feature `transient_nonexcl_queues` is deprecated. Its use is "
            "not permitted per the configuration")
#: What RabbitMQ answers when another connection holds the queue exclusively (channel.close).
TEXT_405 = ("RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
            "'server_foo_queue' in vhost '/'")
#: (code, text, connection-level close, words of the hint that says what to do)
REFUSALS = {
    541: (541, TEXT_541, True, ("transient_nonexcl_queues", "queue_type='classic'",
                                "check_if_any_deprecated_features_are_used")),
    405: (405, TEXT_405, False, ("locked by another connection", "another server id")),
}


def _ours(args: dict[str, Any]) -> bool:
    return bool(args["queue"] == "server_foo_queue")


class Events:
    """Warn-and-above events of the callme loggers, in order, as (level, text)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn and \
                str(event.get("log_namespace", "")).startswith("callme."):
            self.seen.append((event["log_level"].name, formatEvent(event)))

    def __enter__(self) -> Events:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)

    def texts(self, level: str | None = None) -> list[str]:
        return [t for lvl, t in self.seen if level is None or lvl == level]


@implementer(IStreamClientEndpoint)
class _TimedEndpoint:
    """The scripted broker's endpoint, recording the clock time of every connect."""

    def __init__(self, broker: ScriptedBroker, times: list[float]) -> None:
        self.broker, self.times = broker, times

    def connect(self, factory: Any) -> Any:
        self.times.append(self.broker.clock.seconds())
        return self.broker.connector(None).connect(factory)


def scripted_server(broker: ScriptedBroker, connects: list[float]) -> txcallme.CallmeServerService:
    """Server 'foo' (default classic queue) over *broker*; its connects go to *connects*."""
    params = broker.params(connector=lambda reactor: _TimedEndpoint(broker, connects))
    svc = txcallme.CallmeServerService("foo", params=params, reactor=broker.clock)
    svc.register_function(lambda: 1, "one")
    return svc


def _outcome(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "has not fired"
    return results[0]


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_refusal_on_first_start_is_fatal_scripted(code: int) -> None:
    """541 (connection.close, as RabbitMQ 4.3 answers a transient non-exclusive queue) or
    405 (channel.close) answering the server's queue.declare on the first start:
    when_ready() fails with DeclarationRefused carrying the hint, it is logged once at
    error with "Not retrying", and nothing reconnects (one connect in two minutes)."""
    code, text, whole_connection, hint_words = REFUSALS[code]
    broker, connects = ScriptedBroker(), []
    broker.refuse("queue.declare", code, text, connection=whole_connection, times=None,
                  when=_ours)
    svc = scripted_server(broker, connects)
    with Events() as events:
        svc.startService()
        ready = svc.when_ready()
        broker.advance(120)
    failure = _outcome(ready)
    assert isinstance(failure, Failure) and failure.check(DeclarationRefused), failure
    error = failure.value
    assert (error.code, error.text) == (code, text)
    for words in hint_words:
        assert words in error.hint and words in str(error), (words, str(error))
    assert connects == [0.0]  # no reconnect attempt
    assert not svc._session.running and not svc.consuming
    assert broker.clock.getDelayedCalls() == []  # no retry scheduled
    assert not broker.peer.connected  # the connection is closed, by whichever side
    assert [t for t in events.texts("error") if "Not retrying" in t] == \
        [f"{error} Not retrying: this is the first start."]
    assert not any("retrying in" in t for t in events.texts()), events.seen
    assert isinstance(_outcome(svc.when_ready()).value, DeclarationRefused)  # callers after
    assert _outcome(svc.stopService()) is None


def test_fatal_541_does_not_log_reconnecting() -> None:
    """After "Not retrying" for a 541 on the first start, the broker's close of the
    connection is not reported as "lost the connection ...; reconnecting": the session
    is stopped from inside the set-up, before the close arrives."""
    broker, connects = ScriptedBroker(), []
    broker.refuse("queue.declare", 541, TEXT_541, connection=True, when=_ours)
    svc = scripted_server(broker, connects)
    with Events() as events:
        svc.startService()
        ready = svc.when_ready()
        broker.advance(30)
    assert isinstance(_outcome(ready).value, DeclarationRefused)
    assert any("Not retrying" in t for t in events.texts("error")), events.seen
    assert not any("reconnecting" in t for t in events.texts()), events.seen
    assert connects == [0.0]


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_refusal_on_reconnection_is_retried_with_backoff_scripted(
        code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the server has served, the same refusal on the re-declare after a
    reconnection is logged at error (with the hint) and retried with backoff
    (0.5 s, 1 s, 2 s: no jitter here) until the broker accepts; then it serves again."""
    monkeypatch.setattr(session_module.random, "random", lambda: 0.0)
    code, text, whole_connection, hint_words = REFUSALS[code]
    broker, connects = ScriptedBroker(), []
    svc = scripted_server(broker, connects)
    svc.startService()
    broker.run(svc.when_ready())
    assert svc.consuming and connects == [0.0]
    broker.refuse("queue.declare", code, text, connection=whole_connection, times=3,
                  when=_ours)
    try:
        with Events() as events:
            broker.peer.drop()
            broker.advance(10, step=1 / 64)  # exact in binary: no drift
        assert svc.consuming and svc._session.running
        # the first reconnect 0.1 s after the loss, then one per refusal after 0.5, 1, 2 s
        gaps = [b - a for a, b in zip(connects[1:], connects[2:], strict=False)]
        assert gaps == pytest.approx([0.5, 1.0, 2.0], abs=1e-6)
        refused = [t for t in events.texts("error") if f"{code} {text}" in t]
        assert len(refused) == 3, events.seen
        for t, delay in zip(refused, ("0.5", "1.0", "2.0"), strict=True):
            assert f"retrying in {delay} s" in t and hint_words[0] in t, t
        assert not any("Not retrying" in t for t in events.texts()), events.seen
    finally:
        svc.stopService()
        broker.flush()
    assert not svc._session.running


# --- Session.stop() from inside the owner's set-up -------------------------------------


class _StoppingOwner:
    """A Session owner whose set-up declares a queue and, when the broker refuses it,
    stops the session from inside the set-up (as a fatal first start does)."""

    def __init__(self, broker: ScriptedBroker) -> None:
        self.broker = broker
        self.lost: list[Any] = []
        self.session = Session(broker.clock, broker.params(), self.prepare, self.lost.append,
                               name="owner")
        self.stops: list[Deferred[None]] = []
        self.still_connected_when_stopped: list[bool] = []
        self.prepared = 0

    async def prepare(self, connection: Any) -> None:
        channel = await connection.open_channel()
        try:
            await channel.declare_queue("q")
        except ChannelError:
            stopped = self.session.stop()
            self.stops.append(stopped)
            stopped.addCallback(lambda _: self.still_connected_when_stopped.append(
                self.broker.peer.connected))
            return
        self.prepared += 1


@pytest.mark.parametrize("whole_connection", [True, False])
def test_session_stop_from_inside_prepare(whole_connection: bool) -> None:
    """stop() called from the set-up itself: waiters fail with "was stopped", the set-up's
    connection is closed (by the client, if the broker did not) and only then does the
    stop fire; nothing reconnects or is scheduled, and no "reconnecting" line is logged;
    start() again connects anew."""
    broker = ScriptedBroker()
    broker.refuse("queue.declare", 541 if whole_connection else 405, "refused",
                  connection=whole_connection)
    owner = _StoppingOwner(broker)
    with Events() as events, capturedLogs() as logged:
        owner.session.start()
        ready = owner.session.ready()
        broker.advance(30)
    assert "was stopped" in str(_outcome(ready).value)
    [stopped] = owner.stops
    assert owner.still_connected_when_stopped == [False]  # fired once it was closed
    assert _outcome(stopped) is None
    assert len(broker.peers) == 1 and not broker.peer.connected
    if not whole_connection:
        assert broker.peer.names()[-1] == "connection.close"  # closed by the client
    assert not owner.session.running and owner.session.connection is None
    assert owner.lost == []  # it never was a ready connection
    assert broker.clock.getDelayedCalls() == []
    assert not any("reconnecting" in t for t in events.texts()), events.seen
    assert [e for e in logged if e.get("log_failure") is not None] == []
    owner.session.start()  # the refusal was a one-off: a new start serves
    broker.run(owner.session.ready())
    assert len(broker.peers) == 2 and owner.prepared == 1
    broker.run(owner.session.stop())


def test_session_stop_while_prepare_waits() -> None:
    """stop() while the set-up waits for the broker (from outside it): the stop fires on
    the next turn, the set-up's connection is aborted and nothing reconnects."""
    broker = ScriptedBroker()
    broker.silence("queue.declare")
    owner = _StoppingOwner(broker)
    with Events() as events:
        owner.session.start()
        broker.advance(1)
        assert broker.peer.sent("queue.declare")  # waiting for the answer
        stopped = owner.session.stop()
        broker.advance(60)
    assert _outcome(stopped) is None
    assert len(broker.peers) == 1 and not broker.peer.connected
    assert owner.stops == [] and owner.prepared == 0
    assert broker.clock.getDelayedCalls() == []
    assert events.seen == []
