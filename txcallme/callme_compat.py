"""callme 0.2.0's wire format, for servers and proxies that talk to unmodified
callme peers (``callme_compat=True``). Off by default.

What callme puts on the wire: a pickled ``callme.protocol.RpcRequest``
(``func_name``, ``func_args``; a later, unreleased callme adds ``func_kwargs``)
and ``RpcResponse`` (``result``, an exception instance when the call failed),
content type ``application/x-python-serialize``; ``reply_to`` is the client's
*exchange*; requests and replies are routed with the key ``''``; exchanges are
``direct`` and both sides declare the server's exchange and queue as
non-durable and auto-delete (see :data:`SERVER_FLAGS`).

Pickle is read **only** by :func:`loads`, which constructs callme's two message
classes (as the inert :class:`RpcRequest` / :class:`RpcResponse` of this
module), builtin scalars and containers and builtin exception types, and
nothing else:

1. a pre-scan of the opcodes (:func:`pickletools.genops`, which runs nothing)
   refuses opcodes no callme peer emits (``DUP``, ``EXT*``, ``INST``, ``OBJ``,
   ``NEWOBJ_EX``, persistent ids, out-of-band buffers), globals outside the
   allow-list, memo indices beyond what the pickle could have stored (a
   ``LONG_BINPUT 4294967295`` would make the C unpickler allocate 32 GiB),
   ``MARK`` nesting deeper than the depth limit, and trailing bytes;
2. the C unpickler runs with a ``find_class`` that returns only allow-listed
   objects (guarded constructors where a builtin could allocate without bound,
   e.g. ``bytearray(10**10)``);
3. a walk of the result checks every object's type, the nesting depth and the
   size of the value *as a tree* (shared references counted each time they
   occur), so a "billion laughs" of memo references is refused before anything
   formats or encodes it.

Everything refused raises :class:`~txcallme.errors.InvalidRequest` naming
the reason.
"""

from __future__ import annotations

import builtins
import inspect
import io
import pickle
import pickletools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.reflect import safe_str

from txcallme import _wire
from txcallme.amqp import Channel
from txcallme.errors import (
    BUILTIN_REMOTE_TYPES,
    InvalidRequest,
    RemoteErrorRegistry,
    SerializationError,
    qualified_name,
)
from txcallme.server import Dispatcher, Handler

log = Logger(namespace="callme.server")

#: kombu's content type for pickle, as callme sends and expects it.
CONTENT_TYPE = "application/x-python-serialize"
#: Pickle protocol of what txcallme sends to callme peers: the highest that
#: Python 2's callme clients can read (callme 0.2.0 supports Python 2.7).
PICKLE_PROTOCOL = 2
#: callme binds its queues, and publishes requests and replies, with this key.
ROUTING_KEY = ""
#: Deepest nesting of containers in a callme message (as for JSON bodies).
MAX_DEPTH = 64
#: callme's declarations of a server's exchange and queue (``durable=False``,
#: ``auto_delete=True``; kombu's defaults otherwise: direct, not exclusive, no
#: arguments). Any other flags make the broker refuse callme's own declares
#: with 406 PRECONDITION_FAILED. RabbitMQ 4.3 refuses this (non-durable,
#: non-exclusive) queue unless ``deprecated_features.permit.
#: transient_nonexcl_queues = true`` is set on every node.
SERVER_FLAGS: dict[str, bool] = {"durable": False, "auto_delete": True, "exclusive": False}


# --- the two message classes ---------------------------------------------------


class RpcRequest:
    """``callme.protocol.RpcRequest`` as read from the wire: data, no behaviour."""

    __slots__ = ("func_name", "func_args", "func_kwargs")

    def __init__(self, func_name: Any = None, func_args: Any = (),
                 func_kwargs: Any = None) -> None:
        self.func_name = func_name
        self.func_args = func_args
        self.func_kwargs = func_kwargs

    def __setstate__(self, state: Any) -> None:
        _set_fields(self, state, self.__slots__)


class RpcResponse:
    """``callme.protocol.RpcResponse`` as read from the wire."""

    __slots__ = ("result",)

    def __init__(self, result: Any = None) -> None:
        self.result = result

    def __setstate__(self, state: Any) -> None:
        _set_fields(self, state, self.__slots__)


