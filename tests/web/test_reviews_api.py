"""The review queue and the technicians' decisions over the real routes and a real database
(SQLite and PostgreSQL): contract shapes, 400/401/403/404/409/422, links changing at once,
undo, and the audit trail. Tables seeded as the writer writes them (tests/test_reviews.py)."""
from __future__ import annotations

import json

from exchange.auth import PERMISSIONS, Permission, Role
from exchange.store.db import write_transaction
from exchange.store.reviews import Trust
from tests.test_reviews import GH, HANSON, HH, OA, a40_scene, add_record, hanson_scene
from tests.web.support import Harness


def post(api: Harness, path: str, body, token: str | None = None):
    """(status, JSON body) of POST ``path``; ``body`` a dict (sent as JSON) or raw bytes."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = api._result(api.stub.post("http://exchange.test" + path, data=data, headers=headers))
    return response.code, json.loads(api._result(response.content()))


def scene(api: Harness) -> dict:
    with write_transaction(api.engine) as conn:
        return hanson_scene(conn)


def audit(api: Harness) -> list[tuple]:
    return [(r["actor"], r["action"], r["resource"], r["key"], r["outcome"]) for r in api.audit()]


def test_list_open_reviews_in_the_contract_shape(api: Harness):
    s = scene(api)
    token = api.token("tess", "technician")
    code, body, _ = api.get("/api/reviews?state=open", token)
    assert code == 200
    [review] = body["reviews"]
    assert {"id", "records", "score", "reasons", "state"} <= review.keys()
    assert review["id"] == s["review"] and review["state"] == "open"
    assert review["records"][0] == {"facility": "OAKNH", "mrn": "OA917082"}
    assert {"facility": "GENHOSP", "mrn": "GH-44107"} in review["records"]
    assert review["reasons"] == ["between_thresholds"] and isinstance(review["score"], float)
    assert body["next"] is None
    assert api.get("/api/reviews", token)[1]["reviews"] == body["reviews"]  # open is the default
    assert api.get("/api/reviews?state=resolved", token)[1]["reviews"] == []
    assert api.get("/api/reviews?state=all&limit=1", token)[1]["next"] == s["review"]
    assert audit(api)[0] == ("tess", "read", "review", "state=open", "ok")


def test_list_bad_query_400_and_no_token_401(api: Harness):
    token = api.token("tess", "technician")
    assert api.get("/api/reviews?state=closed", token)[0] == 400
    assert api.get("/api/reviews?limit=0", token)[0] == 400
    assert api.get("/api/reviews?after=x", token)[0] == 400
    assert api.get("/api/reviews")[0] == 401
    assert api.get("/api/reviews?state=closed")[0] == 401


def test_one_review_side_by_side(api: Harness):
    s = scene(api)
    token = api.token("tess", "technician")
    code, body, _ = api.get(f"/api/reviews/{s['review']}", token)
    assert code == 200
    assert body["thresholds"] == {"upper": 20.0, "lower": 8.0}
    assert [c["mrn"] for c in body["candidates"]] == ["GH-44107", "HH-3391"]
    given = next(c for c in body["comparison"] if c["field"] == "given")
    assert given["record"] == "LIZ" and given["candidates"][0]["level"] == "nickname"
    assert "123-45-6789" not in json.dumps(body)
    assert api.get("/api/reviews/999999", token)[0] == 404
    assert api.get("/api/reviews/abc", token)[0] == 400
    rows = audit(api)
    assert [a[-1] for a in rows] == ["ok"] * 4 + ["not-found"]
    assert rows[0][3] == str(s["review"])
    assert {a[2:4] for a in rows[1:4]} == {("record", "GH-44107"), ("record", "HH-3391"), ("record", "OA917082")}


def test_link_decision_changes_the_links_at_once_and_is_audited(api: Harness):
    s = scene(api)
    token = api.token("tess", "technician")
    code, body = post(api, f"/api/reviews/{s['review']}", {"decision": "link", "reason": "same woman"}, token)
    assert code == 200
    assert {"id", "records", "score", "reasons", "state"} <= body.keys()
    assert body["state"] == "resolved" and body["decision"] == "link" and body["decided_by"] == "tess"
    assert body["note"] == "same woman" and isinstance(body["decision_id"], int)
    # the answer shows the review's records as its GET does: audited alike (found by a privacy audit)
    assert audit(api)[:4] == [("tess", "decide", "review", str(s["review"]), "ok"),
                              ("tess", "decide", "record", "GH-44107", "ok"), ("tess", "decide", "record", "HH-3391", "ok"),
                              ("tess", "decide", "record", "OA917082", "ok")]
    code, person, _ = api.get(f"/api/persons/{s['person']}", token)
    assert ("OAKNH", "OA917082", "manual") in {(r["facility"], r["mrn"], r["link"]) for r in person["records"]}
    code, record, _ = api.get("/api/records/OAKNH/OA917082", token)
    assert record["person"] == s["person"]

    code, body = post(api, f"/api/reviews/{s['review']}", {"decision": "not-a-match"}, token)
    assert code == 409 and "resolved by tess" in body["error"]
    assert audit(api)[-1] == ("tess", "decide", "review", str(s["review"]), "invalid")


def test_not_a_match_decision(api: Harness):
    s = scene(api)
    token = api.token("tess", "technician")
    code, body = post(api, f"/api/reviews/{s['review']}", {"decision": "not-a-match"}, token)
    assert code == 200 and body["decision"] == "not-a-match"
    code, decision, _ = api.get(f"/api/decisions/{body['decision_id']}", token)
    assert code == 200 and decision["kind"] == "not-a-match" and decision["actor"] == "tess"
    assert {(p["mrn"], p["other_mrn"], p["active"]) for p in decision["pairs"]} == {
        ("OA917082", "GH-44107", True), ("GH-44107", "OA917082", True),
        ("OA917082", "HH-3391", True), ("HH-3391", "OA917082", True)}


def test_bad_decision_bodies(api: Harness):
    s = scene(api)
    token = api.token("tess", "technician")
    path = f"/api/reviews/{s['review']}"
    assert post(api, path, b"not json", token)[0] == 400
    assert post(api, path, b"[1, 2]", token)[0] == 400
    assert post(api, path, b"[" * 5000, token)[0] == 400  # too deep for the parser: still a bad request
    assert post(api, path, b'{"decision": "link", "reason": "\\ud800"}', token)[0] == 400  # a lone surrogate
    assert post(api, path, {}, token) == (422, {"error": 'decision must be "link" or "not-a-match"'})
    assert post(api, path, {"decision": "maybe"}, token)[0] == 422
    assert post(api, path, {"decision": "link", "persn": 3}, token)[1]["error"].startswith("unknown field 'persn'")
    assert post(api, path, {"decision": "link", "person": "x"}, token)[0] == 422
    assert post(api, path, {"decision": "link", "person": True}, token)[0] == 422
    assert post(api, path, {"decision": "link", "force": "yes"}, token)[0] == 422
    assert post(api, path, {"decision": "link", "reason": 7}, token)[0] == 422
    assert post(api, path, {"decision": "link", "candidate": "GH"}, token)[0] == 422
    assert post(api, path, {"decision": "not-a-match", "person": s["person"]}, token)[0] == 422
    code, body = post(api, path, {"decision": "link", "person": 987654}, token)
    assert (code, body["error"]) == (422, "no person 987654")
    assert post(api, "/api/reviews/987654", {"decision": "link"}, token)[0] == 404
    assert post(api, "/api/reviews/abc", {"decision": "link"}, token)[0] == 400
    assert post(api, "/api/reviews/%C2%B2", {"decision": "link"}, token)[0] == 400  # "²"
    assert {a[-1] for a in audit(api)} == {"invalid", "not-found"}
    assert api.get(f"/api/reviews/{s['review']}", token)[1]["state"] == "open"  # nothing decided


def test_link_to_a_candidate_and_the_same_facility_guard(api: Harness):
    s = scene(api)
    with write_transaction(api.engine) as conn:
        add_record(conn, "OAKNH", "OA-OTHER", s["person"], **HANSON)
    token = api.token("tess", "technician")
    path = f"/api/reviews/{s['review']}"
    code, body = post(api, path, {"decision": "link", "candidate": {"facility": GH[0], "mrn": GH[1]}}, token)
    assert code == 409 and "two records of one facility" in body["error"]
    code, body = post(api, path, {"decision": "link", "candidate": {"facility": GH[0], "mrn": GH[1]},
                                  "force": True}, token)
    assert code == 200 and body["record"]["person"] == s["person"]


def test_a_review_an_a40_answered_is_refused_with_the_reason(api: Harness):
    with write_transaction(api.engine) as conn:
        s = a40_scene(conn)
    token = api.token("tess", "technician")
    path = f"/api/reviews/{s['review']}"
    code, body = post(api, path, {"decision": "link"}, token)
    assert code == 409 and f"person {s['emptied']} holds no active record" in body["error"]
    code, body = post(api, path, {"decision": "link", "candidate": {"facility": "OAKNH", "mrn": "Z1"}}, token)
    assert code == 409 and "merged away by its facility" in body["error"]
    assert api.get("/api/records/OAKNH/Z2", token)[1]["person"] == s["survivor"]


def test_a_stale_decision_after_a_merge_is_refused_and_the_merge_stays_undoable(api: Harness):
    s = scene(api)
    tom, tess = api.token("tom", "technician"), api.token("tess", "technician")
    code, merge = post(api, "/api/persons/merge", {"persons": [s["person"], s["oa_person"]]}, tom)
    assert code == 200
    code, body = post(api, f"/api/reviews/{s['review']}", {"decision": "not-a-match", "reason": "stale"}, tess)
    assert code == 409 and "superseded" in body["error"]
    assert api.get(f"/api/records/{OA[0]}/{OA[1]}", tess)[1]["person"] == s["person"]
    code, decision, _ = api.get(f"/api/decisions/{merge['id']}", tom)
    assert decision["undone_by"] is None and decision["undoable"]
    assert post(api, f"/api/decisions/{merge['id']}/undo", {}, tom)[0] == 200


def test_split_merge_undo_and_history(api: Harness):
    s = scene(api)
    token = api.token("tess", "technician")
    # split the home-health record off the hospital's person
    code, split = post(api, f"/api/persons/{s['person']}/split",
                       {"facility": HH[0], "mrn": HH[1], "reason": "another woman"}, token)
    assert code == 200 and split["kind"] == "split" and split["undoable"]
    new = split["person"]
    assert api.get(f"/api/records/{HH[0]}/{HH[1]}", token)[1]["person"] == new
    # merge it back by hand, then undo the merge
    code, merge = post(api, "/api/persons/merge", {"persons": [s["person"], new], "reason": "no, same"}, token)
    assert code == 409 and "not a match" in merge["error"]  # the split's sticky pair
    code, merge = post(api, "/api/persons/merge", {"persons": [s["person"], new], "force": True}, token)
    assert code == 200 and merge["person"] == s["person"]
    code, merged, _ = api.get(f"/api/persons/{new}", token)
    assert merged["merged_into"] == s["person"] and merged["records"] == []
    # the split cannot be undone now: its refusal names the record that moved, and the audit does too
    code, body = post(api, f"/api/decisions/{split['id']}/undo", {}, token)
    assert code == 409 and f"{HH[0]} {HH[1]} has moved since" in body["error"]
    assert audit(api)[-2:] == [("tess", "decide", "person", f"decision/{split['id']}", "invalid"),
                               ("tess", "decide", "record", HH[1], "invalid")]
    code, undone = post(api, f"/api/decisions/{merge['id']}/undo", {"reason": "oops"}, token)
    assert code == 200 and undone["undone"] == merge["id"] and undone["kind"] == "undo"
    assert api.get(f"/api/records/{HH[0]}/{HH[1]}", token)[1]["person"] == new
    assert post(api, f"/api/decisions/{merge['id']}/undo", {}, token)[0] == 409
    assert post(api, "/api/decisions/987654/undo", b"", token)[0] == 404
    # the history of the hospital's person
    code, history, _ = api.get(f"/api/persons/{s['person']}/history", token)
    assert code == 200
    assert [e["kind"] for e in history["events"]] == ["split", "merge", "undo"]
    assert {e["actor"] for e in history["events"]} == {"tess"}
    assert api.get("/api/persons/987654/history", token)[0] == 404
    assert ("tess", "decide", "person", f"{s['person']}<-{new}", "ok") in audit(api)
    assert ("tess", "decide", "person", f"decision/{merge['id']}", "ok") in audit(api)


def test_split_and_merge_bad_bodies(api: Harness):
    s = scene(api)
    token = api.token("tess", "technician")
    assert post(api, f"/api/persons/{s['person']}/split", {"facility": "GENHOSP"}, token)[0] == 422
    assert post(api, f"/api/persons/{s['person']}/split", {"facility": "GENHOSP", "mrn": "NOPE"}, token)[0] == 404
    assert post(api, "/api/persons/987654/split", {"facility": "GENHOSP", "mrn": "GH-44107"}, token)[0] == 404
    assert post(api, "/api/persons/merge", {"persons": [1]}, token)[0] == 422
    assert post(api, "/api/persons/merge", {"persons": [s["person"], "x"]}, token)[0] == 422
    assert post(api, "/api/persons/merge", {"persons": [s["person"], s["person"]]}, token)[0] == 422
    assert post(api, "/api/persons/merge", {"persons": [s["person"], 987654]}, token)[0] == 404


def test_the_person_answers_with_its_best_view(api: Harness):
    s = scene(api)
    api.api.trust = Trust(("hospital", "nursing_home", "home_health"),
                          {"GENHOSP": "hospital", "OAKNH": "nursing_home", "HHCARE": "home_health"})
    token = api.token("tess", "technician")
    code, body, _ = api.get(f"/api/persons/{s['person']}", token)
    assert code == 200
    assert [(r["facility"], r["mrn"], r["link"]) for r in body["records"]] == [
        ("GENHOSP", "GH-44107", "auto"), ("HHCARE", "HH-3391", "auto")]
    assert body["records"][1]["score"] == 31.0
    best = body["best"]
    assert best["name"]["value"]["family"] == "HANSON" and best["name"]["facility"] == "GENHOSP"
    assert best["ssn_last4"]["value"] == "6789" and "123-45-6789" not in json.dumps(body)
    assert body["merged_into"] is None


def test_unauthenticated_and_forbidden_decisions(api: Harness, monkeypatch):
    s = scene(api)
    token = api.token("tess", "technician")
    assert post(api, f"/api/reviews/{s['review']}", {"decision": "link"})[0] == 401
    assert post(api, "/api/persons/merge", {"persons": [1, 2]})[0] == 401
    assert post(api, "/api/decisions/1/undo", {}, "exk_not_a_token")[0] == 401
    # a role without the permission (the table is the only place roles get them)
    monkeypatch.setitem(PERMISSIONS, Role.TECHNICIAN, frozenset({Permission.READ_RECORD}))
    assert post(api, f"/api/reviews/{s['review']}", {"decision": "link"}, token)[0] == 403
    assert post(api, f"/api/persons/{s['person']}/split", {"facility": "X", "mrn": "Y"}, token)[0] == 403
    assert api.get("/api/reviews", token)[0] == 403
    assert api.get(f"/api/persons/{s['person']}/history", token)[0] == 403
    assert [a[-1] for a in audit(api)] == ["unauthorized"] + ["forbidden"] * 4  # the unknown token's call too
    with api.engine.connect() as conn:
        from exchange.store.reviews import review_detail

        assert review_detail(conn, s["review"])["state"] == "open"


def test_admins_decide_too(api: Harness):
    s = scene(api)
    token = api.token("ada", "admin")
    code, body = post(api, f"/api/reviews/{s['review']}", {"decision": "link", "person": str(s["person"])}, token)
    assert code == 200 and body["decided_by"] == "ada"
    code, undone = post(api, f"/api/decisions/{body['decision_id']}/undo", {}, token)
    assert code == 200
    assert api.get(f"/api/reviews/{s['review']}", token)[1]["state"] == "open"
    assert api.get(f"/api/records/{OA[0]}/{OA[1]}", token)[1]["person"] == s["oa_person"]


def test_ids_in_paths_are_audited_as_numbers(api: Harness):
    """Found by a privacy audit: /api/persons/003 was audited under "003", which a search for
    person 3 misses (the README promises "0007" audited as "7")."""
    s = scene(api)
    token = api.token("tess", "technician")
    person, review = s["person"], s["review"]
    for path in (f"/api/persons/00{person}", f"/api/persons/00{person}/history", f"/api/reviews/000{review}"):
        assert api.get(path, token)[0] == 200, path
    assert [(a[2], a[3]) for a in audit(api) if a[2] in ("person", "review")] == [
        ("person", str(person)), ("person", str(person)), ("review", str(review))]
