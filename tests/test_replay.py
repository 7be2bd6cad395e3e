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


def process(engine, items, facilities=FACILITIES, models=None) -> list:
    # TRANSACTION: one batch, as the writer commits it.
    with write_transaction(engine) as conn:
        return process_batch(conn, items, new_control_id=lambda: f"ACK{next(_acks)}", now=lambda: NOW,
                             facilities=facilities, models=models)


def snapshot(engine) -> dict:
    with engine.connect() as conn:
        return load_all(conn).snapshot(history=True)


def persons(engine) -> dict[int, list[tuple[str, str, str]]]:
    """person id -> its records (facility, MRN, link), every person (those without records too)."""
    with engine.connect() as conn:
        out: dict = {p: [] for p in conn.execute(text("SELECT id FROM person")).scalars()}
        for pid, facility, mrn, link in conn.execute(
                text("SELECT person_id, facility, mrn, link FROM patient_record ORDER BY facility, mrn")):
            out[pid].append((facility, mrn, link))
        return out


def clear(engine) -> None:
    """Every stored row: each hypothesis example starts from an empty database."""
    with write_transaction(engine) as conn:
        for table in (*RECORD_MODEL_TABLES, "message_event", "message", "person"):
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
    live_persons = persons(engine)

    report = replay(engine, FACILITIES, batch=data.draw(st.integers(1, 7), label="replay batch"), now=lambda: NOW)

    assert report.not_applied == ()
    assert snapshot(engine) == live
    assert persons(engine) == live_persons  # the same persons: none made for a record renamed later (A47)
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


# -- the patient index across a rebuild ---------------------------------------------------------

SITES = ("GENHOSP", "OAKNH", "HHCARE")
ALL_SITES = {code: FacilityContext(code, code) for code in SITES}
WITHOUT_HHCARE = {code: ctx for code, ctx in ALL_SITES.items() if code != "HHCARE"}
PEOPLE = (  # family, given, birth, SSN, street, phone: people, nothing alike
    ("HANSON", "ELIZABETH", "19400304", "271828182", "12 OAK ST", "2175550100"),
    ("BECKER", "KARL", "19710101", "314159265", "4 BIRCH LN", "5125550144"),
    ("NAKAMURA", "JUNE", "19620707", "161803398", "3 PINE RD", "7755550133"),
    ("LAMBERT", "OSCAR", "19830219", "141421356", "77 ELM ST", "3035550199"),
    ("NORRIS", "WANDA", "19551111", "173205080", "9 CEDAR AVE", "6085550111"),
    ("ZIMMER", "URSULA", "19990909", "999887777", "1 ASH CT", "9995550000"),  # NORRIS to HHCARE, per a technician
)


def a28(facility: str, mrn: str, person: int) -> bytes:
    family, given, birth, ssn, street, phone = PEOPLE[person]
    return (f"{msh('ADT', 'A28', facility=facility)}\rEVN|A28|20261127120000\r"
            f"PID|1||{mrn}^^^{facility}^MR||{family}^{given}||{birth}|F|||{street}^^SPRINGFIELD^IL^62701||{phone}"
            f"||||||{ssn}\r").encode()


def a47(facility: str, new: str, old: str, person: int) -> bytes:
    family, given, birth, ssn, street, phone = PEOPLE[person]
    return (f"{msh('ADT', 'A47', facility=facility)}\rEVN|A47|20261127120000\r"
            f"PID|1||{new}^^^{facility}^MR||{family}^{given}||{birth}|F|||{street}^^SPRINGFIELD^IL^62701||{phone}"
            f"||||||{ssn}\rMRG|{old}^^^{facility}^MR\r").encode()


def link_events(engine) -> list[tuple]:
    with engine.connect() as conn:
        return conn.execute(text("SELECT id, facility, mrn, from_person, to_person, to_link, kind FROM link_event "
                                 "ORDER BY id")).all()


def three_sites(engine) -> dict[str, int]:
    """Five people, each registered at the three sites and linked by the patient index; the fifth
    one's home-health record (another name) linked by a technician (a merge: link "manual").
    Returns MRN -> person id."""
    from exchange.store.index import ModelCache
    from exchange.store.reviews import merge_persons

    models = ModelCache()
    for site in SITES:
        answers = process(engine, [received(a28(site, f"{site[:2]}{i}", i)) for i in range(4)], ALL_SITES, models)
        assert {a.ack_code for a in answers} == {"AA"}
    process(engine, [received(a28("GENHOSP", "GE4", 4)), received(a28("OAKNH", "OA4", 4)),
                     received(a28("HHCARE", "HH4", 5))],
            ALL_SITES, models)
    by_mrn = {mrn: p for p, records in persons(engine).items() for _, mrn, _ in records}
    assert by_mrn["HH4"] != by_mrn["GE4"]  # not linked automatically
    with write_transaction(engine) as conn:
        merge_persons(conn, by_mrn["GE4"], by_mrn["HH4"], actor="tech", now=NOW)
    by_mrn = {mrn: p for p, records in persons(engine).items() for _, mrn, _ in records}
    assert len(set(by_mrn.values())) == 5 and len(by_mrn) == 15
    return by_mrn


