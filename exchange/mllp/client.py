"""Twisted MLLP client: send a payload, get the next reply frame back.

``MLLPClientProtocol.send(payload)`` frames the payload, writes it and
returns a Deferred that fires with the payload of the next frame the peer
sends (its ACK). One message is in flight at a time; further sends wait in
a bounded queue and go out in order as replies arrive. The protocol does
not look inside payloads: checking MSA-2 against MSH-10 is the caller's job.

Failures, all as errbacks of the Deferreds returned by ``send``:

- :class:`ReplyTimeout` (a ``TimeoutError``) when no reply arrives within
  ``timeout`` seconds; the connection is then dropped, because a late reply
  could no longer be matched to its message;
- ``twisted.internet.error.ConnectionLost`` for the message in flight and
  every queued one when the connection goes away (or was never up);
- :class:`~exchange.mllp.framing.FramingError` when a reply cannot be
  framed (too large); the connection is dropped;
- :class:`QueueFull` when ``max_queued`` sends are already waiting.

``connect(reactor, description)`` accepts ``host:port`` (``[::1]:2575`` for
IPv6 literals) or any Twisted client endpoint string, e.g.
``tls:host=h:port=2575:trustRoots=/ca:certificate=c.pem:privateKey=k.pem``.
On ``tls:`` strings ``caCertsDir=DIR`` is accepted as another name for
Twisted's ``trustRoots=DIR`` (``ssl:`` client strings take ``caCertsDir``
natively).
"""
from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from exchange.mllp.framing import DEFAULT_MAX_FRAME_BYTES, FramingError, MLLPDecoder, encode

__all__ = [
    "MLLPClientProtocol",
    "QueueFull",
    "ReplyTimeout",
    "client_endpoint",
    "connect",
]

log = Logger()

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_QUEUED = 1000

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.%]+)\]|(?P<host>[^:=\[\]\s]+)):(?P<port>\d{1,5})")
_ENDPOINT_TYPES = {"tcp", "tcp6", "ssl", "tls", "unix"}


Stale = Callable[[bytes], bool]


class ReplyTimeout(TimeoutError):
    """No reply frame arrived in time; the connection has been dropped."""


class QueueFull(Exception):
    """Too many sends are already waiting for this connection."""


