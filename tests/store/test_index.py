"""The patient index in the writer's transaction (exchange.store.index through
process_batch), on SQLite and PostgreSQL: who ends up in which person, what the
history and the reviews say, and that sticky facts hold."""
from __future__ import annotations

import itertools
from datetime import datetime, timezone

from sqlalchemy import text

from exchange.acceptance import AcceptancePolicy, FacilityRule, accept
from exchange.hl7.header import read_header
from exchange.mapping.events import FacilityContext
from exchange.pipeline import Received, process_batch
from exchange.store.index import ModelCache
from exchange.store.reviews import person_view, undo_decision

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
CODES = ("GENHOSP", "OAKNH", "HHCARE")
POLICY = AcceptancePolicy({code: FacilityRule(code) for code in CODES})
FACILITIES = {code: FacilityContext(code, code) for code in CODES}
_ids = itertools.count(1)


def pid(mrn: str, facility: str, name: str, birth: str, sex: str = "F", address: str = "12 OAK ST^^SPRINGFIELD^IL^62701",
        phone: str = "555-0100", ssn: str = "") -> str:
    return f"PID|1||{mrn}^^^{facility}^MR||{name}||{birth}|{sex}|||{address}||{phone}||||||{ssn}"


def adt(facility: str, event: str, *segments: str) -> bytes:
    control = f"IX{next(_ids)}"
    return ("\r".join([f"MSH|^~\\&|APP|{facility}|EX|EX|20261127120000||ADT^{event}^ADT_A01|{control}|P|2.5",
                       f"EVN|{event}|20261127120000", *segments]) + "\r").encode()


def register(facility, mrn, name, birth, **kw) -> bytes:
    return adt(facility, "A28", pid(mrn, facility, name, birth, **kw))


def run(engine, *raws: bytes, models: ModelCache | None = None) -> list[str]:
    items = []
    for raw in raws:
        header = read_header(raw)
        items.append(Received(raw, header, accept(header, POLICY), NOW, "127.0.0.1:5000"))
    with engine.begin() as conn:
        answers = process_batch(conn, items, new_control_id=lambda: f"ACK{next(_ids)}", now=lambda: NOW,
                                facilities=FACILITIES, models=models or ModelCache())
    return [a.ack_code for a in answers]


def person(engine, facility: str, mrn: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text("select person_id from patient_record where facility = :f and mrn = :m"),
                            {"f": facility, "m": mrn}).scalar_one()


def rows(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(sql), params).all()


ELIZABETH = dict(name="HANSON^ELIZABETH^M", birth="19400304", ssn="219-09-9999")


def test_the_same_woman_at_three_facilities_is_one_person(engine):
    assert run(engine, register("OAKNH", "OA917082", **ELIZABETH)) == ["AA"]
    assert run(engine, register("GENHOSP", "GH-44107", name="HANSEN^LIZ", birth="19400304", ssn="219099999")) == ["AA"]
    assert run(engine, register("HHCARE", "HH-3391", name="HANSON-MOORE^ELIZABETH", birth="19400304",
                                ssn="219-09-9999")) == ["AA"]
    p = person(engine, "OAKNH", "OA917082")
    assert person(engine, "GENHOSP", "GH-44107") == p and person(engine, "HHCARE", "HH-3391") == p
    links = rows(engine, "select facility, link, link_score from patient_record order by id")
    assert [(f, link) for f, link, _ in links] == [("OAKNH", "auto"), ("GENHOSP", "auto"), ("HHCARE", "auto")]
    assert links[0][2] is None and links[1][2] > 20 and links[2][2] > 20  # scores (bits) above the upper threshold
    history = rows(engine, "select facility, to_person, actor, message_id from link_event order by id")
    assert [(f, to, actor) for f, to, actor, _ in history] == [("OAKNH", p, "exchange"), ("GENHOSP", p, "exchange"),
                                                              ("HHCARE", p, "exchange")]
    assert all(message_id is not None for *_, message_id in history)
    assert rows(engine, "select count(*) from match_review") == [(0,)]
    assert rows(engine, "select count(distinct record_id) from record_key") == [(3,)]
    assert rows(engine, "select count(*) from record_key where key like 'ssn:%'") == [(3,)]  # PID-19 read


def test_records_in_one_batch_are_matched_against_each_other(engine):
    run(engine, register("OAKNH", "OA-1", **ELIZABETH), register("GENHOSP", "GH-1", **ELIZABETH))
    assert person(engine, "OAKNH", "OA-1") == person(engine, "GENHOSP", "GH-1")
    assert rows(engine, "select count(*) from person p where exists "
                        "(select 1 from patient_record r where r.person_id = p.id)") == [(1,)]


def test_different_people_and_twins_stay_apart(engine):
    run(engine, register("OAKNH", "OA-2", name="HANSON^ELIZABETH", birth="19400304"))
    run(engine, register("GENHOSP", "GH-2", name="KOWALCZYK^PIOTR", birth="19551111", sex="M",
                         address="9 ELM ST^^DENVER^CO^80201", phone="555-0199"))
    run(engine, register("GENHOSP", "GH-3", name="HANSON^MARGARET", birth="19400304"))  # her twin
    persons = {person(engine, "OAKNH", "OA-2"), person(engine, "GENHOSP", "GH-2"), person(engine, "GENHOSP", "GH-3")}
    assert len(persons) == 3


def test_a_second_registration_at_the_same_facility_is_a_review_never_a_link(engine):
    run(engine, register("GENHOSP", "GH-10", **ELIZABETH))
    run(engine, register("GENHOSP", "GH-11", **ELIZABETH))
    assert person(engine, "GENHOSP", "GH-10") != person(engine, "GENHOSP", "GH-11")
    ((kind, facility, mrn, suggested, state, detail),) = rows(
        engine, "select kind, facility, mrn, person_id, state, detail from match_review")
    assert (kind, facility, mrn, state) == ("duplicate", "GENHOSP", "GH-11", "open")
    assert suggested == person(engine, "GENHOSP", "GH-10")
    import json

    detail = json.loads(detail) if isinstance(detail, str) else detail
    assert detail["candidates"][0]["mrn"] == "GH-10" and detail["thresholds"]["upper"] > detail["thresholds"]["lower"]
    assert any(f["field"] == "birth" for f in detail["candidates"][0]["explain"]["fields"])


def test_a_technicians_not_a_match_is_never_relinked_automatically(engine):
    run(engine, register("OAKNH", "OA-20", **ELIZABETH))
    with engine.begin() as conn:
        for a, b in ((("GENHOSP", "GH-20"), ("OAKNH", "OA-20")), (("OAKNH", "OA-20"), ("GENHOSP", "GH-20"))):
            conn.execute(text("insert into match_pair (facility, mrn, other_facility, other_mrn, active) "
                              "values (:f, :m, :of, :om, :a)"), {"f": a[0], "m": a[1], "of": b[0], "om": b[1], "a": True})
    run(engine, register("GENHOSP", "GH-20", **ELIZABETH))
    assert person(engine, "GENHOSP", "GH-20") != person(engine, "OAKNH", "OA-20")


