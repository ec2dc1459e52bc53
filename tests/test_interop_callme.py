"""txcallme and the real, unmodified callme 0.2.0 package (kombu 5.7), each
side in its own process: callme Proxies call txcallme servers started with
``callme_compat=True``, a txcallme ``Proxy(callme_compat=True)`` calls callme
Servers, mixed fleets of both kinds of server on one server id answer every
call, and hostile pickles sent over the broker to a compat server are refused
with a log line each while it keeps serving."""

from __future__ import annotations

import inspect
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher

from tests.conftest import (
    BROKER_HOST,
    BROKER_PORT,
    _created_names,
    broker_connect,
    sleep,
    track_proxy,
)
from tests.test_compat_pickle import gadget_pickles
from txcallme import Proxy, RemoteError, RpcTimeout, ServerUnavailable, blocking, callme_compat
from txcallme.errors import DeclarationRefused, InvalidRequest, NotFound

pytestmark = pytest.mark.timeout(120)

FOREIGN = Path(__file__).parent / "foreign"
sys.path.insert(0, str(FOREIGN))
import callme_app  # noqa: E402

PEER = str(FOREIGN / "callme_peer.py")
ENV = {**os.environ, "PYTHONPATH": str(FOREIGN)}


def compat_functions(label: str) -> dict[str, Any]:
    """The functions the callme peers serve, for a txcallme compat server."""
    return {"add": callme_app.add, "div": callme_app.div, "fail": callme_app.fail,
            "echo": callme_app.echo, "who": callme_app.who(label)}


async def callme_client(server_id: str, who_calls: int = 0) -> list[dict[str, Any]]:
    """Run an unmodified callme 0.2.0 Proxy in its own process; its outcomes."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable, [PEER, "client", server_id, str(who_calls)], env=ENV,
        path=str(FOREIGN))
    assert code == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


class CallmeServer(protocol.ProcessProtocol):
    """An unmodified callme 0.2.0 Server in its own process."""

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data
        if b"ready" in self.output and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode()))
        self.ended.callback(None)


@pytest_twisted.async_yield_fixture
async def callme_servers() -> Any:
    """Start callme 0.2.0 Servers: ``await start(server_id, label)``; stopped at teardown."""
    running: list[tuple[Any, CallmeServer]] = []

    async def start(server_id: str, label: str) -> None:
        server = CallmeServer()
        transport = reactor.spawnProcess(server, sys.executable,
                                         [sys.executable, PEER, "server", server_id, label],
                                         env=ENV, path=str(FOREIGN))
        running.append((transport, server))
        await server.ready

    yield start
    for transport, server in running:
        if not server.ended.called:
            transport.closeStdin()
    for _, server in running:
        await server.ended


STANDARD = [
    {"call": "add", "result": 3},
    {"call": "add", "result": "ab"},
    {"call": "div", "error": "builtins.ZeroDivisionError", "args": ["'division by zero'"]},
    {"call": "fail", "error": "callme_app.AppError", "args": ["'boom'", "42"]},
    {"call": "echo", "result": [1, [2, 3], {"k": "{4}"}, "b'\\x00\\xff'", None, 1.5]},
    {"call": "no_such_function", "error": "builtins.KeyError"},
]


def check_standard(outcomes: list[dict[str, Any]]) -> None:
    """The callme client's standard calls got what a callme server answers."""
    got = outcomes[:len(STANDARD)]
    unknown = got[-1]
    assert unknown["error"] == "builtins.KeyError" and "no_such_function" in unknown["args"][0]
    assert got[:-1] == STANDARD[:-1]


@pytest_twisted.ensureDeferred
async def test_callme_proxy_calls_compat_server(services: Any, sid: str) -> None:
    """An unmodified callme Proxy gets results and exceptions from a compat server,
    which answers txcallme callers on the same server id too."""
    await services.start_server(sid, compat_functions("tx"), callme_compat=True)
    outcomes = await callme_client(sid, who_calls=2)
    check_standard(outcomes)
    assert [o["result"].split(":")[0] for o in outcomes[len(STANDARD):]] == ["tx", "tx"]
    proxy = await services.ready_proxy(timeout=5)
    assert await proxy.use_server(sid).add(1, 2) == 3  # JSON on the same queue
    assert await proxy.call(sid, "add", a=1, b=2) == 3


