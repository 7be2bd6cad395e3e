"""Routing in the writer's transaction: the copies of a batch's applied events,
queued in the outbox before the commit that precedes the ACK (issue 5).

The pure decisions are exchange.routing's (``route``, ``rewrite``); this
module reads what they need from the database (each person's active records
and opt-out, after the batch's records and links were saved), keeps the
opt-out a facility asserts with PD1-12, and queues the copies
(``exchange.store.outbox.enqueue``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Connection
from twisted.logger import Logger

from exchange.config import Config
from exchange.hl7.header import Header
from exchange.mapping.events import visit_number
from exchange.mapping.message import Message
from exchange.routing import CANCELS, Event, protection, rewrite, route
from exchange.store.consent import PD1, holds_of, lock_persons, stored_holds
from exchange.store.db import driver_cursor, sqlite_datetime
from exchange.store.outbox import NewCopy, enqueue, storable
from exchange.store.driver import in_ids, select_rows
from exchange.store.records import Lineage, document_lineage
from exchange.store.schema import VISIT_LEN

log = Logger()
Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Applied:
    """One applied message, as routing needs it."""

    message_id: int
    header: Header
    message: Message
    subject: Key  # the record it is about (the survivor of a merge)
    person: int | None  # the subject's person after the batch
    retired: Key | None = None  # a merge's retired record
    retired_person: int | None = None
    document_type: str = ""  # MDM: the type the record model routes its document (TXA-12) as
    copied: bool = True  # False: a resend or a late event (Changes.copied): its PD1-12 counts, no copy goes


def route_batch(conn: Connection, applied: Sequence[Applied], config: Config, now: datetime) -> list[NewCopy]:
    """Decide, build and queue every copy of ``applied`` (in order); the copies queued.

    A message whose routing fails (a bug, not a data problem) gets no copies
    and is logged by id; the batch and its ACKs go on.
    """
    persons = {a.person for a in applied if a.person is not None} | {
        a.retired_person for a in applied if a.retired_person is not None}
    records, protected = _persons(conn, persons)
    if conn.dialect.name != "sqlite" and _changes_holds(applied, protected):
        # another node's batch may change the same person's holds (another facility's PD1-12):
        # each writes the whole list, so the persons are locked and read again first
        lock_persons(conn, {a.person for a in applied if a.person is not None})
        records, protected = _persons(conn, persons)
    copies: list[NewCopy] = []
    changed: dict[int, tuple[str, ...]] = {}  # person -> its opt-out's holds after the batch
    events: list[tuple] = []  # opt_out_event rows: (person, protected, by, message id)
    for a in applied:
        try:
            copies.extend(_route_one(conn, a, config, now, records, protected, changed, events, copies))
        except Exception:  # noqa: BLE001 - logged without PHI: the message id only
            log.failure("routing message {message_id} failed; no copies queued for it", message_id=a.message_id)
    if changed:
        sqlite = conn.dialect.name == "sqlite"
        with driver_cursor(conn, "person opt-out (exchange.store.routing)") as cursor:
            sql = ("UPDATE person SET protected = ?, protected_by = ? WHERE id = ?" if sqlite
                   else "UPDATE person SET protected = %s, protected_by = %s WHERE id = %s")
            cursor.executemany(sql, [(bool(holds), stored_holds(holds), person) for person, holds in changed.items()])
            mark = "?" if sqlite else "%s"
            cursor.executemany(
                f"INSERT INTO opt_out_event (person_id, protected, by, message_id, at) VALUES ({', '.join([mark] * 5)})",
                [(person, state, by, message_id, sqlite_datetime(now) if sqlite else now)
                 for person, state, by, message_id in events])
    if copies:
        enqueue(conn, copies)
    return copies


def _changes_holds(applied: Sequence[Applied], protected: dict[int, tuple[str, ...]]) -> bool:
    """Whether a PD1-12 of the batch adds or takes away a hold (as the persons were read)."""
    for a in applied:
        said = protection(a.message) if a.person is not None else None
        if said is not None and ((PD1 + a.subject[0]) in protected.get(a.person, ())) is not said:
            return True
    return False


def _lineage(conn: Connection, a: Applied) -> Lineage:
    """The document (TXA-12), the parent it names (TXA-13) and their ancestors as the database
    holds them with this batch saved: every type they have had, and the confidentiality status
    each was last given (a parent re-typed or restricted after this document was filed under it
    counts too)."""
    txa = a.message.first("TXA")
    if txa is None:
        return Lineage()
    return document_lineage(conn, a.subject[0], (txa.value(12), txa.value(13)))


def _route_one(conn: Connection, a: Applied, config: Config, now: datetime, records, protected, changed,
               events, earlier: Sequence[NewCopy]) -> list[NewCopy]:
    """One message: its opt-out bookkeeping (PD1-12), its destinations, its copies
    (``earlier``: the batch's copies before it, not in the outbox yet)."""
    said = protection(a.message)
    holds = protected.get(a.person, ()) if a.person is not None else ()
    hold = PD1 + a.subject[0]
    if said is True and hold not in holds:  # each facility's Y stands until that facility's N
        holds = (*holds, hold)
    elif said is False and hold in holds:
        # a facility clears what it set itself: never a patient's own request, nor another
        # facility's (many systems send PD1-12 = N by default)
        holds = tuple(h for h in holds if h != hold)
    if a.person is not None and holds != protected.get(a.person, ()):
        protected[a.person] = changed[a.person] = holds
        events.append((a.person, said is True, hold, a.message_id))
    state = bool(holds)
    if not a.copied:
        return []
    lineage = _lineage(conn, a)
    event = Event.read(a.header, a.message, person=None if a.person is None else str(a.person),
                       source_mrn=a.subject[1], protected=state, stored_type=a.document_type,
                       lineage=tuple(sorted(lineage.types)), confidentiality=lineage.confidentiality)
    mine = _one_per_facility(records.get(a.person, []), a.subject)
    prior = None
    if a.retired is not None and a.retired_person is not None:
        prior = _one_per_facility(records.get(a.retired_person, []) + [(a.retired, True)], a.retired)
    pv1 = a.message.first("PV1")
    visit = storable(visit_number(pv1), VISIT_LEN) if pv1 is not None else ""
    told = None
    if event.message_type == "ADT" and event.event in CANCELS:
        told = _told(conn, a.subject, visit, earlier)
    decision = route(event, config.facilities, mine, config.routes, prior_records=prior, told=told)
    out = []
    for i, dest in enumerate(decision.destinations):
        facility = config.facility(dest.facility)
        assert facility is not None  # route only names configured facilities
        copy = rewrite(a.message, event=event, destination=dest, facility=facility, server=config.server,
                       control_id=copy_control_id(a.message_id, i + 1, now), now=now)
        out.append(NewCopy(destination=dest.facility, message_id=a.message_id, control_id=copy.control_id,
                           payload=copy.encode(), created_at=now, person_id=a.person,
                           facility=a.subject[0], mrn=a.subject[1], reason=dest.why, destination_mrn=dest.mrn,
                           document_type=event.document_type, document_types=event.document_types,
                           visit=visit))
    return out


def _told(conn: Connection, subject: Key, visit: str, earlier: Sequence[NewCopy]) -> set[str]:
    """The destinations sent a copy about the sender's ``visit`` (of any of its records: a merge
    moves visits; for "", no visit number, of this record), withheld ones aside, or about this
    record before the outbox kept visits (0012): what a cancel of that visit may go to. Each
    part one look-up of ix_delivery_facility_visit (facility, visit, mrn)."""
    facility, mrn = subject
    mark = "?" if conn.dialect.name == "sqlite" else "%s"
    one = f"SELECT destination FROM delivery WHERE facility = {mark} AND state <> 'withheld' AND "
    sql = (one + f"visit = {mark}" + (f" AND mrn = {mark}" if not visit else "")
           + " UNION ALL " + one + f"visit IS NULL AND mrn = {mark}")
    params = [facility, visit] + ([mrn] if not visit else []) + [facility, mrn]
    told = {destination for (destination,) in select_rows(conn, None, sql, params)}
    told.update(c.destination for c in earlier if c.facility == facility and c.visit == visit
                and (visit or c.mrn == mrn))
    return told


_EPOCH = datetime(2020, 1, 1, tzinfo=timezone.utc)
_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def copy_control_id(message_id: int, index: int, now: datetime) -> str:
    """A copy's MSH-10: the routing time (seconds since 2020 in base 36, six characters until
    2088), the inbound message's row id and the destination's index, ``3HK7QZ-87-2``. The row
    id alone repeats in another database (a rebuild, a move to PostgreSQL), and a receiver
    that drops a control id it has seen from EXCHANGE would drop a new patient's copy. At most
    20 characters (MSH-10 is ST(20) before 2.7) for row ids below 10^10."""
    seconds = max(0, int((now - _EPOCH).total_seconds()))
    stamp = ""
    while seconds:
        seconds, digit = divmod(seconds, 36)
        stamp = _BASE36[digit] + stamp
    return f"{stamp or '0'}-{message_id}-{index}"


def _persons(conn: Connection, persons: set[int]):
    """Each person's records ((facility, mrn), active) and the holds of its opt-out."""
    records: dict[int, list[tuple[Key, bool]]] = {}
    protected: dict[int, tuple[str, ...]] = {}
    if not persons:
        return records, protected
    sqlite = conn.dialect.name == "sqlite"
    params: list = []
    where = in_ids(sqlite, "p.id", sorted(persons), params)
    # one round trip: each person with its records (LEFT JOIN: a person may have none)
    for person, state, by, facility, mrn, active in select_rows(conn, None, (
        "SELECT p.id, p.protected, p.protected_by, r.facility, r.mrn, r.active FROM person p"
        f" LEFT JOIN patient_record r ON r.person_id = p.id WHERE {where} ORDER BY r.id"
    ), params):
        protected[person] = holds_of(bool(state), by)
        if facility is not None:
            records.setdefault(person, []).append(((facility, mrn), bool(active)))
    return records, protected


def _one_per_facility(records: list[tuple[Key, bool]], subject: Key) -> dict[str, str]:
    """{facility: MRN} of the active records (the subject's own for its facility; else the oldest)."""
    out: dict[str, str] = {}
    for (facility, mrn), active in records:
        if active and facility not in out:
            out[facility] = mrn
    if subject[0] in out or any(key == subject for key, _ in records):
        out[subject[0]] = subject[1]
    return out
