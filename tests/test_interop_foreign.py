"""Foreign AMQP clients and servers, written from README's "Wire protocol"
section alone (tests/foreign/: pika and Node.js amqplib), talk to txcallme:
results, keyword arguments, error envelopes, unknown methods, malformed
requests, late and expired requests, reserved methods; a txcallme Proxy calls
the foreign servers with a reply exchange and through Direct Reply-to, and a
reply to a caller that has gone does not stop them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from tests.conftest import BROKER_HOST, BROKER_PORT, broker_connect
from txcallme import RpcTimeout, UnknownMethod

pytestmark = pytest.mark.timeout(90)

FOREIGN = Path(__file__).parent / "foreign"
NODE_DIR = FOREIGN / "node"
URL = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F"


def node_or_fail() -> str:
    """The node executable; a failure that says what to do when node or amqplib is
    missing (``make test`` runs scripts/ensure-node, which installs both)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the Node.js (amqplib) interop test needs "
                    "Node 18+; run scripts/ensure-node (make test does)")
    if not (NODE_DIR / "node_modules" / "amqplib").is_dir():
        pytest.fail("amqplib is not installed in tests/foreign/node: run "
                    "scripts/ensure-node (make test does), or npm ci there")
    return node


def client_command(kind: str) -> tuple[str, list[str]]:
    """Executable and arguments of a foreign client."""
    if kind == "pika":
        return sys.executable, [str(FOREIGN / "pika_client.py")]
    return node_or_fail(), [str(NODE_DIR / "client.js")]


CALLS: list[tuple[Any, ...]] = []


def add(a: Any, b: Any) -> Any:
    """The function every foreign client calls."""
    CALLS.append((a, b))
    return a + b


async def run_client(kind: str, server_id: str) -> dict[str, dict[str, Any]]:
    """Run one foreign client to completion; its cases by name."""
    executable, args = client_command(kind)
    out, err, code = await getProcessOutputAndValue(
        executable, [*args, URL, server_id], env=dict(os.environ), path=str(FOREIGN))
    assert code == 0, err.decode()
    cases = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return {case["case"]: case for case in cases}


async def start_server(services: Any, server_id: str) -> Any:
    """A txcallme server with one prefetch slot (so requests queue behind `slow`)."""
    async def slow(seconds: float) -> None:
        await deferLater(reactor, seconds, lambda: None)

    return await services.start_server(server_id, {
        "add": add, "div": lambda a, b: a / b, "answer": lambda: 42, "slow": slow},
        prefetch=1)


def only_reply(case: dict[str, Any]) -> dict[str, Any]:
    """The one reply a case got, checked against the wire rules for replies."""
    assert len(case["replies"]) == 1, case
    reply = case["replies"][0]
    reply_to = case["properties"]["reply_to"]
    assert reply["properties"] == {"correlation_id": case["correlation_id"],
                                   "content_type": "application/json"}
    assert (reply["exchange"], reply["routing_key"]) == (reply_to, reply_to)
    return reply["body"]  # type: ignore[no-any-return]


def error_of(case: dict[str, Any]) -> dict[str, Any]:
    """The error envelope of a case's reply (all four fields present)."""
    body = only_reply(case)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message", "args", "traceback"}
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["pika", "node"])
@pytest_twisted.ensureDeferred
async def test_foreign_client_calls_txcallme_server(kind: str, services: Any,
                                                    sid: str) -> None:
    """A pika / Node.js client written from README gets every documented answer."""
    client_command(kind)  # fail (node missing) before starting anything
    await start_server(services, sid)
    CALLS.clear()
    cases = await run_client(kind, sid)
    assert only_reply(cases["positional"]) == {"result": 3}
    assert only_reply(cases["keywords"]) == {"result": 3}
    assert only_reply(cases["mixed"]) == {"result": 6}
    assert only_reply(cases["no-args"]) == {"result": 42}
    error = error_of(cases["error"])
    assert (error["type"], error["message"], error["args"]) == (
        "ZeroDivisionError", "division by zero", ["division by zero"])
    assert "ZeroDivisionError: division by zero" in error["traceback"]
    assert error_of(cases["unknown-method"])["type"] == "txcallme.errors.UnknownMethod"
    assert error_of(cases["bad-arguments"])["type"] == "TypeError"
    assert error_of(cases["not-json"])["type"] == "txcallme.errors.InvalidRequest"
    unknown_field = error_of(cases["unknown-field"])
    assert unknown_field["type"] == "txcallme.errors.InvalidRequest"
    assert "colour" in unknown_field["message"]
    assert error_of(cases["wrong-content-type"])["type"] == "txcallme.errors.InvalidRequest"
    assert cases["late"]["replies"] == []
    ping = only_reply(cases["ping"])["result"]
    assert ping["server_id"] == sid and set(ping) == {"server_id", "instance", "version"}
    described = only_reply(cases["describe"])["result"]
    assert {f["name"] for f in described["functions"]} == {"add", "div", "answer", "slow"}
    assert only_reply(cases["slow"]) == {"result": None}
    assert cases["expired"]["replies"] == []
    assert only_reply(cases["after-all"]) == {"result": 42}
    # positional, keywords, mixed and after-all ran; not the late, expired,
    # reply_to-less or refused ones
    assert CALLS == [(1, 2), (1, 2), (1, 5), (40, 2)]


