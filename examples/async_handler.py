"""An ``async def`` handler: it runs on the reactor and may await Deferreds.

The server and a client run in one process. ``CALLME_AMQP_URL`` names the broker.
"""

import os
import uuid

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.task import react

from txcallme import CallmeServerService, Proxy


async def main(reactor):
    async def delayed_greeting(name, delay=0.1):
        """Wait without blocking the reactor, then answer."""
        await task.deferLater(reactor, delay, lambda: None)
        return f"hello, {name}"

    url = os.environ.get("CALLME_AMQP_URL")
    server_id = f"async-{uuid.uuid4().hex[:8]}"
    server = CallmeServerService(server_id, amqp_url=url)
    server.register_function(delayed_greeting)
    server.startService()
    proxy = Proxy(amqp_url=url, timeout=10)
    try:
        await server.when_ready()
        result = await proxy.use_server(server_id).delayed_greeting("world", delay=0.2)
        print(f"delayed_greeting('world', delay=0.2) = {result!r}")
    finally:
        await proxy.close()
        await server.stopService()


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
