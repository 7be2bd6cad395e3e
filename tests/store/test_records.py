"""The record model in the database (exchange.store.records): load -> map -> apply -> save
gives exactly what the reference MemoryState gives, on SQLite and PostgreSQL."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine, delete, func, insert, select

from exchange.mapping.events import Changes, EncounterStatus, FacilityContext, map_message, needs
from exchange.mapping.state import MemoryState
from exchange.mapping.values import (
    Address,
    Content,
    Doctor,
    Identifier,
    Location,
    PersonName,
    Phone,
    Precision,
    Timestamp,
)
from exchange.store.records import from_json, load, load_all, loads, record_view, save, to_json
from exchange.store.reviews import person_view
from exchange.store.schema import (
    AUTHORITY_LEN,
    document_table,
    document_version_table,
    encounter_table,
    link_assertion_table,
    message_table,
    metadata,
    patient_record_table,
    person_table,
    record_event_table,
    record_identifier_table,
)
from tests.mapping.helpers import msh, synthetic
from tests.mapping.test_sequences import build, event

CTX = FacilityContext("HOSP", "HOSP")
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
RECORD_TABLES = [record_event_table, link_assertion_table, document_version_table, document_table,
                 encounter_table, record_identifier_table, patient_record_table, person_table]


def add_messages(conn, count: int) -> list[int]:
    ids = []
    for _ in range(count):
        ids.append(conn.execute(insert(message_table).returning(message_table.c.id), {
            "received_at": NOW, "sending_application": "APP", "message_type": "ADT", "event": "A01",
            "structure": "", "version": "2.5", "processing_id": "P", "state": "accepted", "peer": "test",
            "raw": b"MSH", "size": 3, "dedup": False,
        }).scalar_one())
    return ids


def run_batches(engine: Engine, messages, boundaries) -> MemoryState:
    """Apply ``messages`` through the database in batches; return the reference state."""
    with engine.begin() as conn:
        refs = add_messages(conn, len(messages))
    oracle = MemoryState()
    for (msg, header), ref in zip(messages, refs):
        result = map_message(msg, header, CTX, oracle)
        if isinstance(result, Changes):
            oracle.apply(result, ref)
    start = 0
    for end in sorted(set(boundaries) | {len(messages)}):
        batch = list(zip(messages, refs))[start:end]
        start = end
        if not batch:
            continue
        with engine.begin() as conn:
            state = load(conn, [needs(msg, CTX) for (msg, _), _ in batch])
            for (msg, header), ref in batch:
                result = map_message(msg, header, CTX, state)
                if isinstance(result, Changes):
                    state.apply(result, ref)
            save(conn, state, now=NOW)
    return oracle


def stored(engine: Engine) -> dict:
    """The stored record model as plain data; checks on the way that the
    identifier look-up rows match every record's identifiers."""
    with engine.connect() as conn:
        state = load_all(conn)
        rows = {(r.facility, r.mrn, r.authority, r.value, r.type) for r in conn.execute(
            select(patient_record_table.c.facility, patient_record_table.c.mrn, record_identifier_table.c.authority,
                   record_identifier_table.c.value, record_identifier_table.c.type)
            .join(record_identifier_table, record_identifier_table.c.record_id == patient_record_table.c.id))}
        expected = {(f, m, i.authority or i.authority_id, i.value, i.type_code)
                    for (f, m), rec in state.records.items() for i in rec["identifiers"].values()}
        assert rows == expected
        return state.snapshot(history=True)


# --- JSON codec ------------------------------------------------------------------------------


