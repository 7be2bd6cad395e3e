"""The workbench over its real routes, templates and store functions and a real database
(SQLite and PostgreSQL), in memory: logins, sessions (a fake clock), CSRF, roles, the audit
trail of every patient view, decisions through forms, security headers, and /healthz and
/api unchanged beside it."""
from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select
from twisted.logger import globalLogPublisher

from exchange.accounts import Policy
from exchange.store.db import make_engine, upgrade, write_transaction
from exchange.store.messages import insert_messages
from exchange.store.outbox import NewCopy, enqueue, mark_delivered, mark_failed
from exchange.store.schema import audit_event_table, workbench_session_table
from tests.support import new_message
from tests.test_reviews import GH, OA, hanson_scene, person_of
from tests.web.support import T0, apply_hl7
from tests.web.workbench_support import PASSWORD, Browser, WorkbenchHarness


@pytest.fixture
def wb(engine) -> WorkbenchHarness:
    """On SQLite and PostgreSQL: for what goes through the store (sessions, reads, decisions)."""
    return WorkbenchHarness(engine)


@pytest.fixture
def web(tmp_path) -> Iterator[WorkbenchHarness]:
    """On SQLite only: for what the web layer alone decides (redirects, headers, forms, escaping);
    a PostgreSQL database each would cost a second of set-up for nothing."""
    engine = make_engine(f"sqlite:///{tmp_path / 'workbench.db'}")
    upgrade(engine)
    try:
        yield WorkbenchHarness(engine)
    finally:
        engine.dispose()


def scene(wb: WorkbenchHarness) -> dict:
    with write_transaction(wb.engine) as conn:
        return hanson_scene(conn)


def logged_in(wb: WorkbenchHarness, name: str = "tess", role: str = "technician") -> Browser:
    wb.user(name, role)
    browser = wb.browser()
    page = browser.login(name)
    assert page.code == 303, page.text
    return browser


def audit(wb: WorkbenchHarness) -> list[tuple]:
    return [(r["actor"], r["role"], r["action"], r["resource"], r["facility"], r["key"], r["outcome"])
            for r in wb.audit()]


# -- logging in ----------------------------------------------------------------------------


PAGES = ["/reviews", "/reviews/1", "/persons/1", "/records/GENHOSP/GH-44107", "/deliveries", "/reviews?state=all"]


def test_every_page_wants_a_login_and_comes_back_after_it(wb):
    scene(wb)
    wb.user("tess", "admin")
    for path in PAGES:
        browser = wb.browser()
        page = browser.get(path)
        assert page.code == 303
        assert page.location == "/login" if path == "/reviews" else page.location.startswith("/login?next=%2F")
        assert "HANSON" not in page.text and audit(wb) == []  # nothing read, nothing shown
        next_ = page.location.partition("next=")[2] or None
        done = browser.login("tess", next_=next_)
        assert (done.code, done.location) == (303, path)
        assert browser.get(path).code == 200
        with write_transaction(wb.engine) as conn:
            conn.execute(audit_event_table.delete())


def test_posts_without_a_session_go_to_the_login_page(web):
    wb = web
    s = scene(wb)
    page = wb.browser().post(f"/reviews/{s['review']}/decide", {"decision": "link", "target": "suggested"})
    assert (page.code, page.location) == (303, "/login?next=%2Freviews%2F1&unsaved=1")
    with wb.engine.connect() as conn:
        assert person_of(conn, OA) == s["oa_person"]
    assert wb.browser().post("/logout").location == "/login"


def test_a_decision_posted_after_the_session_expired_is_not_saved_and_the_pages_say_so(wb):
    """Found by a black-box audit: a "not a match" typed, the idle time passed, submitted: the
    technician was sent to the login and back to the review with no word that nothing was saved."""
    s = scene(wb)
    browser = logged_in(wb)
    form = browser.get(f"/reviews/{s['review']}")
    assert 'id="unsaved"' not in form.text
    wb.advance(minutes=31)
    page = browser.post(f"/reviews/{s['review']}/decide",
                        {"csrf": form.csrf(), "decision": "not-a-match", "reason": "different women, see chart"})
    assert (page.code, page.location) == (303, f"/login?next=%2Freviews%2F{s['review']}&unsaved=1")
    login = browser.get(page.location)
    notice = re.search(r'<p class="problem" role="alert" id="unsaved">(.*?)</p>', login.text, re.S)[1]
    assert "session had expired" in notice and "decision was not saved" in notice
    assert "different women" not in login.text  # the form's data is not carried
    wrong = browser.post("/login", {"csrf": login.csrf(), "name": "tess", "password": "not it", "unsaved": "1",
                                    "next": f"/reviews/{s['review']}"})
    assert wrong.code == 403 and 'id="unsaved"' in wrong.text  # still said after a typo
    done = browser.login("tess", next_=page.location.partition("next=")[2].partition("&")[0])
    assert done.location == f"/reviews/{s['review']}"  # an ordinary login: no notice
    browser = wb.browser()
    login = browser.get(page.location)
    done = browser.post("/login", {"csrf": login.csrf(), "name": "tess", "password": PASSWORD,
                                   "next": re.search(r'name="next" value="([^"]*)"', login.text)[1],
                                   "unsaved": re.search(r'name="unsaved" value="([^"]*)"', login.text)[1]})
    assert (done.code, done.location) == (303, f"/reviews/{s['review']}?unsaved=1")
    back = browser.get(done.location)
    assert back.code == 200 and "decision was not saved" in back.text and "Please decide again." in back.text
    assert 'action="/reviews/1/decide"' in back.text  # still open: decide again
    with wb.engine.connect() as conn:
        assert person_of(conn, OA) == s["oa_person"]
    assert not [a for a in audit(wb) if a[2] == "decide"]
    # already logged in again (another tab): the login page still passes the word on
    again = browser.get(page.location)
    assert (again.code, again.location) == (303, f"/reviews/{s['review']}?unsaved=1")