class MLLPClientProtocol(Protocol):
    """One MLLP connection seen from the sending side.

    ``reactor`` provides ``callLater`` for the reply timeout (inject a
    ``task.Clock`` in tests); ``timeout`` is in seconds, ``None`` or 0 waits
    forever.
    """

    def __init__(
        self,
        reactor: IReactorTime | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor  # type: ignore[assignment]
        self._clock = reactor
        self.timeout = timeout or None
        self.max_queued = max_queued
        self._decoder = MLLPDecoder(max_frame_bytes)
        # (payload, its Deferred, reply expected, which reply frames are stale)
        self._queue: deque[tuple[bytes, Deferred, bool, Stale | None]] = deque()
        self._in_flight: Deferred[bytes] | None = None
        self._stale: Stale | None = None  # the in-flight send's
        self._timer: IDelayedCall | None = None
        self._connected = False
        self._lost: Failure | None = None  # why the connection went away, once it has

    # -- public -------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Sends not yet answered: the one in flight plus the queued ones."""
        return len(self._queue) + (self._in_flight is not None)

    def send(self, payload: bytes, stale: Stale | None = None) -> Deferred[bytes]:
        """Send one message; the Deferred fires with the reply frame's payload. A frame for
        which ``stale`` says True (an answer the peer repeats to an earlier message, or its
        application ACK after a commit ACK) is dropped, and the reply is still waited for."""
        return self._enqueue(payload, True, stale)

    def post(self, payload: bytes) -> Deferred[None]:
        """Send one message that gets no reply -- an ACK: HL7 never acknowledges one --
        in its turn after the sends before it; fires once it is written."""
        return self._enqueue(payload, False)

    def _enqueue(self, payload: bytes, reply: bool, stale: Stale | None = None) -> Deferred:
        if self._lost is not None:
            return fail(ConnectionLost(f"not connected: {self._lost.getErrorMessage()}"))
        if len(self._queue) >= self.max_queued:
            return fail(QueueFull(f"{len(self._queue)} sends already waiting"))
        d: Deferred = Deferred(self._cancel)
        self._queue.append((payload, d, reply, stale))
        self._next()
        return d

    def close(self) -> None:
        """Close the connection once written data is flushed; pending sends fail."""
        if self.transport is not None and self._connected:
            self.transport.loseConnection()

    # -- Twisted ------------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        self._next()

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FramingError as e:
            for frame in getattr(e, "frames", []):
                self._reply(frame)
            self._abort(Failure(e))
            return
        for frame in frames:
            self._reply(frame)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        self._lost = reason
        self._stop_timer()
        error = ConnectionLost(reason.getErrorMessage())
        waiting = []
        if self._in_flight is not None:
            waiting.append(self._in_flight)
            self._in_flight = None
        waiting.extend(item[1] for item in self._queue)
        self._queue.clear()
        for d in waiting:
            d.errback(Failure(error))

    # -- inside -------------------------------------------------------------

    def _next(self) -> None:
        """Write queued payloads while nothing is in flight (a post waits for no reply)."""
        while self._in_flight is None and self._queue and self._connected:
            payload, d, reply, stale = self._queue.popleft()
            if not reply:
                self.transport.write(encode(payload))
                d.callback(None)  # (its callbacks may send more: they queue behind the rest)
                continue
            self._in_flight, self._stale = d, stale
            if self.timeout is not None:
                self._timer = self._clock.callLater(self.timeout, self._timed_out)
            self.transport.write(encode(payload))

    def _reply(self, frame: bytes) -> None:
        d = self._in_flight
        if d is None:
            log.warn("MLLP client: unsolicited reply frame ({size} bytes) ignored", size=len(frame))
            return
        if self._stale is not None and self._stale(frame):
            log.info("MLLP client: a stale reply frame ({size} bytes) ignored", size=len(frame))
            return
        self._in_flight = self._stale = None
        self._stop_timer()
        self._next()  # queued sends keep their order even if d's callbacks send more
        d.callback(frame)

    def _timed_out(self) -> None:
        self._timer = None
        d = self._in_flight
        self._in_flight = None
        if d is not None:
            d.errback(Failure(ReplyTimeout(f"no reply within {self.timeout:g} s")))
        self._abort(Failure(ReplyTimeout("reply timeout")))

    def _abort(self, failure: Failure) -> None:
        """Drop the connection; in-flight and queued sends fail with ConnectionLost."""
        d = self._in_flight
        self._in_flight = None
        self._stop_timer()
        if d is not None:
            d.errback(failure)
        if self.transport is not None and self._connected:
            self.transport.abortConnection()

    def _cancel(self, d: Deferred[bytes]) -> None:
        """Deferred canceller: a queued send is dropped; the one in flight
        drops the connection (its reply could be taken for the next one's)."""
        for item in self._queue:
            if item[1] is d:
                self._queue.remove(item)
                return
        if d is self._in_flight:
            self._in_flight = None
            self._stop_timer()
            if self.transport is not None and self._connected:
                self.transport.abortConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


def client_endpoint(reactor, description: str, *, timeout: float = DEFAULT_TIMEOUT) -> IStreamClientEndpoint:
    """An endpoint for ``host:port`` or a Twisted client endpoint string.

    ``host:port`` becomes a ``HostnameEndpoint`` (IPv4 and IPv6, names
    resolved off the reactor thread) with ``timeout`` as connect timeout.
    Raises ValueError for a string that is neither.
    """
    description = description.strip()
    match = _HOST_PORT.fullmatch(description)
    if match and (match["v6"] or match["host"].lower() not in _ENDPOINT_TYPES):
        host = match["v6"] or match["host"]
        port = int(match["port"])
        if port > 65535:
            raise ValueError(f"port out of range: {port}")
        return endpoints.HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    kind = description.split(":", 1)[0].lower()
    if kind == "tls":
        description = re.sub(r"(?<=:)caCertsDir=", "trustRoots=", description)
    try:
        return endpoints.clientFromString(reactor, description)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ValueError(f"bad endpoint {description!r}: {e}") from None
    except Exception as e:  # a plugin lookup miss, an unreadable certificate ...
        raise ValueError(f"bad endpoint {description!r}: {type(e).__name__}: {e}") from None


def connect(
    reactor,
    endpoint_description: str,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_queued: int = DEFAULT_MAX_QUEUED,
) -> Deferred[MLLPClientProtocol]:
    """Connect; fires with a connected :class:`MLLPClientProtocol`.

    ``timeout`` is both the connect timeout (for ``host:port``) and the
    protocol's reply timeout. A bad description fails the Deferred with
    ValueError.
    """
    try:
        endpoint = client_endpoint(reactor, endpoint_description, timeout=timeout or DEFAULT_TIMEOUT)
    except ValueError as e:
        return fail(e)
    protocol = MLLPClientProtocol(reactor, timeout=timeout, max_frame_bytes=max_frame_bytes, max_queued=max_queued)
    return endpoints.connectProtocol(endpoint, protocol)
