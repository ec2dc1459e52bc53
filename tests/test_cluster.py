"""A 3-node RabbitMQ cluster that loses a node while calls stream through it.

The module starts three RabbitMQ nodes of its own on this machine (see
:class:`rabbitnode.RabbitCluster`; the shared broker on 5672 is never used),
joins them into one cluster, and runs each scenario with its own server id:
in-process server instances connected to different nodes, a Proxy given all
three addresses (its own node first), and a steady stream of calls (25 fast
calls/s and 3 one-second calls/s) while one node is taken out and brought
back:

- a: the node a server instance is connected to (quorum queue led elsewhere;
  ``rabbitmqctl stop``);
- b: the node leading the server's quorum queue, no client connected to it
  (SIGKILL: a crash);
- c: the node the Proxy is connected to (``stop_app``: the VM stays up);
- classic: the home node of a classic durable server queue (``stop``, 8 s).

Per call: how its Deferred ended (answered with the right value, failed, and
with which error), never fired (lost), fired more than once (a duplicate
result; a second firing inside the library shows up as a logged
AlreadyCalledError), and how often the servers ran it (a request redelivered
after a lost connection runs again: at-least-once). Per scenario: the time
from the stop until calls succeed normally again. One summary line per
scenario is printed (``pytest -s``) and all of them are written to
/tmp/txcallme-cluster.json.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import pytest_twisted
from rabbitnode import RabbitCluster, RabbitNode, sweep_orphans
from twisted.internet import reactor, task, threads
from twisted.internet.defer import AlreadyCalledError, Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from txcallme import (
    BrokerConnectionLost,
    CallmeError,
    CallmeServerService,
    NotFound,
    Proxy,
    ServerUnavailable,
)
from txcallme.amqp import connect, connection_params

RESULTS_FILE = Path("/tmp/txcallme-cluster.json")
#: Fast calls per second, and one-second calls per second (about 3 in flight).
RATE = 25.0
SLOW_RATE = 3.0
SLOW_DELAY = 1.0
CALL_TIMEOUT = 20.0
#: How long after its timeout a call may still fire before it counts as lost.
MARGIN = 5.0
WARMUP = 3.0
#: A call "succeeds normally" when answered within its run time plus this.
NORMAL_LATENCY = 2.0
#: Recovered: this many seconds of calls, all succeeding normally, after the stop.
STABLE = 3.0
#: Generous bound for the quorum scenarios to succeed normally again.
RECOVERY_BOUND = 30.0
#: How long the classic queue's home node stays down.
CLASSIC_OUTAGE = 8.0
SCENARIO_TIMEOUT = 170


def now() -> float:
    return time.monotonic()


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll *predicate* on the reactor until true; fail after *timeout* seconds."""
    deadline = now() + timeout
    while not predicate():
        if now() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await sleep(0.05)


def record(name: str, data: dict[str, Any]) -> None:
    """Print a scenario's one-line summary and merge it into RESULTS_FILE."""
    print(f"\n[cluster] {name}: {json.dumps(data, sort_keys=True)}")
    try:
        results = json.loads(RESULTS_FILE.read_text())
    except (OSError, ValueError):
        results = {}
    results[name] = data
    RESULTS_FILE.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


# --- the cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    """Three clustered nodes for the module; always stopped and removed, none left."""
    swept = sweep_orphans()
    RESULTS_FILE.write_text("{}\n")
    began = now()
    rabbit = RabbitCluster(3)
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(rabbit.cleanup_on_signals())
        rabbit.start()
        record("cluster", {"nodes": [n.nodename for n in rabbit.nodes],
                           "amqp_ports": [n.port for n in rabbit.nodes],
                           "orphans_swept": swept,
                           **{f"{k}_s": round(v, 1) for k, v in rabbit.timings.items()}})
        yield rabbit
    finally:
        try:
            rabbit.cleanup()
        finally:
            stack.close()
            left = rabbit.processes()
            record("cluster_teardown", {
                "processes_left": left, "module_s": round(now() - began, 1),
                **{f"{k}_s": round(v, 1) for k, v in rabbit.timings.items()}})
        assert not left, f"cluster processes left behind: {left}"


