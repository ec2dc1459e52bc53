"""Dispatching one request: look up, bind arguments, run the handler where it
belongs (reactor or thread pool), and encode a reply that always exists.

No AMQP here: :class:`Dispatcher` turns a :class:`~txcallme._wire.Request`
into reply bytes; :mod:`txcallme.service` moves the bytes.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import linecache
import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.reflect import safe_str

import twisted
from txcallme._wire import (
    RESERVED_PREFIX,
    Request,
    encode_error,
    encode_result,
    error_description,
)
from txcallme.errors import SerializationError, ServiceError, UnknownMethod, qualified_name
from txcallme.serializers import Serializer

log = Logger(namespace="callme.server")


@attrs.frozen
class CallContext:
    """What a handler registered with ``with_context=True`` receives as ``context=``."""

    server_id: str
    method: str
    correlation_id: str | None
    reply_to: str | None
    #: True if the broker delivered this request before (a server died mid-call):
    #: the call may already have run once.
    redelivered: bool
    deadline: float | None


@attrs.frozen
class Handler:
    name: str
    func: Callable[..., Any]
    signature: inspect.Signature | None
    blocking: bool
    with_context: bool = False
    #: number of positional arguments when that alone makes a valid call
    #: (no defaults, no *args/**kwargs): such calls skip Signature.bind
    arity: int | None = None


class Dispatcher:
    """The registry of exposed functions and the logic of running one call."""

    def __init__(self, serializer: Serializer, *, reactor: Any = None,
                 thread_pool: Any = None) -> None:
        self.serializer = serializer
        self._reactor = reactor
        self._pool = thread_pool
        self.handlers: dict[str, Handler] = {}

    def register(self, func: Callable[..., Any], name: str | None = None, *,
                 blocking: bool | None = None, with_context: bool = False,
                 reserved: bool = False) -> None:
        """Expose *func* as *name* (default: its ``__name__``).

        ``blocking=None`` decides by kind: coroutine functions and
        ``inlineCallbacks``-decorated functions run on the reactor; other
        functions run in the thread pool when there is one (a Deferred they
        return there is an error: register such functions ``blocking=False``).
        ``with_context=True`` passes a :class:`CallContext` as ``context=``.
        """
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        name = name or getattr(func, "__name__", None)
        if not name or not isinstance(name, str):
            raise ValueError(f"cannot find a name for {func!r}; pass name=")
        if name.startswith(RESERVED_PREFIX) and not reserved:
            raise ValueError(f"names starting with {RESERVED_PREFIX!r} are reserved")
        if name in self.handlers:
            raise ValueError(f"a function is already registered as {name!r}")
        try:
            signature: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):
            signature = None
        if blocking is None:
            blocking = self._pool is not None and not _is_async(func)
        elif blocking and self._pool is None:
            raise ValueError("blocking=True needs a thread pool (threading=True)")
        self.handlers[name] = Handler(name, func, signature, blocking, with_context,
                                      _simple_arity(signature, with_context))

    def dispatch(self, request: Request,
                 context: Callable[[], CallContext] | None = None) -> Deferred[bytes]:
        """Run *request*; fires with the reply body (result or error). Never fails.

        *context* makes the :class:`CallContext` for handlers that asked for one.
        """
        handler = self.handlers.get(request.method)
        if handler is None:
            return self._error(UnknownMethod(f"no function {request.method!r} on this server"))
        kwargs = request.kwargs
        if handler.with_context:
            if "context" in kwargs:
                return self._error(TypeError(f"{request.method}(): 'context' is reserved"))
            kwargs = {**kwargs, "context": context() if context is not None else None}
        if handler.signature is not None and not (
                handler.arity == len(request.args) and not kwargs):
            try:
                handler.signature.bind(*request.args, **kwargs)
            except TypeError as e:
                return self._error(TypeError(f"{request.method}(): {e}"))
        try:
            if handler.blocking:
                # Everything positional: a keyword argument of the call named f,
                # reactor or threadpool must not meet deferToThreadPool's own. The
                # function runs in a copy of the caller's context, so it sees what
                # the reactor side made current (the server span, contextvars).
                d = deferToThreadPool(self._reactor, self._pool,
                                      contextvars.copy_context().run, functools.partial(
                                          handler.func, *request.args, **kwargs))
            else:
                # On the reactor: a plain result needs no Deferred chain of its own.
                try:
                    value = _run_on_reactor(handler.func, request.args, kwargs)
                except BaseException:
                    return succeed(self._failure(Failure(), request.method))
                if not isinstance(value, Deferred):
                    return succeed(self._result(value, request.method, False, context))
                d = value
        except Exception as e:  # the pool refused the work, ...: still an answer
            log.failure("cannot start {method}", **_fields(request.method, context))
            return self._error(ServiceError(f"the server could not start {request.method}(): "
                                            f"{safe_str(e)}"))
        return d.addCallbacks(self._result, self._failure,
                              callbackArgs=(request.method, handler.blocking, context),
                              errbackArgs=(request.method,))

    def _result(self, value: Any, method: str, in_thread: bool = False,
                context: Callable[[], CallContext] | None = None) -> bytes:
        if in_thread and (isinstance(value, Deferred) or inspect.iscoroutine(value)):
            if inspect.iscoroutine(value):
                value.close()
            log.warn("{method} returned {kind} from a worker thread, where it cannot run: "
                     "register it with blocking=False (or make it async def) so it runs "
                     "on the reactor", kind=type(value).__name__, **_fields(method, context))
            refused = ServiceError(
                f"{method}() returned a {type(value).__name__} from a worker thread; the "
                f"server must register it with blocking=False (or as async def)")
            return encode_error(self.serializer, error_description(refused, False))
        try:
            return encode_result(self.serializer, value)
        except SerializationError as e:
            log.warn("result of {method} cannot be serialized: {error}", error=e,
                     **_fields(method, context))
            error = SerializationError(f"result of {method}() cannot be serialized: {e}")
            return encode_error(self.serializer, error_description(error, False))

    def _failure(self, failure: Failure, method: str) -> bytes:
        exc = failure.value
        assert exc is not None
        log.info("{method} raised {type}: {exc}", method=method, type=type(exc).__name__,
                 exc=exc)
        try:
            description = error_description(exc, with_traceback=False)
            description["traceback"] = remote_traceback(failure)
            return encode_error(self.serializer, description)
        except Exception:
            pass
        try:  # something in it does not encode (lone surrogates, NaN args...)
            description = {
                "type": description["type"],
                "message": ascii(description["message"]),
                "args": [ascii(a) for a in description["args"]],
                "traceback": remote_traceback(failure).encode("utf-8", "backslashreplace")
                .decode("ascii", "replace"),
            }
            return encode_error(self.serializer, description)
        except Exception:
            error = SerializationError(f"{method}() raised an exception that cannot be encoded")
            return encode_error(self.serializer, error_description(error, False))

    def _error(self, exc: Exception) -> Deferred[bytes]:
        body = encode_error(self.serializer, error_description(exc, with_traceback=False))
        d: Deferred[bytes] = Deferred()
        d.callback(body)
        return d


def _fields(method: str, context: Callable[[], CallContext] | None) -> dict[str, Any]:
    """The fields of a warn/error event about one request (for log aggregation):
    server_id and correlation_id from its :class:`CallContext` (None without one)."""
    made = context() if context is not None else None
    return {"method": method, "server_id": made.server_id if made is not None else None,
            "correlation_id": made.correlation_id if made is not None else None}


#: Frames from these packages (thread pool, Deferreds, this dispatcher) are left out.
_FRAMEWORK_DIRS = (os.path.dirname(twisted.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def remote_traceback(failure: Failure) -> str:
    """The handler's traceback in Python's usual format, without Twisted's own
    and txcallme's frames (thread pool, Deferreds, dispatch) in between."""
    lines = ["Traceback (most recent call last):\n"]
    for func, filename, lineno, _, _ in failure.frames:
        if filename.startswith(_FRAMEWORK_DIRS):
            continue
        lines.append(f'  File "{filename}", line {lineno}, in {func}\n')
        source = linecache.getline(filename, lineno).strip()
        if source:
            lines.append(f"    {source}\n")
    exc = failure.value
    name = qualified_name(type(exc)) if exc is not None else "Exception"
    message = safe_str(exc)
    lines.append(f"{name}: {message}\n" if message else f"{name}\n")
    return "".join(lines)


def _simple_arity(signature: inspect.Signature | None, with_context: bool) -> int | None:
    if signature is None or with_context:
        return None
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = signature.parameters.values()
    if all(p.kind in plain and p.default is inspect.Parameter.empty for p in params):
        return len(signature.parameters)
    return None


def _is_async(func: Callable[..., Any]) -> bool:
    """Whether *func* is known at registration to return a Deferred or a coroutine:
    coroutine functions (and callables whose ``__call__`` is one) and
    ``inlineCallbacks``-decorated functions."""
    target = getattr(func, "__func__", func)
    if inspect.iscoroutinefunction(target):
        return True
    code = getattr(target, "__code__", None)
    if code is not None and code.co_name == "unwindGenerator" and \
            inspect.isgeneratorfunction(getattr(target, "__wrapped__", None)):
        return True  # twisted.internet.defer.inlineCallbacks
    return not inspect.isroutine(target) and inspect.iscoroutinefunction(
        type(target).__call__)


def _run_on_reactor(func: Callable[..., Any], args: list[Any],
                    kwargs: dict[str, Any]) -> Any:
    result = func(*args, **kwargs)
    if inspect.iscoroutine(result) or isinstance(result, Deferred):
        return ensureDeferred(result)
    return result
