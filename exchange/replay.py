"""Rebuild the record model from the stored raw messages (``exchange replay``).

After a mapping bug is fixed, the record model is rebuilt from what was
received: every stored message that was applied (state ``accepted``, type
ADT or MDM) is read again from its raw bytes and re-applied in arrival order
(``message.id``), in batches, through the live path's own steps
(``pipeline.decode``, ``records.load``, ``pipeline.map_and_apply``,
``records.save``), each change tied to the real message id. Messages that
were answered AE/AR, inbound ACKs and resends are not applied, as they were
not the first time.

    TRANSACTION (one, for the whole rebuild): lock the message store against
    writers, note every record's person, delete every row of the record model
    (history, links, document versions, documents, encounters, identifiers,
    blocking keys, records), re-apply
    the messages batch by batch, commit. Any failure rolls it all back: the
    old record model stays as it was.

A message that no longer applies (the fixed mapping now answers AE, its
facility is no longer configured, its charset no longer decodes) is left
out and reported with its id, facility, control id, HL7 error code and
field: never its content. Message rows are not changed: they still say what
was answered at the time.

The exchange must be stopped while this runs. On PostgreSQL the
transaction first takes the rebuild advisory lock (``db.REBUILD_LOCK``)
exclusively, so no reconciliation job reads a half-rebuilt model (TRUNCATE
is not MVCC-safe: a job started meanwhile skips, one already running is
waited for), then locks the message store (EXCLUSIVE: readers go on,
writers wait) and the record-model tables (ACCESS EXCLUSIVE), waiting at
most ``lock_timeout`` seconds for each; on SQLite the transaction takes the
write lock up front (``BEGIN IMMEDIATE``, waiting at most the busy
timeout), and a job's read transaction keeps its WAL snapshot: it sees the
model as it was before, or after the commit. Either way a writer cannot interleave: a batch
committed before the lock is replayed, one after the commit is applied to
the rebuilt model. If the lock cannot be had, :class:`DatabaseBusy`.

Persons are kept: every record keeps the person, link and score it had, so
the patient index's decisions (a technician's links and "not a match", the
reviews, the link history) survive the rebuild. A record that was not there
before (its facility or message was left out of an earlier replay) goes back
to the person its link history (``link_event``) names last, followed through
merges to the live person, with its link kind (a technician's link stays
"manual"); nothing is written for it unless that person was merged since (one
link event, from the old person to the live one). Only a record without
history, or whose person no longer exists, gets a person of its own: it is
not matched, because the index is half rebuilt while a replay runs (later
batches' records are not there yet) and a replay opens no reviews; the
command reports how many. Persons the rebuild created that hold no record at
its end (given to a record a later batch renamed, A47) are deleted. Blocking
keys and features are recomputed.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import OperationalError

from exchange.hl7.header import read_header
from exchange.mapping.events import FacilityContext, needs
from exchange.outcome import ACCEPTED, MessageState, Value, Verdict
from exchange.pipeline import MAPPED_TYPES, Received, decode, map_and_apply, pending_ref
from exchange.matching.model import default_model
from exchange.store import index as patient_index
from exchange.store.db import LOCK_NOT_AVAILABLE, lock_rebuild, sqlstate, write_transaction
from exchange.store.records import load as load_records
from exchange.store.records import save as save_records
from exchange.store.schema import (
    document_table,
    message_table as message,
    patient_record_table,
)

# The record model's tables, referring tables first (the order rows are deleted in).
# Persons and the patient index's decisions (reviews, sticky pairs, link history) are
# not rebuilt: they refer to records by (facility, MRN), and every record keeps its person.
RECORD_MODEL_TABLES = (
    "record_event",
    "link_assertion",
    "document_version",
    "document",
    "encounter",
    "record_identifier",
    "record_key",
    "patient_record",
)

MODEL = default_model()  # only its thresholds are written, with reviews, and a replay opens none
DEFAULT_BATCH = 500
BATCH_BYTES = 64 * 1024 * 1024  # raw bytes read per batch at most (one message always)
DEFAULT_LOCK_TIMEOUT = 10.0  # seconds (PostgreSQL)


class DatabaseBusy(Exception):
    """Another connection holds the database (a running exchange): nothing was changed."""


@dataclass(frozen=True, slots=True)
class NotApplied(Value):
    """A stored, once-applied message the rebuild left out. PHI-free."""

    message_id: int
    facility: str | None  # MSH-4.1
    control_id: str | None  # MSH-10
    code: int  # HL7 table 0357
    location: str  # the field to blame ("TXA-13"), or ""


@dataclass(frozen=True, slots=True)
class ReplayReport(Value):
    messages: int  # messages re-applied
    records: int  # facility patient records after the rebuild
    documents: int  # documents after the rebuild
    not_applied: tuple[NotApplied, ...] = ()
    committed: bool = True  # False for a dry run (rolled back)
    restored: int = 0  # records without a saved link back with the person their link history names
    lost_persons: int = 0  # records whose link history's person no longer exists: a person of their own


@dataclass(slots=True)
class _Rebuilt:
    """What the batches leave for the end of the rebuild."""

    restored: dict[tuple[str, str], patient_index.LastLink] = field(default_factory=dict)  # placed by link history
    new_persons: set[int] = field(default_factory=set)  # persons the rebuild created


class _DryRun(Exception):
    def __init__(self, report: ReplayReport) -> None:
        self.report = report


def replay(
    engine: Engine,
    facilities: Mapping[str, FacilityContext],
    *,
    charset_for: Callable[[str], str] | None = None,
    batch: int = DEFAULT_BATCH,
    now: Callable[[], datetime] | None = None,
    dry_run: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> ReplayReport:
    """Rebuild the record model from the stored messages; see the module doc.

    ``facilities``: MSH-4.1 -> its context (``exchange.config.facility_contexts``);
    ``charset_for``: MSH-4.1 -> the codec used when MSH-18 is empty, as the
    intake reads headers (default UTF-8). ``batch``: messages per batch (and
    at most BATCH_BYTES of them). ``now`` stamps the rebuilt rows and their
    history; by default each batch is stamped with the arrival time of its
    last message, close to when the live path made the same changes.
    ``dry_run`` rolls the rebuild back and only reports.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    charset_for = charset_for or (lambda facility: "utf-8")
    try:
        # /* TRANSACTION: the whole rebuilt record model (or nothing). */
        with write_transaction(engine) as conn:
            _lock(conn, lock_timeout)
            saved = patient_index.saved_links(conn)
            _clear(conn)
            applied = 0
            not_applied: list[NotApplied] = []
            rebuilt = _Rebuilt()
            after = 0
            while True:
                last = _batch_end(conn, after, batch)
                if last is None:
                    break
                rows = conn.execute(
                    select(message.c.id, message.c.raw, message.c.received_at, message.c.peer,
                           message.c.facility, message.c.control_id)
                    .where(message.c.id > after, message.c.id <= last, *_REPLAYED)
                    .order_by(message.c.id)
                ).all()
                after = last
                at = now() if now is not None else rows[-1].received_at
                done, left_out = _replay_batch(conn, rows, facilities, charset_for, at, saved, rebuilt)
                applied += done
                not_applied.extend(left_out)
            # the link events of records placed by their history are written now, not at an arrival time
            restored = patient_index.write_restored(conn, rebuilt.restored,
                                                    now() if now is not None else datetime.now(timezone.utc))
            patient_index.drop_unused_persons(conn, rebuilt.new_persons)
            report = ReplayReport(
                messages=applied,
                records=conn.execute(select(func.count()).select_from(patient_record_table)).scalar_one(),
                documents=conn.execute(select(func.count()).select_from(document_table)).scalar_one(),
                not_applied=tuple(not_applied),
                committed=not dry_run,
                restored=restored.back,
                lost_persons=restored.lost,
            )
            if dry_run:
                raise _DryRun(report)
    except _DryRun as rolled_back:
        return rolled_back.report
    except OperationalError as exc:
        if _is_busy(exc):
            raise DatabaseBusy(
                "the database is in use (is the exchange running? stop it first): nothing was changed"
            ) from None
        raise
    return report


