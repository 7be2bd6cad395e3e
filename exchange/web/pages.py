"""What each workbench page shows: plain values built from what the store returns.

Pure: no Twisted, no SQL, no HTML. ``exchange.web.workbench`` reads with the
store functions the API uses (``exchange.store.reviews``, ``records``,
``outbox``), hands the result to a function here, and a Jinja template
(``exchange/web/templates``) lays the page model out. So what a technician
sees on a review -- each field's values side by side, its agreement level
and weight, the totals against the thresholds, the choices of the decision
form -- is decided (and tested) here.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, unquote

from exchange.mapping.values import INVISIBLE
from exchange.matching.decide import Reason
from exchange.store.outbox import DeliveryState
from exchange.store.consent import PD1
from exchange.store.reviews import UNDOABLE, ReviewState

DEFAULT_PAGE = "/reviews"
MAX_NEXT_CHARS = 2000

FIELD_LABELS = {
    "family": "Family name",
    "given": "Given name",
    "middle": "Middle name",
    "suffix": "Suffix",
    "birth": "Birth date",
    "ssn": "SSN",
    "address": "Street",
    "place": "City, state, ZIP",
    "phone": "Phone",
    "sex": "Sex",
}

BEST_LABELS = {
    "name": "Name",
    "birth_date": "Birth date",
    "sex": "Sex",
    "address": "Address",
    "phones": "Phones",
    "ssn_last4": "SSN",
}

REVIEW_STATES = tuple(s.value for s in ReviewState) + ("all",)

MERGE_CONFLICT = "merge_conflict"  # exchange.store.index.MERGE_CONFLICT: a review's kind, also seen as a reason

# Why the patient index decided as it did (exchange.matching.decide.Reason), as a technician reads it.
# Direction controls and invisible characters: "\u202eNOSREDNA\u202c" shows as ANDERSON, "JOHN\u200b" as
# JOHN. Every value the workbench shows has them as visible marks (``visible``, the templates' finalize).
_INVISIBLE = re.compile(f"[{INVISIBLE}]")


def visible(value: Any) -> Any:
    """A value as the page shows it: each invisible character as a visible mark (<U+202E>)."""
    if type(value) is str and _INVISIBLE.search(value):  # (not Markup: the templates' own HTML)
        return _INVISIBLE.sub(lambda m: f"<U+{ord(m.group()):04X}>", value)
    return value


REASON_TEXT: dict[str, str] = {
    Reason.ABOVE_UPPER: "The best candidate scores at or above the link threshold.",
    Reason.BETWEEN: "The best candidate scores between the review and the link thresholds: "
                    "too close to call automatically.",
    Reason.BELOW_LOWER: "No candidate scores even the review threshold.",
    Reason.NO_CANDIDATES: "No other record shares a blocking key (name, birth date, SSN or phone) with this one.",
    Reason.SAME_FACILITY: "A candidate is another record of the same facility: a possible duplicate registration, "
                          "which is never linked automatically (the facility fixes it with a merge, A40).",
    Reason.TWO_PERSONS: "Two different persons score at or above the link threshold: it is not clear which one.",
    Reason.NOT_A_MATCH: "A person was left out because one of its records is marked not a match for this one "
                        "(by a technician, or by the facility with A37).",
    Reason.MANUAL_KEPT: "A technician made or confirmed this record's link; it is kept.",
    Reason.LINK_KEPT: "The record stays with its person.",
    Reason.LINK_LOOKS_WRONG: "The record's present link looks wrong: since an update it no longer scores "
                             "like the other records of its person.",
    Reason.POSSIBLE_TWIN: "Possible twins: the same surname and birth date but another given or middle name "
                          "(John Paul and John Michael), and no SSN that tells them apart (or SSNs one digit "
                          "apart and one phone).",
    Reason.SSN_ONLY: "One SSN on two people, possibly a relative's: birth dates further apart than a typo, "
                     "JR against SR, or another given name with another birth date or sex.",
    Reason.NO_BIRTH_DATE: "No birth date on one side and no SSN or phone agreeing (or a JR/SR suffix): "
                          "only names and places agree.",
    Reason.PARENT_AND_CHILD: "Possibly a parent and a child: birth dates one digit apart in the decade "
                             "(like 1950 and 1980) and no SSN agreeing.",
    Reason.NEWBORN: "A newborn's placeholder name (\"Baby Girl\", \"Infant\"): newborn twins share everything "
                    "else.",
    Reason.NAME_AND_BIRTH_DATE_ONLY: "Only a common name and the birth date agree, in another town, with no SSN, "
                                     "phone or address agreeing: possibly two different people.",
    Reason.CONFLICTING_MEMBER: "Another record of that person does not even come close to this one "
                               "(A is like B and B like C, but A is not like C).",
    Reason.SHARED_HOME: "The home (address, phone) would link them, but their own details differ the way two "
                        "people of one home do (another surname with a birth date a typo apart, or two such "
                        "differences): a married woman with a typo, or two residents of one care home.",
    MERGE_CONFLICT: "A facility's merge (A40) was stopped: records of the two persons are marked not a match.",
}

# The rules that hold a record back from a person it scores at or above the link threshold with,
# the family-safety ones first (the most telling is named when there are several).
HOLD_BACK = (
    Reason.NEWBORN, Reason.POSSIBLE_TWIN, Reason.PARENT_AND_CHILD, Reason.SSN_ONLY, Reason.NO_BIRTH_DATE,
    Reason.NAME_AND_BIRTH_DATE_ONLY, Reason.SHARED_HOME, Reason.CONFLICTING_MEMBER, Reason.SAME_FACILITY,
    Reason.TWO_PERSONS, Reason.LINK_LOOKS_WRONG, MERGE_CONFLICT,
)
# Reasons that say where a score fell or what was kept: never why a link was held back.
NOT_HOLDING = frozenset({Reason.ABOVE_UPPER, Reason.BETWEEN, Reason.BELOW_LOWER, Reason.NO_CANDIDATES,
                         Reason.MANUAL_KEPT, Reason.LINK_KEPT, Reason.NOT_A_MATCH})


# -- links and redirects -------------------------------------------------------------


def safe_next(value: str | None, default: str = DEFAULT_PAGE) -> str:
    """Where to go after logging in: ``value`` if it is a path on this site, else ``default``.

    Only ``/...`` in printable ASCII (a request's raw URI); never ``//host`` or ``/\\host``
    (other sites to a browser), backslashes, or the login and logout pages themselves.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_NEXT_CHARS:
        return default
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    if any(not 0x21 <= ord(c) <= 0x7E for c in value):
        return default
    path = value.split("?", 1)[0].split("#", 1)[0]
    if path in ("/login", "/logout"):
        return default
    return value


UNSAVED = "unsaved"  # a query field: the last form was posted without a live session and NOT acted on


def login_location(uri: str, *, unsaved: bool = False) -> str:
    """``/login?next=...`` for a request's raw URI (``next`` only when it is a local path);
    ``unsaved``: the request was a form the workbench did not act on (the session had expired),
    which the login page and the page after it say."""
    target = safe_next(uri, default="")
    query = [f"next={quote(target, safe='')}"] if target and target != DEFAULT_PAGE else []
    if unsaved:
        query.append(f"{UNSAVED}=1")
    return "/login" + ("?" + "&".join(query) if query else "")


def with_unsaved(path: str) -> str:
    """``path`` (a safe local one) marked so that its page says the last decision was not saved."""
    path, hash_, fragment = path.partition("#")
    query = path.partition("?")[2]
    if f"{UNSAVED}=1" not in query.split("&"):
        path += ("&" if "?" in path else "?") + f"{UNSAVED}=1"
    return path + hash_ + fragment


def segment(value: Any) -> str:
    """One URL path segment (``/`` and everything else reserved, percent-encoded)."""
    return quote(str(value), safe="")


def record_href(facility: str, mrn: str) -> str:
    return f"/records/{segment(facility)}/{segment(mrn)}"


def person_href(person: int | None) -> str | None:
    return None if person is None else f"/persons/{int(person)}"


def review_href(review: int | None) -> str | None:
    return None if review is None else f"/reviews/{int(review)}"


# -- text ------------------------------------------------------------------------------


def when(value: datetime | str | None) -> str:
    """A time for people: ``2026-11-27 12:00:00 UTC`` (from an aware datetime or the API's ISO text)."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


_DATE = re.compile(r"\d{4}(?:-\d{2}(?:-\d{2})?)?")  # YYYY, YYYY-MM or YYYY-MM-DD: the precision sent


def sender_time(value: str | None, facility: str) -> str:
    """A time a facility sent (``admitted_at``, ``death``: the record model's ISO text with its
    precision): with an offset, in UTC like every other time of the workbench; without one, as
    sent and said to be the facility's local time (its zone is not known here); a date (or a
    month, a year) as it is."""
    if not value:
        return ""
    if _DATE.fullmatch(value):
        return value
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if at.tzinfo is not None:
        return when(at)
    shown = at.strftime("%Y-%m-%d %H:%M:%S" if at.second or at.microsecond else "%Y-%m-%d %H:%M")
    return f"{shown} local time at {facility}"


def birth_text(value: str | None) -> str:
    """A birth date is a date: ``1980-01-02`` (or ``1980-01``, ``1980``: the precision sent), without
    the time of day some senders add to PID-7."""
    if not value:
        return ""
    m = _DATE.match(value)
    return m[0] if m and (len(value) == len(m[0]) or value[len(m[0])] in "T ") else value


def location_text(value: str | None) -> str:
    """PV1-3 (point of care^room^bed^facility) readably: ``W2 / 202 / B``; a component left empty
    before a given one is a dash, so each keeps its place."""
    if not value:
        return ""
    parts = [p.strip() for p in value.split("^")]
    while parts and not parts[-1]:
        parts.pop()
    return " / ".join(p or "–" for p in parts)


# HL7 table 0004, patient class (PV1-2)
PATIENT_CLASSES = {
    "E": "emergency", "I": "inpatient", "O": "outpatient", "P": "preadmit", "R": "recurring patient",
    "B": "obstetrics", "C": "commercial account", "N": "not applicable", "U": "unknown",
}


def patient_class_text(code: str | None) -> str:
    """``I (inpatient)``; a code outside table 0004 as it is."""
    if not code:
        return ""
    meaning = PATIENT_CLASSES.get(code.strip().upper())
    return f"{code} ({meaning})" if meaning else code


def number(value: Any, digits: int = 2) -> str:
    return "" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.{digits}f}"


def weight_text(weight: Any) -> str:
    """A field's weight in bits, signed: ``+4.06``, ``-2.10``, ``0.00``; empty when unknown."""
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        return ""
    return "0.00" if round(weight, 2) == 0 else f"{weight:+.2f}"