@pytest_twisted.ensureDeferred
async def test_compat_proxy_calls_callme_server(services: Any, sid: str,
                                                callme_servers: Any) -> None:
    """A txcallme Proxy(callme_compat=True) calls an unmodified callme Server."""
    await callme_servers(sid, "cm")
    proxy = await services.ready_proxy(timeout=5, callme_compat=True)
    remote = proxy.use_server(sid)
    assert await remote.add(1, 2) == 3
    value = [1, (2, 3), {"k": {4}}, b"\x00\xff", None, 1.5]
    assert await remote.echo(value) == value  # pickle keeps tuples, sets and bytes
    with pytest.raises(ZeroDivisionError):
        await remote.div(1, 0)
    with pytest.raises(KeyError):
        await remote.no_such_function()
    with pytest.raises(RemoteError) as info:
        await remote.fail("boom")
    assert (info.value.type_name, info.value.remote_args) == ("callme_app.AppError",
                                                               ("boom", 42))
    proxy.errors.register(callme_app.AppError, "callme_app.AppError")
    with pytest.raises(callme_app.AppError):
        await remote.fail("again")
    with pytest.raises(TypeError, match="positional arguments only"):
        await remote.add(1, b=2)
    assert (await remote.who()).startswith("cm:")
    with pytest.raises(ServerUnavailable):
        await proxy.call(f"{sid}-nobody", "add", 1, 2)
    _created_names.update({f"server_{sid}-nobody_ex", f"server_{sid}-nobody_queue"})


@pytest_twisted.ensureDeferred
async def test_mixed_fleet(services: Any, sid: str, callme_servers: Any) -> None:
    """callme Servers and txcallme compat servers on one server id: callme
    clients and compat Proxies get every call answered, by both kinds."""
    await callme_servers(sid, "cm")
    await services.start_server(sid, compat_functions("tx"), callme_compat=True)
    await callme_servers(sid, "cm")
    await services.start_server(sid, compat_functions("tx"), callme_compat=True)
    outcomes = await callme_client(sid, who_calls=40)
    check_standard(outcomes)
    answered = [o["result"].split(":")[0] for o in outcomes[len(STANDARD):]]
    assert len(answered) == 40 and set(answered) == {"cm", "tx"}
    proxy = await services.ready_proxy(timeout=10, callme_compat=True)
    results = [await proxy.call(sid, "who") for _ in range(20)]
    assert {r.split(":")[0] for r in results} == {"cm", "tx"}
    assert [await proxy.call(sid, "add", i, 1) for i in range(10)] == list(range(1, 11))


@pytest_twisted.ensureDeferred
async def test_hostile_pickles_over_the_broker(services: Any, sid: str,
                                               tmp_path: Path) -> None:
    """Each hostile pickle published to a running compat server is refused with a
    log line and a ValueError reply; nothing runs; the server keeps serving."""
    marker = tmp_path / "pwned"
    hostile = gadget_pickles(marker)
    hostile["billion laughs"] = _billion_laughs()
    hostile["memo index bomb"] = b"\x80\x02]r\xff\xff\xff\xff."
    hostile["truncated"] = callme_compat.encode_request("add", [1, 2])[:20]
    await services.start_server(sid, compat_functions("tx"), callme_compat=True)
    lines: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "callme.server" and \
                str(event.get("log_format", "")).startswith("bad request"):
            lines.append(event)

    globalLogPublisher.addObserver(observe)
    connection = await broker_connect()
    replies: list[Any] = []
    try:
        channel = await connection.open_channel()
        uid = uuid.uuid4().hex
        exchange, queue = f"client_guest_ex_{uid}", f"client_guest_queue_{uid}"
        _created_names.update({exchange, queue})
        await channel.declare_exchange(exchange, "direct", auto_delete=True)
        await channel.declare_queue(queue, exclusive=True, auto_delete=True)
        await channel.bind_queue(queue, exchange, "")
        await channel.consume(queue, lambda d: replies.append(d), no_ack=True)
        for name, body in hostile.items():
            channel.publish(f"server_{sid}_ex", "", body, {
                "content_type": callme_compat.CONTENT_TYPE, "correlation_id": name,
                "reply_to": exchange})
        channel.publish(f"server_{sid}_ex", "", callme_compat.encode_request("add", [2, 3]),
                        {"content_type": callme_compat.CONTENT_TYPE,
                         "correlation_id": "good", "reply_to": exchange})
        for _ in range(100):
            if len(replies) > len(hostile):
                break
            await sleep(0.1)
    finally:
        globalLogPublisher.removeObserver(observe)
        await connection.close()
    assert not marker.exists()
    assert sorted(str(e["corr"]) for e in lines) == sorted(hostile)
    by_corr = {d.properties["correlation_id"]: d for d in replies}
    assert set(by_corr) == {*hostile, "good"}
    assert callme_compat.decode_response(by_corr["good"].body) == 5
    for name in hostile:
        reply = by_corr[name]
        assert reply.properties["content_type"] == callme_compat.CONTENT_TYPE
        error = callme_compat.decode_response(reply.body)
        assert type(error) is ValueError, (name, error)
    proxy = await services.ready_proxy(timeout=5)
    assert await proxy.use_server(sid).add(1, 2) == 3
    with pytest.raises(InvalidRequest):
        callme_compat.decode_request(hostile["os.system p2"])