def _set_fields(obj: Any, state: Any, fields: tuple[str, ...]) -> None:
    """BUILD for the message classes: a dict of their own fields, nothing else
    (other keys, which a later callme might add, are ignored)."""
    if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
        state = state[0]  # (dict, slotstate) as pickled for a class with __slots__
    if not isinstance(state, dict):
        raise InvalidRequest(f"callme message state must be a dict, not "
                             f"{type(state).__name__}")
    for name in fields:
        if name in state:
            setattr(obj, name, state[name])


@attrs.frozen
class ForeignObject:
    """What a reply's ``module.Name(*args)`` outside the allow-list becomes:
    the name and the arguments, never the object. Only :func:`loads` with
    ``foreign=True`` (replies from callme servers) makes these, so that a callme
    server's own exception types can arrive as
    :class:`~txcallme.errors.RemoteError`."""

    type_name: str
    args: tuple[Any, ...]
    state: dict[str, Any] = attrs.field(factory=dict)

    def __setstate__(self, state: Any) -> None:  # BUILD after REDUCE
        if not isinstance(state, dict):
            raise InvalidRequest(f"state of {self.type_name} must be a dict")
        self.state.update(state)


class _ForeignGlobal:
    """The stand-in ``find_class`` returns for a name outside the allow-list in
    a reply: calling it (REDUCE) records a :class:`ForeignObject`. It is not a
    type, so NEWOBJ (how plain objects are pickled) refuses it."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __call__(self, *args: Any) -> ForeignObject:
        return ForeignObject(self.type_name, args)


# --- the allow-list ---------------------------------------------------------------

#: Builtin exception types a callme message may hold (Exception subclasses only:
#: no SystemExit, KeyboardInterrupt, GeneratorExit).
EXCEPTION_TYPES: dict[str, type[BaseException]] = {
    name: value for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, Exception)
}


def _bytearray(source: Any = b"", encoding: Any = None) -> bytearray:
    """``bytearray`` as protocol 2 pickles it, ``(str, 'latin-1')``; never a size."""
    if isinstance(source, str) and encoding in ("latin-1", "latin1"):
        return bytearray(source, "latin-1")
    if isinstance(source, bytes) and encoding is None:
        return bytearray(source)
    raise InvalidRequest("bytearray() in a pickle only from (str, 'latin-1') or bytes")


def _codecs_encode(text: Any, encoding: Any = None) -> bytes:
    """``_codecs.encode(str, 'latin1')``: how protocol 2 pickles ``bytes``; nothing else."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin-1")
    raise InvalidRequest("_codecs.encode in a pickle only as bytes, (str, 'latin1')")


_BUILTIN_MODULES = ("builtins", "__builtin__", "exceptions")  # Python 3, Python 2 names
_CONTAINERS: dict[str, Callable[..., Any]] = {
    "set": set, "frozenset": frozenset, "complex": complex, "bytearray": _bytearray}


def _allowed_global(module: str, name: str) -> Any:
    """The object a GLOBAL may name, or None if it is not on the allow-list."""
    if module == "callme.protocol":
        return {"RpcRequest": RpcRequest, "RpcResponse": RpcResponse}.get(name)
    if module in _BUILTIN_MODULES:
        return _CONTAINERS.get(name) or EXCEPTION_TYPES.get(name)
    if (module, name) == ("_codecs", "encode"):
        return _codecs_encode
    return None


# --- reading ----------------------------------------------------------------------

_ALLOWED_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK NONE NEWTRUE NEWFALSE
    INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8
    BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8
    EMPTY_LIST APPEND APPENDS LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3
    EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET
    GLOBAL STACK_GLOBAL REDUCE NEWOBJ BUILD
    PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET
""".split())
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _prescan(data: bytes, max_depth: int, foreign: bool) -> int:
    """Check the opcodes without running any; return how many there are."""
    count = 0
    marks = 0
    end = -1
    try:
        for opcode, arg, pos in pickletools.genops(data):
            count += 1
            name = opcode.name
            if name not in _ALLOWED_OPCODES:
                raise InvalidRequest(f"pickle opcode {name} is not allowed")
            if name in _PUTS and not (isinstance(arg, int) and 0 <= arg <= count):
                raise InvalidRequest(f"pickle memo index {arg} out of range")
            elif name == "FRAME" and not (isinstance(arg, int) and arg <= len(data)):
                raise InvalidRequest("pickle frame longer than the data")
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                if _allowed_global(module, attr) is None and not foreign:
                    raise InvalidRequest(f"pickle names {module}.{attr}, which is not "
                                         f"allowed")
            elif name == "MARK":
                marks += 1
                if marks > max_depth:
                    raise InvalidRequest(f"pickle nested deeper than {max_depth} levels")
            elif pickletools.markobject in opcode.stack_before:
                marks -= 1
            if name == "STOP":
                end = (pos or 0) + 1
    except ValueError as e:  # truncated, unknown opcode, bad argument
        raise InvalidRequest(f"invalid pickle: {e}") from None
    if end != len(data):
        raise InvalidRequest(f"{len(data) - end} bytes after the end of the pickle")
    return count


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, foreign: bool) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8", errors="strict")
        self._foreign = foreign

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        if found is not None:
            return found
        if self._foreign and isinstance(module, str) and isinstance(name, str):
            return _ForeignGlobal(f"{module}.{name}")
        raise InvalidRequest(f"pickle names {module}.{name}, which is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise InvalidRequest("persistent ids are not allowed in a pickle")


_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray})
_SEQUENCES = frozenset({list, tuple, set, frozenset})
_EXCEPTION_CLASSES = frozenset(EXCEPTION_TYPES.values())


def _children(obj: Any, foreign: bool) -> Iterable[Any]:
    """The objects *obj* holds; InvalidRequest if its type is not allowed."""
    kind = type(obj)
    if kind in _SCALARS:
        return ()
    if kind in _SEQUENCES:
        return obj  # type: ignore[no-any-return]
    if kind is dict:
        return (x for item in obj.items() for x in item)
    if kind is RpcRequest:
        return tuple(getattr(obj, name, None) for name in RpcRequest.__slots__)
    if kind is RpcResponse:
        return (getattr(obj, "result", None),)
    if kind in _EXCEPTION_CLASSES:
        return (obj.args, obj.__dict__, obj.__cause__, obj.__context__)
    if kind is ForeignObject and foreign:
        return (obj.args, obj.state)
    raise InvalidRequest(f"a pickled {kind.__module__}.{kind.__qualname__} is not allowed")


def _check_tree(value: Any, max_depth: int, max_nodes: int, foreign: bool) -> None:
    """Walk *value* as a tree: allowed types only, bounded depth and size."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = 0
    while stack:
        obj, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise InvalidRequest(f"pickle expands to more than {max_nodes} objects "
                                 f"(repeated references)")
        if depth > max_depth:
            raise InvalidRequest(f"pickle nested deeper than {max_depth} levels")
        for child in _children(obj, foreign):
            stack.append((child, depth + 1))


