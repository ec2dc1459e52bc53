"""Where and how to connect: broker addresses, credentials, vhost, TLS.

Built from callme's keyword names (``amqp_host``, ``amqp_port``, ``amqp_user``,
``amqp_password``, ``amqp_vhost``, ``ssl``) or from an ``amqp://`` /
``amqps://`` URL as RabbitMQ's URI specification defines it.

Several brokers (the nodes of a cluster) are tried in turn: give ``amqp_host``
a list, ``amqp_url`` a list of URLs (same user, password, vhost and options),
or one URL with comma-separated hosts, ``amqp://u:p@node1:5672,node2:5672/vh``.
``shuffle_hosts=True`` (URL option ``?shuffle=1``) tries them in a random order
chosen once per connection owner, so that many instances spread over the nodes.

Other settings: ``heartbeat`` (seconds; 0 turns heartbeats off, values between 0
and 1 are refused, fractions above 1 are rounded up), ``connect_timeout`` (the
whole TCP + TLS + login handshake), ``control_timeout`` (each control operation:
channel open, declare, bind, qos, consume, cancel, close; URL option
``control_timeout`` in seconds), ``prepare_timeout`` (a Session's set-up after
login), and ``connector``: a callable ``(reactor) -> IStreamClientEndpoint``
used instead of the TCP/TLS endpoint to the hosts, e.g. to run over an
in-memory transport in tests (``hosts`` then only name the broker in logs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import attrs

DEFAULT_PORT = 5672
DEFAULT_TLS_PORT = 5671
DEFAULT_HEARTBEAT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CONTROL_TIMEOUT = 30.0
DEFAULT_PREPARE_TIMEOUT = 60.0


def _check_heartbeat(instance: Any, attribute: Any, value: float) -> None:
    if value != value or value < 0 or math.isinf(value):
        raise ValueError(f"heartbeat must be 0 (off) or a number of seconds >= 1, not {value!r}")
    if 0 < value < 1:
        raise ValueError(f"heartbeat {value!r} s is below AMQP's 1 s resolution; use 0 to "
                         "turn heartbeats off or at least 1 s")


def _check_positive(instance: Any, attribute: Any, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number of seconds, not {value!r}")


def _check_vhost(instance: Any, attribute: Any, value: str) -> None:
    if len(value.encode("utf-8", "surrogateescape")) > 255:
        raise ValueError(f"vhost name is longer than AMQP's 255 bytes: {value[:40]!r}...")


def _check_hosts(instance: Any, attribute: Any, value: tuple[tuple[str, int], ...]) -> None:
    if not value:
        raise ValueError("at least one broker host is needed")


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

    hosts: tuple[tuple[str, int], ...] = attrs.field(
        default=(("localhost", DEFAULT_PORT),), validator=_check_hosts)
    user: str = "guest"
    password: str = attrs.field(default="guest", repr=False)
    vhost: str = attrs.field(default="/", validator=_check_vhost)
    heartbeat: float = attrs.field(default=DEFAULT_HEARTBEAT, validator=_check_heartbeat)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    tls: TLSSettings | None = None
    external_auth: bool = False
    frame_max: int = 131072
    #: seconds each control operation may wait for the broker's answer
    control_timeout: float = attrs.field(default=DEFAULT_CONTROL_TIMEOUT,
                                         validator=_check_positive)
    #: seconds a Session's set-up (declares, consumers) may take after login
    prepare_timeout: float = attrs.field(default=DEFAULT_PREPARE_TIMEOUT,
                                         validator=_check_positive)
    #: try the hosts in a random order (chosen once per Session)
    shuffle_hosts: bool = False
    #: ``(reactor) -> IStreamClientEndpoint`` to use instead of TCP/TLS to *hosts*
    connector: Callable[[Any], Any] | None = attrs.field(default=None, eq=False)

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
    default_port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    kwargs: dict[str, Any] = {}
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    if "," in hostlist:  # amqp://user:pass@node1:5672,node2:5672/vhost
        hosts = []
        for name in hostlist.split(","):
            try:
                hosts.append(_split_host(unquote(name), default_port) if name
                             else ("localhost", default_port))
            except ValueError:
                raise ValueError(f"bad host {name!r} in AMQP URL {url!r}") from None
        kwargs["hosts"] = tuple(hosts)
        parts = parts._replace(netloc=(userinfo + "@" if userinfo else "") + "localhost")
    else:
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad port in AMQP URL {url!r}") from None
        host = unquote(parts.hostname or "") or "localhost"
        kwargs["hosts"] = ((host, port or default_port),)
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
            kwargs["heartbeat"] = _number(name, value, url)
        elif name == "connection_timeout":
            kwargs["connect_timeout"] = _number(name, value, url) / 1000.0
        elif name == "control_timeout":
            kwargs["control_timeout"] = _number(name, value, url)
        elif name == "shuffle":
            if value not in ("0", "1", "true", "false"):
                raise ValueError(f"shuffle must be 0 or 1 in AMQP URL {url!r}")
            kwargs["shuffle_hosts"] = value in ("1", "true")
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


def _number(name: str, value: str, url: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number in AMQP URL {url!r}, not {value!r}") from None


def parse_urls(urls: Sequence[str]) -> dict[str, Any]:
    """Parse several AMQP URLs (the nodes of one cluster) into one set of
    :class:`ConnectionParams` keyword arguments, hosts in the given order.

    Every URL must give the same user, password, vhost and options.
    """
    if isinstance(urls, str):
        return parse_url(urls)
    if not urls:
        raise ValueError("at least one AMQP URL is needed")
    merged: dict[str, Any] | None = None
    hosts: list[tuple[str, int]] = []
    for url in urls:
        kwargs = parse_url(url)
        hosts.extend(kwargs.pop("hosts"))
        if merged is None:
            merged = kwargs
        elif kwargs != merged:
            raise ValueError(f"AMQP URL {url!r} differs from {urls[0]!r} in more than "
                             "its host (user, password, vhost and options must match)")
    assert merged is not None
    merged["hosts"] = tuple(hosts)
    return merged


def connection_params(
    amqp_host: str | Sequence[str] = "localhost",
    amqp_port: int | None = None,
    amqp_user: str = "guest",
    amqp_password: str = "guest",
    amqp_vhost: str = "/",
    *,
    amqp_url: str | Sequence[str] | None = None,
    ssl: bool | TLSSettings = False,
    heartbeat: float = DEFAULT_HEARTBEAT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    shuffle_hosts: bool | None = None,
) -> ConnectionParams:
    """Build :class:`ConnectionParams` from callme-style arguments or a URL.

    ``amqp_host`` may be a list of ``host`` or ``host:port`` strings; the
    connection tries them in turn. A URL, when given, wins over the
    individual arguments. ``amqp_url`` may be a list of URLs (see
    :func:`parse_urls`). ``shuffle_hosts`` (default: the URL's ``shuffle``
    option, else off) tries the hosts in a random order.
    """
    if amqp_url:
        kwargs: dict[str, Any] = {"heartbeat": heartbeat, "connect_timeout": connect_timeout}
        kwargs.update(parse_urls(amqp_url) if not isinstance(amqp_url, str)
                      else parse_url(amqp_url))
        if isinstance(ssl, TLSSettings):
            kwargs["tls"] = ssl
        if shuffle_hosts is not None:
            kwargs["shuffle_hosts"] = shuffle_hosts
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
        shuffle_hosts=bool(shuffle_hosts),
    )


def _split_host(name: str, default_port: int) -> tuple[str, int]:
    if name.startswith("["):  # [::1]:5672
        host, _, rest = name[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if name.count(":") == 1:
        host, port = name.split(":")
        return host, int(port)
    return name, default_port
