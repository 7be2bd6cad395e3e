"""The workbench: server-rendered pages for records technicians and admins, at ``/``.

``Workbench`` holds its services (the database thread pool, the clock, the
session policy) and its routes are methods (Klein), like ``exchange.web.api``,
whose store functions and audit helpers it reuses: a decision taken here is
the same call, in the same kind of transaction with the same audit row, as
``POST /api/reviews/{id}``. What each page shows is built by
``exchange.web.pages`` (pure) and laid out by Jinja templates
(``exchange/web/templates``, autoescaped).

Each request: session cookie -> session (303 to ``/login?next=...`` without
one) -> for a POST, the session's CSRF token (403) -> the role (403 page,
audited) -> read and audit in ONE transaction on the database thread pool
(404 page or the page) or decide and audit (a reason page, or 303 back to
the page). Nothing here runs SQL or hashes a password on the reactor
thread, and nothing logs a request's identifiers or a patient's data.

Logins: the password is checked in a worker thread against the user's
scrypt hash (a dummy one for unknown names, so both take as long); a wrong
one is answered after a short pause, with the same words whatever went
wrong, and counted (``exchange.accounts``: a lock-out after
``[workbench] login_attempts``). The login form carries a token of its own
(a ``SameSite=Strict`` cookie and a hidden field), so no other site can
log a browser in.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from klein import Klein
from sqlalchemy import Connection, select
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from exchange.accounts import (
    MAX_PASSWORD_CHARS,
    LoginOutcome,
    Policy,
    SessionInfo,
    check_name,
    complete_login,
    dummy_hash,
    end_session,
    find_session,
    find_user,
    hash_password,
    needs_rehash,
    needs_touch,
    new_csrf_token,
    new_session_token,
    same_token,
    session_expired,
    session_id,
    touch_session,
    verify_password,
)
from exchange.audit import Action, AuditEvent, Outcome, Resource as Audited, record
from exchange.auth import Permission, allowed
from exchange.config import Config
from exchange.store import reviews
from exchange.store.outbox import DeliveryState, RetryResult, list_deliveries
from exchange.store.records import record_view
from exchange.store.reviews import DecisionError, Trust
from exchange.store.schema import person_table
from exchange.web import pages
from exchange.web.api import (
    MAX_ID_DIGITS, SUPERSEDED_TEXT, decide_audited, digits, path_id, read_audited, remote_host, retry_audited,
)

log = Logger()

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STYLESHEET = HERE / "static" / "workbench.css"

SESSION_COOKIE = b"exchange_session"
LOGIN_COOKIE = b"exchange_login"  # the login form's own CSRF token
MAX_COOKIE_CHARS = 100
MAX_FIELD_CHARS = 4000  # form fields (reasons are at most reviews.MAX_REASON_CHARS)
PAGE_SIZE = 50  # reviews a page
DELIVERIES_SHOWN = 200  # failed and queued copies each
DISCLOSURES_SHOWN = 1000  # a person's delivered copies on its accounting page (the API pages through more)
FAILED_LOGIN_PAUSE = (0.5, 1.0)  # seconds, drawn between: a wrong password is answered this much later

SECURITY_HEADERS = (
    (b"content-security-policy",
     b"default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),  # patient data must not stay in a browser's or a proxy's cache
)

TEMPLATE_NAMES = ("login.html", "reviews.html", "review.html", "person.html", "record.html", "deliveries.html",
                  "disclosures.html", "error.html")


class Respond(Exception):
    """Answer the request with ``body`` now (its code and headers are set already)."""

    def __init__(self, body: bytes) -> None:
        super().__init__("respond")
        self.body = body


class FormError(Exception):
    """A form or query the workbench will not act on (400, one-line reason)."""


# -- transactions (run on the database thread pool) ---------------------------------------


def _check_password(password: str, stored: str | None) -> tuple[bool, str | None]:
    """In a worker thread: scrypt is slow on purpose. Unknown users are checked against a
    dummy hash, so that the answer takes as long. Also the password's new hash when the
    stored one was made with older parameters (stored if the login succeeds)."""
    ok = verify_password(password, stored if stored is not None else dummy_hash()) and stored is not None
    return ok, hash_password(password) if ok and needs_rehash(stored) else None


def _login(conn: Connection, name: str, verified_hash: str, checked: tuple[bool, str | None], now: datetime,
           policy: Policy, token: str, csrf: str, old_session: str | None, event: AuditEvent):
    """Finish a login and audit it, one transaction; the browser's old session (if any) ends."""
    if old_session is not None:
        end_session(conn, old_session)
    password_ok, rehash = checked
    result = complete_login(conn, name, verified_hash, password_ok, now, policy, token, csrf, rehash)
    record(conn, replace(event, role=result.role or "-",
                         outcome=Outcome.OK if result.outcome is LoginOutcome.OK else Outcome.FORBIDDEN))
    return result


