"""The writer: the process that commits batches, and the reactor's handle on it.

Why a process and not a thread: the writer's work is Python (building ACKs,
and later mapping, matching and routing) and database calls; the reactor's
is Python too. In one process they share one GIL, so every ACK the reactor
sends waits for the writer to let go of it, and the exchange never uses
more than one core. As a child process the writer gets its own core and the
reactor only pickles a batch down a pipe and reads the answers back.

Protocol on the child's stdin/stdout: each message is a 4-byte big-endian
length and a pickle. The parent sends a list of ``Received``; the child
answers ``("ok", [Answer, ...])`` after the batch's transaction has
committed, or ``("error", text, bug)`` after it rolled back (``bug``: its
processing raised, the database did not fail: ``CommitFailed``). One batch at a time
(``GroupCommitter`` never has two in flight). The child ignores SIGINT and
SIGTERM: it exits when its stdin closes, after finishing the batch it has,
so a shutdown never cuts a commit in half.

If the child dies, the batch in flight fails (no ACK is sent for it; the
senders keep the messages and resend them) and a new child is started.
"""
from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from exchange.config import Config
from exchange.intake import CommitFailed, utc_now
from exchange.mapping.events import FacilityContext
from exchange.pipeline import AckSettings, Answer, Received, process_batch
from exchange.store.db import (DEADLOCK_DETECTED, IDLE_IN_TRANSACTION_MS, UNIQUE_VIOLATION, WRITER_SESSION,
                               database_failed, sqlstate, write_transaction)
from exchange.store.index import ModelCache
from exchange.store.outbox import record_outcomes

log = Logger()
_LENGTH = struct.Struct(">I")


class WriterFailed(CommitFailed):
    """The batch was not committed (the writer rolled back, or died)."""


UP_CONFIRM = 2.0  # seconds a restarted writer must live (or answer a batch) to count as running again


class WriterProcess(ProcessProtocol):
    """The reactor side: ``run(items) -> Deferred[list[Answer]]``."""

    def __init__(self, reactor, argv: Sequence[str], *, restart_delay: float = 1.0) -> None:
        self._reactor = reactor
        self._argv = list(argv)
        self._restart_delay = restart_delay
        self._buffer = bytearray()
        self._waiting: Deferred | None = None
        self._ready: list[Deferred] = []
        self._running = False
        self._stopping = False
        self._stopped: Deferred | None = None
        self.restarts = 0
        # The reactor's clock when a writer last ended, until a new one has proved itself: it has
        # answered a batch, or lived UP_CONFIRM seconds (one killed as it starts never does).
        self.down_since: float | None = None
        self._confirm = None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._buffer.clear()
        self._reactor.spawnProcess(
            self,
            self._argv[0],
            self._argv,
            env=os.environ.copy(),
            childFDs={0: "w", 1: "r", 2: 2},
        )

    def connectionMade(self) -> None:
        self._running = True
        if self.down_since is not None:
            self._confirm = self._reactor.callLater(UP_CONFIRM, self._up)
        ready, self._ready = self._ready, []
        for d in ready:
            d.callback(None)

    def stop(self) -> Deferred:
        """Close the child's stdin; fires when it has exited."""
        self._stopping = True
        self._stopped = Deferred()
        if self._running:
            self.transport.closeStdin()
        else:
            self._stopped.callback(None)
        return self._stopped

    def _up(self) -> None:
        self._cancel_confirm()
        self.down_since = None

    def _cancel_confirm(self) -> None:
        confirm, self._confirm = self._confirm, None
        if confirm is not None and confirm.active():
            confirm.cancel()

    def processEnded(self, reason) -> None:
        self._running = False
        self._cancel_confirm()
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(WriterFailed(f"the writer process ended: {reason.getErrorMessage()}"))
        if self._stopping:
            if self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        if not reason.check(ProcessDone):
            log.error("writer process died ({why}); starting a new one", why=reason.getErrorMessage())
        if self.down_since is None:
            self.down_since = self._reactor.seconds()
        self.restarts += 1
        self._reactor.callLater(self._restart_delay, self.start)

    # -- batches ------------------------------------------------------------

    def run(self, items: Sequence[Received], outcomes: Sequence = ()) -> Deferred:
        """Store and apply ``items`` in one transaction (and record the delivery
        ``outcomes`` in it); fires with the answers once committed."""
        if self._stopping:
            return fail(WriterFailed("the exchange is stopping"))
        if self._waiting is not None:
            return fail(RuntimeError("one batch at a time"))
        if not self._running:  # (re)starting: wait for the child, then send
            ready: Deferred = Deferred()
            self._ready.append(ready)
            return ready.addCallback(lambda _: self.run(items, outcomes))
        payload = pickle.dumps((list(items), list(outcomes)), protocol=pickle.HIGHEST_PROTOCOL)
        self._waiting = Deferred()
        self.transport.write(_LENGTH.pack(len(payload)) + payload)
        return self._waiting

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if len(self._buffer) < 4 + size:
                return
            kind, value, *more = pickle.loads(bytes(self._buffer[4 : 4 + size]))
            del self._buffer[: 4 + size]
            d, self._waiting = self._waiting, None
            if d is None:
                log.error("writer answered a batch nobody asked for")
                continue
            if kind == "ok":
                if self.down_since is not None:  # it answered: it works
                    self._up()
                d.callback(value)
            else:
                d.errback(WriterFailed(value, bug=bool(more and more[0])))


