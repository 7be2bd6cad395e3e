"""A person's opt-out and the holds it stands on.

An opt-out stands on one or more holds: a facility's PD1-12 = Y (``PD1-12 GENHOSP``: that
facility's N takes it away, no one else's), a technician's or admin's (``api NAME``,
``workbench NAME``). The person is protected while any hold stands; the records office
lifts them all at once (the patient asked it). ``person.protected_by`` keeps the holds as
a JSON list, in the order they were set.

An opt-out follows its records: when records of a protected person join another person
(a merge, a link, a split, an automatic match), that person takes its holds too, recorded
in ``opt_out_event`` with the reason. Withholding a copy can be undone (the copy is
retried); a copy sent cannot."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, exists, insert, select, tuple_, update

from exchange.store.schema import (
    MAX_MERGE_HOPS,
    opt_out_event_table as opt_out_event,
    patient_record_table as patient_record,
    person_table as person,
)

PERSONS_PER_SELECT = 400  # ids in one IN list (SQLite takes at most 32,766 bound values)
PD1 = "PD1-12 "  # a facility's hold: "PD1-12 GENHOSP"


def holds_of(protected: bool, stored: str | None) -> tuple[str, ...]:
    """The holds a person's opt-out stands on, from ``person.protected`` and ``protected_by``
    (a value that is no JSON list of text is one hold: nothing set is ever lost)."""
    if not protected:
        return ()
    try:
        holds = json.loads(stored) if stored else None
    except ValueError:
        holds = None
    if isinstance(holds, list) and holds and all(isinstance(h, str) for h in holds):
        return tuple(holds)
    return (stored or "opt-out",)


def lock_persons(conn: Connection, ids: Iterable[int]) -> None:
    """PostgreSQL: the persons' rows locked until the transaction ends, in id order (two nodes
    locking overlapping persons wait for each other rather than deadlock): whoever changes
    their holds next reads them after the other's commit."""
    ordered = sorted(set(ids))
    for i in range(0, len(ordered), PERSONS_PER_SELECT):
        conn.execute(select(person.c.id).where(person.c.id.in_(ordered[i:i + PERSONS_PER_SELECT]))
                     .order_by(person.c.id).with_for_update())


def person_holds(conn: Connection, ids: Iterable[int]) -> dict[int, tuple[str, ...]]:
    """The holds of each person of ``ids`` that exists (() when not protected)."""
    ordered = sorted(set(ids))
    return {r.id: holds_of(bool(r.protected), r.protected_by)
            for i in range(0, len(ordered), PERSONS_PER_SELECT)
            for r in conn.execute(select(person.c.id, person.c.protected, person.c.protected_by)
                                  .where(person.c.id.in_(ordered[i:i + PERSONS_PER_SELECT])))}


def stored_holds(holds: Sequence[str]) -> str | None:
    """``person.protected_by`` for ``holds`` (None: not protected)."""
    return json.dumps(list(holds)) if holds else None


def shown(holds: Sequence[str]) -> str | None:
    """The holds as one line (the API's ``opt_out.by``): "PD1-12 OAKNH, api tess"."""
    return ", ".join(holds) or None


def merge_chains(conn: Connection, ids: Iterable[int]) -> dict[int, Any]:
    """Each person of ``ids`` and every person it was merged into, up to MAX_MERGE_HOPS on, by
    id: rows with ``merged_into`` and ``protected``. A person that does not exist is absent.
    The send-time check of a queued copy and ``exchange replay`` follow the chains from these."""
    rows: dict[int, Any] = {}
    todo = set(ids)
    for _ in range(MAX_MERGE_HOPS + 1):
        if not todo:
            break
        ordered = sorted(todo)
        for i in range(0, len(ordered), PERSONS_PER_SELECT):
            for r in conn.execute(select(person.c.id, person.c.merged_into, person.c.protected)
                                  .where(person.c.id.in_(ordered[i:i + PERSONS_PER_SELECT]))):
                rows[r.id] = r
        todo = {r.merged_into for r in rows.values() if r.merged_into is not None} - rows.keys()
    return rows


