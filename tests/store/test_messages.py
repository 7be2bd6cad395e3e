"""The message store's batch primitives, on SQLite and on PostgreSQL."""
from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError, StatementError

from exchange.outcome import MessageState
from exchange.store.db import write_transaction
from exchange.store import messages
from exchange.store.messages import (
    FIND_PRIOR_CHUNK,
    MessageView,
    NewMessage,
    PriorAnswer,
    count_messages,
    find_prior,
    get_message,
    insert_messages,
    message_history,
    record_resent,
)
from exchange.store.schema import message_event_table, message_table
from tests.support import new_message

T0 = datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=timezone.utc)


def msg(control_id: str | None = "MSG-1", **overrides) -> NewMessage:
    overrides.setdefault("received_at", T0)
    overrides.setdefault("facility", "NORTH")
    overrides.setdefault("version", "2.5")
    return new_message(control_id, application="LAB", **overrides)


def rejected(control_id: str = "MSG-1", **overrides) -> NewMessage:
    fields = dict(
        state=MessageState.REJECTED, ack_code="AR", reason="unsupported processing id", dedup=False
    )
    return msg(control_id, **{**fields, **overrides})


def store(engine: Engine, *rows: NewMessage) -> list[int]:
    with write_transaction(engine) as conn:
        return insert_messages(conn, rows)


def test_raw_and_ack_bytes_come_back_exactly(engine: Engine) -> None:
    not_utf8 = b"MSH|^~\\&|LAB|NORTH|||20260301||ADT^A08|B-1|P|2.3\rPID|1||9^^^N||M\xfcller^J\xf6rg\x00\xff\xfe\r\x1c\x0b\r\n"
    big = b"MSH|^~\\&|LAB|NORTH|||20260301||MDM^T02|BIG-1|P|2.5\r" + bytes(range(256)) * 800
    assert len(big) > 200_000
    ack = b"MSH|^~\\&|EXCHANGE|HUB\rMSA|AA|B-1\r\xe9\x00"
    ids = store(
        engine,
        msg("B-1", raw=not_utf8, ack=ack),
        msg("BIG-1", raw=big),
        rejected("R-1", raw=b"\x00\x01\x02", ack=None),
    )
    assert len(ids) == 3

    with engine.connect() as conn:
        small = get_message(conn, "NORTH", "B-1")
        large = get_message(conn, "NORTH", "BIG-1")
        tiny = get_message(conn, "NORTH", "R-1")
    assert isinstance(small, MessageView) and isinstance(large, MessageView) and tiny
    assert type(small.raw) is bytes and small.raw == not_utf8 and small.size == len(not_utf8)
    assert type(small.ack) is bytes and small.ack == ack
    assert large.raw == big and large.size == len(big)
    assert tiny.raw == b"\x00\x01\x02" and tiny.ack is None
    assert (small.id, large.id, tiny.id) == tuple(ids)
    assert small.state is MessageState.ACCEPTED and tiny.state is MessageState.REJECTED
    assert (small.facility, small.control_id, small.message_type, small.event) == ("NORTH", "B-1", "ADT", "A01")
    assert (small.structure, small.version, small.processing_id, small.sending_application) == (
        "ADT_A01",
        "2.5",
        "P",
        "LAB",
    )
    assert (small.peer, small.dedup, tiny.dedup, tiny.reason) == (
        "127.0.0.1:50123",
        True,
        False,
        "unsupported processing id",
    )


def test_received_at_round_trips_timezone_aware(engine: Engine) -> None:
    eastern = timezone(timedelta(hours=-5))
    local = datetime(2026, 3, 1, 3, 30, 15, 654321, tzinfo=eastern)
    [message_id] = store(engine, msg("TZ-1", received_at=local))

    with engine.connect() as conn:
        view = get_message(conn, "NORTH", "TZ-1")
        [(at, _, _)] = message_history(conn, message_id)
    assert view is not None
    assert view.received_at == local
    assert view.received_at.utcoffset() == timedelta(0)
    assert view.received_at == datetime(2026, 3, 1, 8, 30, 15, 654321, tzinfo=timezone.utc)
    assert at == local and at.utcoffset() == timedelta(0)


