"""exchange.accounts: password rules and hashing, login decisions and session expiry (pure,
with a fake clock), and the store functions on SQLite and PostgreSQL."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from exchange import accounts
from exchange.accounts import (
    Candidate,
    LoginOutcome,
    Policy,
    SessionInfo,
    UserError,
    add_user,
    after_failure,
    check_name,
    check_password,
    complete_login,
    disable_user,
    end_session,
    find_session,
    find_user,
    hash_password,
    login_outcome,
    needs_touch,
    same_token,
    session_expired,
    session_id,
    touch_session,
    verify_password,
)
from exchange.auth import Role
from exchange.config import WorkbenchConfig
from exchange.store.db import write_transaction
from exchange.store.schema import workbench_session_table, workbench_user_table

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=timezone.utc)
PASSWORD = "correct horse battery staple"
FAST = 2**4


# -- passwords -------------------------------------------------------------------------


def test_hash_is_salted_scrypt_with_its_parameters_and_verifies():
    h1, h2 = hash_password(PASSWORD), hash_password(PASSWORD)
    assert h1 != h2  # a fresh salt each time
    scheme, n, r, p, salt, key = h1.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert PASSWORD not in h1
    assert verify_password(PASSWORD, h1) and verify_password(PASSWORD, h2)
    assert not verify_password(PASSWORD + "x", h1)
    assert not verify_password("", h1)


def test_the_production_cost_is_slow_enough():
    start = time.perf_counter()
    hash_password(PASSWORD)
    assert time.perf_counter() - start > 0.005  # n=2**14, r=8: ~16 MiB and tens of ms, never instant


def test_verify_uses_the_stored_parameters():
    cheap = hash_password(PASSWORD, n=FAST)
    assert cheap.split("$")[1] == "16" and verify_password(PASSWORD, cheap)
    assert hash_password(PASSWORD, salt=b"s" * 16, n=FAST) == hash_password(PASSWORD, salt=b"s" * 16, n=FAST)


@pytest.mark.parametrize("stored", [
    "", "plain", "md5$x", "scrypt$16$8$1$c2FsdA==", "scrypt$15$8$1$c2FsdA==$a2V5",  # n not a power of two
    "scrypt$4194304$8$1$c2FsdA==$a2V5",  # n beyond what a stored hash may ask for
    "scrypt$16$8$1$not base64!$a2V5", "scrypt$16$8$1$c2FsdA==$", "bcrypt$16$8$1$c2FsdA==$a2V5",
])
def test_malformed_hashes_never_verify(stored):
    assert verify_password(PASSWORD, stored) is False


def test_overlong_password_is_refused_before_hashing():
    assert not verify_password("x" * (accounts.MAX_PASSWORD_CHARS + 1), hash_password(PASSWORD, n=FAST))


@pytest.mark.parametrize("password, reason", [
    ("", "the password is empty"),
    ("short", "at least 12 characters (got 5)"),
    ("eleven char", "at least 12 characters (got 11)"),
    ("x" * 1025, "at most 1024"),
    ("twelve chars\x07", "control characters"),
    (" " * 12, "only spaces"),  # the login form reads a blank password as none: it could never log in
])
def test_password_rules(password, reason):
    assert reason in check_password(password)


def test_good_passwords_and_names():
    assert check_password("twelve chars") is None
    assert check_password("ünïcode pässwörd") is None
    for name in ("ann", "tess.smith", "a-b_c@site", "X1"):
        assert check_name(name) is None
    for name in ("", " ann", "ann smith", "-ann", "a" * 65, "ann\n", "ann/x"):
        assert check_name(name) is not None


def test_same_token_is_constant_time_and_refuses_missing():
    assert same_token("abc", "abc")
    assert not same_token("abc", "abd") and not same_token(None, "abc") and not same_token("", "") \
        and not same_token("abc", None)


# -- logins and sessions, pure (a fake clock) ---------------------------------------------------


def user(**kw) -> Candidate:
    fields = dict(id=1, name="tess", role="technician", password_hash="h", disabled=False, failed_logins=0,
                  locked_until=None)
    fields.update(kw)
    return Candidate(**fields)


def test_login_outcomes():
    assert login_outcome(None, True, T0) is LoginOutcome.WRONG
    assert login_outcome(user(), True, T0) is LoginOutcome.OK
    assert login_outcome(user(), False, T0) is LoginOutcome.WRONG
    assert login_outcome(user(disabled=True), True, T0) is LoginOutcome.DISABLED
    assert login_outcome(user(role="nurse"), True, T0) is LoginOutcome.DISABLED
    locked = user(locked_until=T0 + timedelta(minutes=1))
    assert login_outcome(locked, True, T0) is LoginOutcome.LOCKED  # not even the right password
    assert login_outcome(locked, True, T0 + timedelta(minutes=1)) is LoginOutcome.OK


def test_lockout_after_repeated_failures_and_a_fresh_count_after_it():
    policy = Policy(attempts=3, lockout=timedelta(minutes=15))
    u = user()
    for expected in (1, 2):
        failures, locked = after_failure(u, T0, policy)
        assert (failures, locked) == (expected, None)
        u = user(failed_logins=failures)
    assert after_failure(u, T0, policy) == (3, T0 + timedelta(minutes=15))
    lapsed = user(failed_logins=3, locked_until=T0)
    assert after_failure(lapsed, T0 + timedelta(seconds=1), policy) == (1, None)


def session(created: datetime, last_seen: datetime, policy: Policy = Policy()) -> SessionInfo:
    return SessionInfo(id="s", user="tess", role=Role.TECHNICIAN, csrf="c", created_at=created,
                       expires_at=created + policy.absolute, last_seen_at=last_seen)


def test_session_idle_expiry_with_a_fake_clock():
    policy = Policy(idle=timedelta(minutes=30))
    s = session(T0, T0)
    assert not session_expired(s, T0 + timedelta(minutes=29, seconds=59), policy)
    assert session_expired(s, T0 + timedelta(minutes=30), policy)
    used = session(T0, T0 + timedelta(minutes=25))
    assert not session_expired(used, T0 + timedelta(minutes=50), policy)


def test_session_absolute_expiry_however_busy():
    policy = Policy(idle=timedelta(minutes=30), absolute=timedelta(hours=12))
    busy = session(T0, T0 + timedelta(hours=11, minutes=59))
    assert not session_expired(busy, T0 + timedelta(hours=11, minutes=59, seconds=59), policy)
    assert session_expired(busy, T0 + timedelta(hours=12), policy)


def test_last_seen_is_written_at_most_every_minute():
    policy = Policy()
    s = session(T0, T0)
    assert not needs_touch(s, T0 + timedelta(seconds=59), policy)
    assert needs_touch(s, T0 + timedelta(seconds=60), policy)


def test_policy_from_config():
    p = Policy.from_config(WorkbenchConfig(session_idle=600, session_max=3600, login_attempts=3, lockout=60))
    assert (p.idle, p.absolute, p.attempts, p.lockout, p.touch_every) == (
        timedelta(minutes=10), timedelta(hours=1), 3, timedelta(minutes=1), timedelta(seconds=60))
    assert Policy.from_config(WorkbenchConfig()) == Policy()
    assert Policy.from_config(WorkbenchConfig(session_idle=60)).touch_every == timedelta(seconds=6)


# -- store (SQLite and PostgreSQL) ----------------------------------------------------------------


def tx(engine):
    return write_transaction(engine)


def test_add_reset_and_disable_users(engine):
    with tx(engine) as conn:
        assert add_user(conn, "tess", "technician", hash_password(PASSWORD, n=FAST), T0) is True
        with pytest.raises(UserError, match="exists already"):
            add_user(conn, "tess", "admin", hash_password(PASSWORD, n=FAST), T0)
        with pytest.raises(UserError, match="unknown role 'nurse'"):
            add_user(conn, "nina", "nurse", "x", T0)
        with pytest.raises(UserError, match="user name"):
            add_user(conn, "bad name", "admin", "x", T0)
    token = "t" * 43
    with tx(engine) as conn:
        tess = find_user(conn, "tess")
        assert complete_login(conn, "tess", tess.password_hash, True, T0, Policy(), token, "c").outcome is LoginOutcome.OK
        assert find_session(conn, session_id(token)) is not None
    with tx(engine) as conn:
        new_hash = hash_password("another long password", n=FAST)
        assert add_user(conn, "tess", "admin", new_hash, T0, reset=True) is False
        tess = find_user(conn, "tess")
        assert (tess.role, tess.password_hash, tess.disabled) == ("admin", new_hash, False)
        assert find_session(conn, session_id(token)) is None  # a new password ends the sessions
    with tx(engine) as conn:
        complete_login(conn, "tess", new_hash, True, T0, Policy(), token, "c")
        assert disable_user(conn, "tess", T0) is True
        assert find_session(conn, session_id(token)) is None
        assert disable_user(conn, "tess", T0) is False
        assert disable_user(conn, "nobody", T0) is None
        assert find_user(conn, "tess").disabled
        assert complete_login(conn, "tess", new_hash, True, T0, Policy(), token, "c").outcome is LoginOutcome.DISABLED
    with tx(engine) as conn:
        add_user(conn, "tess", "technician", hash_password(PASSWORD, n=FAST), T0, reset=True)
        assert not find_user(conn, "tess").disabled  # a reset enables the user again


def test_only_the_sha256_of_a_session_token_is_stored(engine):
    token = accounts.new_session_token()
    with tx(engine) as conn:
        add_user(conn, "tess", "technician", hash_password(PASSWORD, n=FAST), T0)
        result = complete_login(conn, "tess", find_user(conn, "tess").password_hash, True, T0, Policy(), token, "csrf-1")
    assert result.session.id == session_id(token) != token and len(result.session.id) == 64
    with engine.connect() as conn:
        [row] = conn.execute(select(workbench_session_table)).mappings().all()
    assert token not in {str(v) for v in row.values()}
    assert row["csrf_token"] == "csrf-1" and row["expires_at"] == T0 + timedelta(hours=12)


def test_failed_logins_lock_the_user_out_then_a_success_resets(engine):
    policy = Policy(attempts=3, lockout=timedelta(minutes=15))
    with tx(engine) as conn:
        add_user(conn, "tess", "technician", hash_password(PASSWORD, n=FAST), T0)
    with engine.connect() as conn:
        good = find_user(conn, "tess").password_hash

    def attempt(ok: bool, at: datetime) -> LoginOutcome:
        with tx(engine) as conn:
            return complete_login(conn, "tess", good, ok, at, policy, accounts.new_session_token(), "c").outcome

    assert [attempt(False, T0) for _ in range(3)] == [LoginOutcome.WRONG] * 3
    assert attempt(True, T0 + timedelta(minutes=14)) is LoginOutcome.LOCKED
    assert attempt(True, T0 + timedelta(minutes=15)) is LoginOutcome.OK
    with engine.connect() as conn:
        row = conn.execute(select(workbench_user_table)).mappings().one()
    assert (row["failed_logins"], row["locked_until"]) == (0, None)
    # a password changed between the check and the login counts as wrong
    with tx(engine) as conn:
        result = complete_login(conn, "tess", "scrypt$other", True, T0, policy, "tok", "c")
    assert result.outcome is LoginOutcome.WRONG


def test_sessions_over_are_deleted_at_the_next_login(engine):
    policy = Policy(idle=timedelta(minutes=30), absolute=timedelta(hours=12))
    with tx(engine) as conn:
        add_user(conn, "tess", "technician", hash_password(PASSWORD, n=FAST), T0)
        good = find_user(conn, "tess").password_hash
        complete_login(conn, "tess", good, True, T0, policy, "old-token", "c")
        complete_login(conn, "tess", good, True, T0, policy, "kept-token", "c")
        touch_session(conn, session_id("kept-token"), T0 + timedelta(minutes=20))
    with tx(engine) as conn:
        complete_login(conn, "tess", good, True, T0 + timedelta(minutes=40), policy, "new-token", "c")
        ids = set(conn.execute(select(workbench_session_table.c.id)).scalars())
    assert ids == {session_id("kept-token"), session_id("new-token")}
    with tx(engine) as conn:
        assert end_session(conn, session_id("kept-token")) is True
        assert end_session(conn, session_id("kept-token")) is False
        assert conn.execute(select(func.count()).select_from(workbench_session_table)).scalar() == 1


def test_needs_rehash_for_every_hash_not_made_as_today():
    assert not accounts.needs_rehash(hash_password(PASSWORD))
    assert accounts.needs_rehash(hash_password(PASSWORD, n=FAST))
    assert accounts.needs_rehash("scrypt$16384$8$1$c2FsdA==$a2V5")  # a shorter key
    assert accounts.needs_rehash("bcrypt$whatever") and accounts.needs_rehash("")
