"""exchange send: splitting files, reading ACKs, the send loop, and end to end.

The end-to-end tests run the real command code over a real loopback socket.
The peer is a tiny blocking MLLP server (socketserver, in a thread of the
test process) written here, independent of the exchange's own framing and
server. The sender runs in a subprocess (``task.react`` in ``python -c``):
Twisted's global reactor cannot be restarted, so running it inside pytest
would allow one test per process. Nothing sleeps: every wait is on a socket
or a process with a timeout.
"""
from __future__ import annotations

import io
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from exchange.mllp.framing import encode
from exchange.send import (
    HANGUP_WAIT,
    Ack,
    SenderProtocol,
    SendUsageError,
    SplitError,
    describe,
    read_acks,
    read_messages,
    send_command,
    send_messages,
    split_messages,
)
from tests.support import CORPUS_DIR

REPO = Path(__file__).resolve().parent.parent
CORPUS = CORPUS_DIR  # tests/corpus: a copy of ../shared/corpus (see its SOURCES.md)

BOM = b"\xef\xbb\xbf"


def synthetic(control_id: str, marker: str = "", facility: str = "GENHOSP") -> bytes:
    """A small synthetic ADT^A01 (no real patient), segments ending in CR."""
    return (
        f"MSH|^~\\&|ADT|{facility}|EXCHANGE|EXCHANGE|20260101120000||ADT^A01|{control_id}|P|2.5\r"
        f"EVN|A01|20260101120000\r"
        f"PID|1||{control_id}^^^{facility}||TEST^PATIENT{marker}\r"
    ).encode()


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def with_line_ends(message: bytes, end: bytes) -> bytes:
    return message.replace(b"\r", end)


# -- split_messages ---------------------------------------------------------------


@pytest.mark.parametrize("end", [b"\r", b"\n", b"\r\n"])
def test_corpus_message_with_any_line_end_is_one_message_with_cr(end):
    original = corpus("msfc/ADT-A01-01.hl7")  # LF in its source; CR in the corpus
    messages = split_messages(with_line_ends(original, end))
    assert messages == [original if original.endswith(b"\r") else original + b"\r"]
    assert b"\n" not in messages[0]


@pytest.mark.parametrize(
    "name, control_id",
    [
        ("ipf/msg-01-utf8_a01_v22.hl7", "123456"),
        ("ipf/iti8-a40-iso-8859-1.hl7", "_mpi_1dd16f73-c85c-4540-857d-8b922f1732de"),
        ("ipf/msg-03_mdm_t01_deu.hl7", "283148"),
        ("ipf/adt-a31-1.hl7", "207597"),
        ("msfc/ADT-A40-01.hl7", None),  # no final CR in the file
    ],
)
def test_corpus_single_messages(name, control_id):
    data = corpus(name)
    messages = split_messages(data)
    assert len(messages) == 1
    assert messages[0].rstrip(b"\r") == data.rstrip(b"\r")
    assert messages[0].endswith(b"\r") and not messages[0].endswith(b"\r\r")
    if control_id is not None:
        assert describe(name, messages[0]).control_id == control_id


def test_utf8_bom_is_stripped():
    data = corpus("msfc/ADT01-23.hl7")
    assert data.startswith(BOM)
    (message,) = split_messages(data)
    assert message.startswith(b"MSH|^~\\&|AccMgr|")
    assert describe("f", message).control_id == "599102"


def test_batch_file_is_sent_whole():
    data = corpus("pyhl7/sample_batch1_two_msgs.hl7")
    (batch,) = split_messages(data)
    assert batch.rstrip(b"\r") == data.rstrip(b"\r")
    assert batch.startswith(b"BHS|") and batch.count(b"\rMSH|") == 2
    described = describe("f", batch)
    assert described.is_batch and described.count == 2
    assert described.control_id == "abchs20070101123401-1"  # BHS-11


@pytest.mark.parametrize(
    "name, count",
    [("pyhl7/sample_file_fhs_bhs.hl7", 1), ("mirth/fhs_bhs_batch_crlf.hl7", 1), ("pyhl7/sample_bad_batch_no_msh.hl7", 1)],
)
def test_other_batches_are_one_message(name, count):
    (batch,) = split_messages(with_line_ends(corpus(name), b"\r\n"))
    assert batch.startswith((b"FHS", b"BHS")) and b"\n" not in batch
    assert describe(name, batch).count == count


