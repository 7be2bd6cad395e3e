"""exchange.replay and `exchange replay`: rebuilding the record model from the
stored messages gives exactly the live state (property test, SQLite and
PostgreSQL); messages that no longer apply are reported without PHI; a
failure or a dry run leaves the old state; a busy database is refused."""
from __future__ import annotations

import base64
import itertools
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import text
from sqlalchemy.pool import StaticPool

from exchange.config import facility_contexts, load_config
from exchange.hl7.header import read_header
from exchange.mapping.events import FacilityContext
from exchange.outcome import ACCEPTED, rejected
from exchange.pipeline import Received, process_batch
from exchange.replay import RECORD_MODEL_TABLES, DatabaseBusy, NotApplied, replay
from exchange.store.db import make_engine, write_transaction
from exchange.store.records import load_all
from tests.mapping.helpers import msh
from tests.mapping.test_sequences import build, event
from tests.support import write_config

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
FACILITIES = {"HOSP": FacilityContext("HOSP", "HOSP")}
_acks = itertools.count(1)


def received(raw: bytes, decision=ACCEPTED, at: datetime = NOW) -> Received:
    return Received(raw, read_header(raw), decision, at, "127.0.0.1:5000")


def process(engine, items, facilities=FACILITIES) -> list:
    # TRANSACTION: one batch, as the writer commits it.
    with write_transaction(engine) as conn:
        return process_batch(conn, items, new_control_id=lambda: f"ACK{next(_acks)}", now=lambda: NOW,
                             facilities=facilities)


def snapshot(engine) -> dict:
    with engine.connect() as conn:
        return load_all(conn).snapshot(history=True)


def clear(engine) -> None:
    """Every stored row: each hypothesis example starts from an empty database."""
    with write_transaction(engine) as conn:
        for table in (*RECORD_MODEL_TABLES, "message_event", "message"):
            conn.execute(text(f"DELETE FROM {table}"))


def t02(number: str, mrn: str = "1", obx: str = "OBX|1|TX|||line one~line two", facility: str = "HOSP") -> bytes:
    return "\r".join([
        msh("MDM", "T02", facility=facility), "EVN|T02", f"PID|1||{mrn}^^^{facility}^MR||Doe^Jane",
        f"TXA|1|NOTE|TX|20240101||||||||{number}||||AU", obx,
    ]).encode() + b"\r"


def raw_of(ev, mrn, other, loc) -> bytes:
    msg, _ = build(ev, mrn, other, loc)  # the mapping sequence tests' generator
    return msg.text.encode("utf-8")


# A step of the live traffic: a new message (one of the sequence tests' events,
# or a document with Base64 content), a resend of an earlier one, or a rejected one.
step = st.one_of(
    event.map(lambda e: ("message", raw_of(*e))),
    st.sampled_from(["1", "2", "3"]).map(
        lambda n: ("message", t02(f"P{n}", n, "OBX|1|ED|||^application^pdf^Base64^" + base64.b64encode(b"%PDF" * int(n)).decode()))
    ),
    st.just(("resend", None)),
    st.just(("rejected", None)),
)


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_replaying_every_stored_message_gives_the_live_state(engine, data):
    clear(engine)
    steps = data.draw(st.lists(step, min_size=1, max_size=25), label="steps")
    items: list[Received] = []
    sent: list[bytes] = []
    for i, (kind, raw) in enumerate(steps):
        at = NOW + timedelta(seconds=i)
        if kind == "resend":
            if sent:
                items.append(received(data.draw(st.sampled_from(sent), label="resent"), at=at))
        elif kind == "rejected":
            raw = raw_of("A08", "1", "1", "W9^9^Z")
            items.append(received(raw, rejected(202, "MSH-11", "processing id not accepted"), at=at))
        else:
            sent.append(raw)
            items.append(received(raw, at=at))
    # The live path, in random batch splits.
    i = 0
    while i < len(items):
        size = data.draw(st.integers(1, 6), label="batch")
        process(engine, items[i:i + size])
        i += size
    live = snapshot(engine)

    report = replay(engine, FACILITIES, batch=data.draw(st.integers(1, 7), label="replay batch"), now=lambda: NOW)

    assert report.not_applied == ()
    assert snapshot(engine) == live
    with engine.connect() as conn:
        applied = conn.execute(text(
            "SELECT count(*) FROM message WHERE state = 'accepted' AND message_type IN ('ADT', 'MDM')"
        )).scalar_one()
        assert (report.messages, report.records, report.documents) == (
            applied, len(live["records"]), len(live["documents"])
        )


