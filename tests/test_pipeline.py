"""process_batch against a real database (SQLite and PostgreSQL): what is
stored, what is answered, and dedup within and across batches."""
from __future__ import annotations

import itertools
import json
from datetime import datetime, timezone

from sqlalchemy import text

from exchange.acceptance import AcceptancePolicy, FacilityRule, accept
from exchange.hl7.header import read_header
from exchange.mapping.events import FacilityContext
from exchange.pipeline import Received, process_batch

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
POLICY = AcceptancePolicy({"GENHOSP": FacilityRule("GENHOSP"), "OAKNH": FacilityRule("OAKNH")})
FACILITIES = {code: FacilityContext(code, code) for code in ("GENHOSP", "OAKNH")}


def received(raw: bytes, peer: str = "127.0.0.1:5000") -> Received:
    header = read_header(raw)
    return Received(raw, header, accept(header, POLICY), NOW, peer)


def msg(control_id: str, facility: str = "GENHOSP", msh18: str = "", body: bytes = b"PID|1||1^^^GENHOSP^MR\r") -> bytes:
    charset = f"||||||{msh18}" if msh18 else ""
    return f"MSH|^~\\&|APP|{facility}|EX|EX|20261127||ADT^A01^ADT_A01|{control_id}|P|2.5{charset}\r".encode() + body


def run(engine, items, facilities=FACILITIES):
    ids = itertools.count(1)
    with engine.begin() as conn:
        return process_batch(
            conn, items, new_control_id=lambda: f"ACK{next(ids)}", now=lambda: NOW, facilities=facilities
        )


def rows(engine, sql, **params):
    with engine.connect() as conn:
        return conn.execute(text(sql), params).all()


def test_accepted_message_is_stored_with_its_ack(engine):
    (answer,) = run(engine, [received(msg("P-1"))])
    assert answer.ack_code == "AA" and not answer.duplicate
    assert b"MSA|AA|P-1" in answer.ack
    ((raw, state, ack, dedup, message_type, event, version),) = rows(
        engine, "select raw, state, ack, dedup, message_type, event, version from message"
    )
    assert bytes(raw) == msg("P-1")
    assert bytes(ack) == answer.ack
    assert (state, bool(dedup), message_type, event, version) == ("accepted", True, "ADT", "A01", "2.5")


def test_a_field_that_cannot_be_read_is_a_warning_in_the_aa_from_v25(engine):
    """Found by a time audit: a PID-7 of 20231301 was answered a bare AA (the birth date left out),
    so the sender never learned; the reason was only an operator's to read."""
    pid = ["PID", "1", "", "1^^^GENHOSP^MR", "", "DOE^JANE", "", "20231301", "F"] + [""] * 21 + ["XX"]
    bad = ("|".join(pid) + "\r").encode()
    answers = run(engine, [received(msg("W-1", body=bad)),
                           received(msg("W-2", body=bad).replace(b"|2.5", b"|2.4"))])
    v25, v24 = (a.ack.decode().split("\r") for a in answers)
    assert [a.ack_code for a in answers] == ["AA", "AA"]
    assert v25[1] == "MSA|AA|W-1" and sorted(s for s in v25 if s.startswith("ERR")) == [
        "ERR||PID^1^30|102^Data type error^HL70357|W||||PID-30: death indicator is not Y or N, ignored",
        "ERR||PID^1^7|102^Data type error^HL70357|W||||PID-7: unparseable timestamp ignored"]
    assert v24[1] == "MSA|AA|W-2" and not [s for s in v24 if s.startswith("ERR")]
    # an event time that cannot be read (the admit time then comes from MSH-7): said too
    (when,) = run(engine, [received(msg("W-4", body=b"EVN|A01|2026113299\rPID|1||3^^^GENHOSP^MR||DOE^JANE\r"
                                                      b"PV1|1|I|W1^1^A||||||||||||||||V4\r"))])
    assert [s for s in when.ack.decode().split("\r") if s.startswith("ERR")] == [
        "ERR||EVN^1^2|102^Data type error^HL70357|W||||EVN-2: unparseable timestamp ignored"]
    # a protection indicator neither Y nor N is read as Y (an opt-out must not fail open), and said
    (odd,) = run(engine, [received(msg("W-3", body=b"PID|1||2^^^GENHOSP^MR||DOE^JANE||19800101|F\rPD1||||||||||||YES\r"))])
    assert [s for s in odd.ack.decode().split("\r") if s.startswith("ERR")] == [
        "ERR||PD1^1^12|102^Data type error^HL70357|W||||PD1-12: the protection indicator is not Y or N, read as Y"
        " (no copies go)"]


