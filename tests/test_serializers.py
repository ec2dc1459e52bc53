"""JSON semantics of txcallme.serializers, pinned for every implementation.

Every test that takes ``ser`` runs twice: against the orjson-backed
JSONSerializer (the default when orjson is installed) and against the
standard-library one (``fast=False``), which is also what runs when orjson is
missing. The differential tests at the end check that the two agree on
arbitrary values and bytes: same bytes' meaning, same errors, same messages.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import json
import math
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txcallme import serializers
from txcallme.errors import SerializationError
from txcallme.serializers import JSON, MAX_JSON_DEPTH, JSONSerializer, PickleSerializer

FAST = JSONSerializer(fast=True)
STDLIB = JSONSerializer(fast=False)


@pytest.fixture(params=[FAST, STDLIB], ids=["orjson", "stdlib"])
def ser(request: pytest.FixtureRequest) -> JSONSerializer:
    """Each JSON implementation in turn."""
    return request.param  # type: ignore[no-any-return]


def _refused(ser: JSONSerializer, data: bytes) -> str:
    """loads(*data*) raises SerializationError (and nothing else); its message."""
    with pytest.raises(SerializationError) as info:
        ser.loads(data)
    return str(info.value)


def _unencodable(ser: JSONSerializer, value: Any) -> str:
    """dumps(*value*) raises SerializationError (and nothing else); its message."""
    with pytest.raises(SerializationError) as info:
        ser.dumps(value)
    return str(info.value)


def _nested(depth: int, inner: str = "1") -> bytes:
    """*depth* containers, alternating arrays and objects, around *inner*."""
    text = inner
    for level in range(depth):
        text = f"[{text}]" if level % 2 else f'{{"k":{text}}}'
    return text.encode()


class Colour(enum.Enum):
    """A plain enum: not JSON for the standard library."""

    RED = 1


class Level(enum.IntEnum):
    """An int enum: an int for the standard library."""

    HIGH = 3


class Tag(str):
    """A str subclass."""


class Count(int):
    """An int subclass."""


class Ratio(float):
    """A float subclass."""


class Ordered(dict):  # type: ignore[type-arg]
    """A dict subclass."""


class Items(list):  # type: ignore[type-arg]
    """A list subclass."""


Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass
class Record:
    """A dataclass: not JSON for the standard library."""

    x: int


# -- implementations -----------------------------------------------------------------


def test_default_is_orjson() -> None:
    """With orjson installed, the default JSON serializer uses it."""
    assert JSON.implementation == "orjson"
    assert JSONSerializer().fast is True


def test_fallback_named() -> None:
    """fast=False is the standard library."""
    assert STDLIB.implementation == "json"


def test_fast_without_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without orjson, the default is the standard library and fast=True is refused."""
    monkeypatch.setattr(serializers, "_orjson", None)
    assert JSONSerializer().implementation == "json"
    with pytest.raises(SerializationError, match="needs orjson"):
        JSONSerializer(fast=True)


# -- encoding --------------------------------------------------------------------------


def test_round_trip(ser: JSONSerializer) -> None:
    """Plain JSON values survive dumps then loads unchanged."""
    value = {"a": [1, -2, 3.5, -0.0, True, False, None, "", "é\u2028\U0001f600"],
             "b": {"c": {}}, "d": [], "e": 2**63, "f": -2**63, "g": 1e-300}
    assert ser.loads(ser.dumps(value)) == value


def test_compact_utf8_output(ser: JSONSerializer) -> None:
    """Output is compact and UTF-8, not ASCII-escaped."""
    assert ser.dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()


def test_control_characters_escaped(ser: JSONSerializer) -> None:
    """Control characters are escaped; the value reads back the same."""
    data = ser.dumps("\x00\x1f\n\"\\")
    assert b"\n" not in data and b"\x00" not in data
    assert json.loads(data) == "\x00\x1f\n\"\\"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_refused(ser: JSONSerializer, bad: float) -> None:
    """NaN and infinities are refused, at the top and nested (also next to nulls)."""
    for value in (bad, [1.5, bad], {"a": None, "b": [{"c": (None, bad)}]}):
        assert "Out of range float values" in _unencodable(ser, value)