@pytest.fixture(autouse=True)
def all_nodes_up(cluster: RabbitCluster) -> None:
    """Every test starts with all three nodes running (a failed test may leave one down)."""
    if cluster.interrupted:
        pytest.exit("interrupted: the cluster was cleaned up", returncode=2)
    down = [n for n in cluster.nodes if n.app_stopped or not n.running()]
    for node in down:
        cluster.start_node(node)


class LogEvents:
    """Library log events that reveal duplicate or late replies, and errors logged."""

    def __init__(self) -> None:
        self.dropped_replies = 0
        self.already_called = 0
        self.errors: Counter[str] = Counter()

    def __call__(self, event: dict[str, Any]) -> None:
        fmt = event.get("log_format") or ""
        if event.get("log_namespace") == "callme.proxy" and "dropping a reply" in fmt:
            self.dropped_replies += 1
        failure = event.get("log_failure")
        if isinstance(failure, Failure) and failure.check(AlreadyCalledError):
            self.already_called += 1
        level = event.get("log_level")
        if level is not None and level.name in ("error", "critical"):
            self.errors[f"{event.get('log_namespace')}: {fmt[:80]}"] += 1


@pytest.fixture
def events() -> Iterator[LogEvents]:
    observer = LogEvents()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


# --- servers and calls -----------------------------------------------------------------


class Executions:
    """How many times the servers ran each call (keyed by the call's number)."""

    def __init__(self) -> None:
        self.runs: Counter[int] = Counter()
        self.by: dict[int, list[str]] = {}
        self._lock = threading.Lock()

    def ran(self, n: int, instance: str) -> list[Any]:
        with self._lock:
            self.runs[n] += 1
            self.by.setdefault(n, []).append(instance)
        return [n, instance]


class Harness:
    """Servers and Proxies of one scenario, all stopped or closed at teardown."""

    def __init__(self, cluster: RabbitCluster) -> None:
        self.cluster = cluster
        self.executions = Executions()
        self.servers: list[CallmeServerService] = []
        self.names: dict[int, str] = {}
        self.proxies: list[Proxy] = []

    async def server(self, sid: str, node: RabbitNode, name: str, *,
                     queue_type: str = "quorum", durable: bool = False,
                     ready: bool = True) -> CallmeServerService:
        """A server instance of *sid* that connects to *node* first."""
        svc = CallmeServerService(sid, amqp_host=self.cluster.hosts(first=node),
                                  threading=True, threads=8, queue_type=queue_type,
                                  durable=durable, queue_expires=120, stop_timeout=5)
        ran = self.executions.ran

        def fast(n: int) -> list[Any]:
            return ran(n, name)

        def slow(n: int, delay: float) -> list[Any]:
            time.sleep(delay)
            return ran(n, name)

        svc.register_function(fast, name="fast", blocking=False)
        svc.register_function(slow, name="slow", blocking=True)
        svc.startService()
        self.servers.append(svc)
        self.names[id(svc)] = name
        if ready:
            await svc.when_ready().addTimeout(30, reactor)
        return svc

    async def proxy(self, node: RabbitNode) -> Proxy:
        """A Proxy given all three nodes, *node* first."""
        proxy = Proxy(amqp_host=self.cluster.hosts(first=node), timeout=CALL_TIMEOUT)
        self.proxies.append(proxy)
        await proxy.when_ready().addTimeout(30, reactor)
        return proxy

    def node_of(self, owner: CallmeServerService | Proxy) -> str | None:
        """The node *owner* is connected to now (None while disconnected)."""
        connection = owner._session.connection
        if connection is None or connection.lost:
            return None
        port = connection.protocol.transport.getPeer().port
        return self.cluster.node_on_port(port).nodename

    def short(self, owner: CallmeServerService | Proxy) -> str:
        """Where *owner* is: ``n1`` (connected to node 1), ``-`` (disconnected);
        for a server, ``n1 not consuming`` when its consumer is gone."""
        name = self.node_of(owner)
        if name is None:
            return "-"
        where = f"n{self.cluster.nodes.index(self.cluster.node(name))}"
        if isinstance(owner, CallmeServerService) and owner._consumer is None:
            where += " not consuming"
        return where

    def watch(self, stream: Stream) -> None:
        """Record in *stream* every change of where the servers and Proxies are."""
        for svc in self.servers:
            if svc.running:
                stream.watch[self.names[id(svc)]] = lambda svc=svc: self.short(svc)
        for i, proxy in enumerate(self.proxies):
            stream.watch[f"proxy{i}"] = lambda proxy=proxy: self.short(proxy)

    async def cleanup(self) -> None:
        await sleep(0)
        for proxy in self.proxies:
            await proxy.close().addTimeout(15, reactor)
        for svc in self.servers:
            if svc.running:
                await svc.stopService().addTimeout(20, reactor)