def test_an_update_that_changes_nothing_matching_reads_is_not_rematched(engine):
    run(engine, register("OAKNH", "OA-30", **ELIZABETH))
    before = rows(engine, "select count(*) from link_event")
    admit = adt("OAKNH", "A01", pid("OA-30", "OAKNH", **ELIZABETH), "PV1|1|I|W1^1^A" + "|" * 16 + "|V1")
    assert run(engine, admit) == ["AA"]
    assert rows(engine, "select count(*) from link_event") == before
    assert rows(engine, "select count(*) from match_review") == [(0,)]


def test_a_manual_link_is_not_broken_and_a_changed_record_is_rematched(engine):
    run(engine, register("OAKNH", "OA-40", **ELIZABETH))
    run(engine, register("GENHOSP", "GH-40", **ELIZABETH))
    p = person(engine, "OAKNH", "OA-40")
    with engine.begin() as conn:
        conn.execute(text("update patient_record set link = 'manual' where mrn = 'GH-40'"))
    # the hospital corrects the birth date to something quite different: the manual link holds, a review opens
    run(engine, adt("GENHOSP", "A08", pid("GH-40", "GENHOSP", name="HANSON^ELIZABETH^M", birth="19621225",
                                          ssn="987-65-4321", address="1 PINE RD^^AUSTIN^TX^73301", phone="555-0777")))
    assert person(engine, "GENHOSP", "GH-40") == p
    assert rows(engine, "select kind, mrn, state from match_review") == [("link_looks_wrong", "GH-40", "open")]


def test_an_automatic_link_an_update_makes_wrong_is_taken_back_at_once(engine):
    """Found by a black-box audit: an A08 turned OAKNH's record into another person; the link was
    kept while the review waited, and each site got the other patient's events in its own MRN."""
    run(engine, register("OAKNH", "OA-45", **ELIZABETH))
    run(engine, register("GENHOSP", "GH-45", **ELIZABETH))
    p = person(engine, "OAKNH", "OA-45")
    assert person(engine, "GENHOSP", "GH-45") == p
    run(engine, adt("OAKNH", "A08", pid("OA-45", "OAKNH", name="NAKAMURA^KENJI", birth="19610930", sex="M",
                                        ssn="540-87-1123", address="4500 PACIFIC HWY^^SALEM^OR^97301",
                                        phone="555-0777")))
    moved = person(engine, "OAKNH", "OA-45")
    assert moved != p and person(engine, "GENHOSP", "GH-45") == p
    assert rows(engine, "select kind, mrn, person_id, state from match_review") == [
        ("link_looks_wrong", "OA-45", p, "open")]  # it suggests the person it left
    assert rows(engine, "select from_person, to_person, kind from link_event where mrn = 'OA-45'"
                        " order by id")[-1] == (p, moved, "auto")


def test_a24_links_two_records_of_a_facility_and_a37_unlinks_them(engine):
    run(engine, register("GENHOSP", "GH-50", name="DOE^JANE", birth="19700101"))
    run(engine, register("GENHOSP", "GH-51", name="ROE^ANN", birth="19800202", sex="F",
                         address="5 BIRCH LN^^RENO^NV^89501", phone="555-0333"))
    assert person(engine, "GENHOSP", "GH-50") != person(engine, "GENHOSP", "GH-51")
    link = adt("GENHOSP", "A24", pid("GH-50", "GENHOSP", name="DOE^JANE", birth="19700101"),
               pid("GH-51", "GENHOSP", name="ROE^ANN", birth="19800202", address="5 BIRCH LN^^RENO^NV^89501",
                   phone="555-0333"))
    assert run(engine, link) == ["AA"]
    assert person(engine, "GENHOSP", "GH-50") == person(engine, "GENHOSP", "GH-51")
    assert rows(engine, "select link from patient_record where mrn = 'GH-51'") == [("source",)]
    unlink = link.replace(b"ADT^A24", b"ADT^A37").replace(b"EVN|A24", b"EVN|A37").replace(b"|IX", b"|IXU")
    assert run(engine, unlink) == ["AA"]
    assert person(engine, "GENHOSP", "GH-50") != person(engine, "GENHOSP", "GH-51")
    assert len(rows(engine, "select * from match_pair where active")) == 2


def persons_named_exist(engine) -> None:
    """Every person the link history and the reviews name is a person of the database."""
    persons = {p for (p,) in rows(engine, "select id from person")}
    named = rows(engine, "select from_person from link_event union select to_person from link_event"
                         " union select person_id from match_review")
    assert {p for (p,) in named if p is not None} <= persons


def test_an_a24_naming_a_new_mrn_puts_the_new_record_in_the_first_ones_person(engine):
    """Found by a black-box audit: an A24 whose second PID named an MRN never seen before was
    never answered on PostgreSQL (DataError: the link history named the person matching had
    given the new record, which the A24 then took it out of, and so was never created);
    SQLite stored the placeholder text in link_event."""
    run(engine, register("GENHOSP", "GH-52", name="KELLER^JO", birth="19700101"))
    p = person(engine, "GENHOSP", "GH-52")
    persons = rows(engine, "select count(*) from person")
    link = adt("GENHOSP", "A24", pid("GH-52", "GENHOSP", name="KELLER^JO", birth="19700101"),
               pid("GH-53", "GENHOSP", name="KELLER^JO", birth="19700101"))
    assert run(engine, link) == ["AA"]
    assert person(engine, "GENHOSP", "GH-53") == p
    assert rows(engine, "select link from patient_record where mrn = 'GH-53'") == [("source",)]
    assert rows(engine, "select count(*) from person") == persons  # no person made for it and left empty
    # its history goes straight into the person the facility named
    assert rows(engine, "select from_person, to_person, kind from link_event where mrn = 'GH-53'") == [
        (None, p, "source")]
    persons_named_exist(engine)


def test_an_a24_from_a_record_linked_elsewhere_with_other_details_and_a_new_mrn_is_applied(engine):
    """Found by a black-box audit (SQLite: TypeError, PostgreSQL: DataError, no ACK either way):
    the first PID's record, linked to another facility's, arrives with other demographics and no
    birth date, so it is taken out of that person; the second names a new MRN."""
    keller = dict(name="KELLER^JO", birth="19700101", ssn="123-45-6789")
    run(engine, register("HHCARE", "HH-54", **keller))
    run(engine, register("GENHOSP", "GH-54", **keller))
    assert person(engine, "HHCARE", "HH-54") == person(engine, "GENHOSP", "GH-54")
    link = adt("HHCARE", "A24", "PID|1||HH-54^^^HHCARE^MR||X^Y", "PID|2||HH-55^^^HHCARE^MR||X^Y")
    assert run(engine, link) == ["AA"]
    first = person(engine, "HHCARE", "HH-54")
    assert person(engine, "HHCARE", "HH-55") == first != person(engine, "GENHOSP", "GH-54")
    persons_named_exist(engine)
    # the review of the first record names the new one as it is now
    import json

    [(detail,)] = rows(engine, "select detail from match_review where mrn = 'HH-54' and state = 'open'")
    detail = json.loads(detail) if isinstance(detail, str) else detail
    assert {(c["mrn"], c["person"]) for c in detail["candidates"]} >= {("HH-55", first)}


