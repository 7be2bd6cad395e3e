"""HL7 batches in one MLLP frame: split them, and build the batch acknowledgement (pure).

A batch frame looks like (HL7 v2 chapter 2, "batch protocol")::

    [FHS]  file header            FHS-11 file control id
    BHS    batch header           BHS-11 batch control id
    MSH ... (message 1)
    MSH ... (message 2)
    BTS    batch trailer          BTS-1 message count
    [FTS]  file trailer           FTS-1 batch count

Senders leave out parts: the corpus has a batch without BTS/FTS and one
without any MSH. ``split_batch`` is lenient (it never raises) and reports
what it found; ``build_batch_ack`` answers with the HL7 batch acknowledgement::

    [FHS]  sender/receiver swapped, FHS-11 fresh, FHS-12 = inbound FHS-11
    BHS    sender/receiver swapped, BHS-11 fresh, BHS-12 = inbound batch control id
    MSH MSA [ERR]   one ACK per message (built by exchange.hl7.ack.build_ack)
    BTS|<number of ACK messages>
    [FTS|1]

A batch with no MSH at all has nothing to acknowledge message by message:
``split_batch`` returns an empty ``messages`` tuple and the caller answers the
frame with one AE, ``build_empty_batch_nak``.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from exchange.hl7.ack import build_ack, escape_text, format_timestamp, mirror_field
from exchange.hl7.header import DEFAULT_DELIMITERS, Delimiters, Header
from exchange.outcome import Outcome, Problem, Verdict

__all__ = [
    "Batch",
    "BatchHeader",
    "build_batch_ack",
    "build_empty_batch_nak",
    "is_batch",
    "split_batch",
]

_BOM = b"\xef\xbb\xbf"
_HEADER_IDS = (b"FHS", b"BHS")
_TRAILER_IDS = (b"BTS", b"FTS")

EMPTY_BATCH_PROBLEM = Problem(100, "", "batch contains no MSH message")


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """The parts of one FHS or BHS the acknowledgement mirrors (raw fields, as text)."""

    segment: str  # "FHS" or "BHS"
    delimiters: Delimiters
    sending_application_field: str = ""  # xHS-3
    sending_facility_field: str = ""  # xHS-4
    receiving_application_field: str = ""  # xHS-5
    receiving_facility_field: str = ""  # xHS-6
    control_id: str = ""  # xHS-11


@dataclass(frozen=True, slots=True)
class Batch:
    """One split batch frame. Segment bytes have no line ends; messages end each segment with CR."""

    header_segments: tuple[bytes, ...]  # FHS and/or BHS lines, as sent
    messages: tuple[bytes, ...]  # each MSH... up to the next MSH/BTS/FTS
    trailer_segments: tuple[bytes, ...] = ()  # BTS and/or FTS lines, as sent
    file_header: BatchHeader | None = None  # FHS
    batch_header: BatchHeader | None = None  # the first BHS
    declared_count: int | None = None  # BTS-1, when present and a number
    stray_segments: tuple[bytes, ...] = ()  # segments outside any message (e.g. PID with no MSH)

    @property
    def control_id(self) -> str:
        """The batch control id: BHS-11, else FHS-11 ("" if neither)."""
        if self.batch_header is not None and self.batch_header.control_id:
            return self.batch_header.control_id
        if self.file_header is not None:
            return self.file_header.control_id
        return ""

    @property
    def delimiters(self) -> Delimiters:
        """The batch's delimiters, from BHS-1/BHS-2 (else FHS-1/FHS-2)."""
        header = self.batch_header or self.file_header
        return header.delimiters if header is not None else DEFAULT_DELIMITERS

    @property
    def has_file_header(self) -> bool:
        return self.file_header is not None

    @property
    def complete(self) -> bool:
        """BTS present (and FTS when the batch came in a file)."""
        ids = {s[:3] for s in self.trailer_segments}
        return b"BTS" in ids and (self.file_header is None or b"FTS" in ids)


