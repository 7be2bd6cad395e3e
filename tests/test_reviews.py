"""exchange.store.reviews on SQLite and PostgreSQL: the review queue, every technician
decision and its undo, the person's best view (survivorship), the history and the export.

The patient-index tables are seeded directly, with rows as the writer writes them
(exchange.store.index): records with their person, link, score and encoded features;
reviews whose detail holds every candidate's ``Score.explain()`` and the thresholds.
All names and numbers are synthetic.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Connection, insert, select, update

from exchange.mapping.values import Address, Identifier, PersonName, Phone, timestamp
from exchange.matching.features import encode_features, features_of
from exchange.matching.model import default_model, score
from exchange.store import reviews
from exchange.store.db import write_transaction
from exchange.store.records import to_json
from exchange.store.schema import (
    link_event_table as link_event,
    match_pair_table as match_pair,
    match_review_table as match_review,
    patient_record_table as patient_record,
    person_table as person,
)

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
NOW = T0 + timedelta(hours=2)

HANSON = dict(family="HANSON", given="ELIZABETH", birth="19470312", sex="F", street="12 ELM ST", city="SPRINGFIELD",
              postcode="62701", phone="555-0100", ssn="123-45-6789")


# --- seeding: rows as the writer writes them ------------------------------------------------------


def record_dict(*, family="", given="", middle="", suffix="", birth="", sex="", street="", city="", postcode="",
                phone="", ssn="", mrn="", authority=""):
    """A MemoryState-shaped record dict (what records.save stores as data, minus encounters)."""
    return {
        "active": True,
        "merged_into": None,
        "identifiers": (Identifier(mrn, authority, type_code="MR"),) if mrn else (),
        "merged_identifiers": (),
        "previous_mrns": (),
        "name": PersonName(family=family, given=given, middle=middle, suffix=suffix) if family or given else None,
        "aliases": (),
        "mother_maiden_name": None,
        "birth": timestamp(birth) if birth else None,
        "sex": sex or None,
        "addresses": (Address(street=street, city=city, postal_code=postcode),) if street or city else None,
        "phones": (Phone(number=phone),) if phone else None,
        "account": None,
        "ssn": ssn or None,
        "death": None,
        "deceased": None,
    }


def new_person(conn: Connection, at: datetime = T0) -> int:
    return conn.execute(insert(person).values(created_at=at)).inserted_primary_key[0]


def add_record(conn: Connection, facility: str, mrn: str, person_id: int | None = None, *, link: str = "auto",
               score_: float | None = None, updated_at: datetime = T0, active: bool = True, **demo) -> int:
    """A patient_record row (and a person of its own unless ``person_id``); returns its person."""
    if person_id is None:
        person_id = new_person(conn)
    rec = record_dict(mrn=mrn, authority=facility, **demo)
    rec["active"] = active
    conn.execute(insert(patient_record).values(
        facility=facility, mrn=mrn, authority=facility, person_id=person_id, active=active, merged_into_mrn=None,
        created_at=T0, updated_at=updated_at, data=to_json(rec), family_name=demo.get("family"),
        given_name=demo.get("given"), sex=demo.get("sex"), ssn=demo.get("ssn"), link=link, link_score=score_,
        features=encode_features(features_of(rec)),
    ))
    return person_id


def _features(conn: Connection, key):
    from exchange.matching.features import decode_features

    text = conn.execute(select(patient_record.c.features).where(
        patient_record.c.facility == key[0], patient_record.c.mrn == key[1])).scalar_one()
    return decode_features(text)


def person_of(conn: Connection, key) -> int:
    return conn.execute(select(patient_record.c.person_id).where(
        patient_record.c.facility == key[0], patient_record.c.mrn == key[1])).scalar_one()


def add_review(conn: Connection, key, candidates, *, kind: str = "candidate", suggestion: int | None = None,
               reasons=("between_thresholds",), state: str = "open") -> int:
    """A match_review row as the writer opens it: every candidate scored with the default model."""
    model = default_model()
    f = _features(conn, key)
    cands = []
    for c in candidates:
        s = score(f, _features(conn, c), model)
        cands.append({"facility": c[0], "mrn": c[1], "person": person_of(conn, c), "score": s.total,
                      "explain": s.explain()})
    cands.sort(key=lambda c: -c["score"])
    if suggestion is None and cands:
        suggestion = cands[0]["person"]
    detail = {
        "record": {"facility": key[0], "mrn": key[1], "person": person_of(conn, key)},
        "candidates": cands,
        "reasons": list(reasons),
        "action": "review",
        "thresholds": {"upper": model.upper, "lower": model.lower},
    }
    return conn.execute(insert(match_review).values(
        state=state, kind=kind, facility=key[0], mrn=key[1], person_id=suggestion,
        score=cands[0]["score"] if cands else None, detail=detail, created_at=T0,
    )).inserted_primary_key[0]


def add_auto_event(conn: Connection, key, from_person, to_person) -> int:
    """An automatic link event as the writer writes it (actor "exchange", its own decision)."""
    return conn.execute(insert(link_event).values(
        decision=None, kind="auto", facility=key[0], mrn=key[1], from_person=from_person, to_person=to_person,
        from_link=None, to_link="auto", score=25.0, actor="exchange", reason="above_upper", at=T0,
    )).inserted_primary_key[0]


def record_row(conn: Connection, key):
    return conn.execute(select(patient_record).where(
        patient_record.c.facility == key[0], patient_record.c.mrn == key[1])).one()


def pairs(conn: Connection, active: bool | None = True) -> set:
    query = select(match_pair)
    if active is not None:
        query = query.where(match_pair.c.active == active)
    return {((r.facility, r.mrn), (r.other_facility, r.other_mrn)) for r in conn.execute(query)}


GH, OA, HH = ("GENHOSP", "GH-44107"), ("OAKNH", "OA917082"), ("HHCARE", "HH-3391")


def hanson_scene(conn: Connection) -> dict:
    """The issue's woman at three sites: the hospital's record linked automatically with the
    home-health one; the nursing home's in a review suggesting that person."""
    p = add_record(conn, *GH, **HANSON)
    add_record(conn, *HH, p, score_=31.0, **{**HANSON, "family": "HANSON-MOORE", "phone": ""})
    oa = add_record(conn, *OA, **{**HANSON, "given": "LIZ", "family": "HANSEN", "ssn": ""})
    review = add_review(conn, OA, [GH, HH])
    return {"person": p, "oa_person": oa, "review": review}


