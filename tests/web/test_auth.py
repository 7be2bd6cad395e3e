"""Roles, the permission table, tokens and their cache (exchange.auth)."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from exchange.auth import (
    PERMISSIONS,
    Permission,
    Principal,
    Role,
    TokenCache,
    TokenError,
    allowed,
    create_token,
    find_token,
    hash_token,
    new_token,
    revoke_token,
)
from exchange.store.db import write_transaction
from exchange.store.schema import api_token_table

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def test_permission_table():
    assert allowed("admin", "message.read")
    assert all(allowed(Role.ADMIN, p) for p in Permission)
    # technicians resolve patient-matching conflicts; message and delivery
    # internals are the operators'
    for p in (Permission.READ_RECORD, Permission.READ_PERSON, Permission.READ_REVIEW, Permission.DECIDE_REVIEW):
        assert allowed(Role.TECHNICIAN, p)
    for p in (Permission.READ_MESSAGE, Permission.READ_DELIVERY):
        assert not allowed(Role.TECHNICIAN, p)
    assert not allowed("nurse", "record.read")
    assert not allowed("admin", "everything")
    assert set(PERMISSIONS) == set(Role)


def test_tokens_are_long_random_and_hashed():
    a, b = new_token(), new_token()
    assert a != b and a.startswith("exk_") and len(a) >= 40
    assert hash_token(a) == hashlib.sha256(a.encode()).hexdigest()


def test_cache_expires_and_is_bounded():
    now = [0.0]
    cache = TokenCache(lambda: now[0], ttl=30, max_entries=2)
    ann = Principal("ann", Role.ADMIN)
    cache.put("h1", ann)
    assert cache.get("h1") == ann
    now[0] = 29.9
    assert cache.get("h1") == ann
    now[0] = 30.0
    assert cache.get("h1") is None and len(cache) == 0
    for i in range(5):
        cache.put(f"h{i}", ann)
    assert len(cache) == 2 and cache.get("h4") == ann and cache.get("h0") is None


def test_cache_evicts_the_least_recently_used():
    cache = TokenCache(lambda: 0.0, ttl=30, max_entries=2)
    a, b, c = (Principal(n, Role.TECHNICIAN) for n in "abc")
    cache.put("a", a)
    cache.put("b", b)
    cache.get("a")
    cache.put("c", c)
    assert cache.get("a") == a and cache.get("b") is None and cache.get("c") == c


def test_create_find_revoke(engine):
    with write_transaction(engine) as conn:
        token = create_token(conn, "ann", "technician", NOW)
    with engine.connect() as conn:
        stored = conn.execute(select(api_token_table)).mappings().one()
        assert stored["token_hash"] == hash_token(token) and token not in str(dict(stored))
        assert stored["created_at"] == NOW and stored["revoked_at"] is None
        assert find_token(conn, hash_token(token)) == Principal("ann", Role.TECHNICIAN)
        assert find_token(conn, hash_token(token + "x")) is None
    with write_transaction(engine) as conn:
        assert revoke_token(conn, "ann", NOW)
        assert not revoke_token(conn, "ann", NOW)  # already revoked
        assert not revoke_token(conn, "nobody", NOW)
    with engine.connect() as conn:
        assert find_token(conn, hash_token(token)) is None


@pytest.mark.parametrize(
    "name, role, reason",
    [("ann", "nurse", "unknown role"), ("", "admin", "printable"), ("x" * 65, "admin", "printable")],
)
def test_create_refuses(engine, name, role, reason):
    with write_transaction(engine) as conn:
        with pytest.raises(TokenError, match=reason):
            create_token(conn, name, role, NOW)


def test_names_are_unique(engine):
    with write_transaction(engine) as conn:
        create_token(conn, "ann", "admin", NOW)
        revoke_token(conn, "ann", NOW)
        with pytest.raises(TokenError, match="exists already"):
            create_token(conn, "ann", "admin", NOW)