def test_non_string_keys(ser: JSONSerializer) -> None:
    """int, float, bool and None keys become strings the way the standard library writes them."""
    value = {7: "a", 2.5: "b", True: "c", None: "d", "e": {3: [4]}}
    assert ser.dumps(value) == b'{"7":"a","2.5":"b","true":"c","null":"d","e":{"3":[4]}}'


def test_bad_keys_refused(ser: JSONSerializer) -> None:
    """Tuple keys and NaN keys are refused."""
    assert "keys must be" in _unencodable(ser, {(1, 2): "x"})
    _unencodable(ser, {math.nan: "x"})


@pytest.mark.parametrize("number", [2**64, -2**63 - 1, 10**30, -10**40, 2**64 - 1])
def test_big_integers_encoded_exactly(ser: JSONSerializer, number: int) -> None:
    """Integers beyond 64 bits are written with every digit."""
    assert ser.dumps([number, {"n": number}]) == f'[{number},{{"n":{number}}}]'.encode()


def test_surrogate_refused_on_encode(ser: JSONSerializer) -> None:
    """A lone surrogate in a str cannot be UTF-8: SerializationError."""
    assert "surrogates not allowed" in _unencodable(ser, {"a": ["x\ud800"]})


@pytest.mark.parametrize("value", [
    object(), {1, 2}, b"bytes", bytearray(b"x"), 1 + 2j, decimal.Decimal("1.5"),
    datetime.datetime(2026, 1, 1), datetime.date(2026, 1, 1), uuid.UUID(int=7), Colour.RED,
    Record(1),
], ids=lambda v: type(v).__name__)
def test_non_json_types_refused(ser: JSONSerializer, value: Any) -> None:
    """Types the standard library does not encode are refused, also deep in a document."""
    assert "is not JSON serializable" in _unencodable(ser, value)
    assert "is not JSON serializable" in _unencodable(
        ser, {"records": [{"id": i, "v": value if i == 7 else i} for i in range(10)]})


def test_subclasses_encoded_like_their_base(ser: JSONSerializer) -> None:
    """Subclasses of str, int, float, dict, list and tuple, and int enums, encode as their base."""
    value = [Tag("t"), Count(3), Ratio(1.5), Ordered(a=1), Items([1]), Point(1, 2), Level.HIGH,
             collections.OrderedDict(b=2)]
    assert ser.dumps(value) == b'["t",3,1.5,{"a":1},[1],[1,2],3,{"b":2}]'


def test_circular_reference_refused(ser: JSONSerializer) -> None:
    """A list that contains itself is refused, not a RecursionError or a hang."""
    loop: list[Any] = [1]
    loop.append(loop)
    assert "Circular reference" in _unencodable(ser, {"a": loop})


def test_deep_value_encodes(ser: JSONSerializer) -> None:
    """Encoding has no depth limit below the interpreter's (300 levels encode)."""
    value: Any = 1
    for _ in range(300):
        value = [value]
    assert ser.dumps(value) == b"[" * 300 + b"1" + b"]" * 300


# -- decoding --------------------------------------------------------------------------


@pytest.mark.parametrize("text", [b"NaN", b"[Infinity]", b'{"a": -Infinity}'])
def test_nan_and_infinity_literals_refused(ser: JSONSerializer, text: bytes) -> None:
    """NaN, Infinity and -Infinity are not JSON."""
    assert "is not valid JSON" in _refused(ser, text)


def test_overflowing_number_reads_as_infinity(ser: JSONSerializer) -> None:
    """A number too large for a float reads as inf, as the standard library reads it."""
    assert ser.loads(b"[1e400, -1e400]") == [math.inf, -math.inf]


