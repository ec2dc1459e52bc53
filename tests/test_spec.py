"""Check txcallme's hand-written AMQP 0-9-1 spec XML against pamqp."""

from pathlib import Path

import pytest
from pamqp import commands, constants, exceptions
from txamqp import spec as txspec

SPEC_PATH = Path(__file__).parent.parent / "txcallme" / "amqp" / "amqp0-9-1.xml"

# pamqp renames a few AMQP field names that collide with Python names.
# Keyed by (pamqp class name, pamqp attribute) -> AMQP field name.
PAMQP_FIELD_RENAMES = {
    ("Exchange.Declare", "exchange_type"): "type",
    ("Basic.Qos", "global_"): "global",
    ("Basic.Properties", "message_type"): "type",
}

PAMQP_METHODS = sorted(commands.INDEX_MAPPING.values(), key=lambda m: m.index)

# AMQP frame-type / size constants and their pamqp.constants counterparts.
FRAME_CONSTANTS = {
    "frame-method": constants.FRAME_METHOD,
    "frame-header": constants.FRAME_HEADER,
    "frame-body": constants.FRAME_BODY,
    "frame-heartbeat": constants.FRAME_HEARTBEAT,
    "frame-min-size": constants.FRAME_MIN_SIZE,
    "frame-end": constants.FRAME_END,
    "reply-success": constants.REPLY_SUCCESS,
}


@pytest.fixture(scope="module")
def spec():
    """Load the spec XML once per module with txamqp's loader."""
    return txspec.load(str(SPEC_PATH))


def _amqp_name(pamqp_name):
    """Turn pamqp 'Exchange.DeclareOk' into ('exchange', 'declare-ok')."""
    klass, method = pamqp_name.split(".")
    dashed = "".join("-" + c.lower() if c.isupper() else c for c in method)
    return klass.lower(), dashed.lstrip("-")


def _pamqp_fields(cls):
    """Return pamqp's ordered [(amqp field name, type)] for a method/properties class."""
    return [
        (
            PAMQP_FIELD_RENAMES.get((cls.name, slot), slot.replace("_", "-")),
            cls.amqp_type(slot),
        )
        for slot in cls.__slots__
    ]


def _spec_fields(container):
    """Return our spec's ordered [(field name, resolved type)] for a field container."""
    return [(f.name, f.type) for f in container]


def _spec_methods(spec):
    """Yield every method defined in the loaded spec."""
    for klass in spec.classes:
        yield from klass.methods


def _pamqp_id(pamqp_method):
    """Return a readable pytest id for a pamqp method class."""
    return pamqp_method.name


def test_spec_loads_with_txamqp(spec):
    """The XML loads in txamqp with the conventions txamqp relies on."""
    assert (spec.major, spec.minor) == (0, 9)
    publish = spec.classes.byname["basic"].methods.byname["publish"]
    assert publish.content is True
    declare = spec.classes.byname["exchange"].methods.byname["declare"]
    assert "nowait" in declare.fields.byname
    for pyname in ("frame_method", "frame_header", "frame_body", "frame_heartbeat", "frame_end"):
        assert pyname in spec.constants.bypyname, f"missing constant {pyname}"
    assert hasattr(spec.klass, "basic_publish")
    assert hasattr(spec.klass, "exchange_declare")


def test_no_wait_fields_named_nowait(spec):
    """Every no-wait flag is spelled 'nowait', since txamqp looks it up by that name."""
    bad = [
        f"{m.klass.name}.{m.name}.{f.name}"
        for m in _spec_methods(spec)
        for f in m.fields
        if f.name.replace("-", "").replace("_", "") == "nowait" and f.name != "nowait"
    ]
    assert not bad, f"no-wait fields not named 'nowait': {bad}"


