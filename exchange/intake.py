"""The reactor-side half of the intake: group commit.

``Intake.receive`` runs on the reactor thread for every frame: it reads the
header and applies the acceptance rules (microseconds), then hands the
message to the ``GroupCommitter``. The committer has the writer (a process
of its own, ``exchange.writer``) run ``process_batch`` for whatever arrived
while the previous commit was running, so messages arriving within a
commit's duration share one transaction, and each message's Deferred fires
only after that transaction has committed. No SQL ever runs on the reactor.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from exchange import metrics
from exchange.acceptance import AcceptancePolicy, PeerIdentity, accept
from exchange.hl7.batch import build_batch_ack, build_empty_batch_nak, is_batch, split_batch
from exchange.hl7.header import Header, read_header
from exchange.outcome import Verdict, rejected
from exchange.pipeline import Answer, Received, unapplied

log = Logger()

# Bounds on what waits for the writer, in bytes as well as in messages (server.max_pending): a
# few frames near max_frame_bytes weigh as much as many thousands of ordinary messages.
MAX_PENDING_BYTES = 64 * 1024 * 1024  # connections pause above this, resume below half
MAX_BATCH_BYTES = 16 * 1024 * 1024  # one transaction takes at most this much (at least one message)


class CommitFailed(Exception):
    """A batch was not committed. ``bug``: processing it raised (what it asked of the database,
    or Python) -- not the database failing, nor the writer's process dying. A message that
    fails so alone too is stored unapplied and answered AE 207 (``GroupCommitter``)."""

    def __init__(self, text: str, *, bug: bool = False) -> None:
        super().__init__(text)
        self.bug = bug


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent a frame: the connection's address and TLS identity."""

    address: str
    identity: PeerIdentity | None = None

    def describe(self) -> str:
        if self.identity and self.identity.tls_subject:
            return f"{self.address} ({self.identity.tls_subject})"[:128]
        return self.address[:128]


class AckIds:
    """Fresh MSH-10 values for our ACKs: unique across restarts, <= 20 chars."""

    def __init__(self, clock: Callable[[], float] = time.time, tag: str = "X") -> None:
        self._prefix = tag + _base36(int(clock() * 1000))
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{_base36(next(self._counter)):0>6}"


