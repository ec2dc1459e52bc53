"""Hostile and malformed input, published straight to a live server or a Proxy (vhost '/').

Each case checks that the server does not crash, answers with a clear error
when it has somewhere to answer, does not requeue the message in a loop, and
still serves a proper Proxy call afterwards.
"""

from __future__ import annotations

import datetime
import decimal
import json
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conftest
import pika
import pytest
import pytest_twisted
from _brokerctl import BROKER_HOST, RawClient, request_body
from conftest import Services, sleep
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands as pamqp_commands
from twisted.internet import defer, threads

from txcallme import _wire

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
INVALID = "txcallme.errors.InvalidRequest"


def add(a: int, b: int) -> int:
    return a + b


async def slow_double(x: int) -> int:
    await sleep(1.0)
    return 2 * x


@pytest_twisted.async_yield_fixture
async def raw() -> Any:
    """A hand-driven guest connection with its own reply exchange and queue."""
    client = RawClient()
    conftest._created_names.update((client.exchange, client.queue))  # leak check
    await client.open()
    try:
        yield client
    finally:
        await client.close()


async def _replies_after(client: RawClient, seconds: float) -> list[Any]:
    """Wait *seconds*; return what arrived on the reply queue meanwhile (and clear it)."""
    await sleep(seconds)
    return client.take_all()


async def _still_serving(services: Services, client: RawClient, sid: str) -> None:
    """The server acked everything (no requeue loop) and answers a Proxy call."""
    assert await client.message_count(_wire.server_queue(sid)) == 0
    proxy = services.proxy()
    assert await proxy.call(sid, "add", 20, 22) == 42


# --- malformed requests ---------------------------------------------------------------