def test_an_a24_keeps_the_matching_features_of_a_record_it_did_not_change(engine):
    """Found while fixing the above: the second record, unchanged by the A24, lost its stored
    features (NULL), so it was nobody's candidate any more."""
    run(engine, register("GENHOSP", "GH-56", name="DOE^JANE", birth="19700101"))
    run(engine, register("GENHOSP", "GH-57", **ELIZABETH))
    before = rows(engine, "select features from patient_record where mrn = 'GH-57'")
    assert run(engine, adt("GENHOSP", "A24", pid("GH-56", "GENHOSP", name="DOE^JANE", birth="19700101"),
                           pid("GH-57", "GENHOSP", **ELIZABETH))) == ["AA"]
    assert person(engine, "GENHOSP", "GH-57") == person(engine, "GENHOSP", "GH-56")
    assert rows(engine, "select features from patient_record where mrn = 'GH-57'") == before != [(None,)]
    # and it is found again: a registration elsewhere with its details has it for a candidate
    run(engine, register("OAKNH", "OA-57", **ELIZABETH))
    # (a review: the person holds another patient too, by the facility's word)
    assert [c for _, c, _ in open_reviews(engine, "OA-57")] == [[("GENHOSP", "GH-57")]]


def test_a_stored_model_is_used(engine):
    from exchange.matching.model import default_model

    strict = default_model().replace(upper=1000.0, lower=999.0)  # nothing can reach it: every record alone
    with engine.begin() as conn:
        conn.execute(text("insert into match_model (created_at, model) values (:at, :m)"),
                     {"at": NOW, "m": strict.to_json()})
    models = ModelCache()
    run(engine, register("OAKNH", "OA-60", **ELIZABETH), models=models)
    run(engine, register("GENHOSP", "GH-60", **ELIZABETH), models=models)
    assert person(engine, "OAKNH", "OA-60") != person(engine, "GENHOSP", "GH-60")


def test_replay_keeps_every_records_person_and_rebuilds_the_keys(engine):
    from exchange.replay import replay

    run(engine, register("OAKNH", "OA-70", **ELIZABETH))
    run(engine, register("GENHOSP", "GH-70", **ELIZABETH))
    run(engine, register("GENHOSP", "GH-71", name="KOWALCZYK^PIOTR", birth="19551111", sex="M"))
    with engine.begin() as conn:  # a technician's decision, to be kept
        conn.execute(text("update patient_record set link = 'manual' where mrn = 'GH-71'"))
    before = rows(engine, "select facility, mrn, person_id, link, link_score, features from patient_record order by mrn")
    keys = rows(engine, "select r.mrn, k.key from record_key k join patient_record r on r.id = k.record_id "
                        "order by r.mrn, k.key")
    report = replay(engine, FACILITIES)
    assert report.messages == 3 and not report.not_applied
    assert rows(engine, "select facility, mrn, person_id, link, link_score, features from patient_record "
                        "order by mrn") == before
    assert rows(engine, "select r.mrn, k.key from record_key k join patient_record r on r.id = k.record_id "
                        "order by r.mrn, k.key") == keys


def test_a_key_shared_by_too_many_records_finds_no_candidates(engine, monkeypatch):
    """A stop key (the nursing home's switchboard number on every resident) is skipped,
    so the cost of a message does not grow with the index."""
    import exchange.store.index as index

    monkeypatch.setattr(index, "STOP_KEY", 5)
    names = ["ADAMS^AMY", "BROWN^BEN", "CLARK^CARA", "DAVIS^DAN", "EVANS^EVE", "FOX^FAY", "GRAY^GUS"]
    run(engine, *[register("OAKNH", f"OA-{i}", name=n, birth=f"19{30 + i}0101", phone="555-0000",
                           address=f"{i} MAIN ST^^RENO^NV^89501") for i, n in enumerate(names)])
    with engine.connect() as conn:
        postings, _, known, _ = index._read(conn, {"ph:5550000", "dob:19300101"}, set(), [])
    assert "ph:5550000" not in postings  # seven records: over the limit
    assert postings["dob:19300101"] == {("OAKNH", "OA-0")} and ("OAKNH", "OA-0") in known


def test_a40_brings_the_retired_records_person_to_the_survivor(engine):
    run(engine, register("OAKNH", "OA-80", **ELIZABETH))
    run(engine, register("GENHOSP", "GH-80", **ELIZABETH))  # linked to the nursing home's record
    run(engine, register("GENHOSP", "GH-81", **ELIZABETH))  # a duplicate registration: a review, its own person
    assert person(engine, "GENHOSP", "GH-80") == person(engine, "OAKNH", "OA-80") != person(engine, "GENHOSP", "GH-81")
    emptied = person(engine, "GENHOSP", "GH-80")
    merge = adt("GENHOSP", "A40", pid("GH-81", "GENHOSP", **ELIZABETH), "MRG|GH-80^^^GENHOSP^MR")
    assert run(engine, merge) == ["AA"]
    survivor = person(engine, "GENHOSP", "GH-81")
    assert person(engine, "OAKNH", "OA-80") == survivor and person(engine, "GENHOSP", "GH-80") == survivor
    moved = rows(engine, "select facility, mrn, to_person from link_event where kind = 'merge' order by mrn")
    assert moved == [("GENHOSP", "GH-80", survivor), ("OAKNH", "OA-80", survivor)]
    # whoever kept the emptied person's id is led to the survivor's, as after a technician's merge
    assert rows(engine, f"select merged_into from person where id = {emptied}") == [(survivor,)]
    with engine.connect() as conn:
        assert person_view(conn, emptied)["merged_into"] == survivor
    assert rows(engine, "select active from patient_record where mrn = 'GH-80'") in ([(False,)], [(0,)])
    # the duplicate review of GH-81 (its one candidate GH-80) is answered by the merge
    assert rows(engine, "select mrn, state from match_review") == [("GH-81", "superseded")]


def test_a40_supersedes_the_open_reviews_it_answers_and_no_other(engine):
    run(engine, register("GENHOSP", "GH-90", **ELIZABETH))
    run(engine, register("GENHOSP", "GH-91", **ELIZABETH))  # review of GH-91: candidate GH-90
    run(engine, register("GENHOSP", "GH-92", **ELIZABETH))  # review of GH-92: candidates GH-90, GH-91
    assert rows(engine, "select mrn, state from match_review order by mrn") == [("GH-91", "open"), ("GH-92", "open")]
    run(engine, adt("GENHOSP", "A40", pid("GH-90", "GENHOSP", **ELIZABETH), "MRG|GH-91^^^GENHOSP^MR"))
    # GH-91 is merged away: its review is moot; GH-92's still asks about GH-90
    assert rows(engine, "select mrn, state from match_review order by mrn") == [("GH-91", "superseded"),
                                                                                ("GH-92", "open")]


