"""The copy one destination receives: a pure function of the original message.

``rewrite(message, event=, destination=, facility=, server=, control_id=, now=)``
takes the decoded original (an :class:`exchange.mapping.message.Message`, the
lazy reader the mapping already built) and answers a :class:`Copy`: the text
(segments ending in CR) and the codec to encode it with. What changes:

- MSH-3/4 = ``server.application`` / ``server.facility_id``; MSH-5 = the
  destination's ``application`` (empty when not configured), MSH-6 = its
  code; MSH-7 = ``now``; MSH-10 = ``control_id``. MSH-13/14 (the sender's
  sequence numbers) and MSH-22..25 (its organisations and addresses) are
  cleared, and so are MSH-15/16: copies use original acknowledgement mode,
  one AA/AE/AR per copy.
- PID-3 = the destination's MRN (CX.4 = its authority, CX.5 = ``MR``), then
  the enterprise person id (CX.4 = ``server.person_authority``, CX.5 =
  ``PI``). The sender's other identifiers (its PID-3 repetitions, PID-2,
  PID-4, PID-18 account number; MRG-1's other repetitions, MRG-2/3/4) are
  dropped unless the destination has ``keep_source_identifiers``. Then they
  stay (in PID-3 and MRG-1 after ours), except in every one of those fields
  the sender's identifiers issued by the destination's authority or
  ``server.person_authority`` (CX.4.1 or CX.4.2): there the exchange's MRN
  and person id are the only truth. A copy with neither an MRN nor a person
  id keeps the sender's PID-3 (PID-3 is required), without those two
  authorities' identifiers unless nothing else is left. Visit numbers
  (PV1-19) and document numbers (TXA-12) stay: they are the keys the
  destination needs to follow the encounter and the document.
- One patient per copy: when the message has several PID segments (an A40
  with several PID/MRG pairs), the copy keeps the segments before the first
  PID and the group (PID up to the next PID) whose PID-3 holds
  ``event.source_mrn``, else the first group.
- Merges (A40, A18, A34, A35, A36): MRG-1 = ``destination.prior_mrn`` with
  the destination's authority; routing sends a merge only where both sides
  are the destination's own records (see rules.py).
- Z-segments are dropped unless the destination has ``keep_z_segments``.
- ``version``: MSH-12 becomes that version; with hl7apy's tables for it,
  segments the message structure does not have are dropped (or, when the
  structure is unknown, segments the version does not have), and fields,
  components and subcomponents beyond what the version defines are cut; a
  TS's degree of precision (TS.2, gone with DTM in 2.6) cuts TS.1 instead
  (``19800101^Y`` goes to 2.8 as ``1980``).
  Withdrawn fields (2.7 on: EVN-1, PID-2, PID-4, ...) are emptied; EVN-1 is
  filled from MSH-9.2 for versions that require it. MSH-9.3 is filled in
  (2.3.1 on) or removed (2.3). Below 2.7 the truncation character leaves
  MSH-2 (``\\P\\`` becomes it literally).

The sender's delimiters and escape sequences are kept as they are; the
values we insert are escaped with them. ``Copy.codec`` is the destination's
``charset`` whatever the sender's MSH-18 said, and MSH-18 names it (table
0211's code, ``CHARSET_NAMES``; empty for a charset without one, and in 2.1
and 2.2, which have no MSH-18); when the text cannot be encoded with it, the
copy is UTF-8 with MSH-18 ``UNICODE UTF-8``, in every version. Only the
bytes and MSH-18 change: the text is the same whatever the sender declared.

Pure: no SQL, no Twisted, no I/O. hl7apy's tables are loaded (once per
version) only for a destination that asks for a version.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from exchange.config import FacilityConfig, ServerConfig
from exchange.hl7.ack import format_timestamp, version_tuple
from exchange.hl7.charset import UTF8_CHARSET, canonical_codec, decode_message
from exchange.hl7.header import Delimiters, read_header
from exchange.mapping.message import Message, Segment, escape, unescape
from exchange.mapping.values import DEGREE_OF_PRECISION, DIGITS
from exchange.outcome import Value
from exchange.routing.rules import MERGES, Destination, Event

__all__ = ["CHARSET_NAMES", "MRN_TYPE", "PERSON_TYPE", "UTF8_CHARSET", "Copy", "renamed_copy", "rewrite"]

MRN_TYPE = "MR"  # CX.5 of the destination's MRN
PERSON_TYPE = "PI"  # CX.5 of the enterprise person id (table 0203: patient internal identifier)

# MSH-18 of a copy, by the (canonical) Python codec it is encoded with: the
# table 0211 code. 8859/1..9 and ASCII are in every version we route to (2.3
# on); UNICODE UTF-8, 8859/15 and the CJK codes came with 2.5. Before 2.5 no
# code names UTF-8: 2.3-2.4 have only UNICODE (ISO/IEC 10646, no encoding
# form: HAPI reads it as UTF-8, exchange.hl7.charset as UTF-16) and an empty
# MSH-18 means ASCII to the standard, so those copies say UNICODE UTF-8 too
# (the README's Configuration section). A charset table 0211 has no code for
# (windows-1252, ...) leaves MSH-18 empty: the site's default, as configured;
# so does a copy in 2.1 or 2.2, which have no MSH-18 (unless it needs UTF-8).
CHARSET_NAMES = {
    "ascii": "ASCII",
    **{f"iso8859-{n}": f"8859/{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    "utf-8": UTF8_CHARSET,
    "gb18030": "GB 18030-2000",
    "euc_kr": "KS X 1001",
    "big5": "BIG-5",
    "iso2022_jp": "ISO IR87",
}

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")

# Fields naming the sender's own patient identifiers, dropped unless kept.
_SOURCE_IDENTIFIERS = {"PID": (2, 4, 18), "MRG": (2, 3, 4)}
# MSH fields about the sender's link, cleared in every copy.
_MSH_CLEARED = (13, 14, 15, 16, 22, 23, 24, 25)


@dataclass(frozen=True, slots=True)
class Copy(Value):
    """A routed copy, ready to be stored in the outbox."""

    facility: str  # the destination's code
    control_id: str  # its MSH-10
    text: str  # the message, segments ending in CR
    codec: str  # Python codec to encode ``text`` with

    def encode(self) -> bytes:
        return self.text.encode(self.codec)


def rewrite(
    message: Message,
    *,
    event: Event,
    destination: Destination,
    facility: FacilityConfig,
    server: ServerConfig,
    control_id: str,
    now: datetime,
) -> Copy:
    """Build ``destination``'s copy of ``message`` (see the module docstring).

    ``facility`` is the destination's configuration, ``server`` the
    exchange's; ``event`` and ``destination`` come from :func:`route`.
    Raises ValueError for input routing never produces (no MSH first, a
    merge without ``destination.prior_mrn``): a bug in the caller.
    """
    d = message.delimiters
    segments = message.all()
    if not segments or segments[0].name != "MSH":
        raise ValueError("the message does not start with MSH")
    merge = event.message_type.upper() == "ADT" and event.event.upper() in MERGES
    if merge and destination.prior_mrn is None:
        raise ValueError("a merge copy needs the destination's MRN of the retired record")

    segments = _one_patient(segments, event.source_mrn, d)
    # a line that is no segment (a sender's stray text between messages) is not HL7 to pass on
    segments = [s for s in segments if _SEGMENT_ID.fullmatch(s.name)]
    if not facility.keep_z_segments:
        segments = [s for s in segments if not s.name.startswith("Z")]

    lines: list[list[str]] = []
    for seg in segments:
        fields = list(seg.fields)
        if seg.name == "MSH":
            _rewrite_msh(fields, facility, server, control_id, now, d)
        elif seg.name == "PID":
            _rewrite_pid(fields, event, destination, facility, server, d, message.codec)
        elif seg.name == "MRG":
            _rewrite_mrg(fields, destination.prior_mrn or destination.mrn, facility, server, d, message.codec)
        lines.append(fields)

    msh = lines[0]
    if facility.version is not None and facility.version != _component(msh[12], d):
        lines = _to_version(lines, facility.version, event, d)

    return _encoded(lines, facility, control_id, d)


# --- segments -------------------------------------------------------------------


def _one_patient(segments: list[Segment], source_mrn: str | None, d: Delimiters) -> list[Segment]:
    """The segments before the first PID plus one PID group (see the docstring)."""
    starts = [i for i, s in enumerate(segments) if s.name == "PID"]
    if len(starts) <= 1:
        return segments
    bounds = list(zip(starts, starts[1:] + [len(segments)]))
    chosen = bounds[0]
    if source_mrn is not None:
        for start, end in bounds:
            pid = segments[start]
            if any(
                pid.text(rep.split(d.component)[0]).strip() == source_mrn
                for rep in pid.repetitions(3)
            ):
                chosen = (start, end)
                break
    return segments[: starts[0]] + segments[chosen[0] : chosen[1]]


def _set(fields: list[str], n: int, value: str) -> None:
    if n >= len(fields):
        if not value:
            return
        fields.extend([""] * (n + 1 - len(fields)))
    fields[n] = value


def _component(field: str, d: Delimiters) -> str:
    return field.split(d.repetition, 1)[0].split(d.component, 1)[0].strip()


def _join(fields: list[str], d: Delimiters) -> str:
    if fields[0] == "MSH":
        return "MSH" + d.field + d.field.join(fields[2:])
    return d.field.join(fields)


def _text(lines: list[list[str]], d: Delimiters) -> str:
    """The message: segments ending in CR."""
    text = "\r".join(_join(fields, d) for fields in lines) + "\r"
    if d.truncation and len(lines[0][2]) == 4:  # the truncation character left MSH-2
        text = text.replace(f"{d.escape}P{d.escape}", d.truncation)
    return text


def _cx(value: str, authority: str, type_code: str, d: Delimiters) -> str:
    """A CX repetition: ID^^^AUTHORITY^TYPE, the ID escaped."""
    c = d.component
    return f"{escape(value, d)}{c}{c}{c}{escape(authority, d)}{c}{type_code}"


def renamed_copy(payload: bytes, old: str, new: str, authority: str) -> bytes | None:
    """A queued copy whose PID-3 names the destination's record ``old`` (``old^^^AUTHORITY^MR``,
    as :func:`rewrite` wrote it), naming ``new`` instead: the destination renamed its record
    (A47) while the copy waited. None when the copy names no such record (or cannot be read)."""
    try:
        header = read_header(payload)
        text, codec = decode_message(payload, header)
    except Exception:  # noqa: BLE001 - a copy this module did not write: leave it as it is
        return None
    d = header.delimiters
    before, after = _cx(old, authority, MRN_TYPE, d), _cx(new, authority, MRN_TYPE, d)
    segments = text.split("\r")
    found = False
    for i, segment in enumerate(segments):
        if segment.startswith("PID" + d.field):
            fields = segment.split(d.field)
            if len(fields) > 3:
                reps = fields[3].split(d.repetition)
                if before in reps:
                    fields[3] = d.repetition.join(after if rep == before else rep for rep in reps)
                    segments[i] = d.field.join(fields)
                    found = True
    return "\r".join(segments).encode(codec) if found else None


def _issued_by(rep: str, authorities: tuple[str, ...], d: Delimiters, codec: str) -> bool:
    """True when CX.4 of a raw repetition names one of ``authorities`` (case-folded), by
    its namespace id (CX.4.1) or universal id (CX.4.2), unescaped: the mapping's
    ``Identifier.issued_by``, but blind to case, so that ``clinic`` is CLINIC's too."""
    parts = rep.split(d.component, 4)
    if len(parts) < 4:
        return False
    for name in parts[3].split(d.subcomponent, 2)[:2]:
        if d.escape in name:
            name = unescape(name, d, codec)
        if name.strip().casefold() in authorities:
            return True
    return False


