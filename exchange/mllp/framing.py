"""MLLP framing without I/O (after h11's receive buffer).

An MLLP frame is ``START + payload + END + CR`` (0x0B, message, 0x1C 0x0D).
:class:`MLLPDecoder` takes bytes as they arrive and returns complete payloads;
:func:`encode` frames one payload. No sockets, no Twisted: the protocol feeds
``dataReceived`` data in and writes ``encode(ack)`` out.

Leniency (real senders): junk before a start block is skipped and counted; a
frame ends at END whether or not CR follows (one CR after END is consumed,
even when it arrives in the next read); a START inside a frame means the
frame was cut off, so its partial payload is dropped and counted. Payload
bytes (LF, CRLF, a BOM) are passed through untouched.

Bounds: a frame may hold at most ``max_frame_bytes`` of payload; the decoder
never buffers more than that. Each byte is searched a bounded number of
times, however the stream is split (a 200 KB frame in 1 KB reads is O(n)).
"""
from __future__ import annotations

START = b"\x0b"
END = b"\x1c"
CR = b"\r"

PREFIX_BYTES = 64 * 1024  # how much of an oversize frame FrameTooLarge keeps
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

_CR_BYTE = CR[0]


def encode(payload: bytes) -> bytes:
    """One MLLP frame: START + payload + END + CR."""
    return START + payload + END + CR


class FramingError(Exception):
    """The byte stream cannot be framed; the connection should be closed."""


class FrameTooLarge(FramingError):
    """A frame's payload exceeded ``limit`` bytes.

    ``prefix`` holds its first bytes (up to 64 KiB: enough to read MSH and
    send a NAK). ``frames`` holds the complete payloads that preceded it in
    the same ``feed`` call, which would otherwise be lost with the exception.
    """

    def __init__(self, prefix: bytes, limit: int, frames: list[bytes] | None = None) -> None:
        super().__init__(f"MLLP frame exceeds {limit} bytes")
        self.prefix = prefix
        self.limit = limit
        self.frames = frames if frames is not None else []


class MLLPDecoder:
    """Turn a stream of bytes into MLLP payloads.

    ``feed(data)`` returns the payloads completed by ``data`` (possibly none,
    possibly several). ``discarded`` counts bytes thrown away: junk outside
    frames and the payloads of frames cut off by a new START. After
    :class:`FrameTooLarge` the decoder is closed and ``feed`` raises
    :class:`FramingError`; the caller closes the connection.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        self.max_frame_bytes = max_frame_bytes
        self.discarded = 0
        self._frame = bytearray()  # payload of the open frame, received so far
        self._in_frame = False
        self._swallow_cr = False  # END ended the last read: a CR may start the next
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes currently held (the open frame's payload so far)."""
        return len(self._frame)

    @property
    def in_frame(self) -> bool:
        """True while a START has been seen and its END has not."""
        return self._in_frame

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the payloads they complete, in order."""
        if self._closed:
            raise FramingError("MLLP decoder is closed after a framing error")
        frames: list[bytes] = []
        n = len(data)
        pos = 0
        if self._swallow_cr and n:
            self._swallow_cr = False
            if data[0] == _CR_BYTE:
                pos = 1
        frame = self._frame
        while pos < n:
            if not self._in_frame:
                start = data.find(START, pos)
                if start < 0:
                    self.discarded += n - pos  # junk outside frames is never buffered
                    break
                self.discarded += start - pos
                self._in_frame = True
                pos = start + 1
                continue
            # Inside a frame: each byte of data is searched once for END and
            # once for START; the buffered part is never searched again.
            end = data.find(END, pos)
            stop = n if end < 0 else end
            restart = data.find(START, pos, stop)
            if restart >= 0:  # the open frame was cut off: drop it, start again
                self.discarded += len(frame) + (restart - pos)
                frame.clear()
                pos = restart + 1
                continue
            if len(frame) + (stop - pos) > self.max_frame_bytes:
                self._fail(data, pos, stop, frames)
            if end < 0:
                frame += data[pos:] if pos else data
                break
            if frame:
                frame += data[pos:end]
                frames.append(bytes(frame))
                frame.clear()
            else:
                frames.append(data[pos:end])
            self._in_frame = False
            pos = end + 1
            if pos == n:
                self._swallow_cr = True
            elif data[pos] == _CR_BYTE:
                pos += 1
        return frames

    def _fail(self, data: bytes, pos: int, stop: int, frames: list[bytes]) -> None:
        held = len(self._frame)
        prefix = bytes(self._frame[:PREFIX_BYTES])
        if held < PREFIX_BYTES:
            prefix += data[pos : min(stop, pos + PREFIX_BYTES - held)]
        self._frame = bytearray()
        self._in_frame = False
        self._closed = True
        raise FrameTooLarge(prefix, self.max_frame_bytes, frames)
