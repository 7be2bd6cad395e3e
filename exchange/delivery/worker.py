"""The delivery worker: one loop per destination, in the reactor process.

Each loop, top to bottom::

    hold the destination ....... store.outbox.try_lock_destination   (PostgreSQL advisory lock; SQLite: one node)
    claim ...................... store.outbox.claim_batch            (oldest queued copies that are due,
                                                                      each checked again: opt-out, links,
                                                                      the configuration running now)
    for each copy, in order:
      withheld? ................ recorded so, never sent              (the person opted out since, ...)
      superseded? .............. failed again, never sent             (requeued by an operator, not forced,
                                                                      and a newer copy about the patient
                                                                      has been delivered since)
      connect (kept open) ...... mllp.client over the endpoint string (tcp / tls, client certificate)
      checked again ............ store.outbox.send_check             (just before it is written: an opt-out
                                                                      or a split while the copies ahead of
                                                                      it were answered withholds it, ...)
      send, wait for one ACK ... MLLPClientProtocol.send              (timeout: the connection is dropped)
      judge the ACK ............ delivery.policy.judge                (MSA-2 must be the copy's MSH-10)
      record the outcome ....... store.outbox.record_outcomes         (in the thread pool, while the next copy goes out)
      a copy to retry stops the batch: nothing overtakes it (FIFO)
    sleep until woken (new copies committed), the poll interval, or the head's retry time

Database work runs in a thread pool (``deferToThreadPool``), never on the
reactor thread; each destination runs its statements one at a time on a
connection of its own, which on PostgreSQL also holds the destination's
advisory lock, so a node that lost that connection (and the lock with it)
finds out at its next statement and stops sending; the check just before
each copy runs on a second one, beside the recording of the copy before. A slow or dead
destination holds up only its own loop: the intake never waits for
delivery, and the other destinations have loops of their own.

Delivery is at least once: a copy whose ACK came but whose outcome could not
be recorded (the node died, the database went away) is sent again, with the
same MSH-10, by whichever node serves the destination next.
"""
from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from exchange import metrics
from exchange.config import Config
from exchange.delivery.policy import Kind, Settings, acknowledges, backoff, judge
from exchange.mllp.client import MLLPClientProtocol, ReplyTimeout, client_endpoint
from exchange.mllp.framing import FramingError
from exchange.store.db import DELIVERY_SESSION, make_engine, write_transaction
from exchange.store.outbox import (
    Claim,
    Delivered,
    Failed,
    Outcome,
    Pending,
    RetryLater,
    Rewritten,
    Superseded,
    Withheld,
    claim_batch,
    queue_depths,
    record_outcomes,
    send_check,
    try_lock_destination,
    unlock_destination,
)

__all__ = ["DeliveryProtocol", "DeliveryService", "DestinationStore", "DestinationWorker"]

log = Logger()

STOP_GRACE = 5.0  # seconds a copy in flight may take to be answered when the exchange stops


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# -- the database side (runs in the thread pool) -----------------------------------------


