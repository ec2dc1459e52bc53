"""How call arguments and results become message bodies.

JSON is the default and the only format a server accepts unless configured
otherwise. Pickle exists only as an explicit opt-in for trusted deployments:
unpickling data from the broker lets anyone who can publish run code.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol, runtime_checkable

from txcallme.errors import SerializationError

#: Deepest nesting of containers a JSON body may have before it is refused.
MAX_JSON_DEPTH = 64


@runtime_checkable
class Serializer(Protocol):
    """Turns Python values into bytes and back, under one content type."""

    content_type: str

    def dumps(self, value: Any) -> bytes:
        """Encode *value*; raise :class:`SerializationError` if it cannot be."""

    def loads(self, data: bytes) -> Any:
        """Decode *data*; raise :class:`SerializationError` if it is not valid."""


def _nesting_depth_exceeds(data: bytes, limit: int) -> bool:
    """Cheap pre-scan: does bracket nesting (outside strings) go deeper than *limit*?"""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    depth = 0
    in_string = False
    escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class JSONSerializer:
    """UTF-8 JSON, strict: no NaN/Infinity, bounded nesting."""

    content_type = "application/json"

    def __init__(self, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.max_depth = max_depth
        self._encoder = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )

    def dumps(self, value: Any) -> bytes:
        try:
            return self._encoder.encode(value).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as e:
            raise SerializationError(f"cannot encode as JSON: {e}") from None

    def loads(self, data: bytes) -> Any:
        if _nesting_depth_exceeds(data, self.max_depth):
            raise SerializationError(f"JSON nested deeper than {self.max_depth} levels")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SerializationError(f"body is not UTF-8: {e}") from None
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise SerializationError(f"invalid JSON: {e}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class PickleSerializer:
    """Pickle. Only for fully trusted brokers and users: decoding runs code."""

    content_type = "application/x-python-pickle"

    def dumps(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            raise SerializationError(f"cannot pickle: {e}") from None

    def loads(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)  # noqa: S301 - explicit opt-in only
        except Exception as e:
            raise SerializationError(f"cannot unpickle: {e}") from None


JSON = JSONSerializer()
