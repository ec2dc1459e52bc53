"""Unit tests for txcallme.amqp.codec: field tables, method arguments, content
headers and frames, with the bytes on the wire pinned against pamqp."""

from __future__ import annotations

import datetime
import decimal
import struct
import time
from typing import Any

import pytest
from pamqp import body as pbody
from pamqp import commands
from pamqp import encode as pencode
from pamqp import frame as pframe
from pamqp import header as pheader

from txcallme.amqp import codec as _codec
from txcallme.amqp import frames as _frames
from txcallme.amqp import properties as _properties
from txcallme.amqp.codec import DecodeError
from txcallme.amqp.spec import tables

UTC = datetime.timezone.utc

PUBLISH = ("short", "shortstr", "shortstr", "bit", "bit")
ACK = ("longlong", "bit")
DELIVER = ("shortstr", "longlong", "bit", "shortstr", "shortstr")


@pytest.fixture(scope="module")
def props_fields() -> tuple[tuple[str, str], ...]:
    """The basic class's (property name, type) list from the project's spec."""
    return tables().props


def table_of(*entries: bytes) -> bytes:
    """A field table from already-encoded ``shortstr key + typed value`` entries."""
    body = b"".join(entries)
    return struct.pack(">I", len(body)) + body


def entry(key: str, kind: bytes, raw: bytes) -> bytes:
    """One field-table entry: shortstr key, type letter, encoded value."""
    return _codec.encode_shortstr(key) + kind + raw


def longstr(raw: bytes) -> bytes:
    """A long string: 32-bit length and the bytes."""
    return struct.pack(">I", len(raw)) + raw


# --- field values: every type letter -------------------------------------------

HAND_ENCODED = [
    (b"t", b"\x01", True),
    (b"t", b"\x00", False),
    (b"b", struct.pack(">b", -128), -128),
    (b"B", struct.pack(">B", 255), 255),
    (b"s", struct.pack(">h", -32768), -32768),
    (b"u", struct.pack(">H", 65535), 65535),
    (b"I", struct.pack(">i", -(2**31)), -(2**31)),
    (b"i", struct.pack(">I", 2**32 - 1), 2**32 - 1),
    (b"L", struct.pack(">q", -(2**63)), -(2**63)),
    (b"l", struct.pack(">q", 2**63 - 1), 2**63 - 1),
    (b"f", struct.pack(">f", 1.5), 1.5),
    (b"d", struct.pack(">d", -2.25), -2.25),
    (b"D", struct.pack(">Bi", 2, -12345), decimal.Decimal("-123.45")),
    (b"S", longstr("h\u00e9".encode()), "h\u00e9"),
    (b"S", longstr(b"\xff\xfe"), b"\xff\xfe"),
    (b"x", longstr(b"\x00\x01"), b"\x00\x01"),
    (b"A", longstr(b"I" + struct.pack(">i", 7) + b"V"), [7, None]),
    (b"T", struct.pack(">Q", 1_600_000_000), datetime.datetime.fromtimestamp(1_600_000_000, UTC)),
    (b"F", table_of(entry("k", b"t", b"\x01")), {"k": True}),
    (b"V", b"", None),
]


@pytest.mark.parametrize(
    "kind, raw, expected",
    HAND_ENCODED,
    ids=[f"{k.decode()}-{i}" for i, (k, _, _) in enumerate(HAND_ENCODED)],
)
def test_decode_every_value_type(kind: bytes, raw: bytes, expected: Any) -> None:
    """Each RabbitMQ field-value type letter decodes to the right Python value."""
    decoded = _codec.decode_table(table_of(entry("v", kind, raw)))
    assert decoded == {"v": expected}
    assert type(decoded["v"]) is type(expected)


ROUND_TRIP_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**31 - 1,
    -(2**31),
    2**31,
    -(2**63),
    2**63 - 1,
    0.1,
    -1e300,
    "",
    "text \u2603",
    b"",
    b"\x00\xffbytes",
    decimal.Decimal("3.14"),
    decimal.Decimal("-0.001"),
    decimal.Decimal("42"),
    datetime.datetime(2024, 2, 29, 12, 30, 5, tzinfo=UTC),
    [],
    [1, "two", None, [3.5, {"deep": False}]],
    {},
    {"nested": {"table": {"with": [1, 2, 3]}}},
]


