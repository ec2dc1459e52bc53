"""Unit tests for txcallme.server.Dispatcher: registering and running one call."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from conftest import Services, sleep
from opentelemetry.trace import SpanKind
from test_observe import Telemetry, telemetry_on
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from txcallme._wire import RESERVED_PREFIX, Reply, Request, decode_reply
from txcallme.errors import SerializationError
from txcallme.serializers import JSON
from txcallme.server import CallContext, Dispatcher


class SynchronousPool:
    """A thread pool that runs work at once, on the calling thread."""

    def __init__(self) -> None:
        self.ran: list[Callable[..., Any]] = []

    def callInThreadWithCallback(  # noqa: N802 - ThreadPool's name
        self, onResult: Callable[[bool, Any], None], func: Callable[..., Any],
        *args: Any, **kwargs: Any,
    ) -> None:
        # the dispatcher hands over Context.run and a partial holding the call's
        # own arguments
        inner = args[0] if isinstance(getattr(func, "__self__", None), contextvars.Context) \
            else func
        self.ran.append(inner.func if isinstance(inner, functools.partial) else inner)
        try:
            result = func(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ImmediateReactor:
    """Just enough reactor for deferToThreadPool: callFromThread runs at once."""

    def __init__(self) -> None:
        self.from_thread = 0

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:  # noqa: N802
        self.from_thread += 1
        f(*args, **kwargs)


class Adder:
    """A callable object, registered without a __name__."""

    def __call__(self, a: int, b: int) -> int:
        return a + b


class AsyncAdder:
    """A callable object whose __call__ is a coroutine function."""

    async def __call__(self, a: int, b: int) -> int:
        return a + b


class Unprintable(Exception):
    """An exception whose str() itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def add(a: int, b: int) -> int:
    return a + b


async def async_add(a: int, b: int) -> int:
    return a + b