def test_json_codec_round_trips_value_objects_exactly():
    value = {
        "identifiers": (Identifier("1", "HOSP", "1.2.3", "ISO", "MR", "7", "F"),),
        "name": PersonName("Doe", "Jane", use="L"),
        "aliases": (PersonName("Roe"),),
        "birth": Timestamp(date(1962, 1, 1), Precision.YEAR, "1962"),
        "death": Timestamp(datetime(2020, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2, minutes=15))),
                           Precision.FRACTION, "20200506070809.123456+0215"),
        "naive": Timestamp(datetime(2020, 5, 6, 7, 8), Precision.MINUTE, "202005060708"),
        "addresses": (Address("1 Main", city="X", postal_code="12345"),),
        "phones": (Phone("555", "PRN"),),
        "attending": Doctor("D1", PersonName("Who"), "A"),
        "location": Location("W1", "1", "A", ""),
        "content": Content(data=b"\x00\xffPDF", content_type="application/pdf"),
        "status": EncounterStatus.ADMITTED,
        "deceased": False,
        "nothing": None,
        "nul": "a\x00b",
    }
    import json

    text = json.dumps(to_json(value))
    for back in (from_json(json.loads(text)), loads(text)):  # the generic decoder and the load path's
        assert back == value
        assert back["death"].value.utcoffset() == timedelta(hours=2, minutes=15)
        assert type(back["status"]) is EncounterStatus and type(back["aliases"]) is tuple
        assert type(back["birth"].precision) is Precision and type(back["content"].data) is bytes
    nested = {"pairs": ((1, (2, 3)), ()), "empty": {}, "list": [PersonName("A")]}
    assert loads(json.dumps(to_json(nested))) == from_json(json.loads(json.dumps(to_json(nested)))) == {
        "pairs": ((1, (2, 3)), ()), "empty": {}, "list": (PersonName("A"),)}


# --- the key property ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(event, max_size=12), st.lists(st.integers(0, 12), max_size=4))
def test_batches_through_the_database_equal_the_reference(engine: Engine, events, boundaries):
    with engine.begin() as conn:
        for table in RECORD_TABLES:
            conn.execute(delete(table))
    messages = [build(*e) for e in events]
    oracle = run_batches(engine, messages, boundaries)
    assert stored(engine) == oracle.snapshot(history=True)


def test_load_save_round_trip_and_only_changes_are_written(engine: Engine):
    messages = [build(*e) for e in [("A01", "1", "1", "W1^1^A"), ("T02", "1", "1", ""), ("A24", "1", "2", ""),
                                    ("A08", "2", "1", "W2^2^B")]]
    oracle = run_batches(engine, messages, [])
    assert stored(engine) == oracle.snapshot(history=True)
    with engine.begin() as conn:
        state = load(conn, [needs(m, CTX) for m, _ in messages])
        assert state.snapshot()["records"] == oracle.snapshot()["records"]
        assert state.snapshot()["documents"] == oracle.snapshot()["documents"]
        before = conn.execute(select(func.count()).select_from(record_event_table)).scalar_one()
        save(conn, state, now=NOW)  # nothing changed: nothing written
        assert conn.execute(select(func.count()).select_from(record_event_table)).scalar_one() == before
    assert stored(engine) == oracle.snapshot(history=True)


# --- merges and documents through the views -------------------------------------------------------


def adt(event_, mrn, *more):
    return synthetic(msh("ADT", event_), f"EVN|{event_}|20240101", f"PID|1||{mrn}^^^HOSP^MR||Doe^Jane||19620304|F",
                     *more)


def pv1(visit, loc="W1^1^A"):
    return "|".join(["PV1", "1", "I", loc] + [""] * 15 + [visit])


def test_an_update_rewrites_only_the_identifier_rows_that_changed(engine: Engine):
    def registration(event_, account):
        return synthetic(msh("ADT", event_), f"EVN|{event_}|20240101",
                         f"PID|1||1^^^HOSP^MR~{account}^^^HOSP^AN~123456789^^^SSA^SS||Doe^Jane||19620304|F")

    def rows(conn):
        return {(r.authority, r.value, r.type): r.id for r in conn.execute(select(record_identifier_table))}

    run_batches(engine, [registration("A04", "V1")], [])
    with engine.connect() as conn:
        before = rows(conn)
    run_batches(engine, [registration("A08", "V2")], [])
    with engine.connect() as conn:
        after = rows(conn)
    assert set(after) == {("HOSP", "1", "MR"), ("HOSP", "V2", "AN"), ("SSA", "123456789", "SS")}
    assert after[("HOSP", "1", "MR")] == before[("HOSP", "1", "MR")]  # left alone, not deleted and inserted
    assert after[("SSA", "123456789", "SS")] == before[("SSA", "123456789", "SS")]
    stored(engine)  # the look-up rows match the records