@pytest.mark.parametrize("value", ROUND_TRIP_VALUES, ids=repr)
def test_table_round_trip(value: Any) -> None:
    """Every value the encoder accepts decodes back to an equal value."""
    assert _codec.decode_table(_codec.encode_table({"v": value})) == {"v": value}


def test_round_trip_int_types() -> None:
    """Ints in 32-bit range go out as 'I' and larger ones as 'l'."""
    assert _codec._encode_value(2**31 - 1)[:1] == b"I"
    assert _codec._encode_value(2**31)[:1] == b"l"
    assert _codec._encode_value(True)[:1] == b"t"


def test_tuple_and_bytearray_round_trip_as_list_and_bytes() -> None:
    """Tuples encode as arrays and bytearrays as byte arrays."""
    encoded = _codec.encode_table({"t": (1, 2), "b": bytearray(b"ab")})
    assert _codec.decode_table(encoded) == {"t": [1, 2], "b": b"ab"}


def test_empty_and_none_table_encode_as_four_zero_bytes() -> None:
    """An empty or absent table is a zero length prefix."""
    assert _codec.encode_table({}) == b"\x00\x00\x00\x00"
    assert _codec.encode_table(None) == b"\x00\x00\x00\x00"
    assert _codec.decode_table(b"\x00\x00\x00\x00") == {}


def test_unencodable_value_raises_type_error() -> None:
    """A value with no AMQP type is refused with TypeError."""
    with pytest.raises(TypeError):
        _codec.encode_table({"v": object()})


@pytest.mark.parametrize(
    "value",
    [
        decimal.Decimal("1e20"),
        decimal.Decimal("1e-300"),
        2**64,
        -(2**63) - 1,
        datetime.datetime(1960, 1, 1, tzinfo=UTC),
    ],
    ids=repr,
)
def test_out_of_range_value_raises_type_or_value_error(value: Any) -> None:
    """An out-of-range value is refused with TypeError/ValueError, not struct.error."""
    with pytest.raises((TypeError, ValueError)):
        _codec.encode_table({"v": value})


def test_naive_datetime_is_utc_like_pamqp(monkeypatch: pytest.MonkeyPatch) -> None:
    """A naive datetime is taken as UTC (as pamqp and pika do), whatever the local zone."""
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        naive = datetime.datetime(2020, 1, 1, 12, 0, 0)
        ours = _codec.encode_table({"T": naive})
        assert ours == pencode.field_table({"T": naive})
    finally:
        monkeypatch.undo()
        time.tzset()


def test_long_shortstr_refused() -> None:
    """A shortstr over 255 bytes is refused rather than truncated."""
    assert _codec.encode_shortstr("a" * 255)[:1] == b"\xff"
    with pytest.raises(ValueError):
        _codec.encode_shortstr("a" * 256)


# --- nesting limit ---------------------------------------------------------------


def nested_tables(depth: int) -> bytes:
    """A table holding *depth* levels of nested tables under key 'n'."""
    inner = table_of()
    for _ in range(depth):
        inner = table_of(entry("n", b"F", inner))
    return inner


def nested_arrays(depth: int) -> bytes:
    """A table holding *depth* levels of nested arrays under key 'n'."""
    inner = longstr(b"")
    for _ in range(depth - 1):
        inner = longstr(b"A" + inner)
    return table_of(entry("n", b"A", inner))


def test_nesting_up_to_the_limit_decodes() -> None:
    """Tables nested MAX_TABLE_DEPTH deep are accepted."""
    decoded = _codec.decode_table(nested_tables(_codec.MAX_TABLE_DEPTH))
    for _ in range(_codec.MAX_TABLE_DEPTH):
        decoded = decoded["n"]
    assert decoded == {}


@pytest.mark.parametrize("build", [nested_tables, nested_arrays])
def test_nesting_past_the_limit_raises_decode_error(build: Any) -> None:
    """One level past MAX_TABLE_DEPTH (tables or arrays) is a DecodeError."""
    with pytest.raises(DecodeError, match="deeply"):
        _codec.decode_table(build(_codec.MAX_TABLE_DEPTH + 1))


def test_hostile_deep_nesting_is_a_decode_error_not_recursion_error() -> None:
    """Thousands of nested arrays fail cleanly instead of exhausting the stack."""
    with pytest.raises(DecodeError):
        _codec.decode_table(nested_arrays(5000))


