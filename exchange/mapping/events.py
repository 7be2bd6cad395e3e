"""ADT and MDM events mapped to record-model operations: a pure function.

Two steps, so the database layer can load what a whole batch needs at once:

1. ``needs(msg, ctx)`` says which (facility, MRN) records and which
   (facility, document number) documents the mapping must see;
2. ``map_message(msg, header, ctx, state)`` reads the message and the state
   it needs (through :class:`StateView`) and answers either :class:`Changes`
   (operations, in order, to apply in the intake transaction) or a
   :class:`MappingError` (an AE: HL7 table 0357 code, field, PHI-free text).

The rules that depend on what is already stored (encounter status
transitions, out-of-order events, document versions and parents) are decided
here, so applying an operation is mechanical; :mod:`exchange.mapping.state`
is the reference for what "apply" means.

Operations (all frozen dataclasses, facility = the sending facility code):

``UpsertPatient(facility, mrn, demographics)``
    Create the record (active) if missing, then apply the demographics patch.
``EncounterEvent(facility, mrn, visit_number, event, status, patch, at)``
    Create the encounter if missing, set ``status`` unless it is None (None
    keeps the stored status), then apply the encounter patch. ``event`` is
    the trigger (A01...) and ``at`` the event time, for the history.
``MergePatients(facility, survivor_mrn, retired_mrn, event, legacy)``
    The retired record becomes inactive with ``merged_into`` = survivor (it
    is created as such a tombstone if unknown); its encounters and documents
    move to the survivor. ``legacy`` marks A34/A35/A36/A18.
``ChangeIdentifier(facility, old_mrn, new_mrn)``
    A47: the record known as ``old_mrn`` is now ``new_mrn`` (encounters and
    documents follow); no merge. A no-op when ``old_mrn`` is unknown.
``MoveVisit(facility, from_mrn, from_visit, to_mrn, to_visit, event)``
    A42/A45/A50/A51: the encounter ``from_visit`` of record ``from_mrn``
    becomes ``to_visit`` of ``to_mrn`` (merged into it, the target's fields
    first, when that visit exists already). A no-op when the source is unknown.
``LinkAssertion(facility, mrn_a, mrn_b, linked)``
    A24 (linked) / A37 (not linked): the source says these two records are
    (not) the same person. Stored for the patient index; records unchanged.
``DocumentEvent(facility, mrn, number, event, action, state, patch)``
    ``action`` CREATE: create version 1, or fill only what the stored
    document lacks (an original that arrived late); UPDATE: patch the
    current version in place (create if missing); NEW_VERSION: append a
    version (the previous one merged with the patch; create if missing).
    ``state`` (if not None) becomes the document's state.
``MarkDocument(facility, number, event, state, availability)``
    Set another document's state (a replaced parent) and availability.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from exchange.hl7.header import Header
from exchange.mapping.message import Message, Segment, is_delete
from exchange.mapping.values import (
    INVISIBLE,
    MAX_DOCUMENT_NUMBER,
    MAX_MRN,
    MAX_VISIT,
    DELETE,
    SEX_CODES,
    Content,
    Demographics,
    DocumentPatch,
    EncounterPatch,
    Identifier,
    Location,
    PersonName,
    Precision,
    Timestamp,
    address,
    at_precision,
    doctor,
    identifier,
    location,
    person_name,
    phone,
    timestamp,
)
from exchange.matching.compare import DISAGREE, compare_given
from exchange.matching.features import features_of
from exchange.outcome import Problem, Value

# --- vocabulary ------------------------------------------------------------------------


class EncounterStatus(StrEnum):
    PREADMITTED = "preadmitted"
    ADMITTED = "admitted"
    REGISTERED = "registered"
    DISCHARGED = "discharged"
    CANCELLED = "cancelled"


class DocumentState(StrEnum):
    CURRENT = "current"
    REPLACED = "replaced"
    CANCELLED = "cancelled"


class DocumentAction(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    NEW_VERSION = "new_version"


DEFAULT_MAX_DOCUMENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FacilityContext(Value):
    """The sending facility as configured: ``code`` (MSH-4.1), ``authority`` (its PID-3.4)
    and ``max_document_bytes``, the largest MDM document content applied (else AE on OBX-5)."""

    code: str
    authority: str = ""
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    # the other configured facilities' authorities (and the enterprise person id's): an identifier
    # issued by one of them is never this facility's MRN
    foreign_authorities: frozenset[str] = frozenset()


# --- what the mapping reads from the stored state ------------------------------------------


@dataclass(frozen=True, slots=True)
class EncounterView(Value):
    visit_number: str
    status: EncounterStatus
    patient_class: str | None = None
    location: Location | None = None
    prior_location: Location | None = None
    admitted_at: Timestamp | None = None
    discharged_at: Timestamp | None = None


@dataclass(frozen=True, slots=True)
class RecordView(Value):
    facility: str
    mrn: str
    active: bool = True
    merged_into: str | None = None
    encounters: Mapping[str, EncounterView] = field(default_factory=dict)
    name: PersonName | None = None  # the stored legal name and birth date (see _another_patient)
    birth: Timestamp | None = None
    last_message: str | None = None  # UpsertPatient.digest of the last message applied to it


@dataclass(frozen=True, slots=True)
class DocumentView(Value):
    facility: str
    number: str
    mrn: str
    state: DocumentState
    version: int
    parent: str | None = None
    content: Content | None = None  # the current version's
    event: str = ""  # the event that made the current version
    stored: DocumentPatch | None = None  # the current version's fields, content included


class StateView(Protocol):
    def record(self, facility: str, mrn: str) -> RecordView | None: ...

    def document(self, facility: str, number: str) -> DocumentView | None: ...


@dataclass(frozen=True, slots=True)
class Needs(Value):
    """What ``map_message`` will read: records, documents, and which of a record's encounters.

    A record's history stays in the database unless the message needs it:
    ``visits`` are the visit numbers (PV1-19) whose encounters it reads;
    ``whole`` (a message with MRG: merges and identifier changes move every
    encounter and document) asks for all of the records' encounters and
    documents.
    """

    records: frozenset[tuple[str, str]] = frozenset()
    documents: frozenset[tuple[str, str]] = frozenset()
    visits: frozenset[str] = frozenset()
    whole: bool = False


# --- operations --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpsertPatient(Value):
    facility: str
    mrn: str
    demographics: Demographics
    # The message's body (Message.body_digest) when it is about this patient alone, kept with the
    # record; ``resent``: the same as the last one applied to it (an engine resending under a new
    # MSH-10): applied again (it changes nothing), not copied again.
    digest: str = ""
    resent: bool = False
    # an event older than the visit's state (a leave of absence after the discharge, an A02 after
    # the A03): not copied, and its demographics, as old, change nothing of the record
    late: bool = False


@dataclass(frozen=True, slots=True)
class EncounterEvent(Value):
    facility: str
    mrn: str
    visit_number: str
    event: str
    status: EncounterStatus | None
    patch: EncounterPatch
    at: Timestamp | None = None
    late: bool = False  # older news than the visit's state (encounter_transition): not copied


@dataclass(frozen=True, slots=True)
class MergePatients(Value):
    facility: str
    survivor_mrn: str
    retired_mrn: str
    event: str = "A40"
    legacy: bool = False


@dataclass(frozen=True, slots=True)
class ChangeIdentifier(Value):
    facility: str
    old_mrn: str
    new_mrn: str


@dataclass(frozen=True, slots=True)
class MoveVisit(Value):
    facility: str
    from_mrn: str
    from_visit: str
    to_mrn: str
    to_visit: str
    event: str


@dataclass(frozen=True, slots=True)
class LinkAssertion(Value):
    facility: str
    mrn_a: str
    mrn_b: str
    linked: bool


@dataclass(frozen=True, slots=True)
class DocumentEvent(Value):
    facility: str
    mrn: str
    number: str
    event: str
    action: DocumentAction
    state: DocumentState | None
    patch: DocumentPatch
    # An original (T01/T02) sent again that adds nothing to what is stored (an engine resending
    # under a new MSH-10 after an ACK timeout), or a notice (T01) arriving after the document:
    # applied, but not copied (nobody gets a second copy to file, or older news).
    resent: bool = False


@dataclass(frozen=True, slots=True)
class MarkDocument(Value):
    facility: str
    number: str
    event: str
    state: DocumentState
    availability: str | None = None


Operation = (
    UpsertPatient | EncounterEvent | MergePatients | ChangeIdentifier | MoveVisit | LinkAssertion | DocumentEvent
    | MarkDocument
)


@dataclass(frozen=True, slots=True)
class Changes(Value):
    """The message can be applied: these operations, in order. ``warnings`` are PHI-free."""

    operations: tuple[Operation, ...]
    warnings: tuple[str, ...] = ()

    @property
    def copied(self) -> bool:
        """Whether routing copies the message: not a resend of what was applied last
        (DocumentEvent.resent, UpsertPatient.resent), not older news than its visit's state
        (EncounterEvent.late: at the sites that had the discharge, it would open the stay again)."""
        return not any(isinstance(op, (DocumentEvent, UpsertPatient)) and op.resent
                       or isinstance(op, (EncounterEvent, UpsertPatient)) and op.late for op in self.operations)


@dataclass(frozen=True, slots=True)
class MappingError(Value):
    """The message cannot be applied (AE); nothing changes."""

    problem: Problem


Mapped = Changes | MappingError


class _Fail(Exception):
    """Internal: carries a MappingError out of the helpers (never escapes this module)."""

    def __init__(self, code: int, location: str, text: str):
        super().__init__(text)
        self.error = MappingError(Problem(code, location, text))


# --- event tables --------------------------------------------------------------------------

# A54/A55 change the attending doctor (PV1-7) and take the change back (PV1-7 then names the doctor
# before it), A61/A62 the same for the consulting doctors (PV1-9): updates of the visit's PV1.
DOCTOR_EVENTS = frozenset({"A54", "A55", "A61", "A62"})
ENCOUNTER_EVENTS = frozenset(
    {"A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A12", "A13", "A38"} | DOCTOR_EVENTS
)
PERSON_EVENTS = frozenset({"A28", "A31"})
# Events that carry a PID whose demographics are kept but whose other meaning is not modelled:
# tracking and pending events, bed status, leaves of absence (A21/A22 and their cancels A52/A53:
# the record model has no leave status), A48 (PID-4, the alternate patient id, is not kept),
# A60 (adverse reactions, IAM, are not kept; the copies carry them as sent).
DEMOGRAPHICS_ONLY_EVENTS = frozenset(
    {"A09", "A10", "A14", "A15", "A16", "A20", "A21", "A22", "A25", "A26", "A27", "A32", "A33", "A48", "A52", "A53",
     "A60"}
)
_ONLY_DEMOGRAPHICS_BECAUSE = {
    "A48": "A48: PID-4 (alternate patient ID) is not kept in the record model: only the demographics are applied",
    "A60": "A60: adverse reactions (IAM) are not kept in the record model: only the demographics are applied",
}
# Of those, the events of a visit (tracking, pending events, leaves of absence and their cancels):
# for a visit discharged or cancelled already they are older news, not copied.
VISIT_BOUND_EVENTS = frozenset({"A09", "A10", "A14", "A15", "A16", "A21", "A22", "A25", "A26", "A27", "A32", "A33",
                                "A52", "A53"})
MERGE_EVENTS = frozenset({"A40"})
# A39 (person-level merge) and A30 (merge person information, before v2.3.1): MRG-1, else MRG-4
LEGACY_MERGE_EVENTS = frozenset({"A18", "A30", "A34", "A35", "A36", "A39"})
# account merge / move / change: PID-18 (MRG-3 the prior account); A49 changes the number, as A41 merges it
ACCOUNT_EVENTS = frozenset({"A41", "A44", "A49"})
VISIT_MOVE_EVENTS = frozenset({"A42", "A45", "A50", "A51"})  # visit merge / move / renumber (MRG-5, MRG-6)
# A46 (change patient ID: PID-2, the sender's patient-level id, was MRG-4; "change external ID"
# in v2.3, kept for backward compatibility since v2.3.1) is read as A47 where MRG-1 names the
# prior MRN, as the person-level A39 is read as A40; with MRG-1 empty it names no MRN: the PID-2
# change is not modelled (the record model keys on PID-3), only the demographics are applied.
IDENTIFIER_CHANGE_EVENTS = frozenset({"A46", "A47"})
# Accepted and applied as nothing, with the reason as the message's note.
NO_OP_EVENTS = {
    "A23": "A23: the sender deleted the visit from its own database (a purge; a visit entered in error is"
           " cancelled with A11): the exchange keeps its record of the visit, nothing changed",
}
# Understood and refused (AE 201), with the reason.
REFUSED_EVENTS = {
    "A19": "A19 is a patient query (QRY^A19), not an update: the exchange answers no queries",
    "A29": "A29 (delete person information) is not applied: no message deletes a record at the exchange"
           " (its person links and the copies sent of it stay); a records technician takes a record made in"
           " error out of its person, and a duplicate is merged with A40",
    **{f"A{n}": f"A{n} is no HL7 event: table 0003 has no A56-A59 (sections 3.3.56-3.3.59 of the standard"
                f" are the person queries QBP^Q21-Q24, which the exchange does not answer)" for n in range(56, 60)},
}
MDM_EVENTS = frozenset({f"T{n:02d}" for n in range(1, 12)})
MDM_WITH_CONTENT = frozenset({"T02", "T04", "T06", "T08", "T10"})

_MAX_MERGE_HOPS = 8


def _replace(obj, **changes):
    """``dataclasses.replace`` for the frozen value classes here (all fields positional, init=True):
    without its per-call field introspection."""
    get = changes.get
    return type(obj)(*[get(name, getattr(obj, name)) for name in obj.__match_args__])


# --- step 1: needs ----------------------------------------------------------------------------


def needs(msg: Message, ctx: FacilityContext) -> Needs:
    """The records and documents ``map_message`` will ask the state for. Never raises.

    Retired records point at their survivors: the loader should also load
    ``merged_into`` targets of the records it finds.
    """
    try:
        records: set[tuple[str, str]] = set()
        documents: set[tuple[str, str]] = set()
        for pid in msg.segments("PID"):
            mrn = _choose_mrn(_identifiers(pid, 3), ctx.authority)
            if mrn is not None:
                records.add((ctx.code, mrn.value))
        for mrg in msg.segments("MRG"):
            mrn = _choose_mrn(_identifiers(mrg, 1), ctx.authority)
            if mrn is not None:
                records.add((ctx.code, mrn.value))
        txa = msg.first("TXA")
        if txa is not None:
            for n in (12, 13):
                number = txa.value(n)
                if number:
                    documents.add((ctx.code, number))
        visits = frozenset(visit_number(pv1) for pv1 in msg.segments("PV1"))  # A17 has two
        return Needs(frozenset(records), frozenset(documents), visits, msg.first("MRG") is not None)
    except Exception:  # pragma: no cover - needs() is a hint; map_message reports problems
        return Needs()


# --- step 2: map -------------------------------------------------------------------------------


def map_message(msg: Message, header: Header, ctx: FacilityContext, state: StateView) -> Mapped:
    """Map one ADT or MDM message to operations, or say why it cannot be applied."""
    kind = header.message_type
    event = header.event.upper()
    warnings: list[str] = []
    msh = msg.segments("MSH")
    if len(msh) > 1:  # two messages run together: applying the first would drop the rest unseen
        return MappingError(Problem(100, "MSH", f"the frame holds {len(msh)} messages (MSH segments) without a"
                                                " BHS batch header: send one message per frame, or a batch"))
    try:
        if kind == "ADT":
            ops = _map_adt(msg, ctx, state, event, warnings)
        elif kind == "MDM":
            ops = _map_mdm(msg, ctx, state, event, warnings)
        else:
            return MappingError(Problem(200, "MSH-9.1", f"message type {kind[:10]!r} is not mapped"))
    except _Fail as fail:
        return fail.error
    if protection_unreadable(msg):
        warnings.append(PD1_12_READ_AS_Y)
    return Changes(tuple(ops), tuple(warnings))


# --- PID -------------------------------------------------------------------------------------------


def _text(seg: Segment):
    """The unescaper for pieces of ``seg``: ``str`` (the identity) when it has no escapes."""
    return str if seg.plain else seg.text


def _identifiers(seg: Segment, n: int) -> list[Identifier]:
    """The identifiers in field ``n`` (memoised on the segment: the caller must not mutate the list)."""
    key = ("ids", n)
    memo = seg.memo
    out = memo.get(key)
    if out is not None:
        return out
    sub = seg.delimiters.subcomponent
    comp = seg.delimiters.component
    text = _text(seg)
    out = []
    for rep in seg.repetitions(n):
        ident = identifier(rep.split(comp), sub, text)
        if ident is not None:
            out.append(ident)
    memo[key] = out
    return out


def _choose_mrn(identifiers: list[Identifier], authority: str) -> Identifier | None:
    """The facility's MRN: CX.4 = the configured authority, else typed MR, else the first."""
    if not identifiers:
        return None
    if authority:
        for ident in identifiers:
            if ident.issued_by(authority):
                return ident
    for ident in identifiers:
        if ident.type_code.upper() == "MR":
            return ident
    return identifiers[0]


