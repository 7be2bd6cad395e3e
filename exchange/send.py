"""``exchange send ENDPOINT FILE...``: send HL7 files over MLLP, print each ACK.

Files are read and split before connecting. What counts as one message:

- a new message starts at every segment that starts with ``MSH``; segments
  may end in CR, LF or CRLF and are sent ending in CR; blank lines are
  dropped; a UTF-8 byte order mark at the start of the file (or of a line,
  as left by ``cat a.hl7 b.hl7``) is dropped;
- an MLLP-framed file (first byte 0x0B after any whitespace) holds one
  message per frame (0x0B ... 0x1C 0x0D), normalised the same way;
- a batch file (its first segment is ``FHS`` or ``BHS``) is sent whole, as
  ONE frame, the way batch senders do; the receiver answers with a batch
  acknowledgement holding one ACK (MSH, MSA) per message.

Messages go one at a time, each after the previous one's ACK, over one
connection for as long as the receiver keeps it open. Some receivers hang up
after each answer (hl7apy's ``MLLPServer`` does): after the first answer on a
connection the next message waits up to ``HANGUP_WAIT`` seconds to see whether
the peer closes it, and a connection the peer has closed is replaced by a new
one before the next message is written (as the exchange's own delivery
worker does). A message counts as sent once it is written on an open
connection; a connection lost after that and before its answer is "no reply"
and sending stops there (the message is not sent again: the peer may have
taken it). A peer that closes a connection only after several answers is
not waited for: the message written as it closes is "no reply".

For every MSA in a reply one line is printed on ``out``::

    <control id>\\t<MSA-1>\\t<MSA-3>

The control id is the sent MSH-10 (for a batch: each ACK's MSA-2). A reply
without MSA prints an empty MSA-1 and the reason instead of MSA-3 (a batch
acknowledgement with no MSA means, per HL7, that no message was in error).
Then a summary: ``sent N, accepted A, errors E, rejected R`` (N counts
messages, each MSH of a batch; A counts AA/CA, R AR/CR, E everything else),
and ``, no reply U`` when sending stopped because a reply did not come (a
timeout, the connection lost: the messages after it are not sent).

A message that is itself an acknowledgement (MSH-9.1 ``ACK``, its MSH readable:
``exchange.acceptance.never_answered``, the exchange's own rule) gets no reply
(HL7: never acknowledge an ACK): it is written in its turn, the next message
follows at once, its line says ``an ACK: sent, no reply expected`` and the
summary ends with ``, ACKs sent without reply K``. It does not count against
exit code 0.

Exit codes: 0 when every ACK was AA or CA; 1 when one was not, or when the
connection failed, was lost or an ACK did not come within ``timeout`` seconds
or could not be made again after the peer closed it (one line on ``err`` says
why; messages after that are not sent); 2 when a
file cannot be read or holds no message, or ENDPOINT is not an endpoint
string: :class:`SendUsageError` is raised before anything is sent (the CLI turns it into exit 2 with its one-line
message).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from exchange.acceptance import never_answered
from exchange.hl7.header import read_header
from exchange.mllp.client import MLLPClientProtocol, client_endpoint

__all__ = [
    "Ack",
    "OutboundMessage",
    "SendUsageError",
    "SenderProtocol",
    "SplitError",
    "describe",
    "read_acks",
    "read_messages",
    "send_command",
    "send_files",
    "send_messages",
    "split_messages",
]

BOM = b"\xef\xbb\xbf"
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CR = b"\r"
WHITESPACE = b" \t\r\n\x0c"  # not bytes.strip()'s default: that includes 0x0B, the start block

HANGUP_WAIT = 0.1  # seconds: after a connection's first answer, does the peer hang up before the next message?

ACCEPTED_CODES = ("AA", "CA")
REJECTED_CODES = ("AR", "CR")


class SendUsageError(Exception):
    """A file cannot be sent (unreadable, or no HL7 message in it): exit code 2.

    ``str(error)`` is one line naming the file and the reason.
    """


class SplitError(ValueError):
    """The bytes cannot be split into HL7 messages; ``str`` says why."""


# -- splitting files ------------------------------------------------------------


def split_messages(data: bytes) -> list[bytes]:
    """The messages in a file's bytes, each with CR segment ends (see the module doc).

    Returns [] for a file with nothing but whitespace. Raises SplitError for
    text before the first MSH, or a framed file with junk between frames or
    an unterminated frame.
    """
    if data.startswith(BOM):
        data = data[len(BOM):]
    if data.lstrip(WHITESPACE).startswith(START_BLOCK):
        return [m for m in (_segments_to_message(frame) for frame in _frames(data)) if m]
    segments = _segments(data)
    if not segments:
        return []
    if segments[0].startswith((b"FHS", b"BHS")):
        return [CR.join(segments) + CR]
    if not segments[0].startswith(b"MSH"):
        raise SplitError(f"text before the first MSH segment: {_preview(segments[0])}")
    messages: list[list[bytes]] = []
    for segment in segments:
        if segment.startswith(b"MSH"):
            messages.append([])
        messages[-1].append(segment)
    return [CR.join(m) + CR for m in messages]


def _frames(data: bytes) -> list[bytes]:
    frames = []
    pos = 0
    while True:
        start = data.find(START_BLOCK, pos)
        between = data[pos:] if start < 0 else data[pos:start]
        if between.strip(WHITESPACE):
            raise SplitError(f"bytes outside MLLP frames: {_preview(between.strip(WHITESPACE))}")
        if start < 0:
            return frames
        end = data.find(END_BLOCK, start + 1)
        if end < 0:
            raise SplitError("MLLP frame without end block (0x1C)")
        frames.append(data[start + 1 : end])
        pos = end + 1


def _segments(data: bytes) -> list[bytes]:
    """Segments without their line ends; blank ones and BOMs dropped."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    segments = []
    for line in lines:
        if line.startswith(BOM):
            line = line[len(BOM):]
        if line.strip(WHITESPACE):
            segments.append(line)
    return segments


