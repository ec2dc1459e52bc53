"""The real server over txcallme.amqp.memory's in-memory broker on a Clock: broker
events (basic.cancel) and deadlines, deterministically."""

from __future__ import annotations

import json
from typing import Any

from test_proxy_memory import Outcome, Rig
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from txcallme.amqp import Channel, Delivery, connection_params
from txcallme.amqp.handshake import handshake
from txcallme.amqp.protocol import ProtocolFactory


def result_of(d: Deferred[Any]) -> Any:
    """What a Deferred that must already have fired fired with (raises a failure)."""
    got: list[Any] = []
    d.addBoth(got.append)
    assert got, "not fired"
    if isinstance(got[0], Failure):
        got[0].raiseException()
    return got[0]


class RawCaller:
    """A hand-driven client on the memory broker with its own reply queue."""

    def __init__(self, rig: Rig) -> None:
        proto = ProtocolFactory(connection_params("memory", 5672),
                                rig.clock).buildProtocol(None)
        rig.broker.attach(proto)
        self.connection = result_of(Deferred.fromCoroutine(handshake(proto)))
        self.channel: Channel = result_of(self.connection.open_channel())
        self.replies: list[Delivery] = []
        result_of(self.channel.declare_exchange("client_raw_ex", "direct", auto_delete=True))
        result_of(self.channel.declare_queue("client_raw_queue", exclusive=True))
        result_of(self.channel.bind_queue("client_raw_queue", "client_raw_ex", "client_raw_ex"))
        result_of(self.channel.consume("client_raw_queue", self.replies.append, no_ack=True))

    def send(self, server_id: str, body: dict[str, Any], corr: str, **props: Any) -> None:
        self.channel.publish(f"server_{server_id}_ex", server_id, json.dumps(body).encode(),
                             {"reply_to": "client_raw_ex", "correlation_id": corr,
                              "content_type": "application/json", **props})

    def answers(self) -> dict[str, Any]:
        return {d.properties["correlation_id"]: json.loads(d.body) for d in self.replies}