@pytest.mark.parametrize("number", [2**64, -2**63 - 1, 10**30, -10**40, 2**64 - 1, -2**63])
def test_big_integers_decoded_exactly(ser: JSONSerializer, number: int) -> None:
    """Integers beyond 64 bits read back as exact ints, alone and among many values."""
    assert ser.loads(str(number).encode()) == number
    value = ser.loads(f'{{"n":[{number}],"long":"{"x" * 5000}"}}'.encode())
    assert value["n"][0] == number and type(value["n"][0]) is int
    many = [{"i": i, "f": 0.5} for i in range(500)] + [{"big": number}]
    assert ser.loads(json.dumps(many).encode()) == many


def test_big_floats_stay_floats(ser: JSONSerializer) -> None:
    """Large float literals stay floats (they look like big integers to orjson's guard)."""
    value = ser.loads(b"[1e19, 9.3e18, 12345678901234567890.0, -1.8446744073709552e19]")
    assert value == [1e19, 9.3e18, 12345678901234567890.0, -1.8446744073709552e19]
    assert all(type(v) is float for v in value)


def test_long_digit_strings(ser: JSONSerializer) -> None:
    """Strings of many digits are strings."""
    assert ser.loads(b'{"card": "12345678901234567890123"}') == {"card": "12345678901234567890123"}


def test_lone_surrogate_escape_decoded(ser: JSONSerializer) -> None:
    """A lone surrogate escape reads as a str with that surrogate; a pair as one character."""
    assert ser.loads(b'["\\ud800", "\\udfff x"]') == ["\ud800", "\udfff x"]
    assert ser.loads(b'"\\ud83d\\ude00"') == "\U0001f600"


def test_encoded_surrogate_bytes_refused(ser: JSONSerializer) -> None:
    """A surrogate encoded directly in the bytes is not UTF-8."""
    assert "not UTF-8" in _refused(ser, b'"\xed\xa0\x80"')


@pytest.mark.parametrize("data", [b'{"method": "\xff\xfe"}', b"\xc3"])
def test_not_utf8(ser: JSONSerializer, data: bytes) -> None:
    """Bytes that are not UTF-8 are refused as such."""
    assert "body is not UTF-8" in _refused(ser, data)


@pytest.mark.parametrize("data", [b"", b"  ", b"{", b"[1,]", b"[1] x", b"01", b'"\x01"',
                                  b"\xef\xbb\xbf[1]", b"{'a': 1}", b"tru"])
def test_invalid_json(ser: JSONSerializer, data: bytes) -> None:
    """Malformed documents are refused with the standard library's message."""
    message = _refused(ser, data)
    assert message.startswith("invalid JSON: ")
    with pytest.raises(ValueError) as stdlib:
        json.loads(data.decode("utf-8"))
    assert message == f"invalid JSON: {stdlib.value}"


def test_duplicate_keys_last_wins(ser: JSONSerializer) -> None:
    """With duplicate keys, the last value wins."""
    assert ser.loads(b'{"a": 1, "a": 2}') == {"a": 2}


def test_numbers(ser: JSONSerializer) -> None:
    """Numbers read as the standard library reads them: int or float, correctly rounded."""
    value = ser.loads(b"[-0, -0.0, 0.1, 1E2, 5e-324, 1.7976931348623157e308, 123]")
    assert [repr(v) for v in value] == ["0", "-0.0", "0.1", "100.0", "5e-324",
                                        "1.7976931348623157e+308", "123"]


# -- nesting ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH])
def test_nesting_up_to_the_limit(ser: JSONSerializer, depth: int) -> None:
    """Containers nested up to the limit decode."""
    assert ser.loads(_nested(depth)) == json.loads(_nested(depth))
    assert ser.loads(b"[" * depth + b"]" * depth) == json.loads(b"[" * depth + b"]" * depth)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100, 1000, 1030, 5000])
def test_nesting_past_the_limit(ser: JSONSerializer, depth: int) -> None:
    """One level more than the limit, or far more (past orjson's own limit), is refused."""
    assert _refused(ser, _nested(depth)) == f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    assert "nested deeper" in _refused(ser, b"[" * depth + b"]" * depth)