def _segments_to_message(frame: bytes) -> bytes:
    segments = _segments(frame)
    return CR.join(segments) + CR if segments else b""


def _preview(data: bytes) -> str:
    """What the bytes are, without what they say (a patient's segment is PHI, and error lines
    end up in the logs of the scripts that run this): their length and first three bytes (a
    segment's name)."""
    return f"{len(data)} bytes beginning {data[:3].decode('ascii', 'replace')!r}"


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One frame to send, and what the printout needs to know about it."""

    path: str
    payload: bytes  # segments end in CR
    control_id: str  # MSH-10; for a batch BHS-11, else FHS-11, else ""
    is_batch: bool
    count: int  # HL7 messages inside: 1, or the MSH segments of a batch (at least 1)
    is_ack: bool = False  # an ACK the exchange would never answer: sent without waiting for a reply


def describe(path: str, payload: bytes) -> OutboundMessage:
    segments = payload.split(CR)
    first = segments[0]
    if first.startswith((b"FHS", b"BHS")):
        control_id = ""
        for seg_id in (b"BHS", b"FHS"):  # BHS-11 first, then FHS-11
            for segment in segments:
                if segment.startswith(seg_id):
                    control_id = _field(segment, 11) or control_id
                    break
            if control_id:
                break
        count = sum(1 for s in segments if s.startswith(b"MSH"))
        return OutboundMessage(path, payload, control_id, True, max(count, 1))
    return OutboundMessage(path, payload, _field(first, 10), False, 1, never_answered(read_header(payload)))


def _field(segment: bytes, number: int) -> str:
    """Field ``number`` of an MSH/BHS/FHS segment, whose byte 3 is the field separator."""
    if len(segment) < 4:
        return ""
    fields = segment.split(segment[3:4])
    # fields[1] is MSH-2 (MSH-1 is the separator itself), so MSH-n is fields[n - 1]
    return fields[number - 1].decode("utf-8", "replace").strip() if len(fields) >= number else ""


def read_messages(paths: Iterable[str | Path]) -> list[OutboundMessage]:
    """Read and split every file; SendUsageError (one line) on the first bad one."""
    result: list[OutboundMessage] = []
    for path in paths:
        name = str(path)
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise SendUsageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise SendUsageError(f"{name}: is a directory") from None
        except OSError as e:
            raise SendUsageError(f"{name}: cannot read: {e.strerror or e}") from None
        try:
            payloads = split_messages(data)
        except SplitError as e:
            raise SendUsageError(f"{name}: {e}") from None
        if not payloads:
            raise SendUsageError(f"{name}: no HL7 message in the file")
        result.extend(describe(name, p) for p in payloads)
    return result


# -- reading replies --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """One MSA segment of a reply."""

    code: str  # MSA-1: AA, AE, AR, CA, CE, CR
    control_id: str  # MSA-2: the acknowledged MSH-10
    text: str  # MSA-3, unescaped


def read_acks(reply: bytes) -> list[Ack]:
    """Every MSA segment of a reply, in order (a tiny parser, not a full HL7 one).

    The field separator is the reply's byte 3 (MSH|, BHS|, FHS|); escape
    sequences in MSA-3 are resolved with the delimiters of its MSH-2.
    """
    if reply.startswith(BOM):
        reply = reply[len(BOM):]
    if len(reply) < 4:
        return []
    sep = reply[3:4]
    encoding = reply[4:8].split(sep, 1)[0]
    acks = []
    for segment in _segments(reply):
        if not segment.startswith(b"MSA" + sep):
            continue
        fields = [f.decode("utf-8", "replace") for f in segment.split(sep)]
        fields += [""] * (4 - len(fields))
        text = _unescape(fields[3], sep.decode("latin-1"), encoding.decode("latin-1"))
        acks.append(Ack(fields[1].strip(), fields[2], " ".join(text.split())))
    return acks


def _unescape(text: str, field: str, encoding: str) -> str:
    if len(encoding) < 4 or encoding[2] not in text:
        return text
    component, repetition, escape, subcomponent = encoding[:4]
    names = {"F": field, "S": component, "T": subcomponent, "R": repetition, "E": escape, ".br": " ", "X0A": " ", "X0D": " "}
    parts = text.split(escape)
    out = [parts[0]]
    # parts alternate: text, escape name, text, ...; an unknown name stays as written
    for i in range(1, len(parts), 2):
        name = parts[i]
        if i + 1 < len(parts):
            out.append(names.get(name, escape + name + escape))
            out.append(parts[i + 1])
        else:
            out.append(escape + name)
    return "".join(out)


# -- sending ----------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    accepted: int = 0
    errors: int = 0
    rejected: int = 0
    acks: int = 0  # ACK messages sent, which get no reply
    unanswered: int = 0  # sent, but no reply came (a timeout, the connection lost): sending stopped there

    def count(self, code: str) -> None:
        if code in ACCEPTED_CODES:
            self.accepted += 1
        elif code in REJECTED_CODES:
            self.rejected += 1
        else:
            self.errors += 1

    @property
    def all_accepted(self) -> bool:
        return self.errors == 0 and self.rejected == 0 and self.unanswered == 0

    def summary(self) -> str:
        acks = f", ACKs sent without reply {self.acks}" if self.acks else ""
        unanswered = f", no reply {self.unanswered}" if self.unanswered else ""
        return (f"sent {self.sent}, accepted {self.accepted}, errors {self.errors}, rejected {self.rejected}"
                f"{unanswered}{acks}")


def _line(control_id: str, code: str, text: str) -> str:
    return "\t".join(" ".join(s.split()) for s in (control_id, code, text))


def report_reply(message: OutboundMessage, reply: bytes, tally: Tally, out: TextIO, err: TextIO) -> None:
    """Print the line(s) for one reply and count them."""
    acks = read_acks(reply)
    if not acks:
        if message.is_batch and reply.removeprefix(BOM).startswith((b"FHS", b"BHS")):
            print(_line(message.control_id, "", "batch acknowledgement without MSA: no errors reported"), file=out)
            tally.accepted += 1
        else:
            print(_line(message.control_id, "", "no MSA segment in the reply"), file=out)
            tally.errors += 1
        return
    if message.is_batch:
        for ack in acks:
            print(_line(ack.control_id, ack.code, ack.text), file=out)
            tally.count(ack.code)
        return
    ack = acks[0]
    if ack.control_id.strip() != message.control_id.strip():
        # the answer to another message says nothing of this one: not counted as accepted
        print(_line(message.control_id, ack.code, "the reply acknowledges another message (MSA-2 is not this"
                                                  " message's MSH-10)"), file=out)
        shown = ack.control_id if len(ack.control_id) <= 40 else ack.control_id[:40] + "..."
        print(f"exchange send: the ACK for {message.control_id!r} acknowledges {shown!r} (MSA-2)", file=err)
        tally.errors += 1
        return
    print(_line(message.control_id, ack.code, ack.text), file=out)
    tally.count(ack.code)


@implementer(IHandshakeListener)
class SenderProtocol(MLLPClientProtocol):
    """The MLLP client, also telling whether the peer has closed the connection, and (TLS)
    when the handshake has completed: only then is the connection open for a message."""

    def __init__(self, reactor: IReactorTime, **kwargs) -> None:
        super().__init__(reactor, **kwargs)
        self.clock = reactor
        self.closed = False
        self._hangup_waiters: list[Deferred[bool]] = []
        self._secured = False  # TLS: the handshake has completed
        self._handshake: Deferred[SenderProtocol] | None = None  # ready()'s, while it waits for that
        self._lost: Failure | None = None

    def ready(self) -> Deferred[SenderProtocol]:
        """Fires with this protocol once a message may be written: at once on TCP, after the
        handshake on TLS; fails when the connection is lost first (a refused certificate)."""
        if self._lost is not None:
            return fail(self._lost)
        if self._secured or not ISSLTransport.providedBy(self.transport):
            return succeed(self)
        self._handshake = Deferred()
        return self._handshake

    def handshakeCompleted(self) -> None:
        self._secured = True
        d, self._handshake = self._handshake, None
        if d is not None:
            d.callback(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._lost = reason
        super().connectionLost(reason)
        d, self._handshake = self._handshake, None
        if d is not None:  # only a handshake somebody waits for: no failure left unhandled
            d.errback(reason)
        waiters, self._hangup_waiters = self._hangup_waiters, []
        for d in waiters:
            d.callback(True)

    def hangs_up(self, seconds: float) -> Deferred[bool]:
        """Fires True once the connection is closed, False if it is still open after ``seconds``."""
        if self.closed:
            return succeed(True)
        d: Deferred[bool] = Deferred(self._hangup_waiters.remove)
        self._hangup_waiters.append(d)
        return d.addTimeout(seconds, self.clock, onTimeoutCancel=lambda _result, _timeout: False)


@inlineCallbacks
def send_messages(
    protocol: SenderProtocol,
    messages: Sequence[OutboundMessage],
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    reconnect: Callable[[], Deferred[SenderProtocol]] | None = None,
):
    """Send over a connected protocol, one at a time; fires with the exit code (0 or 1).

    A connection the peer closed after an answer is replaced by ``reconnect()``
    (a new connected protocol) before the next message is written; without
    ``reconnect``, or when it fails, sending stops there and that message is
    not counted as sent. Closes the connection when done.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    tally = Tally()
    failure: str | None = None
    answers = 0  # on this connection
    try:
        for number, message in enumerate(messages):
            if protocol.closed:  # the peer hung up after its answer: nothing of this message was written
                try:
                    if reconnect is None:
                        raise ConnectionError("no new connection may be made")
                    protocol = yield reconnect()
                except Exception as e:  # refused, unreachable, timed out
                    failure = (f"{message.path}: message {message.control_id!r} not sent: the peer closed the"
                               f" connection and a new one cannot be made: {_reason(e)}")
                    break
                answers = 0
            tally.sent += message.count
            if message.is_ack:
                try:
                    yield protocol.post(message.payload)
                except Exception as e:  # connection lost
                    failure = f"{message.path}: message {message.control_id!r}: {_reason(e)}"
                    break
                tally.acks += 1
                print(_line(message.control_id, "", "an ACK: sent, no reply expected"), file=out)
                out.flush()
                continue
            try:
                reply = yield protocol.send(message.payload)
            except Exception as e:  # timeout, connection lost, framing error: stop here
                failure = f"{message.path}: message {message.control_id!r}: {_reason(e)}"
                tally.unanswered += message.count
                break
            report_reply(message, reply, tally, out, err)
            out.flush()
            answers += 1
            if answers == 1 and number + 1 < len(messages):
                yield protocol.hangs_up(HANGUP_WAIT)  # some peers hang up after each answer
    finally:
        protocol.close()
    print(tally.summary(), file=out)
    out.flush()
    if failure is not None:
        print(f"exchange send: {failure}", file=err)
        err.flush()
        return 1
    return 0 if tally.all_accepted else 1


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def send_files(
    reactor,
    endpoint: str,
    paths: Iterable[str | Path],
    out: TextIO | None = None,
    timeout: float = 30.0,
    err: TextIO | None = None,
) -> Deferred[int]:
    """Read ``paths``, connect to ``endpoint``, send everything; Deferred[exit code].

    Raises SendUsageError at once (nothing sent, no connection made) when a
    file cannot be read or holds no message, or ``endpoint`` is not a valid
    endpoint string. A connection that cannot be made gives exit code 1 with
    one line on ``err``.
    """
    messages = read_messages(paths)
    try:
        target = client_endpoint(reactor, endpoint, timeout=timeout)
    except ValueError as e:
        raise SendUsageError(str(e)) from None
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr

    def new_connection() -> Deferred[SenderProtocol]:
        return connectProtocol(target, SenderProtocol(reactor, timeout=timeout)).addCallback(
            lambda protocol: protocol.ready().addTimeout(timeout, reactor))

    def connected(protocol: SenderProtocol) -> Deferred[int]:
        return send_messages(protocol, messages, out, err, reconnect=new_connection)

    def cannot_connect(failure: Failure) -> int:
        print(f"exchange send: cannot connect to {endpoint}: {_reason(failure.value)}", file=err)
        err.flush()
        return 1

    d = new_connection()
    d.addCallbacks(connected, cannot_connect)
    return d


def send_command(
    reactor,
    endpoint: str,
    files: Iterable[str | Path],
    timeout: float = 30.0,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> Deferred[int]:
    """The ``exchange send`` command, for ``twisted.internet.task.react``.

    Fires with the exit code (0 or 1); raises SendUsageError (exit code 2)
    synchronously for an unreadable file, before any connection is made.
    """
    return send_files(reactor, endpoint, files, out=out, timeout=timeout, err=err)
