"""Delivery outbox: one row per routed copy and destination (FIFO per
destination), its state, attempts, last error and the destination's ACK;
the delivered rows are the accounting of disclosures

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

Written against exchange/store/schema.py (types spelled without model
imports); tests/store/test_migrations.py compares them on SQLite and
PostgreSQL.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGSERIAL on PostgreSQL; INTEGER (the rowid, autoincrementing) on SQLite.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "delivery",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("person_id", sa.BigInteger(), nullable=True),
        sa.Column("facility", sa.String(length=64), nullable=True),
        sa.Column("mrn", sa.String(length=199), nullable=True),
        sa.Column("reason", sa.String(length=128), nullable=True),
        sa.Column("control_id", sa.String(length=199), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ack_code", sa.String(length=2), nullable=True),
        sa.Column("ack", sa.LargeBinary(), nullable=True),
        sa.Column("retried_by", sa.String(length=64), nullable=True),
        sa.Column("retried_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"], name=op.f("fk_delivery_message_id_message")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery")),
    )
    op.create_index("ix_delivery_destination_state_id", "delivery", ["destination", "state", "id"], unique=False)
    op.create_index(op.f("ix_delivery_message_id"), "delivery", ["message_id"], unique=False)
    op.create_index(op.f("ix_delivery_person_id"), "delivery", ["person_id"], unique=False)
    op.create_index("ix_delivery_state_id", "delivery", ["state", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_delivery_state_id", table_name="delivery")
    op.drop_index(op.f("ix_delivery_person_id"), table_name="delivery")
    op.drop_index(op.f("ix_delivery_message_id"), table_name="delivery")
    op.drop_index("ix_delivery_destination_state_id", table_name="delivery")
    op.drop_table("delivery")
