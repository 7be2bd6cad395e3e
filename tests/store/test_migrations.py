"""Schema set-up (exchange.store.db): the Alembic migrations agree with the models,
engine settings and write transactions -- on SQLite and on PostgreSQL."""
from __future__ import annotations

import json

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import OperationalError

from exchange.store.db import (
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
    write_transaction,
)
from exchange.store.schema import message_table, metadata

TABLES = {
    "message", "message_event", "api_token", "audit_event",
    # the record model (0003)
    "person", "patient_record", "record_identifier", "encounter", "document", "document_version",
    "link_assertion", "record_event",
    # the patient index (0004)
    "record_key", "match_review", "match_pair", "link_event", "match_model",
    # the delivery outbox (0005)
    "delivery",
    # the workbench's users and sessions (0006)
    "workbench_user", "workbench_session",
    # the opt-out history (0008)
    "opt_out_event",
}


def differences(engine: Engine) -> list:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, metadata)


def user_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_migrations_match_the_models(engine: Engine) -> None:
    # the `engine` fixture has upgraded to head already
    assert current_revision(engine) == head_revision() is not None
    assert user_tables(engine) == TABLES
    assert differences(engine) == []


# How each backend spells the dedup index's predicate. SQLite only uses a
# partial index for queries repeating its WHERE term, and SQLAlchemy writes a
# Boolean test as "dedup = 1" there.
DEDUP_PREDICATE = {"sqlite": "dedup = 1", "postgresql": "dedup"}


def test_partial_unique_index_predicate(engine: Engine) -> None:
    # compare_metadata does not compare index predicates: check them here.
    dialect = engine.dialect.name
    [model] = [ix for ix in metadata.tables["message"].indexes if ix.name == "uq_message_facility_control_id"]
    model_where = model.dialect_options[dialect]["where"].compile(
        dialect=engine.dialect, compile_kwargs={"literal_binds": True}
    )
    assert str(model_where).replace("message.", "") == DEDUP_PREDICATE[dialect]

    indexes = {ix["name"]: ix for ix in inspect(engine).get_indexes("message")}
    dedup = indexes["uq_message_facility_control_id"]
    assert dedup["unique"] and dedup["column_names"] == ["facility", "control_id"]
    reflected = dedup["dialect_options"][f"{dialect}_where"]
    assert str(reflected).strip("()") == DEDUP_PREDICATE[dialect]


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        upgrade(engine)  # idempotent: already at head
        assert current_revision(engine) == head_revision()
        assert differences(engine) == []

        downgrade(engine, "base")
        assert current_revision(engine) is None
        assert user_tables(engine) == set()

        upgrade(database_url)  # by URL, as `exchange db upgrade` does
        assert current_revision(engine) == head_revision()
        assert user_tables(engine) == TABLES
        assert differences(engine) == []
    finally:
        engine.dispose()


def test_make_engine_settings(database_url: str, tmp_path) -> None:
    if database_url.startswith("sqlite"):
        # The parent directory is created; every connection gets the pragmas.
        url = f"sqlite:///{tmp_path / 'not' / 'yet' / 'there.db'}"
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                pragmas = {
                    name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                    for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
                }
        finally:
            engine.dispose()
        assert (tmp_path / "not" / "yet" / "there.db").exists()
        assert pragmas == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 5000}
    else:
        # A driverless postgresql:// URL means psycopg 3.
        engine = make_engine(database_url.replace("postgresql+psycopg://", "postgresql://"))
        try:
            assert engine.dialect.driver == "psycopg" and engine.pool._pre_ping
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT 1").scalar() == 1
        finally:
            engine.dispose()