@pytest.fixture
def tx(engine):
    """A connection inside one write transaction (rolled back afterwards)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(exchange_sqlite_begin="IMMEDIATE")
        with conn.begin() as t:
            yield conn
            t.rollback()


def decide(conn, review_id, verdict, **kw):
    kw.setdefault("actor", "tess")
    kw.setdefault("now", NOW)
    return reviews.decide_review(conn, review_id, verdict, **kw)


def refused(status: int, fn, *args, **kwargs) -> str:
    with pytest.raises(reviews.DecisionError) as info:
        fn(*args, **kwargs)
    assert info.value.status == status, info.value.reason
    return info.value.reason


# --- the queue --------------------------------------------------------------------------------------


def test_list_reviews_by_state_with_paging(tx):
    s = hanson_scene(tx)
    p2 = add_record(tx, "GENHOSP", "GH-2", family="DOE", given="JANE", birth="19800101")
    add_record(tx, "OAKNH", "OA-2", family="DOE", given="JANE", birth="19800110")
    second = add_review(tx, ("OAKNH", "OA-2"), [("GENHOSP", "GH-2")], suggestion=p2)
    add_review(tx, ("OAKNH", "OA-2"), [("GENHOSP", "GH-2")], state="superseded")

    open_ = reviews.list_reviews(tx)
    assert [r["id"] for r in open_] == [s["review"], second]
    first = open_[0]
    assert first["records"] == [{"facility": "OAKNH", "mrn": "OA917082"}, {"facility": "GENHOSP", "mrn": "GH-44107"},
                                {"facility": "HHCARE", "mrn": "HH-3391"}]
    assert first["state"] == "open" and first["reasons"] == ["between_thresholds"]
    assert isinstance(first["score"], float) and first["person"] == s["person"]
    assert [r["id"] for r in reviews.list_reviews(tx, limit=1)] == [s["review"]]
    assert [r["id"] for r in reviews.list_reviews(tx, after=s["review"])] == [second]
    assert [r["state"] for r in reviews.list_reviews(tx, "superseded")] == ["superseded"]
    assert len(reviews.list_reviews(tx, None)) == 3
    with pytest.raises(ValueError):
        reviews.list_reviews(tx, "closed")


def test_review_detail_shows_the_records_side_by_side(tx):
    s = hanson_scene(tx)
    d = reviews.review_detail(tx, s["review"])
    assert d["id"] == s["review"] and d["state"] == "open" and d["kind"] == "candidate"
    assert d["thresholds"] == {"upper": 20.0, "lower": 8.0}
    assert d["record"]["facility"] == "OAKNH" and d["record"]["person"] == s["oa_person"]
    assert d["record"]["demographics"]["name"]["family"] == "HANSEN"
    gh = d["candidates"][0]
    assert (gh["facility"], gh["mrn"], gh["person"], gh["link"]) == ("GENHOSP", "GH-44107", s["person"], "auto")
    assert gh["demographics"]["ssn_last4"] == "6789"
    assert {f["field"] for f in gh["fields"]} >= {"family", "given", "birth", "ssn", "address", "phone"}
    by_field = {c["field"]: c for c in d["comparison"]}
    assert by_field["given"]["record"] == "LIZ"
    assert by_field["given"]["candidates"][0] == {"value": "ELIZABETH", "level": "nickname",
                                                  "weight": by_field["given"]["candidates"][0]["weight"],
                                                  "discounted": False}
    assert by_field["birth"]["candidates"][0]["level"] == "exact"
    assert by_field["ssn"]["candidates"][0]["value"] == "***-**-6789"
    text = repr(d)
    assert "123-45-6789" not in text and "123456789" not in text  # never the full SSN
    assert d["decision_id"] is None and d["decisions"] == []
    assert reviews.review_detail(tx, 987654) is None


# --- link -------------------------------------------------------------------------------------------


def test_link_to_the_suggestion_is_manual_recorded_and_resolves_the_review(tx):
    s = hanson_scene(tx)
    out = decide(tx, s["review"], "link", reason="same woman, nickname and married name")
    rec = record_row(tx, OA)
    assert (rec.person_id, rec.link) == (s["person"], "manual")
    assert rec.link_score == max(c["score"] for c in out["candidates"])
    assert out["state"] == "resolved" and out["decision"] == "link" and out["decided_by"] == "tess"
    assert out["note"] == "same woman, nickname and married name"
    assert out["decided_at"] == "2026-11-27T14:00:00Z"
    [event] = tx.execute(select(link_event)).all()
    assert out["decision_id"] == event.id and event.decision is None
    assert (event.kind, event.actor, event.from_person, event.to_person, event.from_link, event.to_link) == (
        "link", "tess", s["oa_person"], s["person"], "auto", "manual")
    assert event.review_id == s["review"] and event.at == NOW
    assert refused(409, decide, tx, s["review"], "not-a-match").startswith(f"review {s['review']} is resolved by tess")


def test_link_to_a_named_person_or_a_candidates_person(tx):
    s = hanson_scene(tx)
    other = add_record(tx, "GENHOSP", "GH-9", family="X", given="Y")
    assert "no person 99999" in refused(422, decide, tx, s["review"], "link", person_id=99999)
    assert "not a candidate" in refused(422, decide, tx, s["review"], "link", candidate=("GENHOSP", "GH-9"))
    assert "not both" in refused(422, decide, tx, s["review"], "link", person_id=other, candidate=GH)
    out = decide(tx, s["review"], "link", candidate=HH)
    assert out["record"]["person"] == s["person"]

    p = add_record(tx, "OAKNH", "OA-3", family="DOE", given="JOHN", birth="19600101")
    q = add_record(tx, "HHCARE", "HH-3", family="DOE", given="JON", birth="19600101")
    r = add_review(tx, ("HHCARE", "HH-3"), [("OAKNH", "OA-3")])
    decide(tx, r, "link", person_id=p)
    assert person_of(tx, ("HHCARE", "HH-3")) == p != q


def test_a_link_that_takes_a_record_away_asks_about_the_records_linked_through_it(tx):
    """Found by a soak audit: the hospital's Donna waited in a review against the clinic's
    Donsa; the nursing home's Donna was linked to the hospital's meanwhile. The technician linked
    the hospital's Donna to the clinic's person, and the nursing home's record stayed alone in
    the old person, in no review: the hospital's next admission never reached the home."""
    donna = dict(family="HARGROVE", given="DONNA", birth="19580214", sex="F", street="4 LARCH RD",
                 city="SALEM", postcode="01970", phone="555-0160")
    clinic = add_record(tx, "HHCARE", "HH-D", **{**donna, "given": "DONSA"})
    old = add_record(tx, "GENHOSP", "GH-D", **donna)
    add_record(tx, "OAKNH", "OA-D", old, score_=40.0, **donna)
    r = add_review(tx, ("GENHOSP", "GH-D"), [("HHCARE", "HH-D")])
    decision = decide(tx, r, "link", candidate=("HHCARE", "HH-D"))
    assert person_of(tx, ("GENHOSP", "GH-D")) == clinic and person_of(tx, ("OAKNH", "OA-D")) == old
    [left] = reviews.list_reviews(tx)
    assert (left["kind"], left["person"], left["records"][0]) == ("link_looks_wrong", old,
                                                                  {"facility": "OAKNH", "mrn": "OA-D"})
    assert {"facility": "GENHOSP", "mrn": "GH-D"} in left["records"]  # the technician can follow it
    assert f"decision {decision['decision_id']} linked GENHOSP GH-D" in left["reasons"][1]
    # a record that still scores well against what stays with it is left alone
    p = add_record(tx, "GENHOSP", "GH-H", **HANSON)
    add_record(tx, "OAKNH", "OA-H", p, **HANSON)
    add_record(tx, "HHCARE", "HH-H", p, **HANSON)
    elsewhere = add_record(tx, "CLINIC", "C-1", family="HANSON", given="BETH", birth="19470312")
    r2 = add_review(tx, ("HHCARE", "HH-H"), [("CLINIC", "C-1")])
    decide(tx, r2, "link", person_id=elsewhere, force=True)
    assert len(reviews.list_reviews(tx)) == 1