def _logout(conn: Connection, sid: str, event: AuditEvent) -> None:
    end_session(conn, sid)
    record(conn, event)


def _person(conn: Connection, person_id: int, trust: Trust):
    """A person's view and its link history, one read."""
    view = reviews.person_view(conn, person_id, trust)
    return None if view is None else (view, reviews.person_history(conn, person_id))


def _deliveries(conn: Connection, limit: int):
    return (list_deliveries(conn, DeliveryState.FAILED, None, limit),
            list_deliveries(conn, DeliveryState.QUEUED, None, limit))


def _disclosures(conn: Connection, person_id: int, limit: int):
    """A person's accounting of disclosures (its delivered copies, newest first), None if no such person."""
    if conn.execute(select(person_table.c.id).where(person_table.c.id == person_id)).first() is None:
        return None
    return list_deliveries(conn, DeliveryState.DELIVERED, None, limit, person_id=person_id)


def _reviews(conn: Connection, state: str | None, limit: int, after: int | None) -> tuple[list, bool]:
    """A page of the queue and whether more follow it: one more row is read than is shown
    (and audited), so a full last page offers no "Next page" that leads nowhere."""
    rows = reviews.list_reviews(conn, state, limit=limit + 1, after=after)
    return rows[:limit], len(rows) > limit


# -- plumbing ----------------------------------------------------------------------------------


def handled(route: Callable) -> Callable:
    """A route's answers: ``Respond`` as it says, anything unexpected as a 500 page whose log
    line names the route and the exception's type only (its text may quote patient data)."""

    @functools.wraps(route)
    async def wrapper(self: Workbench, request, *args, **kwargs):
        try:
            return await route(self, request, *args, **kwargs)
        except Respond as answer:
            return answer.body
        except FormError as exc:
            return self._error(request, 400, "Bad request", str(exc))
        except Exception as exc:  # noqa: BLE001 - answered 500; logged without identifiers
            log.error("workbench: {route} failed: {error}", route=route.__name__, error=type(exc).__name__)
            return self._error(request, 500, "Something went wrong", "The exchange could not do that. Try again.")

    return wrapper


def id_in_path(value: str, what: str) -> int:
    """The id a path names (``exchange.web.api.path_id``); a FormError otherwise."""
    number = path_id(value)
    if number is None:
        raise FormError(f"a {what} id is a number")
    return number


def _fields(request) -> dict[bytes, list[bytes]]:
    """A GET's query fields; a POST's body fields only (request.args mixes the query string in,
    which would let a CSRF token or a decision ride in a URL, into logs and histories)."""
    if request.method != b"POST":
        return request.args
    cached = getattr(request, "_exchange_body_fields", None)
    if cached is None:
        body = b""
        if request.content is not None:
            request.content.seek(0)
            body = request.content.read()
            request.content.seek(0)
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        cached = parse_qs(body, keep_blank_values=True) if ctype == b"application/x-www-form-urlencoded" else {}
        request._exchange_body_fields = cached
    return cached


def _next_field(request) -> str | None:
    """The login's ``next``; one that is too long or not text is ignored like any unsafe one."""
    try:
        return form_text(request, "next", limit=pages.MAX_NEXT_CHARS)
    except FormError:
        return None


