"""AMQP 0-9-1 frames: building them, finding them in a byte stream, and reading
method and content-header frame payloads."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from txcallme.amqp.codec import DecodeError, Reader
from txcallme.amqp.properties import decode_properties

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 206
FRAME_END_BYTE = b"\xce"

_H = struct.Struct(">H")
_Q = struct.Struct(">Q")
_QB = struct.Struct(">QB")
_FRAME_HEAD = struct.Struct(">BHI")
_METHOD_HEAD = struct.Struct(">HH")
CONTENT_HEAD = struct.Struct(">HHQ")



def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(kind, channel, len(payload)) + payload + FRAME_END_BYTE


def method_frame(channel: int, class_id: int, method_id: int, arguments: bytes) -> bytes:
    return frame(FRAME_METHOD, channel, _METHOD_HEAD.pack(class_id, method_id) + arguments)


def content_frames(
    channel: int, class_id: int, body: bytes, properties: bytes, frame_max: int
) -> bytes:
    """Header frame plus body frames for *body*, split to fit *frame_max*."""
    head = frame(
        FRAME_HEADER, channel, CONTENT_HEAD.pack(class_id, 0, len(body)) + properties
    )
    if not body:
        return head
    chunk = frame_max - 8 if frame_max > 8 else len(body)  # frame_max 0: no limit
    if len(body) <= chunk:
        return head + frame(FRAME_BODY, channel, body)
    parts = [head]
    for start in range(0, len(body), chunk):
        parts.append(frame(FRAME_BODY, channel, body[start : start + chunk]))
    return b"".join(parts)


def content_parts(
    channel: int, class_id: int, body: bytes, properties: bytes, frame_max: int
) -> list[bytes]:
    """Like :func:`content_frames`, as pieces for ``writeSequence``: the body is
    not copied when it fits one frame."""
    size = len(body)
    parts = [frame(FRAME_HEADER, channel, CONTENT_HEAD.pack(class_id, 0, size) + properties)]
    if not size:
        return parts
    chunk = frame_max - 8 if frame_max > 8 else size  # frame_max 0: no limit
    if size <= chunk:
        parts += (_FRAME_HEAD.pack(FRAME_BODY, channel, size), body, FRAME_END_BYTE)
        return parts
    for start in range(0, size, chunk):
        piece = body[start : start + chunk]
        parts += (_FRAME_HEAD.pack(FRAME_BODY, channel, len(piece)), piece, FRAME_END_BYTE)
    return parts


def decode_deliver(payload: bytes) -> tuple[str, int, bool, str, str]:
    """(consumer tag, delivery tag, redelivered, exchange, routing key) of a
    basic.deliver method frame payload, read without the generic decoder."""
    try:
        n = payload[4]
        pos = 5 + n
        consumer_tag = payload[5:pos].decode("utf-8", "surrogateescape")
        delivery_tag, flags = _QB.unpack_from(payload, pos)
        pos += 9
        n = payload[pos]
        exchange = payload[pos + 1 : pos + 1 + n].decode("utf-8", "surrogateescape")
        pos += 1 + n
        n = payload[pos]
        routing_key = payload[pos + 1 : pos + 1 + n].decode("utf-8", "surrogateescape")
    except (IndexError, struct.error):
        raise DecodeError("truncated basic.deliver") from None
    if pos + 1 + n > len(payload):
        raise DecodeError("truncated basic.deliver")
    return consumer_tag, delivery_tag, bool(flags & 1), exchange, routing_key


def decode_ack(payload: bytes) -> tuple[int, bool]:
    """(delivery tag, multiple) of a basic.ack or basic.nack method frame payload."""
    if len(payload) < 13:
        raise DecodeError("truncated basic.ack")
    tag, flags = _QB.unpack_from(payload, 4)
    return tag, bool(flags & 1)


def split_frame(buffer: bytes | bytearray, pos: int) -> tuple[int, int, int, int] | None:
    """If a whole frame starts at *pos*: (type, channel, payload start, payload end)."""
    if len(buffer) - pos < 7:
        return None
    kind, channel, size = _FRAME_HEAD.unpack_from(buffer, pos)
    end = pos + 7 + size
    if len(buffer) < end + 1:
        return None
    if buffer[end] != FRAME_END:
        raise DecodeError(f"frame end octet is {buffer[end]!r}, not {FRAME_END}")
    return kind, channel, pos + 7, end


def decode_method_head(payload: bytes) -> tuple[int, int]:
    if len(payload) < 4:
        raise DecodeError("method frame too short")
    return _METHOD_HEAD.unpack_from(payload, 0)


def decode_content_header(
    payload: bytes, fields: Sequence[tuple[str, str]]
) -> tuple[int, int, dict[str, Any]]:
    """(class id, body size, properties) of a content header frame payload."""
    if len(payload) < 14:
        raise DecodeError("content header frame too short")
    class_id, _, size = CONTENT_HEAD.unpack_from(payload, 0)  # weight is always 0
    return class_id, size, decode_properties(fields, Reader(payload, CONTENT_HEAD.size))


def decode_content_header_size(payload: bytes) -> tuple[int, int]:
    """(class id, body size): what is needed to keep framing when properties are bad."""
    reader = Reader(payload)
    class_id = reader.unpack(_H)
    reader.unpack(_H)
    return class_id, reader.unpack(_Q)