def tone(level: str | None, weight: Any) -> str:
    """How a cell looks: ``agree`` (counts for), ``disagree`` (against), ``missing`` or ``neutral``."""
    if level in (None, "", "missing"):
        return "missing"
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        if weight > 0:
            return "agree"
        if weight < 0:
            return "disagree"
    return "neutral"


def name_text(name: Mapping[str, Any] | None) -> str:
    """``FAMILY, GIVEN MIDDLE SUFFIX`` (prefix first when there is one)."""
    if not name:
        return ""
    given = " ".join(x for x in (name.get("prefix"), name.get("given"), name.get("middle"), name.get("suffix")) if x)
    family = name.get("family") or ""
    return f"{family}, {given}" if family and given else family or given


def address_text(address: Mapping[str, Any] | None) -> str:
    if not address:
        return ""
    street = " ".join(x for x in (address.get("street"), address.get("other")) if x)
    place = " ".join(x for x in (address.get("city"), address.get("state"), address.get("postal_code")) if x)
    return ", ".join(x for x in (street, place, address.get("country")) if x)


def phones_text(phones: Iterable[Mapping[str, Any]] | None) -> str:
    return ", ".join(p.get("number") or p.get("email") or "" for p in phones or () if p.get("number") or p.get("email"))


def ssn_text(last4: str | None) -> str:
    return f"***-**-{last4}" if last4 else ""