@pytest.mark.parametrize("pamqp_method", PAMQP_METHODS, ids=_pamqp_id)
def test_pamqp_method_matches_spec(spec, pamqp_method):
    """Each pamqp method exists in our spec with identical ids, fields, types and flags."""
    class_name, method_name = _amqp_name(pamqp_method.name)
    class_id, method_id = pamqp_method.index >> 16, pamqp_method.index & 0xFFFF
    assert method_id == pamqp_method.frame_id

    assert class_name in spec.classes.byname, f"class {class_name!r} missing from spec"
    klass = spec.classes.byname[class_name]
    assert klass.id == class_id, f"class {class_name}: index {klass.id} != pamqp {class_id}"

    assert method_name in klass.methods.byname, (
        f"method {class_name}.{method_name} ({pamqp_method.name}) missing from spec"
    )
    method = klass.methods.byname[method_name]
    label = f"{class_name}.{method_name}"
    assert method.id == method_id, f"{label}: index {method.id} != pamqp {method_id}"
    assert _spec_fields(method.fields) == _pamqp_fields(pamqp_method), (
        f"{label}: fields differ\n  spec:  {_spec_fields(method.fields)}"
        f"\n  pamqp: {_pamqp_fields(pamqp_method)}"
    )
    assert method.synchronous == pamqp_method.synchronous, (
        f"{label}: synchronous={method.synchronous} != pamqp {pamqp_method.synchronous}"
    )
    ours = sorted(r.name for r in method.responses)
    theirs = sorted(_amqp_name(r)[1] for r in pamqp_method.valid_responses)
    assert all(_amqp_name(r)[0] == class_name for r in pamqp_method.valid_responses)
    assert ours == theirs, f"{label}: responses {ours} != pamqp {theirs}"


def test_every_spec_method_is_in_pamqp(spec):
    """Every method in our spec exists in pamqp under the same class/method index."""
    extra = [
        f"{m.klass.name}.{m.name} ({m.klass.id},{m.id})"
        for m in _spec_methods(spec)
        if (m.klass.id << 16 | m.id) not in commands.INDEX_MAPPING
        or _amqp_name(commands.INDEX_MAPPING[m.klass.id << 16 | m.id].name)
        != (m.klass.name, m.name)
    ]
    assert not extra, f"spec methods unknown to pamqp or named differently: {extra}"


def test_content_methods(spec):
    """Exactly basic.publish, return, deliver and get-ok carry content."""
    content = sorted(f"{m.klass.name}.{m.name}" for m in _spec_methods(spec) if m.content)
    assert content == ["basic.deliver", "basic.get-ok", "basic.publish", "basic.return"]


def test_basic_properties_match_pamqp(spec):
    """The basic class header properties match pamqp's Basic.Properties in name, order and type."""
    basic = spec.classes.byname["basic"]
    ours = _spec_fields(basic.fields)
    theirs = _pamqp_fields(commands.Basic.Properties)
    assert ours == theirs, f"basic properties differ\n  spec:  {ours}\n  pamqp: {theirs}"


def test_only_basic_has_properties(spec):
    """No class other than basic declares content header properties."""
    with_fields = [c.name for c in spec.classes if len(c.fields)]
    assert with_fields == ["basic"]


@pytest.mark.parametrize("name", sorted(FRAME_CONSTANTS))
def test_frame_constant(spec, name):
    """Frame-type, frame-size and reply-success constants match pamqp.constants."""
    assert name in spec.constants.byname, f"constant {name!r} missing from spec"
    value = spec.constants.byname[name].id
    assert value == FRAME_CONSTANTS[name], f"{name}: {value} != pamqp {FRAME_CONSTANTS[name]}"


@pytest.mark.parametrize(
    "error", sorted(exceptions.CLASS_MAPPING.values(), key=lambda e: e.value), ids=lambda e: e.name
)
def test_reply_code(spec, error):
    """Each pamqp reply code exists in our spec with the same value and soft/hard class."""
    name = error.name.lower()
    assert name in spec.constants.byname, f"reply code {name!r} missing from spec"
    const = spec.constants.byname[name]
    assert const.id == error.value, f"{name}: {const.id} != pamqp {error.value}"
    expected = "soft-error" if issubclass(error, exceptions.AMQPSoftError) else "hard-error"
    assert const.klass == expected, f"{name}: class {const.klass!r} != {expected!r}"


def test_no_unknown_constants(spec):
    """Every constant in our spec is a pamqp frame constant or reply code."""
    known = set(FRAME_CONSTANTS) | {e.name.lower() for e in exceptions.CLASS_MAPPING.values()}
    extra = [c.name for c in spec.constants if c.name not in known]
    assert not extra, f"constants unknown to pamqp: {extra}"


def test_field_types_are_primitive(spec):
    """Every field resolves to a primitive type txamqp's codec can encode."""
    primitives = set(constants.DATA_TYPES)
    bad = [
        f"{k.name}.{f.name}: {f.type}"
        for k in spec.classes
        for f in k.fields
        if f.type not in primitives
    ] + [
        f"{m.klass.name}.{m.name}.{f.name}: {f.type}"
        for m in _spec_methods(spec)
        for f in m.fields
        if f.type not in primitives
    ]
    assert not bad, f"fields with non-primitive types: {bad}"
