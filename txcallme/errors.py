"""One error hierarchy for txcallme.

Every failure a caller can see is a :class:`CallmeError`, except exceptions
raised by a remote handler whose type is allowed to be rebuilt locally (see
:data:`BUILTIN_REMOTE_TYPES` and :meth:`RemoteErrorRegistry.register`).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterable
from typing import Any


class CallmeError(Exception):
    """The root of every txcallme error."""


# --- connecting -------------------------------------------------------------


class BrokerUnreachable(CallmeError):
    """The broker's address could not be reached (refused, timed out, DNS)."""

    def __init__(self, host: str, port: int, reason: str = "") -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(
            f"cannot reach the AMQP broker at {host}:{port}" + (f": {reason}" if reason else "")
        )


class AuthenticationError(CallmeError):
    """The broker refused the credentials (or the vhost) at connection time."""

    def __init__(self, user: str, vhost: str, reason: str = "") -> None:
        self.user = user
        self.vhost = vhost
        self.reason = reason
        super().__init__(
            f"the broker refused login for user {user!r} on vhost {vhost!r}"
            + (f": {reason}" if reason else "")
        )


class BrokerConnectionLost(CallmeError):
    """The connection to the broker dropped while a call was in flight."""


class TLSError(CallmeError):
    """The TLS handshake with the broker failed (certificate, hostname, protocol)."""


class BrokerTimeout(CallmeError):
    """The broker did not answer in time (a connection phase or a control operation)."""


class ConnectTimeout(BrokerTimeout, BrokerUnreachable):
    """Connecting took longer than ``connect_timeout``; :attr:`phase` says where it stopped.

    A :class:`BrokerUnreachable` too, so code (and the CLI exit code) that treats an
    unreachable broker keeps working.

    :ivar phase: ``"tcp"``, ``"amqp header"``, ``"login"`` (after connection.start)
        or ``"vhost open"``
    """

    def __init__(self, host: str, port: int, phase: str, timeout: float) -> None:
        self.phase = phase
        self.timeout = timeout
        BrokerUnreachable.__init__(
            self, host, port, f"no answer within {timeout:g} s during the {phase} phase")


class OperationTimeout(BrokerTimeout):
    """A control operation (channel open, declare, bind, qos, consume, cancel, close)
    got no answer within the connection's ``control_timeout``.

    :ivar operation: the AMQP method, e.g. ``"queue.declare"``
    :ivar timeout: the seconds waited
    """

    def __init__(self, operation: str, timeout: float, detail: str = "") -> None:
        self.operation = operation
        self.timeout = timeout
        super().__init__(f"{operation} got no answer from the broker within {timeout:g} s"
                         + (f" ({detail})" if detail else ""))


class EncodeError(CallmeError, ValueError):
    """An operation's arguments cannot be carried by AMQP (e.g. a name over 255 bytes).

    Only that operation fails; the connection and later operations are unaffected.

    :ivar operation: the AMQP method, e.g. ``"queue.declare"``
    """

    def __init__(self, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"cannot send {operation}: {reason}")


# --- calling ----------------------------------------------------------------


class RpcTimeout(CallmeError):
    """No reply came within the call's timeout."""

    def __init__(self, server_id: str, method: str, timeout: float) -> None:
        self.server_id = server_id
        self.method = method
        self.timeout = timeout
        super().__init__(f"call {server_id}.{method} got no reply within {timeout:g} s")


class ServerUnavailable(CallmeError):
    """No server is consuming requests for this server id (nothing to route to)."""

    def __init__(self, server_id: str, reason: str = "") -> None:
        self.server_id = server_id
        self.reason = reason
        super().__init__(
            f"no server is serving {server_id!r}" + (f" ({reason})" if reason else "")
        )


class ChannelError(CallmeError):
    """The broker refused an operation and closed the channel it was on.

    :ivar code: the AMQP reply code (403, 404, 405, 406, ...)
    :ivar text: the broker's reply text
    :ivar object: the exchange or queue the broker named, if any
    """

    def __init__(self, code: int, text: str) -> None:
        self.code = code
        self.text = text
        found = re.search(r"(?:exchange|queue) '([^']*)'", text)
        self.object = found.group(1) if found else ""
        super().__init__(f"{code} {text}")


class AccessRefused(ChannelError):
    """The broker's permissions refused an operation (AMQP 403).

    :ivar user: the user the broker named, if any
    """

    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        found = re.search(r"for user '([^']*)'", text)
        self.user = found.group(1) if found else ""


class NotFound(ChannelError):
    """The exchange or queue does not exist (AMQP 404)."""


class Unroutable(CallmeError):
    """A mandatory message reached an exchange with no queue bound (AMQP 312)."""

    def __init__(self, exchange: str, routing_key: str, text: str = "NO_ROUTE") -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        super().__init__(f"{text}: nothing bound to {exchange!r} with key {routing_key!r}")


class PublishNacked(ChannelError):
    """The broker nacked a confirmed publish (it could not take the message)."""

    def __init__(self, text: str = "broker nacked the message") -> None:
        super().__init__(0, text)


class PublishLost(BrokerConnectionLost):
    """A confirmed publish's channel or connection died before the broker confirmed it:
    the message may or may not have been taken.

    :ivar cause: the channel's or connection's error
    """

    def __init__(self, cause: CallmeError | None = None, text: str = "") -> None:
        self.cause = cause
        super().__init__(text or f"publish not confirmed before its channel closed: {cause}")