@dataclass(frozen=True, slots=True)
class ReasonLine:
    code: str  # as stored (an unknown code, or a free-text reason, is shown as it is)
    text: str


def reason_line(code: Any) -> ReasonLine:
    code = str(code)
    return ReasonLine(code, REASON_TEXT.get(code, code))


def held_back(reasons: Iterable[Any]) -> ReasonLine | None:
    """Why a review scoring at or above the link threshold is not a link: the most telling
    hold-back rule among ``reasons``, else the first reason that is not a score's band
    (a free-text one: a merge's conflict); None when none says so."""
    codes = [str(r) for r in reasons]
    for rule in HOLD_BACK:
        if rule in codes:
            return reason_line(rule)
    other = next((c for c in codes if c not in NOT_HOLDING), None)
    return None if other is None else reason_line(other)


# -- the review queue ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordRef:
    facility: str
    mrn: str
    href: str


def _ref(item: Mapping[str, Any]) -> RecordRef:
    return RecordRef(item["facility"], item["mrn"], record_href(item["facility"], item["mrn"]))


@dataclass(frozen=True, slots=True)
class QueueRow:
    id: int
    href: str
    state: str
    kind: str
    score: str
    record: RecordRef
    candidates: tuple[RecordRef, ...]
    reasons: str
    created_at: str


