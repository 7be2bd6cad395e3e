"""Outbox: the document types routing checked for each copy, so that the worker can check
them again, just before it sends the copy, against the configuration it runs now

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29

Written against exchange/store/schema.py (types spelled without model
imports); tests/store/test_migrations.py compares them on SQLite and
PostgreSQL. Copies queued before it have none (NULL): for them the worker
reads TXA-2 from the copy itself.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.add_column(sa.Column("document_types", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.drop_column("document_types")
