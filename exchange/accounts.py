"""Who may log in to the workbench: users, their passwords, their sessions.

Pure core: password rules and hashing (``hash_password``, ``verify_password``),
login names, session tokens, and the decisions of a login (``login_outcome``)
and of a session's expiry (``session_expired``, ``needs_touch``) -- time is
always passed in. Thin store functions take a ``Connection`` whose
transaction the caller owns and return plain values.

Passwords: scrypt from the standard library (``hashlib.scrypt``, n=2**14,
r=8, p=1: about 16 MiB and some 50 ms a hash here), a random 16-byte salt,
stored as ``scrypt$n$r$p$salt$hash`` (base64), so the parameters can be raised
later without breaking stored hashes. Verifying runs in a worker thread
(hashlib releases the GIL), never on the reactor.

Sessions: the cookie holds a random token (``secrets.token_urlsafe(32)``);
the database keeps only its SHA-256 (``workbench_session.id``), the user, the
times that expire it (idle and absolute) and the session's CSRF token. They
live in the database so that several nodes on one PostgreSQL share them.
Disabling a user or resetting its password ends its sessions.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import lru_cache

from sqlalchemy import Connection, delete, func, insert, or_, select, update

from exchange.auth import Role, hash_token
from exchange.store.schema import (
    PASSWORD_HASH_LEN,
    USER_NAME_LEN,
    workbench_session_table as workbench_session,
    workbench_user_table as workbench_user,
)

MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024  # longer ones are refused before hashing (bounded work per attempt)

# scrypt cost: n (CPU/memory), r (block size), p (parallelism); 128 * n * r bytes of memory.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_BYTES = 16
SCRYPT_KEY_BYTES = 32
_SCRYPT_MAX_N = 2**20  # a stored hash asking for more is refused, not computed
_SCRYPT_MAXMEM = 256 * 1024 * 1024

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")


class UserError(ValueError):
    """A user cannot be created or changed as asked (a one-line reason)."""


# -- passwords ----------------------------------------------------------------------


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be a login name, or None."""
    if not isinstance(name, str) or not 1 <= len(name) <= USER_NAME_LEN or not _NAME_RE.fullmatch(name):
        return (f"a user name is 1 to {USER_NAME_LEN} letters, digits and . _ @ - "
                "(starting with a letter or digit)")
    return None


def check_password(password: str) -> str | None:
    """Why ``password`` cannot be a workbench password, or None."""
    if not password:
        return "the password is empty"
    if len(password) < MIN_PASSWORD_CHARS:
        return f"the password must be at least {MIN_PASSWORD_CHARS} characters (got {len(password)})"
    if len(password) > MAX_PASSWORD_CHARS:
        return f"the password must be at most {MAX_PASSWORD_CHARS} characters"
    if not password.isprintable():
        return "the password must not contain control characters"
    if not password.strip():  # the login form takes a blank password for none: it could never log in
        return "the password must not be only spaces"
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=_SCRYPT_MAXMEM)


