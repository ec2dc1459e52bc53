"""How call arguments and results become message bodies.

JSON is the default and the only format a server accepts unless configured
otherwise. Pickle exists only as an explicit opt-in for trusted deployments:
unpickling data from the broker lets anyone who can publish run code.
"""

from __future__ import annotations

import gc
import json
import pickle
import sys
from itertools import compress, repeat
from math import isfinite
from operator import is_
from typing import Any, Protocol, runtime_checkable

from txcallme.errors import SerializationError

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the fallback is tested
    _orjson = None  # type: ignore[assignment]

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


class JSONSerializer:
    """UTF-8 JSON, strict: no NaN/Infinity, bounded nesting.

    Encoded and decoded by orjson when it is installed (*fast* ``None``, the
    default; ``True`` requires it, ``False`` uses only the standard library),
    with exactly the standard library's semantics either way: whatever orjson
    would encode or decode differently (integers beyond 64 bits, lone
    surrogates, NaN and infinities, non-string keys, types other than the
    JSON ones and their exact Python counterparts) goes through :mod:`json`.
    """

    content_type = "application/json"

    def __init__(self, max_depth: int = MAX_JSON_DEPTH, *, fast: bool | None = None) -> None:
        if fast and _orjson is None:
            raise SerializationError("JSONSerializer(fast=True) needs orjson, which is not "
                                     "installed")
        self.max_depth = max_depth
        self.fast = _orjson is not None if fast is None else fast
        self._encoder = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )

    @property
    def implementation(self) -> str:
        """``"orjson"`` or ``"json"``: the library that does the common case."""
        return "orjson" if self.fast else "json"

    def dumps(self, value: Any) -> bytes:
        if self.fast:
            assert _orjson is not None
            try:
                data = _orjson.dumps(value, option=_ORJSON_OPTIONS)
            except _orjson.JSONEncodeError:
                pass  # not plain JSON for orjson: the standard library decides
            else:
                if _plain(value, data):
                    return data
        try:
            return self._encoder.encode(value).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as e:
            raise SerializationError(f"cannot encode as JSON: {e}") from None

    def loads(self, data: bytes) -> Any:
        if self.fast:
            assert _orjson is not None
            try:
                value = _orjson.loads(data)
            except _orjson.JSONDecodeError:
                pass  # the standard library decides, and gives its own error
            else:
                verdict: str | None
                if len(data) <= _SMALL:  # a small body: look at its bytes
                    marks = data.translate(_MARKS)
                    if _LONG_RUN in marks:
                        verdict = _BIG_INT
                    elif marks.count(b"[") <= self.max_depth:
                        verdict = _OK
                    else:
                        verdict = _DEEP if _deeper_than(data, self.max_depth) else _OK
                else:  # a large one: walk the value, unless it has many small parts
                    verdict = _check_large(value, data, self.max_depth)
                    if verdict is None:
                        if _long_digit_run(data):
                            verdict = _BIG_INT
                        else:
                            verdict = _DEEP if _deeper_than(data, self.max_depth) else _OK
                if verdict is _OK:
                    return value
                if verdict is _DEEP:
                    raise SerializationError(f"JSON nested deeper than {self.max_depth} levels")
                # maybe an integer beyond 64 bits, which orjson reads as a float
        return self._loads_stdlib(data)

    def _loads_stdlib(self, data: bytes) -> Any:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SerializationError(f"body is not UTF-8: {e}") from None
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            raise SerializationError(f"JSON nested deeper than {self.max_depth} levels") from None
        except ValueError as e:
            raise SerializationError(f"invalid JSON: {e}") from None
        if _deeper_than(data, self.max_depth):
            raise SerializationError(f"JSON nested deeper than {self.max_depth} levels")
        return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# -- what orjson may do: every check below is a few passes of C code ----------------------

#: subclasses (str, int, dict, list), dataclasses and datetimes raise instead of
#: being encoded: the standard library refuses or encodes them its own way
_ORJSON_OPTIONS = 0 if _orjson is None else (
    _orjson.OPT_PASSTHROUGH_SUBCLASS | _orjson.OPT_PASSTHROUGH_DATACLASS
    | _orjson.OPT_PASSTHROUGH_DATETIME)
_PLAIN = frozenset({dict, list, tuple, str, int, float, bool, type(None)})
_CONTAINERS = frozenset({dict, list, tuple})


def _children_portable(level: list[Any]) -> list[Any]:
    out: list[Any] = []
    for node in level:
        if type(node) is dict:
            out.extend(node.values())
        elif type(node) in _CONTAINERS:
            out.extend(node)
    return out


def _children_cpython(level: list[Any]) -> list[Any]:
    # tp_traverse of list, tuple and dict visits every item or value (and the keys
    # of dicts with keys other than exact str); str, int, float, bool and None have
    # none: one C call gives the whole next level
    return gc.get_referents(*level)


_children = _children_cpython if sys.implementation.name == "cpython" else _children_portable


def _floats(level: list[Any]) -> Any:
    return compress(level, map(is_, map(type, level), repeat(float)))


