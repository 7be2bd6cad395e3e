"""The engines make_engine builds: what every session on them can rely on."""
from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from exchange.store.db import make_engine


def test_a_statement_prepared_on_a_small_table_is_planned_for_the_table_it_meets(engine: Engine) -> None:
    """psycopg prepares a statement after 5 runs; a generic plan costed on the
    empty tables of a fresh database would go on scanning them as they grow
    (no ANALYZE comes where autovacuum is off). Every execution gets a plan
    for its own parameters and the table as it is."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:  # the shape of record_identifier, a few rows in
        conn.exec_driver_sql("CREATE TABLE grows (id bigserial PRIMARY KEY, record_id bigint NOT NULL,"
                             " authority varchar(227) NOT NULL, value varchar(199) NOT NULL, type varchar(16) NOT NULL)")
        conn.exec_driver_sql("CREATE INDEX ix_grows_record_id ON grows (record_id)")
        rows = "INSERT INTO grows (record_id, authority, value, type) SELECT n, 'AUTH', 'MR' || n, 'MR' FROM generate_series"
        conn.exec_driver_sql(rows + "(1, 40) AS n")
        conn.exec_driver_sql("PREPARE by_ids(bigint[]) AS DELETE FROM grows WHERE record_id = ANY($1::bigint[])")
        for _ in range(10):  # past the server's 5 custom plans: it settles on a plan now
            conn.exec_driver_sql("EXECUTE by_ids('{1,2,3}')")
        conn.exec_driver_sql(rows + "(41, 50000) AS n")
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN EXECUTE by_ids('{1,2,3}')"))
        conn.rollback()
    assert "Seq Scan" not in plan and "ix_grows_record_id" in plan, plan

def test_connection_options_in_the_url_are_kept(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        return
    url = engine.url.update_query_dict({"options": "-c statement_timeout=4321"})
    other = make_engine(url.render_as_string(hide_password=False))
    try:
        with other.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "4321ms"
            assert conn.execute(text("SHOW plan_cache_mode")).scalar_one() == "force_custom_plan"
    finally:
        other.dispose()


def test_server_warnings_say_when_postgresql_autovacuum_is_off(engine: Engine) -> None:
    from exchange.store.db import server_warnings

    warnings = server_warnings(engine)
    if engine.dialect.name != "postgresql":
        assert warnings == []
        return
    with engine.connect() as conn:
        on = conn.execute(text("SHOW autovacuum")).scalar_one() == "on"
    if on:
        assert warnings == []
    else:  # as on this project's CI machine
        assert len(warnings) == 1 and warnings[0].startswith("PostgreSQL autovacuum is off")


def test_every_postgresql_connection_has_tcp_keepalives_on_both_ends(engine: Engine) -> None:
    """Found by a black-box audit: a node whose host was lost without a FIN kept its session, and
    the advisory locks on its destinations, for the server's default 2 hours of keepalive idle,
    so no other node took them over. Both ends probe now: a lost peer's session ends in ~30 s."""
    if engine.dialect.name != "postgresql" or not engine.url.host or engine.url.host.startswith("/"):
        return  # keepalives are TCP's: over a Unix socket the server shows 0
    with engine.connect() as conn:
        shown = {name: conn.execute(text(f"SHOW {name}")).scalar_one()
                 for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
                              "tcp_user_timeout", "plan_cache_mode")}
        client = conn.connection.driver_connection.info.get_parameters()
    assert shown == {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3",
                     "tcp_user_timeout": "30000", "plan_cache_mode": "force_custom_plan"}
    assert {k: client.get(k) for k in ("keepalives", "keepalives_idle", "keepalives_interval",
                                       "keepalives_count", "tcp_user_timeout")} == {
        "keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3",
        "tcp_user_timeout": "30000"}


def test_keepalives_the_url_sets_are_kept(engine: Engine) -> None:
    if engine.dialect.name != "postgresql" or not engine.url.host or engine.url.host.startswith("/"):
        return
    url = engine.url.update_query_dict({"keepalives_idle": "60", "options": "-c tcp_keepalives_idle=60"})
    other = make_engine(url.render_as_string(hide_password=False))
    try:
        with other.connect() as conn:
            assert conn.execute(text("SHOW tcp_keepalives_idle")).scalar_one() == "60"
            assert conn.execute(text("SHOW tcp_keepalives_count")).scalar_one() == "3"  # the others still set
            client = conn.connection.driver_connection.info.get_parameters()
            assert (client["keepalives_idle"], client["keepalives_count"]) == ("60", "3")
    finally:
        other.dispose()


