"""GET /api/deliveries, POST /api/deliveries/{id}/retry and the message's
"deliveries", in memory over SQLite and PostgreSQL (tests/web's harness)."""
from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest

from exchange.store.db import write_transaction
from exchange.store.outbox import NewCopy, enqueue, mark_delivered, mark_failed
from exchange.store.schema import person_table
from tests.web.support import T0, Harness, message


@pytest.fixture
def api(engine) -> Harness:
    return Harness(engine)


def copy(message_id: int, n: int, destination: str, person: int | None = 7) -> NewCopy:
    return NewCopy(
        destination=destination,
        message_id=message_id,
        control_id=f"D{n}",
        payload=b"MSH|^~\\&|EXCHANGE|EXCHANGE||" + destination.encode() + b"|||ADT^A01|D%d|P|2.5\r" % n,
        created_at=T0 + timedelta(seconds=n),
        person_id=person,
        facility="GENHOSP",
        mrn="100001",
        reason="default",
    )


@pytest.fixture
def queued(api: Harness) -> list[int]:
    """Four copies of MSG-1: D1 delivered to OAKNH, D2 failed at HHCARE, D3 and D4 queued."""
    [message_id] = api.store(message("MSG-1"))
    with write_transaction(api.engine) as conn:
        ids = enqueue(
            conn,
            [copy(message_id, 1, "OAKNH"), copy(message_id, 2, "HHCARE"), copy(message_id, 3, "OAKNH", None), copy(message_id, 4, "HHCARE", 8)],
        )
        mark_delivered(conn, ids[0], at=T0 + timedelta(seconds=5), ack_code="AA", ack=b"MSA|AA|D1")
        mark_failed(conn, ids[1], at=T0 + timedelta(seconds=6), ack_code="AE", ack=b"MSA|AE|D2", error="AE: unknown MRN")
    return ids