class DestinationStore:
    """One destination's database work, called from the pool: ``check`` may run beside
    ``record``, every other call one at a time.

    PostgreSQL: every statement but the send-time checks runs on one connection
    of its own, the one that holds the destination's advisory lock; any error
    drops it (closed, not returned to the pool, so the lock goes with it).
    SQLite: short transactions on pooled connections (one node: no lock). The
    send-time checks (``check``) run on a second connection, kept. ``config``:
    the configuration the exchange runs, each claimed copy is checked against.
    """

    def __init__(self, engine: Engine, destination: str, config: Config) -> None:
        self.engine = engine
        self.destination = destination
        self.config = config
        self._postgres = engine.dialect.name == "postgresql"
        self._conn: Connection | None = None
        self._reader: Connection | None = None  # the send-time checks' connection (see check)
        self._held = False

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Connection]:
        if not self._postgres:
            # /* TRANSACTION: a claim (read) or the outcomes of attempts (write). */
            with (write_transaction(self.engine) if write else self.engine.begin()) as conn:
                yield conn
            return
        if self._conn is None:
            self._conn = self.engine.connect()
        try:
            # /* TRANSACTION: the lock, a claim (read) or the outcomes of attempts (write). */
            with self._conn.begin():
                yield self._conn
        except BaseException:
            self._drop()
            raise

    def acquire(self) -> bool:
        """True while this node may send the destination's copies."""
        with self._transaction(write=False) as conn:
            self._held = try_lock_destination(conn, self.destination)
            return self._held

    def claim(self, now: datetime, limit: int) -> Claim:
        with self._transaction(write=False) as conn:
            return claim_batch(conn, self.destination, now, limit, config=self.config)

    def check(self, copy: Pending) -> Withheld | Superseded | Rewritten | None:
        """What to record instead of sending a claimed copy (None: send it), just before it goes.

        It runs while the outcome of the copy before it is being recorded, on a connection
        of its own (kept): on PostgreSQL not the lock's, where it would wait for that commit
        (an fsync, ~3 ms here). The usual copy is one statement without BEGIN or COMMIT
        (SQLite's autocommit; PostgreSQL's, set on this connection): one round trip."""
        reader = self._reader
        if reader is None:
            reader = self.engine.connect()
            if self._postgres:
                reader.execution_options(isolation_level="AUTOCOMMIT")
            self._reader = reader
        try:
            # /* TRANSACTION: none for the usual copy (one read, autocommit); a read
            #    transaction for the rest (the claim's whole check), ended here. */
            instead = send_check(reader, copy, self.config)
            if reader.in_transaction():
                reader.rollback()
            return instead
        except BaseException:
            self._reader = None
            _close(reader, invalidate=True)
            raise

    def record(self, outcomes: list[Outcome]) -> int:
        with self._transaction(write=True) as conn:
            return record_outcomes(conn, outcomes)

    def release(self) -> None:
        """Give the destination up (unlock, close)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            _close(reader)
        conn, self._conn = self._conn, None
        held, self._held = self._held, False
        if conn is None:
            return
        try:
            if held:
                with conn.begin():
                    unlock_destination(conn, self.destination)
            conn.close()
        except SQLAlchemyError:
            conn.invalidate()

    def _drop(self) -> None:
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            _close(conn, invalidate=True)  # a closed session: PostgreSQL releases its advisory locks


def _close(conn: Connection, invalidate: bool = False) -> None:
    try:
        if invalidate:
            conn.invalidate()
    finally:
        try:
            conn.close()
        except SQLAlchemyError:
            pass


# -- the reactor side --------------------------------------------------------------------


ANSWERS_REMEMBERED = 64  # per connection: the control ids answered last


class DeliveryProtocol(MLLPClientProtocol):
    """The MLLP client, knowing whether its connection is still up."""

    closed = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        super().connectionLost(reason)

    def abort(self) -> None:
        """Drop the connection now (a reply that cannot be matched, or shutting down)."""
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()


class _OneConnection(Factory):
    """``connectProtocol``'s factory without its "Starting factory" log line per connection."""

    noisy = False

    def __init__(self, protocol: DeliveryProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> DeliveryProtocol:
        return self.protocol_instance


class DestinationWorker:
    """Delivers one destination's copies, one at a time, oldest first.

    ``call(fn, *args)`` runs ``fn`` off the reactor thread and returns a
    Deferred (``deferToThreadPool``; tests run it inline); ``store`` is the
    destination's ``DestinationStore``; ``connect()`` returns a Deferred
    firing with a connected ``DeliveryProtocol`` (default: the endpoint
    string). ``now()`` is an aware datetime, ``rand()`` a float in [0, 1).
    """

    def __init__(
        self,
        destination: str,
        endpoint: str | None,
        *,
        reactor: Any,
        call: Callable[..., Deferred],
        store: Any,
        settings: Settings,
        now: Callable[[], datetime] = utc_now,
        rand: Callable[[], float] = random.random,
        connect: Callable[[], Deferred] | None = None,
        record: Callable[[list], Deferred] | None = None,
    ) -> None:
        self.destination = destination
        # how outcomes are written: through the store in the thread pool, or (SQLite) by the writer
        self._write_outcomes = record or (lambda outcomes: self._call(self.store.record, outcomes))
        self.endpoint = endpoint
        self.reactor = reactor
        self.settings = settings
        self.store = store
        self.now = now
        self.rand = rand
        self._call = call
        self._connect = connect or self._connect_endpoint
        self._protocol: DeliveryProtocol | None = None
        # the copies this connection's peer has answered: an answer it repeats (or an application
        # ACK after its commit ACK) is no answer to the copy in flight, and is skipped
        self._answered: deque[str] = deque(maxlen=ANSWERS_REMEMBERED)
        self._connecting: Deferred | None = None
        self._held = False
        self._stopping = False
        self._woken = False
        self._sleeping: tuple[Deferred, Any, bool] | None = None
        self._sending = False
        self._grace: Any = None
        self._done: Deferred | None = None
        # outcomes waiting to be recorded, the record call in flight, who waits for it
        self._outcomes: list[Outcome] = []
        self._recording: Deferred | None = None
        self._record_error: Failure | None = None
        self._record_waiters: list[Deferred] = []

    # -- control --------------------------------------------------------------------

    def start(self) -> Deferred:
        """Run the loop; the Deferred fires when it has ended (after ``stop``)."""
        self._done = Deferred.fromCoroutine(self._run())
        return self._done

    def wake(self, urgent: bool = False) -> None:
        """New copies were committed: look at the queue now if idle.

        ``urgent`` (an operator requeued a copy) also cuts a wait for a retry."""
        self._woken = True
        if self._sleeping is not None and (self._sleeping[2] or urgent):
            self._end_sleep()

    def stop(self) -> Deferred:
        """Stop: a copy in flight gets ``STOP_GRACE`` seconds (at most the timeout) to be
        answered, else its connection is dropped and the copy stays queued as it was."""
        self._stopping = True
        self._end_sleep()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._sending and self._grace is None:
            self._grace = self.reactor.callLater(min(STOP_GRACE, self.settings.timeout), self._abort)
        return self._done if self._done is not None else succeed(None)

    @property
    def serving(self) -> bool:
        return self._held

    # -- the loop -------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    await self._step()
                except Exception as exc:  # noqa: BLE001 - logged; the loop goes on after a pause
                    if self._stopping:
                        break
                    self._lost_hold()
                    if isinstance(exc, SQLAlchemyError):
                        # its text can quote parameters (ACK texts): the type only
                        log.error("delivery to {destination}: database error {error}; trying again",
                                  destination=self.destination, error=type(exc).__name__)
                    else:
                        log.failure("delivery to {destination} failed; trying again", destination=self.destination)
                    await self._sleep(self.settings.poll, wakeable=False)
        finally:
            await self._shutdown()

    async def _step(self) -> None:
        if not self._held:
            held = await self._call(self.store.acquire)
            self._set_held(held)
            if not held:  # another node serves it; try again later
                await self._sleep(self.settings.poll, wakeable=True)
                return
        self._woken = False
        claim = await self._call(self.store.claim, self.now(), self.settings.batch)
        if claim.copies:
            await self._deliver(claim.copies)
            return
        if self._woken or self._stopping:
            return  # copies arrived while we looked: look again
        if claim.due_at is None:
            await self._sleep(self.settings.poll, wakeable=True)
        else:  # the head waits for its retry; new copies cannot overtake it
            wait = (claim.due_at - self.now()).total_seconds()
            await self._sleep(min(max(wait, 0.0), self.settings.poll), wakeable=False)

    async def _deliver(self, copies: tuple[Pending, ...]) -> None:
        # The claim checked every copy; nothing has been awaited since, so the first one sent on
        # a connection already open goes on that check. Every other copy is checked again just
        # before it is written: an opt-out or a split made while the copies ahead of it were
        # answered (up to a whole batch of ACKs) must stop it.
        checked = True
        try:
            for copy in copies:
                if self._stopping or self._record_error is not None:
                    break
                if copy.withheld is not None:  # opted out, relinked or no longer routed here since: never sent
                    self._record(self._unsent(copy, Withheld(copy.id, copy.withheld)))
                    continue
                if copy.superseded:  # requeued, and a newer copy about the patient went since: failed again
                    self._record(self._unsent(copy, Superseded(copy.id)))
                    continue
                outcome = await self._attempt(copy, checked)
                checked = False
                if outcome is None:  # abandoned while stopping: stays queued as it was
                    break
                self._record(outcome)
                if isinstance(outcome, RetryLater):
                    break  # FIFO: the copies behind it wait for it
        finally:  # a failed check (the database) ends the batch: what was recorded so far stays
            await self._recorded()

    def _unsent(self, copy: Pending, outcome: Withheld | Superseded) -> Withheld | Superseded:
        what = "withheld" if isinstance(outcome, Withheld) else "superseded"
        metrics.delivery_attempts(self.destination, what).inc()
        log.info("delivery to {destination}: {control_id} not sent ({what})", destination=self.destination,
                 control_id=copy.control_id, what=what)
        return outcome

    async def _attempt(self, copy: Pending, checked: bool = False) -> Outcome | None:
        """Check one copy again (unless ``checked`` just now and the connection is open), send
        it and judge the answer; None when abandoned because the exchange stops. A check that
        fails (the database) raises: the copy stays queued, unsent."""
        self._sending = True
        try:
            reply = None
            for last_chance in (False, True):
                try:
                    protocol, fresh = await self._connection()
                except Exception as exc:  # noqa: BLE001 - refused, unreachable, timed out, cancelled
                    if self._stopping:
                        return None
                    return self._retry(copy, "connection", f"cannot connect: {_describe(exc)}")
                if fresh or not checked:  # time has passed since the copy was last checked
                    instead = await self._call(self.store.check, copy)
                    if isinstance(instead, Rewritten):  # its destination renamed or merged the record since
                        copy = replace(copy, payload=instead.payload, destination_mrn=instead.destination_mrn)
                    elif instead is not None:
                        return self._unsent(copy, instead)
                    if self._stopping:
                        return None
                    checked = True
                if fresh:
                    self._answered.clear()
                try:
                    reply = await protocol.send(copy.payload, stale=self._stale_for(copy.control_id))
                    break
                except ReplyTimeout:
                    self._drop_connection()  # dropped already by the protocol: a late answer is never read
                    if self._stopping:
                        return None
                    return self._retry(copy, "timeout", f"no answer within {self.settings.timeout:g} s")
                except (ConnectionLost, ConnectionDone) as exc:
                    if self._stopping:
                        return None
                    if not fresh and not last_chance:
                        # A kept connection the peer had closed (idle, or one message per
                        # connection): send again on a new one, not counted as an attempt.
                        continue
                    return self._retry(copy, "connection", f"connection lost before the answer: {_describe(exc)}")
                except FramingError as exc:
                    self._drop_connection()
                    return self._retry(copy, "protocol", f"the answer cannot be framed: {exc}")
            assert reply is not None
            return self._judge(copy, reply)
        finally:
            self._sending = False
            if self._grace is not None and self._grace.active():
                self._grace.cancel()
            self._grace = None

    def _stale_for(self, control_id: str) -> Callable[[bytes], bool]:
        answered = self._answered

        def stale(reply: bytes) -> bool:
            acked = acknowledges(reply)
            if acked is None or acked == control_id or acked not in answered:
                return False
            late = judge(reply, acked)
            if late.kind is Kind.FAILED:  # a commit ACK (CA) the copy counted as delivered, then a refusal
                log.warn("delivery to {destination}: {acked} was answered {code} after it was delivered (the"
                         " exchange asks for no application ACK); it stays delivered", destination=self.destination,
                         acked=acked, code=late.code)
            return True

        return stale

    def _judge(self, copy: Pending, reply: bytes) -> Outcome:
        verdict = judge(reply, copy.control_id)
        if verdict.kind is not Kind.PROTOCOL:
            self._answered.append(copy.control_id)
        at = self.now()
        if verdict.kind is Kind.DELIVERED:
            metrics.delivery_attempts(self.destination, "delivered").inc()
            metrics.delivery_latency(self.destination).observe(
                max((at - copy.created_at).total_seconds(), 0.0)
            )
            log.debug("delivery to {destination}: {control_id} delivered ({code})",
                      destination=self.destination, control_id=copy.control_id, code=verdict.code)
            return Delivered(copy.id, at, verdict.code or "", reply)
        if verdict.kind is Kind.FAILED:
            metrics.delivery_attempts(self.destination, "failed").inc()
            log.warn("delivery to {destination}: {control_id} refused ({code}); failed, waits for an operator",
                     destination=self.destination, control_id=copy.control_id, code=verdict.code)
            return Failed(copy.id, at, verdict.code or "", reply, verdict.reason or "")
        # A reply that is not this copy's: drop the connection so that a late
        # answer can never be taken for the next copy, and send it again.
        self._drop_connection()
        return self._retry(copy, "protocol", verdict.reason or "bad answer", verdict.code, reply)

    def _retry(self, copy: Pending, outcome: str, error: str, code: str | None = None, reply: bytes | None = None) -> RetryLater:
        metrics.delivery_attempts(self.destination, outcome).inc()
        wait = backoff(copy.attempts + 1, self.settings.retry_initial, self.settings.retry_max, self.rand())
        log.info("delivery to {destination}: {control_id} not delivered ({outcome}); again in {wait:.1f} s",
                 destination=self.destination, control_id=copy.control_id, outcome=outcome, wait=wait)
        return RetryLater(copy.id, self.now() + timedelta(seconds=wait), error, code, reply)

    # -- the connection -------------------------------------------------------------

    async def _connection(self) -> tuple[DeliveryProtocol, bool]:
        """The open connection (fresh=False), or a new one (fresh=True)."""
        if self._protocol is not None and not self._protocol.closed:
            return self._protocol, False
        self._protocol = None
        d = self._connect()
        d.addTimeout(self.settings.timeout, self.reactor)
        self._connecting = d
        try:
            protocol = await d
        finally:
            self._connecting = None
        if self._stopping:
            protocol.abort()
            raise CancelledError("stopping")
        self._protocol = protocol
        return protocol, True

    def _connect_endpoint(self) -> Deferred:
        endpoint = client_endpoint(self.reactor, self.endpoint or "", timeout=self.settings.timeout)
        return endpoint.connect(_OneConnection(DeliveryProtocol(self.reactor, timeout=self.settings.timeout)))

    def _drop_connection(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.abort()

    def _abort(self) -> None:
        self._grace = None
        self._drop_connection()

    # -- recording outcomes (overlaps the next send) -----------------------------------

    def _record(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        if self._recording is None:
            self._flush()

    def _flush(self) -> None:
        batch, self._outcomes = self._outcomes, []
        d = self._write_outcomes(batch)
        self._recording = d
        d.addCallbacks(self._flushed, self._flush_failed)

    def _flushed(self, _changed: int) -> None:
        self._recording = None
        if self._outcomes and self._record_error is None:
            self._flush()
            return
        self._release_waiters()

    def _flush_failed(self, failure: Failure) -> None:
        # Not recorded: those copies stay queued and are sent again (same MSH-10).
        self._recording = None
        self._outcomes.clear()
        self._record_error = failure
        self._release_waiters()

    def _release_waiters(self) -> None:
        waiters, self._record_waiters = self._record_waiters, []
        for d in waiters:
            d.callback(None)

    async def _recorded(self) -> None:
        """Wait until every outcome so far is recorded; raise if recording failed."""
        while self._recording is not None:
            d: Deferred = Deferred()
            self._record_waiters.append(d)
            await d
        failure, self._record_error = self._record_error, None
        if failure is not None:
            failure.raiseException()

    # -- sleeping -------------------------------------------------------------------

    def _sleep(self, seconds: float, *, wakeable: bool) -> Deferred:
        if self._stopping:
            return succeed(None)
        d: Deferred = Deferred()
        call = self.reactor.callLater(seconds, self._end_sleep)
        self._sleeping = (d, call, wakeable)
        return d

    def _end_sleep(self) -> None:
        sleeping, self._sleeping = self._sleeping, None
        if sleeping is not None:
            d, call, _ = sleeping
            if call.active():
                call.cancel()
            d.callback(None)

    # -- holding the destination ------------------------------------------------------

    def _set_held(self, held: bool) -> None:
        if held != self._held:
            log.info("delivery to {destination}: {what}", destination=self.destination,
                     what="serving it on this node" if held else "served by another node")
        self._held = held
        metrics.DELIVERY_SERVING.labels(destination=self.destination).set(1 if held else 0)

    def _lost_hold(self) -> None:
        self._held = False  # the store dropped its connection: the lock went with it
        metrics.DELIVERY_SERVING.labels(destination=self.destination).set(0)

    async def _shutdown(self) -> None:
        try:
            await self._recorded()
        except Exception:  # noqa: BLE001 - those copies stay queued
            log.warn("delivery to {destination}: outcomes not recorded at stop; those copies go again",
                     destination=self.destination)
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None
        try:
            await self._call(self.store.release)
        except Exception:  # noqa: BLE001
            log.warn("delivery to {destination}: release failed", destination=self.destination)
        self._lost_hold()


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


class DeliveryService(Service):
    """Every destination's worker, their thread pool and engine, and the queue-depth gauge.

    ``destinations``: {facility code: client endpoint string} (the facilities
    with ``deliver_to``); ``config``: the configuration the exchange runs,
    which every copy is checked against just before it goes out. ``wake(codes)``
    after a commit that queued copies for them; ``requeued(code)`` after an
    operator requeued one.
    """

    def __init__(
        self,
        reactor: Any,
        database_url: str,
        destinations: Mapping[str, str],
        settings: Settings = Settings(),
        *,
        config: Config,
        now: Callable[[], datetime] = utc_now,
        rand: Callable[[], float] = random.random,
        record: Callable[[list], Deferred] | None = None,
    ) -> None:
        """``record(outcomes)``: how attempts' outcomes are written (default: each worker
        in the thread pool). On SQLite the exchange passes the writer's: a second writing
        process would wait behind batch after batch for the one write lock."""
        self.reactor = reactor
        self.database_url = database_url
        self.record = record
        self.destinations = dict(destinations)
        self.config = config
        self.settings = settings
        self.now = now
        self.rand = rand
        # each worker has at most two calls in flight (an outcome recorded while the next copy is
        # checked), plus the depth gauge's
        self.pool = ThreadPool(1, min(2 * len(self.destinations) + 1, 32), name="exchange-delivery-db")
        self.engine: Engine | None = None
        self.workers: dict[str, DestinationWorker] = {}
        self._depths: LoopingCall | None = None
        self._depth_call: Deferred | None = None

    def _call(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def startService(self) -> None:
        super().startService()
        if not self.destinations:
            return
        # Creating an engine opens no connection: safe on the reactor thread.
        self.engine = make_engine(self.database_url, pool_size=2 * len(self.destinations) + 2,
                                  application_name=DELIVERY_SESSION)
        self.pool.start()
        for code, endpoint in self.destinations.items():
            worker = DestinationWorker(
                code,
                endpoint,
                reactor=self.reactor,
                call=self._call,
                store=DestinationStore(self.engine, code, self.config),
                settings=self.settings,
                now=self.now,
                rand=self.rand,
                record=self.record,
            )
            self.workers[code] = worker
            worker.start()
        self._depths = LoopingCall(self._update_depths)
        self._depths.clock = self.reactor
        self._depths.start(self.settings.poll, now=True).addErrback(
            lambda f: log.failure("delivery: queue depth gauge stopped", f)
        )

    def wake(self, destinations: Iterable[str]) -> None:
        """The hook for the intake: copies for ``destinations`` were committed."""
        for code in destinations:
            worker = self.workers.get(code)
            if worker is not None:
                worker.wake()

    def requeued(self, destination: str) -> None:
        """The hook for the API: an operator requeued one of ``destination``'s copies."""
        worker = self.workers.get(destination)
        if worker is not None:
            worker.wake(urgent=True)

    def _update_depths(self) -> Deferred:
        self._depth_call = self._call(self._read_depths)
        return self._depth_call.addCallbacks(self._set_depths, self._depths_failed)

    def _read_depths(self) -> dict[str, int]:
        assert self.engine is not None
        # /* TRANSACTION: a read of the queue depths. */
        with self.engine.connect() as conn, conn.begin():
            return queue_depths(conn)

    def _set_depths(self, depths: dict[str, int]) -> None:
        self._depth_call = None
        for code in self.destinations.keys() | depths.keys():
            metrics.DELIVERY_QUEUE.labels(destination=code).set(depths.get(code, 0))

    def _depths_failed(self, failure: Failure) -> None:
        self._depth_call = None
        log.error("delivery: reading the queue depths failed: {error}", error=failure.type.__name__)

    async def _stop(self) -> None:
        if self._depths is not None and self._depths.running:
            self._depths.stop()
        await DeferredList([w.stop() for w in self.workers.values()])
        if self._depth_call is not None:
            await DeferredList([self._depth_call])
        if self.pool.started:
            self.pool.stop()  # no call is in flight any more: joins at once
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
        log.info("delivery stopped")

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())
