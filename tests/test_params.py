"""Unit tests for txcallme.amqp.params: AMQP URIs (RabbitMQ's URI spec) and
callme-style connection arguments."""

from __future__ import annotations

from typing import Any

import pytest

from txcallme.amqp.params import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEARTBEAT,
    ConnectionParams,
    TLSSettings,
    connection_params,
    parse_url,
)


def from_url(url: str) -> ConnectionParams:
    """ConnectionParams for *url*, through the public entry point."""
    return connection_params(amqp_url=url)


# --- RabbitMQ URI spec examples (https://www.rabbitmq.com/docs/uri-spec) ------------


@pytest.mark.parametrize(
    "url, user, password, host, port, vhost",
    [
        ("amqp://user:pass@host:10000/vhost", "user", "pass", "host", 10000, "vhost"),
        (
            "amqp://user%61:%61pass@ho%61st:10000/v%2fhost",
            "usera",
            "apass",
            "hoast",
            10000,
            "v/host",
        ),
        ("amqp://", "guest", "guest", "localhost", 5672, "/"),
        ("amqp://:@/", "", "", "localhost", 5672, ""),
        ("amqp://user@", "user", "guest", "localhost", 5672, "/"),
        ("amqp://user:pass@", "user", "pass", "localhost", 5672, "/"),
        ("amqp://host", "guest", "guest", "host", 5672, "/"),
        ("amqp://:10000", "guest", "guest", "localhost", 10000, "/"),
        ("amqp:///vhost", "guest", "guest", "localhost", 5672, "vhost"),
        ("amqp://host/", "guest", "guest", "host", 5672, ""),
        ("amqp://host/%2f", "guest", "guest", "host", 5672, "/"),
        ("amqp://host/%2F", "guest", "guest", "host", 5672, "/"),
        ("amqp://[::1]", "guest", "guest", "::1", 5672, "/"),
    ],
)
def test_rabbitmq_uri_spec_examples(
    url: str, user: str, password: str, host: str, port: int, vhost: str
) -> None:
    """Each example in RabbitMQ's URI spec parses to the documented fields."""
    params = from_url(url)
    assert (params.user, params.password, params.hosts, params.vhost) == (
        user,
        password,
        ((host, port),),
        vhost,
    )
    assert params.tls is None


def test_full_url() -> None:
    """user, password, host, port and vhost all come from the URL."""
    assert parse_url("amqp://alice:s3cret@broker.example:5673/prod") == {
        "hosts": (("broker.example", 5673),),
        "user": "alice",
        "password": "s3cret",
        "vhost": "prod",
    }


def test_percent_decoding_of_user_password_vhost() -> None:
    """Percent-escapes in user, password and vhost are decoded; '+' stays '+'."""
    params = from_url("amqp://us%40er:p%3Aa%2Fss+word%25@host/v%2Fh%20x")
    assert params.user == "us@er"
    assert params.password == "p:a/ss+word%"
    assert params.vhost == "v/h x"


def test_password_with_unencoded_at_and_colon() -> None:
    """The last '@' ends the userinfo and the first ':' ends the user name."""
    params = from_url("amqp://user:pa:ss@w@host/")
    assert (params.user, params.password, params.host) == ("user", "pa:ss@w", "host")


def test_empty_path_means_default_vhost() -> None:
    """No path at all means vhost '/'."""
    assert from_url("amqp://host").vhost == "/"
    assert from_url("amqp://host:5672?heartbeat=5").vhost == "/"


def test_lone_slash_means_empty_vhost() -> None:
    """A path of just '/' is the empty vhost string, as the spec says."""
    assert from_url("amqp://host/").vhost == ""


def test_encoded_slash_vhost() -> None:
    """%2F is the default vhost '/'."""
    assert from_url("amqp://guest:guest@localhost:5672/%2F").vhost == "/"


def test_unencoded_slash_in_vhost_is_refused() -> None:
    """A second path segment is an error: the vhost must encode '/' as %2F."""
    with pytest.raises(ValueError, match="%2F"):
        parse_url("amqp://host/a/b")
    with pytest.raises(ValueError):
        parse_url("amqp://host//")