def _billion_laughs() -> bytes:
    """A 300-byte request whose argument is 10**9 objects as a tree."""
    body = b"(K\x01K\x02lq\x00"
    for level in range(1, 10):
        body += b"(" + f"h{chr(level - 1)}".encode("latin-1") * 10 + b"lq" + bytes([level])
    return (b"\x80\x02ccallme.protocol\nRpcRequest\n)\x81}(X\t\x00\x00\x00func_name"
            b"X\x03\x00\x00\x00addX\t\x00\x00\x00func_args(" + body + b"tub.")


@pytest_twisted.ensureDeferred
async def test_default_server_never_unpickles(services: Any, sid: str,
                                              tmp_path: Path) -> None:
    """Without callme_compat a server refuses callme's content type unread: a
    gadget pickle gets an InvalidRequest error envelope and runs nothing."""
    marker = tmp_path / "pwned"
    await services.start_server(sid, compat_functions("tx"))
    connection = await broker_connect()
    replies: list[Any] = []
    try:
        channel = await connection.open_channel()
        uid = uuid.uuid4().hex
        exchange, queue = f"client_guest_ex_{uid}", f"client_guest_queue_{uid}"
        _created_names.update({exchange, queue})
        await channel.declare_exchange(exchange, "direct", auto_delete=True)
        await channel.declare_queue(queue, exclusive=True, auto_delete=True)
        await channel.bind_queue(queue, exchange, exchange)
        await channel.consume(queue, lambda d: replies.append(d), no_ack=True)
        channel.publish(f"server_{sid}_ex", sid, gadget_pickles(marker)["os.system p2"], {
            "content_type": callme_compat.CONTENT_TYPE, "correlation_id": "gadget",
            "reply_to": exchange})
        for _ in range(50):
            if replies:
                break
            await sleep(0.1)
    finally:
        await connection.close()
    assert not marker.exists()
    (reply,) = replies
    error = json.loads(reply.body)["error"]
    assert error["type"] == "txcallme.errors.InvalidRequest"
    assert "x-python-serialize" in error["message"]


async def _consumers(queue: str) -> int:
    connection = await broker_connect()
    try:
        channel = await connection.open_channel()
        return (await channel.declare_queue(queue, passive=True)).consumer_count
    finally:
        await connection.close()


