"""callme's permission design, proven with real broker users in a private vhost.

The module fixture creates vhost ``txcallme-perm-<random>`` and users with the
permission lines callme documents (user names substituted): ``carl`` serves
``fooserver``, ``bob`` serves ``barserver``, ``olivia`` may call only
``fooserver``; ``olga`` and ``oscar`` have the documents' broader grants; ``dora``
serves ``fooserver`` and ``drew`` calls it with README's Direct Reply-to grants.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from _brokerctl import RawClient, broker_objects, ctl, ctl_many, rand, request_body
from conftest import sleep
from twisted.internet import defer, reactor
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import provider

import txcallme
from txcallme import CallmeServerService, Proxy

FOO, BAR = "fooserver", "barserver"


@attrs.frozen
class User:
    name: str
    password: str


@attrs.frozen
class Env:
    vhost: str
    carl: User
    bob: User
    olivia: User
    olga: User
    oscar: User
    dora: User
    drew: User


def _readme_direct_reply_grants() -> dict[str, tuple[str, str, str]]:
    """README's Direct Reply-to permission lines, by user (``carl``, ``olivia``), as given."""
    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    section = readme.split("With ``Proxy(direct_reply_to=True)``", 1)[1].split("\n====", 1)[0]
    grants = {}
    for line in section.splitlines():
        if "rabbitmqctl set_permissions" in line:
            words = shlex.split(line)
            assert words[2:4] == ["-p", "VHOST"] and len(words) == 8, line
            grants[words[4]] = (words[5], words[6], words[7])
    assert sorted(grants) == ["carl", "olivia"], grants
    return grants


def _server_perms(server_id: str) -> tuple[str, str, str]:
    own = f"server_{server_id}_.*"
    return own, f"{own}|client_.*_ex_.*", own


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    """A private vhost and users with callme's documented permissions; removed at the end."""
    r = rand()
    vhost = f"txcallme-perm-{r}"
    users = {role: User(f"{role}_{r}", rand() + rand()) for role in
             ("carl", "bob", "olivia", "olga", "oscar", "dora", "drew")}
    u = {role: user.name for role, user in users.items()}
    direct = _readme_direct_reply_grants()
    perms = {
        "carl": _server_perms(FOO),
        "bob": _server_perms(BAR),
        "olivia": (f"client_{u['olivia']}_.*",
                   f"client_{u['olivia']}_.*|server_{FOO}_ex",
                   f"client_{u['olivia']}_.*"),
        "olga": (f"client_{u['olga']}.*",
                 f"client_{u['olga']}.*|server_{FOO}_ex|server_{BAR}_ex",
                 f"client_{u['olga']}.*"),
        "oscar": (f"client_{u['oscar']}.*", f"client_{u['oscar']}.*|server_.*_ex",
                  f"client_{u['oscar']}.*"),
        # README's Direct Reply-to grants: its carl serves fooserver, its olivia calls it
        "dora": direct["carl"],
        "drew": tuple(p.replace("olivia", u["drew"]) for p in direct["olivia"]),
    }
    leftovers: set[str] = set()
    try:
        ctl("add_vhost", vhost)
        ctl_many([("add_user", user.name, user.password) for user in users.values()])
        ctl_many([("set_permissions", "-p", vhost, u[role], *perms[role])
                  for role in users])
        yield Env(vhost, **users)
        for _ in range(6):  # auto-delete objects go away asynchronously
            leftovers = broker_objects(vhost)
            if not leftovers:
                break
            time.sleep(0.5)
    finally:
        ctl_many([("delete_user", user.name) for user in users.values()], check=False)
        ctl("delete_vhost", vhost, check=False)
    assert not leftovers, f"objects left in {vhost}: {sorted(leftovers)}"


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


async def slow(seconds: float, value: Any = None) -> Any:
    await sleep(seconds)
    return value


