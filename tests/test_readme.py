"""Every code block in README.rst is run or checked, so the README cannot rot.

``.. code-block:: LANG`` blocks are run (python programs, console commands) or
parsed and checked against the code (the systemd unit); ``::`` literal blocks
(wire-protocol JSON, permission lines) are checked against the wire encoding
and the permissions the broker tests apply. A block of any other kind fails
until a check for it is added here. The API section's names, signatures and
errors, and the ``twistd callme`` options table, are compared with the code.
"""

from __future__ import annotations

import ast
import configparser
import inspect
import json
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import new_server_id
from twisted.python import usage
from twisted.scripts._twistd_unix import ServerOptions

import txcallme
from txcallme import _wire, tap
from txcallme.serializers import JSONSerializer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"
EXAMPLES = ROOT / "examples"
TWISTD = Path(sys.executable).with_name("twistd")
TIMEOUT = 60
TWISTD_LOG = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")


@attrs.frozen
class Block:
    """One code block of README.rst: its kind, first line number and text."""

    kind: str  # the code-block language, or "literal" for a ``::`` block
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.kind}"


def parse_blocks(source: str) -> list[Block]:
    """The ``code-block`` directives and ``::`` literal blocks of an RST text."""
    lines = source.splitlines()
    blocks = []
    for number, line in enumerate(lines):
        directive = re.fullmatch(r"\.\. code-block::\s*(\S*)\s*", line)
        if directive:
            kind = directive.group(1) or "(none)"
        elif line.endswith("::") and not line.startswith(".."):
            kind = "literal"
        else:
            continue
        body = []
        start = number + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        end = start
        while end < len(lines) and (not lines[end].strip() or lines[end][:1].isspace()):
            body.append(lines[end])
            end += 1
        blocks.append(Block(kind, start + 1, textwrap.dedent("\n".join(body)).strip() + "\n"))
    return blocks


def section(source: str, title: str) -> str:
    """The text of the section titled *title*, up to the next title of any level."""
    lines = source.splitlines()
    start = lines.index(title) + 2
    end = start
    while end < len(lines) - 1 and not re.fullmatch(r"([=\-~])\1{3,}", lines[end + 1]):
        end += 1
    return "\n".join(lines[start:end])


README_TEXT = README.read_text()
BLOCKS = parse_blocks(README_TEXT)


# -- python ------------------------------------------------------------------

#: Distinctive text of each runnable python block -> what its stdout must be,
#: one regular expression per line.
PYTHON_OUTPUTS = {
    '"readme-server"': [r"2", r"hello", r"3"],
    '"readme-calls"': [
        r"0\.5",
        r"remote: division by zero \| traceback lines: [1-9]\d*",
        r"no server is serving 'nobody-serves-this'.*",
        r"2\.0",
    ],
    '"readme-blocking"': [r"2"],
    '"readme-asyncio"': [r"2"],
    "MemoryBroker(clock)": [],  # asserts inside the block
}


def check_app_module(block: Block) -> None:
    """The ``app.py`` block is examples/app.py's function, and it adds."""
    assert block.text.startswith("# app.py\n")
    code = block.text.removeprefix("# app.py\n")
    assert code in (EXAMPLES / "app.py").read_text(), "README app.py differs from examples/app.py"
    namespace: dict[str, Any] = {}
    exec(compile(code, f"README.rst:{block.line}", "exec"), namespace)
    assert namespace["add"](1, 2) == 3


