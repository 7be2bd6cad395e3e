"""Batch primitives of the message store, for the one writer thread.

Every function takes a ``Connection`` whose transaction the caller owns (and
commits: nothing here commits) and returns plain values -- frozen dataclasses,
ints, tuples -- never ORM rows, so results can cross to the reactor thread.

The hot path is one batch of up to a few hundred messages per transaction
(group commit): ``find_prior`` (one SELECT), ``insert_messages`` and, for
duplicates, ``record_resent``. The number of statements does not grow with
the batch:

- PostgreSQL is bound by round trips, and by psycopg converting a statement
  with thousands of bound parameters (it does not cache those: ~10 us per
  parameter here), which is what insertmanyvalues sends. So each column
  travels as one array: ``find_prior`` joins ``unnest(facilities,
  control_ids)``, and ``insert_messages`` is ONE statement (``INSERT ...
  SELECT FROM unnest(...)``, the history rows in a CTE) with 17 parameters in
  psycopg's binary format whatever the batch size. Measured here at 100
  messages per batch: ~10,000 msg/s, against ~3,000 with insertmanyvalues.
- SQLite has no round trips but SQLAlchemy's per-statement overhead
  (~70 us) dominates there, so the hot path uses the sqlite3 cursor under the
  connection: one indexed SELECT per key, one multi-row INSERT ... RETURNING
  for the messages, one executemany for their history rows.

Text is made storable before it is written, identically on both backends:
NUL characters (which PostgreSQL refuses in text) become U+FFFD, unencodable
lone surrogates become "?", and text longer than its column (PostgreSQL
refuses it, SQLite would keep it) is cut to the column's length. ``raw`` keeps
every byte, so nothing is lost. The dedup key goes through the same
normalisation in ``find_prior``, ``insert_messages`` and ``get_message`` (see
``dedup_key``), so a message whose MSH-4/MSH-10 had to be cleaned is still
found again when resent. A bad header must never make a whole batch fail.

Unique-key conflicts: ``insert_messages`` does not check the dedup index
itself; ``find_prior`` in the same transaction is what keeps duplicates out.
If a row with ``dedup=True`` repeats the (facility, control_id) of a stored
dedup row (or of another dedup row in the same call), the database raises
``sqlalchemy.exc.IntegrityError``. That leaves the transaction unusable on
PostgreSQL: the caller rolls back the whole batch and falls back (e.g. to one
message per transaction, repeating ``find_prior``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, func, insert, select
from sqlalchemy.dialects import postgresql

from exchange.outcome import MessageState
from exchange.store.db import driver_cursor, sqlite_datetime
from exchange.store.schema import (
    ACK_CODE_LEN,
    CODE_LEN,
    CONTROL_ID_LEN,
    FACILITY_LEN,
    PEER_LEN,
    SENDING_APPLICATION_LEN,
    VERSION_LEN,
    message_event_table as message_event,
    message_table as message,
)

# Keys per find_prior statement (on SQLite 2 bound parameters each, well
# under its limit of 32766).
FIND_PRIOR_CHUNK = 500


@dataclass(frozen=True, slots=True)
class NewMessage:
    """One message to store, as the intake decided it."""

    raw: bytes  # the frame payload exactly as received
    received_at: datetime  # timezone-aware
    facility: str | None  # MSH-4.1 as sent, even if unknown
    control_id: str | None  # MSH-10
    sending_application: str  # MSH-3
    message_type: str  # MSH-9.1
    event: str  # MSH-9.2
    structure: str  # MSH-9.3
    version: str  # MSH-12
    processing_id: str  # MSH-11
    state: MessageState
    ack_code: str | None  # MSA-1 of the ACK sent
    ack: bytes | None  # the ACK payload sent, exactly (None: nothing sent)
    reason: str | None  # why not accepted; never PHI
    peer: str  # remote address / TLS subject
    dedup: bool  # takes part in (facility, control_id) dedup: accepted and error messages (not unapplied ones)


@dataclass(frozen=True, slots=True)
class PriorAnswer:
    """What a stored dedup message was answered: sent again for a resend."""

    message_id: int
    ack: bytes | None
    ack_code: str | None
    state: str  # a MessageState value


@dataclass(frozen=True, slots=True)
class MessageView:
    """A stored message, every column, as plain values."""

    id: int
    received_at: datetime
    facility: str | None
    control_id: str | None
    sending_application: str
    message_type: str
    event: str
    structure: str
    version: str
    processing_id: str
    state: MessageState
    ack_code: str | None
    ack: bytes | None
    reason: str | None
    peer: str
    raw: bytes
    size: int
    dedup: bool


class HistoryEntry(NamedTuple):
    """One row of a message's state history (compares equal to a plain tuple)."""

    at: datetime
    state: MessageState
    detail: str | None


