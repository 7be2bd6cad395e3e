"""What an answer means and when to try again: pure functions, no I/O.

``judge(reply, control_id)`` reads a destination's reply to one copy:

- MSA-1 AA or CA, MSA-2 = the copy's MSH-10 -> ``DELIVERED``;
- MSA-1 AE, AR, CE or CR, MSA-2 = the copy's MSH-10 -> ``FAILED``, with the
  reason (MSA-3 and the ERR segments' texts) for the operator;
- anything else (no MSA, another MSA-2, an unknown code) -> ``PROTOCOL``: the
  reply cannot be taken for this copy, so the connection is closed (a late
  reply must never be taken for the next copy) and the copy is sent again.

``backoff(attempts, initial, maximum, rand)`` is the wait before the next
try after ``attempts`` failed ones: exponential, capped, with jitter so that
the senders of many nodes or destinations do not come back in step.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

ACCEPTED = frozenset({"AA", "CA"})
REFUSED = frozenset({"AE", "AR", "CE", "CR"})
MAX_REASON_CHARS = 500

_BOM = b"\xef\xbb\xbf"


class Kind(StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"
    PROTOCOL = "protocol"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    code: str | None  # MSA-1 as received (None: no MSA)
    reason: str | None  # for last_error; None when delivered


@dataclass(frozen=True, slots=True)
class Settings:
    """How the worker delivers (``[server]`` keys in the configuration)."""

    timeout: float = 30.0  # seconds to connect, and to wait for each ACK (server.delivery_timeout)
    retry_initial: float = 1.0  # first wait after a copy could not be delivered (server.retry_initial)
    retry_max: float = 300.0  # longest wait between two tries (server.retry_max)
    poll: float = 2.0  # seconds between looks at the queue without a wake-up (server.delivery_poll)
    batch: int = 100  # copies read from the queue at a time

    def __post_init__(self) -> None:
        if not (self.timeout > 0 and self.retry_initial > 0 and self.retry_max >= self.retry_initial):
            raise ValueError("delivery settings: timeout and retry_initial > 0, retry_max >= retry_initial")
        if not (self.poll > 0 and self.batch >= 1):
            raise ValueError("delivery settings: poll > 0 and batch >= 1")


def backoff(attempts: int, initial: float, maximum: float, rand: float) -> float:
    """Seconds to wait after ``attempts`` (>= 1) failed tries; ``rand`` in [0, 1).

    The ceiling doubles from ``initial`` up to ``maximum``; the wait is drawn
    between half the ceiling and the ceiling ("equal jitter"), so it never
    shrinks to nothing and never exceeds ``maximum``.
    """
    ceiling = min(maximum, initial * 2.0 ** min(max(attempts, 1) - 1, 60))
    return ceiling / 2 + ceiling / 2 * min(max(rand, 0.0), 1.0)


def _read(reply: bytes) -> tuple[list[str], str, str, list[str] | None]:
    """A reply's segments, field separator, encoding characters and MSA fields (None: no MSA)."""
    if reply.startswith(_BOM):
        reply = reply[len(_BOM):]
    text = reply.decode("utf-8", "replace")  # the delimiters are ASCII whatever the charset
    separator = text[3] if text.startswith("MSH") and len(text) > 3 else "|"
    encoding = text[4:8].split(separator, 1)[0] if text.startswith("MSH") else "^~\\&"
    segments = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s]
    msa = next((s.split(separator) for s in segments if s.startswith("MSA" + separator)), None)
    if msa is not None:
        msa += [""] * (4 - len(msa))
    return segments, separator, encoding, msa


def acknowledges(reply: bytes) -> str | None:
    """The control id a reply acknowledges (its MSA-2), or None without an MSA."""
    msa = _read(reply)[3]
    return msa[2].strip() if msa is not None else None


def judge(reply: bytes, control_id: str) -> Verdict:
    """What a destination's reply says about the copy whose MSH-10 is ``control_id``."""
    segments, separator, encoding, msa = _read(reply)
    if msa is None:
        return Verdict(Kind.PROTOCOL, None, "the reply has no MSA segment")
    code, acknowledged = msa[1].strip().upper(), msa[2].strip()
    if acknowledged != control_id:  # an answer to something else: no code of the copy's (it was not accepted)
        said = f" (MSA-1 {_quote(code)})" if code else ""
        return Verdict(
            Kind.PROTOCOL, None, f"MSA-2 {_quote(acknowledged)} is not the copy's MSH-10 {_quote(control_id)}{said}"
        )
    if code in ACCEPTED:
        return Verdict(Kind.DELIVERED, code, None)
    if code not in REFUSED:
        return Verdict(Kind.PROTOCOL, code or None, f"MSA-1 {_quote(code)} is not an acknowledgement code")
    texts = [_unescape(msa[3], separator, encoding)]
    for segment in segments:
        if segment.startswith("ERR" + separator):
            texts.append(_err_text(segment.split(separator), separator, encoding))
    said = "; ".join(dict.fromkeys(" ".join(t.split()) for t in texts if t.strip()))
    reason = f"{code}: {said}" if said else code
    return Verdict(Kind.FAILED, code, _cut(reason))


def _err_text(fields: list[str], separator: str, encoding: str) -> str:
    """ERR-8 (user message), else ERR-3's text or code (v2.5+), else ERR-1's code text (before v2.5)."""
    component = encoding[0] if encoding else "^"
    fields += [""] * (9 - len(fields))
    if fields[8].strip():
        return _unescape(fields[8], separator, encoding)
    if fields[3].strip():
        parts = fields[3].split(component) + [""]
        code, text = parts[0], parts[1]
        return _unescape(f"{code} {text}".strip(), separator, encoding)
    if fields[1].strip():  # ERR-1 (ELD): segment^sequence^field^code (CE: identifier^text)
        parts = fields[1].split(component) + ["", "", "", ""]
        subcomponent = encoding[3] if len(encoding) > 3 else "&"
        code = parts[3].split(subcomponent) + [""]
        return _unescape(f"{code[0]} {code[1]}".strip(), separator, encoding)
    return ""


def _unescape(value: str, separator: str, encoding: str) -> str:
    """HL7 escapes of the delimiters and line breaks; other escapes stay as written."""
    if len(encoding) < 4 or encoding[2] not in value:
        return value
    component, repetition, escape, subcomponent = encoding[:4]
    names = {"F": separator, "S": component, "T": subcomponent, "R": repetition, "E": escape, ".br": " "}
    parts = value.split(escape)
    out = [parts[0]]
    for i in range(1, len(parts), 2):
        if i + 1 < len(parts):
            out.append(names.get(parts[i], escape + parts[i] + escape))
            out.append(parts[i + 1])
        else:
            out.append(escape + parts[i])
    return "".join(out)


def _quote(value: str) -> str:
    return repr(value[:60])


def _cut(value: str) -> str:
    return value if len(value) <= MAX_REASON_CHARS else value[: MAX_REASON_CHARS - 3] + "..."