def check_python(block: Block, tmp_path: Path) -> None:
    if block.text.startswith("# app.py"):
        check_app_module(block)
        return
    expected = [lines for key, lines in PYTHON_OUTPUTS.items() if key in block.text]
    assert len(expected) == 1, "add this python block's expected output to PYTHON_OUTPUTS"
    program = tmp_path / f"readme_line{block.line}.py"
    program.write_text(block.text)
    result = subprocess.run([sys.executable, str(program)], cwd=ROOT, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    # A twistd the program starts logs to the same stdout: not the program's output.
    printed = [line for line in result.stdout.splitlines() if not TWISTD_LOG.match(line)]
    assert len(printed) == len(expected[0]), result.stdout
    for line, pattern in zip(printed, expected[0], strict=True):
        assert re.fullmatch(pattern, line), (pattern, result.stdout)


# -- console -----------------------------------------------------------------

CLIENT = """\
import sys, time
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater, react
from txcallme import Proxy, ServerUnavailable

async def main(reactor):
    proxy = Proxy(amqp_host="127.0.0.1", timeout=5)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                print(await proxy.use_server(sys.argv[1]).add(1, 1))
                return
            except ServerUnavailable:
                if time.monotonic() > deadline:
                    raise
                await deferLater(reactor, 0.2, lambda: None)
    finally:
        await proxy.close()

react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
"""


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Popen objects killed at teardown if still running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_twistd_callme(args: list[str], cwd: Path, tmp_path: Path,
                      processes: list[subprocess.Popen[str]]) -> None:
    """Start the documented twistd command, call add(1, 1) on it, stop it with SIGTERM."""
    assert args[:3] == ["-n", "callme", "--server-id"], args
    server_id = new_server_id()
    args = [*args]
    args[3] = server_id
    # The pid file twistd writes by default (cwd/twistd.pid) goes to tmp_path, so
    # runs at the same time do not refuse to start.
    command = [str(TWISTD), f"--pidfile={tmp_path / 'twistd.pid'}", *args]
    log = tmp_path / "twistd.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  text=True)
    processes.append(server)
    client_script = tmp_path / "client.py"
    client_script.write_text(CLIENT)
    client = subprocess.run([sys.executable, str(client_script), server_id], cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert client.returncode == 0, (client.stderr, log.read_text())
    assert client.stdout == "2\n"
    server.send_signal(signal.SIGTERM)
    # twistd re-raises SIGTERM after its clean shutdown (tests/test_twistd.py).
    assert server.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
    assert "Server Shut Down." in log.read_text()


def check_console(block: Block, tmp_path: Path,
                  processes: list[subprocess.Popen[str]]) -> None:
    commands = block.text.splitlines()
    assert commands and all(line.startswith("$ ") for line in commands), block.text
    for command in commands:
        words = shlex.split(command[2:])
        if words[0] == "make":
            # make -n: the target exists and its recipe expands (make test
            # would run this test again).
            assert len(words) == 2, command
            result = subprocess.run(["make", "-n", words[1]], cwd=ROOT, capture_output=True,
                                    text=True, timeout=TIMEOUT)
            assert result.returncode == 0, result.stderr
        elif words[:4] == ["cd", "examples", "&&", "twistd"]:
            run_twistd_callme(words[4:], ROOT / "examples", tmp_path, processes)
        else:
            pytest.fail(f"no check for console command {command!r}")


# -- ini (systemd unit) --------------------------------------------------------

#: systemd specifiers a unit may use (systemd.unit(5)); "%%" is a literal "%".
SYSTEMD_SPECIFIERS = set("aAbBCEfgGhHiIjJlLmMnNopPsStTuUvVwW")


def systemd_unescape(value: str) -> str:
    """*value* as systemd passes it on; fails on a "%" that is no specifier."""
    for match in re.finditer(r"%(.?)", value.replace("%%", "")):
        assert match.group(1) in SYSTEMD_SPECIFIERS, f"bad systemd specifier in {value!r}"
    assert "%" not in value.replace("%%", ""), f"unhandled specifier in {value!r}"
    return value.replace("%%", "%")


def check_ini(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(block.text)
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    assert set(service) == {"User", "WorkingDirectory", "Environment", "ExecStart",
                            "Restart", "RestartSec", "KillSignal", "KillMode",
                            "TimeoutStopSec"}
    assert service["KillMode"] == "mixed"  # twistd stops its --processes workers itself
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert int(service["TimeoutStopSec"]) > 0
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    name, _, url = systemd_unescape(service["Environment"]).partition("=")
    assert name == "CALLME_AMQP_URL"
    monkeypatch.setenv(name, url)
    words = shlex.split(systemd_unescape(service["ExecStart"]))
    assert words[0] == service["WorkingDirectory"] + "/.venv/bin/twistd"
    assert "callme" in words
    # `--module app` must import: run from examples/, where app.py is.
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.setattr(sys, "path", list(sys.path))
    had_app = "app" in sys.modules
    try:
        options = ServerOptions()
        options.parseOptions(words[1:])
        assert options["nodaemon"]
        assert options["pidfile"] == ""
        assert options["logfile"] == "-"
        assert options.subCommand == "callme"
        callme = tap.Options()
        callme.parseOptions(words[words.index("callme") + 1:])
    finally:
        if not had_app:
            sys.modules.pop("app", None)
    for parsed in (options.subOptions, callme):
        assert parsed["server-id"] == "fooserver"
        assert parsed["threads"] == 16
        assert parsed["processes"] == 4
        # systemd waits longer than a worker's drain plus the kill margin
        assert int(service["TimeoutStopSec"]) > parsed["stop-timeout"] + tap.KILL_MARGIN
        assert set(parsed["functions"]) == {"add"}
        params = parsed["params"]
        assert (params.user, params.password, params.vhost) == ("carl", "secret", "/")
        assert params.hosts == (("localhost", 5672),)


# -- literal blocks: wire protocol and permissions ------------------------------

def json_values(text: str) -> list[Any]:
    """The JSON documents written one after another in *text*."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while position < len(text):
        value, position = decoder.raw_decode(text, position)
        values.append(value)
        while position < len(text) and text[position].isspace():
            position += 1
    return values


def check_wire_json(block: Block) -> None:
    values = json_values(block.text)
    if "method" in values[0]:
        (body,) = values
        request = _wire.decode_request(JSONSerializer(), block.text.encode())
        assert request == _wire.Request("add", [1, 2], {}, 1764220000.5)
        assert json.loads(_wire.encode_request(JSONSerializer(), request)) == body
        return
    result, error = values
    reply = _wire.decode_reply(JSONSerializer(), json.dumps(result).encode())
    assert reply.ok and reply.value == 3
    assert json.loads(_wire.encode_result(JSONSerializer(), 3)) == result
    reply = _wire.decode_reply(JSONSerializer(), json.dumps(error).encode())
    assert not reply.ok
    assert reply.error == error["error"]
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError as e:
        actual = _wire.error_description(e)
    assert set(actual) == set(error["error"])
    assert {k: actual[k] for k in ("type", "message", "args")} == {
        k: error["error"][k] for k in ("type", "message", "args")}
    assert actual["traceback"].startswith("Traceback ")


def applied_permissions(role: str, user: str) -> tuple[str, ...]:
    """The permissions tests/test_permissions.py gives *role* (as user *user*)."""
    import test_permissions

    tree = ast.parse(inspect.getsource(test_permissions.env))
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == role:
                    namespace = {"u": {role: user}, "FOO": test_permissions.FOO,
                                 "BAR": test_permissions.BAR,
                                 "_server_perms": test_permissions._server_perms}
                    return tuple(eval(compile(ast.Expression(value), "perms", "eval"),
                                      namespace))
    raise AssertionError(f"test_permissions.py applies no permissions for {role!r}")


def check_permissions(block: Block) -> None:
    lines = block.text.splitlines()
    assert len(lines) == 2
    for line, user in zip(lines, ("carl", "olivia"), strict=True):
        words = shlex.split(line)
        assert words[:4] == ["rabbitmqctl", "set_permissions", "-p", "VHOST"], line
        assert words[4] == user
        assert tuple(words[5:]) == applied_permissions(user, user), line
        for pattern in words[5:]:
            re.compile(pattern)
    _, write, _ = shlex.split(lines[1])[5:]
    assert re.search(write, "server_fooserver_ex")
    assert not re.search(write, "server_barserver_ex")


def check_direct_reply_permissions(block: Block) -> None:
    """The Direct Reply-to grants: the server may write amq.default, the client
    configures and reads nothing and writes only fooserver's exchange (the
    client line is applied on the broker by test_proxy_broker.py)."""
    lines = block.text.splitlines()
    assert len(lines) == 2
    carl, olivia = (shlex.split(line) for line in lines)
    for words, user in ((carl, "carl"), (olivia, "olivia")):
        assert words[:5] == ["rabbitmqctl", "set_permissions", "-p", "VHOST", user]
    assert re.search(carl[6], "amq.default") and re.search(carl[6], "server_fooserver_ex")
    configure, write, read = olivia[5:]
    for name in ("client_olivia_ex_1", "client_olivia_queue_1", "amq.rabbitmq.reply-to",
                 "server_fooserver_queue"):
        assert not re.search(configure, name) and not re.search(read, name)
    assert re.search(write, "server_fooserver_ex")
    assert not re.search(write, "server_barserver_ex")


def check_literal(block: Block) -> None:
    if block.text.startswith("{"):
        check_wire_json(block)
    elif block.text.startswith("rabbitmqctl set_permissions") and "amq\\.default" in block.text:
        check_direct_reply_permissions(block)
    elif block.text.startswith("rabbitmqctl set_permissions"):
        check_permissions(block)
    elif block.text.startswith(("trace ", "# HELP txcallme_")):  # Observability
        from test_observe import check_readme_block

        check_readme_block(block.text)
    else:
        pytest.fail(f"no check for the literal block at line {block.line}")


# -- every block -------------------------------------------------------------

def test_readme_has_blocks() -> None:
    """The parser finds the README's blocks (an empty parametrization tests nothing)."""
    kinds = {block.kind for block in BLOCKS}
    assert {"python", "console", "ini", "literal"} <= kinds
    assert len(BLOCKS) >= 12


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_code_block(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    processes: list[subprocess.Popen[str]]) -> None:
    """The README block runs and does what the README says (one test per block)."""
    if block.kind == "python":
        check_python(block, tmp_path)
    elif block.kind == "console":
        check_console(block, tmp_path, processes)
    elif block.kind == "ini":
        check_ini(block, monkeypatch)
    elif block.kind == "literal":
        check_literal(block)
    else:
        pytest.fail(f"unknown code block language {block.kind!r}: add a check for it")


# -- API section -------------------------------------------------------------

API = section(README_TEXT, "API")


def api_entries() -> list[tuple[str, str]]:
    """(term, body) of each definition in the API section."""
    entries: list[tuple[str, str]] = []
    for line in API.splitlines():
        if line.startswith("``"):
            entries.append((line, ""))
        elif line.startswith("   ") and entries:
            term, body = entries[-1]
            entries[-1] = (term, body + line + "\n")
    return entries


def resolve(name: str) -> Any:
    """``txcallme.x.Y`` or a name importable from ``txcallme``."""
    if name.startswith("txcallme."):
        module, _, attr = name.rpartition(".")
        __import__(module)
        return getattr(sys.modules[module], attr)
    return getattr(txcallme, name)


def documented_parameters(arguments: str) -> list[str]:
    """Parameter names of a README signature such as ``a, b='x, y', *, c=1``."""
    names = []
    for part in re.split(r",(?=(?:[^']*'[^']*')*[^']*$)", arguments):
        name = part.split("=")[0].strip()
        if name not in ("*", "/", "", "..."):
            names.append(name.lstrip("*"))
    return names


def actual_parameters(func: Any) -> list[str]:
    return [name for name in inspect.signature(func).parameters if name != "self"]


API_TERMS = [(term, body) for term, body in api_entries() if not term.startswith("``Errors")]


def test_api_section_parsed() -> None:
    """The API section's definitions are found (so the checks below check something)."""
    terms = " ".join(term for term, _ in api_entries())
    for name in ("Proxy(", "CallmeServerService(", "TLSSettings(", "MemoryBroker"):
        assert name in terms


@pytest.mark.parametrize("term,body", API_TERMS, ids=[t[2:40] for t, _ in API_TERMS])
def test_api_names_exist(term: str, body: str) -> None:
    """Every name the API section defines exists, with the documented parameters."""
    for match in re.finditer(r"``([\w.]+)(?:\((.*?)\))?``", term):
        obj = resolve(match.group(1))
        if match.group(2) not in (None, "..."):
            assert documented_parameters(match.group(2)) == actual_parameters(obj), term
        if not inspect.isclass(obj):
            continue
        for method in re.finditer(r"^   - ``(\w+)\((.*?)\)``", body, re.MULTILINE):
            func = getattr(obj, method.group(1))
            assert documented_parameters(method.group(2)) == actual_parameters(func), (
                method.group(0))


def test_documented_errors_exist() -> None:
    """Each error the API section names is a txcallme error type."""
    paragraph = API[API.index("Errors (all subclass ``CallmeError``)"):].split("\n\n")[0]
    names = [name for name in re.findall(r"``(\w+)``", paragraph) if name[0].isupper()]
    assert len(names) >= 15
    for name in names:
        error = getattr(txcallme, name)
        assert issubclass(error, txcallme.CallmeError), name


def test_twistd_options_table() -> None:
    """The options table lists exactly the options ``twistd callme`` has."""
    table = section(README_TEXT, "``twistd callme`` options")
    documented: dict[str, str | None] = {}
    for line in table.splitlines():
        match = re.match(r"``--([\w-]+)``(?:, ``-(\w)``)?\s", line)
        if match:
            documented[match.group(1)] = match.group(2)
    options = tap.Options
    actual = {row[0]: row[1] for row in [*options.optParameters, *options.optFlags]}
    assert documented == actual
    # and nothing beyond usage.Options' own --help/--version
    defined = {name for name in tap.Options().longOpt if name.rstrip("=") not in actual}
    assert {name.rstrip("=") for name in defined} <= {"help", "version"}
    assert issubclass(tap.Options, usage.Options)