def test_multi_message_file_mixed_line_ends_and_boms():
    a = corpus("msfc/ADT-A01-01.hl7")
    b = corpus("ipf/msg-01-utf8_a01_v22.hl7")
    c = corpus("msfc/ADT01-23.hl7")  # starts with a BOM: as left by `cat`
    data = with_line_ends(a, b"\n") + b"\n\n" + with_line_ends(b, b"\r\n") + with_line_ends(c, b"\n") + b"\n"
    messages = split_messages(data)
    assert [describe("f", m).control_id for m in messages] == [
        describe("f", a).control_id,
        "123456",
        "599102",
    ]
    assert messages[0].rstrip(b"\r") == a.rstrip(b"\r")
    assert messages[2].rstrip(b"\r") == c[len(BOM):].rstrip(b"\r")
    assert all(b"\n" not in m and m.endswith(b"\r") for m in messages)


def test_synthetic_multi_message_file():
    data = b"".join(with_line_ends(synthetic(f"C{i}"), b"\n") for i in range(5))
    messages = split_messages(data)
    assert messages == [synthetic(f"C{i}") for i in range(5)]


def test_segment_starting_with_msh_inside_text_is_not_a_split_only_at_segment_start():
    message = synthetic("C1").replace(b"TEST^PATIENT", b"MSH^PATIENT")  # 'MSH' mid-segment
    assert split_messages(message) == [message]


def test_framed_file():
    a, b = corpus("msfc/ADT-A01-01.hl7"), corpus("ipf/msg-01-utf8_a01_v22.hl7")
    data = encode(a) + b"\n" + encode(with_line_ends(b, b"\r\n")) + b"\r\n"
    messages = split_messages(data)
    assert [m.rstrip(b"\r") for m in messages] == [a.rstrip(b"\r"), b.rstrip(b"\r")]


def test_framed_file_with_bom_and_batch_frame():
    batch = b"BHS|^~\\&|X|GENHOSP|||||||B1\r" + synthetic("C1") + synthetic("C2") + b"BTS|2\r"
    data = BOM + encode(synthetic("C0")) + encode(batch)
    messages = split_messages(data)
    assert messages == [synthetic("C0"), batch]
    assert describe("f", messages[1]).is_batch


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"hello\rMSH|^~\\&|x\r", "text before the first MSH segment"),
        (encode(b"MSH|^~\\&|x\r") + b"junk", "bytes outside MLLP frames"),
        (b"\x0bMSH|^~\\&|x\r", "MLLP frame without end block"),
    ],
)
def test_split_errors(data, reason):
    with pytest.raises(SplitError, match=reason):
        split_messages(data)


def test_a_split_error_does_not_quote_the_text():
    """Found by a privacy audit: the error line quoted the patient's segment."""
    with pytest.raises(SplitError) as error:
        split_messages(b"PID|1||998877665^^^GENHOSP||ZZLEAKSMITH^JOHN\rMSH|^~\\&|x\r")
    assert str(error.value) == "text before the first MSH segment: 44 bytes beginning 'PID'"


@pytest.mark.parametrize("data", [b"", b"\n\r\n  \n", BOM, BOM + b"\r\n"])
def test_nothing_in_the_file(data):
    assert split_messages(data) == []


# -- read_messages (files) -------------------------------------------------------------


def test_read_messages_from_files(tmp_path):
    one = tmp_path / "one.hl7"
    one.write_bytes(with_line_ends(synthetic("C1") + synthetic("C2"), b"\r\n"))
    two = tmp_path / "two.hl7"
    two.write_bytes(encode(synthetic("C3")))
    messages = read_messages([one, str(two)])
    assert [(m.path, m.control_id) for m in messages] == [(str(one), "C1"), (str(one), "C2"), (str(two), "C3")]


@pytest.mark.parametrize(
    "content, reason",
    [(None, "no such file"), (b"", "no HL7 message in the file"), (b"PID|1\r", "text before the first MSH")],
)
def test_read_messages_usage_errors(tmp_path, content, reason):
    path = tmp_path / "x.hl7"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SendUsageError) as info:
        read_messages([path])
    assert str(info.value).startswith(f"{path}: {reason}")
    assert "\n" not in str(info.value)


