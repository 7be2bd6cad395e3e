"""Engine set-up and schema migrations for the message store.

``make_engine(url)`` is the one place engines are created: SQLite gets WAL,
``synchronous=FULL``, foreign keys and a busy timeout on every connection, and
real transactions (see below); PostgreSQL goes through psycopg 3 with
``pool_pre_ping`` and TCP keepalives on both ends of every connection (see
``PG_KEEPALIVES``). ``upgrade(url_or_engine)`` brings a database to the newest
Alembic revision without any ``alembic.ini`` (``exchange db upgrade`` and the
tests call it).

SQLite transactions: Python's sqlite3 module (before 3.16's new default) does
not emit BEGIN before a SELECT, so a dedup look-up and the insert that follows
it would not be one transaction. ``make_engine`` takes BEGIN over from the
driver (the recipe in SQLAlchemy's SQLite documentation). Writers should open
their transaction with ``write_transaction(engine)``, which on SQLite issues
``BEGIN IMMEDIATE``: the write lock is taken up front (waiting up to
``busy_timeout``) instead of failing with "database is locked" when a read
transaction later tries to become a write transaction after another connection
has committed.
"""
from __future__ import annotations

import os
import socket
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

SQLITE_BUSY_TIMEOUT_MS = 5000

# Connection execution option read by the SQLite "begin" hook.
_SQLITE_BEGIN = "exchange_sqlite_begin"

# A node whose host is lost without a FIN (power loss, a partition) must not keep its
# PostgreSQL sessions -- and with them the advisory locks on its delivery destinations --
# for the kernels' default of two hours without keepalives. Both ends probe an idle
# connection after 10 s, every 5 s, and give up after 3 unanswered probes, or once data
# sent has gone unacknowledged for 30 s: a dead peer's session ends within about 30 s.
# The client's side (libpq parameters), unless the URL or connect_args set one:
PG_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,  # ms
}
# The server's side, for the session (``options``), unless the options set one:
PG_SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": 10,
    "tcp_keepalives_interval": 5,
    "tcp_keepalives_count": 3,
    "tcp_user_timeout": 30000,  # ms
}


IDLE_IN_TRANSACTION_MS = 60_000
"""PostgreSQL: how long the writer's and the API's sessions may sit idle inside a transaction
before the server ends them. Neither waits on anything but the database inside one; a node
stopped mid-batch (a paused VM, SIGSTOP) would otherwise hold its locks -- the links lock a
technician's decision needs, its records -- for as long as it stays stopped. It does not end a
session stopped in the middle of a pipeline (PostgreSQL counts that one active, waiting for the
client's next message): ``end_stale_sessions`` does."""

# The roles in the PostgreSQL application_name of a node's sessions, "exchange ROLE HOST:PID"
# (``session_name``): the sessions ``end_stale_sessions`` may end (pg_stat_activity).
WRITER_SESSION = "writer"
API_SESSION = "api"
DELIVERY_SESSION = "delivery"


def session_name(role: str) -> str:
    """``exchange ROLE HOST:PID``: which process of which node a session is (at most 63 bytes,
    PostgreSQL's limit; the process's id last, kept)."""
    suffix = f":{os.getpid()}"
    return f"exchange {role} {socket.gethostname()}"[: 63 - len(suffix)] + suffix


