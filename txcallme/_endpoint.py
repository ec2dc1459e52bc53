"""Client endpoints for the broker: several addresses tried in turn, TLS,
and connect failures turned into errors that name host and port."""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txcallme._params import ConnectionParams, TLSSettings
from txcallme.errors import BrokerUnreachable

log = Logger(namespace="callme.connection")


def tls_options(settings: TLSSettings, hostname: str) -> Any:
    """A Twisted ``IOpenSSLClientConnectionCreator`` for *settings*."""
    from twisted.internet import ssl

    trust: Any = None
    if settings.ca_file:
        with open(settings.ca_file, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
    client_cert = None
    if settings.cert_file:
        with open(settings.cert_file, "rb") as f:
            pem = f.read()
        if settings.key_file:
            with open(settings.key_file, "rb") as f:
                pem += b"\n" + f.read()
        client_cert = ssl.PrivateCertificate.loadPEM(pem)
    if not settings.verify_hostname:
        log.warn(
            "TLS hostname verification is OFF for {host}: the broker's certificate is "
            "checked against the CA but not against its name",
            host=hostname,
        )
        kwargs: dict[str, Any] = {"verify": True, "requireCertificate": True}
        kwargs["caCerts"] = [trust.original] if trust is not None else None
        if kwargs["caCerts"] is None:
            kwargs.pop("caCerts")
            kwargs["trustRoot"] = ssl.platformTrust()
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

    def __init__(self, reactor: Any, params: ConnectionParams) -> None:
        self._reactor = reactor
        self._params = params
        self._next = 0
        self.last_address: tuple[str, int] = params.hosts[0]

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:  # noqa: N803
        host, port = self._params.hosts[self._next % len(self._params.hosts)]
        self._next += 1
        self.last_address = (host, port)
        endpoint: Any = HostnameEndpoint(
            self._reactor, host, port, timeout=self._params.connect_timeout
        )
        if self._params.tls is not None:
            endpoint = wrapClientTLS(tls_options(self._params.tls, host), endpoint)
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