def _plain(value: Any, data: bytes) -> bool:
    """Is *value* made only of exact JSON types and finite floats? *data* is what
    orjson made of it.

    orjson also encodes enums, UUIDs and its Fragment, and NaN as null, all of
    which the standard library refuses. *value* is known to be acyclic (orjson
    encoded it), so the walk ends; it goes level by level, in C.
    """
    level = [value]
    nulls: bool | None = None  # does data contain null (as NaN and infinities become)?
    while True:
        types = set(map(type, level))
        if not types <= _PLAIN:
            return False
        if float in types:
            if nulls is None:
                nulls = b"null" in data
            if nulls and not all(map(isfinite, _floats(level))):
                return False
        if types.isdisjoint(_CONTAINERS):
            return True  # scalars only: nothing below
        level = _children(level)  # the containers' items

_OK, _DEEP, _BIG_INT = "ok", "deep", "big int"
_TWO_63 = 2.0 ** 63


def _check_decoded(value: Any, budget: int, limit: int) -> str | None:
    """Walk what orjson decoded, level by level in C: too deep, a float that may
    have been an integer beyond 64 bits (orjson reads those as floats), or fine;
    None as soon as the walk would visit more than *budget* values."""
    level = [value]
    depth = 0
    while True:
        types = set(map(type, level))
        if float in types and max(map(abs, _floats(level))) >= _TWO_63:
            return _BIG_INT
        if _CONTAINERS.isdisjoint(types):
            return _OK
        depth += 1
        if depth > limit:
            return _DEEP
        containers = list(compress(level, map(_CONTAINERS.__contains__, map(type, level))))
        budget -= sum(map(len, containers))
        if budget < 0:
            return None
        level = _children(containers)


def _check_portable(value: Any, data: bytes, limit: int) -> str | None:
    return _check_decoded(value, len(data) >> 4, limit)


def _check_cpython(value: Any, data: bytes, limit: int) -> str | None:
    """Too deep, maybe an integer beyond 64 bits, or fine; None if *value* has so
    many parts that a pass over *data* costs less.

    Nesting comes from a walk by tp_traverse alone, one C call per level and no
    look at types: level i+1 holds the items of level i's containers (the values
    of orjson's dicts, whose keys are all str; scalars have none), so the
    containers of level i are nested i+1 deep, and the first empty level k bounds
    the depth by k. Only when k is limit+1 does level k-1 decide, by whether it
    holds a container (an empty one).
    """
    levels = [[value]]
    level = levels[0]
    count = 0
    budget = len(data) >> 3  # a walk costs about as much per value as 8 bytes of the bytes pass
    for _ in range(limit + 1):
        level = gc.get_referents(*level)
        if not level:
            break
        count += len(level)
        if count > budget:
            return None
        levels.append(level)
    else:
        return _DEEP  # level limit+1 is not empty: a container below level limit's
    if len(levels) == limit + 1 and not _CONTAINERS.isdisjoint(map(type, levels[-1])):
        return _DEEP
    if count > len(data) >> 6:  # many values: their digits, in the bytes
        return _BIG_INT if _long_digit_run(data) else _OK
    for level in levels:
        if float in set(map(type, level)) and max(map(abs, _floats(level))) >= _TWO_63:
            return _BIG_INT
    return _OK


_check_large = _check_cpython if sys.implementation.name == "cpython" else _check_portable


#: bodies up to this size are checked on their bytes, larger ones on the decoded value
_SMALL = 2048
#: digits as 0, braces as brackets: 19 digits in a row are the only way to write an
#: integer beyond 64 bits (long numbers in strings also match, and only cost the slower
#: path); more brackets than the depth limit call for a closer look at nesting
_MARKS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x5B if i == 0x7B else i for i in range(256))
_LONG_RUN = b"0" * 19
#: 19 digits in a row cover at least 3 consecutive bytes of data[::6]
_SAMPLE_STEP = 6
_SAMPLE_RUN = b"0" * (19 // _SAMPLE_STEP)


def _long_digit_run(data: bytes) -> bool:
    """Are there 19 digits in a row in *data*? One byte in six first: where no three
    sampled bytes in a row are digits, there are none."""
    if _SAMPLE_RUN not in data[::_SAMPLE_STEP].translate(_MARKS):
        return False
    return _LONG_RUN in data.translate(_MARKS)


#: keep quotes and brackets, braces as brackets
_STRUCTURE = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(i for i in range(256) if i not in b'"[]{}')


def _deeper_than(data: bytes, limit: int) -> bool:
    """Does valid JSON *data* nest containers deeper than *limit*? (C passes only.)"""
    if b"\\" in data:
        # escapes are read left to right: drop escaped backslashes, then escaped quotes;
        # every quote left delimits a string
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    shape = data.translate(_STRUCTURE, _NOT_STRUCTURE)
    if shape.count(b"[") <= limit:
        return False
    quotes = shape.count(b'"')
    if quotes == 2 * shape.count(b'""'):
        # every run of quotes between two brackets has an even length: every bracket
        # has an even number of quotes before it, so none is inside a string
        shape = shape.translate(None, b'"')
    else:
        # two quotes in a row have no bracket between them: dropping them removes a
        # string without brackets or joins two strings, and leaves every bracket
        # inside or outside; then every other piece between quotes is a string's
        shape = b"".join(shape.replace(b'""', b"").split(b'"')[::2])
    if b"[" * (limit + 1) in shape:
        return True
    for _ in range(limit + 1):  # each pass removes the innermost pairs: one level
        if not shape:
            return False
        shape = shape.replace(b"[]", b"")
    return True


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
