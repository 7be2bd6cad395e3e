"""Twisted MLLP server protocol: it frames and delegates, nothing else.

Each frame goes to ``handler(payload, peer) -> Deferred[bytes | None]``;
replies are written in the order the frames arrived, whenever their
Deferreds fire (after the commit that holds the message). A frame over the
size limit is answered with a NAK when its header is readable, then the
connection closes. A connection silent for ``idle_timeout`` seconds (and
waiting for no answer) is closed. A sender that stops reading its ACKs stops
being read (the protocol is its transport's push producer): unread ACKs
never pile up in memory.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from exchange import metrics
from exchange.acceptance import PeerIdentity
from exchange.intake import Peer
from exchange.mllp.framing import FramingError, FrameTooLarge, MLLPDecoder, encode

log = Logger()

Handler = Callable[..., Deferred]


class _Slot:
    """One frame's place in the reply order."""

    __slots__ = ("done", "reply", "close_after")

    def __init__(self, close_after: bool = False) -> None:
        self.done = False
        self.reply: bytes | None = None
        self.close_after = close_after


@implementer(IHalfCloseableProtocol, IPushProducer)
class MLLPServerProtocol(Protocol, TimeoutMixin):
    """One MLLP connection. A sender that half-closes after its last frame (``shutdown(SHUT_WR)``,
    ``printf ... | nc``) still gets every answer it is owed; then the connection closes."""

    factory: "MLLPServerFactory | None" = None

    def __init__(self, handler: Handler, *, max_frame_bytes: int, idle_timeout: float | None) -> None:
        self._handler = handler
        self._decoder = MLLPDecoder(max_frame_bytes=max_frame_bytes)
        self._idle_timeout = idle_timeout or None
        self._slots: deque[_Slot] = deque()
        self._peer: Peer | None = None
        self._closing = False
        self.stopped = False  # set on shutdown: take no new frames
        self._blocked = False  # the transport's write buffer is full: the sender is not reading
        self._reading_paused = False

    # -- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        metrics.CONNECTIONS.inc()
        if self.factory is not None:
            self.factory.connections.add(self)
        self.setTimeout(self._idle_timeout)
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        metrics.CONNECTIONS.dec()
        if self.factory is not None:
            self.factory.connections.discard(self)
        self.setTimeout(None)
        self._closing = True

    def readConnectionLost(self) -> None:
        """The sender has sent its last byte: answer what it sent, then close."""
        if not self._closing:
            self._close_after_replies()

    def writeConnectionLost(self) -> None:
        """Nothing to do: the replies' writes fail quietly once the sender cannot read them."""

    def timeoutConnection(self) -> None:
        if self._slots:  # still owe the sender an answer: not idle
            self.setTimeout(self._idle_timeout)
            return
        log.info("closing idle MLLP connection from {peer}", peer=self.peer.address)
        self._lose()

    # -- reading: paused while the sender does not read, the backlog is full, or on shutdown

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: read no more frames until it drains."""
        self._blocked = True
        self.update_reading()

    def resumeProducing(self) -> None:
        self._blocked = False
        self.update_reading()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the rest."""

    def update_reading(self) -> None:
        paused = self._blocked or self.stopped or (self.factory is not None and self.factory.paused)
        if paused != self._reading_paused and self.transport is not None:
            self._reading_paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _lose(self) -> None:
        self.transport.unregisterProducer()  # else the transport waits for it before closing
        self.transport.loseConnection()

    @property
    def peer(self) -> Peer:
        """The sender; its TLS identity is read once the handshake is done,
        which it is by the time the first bytes arrive."""
        if self._peer is None:
            self._peer = Peer(str(_address(self.transport)), _tls_identity(self.transport))
        return self._peer

    # -- frames -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self.stopped:
            return
        self.resetTimeout()
        before = self._decoder.discarded
        try:
            frames = self._decoder.feed(data)
        except FrameTooLarge as exc:
            for frame in exc.frames:  # frames completed before the oversize one
                self._dispatch(self._handler(frame, self.peer), _Slot())
            self._oversize(exc)
            return
        except FramingError as exc:
            metrics.FRAMING_ERRORS.labels(kind="invalid").inc()
            log.warn("closing MLLP connection from {peer}: {reason}", peer=self.peer.address, reason=str(exc))
            self._close_after_replies()
            return
        finally:
            skipped = self._decoder.discarded - before
            if skipped:
                metrics.DISCARDED_BYTES.inc(skipped)
        for frame in frames:
            self._dispatch(self._handler(frame, self.peer), _Slot())
        if frames and self.factory is not None:
            self.factory.check_backpressure()

    def _oversize(self, exc: FrameTooLarge) -> None:
        """Answer what we can (a NAK, if the header is readable), then close."""
        metrics.FRAMING_ERRORS.labels(kind="oversize").inc()
        self._closing = True
        reason = f"message exceeds the maximum frame size of {exc.limit} bytes"
        d = self._handler(
            exc.prefix,
            self.peer,
            note=f"frame truncated: only the first {len(exc.prefix)} bytes were kept",
            force_reject=reason,
        )
        self._dispatch(d, _Slot(close_after=True))

    def _dispatch(self, d: Deferred, slot: _Slot) -> None:
        self._slots.append(slot)

        def answered(reply: bytes | None) -> None:
            slot.done, slot.reply = True, reply
            self._flush()

        def failed(failure: Failure) -> None:
            # Not committed: no ACK. Close so the sender resends it.
            log.failure("no answer for a frame from {peer}; closing", failure, peer=self.peer.address)
            slot.done, slot.close_after = True, True
            self._flush()

        d.addCallbacks(answered, failed)
        d.addErrback(lambda f: log.failure("MLLP reply bookkeeping failed", f))

    def _flush(self) -> None:
        while self._slots and self._slots[0].done:
            slot = self._slots.popleft()
            if slot.reply is not None and self.transport is not None:
                self.transport.write(encode(slot.reply))
                self.resetTimeout()  # idle time counts from the last exchange either way
            if slot.close_after:
                self._slots.clear()
                self._closing = True
                self._lose()
                return

    def _close_after_replies(self) -> None:
        self._closing = True
        if self._slots:
            self._slots[-1].close_after = True
            self._flush()
        else:
            self._lose()


