"""The server's lifecycle on the real broker: consumers that come back, stopping
(draining, requeueing, stop_timeout), restarting."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest_twisted
from _brokerctl import ctl, rand, request_body
from conftest import Services, broker_connect, sleep
from conftest import _created_names as conftest_names
from scripted import ScriptedBroker
from twisted.internet import threads
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from txcallme import CallmeServerService, _wire
from txcallme.service import REPAIR_INTERVAL


class Events:
    """Collects formatted log events of txcallme's loggers at or above *level*."""

    def __init__(self, level: LogLevel = LogLevel.warn) -> None:
        self.level = level
        self.texts: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) >= self.level and \
                str(event.get("log_namespace", "")).startswith("callme."):
            self.texts.append(formatEvent(event))

    def __enter__(self) -> Events:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)


async def with_channel(work: Any) -> Any:
    """Run ``work(channel)`` on a throwaway connection of the test's own."""
    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        result = await work(channel)
        await channel.close()
        return result
    finally:
        await connection.close()


async def message_count(queue: str) -> int:
    """Messages ready in *queue* (a passive declare)."""
    ok = await with_channel(lambda ch: ch.declare_queue(queue, passive=True))
    return int(ok.message_count)


async def consumers(queue: str) -> int:
    """Consumers of *queue*, as the broker lists them."""
    out = await threads.deferToThread(ctl, "list_consumers", "-p", "/", "queue_name")
    return sum(1 for line in out.splitlines() if line.strip() == queue)


async def delete_server_objects(server_id: str) -> None:
    """Delete a durable server queue and exchange this test made."""
    async def work(ch: Any) -> None:
        await ch.delete_queue(_wire.server_queue(server_id))
        await ch.delete_exchange(_wire.server_exchange(server_id))
    await with_channel(work)


