"""The delivery outbox (exchange.store.outbox) on SQLite and PostgreSQL."""
from __future__ import annotations

import time

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, select, text

from exchange.store.db import make_engine, write_transaction
from exchange.store.messages import insert_messages
from exchange.store.outbox import (
    Delivered,
    DeliveryState,
    Failed,
    NewCopy,
    RetryLater,
    RetryResult,
    SUPERSEDED,
    Superseded,
    claim_batch,
    claim_next,
    destinations,
    enqueue,
    get_delivery,
    list_deliveries,
    lock_key,
    mark_delivered,
    mark_failed,
    message_deliveries,
    queue_depths,
    record_outcomes,
    retry,
    schedule_retry,
    send_check,
    try_lock_destination,
    unlock_destination,
    Withheld,
)
from exchange.store.schema import delivery_table
from tests.support import delivery_config, new_message

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
CONFIG = delivery_config()  # OAKNH and HHCARE subscribe to every ADT and MDM event


def copy_of(message_id: int, n: int, destination: str = "OAKNH", **kw) -> NewCopy:
    fields = dict(
        destination=destination,
        message_id=message_id,
        control_id=f"D{n:06d}",
        payload=b"MSH|^~\\&|EXCHANGE|EXCHANGE||" + destination.encode() + b"|||ADT^A01|D%06d|P|2.5\r" % n,
        created_at=T0 + timedelta(milliseconds=n),
        person_id=7,
        facility="GENHOSP",
        mrn="100001",
        reason="default",
    )
    fields.update(kw)
    return NewCopy(**fields)


@pytest.fixture
def message_id(engine: Engine) -> int:
    with write_transaction(engine) as conn:
        return insert_messages(conn, [new_message("SRC-1")])[0]


def queue(engine: Engine, copies) -> list[int]:
    with write_transaction(engine) as conn:
        return enqueue(conn, copies)


def run(engine: Engine, fn, *args, **kw):
    with write_transaction(engine) as conn:
        return fn(conn, *args, **kw)


def test_enqueue_keeps_the_order_and_every_byte(engine: Engine, message_id: int) -> None:
    payload = bytes(range(256)) * 10  # any bytes, NUL included
    copies = [copy_of(message_id, n) for n in range(5)] + [copy_of(message_id, 5, payload=payload, person_id=None, mrn=None)]
    ids = queue(engine, copies)
    assert ids == sorted(ids) and len(set(ids)) == 6
    with engine.connect() as conn:
        rows = conn.execute(select(delivery_table).order_by(delivery_table.c.id)).mappings().all()
    assert [r["control_id"] for r in rows] == [c.control_id for c in copies]
    assert bytes(rows[-1]["payload"]) == payload
    assert rows[-1]["person_id"] is None and rows[0]["person_id"] == 7
    assert all(r["state"] == "queued" and r["attempts"] == 0 for r in rows)
    assert rows[0]["next_attempt_at"] == rows[0]["created_at"] == T0
    assert queue(engine, []) == []
    assert destinations(copies) == {"OAKNH"}


def test_enqueue_does_not_commit(engine: Engine, message_id: int) -> None:
    with pytest.raises(RuntimeError):
        with write_transaction(engine) as conn:
            enqueue(conn, [copy_of(message_id, 1)])
            raise RuntimeError("the intake's batch fails")
    with engine.connect() as conn:
        assert queue_depths(conn) == {}


def test_enqueue_refuses_naive_datetimes(engine: Engine, message_id: int) -> None:
    with pytest.raises(ValueError):
        queue(engine, [copy_of(message_id, 1, created_at=datetime(2026, 1, 1))])


def test_enqueue_a_large_batch_in_order(engine: Engine, message_id: int) -> None:
    copies = [copy_of(message_id, n, destination="OAKNH" if n % 3 else "HHCARE") for n in range(2500)]
    ids = queue(engine, copies)
    assert len(ids) == 2500 and ids == sorted(ids)
    with engine.connect() as conn:
        assert queue_depths(conn) == {"OAKNH": 1666, "HHCARE": 834}
        got = conn.execute(select(delivery_table.c.control_id).order_by(delivery_table.c.id)).scalars().all()
    assert got == [c.control_id for c in copies]


