"""Build the HL7 acknowledgement for one inbound message (pure, no I/O).

``build_ack(header, outcome, control_id=..., now=...)`` returns the ACK as
text with CR segment ends; the caller encodes it with ``header.codec`` and
frames it. The ACK is a function of the header and the outcome only, so the
same inputs always give the same ACK (a resent message gets its original
answer again).

Shape, per HL7 v2 chapter 2 (original and enhanced acknowledgment mode)::

    MSH|^~\\&|<MSH-5>|<MSH-6>|<MSH-3>|<MSH-4>|<now>||ACK^<event>^ACK|<new id>|<MSH-11>|<MSH-12>[|||||||<MSH-18>]
    MSA|<AA/AE/AR or CA/CE/CR>|<MSH-10 as sent>|<text>
    [ERR|...]                       only when the outcome names a problem

Raw fields mirrored from the inbound MSH are copied as sent; everything this
module writes itself (texts, defaults, the event code) is escaped with the
message's own escape sequences, so no text can break the structure.
"""
from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache

from exchange.hl7.header import DEFAULT_DELIMITERS, MAX_CONTROL_ID, Delimiters, Header
from exchange.outcome import Outcome, Problem, Verdict

__all__ = [
    "TABLE_0357",
    "ack_code",
    "build_ack",
    "escape_text",
    "format_timestamp",
    "mirror_field",
    "version_tuple",
]

# HL7 table 0357, message error condition codes (v2.5-v2.8 descriptions).
TABLE_0357: dict[int, str] = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    104: "Value too long",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

# MSA-1, HL7 table 0008: (original mode, enhanced mode commit ACK)
_ACK_CODES: dict[Verdict, tuple[str, str]] = {
    Verdict.ACCEPT: ("AA", "CA"),
    Verdict.ERROR: ("AE", "CE"),
    Verdict.REJECT: ("AR", "CR"),
}

# Problems with MSH-1/MSH-2 make the sender's delimiters unusable.
_DELIMITER_LOCATIONS = frozenset({"MSH-1", "MSH-2"})

_DEFAULT_PROCESSING_ID = "P"
_DEFAULT_VERSION = "2.5"

_V2_2 = (2, 2)
_V2_3_1 = (2, 3, 1)
_V2_5 = (2, 5)

_VERSION_PREFIX = re.compile(r"\s*(\d+(?:\.\d+)*)")
# "PID-3.4" -> segment PID, field 3, component 4 (subcomponent optional)
_LOCATION = re.compile(r"([A-Z][A-Z0-9]{2})(?:\((\d+)\))?(?:-(\d+)(?:\[(\d+)\])?(?:\.(\d+)(?:\.(\d+))?)?)?")


@lru_cache(maxsize=256)
def version_tuple(v: str) -> tuple[int, ...]:
    """The leading dotted number of a version id, as a tuple for comparisons.

    "2.3.1" -> (2, 3, 1); "2.5^DEU" -> (2, 5); "3.1415926" -> (3, 1415926);
    "2.3junk" -> (2, 3); "" or "abc" -> ().
    """
    m = _VERSION_PREFIX.match(v)
    if m is None:
        return ()
    return tuple(int(part) for part in m.group(1).split("."))


def ack_code(header: Header, outcome: Outcome) -> str:
    """MSA-1 for this outcome: AA/AE/AR in original mode, CA/CE/CR in enhanced mode.

    Raises ValueError for Verdict.IGNORE: an inbound ACK is never answered.
    """
    codes = _ACK_CODES.get(outcome.verdict)
    if codes is None:
        raise ValueError("never ACK an ACK: Verdict.IGNORE has no acknowledgement")
    return codes[1] if header.enhanced_mode else codes[0]


