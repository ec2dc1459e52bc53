"""callme_compat.CallmeDispatcher: a server's own functions answered in
callme 0.2.0's reply format, checked by unpickling the replies with the real
callme package (no broker)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from callme import protocol as callme_protocol
from twisted.internet.defer import Deferred, succeed

from txcallme import _wire, callme_compat
from txcallme.serializers import JSON
from txcallme.server import Dispatcher

pytestmark = pytest.mark.timeout(30)


class AppError(Exception):
    """An application exception, importable by a callme client."""


async def coroutine_fails(x: int) -> int:
    """A coroutine function that raises."""
    raise AppError("async", x)


def make() -> tuple[Dispatcher, callme_compat.CallmeDispatcher]:
    """A JSON dispatcher with some functions, and its callme view."""
    dispatcher = Dispatcher(JSON)
    dispatcher.register(lambda a, b: a + b, "add")
    dispatcher.register(lambda: (_ for _ in ()).throw(AppError("sync", 1)), "fails")
    dispatcher.register(coroutine_fails, "async_fails")
    dispatcher.register(lambda: succeed({1, 2}), "deferred_set")
    dispatcher.register(lambda: lambda: None, "unpicklable")
    return dispatcher, callme_compat.CallmeDispatcher(dispatcher)


def answer(compat: callme_compat.CallmeDispatcher, method: str, *args: Any,
           **kwargs: Any) -> Any:
    """The RpcResponse a callme client unpickles for one call."""
    d: Deferred[bytes] = compat.dispatch(_wire.Request(method, list(args), kwargs))
    body = d.result  # everything here answers synchronously
    response = pickle.loads(body)
    assert type(response) is callme_protocol.RpcResponse
    return response


def test_result() -> None:
    """A result is pickled as callme's RpcResponse(result)."""
    _, compat = make()
    response = answer(compat, "add", 1, 2)
    assert (response.result, response.is_exception) == (3, False)


def test_sets_and_deferreds() -> None:
    """A Deferred's value is the result; pickle keeps a set a set."""
    _, compat = make()
    assert answer(compat, "deferred_set").result == {1, 2}


@pytest.mark.parametrize("method, args", [("fails", ()), ("async_fails", (7,))])
def test_raised_exception_is_sent_as_itself(method: str, args: tuple[Any, ...]) -> None:
    """An exception a function raises (sync or async) is the instance callme raises."""
    _, compat = make()
    response = answer(compat, method, *args)
    assert response.is_exception and type(response.result) is AppError


def test_unknown_method_is_a_key_error() -> None:
    """An unknown method is a KeyError, as callme 0.2.0 servers answer it."""
    _, compat = make()
    response = answer(compat, "nothing")
    assert type(response.result) is KeyError and "nothing" in str(response.result)


def test_bad_arguments_are_a_type_error() -> None:
    """Arguments that do not fit are a TypeError before the function runs."""
    _, compat = make()
    assert type(answer(compat, "add", 1).result) is TypeError


def test_unpicklable_result_is_a_type_error() -> None:
    """A result pickle cannot encode is answered with a TypeError, not lost."""
    _, compat = make()
    response = answer(compat, "unpicklable")
    assert type(response.result) is TypeError and "pickle" in str(response.result)


def test_functions_registered_later_are_served() -> None:
    """The callme view follows the dispatcher's registrations."""
    dispatcher, compat = make()
    dispatcher.register(lambda: "late", "later")
    assert answer(compat, "later").result == "late"


def test_json_dispatcher_is_untouched() -> None:
    """The dispatcher's own (JSON) answers still carry error envelopes."""
    dispatcher, _ = make()
    body = dispatcher.dispatch(_wire.Request("fails", [], {})).result
    assert b'"error"' in body and b"AppError" in body
