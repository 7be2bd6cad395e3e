"""The durable message store: SQLAlchemy 2 models (the Alembic migrations mirror them).

Every inbound MLLP frame becomes one ``message`` row holding the bytes exactly as
received, the header fields the intake read, the state it reached and the exact
ACK payload sent back; ``message_event`` is its state history (received state,
later transitions, every resend).

Dedup: ``(facility, control_id)`` -- MSH-4.1 and MSH-10 -- is unique among rows
with ``dedup`` true (accepted and error messages). Rejected and ignored messages
are stored with ``dedup`` false and never block a later copy: a message rejected
because the sender's configuration was wrong must be processed when resent. So is
a message stored unapplied because processing it raised (``pipeline.unapplied``).

The hot path (``exchange.store.messages``) uses the Core tables below
(``message_table``, ``message_event_table``); the ORM classes are for
convenience code and for Alembic autogenerate. Change a model here, then write
(or autogenerate and hand-check) a migration under ``exchange/migrations``;
``tests/store/test_migrations.py`` fails while the two disagree.
"""
from __future__ import annotations

from datetime import date, datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from exchange.hl7.header import MAX_CONTROL_ID
from exchange.mapping.values import MAX_DOCUMENT_NUMBER, MAX_MRN, MAX_VISIT

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
CONTROL_ID_LEN = MAX_CONTROL_ID  # MSH-10: longer ones are refused (exchange.acceptance)
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


# -- The record model: facility patient records, encounters, documents ----------------
#
# Written by exchange.store.records (load -> MemoryState -> save). Each row keeps
# its exact value objects in a portable JSON column (``data``/``fields``,
# serialised by exchange.store.records.to_json); the plain columns next to it
# are derived from them for searching and for the API views.

MRN_LEN = MAX_MRN  # CX.1: longer ones are refused (exchange.mapping)
AUTHORITY_LEN = 227  # CX.4 (HD)
ID_TYPE_LEN = 16  # CX.5
NAME_LEN = 194  # XPN.1 / XPN.2
SEX_LEN = 16  # PID-8
POSTCODE_LEN = 32  # XAD.5
PHONE_LEN = 64  # XTN.1
SSN_LEN = 32  # PID-19
VISIT_LEN = MAX_VISIT  # PV1-19 (CX): longer ones are refused
PATIENT_CLASS_LEN = 16  # PV1-2
LOCATION_LEN = 400  # PL as "point of care^room^bed^facility"
TS_LEN = 40  # an HL7 timestamp as ISO text with its precision
DOCUMENT_NUMBER_LEN = MAX_DOCUMENT_NUMBER  # TXA-12.1 (EI): longer ones are refused
DOCUMENT_CODE_LEN = 250  # TXA-2, TXA-17, TXA-19
CONTENT_TYPE_LEN = 255
EVENT_LEN = 16  # trigger event or operation kind
RECORD_EVENT_KIND_LEN = 32
LINK_LEN = 16  # how a record is linked to its person: auto / manual / source
MATCH_KEY_LEN = 64  # a blocking key (exchange.matching.features.blocking_keys)
ACTOR_LEN = 128  # who decided: a token name, or "exchange" for automatic decisions
# Text of any length that an older revision declared VARCHAR(128): SQLite keeps any length in
# it (and cannot alter a column without rebuilding its table), PostgreSQL needed migration 0016.
LONG_TEXT = Text().with_variant(String(ACTOR_LEN), "sqlite")
MAX_MERGE_HOPS = 100  # person.merged_into chains are followed at most this far (longer: a loop)


class Person(Base):
    """An enterprise person. One per facility record until the patient index links them."""

    __tablename__ = "person"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # a technician merged it into that person (or an A40 emptied it): indexed, for the persons
    # merged into one (a patient's accounting of disclosures)
    merged_into: Mapped[int | None] = mapped_column(BigInteger, index=True)
    # Opt-out: no copy about this person goes anywhere. The holds it stands on, a JSON list
    # (exchange.store.consent): a facility's PD1-12 = Y ("PD1-12 <facility>"), a technician's
    # ("api <token name>", "workbench <user>").
    protected: Mapped[bool] = mapped_column(Boolean, server_default=false())
    protected_by: Mapped[str | None] = mapped_column(LONG_TEXT)


