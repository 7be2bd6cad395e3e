"""The durable message store: SQLAlchemy 2 models (the Alembic migrations mirror them).

Every inbound MLLP frame becomes one ``message`` row holding the bytes exactly as
received, the header fields the intake read, the state it reached and the exact
ACK payload sent back; ``message_event`` is its state history (received state,
later transitions, every resend).

Dedup: ``(facility, control_id)`` -- MSH-4.1 and MSH-10 -- is unique among rows
with ``dedup`` true (accepted and error messages). Rejected and ignored messages
are stored with ``dedup`` false and never block a later copy: a message rejected
because the sender's configuration was wrong must be processed when resent.

The hot path (``exchange.store.messages``) uses the Core tables below
(``message_table``, ``message_event_table``); the ORM classes are for
convenience code and for Alembic autogenerate. Change a model here, then write
(or autogenerate and hand-check) a migration under ``exchange/migrations``;
``tests/store/test_migrations.py`` fails while the two disagree.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Fixed before the first revision: every constraint and index gets a
# predictable name, so later migrations can drop or alter it on both backends.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# BIGINT on PostgreSQL (BIGSERIAL); plain INTEGER on SQLite so that the column
# is the rowid and autoincrements.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Column lengths the store enforces before writing (exchange.store.messages
# truncates longer text; PostgreSQL would refuse it, SQLite would not).
FACILITY_LEN = 64  # MSH-4.1 (HD namespace id) as sent
CONTROL_ID_LEN = 199  # MSH-10 (ST, 199 in v2.5+)
SENDING_APPLICATION_LEN = 227  # MSH-3 (HD, 227 in v2.5)
CODE_LEN = 16  # MSH-9.1, MSH-9.2, MSH-9.3, MSH-11
VERSION_LEN = 32  # MSH-12
STATE_LEN = 16  # exchange.outcome.MessageState values
ACK_CODE_LEN = 2  # MSA-1
PEER_LEN = 128  # remote address or TLS subject


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``; SQLite stores the UTC wall time as text.
    Binding a naive datetime is a bug and raises ``ValueError``; values read
    back always carry ``tzinfo=timezone.utc``.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime: the store only takes timezone-aware datetimes")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = metadata


class Message(Base):
    """One inbound frame, stored raw before anything else is done with it."""

    __tablename__ = "message"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    facility: Mapped[str | None] = mapped_column(String(FACILITY_LEN))  # MSH-4.1, even if unknown
    control_id: Mapped[str | None] = mapped_column(String(CONTROL_ID_LEN))  # MSH-10
    sending_application: Mapped[str] = mapped_column(String(SENDING_APPLICATION_LEN))  # MSH-3
    message_type: Mapped[str] = mapped_column(String(CODE_LEN))  # MSH-9.1
    event: Mapped[str] = mapped_column(String(CODE_LEN))  # MSH-9.2 (EVN-1 in v2.1/2.2)
    structure: Mapped[str] = mapped_column(String(CODE_LEN))  # MSH-9.3 as sent
    version: Mapped[str] = mapped_column(String(VERSION_LEN))  # MSH-12
    processing_id: Mapped[str] = mapped_column(String(CODE_LEN))  # MSH-11
    state: Mapped[str] = mapped_column(String(STATE_LEN))  # exchange.outcome.MessageState
    ack_code: Mapped[str | None] = mapped_column(String(ACK_CODE_LEN))  # MSA-1 sent
    ack: Mapped[bytes | None] = mapped_column(LargeBinary)  # the ACK payload sent, exactly (unframed)
    reason: Mapped[str | None] = mapped_column(Text)  # why not accepted; never PHI
    peer: Mapped[str] = mapped_column(String(PEER_LEN))
    raw: Mapped[bytes] = mapped_column(LargeBinary)  # the frame payload exactly as received
    size: Mapped[int] = mapped_column(Integer)  # len(raw)
    dedup: Mapped[bool] = mapped_column(Boolean)  # takes part in (facility, control_id) dedup

    __table_args__ = (
        # The dedup key. Partial: rejected/ignored rows (dedup false) never
        # collide. On SQLite the predicate is spelled "dedup = 1" because that is
        # how SQLAlchemy renders a Boolean test there, and SQLite only uses a
        # partial index when the query repeats the index's WHERE term.
        Index(
            "uq_message_facility_control_id",
            "facility",
            "control_id",
            unique=True,
            sqlite_where=dedup.column == true(),
            postgresql_where=dedup.column,
        ),
        # Look-ups by key of any message, dedup or not (API, support).
        Index("ix_message_facility_control_id", "facility", "control_id"),
    )


class MessageEvent(Base):
    """One entry of a message's state history (RESENT entries included)."""

    __tablename__ = "message_event"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("message.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(String(STATE_LEN))
    detail: Mapped[str | None] = mapped_column(Text)  # reason or peer; never PHI


message_table = Message.__table__
message_event_table = MessageEvent.__table__


# -- HTTP API: bearer tokens and the audit trail ----------------------------------

TOKEN_NAME_LEN = 64  # who a token belongs to (a person or a system); the audit actor
ROLE_LEN = 16  # exchange.auth.Role values
TOKEN_HASH_LEN = 64  # sha256, hex
AUDIT_WORD_LEN = 32  # exchange.audit action / resource / outcome values
AUDIT_KEY_LEN = 199  # the resource's key: MSH-10, an MRN, a person or review id


class ApiToken(Base):
    """A bearer token of the HTTP API. Only its sha256 is stored, never the token."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(TOKEN_NAME_LEN), unique=True)
    role: Mapped[str] = mapped_column(String(ROLE_LEN))  # exchange.auth.Role
    token_hash: Mapped[str] = mapped_column(String(TOKEN_HASH_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEvent(Base):
    """One attempt to read (or change) patient-related data through the API.

    The only place request identifiers (facility, control id, MRN) are
    written down: the log never gets them.
    """

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(TOKEN_NAME_LEN))  # api_token.name
    role: Mapped[str] = mapped_column(String(ROLE_LEN))
    action: Mapped[str] = mapped_column(String(AUDIT_WORD_LEN))  # exchange.audit.Action
    resource: Mapped[str] = mapped_column(String(AUDIT_WORD_LEN))  # exchange.audit.Resource
    facility: Mapped[str | None] = mapped_column(String(FACILITY_LEN))
    key: Mapped[str | None] = mapped_column(String(AUDIT_KEY_LEN))
    outcome: Mapped[str] = mapped_column(String(AUDIT_WORD_LEN))  # exchange.audit.Outcome
    remote: Mapped[str | None] = mapped_column(String(PEER_LEN))  # client address

    __table_args__ = (
        # "who looked at this record": by resource key.
        Index("ix_audit_event_facility_key", "facility", "key"),
    )


api_token_table = ApiToken.__table__
audit_event_table = AuditEvent.__table__
