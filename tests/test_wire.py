"""Unit tests for txcallme._wire: names, request and reply envelopes."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from txcallme import _wire
from txcallme._wire import (
    Request,
    check_server_id,
    client_exchange,
    client_queue,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
    error_description,
    server_exchange,
    server_queue,
)
from txcallme.errors import InvalidRequest
from txcallme.serializers import JSON, JSONSerializer, PickleSerializer, Serializer


def _raw(value: object) -> bytes:
    """Encode *value* as JSON without going through txcallme."""
    return json.dumps(value).encode("utf-8")


class NamesTests(SynchronousTestCase):
    """Exchange and queue names."""

    def test_server_exchange(self) -> None:
        """A server's exchange is server_<id>_ex."""
        self.assertEqual(server_exchange("foo"), "server_foo_ex")

    def test_server_queue(self) -> None:
        """A server's queue is server_<id>_queue."""
        self.assertEqual(server_queue("foo"), "server_foo_queue")

    def test_client_exchange(self) -> None:
        """A client's exchange names its user and uid."""
        self.assertEqual(client_exchange("olivia", "abc"), "client_olivia_ex_abc")

    def test_client_queue(self) -> None:
        """A client's queue names its user and uid."""
        self.assertEqual(client_queue("olivia", "abc"), "client_olivia_queue_abc")

    def test_check_server_id_accepts(self) -> None:
        """A plain server id is returned unchanged."""
        self.assertEqual(check_server_id("foo-1.bar"), "foo-1.bar")

    def test_check_server_id_rejects_empty(self) -> None:
        """An empty server id is refused."""
        self.assertRaises(ValueError, check_server_id, "")

    def test_check_server_id_rejects_spaces(self) -> None:
        """Server ids containing whitespace are refused."""
        for bad in ("foo bar", " foo", "foo\t", "foo\nbar"):
            self.assertRaises(ValueError, check_server_id, bad)

    def test_check_server_id_rejects_non_string(self) -> None:
        """A server id that is not a string is refused."""
        self.assertRaises(ValueError, check_server_id, 42)  # type: ignore[arg-type]

    def test_check_server_id_names_fit_amqp(self) -> None:
        """An accepted id gives exchange and queue names within AMQP's 255-byte shortstr."""
        for server_id in ("x" * 200, "\u00e9" * 200, "\U0001f600" * 200):
            try:
                check_server_id(server_id)
            except ValueError:
                continue
            for name in (server_exchange(server_id), server_queue(server_id)):
                self.assertLessEqual(len(name.encode("utf-8")), 255,
                                     f"accepted {server_id[:3]!r}... x {len(server_id)}")

    def test_check_server_id_rejects_too_long(self) -> None:
        """A server id over 242 UTF-8 bytes (so its queue name over 255) is refused."""
        self.assertRaises(ValueError, check_server_id, "x" * 243)
        self.assertRaises(ValueError, check_server_id, "\u00e9" * 122)
        self.assertEqual(check_server_id("x" * 242), "x" * 242)


