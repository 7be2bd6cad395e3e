"""Header fast path: read MSH without parsing the rest of the message.

``read_header(payload)`` finds MSH, takes the delimiters from MSH-1/MSH-2 and
splits only the MSH segment (plus EVN-1 when MSH-9.2 is empty, as in v2.1/2.2).
It costs a few microseconds; python-hl7's full parse costs about 1 ms.
It never raises for bad input: problems come back as ``Header.problem``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from exchange.hl7.charset import ascii_compatible, canonical_codec, codec_for
from exchange.outcome import Problem, Value


@dataclass(frozen=True, slots=True)
class Delimiters(Value):
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str | None = None  # v2.7+: a fifth MSH-2 character, usually '#'

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as it is written."""
        return (
            self.component
            + self.repetition
            + self.escape
            + self.subcomponent
            + (self.truncation or "")
        )


DEFAULT_DELIMITERS = Delimiters()
MAX_CONTROL_ID = 199  # MSH-10 and MSA-2 (ST, 199 characters from v2.7; 20 before, often exceeded)


@dataclass(frozen=True, slots=True)
class Header(Value):
    """What the intake needs from MSH, as text.

    Fields named ``*_field`` are whole raw fields (components included) so
    they can be mirrored byte-for-byte into an ACK; the others are single
    components, stripped of surrounding spaces. Absent means "".
    """

    delimiters: Delimiters = DEFAULT_DELIMITERS
    sending_application_field: str = ""  # MSH-3
    sending_facility_field: str = ""  # MSH-4
    receiving_application_field: str = ""  # MSH-5
    receiving_facility_field: str = ""  # MSH-6
    timestamp: str = ""  # MSH-7
    message_type: str = ""  # MSH-9.1, e.g. "ADT"
    event: str = ""  # MSH-9.2, else EVN-1 (v2.1/2.2), e.g. "A01"
    structure: str = ""  # MSH-9.3 as sent (often wrong; never route on it)
    control_id: str = ""  # MSH-10, the whole field as sent (may even hold '^')
    processing_id: str = ""  # MSH-11.1: P, T or D
    processing_id_field: str = ""  # MSH-11 whole, e.g. "P^T"
    version: str = ""  # MSH-12.1, e.g. "2.5.1"
    version_field: str = ""  # MSH-12 whole, e.g. "2.5^DEU"
    accept_ack_type: str = ""  # MSH-15: AL, NE, ER, SU or ""
    application_ack_type: str = ""  # MSH-16
    charset_field: str = ""  # MSH-18 as sent (first repetition), e.g. "UNICODE UTF-8"
    codec: str = "utf-8"  # the Python codec used to decode this message
    charset_fallback: bool = False  # True when the default charset failed and a fallback decoded it
    segment_start: str = "MSH"  # "MSH", or "BHS"/"FHS" for a batch frame
    problem: Problem | None = None  # why the header cannot be used, if it cannot

    @property
    def facility(self) -> str:
        """MSH-4.1, the sending facility's namespace id (the configured facility code)."""
        return self.sending_facility_field.split(self.delimiters.component, 1)[0].strip()

    @property
    def sending_application(self) -> str:
        """MSH-3.1, the sending application's namespace id."""
        return self.sending_application_field.split(self.delimiters.component, 1)[0].strip()

    @property
    def enhanced_mode(self) -> bool:
        """Enhanced acknowledgment mode: MSH-15 or MSH-16 is filled in."""
        return bool(self.accept_ack_type or self.application_ack_type)

    @property
    def is_ack(self) -> bool:
        return self.message_type == "ACK"


# --- reading -----------------------------------------------------------------

_BOM = b"\xef\xbb\xbf"
_LEADING_WHITESPACE = frozenset(b" \t\r\n")
_SCAN_WINDOW = 4096  # look this far for the end of MSH before searching the rest
# Characters allowed as MSH-1 and in MSH-2: printable ASCII, not letters or digits.
_SEPARATOR_CHARS = frozenset(chr(b) for b in range(0x21, 0x7F) if not chr(b).isalnum())

NO_MSH = Problem(100, "MSH", "message does not start with an MSH segment")
MSH1_MISSING = Problem(101, "MSH-1", "MSH-1 field separator is required")
MSH1_INVALID = Problem(102, "MSH-1", "MSH-1 field separator is invalid")
MSH2_INVALID = Problem(102, "MSH-2", "MSH-2 encoding characters are invalid")
MSH9_MISSING = Problem(101, "MSH-9", "MSH-9 message type is required")
MSH10_MISSING = Problem(101, "MSH-10", "MSH-10 message control id is required")
MSH12_MISSING = Problem(101, "MSH-12", "MSH-12 version id is required")

