"""Re-estimating the matching model from the live index (issue 4: "m and u
estimated from the data by EM and stored").

    train(engine, now) -> TrainingReport         (a reconciliation job: exchange.jobs)
      read, one snapshot ..... candidate pairs: records sharing a ``dob``, ``fg`` or
                               ``ssn`` key in record_key (a sample of at most
                               MAX_SESSION_PAIRS per kind); every active record's
                               stored features (patient_record.features): the name
                               frequencies, a random sample of records, the pairs'
                               features
      estimate, no database .. as exchange.matching says: tf tables of the names,
                               u from random pairs, m per kind of key by EM
                               (estimate_by_sessions), thresholds kept from the
                               current model; no partial agreement may weigh
                               more than an exact one (``monotone``)
      guard .................. the new and the current model decide a sample of
                               candidate pairs and of random pairs; a degenerate
                               estimate is refused (see ``_degenerate``)
      store .................. one match_model row; the writer's ModelCache picks
                               it up within a minute

Too little data (fewer than MIN_RECORDS records, no kind of key with
MIN_SESSION_PAIRS pairs) keeps the current model and is not an error: a
young index has nothing to learn from yet. A degenerate estimate keeps it
too, and is an error (the report says why).

Nothing here logs or reports patient data: counts, kinds of key and model
weights only. Reading a million records takes a while (tens of seconds):
never on the reactor thread; ``stopping`` is asked between rows so that a
shutdown does not wait for the job.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, Engine, insert, select, text

from exchange.matching.compare import Level
from exchange.matching.features import KEY_FIELDS, Features, decode_features
from exchange.matching.model import (
    Model,
    default_model,
    estimate_by_sessions,
    estimate_u,
    level_counts,
    sample_random_pairs,
    score,
    term_frequencies,
)
from exchange.store.db import write_transaction
from exchange.store.index import STOP_KEY
from exchange.store.schema import match_model_table

SESSIONS = ("dob", "fg", "ssn")
"""Kinds of blocking key whose pairs EM learns m from (KEY_FIELDS says which fields each fixes)."""
MIN_RECORDS = 1000  # fewer active records with features: keep the current model
MIN_SESSION_PAIRS = 100  # a kind of key with fewer pairs is left out; none left: keep the current model
MAX_SESSION_PAIRS = 50_000  # pairs sampled per kind of key
SAMPLE_RECORDS = 20_000  # records drawn at random (reservoir) for u
RANDOM_PAIRS = 100_000  # random pairs of those for u
GUARD_PAIRS = 20_000  # candidate pairs both models decide (the guard)
GUARD_RANDOM_PAIRS = 10_000  # random pairs the new model must not link
MAX_RANDOM_LINKED = 0.001  # share of random pairs the new model may link before it is refused
MAX_LINK_CHANGE = 0.5  # share of the sample's automatic links that may change (of those either model makes)
IDENTIFYING = ("family", "given", "birth", "ssn")  # an exact agreement must count for, a disagreement against


class Cancelled(Exception):
    """The job was asked to stop (the exchange is shutting down); nothing was stored."""


@dataclass
class TrainingReport:
    """What a run found and did; counts only (no patient data)."""

    records: int = 0  # active records with usable stored features
    unreadable: int = 0  # active records whose features are missing or of another version
    sampled: int = 0  # records drawn for u
    random_pairs: int = 0
    session_pairs: dict[str, int] = field(default_factory=dict)  # kind of key -> pairs EM saw
    candidate_pairs: dict[str, int] = field(default_factory=dict)  # kind of key -> pairs in the index
    kept: str | None = None  # why the current model was kept (too little data), else None
    degenerate: tuple[str, ...] = ()  # why the estimate was refused
    changes: Counter = field(default_factory=Counter)  # (current decision, new decision) -> sample pairs
    lowered: list[str] = field(default_factory=list)  # partial levels brought down to their exact level (monotone)
    random_linked: int = 0  # random pairs the new model links and the current one does not
    random_checked: int = 0
    model_id: int | None = None  # the match_model row stored
    current: str = ""  # note of the model in use before the run
    weights: dict[str, dict[str, float]] = field(default_factory=dict)  # the new model's weights (bits)
    seconds: float = 0.0

    @property
    def errors(self) -> int:
        return 1 if self.degenerate else 0

    def lines(self) -> list[str]:
        out = [f"records {self.records:,} with features ({self.unreadable:,} without usable features); "
               f"current model: {self.current or 'default'}"]
        if self.candidate_pairs:
            out.append("pairs sharing a key: " + ", ".join(
                f"{kind} {n:,} (EM saw {self.session_pairs.get(kind, 0):,})" for kind, n in self.candidate_pairs.items()
            ) + f"; random pairs {self.random_pairs:,} of {self.sampled:,} sampled records")
        if self.kept:
            out.append(f"kept the current model: {self.kept}")
            return out
        if self.changes:
            total = sum(self.changes.values())
            moved = {k: v for k, v in sorted(self.changes.items()) if k[0] != k[1]}
            out.append(f"guard: {total:,} candidate pairs decided by both models, {sum(moved.values()):,} change"
                       + (": " + ", ".join(f"{a}->{b} {n:,}" for (a, b), n in moved.items()) if moved else ""))
            out.append(f"guard: random pairs the new model links and the current does not: {self.random_linked} of "
                       f"{self.random_checked:,}")
        if self.lowered:
            out.append("no partial agreement above the exact one: " + ", ".join(self.lowered))
        for name, levels in self.weights.items():
            out.append(f"  {name:<8} " + "  ".join(f"{lv}={w:+.1f}" for lv, w in levels.items()))
        if self.degenerate:
            out.append("REFUSED, the current model is kept: " + "; ".join(self.degenerate))
        elif self.model_id is not None:
            out.append(f"stored match_model {self.model_id} (the writer uses it within a minute)")
        out.append(f"took {self.seconds:.1f} s")
        return out


def train(
    engine: Engine,
    now: datetime,
    *,
    stopping: Callable[[], bool] = lambda: False,
    min_records: int = MIN_RECORDS,
    min_session_pairs: int = MIN_SESSION_PAIRS,
    max_session_pairs: int = MAX_SESSION_PAIRS,
    sample_records: int = SAMPLE_RECORDS,
    random_pairs: int = RANDOM_PAIRS,
    seed: int = 0,
    store: bool = True,
) -> TrainingReport:
    """Estimate the model from the index and store it (unless refused, or ``store`` is false).

    ``now``: the stored row's ``created_at``. ``seed`` makes the samples
    reproducible. Raises :class:`Cancelled` when ``stopping()`` turns true.
    """
    t0 = time.monotonic()
    report = TrainingReport()
    rng = random.Random(seed)

    # /* TRANSACTION: a read-only snapshot of the index (the writer goes on meanwhile). */
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            current = _current_model(conn)
            report.current = current.note
            pairs_by_kind: dict[str, list[tuple[int, int]]] = {}
            for kind in SESSIONS:
                total = _count_pairs(conn, kind)
                report.candidate_pairs[kind] = total
                rate = min(1.0, max_session_pairs / total) if total else 0.0
                pairs_by_kind[kind] = _sample_pairs(conn, kind, rate, rng, stopping)
            wanted = {i for pairs in pairs_by_kind.values() for pair in pairs for i in pair}
            scan = _Scan(wanted, sample_records, rng, stopping)
            tf, floor = term_frequencies(scan.features(conn))  # one pass over every active record
    report.records, report.unreadable, report.sampled = scan.count, scan.unreadable, len(scan.sample)

    sessions = []
    session_pairs: list[tuple[Features, Features]] = []
    for kind, ids in pairs_by_kind.items():
        pairs = [(scan.kept[a], scan.kept[b]) for a, b in ids if a in scan.kept and b in scan.kept]
        report.session_pairs[kind] = len(pairs)
        if len(pairs) >= min_session_pairs:
            sessions.append((KEY_FIELDS[kind], level_counts(pairs)))
            session_pairs.extend(pairs)
    if report.records < min_records:
        report.kept = f"{report.records:,} records with features, at least {min_records:,} are needed"
    elif not sessions:
        report.kept = (f"no kind of key ({', '.join(SESSIONS)}) has {min_session_pairs:,} candidate pairs "
                       f"with features")
    if report.kept:
        report.seconds = time.monotonic() - t0
        return report

    start = default_model().replace(tf=tf, tf_floor=floor, upper=current.upper, lower=current.lower)
    randoms = sample_random_pairs(scan.sample, random_pairs, seed=seed + 1)
    report.random_pairs = len(randoms)
    u = estimate_u(randoms, start)
    if stopping():
        raise Cancelled()
    model, report.lowered = monotone(estimate_by_sessions(sessions, start, u=u))
    model = model.replace(note=_note(report, now))
    report.weights = {name: {str(lv): round(model.weight(name, lv), 1) for lv in levels}
                      for name, levels in model.probabilities.items()}

    guard = rng.sample(session_pairs, min(GUARD_PAIRS, len(session_pairs)))
    report.changes = compare_decisions(current, model, guard)
    checked = compare_decisions(current, model, randoms[:GUARD_RANDOM_PAIRS])
    report.random_checked = sum(checked.values())
    report.random_linked = sum(n for (was, now_), n in checked.items() if now_ == "link" and was != "link")
    report.degenerate = tuple(_degenerate(model, report))
    if stopping():
        raise Cancelled()
    if not report.degenerate and store:
        # /* TRANSACTION: one match_model row (the newest row is the model the writer uses). */
        with write_transaction(engine) as conn:
            report.model_id = conn.execute(
                insert(match_model_table).values(created_at=now, model=model.to_json(), note=model.note)
                .returning(match_model_table.c.id)
            ).scalar_one()
    report.seconds = time.monotonic() - t0
    return report


def monotone(model: Model) -> tuple[Model, list[str]]:
    """The model with no partial agreement (a nickname, one digit off, the same street)
    weighing more than its field's exact agreement, and what was lowered.

    EM over a live index overrates partial levels two ways: random pairs that are in fact
    the same person make u of the exact level too high (so its weight too low), and
    household members (twins' SSNs are one apart) look like matches to EM, which assumes
    the fields independent. Such a level's m is lowered to ``u * 2 ** exact weight``.
    """
    lowered = []
    probabilities = {}
    for name, levels in model.probabilities.items():
        levels = dict(levels)
        exact = model.weight(name, Level.EXACT) if Level.EXACT in levels else None
        for level, (m, u) in levels.items():
            if exact is not None and level not in (Level.EXACT, Level.DISAGREE) and model.weight(name, level) > exact:
                lowered.append(f"{name} {level} {model.weight(name, level):+.1f} -> {exact:+.1f}")
                levels[level] = (u * 2 ** exact, u)
        probabilities[name] = levels
    return model.replace(probabilities=probabilities), lowered


def decision(total: float, model: Model) -> str:
    """What a pair's score means under a model: link, review or none."""
    return "link" if total >= model.upper else "review" if total >= model.lower else "none"


def compare_decisions(current: Model, new: Model, pairs: list[tuple[Features, Features]]) -> Counter:
    """(current decision, new decision) -> number of pairs (the guard's table)."""
    return Counter(
        (decision(score(a, b, current).total, current), decision(score(a, b, new).total, new)) for a, b in pairs
    )


def _degenerate(model: Model, report: TrainingReport) -> Iterator[str]:
    """Why the new model must not be used, if it must not.

    - an exact agreement on a name, the birth date or the SSN that does not
      count for a match, or a disagreement that does not count against
      (EM swapped its two classes, or lost one);
    - it links random pairs (nearly all unrelated people) that the current
      model does not link;
    - it changes more than MAX_LINK_CHANGE of the automatic links the two
      models make on the sample (EM collapsed, or the data changed so much
      that a person should look first).
    """
    for name in IDENTIFYING:
        exact, disagree = model.weight(name, Level.EXACT), model.weight(name, Level.DISAGREE)
        if exact <= 0:
            yield f"an exact {name} counts {exact:+.1f} bits (must count for a match)"
        if disagree >= 0:
            yield f"a {name} that disagrees counts {disagree:+.1f} bits (must count against)"
    if report.random_checked and report.random_linked > MAX_RANDOM_LINKED * report.random_checked:
        yield (f"it links {report.random_linked} of {report.random_checked:,} random pairs the current model does "
               f"not link (at most {MAX_RANDOM_LINKED:.1%})")
    linked_by_either = sum(n for (a, b), n in report.changes.items() if "link" in (a, b))
    changed = sum(n for (a, b), n in report.changes.items() if "link" in (a, b) and a != b)
    if linked_by_either and changed > MAX_LINK_CHANGE * linked_by_either:
        yield (f"it changes {changed:,} of the {linked_by_either:,} automatic links either model makes on the "
               f"sample (at most {MAX_LINK_CHANGE:.0%})")


def _note(report: TrainingReport, now: datetime) -> str:
    pairs = ", ".join(f"{kind} {n}" for kind, n in report.session_pairs.items())
    return (f"em {now.isoformat(timespec='seconds')}: {report.records} records, pairs {pairs}, "
            f"random pairs {report.random_pairs}")


def _current_model(conn: Connection) -> Model:
    row = conn.execute(
        select(match_model_table.c.model).order_by(match_model_table.c.id.desc()).limit(1)
    ).first()
    return Model.from_json(row.model) if row is not None else default_model()


# --- reading --------------------------------------------------------------------------------------

_PAIRS_OF_KIND = """
    SELECT k.key, k.record_id FROM record_key k JOIN patient_record r ON r.id = k.record_id
    WHERE r.active AND k.key LIKE :prefix ORDER BY k.key, k.record_id
"""
_COUNT_PAIRS_OF_KIND = """
    SELECT coalesce(sum(n * (n - 1) / 2), 0) FROM (
        SELECT count(*) AS n FROM record_key k JOIN patient_record r ON r.id = k.record_id
        WHERE r.active AND k.key LIKE :prefix GROUP BY k.key HAVING count(*) BETWEEN 2 AND :stop
    ) AS per_key
"""


def _count_pairs(conn: Connection, kind: str) -> int:
    """Candidate pairs sharing a key of this kind (keys over STOP_KEY records find none, as in the writer)."""
    return int(conn.execute(text(_COUNT_PAIRS_OF_KIND), {"prefix": kind + ":%", "stop": STOP_KEY}).scalar_one())


def _sample_pairs(conn: Connection, kind: str, rate: float, rng: random.Random,
                  stopping: Callable[[], bool]) -> list[tuple[int, int]]:
    """Pairs of record ids sharing a key of this kind, each kept with probability ``rate``."""
    if rate <= 0:
        return []
    kept: set[tuple[int, int]] = set()
    group: list[int] = []
    last = None
    rows = conn.execute(text(_PAIRS_OF_KIND).execution_options(yield_per=10_000), {"prefix": kind + ":%"})
    for n, (key, record_id) in enumerate(rows):
        if key != last:
            _pairs_of(group, rate, rng, kept)
            group, last = [], key
        group.append(record_id)
        if n % 10_000 == 0 and stopping():
            raise Cancelled()
    _pairs_of(group, rate, rng, kept)
    return sorted(kept)


def _pairs_of(ids: list[int], rate: float, rng: random.Random, kept: set[tuple[int, int]]) -> None:
    if len(ids) < 2 or len(ids) > STOP_KEY:
        return
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if rate >= 1.0 or rng.random() < rate:
                kept.add((a, b) if a < b else (b, a))


class _Scan:
    """One pass over every active record's stored features: yields them (for the name
    frequencies) while keeping the wanted records' and a random sample's (reservoir)."""

    def __init__(self, wanted: set[int], size: int, rng: random.Random, stopping: Callable[[], bool]) -> None:
        self.wanted = wanted
        self.size = size
        self.rng = rng
        self.stopping = stopping
        self.kept: dict[int, Features] = {}
        self.sample: list[Features] = []
        self.count = 0
        self.unreadable = 0

    def features(self, conn: Connection) -> Iterator[Features]:
        rows = conn.execute(
            text("SELECT id, features FROM patient_record WHERE active").execution_options(yield_per=10_000)
        )
        for record_id, encoded in rows:
            if self.count % 10_000 == 0 and self.stopping():
                raise Cancelled()
            try:
                f = decode_features(encoded) if encoded else None
            except ValueError:
                f = None
            if f is None:
                self.unreadable += 1
                continue
            self.count += 1
            if record_id in self.wanted:
                self.kept[record_id] = f
            if len(self.sample) < self.size:
                self.sample.append(f)
            else:
                j = self.rng.randrange(self.count)
                if j < self.size:
                    self.sample[j] = f
            yield f


__all__ = ["Cancelled", "TrainingReport", "compare_decisions", "decision", "monotone", "train"]
