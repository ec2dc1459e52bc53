"""Traces and metrics through the real broker: spans across the broker hop, refusals,
and a Prometheus scrape whose counts equal the calls made; and the request fields of
warn/error log events (those hard to cause on a real broker in memory, on a Clock)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from _brokerctl import RawClient, request_body
from conftest import Services, sleep
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from test_observe import Telemetry, telemetry_on
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.client import Agent, readBody

from txcallme import RpcTimeout, ServerUnavailable, UnknownMethod, observe
from txcallme._metrics_http import metrics_site
from txcallme.errors import AccessRefused, ChannelError, PublishNacked

pytestmark = [pytest.mark.timeout(90), pytest.mark.filterwarnings("ignore:Using readBody")]


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """Tracing, OTel metrics and Prometheus on (private SDK providers); off afterwards."""
    yield from telemetry_on()


async def finished(telemetry: Telemetry, count: int, timeout: float = 10.0) -> list[Any]:
    """The finished spans, once there are *count* of them."""
    end = time.monotonic() + timeout
    while len(telemetry.finished()) < count:
        assert time.monotonic() < end, f"spans: {[s.name for s in telemetry.finished()]}"
        await sleep(0.02)
    spans = telemetry.finished()
    assert len(spans) == count, [s.name for s in spans]
    return spans


def one(spans: list[Any], kind: SpanKind) -> Any:
    [span] = [s for s in spans if s.kind is kind]
    return span


async def scrape(port: int) -> str:
    """GET /metrics over HTTP."""
    agent = Agent(reactor)
    response = await agent.request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [
        b"text/plain; version=0.0.4; charset=utf-8"]
    return (await readBody(response)).decode()


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed by prometheus_client, by (name, labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def count(got: dict[Any, float], side: str, sid: str, method: str, outcome: str) -> float:
    return got.get((f"txcallme_{side}_call_duration_seconds_count",
                    (("method", method), ("outcome", outcome), ("server_id", sid))), 0)


@pytest_twisted.ensureDeferred
async def test_server_span_is_a_child_of_the_client_span(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """One call: a CLIENT span and, through the request headers, its child SERVER span."""
    await services.start_server(sid, {"add": lambda a, b: a + b})
    proxy = await services.ready_proxy()
    assert await proxy.call(sid, "add", 1, 2) == 3
    spans = await finished(telemetry, 2)
    client, server = one(spans, SpanKind.CLIENT), one(spans, SpanKind.SERVER)
    assert client.name == server.name == f"{sid}/add"
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert server.context.trace_id == client.context.trace_id
    corr = client.attributes["messaging.message.conversation_id"]
    assert len(corr) == 24 and server.attributes["messaging.message.conversation_id"] == corr
    for span in (client, server):
        assert span.attributes["rpc.system.name"] == "txcallme"
        assert span.attributes["rpc.method"] == f"{sid}/add"
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.destination.name"] == f"server_{sid}_ex"
        assert span.status.status_code is StatusCode.UNSET
    assert client.start_time < server.start_time <= server.end_time <= client.end_time
    assert list(client.events) == []


@pytest_twisted.ensureDeferred
async def test_remote_error_spans(telemetry: Telemetry, services: Services, sid: str) -> None:
    """A function that raises: both spans ERROR, with the exception type and event."""
    await services.start_server(sid, {"div": lambda a, b: a / b})
    proxy = await services.ready_proxy()
    with pytest.raises(ZeroDivisionError):
        await proxy.call(sid, "div", 1, 0)
    spans = await finished(telemetry, 2)
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR, span.kind
        assert span.attributes["error.type"] == "ZeroDivisionError"
        [event] = span.events
        assert event.name == "exception"
        assert event.attributes["exception.type"] == "ZeroDivisionError"
    server = one(spans, SpanKind.SERVER)
    assert "ZeroDivisionError: division by zero" in server.events[0].attributes[
        "exception.stacktrace"]


@pytest_twisted.ensureDeferred
async def test_timeout_span(telemetry: Telemetry, services: Services, sid: str) -> None:
    """A call that times out ends its CLIENT span in ERROR with RpcTimeout."""
    async def slow() -> str:
        await deferLater(reactor, 1.0, lambda: None)
        return "late"

    await services.start_server(sid, {"slow": slow})
    proxy = await services.ready_proxy()
    with pytest.raises(RpcTimeout):
        await proxy.invoke(sid, "slow", timeout=0.3)
    [client] = telemetry.finished()
    assert client.kind is SpanKind.CLIENT
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes["error.type"] == "txcallme.errors.RpcTimeout"
    assert client.events[-1].attributes["exception.type"] == "txcallme.errors.RpcTimeout"
    spans = await finished(telemetry, 2)  # the server still finishes (and replies late)
    assert one(spans, SpanKind.SERVER).status.status_code is StatusCode.UNSET


@pytest_twisted.ensureDeferred
async def test_unknown_method_spans(telemetry: Telemetry, services: Services,
                                    sid: str) -> None:
    """A method the server lacks: SERVER span 'txcallme' with rpc.method _OTHER, both ERROR."""
    await services.start_server(sid, {"add": lambda a, b: a + b})
    proxy = await services.ready_proxy()
    with pytest.raises(UnknownMethod):
        await proxy.call(sid, "no_such_thing")
    spans = await finished(telemetry, 2)
    client, server = one(spans, SpanKind.CLIENT), one(spans, SpanKind.SERVER)
    assert client.name == f"{sid}/no_such_thing"
    assert server.name == "txcallme"
    assert server.attributes["rpc.method"] == "_OTHER"
    assert server.attributes["rpc.method_original"] == f"{sid}/no_such_thing"
    assert server.parent.span_id == client.context.span_id
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["error.type"] == "txcallme.errors.UnknownMethod"


@pytest_twisted.ensureDeferred
async def test_refused_requests_spans_and_counts(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """Stale, invalid and too-large requests: one ERROR span each, counted by reason; a
    stale request's span continues the trace in its headers."""
    ran: list[int] = []
    await services.start_server(sid, {"mark": lambda x: ran.append(x) or x},
                                max_body_size=1024)
    client = await RawClient().open()
    tracer = telemetry.tracer_provider.get_tracer("test")
    try:
        props = {"reply_to": client.exchange, "content_type": "application/json"}
        with tracer.start_as_current_span("caller") as caller:
            headers: dict[str, str] = {}
            propagate.inject(headers)
        stale = json.dumps({"method": "mark", "args": [1], "deadline": time.time() - 1})
        client.send(sid, stale.encode(), correlation_id="stale", headers=headers, **props)
        client.send(sid, b"{not json", correlation_id="bad", **props)
        client.send(sid, request_body("mark", "x" * 2000), correlation_id="big", **props)
        replies = [await client.next_reply(), await client.next_reply()]
        assert sorted(r.properties["correlation_id"] for r in replies) == ["bad", "big"]
        spans = await finished(telemetry, 4)  # the caller's span and three refusals
    finally:
        await client.close()
    assert ran == []
    refused = {s.attributes["txcallme.refused"]: s for s in spans if s.kind is SpanKind.SERVER}
    assert sorted(refused) == ["invalid", "stale", "too_large"]
    assert refused["stale"].parent.span_id == caller.get_span_context().span_id
    assert refused["stale"].name == f"{sid}/mark"
    assert refused["stale"].attributes["error.type"] == "txcallme.errors.RequestExpired"
    assert refused["invalid"].attributes["error.type"] == "txcallme.errors.InvalidRequest"
    assert refused["too_large"].attributes["error.type"] == "txcallme.errors.PayloadTooLarge"
    assert all(s.status.status_code is StatusCode.ERROR for s in refused.values())
    got = values(observe.prometheus_text())
    for reason in ("stale", "invalid", "too_large"):
        assert got[("txcallme_server_requests_refused_total",
                    (("reason", reason), ("server_id", sid)))] == 1