# --- malformed input -----------------------------------------------------------------

GOOD_TABLE = _codec.encode_table(
    {
        "s": "string",
        "i": 5,
        "l": 2**40,
        "d": 1.0,
        "x": b"raw",
        "a": [1, "a"],
        "f": {"t": True},
        "D": decimal.Decimal("1.5"),
        "T": datetime.datetime(2020, 1, 1, tzinfo=UTC),
    }
)


@pytest.mark.parametrize("cut", range(1, len(GOOD_TABLE)))
def test_every_truncation_raises_decode_error(cut: int) -> None:
    """A table cut short anywhere raises DecodeError, never IndexError or struct.error."""
    with pytest.raises(DecodeError):
        _codec.decode_table(GOOD_TABLE[:cut])


@pytest.mark.parametrize("cut", range(len(GOOD_TABLE) - 4))
def test_truncated_body_with_original_length_prefix_raises_decode_error(cut: int) -> None:
    """A table whose declared size outruns the data raises DecodeError."""
    data = struct.pack(">I", len(GOOD_TABLE) - 4) + GOOD_TABLE[4 : 4 + cut]
    with pytest.raises(DecodeError):
        _codec.decode_table(data)


@pytest.mark.parametrize(
    "kind, raw",
    [
        (b"b", b""),
        (b"s", b"\x00"),
        (b"I", b"\x00\x00\x00"),
        (b"l", b"\x00" * 7),
        (b"f", b"\x00\x00"),
        (b"d", b"\x00" * 7),
        (b"D", b"\x02\x00\x00"),
        (b"T", b"\x00" * 4),
        (b"S", b"\x00\x00\x00\x09abc"),
        (b"x", b"\x00\x00"),
        (b"A", b"\x00\x00\x00\x05I\x00"),
        (b"F", b"\x00\x00\x00\x10"),
    ],
)
def test_value_overrunning_its_table_raises_decode_error(kind: bytes, raw: bytes) -> None:
    """A value longer than the table's declared size is a DecodeError."""
    with pytest.raises(DecodeError):
        _codec.decode_table(table_of(entry("v", kind, raw)))


def test_value_overrunning_table_size_inside_buffer_raises_decode_error() -> None:
    """An entry that ends past its table's declared size is refused even with bytes after it."""
    inner = entry("v", b"I", struct.pack(">i", 1))
    data = struct.pack(">I", len(inner) - 2) + inner
    with pytest.raises(DecodeError):
        _codec.decode_table(data)


def test_unknown_type_letter_raises_decode_error() -> None:
    """A type letter outside RabbitMQ's set is a DecodeError naming it."""
    with pytest.raises(DecodeError, match="Z"):
        _codec.decode_table(table_of(entry("v", b"Z", b"\x00")))


def test_trailing_bytes_after_table_raise_decode_error() -> None:
    """decode_table wants exactly one table, with nothing after it."""
    with pytest.raises(DecodeError):
        _codec.decode_table(_codec.encode_table({"a": 1}) + b"\x00")


def test_timestamp_out_of_range_raises_decode_error() -> None:
    """A timestamp no datetime can hold is a DecodeError, not OverflowError."""
    with pytest.raises(DecodeError):
        _codec.decode_table(table_of(entry("v", b"T", b"\xff" * 8)))


def test_decode_error_is_a_value_error() -> None:
    """Callers catching ValueError also catch DecodeError."""
    assert issubclass(DecodeError, ValueError)


# --- method arguments and bit packing ------------------------------------------------


def test_nine_bits_span_two_octets() -> None:
    """Nine consecutive bits pack LSB first into two octets and decode back."""
    bits = [True, False, True, True, False, False, False, True, True]
    encoded = _codec.encode_arguments(["bit"] * 9, bits)
    assert encoded == bytes([0b10001101, 0b00000001])
    assert _codec.decode_arguments(["bit"] * 9, encoded) == tuple(bits)


def test_eight_bits_fill_exactly_one_octet() -> None:
    """Eight bits take one octet; a ninth starts a new one."""
    assert _codec.encode_arguments(["bit"] * 8, [True] * 8) == b"\xff"
    assert _codec.encode_arguments(["bit"] * 9, [False] * 8 + [True]) == b"\x00\x01"


