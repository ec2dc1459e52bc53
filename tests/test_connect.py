"""Integration tests: connecting to the broker, and the errors when it cannot be done."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from conftest import BROKER_HOST, Services, new_server_id, sleep
from twisted.logger import globalLogPublisher

import txcallme


def add(a: int, b: int) -> int:
    return a + b


@pytest_twisted.ensureDeferred
async def test_proxy_wrong_password(services: Services) -> None:
    """A Proxy with a wrong password fails fast with AuthenticationError naming user and vhost."""
    proxy = services.proxy(amqp_password="not-the-password")
    start = time.monotonic()
    with pytest.raises(txcallme.AuthenticationError) as info:
        await proxy.when_ready()
    assert time.monotonic() - start < 5
    assert info.value.user == "guest" and info.value.vhost == "/"
    assert "'guest'" in str(info.value) and "'/'" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_proxy_call_wrong_password(services: Services) -> None:
    """A call through a Proxy with a wrong password fails with AuthenticationError."""
    proxy = services.proxy(amqp_password="not-the-password")
    start = time.monotonic()
    with pytest.raises(txcallme.AuthenticationError):
        await proxy.call(new_server_id(), "add", 1, 1)
    assert time.monotonic() - start < 5
    assert proxy.pending_count == 0


@pytest_twisted.ensureDeferred
async def test_server_wrong_password(services: Services) -> None:
    """A server with a wrong password fails when_ready with AuthenticationError."""
    svc = services.server(new_server_id(), {"add": add}, amqp_password="not-the-password")
    start = time.monotonic()
    with pytest.raises(txcallme.AuthenticationError) as info:
        await svc.when_ready()
    assert time.monotonic() - start < 5
    assert info.value.user == "guest" and info.value.vhost == "/"


@pytest_twisted.ensureDeferred
async def test_missing_vhost(services: Services) -> None:
    """A vhost that does not exist fails with AuthenticationError naming the vhost."""
    vhost = f"no-such-vhost-{new_server_id()}"
    proxy = services.proxy(amqp_vhost=vhost)
    with pytest.raises(txcallme.AuthenticationError, match=vhost) as info:
        await proxy.when_ready()
    assert info.value.vhost == vhost
    svc = services.server(new_server_id(), {"add": add}, amqp_vhost=vhost)
    with pytest.raises(txcallme.AuthenticationError, match=vhost):
        await svc.when_ready()


@pytest_twisted.ensureDeferred
async def test_unreachable_broker(services: Services) -> None:
    """A closed port fails with BrokerUnreachable naming host and port, also for calls."""
    proxy = services.proxy(amqp_port=1, timeout=5)
    start = time.monotonic()
    with pytest.raises(txcallme.BrokerUnreachable) as info:
        await proxy.when_ready()
    assert info.value.host == BROKER_HOST and info.value.port == 1
    assert f"{BROKER_HOST}:1" in str(info.value)

    caller = services.proxy(amqp_port=1, timeout=5)
    with pytest.raises(txcallme.BrokerUnreachable, match=f"{BROKER_HOST}:1"):
        await caller.call(new_server_id(), "add", 1, 1)
    assert caller.pending_count == 0
    assert time.monotonic() - start < 5

    svc = services.server(new_server_id(), {"add": add}, amqp_port=1)
    with pytest.raises(txcallme.BrokerUnreachable, match=f"{BROKER_HOST}:1"):
        await svc.when_ready()


@pytest_twisted.ensureDeferred
async def test_amqp_url(services: Services) -> None:
    """amqp_url='amqp://guest:guest@127.0.0.1:5672/%2F' works for Proxy and server."""
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"
    sid = new_server_id()
    svc = services.server(sid, {"add": add}, amqp_url=url)
    assert svc.params.vhost == "/"
    await svc.when_ready()
    proxy = services.proxy(amqp_url=url)
    assert proxy.params.vhost == "/" and proxy.params.hosts == (("127.0.0.1", 5672),)
    assert await proxy.call(sid, "add", 20, 22) == 42


@pytest.mark.parametrize(
    "options, error",
    [
        ({"amqp_password": "not-the-password"}, txcallme.AuthenticationError),
        ({"amqp_port": 1}, txcallme.BrokerUnreachable),
    ],
    ids=["wrong-password", "unreachable"],
)
@pytest_twisted.ensureDeferred
async def test_proxy_close_as_soon_as_connecting_fails(
        services: Services, options: dict[str, object], error: type[Exception]) -> None:
    """Proxy.close() called straight from a failed when_ready() closes cleanly."""
    proxy = services.proxy(**options)
    try:
        await proxy.when_ready()
    except error:
        await proxy.close()  # no reactor turn in between: the natural way to give up
    else:
        pytest.fail("when_ready() should have failed")


@pytest.mark.parametrize(
    "options, error",
    [
        ({"amqp_password": "not-the-password"}, txcallme.AuthenticationError),
        ({"amqp_port": 1}, txcallme.BrokerUnreachable),
    ],
    ids=["wrong-password", "unreachable"],
)
@pytest_twisted.ensureDeferred
async def test_server_stop_as_soon_as_connecting_fails(
        services: Services, options: dict[str, object], error: type[Exception]) -> None:
    """stopService() called straight from a failed when_ready() stops cleanly."""
    svc = services.server(new_server_id(), {"add": add}, **options)
    try:
        await svc.when_ready()
    except error:
        await svc.stopService()  # no reactor turn in between
    else:
        pytest.fail("when_ready() should have failed")


@pytest_twisted.ensureDeferred
async def test_refused_login_logs_no_unhandled_error(services: Services) -> None:
    """A refused login is reported once as AuthenticationError, with no unhandled error logged."""
    failures: list[object] = []

    def observer(event: dict[str, object]) -> None:
        failure = event.get("log_failure") or event.get("failure")  # new or legacy API
        if failure is not None:
            failures.append(failure)

    globalLogPublisher.addObserver(observer)
    try:
        proxy = services.proxy(amqp_password="not-the-password")
        with pytest.raises(txcallme.AuthenticationError):
            await proxy.when_ready()
        await sleep(0.3)  # let the broker's close reach the connection
    finally:
        globalLogPublisher.removeObserver(observer)
    assert failures == []
