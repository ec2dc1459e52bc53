"""txcallme: RPC over AMQP for Twisted, the event-driven successor of callme."""

from txcallme._version import __version__
from txcallme.amqp import ConnectionParams, TLSSettings, connection_params
from txcallme.errors import (
    AccessRefused,
    AuthenticationError,
    BrokerConnectionLost,
    BrokerUnreachable,
    CallmeError,
    ChannelError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ProxyClosed,
    RemoteError,
    RpcTimeout,
    SerializationError,
    ServerUnavailable,
    TLSError,
    UnknownMethod,
)
from txcallme.proxy import Proxy, ServerProxy
from txcallme.serializers import JSONSerializer, PickleSerializer, Serializer
from txcallme.server import CallContext
from txcallme.service import CallmeServerService

__all__ = [
    "__version__",
    "AccessRefused",
    "AuthenticationError",
    "BrokerConnectionLost",
    "BrokerUnreachable",
    "CallContext",
    "CallmeError",
    "CallmeServerService",
    "ChannelError",
    "connection_params",
    "ConnectionParams",
    "InvalidRequest",
    "JSONSerializer",
    "NotFound",
    "PayloadTooLarge",
    "PickleSerializer",
    "Proxy",
    "ProxyClosed",
    "RemoteError",
    "RpcTimeout",
    "SerializationError",
    "Serializer",
    "ServerProxy",
    "ServerUnavailable",
    "TLSError",
    "TLSSettings",
    "UnknownMethod",
]
