"""Opt-out: the holds an opt-out stands on, each kept (``person.protected_by`` a JSON list of
text, no length cap; ``opt_out_event.by`` text). Before, one string of at most 128 characters
held either the facilities whose PD1-12 = Y set it ("PD1-12 GENHOSP, OAKNH") or the one
technician who did ("api tess"): a merge kept only one person's, a technician's set replaced
a facility's, and a fifth facility's Y did not fit. The holds a merge dropped are folded into
the person that holds the merged person's records now. And ``person.merged_into`` and
``delivery (facility, mrn)`` are indexed: a patient's accounting of disclosures reads the
persons merged into one and the copies about each of its records.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-29

Written against exchange/store/schema.py (types spelled without model imports);
tests/store/test_migrations.py compares them on SQLite and PostgreSQL. Downgrade writes the
holds back as the older release read them: the facilities' ("PD1-12 GENHOSP, OAKNH"), else
the first technician's.
"""
import json
from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PD1 = "PD1-12 "


def _holds(by: str | None) -> list[str]:
    """The holds an older release's ``protected_by`` names."""
    if not by:
        return ["opt-out"]  # protected, by no one named (never written by a release, but kept set)
    if by.startswith(PD1):
        return [PD1 + code for code in by[len(PD1):].split(", ") if code]
    return [by]


def _alter(table: str, column: str, type_, existing, nullable: bool) -> None:
    """PostgreSQL only: SQLite keeps text of any length in a VARCHAR(128) (the models say so), and
    altering a column there rebuilds the table, which person's foreign keys forbid."""
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column(table, column, type_=type_, existing_type=existing, existing_nullable=nullable)


def upgrade() -> None:
    conn = op.get_bind()
    op.create_index("ix_person_merged_into", "person", ["merged_into"])
    op.create_index("ix_delivery_facility_mrn", "delivery", ["facility", "mrn"])
    _alter("person", "protected_by", sa.Text(), sa.String(128), True)
    _alter("opt_out_event", "by", sa.Text(), sa.String(128), False)
    rows = conn.execute(sa.text("SELECT id, protected_by FROM person WHERE protected")).all()
    if rows:
        conn.execute(sa.text("UPDATE person SET protected_by = :by WHERE id = :id"),
                     [{"id": r.id, "by": json.dumps(_holds(r.protected_by))} for r in rows])
    _fold_merged_holds(conn)


MAX_MERGE_HOPS = 100  # exchange.store.schema.MAX_MERGE_HOPS


def _fold_merged_holds(conn) -> None:
    """A protected person merged into another whose holds an older release did not carry over
    (it kept the survivor's alone): the person that holds its records now takes them, with a
    line in its opt-out history -- unless that person's opt-out was lifted after the merged
    person's last change (lifted for the patient: by the records office, or by the facility's N
    after the merge carried it)."""
    persons = {r.id: r for r in conn.execute(sa.text(
        "SELECT id, merged_into, protected, protected_by FROM person WHERE protected OR merged_into IS NOT NULL"))}
    holds = {pid: json.loads(r.protected_by) if r.protected and r.protected_by else [] for pid, r in persons.items()}
    # each person's last opt-out change, and its last lifting: a hold lifted at the survivor after the
    # merged person's last change was lifted for the patient (the records office, the facility's N)
    last = dict(conn.execute(sa.text("SELECT person_id, max(id) FROM opt_out_event GROUP BY person_id")).all())
    lifted = dict(conn.execute(sa.text(
        "SELECT person_id, max(id) FROM opt_out_event WHERE NOT protected GROUP BY person_id")).all())
    added: dict[int, list[tuple[int, list[str]]]] = {}
    for pid, r in sorted(persons.items()):
        if not r.protected or r.merged_into is None:
            continue
        live, hops = r.merged_into, 0
        while live in persons and persons[live].merged_into is not None and hops < MAX_MERGE_HOPS:
            live, hops = persons[live].merged_into, hops + 1
        if lifted.get(live, 0) > last.get(pid, 0):
            continue
        target = holds.setdefault(live, [])
        missing = [h for h in holds[pid] if h not in target]
        if missing:
            target += missing
            added.setdefault(live, []).append((pid, missing))
    if not added:
        return
    events = sa.table("opt_out_event", sa.column("person_id"), sa.column("protected"), sa.column("by"),
                      sa.column("reason"), sa.column("at", sa.DateTime(timezone=True)))
    now = datetime.now(timezone.utc)
    at = now.replace(tzinfo=None) if conn.dialect.name == "sqlite" else now  # as UTCDateTime stores it
    for live, came in sorted(added.items()):
        conn.execute(sa.text("UPDATE person SET protected = :p, protected_by = :by WHERE id = :id"),
                     {"p": True, "by": json.dumps(holds[live]), "id": live})
        conn.execute(events.insert(), [
            {"person_id": live, "protected": True, "by": ", ".join(missing), "at": at,
             "reason": f"upgrade: person {source}, merged into this person, had opted out (a release before"
                       " 0016 dropped its holds at the merge)"} for source, missing in came])


def downgrade() -> None:
    conn = op.get_bind()
    op.drop_index("ix_person_merged_into", table_name="person")
    op.drop_index("ix_delivery_facility_mrn", table_name="delivery")
    rows = conn.execute(sa.text("SELECT id, protected_by FROM person WHERE protected")).all()
    for r in rows:
        try:
            holds = json.loads(r.protected_by)
        except (TypeError, ValueError):
            continue
        pd1 = [h[len(PD1):] for h in holds if h.startswith(PD1)]
        older = PD1 + ", ".join(pd1) if len(pd1) == len(holds) else next(h for h in holds if not h.startswith(PD1))
        conn.execute(sa.text("UPDATE person SET protected_by = :by WHERE id = :id"), {"id": r.id, "by": older[:128]})
    conn.execute(sa.text("UPDATE opt_out_event SET by = substr(by, 1, 128) WHERE length(by) > 128"))
    _alter("opt_out_event", "by", sa.String(128), sa.Text(), False)
    _alter("person", "protected_by", sa.String(128), sa.Text(), True)