def test_claim_is_fifo_per_destination_and_stops_at_a_copy_not_due(engine: Engine, message_id: int) -> None:
    queue(engine, [copy_of(message_id, n, destination=("OAKNH", "HHCARE")[n % 2]) for n in range(6)])
    now = T0 + timedelta(seconds=1)
    claim = run(engine, claim_batch, "OAKNH", now, config=CONFIG)
    assert [c.control_id for c in claim.copies] == ["D000000", "D000002", "D000004"]
    assert claim.due_at is None
    assert run(engine, claim_next, "HHCARE", now, config=CONFIG).control_id == "D000001"

    head = claim.copies[0]
    assert run(engine, schedule_retry, head.id, next_attempt_at=now + timedelta(seconds=30), error="timeout")
    # the head waits for its retry and holds back the copies behind it
    later = run(engine, claim_batch, "OAKNH", now, config=CONFIG)
    assert later.copies == () and later.due_at == now + timedelta(seconds=30)
    assert run(engine, claim_next, "OAKNH", now, config=CONFIG) is None
    again = run(engine, claim_batch, "OAKNH", now + timedelta(seconds=30), config=CONFIG)
    assert [c.control_id for c in again.copies] == ["D000000", "D000002", "D000004"]
    assert again.copies[0].attempts == 1
    assert run(engine, claim_next, "NOBODY", now, config=CONFIG) is None


def test_claim_limits(engine: Engine, message_id: int) -> None:
    queue(engine, [copy_of(message_id, n, payload=b"x" * 1000) for n in range(10)])
    now = T0 + timedelta(seconds=1)
    claim = run(engine, claim_batch, "OAKNH", now, limit=4, config=CONFIG)
    assert len(claim.copies) == 4 and claim.due_at == now  # more is due at once
    claim = run(engine, claim_batch, "OAKNH", now, max_bytes=2500, config=CONFIG)
    assert len(claim.copies) == 2 and claim.due_at == now
    claim = run(engine, claim_batch, "OAKNH", now, max_bytes=10, config=CONFIG)
    assert len(claim.copies) == 1  # always at least one
    empty = run(engine, claim_batch, "HHCARE", now, config=CONFIG)
    assert empty.copies == () and empty.due_at is None


def test_outcomes(engine: Engine, message_id: int) -> None:
    ids = queue(engine, [copy_of(message_id, n) for n in range(4)])
    at = T0 + timedelta(seconds=2)
    assert run(engine, mark_delivered, ids[0], at=at, ack_code="AA", ack=b"MSH|...\rMSA|AA|D000000\r")
    assert not run(engine, mark_delivered, ids[0], at=at, ack_code="AA", ack=b"again")  # recorded already
    assert run(engine, mark_failed, ids[1], at=at, ack_code="AE", ack=b"MSH\rMSA|AE|D000001\r", error="AE: unknown patient")
    changed = run(
        engine,
        record_outcomes,
        [
            RetryLater(ids[2], at + timedelta(seconds=5), "no answer within 30 s"),
            RetryLater(ids[3], at + timedelta(seconds=5), "MSA-2 'X' is not the copy's MSH-10", "AA", b"MSA|AA|X"),
        ],
    )
    assert changed == 2
    with engine.connect() as conn:
        d0, d1, d2, d3 = (get_delivery(conn, i) for i in ids)
        assert queue_depths(conn) == {"OAKNH": 2}
    assert (d0.state, d0.attempts, d0.delivered_at, d0.ack_code, d0.last_error) == (DeliveryState.DELIVERED, 1, at, "AA", None)
    assert (d1.state, d1.attempts, d1.ack_code, d1.last_error) == (DeliveryState.FAILED, 1, "AE", "AE: unknown patient")
    assert (d2.state, d2.attempts, d2.next_attempt_at, d2.last_error) == (
        DeliveryState.QUEUED, 1, at + timedelta(seconds=5), "no answer within 30 s"
    )
    assert d3.ack_code == "AA" and d3.state is DeliveryState.QUEUED
    assert d0.message_facility == "GENHOSP" and d0.message_control_id == "SRC-1" and d0.message_type == "ADT"
    assert (d0.person_id, d0.facility, d0.mrn, d0.reason) == (7, "GENHOSP", "100001", "default")
    with engine.connect() as conn:
        ack = conn.execute(select(delivery_table.c.ack).where(delivery_table.c.id == ids[0])).scalar_one()
    assert bytes(ack) == b"MSH|...\rMSA|AA|D000000\r"