class PatientRecord(Base):
    """A facility's patient record, keyed (facility, MRN). Merged-away MRNs stay, inactive."""

    __tablename__ = "patient_record"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    facility: Mapped[str] = mapped_column(String(FACILITY_LEN))  # MSH-4.1
    mrn: Mapped[str] = mapped_column(String(MRN_LEN))  # PID-3.1 chosen as the MRN
    authority: Mapped[str] = mapped_column(String(AUTHORITY_LEN))  # the MRN's CX.4 ("" if none)
    person_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("person.id"), index=True)
    active: Mapped[bool] = mapped_column(Boolean)
    merged_into_mrn: Mapped[str | None] = mapped_column(String(MRN_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    data: Mapped[dict] = mapped_column(JSON)  # the record's value objects, exactly
    # Plain copies for reading and reporting; the patient index searches record_key, not these
    # (an index on each cost five random B-tree pages per record written).
    family_name: Mapped[str | None] = mapped_column(String(NAME_LEN))  # PID-5.1 (legal)
    given_name: Mapped[str | None] = mapped_column(String(NAME_LEN))  # PID-5.2
    birth_date: Mapped[date | None] = mapped_column(Date)  # PID-7, day precision or finer
    sex: Mapped[str | None] = mapped_column(String(SEX_LEN))  # PID-8
    postcode: Mapped[str | None] = mapped_column(String(POSTCODE_LEN))  # PID-11.5 (first)
    phone: Mapped[str | None] = mapped_column(String(PHONE_LEN))  # PID-13.1 (first)
    ssn: Mapped[str | None] = mapped_column(String(SSN_LEN))  # PID-19
    # The patient index: how the record came to its person, and what it is matched on.
    link: Mapped[str] = mapped_column(String(LINK_LEN), server_default="auto")  # auto / manual / source
    link_score: Mapped[float | None] = mapped_column(Float)  # the automatic link's score (bits)
    features: Mapped[str | None] = mapped_column(Text)  # exchange.matching.features.encode_features

    __table_args__ = (
        UniqueConstraint("facility", "mrn"),
        # "records merged into this one" (load follows merged_into both ways)
        Index("ix_patient_record_facility_merged_into_mrn", "facility", "merged_into_mrn"),
    )


class RecordIdentifier(Base):
    """Every PID-3 identifier of a record (with its authority and type), for look-ups."""

    __tablename__ = "record_identifier"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    record_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("patient_record.id", ondelete="CASCADE"), index=True
    )
    authority: Mapped[str] = mapped_column(String(AUTHORITY_LEN))  # CX.4.1, else CX.4.2
    value: Mapped[str] = mapped_column(String(MRN_LEN))  # CX.1
    type: Mapped[str] = mapped_column(String(ID_TYPE_LEN))  # CX.5

    __table_args__ = (Index("ix_record_identifier_authority_value", "authority", "value"),)


class Encounter(Base):
    """One visit (PV1-19) of a record."""

    __tablename__ = "encounter"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    record_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("patient_record.id", ondelete="CASCADE"))
    visit_number: Mapped[str] = mapped_column(String(VISIT_LEN))  # PV1-19
    patient_class: Mapped[str | None] = mapped_column(String(PATIENT_CLASS_LEN))  # PV1-2
    status: Mapped[str] = mapped_column(String(STATE_LEN))  # exchange.mapping.events.EncounterStatus
    location: Mapped[str | None] = mapped_column(String(LOCATION_LEN))  # PV1-3
    prior_location: Mapped[str | None] = mapped_column(String(LOCATION_LEN))  # PV1-6
    attending: Mapped[dict | None] = mapped_column(JSON)  # PV1-7
    admitted_at: Mapped[str | None] = mapped_column(String(TS_LEN))  # PV1-44, ISO with its precision
    discharged_at: Mapped[str | None] = mapped_column(String(TS_LEN))  # PV1-45
    data: Mapped[dict] = mapped_column(JSON)  # the encounter's value objects, exactly

    __table_args__ = (UniqueConstraint("record_id", "visit_number"),)