def test_amqps_defaults_port_5671_and_tls() -> None:
    """amqps:// turns TLS on with hostname checking and defaults the port to 5671."""
    params = from_url("amqps://host/")
    assert params.hosts == (("host", 5671),)
    assert params.tls == TLSSettings()
    assert params.tls.verify_hostname is True


def test_amqps_explicit_port() -> None:
    """An explicit port wins over amqps's default."""
    assert from_url("amqps://host:1234").port == 1234


def test_amqp_default_port() -> None:
    """amqp:// defaults to port 5672 without TLS."""
    params = from_url("amqp://host")
    assert params.port == 5672
    assert params.tls is None


def test_scheme_is_case_insensitive() -> None:
    """AMQP:// is accepted like amqp://, as URI schemes are case-insensitive."""
    assert from_url("AMQPS://host").tls is not None


def test_heartbeat_query() -> None:
    """?heartbeat is in seconds."""
    assert from_url("amqp://host/?heartbeat=30").heartbeat == 30.0


def test_connection_timeout_query_is_milliseconds() -> None:
    """?connection_timeout is in milliseconds: 5000 becomes 5.0 s."""
    assert from_url("amqp://host/?connection_timeout=5000").connect_timeout == 5.0


def test_frame_max_query() -> None:
    """?frame_max sets the largest frame."""
    assert from_url("amqp://host/?frame_max=8192").frame_max == 8192


def test_several_query_options_and_last_wins() -> None:
    """Options combine; a repeated option takes its last value."""
    params = from_url("amqp://host/?heartbeat=10&connection_timeout=250&heartbeat=20")
    assert params.heartbeat == 20.0
    assert params.connect_timeout == 0.25


def test_tls_query_options() -> None:
    """TLS file, SNI and verify options fill TLSSettings on amqps URLs."""
    params = from_url(
        "amqps://host/?cacertfile=/ca.pem&certfile=/c.pem&keyfile=/k.pem"
        "&server_name_indication=other&verify=verify_none"
    )
    assert params.tls == TLSSettings(
        ca_file="/ca.pem",
        cert_file="/c.pem",
        key_file="/k.pem",
        verify_hostname=False,
        server_hostname="other",
    )


def test_tls_query_options_need_amqps() -> None:
    """TLS options on a plain amqp:// URL are an error, not silently ignored."""
    with pytest.raises(ValueError, match="amqps"):
        parse_url("amqp://host/?cacertfile=/ca.pem")


def test_external_auth_mechanism() -> None:
    """auth_mechanism=external selects EXTERNAL authentication."""
    assert from_url("amqps://host/?auth_mechanism=external").external_auth is True
    assert from_url("amqps://host/?auth_mechanism=plain").external_auth is False


def test_unknown_option_is_refused() -> None:
    """An option the parser does not know is a ValueError naming it."""
    with pytest.raises(ValueError, match="channel_maxx"):
        parse_url("amqp://host/?channel_maxx=3")


@pytest.mark.parametrize(
    "url", ["http://host/", "amqp+tls://host/", "host:5672", "", "rabbitmq://host"]
)
def test_non_amqp_scheme_is_refused(url: str) -> None:
    """Only amqp:// and amqps:// URLs are accepted."""
    with pytest.raises(ValueError):
        parse_url(url)


def test_bad_port_is_refused() -> None:
    """A port that is not a number in range is a ValueError."""
    with pytest.raises(ValueError, match="port"):
        parse_url("amqp://host:notaport/")
    with pytest.raises(ValueError, match="port"):
        parse_url("amqp://host:70000/")


def test_ipv6_url_with_port() -> None:
    """A bracketed IPv6 host keeps its address without brackets."""
    assert from_url("amqp://[::1]:5673/").hosts == (("::1", 5673),)


def test_url_defaults_heartbeat_and_timeout() -> None:
    """Without query options the defaults apply."""
    params = from_url("amqp://host")
    assert params.heartbeat == DEFAULT_HEARTBEAT
    assert params.connect_timeout == DEFAULT_CONNECT_TIMEOUT


def test_url_wins_over_keyword_arguments() -> None:
    """A URL overrides host, credentials and timing given as arguments."""
    params = connection_params(
        "other", 1, "bob", "pw", "vh", amqp_url="amqp://u:p@h:2/v?heartbeat=3", heartbeat=9
    )
    assert (params.hosts, params.user, params.password, params.vhost, params.heartbeat) == (
        (("h", 2),),
        "u",
        "p",
        "v",
        3.0,
    )