def _others(value: str, authorities: tuple[str, ...], d: Delimiters, codec: str) -> str:
    """A CX field without the repetitions issued by one of ``authorities``."""
    reps = value.split(d.repetition) if value else []
    return d.repetition.join(rep for rep in reps if rep and not _issued_by(rep, authorities, d, codec))


def _rewrite_msh(
    fields: list[str],
    facility: FacilityConfig,
    server: ServerConfig,
    control_id: str,
    now: datetime,
    d: Delimiters,
) -> None:
    if len(fields) < 13:  # MSH-1..12 all present
        fields.extend([""] * (13 - len(fields)))
    fields[3] = escape(server.application, d)
    fields[4] = escape(server.facility_name, d)
    fields[5] = escape(facility.application or "", d)
    fields[6] = escape(facility.code, d)
    fields[7] = format_timestamp(now)
    fields[10] = escape(control_id, d)
    for n in _MSH_CLEARED:
        _set(fields, n, "")
    _trim(fields)


def _rewrite_pid(
    fields: list[str],
    event: Event,
    destination: Destination,
    facility: FacilityConfig,
    server: ServerConfig,
    d: Delimiters,
    codec: str,
) -> None:
    own = _own_authorities(facility, server)
    ours: list[str] = []
    if destination.mrn is not None:
        ours.append(_cx(destination.mrn, facility.authority, MRN_TYPE, d))
    if event.person is not None:
        ours.append(_cx(event.person, server.person_authority, PERSON_TYPE, d))
    source = fields[3] if len(fields) > 3 else ""
    theirs = _others(source, own, d, codec)
    if not ours:  # PID-3 is required: the sender's identifiers are all there is
        ours, theirs = [theirs or source], ""
    if facility.keep_source_identifiers and theirs:
        ours.append(theirs)
    _set(fields, 3, d.repetition.join(ours))
    for n in _SOURCE_IDENTIFIERS["PID"]:
        if n < len(fields):
            fields[n] = _others(fields[n], own, d, codec) if facility.keep_source_identifiers else ""
    _trim(fields)