def test_bits_followed_by_shortstr() -> None:
    """A non-bit field flushes the pending bits octet before its own bytes."""
    types = ["bit", "bit", "shortstr", "bit"]
    encoded = _codec.encode_arguments(types, [False, True, "q", True])
    assert encoded == b"\x02\x01q\x01"
    assert _codec.decode_arguments(types, encoded) == (False, True, "q", True)


def test_every_argument_type_round_trips() -> None:
    """octet, short, long, longlong, timestamp, shortstr, longstr and table round-trip."""
    types = ["octet", "short", "long", "longlong", "timestamp", "shortstr", "longstr", "table"]
    values = [255, 65535, 2**32 - 1, 2**64 - 1, 1_700_000_000, "name", b"long\x00", {"a": [1]}]
    encoded = _codec.encode_arguments(types, values)
    assert _codec.decode_arguments(types, encoded) == tuple(values)


def test_none_arguments_encode_as_defaults() -> None:
    """None becomes 0, an empty string or an empty table."""
    types = ["short", "shortstr", "longstr", "table"]
    encoded = _codec.encode_arguments(types, [None, None, None, None])
    assert encoded == b"\x00\x00" + b"\x00" + b"\x00" * 4 + b"\x00" * 4


def test_decode_arguments_from_offset() -> None:
    """decode_arguments starts reading at *pos*."""
    encoded = b"junk" + _codec.encode_arguments(ACK, [7, True])
    assert _codec.decode_arguments(ACK, encoded, 4) == (7, True)


def test_wrong_argument_count_raises_type_error() -> None:
    """Encoding fewer values than types is a TypeError."""
    with pytest.raises(TypeError):
        _codec.encode_arguments(ACK, [1])


def test_truncated_arguments_raise_decode_error() -> None:
    """Arguments cut short raise DecodeError."""
    encoded = _codec.encode_arguments(DELIVER, ["ctag", 9, True, "ex", "rk"])
    for cut in range(len(encoded)):
        with pytest.raises(DecodeError):
            _codec.decode_arguments(DELIVER, encoded[:cut])


# --- content header properties -----------------------------------------------------------


ALL_PROPS = {
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "headers": {"x-a": [1, "b"], "x-n": None, "x-t": {"deep": 1.5}},
    "delivery_mode": 2,
    "priority": 9,
    "correlation_id": "corr-1",
    "reply_to": "amq.rabbitmq.reply-to",
    "expiration": "60000",
    "message_id": "m-1",
    "timestamp": 1_700_000_000,
    "type": "call",
    "user_id": "guest",
    "app_id": "txcallme",
    "cluster_id": "c",
}


def test_properties_round_trip_all_fields(props_fields: Any) -> None:
    """All fourteen basic properties encode and decode back unchanged."""
    assert [name for name, _ in props_fields] == list(ALL_PROPS)
    encoded = _properties.encode_properties(props_fields, ALL_PROPS)
    assert _properties.decode_properties(props_fields, _codec.Reader(encoded)) == ALL_PROPS


@pytest.mark.parametrize(
    "props",
    [{}, {"reply_to": "q"}, {"delivery_mode": 1, "app_id": "a"}, {"cluster_id": "only-last"}],
)
def test_properties_round_trip_subsets(props_fields: Any, props: dict[str, Any]) -> None:
    """Any subset of properties round-trips and absent ones stay absent."""
    encoded = _properties.encode_properties(props_fields, props)
    assert _properties.decode_properties(props_fields, _codec.Reader(encoded)) == props


def test_property_flags_bit_order(props_fields: Any) -> None:
    """content-type is the top flag bit and the flags word has no continuation bit."""
    assert _properties.encode_properties(props_fields, {"content_type": "a"}) == b"\x80\x00\x01a"
    assert _properties.encode_properties(props_fields, {}) == b"\x00\x00"


def test_more_than_fifteen_properties_use_a_continuation_word() -> None:
    """A sixteenth property goes into a second flags word, flagged by bit 0 of the first."""
    fields = [(f"p{i}", "octet") for i in range(16)]
    encoded = _properties.encode_properties(fields, {"p0": 1, "p15": 2})
    assert encoded == b"\x80\x01" + b"\x80\x00" + b"\x01\x02"
    assert _properties.decode_properties(fields, _codec.Reader(encoded)) == {"p0": 1, "p15": 2}