class Document(Base):
    """A document (TXA-12) of a facility; its columns describe the current version."""

    __tablename__ = "document"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    facility: Mapped[str] = mapped_column(String(FACILITY_LEN))
    number: Mapped[str] = mapped_column(String(DOCUMENT_NUMBER_LEN))  # TXA-12.1
    record_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("patient_record.id"), index=True)
    type: Mapped[str | None] = mapped_column(String(DOCUMENT_CODE_LEN))  # TXA-2
    parent: Mapped[str | None] = mapped_column(String(DOCUMENT_NUMBER_LEN))  # TXA-13
    completion_status: Mapped[str | None] = mapped_column(String(DOCUMENT_CODE_LEN))  # TXA-17
    availability: Mapped[str | None] = mapped_column(String(DOCUMENT_CODE_LEN))  # TXA-19
    # TXA-18, upper case (table 0272: V very restricted, R restricted, U usual control): the most
    # restricted of its own as the sender last stated it and its parent's when last read
    # (``inherited_confidentiality``, so a whole chain's); routing also reads it up the chain of
    # parents as they are now (exchange.routing).
    confidentiality: Mapped[str | None] = mapped_column(String(DOCUMENT_CODE_LEN))
    inherited_confidentiality: Mapped[str | None] = mapped_column(String(DOCUMENT_CODE_LEN))
    state: Mapped[str] = mapped_column(String(STATE_LEN))  # exchange.mapping.events.DocumentState
    version: Mapped[int] = mapped_column(Integer)  # number of versions
    # For routing (exchange.mapping.state.document_types): every type, upper case, the document
    # and its ancestors ever had, as a JSON list (a re-typed BH note stays BH for exclusions);
    # and the type of the parent it was filed under, for versions that name none.
    types: Mapped[str | None] = mapped_column(Text)
    inherited_type: Mapped[str | None] = mapped_column(String(DOCUMENT_CODE_LEN))

    __table_args__ = (UniqueConstraint("facility", "number"),)


class DocumentVersion(Base):
    """Every version of a document, with the event and the message that made it."""

    __tablename__ = "document_version"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    document_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("document.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    event: Mapped[str] = mapped_column(String(EVENT_LEN))  # T02, T08, ...
    message_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("message.id"), index=True)
    content_type: Mapped[str | None] = mapped_column(String(CONTENT_TYPE_LEN))
    text: Mapped[str | None] = mapped_column(Text)  # OBX TX/FT/ST content
    data: Mapped[bytes | None] = mapped_column(LargeBinary)  # OBX ED/RP content, decoded
    size: Mapped[int] = mapped_column(Integer)
    fields: Mapped[dict] = mapped_column(JSON)  # every other field's value objects, exactly

    __table_args__ = (UniqueConstraint("document_id", "version"),)


class LinkAssertionRow(Base):
    """A source-asserted link (A24) or unlink (A37) of two records of a facility: the latest one."""

    __tablename__ = "link_assertion"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    facility: Mapped[str] = mapped_column(String(FACILITY_LEN))
    mrn_a: Mapped[str] = mapped_column(String(MRN_LEN))  # the smaller MRN
    mrn_b: Mapped[str] = mapped_column(String(MRN_LEN))
    linked: Mapped[bool] = mapped_column(Boolean)
    message_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("message.id"))

    __table_args__ = (UniqueConstraint("facility", "mrn_a", "mrn_b"),)


class RecordEvent(Base):
    """History of the record model: which message changed what (one row per operation)."""

    __tablename__ = "record_event"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("message.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(RECORD_EVENT_KIND_LEN))  # operation class name
    facility: Mapped[str] = mapped_column(String(FACILITY_LEN))
    key: Mapped[list] = mapped_column(JSON)  # the operation's key (MRNs, visit, document number...)


class RecordKey(Base):
    """The patient index's blocking keys: candidates are the active records sharing a key."""

    __tablename__ = "record_key"

    key: Mapped[str] = mapped_column(String(MATCH_KEY_LEN), primary_key=True)
    record_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("patient_record.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class MatchReview(Base):
    """A match a technician must decide: a record and the records it may (or must not) be linked to."""

    __tablename__ = "match_review"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    state: Mapped[str] = mapped_column(String(STATE_LEN), index=True)  # open / resolved / superseded
    kind: Mapped[str] = mapped_column(String(32))  # candidate / duplicate / link_looks_wrong / merge_conflict
    facility: Mapped[str] = mapped_column(String(FACILITY_LEN))  # the record the review is about
    mrn: Mapped[str] = mapped_column(String(MRN_LEN))
    person_id: Mapped[int | None] = mapped_column(BigInteger)  # the suggested person
    score: Mapped[float | None] = mapped_column(Float)  # best total (bits)
    detail: Mapped[dict] = mapped_column(JSON)  # candidates with every field's level and weight, thresholds, reasons
    message_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("message.id"))  # what opened it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    decided_by: Mapped[str | None] = mapped_column(String(ACTOR_LEN))
    decision: Mapped[str | None] = mapped_column(String(32))  # link / not-a-match
    note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_match_review_facility_mrn", "facility", "mrn"),)


class MatchPair(Base):
    """A sticky fact about two records: never link them automatically (a technician's
    "not a match", or a facility's A37). Stored both ways round for index look-ups."""

    __tablename__ = "match_pair"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    facility: Mapped[str] = mapped_column(String(FACILITY_LEN))
    mrn: Mapped[str] = mapped_column(String(MRN_LEN))
    other_facility: Mapped[str] = mapped_column(String(FACILITY_LEN))
    other_mrn: Mapped[str] = mapped_column(String(MRN_LEN))
    active: Mapped[bool] = mapped_column(Boolean)  # false once undone
    decision_id: Mapped[int | None] = mapped_column(BigInteger, index=True)  # the decision that said so (undo)

    __table_args__ = (Index("ix_match_pair_facility_mrn", "facility", "mrn"),)


class LinkEvent(Base):
    """Every change of a record's person, automatic or by a technician: who, when, why; undoable."""

    __tablename__ = "link_event"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # Events of one decision share it: the id of the decision's first event (NULL: the event is its own decision).
    decision: Mapped[int | None] = mapped_column(BigInteger, index=True)
    kind: Mapped[str] = mapped_column(String(32))  # auto / link / not-a-match / split / merge / source / undo
    facility: Mapped[str] = mapped_column(String(FACILITY_LEN))
    mrn: Mapped[str] = mapped_column(String(MRN_LEN))
    from_person: Mapped[int | None] = mapped_column(BigInteger, index=True)  # a person's history
    to_person: Mapped[int | None] = mapped_column(BigInteger, index=True)
    from_link: Mapped[str | None] = mapped_column(String(LINK_LEN))
    to_link: Mapped[str | None] = mapped_column(String(LINK_LEN))
    score: Mapped[float | None] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(ACTOR_LEN))
    reason: Mapped[str | None] = mapped_column(Text)
    review_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    message_id: Mapped[int | None] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    undone_by: Mapped[int | None] = mapped_column(BigInteger)  # the decision that undid this one

    __table_args__ = (Index("ix_link_event_facility_mrn", "facility", "mrn"),)