def test_write_transaction_commits_or_rolls_back(engine: Engine) -> None:
    insert = text(
        "INSERT INTO message (received_at, sending_application, message_type, event, structure,"
        " version, processing_id, state, peer, raw, size, dedup)"
        " VALUES ('2026-01-01 00:00:00', 'A', 'ADT', 'A01', '', '2.5', 'P', 'accepted', 'p', :raw, 1, :f)"
    )
    count = select(func.count()).select_from(message_table)
    try:
        with write_transaction(engine) as conn:
            conn.execute(insert, {"raw": b"x", "f": False})
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with write_transaction(engine) as conn:
        assert conn.execute(count).scalar_one() == 0
        conn.execute(insert, {"raw": b"x", "f": False})
    with engine.connect() as conn:
        assert conn.execute(count).scalar_one() == 1

    if engine.dialect.name == "sqlite":
        # BEGIN IMMEDIATE: the write lock is held from the start, so a second
        # writer waits (here: fails at once, with no busy timeout) instead of
        # both reading and then one failing when it tries to write.
        with write_transaction(engine) as conn:
            other = make_engine(str(engine.url))
            try:
                with other.connect() as second:
                    second.connection.dbapi_connection.execute("PRAGMA busy_timeout=0")
                    second.execution_options(exchange_sqlite_begin="IMMEDIATE")
                    try:
                        with second.begin():
                            raise AssertionError("a second writer got the lock")
                    except OperationalError as exc:
                        assert "locked" in str(exc)
            finally:
                other.dispose()


def test_0010_brings_an_older_databases_data_up_to_what_later_revisions_record(engine: Engine, tmp_path) -> None:
    """Found by a black-box audit of an upgrade: copies queued before 0007 (no destination MRN)
    went out after a split; reviews of records merged before merges superseded them stayed open
    and could not be decided; opt-outs set before 0008 had no history."""
    from datetime import datetime, timezone

    from exchange.store.reviews import set_opt_out
    from tests.store.test_index import ELIZABETH, adt, pid, register
    from tests.store.test_routing_store import network, run

    config = network(tmp_path)
    run(engine, config, register("OAKNH", "OA-1", **ELIZABETH))
    run(engine, config, register("GENHOSP", "GH-1", **ELIZABETH), register("GENHOSP", "GH-2", **ELIZABETH))
    run(engine, config, adt("GENHOSP", "A40", pid("GH-1", "GENHOSP", **ELIZABETH), "MRG|GH-2^^^GENHOSP^MR"))
    with engine.begin() as conn:
        person = conn.execute(text("SELECT person_id FROM patient_record WHERE mrn = 'OA-1'")).scalar_one()
        set_opt_out(conn, person, True, actor="tess", now=datetime(2026, 11, 1, tzinfo=timezone.utc))
    # as an older exchange left them
    downgrade(engine, "0009")
    with engine.begin() as conn:
        conn.execute(text("UPDATE delivery SET destination_mrn = NULL"))
        conn.execute(text("UPDATE match_review SET state = 'open' WHERE mrn = 'GH-2'"))
        conn.execute(text("DELETE FROM opt_out_event"))
    upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT destination, destination_mrn FROM delivery")).all() == [("OAKNH", "OA-1")]
        assert conn.execute(text("SELECT state FROM match_review WHERE mrn = 'GH-2'")).scalars().all() == ["superseded"]
        events = conn.execute(text("SELECT person_id, protected, by FROM opt_out_event")).all()
    assert [(p, bool(on), by) for p, on, by in events] == [(person, True, "api tess")]