def test_truncated_properties_raise_decode_error(props_fields: Any) -> None:
    """Properties cut short raise DecodeError."""
    encoded = _properties.encode_properties(props_fields, ALL_PROPS)
    for cut in range(len(encoded)):
        with pytest.raises(DecodeError):
            _properties.decode_properties(props_fields, _codec.Reader(encoded[:cut]))


def test_content_header_decodes(props_fields: Any) -> None:
    """decode_content_header returns class id, body size and properties."""
    payload = struct.pack(">HHQ", 60, 0, 12345) + _properties.encode_properties(
        props_fields, {"correlation_id": "c"}
    )
    assert _frames.decode_content_header(payload, props_fields) == (
        60,
        12345,
        {"correlation_id": "c"},
    )
    assert _frames.decode_content_header_size(payload) == (60, 12345)


def test_content_header_size_survives_bad_properties(props_fields: Any) -> None:
    """The body size is readable even when the properties are garbage."""
    payload = struct.pack(">HHQ", 60, 0, 7) + b"\xff\xff"
    with pytest.raises(DecodeError):
        _frames.decode_content_header(payload, props_fields)
    assert _frames.decode_content_header_size(payload) == (60, 7)


# --- frames -----------------------------------------------------------------------------


def test_frame_layout() -> None:
    """A frame is type, channel, size, payload and the 0xCE end octet."""
    assert _frames.frame(3, 5, b"ab") == b"\x03\x00\x05\x00\x00\x00\x02ab\xce"


def test_content_frames_split_large_body() -> None:
    """A body larger than frame_max goes out as several body frames that join back to it."""
    frame_max = 4096
    body = bytes(range(256)) * 40  # 10240 bytes: three body frames
    data = _frames.content_frames(7, 60, body, b"\x00\x00", frame_max)
    frames = []
    pos = 0
    while pos < len(data):
        found = _frames.split_frame(data, pos)
        assert found is not None
        kind, channel, start, end = found
        assert channel == 7
        assert end + 1 - pos <= frame_max
        frames.append((kind, data[start:end]))
        pos = end + 1
    assert [kind for kind, _ in frames] == [2, 3, 3, 3]
    assert _frames.decode_content_header_size(frames[0][1]) == (60, len(body))
    assert len(frames[1][1]) == frame_max - 8
    assert b"".join(payload for _, payload in frames[1:]) == body


@pytest.mark.parametrize("size", [0, 1, 4088, 4089])
def test_content_frames_boundaries(size: int) -> None:
    """No body frame for an empty body; one frame up to frame_max - 8 bytes, then two."""
    data = _frames.content_frames(1, 60, b"x" * size, b"\x00\x00", 4096)
    header_len = 7 + 14 + 1
    expected_frames = 0 if size == 0 else (1 if size <= 4088 else 2)
    assert len(data) == header_len + size + 8 * expected_frames


def test_content_frames_never_drop_the_body_when_frame_max_is_zero() -> None:
    """frame_max 0 ("no limit" in AMQP) either sends the body or is refused, never drops it."""
    body = b"abc"
    try:
        data = _frames.content_frames(1, 60, body, b"\x00\x00", 0)
    except ValueError:
        return
    head = _frames.split_frame(data, 0)
    assert head is not None
    rest = data[head[3] + 1 :]
    assert rest == _frames.frame(3, 1, body)


def test_split_frame_partial_input_returns_none() -> None:
    """split_frame waits for a whole frame: every proper prefix gives None."""
    whole = _frames.frame(1, 2, b"payload")
    for cut in range(len(whole)):
        assert _frames.split_frame(whole[:cut], 0) is None
    assert _frames.split_frame(whole, 0) == (1, 2, 7, 7 + len(b"payload"))


def test_split_frame_at_offset_in_bytearray() -> None:
    """split_frame reads a frame at any position of a bytearray buffer."""
    first = _frames.frame(8, 0, b"")
    buffer = bytearray(first + _frames.frame(3, 9, b"abc"))
    assert _frames.split_frame(buffer, 0) == (8, 0, 7, 7)
    assert _frames.split_frame(buffer, len(first)) == (3, 9, len(first) + 7, len(first) + 10)


