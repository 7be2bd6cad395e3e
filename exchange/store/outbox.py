"""The delivery outbox: routed copies waiting for, or done with, delivery.

One ``delivery`` row per copy and destination. The intake writes the copies
of a batch in its own transaction (``enqueue``: the copies are durable before
the inbound ACK goes out); the delivery worker (``exchange.delivery``) sends
each destination's copies one at a time, oldest first, and records what the
destination answered::

    queued --AA/CA--> delivered
    queued --AE/AR/CE/CR--> failed --retry (operator)--> queued
    queued (requeued, not forced) --a newer copy about the patient delivered since--> failed (superseded)
    queued --no answer, broken connection, wrong MSA-2--> queued (attempts+1, next_attempt_at later)
    queued --the person opted out, the destination's record is no longer theirs,
             or the configuration running now would not send it--> withheld

Routing decides who gets a copy when the event is applied; what may change
before the copy goes out (an opt-out, a technician splitting the
destination's record off the person, a restart with another configuration:
the destination removed, excluding the document type, no longer subscribed,
the rule that added the copy removed) is checked again when the worker
claims it (``claim_batch``: such a copy comes marked ``withheld``, is
recorded so and never sent), once more just before each copy is written to
the destination (``send_check``: a batch drains one ACK at a time, and an
opt-out or a split made meanwhile must stop the rest of it), and when an
operator requeues one (``retry``). They take the configuration the exchange
runs (``config``). A requeued copy is also checked, at the claim and just before
it is written, for a newer copy about the same patient delivered to the
destination since (one in flight when the operator requeued it): unless the
requeue was forced, it is given back, failed, with ``SUPERSEDED`` as its
error, rather than land after that newer copy.

Rows are never deleted: the delivered ones are the accounting of disclosures
(who received what about whom, when), listed by ``list_deliveries``.

Every function takes a ``Connection`` whose transaction the caller owns (and
commits: nothing here commits) and returns plain values, never ORM rows.

Order: ``id`` is the FIFO order within a destination. ``claim_batch`` always
starts at the destination's oldest queued copy and stops at the first one
that is not due, so a copy waiting for its retry holds back the copies after
it, and a failed copy the operator requeues goes out before younger ones.

More than one node (PostgreSQL): a node serves a destination only while it
holds the destination's session-level advisory lock (``try_lock_destination``)
on the connection it runs that destination's statements on. That lock, not a
row lock, keeps one sender per destination: FIFO means the head of the queue
is the only copy a destination may be sent, so ``FOR UPDATE SKIP LOCKED``
(which lets consumers pass each other) would break the order it must keep.
PostgreSQL releases the lock when the node's connection ends, so a node that
dies is taken over by the next one that tries.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, or_, select, tuple_, union_all, update
from sqlalchemy.dialects import postgresql

from exchange.config import Config
from exchange.hl7.header import read_header
from exchange.mapping.events import confidentiality as txa_confidentiality
from exchange.mapping.message import Message
from exchange.routing.rewrite import renamed_copy
from exchange.routing.rules import Event, Reason, recheck
from exchange.store.consent import live_persons, merged_persons, record_owners
from exchange.store.records import Lineage, document_lineage
from exchange.store.db import advisory_key, driver_cursor, sqlite_datetime
from exchange.store.schema import (
    ACK_CODE_LEN,
    ACTOR_NAME_LEN,
    CONTROL_ID_LEN,
    DELIVERY_REASON_LEN,
    FACILITY_LEN,
    MAX_MERGE_HOPS,
    MRN_LEN,
    VISIT_LEN,
    delivery_table as delivery,
    message_table as message,
    patient_record_table as patient_record,
)

__all__ = [
    "Claim",
    "DeliveryState",
    "DeliveryView",
    "Delivered",
    "Failed",
    "NewCopy",
    "Pending",
    "RetryLater",
    "SUPERSEDED",
    "Rewritten",
    "Superseded",
    "Withheld",
    "RetryResult",
    "carry_renames",
    "claim_batch",
    "claim_next",
    "destinations",
    "enqueue",
    "get_delivery",
    "list_deliveries",
    "mark_delivered",
    "mark_failed",
    "message_deliveries",
    "queue_depths",
    "record_outcomes",
    "retry",
    "schedule_retry",
    "send_check",
    "storable",
    "withheld_copies",
    "try_lock_destination",
    "unlock_destination",
]

MAX_ERROR_CHARS = 1000  # last_error is cut to this
LIST_LIMIT_MAX = 1000


class DeliveryState(StrEnum):
    QUEUED = "queued"  # waiting to be sent (or to be sent again at next_attempt_at)
    DELIVERED = "delivered"  # the destination answered AA or CA
    FAILED = "failed"  # the destination answered AE, AR, CE or CR; an operator may requeue it
    WITHHELD = "withheld"  # not sent: opted out, the destination's record not theirs, or no longer routed there


# -- values -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewCopy:
    """One copy to enqueue, as the writer built it."""

    destination: str  # the receiving facility's code
    message_id: int  # the inbound message (message.id) it is a copy of
    control_id: str  # the copy's MSH-10: its ACK's MSA-2 must repeat it
    payload: bytes  # the copy exactly as it will be sent (unframed, segments ending in CR)
    created_at: datetime  # timezone-aware; also its first due time
    person_id: int | None = None  # the enterprise person it is about
    facility: str | None = None  # the patient record it is about: the sender's code (MSH-4.1) ...
    mrn: str | None = None  # ... and its MRN there
    reason: str | None = None  # why it was routed: "default" or the [[route]] name
    destination_mrn: str | None = None  # the destination's record the copy names (PID-3), if any
    # What routing checked exclude_documents and MDM^EVENT^DOCTYPE subscriptions against
    # (exchange.routing.Event): checked again before the copy goes out.
    document_type: str = ""  # its document's type: TXA-2, else the one stored for the document
    document_types: tuple[str, ...] = ()  # every type that counts for exclude_documents (the parent's too)
    visit: str | None = None  # the sender's visit it is about (PV1-19, else PV1-50; "" for none)


@dataclass(frozen=True, slots=True)
class Pending:
    """A queued copy handed to the worker for sending."""

    id: int
    destination: str
    control_id: str
    payload: bytes
    attempts: int
    created_at: datetime
    withheld: str | None = None  # why it must not go out any more: record it so, do not send it
    # What send_check looks at again just before the copy is written:
    person_id: int | None = None  # the person it is about, as routed
    destination_mrn: str | None = None  # the destination's record it names (PID-3), if any
    record: tuple[str, str] | None = None  # the sender's record it is about (facility, mrn), if known
    document: bool = False  # a copy of a document: its stored lineage counts for exclude_documents
    requeued: bool = False  # requeued by an operator, not forced: superseded by a newer copy delivered since?
    superseded: bool = False  # it is (at the claim): give it back, failed, do not send it


@dataclass(frozen=True, slots=True)
class Claim:
    """The copies a destination may be sent now, oldest first, and when to look again.

    ``due_at``: when the first copy that is not due yet becomes due (None when
    the queue holds nothing more than ``copies``)."""

    copies: tuple[Pending, ...]
    due_at: datetime | None


@dataclass(frozen=True, slots=True)
class DeliveryView:
    """A delivery as the API and the accounting of disclosures show it (never the payload)."""

    id: int
    destination: str
    state: DeliveryState
    attempts: int
    last_error: str | None
    control_id: str  # the copy's MSH-10
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    ack_code: str | None
    message_id: int
    message_facility: str | None  # the inbound message's MSH-4.1 ...
    message_control_id: str | None  # ... MSH-10 ...
    message_type: str  # ... MSH-9.1 ...
    event: str  # ... and MSH-9.2
    person_id: int | None
    facility: str | None  # the record it is about
    mrn: str | None
    reason: str | None
    retried_by: str | None
    retried_at: datetime | None
    destination_mrn: str | None = None  # the destination's own record it names (its ACK's text may quote it)


# Outcomes of one attempt, recorded by ``record_outcomes``.


@dataclass(frozen=True, slots=True)
class Delivered:
    id: int
    at: datetime  # when the ACK arrived
    ack_code: str  # AA or CA
    ack: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    id: int
    at: datetime
    ack_code: str  # AE, AR, CE or CR
    ack: bytes
    error: str  # MSA-3 / ERR text, or the code alone


@dataclass(frozen=True, slots=True)
class RetryLater:
    id: int
    next_attempt_at: datetime
    error: str  # timeout, connection refused, wrong MSA-2, ...
    ack_code: str | None = None  # a reply that could not be taken (wrong MSA-2), if any
    ack: bytes | None = None


@dataclass(frozen=True, slots=True)
class Withheld:
    id: int
    reason: str  # why it was not sent (last_error)


@dataclass(frozen=True, slots=True)
class Superseded:
    """A requeued copy not sent after all: a newer copy about the patient reached the
    destination since. Failed again (an operator may force it), ``SUPERSEDED`` as its error."""

    id: int


Outcome = Delivered | Failed | RetryLater | Withheld | Superseded


@dataclass(frozen=True, slots=True)
class Rewritten:
    """Not an outcome: the copy was rewritten since it was claimed (its destination renamed or
    merged the record it names: A47, A40): send this payload, naming ``destination_mrn``."""

    id: int
    payload: bytes
    destination_mrn: str | None


# last_error of a requeued copy given back (no PHI); the API's 409 says the same before a requeue
SUPERSEDED = ("superseded: newer copies about this patient reached the destination since it was requeued:"
              " sent now, this older event would land after them; retry with force to send it anyway")


class RetryResult(StrEnum):
    REQUEUED = "requeued"
    NOT_FOUND = "not-found"
    NOT_FAILED = "not-failed"  # only failed copies can be requeued
    WITHHELD = "withheld"  # it may not go out any more (the person opted out, ...): not requeued
    # newer copies about the same patient reached the destination since: sent now, this older event
    # would land after them (an old A08's demographics after the discharge); not requeued unless forced
    SUPERSEDED = "superseded"


# -- text -------------------------------------------------------------------------


def storable(value: str | None, limit: int | None = None) -> str | None:
    """As both backends store it: no NUL, no lone surrogates, at most ``limit`` characters."""
    if value is None:
        return None
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return value[:limit] if limit is not None else value


# -- enqueue (the intake's hot path) ------------------------------------------------

_COLUMNS = (
    "destination",
    "message_id",
    "person_id",
    "facility",
    "mrn",
    "reason",
    "control_id",
    "payload",
    "created_at",
    "state",
    "attempts",
    "next_attempt_at",
    "destination_mrn",
    "document_types",
    "visit",
)


def _params(copy: NewCopy) -> tuple:
    created_at = copy.created_at
    if created_at.tzinfo is None or created_at.utcoffset() is None:
        raise ValueError("naive datetime: the store only takes timezone-aware datetimes")
    return (
        storable(copy.destination, FACILITY_LEN),
        copy.message_id,
        copy.person_id,
        storable(copy.facility, FACILITY_LEN),
        storable(copy.mrn, MRN_LEN),
        storable(copy.reason, DELIVERY_REASON_LEN),
        storable(copy.control_id, CONTROL_ID_LEN),
        copy.payload,
        created_at,
        DeliveryState.QUEUED.value,
        0,
        created_at,
        storable(copy.destination_mrn, MRN_LEN),
        _encode_document_types(copy.document_type, copy.document_types),
        storable(copy.visit, VISIT_LEN),
    )


def _encode_document_types(document_type: str, document_types: Sequence[str]) -> str:
    """delivery.document_types: a JSON list, the copy's own type first ("" when it has
    none but another type counts), then the other types; "[]" for a copy of no document."""
    others = [t for t in document_types if t and t != document_type]
    return json.dumps([document_type, *others] if document_type or others else [])


def _decode_document_types(stored: str) -> tuple[str, tuple[str, ...]]:
    """(the copy's own document type, every type that counts) from delivery.document_types."""
    types = json.loads(stored)
    return (types[0] if types else ""), tuple(t for t in types if t)


def _pg_enqueue_sql() -> str:
    """ONE statement per batch whatever its size: each column bound as one array in
    psycopg's binary format, rows inserted in array order (ascending ids: the
    FIFO order is the order given), like exchange.store.messages.insert_messages."""
    pg = postgresql.dialect()
    names = ", ".join(_COLUMNS)
    arrays = ", ".join(
        f"CAST(%({name})b AS {delivery.c[name].type.compile(dialect=pg)}[])" for name in _COLUMNS
    )
    return f"""
        WITH new AS (
            INSERT INTO delivery ({names})
            SELECT {names}
            FROM unnest({arrays}) WITH ORDINALITY AS u ({names}, ord)
            ORDER BY ord
            RETURNING id
        )
        SELECT id FROM new ORDER BY id
        """


_PG_ENQUEUE = _pg_enqueue_sql()
_SQLITE_MAX_ROWS = 2000  # 14 parameters a row: under SQLite's 32766-variable limit


@functools.lru_cache(maxsize=64)
def _sqlite_enqueue_sql(count: int) -> str:
    row = "(" + ", ".join("?" * len(_COLUMNS)) + ")"
    return f"INSERT INTO delivery ({', '.join(_COLUMNS)}) VALUES " + ", ".join([row] * count) + " RETURNING id"


def enqueue(conn: Connection, copies: Sequence[NewCopy]) -> list[int]:
    """Queue copies for delivery, in the order given; their ids (ascending).

    Runs inside the caller's transaction (the intake's) and never commits.
    One statement on PostgreSQL; one per 2000 copies on SQLite.
    """
    if not copies:
        return []
    rows = [_params(c) for c in copies]
    if conn.dialect.name == "postgresql":
        arrays = {name: [row[i] for row in rows] for i, name in enumerate(_COLUMNS)}
        with driver_cursor(conn, _PG_ENQUEUE) as cursor:
            cursor.execute(_PG_ENQUEUE, arrays)
            ids = [r[0] for r in cursor.fetchall()]
    else:
        ids = []
        with driver_cursor(conn, "INSERT INTO delivery ...") as cursor:
            for start in range(0, len(rows), _SQLITE_MAX_ROWS):
                chunk = rows[start : start + _SQLITE_MAX_ROWS]
                flat: list[Any] = []
                for row in chunk:
                    at = sqlite_datetime(row[8])
                    flat.extend(row[:8] + (at, row[9], row[10], at) + row[12:])
                # max(rowid)+1 in VALUES order under the write lock: sorted ids are the order given
                ids.extend(sorted(r[0] for r in cursor.execute(_sqlite_enqueue_sql(len(chunk)), flat).fetchall()))
    if len(ids) != len(rows):  # pragma: no cover - a driver bug
        raise RuntimeError(f"queued {len(rows)} copies, got {len(ids)} ids")
    return ids


def carry_renames(conn: Connection, renames: Sequence[tuple[tuple[str, str], tuple[str, str]]],
                  authorities: Mapping[str, str]) -> int:
    """A47 renamed these records ((facility, old mrn), (facility, new mrn)), in the batch's
    transaction, before the batch saves them (they are stored under the old MRN): the copies
    not yet delivered that name the old MRN follow it. A copy waiting for the renaming
    facility names its new MRN in PID-3 (``authorities``: each facility's PID-3.4) and as
    ``destination_mrn``, so it goes out -- the record is still the person's -- instead of
    being withheld as naming a record no longer there; a copy of the renamed record's own
    events keeps the new MRN as the record it is about (``mrn``: the send-time, retry and
    cancel checks read it). Returns the copies rewritten."""
    rewritten = 0
    for (facility, old), (_, new) in renames:
        # the record's copies, found through its person (indexed; copies routed under a person it
        # left before are not found: they keep the old MRN, and the send-time check withholds
        # them). Called before the batch saves the record: it is still stored under its old MRN.
        person_id = select(patient_record.c.person_id).where(
            patient_record.c.facility == facility, patient_record.c.mrn == old).scalar_subquery()
        conn.execute(delivery.update().where(delivery.c.person_id == person_id, delivery.c.facility == facility,
                                             delivery.c.mrn == old).values(mrn=storable(new, MRN_LEN)))
        rewritten += _rename_destination(conn, facility, old, new, authorities.get(facility))
    return rewritten


def carry_merges(conn: Connection, merges: Iterable[tuple[str, str, str]], authorities: Mapping[str, str]) -> int:
    """A facility merged its own record ``retired`` into ``survivor`` (A40 and the legacy merges:
    (facility, survivor, retired)), in the batch's transaction: the copies waiting for that
    facility that name the retired MRN name the survivor instead, in PID-3 and as
    ``destination_mrn`` -- its system has merged them, and a copy under the retired MRN would
    be refused there or filed in a chart that is no longer used. Whether the copy still goes
    is the send-time check's: the survivor must belong to the copy's person. Returns the
    copies rewritten."""
    return sum(_rename_destination(conn, facility, retired, survivor, authorities.get(facility))
               for facility, survivor, retired in merges if survivor != retired)


def _rename_destination(conn: Connection, facility: str, old: str, new: str, authority: str | None) -> int:
    """The copies waiting for ``facility`` that name its record ``old`` name ``new``."""
    pending = [DeliveryState.QUEUED.value, DeliveryState.FAILED.value]
    rewritten = 0
    rows = conn.execute(select(delivery.c.id, delivery.c.payload).where(
        delivery.c.destination == facility, delivery.c.destination_mrn == old, delivery.c.state.in_(pending)))
    for copy_id, payload in rows.all():
        changed = renamed_copy(bytes(payload), old, new, authority) if authority else None
        if changed is None:  # not a copy rewrite() wrote: the send-time check withholds it
            continue
        conn.execute(delivery.update().where(delivery.c.id == copy_id)
                     .values(payload=changed, destination_mrn=storable(new, MRN_LEN)))
        rewritten += 1
    return rewritten


def destinations(copies: Iterable[NewCopy]) -> frozenset[str]:
    """The destinations among ``copies``: what the delivery worker is woken for after the commit."""
    return frozenset(c.destination for c in copies)


# -- the worker ----------------------------------------------------------------------

CLAIM_MAX_BYTES = 4 * 1024 * 1024  # payload bytes per claim (at least one copy)

_HEAD = (
    select(delivery.c.id, delivery.c.next_attempt_at, func.length(delivery.c.payload).label("size"))
    .where(delivery.c.destination == bindparam("destination"), delivery.c.state == DeliveryState.QUEUED.value)
    .order_by(delivery.c.id)
    .limit(bindparam("limit"))
)
# What withheld_copies checks again: the person and the record, the configuration.
_CHECKED = (
    delivery.c.id,
    delivery.c.destination,
    delivery.c.person_id,
    delivery.c.destination_mrn,
    delivery.c.facility,  # the sender's record it is about
    delivery.c.mrn,
    delivery.c.reason,
    delivery.c.document_types,
    delivery.c.payload,  # TXA-2 of the copies queued before delivery.document_types
    message.c.facility.label("sender"),
    message.c.message_type,
    message.c.event,
)
_WITH_MESSAGE = delivery.join(message, delivery.c.message_id == message.c.id)
_COPIES = (
    select(*_CHECKED, delivery.c.control_id, delivery.c.attempts, delivery.c.created_at,
           delivery.c.retried_at, delivery.c.retry_forced)
    .select_from(_WITH_MESSAGE)
    .where(delivery.c.id.in_(bindparam("ids", expanding=True)))
)


def claim_batch(
    conn: Connection,
    destination: str,
    now: datetime,
    limit: int = 100,
    max_bytes: int = CLAIM_MAX_BYTES,
    *,
    config: Config,
) -> Claim:
    """The destination's oldest queued copies that are due at ``now``, in order.

    Stops at the first copy that is not due (FIFO: nothing overtakes it), after
    ``limit`` copies, and once ``max_bytes`` of payload are taken (always at
    least one copy). Each comes with ``withheld`` set when it must not go out
    any more (``withheld_copies``, under ``config``: the configuration the
    exchange runs), and ``superseded`` when an operator requeued it (not
    forced) and a newer copy about the patient has reached the destination
    since. Reads only; the caller must be the destination's only sender (see
    the module doc).
    """
    rows = conn.execute(_HEAD, {"destination": destination, "limit": limit + 1}).all()
    chosen: list[int] = []
    due_at: datetime | None = None
    taken = 0
    for row in rows:
        if row.next_attempt_at is not None and row.next_attempt_at > now:
            due_at = row.next_attempt_at
            break
        if len(chosen) >= limit or (chosen and taken + row.size > max_bytes):
            due_at = now  # more is due at once
            break
        chosen.append(row.id)
        taken += row.size
    if not chosen:
        return Claim((), due_at)
    found = {r.id: r for r in conn.execute(_COPIES, {"ids": chosen})}
    withheld = withheld_copies(conn, list(found.values()), config)
    copies = tuple(
        Pending(r.id, r.destination, r.control_id, bytes(r.payload), r.attempts, r.created_at, withheld.get(r.id),
                r.person_id, r.destination_mrn, (r.facility, r.mrn) if r.facility and r.mrn else None,
                b"TXA" in bytes(r.payload), _requeued(r),
                r.id not in withheld and _superseded(conn, r))
        for r in (found[i] for i in chosen)
    )
    return Claim(copies, due_at)


def _requeued(row: Any) -> bool:
    """Requeued by an operator without force: it must not land after a newer copy."""
    return row.retried_at is not None and not row.retry_forced


def _superseded(conn: Connection, row: Any) -> bool:
    return _requeued(row) and _delivered_since(conn, row) is not None


# The person a copy is about, the destination's record it names and the sender's record it is
# about, as they are now: the primary key and the (facility, mrn) unique key twice. A
# driver-level statement (the hot path: once per copy sent), in each driver's parameter style.
_SEND_CHECK = ("SELECT p.merged_into, p.protected, r.person_id, r.active, s.person_id, s.active FROM person p"
               " LEFT JOIN patient_record r ON r.facility = {destination} AND r.mrn = {mrn}"
               " LEFT JOIN patient_record s ON s.facility = {facility} AND s.mrn = {record}"
               " WHERE p.id = {person}")
_SEND_CHECK_SQL = {
    "postgresql": _SEND_CHECK.format(person="%(person)s", destination="%(destination)s", mrn="%(mrn)s",
                                     facility="%(facility)s", record="%(record)s"),
    "sqlite": _SEND_CHECK.format(person=":person", destination=":destination", mrn=":mrn", facility=":facility",
                                 record=":record"),
}
_OPTED_OUT = "withheld: the person has opted out"
_NOT_LINKED = "withheld: the destination's record is no longer linked to this person"
_NOT_ABOUT = "withheld: the record it is about is no longer linked to this person"


def send_check(conn: Connection, copy: Pending, config: Config) -> Withheld | Superseded | Rewritten | None:
    """What to record instead of sending a claimed copy, checked just before it is written
    to the destination: what ``claim_batch`` checked may have changed while the copies ahead
    of it were answered (an opt-out, a technician's split, a newer copy about the patient
    delivered after an operator requeued this one). None: send it; ``Rewritten``: send the
    copy as the destination's A47 or A40 rewrote it since the claim.

    One indexed read (the person by id, the destination's and the sender's records by their
    keys) answers the common case: a person not merged away, and both records still theirs.
    Anything else (a merge to follow, a record merged away, renamed or relinked, a copy of a
    document, whose stored lineage may have been re-typed, a requeued copy) takes the claim's
    whole check (``withheld_copies``, and for a requeued copy, newer copies delivered since).
    The configuration is the one the claim was checked against: it does not change while
    the exchange runs. Reads only; the usual copy with one driver-level statement, which
    opens no transaction of SQLAlchemy's: a caller on an autocommit connection pays one
    round trip (the rest begins one, which the caller ends)."""
    if not (copy.document or copy.requeued):
        if copy.person_id is None:
            return None  # nothing about a person to check; the configuration is as at the claim
        sql = _SEND_CHECK_SQL[conn.dialect.name]
        facility, record = copy.record or (None, None)
        with driver_cursor(conn, sql) as cursor:
            row = cursor.execute(sql, {"person": copy.person_id, "destination": copy.destination,
                                       "mrn": copy.destination_mrn, "facility": facility, "record": record}).fetchone()
        if row is not None and row[0] is None:  # the person, not merged away
            _, protected, owner, active, sender_owner, sender_active = row
            if protected:
                return Withheld(copy.id, _OPTED_OUT)
            if ((copy.destination_mrn is None or (active and owner == copy.person_id))
                    and (copy.record is None or (sender_active and sender_owner == copy.person_id))):
                return None
    row = conn.execute(_COPIES, {"ids": [copy.id]}).first()
    if row is None:
        return None  # gone (cannot happen: rows are never deleted); recording changes nothing
    why = withheld_copies(conn, [row], config).get(copy.id)
    if why is not None:
        return Withheld(copy.id, why)
    if _superseded(conn, row):
        return Superseded(copy.id)
    if bytes(row.payload) != copy.payload:  # renamed or merged by its destination since the claim
        return Rewritten(copy.id, bytes(row.payload), row.destination_mrn)
    return None


_UNROUTED = {  # why the configuration running now would not send a copy (last_error; no PHI)
    Reason.NOT_CONFIGURED: "withheld: the destination is no longer configured",
    Reason.NO_ENDPOINT: "withheld: the destination no longer has a deliver_to",
    Reason.EXCLUDED_DOCUMENT: "withheld: the destination now excludes this document type",
    Reason.CONFIDENTIAL: "withheld: the document is restricted (TXA-18) and the destination does not receive that",
    Reason.NOT_SUBSCRIBED: "withheld: the destination no longer subscribes to this event",
    Reason.RULE_REMOVED: "withheld: the [[route]] that sent it is gone or no longer names the destination",
}


def withheld_copies(conn: Connection, rows: Sequence[Any], config: Config) -> dict[int, str]:
    """Why each of these copies (rows of ``_CHECKED``) must not go out now, if it must
    not: the configuration running now would not send it (exchange.routing.recheck:
    the destination removed or without deliver_to, the document type excluded or restricted, the
    subscription or the rule that sent it gone), its person (followed through merges)
    opted out, or the destination's record it names, or the sender's record it is about,
    now belongs to another person (split off, relinked, an automatic link an update
    took back) or to nobody. Reads only."""
    out: dict[int, str] = {}
    for r in rows:
        why = recheck(_queued_event(conn, r), r.destination, r.reason, config.facilities, config.routes)
        if why is not None:
            out[r.id] = _UNROUTED.get(why, f"withheld: {why}")
    rows = [r for r in rows if r.person_id is not None and r.id not in out]
    owners = record_owners(conn, {(r.destination, r.destination_mrn) for r in rows if r.destination_mrn is not None}
                            | {(r.facility, r.mrn) for r in rows if r.facility and r.mrn})
    persons = live_persons(conn, {r.person_id for r in rows} | {p for p in owners.values() if p is not None})
    for r in rows:
        person, protected = persons[r.person_id]
        if protected:
            out[r.id] = _OPTED_OUT
            continue
        if r.destination_mrn is not None:
            owner = owners.get((r.destination, r.destination_mrn))
            if owner is None or persons[owner][0] != person:
                out[r.id] = _NOT_LINKED
                continue
        if r.facility and r.mrn:
            # the person of the sender's record now, None if no record has that MRN any more (an
            # A47 renamed it after it left the copy's person): withheld unless that is the copy's
            owner = owners.get((r.facility, r.mrn))
            if (persons[owner][0] if owner is not None else None) != person:
                out[r.id] = _NOT_ABOUT
    return out


def _queued_event(conn: Connection, row: Any) -> Event:
    """A queued copy's message as routing saw it (type, event, document types and its TXA-18),
    with every type and confidentiality status its document's stored chain of ancestors has
    now: a parent re-typed BH, or made very restricted, while the copy waited keeps it from a
    site that excludes BH, or does not receive that status."""
    txa = _txa(bytes(row.payload))
    if row.document_types is not None:
        document, types = _decode_document_types(row.document_types)
    else:  # queued before delivery.document_types: the copy's own TXA-2
        document = txa.value(2).upper() if txa is not None else ""
        types = (document,) if document else ()
    confidentiality: tuple[str, ...] = ()
    if txa is not None:
        own = txa_confidentiality(txa)
        lineage = document_lineage(conn, row.sender, (txa.value(12), txa.value(13))) if row.sender else Lineage()
        types = tuple(dict.fromkeys((*types, *sorted(lineage.types))))
        confidentiality = tuple(sorted({own, *lineage.confidentiality} - {""}))
    return Event(row.sender or "", (row.message_type or "").upper(), (row.event or "").upper(),
                 document_type=document, document_types=types, confidentiality=confidentiality)


def _txa(payload: bytes) -> Any:
    """The TXA segment of a stored copy (its document numbers are the sender's), or None."""
    if b"TXA" not in payload:
        return None
    header = read_header(payload)
    return Message(payload.decode(header.codec, "replace"), header.delimiters, header.codec).first("TXA")


def claim_next(conn: Connection, destination: str, now: datetime, *, config: Config) -> Pending | None:
    """The destination's oldest queued copy, if it is due at ``now``."""
    claim = claim_batch(conn, destination, now, limit=1, config=config)
    return claim.copies[0] if claim.copies else None


def _update(**values: Any):
    return (
        update(delivery)
        .where(delivery.c.id == bindparam("_id"), delivery.c.state == DeliveryState.QUEUED.value)
        .values(**values)
    )


_ATTEMPTS = delivery.c.attempts + 1
_DELIVERED = _update(
    state=DeliveryState.DELIVERED.value,
    attempts=_ATTEMPTS,
    delivered_at=bindparam("_at"),
    ack_code=bindparam("_code"),
    ack=bindparam("_ack"),
    next_attempt_at=None,
    last_error=None,
)
_FAILED = _update(
    state=DeliveryState.FAILED.value,
    attempts=_ATTEMPTS,
    ack_code=bindparam("_code"),
    ack=bindparam("_ack"),
    last_error=bindparam("_error"),
    next_attempt_at=None,
)
_RETRY = _update(
    attempts=_ATTEMPTS,
    next_attempt_at=bindparam("_next"),
    last_error=bindparam("_error"),
    ack_code=bindparam("_code"),
    ack=bindparam("_ack"),
)
_WITHHELD = _update(state=DeliveryState.WITHHELD.value, next_attempt_at=None, last_error=bindparam("_error"))
_SUPERSEDED = _update(state=DeliveryState.FAILED.value, next_attempt_at=None, last_error=SUPERSEDED)


def record_outcomes(conn: Connection, outcomes: Sequence[Outcome]) -> int:
    """Record attempts' outcomes (at most one statement per kind); the rows changed.

    Only queued rows change: an outcome for a copy that is no longer queued
    (recorded already) changes nothing.
    """
    delivered, failed, retries, withheld, superseded = [], [], [], [], []
    for o in outcomes:
        if isinstance(o, Superseded):
            superseded.append({"_id": o.id})
        elif isinstance(o, Withheld):
            withheld.append({"_id": o.id, "_error": storable(o.reason, MAX_ERROR_CHARS)})
        elif isinstance(o, Delivered):
            delivered.append({"_id": o.id, "_at": o.at, "_code": storable(o.ack_code, ACK_CODE_LEN), "_ack": o.ack})
        elif isinstance(o, Failed):
            failed.append(
                {
                    "_id": o.id,
                    "_code": storable(o.ack_code, ACK_CODE_LEN),
                    "_ack": o.ack,
                    "_error": storable(o.error, MAX_ERROR_CHARS),
                }
            )
        else:
            retries.append(
                {
                    "_id": o.id,
                    "_next": o.next_attempt_at,
                    "_error": storable(o.error, MAX_ERROR_CHARS),
                    "_code": storable(o.ack_code, ACK_CODE_LEN),
                    "_ack": o.ack,
                }
            )
    changed = 0
    for statement, params in ((_DELIVERED, delivered), (_FAILED, failed), (_RETRY, retries),
                              (_WITHHELD, withheld), (_SUPERSEDED, superseded)):
        if params:
            changed += conn.execute(statement, params).rowcount
    return changed


def mark_delivered(conn: Connection, delivery_id: int, *, at: datetime, ack_code: str, ack: bytes) -> bool:
    """queued -> delivered (the destination answered AA/CA); False if it was not queued."""
    return record_outcomes(conn, [Delivered(delivery_id, at, ack_code, ack)]) == 1


def mark_failed(
    conn: Connection, delivery_id: int, *, at: datetime, ack_code: str, ack: bytes, error: str
) -> bool:
    """queued -> failed (AE/AR/CE/CR, with the reason); False if it was not queued."""
    return record_outcomes(conn, [Failed(delivery_id, at, ack_code, ack, error)]) == 1


def schedule_retry(
    conn: Connection,
    delivery_id: int,
    *,
    next_attempt_at: datetime,
    error: str,
    ack_code: str | None = None,
    ack: bytes | None = None,
) -> bool:
    """Stays queued, not before ``next_attempt_at``; counts the attempt and says why."""
    return record_outcomes(conn, [RetryLater(delivery_id, next_attempt_at, error, ack_code, ack)]) == 1


def queue_depths(conn: Connection) -> dict[str, int]:
    """Queued copies per destination."""
    rows = conn.execute(
        select(delivery.c.destination, func.count())
        .where(delivery.c.state == DeliveryState.QUEUED.value)
        .group_by(delivery.c.destination)
    )
    return {destination: count for destination, count in rows}


# -- more than one node (PostgreSQL) ---------------------------------------------------

_LOCK_NAMESPACE = 0x45584348  # "EXCH": the first key of pg_try_advisory_lock(int, int)


def lock_key(destination: str) -> int:
    """The second advisory-lock key of a destination: the same on every node."""
    return advisory_key(destination)


def try_lock_destination(conn: Connection, destination: str) -> bool:
    """Take the destination's session-level advisory lock on ``conn`` (PostgreSQL).

    True if this connection holds it now (again: it is re-entrant). It stays
    held after the transaction ends, until ``unlock_destination`` or the
    session ends. Closing a pooled ``Connection`` does NOT end the session
    (the pool keeps it, lock and all): unlock first, or ``invalidate()`` it.
    SQLite (one node) always answers True.
    """
    if conn.dialect.name != "postgresql":
        return True
    return bool(
        conn.exec_driver_sql(
            "SELECT pg_try_advisory_lock(%(ns)s, %(key)s)", {"ns": _LOCK_NAMESPACE, "key": lock_key(destination)}
        ).scalar()
    )


def unlock_destination(conn: Connection, destination: str) -> None:
    """Release every hold of the destination's advisory lock taken on ``conn``."""
    if conn.dialect.name != "postgresql":
        return
    while conn.exec_driver_sql(
        "SELECT pg_advisory_unlock(%(ns)s, %(key)s)", {"ns": _LOCK_NAMESPACE, "key": lock_key(destination)}
    ).scalar():
        pass


# -- the operator and the API ------------------------------------------------------------

_VIEW_COLUMNS = (
    delivery.c.id,
    delivery.c.destination,
    delivery.c.state,
    delivery.c.attempts,
    delivery.c.last_error,
    delivery.c.control_id,
    delivery.c.created_at,
    delivery.c.next_attempt_at,
    delivery.c.delivered_at,
    delivery.c.ack_code,
    delivery.c.message_id,
    message.c.facility.label("message_facility"),
    message.c.control_id.label("message_control_id"),
    message.c.message_type,
    message.c.event,
    delivery.c.person_id,
    delivery.c.facility,
    delivery.c.mrn,
    delivery.c.reason,
    delivery.c.retried_by,
    delivery.c.retried_at,
    delivery.c.destination_mrn,
)
_VIEW = select(*_VIEW_COLUMNS).select_from(delivery.join(message, delivery.c.message_id == message.c.id))


def _view(row: Any) -> DeliveryView:
    values = row._asdict()
    values["state"] = DeliveryState(values["state"])
    return DeliveryView(**values)


def get_delivery(conn: Connection, delivery_id: int) -> DeliveryView | None:
    row = conn.execute(_VIEW.where(delivery.c.id == delivery_id)).first()
    return None if row is None else _view(row)


def list_deliveries(
    conn: Connection,
    state: DeliveryState | str | None = None,
    destination: str | None = None,
    limit: int = 100,
    *,
    person_id: int | None = None,
    after: int | None = None,
) -> list[DeliveryView]:
    """Deliveries by state / destination / person, at most ``limit`` (1 to 1000), the next page
    from ``after`` (the last id of the page before: its ``next``).

    Queued ones oldest first (the order they go out); otherwise newest first
    (``state=delivered`` is the accounting of disclosures, latest first). A person's are the
    copies about its patient (``_about_person``).
    """
    limit = max(1, min(limit, LIST_LIMIT_MAX))
    stmt = _VIEW
    if state is not None:
        state = DeliveryState(state)
        stmt = stmt.where(delivery.c.state == state.value)
    if after is not None:
        stmt = stmt.where(delivery.c.id > after if state is DeliveryState.QUEUED else delivery.c.id < after)
    if destination is not None:
        stmt = stmt.where(delivery.c.destination == destination)
    if person_id is not None:
        stmt = stmt.where(delivery.c.id.in_(_about_person(conn, person_id)))
    stmt = stmt.order_by(delivery.c.id if state is DeliveryState.QUEUED else delivery.c.id.desc())
    return [_view(row) for row in conn.execute(stmt.limit(limit))]


def _about_person(conn: Connection, person_id: int):
    """The ids of the copies about a person's patient, as its records stand now: a copy about
    one of the patient's records (``_patients_records``), and a copy recorded under the person
    (or one merged into it) whose sender's record no longer goes by that MRN (renamed). A copy
    about a record split off to another person is that person's, not this one's: a wrongly linked
    patient's disclosures follow the patient, and are never listed as another patient's."""
    persons = merged_persons(conn, person_id)
    keys = sorted(_patients_records(conn, persons))
    same_record = and_(patient_record.c.facility == delivery.c.facility, patient_record.c.mrn == delivery.c.mrn)
    by_person = select(delivery.c.id).where(delivery.c.person_id.in_(persons),
                                            ~select(patient_record.c.id).where(same_record).exists())
    if not keys:
        return by_person
    by_record = select(delivery.c.id).where(tuple_(delivery.c.facility, delivery.c.mrn).in_(keys))
    return union_all(by_record, by_person)


def _patients_records(conn: Connection, persons: list[int]) -> set[tuple[str, str]]:
    """The records of the patient ``persons`` hold now: their records, and the records a facility
    merged into one of them (A40), wherever the merged-away record's person was left -- but not a
    merged-away record whose survivor has since gone to another person (split off)."""
    rows = conn.execute(select(patient_record.c.facility, patient_record.c.mrn, patient_record.c.active)
                        .where(patient_record.c.person_id.in_(persons))).all()
    keys = {(r.facility, r.mrn) for r in rows}
    frontier = {(r.facility, r.mrn) for r in rows if r.active}
    for _ in range(MAX_MERGE_HOPS):  # the records merged into those, and into those in turn
        if not frontier:
            break
        found = {(r.facility, r.mrn) for r in conn.execute(
            select(patient_record.c.facility, patient_record.c.mrn)
            .where(~patient_record.c.active,
                   tuple_(patient_record.c.facility, patient_record.c.merged_into_mrn).in_(sorted(frontier))))}
        frontier = found - keys
        keys |= found
    owners = record_owners(conn, keys)  # the person of each record's survivor (None: no survivor)
    mine = {(r.facility, r.mrn) for r in rows}
    return {k for k in keys if owners.get(k) in persons or owners.get(k) is None and k in mine}


def message_deliveries(conn: Connection, message_id: int) -> list[DeliveryView]:
    """The copies of one inbound message, in the order they were queued."""
    return [_view(row) for row in conn.execute(_VIEW.where(delivery.c.message_id == message_id).order_by(delivery.c.id))]


def retry(
    conn: Connection, delivery_id: int, actor: str, now: datetime, *, config: Config, force: bool = False
) -> tuple[RetryResult, DeliveryView | None]:
    """An operator requeues a failed copy (failed -> queued, due at ``now``).

    Its attempts and last error stay until the next attempt; ``retried_by`` /
    ``retried_at`` say who and when. Being older than the copies queued
    since, it goes out next. NOT_FOUND / NOT_FAILED change nothing, nor does
    WITHHELD: the copy may not go out any more (``withheld_copies`` under
    ``config``, the configuration the exchange runs); nor SUPERSEDED, unless
    ``force``: a newer copy about the same patient (its person, or the same
    sender's record) reached the destination since, and this one would land
    after it, older news last. ``retry_forced`` keeps ``force``: unforced, the
    worker checks that again just before sending it (a newer copy in flight now
    may be delivered first) and gives it back failed (``SUPERSEDED``) if so.
    """
    row = conn.execute(select(*_CHECKED, delivery.c.state)
                       .select_from(_WITH_MESSAGE).where(delivery.c.id == delivery_id)).first()
    if row is not None and row.state == DeliveryState.FAILED.value:
        if withheld_copies(conn, [row], config):
            return RetryResult.WITHHELD, get_delivery(conn, delivery_id)
        if not force and _delivered_since(conn, row) is not None:
            return RetryResult.SUPERSEDED, get_delivery(conn, delivery_id)
    changed = conn.execute(
        update(delivery)
        .where(delivery.c.id == delivery_id, delivery.c.state == DeliveryState.FAILED.value)
        .values(
            state=DeliveryState.QUEUED.value,
            next_attempt_at=now,
            retried_by=storable(actor, ACTOR_NAME_LEN),
            retried_at=now,
            retry_forced=force,
        )
    ).rowcount
    view = get_delivery(conn, delivery_id)
    if view is None:
        return RetryResult.NOT_FOUND, None
    return (RetryResult.REQUEUED if changed else RetryResult.NOT_FAILED), view


def _delivered_since(conn: Connection, row: Any) -> int | None:
    """The id of a copy queued after ``row`` for its destination, about the same patient (the
    same person, the same record of the sender, or the same record of the destination: a merge
    since changes the first two, not the last), and delivered; None when there is none."""
    same_patient = [and_(delivery.c.facility == row.facility, delivery.c.mrn == row.mrn)]
    if row.person_id is not None:
        same_patient.append(delivery.c.person_id == row.person_id)
    if row.destination_mrn is not None:
        same_patient.append(delivery.c.destination_mrn == row.destination_mrn)
    return conn.execute(select(delivery.c.id).where(
        delivery.c.destination == row.destination, delivery.c.id > row.id,
        delivery.c.state == DeliveryState.DELIVERED.value, or_(*same_patient),
    ).order_by(delivery.c.id).limit(1)).scalar()