def _stored(engine) -> list:
    """A small live history: two patients, a merge, documents (one of 2,000 bytes), one AE."""
    big = base64.b64encode(b"x" * 2000).decode()
    answers = process(engine, [
        received(raw_of("A04", "1", "1", "W1^1^A")),
        received(raw_of("A01", "2", "2", "W2^2^B")),
        received(t02("D1", "1")),
    ])
    answers += process(engine, [
        received(t02("D2", "2", f"OBX|1|ED|||^application^pdf^Base64^{big}")),
        received(raw_of("A40", "1", "2", "")),
        received(raw_of("T06", "1", "9", "")),  # addendum D9 to D1 (TXA-13 = D{mrn})
        received(raw_of("T10", "3", "5", "")),  # replaces D3, which is unknown: AE, never applied
    ])
    return answers


def test_messages_that_no_longer_apply_are_left_out_and_reported(engine):
    answers = _stored(engine)
    assert [a.ack_code for a in answers] == ["AA"] * 6 + ["AE"]
    live = snapshot(engine)
    assert ("HOSP", "D2") in live["documents"]

    stricter = {"HOSP": FacilityContext("HOSP", "HOSP", max_document_bytes=1000)}
    report = replay(engine, stricter)
    assert report.not_applied == (NotApplied(answers[3].message_id, "HOSP", _control_id(engine, answers[3]), 104, "OBX-5"),)
    assert report.messages == 5 and report.committed
    after = snapshot(engine)
    assert ("HOSP", "D2") not in after["documents"]
    assert after["records"].keys() == live["records"].keys()

    # The facility is no longer configured: none of its messages apply (103, MSH-4).
    report = replay(engine, {}, dry_run=True)
    assert report.messages == 0 and not report.committed
    assert {(n.code, n.location) for n in report.not_applied} == {(103, "MSH-4")}
    assert len(report.not_applied) == 6
    assert snapshot(engine) == after  # a dry run changes nothing

    assert replay(engine, FACILITIES).not_applied == ()
    assert snapshot(engine) == live


def _control_id(engine, answer) -> str:
    with engine.connect() as conn:
        return conn.execute(text("SELECT control_id FROM message WHERE id = :id"), {"id": answer.message_id}).scalar_one()


def test_a_failure_leaves_the_old_record_model(engine, monkeypatch):
    _stored(engine)
    live = snapshot(engine)
    import exchange.replay as module

    calls = itertools.count()

    def failing_save(conn, state, now=None, links=None):
        if next(calls) == 1:
            raise RuntimeError("disk full")
        return save(conn, state, now, links=links)

    save = module.save_records
    monkeypatch.setattr(module, "save_records", failing_save)
    with pytest.raises(RuntimeError):
        replay(engine, FACILITIES, batch=2)
    assert snapshot(engine) == live


def test_batches_hold_at_most_batch_bytes_of_raw_messages(engine, monkeypatch):
    import exchange.replay as module

    _stored(engine)
    live = snapshot(engine)
    batches = []
    replay_batch = module._replay_batch
    monkeypatch.setattr(module, "_replay_batch", lambda conn, rows, *a: batches.append(len(rows)) or replay_batch(conn, rows, *a))
    monkeypatch.setattr(module, "BATCH_BYTES", 1)  # one message per batch
    assert replay(engine, FACILITIES).messages == 6
    assert batches == [1] * 6
    assert snapshot(engine) == live
    batches.clear()
    monkeypatch.setattr(module, "BATCH_BYTES", 64 * 1024 * 1024)
    replay(engine, FACILITIES, batch=4)
    assert batches == [4, 2]


