"""`exchange reviews list|show|decide|undo` as a user runs them (subprocesses) on SQLite and
PostgreSQL: output, the decisions and their undo, exit codes, and the audit rows."""
from __future__ import annotations

import json
import re

from sqlalchemy import func, select

from exchange.store.db import write_transaction
from exchange.store.reviews import review_detail
from exchange.store.schema import audit_event_table, patient_record_table
from tests.test_cli import exchange
from tests.test_reviews import OA, hanson_scene


def person_of(engine, key) -> int:
    with engine.connect() as conn:
        return conn.execute(select(patient_record_table.c.person_id).where(
            patient_record_table.c.facility == key[0], patient_record_table.c.mrn == key[1])).scalar_one()


def test_list_show_decide_and_undo(engine, database_url):
    with write_transaction(engine) as conn:
        s = hanson_scene(conn)
    db = ("--database", database_url)

    done = exchange("reviews", "list", *db, "--actor", "tess")
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split()[:4] == ["ID", "STATE", "KIND", "SCORE"]
    assert row.split()[:3] == [str(s["review"]), "open", "candidate"]
    assert "OAKNH/OA917082" in row and "GENHOSP/GH-44107" in row and "between_thresholds" in row
    listed = json.loads(exchange("reviews", "list", "--json", *db).stdout)
    assert [r["id"] for r in listed] == [s["review"]]
    assert exchange("reviews", "list", "--state", "resolved", *db).stdout.splitlines()[1:] == []

    done = exchange("reviews", "show", str(s["review"]), *db)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert f"review {s['review']}: open, candidate" in text
    assert "link automatically at 20.00, review from 8.00" in text
    given = next(line for line in text.splitlines() if line.startswith("given"))
    assert "LIZ" in given and re.search(r"ELIZABETH\s+\[nickname [+-]\d", given)
    assert "123-45-6789" not in text and "***-**-6789" in text
    shown = json.loads(exchange("reviews", "show", str(s["review"]), "--json", *db).stdout)
    assert shown["id"] == s["review"] and shown["thresholds"]["upper"] == 20.0

    done = exchange("reviews", "decide", str(s["review"]), "link", "--actor", "tess", "--reason", "same woman", *db)
    assert done.returncode == 0, done.stderr
    assert f"is in person {s['person']} (manual)" in done.stdout
    assert person_of(engine, OA) == s["person"]
    decision = int(re.search(r"decision (\d+)", done.stdout)[1])
    with engine.connect() as conn:
        review = review_detail(conn, s["review"])
    assert (review["state"], review["decided_by"], review["note"]) == ("resolved", "tess", "same woman")

    done = exchange("reviews", "decide", str(s["review"]), "not-a-match", "--actor", "tess", *db)
    assert done.returncode == 1 and "resolved by tess" in done.stderr

    done = exchange("reviews", "undo", str(decision), "--actor", "tom", "--reason", "too quick", *db)
    assert done.returncode == 0, done.stderr
    assert f"decision {decision} undone" in done.stdout and "open again" in done.stdout
    assert person_of(engine, OA) == s["oa_person"]
    assert exchange("reviews", "undo", str(decision), "--actor", "tom", *db).returncode == 1

    with engine.connect() as conn:
        audit = [(r.actor, r.role, r.action, r.resource, r.key, r.outcome)
                 for r in conn.execute(select(audit_event_table).order_by(audit_event_table.c.id))]
    assert ("tess", "cli", "read", "review", "state=open", "ok") in audit
    assert ("tess", "cli", "decide", "review", str(s["review"]), "ok") in audit
    assert ("tom", "cli", "decide", "person", f"decision/{decision}", "ok") in audit
    # what each printed names its records, as the API's answers do (found by a privacy audit)
    show = next(i for i, row in enumerate(audit) if row[2:] == ("read", "review", str(s["review"]), "ok"))
    assert {row[3:5] for row in audit[show + 1:show + 4]} == {
        ("record", "OA917082"), ("record", "GH-44107"), ("record", "HH-3391")}


def test_decide_not_a_match_and_exit_codes(engine, database_url):
    with write_transaction(engine) as conn:
        s = hanson_scene(conn)
    db = ("--database", database_url)
    assert exchange("reviews", "show", "987654", *db).returncode == 1
    assert exchange("reviews", "decide", "987654", "link", "--actor", "tess", *db).returncode == 1
    # bad usage: exit 2 with a reason
    assert exchange("reviews", "decide", str(s["review"]), "maybe", "--actor", "tess", *db).returncode == 2
    assert exchange("reviews", "decide", str(s["review"]), "link", *db).returncode == 2  # --actor is required
    done = exchange("reviews", "decide", str(s["review"]), "link", "--person", "987654", "--actor", "tess", *db)
    assert done.returncode == 2 and done.stderr.strip() == "exchange: no person 987654"
    done = exchange("reviews", "decide", str(s["review"]), "link", "--actor", "exchange", *db)
    assert done.returncode == 2 and "reserved" in done.stderr
    assert exchange("reviews", "list", "--limit", "0", *db).returncode == 2

    done = exchange("reviews", "decide", str(s["review"]), "not-a-match", "--actor", "tess", "--json", *db)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["state"] == "resolved" and body["decision"] == "not-a-match"
    assert person_of(engine, OA) == s["oa_person"]
    # found by a verification audit: a refusal printed records and wrote no audit row
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(audit_event_table)).scalar()
    done = exchange("reviews", "decide", str(s["review"]), "link", "--actor", "tom", *db)
    assert done.returncode == 1 and "resolved by tess" in done.stderr
    with engine.connect() as conn:
        rows = [(r.actor, r.action, r.resource, r.key, r.outcome) for r in conn.execute(
            select(audit_event_table).order_by(audit_event_table.c.id).offset(before))]
    assert rows == [("tom", "decide", "review", str(s["review"]), "invalid")]