def _base36(n: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _count(answer: Answer) -> None:
    """The writer's decisions about one message, counted here (the writer has no /metrics)."""
    for action in answer.matched:
        metrics.MATCH_DECISIONS.labels(action).inc()
    for destination in answer.routed:
        metrics.COPIES_QUEUED.labels(destination).inc()


class GroupCommitter:
    """Batches submitted messages into transactions run by the one writer.

    One batch is in flight at a time (SQLite wants one writer; PostgreSQL is
    bound by round trips, which batching amortises). While a batch commits,
    new items wait in ``_pending``; when it finishes, everything pending
    (up to ``batch_max``) becomes the next batch. A lone message is committed
    at once, a busy feed gets large batches.

    Senders that wait for each ACK before sending the next message answer a
    batch's ACKs all at about the same time. Started with the first of them,
    the next batch would hold one message and the rest would wait for it:
    batches of 1 and n-1 in turn, twice the commits. So the next batch waits,
    at most ``gather`` seconds on ``clock``, for one message from each
    connection the last batch answered that has none pending yet. (Measured
    with 8 such senders: PostgreSQL 363 -> 522 msgs/s; SQLite, whose commit
    costs less, about the same.) A sender that does not wait for its ACKs
    has its next messages pending already: nothing to wait for.
    """

    def __init__(
        self,
        commit_batch: Callable[[Sequence[Received]], Deferred],
        *,
        batch_max: int = 500,
        max_pending: int = 5000,
        on_routed: Callable[[set[str]], None] | None = None,
        clock=None,
        gather: float = 0.0,
    ) -> None:
        """``commit_batch(items)`` has the writer store a batch in one
        transaction; its Deferred fires with the answers once committed
        (``WriterProcess.run`` in production). ``on_routed(destinations)``:
        called after a batch that queued copies, with their destinations."""
        self._commit_batch = commit_batch
        self._on_routed = on_routed
        self._batch_max = batch_max
        self._max_pending = max_pending
        self._pending: list[tuple[Received, Deferred]] = []
        self._pending_bytes = 0  # the raw messages' sizes: a few huge ones weigh as much as many small ones
        self._side: list[tuple[list, Deferred]] = []  # delivery outcomes riding with the next batch
        self._busy = False
        self._idle_waiters: list[Deferred] = []
        self._resume_waiters: list[Callable[[], None]] = []
        self._clock = clock
        self._gather = gather if clock is not None else 0.0
        self._expect = 1  # pending, plus one for each connection just answered with none pending
        self._timer = None
        self._now = clock.seconds if clock is not None else time.monotonic
        self._commit_since: float | None = None  # when the commit in flight started (None: none is)
        self._unanswered_at: float | None = None  # when a message last went unanswered (None: one committed since)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def commit_seconds(self) -> float:
        """How long the commit in flight has been running (0.0 when none is): a writer
        waiting on a lock, or on a database that stopped answering, shows here first."""
        return 0.0 if self._commit_since is None else max(0.0, self._now() - self._commit_since)

    def unanswered_seconds(self) -> float | None:
        """Seconds since a message last could not be committed, so got no ACK (the database
        failing, the writer dying), or None when a batch has committed since: a database locked
        or gone shows here, while each commit gives up after seconds (SQLite's busy timeout)."""
        return None if self._unanswered_at is None else max(0.0, self._now() - self._unanswered_at)

    @property
    def overloaded(self) -> bool:
        return len(self._pending) >= self._max_pending or self._pending_bytes >= MAX_PENDING_BYTES

    def on_capacity(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` once the backlog has fallen to half the limit."""
        self._resume_waiters.append(resume)

    def submit(self, item: Received) -> Deferred:
        d: Deferred = Deferred()
        self._pending.append((item, d))
        self._pending_bytes += len(item.raw)
        metrics.PENDING.set(len(self._pending))
        if not self._busy:
            self._start_or_gather()
        return d

    def record_outcomes(self, outcomes: list) -> Deferred:
        """Have the writer record delivery outcomes in its next transaction (SQLite: the
        one writer; a second writing process would wait for the lock behind batch after
        batch). Fires with None once committed; fails if that transaction rolled back."""
        d: Deferred = Deferred()
        self._side.append((list(outcomes), d))
        if not self._busy:
            self._start_or_gather()
        return d

    def wait_idle(self) -> Deferred:
        """Fires when nothing is pending or committing (for clean shutdown)."""
        if not self._busy and not self._pending and not self._side:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle_waiters.append(d)
        return d

    def _start_or_gather(self) -> None:
        """Start the next batch now, or -- while the connections just answered are
        still sending their next message -- once they have, or ``gather`` seconds have passed."""
        if self._side or len(self._pending) >= min(self._expect, self._batch_max) or not self._gather:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._start()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._gather, self._gathered)

    def _gathered(self) -> None:
        self._timer = None
        if not self._busy and (self._pending or self._side):
            self._start()

    def _start(self) -> None:
        take, size = 0, 0
        for item, _ in self._pending[: self._batch_max]:  # at most batch_max, and MAX_BATCH_BYTES unless one
            size += len(item.raw)
            if take and size > MAX_BATCH_BYTES:
                size -= len(item.raw)
                break
            take += 1
        batch = self._pending[:take]
        del self._pending[:take]
        self._pending_bytes -= size
        side, self._side = self._side, []
        self._busy = True
        items = [item for item, _ in batch]
        started = time.perf_counter()
        self._commit_since = self._now()
        if side:
            d = self._commit_batch(items, [o for outcomes, _ in side for o in outcomes])
        else:
            d = self._commit_batch(items)
        d.addCallbacks(
            self._committed,
            self._failed,
            callbackArgs=(batch, started, side),
            errbackArgs=(batch, side),
        )
        d.addErrback(lambda f: log.failure("group commit bookkeeping failed", f))

    def _committed(self, answers: list[Answer], batch, started: float, side=()) -> None:
        self._unanswered_at = None
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        waiting = {item.peer for item, _ in self._pending}
        self._expect = len(self._pending) + len({item.peer for item, _ in batch} - waiting)
        for _, d in side:
            d.callback(None)
        routed: set[str] = set()
        for (_, d), answer in zip(batch, answers, strict=True):
            routed.update(answer.routed)
            _count(answer)
            d.callback(answer)
        if routed and self._on_routed is not None:
            self._on_routed(routed)
        self._next()

    def _failed(self, failure: Failure, batch, side=()) -> None:
        """The batch's transaction rolled back: nothing of it is stored.

        Retry each message alone -- a batch of one too -- so one bad message
        cannot sink the others, and a message another node committed first
        (the same MSH-4 and MSH-10 sent to two nodes of one PostgreSQL: a
        unique violation here) gets the stored answer on its retry. A message
        whose processing still raises (``CommitFailed.bug``: a bug, which would
        fail it again at every resend and stall its sender's feed) is stored
        with nothing of it applied and answered AE 207 once that commits. One
        that still fails otherwise (the database is down, the writer died), or
        whose AE cannot be stored either, gets no ACK at all (its Deferred
        fails and the connection is closed), so the sender keeps it and resends.
        Delivery outcomes that rode along are not retried: those copies stay
        queued and go again (same MSH-10).
        """
        for _, d in side:
            d.errback(failure)
        if not batch:
            self._next()
            return
        if failure.check(CommitFailed) and not failure.value.bug:
            # the database failed (a lost connection, a node's session ended, a lock timeout): no bug,
            # no traceback to read (the writer's own log has the type and SQLSTATE)
            log.warn("group commit of {count} messages failed ({error}); retrying one by one",
                     count=len(batch), error=str(failure.value))
        else:
            log.failure("group commit of {count} messages failed; retrying one by one", failure, count=len(batch))
        self._run_singles(list(batch))

    def _run_singles(self, singles) -> None:
        if not singles:
            self._next()
            return
        (item, d), rest = singles[0], singles[1:]
        started = time.perf_counter()
        self._commit_since = self._now()
        run = self._commit_batch([item])

        def done(answers):
            self._unanswered_at = None
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
            _count(answers[0])
            d.callback(answers[0])
            if answers[0].routed and self._on_routed is not None:
                self._on_routed(set(answers[0].routed))

        def failed(f):
            metrics.COMMIT_FAILURES.inc()
            if f.check(CommitFailed) and f.value.bug:
                log.failure("message could not be applied; storing it unapplied, answered AE 207", f)
                # TRANSACTION: the message alone, its AE and nothing else (pipeline.unapplied)
                return self._commit_batch([unapplied(item)]).addCallbacks(done, unanswered)
            unanswered(f)

        def unanswered(f):
            self._unanswered_at = self._now()
            log.failure("message could not be committed; no ACK sent", f)
            d.errback(f)

        run.addCallbacks(done, failed)
        run.addBoth(lambda _: self._run_singles(rest))

    def _next(self) -> None:
        self._busy = False
        self._commit_since = None
        metrics.PENDING.set(len(self._pending))
        if self._pending or self._side:
            self._start_or_gather()
        if (len(self._pending) <= self._max_pending // 2 and self._pending_bytes <= MAX_PENDING_BYTES // 2
                and self._resume_waiters):
            waiters, self._resume_waiters = self._resume_waiters, []
            for resume in waiters:
                resume()
        if not self._busy and not self._pending:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)


class Intake:
    """Turns frames into answers: header, acceptance, group commit."""

    def __init__(
        self,
        committer: GroupCommitter,
        policy: AcceptancePolicy,
        charset_for: Callable[[str], str],
        *,
        new_control_id: Callable[[], str],
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.committer = committer
        self._policy = policy
        self._charset_for = charset_for
        self._new_control_id = new_control_id
        self._now = now

    def receive(self, payload: bytes, peer: Peer, *, note: str = "", force_reject: str = "") -> Deferred:
        """Answer one frame: a Deferred firing with the reply payload or None."""
        if is_batch(payload):
            return self._receive_batch(payload, peer)
        return self._receive_one(payload, peer, note=note, force_reject=force_reject).addCallback(
            lambda answer: answer.ack
        )

    def _receive_one(
        self, payload: bytes, peer: Peer, *, note: str = "", force_reject: str = "", header: Header | None = None
    ) -> Deferred:
        header = header or read_header(payload, self._charset_for)
        if force_reject:
            decision = rejected(207, "", force_reject)
        else:
            decision = accept(header, self._policy, peer.identity)
        facility = header.facility if header.facility in self._policy.facilities else "unknown"
        metrics.received(facility).inc()
        item = Received(
            raw=payload,
            header=header,
            decision=decision,
            received_at=self._now(),
            peer=peer.describe(),
            note=note,
        )
        started = time.perf_counter()
        d = self.committer.submit(item)

        def answered(answer: Answer) -> Answer:
            metrics.ACK_LATENCY.observe(time.perf_counter() - started)
            metrics.acks(answer.ack_code or "none").inc()
            if answer.duplicate:
                metrics.DUPLICATES.inc()
            if decision.verdict is not Verdict.ACCEPT or answer.ack_code not in ("AA", "CA"):
                log.info(
                    "message {facility}/{control_id} answered {code}",
                    facility=facility,  # MSH-4 as sent only when it is a configured facility's code
                    control_id=_bounded(header.control_id),
                    code=answer.ack_code or "nothing (inbound ACK)",
                )
            return answer

        return d.addCallback(answered)

    def _receive_batch(self, payload: bytes, peer: Peer) -> Deferred:
        """An FHS/BHS batch in one frame: each message stored and answered,
        the answers returned together as one batch acknowledgement."""
        batch = split_batch(payload)
        if not batch.messages:
            # Nothing to apply: store the frame as an error and answer one AE.
            d = self._receive_one(payload, peer, note="batch without MSH")
            return d.addCallback(
                lambda answer: build_empty_batch_nak(
                    batch, control_id=self._new_control_id(), now=self._now()
                ).encode("utf-8", errors="replace")
            )
        headers = [read_header(m, self._charset_for) for m in batch.messages]
        ds = [self._receive_one(m, peer, note="part of a batch", header=h) for m, h in zip(batch.messages, headers)]
        codec = headers[0].codec  # one sender: the batch acknowledgement in its charset

        def assemble(results) -> bytes:
            acks = []
            for (ok, answer), header in zip(results, headers):
                if not ok:
                    raise answer.value  # a part failed to commit: no ACK for the batch
                if answer.ack is not None:
                    acks.append(answer.ack.decode(header.codec, errors="replace"))
            text = build_batch_ack(batch, acks, control_id=self._new_control_id(), now=self._now())
            return text.encode(codec, errors="replace")

        return DeferredList(ds, consumeErrors=True).addCallback(assemble)


def _bounded(value: str, limit: int = 64) -> str:
    """A sender-controlled value as the log may hold it: one line, at most ``limit`` characters."""
    value = value.replace("\r", " ").replace("\n", " ")
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} characters)"