def test_directory_is_a_usage_error(tmp_path):
    with pytest.raises(SendUsageError, match="is a directory"):
        read_messages([tmp_path])


def test_send_command_raises_usage_error_before_connecting(tmp_path):
    reactor = MemoryReactorClock()
    good = tmp_path / "good.hl7"
    good.write_bytes(synthetic("C1"))
    with pytest.raises(SendUsageError, match="missing.hl7: no such file"):
        send_command(reactor, "127.0.0.1:2575", [good, tmp_path / "missing.hl7"])
    assert reactor.tcpClients == [] and reactor.getDelayedCalls() == []


def test_bad_endpoint_is_a_usage_error(tmp_path):
    reactor = MemoryReactorClock()
    good = tmp_path / "good.hl7"
    good.write_bytes(synthetic("C1"))
    with pytest.raises(SendUsageError, match="bad endpoint 'nonsense'"):
        send_command(reactor, "nonsense", [good])
    assert reactor.tcpClients == []


# -- read_acks -----------------------------------------------------------------------


def test_read_acks():
    reply = b"MSH|^~\\&|EX|EX|ADT|GENHOSP|20260101||ACK^A01|A1|P|2.5\rMSA|AE|C1|PID-3 \\F\\ missing\\E\\\rERR|||101\r"
    assert read_acks(reply) == [Ack("AE", "C1", "PID-3 | missing\\")]


def test_read_acks_other_delimiters_lf_and_bom():
    reply = BOM + b"MSH#!~$&#EX#EX\nMSA#AR#C9#no $S$ thanks\n"
    assert read_acks(reply) == [Ack("AR", "C9", "no ! thanks")]


def test_read_acks_batch_reply():
    reply = (
        b"BHS|^~\\&|EX|EX||||||B9|B1\r"
        b"MSH|^~\\&|EX|EX|||||ACK|A1|P|2.5\rMSA|AA|C1\r"
        b"MSH|^~\\&|EX|EX|||||ACK|A2|P|2.5\rMSA|AR|C2|unknown facility\r"
        b"BTS|2\r"
    )
    assert read_acks(reply) == [Ack("AA", "C1", ""), Ack("AR", "C2", "unknown facility")]


@pytest.mark.parametrize("reply", [b"", b"MSH", b"MSH|^~\\&|EX\r", b"garbage"])
def test_read_acks_without_msa(reply):
    assert read_acks(reply) == []


# -- send_messages over a StringTransport -------------------------------------------------


def ack_for(message: bytes, code: str, text: str = "") -> bytes:
    control_id = describe("f", message).control_id
    return f"MSH|^~\\&|EXCHANGE|EXCHANGE|ADT|GENHOSP|20260101||ACK^A01|A-{control_id}|P|2.5\rMSA|{code}|{control_id}|{text}\r".encode()


class Peer:
    """Drives send_messages: answers each frame the protocol writes.

    ``connections`` holds every (protocol, transport) the sender was given, the
    first one and each new one it asked for after the peer hung up;
    ``refuse`` makes those new connections fail.
    """

    def __init__(self, tmp_path, payloads, refuse: bool = False):
        path = tmp_path / "in.hl7"
        path.write_bytes(b"".join(payloads))
        self.messages = read_messages([path])
        self.clock = MemoryReactorClock()
        self.refuse = refuse
        self.connections: list[tuple[SenderProtocol, StringTransport]] = []
        self.protocol, self.transport = self._connect()
        self.out, self.err = io.StringIO(), io.StringIO()
        self.result = []
        send_messages(self.protocol, self.messages, self.out, self.err,
                      reconnect=self.reconnect).addBoth(self.result.append)

    def _connect(self) -> tuple[SenderProtocol, StringTransport]:
        protocol, transport = SenderProtocol(self.clock, timeout=10), StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return protocol, transport

    def reconnect(self):
        if self.refuse:
            return fail(ConnectionRefusedError("connection refused"))
        self.protocol, self.transport = self._connect()
        return succeed(self.protocol)

    def answer(self, reply: bytes, hang_up: bool = False) -> None:
        """Answer; then hang up, or keep the connection open while the sender looks whether it will."""
        self.transport.clear()
        self.protocol.dataReceived(encode(reply))
        if hang_up:
            self.protocol.connectionLost(Failure(ConnectionDone("closed cleanly")))
        else:
            self.clock.advance(HANGUP_WAIT)


