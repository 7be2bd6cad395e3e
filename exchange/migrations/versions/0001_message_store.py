"""message store: every inbound message, raw, with its state history

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Hand-checked against exchange/store/schema.py (tests/store/test_migrations.py
compares them on SQLite and PostgreSQL). Self-contained on purpose: revisions
never import the models, which keep changing.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGSERIAL on PostgreSQL; INTEGER (the rowid, autoincrementing) on SQLite.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "message",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("facility", sa.String(length=64), nullable=True),
        sa.Column("control_id", sa.String(length=199), nullable=True),
        sa.Column("sending_application", sa.String(length=227), nullable=False),
        sa.Column("message_type", sa.String(length=16), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("structure", sa.String(length=16), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("processing_id", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("ack_code", sa.String(length=2), nullable=True),
        sa.Column("ack", sa.LargeBinary(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("peer", sa.String(length=128), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("dedup", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message")),
    )
    op.create_index(op.f("ix_message_received_at"), "message", ["received_at"], unique=False)
    op.create_index(
        "ix_message_facility_control_id", "message", ["facility", "control_id"], unique=False
    )
    # The dedup key, partial: only accepted/error messages (dedup true) take part.
    # "dedup = 1" on SQLite is how SQLAlchemy spells the test in queries there;
    # SQLite uses a partial index only for queries repeating its WHERE term.
    op.create_index(
        "uq_message_facility_control_id",
        "message",
        ["facility", "control_id"],
        unique=True,
        sqlite_where=sa.text("dedup = 1"),
        postgresql_where=sa.text("dedup"),
    )

    op.create_table(
        "message_event",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["message.id"],
            name=op.f("fk_message_event_message_id_message"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_event")),
    )
    op.create_index(
        op.f("ix_message_event_message_id"), "message_event", ["message_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_message_event_message_id"), table_name="message_event")
    op.drop_table("message_event")
    op.drop_index("uq_message_facility_control_id", table_name="message")
    op.drop_index("ix_message_facility_control_id", table_name="message")
    op.drop_index(op.f("ix_message_received_at"), table_name="message")
    op.drop_table("message")
