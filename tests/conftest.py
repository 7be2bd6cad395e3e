"""Fixtures shared by the whole suite.

Database tests take ``database_url`` (or ``engine``) and run twice: on a SQLite
file of their own and on a PostgreSQL database of their own, created for the
test under a random name and dropped afterwards, so concurrent runs never
collide. The PostgreSQL server is ``EXCHANGE_TEST_POSTGRES`` (an URL to an
existing database on it; default the local ``test`` database). When it is
unreachable the PostgreSQL variants are skipped, unless
``EXCHANGE_REQUIRE_POSTGRES=1`` (CI), which makes them fail.
Deselect them with ``-m "not postgresql"``.
"""
from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from exchange.acceptance import accept
from exchange.app import acceptance_policy
from exchange.config import facility_contexts, load_config
from exchange.hl7.header import read_header
from exchange.pipeline import Received
from exchange.store.db import make_engine, upgrade
from exchange.writer import make_batch_runner
from tests.support import ExchangeProcess, write_config

BATCH_NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)  # the clock of ``batch``

DEFAULT_TEST_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# Property tests judge correctness, not speed: no per-example deadline, so a
# busy 2-core CI machine cannot fail them on a slow example.
hypothesis_settings.register_profile("exchange", deadline=None)
hypothesis_settings.load_profile("exchange")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "postgresql: runs against the local PostgreSQL server (deselect with -m 'not postgresql')",
    )


def _postgres_admin_engine() -> Engine:
    url = make_url(os.environ.get("EXCHANGE_TEST_POSTGRES", DEFAULT_TEST_POSTGRES))
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args={"connect_timeout": 5}
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A URL to an empty database of this test's own, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'exchange.db'}"
        return

    admin = _postgres_admin_engine()
    name = f"exchange_t_{uuid.uuid4().hex}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        admin.dispose()
        reason = (
            f"PostgreSQL unavailable at {admin.url.render_as_string()}: "
            f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
        )
        if os.environ.get("EXCHANGE_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason + " (EXCHANGE_REQUIRE_POSTGRES=1)", pytrace=False)
        pytest.skip(reason)
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on ``database_url``, migrated to the newest revision."""
    eng = make_engine(database_url)
    try:
        upgrade(eng)
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def batch(tmp_path, engine):
    """The writer's batch runner on the test configuration (tests/support.write_config), on
    ``engine``: ``batch(raw, ...)`` runs the messages as one batch and returns their answers."""
    config = load_config(write_config(tmp_path), database=engine.url.render_as_string(hide_password=False))
    ids = itertools.count(1)
    runner = make_batch_runner(engine, facilities=facility_contexts(config), routing=config,
                               new_control_id=lambda: f"W{next(ids)}", now=lambda: BATCH_NOW)
    policy = acceptance_policy(config)

    def item(raw: bytes) -> Received:
        header = read_header(raw)
        return Received(raw, header, accept(header, policy), BATCH_NOW, "127.0.0.1:5000")

    return lambda *raws: runner([item(raw) for raw in raws])


@pytest.fixture
def exchange(tmp_path, database_url):
    """`exchange serve` as a process on the test configuration and ``database_url`` (the e2e tests)."""
    proc = ExchangeProcess(write_config(tmp_path), database_url).start()
    yield proc
    proc.stop()
