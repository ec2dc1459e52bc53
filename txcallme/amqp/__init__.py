"""An AMQP 0-9-1 client for Twisted that knows nothing about RPC.

The only package of txcallme that imports txamqp (whose protocol factory is
how it connects). The RPC layer (envelopes, Proxy, dispatch, the service)
uses only the names exported here.

- :mod:`~txcallme.amqp.params`: where and how to connect (URLs, TLS).
- :mod:`~txcallme.amqp.spec`: the spec and txcallme's tables over it.
- :mod:`~txcallme.amqp.codec`, :mod:`~txcallme.amqp.properties`,
  :mod:`~txcallme.amqp.frames`: the binary encoding, pure functions.
- :mod:`~txcallme.amqp.protocol`: txamqp's protocol and factory with
  txcallme's frame pipeline.
- :mod:`~txcallme.amqp.handshake`: logging in, and the broker's refusals.
- :mod:`~txcallme.amqp.endpoint`: several broker addresses, TLS.
- :mod:`~txcallme.amqp.channel`: connections and the one channel lifecycle
  (states, control timeouts, what became of each publish, flow control).
- :mod:`~txcallme.amqp.publisher`: publishing with confirms.
- :mod:`~txcallme.amqp.acks`: acks coalesced per reactor turn.
- :mod:`~txcallme.amqp.session`: a connection that comes back.
- :mod:`~txcallme.amqp.memory`: an in-memory broker speaking real frames, for
  tests (``ConnectionParams(connector=broker.connector())`` connects to it).
"""

from txcallme.amqp.acks import Acker
from txcallme.amqp.channel import (
    Channel,
    ChannelState,
    Connection,
    Delivery,
    Outcome,
    PublishOutcome,
    QueueDeclared,
    Returned,
)
from txcallme.amqp.endpoint import BrokerEndpoint
from txcallme.amqp.memory import MemoryBroker
from txcallme.amqp.params import (
    ConnectionParams,
    TLSSettings,
    connection_params,
    parse_url,
    parse_urls,
)
from txcallme.amqp.publisher import ConfirmedPublisher
from txcallme.amqp.session import Session, backoff, connect

__all__ = [
    "Acker",
    "backoff",
    "BrokerEndpoint",
    "Channel",
    "ChannelState",
    "ConfirmedPublisher",
    "connect",
    "Connection",
    "connection_params",
    "ConnectionParams",
    "Delivery",
    "MemoryBroker",
    "Outcome",
    "parse_url",
    "parse_urls",
    "PublishOutcome",
    "QueueDeclared",
    "Returned",
    "Session",
    "TLSSettings",
]