def test_split_frame_bad_end_octet_raises_decode_error() -> None:
    """A frame whose end octet is not 0xCE is a DecodeError."""
    bad = _frames.frame(1, 0, b"abc")[:-1] + b"\x00"
    with pytest.raises(DecodeError):
        _frames.split_frame(bad, 0)


def test_decode_method_head() -> None:
    """decode_method_head returns (class id, method id) and refuses short payloads."""
    assert _frames.decode_method_head(b"\x00\x3c\x00\x28rest") == (60, 40)
    with pytest.raises(DecodeError):
        _frames.decode_method_head(b"\x00\x3c\x00")


# --- the bytes on the wire, pinned against pamqp -----------------------------------------


def test_basic_publish_frame_matches_pamqp() -> None:
    """basic.publish with mandatory set is byte-for-byte what pamqp sends."""
    ours = _frames.method_frame(
        1, 60, 40, _codec.encode_arguments(PUBLISH, [0, "x", "k", True, False])
    )
    theirs = pframe.marshal(
        commands.Basic.Publish(exchange="x", routing_key="k", mandatory=True), 1
    )
    assert ours == theirs


def test_basic_publish_immediate_bit_matches_pamqp() -> None:
    """The second publish bit (immediate) lands in the same octet as pamqp puts it."""
    ours = _frames.method_frame(
        2, 60, 40, _codec.encode_arguments(PUBLISH, [0, "", "rk", False, True])
    )
    theirs = pframe.marshal(commands.Basic.Publish(routing_key="rk", immediate=True), 2)
    assert ours == theirs


@pytest.mark.parametrize("multiple", [False, True])
def test_basic_ack_frame_matches_pamqp(multiple: bool) -> None:
    """basic.ack is byte-for-byte what pamqp sends."""
    ours = _frames.method_frame(3, 60, 80, _codec.encode_arguments(ACK, [2**40 + 1, multiple]))
    theirs = pframe.marshal(commands.Basic.Ack(delivery_tag=2**40 + 1, multiple=multiple), 3)
    assert ours == theirs


def test_basic_consume_frame_matches_pamqp() -> None:
    """basic.consume, with four bits in a row and an arguments table, matches pamqp."""
    types = ("short", "shortstr", "shortstr", "bit", "bit", "bit", "bit", "table")
    args = [0, "q", "ctag", False, True, True, False, {"x-priority": "high"}]
    ours = _frames.method_frame(4, 60, 20, _codec.encode_arguments(types, args))
    theirs = pframe.marshal(
        commands.Basic.Consume(
            queue="q",
            consumer_tag="ctag",
            no_ack=True,
            exclusive=True,
            arguments={"x-priority": "high"},
        ),
        4,
    )
    assert ours == theirs


def test_content_header_matches_pamqp(props_fields: Any) -> None:
    """A content header with many properties is byte-for-byte what pamqp sends."""
    stamp = datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    body_size = 70000
    ours_props = {
        "content_type": "application/json",
        "headers": {"a": "x", "b": True, "c": {"d": None}, "e": ["f"]},
        "delivery_mode": 2,
        "priority": 3,
        "correlation_id": "abc",
        "reply_to": "replies",
        "expiration": "1000",
        "message_id": "mid",
        "timestamp": int(stamp.timestamp()),
        "type": "call",
        "user_id": "guest",
        "app_id": "app",
    }
    ours = _frames.frame(
        2,
        5,
        struct.pack(">HHQ", 60, 0, body_size)
        + _properties.encode_properties(props_fields, ours_props),
    )
    theirs_props = commands.Basic.Properties(
        content_type="application/json",
        headers={"a": "x", "b": True, "c": {"d": None}, "e": ["f"]},
        delivery_mode=2,
        priority=3,
        correlation_id="abc",
        reply_to="replies",
        expiration="1000",
        message_id="mid",
        timestamp=stamp,
        message_type="call",
        user_id="guest",
        app_id="app",
    )
    theirs = pframe.marshal(pheader.ContentHeader(0, body_size, theirs_props), 5)
    assert ours == theirs


def test_content_frames_match_pamqp(props_fields: Any) -> None:
    """Header plus body frames for a small body match pamqp's header and body frames."""
    body = b"hello \xe2\x98\x83"
    ours = _frames.content_frames(
        1, 60, body, _properties.encode_properties(props_fields, {"reply_to": "r"}), 131072
    )
    theirs = pframe.marshal(
        pheader.ContentHeader(0, len(body), commands.Basic.Properties(reply_to="r")), 1
    ) + pframe.marshal(pbody.ContentBody(body), 1)
    assert ours == theirs


