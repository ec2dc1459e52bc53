"""Blocking handlers in a thread pool: ``threading=True, threads=8``.

The server and a client run in one process: 8 concurrent calls of a handler
that sleeps 0.2 s finish in about 0.2 s, not 1.6 s, because each runs in its
own thread of the server's pool while the reactor keeps serving.
``CALLME_AMQP_URL`` names the broker.
"""

import os
import time
import uuid

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react

from txcallme import CallmeServerService, Proxy

CALLS = 8
SECONDS = 0.2


def slow_square(x):
    """A blocking function: fine here, it runs in a pool thread."""
    time.sleep(SECONDS)
    return x * x


async def main(reactor):
    url = os.environ.get("CALLME_AMQP_URL")
    server_id = f"threaded-{uuid.uuid4().hex[:8]}"
    server = CallmeServerService(server_id, amqp_url=url, threading=True, threads=CALLS)
    server.register_function(slow_square)
    server.startService()
    proxy = Proxy(amqp_url=url, timeout=10)
    try:
        await server.when_ready()
        await proxy.when_ready()
        remote = proxy.use_server(server_id)
        start = time.monotonic()
        results = await gatherResults([remote.slow_square(i) for i in range(CALLS)],
                                      consumeErrors=True)
        elapsed = time.monotonic() - start
        assert results == [i * i for i in range(CALLS)], results
        print(f"{CALLS} calls of {SECONDS} s in {elapsed:.2f} s")
    finally:
        await proxy.close()
        await server.stopService()


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
