"""callme's getting-started client, on Twisted: call ``add(1, 1)`` on ``fooserver``.

Start ``python examples/getting_started_server.py`` first. An optional argument
names the server id (default ``fooserver``); ``CALLME_AMQP_URL`` names the broker.
"""

import os
import sys

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from txcallme import Proxy


async def main(reactor, server_id="fooserver"):
    proxy = Proxy(amqp_url=os.environ.get("CALLME_AMQP_URL"), timeout=10)
    try:
        result = await proxy.use_server(server_id).add(1, 1)
        print(f"1 + 1 = {result}")
    finally:
        await proxy.close()


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, *sys.argv[1:2])))