def test_naive_datetimes_are_refused(engine: Engine) -> None:
    with pytest.raises((ValueError, StatementError), match="naive datetime"):
        store(engine, msg("NAIVE-1", received_at=datetime(2026, 3, 1, 8, 30)))
    with engine.connect() as conn:
        assert count_messages(conn) == 0


def test_find_prior_sees_only_dedup_rows(engine: Engine) -> None:
    ids = store(
        engine,
        rejected("D-1"),
        msg("D-2", state=MessageState.IGNORED, ack=None, ack_code=None, dedup=False),
        msg("D-3"),
        msg("D-4", state=MessageState.ERROR, ack_code="AE", reason="MSH-18: cannot decode"),
        msg("D-5", facility="SOUTH"),
    )
    keys = [("NORTH", f"D-{i}") for i in range(1, 7)] + [("SOUTH", "D-3"), ("SOUTH", "D-5")]
    with engine.connect() as conn:
        prior = find_prior(conn, keys + [("NORTH", "D-3")])  # a key twice is fine
        assert find_prior(conn, []) == {}
        assert find_prior(conn, [(None, "D-3"), ("NORTH", None)]) == {}  # type: ignore[list-item]

    assert set(prior) == {("NORTH", "D-3"), ("NORTH", "D-4"), ("SOUTH", "D-5")}
    north3 = prior[("NORTH", "D-3")]
    assert north3 == PriorAnswer(ids[2], msg("D-3").ack, "AA", "accepted")
    assert prior[("NORTH", "D-4")].state == MessageState.ERROR
    assert prior[("NORTH", "D-4")].ack_code == "AE"
    assert prior[("SOUTH", "D-5")].message_id == ids[4]


def test_find_prior_chunks_large_key_lists(engine: Engine) -> None:
    stored = [msg(f"K-{i:04d}") for i in range(0, 1300, 7)]
    ids = dict(zip((m.control_id for m in stored), store(engine, *stored)))
    keys = [("NORTH", f"K-{i:04d}") for i in range(1300)]
    assert len(keys) > 2 * FIND_PRIOR_CHUNK
    with engine.connect() as conn:
        prior = find_prior(conn, keys)
    assert {k[1]: p.message_id for k, p in prior.items()} == ids


def test_find_prior_is_an_index_look_up(engine: Engine) -> None:
    store(engine, msg("IX-1"), rejected("IX-2"))
    keys = [("NORTH", "IX-1"), ("NORTH", "IX-2"), ("NORTH", "IX-3")]
    with write_transaction(engine) as conn:
        assert set(find_prior(conn, keys)) == {("NORTH", "IX-1")}
        if engine.dialect.name == "sqlite":
            # the driver-level statement find_prior runs per key
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + messages._SQLITE_FIND_PRIOR, keys[0]).all()
        else:
            statement = messages._PG_FIND_PRIOR
            parameters = {"facilities": [k[0] for k in keys], "control_ids": [k[1] for k in keys]}
            # A tiny table: forbid the plans that only pay off there, so the
            # plan shows whether each key *can* be an index look-up (it is on a
            # large table; a type mismatch between key and column would stop it).
            for plan_kind in ("seqscan", "bitmapscan", "hashjoin", "mergejoin"):
                conn.exec_driver_sql(f"SET LOCAL enable_{plan_kind} = off")
            plan = conn.exec_driver_sql("EXPLAIN " + statement, parameters).all()
    text_plan = " ".join(str(step) for row in plan for step in row)
    assert "_message_facility_control_id" in text_plan, text_plan
    if engine.dialect.name == "postgresql":
        assert "Index Cond: (((facility)::text = " in text_plan, text_plan


def test_unique_index_refuses_a_second_dedup_row(engine: Engine) -> None:
    store(engine, msg("U-1"))
    with pytest.raises(IntegrityError):
        store(engine, msg("U-1", received_at=T0 + timedelta(seconds=5)))
    with pytest.raises(IntegrityError):  # within one batch too
        store(engine, msg("U-2"), msg("U-2"))
    with engine.connect() as conn:
        assert count_messages(conn) == 1  # the failed batches left nothing behind