def test_a_resend_in_the_same_batch_is_applied_once(engine):
    first, second = run(engine, [received(msg("P-2")), received(msg("P-2"))])
    assert second.duplicate and second.ack == first.ack and second.message_id == first.message_id
    assert rows(engine, "select count(*) from message") == [(1,)]
    assert [s for (s,) in rows(engine, "select state from message_event order by id")] == ["accepted", "resent"]


def test_a_resend_in_a_later_batch_gets_the_stored_answer(engine):
    (first,) = run(engine, [received(msg("P-3"))])
    (again,) = run(engine, [received(msg("P-3"), peer="127.0.0.1:6000")])
    assert again.duplicate and again.ack == first.ack
    assert rows(engine, "select count(*) from message") == [(1,)]
    assert rows(engine, "select detail from message_event where state = 'resent'") == [("127.0.0.1:6000",)]


def test_the_same_control_id_from_two_facilities_is_two_messages(engine):
    a, b = run(engine, [received(msg("P-4")), received(msg("P-4", facility="OAKNH"))])
    assert not a.duplicate and not b.duplicate and a.message_id != b.message_id


def test_rejected_messages_are_stored_but_not_deduplicated(engine):
    a, b = run(engine, [received(msg("P-5", facility="NOBODY")), received(msg("P-5", facility="NOBODY"))])
    assert a.ack_code == b.ack_code == "AR"
    assert not b.duplicate
    stored = rows(engine, "select state, dedup, reason from message order by id")
    assert [(state, bool(dedup)) for state, dedup, _ in stored] == [("rejected", False)] * 2
    assert all("not a configured facility" in reason for _, _, reason in stored)


def test_inbound_ack_is_recorded_without_an_answer(engine):
    raw = b"MSH|^~\\&|APP|GENHOSP|EX|EX|20261127||ACK^A01^ACK|IN-1|P|2.5\rMSA|AA|X\r"
    (answer,) = run(engine, [received(raw)])
    assert answer.ack is None and answer.ack_code is None
    assert rows(engine, "select state, ack from message") == [("ignored", None)]


def test_a_body_not_in_its_declared_charset_gets_ae_and_the_same_ae_when_resent(engine):
    bad = msg("P-6", msh18="UNICODE UTF-8", body=b"PID|1||1||M\xdcLLER\r")
    (answer,) = run(engine, [received(bad)])
    assert answer.ack_code == "AE"
    assert b"MSH^1^18" in answer.ack  # ERR-2 names MSH-18
    (again,) = run(engine, [received(bad)])
    assert again.duplicate and again.ack == answer.ack
    ((state, reason),) = rows(engine, "select state, reason from message")
    assert state == "error" and "UTF-8" in reason and "LLER" not in reason


def test_undeclared_latin1_body_is_accepted_and_the_fallback_noted(engine):
    (answer,) = run(engine, [received(msg("P-7", body=b"PID|1||1||M\xdcLLER\r"))])
    assert answer.ack_code == "AA"
    ((reason,),) = rows(engine, "select reason from message")
    assert "cp1252" in reason


def test_history_row_per_message_in_one_batch(engine):
    answers = run(engine, [received(msg(f"B-{i}")) for i in range(50)])
    assert len({a.message_id for a in answers}) == 50
    assert rows(engine, "select count(*) from message_event") == [(50,)]


def test_accepted_adt_is_applied_to_the_record_model_in_the_same_transaction(engine):
    from exchange.store.records import record_view

    (answer,) = run(engine, [received(msg("REC-1", body=b"PID|1||MRN77^^^GENHOSP^MR||DOE^JANE||19800101|F\rPV1|1|I|W1^1^A||||||||||||||||V77\r"))])
    assert answer.ack_code == "AA"
    with engine.connect() as conn:
        view = record_view(conn, "GENHOSP", "MRN77")
        events = conn.execute(text("select message_id from record_event")).all()
    assert view["active"] is True and view["sex"] == "F"
    assert view["birth_date"] == "1980-01-01"
    assert [e["visit_number"] for e in view["encounters"]] == ["V77"]
    assert view["encounters"][0]["status"] == "admitted"
    assert {m for (m,) in events} == {answer.message_id}  # which message changed what
    assert view["birth_time"] is None


def test_a_birth_date_with_a_time_of_birth_is_still_an_iso_date(engine):
    """Found by a contract audit: PID-7 19400229120000 showed as "birth_date": "1940-02-29T12:00:00"."""
    from exchange.store.records import record_view

    body = b"PID|1||MRN78^^^GENHOSP^MR||DOE^JANE||194002291200-0500|F\r"
    (answer,) = run(engine, [received(msg("REC-2", body=body))])
    assert answer.ack_code == "AA"
    with engine.connect() as conn:
        view = record_view(conn, "GENHOSP", "MRN78")
    assert (view["birth_date"], view["birth_time"]) == ("1940-02-29", "1940-02-29T12:00:00-05:00")


