"""The HTTP endpoint: /healthz and /metrics (no authentication), /api (exchange.web.api;
the workbench joins here)."""
from __future__ import annotations

import json
from collections.abc import Callable

from prometheus_client.twisted import MetricsResource
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from exchange import __version__


class Health(Resource):
    isLeaf = True

    def __init__(self, status: Callable[[], dict]) -> None:
        super().__init__()
        self._status = status

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps({"status": "ok", "version": __version__, **self._status()}).encode()


def build_root(status: Callable[[], dict], api: IResource | None = None) -> Resource:
    root = Resource()
    root.putChild(b"healthz", Health(status))
    root.putChild(b"metrics", MetricsResource())
    if api is not None:
        root.putChild(b"api", api)
    return root


def build_site(status: Callable[[], dict], api: IResource | None = None) -> Site:
    root = build_root(status, api)
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None  # no access log: request paths can carry patient identifiers
    return site

