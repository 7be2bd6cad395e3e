"""exchange.web.pages: what each workbench page shows, from the store's values (no sockets,
no database: the inputs are the dicts and values the store functions return)."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from exchange.store.outbox import DeliveryState, DeliveryView
from exchange.web import pages


@pytest.mark.parametrize("value, expected", [
    ("/reviews/7", "/reviews/7"),
    ("/reviews?state=open&after=3", "/reviews?state=open&after=3"),
    ("/records/GENHOSP/A%2FB", "/records/GENHOSP/A%2FB"),
    (None, "/reviews"),
    ("", "/reviews"),
    ("reviews", "/reviews"),  # relative
    ("https://evil.example/", "/reviews"),
    ("//evil.example/x", "/reviews"),  # scheme-relative: another site
    ("/\\evil.example", "/reviews"),  # browsers read \ as /
    ("/reviews\r\nSet-Cookie: x=1", "/reviews"),  # header injection
    ("/reviews x", "/reviews"),
    ("/persönlich", "/reviews"),
    ("/login?next=/login", "/reviews"),
    ("/logout", "/reviews"),
    ("/" + "a" * 3000, "/reviews"),
])
def test_safe_next_keeps_only_local_paths(value, expected):
    assert pages.safe_next(value) == expected


def test_login_location_carries_the_page_asked_for():
    assert pages.login_location("/reviews/7?x=1") == "/login?next=%2Freviews%2F7%3Fx%3D1"
    assert pages.login_location("/reviews") == "/login"
    assert pages.login_location("//evil.example") == "/login"
    assert pages.safe_next("/reviews/7?x=1") == "/reviews/7?x=1"  # what the login form hands back
    # a form posted without a live session: the login page and the page after it say it was not saved
    assert pages.login_location("/reviews/7", unsaved=True) == "/login?next=%2Freviews%2F7&unsaved=1"
    assert pages.login_location("/reviews", unsaved=True) == "/login?unsaved=1"
    assert pages.with_unsaved("/reviews/7") == "/reviews/7?unsaved=1"
    assert pages.with_unsaved("/reviews?state=open") == "/reviews?state=open&unsaved=1"
    assert pages.with_unsaved("/persons/3?unsaved=1#x") == "/persons/3?unsaved=1#x"


def test_links_encode_each_segment():
    assert pages.record_href("GENHOSP", "A/B 1") == "/records/GENHOSP/A%2FB%201"
    assert pages.person_href(12) == "/persons/12" and pages.person_href(None) is None


def test_text_helpers():
    assert pages.weight_text(4.061) == "+4.06" and pages.weight_text(-2.1) == "-2.10"
    assert pages.weight_text(0.001) == "0.00" and pages.weight_text(None) == ""
    assert pages.tone("exact", 13.1) == "agree" and pages.tone("disagree", -5) == "disagree"
    assert pages.tone("missing", 0.0) == "missing" and pages.tone("close", 0.0) == "neutral"
    assert pages.when("2026-11-27T12:00:00.5Z") == "2026-11-27 12:00:00 UTC"
    assert pages.when(datetime(2026, 11, 27, 13, 0, tzinfo=timezone.utc)) == "2026-11-27 13:00:00 UTC"
    assert pages.name_text({"family": "HANSON", "given": "ELIZABETH", "middle": "A", "suffix": "", "prefix": ""}) \
        == "HANSON, ELIZABETH A"
    assert pages.address_text({"street": "12 ELM ST", "other": "", "city": "SPRINGFIELD", "state": "IL",
                               "postal_code": "62701", "country": ""}) == "12 ELM ST, SPRINGFIELD IL 62701"
    assert pages.band(25, 20, 8) == "link" and pages.band(12, 20, 8) == "review" and pages.band(3, 20, 8) == "below"
    assert pages.band(None, 20, 8) == ""


def side(facility, mrn, person, **extra):
    return {"facility": facility, "mrn": mrn, "exists": True, "person": person, "link": "auto",
            "person_at_review": person, **extra}


DETAIL = {
    "id": 4, "state": "open", "kind": "candidate", "score": 16.4, "reasons": ["between_thresholds"], "person": 1,
    "created_at": "2026-11-27T12:00:00Z", "thresholds": {"upper": 20.0, "lower": 8.0},
    "record": side("OAKNH", "OA-1", 2),
    "candidates": [
        side("GENHOSP", "GH-1", 1, score=16.4, rules=["move rule"]),
        side("HHCARE", "HH/9", 1, score=6.0, rules=[]),
    ],
    "comparison": [
        {"field": "family", "record": "HANSEN", "candidates": [
            {"value": "HANSON", "level": "close", "weight": 4.06, "discounted": False},
            {"value": "MOORE", "level": "disagree", "weight": -5.5, "discounted": False}]},
        {"field": "phone", "record": None, "candidates": [
            {"value": "555-0100", "level": "missing", "weight": 0.0, "discounted": False},
            {"value": None, "level": "missing", "weight": 0.0, "discounted": True}]},
    ],
    "decision": None, "decided_by": None, "decided_at": None, "note": None, "decision_id": None, "decisions": [],
}


def test_review_page_sets_the_records_side_by_side_with_levels_and_weights():
    page = pages.review_page(DETAIL, can_decide=True, can_undo=True)
    assert (page.id, page.state, page.is_open, page.score, page.upper, page.lower, page.band) == (
        4, "open", True, "16.40", "20.00", "8.00", "review")
    assert [(c.facility, c.mrn, c.score, c.band, c.rules) for c in page.candidates] == [
        ("GENHOSP", "GH-1", "16.40", "review", ("move rule",)), ("HHCARE", "HH/9", "6.00", "below", ())]
    assert page.candidates[1].href == "/records/HHCARE/HH%2F9" and page.record.person_href == "/persons/2"
    family, phone = page.rows
    assert (family.label, family.record) == ("Family name", "HANSEN")
    assert [(c.value, c.level, c.weight, c.tone) for c in family.cells] == [
        ("HANSON", "close", "+4.06", "agree"), ("MOORE", "disagree", "-5.50", "disagree")]
    assert (phone.label, phone.record, phone.cells[1].value, phone.cells[1].tone) == ("Phone", "", "", "missing")
    assert page.any_discounted
    assert [(t.value, t.checked) for t in page.targets] == [
        ("suggested", True), ("candidate:GENHOSP:GH-1", False), ("candidate:HHCARE:HH%2F9", False), ("person", False)]
    assert page.can_decide


def test_every_reason_code_reads_as_a_sentence_and_unknown_ones_as_they_are():
    from exchange.matching.decide import Reason

    for reason in Reason:
        line = pages.reason_line(reason)
        assert line.code == reason.value and line.text != reason.value and line.text.endswith(".")
    assert pages.reason_line("merge_conflict").text.startswith("A facility's merge")
    odd = "merge at GENHOSP: the person already holds a record of OAKNH"
    assert pages.reason_line(odd) == pages.ReasonLine(odd, odd)
    assert pages.reason_line("new_rule_2027") == pages.ReasonLine("new_rule_2027", "new_rule_2027")


TWINS = {**DETAIL, "score": 24.9, "reasons": ["possible_twin"],
         "candidates": [side("GENHOSP", "GH-1", 1, score=24.9, rules=[]), side("HHCARE", "HH/9", 1, score=6.0)]}


def test_a_twins_review_above_the_link_threshold_is_held_back_not_green():
    """Found by a black-box audit: a twins review showed the bare code and the green "at or above
    the link threshold" band, which nudges a technician to link twins."""
    page = pages.review_page(TWINS, can_decide=True, can_undo=True)
    assert page.band == "held" and page.held_back.code == "possible_twin"
    assert page.held_back.text.startswith("Possible twins: the same surname and birth date")
    assert [(r.code, r.text[:14]) for r in page.reasons] == [("possible_twin", "Possible twins")]
    assert [c.band for c in page.candidates] == ["held", "below"]
    # the family-safety rule is named first, whatever the order stored
    both = pages.review_page({**TWINS, "reasons": ["link_looks_wrong", "parent_and_child"]}, can_decide=True,
                             can_undo=True)
    assert both.held_back.code == "parent_and_child"
    # a merge's free-text conflict is the reason itself
    merge = pages.review_page({**TWINS, "kind": "merge_conflict", "reasons": ["merge at GENHOSP of X into Y: ..."]},
                              can_decide=True, can_undo=True)
    assert (merge.band, merge.held_back.text) == ("held", "merge at GENHOSP of X into Y: ...")
    # between the thresholds nothing is held back; at or above with only a score's reason stays "link"
    assert pages.review_page(DETAIL, can_decide=True, can_undo=True).held_back is None
    plain = pages.review_page({**TWINS, "reasons": ["above_upper"]}, can_decide=True, can_undo=True)
    assert (plain.band, plain.held_back, plain.candidates[0].band) == ("link", None, "link")


