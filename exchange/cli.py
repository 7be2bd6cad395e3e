"""The ``exchange`` command.

Exit codes: 0 success, 1 the work failed, 2 bad usage or configuration
(with a one-line reason on stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

DEFAULT_CONFIG = "config/exchange.toml"


class UsageFailure(Exception):
    """A one-line reason; the command exits 2."""


class WorkFailure(Exception):
    """A one-line reason; the command exits 1 (the work failed, not its usage)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``exchange: REASON (see PROG --help)``, exit 2
    (argparse prints the whole usage block first). Its subcommands' parsers are of this class too."""

    def error(self, message: str):
        reason = " ".join(message.split())  # one line, whatever the user typed
        raise UsageFailure(f"{reason} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="exchange", description="Multi-site HL7 v2 medical records exchange")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None,
                       help=f"configuration file (default {DEFAULT_CONFIG}; read and checked whenever it is there)")
        p.add_argument("--database", default=None, help="SQLAlchemy database URL (overrides the config)")

    serve = sub.add_parser("serve", help="run the exchange: MLLP listeners, HTTP endpoint")
    common(serve)

    send = sub.add_parser("send", help="send HL7 messages over MLLP and print each ACK")
    send.add_argument("endpoint", help="host:port or a Twisted client endpoint string (tls:host=...:port=...)")
    send.add_argument("files", nargs="+", metavar="FILE")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_sub.add_parser("upgrade", help="apply migrations (Alembic) up to the newest")
    common(upgrade)

    replay = sub.add_parser(
        "replay",
        help="rebuild the record model from the stored messages (stop the exchange first)",
        description="Rebuild the record model from the stored raw messages, in arrival order, in one "
        "transaction. The exchange must be stopped. Exit 1 if some messages no longer apply.",
    )
    common(replay)
    replay.add_argument("--dry-run", action="store_true", help="report what a rebuild gives, then roll it back")
    replay.add_argument("--batch", type=int, default=500, help="messages per batch (default 500)")

    token = sub.add_parser("token", help="bearer tokens for the HTTP API")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = token_sub.add_parser("create", help="create a token and print it (once) on stdout")
    create.add_argument("name", help="who the token is for (the actor in the audit trail)")
    create.add_argument("--role", required=True, help="technician or admin")
    common(create)
    revoke = token_sub.add_parser("revoke", help="revoke a token by its name")
    revoke.add_argument("name")
    common(revoke)

    user = sub.add_parser("user", help="workbench logins: add (or --reset), disable, list")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    add = user_sub.add_parser(
        "add",
        help="create a workbench user; the password is read from stdin (one line)",
        description="Create a workbench user. The password (at least 12 characters) is read from "
        "stdin: one line, or asked for twice when stdin is a terminal.",
    )
    add.add_argument("name", help="the login name (the actor in the audit trail)")
    add.add_argument("--role", required=True, help="technician or admin")
    add.add_argument("--reset", action="store_true",
                     help="if the user exists: set this password and role, enable it again, end its sessions")
    common(add)
    disable = user_sub.add_parser("disable", help="disable a workbench user and end its sessions")
    disable.add_argument("name")
    common(disable)
    listing = user_sub.add_parser("list", help="every workbench user: role, state, created, open sessions")
    common(listing)

    reviews = sub.add_parser("reviews", help="the patient index's review queue: list, show, decide, undo")
    reviews_sub = reviews.add_subparsers(dest="reviews_command", required=True, metavar="COMMAND")
    listing = reviews_sub.add_parser("list", help="reviews in a state, oldest first")
    listing.add_argument("--state", default="open", choices=("open", "resolved", "superseded", "all"))
    listing.add_argument("--limit", type=int, default=100, help="at most this many (1 to 1000, default 100)")
    listing.add_argument("--after", type=int, default=None, help="only reviews with a larger id (the next page)")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.add_argument("--actor", default=None, help="who reads (the audit trail; default the login name)")
    common(listing)
    show = reviews_sub.add_parser("show", help="one review: the records side by side, every field's level and weight")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true", help="JSON instead of a table")
    show.add_argument("--actor", default=None, help="who reads (the audit trail; default the login name)")
    common(show)
    decide = reviews_sub.add_parser("decide", help="resolve an open review: link or not-a-match")
    decide.add_argument("id", type=int)
    decide.add_argument("decision", choices=("link", "not-a-match"))
    decide.add_argument("--person", type=int, default=None, help="link to this person (default: the suggestion)")
    decide.add_argument("--candidate", nargs=2, metavar=("FACILITY", "MRN"), default=None,
                        help="link to this candidate's person")
    decide.add_argument("--reason", default=None, help="why (kept with the decision)")
    decide.add_argument("--actor", required=True, help="who decides (kept with the decision)")
    decide.add_argument("--force", action="store_true",
                        help="link even two records of one facility, or records marked not a match")
    decide.add_argument("--json", action="store_true", help="print the resolved review as JSON")
    common(decide)
    undo = reviews_sub.add_parser("undo", help="undo a technician's decision (its id is printed by decide)")
    undo.add_argument("decision", type=int)
    undo.add_argument("--reason", default=None, help="why (kept with the undo)")
    undo.add_argument("--actor", required=True, help="who undoes it (kept with the undo)")
    common(undo)

    reconcile = sub.add_parser(
        "reconcile",
        help="run one reconciliation job (or all) now and print its report",
        description="Run a reconciliation job now (all of them without JOB) and print its report: "
        "consistency (what should never be in the database), match-model (re-estimate the matching "
        "model by EM and store it). Exit 1 when a job found errors.",
    )
    reconcile.add_argument("job", nargs="?", default=None, metavar="JOB", help="consistency or match-model")
    common(reconcile)

    export = sub.add_parser("export", help="export data as CSV on stdout")
    export_sub = export.add_subparsers(dest="export_command", required=True, metavar="COMMAND")
    links = export_sub.add_parser(
        "links", help="facility,authority,mrn,person: every active facility record and its person now"
    )
    common(links)
    return parser