def escape_text(text: str, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Escape a text for use inside one HL7 component.

    Delimiters become \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ (and \\P\\ for a v2.7
    truncation character); control characters (CR, LF, the MLLP block bytes)
    become \\Xhh\\, so the result can never end a segment or a frame.
    """
    table = _escape_table(delimiters)
    if not any(c in table or c < " " or c == "\x7f" for c in text):
        return text  # the common case: nothing to do
    esc = delimiters.escape
    out = []
    for c in text:
        if c in table:
            out.append(table[c])
        elif c < " " or c == "\x7f":
            out.append(f"{esc}X{ord(c):02X}{esc}")
        else:
            out.append(c)
    return "".join(out)


@lru_cache(maxsize=64)
def _escape_table(d: Delimiters) -> dict[str, str]:
    table = {
        d.escape: d.escape + "E" + d.escape,
        d.field: d.escape + "F" + d.escape,
        d.component: d.escape + "S" + d.escape,
        d.subcomponent: d.escape + "T" + d.escape,
        d.repetition: d.escape + "R" + d.escape,
    }
    if d.truncation:
        table[d.truncation] = d.escape + "P" + d.escape
    return table


def format_timestamp(now: datetime) -> str:
    """HL7 DTM to the second: YYYYMMDDHHMMSS, plus ±ZZZZ when ``now`` is aware."""
    text = f"{now.year:04d}{now.month:02d}{now.day:02d}{now.hour:02d}{now.minute:02d}{now.second:02d}"
    offset = now.utcoffset()
    if offset is None:
        return text
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{text}{sign}{hours:02d}{minutes:02d}"


def build_ack(
    header: Header,
    outcome: Outcome,
    *,
    control_id: str,
    now: datetime,
    application: str = "EXCHANGE",
    facility: str = "EXCHANGE",
    message_type: str | None = None,
    more_problems: tuple[Problem, ...] = (),
) -> str:
    """The ACK for ``header``'s message as text with CR segment ends.

    ``control_id`` is the ACK's own fresh MSH-10; ``now`` its MSH-7;
    ``application``/``facility`` fill MSH-3/MSH-4 when the sender left its
    MSH-5/MSH-6 empty. Raises ValueError for Verdict.IGNORE. A response that is
    not an ACK (a query's, ``exchange.pix``) gives its ``message_type`` (MSH-9 as
    written, components joined with ``^``) and, after the outcome's problem, one
    ERR more for each of ``more_problems``.
    """
    code = ack_code(header, outcome)  # raises for IGNORE before any work
    d = _ack_delimiters(header)
    version = header.version_field or _DEFAULT_VERSION
    # The ACK declares MSH-12 = `version`, so its layout follows that version
    # (an empty MSH-12 is answered as 2.5, the default we declare).
    vt = version_tuple(header.version or _DEFAULT_VERSION)

    msh = [
        "MSH",
        d.encoding_characters,
        mirror_field(header.receiving_application_field, d) or escape_text(application, d),
        mirror_field(header.receiving_facility_field, d) or escape_text(facility, d),
        mirror_field(header.sending_application_field, d),
        mirror_field(header.sending_facility_field, d),
        format_timestamp(now),
        "",  # MSH-8 security
        _message_type(header.event, vt, d) if message_type is None else message_type.replace("^", d.component),
        escape_text(control_id, d),
        mirror_field(header.processing_id_field, d) or _DEFAULT_PROCESSING_ID,
        mirror_field(version, d),
    ]
    if header.charset_field:
        msh += ["", "", "", "", "", mirror_field(header.charset_field, d)]  # MSH-13..17, MSH-18
    # MSH-1 is the separator itself: "MSH" + "|" + "^~\&" ...
    segments = [d.field.join(msh)]

    text = "" if outcome.verdict is Verdict.ACCEPT else outcome.text
    segments.append(
        d.field.join(["MSA", code, mirror_field(header.control_id[:MAX_CONTROL_ID], d), escape_text(text, d)]).rstrip(d.field)
    )
    severity = "W" if outcome.verdict is Verdict.ACCEPT else "E"
    for problem in (outcome.problem, *more_problems) if outcome.problem is not None else more_problems:
        if not vt or vt < _V2_5:
            segments.append(_err_pre_2_5(problem, d))
        else:
            segments.append(_err_2_5(problem, severity, d))
    return "\r".join(segments) + "\r"


def _ack_delimiters(header: Header) -> Delimiters:
    problem = header.problem
    if problem is not None and problem.location in _DELIMITER_LOCATIONS:
        return DEFAULT_DELIMITERS
    return header.delimiters


def mirror_field(field: str, d: Delimiters) -> str:
    """A field mirrored as sent; only what would break the ACK's framing is escaped.

    Raw fields were split with the sender's delimiters, so they cannot hold
    the field separator or a segment end -- unless the sender's delimiters
    were unusable and the ACK fell back to the defaults.
    """
    if d.field in field or "\r" in field or "\n" in field or "\x1c" in field or "\x0b" in field:
        out = []
        for c in field:
            if c == d.field:
                out.append(d.escape + "F" + d.escape)
            elif c in "\r\n\x1c\x0b":
                out.append(f"{d.escape}X{ord(c):02X}{d.escape}")
            else:
                out.append(c)
        return "".join(out)
    return field


def _message_type(event: str, vt: tuple[int, ...], d: Delimiters) -> str:
    """MSH-9: ACK^<event>^ACK from v2.3.1, ACK^<event> for v2.2-2.3, ACK for v2.1.

    An unparseable version gets the modern form (it is answered as sent,
    and the three-component form is what current receivers expect).
    """
    if not event or (vt and vt < _V2_2):
        return "ACK"
    event = escape_text(event, d)
    if vt and vt < _V2_3_1:
        return f"ACK{d.component}{event}"
    return f"ACK{d.component}{event}{d.component}ACK"


def _location(location: str) -> tuple[str, str, str, str, str, str]:
    """(segment, its sequence, field, repetition, component, subcomponent) of "PID-3.4" (sequence
    "1", repetition ""), "PID(2)-3" (the second PID) or "QPD-4[2].4"; empty parts when absent."""
    m = _LOCATION.fullmatch(location.strip())
    if m is None:
        return ("", "", "", "", "", "")
    return (m.group(1), m.group(2) or "1", m.group(3) or "", m.group(4) or "", m.group(5) or "", m.group(6) or "")


def _err_pre_2_5(problem: Problem, d: Delimiters) -> str:
    """ERR-1 as ELD: segment^sequence^field^code&text&HL70357 (v2.1-v2.4)."""
    segment, sequence, field, _, _, _ = _location(problem.location)
    ce = d.subcomponent.join(
        [str(problem.code), escape_text(TABLE_0357.get(problem.code, ""), d), "HL70357"]
    )
    return d.field.join(["ERR", d.component.join([segment, sequence, field, ce])])


def _err_2_5(problem: Problem, severity: str, d: Delimiters) -> str:
    """ERR-2 location (ERL), ERR-3 code (CWE), ERR-4 severity, ERR-8 user message (v2.5+).

    ERL components: segment^sequence^field^repetition^component^subcomponent;
    a component location ("PID-3.4") names repetition 1 unless it names another ("QPD-4[2].4").
    """
    segment, sequence, field, repetition, component, subcomponent = _location(problem.location)
    erl: list[str] = []
    if segment:
        erl = [segment, sequence]
        if field:
            erl.append(field)
            if component or repetition:
                erl.append(repetition or "1")
            if component:
                erl.append(component)
                if subcomponent:
                    erl.append(subcomponent)
    cwe = d.component.join(
        [str(problem.code), escape_text(TABLE_0357.get(problem.code, ""), d), "HL70357"]
    )
    fields = [
        "ERR",
        "",  # ERR-1 (ELD) is backward compatible only; not used from v2.5
        d.component.join(erl),
        cwe,
        severity,
        "",  # ERR-5 application error code
        "",  # ERR-6 application error parameter
        "",  # ERR-7 diagnostic information
        escape_text(problem.text, d),  # ERR-8 user message
    ]
    return d.field.join(fields).rstrip(d.field)