def test_a_connection_is_ready_at_once_over_tcp_and_after_the_handshake_over_tls():
    """Over TLS a message may go only once the handshake has completed (a receiver whose
    certificate is refused got nothing, and nothing may count as sent); a connection that is
    lost leaves no failure nobody handles (a TCP one never waits for a handshake)."""
    import gc

    from twisted.internet.interfaces import ISSLTransport
    from twisted.logger import globalLogPublisher
    from zope.interface import directlyProvides

    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        tcp = SenderProtocol(MemoryReactorClock(), timeout=10)
        tcp.makeConnection(StringTransport())
        assert tcp.ready().result is tcp
        tcp.connectionLost(Failure(ConnectionDone("closed cleanly")))

        refused, transport = SenderProtocol(MemoryReactorClock(), timeout=10), StringTransport()
        directlyProvides(transport, ISSLTransport)
        refused.makeConnection(transport)
        outcome = []
        refused.ready().addBoth(outcome.append)
        assert outcome == []  # waits for the handshake
        refused.connectionLost(Failure(ConnectionDone("certificate verify failed")))
        assert isinstance(outcome[0], Failure) and outcome[0].check(ConnectionDone)
        late = []
        refused.ready().addErrback(late.append)  # asked after the loss: fails too
        assert late and late[0].check(ConnectionDone)

        secured, transport = SenderProtocol(MemoryReactorClock(), timeout=10), StringTransport()
        directlyProvides(transport, ISSLTransport)
        secured.makeConnection(transport)
        ready = []
        secured.ready().addCallback(ready.append)
        secured.handshakeCompleted()
        assert ready == [secured] and secured.ready().result is secured
        del tcp, refused, secured, outcome, late, ready
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(logged)
    assert not [e for e in logged if e.get("isError") or "Unhandled" in str(e.get("log_format", ""))]


def test_send_messages_prints_a_line_per_ack_and_a_summary(tmp_path):
    m1, m2, m3, m4 = synthetic("C1"), synthetic("C2"), synthetic("C3"), synthetic("C4")
    peer = Peer(tmp_path, [m1, m2, m3, m4])
    assert peer.transport.value() == encode(m1)
    peer.answer(ack_for(m1, "AA"))
    assert peer.transport.value() == encode(m2)
    peer.answer(ack_for(m2, "AE", "PID-3 \\F\\ bad"))
    peer.answer(ack_for(m3, "AR", "unknown facility"))
    peer.answer(ack_for(m4, "CA"))
    assert peer.result == [1]
    assert peer.out.getvalue().splitlines() == [
        "C1\tAA\t",
        "C2\tAE\tPID-3 | bad",
        "C3\tAR\tunknown facility",
        "C4\tCA\t",
        "sent 4, accepted 2, errors 1, rejected 1",
    ]
    assert peer.err.getvalue() == ""
    assert peer.transport.disconnecting  # closed when done


def test_all_accepted_is_exit_0(tmp_path):
    m1, m2 = synthetic("C1"), synthetic("C2")
    peer = Peer(tmp_path, [m1, m2])
    peer.answer(ack_for(m1, "AA"))
    peer.answer(ack_for(m2, "CA"))
    assert peer.result == [0]
    assert peer.out.getvalue().splitlines()[-1] == "sent 2, accepted 2, errors 0, rejected 0"


