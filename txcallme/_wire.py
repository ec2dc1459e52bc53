"""The wire protocol, in one place: object names, message properties and the
request/reply envelopes. README.rst documents exactly what is here.

Request body (JSON by default)::

    {"method": "add", "args": [1, 2], "kwargs": {}, "deadline": 1764220000.5}

``deadline`` (optional) is the caller's absolute give-up time in Unix seconds.

Reply body, one of::

    {"result": 3}
    {"error": {"type": "ZeroDivisionError", "message": "division by zero",
               "args": ["division by zero"], "traceback": "Traceback ..."}}
"""

from __future__ import annotations

import traceback as tb
from itertools import repeat
from typing import Any

import attrs
from twisted.python.reflect import safe_str

from txcallme.errors import InvalidRequest, SerializationError, qualified_name
from txcallme.serializers import Serializer

#: Methods under this prefix are reserved for txcallme itself.
RESERVED_PREFIX = "__callme__."
#: RabbitMQ's Direct Reply-to pseudo-queue; a ``reply_to`` starting with it
#: (``amq.rabbitmq.reply-to.*``) is answered through the default exchange ``""``.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def server_exchange(server_id: str) -> str:
    return f"server_{server_id}_ex"


def server_queue(server_id: str) -> str:
    return f"server_{server_id}_queue"


def client_exchange(amqp_user: str, uid: str) -> str:
    return f"client_{amqp_user}_ex_{uid}"


def client_queue(amqp_user: str, uid: str) -> str:
    return f"client_{amqp_user}_queue_{uid}"


def check_server_id(server_id: str) -> str:
    """Refuse server ids that cannot make valid, unambiguous AMQP names."""
    if not isinstance(server_id, str) or not server_id:
        raise ValueError("server_id must be a non-empty string")
    if len(server_queue(server_id).encode("utf-8")) > 255 or any(
            c.isspace() for c in server_id):
        raise ValueError("server_id must be at most 242 bytes (UTF-8), without white "
                         f"space: {server_id!r}")
    return server_id


@attrs.define
class Request:
    """A decoded request. Not frozen: a frozen attrs class costs ~300 ns more to
    build, once per call; nothing modifies a request once made."""

    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    deadline: float | None = None


_REQUEST_FIELDS = frozenset({"method", "args", "kwargs", "deadline"})
_EMPTY: dict[str, Any] = {}


def encode_request(serializer: Serializer, request: Request) -> bytes:
    if request.deadline is None:
        return serializer.dumps({"method": request.method, "args": request.args,
                                 "kwargs": request.kwargs})
    return serializer.dumps({"method": request.method, "args": request.args,
                             "kwargs": request.kwargs, "deadline": request.deadline})


def decode_request(serializer: Serializer, data: bytes) -> Request:
    """Decode and validate a request body; raise :class:`InvalidRequest`."""
    try:
        body = serializer.loads(data)
    except SerializationError as e:
        raise InvalidRequest(str(e)) from None
    if type(body) is not dict and not isinstance(body, dict):
        raise InvalidRequest(f"request body must be an object, not {type(body).__name__}")
    method = body.get("method")
    if type(method) is not str and not isinstance(method, str) or not method:
        raise InvalidRequest("request needs a non-empty string 'method'")
    args = body.get("args")
    if args is None:
        if "args" in body:
            raise InvalidRequest("request 'args' must be an array")
        args = []
    elif type(args) is not list:
        if not isinstance(args, (list, tuple)):
            raise InvalidRequest("request 'args' must be an array")
        args = list(args)
    kwargs = body.get("kwargs", _EMPTY)
    if type(kwargs) is not dict and not isinstance(kwargs, dict) or (
            kwargs and not all(map(isinstance, kwargs, repeat(str)))):
        raise InvalidRequest("request 'kwargs' must be an object")
    if kwargs is _EMPTY:
        kwargs = {}
    deadline = body.get("deadline")
    if deadline is not None and type(deadline) is not float and (
        isinstance(deadline, bool) or not isinstance(deadline, (int, float))
    ):
        raise InvalidRequest("request 'deadline' must be a number")
    if not _REQUEST_FIELDS.issuperset(body):
        raise InvalidRequest(f"unknown request fields: {sorted(set(body) - _REQUEST_FIELDS)}")
    return Request(method, args, kwargs, deadline)


def encode_result(serializer: Serializer, value: Any) -> bytes:
    return serializer.dumps({"result": value})


def error_description(exc: BaseException, with_traceback: bool = True) -> dict[str, Any]:
    """The wire form of an exception: type name, message, JSON-safe args, traceback."""
    args: list[Any] = []
    for arg in exc.args:
        if arg is None or isinstance(arg, (str, int, float, bool)):
            args.append(arg)
        else:
            args.append(repr(arg))
    text = "".join(tb.format_exception(exc)) if with_traceback else ""
    return {"type": qualified_name(type(exc)), "message": safe_str(exc), "args": args,
            "traceback": text}


def encode_error(serializer: Serializer, error: dict[str, Any]) -> bytes:
    return serializer.dumps({"error": error})


@attrs.define
class Reply:
    """A decoded reply (not frozen, like :class:`Request`)."""

    ok: bool
    value: Any = None
    error: dict[str, Any] = attrs.field(factory=dict)


def decode_reply(serializer: Serializer, data: bytes) -> Reply:
    """Decode a reply body; raise :class:`InvalidRequest` if it is not one."""
    try:
        body = serializer.loads(data)
    except SerializationError as e:
        raise InvalidRequest(f"reply: {e}") from None
    if isinstance(body, dict) and len(body) == 1:
        if "result" in body:
            return Reply(True, body["result"])
        err = body.get("error")
        if isinstance(err, dict):
            args = err.get("args", [])
            return Reply(False, error={
                "type": str(err.get("type", "Exception")),
                "message": str(err.get("message", "")),
                "args": list(args) if isinstance(args, list) else [],
                "traceback": str(err.get("traceback", "")),
            })
    raise InvalidRequest("reply body must be {'result': ...} or {'error': {...}}")
