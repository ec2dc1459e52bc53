"""txcallme.amqp.memory: the in-memory broker behaves as RabbitMQ does for what
txcallme uses, driven by txcallme's real client protocol on a Clock."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txcallme.amqp import Channel, Connection, Delivery, Returned, connection_params
from txcallme.amqp.handshake import handshake
from txcallme.amqp.memory import MemoryBroker
from txcallme.amqp.protocol import ProtocolFactory
from txcallme.errors import ChannelError, NotFound

T = TypeVar("T")


def run(work: Coroutine[Any, Any, T] | Deferred[T]) -> T:
    """The result of a coroutine or Deferred that must finish synchronously
    (the broker is in memory); raises its failure."""
    results: list[Any] = []
    d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
    d.addBoth(results.append)
    assert results, "the coroutine did not finish synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(Clock())


def connect(broker: MemoryBroker) -> Connection:
    proto = ProtocolFactory(connection_params("memory", 5672), broker.clock).buildProtocol(None)
    broker.attach(proto)
    return run(handshake(proto))


def channel(broker: MemoryBroker) -> Channel:
    return run(connect(broker).open_channel())


async def setup_queue(ch: Channel, *, exchange: str = "x", queue: str = "q",
                      key: str = "k") -> None:
    await ch.declare_exchange(exchange, "direct", auto_delete=True)
    await ch.declare_queue(queue, auto_delete=True)
    await ch.bind_queue(queue, exchange, key)


def test_login_and_routing(broker: MemoryBroker) -> None:
    """A message published to a bound key reaches the consumer with its properties."""
    ch = channel(broker)
    got: list[Delivery] = []
    run(setup_queue(ch))
    run(ch.consume("q", got.append))
    ch.publish("x", "k", b"hello", {"correlation_id": "c1", "reply_to": "r"})
    assert [(d.body, d.properties, d.redelivered) for d in got] == [
        (b"hello", {"correlation_id": "c1", "reply_to": "r"}, False)]


def test_mandatory_unroutable_is_returned_then_confirmed(broker: MemoryBroker) -> None:
    """An unroutable mandatory publish comes back as basic.return 312 before its ack."""
    ch = channel(broker)
    run(setup_queue(ch))
    run(ch.confirm_select())
    events: list[Any] = []
    ch.on_return = events.append
    ch.on_confirm = lambda tag, multiple, ok: events.append((tag, ok))
    ch.publish("x", "other", b"b", {"correlation_id": "c2"}, mandatory=True)
    assert len(events) == 2
    assert isinstance(events[0], Returned)
    assert (events[0].reply_code, events[0].properties["correlation_id"]) == (312, "c2")
    assert events[1] == (1, True)


def test_nack_next(broker: MemoryBroker) -> None:
    """nack_next makes the broker answer the next confirm with basic.nack."""
    ch = channel(broker)
    run(setup_queue(ch))
    run(ch.confirm_select())
    acks: list[tuple[int, bool]] = []
    ch.on_confirm = lambda tag, multiple, ok: acks.append((tag, ok))
    broker.nack_next()
    ch.publish("x", "k", b"1", {})
    ch.publish("x", "k", b"2", {})
    assert acks == [(1, False), (2, True)]
    assert len(broker.queues["q"].messages) == 1


def test_publish_to_missing_exchange_closes_the_channel(broker: MemoryBroker) -> None:
    """A publish to a missing exchange closes its channel with 404, like RabbitMQ."""
    ch = channel(broker)
    ch.publish("nope", "k", b"x", {})
    assert ch.closed
    assert isinstance(ch.close_error, NotFound)


def test_inequivalent_redeclare_is_406(broker: MemoryBroker) -> None:
    """Redeclaring a queue with other flags fails with 406 and closes the channel."""
    ch = channel(broker)
    run(ch.declare_queue("q", durable=True))
    with pytest.raises(ChannelError) as info:
        run(ch.declare_queue("q", durable=False))
    assert info.value.code == 406
    assert ch.closed


def test_exclusive_queue_of_another_connection_is_405(broker: MemoryBroker) -> None:
    """Another connection's exclusive queue is RESOURCE_LOCKED (405)."""
    run(channel(broker).declare_queue("mine", exclusive=True))
    with pytest.raises(ChannelError) as info:
        run(channel(broker).declare_queue("mine", exclusive=True))
    assert info.value.code == 405


def test_passive_declare_of_missing_queue_is_404(broker: MemoryBroker) -> None:
    """A passive declare of a missing queue fails with NotFound."""
    with pytest.raises(NotFound):
        run(channel(broker).declare_queue("ghost", passive=True))


def test_consumer_count_in_declare_ok(broker: MemoryBroker) -> None:
    """queue.declare-ok carries the queue's consumer count."""
    ch = channel(broker)
    run(ch.declare_queue("q"))
    run(ch.consume("q", lambda d: None))
    ok = run(channel(broker).declare_queue("q", passive=True))
    assert ok.consumer_count == 1


def test_delete_queue_cancels_consumers(broker: MemoryBroker) -> None:
    """An operator deleting a queue sends basic.cancel to its consumers and
    takes the auto-delete exchange with it once its last binding is gone."""
    ch = channel(broker)
    run(setup_queue(ch))
    cancelled: list[str] = []
    ch.on_consumer_cancelled = cancelled.append
    tag = run(ch.consume("q", lambda d: None))
    broker.delete_queue("q")
    assert cancelled == [tag]
    assert "q" not in broker.queues and "x" not in broker.exchanges
    assert not ch.closed


