"""The technician side of the patient index: the review queue, decisions, undo,
the person's best view and the links export (issue 4).

The writer (``exchange.store.index``) links records automatically and opens
``match_review`` rows; technicians decide them here, through the API
(``exchange.web.api``) or the CLI (``exchange reviews ...``). Every function
takes a ``Connection`` inside the caller's transaction (nothing here commits)
and returns plain JSON-ready dicts. A refused decision raises
:class:`DecisionError` (its ``status`` is the HTTP code: 404, 409, 422)
before anything is written.

Decisions, each written to ``link_event`` with who (``actor``: the token's
name), when and why, one row per record it touches. The first row of a
decision is its id (its ``decision`` column is NULL), the others point to
it; a decision that moves no record still writes one row (from = to), so
every decision can be found, shown and undone:

``link``         a review's record joins the chosen person (the suggestion, a
                 candidate's person or a person named); link ``manual``.
``not-a-match``  sticky pairs (``match_pair``, both ways round, active)
                 between the review's record and each of its candidates; if
                 it shares a person with one, it gets a new person
                 (``manual``).
``split``        a record leaves its person for a new one (``manual``), with
                 sticky pairs against every active record it leaves.
``merge``        every record of one person moves to the other (``manual``);
                 ``person.merged_into`` is set. The open reviews it answers
                 (their record and every candidate now in the kept person,
                 brought together by the merge) are superseded, noted with
                 the decision; its undo opens them again.
``undo``         every record of a decision goes back to its ``from_person``
                 (followed through later merges) and ``from_link``; the
                 decision's pairs are deactivated, its review reopened and
                 its rows marked ``undone_by``. A person it leaves without
                 records answers ``merged_into`` the person they went back
                 to. A record back with an automatic link is scored again
                 against its person (the record may have changed since);
                 below the upper threshold a ``link_looks_wrong`` review
                 opens (the link stays: the undo was asked for). Refused
                 (409) when a record has moved since: decide again instead.

What the writer reads back: ``patient_record.link`` ``manual`` (never
broken automatically) and active ``match_pair`` rows (never linked
automatically). Two records of one facility never end up in one person by a
technician's decision unless ``force`` is given (409 otherwise), nor two
records a technician (or an A37) said are not a match.

The person's best view (:func:`person_view`): for each field, the value from
the person's active records of the most trusted facility kind
(``server.trust``), the most recently updated among them, with the facility,
MRN and ``updated_at`` it came from. Only the last four SSN digits are shown.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, and_, false, func, insert, or_, select, update
from sqlalchemy.exc import OperationalError

from exchange.config import DEFAULT_TRUST, Config
from exchange.mapping.values import PersonName, Phone, Timestamp, primary_address
from exchange.matching.compare import FIELD_NAMES
from exchange.matching.decide import Action, Decision, Reason, Record, decide
from exchange.matching.features import Features
from exchange.matching.model import Model, score
from exchange.store.consent import carry_opt_outs, holds_of, retire_emptied, settle_undone_holds, shown, stored_holds
from exchange.store.db import LOCK_NOT_AVAILABLE, hold_links, sqlstate
from exchange.store.index import review_candidate, stored_features, stored_model
from exchange.store.records import from_json
from exchange.store.schema import (
    ACTOR_LEN,
    MAX_MERGE_HOPS,
    link_event_table as link_event,
    match_pair_table as match_pair,
    match_review_table as match_review,
    opt_out_event_table as opt_out_event,
    patient_record_table as patient_record,
    person_table as person,
)

AUTOMATIC_ACTOR = "exchange"  # link_event.actor of the writer's decisions; no technician may use it
MAX_REASON_CHARS = 2000
MAX_PAGE = 1000
MAX_CANDIDATES = 20  # candidates a review opened here shows (the best ones)

Key = tuple[str, str]  # (facility, mrn)


class Link(StrEnum):
    """How a record came to its person (``patient_record.link``)."""

    AUTO = "auto"  # the writer's automatic decision
    MANUAL = "manual"  # a technician's decision: never broken automatically
    SOURCE = "source"  # its facility asserted it (A24/A37)


class ReviewState(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"
    SUPERSEDED = "superseded"  # the record changed and was matched again: a newer review replaces it


class Verdict(StrEnum):
    """A technician's answer to a review (``match_review.decision``)."""

    LINK = "link"
    NOT_A_MATCH = "not-a-match"


class Kind(StrEnum):
    """``link_event.kind`` of the technician's decisions (the writer's are ``auto`` and ``source``)."""

    LINK = "link"
    NOT_A_MATCH = "not-a-match"
    SPLIT = "split"
    MERGE = "merge"
    UNDO = "undo"


UNDOABLE = frozenset({Kind.LINK, Kind.NOT_A_MATCH, Kind.SPLIT, Kind.MERGE})


