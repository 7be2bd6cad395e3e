"""Workbench: users (salted scrypt password hashes, disabled, lock-out after failed
logins) and login sessions (only the SHA-256 of each session token), in the
database so that several `exchange serve` nodes share them

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29

Written against exchange/store/schema.py (types spelled without model
imports); tests/store/test_migrations.py compares them on SQLite and
PostgreSQL.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGSERIAL on PostgreSQL; INTEGER (the rowid, autoincrementing) on SQLite.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "workbench_user",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_logins", sa.Integer(), server_default="0", nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workbench_user")),
        sa.UniqueConstraint("name", name=op.f("uq_workbench_user_name")),
    )
    op.create_table(
        "workbench_session",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["workbench_user.id"], name=op.f("fk_workbench_session_user_id_workbench_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workbench_session")),
    )
    op.create_index(op.f("ix_workbench_session_expires_at"), "workbench_session", ["expires_at"], unique=False)
    op.create_index(op.f("ix_workbench_session_user_id"), "workbench_session", ["user_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_workbench_session_user_id"), table_name="workbench_session")
    op.drop_index(op.f("ix_workbench_session_expires_at"), table_name="workbench_session")
    op.drop_table("workbench_session")
    op.drop_table("workbench_user")