def merged_persons(conn: Connection, person_id: int) -> list[int]:
    """``person_id`` and every person merged into it, directly or through others (a technician's
    merge, or a facility's A40 that emptied it): whose copies are this patient's disclosures."""
    found, frontier = {person_id}, [person_id]
    for _ in range(MAX_MERGE_HOPS):
        if not frontier:
            break
        merged = {r.id for i in range(0, len(frontier), PERSONS_PER_SELECT) for r in conn.execute(
            select(person.c.id).where(person.c.merged_into.in_(frontier[i:i + PERSONS_PER_SELECT])))}
        frontier = sorted(merged - found)
        found |= merged
    return sorted(found)


def live_persons(conn: Connection, ids: set[int]) -> dict[int, tuple[int | None, bool]]:
    """person id -> (the person it was merged into last, or itself; that person's opt-out)."""
    rows = merge_chains(conn, ids)
    out: dict[int, tuple[int | None, bool]] = {}
    for start in ids:
        current, hops = start, 0
        while current in rows and rows[current].merged_into is not None and hops < MAX_MERGE_HOPS:
            current, hops = rows[current].merged_into, hops + 1
        row = rows.get(current)
        out[start] = (current, bool(row.protected)) if row is not None else (None, False)
    return out


def record_owners(conn: Connection, keys: set[tuple[str, str]]) -> dict[tuple[str, str], int | None]:
    """(facility, mrn) -> the person of that record (of its survivor, if merged away); None if inactive
    without a survivor, or unknown."""
    out: dict[tuple[str, str], int | None] = {}
    pending = {key: key for key in keys}  # the key asked -> the record to read for it
    for _ in range(MAX_MERGE_HOPS):
        if not pending:
            break
        wanted = set(pending.values())
        found = {(r.facility, r.mrn): r for r in conn.execute(
            select(patient_record.c.facility, patient_record.c.mrn, patient_record.c.person_id,
                   patient_record.c.active, patient_record.c.merged_into_mrn)
            .where(tuple_(patient_record.c.facility, patient_record.c.mrn).in_(sorted(wanted))))}
        following = {}
        for asked, key in pending.items():
            r = found.get(key)
            if r is not None and not r.active and r.merged_into_mrn and (r.facility, r.merged_into_mrn) != key:
                following[asked] = (r.facility, r.merged_into_mrn)
            else:
                out[asked] = r.person_id if r is not None and r.active else None
        pending = following
    return out


def retire_emptied(conn: Connection, went: Mapping[int, set[int | None]]) -> None:
    """A person records left (``went``: person -> the persons its records went to) and that holds
    none now answers ``merged_into`` where they all went, as a merged person does, rather than
    dangling empty: whoever kept its id (an API client, a technician) is led to the records.
    A person whose records went to several persons, or back to itself, stays as it is."""
    for left, dests in sorted(went.items()):
        if len(dests) != 1 or left in dests:
            continue
        conn.execute(update(person).where(
            person.c.id == left, person.c.merged_into.is_(None),
            ~exists().where(patient_record.c.person_id == left),
        ).values(merged_into=next(iter(dests))))


CARRIED = "records of person {source}, which had opted out, joined this person"  # opt_out_event.reason


