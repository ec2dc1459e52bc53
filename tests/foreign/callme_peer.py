"""The real callme 0.2.0 package, unmodified, as a server or a client.

    callme_peer.py server SERVER_ID LABEL   serve add, div, fail, echo, who
    callme_peer.py client SERVER_ID N       make the standard calls, N x who()

The client prints one JSON object per line: the call and its outcome.
"""

from __future__ import annotations

import json
import sys
import threading

import callme
import callme_app

HOST = "127.0.0.1"


def serve(server_id: str, label: str) -> None:
    server = callme.Server(server_id, amqp_host=HOST)
    for name in ("add", "div", "fail", "echo"):
        server.register_function(getattr(callme_app, name), name)
    server.register_function(callme_app.who(label), "who")
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    server.wait()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes stdin
    server.stop()
    thread.join(5)


def outcome(func, *args) -> dict:
    try:
        return {"result": func(*args)}
    except Exception as e:
        return {"error": type(e).__module__ + "." + type(e).__qualname__,
                "args": [repr(a) for a in e.args]}


def client(server_id: str, count: int) -> None:
    proxy = callme.Proxy(server_id, amqp_host=HOST, timeout=10)
    calls = [("add", (1, 2)), ("add", ("a", "b")), ("div", (1, 0)), ("fail", ("boom",)),
             ("echo", ([1, (2, 3), {"k": {4}}, b"\x00\xff", None, 1.5],)),
             ("no_such_function", ())]
    for name, args in calls:
        print(json.dumps({"call": name, **outcome(getattr(proxy, name), *args)},
                         default=repr), flush=True)
    for _ in range(count):
        print(json.dumps({"call": "who", **outcome(proxy.who)}), flush=True)


if __name__ == "__main__":
    role, server_id, arg = sys.argv[1:4]
    if role == "server":
        serve(server_id, arg)
    else:
        client(server_id, int(arg))