def test_link_targets_round_trip():
    for t in pages.review_page(DETAIL, can_decide=True, can_undo=True).targets:
        parsed = pages.parse_target(t.value)
        assert parsed is not None
    assert pages.parse_target("candidate:HHCARE:HH%2F9") == ("candidate", ("HHCARE", "HH/9"))
    assert pages.parse_target("suggested") == ("suggested", None)
    for bad in (None, "", "candidate:", "candidate:X", "candidate::Y", "other", "candidate:a:b:c"):
        assert pages.parse_target(bad) is None


def test_a_resolved_review_offers_no_decision_and_names_the_one_taken():
    resolved = {**DETAIL, "state": "resolved", "decision": "link", "decided_by": "tess",
                "decided_at": "2026-11-27T13:00:00Z", "note": "same woman", "decision_id": 9,
                "decisions": [{"id": 9, "kind": "link", "actor": "tess", "at": "2026-11-27T13:00:00Z",
                               "reason": "same woman", "undone_by": None}]}
    page = pages.review_page(resolved, can_decide=True, can_undo=True)
    assert not page.can_decide and page.targets == () and page.decision_id == 9
    assert (page.decision, page.decided_by, page.decided_at) == ("link", "tess", "2026-11-27 13:00:00 UTC")
    assert not pages.review_page(DETAIL, can_decide=False, can_undo=False).can_decide


