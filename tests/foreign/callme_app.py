"""Functions and an exception type shared by the callme 0.2.0 peers and the
txcallme compat servers in tests/test_interop_callme.py (importable by both
sides, as an application's own module would be)."""

from __future__ import annotations

import os


class AppError(Exception):
    """An application exception type, not a builtin."""


def add(a, b):
    return a + b


def div(a, b):
    return a / b


def fail(text):
    raise AppError(text, 42)


def echo(value):
    return value


def who(label):
    """A function answering which server instance ran the call."""
    return lambda: f"{label}:{os.getpid()}"
