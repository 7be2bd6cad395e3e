"""Outbox: whether an operator's requeue was forced ("even after newer copies"), so that the
worker, just before sending a requeued copy, gives an unforced one back (failed) when a newer
copy about the same patient reached the destination after the requeue was allowed

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-28

Written against exchange/store/schema.py (types spelled without model
imports); tests/store/test_migrations.py compares them on SQLite and
PostgreSQL. Copies requeued before it count as not forced.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.add_column(sa.Column("retry_forced", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.drop_column("retry_forced")
