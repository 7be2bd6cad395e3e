"""One place that wires the application: configuration in, services out."""
from __future__ import annotations

import contextlib
import functools
import os
import time
from datetime import datetime, timezone

from sqlalchemy.engine import make_url
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from exchange import metrics
from exchange.acceptance import AcceptancePolicy, FacilityRule
from exchange.accounts import Policy
from exchange.auth import TOKEN_CACHE_TTL, TokenCache
from exchange.config import Config, write_snapshot
from exchange.delivery import DeliveryService, Settings as DeliverySettings
from exchange.intake import AckIds, GroupCommitter, Intake
from exchange.jobs import JobScheduler
from exchange.store.db import disk_free_bytes, end_stale_sessions
from exchange.store.reviews import Trust
from exchange.mllp.protocol import MLLPServerFactory
from exchange.mllp.tls import server_endpoint
from exchange.writer import WriterProcess, writer_argv
from exchange.web.api import API
from exchange.web.db import Database
from exchange.web.server import build_site
from exchange.web.workbench import Workbench

log = Logger()


def acceptance_policy(config: Config) -> AcceptancePolicy:
    return AcceptancePolicy(
        facilities={
            f.code: FacilityRule(f.code, tls_subject=f.tls_subject, tls_fingerprint=f.tls_fingerprint)
            for f in config.facilities
        },
        accept=config.server.accept,
        processing_ids=config.server.processing_ids,
    )


def delivery_settings(config: Config) -> DeliverySettings:
    s = config.server
    return DeliverySettings(
        timeout=s.delivery_timeout, retry_initial=s.retry_initial, retry_max=s.retry_max, poll=s.delivery_poll
    )