@dataclass(frozen=True, slots=True)
class QueuePage:
    state: str
    states: tuple[str, ...]
    rows: tuple[QueueRow, ...]
    next_href: str | None  # the next page, when there are more reviews after this one
    first_href: str | None  # the first page, when this one is not it


def queue_href(state: str, after: int | None = None) -> str:
    return f"/reviews?state={segment(state)}" + (f"&after={int(after)}" if after is not None else "")


def queue_page(rows: Sequence[Mapping[str, Any]], state: str, *, more: bool, after: int | None = None) -> QueuePage:
    """``/reviews``: the reviews of one state (``list_reviews``'s rows), oldest first, a page at a time.

    ``more``: whether reviews follow the last of ``rows`` (the caller read one more than it shows);
    ``after``: the id this page starts after (None on the first page)."""
    out = []
    for r in rows:
        record, *candidates = r["records"]
        out.append(QueueRow(
            id=r["id"], href=review_href(r["id"]) or "", state=r["state"], kind=r["kind"], score=number(r["score"]),
            record=_ref(record), candidates=tuple(_ref(c) for c in candidates),
            reasons=", ".join(r.get("reasons") or ()), created_at=when(r.get("created_at")),
        ))
    return QueuePage(state=state, states=REVIEW_STATES, rows=tuple(out),
                     next_href=queue_href(state, out[-1].id) if more and out else None,
                     first_href=queue_href(state) if after is not None else None)


# -- one review ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """One record of a review, as it is now."""

    facility: str
    mrn: str
    href: str
    exists: bool
    person: int | None
    person_href: str | None
    link: str | None
    person_at_review: int | None
    score: str  # a candidate's total against the review's record; "" for the record itself
    band: str  # where that total falls: link / held (at or above the link threshold, held back) / review / below
    rules: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Cell:
    value: str
    level: str
    weight: str
    tone: str
    discounted: bool


@dataclass(frozen=True, slots=True)
class FieldRow:
    field: str
    label: str
    record: str  # the review's record's value
    cells: tuple[Cell, ...]  # each candidate's value, level and weight


@dataclass(frozen=True, slots=True)
class Target:
    """A choice of the link form: whose person the record joins."""

    value: str  # the form value (see parse_target)
    label: str
    checked: bool


@dataclass(frozen=True, slots=True)
class PastDecision:
    id: int
    kind: str
    actor: str
    at: str
    reason: str
    undone_by: int | None


@dataclass(frozen=True, slots=True)
class ReviewPage:
    id: int
    state: str
    is_open: bool
    kind: str
    created_at: str
    score: str
    upper: str
    lower: str
    band: str  # link / held / review / below (see Side.band)
    held_back: ReasonLine | None  # why a score at or above the link threshold is a review, not a link
    reasons: tuple[ReasonLine, ...]
    record: Side
    candidates: tuple[Side, ...]
    rows: tuple[FieldRow, ...]
    any_discounted: bool
    targets: tuple[Target, ...]
    decision: str | None
    decided_by: str | None
    decided_at: str
    note: str | None
    decision_id: int | None  # the decision in force (undo it)
    decisions: tuple[PastDecision, ...]
    can_decide: bool
    can_undo: bool


def band(score: Any, upper: Any, lower: Any) -> str:
    """``link`` (at or above the upper threshold), ``review`` (between) or ``below``; "" if unknown."""
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (score, upper, lower)):
        return ""
    return "link" if score >= upper else "review" if score >= lower else "below"


