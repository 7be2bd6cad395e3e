"""The workbench in memory: the real routes, templates and store functions over a real
database (SQLite or PostgreSQL), the thread pool replaced by calls on the test's thread
(tests.web.support.InlineDatabase), StubTreq as the browser (cookies kept here), a
clock the test moves, and no pause after a wrong password."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import unescape
from typing import Any

from sqlalchemy import Engine
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed

from exchange.accounts import Policy, add_user, hash_password
from exchange.auth import TokenCache
from exchange.store.db import write_transaction
from exchange.web.api import API
from exchange.web.server import build_root
from exchange.web.workbench import Workbench
from tests.support import delivery_config
from tests.web.support import T0, FakeClock, Harness, InlineDatabase, settled

PASSWORD = "correct horse battery staple"
FAST_N = 2**4  # test users get a cheap scrypt hash (the production cost is checked in tests/test_accounts.py)


class InlineRunner(InlineDatabase):
    """InlineDatabase with ``run`` (no connection), as exchange.web.db.Database has."""

    def run(self, fn, *args) -> Deferred:
        try:
            return succeed(fn(*args))
        except Exception:
            return fail()


@dataclass
class Page:
    code: int
    headers: Any
    text: str

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    @property
    def location(self) -> str | None:
        return self.header("location")

    def csrf(self) -> str:
        m = re.search(r'name="csrf" value="([^"]+)"', self.text)
        assert m, "no csrf field on the page"
        return unescape(m[1])


@dataclass
class Browser:
    """A cookie-keeping client over StubTreq; it never follows redirects."""

    harness: "WorkbenchHarness"
    cookies: dict[str, str] = field(default_factory=dict)
    stub: StubTreq | None = None

    def __post_init__(self) -> None:
        self.stub = StubTreq(self.harness.root)

    def _headers(self, extra: dict | None = None) -> dict:
        headers = dict(extra or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return headers

    def _finish(self, d: Deferred) -> Page:
        response = self.harness.result(self.stub, d)
        body = self.harness.result(self.stub, response.content())
        for raw in response.headers.getRawHeaders("set-cookie") or ():
            name, _, rest = raw.partition("=")
            value = rest.split(";", 1)[0]
            if "max-age=0" in raw.lower():
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return Page(response.code, response.headers, body.decode("utf-8"))

    def get(self, path: str, headers: dict | None = None) -> Page:
        return self._finish(self.stub.get("http://exchange.test" + path, headers=self._headers(headers),
                                          allow_redirects=False))

    def post(self, path: str, data: dict | None = None) -> Page:
        return self._finish(self.stub.post("http://exchange.test" + path, data=data or {},
                                           headers=self._headers(), allow_redirects=False))

    def login(self, name: str, password: str = PASSWORD, next_: str | None = None) -> Page:
        form = self.get("/login" + (f"?next={next_}" if next_ else ""))
        data = {"csrf": form.csrf(), "name": name, "password": password}
        if next_ is not None:
            data["next"] = re.search(r'name="next" value="([^"]*)"', form.text)[1]
        return self.post("/login", data)


class WorkbenchHarness(Harness):
    """tests.web.support.Harness (the API, tokens, audit rows) plus the workbench on one root."""

    def __init__(self, engine: Engine, *, policy: Policy = Policy()) -> None:
        self.engine = engine
        self.db = InlineRunner(engine)
        self.clock = FakeClock()
        self.tokens = TokenCache(self.clock, ttl=30, max_entries=10)
        self.now = T0 + timedelta(hours=1)
        self.pauses: list[float] = []
        self.requeued: list[str] = []
        self.api = API(self.db, self.tokens, lambda: self.now, config=delivery_config())
        self.workbench = Workbench(self.db, lambda: self.now, policy=policy, pause=self._pause, config=delivery_config(),
                                   requeued=self.requeued.append)
        self.root = build_root(lambda: {"database": engine.dialect.name}, self.api.resource(),
                               self.workbench.resource())
        self.stub = StubTreq(self.root)

    def _pause(self, seconds: float) -> Deferred:
        self.pauses.append(seconds)
        return succeed(None)

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now

    def user(self, name: str, role: str, password: str = PASSWORD) -> None:
        with write_transaction(self.engine) as conn:
            add_user(conn, name, role, hash_password(password, n=FAST_N), T0)

    def browser(self) -> Browser:
        return Browser(self)

    def result(self, stub: StubTreq, d: Deferred):
        return settled(stub, d)
