"""In-memory API harness: the real routes and store functions over a real
database (SQLite or PostgreSQL), with the thread pool replaced by a call on
the test's own thread, so StubTreq answers synchronously (no reactor run)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, select

from tests.support import delivery_config, new_message
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed

from exchange.auth import TokenCache, create_token, revoke_token
from exchange.store.db import write_transaction
from exchange.store.messages import NewMessage, insert_messages
from exchange.store.schema import audit_event_table
from exchange.web.api import API
from exchange.web.server import build_root

T0 = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=timezone.utc)


class InlineDatabase:
    """exchange.web.db.Database's interface, run on the calling thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls = 0

    def _run(self, fn, args, conn_factory) -> Deferred:
        self.calls += 1
        try:
            with conn_factory() as conn:
                return succeed(fn(conn, *args))
        except Exception:
            return fail()

    def read(self, fn, *args) -> Deferred:
        return self._run(fn, args, self.engine.begin)

    def write(self, fn, *args) -> Deferred:
        return self._run(fn, args, lambda: write_transaction(self.engine))


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Harness:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.db = InlineDatabase(engine)
        self.clock = FakeClock()
        self.tokens = TokenCache(self.clock, ttl=30, max_entries=10)
        self.now = T0 + timedelta(hours=1)
        self.api = API(self.db, self.tokens, lambda: self.now, config=delivery_config())
        self.stub = StubTreq(build_root(lambda: {}, self.api.resource()))

    def token(self, name: str, role: str) -> str:
        with write_transaction(self.engine) as conn:
            return create_token(conn, name, role, T0)

    def revoke(self, name: str) -> bool:
        with write_transaction(self.engine) as conn:
            return revoke_token(conn, name, T0)

    def store(self, *messages: NewMessage) -> list[int]:
        with write_transaction(self.engine) as conn:
            return insert_messages(conn, messages)

    def get(self, path: str, token: str | None = None, headers: dict | None = None) -> tuple[int, Any, Any]:
        """(status, JSON body or None, response headers) for GET ``path``."""
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = self._result(self.stub.get("http://exchange.test" + path, headers=headers))
        body = self._result(response.content())
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = body
        return response.code, data, response.headers

    def _result(self, d: Deferred):
        return settled(self.stub, d)

    def audit(self) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(audit_event_table).order_by(audit_event_table.c.id)).mappings()
            return [dict(r) for r in rows]


def message(control_id: str = "MSG-1", **overrides) -> NewMessage:
    overrides.setdefault("received_at", T0)
    return new_message(control_id, **overrides)


def settled(stub, d: Deferred):
    """The result of an in-memory request's Deferred, once ``stub`` has delivered everything."""
    stub.flush()
    results: list = []
    d.addBoth(results.append)
    assert results, "the request did not finish"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def apply_hl7(harness, hl7: str, control_id: str) -> None:
    """Store a message row ``control_id`` and map, apply and save ``hl7`` with it as the
    reference, the way the intake does (the pure mapping, the record store)."""
    from exchange.hl7.charset import decode_message
    from exchange.hl7.header import read_header
    from exchange.mapping.events import Changes, FacilityContext, map_message, needs
    from exchange.mapping.message import Message
    from exchange.store import records
    from exchange.store.db import write_transaction
    from sqlalchemy import text as sql

    harness.store(message(control_id))
    raw = hl7.encode()
    header = read_header(raw)
    text, codec = decode_message(raw, header)
    msg = Message(text, header.delimiters, codec)
    ctx = FacilityContext("GENHOSP", "GENHOSP")
    with write_transaction(harness.engine) as conn:
        state = records.load(conn, [needs(msg, ctx)])
        changes = map_message(msg, header, ctx, state)
        assert isinstance(changes, Changes), changes
        message_id = conn.execute(sql("SELECT id FROM message WHERE control_id = :control_id"),
                                  {"control_id": control_id}).scalar_one()
        state.apply(changes, message_id)
        records.save(conn, state)