def _own_authorities(facility: FacilityConfig, server: ServerConfig) -> tuple[str, ...]:
    """The authorities whose identifiers in a copy only the exchange writes: the
    destination's (its MRN) and the enterprise person id's."""
    return tuple(a.casefold() for a in (facility.authority, server.person_authority) if a)


def _rewrite_mrg(
    fields: list[str], mrn: str | None, facility: FacilityConfig, server: ServerConfig, d: Delimiters, codec: str
) -> None:
    if mrn is None:
        return
    own = _own_authorities(facility, server)
    ours = [_cx(mrn, facility.authority, MRN_TYPE, d)]
    theirs = _others(fields[1], own, d, codec) if len(fields) > 1 else ""
    if facility.keep_source_identifiers and theirs:
        ours.append(theirs)
    _set(fields, 1, d.repetition.join(ours))
    for n in _SOURCE_IDENTIFIERS["MRG"]:
        if n < len(fields):
            fields[n] = _others(fields[n], own, d, codec) if facility.keep_source_identifiers else ""
    _trim(fields)


def _trim(fields: list[str]) -> None:
    """Drop trailing empty fields (never below MSH-12 / the segment name)."""
    keep = 13 if fields[0] == "MSH" else 1
    while len(fields) > keep and fields[-1] == "":
        fields.pop()