def test_a_batch_with_more_keys_than_one_sqlite_select_takes(engine, monkeypatch):
    """SQLite allows 500 terms in a compound SELECT; a big batch (a backlog) has more keys."""
    import exchange.store.index as index

    monkeypatch.setattr(index, "KEYS_PER_SELECT", 3)
    run(engine, register("OAKNH", "OA-90", **ELIZABETH))
    assert run(engine, *[register("GENHOSP", f"GH-9{i}", name=n, birth=f"19{40 + i}0304")
                         for i, n in enumerate(["HANSON^ELIZABETH^M", "DOE^JANE", "ROE^ANN"])]) == ["AA"] * 3
    assert person(engine, "GENHOSP", "GH-90") == person(engine, "OAKNH", "OA-90")


def test_candidates_are_read_through_indexes_and_each_record_once(tmp_path):
    """SQLite: the posting and record SELECTs search indexes (no scan of record_key or
    patient_record, whatever the size of the index), and a record found through
    several keys comes back once."""
    from exchange.store.db import make_engine, upgrade
    import exchange.store.index as index

    eng = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    upgrade(eng)
    run(eng, register("OAKNH", "OA-1", **ELIZABETH), register("OAKNH", "OA-2", name="DOE^JANE", birth="19500101"))
    with eng.begin() as conn:
        raw = conn.connection.driver_connection
        seen: list[str] = []
        raw.set_trace_callback(seen.append)
        try:
            postings, members, known, _ = index._read(conn, {"dob:19400304", "ssn:219099999", "dob:19500101"},
                                                      set(), [])
        finally:
            raw.set_trace_callback(None)
        assert postings["dob:19400304"] == postings["ssn:219099999"] == {("OAKNH", "OA-1")}
        assert set(known) == {("OAKNH", "OA-1"), ("OAKNH", "OA-2")} and len(members) == 2
        selects = [sql for sql in seen if sql.lstrip().upper().startswith("SELECT")]
        assert len(selects) == 2
        for sql in selects:
            # the trace shows the parameters bound: explain it with literal values in place
            plan = " / ".join(row[-1] for row in raw.execute("EXPLAIN QUERY PLAN " + sql))
            assert "SCAN patient_record" not in plan and "SCAN record_key" not in plan, (sql, plan)
    eng.dispose()


def test_candidates_are_read_through_indexes_on_postgresql_without_statistics(engine):
    """PostgreSQL: where autovacuum is off no ANALYZE ever runs, and planned as a join
    the record SELECT scanned patient_record (3 ms at 2,500 records, growing); each
    person's records are an index look-up whatever the planner knows."""
    if engine.dialect.name != "postgresql":
        return
    import exchange.store.index as index

    with engine.begin() as conn:
        conn.execute(text("INSERT INTO person (id, created_at) SELECT n, now() FROM generate_series(1, 5000) AS n"))
        conn.execute(text(
            "INSERT INTO patient_record (id, facility, mrn, authority, person_id, active, created_at, updated_at,"
            " data, link, features) SELECT n, 'OAKNH', 'OA-' || n, 'OAKNH', n, true, now(), now(),"
            " json_build_object('pad', repeat('x', 900)), 'auto', NULL"
            " FROM generate_series(1, 5000) AS n"))
        conn.execute(text("INSERT INTO record_key (key, record_id) SELECT 'dob:' || (n % 2000), n"
                          " FROM generate_series(1, 5000) AS n"))
    with engine.begin() as conn:
        postings, members, known, _ = index._read(conn, {f"dob:{i}" for i in range(1, 21)}, {4999}, [])
        assert postings["dob:7"] == {("OAKNH", "OA-7"), ("OAKNH", "OA-2007"), ("OAKNH", "OA-4007")}
        assert len(known) == 61 and set(members) == {r + d for r in range(1, 21) for d in (0, 2000, 4000)} | {4999}
        with conn.connection.driver_connection.cursor() as cursor:
            cursor.execute("EXPLAIN " + index._PG_CANDIDATES,
                           {"keys": [f"dob:{i}" for i in range(1, 21)], "stop": index.STOP_KEY, "own": [4999]},
                           prepare=False)
            plan = "\n".join(r[0] for r in cursor.fetchall())
            assert "Seq Scan on patient_record" not in plan and "Seq Scan on record_key" not in plan, plan


def test_two_writers_registering_one_new_patient_at_once_make_one_person(engine):
    """Two nodes on one PostgreSQL (found by a black-box audit: 8 of 10 such pairs became two
    persons, with no review). The second writer waits on the first one's blocking keys, then
    finds its record. SQLite has one writer: nothing to race."""
    import threading

    if engine.dialect.name != "postgresql":
        return
    first = engine.connect()
    tx = first.begin()
    items = [Received(register("OAKNH", "OA-99", **ELIZABETH), read_header(register("OAKNH", "OA-99", **ELIZABETH)),
                      accept(read_header(register("OAKNH", "OA-99", **ELIZABETH)), POLICY), NOW, "node 1")]
    process_batch(first, items, new_control_id=lambda: f"ACK{next(_ids)}", now=lambda: NOW,
                  facilities=FACILITIES, models=ModelCache())
    second: list = []
    other = threading.Thread(target=lambda: second.append(run(engine, register("HHCARE", "HH-99", **ELIZABETH))))
    other.start()
    other.join(1.0)
    assert other.is_alive()  # waiting for the first writer's keys
    tx.commit()
    first.close()
    other.join(10)
    assert second == [["AA"]]
    assert person(engine, "OAKNH", "OA-99") == person(engine, "HHCARE", "HH-99")


