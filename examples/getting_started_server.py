"""callme's getting-started server, on Twisted: expose ``add`` as ``fooserver``.

Run it, then ``python examples/getting_started_client.py`` in another terminal.
It prints ``ready`` once it consumes requests and serves until Ctrl-C or
SIGTERM, finishing running calls before it exits. An optional argument names
the server id (default ``fooserver``); ``CALLME_AMQP_URL`` names the broker
(default ``amqp://guest:guest@localhost:5672/``).
"""

import os
import sys

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from txcallme import CallmeServerService


def add(a, b):
    return a + b


async def main(reactor, server_id="fooserver"):
    server = CallmeServerService(server_id, amqp_url=os.environ.get("CALLME_AMQP_URL"))
    server.register_function(add, "add")
    server.startService()

    stopped = Deferred()

    async def stop():
        await server.stopService()
        print("stopped", flush=True)
        stopped.callback(None)

    # Ctrl-C and SIGTERM stop the reactor; stop the server gracefully first.
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: Deferred.fromCoroutine(stop()))
    await server.when_ready()
    print(f"ready: serving {server_id!r}", flush=True)
    await stopped


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, *sys.argv[1:2])))