def settle_undone_holds(conn: Connection, back: Mapping[int, set[int]], since: datetime, now: datetime,
                        decision: int) -> None:
    """An undone decision sent records back (``back``: the person they leave -> the persons they
    went back to, the ones the decision had emptied). The holds go with the records, as their
    history since the decision (``since``) says: the person they leave gives up the holds they
    brought along (its opt_out_event rows ``CARRIED`` from those persons) that the person they go
    back to holds -- an innocent person a wrong merge protected is not left protected by another
    patient's request; and the person they go back to gives up what was lifted from them while
    they were away -- a facility's N about its hold, the records office's lifting of every hold
    they had brought (a lifted opt-out does not come back with an undo)."""
    for left, sources in sorted(back.items()):
        events = conn.execute(select(opt_out_event.c.protected, opt_out_event.c.by, opt_out_event.c.reason)
                              .where(opt_out_event.c.person_id == left, opt_out_event.c.at >= since)
                              .order_by(opt_out_event.c.id)).all()
        came = {p: [e.by for e in events if e.protected and e.reason == CARRIED.format(source=p)] for p in sources}
        lifted = [e.by for e in events if not e.protected]
        everything = any(not by.startswith(PD1) for by in lifted)  # a technician's lifting: every hold
        theirs = person_holds(conn, [left, *sources])
        mine = theirs.pop(left, ())
        taken = [h for h in mine if any(h in hs for hs in theirs.values())
                 and any(_names(by, h) for bys in came.values() for by in bys)]
        _set_holds(conn, left, mine, taken, now, f"the undo of decision {decision} took the records back to person"
                   f" {', '.join(map(str, sorted(sources)))}, and their opt-out with them")
        for source, holds in sorted(theirs.items()):
            gone = [h for h in holds if (h in lifted or everything) and any(_names(by, h) for by in came[source])]
            _set_holds(conn, source, holds, gone, now, f"the undo of decision {decision} brought the records back"
                       f" without what was lifted from them while they were with person {left}")


def _names(by: str, hold: str) -> bool:
    """Whether an opt_out_event's ``by`` (holds in one line: ``shown``) names ``hold``."""
    return f", {hold}, " in f", {by}, "


def _set_holds(conn: Connection, person_id: int, holds: Sequence[str], gone: Sequence[str], now: datetime,
               reason: str) -> None:
    """The person's holds without ``gone`` (none: nothing changes), with a line in its history."""
    if not gone:
        return
    kept = tuple(h for h in holds if h not in gone)
    conn.execute(update(person).where(person.c.id == person_id)
                 .values(protected=bool(kept), protected_by=stored_holds(kept)))
    conn.execute(insert(opt_out_event).values(person_id=person_id, protected=bool(kept), by=shown(gone), at=now,
                                              reason=reason))


def carry_opt_outs(conn: Connection, moves: Iterable[tuple[int | None, int | None]], now: datetime,
                   message_id: int | None = None, *, record_of: str | None = None) -> list[int]:
    """For each (from person, to person) of records that moved: the target takes the holds of a
    protected source it lacks (every facility's Y, every technician's: each stands until its own
    lifting). With ``record_of`` (a facility's merge held back at the persons: one record of that
    facility lives on in the target), only that facility's PD1-12 hold and the technicians' go:
    another facility's stays where its N can reach it. Returns the persons whose holds changed."""
    pairs = {(a, b) for a, b in moves if a is not None and b is not None and a != b}
    if not pairs:
        return []
    sources = {a for a, _ in pairs}
    protected = {r.id: holds_of(True, r.protected_by) for r in conn.execute(
        select(person.c.id, person.c.protected_by).where(person.c.id.in_(sorted(sources)), person.c.protected))}
    if record_of is not None:
        protected = {p: kept for p, hs in protected.items()
                     if (kept := tuple(h for h in hs if not h.startswith(PD1) or h == PD1 + record_of))}
    targets = sorted({b for a, b in pairs if a in protected})
    if not targets:
        return []
    if conn.dialect.name != "sqlite":  # another node's batch may change their holds meanwhile
        lock_persons(conn, targets)
    holds = person_holds(conn, targets)
    out = []
    for target in targets:
        if target not in holds:
            continue
        now_holds, came = list(holds[target]), []
        for source in sorted(a for a, b in pairs if b == target and a in protected):
            added = [h for h in protected[source] if h not in now_holds]
            if added:
                now_holds += added
                came.append((source, added))
        if not came:
            continue
        conn.execute(update(person).where(person.c.id == target)
                     .values(protected=True, protected_by=stored_holds(now_holds)))
        why = ("a merge at {facility} that did not merge the persons retired a record of person {source}, which"
               " had opted out, into this person's" if record_of is not None else CARRIED)
        conn.execute(insert(opt_out_event), [
            {"person_id": target, "protected": True, "by": shown(added), "message_id": message_id, "at": now,
             "reason": why.format(facility=record_of, source=source)}
            for source, added in came])
        out.append(target)
    return out
