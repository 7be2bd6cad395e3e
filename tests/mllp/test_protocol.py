"""The MLLP server protocol, driven through StringTransport and Clock.

The handler stands for the intake: it records each frame and returns a
Deferred the test fires, the way a group commit fires when its transaction
has committed. No sockets, no sleeping.
"""
from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exchange.mllp.framing import encode
from exchange.mllp.protocol import MLLPServerFactory, MLLPServerProtocol

MSG = b"MSH|^~\\&|APP|GENHOSP|EX|EX|20260101120000||ADT^A01|C1|P|2.5\rPID|1||123\r"


class Recorder:
    def __init__(self):
        self.calls: list[tuple[bytes, dict]] = []
        self.pending: list[Deferred] = []

    def __call__(self, payload, peer, **kwargs):
        self.calls.append((payload, kwargs))
        d = Deferred()
        self.pending.append(d)
        return d


def connect(handler, *, max_frame_bytes=16 * 1024 * 1024, idle_timeout=None, clock=None):
    factory = MLLPServerFactory(handler, max_frame_bytes=max_frame_bytes, idle_timeout=idle_timeout)
    proto = factory.buildProtocol(None)
    if clock is not None:
        proto.callLater = clock.callLater
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, factory


def test_frame_is_delegated_and_ack_waits_for_the_commit():
    h = Recorder()
    proto, transport, _ = connect(h)
    proto.dataReceived(encode(MSG))
    assert [c[0] for c in h.calls] == [MSG]
    assert transport.value() == b""  # nothing before the commit
    h.pending[0].callback(b"MSH|ACK1")
    assert transport.value() == encode(b"MSH|ACK1")


def test_replies_leave_in_arrival_order_even_when_commits_finish_out_of_order():
    h = Recorder()
    proto, transport, _ = connect(h)
    proto.dataReceived(encode(b"MSH|one") + encode(b"MSH|two") + encode(b"MSH|three")[:7])
    proto.dataReceived(encode(b"MSH|three")[7:])
    assert [c[0] for c in h.calls] == [b"MSH|one", b"MSH|two", b"MSH|three"]
    h.pending[2].callback(b"A3")
    h.pending[1].callback(b"A2")
    assert transport.value() == b""
    h.pending[0].callback(b"A1")
    assert transport.value() == encode(b"A1") + encode(b"A2") + encode(b"A3")


def test_inbound_ack_gets_no_reply_and_does_not_block_the_next():
    h = Recorder()
    proto, transport, _ = connect(h)
    proto.dataReceived(encode(b"MSH|ack") + encode(b"MSH|msg"))
    h.pending[0].callback(None)
    h.pending[1].callback(b"A2")
    assert transport.value() == encode(b"A2")


def test_junk_before_the_start_block_is_skipped():
    h = Recorder()
    proto, _, _ = connect(h)
    proto.dataReceived(b"\r\n garbage \x00\xff" + encode(MSG))
    assert [c[0] for c in h.calls] == [MSG]


def test_oversize_frame_gets_a_nak_then_the_connection_closes():
    h = Recorder()
    proto, transport, _ = connect(h, max_frame_bytes=4096)
    proto.dataReceived(b"\x0b" + MSG + b"OBX|" + b"x" * 10000)
    assert len(h.calls) == 1
    prefix, kwargs = h.calls[0]
    assert prefix.startswith(MSG)
    assert "4096" in kwargs["force_reject"]
    assert not transport.disconnecting  # the NAK is not committed yet
    h.pending[0].callback(b"NAK")
    assert transport.value() == encode(b"NAK")
    assert transport.disconnecting
    proto.dataReceived(encode(MSG))  # anything after is ignored
    assert len(h.calls) == 1


def test_a_frame_that_cannot_be_committed_gets_no_ack_and_closes_the_connection():
    proto, transport, _ = connect(lambda payload, peer, **kw: fail(RuntimeError("database down")))
    proto.dataReceived(encode(MSG))
    assert transport.value() == b""
    assert transport.disconnecting


def test_earlier_answers_still_leave_before_a_failed_frame_closes_the_connection():
    h = Recorder()
    proto, transport, _ = connect(h)
    proto.dataReceived(encode(b"MSH|one") + encode(b"MSH|two"))
    h.pending[1].errback(RuntimeError("database down"))
    assert not transport.disconnecting
    h.pending[0].callback(b"A1")
    assert transport.value() == encode(b"A1")
    assert transport.disconnecting


