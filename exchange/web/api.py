"""The HTTP API: ``/api/...``, JSON, bearer tokens, every read audited.

``API`` holds its services (the database, the token cache, a clock) and its
routes are methods (Klein). Mounted at ``/api`` by ``exchange.web.server``,
so the routes here are relative to it.

Each request: authenticate (401) -> check the role (403, audited) -> read and
write the audit row in ONE transaction on the database thread pool (404 or
200) -> JSON. Nothing here runs SQL on the reactor thread, and nothing logs a
request's identifiers: the audit table is the only place they go.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from klein import Klein
from sqlalchemy import Connection
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import MethodNotAllowed, NotFound

from exchange.audit import Action, AuditEvent, Named, Outcome, Resource, record, record_read, records_named
from exchange.config import Config
from exchange.auth import Permission, Principal, TokenCache, allowed, find_token, hash_token, revoked_token_name
from exchange.store.api import MessageSummary, message_summary
from exchange.store.outbox import DeliveryState, DeliveryView, RetryResult, list_deliveries, retry
from exchange.store import reviews
from exchange.store.records import record_view
from exchange.store.reviews import DecisionError, Trust

log = Logger()

MAX_TOKEN_CHARS = 200  # longer bearer values are refused before hashing
MAX_BODY_BYTES = 64 * 1024  # request bodies (decisions) larger than this are refused
MAX_ID_DIGITS = 18  # ids in paths and bodies (BIGINT)


def iso_utc(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z``: ``2026-11-27T12:00:00.000123Z``."""
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def message_json(m: MessageSummary) -> dict[str, Any]:
    return {
        "facility": m.facility,
        "control_id": m.control_id,
        "type": f"{m.message_type}^{m.event}" if m.event else m.message_type,  # MSH-9.1^MSH-9.2
        "event": m.event,
        "structure": m.structure,
        "version": m.version,
        "state": m.state.value,
        "ack_code": m.ack_code,
        "received_at": iso_utc(m.received_at),
        "reason": m.reason,
        "history": [{"at": iso_utc(h.at), "state": h.state.value, "detail": h.detail} for h in m.history],
        "deliveries": [
            {
                "id": d.id,
                "facility": d.destination,
                "state": d.state.value,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "control_id": d.control_id,
                "delivered_at": iso_utc(d.delivered_at),
            }
            for d in m.deliveries
        ],
    }


def delivery_json(d: DeliveryView) -> dict[str, Any]:
    """A copy for one destination: who received (``facility``) what (``message``) about
    whom (``person``, ``record``), when, and why; never the copy's text."""
    return {
        "id": d.id,
        "facility": d.destination,  # the destination
        "state": d.state.value,
        "attempts": d.attempts,
        "last_error": d.last_error,
        "control_id": d.control_id,  # the copy's MSH-10
        "created_at": iso_utc(d.created_at),
        "next_attempt_at": iso_utc(d.next_attempt_at) if d.state is DeliveryState.QUEUED else None,
        "delivered_at": iso_utc(d.delivered_at),
        "ack_code": d.ack_code,
        "message": {
            "facility": d.message_facility,
            "control_id": d.message_control_id,
            "type": f"{d.message_type}^{d.event}" if d.event else d.message_type,
        },
        "person": d.person_id,
        "record": {"facility": d.facility, "mrn": d.mrn},
        "reason": d.reason,
        "retried_by": d.retried_by,
        "retried_at": iso_utc(d.retried_at),
    }


DELIVERY_LIST_DEFAULT = 100
DELIVERY_LIST_MAX = 1000


def _deliveries(conn: Connection, state: str | None, facility: str | None, person: int | None, limit: int,
                after: int | None = None) -> list:
    return list_deliveries(conn, state, facility, limit, person_id=person, after=after)


def retry_audited(
    conn: Connection, delivery_id: int, actor: str, now: datetime, event: AuditEvent, config: Config,
    force: bool = False,
) -> tuple[RetryResult, DeliveryView | None]:
    """Requeue a failed copy (unless it may not go out any more under ``config``, the
    configuration the exchange runs, or, not ``force``d, newer copies about the patient
    reached the destination since) and write its audit row, one transaction."""
    result, view = retry(conn, delivery_id, actor, now, config=config, force=force)
    outcome = {RetryResult.REQUEUED: Outcome.OK, RetryResult.NOT_FOUND: Outcome.NOT_FOUND}.get(result, Outcome.INVALID)
    # the answer shows the copy (its record, the destination's quoted in last_error), refused or not
    record_read(conn, replace(event, facility=view.destination if view else None, outcome=outcome),
                Named(records_named(view)) if view is not None else None)
    return result, view