_REPLAYED = (  # the messages the live path applied: accepted ADT/MDM
    message.c.state == MessageState.ACCEPTED.value,
    message.c.message_type.in_(sorted(MAPPED_TYPES)),
)


def _batch_end(conn: Connection, after: int, batch: int) -> int | None:
    """The id of the last message of the next batch: ``batch`` messages, at most BATCH_BYTES of raw."""
    heads = conn.execute(
        select(message.c.id, message.c.size).where(message.c.id > after, *_REPLAYED)
        .order_by(message.c.id).limit(batch)
    ).all()
    if not heads:
        return None
    last, total = heads[0].id, 0
    for head in heads:
        total += head.size
        if total > BATCH_BYTES and head.id != heads[0].id:
            break
        last = head.id
    return last


def _replay_batch(conn: Connection, rows, facilities, charset_for, at: datetime,
                  saved: dict, rebuilt: _Rebuilt) -> tuple[int, list[NotApplied]]:
    """One batch: decode, load its records, map and apply in order, save; as the writer does."""
    items = [
        Received(raw=bytes(r.raw), header=read_header(bytes(r.raw), charset_for), decision=ACCEPTED,
                 received_at=r.received_at, peer=r.peer)
        for r in rows
    ]
    decoded = [decode(index, item) for index, item in enumerate(items)]
    left_out: list[NotApplied] = []
    to_map = []
    for d in decoded:
        row, header = rows[d.index], items[d.index].header
        if d.outcome.verdict is Verdict.ACCEPT and header.facility not in facilities:
            left_out.append(NotApplied(row.id, row.facility, row.control_id, 103, "MSH-4"))
        elif d.outcome.verdict is Verdict.ACCEPT and d.message is not None:
            to_map.append(d)
        elif d.outcome.verdict is not Verdict.ACCEPT:  # e.g. MSH-18 no longer decodes
            problem = d.outcome.problem
            left_out.append(NotApplied(row.id, row.facility, row.control_id,
                                       problem.code if problem else 207, problem.location if problem else ""))
    if not to_map:
        return 0, left_out
    contexts = [facilities[items[d.index].header.facility] for d in to_map]
    state = load_records(conn, [needs(d.message, ctx) for d, ctx in zip(to_map, contexts)])
    applied = 0
    for d, ctx in zip(to_map, contexts):
        map_and_apply(d, items[d.index], ctx, state)
        if d.outcome.verdict is Verdict.ACCEPT:
            applied += 1
        else:
            row, problem = rows[d.index], d.outcome.problem
            left_out.append(NotApplied(row.id, row.facility, row.control_id,
                                       problem.code if problem else 207, problem.location if problem else ""))
    state.rebase_refs({pending_ref(d.index): rows[d.index].id for d in to_map})
    history = patient_index.last_links(conn, patient_index.unsaved_records(state, saved))
    plan = patient_index.restore(state, saved, history)
    save_records(conn, state, at, links=plan.links)
    patient_index.write(conn, plan, state, MODEL, at)
    ids = state.store_ids["records"]
    rebuilt.new_persons.update(ids[key][1] for key, link in plan.links.items() if isinstance(link.person, str))
    rebuilt.restored.update(plan.restored)
    left_out.sort(key=lambda n: n.message_id)
    return applied, left_out