def test_root_redirects_to_the_queue_and_unknown_pages_are_404(web):
    wb = web
    browser = wb.browser()
    assert (browser.get("/").code, browser.get("/").location) == (303, "/reviews")
    missing = browser.get("/no/such/page")
    assert missing.code == 404 and "There is no such page" in missing.text
    assert browser.post("/reviews").code == 405


def test_login_goes_only_to_local_pages(web):
    wb = web
    wb.user("tess", "technician")
    for next_, expected in [
        ("%2Freviews%2F1", "/reviews/1"),
        ("https%3A%2F%2Fevil.example%2F", "/reviews"),
        ("%2F%2Fevil.example", "/reviews"),
        ("%2F%5Cevil.example", "/reviews"),
        ("%2Flogout", "/reviews"),
        ("%2F" + "a" * 3000, "/reviews"),  # too long: ignored, not a 400 (found by a black-box audit)
    ]:
        browser = wb.browser()
        form = browser.get(f"/login?next={next_}")
        page = browser.post("/login", {"csrf": form.csrf(), "name": "tess", "password": PASSWORD,
                                       "next": re.search(r'name="next" value="([^"]*)"', form.text)[1]})
        assert (page.code, page.location) == (303, expected)
    # and what the form posts is checked again, not only what it was given
    again = wb.browser()
    form = again.get("/login")
    page = again.post("/login", {"csrf": form.csrf(), "name": "tess", "password": PASSWORD,
                                 "next": "https://evil.example/"})
    assert page.location == "/reviews"


def test_the_session_cookie(web):
    wb = web
    wb.user("tess", "technician")
    browser = wb.browser()
    form = browser.get("/login")
    page = browser.post("/login", {"csrf": form.csrf(), "name": "tess", "password": PASSWORD})
    [cookie] = [c for c in page.headers.getRawHeaders("set-cookie") if c.startswith("exchange_session=")]
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    assert "secure" not in attributes  # plain HTTP here; set when served over TLS (request.isSecure())
    token = cookie.split(";")[0].partition("=")[2]
    with wb.engine.connect() as conn:
        ids = conn.execute(select(workbench_session_table.c.id)).scalars().all()
    assert len(ids) == 1 and token not in ids  # only its SHA-256


def test_a_wrong_password_and_an_unknown_name_get_the_same_answer_after_a_pause(web):
    wb = web
    wb.user("tess", "technician")
    answers = []
    for name, password in (("tess", "not the password"), ("nobody", PASSWORD), ("bad name!", PASSWORD)):
        browser = wb.browser()
        page = browser.post("/login", {"csrf": browser.get("/login").csrf(), "name": name, "password": password})
        answers.append((page.code, re.search(r'role="alert">([^<]*)<', page.text)[1]))
        assert "exchange_session" not in browser.cookies
    assert answers == [(403, "That name and password did not work.")] * 3
    assert len(wb.pauses) == 3 and all(0.5 <= p <= 1.0 for p in wb.pauses)
    assert [(a[0], a[2], a[3], a[6]) for a in audit(wb)] == [
        ("tess", "login", "session", "forbidden"), ("nobody", "login", "session", "forbidden"),
        ("-", "login", "session", "forbidden")]


def test_repeated_failures_lock_the_login_out(engine):
    wb = WorkbenchHarness(engine, policy=Policy(attempts=3, lockout=timedelta(minutes=15)))
    wb.user("tess", "technician")

    def attempt(password: str) -> int:
        browser = wb.browser()
        return browser.post("/login", {"csrf": browser.get("/login").csrf(), "name": "tess",
                                       "password": password}).code

    assert [attempt("wrong password 1") for _ in range(3)] == [403, 403, 403]
    assert attempt(PASSWORD) == 403  # locked: not even the right password
    wb.advance(minutes=15)
    assert attempt(PASSWORD) == 303


