"""Group-commit throughput of the message store (a script, not a test).

Stores N synthetic ADT messages the way the intake's writer thread does: per
batch one transaction (``write_transaction``) holding the dedup look-up
(``find_prior``) and the insert (``insert_messages``: message + history rows),
then COMMIT. Prints messages per second for each backend and batch size.

    .venv/bin/python bench/store_batch.py
    .venv/bin/python bench/store_batch.py -n 50000 --batch 1 8 100 300 --backend sqlite

SQLite: a file in a fresh temporary directory (WAL, synchronous=FULL).
PostgreSQL: a database created for the run on EXCHANGE_TEST_POSTGRES (default
the local server) and dropped afterwards; skipped if unreachable.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from exchange.outcome import MessageState  # noqa: E402
from exchange.store.db import make_engine, upgrade, write_transaction  # noqa: E402
from exchange.store.messages import NewMessage, find_prior, insert_messages  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
ADT = (
    "MSH|^~\\&|ADT1|NORTH|EXCHANGE|HUB|20260101120000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
    "EVN|A01|20260101120000\r"
    "PID|1||{n}^^^NORTH^MR||DOE^JANE^Q||19800101|F|||1 MAIN ST^^SPRINGFIELD^IL^62701||555-0100\r"
    "PV1|1|I|W1^101^A^NORTH||||1234^SMITH^JOHN|||MED||||ADM|||||V{n}|||||||||||||||||||||||||20260101120000\r"
    "NK1|1|DOE^JOHN|SPO|1 MAIN ST^^SPRINGFIELD^IL^62701|555-0101\r"
    "AL1|1|DA|PCN^PENICILLIN|SV|HIVES\r"
    "DG1|1||I10^Essential hypertension^I10|||A\r"
)
ACK = "MSH|^~\\&|EXCHANGE|HUB|ADT1|NORTH|20260101120000||ACK^A01^ACK|X{n:06d}|P|2.5.1\rMSA|AA|{cid}\r"


def messages(count: int, run: str) -> list[NewMessage]:
    out = []
    for n in range(count):
        cid = f"{run}-{n:07d}"
        out.append(
            NewMessage(
                raw=ADT.format(cid=cid, n=n).encode(),
                received_at=T0 + timedelta(microseconds=n),
                facility="NORTH",
                control_id=cid,
                sending_application="ADT1",
                message_type="ADT",
                event="A01",
                structure="ADT_A01",
                version="2.5.1",
                processing_id="P",
                state=MessageState.ACCEPTED,
                ack_code="AA",
                ack=ACK.format(cid=cid, n=n).encode(),
                reason=None,
                peer="127.0.0.1:50000",
                dedup=True,
            )
        )
    return out


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="exchange-bench-") as tmp:
        yield f"sqlite:///{tmp}/bench.db"


@contextmanager
def postgresql_url() -> Iterator[str]:
    admin_url = make_url(
        os.environ.get("EXCHANGE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    )
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"exchange_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run(url: str, count: int, batch: int, lookup: bool) -> tuple[float, float]:
    """(messages per second, 99th percentile commit latency in ms)."""
    engine = make_engine(url)
    try:
        upgrade(engine)
        rows = messages(count, f"B{batch}")
        latencies = []
        started = time.perf_counter()
        for start in range(0, count, batch):
            chunk = rows[start : start + batch]
            t = time.perf_counter()
            # /* TRANSACTION: one batch: dedup look-up, messages + history rows. */
            with write_transaction(engine) as conn:
                if lookup:
                    prior = find_prior(conn, [(m.facility, m.control_id) for m in chunk])  # type: ignore[misc]
                    assert not prior
                insert_messages(conn, chunk)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        latencies.sort()
        return count / elapsed, latencies[int(len(latencies) * 0.99) - 1] * 1000
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--count", type=int, default=20_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 100])
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--no-lookup", action="store_true", help="inserts only, no find_prior")
    args = parser.parse_args()

    print(f"{args.count} messages per run, {'insert only' if args.no_lookup else 'find_prior + insert'}, commit per batch")
    for backend in args.backend:
        provider = sqlite_url if backend == "sqlite" else postgresql_url
        for batch in args.batch:
            try:
                with provider() as url:
                    rate, p99 = run(url, args.count, batch, not args.no_lookup)
            except OperationalError as exc:
                print(f"{backend:<10} skipped: {str(exc).splitlines()[0]}")
                break
            print(f"{backend:<10} batch {batch:>4}: {rate:>8,.0f} msg/s   p99 commit {p99:6.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