def make_engine(url: str, *, idle_in_transaction_ms: int | None = None, application_name: str | None = None,
                **kwargs: Any) -> Engine:
    """An Engine for a SQLAlchemy URL (``sqlite:///...`` or ``postgresql+psycopg://...``).

    ``postgresql://`` without a driver means psycopg 3 (the only PostgreSQL
    driver the store supports). ``idle_in_transaction_ms``: PostgreSQL's
    ``idle_in_transaction_session_timeout`` for its sessions (None: the server's);
    ``application_name``: its sessions' role on the server (WRITER_SESSION, ...; ``session_name``).
    Extra keyword arguments go to ``create_engine``.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not parsed.query.get("mode") == "memory":
            if not database.startswith("file:"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif parsed.drivername != "postgresql+psycopg":
            # exchange.store.messages uses psycopg 3 features (binary arrays).
            raise ValueError(f"unsupported driver {parsed.drivername!r}: use postgresql+psycopg://")
        kwargs.setdefault("pool_pre_ping", True)
        connect_args = dict(kwargs.pop("connect_args", {}))
        # psycopg prepares a statement run 5 times, and after 5 more runs the
        # server may settle on a generic plan costed on the table as it was
        # then -- empty, on a fresh database -- and keep it until an ANALYZE,
        # which never comes where autovacuum is off: a DELETE by record ids
        # went on scanning (3 ms per batch at 10,000 rows, growing). Every
        # execution is planned with its own parameters; preparing still saves
        # the parse.
        options = connect_args.get("options", parsed.query.get("options", ""))
        settings = {"plan_cache_mode": "force_custom_plan", **PG_SERVER_KEEPALIVES}
        if idle_in_transaction_ms is not None:
            settings["idle_in_transaction_session_timeout"] = str(idle_in_transaction_ms)
        added = " ".join(f"-c {name}={value}" for name, value in settings.items() if name not in options)
        if added:
            connect_args["options"] = f"{options} {added}".strip()
        for name, value in PG_KEEPALIVES.items():
            if name not in parsed.query:
                connect_args.setdefault(name, value)
        if application_name is not None:
            connect_args["application_name"] = session_name(application_name)
        return create_engine(parsed, connect_args=connect_args, **kwargs)
    raise ValueError(f"unsupported database backend {backend!r}: use sqlite or postgresql")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver must not emit BEGIN itself; _on_begin does (see module doc).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction meant to write; commits on success.

    On SQLite the transaction starts with ``BEGIN IMMEDIATE`` (see module doc);
    on PostgreSQL it is an ordinary transaction.
    """
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})
        with conn.begin():
            yield conn



# -- driver-level statements (the hot paths) --------------------------------------


@contextmanager
def driver_cursor(conn: Connection, statement: str) -> Iterator[Any]:
    """A cursor of the DBAPI connection under ``conn``, inside ``conn``'s
    transaction, whose errors surface as SQLAlchemy's (IntegrityError, ...).

    The hot paths (message store, record store) run their statements here:
    SQLAlchemy's per-statement work costs more than SQLite's own.
    """
    cursor = conn.connection.driver_connection.cursor()
    try:
        yield cursor
    except conn.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(statement, None, exc, conn.dialect.loaded_dbapi.Error) from exc
    finally:
        cursor.close()


_DATABASE_FAILURES = frozenset({"OperationalError", "InterfaceError"})  # PEP 249's names for them