def _held(where: str, held: ReasonLine | None) -> str:
    """A band of a held-back review: at or above the link threshold is ``held``, not ``link``."""
    return "held" if where == "link" and held is not None else where


def _side(s: Mapping[str, Any], upper: Any, lower: Any, held: ReasonLine | None = None) -> Side:
    score = s.get("score")
    return Side(
        facility=s["facility"], mrn=s["mrn"], href=record_href(s["facility"], s["mrn"]), exists=bool(s.get("exists")),
        person=s.get("person"), person_href=person_href(s.get("person")), link=s.get("link"),
        person_at_review=s.get("person_at_review"), score=number(score), band=_held(band(score, upper, lower), held),
        rules=tuple(s.get("rules") or ()),
    )


def target_value(kind: str, *parts: str | int) -> str:
    """``suggested``, ``candidate:FACILITY:MRN`` (each part percent-encoded) or ``person``."""
    return ":".join([kind] + [segment(p) for p in parts])


def parse_target(value: str | None) -> tuple[str, Any] | None:
    """A link form's choice back: ("suggested", None), ("candidate", (facility, mrn)),
    ("person", None: the id is its own field); None when malformed."""
    if value == "suggested":
        return ("suggested", None)
    if value == "person":
        return ("person", None)
    if isinstance(value, str) and value.startswith("candidate:"):
        parts = value.split(":")
        if len(parts) == 3 and parts[1] and parts[2]:
            return ("candidate", (unquote(parts[1]), unquote(parts[2])))
    return None


def _targets(detail: Mapping[str, Any]) -> tuple[Target, ...]:
    out = []
    suggested = detail.get("person")
    if suggested is not None:
        out.append(Target("suggested", f"the suggested person {suggested}", True))
    for c in detail.get("candidates") or ():
        if c.get("exists"):
            who = f"person {c['person']}" if c.get("person") is not None else "its person"
            out.append(Target(target_value("candidate", c["facility"], c["mrn"]),
                              f"{c['facility']} {c['mrn']}'s person ({who})", not out))
    out.append(Target("person", "another person, by id:", not out))
    return tuple(out)


def review_page(detail: Mapping[str, Any], *, can_decide: bool, can_undo: bool) -> ReviewPage:
    """``/reviews/{id}`` from ``exchange.store.reviews.review_detail``: the records side by side,
    every compared field's values with each candidate's agreement level and weight, the totals
    against the thresholds, and what a technician may do."""
    thresholds = detail.get("thresholds") or {}
    upper, lower = thresholds.get("upper"), thresholds.get("lower")
    rows = []
    for entry in detail.get("comparison") or ():
        cells = tuple(
            Cell(value=c.get("value") or "", level=c.get("level") or "", weight=weight_text(c.get("weight")),
                 tone=tone(c.get("level"), c.get("weight")), discounted=bool(c.get("discounted")))
            for c in entry.get("candidates") or ()
        )
        if entry["field"] == "birth":
            cells = tuple(replace(c, value=birth_text(c.value)) for c in cells)
            value = birth_text(entry.get("record"))
        else:
            value = entry.get("record") or ""
        rows.append(FieldRow(field=entry["field"], label=FIELD_LABELS.get(entry["field"], entry["field"]),
                             record=value, cells=cells))
    is_open = detail.get("state") == ReviewState.OPEN
    reasons = tuple(detail.get("reasons") or ())
    where = band(detail.get("score"), upper, lower)
    held = held_back(reasons) if where == "link" else None
    return ReviewPage(
        id=detail["id"], state=detail["state"], is_open=is_open, kind=detail.get("kind") or "",
        created_at=when(detail.get("created_at")), score=number(detail.get("score")), upper=number(upper),
        lower=number(lower), band=_held(where, held), held_back=held,
        reasons=tuple(reason_line(r) for r in reasons),
        record=_side(detail["record"], upper, lower),
        candidates=tuple(_side(c, upper, lower, held) for c in detail.get("candidates") or ()),
        rows=tuple(rows),
        any_discounted=any(c.discounted for r in rows for c in r.cells),
        targets=_targets(detail) if is_open else (),
        decision=detail.get("decision"), decided_by=detail.get("decided_by"), decided_at=when(detail.get("decided_at")),
        note=detail.get("note"), decision_id=detail.get("decision_id"),
        decisions=tuple(PastDecision(d["id"], d["kind"], d["actor"], when(d.get("at")), d.get("reason") or "",
                                     d.get("undone_by")) for d in detail.get("decisions") or ()),
        can_decide=can_decide and is_open, can_undo=can_undo,
    )


