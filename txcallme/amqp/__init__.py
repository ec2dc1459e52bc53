"""An AMQP 0-9-1 client for Twisted that knows nothing about RPC.

The only package of txcallme that imports txamqp (whose protocol factory is
how it connects). The RPC layer (envelopes, Proxy, dispatch, the service)
uses only the names exported here.

- :mod:`~txcallme.amqp.params`: where and how to connect (URLs, TLS).
- :mod:`~txcallme.amqp.codec`, :mod:`~txcallme.amqp.properties`,
  :mod:`~txcallme.amqp.frames`: the binary encoding, pure functions.
- :mod:`~txcallme.amqp.protocol`: txamqp's protocol and factory with
  txcallme's frame pipeline.
- :mod:`~txcallme.amqp.handshake`: logging in, and the broker's refusals.
- :mod:`~txcallme.amqp.endpoint`: several broker addresses, TLS.
- :mod:`~txcallme.amqp.channel`: connections and channels as Deferreds.
- :mod:`~txcallme.amqp.publisher`: publishing with confirms.
- :mod:`~txcallme.amqp.acks`: acks coalesced per reactor turn.
- :mod:`~txcallme.amqp.session`: a connection that comes back.
"""

from txcallme.amqp.acks import Acker
from txcallme.amqp.channel import Channel, Connection, Delivery, Returned
from txcallme.amqp.params import ConnectionParams, TLSSettings, connection_params, parse_url
from txcallme.amqp.publisher import ConfirmedPublisher
from txcallme.amqp.session import Session, backoff, connect

__all__ = [
    "Acker",
    "backoff",
    "Channel",
    "ConfirmedPublisher",
    "connect",
    "Connection",
    "connection_params",
    "ConnectionParams",
    "Delivery",
    "parse_url",
    "Returned",
    "Session",
    "TLSSettings",
]
