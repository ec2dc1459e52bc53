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
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

import txcallme
from txcallme import _wire
from txcallme.errors import DeclarationRefused, DeliveryLimitReached
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
