"""Client endpoints for the broker: several addresses tried in turn (in a
random order chosen once per endpoint with ``shuffle_hosts``), TLS, a
``connector`` given in the params instead of TCP, and connect failures turned
into errors that name host and port."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txcallme.amqp.params import ConnectionParams, TLSSettings
from txcallme.errors import BrokerUnreachable, TLSError

log = Logger(namespace="callme.connection")


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"cannot read the TLS {what} file {path}: {e.strerror}") from None


def tls_options(settings: TLSSettings, hostname: str) -> Any:
    """A Twisted ``IOpenSSLClientConnectionCreator`` for *settings*.

    Raises :class:`TLSError` for unreadable or invalid certificate files.
    """
    from OpenSSL import SSL
    from twisted.internet import ssl

    try:
        trust: Any = None
        if settings.ca_file:
            trust = ssl.Certificate.loadPEM(_read(settings.ca_file, "CA"))
        client_cert = None
        if settings.cert_file:
            pem = _read(settings.cert_file, "certificate")
            if settings.key_file:
                pem += b"\n" + _read(settings.key_file, "key")
            client_cert = ssl.PrivateCertificate.loadPEM(pem)
    except (SSL.Error, ValueError) as e:
        raise TLSError(f"invalid TLS certificate or key file: {e}") from None
    if not settings.verify_hostname:
        log.warn(
            "TLS hostname verification is OFF for {host}: the broker's certificate is "
            "checked against the CA but not against its name",
            host=hostname,
        )
        kwargs: dict[str, Any] = {"trustRoot": trust if trust is not None
                                  else ssl.platformTrust()}
        if client_cert is not None:
            kwargs["privateKey"] = client_cert.privateKey.original
            kwargs["certificate"] = client_cert.original
        return ssl.CertificateOptions(**kwargs)
    return ssl.optionsForClientTLS(
        settings.server_hostname or hostname,
        trustRoot=trust,
        clientCertificate=client_cert,
    )


@implementer(IStreamClientEndpoint)
class BrokerEndpoint:
    """Connects to the broker addresses in turn, one per attempt."""

    def __init__(self, reactor: Any, params: ConnectionParams,
                 rng: random.Random | None = None) -> None:
        self._reactor = reactor
        self._params = params
        self._next = 0
        self._tls: dict[str, Any] = {}
        hosts = list(params.hosts)
        if params.shuffle_hosts:
            (rng or random.Random()).shuffle(hosts)
        #: the addresses in the order they are tried
        self.hosts: tuple[tuple[str, int], ...] = tuple(hosts)
        self.last_address: tuple[str, int] = self.hosts[0]
        self._connector: Any = (params.connector(reactor) if params.connector is not None
                                else None)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:  # noqa: N803
        host, port = self.hosts[self._next % len(self.hosts)]
        self._next += 1
        self.last_address = (host, port)
        if self._connector is not None:
            return self._connector.connect(protocolFactory)  # type: ignore[no-any-return]
        endpoint: Any = HostnameEndpoint(
            self._reactor, host, port, timeout=self._params.connect_timeout
        )
        if self._params.tls is not None:
            options = self._tls.get(host)
            if options is None:
                try:
                    options = self._tls[host] = tls_options(self._params.tls, host)
                except TLSError as e:
                    return fail(e)
            endpoint = wrapClientTLS(options, endpoint)
        d: Deferred[Any] = endpoint.connect(protocolFactory)

        def failed(reason: Failure) -> Failure:
            if reason.check(
                ierror.ConnectError, ierror.DNSLookupError, ierror.ConnectionRefusedError,
                ierror.TimeoutError, ierror.NoRouteError, ierror.UserError,
            ):
                return Failure(BrokerUnreachable(host, port, _short(reason)))
            return reason

        return d.addErrback(failed)


def _short(reason: Failure) -> str:
    text = reason.getErrorMessage()
    return text.strip().rstrip(".") or type(reason.value).__name__
