"""TLS to the broker: ``ssl=``, ``amqps://`` URLs and ``twistd callme --ssl``.

A module fixture generates certificates with trustme (a CA, a server certificate
for ``localhost`` only, a client certificate with CN ``tlsclient``, and a second,
unrelated CA) and starts a RabbitMQ node of its own (see :mod:`rabbitnode`) with
a TLS listener that asks for (but does not require) a client certificate and
offers EXTERNAL authentication (``rabbitmq_auth_mechanism_ssl``). The shared
broker on 5672 is not used. The node, its files and every process started here
are removed at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import pytest_twisted
import trustme
from conftest import sleep
from rabbitnode import HOST, RabbitNode, free_port
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from txcallme import (
    BrokerUnreachable,
    CallmeError,
    CallmeServerService,
    Proxy,
    ServerUnavailable,
    TLSError,
    TLSSettings,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TWISTD = Path(sys.executable).with_name("twistd")
CLIENT_CN = "tlsclient"
#: A refused TLS handshake must be reported within this many seconds.
FAIL_FAST = 5.0
#: A plain-TCP client on the TLS port must get its error within this many seconds.
PLAIN_ON_TLS = 10.0
READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class TLSBroker:
    """The TLS node and the PEM files the tests use."""

    node: RabbitNode
    port: int
    ca: str
    other_ca: str
    client_cert: str
    client_key: str

    def url(self, user: str = "guest:guest", host: str = "localhost", **query: str) -> str:
        """An ``amqps://`` URL to the node's TLS port, trusting our CA unless told."""
        query.setdefault("cacertfile", self.ca)
        options = "&".join(f"{k}={v}" for k, v in query.items())
        return f"amqps://{user}@{host}:{self.port}/%2F?{options}"


def _write_pems(directory: Path) -> dict[str, str]:
    ca = trustme.CA()
    other_ca = trustme.CA()
    server = ca.issue_cert("localhost", common_name="localhost")
    client = ca.issue_cert(CLIENT_CN, common_name=CLIENT_CN)
    files = {
        "ca": ca.cert_pem.bytes(),
        "other_ca": other_ca.cert_pem.bytes(),
        "server_cert": b"".join(blob.bytes() for blob in server.cert_chain_pems),
        "server_key": server.private_key_pem.bytes(),
        "client_cert": b"".join(blob.bytes() for blob in client.cert_chain_pems),
        "client_key": client.private_key_pem.bytes(),
    }
    paths = {}
    for name, data in files.items():
        path = directory / f"{name}.pem"
        path.write_bytes(data)
        path.chmod(0o644)  # the node runs as the rabbitmq user
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="module")
def tls() -> Iterator[TLSBroker]:
    """A node with a TLS listener and EXTERNAL auth; always cleaned up."""
    certs = Path(tempfile.mkdtemp(prefix="txcallme-tls-"))
    certs.chmod(0o755)
    node = None
    try:
        pems = _write_pems(certs)
        port = free_port()
        node = RabbitNode(
            config_lines=[
                f"listeners.ssl.default = {HOST}:{port}",
                f"ssl_options.cacertfile = {pems['ca']}",
                f"ssl_options.certfile = {pems['server_cert']}",
                f"ssl_options.keyfile = {pems['server_key']}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
                "auth_mechanisms.1 = PLAIN",
                "auth_mechanisms.2 = AMQPLAIN",
                "auth_mechanisms.3 = EXTERNAL",
                "ssl_cert_login_from = common_name",
            ],
            plugins=["rabbitmq_auth_mechanism_ssl"],
        )
        while port in (node.port, node.dist_port):  # pragma: no cover - unlucky draw
            port = free_port()
        node.start()
        node.ctl("add_user", CLIENT_CN, uuid4().hex)
        node.ctl("set_permissions", "-p", "/", CLIENT_CN, ".*", ".*", ".*")
        yield TLSBroker(node, port, pems["ca"], pems["other_ca"], pems["client_cert"],
                        pems["client_key"])
    finally:
        if node is not None:
            node.cleanup()
            left = node.processes()
            assert not left, f"node processes left behind: {left}"
        shutil.rmtree(certs, ignore_errors=True)


@implementer(ILogObserver)
class Warnings(list[str]):
    """Texts of the warnings (and worse) logged while it observes."""

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is not None and level >= LogLevel.warn:
            self.append(formatEvent(event))


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    """The warnings logged while the test runs."""
    seen = Warnings()
    globalLogPublisher.addObserver(seen)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(seen)


def server_id() -> str:
    """A fresh server id (objects live on the TLS node, not on the shared broker)."""
    return f"tls-{uuid4().hex[:8]}"