def test_an_ack_message_is_sent_without_waiting_for_a_reply(tmp_path):
    m1, m2 = synthetic("C1"), synthetic("C2")
    ack = b"MSH|^~\\&|LAB|GENHOSP|EXCHANGE|EXCHANGE|20260101||ACK^A01^ACK|K1|P|2.5\rMSA|AA|X9\r"
    peer = Peer(tmp_path, [m1, ack, m2])
    peer.answer(ack_for(m1, "AA"))
    assert peer.transport.value() == encode(ack) + encode(m2)  # the ACK, then at once the next message
    peer.answer(ack_for(m2, "AA"))
    assert peer.result == [0]
    assert peer.out.getvalue().splitlines() == [
        "C1\tAA\t", "K1\t\tan ACK: sent, no reply expected", "C2\tAA\t",
        "sent 3, accepted 2, errors 0, rejected 0, ACKs sent without reply 1",
    ]


def test_only_msh9_ack_is_taken_for_an_ack_as_the_exchange_reads_it(tmp_path):
    """MSH-9.1 exactly ``ACK`` (the code is upper case): anything else waits for its answer,
    or the answer would be taken for the next message's."""
    odd = b"MSH|^~\\&|LAB|GENHOSP|EXCHANGE|EXCHANGE|20260101||ack^A01|K2|P|2.5\rMSA|AA|X9\r"
    m2 = synthetic("C2")
    peer = Peer(tmp_path, [odd, m2])
    assert peer.transport.value() == encode(odd)  # waiting for its reply before sending m2
    peer.answer(ack_for(odd, "AR", "unknown type"))
    assert peer.transport.value() == encode(m2)


def test_an_ack_whose_msh_cannot_be_read_waits_for_its_answer(tmp_path):
    """The exchange answers AE to a message whose MSH-2 is invalid, ACK or not."""
    broken = b"MSH|^~|LAB|GENHOSP|EXCHANGE|EXCHANGE|20260101||ACK^A01|K3|P|2.5\rMSA|AA|X9\r"
    m2 = synthetic("C2")
    peer = Peer(tmp_path, [broken, m2])
    assert peer.transport.value() == encode(broken)
    peer.answer(ack_for(broken, "AE", "MSH-2 encoding characters are invalid"))
    assert peer.transport.value() == encode(m2)


def test_reply_without_msa_is_an_error(tmp_path):
    m1 = synthetic("C1")
    peer = Peer(tmp_path, [m1])
    peer.answer(b"MSH|^~\\&|EX|EX\r")
    assert peer.result == [1]
    assert peer.out.getvalue().splitlines() == ["C1\t\tno MSA segment in the reply", "sent 1, accepted 0, errors 1, rejected 0"]


def test_an_ack_of_another_message_is_not_counted_as_accepted(tmp_path):
    """Found by a privacy audit: an AA whose MSA-2 named another message counted as accepted
    (exit 0) with only a warning."""
    m1 = synthetic("C1")
    peer = Peer(tmp_path, [m1])
    peer.answer(ack_for(synthetic("OTHER"), "AA"))
    assert peer.result == [1]
    assert peer.out.getvalue().splitlines() == [
        "C1\tAA\tthe reply acknowledges another message (MSA-2 is not this message's MSH-10)",
        "sent 1, accepted 0, errors 1, rejected 0"]
    assert "acknowledges 'OTHER'" in peer.err.getvalue()


def test_batch_gets_a_line_per_ack_in_the_batch_reply(tmp_path):
    batch = b"BHS|^~\\&|X|GENHOSP|||||||B1\r" + synthetic("C1") + synthetic("C2") + b"BTS|2\r"
    peer = Peer(tmp_path, [batch])
    assert peer.transport.value() == encode(batch)
    peer.answer(
        b"BHS|^~\\&|EX|EX||||||B9|B1\r"
        + ack_for(synthetic("C1"), "AA")
        + ack_for(synthetic("C2"), "AE", "bad")
        + b"BTS|2\r"
    )
    assert peer.result == [1]
    assert peer.out.getvalue().splitlines() == ["C1\tAA\t", "C2\tAE\tbad", "sent 2, accepted 1, errors 1, rejected 0"]


def test_batch_reply_without_msa_means_no_errors(tmp_path):
    batch = b"BHS|^~\\&|X|GENHOSP|||||||B1\r" + synthetic("C1") + b"BTS|1\r"
    peer = Peer(tmp_path, [batch])
    peer.answer(b"BHS|^~\\&|EX|EX||||||B9|B1\rBTS|0\r")
    assert peer.result == [0]
    assert peer.out.getvalue().splitlines()[0].startswith("B1\t\tbatch acknowledgement without MSA")


