"""The `exchange` command as a user runs it: exit codes, one-line reasons,
migrations, `exchange send` against a running server, the size limit and
the idle timeout over real sockets."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, inspect, text

from exchange.store.db import head_revision
from tests.support import ExchangeProcess, MLLPConnection, adt, msa, write_config


def exchange(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exchange.cli", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


def test_missing_config_file_exits_2_with_one_line(tmp_path):
    done = exchange("serve", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.toml" in lines[0]


def test_unknown_key_exits_2_naming_the_key(tmp_path):
    config = write_config(tmp_path, server_extra='colour = "blue"')
    done = exchange("serve", "--config", str(config))
    assert done.returncode == 2
    assert "server.colour" in done.stderr and str(config) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [("export", "links"), ("reviews", "list"), ("user", "list"), ("db", "upgrade")])
def test_a_bad_database_url_is_one_line_and_exit_2(argv):
    for url in ("notaurl", "garbage://x"):
        done = exchange(*argv, "--database", url)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines() == [
            "exchange: --database: must be an SQLAlchemy URL starting with sqlite:// or postgresql"
            " (e.g. sqlite:///var/exchange.db)"]


# Every command that reads the database, as a user types it (the database named on the line or in the environment).
DATABASE_COMMANDS = [
    ("export", "links"),
    ("user", "add", "ghost", "--role", "admin"),
    ("user", "list"),
    ("user", "disable", "ghost"),
    ("token", "create", "ops", "--role", "admin"),
    ("token", "revoke", "ops"),
    ("reviews", "list"),
    ("reviews", "show", "1"),
    ("reviews", "decide", "1", "link", "--actor", "ann"),
    ("reviews", "undo", "1", "--actor", "ann"),
    ("db", "upgrade"),
]

BAD_CONFIGS = {  # what is in the file -> the key and reason the one line names
    "unknown key": ('colour = "blue"', "server.colour: unknown key"),
    "wrong type": ('idle_timeout = "soon"', "server.idle_timeout: must be a number of seconds (got a string)"),
    "missing file": (None, "file not found"),
}


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    from exchange import cli

    monkeypatch.setattr(sys, "stdin", io.StringIO("a long enough password\n"))  # for `user add`
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("source", ["--database", "EXCHANGE_DATABASE_URL"])
@pytest.mark.parametrize("bad", list(BAD_CONFIGS))
@pytest.mark.parametrize("argv", DATABASE_COMMANDS, ids=" ".join)
def test_an_explicit_config_is_checked_whatever_names_the_database(tmp_path, capsys, monkeypatch, argv, bad, source):
    """Found by a black-box audit: with the database from --database or the environment,
    `--config` was never read: `user add ghost --role admin --config bad.toml` created the user."""
    extra, reason = BAD_CONFIGS[bad]
    config = tmp_path / "cfg" / "exchange.toml"
    if extra is not None:
        config.parent.mkdir()
        write_config(config.parent, server_extra=extra)
    monkeypatch.chdir(tmp_path)  # no config/exchange.toml here: only the one given counts
    database = tmp_path / "x.db"
    monkeypatch.delenv("EXCHANGE_DATABASE_URL", raising=False)
    if source == "--database":
        argv = (*argv, "--database", f"sqlite:///{database}")
    else:
        monkeypatch.setenv("EXCHANGE_DATABASE_URL", f"sqlite:///{database}")
    code, out, err = run_cli(capsys, monkeypatch, *argv, "--config", str(config))
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"exchange: {config}: {reason}"]
    assert not database.exists()  # nothing done: no user, no token, no migration


def test_without_config_the_database_on_the_line_will_do_if_no_file_is_at_the_default_path(
        tmp_path, capsys, monkeypatch):
    """`exchange db upgrade --database URL` on a machine without config/exchange.toml."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EXCHANGE_DATABASE_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'bare.db'}"
    assert run_cli(capsys, monkeypatch, "db", "upgrade", "--database", url)[0] == 0
    assert run_cli(capsys, monkeypatch, "export", "links", "--database", url)[:2] == (
        0, "facility,authority,mrn,person\n")
    monkeypatch.setenv("EXCHANGE_DATABASE_URL", url)
    assert run_cli(capsys, monkeypatch, "user", "list")[0] == 0
    monkeypatch.delenv("EXCHANGE_DATABASE_URL")
    code, out, err = run_cli(capsys, monkeypatch, "user", "list")  # no database named anywhere
    assert code == 2 and err.splitlines() == ["exchange: config/exchange.toml: file not found"]


