"""The HTTP endpoint's own protections, at the protocol level (StringTransport)."""
from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from exchange.web.server import MAX_REQUEST_BYTES, build_site


def connect():
    site = build_site(lambda: {})
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_body_over_the_limit_is_refused_before_it_is_read():
    """Found by a black-box audit: a 50 MB form body to /login (no login needed) was buffered and
    parsed on the reactor, and every MLLP ACK waited 7 s for it."""
    protocol, transport = connect()
    protocol.dataReceived(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                          b"Content-Length: %d\r\n\r\n" % (50 * 1024 * 1024))
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"larger than" in transport.value() and transport.disconnecting


def test_a_chunked_body_is_refused_once_it_passes_the_limit():
    protocol, transport = connect()
    protocol.dataReceived(b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"a=b&" * 16384  # 64 KiB
    for _ in range(MAX_REQUEST_BYTES // len(chunk) + 1):
        if transport.disconnecting:
            break
        protocol.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    assert transport.value().startswith(b"HTTP/1.1 413 ") and transport.disconnecting


def test_a_small_body_is_served():
    protocol, transport = connect()
    protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert transport.value().startswith(b"HTTP/1.1 200 ") and b'"status": "ok"' in transport.value()


def test_a_path_that_is_not_utf8_is_a_400_with_a_reason():
    """Found by a black-box audit: an HTML 400 and a traceback in the log."""
    protocol, transport = connect()
    protocol.dataReceived(b"GET /api/records/GENHOSP/%FF%FE HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ") and b'"error": "the request path is not UTF-8"' in transport.value()


def test_over_tls_every_answer_tells_the_browser_to_stay_on_tls():
    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import directlyProvides

    site = build_site(lambda: {})
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    directlyProvides(transport, ISSLTransport)
    transport.setTcpNoDelay = lambda enabled: None  # what HTTPChannel asks of a TLS transport
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"Strict-Transport-Security: max-age=31536000" in transport.value()
    plain_protocol, plain = connect()
    plain_protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"Strict-Transport-Security" not in plain.value()


def test_healthz_answers_503_while_the_writer_keeps_dying():
    """Found by a black-box audit: with the writer dying in a loop (nothing acknowledged),
    /healthz said 200 ok, so no monitor or load balancer noticed."""
    from twisted.internet.error import ProcessTerminated
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from exchange.app import health
    from exchange.writer import WriterProcess

    clock = Clock()
    writer = WriterProcess(clock, ["true"])
    writer.start = lambda: None  # spawning is not what this is about: only when it ran and ended
    writer.connectionMade()
    assert writer.down_since is None and health(writer.down_since, clock.seconds()) == "ok"
    writer.processEnded(Failure(ProcessTerminated(exitCode=1)))
    clock.advance(1)
    assert health(writer.down_since, clock.seconds()) == "ok"  # a restart takes a second
    for _ in range(4):  # found by a verification audit: each new writer killed as it started
        writer.connectionMade()
        clock.advance(0.5)
        writer.processEnded(Failure(ProcessTerminated(exitCode=1)))
        clock.advance(0.5)
    assert health(writer.down_since, clock.seconds()) == "unavailable" and writer.restarts == 5
    writer.connectionMade()
    clock.advance(1.9)
    assert health(writer.down_since, clock.seconds()) == "unavailable"  # not proved yet
    clock.advance(0.2)
    assert health(writer.down_since, clock.seconds()) == "ok"

    # A writer that runs but whose commit does not end (a lock held by a stopped node).
    assert health(None, clock.seconds(), commit_seconds=29.9) == "ok"
    assert health(None, clock.seconds(), commit_seconds=30.0) == "stalled"
    # messages that went unanswered (the database failing), none committed since
    assert health(None, clock.seconds(), unanswered_seconds=0.0) == "failing"
    assert health(None, clock.seconds(), unanswered_seconds=29.9) == "failing"
    assert health(None, clock.seconds(), unanswered_seconds=30.0) == "ok"  # forgotten without traffic
    # found by a failure audit: 30 s after the last failed commit, a full disk said ok
    assert health(None, clock.seconds(), disk_short=True) == "disk_full"


def test_the_room_on_a_sqlite_databases_disk_is_measured(tmp_path):
    from exchange.store.db import disk_free_bytes

    assert disk_free_bytes(f"sqlite:///{tmp_path / 'x.db'}") > 0
    assert disk_free_bytes("sqlite:///:memory:") is None
    assert disk_free_bytes("postgresql+psycopg://postgres@127.0.0.1/x") is None
    assert disk_free_bytes(f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}") is None

    site = build_site(lambda: {"status": "unavailable", "writer": {"running": False, "restarts": 2}})
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 503 ") and b'"status": "unavailable"' in transport.value()


def test_metrics_answer_get_and_head():
    """HEAD /metrics was a 405 (prometheus_client's resource) while HEAD /healthz was a 200."""
    protocol, transport = connect()
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/plain; version=0.0.4" in head
    assert b"# TYPE exchange_messages_received_total counter" in body
    protocol, transport = connect()
    protocol.dataReceived(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/plain" in head and body == b""
    protocol, transport = connect()
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert b"application/openmetrics-text" in head and body.rstrip().endswith(b"# EOF")
