"""Model-based test of per-publish outcomes: any interleaving of publishes, returns,
acks, nacks, blocks, withdrawals and a final connection loss tells each publish that
was not withdrawn exactly one outcome, the one the model expects."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from scripted import ScriptedBroker

from txcallme.amqp import Outcome, PublishOutcome


class OutcomeMachine(RuleBasedStateMachine):
    """The real Channel against the scripted broker; the model is a few dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.broker = ScriptedBroker()
        self.broker.auto_confirm = False
        self.connection = self.broker.connection()
        self.channel = self.broker.run(self.connection.open_channel())
        self.broker.run(self.channel.declare_queue("q"))
        self.broker.run(self.channel.bind_queue("q", "ex", "k"))  # routable: no auto return
        self.broker.run(self.channel.confirm_select())
        self.told: dict[int, list[PublishOutcome]] = {}
        self.channel.on_outcome = lambda seq, o: self.told.setdefault(seq, []).append(o)
        self.blocked = False
        self.held: list[int] = []  # client seqs held while blocked
        self.withdrawn: set[int] = set()
        self.expected: dict[int, Outcome] = {}  # settled by the broker
        self.returned: set[int] = set()
        self.mandatory: dict[int, bool] = {}

    # -- the broker's view ------------------------------------------------------

    def sent(self) -> list[tuple[int, int]]:
        """(broker seq, client seq) of every publish the broker received."""
        return [(p.seq, int(p.properties["correlation_id"])) for p in self.broker.peer.published]

    def open_sent(self) -> list[tuple[int, int]]:
        return [(b, c) for b, c in self.sent() if c not in self.expected]

    # -- rules ------------------------------------------------------------------------

    @rule(mandatory=st.booleans())
    def publish(self, mandatory: bool) -> None:
        seq = len(self.mandatory) + 1
        got = self.channel.publish("ex", "k", b"m", {"correlation_id": str(seq)}, mandatory)
        assert got == seq
        self.mandatory[seq] = mandatory
        if self.blocked:
            self.held.append(seq)
        self.broker.flush()

    @precondition(lambda self: any(self.mandatory[c] and c not in self.returned
                                   for _, c in self.open_sent()))
    @rule()
    def basic_return(self) -> None:
        seq = next(c for _, c in self.open_sent()
                   if self.mandatory[c] and c not in self.returned)
        self.returned.add(seq)
        self.broker.peer.basic_return(self.channel.id, b"m", {"correlation_id": str(seq)},
                                      exchange="ex", routing_key="k")
        self.broker.flush()

    @precondition(lambda self: bool(self.open_sent()))
    @rule(data=st.data(), ok=st.booleans(), multiple=st.booleans())
    def confirm(self, data: Any, ok: bool, multiple: bool) -> None:
        pending = self.open_sent()
        broker_seq, _ = data.draw(st.sampled_from(pending))
        settled = [c for b, c in pending if (b <= broker_seq if multiple else b == broker_seq)]
        for seq in settled:
            if not ok:
                self.expected[seq] = Outcome.NACKED
            else:
                self.expected[seq] = Outcome.RETURNED if seq in self.returned else Outcome.TAKEN
        send = self.broker.peer.ack if ok else self.broker.peer.nack
        send(self.channel.id, broker_seq, multiple)
        self.broker.flush()

    @precondition(lambda self: not self.blocked)
    @rule()
    def block(self) -> None:
        self.blocked = True
        self.broker.peer.blocked("memory")
        self.broker.flush()

    @precondition(lambda self: self.blocked)
    @rule()
    def unblock(self) -> None:
        self.blocked = False
        self.held = []
        self.broker.peer.unblocked()
        self.broker.flush()

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def withdraw(self, data: Any) -> None:
        seq = data.draw(st.sampled_from(self.held))
        self.held.remove(seq)
        assert self.channel.withdraw(seq)
        self.withdrawn.add(seq)

    # -- checks -------------------------------------------------------------------------

    @invariant()
    def outcomes_match(self) -> None:
        for seq, outcomes in self.told.items():
            assert len(outcomes) == 1, (seq, outcomes)
            assert seq not in self.withdrawn
            assert outcomes[0].kind is self.expected[seq], (seq, outcomes, self.expected)
        assert set(self.told) == set(self.expected)

    def teardown(self) -> None:
        self.broker.peer.drop()
        self.broker.flush()
        for seq in self.mandatory:
            if seq in self.withdrawn:
                assert seq not in self.told
                continue
            assert len(self.told.get(seq, [])) == 1, (seq, self.told.get(seq))
            kind = self.told[seq][0].kind
            if seq in self.expected:
                assert kind is self.expected[seq]
            elif seq in self.returned:
                assert kind is Outcome.RETURNED
            else:
                assert kind is Outcome.LOST


OutcomeMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestOutcomes = OutcomeMachine.TestCase
TestOutcomes.__doc__ = "Every publish gets exactly one outcome, the model's, in any interleaving."