def test_connection_lost_stops_with_exit_1_and_a_reason(tmp_path):
    from twisted.internet.error import ConnectionLost

    m1, m2, m3 = synthetic("C1"), synthetic("C2"), synthetic("C3")
    peer = Peer(tmp_path, [m1, m2, m3])
    peer.answer(ack_for(m1, "AA"))
    assert peer.transport.value() == encode(m2)  # written on the open connection: C2 is sent
    peer.protocol.connectionLost(Failure(ConnectionLost("peer reset")))
    assert peer.result == [1]
    assert peer.out.getvalue().splitlines() == ["C1\tAA\t", "sent 2, accepted 1, errors 0, rejected 0, no reply 1"]
    (line,) = peer.err.getvalue().splitlines()
    assert line.startswith("exchange send: ") and "'C2'" in line and "ConnectionLost" in line
    assert len(peer.connections) == 1  # not sent again on a new connection: the peer may have taken it


def test_a_peer_that_hangs_up_after_each_answer_gets_each_message_on_a_new_connection(tmp_path):
    """Found by a black-box audit: against hl7apy's MLLPServer the second message was written
    on the connection the peer had closed, counted as sent with "no reply", and the rest never went."""
    m1, m2, m3 = synthetic("C1"), synthetic("C2"), synthetic("C3")
    peer = Peer(tmp_path, [m1, m2, m3])
    for message in (m1, m2, m3):
        assert peer.transport.value() == encode(message)
        peer.answer(ack_for(message, "AA"), hang_up=True)
    assert peer.result == [0]
    assert peer.out.getvalue().splitlines() == ["C1\tAA\t", "C2\tAA\t", "C3\tAA\t",
                                                "sent 3, accepted 3, errors 0, rejected 0"]
    assert peer.err.getvalue() == ""
    assert len(peer.connections) == 3


def test_after_a_connections_first_answer_the_sender_looks_whether_the_peer_hangs_up(tmp_path):
    m1, m2, m3 = synthetic("C1"), synthetic("C2"), synthetic("C3")
    peer = Peer(tmp_path, [m1, m2, m3])
    peer.transport.clear()
    peer.protocol.dataReceived(encode(ack_for(m1, "AA")))
    assert peer.transport.value() == b""  # not yet: will the peer hang up?
    peer.clock.advance(HANGUP_WAIT * 0.9)
    assert peer.transport.value() == b""
    peer.clock.advance(HANGUP_WAIT * 0.1)
    assert peer.transport.value() == encode(m2)  # it did not: the same connection
    peer.transport.clear()
    peer.protocol.dataReceived(encode(ack_for(m2, "AA")))
    assert peer.transport.value() == encode(m3)  # at once after a later answer
    peer.answer(ack_for(m3, "AA"))
    assert peer.result == [0] and len(peer.connections) == 1
    assert peer.clock.getDelayedCalls() == []


def test_no_new_connection_after_a_hang_up_stops_and_the_message_is_not_counted(tmp_path):
    m1, m2, m3 = synthetic("C1"), synthetic("C2"), synthetic("C3")
    peer = Peer(tmp_path, [m1, m2, m3], refuse=True)
    peer.answer(ack_for(m1, "AA"), hang_up=True)
    assert peer.result == [1]
    assert peer.out.getvalue().splitlines() == ["C1\tAA\t", "sent 1, accepted 1, errors 0, rejected 0"]
    (line,) = peer.err.getvalue().splitlines()
    assert line.startswith("exchange send: ") and "message 'C2' not sent: the peer closed the connection" in line
    assert "ConnectionRefusedError" in line


def test_timeout_stops_with_exit_1(tmp_path):
    m1, m2 = synthetic("C1"), synthetic("C2")
    peer = Peer(tmp_path, [m1, m2])
    peer.protocol._clock.advance(10)
    assert peer.result == [1]
    assert "ReplyTimeout: no reply within 10 s" in peer.err.getvalue()
    assert peer.out.getvalue().splitlines() == ["sent 1, accepted 0, errors 0, rejected 0, no reply 1"]


# -- end to end: real sockets, a subprocess sender ------------------------------------------


