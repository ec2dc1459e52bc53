"""callme's pickle wire format through txcallme's restricted unpickler:
real callme messages are read and written, hostile pickles are refused with
InvalidRequest before anything outside the allow-list is constructed."""

from __future__ import annotations

import codecs
import os
import pickle
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from callme import protocol as callme_protocol
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from txcallme import callme_compat
from txcallme.errors import InvalidRequest, RemoteError, RemoteErrorRegistry

pytestmark = pytest.mark.timeout(60)

PROTO2 = b"\x80\x02"
STOP = b"."


def unicode(text: str) -> bytes:
    """BINUNICODE opcode for *text*."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def global_(module: str, name: str) -> bytes:
    """GLOBAL opcode."""
    return b"c" + f"{module}\n{name}\n".encode()


def call(module: str, name: str, *args: bytes) -> bytes:
    """GLOBAL module.name, a tuple of the pickled *args*, REDUCE."""
    return global_(module, name) + b"(" + b"".join(args) + b"tR"


def request_around(inner: bytes) -> bytes:
    """A protocol 2 callme RpcRequest whose func_args is the tuple (inner,)."""
    return (PROTO2 + global_("callme.protocol", "RpcRequest") + b")\x81}("
            + unicode("func_name") + unicode("add") + unicode("func_args")
            + b"(" + inner + b"tub" + STOP)


class Gadget:
    """An object whose pickle runs *func(*args)* when unpickled."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> Any:
        return self.func, self.args


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """A path a successful gadget would create; asserted absent afterwards."""
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a hostile pickle ran code"


_WATCHED = ("os.system", "subprocess.Popen", "exec", "compile", "import", "open",
            "os.posix_spawn", "os.exec", "pickle.find_class", "builtins.input")
#: audit events seen while decoding (see refused()); None: not recording
_events: list[str] | None = None


def _audit_hook(event: str, args: Any) -> None:
    if _events is not None and event.startswith(_WATCHED):
        _events.append(event)


sys.addaudithook(_audit_hook)
# protocol 0 strings use these codecs: import them now, not during a decode
for _codec in ("raw-unicode-escape", "latin-1", "ascii", "utf-8"):
    codecs.lookup(_codec)


def decode_audited(data: bytes, reply: bool = False) -> tuple[Any, list[str]]:
    """Decode *data* (request or reply) and return the exception it raised (or
    None) with the code-running/importing audit events seen during decoding."""
    global _events
    _events = []
    try:
        (callme_compat.decode_response if reply else callme_compat.decode_request)(data)
    except InvalidRequest as e:
        return e, _events
    finally:
        events, _events = _events, None
    return None, events


def refused(data: bytes, match: str | None = None) -> InvalidRequest:
    """Decode *data* as a request: it must fail with InvalidRequest (matching
    *match*) without running, importing or opening anything."""
    error, events = decode_audited(data)
    assert isinstance(error, InvalidRequest), f"not refused: {data[:80]!r}"
    assert events == [], events
    if match is not None:
        assert re.search(match, str(error)), error
    return error


# --- the wire format itself -------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_reads_real_callme_requests(protocol: int) -> None:
    """A callme RpcRequest pickled with any protocol callme peers use decodes."""
    args = (1, -2**70, 2.5, "text", b"\x00\xff", True, None, [1, [2]], (3,),
            {"k": {1, 2}}, frozenset({4}), bytearray(b"ab"), 1 + 2j)
    if protocol == 0:  # protocol 0 needs copyreg._reconstructor: not allowed
        data = pickle.dumps(callme_protocol.RpcRequest("add", args), protocol=0)
        refused(data, "copy_reg._reconstructor|copyreg")
        return
    data = pickle.dumps(callme_protocol.RpcRequest("add", args), protocol=protocol)
    request = callme_compat.decode_request(data)
    assert (request.method, request.args, request.kwargs) == ("add", list(args), {})


def test_reads_func_kwargs_of_a_later_callme() -> None:
    """A request with the func_kwargs a later callme adds passes them on."""
    req = callme_protocol.RpcRequest("add", (1,))
    req.func_kwargs = {"b": 2}
    request = callme_compat.decode_request(pickle.dumps(req, protocol=4))
    assert (request.args, request.kwargs) == ([1], {"b": 2})


def test_reads_python2_style_pickles() -> None:
    """Python 2 callme clients' names (__builtin__, exceptions, byte strings) decode."""
    data = (PROTO2 + global_("callme.protocol", "RpcRequest") + b")\x81}("
            + b"U\x09func_name" + b"U\x03add" + b"U\x09func_args"
            + b"(" + call("__builtin__", "set", b"]K\x01a") + b"tub" + STOP)
    request = callme_compat.decode_request(data)
    assert (request.method, request.args) == ("add", [{1}])
    response = PROTO2 + global_("callme.protocol", "RpcResponse") + b")\x81}(U\x06result" \
        + call("exceptions", "ValueError", b"U\x03bad") + b"ub" + STOP
    assert repr(callme_compat.decode_response(response)) == repr(ValueError("bad"))