def test_link_follows_a_merged_suggestion(tx):
    s = hanson_scene(tx)
    keeper = add_record(tx, "GENHOSP", "GH-OTHER", family="Q", given="R")
    reviews.merge_persons(tx, keeper, s["person"], actor="tess", now=NOW, force=True)
    out = decide(tx, s["review"], "link")
    assert out["record"]["person"] == keeper


def test_link_refuses_two_records_of_one_facility_unless_forced(tx):
    p = add_record(tx, "GENHOSP", "GH-1", **HANSON)
    add_record(tx, "GENHOSP", "GH-2", **HANSON)
    r = add_review(tx, ("GENHOSP", "GH-2"), [("GENHOSP", "GH-1")], kind="duplicate", reasons=("same_facility",))
    reason = refused(409, decide, tx, r, "link")
    assert "two records of one facility" in reason and '"force": true' in reason
    assert tx.execute(select(link_event)).all() == []  # nothing written
    decide(tx, r, "link", force=True)
    assert person_of(tx, ("GENHOSP", "GH-2")) == p


def test_link_refuses_a_sticky_not_a_match_unless_forced(tx):
    s = hanson_scene(tx)
    tx.execute(insert(match_pair).values(facility="OAKNH", mrn="OA917082", other_facility="HHCARE",
                                         other_mrn="HH-3391", active=True, decision_id=None))
    assert "the facility (A37)" in refused(409, decide, tx, s["review"], "link")
    decide(tx, s["review"], "link", force=True)
    assert person_of(tx, OA) == s["person"]


def test_link_to_its_own_person_confirms_the_link(tx):
    p = add_record(tx, *GH, **HANSON)
    add_record(tx, *HH, p, **{**HANSON, "birth": "19741203", "given": "ELISE"})
    r = add_review(tx, HH, [GH], kind="link_looks_wrong", suggestion=p, reasons=("link_looks_wrong",))
    decide(tx, r, "link")
    row = record_row(tx, HH)
    assert (row.person_id, row.link) == (p, "manual")