# -- text normalisation -----------------------------------------------------------


def _clean(value: str, limit: int | None = None) -> str:
    """``value`` as both backends will store it (see module doc). ~100 ns for ASCII."""
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if limit is not None and len(value) > limit:
        value = value[:limit]
    return value


def _clean_opt(value: str | None, limit: int | None = None) -> str | None:
    return None if value is None else _clean(value, limit)


def dedup_key(facility: str | None, control_id: str | None) -> tuple[str | None, str | None]:
    """(facility, control_id) exactly as stored and compared by the store.

    Identity for every sane header; differs only for text the database could
    not store (NUL, lone surrogates, longer than the column). Use it if you
    need to compare keys within a batch the way the unique index will.
    """
    return _clean_opt(facility, FACILITY_LEN), _clean_opt(control_id, CONTROL_ID_LEN)


# -- dedup ------------------------------------------------------------------------


# PostgreSQL: the keys as two arrays (one round trip, two parameters); each
# key is an index look-up (nested loop over the unnest) on a real table.
# Driver-level SQL on the psycopg cursor, like the SQLite hot path: it
# spares SQLAlchemy's per-statement overhead.
_PG_FIND_PRIOR = """
    SELECT m.id, m.facility, m.control_id, m.ack, m.ack_code, m.state
    FROM unnest(%(facilities)s::varchar[], %(control_ids)s::varchar[]) AS k (facility, control_id)
    JOIN message AS m ON m.facility = k.facility AND m.control_id = k.control_id
    WHERE m.dedup
    """


# SQLite: driver-level statements on the sqlite3 cursor. SQLAlchemy's
# statement execution costs ~70 us per statement here (compile-cache lookup,
# parameter processing, result set-up), more than SQLite's own work; the writer
# runs three of them per batch while the reactor waits for the GIL.
# ``dedup = 1`` repeats the partial unique index's WHERE term, which SQLite
# needs before it will use that index.
_SQLITE_FIND_PRIOR = (
    "SELECT id, facility, control_id, ack, ack_code, state FROM message"
    " WHERE dedup = 1 AND facility = ? AND control_id = ?"
)


def _sqlite_find_prior(conn: Connection, keys: Sequence[tuple[str, str]]) -> list[tuple]:
    with driver_cursor(conn, _SQLITE_FIND_PRIOR) as cursor:
        rows = []
        for key in keys:  # each an index look-up; no round trips on SQLite
            rows.extend(cursor.execute(_SQLITE_FIND_PRIOR, key).fetchall())
        return rows


@functools.lru_cache(maxsize=64)
def _sqlite_insert_sql(count: int) -> str:
    names = ", ".join(_MESSAGE_COLUMNS)
    row = "(" + ", ".join("?" * len(_MESSAGE_COLUMNS)) + ")"
    return f"INSERT INTO message ({names}) VALUES " + ", ".join([row] * count) + " RETURNING id"


_SQLITE_INSERT_EVENT = "INSERT INTO message_event (message_id, at, state, detail) VALUES (?, ?, ?, ?)"
_SQLITE_MAX_ROWS = 1000  # 17 parameters a row: under SQLite's 32766-variable limit


