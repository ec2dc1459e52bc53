"""AMQP 0-9-1 binary encoding: field values, field tables, method arguments
(content-header properties are in :mod:`txcallme.amqp.properties`, frames in
:mod:`txcallme.amqp.frames`).

Pure functions over ``bytes``; no txamqp here. txamqp 0.8.2's own codec
decodes only four field-table value types (a message from another client with
an array in its headers kills the connection) and encodes only two, so the
connection layer (:mod:`txcallme.amqp.protocol`) uses this module for every frame.

Table values follow RabbitMQ's 0-9-1 type letters (the errata to the spec).
"""

from __future__ import annotations

import calendar
import datetime
import decimal
import struct
from collections.abc import Callable, Sequence
from typing import Any

_B = struct.Struct(">B")
_b = struct.Struct(">b")
_H = struct.Struct(">H")
_h = struct.Struct(">h")
_I = struct.Struct(">I")
_i = struct.Struct(">i")
_Q = struct.Struct(">Q")
_q = struct.Struct(">q")
_f = struct.Struct(">f")
_d = struct.Struct(">d")

#: Most nested tables/arrays accepted when decoding a field table.
MAX_TABLE_DEPTH = 32


class DecodeError(ValueError):
    """Bytes that are not valid AMQP encoding."""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _as_bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogateescape")


# --- field values -----------------------------------------------------------


def encode_shortstr(value: str | bytes) -> bytes:
    raw = _as_bytes(value)
    if len(raw) > 255:
        raise ValueError(f"shortstr longer than 255 bytes: {raw[:40]!r}...")
    return _B.pack(len(raw)) + raw


def encode_longstr(value: str | bytes | dict[str, Any]) -> bytes:
    if isinstance(value, dict):
        return encode_table(value)
    raw = _as_bytes(value)
    return _I.pack(len(raw)) + raw


def _encode_value(value: Any) -> bytes:
    if value is None:
        return b"V"
    if isinstance(value, bool):
        return b"t" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"I" + _i.pack(value)
        return b"l" + _q.pack(value)
    if isinstance(value, float):
        return b"d" + _d.pack(value)
    if isinstance(value, str):
        return b"S" + encode_longstr(value)
    if isinstance(value, (bytes, bytearray)):
        return b"x" + _I.pack(len(value)) + bytes(value)
    if isinstance(value, dict):
        return b"F" + encode_table(value)
    if isinstance(value, (list, tuple)):
        items = b"".join(_encode_value(v) for v in value)
        return b"A" + _I.pack(len(items)) + items
    if isinstance(value, decimal.Decimal):
        sign, digits, exponent = value.as_tuple()
        scale = -int(exponent) if isinstance(exponent, int) and exponent < 0 else 0
        unscaled = int(value.scaleb(scale))
        return b"D" + _B.pack(scale) + _i.pack(unscaled)
    if isinstance(value, datetime.datetime):  # naive means UTC, as pamqp and pika read it
        return b"T" + _Q.pack(calendar.timegm(value.utctimetuple()))
    raise TypeError(f"cannot encode {type(value).__name__} in an AMQP field table")


def encode_table(table: dict[str, Any] | None) -> bytes:
    """Encode a field table; raise TypeError/ValueError for what AMQP cannot carry."""
    if not table:
        return b"\x00\x00\x00\x00"
    try:
        body = b"".join(encode_shortstr(k) + _encode_value(v) for k, v in table.items())
    except struct.error as e:
        raise ValueError(f"value out of range for an AMQP field table: {e}") from None
    return _I.pack(len(body)) + body


class Reader:
    """A cursor over a bytes buffer; every read checks bounds."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int) -> bytes:
        pos = self.pos
        if n < 0 or pos + n > self.end:
            raise DecodeError("truncated data")
        self.pos = pos + n
        return self.data[pos : pos + n]

    def unpack(self, st: struct.Struct) -> Any:
        pos = self.pos
        if pos + st.size > self.end:
            raise DecodeError("truncated data")
        self.pos = pos + st.size
        return st.unpack_from(self.data, pos)[0]

    def shortstr(self) -> str:
        return _text(self.take(self.unpack(_B)))

    def longbytes(self) -> bytes:
        return self.take(self.unpack(_I))

    def table(self, depth: int = 0) -> dict[str, Any]:
        size = self.unpack(_I)
        stop = self.pos + size
        if stop > self.end:
            raise DecodeError("field table longer than its frame")
        result: dict[str, Any] = {}
        while self.pos < stop:
            key = self.shortstr()
            result[key] = self.value(depth)
        if self.pos != stop:
            raise DecodeError("field table overruns its declared size")
        return result

    def array(self, depth: int) -> list[Any]:
        size = self.unpack(_I)
        stop = self.pos + size
        if stop > self.end:
            raise DecodeError("field array longer than its frame")
        items = []
        while self.pos < stop:
            items.append(self.value(depth))
        if self.pos != stop:
            raise DecodeError("field array overruns its declared size")
        return items

    def value(self, depth: int) -> Any:
        kind = self.take(1)
        reader = _VALUE_READERS.get(kind)
        if reader is None:
            raise DecodeError(f"unknown field value type {kind!r}")
        if kind in (b"F", b"A"):
            if depth >= MAX_TABLE_DEPTH:
                raise DecodeError("field table nested too deeply")
            return reader(self, depth + 1)
        return reader(self, depth)


def _longstr_value(r: Reader, depth: int) -> Any:
    raw = r.longbytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _decimal_value(r: Reader, depth: int) -> decimal.Decimal:
    scale = r.unpack(_B)
    return decimal.Decimal(r.unpack(_i)).scaleb(-scale)


def _timestamp_value(r: Reader, depth: int) -> datetime.datetime:
    seconds = r.unpack(_Q)
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise DecodeError(f"timestamp out of range: {seconds}") from None


_VALUE_READERS: dict[bytes, Callable[[Reader, int], Any]] = {
    b"t": lambda r, d: r.unpack(_B) != 0,
    b"b": lambda r, d: r.unpack(_b),
    b"B": lambda r, d: r.unpack(_B),
    b"s": lambda r, d: r.unpack(_h),
    b"u": lambda r, d: r.unpack(_H),
    b"I": lambda r, d: r.unpack(_i),
    b"i": lambda r, d: r.unpack(_I),
    b"L": lambda r, d: r.unpack(_q),
    b"l": lambda r, d: r.unpack(_q),
    b"f": lambda r, d: r.unpack(_f),
    b"d": lambda r, d: r.unpack(_d),
    b"D": _decimal_value,
    b"S": _longstr_value,
    b"x": lambda r, d: r.longbytes(),
    b"A": lambda r, d: r.array(d),
    b"T": _timestamp_value,
    b"F": lambda r, d: r.table(d),
    b"V": lambda r, d: None,
}


def decode_table(data: bytes) -> dict[str, Any]:
    """Decode one field table that fills *data* (length prefix included)."""
    reader = Reader(data)
    table = reader.table()
    if reader.pos != len(data):
        raise DecodeError("trailing bytes after field table")
    return table


# --- method arguments -------------------------------------------------------

SIMPLE_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "octet": _B.pack,
    "short": _H.pack,
    "long": _I.pack,
    "longlong": _Q.pack,
    "timestamp": _Q.pack,
    "shortstr": encode_shortstr,
    "longstr": encode_longstr,
    "table": encode_table,
}

SIMPLE_DECODERS: dict[str, Callable[[Reader], Any]] = {
    "octet": lambda r: r.unpack(_B),
    "short": lambda r: r.unpack(_H),
    "long": lambda r: r.unpack(_I),
    "longlong": lambda r: r.unpack(_Q),
    "timestamp": lambda r: r.unpack(_Q),
    "shortstr": Reader.shortstr,
    "longstr": Reader.longbytes,
    "table": Reader.table,
}


def encode_arguments(types: Sequence[str], values: Sequence[Any]) -> bytes:
    """Encode method arguments; consecutive bits pack into octets, LSB first."""
    if len(types) != len(values):
        raise TypeError(f"expected {len(types)} arguments, got {len(values)}")
    out: list[bytes] = []
    bits = 0
    nbits = 0
    for kind, value in zip(types, values, strict=True):
        if kind == "bit":
            if nbits == 8:
                out.append(_B.pack(bits))
                bits = nbits = 0
            if value:
                bits |= 1 << nbits
            nbits += 1
            continue
        if nbits:
            out.append(_B.pack(bits))
            bits = nbits = 0
        encoder = SIMPLE_ENCODERS[kind]
        out.append(encoder(value if value is not None else _default(kind)))
    if nbits:
        out.append(_B.pack(bits))
    return b"".join(out)


def _default(kind: str) -> Any:
    if kind in ("shortstr", "longstr"):
        return b""
    if kind == "table":
        return {}
    return 0


def decode_arguments(types: Sequence[str], data: bytes, pos: int = 0) -> tuple[Any, ...]:
    reader = Reader(data, pos)
    values: list[Any] = []
    bits = 0
    nbits = 8
    for kind in types:
        if kind == "bit":
            if nbits == 8:
                bits = reader.unpack(_B)
                nbits = 0
            values.append(bool(bits >> nbits & 1))
            nbits += 1
            continue
        nbits = 8
        values.append(SIMPLE_DECODERS[kind](reader))
    return tuple(values)
