"""The patient index catches up on active records an older release left without matching
features (a technician's split before 11-28 stored none): their features and blocking keys
are computed from the stored record, so they are candidates again and ``exchange reconcile
consistency`` is clean after the upgrade. Their person and link stay as they are (no
re-match: a technician put them there).

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-28

No schema change: data only. Downgrade leaves the data as it is.
"""
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from exchange.matching.features import blocking_keys, encode_features, features_of
from exchange.store.records import from_json

# revision identifiers, used by Alembic.
revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_LEN = 64  # exchange.store.schema.MATCH_KEY_LEN


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, data FROM patient_record WHERE active AND features IS NULL")).all()
    features, keys = [], []
    for row in rows:
        data = json.loads(row.data) if isinstance(row.data, (str, bytes)) else row.data
        try:
            f = features_of(from_json(data))
        except Exception:  # noqa: BLE001 - a record this release cannot read: left to `exchange replay`
            continue
        features.append({"id": row.id, "features": encode_features(f)})
        keys += [{"key": k[:KEY_LEN], "id": row.id} for k in sorted(blocking_keys(f))]
    if not features:
        return
    conn.execute(sa.text("DELETE FROM record_key WHERE record_id = :id"), [{"id": f["id"]} for f in features])
    conn.execute(sa.text("UPDATE patient_record SET features = :features WHERE id = :id"), features)
    if keys:
        conn.execute(sa.text("INSERT INTO record_key (key, record_id) VALUES (:key, :id)"), keys)


def downgrade() -> None:
    pass  # the features and keys stay: the older revisions read them as they are