def test_a_technicians_split_waits_for_the_batch_in_flight_and_is_not_written_over(engine, monkeypatch):
    """Found by a black-box audit (PostgreSQL, one node or two): a split committed while a batch
    re-matching the record's A08 was between reading it and saving it was written over -- the
    record went back to the person it had been split from, its link "auto". A decision now holds
    the links lock exclusively, which every batch shares: it waits for the batch, then decides on
    what the batch wrote. (SQLite: both transactions begin IMMEDIATE, one at a time.)"""
    import threading

    import exchange.store.index as index
    from exchange.store.db import write_transaction
    from exchange.store.reviews import split_record

    if engine.dialect.name != "postgresql":
        return
    run(engine, register("OAKNH", "OA-77", **ELIZABETH), register("GENHOSP", "GH-77", **ELIZABETH))
    together = person(engine, "GENHOSP", "GH-77")
    assert person(engine, "OAKNH", "OA-77") == together
    paused, resume = threading.Event(), threading.Event()
    real_plan = index.plan

    def slow_plan(*args, **kwargs):  # the batch has read the record; the technician acts now
        paused.set()
        resume.wait(10)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(index, "plan", slow_plan)
    update = adt("GENHOSP", "A08", pid("GH-77", "GENHOSP", phone="555-0177", **ELIZABETH))
    batch = threading.Thread(target=lambda: run(engine, update))
    batch.start()
    assert paused.wait(10)

    def split():
        with write_transaction(engine) as conn:
            split_record(conn, together, "GENHOSP", "GH-77", actor="technician", now=NOW, reason="not her")

    technician = threading.Thread(target=split)
    technician.start()
    technician.join(1.0)
    waited = technician.is_alive()
    resume.set()
    batch.join(10)
    technician.join(10)
    assert waited  # for the batch in flight
    assert person(engine, "GENHOSP", "GH-77") != together
    assert rows(engine, "select link from patient_record where mrn = 'GH-77'") == [("manual",)]
    assert rows(engine, "select count(*) from patient_record where mrn = 'GH-77' and data::text like '%0177%'") \
        == [(1,)]  # and the update is in


def test_a_decision_waits_for_a_batch_that_never_finishes_two_seconds_and_the_writers_go_on(engine, monkeypatch):
    """Found by a verification audit: batches queue behind a decision waiting for the links lock,
    so one batch stuck mid-transaction (its node stopped) and one decision stalled every node's
    writer for as long as the stuck batch lasted. A decision now waits at most two seconds, then
    is refused 503 with nothing decided; the writers go on."""
    import threading
    import time

    import exchange.store.reviews as reviews
    from exchange.store.db import hold_links, write_transaction

    if engine.dialect.name != "postgresql":
        return
    monkeypatch.setattr(reviews, "DECISION_WAIT_MS", 500)
    run(engine, register("OAKNH", "OA-78", **ELIZABETH), register("GENHOSP", "GH-78", **ELIZABETH))
    together = person(engine, "GENHOSP", "GH-78")
    stuck = engine.connect()
    stuck_tx = stuck.begin()
    hold_links(stuck, exclusive=False)  # a batch whose node stopped mid-transaction
    outcome: list = []

    def split():
        try:
            with write_transaction(engine) as conn:
                reviews.split_record(conn, together, "GENHOSP", "GH-78", actor="technician", now=NOW)
        except reviews.DecisionError as exc:
            outcome.append(exc.status)

    try:
        technician = threading.Thread(target=split)
        technician.start()
        time.sleep(0.2)  # the decision is waiting: a batch arriving now queues behind it...
        answers: list = []
        batch = threading.Thread(target=lambda: answers.extend(run(engine, register("HHCARE", "HH-78", **ELIZABETH))))
        batch.start()
        batch.join(5)  # ...until the decision gives up, not until the stuck one ends
        assert answers == ["AA"]
        technician.join(5)
        assert outcome == [503]
    finally:
        stuck_tx.rollback()
        stuck.close()
    assert person(engine, "GENHOSP", "GH-78") == together  # nothing decided


def test_a_batch_merging_persons_waits_for_another_nodes_batch_holding_a_record_it_moves(engine, monkeypatch):
    """Found by a black-box audit (two nodes on one PostgreSQL): an A40 merging two persons on one
    node while an A08 of a record of the retired person was in flight on another left that record
    in the merged-away person (the A08 saved the person it had read). A batch now reads its records
    FOR UPDATE: the A40's move of the record waits for the A08's commit, then writes the survivor."""
    import threading

    import exchange.store.index as index

    if engine.dialect.name != "postgresql":
        return
    ann = dict(name="MOVER^ANN", birth="19510505", ssn="", address="3 ASH ST^^SALEM^OR^97301")
    run(engine, register("GENHOSP", "G1", **ann), register("OAKNH", "O1", **ann))  # one person
    run(engine, register("GENHOSP", "G2", **ann))  # a duplicate registration: a review, a person of its own
    retired, survivor = person(engine, "GENHOSP", "G1"), person(engine, "GENHOSP", "G2")
    assert person(engine, "OAKNH", "O1") == retired != survivor
    paused, resume = threading.Event(), threading.Event()
    real_plan = index.plan

    def slow_first_plan(*args, **kwargs):  # only the A08's batch: it has read O1 by now
        if not paused.is_set():
            paused.set()
            resume.wait(10)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(index, "plan", slow_first_plan)
    a08 = threading.Thread(target=lambda: run(engine, adt("OAKNH", "A08", pid("O1", "OAKNH", phone="555-0101", **ann))))
    a08.start()
    assert paused.wait(10)
    a40 = threading.Thread(target=lambda: run(engine, adt("GENHOSP", "A40", pid("G2", "GENHOSP", **ann),
                                                          "MRG|G1^^^GENHOSP^MR")))
    a40.start()
    a40.join(1.0)
    waited = a40.is_alive()
    resume.set()
    a08.join(10)
    a40.join(10)
    assert waited  # for the A08's record
    assert person(engine, "OAKNH", "O1") == person(engine, "GENHOSP", "G2") == survivor
    assert rows(engine, "select count(*) from patient_record r join person p on p.id = r.person_id"
                        " where r.active and p.merged_into is not null") == [(0,)]


def test_a40_never_puts_two_records_of_another_facility_in_one_person(engine):
    """Found by a black-box audit: the survivor's person's members were not read when the
    survivor itself did not change, so the other facility's two records joined one person."""
    mary = dict(name="MERGEA^FLORENTINA", birth="19220202", ssn="", address="1 ELM ST^^SALEM^OR^97301")
    hugo = dict(name="MERGEB^HORATIO", birth="19230303", sex="M", ssn="", address="9 PINE RD^^EUGENE^OR^97401")
    run(engine, register("GENHOSP", "MA", **mary), register("OAKNH", "OA", **mary))
    run(engine, register("GENHOSP", "MB", **hugo), register("OAKNH", "OB", **hugo))
    assert person(engine, "GENHOSP", "MA") == person(engine, "OAKNH", "OA")
    assert person(engine, "GENHOSP", "MB") == person(engine, "OAKNH", "OB") != person(engine, "OAKNH", "OA")
    before = rows(engine, "select count(*) from match_review")[0][0]
    assert run(engine, adt("GENHOSP", "A40", pid("MA", "GENHOSP", **mary), "MRG|MB^^^GENHOSP^MR")) == ["AA"]
    assert person(engine, "GENHOSP", "MB") == person(engine, "GENHOSP", "MA")
    assert person(engine, "OAKNH", "OB") != person(engine, "OAKNH", "OA")  # not fused without a technician
    reviews = rows(engine, "select facility, mrn, kind, state from match_review order by id")[before:]
    assert reviews == [("OAKNH", "OB", "duplicate", "open")]
    # OB stayed with Horatio's old person, which is therefore not merged away
    assert rows(engine, "select merged_into from person p join patient_record r on r.person_id = p.id"
                        " where r.mrn = 'OB'") == [(None,)]


