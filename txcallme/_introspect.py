"""Reserved calls every server answers unless told not to:
``__callme__.ping`` and ``__callme__.describe``."""

from __future__ import annotations

import inspect
import os
import socket
import uuid
from typing import Any

from txcallme._version import __version__
from txcallme._wire import RESERVED_PREFIX
from txcallme.server import Dispatcher

PING = RESERVED_PREFIX + "ping"
DESCRIBE = RESERVED_PREFIX + "describe"


def install(dispatcher: Dispatcher, server_id: str) -> None:
    """Register the reserved ping/describe functions on *dispatcher*."""
    instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def ping() -> dict[str, Any]:
        return {"server_id": server_id, "instance": instance, "version": __version__}

    def describe() -> dict[str, Any]:
        functions = []
        for name, handler in sorted(dispatcher.handlers.items()):
            if name.startswith(RESERVED_PREFIX):
                continue
            doc = inspect.getdoc(handler.func) or ""
            functions.append({
                "name": name,
                "signature": str(handler.signature) if handler.signature else "(...)",
                "doc": doc.strip().splitlines()[0] if doc.strip() else "",
                "blocking": handler.blocking,
            })
        return {"server_id": server_id, "instance": instance, "functions": functions}

    dispatcher.register(ping, PING, blocking=False, reserved=True)
    dispatcher.register(describe, DESCRIBE, blocking=False, reserved=True)
