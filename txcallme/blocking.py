"""A blocking Proxy for code outside the reactor (callme's ``Proxy``, kept).

    from txcallme.blocking import Proxy
    proxy = Proxy(amqp_host="localhost")
    proxy.use_server("fooserver").add(1, 1)      # -> 2

Calls block the calling thread and return the result, or raise the remote
exception (rebuilt from the allow-list in :attr:`Proxy.errors`, as the async
Proxy does), :class:`~txcallme.errors.RpcTimeout`,
:class:`~txcallme.errors.ServerUnavailable` and the other txcallme errors.

The reactor runs in a background thread started by crochet
(``crochet.setup()``, once per process; if a reactor is already running,
``crochet.no_setup()`` and calls are handed to it). The asynchronous
:class:`txcallme.proxy.Proxy` behind this one is created and used only in the
reactor thread, so one blocking Proxy can be shared by any number of threads.
When the main thread ends, crochet stops the reactor; the connection is closed
first (bounded to a few seconds), so the interpreter exits without hanging.

Calling from the reactor thread itself would wait forever for work that
thread has to do, so it raises :class:`RuntimeError` at once instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import crochet
from twisted.internet.defer import Deferred
from twisted.python import threadable

from txcallme import _wire
from txcallme.amqp import ConnectionParams, TLSSettings
from txcallme.errors import ProxyClosed, RemoteErrorRegistry, RpcTimeout
from txcallme.proxy import Proxy as AsyncProxy
from txcallme.proxy import ServerProxy
from txcallme.serializers import JSON, Serializer

__all__ = ["Proxy", "ServerProxy"]  # ServerProxy: the same view as the async Proxy's

#: Seconds a caller waits beyond the call's own timeout before giving up on
#: the reactor thread (the call's timeout fires in the reactor; this margin
#: only matters when the reactor thread is stuck).
WAIT_MARGIN = 5.0

#: Seconds the connection gets to close when the interpreter exits.
SHUTDOWN_CLOSE_TIMEOUT = 3.0

_setup_lock = threading.Lock()


def _start_reactor() -> None:
    """Run the reactor in crochet's thread, or use the one already running."""
    with _setup_lock:
        if _reactor().running:
            try:
                crochet.no_setup()
            except RuntimeError:  # crochet.setup() already ran: its reactor
                pass
        else:
            crochet.setup()


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _check_thread() -> None:
    if threadable.isInIOThread():
        raise RuntimeError(
            "txcallme.blocking.Proxy was called from the reactor thread, where "
            "waiting for a reply would deadlock; use txcallme.Proxy (Deferreds) "
            "there, or call from another thread")