def test_retry_by_an_operator(engine: Engine, message_id: int) -> None:
    ids = queue(engine, [copy_of(message_id, n) for n in range(3)])
    at = T0 + timedelta(seconds=2)
    run(engine, mark_failed, ids[0], at=at, ack_code="AR", ack=b"", error="AR")
    run(engine, mark_delivered, ids[1], at=at, ack_code="AA", ack=b"")
    # found by a black-box audit: the retried copy (an old A08) landed after newer copies about the
    # same patient (the admit, the discharge); it takes the operator's word that it should
    result, view = run(engine, retry, ids[0], "ops-alice", at + timedelta(minutes=1), config=CONFIG)
    assert result is RetryResult.SUPERSEDED and view.state is DeliveryState.FAILED and view.retried_by is None
    result, view = run(engine, retry, ids[0], "ops-alice", at + timedelta(minutes=1), config=CONFIG, force=True)
    assert result is RetryResult.REQUEUED
    assert (view.state, view.retried_by, view.retried_at, view.attempts, view.last_error) == (
        DeliveryState.QUEUED, "ops-alice", at + timedelta(minutes=1), 1, "AR"
    )
    assert run(engine, retry, ids[0], "ops-alice", at, config=CONFIG)[0] is RetryResult.NOT_FAILED
    assert run(engine, retry, ids[1], "ops-alice", at, config=CONFIG)[0] is RetryResult.NOT_FAILED
    assert run(engine, retry, 10**9, "ops-alice", at, config=CONFIG) == (RetryResult.NOT_FOUND, None)
    # the requeued copy is the oldest: it goes out next, before ids[2]
    claim = run(engine, claim_batch, "OAKNH", at + timedelta(minutes=1), config=CONFIG)
    assert [c.id for c in claim.copies] == [ids[0], ids[2]]


def test_a_retry_is_not_held_back_by_newer_copies_about_someone_else_or_elsewhere(engine: Engine,
                                                                                 message_id: int) -> None:
    ids = queue(engine, [copy_of(message_id, 0), copy_of(message_id, 1, person_id=8, mrn="OTHER"),
                         copy_of(message_id, 2, destination="HHCARE")])
    at = T0 + timedelta(seconds=2)
    run(engine, mark_failed, ids[0], at=at, ack_code="AE", ack=b"", error="AE")
    run(engine, mark_delivered, ids[1], at=at, ack_code="AA", ack=b"")  # another patient
    run(engine, mark_delivered, ids[2], at=at, ack_code="AA", ack=b"")  # another destination
    assert run(engine, retry, ids[0], "ops-alice", at, config=CONFIG)[0] is RetryResult.REQUEUED



def test_listing(engine: Engine, message_id: int) -> None:
    with write_transaction(engine) as conn:
        other = insert_messages(conn, [new_message("SRC-2")])[0]
    ids = queue(
        engine,
        [copy_of(message_id, 0), copy_of(message_id, 1, destination="HHCARE"), copy_of(other, 2, person_id=8), copy_of(other, 3)],
    )
    run(engine, mark_delivered, ids[0], at=T0, ack_code="AA", ack=b"")
    run(engine, mark_delivered, ids[1], at=T0, ack_code="CA", ack=b"")
    with engine.connect() as conn:
        assert [d.id for d in list_deliveries(conn, "queued")] == [ids[2], ids[3]]  # oldest first
        assert [d.id for d in list_deliveries(conn, DeliveryState.DELIVERED)] == [ids[1], ids[0]]  # newest first
        assert [d.id for d in list_deliveries(conn, "delivered", "OAKNH")] == [ids[0]]
        assert [d.id for d in list_deliveries(conn)] == ids[::-1]
        assert [d.id for d in list_deliveries(conn, limit=1)] == [ids[3]]
        assert [d.id for d in list_deliveries(conn, person_id=8)] == [ids[2]]
        assert list_deliveries(conn, "failed") == []
        assert [(d.destination, d.state) for d in message_deliveries(conn, message_id)] == [
            ("OAKNH", DeliveryState.DELIVERED),
            ("HHCARE", DeliveryState.DELIVERED),
        ]
        with pytest.raises(ValueError):
            list_deliveries(conn, "sent")