DefaultCharset = str | Callable[[str], str]


def read_header(payload: bytes, default_charset: DefaultCharset = "utf-8") -> Header:
    """Read the MSH segment of one message (an MLLP payload) into a :class:`Header`.

    ``default_charset`` is the Python codec used when MSH-18 is empty, or a
    function from the sending facility (MSH-4.1) to that codec. If an
    undeclared UTF-8/ASCII default cannot decode MSH, cp1252 and then latin-1
    are used and ``charset_fallback`` is set.

    Never raises for bad input; ``Header.problem`` says what is wrong, in
    precedence order MSH-1/MSH-2, MSH-18, MSH-9, MSH-10, MSH-12. (It raises
    LookupError only when ``default_charset`` names no Python codec: a
    configuration bug.)
    """
    n = len(payload)
    start = 0
    while True:  # skip a BOM and whitespace (CR/LF/space/tab), in any order
        if payload.startswith(_BOM, start):
            start += 3
        elif start < n and payload[start] in _LEADING_WHITESPACE:
            start += 1
        else:
            break

    segment_start = "MSH"
    if not payload.startswith(b"MSH", start):
        tag = payload[start : start + 3]
        if tag != b"BHS" and tag != b"FHS":
            return Header(problem=NO_MSH)
        segment_start = tag.decode("ascii")
        msh = _find_segment(payload, b"MSH", start + 3)
        if msh < 0:
            # A batch with no message (or a broken one): batch.py decides.
            # Report the batch header's own delimiters when they are valid.
            batch_header = payload[start : _segment_end(payload, start)].decode("latin-1")
            fields = batch_header.split(batch_header[3:4], 2) if len(batch_header) > 3 else []
            delimiters = DEFAULT_DELIMITERS
            if len(fields) > 1 and batch_header[3] in _SEPARATOR_CHARS:
                if 4 <= len(fields[1]) <= 5:
                    delimiters = _delimiters(batch_header[3], fields[1]) or DEFAULT_DELIMITERS
            return Header(delimiters=delimiters, segment_start=segment_start)
        start = msh

    end = _segment_end(payload, start)
    segment = payload[start:end]
    if len(segment) < 4:
        return Header(segment_start=segment_start, problem=MSH1_MISSING)
    # latin-1 maps every byte to one character, so this never fails and is
    # exact for ASCII; it is re-decoded below only when MSH has 8-bit bytes.
    text = segment.decode("latin-1")
    sep = text[3]
    if sep not in _SEPARATOR_CHARS:
        return Header(segment_start=segment_start, problem=MSH1_INVALID)
    fields = text.split(sep)

    problem: Problem | None = None
    delimiters = _delimiters(sep, fields[1]) if 4 <= len(fields[1]) <= 5 else None
    if delimiters is None:
        problem = MSH2_INVALID
        delimiters = Delimiters(field=sep) if sep not in "^~\\&" else DEFAULT_DELIMITERS
    component = delimiters.component

    if len(fields) < 18:
        fields += [""] * (18 - len(fields))
    charset_field = fields[17].split(delimiters.repetition, 1)[0].strip()

    # MSH-18: choose the codec; MSH is re-decoded with it if it has 8-bit bytes.
    codec, fields, fallback, charset_problem = _decode_msh(
        segment, text, fields, charset_field, default_charset, component
    )
    problem = problem or charset_problem
    if len(fields) < 18:
        fields += [""] * (18 - len(fields))

    # --- the fields the intake needs -----------------------------------------
    msh9 = fields[8].split(component)
    message_type = msh9[0].strip()
    event = msh9[1].strip() if len(msh9) > 1 else ""
    structure = msh9[2].strip() if len(msh9) > 2 else ""
    if not event:
        event = _evn1(payload, end, segment[3:4], component, codec)
    control_id = fields[9].strip()
    processing_id_field = fields[10]
    version_field = fields[11]
    version = version_field.split(component, 1)[0].strip()

    if problem is None:
        if not message_type:
            problem = MSH9_MISSING
        elif not control_id:
            problem = MSH10_MISSING
        elif not version:
            problem = MSH12_MISSING

    return Header(
        delimiters=delimiters,
        sending_application_field=fields[2],
        sending_facility_field=fields[3],
        receiving_application_field=fields[4],
        receiving_facility_field=fields[5],
        timestamp=fields[6].split(component, 1)[0].strip(),
        message_type=message_type,
        event=event,
        structure=structure,
        control_id=control_id,
        processing_id=processing_id_field.split(component, 1)[0].strip(),
        processing_id_field=processing_id_field,
        version=version,
        version_field=version_field,
        accept_ack_type=fields[14].strip(),
        application_ack_type=fields[15].strip(),
        charset_field=charset_field,
        codec=codec,
        charset_fallback=fallback,
        segment_start=segment_start,
        problem=problem,
    )