def channel_error(code: int, text: str) -> ChannelError:
    """The :class:`ChannelError` subclass for a broker reply code."""
    if code == 403:
        return AccessRefused(code, text)
    if code == 404:
        return NotFound(code, text)
    return ChannelError(code, text)


class ProxyClosed(CallmeError):
    """The Proxy was closed; no more calls can be made with it."""


# --- serving / wire ---------------------------------------------------------


class SerializationError(CallmeError):
    """A value could not be encoded or decoded by the serializer."""


class InvalidRequest(CallmeError):
    """A request on the wire was malformed (shape, content type, size)."""


class PayloadTooLarge(InvalidRequest):
    """A message body is over the configured size limit."""


class UnknownMethod(CallmeError):
    """The server has no function registered under the called name."""


class ServiceError(CallmeError):
    """Starting a server failed (e.g. the broker refused its queue)."""


class RemoteError(CallmeError):
    """A remote handler raised an exception whose type is not rebuilt locally.

    :ivar type_name: the remote exception's qualified type name
    :ivar message: ``str()`` of the remote exception
    :ivar remote_args: the remote exception's ``args`` (JSON-safe)
    :ivar remote_traceback: the formatted remote traceback text
    """

    def __init__(
        self,
        type_name: str,
        message: str,
        remote_args: Iterable[Any] = (),
        remote_traceback: str = "",
    ) -> None:
        self.type_name = type_name
        self.message = message
        self.remote_args = tuple(remote_args)
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}")


#: Built-in exception types rebuilt as themselves when raised remotely.
BUILTIN_REMOTE_TYPES: dict[str, type[BaseException]] = {
    name: getattr(builtins, name)
    for name in (
        "ArithmeticError AssertionError AttributeError EOFError FloatingPointError "
        "IndexError KeyError LookupError MemoryError NameError NotImplementedError "
        "OSError OverflowError RecursionError RuntimeError TimeoutError "
        "TypeError UnicodeError ValueError ZeroDivisionError PermissionError "
        "FileNotFoundError FileExistsError ConnectionError Exception"
    ).split()
}


def _default_own_types() -> tuple[type[BaseException], ...]:
    """txcallme's own types a Proxy rebuilds by default (some are defined below)."""
    return (UnknownMethod, SerializationError, InvalidRequest, PayloadTooLarge,
            ServiceError, DeclarationRefused, DeliveryLimitReached)


class RemoteErrorRegistry:
    """The allow-list of exception types a Proxy rebuilds from the wire.

    Types are looked up by the name the server sends; nothing named by the wire
    is ever imported.
    """

    def __init__(self) -> None:
        self._types: dict[str, type[BaseException]] = dict(BUILTIN_REMOTE_TYPES)
        for own in _default_own_types():
            self._types[qualified_name(own)] = own

    def register(self, exc_type: type[BaseException], name: str | None = None) -> None:
        """Allow *exc_type* to be rebuilt when a server raises it.

        *name* defaults to ``module.QualName`` as the server reports it.
        """
        if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
            raise TypeError(f"{exc_type!r} is not an exception type")
        self._types[name or qualified_name(exc_type)] = exc_type

    def rebuild(
        self, type_name: str, message: str, args: Iterable[Any], traceback: str
    ) -> BaseException:
        """The local exception for a remote error description."""
        exc_type = self._types.get(type_name)
        if exc_type is not None:
            try:
                exc = exc_type(*args)
            except Exception:
                exc = None
            if exc is not None:
                exc.remote_traceback = traceback  # type: ignore[attr-defined]
                exc.remote_type = type_name  # type: ignore[attr-defined]
                if traceback and hasattr(exc, "add_note"):  # Python 3.11+
                    exc.add_note("Remote traceback:\n" + traceback.rstrip())
                return exc
        return RemoteError(type_name, message, args, traceback)


def qualified_name(exc_type: type) -> str:
    """The name an exception type travels under: bare for builtins, else module.qualname."""
    if exc_type.__module__ == "builtins":
        return exc_type.__qualname__
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


# --- appended by the server owner -----------------------------------------------


class DeclarationRefused(ServiceError):
    """The broker refused a server's declaration (541, 406, 403, 405) at start-up.

    :ivar code: the AMQP reply code; :ivar text: the broker's reply text;
    :ivar hint: what to do about it (an option, a permission line, a migration)
    """

    def __init__(self, server_id: str, code: int, text: str, hint: str) -> None:
        self.server_id = server_id
        self.code = code
        self.text = text
        self.hint = hint
        super().__init__(server_id, code, text, hint)  # args rebuild it remotely

    def __str__(self) -> str:
        return (f"the broker refused the declarations of server {self.server_id!r}: "
                f"{self.code} {self.text}. {self.hint}")


class DeliveryLimitReached(ServiceError):
    """A request was delivered so often without an answer (it keeps crashing
    servers) that the server refuses to run it again."""


# --- appended by the observability owner -------------------------------------------


class RequestExpired(CallmeError):
    """A server picked up a request after its caller's deadline and did not run it
    (recorded on the server's span; the caller sees its own RpcTimeout)."""
