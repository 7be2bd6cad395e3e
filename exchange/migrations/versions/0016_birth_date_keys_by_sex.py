"""Patient index: the birth-date blocking key carries the sex (``dob:<yyyymmdd>:<F|M>``; a
record of unknown sex has both), halving the candidates it brings at a million persons.
Every active record's birth-date keys are rewritten from its stored features.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-28

No schema change: data only (``record_key``). Downgrade writes the keys of before
(``dob:<yyyymmdd>``) back.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from exchange.matching.features import blocking_keys, decode_features

# revision identifiers, used by Alembic.
revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 5000


def upgrade() -> None:
    conn = op.get_bind()
    conn.execute(sa.text("DELETE FROM record_key WHERE key LIKE 'dob:%'"))
    after = 0
    while True:
        rows = conn.execute(sa.text(
            "SELECT id, features FROM patient_record WHERE active AND features IS NOT NULL AND id > :after"
            " ORDER BY id LIMIT :n"), {"after": after, "n": BATCH}).all()
        if not rows:
            return
        after = rows[-1].id
        keys = []
        for row in rows:
            try:
                features = decode_features(row.features)
            except ValueError:  # stored by another version: re-keyed when it is re-matched
                continue
            keys += [{"key": k, "id": row.id} for k in sorted(blocking_keys(features)) if k.startswith("dob:")]
        if keys:
            conn.execute(sa.text("INSERT INTO record_key (key, record_id) VALUES (:key, :id)"), keys)


def downgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT key, record_id FROM record_key WHERE key LIKE 'dob:%:%'")).all()
    conn.execute(sa.text("DELETE FROM record_key WHERE key LIKE 'dob:%:%'"))
    old = sorted({(key.rsplit(":", 1)[0], record_id) for key, record_id in rows})
    if old:
        conn.execute(sa.text("INSERT INTO record_key (key, record_id) VALUES (:key, :id)"),
                     [{"key": k, "id": i} for k, i in old])
