"""Who may call the HTTP API, and what they may do.

Pure core: roles, permissions and the permission table (``allowed``), token
generation and hashing, and a small bounded TTL cache of token look-ups.
Thin store functions (``create_token``, ``revoke_token``, ``find_token``)
take a ``Connection`` whose transaction the caller owns and return plain
values.

A token is ``exk_`` + ``secrets.token_urlsafe(32)``. It is printed once, when
created; the database keeps only its sha256 (hex), so a stolen database
yields no usable token.
"""
from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Connection, insert, select, update

from exchange.store.schema import TOKEN_NAME_LEN, api_token_table as api_token

TOKEN_PREFIX = "exk_"


class Role(StrEnum):
    TECHNICIAN = "technician"  # records technician: reads records and persons, resolves match reviews
    ADMIN = "admin"  # operator: everything


class Permission(StrEnum):
    READ_RECORD = "record.read"
    READ_PERSON = "person.read"
    READ_REVIEW = "review.read"
    DECIDE_REVIEW = "review.decide"
    DECIDE_PERSON = "person.decide"  # split a record off a person, merge persons, undo a decision
    READ_MESSAGE = "message.read"
    READ_DELIVERY = "delivery.read"  # the outbox and the accounting of disclosures
    RETRY_DELIVERY = "delivery.retry"  # requeue a failed copy


# The permission table: what each role may do. Nothing else is allowed.
PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.TECHNICIAN: frozenset(
        {
            Permission.READ_RECORD,
            Permission.READ_PERSON,
            Permission.READ_REVIEW,
            Permission.DECIDE_REVIEW,
            Permission.DECIDE_PERSON,
        }
    ),
    Role.ADMIN: frozenset(Permission),
}


def allowed(role: Role | str, permission: Permission | str) -> bool:
    """True if ``role`` may do ``permission``; False for unknown roles or permissions."""
    try:
        return Permission(permission) in PERMISSIONS.get(Role(role), frozenset())
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's name (the audit actor) and its role."""

    name: str
    role: Role


class TokenError(ValueError):
    """A token cannot be created as asked (one-line reason)."""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The sha256 (hex) of a token: what the database stores and looks up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# -- store ------------------------------------------------------------------------


def create_token(conn: Connection, name: str, role: Role | str, now: datetime) -> str:
    """Store a new token for ``name`` and return it (the only time it is seen).

    Raises ``TokenError`` for an unknown role, an empty or too long name, or
    a name that already has a token (revoked ones included: names are the
    audit trail's actors and stay unique).
    """
    try:
        role = Role(role)
    except ValueError:
        raise TokenError(f"unknown role {role!r}: use one of {', '.join(r.value for r in Role)}") from None
    if not name or not name.strip() or len(name) > TOKEN_NAME_LEN or not name.isprintable():
        raise TokenError(f"a token name is 1 to {TOKEN_NAME_LEN} printable characters")
    if conn.execute(select(api_token.c.id).where(api_token.c.name == name)).first() is not None:
        raise TokenError(f"a token named {name!r} exists already")
    token = new_token()
    conn.execute(
        insert(api_token).values(name=name, role=role.value, token_hash=hash_token(token), created_at=now)
    )
    return token


def revoke_token(conn: Connection, name: str, now: datetime) -> bool:
    """Revoke ``name``'s token; False if there is no such live token."""
    result = conn.execute(
        update(api_token)
        .where(api_token.c.name == name, api_token.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return result.rowcount > 0


def find_token(conn: Connection, token_hash: str) -> Principal | None:
    """The live (not revoked) token with this hash, or None."""
    row = conn.execute(
        select(api_token.c.name, api_token.c.role).where(
            api_token.c.token_hash == token_hash, api_token.c.revoked_at.is_(None)
        )
    ).first()
    if row is None:
        return None
    try:
        return Principal(row.name, Role(row.role))
    except ValueError:  # a role this code no longer knows: no access
        return None


def revoked_token_name(conn: Connection, token_hash: str) -> str | None:
    """The name of the revoked token with this hash, or None (no such token, or a live one)."""
    return conn.execute(
        select(api_token.c.name).where(api_token.c.token_hash == token_hash, api_token.c.revoked_at.is_not(None))
    ).scalar()


# -- cache ------------------------------------------------------------------------

TOKEN_CACHE_TTL = 5.0  # seconds a revoked token may still work on a server that looked it up before


class TokenCache:
    """Recent successful token look-ups: hash -> Principal, for ``ttl`` seconds.

    Bounded (least recently used entries go first). Failed look-ups are not
    cached, so a token created a moment ago works at once; a revoked token
    keeps working for at most ``ttl`` seconds on a process that saw it.
    ``clock`` returns seconds (``reactor.seconds`` in the service).
    """

    def __init__(self, clock: Callable[[], float], *, ttl: float = TOKEN_CACHE_TTL, max_entries: int = 1000) -> None:
        self._clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    def get(self, token_hash: str) -> Principal | None:
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        expires, principal = entry
        if self._clock() >= expires:
            del self._entries[token_hash]
            return None
        self._entries.move_to_end(token_hash)
        return principal

    def put(self, token_hash: str, principal: Principal) -> None:
        self._entries[token_hash] = (self._clock() + self.ttl, principal)
        self._entries.move_to_end(token_hash)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