def _decode_msh(
    segment: bytes,
    text: str,
    fields: list[str],
    charset_field: str,
    default_charset: DefaultCharset,
    component: str,
) -> tuple[str, list[str], bool, Problem | None]:
    """Choose the codec for a message and split its MSH with it.

    ``text``/``fields`` are MSH read as latin-1 (exact when MSH is ASCII).
    Returns (codec, fields, charset_fallback, problem). When the charset is
    unsupported or does not decode, the latin-1 fields are kept (so a NAK can
    still be built) and the codec is "latin-1".
    """
    sep = text[3]
    plain = segment.isascii() and 0x1B not in segment  # no 8-bit bytes, no ISO 2022 escapes
    if charset_field:  # declared in MSH-18
        codec = codec_for(charset_field)
        if codec is None:
            return "latin-1", fields, False, Problem(
                103, "MSH-18", f"unsupported character set {charset_field[:40]}"
            )
        if not ascii_compatible(codec):  # MSH reads as single bytes: not UTF-16/32
            return "latin-1", fields, False, _not_valid(charset_field)
        if plain:
            return codec, fields, False, None
        try:
            return codec, segment.decode(codec).split(sep), False, None
        except UnicodeDecodeError:
            return "latin-1", fields, False, _not_valid(charset_field)

    if isinstance(default_charset, str):
        codec = default_charset
    else:
        facility = fields[3].split(component, 1)[0].strip()
        if not plain:
            try:
                facility = facility.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                pass
        codec = default_charset(facility)
    if not ascii_compatible(codec):
        return "latin-1", fields, False, _not_valid(f"{codec} (the sender's default)")
    if plain:
        return codec, fields, False, None
    try:
        return codec, segment.decode(codec).split(sep), False, None
    except UnicodeDecodeError:
        if canonical_codec(codec) not in ("utf-8", "ascii"):
            return "latin-1", fields, False, _not_valid(f"{codec} (the sender's default)")
    # Undeclared 8-bit text that is not the default, typically ISO-8859-1.
    try:
        return "cp1252", segment.decode("cp1252").split(sep), True, None
    except UnicodeDecodeError:
        return "latin-1", fields, True, None  # latin-1 maps every byte


def _not_valid(charset: str) -> Problem:
    return Problem(102, "MSH-18", f"message is not valid {charset}")


@lru_cache(maxsize=64)
def _delimiters(field: str, encoding_characters: str) -> Delimiters | None:
    """Delimiters from MSH-1 and MSH-2, or None when MSH-2 is invalid.

    Valid MSH-2: 4 characters (5 from v2.7: truncation), all distinct, none
    equal to MSH-1, none a letter, digit, space, control or 8-bit character.
    Cached: almost every sender uses ``|^~\\&``.
    """
    chars = encoding_characters
    if len(chars) not in (4, 5) or len(set(chars)) != len(chars) or field in chars:
        return None
    if not all(c in _SEPARATOR_CHARS for c in chars):
        return None
    return Delimiters(field, chars[0], chars[1], chars[2], chars[3], chars[4] if len(chars) == 5 else None)


def _segment_end(payload: bytes, start: int) -> int:
    """Index of the CR or LF ending the segment that begins at ``start`` (or len)."""
    n = len(payload)
    lo = start
    while lo < n:
        hi = lo + _SCAN_WINDOW
        cr = payload.find(b"\r", lo, hi)
        lf = payload.find(b"\n", lo, cr if cr >= 0 else hi)
        if lf >= 0:
            return lf
        if cr >= 0:
            return cr
        lo = hi
    return n


def _find_segment(payload: bytes, tag: bytes, start: int) -> int:
    """Index of the first segment ``tag`` (at a line start) at or after ``start``, or -1."""
    pos = start
    while True:
        k = payload.find(tag, pos)
        if k < 0:
            return -1
        if k > 0 and payload[k - 1] in (0x0D, 0x0A):
            return k
        pos = k + 1


def _evn1(payload: bytes, after: int, sep: bytes, component: str, codec: str) -> str:
    """EVN-1.1 (the event of v2.1/v2.2 messages), or "" when there is no EVN."""
    pos = after
    while True:
        k = _find_segment(payload, b"EVN", pos)
        if k < 0:
            return ""
        if payload[k + 3 : k + 4] == sep:
            break
        pos = k + 3
    value_start = k + 4
    value_end = _segment_end(payload, value_start)
    field = payload[value_start:value_end].split(sep, 1)[0]
    return field.decode(codec, "replace").split(component, 1)[0].strip()