def test_advisory_lock_is_per_destination_and_per_session(database_url: str) -> None:
    one, two = make_engine(database_url), make_engine(database_url)
    try:
        with one.connect() as a, two.connect() as b:
            with a.begin():
                assert try_lock_destination(a, "OAKNH")
            if database_url.startswith("sqlite"):
                assert try_lock_destination(b, "OAKNH")  # one node: always yours
                return
            with b.begin():
                assert not try_lock_destination(b, "OAKNH")  # held by the other session past its commit
                assert try_lock_destination(b, "HHCARE")
            with a.begin():
                assert try_lock_destination(a, "OAKNH")  # re-entrant
                unlock_destination(a, "OAKNH")  # releases both holds
            with b.begin():
                assert try_lock_destination(b, "OAKNH")
            b.invalidate()  # the session ends (closed, not back to the pool): its locks go
            deadline = time.monotonic() + 10  # once its backend has exited (at once, unless the machine is busy)
            while True:
                with a.begin():
                    if try_lock_destination(a, "OAKNH") and try_lock_destination(a, "HHCARE"):
                        break
                assert time.monotonic() < deadline, "the closed session's locks were not released"
                time.sleep(0.05)
    finally:
        one.dispose()
        two.dispose()
    assert lock_key("OAKNH") == lock_key("OAKNH") and -(2**31) <= lock_key("x" * 50) < 2**31


def test_a_copy_that_may_not_go_out_any_more_is_claimed_withheld(engine: Engine, message_id: int) -> None:
    """Routing decides at commit; an opt-out or a technician's split that commits while the
    copy waits (the destination was down) must still stop it."""
    from exchange.store.schema import patient_record_table, person_table
    from tests.test_reviews import HANSON, add_record, new_person

    with write_transaction(engine) as conn:
        p = add_record(conn, "GENHOSP", "G1", **HANSON)
        add_record(conn, "OAKNH", "O1", p, **HANSON)
        other = new_person(conn)
    ids = queue(engine, [copy_of(message_id, n, person_id=p, destination_mrn="O1", mrn="G1") for n in range(3)]
                + [copy_of(message_id, 9, person_id=p, destination_mrn=None, mrn="G1")])  # a rule's copy, no record

    def claimed():
        return {c.id: c.withheld for c in run(engine, claim_batch, "OAKNH", T0 + timedelta(minutes=1), config=CONFIG).copies}

    assert claimed() == dict.fromkeys(ids)
    # the person merged into another (a technician's merge): followed, still allowed
    with write_transaction(engine) as conn:
        survivor = new_person(conn)
        conn.execute(person_table.update().where(person_table.c.id == p).values(merged_into=survivor))
        conn.execute(patient_record_table.update().values(person_id=survivor))
    assert claimed() == dict.fromkeys(ids)
    # OAKNH's record split off to another person: its copies name someone else's record
    with write_transaction(engine) as conn:
        conn.execute(patient_record_table.update().where(patient_record_table.c.mrn == "O1").values(person_id=other))
    assert set(claimed().values()) == {"withheld: the destination's record is no longer linked to this person",
                                       None}
    assert claimed()[ids[3]] is None  # names no record of the destination: only the opt-out counts
    # opted out: nothing goes
    with write_transaction(engine) as conn:
        conn.execute(person_table.update().where(person_table.c.id == survivor).values(protected=True))
    assert set(claimed().values()) == {"withheld: the person has opted out"}
    # recorded so: never sent, not counted as an attempt, not requeued by an operator
    run(engine, record_outcomes, [Withheld(ids[0], "withheld: the person has opted out")])
    view = run(engine, get_delivery, ids[0])
    assert (view.state, view.attempts, view.last_error) == (DeliveryState.WITHHELD, 0,
                                                           "withheld: the person has opted out")
    run(engine, mark_failed, ids[1], at=T0, ack_code="AE", ack=b"", error="AE")
    result, view = run(engine, retry, ids[1], "ops-alice", T0 + timedelta(minutes=2), config=CONFIG)
    assert (result, view.state) == (RetryResult.WITHHELD, DeliveryState.FAILED)