def test_a_review_of_a_record_its_facility_merged_away_is_not_decided(tx):
    """The facility's A40 has answered it; a technician's decision would pull the retired
    record away from its survivor's person (a review opened before merges superseded them)."""
    s = hanson_scene(tx)
    tx.execute(patient_record.update().where(patient_record.c.mrn == OA[1]).values(active=False, merged_into_mrn="X"))
    for verdict in ("link", "not-a-match"):
        assert "merged away" in refused(409, decide, tx, s["review"], verdict)
    assert record_row(tx, OA).person_id == s["oa_person"]


def a40_scene(conn: Connection) -> dict:
    """OAKNH's Z2 in a duplicate review (candidates its Z1 and the hospital's record), then
    OAKNH merged Z1 into Z2 (A40): Z1 inactive in Z2's person, Z1's person left empty."""
    z1, z2, gh = ("OAKNH", "Z1"), ("OAKNH", "Z2"), ("GENHOSP", "Z1")
    p = add_record(conn, *gh, **HANSON)
    emptied = add_record(conn, *z1, **{**HANSON, "given": "ELISE"})
    q = add_record(conn, *z2, **{**HANSON, "given": "ELISE"})
    review = add_review(conn, z2, [z1, gh], kind="duplicate", suggestion=emptied, reasons=("same_facility",))
    conn.execute(patient_record.update().where(patient_record.c.facility == "OAKNH", patient_record.c.mrn == "Z1")
                 .values(active=False, merged_into_mrn="Z2", person_id=q))
    return {"review": review, "hospital": p, "emptied": emptied, "survivor": q}


def test_a_link_to_a_merged_away_candidate_or_an_emptied_person_is_refused(tx):
    """Found by a black-box audit: a review left open after an A40 was decided, moving the
    survivor into the person the A40 emptied, away from its retired MRN."""
    s = a40_scene(tx)
    assert "holds no active record" in refused(409, decide, tx, s["review"], "link")  # the suggestion
    assert "holds no active record" in refused(409, decide, tx, s["review"], "link", person_id=s["emptied"])
    reason = refused(409, decide, tx, s["review"], "link", candidate=("OAKNH", "Z1"))
    assert "OAKNH Z1 was merged away by its facility (into Z2)" in reason
    assert person_of(tx, ("OAKNH", "Z2")) == s["survivor"] and tx.execute(select(link_event)).all() == []
    decide(tx, s["review"], "link", candidate=("GENHOSP", "Z1"))  # a person with an active record: a decision
    assert person_of(tx, ("OAKNH", "Z2")) == s["hospital"]


def test_the_actor_and_reason_are_checked(tx):
    s = hanson_scene(tx)
    assert "reserved" in refused(422, decide, tx, s["review"], "link", actor="exchange")
    assert refused(422, decide, tx, s["review"], "link", actor=" ")
    assert refused(422, decide, tx, s["review"], "link", reason="x" * 2001)
    assert refused(422, decide, tx, s["review"], "maybe")
    assert refused(404, decide, tx, 424242, "link") == "no review 424242"


# --- not a match ---------------------------------------------------------------------------------------


def test_not_a_match_writes_sticky_pairs_both_ways_and_moves_nothing(tx):
    s = hanson_scene(tx)
    out = decide(tx, s["review"], "not-a-match", reason="different mothers")
    assert pairs(tx) == {(OA, GH), (GH, OA), (OA, HH), (HH, OA)}
    assert {r.decision_id for r in tx.execute(select(match_pair))} == {out["decision_id"]}
    row = record_row(tx, OA)
    assert (row.person_id, row.link) == (s["oa_person"], "auto")
    [event] = tx.execute(select(link_event)).all()
    assert (event.kind, event.from_person, event.to_person, event.reason) == (
        "not-a-match", s["oa_person"], s["oa_person"], "different mothers")
    assert out["state"] == "resolved" and out["decision"] == "not-a-match"


def test_not_a_match_splits_a_record_that_shares_the_person(tx):
    p = add_record(tx, *GH, **HANSON)
    add_record(tx, *HH, p, **{**HANSON, "birth": "19741203", "given": "ELISE"})
    r = add_review(tx, HH, [GH], kind="link_looks_wrong", suggestion=p, reasons=("link_looks_wrong",))
    decide(tx, r, "not-a-match")
    row = record_row(tx, HH)
    assert row.person_id != p and row.link == "manual"
    assert person_of(tx, GH) == p
    assert pairs(tx) == {(HH, GH), (GH, HH)}


# --- split and merge -------------------------------------------------------------------------------------


def test_split_a_record_off_its_person(tx):
    p = add_record(tx, *GH, **HANSON)
    add_record(tx, *HH, p, **HANSON)
    add_record(tx, *OA, p, link="manual", **HANSON)
    out = reviews.split_record(tx, p, *HH, actor="tess", now=NOW, reason="twin sister")
    new = out["person"]
    row = record_row(tx, HH)
    assert (row.person_id, row.link) == (new, "manual") and new != p
    assert pairs(tx) == {(HH, GH), (GH, HH), (HH, OA), (OA, HH)}
    assert out["kind"] == "split" and out["actor"] == "tess" and out["reason"] == "twin sister"
    assert [(e["facility"], e["from_person"], e["to_person"]) for e in out["events"]] == [("HHCARE", p, new)]
    assert out["undoable"] is True