class ExchangeService(Service):
    """The running exchange: writer process, MLLP listeners, HTTP endpoint (API and workbench).

    Start: writer process, then listeners, then the API's database thread
    pool and the HTTP endpoint. Stop (SIGTERM/SIGINT): listeners close,
    connections stop reading, the batches already taken are committed and
    answered, then the writer process is told to exit, and last the API's
    thread pool finishes its calls in flight and its engine is disposed.
    Delivery (one worker per facility with ``deliver_to``) starts after the
    listeners and stops alongside the intake: a copy in flight gets a few
    seconds for its ACK, else it stays queued for the next start.
    """

    def __init__(self, config: Config, reactor, *, announce=print) -> None:
        self.config = config
        self.reactor = reactor
        self.announce = announce
        # The writer (and each restart of it after a crash) runs with the configuration this
        # server loaded: a snapshot of the file, removed at stop, never the file as edited since.
        self.config_snapshot = write_snapshot(config)
        self.writer = WriterProcess(
            reactor,
            writer_argv(self.config_snapshot or str(config.path), config.server.database),
        )
        self.committer = GroupCommitter(
            self.writer.run,
            batch_max=config.server.batch_max,
            max_pending=config.server.max_pending,
            on_routed=lambda destinations: self.copies_committed(destinations),
            clock=reactor,
            gather=config.server.batch_gather,
        )
        metrics.COMMIT_IN_FLIGHT.set_function(self.committer.commit_seconds)
        charsets = {f.code: f.charset for f in config.facilities}
        self.intake = Intake(
            self.committer,
            acceptance_policy(config),
            lambda facility: charsets.get(facility, "utf-8"),
            new_control_id=AckIds(),
        )
        self.mllp_factory = MLLPServerFactory(
            self.intake.receive,
            max_frame_bytes=config.server.max_frame_bytes,
            idle_timeout=config.server.idle_timeout,
            committer=self.committer,
        )
        # Routed copies go out from the outbox, in threads and on an engine of their own.
        self.delivery = DeliveryService(
            reactor,
            config.server.database,
            {f.code: f.deliver_to for f in config.facilities if f.deliver_to},
            delivery_settings(config),
            config=config,  # each copy is checked again against it just before it goes out
            # SQLite has one writer: delivery outcomes ride with the intake's next batch
            record=self.committer.record_outcomes if make_url(config.server.database).get_backend_name() == "sqlite"
            else None,
        )
        # The API reads on its own engine, in a few threads: never on the reactor.
        self.api_db = Database(reactor, config.server.database)
        self.api = API(
            self.api_db,
            TokenCache(reactor.seconds, ttl=TOKEN_CACHE_TTL, max_entries=1000),
            lambda: datetime.now(timezone.utc),
            requeued=self.delivery.requeued,
            trust=Trust.from_config(config),
            config=config,
        )
        # The workbench's pages at "/": the same thread pool and store functions as the API.
        self.workbench = Workbench(
            self.api_db,
            lambda: datetime.now(timezone.utc),
            policy=Policy.from_config(config.workbench),
            trust=Trust.from_config(config),
            requeued=self.delivery.requeued,
            reactor=reactor,
            config=config,
        )
        # Reconciliation jobs on their schedules ([server.reconcile]): a thread of their own, each run a child process.
        self.jobs = JobScheduler(config, reactor)
        # PostgreSQL: now and then, end the sessions a stopped node left holding locks (any node's).
        self.stale_sessions: LoopingCall | None = None
        self._stale_sessions_failed = False
        if make_url(config.server.database).get_backend_name() == "postgresql":
            self.stale_sessions = LoopingCall(self._end_stale_sessions)
            self.stale_sessions.clock = reactor
        self.started_at = time.monotonic()
        self.ports: list = []
        self.mllp_addresses: list[str] = []
        self.http_address: str | None = None

    def copies_committed(self, destinations) -> None:
        """Call after each committed batch that queued copies, with their destination
        codes: their delivery workers look at the outbox at once."""
        self.delivery.wake(destinations)

    def _end_stale_sessions(self) -> Deferred:
        """``db.end_stale_sessions`` in the API's thread pool: a delivery loop may be silent for a
        connect and an answer (``delivery_timeout`` each) and a poll, then ``stale_session``.
        Whatever fails is logged: the LoopingCall goes on."""
        s = self.config.server
        look = functools.partial(end_stale_sessions, stale=s.stale_session,
                                 idle=s.stale_session + 2 * s.delivery_timeout + s.delivery_poll)
        d = maybeDeferred(self.api_db.write, look)

        def ended(roles: list[str]) -> None:
            for role in roles:
                metrics.STALE_SESSIONS_ENDED.labels(role).inc()
            if roles:
                log.warn("ended {count} database session(s) of a stopped node, silent while holding locks: {roles}",
                         count=len(roles), roles=", ".join(sorted(roles)))

        def failed(f) -> None:  # e.g. a role that may not end the other nodes' sessions: said once
            if not self._stale_sessions_failed:
                log.warn("could not look for stale database sessions: {error} (said once)", error=f.type.__name__)
            self._stale_sessions_failed = True

        return d.addCallbacks(ended, failed)

    def status(self) -> dict:
        """/healthz: "unavailable" (503) after WRITER_DOWN_UNHEALTHY seconds without a working writer
        (WriterProcess.down_since: it keeps dying, nothing is acknowledged), "stalled" (503) while
        one commit has taken COMMIT_STALLED seconds or more (the writer waits on a lock or on a
        database that stopped answering: nothing is acknowledged meanwhile), "failing" (503) for
        UNANSWERED_FAILING seconds after a message could not be committed unless one has been since
        (a SQLite database another process holds locked: each commit gives up after 5 s), else "ok"."""
        down = self.writer.down_since
        commit, unanswered = self.committer.commit_seconds(), self.committer.unanswered_seconds()
        free = disk_free_bytes(self.config.server.database)
        short = free is not None and free < self.config.server.max_frame_bytes
        return {
            "status": health(down, self.reactor.seconds(), commit, unanswered, short),
            # running: proved itself; commit_seconds: how long the commit in flight has taken;
            # unanswered_seconds: since a message last got no ACK, none committed since (else null)
            "writer": {"running": down is None, "restarts": self.writer.restarts, "commit_seconds": round(commit, 1),
                       "unanswered_seconds": None if unanswered is None else round(unanswered, 1)},
            "database": make_url(self.config.server.database).get_backend_name(),
            "disk_free_bytes": free,  # SQLite: room left beside the database file (null on PostgreSQL)
            "mllp": self.mllp_addresses,
            "connections": len(self.mllp_factory.connections),
            "pending": self.committer.pending,
            "uptime_seconds": round(time.monotonic() - self.started_at, 1),
        }

    @inlineCallbacks
    def startService(self):
        super().startService()
        self.writer.start()
        self.api_db.start()
        # Every endpoint is bound before anything else starts or is announced: one that cannot
        # be (a port in use) stops the start, and stopService closes those already bound.
        for description in self.config.server.mllp:
            port = yield server_endpoint(self.reactor, description).listen(self.mllp_factory)
            self.ports.append(port)
            self.mllp_addresses.append(_describe(port))
        port = yield server_endpoint(self.reactor, self.config.server.http).listen(
            build_site(self.status, self.api.resource(), self.workbench.resource())
        )
        self.ports.append(port)
        self.http_address = _describe(port)
        for address in self.mllp_addresses:
            self.announce(f"exchange: MLLP listening on {address}")
        self.delivery.startService()
        self.announce(f"exchange: HTTP on http://{self.http_address} (/healthz, /metrics, /api)")
        self.announce(
            "exchange: the API takes a bearer token: exchange token create NAME --role technician|admin"
        )
        scheme = "https" if self.config.server.http.lstrip().startswith("ssl:") else "http"
        self.announce(
            f"exchange: workbench: {scheme}://{self.http_address}/ (log in there; create a login with: "
            "exchange user add NAME --role admin)"
        )
        self.jobs.start()
        if self.stale_sessions is not None:
            self.stale_sessions.start(min(STALE_SESSION_CHECK, self.config.server.stale_session / 4), now=False)

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        if self.stale_sessions is not None and self.stale_sessions.running:
            self.stale_sessions.stop()
        self.jobs.stop()  # returns at once; a run in progress is terminated
        delivery_stopped = self.delivery.stopService()
        yield DeferredList([d for d in (p.stopListening() for p in self.ports) if d is not None])
        self.mllp_factory.stop_reading()
        yield delivery_stopped  # before the writer stops: on SQLite it records their last outcomes
        yield self.committer.wait_idle()
        yield self.writer.stop()
        if self.config_snapshot is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.config_snapshot)
        self.api_db.stop()  # joins its threads: the calls in flight finish first
        log.info("exchange stopped cleanly")


