"""txcallme.testing: the in-memory pair behaves like the real Proxy and server."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txcallme import (
    CallmeServerService,
    Proxy,
    ProxyClosed,
    RemoteError,
    RpcTimeout,
    SerializationError,
    ServerUnavailable,
    UnknownMethod,
)
from txcallme.testing import MemoryBroker


class AppError(Exception):
    """A user exception type."""


class MemoryPairTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker(self.clock)
        self.server = self.broker.server("fooserver")
        self.waiting: Deferred[int] = Deferred()

        @self.server.register_function
        def add(a: int, b: int) -> int:
            return a + b

        @self.server.register_function(name="math.div")
        def div(a: float, b: float) -> float:
            return a / b

        self.server.register_function(lambda: (_ for _ in ()).throw(AppError("bad", 7)),
                                      "fail")
        self.server.register_function(lambda: object(), "unserializable")
        self.server.register_function(lambda: self.waiting, "wait")

        async def coro(x: int) -> int:
            return await succeed(x * 2)

        self.server.register_function(coro)
        self.proxy = self.broker.proxy(timeout=5)

    def test_result(self) -> None:
        """use_server(...).add(1, 1) fires with 2, dotted names and coroutines work."""
        server = self.proxy.use_server("fooserver")
        self.assertEqual(self.successResultOf(server.add(1, 1)), 2)
        self.assertEqual(self.successResultOf(server.math.div(6, 3)), 2.0)
        self.assertEqual(self.successResultOf(self.proxy.call("fooserver", "coro", 4)), 8)

    def test_builtin_remote_error(self) -> None:
        """A builtin exception is rebuilt as itself with the remote traceback."""
        f = self.failureResultOf(self.proxy.use_server("fooserver").math.div(1, 0),
                                 ZeroDivisionError)
        self.assertIn("div", f.value.remote_traceback)

    def test_user_error(self) -> None:
        """An unregistered user exception is RemoteError; a registered one is rebuilt."""
        f = self.failureResultOf(self.proxy.call("fooserver", "fail"), RemoteError)
        self.assertTrue(f.value.type_name.endswith("AppError"))
        self.assertEqual(f.value.remote_args, ("bad", 7))
        self.proxy.errors.register(AppError)
        f = self.failureResultOf(self.proxy.call("fooserver", "fail"), AppError)
        self.assertEqual(f.value.args, ("bad", 7))

    def test_call_errors(self) -> None:
        """Unknown methods, bad arguments and unserializable results fail like over AMQP."""
        self.failureResultOf(self.proxy.call("fooserver", "nope"), UnknownMethod)
        f = self.failureResultOf(self.proxy.call("fooserver", "add", 1), TypeError)
        self.assertIn("b", str(f.value))
        self.failureResultOf(self.proxy.call("fooserver", "unserializable"),
                             SerializationError)
        self.failureResultOf(self.proxy.call("barserver", "add", 1, 2), ServerUnavailable)

    def test_timeout(self) -> None:
        """A handler that does not answer in time gives RpcTimeout; nothing is left pending,
        and once proxy and server are stopped nothing is left on the clock."""
        d = self.proxy.use_server("fooserver", timeout=2).wait()
        self.assertNoResult(d)
        self.clock.advance(2.5)
        self.failureResultOf(d, RpcTimeout)
        self.assertEqual(self.proxy.pending_count, 0)
        self.waiting.callback(1)  # the late answer is dropped
        self.successResultOf(self.proxy.close())
        self.successResultOf(self.server.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close(self) -> None:
        """close() fails pending calls and later calls with ProxyClosed."""
        d = self.proxy.call("fooserver", "wait")
        self.successResultOf(self.proxy.close())
        self.failureResultOf(d, ProxyClosed)
        self.failureResultOf(self.proxy.call("fooserver", "add", 1, 1), ProxyClosed)
        self.waiting.callback(1)
        self.successResultOf(self.server.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RealCodeTests(SynchronousTestCase):
    """MemoryBroker runs the real Proxy and server, so broker events reach them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker(self.clock)
        self.server = self.broker.server("fooserver")
        self.server.register_function(lambda a, b: a + b, "add")
        self.proxy = self.broker.proxy(timeout=5)

    def test_real_objects(self) -> None:
        """broker.proxy() is a txcallme.Proxy and broker.server() a CallmeServerService."""
        self.assertIsInstance(self.proxy, Proxy)
        self.assertIsInstance(self.server, CallmeServerService)
        self.assertIn("server_fooserver_queue", self.broker.amqp.queues)

    def test_stopped_server_is_unavailable(self) -> None:
        """After server.stop(), a call fails with ServerUnavailable, not a timeout."""
        self.successResultOf(self.server.stop())
        self.failureResultOf(self.proxy.call("fooserver", "add", 1, 1), ServerUnavailable)

    def test_connection_drop_recovers(self) -> None:
        """After the broker drops every connection, both sides reconnect on the clock
        and a new call is answered."""
        self.broker.amqp.drop_connections()
        self.clock.advance(30)
        self.assertEqual(self.successResultOf(self.proxy.call("fooserver", "add", 2, 3)), 5)

    def test_threading_refused(self) -> None:
        """A threaded memory server is refused with a clear ValueError."""
        with self.assertRaises(ValueError) as info:
            self.broker.server("threaded", threading=True)
        self.assertIn("threading", str(info.exception))