class MLLPServerFactory(Factory):
    """Shared state of every MLLP connection: the handler and the limits.

    ``committer`` (optional) provides backpressure: while too many messages
    wait for the writer, every connection stops reading.
    """

    noisy = False

    def __init__(
        self,
        handler: Handler,
        *,
        max_frame_bytes: int,
        idle_timeout: float | None,
        committer=None,
    ) -> None:
        self.handler = handler
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout = idle_timeout
        self.committer = committer
        self.connections: set[MLLPServerProtocol] = set()
        self.paused = False  # the intake backlog is full: no connection reads

    def buildProtocol(self, addr) -> MLLPServerProtocol:
        p = MLLPServerProtocol(self.handler, max_frame_bytes=self.max_frame_bytes, idle_timeout=self.idle_timeout)
        p.factory = self
        return p

    def check_backpressure(self) -> None:
        if self.paused or self.committer is None or not self.committer.overloaded:
            return
        self.paused = True
        log.warn("intake backlog full; pausing {n} MLLP connections", n=len(self.connections))
        for p in list(self.connections):
            p.update_reading()
        self.committer.on_capacity(self._resume)

    def _resume(self) -> None:
        self.paused = False
        for p in list(self.connections):
            p.update_reading()

    def stop_reading(self) -> None:
        """Shutdown: take no new frames; frames already taken still get answers."""
        for p in list(self.connections):
            p.stopped = True
            p.update_reading()


def _address(transport) -> str:
    peer = transport.getPeer()
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else str(peer)


def _tls_identity(transport) -> PeerIdentity | None:
    if not ISSLTransport.providedBy(transport):
        return None
    cert = transport.getPeerCertificate()
    if cert is None:
        return PeerIdentity()
    x509 = cert.to_cryptography()
    from cryptography.hazmat.primitives import hashes

    return PeerIdentity(
        tls_subject=subject_text(x509.subject),
        tls_fingerprint=x509.fingerprint(hashes.SHA256()).hex(),
    )


def subject_text(name) -> str:
    """A certificate's subject as ``exchange.acceptance.normalize_subject`` reads it: RFC 4514
    with OpenSSL's attribute names (emailAddress, not its OID in hex as ``rfc4514_string``
    gives it), each value as it is in the certificate with ``\\ , + ;`` escaped."""
    parts = []
    for attribute in name:
        label = _SUBJECT_NAMES.get(attribute.oid.dotted_string, attribute.oid.dotted_string)
        value = attribute.value if isinstance(attribute.value, str) else attribute.value.hex()
        escaped = "".join("\\" + c if c in "\\,+;" else c for c in value)
        parts.append(f"{label}={escaped}")
    return ",".join(parts)


_SUBJECT_NAMES = {  # OpenSSL's short names of the subject attributes certificates carry
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU",
    "2.5.4.5": "serialNumber", "2.5.4.9": "street", "2.5.4.12": "title", "2.5.4.17": "postalCode",
    "2.5.4.4": "SN", "2.5.4.42": "GN", "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID",
    "1.2.840.113549.1.9.1": "emailAddress",
}