def test_without_a_suggestion_the_first_candidate_is_chosen():
    page = pages.review_page({**DETAIL, "person": None}, can_decide=True, can_undo=True)
    assert [(t.value, t.checked) for t in page.targets][:2] == [("candidate:GENHOSP:GH-1", True),
                                                               ("candidate:HHCARE:HH%2F9", False)]


def test_queue_page_pages_through():
    rows = [{"id": i, "state": "open", "kind": "candidate", "score": 12.0, "reasons": ["between_thresholds"],
             "records": [{"facility": "OAKNH", "mrn": f"OA-{i}"}, {"facility": "GENHOSP", "mrn": "GH-1"}],
             "created_at": "2026-11-27T12:00:00Z"} for i in (3, 5)]
    page = pages.queue_page(rows, "open", more=True)
    assert (page.next_href, page.first_href) == ("/reviews?state=open&after=5", None)
    assert [(r.id, r.href, r.record.mrn, [c.mrn for c in r.candidates], r.score) for r in page.rows] == [
        (3, "/reviews/3", "OA-3", ["GH-1"], "12.00"), (5, "/reviews/5", "OA-5", ["GH-1"], "12.00")]
    # a full page with nothing after it offers no next page (found by a black-box audit)
    assert pages.queue_page(rows, "open", more=False).next_href is None
    later = pages.queue_page(rows, "all", more=False, after=2)
    assert (later.next_href, later.first_href) == (None, "/reviews?state=all")
    empty = pages.queue_page([], "open", more=False, after=1000)
    assert (empty.rows, empty.next_href, empty.first_href) == ((), None, "/reviews?state=open")


def best(value, facility="GENHOSP", mrn="GH-1"):
    return {"value": value, "facility": facility, "mrn": mrn, "kind": "hospital", "updated_at": "2026-11-27T12:00:00Z"}