def _load(args):
    from exchange.config import ConfigError, load_config

    try:
        return load_config(args.config or DEFAULT_CONFIG, database=args.database)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


def _database_url(args) -> str:
    """For commands that need only the database: --database, then the
    environment, then the configuration file.

    The configuration is read and checked (exit 2 on any problem) whatever
    supplies the database: always when --config is given, and at the default
    path when something is there. Only without --config and without a file at
    the default path does a database from --database or the environment do
    without one (``exchange db upgrade --database URL`` on a bare machine).
    """
    from exchange.config import DATABASE_ENV, check_database_url

    for url, key in ((args.database, "--database"), (os.environ.get(DATABASE_ENV), DATABASE_ENV)):
        if url:
            reason = check_database_url(url)
            if reason:
                raise UsageFailure(f"{key}: {reason}")
            if args.config is not None or os.path.lexists(DEFAULT_CONFIG):
                _load(args)
            return url
    return _load(args).server.database


def _upgrade(engine, url: str) -> None:
    """Migrate the database to the newest revision; exit 2 when it cannot be opened or must not
    be upgraded, 1 when the upgrade itself failed (a full disk: rolled back, every revision
    is one transaction). The reasons never quote the URL's password or the data."""
    from exchange.store.db import UpgradeRefused, current_revision, disk_full, sqlstate, upgrade

    with _no_leftover(url):
        try:
            current_revision(engine)
        except Exception as exc:  # unreachable or unusable; its text may quote the URL's password
            raise _cannot_open(url, exc) from None
        try:
            upgrade(engine)
        except UpgradeRefused as exc:
            raise UsageFailure(f"database {_safe_url(url)}: {exc}") from None
        except Exception as exc:
            why = "the disk is full" if disk_full(exc, url) else _sqlite_reason(exc) or (
                f"{type(exc).__name__}" + (f", SQLSTATE {sqlstate(exc)}" if sqlstate(exc) else ""))
            raise WorkFailure(f"database {_safe_url(url)}: the upgrade failed and was rolled back: {why}") from None