async def wait_for(predicate: Any, seconds: float = 20.0) -> None:
    """Poll *predicate* (maybe async) every 0.1 s until true; fail after *seconds*."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return
        await sleep(0.1)
    raise AssertionError(f"not true within {seconds} s: {predicate}")


# --- issue 9, scenario 2: the server's queue deleted under it ---------------------------


@pytest_twisted.ensureDeferred
async def test_deleted_queue_is_declared_and_consumed_again(services: Services,
                                                            sid: str) -> None:
    """After an operator deletes the server's queue (basic.cancel), the server declares
    it again, consumes again (logged at warn) and calls succeed again."""
    svc = await services.start_server(sid, {"one": lambda: 1})
    proxy = await services.ready_proxy(timeout=10)
    assert await proxy.call(sid, "one") == 1
    with Events() as events:
        await with_channel(lambda ch: ch.delete_queue(_wire.server_queue(sid)))
        await wait_for(lambda: svc.consuming and any("consuming" in t and "again" in t
                                                     for t in events.texts))
    assert any("cancelled the consumer" in t for t in events.texts), events.texts
    assert await consumers(_wire.server_queue(sid)) == 1
    assert await proxy.call(sid, "one") == 1


# --- issue 9, scenario 7: a reconnection while draining ---------------------------------


@pytest_twisted.ensureDeferred
async def test_reconnection_while_draining_does_not_consume(services: Services,
                                                            sid: str) -> None:
    """A connection lost during stopService() is re-made for replies only: the server
    never consumes again, so queued requests are not delivered and requeued in a loop."""
    gate = threading.Event()
    runs: list[int] = []

    def work(x: int) -> int:
        runs.append(x)
        gate.wait(30)
        return x

    svc = await services.start_server(sid, {"work": work}, threading=True, threads=1,
                                      prefetch=1, durable=True, stop_timeout=30)
    proxy = await services.ready_proxy(timeout=30)
    try:
        calls = [proxy.use_server(sid).work(i) for i in range(3)]
        await wait_for(lambda: runs)
        stopping = svc.stopService()
        await wait_for(lambda: not svc.consuming)
        connection = svc._session.connection
        assert connection is not None
        with Events() as events:
            connection.protocol.transport.abortConnection()  # a broker blip while draining
            await wait_for(lambda: svc._session.connection not in (None, connection))
            await sleep(1.0)
        assert any("not consuming again" in t for t in events.texts), events.texts
        assert not svc.consuming
        assert await consumers(_wire.server_queue(sid)) == 0
        assert runs == [0]
        waiting = await message_count(_wire.server_queue(sid))
        await sleep(1.0)
        assert await message_count(_wire.server_queue(sid)) == waiting == 3  # all back, stable
        gate.set()
        await stopping
        assert runs == [0]
        for call in calls:
            call.cancel()
            call.addErrback(lambda _: None)
    finally:
        gate.set()
        await proxy.close()
        await delete_server_objects(sid)


# --- issue 10, items 2, 4, 5: stopping and restarting ----------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_requeues_requests_not_started(services: Services, sid: str) -> None:
    """Requests prefetched but waiting for a pool thread go back to the queue on stop
    (counted), and only the running one runs."""
    gate = threading.Event()
    runs: list[int] = []

    def work(x: int) -> int:
        runs.append(x)
        gate.wait(30)
        return x

    svc = await services.start_server(sid, {"work": work}, threading=True, threads=1,
                                      prefetch=3, durable=True)
    proxy = await services.ready_proxy(timeout=30)
    try:
        calls = [proxy.use_server(sid).work(i) for i in range(4)]
        await wait_for(lambda: runs and len(svc._waiting) == 2)
        stopping = svc.stopService()
        await wait_for(lambda: svc.requeued_on_stop == 2)
        gate.set()
        await stopping
        assert runs == [0]
        assert await calls[0] == 0
        assert await message_count(_wire.server_queue(sid)) == 3  # 2 requeued + 1 never sent
        for call in calls[1:]:
            call.cancel()
            call.addErrback(lambda _: None)
    finally:
        gate.set()
        await proxy.close()
        await delete_server_objects(sid)


@pytest_twisted.ensureDeferred
async def test_stop_timeout_bounds_a_stuck_thread(services: Services, sid: str) -> None:
    """A blocking function stuck on an Event: stop returns after stop_timeout and the
    connection close puts the unfinished request back in the queue."""
    gate = threading.Event()
    started = threading.Event()

    def stuck() -> int:
        started.set()
        gate.wait(60)
        return 1

    svc = await services.start_server(sid, {"stuck": stuck}, threading=True, threads=2,
                                      durable=True, stop_timeout=1)
    proxy = await services.ready_proxy(timeout=60)
    try:
        call = proxy.call(sid, "stuck")
        await wait_for(started.is_set)
        begun = time.monotonic()
        await svc.stopService()
        assert time.monotonic() - begun < 10  # 1 s, plus closing on a loaded machine
        await wait_for(lambda: message_count(_wire.server_queue(sid)))
        assert await message_count(_wire.server_queue(sid)) == 1  # back in the queue
        call.cancel()
        call.addErrback(lambda _: None)
    finally:
        gate.set()
        await proxy.close()
        await delete_server_objects(sid)


@pytest_twisted.ensureDeferred
async def test_stop_and_start_again_many_times(services: Services, sid: str) -> None:
    """A threaded service stops and starts again three times and answers each time;
    two concurrent stops share one outcome."""
    svc = await services.start_server(sid, {"add": lambda a, b: a + b}, threading=True,
                                      threads=2)
    proxy = await services.ready_proxy(timeout=15)
    for round_ in range(3):
        assert await proxy.use_server(sid).add(round_, 1) == round_ + 1
        first, second = svc.stopService(), svc.stopService()
        assert await gatherResults([first, second]) == [None, None]
        assert not svc._session.running
        svc.startService()
        await svc.when_ready()
    assert await proxy.use_server(sid).add(5, 5) == 10
    await svc.stopService()


# --- issue 9, item 6: a broker nack of a reply ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nacked_reply_requeues_the_request(services: Services, sid: str) -> None:
    """A reply the broker nacks (the caller's queue is full, overflow reject-publish) sends
    the request back to the queue; once there is room the call is answered exactly once
    and the request is acked."""
    runs: list[int] = []
    await services.start_server(sid, {"work": lambda x: runs.append(x) or x * 2})
    suffix = rand()
    exchange, queue = f"client_guest_ex_nack{suffix}", f"client_guest_queue_nack{suffix}"
    conftest_names.update({exchange, queue})
    connection = await broker_connect()
    replies: list[Any] = []
    try:
        ch = await connection.open_channel()
        await ch.declare_exchange(exchange, "direct", auto_delete=True)
        await ch.declare_queue(queue, exclusive=True, arguments={
            "x-max-length": 1, "x-overflow": "reject-publish"})
        await ch.bind_queue(queue, exchange, exchange)
        ch.publish(exchange, exchange, b"filler", {})  # the caller's queue is full
        ch.publish(_wire.server_exchange(sid), sid,
                   json.dumps({"method": "work", "args": [21]}).encode(),
                   {"reply_to": exchange, "correlation_id": "c1",
                    "content_type": "application/json"})
        await wait_for(lambda: len(runs) >= 2)  # nacked, requeued, run again
        await ch.consume(queue, replies.append, no_ack=True)  # make room
        await wait_for(lambda: any(d.body != b"filler" for d in replies))
        await sleep(1.0)
        answers = [d for d in replies if d.body != b"filler"]
        assert [(d.properties["correlation_id"], json.loads(d.body)) for d in answers] == [
            ("c1", {"result": 42})]
        assert await message_count(_wire.server_queue(sid)) == 0  # acked, not requeued
        listing = await threads.deferToThread(
            ctl, "list_queues", "-p", "/", "name", "messages_unacknowledged")
        assert f"{_wire.server_queue(sid)}\t0" in listing.splitlines(), listing
    finally:
        try:
            ch2 = await connection.open_channel()
            await ch2.delete_exchange(exchange)
        finally:
            await connection.close()


@pytest_twisted.ensureDeferred
async def test_deleted_exchange_is_declared_and_bound_again(services: Services,
                                                            sid: str) -> None:
    """After an operator deletes the server's exchange (its queue stays, no basic.cancel),
    the periodic check re-declares and re-binds it (logged at warn); calls succeed again."""
    svc = services.server(sid, {"one": lambda: 1})
    svc.repair_interval = 0.5
    await svc.when_ready()
    proxy = await services.ready_proxy(timeout=10)
    assert await proxy.call(sid, "one") == 1
    with Events(LogLevel.info) as events:
        await with_channel(lambda ch: ch.delete_exchange(_wire.server_exchange(sid)))
        await wait_for(lambda: any("bound" in t and "again" in t for t in events.texts))
    assert await proxy.call(sid, "one") == 1
    assert svc.consuming
    assert sum("was deleted" in t for t in events.texts) == 1, events.texts


def test_exchange_check_is_clock_driven_and_redeclares_only_when_gone() -> None:
    """On a Clock: every repair_interval a passive exchange.declare; only after a 404 to
    it does the server declare the exchange, queue and binding again."""
    broker = ScriptedBroker()
    svc = CallmeServerService("foo", params=broker.params(), reactor=broker.clock)
    svc.register_function(lambda: 1, name="one")
    svc.startService()
    broker.flush()
    assert svc.consuming
    peer = broker.peer

    def declares() -> list[bool]:
        return [s.args["passive"] for s in peer.sent("exchange.declare")]

    assert declares() == [False]
    broker.advance(REPAIR_INTERVAL - 0.1)
    assert declares() == [False]
    broker.advance(0.2)
    assert declares() == [False, True]  # still there: nothing re-declared
    binds = len(peer.sent("queue.bind"))
    broker.refuse("exchange.declare", 404, "NOT_FOUND - no exchange 'server_foo_ex'",
                  when=lambda args: bool(args["passive"]))
    broker.advance(REPAIR_INTERVAL)
    assert declares() == [False, True, True, False]
    assert len(peer.sent("queue.bind")) == binds + 1
    assert svc.consuming
    stopped = svc.stopService()
    broker.flush()
    assert stopped.called


def test_stop_during_set_up_consumes_and_cancels_before_closing() -> None:
    """A stop that arrives between queue.declare and basic.consume waits for the set-up,
    then cancels the consumer before connection.close: RabbitMQ auto-deletes only a
    queue that had a consumer, so closing first would leave the durable auto-delete
    server queue behind for good."""
    broker = ScriptedBroker()
    broker.silence("queue.bind", times=1)  # the set-up stalls after queue.declare
    svc = CallmeServerService("foo", params=broker.params(), reactor=broker.clock)
    svc.register_function(lambda: 1, name="one")
    svc.startService()
    broker.flush()
    peer = broker.peer
    [bind] = peer.sent("queue.bind")
    assert peer.sent("queue.declare") and not peer.sent("basic.consume")
    stopped = svc.stopService()
    broker.flush()
    assert not stopped.called
    assert not peer.sent("connection.close")  # it waits for the set-up to end
    peer.send(bind.channel, "queue.bind-ok")
    broker.flush()
    names = [n for n in peer.names()
             if n in ("basic.consume", "basic.cancel", "connection.close")]
    assert names == ["basic.consume", "basic.cancel", "connection.close"]
    assert stopped.called
    assert not svc.consuming
    assert not broker.clock.getDelayedCalls()  # no exchange check left scheduled


def test_stop_during_a_set_up_the_broker_never_answers_is_bounded() -> None:
    """A set-up the broker never answers does not hold a stop longer than stop_timeout."""
    broker = ScriptedBroker()
    broker.silence("queue.bind")
    svc = CallmeServerService("foo", params=broker.params(), reactor=broker.clock,
                              stop_timeout=5)
    svc.register_function(lambda: 1, name="one")
    svc.startService()
    broker.flush()
    peer = broker.peer
    stopped = svc.stopService()
    broker.advance(4.9)
    assert not stopped.called and peer.connected
    broker.advance(0.2)
    # The set-up is the session's unfinished preparation: the stop aborts the connection.
    assert stopped.called
    assert not peer.connected
    assert not broker.clock.getDelayedCalls()



def test_requests_given_back_unprocessed_are_nacked_not_rejected() -> None:
    """A request that arrives while the server stops goes back with basic.nack
    (requeue), which RabbitMQ 4.3 does not count toward a quorum queue's delivery
    limit (basic.reject it would): a graceful stop must not bring a request
    closer to DeliveryLimitReached."""
    broker = ScriptedBroker()
    broker.silence("basic.cancel")  # deliveries already on their way still arrive
    hanging: list[Deferred[int]] = []

    def hang() -> Deferred[int]:
        hanging.append(Deferred())
        return hanging[-1]

    svc = CallmeServerService("foo", params=broker.params(), reactor=broker.clock,
                              threading=False)
    svc.register_function(hang, name="hang")
    svc.startService()
    broker.flush()
    peer = broker.peer
    [consume] = peer.sent("basic.consume")
    channel, tag = consume.channel, consume.args["consumer_tag"]
    props = {"reply_to": "client_guest_ex_x", "correlation_id": "c1",
             "content_type": "application/json"}
    peer.deliver(channel, tag, request_body("hang"), props)
    broker.flush()
    assert len(hanging) == 1
    stopped = svc.stopService()
    broker.flush()
    late = peer.deliver(channel, tag, request_body("hang"), {**props, "correlation_id": "c2"})
    broker.flush()
    assert len(hanging) == 1  # not run
    assert peer.rejects == [(channel, late, True)]
    assert [m.name for m in peer.methods if m.name in ("basic.nack", "basic.reject")] == \
        ["basic.nack"]
    hanging[0].callback(1)
    broker.advance(31)  # the silenced basic.cancel times out (control_timeout)
    assert stopped.called