class DecisionError(Exception):
    """A decision refused before anything was written: ``status`` (404, 409, 422; 503 busy) and a one-line
    reason."""

    def __init__(self, status: int, reason: str, records: Sequence[Key] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.records = tuple(records)  # the (facility, mrn) the reason names: audited with the refusal


DECISION_WAIT_MS = 2000  # PostgreSQL: how long a decision waits for the batches in flight


def _hold_links(conn: Connection) -> None:
    """The links lock, exclusively, for the decision's transaction (``db.hold_links``), waited for
    at most DECISION_WAIT_MS: batches asking for it queue behind a decision that waits, so a batch
    that never finishes (its node stopped mid-transaction) must not hold every node's writer up
    behind the decision for longer than that. Busy: 503, nothing decided, the technician tries
    again."""
    if conn.dialect.name != "postgresql":
        return
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {DECISION_WAIT_MS}")
    try:
        hold_links(conn, exclusive=True)
    except OperationalError as exc:
        if sqlstate(exc) == LOCK_NOT_AVAILABLE:
            raise DecisionError(503, "the patient index is busy (a batch of messages did not finish in"
                                     f" {DECISION_WAIT_MS / 1000:g} s): nothing was decided; try again") from None
        raise
    conn.exec_driver_sql("SET LOCAL lock_timeout = DEFAULT")


def _not_found(reason: str, *records: Key) -> DecisionError:
    return DecisionError(404, reason, records)


def _conflict(reason: str, *records: Key) -> DecisionError:
    return DecisionError(409, reason, records)


def _invalid(reason: str, *records: Key) -> DecisionError:
    return DecisionError(422, reason, records)


# --- trust (survivorship) ----------------------------------------------------------------


@dataclass(frozen=True)
class Trust:
    """Which facility's value the person's best view prefers: ``order`` of
    facility kinds (most trusted first) and each facility code's kind."""

    order: tuple[str, ...] = DEFAULT_TRUST
    kinds: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> Trust:
        return cls(config.server.trust, {f.code: f.kind for f in config.facilities})

    def rank(self, facility: str) -> int:
        """0 for the most trusted kind; kinds not listed and unknown facilities after all listed."""
        kind = self.kinds.get(facility)
        return self.order.index(kind) if kind in self.order else len(self.order)


# --- reading records -----------------------------------------------------------------------

_RECORD_COLUMNS = (
    patient_record.c.id,
    patient_record.c.facility,
    patient_record.c.mrn,
    patient_record.c.authority,
    patient_record.c.person_id,
    patient_record.c.active,
    patient_record.c.merged_into_mrn,
    patient_record.c.link,
    patient_record.c.link_score,
    patient_record.c.updated_at,
)


def _key_filter(keys: Sequence[Key]):
    return or_(*(and_(patient_record.c.facility == f, patient_record.c.mrn == m) for f, m in keys)) if keys else false()


def _records_by_key(conn: Connection, keys: Sequence[Key], *, data: bool = False, lock: bool = False) -> dict[Key, Any]:
    if not keys:
        return {}
    columns = _RECORD_COLUMNS + ((patient_record.c.data,) if data else ())
    query = select(*columns).where(_key_filter(list(dict.fromkeys(keys))))
    if lock:
        query = query.with_for_update()
    return {(r.facility, r.mrn): r for r in conn.execute(query)}


def _records_of(conn: Connection, person_ids: Sequence[int], *, data: bool = False, lock: bool = False) -> list:
    if not person_ids:
        return []
    columns = _RECORD_COLUMNS + ((patient_record.c.data,) if data else ())
    query = select(*columns).where(patient_record.c.person_id.in_(list(person_ids))).order_by(patient_record.c.id)
    if lock:
        query = query.with_for_update()
    return list(conn.execute(query))


def _person_row(conn: Connection, person_id: int, *, lock: bool = False):
    query = select(person.c.id, person.c.merged_into, person.c.created_at, person.c.protected,
                   person.c.protected_by).where(person.c.id == person_id)
    if lock:
        query = query.with_for_update()
    return conn.execute(query).first()


def _live_person(conn: Connection, person_id: int | None) -> int | None:
    """``person_id`` followed through ``merged_into`` to the person that holds its records now."""
    seen = 0
    while person_id is not None and seen < MAX_MERGE_HOPS:
        row = _person_row(conn, person_id)
        if row is None or row.merged_into is None:
            return person_id
        person_id, seen = row.merged_into, seen + 1
    return person_id


def _as_person_id(value: Any) -> int | None:
    """A person id from review JSON (the writer's ints, or digit strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


# --- demographics -------------------------------------------------------------------------


def _name(name: Any) -> dict[str, str] | None:
    if not isinstance(name, PersonName) or name.is_empty:
        return None
    return {"family": name.family, "given": name.given, "middle": name.middle, "suffix": name.suffix,
            "prefix": name.prefix}


def _address(addresses: Any) -> dict[str, str] | None:
    a = primary_address(addresses)
    if a is None:
        return None
    return {"street": a.street, "other": a.other, "city": a.city, "state": a.state,
            "postal_code": a.postal_code, "country": a.country}


def _phones(phones: Any) -> list[dict[str, str]] | None:
    out = [{"number": p.number, "use": p.use, "email": p.email}
           for p in phones or () if isinstance(p, Phone) and (p.number or p.email)]
    return out or None


_NOT_DIGIT = re.compile(r"\D+")


def _ssn_last4(ssn: Any) -> str | None:
    digits = _NOT_DIGIT.sub("", ssn) if isinstance(ssn, str) else ""
    return digits[-4:] if len(digits) >= 4 else None


def _sex(sex: Any) -> str | None:
    value = sex.strip() if isinstance(sex, str) else ""
    return value if value and value.upper() != "U" else None  # U: unknown (table 0001)


def _birth(birth: Any) -> str | None:
    return birth.date_isoformat() if isinstance(birth, Timestamp) else None


DEMOGRAPHIC_FIELDS = ("name", "birth_date", "sex", "address", "phones", "ssn_last4")
"""The fields of a record's demographics and of the person's best view (never the full SSN)."""


def demographics(data: Any) -> dict[str, Any]:
    """A stored ``patient_record.data`` as the demographics a technician compares."""
    rec = from_json(data) if data is not None else {}
    if not isinstance(rec, dict):
        rec = {}
    return {
        "name": _name(rec.get("name")),
        "birth_date": _birth(rec.get("birth")),
        "sex": _sex(rec.get("sex")),
        "address": _address(rec.get("addresses")),
        "phones": _phones(rec.get("phones")),
        "ssn_last4": _ssn_last4(rec.get("ssn")),
    }


def _shown(field_name: str, d: dict[str, Any] | None) -> str | None:
    """One compared field (exchange.matching FIELD_NAMES) of demographics, as text."""
    if d is None:
        return None
    name = d.get("name") or {}
    if field_name in ("family", "given", "middle", "suffix"):
        return name.get(field_name) or None
    if field_name == "birth":
        return d.get("birth_date")
    if field_name == "ssn":
        return f"***-**-{d['ssn_last4']}" if d.get("ssn_last4") else None
    if field_name == "sex":
        return d.get("sex")
    if field_name == "phone":
        return ", ".join(p["number"] or p["email"] for p in d.get("phones") or ()) or None
    address = d.get("address") or {}
    if field_name == "address":
        return " ".join(x for x in (address.get("street"), address.get("other")) if x) or None
    if field_name == "place":
        return " ".join(x for x in (address.get("city"), address.get("state"), address.get("postal_code")) if x) or None
    return None


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


# --- reviews --------------------------------------------------------------------------------


def _candidates(detail: Any) -> list[dict[str, Any]]:
    cands = detail.get("candidates") if isinstance(detail, dict) else None
    return [c for c in cands or () if isinstance(c, dict) and isinstance(c.get("facility"), str)
            and isinstance(c.get("mrn"), str)]


def _summary(row: Any) -> dict[str, Any]:
    detail = row.detail if isinstance(row.detail, dict) else {}
    return {
        "id": row.id,
        "state": row.state,
        "kind": row.kind,
        "records": [{"facility": row.facility, "mrn": row.mrn}]
        + [{"facility": c["facility"], "mrn": c["mrn"]} for c in _candidates(detail)],
        "score": row.score,
        "reasons": list(detail.get("reasons") or ()),
        "person": row.person_id,
        "created_at": _iso(row.created_at),
    }


def list_reviews(conn: Connection, state: str | None = ReviewState.OPEN, *, limit: int = 100,
                 after: int | None = None) -> list[dict[str, Any]]:
    """Reviews in ``state`` (None: every state), oldest first, ``limit`` of them after id ``after``
    (the next page starts after the last id of this one)."""
    if state is not None:
        state = ReviewState(state)
    limit = max(1, min(int(limit), MAX_PAGE))
    query = select(match_review).order_by(match_review.c.id).limit(limit)
    if state is not None:
        query = query.where(match_review.c.state == state.value)
    if after is not None:
        query = query.where(match_review.c.id > after)
    return [_summary(r) for r in conn.execute(query)]


def _side(row: Any, key: Key) -> dict[str, Any]:
    """A record as it is now: its person, link and demographics (or that it no longer exists)."""
    if row is None:
        return {"facility": key[0], "mrn": key[1], "exists": False, "person": None, "link": None,
                "active": None, "demographics": None}
    return {"facility": row.facility, "mrn": row.mrn, "exists": True, "authority": row.authority,
            "person": row.person_id, "link": row.link, "link_score": row.link_score, "active": row.active,
            "updated_at": _iso(row.updated_at), "demographics": demographics(row.data)}


def review_detail(conn: Connection, review_id: int) -> dict[str, Any] | None:
    """One review with its records side by side; None when unknown.

    ``record`` and ``candidates[]`` are the records as they are now (person,
    link, demographics) plus what the writer saw (``person_at_review``, each
    candidate's ``score``, ``rules`` and per-field ``fields``: level, weight,
    term-frequency part, discounted). ``comparison`` is the same per field,
    side by side: the record's value, then each candidate's value, level and
    weight. ``decisions``: every technician decision taken on it (undone ones
    too); ``decision_id``: the one in force.
    """
    row = conn.execute(select(match_review).where(match_review.c.id == review_id)).first()
    if row is None:
        return None
    detail = row.detail if isinstance(row.detail, dict) else {}
    cands = _candidates(detail)
    key = (row.facility, row.mrn)
    now = _records_by_key(conn, [key] + [(c["facility"], c["mrn"]) for c in cands], data=True)
    record = _side(now.get(key), key)
    record["person_at_review"] = _as_person_id((detail.get("record") or {}).get("person"))
    candidates = []
    for c in cands:
        ckey = (c["facility"], c["mrn"])
        explain = c.get("explain") if isinstance(c.get("explain"), dict) else {}
        side = _side(now.get(ckey), ckey)
        side.update(person_at_review=_as_person_id(c.get("person")), score=c.get("score"),
                    rules=list(explain.get("rules") or ()), fields=list(explain.get("fields") or ()))
        candidates.append(side)
    comparison = []
    for name in FIELD_NAMES:
        entry = {"field": name, "record": _shown(name, record["demographics"]), "candidates": []}
        for c in candidates:
            f = next((x for x in c["fields"] if isinstance(x, dict) and x.get("field") == name), {})
            entry["candidates"].append({"value": _shown(name, c["demographics"]), "level": f.get("level"),
                                        "weight": f.get("weight"), "discounted": f.get("discounted", False)})
        comparison.append(entry)
    decisions = [
        {"id": e.id, "kind": e.kind, "actor": e.actor, "at": _iso(e.at), "reason": e.reason, "undone_by": e.undone_by}
        for e in conn.execute(
            select(link_event).where(link_event.c.review_id == review_id, link_event.c.decision.is_(None),
                                     link_event.c.kind.in_([k.value for k in UNDOABLE])).order_by(link_event.c.id)
        )
    ]
    in_force = [d["id"] for d in decisions if d["undone_by"] is None]
    thresholds = detail.get("thresholds") if isinstance(detail.get("thresholds"), dict) else {}
    return {
        **_summary(row),
        "facility": row.facility,
        "mrn": row.mrn,
        "thresholds": {"upper": thresholds.get("upper"), "lower": thresholds.get("lower")},
        "action": detail.get("action"),
        "message_id": row.message_id,
        "record": record,
        "candidates": candidates,
        "comparison": comparison,
        "decided_at": _iso(row.decided_at),
        "decided_by": row.decided_by,
        "decision": row.decision,
        "note": row.note,
        "decision_id": in_force[-1] if row.state == ReviewState.RESOLVED and in_force else None,
        "decisions": decisions,
    }


# --- decisions -------------------------------------------------------------------------------


def _check_actor(actor: str) -> str:
    if not isinstance(actor, str) or not actor.strip() or len(actor) > ACTOR_LEN or not actor.isprintable():
        raise _invalid(f"the actor is 1 to {ACTOR_LEN} printable characters")
    if actor == AUTOMATIC_ACTOR:
        raise _invalid(f"the actor {AUTOMATIC_ACTOR!r} is reserved for automatic decisions")
    return actor


def _check_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise _invalid(f"the reason is text of at most {MAX_REASON_CHARS} characters")
    return reason.replace("\x00", "\ufffd").strip() or None


def _check_now(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("naive datetime: decisions take timezone-aware datetimes")
    return now


class _Decision:
    """The rows of one decision: its link events (the first one's id is the decision's), pairs."""

    def __init__(self, conn: Connection, kind: Kind, actor: str, now: datetime, reason: str | None,
                 review_id: int | None = None) -> None:
        self.conn = conn
        self.kind = kind
        self.actor = actor
        self.now = now
        self.reason = reason
        self.review_id = review_id
        self.id: int | None = None

    def event(self, rec: Any, to_person: int, to_link: str, score: float | None, *,
              review_id: int | None = None) -> int:
        """One record's change (or, with its current person and link, a record the decision is about)."""
        values = {
            "decision": self.id, "kind": self.kind.value, "facility": rec.facility, "mrn": rec.mrn,
            "from_person": rec.person_id, "to_person": to_person, "from_link": rec.link, "to_link": to_link,
            "score": score, "actor": self.actor, "reason": self.reason,
            "review_id": review_id if review_id is not None else self.review_id, "at": self.now,
        }
        event_id = self.conn.execute(insert(link_event).values(**values)).inserted_primary_key[0]
        if self.id is None:
            self.id = event_id
        if (to_person, to_link) != (rec.person_id, rec.link):
            self.conn.execute(
                update(patient_record).where(patient_record.c.id == rec.id)
                .values(person_id=to_person, link=to_link, link_score=score)
            )
            carry_opt_outs(self.conn, [(rec.person_id, to_person)], self.now)
        return event_id

    def pairs(self, a: Key, others: Sequence[Key]) -> None:
        """Sticky not-a-match pairs between ``a`` and each of ``others``, both ways round."""
        assert self.id is not None, "write an event first: pairs carry the decision's id"
        rows = []
        for b in dict.fromkeys(others):
            if b != a:
                rows.append({"facility": a[0], "mrn": a[1], "other_facility": b[0], "other_mrn": b[1],
                             "active": True, "decision_id": self.id})
                rows.append({"facility": b[0], "mrn": b[1], "other_facility": a[0], "other_mrn": a[1],
                             "active": True, "decision_id": self.id})
        if rows:
            self.conn.execute(insert(match_pair), rows)

    def new_person(self) -> int:
        return self.conn.execute(insert(person).values(created_at=self.now)).inserted_primary_key[0]


def _active_pairs(conn: Connection, keys: Sequence[Key], others: Sequence[Key]) -> list[tuple[Key, Key, int | None]]:
    """Active sticky pairs from any of ``keys`` to any of ``others``: (key, other, decision)."""
    if not keys or not others:
        return []
    wanted = set(others)
    rows = conn.execute(
        select(match_pair.c.facility, match_pair.c.mrn, match_pair.c.other_facility, match_pair.c.other_mrn,
               match_pair.c.decision_id)
        .where(match_pair.c.active, or_(*(and_(match_pair.c.facility == f, match_pair.c.mrn == m) for f, m in keys)))
    )
    return [((r.facility, r.mrn), (r.other_facility, r.other_mrn), r.decision_id) for r in rows
            if (r.other_facility, r.other_mrn) in wanted]


FORCE_HINT = 'to join them anyway, force the decision ("force": true; the "even two records" box in the workbench)'


def _refuse_joining(conn: Connection, moving: Sequence[Any], staying: Sequence[Any], force: bool,
                    hint: str = FORCE_HINT) -> None:
    """409 unless ``force``: records of one facility, or a sticky not-a-match, would share a person.
    ``hint``: what the technician can do instead."""
    if force:
        return
    staying_active = [r for r in staying if r.active]
    for m in moving:
        if not m.active:
            continue
        same = [r for r in staying_active if r.facility == m.facility and r.mrn != m.mrn]
        if same:
            raise _conflict(
                f"{m.facility} {m.mrn} and {same[0].facility} {same[0].mrn} are two records of one facility "
                f"(a duplicate registration the facility merges with A40): {hint}",
                (m.facility, m.mrn), (same[0].facility, same[0].mrn))
    pairs = _active_pairs(conn, [(m.facility, m.mrn) for m in moving], [(r.facility, r.mrn) for r in staying])
    if pairs:
        (a, b, decision) = pairs[0]
        who = f"decision {decision}" if decision is not None else "the facility (A37)"
        raise _conflict(
            f"{a[0]} {a[1]} and {b[0]} {b[1]} are marked not a match by {who}: undo that, or {hint}", a, b)


def _refuse_an_emptied_person(person_id: int, records: Sequence[Any], instead: str) -> None:
    """409 when the person records would join holds no active record: its id may have gone out
    in copies as another patient's, and it must not become this one."""
    if not any(r.active for r in records):
        raise _conflict(f"person {person_id} holds no active record (its records were merged away or moved since):"
                        f" {instead} a person that does")


def _lock_review(conn: Connection, review_id: int):
    row = conn.execute(select(match_review).where(match_review.c.id == review_id).with_for_update()).first()
    if row is None:
        raise _not_found(f"no review {review_id}")
    return row


def _resolve_review(conn: Connection, review_id: int, verdict: Verdict, actor: str, now: datetime,
                    reason: str | None) -> None:
    conn.execute(
        update(match_review).where(match_review.c.id == review_id)
        .values(state=ReviewState.RESOLVED.value, decided_at=now, decided_by=actor, decision=verdict.value, note=reason)
    )


def decide_review(conn: Connection, review_id: int, verdict: Verdict | str, *, actor: str, now: datetime,
                  person_id: int | None = None, candidate: Key | None = None, reason: str | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Resolve an open review; returns the review as :func:`review_detail` shows it after.

    ``link``: the review's record joins ``person_id``, else ``candidate``'s
    person (a (facility, mrn) of the review's candidates), else the
    review's suggestion (followed through merges); link ``manual``. Linking
    to the person it is in already confirms the link (it becomes manual).
    ``not-a-match``: sticky pairs against every candidate; a new person if
    it shares one with any of them.

    Refused (409) when the review's record, or the candidate named, was
    merged away by its facility (A40), and when the person a link joins
    holds no active record: the facility's merge has answered it.
    """
    _hold_links(conn)  # no writer batch in flight re-writes what this decides
    try:
        verdict = Verdict(verdict)
    except ValueError:
        raise _invalid(f"the decision is one of {', '.join(v.value for v in Verdict)}") from None
    actor, reason, now = _check_actor(actor), _check_reason(reason), _check_now(now)
    review = _lock_review(conn, review_id)
    if review.state != ReviewState.OPEN:
        by = f" by {review.decided_by}" if review.decided_by else ""
        raise _conflict(f"review {review_id} is {review.state}{by}, not open")
    detail = review.detail if isinstance(review.detail, dict) else {}
    cands = _candidates(detail)
    key = (review.facility, review.mrn)
    rec = _records_by_key(conn, [key], lock=True).get(key)
    if rec is None:
        raise _conflict(f"the review's record {key[0]} {key[1]} no longer exists", key)
    if not rec.active:  # its facility merged it away: the survivor's person is where it belongs
        raise _conflict(f"the review's record {key[0]} {key[1]} was merged away by its facility: nothing to decide",
                        key)
    d = _Decision(conn, Kind(verdict.value), actor, now, reason, review_id)

    if verdict is Verdict.LINK:
        if person_id is not None and candidate is not None:
            raise _invalid("name a person or a candidate, not both")
        if person_id is not None:
            if _person_row(conn, person_id) is None:
                raise _invalid(f"no person {person_id}")
            target = _live_person(conn, person_id)
        elif candidate is not None:
            if tuple(candidate) not in {(c["facility"], c["mrn"]) for c in cands}:
                raise _invalid(f"{candidate[0]} {candidate[1]} is not a candidate of review {review_id}",
                               tuple(candidate))
            crow = _records_by_key(conn, [tuple(candidate)]).get(tuple(candidate))
            if crow is None:
                raise _conflict(f"the candidate {candidate[0]} {candidate[1]} no longer exists", tuple(candidate))
            if not crow.active:  # an A40: its survivor's person, not the one it was left in
                raise _conflict(f"the candidate {candidate[0]} {candidate[1]} was merged away by its facility (into "
                                f"{crow.merged_into_mrn}): link to its survivor's person instead",
                                tuple(candidate), (crow.facility, crow.merged_into_mrn))
            target = crow.person_id
        else:
            suggested = review.person_id if review.person_id is not None else _as_person_id(
                (detail.get("record") or {}).get("person"))
            if suggested is None or _person_row(conn, suggested) is None:
                raise _invalid(f"review {review_id} suggests no person: name one (\"person\") or a candidate")
            target = _live_person(conn, suggested)
        members = [r for r in _records_of(conn, [target], lock=True) if r.id != rec.id]
        if target != rec.person_id:
            _refuse_an_emptied_person(target, members, "link to")
        _refuse_joining(conn, [rec], members, force)
        member_keys = {(r.facility, r.mrn) for r in members}
        scores = [c.get("score") for c in cands
                  if (c["facility"], c["mrn"]) in member_keys and isinstance(c.get("score"), (int, float))]
        d.event(rec, target, Link.MANUAL.value, max(scores) if scores else None)
        if target != rec.person_id:
            _review_left_behind(conn, key, rec.person_id, target, d.id, now)
    else:
        others = [(c["facility"], c["mrn"]) for c in cands if (c["facility"], c["mrn"]) != key]
        if not others:
            raise _invalid(f"review {review_id} has no candidates to mark as not a match")
        now_rows = _records_by_key(conn, others)
        if any(r.person_id == rec.person_id for r in now_rows.values()):
            d.event(rec, d.new_person(), Link.MANUAL.value, None)
        else:
            d.event(rec, rec.person_id, rec.link, rec.link_score)
        d.pairs(key, others)
    _resolve_review(conn, review_id, verdict, actor, now, reason)
    result = review_detail(conn, review_id)
    assert result is not None
    return result


def split_record(conn: Connection, person_id: int, facility: str, mrn: str, *, actor: str, now: datetime,
                 reason: str | None = None) -> dict[str, Any]:
    """The record (facility, mrn) leaves ``person_id`` for a new person (link manual), with sticky
    not-a-match pairs against every active record it leaves. Returns the decision."""
    _hold_links(conn)  # no writer batch in flight re-writes what this decides
    actor, reason, now = _check_actor(actor), _check_reason(reason), _check_now(now)
    owner = _person_row(conn, person_id, lock=True)
    if owner is None:
        raise _not_found(f"no person {person_id}")
    rec = _records_by_key(conn, [(facility, mrn)], lock=True).get((facility, mrn))
    if rec is None:
        raise _not_found(f"no record {facility} {mrn}", (facility, mrn))
    if rec.person_id != person_id:
        raise _conflict(f"{facility} {mrn} belongs to person {rec.person_id}, not {person_id}", (facility, mrn))
    staying = [r for r in _records_of(conn, [person_id], lock=True) if r.id != rec.id and r.active]
    if not staying:
        raise _invalid(f"{facility} {mrn} is the only active record of person {person_id}: nothing to split it from",
                       (facility, mrn))
    d = _Decision(conn, Kind.SPLIT, actor, now, reason)
    new = d.new_person()
    d.event(rec, new, Link.MANUAL.value, None)
    d.pairs((facility, mrn), [(r.facility, r.mrn) for r in staying])
    out = decision_view(conn, d.id)
    assert out is not None
    out["person"] = new
    return out


def set_opt_out(conn: Connection, person_id: int, protected: bool, *, actor: str, now: datetime,
                reason: str | None = None, via: str = "api") -> dict[str, Any]:
    """The person's opt-out, set or cleared through the API (``via`` "api") or the workbench
    ("workbench"): while set, no copy about the person goes anywhere (exchange.routing). A
    facility's PD1-12 = N never clears an opt-out set here. Every change is kept, which way,
    by whom and why (``opt_out_event``). Returns ``{"person", "opt_out"}``."""
    _hold_links(conn)  # no writer batch in flight re-writes what this decides
    actor, reason, now = _check_actor(actor), _check_reason(reason), _check_now(now)
    row = _person_row(conn, person_id, lock=True)
    if row is None:
        raise _not_found(f"no person {person_id}")
    if row.merged_into is not None:  # it holds no records: an opt-out here would protect no one
        raise _conflict(f"person {person_id} was merged into person {_live_person(conn, person_id)}:"
                        " set the opt-out there")
    if protected and not any(r.active for r in _records_of(conn, [person_id])):
        # a page read before a technician moved its records (or a person a split emptied): the
        # opt-out would be kept where no copy is ever about, and the patient's copies would go on
        raise _conflict(f"person {person_id} holds no active record (its records were moved or merged since):"
                        " set the opt-out on the person that holds them")
    who = f"{via} {actor}"
    if not protected and not _says_something(reason):
        raise _invalid("a reason is required to lift an opt-out (who asked for it, and how)")
    holds = holds_of(bool(row.protected), row.protected_by)
    # setting adds this technician's hold beside any other (a facility's Y, a colleague's);
    # lifting takes every hold away: the patient asked the records office
    after = ((*holds, who) if who not in holds else holds) if protected else ()
    if after != holds:
        conn.execute(person.update().where(person.c.id == person_id)
                     .values(protected=bool(after), protected_by=stored_holds(after)))
        conn.execute(opt_out_event.insert().values(person_id=person_id, protected=protected, by=who, reason=reason,
                                                   at=now))
    return {"person": person_id, "opt_out": opt_out_view(after)}


def opt_out_view(holds: Sequence[str]) -> dict[str, Any]:
    """A person's opt-out as the API shows it: set or not, the holds it stands on, as a list and
    in one line (``by``)."""
    return {"protected": bool(holds), "by": shown(holds), "holds": list(holds)}


def _says_something(text: str | None) -> bool:
    """At least one visible character: not only spaces, nor format characters (a zero-width space)."""
    return any(not c.isspace() and unicodedata.category(c) not in ("Cf", "Cc", "Zs") for c in text or "")


def opt_out_history(conn: Connection, person_id: int) -> list[dict[str, Any]]:
    """Every change of the person's opt-out, oldest first: ``{"protected", "by", "reason", "message", "at"}``."""
    return [{"protected": bool(r.protected), "by": r.by, "reason": r.reason, "message": r.message_id,
             "at": _iso(r.at)}
            for r in conn.execute(select(opt_out_event).where(opt_out_event.c.person_id == person_id)
                                  .order_by(opt_out_event.c.id))]


def merge_persons(conn: Connection, keep: int, merge: int, *, actor: str, now: datetime, reason: str | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Every record of ``merge`` moves to ``keep`` (link manual); ``merge.merged_into = keep``;
    the open reviews it answers are superseded (a later decision on one is refused).
    Returns the decision."""
    _hold_links(conn)  # no writer batch in flight re-writes what this decides
    actor, reason, now = _check_actor(actor), _check_reason(reason), _check_now(now)
    if keep == merge:
        raise _invalid("a person cannot be merged into itself")
    rows = {}
    for pid in (keep, merge):
        row = _person_row(conn, pid, lock=True)
        if row is None:
            raise _not_found(f"no person {pid}")
        if row.merged_into is not None:
            raise _conflict(f"person {pid} was merged into person {_live_person(conn, pid)} already")
        rows[pid] = row
    moving = _records_of(conn, [merge], lock=True)
    if not moving:
        raise _invalid(f"person {merge} has no records to merge")
    staying = _records_of(conn, [keep], lock=True)
    _refuse_an_emptied_person(keep, staying, "merge into")
    _refuse_joining(conn, moving, staying, force)
    d = _Decision(conn, Kind.MERGE, actor, now, reason)
    for rec in moving:
        d.event(rec, keep, Link.MANUAL.value, None)
    conn.execute(update(person).where(person.c.id == merge).values(merged_into=keep))
    answered = _answered_by(moving, staying, _open_reviews_of(conn, [(r.facility, r.mrn) for r in moving + staying]))
    if answered:
        conn.execute(update(match_review).where(match_review.c.id.in_(answered),
                                                match_review.c.state == ReviewState.OPEN.value)
                     .values(state=ReviewState.SUPERSEDED.value, decided_at=now, decided_by=actor,
                             note=_answered_note(d.id)))
    out = decision_view(conn, d.id)
    assert out is not None
    out["person"] = keep
    return out


def _answered_note(decision_id: int) -> str:
    """``match_review.note`` of a review a merge superseded (its undo reopens the review)."""
    return f"answered by merge decision {decision_id}"


def _open_reviews_of(conn: Connection, keys: Sequence[Key]) -> list:
    if not keys:
        return []
    where = or_(*(and_(match_review.c.facility == f, match_review.c.mrn == m) for f, m in dict.fromkeys(keys)))
    return list(conn.execute(select(match_review.c.id, match_review.c.facility, match_review.c.mrn,
                                    match_review.c.detail).where(match_review.c.state == ReviewState.OPEN.value, where)))


def _answered_by(moving: Sequence[Any], staying: Sequence[Any], open_reviews: Sequence[Any]) -> list[int]:
    """The open reviews a merge of ``moving`` into the person of ``staying`` answers: the
    review's record and every candidate are now in that person, and the merge brought them
    together (some were on each side). A question about records already together (a link
    that looks wrong) is not answered by it."""
    moved = {(r.facility, r.mrn) for r in moving}
    stayed = {(r.facility, r.mrn) for r in staying}
    out = []
    for row in open_reviews:
        cands = {(c["facility"], c["mrn"]) for c in _candidates(row.detail)}
        involved = {(row.facility, row.mrn)} | cands
        if cands and involved <= moved | stayed and involved & moved and involved & stayed:
            out.append(row.id)
    return out


def _decision_events(conn: Connection, decision_id: int, *, lock: bool = False) -> list:
    query = (select(link_event)
             .where(or_(link_event.c.id == decision_id, link_event.c.decision == decision_id))
             .order_by(link_event.c.id))
    if lock:
        query = query.with_for_update()
    return list(conn.execute(query))


def _refuse_going_back(conn: Connection, events: Sequence[Any], current: Mapping[Key, Any],
                       backs: Mapping[int, int | None], decision_id: int) -> None:
    """409 when an undo would put two records of one facility, or a sticky not-a-match pair,
    in one person: the person a record goes back to holds other records now (a merge since)."""
    going: dict[int, list[Any]] = {}
    for e in events:
        back = backs.get(e.id)
        if back is not None:
            going.setdefault(back, []).append(current[(e.facility, e.mrn)])
    for back, moving in sorted(going.items()):
        keys = {(r.facility, r.mrn) for r in moving}
        staying = [r for r in _records_of(conn, [back]) if (r.facility, r.mrn) not in keys]
        _refuse_joining(conn, moving, staying, False,
                        hint=f"person {back} holds it now, so undoing decision {decision_id} would join them:"
                             f" decide again instead")


def _previous_score(conn: Connection, key: Key, before: int, person_id: int | None) -> float | None:
    """The link score a record had with ``person_id`` before event ``before`` (for undo)."""
    row = conn.execute(
        select(link_event.c.score, link_event.c.to_person)
        .where(link_event.c.facility == key[0], link_event.c.mrn == key[1], link_event.c.id < before,
               link_event.c.undone_by.is_(None))
        .order_by(link_event.c.id.desc()).limit(1)
    ).first()
    return row.score if row is not None and row.to_person == person_id else None


def undo_decision(conn: Connection, decision_id: int, *, actor: str, now: datetime,
                  reason: str | None = None) -> dict[str, Any]:
    """Undo a technician's decision (see the module doc); the undo is a decision of its own
    (kind ``undo``), returned with ``undone`` = the decision it undid."""
    _hold_links(conn)  # no writer batch in flight re-writes what this decides
    actor, reason, now = _check_actor(actor), _check_reason(reason), _check_now(now)
    events = _decision_events(conn, decision_id, lock=True)
    if not events or events[0].id != decision_id or events[0].decision is not None:
        raise _not_found(f"no decision {decision_id}")
    head = events[0]
    if head.kind == Kind.UNDO:
        raise _conflict(f"decision {decision_id} is an undo: decide again instead of undoing it")
    if head.kind not in UNDOABLE:
        raise _conflict(
            f"decision {decision_id} is automatic ({head.kind}): split the record off or merge persons instead"
        )
    if head.undone_by is not None:
        raise _conflict(f"decision {decision_id} was undone already (by decision {head.undone_by})")
    current = _records_by_key(conn, [(e.facility, e.mrn) for e in events], lock=True)
    for e in events:
        rec = current.get((e.facility, e.mrn))
        if rec is None:
            raise _conflict(f"{e.facility} {e.mrn} no longer exists", (e.facility, e.mrn))
        moved = (e.from_person, e.from_link) != (e.to_person, e.to_link)
        if moved and (rec.person_id, rec.link) != (e.to_person, e.to_link):
            raise _conflict(
                f"{e.facility} {e.mrn} has moved since decision {decision_id} (now person {rec.person_id}, "
                f"link {rec.link}): decide again instead", (e.facility, e.mrn))
    if head.kind == Kind.MERGE:  # first, so that the records' way back is not followed into the keeper
        for merged, kept in {(e.from_person, e.to_person) for e in events}:
            conn.execute(update(person).where(person.c.id == merged, person.c.merged_into == kept)
                         .values(merged_into=None))
    # its own sticky pairs go with it (a split's, a not-a-match's): they keep nothing apart now
    conn.execute(update(match_pair).where(match_pair.c.decision_id == decision_id).values(active=False))
    backs = {e.id: _live_person(conn, e.from_person) for e in events
             if (e.from_person, e.from_link) != (e.to_person, e.to_link)}
    _refuse_going_back(conn, events, current, backs, decision_id)
    d = _Decision(conn, Kind.UNDO, actor, now, reason)
    went: dict[int, set[int]] = {}  # person a record left -> the persons its records went back to
    restored: dict[Key, int] = {}  # records back with an automatic link -> their undo event
    for e in reversed(events):
        rec = current[(e.facility, e.mrn)]
        if (e.from_person, e.from_link) == (e.to_person, e.to_link):
            d.event(rec, rec.person_id, rec.link, rec.link_score, review_id=e.review_id)
            continue
        back = backs[e.id]
        link = e.from_link or Link.AUTO.value
        event_id = d.event(rec, back, link, _previous_score(conn, (e.facility, e.mrn), e.id, back),
                           review_id=e.review_id)
        went.setdefault(rec.person_id, set()).add(back)
        if link == Link.AUTO:
            restored[(e.facility, e.mrn)] = event_id
    settle_undone_holds(conn, went, head.at, now, decision_id)
    retire_emptied(conn, went)
    conn.execute(update(link_event).where(link_event.c.id.in_([e.id for e in events])).values(undone_by=d.id))
    reviews = {e.review_id for e in events if e.review_id is not None}
    if reviews:
        conn.execute(
            update(match_review)
            .where(match_review.c.id.in_(sorted(reviews)), match_review.c.state == ReviewState.RESOLVED.value)
            .values(state=ReviewState.OPEN.value, decided_at=None, decided_by=None, decision=None, note=None)
        )
    if head.kind == Kind.MERGE:  # the reviews it answered ask again
        kept = {e.to_person for e in events}
        keys = {(e.facility, e.mrn) for e in events} | {(r.facility, r.mrn) for r in _records_of(conn, sorted(kept))}
        conn.execute(
            update(match_review)
            .where(match_review.c.state == ReviewState.SUPERSEDED.value,
                   match_review.c.note == _answered_note(decision_id),
                   or_(*(and_(match_review.c.facility == f, match_review.c.mrn == m) for f, m in sorted(keys))))
            .values(state=ReviewState.OPEN.value, decided_at=None, decided_by=None, note=None)
        )
    if restored:
        _rescore_restored(conn, restored, decision_id, now)
    out = decision_view(conn, d.id)
    assert out is not None
    out["undone"] = decision_id
    return out


def rescored(features: Features, others: Sequence[tuple[str, str, int, Features]], model: Model) -> list[dict[str, Any]]:
    """A record's features against each of ``others`` ((facility, mrn, person, features)), as a
    review's candidates: best first, each with its score and explanation."""
    out = []
    for facility, mrn, person_id, f in others:
        s = score(features, f, model)
        out.append({"facility": facility, "mrn": mrn, "person": person_id, "score": s.total, "explain": s.explain()})
    out.sort(key=lambda c: (-c["score"], c["facility"], c["mrn"]))
    return out


def _rescore_restored(conn: Connection, restored: dict[Key, int], decision_id: int, now: datetime) -> None:
    """An undo put records back with an automatic link that was scored when it was made; the
    records may have changed since. Each is scored again against the other active records of
    its person (its link score and undo event say the new best), and a ``link_looks_wrong``
    review opens when that is below the upper threshold, unless one is open about it already
    (the review the undo reopened)."""
    model = None
    rows = _records_by_key(conn, list(restored))
    for key, event_id in sorted(restored.items()):
        rec = rows[key]
        members = conn.execute(select(patient_record.c.facility, patient_record.c.mrn, patient_record.c.features)
                               .where(patient_record.c.person_id == rec.person_id, patient_record.c.active)
                               .order_by(patient_record.c.id)).all()
        mine = next((stored_features(m.features) for m in members if (m.facility, m.mrn) == key), None)
        others = [(m.facility, m.mrn, rec.person_id, f) for m in members if (m.facility, m.mrn) != key
                  for f in (stored_features(m.features),) if f is not None]
        if mine is None or not others:
            continue  # nothing to score it against: the score it had stands
        model = model or stored_model(conn)
        candidates = rescored(mine, others, model)
        best = candidates[0]["score"]
        conn.execute(update(patient_record).where(patient_record.c.id == rec.id).values(link_score=best))
        conn.execute(update(link_event).where(link_event.c.id == event_id).values(score=best))
        if best >= model.upper or _open_reviews_of(conn, [key]):
            continue
        _link_looks_wrong(conn, key, rec.person_id, best, candidates, model, now, [
            str(Reason.LINK_LOOKS_WRONG if best < model.lower else Reason.BETWEEN),
            f"undo of decision {decision_id} restored an automatic link; the record scores below the upper "
            f"threshold against its person now"])


def _link_looks_wrong(conn: Connection, key: Key, person_id: int, best: float | None,
                      candidates: list[dict[str, Any]], model: Model, now: datetime, reasons: list[str]) -> int:
    """Open a ``link_looks_wrong`` review of ``key``'s automatic link to ``person_id``; its id."""
    return conn.execute(insert(match_review).values(
        state=ReviewState.OPEN.value, kind=str(Reason.LINK_LOOKS_WRONG), facility=key[0], mrn=key[1],
        person_id=person_id, score=best, created_at=now,
        detail={"record": {"facility": key[0], "mrn": key[1], "person": person_id},
                "candidates": candidates[:MAX_CANDIDATES], "reasons": reasons, "action": "review",
                "thresholds": {"upper": model.upper, "lower": model.lower}},
    )).inserted_primary_key[0]


def _review_left_behind(conn: Connection, moved: Key, left: int, target: int, decision_id: int | None,
                        now: datetime) -> None:
    """A technician's link took ``moved`` out of person ``left``: a record the patient index
    linked there automatically (perhaps through ``moved``) that does not score above the upper
    threshold against what stays with it gets a ``link_looks_wrong`` review, its candidates
    scored against both persons, rather than being left alone without a word."""
    rows = conn.execute(select(patient_record.c.facility, patient_record.c.mrn, patient_record.c.person_id,
                               patient_record.c.link, patient_record.c.features)
                        .where(patient_record.c.person_id.in_([left, target]), patient_record.c.active)
                        .order_by(patient_record.c.id)).all()
    model = None
    for r in rows:
        key = (r.facility, r.mrn)
        if r.person_id != left or r.link != "auto" or key == moved or _open_reviews_of(conn, [key]):
            continue
        mine = stored_features(r.features)
        others = [(o.facility, o.mrn, o.person_id, f) for o in rows if (o.facility, o.mrn) != key
                  for f in (stored_features(o.features),) if f is not None]
        if mine is None or not others:
            continue
        model = model or stored_model(conn)
        candidates = rescored(mine, others, model)
        staying = [c["score"] for c in candidates if c["person"] == left]
        if staying and max(staying) >= model.upper:
            continue  # it belongs with the records that stay
        _link_looks_wrong(conn, key, left, max(staying) if staying else None, candidates, model, now, [
            str(Reason.LINK_LOOKS_WRONG),
            f"decision {decision_id} linked {moved[0]} {moved[1]} to another person; this record, linked "
            f"automatically to the person it left, does not score above the upper threshold against what "
            f"stays there"])


def _event_json(e: Any) -> dict[str, Any]:
    return {"id": e.id, "decision": e.decision if e.decision is not None else e.id, "kind": e.kind,
            "facility": e.facility, "mrn": e.mrn, "from_person": e.from_person, "to_person": e.to_person,
            "from_link": e.from_link, "to_link": e.to_link, "score": e.score, "actor": e.actor, "reason": e.reason,
            "review": e.review_id, "message_id": e.message_id, "at": _iso(e.at), "undone_by": e.undone_by}


def decision_view(conn: Connection, decision_id: int) -> dict[str, Any] | None:
    """A decision (automatic or a technician's): its link events and sticky pairs; None when unknown."""
    events = _decision_events(conn, decision_id)
    if not events or events[0].id != decision_id or events[0].decision is not None:
        return None
    head = events[0]
    pairs = [
        {"facility": r.facility, "mrn": r.mrn, "other_facility": r.other_facility, "other_mrn": r.other_mrn,
         "active": r.active}
        for r in conn.execute(select(match_pair).where(match_pair.c.decision_id == decision_id).order_by(match_pair.c.id))
    ]
    return {
        "id": decision_id,
        "kind": head.kind,
        "actor": head.actor,
        "at": _iso(head.at),
        "reason": head.reason,
        "review": head.review_id,
        "undone_by": head.undone_by,
        "undoable": head.kind in UNDOABLE and head.undone_by is None,
        "events": [_event_json(e) for e in events],
        "pairs": pairs,
    }


# --- persons ----------------------------------------------------------------------------------


def person_view(conn: Connection, person_id: int, trust: Trust = Trust()) -> dict[str, Any] | None:
    """``GET /api/persons/{person}``: its records and its best view; None when unknown.

    A person merged into another answers with ``merged_into`` (the person
    holding its records now) and no records.
    """
    row = _person_row(conn, person_id)
    if row is None:
        return None
    rows = _records_of(conn, [person_id], data=True)
    records = [
        {"facility": r.facility, "authority": r.authority, "mrn": r.mrn, "active": r.active,
         "link": r.link, "score": r.link_score, "updated_at": _iso(r.updated_at)}
        for r in rows
    ]
    return {
        "person": person_id,
        "merged_into": _live_person(conn, row.merged_into) if row.merged_into is not None else None,
        "created_at": _iso(row.created_at),
        "opt_out": {**opt_out_view(holds_of(bool(row.protected), row.protected_by)),
                    "history": opt_out_history(conn, person_id)},
        "records": records,
        "best": best_view([(r, demographics(r.data)) for r in rows if r.active], trust),
    }


def best_view(records: Sequence[tuple[Any, dict[str, Any]]], trust: Trust) -> dict[str, Any]:
    """Survivorship: per field, the value of the record from the most trusted facility kind,
    the most recently updated among those (then the newest record), with where it came from.

    ``records``: (row with facility, mrn, id, updated_at; its demographics).
    """
    ranked = sorted(
        records,
        key=lambda rd: (trust.rank(rd[0].facility), -rd[0].updated_at.timestamp(), -rd[0].id),
    )
    best: dict[str, Any] = {}
    for name in DEMOGRAPHIC_FIELDS:
        best[name] = None
        for row, d in ranked:
            if d.get(name):
                best[name] = {"value": d[name], "facility": row.facility, "mrn": row.mrn,
                              "kind": trust.kinds.get(row.facility), "updated_at": _iso(row.updated_at)}
                break
    return best


def person_history(conn: Connection, person_id: int) -> dict[str, Any] | None:
    """``GET /api/persons/{id}/history``: every link event that moved a record into or out of the
    person, or touched one of its records, oldest first; None when the person is unknown."""
    if _person_row(conn, person_id) is None:
        return None
    keys = [(r.facility, r.mrn) for r in _records_of(conn, [person_id])]
    where = [link_event.c.from_person == person_id, link_event.c.to_person == person_id]
    if keys:
        where.append(or_(*(and_(link_event.c.facility == f, link_event.c.mrn == m) for f, m in keys)))
    events = conn.execute(select(link_event).where(or_(*where)).order_by(link_event.c.id))
    return {"person": person_id, "events": [_event_json(e) for e in events]}


# --- export ---------------------------------------------------------------------------------------

EXPORT_HEADER = ("facility", "authority", "mrn", "person")


def export_links(conn: Connection, *, batch: int = 5000) -> Iterator[tuple[str, str, str, int]]:
    """(facility, authority, mrn, person) of every active facility record, by facility and MRN,
    streamed (``exchange export links``). Merged-away MRNs (A40) are left out: they are no
    longer the facility's record of anyone."""
    result = conn.execute(
        select(patient_record.c.facility, patient_record.c.authority, patient_record.c.mrn, patient_record.c.person_id)
        .where(patient_record.c.active)
        .order_by(patient_record.c.facility, patient_record.c.mrn)
        .execution_options(stream_results=True, yield_per=batch)
    )
    for row in result:
        yield row.facility, row.authority, row.mrn, row.person_id


__all__ = [
    "DEMOGRAPHIC_FIELDS",
    "EXPORT_HEADER",
    "DecisionError",
    "Kind",
    "Link",
    "ReviewState",
    "Trust",
    "Verdict",
    "best_view",
    "decide_review",
    "decision_view",
    "demographics",
    "export_links",
    "list_reviews",
    "merge_persons",
    "person_history",
    "person_view",
    "set_opt_out",
    "opt_out_history",
    "review_detail",
    "split_record",
    "undo_decision",
]


# --- the `links` reconciliation job ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkCheck:
    checked: int  # automatic links read
    opened: tuple[int, ...]  # reviews opened, ids
    in_review: int  # links that look wrong but have an open review already


def recheck_links(conn: Connection, now: datetime) -> LinkCheck:
    """Every automatic link held up against the rules the patient index decides with now (the
    model stored now, the family rules of this release): each record linked automatically to a
    person is decided again against the records that person held before it (as when it
    arrived: by record id), and where the decision would not keep the link -- it scores below
    ``lower``, or the records have the shape of two members of one family -- a
    ``link_looks_wrong`` review opens (the link stays until a technician decides, as on an
    update). Links a technician or a facility made are theirs, not checked. In one transaction;
    the persons are read one at a time, in id order, from a stream, without the links lock
    (the read takes seconds at a million persons: technicians' decisions are not held up that
    long). Then, with the lock shared (on PostgreSQL; a decision in flight is waited for and
    none starts), each link found is decided again as it is now before its review opens: a
    technician's split or link made while the stream was read leaves no stale review."""
    model = stored_model(conn)
    several = (select(patient_record.c.person_id).where(patient_record.c.active)
               .group_by(patient_record.c.person_id).having(func.count() > 1))
    rows = conn.execute(
        select(*_LINK_COLUMNS).where(patient_record.c.active, patient_record.c.person_id.in_(several))
        .order_by(patient_record.c.person_id, patient_record.c.id)
        .execution_options(stream_results=True, yield_per=2000))
    checked, found = 0, []
    person, earlier = None, []
    for r in rows:
        if r.person_id != person:
            person, earlier = r.person_id, []
        mine = _as_record(r)
        if mine is None:
            continue
        if r.link == "auto" and earlier:
            checked += 1
            if _looks_wrong(mine, earlier, model) is not None:
                found.append((r.id, person))
        earlier.append(mine)
    hold_links(conn, exclusive=False)
    opened, in_review = [], 0
    for record_id, person_id in found:
        now_rows = conn.execute(select(*_LINK_COLUMNS).where(
            patient_record.c.person_id == person_id, patient_record.c.active,
            patient_record.c.id <= record_id).order_by(patient_record.c.id)).all()
        if not now_rows or now_rows[-1].id != record_id or now_rows[-1].link != "auto":
            continue  # split off, relinked or merged away while the stream was read
        mine = _as_record(now_rows[-1])
        earlier = [r for r in map(_as_record, now_rows[:-1]) if r is not None]
        d = _looks_wrong(mine, earlier, model) if mine is not None else None
        if d is None:  # its person changed meanwhile: the link holds now
            continue
        key = mine.key
        if _open_reviews_of(conn, [key]):
            in_review += 1
            continue
        candidates = [review_candidate(m) for m in d.matches]
        opened.append(_link_looks_wrong(conn, key, person_id, d.score, candidates, model, now, [
            *(str(reason) for reason in d.reasons),
            "the links job: this automatic link is one the patient index would not make now"]))
    return LinkCheck(checked, tuple(opened), in_review)


_LINK_COLUMNS = (patient_record.c.id, patient_record.c.facility, patient_record.c.mrn, patient_record.c.person_id,
                 patient_record.c.link, patient_record.c.features)


def _as_record(r: Any) -> Record | None:
    """A row of ``_LINK_COLUMNS`` as matching sees it (None: no features stored)."""
    features = stored_features(r.features)
    return None if features is None else Record(r.facility, r.mrn, str(r.person_id), features)


def _looks_wrong(record: Record, earlier: list[Record], model: Model) -> Decision | None:
    """The decision on an automatically linked ``record`` against its person's ``earlier``
    records, if the index would not make that link now (a review), else None."""
    d = decide(record, earlier, model) if earlier else None
    return d if d is not None and d.action is Action.REVIEW else None
