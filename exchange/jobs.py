"""Reconciliation jobs: upkeep and checks that run off the hot path.

    exchange reconcile [JOB]     runs one job (or all) now and prints its report;
                                 exit 1 when a job found errors
    exchange serve               runs each job on its schedule ([server.reconcile]):
                                 JobScheduler, below

A job is a function ``(engine, config, now) -> Report``: it owns its
transactions (the engine is the job's own), and its report holds lines for
an operator and the number of errors found. Reports hold counts, ids,
facility codes and model weights: never names, birth dates, identifiers or
message text (they go to the log).

Jobs (``JOBS``, in the order ``exchange reconcile`` runs them):

``consistency``  what should never be in the database: records whose person
                 does not exist or was merged away, merge chains that do not
                 end at a live person, blocking keys of inactive records,
                 active records without stored features (not matchable),
                 open reviews about records that no longer exist, persons
                 holding both records of an active sticky not-a-match pair
                 (merged or linked across it; inactive records count too),
                 copies queued for a facility that is not configured to
                 receive them. Each problem counts as an error.
``match-model``  re-estimates the matching model by EM from the index and
                 stores it (exchange.store.training); too little data keeps
                 the current model (not an error), a degenerate estimate is
                 refused (an error).
``links``        holds every automatic link up against the rules the index
                 decides with now (the stored model, this release's family
                 rules): a link it would not make now gets a ``link_looks_wrong``
                 review (exchange.store.reviews.recheck_links). A review is
                 a technician's work, not an error: the report counts them.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, text
from twisted.logger import Logger

from exchange.config import RECONCILE_JOBS, Config, Schedule, write_snapshot
from exchange.store.db import try_share_rebuild, unshare_rebuild
from exchange.store.outbox import DeliveryState
from exchange.store.reviews import ReviewState
from exchange.store.schema import MAX_MERGE_HOPS

log = Logger()

SHOWN_IDS = 20  # ids listed per problem (the count is always complete)


@dataclass(frozen=True, slots=True)
class Report:
    job: str
    lines: tuple[str, ...]
    errors: int  # problems found (0: all well)
    seconds: float = 0.0
    skipped: str = ""  # why the job did not run ("": it ran)

    def summary(self) -> str:
        if self.skipped:
            return f"{self.job}: skipped ({self.skipped})"
        verdict = "ok" if not self.errors else f"{self.errors} error{'s' if self.errors != 1 else ''}"
        return f"{self.job}: {verdict} ({self.seconds:.1f} s)"


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    summary: str  # one line for --help
    run: Callable[[Engine, Config, datetime], Report]


# --- consistency --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    what: str  # "records whose person does not exist"
    count: int
    ids: tuple[int | str, ...] = ()  # the first SHOWN_IDS
    id_kind: str = "ids"  # what the ids are ("record ids", "review ids", ...)
    error: bool = True  # False: worth knowing, not a problem

    def line(self) -> str:
        if not self.count:
            return f"{self.what}: 0"
        shown = ", ".join(str(i) for i in self.ids)
        more = ", ..." if self.count > len(self.ids) and len(self.ids) == SHOWN_IDS else ""
        tag = "" if self.error else " (not an error)"
        return f"{self.what}: {self.count:,}{tag} ({self.id_kind} {shown}{more})"


def _found(conn: Connection, what: str, id_kind: str, where_sql: str, select_id: str, params=None) -> Finding:
    """A Finding from ``FROM ... WHERE ...`` (``where_sql``): the count and the first ids."""
    params = params or {}
    count = conn.execute(text(f"SELECT count(*) {where_sql}"), params).scalar_one()
    ids: tuple = ()
    if count:
        ids = tuple(r[0] for r in conn.execute(
            text(f"SELECT {select_id} {where_sql} ORDER BY 1 LIMIT {SHOWN_IDS}"), params))
    return Finding(what, int(count), ids, id_kind)


def consistency_findings(conn: Connection, config: Config) -> list[Finding]:
    """Every check of the ``consistency`` job, in one transaction (a snapshot)."""
    out = [
        _found(conn, "records whose person does not exist", "record ids",
               "FROM patient_record r LEFT JOIN person p ON p.id = r.person_id WHERE p.id IS NULL", "r.id"),
        _found(conn, "records linked to a person merged into another", "record ids",
               "FROM patient_record r JOIN person p ON p.id = r.person_id WHERE p.merged_into IS NOT NULL", "r.id"),
    ]
    out += _merge_chains(conn)
    out += [
        _found(conn, "blocking keys (record_key rows) of inactive records", "record ids",
               "FROM record_key k JOIN patient_record r ON r.id = k.record_id WHERE NOT r.active",
               "DISTINCT k.record_id"),
        _found(conn, "active records without stored matching features (not candidates; exchange replay "
                     "recomputes them)", "record ids",
               "FROM patient_record r WHERE r.active AND r.features IS NULL", "r.id"),
        _found(conn, "open reviews about a record that no longer exists", "review ids",
               "FROM match_review v LEFT JOIN patient_record r ON r.facility = v.facility AND r.mrn = v.mrn "
               "WHERE v.state = :open AND r.id IS NULL", "v.id", {"open": ReviewState.OPEN.value}),
        _found(conn, "persons holding both records of an active not-a-match pair", "person ids",
               "FROM (SELECT DISTINCT a.person_id AS id FROM match_pair m "
               "JOIN patient_record a ON a.facility = m.facility AND a.mrn = m.mrn "
               "JOIN patient_record b ON b.facility = m.other_facility AND b.mrn = m.other_mrn "
               "WHERE m.active AND a.person_id = b.person_id) AS s", "s.id"),
    ]
    out.append(_stranded_deliveries(conn, config))
    return out


def _merge_chains(conn: Connection) -> list[Finding]:
    """Persons merged into a person merged again (followed by the API: not an error), and
    chains that end nowhere: a person that does not exist, a cycle, more than MAX_MERGE_HOPS."""
    merged = dict(conn.execute(text("SELECT id, merged_into FROM person WHERE merged_into IS NOT NULL")).all())
    ends: dict[int, int | None] = {}  # merged person -> the live person it ends at (None: nowhere)
    for start in merged:
        seen, p = {start}, merged[start]
        while p in merged and len(seen) <= MAX_MERGE_HOPS:
            if p in seen:
                p = None  # a cycle
                break
            seen.add(p)
            p = merged[p]
        ends[start] = None if p is None or p in merged else p
    targets = sorted({p for p in ends.values() if p is not None})
    live: set[int] = set()
    for i in range(0, len(targets), 500):
        chunk = targets[i:i + 500]
        live |= {r[0] for r in conn.execute(text(f"SELECT id FROM person WHERE id IN ({', '.join(map(str, chunk))})"))}
    broken = sorted(p for p, end in ends.items() if end is None or end not in live)
    chained = sorted(p for p, into in merged.items() if into in merged and p not in broken)
    return [
        Finding("persons merged into a person that was merged again", len(chained), tuple(chained[:SHOWN_IDS]),
                "person ids", error=False),
        Finding(f"merged persons whose merges do not end at a live person (missing, a cycle, or over "
                f"{MAX_MERGE_HOPS} merges)", len(broken), tuple(broken[:SHOWN_IDS]), "person ids"),
    ]


def _stranded_deliveries(conn: Connection, config: Config) -> Finding:
    """Queued copies whose destination is not a configured facility with deliver_to: nobody sends them."""
    receiving = {f.code for f in config.facilities if f.deliver_to}
    rows = conn.execute(text("SELECT destination, count(*) FROM delivery WHERE state = :queued GROUP BY destination"),
                        {"queued": DeliveryState.QUEUED.value}).all()
    stranded = sorted((dest, n) for dest, n in rows if dest not in receiving)
    count = sum(n for _, n in stranded)
    shown = tuple(f"{dest} {n:,}" for dest, n in stranded[:SHOWN_IDS])
    return Finding("copies queued for a facility not configured to receive them (deliver_to)", count, shown,
                   "destination and copies:")


def consistency(engine: Engine, config: Config, now: datetime) -> Report:
    t0 = time.monotonic()
    # /* TRANSACTION: read only; one snapshot for every check. */
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            findings = consistency_findings(conn, config)
    errors = sum(f.count for f in findings if f.error)
    return Report("consistency", tuple(f.line() for f in findings), errors, time.monotonic() - t0)


# --- match-model -------------------------------------------------------------------------------------


def match_model(engine: Engine, config: Config, now: datetime) -> Report:
    from exchange.store.training import train

    t0 = time.monotonic()
    report = train(engine, now)
    return Report("match-model", tuple(report.lines()), report.errors, time.monotonic() - t0)


# --- links ---------------------------------------------------------------------------------------------


def links(engine: Engine, config: Config, now: datetime) -> Report:
    from exchange.store.db import write_transaction
    from exchange.store.reviews import recheck_links

    t0 = time.monotonic()
    # /* TRANSACTION: the automatic links read and the reviews opened for them, at once. */
    with write_transaction(engine) as conn:
        check = recheck_links(conn, now)
    opened = Finding("automatic links the patient index would not make now (a link_looks_wrong review opened)",
                     len(check.opened), check.opened[:SHOWN_IDS], "review ids", error=False)
    lines = (f"automatic links checked: {check.checked:,}", opened.line(),
             f"such links with an open review already: {check.in_review:,}")
    return Report("links", lines, 0, time.monotonic() - t0)  # reviews are technicians' work, not errors


REPLAYING = "exchange replay is rebuilding the record model: skipped (run it again after the replay)"


def _try_lock(conn: Connection, key: str) -> bool:
    """PostgreSQL: this session's advisory lock on ``key`` (a job's name), if no other session holds it."""
    return bool(conn.exec_driver_sql("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).scalar())


def _unlock(conn: Connection, key: str) -> None:
    conn.exec_driver_sql("SELECT pg_advisory_unlock(hashtext(%s))", (key,))


def one_node(name: str, fn: Callable[[Engine, Config, datetime], Report]) -> Callable[[Engine, Config, datetime], Report]:
    """PostgreSQL: every node schedules the jobs; a run starts only where the job's
    session advisory lock can be had, so two nodes never run one job at once (the
    other skips, says so and finds nothing). And never while ``exchange replay``
    rebuilds the record model: the run shares the rebuild lock (``db.REBUILD_LOCK``)
    until it ends, or skips and says so when a replay holds it (its TRUNCATE would
    show the run's snapshot empty tables). SQLite: one node, no lock; a run's
    snapshot never sees a replay before its commit."""

    def run(engine: Engine, config: Config, now: datetime) -> Report:
        if engine.dialect.name != "postgresql":
            return fn(engine, config, now)
        with engine.connect() as conn:
            key = f"exchange reconcile {name}"
            if not _try_lock(conn, key):
                return Report(name, ("another node is running it: skipped",), 0, 0.0, "another node is running it")
            try:
                if not try_share_rebuild(conn):
                    return Report(name, (REPLAYING,), 0, 0.0, "exchange replay is running")
                conn.commit()
                try:
                    return fn(engine, config, now)
                finally:
                    unshare_rebuild(conn)
            finally:
                _unlock(conn, key)
                conn.commit()

    return run


JOBS: dict[str, Job] = {
    "consistency": Job("consistency", "checks that find what should never be in the database",
                       one_node("consistency", consistency)),
    "match-model": Job("match-model", "re-estimates the matching model (EM) from the index and stores it",
                       one_node("match-model", match_model)),
    "links": Job("links", "opens a review for every automatic link the patient index would not make now",
                 one_node("links", links)),
}
assert tuple(JOBS) == RECONCILE_JOBS  # exchange.config validates [server.reconcile] against these names


# --- scheduling in `exchange serve` ----------------------------------------------------------------------


class JobScheduler:
    """Runs each job on its schedule while the exchange serves (``[server.reconcile]``).

    APScheduler's BackgroundScheduler keeps the time in a thread of its own
    and runs the jobs, one at a time, in one worker thread: never on the
    reactor thread. Each run is a child process (``exchange reconcile JOB``),
    so that reading a large index neither holds the GIL against the reactor
    nor keeps its memory afterwards; its report goes to the log (the jobs'
    reports hold no patient data): the summary at info level, the details
    at debug level, or all of it at warn level when the job found errors. A run still going at shutdown is
    terminated: a job stores what it stores in one transaction at its end,
    so nothing is left half done. Runs that were missed while the exchange
    was down are not caught up (coalesced into the next one).
    """

    def __init__(self, config: Config, reactor, *, emit: Callable[[str, str], None] | None = None,
                 timeout: float = 6 * 3600) -> None:
        self.config = config
        self.reactor = reactor
        self.timeout = timeout
        self.emit = emit or self._log  # (level, line), called from the worker thread
        self.scheduler = None
        self._child: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._config_path: str | None = None
        self._engine = None  # PostgreSQL: the schedule locks' connections (scheduled)

    def start(self) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        # The jobs run with the configuration this server runs, not whatever the file says
        # by then: a copy taken now (private to this user), removed at stop.
        self._config_path = write_snapshot(self.config)

        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        )
        for name, schedule in self.config.server.reconcile:
            trigger = _trigger(schedule)
            if trigger is not None:
                self.scheduler.add_job(self.scheduled, trigger, args=[name, _period(schedule)], id=name, name=name)
        self.scheduler.start()

    def stop(self) -> None:
        """Stop scheduling, terminate a run in progress; returns at once."""
        self._stopping.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self._config_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._config_path)
        if self._engine is not None:
            self._engine.dispose()  # a held schedule lock goes with its session

    def scheduled(self, name: str, period: float) -> int | None:
        """A scheduled run. PostgreSQL, several nodes: every node's timer fires once a period
        (each at its own phase), and the job must run once: the node that starts it keeps the
        job's schedule lock for most of the period, so the others skip (and say so). A failure
        (the database gone while the lock is taken) is logged as its type alone: APScheduler
        would log its traceback, whose text quotes SQL and its parameters."""
        try:
            return self._scheduled(name, period)
        except Exception as exc:  # noqa: BLE001 - the next period tries again
            self.emit("error", f"reconcile {name}: not run ({type(exc).__name__})")
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
            return None

    def _scheduled(self, name: str, period: float) -> int | None:
        if not self.config.server.database.startswith("postgresql"):
            return self.run(name)
        from exchange.store.db import make_engine

        if self._engine is None:
            self._engine = make_engine(self.config.server.database)
        key = f"exchange reconcile schedule {name}"
        with self._engine.connect() as conn:
            if not _try_lock(conn, key):
                conn.commit()
                self.emit("info", f"reconcile {name}: skipped (another node runs it this period)")
                return None
            conn.commit()
            started = time.monotonic()
            try:
                return self.run(name)
            finally:
                self._stopping.wait(max(0.0, started + period * SCHEDULE_HOLD - time.monotonic()))
                _unlock(conn, key)
                conn.commit()

    def run(self, name: str) -> int | None:
        """One run of a job as a child process (the worker thread); its exit code, None if cut short."""
        if self._stopping.is_set():
            return None
        argv = [sys.executable, "-m", "exchange.cli", "reconcile", name,
                "--config", self._config_path or str(self.config.path), "--database", self.config.server.database]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.monotonic()
        try:
            self._child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           stdin=subprocess.DEVNULL, env=env)
            output, _ = self._child.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.communicate()
            self.emit("error", f"reconcile {name}: stopped after {self.timeout:.0f} s")
            return None
        finally:
            child, self._child = self._child, None
        code = child.returncode
        if self._stopping.is_set() and code not in (0, 1):
            return None  # terminated by the shutdown
        level = {0: "info", 1: "warn"}.get(code, "error")
        for line in output.splitlines():  # "consistency: ok (0.1 s)", then the report's lines
            if line.startswith(f"{name}:"):
                self.emit(level, f"reconcile {line}")
            elif line.strip():  # the details of a clean run only at debug level
                self.emit("debug" if code == 0 else level, f"reconcile {name}: {line.strip()}")
        if code not in (0, 1):
            self.emit("error", f"reconcile {name}: exited {code} after {time.monotonic() - t0:.1f} s")
        return code

    def _log(self, level: str, line: str) -> None:
        self.reactor.callFromThread(getattr(log, level), "{line}", line=line)


SCHEDULE_HOLD = 0.9  # of a period: how long the node that ran a job keeps the others from running it


def _period(schedule: Schedule) -> float:
    """Seconds between two runs: an interval's; a cron expression's at least a minute apart."""
    return schedule.seconds if schedule.seconds is not None else 60.0


def _trigger(schedule: Schedule):
    if schedule.off:
        return None
    if schedule.seconds is not None:
        from apscheduler.triggers.interval import IntervalTrigger

        return IntervalTrigger(seconds=schedule.seconds)
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(schedule.cron)
