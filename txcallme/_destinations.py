"""One channel per destination server for a Proxy's requests.

A publish to a missing (404) or forbidden (403) exchange closes its channel,
and the broker drops whatever was pipelined after it on that channel. Giving
each destination server its own channel confines that to the calls made to
that server, which would fail the same way anyway, so no publisher confirms
are needed on the hot path: a ``mandatory`` request that nothing is bound to
comes back as basic.return, carrying its correlation id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from txcallme.amqp import Channel, Connection, Returned
from txcallme.errors import CallmeError


class Destination:
    """The request channel for one server id, opened on first use.

    *returned(corr)* is called for a request that came back unroutable;
    *closed(destination, error)* when its channel failed to open or was closed
    by the broker: every request sent through this destination is then lost.
    """

    def __init__(self, connection: Connection, exchange: str, routing_key: str,
                 returned: Callable[[str], None],
                 closed: Callable[[Destination, CallmeError], None]) -> None:
        self._connection = connection
        self.exchange = exchange
        self.routing_key = routing_key
        self._returned = returned
        self._closed = closed
        self.channel: Channel | None = None
        self._opening: Deferred[Channel] | None = None
        self._waiting: list[tuple[bytes, dict[str, Any]]] = []

    def send(self, body: bytes, properties: dict[str, Any]) -> None:
        """Publish now if the channel is open, else when it is."""
        channel = self.channel
        if channel is not None:
            channel.publish(self.exchange, self.routing_key, body, properties, True)
            return
        self._waiting.append((body, properties))
        if self._opening is None:
            self._opening = self._connection.open_channel()
            self._opening.addCallbacks(self._opened, self._open_failed)

    def _opened(self, channel: Channel) -> None:
        self._opening = None
        self.channel = channel
        channel.on_return = self._on_return
        channel.on_close.append(lambda error: self._on_close(channel, error))
        waiting, self._waiting = self._waiting, []
        for body, properties in waiting:
            channel.publish(self.exchange, self.routing_key, body, properties, True)

    def _open_failed(self, reason: Failure) -> None:
        self._opening = None
        self._waiting.clear()
        error = reason.value
        self._closed(self, error if isinstance(error, CallmeError)
                     else CallmeError(str(error)))

    def _on_return(self, message: Returned) -> None:
        corr = message.properties.get("correlation_id")
        if isinstance(corr, str):
            self._returned(corr)

    def _on_close(self, channel: Channel, error: CallmeError) -> None:
        if self.channel is channel:
            self.channel = None
            self._closed(self, error)

    def close(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None and not channel.closed:
            channel.close()