# --- charset --------------------------------------------------------------------


def _encoded(lines: list[list[str]], facility: FacilityConfig, control_id: str, d: Delimiters) -> Copy:
    """The copy in the destination's charset with MSH-18 naming it, whatever the
    sender declared; in UTF-8 (MSH-18 ``UNICODE UTF-8``) when that charset
    cannot carry the text. Only the bytes and MSH-18 change: the text (escape
    sequences included) is the same."""
    msh = lines[0]
    codec = canonical_codec(facility.charset)
    named = version_tuple(_component(msh[12], d)) >= (2, 3)  # 2.1 and 2.2 have no MSH-18
    _set(msh, 18, CHARSET_NAMES.get(codec, "") if named else "")
    _trim(msh)
    text = _text(lines, d)
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        codec = "utf-8"
        _set(msh, 18, UTF8_CHARSET)
        text = _text(lines, d)
    return Copy(facility.code, control_id, text, codec)


# --- versions -------------------------------------------------------------------

# Message structures by event where MSH-9.3 is absent or unknown to the version
# (HL7-NOTES "Shared ADT structures"; MDM_T01 without content, MDM_T02 with).
_STRUCTURES = {
    **{("ADT", e): "ADT_A01" for e in ("A01", "A04", "A08", "A13")},
    **{("ADT", e): "ADT_A05" for e in ("A05", "A14", "A28", "A31")},
    **{("ADT", e): "ADT_A06" for e in ("A06", "A07")},
    **{("ADT", e): "ADT_A09" for e in ("A09", "A10", "A11")},
    **{("ADT", e): "ADT_A39" for e in ("A40", "A41", "A42")},
    **{("ADT", e): "ADT_A30" for e in ("A34", "A35", "A36", "A46", "A47", "A48", "A49")},
    ("ADT", "A53"): "ADT_A52", ("ADT", "A55"): "ADT_A54", ("ADT", "A62"): "ADT_A61",
    **{("MDM", e): "MDM_T01" for e in ("T01", "T03", "T05", "T07", "T09", "T11")},
    **{("MDM", e): "MDM_T02" for e in ("T02", "T04", "T06", "T08", "T10")},
}
_FALLBACK = {"ADT_A05": "ADT_A01"}  # before 2.4 the A05 events use ADT_A01