def test_split_refusals(tx):
    p = add_record(tx, *GH, **HANSON)
    q = add_record(tx, *HH, **HANSON)
    assert refused(404, reviews.split_record, tx, 99999, *GH, actor="tess", now=NOW) == "no person 99999"
    assert refused(404, reviews.split_record, tx, p, "GENHOSP", "NOPE", actor="tess", now=NOW)
    assert "belongs to person" in refused(409, reviews.split_record, tx, p, *HH, actor="tess", now=NOW)
    assert "only active record" in refused(422, reviews.split_record, tx, q, *HH, actor="tess", now=NOW)
    assert p != q


def test_merge_two_persons(tx):
    keep = add_record(tx, *GH, **HANSON)
    merge = add_record(tx, *OA, **HANSON)
    add_record(tx, *HH, merge, link="source", **HANSON)
    out = reviews.merge_persons(tx, keep, merge, actor="tess", now=NOW, reason="same woman")
    assert out["person"] == keep and out["kind"] == "merge"
    for key in (OA, HH):
        row = record_row(tx, key)
        assert (row.person_id, row.link) == (keep, "manual")
    assert {(e["mrn"], e["from_link"]) for e in out["events"]} == {("OA917082", "auto"), ("HH-3391", "source")}
    assert len({e["decision"] for e in out["events"]}) == 1  # one decision
    view = reviews.person_view(tx, merge)
    assert view["merged_into"] == keep and view["records"] == []
    assert [r["mrn"] for r in reviews.person_view(tx, keep)["records"]] == ["GH-44107", "OA917082", "HH-3391"]
    assert "merged into person" in refused(409, reviews.merge_persons, tx, keep, merge, actor="tess", now=NOW)


def test_a_merge_supersedes_the_reviews_it_answers_and_its_undo_reopens_them(tx):
    """Found by a black-box audit: a review stayed open after a technician merged its two
    persons; a stale "not a match" on it then split the record off and left the merge not
    undoable."""
    s = hanson_scene(tx)  # the nursing home's record in a review against the hospital's person
    wrong = add_review(tx, HH, [GH], kind="link_looks_wrong", suggestion=s["person"], reasons=("link_looks_wrong",))
    merge = reviews.merge_persons(tx, s["person"], s["oa_person"], actor="tom", now=NOW, reason="HIM confirmed")
    answered = reviews.review_detail(tx, s["review"])
    assert answered["state"] == "superseded" and answered["decided_by"] == "tom"
    assert answered["note"] == f"answered by merge decision {merge['id']}"
    assert reviews.review_detail(tx, wrong)["state"] == "open"  # a question the merge did not answer
    assert "is superseded by tom, not open" in refused(409, decide, tx, s["review"], "not-a-match")
    assert person_of(tx, OA) == s["person"] and pairs(tx) == set()
    undo(tx, merge["id"])
    assert person_of(tx, OA) == s["oa_person"]
    reopened = reviews.review_detail(tx, s["review"])
    assert (reopened["state"], reopened["decided_by"], reopened["note"]) == ("open", None, None)


def test_merge_refusals(tx):
    a = add_record(tx, "GENHOSP", "GH-1", **HANSON)
    b = add_record(tx, "GENHOSP", "GH-2", **HANSON)
    empty = new_person(tx)
    assert refused(422, reviews.merge_persons, tx, a, a, actor="tess", now=NOW)
    assert refused(404, reviews.merge_persons, tx, a, 99999, actor="tess", now=NOW) == "no person 99999"
    assert "has no records" in refused(422, reviews.merge_persons, tx, a, empty, actor="tess", now=NOW)
    assert "two records of one facility" in refused(409, reviews.merge_persons, tx, a, b, actor="tess", now=NOW)
    # found by a black-box audit: a person a link had emptied took another patient's records, and
    # its id (sent out in copies as the first patient's) became the second's
    assert "holds no active record" in refused(409, reviews.merge_persons, tx, empty, a, actor="tess", now=NOW)
    reviews.merge_persons(tx, a, b, actor="tess", now=NOW, force=True)
    assert person_of(tx, ("GENHOSP", "GH-2")) == a


# --- undo -------------------------------------------------------------------------------------------------


def undo(conn, decision_id, **kw):
    kw.setdefault("actor", "tess")
    kw.setdefault("now", NOW + timedelta(minutes=5))
    return reviews.undo_decision(conn, decision_id, **kw)


def test_undo_a_link_restores_the_record_and_reopens_the_review(tx):
    s = hanson_scene(tx)
    decided = decide(tx, s["review"], "link")
    out = undo(tx, decided["decision_id"], reason="clicked the wrong one")
    row = record_row(tx, OA)
    assert (row.person_id, row.link, row.link_score) == (s["oa_person"], "auto", None)
    assert out["kind"] == "undo" and out["undone"] == decided["decision_id"] and out["undoable"] is False
    assert out["reason"] == "clicked the wrong one"
    review = reviews.review_detail(tx, s["review"])
    assert review["state"] == "open" and review["decision"] is None and review["decided_by"] is None
    assert [(d["kind"], d["undone_by"]) for d in review["decisions"]] == [("link", out["id"])]
    head = tx.execute(select(link_event).where(link_event.c.id == decided["decision_id"])).one()
    assert head.undone_by == out["id"]
    assert "undone already" in refused(409, undo, tx, decided["decision_id"])
    assert "is an undo" in refused(409, undo, tx, out["id"])
    # and it can be decided again
    assert decide(tx, s["review"], "not-a-match")["state"] == "resolved"


