"""The HTTP API in memory (StubTreq over the real routes and a real database,
SQLite and PostgreSQL): authentication, roles, the message resource, 404s and
the audit trail."""
from __future__ import annotations

from datetime import timedelta

from treq.testing import StubTreq
from twisted.internet.defer import fail
from twisted.logger import formatEvent, globalLogPublisher

from exchange.outcome import MessageState
from exchange.store.db import write_transaction
from exchange.store.messages import record_resent
from exchange.web.api import API
from exchange.web.server import build_root
from tests.web.support import T0, Harness, message

MESSAGE = "/api/messages/GENHOSP/MSG-1"


def test_without_a_token_401(api: Harness):
    api.store(message())
    for headers in ({}, {"Authorization": "Basic YW5uOnB3"}, {"Authorization": "Bearer"}, {"Authorization": "Bearer " + "x" * 300}):
        code, body, headers_ = api.get(MESSAGE, headers=headers)
        assert code == 401 and "error" in body
        assert headers_.getRawHeaders("www-authenticate")[0].startswith("Bearer")
    assert api.audit() == []  # nobody to attribute: nothing audited, nothing read


def test_unknown_and_revoked_tokens_401(api: Harness):
    api.store(message())
    token = api.token("ann", "admin")
    assert api.get(MESSAGE, "exk_not-a-token")[0] == 401
    api.revoke("ann")
    code, body, headers = api.get(MESSAGE, token)
    assert code == 401 and body == {"error": "unknown or revoked token"}
    assert headers.getRawHeaders("www-authenticate")
    # A security officer sees both attempts; the revoked one names whom it was issued to.
    # Nothing was read, so nothing names the message's facility.
    rows = [(r["actor"], r["role"], r["action"], r["resource"], r["facility"], r["key"], r["outcome"])
            for r in api.audit()]
    assert rows == [
        ("-", "-", "authenticate", "token", None, "GET /api/messages/GENHOSP/MSG-1", "unauthorized"),
        ("ann", "-", "authenticate", "token", None, "GET /api/messages/GENHOSP/MSG-1", "unauthorized"),
    ]


def test_no_route_without_a_valid_token_is_a_401_and_an_unknown_token_is_audited(api: Harness):
    """Found by a verification audit: a probe with a stolen or made-up token at paths that do
    not exist left no trace. Found by a contract audit: without a token, a path that does not
    exist answered 404 and one that does 401 (which paths exist, told to anyone)."""
    assert api.get("/api/nothing/here", "exk_made-up")[0] == 401
    token = api.token("ann", "admin")
    response = api._result(api.stub.delete("http://exchange.test/api/persons/1",
                                           headers={"Authorization": "Bearer exk_made-up"}))
    assert response.code == 401
    assert api.get("/api/nothing/here", token)[0] == 404  # a valid token: nothing to record
    response = api._result(api.stub.delete("http://exchange.test/api/persons/1",
                                           headers={"Authorization": f"Bearer {token}"}))
    assert response.code == 405
    assert api.get("/api/nothing/here")[0] == 401  # no token: nobody to name
    assert [(r["actor"], r["action"], r["key"], r["outcome"]) for r in api.audit()] == [
        ("-", "authenticate", "GET /api/nothing/here", "unauthorized"),
        ("-", "authenticate", "DELETE /api/persons/1", "unauthorized"),
    ]


def test_a_token_works_at_once_and_is_cached_for_a_while(api: Harness):
    api.store(message())
    token = api.token("ann", "admin")
    assert api.get(MESSAGE, token)[0] == 200
    calls = api.db.calls
    assert api.get(MESSAGE, token)[0] == 200
    assert api.db.calls == calls + 1  # the read only: the token came from the cache
    api.revoke("ann")
    assert api.get(MESSAGE, token)[0] == 200  # still cached...
    api.clock.t += 30
    assert api.get(MESSAGE, token)[0] == 401  # ...for at most the TTL


def test_technician_may_not_read_messages_403_audited(api: Harness):
    api.store(message())
    token = api.token("tess", "technician")
    code, body, _ = api.get(MESSAGE, token)
    assert code == 403 and "error" in body
    [row] = api.audit()
    assert (row["actor"], row["role"], row["action"], row["resource"], row["outcome"]) == (
        "tess", "technician", "read", "message", "forbidden",
    )
    assert (row["facility"], row["key"]) == ("GENHOSP", "MSG-1")


