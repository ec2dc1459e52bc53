"""A model-based test of the Proxy over the in-memory broker: whatever broker
events interleave with calls, every call's Deferred fires exactly once (by its
timeout at the latest), with the server's answer or a txcallme error, and a
finished Proxy holds no per-call state and leaves nothing in the clock."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_proxy_memory import Outcome, Rig

from txcallme.errors import CallmeError

TIMEOUT = 10.0


class ProxyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rig = Rig()
        self.server_up = False
        self.start_server()
        self.proxy = self.rig.proxy(timeout=TIMEOUT)
        self.calls: list[tuple[Outcome, int]] = []

    def start_server(self) -> None:
        self.rig.server("s1", {"echo": lambda delay, value: self.rig.later(delay, value)},
                        durable=True)
        self.server_up = True

    @rule(delay=st.sampled_from([0.0, 0.2, 3.0, 20.0]), value=st.integers(0, 10**6))
    def call(self, delay: float, value: int) -> None:
        self.calls.append((Outcome(self.proxy.call("s1", "echo", delay, value)), value))

    @rule(seconds=st.sampled_from([0.0, 0.1, 0.5, 2.0]))
    def wait(self, seconds: float) -> None:
        self.rig.settle(seconds)

    @rule()
    def drop_proxy_connection(self) -> None:
        connection = self.proxy._session.connection
        if connection is not None:
            connection.protocol.transport.loseConnection()

    @rule()
    def delete_reply_queue(self) -> None:
        if self.proxy.queue in self.rig.broker.queues:
            self.rig.broker.delete_queue(self.proxy.queue)

    @rule()
    def delete_reply_exchange(self) -> None:
        if self.proxy.exchange in self.rig.broker.exchanges:
            self.rig.broker.delete_exchange(self.proxy.exchange)

    @rule()
    def block_and_unblock(self) -> None:
        self.rig.broker.block("low on memory")
        self.rig.settle(0.5)
        self.rig.broker.unblock()

    @rule()
    def stop_server(self) -> None:
        if self.server_up:
            self.rig.servers.pop().stopService()
            self.server_up = False

    @rule()
    def restart_server(self) -> None:
        if not self.server_up:
            self.start_server()

    @invariant()
    def fired_at_most_once(self) -> None:
        for outcome, _ in self.calls:
            assert len(outcome.results) <= 1, outcome.results

    def teardown(self) -> None:
        rig = self.rig
        rig.settle(TIMEOUT + 25)  # past every timeout and every handler's delay
        for outcome, value in self.calls:
            result = outcome.value  # exactly once
            assert result == value or isinstance(result, CallmeError), result
        proxy = self.proxy
        assert proxy.pending_count == 0
        assert len(proxy._deadlines) == 0
        assert (proxy._unsent, proxy._retry) == ({}, {})
        connection = proxy._session.connection
        protocol = connection.protocol if connection is not None else None
        proxy.close()
        rig.settle(1)
        owners = {id(proxy), id(proxy._deadlines), id(proxy._session), id(protocol)}

        def owner(call: Any) -> Any:
            func = call.func
            bound = getattr(func, "__self__", None)
            if bound is not None and hasattr(bound, "f"):  # a LoopingCall
                bound = getattr(bound.f, "__self__", None)
            return bound

        leftover = [c for c in rig.clock.getDelayedCalls() if id(owner(c)) in owners]
        assert leftover == [], leftover  # (the servers' own timers are theirs)


ProxyMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestProxyModel = ProxyMachine.TestCase
