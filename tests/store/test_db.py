"""The engines make_engine builds: what every session on them can rely on."""
from __future__ import annotations

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