@pytest_twisted.async_yield_fixture
async def harness(cluster: RabbitCluster) -> Any:
    helper = Harness(cluster)
    try:
        yield helper
    finally:
        await helper.cleanup()


class Call:
    """One call of the stream and how its Deferred ended."""

    __slots__ = ("n", "kind", "issued", "fires", "fired_at", "value", "error")

    def __init__(self, n: int, kind: str) -> None:
        self.n = n
        self.kind = kind
        self.issued = now()
        self.fires = 0
        self.fired_at: float | None = None
        self.value: Any = None
        self.error: BaseException | None = None

    @property
    def answered(self) -> bool:
        return self.fires > 0 and self.error is None

    @property
    def allowed(self) -> float:
        """The latency of a call that succeeds normally."""
        return NORMAL_LATENCY + (SLOW_DELAY if self.kind == "slow" else 0.0)

    def normal(self) -> bool:
        return (self.answered and self.fired_at is not None
                and self.fired_at - self.issued <= self.allowed)

    def bad(self, at: float) -> bool:
        """Known at *at* not to have succeeded normally."""
        if self.fires:
            return not self.normal()
        return at - self.issued > self.allowed


class Stream:
    """A steady stream of fast and slow calls to *sid*, every one tracked."""

    def __init__(self, proxy: Proxy, sid: str) -> None:
        self.proxy = proxy
        self.sid = sid
        self.calls: list[Call] = []
        self.stop_at: float | None = None
        #: name -> what to watch; every change is kept in :attr:`changes`.
        self.watch: dict[str, Callable[[], Any]] = {}
        self.changes: list[tuple[float, str, Any]] = []
        self._stopping = False
        self._loop: Deferred[None] | None = None

    def start(self) -> None:
        self._loop = Deferred.fromCoroutine(self._run())

    async def stop(self) -> None:
        self._stopping = True
        assert self._loop is not None
        await self._loop

    def issue(self, kind: str) -> Call:
        call = Call(len(self.calls), kind)
        self.calls.append(call)
        if kind == "fast":
            d = self.proxy.call(self.sid, "fast", call.n)
        else:
            d = self.proxy.call(self.sid, "slow", call.n, SLOW_DELAY)

        def fired(result: Any) -> None:
            call.fires += 1
            call.fired_at = now()
            if isinstance(result, Failure):
                call.error = result.value
            else:
                call.value = result

        d.addBoth(fired)
        return call

    async def _run(self) -> None:
        began = now()
        fast = slow = 0
        while not self._stopping:
            elapsed = now() - began
            while fast < elapsed * RATE:
                self.issue("fast")
                fast += 1
            while slow < elapsed * SLOW_RATE:
                self.issue("slow")
                slow += 1
            self._look()
            await sleep(0.02)

    def _look(self) -> None:
        seen: dict[str, Any] = {}
        for _, name, value in self.changes:
            seen[name] = value
        for name, probe in self.watch.items():
            value = probe()
            if name not in seen or seen[name] != value:
                self.changes.append((now(), name, value))

    def timeline(self, since: float) -> list[str]:
        """The watched changes after the warm-up, as ``"+1.23 s name=value"``."""
        first = {name for _, name, _ in self.changes}
        out = []
        for at, name, value in self.changes:
            if at >= since or name not in first:
                out.append(f"{at - since:+.2f} s {name}={value}")
            first.discard(name)
        return out

    def per_second(self, since: float, seconds: int) -> list[str]:
        """Per second after *since*, calls made then: ``answered/failed``."""
        out = []
        for i in range(seconds):
            made = [c for c in self.calls if since + i <= c.issued < since + i + 1]
            if not made:
                break
            failed = sum(1 for c in made if c.error is not None)
            out.append(f"{len(made) - failed}/{failed}")
        return out

    @property
    def unfired(self) -> int:
        return sum(1 for c in self.calls if not c.fires)

    async def settle(self) -> None:
        """Wait until every call fired, or each had its timeout plus MARGIN."""
        deadline = max((c.issued + CALL_TIMEOUT + MARGIN for c in self.calls), default=now())
        while self.unfired and now() < deadline:
            await sleep(0.1)

    def recovered(self, since: float, at: float) -> bool:
        """True once STABLE seconds of calls made after *since* all succeed normally."""
        last_bad = max((c.issued for c in self.calls if c.issued >= since and c.bad(at)),
                       default=since)
        return at - last_bad >= STABLE + NORMAL_LATENCY + SLOW_DELAY

    def recovery(self, since: float) -> float:
        """Seconds from *since* until the first call after which every call made
        succeeded normally (0: no call made after *since* was disturbed)."""
        after = [c for c in self.calls if c.issued >= since]
        bad = [i for i, c in enumerate(after) if not c.normal()]
        if not bad:
            return 0.0
        if bad[-1] + 1 >= len(after):
            return float("inf")
        return after[bad[-1] + 1].issued - since