# -- the child ------------------------------------------------------------------


def _read_exactly(stream, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def serve_batches(run_batch: Callable[[Sequence[Received], Sequence], list[Answer]], stdin, stdout) -> None:
    """Answer batches ``(items, delivery outcomes)`` until stdin closes."""
    while True:
        header = _read_exactly(stdin, 4)
        if header is None:
            return
        payload = _read_exactly(stdin, _LENGTH.unpack(header)[0])
        if payload is None:
            return
        items, outcomes = pickle.loads(payload)
        try:
            reply = ("ok", _run_with_retries(run_batch, items, outcomes))
        except Exception as exc:  # rolled back: say so, keep serving
            # the exception's text may quote the rows (patient data): its type and SQLSTATE only,
            # and for a bug where it was raised (the code's lines, not the values)
            code = sqlstate(exc)
            bug = not database_failed(exc)
            where = "".join(traceback.format_tb(exc.__traceback__)) if bug else ""
            print(
                f"exchange writer: batch of {len(items)} rolled back: {type(exc).__name__}"
                + (f" (SQLSTATE {code})" if code else "") + (f", raised at\n{where}" if where else ""),
                file=sys.stderr,
                flush=True,
            )
            reply = ("error", f"{type(exc).__name__}", bug)
        out = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(_LENGTH.pack(len(out)) + out)
        stdout.flush()


CONFLICT_RETRIES = 3


def _run_with_retries(run_batch, items, outcomes):
    """``run_batch``, again at once when it lost a race for a unique key to another node's
    transaction (the same MSH-4 and MSH-10, or the same new MRN, through two nodes at once):
    that one has committed by then, and the batch run again reads it -- the stored answer, the
    record to update; or when PostgreSQL ended it to break a deadlock with another node's. Not
    a bug: a message retried alone that lost such a race a second time was answered AE 207 and
    its event lost. Rolled back each time (``write_transaction``)."""
    for attempt in range(CONFLICT_RETRIES + 1):
        try:
            return run_batch(items, outcomes)
        except Exception as exc:
            if attempt == CONFLICT_RETRIES or sqlstate(exc) not in (UNIQUE_VIOLATION, DEADLOCK_DETECTED):
                raise
    raise AssertionError("unreachable")


def make_batch_runner(
    engine,
    *,
    facilities: Mapping[str, FacilityContext],
    routing: Config | None = None,
    new_control_id: Callable[[], str],
    now: Callable[[], datetime] = utc_now,
    settings: AckSettings = AckSettings(),
) -> Callable[..., list[Answer]]:
    """The function the writer runs for each batch."""
    models = ModelCache()

    def run(items: Sequence[Received], outcomes: Sequence = ()) -> list[Answer]:
        # TRANSACTION: the batch's raw messages, their states, history and ACKs, what they
        # change in the record model, the patient index and the outbox (an AA means all of
        # it is committed), and the delivery outcomes that rode along.
        with write_transaction(engine) as conn:
            answers = process_batch(conn, items, new_control_id=new_control_id, now=now, facilities=facilities,
                                    models=models, routing=routing, settings=settings) if items else []
            if outcomes:
                record_outcomes(conn, outcomes)
            return answers

    return run


def writer_argv(config_path: str, database: str) -> list[str]:
    """How the parent starts the writer. Shutdown is the parent's to order (the writer
    stops when its stdin closes), but a Ctrl-C reaches the whole process group: one
    arriving while Python starts would end the writer with a traceback. So a shell
    ignores SIGINT and SIGTERM before it execs Python, which leaves them ignored.
    (Twisted resets ignored signals to their default when it spawns a process.)"""
    return ["/bin/sh", "-c", 'trap "" INT TERM; exec "$0" "$@"', sys.executable, "-m", "exchange.writer",
            "--config", config_path, "--database", database]


def main(argv: list[str] | None = None) -> int:
    import argparse

    from exchange.config import facility_contexts, load_config
    from exchange.intake import AckIds
    from exchange.logs import start_logging
    from exchange.store.db import make_engine

    parser = argparse.ArgumentParser(prog="exchange-writer")
    parser.add_argument("--config", required=True)
    parser.add_argument("--database", required=True)
    args = parser.parse_args(argv)
    # Shutdown is the parent's to order: we finish the batch we have and
    # exit when our stdin closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = load_config(args.config, database=args.database)
    start_logging(config.server.log_level)  # to stderr: stdout is the pipe to the parent
    engine = make_engine(config.server.database, pool_pre_ping=False, idle_in_transaction_ms=IDLE_IN_TRANSACTION_MS,
                         application_name=WRITER_SESSION)
    settings = AckSettings(config.server.application, config.server.facility_name)
    run_batch = make_batch_runner(engine, facilities=facility_contexts(config), routing=config,
                                  new_control_id=AckIds(tag="W"), settings=settings)
    try:
        serve_batches(run_batch, sys.stdin.buffer, sys.stdout.buffer)
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