def test_identifiers_the_columns_cannot_tell_apart_are_rewritten_whole(engine: Engine):
    """Two authorities alike up to the column's length make two equal rows: no
    row-by-row difference can say which one to delete, so all are replaced."""
    long = "A" * AUTHORITY_LEN

    def registration(event_, pid3):
        return synthetic(msh("ADT", event_), f"EVN|{event_}|20240101", f"PID|1||{pid3}||Doe^Jane||19620304|F")

    def rows():
        with engine.connect() as conn:
            return sorted((r.authority, r.value, r.type) for r in conn.execute(select(record_identifier_table)))

    run_batches(engine, [registration("A04", f"1^^^HOSP^MR~7^^^{long}X^PI~V1^^^HOSP^AN")], [])
    assert rows() == [(long, "7", "PI"), ("HOSP", "1", "MR"), ("HOSP", "V1", "AN")]
    run_batches(engine, [registration("A08", f"1^^^HOSP^MR~7^^^{long}Y^PI~V2^^^HOSP^AN")], [])
    assert rows() == [(long, "7", "PI"), (long, "7", "PI"), ("HOSP", "1", "MR"), ("HOSP", "V2", "AN")]


def test_a40_moves_encounters_and_documents_and_the_retired_mrn_answers_inactive(engine: Engine):
    doc = synthetic(msh("MDM", "T02"), "EVN|T02", "PID|1||2^^^HOSP^MR", "TXA|1|NOTE|TX|||||||||D9||||AU",
                    "OBX|1|TX|||hello")
    messages = [adt("A01", "1", pv1("V1")), adt("A01", "2", pv1("V2")), doc,
                adt("A40", "1", "MRG|2^^^HOSP^MR")]
    oracle = run_batches(engine, messages, [3])  # the merge in a batch of its own
    assert stored(engine) == oracle.snapshot(history=True)
    with engine.connect() as conn:
        retired = record_view(conn, "HOSP", "2")
        survivor = record_view(conn, "HOSP", "1")
        assert retired["active"] is False and retired["merged_into"] == "1"
        assert retired["encounters"] == [] and retired["documents"] == []
        assert survivor["active"] is True and survivor["merged_into"] is None
        assert sorted(e["visit_number"] for e in survivor["encounters"]) == ["V1", "V2"]
        assert [d["number"] for d in survivor["documents"]] == ["D9"]
        assert record_view(conn, "HOSP", "3") is None


def test_a_batch_loads_of_a_long_history_only_what_its_messages_touch(engine: Engine):
    """An update for a patient with many visits and notes reads the visit it names and
    the document it changes (its current version), not the whole history -- unless
    a merge moves that history. Either way the result equals the reference."""
    def note(ev, number, text):
        return synthetic(msh("MDM", ev), f"EVN|{ev}", "PID|1||1^^^HOSP^MR",
                         f"TXA|1|NOTE|TX|||||||||{number}||||AU", f"OBX|1|TX|||{text}")

    history = [adt("A01", "1", pv1(f"V{i}")) for i in range(5)] + [note("T02", f"D{i}", "v1") for i in range(4)]
    history += [note("T08", "D0", "v2"), note("T08", "D0", "v3"), adt("A01", "2", pv1("W1"))]
    run_batches(engine, history, [])
    with engine.connect() as conn:
        update = load(conn, [needs(adt("A08", "1", pv1("V3", "W9^9^Z"))[0], CTX)])
        assert set(update.records[("HOSP", "1")]["encounters"]) == {"V3"}
        assert update.documents == {}
        edit = load(conn, [needs(note("T08", "D0", "v4")[0], CTX)])
        assert [v["version"] for v in edit.documents[("HOSP", "D0")]["versions"]] == [3]
        assert edit.records[("HOSP", "1")]["encounters"] == {}
        merge = load(conn, [needs(adt("A40", "2", "MRG|1^^^HOSP^MR")[0], CTX)])
        assert set(merge.records[("HOSP", "1")]["encounters"]) == {f"V{i}" for i in range(5)}
        assert set(merge.records[("HOSP", "2")]["encounters"]) == {"W1"}
        assert {number for _, number in merge.documents} == {f"D{i}" for i in range(4)}
    later = [adt("A08", "1", pv1("V3", "W9^9^Z")), note("T08", "D0", "v4"), adt("A03", "1", pv1("V4")),
             note("T02", "D9", "new"), adt("A40", "2", "MRG|1^^^HOSP^MR"), adt("A08", "2", pv1("V1"))]
    with engine.begin() as conn:
        for table in RECORD_TABLES:
            conn.execute(delete(table))
    oracle = run_batches(engine, history + later, [len(history), len(history) + 2, len(history) + 4])
    assert stored(engine) == oracle.snapshot(history=True)


