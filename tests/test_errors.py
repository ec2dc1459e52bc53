"""Unit tests for txcallme.errors: the hierarchy and rebuilding remote errors."""

from __future__ import annotations

import builtins
import inspect
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from txcallme import errors
from txcallme.errors import (
    AccessRefused,
    CallmeError,
    ChannelError,
    NotFound,
    RemoteError,
    RemoteErrorRegistry,
    UnknownMethod,
    channel_error,
)

TRACEBACK = 'Traceback (most recent call last):\n  File "srv.py", line 1, in f\nBoom: x\n'


class AppError(Exception):
    """A user exception type a client may allow."""


class NeedsTwo(Exception):
    """A user exception whose constructor needs exactly two arguments."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


class RebuildTests(SynchronousTestCase):
    """RemoteErrorRegistry.rebuild."""

    def setUp(self) -> None:
        self.registry = RemoteErrorRegistry()

    def _assert_remote_details(self, exc: BaseException, type_name: str) -> None:
        """*exc* carries the remote traceback as an attribute and a note."""
        self.assertEqual(exc.remote_traceback, TRACEBACK)  # type: ignore[attr-defined]
        self.assertEqual(exc.remote_type, type_name)  # type: ignore[attr-defined]
        if sys.version_info < (3, 11):  # no exception notes before 3.11
            return
        self.assertEqual(len(exc.__notes__), 1)
        self.assertTrue(exc.__notes__[0].startswith("Remote traceback:\n"))
        self.assertIn('File "srv.py"', exc.__notes__[0])

    def test_zero_division(self) -> None:
        """A remote ZeroDivisionError is rebuilt as a ZeroDivisionError."""
        exc = self.registry.rebuild("ZeroDivisionError", "division by zero",
                                    ["division by zero"], TRACEBACK)
        self.assertIs(type(exc), ZeroDivisionError)
        self.assertEqual(exc.args, ("division by zero",))
        self._assert_remote_details(exc, "ZeroDivisionError")

    def test_key_error_args(self) -> None:
        """A remote KeyError keeps its args."""
        exc = self.registry.rebuild("KeyError", "'missing'", ["missing"], TRACEBACK)
        self.assertIs(type(exc), KeyError)
        self.assertEqual(exc.args, ("missing",))
        self._assert_remote_details(exc, "KeyError")

    def test_value_error(self) -> None:
        """A remote ValueError with several args is rebuilt with all of them."""
        exc = self.registry.rebuild("ValueError", "('bad', 3)", ["bad", 3], TRACEBACK)
        self.assertIs(type(exc), ValueError)
        self.assertEqual(exc.args, ("bad", 3))
        self._assert_remote_details(exc, "ValueError")

    def test_no_traceback_no_note(self) -> None:
        """Without a remote traceback no note is added."""
        exc = self.registry.rebuild("ValueError", "bad", ["bad"], "")
        self.assertIs(type(exc), ValueError)
        self.assertFalse(getattr(exc, "__notes__", None))

    def test_own_types(self) -> None:
        """txcallme's own wire errors are rebuilt by qualified name."""
        exc = self.registry.rebuild("txcallme.errors.UnknownMethod", "no f", ["no f"], "")
        self.assertIs(type(exc), UnknownMethod)

    def test_server_helper_types(self) -> None:
        """ServiceError, DeclarationRefused, DeliveryLimitReached are rebuilt from wire args."""
        refused = errors.DeclarationRefused("s1", 406, "PRECONDITION_FAILED - x", "use --q")
        name = "txcallme.errors.DeclarationRefused"
        exc = self.registry.rebuild(name, str(refused), list(refused.args), "")
        self.assertIs(type(exc), errors.DeclarationRefused)
        self.assertEqual(str(exc), str(refused))
        self.assertIn("406 PRECONDITION_FAILED - x. use --q", str(exc))
        for cls in (errors.ServiceError, errors.DeliveryLimitReached):
            exc = self.registry.rebuild(f"txcallme.errors.{cls.__name__}", "m", ["m"], "")
            self.assertIs(type(exc), cls)
            self.assertEqual(str(exc), "m")

    def test_unknown_type(self) -> None:
        """An unknown type name becomes a RemoteError carrying every detail."""
        exc = self.registry.rebuild("app.Oops", "it broke", ["it broke", 7], TRACEBACK)
        self.assertIs(type(exc), RemoteError)
        assert isinstance(exc, RemoteError)
        self.assertEqual(exc.type_name, "app.Oops")
        self.assertEqual(exc.message, "it broke")
        self.assertEqual(exc.remote_args, ("it broke", 7))
        self.assertEqual(exc.remote_traceback, TRACEBACK)
        self.assertEqual(str(exc), "app.Oops: it broke")

    def test_registered_user_type(self) -> None:
        """A registered user type is rebuilt under its module.QualName."""
        self.registry.register(AppError)
        exc = self.registry.rebuild(f"{__name__}.AppError", "x", ["x"], TRACEBACK)
        self.assertIs(type(exc), AppError)
        self.assertEqual(exc.args, ("x",))
        self._assert_remote_details(exc, f"{__name__}.AppError")

    def test_registered_under_explicit_name(self) -> None:
        """A type may be registered under the name another server uses."""
        self.registry.register(AppError, "server.Problem")
        self.assertIs(type(self.registry.rebuild("server.Problem", "x", ["x"], "")), AppError)

    def test_registration_is_per_registry(self) -> None:
        """Registering in one registry does not change another."""
        self.registry.register(AppError)
        other = RemoteErrorRegistry()
        self.assertIs(type(other.rebuild(f"{__name__}.AppError", "x", ["x"], "")), RemoteError)

    def test_register_refuses_non_exception(self) -> None:
        """Only exception types can be registered."""
        self.assertRaises(TypeError, self.registry.register, int)
        self.assertRaises(TypeError, self.registry.register, AppError("x"))

    def test_never_imports_or_calls_wire_names(self) -> None:
        """Type names like os.system are never imported or called."""
        calls: list[object] = []

        def spy(*args: object, **kwargs: object) -> None:
            calls.append(args)

        self.patch(os, "system", spy)
        self.patch(subprocess, "Popen", spy)
        self.patch(subprocess, "run", spy)
        for name in ("os.system", "subprocess.Popen", "subprocess.run", "builtins.eval",
                     "eval", "exec", "__import__", "posix.system"):
            exc = self.registry.rebuild(name, "x", ["echo pwned"], "")
            self.assertIs(type(exc), RemoteError, name)
        self.assertEqual(calls, [])

    def test_constructor_failure_falls_back(self) -> None:
        """A registered type that cannot be built from the args becomes a RemoteError."""
        self.registry.register(NeedsTwo)
        name = f"{__name__}.NeedsTwo"
        exc = self.registry.rebuild(name, "a", ["a"], TRACEBACK)
        self.assertIs(type(exc), RemoteError)
        assert isinstance(exc, RemoteError)
        self.assertEqual((exc.type_name, exc.message, exc.remote_args),
                         (name, "a", ("a",)))
        self.assertIs(type(self.registry.rebuild(name, "a/b", ["a", "b"], "")), NeedsTwo)

    def test_own_types_with_required_args_fall_back(self) -> None:
        """A registered txcallme error whose constructor needs more falls back cleanly."""
        self.registry.register(errors.RpcTimeout)
        exc = self.registry.rebuild("txcallme.errors.RpcTimeout", "call s.m got no reply",
                                    ["call s.m got no reply"], "")
        self.assertIs(type(exc), RemoteError)


