"""``/metrics`` over HTTP with twisted.web (imported only when asked for: twisted.web
takes a tenth of a second to import)."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TCPServer
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from txcallme._prometheus import CONTENT_TYPE, Registry


class MetricsResource(Resource):
    """Renders *registry* in the Prometheus text format on GET."""

    isLeaf = True

    def __init__(self, registry: Registry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        return self.registry.render().encode("utf-8")


def metrics_site(registry: Registry) -> Site:
    """A site with the metrics at ``/metrics`` (and nothing else)."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))  # type: ignore[arg-type]
    site = Site(root)
    site.displayTracebacks = False
    return site


def metrics_service(registry: Registry, port: int, interface: str,
                    reactor: Any = None) -> TCPServer:
    """A service listening on *interface*:*port* with :func:`metrics_site`."""
    kwargs: dict[str, Any] = {"interface": interface}
    if reactor is not None:
        kwargs["reactor"] = reactor
    service = TCPServer(port, metrics_site(registry), **kwargs)
    service.setName("callme-metrics")
    return service