def test_the_check_before_each_send_says_what_the_claim_would_say_now(engine: Engine, message_id: int) -> None:
    """send_check (one read for the usual copy, the claim's whole check for the rest) gives each
    copy claimed earlier the answer a claim made now would give, whatever changed since."""
    from exchange.store.schema import patient_record_table, person_table
    from tests.test_reviews import HANSON, add_record, new_person

    with write_transaction(engine) as conn:
        p = add_record(conn, "GENHOSP", "G1", **HANSON)
        add_record(conn, "OAKNH", "O1", p, **HANSON)
        other = new_person(conn)
    ids = queue(engine, [copy_of(message_id, 0, person_id=p, destination_mrn="O1", mrn="G1"),
                         copy_of(message_id, 1, person_id=p, destination_mrn=None, mrn="G1"),
                         copy_of(message_id, 2, person_id=None, destination_mrn=None, mrn="G1")])
    claimed = run(engine, claim_batch, "OAKNH", T0 + timedelta(minutes=1), config=CONFIG).copies
    assert [c.withheld for c in claimed] == [None] * 3

    def agree() -> dict[int, str | None]:
        now = {c.id: c.withheld for c in run(engine, claim_batch, "OAKNH", T0 + timedelta(minutes=1),
                                              config=CONFIG).copies}
        checked = {c.id: getattr(run(engine, send_check, c, CONFIG), "reason", None) for c in claimed}
        assert checked == now
        return checked

    assert agree() == dict.fromkeys(ids)
    with write_transaction(engine) as conn:  # merged into another person: followed, still theirs
        survivor = new_person(conn)
        conn.execute(person_table.update().where(person_table.c.id == p).values(merged_into=survivor))
        conn.execute(patient_record_table.update().values(person_id=survivor))
    assert agree() == dict.fromkeys(ids)
    with write_transaction(engine) as conn:  # OAKNH's record merged away into O2, still theirs
        add_record(conn, "OAKNH", "O2", survivor, **HANSON)
        conn.execute(patient_record_table.update().where(patient_record_table.c.mrn == "O1")
                     .values(active=False, merged_into_mrn="O2"))
    assert agree() == dict.fromkeys(ids)
    with write_transaction(engine) as conn:  # O2 split off to another person
        conn.execute(patient_record_table.update().where(patient_record_table.c.mrn == "O2").values(person_id=other))
    assert agree() == {ids[0]: "withheld: the destination's record is no longer linked to this person",
                       ids[1]: None, ids[2]: None}
    with write_transaction(engine) as conn:  # the sender's G1 split off: what the copies are about is not theirs
        conn.execute(patient_record_table.update().where(patient_record_table.c.mrn == "G1").values(person_id=other))
    assert agree() == {ids[0]: "withheld: the destination's record is no longer linked to this person",
                       ids[1]: "withheld: the record it is about is no longer linked to this person", ids[2]: None}
    with write_transaction(engine) as conn:
        conn.execute(person_table.update().where(person_table.c.id == survivor).values(protected=True))
    assert agree() == {ids[0]: "withheld: the person has opted out", ids[1]: "withheld: the person has opted out",
                       ids[2]: None}


