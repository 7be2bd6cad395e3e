"""The API end to end: `exchange token create` as a user runs it, then the
token against a real `exchange serve` (real sockets, the real thread pool)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from sqlalchemy import select

from exchange.auth import TOKEN_CACHE_TTL
from exchange.store.db import make_engine
from exchange.store.schema import api_token_table, audit_event_table
from exchange.web.db import Database
from tests.support import ExchangeProcess, MLLPConnection, adt, msa, write_config


def exchange(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exchange.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def get(http: tuple[str, int], path: str, token: str | None) -> tuple[int, dict]:
    host, port = http
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_token_create_bad_role_exits_2_with_one_line(tmp_path):
    done = exchange("token", "create", "ann", "--role", "nurse", "--database", f"sqlite:///{tmp_path / 't.db'}")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nurse" in lines[0]


def test_token_create_then_read_a_message_from_a_running_exchange(database_url, tmp_path):
    admin = exchange("token", "create", "ops-console", "--role", "admin", "--database", database_url)
    assert admin.returncode == 0, admin.stderr
    token = admin.stdout.strip()
    assert token.startswith("exk_") and len(admin.stdout.splitlines()) == 1
    tech = exchange("token", "create", "tess", "--role", "technician", "--database", database_url).stdout.strip()
    assert exchange("token", "create", "tess", "--role", "admin", "--database", database_url).returncode == 2

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(select(api_token_table.c.token_hash)).scalars().all()
        assert token not in stored and tech not in stored  # only hashes
    finally:
        engine.dispose()

    server = ExchangeProcess(write_config(tmp_path), database_url).start()
    try:
        with MLLPConnection(server.address) as conn:
            assert msa(conn.request(adt("API-E2E-1")))[:2] == ["AA", "API-E2E-1"]
        code, body = get(server.http, "/api/messages/GENHOSP/API-E2E-1", token)
        assert code == 200, body
        assert (body["facility"], body["control_id"], body["type"], body["state"], body["ack_code"]) == (
            "GENHOSP", "API-E2E-1", "ADT^A01", "accepted", "AA",
        )
        assert body["received_at"].endswith("Z") and body["deliveries"] == []
        assert [h["state"] for h in body["history"]] == ["accepted"]
        assert get(server.http, "/api/messages/GENHOSP/API-E2E-1", None)[0] == 401
        assert get(server.http, "/api/messages/GENHOSP/API-E2E-1", tech)[0] == 403
        assert get(server.http, "/api/messages/GENHOSP/NOPE", token)[0] == 404
        assert get(server.http, "/healthz", None)[0] == 200

        assert exchange("token", "revoke", "ops-console", "--database", database_url).returncode == 0
        # the server looked the token up a moment ago: it stops taking it within TOKEN_CACHE_TTL
        deadline = time.monotonic() + TOKEN_CACHE_TTL + 2
        while (code := get(server.http, "/api/messages/GENHOSP/API-E2E-1", token)[0]) == 200:
            assert time.monotonic() < deadline, "a revoked token still works"
            time.sleep(0.25)
        assert code == 401
    finally:
        assert server.terminate() == 0
    output = "".join(server.output)
    assert "API-E2E-1" not in output and "NOPE" not in output  # identifiers go to the audit table only

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(audit_event_table).order_by(audit_event_table.c.id)).mappings().all()
    finally:
        engine.dispose()
    seen = [(r["actor"], r["outcome"], r["key"]) for r in rows]
    assert seen[:3] == [
        ("ops-console", "ok", "API-E2E-1"),
        ("tess", "forbidden", "API-E2E-1"),
        ("ops-console", "not-found", "NOPE"),
    ]
    # reads while the revoked token was still cached, then the refusal, attributed to whom it was issued
    assert set(seen[3:-1]) <= {("ops-console", "ok", "API-E2E-1")}
    assert seen[-1] == ("ops-console", "unauthorized", "GET /api/messages/GENHOSP/API-E2E-1")
    assert all(r["remote"] == "127.0.0.1" and r["at"].tzinfo is not None for r in rows)


class ThreadReactor:
    """Just enough reactor for deferToThreadPool: results are handed back
    directly (the test waits on an Event instead of running a reactor)."""

    def callFromThread(self, fn, *args, **kwargs):
        fn(*args, **kwargs)


def test_database_runs_calls_off_the_calling_thread(engine):
    db = Database(ThreadReactor(), str(engine.url.render_as_string(hide_password=False)), max_threads=2)
    db.start()
    try:
        done = threading.Event()
        results: list = []

        def work(conn):
            return threading.get_ident(), conn.exec_driver_sql("SELECT 1").scalar()

        d = db.read(work)
        d.addBoth(lambda r: (results.append(r), done.set()))
        assert done.wait(30)
        [(ident, one)] = results
        assert ident != threading.get_ident() and one == 1

        done.clear()
        d = db.write(lambda conn: 1 / 0)
        d.addErrback(lambda f: (results.append(f.type), done.set()))
        assert done.wait(30) and results[-1] is ZeroDivisionError
    finally:
        db.stop()
    assert db.engine is None
