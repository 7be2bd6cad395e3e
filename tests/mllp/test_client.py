"""The MLLP client protocol, driven through StringTransport and Clock.

No sockets, no sleeping: the test plays the peer by feeding reply frames to
dataReceived and reading what the protocol wrote from the transport.
"""
from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from exchange.mllp.client import MLLPClientProtocol, QueueFull, ReplyTimeout, client_endpoint, connect
from exchange.mllp.framing import FramingError, encode

MSG1 = b"MSH|^~\\&|APP|GENHOSP|EX|EX|20260101120000||ADT^A01|C1|P|2.5\rPID|1||123\r"
MSG2 = b"MSH|^~\\&|APP|GENHOSP|EX|EX|20260101120000||ADT^A01|C2|P|2.5\rPID|1||456\r"
MSG3 = b"MSH|^~\\&|APP|GENHOSP|EX|EX|20260101120000||ADT^A01|C3|P|2.5\rPID|1||789\r"
ACK1 = b"MSH|^~\\&|EX|EX|APP|GENHOSP|20260101120001||ACK^A01|A1|P|2.5\rMSA|AA|C1\r"
ACK2 = b"MSH|^~\\&|EX|EX|APP|GENHOSP|20260101120001||ACK^A01|A2|P|2.5\rMSA|AE|C2|bad\r"
ACK3 = b"MSH|^~\\&|EX|EX|APP|GENHOSP|20260101120001||ACK^A01|A3|P|2.5\rMSA|AR|C3\r"


def connected(timeout=30.0, **kwargs):
    clock = Clock()
    protocol = MLLPClientProtocol(clock, timeout=timeout, **kwargs)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


class Result:
    """Collects what a Deferred fired with, so the test can assert on it."""

    def __init__(self, d):
        self.value = None
        self.failure: Failure | None = None
        self.fired = False
        d.addCallbacks(self._ok, self._failed)

    def _ok(self, value):
        self.fired, self.value = True, value

    def _failed(self, failure):
        self.fired, self.failure = True, failure


def lose(protocol, transport, reason=None):
    """What the reactor does after abortConnection/loseConnection or a peer close."""
    transport.disconnecting = True
    protocol.connectionLost(Failure(reason or ConnectionDone("closed")))


def test_send_frames_the_payload_and_fires_with_the_reply():
    protocol, transport, _ = connected()
    result = Result(protocol.send(MSG1))
    assert transport.value() == encode(MSG1)
    assert not result.fired
    protocol.dataReceived(encode(ACK1))
    assert result.value == ACK1
    assert protocol.pending == 0


def test_reply_split_across_reads():
    protocol, transport, _ = connected()
    result = Result(protocol.send(MSG1))
    frame = encode(ACK1)
    for i in range(len(frame)):
        protocol.dataReceived(frame[i : i + 1])
    assert result.value == ACK1


def test_one_in_flight_the_rest_queued_in_order():
    protocol, transport, _ = connected()
    results = [Result(protocol.send(m)) for m in (MSG1, MSG2, MSG3)]
    assert transport.value() == encode(MSG1)  # only the first is written
    assert protocol.pending == 3
    transport.clear()

    protocol.dataReceived(encode(ACK1))
    assert results[0].value == ACK1
    assert transport.value() == encode(MSG2)  # the next one goes out after the reply
    transport.clear()

    # two replies in one read: each goes to its own send, in order
    protocol.dataReceived(encode(ACK2) + encode(ACK3)[:10])
    assert results[1].value == ACK2
    assert transport.value() == encode(MSG3)
    assert not results[2].fired
    protocol.dataReceived(encode(ACK3)[10:])
    assert results[2].value == ACK3
    assert protocol.pending == 0


def test_send_from_a_reply_callback_keeps_the_queue_order():
    protocol, transport, _ = connected()
    order = []
    d1 = protocol.send(MSG1)
    d1.addCallback(lambda _: order.append(("again", protocol.send(MSG3))))
    protocol.send(MSG2)
    protocol.dataReceived(encode(ACK1))
    # MSG2 (queued before) goes out before MSG3 (sent from the callback)
    assert transport.value() == encode(MSG1) + encode(MSG2)
    protocol.dataReceived(encode(ACK2))
    assert transport.value() == encode(MSG1) + encode(MSG2) + encode(MSG3)