class MLLPTestServer(socketserver.ThreadingTCPServer):
    """A blocking MLLP peer: AA, or AE/AR when the message asks for it by a marker.

    Markers (in PID-5): ERRORME -> AE, REJECTME -> AR, HANGUP -> close without a reply.
    A batch (BHS/FHS) gets a batch acknowledgement with one ACK per MSH.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), MLLPHandler)
        self.received: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


def _ack(message: bytes) -> bytes:
    control_id = message.split(b"\r", 1)[0].split(b"|")[9]
    if b"ERRORME" in message:
        msa = b"MSA|AE|" + control_id + b"|cannot apply \\T\\ test"
    elif b"REJECTME" in message:
        msa = b"MSA|AR|" + control_id + b"|not accepted"
    else:
        msa = b"MSA|AA|" + control_id
    return b"MSH|^~\\&|EXCHANGE|EXCHANGE|ADT|GENHOSP|20260101||ACK|A" + control_id + b"|P|2.5\r" + msa + b"\r"


class MLLPHandler(socketserver.BaseRequestHandler):
    def handle(self):
        buffer = b""
        while True:
            end = buffer.find(b"\x1c\r")
            if end < 0:
                data = self.request.recv(65536)
                if not data:
                    return
                buffer += data
                continue
            start = buffer.find(b"\x0b")
            payload, buffer = buffer[start + 1 : end], buffer[end + 2 :]
            with self.server.lock:
                self.server.received.append(payload)
            if b"HANGUP" in payload:
                return
            if payload.startswith((b"BHS", b"FHS")):
                messages = [b"MSH" + m for m in payload.split(b"\rMSH")[1:]]
                reply = b"BHS|^~\\&|EXCHANGE|EXCHANGE||||||B9|B1\r" + b"".join(_ack(m.split(b"\rBTS")[0]) for m in messages)
                reply += b"BTS|%d\r" % len(messages)
            else:
                reply = _ack(payload)
            self.request.sendall(b"\x0b" + reply + b"\x1c\r")


@pytest.fixture
def server():
    srv = MLLPTestServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


SENDER = """
import sys
from twisted.internet.task import react
from twisted.python.failure import Failure
from exchange.send import SendUsageError, send_command

def main(reactor):
    d = send_command(reactor, sys.argv[1], sys.argv[3:], timeout=float(sys.argv[2]))
    return d.addCallback(lambda code: Failure(SystemExit(code)))

try:
    react(main)
except SendUsageError as e:
    print(f"exchange send: {e}", file=sys.stderr)
    sys.exit(2)