def test_person_page_best_view_records_history_and_what_may_be_undone():
    view = {
        "person": 1, "merged_into": None, "created_at": "2026-11-27T12:00:00Z",
        "opt_out": {"protected": True, "by": "PD1-12 OAKNH"},
        "records": [
            {"facility": "GENHOSP", "authority": "GENHOSP", "mrn": "GH-1", "active": True, "link": "auto",
             "score": None, "updated_at": "2026-11-27T12:00:00Z"},
            {"facility": "OAKNH", "authority": "OAKNH", "mrn": "OA-1", "active": True, "link": "manual",
             "score": 16.4, "updated_at": "2026-11-27T12:00:00Z"},
        ],
        "best": {"name": best({"family": "HANSON", "given": "ELIZABETH", "middle": "", "suffix": "", "prefix": ""}),
                 "birth_date": best("1947-03-12"), "sex": best("F"), "address": None,
                 "phones": best([{"number": "555-0100", "use": "", "email": ""}]), "ssn_last4": best("6789")},
    }
    event = {"facility": "OAKNH", "mrn": "OA-1", "from_person": 2, "to_person": 1, "from_link": "auto",
             "to_link": "manual", "score": None, "actor": "tess", "reason": "same", "review": 4,
             "at": "2026-11-27T13:00:00Z", "undone_by": None}
    history = {"person": 1, "events": [
        {**event, "id": 1, "decision": 1, "kind": "auto", "actor": "exchange"},
        {**event, "id": 7, "decision": 7, "kind": "link"},
        {**event, "id": 8, "decision": 7, "kind": "link"},
        {**event, "id": 9, "decision": 9, "kind": "split", "undone_by": 10},
    ]}
    page = pages.person_page(view, history, can_decide=True)
    assert [(b.label, b.value) for b in page.best] == [
        ("Name", "HANSON, ELIZABETH"), ("Birth date", "1947-03-12"), ("Sex", "F"), ("Address", ""),
        ("Phones", "555-0100"), ("SSN", "***-**-6789")]
    assert page.best[0].source.href == "/records/GENHOSP/GH-1"
    assert (page.protected, page.protected_by) == (True, "PD1-12 OAKNH")
    assert [(r.mrn, r.link, r.score, r.can_split) for r in page.records] == [
        ("GH-1", "auto", "", True), ("OA-1", "manual", "16.40", True)]
    assert [(h.id, h.undoable) for h in page.history] == [(1, False), (7, True), (8, False), (9, False)]
    assert page.history[1].review_href == "/reviews/4"
    read_only = pages.person_page(view, history, can_decide=False)
    assert not read_only.can_decide and not any(h.undoable for h in read_only.history)
    assert not any(r.can_split for r in read_only.records)
    merged = pages.person_page({**view, "merged_into": 3, "records": []}, None, can_decide=True)
    assert merged.merged_into_href == "/persons/3" and not merged.can_decide


@pytest.mark.parametrize("value, expected", [
    ("2026-11-28T08:30:00+01:00", "2026-11-28 07:30:00 UTC"),  # an offset: converted, like every other time
    ("2026-11-28T01:30:00-05:00", "2026-11-28 06:30:00 UTC"),
    ("2026-11-28T01:30:00", "2026-11-28 01:30 local time at GENHOSP"),  # none: as sent, and said so
    ("2026-11-28T01:30:15.250000", "2026-11-28 01:30:15 local time at GENHOSP"),
    ("2026-11-28", "2026-11-28"), ("2026-11", "2026-11"), ("2026", "2026"),  # the precision sent
    ("", ""), (None, ""), ("not a time", "not a time"),
])
def test_sender_times(value, expected):
    assert pages.sender_time(value, "GENHOSP") == expected


def test_birth_dates_locations_and_patient_classes():
    for value, expected in [("1980-01-02", "1980-01-02"), ("1980-01-02T12:30:00", "1980-01-02"),
                            ("1980-01-02T12:30:00-05:00", "1980-01-02"), ("1980-01", "1980-01"), ("1980", "1980"),
                            (None, ""), ("19800102", "19800102")]:
        assert pages.birth_text(value) == expected, value
    assert pages.location_text("W2^202^B^") == "W2 / 202 / B"
    assert pages.location_text("^202^^GENHOSP") == "– / 202 / – / GENHOSP"
    assert pages.location_text("ER") == "ER" and pages.location_text(None) == ""
    assert [pages.patient_class_text(c) for c in ("I", "O", "E", "P", "R", "B", "Z", None)] == [
        "I (inpatient)", "O (outpatient)", "E (emergency)", "P (preadmit)", "R (recurring patient)",
        "B (obstetrics)", "Z", ""]