def test_0011_fills_each_documents_lineage_from_its_versions_and_parents(engine: Engine, tmp_path) -> None:
    """Documents stored before 0011 get the types routing keeps them away by: every version's
    TXA-2 and every ancestor's, and the parent's type for a version that names none."""
    from tests.store.test_index import ELIZABETH, register
    from tests.store.test_routing_store import bh_network, note, run

    config = bh_network(tmp_path)
    run(engine, config, register("OAKNH", "OA-9", **ELIZABETH))
    run(engine, config, note("T02", "BH", "M1"), note("T08", "DS", "M2"))  # a BH note re-typed DS
    run(engine, config, note("T06", "", "M3", document="PSY-1A", parent="PSY-1"))
    run(engine, config, note("T06", "PN", "M4", document="PSY-1B", parent="PSY-1A"))
    run(engine, config, note("T02", "", "M5", document="X-1"))

    def lineage():
        with engine.connect() as conn:
            return conn.execute(text("SELECT number, types, inherited_type FROM document ORDER BY number")).all()

    kept = lineage()
    assert kept == [("PSY-1", '["BH", "DS"]', None), ("PSY-1A", '["BH", "DS"]', "DS"),
                    ("PSY-1B", '["BH", "DS", "PN"]', "DS"), ("X-1", "[]", None)]
    downgrade(engine, "0010")
    upgrade(engine)
    assert lineage() == kept


def test_0014_fills_each_documents_confidentiality_from_the_messages_that_stated_it(engine: Engine, tmp_path) -> None:
    """Documents stored before 0014 get the TXA-18 the sender last gave them, from the stored
    MDMs in the order they arrived, in the document and in its latest version (so a later edit
    that states none keeps it)."""
    import json

    from sqlalchemy import JSON, bindparam

    from tests.store.test_index import ELIZABETH, register
    from tests.store.test_routing_store import bh_network, restricted_note, run

    config = bh_network(tmp_path)
    run(engine, config, register("OAKNH", "OA-9", **ELIZABETH), register("HHCARE", "HH-9", **ELIZABETH))
    run(engine, config, restricted_note("T02", "M1", "U"), restricted_note("T03", "M2", "V"),
        restricted_note("T08", "M3", ""))
    run(engine, config, restricted_note("T02", "M4", "R", document="D-2"), restricted_note("T03", "M5", '""', document="D-2"))
    run(engine, config, restricted_note("T02", "M6", "", document="D-3"))
    run(engine, config, restricted_note("T06", "M8", "", document="PSY-1A", parent="PSY-1"))  # under the V note

    def statuses():
        with engine.connect() as conn:
            return {n: (c, i) for n, c, i in conn.execute(text(
                "SELECT number, confidentiality, inherited_confidentiality FROM document")).all()}

    kept = statuses()
    assert kept == {"PSY-1": ("V", None), "D-2": ("U", None), "D-3": (None, None), "PSY-1A": ("V", "V")}
    downgrade(engine, "0013")
    with engine.begin() as conn:  # versions written before 0014 had no such field
        for row in conn.execute(text("SELECT id, fields FROM document_version")).all():
            fields = json.loads(row.fields) if isinstance(row.fields, str) else dict(row.fields)
            fields.pop("confidentiality", None)
            conn.execute(text("UPDATE document_version SET fields = :f WHERE id = :id")
                         .bindparams(bindparam("f", type_=JSON)), {"f": fields, "id": row.id})
    upgrade(engine)
    assert statuses() == kept
    (edit,) = run(engine, config, restricted_note("T08", "M7", ""))
    assert edit.routed == () and statuses()["PSY-1"] == ("V", None)


def test_0015_gives_records_an_older_release_left_without_features_their_features_and_keys(engine: Engine,
                                                                                              tmp_path) -> None:
    """Found by the session-9 upgrade audit: a technician's split before 11-28 stored no features,
    and after the upgrade `reconcile consistency` failed until somebody ran `exchange replay`."""
    from tests.store.test_index import ELIZABETH, register
    from tests.store.test_routing_store import bh_network, run

    config = bh_network(tmp_path)
    run(engine, config, register("OAKNH", "OA-9", **ELIZABETH), register("GENHOSP", "GH-9", **ELIZABETH))

    def index():
        with engine.connect() as conn:
            return (dict(conn.execute(text("SELECT mrn, features FROM patient_record")).all()),
                    sorted(conn.execute(text("SELECT k.key, r.mrn FROM record_key k"
                                             " JOIN patient_record r ON r.id = k.record_id")).all()),
                    dict(conn.execute(text("SELECT mrn, person_id FROM patient_record")).all()))

    kept = index()
    assert all(kept[0].values()) and kept[1]
    downgrade(engine, "0014")
    with engine.begin() as conn:  # as the older release left GH-9
        conn.execute(text("DELETE FROM record_key WHERE record_id = (SELECT id FROM patient_record"
                          " WHERE mrn = 'GH-9')"))
        conn.execute(text("UPDATE patient_record SET features = NULL WHERE mrn = 'GH-9'"))
    upgrade(engine)
    assert index() == kept