def test_mdm_lifecycle_states_via_record_view(engine: Engine):
    def mdm(ev, number, parent="", text="line", status="AU"):
        return synthetic(msh("MDM", ev), f"EVN|{ev}", "PID|1||1^^^HOSP^MR",
                         f"TXA|1|NOTE|TX|||||||||{number}|{parent}||||{status}", f"OBX|1|TX|||{text}")

    steps = [
        (mdm("T02", "D1", text="first"), {"D1": ("current", 1, "first")}),
        (mdm("T08", "D1", text="edited"), {"D1": ("current", 2, "edited")}),
        (mdm("T06", "D2", parent="D1", text="addendum"), {"D1": ("current", 2, "edited"),
                                                           "D2": ("current", 1, "addendum")}),
        (mdm("T10", "D3", parent="D1", text="replacement"), {"D1": ("replaced", 2, "edited"),
                                                              "D2": ("current", 1, "addendum"),
                                                              "D3": ("current", 1, "replacement")}),
        (mdm("T11", "D3", parent="D1", text=""), None),
    ]
    messages = []
    for message, expected in steps:
        messages.append(message)
        with engine.begin() as conn:
            for table in RECORD_TABLES:
                conn.execute(delete(table))
        oracle = run_batches(engine, messages, [])
        assert stored(engine) == oracle.snapshot(history=True)
        with engine.connect() as conn:
            view = record_view(conn, "HOSP", "1")
        got = {d["number"]: (d["state"], d["version"], d["text"]) for d in view["documents"]}
        if expected is not None:
            assert got == expected
        else:
            assert got["D3"][0] == "cancelled" and got["D1"][0] == "replaced"
    parents = {d["number"]: d["parent"] for d in view["documents"]}
    assert parents["D2"] == "D1" and parents["D3"] == "D1"