def test_admin_reads_a_message(api: Harness):
    resent_at = T0 + timedelta(minutes=5)
    [id_] = api.store(message())
    with write_transaction(api.engine) as conn:
        record_resent(conn, [(id_, resent_at, "127.0.0.1:50999")])
    token = api.token("ann", "admin")
    code, body, headers = api.get(MESSAGE, token)
    assert code == 200
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert body == {
        "facility": "GENHOSP",
        "control_id": "MSG-1",
        "type": "ADT^A01",
        "event": "A01",
        "structure": "ADT_A01",
        "version": "2.5.1",
        "state": "accepted",
        "ack_code": "AA",
        "received_at": "2026-11-27T12:00:00.123456Z",
        "reason": None,
        "history": [
            {"at": "2026-11-27T12:00:00.123456Z", "state": "accepted", "detail": None},
            {"at": "2026-11-27T12:05:00.123456Z", "state": "resent", "detail": "127.0.0.1:50999"},
        ],
        "deliveries": [],
    }
    assert "raw" not in body and "TESTPATIENT" not in str(body)  # never the message itself
    [row] = api.audit()
    assert (row["actor"], row["role"], row["outcome"], row["facility"], row["key"]) == (
        "ann", "admin", "ok", "GENHOSP", "MSG-1",
    )
    assert row["at"] == api.now and row["remote"] == "127.0.0.1"


def test_a_rejected_message_shows_its_reason_and_the_applied_copy_wins(api: Harness):
    api.store(
        message("R-1", state=MessageState.REJECTED, ack_code="AR", reason="unknown facility", dedup=False),
    )
    token = api.token("ann", "admin")
    code, body, _ = api.get("/api/messages/GENHOSP/R-1", token)
    assert code == 200
    assert (body["state"], body["ack_code"], body["reason"]) == ("rejected", "AR", "unknown facility")
    api.store(message("R-1", received_at=T0 + timedelta(seconds=1)))
    assert api.get("/api/messages/GENHOSP/R-1", token)[1]["state"] == "accepted"


def test_unknown_message_404_audited(api: Harness):
    token = api.token("ann", "admin")
    code, body, _ = api.get("/api/messages/GENHOSP/NOPE", token)
    assert code == 404 and body == {"error": "no such message"}
    assert api.get("/api/messages/OTHER/MSG-1", token)[0] == 404
    rows = api.audit()
    assert [(r["actor"], r["outcome"], r["facility"], r["key"]) for r in rows] == [
        ("ann", "not-found", "GENHOSP", "NOPE"),
        ("ann", "not-found", "OTHER", "MSG-1"),
    ]


def test_control_ids_with_slashes_and_spaces(api: Harness):
    api.store(message("2026/11 27%41"))
    token = api.token("ann", "admin")
    code, body, _ = api.get("/api/messages/GENHOSP/2026%2F11%2027%2541", token)
    assert code == 200 and body["control_id"] == "2026/11 27%41"


def test_control_characters_are_a_bad_request(api: Harness):
    token = api.token("ann", "admin")
    code, body, _ = api.get("/api/messages/GENHOSP/A%00B", token)
    assert code == 400 and "control characters" in body["error"]
    assert api.get("/api/messages/GENHOSP/A%00B")[0] == 401


def test_unknown_api_paths_404_json(api: Harness):
    token = api.token("ann", "admin")
    for path in ("/api", "/api/", "/api/nothing", "/api/messages/GENHOSP", "/api/messages"):
        code, body, headers = api.get(path, token)
        assert code == 404 and body == {"error": "no such resource"}, path
        assert headers.getRawHeaders("content-type") == ["application/json"]


def test_post_to_a_read_only_resource_405(api: Harness):
    token = api.token("ann", "admin")
    response = api._result(
        api.stub.post("http://exchange.test" + MESSAGE, headers={"Authorization": f"Bearer {token}"})
    )
    assert response.code == 405 and "GET" in response.headers.getRawHeaders("allow")[0]


def test_get_of_the_merge_path_is_a_405_naming_post(api: Harness):
    """GET /api/persons/merge read as the person "merge" (400 "a person id is a number")."""
    token = api.token("ann", "admin")
    response = api._result(api.stub.get("http://exchange.test/api/persons/merge",
                                        headers={"Authorization": f"Bearer {token}"}))
    assert response.code == 405 and response.headers.getRawHeaders("allow") == ["POST"]
    response = api._result(api.stub.delete("http://exchange.test/api/persons/merge",
                                           headers={"Authorization": f"Bearer {token}"}))
    assert response.code == 405 and response.headers.getRawHeaders("allow") == ["POST"]
    assert api.get("/api/persons/merge")[0] == 401


def test_healthz_needs_no_token(api: Harness):
    code, body, _ = api.get("/healthz")
    assert code == 200 and body["status"] == "ok"


def test_a_failing_read_answers_500_and_logs_no_identifiers(api: Harness):
    token = api.token("ann", "admin")
    api.get(MESSAGE, token)  # cache the token

    class Broken:
        def read(self, fn, *args):
            raise AssertionError("the token is cached")

        def write(self, fn, *args):
            return fail(RuntimeError("SELECT ... WHERE control_id = 'SECRET-CONTROL-ID'"))

    broken = API(Broken(), api.tokens, lambda: api.now, config=api.api.config)
    api.stub = StubTreq(build_root(lambda: {}, broken.resource()))
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        code, body, _ = api.get("/api/messages/GENHOSP/SECRET-CONTROL-ID", token)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert code == 500 and body == {"error": "internal error"}
    logged = " ".join(formatEvent(e) for e in events)
    assert "RuntimeError" in logged and "SECRET-CONTROL-ID" not in logged
