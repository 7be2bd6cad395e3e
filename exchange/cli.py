"""The ``exchange`` command.

Exit codes: 0 success, 1 the work failed, 2 bad usage or configuration
(with a one-line reason on stderr).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

DEFAULT_CONFIG = "config/exchange.toml"


class UsageFailure(Exception):
    """A one-line reason; the command exits 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exchange", description="Multi-site HL7 v2 medical records exchange")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
        p.add_argument("--database", default=None, help="SQLAlchemy database URL (overrides the config)")

    serve = sub.add_parser("serve", help="run the exchange: MLLP listeners, HTTP endpoint")
    common(serve)

    send = sub.add_parser("send", help="send HL7 messages over MLLP and print each ACK")
    send.add_argument("endpoint", help="host:port or a Twisted client endpoint string (tls:host=...:port=...)")
    send.add_argument("files", nargs="+", metavar="FILE")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True)
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
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a token and print it (once) on stdout")
    create.add_argument("name", help="who the token is for (the actor in the audit trail)")
    create.add_argument("--role", required=True, help="technician or admin")
    common(create)
    revoke = token_sub.add_parser("revoke", help="revoke a token by its name")
    revoke.add_argument("name")
    common(revoke)
    return parser


def _load(args):
    from exchange.config import ConfigError, load_config

    try:
        return load_config(args.config, database=args.database)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


def _database_url(args) -> str:
    """For commands that need only the database: --database, then the
    environment, then the configuration file."""
    if args.database:
        return args.database
    if os.environ.get("EXCHANGE_DATABASE_URL"):
        return os.environ["EXCHANGE_DATABASE_URL"]
    return _load(args).server.database


def cmd_db_upgrade(args) -> int:
    from exchange.store.db import upgrade

    url = _database_url(args)
    upgrade(url)
    print(f"exchange: database is at the newest revision ({_safe_url(url)})")
    return 0


def cmd_serve(args) -> int:
    config = _load(args)
    from exchange.logs import start_logging

    start_logging(config.server.log_level)

    from exchange.store.db import upgrade

    upgrade(config.server.database)  # before the reactor runs: never on the reactor thread

    from twisted.internet import reactor

    from exchange.app import ExchangeService

    service = ExchangeService(config, reactor, announce=lambda line: print(line, flush=True))
    outcome = {"code": 0}

    def start():
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

    def install_signal_handlers():
        signal.signal(signal.SIGINT, stop_once)
        signal.signal(signal.SIGTERM, stop_once)

    reactor.callWhenRunning(install_signal_handlers)  # after Twisted's own
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
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
    from exchange.store.db import make_engine, upgrade, write_transaction

    if args.token_command == "create" and args.role not in {r.value for r in Role}:
        raise UsageFailure(f"unknown role {args.role!r}: use one of {', '.join(r.value for r in Role)}")
    url = _database_url(args)
    engine = make_engine(url)
    try:
        upgrade(engine)  # a fresh database gets its tables, as `serve` would
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


def cmd_replay(args) -> int:
    from exchange.config import facility_contexts
    from exchange.replay import DatabaseBusy, replay
    from exchange.store.db import current_revision, head_revision, make_engine

    if args.batch < 1:
        raise UsageFailure(f"--batch must be at least 1 (got {args.batch})")
    config = _load(args)
    url = config.server.database
    engine = make_engine(url)
    try:
        revision, head = current_revision(engine), head_revision()
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


COMMANDS = {"serve": cmd_serve, "send": cmd_send, "token": cmd_token, "replay": cmd_replay}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "db":
            return cmd_db_upgrade(args)
        return COMMANDS[args.command](args)
    except UsageFailure as exc:
        print(f"exchange: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