def summarize(stream: Stream, executions: Executions, events: LogEvents,
              stopped_at: float) -> dict[str, Any]:
    calls = stream.calls
    right = [c for c in calls if c.answered and c.value == [c.n, c.value[1]]
             and executions.runs[c.n] >= 1]
    errors = Counter(type(c.error).__name__ for c in calls if c.error is not None)
    messages = Counter(f"{type(c.error).__name__}: {str(c.error)[:120]}" for c in calls
                       if c.error is not None)
    after = [c for c in calls if c.fired_at is not None and c.issued >= stopped_at]
    return {
        "calls": len(calls),
        "answered": len(right),
        "wrong_value": sum(1 for c in calls if c.answered) - len(right),
        "failed": sum(1 for c in calls if c.error is not None),
        "failed_unclear": sum(1 for c in calls if c.error is not None
                              and not isinstance(c.error, CallmeError)),
        "errors": dict(errors),
        "error_messages": dict(messages.most_common(4)),
        "timeline": stream.timeline(stopped_at),
        "answered_failed_per_second_after_stop": stream.per_second(stopped_at, 40),
        "lost": stream.unfired,
        "duplicates": sum(1 for c in calls if c.fires > 1) + events.already_called,
        "run_twice": sum(1 for n in executions.runs if executions.runs[n] > 1),
        # ServerUnavailable promises the request was refused, so it never ran.
        "unavailable_but_ran": sum(1 for c in calls if isinstance(c.error, ServerUnavailable)
                                   and executions.runs[c.n] > 0),
        "failed_before_stop_issue": sum(1 for c in calls if c.error is not None
                                        and c.issued < stopped_at),
        "replies_dropped_by_proxy": events.dropped_replies,
        "recovery_s": round(stream.recovery(stopped_at), 2),
        "max_latency_after_stop_s": round(max((c.fired_at - c.issued for c in after
                                               if c.fired_at is not None), default=0.0), 2),
        "last_abnormal_after_stop": [
            f"{c.kind} made at +{c.issued - stopped_at:.2f} s: "
            + (f"{type(c.error).__name__}" if c.error is not None else
               f"took {(c.fired_at or now()) - c.issued:.2f} s")
            for c in [c for c in after if not c.normal()][-2:]],
        "slowest_after_stop": [
            f"{c.kind} made at +{c.issued - stopped_at:.2f} s took {c.fired_at - c.issued:.2f} s"
            for c in sorted(after, key=lambda c: c.issued - (c.fired_at or 0))[:3]
            if c.fired_at is not None],
        "answered_by": dict(Counter(c.value[1] for c in calls if c.answered
                                    and c.issued >= stopped_at)),
    }