def test_replies_are_protocol_2_callme_responses() -> None:
    """txcallme's replies unpickle in callme as RpcResponse, with protocol 2 opcodes only."""
    body = callme_compat.encode_response({"sum": 3, "raw": b"\x00", "set": {1}})
    assert body[:2] == PROTO2
    response = pickle.loads(body)
    assert type(response) is callme_protocol.RpcResponse
    assert response.result == {"sum": 3, "raw": b"\x00", "set": {1}}
    error = pickle.loads(callme_compat.encode_response(ZeroDivisionError("division by zero")))
    assert error.is_exception and type(error.result) is ZeroDivisionError
    # and txcallme's own reader accepts what it writes
    assert callme_compat.decode_response(body) == {"sum": 3, "raw": b"\x00", "set": {1}}


def test_requests_unpickle_in_callme() -> None:
    """encode_request makes a callme RpcRequest; keyword arguments are refused."""
    request = pickle.loads(callme_compat.encode_request("math.add", [1, 2]))
    assert type(request) is callme_protocol.RpcRequest
    assert (request.func_name, request.func_args) == ("math.add", (1, 2))
    with pytest.raises(TypeError, match="positional arguments only"):
        callme_compat.encode_request("add", [1], {"b": 2})


class AppError(Exception):
    """An application exception type a callme server might raise."""


def test_foreign_exception_arrives_as_remote_error() -> None:
    """A callme reply with an exception type outside the allow-list becomes RemoteError."""
    error = AppError("boom", 7)
    error.detail = "x"  # type: ignore[attr-defined]
    body = pickle.dumps(callme_protocol.RpcResponse(error), protocol=4)
    d: Deferred[Any] = Deferred()
    callme_compat.settle(d, RemoteErrorRegistry(), body)
    failure = []
    d.addErrback(failure.append)
    exc = failure[0].value
    assert type(exc) is RemoteError
    assert (exc.type_name, exc.remote_args, exc.message) == (
        f"{__name__}.AppError", ("boom", 7), "('boom', 7)")


def test_registered_foreign_exception_is_rebuilt() -> None:
    """A type registered on the proxy's errors is rebuilt from a callme reply."""
    errors = RemoteErrorRegistry()
    errors.register(AppError)
    d: Deferred[Any] = Deferred()
    callme_compat.settle(d, errors, pickle.dumps(
        callme_protocol.RpcResponse(AppError("boom")), protocol=2))
    failure = []
    d.addErrback(failure.append)
    assert type(failure[0].value) is AppError and failure[0].value.args == ("boom",)


def test_builtin_exception_and_result_settle() -> None:
    """A builtin exception is raised as itself; a value is the result."""
    d: Deferred[Any] = Deferred()
    callme_compat.settle(d, RemoteErrorRegistry(), pickle.dumps(
        callme_protocol.RpcResponse(KeyError("nope")), protocol=4))
    failure = []
    d.addErrback(failure.append)
    assert type(failure[0].value) is KeyError
    d2: Deferred[Any] = Deferred()
    callme_compat.settle(d2, RemoteErrorRegistry(), pickle.dumps(
        callme_protocol.RpcResponse([1, 2]), protocol=4))
    assert d2.result == [1, 2]


def test_foreign_value_in_a_reply_is_refused() -> None:
    """A reply whose result is a foreign object (not an exception) is unreadable."""
    import datetime

    d: Deferred[Any] = Deferred()
    callme_compat.settle(d, RemoteErrorRegistry(), pickle.dumps(
        callme_protocol.RpcResponse({"when": datetime.date(2020, 1, 1)}), protocol=2))
    failure = []
    d.addErrback(failure.append)
    assert type(failure[0].value) is InvalidRequest
    assert "datetime.date" in str(failure[0].value)


def test_own_errors_become_builtin_for_callme_clients() -> None:
    """txcallme's errors reach callme clients as builtins they can unpickle."""
    from txcallme.errors import RpcTimeout, UnknownMethod

    assert type(callme_compat.callme_exception(UnknownMethod("no add"))) is KeyError
    timeout = callme_compat.callme_exception(RpcTimeout("s", "m", 1))
    assert type(timeout) is RuntimeError and "RpcTimeout" in str(timeout)
    app = AppError("kept")
    assert callme_compat.callme_exception(app) is app  # callme sends the instance


# --- hostile pickles ----------------------------------------------------------------