def test_a_busy_database_is_refused(database_url):
    eng = make_engine(database_url, poolclass=StaticPool)
    blocker = make_engine(database_url)
    try:
        from exchange.store.db import upgrade

        upgrade(eng)
        if eng.dialect.name == "sqlite":
            with eng.connect() as conn:
                conn.exec_driver_sql("PRAGMA busy_timeout = 100")
        # A writer's batch in flight: its transaction holds the message store.
        with write_transaction(blocker) as busy:
            busy.execute(text("SELECT count(*) FROM message"))
            if blocker.dialect.name == "postgresql":
                busy.exec_driver_sql("LOCK TABLE message IN ROW EXCLUSIVE MODE")
            with pytest.raises(DatabaseBusy):
                replay(eng, FACILITIES, lock_timeout=0.2)
    finally:
        eng.dispose()
        blocker.dispose()


# -- the command ---------------------------------------------------------------------------


def exchange(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exchange.cli", *args], capture_output=True, text=True, timeout=120)


def test_replay_command(tmp_path, engine, database_url):
    config = write_config(tmp_path, server_extra="max_document_bytes = 1000")
    contexts = facility_contexts(load_config(config, database=database_url))
    big = base64.b64encode(b"x" * 2000).decode()
    answers = process(engine, [
        received(raw_of("A01", "1", "1", "W1^1^A").replace(b"HOSP", b"GENHOSP")),
        received(t02("D1", "1", facility="GENHOSP")),
    ], facilities=contexts)
    answers += process(engine, [received(t02("D2", "1", f"OBX|1|ED|||^application^pdf^Base64^{big}", "GENHOSP"))],
                       facilities={"GENHOSP": FacilityContext("GENHOSP", "GENHOSP")})  # applied under an older limit
    assert [a.ack_code for a in answers] == ["AA", "AA", "AA"]
    live = snapshot(engine)

    done = exchange("replay", "--config", str(config), "--database", database_url)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    control_id = _control_id(engine, answers[2])
    assert lines[0] == f"exchange: message {answers[2].message_id} GENHOSP/{control_id} no longer applies: error 104 OBX-5"
    assert lines[1].startswith("exchange: replayed 2 messages: 1 records, 1 documents; 1 no longer apply (")
    assert len(lines) == 2 and done.stderr == ""
    assert "Doe" not in done.stdout and "Jane" not in done.stdout
    after = snapshot(engine)
    assert after["records"] == live["records"] and ("GENHOSP", "D2") not in after["documents"]

    config.write_text(config.read_text().replace("max_document_bytes = 1000", ""))
    done = exchange("replay", "--config", str(config), "--database", database_url, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("exchange: dry run (rolled back): would replay 3 messages: 1 records, 2 documents; 0 no longer apply")
    assert snapshot(engine) == after

    done = exchange("replay", "--config", str(config), "--database", database_url)
    assert done.returncode == 0, done.stderr
    assert snapshot(engine) == live


def test_replay_command_usage_errors_exit_2(tmp_path):
    bad = write_config(tmp_path, server_extra="max_document_bytes = 0")
    done = exchange("replay", "--config", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"exchange: {bad}: server.max_document_bytes: must be at least 1 (got 0)"
    ]
    good = write_config(tmp_path)
    done = exchange("replay", "--config", str(good), "--database", f"sqlite:///{tmp_path / 'empty.db'}")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "exchange db upgrade" in done.stderr
    done = exchange("replay", "--config", str(good), "--batch", "0")
    assert done.returncode == 2 and "--batch" in done.stderr