def test_a_session_stopped_inside_a_transaction_is_ended_and_its_locks_go(engine: Engine) -> None:
    """Found by a verification audit: a node stopped mid-batch (SIGSTOP, a paused VM) held the links
    lock, and every technician's decision was refused, for as long as it stayed stopped. The
    writer's and the API's sessions now end after IDLE_IN_TRANSACTION_MS idle inside a transaction."""
    import time

    from sqlalchemy.exc import DBAPIError

    from exchange.store.db import IDLE_IN_TRANSACTION_MS, LINKS_LOCK, hold_links

    if engine.dialect.name != "postgresql":
        return
    assert 10_000 <= IDLE_IN_TRANSACTION_MS <= 300_000  # longer than any batch's Python; shorter than an outage
    url = engine.url.render_as_string(hide_password=False)
    stopped = make_engine(url, idle_in_transaction_ms=300)
    try:
        with stopped.connect() as conn:
            conn.begin()
            hold_links(conn, exclusive=False)
            time.sleep(1.0)  # the node is stopped
            with engine.connect() as other:  # the lock is free again
                got = other.exec_driver_sql("SELECT pg_try_advisory_xact_lock(%s, %s)", LINKS_LOCK).scalar()
                other.rollback()
            assert got is True
            try:
                conn.exec_driver_sql("SELECT 1")
                ended = False
            except DBAPIError:
                ended = True
            assert ended  # its batch fails (no ACK was sent), and the sender resends
    finally:
        stopped.dispose()


def test_sessions_a_stopped_node_left_holding_locks_are_ended_and_no_other(engine: Engine) -> None:
    """Found by a verification audit: a node stopped in the middle of a pipeline (PostgreSQL counts
    that session active, waiting for the client: no idle_in_transaction timeout) held the links
    lock and its key locks for as long as it stayed stopped -- every node's writer and every
    decision waited -- and a stopped node's delivery sessions kept their destinations from the
    other nodes. ``end_stale_sessions`` (every node runs it) ends them, and every delivery session
    of a process one of them belonged to; a running node's sessions, jobs and the other processes'
    idle pooled connections are left alone."""
    import time

    import psycopg

    from exchange.store.db import (API_SESSION, DELIVERY_SESSION, LINKS_LOCK, WRITER_SESSION, end_stale_sessions,
                                   session_name)

    if engine.dialect.name != "postgresql":
        return
    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def session(name: str) -> psycopg.Connection:
        return psycopg.connect(dsn, application_name=name, autocommit=True)

    stuck_pipeline = session(session_name(WRITER_SESSION))  # stopped between two statements of a pipeline
    stuck_pipeline.execute("BEGIN")
    stuck_pipeline.pgconn.enter_pipeline_mode()
    stuck_pipeline.pgconn.send_query_params(b"SELECT pg_advisory_xact_lock_shared(%d, %d)" % LINKS_LOCK, None)
    stuck_pipeline.pgconn.send_flush_request()
    stuck_pipeline.pgconn.flush()
    stuck_api = session(session_name(API_SESSION))  # stopped idle in a transaction
    stuck_api.execute("BEGIN")
    stuck_api.execute("SELECT 1")
    stuck_delivery = session(session_name(DELIVERY_SESSION))  # holds a destination, stopped
    stuck_delivery.execute("SELECT pg_try_advisory_lock(1, 2)")
    its_reader = session(session_name(DELIVERY_SESSION))  # where its copies are checked before they go
    spared = {
        "a job's long transaction": session("exchange job links"),
        "another node's pooled delivery connection": session("exchange delivery otherhost:1"),
        "a writer busy on the server": session("exchange writer otherhost:2"),
    }
    spared["a job's long transaction"].execute("BEGIN")
    spared["a job's long transaction"].execute("SELECT 1")
    spared["a writer busy on the server"].pgconn.send_query(b"SELECT pg_sleep(4)")
    try:
        time.sleep(1.5)
        with engine.connect() as conn:
            ended = end_stale_sessions(conn, stale=1.0, idle=1.0)
            conn.commit()
        assert sorted(ended) == sorted([WRITER_SESSION, API_SESSION, DELIVERY_SESSION, DELIVERY_SESSION])
        deadline = time.monotonic() + 10  # the locks are free once those backends have exited (a signal away)
        with engine.connect() as other:
            while not (other.exec_driver_sql("SELECT pg_try_advisory_xact_lock(%s, %s)", LINKS_LOCK).scalar()
                       and other.exec_driver_sql("SELECT pg_try_advisory_xact_lock(1, 2)").scalar()):
                other.rollback()
                assert time.monotonic() < deadline, "a stale session's locks outlived it"
                time.sleep(0.05)
            other.rollback()
        for conn in (stuck_api, stuck_delivery, its_reader):
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        for what, conn in spared.items():
            if what == "a writer busy on the server":
                while conn.pgconn.is_busy():
                    conn.pgconn.consume_input()
                    time.sleep(0.05)
                assert conn.pgconn.get_result().status == psycopg.pq.ExecStatus.TUPLES_OK, what
            else:
                assert conn.execute("SELECT 1").fetchone() == (1,), what
    finally:
        for conn in (stuck_pipeline, stuck_api, stuck_delivery, its_reader, *spared.values()):
            conn.close()