# -- a person -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BestRow:
    label: str
    value: str
    source: RecordRef | None
    updated_at: str


@dataclass(frozen=True, slots=True)
class PersonRecord:
    facility: str
    authority: str
    mrn: str
    href: str
    active: bool
    link: str
    score: str
    updated_at: str
    can_split: bool


@dataclass(frozen=True, slots=True)
class HistoryRow:
    id: int
    decision: int
    kind: str
    at: str
    actor: str
    record: RecordRef
    from_person: int | None
    to_person: int | None
    from_link: str
    to_link: str
    score: str
    reason: str
    review_href: str | None
    review: int | None
    undone_by: int | None
    undoable: bool  # the first event of a technician's decision in force


@dataclass(frozen=True, slots=True)
class OptOutRow:
    at: str
    change: str  # "set" / "lifted"
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class PersonPage:
    id: int
    merged_into: int | None
    merged_into_href: str | None
    created_at: str
    protected: bool
    protected_by: str | None
    office_hold: bool  # a technician's or admin's hold stands (the records office's: no facility's N lifts it)
    opt_out_history: tuple[OptOutRow, ...]
    best: tuple[BestRow, ...]
    records: tuple[PersonRecord, ...]
    history: tuple[HistoryRow, ...]
    can_decide: bool


def _best_value(name: str, value: Any) -> str:
    if name == "name":
        return name_text(value)
    if name == "address":
        return address_text(value)
    if name == "phones":
        return phones_text(value)
    if name == "ssn_last4":
        return ssn_text(value)
    if name == "birth_date":
        return birth_text(value)
    return "" if value is None else str(value)


def person_page(view: Mapping[str, Any], history: Mapping[str, Any] | None, *, can_decide: bool) -> PersonPage:
    """``/persons/{id}`` from ``person_view`` and ``person_history``: the best view with where each
    value came from, the records and how they are linked, every link event, and the decisions."""
    best = []
    for name, label in BEST_LABELS.items():
        item = (view.get("best") or {}).get(name)
        if item is None:
            best.append(BestRow(label, "", None, ""))
        else:
            best.append(BestRow(label, _best_value(name, item.get("value")),
                                _ref(item) if item.get("facility") else None, when(item.get("updated_at"))))
    active = [r for r in view.get("records") or () if r.get("active")]
    records = tuple(
        PersonRecord(facility=r["facility"], authority=r.get("authority") or "", mrn=r["mrn"],
                     href=record_href(r["facility"], r["mrn"]), active=bool(r.get("active")), link=r.get("link") or "",
                     score=number(r.get("score")), updated_at=when(r.get("updated_at")),
                     can_split=can_decide and bool(r.get("active")) and len(active) > 1)
        for r in view.get("records") or ()
    )
    rows = []
    for e in (history or {}).get("events") or ():
        rows.append(HistoryRow(
            id=e["id"], decision=e["decision"], kind=e["kind"], at=when(e.get("at")), actor=e.get("actor") or "",
            record=_ref(e), from_person=e.get("from_person"), to_person=e.get("to_person"),
            from_link=e.get("from_link") or "", to_link=e.get("to_link") or "", score=number(e.get("score")),
            reason=e.get("reason") or "", review=e.get("review"), review_href=review_href(e.get("review")),
            undone_by=e.get("undone_by"),
            undoable=can_decide and e["id"] == e["decision"] and e["kind"] in UNDOABLE and e.get("undone_by") is None,
        ))
    opt_out = view.get("opt_out") or {}
    merged_into = view.get("merged_into")
    return PersonPage(
        id=view["person"], merged_into=merged_into, merged_into_href=person_href(merged_into),
        created_at=when(view.get("created_at")), protected=bool(opt_out.get("protected")),
        protected_by=opt_out.get("by"),
        office_hold=any(not h.startswith(PD1) for h in opt_out.get("holds") or ()),
        opt_out_history=tuple(OptOutRow(when(e.get("at")), "set" if e.get("protected") else "lifted",
                                        e.get("by") or "", e.get("reason") or "")
                              for e in opt_out.get("history") or ()),
        best=tuple(best), records=records, history=tuple(rows),
        can_decide=can_decide and merged_into is None,
    )


