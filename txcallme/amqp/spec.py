"""The AMQP 0-9-1 spec: txamqp's model of the project's XML, and txcallme's
own lookup tables over it (method keys, names, field types, property layout).

The tables are kept in a :class:`SpecTables` object of our own; nothing is
attached to txamqp's spec object.

- :func:`load_spec` -- txamqp's spec model (for its factory and channel 0).
- :func:`tables` -- a :class:`SpecTables`, loaded once per process.
- :meth:`SpecTables.encode_method` / :meth:`SpecTables.decode_method` --
  a method frame's payload from/to ``("queue.declare", {"queue": ...})``,
  field names with dashes turned into underscores.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

import attrs
from txamqp import spec as txspec

from txcallme.amqp import codec as _codec

SPEC_PATH = Path(__file__).with_name("amqp0-9-1.xml")
_HH = struct.Struct(">HH")


@attrs.frozen
class MethodInfo:
    """One method of the spec."""

    key: tuple[int, int]
    #: ``"class.method"``, e.g. ``"queue.declare-ok"``
    name: str
    #: argument names, dashes as underscores (``auto_delete``)
    fields: tuple[str, ...]
    types: tuple[str, ...]
    #: carries a content header and body (basic.publish, deliver, return)
    content: bool
    #: names of the methods that answer this one (empty: asynchronous)
    responses: tuple[str, ...]
    #: txamqp's method object (channel 0 still goes through txamqp)
    txmethod: Any = attrs.field(eq=False, repr=False)


class SpecTables:
    """Lookup tables over the spec, built once (see :func:`tables`)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.by_key: dict[tuple[int, int], MethodInfo] = {}
        self.by_name: dict[str, MethodInfo] = {}
        for klass in spec.classes:
            for method in klass.methods:
                info = MethodInfo(
                    (klass.id, method.id), f"{klass.name}.{method.name}",
                    tuple(txspec.pythonize(f.name) for f in method.fields),
                    tuple(f.type for f in method.fields), bool(method.content),
                    tuple(f"{klass.name}.{r.name}" for r in method.responses), method)
                self.by_key[info.key] = info
                self.by_name[info.name] = info
        self.types: dict[Any, tuple[str, ...]] = {
            info.txmethod: info.types for info in self.by_key.values()}
        basic = spec.classes.byname["basic"]
        #: basic properties as (python name, type), in flag order
        self.props: tuple[tuple[str, str], ...] = tuple(
            (txspec.pythonize(f.name), f.type) for f in basic.fields)
        #: basic properties as (spec name, type), as txamqp's Header carries them
        self.raw_props: tuple[tuple[str, str], ...] = tuple(
            (f.name, f.type) for f in basic.fields)

    def encode_method(self, name: str, arguments: dict[str, Any]) -> bytes:
        """The payload of a method frame (class id, method id, arguments).

        Missing arguments take their type's zero value. Raises KeyError for an
        unknown method or argument name, ValueError/TypeError for a value AMQP
        cannot carry (a shortstr over 255 bytes).
        """
        info = self.by_name[name]
        unknown = set(arguments) - set(info.fields)
        if unknown:
            raise KeyError(f"{name} has no argument {sorted(unknown)[0]!r}")
        values = [arguments.get(field) for field in info.fields]
        return _HH.pack(*info.key) + _codec.encode_arguments(info.types, values)

    def decode_method(self, payload: bytes) -> tuple[MethodInfo, dict[str, Any]]:
        """(method, arguments by name) of a method frame payload."""
        if len(payload) < 4:
            raise _codec.DecodeError("method frame too short")
        key: tuple[int, int] = _HH.unpack_from(payload, 0)
        info = self.by_key.get(key)
        if info is None:
            raise _codec.DecodeError(f"unknown method {key}")
        values = _codec.decode_arguments(info.types, payload, 4)
        return info, dict(zip(info.fields, values, strict=True))


@lru_cache(maxsize=1)
def load_spec() -> Any:
    """txamqp's model of the project's AMQP 0-9-1 spec, loaded once per process."""
    return txspec.load(str(SPEC_PATH))


@lru_cache(maxsize=1)
def tables() -> SpecTables:
    """The project's :class:`SpecTables`, built once per process."""
    return SpecTables(load_spec())
