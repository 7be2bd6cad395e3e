"""Older databases catch up with what later revisions record as it happens:

- the destination's MRN of copies queued or failed before 0007 (``delivery.destination_mrn``),
  read from the copy's own PID-3, so the send-time check that the destination's record still
  belongs to the person covers them too (a split made since withholds them);
- open reviews about a record that was merged away are superseded (merges supersede the
  reviews they answer since 11-28; an older merge left them open, and nobody could decide them);
- an opt-out set before 0008 gets the history entry it would have had.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28

No schema change: data only. Downgrade leaves the data as it is.
"""
from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def destination_mrn(payload: bytes) -> str | None:
    """CX.1 of the copy's PID-3 repetition typed MR (else the first one), as routing wrote it."""
    text = payload.decode("latin-1")
    if not text.startswith("MSH") or len(text) < 8:
        return None
    field, repetition = text[3], text[5]
    component = text[4]
    for segment in text.replace("\n", "\r").split("\r"):
        if segment.startswith("PID" + field):
            fields = segment.split(field)
            if len(fields) <= 3 or not fields[3]:
                return None
            reps = [r.split(component) for r in fields[3].split(repetition) if r]
            chosen = next((r for r in reps if len(r) > 4 and r[4].strip().upper() == "MR"), reps[0] if reps else None)
            value = chosen[0].strip() if chosen else ""
            return value[:64] or None
    return None


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT id, payload FROM delivery WHERE destination_mrn IS NULL AND state IN ('queued', 'failed')")).all()
    updates = [{"id": r.id, "mrn": mrn} for r in rows if (mrn := destination_mrn(bytes(r.payload))) is not None]
    if updates:
        conn.execute(sa.text("UPDATE delivery SET destination_mrn = :mrn WHERE id = :id"), updates)

    conn.execute(sa.text(
        "UPDATE match_review SET state = 'superseded' WHERE state = 'open' AND EXISTS ("
        " SELECT 1 FROM patient_record r WHERE r.facility = match_review.facility AND r.mrn = match_review.mrn"
        " AND r.merged_into_mrn IS NOT NULL AND NOT r.active)"))

    now = datetime.now(timezone.utc)
    protected = conn.execute(sa.text(
        "SELECT p.id, p.protected_by FROM person p WHERE p.protected AND NOT EXISTS ("
        " SELECT 1 FROM opt_out_event e WHERE e.person_id = p.id)")).all()
    if protected:
        conn.execute(sa.text(
            "INSERT INTO opt_out_event (person_id, protected, by, reason, message_id, at)"
            " VALUES (:person, :protected, :by, :reason, NULL, :at)"),
            [{"person": r.id, "protected": True, "by": r.protected_by or "exchange",
              "reason": "set before the opt-out history was kept (as it stood at the upgrade)",
              "at": now.replace(tzinfo=None).isoformat(" ", "microseconds") if conn.dialect.name == "sqlite" else now}
             for r in protected])


def downgrade() -> None:
    """Nothing to undo: the data stays as the upgrade left it."""