class DispatchTestCase(SynchronousTestCase):
    """Helpers shared by the dispatch tests."""

    def setUp(self) -> None:
        self.dispatcher = Dispatcher(JSON)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Reply:
        """Dispatch a request; it must already have fired with a reply body."""
        d = self.dispatcher.dispatch(Request(method, list(args), kwargs))
        body = self.successResultOf(d)
        self.assertIsInstance(body, bytes)
        return decode_reply(JSON, body)

    def result(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Dispatch a request that must succeed; return its result."""
        reply = self.call(method, *args, **kwargs)
        self.assertTrue(reply.ok, reply.error)
        return reply.value

    def error(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Dispatch a request that must fail; return its error description."""
        reply = self.call(method, *args, **kwargs)
        self.assertFalse(reply.ok, reply.value)
        return reply.error


class RegisterTests(DispatchTestCase):
    """Dispatcher.register."""

    def test_plain_name(self) -> None:
        """A function is registered under its __name__."""
        self.dispatcher.register(add)
        self.assertEqual(list(self.dispatcher.handlers), ["add"])
        self.assertIs(self.dispatcher.handlers["add"].func, add)

    def test_explicit_name(self) -> None:
        """An explicit name replaces the function's own."""
        self.dispatcher.register(add, "plus")
        self.assertEqual(list(self.dispatcher.handlers), ["plus"])
        self.assertEqual(self.result("plus", 1, 2), 3)

    def test_dotted_name(self) -> None:
        """Dotted names are allowed and dispatched as-is."""
        self.dispatcher.register(add, "math.add")
        self.assertEqual(self.result("math.add", 2, 3), 5)

    def test_callable_object_needs_name(self) -> None:
        """A callable without a __name__ needs name=."""
        self.assertRaises(ValueError, self.dispatcher.register, Adder())
        self.dispatcher.register(Adder(), "adder")
        self.assertEqual(self.result("adder", 2, 2), 4)

    def test_reserved_prefix_refused(self) -> None:
        """Names under __callme__. are refused unless reserved=True."""
        self.assertRaises(ValueError, self.dispatcher.register, add, RESERVED_PREFIX + "add")
        self.assertEqual(self.dispatcher.handlers, {})
        self.dispatcher.register(add, RESERVED_PREFIX + "add", reserved=True)
        self.assertIn(RESERVED_PREFIX + "add", self.dispatcher.handlers)

    def test_duplicate_refused(self) -> None:
        """A second function under the same name is refused; the first stays."""
        self.dispatcher.register(add)
        self.assertRaises(ValueError, self.dispatcher.register, async_add, "add")
        self.assertIs(self.dispatcher.handlers["add"].func, add)

    def test_non_callable_refused(self) -> None:
        """Something that is not callable cannot be registered."""
        self.assertRaises(TypeError, self.dispatcher.register, 42, "answer")
        self.assertEqual(self.dispatcher.handlers, {})

    def test_blocking_without_pool_refused(self) -> None:
        """blocking=True without a thread pool is refused."""
        self.assertRaises(ValueError, self.dispatcher.register, add, blocking=True)
        self.assertEqual(self.dispatcher.handlers, {})

    def test_no_pool_not_blocking(self) -> None:
        """Without a pool, functions run on the reactor."""
        self.dispatcher.register(add)
        self.assertFalse(self.dispatcher.handlers["add"].blocking)


class DispatchTests(DispatchTestCase):
    """Dispatcher.dispatch without a thread pool."""

    def test_plain_function(self) -> None:
        """A plain function's return value is the reply's result."""
        self.dispatcher.register(add)
        self.assertEqual(self.result("add", 1, 2), 3)
        self.assertEqual(self.result("add", 1, b=5), 6)

    def test_async_function(self) -> None:
        """An async def handler awaiting a fired Deferred replies with its result."""
        async def fetch(key: str) -> dict[str, str]:
            value = await succeed(key.upper())
            return {key: value}

        self.dispatcher.register(fetch)
        self.assertEqual(self.result("fetch", "k"), {"k": "K"})

    def test_async_callable_object(self) -> None:
        """An object with an async __call__ is awaited."""
        self.dispatcher.register(AsyncAdder(), "aadd")
        self.assertEqual(self.result("aadd", 1, 1), 2)

    def test_deferred_function(self) -> None:
        """A Deferred-returning handler replies with the Deferred's result."""
        self.dispatcher.register(lambda x: succeed([x, x]), "twice")
        self.assertEqual(self.result("twice", 7), [7, 7])

    def test_reply_waits_for_deferred(self) -> None:
        """The reply comes only when the handler's Deferred fires."""
        pending: Deferred[int] = Deferred()
        self.dispatcher.register(lambda: pending, "later")
        d = self.dispatcher.dispatch(Request("later", [], {}))
        self.assertNoResult(d)
        pending.callback(9)
        self.assertEqual(decode_reply(JSON, self.successResultOf(d)).value, 9)

    def test_async_failure(self) -> None:
        """An exception raised in an async handler becomes an error reply."""
        async def sour() -> None:
            await succeed(None)
            raise ValueError("sour", 2)

        self.dispatcher.register(sour)
        error = self.error("sour")
        self.assertEqual((error["type"], error["args"]), ("ValueError", ["sour", 2]))

    def test_deferred_failure(self) -> None:
        """A handler whose Deferred fails replies with that error."""
        self.dispatcher.register(lambda: Deferred.fromCoroutine(_raise_key()), "lookup")
        error = self.error("lookup")
        self.assertEqual((error["type"], error["args"]), ("KeyError", ["k"]))

    def test_unknown_method(self) -> None:
        """An unregistered name replies with UnknownMethod."""
        self.dispatcher.register(add)
        error = self.error("nope", 1)
        self.assertEqual(error["type"], "txcallme.errors.UnknownMethod")
        self.assertIn("nope", error["message"])

    def test_missing_argument(self) -> None:
        """Missing arguments reply with a TypeError naming them; the function is not called."""
        calls: list[tuple[int, int]] = []

        def record(a: int, b: int) -> None:
            calls.append((a, b))

        self.dispatcher.register(record)
        error = self.error("record", 1)
        self.assertEqual(error["type"], "TypeError")
        self.assertIn("record", error["message"])
        self.assertIn("'b'", error["message"])
        self.assertEqual(calls, [])

    def test_unexpected_argument(self) -> None:
        """Unexpected keyword and extra positional arguments reply with a TypeError."""
        self.dispatcher.register(add)
        self.assertIn("'c'", self.error("add", 1, 2, c=3)["message"])
        self.assertEqual(self.error("add", 1, 2, 3)["type"], "TypeError")

    def test_exception(self) -> None:
        """A handler's exception replies with its type, message, args and traceback."""
        def divide(a: int, b: int) -> float:
            return a / b

        self.dispatcher.register(divide)
        error = self.error("divide", 1, 0)
        self.assertEqual(error["type"], "ZeroDivisionError")
        self.assertEqual(error["message"], "division by zero")
        self.assertEqual(error["args"], ["division by zero"])
        self.assertIn("divide", error["traceback"])
        self.assertIn("ZeroDivisionError", error["traceback"])

    def test_user_exception_type_name(self) -> None:
        """A non-builtin exception travels under module.QualName."""
        def fail() -> None:
            raise SerializationError("nope")

        self.dispatcher.register(fail)
        self.assertEqual(self.error("fail")["type"], "txcallme.errors.SerializationError")

    def test_unserializable_result(self) -> None:
        """A result JSON cannot encode replies with SerializationError; dispatch never fails."""
        self.dispatcher.register(lambda: {1, 2}, "a_set")
        error = self.error("a_set")
        self.assertEqual(error["type"], "txcallme.errors.SerializationError")
        self.assertIn("a_set", error["message"])

    def test_nan_result(self) -> None:
        """A NaN result (not valid JSON) replies with SerializationError."""
        self.dispatcher.register(lambda: float("nan"), "nan")
        self.assertEqual(self.error("nan")["type"], "txcallme.errors.SerializationError")

    def test_lone_surrogate_result(self) -> None:
        """A string result that cannot be UTF-8 encoded replies with SerializationError."""
        self.dispatcher.register(lambda s: s, "echo")
        self.assertEqual(self.error("echo", "\ud800")["type"],
                         "txcallme.errors.SerializationError")

    def test_exception_with_unsafe_args(self) -> None:
        """An exception with non-JSON args still replies, with the args as reprs."""
        marker = object()

        def odd() -> None:
            raise ValueError("odd", marker, {1, 2})

        self.dispatcher.register(odd)
        error = self.error("odd")
        self.assertEqual(error["type"], "ValueError")
        self.assertEqual(error["args"], ["odd", repr(marker), repr({1, 2})])

    def test_exception_with_nan_arg(self) -> None:
        """An exception carrying NaN (not valid JSON) still produces an error reply."""
        def odd() -> None:
            raise ValueError(float("nan"))

        self.dispatcher.register(odd)
        error = self.error("odd")
        self.assertEqual((error["type"], error["args"]), ("ValueError", ["nan"]))

    def test_exception_with_unencodable_message(self) -> None:
        """An exception whose message cannot be UTF-8 encoded still produces an error reply.

        A lone surrogate arrives from any client as the JSON string "\\ud800".
        """
        def check(name: str) -> None:
            raise ValueError(name)

        self.dispatcher.register(check)
        error = self.error("check", "\ud800")
        self.assertEqual(error["type"], "ValueError")

    def test_exception_with_failing_str(self) -> None:
        """An exception whose str() raises still produces an error reply."""
        def odd() -> None:
            raise Unprintable("x")

        self.dispatcher.register(odd)
        self.assertEqual(self.error("odd")["type"], f"{__name__}.Unprintable")


class ContextTests(DispatchTestCase):
    """Handlers registered with with_context=True."""

    def test_context_passed(self) -> None:
        """The CallContext made by dispatch's factory reaches the handler as context=."""
        seen: list[CallContext | None] = []

        def whoami(x: int, context: CallContext | None = None) -> int:
            seen.append(context)
            return x

        self.dispatcher.register(whoami, with_context=True)
        context = CallContext("srv", "whoami", "c1", "client_ex", True, None)
        d = self.dispatcher.dispatch(Request("whoami", [5], {}), lambda: context)
        self.assertEqual(decode_reply(JSON, self.successResultOf(d)).value, 5)
        self.assertEqual(seen, [context])

    def test_context_not_passed_by_default(self) -> None:
        """Without with_context a handler gets no context argument."""
        self.dispatcher.register(add)
        context = CallContext("srv", "add", None, None, False, None)
        d = self.dispatcher.dispatch(Request("add", [1, 2], {}), lambda: context)
        self.assertEqual(decode_reply(JSON, self.successResultOf(d)).value, 3)

    def test_context_from_wire_refused(self) -> None:
        """A caller cannot supply context= itself; the handler is not called."""
        calls: list[object] = []
        self.dispatcher.register(lambda context: calls.append(context), "f",
                                 with_context=True)
        error = self.error("f", context="forged")
        self.assertEqual(error["type"], "TypeError")
        self.assertIn("context", error["message"])
        self.assertEqual(calls, [])


async def _raise_key() -> None:
    await succeed(None)
    raise KeyError("k")


class ThreadPoolTests(DispatchTestCase):
    """Dispatching with a thread pool."""

    def setUp(self) -> None:
        self.pool = SynchronousPool()
        self.reactor = ImmediateReactor()
        self.dispatcher = Dispatcher(JSON, reactor=self.reactor, thread_pool=self.pool)

    def test_plain_function_is_blocking(self) -> None:
        """With a pool, a plain function is detected as blocking and run in the pool."""
        self.dispatcher.register(add)
        self.assertTrue(self.dispatcher.handlers["add"].blocking)
        self.assertEqual(self.result("add", 2, 3), 5)
        self.assertEqual(self.pool.ran, [add])
        self.assertEqual(self.reactor.from_thread, 1)

    def test_async_function_not_blocking(self) -> None:
        """An async def function runs on the reactor even when there is a pool."""
        self.dispatcher.register(async_add)
        self.assertFalse(self.dispatcher.handlers["async_add"].blocking)
        self.assertEqual(self.result("async_add", 2, 3), 5)
        self.assertEqual(self.pool.ran, [])

    def test_async_callable_and_partial_not_blocking(self) -> None:
        """Async callable objects, bound async methods and async partials are not blocking."""
        class Service:
            async def method(self) -> int:
                return 1

        self.dispatcher.register(AsyncAdder(), "obj")
        self.dispatcher.register(Service().method, "method")
        self.dispatcher.register(functools.partial(async_add, 1), "partial")
        for name in ("obj", "method", "partial"):
            self.assertFalse(self.dispatcher.handlers[name].blocking, name)
        self.assertEqual(self.result("partial", 2), 3)
        self.assertEqual(self.pool.ran, [])

    def test_explicit_not_blocking(self) -> None:
        """blocking=False keeps a plain (e.g. Deferred-returning) function on the reactor."""
        self.dispatcher.register(lambda: succeed(4), "four", blocking=False)
        self.assertEqual(self.result("four"), 4)
        self.assertEqual(self.pool.ran, [])

    def test_explicit_blocking(self) -> None:
        """blocking=True with a pool runs the function in the pool."""
        self.dispatcher.register(add, blocking=True)
        self.assertEqual(self.result("add", 1, 1), 2)
        self.assertEqual(self.pool.ran, [add])

    def test_exception_in_pool(self) -> None:
        """An exception raised in the pool replies with type, args and traceback."""
        def explode(x: int) -> None:
            raise ValueError("bad", x)

        self.dispatcher.register(explode)
        error = self.error("explode", 3)
        self.assertEqual(error["type"], "ValueError")
        self.assertEqual(error["args"], ["bad", 3])
        self.assertIn("explode", error["traceback"])
        self.assertEqual(self.pool.ran, [explode])

    def test_bad_arguments_not_sent_to_pool(self) -> None:
        """Arguments are bound before the pool is used; a mismatch never reaches it."""
        self.dispatcher.register(add)
        self.assertEqual(self.error("add", 1)["type"], "TypeError")
        self.assertEqual(self.pool.ran, [])

    def test_unserializable_result_in_pool(self) -> None:
        """A pool function's unserializable result replies with SerializationError."""
        self.dispatcher.register(lambda: object(), "thing")
        self.assertEqual(self.error("thing")["type"], "txcallme.errors.SerializationError")


class RefusingPool:
    """A thread pool that refuses all work, as a stopped one might."""

    def callInThreadWithCallback(self, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        raise RuntimeError("pool is stopped")


class StartingCallsTests(DispatchTestCase):
    """Starting a call in the pool: any keyword name, and failures that still answer."""

    def setUp(self) -> None:
        self.pool = SynchronousPool()
        self.reactor = ImmediateReactor()
        self.dispatcher = Dispatcher(JSON, reactor=self.reactor, thread_pool=self.pool)

    def test_keywords_named_like_deferToThreadPool_arguments(self) -> None:
        """Keyword arguments named f, reactor and threadpool reach a threaded function."""
        def echo(f: int, reactor: int, threadpool: int) -> list[int]:
            return [f, reactor, threadpool]

        self.dispatcher.register(echo)
        self.assertEqual(self.result("echo", f=1, reactor=2, threadpool=3), [1, 2, 3])
        self.assertEqual(self.pool.ran, [echo])

    def test_pool_refusing_work_still_answers(self) -> None:
        """If the pool cannot take the call, the caller gets an error reply at once."""
        dispatcher = Dispatcher(JSON, reactor=self.reactor, thread_pool=RefusingPool())
        dispatcher.register(add)
        body = self.successResultOf(dispatcher.dispatch(Request("add", [1, 2], {})))
        error = decode_reply(JSON, body).error
        self.assertEqual(error["type"], "txcallme.errors.ServiceError")
        self.assertIn("pool is stopped", error["message"])
        self.flushLoggedErrors(RuntimeError)

    def test_inline_callbacks_function_runs_on_the_reactor(self) -> None:
        """An inlineCallbacks-decorated function is known at registration to need the reactor."""
        @inlineCallbacks
        def later(x: int) -> Any:
            value = yield succeed(x)
            return value * 2

        self.dispatcher.register(later)
        self.assertFalse(self.dispatcher.handlers["later"].blocking)
        self.assertEqual(self.result("later", 4), 8)
        self.assertEqual(self.pool.ran, [])

    def test_deferred_from_a_worker_thread_is_a_clear_error(self) -> None:
        """A Deferred returned in the pool becomes a remote error saying how to register."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            self.dispatcher.register(lambda: succeed(1), "sneaky")
            error = self.error("sneaky")
        finally:
            globalLogPublisher.removeObserver(events.append)
        self.assertEqual(error["type"], "txcallme.errors.ServiceError")
        self.assertIn("blocking=False", error["message"])
        warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertTrue(any("sneaky" in w and "blocking=False" in w for w in warnings),
                        warnings)


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """Tracing on with a private SDK provider and an in-memory exporter; off afterwards."""
    yield from telemetry_on()


@pytest_twisted.ensureDeferred
async def test_threaded_handler_sees_the_server_span(
        telemetry: Telemetry, services: Services, sid: str) -> None:
    """A span started inside a thread-pool handler is a child of the call's server span."""
    tracer = telemetry.tracer_provider.get_tracer("test")

    def work(x: int) -> int:
        with tracer.start_as_current_span("inside"):
            return x + 1

    await services.start_server(sid, {"work": work}, threading=True, threads=2)
    proxy = await services.ready_proxy(timeout=10)
    assert await proxy.call(sid, "work", 1) == 2
    for _ in range(200):
        if len(telemetry.finished()) >= 3:
            break
        await sleep(0.02)
    spans = telemetry.finished()
    [inside] = [s for s in spans if s.name == "inside"]
    [server] = [s for s in spans if s.kind is SpanKind.SERVER]
    assert inside.parent is not None and inside.parent.span_id == server.context.span_id
    assert inside.context.trace_id == server.context.trace_id
