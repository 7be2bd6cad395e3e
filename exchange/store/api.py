"""Read functions for the HTTP API.

Each takes a ``Connection`` whose transaction the caller owns and returns
plain values (frozen dataclasses), never ORM rows, so the result can cross
from the database thread pool to the reactor thread. The raw message and the
ACK bytes are never read here: the API does not return them.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select

from exchange.outcome import MessageState
from exchange.store.messages import HistoryEntry, dedup_key, message_history
from exchange.store.outbox import DeliveryView, message_deliveries
from exchange.store.schema import message_table as message


@dataclass(frozen=True, slots=True)
class MessageSummary:
    """A stored message as the API shows it: its header, state and history."""

    id: int
    facility: str | None  # MSH-4.1
    control_id: str | None  # MSH-10
    message_type: str  # MSH-9.1
    event: str  # MSH-9.2
    structure: str  # MSH-9.3
    version: str  # MSH-12
    state: MessageState
    ack_code: str | None  # MSA-1 sent
    received_at: datetime
    reason: str | None
    history: tuple[HistoryEntry, ...]
    deliveries: tuple[DeliveryView, ...] = ()  # its routed copies, in the order queued


_SUMMARY_COLUMNS = (
    message.c.id,
    message.c.facility,
    message.c.control_id,
    message.c.message_type,
    message.c.event,
    message.c.structure,
    message.c.version,
    message.c.state,
    message.c.ack_code,
    message.c.received_at,
    message.c.reason,
)


def message_summary(conn: Connection, facility: str, control_id: str) -> MessageSummary | None:
    """The message stored under (facility, control_id), as ``get_message``
    picks it: the dedup one (the message applied) if any, else the latest."""
    facility_, control_id_ = dedup_key(facility, control_id)
    row = conn.execute(
        select(*_SUMMARY_COLUMNS)
        .where(message.c.facility == facility_, message.c.control_id == control_id_)
        .order_by(message.c.dedup.desc(), message.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    return MessageSummary(
        id=row.id,
        facility=row.facility,
        control_id=row.control_id,
        message_type=row.message_type,
        event=row.event,
        structure=row.structure,
        version=row.version,
        state=MessageState(row.state),
        ack_code=row.ack_code,
        received_at=row.received_at,
        reason=row.reason,
        history=tuple(message_history(conn, row.id)),
        deliveries=tuple(message_deliveries(conn, row.id)),
    )
