"""Who receives a copy of an applied event: a pure function of the event, the
network's configuration and the person's records.

``route(event, facilities, records, routes)`` answers a :class:`Decision`:
the :class:`Destination` s (facility, its MRN for the person, why) and, for
every other configured facility, the :class:`Reason` it gets nothing.

The rules, in the order they are checked for each facility:

1. the person opted out (``Event.protected``)           -> nobody, rules included
2. a local event: it changes only the sender's own identifiers
   (A24/A37 links, A41-A51 account, visit and id moves) or
   concerns two patients (A17 swap)                      -> nobody
3. the facility is the sender                            -> never its own copy
4. the facility has no ``deliver_to``                    -> nothing
5. a type of the document is in its ``exclude_documents``: its TXA-2 or any
   type the document or its ancestors (TXA-13) ever had; or an MDM whose type
   nobody knows, when the facility excludes any      -> nothing, rules included
   the document is confidential (TXA-18, the most restricted status the
   document or any ancestor was last given, V or R or a code routing does not
   know) and the facility's ``receive_confidentiality`` lacks it -> nothing,
   rules included
6. default: it holds an active record linked to the person and one of its
   ``subscribe`` patterns matches TYPE^EVENT (and the document type when the
   pattern has a third part, ``MDM^T02^DS``: TXA-2, else the type stored for
   the document, else its parent's)                   -> why "default"
7. else the first ``[[route]]`` (file order) whose conditions all match and
   whose ``to``/``to_kind`` names the facility; it needs a record of the
   person unless the rule says ``allow_without_record`` -> why = the rule's name
   A cancel (``CANCELS``: A11, A12, A13...) goes, on either basis, only to a
   facility that was sent something about its visit before (``told``): to
   another it would tell of a stay it never heard of, to be refused there
8. merges (A40 and the legacy A18/A34/A35/A36): a copy only where the merge
   means something to the destination: it holds an active record for the
   survivor's person and a *different* one for the retired record's person
   (``prior_records``, as they were before the merge); MRG-1 then becomes that
   MRN. The writer (exchange.store.routing) passes the retired record's
   person after the merge, so no merge is copied: where a destination holds a
   record of each side the patient index opens a duplicate review instead
   (README, "Routing").

A late link (a review resolved later, a merge) does not resend history:
routing is decided once, when an event is applied, from the links as they
are then. Events that arrive after the link are copied.

A copy that waits in the outbox (its destination was down) meets the
configuration again before it goes: ``recheck(event, destination, why,
facilities, routes)`` says why the configuration running now would not send
it (the facility is gone or has no ``deliver_to``, excludes the document
type, no longer subscribes to the event, or the rule that added it is gone),
and the worker withholds it.

Pure: no SQL, no Twisted, no I/O.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase

from exchange.acceptance import matches
from exchange.config import FacilityConfig, RouteConfig
from exchange.hl7.header import Header
from exchange.mapping.events import LEGACY_MERGE_EVENTS, MERGE_EVENTS, USUAL_CONFIDENTIALITY
from exchange.mapping.events import confidentiality as txa_confidentiality
from exchange.mapping.events import protection
from exchange.mapping.message import Message
from exchange.outcome import Value

__all__ = [
    "CANCELS",
    "DEFAULT",
    "LOCAL_EVENTS",
    "MERGES",
    "Decision",
    "Destination",
    "Event",
    "Reason",
    "Skipped",
    "USUAL_CONFIDENTIALITY",
    "confidential",
    "protection",
    "recheck",
    "route",
    "subscribed",
]

DEFAULT = "default"  # Destination.why of a copy by subscription

# Patient merges: MRG-1 names another record of the sender (HL7-NOTES: A34,
# A35, A36 and A18 are treated as A40).
MERGES = MERGE_EVENTS | LEGACY_MERGE_EVENTS
# Local events, never copied: about the sender's own identifiers, accounts and
# visits (they change nothing another facility holds: A43 moves an MRN between
# the sender's own patients), or about two patients at once (A17 swaps two
# inpatients' beds).
LOCAL_EVENTS = frozenset({"A17", "A24", "A37"} | {f"A{n}" for n in range(41, 52)})
# Cancels: each takes back an earlier event of the same visit (A11 an admit or visit
# notification, A12 a transfer, A13 a discharge, A25-A27 pending ones, A32/A33 arriving
# and departing, A38 a pre-admit, A52/A53 leaves of absence, A55/A62 doctor changes).
CANCELS = frozenset({"A11", "A12", "A13", "A25", "A26", "A27", "A32", "A33", "A38", "A52", "A53", "A55", "A62"})


class Reason(StrEnum):
    """Why a facility gets no copy of an event."""

    PROTECTED = "protected"  # the person opted out (PD1-12 or the API)
    LOCAL_EVENT = "local_event"  # the event concerns only the sender's bookkeeping (LOCAL_EVENTS)
    SENDER = "sender"  # the facility sent the event
    NO_ENDPOINT = "no_endpoint"  # the facility has no deliver_to
    EXCLUDED_DOCUMENT = "excluded_document"  # TXA-2 in its exclude_documents
    CONFIDENTIAL = "confidential"  # TXA-18 restricts the document and it does not receive that status
    NO_RECORD = "no_record"  # it holds no record of the person (and no rule allows that)
    NOT_SUBSCRIBED = "not_subscribed"  # no subscription and no rule matches
    MERGE_NOT_AT_DESTINATION = "merge_not_at_destination"  # it does not hold both merged sides
    NOT_TOLD = "not_told"  # a cancel of a visit it was sent nothing about
    # recheck only: a copy queued under an earlier configuration
    NOT_CONFIGURED = "not_configured"  # the facility is no longer configured
    RULE_REMOVED = "rule_removed"  # the [[route]] that added it is gone, or no longer names the facility


@dataclass(frozen=True, slots=True)
class Event(Value):
    """An applied event, as routing sees it."""

    facility: str  # the sender: MSH-4.1
    message_type: str  # MSH-9.1
    event: str  # MSH-9.2 (EVN-1 before v2.3)
    person: str | None = None  # enterprise person id of the record, after the event applied
    source_mrn: str | None = None  # the sender's MRN (PID-3) of that record
    patient_class: str = ""  # PV1-2, upper case
    document_type: str = ""  # TXA-2.1, upper case
    protected: bool = False  # the person opted out: PD1-12 = Y, or set through the API
    # Every document type the event touches, upper case: its TXA-2 and every type its document
    # and the document's ancestors (TXA-13) ever had: an addendum to a BH note, its edits and a
    # notice that re-types it are BH too. Any of them in a facility's exclude_documents keeps
    # the copy away; an MDM with none at all is withheld from every facility that excludes any.
    document_types: tuple[str, ...] = ()
    # The TXA-18 codes (upper case) of the message and of its document and ancestors as last
    # stated: a restricted one keeps the copy from every facility not configured to receive it.
    confidentiality: tuple[str, ...] = ()

    @classmethod
    def read(
        cls,
        header: Header,
        message: Message,
        *,
        person: str | None,
        source_mrn: str | None,
        protected: bool,
        stored_type: str = "",
        lineage: tuple[str, ...] = (),
        confidentiality: Collection[str] = (),
    ) -> Event:
        """The routing view of a message: MSH-4.1, MSH-9, PV1-2, TXA-2 and TXA-18 read
        from it, the rest (what the record model knows) given by the caller:
        the type the record model routes the message's document (TXA-12) as,
        every type of its lineage (``exchange.mapping.state.document_types``) and
        the confidentiality status its document and their ancestors have."""
        pv1 = message.first("PV1")
        txa = message.first("TXA")
        stored = tuple(t.upper() for t in lineage if t)
        sent = txa.value(2).upper() if txa is not None else ""
        document = sent or stored_type.upper()
        return cls(
            facility=header.facility,
            message_type=header.message_type.upper(),
            event=header.event.upper(),
            person=person,
            source_mrn=source_mrn,
            patient_class=pv1.value(2).upper() if pv1 is not None else "",
            document_type=document,
            protected=protected,
            document_types=tuple(dict.fromkeys(t for t in (document, *stored) if t)),
            confidentiality=tuple(sorted({c.upper() for c in (txa_confidentiality(txa), *confidentiality)
                                          if c})),
        )


@dataclass(frozen=True, slots=True)
class Destination(Value):
    """One facility that receives a copy."""

    facility: str  # its code (MSH-6 of the copy)
    mrn: str | None  # its own MRN for the person (PID-3 of the copy); None only by allow_without_record
    why: str  # DEFAULT or the name of the [[route]] that added it
    prior_mrn: str | None = None  # merges: its MRN for the retired side (MRG-1 of the copy)


@dataclass(frozen=True, slots=True)
class Skipped(Value):
    facility: str
    reason: Reason


@dataclass(frozen=True, slots=True)
class Decision(Value):
    """Where an event's copies go; every configured facility is in exactly
    one of ``destinations`` and ``skipped``."""

    destinations: tuple[Destination, ...]
    skipped: tuple[Skipped, ...]

    @property
    def reason(self) -> str | None:
        """Why nothing goes (one line, no PHI), or None when something does."""
        if self.destinations:
            return None
        if any(s.reason is Reason.PROTECTED for s in self.skipped):
            return "the person opted out"
        if any(s.reason is Reason.LOCAL_EVENT for s in self.skipped):
            return "a local event of the sender (never copied)"
        parts = [f"{s.facility}: {s.reason}" for s in self.skipped if s.reason is not Reason.SENDER]
        return "no destination" + (f" ({'; '.join(parts)})" if parts else "")


def confidential(facility: FacilityConfig, event: Event) -> bool:
    """The facility must not receive the event's document: a confidentiality status of it
    (``Event.confidentiality``) is restricted and not one the facility receives."""
    return any(c not in USUAL_CONFIDENTIALITY and c not in facility.receive_confidentiality
               for c in event.confidentiality)


def subscribed(facility: FacilityConfig, message_type: str, event: str, document_type: str = "") -> bool:
    """Whether one of the facility's ``subscribe`` patterns matches the event.

    ``TYPE^EVENT`` matches any document type; ``MDM^EVENT^DOCTYPE`` only
    events whose TXA-2 matches DOCTYPE (``*`` and ``?`` as wildcards).
    """
    for pattern in facility.subscribe:
        if not matches(pattern, message_type, event):
            continue
        _, _, rest = pattern.partition("^")
        _, has_document, document = rest.partition("^")
        if not has_document or _match(document, document_type):
            return True
    return False


def route(
    event: Event,
    facilities: Sequence[FacilityConfig],
    records: Mapping[str, str],
    routes: Sequence[RouteConfig] = (),
    *,
    prior_records: Mapping[str, str] | None = None,
    told: Collection[str] | None = None,
) -> Decision:
    """Decide the destinations of ``event`` (see the module docstring).

    ``records``: the person's active records, {facility code: MRN} (one per
    facility: the caller picks one when a facility holds several).
    ``prior_records``: for merges only, the records of the person the
    retired MRN was linked to before the merge, {facility code: MRN}.
    ``told``: for cancels only, the facilities sent a copy about the same visit
    before (None: not known, every facility counts as told).
    """
    message_type, trigger = event.message_type.upper(), event.event.upper()
    document = event.document_type.upper()
    if event.protected:
        return _nobody(facilities, event, Reason.PROTECTED)
    if message_type == "ADT" and trigger in LOCAL_EVENTS:
        return _nobody(facilities, event, Reason.LOCAL_EVENT)
    merge = message_type == "ADT" and trigger in MERGES
    cancel = message_type == "ADT" and trigger in CANCELS and told is not None
    sender = next((f for f in facilities if f.code == event.facility), None)
    rules = [r for r in routes if _rule_matches(r, event, sender, message_type, trigger, document)]

    destinations: list[Destination] = []
    skipped: list[Skipped] = []
    for facility in facilities:
        code = facility.code
        mrn = records.get(code)
        if code == event.facility:
            skipped.append(Skipped(code, Reason.SENDER))
            continue
        if not facility.deliver_to:
            skipped.append(Skipped(code, Reason.NO_ENDPOINT))
            continue
        if excluded(facility, event):
            skipped.append(Skipped(code, Reason.EXCLUDED_DOCUMENT))
            continue
        if confidential(facility, event):
            skipped.append(Skipped(code, Reason.CONFIDENTIAL))
            continue
        why = _basis(facility, mrn, rules, message_type, trigger, document)
        if isinstance(why, Reason):
            skipped.append(Skipped(code, why))
            continue
        if cancel and code not in told:
            skipped.append(Skipped(code, Reason.NOT_TOLD))
            continue
        prior = None
        if merge:
            prior = (prior_records or {}).get(code)
            if mrn is None or prior is None or prior == mrn:
                skipped.append(Skipped(code, Reason.MERGE_NOT_AT_DESTINATION))
                continue
        destinations.append(Destination(code, mrn, why, prior))
    return Decision(tuple(destinations), tuple(skipped))


def excluded(facility: FacilityConfig, event: Event) -> bool:
    """The facility must not receive the event's document: one of its types (``document_types``:
    the document's whole lineage) is in its ``exclude_documents``, or it is an MDM whose type
    nobody knows (TXA-2 empty everywhere), which could be any of them."""
    if not facility.exclude_documents:
        return False
    types = {t.upper() for t in (event.document_type, *event.document_types) if t}
    if not types:
        return event.message_type.upper() == "MDM"
    return not types.isdisjoint(facility.exclude_documents)


def recheck(
    event: Event,
    destination: str,
    why: str | None,
    facilities: Sequence[FacilityConfig],
    routes: Sequence[RouteConfig] = (),
) -> Reason | None:
    """Why the configuration running now would not send this queued copy, or None.

    ``event``: the copy's message as routing saw it (type, event, ``document_type`` and
    ``document_types``, ``confidentiality``); ``why``: the copy's Destination.why (None: not recorded, only
    the facility and its exclusions are checked). Checks what does not depend on the
    record model (the outbox checks the opt-out and the links itself): the facility is
    configured with ``deliver_to``, excludes none of the document types, receives its
    confidentiality status, and still
    wants the copy for the reason it got it: a copy by subscription needs a
    ``subscribe`` pattern that matches, a rule's copy the rule under that name, still
    naming the facility (its other conditions are not checked again).
    """
    facility = next((f for f in facilities if f.code == destination), None)
    if facility is None:
        return Reason.NOT_CONFIGURED
    if not facility.deliver_to:
        return Reason.NO_ENDPOINT
    document = event.document_type.upper()
    if excluded(facility, event):
        return Reason.EXCLUDED_DOCUMENT
    if confidential(facility, event):
        return Reason.CONFIDENTIAL
    if why == DEFAULT:
        if not subscribed(facility, event.message_type.upper(), event.event.upper(), document):
            return Reason.NOT_SUBSCRIBED
    elif why is not None:
        rule = next((r for r in routes if r.name == why), None)
        if rule is None or not _rule_names(rule, facility):
            return Reason.RULE_REMOVED
    return None


def _basis(
    facility: FacilityConfig,
    mrn: str | None,
    rules: list[RouteConfig],
    message_type: str,
    trigger: str,
    document: str,
) -> str | Reason:
    """Why the facility receives the copy (DEFAULT or a rule's name), else the Reason it does not."""
    if mrn is not None and subscribed(facility, message_type, trigger, document):
        return DEFAULT
    for rule in rules:
        if _rule_names(rule, facility) and (mrn is not None or rule.allow_without_record):
            return rule.name
    return Reason.NO_RECORD if mrn is None else Reason.NOT_SUBSCRIBED


def _rule_matches(
    rule: RouteConfig,
    event: Event,
    sender: FacilityConfig | None,
    message_type: str,
    trigger: str,
    document: str,
) -> bool:
    """Do all the conditions the rule gives hold for the event?"""
    if rule.messages and not any(matches(p, message_type, trigger) for p in rule.messages):
        return False
    if rule.from_codes and event.facility not in rule.from_codes:
        return False
    if rule.from_kinds and (sender is None or sender.kind not in rule.from_kinds):
        return False
    if rule.patient_classes and event.patient_class.upper() not in rule.patient_classes:
        return False
    if rule.document_types and document not in rule.document_types:
        return False
    return True


def _rule_names(rule: RouteConfig, facility: FacilityConfig) -> bool:
    """Is the facility one of the rule's destinations: named in ``to`` or of a kind in ``to_kind``?"""
    return facility.code in rule.to_codes or facility.kind in rule.to_kinds


def _match(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if not any(c in pattern for c in "*?["):
        return pattern == value
    return fnmatchcase(value, pattern)


def _nobody(facilities: Sequence[FacilityConfig], event: Event, reason: Reason) -> Decision:
    return Decision(
        (),
        tuple(
            Skipped(f.code, Reason.SENDER if f.code == event.facility else reason) for f in facilities
        ),
    )