def test_a_command_that_needs_a_migrated_database_leaves_no_empty_sqlite_file(tmp_path, capsys, monkeypatch):
    """Found by a contract audit: `export links` on a database file that did not exist refused
    (exit 2), and left an empty file behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EXCHANGE_DATABASE_URL", raising=False)
    database = tmp_path / "never.db"
    code, out, err = run_cli(capsys, monkeypatch, "export", "links", "--database", f"sqlite:///{database}")
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"exchange: database sqlite:///{database}: no such file: run `exchange db upgrade` first"]
    assert not database.exists()


@pytest.mark.parametrize("argv", DATABASE_COMMANDS, ids=" ".join)
def test_a_file_at_the_default_path_is_checked_even_with_the_database_on_the_line(
        tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EXCHANGE_DATABASE_URL", raising=False)
    (tmp_path / "config").mkdir()
    write_config(tmp_path / "config", server_extra='colour = "blue"')
    database = tmp_path / "x.db"
    code, out, err = run_cli(capsys, monkeypatch, *argv, "--database", f"sqlite:///{database}")
    assert (code, out) == (2, "")
    assert err.splitlines() == ["exchange: config/exchange.toml: server.colour: unknown key"]
    assert not database.exists()


def test_a_good_file_at_the_default_path_gives_way_to_the_database_on_the_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EXCHANGE_DATABASE_URL", raising=False)
    (tmp_path / "config").mkdir()
    write_config(tmp_path / "config", database=f"sqlite:///{tmp_path / 'from-file.db'}")
    url = f"sqlite:///{tmp_path / 'on-the-line.db'}"
    code, out, err = run_cli(capsys, monkeypatch, "db", "upgrade", "--database", url)
    assert (code, err) == (0, "") and "on-the-line.db" in out
    assert (tmp_path / "on-the-line.db").exists() and not (tmp_path / "from-file.db").exists()


# Bad usage as argparse sees it -> the one line: what is wrong, and where the help is.
USAGE_ERRORS = {
    ("frobnicate",): "exchange: argument COMMAND: invalid choice: 'frobnicate' (choose from 'serve', 'send', 'db',"
                     " 'replay', 'token', 'user', 'reviews', 'reconcile', 'export') (see exchange --help)",
    (): "exchange: the following arguments are required: COMMAND (see exchange --help)",
    ("send",): "exchange: the following arguments are required: endpoint, FILE (see exchange send --help)",
    ("db", "downgrade"): "exchange: argument COMMAND: invalid choice: 'downgrade' (choose from 'upgrade')"
                         " (see exchange db --help)",
    ("reviews",): "exchange: the following arguments are required: COMMAND (see exchange reviews --help)",
    ("reviews", "decide", "1", "maybe", "--actor", "x"):
        "exchange: argument decision: invalid choice: 'maybe' (choose from 'link', 'not-a-match')"
        " (see exchange reviews decide --help)",
    ("reviews", "decide", "1", "link"): "exchange: the following arguments are required: --actor"
                                        " (see exchange reviews decide --help)",
    ("reviews", "list", "--state", "bogus"):
        "exchange: argument --state: invalid choice: 'bogus' (choose from 'open', 'resolved', 'superseded', 'all')"
        " (see exchange reviews list --help)",
    ("reviews", "undo", "x", "--actor", "a"): "exchange: argument decision: invalid int value: 'x'"
                                              " (see exchange reviews undo --help)",
    ("replay", "--batch", "x"): "exchange: argument --batch: invalid int value: 'x' (see exchange replay --help)",
    ("export", "nothing"): "exchange: argument COMMAND: invalid choice: 'nothing' (choose from 'links')"
                           " (see exchange export --help)",
    ("token", "create", "ops"): "exchange: the following arguments are required: --role"
                                " (see exchange token create --help)",
    ("user", "add"): "exchange: the following arguments are required: name, --role (see exchange user add --help)",
    ("serve", "--colour", "blue"): "exchange: unrecognized arguments: --colour blue (see exchange serve --help)",
    ("user", "list", "extra"): "exchange: unrecognized arguments: extra (see exchange user list --help)",
    ("reconcile", "--config"): "exchange: argument --config: expected one argument (see exchange reconcile --help)",
    ("send", "h:1", "a\nb", "--timeout", "x\ny"):
        "exchange: argument --timeout: invalid float value: 'x\\ny' (see exchange send --help)",
}


@pytest.mark.parametrize("argv", list(USAGE_ERRORS), ids=lambda argv: " ".join(argv) or "(nothing)")
def test_bad_usage_is_one_line_naming_the_help_and_exit_2(tmp_path, capsys, monkeypatch, argv):
    """Found by a black-box audit: argparse printed its usage block before the reason (the contract
    says one line); the command does nothing (no database, no configuration read)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, monkeypatch, *argv)
    assert (code, out) == (2, "")
    assert err.splitlines() == [USAGE_ERRORS[argv]]
    assert list(tmp_path.iterdir()) == []