async def bounded(d: Deferred[Any], seconds: float) -> Any:
    """*d*'s result, or a TimeoutError (a hang) after *seconds*."""
    return await d.addTimeout(seconds, reactor)


async def serve_and_call(services: Any, **connect: Any) -> Any:
    """Start a server and a Proxy with the same connection options; add(1, 1)."""
    sid = server_id()
    server = services.server(sid, {"add": lambda a, b: a + b}, **connect)
    await bounded(server.when_ready(), READY_TIMEOUT)
    proxy = services.proxy(**connect)
    await bounded(proxy.when_ready(), READY_TIMEOUT)
    return await bounded(proxy.call(sid, "add", 1, 1), 10)


async def refused(owner: CallmeServerService | Proxy, seconds: float = FAIL_FAST,
                  ) -> tuple[BaseException, float]:
    """The error *owner*'s first connection fails with, and how long it took.

    Any exception is returned (the tests check its type), a hang is a TimeoutError.
    """
    began = time.monotonic()
    with pytest.raises(Exception) as caught:
        await bounded(owner.when_ready(), seconds)
    took = time.monotonic() - began
    print(f"\n  refused after {took:.2f} s: {caught.value!r}")
    assert not isinstance(caught.value, TimeoutError), f"no answer within {seconds:g} s"
    return caught.value, took


# --- calls over TLS ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_amqps_url(tls: TLSBroker, services: Any) -> None:
    """A server and a Proxy given an amqps:// URL with cacertfile serve add(1, 1)."""
    assert await serve_and_call(services, amqp_url=tls.url()) == 2


@pytest_twisted.ensureDeferred
async def test_ssl_settings(tls: TLSBroker, services: Any) -> None:
    """ssl=TLSSettings(ca_file=...) with amqp_host/amqp_port serves add(1, 1)."""
    connect = {"amqp_host": "localhost", "amqp_port": tls.port,
               "ssl": TLSSettings(ca_file=tls.ca)}
    assert await serve_and_call(services, **connect) == 2


@pytest_twisted.ensureDeferred
async def test_hostname_checked_by_default(tls: TLSBroker, services: Any,
                                           warnings: Warnings) -> None:
    """The default TLSSettings verify the host name and log no warning about it."""
    connect = {"amqp_host": "localhost", "amqp_port": tls.port,
               "ssl": TLSSettings(ca_file=tls.ca)}
    assert TLSSettings().verify_hostname is True
    proxy = services.proxy(**connect)
    await bounded(proxy.when_ready(), READY_TIMEOUT)
    assert not [w for w in warnings if "hostname" in w.lower()], warnings


# --- refusals ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_untrusted_ca(tls: TLSBroker, services: Any) -> None:
    """A broker certificate from a CA the client does not trust fails fast with
    TLSError naming the certificate problem."""
    proxy = services.proxy(amqp_url=tls.url(cacertfile=tls.other_ca))
    error, took = await refused(proxy)
    assert isinstance(error, TLSError), repr(error)
    assert "certificate" in str(error).lower(), str(error)
    assert took < FAIL_FAST


@pytest_twisted.ensureDeferred
async def test_untrusted_ca_server(tls: TLSBroker, services: Any) -> None:
    """A server given an untrusted CA through ssl=TLSSettings fails with TLSError."""
    server = services.server(server_id(), {"add": lambda a, b: a + b}, amqp_host="localhost",
                             amqp_port=tls.port, ssl=TLSSettings(ca_file=tls.other_ca))
    error, _ = await refused(server)
    assert isinstance(error, TLSError), repr(error)


@pytest_twisted.ensureDeferred
async def test_missing_ca_file(tls: TLSBroker, services: Any) -> None:
    """A ca_file that does not exist fails with a CallmeError naming the file."""
    missing = f"/nonexistent/{uuid4().hex}.pem"
    proxy = services.proxy(amqp_url=tls.url(cacertfile=missing))
    error, _ = await refused(proxy)
    assert isinstance(error, CallmeError), repr(error)
    assert missing in str(error), str(error)


@pytest_twisted.ensureDeferred
async def test_wrong_server_hostname(tls: TLSBroker, services: Any) -> None:
    """A certificate that does not name server_hostname fails with TLSError."""
    proxy = services.proxy(amqp_host="localhost", amqp_port=tls.port,
                           ssl=TLSSettings(ca_file=tls.ca, server_hostname="wrong.example"))
    error, took = await refused(proxy)
    assert isinstance(error, TLSError), repr(error)
    assert took < FAIL_FAST