class _Server(protocol.ProcessProtocol):
    """A foreign server process; `ready` fires when it prints ``ready``."""

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[int] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data
        if b"ready" in self.output and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"server exited: {self.output.decode()}"))
        self.ended.callback(getattr(reason.value, "exitCode", None))


def server_command(kind: str) -> list[str]:
    """Command line of a foreign server."""
    if kind == "pika":
        return [sys.executable, str(FOREIGN / "pika_server.py")]
    return [node_or_fail(), str(NODE_DIR / "server.js")]


async def publish_for_gone_caller(server_id: str) -> None:
    """A request whose reply exchange does not exist (its caller has gone): the
    reply is dropped and affects no other reply (docs/wire.rst, Replies)."""
    conn = await broker_connect()
    try:
        channel = await conn.open_channel()
        channel.publish(f"server_{server_id}_ex", server_id,
                        json.dumps({"method": "add", "args": [1, 1]}).encode(),
                        {"reply_to": f"client_gone_ex_{uuid.uuid4().hex}",
                         "correlation_id": "gone", "content_type": "application/json"})
    finally:
        await conn.close()


@pytest.mark.parametrize("direct", [False, True], ids=["reply-exchange", "direct-reply-to"])
@pytest.mark.parametrize("kind", ["pika", "node"])
@pytest_twisted.ensureDeferred
async def test_txcallme_proxy_calls_foreign_server(kind: str, direct: bool, services: Any,
                                                   sid: str) -> None:
    """A txcallme Proxy calls a pika / Node.js server written from README and
    docs/wire.rst, with its own reply exchange or through Direct Reply-to
    (reply_to ``amq.rabbitmq.reply-to.*``: the server replies through the
    default exchange)."""
    command = server_command(kind)
    server = _Server()
    process = reactor.spawnProcess(server, command[0], [*command, URL, sid],
                                   env=dict(os.environ), path=str(FOREIGN))
    try:
        await server.ready
        proxy = await services.ready_proxy(timeout=5, direct_reply_to=direct)
        remote = proxy.use_server(sid)
        assert await remote.add(1, 2) == 3
        assert await remote.add(a=1, b=2) == 3
        assert await proxy.call(sid, "add", "a", b="b") == "ab"
        with pytest.raises(ZeroDivisionError, match="division by zero") as info:
            await remote.div(1, 0)
        assert "ZeroDivisionError" in info.value.remote_traceback  # type: ignore[attr-defined]
        with pytest.raises(UnknownMethod):
            await remote.no_such_function()
        before = time.time()
        seen = await proxy.invoke(sid, "echo_properties", [1], {"k": "v"}, timeout=4)
        assert seen["content_type"] == "application/json"
        if direct:  # the broker names the pseudo-queue of the request's channel
            assert proxy.exchange == ""
            assert seen["reply_to"].startswith("amq.rabbitmq.reply-to.")
        else:
            assert seen["reply_to"] == proxy.exchange
        assert seen["expiration"].isdigit() and 3000 <= int(seen["expiration"]) <= 4000
        assert before + 3 <= seen["deadline"] <= time.time() + 4
        assert (seen["args"], seen["kwargs"]) == ([1], {"k": "v"})
        with pytest.raises(RpcTimeout):
            await proxy.invoke(sid, "slow", [1.5], timeout=0.5)
        await publish_for_gone_caller(sid)  # queued behind `slow`, before the next call
        assert await remote.add(2, 2) == 4  # still serving after the late and gone ones
    finally:
        if server.ended.called is False:
            process.signalProcess(signal.SIGTERM)
        await server.ended