class Running:
    """Servers and Proxies of one test, all stopped/closed by :meth:`cleanup`."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.servers: list[CallmeServerService] = []
        self.proxies: list[Proxy] = []
        self.raw: list[RawClient] = []

    def service(self, server_id: str, user: User) -> CallmeServerService:
        svc = CallmeServerService(server_id, amqp_host="127.0.0.1", amqp_user=user.name,
                                  amqp_password=user.password, amqp_vhost=self.env.vhost,
                                  reactor=reactor)
        for func in (add, fail, slow):
            svc.register_function(func)
        self.servers.append(svc)
        svc.startService()
        return svc

    async def server(self, server_id: str, user: User) -> CallmeServerService:
        svc = self.service(server_id, user)
        await svc.when_ready().addTimeout(10, reactor)
        return svc

    async def proxy(self, user: User, **kw: Any) -> Proxy:
        kw.setdefault("timeout", 5)
        proxy = Proxy(amqp_host="127.0.0.1", amqp_user=user.name, amqp_password=user.password,
                      amqp_vhost=self.env.vhost, reactor=reactor, **kw)
        self.proxies.append(proxy)
        await proxy.when_ready().addTimeout(10, reactor)
        return proxy

    async def raw_client(self, user: User) -> RawClient:
        client = RawClient(user.name, user.password, self.env.vhost)
        self.raw.append(client)
        return await client.open(reply_queue=False)

    async def cleanup(self) -> None:
        await sleep(0)
        for client in self.raw:
            await client.close()
        for proxy in self.proxies:
            await proxy.close()
        for svc in self.servers:
            if svc.running:
                await svc.stopService()
        # if a test's own stopService() failed half-way (a library bug), still stop
        # reconnecting so nothing outlives the test
        for owner in [*self.proxies, *self.servers]:
            session = owner._session
            service = getattr(session, "_service", session)  # ClientService or own loop
            if getattr(service, "running", False):
                await session.stop()
        # wait for the broker to drop the auto-delete server queues, so the next
        # test's server of the same id declares fresh ones
        await sleep(0.2)


@pytest_twisted.async_yield_fixture
async def running(env: Env) -> Any:
    """A :class:`Running` for this test; everything is stopped at teardown."""
    helper = Running(env)
    try:
        yield helper
    finally:
        await helper.cleanup()


async def _elapsed(d: defer.Deferred[Any]) -> tuple[float, Any]:
    """Await *d*; return (seconds taken, result or exception)."""
    start = time.monotonic()
    try:
        outcome: Any = await d
    except Exception as e:
        outcome = e
    return time.monotonic() - start, outcome


@pytest_twisted.ensureDeferred
async def test_carl_serves_olivia(running: Running, env: Env) -> None:
    """Under the documented grants, olivia's calls to carl's fooserver behave as for guest."""
    await running.server(FOO, env.carl)
    proxy = await running.proxy(env.olivia)
    assert proxy.exchange.startswith(f"client_{env.olivia.name}_ex_")
    assert await proxy.call(FOO, "add", 1, 2) == 3
    assert await proxy.use_server(FOO).add(a="x", b="y") == "xy"
    with pytest.raises(ValueError, match="no good"):
        await proxy.call(FOO, "fail", "no good")
    with pytest.raises(txcallme.RpcTimeout):
        await proxy.invoke(FOO, "slow", [2.0], timeout=0.5)
    assert await proxy.call(FOO, "slow", 0.01, "done") == "done"
    assert proxy.pending_count == 0


@pytest_twisted.ensureDeferred
async def test_olivia_cannot_call_barserver(running: Running, env: Env) -> None:
    """olivia's call to barserver fails fast with AccessRefused; her fooserver calls go on."""
    await running.server(FOO, env.carl)
    await running.server(BAR, env.bob)
    proxy = await running.proxy(env.olivia)
    in_flight = [proxy.call(FOO, "slow", 0.3, i) for i in range(10)]
    taken, error = await _elapsed(proxy.call(BAR, "add", 1, 2))
    assert isinstance(error, txcallme.AccessRefused), repr(error)
    assert taken < 2.0
    assert error.code == 403
    assert error.object == "server_barserver_ex"
    assert error.user == env.olivia.name
    assert "server_barserver_ex" in str(error) and env.olivia.name in str(error)
    assert await defer.gatherResults(in_flight) == list(range(10))
    # the refusal is per destination: the Proxy keeps working for fooserver
    assert await proxy.call(FOO, "add", 2, 2) == 4
    again = [proxy.call(BAR, "add", 1, 1), proxy.call(FOO, "add", 3, 3)]
    results = await defer.DeferredList(again, consumeErrors=True)
    assert not results[0][0] and results[0][1].check(txcallme.AccessRefused)
    assert results[1] == (True, 6)
    assert proxy.pending_count == 0


def _connections(user: User) -> list[str]:
    """The broker's open connections of *user* (their states)."""
    out = ctl("list_connections", "user", "state")
    return [line.split("\t")[1] for line in out.splitlines()
            if line.split("\t")[0] == user.name]


@pytest_twisted.ensureDeferred
async def test_carl_cannot_start_barserver(running: Running, env: Env) -> None:
    """carl's barserver fails to start with DeclarationRefused 403 naming the object, the
    user and the permission line to grant, not a hang, and stops."""
    svc = running.service(BAR, env.carl)
    taken, error = await _elapsed(svc.when_ready().addTimeout(8, reactor))
    assert isinstance(error, txcallme.errors.DeclarationRefused), repr(error)
    assert taken < 5.0
    assert error.code == 403
    assert "server_barserver_" in error.text and env.carl.name in error.text
    assert f"rabbitmqctl set_permissions -p {env.vhost} {env.carl.name}" in error.hint
    # stopping right after the failure, as a caller's except clause would
    await svc.stopService().addTimeout(5, reactor)
    assert not svc.running