def test_unsolicited_reply_is_ignored():
    protocol, transport, _ = connected()
    protocol.dataReceived(encode(ACK1))
    result = Result(protocol.send(MSG2))
    protocol.dataReceived(encode(ACK2))
    assert result.value == ACK2


def test_send_before_connection_made_waits_for_it():
    clock = Clock()
    protocol = MLLPClientProtocol(clock)
    result = Result(protocol.send(MSG1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.value() == encode(MSG1)
    protocol.dataReceived(encode(ACK1))
    assert result.value == ACK1


def test_timeout_fails_the_send_and_drops_the_connection():
    protocol, transport, clock = connected(timeout=5)
    first = Result(protocol.send(MSG1))
    second = Result(protocol.send(MSG2))
    clock.advance(4.9)
    assert not first.fired
    clock.advance(0.1)
    assert first.failure.check(ReplyTimeout)
    assert isinstance(first.failure.value, TimeoutError)
    assert "no reply within 5 s" in str(first.failure.value)
    assert transport.disconnecting  # abortConnection
    assert not second.fired  # fails when the connection is really gone
    lose(protocol, transport)
    assert second.failure.check(ConnectionLost)
    assert transport.value() == encode(MSG1)  # MSG2 was never written


def test_timer_restarts_for_each_message_and_stops_after_reply():
    protocol, transport, clock = connected(timeout=5)
    protocol.send(MSG1)
    second = Result(protocol.send(MSG2))
    clock.advance(4)
    protocol.dataReceived(encode(ACK1))
    clock.advance(4)  # 8 s since MSG1, 4 s since MSG2
    assert not second.fired
    clock.advance(1)
    assert second.failure.check(ReplyTimeout)
    assert clock.getDelayedCalls() == []


def test_no_timeout_when_disabled():
    protocol, transport, clock = connected(timeout=None)
    result = Result(protocol.send(MSG1))
    assert clock.getDelayedCalls() == []
    clock.advance(10_000)
    protocol.dataReceived(encode(ACK1))
    assert result.value == ACK1


def test_connection_lost_fails_in_flight_and_queued():
    protocol, transport, clock = connected()
    results = [Result(protocol.send(m)) for m in (MSG1, MSG2, MSG3)]
    lose(protocol, transport, ConnectionLost("peer went away"))
    for result in results:
        assert result.failure.check(ConnectionLost)
        assert "peer went away" in str(result.failure.value)
    assert clock.getDelayedCalls() == []  # the reply timer is cancelled
    assert protocol.pending == 0
    # after the connection is gone a send fails at once
    late = Result(protocol.send(MSG1))
    assert late.failure.check(ConnectionLost)


def test_clean_close_by_the_peer_is_still_connection_lost_for_pending_sends():
    protocol, transport, _ = connected()
    result = Result(protocol.send(MSG1))
    lose(protocol, transport, ConnectionDone("Connection was closed cleanly."))
    assert result.failure.check(ConnectionLost)


def test_oversize_reply_is_a_framing_error():
    protocol, transport, _ = connected(max_frame_bytes=100)
    first = Result(protocol.send(MSG1))
    second = Result(protocol.send(MSG2))
    protocol.dataReceived(encode(b"MSH|" + b"x" * 200))
    assert first.failure.check(FramingError)
    assert transport.disconnecting
    lose(protocol, transport)
    assert second.failure.check(ConnectionLost)


def test_queue_is_bounded():
    protocol, transport, _ = connected(max_queued=2)
    protocol.send(MSG1)  # in flight, not queued
    protocol.send(MSG2)
    protocol.send(MSG3)
    overflow = Result(protocol.send(MSG1))
    assert overflow.failure.check(QueueFull)


def test_cancel_a_queued_send_removes_it():
    protocol, transport, _ = connected()
    protocol.send(MSG1)
    d2 = protocol.send(MSG2)
    third = Result(protocol.send(MSG3))
    cancelled = Result(d2)
    d2.cancel()
    assert cancelled.failure.check(CancelledError)
    protocol.dataReceived(encode(ACK1))
    assert transport.value() == encode(MSG1) + encode(MSG3)
    protocol.dataReceived(encode(ACK3))
    assert third.value == ACK3


def test_cancel_the_send_in_flight_drops_the_connection():
    protocol, transport, clock = connected()
    d1 = protocol.send(MSG1)
    result = Result(d1)
    d1.cancel()
    assert result.failure.check(CancelledError)
    assert transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_close_loses_the_connection():
    protocol, transport, _ = connected()
    protocol.close()
    assert transport.disconnecting


# -- endpoints ----------------------------------------------------------------------


def test_host_port_becomes_a_hostname_endpoint():
    from twisted.internet.endpoints import HostnameEndpoint

    reactor = MemoryReactorClock()
    endpoint = client_endpoint(reactor, "127.0.0.1:2575")
    assert isinstance(endpoint, HostnameEndpoint)
    assert endpoint._hostBytes == b"127.0.0.1" and endpoint._port == 2575
    v6 = client_endpoint(reactor, "[::1]:2575")
    assert v6._hostBytes == b"::1"
    assert client_endpoint(reactor, "adt.genhosp.example:2575")._hostBytes == b"adt.genhosp.example"


def test_endpoint_strings_go_to_client_from_string():
    from twisted.internet.endpoints import TCP4ClientEndpoint

    reactor = MemoryReactorClock()
    endpoint = client_endpoint(reactor, "tcp:host=127.0.0.1:port=2575")
    assert isinstance(endpoint, TCP4ClientEndpoint)


def test_tls_endpoint_accepts_ca_certs_dir_as_trust_roots(tmp_path):
    from twisted.internet.endpoints import _WrapperEndpoint, clientFromString

    reactor = MemoryReactorClock()
    description = f"tls:host=localhost:port=2575:caCertsDir={tmp_path}"
    with pytest.raises(TypeError):  # stock Twisted does not know the name on tls:
        clientFromString(reactor, description)
    assert isinstance(client_endpoint(reactor, description), _WrapperEndpoint)
    assert isinstance(client_endpoint(reactor, "tls:host=localhost:port=2575"), _WrapperEndpoint)


@pytest.mark.parametrize("description", ["nonsense", "tcp:port=2575", "tls:port=2575", "localhost:99999", "unix"])
def test_bad_endpoint_strings(description):
    with pytest.raises(ValueError):
        client_endpoint(MemoryReactorClock(), description)


def test_connect_connects_a_protocol_with_the_reactor_as_clock():
    reactor = MemoryReactorClock()
    result = Result(connect(reactor, "tcp:host=127.0.0.1:port=2575", timeout=7))
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 2575)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert isinstance(result.value, MLLPClientProtocol)
    send = Result(result.value.send(MSG1))
    reactor.advance(7)
    assert send.failure.check(ReplyTimeout)


def test_connect_with_a_bad_description_fails_the_deferred():
    result = Result(connect(MemoryReactorClock(), "nonsense"))
    assert result.failure.check(ValueError)


def test_a_reply_the_sender_calls_stale_is_skipped_and_the_send_waits_on_within_its_timeout():
    protocol, transport, clock = connected(timeout=10.0)
    result = Result(protocol.send(MSG2, stale=lambda frame: b"MSA|AA|C1" in frame))
    clock.advance(6)
    protocol.dataReceived(encode(ACK1))  # the answer to C1 again: not C2's
    assert not result.fired and not transport.disconnecting
    protocol.dataReceived(encode(ACK2))
    assert result.value == ACK2
    # the timeout still counts from the send: a stream of stale frames never keeps it waiting
    late = Result(protocol.send(MSG3, stale=lambda frame: True))
    clock.advance(9)
    protocol.dataReceived(encode(ACK1))
    clock.advance(1)
    assert late.failure is not None and late.failure.check(ReplyTimeout) and transport.disconnecting