class RequestTests(SynchronousTestCase):
    """Encoding and decoding request envelopes."""

    ser: Serializer = JSON

    def test_round_trip_with_deadline(self) -> None:
        """A request with a deadline survives encode/decode unchanged."""
        request = Request("add", [1, 2], {"c": "d"}, 1764220000.5)
        self.assertEqual(decode_request(self.ser, encode_request(self.ser, request)), request)

    def test_round_trip_without_deadline(self) -> None:
        """A request without a deadline has no deadline field on the wire."""
        request = Request("add", [1, [2, 3]], {})
        data = encode_request(self.ser, request)
        self.assertNotIn("deadline", json.loads(data))
        self.assertEqual(decode_request(self.ser, data), request)

    def test_defaults(self) -> None:
        """Missing args and kwargs default to empty."""
        self.assertEqual(decode_request(self.ser, _raw({"method": "m"})), Request("m", [], {}))

    def test_integer_deadline(self) -> None:
        """An integer deadline is accepted."""
        self.assertEqual(decode_request(self.ser, _raw({"method": "m", "deadline": 5})).deadline, 5)

    def _assert_invalid(self, data: bytes) -> InvalidRequest:
        """Decoding *data* raises InvalidRequest, and nothing else."""
        try:
            decode_request(self.ser, data)
        except InvalidRequest as e:
            return e
        except BaseException as e:  # pragma: no cover - the failure being tested for
            self.fail(f"decode_request raised {type(e).__name__}, not InvalidRequest: {e}")
        self.fail(f"decode_request accepted {data[:80]!r}")

    def test_invalid_json(self) -> None:
        """A body that is not JSON is an invalid request."""
        self._assert_invalid(b'{"method": ')

    def test_nan_constant(self) -> None:
        """JSON NaN/Infinity constants are refused."""
        self._assert_invalid(b'{"method": "m", "deadline": NaN}')
        self._assert_invalid(b'{"method": "m", "args": [Infinity]}')

    def test_not_an_object(self) -> None:
        """A body that is not a JSON object is refused."""
        for value in ([], "m", 1, None):
            self._assert_invalid(_raw(value))

    def test_missing_method(self) -> None:
        """A request without a method is refused."""
        self._assert_invalid(_raw({"args": []}))

    def test_empty_method(self) -> None:
        """A request with an empty method name is refused."""
        self._assert_invalid(_raw({"method": ""}))

    def test_non_string_method(self) -> None:
        """A method that is not a string is refused."""
        for method in (1, None, ["m"], {"m": 1}):
            self._assert_invalid(_raw({"method": method}))

    def test_args_not_list(self) -> None:
        """args must be an array."""
        for args in ({"a": 1}, "ab", 1, None):
            self._assert_invalid(_raw({"method": "m", "args": args}))

    def test_kwargs_not_object(self) -> None:
        """kwargs must be an object."""
        for kwargs in ([], "ab", 1, None):
            self._assert_invalid(_raw({"method": "m", "kwargs": kwargs}))

    def test_bool_deadline(self) -> None:
        """A boolean deadline is refused even though bool is an int."""
        self._assert_invalid(_raw({"method": "m", "deadline": True}))

    def test_string_deadline(self) -> None:
        """A string deadline is refused."""
        self._assert_invalid(_raw({"method": "m", "deadline": "soon"}))

    def test_unknown_fields(self) -> None:
        """Fields other than method, args, kwargs and deadline are refused."""
        error = self._assert_invalid(_raw({"method": "m", "timeout": 3}))
        self.assertIn("timeout", str(error))

    def test_non_utf8(self) -> None:
        """A body that is not UTF-8 is refused."""
        self._assert_invalid(b'{"method": "\xff\xfe"}')

    def test_deeply_nested_lists(self) -> None:
        """10,000 nested arrays raise InvalidRequest, not RecursionError."""
        self._assert_invalid(b"[" * 10_000)
        self._assert_invalid(b'{"method": "m", "args": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")

    def test_deeply_nested_objects(self) -> None:
        """Deeply nested objects raise InvalidRequest, not RecursionError."""
        self._assert_invalid(b'{"a":' * 10_000 + b"1" + b"}" * 10_000)

    def test_brackets_in_strings_are_not_nesting(self) -> None:
        """Brackets inside strings do not count towards the nesting limit."""
        request = Request("m", ["[" * 1000, "{" * 1000], {})
        self.assertEqual(decode_request(self.ser, encode_request(self.ser, request)), request)


class ReplyTests(SynchronousTestCase):
    """Encoding and decoding reply envelopes."""

    ser: Serializer = JSON

    def test_result(self) -> None:
        """A result reply decodes to ok=True and its value."""
        reply = decode_reply(self.ser, encode_result(self.ser, {"x": [1, 2]}))
        self.assertEqual((reply.ok, reply.value), (True, {"x": [1, 2]}))

    def test_null_result(self) -> None:
        """A None result is a valid reply."""
        reply = decode_reply(self.ser, encode_result(self.ser, None))
        self.assertEqual((reply.ok, reply.value), (True, None))

    def test_error(self) -> None:
        """An error reply decodes to ok=False and the full description."""
        error = {"type": "ValueError", "message": "bad", "args": ["bad"], "traceback": "T"}
        reply = decode_reply(self.ser, encode_error(self.ser, error))
        self.assertFalse(reply.ok)
        self.assertEqual(reply.error, error)

    def test_error_defaults(self) -> None:
        """Missing parts of an error description get defaults; bad args are dropped."""
        reply = decode_reply(self.ser, _raw({"error": {"args": "not a list"}}))
        self.assertEqual(reply.error, {"type": "Exception", "message": "", "args": [],
                                       "traceback": ""})

    def test_rejects_other_shapes(self) -> None:
        """Anything but {'result': ...} or {'error': {...}} raises InvalidRequest."""
        for body in ({}, [], "x", None, {"error": "x"}, {"result": 1, "error": {}},
                     {"result": 1, "extra": 2}, {"value": 1}):
            self.assertRaises(InvalidRequest, decode_reply, self.ser, _raw(body))

    def test_rejects_invalid_json(self) -> None:
        """A reply that is not JSON raises InvalidRequest."""
        self.assertRaises(InvalidRequest, decode_reply, self.ser, b"{")
        self.assertRaises(InvalidRequest, decode_reply, self.ser, b"[" * 10_000)


class ErrorDescriptionTests(SynchronousTestCase):
    """The wire form of exceptions."""

    ser: Serializer = JSON

    def test_builtin(self) -> None:
        """A builtin exception travels under its bare name with its args."""
        description = error_description(KeyError("k"), with_traceback=False)
        self.assertEqual(description, {"type": "KeyError", "message": "'k'", "args": ["k"],
                                       "traceback": ""})

    def test_non_json_args(self) -> None:
        """Arguments that are not JSON-safe travel as their repr."""
        marker = object()
        exc = ValueError("text", 1, 2.5, None, True, marker, [1, 2], {"a": b"x"})
        description = error_description(exc, with_traceback=False)
        self.assertEqual(description["args"], ["text", 1, 2.5, None, True, repr(marker),
                                               "[1, 2]", "{'a': b'x'}"])
        reply = decode_reply(self.ser, encode_error(self.ser, description))
        self.assertEqual(reply.error["args"], description["args"])

    def test_qualified_name(self) -> None:
        """A non-builtin exception travels as module.QualName."""
        description = error_description(InvalidRequest("x"), with_traceback=False)
        self.assertEqual(description["type"], "txcallme.errors.InvalidRequest")

    def test_traceback(self) -> None:
        """With a traceback, the description names the raising function."""
        def explode() -> None:
            raise RuntimeError("boom")

        try:
            explode()
        except RuntimeError as e:
            description = error_description(e)
        self.assertIn("explode", description["traceback"])
        self.assertIn("RuntimeError: boom", description["traceback"])

    def test_reserved_prefix(self) -> None:
        """The reserved method prefix is __callme__."""
        self.assertEqual(_wire.RESERVED_PREFIX, "__callme__.")


class RequestStdlibTests(RequestTests):
    """Request envelopes with the standard-library JSON implementation."""

    ser = JSONSerializer(fast=False)


class ReplyStdlibTests(ReplyTests):
    """Reply envelopes with the standard-library JSON implementation."""

    ser = JSONSerializer(fast=False)


class ErrorDescriptionStdlibTests(ErrorDescriptionTests):
    """Error envelopes with the standard-library JSON implementation."""

    ser = JSONSerializer(fast=False)


class NonJSONEnvelopeTests(SynchronousTestCase):
    """Envelopes through a serializer that can carry more than JSON (pickle)."""

    def test_tuple_args_become_a_list(self) -> None:
        """Arguments sent as a tuple arrive as a list."""
        pickler = PickleSerializer()
        request = decode_request(pickler, pickler.dumps({"method": "m", "args": (1, 2)}))
        self.assertEqual(request, Request("m", [1, 2], {}))
        self.assertIs(type(request.args), list)

    def test_non_string_kwargs_keys(self) -> None:
        """Keyword arguments whose names are not strings are refused."""
        pickler = PickleSerializer()
        for kwargs in ({1: 2}, {"a": 1, None: 2}):
            with self.assertRaises(InvalidRequest):
                decode_request(pickler, pickler.dumps({"method": "m", "kwargs": kwargs}))

    def test_null_args_refused(self) -> None:
        """args given as null is refused, not taken as missing."""
        with self.assertRaises(InvalidRequest):
            decode_request(JSON, b'{"method": "m", "args": null}')
