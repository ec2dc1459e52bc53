"""Shared fixtures for the integration tests against the local RabbitMQ.

The broker must answer on 127.0.0.1:5672 with guest/guest on vhost "/"; the
session stops at once (exit code 3) if it does not. Every server and Proxy a
test starts through :func:`services` is stopped or closed at teardown, and the
end of the session checks that no ``server_t-...`` / ``client_guest_...``
queue or exchange made by these tests is left on the broker.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from txcallme import CallmeServerService, Proxy, connection_params
from txcallme.amqp import session as _amqp

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
LEAK_PREFIXES = ("server_t-", "client_guest_")

#: Every server id and Proxy queue/exchange name made in this session.
_created_names: set[str] = set()


def new_server_id() -> str:
    """A server id no other test (or run) uses; recorded for the leak check."""
    server_id = f"t-{uuid4().hex[:8]}"
    _created_names.add(f"server_{server_id}_ex")
    _created_names.add(f"server_{server_id}_queue")
    return server_id


def track_proxy(proxy: Proxy) -> Proxy:
    """Record every queue and exchange name a Proxy uses for the leak check
    (it picks new ones for each connection and each re-created reply queue)."""
    _created_names.add(proxy.exchange)
    _created_names.add(proxy.queue)
    proxy.on_reply_names.append(lambda exchange, queue: _created_names.update((exchange, queue)))
    return proxy


def sleep(seconds: float) -> Any:
    """A Deferred that fires after *seconds* on the global reactor."""
    return task.deferLater(reactor, seconds, lambda: None)


def broker_connect() -> Any:
    """A plain (non-reconnecting) txcallme connection to the test broker."""
    return _amqp.connect(reactor, connection_params(BROKER_HOST, BROKER_PORT))


def _broker_objects() -> set[str]:
    names: set[str] = set()
    for what in ("list_queues", "list_exchanges"):
        out = subprocess.run(
            ["rabbitmqctl", what, "-q", "-p", "/", "name"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        names.update(line.strip() for line in out.splitlines())
    return {name for name in names if name.startswith(LEAK_PREFIXES)}


@pytest.fixture(scope="session", autouse=True)
def broker_reachable() -> None:
    """Stop the whole session (not skip) when the broker is not there."""
    try:
        with socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=5):
            pass
    except OSError:
        pytest.exit(
            "RabbitMQ is not reachable at 127.0.0.1:5672: run scripts/ensure-rabbitmq "
            "(or `make test`)",
            returncode=3,
        )


@pytest.fixture(scope="session", autouse=True)
def no_leftover_broker_objects(broker_reachable: None) -> Any:
    """Fail the session if queues/exchanges made by these tests outlive it."""
    before = _broker_objects()
    yield
    leftovers: set[str] = set()
    for _ in range(5):  # the broker deletes auto-delete objects asynchronously
        leftovers = (_broker_objects() - before) & _created_names
        if not leftovers:
            return
        time.sleep(0.5)
    pytest.fail(f"tests left these objects on the broker: {sorted(leftovers)}")


class Services:
    """Starts servers and Proxies for one test and cleans them all up."""

    def __init__(self) -> None:
        self.servers: list[CallmeServerService] = []
        self.proxies: list[Proxy] = []

    def server(self, server_id: str, funcs: dict[str, Callable[..., Any]] | None = None,
               **kw: Any) -> CallmeServerService:
        """A started (not necessarily ready) server, stopped at teardown."""
        kw.setdefault("amqp_host", BROKER_HOST)
        svc = CallmeServerService(server_id, **kw)
        for name, func in (funcs or {}).items():
            svc.register_function(func, name=name)
        svc.startService()
        self.servers.append(svc)
        return svc

    async def start_server(self, server_id: str,
                           funcs: dict[str, Callable[..., Any]] | None = None,
                           **kw: Any) -> CallmeServerService:
        """A server that is consuming requests."""
        svc = self.server(server_id, funcs, **kw)
        await svc.when_ready()
        return svc

    def proxy(self, **kw: Any) -> Proxy:
        """A Proxy (timeout 5 s unless given), closed at teardown."""
        kw.setdefault("timeout", 5)
        if "amqp_url" not in kw:
            kw.setdefault("amqp_host", BROKER_HOST)
        proxy = track_proxy(Proxy(**kw))
        self.proxies.append(proxy)
        return proxy

    async def ready_proxy(self, **kw: Any) -> Proxy:
        """A Proxy that is connected and consuming replies."""
        proxy = self.proxy(**kw)
        await proxy.when_ready()
        return proxy

    async def cleanup(self) -> None:
        # Start from a fresh reactor turn: pytest-twisted may run teardown while a
        # test's last callback (e.g. a failing when_ready()) is still on the stack.
        await sleep(0)
        for proxy in self.proxies:
            await proxy.close()
        for svc in self.servers:
            if svc.running:
                await svc.stopService()
        # close()/stopService() must have stopped reconnecting: nothing may
        # outlive the test.
        for owner in [*self.proxies, *self.servers]:
            assert not owner._session.running, f"{owner!r} still reconnecting"


@pytest_twisted.async_yield_fixture
async def services() -> Any:
    """A :class:`Services` helper; everything it started is closed at teardown."""
    helper = Services()
    try:
        yield helper
    finally:
        await helper.cleanup()


@pytest.fixture
def sid() -> str:
    """A fresh server id for this test."""
    return new_server_id()
