"""Where and how to connect: broker addresses, credentials, vhost, TLS.

Built from callme's keyword names (``amqp_host``, ``amqp_port``, ``amqp_user``,
``amqp_password``, ``amqp_vhost``, ``ssl``) or from an ``amqp://`` /
``amqps://`` URL as RabbitMQ's URI specification defines it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import attrs

DEFAULT_PORT = 5672
DEFAULT_TLS_PORT = 5671
DEFAULT_HEARTBEAT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0


@attrs.frozen
class TLSSettings:
    """TLS for the broker connection.

    ``verify_hostname`` is on by default; turning it off is logged as a warning.
    ``ca_file`` defaults to the platform's trust store. ``cert_file`` and
    ``key_file`` give a client certificate (mutual TLS, and EXTERNAL auth).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_hostname: bool = True
    server_hostname: str | None = None


@attrs.frozen
class ConnectionParams:
    """Everything needed to open one AMQP connection."""

    hosts: tuple[tuple[str, int], ...] = (("localhost", DEFAULT_PORT),)
    user: str = "guest"
    password: str = attrs.field(default="guest", repr=False)
    vhost: str = "/"
    heartbeat: float = DEFAULT_HEARTBEAT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    tls: TLSSettings | None = None
    external_auth: bool = False
    frame_max: int = 131072

    @property
    def host(self) -> str:
        return self.hosts[0][0]

    @property
    def port(self) -> int:
        return self.hosts[0][1]

    def describe(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        where = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{scheme}://{self.user}@{where}/{quote(self.vhost, safe='')}"


def parse_url(url: str) -> dict[str, Any]:
    """Parse an AMQP URI into :class:`ConnectionParams` keyword arguments.

    ``amqp://user:pass@host:port/vhost?heartbeat=30&connection_timeout=5000``;
    ``amqps://`` turns TLS on and defaults the port to 5671. Per the RabbitMQ
    URI spec, an absent path means vhost ``/`` and ``%2F`` is ``/``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"not an AMQP URL (amqp:// or amqps://): {url!r}")
    tls = parts.scheme == "amqps"
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in AMQP URL {url!r}") from None
    kwargs: dict[str, Any] = {}
    host = unquote(parts.hostname or "") or "localhost"
    kwargs["hosts"] = ((host, port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT)),)
    if parts.username is not None:
        kwargs["user"] = unquote(parts.username)
    if parts.password is not None:
        kwargs["password"] = unquote(parts.password)
    path = parts.path
    if path:
        if "/" in path[1:]:
            raise ValueError(f"vhost in AMQP URL must be one path segment (use %2F): {url!r}")
        kwargs["vhost"] = unquote(path[1:])
    query = parse_qs(parts.query, keep_blank_values=True)
    tls_kwargs: dict[str, Any] = {}
    for name, values in query.items():
        value = values[-1]
        if name == "heartbeat":
            kwargs["heartbeat"] = float(value)
        elif name == "connection_timeout":
            kwargs["connect_timeout"] = float(value) / 1000.0
        elif name == "frame_max":
            kwargs["frame_max"] = int(value)
        elif name == "cacertfile":
            tls_kwargs["ca_file"] = value
        elif name == "certfile":
            tls_kwargs["cert_file"] = value
        elif name == "keyfile":
            tls_kwargs["key_file"] = value
        elif name == "server_name_indication":
            tls_kwargs["server_hostname"] = value
        elif name == "verify":
            tls_kwargs["verify_hostname"] = value != "verify_none"
        elif name == "auth_mechanism":
            kwargs["external_auth"] = value.upper() == "EXTERNAL"
        else:
            raise ValueError(f"unknown AMQP URL option {name!r} in {url!r}")
    if tls or tls_kwargs:
        if not tls:
            raise ValueError(f"TLS options need an amqps:// URL: {url!r}")
        kwargs["tls"] = TLSSettings(**tls_kwargs)
    return kwargs


def connection_params(
    amqp_host: str | Sequence[str] = "localhost",
    amqp_port: int | None = None,
    amqp_user: str = "guest",
    amqp_password: str = "guest",
    amqp_vhost: str = "/",
    *,
    amqp_url: str | None = None,
    ssl: bool | TLSSettings = False,
    heartbeat: float = DEFAULT_HEARTBEAT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> ConnectionParams:
    """Build :class:`ConnectionParams` from callme-style arguments or a URL.

    ``amqp_host`` may be a list of ``host`` or ``host:port`` strings; the
    connection tries them in turn. A URL, when given, wins over the
    individual arguments.
    """
    if amqp_url:
        kwargs: dict[str, Any] = {"heartbeat": heartbeat, "connect_timeout": connect_timeout}
        kwargs.update(parse_url(amqp_url))
        if isinstance(ssl, TLSSettings):
            kwargs["tls"] = ssl
        return ConnectionParams(**kwargs)
    tls = ssl if isinstance(ssl, TLSSettings) else (TLSSettings() if ssl else None)
    default_port = amqp_port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT)
    names = [amqp_host] if isinstance(amqp_host, str) else list(amqp_host)
    if not names:
        raise ValueError("amqp_host needs at least one host")
    hosts = tuple(_split_host(name, default_port) for name in names)
    return ConnectionParams(
        hosts=hosts,
        user=amqp_user,
        password=amqp_password,
        vhost=amqp_vhost,
        heartbeat=heartbeat,
        connect_timeout=connect_timeout,
        tls=tls,
    )


def _split_host(name: str, default_port: int) -> tuple[str, int]:
    if name.startswith("["):  # [::1]:5672
        host, _, rest = name[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if name.count(":") == 1:
        host, port = name.split(":")
        return host, int(port)
    return name, default_port