def test_keyword_timing_applies_to_url_without_options() -> None:
    """heartbeat/connect_timeout arguments apply when the URL does not set them."""
    params = connection_params(amqp_url="amqp://h", heartbeat=7, connect_timeout=2)
    assert (params.heartbeat, params.connect_timeout) == (7, 2)


def test_tls_settings_object_applies_to_url() -> None:
    """A TLSSettings passed as ssl replaces the URL's TLS settings."""
    tls = TLSSettings(ca_file="/x.pem")
    assert connection_params(amqp_url="amqps://h", ssl=tls).tls is tls


# --- callme-style keyword arguments ------------------------------------------------


def test_defaults() -> None:
    """No arguments: guest@localhost:5672, vhost '/', no TLS."""
    params = connection_params()
    assert params == ConnectionParams()
    assert (params.host, params.port, params.user, params.password, params.vhost) == (
        "localhost",
        5672,
        "guest",
        "guest",
        "/",
    )
    assert params.tls is None


def test_callme_keyword_arguments() -> None:
    """callme's amqp_* keyword names fill the matching fields."""
    params = connection_params(
        amqp_host="rabbit",
        amqp_port=5673,
        amqp_user="u",
        amqp_password="p",
        amqp_vhost="v",
        heartbeat=15,
        connect_timeout=3,
    )
    assert params == ConnectionParams(
        hosts=(("rabbit", 5673),),
        user="u",
        password="p",
        vhost="v",
        heartbeat=15,
        connect_timeout=3,
    )


def test_callme_positional_arguments() -> None:
    """The first five arguments are positional, in callme's order."""
    params = connection_params("h", 1, "u", "p", "v")
    assert (params.hosts, params.user, params.password, params.vhost) == (
        (("h", 1),),
        "u",
        "p",
        "v",
    )


def test_ssl_true_turns_on_tls_and_port_5671() -> None:
    """ssl=True gives default TLS settings and port 5671."""
    params = connection_params("h", ssl=True)
    assert params.tls == TLSSettings()
    assert params.port == 5671


def test_ssl_settings_object_is_used() -> None:
    """ssl may be a TLSSettings, used as given."""
    tls = TLSSettings(verify_hostname=False)
    params = connection_params("h", amqp_port=1, ssl=tls)
    assert params.tls is tls
    assert params.port == 1


def test_multiple_hosts() -> None:
    """A list of 'host' or 'host:port' strings keeps order and fills default ports."""
    params = connection_params(["a:1", "b"])
    assert params.hosts == (("a", 1), ("b", 5672))
    assert (params.host, params.port) == ("a", 1)


def test_multiple_hosts_use_amqp_port_as_default() -> None:
    """amqp_port is the port for hosts that give none."""
    assert connection_params(("a", "b:9"), amqp_port=7).hosts == (("a", 7), ("b", 9))


def test_ipv6_host_with_port() -> None:
    """A bracketed IPv6 host may carry a port."""
    assert connection_params("[::1]:5673").hosts == (("::1", 5673),)


def test_ipv6_host_without_port() -> None:
    """A bracketed or bare IPv6 host gets the default port."""
    assert connection_params("[::1]").hosts == (("::1", 5672),)
    assert connection_params("fe80::1").hosts == (("fe80::1", 5672),)


def test_host_with_colon_port_in_single_string() -> None:
    """A single 'host:port' string is split like a list entry."""
    assert connection_params("rabbit:5999").hosts == (("rabbit", 5999),)


def test_empty_host_list_is_refused() -> None:
    """At least one host is needed."""
    with pytest.raises(ValueError):
        connection_params([])


def test_bad_port_in_host_string_is_refused() -> None:
    """A non-numeric port in 'host:port' is a ValueError."""
    with pytest.raises(ValueError):
        connection_params("host:port")


# --- ConnectionParams ----------------------------------------------------------------


def test_password_not_in_repr() -> None:
    """repr() of the params never shows the password."""
    assert "hunter2" not in repr(connection_params(amqp_password="hunter2"))