def find_prior(
    conn: Connection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], PriorAnswer]:
    """The stored dedup message for each (facility, control_id), if any.

    One SELECT per 500 distinct keys. Only rows with ``dedup`` true count:
    rejected and ignored messages never answer for a resend. Keys with a None
    part never match (NULLs do not take part in the unique index either).
    The result is keyed by the caller's keys; absent means "new".
    """
    callers_by_stored: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key in keys:
        facility, control_id = key
        if facility is None or control_id is None:
            continue
        stored = dedup_key(facility, control_id)
        callers = callers_by_stored.setdefault(stored, [])  # type: ignore[arg-type]
        if key not in callers:
            callers.append(key)
    if not callers_by_stored:
        return {}

    found: dict[tuple[str, str], PriorAnswer] = {}
    wanted = list(callers_by_stored)
    for start in range(0, len(wanted), FIND_PRIOR_CHUNK):
        chunk = wanted[start : start + FIND_PRIOR_CHUNK]
        if conn.dialect.name == "postgresql":
            with driver_cursor(conn, _PG_FIND_PRIOR) as cursor:
                # Never a prepared statement: a generic plan made while the
                # table was small (a fresh database) keeps scanning it as it
                # grows (0.9 -> 9 ms per batch within 20,000 messages). The
                # insert, by contrast, gains ~300 us from its generic plan.
                cursor.execute(
                    _PG_FIND_PRIOR,
                    {"facilities": [k[0] for k in chunk], "control_ids": [k[1] for k in chunk]},
                    prepare=False,
                )
                rows = cursor.fetchall()
        else:
            rows = _sqlite_find_prior(conn, chunk)
        for id_, facility, control_id, ack, ack_code, state in rows:
            answer = PriorAnswer(id_, ack, ack_code, state)
            for caller_key in callers_by_stored.get((facility, control_id), ()):
                found[caller_key] = answer
    return found


# -- inserts ----------------------------------------------------------------------


_MESSAGE_COLUMNS = (
    "received_at",
    "facility",
    "control_id",
    "sending_application",
    "message_type",
    "event",
    "structure",
    "version",
    "processing_id",
    "state",
    "ack_code",
    "ack",
    "reason",
    "peer",
    "raw",
    "size",
    "dedup",
)
if set(_MESSAGE_COLUMNS) != {c.name for c in message.c} - {"id"}:  # the schema changed: update here
    raise RuntimeError("exchange.store.messages._MESSAGE_COLUMNS does not match the message table")


def _message_params(row: NewMessage) -> dict[str, Any]:
    received_at = row.received_at
    if received_at.tzinfo is None or received_at.utcoffset() is None:
        raise ValueError("naive datetime: the store only takes timezone-aware datetimes")
    raw = row.raw
    return {
        "received_at": received_at,
        "facility": _clean_opt(row.facility, FACILITY_LEN),
        "control_id": _clean_opt(row.control_id, CONTROL_ID_LEN),
        "sending_application": _clean(row.sending_application, SENDING_APPLICATION_LEN),
        "message_type": _clean(row.message_type, CODE_LEN),
        "event": _clean(row.event, CODE_LEN),
        "structure": _clean(row.structure, CODE_LEN),
        "version": _clean(row.version, VERSION_LEN),
        "processing_id": _clean(row.processing_id, CODE_LEN),
        "state": MessageState(row.state).value,
        "ack_code": _clean_opt(row.ack_code, ACK_CODE_LEN),
        "ack": row.ack,
        "reason": _clean_opt(row.reason),
        "peer": _clean(row.peer, PEER_LEN),
        "raw": raw,
        "size": len(raw),
        "dedup": bool(row.dedup),
    }


def _pg_insert_sql() -> str:
    """PostgreSQL: every message and its first history row in ONE statement.

    Each column is bound as one array, sent in psycopg's binary format
    (``%(raw)b``: no escaping or hex-encoding of the payloads on either side;
    measured here ~50% faster than text) and cast to the column's type, taken
    from the table so it cannot drift. Rows are inserted in array order
    (``WITH ORDINALITY ... ORDER BY``), so the BIGSERIAL ids are ascending in
    the order given -- the property SQLAlchemy's insertmanyvalues relies on
    for ``sort_by_parameter_order`` -- and ``ORDER BY id`` returns them in that
    order. The history CTE runs even though nothing selects from it.
    Driver-level SQL (psycopg placeholders): run with ``exec_driver_sql``.
    """
    pg = postgresql.dialect()
    names = ", ".join(_MESSAGE_COLUMNS)
    arrays = ", ".join(
        f"CAST(%({name})b AS {message.c[name].type.compile(dialect=pg)}[])" for name in _MESSAGE_COLUMNS
    )
    return f"""
        WITH new AS (
            INSERT INTO message ({names})
            SELECT {names}
            FROM unnest({arrays}) WITH ORDINALITY AS u ({names}, ord)
            ORDER BY ord
            RETURNING id, received_at, state, reason
        ), history AS (
            INSERT INTO message_event (message_id, at, state, detail)
            SELECT id, received_at, state, reason FROM new
        )
        SELECT id FROM new ORDER BY id
        """


_PG_INSERT = _pg_insert_sql()
_INSERT_EVENT = insert(message_event)