class ChannelErrorTests(SynchronousTestCase):
    """channel_error picks the subclass for an AMQP reply code."""

    def test_access_refused(self) -> None:
        """403 is AccessRefused, naming the exchange and the user."""
        exc = channel_error(403, "ACCESS_REFUSED - access to exchange 'server_bar_ex' in "
                                 "vhost 'v' refused for user 'olivia'")
        self.assertIs(type(exc), AccessRefused)
        assert isinstance(exc, AccessRefused)
        self.assertEqual(exc.code, 403)
        self.assertEqual(exc.object, "server_bar_ex")
        self.assertEqual(exc.user, "olivia")

    def test_not_found(self) -> None:
        """404 is NotFound, naming the exchange."""
        exc = channel_error(404, "NOT_FOUND - no exchange 'bad_ex' in vhost '/'")
        self.assertIs(type(exc), NotFound)
        self.assertEqual(exc.object, "bad_ex")
        self.assertEqual(str(exc), "404 NOT_FOUND - no exchange 'bad_ex' in vhost '/'")

    def test_not_found_queue(self) -> None:
        """A 404 for a queue names the queue."""
        exc = channel_error(404, "NOT_FOUND - no queue 'q1' in vhost '/'")
        self.assertEqual(exc.object, "q1")

    def test_other(self) -> None:
        """Other codes are plain ChannelErrors with no object when none is named."""
        exc = channel_error(406, "PRECONDITION_FAILED - unknown delivery tag 1")
        self.assertIs(type(exc), ChannelError)
        self.assertEqual((exc.code, exc.object), (406, ""))