@pytest_twisted.ensureDeferred
async def test_ip_not_in_certificate(tls: TLSBroker, services: Any) -> None:
    """Connecting to 127.0.0.1 with a certificate for localhost only fails with TLSError."""
    proxy = services.proxy(amqp_url=tls.url(host=HOST))
    error, took = await refused(proxy)
    assert isinstance(error, TLSError), repr(error)
    assert took < FAIL_FAST


@pytest_twisted.ensureDeferred
async def test_hostname_check_opt_out(tls: TLSBroker, services: Any,
                                      warnings: Warnings) -> None:
    """verify_hostname=False accepts a certificate for another name (still
    checked against the CA) and logs a warning that hostname verification is off."""
    sid = server_id()
    connect = {"amqp_host": HOST, "amqp_port": tls.port,
               "ssl": TLSSettings(ca_file=tls.ca, verify_hostname=False)}
    server = services.server(sid, {"add": lambda a, b: a + b}, **connect)
    await bounded(server.when_ready(), READY_TIMEOUT)
    proxy = services.proxy(amqp_url=tls.url(host=HOST, verify="verify_none"))
    await bounded(proxy.when_ready(), READY_TIMEOUT)
    assert await bounded(proxy.call(sid, "add", 1, 1), 10) == 2
    assert any("hostname verification" in w.lower() for w in warnings), warnings
    # The CA is still checked with the opt-out.
    untrusted = services.proxy(amqp_host=HOST, amqp_port=tls.port,
                               ssl=TLSSettings(ca_file=tls.other_ca, verify_hostname=False))
    error, _ = await refused(untrusted)
    assert isinstance(error, TLSError), repr(error)


@pytest_twisted.ensureDeferred
async def test_hostname_opt_out_platform_trust(tls: TLSBroker, services: Any) -> None:
    """verify_hostname=False without ca_file checks against the platform's CAs,
    which do not trust the test CA: TLSError, not a programming error."""
    proxy = services.proxy(amqp_host=HOST, amqp_port=tls.port,
                           ssl=TLSSettings(verify_hostname=False))
    error, _ = await refused(proxy)
    assert isinstance(error, TLSError), repr(error)


@pytest_twisted.ensureDeferred
async def test_plain_tcp_on_tls_port(tls: TLSBroker, services: Any) -> None:
    """A plain-TCP client on the TLS port fails fast with BrokerUnreachable that
    says it may be a TLS port, instead of hanging."""
    proxy = services.proxy(amqp_host="localhost", amqp_port=tls.port)
    error, took = await refused(proxy, PLAIN_ON_TLS + 5)
    assert isinstance(error, BrokerUnreachable), repr(error)
    assert "tls" in str(error).lower(), str(error)
    assert took < PLAIN_ON_TLS, f"took {took:.1f} s"


@pytest_twisted.ensureDeferred
async def test_plain_url_on_tls_port(tls: TLSBroker, services: Any) -> None:
    """An amqp:// (not amqps://) URL to the TLS port fails fast with BrokerUnreachable."""
    proxy = services.proxy(amqp_url=f"amqp://guest:guest@localhost:{tls.port}/%2F")
    error, took = await refused(proxy, PLAIN_ON_TLS + 5)
    assert isinstance(error, BrokerUnreachable), repr(error)
    assert took < PLAIN_ON_TLS, f"took {took:.1f} s"


# --- mutual TLS ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_certificate_plain_login(tls: TLSBroker, services: Any) -> None:
    """A client certificate and key (mutual TLS) with PLAIN login serve add(1, 1)."""
    connect = {"amqp_host": "localhost", "amqp_port": tls.port,
               "ssl": TLSSettings(ca_file=tls.ca, cert_file=tls.client_cert,
                                  key_file=tls.client_key)}
    assert await serve_and_call(services, **connect) == 2


@pytest_twisted.ensureDeferred
async def test_external_auth(tls: TLSBroker, services: Any) -> None:
    """EXTERNAL login with the client certificate (CN tlsclient, no password) serves
    add(1, 1), and the broker sees the connections as user tlsclient."""
    url = tls.url(user=CLIENT_CN, certfile=tls.client_cert, keyfile=tls.client_key,
                  auth_mechanism="external")
    assert await serve_and_call(services, amqp_url=url) == 2
    out = tls.node.ctl("list_connections", "-q", "user", "auth_mechanism", "ssl").stdout
    assert f"{CLIENT_CN}\tEXTERNAL\ttrue" in out, out


@pytest_twisted.ensureDeferred
async def test_external_auth_without_certificate(tls: TLSBroker, services: Any) -> None:
    """EXTERNAL login without a client certificate is refused with a CallmeError,
    not a hang."""
    url = tls.url(user=CLIENT_CN, auth_mechanism="external")
    proxy = services.proxy(amqp_url=url)
    error, _ = await refused(proxy, 15)
    assert isinstance(error, CallmeError), repr(error)