@crochet.run_in_reactor
def _in_reactor(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return function(*args, **kwargs)


def _wait(function: Callable[..., Any], wait_seconds: float, /, *args: Any,
          **kwargs: Any) -> Any:
    """Run *function* in the reactor thread and wait for its (Deferred) result.

    Raises crochet.TimeoutError (after cancelling) if nothing comes within
    *wait_seconds*, and ProxyClosed if the reactor has stopped.
    """
    _check_thread()
    try:
        result = _in_reactor(function, *args, **kwargs)
    except crochet.ReactorStopped:
        raise ProxyClosed("the reactor has stopped (interpreter exiting?)") from None
    try:
        return result.wait(wait_seconds)
    except crochet.TimeoutError:
        result.cancel()
        raise
    except crochet.ReactorStopped:
        raise ProxyClosed("the reactor stopped during the call") from None


class Proxy:
    """A blocking client for txcallme (and callme) servers.

    Takes the arguments of :class:`txcallme.proxy.Proxy` (but no reactor):
    ``timeout`` (seconds) is the default for every call; ``callme_compat=True``
    calls callme 0.2.0 servers, ``direct_reply_to=True`` takes replies through
    RabbitMQ's Direct Reply-to, ``max_body_size`` bounds replies. Connecting happens in
    the background: a broker that cannot be reached or refuses the login
    makes calls raise BrokerUnreachable or AuthenticationError.
    """

    def __init__(
        self,
        amqp_host: str | Sequence[str] = "localhost",
        amqp_port: int | None = None,
        amqp_user: str = "guest",
        amqp_password: str = "guest",
        amqp_vhost: str = "/",
        timeout: float = 60.0,
        *,
        amqp_url: str | None = None,
        ssl: bool | TLSSettings = False,
        params: ConnectionParams | None = None,
        serializer: Serializer = JSON,
        max_body_size: int = 64 * 1024 * 1024,
        direct_reply_to: bool = False,
        callme_compat: bool = False,
    ) -> None:
        _check_thread()
        _start_reactor()
        self.timeout = timeout
        self._closed = False
        self._lock = threading.Lock()
        # Reactor-thread state of the creation: set by _abandon if this thread
        # gave up waiting, so a creation that runs late closes what it made.
        self._abandoned = False
        self._created: AsyncProxy | None = None
        try:
            self._proxy: AsyncProxy = _wait(
                self._create, WAIT_MARGIN, amqp_host, amqp_port, amqp_user,
                amqp_password, amqp_vhost, timeout, amqp_url=amqp_url, ssl=ssl,
                params=params, serializer=serializer, max_body_size=max_body_size,
                direct_reply_to=direct_reply_to, callme_compat=callme_compat)
        except crochet.TimeoutError:
            # _create is queued (callFromThread, first in first out) before
            # _abandon, so _abandon sees whatever _create made and closes it.
            self._closed = True
            _reactor().callFromThread(self._abandon)
            raise ProxyClosed(
                f"the reactor thread did not create the proxy within {WAIT_MARGIN} s "
                "(is it blocked?); nothing was left open") from None

    def _abandon(self) -> None:
        """In the reactor thread: the constructor gave up; close what it asked for."""
        self._abandoned = True
        proxy, self._created = self._created, None
        if proxy is not None:
            _reactor().removeSystemEventTrigger(self._trigger)
            d = proxy.close()
            d.addTimeout(SHUTDOWN_CLOSE_TIMEOUT, _reactor())
            d.addErrback(lambda _: None)

    def _create(self, *args: Any, **kwargs: Any) -> AsyncProxy | None:
        if self._abandoned:  # the constructor gave up already
            return None
        reactor = _reactor()
        proxy = self._created = AsyncProxy(*args, reactor=reactor, **kwargs)

        def close_at_shutdown() -> Deferred[None]:
            d = proxy.close()
            d.addTimeout(SHUTDOWN_CLOSE_TIMEOUT, reactor)
            d.addErrback(lambda _: None)
            return d

        self._trigger = reactor.addSystemEventTrigger("before", "shutdown",
                                                      close_at_shutdown)
        return proxy

    # -- public API ------------------------------------------------------------

    @property
    def errors(self) -> RemoteErrorRegistry:
        """The allow-list of exception types rebuilt from the wire (shared with
        the async Proxy); ``proxy.errors.register(MyError)``."""
        return self._proxy.errors

    @property
    def params(self) -> ConnectionParams:
        """Where this proxy connects."""
        return self._proxy.params

    def use_server(self, server_id: str, timeout: float | None = None) -> ServerProxy:
        """A view of this proxy bound to *server_id* (and a default timeout)."""
        return ServerProxy(self, _wire.check_server_id(server_id), timeout)

    def call(self, server_id: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call *method* on *server_id* with the default timeout; return its result.

        Raises the remote exception (rebuilt, see :attr:`errors`), RpcTimeout,
        ServerUnavailable, AccessRefused, BrokerUnreachable,
        AuthenticationError, BrokerConnectionLost or ProxyClosed.
        """
        return self.invoke(server_id, method, args, kwargs)

    def invoke(self, server_id: str, method: str, args: Sequence[Any] = (),
               kwargs: dict[str, Any] | None = None, *,
               timeout: float | None = None) -> Any:
        """Like :meth:`call`, with arguments as values and a per-call timeout."""
        timeout = self.timeout if timeout is None else timeout
        if self._closed:
            raise ProxyClosed("the proxy is closed")
        try:
            return _wait(self._proxy.invoke, timeout + WAIT_MARGIN, server_id, method,
                         tuple(args), dict(kwargs or {}), timeout=timeout)
        except crochet.TimeoutError:
            raise RpcTimeout(server_id, method, timeout) from None

    def close(self) -> None:
        """Fail calls in flight with ProxyClosed and close the connection.

        Safe to call more than once, from any thread but the reactor's.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _wait(self._close, WAIT_MARGIN + SHUTDOWN_CLOSE_TIMEOUT)

    def _close(self) -> Deferred[None]:
        reactor = _reactor()
        reactor.removeSystemEventTrigger(self._trigger)
        d = self._proxy.close()
        d.addTimeout(SHUTDOWN_CLOSE_TIMEOUT, reactor)
        return d

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._proxy.params.describe()
        return f"<txcallme.blocking.Proxy {state}>"