def test_0016_keeps_every_hold_an_older_release_wrote_and_takes_any_number_after(engine: Engine) -> None:
    """An older release kept one string of at most 128 characters: the facilities whose PD1-12 =
    Y stood ("PD1-12 GENHOSP, OAKNH") or one technician ("api tess"). Each is a hold of its own
    after the upgrade; downgrading writes them back the way the older release read them."""
    from exchange.store.consent import holds_of

    downgrade(engine, "0015")
    now = "2026-11-29 10:00:00+00:00" if engine.dialect.name == "postgresql" else "2026-11-29 10:00:00.000000"
    with engine.begin() as conn:
        for id_, protected, by, into in ((1, True, "PD1-12 GENHOSP, OAKNH", None), (2, True, "api tess", None),
                                         (3, False, None, None),
                                         # an older release's merge of 5 into 4 kept 4's setter alone
                                         (4, True, "PD1-12 GENHOSP", None), (5, True, "api tess", 4),
                                         (6, True, "PD1-12 HHCARE", 5),
                                         # ... but 8's opt-out was lifted after 7's last change (a verification
                                         # audit: the upgrade brought a lifted hold back)
                                         (7, True, "PD1-12 OAKNH", 8), (8, False, None, None)):
            conn.execute(text("INSERT INTO person (id, created_at, protected, protected_by, merged_into)"
                              " VALUES (:id, :at, :p, :by, :into)"),
                         {"id": id_, "at": now, "p": protected, "by": by, "into": into})
        for person_id, protected, by in ((7, True, "PD1-12 OAKNH"), (8, False, "api tom")):
            conn.execute(text("INSERT INTO opt_out_event (person_id, protected, by, at) VALUES (:p, :s, :by, :at)"),
                         {"p": person_id, "s": protected, "by": by, "at": now})
    upgrade(engine)

    def holds():
        with engine.connect() as conn:
            return {r.id: holds_of(bool(r.protected), r.protected_by) for r in conn.execute(
                text("SELECT id, protected, protected_by FROM person ORDER BY id"))}

    assert {k: v for k, v in holds().items() if k <= 4 or k == 8} == {
        1: ("PD1-12 GENHOSP", "PD1-12 OAKNH"), 2: ("api tess",), 3: (), 4: ("PD1-12 GENHOSP", "api tess", "PD1-12 HHCARE"),
        8: ()}
    with engine.connect() as conn:  # each fold is in the person's opt-out history
        assert conn.execute(text("SELECT person_id, by FROM opt_out_event WHERE id > 2 ORDER BY id")).all() == [
            (4, "api tess"), (4, "PD1-12 HHCARE")]
    many = json.dumps([f"PD1-12 ST_ELIZABETH_REGIONAL_MEDCTR_{c}" for c in "ABCDE"] + ["api tess"])
    with engine.begin() as conn:  # more than 128 characters of holds, on PostgreSQL too
        conn.execute(text("UPDATE person SET protected_by = :by WHERE id = 2"), {"by": many})
    assert len(holds()[2]) == 6
    downgrade(engine, "0015")
    with engine.connect() as conn:
        assert dict(conn.execute(text("SELECT id, protected_by FROM person WHERE id = 1")).all()) == {
            1: "PD1-12 GENHOSP, OAKNH"}
        assert conn.execute(text("SELECT protected_by FROM person WHERE id = 2")).scalar_one() == "api tess"
    upgrade(engine)
