"""The callme getting-started server functions, for ``twistd callme --module app``."""


def add(a, b):
    """Return a + b."""
    return a + b