def test_the_check_before_each_send_sees_the_senders_record_leave_the_person(engine: Engine, message_id: int) -> None:
    """The one-read check of the usual copy reads the sender's record too: a split of the
    hospital's G1 while the copy waited behind others withholds it, as the claim would."""
    from exchange.store.schema import patient_record_table
    from tests.test_reviews import HANSON, add_record, new_person

    with write_transaction(engine) as conn:
        p = add_record(conn, "GENHOSP", "G1", **HANSON)
        add_record(conn, "OAKNH", "O1", p, **HANSON)
        other = new_person(conn)
    ids = queue(engine, [copy_of(message_id, 0, person_id=p, destination_mrn="O1", mrn="G1"),
                         copy_of(message_id, 1, person_id=p, destination_mrn="O1", mrn="G-UNKNOWN")])
    claimed = run(engine, claim_batch, "OAKNH", T0 + timedelta(minutes=1), config=CONFIG).copies
    assert [c.withheld for c in claimed] == [None, "withheld: the record it is about is no longer linked to this person"]
    with write_transaction(engine) as conn:
        conn.execute(patient_record_table.update().where(patient_record_table.c.mrn == "G1").values(person_id=other))
    assert run(engine, send_check, claimed[0], CONFIG) == Withheld(
        ids[0], "withheld: the record it is about is no longer linked to this person")
    # a record no longer known (an A47 renamed it after it left the person): someone else's too
    assert run(engine, send_check, claimed[1], CONFIG) == Withheld(
        ids[1], "withheld: the record it is about is no longer linked to this person")


def test_a_requeued_copy_is_given_back_when_a_newer_copy_about_the_patient_was_delivered_since(
        engine: Engine, message_id: int) -> None:
    """Found by a black-box audit: the retry's 409 guard only sees newer copies delivered, not one in
    flight at the requeue; that one was delivered next, and the old A08 after it. The claim (and the
    check just before sending) look again; the operator's force, kept on the row, still sends it."""
    ids = queue(engine, [copy_of(message_id, n) for n in range(3)])  # the same patient (person 7, GENHOSP 100001)
    at = T0 + timedelta(seconds=2)
    run(engine, mark_failed, ids[0], at=at, ack_code="AE", ack=b"MSA|AE", error="AE: busy")
    # ids[1] is in flight: nothing newer has been delivered yet, the requeue is allowed
    assert run(engine, retry, ids[0], "ops-alice", at, config=CONFIG)[0] is RetryResult.REQUEUED
    claimed = run(engine, claim_batch, "OAKNH", at, config=CONFIG).copies
    assert [(c.id, c.requeued, c.superseded) for c in claimed] == [
        (ids[0], True, False), (ids[1], False, False), (ids[2], False, False)]
    run(engine, mark_delivered, ids[1], at=at, ack_code="AA", ack=b"")  # ... and now it is
    [again, *_] = run(engine, claim_batch, "OAKNH", at, config=CONFIG).copies
    assert (again.id, again.superseded) == (ids[0], True)
    assert run(engine, send_check, claimed[0], CONFIG) == Superseded(ids[0])  # just before sending, too
    assert run(engine, send_check, claimed[2], CONFIG) is None
    assert run(engine, record_outcomes, [Superseded(ids[0])]) == 1
    view = run(engine, get_delivery, ids[0])
    assert (view.state, view.last_error, view.attempts, view.ack_code, view.retried_by) == (
        DeliveryState.FAILED, SUPERSEDED, 1, "AE", "ops-alice")
    # the API's guard answers for it now; forced, the requeue is kept as forced and the copy goes
    assert run(engine, retry, ids[0], "ops-alice", at, config=CONFIG)[0] is RetryResult.SUPERSEDED
    assert run(engine, retry, ids[0], "ops-bob", at, config=CONFIG, force=True)[0] is RetryResult.REQUEUED
    with engine.connect() as conn:
        assert conn.execute(select(delivery_table.c.retry_forced).where(delivery_table.c.id == ids[0])).scalar()
    [forced, *_] = run(engine, claim_batch, "OAKNH", at, config=CONFIG).copies
    assert (forced.id, forced.requeued, forced.superseded) == (ids[0], False, False)
    assert run(engine, send_check, forced, CONFIG) is None