class HierarchyTests(SynchronousTestCase):
    """The shape of the error hierarchy."""

    def _public_error_classes(self) -> list[type[BaseException]]:
        return [value for name, value in vars(errors).items()
                if not name.startswith("_") and inspect.isclass(value)
                and issubclass(value, BaseException) and value.__module__ == errors.__name__]

    def test_all_subclass_callme_error(self) -> None:
        """Every public error class defined in txcallme.errors is a CallmeError."""
        classes = self._public_error_classes()
        self.assertGreater(len(classes), 10)
        for cls in classes:
            self.assertTrue(issubclass(cls, CallmeError), cls)

    def test_no_builtin_names_shadowed(self) -> None:
        """No error class reuses the name of a builtin."""
        for cls in self._public_error_classes():
            self.assertFalse(hasattr(builtins, cls.__name__), cls.__name__)


class StopIterationTests(SynchronousTestCase):
    """StopIteration is not rebuilt (raised through ``await`` it becomes RuntimeError)."""

    def test_not_in_allow_list(self) -> None:
        """StopIteration is not a built-in remote type."""
        self.assertNotIn("StopIteration", errors.BUILTIN_REMOTE_TYPES)

    def test_rebuilt_as_remote_error(self) -> None:
        """A remote StopIteration comes back as RemoteError naming it."""
        exc = RemoteErrorRegistry().rebuild("StopIteration", "", [], "")
        self.assertIs(type(exc), RemoteError)
        self.assertEqual(exc.type_name, "StopIteration")  # type: ignore[attr-defined]


class NewErrorTests(SynchronousTestCase):
    """Errors of the AMQP layer stay caught by the older except clauses."""

    def test_publish_nacked_is_channel_error(self) -> None:
        """PublishNacked is a ChannelError (old code caught nacks as ChannelError)."""
        self.assertTrue(issubclass(errors.PublishNacked, ChannelError))

    def test_publish_lost_is_connection_lost(self) -> None:
        """PublishLost is a BrokerConnectionLost and keeps its cause."""
        cause = errors.NotFound(404, "NOT_FOUND - no exchange 'x' in vhost '/'")
        lost = errors.PublishLost(cause)
        self.assertIsInstance(lost, errors.BrokerConnectionLost)
        self.assertIs(lost.cause, cause)

    def test_connect_timeout_is_unreachable(self) -> None:
        """ConnectTimeout is a BrokerUnreachable and a BrokerTimeout naming its phase."""
        error = errors.ConnectTimeout("h", 5672, "login", 10)
        self.assertIsInstance(error, errors.BrokerUnreachable)
        self.assertIsInstance(error, errors.BrokerTimeout)
        self.assertNotIsInstance(error, errors.AuthenticationError)
        self.assertIn("login", str(error))
        self.assertIn("h:5672", str(error))

    def test_encode_error_is_value_error(self) -> None:
        """EncodeError is a ValueError naming the operation."""
        error = errors.EncodeError("queue.declare", "too long")
        self.assertIsInstance(error, ValueError)
        self.assertIn("queue.declare", str(error))