def gadget_pickles(marker: Path) -> dict[str, bytes]:
    """Pickles that would create *marker* if unpickled by pickle.loads."""
    touch = f"touch {marker}"
    code = f"__import__('os').system({touch!r})"
    out: dict[str, bytes] = {}
    for protocol in (0, 2, 4):
        out[f"os.system p{protocol}"] = pickle.dumps(Gadget(os.system, touch), protocol)
        out[f"eval p{protocol}"] = pickle.dumps(Gadget(eval, code), protocol)
        out[f"Popen p{protocol}"] = pickle.dumps(
            Gadget(subprocess.Popen, ["touch", str(marker)]), protocol)
    out["posix.system"] = PROTO2 + call("posix", "system", unicode(touch)) + STOP
    out["builtins.exec"] = PROTO2 + call("builtins", "exec", unicode(code)) + STOP
    out["__builtin__.eval"] = PROTO2 + call("__builtin__", "eval", unicode(code)) + STOP
    out["inside func_args"] = request_around(call("posix", "system", unicode(touch)))
    out["STACK_GLOBAL os.system"] = (b"\x80\x04" + b"\x8c\x02os\x8c\x06system\x93"
                                     + unicode(touch) + b"\x85R" + STOP)
    out["INST os.system"] = b"(" + b"S'" + touch.encode() + b"'\nios\nsystem\n" + STOP
    out["OBJ os.system"] = (b"(" + global_("os", "system") + b"S'" + touch.encode()
                            + b"'\no" + STOP)
    # allowed-looking names that are not on the allow-list
    out["callme.protocol.os"] = (PROTO2 + global_("callme.protocol", "os") + STOP)
    out["builtins.getattr"] = PROTO2 + call(
        "builtins", "getattr", global_("callme.protocol", "RpcRequest"),
        unicode("__init__")) + STOP
    out["builtins.__import__"] = PROTO2 + call("builtins", "__import__", unicode("os")) + STOP
    out["dotted RpcRequest.__init__.__globals__"] = (
        b"\x80\x04" + b"\x8c\x0fcallme.protocol\x8c\x1eRpcRequest.__init__.__globals__\x93"
        + STOP)
    out["exceptions.eval"] = PROTO2 + call("exceptions", "eval", unicode(code)) + STOP
    out["builtins.ValueError.__subclasses__"] = (
        PROTO2 + global_("builtins", "ValueError.__subclasses__") + STOP)
    out["copyreg._reconstructor"] = PROTO2 + call(
        "copy_reg", "_reconstructor", global_("os", "system"),
        global_("builtins", "object"), b"N") + STOP
    out["_codecs.decode"] = PROTO2 + call("_codecs", "decode", unicode("x"),
                                          unicode("rot13")) + STOP
    out["builtins.open"] = PROTO2 + call("builtins", "open", unicode(str(marker)),
                                         unicode("w")) + STOP
    out["builtins.SystemExit"] = PROTO2 + call("builtins", "SystemExit", b"K\x01") + STOP
    out["builtins.type"] = PROTO2 + call("builtins", "type", b"K\x01") + STOP
    return out


GADGET_NAMES = sorted(gadget_pickles(Path("/nonexistent")))


def test_gadget_pickles_would_run_code(tmp_path: Path) -> None:
    """Control: the os.system gadget does create the marker through plain pickle.loads."""
    path = tmp_path / "control"
    pickle.loads(gadget_pickles(path)["os.system p2"])  # noqa: S301 - the control case
    assert path.exists()


@pytest.mark.parametrize("name", GADGET_NAMES)
def test_gadget_is_refused(name: str, marker: Path) -> None:
    """A __reduce__ gadget or a global off the allow-list is refused, as a
    request and as a reply; nothing runs, is imported or opened."""
    data = gadget_pickles(marker)[name]
    refused(data, "not allowed|invalid pickle")
    error, events = decode_audited(data, reply=True)
    assert isinstance(error, InvalidRequest) and events == []


def test_setstate_swap_cannot_reach_a_callable(marker: Path) -> None:
    """BUILD cannot plant __setstate__ to call an allowed constructor with a bomb size."""
    exc = call("builtins", "ValueError", b"K\x01")
    planted = b"q\x00}" + unicode("__setstate__") + global_("builtins", "bytearray") + b"sb"
    data = request_around(exc + planted + b"h\x00" + b"\x8a\x05\x00\xe4\x0bT\x02" + b"b")
    refused(data, "bytearray")


def test_memo_index_bomb() -> None:
    """A LONG_BINPUT 0xFFFFFFFF (32 GiB of memo in the C unpickler) is refused first."""
    data = PROTO2 + b"]r\xff\xff\xff\xff" + STOP
    refused(data, "memo index")