"""


def run_sender(endpoint: str, *files, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SENDER, endpoint, str(timeout), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_end_to_end_all_accepted(server, tmp_path):
    path = tmp_path / "adt.hl7"
    path.write_bytes(with_line_ends(synthetic("E1") + synthetic("E2") + synthetic("E3"), b"\n"))
    done = run_sender(server.endpoint, path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["E1\tAA\t", "E2\tAA\t", "E3\tAA\t", "sent 3, accepted 3, errors 0, rejected 0"]
    # what went over the wire: one frame per message, CR segment ends
    assert server.received == [synthetic("E1"), synthetic("E2"), synthetic("E3")]


def test_end_to_end_errors_rejects_batches_and_corpus_files(server, tmp_path):
    mixed = tmp_path / "mixed.hl7"
    mixed.write_bytes(
        with_line_ends(synthetic("E1") + synthetic("E2", "ERRORME") + synthetic("E3", "REJECTME"), b"\r\n")
    )
    batch = CORPUS / "pyhl7" / "sample_batch1_two_msgs.hl7"
    framed = tmp_path / "framed.hl7"
    framed.write_bytes(encode(corpus("ipf/msg-01-utf8_a01_v22.hl7")))
    done = run_sender(server.endpoint, mixed, batch, framed)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        "E1\tAA\t",
        "E2\tAE\tcannot apply & test",
        "E3\tAR\tnot accepted",
        "12334456778890\tAA\t",
        "12334456778891\tAA\t",
        "123456\tAA\t",
        "sent 6, accepted 4, errors 1, rejected 1",
    ]
    assert len(server.received) == 5  # the batch went as one frame
    assert server.received[3].startswith(b"BHS|")


def test_end_to_end_connection_refused(tmp_path):
    srv = MLLPTestServer()  # bound, then closed: nobody listens on that port now
    endpoint = srv.endpoint
    srv.server_close()
    path = tmp_path / "adt.hl7"
    path.write_bytes(synthetic("E1"))
    done = run_sender(endpoint, path)
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"exchange send: cannot connect to {endpoint}: ")


def test_end_to_end_peer_hangs_up(server, tmp_path):
    path = tmp_path / "adt.hl7"
    path.write_bytes(synthetic("E1") + synthetic("E2", "HANGUP") + synthetic("E3"))
    done = run_sender(server.endpoint, path)
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["E1\tAA\t", "sent 2, accepted 1, errors 0, rejected 0, no reply 1"]
    (line,) = done.stderr.strip().splitlines()
    assert "'E2'" in line and "ConnectionLost" in line


def test_end_to_end_unreadable_file_is_exit_2_without_connecting(server, tmp_path):
    good = tmp_path / "good.hl7"
    good.write_bytes(synthetic("E1"))
    done = run_sender(server.endpoint, good, tmp_path / "missing.hl7")
    assert done.returncode == 2
    assert done.stderr.strip() == f"exchange send: {tmp_path / 'missing.hl7'}: no such file"
    assert server.received == []


# -- end to end against receiving systems written by others (tests/delivery/peers.py) --------


def adt_a01(control_id: str, structure: str = "ADT^A01^ADT_A01") -> bytes:
    """A synthetic ADT^A01 hl7apy's server takes (its handlers are keyed by the whole MSH-9)."""
    return synthetic(control_id).replace(b"|ADT^A01|", f"|{structure}|".encode())


def send_to_hl7apy(tmp_path, messages: bytes):
    """`exchange send` of a file of ``messages`` to hl7apy's MLLP server: (the run, the peer)."""
    from tests.delivery.peers import HL7apyPeer

    peer = HL7apyPeer().start()
    try:
        path = tmp_path / "three.hl7"
        path.write_bytes(messages)
        return run_sender(peer.endpoint, path), peer
    finally:
        peer.stop()


def test_end_to_end_hl7apy_server_hangs_up_after_each_answer_and_gets_every_message(tmp_path):
    """Found by a black-box audit: `exchange send` against hl7apy's MLLPServer printed one AA,
    then "ConnectionLost" for the second message, which never reached the server; the third was never sent."""
    done, peer = send_to_hl7apy(tmp_path, adt_a01("CR0") + adt_a01("CR1") + adt_a01("CR2"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["CR0\tAA\t", "CR1\tAA\t", "CR2\tAA\t", "sent 3, accepted 3, errors 0, rejected 0"]
    assert done.stderr == ""
    assert peer.received == ["CR0", "CR1", "CR2"]


def test_end_to_end_hl7apy_server_hanging_up_without_an_answer_is_no_reply_and_sending_stops(tmp_path):
    """hl7apy's server closes the connection without a word on a message type it has no handler for:
    that message was written on a new, open connection, so it is sent and gets no reply; nothing follows it."""
    done, peer = send_to_hl7apy(tmp_path, adt_a01("CR0") + adt_a01("CR1", "ADT^A08^ADT_A01") + adt_a01("CR2"))
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["CR0\tAA\t", "sent 2, accepted 1, errors 0, rejected 0, no reply 1"]
    (line,) = done.stderr.strip().splitlines()
    assert "message 'CR1'" in line and "ConnectionLost" in line
    assert peer.received == ["CR0"]


def test_end_to_end_python_hl7_server_keeps_one_connection(tmp_path):
    from tests.delivery.peers import Hl7Peer

    peer = Hl7Peer().start()
    try:
        path = tmp_path / "three.hl7"
        path.write_bytes(synthetic("P1") + synthetic("P2") + synthetic("P3"))
        done = run_sender(peer.endpoint, path)
    finally:
        peer.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["P1\tAA\t", "P2\tAA\t", "P3\tAA\t", "sent 3, accepted 3, errors 0, rejected 0"]
    assert peer.received == ["P1", "P2", "P3"] and peer.connections == 1