def post(api: Harness, path: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = json.dumps(body).encode() if body is not None else None
    response = api._result(api.stub.post("http://exchange.test" + path, headers=headers, data=data))
    return response.code, json.loads(api._result(response.content()) or b"null")


def test_pages_of_the_list_follow_next(api: Harness, queued: list[int]) -> None:
    """Found by a black-box audit: past 1,000 rows the accounting of disclosures had no next page."""
    token = api.token("olga", "admin")
    seen, after = [], None
    while True:
        code, body, _ = api.get("/api/deliveries?limit=1" + (f"&after={after}" if after else ""), token)
        assert code == 200
        seen += [d["control_id"] for d in body["deliveries"]]
        if body["next"] is None:
            break
        after = body["next"]
    assert seen == ["D4", "D3", "D2", "D1"]  # newest first, each once
    code, body, _ = api.get("/api/deliveries?state=queued&limit=1", token)
    code, body, _ = api.get(f"/api/deliveries?state=queued&limit=1&after={body['next']}", token)
    assert [d["control_id"] for d in body["deliveries"]] == ["D4"]  # queued: oldest first, then the next
    assert api.get("/api/deliveries?after=x", token)[0] == 400


def test_reading_the_accounting_of_disclosures_audits_each_record_it_shows(api: Harness, queued: list[int]) -> None:
    """Found by a black-box audit: only the list's row was written, so "who saw GENHOSP 100001"
    missed every read of the disclosures."""
    token = api.token("olga", "admin")
    assert api.get("/api/deliveries?state=delivered", token)[0] == 200
    rows = [(r["resource"], r["facility"], r["key"]) for r in api.audit()]
    assert rows == [("delivery", None, "state=delivered"), ("record", "GENHOSP", "100001")]


def test_list_by_state_facility_and_person(api: Harness, queued: list[int]) -> None:
    token = api.token("olga", "admin")
    code, body, _ = api.get("/api/deliveries?state=queued", token)
    assert code == 200 and [d["control_id"] for d in body["deliveries"]] == ["D3", "D4"]  # oldest first
    code, body, _ = api.get("/api/deliveries?state=delivered", token)
    [d1] = body["deliveries"]
    assert d1 == {
        "id": queued[0],
        "facility": "OAKNH",
        "state": "delivered",
        "attempts": 1,
        "last_error": None,
        "control_id": "D1",
        "created_at": "2026-11-27T12:00:01.123456Z",
        "next_attempt_at": None,
        "delivered_at": "2026-11-27T12:00:05.123456Z",
        "ack_code": "AA",
        "message": {"facility": "GENHOSP", "control_id": "MSG-1", "type": "ADT^A01"},
        "person": 7,
        "record": {"facility": "GENHOSP", "mrn": "100001"},
        "reason": "default",
        "retried_by": None,
        "retried_at": None,
    }
    code, body, _ = api.get("/api/deliveries?state=failed&facility=HHCARE", token)
    assert [(d["control_id"], d["last_error"]) for d in body["deliveries"]] == [("D2", "AE: unknown MRN")]
    assert api.get("/api/deliveries?state=failed&facility=OAKNH", token)[1] == {"deliveries": [], "next": None}
    assert [d["control_id"] for d in api.get("/api/deliveries?person=8", token)[1]["deliveries"]] == ["D4"]
    assert [d["control_id"] for d in api.get("/api/deliveries", token)[1]["deliveries"]] == ["D4", "D3", "D2", "D1"]
    # person 7 merged into 8 (an A40 emptied it), and 8 into 9: the patient's disclosures are 9's too
    # (found by a soak audit: listed only under the merged-away person)
    with write_transaction(api.engine) as conn:
        for person, into in ((9, None), (8, 9), (7, 8)):
            conn.execute(person_table.insert().values(id=person, created_at=T0, merged_into=into))
    assert [d["control_id"] for d in api.get("/api/deliveries?person=9", token)[1]["deliveries"]] == ["D4", "D2", "D1"]
    assert [d["control_id"] for d in api.get("/api/deliveries?person=8", token)[1]["deliveries"]] == ["D4", "D2", "D1"]
    assert [d["control_id"] for d in api.get("/api/deliveries?person=7", token)[1]["deliveries"]] == ["D2", "D1"]
    assert [d["control_id"] for d in api.get("/api/deliveries?limit=1", token)[1]["deliveries"]] == ["D4"]
    # every read is audited, with what was asked for
    rows = [r for r in api.audit() if r["resource"] == "delivery"]  # each list read's own row (records: above)
    assert [(r["actor"], r["action"], r["resource"], r["outcome"]) for r in rows] == [("olga", "read", "delivery", "ok")] * 10
    assert [(r["facility"], r["key"]) for r in rows[:5]] == [
        (None, "state=queued"), (None, "state=delivered"), ("HHCARE", "state=failed"), ("OAKNH", "state=failed"), (None, "person=8")
    ]


@pytest.mark.parametrize(
    "query, reason",
    [
        ("state=sent", "state must be one of queued, delivered, failed, withheld"),
        ("person=abc", "a person id is a number"),
        ("limit=0", "limit must be a number from 1 to 1000"),
        ("limit=5000", "limit must be a number from 1 to 1000"),
        ("facility=", "facility must be a facility code"),
        ("facility=A%01B", "facility must be a facility code"),
    ],
)
def test_bad_queries_400(api: Harness, query: str, reason: str) -> None:
    token = api.token("olga", "admin")
    assert api.get(f"/api/deliveries?{query}", token)[:2] == (400, {"error": reason})


def test_who_may_read_and_retry(api: Harness, queued: list[int]) -> None:
    assert api.get("/api/deliveries")[0] == 401
    assert post(api, f"/api/deliveries/{queued[1]}/retry", None)[0] == 401
    tess = api.token("tess", "technician")
    assert api.get("/api/deliveries?state=failed", tess)[:2] == (403, {"error": "this role may not read deliveries"})
    assert post(api, f"/api/deliveries/{queued[1]}/retry", tess) == (403, {"error": "this role may not retry deliveries"})
    assert [(r["actor"], r["action"], r["outcome"], r["key"]) for r in api.audit()] == [
        ("tess", "read", "forbidden", "state=failed"),
        ("tess", "decide", "forbidden", str(queued[1])),
    ]


def failed_then_delivered(engine, api: Harness, destinations: tuple[str, str], error: str) -> tuple[int, int]:
    """Two copies of one message: the first (to ``destinations[0]``) failed with ``error``, the
    second (to ``destinations[1]``) delivered."""
    [message_id] = api.store(message("MSG-1"))
    with write_transaction(engine) as conn:
        [failed, delivered] = enqueue(conn, [copy(message_id, n, dest) for n, dest in enumerate(destinations, 1)])
        mark_failed(conn, failed, at=T0, ack_code=error[:2], ack=b"", error=error)
        mark_delivered(conn, delivered, at=T0, ack_code="AA", ack=b"")
    return failed, delivered


def test_retry_a_failed_copy(engine) -> None:
    api = Harness(engine)
    failed, delivered = failed_then_delivered(engine, api, ("HHCARE", "OAKNH"), "AR: not accepted")
    woken = []
    api.api.requeued = woken.append
    token = api.token("olga", "admin")

    code, body = post(api, f"/api/deliveries/{failed}/retry", token)
    assert code == 200
    assert (body["state"], body["retried_by"], body["attempts"], body["last_error"]) == ("queued", "olga", 1, "AR: not accepted")
    assert body["next_attempt_at"] == body["retried_at"] == "2026-11-27T13:00:00.123456Z"
    assert woken == ["HHCARE"]  # its worker is told at once

    code, body = post(api, f"/api/deliveries/{failed}/retry", token)
    assert code == 409 and body["error"] == "only a failed delivery can be retried (this one is queued)"
    assert body["delivery"]["id"] == failed
    assert post(api, f"/api/deliveries/{delivered}/retry", token)[0] == 409
    assert post(api, "/api/deliveries/999999/retry", token) == (404, {"error": "no such delivery"})
    assert post(api, "/api/deliveries/abc/retry", token) == (400, {"error": "a delivery id is a number"})
    assert api.get(f"/api/deliveries/{failed}/retry", token)[0] == 405
    assert woken == ["HHCARE"]
    # each answer showed the copy, and with it the record it is about (found by a privacy audit:
    # only the decision's row was written)
    assert [(r["resource"], r["facility"], r["key"], r["outcome"]) for r in api.audit()] == [
        ("delivery", "HHCARE", str(failed), "ok"), ("record", "GENHOSP", "100001", "ok"),
        ("delivery", "HHCARE", str(failed), "invalid"), ("record", "GENHOSP", "100001", "invalid"),
        ("delivery", "OAKNH", str(delivered), "invalid"), ("record", "GENHOSP", "100001", "invalid"),
        ("delivery", None, "999999", "not-found"),
    ]


def test_a_retry_after_newer_copies_about_the_patient_needs_force(engine) -> None:
    """Found by a black-box audit: an old A08 retried after the admit and the discharge went out
    landed last, its old demographics over the new."""
    api = Harness(engine)
    failed, _ = failed_then_delivered(engine, api, ("OAKNH", "OAKNH"), "AE: busy")
    token = api.token("olga", "admin")
    code, body = post(api, f"/api/deliveries/{failed}/retry", token)
    assert code == 409 and body["error"].startswith("newer copies about this patient reached the destination since")
    assert body["delivery"]["state"] == "failed" and '"force": true' in body["error"]
    assert post(api, f"/api/deliveries/{failed}/retry", token, {"force": "yes"}) == (
        422, {"error": "force must be true or false"})
    assert post(api, f"/api/deliveries/{failed}/retry", token, {"forse": True})[0] == 422
    code, body = post(api, f"/api/deliveries/{failed}/retry", token, {"force": True})
    assert code == 200 and body["state"] == "queued" and body["retried_by"] == "olga"
    assert forced(engine, failed)  # kept with the requeue: the worker sends it whatever went since


def forced(engine, delivery_id: int) -> bool:
    from sqlalchemy import select

    from exchange.store.schema import delivery_table

    with engine.connect() as conn:
        return conn.execute(select(delivery_table.c.retry_forced).where(delivery_table.c.id == delivery_id)).scalar()


def test_a_retry_the_api_allowed_is_given_back_by_the_worker_if_a_newer_copy_went_first(engine) -> None:
    """The 409 guard sees newer copies delivered, not one in flight: a retry it allowed is not forced,
    and the worker gives it back (failed, the same reason in its words) if a newer copy about the
    patient reaches the destination first (tests/delivery/test_worker.py plays the race)."""
    from exchange.store.outbox import SUPERSEDED, Superseded, record_outcomes

    api = Harness(engine)
    [message_id] = api.store(message("MSG-1"))
    with write_transaction(engine) as conn:
        [failed, newer] = enqueue(conn, [copy(message_id, 1, "OAKNH"), copy(message_id, 2, "OAKNH")])
        mark_failed(conn, failed, at=T0, ack_code="AE", ack=b"", error="AE: busy")
    token = api.token("olga", "admin")
    code, body = post(api, f"/api/deliveries/{failed}/retry", token)  # the newer copy: queued (in flight)
    assert code == 200 and body["state"] == "queued" and not forced(engine, failed)
    with write_transaction(engine) as conn:
        mark_delivered(conn, newer, at=T0, ack_code="AA", ack=b"")
        record_outcomes(conn, [Superseded(failed)])  # what the worker records instead of sending it
    code, body, _ = api.get("/api/deliveries?state=failed", token)
    [d] = body["deliveries"]
    assert (d["id"], d["last_error"], d["retried_by"]) == (failed, SUPERSEDED, "olga")
    assert SUPERSEDED.startswith("superseded: newer copies about this patient reached the destination since")
    code, body = post(api, f"/api/deliveries/{failed}/retry", token)  # the common case: the API's 409
    assert code == 409 and body["error"].startswith("newer copies about this patient reached the destination since")
    assert post(api, f"/api/deliveries/{failed}/retry", token, {"force": True})[0] == 200 and forced(engine, failed)


def test_a_failed_copy_the_configuration_no_longer_sends_is_not_requeued(engine) -> None:
    """Found by a black-box audit: a failed copy for a facility no longer configured was requeued."""
    from dataclasses import replace

    api = Harness(engine)
    [message_id] = api.store(message("MSG-1"))
    with write_transaction(engine) as conn:
        [failed] = enqueue(conn, [copy(message_id, 1, "HHCARE")])
        mark_failed(conn, failed, at=T0, ack_code="AR", ack=b"", error="AR: not accepted")
    woken = []
    api.api.requeued = woken.append
    running = api.api.config
    token = api.token("olga", "admin")
    for facilities in (tuple(f for f in running.facilities if f.code != "HHCARE"),  # HHCARE removed
                       tuple(replace(f, subscribe=("MDM^*",)) for f in running.facilities)):  # no ADT any more
        api.api.config = replace(running, facilities=facilities)
        code, body = post(api, f"/api/deliveries/{failed}/retry", token)
        assert code == 409 and body["error"] == (
            "this copy may not go out any more: the person has opted out, the destination's record is no"
            " longer linked to them, or the configuration no longer sends it there")
        assert (body["delivery"]["state"], body["delivery"]["retried_by"]) == ("failed", None)
    assert woken == []
    api.api.config = running
    assert post(api, f"/api/deliveries/{failed}/retry", token)[0] == 200
    assert [(r["facility"], r["outcome"]) for r in api.audit() if r["resource"] == "delivery"] == \
        [("HHCARE", "invalid")] * 2 + [("HHCARE", "ok")]


def test_the_message_lists_its_deliveries(api: Harness, queued: list[int]) -> None:
    token = api.token("olga", "admin")
    code, body, _ = api.get("/api/messages/GENHOSP/MSG-1", token)
    assert code == 200
    assert [{k: d[k] for k in ("facility", "state", "attempts", "last_error", "control_id")} for d in body["deliveries"]] == [
        {"facility": "OAKNH", "state": "delivered", "attempts": 1, "last_error": None, "control_id": "D1"},
        {"facility": "HHCARE", "state": "failed", "attempts": 1, "last_error": "AE: unknown MRN", "control_id": "D2"},
        {"facility": "OAKNH", "state": "queued", "attempts": 0, "last_error": None, "control_id": "D3"},
        {"facility": "HHCARE", "state": "queued", "attempts": 0, "last_error": None, "control_id": "D4"},
    ]
    assert body["deliveries"][0]["delivered_at"] == "2026-11-27T12:00:05.123456Z"


def test_a_message_read_audits_the_records_its_copies_name(api: Harness) -> None:
    """Found by a privacy audit: a destination's NAK quoting the copy's PID showed through
    /api/messages as last_error, and the audit named no record at all."""
    from dataclasses import replace

    [message_id] = api.store(message("MSG-1"))
    with write_transaction(api.engine) as conn:
        [failed] = enqueue(conn, [replace(copy(message_id, 1, "HHCARE"), destination_mrn="HH-77")])
        mark_failed(conn, failed, at=T0, ack_code="AE", ack=b"MSA|AE|D1", error="AE: HH-77 DOE^JANE rejected")
    token = api.token("olga", "admin")
    assert api.get("/api/messages/GENHOSP/MSG-1", token)[0] == 200
    assert [(r["resource"], r["facility"], r["key"]) for r in api.audit()] == [
        ("message", "GENHOSP", "MSG-1"), ("record", "GENHOSP", "100001"), ("record", "HHCARE", "HH-77")]


def test_a_patients_disclosures_follow_the_patients_records_not_a_wrong_link(api: Harness) -> None:
    """A privacy audit: HH-11, wrongly linked to another patient's person, was split off; the copies
    of its registration stayed listed under the other patient (another patient's disclosure in his
    accounting) and the split-off patient's own accounting was empty."""
    from sqlalchemy import text

    from tests.test_reviews import add_record

    token = api.token("olga", "admin")
    [message_id] = api.store(message("MSG-9"))
    with write_transaction(api.engine) as conn:
        wrong = add_record(conn, "GENHOSP", "GH-11")
        add_record(conn, "HHCARE", "HH-11", wrong)
        ids = enqueue(conn, [
            replace(copy(message_id, 91, "OAKNH", wrong), facility="HHCARE", mrn="HH-11"),
            replace(copy(message_id, 92, "OAKNH", wrong), facility="GENHOSP", mrn="GH-11"),
            replace(copy(message_id, 93, "OAKNH", wrong), facility="GENHOSP", mrn="GH-OLD")])  # renamed since
        for id_ in ids:
            mark_delivered(conn, id_, at=T0, ack_code="AA", ack=b"")
        own = add_record(conn, "CLINIC", "C-1")  # the split: HH-11 goes to a person of its own
        conn.execute(text("update patient_record set person_id = :p where mrn = 'HH-11'"), {"p": own})

    def listed(person: int) -> list[str]:
        return [d["control_id"] for d in api.get(f"/api/deliveries?state=delivered&person={person}", token)[1][
            "deliveries"]]

    assert listed(own) == ["D91"] and listed(wrong) == ["D93", "D92"]
    # a record GENHOSP merged into GH-11 (A40) follows its survivor, wherever its own person was left
    # (a last verification audit: after a split of the survivor, listed under the person it left)
    with write_transaction(api.engine) as conn:
        left = add_record(conn, "GENHOSP", "GH-12", active=False)
        conn.execute(text("update patient_record set merged_into_mrn = 'GH-11' where mrn = 'GH-12'"))
        [merged_copy] = enqueue(conn, [replace(copy(message_id, 94, "OAKNH", left), facility="GENHOSP", mrn="GH-12")])
        mark_delivered(conn, merged_copy, at=T0, ack_code="AA", ack=b"")
    assert listed(wrong) == ["D94", "D93", "D92"] and listed(left) == []
    with write_transaction(api.engine) as conn:
        split = add_record(conn, "CLINIC", "C-2")
        conn.execute(text("update patient_record set person_id = :p where mrn = 'GH-11'"), {"p": split})
    assert listed(split) == ["D94", "D92"] and listed(wrong) == ["D93"]
