"""`exchange user add|disable`: the password from stdin (or asked twice on a terminal), exit
codes and one-line reasons, and what ends up in the database (only a salted scrypt hash)."""
from __future__ import annotations

import io
import sys

import pytest
from sqlalchemy import select

from exchange import cli
from exchange.accounts import verify_password
from exchange.store.db import make_engine
from exchange.store.schema import workbench_user_table

PASSWORD = "correct horse battery"


def run(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def users(url: str) -> dict[str, dict]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {r["name"]: dict(r) for r in conn.execute(select(workbench_user_table)).mappings()}
    finally:
        engine.dispose()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_add_reset_and_disable(database_url, capsys, monkeypatch):
    db = ("--database", database_url)
    code, out, err = run(capsys, monkeypatch, "user", "add", "ann", "--role", "admin", *db, stdin=PASSWORD + "\n")
    assert (code, err) == (0, "") and "'ann' created, role admin" in out
    ann = users(database_url)["ann"]
    assert ann["role"] == "admin" and ann["password_hash"].startswith("scrypt$16384$8$1$")
    assert PASSWORD not in ann["password_hash"] and verify_password(PASSWORD, ann["password_hash"])
    assert ann["disabled_at"] is None

    code, out, err = run(capsys, monkeypatch, "user", "add", "ann", "--role", "technician", *db, stdin=PASSWORD)
    assert code == 2 and out == "" and "exists already" in one_line(err) and "--reset" in err

    code, out, err = run(capsys, monkeypatch, "user", "add", "ann", "--role", "technician", "--reset", *db,
                         stdin="another long password\r\n")
    assert code == 0 and "reset" in out
    ann = users(database_url)["ann"]
    assert ann["role"] == "technician" and verify_password("another long password", ann["password_hash"])

    code, out, err = run(capsys, monkeypatch, "user", "disable", "ann", *db)
    assert code == 0 and "disabled" in out and users(database_url)["ann"]["disabled_at"] is not None
    code, out, err = run(capsys, monkeypatch, "user", "disable", "ann", *db)
    assert code == 0 and "already" in out
    code, out, err = run(capsys, monkeypatch, "user", "disable", "nobody", *db)
    assert code == 1 and "no workbench user named 'nobody'" in one_line(err)

    code, out, err = run(capsys, monkeypatch, "user", "add", "ann", "--role", "admin", "--reset", *db,
                         stdin=PASSWORD + "\n")
    assert code == 0 and users(database_url)["ann"]["disabled_at"] is None  # a reset enables again


@pytest.mark.parametrize("stdin, reason", [
    ("", "the password is empty"),
    ("\n", "the password is empty"),
    ("short\n", "at least 12 characters (got 5)"),
    ("x" * 1025 + "\n", "at most 1024 characters"),
])
def test_bad_passwords_exit_2_with_one_line_and_create_nothing(tmp_path, capsys, monkeypatch, stdin, reason):
    url = f"sqlite:///{tmp_path / 'u.db'}"
    code, out, err = run(capsys, monkeypatch, "user", "add", "ann", "--role", "admin", "--database", url, stdin=stdin)
    assert code == 2 and out == "" and reason in one_line(err)
    assert users(url) == {}


def test_only_the_first_line_is_the_password(tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path / 'u.db'}"
    code, *_ = run(capsys, monkeypatch, "user", "add", "ann", "--role", "admin", "--database", url,
                   stdin=PASSWORD + "\nsecond line\n")
    assert code == 0 and verify_password(PASSWORD, users(url)["ann"]["password_hash"])


@pytest.mark.parametrize("args, reason", [
    (("user", "add", "ann", "--role", "nurse"), "unknown role 'nurse'"),
    (("user", "add", "ann smith", "--role", "admin"), "user name"),
    (("user", "disable", "x/y"), "user name"),
])
def test_bad_usage_exits_2(tmp_path, capsys, monkeypatch, args, reason):
    code, out, err = run(capsys, monkeypatch, *args, "--database", f"sqlite:///{tmp_path / 'u.db'}",
                         stdin=PASSWORD + "\n")
    assert code == 2 and reason in one_line(err)


def test_a_terminal_is_asked_twice_without_echo(tmp_path, capsys, monkeypatch):
    import getpass

    url = f"sqlite:///{tmp_path / 'u.db'}"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter([PASSWORD, PASSWORD + "!", PASSWORD, PASSWORD])
    prompts: list[str] = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": prompts.append(prompt) or next(answers))
    monkeypatch.setattr(sys, "stdin", Terminal())
    assert cli.main(["user", "add", "ann", "--role", "admin", "--database", url]) == 2
    assert "the two passwords differ" in one_line(capsys.readouterr().err)
    assert cli.main(["user", "add", "ann", "--role", "admin", "--database", url]) == 0
    assert prompts == ["Password for ann: ", "Again: "] * 2
    assert verify_password(PASSWORD, users(url)["ann"]["password_hash"])


def test_list_shows_each_user_state_and_open_sessions_never_a_hash(database_url, capsys, monkeypatch):
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import insert, update

    from exchange.store.schema import workbench_session_table

    db = ("--database", database_url)
    for name, role in (("ann", "admin"), ("bob", "technician"), ("cy", "technician")):
        assert run(capsys, monkeypatch, "user", "add", name, "--role", role, *db, stdin=PASSWORD)[0] == 0
    assert run(capsys, monkeypatch, "user", "disable", "bob", *db)[0] == 0
    now = datetime.now(timezone.utc)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            ids = {r.name: r.id for r in conn.execute(select(workbench_user_table))}
            conn.execute(update(workbench_user_table).where(workbench_user_table.c.name == "cy")
                         .values(locked_until=now + timedelta(minutes=15), failed_logins=5))
            for sid, expires in (("s1", now + timedelta(hours=1)), ("s2", now + timedelta(hours=2)),
                                 ("s3", now - timedelta(hours=1))):  # the last one is over
                conn.execute(insert(workbench_session_table).values(
                    id=sid, user_id=ids["ann"], created_at=now - timedelta(hours=3), expires_at=expires,
                    last_seen_at=now, csrf_token="x"))
    finally:
        engine.dispose()

    code, out, err = run(capsys, monkeypatch, "user", "list", *db)
    assert (code, err) == (0, "")
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert lines[0] == ["name", "role", "state", "created", "sessions"]
    assert [(n, r, s.split(" ")[0], sessions) for n, r, s, _, sessions in lines[1:]] == [
        ("ann", "admin", "active", "2"), ("bob", "technician", "disabled", "0"), ("cy", "technician", "locked", "0")]
    assert lines[3][2].startswith("locked until ")
    assert "scrypt" not in out


def test_list_on_an_unreachable_database_is_one_line_and_exit_2(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "user", "list", "--database",
                         "postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    assert code == 2 and out == "" and "cannot open the database" in one_line(err)
    assert "secret" not in err


def test_list_on_a_missing_sqlite_file_creates_none(capsys, monkeypatch, tmp_path):
    """Found by a verification audit: `user list` made an empty 4 KB database where none was."""
    url = f"sqlite:///{tmp_path / 'none.db'}"
    code, out, err = run(capsys, monkeypatch, "user", "list", "--database", url)
    assert code == 2 and "no such file" in one_line(err) and not (tmp_path / "none.db").exists()