def test_undo_a_not_a_match_deactivates_its_pairs(tx):
    p = add_record(tx, *GH, **HANSON)
    add_record(tx, *HH, p, score_=12.5, **{**HANSON, "birth": "19741203", "given": "ELISE"})
    add_auto_event(tx, HH, None, p)
    tx.execute(link_event.update().values(score=12.5))
    r = add_review(tx, HH, [GH], kind="link_looks_wrong", suggestion=p, reasons=("link_looks_wrong",))
    decided = decide(tx, r, "not-a-match")
    assert record_row(tx, HH).person_id != p
    undo(tx, decided["decision_id"])
    row = record_row(tx, HH)
    rescored = score(_features(tx, HH), _features(tx, GH), default_model()).total  # not the 12.5 it had
    assert (row.person_id, row.link, row.link_score) == (p, "auto", rescored)
    assert pairs(tx) == set() and len(pairs(tx, active=False)) == 2
    assert [r["id"] for r in reviews.list_reviews(tx)] == [r]  # its review, reopened: no second one


def test_undo_a_split_and_a_merge(tx):
    p = add_record(tx, *GH, **HANSON)
    add_record(tx, *HH, p, **HANSON)
    split = reviews.split_record(tx, p, *HH, actor="tess", now=NOW)
    undo(tx, split["id"])
    assert person_of(tx, HH) == p and record_row(tx, HH).link == "auto" and pairs(tx) == set()

    q = add_record(tx, *OA, **HANSON)
    merge = reviews.merge_persons(tx, p, q, actor="tess", now=NOW)
    assert person_of(tx, OA) == p
    undo(tx, merge["id"])
    assert person_of(tx, OA) == q and record_row(tx, OA).link == "auto"
    assert reviews.person_view(tx, q)["merged_into"] is None


def test_undoing_a_wrong_merge_takes_the_opt_out_it_brought_back_with_the_records(tx):
    """A privacy audit: a merge carried the other patient's opt-out to the innocent person; after
    the undo it stayed there, attributed to a technician who never set it, and that patient's
    events were routed nowhere."""
    innocent = add_record(tx, *HH, **HANSON)
    reviews.set_opt_out(tx, innocent, True, actor="olga", now=NOW, reason="her own request")
    other = add_record(tx, *OA, **HANSON)
    reviews.set_opt_out(tx, other, True, actor="tess", now=NOW, reason="asked at the desk")
    merge = reviews.merge_persons(tx, innocent, other, actor="tom", now=NOW, force=True)
    assert reviews.person_view(tx, innocent)["opt_out"]["holds"] == ["api olga", "api tess"]
    undo(tx, merge["id"])
    assert reviews.person_view(tx, innocent)["opt_out"]["holds"] == ["api olga"]  # her own stays
    assert reviews.person_view(tx, other)["opt_out"]["holds"][0] == "api tess"
    last = reviews.opt_out_history(tx, innocent)[-1]
    assert (last["protected"], last["by"]) == (True, "api tess") and f"undo of decision {merge['id']}" in last["reason"]


def test_an_undo_does_not_bring_back_a_hold_lifted_while_the_records_were_merged(tx):
    """A last verification audit: merged, the patient asked the records office to lift the
    opt-out (or the facility said N about its record); the undo gave the records back to their
    person with the old hold, and nothing in its history said why."""
    kept = add_record(tx, *GH, **HANSON)
    away = add_record(tx, *OA, **HANSON)
    reviews.set_opt_out(tx, away, True, actor="tess", now=NOW, reason="asked")
    merge = reviews.merge_persons(tx, kept, away, actor="tom", now=NOW, force=True)
    reviews.set_opt_out(tx, kept, False, actor="olga", now=NOW, reason="the patient asks to share with all")
    undo(tx, merge["id"])
    assert reviews.person_view(tx, away)["opt_out"]["holds"] == []
    last = reviews.opt_out_history(tx, away)[-1]
    assert (last["protected"], last["by"]) == (False, "api tess") and "without what was lifted" in last["reason"]
    # ... nor one its facility lifted (PD1-12 N about its record, while merged)
    from sqlalchemy import text

    kept, away = add_record(tx, *HH, **HANSON), add_record(tx, "CLINIC", "C-9", **HANSON)
    tx.execute(text("update person set protected = :t, protected_by = :b where id = :p"),
               {"t": True, "b": '["PD1-12 CLINIC"]', "p": away})
    merge = reviews.merge_persons(tx, kept, away, actor="tom", now=NOW, force=True)
    assert reviews.person_view(tx, kept)["opt_out"]["holds"] == ["PD1-12 CLINIC"]
    tx.execute(text("update person set protected = :f, protected_by = null where id = :p"), {"f": False, "p": kept})
    from exchange.store.schema import opt_out_event_table

    tx.execute(insert(opt_out_event_table).values(person_id=kept, protected=False, by="PD1-12 CLINIC", at=NOW))
    # (as routing writes CLINIC's N)
    undo(tx, merge["id"])
    assert reviews.person_view(tx, away)["opt_out"]["holds"] == []