def hash_password(password: str, *, salt: bytes | None = None, n: int = SCRYPT_N) -> str:
    """``scrypt$n$r$p$salt$hash``: a slow salted hash of ``password`` (50 ms or so: not on the reactor).
    ``n`` other than the default only in tests (a fast hash)."""
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES) if salt is None else salt
    key = _scrypt(password, salt, n, SCRYPT_R, SCRYPT_P, SCRYPT_KEY_BYTES)
    encoded = f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"
    assert len(encoded) <= PASSWORD_HASH_LEN
    return encoded


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` was made from; False for any malformed hash."""
    if not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
        return False
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        n_, r_, p_ = int(n), int(r), int(p)
        salt_, key_ = base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True)
    except (AttributeError, ValueError):
        return False
    if scheme != "scrypt" or not (2 <= n_ <= _SCRYPT_MAX_N and n_ & (n_ - 1) == 0) or not (1 <= r_ <= 32) \
            or not (1 <= p_ <= 16) or not key_:
        return False
    try:
        candidate = _scrypt(password, salt_, n_, r_, p_, len(key_))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, key_)


def needs_rehash(stored: str) -> bool:
    """Was ``stored`` made with other scrypt parameters than :func:`hash_password` uses now
    (a hash from before they were raised)? It is replaced at the next successful login."""
    try:
        scheme, n, r, p, _salt, key = stored.split("$")
        return (scheme, int(n), int(r), int(p), len(base64.b64decode(key))) != (
            "scrypt", SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY_BYTES)
    except (AttributeError, ValueError):
        return True


@lru_cache(maxsize=1)
def dummy_hash() -> str:
    """A hash no password matches in practice: verified against when the name is unknown, so
    that a login takes as long whether or not the user exists."""
    return hash_password(secrets.token_urlsafe(32))


# -- tokens -------------------------------------------------------------------------


def new_session_token() -> str:
    return secrets.token_urlsafe(32)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def session_id(token: str) -> str:
    """What the database keeps of a session token: its SHA-256, hex."""
    return hash_token(token)


def same_token(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison of two tokens; False when either is missing."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


# -- policy -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """How long sessions last and when failed logins lock a user out."""

    idle: timedelta = timedelta(minutes=30)  # a session unused this long is over
    absolute: timedelta = timedelta(hours=12)  # and any session this long after the login
    attempts: int = 5  # failed logins in a row that lock the user out ...
    lockout: timedelta = timedelta(minutes=15)  # ... for this long
    touch_every: timedelta = timedelta(seconds=60)  # last_seen_at is written at most this often

    @classmethod
    def from_config(cls, workbench) -> Policy:
        """From ``exchange.config.WorkbenchConfig`` (seconds)."""
        return cls(
            idle=timedelta(seconds=workbench.session_idle),
            absolute=timedelta(seconds=workbench.session_max),
            attempts=workbench.login_attempts,
            lockout=timedelta(seconds=workbench.lockout),
            touch_every=min(timedelta(seconds=60), timedelta(seconds=workbench.session_idle) / 10),
        )


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session as the web layer needs it (never the token itself)."""

    id: str  # sha256 of the token
    user: str  # the user's name: the audit actor
    role: Role
    csrf: str
    created_at: datetime
    expires_at: datetime
    last_seen_at: datetime


def session_expired(session: SessionInfo, now: datetime, policy: Policy) -> bool:
    """Over when its absolute end has come, or it went unused for ``policy.idle``."""
    return now >= session.expires_at or now - session.last_seen_at >= policy.idle


def needs_touch(session: SessionInfo, now: datetime, policy: Policy) -> bool:
    """Whether to write ``last_seen_at`` now (at most every ``policy.touch_every``)."""
    return now - session.last_seen_at >= policy.touch_every


class LoginOutcome(StrEnum):
    OK = "ok"
    WRONG = "wrong"  # unknown name or wrong password
    LOCKED = "locked"  # too many failures lately: not even the right password lets in
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A user as a login attempt reads it."""

    id: int
    name: str
    role: str
    password_hash: str
    disabled: bool
    failed_logins: int
    locked_until: datetime | None


def login_outcome(user: Candidate | None, password_ok: bool, now: datetime) -> LoginOutcome:
    """What a login attempt comes to (the page shows the same words for all but OK)."""
    if user is None:
        return LoginOutcome.WRONG
    if user.disabled:
        return LoginOutcome.DISABLED
    if user.locked_until is not None and now < user.locked_until:
        return LoginOutcome.LOCKED
    try:
        Role(user.role)
    except ValueError:  # a role this code no longer knows: no access
        return LoginOutcome.DISABLED
    return LoginOutcome.OK if password_ok else LoginOutcome.WRONG


def after_failure(user: Candidate, now: datetime, policy: Policy) -> tuple[int, datetime | None]:
    """(failed_logins, locked_until) after one more wrong password. A lock that has run out
    starts the count again."""
    lapsed = user.locked_until is not None and now >= user.locked_until
    failures = (0 if lapsed else user.failed_logins) + 1
    if failures >= policy.attempts:
        return failures, now + policy.lockout
    return failures, None if lapsed else user.locked_until


# -- store: users -------------------------------------------------------------------


def _candidate(row) -> Candidate:
    return Candidate(id=row.id, name=row.name, role=row.role, password_hash=row.password_hash,
                     disabled=row.disabled_at is not None, failed_logins=row.failed_logins or 0,
                     locked_until=row.locked_until)


def find_user(conn: Connection, name: str, *, lock: bool = False) -> Candidate | None:
    query = select(workbench_user).where(workbench_user.c.name == name)
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    return _candidate(row) if row is not None else None


def add_user(conn: Connection, name: str, role: Role | str, password_hash: str, now: datetime, *,
             reset: bool = False) -> bool:
    """Create ``name`` with ``role`` and the (already computed) ``password_hash``; True if created.

    With ``reset``, an existing user gets the new password and role, is enabled again and
    unlocked, and its sessions end (False is returned). Raises ``UserError`` for a bad name
    or role, or an existing user without ``reset``.
    """
    reason = check_name(name)
    if reason:
        raise UserError(reason)
    try:
        role = Role(role)
    except ValueError:
        raise UserError(f"unknown role {role!r}: use one of {', '.join(r.value for r in Role)}") from None
    existing = find_user(conn, name, lock=True)
    if existing is None:
        conn.execute(insert(workbench_user).values(name=name, role=role.value, password_hash=password_hash,
                                                   created_at=now, failed_logins=0))
        return True
    if not reset:
        raise UserError(f"a workbench user named {name!r} exists already (give --reset to set a new password)")
    conn.execute(update(workbench_user).where(workbench_user.c.id == existing.id).values(
        role=role.value, password_hash=password_hash, disabled_at=None, failed_logins=0, locked_until=None))
    conn.execute(delete(workbench_session).where(workbench_session.c.user_id == existing.id))
    return False


def disable_user(conn: Connection, name: str, now: datetime) -> bool | None:
    """Disable ``name`` and end its sessions: True, False if it was disabled already, None if unknown."""
    user = find_user(conn, name, lock=True)
    if user is None:
        return None
    conn.execute(delete(workbench_session).where(workbench_session.c.user_id == user.id))
    if user.disabled:
        return False
    conn.execute(update(workbench_user).where(workbench_user.c.id == user.id).values(disabled_at=now))
    return True


@dataclass(frozen=True, slots=True)
class UserSummary:
    name: str
    role: str
    state: str  # active, disabled or locked (too many failed logins, until locked_until)
    created_at: datetime
    locked_until: datetime | None
    sessions: int  # not past their absolute expiry


def list_users(conn: Connection, now: datetime) -> list[UserSummary]:
    """Every workbench user, by name, with its state and open sessions (never its hash)."""
    open_sessions = (select(workbench_session.c.user_id, func.count().label("n"))
                     .where(workbench_session.c.expires_at > now).group_by(workbench_session.c.user_id).subquery())
    rows = conn.execute(
        select(workbench_user.c.name, workbench_user.c.role, workbench_user.c.created_at,
               workbench_user.c.disabled_at, workbench_user.c.locked_until, open_sessions.c.n)
        .outerjoin(open_sessions, open_sessions.c.user_id == workbench_user.c.id)
        .order_by(workbench_user.c.name))
    out = []
    for r in rows:
        locked = r.locked_until is not None and r.locked_until > now
        state = "disabled" if r.disabled_at is not None else "locked" if locked else "active"
        out.append(UserSummary(r.name, r.role, state, r.created_at, r.locked_until if locked else None, r.n or 0))
    return out


# -- store: logins and sessions ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoginResult:
    outcome: LoginOutcome
    role: str | None  # the user's role, for the audit row (None: no such user)
    session: SessionInfo | None = None  # set when OK


def complete_login(conn: Connection, name: str, verified_hash: str, password_ok: bool, now: datetime,
                   policy: Policy, token: str, csrf: str, rehash: str | None = None) -> LoginResult:
    """The second half of a login, after the password was checked (off the reactor) against
    ``verified_hash``: re-read the user (locked), decide, count the failure or start the session.
    ``rehash``: the password hashed again with today's parameters, stored if the login succeeds.

    A password changed in between counts as wrong. Sessions that are over (anyone's) are
    deleted here, so the table does not grow.
    """
    user = find_user(conn, name, lock=True)
    ok = password_ok and user is not None and hmac.compare_digest(user.password_hash, verified_hash)
    outcome = login_outcome(user, ok, now)
    if user is None:
        return LoginResult(outcome, None)
    if outcome is LoginOutcome.WRONG:
        failures, locked_until = after_failure(user, now, policy)
        conn.execute(update(workbench_user).where(workbench_user.c.id == user.id)
                     .values(failed_logins=failures, locked_until=locked_until))
        return LoginResult(outcome, user.role)
    if outcome is not LoginOutcome.OK:
        return LoginResult(outcome, user.role)
    conn.execute(update(workbench_user).where(workbench_user.c.id == user.id)
                 .values(failed_logins=0, locked_until=None, **({"password_hash": rehash} if rehash else {})))
    conn.execute(delete(workbench_session).where(or_(workbench_session.c.expires_at <= now,
                                                     workbench_session.c.last_seen_at <= now - policy.idle)))
    info = SessionInfo(id=session_id(token), user=user.name, role=Role(user.role), csrf=csrf, created_at=now,
                       expires_at=now + policy.absolute, last_seen_at=now)
    conn.execute(insert(workbench_session).values(id=info.id, user_id=user.id, created_at=now,
                                                  expires_at=info.expires_at, last_seen_at=now, csrf_token=csrf))
    return LoginResult(outcome, user.role, info)


def find_session(conn: Connection, sid: str) -> SessionInfo | None:
    """The session with this id (sha256 of its token) of an enabled user, expired or not; else None."""
    row = conn.execute(
        select(workbench_session.c.id, workbench_session.c.created_at, workbench_session.c.expires_at,
               workbench_session.c.last_seen_at, workbench_session.c.csrf_token, workbench_user.c.name,
               workbench_user.c.role)
        .join(workbench_user, workbench_user.c.id == workbench_session.c.user_id)
        .where(workbench_session.c.id == sid, workbench_user.c.disabled_at.is_(None))
    ).first()
    if row is None:
        return None
    try:
        role = Role(row.role)
    except ValueError:
        return None
    return SessionInfo(id=row.id, user=row.name, role=role, csrf=row.csrf_token, created_at=row.created_at,
                       expires_at=row.expires_at, last_seen_at=row.last_seen_at)


def touch_session(conn: Connection, sid: str, now: datetime) -> None:
    conn.execute(update(workbench_session).where(workbench_session.c.id == sid).values(last_seen_at=now))


def end_session(conn: Connection, sid: str) -> bool:
    """Delete the session; False if there was none."""
    return conn.execute(delete(workbench_session).where(workbench_session.c.id == sid)).rowcount > 0
