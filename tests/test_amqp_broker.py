"""Integration tests of the AMQP layer against the local RabbitMQ: per-publish outcomes,
control-plane errors and channel closes as the real broker produces them.

Every object is the test's own (exclusive or auto-delete queues, ``amqptest_*`` names)
and is deleted or goes with the test's connection.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import pytest_twisted
from conftest import broker_connect
from twisted.internet.defer import Deferred

from txcallme.amqp import ChannelState, Outcome, PublishOutcome
from txcallme.errors import EncodeError, NotFound, Unroutable


def _name(kind: str) -> str:
    return f"amqptest_{kind}_{secrets.token_hex(4)}"


@pytest_twisted.ensureDeferred
async def test_outcomes_from_rabbitmq() -> None:
    """RabbitMQ's answers map to TAKEN (routed), RETURNED with the correlation id
    (mandatory, unroutable) and LOST (404 on a missing exchange) per publish."""
    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        queue = (await channel.declare_queue("", exclusive=True, auto_delete=True)).queue
        await channel.confirm_select()
        outcomes: dict[int, PublishOutcome] = {}
        waiting: list[tuple[int, Deferred[None]]] = []

        def told(seq: int, outcome: PublishOutcome) -> None:
            outcomes[seq] = outcome
            for count, d in waiting:
                if len(outcomes) == count and not d.called:
                    d.callback(None)

        def until(count: int) -> Deferred[None]:
            d: Deferred[None] = Deferred()
            waiting.append((count, d))
            return d

        channel.on_outcome = told
        taken = channel.publish("", queue, b"a", {"correlation_id": "c1"}, mandatory=True)
        returned = channel.publish("", _name("none"), b"b", {"correlation_id": "c2"},
                                   mandatory=True)
        await until(2)
        # a publish pipelined with the refused one (here: itself) dies with the channel
        lost = channel.publish(_name("missing_ex"), "k", b"c", {})
        await until(3)
        assert outcomes[taken] is PublishOutcome.TAKEN
        assert outcomes[returned].kind is Outcome.RETURNED
        message = outcomes[returned].returned
        assert message is not None and message.reply_code == 312
        assert message.properties["correlation_id"] == "c2"
        assert outcomes[lost].kind is Outcome.LOST
        assert isinstance(outcomes[lost].error, NotFound)
        assert channel.state is ChannelState.CLOSED
    finally:
        await connection.close()


@pytest_twisted.ensureDeferred
async def test_long_name_then_next_declare() -> None:
    """A 300-byte queue name fails its declare with EncodeError; the next declare on the
    same channel and connection is answered by RabbitMQ."""
    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        with pytest.raises(EncodeError, match="queue.declare"):
            await channel.declare_queue("q" * 300, exclusive=True)
        ok = await channel.declare_queue("", exclusive=True, auto_delete=True)
        assert ok.queue.startswith("amq.gen-")
        assert channel.state is ChannelState.OPEN
    finally:
        await connection.close()


@pytest_twisted.ensureDeferred
async def test_passive_declare_404_then_new_channel() -> None:
    """A passive declare of a missing queue fails with NotFound, closes only its channel,
    and a new channel works."""
    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        with pytest.raises(NotFound):
            await channel.declare_queue(_name("missing_q"), passive=True)
        assert channel.state is ChannelState.CLOSED
        other = await connection.open_channel()
        ok = await other.declare_queue("", exclusive=True, auto_delete=True)
        assert ok.consumer_count == 0
    finally:
        await connection.close()


@pytest_twisted.ensureDeferred
async def test_confirmed_publisher_errors() -> None:
    """ConfirmedPublisher tells a return (Unroutable) from a loss (PublishLost) by type."""
    from txcallme.amqp import ConfirmedPublisher
    connection = await broker_connect()
    try:
        publisher = ConfirmedPublisher(connection.open_channel, replay=False)
        with pytest.raises(Unroutable):
            await publisher.publish("", _name("none"), b"x", {}, mandatory=True)
        missing = _name("missing_ex")
        bad = publisher.publish(missing, "k", b"x", {})
        with pytest.raises(NotFound):
            await bad
        await publisher.close()
    finally:
        await connection.close()


@pytest_twisted.ensureDeferred
async def test_node_named_from_rabbitmq() -> None:
    """Connection.node names the address and RabbitMQ's cluster name."""
    connection = await broker_connect()
    try:
        cluster = connection.server_properties.get("cluster_name")
        assert cluster
        assert "127.0.0.1:5672" in connection.node
        assert str(cluster) in connection.node
    finally:
        await connection.close()



@pytest_twisted.ensureDeferred
async def test_nack_requeue_and_drop_on_rabbitmq() -> None:
    """basic.nack with requeue gives the delivery back (redelivered); without
    requeue the broker drops it."""
    from twisted.internet import reactor

    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        queue = (await channel.declare_queue("", exclusive=True, auto_delete=True)).queue
        seen: list[tuple[bytes, bool]] = []
        done: Deferred[None] = Deferred()

        def deliver(delivery: Any) -> None:
            seen.append((delivery.body, delivery.redelivered))
            channel.nack(delivery.delivery_tag, requeue=len(seen) == 1)
            if len(seen) == 2:
                done.callback(None)

        await channel.consume(queue, deliver)
        channel.publish("", queue, b"once", {})
        await done.addTimeout(10, reactor)
        assert seen == [(b"once", False), (b"once", True)]
        assert (await channel.declare_queue(queue, passive=True)).message_count == 0
    finally:
        await connection.close()