def test_rejected_duplicates_and_null_keys_are_allowed(engine: Engine) -> None:
    # A rejected message resent (after the sender fixed its config) is
    # stored again, and then accepted once.
    store(engine, rejected("R-1"), rejected("R-1"))
    store(engine, rejected("R-1"), msg("R-1"))
    store(engine, msg("R-1", facility="SOUTH"))  # same MSH-10, other facility
    # Without MSH-10 (or MSH-4) there is no key, so nothing collides.
    store(engine, msg(None), msg(None), msg("R-2", facility=None), msg("R-2", facility=None))

    with engine.connect() as conn:
        assert count_messages(conn) == 9
        applied = get_message(conn, "NORTH", "R-1")
        assert applied is not None and applied.state is MessageState.ACCEPTED and applied.dedup
        assert get_message(conn, None, "R-2") is not None
        assert get_message(conn, "NORTH", None) is not None
        assert get_message(conn, "NORTH", "NOPE") is None
        dedup_rows = conn.execute(
            select(func.count()).select_from(message_table).where(message_table.c.dedup)
        ).scalar_one()
    assert dedup_rows == 6


def test_get_message_prefers_the_dedup_row_else_the_latest(engine: Engine) -> None:
    _, second = store(engine, rejected("G-1"), rejected("G-1", reason="second try"))
    with engine.connect() as conn:
        latest = get_message(conn, "NORTH", "G-1")
    assert latest is not None and latest.id == second and latest.reason == "second try"
    [applied] = store(engine, msg("G-1"))
    store(engine, rejected("G-1", reason="after"))
    with engine.connect() as conn:
        view = get_message(conn, "NORTH", "G-1")
    assert view is not None and view.id == applied


def test_ids_come_back_in_the_order_given(engine: Engine) -> None:
    store(engine, msg("EARLIER"))  # ids do not start at 1
    rng = random.Random(7)
    control_ids = [f"ORD-{n}" for n in rng.sample(range(100_000), 300)]
    batch = [
        msg(cid, dedup=(i % 3 != 0), state=MessageState.ACCEPTED if i % 3 else MessageState.REJECTED)
        for i, cid in enumerate(control_ids)
    ]
    ids = store(engine, *batch)
    assert len(ids) == 300 and len(set(ids)) == 300

    with engine.connect() as conn:
        stored = dict(
            conn.execute(
                select(message_table.c.id, message_table.c.control_id).where(
                    message_table.c.id.in_(ids)
                )
            ).all()
        )
        history = dict(
            conn.execute(
                select(message_event_table.c.message_id, message_event_table.c.state).where(
                    message_event_table.c.message_id.in_(ids)
                )
            ).all()
        )
    assert [stored[i] for i in ids] == control_ids
    assert [history[i] for i in ids] == [str(m.state) for m in batch]


def test_a_batch_costs_a_handful_of_statements(engine: Engine, monkeypatch) -> None:
    statements: list[str] = []
    if engine.dialect.name == "postgresql":
        # The hot path runs on the psycopg cursor: watch it there.
        import psycopg

        def watching(method):
            def watched(self, query, *args, **kwargs):
                statements.append(str(query).split(None, 1)[0])
                return method(self, query, *args, **kwargs)

            return watched

        monkeypatch.setattr(psycopg.Cursor, "execute", watching(psycopg.Cursor.execute))
        monkeypatch.setattr(psycopg.Cursor, "executemany", watching(psycopg.Cursor.executemany))
    with write_transaction(engine) as conn:
        if engine.dialect.name == "sqlite":
            # The hot path runs on the sqlite3 cursor; SQLite's own trace sees it.
            conn.connection.driver_connection.set_trace_callback(lambda sql: statements.append(" ".join(sql.split()[:3])))
        try:
            find_prior(conn, [("NORTH", f"S-{i}") for i in range(300)])
            insert_messages(conn, [msg(f"S-{i}") for i in range(300)])
            record_resent(conn, [(1, T0, "peer")] * 50)
        finally:
            if engine.dialect.name == "sqlite":
                conn.connection.driver_connection.set_trace_callback(None)
    if engine.dialect.name == "postgresql":
        # Round trips: one look-up, messages and their history rows in one
        # statement (a CTE), the resends in one more.
        assert [s for s in statements if s not in (";", "BEGIN")] == ["SELECT", "WITH", "INSERT"]
    else:
        # No round trips on SQLite: one indexed look-up per key, ONE multi-row
        # INSERT for the 300 messages, their history rows in one executemany.
        assert statements.count("SELECT id, facility,") == 300
        assert statements.count("INSERT INTO message") == 1
        assert statements.count("INSERT INTO message_event") == 300 + 50