def test_a_value_with_a_line_break_stays_on_one_line(capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "reviews", "show", "1\n2")
    assert code == 2 and err.splitlines() == [
        "exchange: argument id: invalid int value: '1\\n2' (see exchange reviews show --help)"]
    code, out, err = run_cli(capsys, monkeypatch, "frobnicate\nusage: x")
    assert code == 2 and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [(), ("reviews",), ("reviews", "decide"), ("db", "upgrade")], ids=" ".join)
def test_help_still_prints_the_usage_and_exits_0(capsys, argv):
    from exchange import cli

    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--help"])
    out, err = capsys.readouterr()
    assert stop.value.code == 0 and err == ""
    assert out.startswith(f"usage: {' '.join(('exchange', *argv))} ")


def test_the_installed_command_answers_bad_usage_in_one_line(tmp_path):
    for argv in (("frobnicate",), ("send",), ("reviews", "decide", "1", "maybe", "--actor", "x")):
        done = exchange(*argv, cwd=tmp_path)
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.splitlines() == [USAGE_ERRORS[argv]]
    done = exchange("send", "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: exchange send ") and done.stderr == ""


def test_db_upgrade_creates_the_schema(database_url):
    done = exchange("db", "upgrade", "--database", database_url)
    assert done.returncode == 0, done.stderr
    engine = create_engine(database_url)
    try:
        assert {"message", "message_event", "alembic_version"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert f"upgraded from empty to {head_revision()}" in done.stdout
    again = exchange("db", "upgrade", "--database", database_url)  # idempotent, and says so
    assert again.returncode == 0 and f"at the newest revision ({head_revision()}) already" in again.stdout


def test_db_upgrade_and_serve_refuse_a_database_of_another_application_or_a_newer_exchange(database_url, tmp_path):
    """Found by the session-9 upgrade audit: `db upgrade` installed the exchange's tables into
    another application's database and said "upgraded from empty"; a database a newer release
    wrote was refused as "cannot open the database (CommandError)"."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE inventory (id integer primary key, item text)"))
        done = exchange("db", "upgrade", "--database", database_url)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.strip().endswith("it holds 1 tables of something else (inventory) and no exchange "
                                            "revision: use an empty database")
        assert set(inspect(engine).get_table_names()) == {"inventory"}
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE inventory"))
        assert exchange("db", "upgrade", "--database", database_url).returncode == 0
        with engine.begin() as conn:  # as a later release would leave it
            conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
        for argv in (("db", "upgrade", "--database", database_url),
                     ("serve", "--config", str(write_config(tmp_path)), "--database", database_url),
                     ("export", "links", "--config", str(write_config(tmp_path)), "--database", database_url)):
            done = exchange(*argv)
            assert done.returncode == 2, argv
            assert f"it is at revision 0099, newer than this exchange (newest {head_revision()})" in done.stderr
            assert len(done.stderr.splitlines()) == 1
    finally:
        engine.dispose()


def test_serve_cannot_listen_on_a_busy_port_exits_1(tmp_path):
    first = ExchangeProcess(write_config(tmp_path), f"sqlite:///{tmp_path / 'a.db'}").start()
    try:
        host, port = first.address
        busy = tmp_path / "busy"
        busy.mkdir()
        config = write_config(busy, mllp=f'"tcp:{port}:interface={host}"')
        done = exchange("serve", "--config", str(config), "--database", f"sqlite:///{busy / 'b.db'}")
        assert done.returncode == 1
        assert "cannot start" in done.stderr
        # nothing half-started: the HTTP port is busy, so no MLLP listener was announced, no delivery worker ran
        (busy / "http").mkdir()
        config = write_config(busy / "http", server_extra="").read_text().replace(
            'http = "tcp:0:interface=127.0.0.1"', f'http = "tcp:{first.http[1]}:interface={first.http[0]}"')
        (busy / "http" / "exchange.toml").write_text(config)
        done = exchange("serve", "--config", str(busy / "http" / "exchange.toml"),
                        "--database", f"sqlite:///{busy / 'c.db'}")
        assert done.returncode == 1 and "cannot start" in done.stderr
        assert "MLLP listening" not in done.stdout and "serving it on this node" not in done.stdout + done.stderr
    finally:
        first.stop()


def test_a_second_serve_on_one_sqlite_database_exits_2_and_the_first_serves_on(tmp_path):
    """Found by a black-box audit: two nodes on one SQLite file both delivered every copy,
    old events after new ones. The lock goes with the process, a crash included."""
    db = f"sqlite:///{tmp_path / 'one.db'}"
    first = ExchangeProcess(write_config(tmp_path), db).start()
    try:
        other = tmp_path / "other"
        other.mkdir()
        done = exchange("serve", "--config", str(write_config(other)), "--database", db)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
        assert f"another exchange serve (pid {first.proc.pid})" in done.stderr and "one.db.serve.lock" in done.stderr
        assert "MLLP listening" not in done.stdout
        with MLLPConnection(first.address) as conn:
            assert msa(conn.request(adt("LOCK-1")))[0] == "AA"
    finally:
        first.proc.kill()
        first.proc.wait()
    second = ExchangeProcess(write_config(tmp_path / "other"), db).start()  # after a kill -9: free again
    second.stop()


def test_serve_refuses_an_interface_that_is_not_an_address_of_this_kind(tmp_path):
    config = write_config(tmp_path, mllp='"tcp:0:interface=999.1.1.1"')
    done = exchange("serve", "--config", str(config))
    assert done.returncode == 2
    assert "server.mllp" in done.stderr and "interface must be an IPv4 address" in done.stderr


def test_db_upgrade_on_a_full_disk_says_so_and_exits_1(tmp_path, capsys, monkeypatch):
    """Found by a failure audit: "cannot open the database ... (OperationalError)", exit 2, sent the
    operator after a wrong path or permission; the upgrade had rolled back."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from exchange.store import db

    full = sqlite3.connect(":memory:")
    full.execute("PRAGMA max_page_count = 1")
    with pytest.raises(sqlite3.OperationalError) as error:
        full.executescript("create table a (x); create table b (y); insert into b values (randomblob(9000))")

    def upgrade(engine):
        raise OperationalError("ALTER TABLE ...", {}, error.value)

    monkeypatch.setattr(db, "upgrade", upgrade)
    url = f"sqlite:///{tmp_path / 'full.db'}"
    code, out, err = run_cli(capsys, monkeypatch, "db", "upgrade", "--database", url,
                             "--config", str(write_config(tmp_path)))
    assert (code, err) == (1, f"exchange: database {url}: the upgrade failed and was rolled back: the disk is full\n")

    def io_error(engine):  # a file-size limit (ulimit -f), a failing disk: SQLite's own words
        raise OperationalError("ALTER TABLE ...", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(db, "upgrade", io_error)
    code, out, err = run_cli(capsys, monkeypatch, "db", "upgrade", "--database", url,
                             "--config", str(write_config(tmp_path)))
    assert (code, err) == (1, f"exchange: database {url}: the upgrade failed and was rolled back: disk I/O error\n")

    # a disk full already when the database is first created: said so, and no empty file left behind
    fresh = tmp_path / "fresh.db"

    def full_at_open(engine):
        open(fresh, "wb").close()  # what SQLite leaves: an empty file
        raise OperationalError("PRAGMA ...", {}, error.value)

    monkeypatch.setattr(db, "current_revision", full_at_open)
    code, out, err = run_cli(capsys, monkeypatch, "db", "upgrade", "--database", f"sqlite:///{fresh}",
                             "--config", str(write_config(tmp_path)))
    assert (code, err) == (1, f"exchange: database sqlite:///{fresh}: the disk is full: it cannot be opened or"
                              " created\n")
    assert not fresh.exists()

    # found by a final audit: with little room left, any SQLite error read as a full disk
    monkeypatch.setattr(db, "disk_free_bytes", lambda url: 1000)
    assert db.disk_full(OperationalError("x", {}, sqlite3.OperationalError("disk I/O error")), url)
    assert not db.disk_full(OperationalError("x", {}, sqlite3.DatabaseError("file is not a database")), url)
    assert not db.disk_full(OperationalError("x", {}, sqlite3.OperationalError("attempt to write a readonly"
                                                                               " database")), url)


def test_serve_under_a_low_open_file_limit_says_so(tmp_path):
    """Found by a failure audit: under `ulimit -n 128` serve said "cannot start: [Errno 9] Bad file
    descriptor" (Twisted's posix_spawn of the writer) and exited 1."""
    import resource

    def limit(n):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    config = write_config(tmp_path)
    done = exchange("serve", "--config", str(config), preexec_fn=limit(128))
    assert done.returncode == 2
    assert done.stderr.strip() == "exchange: the open-file limit is 128 (ulimit -n): serve needs at least 256"


def test_a_sqlite_file_that_cannot_be_opened_says_sqlites_reason(tmp_path):
    (tmp_path / "a-directory.db").mkdir()
    url = f"sqlite:///{tmp_path / 'a-directory.db'}"  # a directory where the file should be
    for command in (("db", "upgrade"), ("replay",), ("user", "list")):  # replay printed a traceback
        done = exchange(*command, "--database", url, "--config", str(write_config(tmp_path)))
        assert done.returncode == 2, command
        assert done.stderr == (f"exchange: cannot open the database {url} (OperationalError: unable to open database"
                               " file)\n"), command
    done = exchange("replay", "--database", f"sqlite:///{tmp_path / 'none.db'}", "--config",
                    str(write_config(tmp_path)))
    assert done.returncode == 2 and "no such file" in done.stderr and not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("command", [("serve",), ("db", "upgrade")])
def test_an_unreachable_database_is_one_line_and_exit_2(tmp_path, command):
    """Found by a black-box audit: 118 lines of traceback (the URL's password could be among them)."""
    config = write_config(tmp_path)
    done = exchange(*command, "--config", str(config), "--database",
                    "postgresql+psycopg://postgres:secret@127.0.0.1:1/nowhere")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "secret" not in done.stderr
    assert "cannot open the database postgresql+psycopg://postgres:***@127.0.0.1:1/nowhere" in done.stderr
    assert "MLLP listening" not in done.stdout


@pytest.fixture
def server(tmp_path):
    config = write_config(tmp_path, server_extra="max_frame_bytes = 4096\nidle_timeout = 1")
    proc = ExchangeProcess(config, f"sqlite:///{tmp_path / 'cli.db'}").start()
    proc.db = f"sqlite:///{tmp_path / 'cli.db'}"
    yield proc
    proc.stop()


def test_send_prints_each_ack_and_exits_1_when_one_is_not_accepted(server, tmp_path):
    good, bad = tmp_path / "good.hl7", tmp_path / "bad.hl7"
    good.write_bytes(adt("SEND-1").replace(b"\r", b"\n") + adt("SEND-2"))  # LF and CR segment ends
    bad.write_bytes(adt("SEND-3", facility="NOBODY"))
    host, port = server.address
    ok = exchange("send", f"{host}:{port}", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "SEND-1\tAA" in ok.stdout and "SEND-2\tAA" in ok.stdout
    failed = exchange("send", f"{host}:{port}", str(good), str(bad))
    assert failed.returncode == 1
    assert "SEND-3\tAR\t" in failed.stdout
    assert exchange("send", f"{host}:{port}", str(tmp_path / "missing.hl7")).returncode == 2


def test_oversize_frame_gets_a_nak_with_its_control_id_then_the_connection_closes(server):
    big = adt("BIG-1") + b"OBX|1|TX|||" + b"x" * 10_000 + b"\r"
    with MLLPConnection(server.address) as conn:
        reply = conn.request(big)
        assert msa(reply)[:2] == ["AR", "BIG-1"]
        assert "4096" in msa(reply)[2]
        with pytest.raises((ConnectionError, OSError)):
            conn.request(adt("BIG-2"))
    with MLLPConnection(server.address) as conn:  # the server itself carries on
        answer = msa(conn.request(adt("BIG-3")))
        assert answer[0] == "AA", answer
    engine = create_engine(server.db)
    with engine.connect() as c:
        state, size, reason = c.execute(text("select state, size, reason from message where control_id = 'BIG-1'")).one()
    engine.dispose()
    assert state == "rejected" and size <= 65536 and "truncated" in reason


def test_idle_connection_is_closed(server):
    with MLLPConnection(server.address) as conn:
        assert msa(conn.request(adt("IDLE-1")))[0] == "AA"
        started = time.monotonic()
        conn.sock.settimeout(10)
        assert conn.sock.recv(1) == b""  # closed by the server
        assert 0.5 < time.monotonic() - started < 8


def test_repeated_stop_signals_stop_it_once_and_cleanly(tmp_path):
    import signal

    proc = ExchangeProcess(write_config(tmp_path), f"sqlite:///{tmp_path / 'sig.db'}").start()
    try:
        with MLLPConnection(proc.address) as conn:
            assert msa(conn.request(adt("SIG-1")))[0] == "AA"
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):  # make, a terminal, a supervisor
            proc.proc.send_signal(sig)
        assert proc.terminate() == 0
    finally:
        proc.stop()
    output = "".join(proc.output)
    assert "Traceback" not in output
    assert "exchange stopped cleanly" in output


def test_sighup_is_answered_with_a_line_and_the_exchange_keeps_serving(tmp_path):
    """Found by a black-box audit: SIGHUP killed it at once, without a clean stop."""
    import signal

    proc = ExchangeProcess(write_config(tmp_path), f"sqlite:///{tmp_path / 'hup.db'}").start()
    try:
        proc.proc.send_signal(signal.SIGHUP)
        with MLLPConnection(proc.address) as conn:
            assert msa(conn.request(adt("HUP-1")))[0] == "AA"
        assert proc.terminate() == 0
    finally:
        proc.stop()
    output = "".join(proc.output)
    assert "SIGHUP ignored" in output and "exchange stopped cleanly" in output


def _catches_sigterm(pid: int) -> bool:
    """Has the process installed a SIGTERM handler (its SigCgt mask)?"""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask & (1 << (15 - 1)))


@pytest.mark.parametrize("after", [0.0, 0.2, 0.5, 1.0])
def test_ctrl_c_while_it_starts_stops_it_cleanly(tmp_path, after):
    """A Ctrl-C (SIGINT to the whole process group, the writer included) while
    the exchange imports, migrates or starts: it stops, without a traceback,
    instead of running on with the signal lost."""
    import os
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "exchange.cli", "serve", "--config", str(write_config(tmp_path)),
         "--database", f"sqlite:///{tmp_path / 'early.db'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _catches_sigterm(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(after)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text_ = output.decode()
    assert proc.returncode == 0, text_
    assert "Traceback" not in text_ and "KeyboardInterrupt" not in text_, text_


def test_send_passes_an_ack_on_without_waiting_and_the_exchange_records_it_unanswered(server, tmp_path):
    ack = (b"MSH|^~\\&|LAB|GENHOSP|EXCHANGE|EXCHANGE|20260101||ACK^A01^ACK|ACK-9|P|2.5\r"
           b"MSA|AA|SOME-ID\r")
    path = tmp_path / "mixed.hl7"
    path.write_bytes(adt("MIX-1") + ack + adt("MIX-2"))
    host, port = server.address
    started = time.monotonic()
    result = exchange("send", f"{host}:{port}", str(path))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20  # not a 30 s wait for a reply that never comes
    assert result.stdout.splitlines() == [
        "MIX-1\tAA\t", "ACK-9\t\tan ACK: sent, no reply expected", "MIX-2\tAA\t",
        "sent 3, accepted 2, errors 0, rejected 0, ACKs sent without reply 1"]
    engine = create_engine(server.db)
    with engine.connect() as c:
        state, ack_sent = c.execute(text("select state, ack from message where control_id = 'ACK-9'")).one()
    engine.dispose()
    assert state == "ignored" and ack_sent is None


def test_output_cut_short_by_its_reader_ends_without_a_traceback(tmp_path):
    """Found by a contract audit: `exchange reconcile | head -2` printed a BrokenPipeError traceback."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert exchange("db", "upgrade", "--database", url).returncode == 0
    config = write_config(tmp_path, database=url)
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "exchange.cli", "reconcile", "--config", str(config)],
                              stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(writer)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
