"""Logging in: the AMQP handshake on a fresh connection, and the broker's
refusals turned into AuthenticationError, TLSError or BrokerUnreachable.

The whole handshake is bounded by ``ConnectionParams.connect_timeout``; when it
runs out the error is :class:`~txcallme.errors.ConnectTimeout` naming the
phase it stopped in (``amqp header``, ``login``, ``vhost open``), never an
AuthenticationError.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from service_identity.exceptions import CertificateError, VerificationError

from txcallme.amqp.channel import Connection
from txcallme.amqp.protocol import Closed, Protocol
from txcallme.errors import (
    AuthenticationError,
    BrokerConnectionLost,
    BrokerUnreachable,
    CallmeError,
    ConnectTimeout,
    TLSError,
)


async def handshake(proto: Protocol, timeout_clock: Any = None) -> Connection:
    """Log in and open the vhost; fire with the protocol's :class:`Connection`.

    Fails with AuthenticationError, TLSError, BrokerUnreachable, ConnectTimeout
    or BrokerConnectionLost.
    """
    params = proto.params
    connection: Connection = proto.connection
    host, port = connection.address
    clock = timeout_clock or proto.clock
    timed_out: list[str] = []

    def give_up() -> None:
        timed_out.append(proto.phase)
        proto.transport.abortConnection()

    timer = clock.callLater(params.connect_timeout, give_up)
    try:
        try:
            await proto.started.wait()
            channel0 = await proto.channel(0)
            await channel0.connection_open(params.vhost)
        except Closed:
            if timed_out:
                raise ConnectTimeout(host, port, timed_out[0], params.connect_timeout) from None
            raise _login_error(proto, host, port) from None
    finally:
        if timer.active():
            timer.cancel()
    proto.phase = "open"
    return connection


def _login_error(proto: Protocol, host: str, port: int) -> CallmeError:
    params = proto.params
    if proto.close_reason is not None:
        code, text = proto.close_reason
        if code in (403, 530):
            return AuthenticationError(params.user, params.vhost, f"{code} {text}")
        return BrokerConnectionLost(f"broker closed the connection: {code} {text}")
    lost = proto.lost_reason
    detail = lost.getErrorMessage() if lost is not None else "connection closed"
    if lost is not None and lost.check(SSL.Error, VerificationError, CertificateError):
        if lost.check(VerificationError, CertificateError):
            detail = f"the broker's certificate does not match the host name: {detail}"
        return TLSError(f"TLS handshake with {host}:{port} failed: {detail}")
    if proto.login_sent:
        return AuthenticationError(params.user, params.vhost,
                                   f"connection closed during login ({detail})")
    return BrokerUnreachable(host, port, f"no AMQP handshake: {detail}"
                             + (" (is this a TLS port?)" if params.tls is None else ""))