def test_hostile_nesting(ser: JSONSerializer) -> None:
    """100,000 unclosed brackets are refused as too deep, not a RecursionError."""
    assert "nested deeper" in _refused(ser, b"[" * 100_000)
    assert "nested deeper" in _refused(ser, b'{"a":' * 100_000)


def test_custom_depth(ser: JSONSerializer) -> None:
    """max_depth sets the limit."""
    three = JSONSerializer(3, fast=ser.fast)
    assert three.loads(b"[[[1]]]") == [[[1]]]
    assert "deeper than 3 levels" in _refused(three, b"[[[[1]]]]")
    assert "deeper than 3 levels" in _refused(three, b'[{"a": 1, "b": [[]]}]')


def test_brackets_in_strings_are_not_nesting(ser: JSONSerializer) -> None:
    """Brackets, quotes and backslashes inside strings do not count as nesting."""
    tricky = ["[" * 100, "{" * 100, '\\"[[[[', '\\\\"', "\\", '"', "]" * 80 + "[" * 80]
    value = [{"s": s, "t": [s]} for s in tricky] * 20
    assert ser.loads(json.dumps(value).encode()) == value
    deep = json.loads(_nested(MAX_JSON_DEPTH - 2, json.dumps(["]]]]", '\\"]]', "[[["])))
    assert ser.loads(json.dumps([deep, deep]).encode()) == [deep, deep]


def test_string_of_brackets(ser: JSONSerializer) -> None:
    """A document that is one string full of brackets is depth 0, whatever the limit."""
    assert ser.loads(json.dumps("[{" * 100).encode()) == "[{" * 100
    assert JSONSerializer(0, fast=ser.fast).loads(b'"{"') == "{"
    assert "deeper than 0 levels" in _refused(JSONSerializer(0, fast=ser.fast), b"[]")


def test_brackets_in_strings_do_not_hide_nesting(ser: JSONSerializer) -> None:
    """Closing brackets inside strings do not hide real nesting past the limit."""
    text = _nested(MAX_JSON_DEPTH + 1, json.dumps("]]]]}}}}" * 50))
    assert "nested deeper" in _refused(ser, text)
    padded = b"[" + b",".join([b'"]]]\\\\"'] * 100 + [text]) + b"]"
    assert "nested deeper" in _refused(ser, padded)


def test_many_shallow_containers(ser: JSONSerializer) -> None:
    """Thousands of containers, none deep, decode."""
    value = [{"id": i, "tags": ["a", {"b": []}]} for i in range(3000)]
    assert ser.loads(json.dumps(value).encode()) == value


# -- the two implementations agree ------------------------------------------------------

_text = st.text(st.characters(codec=None, categories=None), max_size=12) | st.text(
    '[]{}"\\ \u00e9ab', max_size=12)
_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
            | st.floats() | _text)
_keys = _text | st.integers(-5, 5) | st.booleans() | st.none() | st.floats(-2, 2)
_values = st.recursive(
    _scalars,
    lambda inner: (st.lists(inner, max_size=6) | st.tuples(inner, inner)
                   | st.dictionaries(_keys, inner, max_size=6)),
    max_leaves=40)
_exotic = st.sampled_from([Colour.RED, Level.HIGH, uuid.UUID(int=1), Tag("t"), Ratio(2.5),
                           Point(1, 2), Record(1), datetime.date(2026, 1, 1)])
_with_exotic = st.recursive(_scalars | _exotic,
                            lambda inner: st.lists(inner, max_size=5)
                            | st.dictionaries(st.text(max_size=3), inner, max_size=5),
                            max_leaves=20)


def _outcome(call: Any, *args: Any) -> tuple[str, Any]:
    """("ok", result) or ("error", message) for SerializationError; nothing else is allowed."""
    try:
        return "ok", call(*args)
    except SerializationError as e:
        return "error", str(e)


