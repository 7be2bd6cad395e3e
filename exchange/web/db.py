"""The HTTP API's database access, after buildbot's db pool: every call runs
in a small thread pool of its own (``deferToThreadPool``) with its own engine,
takes a ``Connection`` inside a transaction and returns plain values to the
reactor thread. Nothing here ever runs SQL on the reactor thread.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from exchange.store.db import API_SESSION, IDLE_IN_TRANSACTION_MS, make_engine, write_transaction

T = TypeVar("T")


class Database:
    """``read(fn, *args)`` / ``write(fn, *args)`` -> Deferred of ``fn(conn, *args)``;
    ``run(fn, *args)`` -> Deferred of ``fn(*args)``.

    ``read`` runs ``fn`` in an ordinary transaction; ``write`` in a write
    transaction (``BEGIN IMMEDIATE`` on SQLite, so reading and then writing an
    audit row never fails half-way on a lock upgrade). Both commit when ``fn``
    returns and roll back when it raises.
    """

    def __init__(self, reactor: Any, url: str, *, min_threads: int = 1, max_threads: int = 4) -> None:
        self.reactor = reactor
        self.url = url
        self.engine: Engine | None = None
        self.pool = ThreadPool(min_threads, max_threads, name="exchange-api-db")

    def start(self) -> None:
        # Creating an engine opens no connection: safe on the reactor thread.
        self.engine = make_engine(self.url, pool_size=self.pool.max, idle_in_transaction_ms=IDLE_IN_TRANSACTION_MS,
                                  application_name=API_SESSION)
        self.pool.start()

    def stop(self) -> None:
        """Wait for calls in flight (joins the threads), then close the connections."""
        if self.pool.started:
            self.pool.stop()
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

    def read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, self._read, fn, *args)

    def write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, self._write, fn, *args)

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """``fn(*args)`` in the pool, without a connection: CPU work that must not run on the
        reactor (the workbench's password checks)."""
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def _read(self, fn: Callable[..., T], *args: Any) -> T:
        assert self.engine is not None, "Database.start() first"
        # /* TRANSACTION: a read (e.g. a token look-up); nothing is written. */
        with self.engine.connect() as conn, conn.begin():
            return fn(conn, *args)

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        assert self.engine is not None, "Database.start() first"
        # /* TRANSACTION: whatever fn writes, e.g. a read and its audit row. */
        with write_transaction(self.engine) as conn:
            return fn(conn, *args)