@pytest_twisted.ensureDeferred
async def test_prometheus_scrape_during_a_real_run(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """A scrape over HTTP in the middle of a run counts exactly the calls made, by outcome,
    with the running call in flight and its pool thread busy."""
    gate = threading.Event()

    def wait() -> str:
        gate.wait(20)
        return "done"

    await services.start_server(sid, {"add": lambda a, b: a + b, "div": lambda a, b: a / b,
                                      "wait": wait}, threading=True, threads=2)
    proxy = await services.ready_proxy()
    port = reactor.listenTCP(0, metrics_site(observe.enable_prometheus()),
                             interface="127.0.0.1")
    try:
        for i in range(5):
            assert await proxy.call(sid, "add", i, 1) == i + 1
        for _ in range(2):
            with pytest.raises(ZeroDivisionError):
                await proxy.call(sid, "div", 1, 0)
        for name in ("nope", "drop_tables"):
            with pytest.raises(UnknownMethod):
                await proxy.call(sid, name)
        running = proxy.call(sid, "wait")
        await finished(telemetry, 18)
        await sleep(0.2)  # the wait request reaches its pool thread
        got = values(await scrape(port.getHost().port))
        gate.set()
        assert await running == "done"
    finally:
        gate.set()
        await port.stopListening()
    for side in ("client", "server"):
        assert count(got, side, sid, "add", "ok") == 5
        assert count(got, side, sid, "div", "error") == 2
        assert count(got, side, sid, "_OTHER", "unknown_method") == 2
        assert count(got, side, sid, "wait", "ok") == 0
        assert got[(f"txcallme_{side}_calls_in_flight", (("server_id", sid),))] == 1
    assert not any(dict(labels).get("method") in ("nope", "drop_tables") for _, labels in got)
    assert got[("txcallme_server_pool_threads_busy", (("server_id", sid),))] == 1
    bucket = got[("txcallme_client_call_duration_seconds_bucket",
                  (("le", "+Inf"), ("method", "add"), ("outcome", "ok"), ("server_id", sid)))]
    assert bucket == 5
    points = {(p.attributes["rpc.method"], p.attributes["txcallme.outcome"]): p.count
              for p in telemetry.points("rpc.server.call.duration")}
    assert points == {(f"{sid}/add", "ok"): 5, (f"{sid}/div", "error"): 2,
                      ("_OTHER", "unknown_method"): 2, (f"{sid}/wait", "ok"): 1}


@pytest_twisted.ensureDeferred
async def test_redelivery_and_reconnections_are_counted(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """A request redelivered after its server's connection died, and the server's and the
    proxy's reconnections, are counted."""
    gate = threading.Event()
    runs: list[bool] = []

    def work(x: int, context: Any) -> int:
        runs.append(context.redelivered)
        if not context.redelivered:
            gate.wait(20)
        return x

    first = services.server(sid, threading=True, threads=2)
    first.register_function(work, with_context=True)
    await first.when_ready()
    proxy = await services.ready_proxy(timeout=20)
    try:
        call = proxy.call(sid, "work", 7)
        while not runs:
            await sleep(0.05)
        second = await services.start_server(sid)
        second.register_function(work, with_context=True)
        first._session.connection.protocol.transport.abortConnection()
        assert await call == 7
        assert runs == [False, True]
        gate.set()
        proxy._session.connection.protocol.transport.abortConnection()
        await until(lambda: values(observe.prometheus_text()).get(
            ("txcallme_server_reconnections_total", (("server_id", sid),))) == 1)
        await until(lambda: values(observe.prometheus_text()).get(
            ("txcallme_client_reconnections_total", ())) == 1)
        assert await proxy.call(sid, "work", 8) == 8  # the proxy is back
    finally:
        gate.set()
    got = values(observe.prometheus_text())
    assert got[("txcallme_server_redeliveries_total", (("server_id", sid),))] == 1
    assert got[("txcallme_server_reconnections_total", (("server_id", sid),))] == 1
    assert got[("txcallme_client_reconnections_total", ())] == 1


async def until(predicate: Any, timeout: float = 15.0) -> None:
    """Wait until *predicate()* is true."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "gave up waiting"
        await sleep(0.05)



@pytest_twisted.ensureDeferred
async def test_warn_events_carry_request_fields(services: Services, sid: str) -> None:
    """A bad request's warn event has server_id, method and correlation_id as fields."""
    from twisted.logger import LogLevel, globalLogPublisher

    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "callme.server" and \
                event.get("log_level") in (LogLevel.warn, LogLevel.error):
            events.append(event)

    await services.start_server(sid, {"add": lambda a, b: a + b})
    client = await RawClient().open()
    globalLogPublisher.addObserver(observer)
    try:
        client.send(sid, b"{not json", correlation_id="bad-1", reply_to=client.exchange,
                    content_type="application/json")
        client.send(sid, request_body("add", 1, 2), correlation_id="no-reply-to",
                    content_type="application/json")
        await client.next_reply()
        await until(lambda: len(events) >= 2)
    finally:
        globalLogPublisher.removeObserver(observer)
        await client.close()
    fields = {e["correlation_id"]: (e["server_id"], e["method"]) for e in events}
    assert fields == {"bad-1": (sid, None), "no-reply-to": (sid, "add")}


def _wait_for_a_second_request(svc: Any, pause: float) -> None:
    """In a pool thread: wait until *svc* holds a request waiting for a thread, then
    *pause* seconds (so the waiting request waits at least that long after its receipt)."""
    end = time.monotonic() + 20
    while not svc._waiting:
        assert time.monotonic() < end, "the second request never arrived"
        time.sleep(0.005)
    time.sleep(pause)


@pytest_twisted.ensureDeferred
async def test_server_duration_includes_the_wait_for_a_thread(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """Pool of one thread, two blocking requests: the second's SERVER span and recorded
    duration run from its receipt, so they include the >= 0.3 s it waited for the thread."""
    held: list[Any] = []

    def slow() -> str:
        _wait_for_a_second_request(held[0], 0.3)
        return "slow"

    svc = await services.start_server(sid, {"slow": slow, "quick": lambda: "quick"},
                                      threading=True, threads=1)
    held.append(svc)
    proxy = await services.ready_proxy(timeout=30)
    first, second = proxy.call(sid, "slow"), proxy.call(sid, "quick")
    assert (await first, await second) == ("slow", "quick")
    spans = await finished(telemetry, 4)
    server = {s.name: s for s in spans if s.kind is SpanKind.SERVER}
    client = {s.name: s for s in spans if s.kind is SpanKind.CLIENT}
    quick = server[f"{sid}/quick"]
    assert (quick.end_time - quick.start_time) / 1e9 >= 0.3
    assert quick.start_time < server[f"{sid}/slow"].end_time  # started while it waited
    assert quick.parent.span_id == client[f"{sid}/quick"].context.span_id
    assert quick.status.status_code is StatusCode.UNSET
    got = values(observe.prometheus_text())
    labels = (("method", "quick"), ("outcome", "ok"), ("server_id", sid))
    assert got[("txcallme_server_call_duration_seconds_count", labels)] == 1
    assert got[("txcallme_server_call_duration_seconds_sum", labels)] >= 0.3
    assert got[("txcallme_server_calls_in_flight", (("server_id", sid),))] == 0
    [point] = [p for p in telemetry.points("rpc.server.call.duration")
               if p.attributes["rpc.method"] == f"{sid}/quick"]
    assert point.count == 1 and point.sum >= 0.3


@pytest_twisted.ensureDeferred
async def test_request_stale_after_waiting_for_a_thread(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """A request whose deadline passes while it waits for the one pool thread is not run:
    its SERVER span (started at receipt, a child of the caller's) ends as a stale
    refusal, it is counted as refused and not as a call, and nothing stays in flight."""
    held: list[Any] = []
    ran: list[str] = []

    def slow() -> str:
        _wait_for_a_second_request(held[0], 0.8)
        return "slow"

    svc = await services.start_server(sid, {"slow": slow, "quick": lambda: ran.append("q")},
                                      threading=True, threads=1)
    held.append(svc)
    proxy = await services.ready_proxy(timeout=30)
    first = proxy.call(sid, "slow")
    second = proxy.invoke(sid, "quick", timeout=0.3)
    with pytest.raises(RpcTimeout):
        await second
    assert await first == "slow"
    spans = await finished(telemetry, 4)
    server = {s.name: s for s in spans if s.kind is SpanKind.SERVER}
    client = {s.name: s for s in spans if s.kind is SpanKind.CLIENT}
    quick = server[f"{sid}/quick"]
    assert quick.attributes["txcallme.refused"] == "stale"
    assert quick.attributes["error.type"] == "txcallme.errors.RequestExpired"
    assert quick.status.status_code is StatusCode.ERROR
    assert quick.parent.span_id == client[f"{sid}/quick"].context.span_id
    assert (quick.end_time - quick.start_time) / 1e9 >= 0.8  # from receipt: the wait
    assert ran == []
    got = values(observe.prometheus_text())
    assert got[("txcallme_server_requests_refused_total",
                (("reason", "stale"), ("server_id", sid)))] == 1
    assert count(got, "server", sid, "quick", "ok") == 0
    assert count(got, "server", sid, "slow", "ok") == 1
    assert got[("txcallme_server_calls_in_flight", (("server_id", sid),))] == 0
    assert not [p for p in telemetry.points("rpc.server.call.duration")
                if p.attributes["rpc.method"] == f"{sid}/quick"]


@pytest_twisted.ensureDeferred
async def test_waiting_requests_requeued_on_stop_leave_no_call_in_flight(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """A request waiting for a thread when its server stops goes back to the queue: its
    span ends marked requeued (not an error, not a refusal) and it is no longer in
    flight; another instance answers it."""
    held: list[Any] = []

    def slow() -> str:
        _wait_for_a_second_request(held[0], 0.2)
        return "slow"

    svc = await services.start_server(sid, {"slow": slow, "quick": lambda: "quick"},
                                      threading=True, threads=1)
    held.append(svc)
    proxy = await services.ready_proxy(timeout=30)
    first, second = proxy.call(sid, "slow"), proxy.call(sid, "quick")
    await until(lambda: bool(svc._waiting))
    other = await services.start_server(sid, {"quick": lambda: "quick"})
    await svc.stopService()
    assert svc.requeued_on_stop == 1
    assert (await first, await second) == ("slow", "quick")
    await other.stopService()
    spans = await finished(telemetry, 5)  # two CLIENT, slow, requeued quick, answered quick
    quick = [s for s in spans if s.kind is SpanKind.SERVER and s.name == f"{sid}/quick"]
    [requeued] = [s for s in quick if s.attributes.get("txcallme.requeued")]
    [answered] = [s for s in quick if s is not requeued]
    assert requeued.status.status_code is StatusCode.UNSET
    assert "txcallme.refused" not in requeued.attributes
    assert answered.parent.span_id == requeued.parent.span_id
    got = values(observe.prometheus_text())
    assert got[("txcallme_server_calls_in_flight", (("server_id", sid),))] == 0
    assert count(got, "server", sid, "quick", "ok") == 1
    assert not any(name == "txcallme_server_requests_refused_total" for name, _ in got)


@pytest_twisted.ensureDeferred
async def test_waiting_requests_dropped_with_the_connection_end_requeued(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """A request waiting for a thread when the server's connection drops (the broker
    requeues it) ends requeued at once, while the running call goes on; both are
    redelivered and answered, and nothing is left in flight."""
    held: list[Any] = []
    gate = threading.Event()
    runs: list[str] = []

    def slow() -> str:
        runs.append("slow")
        if len(runs) == 1:
            _wait_for_a_second_request(held[0], 0)
            gate.wait(20)
        return "slow"

    svc = await services.start_server(sid, {"slow": slow, "quick": lambda: "quick"},
                                      threading=True, threads=1)
    held.append(svc)
    proxy = await services.ready_proxy(timeout=30)
    try:
        first, second = proxy.call(sid, "slow"), proxy.call(sid, "quick")
        await until(lambda: bool(svc._waiting))
        # a second instance keeps the auto-delete queue (and the requeued requests)
        await services.start_server(sid, {"slow": slow, "quick": lambda: "quick"})
        svc._session.connection.protocol.transport.abortConnection()
        await until(lambda: not svc._waiting)
        [requeued] = [s for s in telemetry.finished() if s.attributes.get("txcallme.requeued")]
        assert requeued.name == f"{sid}/quick" and requeued.kind is SpanKind.SERVER
        assert "txcallme.refused" not in requeued.attributes
        assert not gate.is_set() and runs[0] == "slow"  # the first slow still runs
    finally:
        gate.set()
    assert (await first, await second) == ("slow", "quick")  # redelivered, answered
    await until(lambda: values(observe.prometheus_text())[
        ("txcallme_server_calls_in_flight", (("server_id", sid),))] == 0)


@pytest_twisted.ensureDeferred
async def test_tracestate_reaches_the_server_span(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """A tracestate on the caller's context travels with the request: the SERVER span's
    parent context carries it (and so does the server span)."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    await services.start_server(sid, {"add": lambda a, b: a + b})
    proxy = await services.ready_proxy()
    state = TraceState([("vendor", "opaque-1"), ("other", "x")])
    caller = SpanContext(0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0, 0x0FED_CBA9_8765_4321,
                         is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED),
                         trace_state=state)
    with trace.use_span(NonRecordingSpan(caller)):
        call = proxy.call(sid, "add", 1, 2)
    assert await call == 3
    spans = await finished(telemetry, 2)
    client, server = one(spans, SpanKind.CLIENT), one(spans, SpanKind.SERVER)
    assert client.parent.span_id == caller.span_id
    assert server.parent.span_id == client.context.span_id
    assert server.parent.is_remote
    assert dict(server.parent.trace_state) == {"vendor": "opaque-1", "other": "x"}
    assert dict(server.context.trace_state) == {"vendor": "opaque-1", "other": "x"}
    assert server.context.trace_id == caller.trace_id


@pytest_twisted.ensureDeferred
async def test_server_unavailable_client_span(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """A call to a server id nobody serves: the CLIENT span ends in ERROR with error.type
    ServerUnavailable and its exception event; counted with outcome unavailable."""
    proxy = await services.ready_proxy()
    with pytest.raises(ServerUnavailable):
        await proxy.call(sid, "add", 1, 2)
    [span] = await finished(telemetry, 1)
    assert span.kind is SpanKind.CLIENT and span.name == f"{sid}/add"
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "txcallme.errors.ServerUnavailable"
    [event] = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "txcallme.errors.ServerUnavailable"
    assert count(values(observe.prometheus_text()), "client", sid, "add", "unavailable") == 1


# -- warn/error events carry server_id, method and correlation_id (issue 13 item 4) ------


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """The warn, error and critical events of the callme.server namespace."""
    from twisted.logger import LogLevel, globalLogPublisher

    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "callme.server" and event.get("log_level") in (
                LogLevel.warn, LogLevel.error, LogLevel.critical):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def _fail_next_reply(server: Any, error: Exception) -> None:
    """The server's next reply publish fails with *error* (later ones go through)."""
    from twisted.internet.defer import fail

    replies = server._replies
    publish = replies.publish

    def once(*args: Any) -> Any:
        replies.publish = publish
        return fail(error)

    replies.publish = once


def _refuse_dispatch(server: Any) -> None:
    """The server's dispatcher raises instead of answering (it never does by itself)."""
    def broken(request: Any, context: Any) -> Any:
        server.test_corrs.append(context().correlation_id)
        raise RuntimeError("dispatcher broken")

    server.dispatcher.dispatch = broken


# scenario: (what to do to the server before the call, the method called, the text of
# the one event expected, whether the clock runs 60 s ahead of the caller's)
EVENT_SCENARIOS = {
    "clock skew": (None, "add", "this server's clock seems ahead", True),
    "cannot start": (_refuse_dispatch, "add", "cannot start {method}", False),
    "reply nacked": (lambda s: _fail_next_reply(s, PublishNacked()), "add",
                     "not taken by the broker", False),
    "reply refused": (lambda s: _fail_next_reply(s, AccessRefused(
        403, "ACCESS_REFUSED - write access to exchange 'x' refused for user 'u'")), "add",
        "may not reply to", False),
    "reply failed": (lambda s: _fail_next_reply(s, ChannelError(
        406, "PRECONDITION_FAILED - something")), "add", "cannot reply to", False),
    "unserializable result": (None, "unserializable", "cannot be serialized", False),
}


@pytest.mark.parametrize("scenario", list(EVENT_SCENARIOS))
def test_warn_events_of_one_request_carry_its_fields(
        scenario: str, logged: list[dict[str, Any]]) -> None:
    """Each warn/error event the server logs about a request (in memory, on a Clock) has
    server_id, method and correlation_id as event fields: the request's own."""
    from twisted.internet.task import Clock

    from txcallme.testing import MemoryBroker

    prepare, method, text, skewed = EVENT_SCENARIOS[scenario]
    reply_lost = scenario in ("reply refused", "reply failed")
    clock = Clock()
    if skewed:  # the server's clock (this Clock) is 60 s ahead of the caller's time.time()
        clock.advance(time.time() + 60)
    broker = MemoryBroker(clock)
    server = broker.server("logserver")
    server.test_corrs = corrs = []  # type: ignore[attr-defined]

    def add(a: int, b: int, context: Any) -> int:
        corrs.append(context.correlation_id)
        return a + b

    def unserializable(context: Any) -> object:
        corrs.append(context.correlation_id)
        return object()

    server.register_function(add, with_context=True)
    server.register_function(unserializable, with_context=True)
    proxy = broker.proxy(timeout=5)
    try:
        if prepare is not None:
            prepare(server)
        d = proxy.call("logserver", method, *((1, 2) if method == "add" else ()))
        broker.settle()
        if reply_lost:  # the server dropped the reply: the call times out
            assert not d.called
            clock.advance(5.1)
        d.addErrback(lambda f: f.value)  # an error (reply) is fine: the log is the point
        assert d.called
    finally:
        proxy.close()
        server.stop()
        broker.settle()
    [corr] = set(corrs)
    assert isinstance(corr, str) and corr
    found = [e for e in logged if text in e["log_format"]]
    assert len(found) == 1, [e["log_format"] for e in logged]
    [event] = found
    assert (event["server_id"], event["method"], event["correlation_id"]) == (
        "logserver", method, corr)


class _InlineReactor:
    """callFromThread runs at once (a thread pool that runs inline needs nothing more)."""

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        f(*args, **kwargs)


class _InlinePool:
    """A thread pool that runs the work in the caller's thread, or refuses it."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse

    def callInThreadWithCallback(self, on_result: Any, f: Any,  # noqa: N802
                                 *args: Any, **kwargs: Any) -> None:
        if self.refuse:
            raise RuntimeError("the pool is stopped")
        on_result(True, f(*args, **kwargs))


@pytest.mark.parametrize(("refuse", "text"), [
    (True, "cannot start {method}"), (False, "from a worker thread")])
@pytest.mark.parametrize("with_context", [True, False])
def test_dispatcher_events_carry_request_fields(
        refuse: bool, text: str, with_context: bool, logged: list[dict[str, Any]]) -> None:
    """The Dispatcher's own warn/error events about a request (the pool refused the work;
    a blocking function returned a Deferred) carry server_id and correlation_id from the
    CallContext, and method; without a context, server_id and correlation_id are None."""
    from twisted.internet.defer import Deferred

    from txcallme._wire import Request
    from txcallme.serializers import JSON
    from txcallme.server import CallContext, Dispatcher

    dispatcher = Dispatcher(JSON, reactor=_InlineReactor(), thread_pool=_InlinePool(refuse))
    dispatcher.register(lambda: Deferred(), "deferred", blocking=True)
    context = (lambda: CallContext("dispserver", "deferred", "corr-7", "reply", False, None)) \
        if with_context else None
    body = dispatcher.dispatch(Request("deferred", [], {}, None), context)
    assert b'"txcallme.errors.ServiceError"' in body.result  # type: ignore[attr-defined]
    found = [e for e in logged if text in e["log_format"]]
    assert len(found) == 1, [e["log_format"] for e in logged]
    [event] = found
    expected = ("dispserver", "corr-7") if with_context else (None, None)
    assert (event["server_id"], event["correlation_id"]) == expected
    assert event["method"] == "deferred"
