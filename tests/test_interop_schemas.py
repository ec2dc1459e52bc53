"""The JSON Schemas shipped in txcallme/schemas/ describe real messages:
copies of what a txcallme Proxy and server put on the broker (consumed from
queues of the test's own, bound to the server's and the proxy's exchanges)
and what a foreign client sent and got are validated against them, and the
request schema refuses exactly what servers refuse."""

from __future__ import annotations

import json
import re
import shlex
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_twisted
from referencing import Registry, Resource

from tests.conftest import broker_connect, sleep
from tests.test_interop_foreign import run_client, start_server
from txcallme import InvalidRequest, SerializationError, UnknownMethod, _wire
from txcallme.serializers import JSONSerializer

pytestmark = pytest.mark.timeout(90)

SCHEMA_NAMES = ("request", "reply", "error", "ping", "describe")


def load_schemas() -> dict[str, dict[str, Any]]:
    """The schema files as the installed package ships them."""
    folder = resources.files("txcallme") / "schemas"
    return {name: json.loads((folder / f"{name}.schema.json").read_text("utf-8"))
            for name in SCHEMA_NAMES}


SCHEMAS = load_schemas()
REGISTRY: Registry = Registry().with_resources(
    (schema["$id"], Resource.from_contents(schema)) for schema in SCHEMAS.values())


def validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator for one schema, resolving $refs among the shipped files."""
    return jsonschema.Draft202012Validator(SCHEMAS[name], registry=REGISTRY)


def is_valid(name: str, value: Any) -> bool:
    return validator(name).is_valid(value)


def test_schemas_are_valid_draft_2020_12() -> None:
    """Every shipped schema is itself a valid JSON Schema (draft 2020-12)."""
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


BODIES: list[Any] = [
    {"method": "add"},
    {"method": "add", "args": [1, 2], "kwargs": {"c": 3}, "deadline": 1764220000.5},
    {"method": "x.y", "args": [], "kwargs": {}, "deadline": None},
    {"method": "add", "deadline": 5},
    {"method": ""},
    {"method": 5},
    {"args": [1]},
    {"method": "add", "args": {"a": 1}},
    {"method": "add", "kwargs": [1]},
    {"method": "add", "deadline": "soon"},
    {"method": "add", "deadline": True},
    {"method": "add", "colour": "red"},
    [1, 2],
    "add",
]


@pytest.mark.parametrize("body", BODIES, ids=[json.dumps(b)[:40] for b in BODIES])
def test_request_schema_agrees_with_the_server(body: Any) -> None:
    """A body is valid for the request schema exactly when a server accepts it."""
    try:
        _wire.decode_request(JSONSerializer(), json.dumps(body).encode())
        accepted = True
    except InvalidRequest:
        accepted = False
    assert is_valid("request", body) == accepted


async def capture(connection: Any, exchange: str, routing_key: str,
                  into: list[tuple[dict[str, Any], bytes]]) -> None:
    """Consume copies of what is routed by *exchange* with *routing_key*."""
    channel = await connection.open_channel()
    queue = f"capture-{uuid.uuid4().hex}"
    await channel.declare_queue(queue, exclusive=True, auto_delete=True)
    await channel.bind_queue(queue, exchange, routing_key)
    await channel.consume(queue, lambda d: into.append((dict(d.properties), d.body)),
                          no_ack=True)


@pytest_twisted.ensureDeferred
async def test_captured_txcallme_messages_match_the_schemas(services: Any, sid: str) -> None:
    """Requests and replies copied off the broker validate, errors and reserved
    results included."""
    await services.start_server(sid, {
        "add": lambda a, b: a + b, "div": lambda a, b: a / b, "a_set": lambda: {1}})
    proxy = await services.ready_proxy(timeout=5)
    connection = await broker_connect()
    requests: list[tuple[dict[str, Any], bytes]] = []
    replies: list[tuple[dict[str, Any], bytes]] = []
    try:
        await capture(connection, f"server_{sid}_ex", sid, requests)
        await capture(connection, proxy.exchange, proxy.exchange, replies)
        remote = proxy.use_server(sid)
        assert await remote.add(1, 2) == 3
        assert await remote.add(a="x", b="y") == "xy"
        with pytest.raises(ZeroDivisionError):
            await remote.div(1, 0)
        with pytest.raises(UnknownMethod):
            await remote.nothing()
        with pytest.raises(TypeError):
            await remote.add(1)
        with pytest.raises(SerializationError):
            await remote.a_set()
        ping = await proxy.call(sid, "__callme__.ping")
        described = await proxy.call(sid, "__callme__.describe")
        # a malformed request, answered to the proxy's exchange (the proxy drops it)
        channel = await connection.open_channel()
        channel.publish(f"server_{sid}_ex", sid, b"{not json", {
            "correlation_id": "malformed", "reply_to": proxy.exchange,
            "content_type": "application/json"})
        for _ in range(50):
            if len(replies) >= 9 and len(requests) >= 9:
                break
            await sleep(0.1)
    finally:
        await connection.close()
    assert len(requests) == 9 and len(replies) == 9
    for properties, raw in requests:
        if properties.get("correlation_id") == "malformed":
            assert raw == b"{not json"
            continue
        validator("request").validate(json.loads(raw))
        assert properties["content_type"] == "application/json"
        assert properties["reply_to"] == proxy.exchange
        assert properties["expiration"].isdigit()
        assert isinstance(properties["correlation_id"], str)
    types = set()
    for properties, raw in replies:
        body = json.loads(raw)
        validator("reply").validate(body)
        assert properties["content_type"] == "application/json"
        if "error" in body:
            types.add(body["error"]["type"])
    assert types == {"ZeroDivisionError", "txcallme.errors.UnknownMethod", "TypeError",
                     "txcallme.errors.SerializationError", "txcallme.errors.InvalidRequest"}
    validator("ping").validate(ping)
    validator("describe").validate(described)
    assert [f["name"] for f in described["functions"]] == ["a_set", "add", "div"]


@pytest_twisted.ensureDeferred
async def test_foreign_client_messages_match_the_schemas(services: Any, sid: str) -> None:
    """What the pika client sent is valid exactly when it was meant to be, and
    every reply it got is a valid reply."""
    await start_server(services, sid)
    cases = await run_client("pika", sid)
    meant_invalid = {"not-json", "unknown-field"}
    for name, case in cases.items():
        assert is_valid("request", case["body"]) == (name not in meant_invalid), name
        for reply in case["replies"]:
            validator("reply").validate(reply["body"])
    validator("ping").validate(cases["ping"]["replies"][0]["body"]["result"])
    validator("describe").validate(cases["describe"]["replies"][0]["body"]["result"])


DOCS = Path(__file__).resolve().parent.parent / "docs" / "wire.rst"


def test_documented_error_types_exist() -> None:
    """Every error type docs/wire.rst lists is a real exception type."""
    import builtins

    import txcallme.errors

    text = DOCS.read_text("utf-8")
    names = set(re.findall(r"^``((?:txcallme\.errors\.)?[A-Z]\w+)``\s{2,}", text, re.M))
    assert "txcallme.errors.PayloadTooLarge" in names and "TypeError" in names
    for name in names:
        owner = txcallme.errors if name.startswith("txcallme.") else builtins
        assert issubclass(getattr(owner, name.rpartition(".")[2]), Exception), name


def test_documented_reserved_results_match_the_schemas() -> None:
    """The ping and describe examples in docs/wire.rst validate."""
    text = DOCS.read_text("utf-8")
    blocks = re.findall(r"::\n\n((?:   .*\n|\n)+)", text)
    examples = [json.loads(b) for b in blocks if b.strip().startswith('{"server_id"')]
    assert len(examples) == 2
    validator("ping").validate(examples[0])
    validator("describe").validate(examples[1])


def permission_lines(text: str, prefix: str) -> set[tuple[str, ...]]:
    """(user, configure, write, read) of every permission line in *text*."""
    found = set()
    for line in text.splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith(prefix) else []
        if words:
            found.add(tuple(words[-4:]))
    return found


def test_documented_permissions_are_readmes() -> None:
    """docs/wire.rst gives README's grants, for reply exchanges and for Direct
    Reply-to (the server writing amq.default, the client configuring and reading
    nothing)."""
    text = DOCS.read_text("utf-8")
    readme = (DOCS.parent.parent / "README.rst").read_text("utf-8")
    documented = (permission_lines(text, "carl ") | permission_lines(text, "olivia "))
    given = permission_lines(readme, "rabbitmqctl set_permissions -p VHOST")
    assert len(documented) == 4 and documented <= given, documented - given
    assert ("olivia", "^$", "^server_fooserver_ex$", "^$") in documented
    assert any(re.search(w, "amq.default") for user, _, w, _ in documented if user == "carl")


def test_documented_direct_reply_to_rule_is_the_servers() -> None:
    """The reply_to prefix docs/wire.rst routes to the default exchange is the
    one the txcallme server tests."""
    from txcallme.service import DIRECT_REPLY_TO

    text = " ".join(DOCS.read_text("utf-8").split())
    assert (f"1. ``reply_to`` starts with ``{DIRECT_REPLY_TO}``" in text
            and "publish to the **default exchange** ``\"\"`` with routing key "
                "``reply_to``, unchanged" in text)
