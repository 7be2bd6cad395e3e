"""Routing in the writer's transaction (exchange.store.routing via process_batch),
on SQLite and PostgreSQL: what is queued, and that a routing bug never stops the intake."""
from __future__ import annotations

from sqlalchemy import text

from exchange.config import load_config
from tests.store.test_index import ELIZABETH, FACILITIES, register
from tests.support import write_config


def network(tmp_path):
    facilities = "".join(
        f'\n[[facility]]\ncode = "{code}"\nname = "{code}"\nkind = "{kind}"\nauthority = "{code}"\n'
        f'deliver_to = "127.0.0.1:{port}"\n'
        for code, kind, port in (("GENHOSP", "hospital", 3575), ("OAKNH", "nursing_home", 3576),
                                 ("HHCARE", "home_health", 3577)))
    return load_config(write_config(tmp_path, facilities=facilities))


def run(engine, config, *raws):
    import itertools
    from datetime import datetime, timezone

    from exchange.acceptance import accept
    from exchange.hl7.header import read_header
    from exchange.pipeline import Received, process_batch
    from exchange.store.index import ModelCache
    from tests.store.test_index import POLICY

    now = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
    ids = itertools.count(1)
    items = [Received(r, read_header(r), accept(read_header(r), POLICY), now, "127.0.0.1:1") for r in raws]
    with engine.begin() as conn:
        return process_batch(conn, items, new_control_id=lambda: f"A{next(ids)}", now=lambda: now,
                             facilities=FACILITIES, models=ModelCache(), routing=config)


def test_copies_are_queued_with_who_what_and_why(engine, tmp_path):
    config = network(tmp_path)
    run(engine, config, register("OAKNH", "OA-1", **ELIZABETH))
    (answer,) = run(engine, config, register("GENHOSP", "GH-1", **ELIZABETH))
    assert answer.ack_code == "AA" and answer.routed == ("OAKNH",)
    with engine.connect() as conn:
        ((destination, control_id, facility, mrn, reason, state, payload),) = conn.execute(text(
            "select destination, control_id, facility, mrn, reason, state, payload from delivery")).all()
    assert (destination, facility, mrn, reason, state) == ("OAKNH", "GENHOSP", "GH-1", "default", "queued")
    assert control_id == f"{answer.message_id}-1" and b"OA-1^^^OAKNH^MR" in bytes(payload)


def test_a_routing_bug_leaves_the_message_applied_and_acknowledged(engine, tmp_path, monkeypatch):
    import exchange.store.routing as routing

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    config = network(tmp_path)
    run(engine, config, register("OAKNH", "OA-2", **ELIZABETH))
    monkeypatch.setattr(routing, "route", broken)
    (answer,) = run(engine, config, register("GENHOSP", "GH-2", **ELIZABETH))
    assert answer.ack_code == "AA" and answer.routed == ()
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from delivery")).scalar_one() == 0
        assert conn.execute(text("select count(*) from patient_record where mrn = 'GH-2'")).scalar_one() == 1
