"""Documents: the confidentiality status (TXA-18) of each document, the most restricted of
the one its sender last gave it and its parent's (``document.confidentiality``,
``document.inherited_confidentiality``), so that routing keeps a very restricted or
restricted document, its edits, addenda and replacements from the facilities not
configured to receive that status.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-28

Written against exchange/store/schema.py (types spelled without model imports);
tests/store/test_migrations.py compares them on SQLite and PostgreSQL. Existing documents
are filled from the stored MDM messages that were applied, in the order they arrived: the
last TXA-18 given for a document number is its own status (the HL7 null "" clears it: "U"),
written to its latest version's fields, as the record model keeps it; and up the chain of
parents (TXA-13), the most restricted of its own and its parent's.
"""
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from exchange.hl7.header import read_header
from exchange.mapping.events import confidentiality, most_restricted
from exchange.mapping.message import Message

# revision identifiers, used by Alembic.
revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CODE_LEN = 250  # exchange.store.schema.DOCUMENT_CODE_LEN
BATCH = 1000
MAX_DEPTH = 10_000  # a parent chain longer than this (or a loop) is cut there


def chains(docs: dict, own: dict) -> dict:
    """(facility, number) -> (its status, its parent's) for every document of ``docs``
    ((facility, number) -> parent number), from ``own`` (the statuses their senders gave)."""
    out: dict = {}
    for start in docs:
        path, key = [], start
        while key in docs and key not in out and key not in path and len(path) < MAX_DEPTH:
            path.append(key)
            parent = docs[key]
            key = (key[0], parent) if parent else None
        inherited = out[key][0] if key in out else ""
        for key in reversed(path):
            out[key] = (most_restricted(own.get(key), inherited), inherited)
            inherited = out[key][0]
    return out


def stated(raw: bytes) -> tuple[str, str] | None:
    """(TXA-12.1, TXA-18 as the record model keeps it) of a stored MDM, or None when the
    message names no document or gives no status (or cannot be read any more)."""
    try:
        header = read_header(raw)
        txa = Message(raw.decode(header.codec, "replace"), header.delimiters, header.codec).first("TXA")
    except Exception:  # noqa: BLE001 - a message the intake stored but cannot be read: nothing to fill
        return None
    if txa is None or not txa.value(12):
        return None
    status = confidentiality(txa)
    return (txa.value(12), status[:CODE_LEN]) if status else None


def upgrade() -> None:
    # Plain ALTER TABLE, never a batch (copy and move) on SQLite: dropping the old ``document``
    # table would cascade to every document_version row.
    op.add_column("document", sa.Column("confidentiality", sa.String(length=CODE_LEN), nullable=True))
    op.add_column("document", sa.Column("inherited_confidentiality", sa.String(length=CODE_LEN), nullable=True))
    conn = op.get_bind()
    if conn.execute(sa.text("SELECT 1 FROM document LIMIT 1")).first() is None:
        return
    last: dict[tuple[str, str], str] = {}
    after = 0
    while True:
        rows = conn.execute(sa.text(
            "SELECT id, facility, raw FROM message WHERE id > :after AND state = 'accepted'"
            " AND upper(message_type) = 'MDM' ORDER BY id LIMIT :n"), {"after": after, "n": BATCH}).all()
        if not rows:
            break
        after = rows[-1].id
        for row in rows:
            found = stated(bytes(row.raw)) if row.facility else None
            if found is not None:
                last[(row.facility, found[0])] = found[1]
    if not last:
        return
    docs = conn.execute(sa.text("SELECT id, facility, number, parent FROM document")).all()
    ids = {(r.facility, r.number): r.id for r in docs}
    statuses = chains({(r.facility, r.number): r.parent for r in docs}, last)
    updates = [{"id": ids[key], "c": status or None, "i": inherited or None}
               for key, (status, inherited) in statuses.items() if status or inherited]
    if updates:
        conn.execute(sa.text("UPDATE document SET confidentiality = :c, inherited_confidentiality = :i WHERE id = :id"),
                     updates)
    wanted = {r.id: last[(r.facility, r.number)] for r in docs if (r.facility, r.number) in last}
    if not wanted:
        return
    latest = conn.execute(sa.text(
        "SELECT v.id, v.document_id, v.fields FROM document_version v WHERE v.version ="
        " (SELECT max(w.version) FROM document_version w WHERE w.document_id = v.document_id)")).all()
    updates = []
    for row in latest:
        if row.document_id not in wanted:
            continue
        fields = json.loads(row.fields) if isinstance(row.fields, (str, bytes)) else dict(row.fields or {})
        fields["confidentiality"] = wanted[row.document_id]
        updates.append({"id": row.id, "fields": fields})
    if updates:
        conn.execute(sa.text("UPDATE document_version SET fields = :fields WHERE id = :id")
                     .bindparams(sa.bindparam("fields", type_=sa.JSON)), updates)


def downgrade() -> None:
    op.drop_column("document", "inherited_confidentiality")  # SQLite 3.35+ drops a column in place
    op.drop_column("document", "confidentiality")
