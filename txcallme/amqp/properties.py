"""Content-header properties: flag words and values, from a per-class layout
computed once."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from txcallme.amqp.codec import SIMPLE_DECODERS, SIMPLE_ENCODERS, Reader

_H = struct.Struct(">H")


class _PropertyLayout:
    """Flag bit positions and codecs of one class's properties, computed once."""

    def __init__(self, fields: Sequence[tuple[str, str]]) -> None:
        self.fields = tuple(fields)
        self.words = max(1, -(-len(self.fields) // 15))
        # name -> (word index, bit mask, position, encoder)
        self.by_name = {
            name: (index // 15, 1 << (15 - index % 15), index, SIMPLE_ENCODERS[kind])
            for index, (name, kind) in enumerate(self.fields)
        }
        self.decoders = [(name, Reader.shortstr if kind == "shortstr"
                          else SIMPLE_DECODERS[kind]) for name, kind in self.fields]


_LAYOUTS: dict[int, tuple[Sequence[tuple[str, str]], _PropertyLayout]] = {}


def _layout(fields: Sequence[tuple[str, str]]) -> _PropertyLayout:
    cached = _LAYOUTS.get(id(fields))
    if cached is None or cached[0] is not fields:
        cached = _LAYOUTS[id(fields)] = (fields, _PropertyLayout(fields))
    return cached[1]


def encode_properties(fields: Sequence[tuple[str, str]], properties: dict[str, Any]) -> bytes:
    """Encode property flags and values for *fields* (name, type) in order."""
    layout = _layout(fields)
    by_name = layout.by_name
    words = [0] * layout.words
    present = []
    for name, value in properties.items():
        if value is not None:
            word, mask, position, encoder = by_name[name]
            words[word] |= mask
            present.append((position, encoder(value)))
    present.sort()
    for i in range(layout.words - 1):
        words[i] |= 1  # another flag word follows
    return b"".join(_H.pack(w) for w in words) + b"".join(v for _, v in present)


def decode_properties(fields: Sequence[tuple[str, str]], reader: Reader) -> dict[str, Any]:
    decoders = _layout(fields).decoders
    words = [reader.unpack(_H)]
    while words[-1] & 1:  # all flag words come before the values
        words.append(reader.unpack(_H))
    props: dict[str, Any] = {}
    for index, word in enumerate(words):
        if word & 0xFFFE:
            base = 15 * index
            for bit in range(15):
                if word & (0x8000 >> bit) and base + bit < len(decoders):
                    name, decode = decoders[base + bit]
                    props[name] = decode(reader)
    return props