def _meaning(data: bytes) -> str:
    """What JSON bytes mean, with types: the repr of the standard library's reading."""
    return repr(json.loads(data.decode("utf-8")))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_values, _with_exotic))
def test_dumps_agree(value: Any) -> None:
    """Both implementations accept the same values, meaning the same, or refuse them alike."""
    fast, slow = _outcome(FAST.dumps, value), _outcome(STDLIB.dumps, value)
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "ok":
        assert _meaning(fast[1]) == _meaning(slow[1])
    else:
        assert fast[1] == slow[1]


_documents = _values.map(lambda v: json.dumps(v, allow_nan=True).encode("utf-8", "replace"))
_mangled = st.tuples(_documents, st.integers(0, 200), st.binary(max_size=4)).map(
    lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])
_bracketed = st.tuples(st.integers(0, 150), _documents).map(
    lambda t: b"[" * t[0] + t[1] + b"]" * t[0])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_documents, _mangled, _bracketed, st.binary(max_size=30)))
def test_loads_agree(data: bytes) -> None:
    """Both implementations read the same bytes the same way, or refuse them with one message."""
    fast, slow = _outcome(FAST.loads, data), _outcome(STDLIB.loads, data)
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "ok":
        assert repr(fast[1]) == repr(slow[1])
    else:
        assert fast[1] == slow[1]


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON."""
    raise ValueError(name)


def _depth(value: Any) -> int:
    """Reference nesting depth, by plain recursion."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bracketed, st.integers(0, 8))
def test_depth_limit_is_exact(data: bytes, limit: int) -> None:
    """A document is refused as too deep exactly when its depth exceeds the limit."""
    try:
        reference = _depth(json.loads(data.decode("utf-8"), parse_constant=_no_constant))
    except (ValueError, RecursionError):
        return  # not JSON (NaN and Infinity included): other tests pin those
    for ser in (JSONSerializer(limit, fast=True), JSONSerializer(limit, fast=False)):
        outcome = _outcome(ser.loads, data)
        assert (outcome[0] == "error") == (reference > limit), (reference, limit, outcome)



# -- large bodies: every way the orjson path checks them ------------------------------------

#: past the size up to which bodies are checked on their bytes alone
_LARGE = serializers._SMALL + 1


def _few_parts(data: bytes) -> bytes:
    """*data* in an array with one long string: a large body of few values."""
    return b"[" + data + b',"' + b"x" * _LARGE + b'"]'