# C0 and C1 controls, DEL, the Unicode line and paragraph separators (each a line break to
# str.splitlines, a CSV reader or a terminal), and the characters that show as nothing
# (values.INVISIBLE): "ID\u200b1" looks exactly like "ID1" and would be another patient's record
_CONTROL = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{INVISIBLE}]")


def _usable_key(value: str, location: str, what: str, limit: int) -> None:
    """An escape such as \\X0A\\ (or \\X00\\) put a control character in an identifier: none has
    one, it would not come back as sent from any copy, export or URL, and PostgreSQL keeps no NUL.
    Nor is one longer than ``limit``: kept cut, two identifiers would become one."""
    if _CONTROL.search(value):
        raise _Fail(102, location, f"{location} {what} contains a control character")
    if len(value) > limit:
        raise _Fail(102, location, f"{location} {what} is longer than {limit} characters")
    if value in (".", ".."):  # a record's address ends in its MRN: browsers and clients resolve these away
        raise _Fail(102, location, f"{location} {what} cannot be '.' or '..'")


def _patient_id(seg: Segment, ctx: FacilityContext, location: str | None = None,
                ids: list[Identifier] | None = None) -> Identifier:
    n = 3 if seg.name == "PID" else 1
    location = location or seg.where(n)  # "PID-3", or "PID(2)-3" for an A17's second patient
    if ids is None:
        ids = _identifiers(seg, n)
    mrn = _choose_mrn(ids, ctx.authority)
    if mrn is None:
        raise _Fail(101, location, f"{location} has no usable patient identifier")
    _usable_key(mrn.value, location, "identifier", MAX_MRN)
    if ctx.foreign_authorities and not mrn.issued_by(ctx.authority) and (
            mrn.authority in ctx.foreign_authorities or mrn.authority_id in ctx.foreign_authorities):
        # another site's MRN (or the exchange's person id) filed as this facility's would make a
        # record of the wrong namespace: a different patient may hold that number here
        raise _Fail(102, location, f"{location} names an identifier issued by another facility's authority,"
                                   f" not {ctx.authority or ctx.code}'s")
    return mrn