def assert_clean(data: dict[str, Any]) -> None:
    """No call lost, none answered twice or wrongly, every failure a txcallme error."""
    assert data["lost"] == 0, data
    assert data["duplicates"] == 0, data
    assert data["wrong_value"] == 0, data
    assert data["failed_unclear"] == 0, data
    assert data["unavailable_but_ran"] == 0, data


def new_server_id() -> str:
    return f"cluster-{uuid4().hex[:8]}"


async def lose_node(harness: Harness, stream: Stream, node: RabbitNode, how: str,
                    outage: float | None = None,
                    while_down: Callable[[], Awaitable[Any]] | None = None,
                    settled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Stream, take *node* out, wait for recovery (or *outage* seconds), bring it
    back, stream on; returns the timeline (seconds from the stop). *while_down*
    runs once the node is down; the stream goes on until *settled* is true too."""
    cluster = harness.cluster
    harness.watch(stream)
    stream.start()
    await sleep(WARMUP)
    before = [c for c in stream.calls if c.fires]
    assert before and all(c.normal() for c in before), "calls before the stop must succeed"
    stopped_at = now()
    stream.stop_at = stopped_at
    stop_seconds = await threads.deferToThread(cluster.stop_node, node, how)
    timeline: dict[str, Any] = {"stopped_at": stopped_at, "node_stop_s": round(stop_seconds, 2)}
    if while_down is not None:
        await while_down()
    if outage is None:
        await wait_for(lambda: stream.recovered(stopped_at, now()), RECOVERY_BOUND,
                       f"calls to succeed again after losing {node.nodename}")
        timeline["recovered_online_s"] = round(now() - stopped_at, 2)
    else:
        await sleep(max(0.0, outage - (now() - stopped_at)))
    timeline["node_back_begin_s"] = round(now() - stopped_at, 2)
    await threads.deferToThread(cluster.start_node, node)
    timeline["node_back_s"] = round(now() - stopped_at, 2)
    if outage is not None:
        await wait_for(lambda: stream.recovered(stopped_at, now()), RECOVERY_BOUND,
                       f"calls to succeed again after {node.nodename} came back")
    if settled is not None:
        await wait_for(settled, RECOVERY_BOUND + 15, "the servers to settle")
        timeline["settled_s"] = round(now() - stopped_at, 2)
    await sleep(2.0)
    await stream.stop()
    await stream.settle()
    return timeline


# --- scenarios ---------------------------------------------------------------------------


@pytest.mark.timeout(SCENARIO_TIMEOUT)
@pytest_twisted.ensureDeferred
async def test_a_lose_a_servers_node(cluster: RabbitCluster, harness: Harness,
                                     events: LogEvents) -> None:
    """Stopping the node one of two server instances is connected to: its unacked
    requests go back to the quorum queue and are answered by the other instance;
    no call fails, none is lost or answered twice."""
    n0, n1, n2 = cluster.nodes
    sid = new_server_id()
    await harness.server(sid, n1, "s1")  # declares: the quorum queue is led by n1
    await harness.server(sid, n0, "s0")
    proxy = await harness.proxy(n2)
    queue = f"server_{sid}_queue"
    leader = await threads.deferToThread(cluster.quorum_leader, queue)
    assert leader is n1
    stream = Stream(proxy, sid)
    timeline = await lose_node(harness, stream, n0, "stop")
    data = summarize(stream, harness.executions, events, timeline["stopped_at"])
    data.update({k: v for k, v in timeline.items() if k != "stopped_at"})
    data["s0_now_on"] = harness.node_of(harness.servers[1])
    data["errors_logged"] = dict(events.errors)
    record("a_server_node_stopped", data)
    assert_clean(data)
    assert data["failed"] == 0, data
    assert data["answered"] == data["calls"], data
    assert data["recovery_s"] <= RECOVERY_BOUND, data


@pytest.mark.timeout(SCENARIO_TIMEOUT)
@pytest_twisted.ensureDeferred
async def test_b_lose_the_quorum_leader(cluster: RabbitCluster, harness: Harness,
                                        events: LogEvents) -> None:
    """Killing (SIGKILL) the node leading the server's quorum queue, with no client
    connected to it: a new leader is elected, calls are delayed but none fails,
    none is lost or answered twice."""
    n0, n1, n2 = cluster.nodes
    sid = new_server_id()
    # An instance on n2 declares the queue (n2 leads it) and goes; the queue stays.
    declarer = await harness.server(sid, n2, "declarer")
    await declarer.stopService()
    await harness.server(sid, n0, "s0")
    await harness.server(sid, n1, "s1")
    proxy = await harness.proxy(n1)
    queue = f"server_{sid}_queue"
    assert await threads.deferToThread(cluster.quorum_leader, queue) is n2
    stream = Stream(proxy, sid)
    timeline = await lose_node(harness, stream, n2, "kill")
    data = summarize(stream, harness.executions, events, timeline["stopped_at"])
    data.update({k: v for k, v in timeline.items() if k != "stopped_at"})
    new_leader = await threads.deferToThread(cluster.quorum_leader, queue)
    data["new_leader"] = new_leader.nodename
    data["errors_logged"] = dict(events.errors)
    record("b_quorum_leader_killed", data)
    assert_clean(data)
    assert new_leader is not n2, data
    assert data["failed"] == 0, data
    assert data["answered"] == data["calls"], data
    assert data["recovery_s"] <= RECOVERY_BOUND, data


@pytest.mark.timeout(SCENARIO_TIMEOUT)
@pytest_twisted.ensureDeferred
async def test_c_lose_the_proxys_node(cluster: RabbitCluster, harness: Harness,
                                      events: LogEvents) -> None:
    """Stopping the Proxy's node (stop_app): the calls it had in flight fail at once with
    BrokerConnectionLost, it reconnects to the next node, and calls made meanwhile
    wait for it and are answered; none lost or answered twice."""
    n0, n1, n2 = cluster.nodes
    sid = new_server_id()
    await harness.server(sid, n0, "s0")
    await harness.server(sid, n1, "s1")
    proxy = await harness.proxy(n2)
    stream = Stream(proxy, sid)
    timeline = await lose_node(harness, stream, n2, "stop_app")
    stopped_at = timeline["stopped_at"]
    data = summarize(stream, harness.executions, events, stopped_at)
    data.update({k: v for k, v in timeline.items() if k != "stopped_at"})
    data["proxy_now_on"] = harness.node_of(proxy)
    failed = [c for c in stream.calls if c.error is not None]
    dropped_at = min((at for at, name, value in stream.changes
                      if name == "proxy0" and value == "-" and at >= stopped_at), default=None)
    assert dropped_at is not None, data
    data["proxy_dropped_after_s"] = round(dropped_at - stopped_at, 2)
    data["failed_issued_before_drop"] = sum(1 for c in failed if c.issued <= dropped_at)
    data["slowest_failure_after_drop_s"] = round(max(
        (c.fired_at - dropped_at for c in failed if c.fired_at is not None), default=0.0), 2)
    data["errors_logged"] = dict(events.errors)
    record("c_proxy_node_stopped", data)
    assert_clean(data)
    assert data["proxy_now_on"] == n0.nodename, data
    # Only calls in flight at the drop fail, all with BrokerConnectionLost, at once;
    # calls made while the Proxy reconnects wait for it and are answered.
    assert failed, data
    assert all(isinstance(c.error, BrokerConnectionLost) for c in failed), data
    assert data["failed_issued_before_drop"] == data["failed"], data
    assert data["slowest_failure_after_drop_s"] < 3.0, data
    assert data["answered"] + data["failed"] == data["calls"], data
    assert data["recovery_s"] <= RECOVERY_BOUND, data


@pytest.mark.timeout(SCENARIO_TIMEOUT)
@pytest_twisted.ensureDeferred
async def test_classic_queue_on_the_lost_node(cluster: RabbitCluster, harness: Harness,
                                              events: LogEvents) -> None:
    """A classic durable server queue lives on one node: while that node is down,
    declaring it answers 404 NOT_FOUND on the other nodes and calls fail with a
    clear error until the node is back; none lost or answered twice."""
    n0, n1, n2 = cluster.nodes
    sid = new_server_id()
    await harness.server(sid, n0, "s0", queue_type="classic", durable=True)
    await harness.server(sid, n1, "s1", queue_type="classic", durable=True)
    proxy = await harness.proxy(n2)
    queue = f"server_{sid}_queue"
    stream = Stream(proxy, sid)

    declares: list[str] = []

    async def declare_on_n1() -> None:
        connection = await connect(reactor, connection_params(f"127.0.0.1:{n1.port}"))
        try:
            channel = await connection.open_channel()
            try:
                await channel.declare_queue(queue, passive=True)
                declares.append("ok")
            except NotFound as e:
                declares.append(f"NotFound: {e}")
        finally:
            await connection.close()

    timeline = await lose_node(
        harness, stream, n0, "stop", outage=CLASSIC_OUTAGE, while_down=declare_on_n1,
        settled=lambda: all(harness.short(svc) in ("n0", "n1", "n2")
                            for svc in harness.servers))
    await declare_on_n1()  # and after n0 is back
    stopped_at = timeline["stopped_at"]
    data = summarize(stream, harness.executions, events, stopped_at)
    data.update({k: v for k, v in timeline.items() if k != "stopped_at"})
    data["declares_on_n1"] = declares
    data["s0_now_on"] = harness.node_of(harness.servers[0])
    back = stopped_at + timeline["node_back_s"]
    failed = [c for c in stream.calls if c.error is not None]
    data["slowest_failure_s"] = round(max((c.fired_at - c.issued for c in failed
                                           if c.fired_at is not None), default=0.0), 2)
    data["failed_after_node_back"] = sum(1 for c in failed if c.issued >= back)
    # Once the queue is back, a confirmed count of 0 makes new calls fail fast, unsent,
    # until the next count (at most a second later) sees the consumer that came back.
    first_back = min((c.issued for c in stream.calls if c.answered and c.issued >= back),
                     default=None)
    late = [c for c in failed if c.issued >= back]
    data["failed_after_node_back_unsent"] = sum(
        1 for c in late if "no server consumes its queue" in str(c.error))
    data["last_failure_after_first_answer_s"] = round(max(
        (c.issued - first_back for c in late if first_back is not None), default=0.0), 2)
    row = await threads.deferToThread(cluster.queue, queue, "consumers")
    data["consumers_after"] = row["consumers"]
    data["answered_by_s1_after_node_back"] = sum(
        1 for c in stream.calls if c.answered and c.issued >= back and c.value[1] == "s1")
    data["errors_logged"] = dict(events.errors)
    record("classic_home_node_stopped", data)
    assert_clean(data)
    # Declaring the queue elsewhere answers 404 while its home node is down.
    assert declares[0].startswith("NotFound: 404 NOT_FOUND - home node"), data
    assert "is down or inaccessible" in declares[0], data
    assert declares[1] == "ok", data
    # Calls fail fast with ServerUnavailable (returned unroutable) until it is back...
    assert failed and all(isinstance(c.error, ServerUnavailable) for c in failed), data
    assert data["slowest_failure_s"] < 3.0, data
    assert data["failed_after_node_back_unsent"] == data["failed_after_node_back"], data
    assert data["last_failure_after_first_answer_s"] <= 2.0, data
    # ... and succeed again once it is back and a server consumes the queue again.
    assert CLASSIC_OUTAGE - 1 <= data["recovery_s"] <= timeline["node_back_s"] + 30, data
    # The instance on another node was sent basic.cancel when the queue went down;
    # it must consume again once the queue is back.
    assert data["consumers_after"] == 2, data
    assert data["answered_by_s1_after_node_back"] > 0, data