def database_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is the database failing rather than what a transaction asked of it:
    unreachable, the connection lost, a lock or serialization conflict, a deadlock, a busy
    timeout, a full disk (PEP 249's OperationalError and InterfaceError, as SQLAlchemy wraps
    them or as the driver raised them, and SQLAlchemy's pool timeout). The same transaction
    may well commit later. Anything else (a DataError, an IntegrityError, a TypeError) came
    from what the transaction did."""
    if isinstance(exc, (PoolTimeout, DisconnectionError)) or getattr(exc, "connection_invalidated", False):
        return True
    return any(cls.__name__ in _DATABASE_FAILURES for cls in type(exc).__mro__)


UNIQUE_VIOLATION = "23505"  # a row another transaction committed first
DEADLOCK_DETECTED = "40P01"  # PostgreSQL ended the transaction to break a deadlock with another
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout ran out


_STALE_SESSIONS = f"""
WITH ours AS (
  SELECT pid, application_name, state, state_change, wait_event, split_part(application_name, ' ', 2) AS role
    FROM pg_stat_activity
   WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE 'exchange %% %%'
), stale AS (
  SELECT pid, application_name, role FROM ours
   WHERE wait_event = 'ClientRead' AND (
         role IN ('{WRITER_SESSION}', '{API_SESSION}', '{DELIVERY_SESSION}') AND state <> 'idle'
         AND state_change < now() - make_interval(secs => %(stale)s)
      OR role = '{DELIVERY_SESSION}' AND state = 'idle' AND state_change < now() - make_interval(secs => %(idle)s)
         AND EXISTS (SELECT FROM pg_locks l WHERE l.pid = ours.pid AND l.locktype = 'advisory'))
), doomed AS (
  SELECT pid, role FROM stale
   UNION
  SELECT o.pid, o.role FROM ours o JOIN stale s ON o.application_name = s.application_name
   WHERE s.role = '{DELIVERY_SESSION}'
)
SELECT role, pg_terminate_backend(pid) FROM doomed
"""


def end_stale_sessions(conn: Connection, *, stale: float, idle: float) -> list[str]:
    """PostgreSQL: end the sessions of exchange nodes whose client went silent holding locks
    (a paused VM, SIGSTOP: the kernel still answers keepalives) -- the roles of those ended.
    Every node runs this now and then, so a stopped node's locks go without it.

    - A writer's, the API's or a delivery loop's session inside a transaction, waiting ``stale``
      seconds for its client's next message, whether PostgreSQL counts it idle in the transaction
      or (stopped in the middle of a pipeline) still active, which its
      idle_in_transaction_session_timeout never ends: the links lock, its key locks and records
      held, every node's writer and every decision waited as long as it stayed stopped.
    - A delivery loop's session outside a transaction holding a destination's advisory lock,
      silent ``idle`` seconds (a running loop speaks at every poll, and after every answer of the
      destination): no other node took the destination over while it stayed stopped.

    With a delivery session, every delivery session of its process (``session_name``) ends: the
    one a copy is checked on just before it is sent too, so that, resumed, the process sends
    nothing more (its check fails) while another node serves its destinations. A session of a
    running node is never silent that long: its client does nothing but database work inside a
    transaction. Jobs, replays and commands are not touched."""
    rows = conn.exec_driver_sql(_STALE_SESSIONS, {"stale": stale, "idle": idle}).all()
    return [role for role, ended in rows if ended]


def sqlstate(exc: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE of a failed statement (as SQLAlchemy wraps the driver's error, or
    as the driver raised it); None for anything else, and on SQLite."""
    return getattr(getattr(exc, "orig", exc), "sqlstate", None)


def disk_full(exc: BaseException, url: str | None = None) -> bool:
    """Whether a failed statement failed for want of disk space: SQLite's SQLITE_FULL ("database
    or disk is full"), PostgreSQL's disk_full (53100); or, given the SQLite ``url``, an I/O error
    with less than a MiB left beside its file (its WAL and shared-memory files could not be
    written: SQLite says "disk I/O error" then). No other error ("file is not a database")."""
    orig = getattr(exc, "orig", exc)
    if sqlstate(exc) == "53100" or getattr(orig, "sqlite_errorname", None) == "SQLITE_FULL" or (
            "database or disk is full" in str(orig)):
        return True
    io_error = (getattr(orig, "sqlite_errorname", "") or "").startswith("SQLITE_IOERR") or (
        str(orig) == "disk I/O error")
    free = disk_free_bytes(url) if io_error and url else None
    return free is not None and free < 1024 * 1024


def disk_free_bytes(url: str) -> int | None:
    """Bytes free to this user on the file system of a SQLite database file (None on PostgreSQL,
    whose disk is its server's, or when it cannot be told): one statvfs, microseconds."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(parsed.database)))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def advisory_key(text: str) -> int:
    """A PostgreSQL advisory-lock key (int4) for ``text``: its CRC-32, signed. The same on
    every node; a collision only makes two unrelated holders wait for each other."""
    value = zlib.crc32(text.encode("utf-8"))
    return value - (1 << 32) if value >= 1 << 31 else value


# PostgreSQL: the record model is being rebuilt. ``exchange replay`` holds this advisory lock
# exclusively for its whole transaction, the reconciliation jobs share it while they read: its
# TRUNCATE is not MVCC-safe, so a snapshot taken before its commit would see emptied tables. (SQLite
# needs none: a reader's WAL snapshot never sees a writer's transaction before it commits.)
REBUILD_LOCK = (0x45585242, 0)  # "EXRB": pg_advisory_*lock(int, int)'s keys (outbox's namespace is "EXCH")


def lock_rebuild(conn: Connection) -> None:
    """``exchange replay``: take the rebuild lock exclusively until the transaction ends
    (waiting for running jobs at most the transaction's ``lock_timeout``)."""
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s, %s)", REBUILD_LOCK)


def try_share_rebuild(conn: Connection) -> bool:
    """A reconciliation job: share the rebuild lock for the session, unless a replay holds it
    (False at once). Release it with :func:`unshare_rebuild`."""
    return bool(conn.exec_driver_sql("SELECT pg_try_advisory_lock_shared(%s, %s)", REBUILD_LOCK).scalar())


def unshare_rebuild(conn: Connection) -> None:
    conn.exec_driver_sql("SELECT pg_advisory_unlock_shared(%s, %s)", REBUILD_LOCK)


# PostgreSQL: the links between records and persons. Every writer batch that maps messages shares
# this advisory lock for its transaction, and a technician's decision (a review decided, a split, a
# merge of persons, an undo, an opt-out) holds it exclusively: a decision waits for the batches in
# flight, and batches wait for it, so neither writes links it read before the other committed (a
# batch's re-match of an A08 wrote back the person a concurrent split had just taken the record
# from). Writers on several nodes share it among themselves. (SQLite needs none: the API's and the
# writer's write transactions begin IMMEDIATE, one at a time.)
LINKS_LOCK = (0x45584C4B, 0)  # "EXLK"


def hold_links(conn: Connection, *, exclusive: bool) -> None:
    """Take the links lock (shared by a writer's batch, ``exclusive`` for a technician's
    decision) until the transaction ends; nothing on SQLite."""
    if conn.dialect.name == "postgresql":
        function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        conn.exec_driver_sql(f"SELECT {function}(%s, %s)", LINKS_LOCK)


def sqlite_datetime(value: datetime) -> str:
    """How SQLAlchemy's SQLite DATETIME (under ``UTCDateTime``) stores a value."""
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(" ", "microseconds")

# -- migrations ---------------------------------------------------------------


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config built in code (no alembic.ini needed at run time).

    With ``connection``, ``exchange/migrations/env.py`` runs the migrations on
    it, inside the caller's transaction.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


class UpgradeRefused(Exception):
    """The database is not one this exchange may migrate (the reason is one line, no URL)."""


def _run(url_or_engine: str | Engine, fn: Any, revision: str,
         check: Callable[[Engine], str | None] | None = None) -> None:
    """``fn`` to ``revision`` in one transaction; first ``check``: a reason not to (UpgradeRefused)."""
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        reason = check(engine) if check is not None else None
        if reason is not None:
            raise UpgradeRefused(reason)
        # /* TRANSACTION: the schema change, all revisions to `revision` at once. */
        with engine.begin() as conn:
            fn(alembic_config(conn), revision)
    finally:
        if engine is not url_or_engine:
            engine.dispose()


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (default: the newest). Idempotent.

    Refuses (:class:`UpgradeRefused`) a database a newer exchange wrote (a revision this code
    does not know: going back needs that release or a backup) and one that holds another
    application's tables (none of the exchange's revision table): the exchange's tables are
    not installed next to them."""
    _run(url_or_engine, command.upgrade, revision, check=refusal)


def refusal(engine: Engine) -> str | None:
    """Why :func:`upgrade` would refuse the database (one line, no URL), or None."""
    current = current_revision(engine)
    scripts = ScriptDirectory.from_config(alembic_config())
    if current is None:
        tables = sorted(set(inspect(engine).get_table_names()) - {"alembic_version"})  # (empty after "base")
        if tables:
            return (f"it holds {len(tables)} tables of something else ({', '.join(tables[:3])}"
                    f"{', ...' if len(tables) > 3 else ''}) and no exchange revision: use an empty database")
        return None
    try:
        scripts.get_revision(current)
    except Exception:  # noqa: BLE001 - alembic's "no such revision", whatever its class
        return (f"it is at revision {current}, newer than this exchange (newest {scripts.get_current_head()}):"
                " run the release that wrote it, or restore a backup taken before it")
    return None


def downgrade(url_or_engine: str | Engine, revision: str) -> None:
    """Migrate the database down to ``revision`` (``"base"``: no tables at all)."""
    _run(url_or_engine, command.downgrade, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The newest revision shipped with this code."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def server_warnings(engine: Engine) -> list[str]:
    """What an operator should know about the database server before trusting it with a
    feed (one line each, no secrets): on PostgreSQL, autovacuum being off -- every update
    leaves a dead row behind, and without VACUUM the tables and their indexes only grow."""
    if engine.dialect.name != "postgresql":
        return []
    with engine.connect() as conn:
        autovacuum = conn.exec_driver_sql("SELECT current_setting('autovacuum')").scalar_one()
    if autovacuum != "on":
        return ["PostgreSQL autovacuum is off: dead rows will pile up in the exchange's tables "
                "(turn it on, or schedule VACUUM (ANALYZE))"]
    return []


class NodeLockError(Exception):
    """Another ``exchange serve`` runs on this SQLite database."""


def hold_single_node(url: str) -> int | None:
    """SQLite has room for one node: an exclusive lock on ``<database>.serve.lock``, held
    until the process ends (the kernel drops it on any exit, a crash included), keeps a
    second ``exchange serve`` off the same file, where it would deliver every copy a second
    time and out of order. Returns the lock's file descriptor (None on PostgreSQL, where the
    nodes share the work through advisory locks); raises NodeLockError when it is held."""
    import fcntl
    import os

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    path = parsed.database
    if path.startswith("file:"):  # a URI filename (uri=true)
        path = path[len("file:"):].split("?", 1)[0]
    lock = str(Path(path).resolve()) + ".serve.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise NodeLockError(f"another exchange serve (pid {holder}) runs on this database ({lock} is held):"
                            " on SQLite one node serves; use PostgreSQL for more") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd
