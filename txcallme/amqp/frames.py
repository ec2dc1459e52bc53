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
    reader = Reader(payload)
    class_id = reader.unpack(_H)
    reader.unpack(_H)  # weight, always 0
    size = reader.unpack(_Q)
    return class_id, size, decode_properties(fields, reader)


def decode_content_header_size(payload: bytes) -> tuple[int, int]:
    """(class id, body size): what is needed to keep framing when properties are bad."""
    reader = Reader(payload)
    class_id = reader.unpack(_H)
    reader.unpack(_H)
    return class_id, reader.unpack(_Q)