class OptOutEvent(Base):
    """Every change of a person's opt-out: which way, by whom, why, and when. (``person``
    holds the current state; this, how it came to be.)"""

    __tablename__ = "opt_out_event"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    person_id: Mapped[int] = mapped_column(BigInteger, index=True)  # no FK: replay renumbers persons
    protected: Mapped[bool] = mapped_column(Boolean)  # set (true) or lifted (false)
    # "api NAME", "workbench NAME", "PD1-12 FACILITY" (holds carried along: several, in one line)
    by: Mapped[str] = mapped_column(LONG_TEXT)
    reason: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[int | None] = mapped_column(BigInteger)  # PD1-12: the message that said it
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class MatchModel(Base):
    """Fellegi-Sunter parameters (exchange.matching.model.Model.to_json); the newest row is used."""

    __tablename__ = "match_model"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    model: Mapped[str] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)


person_table = Person.__table__
patient_record_table = PatientRecord.__table__
record_identifier_table = RecordIdentifier.__table__
encounter_table = Encounter.__table__
document_table = Document.__table__
document_version_table = DocumentVersion.__table__
link_assertion_table = LinkAssertionRow.__table__
record_event_table = RecordEvent.__table__
record_key_table = RecordKey.__table__
match_review_table = MatchReview.__table__
match_pair_table = MatchPair.__table__
link_event_table = LinkEvent.__table__
match_model_table = MatchModel.__table__
opt_out_event_table = OptOutEvent.__table__


# -- Delivery: the outbox of routed copies, and the accounting of disclosures ----------
#
# Written by exchange.store.outbox: ``enqueue`` in the intake's transaction (the
# copies are durable before the inbound ACK), then the delivery worker
# (exchange.delivery) moves each row queued -> delivered | failed. Rows are never
# deleted: the delivered ones are the accounting of disclosures (who received
# what about whom, when).

DELIVERY_REASON_LEN = 128  # "default" (by subscription) or the [[route]] name that added the copy
ACTOR_NAME_LEN = 64  # an api_token.name


