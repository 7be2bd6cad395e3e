"""Outbox: the sender's visit each copy is about, so that a cancel (A11, A12, A13...) goes
only to destinations that were sent something about that visit

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-28

Written against exchange/store/schema.py (types spelled without model
imports); tests/store/test_migrations.py compares them on SQLite and
PostgreSQL. Copies queued before it have none (NULL): routing counts such a
copy about the same patient record as one about any of its visits.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.add_column(sa.Column("visit", sa.String(length=250), nullable=True))
    op.create_index("ix_delivery_facility_visit", "delivery", ["facility", "visit", "mrn"])


def downgrade() -> None:
    op.drop_index("ix_delivery_facility_visit", table_name="delivery")
    with op.batch_alter_table("delivery") as batch:
        batch.drop_column("visit")
