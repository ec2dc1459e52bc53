"""Content-header properties: flag words and values, from a per-class layout
computed once.

Both directions cache what repeats from message to message: decoding keeps,
per flag word, the list of properties it announces (only the set bits are
visited); encoding keeps, per set of property names, the flag bytes and the
encoders in wire order, so only the values are encoded per message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from txcallme.amqp.codec import SIMPLE_DECODERS, SIMPLE_ENCODERS, Reader

_H = struct.Struct(">H")
_CACHE_LIMIT = 512

_Decoder = Callable[[Reader], Any]
_Encoder = Callable[[Any], bytes]


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
        #: (word index, flag word) -> [(name, decoder)] for the bits set in it
        self.word_decoders: dict[tuple[int, int], list[tuple[str, _Decoder]]] = {}
        #: tuple of names -> (flag bytes, [(name, encoder)] in wire order)
        self.encoders: dict[tuple[str, ...], tuple[bytes, list[tuple[str, _Encoder]]]] = {}

    def decoders_for(self, index: int, word: int) -> list[tuple[str, _Decoder]]:
        found = self.word_decoders.get((index, word))
        if found is None:
            base = 15 * index
            decoders = self.decoders
            found = [decoders[base + bit] for bit in range(15)
                     if word & (0x8000 >> bit) and base + bit < len(decoders)]
            if len(self.word_decoders) >= _CACHE_LIMIT:
                self.word_decoders.clear()
            self.word_decoders[(index, word)] = found
        return found

    def encoders_for(self, names: tuple[str, ...]) -> tuple[bytes, list[tuple[str, _Encoder]]]:
        found = self.encoders.get(names)
        if found is None:
            by_name = self.by_name
            words = [0] * self.words
            present = []
            for name in names:
                word, mask, position, encoder = by_name[name]  # KeyError: unknown name
                words[word] |= mask
                present.append((position, name, encoder))
            present.sort()
            for i in range(self.words - 1):
                words[i] |= 1  # another flag word follows
            found = (b"".join(_H.pack(w) for w in words),
                     [(name, encoder) for _, name, encoder in present])
            if len(self.encoders) >= _CACHE_LIMIT:
                self.encoders.clear()
            self.encoders[names] = found
        return found


_LAYOUTS: dict[int, tuple[Sequence[tuple[str, str]], _PropertyLayout]] = {}


def _layout(fields: Sequence[tuple[str, str]]) -> _PropertyLayout:
    cached = _LAYOUTS.get(id(fields))
    if cached is None or cached[0] is not fields:
        cached = _LAYOUTS[id(fields)] = (fields, _PropertyLayout(fields))
    return cached[1]


def encode_properties(fields: Sequence[tuple[str, str]], properties: dict[str, Any]) -> bytes:
    """Encode property flags and values for *fields* (name, type) in order.

    Properties whose value is None are left out. Raises KeyError for an unknown
    name, and the encoders' TypeError/ValueError/struct.error for bad values.
    """
    layout = _layout(fields)
    if None in properties.values():
        properties = {k: v for k, v in properties.items() if v is not None}
    flags, encoders = layout.encoders_for(tuple(properties))
    if not encoders:
        return flags
    return flags + b"".join([encode(properties[name]) for name, encode in encoders])


def decode_properties(fields: Sequence[tuple[str, str]], reader: Reader) -> dict[str, Any]:
    layout = _layout(fields)
    word = reader.unpack(_H)
    props: dict[str, Any] = {}
    if not word & 1:  # one flag word: the usual case
        for name, decode in layout.decoders_for(0, word):
            props[name] = decode(reader)
        return props
    words = [word]
    while words[-1] & 1:  # all flag words come before the values
        words.append(reader.unpack(_H))
    for index, word in enumerate(words):
        if word & 0xFFFE:
            for name, decode in layout.decoders_for(index, word & 0xFFFE):
                props[name] = decode(reader)
    return props