def _repeating(seg: Segment, n: int, reader) -> tuple | None | object:
    """A repeating field read with ``reader``: None (empty), DELETE ("") or a tuple."""
    raw = seg.field(n)
    if not raw:
        return None
    if is_delete(raw):
        return DELETE
    comp = seg.delimiters.component
    sub = seg.delimiters.subcomponent
    text = _text(seg)
    out = []
    for rep in raw.split(seg.delimiters.repetition):
        if not rep or (rep == '""' or '""' in rep and is_delete(rep)):
            continue
        comps = rep.split(comp)
        if '""' in rep:  # a null component is no value, never the text ""
            comps = ["" if c == '""' else c for c in comps]
        value = reader(comps, sub, text)
        if value is not None:
            out.append(value)
    return tuple(out)


def _scalar(seg: Segment, n: int, c: int = 1) -> str | None | object:
    raw = seg.field(n)
    if not raw:
        return None
    if is_delete(raw):
        return DELETE
    value = seg.value(n, c)
    return value or None


def _ts(seg: Segment, n: int, warnings: list[str]) -> Timestamp | None | object:
    raw = seg.field(n)
    if not raw:
        return None
    if is_delete(raw):
        return DELETE
    text = seg.value(n, 1)
    if not text:
        return None
    ts = timestamp(text)
    if ts is None:
        warnings.append(f"{seg.where(n)}: unparseable timestamp ignored")
    elif seg.delimiters.component in raw:  # TS.2: "19800101^Y" is the year 1980
        ts = at_precision(ts, seg.value(n, 2))
    return ts


_DATA_WARNING = re.compile(
    r"([A-Z][A-Z0-9]{2}(?:\(\d+\))?-\d+): (unparseable timestamp ignored|.+ is not .+, (?:ignored|read as .+))")


def _protection(message: Message) -> tuple[bool | None, bool]:
    """PD1-12 as (what it says, whether it says it plainly): Y or N (first components, each
    repetition the same, no subcomponents: ``Y^Yes^HL70136`` is Y), the HL7 null ``""`` (N),
    absent (None); anything else is Y, not plainly."""
    pd1 = message.first("PD1")
    raw = pd1.field(12) if pd1 is not None else ""
    if not raw:
        return None, True
    if is_delete(raw):
        return False, True
    firsts = [rep.split(pd1.delimiters.component, 1)[0] for rep in pd1.repetitions(12)]
    said = {pd1.text(first).strip().upper() for first in firsts if first}
    if len(said) == 1 and said <= {"Y", "N"} and not any(pd1.delimiters.subcomponent in f for f in firsts):
        return said == {"Y"}, True
    return True, False


def protection(message: Message) -> bool | None:
    """PD1-12 (protection indicator, table 0136) of a message: True for Y, False for N or the
    HL7 null ``""``, None when PD1 or the field is absent (no change). Anything else (another
    code, Y and N repeated, a subcomponent) is read as Y (``protection_unreadable`` says so): an
    opt-out the sender meant must not fail open."""
    return _protection(message)[0]


def protection_unreadable(message: Message) -> bool:
    """PD1-12 holds something other than Y, N or the HL7 null (read as Y: ``protection``)."""
    return not _protection(message)[1]


PD1_12_READ_AS_Y = "PD1-12: the protection indicator is not Y or N, read as Y (no copies go)"


def data_problems(warnings: list[str] | tuple[str, ...]) -> tuple[Problem, ...]:
    """The warnings about a field whose value could not be read (the message applied without
    it: an unparseable birth date, say), as problems (102, data type error) for the ACK's ERR
    segments of severity W: the sender learns of them, not only the exchange's operators."""
    return tuple(Problem(102, m[1], w) for w in warnings if (m := _DATA_WARNING.fullmatch(w)))


def demographics(pid: Segment, warnings: list[str], ids: list[Identifier] | None = None) -> Demographics:
    """The PID as a demographics patch (empty = no change, "" = delete).

    ``ids`` are PID-3's identifiers when the caller has read them already.
    """
    ids = tuple(_identifiers(pid, 3) if ids is None else ids)
    removed = []
    for rep in (pid.repetitions(3) if '""' in pid.field(3) else ()):
        comps = rep.split(pid.delimiters.component)
        if comps and is_delete(comps[0]) and len(comps) > 3:
            hd = comps[3].split(pid.delimiters.subcomponent)
            auth = pid.text(hd[0]).strip() or (pid.text(hd[1]).strip() if len(hd) > 1 else "")
            if auth:
                removed.append(auth)

    names = _repeating(pid, 5, person_name)
    name = aliases = None
    if names is DELETE:
        name = aliases = DELETE
    elif names:
        names = [nm for nm in names if not nm.is_empty]
        if len(names) == 1:  # the common case: one name, legal or not
            name = names[0]
            aliases = ()
        elif names:
            legal = next((i for i, nm in enumerate(names) if nm.use.upper() == "L"), 0)
            name = names[legal]
            aliases = tuple(nm for i, nm in enumerate(names) if i != legal)

    mother = _repeating(pid, 6, person_name)
    if isinstance(mother, tuple):
        mother = next((nm for nm in mother if not nm.is_empty), None)

    sex = _scalar(pid, 8)
    if isinstance(sex, str):
        sex = sex.upper() if sex.upper() in SEX_CODES else sex
        if sex not in SEX_CODES:
            warnings.append("PID-8: sex code not in table 0001, kept as sent")

    business = _repeating(pid, 14, phone)
    if isinstance(business, tuple):
        business = tuple(_replace(p, business=True) for p in business)

    deceased = _scalar(pid, 30)
    if isinstance(deceased, str):
        d = deceased.upper()
        deceased = True if d == "Y" else False if d == "N" else None
        if deceased is None:
            warnings.append(f"{pid.where(30)}: death indicator is not Y or N, ignored")

    return Demographics(
        identifiers=ids or None,
        removed_authorities=tuple(removed),
        name=name,
        aliases=aliases,
        mother_maiden_name=mother,
        birth=_ts(pid, 7, warnings),
        sex=sex,
        addresses=_repeating(pid, 11, address),
        phones=_repeating(pid, 13, phone),
        business_phones=business,
        account=_scalar(pid, 18),
        ssn=_ssn(pid, ids),
        death=_ts(pid, 29, warnings),
        deceased=deceased,
    )


