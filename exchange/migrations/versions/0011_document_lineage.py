"""Documents: every type a document and its ancestors ever had (``document.types``) and the
type inherited from its parent (``document.inherited_type``), so that routing keeps an
excluded document's edits, addenda, replacements and re-typed notices away from a facility
that excludes it, and routes a version without a type as its parent's type.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28

Written against exchange/store/schema.py (types spelled without model imports);
tests/store/test_migrations.py compares them on SQLite and PostgreSQL. Existing documents
are filled from every stored version's TXA-2 and their parents (TXA-13), as the record
model would have kept them.
"""
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MAX_DEPTH = 100  # a parent chain longer than this (or a loop) is cut there


def lineage(docs: dict, versions: dict) -> dict:
    """(facility, number) -> (types, inherited type) for every document of ``docs``
    ((facility, number) -> (id, current type, parent))."""
    out: dict = {}

    def walk(key, depth: int):
        if key in out:
            return out[key]
        doc_id, current, parent = docs[key]
        own = {t.upper() for t in versions.get(doc_id, ()) if t} | ({current.upper()} if current else set())
        inherited = None
        parent_key = (key[0], parent) if parent else None
        if parent_key in docs and parent_key != key and depth < MAX_DEPTH:
            out[key] = (tuple(sorted(own)), None)  # a loop ends here
            parent_types, parent_inherited = walk(parent_key, depth + 1)
            own |= set(parent_types)
            parent_current = docs[parent_key][1]
            inherited = (parent_current or parent_inherited or "").upper() or None
        out[key] = (tuple(sorted(own)), inherited)
        return out[key]

    for key in docs:
        walk(key, 0)
    return out


def _type(fields) -> str | None:
    if isinstance(fields, (str, bytes)):
        fields = json.loads(fields)
    value = fields.get("type") if isinstance(fields, dict) else None
    return value if isinstance(value, str) else None


def upgrade() -> None:
    # Plain ALTER TABLE, never a batch (copy and move) on SQLite: dropping the old ``document``
    # table would cascade to every document_version row.
    op.add_column("document", sa.Column("types", sa.Text(), nullable=True))
    op.add_column("document", sa.Column("inherited_type", sa.String(length=250), nullable=True))
    conn = op.get_bind()
    docs = {(r.facility, r.number): (r.id, r.type, r.parent)
            for r in conn.execute(sa.text("SELECT id, facility, number, type, parent FROM document"))}
    if not docs:
        return
    versions: dict = {}
    for r in conn.execute(sa.text("SELECT document_id, fields FROM document_version")):
        versions.setdefault(r.document_id, []).append(_type(r.fields))
    updates = [{"id": docs[key][0], "types": json.dumps(list(types)), "inherited": inherited}
               for key, (types, inherited) in lineage(docs, versions).items()]
    conn.execute(sa.text("UPDATE document SET types = :types, inherited_type = :inherited WHERE id = :id"), updates)


def downgrade() -> None:
    op.drop_column("document", "inherited_type")  # SQLite 3.35+ drops a column in place
    op.drop_column("document", "types")