class Delivery(Base):
    """One copy of an inbound message for one destination facility: exactly the bytes sent."""

    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)  # FIFO order within a destination
    destination: Mapped[str] = mapped_column(String(FACILITY_LEN))  # the receiving facility's code
    message_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("message.id"), index=True)  # the inbound message
    person_id: Mapped[int | None] = mapped_column(BigInteger, index=True)  # whom it is about (no FK: replay renumbers persons)
    facility: Mapped[str | None] = mapped_column(String(FACILITY_LEN))  # the patient record it is about:
    mrn: Mapped[str | None] = mapped_column(String(MRN_LEN))  # the sending facility's record (MSH-4, PID-3.1)
    # The destination's own record the copy names in PID-3 (None: a rule sent it without one);
    # checked again just before sending: still that person's.
    destination_mrn: Mapped[str | None] = mapped_column(String(MRN_LEN))
    reason: Mapped[str | None] = mapped_column(String(DELIVERY_REASON_LEN))  # why it was routed
    # The document types routing checked, as a JSON list: the copy's own (TXA-2, else the type
    # stored for its document; "" for none) first, then the others that count for
    # exclude_documents (its parent's); [] for a copy of no document. Checked again, with the
    # message's type and event and ``reason``, against the configuration the worker runs
    # when it sends the copy. NULL: queued before 0009 (the worker reads TXA-2 from ``payload``).
    document_types: Mapped[str | None] = mapped_column(Text)
    # The sender's visit the copy is about (PV1-19, else PV1-50; "" for none): a cancel (A11, A13...)
    # goes only where something about its visit went before. NULL: queued before 0012.
    visit: Mapped[str | None] = mapped_column(String(VISIT_LEN))
    control_id: Mapped[str] = mapped_column(String(CONTROL_ID_LEN))  # the copy's MSH-10 (its ACK's MSA-2)
    payload: Mapped[bytes] = mapped_column(LargeBinary)  # the copy exactly as sent (unframed)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(String(STATE_LEN))  # exchange.store.outbox.DeliveryState
    attempts: Mapped[int] = mapped_column(Integer)  # sends that got an answer or failed
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # queued: not before then
    last_error: Mapped[str | None] = mapped_column(Text)  # why the last attempt did not deliver
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # when the destination's AA/CA came
    ack_code: Mapped[str | None] = mapped_column(String(ACK_CODE_LEN))  # MSA-1 received
    ack: Mapped[bytes | None] = mapped_column(LargeBinary)  # the destination's ACK payload, exactly
    retried_by: Mapped[str | None] = mapped_column(String(ACTOR_NAME_LEN))  # the operator who last requeued it
    retried_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The last requeue was forced: sent even after newer copies about the patient reached the
    # destination. Unforced, the worker checks again just before sending it (a newer copy may
    # have been in flight at the requeue) and gives it back, failed, rather than land it late.
    retry_forced: Mapped[bool] = mapped_column(Boolean, server_default=false())

    __table_args__ = (
        # The worker's "oldest queued copy of this destination", queue depths, and
        # the API's listing by destination.
        Index("ix_delivery_destination_state_id", "destination", "state", "id"),
        # The API's listing by state.
        Index("ix_delivery_state_id", "state", "id"),
        # Routing a cancel: the destinations sent something about the sender's visit (or, for
        # copies without a visit number or queued before 0012, about the sender's record).
        Index("ix_delivery_facility_visit", "facility", "visit", "mrn"),
        # A patient's accounting of disclosures: the copies about each of the person's records.
        Index("ix_delivery_facility_mrn", "facility", "mrn"),
    )


delivery_table = Delivery.__table__


# -- The workbench: its users (technicians, admins) and their login sessions ------------
#
# Written by exchange.accounts. A password is stored only as a salted scrypt hash
# (its parameters inside it); a session only as the SHA-256 of its cookie's token,
# so a copy of the database yields neither. Sessions live in the database, not in
# a process, so that several `exchange serve` nodes on one PostgreSQL share them.

USER_NAME_LEN = 64  # the login name; the audit trail's actor (like api_token.name)
PASSWORD_HASH_LEN = 255  # "scrypt$n$r$p$salt$hash" (exchange.accounts.hash_password)
SESSION_ID_LEN = 64  # sha256 of the session token, hex
CSRF_TOKEN_LEN = 64


class WorkbenchUser(Base):
    """Someone who logs in to the workbench: a records technician or an admin."""

    __tablename__ = "workbench_user"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(USER_NAME_LEN), unique=True)
    role: Mapped[str] = mapped_column(String(ROLE_LEN))  # exchange.auth.Role
    password_hash: Mapped[str] = mapped_column(String(PASSWORD_HASH_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # set: no login, no session
    failed_logins: Mapped[int] = mapped_column(Integer, server_default="0")  # failures since the last success
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())  # too many failures: no login before


class WorkbenchSession(Base):
    """A logged-in browser. ``id`` is the SHA-256 (hex) of the cookie's token, never the token."""

    __tablename__ = "workbench_session"

    id: Mapped[str] = mapped_column(String(SESSION_ID_LEN), primary_key=True)
    user_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("workbench_user.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)  # absolute end (created + max)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())  # idle expiry counts from here
    csrf_token: Mapped[str] = mapped_column(String(CSRF_TOKEN_LEN))  # every POST form carries it


workbench_user_table = WorkbenchUser.__table__
workbench_session_table = WorkbenchSession.__table__