def test_billion_laughs() -> None:
    """Lists of repeated references to lists (10**9 objects as a tree) are refused."""
    body = b"]q\x00" + b"K\x01" * 0  # level 0: an empty list in memo 0
    body = b"(K\x01K\x02lq\x00"
    for level in range(1, 10):
        body += b"(" + f"h{chr(level - 1)}".encode("latin-1") * 10 + b"l" \
            + b"q" + bytes([level])
    data = request_around(body)
    assert len(data) < 400
    refused(data, "expands to more than")


def test_repetition_bomb_dup() -> None:
    """DUP (never emitted by picklers) is refused instead of filling the stack."""
    refused(request_around(b"K\x01" + b"2" * 100_000), "DUP")


def test_repetition_bomb_bytearray_size() -> None:
    """bytearray(10**10) by REDUCE is refused without allocating."""
    refused(request_around(call("builtins", "bytearray", b"\x8a\x05\x00\xe4\x0bT\x02")),
            "bytearray")


def test_deep_nesting_of_lists() -> None:
    """100,000 nested lists are refused (depth), with no recursion error."""
    depth = 100_000
    refused(request_around(b"]" * depth + b"a" * (depth - 1)), "nested deeper")


def test_deep_nesting_of_marks() -> None:
    """100,000 nested MARKs are refused by the pre-scan."""
    refused(request_around(b"(" * 100_000), "nested deeper|invalid pickle")


def test_self_referencing_list() -> None:
    """A list that contains itself is refused, not walked forever."""
    refused(request_around(b"]q\x00h\x00a"), "nested deeper|expands")


@pytest.mark.parametrize("cut", [0, 1, 2, 10, 31, 60, -2])
def test_truncated(cut: int) -> None:
    """A request cut short anywhere is refused."""
    data = callme_compat.encode_request("add", [1, 2])
    refused(data[:cut], "invalid pickle|truncated|bytes after")


def test_trailing_bytes() -> None:
    """Bytes after STOP are refused (they are not part of any callme message)."""
    refused(callme_compat.encode_request("add", [1]) + b"os.system", "bytes after")


@pytest.mark.parametrize("opcode", [b"P0\n", b"K\x01Q", b"\x82\x01", b"\x83\x01\x00",
                                    b"\x84\x01\x00\x00\x00", b"\x97", b"\x98"])
def test_forbidden_opcodes(opcode: bytes) -> None:
    """Persistent ids, extension codes and out-of-band buffers are refused."""
    refused(request_around(opcode), "not allowed|invalid pickle")


def test_newobj_ex_is_refused() -> None:
    """NEWOBJ_EX (not produced for callme's messages) is refused."""
    refused(b"\x80\x04" + global_("builtins", "set") + b")}\x92" + STOP, "NEWOBJ_EX")


def test_huge_decimal_int() -> None:
    """An INT opcode with a million digits is refused (no quadratic conversion)."""
    refused(request_around(b"I" + b"9" * 1_000_000 + b"\n"), "cannot unpickle|invalid")


def test_frame_longer_than_data() -> None:
    """A protocol 4 FRAME claiming more bytes than there are is refused."""
    refused(b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N." , "frame")


def test_invalid_utf8_in_python2_string() -> None:
    """A Python 2 byte string that is not UTF-8 is refused."""
    refused(request_around(b"U\x02\xff\xfe"), "cannot unpickle")


@pytest.mark.parametrize("body", [
    pickle.dumps([1, 2], protocol=2),
    pickle.dumps(callme_protocol.RpcResponse(1), protocol=2),
    pickle.dumps(callme_protocol.RpcRequest(7, ()), protocol=2),
    pickle.dumps(callme_protocol.RpcRequest("add", 5), protocol=2),
    pickle.dumps(callme_protocol.RpcRequest("", ()), protocol=2),
])
def test_wrong_shapes(body: bytes) -> None:
    """Pickles that are not well-formed callme requests are refused."""
    refused(body, "callme request")


def test_state_must_be_a_dict() -> None:
    """BUILD of a callme message with a non-dict state is refused."""
    data = PROTO2 + global_("callme.protocol", "RpcRequest") + b")\x81K\x01b" + STOP
    refused(data, "must be a dict")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_pickles_only_raise_invalid_request(data: st.DataObject) -> None:
    """Any byte-level mutation of a real request decodes or fails with InvalidRequest."""
    body = bytearray(pickle.dumps(callme_protocol.RpcRequest(
        "add", (1, "two", [3.0], {"k": (b"v",)}, {5})), protocol=data.draw(
        st.sampled_from([2, 4, 5]))))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(body) - 1))
        body[index] = data.draw(st.integers(0, 255))
    try:
        callme_compat.decode_request(bytes(body))
    except InvalidRequest:
        pass