def test_a_hash_made_with_older_parameters_is_replaced_at_the_next_login(web):
    from sqlalchemy import select

    from exchange.accounts import SCRYPT_N, verify_password
    from exchange.store.schema import workbench_user_table

    def stored() -> str:
        with web.engine.connect() as conn:
            return conn.execute(select(workbench_user_table.c.password_hash)).scalar_one()

    web.user("tess", "technician")  # a cheap hash: made with other parameters than today's
    old = stored()
    browser = web.browser()
    assert browser.post("/login", {"csrf": browser.get("/login").csrf(), "name": "tess",
                                   "password": "not the password"}).code == 403
    assert stored() == old  # only a successful login replaces it
    assert browser.login("tess").code == 303
    new = stored()
    assert new != old and new.startswith(f"scrypt${SCRYPT_N}$") and verify_password(PASSWORD, new)
    assert web.browser().login("tess").code == 303 and stored() == new  # and only once


def test_login_form_token_is_required(web):
    wb = web
    wb.user("tess", "technician")
    browser = wb.browser()
    browser.get("/login")
    assert browser.post("/login", {"csrf": "forged", "name": "tess", "password": PASSWORD}).code == 403
    fresh = wb.browser()  # a form posted from elsewhere: no login cookie at all
    page = fresh.post("/login", {"csrf": "x" * 43, "name": "tess", "password": PASSWORD})
    assert page.code == 403 and "exchange_session" not in fresh.cookies
    assert audit(wb) == []  # not even tried


def test_a_disabled_user_cannot_log_in_and_its_sessions_end(wb):
    from exchange.accounts import disable_user

    browser = logged_in(wb)
    with write_transaction(wb.engine) as conn:
        disable_user(conn, "tess", T0)
    assert browser.get("/reviews").code == 303
    assert wb.browser().login("tess").code == 403


# -- sessions (the harness's clock) ------------------------------------------------------------


def test_idle_sessions_expire(wb):
    browser = logged_in(wb)
    wb.advance(minutes=29)
    assert browser.get("/reviews").code == 200  # seen: the idle time starts again
    wb.advance(minutes=29)
    assert browser.get("/reviews").code == 200
    wb.advance(minutes=30)
    page = browser.get("/reviews")
    assert (page.code, page.location) == (303, "/login")
    with wb.engine.connect() as conn:
        assert conn.execute(select(workbench_session_table)).all() == []  # deleted when found expired


def test_sessions_end_after_twelve_hours_however_busy(web):
    wb = web
    browser = logged_in(wb)
    login = wb.now
    while wb.now + timedelta(minutes=25) < login + timedelta(hours=12):
        wb.advance(minutes=25)
        assert browser.get("/reviews").code == 200
    wb.now = login + timedelta(hours=12)  # less than the idle time since the last page
    assert browser.get("/reviews").code == 303


def test_logout_ends_the_session(wb):
    browser = logged_in(wb)
    page = browser.get("/reviews")
    stolen = dict(browser.cookies)
    done = browser.post("/logout", {"csrf": page.csrf()})
    assert (done.code, done.location) == (303, "/login") and "exchange_session" not in browser.cookies
    copy = wb.browser()
    copy.cookies.update(stolen)
    assert copy.get("/reviews").code == 303  # the old cookie is worthless now
    assert [(a[0], a[2], a[6]) for a in audit(wb)][-1] == ("tess", "logout", "ok")


def test_logout_needs_the_csrf_token(web):
    wb = web
    browser = logged_in(wb)
    assert browser.post("/logout", {"csrf": "forged"}).code == 403
    assert browser.get("/reviews").code == 200


# -- CSRF and roles --------------------------------------------------------------------------------


def test_forms_without_the_sessions_csrf_token_are_refused(web):
    wb = web
    s = scene(wb)
    browser = logged_in(wb)
    other = logged_in(wb, "ann", "technician")
    for csrf in (None, "", "forged", other.get("/reviews").csrf()):
        data = {"decision": "link", "target": "suggested"}
        if csrf is not None:
            data["csrf"] = csrf
        page = browser.post(f"/reviews/{s['review']}/decide", data)
        assert page.code == 403 and "Form expired" in page.text
    # found by a black-box audit: the token (and the decision) were taken from the query string
    token = browser.get("/reviews").csrf()
    page = browser.post(f"/reviews/{s['review']}/decide?csrf={token}&decision=link&target=suggested", {})
    assert page.code == 403 and "Form expired" in page.text
    with wb.engine.connect() as conn:
        assert person_of(conn, OA) == s["oa_person"]
    assert not [a for a in audit(wb) if a[2] == "decide"]


def test_a_technician_may_not_see_deliveries(web):
    wb = web
    browser = logged_in(wb)
    page = browser.get("/deliveries")
    assert page.code == 403 and "A technician may not" in page.text
    page = browser.post("/deliveries/1/retry", {"csrf": browser.get("/reviews").csrf()})
    assert page.code == 403
    assert [(a[0], a[2], a[3], a[6]) for a in audit(wb) if a[3] == "delivery"] == [
        ("tess", "read", "delivery", "forbidden"), ("tess", "decide", "delivery", "forbidden")]
    assert 'href="/deliveries"' not in browser.get("/reviews").text


# -- pages and their audit rows ---------------------------------------------------------------------