DEEP = b"[" * 100_000
CASES = {
    "invalid json": (b'{"method": "add", "args": [1, ', {}, INVALID, "invalid JSON"),
    "json list": (b"[1, 2]", {}, INVALID, "must be an object"),
    "missing method": (b'{"args": [1, 2]}', {}, INVALID, "method"),
    "args not a list": (b'{"method": "add", "args": {"a": 1}}', {}, INVALID, "args"),
    "kwargs not an object": (b'{"method": "add", "kwargs": [1]}', {}, INVALID, "kwargs"),
    "unknown fields": (b'{"method": "add", "evil": 1}', {}, INVALID, "unknown"),
    "unknown content type": (request_body("add", 1, 2),
                             {"content_type": "application/x-msgpack"}, INVALID,
                             "application/x-msgpack"),
    "not utf-8": (b'{"method": "\xff\xfe"}', {}, INVALID, "UTF-8"),
    "deeply nested": (DEEP, {}, INVALID, "nested deeper"),
    "empty body": (b"", {}, INVALID, ""),
    "unknown method": (request_body("os.system", "true"), {},
                       "txcallme.errors.UnknownMethod", "os.system"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest_twisted.ensureDeferred
async def test_malformed_request(services: Services, sid: str, raw: RawClient,
                                 case: str) -> None:
    """A malformed request gets one clear error reply and the server keeps serving."""
    body, props, error_type, text = CASES[case]
    await services.start_server(sid, {"add": add})
    props = {"content_type": "application/json", **props, "reply_to": raw.exchange,
             "correlation_id": f"bad-{case}"}
    raw.send(sid, body, **props)
    reply = await raw.next_reply()
    assert reply.properties.get("correlation_id") == f"bad-{case}"
    error = json.loads(reply.body)["error"]
    assert error["type"] == error_type
    assert text in error["message"]
    assert await _replies_after(raw, 0.5) == []  # exactly one reply: no redelivery loop
    await _still_serving(services, raw, sid)


@pytest_twisted.ensureDeferred
async def test_body_over_max_body_size(services: Services, sid: str, raw: RawClient) -> None:
    """A body over max_body_size is refused with PayloadTooLarge, never read whole."""
    await services.start_server(sid, {"add": add}, max_body_size=1024)
    body = json.dumps({"method": "add", "args": ["x" * 4000, ""]}).encode()
    assert len(body) > 4000
    raw.send(sid, body, reply_to=raw.exchange, correlation_id="big",
             content_type="application/json")
    replies = await _replies_after(raw, 2.0)
    await _still_serving(services, raw, sid)  # acked once, not read whole, server alive
    assert len(replies) == 1, "no PayloadTooLarge reply (reply_to was lost with the body)"
    reply = replies[0]
    assert reply.properties.get("correlation_id") == "big"
    error = json.loads(reply.body)["error"]
    assert error["type"] == "txcallme.errors.PayloadTooLarge"
    assert "1024" in error["message"]


@pytest_twisted.ensureDeferred
async def test_missing_reply_to(services: Services, sid: str, raw: RawClient) -> None:
    """Requests without reply_to (valid or not) are dropped quietly; the server serves on."""
    calls: list[int] = []

    def record(x: int) -> int:
        calls.append(x)
        return x

    await services.start_server(sid, {"add": add, "record": record})
    raw.send(sid, request_body("record", 1), correlation_id="c1",
             content_type="application/json")
    raw.send(sid, b"not json", correlation_id="c2", content_type="application/json")
    raw.send(sid, b"\x80\x81", content_type="application/x-msgpack")
    assert await _replies_after(raw, 0.5) == []
    assert calls == []  # a request nobody can get the answer of is not run
    await _still_serving(services, raw, sid)


@pytest_twisted.ensureDeferred
async def test_missing_correlation_id(services: Services, sid: str, raw: RawClient) -> None:
    """Without a correlation id the result or error still comes back, without one."""
    await services.start_server(sid, {"add": add})
    raw.send(sid, request_body("add", 1, 2), reply_to=raw.exchange,
             content_type="application/json")
    reply = await raw.next_reply()
    assert json.loads(reply.body) == {"result": 3}
    assert reply.properties.get("correlation_id") is None
    raw.send(sid, b"{", reply_to=raw.exchange)
    reply = await raw.next_reply()
    assert json.loads(reply.body)["error"]["type"] == INVALID
    assert reply.properties.get("correlation_id") is None
    await _still_serving(services, raw, sid)


# --- pickle -------------------------------------------------------------------------


class _Exploit:
    """Unpickling this creates (truncates) the file at *path*."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("content_type", ["application/x-python-pickle", "application/json"])
@pytest_twisted.ensureDeferred
async def test_pickle_is_never_unpickled(services: Services, sid: str, raw: RawClient,
                                         tmp_path: Path, content_type: str) -> None:
    """A JSON server refuses a pickle payload, whatever its content type, without loading it."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    pickle.loads(pickle.dumps(_Exploit(tmp_path / "selftest")))  # the exploit does work
    assert (tmp_path / "selftest").exists()
    await services.start_server(sid, {"add": add})
    raw.send(sid, payload, reply_to=raw.exchange, correlation_id="p",
             content_type=content_type)
    reply = await raw.next_reply()
    error = json.loads(reply.body)["error"]
    assert error["type"] == INVALID
    if content_type == "application/json":
        assert "UTF-8" in error["message"] or "JSON" in error["message"]
    else:
        assert "application/x-python-pickle" in error["message"]
    assert not marker.exists()
    await _still_serving(services, raw, sid)
    assert not marker.exists()


# --- header tables from another client library ---------------------------------------

ALL_TYPES_HEADERS: dict[str, Any] = {
    "array": [1, "two", [3, [4]], {"five": 5}, None, True, b"\x01"],
    "table": {"nested": {"deeper": {"deepest": "x"}}, "n": -1},
    "decimal": decimal.Decimal("3.14159"),
    "negative_decimal": decimal.Decimal("-0.001"),
    "timestamp": datetime.datetime(2024, 2, 29, 12, 30, 45),
    "bytes": b"\x00\xff\x80binary",
    "true": True,
    "false": False,
    "none": None,
    "big_int": 2**62,
    "negative_big_int": -(2**62),
    "small_int": 7,
    "text": "héllo ✓",
    "empty_text": "",
    "empty_array": [],
    "empty_table": {},
}


#: pika cannot encode floats in tables; pamqp encodes these (floats as 32-bit 'f',
#: ints as 'b'/'s'/'I'/'l' by size, bytearray as 'x').
PAMQP_HEADERS: dict[str, Any] = {
    "float": 1.5, "array_of_floats": [0.25, -2.5, {"f": 3.0}], "byte": 1, "short": 300,
    "long": -100_000, "long_long": 2**40, "bytearray": bytearray(b"\x00\x01"),
    "decimal": decimal.Decimal("-12.5"), "timestamp": datetime.datetime(1999, 12, 31),
    "nested": {"a": [None, True, {"b": "c"}]},
}


class _PamqpProperties(pika.BasicProperties):
    """Message properties encoded by pamqp instead of pika, sent through pika."""

    def __init__(self, **properties: Any) -> None:
        super().__init__()
        self._raw = pamqp_commands.Basic.Properties(**properties).marshal()

    def encode(self) -> list[bytes]:
        return [self._raw]


def _pika_publish(exchange: str, routing_key: str,
                  messages: list[tuple[bytes, pika.BasicProperties]]) -> None:
    """Publish messages with pika (blocking; run it in a thread)."""
    params = pika.ConnectionParameters(BROKER_HOST, 5672, "/",
                                       pika.PlainCredentials("guest", "guest"))
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        for body, properties in messages:
            channel.basic_publish(exchange, routing_key, body, properties)
    finally:
        connection.close()


def _foreign_messages(body: bytes, reply_to: str | None, corr: str) -> list[Any]:
    """The same body with header tables of every type: pika-encoded, then pamqp-encoded."""
    common: dict[str, Any] = {"content_type": "application/json", "reply_to": reply_to}
    return [
        (body, pika.BasicProperties(
            correlation_id=f"{corr}-pika", headers=ALL_TYPES_HEADERS,
            timestamp=int(time.time()), priority=3, delivery_mode=1, message_id="m1",
            type="t", user_id="guest", app_id="pika", content_encoding="identity",
            expiration="60000", **common)),
        (body, _PamqpProperties(correlation_id=f"{corr}-pamqp", headers=PAMQP_HEADERS,
                                **{k: v for k, v in common.items() if v is not None})),
    ]


@pytest_twisted.ensureDeferred
async def test_server_reads_header_tables_of_every_type(services: Services, sid: str,
                                                        raw: RawClient) -> None:
    """A request from pika with headers of every AMQP field type is answered normally."""
    await services.start_server(sid, {"add": add})
    await threads.deferToThread(_pika_publish, _wire.server_exchange(sid), sid,
                                _foreign_messages(request_body("add", 2, 3), raw.exchange, "pk"))
    raw.send(sid, request_body("add", 3, 4), reply_to=raw.exchange, correlation_id="pk-d",
             content_type="application/json", headers={"double": 2.5, "list": [1e300]})
    replies = {}
    for _ in range(3):
        reply = await raw.next_reply()
        replies[reply.properties.get("correlation_id")] = json.loads(reply.body)
    assert replies == {"pk-pika": {"result": 5}, "pk-pamqp": {"result": 5},
                       "pk-d": {"result": 7}}
    await _still_serving(services, raw, sid)


@pytest_twisted.ensureDeferred
async def test_proxy_reads_header_tables_of_every_type(services: Services, sid: str) -> None:
    """Foreign messages with every header type on a Proxy's reply queue harm no pending call."""
    await services.start_server(sid, {"double": slow_double})
    proxy = await services.ready_proxy()
    pending = proxy.call(sid, "double", 21)
    await sleep(0.2)
    await threads.deferToThread(_pika_publish, proxy.exchange, proxy.exchange,
                                _foreign_messages(b'{"result": "forged"}', None,
                                                  uuid.uuid4().hex))
    assert await pending == 42
    assert await proxy.call(sid, "double", 1) == 2


# --- garbage on a Proxy's reply queue ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_proxy_survives_garbage_replies(services: Services, sid: str,
                                              raw: RawClient) -> None:
    """Garbage on a Proxy's reply queue while 10 calls are pending: all 10 complete."""
    await services.start_server(sid, {"double": slow_double})
    proxy = await services.ready_proxy()
    pending = [proxy.call(sid, "double", i) for i in range(10)]
    await sleep(0.2)
    garbage: list[tuple[bytes, dict[str, Any]]] = [
        (b"{not json", {"correlation_id": "evil-1"}),
        (b"{not json", {}),
        (b"[1, 2, 3]", {"correlation_id": "evil-2"}),
        (b'{"result": 1, "error": 2}', {"correlation_id": "evil-3"}),
        (b'{"error": "not an object"}', {}),
        (b'{"result": "forged"}', {"correlation_id": uuid.uuid4().hex}),
        (b'{"result": "forged"}', {}),
        (b"\xff\xfe\x00", {"correlation_id": "evil-4", "content_type": "application/x-msgpack"}),
        (b"[" * 100_000, {"correlation_id": "evil-5"}),
        (b"", {}),
    ]
    for body, props in garbage:
        raw.publish(proxy.exchange, proxy.exchange, body, props)
    assert await defer.gatherResults(pending) == [2 * i for i in range(10)]
    assert proxy.pending_count == 0
    assert await proxy.call(sid, "double", 50) == 100


# --- property test: arbitrary messages against a twistd server ------------------------


class _PikaRpc:
    """A blocking pika client with its own reply queue, for sync tests."""

    def __init__(self) -> None:
        params = pika.ConnectionParameters(BROKER_HOST, 5672, "/",
                                           pika.PlainCredentials("guest", "guest"))
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        suffix = f"hostile{uuid.uuid4().hex[:8]}"
        self.exchange = _wire.client_exchange("guest", suffix)
        self.queue = _wire.client_queue("guest", suffix)
        conftest._created_names.update((self.exchange, self.queue))
        self.channel.exchange_declare(self.exchange, "direct", auto_delete=True)
        self.channel.queue_declare(self.queue, exclusive=True, auto_delete=True)
        self.channel.queue_bind(self.queue, self.exchange, self.exchange)
        self.replies = 0

    def publish(self, server_id: str, body: bytes, props: pika.BasicProperties) -> None:
        self.channel.basic_publish(_wire.server_exchange(server_id), server_id, body, props)

    def call(self, server_id: str, method: str, *args: Any, timeout: float = 5.0) -> Any:
        """Call by hand; skip other replies; fail if no answer within *timeout*."""
        corr = uuid.uuid4().hex
        self.publish(server_id, request_body(method, *args), pika.BasicProperties(
            content_type="application/json", correlation_id=corr, reply_to=self.exchange))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method_frame, props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method_frame is None:
                self.connection.sleep(0.02)
                continue
            if props.correlation_id == corr:
                return json.loads(body)
            self.replies += 1
        raise AssertionError(f"no reply from {server_id!r} within {timeout} s")

    def drain(self) -> int:
        """Take what is left on the reply queue; return how many messages."""
        n = 0
        while self.channel.basic_get(self.queue, auto_ack=True)[0] is not None:
            n += 1
        self.replies += n
        return n

    def server_queue_depth(self, server_id: str) -> int:
        ok = self.channel.queue_declare(_wire.server_queue(server_id), passive=True)
        return int(ok.method.message_count)

    def wait_for_consumer(self, server_id: str, timeout: float) -> bool:
        """Poll (passive declares on throwaway channels) until *server_id* consumes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            channel = self.connection.channel()
            try:
                ok = channel.queue_declare(_wire.server_queue(server_id), passive=True)
                if ok.method.consumer_count:
                    return True
            except pika.exceptions.ChannelClosedByBroker:
                pass
            finally:
                if channel.is_open:
                    channel.close()
            self.connection.sleep(0.2)
        return False

    def close(self) -> None:
        try:
            self.connection.channel().exchange_delete(self.exchange)
        finally:
            self.connection.close()


@pytest.fixture(scope="module")
def twistd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, _PikaRpc]]:
    """``twistd -n callme --module app`` serving a fresh id, and a pika client to it."""
    server_id = conftest.new_server_id()
    twistd = Path(sys.executable).with_name("twistd")
    log = (tmp_path_factory.mktemp("twistd") / "twistd.log").open("w")
    process = subprocess.Popen(
        [str(twistd), "--pidfile=", "-n", "callme", "--server-id", server_id,
         "--module", "app", "--amqp-host", BROKER_HOST],
        cwd=EXAMPLES, stdout=log, stderr=subprocess.STDOUT)
    client = None
    try:
        client = _PikaRpc()
        assert client.wait_for_consumer(server_id, 15), "twistd callme did not start serving"
        assert client.call(server_id, "add", 1, 1) == {"result": 2}
        yield server_id, client
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if client is not None:
            client.close()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20)
_requestish = st.fixed_dictionaries(
    {}, optional={"method": st.sampled_from(["add", "nope", "__callme__.ping", ""]) | st.text(),
                  "args": _json_values, "kwargs": _json_values, "deadline": _json_values})
_bodies = st.one_of(
    st.binary(max_size=512),
    st.text(max_size=200).map(str.encode),
    _json_values.map(lambda v: json.dumps(v).encode()),
    _requestish.map(lambda v: json.dumps(v).encode()),
)
_short = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
_message = st.tuples(
    _bodies,
    st.sampled_from([None, "application/json", "application/x-msgpack", "text/plain",
                     "application/x-python-pickle", ""]),
    st.none() | _short,
    st.booleans(),  # reply_to our exchange, or none
)


@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(_message, min_size=1, max_size=20))
def test_arbitrary_messages_never_break_the_server(
        twistd_server: tuple[str, _PikaRpc], batch: list[Any]) -> None:
    """Batches of arbitrary bodies and properties: each is answered or dropped once, and
    the twistd server always answers a valid call afterwards."""
    server_id, client = twistd_server
    client.drain()
    client.replies = 0
    with_reply_to = 0
    for body, content_type, corr, reply in batch:
        props = pika.BasicProperties(content_type=content_type, correlation_id=corr,
                                     reply_to=client.exchange if reply else None)
        with_reply_to += reply
        client.publish(server_id, body, props)
    assert client.call(server_id, "add", 2, 3) == {"result": 5}
    time.sleep(0.1)
    client.drain()
    assert client.replies <= with_reply_to  # no message answered twice (no requeue loop)
    assert client.server_queue_depth(server_id) == 0