@lru_cache(maxsize=16)
def _library(version: str) -> Any:
    import hl7apy  # structure knowledge, only for destinations that ask for a version

    return hl7apy.load_library(version)


@lru_cache(maxsize=256)
def _structure_map(version: str, structure: str) -> tuple[frozenset[str], tuple[tuple[str, frozenset[str]], ...]]:
    """The segments at the structure's top level, and each group (nested ones too) as (the
    segment that opens it, every segment it holds)."""
    groups: list[tuple[str, frozenset[str]]] = []

    def walk(children: Any) -> set[str]:
        names: set[str] = set()
        for name, ref, _cardinality, kind in children:
            if kind != "GRP":
                names.add(name)
                continue
            first = ref[1][0]
            while first[3] == "GRP":  # a group opened by a group
                first = first[1][1][0]
            members = walk(ref[1])
            groups.append((first[0], frozenset(members)))
            names |= members
        return names

    children = _library(version).MESSAGES[structure][1]
    top = frozenset(name for name, _ref, _cardinality, kind in children if kind != "GRP")
    walk(children)
    return top, tuple(groups)


def _placed(names: list[str], version: str, structure: str) -> list[bool]:
    """For each segment of the message, whether the structure has a place for it: one of its
    top-level segments or a group's opening segment anywhere (an engine's order is kept), any
    other segment of a group only inside it: after the group's opening segment, with nothing
    between but the group's own segments (a ROL of 2.3's ADT_A01 after a PR1, not after PD1)."""
    top, groups = _structure_map(version, structure)
    placed = []
    for i, name in enumerate(names):
        if name in top:
            placed.append(True)
            continue
        mine = [(opener, members) for opener, members in groups if name in members]
        ok = any(name == opener for opener, _ in mine)  # it opens a group of its own here
        for before in reversed(names[:i] if not ok else ()):
            if any(before == opener for opener, _ in mine):
                ok = True
                break
            if before.startswith("Z") or any(before in members for _, members in mine):
                continue
            break
        placed.append(ok)
    return placed


def _structure(version: str, message_type: str, event: str, sent: str) -> str | None:
    known = _library(version).MESSAGES
    guess = _STRUCTURES.get((message_type, event))
    for candidate in (sent, f"{message_type}_{event}", guess, _FALLBACK.get(guess or "")):
        if candidate and candidate in known:
            return candidate
    return None


def _to_version(lines: list[list[str]], version: str, event: Event, d: Delimiters) -> list[list[str]]:
    lib = _library(version)
    msh = lines[0]
    msh[12] = version
    message_type, trigger = event.message_type.upper(), event.event.upper()
    msh9 = msh[9].split(d.component)
    structure = _structure(version, message_type, trigger, msh9[2].strip() if len(msh9) > 2 else "")
    if version_tuple(version) >= (2, 3, 1) and structure is not None:
        msh9 = (msh9 + ["", ""])[:2] + [structure]
        msh[9] = d.component.join(msh9)
    if d.truncation and version_tuple(version) < (2, 7):
        msh[2] = msh[2][:4]
    names = [fields[0].strip() for fields in lines]
    placed = _placed(names, version, structure) if structure else [True] * len(names)
    out = []
    for fields, name, fits in zip(lines, names, placed):
        if name.startswith("Z"):
            out.append(fields)  # kept only by keep_z_segments; the version knows nothing of them
        elif fits and name in lib.SEGMENTS:
            fields = _cut_segment(fields, name, version, d)
            if name == "EVN" and (len(fields) < 2 or not fields[1]) and 1 in _segment_fields(version, "EVN")[1]:
                _set(fields, 1, trigger)  # EVN-1 withdrawn in 2.7, required before
            out.append(fields)
    return out