def test_describe_hides_password_and_shows_scheme() -> None:
    """describe() names scheme, user and every host, without the password."""
    text = connection_params(["a:1", "b"], amqp_password="hunter2", ssl=True).describe()
    assert "hunter2" not in text
    assert text.startswith("amqps://guest@a:1,b:5671/")


def test_params_are_frozen() -> None:
    """ConnectionParams cannot be changed after creation."""
    params: Any = connection_params()
    with pytest.raises(AttributeError):
        params.user = "x"


# --- heartbeat resolution, timeouts, several brokers ------------------------------


@pytest.mark.parametrize("value", [0.5, 0.01, 0.999])
def test_heartbeat_below_one_second_refused(value: float) -> None:
    """A heartbeat between 0 and 1 s is refused with a message, not truncated to off."""
    with pytest.raises(ValueError, match="1 s"):
        ConnectionParams(heartbeat=value)
    with pytest.raises(ValueError, match="1 s"):
        from_url(f"amqp://host/?heartbeat={value}")


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_heartbeat_nonsense_refused(value: float) -> None:
    """A negative, NaN or infinite heartbeat is refused."""
    with pytest.raises(ValueError, match="heartbeat"):
        ConnectionParams(heartbeat=value)


def test_heartbeat_zero_is_off_and_fractions_above_one_kept() -> None:
    """0 turns heartbeats off; 1.5 is accepted (rounded up to 2 s at tune)."""
    assert ConnectionParams(heartbeat=0).heartbeat == 0
    assert ConnectionParams(heartbeat=1.5).heartbeat == 1.5


def test_heartbeat_rounded_up_at_tune() -> None:
    """A 1.5 s heartbeat is negotiated as 2 s, never as 1 or 0."""
    from scripted import ScriptedBroker
    broker = ScriptedBroker(heartbeat=60)
    broker.connection(heartbeat=1.5)
    [tune_ok] = broker.peer.sent("connection.tune-ok")
    assert tune_ok.args["heartbeat"] == 2


def test_bad_number_in_url() -> None:
    """A non-number heartbeat in a URL is a clear ValueError."""
    with pytest.raises(ValueError, match="heartbeat must be a number"):
        from_url("amqp://host/?heartbeat=soon")


def test_control_timeout() -> None:
    """control_timeout defaults to 30 s, comes from ?control_timeout= and must be positive."""
    assert ConnectionParams().control_timeout == 30.0
    assert from_url("amqp://host/?control_timeout=5").control_timeout == 5.0
    with pytest.raises(ValueError, match="control_timeout"):
        ConnectionParams(control_timeout=0)


def test_long_vhost_refused() -> None:
    """A vhost name over 255 bytes is refused when the params are built."""
    with pytest.raises(ValueError, match="255"):
        ConnectionParams(vhost="v" * 256)


def test_shuffle_option() -> None:
    """?shuffle=1 and shuffle_hosts=True turn shuffling on; it is off by default."""
    assert not from_url("amqp://h1,h2/").shuffle_hosts
    assert from_url("amqp://h1,h2/?shuffle=1").shuffle_hosts
    assert connection_params(["h1", "h2"], shuffle_hosts=True).shuffle_hosts
    with pytest.raises(ValueError, match="shuffle"):
        from_url("amqp://h1/?shuffle=maybe")


def test_comma_separated_hosts() -> None:
    """amqp://u:p@n1:5673,n2,[::1]:5674/vh names several nodes with one user and vhost."""
    params = from_url("amqp://u:p@n1:5673,n2,[::1]:5674/vh")
    assert params.hosts == (("n1", 5673), ("n2", 5672), ("::1", 5674))
    assert (params.user, params.password, params.vhost) == ("u", "p", "vh")


def test_several_urls() -> None:
    """A list of URLs gives their hosts in order, when the rest agrees."""
    params = connection_params(amqp_url=["amqp://u:p@n1/vh", "amqp://u:p@n2:5673/vh"])
    assert params.hosts == (("n1", 5672), ("n2", 5673))
    assert params.user == "u"


def test_several_urls_must_agree() -> None:
    """URLs that differ in user or vhost are refused."""
    with pytest.raises(ValueError, match="differs"):
        connection_params(amqp_url=["amqp://u:p@n1/vh", "amqp://other:p@n2/vh"])