def insert_messages(conn: Connection, rows: Sequence[NewMessage]) -> list[int]:
    """Store messages and their first history entry; their ids, in the order given.

    Each message gets one ``message_event`` row (its state, at its
    ``received_at``, detail = its reason). One statement per call on
    PostgreSQL; two on SQLite (per 1000 messages). Raises ``ValueError`` for a
    naive ``received_at`` and ``IntegrityError`` on a dedup-key conflict (see
    the module doc: the caller rolls back and falls back).
    """
    if not rows:
        return []
    params = [_message_params(row) for row in rows]
    if conn.dialect.name == "postgresql":
        arrays = {name: [p[name] for p in params] for name in _MESSAGE_COLUMNS}
        with driver_cursor(conn, _PG_INSERT) as cursor:
            cursor.execute(_PG_INSERT, arrays)
            ids = [row[0] for row in cursor.fetchall()]
    else:
        ids = _sqlite_insert(conn, params)
    if len(ids) != len(params):  # pragma: no cover - a driver bug, not a data problem
        raise RuntimeError(f"inserted {len(params)} messages, got {len(ids)} ids")
    return ids


def _sqlite_insert(conn: Connection, params: list[dict[str, Any]]) -> list[int]:
    """Multi-row ``INSERT ... RETURNING id``, then the history rows.

    SQLite gives each new row max(rowid)+1 in VALUES order while this
    transaction holds the write lock, so ascending ids are parameter order.
    (No AUTOINCREMENT keyword, and ids never near 2**63-1, where SQLite picks
    at random.)
    """
    with driver_cursor(conn, "INSERT INTO message ...") as cursor:
        ids: list[int] = []
        for start in range(0, len(params), _SQLITE_MAX_ROWS):
            chunk = params[start : start + _SQLITE_MAX_ROWS]
            flat: list[Any] = []
            for p in chunk:
                p["received_at"] = sqlite_datetime(p["received_at"])
                p["dedup"] = int(p["dedup"])
                flat.extend(p[name] for name in _MESSAGE_COLUMNS)
            ids.extend(sorted(r[0] for r in cursor.execute(_sqlite_insert_sql(len(chunk)), flat).fetchall()))
        cursor.executemany(
            _SQLITE_INSERT_EVENT,
            [(id_, p["received_at"], p["state"], p["reason"]) for id_, p in zip(ids, params)],
        )
        return ids


def record_resent(conn: Connection, items: Sequence[tuple[int, datetime, str]]) -> None:
    """One RESENT history row per (message id, received at, peer); one statement."""
    if not items:
        return
    conn.execute(
        _INSERT_EVENT,
        [
            {
                "message_id": message_id,
                "at": at,
                "state": MessageState.RESENT.value,
                "detail": _clean(peer),
            }
            for message_id, at, peer in items
        ],
    )


def update_answer(conn: Connection, message_id: int, ack: bytes | None, reason: str | None) -> None:
    """A stored message's answer and reason, changed before its batch commits (nothing has been
    sent: the patient index held back part of what it asked, ``pipeline.process_batch``)."""
    conn.execute(message.update().where(message.c.id == message_id).values(ack=ack, reason=_clean_opt(reason)))


# -- reads (API, tests) -------------------------------------------------------------


def get_message(conn: Connection, facility: str | None, control_id: str | None) -> MessageView | None:
    """The message stored under (facility, control_id): the dedup one if there
    is one (the message that was applied), else the latest one received."""
    facility, control_id = dedup_key(facility, control_id)
    stmt = (
        select(message)
        .where(message.c.facility == facility, message.c.control_id == control_id)
        .order_by(message.c.dedup.desc(), message.c.id.desc())
        .limit(1)
    )
    row = conn.execute(stmt).mappings().first()
    if row is None:
        return None
    values_ = dict(row)
    values_["state"] = MessageState(values_["state"])
    values_["dedup"] = bool(values_["dedup"])
    return MessageView(**values_)


def count_messages(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(message)).scalar_one()


def message_history(conn: Connection, message_id: int) -> list[HistoryEntry]:
    """A message's history, in the order it was recorded."""
    stmt = (
        select(message_event.c.at, message_event.c.state, message_event.c.detail)
        .where(message_event.c.message_id == message_id)
        .order_by(message_event.c.id)
    )
    return [HistoryEntry(at, MessageState(state), detail) for at, state, detail in conn.execute(stmt)]