STALE_SESSION_CHECK = 15.0  # seconds between two looks for stale sessions (at most a quarter of server.stale_session)
WRITER_DOWN_UNHEALTHY = 5.0  # seconds without a writer (each restart waits 1 s) before /healthz says 503
# Seconds one commit may take before /healthz says 503 "stalled". A busy batch commits in
# milliseconds, the largest (MAX_BATCH_BYTES of documents) in about a second; a PostgreSQL
# writer behind a lock held by a node stopped mid-batch waits up to IDLE_IN_TRANSACTION_MS.
COMMIT_STALLED = 30.0
# Seconds /healthz says 503 "failing" after a message could not be committed (no ACK sent), unless
# one has committed since. Senders resend unanswered messages within seconds, so a database that
# keeps failing keeps it there; one failure and no traffic after it is forgotten.
UNANSWERED_FAILING = 30.0


def health(writer_down_since: float | None, now: float, commit_seconds: float = 0.0,
           unanswered_seconds: float | None = None, disk_short: bool = False) -> str:
    """"unavailable" once the writer has been down (``WriterProcess.down_since``) for
    WRITER_DOWN_UNHEALTHY seconds, "stalled" while the commit in flight has taken COMMIT_STALLED
    seconds or more, "disk_full" while the SQLite database's disk has less room than the
    largest message accepted (``disk_short``), "failing" within UNANSWERED_FAILING seconds of
    a message that could not be committed (``GroupCommitter.unanswered_seconds``; None: one has
    committed since), else "ok"."""
    if writer_down_since is not None and now - writer_down_since >= WRITER_DOWN_UNHEALTHY:
        return "unavailable"
    if commit_seconds >= COMMIT_STALLED:
        return "stalled"
    if disk_short:
        return "disk_full"
    if unanswered_seconds is not None and unanswered_seconds < UNANSWERED_FAILING:
        return "failing"
    return "ok"


def _describe(port) -> str:
    host = port.getHost()
    return f"{host.host}:{host.port}" if hasattr(host, "port") else str(host)