def test_history_records_the_state_and_every_resend(engine: Engine) -> None:
    error_id, accepted_id = store(
        engine,
        msg("H-1", state=MessageState.ERROR, ack_code="AE", reason="PID-3.4: unknown authority"),
        msg("H-2"),
    )
    t1, t2 = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    with write_transaction(engine) as conn:
        record_resent(conn, [(error_id, t1, "10.0.0.5:40000"), (accepted_id, t1, "10.0.0.6:1")])
    with write_transaction(engine) as conn:
        record_resent(conn, [(error_id, t2, "10.0.0.5:40001 (CN=north-engine)")])
        record_resent(conn, [])

    with engine.connect() as conn:
        error_history = message_history(conn, error_id)
        accepted_history = message_history(conn, accepted_id)
        assert message_history(conn, 999_999) == []
    assert error_history == [
        (T0, "error", "PID-3.4: unknown authority"),
        (t1, "resent", "10.0.0.5:40000"),
        (t2, "resent", "10.0.0.5:40001 (CN=north-engine)"),
    ]
    assert [entry.state for entry in error_history] == [MessageState.ERROR, MessageState.RESENT, MessageState.RESENT]
    assert accepted_history == [(T0, MessageState.ACCEPTED, None), (t1, MessageState.RESENT, "10.0.0.6:1")]


def test_deleting_a_message_deletes_its_history(engine: Engine) -> None:
    [message_id] = store(engine, msg("DEL-1"))
    with write_transaction(engine) as conn:
        record_resent(conn, [(message_id, T0, "peer")])
    with write_transaction(engine) as conn:
        conn.execute(delete(message_table).where(message_table.c.id == message_id))
    with engine.connect() as conn:
        assert message_history(conn, message_id) == []
        assert count_messages(conn) == 0


def test_text_the_database_cannot_hold_is_made_storable(engine: Engine) -> None:
    # PostgreSQL refuses NUL in text and text longer than the column; a bad
    # header must not sink its batch, and a resend must still be found.
    odd_facility = "N" * 100
    odd_control = "C\x00-1" + "9" * 300
    odd = msg(
        odd_control,
        facility=odd_facility,
        sending_application="APP\x00" + "x" * 500,
        message_type="ADT\ud800",
        event="A01" * 10,
        version="2.5\x00",
        peer="p" * 300,
        reason="bad\x00reason",
    )
    [message_id] = store(engine, odd, msg("NORMAL-1"))[:1]
    with engine.connect() as conn:
        prior = find_prior(conn, [(odd_facility, odd_control)])
        view = get_message(conn, odd_facility, odd_control)
    assert prior[(odd_facility, odd_control)].message_id == message_id
    assert view is not None and view.id == message_id
    assert view.raw == odd.raw
    assert view.facility == "N" * 64 and len(view.control_id or "") == 199
    assert view.control_id.startswith("C\ufffd-1")  # type: ignore[union-attr]
    assert view.message_type == "ADT?" and len(view.peer) == 128 and view.reason == "bad\ufffdreason"
    with pytest.raises(IntegrityError):  # still one applied message per key
        store(engine, replace(odd, received_at=T0 + timedelta(seconds=1)))


def test_count_messages(engine: Engine) -> None:
    with engine.connect() as conn:
        assert count_messages(conn) == 0
    store(engine, *(msg(f"N-{i}") for i in range(5)), rejected("N-0"))
    with engine.connect() as conn:
        assert count_messages(conn) == 6


def test_find_prior_is_never_a_prepared_statement_on_postgresql(engine: Engine) -> None:
    """A generic plan made on a small table would keep scanning it as it grows:
    find_prior is planned with its actual keys every time, the insert is not."""
    if engine.dialect.name != "postgresql":
        return
    with write_transaction(engine) as conn:
        for i in range(10):  # psycopg prepares after 5 runs
            find_prior(conn, [("NORTH", f"PP-{i}")])
            insert_messages(conn, [msg(f"PP-{i}")])
        prepared = [s for (s,) in conn.exec_driver_sql("SELECT statement FROM pg_prepared_statements")]
    assert any("INSERT INTO message" in s for s in prepared)
    assert not any("unnest(" in s and "JOIN message" in s for s in prepared)