# --- twistd callme --ssl ---------------------------------------------------------------


async def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def twistd(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    """Starts ``twistd ARGS`` in examples/; kills what is still alive at teardown."""
    children: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"twistd-{len(children)}.log"
        env = {k: v for k, v in os.environ.items() if k != "CALLME_AMQP_URL"}
        with log.open("wb") as out:
            process = subprocess.Popen([str(TWISTD), *args], cwd=EXAMPLES, env=env,
                                       stdout=out, stderr=subprocess.STDOUT)
        children.append(process)
        return process, log

    try:
        yield start
    finally:
        for process in children:
            if process.poll() is None:
                process.kill()
            process.wait()


async def call_when_serving(proxy: Proxy, sid: str, process: subprocess.Popen[bytes],
                            log: Path) -> Any:
    """add(1, 1) on *sid*, retried while the twistd server is still starting."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        assert process.poll() is None, f"twistd exited:\n{log.read_text()}"
        try:
            return await bounded(proxy.call(sid, "add", 1, 1), 5)
        except ServerUnavailable:
            if time.monotonic() > deadline:
                raise AssertionError(f"twistd never served:\n{log.read_text()}") from None
        await sleep(0.2)


async def stop_twistd(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    await wait_for(lambda: process.poll() is not None, 15, "twistd to exit")
    assert process.returncode in (0, -signal.SIGTERM), log.read_text()


@pytest_twisted.ensureDeferred
async def test_twistd_ssl_options(tls: TLSBroker, services: Any, twistd: Any) -> None:
    """``twistd -n callme --ssl --ssl-ca CA --amqp-port PORT`` serves over TLS."""
    sid = server_id()
    process, log = twistd("--pidfile=", "-n", "callme", "--ssl", "--ssl-ca", tls.ca,
                          "--amqp-host", "localhost", "--amqp-port", str(tls.port),
                          "--server-id", sid, "--module", "app")
    proxy = services.proxy(amqp_url=tls.url())
    assert await call_when_serving(proxy, sid, process, log) == 2
    await stop_twistd(process, log)


@pytest_twisted.ensureDeferred
async def test_twistd_ssl_client_certificate(tls: TLSBroker, services: Any,
                                             twistd: Any) -> None:
    """``twistd callme --ssl-cert/--ssl-key`` with an amqps:// EXTERNAL URL serves."""
    sid = server_id()
    url = tls.url(user=CLIENT_CN, auth_mechanism="external")
    process, log = twistd("--pidfile=", "-n", "callme", "--amqp-url", url,
                          "--ssl-ca", tls.ca, "--ssl-cert", tls.client_cert,
                          "--ssl-key", tls.client_key, "--server-id", sid, "--module", "app")
    proxy = services.proxy(amqp_url=tls.url())
    assert await call_when_serving(proxy, sid, process, log) == 2
    await stop_twistd(process, log)


@pytest_twisted.ensureDeferred
async def test_twistd_untrusted_ca_logged(tls: TLSBroker, twistd: Any) -> None:
    """``twistd callme --ssl`` with an untrusted CA logs the certificate error."""
    process, log = twistd("--pidfile=", "-n", "callme", "--ssl", "--ssl-ca", tls.other_ca,
                          "--amqp-host", "localhost", "--amqp-port", str(tls.port),
                          "--server-id", server_id(), "--module", "app")
    await wait_for(lambda: "TLS" in log.read_text() or process.poll() is not None, 15,
                   "the TLS error in the twistd log")
    text = log.read_text()
    print("\n  " + "\n  ".join(line for line in text.splitlines() if "TLS" in line))
    assert "certificate" in text.lower(), text
    if process.poll() is None:
        await stop_twistd(process, log)


@pytest_twisted.ensureDeferred
async def test_twistd_no_verify_hostname(tls: TLSBroker, services: Any, twistd: Any) -> None:
    """``twistd callme --ssl-ca CA --no-verify-hostname`` on 127.0.0.1 (not in the
    certificate) serves, and logs that hostname verification is off."""
    sid = server_id()
    process, log = twistd("--pidfile=", "-n", "callme", "--ssl-ca", tls.ca,
                          "--no-verify-hostname", "--amqp-host", HOST, "--amqp-port",
                          str(tls.port), "--server-id", sid, "--module", "app")
    proxy = services.proxy(amqp_url=tls.url())
    assert await call_when_serving(proxy, sid, process, log) == 2
    await stop_twistd(process, log)
    text = log.read_text()
    assert "hostname verification is OFF" in text, text