def _cannot_open(url: str, exc: BaseException) -> Exception:
    """Why the database cannot be opened, as the exception to raise: a full disk (exit 1: the
    work failed), else exit 2 with the error's type, and SQLite's own words when it said some
    ("unable to open database file"); never a PostgreSQL error's text (it may quote the URL)."""
    from exchange.store.db import disk_full

    if disk_full(exc, url):
        return WorkFailure(f"database {_safe_url(url)}: the disk is full: it cannot be opened or created")
    said = _sqlite_reason(exc)
    return UsageFailure(f"cannot open the database {_safe_url(url)} ({type(exc).__name__}"
                        f"{': ' + said if said else ''})")


def _sqlite_reason(exc: BaseException) -> str | None:
    """SQLite's own words for a failure ("disk I/O error", "database is locked"): fixed texts,
    never a value of the data; None for any other database."""
    import sqlite3

    orig = getattr(exc, "orig", exc)
    return str(orig) if isinstance(orig, sqlite3.Error) and str(orig) else None


def cmd_db_upgrade(args) -> int:
    from exchange.store.db import current_revision, make_engine

    url = _database_url(args)
    engine = None
    try:
        with _no_leftover(url):
            try:
                engine = make_engine(url)
                before = current_revision(engine)
            except Exception as exc:  # unreachable or unusable; its text may quote the URL's password
                raise _cannot_open(url, exc) from None
            _upgrade(engine, url)
            after = current_revision(engine)
    finally:
        if engine is not None:
            engine.dispose()
    if before == after:
        print(f"exchange: database {_safe_url(url)} is at the newest revision ({after}) already")
    else:
        print(f"exchange: database {_safe_url(url)} upgraded from {before or 'empty'} to {after}")
    return 0


MIN_OPEN_FILES = 256  # serve's own descriptors, its writer's pipes, and connections to spare