def _ssn(pid: Segment, ids: tuple[Identifier, ...]) -> str | None | object:
    """PID-19, else a PID-3 repetition typed SS (CX.5): from v2.7 PID-19 is withdrawn and the
    SSN travels in PID-3 only, where matching and the family rules must still see it."""
    ssn = _scalar(pid, 19)
    if ssn is None:
        ssn = next((i.value for i in ids if i.type_code.upper() == "SS" and i.value), None)
    return ssn


# --- PV1 ----------------------------------------------------------------------------------------------


def _visit(pv1: Segment) -> str:
    visit = visit_number(pv1)
    _usable_key(visit, pv1.where(19 if pv1.value(19) or not visit else 50), "visit number", MAX_VISIT)
    return visit


def visit_number(pv1: Segment) -> str:
    """The visit a PV1 keys: PV1-19 (visit number), else PV1-50 (alternate visit id); "" for none."""
    return pv1.value(19) or pv1.value(50)


def encounter_patch(pv1: Segment, warnings: list[str]) -> EncounterPatch:
    def loc(n: int):
        raw = pv1.field(n)
        if not raw:
            return None
        if is_delete(raw):
            return DELETE
        return location(pv1.components(n), pv1.delimiters.subcomponent, _text(pv1))

    attending = None
    raw7 = pv1.field(7)
    if raw7:
        attending = DELETE if is_delete(raw7) else doctor(
            pv1.components(7), pv1.delimiters.subcomponent, _text(pv1)
        )
    patient_class = _scalar(pv1, 2)
    if isinstance(patient_class, str):
        patient_class = patient_class.upper()
    return EncounterPatch(
        patient_class=patient_class,
        location=loc(3),
        prior_location=loc(6),
        attending=attending,
        consulting=_repeating(pv1, 9, doctor),
        admitted_at=_ts(pv1, 44, warnings),
        discharged_at=_ts(pv1, 45, warnings),
    )


def _event_time(msg: Message, warnings: list[str]) -> Timestamp | None:
    """EVN-6 (event occurred), else EVN-2 (recorded), else MSH-7; a time read on the way that
    cannot be read is a warning (the sender learns why its admit time is another)."""
    evn = msg.first("EVN")
    for seg, n in ((evn, 6), (evn, 2), (msg.first("MSH"), 7)):
        ts = _ts(seg, n, warnings) if seg is not None else None
        if isinstance(ts, Timestamp):
            return ts
    return None


def _survivor(state: StateView, facility: str, mrn: str) -> str:
    """The record ``mrn`` lives on as (itself, or the survivor it was merged into)."""
    return _survivor_record(state, facility, mrn, [])[0]


def _subject(pid: Segment, ctx: FacilityContext, state: StateView, warnings: list[str]
             ) -> tuple[str, RecordView | None, Demographics]:
    """The record PID-3 names (its survivor, if merged away), that record, and the PID's
    demographics to apply to it.

    Applied to a survivor, PID-3's MRN is the retired one: it must not replace
    the survivor's own MRN of the same authority and type (the survivor keeps
    the retired MRN among its merged identifiers already). A retired MRN that
    arrives with another patient's birth date or name was reused for a new
    patient: applying it would overwrite the survivor's demographics (AE 205).
    """
    ids = _identifiers(pid, 3)
    named = _patient_id(pid, ctx, ids=ids)
    mrn, rec = _survivor_record(state, ctx.code, named.value, warnings)
    if mrn == named.value:
        return mrn, rec, demographics(pid, warnings, ids)
    demo = demographics(pid, warnings, [i for i in ids if i != named])
    if rec is not None and _another_patient(rec, demo):
        raise _Fail(205, "PID-3", "PID-3 names a record merged into another whose patient has another"
                                  " birth date or name: a retired identifier cannot name a new patient")
    return mrn, rec, demo


def _day(ts: Timestamp) -> tuple[int, int, int] | None:
    if ts.precision in (Precision.YEAR, Precision.MONTH):
        return None
    return ts.value.year, ts.value.month, ts.value.day


def _another_patient(rec: RecordView, demo: Demographics) -> bool:
    """Whether ``demo`` cannot be the patient of ``rec``: another birth day, another family and
    given name, or another given name (not the same, a nickname, an initial or a typo of it, as
    the patient index compares them): a twin registered under the retired MRN of her sibling
    has the family name and the birth date of the survivor, and nothing else."""
    born, stored = demo.birth, rec.birth
    if isinstance(born, Timestamp) and isinstance(stored, Timestamp) and _day(born) and _day(stored):
        if _day(born) != _day(stored):
            return True
    name, known = demo.name, rec.name
    if not (isinstance(name, PersonName) and isinstance(known, PersonName)):
        return False
    if name.given and known.given and compare_given(features_of({"name": name}),
                                                    features_of({"name": known})) is DISAGREE:
        return True
    if name.family and known.family:
        return (name.family.casefold() != known.family.casefold()
                and name.given.casefold() != known.given.casefold())
    return False


def _survivor_record(
    state: StateView, facility: str, mrn: str, warnings: list[str]
) -> tuple[str, RecordView | None]:
    """``_survivor``, and the stored record of the survivor (read once, not again by the caller)."""
    seen = {mrn}
    rec = None
    rec_mrn = None
    for _ in range(_MAX_MERGE_HOPS):
        rec = state.record(facility, mrn)
        rec_mrn = mrn
        if rec is None or rec.active or not rec.merged_into or rec.merged_into in seen:
            break
        mrn = rec.merged_into
        seen.add(mrn)
    if len(seen) > 1:
        warnings.append("PID-3: identifier was merged; applied to the surviving record")
    if rec_mrn != mrn:  # stopped after _MAX_MERGE_HOPS hops: the survivor was not read yet
        rec = state.record(facility, mrn)
    return mrn, rec


# --- ADT -------------------------------------------------------------------------------------------------


def _map_adt(msg, ctx, state, event, warnings) -> list:
    if event in MERGE_EVENTS or event in LEGACY_MERGE_EVENTS:
        return _map_merge(msg, ctx, state, event, warnings)
    if event in IDENTIFIER_CHANGE_EVENTS:
        if event == "A46" and msg.first("MRG") is not None and not _names_a_prior_mrn(msg):
            return _map_person_id_change(msg, ctx, state, warnings)
        ops = _map_identifier_change(msg, ctx, state, warnings)
        if event == "A46":
            warnings.append("A46: read as A47 (MRG-1 renamed to PID-3; PID-2 is not modelled)")
        return ops
    if event == "A43":
        return _map_identifier_move(msg, ctx, state, warnings)
    if event in NO_OP_EVENTS:
        warnings.append(NO_OP_EVENTS[event])
        return []
    if event in REFUSED_EVENTS:
        raise _Fail(201, "MSH-9.2", REFUSED_EVENTS[event])
    if event in ("A24", "A37"):
        return _map_link(msg, ctx, event, warnings)
    if event == "A17":
        return _map_swap(msg, ctx, state, warnings)
    if event in ACCOUNT_EVENTS:
        return _map_account(msg, ctx, state, event, warnings)
    if event in VISIT_MOVE_EVENTS:
        return _map_visit_move(msg, ctx, state, event, warnings)
    if not (event in ENCOUNTER_EVENTS or event in PERSON_EVENTS or event in DEMOGRAPHICS_ONLY_EVENTS):
        if not event:
            raise _Fail(101, "MSH-9.2", "no trigger event: MSH-9.2 and EVN-1 are empty")
        raise _Fail(201, "MSH-9.2", f"ADT event {event[:10]!r} is not mapped")

    pid = msg.first("PID")
    if pid is None:
        raise _Fail(101, "PID-3", "PID segment with a patient identifier is required")
    mrn, rec, demo = _subject(pid, ctx, state, warnings)
    digest = msg.body_digest(f"ADT^{event}")
    resent = rec is not None and rec.last_message == digest
    if resent:
        warnings.append(f"{event}: the same message was applied to this record last (an engine's resend under"
                        " a new MSH-10): applied once, not copied again")
    if event in DEMOGRAPHICS_ONLY_EVENTS:
        warnings.append(_ONLY_DEMOGRAPHICS_BECAUSE.get(event) or f"{event}: only the demographics are applied")
    pv1 = msg.first("PV1")
    late = False
    if event in VISIT_BOUND_EVENTS and pv1 is not None and rec is not None:
        visit = rec.encounters.get(visit_number(pv1))
        if visit is not None and visit.status in (S.DISCHARGED, S.CANCELLED):
            warnings.append(f"{event}: the visit is {visit.status.value} already; {LATE}")
            late = True
    ops: list = [UpsertPatient(ctx.code, mrn, demo, digest, resent, late)]
    if event not in ENCOUNTER_EVENTS:
        return ops

    if pv1 is None:
        if event != "A08":
            warnings.append("PV1: no visit segment, encounter not changed")
        return ops
    visit = _visit(pv1)
    current = rec.encounters.get(visit) if rec is not None else None
    patch = encounter_patch(pv1, warnings)
    if not visit:
        if event == "A08" and current is None:  # a patient update with a placeholder PV1
            return ops
        warnings.append("PV1-19: no visit number, the record's unnumbered encounter is used")
    new_stay = (not visit and current is not None and current.status in (S.DISCHARGED, S.CANCELLED)
                and event in NEW_STAY_EVENTS)
    if new_stay:  # without a visit number a closed stay and a new one share the encounter
        warnings.append(f"{event}: the unnumbered encounter was closed, a new stay replaces it")
        current = None
    at = _event_time(msg, warnings)
    status, patch, late = encounter_transition(event, current, patch, at, warnings)
    if late:  # as old as the visit's news: the record's demographics are newer
        ops[0] = _replace(ops[0], late=True)
    if new_stay:  # nothing of the old stay is kept (the admit time comes from the event, as for any admit)
        patch = _replace(patch, **{f: DELETE for f in patch.__match_args__ if getattr(patch, f) is None})
    ops.append(EncounterEvent(ctx.code, mrn, visit, event, status, patch, at, late))
    return ops