def _unsaved_field(request) -> bool:
    """Whether the request carries ``unsaved=1`` (its query, or the login form's body): the
    last form was posted after the session had expired and was not acted on."""
    return _fields(request).get(pages.UNSAVED.encode()) == [b"1"]


def form_text(request, name: str, *, required: bool = False, limit: int = MAX_FIELD_CHARS) -> str | None:
    """A form (or query) field's last value as text; None when absent (or blank, unless required)."""
    values = _fields(request).get(name.encode())
    if not values:
        if required:
            raise FormError(f"{name} is required")
        return None
    try:
        value = values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(f"{name} is not UTF-8 text") from None
    if len(value) > limit:
        raise FormError(f"{name} must be at most {limit} characters")
    if any(ord(c) < 0x20 and c not in "\t\r\n" for c in value):
        raise FormError(f"{name} must not contain control characters")
    if not value.strip():
        if required:
            raise FormError(f"{name} is required")
        return None
    return value


def form_id(request, name: str, *, required: bool = True) -> int | None:
    value = form_text(request, name, required=required, limit=MAX_ID_DIGITS + 2)
    if value is None:
        return None
    value = value.strip()
    if not digits(value) or len(value) > MAX_ID_DIGITS or int(value) == 0:
        raise FormError(f"{name} must be an id (a positive number)")
    return int(value)


def form_flag(request, name: str) -> bool:
    return form_text(request, name, limit=10) in ("1", "on", "true", "yes")


def form_reason(request) -> str | None:
    return form_text(request, "reason", limit=reviews.MAX_REASON_CHARS)


class Guarded(Resource):
    """The workbench's resource with its security headers on every answer."""

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self.inner = inner

    def render(self, request):
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        return self.inner.render(request)


def _later(reactor: Any) -> Callable[[float], Deferred]:
    return lambda seconds: deferLater(reactor, seconds, lambda: None)


