"""What the record model costs the writer (a script, not a test).

Drives ``exchange.pipeline.process_batch`` the way the intake's writer does
(one transaction per batch, default 4 messages) over synthetic ADT
(bench.intake.messages.generate), once without the record model and once
with it (``facilities=``: load, map, apply, save), each on a fresh database.
Prints ms per batch, messages per second and the extra ms per batch the
record model costs, and the patient index on top of it (``models=``), for
SQLite and PostgreSQL.

    .venv/bin/python bench/records.py
    .venv/bin/python bench/records.py -n 8000 --batch 4 --backend sqlite --profile

SQLite: a file in a fresh temporary directory (as the server: WAL,
synchronous=FULL). PostgreSQL: a database created for the run on
EXCHANGE_TEST_POSTGRES (default the local server) and dropped afterwards;
skipped if unreachable.
"""
from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, event, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from bench.intake.messages import FACILITY, generate  # noqa: E402
from exchange.acceptance import AcceptancePolicy, FacilityRule, accept  # noqa: E402
from exchange.hl7.header import read_header  # noqa: E402
from exchange.mapping.events import FacilityContext  # noqa: E402
from exchange.pipeline import Received, process_batch  # noqa: E402
from exchange.store.db import make_engine, upgrade, write_transaction  # noqa: E402
from exchange.store.index import ModelCache  # noqa: E402

POLICY = AcceptancePolicy({FACILITY: FacilityRule(FACILITY)})
FACILITIES = {FACILITY: FacilityContext(FACILITY, FACILITY)}


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        yield f"sqlite:///{tmp}/records.db"


@contextmanager
def postgres_url() -> Iterator[str | None]:
    base = os.environ.get("EXCHANGE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    name = "bench_records_" + uuid.uuid4().hex[:8]
    admin = create_engine(base, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        print(f"postgresql: skipped ({exc.orig})", file=sys.stderr)
        yield None
        return
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def received(count: int) -> list[Received]:
    now = datetime.now(timezone.utc)
    out = []
    for frame, _ in generate(count, run_id="r%05d" % (time.time_ns() % 100000)):
        raw = frame[1:-2]
        header = read_header(raw)
        out.append(Received(raw, header, accept(header, POLICY), now, "127.0.0.1:1"))
    return out


def measure(url: str, items: list[Received], batch: int, facilities, profile: bool, models=None) -> dict:
    upgrade(url)
    engine = make_engine(url, pool_pre_ping=False)
    statements = itertools.count()
    event.listen(engine, "before_cursor_execute", lambda *a: next(statements))
    ids = itertools.count()
    now = lambda: datetime.now(timezone.utc)  # noqa: E731

    def run(part: list[Received]) -> None:
        for i in range(0, len(part), batch):
            with write_transaction(engine) as conn:
                process_batch(conn, part[i:i + batch], new_control_id=lambda: f"B{next(ids)}", now=now,
                              facilities=facilities, models=models)

    warm = len(items) // 10
    run(items[:warm])
    timed = items[warm:]
    profiler = cProfile.Profile() if profile else None
    before = next(statements)
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    run(timed)
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - start
    batches = -(-len(timed) // batch)
    engine.dispose()
    if profiler:
        pstats.Stats(profiler).sort_stats(os.environ.get("BENCH_SORT", "tottime")).print_stats(int(os.environ.get("BENCH_ROWS", "20")))
    return {"ms_per_batch": elapsed / batches * 1000, "msgs_per_s": len(timed) / elapsed,
            "statements_per_batch": (next(statements) - before - 1) / batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=8000, help="messages per run (default 8000)")
    parser.add_argument("--batch", type=int, default=4, help="messages per transaction (default 4)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--profile", action="store_true", help="cProfile one run (--profile-mode)")
    parser.add_argument("--profile-mode", default="+index", choices=("with", "+index"),
                        help="the run to profile: record model only, or with the patient index (default)")
    args = parser.parse_args()
    items = received(args.n)
    backends = {"sqlite": sqlite_url, "postgresql": postgres_url}
    for name, make_url_ in backends.items():
        if args.backend not in (name, "both"):
            continue
        results = {}
        for label, facilities, models in (("without", None, None), ("with", FACILITIES, None),
                                          ("+index", FACILITIES, ModelCache())):
            with make_url_() as url:
                if url is None:
                    break
                results[label] = measure(url, items, args.batch, facilities, args.profile and label == args.profile_mode,
                                         models)
        if len(results) < 3:
            continue
        for label, r in results.items():
            print(f"{name:10} {label:7} record model: {r['ms_per_batch']:6.3f} ms per batch of {args.batch}, "
                  f"{r['msgs_per_s']:7.0f} msg/s, {r['statements_per_batch']:5.1f} SQLAlchemy-level statements per batch (driver-level ones not counted)")
        extra = results["with"]["ms_per_batch"] - results["without"]["ms_per_batch"]
        index = results["+index"]["ms_per_batch"] - results["with"]["ms_per_batch"]
        print(f"{name:10} record model costs {extra:+.3f} ms per batch, the patient index {index:+.3f} ms more")


if __name__ == "__main__":
    main()