def test_undo_scores_a_restored_automatic_link_again(tx):
    """Found by a black-box audit: undoing a split put the record back with its old automatic
    link and score although its facility had renamed the patient since (a twin)."""
    p = add_record(tx, *GH, **HANSON)
    add_record(tx, *HH, p, score_=31.0, **HANSON)
    split = reviews.split_record(tx, p, *HH, actor="tess", now=NOW)
    twin = record_dict(mrn=HH[1], authority=HH[0], **{**HANSON, "given": "MARGARET", "ssn": "123-45-6790"})
    tx.execute(patient_record.update().where(patient_record.c.mrn == HH[1])
               .values(data=to_json(twin), features=encode_features(features_of(twin))))
    out = undo(tx, split["id"])
    row = record_row(tx, HH)
    now_scores = score(_features(tx, HH), _features(tx, GH), default_model()).total
    assert (row.person_id, row.link, row.link_score) == (p, "auto", now_scores) and now_scores < 20.0
    assert [e["score"] for e in out["events"]] == [now_scores]
    [review] = reviews.list_reviews(tx)
    assert (review["kind"], review["person"], review["records"]) == (
        "link_looks_wrong", p, [{"facility": HH[0], "mrn": HH[1]}, {"facility": GH[0], "mrn": GH[1]}])
    assert f"undo of decision {split['id']}" in review["reasons"][1]
    # unchanged, it scores as well as it did: no review
    add_record(tx, "OAKNH", "OA-1", p, **HANSON)
    again = reviews.split_record(tx, p, "OAKNH", "OA-1", actor="tess", now=NOW)
    undo(tx, again["id"])
    assert record_row(tx, ("OAKNH", "OA-1")).link_score > 20.0 and len(reviews.list_reviews(tx)) == 1


def test_undo_follows_a_later_merge_and_leaves_no_empty_person_behind(tx):
    """The record goes back to where its old person was merged. Found by a black-box audit:
    that left the split's person with no records and no merged_into."""
    p = add_record(tx, *GH, **HANSON)
    add_record(tx, *HH, p, **HANSON)
    split = reviews.split_record(tx, p, *HH, actor="tess", now=NOW)
    keeper = add_record(tx, "OAKNH", "OA-K", **HANSON)
    reviews.merge_persons(tx, keeper, p, actor="tess", now=NOW)
    undo(tx, split["id"])
    view = reviews.person_view(tx, split["person"])
    assert (view["merged_into"], view["records"]) == (keeper, [])
    assert person_of(tx, HH) == keeper


def test_undo_never_puts_two_records_of_one_facility_in_one_person(tx):
    """Found by a black-box audit: a split, a merge of the split's old person into a person
    holding another record of that facility, then undoing the split joined two patients."""
    p = add_record(tx, *GH, **HANSON)
    add_record(tx, *HH, p, **HANSON)
    split = reviews.split_record(tx, p, *HH, actor="tess", now=NOW)
    other = add_record(tx, "HHCARE", "HH-OTHER", family="THRUSH", given="PAUL", birth="19300505", sex="M")
    reviews.merge_persons(tx, other, p, actor="tess", now=NOW)  # GH-44107 joins Paul's person
    why = refused(409, undo, tx, split["id"])
    assert "two records of one facility" in why and f"undoing decision {split['id']}" in why
    assert person_of(tx, HH) == split["person"] and person_of(tx, ("HHCARE", "HH-OTHER")) == other


def test_undo_refused_when_the_record_moved_since(tx):
    s = hanson_scene(tx)
    decided = decide(tx, s["review"], "link")
    reviews.split_record(tx, s["person"], *OA, actor="tom", now=NOW)
    assert "has moved since" in refused(409, undo, tx, decided["decision_id"])


def test_undo_refuses_automatic_and_unknown_decisions(tx):
    p = add_record(tx, *GH, **HANSON)
    event = add_auto_event(tx, GH, None, p)
    assert "automatic" in refused(409, undo, tx, event)
    assert refused(404, undo, tx, 777777) == "no decision 777777"
    assert reviews.decision_view(tx, event)["undoable"] is False


# --- the person: best view and history ------------------------------------------------------------------------


TRUST = reviews.Trust(("hospital", "nursing_home", "home_health"),
                      {"GENHOSP": "hospital", "OAKNH": "nursing_home", "HHCARE": "home_health"})


def test_best_view_takes_the_most_trusted_kind_then_the_most_recent(tx):
    p = add_record(tx, "HHCARE", "HH-1", updated_at=T0 + timedelta(days=3), family="HANSON-MOORE", given="LIZ",
                   birth="19470312", sex="F", street="9 NEW RD", city="SPRINGFIELD", postcode="62702",
                   phone="555-0199", ssn="123-45-6789")
    add_record(tx, "OAKNH", "OA-1", p, updated_at=T0 + timedelta(days=1), family="HANSON", given="ELIZABETH",
               sex="F", street="1 OLD ST", city="SPRINGFIELD")
    add_record(tx, "OAKNH", "OA-2", p, updated_at=T0 + timedelta(days=2), family="HANSEN", given="BETH")
    add_record(tx, "GENHOSP", "GH-OLD", p, active=False, updated_at=T0 + timedelta(days=9), family="WRONG",
               given="MERGED", birth="19000101")
    best = reviews.person_view(tx, p, TRUST)["best"]
    # no active hospital record: the nursing home's newest record for the name ...
    assert best["name"]["value"]["family"] == "HANSEN"
    assert (best["name"]["facility"], best["name"]["mrn"], best["name"]["kind"]) == ("OAKNH", "OA-2", "nursing_home")
    assert best["name"]["updated_at"] == "2026-11-29T12:00:00Z"
    # ... the older nursing-home record where the newer has no value ...
    assert best["address"]["value"]["street"] == "1 OLD ST" and best["address"]["mrn"] == "OA-1"
    assert best["sex"]["mrn"] == "OA-1"
    # ... and home health only for what no nursing-home record has
    assert best["birth_date"] == {"value": "1947-03-12", "facility": "HHCARE", "mrn": "HH-1", "kind": "home_health",
                                  "updated_at": "2026-11-30T12:00:00Z"}
    assert best["ssn_last4"]["value"] == "6789" and best["phones"]["value"][0]["number"] == "555-0199"
    assert "123-45-6789" not in repr(best)


