"""The HTTP endpoint: /healthz and /metrics (no authentication), /api (exchange.web.api,
bearer tokens) and, for every other path, the workbench (exchange.web.workbench, a login)."""
from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from exchange import __version__


MAX_REQUEST_BYTES = 1024 * 1024  # no page or API call takes a body larger than this


class LimitedRequest(Request):
    """A request whose body may not exceed ``MAX_REQUEST_BYTES``: refused with 413 and the
    connection closed as soon as the Content-Length (or the chunks so far) says so, before
    the body is buffered or parsed on the reactor (a form body is parsed in one go there)."""

    _refused = False
    _received = 0

    def gotLength(self, length):
        if length is not None and length > MAX_REQUEST_BYTES:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_REQUEST_BYTES:
            self._refuse()
            return
        super().handleContentChunk(data)

    def process(self):
        if self.isSecure():  # a browser that came once over TLS never falls back to plain HTTP
            self.setHeader(b"strict-transport-security", b"max-age=31536000")
        try:
            unquote_to_bytes(self.uri).decode("utf-8")
        except UnicodeDecodeError:  # the API and the pages route on text: a 400 that says so, not a traceback
            body = json.dumps({"error": "the request path is not UTF-8"}).encode()
            self.setResponseCode(400)
            self.setHeader(b"content-type", b"application/json")
            self.setHeader(b"content-length", b"%d" % len(body))
            self.write(body)
            self.finish()
            return
        super().process()

    def _refuse(self) -> None:
        self._refused = True
        body = json.dumps({"error": f"the request body is larger than {MAX_REQUEST_BYTES} bytes"}).encode()
        self.channel.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self.channel.loseConnection()


class Health(Resource):
    isLeaf = True

    def __init__(self, status: Callable[[], dict]) -> None:
        super().__init__()
        self._status = status

    def render_GET(self, request) -> bytes:
        """200 ``{"status": "ok", ...}``; 503 when the status says otherwise (no writer: nothing
        would be acknowledged), so that a load balancer or a monitor takes the node out."""
        body = {"status": "ok", "version": __version__, **self._status()}
        if body["status"] != "ok":
            request.setResponseCode(503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()


class Metrics(Resource):
    """``/metrics``: the registry in the text format the scraper's Accept asks for (Prometheus
    or OpenMetrics). GET, and HEAD as Twisted answers it (the GET's headers, no body);
    prometheus_client's own resource answered HEAD 405. Rendered on the reactor: a few
    hundred lines of text from counters in memory, no I/O."""

    isLeaf = True

    def render_GET(self, request) -> bytes:
        encoder, content_type = choose_encoder((request.getHeader(b"accept") or b"").decode("latin-1"))
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        return encoder(REGISTRY)


class Root(Resource):
    """``/healthz``, ``/metrics`` and ``/api`` as children; every other path (``/`` too)
    goes whole to ``fallback`` (the workbench), or is a 404 without one."""

    def __init__(self, fallback: IResource | None = None) -> None:
        super().__init__()
        self.fallback = fallback

    def getChild(self, path: bytes, request) -> IResource:
        if self.fallback is None:
            return super().getChild(path, request)
        # Give the segment back: the fallback routes on the whole path, from "/".
        request.postpath.insert(0, request.prepath.pop())
        return self.fallback


def build_root(status: Callable[[], dict], api: IResource | None = None,
               workbench: IResource | None = None) -> Resource:
    root = Root(workbench)
    root.putChild(b"healthz", Health(status))
    root.putChild(b"metrics", Metrics())
    if api is not None:
        root.putChild(b"api", api)
    return root


def build_site(status: Callable[[], dict], api: IResource | None = None,
               workbench: IResource | None = None) -> Site:
    root = build_root(status, api, workbench)
    site = Site(root, requestFactory=LimitedRequest)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None  # no access log: request paths can carry patient identifiers
    return site