def test_auto_delete_queue_goes_with_its_last_consumer(broker: MemoryBroker) -> None:
    """An auto-delete queue is deleted when its last consumer is cancelled."""
    ch = channel(broker)
    run(setup_queue(ch))
    tag = run(ch.consume("q", lambda d: None))
    run(ch.cancel(tag))
    assert broker.queue_names() == []


def test_unacked_messages_are_requeued_when_the_channel_closes(broker: MemoryBroker) -> None:
    """Unacked deliveries go back to the queue, marked redelivered, when their channel closes."""
    first = channel(broker)
    run(first.declare_queue("work"))
    run(first.qos(1))
    got: list[Delivery] = []
    run(first.consume("work", got.append))
    first.publish("", "work", b"a", {})
    first.publish("", "work", b"b", {})
    assert [d.body for d in got] == [b"a"]  # prefetch 1
    run(first.close())
    queued = broker.queues["work"].messages
    assert [(m.body, m.redelivered) for m in queued] == [(b"a", True), (b"b", False)]


def test_reject_with_requeue_redelivers(broker: MemoryBroker) -> None:
    """reject(requeue=True) puts the message back at the head, redelivered."""
    ch = channel(broker)
    run(ch.declare_queue("work"))
    got: list[Delivery] = []
    run(ch.consume("work", got.append))
    ch.publish("", "work", b"a", {})
    ch.reject(got[0].delivery_tag, requeue=True)
    assert [(d.body, d.redelivered) for d in got] == [(b"a", False), (b"a", True)]


def test_expired_message_is_dropped_on_the_clock(broker: MemoryBroker) -> None:
    """A message whose expiration passed on the broker's clock is never delivered."""
    ch = channel(broker)
    run(ch.declare_queue("work"))
    ch.publish("", "work", b"old", {"expiration": "1000"})
    broker.clock.advance(1.5)
    got: list[Delivery] = []
    run(ch.consume("work", got.append))
    assert got == []
    assert len(broker.queues["work"].messages) == 0


def test_blocked_connection_holds_publishes(broker: MemoryBroker) -> None:
    """While blocked, the broker reads no publishes; they are routed after unblock."""
    ch = channel(broker)
    run(ch.declare_queue("work"))
    got: list[Delivery] = []
    run(ch.consume("work", got.append))
    broker.block("low on memory")
    ch.publish("", "work", b"a", {})
    assert got == []
    broker.unblock()
    assert [d.body for d in got] == [b"a"]


def test_close_connections_fails_channels(broker: MemoryBroker) -> None:
    """connection.close from the broker closes the client's connection and channels."""
    ch = channel(broker)
    broker.close_connections()
    assert ch.closed
    assert ch.connection.lost
    assert broker.connections == []


def test_drop_connections_loses_exclusive_queues(broker: MemoryBroker) -> None:
    """A lost connection takes its exclusive queues with it."""
    ch = channel(broker)
    run(ch.declare_queue("mine", exclusive=True))
    broker.drop_connections()
    assert ch.connection.lost
    assert broker.queue_names() == []



def test_consume_on_a_backlog_gets_every_message(broker: MemoryBroker) -> None:
    """A consume on a queue with a backlog gets all of it (the broker delivers during the write)."""
    ch = channel(broker)
    run(setup_queue(ch))
    ch.publish("x", "k", b"one", {})
    ch.publish("x", "k", b"two", {})
    other = channel(broker)
    got: list[Delivery] = []
    tag = run(other.consume("q", got.append))
    assert tag == "txcallme.1"
    assert [(d.body, d.redelivered, d.consumer_tag) for d in got] == [
        (b"one", False, tag), (b"two", False, tag)]


def test_failed_consume_unregisters_its_tag(broker: MemoryBroker) -> None:
    """A consume the broker refuses leaves no callback behind; the next one gets a new tag."""
    conn = connect(broker)
    ch = run(conn.open_channel())
    with pytest.raises(NotFound):
        run(ch.consume("missing", lambda d: None))
    assert ch._consumers == {}


def test_confirmed_publisher_over_memory_broker_fires(broker: MemoryBroker) -> None:
    """A confirm that arrives during the write still fires the publish Deferred."""
    from txcallme.amqp.publisher import ConfirmedPublisher
    conn = connect(broker)
    run(setup_queue(run(conn.open_channel())))
    publisher = ConfirmedPublisher(conn.open_channel, replay=False)
    run(publisher.publish("x", "k", b"a", {}))
    run(publisher.publish("x", "k", b"b", {}))
    assert publisher.in_flight == 0


def _close_levels(work: Any) -> list[str]:
    """The levels of 'broker closed channel' events logged while *work* runs."""
    from twisted.logger import LogEvent, globalLogPublisher
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        work()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [e["log_level"].name for e in events
            if e.get("log_format", "").startswith("broker closed channel")]


def test_refusal_the_caller_gets_is_logged_at_info(broker: MemoryBroker) -> None:
    """A 404 the caller gets (confirmed publish, passive declare) is info, an unseen one warn."""
    def confirmed() -> None:
        ch = channel(broker)
        run(ch.confirm_select())
        ch.publish("nope", "k", b"x", {})
        assert isinstance(ch.close_error, NotFound)

    def passive() -> None:
        with pytest.raises(NotFound):
            run(channel(broker).declare_queue("ghost", passive=True))

    def unconfirmed() -> None:
        channel(broker).publish("nope", "k", b"x", {})
    assert _close_levels(confirmed) == ["info"]
    assert _close_levels(passive) == ["info"]
    assert _close_levels(unconfirmed) == ["warn"]