def _delivery_query(args: dict) -> tuple[tuple | None, str | None]:
    """(state, facility, person, limit, after) from ``?state=&facility=&person=&limit=&after=``, or a
    reason for 400."""

    def one(name: str) -> str | None:
        values = args.get(name.encode())
        return values[-1].decode("utf-8", "replace") if values else None

    state, facility, person, limit, after = one("state"), one("facility"), one("person"), one("limit"), one("after")
    states = ", ".join(s.value for s in DeliveryState)
    if state is not None and state not in {s.value for s in DeliveryState}:
        return None, f"state must be one of {states}"
    if facility is not None and (not facility or _bad_part(facility) or len(facility) > 64):
        return None, "facility must be a facility code"
    if person is not None and (not digits(person) or len(person) > 18):
        return None, "a person id is a number"
    if limit is not None and (not digits(limit) or not 1 <= int(limit) <= DELIVERY_LIST_MAX):
        return None, f"limit must be a number from 1 to {DELIVERY_LIST_MAX}"
    if after is not None and (not digits(after) or len(after) > 18):
        return None, "after must be a delivery id"
    return (state, facility, int(person) if person else None, int(limit) if limit else DELIVERY_LIST_DEFAULT,
            int(after) if after else None), None


def read_audited(conn: Connection, read: Callable[..., Any], args: tuple, event: AuditEvent) -> Any:
    """``read(conn, *args)`` and its audit row (ok / not-found), one transaction."""
    value = read(conn, *args)
    record_read(conn, replace(event, outcome=Outcome.OK if value is not None else Outcome.NOT_FOUND), value)
    return value


def decide_audited(conn: Connection, decide: Callable[..., Any], args: tuple, kwargs: dict, event: AuditEvent,
                   answered: bool = True) -> Any:
    """``decide(conn, *args, **kwargs)`` and its audit rows, one transaction: the decision's, and,
    when the caller is ``answered`` with the value (the API; the workbench redirects to a page
    audited as it is read), one per facility record it shows (a review's record and candidates, a
    split's or a merge's events), as for a read. A refused decision (``DecisionError``) is
    rolled back to a savepoint and audited with the records its reason names; it is returned
    as a value."""
    try:
        with conn.begin_nested():
            value = decide(conn, *args, **kwargs)
    except DecisionError as exc:
        record_read(conn, replace(event, outcome=Outcome.NOT_FOUND if exc.status == 404 else Outcome.INVALID),
                    Named(exc.records))
        return exc
    record_read(conn, replace(event, outcome=Outcome.OK), value if answered else None)
    return value


def _list_reviews(conn: Connection, state: str | None, limit: int, after: int | None) -> list:
    """The review listing as ``_get`` reads it (a list, never None: an empty page is no 404)."""
    return reviews.list_reviews(conn, state, limit=limit, after=after)


def audit_refused_token(conn: Connection, token_hash: str, event: AuditEvent) -> None:
    """The audit row of a call with an unknown or revoked token: a revoked one is
    attributed to the name it was issued to (someone whose access was taken away)."""
    record(conn, replace(event, actor=revoked_token_name(conn, token_hash) or "-"))


SUPERSEDED_TEXT = ("newer copies about this patient reached the destination since: sent now, this older event"
                   " would land after them")


class Unauthorized(Exception):
    """No usable bearer token (401)."""