def test_a_facility_removed_and_added_again_gets_its_persons_back(engine, tmp_path):
    """HHCARE leaves the configuration (its records go with a replay), then comes back: its
    records return to the persons they had, manual links stay manual, nothing is added."""
    from exchange.jobs import consistency
    from tests.test_jobs import config_at

    three_sites(engine)
    before, history = persons(engine), link_events(engine)
    assert ("HHCARE", "HH4", "manual") in before[next(p for p, r in before.items() if ("GENHOSP", "GE4", "auto") in r)]

    removed = replay(engine, WITHOUT_HHCARE)
    assert len(removed.not_applied) == 5 and {n.facility for n in removed.not_applied} == {"HHCARE"}
    assert removed.records == 10 and not any(f == "HHCARE" for r in persons(engine).values() for f, _, _ in r)

    back = replay(engine, ALL_SITES)
    assert back.not_applied == () and back.records == 15
    assert persons(engine) == before  # the same persons, links (manual ones too), and no person more
    assert link_events(engine) == history  # nothing moved: no link event
    assert (back.restored, back.lost_persons) == (5, 0)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM match_review WHERE state = 'open'")).scalar_one() == 0
    report = consistency(engine, config_at(tmp_path), NOW)
    assert report.errors == 0, report.lines

    again = replay(engine, ALL_SITES)  # saved links now: nothing to restore
    assert (again.restored, again.lost_persons) == (0, 0)
    assert persons(engine) == before and link_events(engine) == history


def test_a_record_back_from_its_history_follows_a_merge_or_gets_a_person_of_its_own(engine):
    """While HHCARE was away a technician merged HH1's person into another: HH1 comes back to
    the live person (one link event says so, once). HH2's person is gone (a person of its own)."""
    from exchange.store.reviews import merge_persons, split_record

    by_mrn = three_sites(engine)
    replay(engine, WITHOUT_HHCARE)
    with write_transaction(engine) as conn:
        x = by_mrn["GE1"]  # GE1, OA1 (HH1 away)
        y = split_record(conn, x, "OAKNH", "OA1", actor="tech", now=NOW)["person"]
        merge_persons(conn, y, x, actor="tech", now=NOW, force=True)  # GE1 joins OA1: x is merged into y
        gone = by_mrn["GE2"]  # GE2, OA2 (HH2 away) leave their person, which is then deleted
        conn.execute(text("UPDATE patient_record SET person_id = :y WHERE mrn IN ('GE2', 'OA2')"),
                     {"y": by_mrn["GE3"]})
        conn.execute(text("DELETE FROM person WHERE id = :p"), {"p": gone})
    history = link_events(engine)

    back = replay(engine, ALL_SITES, now=lambda: NOW)
    now = {mrn: (p, link) for p, records in persons(engine).items() for _, mrn, link in records}
    assert now["HH1"] == (y, "auto") and now["GE1"] == (y, "manual")
    assert now["HH0"][0] == by_mrn["GE0"] and now["HH4"] == (by_mrn["GE4"], "manual")
    assert now["HH2"][0] not in {p for mrn, (p, _) in now.items() if mrn != "HH2"} and now["HH2"][0] != gone
    added = link_events(engine)[len(history):]
    assert [(e.mrn, e.from_person, e.to_person, e.kind) for e in added] == [
        ("HH1", x, y, "auto"), ("HH2", gone, now["HH2"][0], "auto")]
    assert (back.restored, back.lost_persons) == (4, 1)  # HH0, HH3, HH4 as they were, HH1 after the merge; HH2

    replay(engine, ALL_SITES)  # once only
    assert link_events(engine)[len(history):] == added
    assert {mrn: (p, link) for p, records in persons(engine).items() for _, mrn, link in records} == now


def test_a_record_renamed_in_a_later_batch_leaves_no_person_behind(engine):
    """A47 renames a record registered in the same live batch: replayed one message per batch,
    the old MRN exists between two batches. It must not leave an empty person (each run)."""
    from exchange.store.index import ModelCache

    models = ModelCache()
    process(engine, [received(a28("OAKNH", "OA0", 0)), received(a28("GENHOSP", "GE1", 1))], ALL_SITES, models)
    process(engine, [received(a28("OAKNH", "OA9", 1)), received(a47("OAKNH", "OA1", "OA9", 1))], ALL_SITES, models)
    process(engine, [received(a47("OAKNH", "OA5", "OA0", 0))], ALL_SITES, models)  # OA0 was saved: it has history
    live, history = persons(engine), link_events(engine)
    assert all(live.values())  # every person holds a record

    for _ in range(2):
        report = replay(engine, ALL_SITES, batch=1)
        assert report.not_applied == () and report.records == 3
        assert persons(engine) == live
        assert link_events(engine) == history


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


def test_replay_command_gives_a_facility_back_its_persons(tmp_path, engine, database_url):
    """The audit's steps: replay with HHCARE removed from the configuration (exit 1: its messages
    no longer apply), then with it back (exit 0): its records are back with their persons."""
    from tests.support import DEMO_FACILITIES

    three_sites(engine)
    before = persons(engine)
    with_all = write_config(tmp_path)
    (tmp_path / "c3").mkdir()
    without = write_config(tmp_path / "c3", facilities=DEMO_FACILITIES.split("[[facility]]\ncode = \"HHCARE\"")[0])

    done = exchange("replay", "--config", str(without), "--database", database_url)
    assert done.returncode == 1, done.stderr
    assert done.stdout.count("no longer applies: error 103 MSH-4") == 5
    done = exchange("replay", "--config", str(with_all), "--database", database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (
        "exchange: 5 records without a saved link are back with the person their link history names")
    assert persons(engine) == before


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