NEW_STAY_EVENTS = frozenset({"A01", "A04", "A05"})


def _map_swap(msg, ctx, state, warnings) -> list:
    """A17: two inpatients swap beds; each PID's PV1-3 is that patient's new location."""
    pairs = _pairs(msg, "PV1")
    if len(pairs) < 2 or any(pv1 is None for _, pv1 in pairs[:2]):
        raise _Fail(101, "PV1", "A17 needs two PID segments each followed by its PV1")
    ops: list = []
    at = _event_time(msg, warnings)
    for pid, pv1 in pairs[:2]:
        mrn, rec, demo = _subject(pid, ctx, state, warnings)
        ops.append(UpsertPatient(ctx.code, mrn, demo))
        visit = _visit(pv1)
        current = rec.encounters.get(visit) if rec is not None else None
        patch = encounter_patch(pv1, warnings)
        if patch.location is None:
            raise _Fail(101, "PV1-3", "A17: PV1-3 new location is required for each patient")
        if current is not None and current.status in (S.DISCHARGED, S.CANCELLED):
            warnings.append("A17: visit is closed, location not changed")
            patch = _replace(patch, location=None, prior_location=None)
        elif patch.prior_location is None and current is not None and current.location is not None:
            patch = _replace(patch, prior_location=current.location)
        ops.append(EncounterEvent(ctx.code, mrn, visit, "A17", None if current else _infer_status(patch), patch, at))
    return ops


S = EncounterStatus


OUTPATIENT_CLASSES = frozenset({"O", "E", "R", "B"})  # table 0004: registered (A04), not admitted


def _infer_status(patch: EncounterPatch) -> EncounterStatus:
    """Status of an encounter first seen in an update (A08, A12...): what its fields say."""
    if isinstance(patch.discharged_at, Timestamp):
        return S.DISCHARGED
    cls = patch.patient_class if isinstance(patch.patient_class, str) else ""
    if cls == "P":
        return S.PREADMITTED
    if cls == "I" or isinstance(patch.admitted_at, Timestamp) and cls not in ("O", "E", "R"):
        return S.ADMITTED
    return S.REGISTERED


def encounter_transition(
    event: str,
    current: EncounterView | None,
    patch: EncounterPatch,
    at: Timestamp | None,
    warnings: list[str],
) -> tuple[EncounterStatus | None, EncounterPatch, bool]:
    """The status an ADT event leaves an encounter in, the patch to apply, and whether the
    event is late: older news than the visit's state, not copied to other sites.

    Out-of-order events keep information: a discharge for an unknown visit
    creates it discharged with its times; an admit (A01) for a discharged
    visit keeps it discharged and only fills an admit time it lacks (late); a
    registration (A04, A05) of a discharged visit, a transfer (A02) or a class
    change (A06, A07) of a closed one and a discharge (A03) of a cancelled one
    change nothing of it (late), nor does a cancel of a transfer (A12) of a
    closed visit, a cancel of a discharge (A13) of a cancelled one, or a cancel
    of a pre-admission (A38) of a visit no longer pre-admitted. A04, A05 and A01
    after a cancel (A11) start the visit again.
    """
    try:
        status, patch = _transition(event, current, patch, at, warnings)
    except _Late as late:
        warnings.append(f"{late.why}; {LATE}")
        return None, late.patch, True
    return status, patch, False


LATE = "not copied (late)"  # how a late event's reason ends


