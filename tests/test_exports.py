"""The public names of txcallme are the real objects, and the tree keeps its two layers."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import txcallme
from txcallme import errors, proxy, serializers, service
from txcallme.amqp import params as _params

PACKAGE_DIR = Path(txcallme.__file__).parent

TXAMQP_IMPORT = re.compile(r"^\s*(?:import\s+txamqp\b|from\s+txamqp\b)", re.MULTILINE)


class ExportTests(SynchronousTestCase):
    """txcallme.__all__."""

    def test_all_names_exist(self) -> None:
        """Every name in __all__ is an attribute of the package."""
        for name in txcallme.__all__:
            self.assertTrue(hasattr(txcallme, name), name)

    def test_no_duplicates(self) -> None:
        """__all__ lists each name once."""
        self.assertEqual(len(txcallme.__all__), len(set(txcallme.__all__)))

    def test_same_objects(self) -> None:
        """Each public name is the very object from the txcallme module that defines it."""
        for name in txcallme.__all__:
            if name == "__version__":
                continue
            value = getattr(txcallme, name)
            home = value.__module__
            self.assertTrue(home.startswith("txcallme."), f"{name} comes from {home}")
            self.assertIs(getattr(sys.modules[home], name), value, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                self.assertEqual(home, errors.__name__, name)

    def test_examples(self) -> None:
        """The main entry points are the real classes."""
        self.assertIs(txcallme.Proxy, proxy.Proxy)
        self.assertIs(txcallme.ServerProxy, proxy.ServerProxy)
        self.assertIs(txcallme.JSONSerializer, serializers.JSONSerializer)
        self.assertIs(txcallme.ConnectionParams, _params.ConnectionParams)
        self.assertIs(txcallme.CallmeServerService, service.CallmeServerService)
        self.assertIs(txcallme.CallmeError, errors.CallmeError)
        self.assertIs(txcallme.RemoteError, errors.RemoteError)

    def test_exported_errors(self) -> None:
        """Every exported error is a CallmeError subclass from txcallme.errors."""
        for name in txcallme.__all__:
            value = getattr(txcallme, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                self.assertIs(value, getattr(errors, name))
                self.assertTrue(issubclass(value, errors.CallmeError), name)

    def test_version(self) -> None:
        """__version__ is a non-empty string."""
        self.assertIsInstance(txcallme.__version__, str)
        self.assertTrue(txcallme.__version__)


class LayeringTests(SynchronousTestCase):
    """Two layers: txcallme.amqp (AMQP 0-9-1, owns txamqp) under the RPC modules."""

    def test_pattern(self) -> None:
        """The scan recognises both import forms and ignores mentions in prose."""
        self.assertTrue(TXAMQP_IMPORT.search("import txamqp.spec\n"))
        self.assertTrue(TXAMQP_IMPORT.search("x = 1\n    from txamqp.client import Closed\n"))
        self.assertFalse(TXAMQP_IMPORT.search('"""The only module that imports txamqp."""\n'))

    def test_only_amqp_package_imports_txamqp(self) -> None:
        """No module outside txcallme/amqp/ contains an import of txamqp, and one inside does."""
        sources = sorted(PACKAGE_DIR.rglob("*.py"))
        inside = [p for p in sources if p.parent == AMQP_DIR]
        offenders = [str(p.relative_to(PACKAGE_DIR)) for p in sources
                     if p.parent != AMQP_DIR and TXAMQP_IMPORT.search(p.read_text("utf-8"))]
        self.assertEqual(offenders, [])
        self.assertTrue(any(TXAMQP_IMPORT.search(p.read_text("utf-8")) for p in inside))

    def test_amqp_layer_knows_no_rpc(self) -> None:
        """txcallme.amqp imports only itself, txcallme.errors and txcallme._version."""
        allowed = {"txcallme.errors", "txcallme._version"}
        for module, imported in _internal_imports():
            if module.startswith("txcallme.amqp"):
                bad = {m for m in imported
                       if not m.startswith("txcallme.amqp") and m not in allowed}
                self.assertEqual(bad, set(), module)

    def test_rpc_layer_uses_public_amqp_names(self) -> None:
        """Outside txcallme.amqp, the AMQP layer is imported only as ``txcallme.amqp``."""
        for module, imported in _internal_imports():
            if not module.startswith("txcallme.amqp"):
                deep = {m for m in imported if m.startswith("txcallme.amqp.")}
                self.assertEqual(deep, set(), module)

    def test_no_private_names_across_modules(self) -> None:
        """No module imports a _private name from another txcallme module."""
        offenders = []
        for path in sorted(PACKAGE_DIR.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("txcallme"):
                    offenders += [f"{path.name}: {a.name}" for a in node.names
                                  if a.name.startswith("_") and not a.name.startswith("__")
                                  and not _is_module(f"{node.module}.{a.name}")]
        self.assertEqual(offenders, [])

    def test_no_import_cycles(self) -> None:
        """The graph of module-level imports between txcallme modules has no cycle."""
        graph = {m: {i for i in imported if i in MODULES} for m, imported in
                 _internal_imports(top_level_only=True)}
        state: dict[str, int] = {}

        def visit(node: str, path: list[str]) -> None:
            state[node] = 1
            for nxt in graph.get(node, ()):
                if state.get(nxt) == 1:
                    self.fail("import cycle: " + " -> ".join([*path, node, nxt]))
                if nxt not in state:
                    visit(nxt, [*path, node])
            state[node] = 2

        for node in graph:
            if node not in state:
                visit(node, [])


AMQP_DIR = PACKAGE_DIR / "amqp"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p) for p in PACKAGE_DIR.rglob("*.py")}


def _is_module(name: str) -> bool:
    return name in MODULES


def _internal_imports(top_level_only: bool = False) -> list[tuple[str, set[str]]]:
    """(module, txcallme modules it imports) for every txcallme module."""
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        imported: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("txcallme"):
                assert node.module is not None
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    imported.add(full if _is_module(full) else node.module)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("txcallme")}
        found.append((_module_name(path), imported))
    return found