def _lock(conn: Connection, timeout: float) -> None:
    """PostgreSQL: keep the reconciliation jobs and the writers out for the whole rebuild
    (SQLite: BEGIN IMMEDIATE did; a job reading there keeps its snapshot of before)."""
    if conn.dialect.name != "postgresql":
        return
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, int(timeout * 1000))}")
    try:
        lock_rebuild(conn)  # first: a job holds it while it reads, never waiting for a table lock of ours
    except OperationalError as exc:
        if _is_busy(exc):
            raise DatabaseBusy("a reconciliation job is reading the database (exchange reconcile): "
                               "try again when it is done; nothing was changed") from None
        raise
    conn.exec_driver_sql("LOCK TABLE message IN EXCLUSIVE MODE")
    conn.exec_driver_sql(f"LOCK TABLE {', '.join(RECORD_MODEL_TABLES)} IN ACCESS EXCLUSIVE MODE")
    conn.exec_driver_sql("SET LOCAL lock_timeout = 0")


def _clear(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":  # one statement; the tables are locked already
        conn.exec_driver_sql(f"TRUNCATE {', '.join(RECORD_MODEL_TABLES)}")
        return
    for table in RECORD_MODEL_TABLES:
        conn.exec_driver_sql(f"DELETE FROM {table}")


def _is_busy(exc: OperationalError) -> bool:
    """SQLite "database is locked" after its busy timeout; PostgreSQL lock_timeout (55P03)."""
    return sqlstate(exc) == LOCK_NOT_AVAILABLE or "database is locked" in str(exc.orig)


__all__ = ["DatabaseBusy", "NotApplied", "ReplayReport", "RECORD_MODEL_TABLES", "replay"]