def loads(data: bytes, *, foreign: bool = False, max_depth: int = MAX_DEPTH) -> Any:
    """Unpickle *data* through the allow-list; raise :class:`InvalidRequest`.

    ``foreign=True`` (replies only) turns names outside the allow-list called
    with arguments into :class:`ForeignObject` records instead of refusing them.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRequest(f"a pickle must be bytes, not {type(data).__name__}")
    data = bytes(data)
    count = _prescan(data, max_depth, foreign)
    try:
        value = _Unpickler(data, foreign).load()
    except InvalidRequest:
        raise
    except (Exception, MemoryError) as e:
        raise InvalidRequest(f"cannot unpickle: {type(e).__name__}: {e}") from None
    _check_tree(value, max_depth + 2, 2 * count + 1000, foreign)
    return value


def decode_request(data: bytes) -> _wire.Request:
    """A callme request body as a txcallme request; raise :class:`InvalidRequest`."""
    request = loads(data)
    if type(request) is not RpcRequest:
        raise InvalidRequest(f"a callme request must be a callme.protocol.RpcRequest, "
                             f"not {type(request).__name__}")
    name, args, kwargs = (getattr(request, field, None) for field in RpcRequest.__slots__)
    if not isinstance(name, str) or not name:
        raise InvalidRequest("callme request needs a non-empty string func_name")
    if not isinstance(args, (list, tuple)):
        raise InvalidRequest("callme request func_args must be a list or tuple")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidRequest("callme request func_kwargs must be a dict with string keys")
    return _wire.Request(name, list(args), kwargs, None)


def decode_response(data: bytes) -> Any:
    """The ``result`` of a callme reply body (an exception instance or a
    :class:`ForeignObject` when the call failed); raise :class:`InvalidRequest`."""
    response = loads(data, foreign=True)
    if type(response) is not RpcResponse:
        raise InvalidRequest(f"a callme reply must be a callme.protocol.RpcResponse, "
                             f"not {type(response).__name__}")
    if not hasattr(response, "result"):
        raise InvalidRequest("callme reply has no result")
    result = response.result
    _no_foreign(result.args if isinstance(result, ForeignObject) else result)
    if isinstance(result, ForeignObject):
        _no_foreign(result.state)
    return result


def _no_foreign(value: Any) -> None:
    stack = [value]
    while stack:
        obj = stack.pop()
        if type(obj) is ForeignObject:
            raise InvalidRequest(f"callme reply holds a {obj.type_name}, which is not "
                                 f"allowed")
        stack.extend(_children(obj, True))


def settle(d: Deferred[Any], errors: RemoteErrorRegistry, body: bytes) -> None:
    """Fire *d* from a callme reply body: the result, the builtin exception the
    server sent, or (another type) the one *errors* rebuilds, by default
    :class:`~txcallme.errors.RemoteError` with its type name and arguments."""
    try:
        result = decode_response(body)
    except InvalidRequest as e:
        d.errback(InvalidRequest(f"unreadable callme reply: {e}"))
        return
    if isinstance(result, ForeignObject):
        d.errback(errors.rebuild(result.type_name, _message(result.args), result.args, ""))
    elif type(result) in _EXCEPTION_CLASSES:
        d.errback(result)
    else:
        d.callback(result)


def _message(args: tuple[Any, ...]) -> str:
    """``str()`` of an exception with these arguments."""
    if not args:
        return ""
    return safe_str(args[0]) if len(args) == 1 else safe_str(args)


# --- writing ----------------------------------------------------------------------


def _message_pickle(class_name: str, fields: dict[str, Any]) -> bytes:
    """``callme.protocol.<class_name>`` with *fields*, exactly as protocol 2
    pickles an instance (NEWOBJ, then BUILD with its ``__dict__``), without
    needing callme importable here."""
    try:
        state = pickle.dumps(fields, protocol=PICKLE_PROTOCOL)
    except Exception as e:
        raise SerializationError(f"cannot pickle for callme: {type(e).__name__}: {e}") \
            from None
    # state is PROTO 2 ... STOP; its memo indices start at 0, and the frame
    # around it stores nothing in the memo.
    return (b"\x80\x02c" + f"callme.protocol\n{class_name}\n".encode() + b")\x81"
            + state[2:-1] + b"b.")


def encode_request(method: str, args: Iterable[Any] = (),
                   kwargs: Mapping[str, Any] | None = None) -> bytes:
    """A callme 0.2.0 request body. callme 0.2.0 servers call ``func(*func_args)``
    and ignore anything else, so keyword arguments are refused (TypeError)."""
    if kwargs:
        raise TypeError(f"{method}(): callme 0.2.0 servers take positional arguments "
                        f"only, not {sorted(kwargs)}")
    return _message_pickle("RpcRequest", {"func_name": method, "func_args": tuple(args)})


def encode_response(result: Any) -> bytes:
    """A callme reply body for *result* (a value, or the exception to raise)."""
    return _message_pickle("RpcResponse", {"result": result})


#: txcallme's own errors as the builtin exceptions a callme client can unpickle.
_OWN_ERRORS: dict[str, type[Exception]] = {
    "txcallme.errors.UnknownMethod": KeyError,  # what callme 0.2.0 itself sends
    "txcallme.errors.InvalidRequest": ValueError,
    "txcallme.errors.PayloadTooLarge": ValueError,
    "txcallme.errors.SerializationError": TypeError,
}


def callme_exception(exc: BaseException) -> BaseException:
    """The exception a callme client gets for *exc*: *exc* itself if it
    pickles and is not one of txcallme's, else a builtin one with its text."""
    name = qualified_name(type(exc))
    if name in _OWN_ERRORS:
        return _OWN_ERRORS[name](safe_str(exc))
    if not type(exc).__module__.startswith("txcallme"):
        try:
            pickle.dumps(exc, protocol=PICKLE_PROTOCOL)
            return exc
        except Exception:
            pass
    return RuntimeError(f"{name}: {safe_str(exc)}")