def test_undoing_an_a40_merge_gives_the_emptied_person_its_records_back(engine):
    run(engine, register("OAKNH", "OA-85", **ELIZABETH), register("GENHOSP", "GH-85", **ELIZABETH))
    run(engine, register("GENHOSP", "GH-86", **ELIZABETH))  # a duplicate registration: its own person
    emptied, survivor = person(engine, "GENHOSP", "GH-85"), person(engine, "GENHOSP", "GH-86")
    assert run(engine, adt("GENHOSP", "A40", pid("GH-86", "GENHOSP", **ELIZABETH), "MRG|GH-85^^^GENHOSP^MR")) == ["AA"]
    events = rows(engine, "select id from link_event where kind = 'merge' order by id")
    assert len(events) == 2  # the facility's merge moved two records: one event (undoable) each
    for (event,) in events:
        with engine.begin() as conn:
            undo_decision(conn, event, actor="tess", now=datetime.now(timezone.utc), reason="wrong merge")
    assert person(engine, "OAKNH", "OA-85") == person(engine, "GENHOSP", "GH-85") == emptied != survivor
    assert rows(engine, f"select merged_into from person where id = {emptied}") == [(None,)]


def test_a_merge_reversed_by_the_sender_leaves_one_active_record_in_the_patients_person(engine):
    """A40 GH-2 into GH-1, then GH-1 into GH-2: both records had been left inactive, GH-2
    'merged into' itself, and the patient's hospital record was gone from routing and export."""
    run(engine, register("OAKNH", "OA-88", **ELIZABETH), register("GENHOSP", "GH-1", **ELIZABETH))
    run(engine, register("GENHOSP", "GH-2", **ELIZABETH))
    for survivor, retired in (("GH-1", "GH-2"), ("GH-2", "GH-1")):
        assert run(engine, adt("GENHOSP", "A40", pid(survivor, "GENHOSP", **ELIZABETH),
                               f"MRG|{retired}^^^GENHOSP^MR")) == ["AA"]
    states = rows(engine, "select mrn, active, merged_into_mrn from patient_record where facility = 'GENHOSP'"
                          " order by mrn")
    assert [(m, bool(a), into) for m, a, into in states] == [("GH-1", False, "GH-2"), ("GH-2", True, None)]
    assert person(engine, "GENHOSP", "GH-2") == person(engine, "OAKNH", "OA-88")
    keyed = rows(engine, "select distinct r.mrn from record_key k join patient_record r on r.id = k.record_id"
                         " where r.facility = 'GENHOSP'")
    assert keyed == [("GH-2",)]  # the live record is a candidate again, the retired one is not


def test_an_a40_of_two_patients_does_not_carry_another_sites_record_to_the_survivor(engine):
    """Found by a black-box audit: the hospital merged Bob's record into Alice's; home health's
    Bob, matched to the hospital's Bob, joined Alice's person without a word, and Alice's
    discharge went to home health filed under Bob's MRN. A record the index matched to the
    retired side follows the merge only if it matches the survivor's person too."""
    from exchange.store.reviews import decide_review

    alice = dict(name="ABERNATHY^ALICE", birth="19700203", ssn="301-22-4455")
    bob = dict(name="ZELLER^ROBERT", birth="19640918", sex="M", address="9 ELM AVE^^RIVERTON^WY^82501",
               phone="555-0199", ssn="512-77-1234")
    run(engine, register("GENHOSP", "GA", **alice), register("OAKNH", "OA", **alice))
    run(engine, register("GENHOSP", "GB", **bob), register("HHCARE", "HB", **bob))
    bobs = person(engine, "HHCARE", "HB")
    assert person(engine, "GENHOSP", "GB") == bobs != person(engine, "OAKNH", "OA")
    assert run(engine, adt("GENHOSP", "A40", pid("GA", "GENHOSP", **alice), "MRG|GB^^^GENHOSP^MR")) == ["AA"]
    alices = person(engine, "GENHOSP", "GA")
    assert person(engine, "OAKNH", "OA") == person(engine, "GENHOSP", "GB") == alices
    assert person(engine, "HHCARE", "HB") == bobs != alices  # not moved ...
    (review,) = rows(engine, "select id, kind, person_id, state from match_review where mrn = 'HB'")
    assert review[1:] == ("duplicate", alices, "open")  # ... and a technician is asked
    with engine.begin() as conn:  # the technician answers: Bob is not Alice
        decided = decide_review(conn, review[0], "not-a-match", actor="tess", now=NOW)
    assert decided["state"] == "resolved" and person(engine, "HHCARE", "HB") != alices

    # the usual merge: a duplicate registration at the hospital, matched by home health's record
    # first; the hospital's own record of her could not join them (one facility, two records)
    carol = dict(name="CALLOWAY^CAROL", birth="19511111", ssn="402-11-9087")
    run(engine, register("GENHOSP", "GD", **carol), register("HHCARE", "HD", **carol))
    run(engine, register("GENHOSP", "GE", **carol))
    assert person(engine, "HHCARE", "HD") == person(engine, "GENHOSP", "GD") != person(engine, "GENHOSP", "GE")
    assert run(engine, adt("GENHOSP", "A40", pid("GE", "GENHOSP", **carol), "MRG|GD^^^GENHOSP^MR")) == ["AA"]
    assert person(engine, "HHCARE", "HD") == person(engine, "GENHOSP", "GE")  # she follows her merge


def test_live_person_follows_merges_and_gives_up_on_a_gone_person_or_a_loop():
    from exchange.store.index import live_person
    from exchange.store.schema import MAX_MERGE_HOPS

    merged = {1: None, 2: 1, 3: 2, 4: 99, 5: 6, 6: 5}  # 99 is gone; 5 and 6 merged into each other
    assert [live_person(merged, p) for p in (1, 2, 3, 4, 5, 99)] == [1, 1, 1, None, None, None]
    chain = {p: p + 1 for p in range(MAX_MERGE_HOPS + 1)} | {MAX_MERGE_HOPS + 1: None}
    assert live_person(chain, 1) == MAX_MERGE_HOPS + 1 and live_person(chain, 0) is None  # at most 100 merges


EMMA = dict(name="GLUCKSTEIN^EMMA", birth="19950505", address="5 STICKY LN^^GLUETON^IL^51000", phone="555-111-0005")
OLIVIA = dict(EMMA, name="GLUCKSTEIN^OLIVIA")  # her twin sister


