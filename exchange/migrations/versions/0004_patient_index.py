"""Patient index: blocking keys, each record's link kind, score and features,
reviews, sticky not-a-match pairs, the link history and the matching model;
the per-column demographic indexes of patient_record are dropped (the index
searches record_key)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

Written against exchange/store/schema.py; tests/store/test_migrations.py
compares them on SQLite and PostgreSQL.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
DEMOGRAPHIC_INDEXES = ("birth_date", "family_name", "phone", "postcode", "ssn")


def upgrade() -> None:
    for column in DEMOGRAPHIC_INDEXES:
        op.drop_index(f"ix_patient_record_{column}", table_name="patient_record")
    op.add_column("person", sa.Column("merged_into", sa.BigInteger(), nullable=True))
    op.add_column("person", sa.Column("protected", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("person", sa.Column("protected_by", sa.String(length=128), nullable=True))
    op.add_column("patient_record", sa.Column("link", sa.String(length=16), server_default="auto", nullable=False))
    op.add_column("patient_record", sa.Column("link_score", sa.Float(), nullable=True))
    op.add_column("patient_record", sa.Column("features", sa.Text(), nullable=True))

    op.create_table(
        "record_key",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("record_id", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["record_id"], ["patient_record.id"], name=op.f("fk_record_key_record_id_patient_record"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("key", "record_id", name=op.f("pk_record_key")),
    )
    op.create_index(op.f("ix_record_key_record_id"), "record_key", ["record_id"], unique=False)

    op.create_table(
        "match_review",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("facility", sa.String(length=64), nullable=False),
        sa.Column("mrn", sa.String(length=199), nullable=False),
        sa.Column("person_id", sa.BigInteger(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.String(length=128), nullable=True),
        sa.Column("decision", sa.String(length=32), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"], name=op.f("fk_match_review_message_id_message")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_match_review")),
    )
    op.create_index("ix_match_review_facility_mrn", "match_review", ["facility", "mrn"], unique=False)
    op.create_index(op.f("ix_match_review_state"), "match_review", ["state"], unique=False)

    op.create_table(
        "match_pair",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("facility", sa.String(length=64), nullable=False),
        sa.Column("mrn", sa.String(length=199), nullable=False),
        sa.Column("other_facility", sa.String(length=64), nullable=False),
        sa.Column("other_mrn", sa.String(length=199), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("decision_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_match_pair")),
    )
    op.create_index("ix_match_pair_facility_mrn", "match_pair", ["facility", "mrn"], unique=False)
    op.create_index(op.f("ix_match_pair_decision_id"), "match_pair", ["decision_id"], unique=False)

    op.create_table(
        "link_event",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("decision", sa.BigInteger(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("facility", sa.String(length=64), nullable=False),
        sa.Column("mrn", sa.String(length=199), nullable=False),
        sa.Column("from_person", sa.BigInteger(), nullable=True),
        sa.Column("to_person", sa.BigInteger(), nullable=True),
        sa.Column("from_link", sa.String(length=16), nullable=True),
        sa.Column("to_link", sa.String(length=16), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("review_id", sa.BigInteger(), nullable=True),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("undone_by", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_link_event")),
    )
    op.create_index(op.f("ix_link_event_decision"), "link_event", ["decision"], unique=False)
    op.create_index("ix_link_event_facility_mrn", "link_event", ["facility", "mrn"], unique=False)
    for column in ("from_person", "to_person", "review_id"):
        op.create_index(f"ix_link_event_{column}", "link_event", [column], unique=False)

    op.create_table(
        "match_model",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_match_model")),
    )


def downgrade() -> None:
    op.drop_table("match_model")
    for column in ("from_person", "to_person", "review_id"):
        op.drop_index(f"ix_link_event_{column}", table_name="link_event")
    op.drop_index("ix_link_event_facility_mrn", table_name="link_event")
    op.drop_index(op.f("ix_link_event_decision"), table_name="link_event")
    op.drop_table("link_event")
    op.drop_index(op.f("ix_match_pair_decision_id"), table_name="match_pair")
    op.drop_index("ix_match_pair_facility_mrn", table_name="match_pair")
    op.drop_table("match_pair")
    op.drop_index(op.f("ix_match_review_state"), table_name="match_review")
    op.drop_index("ix_match_review_facility_mrn", table_name="match_review")
    op.drop_table("match_review")
    op.drop_index(op.f("ix_record_key_record_id"), table_name="record_key")
    op.drop_table("record_key")
    with op.batch_alter_table("patient_record") as batch:  # SQLite cannot drop columns in place everywhere
        batch.drop_column("features")
        batch.drop_column("link_score")
        batch.drop_column("link")
    with op.batch_alter_table("person") as batch:
        batch.drop_column("protected_by")
        batch.drop_column("protected")
        batch.drop_column("merged_into")
    for column in DEMOGRAPHIC_INDEXES:
        op.create_index(f"ix_patient_record_{column}", "patient_record", [column], unique=False)