@pytest_twisted.ensureDeferred
async def test_refused_start_leaks_no_connection(running: Running, env: Env) -> None:
    """A server refused at start does not retry, and stopService leaves no connection."""
    svc = running.service(BAR, env.carl)
    with pytest.raises(txcallme.errors.DeclarationRefused):
        await svc.when_ready().addTimeout(8, reactor)
    await sleep(2.0)  # a retry loop would have reconnected by now
    await sleep(0)
    await svc.stopService().addTimeout(5, reactor)
    await sleep(1.0)
    assert _connections(env.carl) == []


@pytest_twisted.ensureDeferred
async def test_broader_grants(running: Running, env: Env) -> None:
    """olga's and oscar's broader documented grants reach both servers; olivia's does not."""
    await running.server(FOO, env.carl)
    await running.server(BAR, env.bob)
    for user in (env.olga, env.oscar):
        proxy = await running.proxy(user)
        assert await proxy.call(FOO, "add", 1, 1) == 2
        assert await proxy.call(BAR, "add", 2, 2) == 4
    olivia = await running.proxy(env.olivia)
    with pytest.raises(txcallme.AccessRefused):
        await olivia.call(BAR, "add", 1, 1)
    assert await olivia.call(FOO, "add", 5, 5) == 10


@pytest.mark.parametrize("reply_to", ["server_barserver_ex", "client_nobody_ex_x"])
@pytest_twisted.ensureDeferred
async def test_hostile_reply_to(running: Running, env: Env, reply_to: str) -> None:
    """A request whose reply_to carl may not write (or is missing) gets no reply and
    costs other clients nothing: their replies are re-published and served."""
    svc = await running.server(FOO, env.carl)
    proxy = await running.proxy(env.olivia)
    hostile = await running.raw_client(env.olivia)
    props = {"reply_to": reply_to, "correlation_id": "evil",
             "content_type": "application/json"}
    first = [proxy.call(FOO, "add", i, 1) for i in range(10)]
    await sleep(0)
    for _ in range(3):
        hostile.send(FOO, request_body("add", 1, 2), **props)
    second = [proxy.call(FOO, "add", i, 1) for i in range(10, 20)]
    results = await defer.gatherResults(first + second)
    assert results == [i + 1 for i in range(20)]
    await sleep(0.5)
    assert svc.running
    assert await hostile.message_count("server_fooserver_queue") == 0  # acked, not looping
    assert await proxy.call(FOO, "add", 100, 1) == 101
    other = await running.proxy(env.olga)
    assert await other.call(FOO, "add", 7, 1) == 8


class Warnings:
    """Formatted text of the log events containing *text*, while installed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines: list[str] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            line = formatEvent(event) or ""
            if text in line:
                self.lines.append(line)

        self.observer = observe

    def __enter__(self) -> Warnings:
        globalLogPublisher.addObserver(self.observer)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self.observer)


@pytest_twisted.ensureDeferred
async def test_direct_reply_to_with_readme_grants(running: Running, env: Env) -> None:
    """README's Direct Reply-to lines work together: dora (server, write includes
    ``amq.default``) answers drew (no configure, no read) through Direct Reply-to."""
    await running.server(FOO, env.dora)
    proxy = await running.proxy(env.drew, direct_reply_to=True)
    assert (proxy.exchange, proxy.queue) == ("", "")
    with Warnings("may not reply") as warnings:
        assert await proxy.call(FOO, "add", 1, 2) == 3
        results = await defer.gatherResults([proxy.call(FOO, "add", i, 1) for i in range(10)])
        assert results == [i + 1 for i in range(10)]
        with pytest.raises(ValueError, match="no good"):
            await proxy.call(FOO, "fail", "no good")
    assert warnings.lines == []
    assert proxy.pending_count == 0


@pytest_twisted.ensureDeferred
async def test_direct_reply_to_needs_amq_default(running: Running, env: Env) -> None:
    """carl's grant (README's server line, no ``amq.default``) cannot answer a Direct
    Reply-to caller: the call times out, carl logs "may not reply" once (the request is
    acked, not redelivered), and carl goes on answering a reply-exchange Proxy."""
    svc = await running.server(FOO, env.carl)
    direct = await running.proxy(env.drew, direct_reply_to=True)
    normal = await running.proxy(env.olivia)
    with Warnings("may not reply") as warnings:
        taken, error = await _elapsed(direct.invoke(FOO, "add", [1, 2], timeout=3))
        assert isinstance(error, txcallme.RpcTimeout), repr(error)
        assert 2.9 <= taken < 10, taken
        for _ in range(50):
            if warnings.lines:
                break
            await sleep(0.1)
        await sleep(1.0)  # a redelivered request would log again
    assert len(warnings.lines) == 1, warnings.lines
    assert "may not reply to 'amq.rabbitmq.reply-to." in warnings.lines[0]
    assert "403" in warnings.lines[0], warnings.lines[0]
    assert svc.running
    assert await normal.call(FOO, "add", 2, 3) == 5
    results = await defer.gatherResults([normal.call(FOO, "add", i, 1) for i in range(10)])
    assert results == [i + 1 for i in range(10)]
    assert normal.pending_count == direct.pending_count == 0