def _many_parts(data: bytes) -> bytes:
    """*data* in an array with thousands of small values: a large body of many (more than
    the walk of the value costs less than the bytes for)."""
    return b"[" + data + b"," + b",".join([b'{"a":[1,2]}'] * (_LARGE // 4)) + b"]"


def _records_parts(data: bytes) -> bytes:
    """*data* in an array of records: a large body of values a few dozen bytes each."""
    return b"[" + data + b"," + b",".join(
        [b'{"name":"user-00001","email":"u1@example.com","n":1}'] * (_LARGE // 40)) + b"]"


_WRAPS = [_few_parts, _many_parts, _records_parts]


@pytest.mark.parametrize("wrap", _WRAPS)
@pytest.mark.parametrize("limit", [0, 1, 3, MAX_JSON_DEPTH])
@pytest.mark.parametrize("inner", ["1", "[]", "{}", '"[[["', "[1]", '{"k":{}}'])
def test_large_body_depth_exact(ser: JSONSerializer, wrap: Any, limit: int,
                                inner: str) -> None:
    """In large bodies too, the limit is exact: up to it decodes, one more level is refused,
    whether the deepest containers are empty or not."""
    for depth in range(max(0, limit - 3), limit + 2):
        data = wrap(_nested(depth, inner))
        reference = _depth(json.loads(data))
        outcome = _outcome(JSONSerializer(limit, fast=ser.fast).loads, data)
        assert outcome[0] == ("error" if reference > limit else "ok"), (depth, reference)
        if outcome[0] == "ok":
            assert outcome[1] == json.loads(data)
        else:
            assert outcome[1] == f"JSON nested deeper than {limit} levels"


@pytest.mark.parametrize("wrap", _WRAPS)
@pytest.mark.parametrize("offset", range(8))
@pytest.mark.parametrize("number", [2**64, -2**63 - 1, 10**19, -10**25])
def test_large_body_big_integers(ser: JSONSerializer, wrap: Any, offset: int,
                                 number: int) -> None:
    """A big integer anywhere in a large body, at any alignment, decodes exactly; 18-digit
    integers and long digit strings around it change nothing."""
    data = wrap(b" " * offset + f'[{number}, 123456789012345678, "12345678901234567890"]'.encode())
    value = ser.loads(data)
    assert value[0][0] == number and type(value[0][0]) is int
    assert value == json.loads(data)


@pytest.mark.parametrize("wrap", _WRAPS)
def test_large_body_big_floats_stay_floats(ser: JSONSerializer, wrap: Any) -> None:
    """Large float literals in a large body stay floats."""
    data = wrap(b"[1e19, 12345678901234567890.0, -1.8446744073709552e19]")
    value = ser.loads(data)
    assert value == json.loads(data) and all(type(v) is float for v in value[0])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_documents, _bracketed), st.sampled_from(_WRAPS),
       st.integers(0, 8))
def test_large_loads_agree(data: bytes, wrap: Any, limit: int) -> None:
    """Both implementations read large bodies alike (few or many values), at any limit."""
    body = wrap(data)
    fast = _outcome(JSONSerializer(limit, fast=True).loads, body)
    slow = _outcome(JSONSerializer(limit, fast=False).loads, body)
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "ok":
        assert repr(fast[1]) == repr(slow[1])
    else:
        assert fast[1] == slow[1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_values, _with_exotic), st.integers(0, 300))
def test_large_dumps_agree(value: Any, copies: int) -> None:
    """Both implementations accept and refuse the same values among many plain ones."""
    document = [{"id": i, "score": i / 7, "tags": ["a"], "none": None} for i in range(copies)]
    document.insert(copies // 2, value)
    fast, slow = _outcome(FAST.dumps, document), _outcome(STDLIB.dumps, document)
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "ok":
        assert _meaning(fast[1]) == _meaning(slow[1])
    else:
        assert fast[1] == slow[1]


def test_records_round_trip(ser: JSONSerializer) -> None:
    """The benchmark's records document (1,000 small dicts) goes through unchanged."""
    records = [{"id": i, "name": f"user-{i:05d}", "email": f"user{i}@example.com",
                "score": round((i * 7919 % 10007) / 100.07, 2), "active": i % 3 == 0,
                "tags": ["a", "b"]} for i in range(1000)]
    data = ser.dumps(records)
    assert json.loads(data) == records
    assert ser.loads(data) == records

# -- pickle ------------------------------------------------------------------------------


def test_pickle_round_trip() -> None:
    """PickleSerializer carries Python objects, and refuses garbage with SerializationError."""
    pickler = PickleSerializer()
    value = {"when": datetime.date(2026, 1, 1), "set": {1, 2}}
    assert pickler.loads(pickler.dumps(value)) == value
    with pytest.raises(SerializationError):
        pickler.loads(b"not a pickle")


def test_readme_json_semantics_for_both_implementations() -> None:
    """What README's API section says of JSONSerializer holds with and without orjson."""
    from txcallme.errors import SerializationError as _SerializationError
    from txcallme.serializers import JSONSerializer as _JSON

    for fast in (True, False):
        serializer = _JSON(fast=fast)
        assert serializer.dumps({1: 2}) == b'{"1":2}'
        assert serializer.loads(serializer.dumps(2**70)) == 2**70
        for refused in (float("nan"), float("inf"), "\ud800"):
            with pytest.raises(_SerializationError):
                serializer.dumps(refused)