def is_batch(payload: bytes) -> bool:
    """Does the frame start (after an optional BOM and whitespace) with FHS or BHS?"""
    return _strip_start(payload)[:3] in _HEADER_IDS


def split_batch(payload: bytes, *, encoding: str = "utf-8") -> Batch:
    """Split a batch frame into its header segments, messages and trailer.

    CR, LF and CRLF segment ends are all accepted; blank lines are skipped.
    ``encoding`` decodes the FHS/BHS fields that the acknowledgement mirrors
    (undecodable bytes become U+FFFD). Never raises.
    """
    segments = _strip_start(payload).replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    header_segments: list[bytes] = []
    trailer_segments: list[bytes] = []
    stray: list[bytes] = []
    messages: list[bytes] = []
    current: list[bytes] | None = None
    file_header = batch_header = None
    declared_count = None

    def close() -> None:
        nonlocal current
        if current:
            messages.append(b"\r".join(current) + b"\r")
        current = None

    for seg in segments:
        if not seg.strip():
            continue
        seg_id = seg[:3]
        if _is_segment(seg, b"MSH"):
            close()
            current = [seg]
        elif seg_id in _HEADER_IDS and _is_segment(seg, seg_id):
            close()
            header_segments.append(seg)
            header = _read_batch_header(seg, encoding)
            if seg_id == b"FHS" and file_header is None:
                file_header = header
            elif seg_id == b"BHS" and batch_header is None:
                batch_header = header
        elif seg_id in _TRAILER_IDS and _is_segment(seg, seg_id):
            close()
            trailer_segments.append(seg)
            if seg_id == b"BTS" and declared_count is None:
                declared_count = _count(seg)
        elif current is not None:
            current.append(seg)
        else:
            stray.append(seg)
    close()
    return Batch(
        header_segments=tuple(header_segments),
        messages=tuple(messages),
        trailer_segments=tuple(trailer_segments),
        file_header=file_header,
        batch_header=batch_header,
        declared_count=declared_count,
        stray_segments=tuple(stray),
    )


def build_batch_ack(
    batch: Batch,
    acks: list[str],
    *,
    control_id: str,
    now: datetime,
    application: str = "EXCHANGE",
    facility: str = "EXCHANGE",
) -> str:
    """The batch acknowledgement: [FHS] BHS, the ACK messages, BTS|<len(acks)> [FTS|1].

    ``acks`` are the texts from ``build_ack``, one per message that gets an
    answer, in order (an inbound ACK inside a batch is not answered, so
    there may be fewer ACKs than messages). ``control_id`` is used as the
    fresh BHS-11 (and FHS-11). Segment ends are CR. Not for a batch without
    messages: answer that one with ``build_empty_batch_nak``.
    """
    d = batch.delimiters
    stamp = format_timestamp(now)
    fresh = escape_text(control_id, d)
    out: list[str] = []
    if batch.file_header is not None:
        out.append(_header_segment("FHS", batch.file_header, d, stamp, fresh, application, facility))
    bhs = batch.batch_header or batch.file_header or BatchHeader("BHS", d)
    # BHS-12 refers to the inbound batch (BHS-11, else FHS-11 when there was no BHS).
    out.append(
        _header_segment(
            "BHS", bhs, d, stamp, fresh, application, facility, reference=batch.control_id
        )
    )
    for ack in acks:
        out.append(ack[:-1] if ack.endswith("\r") else ack)
    out.append(f"BTS{d.field}{len(acks)}")
    if batch.file_header is not None:
        out.append(f"FTS{d.field}1")
    return "\r".join(out) + "\r"