def test_a_message_that_cannot_be_applied_gets_ae_is_stored_and_changes_nothing(engine):
    (answer,) = run(engine, [received(msg("REC-2", body=b"PID|1\r"))])
    assert answer.ack_code == "AE"
    assert b"PID^1^3" in answer.ack  # ERR-2 names PID-3
    assert rows(engine, "select state from message") == [("error",)]
    assert rows(engine, "select count(*) from patient_record") == [(0,)]


def test_messages_in_one_batch_see_each_other_in_arrival_order(engine):
    from exchange.store.records import record_view

    pid = b"PID|1||MRN88^^^GENHOSP^MR||DOE^JOHN||19700101|M\r"
    admit = msg("REC-3", body=pid + b"PV1|1|I|W2^1^A||||||||||||||||V88|||||||||||||||||||||||||20261127100000\r")
    discharge = msg("REC-4", body=pid + b"PV1|1|I|W2^1^A||||||||||||||||V88|||||||||||||||||||||||||20261127100000|20261127180000\r").replace(b"ADT^A01^ADT_A01", b"ADT^A03^ADT_A03")
    a, b = run(engine, [received(admit), received(discharge)])
    assert a.ack_code == b.ack_code == "AA"
    with engine.connect() as conn:
        (encounter,) = record_view(conn, "GENHOSP", "MRN88")["encounters"]
    assert encounter["status"] == "discharged"
    assert encounter["admitted_at"].startswith("2026-11-27T10:00")


def test_without_facilities_nothing_is_mapped(engine):
    (answer,) = run(engine, [received(msg("REC-5", body=b"PID|1\r"))], facilities=None)
    assert answer.ack_code == "AA"
    assert rows(engine, "select count(*) from record_event") == [(0,)]


def test_a_visit_keeps_its_attending_and_consulting_doctors_and_the_record_view_shows_them(engine):
    from exchange.store.records import record_view

    pid = b"PID|1||MRN99^^^GENHOSP^MR||DOE^JOHN||19700101|M\r"
    admit = msg("REC-6", body=pid + b"PV1|1|I|W2^1^A||||D1^WHO^AL^^^^^^NPI||C1^CON^CY~C2^SUL^SY||||||||||V99\r")
    (answer,) = run(engine, [received(admit)])
    assert answer.ack_code == "AA"
    with engine.connect() as conn:
        (encounter,) = record_view(conn, "GENHOSP", "MRN99")["encounters"]
    assert encounter["attending"] == {"id": "D1", "family": "WHO", "given": "AL", "authority": "NPI"}
    assert [d["id"] for d in encounter["consulting"]] == ["C1", "C2"]
    # an encounter stored before PV1-9 was kept (no "consulting" in its data) still reads and updates
    with engine.begin() as conn:
        data = conn.execute(text("select data from encounter")).scalar_one()
        stored = json.loads(data) if isinstance(data, str) else data
        del stored["consulting"]
        conn.execute(text("update encounter set data = :d"), {"d": json.dumps(stored)})
    with engine.connect() as conn:
        assert record_view(conn, "GENHOSP", "MRN99")["encounters"][0]["consulting"] == []
    update = msg("REC-7", body=pid + b"PV1|1|I|W2^1^B||||||C3^NEW^NA||||||||||V99\r").replace(b"ADT^A01", b"ADT^A08")
    (answer,) = run(engine, [received(update)])
    assert answer.ack_code == "AA"
    with engine.connect() as conn:
        (encounter,) = record_view(conn, "GENHOSP", "MRN99")["encounters"]
    assert (encounter["attending"]["id"], [d["id"] for d in encounter["consulting"]]) == ("D1", ["C3"])


def test_a_message_stored_unapplied_is_answered_ae_207_and_a_resend_is_tried_again(engine):
    """What the intake stores for a message whose processing raised alone twice (a bug): the
    message and its AE, nothing of it applied, not deduplicated."""
    from exchange.pipeline import unapplied

    raw = msg("BUG-1", body=b"PID|1||MRN99^^^GENHOSP^MR||DOE^JANE||19800101|F\r")
    (answer,) = run(engine, [unapplied(received(raw))])
    assert answer.ack_code == "AE" and not answer.duplicate
    assert b"MSA|AE|BUG-1" in answer.ack and b"207" in answer.ack
    assert [(s, bool(d)) for s, d in rows(engine, "select state, dedup from message")] == [("error", False)]
    assert rows(engine, "select count(*) from patient_record") == [(0,)]
    (again,) = run(engine, [received(raw)])  # resent once the exchange is fixed: applied
    assert again.ack_code == "AA" and not again.duplicate
    assert rows(engine, "select mrn from patient_record") == [("MRN99",)]