class _Late(Exception):
    """Raised by ``_transition`` for older news than the visit's state: ``why`` (the reason's
    start), and the patch it still applies (nothing, or an admit time the visit lacks)."""

    def __init__(self, why: str, patch: EncounterPatch | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.patch = patch if patch is not None else EncounterPatch()


def _transition(event: str, current: EncounterView | None, patch: EncounterPatch, at: Timestamp | None,
                warnings: list[str]) -> tuple[EncounterStatus | None, EncounterPatch]:
    cur = current.status if current is not None else None
    closed = cur in (S.DISCHARGED, S.CANCELLED)

    if event == "A01":
        if patch.admitted_at is None and at is not None:
            patch = _replace(patch, admitted_at=at)
        if cur == S.DISCHARGED:  # only an admit time it lacks: older news changes nothing stored
            raise _Late("A01: visit already discharged, kept discharged",
                        EncounterPatch(admitted_at=patch.admitted_at if current.admitted_at is None else None))
        return S.ADMITTED, patch
    if event == "A02":
        if closed:
            raise _Late("A02: visit is closed, location not changed")
        if patch.prior_location is None and current is not None and current.location is not None:
            patch = _replace(patch, prior_location=current.location)
        return S.ADMITTED, patch
    if event == "A03":
        if cur == S.CANCELLED:
            raise _Late("A03: visit was cancelled, kept cancelled")
        if patch.discharged_at is None and at is not None:
            patch = _replace(patch, discharged_at=at)
        return S.DISCHARGED, patch
    if event in ("A04", "A05") and cur == S.DISCHARGED:  # registered again after its end: older news
        raise _Late(f"{event}: visit already discharged, kept discharged")
    if event == "A04":
        if cur in (None, S.PREADMITTED, S.CANCELLED):
            return S.REGISTERED, patch
        return None, patch
    if event == "A05":
        if cur in (None, S.CANCELLED):
            return S.PREADMITTED, patch
        return None, patch
    if event in ("A06", "A07"):
        if patch.patient_class is None:
            patch = _replace(patch, patient_class="I" if event == "A06" else "O")
        if closed:
            raise _Late(f"{event}: visit is closed, class not changed")
        return (S.ADMITTED if event == "A06" else S.REGISTERED), patch
    if event == "A08":
        return (_infer_status(patch) if current is None else None), patch
    if event == "A11":
        return S.CANCELLED, patch
    if event == "A12":
        if closed:
            raise _Late("A12: visit is closed, location not changed")
        back = patch.location
        if back is None and current is not None:
            back = current.prior_location
        if back is None:
            warnings.append("A12: no prior location known, location not changed")
        return (_infer_status(patch) if current is None else None), _replace(
            patch, location=back, prior_location=DELETE
        )
    if event == "A13":
        if cur == S.CANCELLED:
            raise _Late("A13: visit was cancelled, kept cancelled")
        patch = _replace(patch, discharged_at=DELETE)
        if cur in (None, S.DISCHARGED):  # back to what it was before the discharge
            cls = patch.patient_class if isinstance(patch.patient_class, str) else (
                current.patient_class if current is not None else None)
            return (S.REGISTERED if (cls or "").upper() in OUTPATIENT_CLASSES else S.ADMITTED), patch
        return None, patch
    if event == "A38":
        if cur in (None, S.PREADMITTED):
            return S.CANCELLED, patch
        raise _Late("A38: visit is no longer preadmitted, not cancelled")
    if event in DOCTOR_EVENTS:  # an update of the visit (its status unchanged), whose point is PV1-7 or PV1-9
        field, value = ("PV1-7", patch.attending) if event in ("A54", "A55") else ("PV1-9", patch.consulting)
        if value is None:
            warnings.append(f"{event}: {field} is empty, the doctor is not changed")
        return (_infer_status(patch) if current is None else None), patch
    raise AssertionError(event)  # pragma: no cover - ENCOUNTER_EVENTS is exhaustive


def _pairs(msg: Message, name: str = "MRG") -> list[tuple[Segment, Segment | None]]:
    """PID segments each with the MRG (or ``name``) that follows it before the next PID."""
    out: list[tuple[Segment, Segment | None]] = []
    for seg in msg.all():
        if seg.name == "PID":
            out.append((seg, None))
        elif seg.name == name and out and out[-1][1] is None:
            out[-1] = (out[-1][0], seg)
    return out


def _same_authority(a: Identifier, b: Identifier, ctx: FacilityContext) -> bool:
    """An identifier without CX.4 is read within the other one's authority
    (a bare MRG-1 names a prior id of the same assigning authority as PID-3)."""
    if not (a.authority or a.authority_id) or not (b.authority or b.authority_id):
        return True
    return a.same_authority(b)


def _prior_id(mrg: Segment, current: Identifier, ctx: FacilityContext) -> Identifier:
    """MRG-1: the repetition with PID-3's authority, else the facility's MRN rule (MRG-4, the
    prior patient id of an A39, when MRG-1 is empty)."""
    ids = _identifiers(mrg, 1) or _identifiers(mrg, 4)
    chosen = next((ident for ident in ids if _same_authority(ident, current, ctx)), None) or _choose_mrn(
        ids, ctx.authority)
    if chosen is None:
        raise _Fail(101, "MRG-1", "MRG-1 has no usable prior identifier")
    _usable_key(chosen.value, mrg.where(1), "prior identifier", MAX_MRN)
    return chosen


def _map_merge(msg, ctx, state, event, warnings) -> list:
    legacy = event in LEGACY_MERGE_EVENTS
    pairs = _pairs(msg)
    if not pairs:
        raise _Fail(101, "PID-3", "PID segment with the surviving identifier is required")
    ops: list = []
    for pid, mrg in pairs:
        survivor = _patient_id(pid, ctx)
        if mrg is None:
            raise _Fail(101, "MRG-1", "MRG segment with the prior identifier is required")
        retired = _prior_id(mrg, survivor, ctx)
        if not _same_authority(survivor, retired, ctx):
            raise _Fail(
                102, "MRG-1", "MRG-1 assigning authority differs from PID-3: merges are within one facility"
            )
        named = state.record(ctx.code, survivor.value)
        if (named is not None and not named.active and named.merged_into and retired.value != survivor.value
                and _survivor(state, ctx.code, survivor.value) == retired.value):
            # the merge that retired PID-3 into MRG-1, reversed by the sender: PID-3 lives again
            # and MRG-1 is merged into it (MemoryState._merge)
            warnings.append("PID-3: was merged into MRG-1 before; that merge is reversed")
            mrn, demo = survivor.value, demographics(pid, warnings)
        else:  # PID-3 merged away into another record: that survivor takes the merge, as it
            # takes every later message under PID-3 (AE 205 for another patient's demographics)
            mrn, _rec, demo = _subject(pid, ctx, state, warnings)
        ops.append(UpsertPatient(ctx.code, mrn, demo))
        if mrn == retired.value:
            warnings.append("MRG-1: prior identifier equals PID-3, nothing merged")
            continue
        if state.record(ctx.code, retired.value) is None:
            # Nothing to merge. A tombstone for a record never seen would send a later
            # registration under that MRN -- another patient, perhaps -- to the survivor.
            warnings.append("MRG-1: prior identifier is not known here, nothing merged")
            continue
        ops.append(MergePatients(ctx.code, mrn, retired.value, event, legacy))
    if legacy:
        warnings.append(f"{event}: legacy merge event treated as A40")
    return ops


def _map_account(msg, ctx, state, event, warnings) -> list:
    """A41 (merge account: MRG-3 into PID-18, one patient) and A44 (move account MRG-3 from
    the MRG-1 patient to the PID-3 one). Visits are not tied to accounts here: the records'
    account numbers change; person links never do."""
    ops: list = []
    for pid, mrg in _pairs(msg):
        if mrg is None:
            raise _Fail(101, "MRG-3", f"{event}: an MRG segment with the prior account is required")
        mrn, _rec, demo = _subject(pid, ctx, state, warnings)
        prior_account = mrg.value(3)
        if event == "A44" and not isinstance(demo.account, str) and prior_account:
            demo = _replace(demo, account=prior_account)  # the account moves as it is
        ops.append(UpsertPatient(ctx.code, mrn, demo))
        if event == "A44":
            source = _prior_id(mrg, _patient_id(pid, ctx), ctx)
            if source.value != mrn and state.record(ctx.code, source.value) is not None:
                ops.append(UpsertPatient(ctx.code, _survivor(state, ctx.code, source.value),
                                         Demographics(account=DELETE)))
            elif source.value != mrn:
                warnings.append("MRG-1: the account's prior patient is not known here")
    if not ops:
        raise _Fail(101, "PID-3", f"{event}: PID and MRG segments are required")
    warnings.append(f"{event}: account numbers applied (visits are not tied to accounts)")
    return ops


def _map_visit_move(msg, ctx, state, event, warnings) -> list:
    """A42 merge visit (MRG-5 into PV1-19, one patient), A45 move visit (MRG-5 of the MRG-1
    patient to PV1-19 of the PID-3 patient), A50 change visit number (MRG-5 -> PV1-19), A51
    change alternate visit id (MRG-6 -> PV1-50, where the visit is keyed by it)."""
    ops: list = []
    segments = msg.all()
    for pid, mrg in _pairs(msg):
        if mrg is None:
            raise _Fail(101, "MRG-5", f"{event}: an MRG segment with the prior visit is required")
        mrn, rec, demo = _subject(pid, ctx, state, warnings)
        ops.append(UpsertPatient(ctx.code, mrn, demo))
        pv1 = next((s for s in segments[segments.index(mrg):] if s.name == "PV1"), None)
        if pv1 is None:
            raise _Fail(101, "PV1", f"{event}: the PV1 with the new visit number is required")
        if event == "A51":
            old, new, where = mrg.value(6), pv1.value(50), (mrg.where(6), pv1.where(50))
        else:
            old, new, where = mrg.value(5), pv1.value(19), (mrg.where(5), pv1.where(19))
        if not old:
            raise _Fail(101, where[0], f"{where[0]}: the prior visit number is required")
        if not new:
            raise _Fail(101, where[1], f"{where[1]}: the new visit number is required")
        _usable_key(old, where[0], "visit number", MAX_VISIT)
        _usable_key(new, where[1], "visit number", MAX_VISIT)
        source = mrn
        if event == "A45":
            source = _survivor(state, ctx.code, _prior_id(mrg, _patient_id(pid, ctx), ctx).value)
        held = state.record(ctx.code, source)
        if event == "A51" and rec is not None and old not in rec.encounters:
            warnings.append("A51: no visit is keyed by the prior alternate visit id (PV1-19 keys it), nothing renamed")
            continue
        if held is None or old not in held.encounters:
            warnings.append(f"{where[0]}: the prior visit is not known here, nothing moved")
            continue
        if (source, old) != (mrn, new):
            ops.append(MoveVisit(ctx.code, source, old, mrn, new, event))
    if not ops:
        raise _Fail(101, "PID-3", f"{event}: PID and MRG segments are required")
    return ops


def _map_identifier_change(msg, ctx, state, warnings) -> list:
    pairs = _pairs(msg)
    if not pairs:
        raise _Fail(101, "PID-3", "PID segment with the corrected identifier is required")
    ops: list = []
    for pid, mrg in pairs:
        new = _patient_id(pid, ctx)
        if mrg is None:
            raise _Fail(101, "MRG-1", "MRG segment with the incorrect identifier is required")
        old = _prior_id(mrg, new, ctx)
        if not _same_authority(new, old, ctx):
            raise _Fail(102, "MRG-1", "MRG-1 assigning authority differs from PID-3")
        if new.value != old.value:
            existing = state.record(ctx.code, new.value)
            if existing is not None and state.record(ctx.code, old.value) is not None:
                raise _Fail(205, "PID-3", "corrected identifier already names another record (use A40 to merge)")
            ops.append(ChangeIdentifier(ctx.code, old.value, new.value))
        else:
            warnings.append("MRG-1: incorrect identifier equals PID-3, nothing renamed")
        ops.append(UpsertPatient(ctx.code, new.value, demographics(pid, warnings)))
    return ops


def _names_a_prior_mrn(msg: Message) -> bool:
    """Whether an MRG of the message names a prior patient identifier list (MRG-1)."""
    return any(mrg.field(1) for mrg in msg.segments("MRG"))


def _map_person_id_change(msg, ctx, state, warnings) -> list:
    """A46 with MRG-1 empty: PID-2 (the sender's patient ID) changed from MRG-4; the records are
    keyed by PID-3, which did not change: only the demographics are applied."""
    pid = msg.first("PID")
    if pid is None:
        raise _Fail(101, "PID-3", "PID segment with a patient identifier is required")
    mrn, _rec, demo = _subject(pid, ctx, state, warnings)
    warnings.append("A46: MRG-1 is empty: the change is of PID-2 (from MRG-4), which the record model does not"
                    " key on; only the demographics are applied")
    return [UpsertPatient(ctx.code, mrn, demo)]


def _map_identifier_move(msg, ctx, state, warnings) -> list:
    """A43 (move patient information - patient identifier list): the identifier in PID-3 and
    MRG-1 (the same one) moves from the sender's patient MRG-4 to its patient PID-2. The
    exchange keys its records by that identifier and links them to persons by matching, not
    by PID-2: the record stays as it is, with the demographics of the patient it belongs to now
    (PID), and the patient index scores it again as after any update."""
    pairs = _pairs(msg)
    if not pairs:
        raise _Fail(101, "PID-3", "PID segment with the identifier moved is required")
    ops: list = []
    for pid, mrg in pairs:
        if mrg is None:
            raise _Fail(101, "MRG-1", "A43: an MRG segment with the identifier moved (MRG-1) is required")
        moved = _patient_id(pid, ctx)
        prior = _identifiers(mrg, 1)
        if not prior:
            raise _Fail(101, "MRG-1", "A43: MRG-1, the identifier moved, is required")
        if not any(ident.value == moved.value and _same_authority(ident, moved, ctx) for ident in prior):
            raise _Fail(102, "MRG-1", "A43 moves the identifier PID-3 names, so MRG-1 must name it too; to"
                                      " rename an identifier send A47, to move a visit A45, an account A44")
        mrn, _rec, demo = _subject(pid, ctx, state, warnings)
        ops.append(UpsertPatient(ctx.code, mrn, demo))
    warnings.append("A43: the identifier's move between the sender's patients (MRG-4 to PID-2) is not modelled:"
                    " its record is updated with the PID and matched again")
    return ops


def _map_link(msg, ctx, event, warnings) -> list:
    pids = msg.segments("PID")
    if len(pids) < 2:
        raise _Fail(101, "PID-3", f"{event} needs two PID segments")
    a = _patient_id(pids[0], ctx)
    b = _patient_id(pids[1], ctx)
    ops: list = [
        UpsertPatient(ctx.code, a.value, demographics(pids[0], warnings)),
        UpsertPatient(ctx.code, b.value, demographics(pids[1], warnings)),
    ]
    if a.value == b.value:
        warnings.append(f"{event}: both PID segments name the same record")
    else:
        ops.append(LinkAssertion(ctx.code, a.value, b.value, event == "A24"))
    return ops


# --- MDM ---------------------------------------------------------------------------------------------------


def _map_mdm(msg, ctx, state, event, warnings) -> list:
    if event not in MDM_EVENTS:
        if not event:
            raise _Fail(101, "MSH-9.2", "no trigger event: MSH-9.2 and EVN-1 are empty")
        raise _Fail(201, "MSH-9.2", f"MDM event {event[:10]!r} is not mapped")
    txa = msg.first("TXA")
    if txa is None:
        raise _Fail(101, "TXA-12", "TXA segment with the unique document number is required")
    patch = document_patch(txa, warnings)
    if not patch.number:
        raise _Fail(101, "TXA-12", "TXA-12 unique document number is required")
    _usable_key(patch.number, "TXA-12", "document number", MAX_DOCUMENT_NUMBER)
    if patch.parent:
        _usable_key(patch.parent, "TXA-13", "parent document number", MAX_DOCUMENT_NUMBER)
    pid = msg.first("PID")
    if pid is None:
        raise _Fail(101, "PID-3", "PID segment with a patient identifier is required")
    mrn, _rec, demo = _subject(pid, ctx, state, warnings)

    obx = msg.after(txa, "OBX") or msg.segments("OBX")
    if obx:
        patch = _replace(patch, content=document_content(obx, ctx.max_document_bytes))
    elif event in MDM_WITH_CONTENT:
        warnings.append(f"{event}: no OBX content")

    ops: list = [UpsertPatient(ctx.code, mrn, demo)]
    current = state.document(ctx.code, patch.number)
    number = patch.number
    for n, doc in ((12, current), (13, state.document(ctx.code, patch.parent) if patch.parent else None)):
        if doc is not None and _survivor(state, ctx.code, doc.mrn) != mrn:
            # a document number is one patient's: changing another's would file this patient's
            # text in their record (or replace their note)
            raise _Fail(205, f"TXA-{n}", f"TXA-{n} names a document of another patient")

    if current is not None and current.state is DocumentState.CANCELLED and event != "T11":
        # a cancel is final (often: filed under the wrong patient); an edit would reinstate its text
        raise _Fail(207, "TXA-12", "TXA-12 names a cancelled document: it can no longer be changed")
    if event in ("T01", "T02"):
        if (current is not None and current.content is not None and patch.content is not None
                and patch.content != current.content):
            # a resent original is welcome; a second original with other text would leave the record
            # with the first text while the copies carry the second
            raise _Fail(205, "TXA-12", "TXA-12 names a document that exists already with other content:"
                                       " an edit is T03/T04 or T07/T08")
        # a later original (T02 after its T01 notice) says the current status; one that arrives
        # after an edit is late and only fills what the edit left empty, and so is a notice (T01)
        # after the document itself: its status (IP, UN) is older news, not copied
        later = (current is not None and current.event in ("T01", "T02")
                 and not (event == "T01" and current.event == "T02"))
        resent = later and _adds_nothing(patch, current.stored)
        late = current is not None and not later and event == "T01"
        if resent:
            warnings.append(f"{event}: the document was received before as it is: applied once, not copied again")
        elif late:
            warnings.append(f"T01: a notice of a document received since; only what is empty is filled; {LATE}")
        ops.append(DocumentEvent(ctx.code, mrn, number, event, DocumentAction.UPDATE if later else DocumentAction.CREATE,
                                 DocumentState.CURRENT if current is None else None, patch, resent or late))
    elif event in ("T03", "T04"):
        ops.append(DocumentEvent(ctx.code, mrn, number, event, DocumentAction.UPDATE,
                                 DocumentState.CURRENT if current is None else None, patch))
    elif event in ("T07", "T08"):
        ops.append(DocumentEvent(ctx.code, mrn, number, event, DocumentAction.NEW_VERSION,
                                 DocumentState.CURRENT if current is None else None, patch))
    elif event in ("T05", "T06", "T09", "T10"):
        parent = patch.parent
        if not parent:
            raise _Fail(101, "TXA-13", "TXA-13 parent document number is required")
        if parent == number:
            raise _Fail(102, "TXA-13", "TXA-13 parent document is the document itself")
        parent_doc = state.document(ctx.code, parent)
        if parent_doc is None:
            raise _Fail(204, "TXA-13", "TXA-13 parent document is unknown")
        if parent_doc.state is DocumentState.CANCELLED:
            raise _Fail(207, "TXA-13", "TXA-13 names a cancelled document: it takes no addendum or replacement")
        if current is not None:  # its content would be dropped (fill-only) while the copies carry it
            raise _Fail(205, "TXA-12", "TXA-12 names a document that exists already: an addendum or a"
                                       " replacement needs a number of its own")
        ops.append(DocumentEvent(ctx.code, mrn, number, event, DocumentAction.CREATE,
                                 DocumentState.CURRENT if current is None else None, patch))
        if event in ("T09", "T10"):
            ops.append(MarkDocument(ctx.code, parent, event, DocumentState.REPLACED, "OB"))
    elif event == "T11":
        if patch.availability not in (None, "CA"):
            warnings.append(f"TXA-19: a cancelled document is unavailable (CA), not {patch.availability[:10]!r}")
        patch = _replace(patch, availability="CA")
        ops.append(DocumentEvent(ctx.code, mrn, number, event, DocumentAction.UPDATE,
                                 DocumentState.CANCELLED, patch))
    return ops


def _adds_nothing(patch: DocumentPatch, stored: DocumentPatch | None) -> bool:
    """Every field the patch gives is the stored one already."""
    if stored is None:
        return False
    return all(getattr(stored, name) == value for name, value in patch.fields_set().items() if value != "")


# TXA-18 codes of a document any facility may receive: table 0272's "usual control", and the
# HL7 v3 confidentiality codes below "restricted" (normal, low, moderate). V (very restricted),
# R (restricted) and every code not known here go only where receive_confidentiality names them.
USUAL_CONFIDENTIALITY = frozenset({"U", "N", "L", "M"})
UNREADABLE_CONFIDENTIALITY = "?"  # a TXA-18 repetition with text but no code ("^Restricted", "&R")
_RESTRICTION = {"R": 2, "V": 3}  # a code not known here ranks above both: it could mean anything


def restriction(code: str) -> int:
    """How restricted a TXA-18 code is: 0 none given, 1 usual, 2 R, 3 V, 4 a code not known here."""
    if not code:
        return 0
    return 1 if code in USUAL_CONFIDENTIALITY else _RESTRICTION.get(code, 4)


def most_restricted(*codes: str | None) -> str:
    """The most restricted of the codes ("" when none is given)."""
    return max((c for c in codes if c), key=restriction, default="")


def confidentiality(txa: Segment | None) -> str:
    """TXA-18, the document's confidentiality status, upper case: the most restricted code of
    any repetition (``U~R`` is R), a repetition with text but no code being unreadable (``?``,
    restricted); "U" (usual control) for the HL7 null, which clears the status; "" when absent."""
    if txa is None:
        return ""
    if is_delete(txa.field(18)):
        return "U"
    d = txa.delimiters
    codes = []
    for i, repetition in enumerate(txa.repetitions(18), 1):
        if not repetition.strip() or is_delete(repetition):
            continue
        code = txa.value(18, 1, 1, i).upper()
        _, _, more = repetition.partition(d.component)[0].partition(d.subcomponent)
        codes.append(code if code and not more.strip() else UNREADABLE_CONFIDENTIALITY)  # "U&R": unreadable
    return most_restricted(*codes)


def document_patch(txa: Segment, warnings: list[str]) -> DocumentPatch:
    sub = txa.delimiters.subcomponent

    def opt(value: str) -> str | None:
        return value or None

    def first_doctor(n: int):
        comps = txa.components(n)
        return doctor(comps, sub, txa.text) if comps else None

    def ts(n: int):
        v = _ts(txa, n, warnings)
        return v if isinstance(v, Timestamp) else None

    return DocumentPatch(
        number=txa.value(12),
        number_field=txa.text(txa.repetitions(12)[0]).strip() if txa.field(12) else "",
        type=opt(txa.value(2)),
        type_text=opt(txa.value(2, 2)),
        parent=opt(txa.value(13)),
        completion_status=opt(txa.value(17).upper()),
        availability=opt(txa.value(19).upper()),
        confidentiality=opt(confidentiality(txa)),
        author=first_doctor(9),
        authenticator=first_doctor(22),
        activity_at=ts(4),
        originated_at=ts(6),
    )


TEXT_TYPES = frozenset({"TX", "FT", "ST", "CE", "CWE", "TN"})
_ED_MAJOR = {
    "AP": "application",
    "APPLICATION": "application",
    "IM": "image",
    "IMAGE": "image",
    "TEXT": "text",
    "TX": "text",
    "AU": "audio",
    "AUDIO": "audio",
    "VIDEO": "video",
    "MULTIPART": "multipart",
    "NS": "application",
    "SI": "application",
    "SD": "application",
}


def _mime(type_: str, subtype: str) -> str:
    if "/" in subtype:
        return subtype.strip()
    if "/" in type_:
        return type_.strip()
    major = _ED_MAJOR.get(type_.upper(), type_.lower() or "application")
    minor = subtype.lower() or ("plain" if major == "text" else "octet-stream")
    return f"{major}/{minor}"


def document_content(obxs: list[Segment], max_bytes: int) -> Content | None:
    """The document body: the first ED/RP OBX as bytes, else the text OBX lines joined with "\\n".

    Content larger than ``max_bytes`` (text as UTF-8, ED data decoded) cannot
    be applied: AE naming OBX-5 (``FacilityContext.max_document_bytes``).
    """
    lines: list[str] = []
    for obx in obxs:
        vt = obx.value(2).upper()
        if vt == "ED":  # the document itself; text lines before it (a cover note) are kept beside it
            content = _ed_content(obx, max_bytes)
            return _replace(content, text="\n".join(lines)) if lines else content
        if vt == "RP":  # a pointer to the document; text lines before it (a cover note) are kept beside it
            comps = obx.components(5)
            return Content(
                text="\n".join(lines) if lines else None,
                reference=obx.text(comps[0]) if comps else "",
                content_type=_mime(obx.text(comps[2]) if len(comps) > 2 else "",
                                   obx.text(comps[3]) if len(comps) > 3 else ""),
            )
        if vt in TEXT_TYPES:
            reps = obx.field(5).split(obx.delimiters.repetition) if obx.field(5) else [""]
            for rep in reps:
                if vt in ("CE", "CWE"):
                    comps = rep.split(obx.delimiters.component)
                    line = obx.text(comps[1] if len(comps) > 1 and comps[1] else comps[0])
                else:
                    line = obx.text(rep)
                lines.append(line)
    if not lines:
        return None
    text = "\n".join(lines)
    if len(text) > max_bytes // 4:  # a UTF-8 character is at most 4 bytes: only then count them
        _check_size(len(text.encode("utf-8")), max_bytes)
    return Content(text=text, content_type="text/plain")


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise _Fail(104, "OBX-5", f"document content of {size} bytes exceeds the limit of {max_bytes} bytes")


def _ed_content(obx: Segment, max_bytes: int) -> Content:
    comps = obx.components(5)
    comps += [""] * (5 - len(comps))
    content_type = _mime(obx.text(comps[1]).strip(), obx.text(comps[2]).strip())
    encoding = obx.text(comps[3]).strip().upper()
    raw = comps[4]
    if encoding in ("BASE64", "B64"):
        # Senders wrap long Base64 in lines written as escapes (\X0D\\X0A\, \.br\): unescaped
        # first, then the line breaks dropped; anything else outside the alphabet is an error,
        # not a byte to guess at.
        cleaned = "".join(obx.text(raw).split())
        cleaned += "=" * (-len(cleaned) % 4)
        try:
            data = base64.b64decode(cleaned, validate=True)
        except (binascii.Error, ValueError):
            raise _Fail(102, "OBX-5", "OBX-5 ED data is not valid Base64") from None
    elif encoding == "HEX":
        try:
            data = bytes.fromhex(raw)
        except ValueError:
            raise _Fail(102, "OBX-5", "OBX-5 ED data is not valid hex") from None
    else:  # "A" (ASCII) or unspecified: the escaped text itself
        data = obx.text(raw).encode("utf-8")
    _check_size(len(data), max_bytes)
    return Content(data=data, content_type=content_type)


__all__ = [
    "ChangeIdentifier",
    "Changes",
    "DocumentAction",
    "DocumentEvent",
    "DocumentState",
    "DocumentView",
    "EncounterEvent",
    "EncounterStatus",
    "EncounterView",
    "FacilityContext",
    "LinkAssertion",
    "MappingError",
    "MarkDocument",
    "MergePatients",
    "Needs",
    "Operation",
    "RecordView",
    "StateView",
    "UpsertPatient",
    "demographics",
    "document_content",
    "document_patch",
    "encounter_patch",
    "encounter_transition",
    "map_message",
    "needs",
    "visit_number",
]

