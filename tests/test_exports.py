"""The public names of txcallme are the real objects, and txamqp stays in one module."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import txcallme
from txcallme import _params, errors, proxy, serializers, service

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


class TxamqpConfinementTests(SynchronousTestCase):
    """Only txcallme/_amqp.py imports txamqp."""

    def test_pattern(self) -> None:
        """The scan recognises both import forms and ignores mentions in prose."""
        self.assertTrue(TXAMQP_IMPORT.search("import txamqp.spec\n"))
        self.assertTrue(TXAMQP_IMPORT.search("x = 1\n    from txamqp.client import Closed\n"))
        self.assertFalse(TXAMQP_IMPORT.search('"""The only module that imports txamqp."""\n'))

    def test_only_amqp_module_imports_txamqp(self) -> None:
        """No txcallme module but _amqp.py contains an import of txamqp."""
        sources = sorted(PACKAGE_DIR.rglob("*.py"))
        self.assertIn(PACKAGE_DIR / "_amqp.py", sources)
        offenders = [str(path.relative_to(PACKAGE_DIR)) for path in sources
                     if path.name != "_amqp.py"
                     and TXAMQP_IMPORT.search(path.read_text(encoding="utf-8"))]
        self.assertEqual(offenders, [])

    def test_amqp_module_does_import_txamqp(self) -> None:
        """_amqp.py is where txamqp is imported (so the scan is not vacuous)."""
        text = (PACKAGE_DIR / "_amqp.py").read_text(encoding="utf-8")
        self.assertTrue(TXAMQP_IMPORT.search(text))