class Workbench:
    app = Klein()
    trust: Trust = Trust()

    def __init__(
        self,
        db: Any,
        now: Callable[[], datetime],
        *,
        policy: Policy = Policy(),
        trust: Trust | None = None,
        requeued: Callable[[str], None] | None = None,
        pause: Callable[[float], Deferred] | None = None,
        reactor: Any = None,
        config: Config,
    ) -> None:
        """``db``: ``read``/``write(fn, *args)`` (a transaction) and ``run(fn, *args)`` (no
        connection) returning Deferreds of a call in the database thread pool
        (``exchange.web.db.Database``); ``now``: the current aware datetime; ``policy``: the
        sessions' lifetimes and the lock-out; ``requeued(facility)``: told after an admin
        requeued a copy; ``pause(seconds)``: a Deferred that fires that much later (the answer
        to a wrong password; default ``reactor``'s clock); ``config``: the configuration the
        exchange runs (a copy it would not send any more is not requeued)."""
        self.db = db
        self.config = config
        # The header's record lookup offers the configured facilities (code, name).
        self.facilities = tuple((f.code, f.name) for f in config.facilities)
        self.now = now
        self.policy = policy
        self.requeued = requeued
        if trust is not None:
            self.trust = trust
        if pause is None:
            if reactor is None:
                from twisted.internet import reactor
            pause = _later(reactor)
        self.pause = pause
        self.hashing = DeferredSemaphore(2)  # at most two scrypt checks at once: the pool also serves reads
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=jinja2.StrictUndefined,
            trim_blocks=True, lstrip_blocks=True, finalize=pages.visible,
        )
        self.env.filters["seg"] = pages.segment
        # Read once, here: no file I/O on the reactor thread while serving.
        self.templates = {name: self.env.get_template(name) for name in TEMPLATE_NAMES}
        self.stylesheet = STYLESHEET.read_bytes()

    def resource(self) -> IResource:
        return Guarded(self.app.resource())

    # -- answers ------------------------------------------------------------------------

    def _render(self, request, template: str, code: int = 200, *, session: SessionInfo | None = None,
                **context: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        can_deliveries = session is not None and allowed(session.role, Permission.READ_DELIVERY)
        return self.templates[template].render(user=session, can_deliveries=can_deliveries,
                                               facilities=self.facilities, unsaved=_unsaved_field(request),
                                               **context).encode()

    def _error(self, request, code: int, title: str, reason: str, *, session: SessionInfo | None = None,
               back: str | None = None) -> bytes:
        return self._render(request, "error.html", code, session=session, status=code, title=title, reason=reason,
                            back=back)

    @staticmethod
    def _redirect(request, location: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"location", location.encode("ascii"))
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b""

    @staticmethod
    def _set_cookie(request, name: bytes, value: str) -> None:
        request.addCookie(name, value, path=b"/", httpOnly=True, sameSite="strict", secure=request.isSecure())

    @staticmethod
    def _clear_cookie(request, name: bytes) -> None:
        request.addCookie(name, b"", path=b"/", max_age=b"0", expires=b"Thu, 01 Jan 1970 00:00:00 GMT",
                          httpOnly=True, sameSite="strict", secure=request.isSecure())

    # -- who is asking ----------------------------------------------------------------------

    @staticmethod
    def _cookie(request, name: bytes) -> str | None:
        raw = request.getCookie(name)
        if not raw or len(raw) > MAX_COOKIE_CHARS:
            return None
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return None

    async def _session(self, request) -> SessionInfo | None:
        """The browser's live session, or None. An expired one is deleted; a live one is
        marked seen (at most once a minute: a write)."""
        token = self._cookie(request, SESSION_COOKIE)
        if token is None:
            return None
        sid = session_id(token)
        session = await self.db.read(find_session, sid)
        if session is None:
            return None
        now = self.now()
        if session_expired(session, now, self.policy):
            await self.db.write(end_session, sid)
            return None
        if needs_touch(session, now, self.policy):
            await self.db.write(touch_session, sid, now)
            session = replace(session, last_seen_at=now)
        return session

    async def _viewer(self, request) -> SessionInfo:
        """The session of a GET; without one, 303 to the login page (coming back here after)."""
        session = await self._session(request)
        if session is None:
            raise Respond(self._redirect(request, pages.login_location(request.uri.decode("latin-1"))))
        return session

    async def _poster(self, request, permission: Permission, resource: Audited, key: str | None,
                      back: str) -> tuple[SessionInfo, AuditEvent]:
        """The session of a POST, its CSRF token checked, and its role: 303 to the login page,
        403 for a missing or wrong token, 403 (audited) for a role that may not."""
        session = await self._session(request)
        if session is None:  # e.g. idle too long: say so at the login and on the page after it
            raise Respond(self._redirect(request, pages.login_location(back, unsaved=True)))
        if not same_token(form_text(request, "csrf", limit=MAX_COOKIE_CHARS), session.csrf):
            raise Respond(self._error(request, 403, "Form expired",
                                      "This form is out of date or did not come from the workbench. "
                                      "Go back, reload the page and try again.", session=session, back=back))
        event = self._event(request, session, Action.DECIDE, resource, None, key)
        if not allowed(session.role, permission):
            await self.db.write(record, event)
            raise Respond(self._forbidden(request, session))
        return session, event

    def _event(self, request, session: SessionInfo, action: Action, resource: Audited, facility: str | None,
               key: str | None) -> AuditEvent:
        return AuditEvent(at=self.now(), actor=session.user, role=session.role.value, action=action,
                          resource=resource, facility=facility, key=key, outcome=Outcome.FORBIDDEN,
                          remote=remote_host(request))

    def _forbidden(self, request, session: SessionInfo) -> bytes:
        return self._error(request, 403, "Not allowed",
                           f"A {session.role.value} may not see or do this.", session=session)

    async def _read(self, request, session: SessionInfo, permission: Permission, resource: Audited,
                    facility: str | None, key: str, read: Callable[..., Any], args: tuple, what: str) -> Any:
        """An audited read: 403 (audited) / 404 (audited) page, else the value (audited with the read)."""
        event = self._event(request, session, Action.READ, resource, facility, key)
        if not allowed(session.role, permission):
            await self.db.write(record, event)
            raise Respond(self._forbidden(request, session))
        value = await self.db.write(read_audited, read, args, event)
        if value is None:
            raise Respond(self._error(request, 404, f"No such {what}", f"There is no {what} {key}.",
                                      session=session))
        return value

    async def _decision(self, request, permission: Permission, resource: Audited, key: str | None, back: str,
                        fn: Callable[..., Any], parse: Callable[[], tuple[tuple, dict]],
                        key_of: Callable[[tuple], str] | None = None) -> bytes:
        """A decision posted from a form: the session, CSRF token and role (``_poster``), the form
        read by ``parse() -> (args, kwargs)`` (a FormError: a 400 page, audited as invalid), then
        ``fn(*args, **kwargs)`` and its audit row in one transaction (``key_of(args)``, when given,
        is the audited key); a refused decision is a page with its reason, else 303 to ``back``."""
        session, event = await self._poster(request, permission, resource, key, back)
        try:
            args, kwargs = parse()
        except FormError as exc:
            await self.db.write(record, replace(event, outcome=Outcome.INVALID))
            return self._error(request, 400, "Bad request", str(exc), session=session, back=back)
        if key_of is not None:
            event = replace(event, key=key_of(args))
        kwargs = {**kwargs, "actor": session.user, "now": self.now()}
        value = await self.db.write(decide_audited, fn, args, kwargs, event, False)
        if isinstance(value, DecisionError):
            titles = {404: "Not found", 409: "Not done", 422: "Not done"}
            return self._error(request, value.status, titles.get(value.status, "Not done"), value.reason,
                               session=session, back=back)
        return self._redirect(request, back)

    # -- logging in and out --------------------------------------------------------------------

    def _login_form(self, request, code: int, *, next_: str, problem: str | None = None, name: str = "") -> bytes:
        """The login form (``unsaved`` rides along in it from the query: see ``_unsaved_field``)."""
        token = new_csrf_token()
        self._set_cookie(request, LOGIN_COOKIE, token)
        return self._render(request, "login.html", code, csrf=token, next=next_, problem=problem, name=name,
                            attempts=self.policy.attempts,
                            lockout_minutes=max(1, round(self.policy.lockout.total_seconds() / 60)))

    @app.route("/login", methods=["GET"])
    @handled
    async def login_page(self, request) -> bytes:
        next_ = pages.safe_next(_next_field(request))
        if await self._session(request) is not None:
            return self._redirect(request, self._after_login(request, next_))
        return self._login_form(request, 200, next_=next_)

    @staticmethod
    def _after_login(request, next_: str) -> str:
        """Where a login goes: ``next_``, marked when the form that sent the user here was not saved."""
        return pages.with_unsaved(next_) if _unsaved_field(request) else next_

    @app.route("/login", methods=["POST"])
    @handled
    async def login(self, request) -> bytes:
        next_ = pages.safe_next(_next_field(request))
        if not same_token(form_text(request, "csrf", limit=MAX_COOKIE_CHARS), self._cookie(request, LOGIN_COOKIE)):
            return self._login_form(request, 403, next_=next_,
                                    problem="The login form had expired. Please log in again.")
        name = (form_text(request, "name", limit=200) or "").strip()
        password = form_text(request, "password", limit=MAX_PASSWORD_CHARS) or ""
        now = self.now()
        event = AuditEvent(at=now, actor=name if check_name(name) is None else "-", role="-", action=Action.LOGIN,
                           resource=Audited.SESSION, facility=None, key=None, outcome=Outcome.FORBIDDEN,
                           remote=remote_host(request))
        ok, result = False, None
        if check_name(name) is None and password:
            user = await self.db.read(find_user, name)
            stored = user.password_hash if user is not None else None
            ok = await self.hashing.run(self.db.run, _check_password, password, stored)
            token, csrf = new_session_token(), new_csrf_token()
            old = self._cookie(request, SESSION_COOKIE)
            result = await self.db.write(_login, name, stored or "", ok, now, self.policy, token, csrf,
                                         session_id(old) if old else None, event)
        else:
            await self.db.write(record, event)
        if result is not None and result.outcome is LoginOutcome.OK:
            self._set_cookie(request, SESSION_COOKIE, token)
            self._clear_cookie(request, LOGIN_COOKIE)
            return self._redirect(request, self._after_login(request, next_))
        await self.pause(random.uniform(*FAILED_LOGIN_PAUSE))
        return self._login_form(request, 403, next_=next_, name=name if check_name(name) is None else "",
                                problem="That name and password did not work.")

    @app.route("/logout", methods=["POST"])
    @handled
    async def logout(self, request) -> bytes:
        session = await self._session(request)
        if session is not None:
            if not same_token(form_text(request, "csrf", limit=MAX_COOKIE_CHARS), session.csrf):
                return self._error(request, 403, "Form expired", "Reload the page and log out again.",
                                   session=session)
            event = replace(self._event(request, session, Action.LOGOUT, Audited.SESSION, None, None),
                            outcome=Outcome.OK)
            await self.db.write(_logout, session.id, event)
        self._clear_cookie(request, SESSION_COOKIE)
        return self._redirect(request, "/login")

    # -- pages --------------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    @handled
    async def home(self, request) -> bytes:
        return self._redirect(request, pages.DEFAULT_PAGE)

    @app.route("/static/workbench.css", methods=["GET"])
    def stylesheet_file(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/css; charset=utf-8")
        request.setHeader(b"cache-control", b"max-age=3600")
        return self.stylesheet

    @app.route("/favicon.ico", methods=["GET"])
    def favicon(self, request) -> bytes:
        request.setResponseCode(204)  # none: browsers ask anyway
        return b""

    @app.route("/reviews", methods=["GET"])
    @handled
    async def review_queue(self, request) -> bytes:
        session = await self._viewer(request)
        state = form_text(request, "state", limit=20) or reviews.ReviewState.OPEN.value
        if state not in pages.REVIEW_STATES:
            raise FormError(f"state must be one of {', '.join(pages.REVIEW_STATES)}")
        after = form_text(request, "after", limit=MAX_ID_DIGITS + 1)
        if after is not None and path_id(after) is None:
            raise FormError("after must be a review id")
        start = int(after) if after else None
        rows, more = await self._read(
            request, session, Permission.READ_REVIEW, Audited.REVIEW, None,
            f"state={state}" + (f"&after={after}" if after else ""), _reviews,
            (None if state == "all" else state, PAGE_SIZE, start), "review",
        )
        return self._render(request, "reviews.html", session=session,
                            page=pages.queue_page(rows, state, more=more, after=start))

    @app.route("/reviews/<review>", methods=["GET"])
    @handled
    async def review(self, request, review: str) -> bytes:
        session = await self._viewer(request)
        review_id = id_in_path(review, "review")
        detail = await self._read(request, session, Permission.READ_REVIEW, Audited.REVIEW, None, str(review_id),
                                  reviews.review_detail, (review_id,), "review")
        page = pages.review_page(detail, can_decide=allowed(session.role, Permission.DECIDE_REVIEW),
                                 can_undo=allowed(session.role, Permission.DECIDE_PERSON))
        return self._render(request, "review.html", session=session, page=page, back=f"/reviews/{page.id}")

    @app.route("/reviews/<review>/decide", methods=["POST"])
    @handled
    async def decide_review(self, request, review: str) -> bytes:
        review_id = id_in_path(review, "review")

        def parse() -> tuple[tuple, dict]:
            verdict = form_text(request, "decision", required=True, limit=20)
            if verdict not in [v.value for v in reviews.Verdict]:
                raise FormError('the decision is "link" or "not-a-match"')
            kwargs: dict[str, Any] = {"reason": form_reason(request), "force": form_flag(request, "force")}
            if verdict == reviews.Verdict.LINK:
                target = pages.parse_target(form_text(request, "target", required=True, limit=1000))
                if target is None:
                    raise FormError("choose whose person the record joins")
                if target[0] == "candidate":
                    kwargs["candidate"] = target[1]
                elif target[0] == "person":
                    kwargs["person_id"] = form_id(request, "person")
            return (review_id, verdict), kwargs

        return await self._decision(request, Permission.DECIDE_REVIEW, Audited.REVIEW, str(review_id),
                                    f"/reviews/{review_id}", reviews.decide_review, parse)

    @app.route("/persons", methods=["GET"])
    @handled
    async def find_person(self, request) -> bytes:
        await self._viewer(request)
        return self._redirect(request, f"/persons/{form_id(request, 'id')}")

    @app.route("/persons/<person>", methods=["GET"])
    @handled
    async def person(self, request, person: str) -> bytes:
        session = await self._viewer(request)
        person_id = id_in_path(person, "person")
        view, history = await self._read(request, session, Permission.READ_PERSON, Audited.PERSON, None, str(person_id),
                                         _person, (person_id, self.trust), "person")
        page = pages.person_page(view, history, can_decide=allowed(session.role, Permission.DECIDE_PERSON))
        return self._render(request, "person.html", session=session, page=page, back=f"/persons/{page.id}",
                            can_account=allowed(session.role, Permission.READ_DELIVERY))

    @app.route("/persons/<person>/disclosures", methods=["GET"])
    @handled
    async def disclosures(self, request, person: str) -> bytes:
        session = await self._viewer(request)
        person_id = id_in_path(person, "person")
        rows = await self._read(request, session, Permission.READ_DELIVERY, Audited.DELIVERY, None,
                                f"state=delivered&person={person_id}", _disclosures, (person_id, DISCLOSURES_SHOWN),
                                "person")
        return self._render(request, "disclosures.html", session=session, person=person_id,
                            rows=pages.delivery_rows(rows, can_retry=False), shown=DISCLOSURES_SHOWN)

    @app.route("/persons/<person>/split", methods=["POST"])
    @handled
    async def split(self, request, person: str) -> bytes:
        person_id = id_in_path(person, "person")

        def parse() -> tuple[tuple, dict]:
            facility = form_text(request, "facility", required=True, limit=200)
            mrn = form_text(request, "mrn", required=True, limit=400)
            return (person_id, facility, mrn), {"reason": form_reason(request)}

        return await self._decision(request, Permission.DECIDE_PERSON, Audited.PERSON, str(person_id),
                                    f"/persons/{person_id}", reviews.split_record, parse)

    @app.route("/persons/<person>/merge", methods=["POST"])
    @handled
    async def merge(self, request, person: str) -> bytes:
        keep = id_in_path(person, "person")

        def parse() -> tuple[tuple, dict]:
            other = form_id(request, "other")
            return (keep, other), {"reason": form_reason(request), "force": form_flag(request, "force")}

        return await self._decision(request, Permission.DECIDE_PERSON, Audited.PERSON, None, f"/persons/{keep}",
                                    reviews.merge_persons, parse, key_of=lambda args: f"{args[0]}<-{args[1]}")

    @app.route("/persons/<person>/opt-out", methods=["POST"])
    @handled
    async def opt_out(self, request, person: str) -> bytes:
        person_id = id_in_path(person, "person")

        def parse() -> tuple[tuple, dict]:
            protected = form_text(request, "protected", required=True, limit=10)
            if protected not in ("true", "false"):
                raise FormError("protected is true or false")
            return (person_id, protected == "true"), {"reason": form_reason(request), "via": "workbench"}

        return await self._decision(request, Permission.DECIDE_PERSON, Audited.PERSON, str(person_id),
                                    f"/persons/{person_id}", reviews.set_opt_out, parse)

    @app.route("/decisions/<decision>/undo", methods=["POST"])
    @handled
    async def undo(self, request, decision: str) -> bytes:
        decision_id = id_in_path(decision, "decision")
        back = pages.safe_next(form_text(request, "back", limit=pages.MAX_NEXT_CHARS))
        return await self._decision(request, Permission.DECIDE_PERSON, Audited.PERSON, f"decision/{decision_id}",
                                    back, reviews.undo_decision,
                                    lambda: ((decision_id,), {"reason": form_reason(request)}))

    @app.route("/records", methods=["GET"])
    @handled
    async def find_record(self, request) -> bytes:
        await self._viewer(request)
        facility = form_text(request, "facility", required=True, limit=200).strip()
        mrn = form_text(request, "mrn", required=True, limit=400).strip()
        return self._redirect(request, pages.record_href(facility, mrn))

    # twisted.web has percent-decoded each path segment already; an MRN may hold a "/".
    @app.route("/records/<facility>/<path:mrn>", methods=["GET"])
    @handled
    async def record(self, request, facility: str, mrn: str) -> bytes:
        session = await self._viewer(request)
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in facility + mrn):
            raise FormError("the path must not contain control characters")
        view = await self._read(request, session, Permission.READ_RECORD, Audited.RECORD, facility, mrn,
                                record_view, (facility, mrn), "record")
        return self._render(request, "record.html", session=session, page=pages.record_page(view))

    @app.route("/deliveries", methods=["GET"])
    @handled
    async def deliveries(self, request) -> bytes:
        session = await self._viewer(request)
        failed, queued = await self._read(request, session, Permission.READ_DELIVERY, Audited.DELIVERY, None,
                                          "state=failed&state=queued", _deliveries, (DELIVERIES_SHOWN,),
                                          "delivery")
        can_retry = allowed(session.role, Permission.RETRY_DELIVERY)
        return self._render(request, "deliveries.html", session=session,
                            failed=pages.delivery_rows(failed, can_retry=can_retry),
                            queued=pages.delivery_rows(queued, can_retry=False), shown=DELIVERIES_SHOWN)

    @app.route("/deliveries/<delivery>/retry", methods=["POST"])
    @handled
    async def retry(self, request, delivery: str) -> bytes:
        delivery_id = id_in_path(delivery, "delivery")
        session, event = await self._poster(request, Permission.RETRY_DELIVERY, Audited.DELIVERY, str(delivery_id),
                                            "/deliveries")
        force = form_text(request, "force") == "1"
        result, view = await self.db.write(retry_audited, delivery_id, session.user, self.now(), event, self.config,
                                           force)
        if result is RetryResult.NOT_FOUND:
            return self._error(request, 404, "Not found", f"There is no delivery {delivery_id}.", session=session,
                               back="/deliveries")
        if result is RetryResult.NOT_FAILED:
            return self._error(request, 409, "Not done",
                               f"Only a failed delivery can be sent again (this one is {view.state.value}).",
                               session=session, back="/deliveries")
        if result is RetryResult.WITHHELD:
            return self._error(request, 409, "Not done",
                               "This copy may not go out any more: the person has opted out, the "
                               "destination's record is no longer linked to them, or the configuration "
                               "no longer sends it there.", session=session,
                               back="/deliveries")
        if result is RetryResult.SUPERSEDED:
            return self._error(request, 409, "Not done",
                               f"{SUPERSEDED_TEXT[0].upper()}{SUPERSEDED_TEXT[1:]}. Tick \"even after newer copies\""
                               " to send it anyway.", session=session, back="/deliveries")
        if self.requeued is not None:
            self.requeued(view.destination)
        return self._redirect(request, "/deliveries")

    # -- everything else ------------------------------------------------------------------------

    @app.handle_errors(NotFound)
    def not_found(self, request, failure) -> bytes:
        return self._error(request, 404, "Not found", "There is no such page.")

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request, failure) -> bytes:
        methods = sorted(getattr(failure.value, "valid_methods", None) or ())
        if methods:
            request.setHeader(b"allow", ", ".join(methods).encode())
        return self._error(request, 405, "Not allowed", "That method is not allowed here.")