def test_best_view_trust_is_configurable(tx):
    p = add_record(tx, "GENHOSP", "GH-1", family="HOSPITAL", given="NAME", updated_at=T0)
    add_record(tx, "HHCARE", "HH-1", p, family="HOME", given="HEALTH", updated_at=T0 - timedelta(days=30))
    add_record(tx, "ELSEWHERE", "X-1", p, family="UNKNOWN", given="SITE", updated_at=T0 + timedelta(days=30))
    assert reviews.person_view(tx, p, TRUST)["best"]["name"]["facility"] == "GENHOSP"
    home_first = reviews.Trust(("home_health", "hospital"), TRUST.kinds)
    assert reviews.person_view(tx, p, home_first)["best"]["name"]["facility"] == "HHCARE"
    # without any trust information, recency alone decides
    assert reviews.person_view(tx, p, reviews.Trust())["best"]["name"]["facility"] == "ELSEWHERE"


def test_person_view_lists_records_with_link_and_score(tx):
    p = add_record(tx, *GH, **HANSON)
    add_record(tx, *HH, p, score_=31.0, **HANSON)
    view = reviews.person_view(tx, p, TRUST)
    assert view["person"] == p and view["merged_into"] is None
    assert [(r["facility"], r["mrn"], r["link"], r["score"]) for r in view["records"]] == [
        ("GENHOSP", "GH-44107", "auto", None), ("HHCARE", "HH-3391", "auto", 31.0)]
    assert reviews.person_view(tx, 99999) is None
    empty = new_person(tx)
    assert reviews.person_view(tx, empty)["records"] == []
    assert all(v is None for v in reviews.person_view(tx, empty)["best"].values())


def test_person_history_lists_the_link_events(tx):
    s = hanson_scene(tx)
    add_auto_event(tx, HH, None, s["person"])
    decided = decide(tx, s["review"], "link", reason="checked the chart")
    split = reviews.split_record(tx, s["person"], *OA, actor="tom", now=NOW)
    history = reviews.person_history(tx, s["person"])
    assert [(e["kind"], e["mrn"], e["actor"]) for e in history["events"]] == [
        ("auto", "HH-3391", "exchange"), ("link", "OA917082", "tess"), ("split", "OA917082", "tom")]
    assert history["events"][1]["decision"] == decided["decision_id"] and history["events"][1]["review"] == s["review"]
    assert reviews.person_history(tx, split["person"])["events"][-1]["kind"] == "split"
    assert reviews.person_history(tx, 99999) is None


# --- export ------------------------------------------------------------------------------------------------------


def test_export_links_every_active_record_with_its_person(tx):
    s = hanson_scene(tx)
    add_record(tx, "GENHOSP", "GH-OLD", s["person"], active=False, family="A", given="B")
    rows = list(reviews.export_links(tx))
    assert rows == [("GENHOSP", "GENHOSP", "GH-44107", s["person"]), ("HHCARE", "HHCARE", "HH-3391", s["person"]),
                    ("OAKNH", "OAKNH", "OA917082", s["oa_person"])]


def test_decisions_commit_in_the_callers_transaction(engine):
    """Nothing commits behind the caller's back: a rolled back decision leaves no trace."""
    with write_transaction(engine) as conn:
        s = hanson_scene(conn)
    with engine.connect() as conn:
        t = conn.begin()
        decide(conn, s["review"], "link")
        t.rollback()
    with engine.connect() as conn:
        assert reviews.review_detail(conn, s["review"])["state"] == "open"
        assert conn.execute(select(link_event)).all() == []


def test_an_opt_out_on_a_person_whose_records_have_moved_is_refused(tx):
    """Found by a workbench audit: a technician set the opt-out on a person page read before another
    technician linked its only record elsewhere: 'protected', while the patient's copies went on."""
    p = add_record(tx, *GH, **HANSON)
    q = add_record(tx, *OA, **HANSON)
    tx.execute(update(patient_record).where(patient_record.c.person_id == p).values(person_id=q))
    assert "holds no active record" in refused(409, reviews.set_opt_out, tx, p, True, actor="tess", now=NOW,
                                               reason="asked at the desk")
    assert reviews.opt_out_history(tx, p) == []
    reviews.set_opt_out(tx, q, True, actor="tess", now=NOW, reason="asked at the desk")  # where the records are


def test_lifting_an_opt_out_needs_a_reason_and_a_change_that_changes_nothing_is_not_kept(tx):
    """Found by a black-box audit: a technician lifted a facility's PD1-12 opt-out with one
    click and no reason; lifting where none was set wrote a "lifted" history row."""
    p = add_record(tx, *GH, **HANSON)
    assert reviews.set_opt_out(tx, p, False, actor="tess", now=NOW, reason="checking")["opt_out"] == {
        "protected": False, "by": None, "holds": []}
    assert reviews.opt_out_history(tx, p) == []
    reviews.set_opt_out(tx, p, True, actor="tess", now=NOW, reason="asked at the desk")
    reviews.set_opt_out(tx, p, True, actor="tess", now=NOW)  # the same again: nothing new to keep
    for reason in (None, "  ", "\u200b", "\u00a0\u3000"):  # a zero-width space says nothing either
        assert "a reason is required" in refused(422, reviews.set_opt_out, tx, p, False, actor="tom", now=NOW,
                                                 reason=reason)
    reviews.set_opt_out(tx, p, False, actor="tom", now=NOW, reason="patient withdrew it by letter 12/3")
    assert [(h["protected"], h["by"], h["reason"]) for h in reviews.opt_out_history(tx, p)] == [
        (True, "api tess", "asked at the desk"), (False, "api tom", "patient withdrew it by letter 12/3")]
