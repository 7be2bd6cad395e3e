"""Opt-out history: every time a person's opt-out is set or lifted (through the API, the
workbench, or a facility's PD1-12), which way, by whom, why and when

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28

Written against exchange/store/schema.py (types spelled without model
imports); tests/store/test_migrations.py compares them on SQLite and
PostgreSQL.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGSERIAL on PostgreSQL; INTEGER (the rowid, autoincrementing) on SQLite.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "opt_out_event",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("person_id", sa.BigInteger(), nullable=False),
        sa.Column("protected", sa.Boolean(), nullable=False),
        sa.Column("by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_opt_out_event")),
    )
    op.create_index(op.f("ix_opt_out_event_person_id"), "opt_out_event", ["person_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_opt_out_event_person_id"), table_name="opt_out_event")
    op.drop_table("opt_out_event")
