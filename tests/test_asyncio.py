"""txcallme from ``async def`` code on Twisted's asyncio reactor (real broker).

The test session runs the default reactor, so each case is a script run with
its own interpreter: it installs ``asyncioreactor``, runs a server and a Proxy
on one asyncio loop and awaits Deferreds through ``Deferred.asFuture``. It
prints ``PROXY <exchange> <queue>`` (added to the session's leak check) and a
final marker line that the test checks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import conftest
from conftest import new_server_id

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60

#: Shared start of both scripts: asyncio reactor, a server with add/div/slow_add
#: and a ``run(main)`` that drives an ``async def main(loop, service, proxy)``.
PRELUDE = """\
import asyncio
import sys

from twisted.internet import asyncioreactor

LOOP = asyncio.new_event_loop()
asyncioreactor.install(LOOP)

from twisted.internet import reactor, task  # noqa: E402

from txcallme import CallmeServerService, Proxy  # noqa: E402

SERVER_ID = sys.argv[1]


async def slow_add(a, b, delay=0.2):
    await task.deferLater(reactor, delay, lambda: None)
    return a + b


#: more functions a script serves (appended before run(main))
EXTRA_FUNCTIONS = []


async def setup_and_run(main):
    loop = asyncio.get_running_loop()
    # a stop gives up on calls that never return (a failing run) after 5 s
    service = CallmeServerService(SERVER_ID, amqp_host="127.0.0.1", stop_timeout=5)
    service.register_function(lambda a, b: a + b, "add")
    service.register_function(lambda a, b: a / b, "div")
    service.register_function(slow_add)
    for function in EXTRA_FUNCTIONS:
        service.register_function(function)
    service.startService()
    proxy = Proxy(amqp_host="127.0.0.1", timeout=5)
    print("PROXY", proxy.exchange, proxy.queue, flush=True)
    try:
        await service.when_ready().asFuture(loop)
        await main(loop, proxy)
    finally:
        await proxy.close().asFuture(loop)
        await service.stopService().asFuture(loop)
    assert proxy.pending_count == 0


def run(main):
    task_ = LOOP.create_task(setup_and_run(main))
    task_.add_done_callback(lambda _: reactor.stop())
    reactor.run()
    task_.result()
"""

CALLS = PRELUDE + """
from txcallme import RpcTimeout  # noqa: E402


async def main(loop, proxy):
    assert type(reactor).__name__ == "AsyncioSelectorReactor", reactor
    server = proxy.use_server(SERVER_ID)
    assert await server.add(1, 1).asFuture(loop) == 2
    try:
        await server.div(1, 0).asFuture(loop)
    except ZeroDivisionError as e:
        assert "ZeroDivisionError" in e.remote_traceback, e.remote_traceback
    else:
        raise AssertionError("no ZeroDivisionError")
    try:
        await proxy.use_server(SERVER_ID, timeout=0.3).slow_add(1, 2, delay=1).asFuture(loop)
    except RpcTimeout:
        pass
    else:
        raise AssertionError("no RpcTimeout")
    # Cancelling the future (asyncio's own timeout) cancels the call.
    try:
        await asyncio.wait_for(server.slow_add(1, 2, delay=1).asFuture(loop), 0.2)
    except asyncio.TimeoutError:
        pass
    else:
        raise AssertionError("wait_for did not time out")
    assert proxy.pending_count == 0, proxy.pending_count
    assert await server.slow_add(2, 3, delay=0.1).asFuture(loop) == 5
    print("ASYNCIO-CALLS-OK", flush=True)


run(main)
"""

AIOHTTP = PRELUDE + """
import socket  # noqa: E402

from aiohttp import ClientSession, web  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

REQUESTS = 20
#: the calls of together_add running now; none returns before all REQUESTS run
RUNNING = []


async def together_add(a, b):
    # a + b once REQUESTS calls run at the same time; one after another, the
    # first never returns and its caller times out
    d = Deferred()
    RUNNING.append(d)
    if len(RUNNING) == REQUESTS:
        for waiting in RUNNING:
            waiting.callback(None)
    await d
    return a + b


EXTRA_FUNCTIONS.append(together_add)


async def main(loop, proxy):
    server = proxy.use_server(SERVER_ID, timeout=20)

    async def handle(request):
        a, b = int(request.query["a"]), int(request.query["b"])
        return web.json_response({"sum": await server.together_add(a, b).asFuture(loop)})

    app = web.Application()
    app.router.add_get("/add", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    try:
        await web.SockSite(runner, sock).start()
        async with ClientSession() as session:
            async def get(i):
                url = f"http://127.0.0.1:{port}/add?a={i}&b={i * 10}"
                async with session.get(url) as response:
                    assert response.status == 200, await response.text()
                    return await response.json()

            bodies = await asyncio.gather(*(get(i) for i in range(REQUESTS)))
    finally:
        await runner.cleanup()
    # every answer needed all REQUESTS calls in flight at once
    assert bodies == [{"sum": i * 11} for i in range(REQUESTS)], bodies
    assert len(RUNNING) == REQUESTS, len(RUNNING)
    print("AIOHTTP-OK", REQUESTS, flush=True)


run(main)
"""


def run_script(source: str, tmp_path: Path) -> str:
    """Run *source* with a fresh server id; its stdout, after a zero exit."""
    script = tmp_path / "script.py"
    script.write_text(source)
    result = subprocess.run([sys.executable, str(script), new_server_id()], cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT)
    for line in result.stdout.splitlines():
        if line.startswith("PROXY "):
            conftest._created_names.update(line.split()[1:])
    assert result.returncode == 0, result.stdout + result.stderr
    for trouble in ("Traceback", "Unhandled", "Unclosed", "was destroyed"):
        assert trouble not in result.stderr, result.stderr
    return result.stdout


def test_calls_through_as_future(tmp_path: Path) -> None:
    """On the asyncio reactor, awaited calls return results and raise remote
    exceptions (same type) and RpcTimeout; cancelling the future cancels the call."""
    out = run_script(CALLS, tmp_path)
    assert out.splitlines()[-1] == "ASYNCIO-CALLS-OK"


def test_aiohttp_app(tmp_path: Path) -> None:
    """An aiohttp app on the reactor's loop answers 20 concurrent requests with
    RPC results, concurrently, and everything shuts down cleanly."""
    out = run_script(AIOHTTP, tmp_path)
    assert out.splitlines()[-1] == "AIOHTTP-OK 20"


def test_documented_asyncio_code_uses_public_names_only() -> None:
    """README, the examples and these scripts reach the asyncio loop through public
    names (the loop given to ``asyncioreactor.install``), never ``reactor._...``."""
    texts = {"README.rst": (ROOT / "README.rst").read_text(),
             "PRELUDE": PRELUDE, "AIOHTTP": AIOHTTP}
    texts.update({str(p): p.read_text() for p in (ROOT / "examples").glob("*.py")})
    private = {name: re.findall(r"reactor\._\w+", text) for name, text in texts.items()}
    assert {name: found for name, found in private.items() if found} == {}