@pytest_twisted.ensureDeferred
async def test_plain_proxy_while_callme_servers_remain(services: Any, sid: str,
                                                       callme_servers: Any) -> None:
    """README, migration step 3: with only callme servers a plain (JSON) Proxy gets
    ServerUnavailable at once (callme binds its queue with routing key ''); in a
    mixed fleet the JSON request a callme server takes gets no reply (RpcTimeout)
    and that callme server stops consuming for good, while the compat server
    answers the rest."""
    await callme_servers(sid, "cm")
    proxy = await services.ready_proxy(timeout=3)
    with pytest.raises(ServerUnavailable, match="no queue is bound"):
        await proxy.use_server(sid).who()
    await services.start_server(sid, compat_functions("tx"), callme_compat=True)
    queue = f"server_{sid}_queue"
    assert await _consumers(queue) == 2
    outcomes: list[str] = []
    for _ in range(4):  # round robin: the callme server takes one of the first two
        try:
            outcomes.append((await proxy.use_server(sid).who()).split(":")[0])
        except RpcTimeout:
            outcomes.append("timeout")
            break
    assert outcomes.count("timeout") == 1 and set(outcomes) <= {"tx", "timeout"}, outcomes
    for _ in range(50):
        if await _consumers(queue) == 1:
            break
        await sleep(0.1)
    assert await _consumers(queue) == 1  # the callme server no longer consumes
    compat = await services.ready_proxy(timeout=3, callme_compat=True)
    answered = [(await compat.use_server(sid).who()).split(":")[0] for _ in range(6)]
    assert answered == ["tx"] * 6


@pytest_twisted.ensureDeferred
async def test_blocking_compat_proxy_calls_callme_server(sid: str, callme_servers: Any) -> None:
    """A txcallme.blocking.Proxy(callme_compat=True), called from a worker thread
    (the reactor runs; crochet hands the calls to it), calls an unmodified callme
    Server: results, tuples kept by pickle, the server's exceptions."""
    await callme_servers(sid, "cm")

    def make() -> blocking.Proxy:
        return blocking.Proxy(amqp_host=BROKER_HOST, amqp_port=BROKER_PORT, timeout=10,
                              callme_compat=True)

    proxy = await threads.deferToThread(make)
    track_proxy(proxy._proxy)
    value = [1, (2, 3), {"k": {4}}, b"\x00\xff", None, 1.5]

    def calls() -> list[Any]:
        remote = proxy.use_server(sid)
        got: list[Any] = [remote.add(1, 2), remote.echo(value), remote.who()]
        try:
            remote.div(1, 0)
        except ZeroDivisionError as e:
            got.append(e)
        return got

    try:
        added, echoed, who, error = await threads.deferToThread(calls)
    finally:
        await threads.deferToThread(proxy.close)
    assert added == 3
    assert echoed == value
    assert who.startswith("cm:")
    assert isinstance(error, ZeroDivisionError)


def test_blocking_proxy_takes_every_proxy_argument() -> None:
    """README: txcallme.blocking.Proxy takes the same arguments as txcallme.Proxy
    (but no reactor): same names, kinds and defaults."""
    def parameters(cls: type) -> dict[str, tuple[Any, Any]]:
        found = inspect.signature(cls.__init__).parameters.values()
        return {p.name: (p.kind, p.default) for p in found if p.name != "self"}

    expected = parameters(Proxy)
    del expected["reactor"]
    assert parameters(blocking.Proxy) == expected


@pytest_twisted.ensureDeferred
async def test_compat_off_after_the_last_compat_instance(services: Any, sid: str) -> None:
    """README, migration step 4: a server without callme_compat cannot start next to
    a compat one (RabbitMQ refuses to re-declare callme's non-durable queue as
    durable: 406, fatal on the first start, the message says what to do); once every
    compat instance is stopped (the auto-delete queue goes with the last), it starts
    and answers plain Proxies."""
    compat = await services.start_server(sid, compat_functions("tx"), callme_compat=True)
    plain = services.server(sid, compat_functions("new"))
    with pytest.raises(DeclarationRefused) as info:
        await plain.when_ready()
    assert info.value.code == 406
    assert "stop all instances" in str(info.value)  # what to do
    await plain.stopService()
    await compat.stopService()
    for _ in range(50):  # the broker deletes the auto-delete queue asynchronously
        try:
            await _consumers(f"server_{sid}_queue")
        except NotFound:
            break
        await sleep(0.1)
    await services.start_server(sid, compat_functions("new"))
    proxy = await services.ready_proxy(timeout=5)
    assert (await proxy.use_server(sid).who()).startswith("new:")