def not_a_match_scene(engine) -> dict:
    """Emma at the hospital, her twin Olivia at the nursing home (a technician said not a match),
    then a second nursing-home record entered with Emma's details (linked to Emma at once)."""
    from exchange.store.reviews import decide_review

    run(engine, register("GENHOSP", "NA1", **EMMA))
    run(engine, register("OAKNH", "NB1", **OLIVIA))
    [(review,)] = rows(engine, "select id from match_review where mrn = 'NB1' and state = 'open'")
    with engine.begin() as conn:
        decide_review(conn, review, "not-a-match", actor="tess", now=NOW)
    run(engine, register("OAKNH", "NB2", **EMMA))
    emma, olivia = person(engine, "GENHOSP", "NA1"), person(engine, "OAKNH", "NB1")
    assert person(engine, "OAKNH", "NB2") == emma != olivia
    return {"emma": emma, "olivia": olivia}


def open_reviews(engine, mrn: str) -> list[tuple]:
    import json

    return [(kind, [(c["facility"], c["mrn"]) for c in (json.loads(d) if isinstance(d, str) else d)["candidates"]],
             (json.loads(d) if isinstance(d, str) else d)["reasons"])
            for kind, d in rows(engine, "select kind, detail from match_review where state = 'open' and mrn = :m "
                                        "order by id", m=mrn)]


def test_an_a40_never_merges_persons_a_technicians_not_a_match_keeps_apart(engine):
    """Found by a black-box audit: OAKNH's A40 of NB1 into NB2 (linked to Emma) merged Olivia's
    person into Emma's although a technician had said NB1 is not NA1; the next A08 superseded
    the review, and Olivia's events went to the hospital as Emma's."""
    from exchange.store.consent import holds_of
    from exchange.store.reviews import set_opt_out

    s = not_a_match_scene(engine)
    with engine.begin() as conn:  # NB1's patient opted out (found by a verification audit: left behind)
        set_opt_out(conn, s["olivia"], True, actor="tess", now=NOW, reason="asked at the desk")
    merge = adt("OAKNH", "A40", pid("NB2", "OAKNH", **EMMA), "MRG|NB1^^^OAKNH^MR")
    assert run(engine, merge) == ["AA"]
    # NB1 lives on as NB2, in Emma's person: the opt-out goes with it though the persons do not merge
    assert holds_of(*rows(engine, "select protected, protected_by from person where id = :p", p=s["emma"])[0]) == (
        "api tess",)
    # the sender is told its merge was held back at the persons (a third matching audit: a bare AA),
    # in the answer it gets again on a resend too, and in the message's reason
    control = read_header(merge).control_id
    [(ack, reason)] = rows(engine, "select ack, reason from message where control_id = :c", c=control)
    err = [seg for seg in ack.decode().split("\r") if seg.startswith("ERR")]
    assert len(err) == 1 and "MRG^1^1" in err[0] and "|W|" in err[0] and "not a match" in err[0], err
    assert "enterprise person is not" in reason and "NB1" not in reason
    assert run(engine, merge) == ["AA"] and rows(engine, "select ack from message where control_id = :c",
                                               c=control) == [(ack,)]
    assert person(engine, "OAKNH", "NB2") == s["emma"]  # its link is the writer's to keep: matching says Emma
    assert person(engine, "OAKNH", "NB1") == s["olivia"] and person(engine, "GENHOSP", "NA1") == s["emma"]
    assert rows(engine, "select count(*) from link_event where kind = 'merge'") == [(0,)]
    conflict = [r for r in open_reviews(engine, "NB2") if r[0] == "merge_conflict"]
    [(_, candidates, [reason])] = conflict
    assert candidates == [("GENHOSP", "NA1")]
    assert "OAKNH NB1 and GENHOSP NA1 are marked not a match by decision" in reason and "not merged" in reason
    # an update that changes what matching reads re-matches NB2: the conflict stands, the review stays open
    assert run(engine, adt("OAKNH", "A08", pid("NB2", "OAKNH", **{**EMMA, "phone": "555-111-0099"}),
                           "PV1|1|O")) == ["AA"]
    assert person(engine, "OAKNH", "NB2") == s["emma"]
    assert "merge_conflict" in [r[0] for r in open_reviews(engine, "NB2")]
    # the technician answers it: NB2 is not Emma either
    from exchange.store.reviews import decide_review

    [(review,)] = rows(engine, "select id from match_review where kind = 'merge_conflict'")
    with engine.begin() as conn:
        decide_review(conn, review, "not-a-match", actor="tess", now=NOW)
    assert person(engine, "OAKNH", "NB2") != s["emma"]


def test_a_merge_conflict_review_goes_when_the_conflict_does(engine):
    s = not_a_match_scene(engine)
    run(engine, adt("OAKNH", "A40", pid("NB2", "OAKNH", **EMMA), "MRG|NB1^^^OAKNH^MR"))
    assert "merge_conflict" in [r[0] for r in open_reviews(engine, "NB2")]
    # NB2 turns out to be someone else altogether: its automatic link to Emma is taken back at once
    run(engine, adt("OAKNH", "A08", pid("NB2", "OAKNH", name="NAKAMURA^KENJI", birth="19610930", sex="M",
                                        address="4500 PACIFIC HWY^^SALEM^OR^97301", phone="555-0777"), "PV1|1|O"))
    assert person(engine, "OAKNH", "NB2") != s["emma"]
    assert "merge_conflict" not in [r[0] for r in open_reviews(engine, "NB2")]


def test_an_a40_supersedes_a_survivors_review_naming_the_retired_record(engine):
    """Found by a black-box audit: Z2's duplicate review (candidates Z1, merged into Z2 since, and
    another facility's record) stayed open; deciding it moved Z2 into the person the A40 emptied."""
    both = dict(birth="19930101", address="9 STALE ST^^STALEVILLE^IL^50000", phone="555-888-0001")
    run(engine, register("GENHOSP", "Z1", name="MERRIWEATHER^EMMA", **both))
    run(engine, register("OAKNH", "Z1", name="MERRIWEATHER^OLIVIA", **both))
    run(engine, register("OAKNH", "Z2", name="MERRIWEATHER^OLIVIA", ssn="321-54-9876", **both))
    assert [c for _, c, _ in open_reviews(engine, "Z2")] == [[("OAKNH", "Z1"), ("GENHOSP", "Z1")]]
    run(engine, adt("OAKNH", "A40", pid("Z2", "OAKNH", name="MERRIWEATHER^OLIVIA", ssn="321-54-9876", **both),
                    "MRG|Z1^^^OAKNH^MR"))
    assert person(engine, "OAKNH", "Z1") == person(engine, "OAKNH", "Z2")
    assert rows(engine, "select mrn, state from match_review where facility = 'OAKNH' order by id") == [
        ("Z1", "superseded"), ("Z2", "superseded")]


KATHERINE = dict(name="PRYCE^KATHERINE", birth="19800505", address="1 A ST^^AUSTIN^TX^78701", phone="5125550001")
KATHY = dict(name="PRICE^KATHY", birth="19800505", address="9 B ST^^DALLAS^TX^75201", phone="2145550002")


def a47(facility: str, new: str, old: str, **demographics) -> bytes:
    return adt(facility, "A47", pid(new, facility, **demographics), f"MRG|{old}^^^{facility}^MR")


