"""What an ADT costs for a patient with a long history (a script, not a test).

A home-health patient gets a visit note most days, a nursing-home resident
years of progress notes: an update for them must not cost more than one for
a new patient. For each history size, on a fresh database (SQLite by
default, as the server: WAL, synchronous=FULL), one patient is given N
documents (MDM^T02, ``--kind text``: 30 lines each, or ``pdf``: a 200 KB PDF
in Base64), then 200 ADT^A01/A04/A08 for that patient, each a batch of its
own through the writer's own batch runner (``exchange.writer.make_batch_runner``:
store, map, match, route, commit), and the median and p90 ms per ADT are
printed. The baseline is the same run's smallest history (1 document).

    .venv/bin/python bench/history.py                           # 1, 100, 400 text notes
    .venv/bin/python bench/history.py --documents 1,100 --kind pdf
    .venv/bin/python bench/history.py --database postgresql     # a database created and dropped on the local server

Synthetic data only (bench.intake.messages).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.intake.messages import generate, generate_mdm_pdf, generate_mdm_text  # noqa: E402
from bench.intake.runner import TargetSkipped, create_pg_database, write_config  # noqa: E402
from exchange.acceptance import Outcome, Verdict  # noqa: E402
from exchange.config import facility_contexts, load_config  # noqa: E402
from exchange.hl7.header import read_header  # noqa: E402
from exchange.intake import AckIds, utc_now  # noqa: E402
from exchange.pipeline import AckSettings, Received  # noqa: E402
from exchange.store.db import make_engine  # noqa: E402
from exchange.writer import make_batch_runner  # noqa: E402

UPDATES = 200


def received(frames) -> list[Received]:
    out = []
    for frame, _control_id in frames:
        payload = frame[1:-2]  # unframed
        out.append(Received(payload, read_header(payload), Outcome(Verdict.ACCEPT), utc_now(), "bench"))
    return out


def measure(url: str, documents: int, kind: str, workdir: Path) -> list[float]:
    config_path = write_config(workdir, 1, 2)
    subprocess.run([sys.executable, "-m", "exchange.cli", "db", "upgrade", "--config", str(config_path),
                    "--database", url], check=True, capture_output=True)
    config = load_config(str(config_path), database=url)
    engine = make_engine(url, pool_pre_ping=False)
    try:
        run = make_batch_runner(engine, facilities=facility_contexts(config), routing=config,
                                new_control_id=AckIds(tag="W"),
                                settings=AckSettings(config.server.application, config.server.facility_name))
        tag = os.urandom(3).hex()
        history = (generate_mdm_pdf if kind == "pdf" else generate_mdm_text)(documents, f"H{tag}", prefix="T",
                                                                             patients=1)
        for i in range(0, len(history), 8):
            run(received(history[i:i + 8]))
        updates = generate(UPDATES, f"U{tag}", prefix="T", patients=1)  # prefix T: the same patient
        times = []
        for item in received(updates):
            start = time.perf_counter()
            (answer,) = run([item])
            times.append((time.perf_counter() - start) * 1000)
            if answer.ack_code != "AA":
                raise SystemExit(f"an update was answered {answer.ack_code}")
        return times
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", default="1,100,400", help="history sizes, comma-separated (default 1,100,400)")
    parser.add_argument("--kind", choices=("text", "pdf"), default="text")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    sizes = [int(n) for n in args.documents.split(",")]
    print(f"one ADT (a batch of its own) for a patient with N {args.kind} documents, {UPDATES} updates each; "
          f"{args.database}", flush=True)
    baseline = None
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
            workdir = Path(tmp)
            drop = None
            if args.database == "sqlite":
                url = f"sqlite:///{workdir / 'history.db'}"
            else:
                try:
                    url, drop, _backends = create_pg_database()
                except TargetSkipped as exc:
                    print(f"postgresql skipped: {exc}")
                    return 0
            try:
                times = sorted(measure(url, n, args.kind, workdir))
            finally:
                if drop is not None:
                    drop()
        median, p90 = statistics.median(times), times[int(len(times) * 0.9)]
        baseline = baseline or median
        print(f"  {n:>5} documents: median {median:6.2f} ms, p90 {p90:6.2f} ms  ({median / baseline:.1f}x the "
              f"{sizes[0]}-document median)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