def error_response(error: dict[str, Any]) -> bytes:
    """A callme reply body for a txcallme error description (see
    :func:`txcallme._wire.error_description`)."""
    name = str(error.get("type", "Exception"))
    message = str(error.get("message", ""))
    args = error.get("args") or [message]
    exc: BaseException
    if name in _OWN_ERRORS:
        exc = _OWN_ERRORS[name](message)
    elif name in BUILTIN_REMOTE_TYPES or name in EXCEPTION_TYPES:
        try:
            exc = EXCEPTION_TYPES.get(name, RuntimeError)(*args)
        except Exception:
            exc = RuntimeError(f"{name}: {message}")
    else:
        exc = RuntimeError(f"{name}: {message}")
    return encode_response(exc)


# --- serving callme clients ---------------------------------------------------------


@attrs.frozen
class _Raised:
    """A handler's exception, carried as a value to :class:`_ReplyEncoder`."""

    exception: BaseException


def _catching(method: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """*func*, returning its exception as :class:`_Raised` instead of raising,
    so that the callme reply can carry the exception instance itself."""

    def raised(exc: BaseException) -> _Raised:
        log.info("{method} raised {type}: {exc}", method=method, type=type(exc).__name__,
                 exc=exc)
        return _Raised(exc)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            result = func(*args, **kwargs)
        except Exception as e:
            return raised(e)
        if inspect.iscoroutine(result) or isinstance(result, Deferred):
            return ensureDeferred(result).addErrback(
                lambda f: raised(f.value) if isinstance(f.value, Exception) else f)
        return result

    return call


class _ReplyEncoder:
    """The Serializer a :class:`CallmeDispatcher` encodes replies with."""

    content_type = CONTENT_TYPE

    def dumps(self, value: Any) -> bytes:
        if "result" in value:
            result = value["result"]
            if isinstance(result, _Raised):
                return encode_response(callme_exception(result.exception))
            return encode_response(result)
        return error_response(value["error"])

    def loads(self, data: bytes) -> Any:
        return decode_request(data)


class _Handlers(dict[str, Handler]):
    """A live view of a Dispatcher's handlers, each wrapped by :func:`_catching`."""

    def __init__(self, source: dict[str, Handler]) -> None:
        super().__init__()
        self._source = source
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def get(self, name: str, default: Any = None) -> Any:
        handler = self._source.get(name)
        if handler is None:
            return default
        origin, wrapped = self._wrapped.get(name, (None, None))
        if origin is not handler or wrapped is None:
            wrapped = attrs.evolve(handler, func=_catching(name, handler.func))
            self._wrapped[name] = (handler, wrapped)
        return wrapped

    def __getitem__(self, name: str) -> Handler:
        handler = self.get(name)
        if handler is None:
            raise KeyError(name)
        return handler  # type: ignore[no-any-return]

    def __contains__(self, name: object) -> bool:
        return name in self._source

    def __iter__(self) -> Any:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


class CallmeDispatcher:
    """Runs callme requests with another :class:`~txcallme.server.Dispatcher`'s
    functions and encodes callme replies (pickled ``RpcResponse``)."""

    def __init__(self, dispatcher: Dispatcher, *, reactor: Any = None,
                 thread_pool: Any = None) -> None:
        self._dispatcher = Dispatcher(_ReplyEncoder(), reactor=reactor,
                                      thread_pool=thread_pool)
        self._dispatcher.handlers = _Handlers(dispatcher.handlers)

    def dispatch(self, request: _wire.Request, context: Any = None) -> Deferred[bytes]:
        """Run *request*; fires with a callme reply body. Never fails."""
        return self._dispatcher.dispatch(request, context)


def encode_error(error: BaseException) -> bytes:
    """The callme reply body for a request refused before it ran."""
    return encode_response(callme_exception(error))


async def declare_server(channel: Channel, server_id: str, *, durable: bool = False) -> None:
    """Declare *server_id*'s exchange and queue with callme's flags and bind the
    queue with callme's key ``''`` and txcallme's key *server_id*, so callme and
    txcallme callers reach the same servers. ``durable=True`` matches callme's
    ``Server(durable=True)``."""
    exchange, queue = _wire.server_exchange(server_id), _wire.server_queue(server_id)
    await channel.declare_exchange(exchange, "direct", durable=durable, auto_delete=True)
    await channel.declare_queue(queue, durable=durable, auto_delete=True)
    await channel.bind_queue(queue, exchange, ROUTING_KEY)
    await channel.bind_queue(queue, exchange, server_id)