class BadRequest(Exception):
    """A request the API will not try (400: not JSON; 422: a JSON body with a bad field)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def read_body(request) -> dict[str, Any]:
    """The request's JSON object (an empty body is ``{}``)."""
    raw = request.content.read(MAX_BODY_BYTES + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(400, f"the body is larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
        # a lone surrogate ("\ud800") is valid JSON but no text: it could be stored nowhere
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeError is a ValueError; RecursionError: "[[[[..."
        raise BadRequest(400, "the body must be a JSON object of UTF-8 text") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "the body must be a JSON object")
    return body


def only(body: dict[str, Any], *names: str) -> None:
    unknown = sorted(set(body) - set(names))
    if unknown:
        raise BadRequest(422, f"unknown field {unknown[0]!r} (expected {', '.join(names)})")


def body_id(body: dict[str, Any], name: str, value: Any = None) -> int | None:
    """An id field: a positive integer (or its digits as a string); None when absent."""
    value = body.get(name) if value is None else value
    if value is None:
        return None
    if isinstance(value, str) and digits(value) and len(value) <= MAX_ID_DIGITS:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 10**MAX_ID_DIGITS:
        raise BadRequest(422, f"{name} must be an id (a positive integer)")
    return value


def body_text(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(422, f"{name} is required")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise BadRequest(422, f"{name} must be {'non-empty ' if required else ''}text")
    if len(value) > reviews.MAX_REASON_CHARS:
        raise BadRequest(422, f"{name} must be at most {reviews.MAX_REASON_CHARS} characters")
    return value


def body_flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(422, f"{name} must be true or false")
    return value


def remote_host(request) -> str | None:
    """The client's address, for the audit row (None when not over IP)."""
    return getattr(request.getClientAddress(), "host", None)


def digits(value: str) -> bool:
    """Only the ASCII digits 0-9: str.isdigit() takes any script's digits (and "²", which
    int() refuses), so "١" would read person 1 and be audited as "١"."""
    return value.isascii() and value.isdigit()


def path_id(value: str) -> int | None:
    return int(value) if digits(value) and len(value) <= MAX_ID_DIGITS else None


def _bad_part(value: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)


class API:
    app = Klein()
    # The facility kinds the person's best view prefers, unless given (``trust=``): this
    # default knows no facility's kind, so recency alone decides.
    trust: Trust = Trust()

    def __init__(
        self,
        db: Any,
        tokens: TokenCache,
        now: Callable[[], datetime],
        *,
        requeued: Callable[[str], None] | None = None,
        trust: Trust | None = None,
        config: Config,
    ) -> None:
        """``db``: ``read(fn, *args)`` / ``write(fn, *args)`` returning Deferreds
        (``exchange.web.db.Database``); ``now``: the current aware datetime;
        ``requeued(facility)``: told after an operator requeued a copy for
        that destination (wakes its delivery worker); ``trust``: the facility
        kinds the person's best view prefers (``Trust.from_config(config)``);
        ``config``: the configuration the exchange runs (a copy it would not
        send any more is not requeued)."""
        self.db = db
        self.tokens = tokens
        self.now = now
        self.config = config
        self.requeued = requeued
        if trust is not None:
            self.trust = trust

    def resource(self):
        return self.app.resource()

    # -- plumbing -------------------------------------------------------------------

    @staticmethod
    def _json(request, code: int, body: dict) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()

    def _error(self, request, code: int, reason: str) -> bytes:
        if code == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="exchange"')
        return self._json(request, code, {"error": reason})

    async def _authenticate(self, request) -> Principal:
        header = request.getHeader(b"authorization")
        if not header:
            raise Unauthorized("a bearer token is required")
        scheme, _, token = header.decode("latin-1").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("a bearer token is required")
        token_hash = hash_token(token)
        principal = self.tokens.get(token_hash)
        if principal is None:
            principal = await self.db.read(find_token, token_hash)
            if principal is None:
                method = request.method.decode("latin-1")
                event = AuditEvent(at=self.now(), actor="-", role="-", action=Action.AUTHENTICATE,
                                   resource=Resource.TOKEN, facility=None, outcome=Outcome.UNAUTHORIZED,
                                   key=f"{method} {request.path.decode('latin-1')}", remote=remote_host(request))
                await self.db.write(audit_refused_token, token_hash, event)
                raise Unauthorized("unknown or revoked token")
            self.tokens.put(token_hash, principal)
        return principal

    async def _audited_read(
        self,
        request,
        permission: Permission,
        resource: Resource,
        facility: str | None,
        key: str | None,
        read: Callable[..., Any],
        args: tuple,
    ) -> tuple[int, Any]:
        """(status, value): 401 / 403 (audited) / 404 or 200 (audited with the read)."""
        principal = await self._authenticate(request)
        event = AuditEvent(
            at=self.now(),
            actor=principal.name,
            role=principal.role.value,
            action=Action.READ,
            resource=resource,
            facility=facility,
            key=key,
            outcome=Outcome.FORBIDDEN,
            remote=remote_host(request),
        )
        if not allowed(principal.role, permission):
            await self.db.write(record, event)
            return 403, None
        value = await self.db.write(read_audited, read, args, event)
        return (404, None) if value is None else (200, value)

    # -- routes ---------------------------------------------------------------------

    async def _get(
        self,
        request,
        permission: Permission,
        resource: Resource,
        facility: str | None,
        key: str,
        read: Callable[..., Any],
        args: tuple,
        render: Callable[[Any], dict],
        what: str | None = None,
    ) -> bytes:
        """One audited GET: 400 / 401 / 403 / 404 / 200 with ``render(value)``."""
        what = what or resource.value
        try:
            if _bad_part(facility or "") or _bad_part(key):
                await self._authenticate(request)
                return self._error(request, 400, "the path must not contain control characters")
            code, value = await self._audited_read(request, permission, resource, facility, key, read, args)
        except Unauthorized as exc:
            return self._error(request, 401, str(exc))
        except Exception as exc:  # noqa: BLE001 - answered 500; logged without the request's identifiers
            return self._internal(request, what, exc)
        if code == 403:
            return self._error(request, 403, f"this role may not read {what}s")
        if code == 404:
            return self._error(request, 404, f"no such {what}")
        return self._json(request, 200, render(value))

    # twisted.web has percent-decoded each path segment already; MSH-10 and
    # MRNs may hold a "/" (sent as %2F), hence the path converter for the last part.
    @app.route("/messages/<facility>/<path:control_id>", methods=["GET"])
    async def get_message(self, request, facility: str, control_id: str) -> bytes:
        return await self._get(
            request, Permission.READ_MESSAGE, Resource.MESSAGE, facility, control_id,
            message_summary, (facility, control_id), message_json,
        )

    @app.route("/records/<facility>/<path:mrn>", methods=["GET"])
    async def get_record(self, request, facility: str, mrn: str) -> bytes:
        return await self._get(
            request, Permission.READ_RECORD, Resource.RECORD, facility, mrn, record_view, (facility, mrn), dict
        )

    @app.route("/persons/<person>", methods=["GET"])
    async def get_person(self, request, person: str) -> bytes:
        """The person, its records (link, score) and its best view; ``merged_into`` once merged away."""
        if person == "merge":  # POST /persons/merge's path, which this route's pattern also matches
            return await self.not_allowed(request, Failure(MethodNotAllowed(valid_methods=["POST"])))
        if path_id(person) is None:
            return await self._bad_path(request, "a person id is a number")
        return await self._get(
            request, Permission.READ_PERSON, Resource.PERSON, None, str(int(person)), reviews.person_view,
            (int(person), self.trust), dict,
        )

    # -- the patient index: reviews and technicians' decisions (exchange.store.reviews) --

    async def _bad_path(self, request, reason: str) -> bytes:
        """401 without a token, else 400 with ``reason``."""
        try:
            await self._authenticate(request)
        except Unauthorized as exc:
            return self._error(request, 401, str(exc))
        return self._error(request, 400, reason)

    @app.route("/reviews", methods=["GET"])
    async def list_reviews(self, request) -> bytes:
        """``?state=open`` (default; ``resolved``, ``superseded``, ``all``), ``&limit=100`` (at most
        1000) ``&after=ID``: oldest first; ``next`` is the ``after`` of the next page (None: no more)."""
        def arg(name: str, default: str) -> str:
            values = request.args.get(name.encode())
            return values[-1].decode("utf-8", "replace") if values else default

        state, limit, after = arg("state", "open"), arg("limit", "100"), arg("after", "")
        states = [s.value for s in reviews.ReviewState]
        if state not in states + ["all"]:
            return await self._bad_path(request, f"state must be one of {', '.join(states)} or all")
        if not digits(limit) or not 1 <= int(limit) <= reviews.MAX_PAGE:
            return await self._bad_path(request, f"limit must be a number from 1 to {reviews.MAX_PAGE}")
        if after and path_id(after) is None:
            return await self._bad_path(request, "after must be a review id")
        n = int(limit)

        def render(rows: list) -> dict:
            return {"reviews": rows, "next": rows[-1]["id"] if len(rows) == n else None}

        return await self._get(
            request, Permission.READ_REVIEW, Resource.REVIEW, None,
            f"state={state}" + (f"&after={after}" if after else ""), _list_reviews,
            (None if state == "all" else state, n, int(after) if after else None), render,
        )

    @app.route("/reviews/<review>", methods=["GET"])
    async def get_review(self, request, review: str) -> bytes:
        """One review with its records side by side (exchange.store.reviews.review_detail)."""
        if path_id(review) is None:
            return await self._bad_path(request, "a review id is a number")
        return await self._get(
            request, Permission.READ_REVIEW, Resource.REVIEW, None, str(int(review)), reviews.review_detail,
            (int(review),), dict
        )

    @app.route("/reviews/<review>", methods=["POST"])
    async def decide_review(self, request, review: str) -> bytes:
        """``{"decision": "link" | "not-a-match", "person"?: id, "candidate"?: {"facility", "mrn"},
        "reason"?: text, "force"?: bool}`` -> the resolved review (the links have changed)."""
        review_id = path_id(review)
        if review_id is None:
            return await self._bad_path(request, "a review id is a number")

        def parse(body: dict) -> tuple:
            only(body, "decision", "person", "candidate", "reason", "force")
            verdict = body.get("decision")
            if verdict not in [v.value for v in reviews.Verdict]:
                raise BadRequest(422, 'decision must be "link" or "not-a-match"')
            candidate = body.get("candidate")
            if candidate is not None:
                if not isinstance(candidate, dict) or set(candidate) != {"facility", "mrn"} or not all(
                    isinstance(v, str) and v for v in candidate.values()
                ):
                    raise BadRequest(422, 'candidate must be {"facility": text, "mrn": text}')
                candidate = (candidate["facility"], candidate["mrn"])
            if verdict == reviews.Verdict.NOT_A_MATCH and (body.get("person") is not None or candidate):
                raise BadRequest(422, 'a person or a candidate only goes with "link"')
            kwargs = {"person_id": body_id(body, "person"), "candidate": candidate,
                      "reason": body_text(body, "reason"), "force": body_flag(body, "force")}
            return reviews.decide_review, (review_id, verdict), kwargs, None

        return await self._decide(request, Permission.DECIDE_REVIEW, Resource.REVIEW, str(review_id), parse)

    @app.route("/persons/<person>/split", methods=["POST"])
    async def split_person(self, request, person: str) -> bytes:
        """``{"facility", "mrn", "reason"?}``: that record leaves the person for a new one (sticky
        not-a-match against the records it leaves) -> the decision, ``person`` the new person."""
        person_id = path_id(person)
        if person_id is None:
            return await self._bad_path(request, "a person id is a number")

        def parse(body: dict) -> tuple:
            only(body, "facility", "mrn", "reason")
            facility, mrn = body_text(body, "facility", required=True), body_text(body, "mrn", required=True)
            return reviews.split_record, (person_id, facility, mrn), {"reason": body_text(body, "reason")}, None

        return await self._decide(request, Permission.DECIDE_PERSON, Resource.PERSON, str(person_id), parse)

    @app.route("/persons/<person>/opt-out", methods=["POST"])
    async def opt_out(self, request, person: str) -> bytes:
        """``{"protected": true|false, "reason"?}``: the patient's opt-out; while set, no
        copy about the person goes to any facility -> ``{"person", "opt_out"}``."""
        person_id = path_id(person)
        if person_id is None:
            return await self._bad_path(request, "a person id is a number")

        def parse(body: dict) -> tuple:
            only(body, "protected", "reason")
            if "protected" not in body:
                raise BadRequest(422, "protected (true or false) is required")
            return (reviews.set_opt_out, (person_id, body_flag(body, "protected")),
                    {"reason": body_text(body, "reason")}, None)

        return await self._decide(request, Permission.DECIDE_PERSON, Resource.PERSON, str(person_id), parse)

    @app.route("/persons/merge", methods=["POST"])
    async def merge_persons(self, request) -> bytes:
        """``{"persons": [keep, merge], "reason"?, "force"?}``: every record of ``merge`` moves to
        ``keep`` -> the decision, ``person`` the one kept."""
        def parse(body: dict) -> tuple:
            only(body, "persons", "reason", "force")
            persons = body.get("persons")
            if not isinstance(persons, list) or len(persons) != 2 or any(p is None for p in persons):
                raise BadRequest(422, "persons must be [keep, merge]: two person ids")
            keep, merge = (body_id(body, "persons", p) for p in persons)
            kwargs = {"reason": body_text(body, "reason"), "force": body_flag(body, "force")}
            return reviews.merge_persons, (keep, merge), kwargs, f"{keep}<-{merge}"

        return await self._decide(request, Permission.DECIDE_PERSON, Resource.PERSON, None, parse)

    @app.route("/decisions/<decision>/undo", methods=["POST"])
    async def undo_decision(self, request, decision: str) -> bytes:
        """``{"reason"?}``: undo a technician's decision -> the undo (a decision of its own)."""
        decision_id = path_id(decision)
        if decision_id is None:
            return await self._bad_path(request, "a decision id is a number")

        def parse(body: dict) -> tuple:
            only(body, "reason")
            return reviews.undo_decision, (decision_id,), {"reason": body_text(body, "reason")}, None

        return await self._decide(request, Permission.DECIDE_PERSON, Resource.PERSON, f"decision/{decision_id}",
                                  parse)

    @app.route("/decisions/<decision>", methods=["GET"])
    async def get_decision(self, request, decision: str) -> bytes:
        """A decision's link events and sticky pairs (automatic decisions too)."""
        if path_id(decision) is None:
            return await self._bad_path(request, "a decision id is a number")
        return await self._get(
            request, Permission.READ_PERSON, Resource.PERSON, None, f"decision/{int(decision)}", reviews.decision_view,
            (int(decision),), dict, what="decision",
        )

    @app.route("/persons/<person>/history", methods=["GET"])
    async def person_history(self, request, person: str) -> bytes:
        """Every link event into, out of or about the person's records, oldest first."""
        if path_id(person) is None:
            return await self._bad_path(request, "a person id is a number")
        return await self._get(
            request, Permission.READ_PERSON, Resource.PERSON, None, str(int(person)), reviews.person_history,
            (int(person),), dict,
        )

    async def _decide(self, request, permission: Permission, resource: Resource, key: str | None,
                      parse: Callable[[dict], tuple]) -> bytes:
        """One audited decision: 401 / 403 / 400 or 422 (bad body) / 404 / 409 / 422 (refused) / 200.

        ``parse(body)`` -> (store function, args, kwargs, audit key or None); the
        actor (the token's name) and the time are added here. The decision and
        its audit row commit together; a refused one leaves only its audit row.
        """
        what = resource.value
        try:
            principal = await self._authenticate(request)
        except Unauthorized as exc:
            return self._error(request, 401, str(exc))
        event = AuditEvent(
            at=self.now(), actor=principal.name, role=principal.role.value, action=Action.DECIDE,
            resource=resource, facility=None, key=key, outcome=Outcome.FORBIDDEN, remote=remote_host(request),
        )
        try:
            if not allowed(principal.role, permission):
                await self.db.write(record, event)
                return self._error(request, 403, f"this role may not decide {what}s")
            try:
                fn, args, kwargs, audit_key = parse(read_body(request))
            except BadRequest as exc:
                await self.db.write(record, replace(event, outcome=Outcome.INVALID))
                return self._error(request, exc.status, exc.reason)
            if audit_key is not None:
                event = replace(event, key=audit_key)
            kwargs = {**kwargs, "actor": principal.name, "now": self.now()}
            value = await self.db.write(decide_audited, fn, args, kwargs, event)
        except Exception as exc:  # noqa: BLE001 - answered 500; logged without the request's identifiers
            return self._internal(request, what, exc)
        if isinstance(value, DecisionError):
            return self._error(request, value.status, value.reason)
        return self._json(request, 200, value)

    # -- deliveries: the outbox, and the accounting of disclosures ---------------------

    @app.route("/deliveries", methods=["GET"])
    async def get_deliveries(self, request) -> bytes:
        """``?state=queued|failed|delivered&facility=DEST&person=ID&limit=N&after=ID`` (all optional):
        queued ones oldest first, otherwise newest first; ``next``: the ``after`` of the next page
        (None: no more). Audited like every read."""
        try:
            await self._authenticate(request)
            query, problem = _delivery_query(request.args)
            if problem is not None:
                return self._error(request, 400, problem)
            state, facility, person, limit, after = query
            key = "&".join(f"{name}={value}" for name, value in (("state", state), ("person", person), ("after", after))
                           if value is not None) or None
            code, value = await self._audited_read(
                request, Permission.READ_DELIVERY, Resource.DELIVERY, facility, key, _deliveries, query
            )
        except Unauthorized as exc:
            return self._error(request, 401, str(exc))
        except Exception as exc:  # noqa: BLE001 - answered 500; logged without the request's identifiers
            return self._internal(request, "delivery", exc)
        if code == 403:
            return self._error(request, 403, "this role may not read deliveries")
        return self._json(request, 200, {"deliveries": [delivery_json(d) for d in value],
                                         "next": value[-1].id if len(value) == limit else None})

    @app.route("/deliveries/<delivery_id>/retry", methods=["POST"])
    async def retry_delivery(self, request, delivery_id: str) -> bytes:
        """An operator sends a failed copy again: 200 with the delivery (queued), 404,
        409 when it is not failed or may not go out any more. Audited (an operator's decision)."""
        try:
            principal = await self._authenticate(request)
            if not digits(delivery_id) or len(delivery_id) > 18:
                return self._error(request, 400, "a delivery id is a number")
            event = AuditEvent(
                at=self.now(),
                actor=principal.name,
                role=principal.role.value,
                action=Action.DECIDE,  # to send it again
                resource=Resource.DELIVERY,
                facility=None,
                key=str(int(delivery_id)),  # audited as its number: "0007" as "7"
                outcome=Outcome.FORBIDDEN,
                remote=remote_host(request),
            )
            if not allowed(principal.role, Permission.RETRY_DELIVERY):
                await self.db.write(record, event)
                return self._error(request, 403, "this role may not retry deliveries")
            try:
                body = read_body(request)
                only(body, "force")
                force = body_flag(body, "force")
            except BadRequest as exc:
                return self._error(request, exc.status, exc.reason)
            result, view = await self.db.write(retry_audited, int(delivery_id), principal.name, self.now(), event,
                                               self.config, force)
        except Unauthorized as exc:
            return self._error(request, 401, str(exc))
        except Exception as exc:  # noqa: BLE001
            return self._internal(request, "delivery", exc)
        if result is RetryResult.NOT_FOUND:
            return self._error(request, 404, "no such delivery")
        if result is RetryResult.NOT_FAILED:
            return self._json(
                request,
                409,
                {"error": f"only a failed delivery can be retried (this one is {view.state.value})", "delivery": delivery_json(view)},
            )
        if result is RetryResult.WITHHELD:
            return self._json(
                request,
                409,
                {"error": "this copy may not go out any more: the person has opted out, the destination's"
                          " record is no longer linked to them, or the configuration no longer sends it there",
                 "delivery": delivery_json(view)},
            )
        if result is RetryResult.SUPERSEDED:
            return self._json(request, 409, {"error": SUPERSEDED_TEXT + ': give "force": true to send it anyway',
                                             "delivery": delivery_json(view)})
        if self.requeued is not None:
            self.requeued(view.destination)
        return self._json(request, 200, delivery_json(view))

    def _internal(self, request, what: str, exc: BaseException) -> bytes:
        # The exception text can quote SQL parameters (identifiers): log its type only.
        log.error("api: reading a {what} failed: {error}", what=what, error=type(exc).__name__)
        return self._error(request, 500, "internal error")

    async def _unauthenticated(self, request) -> bytes | None:
        """A call to no route (or with a method its route does not take) is answered 401 without a
        valid token, as every other: the caller learns nothing of which paths exist. An unknown or
        revoked token is audited (``_authenticate`` writes the row). None: the token is good."""
        try:
            await self._authenticate(request)
        except Unauthorized as exc:
            return self._error(request, 401, str(exc))
        return None

    @app.handle_errors(NotFound)
    async def not_found(self, request, failure) -> bytes:
        return await self._unauthenticated(request) or self._error(request, 404, "no such resource")

    @app.handle_errors(MethodNotAllowed)
    async def not_allowed(self, request, failure) -> bytes:
        refused = await self._unauthenticated(request)
        if refused is not None:
            return refused
        methods = sorted(getattr(failure.value, "valid_methods", None) or ())
        if request.path.rstrip(b"/").endswith(b"/persons/merge"):  # its GET is a 405 too (get_person)
            methods = ["POST"]
        if methods:
            request.setHeader(b"allow", ", ".join(methods).encode())
        return self._error(request, 405, "method not allowed")