def test_every_patient_view_is_audited_with_the_read(wb):
    s = scene(wb)
    browser = logged_in(wb)
    assert browser.get("/reviews").code == 200
    assert browser.get(f"/reviews/{s['review']}").code == 200
    assert browser.get(f"/persons/{s['person']}").code == 200
    assert browser.get("/records/GENHOSP/GH-44107").code == 200
    assert browser.get("/records/GENHOSP/NOPE").code == 404
    assert browser.get("/persons/999999").code == 404
    # each page's row, then one per record it showed (found by a black-box audit: "who saw
    # GENHOSP GH-44107" missed the queue, the review and the person page)
    shown = [("tess", "technician", "read", "record", f, m, "ok")
             for f, m in (("GENHOSP", "GH-44107"), ("HHCARE", "HH-3391"), ("OAKNH", "OA917082"))]
    assert audit(wb)[1:] == [
        ("tess", "technician", "read", "review", None, "state=open", "ok"), *shown,
        ("tess", "technician", "read", "review", None, str(s["review"]), "ok"), *shown,
        ("tess", "technician", "read", "person", None, str(s["person"]), "ok"), *shown[:2],
        ("tess", "technician", "read", "record", "GENHOSP", "GH-44107", "ok"),
        ("tess", "technician", "read", "record", "GENHOSP", "NOPE", "not-found"),
        ("tess", "technician", "read", "person", None, "999999", "not-found"),
    ]
    assert all(r["remote"] == "127.0.0.1" for r in wb.audit())


def test_the_review_page_shows_each_fields_level_and_weight_and_the_thresholds(web):
    wb = web
    s = scene(wb)
    page = logged_in(wb).get(f"/reviews/{s['review']}")
    assert page.code == 200
    given = re.search(r'<tr class="field-given">(.*?)</tr>', page.text, re.S)[1]
    assert "LIZ" in given and "ELIZABETH" in given and "nickname" in given and "+3.91" in given
    assert "link automatically at 20.00, review from 8.00" in page.text
    assert "123-45-6789" not in page.text and "***-**-6789" in page.text
    assert 'action="/reviews/1/decide"' in page.text and page.text.count('name="csrf"') >= 3


def test_a_twins_review_says_why_it_was_held_back_in_words(web):
    """Found by a black-box audit: a twins review scoring above the link threshold showed
    "possible_twin" and a green "at or above the link threshold" band."""
    from tests.test_reviews import HANSON, add_record, add_review

    wb = web
    with write_transaction(wb.engine) as conn:
        add_record(conn, "GENHOSP", "GH-T1", **{**HANSON, "given": "ELIZABETH", "ssn": ""})
        add_record(conn, "OAKNH", "OA-T2", **{**HANSON, "given": "ELIZA", "ssn": ""})
        review = add_review(conn, ("OAKNH", "OA-T2"), [("GENHOSP", "GH-T1")], reasons=("possible_twin",))
    page = logged_in(wb).get(f"/reviews/{review}")
    score = re.search(r'<dd id="score">(.*?)</dd>', page.text, re.S)[1]
    assert float(score.split()[0]) >= 20.0  # at or above the link threshold
    assert "band-link" not in page.text and "at or above the link threshold" not in page.text
    assert '<span class="band band-held">above the link threshold, held back: Possible twins:' in score
    reasons = re.search(r'<dd id="reasons">(.*?)</dd>', page.text, re.S)[1]
    assert "<li>Possible twins: the same surname and birth date" in reasons
    assert '<code class="code">possible_twin</code>' in reasons


def test_security_headers_on_every_workbench_answer(web):
    wb = web
    scene(wb)
    browser = logged_in(wb)
    for page in (browser.get("/login"), browser.get("/reviews/1"), browser.get("/records/GENHOSP/GH-44107"),
                 browser.get("/nope")):
        assert "default-src 'self'" in page.header("content-security-policy")
        assert "frame-ancestors 'none'" in page.header("content-security-policy")
        assert page.header("x-frame-options") == "DENY"
        assert page.header("referrer-policy") == "no-referrer"
        assert page.header("cache-control") == "no-store"
        assert page.header("x-content-type-options") == "nosniff"
    css = browser.get("/static/workbench.css")
    assert css.code == 200 and css.header("content-type").startswith("text/css")


def test_patient_data_is_escaped(web):
    wb = web
    from tests.test_reviews import add_record

    with write_transaction(wb.engine) as conn:
        person = add_record(conn, "GENHOSP", "<b>X", family="<script>alert(1)</script>", given="ANN")
    browser = logged_in(wb)
    page = browser.get("/records/GENHOSP/%3Cb%3EX")
    assert page.code == 200
    assert "<script>alert(1)" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert 'href="/records/GENHOSP/%3Cb%3EX"' in browser.get(f"/persons/{person}").text
    # a direction override or an invisible character shows as a mark (a privacy audit: "\u202eNOSREDNA\u202c"
    # showed as ANDERSON beside ANDERSON, scored as another surname)
    with write_transaction(wb.engine) as conn:
        other = add_record(conn, "GENHOSP", "RLO-1", family="\u202eNOSREDNA\u202c", given="JO\u200bHN\U000e0041")
    shown = browser.get(f"/persons/{other}").text
    assert "&lt;U+202E&gt;NOSREDNA&lt;U+202C&gt;" in shown and "JO&lt;U+200B&gt;HN&lt;U+E0041&gt;" in shown
    assert "\u202e" not in shown and "\u200b" not in shown