def test_a_sender_that_half_closes_still_gets_every_answer_then_the_connection_closes():
    h = Recorder()
    proto, transport, _ = connect(h)
    proto.dataReceived(encode(b"MSH|one") + encode(b"MSH|two"))
    proto.readConnectionLost()  # shutdown(SHUT_WR) after the last frame
    assert not transport.disconnecting
    h.pending[0].callback(b"A1")
    assert transport.value() == encode(b"A1") and not transport.disconnecting
    h.pending[1].callback(b"A2")
    assert transport.value() == encode(b"A1") + encode(b"A2") and transport.disconnecting


def test_a_half_close_with_nothing_owed_closes_at_once():
    h = Recorder()
    proto, transport, _ = connect(h)
    proto.readConnectionLost()
    assert transport.disconnecting


def test_idle_connection_is_closed_after_the_timeout():
    clock = Clock()
    proto, transport, _ = connect(Recorder(), idle_timeout=30, clock=clock)
    clock.advance(29)
    assert not transport.disconnecting
    proto.dataReceived(b"\x0bMSH|partial")  # activity resets the timer
    clock.advance(29)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


def test_a_connection_waiting_for_its_ack_is_not_idle():
    clock = Clock()
    h = Recorder()
    proto, transport, _ = connect(h, idle_timeout=30, clock=clock)
    proto.dataReceived(encode(MSG))
    clock.advance(31)
    assert not transport.disconnecting
    h.pending[0].callback(b"A1")
    clock.advance(31)
    assert transport.disconnecting


def test_shutdown_stops_reading_but_answers_frames_already_taken():
    h = Recorder()
    proto, transport, factory = connect(h)
    proto.dataReceived(encode(b"MSH|one"))
    factory.stop_reading()
    assert transport.producerState == "paused"
    proto.dataReceived(encode(b"MSH|two"))
    assert len(h.calls) == 1
    h.pending[0].callback(b"A1")
    assert transport.value() == encode(b"A1")


class Backlog:
    def __init__(self):
        self.overloaded = False
        self.resume = None

    def on_capacity(self, resume):
        self.resume = resume


def test_backpressure_pauses_every_connection_until_the_backlog_drains():
    backlog = Backlog()
    h = Recorder()
    factory = MLLPServerFactory(h, max_frame_bytes=1 << 20, idle_timeout=None, committer=backlog)
    a, b = factory.buildProtocol(None), factory.buildProtocol(None)
    ta, tb = StringTransport(), StringTransport()
    a.makeConnection(ta)
    b.makeConnection(tb)
    a.dataReceived(encode(MSG))
    assert ta.producerState == tb.producerState == "producing"
    backlog.overloaded = True
    a.dataReceived(encode(MSG))
    assert ta.producerState == tb.producerState == "paused"
    backlog.overloaded = False
    backlog.resume()
    assert ta.producerState == tb.producerState == "producing"


def test_connections_are_tracked_for_shutdown():
    h = Recorder()
    proto, _, factory = connect(h)
    assert proto in factory.connections
    proto.connectionLost(None)
    assert proto not in factory.connections


def test_plain_tcp_peer_has_no_tls_identity():
    h = Recorder()
    proto, _, _ = connect(h)
    assert isinstance(proto, MLLPServerProtocol)
    assert proto.peer.identity is None
    assert proto.peer.address.startswith("192.168.1.1:")


def test_a_sender_that_does_not_read_its_acks_is_not_read_either():
    """Found by a black-box audit: a client pipelining frames without reading the ACKs grew the
    server's memory by hundreds of MB; the transport now pauses the protocol (a push producer)."""
    backlog = Backlog()
    h = Recorder()
    factory = MLLPServerFactory(h, max_frame_bytes=1 << 20, idle_timeout=None, committer=backlog)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.producer is proto and transport.streaming
    proto.dataReceived(encode(MSG))
    h.pending[0].callback(b"A1")
    proto.pauseProducing()  # what the transport calls when its write buffer is full
    assert transport.producerState == "paused"
    # the backlog draining does not resume a connection whose sender is not reading
    backlog.overloaded = True
    proto.dataReceived(encode(MSG))
    backlog.overloaded = False
    backlog.resume()
    assert transport.producerState == "paused"
    proto.resumeProducing()  # the sender read its ACKs
    assert transport.producerState == "producing"
    # and a shutdown is not undone by either
    factory.stop_reading()
    proto.resumeProducing()
    assert transport.producerState == "paused"


def test_closing_unregisters_the_producer_so_the_connection_really_closes():
    h = Recorder()
    proto, transport, _ = connect(h)
    proto.dataReceived(encode(MSG))
    proto.readConnectionLost()
    h.pending[0].callback(b"A1")
    assert transport.value() == encode(b"A1") and transport.disconnecting and transport.producer is None