def test_decode_pamqp_basic_deliver() -> None:
    """A basic.deliver marshalled by pamqp decodes to its fields."""
    data = pframe.marshal(
        commands.Basic.Deliver(
            consumer_tag="ctag",
            delivery_tag=2**33,
            redelivered=True,
            exchange="ex",
            routing_key="rk",
        ),
        6,
    )
    kind, channel, start, end = _frames.split_frame(data, 0) or (0, 0, 0, 0)
    assert (kind, channel, end + 1) == (1, 6, len(data))
    payload = data[start:end]
    assert _frames.decode_method_head(payload) == (60, 60)
    assert _codec.decode_arguments(DELIVER, payload, 4) == ("ctag", 2**33, True, "ex", "rk")


def test_decode_pamqp_content_header(props_fields: Any) -> None:
    """A content header marshalled by pamqp decodes to the same properties."""
    data = pframe.marshal(
        pheader.ContentHeader(
            0,
            42,
            commands.Basic.Properties(
                content_type="text/plain",
                correlation_id="c",
                delivery_mode=1,
                headers={"n": 300, "s": "v"},
                timestamp=datetime.datetime(2001, 9, 9, 1, 46, 40, tzinfo=UTC),
            ),
        ),
        1,
    )
    found = _frames.split_frame(data, 0)
    assert found is not None
    class_id, size, props = _frames.decode_content_header(data[found[2] : found[3]], props_fields)
    assert (class_id, size) == (60, 42)
    assert props == {
        "content_type": "text/plain",
        "correlation_id": "c",
        "delivery_mode": 1,
        "headers": {"n": 300, "s": "v"},
        "timestamp": 1_000_000_000,
    }


PAMQP_TABLE = {
    "array": [1, -200, 70000, 2**40, "s", True, None, [1, [2]], {"in": "array"}],
    "bool_t": True,
    "bool_f": False,
    "bytes": bytearray(b"\x00\x01\xff"),
    "decimal": decimal.Decimal("-12.345"),
    "decimal_int": decimal.Decimal("7"),
    "double": 2.5,
    "ints": {"b": -5, "s": -300, "u": 40000, "I": -70000, "i": 3_000_000_000, "l": -(2**40)},
    "nested": {"a": {"b": {"c": ["deep"]}}},
    "string": "text \u00fc",
    "timestamp": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    "void": None,
    "empty_table": {},
    "empty_array": [],
}


def test_decode_pamqp_field_table() -> None:
    """A field table pamqp encodes, with every type it uses, decodes to the same values."""
    encoded = pencode.field_table(PAMQP_TABLE)
    expected = dict(PAMQP_TABLE, bytes=b"\x00\x01\xff")
    assert _codec.decode_table(encoded) == expected


def test_decode_pamqp_integer_type_letters() -> None:
    """pamqp's smallest-fit integer letters (b s u I i l) all decode to the int."""
    for value in (-5, -300, 40000, -70000, 3_000_000_000, -(2**40)):
        letter = pencode.table_integer(value)[:1]
        assert _codec.decode_table(pencode.field_table({"v": value})) == {"v": value}, letter


def test_decode_pamqp_float() -> None:
    """pamqp's 'f' (32-bit float) decodes to the same float."""
    assert _codec.decode_table(pencode.field_table({"f": 0.75})) == {"f": 0.75}


def test_our_table_decodes_in_pamqp() -> None:
    """pamqp decodes our field tables to the same values."""
    from pamqp import decode as pdecode

    table = {
        "s": "x",
        "i": -7,
        "l": 2**40,
        "d": 0.5,
        "t": True,
        "a": ["y", 1],
        "f": {"g": None},
        "D": decimal.Decimal("1.25"),
        "T": datetime.datetime(2020, 5, 6, 7, 8, 9, tzinfo=UTC),
        "x": b"raw",
    }
    consumed, decoded = pdecode.field_table(_codec.encode_table(table))
    assert consumed == len(_codec.encode_table(table))
    assert decoded == dict(table, x=bytearray(b"raw"))