def test_bad_input_is_a_400_page_with_the_reason(web):
    browser = logged_in(web)
    for path in ("/reviews?state=closed", "/reviews?after=x", "/reviews/abc", "/persons/x", "/persons?id=abc",
                 "/records?facility=GENHOSP", "/persons/%D9%A1", "/persons/%C2%B2", "/reviews?after=%C2%B2"):
        page = browser.get(path)
        assert page.code == 400 and "Bad request" in page.text, path


def test_the_queue_pages_by_fifty_with_a_way_back(web):
    """Found by a black-box audit: with exactly a page of open reviews, "Next page" led to
    "No open reviews."; a later page had no way back; a page past the end said there were none."""
    from exchange.web.workbench import PAGE_SIZE
    from tests.test_reviews import HANSON, HH, add_record, add_review

    wb = web
    with write_transaction(wb.engine) as conn:
        first = hanson_scene(conn)["review"]
        ids = [first] + [add_review(conn, OA, [GH, HH]) for _ in range(PAGE_SIZE - 1)]
    browser = logged_in(wb)
    page = browser.get("/reviews?state=open")
    assert page.text.count('class="review-link"') == PAGE_SIZE
    assert "Next page" not in page.text and "First page" not in page.text
    with write_transaction(wb.engine) as conn:
        add_record(conn, "OAKNH", "OA-LAST", **HANSON)
        extra = add_review(conn, ("OAKNH", "OA-LAST"), [GH])
        conn.execute(audit_event_table.delete())
    page = browser.get("/reviews?state=open")
    assert page.text.count('class="review-link"') == PAGE_SIZE and f'href="/reviews/{extra}"' not in page.text
    assert "OA-LAST" not in [a[5] for a in audit(wb)]  # read to know there is more, not shown: not audited
    assert f'href="/reviews?state=open&amp;after={ids[-1]}" id="next-page"' in page.text
    second = browser.get(f"/reviews?state=open&after={ids[-1]}")
    assert second.text.count('class="review-link"') == 1 and f'href="/reviews/{extra}"' in second.text
    assert 'href="/reviews?state=open" id="first-page"' in second.text and "Next page" not in second.text
    past = browser.get("/reviews?after=1000")
    assert past.code == 200 and "No open reviews." not in past.text
    assert "No more open reviews on this page." in past.text
    assert 'href="/reviews?state=open" id="first-page"' in past.text
    assert "No superseded reviews." in browser.get("/reviews?state=superseded").text


def test_find_a_person_or_a_record(web):
    wb = web
    browser = logged_in(wb)
    assert browser.get("/persons?id=12").location == "/persons/12"
    assert browser.get("/records?facility=GENHOSP&mrn=A%2FB").location == "/records/GENHOSP/A%2FB"


def admit(wb: WorkbenchHarness, control_id: str, *, birth: str, visit: str, patient_class: str, location: str,
          admitted: str) -> None:
    """An A01 from GENHOSP mapped, applied and saved as the intake does."""
    pv1 = [""] * 45
    pv1[1:4], pv1[19], pv1[44] = ["1", patient_class, location], visit, admitted
    apply_hl7(wb, f"MSH|^~\\&|ADT|GENHOSP|EXCHANGE|EXCHANGE|20261128100000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r"
                  f"EVN|A01|20261128100000\r"
                  f"PID|1||GH-7^^^GENHOSP^MR||DOE^JANE||{birth}|F\r"
                  "PV1|" + "|".join(pv1[1:]) + "\r", control_id)


def test_encounter_times_in_utc_or_said_local_and_a_birth_date_as_a_date(wb):
    """Found by a black-box audit: encounter times were the sender's ISO text with mixed offsets,
    the birth date carried a time, PV1-3 was W2^202^B^ and the class a bare code."""
    admit(wb, "ENC-1", birth="198001021230", visit="V1", patient_class="I", location="W2^202^B",
          admitted="202611280130")
    admit(wb, "ENC-2", birth="198001021230", visit="V2", patient_class="E", location="ER^^3",
          admitted="202611280830+0100")
    page = logged_in(wb).get("/records/GENHOSP/GH-7")
    assert page.code == 200
    birth = re.search(r"<dt>Birth date</dt><dd>(.*?)</dd>", page.text)[1]
    assert birth == "1980-01-02"
    rows = re.findall(r"<tr><td>(V\d)</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>", page.text)
    assert rows == [
        ("V1", "I (inpatient)", "admitted", "W2 / 202 / B", "2026-11-28 01:30 local time at GENHOSP"),
        ("V2", "E (emergency)", "admitted", "ER / – / 3", "2026-11-28 07:30:00 UTC"),
    ]
    assert "T01:30" not in page.text and "+01:00" not in page.text and "W2^202" not in page.text