# -- a facility record -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncounterRow:
    visit_number: str
    patient_class: str  # "I (inpatient)"
    status: str
    location: str  # "W2 / 202 / B"
    admitted_at: str
    discharged_at: str


def encounter_row(e: Mapping[str, Any], facility: str) -> EncounterRow:
    return EncounterRow(
        visit_number=e.get("visit_number") or "", patient_class=patient_class_text(e.get("class")),
        status=e.get("status") or "", location=location_text(e.get("location")),
        admitted_at=sender_time(e.get("admitted_at"), facility),
        discharged_at=sender_time(e.get("discharged_at"), facility),
    )


@dataclass(frozen=True, slots=True)
class RecordPage:
    facility: str
    authority: str
    mrn: str
    person: int | None
    person_href: str | None
    active: bool
    merged_into: RecordRef | None
    name: str
    aliases: tuple[str, ...]
    birth_date: str
    sex: str
    deceased: str
    addresses: tuple[str, ...]
    phones: tuple[str, ...]
    identifiers: tuple[str, ...]
    encounters: tuple[EncounterRow, ...]
    documents: tuple[Mapping[str, Any], ...]


def record_page(view: Mapping[str, Any]) -> RecordPage:
    """``/records/{facility}/{mrn}`` from ``exchange.store.records.record_view``."""
    facility = view["facility"]
    merged = view.get("merged_into")
    death = view.get("death")
    deceased = "yes" + (f", {sender_time(death, facility)}" if death else "") if view.get("deceased") or death else ""
    return RecordPage(
        facility=facility, authority=view.get("authority") or "", mrn=view["mrn"], person=view.get("person"),
        person_href=person_href(view.get("person")), active=bool(view.get("active")),
        merged_into=RecordRef(facility, merged, record_href(facility, merged)) if merged else None,
        name=name_text(view.get("name")), aliases=tuple(name_text(a) for a in view.get("aliases") or () if a),
        birth_date=birth_text(view.get("birth_date")), sex=view.get("sex") or "", deceased=deceased,
        addresses=tuple(t for t in (address_text(a) for a in view.get("addresses") or ()) if t),
        phones=tuple(p.get("number") or p.get("email") for p in view.get("phones") or ()
                     if p.get("number") or p.get("email")),
        identifiers=tuple(" ".join(x for x in (i.get("value"), i.get("authority"), i.get("type")) if x)
                          for i in view.get("identifiers") or ()),
        encounters=tuple(encounter_row(e, facility) for e in view.get("encounters") or ()),
        documents=tuple(view.get("documents") or ()),
    )


# -- deliveries ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: int
    destination: str
    state: str
    attempts: int
    last_error: str
    control_id: str
    created_at: str
    next_attempt_at: str
    delivered_at: str
    message: str  # the inbound message: facility, control id, type
    person: int | None
    person_href: str | None
    record: RecordRef | None
    reason: str
    retried: str
    can_retry: bool


def delivery_rows(views: Iterable[Any], *, can_retry: bool) -> tuple[DeliveryRow, ...]:
    """Rows of ``/deliveries`` from ``exchange.store.outbox.DeliveryView`` values."""
    out = []
    for d in views:
        kind = f"{d.message_type}^{d.event}" if d.event else d.message_type
        out.append(DeliveryRow(
            id=d.id, destination=d.destination, state=d.state.value, attempts=d.attempts,
            last_error=d.last_error or "", control_id=d.control_id, created_at=when(d.created_at),
            next_attempt_at=when(d.next_attempt_at) if d.state is DeliveryState.QUEUED else "",
            delivered_at=when(d.delivered_at),
            message=" ".join(x for x in (d.message_facility, d.message_control_id, kind) if x),
            person=d.person_id, person_href=person_href(d.person_id),
            record=RecordRef(d.facility, d.mrn, record_href(d.facility, d.mrn)) if d.facility and d.mrn else None,
            reason=d.reason or "",
            retried=f"{d.retried_by} at {when(d.retried_at)}" if d.retried_by else "",
            can_retry=can_retry and d.state is DeliveryState.FAILED,
        ))
    return tuple(out)