def test_birth_dates_on_the_review_and_person_pages_are_dates():
    detail = {**DETAIL, "comparison": [{"field": "birth", "record": "1947-03-12T08:00:00", "candidates": [
        {"value": "1947-03-12", "level": "exact", "weight": 9.0, "discounted": False},
        {"value": "1947", "level": "year_only", "weight": 1.0, "discounted": False}]}]}
    [row] = pages.review_page(detail, can_decide=True, can_undo=True).rows
    assert (row.record, [c.value for c in row.cells]) == ("1947-03-12", ["1947-03-12", "1947"])
    view = {"person": 1, "merged_into": None, "created_at": None, "opt_out": {}, "records": [],
            "best": {"birth_date": best("1947-03-12T08:00:00-05:00")}}
    assert [b.value for b in pages.person_page(view, None, can_decide=False).best if b.label == "Birth date"] == [
        "1947-03-12"]


def test_record_page():
    view = {"facility": "GENHOSP", "authority": "GENHOSP", "mrn": "GH-2", "person": 5, "active": False,
            "merged_into": "GH-1", "name": {"family": "DOE", "given": "JANE", "middle": "", "suffix": "", "prefix": ""},
            "aliases": [{"family": "ROE", "given": "JANE", "middle": "", "suffix": "", "prefix": ""}],
            "birth_date": "1980-01-01", "sex": "F", "addresses": [{"street": "1 MAIN ST", "city": "X"}],
            "phones": [{"number": "555-0100"}], "death": None, "deceased": None,
            "identifiers": [{"value": "GH-2", "authority": "GENHOSP", "type": "MR"}], "encounters": [], "documents": []}
    page = pages.record_page(view)
    assert (page.name, page.aliases, page.person_href, page.deceased) == ("DOE, JANE", ("ROE, JANE",), "/persons/5", "")
    assert page.merged_into.href == "/records/GENHOSP/GH-1" and page.identifiers == ("GH-2 GENHOSP MR",)
    assert page.addresses == ("1 MAIN ST, X",) and page.phones == ("555-0100",)
    visits = [{"visit_number": "V1", "class": "I", "status": "discharged", "location": "W2^202^B^",
               "prior_location": None, "admitted_at": "2026-11-28T01:30:00",
               "discharged_at": "2026-11-28T08:30:00+01:00"}]
    page = pages.record_page({**view, "birth_date": "1980-01-01T04:00:00", "death": "2026-11-29T10:00:00Z",
                              "encounters": visits})
    assert (page.birth_date, page.deceased) == ("1980-01-01", "yes, 2026-11-29 10:00:00 UTC")
    assert page.encounters == (pages.EncounterRow("V1", "I (inpatient)", "discharged", "W2 / 202 / B",
                                                  "2026-11-28 01:30 local time at GENHOSP",
                                                  "2026-11-28 07:30:00 UTC"),)


def test_delivery_rows_offer_retry_only_for_failed_copies_and_admins():
    at = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)

    def view(state):
        return DeliveryView(id=3, destination="OAKNH", state=state, attempts=1, last_error="AE: unknown patient",
                            control_id="C-1", created_at=at, next_attempt_at=at, delivered_at=None, ack_code="AE",
                            message_id=1, message_facility="GENHOSP", message_control_id="M-1", message_type="ADT",
                            event="A01", person_id=7, facility="GENHOSP", mrn="GH-1", reason="default",
                            retried_by=None, retried_at=None)

    [row] = pages.delivery_rows([view(DeliveryState.FAILED)], can_retry=True)
    assert (row.message, row.person_href, row.record.href, row.can_retry, row.next_attempt_at) == (
        "GENHOSP M-1 ADT^A01", "/persons/7", "/records/GENHOSP/GH-1", True, "")
    assert not pages.delivery_rows([view(DeliveryState.FAILED)], can_retry=False)[0].can_retry
    [queued] = pages.delivery_rows([view(DeliveryState.QUEUED)], can_retry=True)
    assert not queued.can_retry and queued.next_attempt_at == "2026-11-27 12:00:00 UTC"