def test_view_shapes(engine: Engine):
    messages = [synthetic(msh("ADT", "A01"), "EVN|A01|20240101",
                          "PID|1||1^^^HOSP^MR~999^^^SSA^SS||Doe^Jane^Q^Jr||19620304|F|||1 Main^^Town^ST^12345||555-1234",
                          "|".join(["PV1", "1", "I", "W1^1^A"] + [""] * 15 + ["V1"] + [""] * 24 + ["20240101120000"]))]
    run_batches(engine, messages, [])
    with engine.connect() as conn:
        view = record_view(conn, "HOSP", "1")
        assert set(view) >= {"facility", "authority", "mrn", "person", "active", "merged_into", "name",
                             "birth_date", "sex", "address", "phones", "encounters", "documents"}
        assert view["authority"] == "HOSP" and view["active"] is True and view["merged_into"] is None
        assert {k: view["name"][k] for k in ("family", "given", "middle", "suffix")} == {
            "family": "Doe", "given": "Jane", "middle": "Q", "suffix": "Jr"}
        assert view["birth_date"] == "1962-03-04" and view["sex"] == "F"
        assert view["address"]["postal_code"] == "12345"
        assert view["phones"][0]["number"] == "555-1234"
        (enc,) = view["encounters"]
        assert set(enc) >= {"visit_number", "class", "status", "location", "admitted_at", "discharged_at"}
        assert enc["visit_number"] == "V1" and enc["class"] == "I" and enc["status"] == "admitted"
        assert enc["admitted_at"].startswith("2024-01-01T12:00")
        person = person_view(conn, view["person"])
        assert person["person"] == view["person"]
        assert [{k: r[k] for k in ("facility", "mrn", "link", "score")} for r in person["records"]] == [
            {"facility": "HOSP", "mrn": "1", "link": "auto", "score": None}]
        assert person_view(conn, 10**9) is None
        row = conn.execute(select(patient_record_table)).one()
        assert (row.family_name, row.given_name, row.birth_date, row.sex, row.postcode, row.ssn) == (
            "Doe", "Jane", date(1962, 3, 4), "F", "12345", "999")  # PID-19 empty: PID-3's SS repetition
        idents = {(r.authority, r.value, r.type) for r in conn.execute(select(record_identifier_table))}
        assert idents == {("HOSP", "1", "MR"), ("SSA", "999", "SS")}


def test_every_record_table_is_known():
    assert {t.name for t in RECORD_TABLES} <= set(metadata.tables)


def test_a47_rename_moves_the_row_and_keeps_its_person(engine: Engine):
    oracle = run_batches(engine, [adt("A01", "1", pv1("V1")), adt("A47", "5", "MRG|1^^^HOSP^MR")], [1])
    assert stored(engine) == oracle.snapshot(history=True)
    with engine.connect() as conn:
        assert record_view(conn, "HOSP", "1") is None
        view = record_view(conn, "HOSP", "5")
        assert [e["visit_number"] for e in view["encounters"]] == ["V1"]
        assert conn.execute(select(func.count()).select_from(person_table)).scalar_one() == 1
        assert person_view(conn, view["person"])["records"][0]["mrn"] == "5"


def test_save_stores_what_sqlalchemys_column_types_store(engine: Engine):
    """save binds on the driver cursor: the raw forms must stay SQLAlchemy's (dates, booleans, JSON)."""
    import json

    run_batches(engine, [adt("A01", "1", pv1("V1")), build("A01", "2", "2", ""), build("A24", "1", "2", "")], [])
    with engine.connect() as conn:
        row = conn.execute(select(patient_record_table).where(patient_record_table.c.mrn == "1")).one()
        assert (row.created_at, row.updated_at, row.active, row.birth_date) == (NOW, NOW, True, date(1962, 3, 4))
        ats = conn.execute(select(record_event_table.c.at)).scalars().all()
        assert ats and set(ats) == {NOW}
        if conn.dialect.name == "sqlite":
            raw = conn.exec_driver_sql(
                "SELECT created_at, updated_at, active, typeof(active), birth_date, typeof(data) FROM patient_record"
                " WHERE mrn = '1'").one()
            assert tuple(raw) == ("2026-01-02 03:04:05.000000", "2026-01-02 03:04:05.000000", 1, "integer",
                                  "1962-03-04", "text")
            at, key = conn.exec_driver_sql("SELECT at, key FROM record_event ORDER BY id").first()
            assert at == "2026-01-02 03:04:05.000000" and isinstance(json.loads(key), list)
            assert conn.exec_driver_sql("SELECT attending FROM encounter WHERE visit_number = 'V1'").scalar_one() == "null"
            assert conn.exec_driver_sql("SELECT linked, typeof(linked) FROM link_assertion").one() == (1, "integer")
        else:
            types = conn.exec_driver_sql(
                "SELECT pg_typeof(data)::text, pg_typeof(created_at)::text FROM patient_record WHERE mrn = '1'").one()
            assert tuple(types) == ("json", "timestamp with time zone")
            assert conn.exec_driver_sql("SELECT attending::text FROM encounter WHERE visit_number = 'V1'").scalar_one() == "null"
            assert conn.exec_driver_sql("SELECT linked FROM link_assertion").scalar_one() is True