def review_json(engine, review: int) -> dict:
    import json

    [(detail,)] = rows(engine, f"select detail from match_review where id = {review}")
    return json.loads(detail) if isinstance(detail, str) else detail


def test_an_a47_carries_the_records_reviews_to_its_new_mrn(engine, tmp_path):
    """Found by a black-box audit: after HHCARE's A47 renamed H1 (an open review: is she GENHOSP's
    Katherine?) to H9, the review still named H1: deciding it answered 409 "record HHCARE H1 no
    longer exists", and `exchange reconcile consistency` failed for good."""
    from exchange.config import load_config
    from exchange.jobs import consistency_findings
    from exchange.store.reviews import decide_review
    from tests.support import write_config

    run(engine, register("GENHOSP", "G1", **KATHERINE))
    run(engine, register("HHCARE", "H1", **KATHY))
    [(review,)] = rows(engine, "select id from match_review where mrn = 'H1' and state = 'open'")
    assert run(engine, a47("HHCARE", "H9", "H1", **KATHY)) == ["AA"]
    # a rename alone changes nothing matching reads: the review stays open, about H9
    assert rows(engine, "select id, facility, mrn, state from match_review") == [(review, "HHCARE", "H9", "open")]
    assert review_json(engine, review)["record"]["mrn"] == "H9"
    assert {mrn for (mrn,) in rows(engine, "select mrn from link_event where facility = 'HHCARE'")} == {"H9"}
    with engine.connect() as conn:
        findings = consistency_findings(conn, load_config(write_config(tmp_path), environ={}))
    assert [f.line() for f in findings if f.count and f.error] == []
    with engine.begin() as conn:
        decide_review(conn, review, "link", actor="tess", now=NOW)
    assert person(engine, "HHCARE", "H9") == person(engine, "GENHOSP", "G1")


def test_an_a47_carries_the_record_among_other_reviews_candidates(engine):
    run(engine, register("HHCARE", "H2", **KATHY))
    run(engine, register("GENHOSP", "G2", **KATHERINE))  # its review names HHCARE H2
    [(review,)] = rows(engine, "select id from match_review where mrn = 'G2' and state = 'open'")
    assert [(c["facility"], c["mrn"]) for c in review_json(engine, review)["candidates"]] == [("HHCARE", "H2")]
    assert run(engine, a47("HHCARE", "H8", "H2", **KATHY)) == ["AA"]
    assert [(c["facility"], c["mrn"]) for c in review_json(engine, review)["candidates"]] == [("HHCARE", "H8")]
    from exchange.store.reviews import decide_review

    with engine.begin() as conn:
        decide_review(conn, review, "link", actor="tess", candidate=("HHCARE", "H8"), now=NOW)
    assert person(engine, "GENHOSP", "G2") == person(engine, "HHCARE", "H8")


def test_an_a47_carries_a_technicians_not_a_match_and_the_decision_stays_undoable(engine):
    """The sticky pairs follow the record (else an update could link it to the very person a
    technician said it is not), and so does its link history (else the decision cannot be undone)."""
    from exchange.store.reviews import decide_review, undo_decision

    run(engine, register("GENHOSP", "NA5", **EMMA))
    run(engine, register("OAKNH", "NB5", **OLIVIA))
    [(review,)] = rows(engine, "select id from match_review where mrn = 'NB5' and state = 'open'")
    with engine.begin() as conn:
        decision = decide_review(conn, review, "not-a-match", actor="tess", now=NOW)["decision_id"]
    assert run(engine, a47("OAKNH", "NB6", "NB5", **OLIVIA)) == ["AA"]
    assert sorted(rows(engine, "select facility, mrn, other_facility, other_mrn from match_pair where active")) == [
        ("GENHOSP", "NA5", "OAKNH", "NB6"), ("OAKNH", "NB6", "GENHOSP", "NA5")]
    # an update that makes NB6 look like Emma: the technician's word still keeps them apart
    assert run(engine, adt("OAKNH", "A08", pid("NB6", "OAKNH", **EMMA), "PV1|1|O")) == ["AA"]
    assert person(engine, "OAKNH", "NB6") != person(engine, "GENHOSP", "NA5")
    with engine.begin() as conn:
        undo_decision(conn, decision, actor="tess", now=NOW)
    assert rows(engine, "select count(*) from match_pair where active") == [(0,)]
    assert rows(engine, f"select mrn, state from match_review where id = {review}") == [("NB6", "open")]


def test_two_renames_in_one_batch_each_take_their_own_reviews(engine):
    """H1 becomes HX and H2 becomes H1 in one batch: H2's rows must not end up with HX."""
    other = dict(name="ZIMMER^ROSA", birth="19610707", address="4 C ST^^RENO^NV^89501", phone="7755550004")
    run(engine, register("GENHOSP", "G3", **KATHERINE))
    run(engine, register("GENHOSP", "G4", **{**other, "name": "ZIMMERMANN^ROSALIND"}))
    run(engine, register("HHCARE", "H1", **KATHY))
    run(engine, register("HHCARE", "H2", **other))
    reviews = dict(rows(engine, "select mrn, id from match_review where state = 'open' and facility = 'HHCARE'"))
    assert set(reviews) == {"H1", "H2"}
    assert run(engine, a47("HHCARE", "HX", "H1", **KATHY), a47("HHCARE", "H1", "H2", **other)) == ["AA", "AA"]
    assert sorted(rows(engine, "select id, mrn, state from match_review where facility = 'HHCARE'")) == sorted([
        (reviews["H1"], "HX", "open"), (reviews["H2"], "H1", "open")])
    assert [c["mrn"] for c in review_json(engine, reviews["H2"])["candidates"]] == ["G4"]
    assert person(engine, "HHCARE", "HX") != person(engine, "HHCARE", "H1")


def test_a_merge_held_back_at_the_persons_carries_only_its_facilitys_hold_and_the_technicians(engine):
    """A verification audit: the held-back A40 gave the survivor's person another facility's PD1-12
    hold, which that facility's N could never reach (it holds no record there)."""
    import json

    from exchange.store.consent import carry_opt_outs, holds_of

    with engine.begin() as conn:
        for id_, holds in ((901, ["PD1-12 HHCARE", "api tess", "PD1-12 GENHOSP"]), (902, [])):
            conn.execute(text("insert into person (id, created_at, protected, protected_by) values (:i, :t, :p, :b)"),
                         {"i": id_, "t": NOW, "p": bool(holds), "b": json.dumps(holds) if holds else None})
        assert carry_opt_outs(conn, [(901, 902)], NOW, record_of="GENHOSP") == [902]
    assert holds_of(*rows(engine, "select protected, protected_by from person where id = 902")[0]) == (
        "api tess", "PD1-12 GENHOSP")
    [(reason,)] = rows(engine, "select reason from opt_out_event where person_id = 902")
    assert "a merge at GENHOSP that did not merge the persons" in reason
