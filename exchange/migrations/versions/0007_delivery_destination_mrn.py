"""Outbox: the destination's MRN of each copy, so that the worker can check, just before
it sends a copy, that the destination's record still belongs to the copy's person

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28

Written against exchange/store/schema.py (types spelled without model
imports); tests/store/test_migrations.py compares them on SQLite and
PostgreSQL. Copies queued before it have none (NULL): for them the worker
checks the opt-out only.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.add_column(sa.Column("destination_mrn", sa.String(length=199), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.drop_column("destination_mrn")