class Warnings:
    """Formatted warn-or-worse events of txcallme's loggers while installed."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn and \
                str(event.get("log_namespace", "")).startswith("callme."):
            self.texts.append(formatEvent(event))


class ServerBrokerEventTests(SynchronousTestCase):
    """Broker events seen by the server."""

    def setUp(self) -> None:
        self.rig = Rig()
        self.warnings = Warnings()
        globalLogPublisher.addObserver(self.warnings)
        self.addCleanup(globalLogPublisher.removeObserver, self.warnings)

    def test_deleted_queue_is_declared_and_consumed_again(self) -> None:
        """basic.cancel (queue deleted): declared again, consumed again, logged at warn."""
        rig = self.rig
        svc = rig.server("s1", {"one": lambda: 1})
        proxy = rig.proxy()
        first = Outcome(proxy.call("s1", "one"))
        rig.settle(0.1)
        self.assertEqual(first.value, 1)
        rig.broker.delete_queue("server_s1_queue")
        self.assertFalse(svc.consuming)
        rig.settle(2)
        self.assertTrue(svc.consuming)
        self.assertIn("server_s1_queue", rig.broker.queue_names())
        again = Outcome(proxy.call("s1", "one"))
        rig.settle(0.1)
        self.assertEqual(again.value, 1)
        self.assertTrue(any("cancelled the consumer" in t for t in self.warnings.texts))


    def test_closed_consumer_channel_is_replaced(self) -> None:
        """The broker closes the consumer's channel (406): a new channel consumes again,
        logged at warn, and calls succeed."""
        rig = self.rig
        svc = rig.server("s1", {"one": lambda: 1})
        proxy = rig.proxy()
        assert svc._consumer is not None
        old = svc._consumer.channel
        old.ack(9999)  # an unknown delivery tag: 406 PRECONDITION_FAILED closes the channel
        rig.settle(0.1)
        self.assertTrue(old.closed)
        rig.settle(2)
        self.assertTrue(svc.consuming)
        self.assertIsNot(svc._consumer.channel, old)
        call = Outcome(proxy.call("s1", "one"))
        rig.settle(0.1)
        self.assertEqual(call.value, 1)
        self.assertTrue(any("closed the consumer channel" in t for t in self.warnings.texts),
                        self.warnings.texts)


class DeadlineTests(SynchronousTestCase):
    """Deadlines from ``expiration`` at receipt, the body's ``deadline`` as a bound."""

    def setUp(self) -> None:
        self.rig = Rig()
        self.rig.clock.advance(1_000_000)  # "now" in Unix seconds on the server's clock
        self.warnings = Warnings()
        globalLogPublisher.addObserver(self.warnings)
        self.addCleanup(globalLogPublisher.removeObserver, self.warnings)
        self.runs: list[str] = []
        self.svc = self.rig.server("s1", {"mark": lambda tag: self.runs.append(tag) or tag})
        self.caller = RawCaller(self.rig)

    def test_server_clock_ahead_does_not_drop_calls(self) -> None:
        """A body deadline already past at receipt while the expiration is not (the
        server's clock runs ahead): the call runs, and a warning estimates the skew."""
        now = self.rig.clock.seconds()
        self.caller.send("s1", {"method": "mark", "args": ["a"], "deadline": now - 20},
                         "a", expiration="5000")
        self.rig.settle(0.1)
        self.assertEqual(self.runs, ["a"])
        self.assertEqual(self.caller.answers(), {"a": {"result": "a"}})
        self.assertTrue(any("ahead of the caller" in t and "25.0" in t
                            for t in self.warnings.texts), self.warnings.texts)

    def test_absolute_deadline_alone_still_drops_stale_requests(self) -> None:
        """Without ``expiration``, a past body deadline drops the request (logged at warn)."""
        now = self.rig.clock.seconds()
        self.caller.send("s1", {"method": "mark", "args": ["b"], "deadline": now - 1}, "b")
        self.rig.settle(0.1)
        self.assertEqual(self.runs, [])
        self.assertEqual(self.caller.answers(), {})
        self.assertTrue(any("past its deadline" in t for t in self.warnings.texts))

    def test_deadline_from_expiration_at_receipt(self) -> None:
        """With only ``expiration``, the deadline is receipt + expiration, bounded by
        an earlier body deadline."""
        svc, received = self.svc, self.rig.clock.seconds()
        from txcallme._wire import Request
        only_exp = svc._deadline(Request("m", [], {}), {"expiration": "3000"}, received)
        self.assertEqual(only_exp, (received + 3.0, None))
        bounded = svc._deadline(Request("m", [], {}, received + 1.0),
                                {"expiration": "3000"}, received)
        self.assertEqual(bounded, (received + 1.0, 2.0))
        self.assertEqual(svc._deadline(Request("m", [], {}, received + 9.0), {}, received),
                         (received + 9.0, None))


def test_nacked_reply_with_ack_on_receipt_is_lost_not_requeued() -> None:
    """ack='on_receipt': the request was acked when it came, so a reply the broker
    nacks is lost (the call times out) and the log says so; it is not said to go back
    to the queue, and the function ran once. after_reply runs it again and answers."""
    from test_observe_broker import _fail_next_reply
    from twisted.internet.task import Clock

    from txcallme import RpcTimeout
    from txcallme.errors import PublishNacked
    from txcallme.testing import MemoryBroker

    texts: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "callme.server" and \
                event.get("log_level") >= LogLevel.warn:
            texts.append(formatEvent(event))

    for ack, runs_expected in (("on_receipt", 1), ("after_reply", 2)):
        clock = Clock()
        broker = MemoryBroker(clock)
        server = broker.server("acks", ack=ack)
        runs: list[int] = []

        def add(a: int, b: int, runs: list[int] = runs) -> int:
            runs.append(1)
            return a + b

        server.register_function(add)
        proxy = broker.proxy(timeout=5)
        texts.clear()
        globalLogPublisher.addObserver(observe)
        try:
            _fail_next_reply(server, PublishNacked())
            d = proxy.call("acks", "add", 1, 2)
            broker.settle()
            clock.advance(5.1)
            got = d.addErrback(lambda f: f.value)
            broker.settle()
        finally:
            globalLogPublisher.removeObserver(observe)
            proxy.close()
            server.stop()
            broker.settle()
        outcome = result_of(got)
        assert len(runs) == runs_expected, ack
        [text] = [t for t in texts if "not taken by the broker" in t]
        if ack == "on_receipt":
            assert isinstance(outcome, RpcTimeout)
            assert "the reply is lost" in text and "goes back to the queue" not in text
        else:
            assert outcome == 3
            assert "goes back to the queue" in text