@lru_cache(maxsize=1024)
def _segment_fields(version: str, name: str) -> tuple[int, dict[int, Any]]:
    """(last field number, {field number: hl7apy reference}) of a segment in a version;
    withdrawn fields (absent, type WD or at most 0 repetitions) are left out."""
    fields: dict[int, Any] = {}
    last = 0
    for field_name, ref, cardinality, _kind in _library(version).SEGMENTS[name][1]:
        n = int(field_name.rsplit("_", 1)[1])
        last = max(last, n)
        if ref[2] != "WD" and cardinality[1] != 0:
            fields[n] = ref
    return last, fields


def _cut_segment(fields: list[str], name: str, version: str, d: Delimiters) -> list[str]:
    """Fields, components and subcomponents the version does not define dropped."""
    last, refs = _segment_fields(version, name)
    fields = fields[: last + 1]
    first = 3 if name == "MSH" else 1  # MSH-1/MSH-2 are the delimiters
    for n in range(first, len(fields)):
        value = fields[n]
        if not value:
            continue
        ref = refs.get(n)
        if ref is None:  # withdrawn in this version
            fields[n] = ""
            continue
        fields[n] = d.repetition.join(_cut_value(rep, ref, d) for rep in value.split(d.repetition))
    _trim(fields)
    return fields


_DTM_DIGITS = re.compile(r"\d+")


def _dtm(value: str, separator: str) -> str:
    """A TS (``TS.1`` + ``separator`` + ``TS.2``) as the DTM of 2.6 on, which has no TS.2: TS.1
    cut to the degree of precision the sender gave (``19800101^Y`` is 1980: as ``19800101``
    alone it would read as 1 January); an offset stays after a time, not after a date."""
    ts, _, rest = value.partition(separator)
    degree = DEGREE_OF_PRECISION.get(rest.partition(separator)[0].strip().upper())
    digits = DIGITS[degree] if degree is not None else None  # of TS.1, the sender vouches for
    leading = _DTM_DIGITS.match(ts)
    if digits is None or leading is None or leading.end() <= digits:
        return ts
    offset = ts[leading.end():].lstrip(".0123456789")
    return ts[:digits] + (offset if digits > 8 else "")


# Components withdrawn in 2.7 whose value the standard moved (1-based): XTN.1 telephone number to
# XTN.12 unformatted telephone number, XON.3 id number to XON.10 organization identifier, the
# degree of XCN.7 and XPN.6 to the professional suffix (XCN.21, XPN.14)
_MOVED = {"XTN": {1: 12}, "XON": {3: 10}, "XCN": {7: 21}, "XPN": {6: 14}}


def _cut_value(value: str, ref: Any, d: Delimiters) -> str:
    kind, children = ref[0], ref[1]
    if kind == "leaf":
        if ref[2] == "varies":  # OBX-5 and friends: the type is in the data
            return value
        if ref[2] == "DTM" and d.component in value:  # a TS of an older version
            return _dtm(value, d.component).split(d.subcomponent, 1)[0]
        return value.split(d.component, 1)[0].split(d.subcomponent, 1)[0]
    components = value.split(d.component)[: len(children)]
    moves = _MOVED.get(ref[2], {})
    if moves:  # a withdrawn component's value goes where the version keeps it, if that is empty
        components += [""] * (len(children) - len(components))
        for was, to in moves.items():
            withdrawn = children[was - 1][1][2] == "WD"
            if withdrawn and to <= len(children) and components[was - 1] and not components[to - 1]:
                components[to - 1], components[was - 1] = components[was - 1], ""
    out = []
    for component, child in zip(components, children):
        cref = child[1]
        if cref[2] == "WD":  # a component withdrawn in this version (2.8: XTN.1)
            out.append("")
        elif cref[0] == "leaf" and cref[2] == "DTM" and d.subcomponent in component:
            out.append(_dtm(component, d.subcomponent))
        elif cref[0] == "leaf":
            out.append(component if cref[2] == "varies" else component.split(d.subcomponent, 1)[0])
        else:
            out.append(d.subcomponent.join(component.split(d.subcomponent)[: len(cref[1])]))
    while len(out) > 1 and out[-1] == "":
        out.pop()
    return d.component.join(out)