def build_empty_batch_nak(
    batch: Batch,
    *,
    control_id: str,
    now: datetime,
    application: str = "EXCHANGE",
    facility: str = "EXCHANGE",
) -> str:
    """One AE (original mode, v2.5 layout) for a batch frame that holds no MSH.

    MSA-2 is the batch control id (BHS-11, else FHS-11); the batch header's
    sender and receiver are mirrored like an MSH's. Error 100 (segment
    sequence error), no location.
    """
    source = batch.batch_header or batch.file_header or BatchHeader("BHS", batch.delimiters)
    header = Header(
        delimiters=source.delimiters,
        sending_application_field=source.sending_application_field,
        sending_facility_field=source.sending_facility_field,
        receiving_application_field=source.receiving_application_field,
        receiving_facility_field=source.receiving_facility_field,
        control_id=batch.control_id,
    )
    return build_ack(
        header,
        Outcome(Verdict.ERROR, EMPTY_BATCH_PROBLEM),
        control_id=control_id,
        now=now,
        application=application,
        facility=facility,
    )


def _strip_start(payload: bytes) -> bytes:
    payload = payload.lstrip()
    while payload.startswith(_BOM):
        payload = payload[len(_BOM):].lstrip()
    return payload


def _is_segment(seg: bytes, seg_id: bytes) -> bool:
    """``seg`` is segment ``seg_id``: the id followed by a separator (or nothing)."""
    return seg[:3] == seg_id and (len(seg) == 3 or not seg[3:4].isalnum())


def _delimiters(seg: bytes) -> Delimiters:
    """xHS-1/xHS-2 like MSH-1/MSH-2; the defaults when they are unusable."""
    if len(seg) < 8:
        return DEFAULT_DELIMITERS
    text = seg.decode("latin-1")
    field = text[3]
    encoding = text[4:].split(field, 1)[0]
    chars = field + encoding
    if (
        len(encoding) not in (4, 5)
        or len(set(chars)) != len(chars)
        or any(c.isalnum() or c.isspace() for c in chars)
    ):
        return DEFAULT_DELIMITERS
    return Delimiters(field, encoding[0], encoding[1], encoding[2], encoding[3], encoding[4:] or None)


def _read_batch_header(seg: bytes, encoding: str) -> BatchHeader:
    d = _delimiters(seg)
    text = seg.decode(encoding, errors="replace")
    parts = text.split(d.field)
    # parts[0] is the segment id and parts[1] is xHS-2, so xHS-n is parts[n - 1].

    def get(n: int) -> str:
        return parts[n - 1] if len(parts) >= n else ""

    return BatchHeader(
        segment=text[:3],
        delimiters=d,
        sending_application_field=get(3),
        sending_facility_field=get(4),
        receiving_application_field=get(5),
        receiving_facility_field=get(6),
        control_id=get(11),
    )


def _count(seg: bytes) -> int | None:
    fields = seg.split(seg[3:4]) if len(seg) > 3 else []
    if len(fields) < 2:
        return None
    value = fields[1].strip()
    return int(value) if value.isdigit() else None


def _header_segment(
    seg_id: str,
    inbound: BatchHeader,
    d: Delimiters,
    stamp: str,
    fresh_control_id: str,
    application: str,
    facility: str,
    *,
    reference: str | None = None,
) -> str:
    """FHS/BHS of the acknowledgement: sender and receiver swapped, fresh xHS-11, xHS-12 reference."""
    fields = [
        seg_id,
        d.encoding_characters,
        mirror_field(inbound.receiving_application_field, d) or escape_text(application, d),  # xHS-3
        mirror_field(inbound.receiving_facility_field, d) or escape_text(facility, d),  # xHS-4
        mirror_field(inbound.sending_application_field, d),  # xHS-5
        mirror_field(inbound.sending_facility_field, d),  # xHS-6
        stamp,  # xHS-7
        "",  # xHS-8 security
        "",  # xHS-9 name/id/type
        "",  # xHS-10 comment
        fresh_control_id,  # xHS-11
        mirror_field(inbound.control_id if reference is None else reference, d),  # xHS-12
    ]
    return d.field.join(fields).rstrip(d.field)