def _enough_descriptors() -> None:
    """The soft open-file limit raised to the hard one (each connection is a descriptor), and a
    clear refusal when even that is too low: below about 128, starting the writer process
    fails in Twisted's posix_spawn with nothing but "Bad file descriptor"."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        raise UsageFailure(f"the open-file limit is {soft} (ulimit -n): serve needs at least {MIN_OPEN_FILES}")


def cmd_serve(args) -> int:
    # A stop signal while the exchange is still starting (imports, migrations) is
    # remembered and honoured once the reactor runs: the default SIGINT handler
    # would raise wherever Python happens to be, even where the exception is
    # swallowed (a garbage-collection callback), and the exchange would run on.
    early: dict[str, int] = {}

    def remember(signum, _frame):
        early.setdefault("signal", signum)

    signal.signal(signal.SIGINT, remember)
    signal.signal(signal.SIGTERM, remember)
    config = _load(args)
    _enough_descriptors()
    from exchange.logs import start_logging

    start_logging(config.server.log_level)

    from exchange.store.db import NodeLockError, hold_single_node, make_engine, server_warnings

    engine = make_engine(config.server.database)
    try:
        _upgrade(engine, config.server.database)  # before the reactor runs: never on the reactor thread
        for warning in server_warnings(engine):
            print(f"exchange: warning: {warning}", file=sys.stderr, flush=True)
    finally:
        engine.dispose()
    try:
        hold_single_node(config.server.database)  # its descriptor stays open while the process runs
    except NodeLockError as exc:
        raise UsageFailure(str(exc)) from None

    from twisted.internet import reactor

    from exchange.app import ExchangeService

    service = ExchangeService(config, reactor, announce=lambda line: print(line, flush=True))
    outcome = {"code": 0}

    def start():
        if outcome.get("stopping"):  # told to stop while starting: nothing to start
            return
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        d = service.startService()

        def failed(failure):
            print(f"exchange: cannot start: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
            outcome["code"] = 1
            outcome["stopping"] = True
            reactor.stop()

        d.addErrback(failed)

    def stop_once(signum, _frame):
        """SIGINT/SIGTERM: stop cleanly once; a second signal (make, a terminal
        and a supervisor often all send one) must not stop it twice."""
        if not outcome.get("stopping"):
            outcome["stopping"] = True
            reactor.callFromThread(reactor.stop)

    def hangup(signum, _frame):
        """SIGHUP (often "reload" to a daemon's supervisor): the configuration is read once, at
        start; say so and keep serving rather than die without a clean stop."""
        reactor.callFromThread(lambda: print("exchange: SIGHUP ignored: the configuration is read at start;"
                                             " restart the exchange to apply changes", file=sys.stderr, flush=True))

    def install_signal_handlers():
        signal.signal(signal.SIGINT, stop_once)
        signal.signal(signal.SIGTERM, stop_once)
        signal.signal(signal.SIGHUP, hangup)
        if "signal" in early:
            stop_once(early["signal"], None)

    if "signal" in early:
        print("exchange: stopped before it started", flush=True)
        return 0
    reactor.callWhenRunning(install_signal_handlers)  # after Twisted's own
    reactor.callWhenRunning(start)
    print(f"exchange: database {_safe_url(config.server.database)}", flush=True)
    reactor.run()
    return outcome["code"]


def cmd_send(args) -> int:
    from twisted.internet.task import react

    from exchange.send import SendUsageError, send_command

    result = {}

    def main(reactor):
        d = send_command(reactor, args.endpoint, args.files, timeout=args.timeout)
        d.addCallback(lambda code: result.update(code=code))
        return d

    try:
        react(main)
    except SystemExit as exc:  # react() exits; we want our own code
        if "code" in result:
            return result["code"]
        if isinstance(exc.code, int):
            return exc.code
        raise
    except SendUsageError as exc:
        raise UsageFailure(str(exc)) from None
    return result.get("code", 1)


def cmd_token(args) -> int:
    from datetime import datetime, timezone

    from exchange.auth import Role, TokenError, create_token, revoke_token
    from exchange.store.db import make_engine, write_transaction

    if args.token_command == "create" and args.role not in {r.value for r in Role}:
        raise UsageFailure(f"unknown role {args.role!r}: use one of {', '.join(r.value for r in Role)}")
    url = _database_url(args)
    engine = make_engine(url)
    try:
        _upgrade(engine, url)  # a fresh database gets its tables, as `serve` would
        now = datetime.now(timezone.utc)
        # /* TRANSACTION: one api_token row (created or revoked). */
        with write_transaction(engine) as conn:
            if args.token_command == "create":
                try:
                    token = create_token(conn, args.name, args.role, now)
                except TokenError as exc:
                    raise UsageFailure(str(exc)) from None
            elif not revoke_token(conn, args.name, now):
                print(f"exchange: no live token named {args.name!r}", file=sys.stderr)
                return 1
    finally:
        engine.dispose()
    if args.token_command == "create":
        print(token, flush=True)  # the only time the token is shown: only its sha256 is stored
    else:
        print(f"exchange: token {args.name!r} revoked", flush=True)
    return 0


def _read_password(name: str) -> str:
    """One line from stdin, or asked for twice (not echoed) when stdin is a terminal."""
    from exchange.accounts import check_password

    if sys.stdin is not None and sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != password:
            raise UsageFailure("the two passwords differ")
    else:
        line = sys.stdin.readline() if sys.stdin is not None else ""
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    reason = check_password(password)
    if reason:
        raise UsageFailure(reason)
    return password


def cmd_user(args) -> int:
    """``user add NAME --role R [--reset]`` (password on stdin), ``user disable NAME``, ``user list``."""
    from exchange.accounts import UserError, add_user, check_name, disable_user, find_user, hash_password, list_users
    from exchange.auth import Role
    from exchange.store.db import make_engine, write_transaction

    if args.user_command == "list":
        engine = _migrated_engine(args)
        try:
            with engine.connect() as conn:
                users = list_users(conn, _now())
        finally:
            engine.dispose()
        print("name\trole\tstate\tcreated\tsessions", flush=True)
        for u in users:
            state = f"locked until {u.locked_until.isoformat(timespec='seconds')}" if u.locked_until else u.state
            print(f"{u.name}\t{u.role}\t{state}\t{u.created_at.isoformat(timespec='seconds')}\t{u.sessions}",
                  flush=True)
        return 0
    reason = check_name(args.name)
    if reason:
        raise UsageFailure(reason)
    if args.user_command == "add" and args.role not in {r.value for r in Role}:
        raise UsageFailure(f"unknown role {args.role!r}: use one of {', '.join(r.value for r in Role)}")
    url = _database_url(args)
    engine = make_engine(url)
    try:
        _upgrade(engine, url)  # a fresh database gets its tables, as `serve` would
        if args.user_command == "add":
            if not args.reset:
                with engine.connect() as conn:  # say so before asking for a password
                    if find_user(conn, args.name) is not None:
                        raise UsageFailure(f"a workbench user named {args.name!r} exists already "
                                           "(give --reset to set a new password)")
            password_hash = hash_password(_read_password(args.name))  # outside the transaction: it takes a while
        # /* TRANSACTION: one workbench_user row (created, reset or disabled); the user's sessions end. */
        with write_transaction(engine) as conn:
            if args.user_command == "add":
                try:
                    created = add_user(conn, args.name, args.role, password_hash, _now(), reset=args.reset)
                except UserError as exc:
                    raise UsageFailure(str(exc)) from None
            else:
                disabled = disable_user(conn, args.name, _now())
    finally:
        engine.dispose()
    if args.user_command == "add":
        what = "created" if created else "reset (new password and role; its sessions ended)"
        print(f"exchange: workbench user {args.name!r} {what}, role {args.role}", flush=True)
        return 0
    if disabled is None:
        print(f"exchange: no workbench user named {args.name!r}", file=sys.stderr)
        return 1
    state = "disabled; its sessions ended" if disabled else "was disabled already"
    print(f"exchange: workbench user {args.name!r} {state}", flush=True)
    return 0


def cmd_replay(args) -> int:
    from exchange.config import facility_contexts
    from exchange.replay import DatabaseBusy, replay
    from exchange.store.db import current_revision, head_revision, make_engine

    if args.batch < 1:
        raise UsageFailure(f"--batch must be at least 1 (got {args.batch})")
    config = _load(args)
    url = config.server.database
    if _missing_sqlite_file(url):  # connecting would leave an empty file behind
        raise UsageFailure(f"database {_safe_url(url)}: no such file: run `exchange db upgrade` first")
    engine = make_engine(url)
    try:
        try:
            revision, head = current_revision(engine), head_revision()
        except Exception as exc:  # an unreachable or unusable database; its text may quote the URL's password
            raise _cannot_open(url, exc) from None
        if revision != head:
            raise UsageFailure(
                f"database {_safe_url(url)} is at revision {revision or 'none'}, not {head}: run `exchange db upgrade` first"
            )
        charsets = {f.code: f.charset for f in config.facilities}
        try:
            report = replay(
                engine,
                facility_contexts(config),
                charset_for=lambda facility: charsets.get(facility, "utf-8"),
                batch=args.batch,
                dry_run=args.dry_run,
            )
        except DatabaseBusy as exc:
            raise UsageFailure(str(exc)) from None
        except Exception as exc:  # the transaction rolled back; the text of a database error may quote data
            print(f"exchange: replay failed ({type(exc).__name__}); nothing was changed", file=sys.stderr)
            return 1
    finally:
        engine.dispose()
    # PHI-free: ids, facility, control id, HL7 error code and field only.
    for n in report.not_applied:
        print(
            f"exchange: message {n.message_id} {n.facility or '-'}/{n.control_id or '-'} no longer applies: "
            f"error {n.code}{' ' + n.location if n.location else ''}",
            flush=True,
        )
    if report.restored:
        print(f"exchange: {report.restored} records without a saved link are back with the person their link "
              f"history names", flush=True)
    if report.lost_persons:
        print(f"exchange: {report.lost_persons} records' link history names a person that no longer exists: "
              f"each has a person of its own", flush=True)
    verb = "replayed" if report.committed else "dry run (rolled back): would replay"
    print(
        f"exchange: {verb} {report.messages} messages: {report.records} records, {report.documents} documents; "
        f"{len(report.not_applied)} no longer apply ({_safe_url(url)})",
        flush=True,
    )
    return 1 if report.not_applied else 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _migrated_engine(args, url: str | None = None):
    """An engine on the command's database (``url``, else as ``_database_url`` finds it),
    which must be at the newest revision (else exit 2)."""
    from exchange.store.db import current_revision, head_revision, make_engine, refusal

    url = url or _database_url(args)
    if _missing_sqlite_file(url):  # connecting would leave an empty file behind
        raise UsageFailure(f"database {_safe_url(url)}: no such file: run `exchange db upgrade` first")
    try:
        engine = make_engine(url)
        revision, head = current_revision(engine), head_revision()
        refused = refusal(engine) if revision != head else None
    except Exception as exc:  # an unreachable or unusable database; its text may quote the URL's password
        raise _cannot_open(url, exc) from None
    if refused is not None:  # a newer release's, or another application's: `db upgrade` would not help
        engine.dispose()
        raise UsageFailure(f"database {_safe_url(url)}: {refused}")
    if revision != head:
        engine.dispose()
        raise UsageFailure(
            f"database {_safe_url(url)} is at revision {revision or 'none'}, not {head}: run `exchange db upgrade` first"
        )
    return engine


def _missing_sqlite_file(url: str) -> bool:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    path = parsed.database or ""
    return (parsed.get_backend_name() == "sqlite" and bool(path) and not path.startswith("file:")
            and path != ":memory:" and not os.path.exists(path))


@contextlib.contextmanager
def _no_leftover(url: str):
    """A SQLite file that did not exist before, removed again (with its -wal and -shm) when the
    command fails: a full disk, an unusable directory leave no empty database behind."""
    from sqlalchemy.engine import make_url

    created = _missing_sqlite_file(url)
    try:
        yield
    except (UsageFailure, WorkFailure):
        if created:
            path = make_url(url).database or ""
            for leftover in (path, path + "-wal", path + "-shm", path + "-journal"):
                with contextlib.suppress(OSError):
                    os.remove(leftover)
        raise


def _cli_audit(conn, args, action: str, resource: str, key: str | None, outcome: str, shown=None) -> None:
    """An audit row for a command that reads or changes patient data (role "cli"), and one
    (resource ``record``) per facility record ``shown`` names, as the API writes."""
    import getpass
    from datetime import datetime, timezone

    from exchange.audit import AuditEvent, Outcome, record_read

    actor = getattr(args, "actor", None)
    if not actor:
        try:
            actor = getpass.getuser()
        except Exception:  # noqa: BLE001 - no login name (containers): still audited
            actor = "unknown"
    record_read(conn, AuditEvent(at=datetime.now(timezone.utc), actor=actor[:64], role="cli", action=action,
                                 resource=resource, facility=None, key=key, outcome=Outcome(outcome), remote=None),
                shown)


def _cell(value, width: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _review_table(rows: list[dict]) -> list[str]:
    lines = [f"{'ID':>7}  {'STATE':<10}  {'KIND':<16}  {'SCORE':>6}  {'RECORD':<28}  {'CANDIDATES':<40}  REASONS"]
    for r in rows:
        record, *cands = (f"{x['facility']}/{x['mrn']}" for x in r["records"])
        score = "" if r["score"] is None else f"{r['score']:.1f}"
        lines.append(
            f"{r['id']:>7}  {r['state']:<10}  {_cell(r['kind'], 16):<16}  {score:>6}  {_cell(record, 28):<28}  "
            f"{_cell(', '.join(cands), 40):<40}  {', '.join(r['reasons'])}"
        )
    return lines


def _review_sheet(d: dict) -> list[str]:
    """A review for a terminal: the records side by side, each candidate's level and weight per field."""
    t = d["thresholds"]

    def num(x) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = [
        f"review {d['id']}: {d['state']}, {d['kind']}, opened {d['created_at']}"
        + (f", {d['decision']} by {d['decided_by']} at {d['decided_at']}" if d["decision"] else ""),
        f"score {num(d['score'])} bits; link automatically at {num(t['upper'])}, review from {num(t['lower'])}",
        f"reasons: {', '.join(d['reasons']) or '-'}; suggested person: {d['person'] if d['person'] is not None else '-'}",
    ]
    if d["note"]:
        lines.append(f"note: {d['note']}")
    if d["decision_id"] is not None:
        lines.append(f"decision {d['decision_id']} (undo: exchange reviews undo {d['decision_id']} --actor NAME)")
    sides = [d["record"]] + d["candidates"]
    width = 34
    head = ["field".ljust(10)] + [_cell(f"{s['facility']}/{s['mrn']}", width).ljust(width) for s in sides]
    lines += ["", "  ".join(head)]
    persons = ["person".ljust(10)] + [
        _cell("gone" if not s["exists"] else f"{s['person']} ({s['link']})", width).ljust(width) for s in sides
    ]
    lines.append("  ".join(persons))
    for row in d["comparison"]:
        cells = [row["field"].ljust(10), _cell(row["record"] or "", width).ljust(width)]
        for c in row["candidates"]:
            weight = "" if c["weight"] is None else f" {c['weight']:+.1f}"
            mark = "*" if c.get("discounted") else ""
            tail = f"  [{c['level'] or '?'}{weight}{mark}]"
            cells.append((_cell(c["value"] or "", width - len(tail)) + tail).ljust(width))
        lines.append("  ".join(cells))
    lines.append("  ".join(["total".ljust(10), "".ljust(width)] + [num(c["score"]).ljust(width) for c in d["candidates"]]))
    for c in d["candidates"]:
        for rule in c["rules"]:
            lines.append(f"{c['facility']}/{c['mrn']}: {rule}")
    if any(c.get("discounted") for row in d["comparison"] for c in row["candidates"]):
        lines.append("* not counted (household rule)")
    return lines


def cmd_reviews(args) -> int:
    import json

    from exchange.audit import Named
    from exchange.store import reviews
    from exchange.store.db import write_transaction

    engine = _migrated_engine(args)
    try:
        if args.reviews_command == "list":
            if not 1 <= args.limit <= reviews.MAX_PAGE:
                raise UsageFailure(f"--limit must be from 1 to {reviews.MAX_PAGE}")
            # /* TRANSACTION: a read of the queue and its audit row. */
            with write_transaction(engine) as conn:
                rows = reviews.list_reviews(conn, None if args.state == "all" else args.state, limit=args.limit,
                                            after=args.after)
                _cli_audit(conn, args, "read", "review", f"state={args.state}", "ok", rows)
            print(json.dumps(rows, indent=2) if args.json else "\n".join(_review_table(rows)), flush=True)
            return 0
        if args.reviews_command == "show":
            # /* TRANSACTION: a read of one review and its audit row. */
            with write_transaction(engine) as conn:
                detail = reviews.review_detail(conn, args.id)
                _cli_audit(conn, args, "read", "review", str(args.id), "ok" if detail else "not-found", detail)
            if detail is None:
                print(f"exchange: no review {args.id}", file=sys.stderr)
                return 1
            print(json.dumps(detail, indent=2) if args.json else "\n".join(_review_sheet(detail)), flush=True)
            return 0
        now = _now()
        deciding = args.reviews_command == "decide"
        resource, key = ("review", str(args.id)) if deciding else ("person", f"decision/{args.decision}")
        try:
            # /* TRANSACTION: the decision (records moved, link events, sticky pairs, the review) and its audit row. */
            with write_transaction(engine) as conn:
                if deciding:
                    result = reviews.decide_review(
                        conn, args.id, args.decision, actor=args.actor, now=now, person_id=args.person,
                        candidate=tuple(args.candidate) if args.candidate else None, reason=args.reason,
                        force=args.force,
                    )
                else:
                    result = reviews.undo_decision(conn, args.decision, actor=args.actor, now=now, reason=args.reason)
                _cli_audit(conn, args, "decide", resource, key, "ok", result)
        except reviews.DecisionError as exc:
            # /* TRANSACTION: the refusal's audit row, with the records its reason names (as the API's). */
            with write_transaction(engine) as conn:
                _cli_audit(conn, args, "decide", resource, key, "not-found" if exc.status == 404 else "invalid",
                           Named(exc.records))
            if exc.status == 422:
                raise UsageFailure(exc.reason) from None
            print(f"exchange: {exc.reason}", file=sys.stderr)
            return 1
    finally:
        engine.dispose()
    if args.reviews_command == "decide":
        if args.json:
            print(json.dumps(result, indent=2), flush=True)
        else:
            r = result["record"]
            print(f"exchange: review {result['id']} resolved ({result['decision']}): {r['facility']}/{r['mrn']} is in "
                  f"person {r['person']} ({r['link']}); decision {result['decision_id']}, undo with "
                  f"`exchange reviews undo {result['decision_id']} --actor NAME`", flush=True)
    else:
        moved = [e for e in result["events"] if e["from_person"] != e["to_person"]]
        print(f"exchange: decision {result['undone']} undone by decision {result['id']}: "
              f"{len(moved)} record(s) moved back"
              + (f"; review {result['review']} is open again" if result["review"] else ""), flush=True)
    return 0


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def cmd_export(args) -> int:
    """``export links``: CSV on stdout, header facility,authority,mrn,person (CONTRACT.md)."""
    import csv

    from exchange.store.db import write_transaction
    from exchange.store.reviews import EXPORT_HEADER, export_links

    engine = _migrated_engine(args)
    try:
        # /* TRANSACTION: the export's audit row. */
        with write_transaction(engine) as conn:
            _cli_audit(conn, args, "read", "person", "export links", "ok")
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(EXPORT_HEADER)
        # /* TRANSACTION: one consistent read of every record's person (a snapshot: the writer is not held up). */
        with engine.connect() as conn, conn.begin():
            for row in export_links(conn):
                out.writerow(row)
        sys.stdout.flush()
    finally:
        engine.dispose()
    return 0


def cmd_reconcile(args) -> int:
    """One job or all, now; their reports on stdout (counts and ids only). Exit 1 if one found errors."""
    from exchange.jobs import JOBS

    if args.job is not None and args.job not in JOBS:
        raise UsageFailure(f"unknown job {args.job!r}: use one of {', '.join(JOBS)}")
    config = _load(args)
    engine = _migrated_engine(args, config.server.database)  # the file is read once
    failed = False
    try:
        for name in [args.job] if args.job else list(JOBS):
            try:
                report = JOBS[name].run(engine, config, _now())
            except Exception as exc:  # a bug or a database error; its text may quote data
                print(f"{name}: failed ({type(exc).__name__})", flush=True)
                failed = True
                continue
            print(report.summary(), flush=True)
            for line in report.lines:
                print(f"  {line}", flush=True)
            failed = failed or report.errors > 0
    finally:
        engine.dispose()
    return 1 if failed else 0


COMMANDS = {"serve": cmd_serve, "send": cmd_send, "token": cmd_token, "user": cmd_user, "replay": cmd_replay,
            "reviews": cmd_reviews, "export": cmd_export, "reconcile": cmd_reconcile}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)  # --help prints and exits 0 (SystemExit)
        if extra:  # named with the subcommand they were given to (argparse names only "exchange")
            words = [args.command] + [getattr(args, f"{args.command}_command", None) or ""]
            raise UsageFailure(f"unrecognized arguments: {' '.join(' '.join(extra).split())}"
                               f" (see exchange {' '.join(w for w in words if w)} --help)")
        if args.command == "db":
            return cmd_db_upgrade(args)
        return COMMANDS[args.command](args)
    except UsageFailure as exc:
        print(f"exchange: {exc}", file=sys.stderr)
        return 2
    except WorkFailure as exc:
        print(f"exchange: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # interrupted (Ctrl-C): no traceback
        print("exchange: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`exchange export links | head`): no traceback
        # Python flushes stdout once more at exit: point it at /dev/null so that fails quietly too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