def test_every_page_offers_a_record_lookup_by_facility_and_mrn(wb):
    """Found by a black-box audit: /records?facility=F&mrn=M worked but no page led to it."""
    scene(wb)
    browser = logged_in(wb)
    page = browser.get("/reviews")
    form = re.search(r'<form class="find" method="get" action="/records" id="find-record">(.*?)</form>', page.text,
                     re.S)[1]
    assert re.findall(r'<option value="([^"]+)"', form) == ["GENHOSP", "OAKNH", "HHCARE"]  # the configured ones
    assert re.search(r'<label>Facility <select name="facility"', form)
    assert re.search(r'<label>MRN <input name="mrn"', form)
    assert "csrf" not in form  # a GET that only reads
    found = browser.get("/records?facility=GENHOSP&mrn=GH-44107")
    assert (found.code, found.location) == (303, "/records/GENHOSP/GH-44107")
    assert "HANSON" in browser.get(found.location).text
    missing = browser.get(browser.get("/records?facility=OAKNH&mrn=NOPE").location)
    assert missing.code == 404 and "No such record" in missing.text
    assert [a[3:] for a in audit(wb) if a[2] == "read" and a[3] == "record" and a[5] in ("GH-44107", "NOPE")
            ][-2:] == [("record", "GENHOSP", "GH-44107", "ok"), ("record", "OAKNH", "NOPE", "not-found")]
    assert 'action="/records"' not in wb.browser().get("/login").text  # only for a login


# -- decisions through the forms ---------------------------------------------------------------------


def test_link_through_the_form_changes_the_links_at_once(wb):
    s = scene(wb)
    browser = logged_in(wb)
    form = browser.get(f"/reviews/{s['review']}")
    page = browser.post(f"/reviews/{s['review']}/decide",
                        {"csrf": form.csrf(), "decision": "link", "target": "suggested", "reason": "same woman"})
    assert (page.code, page.location) == (303, f"/reviews/{s['review']}")
    with wb.engine.connect() as conn:
        assert person_of(conn, OA) == person_of(conn, GH) == s["person"]
    token = wb.token("reader", "technician")
    code, body, _ = wb.get(f"/api/reviews/{s['review']}", token)
    assert (body["state"], body["decision"], body["decided_by"], body["note"]) == ("resolved", "link", "tess",
                                                                                   "same woman")
    assert ("tess", "technician", "decide", "review", None, str(s["review"]), "ok") in audit(wb)
    again = browser.post(f"/reviews/{s['review']}/decide",
                         {"csrf": form.csrf(), "decision": "not-a-match", "reason": "changed my mind"})
    assert again.code == 409 and "not open" in again.text
    shown = browser.get(f"/reviews/{s['review']}").text
    assert 'id="decision"' in shown and 'action="/reviews/1/decide"' not in shown


def test_link_to_a_candidate_or_a_person_named(web):
    wb = web
    s = scene(wb)
    browser = logged_in(wb)
    csrf = browser.get(f"/reviews/{s['review']}").csrf()
    bad = browser.post(f"/reviews/{s['review']}/decide", {"csrf": csrf, "decision": "link", "target": "person"})
    assert bad.code == 400 and "person is required" in bad.text
    assert browser.post(f"/reviews/{s['review']}/decide", {"csrf": csrf, "decision": "maybe"}).code == 400
    page = browser.post(f"/reviews/{s['review']}/decide",
                        {"csrf": csrf, "decision": "link", "target": "candidate:GENHOSP:GH-44107"})
    assert page.code == 303
    with wb.engine.connect() as conn:
        assert person_of(conn, OA) == s["person"]
    assert [a[6] for a in audit(wb) if a[2] == "decide"] == ["invalid", "invalid", "ok"]


def test_not_a_match_then_undo_from_the_review_page(wb):
    s = scene(wb)
    browser = logged_in(wb)
    csrf = browser.get(f"/reviews/{s['review']}").csrf()
    page = browser.post(f"/reviews/{s['review']}/decide",
                        {"csrf": csrf, "decision": "not-a-match", "reason": "different women"})
    assert page.code == 303
    token = wb.token("reader", "technician")
    body = wb.get(f"/api/reviews/{s['review']}", token)[1]
    assert (body["state"], body["decision"], body["note"]) == ("resolved", "not-a-match", "different women")
    shown = browser.get(f"/reviews/{s['review']}").text
    assert f'action="/decisions/{body["decision_id"]}/undo"' in shown
    undone = browser.post(f"/decisions/{body['decision_id']}/undo",
                          {"csrf": csrf, "back": f"/reviews/{s['review']}", "reason": "oops"})
    assert (undone.code, undone.location) == (303, f"/reviews/{s['review']}")
    assert wb.get(f"/api/reviews/{s['review']}", token)[1]["state"] == "open"