def test_load_searches_indexes_whatever_the_number_of_records(tmp_path):
    """The load path's SELECTs use an index on SQLite (a row-value ``IN (VALUES ...)``
    scanned the whole patient_record table: milliseconds per batch, growing)."""
    from exchange.store.db import make_engine, upgrade

    eng = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    upgrade(eng)
    messages = [build("A01", str(n), "1", "W1^1^A") for n in range(30)] + [build("T02", "1", "1", "")]
    run_batches(eng, messages, [])
    with eng.begin() as conn:
        raw = conn.connection.driver_connection
        seen: list[str] = []
        raw.set_trace_callback(seen.append)
        try:
            load(conn, [needs(m, CTX) for m, _ in messages[:3] + messages[-1:]])
        finally:
            raw.set_trace_callback(None)
        selects = [sql for sql in seen if sql.lstrip().upper().startswith("SELECT")]
        assert len(selects) >= 3  # records, documents, encounters
        for sql in selects:
            plan = " / ".join(row[-1] for row in raw.execute("EXPLAIN QUERY PLAN " + sql))
            for table in ("patient_record", "document", "encounter"):
                assert f"SCAN {table}" not in plan and "SCAN d" not in plan.split(" USING")[0], (sql, plan)
    eng.dispose()


def test_a_reference_pointer_document_shows_its_pointer_and_cover_note(engine: Engine):
    """Found by a black-box audit: an OBX RP document dropped the TX cover lines before it and
    no field of the record showed the pointer, so the document could not be retrieved."""
    msg = synthetic(msh("MDM", "T02"), "EVN|T02", "PID|1||1^^^HOSP^MR", "TXA|1|NOTE|TX|||||||||DOC4||||AU",
                    "OBX|1|TX|||cover note", "OBX|2|RP|||http://docs.example/x.pdf^DOCSRV^AP^PDF")
    run_batches(engine, [msg], [])
    with engine.connect() as conn:
        (doc,) = record_view(conn, "HOSP", "1")["documents"]
    assert (doc["text"], doc["reference"], doc["content_type"]) == (
        "cover note", "http://docs.example/x.pdf", "application/pdf")


def test_identifiers_without_an_authority_are_stored_each(engine: Engine):
    """PID-3 repetitions without CX.4 (common before v2.3) are kept apart through the database too."""
    run_batches(engine, [synthetic(msh("ADT", "A28"), "EVN|A28", "PID|1||R1^^^HOSP^MR~777^^^^MR~888^^^^MR")], [])
    run_batches(engine, [synthetic(msh("ADT", "A08"), "EVN|A08", "PID|1||R1^^^HOSP^MR~777^^^^MR~999^^^^PI")], [])
    with engine.connect() as conn:
        values = sorted(r.value for r in conn.execute(select(record_identifier_table)))
        view = record_view(conn, "HOSP", "R1")
    assert values == ["777", "888", "999", "R1"]
    assert sorted(i["value"] for i in view["identifiers"]) == ["777", "888", "999", "R1"]


def test_a_visit_merge_and_move_reach_the_database(engine: Engine):
    messages = [adt("A01", "1", pv1("V1")), adt("A04", "1", pv1("V2")), adt("A04", "2", pv1("V3")),
                adt("A42", "1", "MRG|1^^^HOSP^MR||||V2", pv1("V1")),
                adt("A45", "2", "MRG|1^^^HOSP^MR||||V1", pv1("V1"))]
    oracle = run_batches(engine, messages, [2, 4])
    assert stored(engine) == oracle.snapshot(history=True)
    with engine.connect() as conn:
        one, two = record_view(conn, "HOSP", "1"), record_view(conn, "HOSP", "2")
    assert one["encounters"] == [] and sorted(e["visit_number"] for e in two["encounters"]) == ["V1", "V3"]