def test_split_merge_and_opt_out_from_the_person_page(wb):
    s = scene(wb)
    browser = logged_in(wb)
    person = s["person"]
    page = browser.get(f"/persons/{person}")
    csrf = page.csrf()
    assert f'action="/persons/{person}/split"' in page.text
    done = browser.post(f"/persons/{person}/split",
                        {"csrf": csrf, "facility": "HHCARE", "mrn": "HH-3391", "reason": "not her"})
    assert (done.code, done.location) == (303, f"/persons/{person}")
    with wb.engine.connect() as conn:
        split_off = person_of(conn, ("HHCARE", "HH-3391"))
    assert split_off != person
    done = browser.post(f"/persons/{person}/merge", {"csrf": csrf, "other": str(split_off), "reason": "her after all"})
    assert done.code == 409 and "marked not a match" in done.text  # the split's sticky pair
    done = browser.post(f"/persons/{person}/merge",
                        {"csrf": csrf, "other": str(split_off), "reason": "her after all", "force": "1"})
    assert done.code == 303
    with wb.engine.connect() as conn:
        assert person_of(conn, ("HHCARE", "HH-3391")) == person
    assert browser.post(f"/persons/{person}/opt-out",
                        {"csrf": csrf, "protected": "true", "reason": "asked in person, form 7"}).code == 303
    shown = browser.get(f"/persons/{person}").text
    assert "protected" in re.search(r'<dd id="opt-out">(.*?)</dd>', shown, re.S)[1] and "workbench tess" in shown
    history = re.search(r'<table class="opt-out-history" id="opt-out-history">(.*?)</table>', shown, re.S)[1]
    assert "<td>set</td><td>workbench tess</td><td>asked in person, form 7</td>" in history
    assert browser.post(f"/persons/{person}/opt-out", {"csrf": csrf, "protected": "maybe"}).code == 400
    assert browser.post(f"/persons/{person}/merge", {"csrf": csrf, "other": "x"}).code == 400
    kinds = [e.split("</td>")[0] for e in re.findall(r"<tr>\s*<td>\d+</td><td>\d+</td><td>(\w[\w-]*)", shown)]
    assert {"split", "merge"} <= set(kinds)
    decisions = [(a[3], a[5], a[6]) for a in audit(wb) if a[2] == "decide"]
    assert decisions == [
        ("person", str(person), "ok"), ("person", f"{person}<-{split_off}", "invalid"),
        # the refusal's page named the two records of the not-a-match pair
        ("record", "GH-44107", "invalid"), ("record", "HH-3391", "invalid"),
        ("person", f"{person}<-{split_off}", "ok"), ("person", str(person), "ok"),
        ("person", str(person), "invalid"), ("person", None, "invalid"),
    ]


def test_the_records_office_adds_its_own_opt_out_beside_a_facilitys(wb):
    """A privacy audit: a person a facility's PD1-12 Y protected offered only "Lift": the patient's
    own request at the records office could not be recorded, and the facility's N later let every
    copy go."""
    from sqlalchemy import text

    s = scene(wb)
    person = s["person"]
    with write_transaction(wb.engine) as conn:
        conn.execute(text("update person set protected = :t, protected_by = :by where id = :p"),
                     {"t": True, "by": '["PD1-12 GENHOSP"]', "p": person})
    browser = logged_in(wb)
    page = browser.get(f"/persons/{person}")
    forms = re.findall(r'<form method="post" action="/persons/\d+/opt-out">(.*?)</form>', page.text, re.S)
    assert len(forms) == 2 and 'value="true"' in forms[0] and "Add the records office" in forms[0]
    assert 'value="false"' in forms[1] and "Lift the opt-out" in forms[1]
    assert browser.post(f"/persons/{person}/opt-out", {"csrf": page.csrf(), "protected": "true",
                                                       "reason": "asked by phone"}).code == 303
    page = browser.get(f"/persons/{person}")
    assert "PD1-12 GENHOSP, workbench tess" in page.text
    forms = re.findall(r'<form method="post" action="/persons/\d+/opt-out">(.*?)</form>', page.text, re.S)
    assert len(forms) == 1 and "Lift the opt-out" in forms[0]  # the office's hold stands: nothing more to add


# -- deliveries (admins) -------------------------------------------------------------------------------


def two_copies(wb, control_id: str, error: str, *, second_delivered: bool = False) -> tuple[int, int]:
    """Two copies about one patient for OAKNH, the first failed with ``error``; the second queued,
    or delivered."""
    with write_transaction(wb.engine) as conn:
        [message_id] = insert_messages(conn, [new_message(control_id)])
        [first, second] = enqueue(conn, [
            NewCopy("OAKNH", message_id, f"D{n}", b"MSH|^~\\&|X\r", T0, person_id=7, facility="GENHOSP",
                    mrn="GH-1", reason="default") for n in (1, 2)])
        mark_failed(conn, first, at=T0, ack_code="AE", ack=b"", error=error)
        if second_delivered:
            mark_delivered(conn, second, at=T0, ack_code="AA", ack=b"")
    return first, second


def test_an_admin_sees_failed_copies_and_sends_one_again(wb):
    failed, queued = two_copies(wb, "SRC-1", "AE: unknown patient")
    browser = logged_in(wb, "ops", "admin")
    page = browser.get("/deliveries")
    assert page.code == 200
    failed_table = re.search(r'<table class="deliveries" id="failed">(.*?)</table>', page.text, re.S)[1]
    assert "AE: unknown patient" in failed_table and f'action="/deliveries/{failed}/retry"' in failed_table
    assert f'action="/deliveries/{queued}/retry"' not in page.text
    done = browser.post(f"/deliveries/{failed}/retry", {"csrf": page.csrf()})
    assert (done.code, done.location) == (303, "/deliveries") and wb.requeued == ["OAKNH"]
    token = wb.token("reader", "admin")
    [copy] = [d for d in wb.get("/api/deliveries?state=queued", token)[1]["deliveries"] if d["id"] == failed]
    assert copy["retried_by"] == "ops"
    again = browser.post(f"/deliveries/{failed}/retry", {"csrf": page.csrf()})
    assert again.code == 409
    assert browser.post("/deliveries/999999/retry", {"csrf": page.csrf()}).code == 404
    assert [(a[2], a[3], a[6]) for a in audit(wb) if a[3] == "delivery" and a[0] == "ops"] == [
        ("read", "delivery", "ok"), ("decide", "delivery", "ok"), ("decide", "delivery", "invalid"),
        ("decide", "delivery", "not-found")]


def test_an_admin_prints_a_patients_accounting_of_disclosures(wb):
    """A privacy audit: "who received what about this patient, when" needed an API token and JSON."""
    s = scene(wb)
    person = s["person"]
    with write_transaction(wb.engine) as conn:
        [message_id] = insert_messages(conn, [new_message("SRC-9")])
        [sent, _queued] = enqueue(conn, [
            NewCopy(dest, message_id, f"X{n}", b"MSH|^~\\&|X\r", T0, person_id=person, facility="GENHOSP",
                    mrn="GH-44107", reason="default") for n, dest in enumerate(("OAKNH", "HHCARE"))])
        mark_delivered(conn, sent, at=T0, ack_code="AA", ack=b"")
    admin = logged_in(wb, "ops", "admin")
    shown = admin.get(f"/persons/{person}")
    assert f'href="/persons/{person}/disclosures"' in shown.text
    page = admin.get(f"/persons/{person}/disclosures")
    assert page.code == 200
    table = re.search(r'<table class="deliveries" id="disclosures">(.*?)</table>', page.text, re.S)[1]
    assert "OAKNH" in table and "X0" in table and "GENHOSP GH-44107" in table and "HHCARE" not in table
    assert [(a[2], a[3], a[5], a[6]) for a in audit(wb) if a[0] == "ops" and a[3] in ("delivery", "record")][-2:] == [
        ("read", "delivery", f"state=delivered&person={person}", "ok"), ("read", "record", "GH-44107", "ok")]
    assert admin.get("/persons/999999/disclosures").code == 404
    technician = logged_in(wb)
    assert 'href="/persons/' + str(person) + '/disclosures"' not in technician.get(f"/persons/{person}").text
    assert technician.get(f"/persons/{person}/disclosures").code == 403


# -- the neighbours and the log ----------------------------------------------------------------------------


def test_healthz_and_the_api_are_unchanged_beside_the_workbench(web):
    wb = web
    code, body, headers = wb.get("/healthz")
    assert code == 200 and body["status"] == "ok"
    code, body, headers = wb.get("/api/reviews")
    assert code == 401 and body == {"error": "a bearer token is required"}
    assert headers.getRawHeaders("content-type") == ["application/json"]
    code, body, _ = wb.get("/api/nothing", wb.token("t", "technician"))
    assert code == 404 and body == {"error": "no such resource"}


def test_a_failure_is_logged_without_patient_data(web, monkeypatch):
    wb = web
    from exchange.store import reviews

    scene(wb)

    def broken(conn, review_id):
        raise RuntimeError("HANSON ELIZABETH GH-44107 1947-03-12")

    monkeypatch.setattr(reviews, "review_detail", broken)
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        page = logged_in(wb).get("/reviews/1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert page.code == 500 and "HANSON" not in page.text
    from twisted.logger import formatEvent

    text = "\n".join(formatEvent(e) for e in events)
    assert "RuntimeError" in text and "HANSON" not in text and "GH-44107" not in text


def test_sending_a_copy_again_after_newer_ones_about_the_patient_takes_the_box(wb):
    """Found by a black-box audit: an old A08 sent again after the discharge landed last."""
    failed, _ = two_copies(wb, "SRC-9", "AE: busy", second_delivered=True)
    browser = logged_in(wb, "ops", "admin")
    page = browser.get("/deliveries")
    assert 'name="force"' in page.text
    refused = browser.post(f"/deliveries/{failed}/retry", {"csrf": page.csrf()})
    assert refused.code == 409 and "Newer copies about this patient reached the destination since" in refused.text
    assert wb.requeued == []
    done = browser.post(f"/deliveries/{failed}/retry", {"csrf": page.csrf(), "force": "1"})
    assert (done.code, done.location) == (303, "/deliveries") and wb.requeued == ["OAKNH"]
