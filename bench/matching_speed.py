"""Matching cost per message at 10,000, 100,000 and 1,000,000 persons (a script, not a test).

For each size and backend: a fresh database (a temporary SQLite file, or a
PostgreSQL database created for the run), migrated, filled DIRECTLY with
an index of that many persons (executemany on SQLite, COPY on PostgreSQL):
``person``, ``patient_record`` (data, features, link) and ``record_key``
rows, built with ``exchange.matching.features`` from synthetic records (the
generator of ``bench/matching_health.py``: Zipf-like names, a regional
geography, about 20 % of persons at a second facility), then ANALYZEd --
on PostgreSQL VACUUM (ANALYZE), what autovacuum does to a database that grew
to that size (a bulk load leaves no visibility map, so every index look-up
would visit the table too; ``--no-vacuum`` measures that). Then, for a sample
of new registrations (half of them a variation of a person in the index, at
a random facility, so about a third of those are re-registrations at the
same facility that open a duplicate review; half somebody new), the
writer's own steps for a batch of one message, in a transaction that is
rolled back:

    records.load, map_message, state.apply    (the record model: not timed)
    index.plan                                (timed: candidates from record_key, decide)
    records.save                              (the record model: not timed)
    index.write                               (timed: key rows, link history, reviews)

and prints the median and p99 of plan + write in ms (targets at 1,000,000:
median <= 2 ms, p99 <= 10 ms), with where the time goes: the candidate
queries (``_read``: SQL round trips; on PostgreSQL with the key locks), scoring and deciding
(``decide``), and ``write``; and the candidates per record. Everything it
creates is deleted at the end (``--keep`` keeps the database, ``--index URL``
times against it again; ``--warm`` matches each registration once untimed
first, so that its candidates' pages are in the database's cache: a server
whose cache holds the index -- PostgreSQL's default shared_buffers, 128 MB,
holds little of a million persons' 2.4 GB, and each candidate's pages are
otherwise copied in from the operating system's cache)::

    .venv/bin/python bench/matching_speed.py                         # 10,000 and 100,000, SQLite and PostgreSQL
    .venv/bin/python bench/matching_speed.py --sizes 1000000         # about 10 min per backend here
    .venv/bin/python bench/matching_speed.py --sizes 1000000 --backends sqlite

Synthetic data only.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.intake.runner import TargetSkipped, create_pg_database  # noqa: E402
from bench.matching_health import FACILITIES, Generator, Identity, Registration, a28  # noqa: E402
from exchange.hl7.header import read_header  # noqa: E402
from exchange.mapping.events import FacilityContext, map_message, needs  # noqa: E402
from exchange.mapping.message import Message  # noqa: E402
from exchange.mapping.values import Address, Identifier, PersonName, Phone, timestamp  # noqa: E402
from exchange.matching.features import blocking_keys, encode_features, features_of  # noqa: E402
from exchange.store import index  # noqa: E402
from exchange.store import records as record_store  # noqa: E402
from exchange.store.db import make_engine, sqlite_datetime, upgrade, write_transaction  # noqa: E402
from exchange.store.messages import NewMessage, insert_messages  # noqa: E402
from exchange.outcome import MessageState  # noqa: E402

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
CHUNK = 20_000  # persons generated and inserted at a time
CONTEXTS = {code: FacilityContext(code, code) for code, _, _ in FACILITIES}


# --- the index, generated straight into the database ------------------------------------------------------


def record_of(reg: Registration) -> dict:
    """A registration as the record model holds it (what ``map_message`` + ``apply`` make of its A28)."""
    return {
        "active": True, "merged_into": None,
        "identifiers": {(reg.facility, "MR"): Identifier(value=reg.mrn, authority=reg.facility, type_code="MR")},
        "merged_identifiers": (), "previous_mrns": (),
        "name": PersonName(family=reg.family, given=reg.given, middle=reg.middle, suffix=reg.suffix, use="L"),
        "aliases": tuple(PersonName(family=a, given=reg.given, use="M") for a in reg.aliases),
        "mother_maiden_name": None,
        "birth": timestamp(reg.birth) if reg.birth else None,
        "sex": reg.sex or None,
        "addresses": (Address(street=reg.street, city=reg.city, state=reg.state, postal_code=reg.zip),),
        "phones": (Phone(number=reg.phone),) if reg.phone else None,
        "account": None, "ssn": reg.ssn or None, "death": None, "deceased": None, "encounters": {},
    }


def check_record_of(g: Generator, n: int = 200) -> None:
    """``record_of`` must give what the exchange's mapping gives (else the index would not be the real one)."""
    from exchange.mapping.state import MemoryState

    for i in range(n):
        reg = g.registration(g.identity(i), random.choice([f[0] for f in FACILITIES]))
        raw = a28(reg, i)[0][1:-2]
        header = read_header(raw)
        state = MemoryState()
        state.apply(map_message(Message(raw.decode(), header.delimiters), header, CONTEXTS[reg.facility], state), 1)
        mapped = state.records[(reg.facility, reg.mrn)]
        assert mapped == record_of(reg), (mapped, record_of(reg))


def fill(engine, persons: int, g: Generator, vacuum: bool = True) -> tuple[list, int, int]:
    """``persons`` persons (about 1.2 records each) straight into the database, then
    ANALYZE (PostgreSQL with ``vacuum``: VACUUM (ANALYZE)).

    Returns (a sample of the identities, for registrations that match someone, records, key rows)."""
    sqlite = engine.dialect.name == "sqlite"
    created = sqlite_datetime(NOW) if sqlite else NOW
    sample, records, keys = [], 0, 0
    record_id = 0
    for start in range(0, persons, CHUNK):
        person_rows, record_rows, key_rows = [], [], []
        for number in range(start, min(start + CHUNK, persons)):
            who = g.identity(number)
            if len(sample) < 5000 and g.rng.random() < 0.05:
                sample.append(who)
            person_rows.append((number + 1, created, False))
            for facility in g.rng.sample([f[0] for f in FACILITIES], 1 if g.rng.random() < 0.8 else 2):
                reg = g.registration(who, facility)
                rec = record_of(reg)
                f = features_of(rec)
                record_id += 1
                row = record_store._record_row(reg.facility, reg.mrn, rec)
                record_rows.append((
                    record_id, row["facility"], row["mrn"], row["authority"], number + 1, True, None, created, created,
                    json.dumps(row["data"]), row["family_name"], row["given_name"], row["birth_date"], row["sex"],
                    row["postcode"], row["phone"], row["ssn"], "auto", None, encode_features(f),
                ))
                key_rows.extend((k, record_id) for k in blocking_keys(f))
        records += len(record_rows)
        keys += len(key_rows)
        _insert(engine, person_rows, record_rows, key_rows)
        if sys.stdout.isatty():
            print(f"    {min(start + CHUNK, persons):>9,} persons, {records:,} records, {keys:,} keys", end="\r",
                  flush=True)
    with engine.begin() as conn:
        if not sqlite:
            for table in ("person", "patient_record"):
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                     f"(SELECT max(id) FROM {table}))")
        if sqlite or not vacuum:
            conn.exec_driver_sql("ANALYZE")
    if not sqlite and vacuum:
        # What autovacuum would have done on a database that grew to this size:
        # statistics, and the visibility map that lets the posting look-ups read
        # record_key's index alone (a bulk load leaves every page unmarked).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE)")
    return sample, records, keys


_RECORD_COLUMNS = ("id, facility, mrn, authority, person_id, active, merged_into_mrn, created_at, updated_at, data, "
                   "family_name, given_name, birth_date, sex, postcode, phone, ssn, link, link_score, features")


def _insert(engine, person_rows, record_rows, key_rows) -> None:
    # /* TRANSACTION: one chunk of the generated index (persons, records, blocking keys). */
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        if engine.dialect.name == "sqlite":
            cursor = raw.cursor()
            cursor.executemany("INSERT INTO person (id, created_at, protected) VALUES (?, ?, ?)", person_rows)
            cursor.executemany(f"INSERT INTO patient_record ({_RECORD_COLUMNS}) VALUES ({', '.join('?' * 20)})",
                               [r[:12] + (r[12].isoformat() if r[12] else None,) + r[13:] for r in record_rows])
            cursor.executemany("INSERT INTO record_key (key, record_id) VALUES (?, ?)", key_rows)
            cursor.close()
            return
        with raw.cursor() as cursor:
            for sql, rows in (("COPY person (id, created_at, protected) FROM STDIN", person_rows),
                              (f"COPY patient_record ({_RECORD_COLUMNS}) FROM STDIN", record_rows),
                              ("COPY record_key (key, record_id) FROM STDIN", key_rows)):
                with cursor.copy(sql) as copy:
                    for row in rows:
                        copy.write_row(row)


@contextmanager
def bulk_loading(engine):
    """SQLite: no fsync and a large page cache while the generated index goes in (a throwaway file)."""
    if engine.dialect.name != "sqlite":
        yield
        return
    from sqlalchemy import event

    def fast(dbapi_connection, _record):
        dbapi_connection.execute("PRAGMA synchronous=OFF")
        dbapi_connection.execute("PRAGMA cache_size=-1000000")  # 1 GB

    event.listen(engine, "connect", fast)
    engine.dispose()
    try:
        yield
    finally:
        event.remove(engine, "connect", fast)
        engine.dispose()


# --- timing the writer's matching steps ----------------------------------------------------------------


class Parts:
    """Wall time spent in the patient index's steps during one plan (monkeypatched wrappers)."""

    def __init__(self) -> None:
        self.seconds = {"candidates": 0.0, "decide": 0.0}
        self.candidates = 0
        self._saved = {}

    def __enter__(self):
        for name, label in (("_read", "candidates"), ("decide", "decide")):
            real = getattr(index, name)
            self._saved[name] = real

            def timed(*args, _real=real, _label=label, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _real(*args, **kwargs)
                finally:
                    self.seconds[_label] += time.perf_counter() - t0
                    if _label == "decide":
                        self.candidates += len(args[1])

            setattr(index, name, timed)
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(index, name, real)


def sample_of(engine, count: int, seed: int) -> list[Identity]:
    """Identities of ``count`` records of an existing index (``--index``), read back from their data."""
    from datetime import date

    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        top = conn.exec_driver_sql("SELECT max(id) FROM patient_record").scalar_one()
        ids = sorted(random.Random(seed).sample(range(1, top + 1), min(count, top)))
        rows = conn.exec_driver_sql(
            f"SELECT person_id, {'data' if sqlite else 'data::text'} FROM patient_record WHERE id IN "
            f"({', '.join(map(str, ids))})").all()
    out = []
    for person, data in rows:
        rec = record_store.loads(data)
        name, birth = rec["name"], rec["birth"]
        address = (rec["addresses"] or (Address(),))[0]
        phone = rec["phones"][0].number if rec["phones"] else ""
        out.append(Identity(person, name.family, name.given, name.middle, rec["sex"] or "",
                            birth.value if birth else date(1950, 1, 1), rec["ssn"] or "", address.street,
                            address.city, address.state, address.postal_code, phone, suffix=name.suffix))
    return out


def new_registrations(g: Generator, sample: list, count: int, start: int) -> list[tuple[str, Registration]]:
    """Half of them someone in the index (at a facility, with a clerk's variations), half somebody new."""
    out = []
    for i in range(count):
        if i % 2 == 0 and sample:
            out.append(("known", g.registration(g.rng.choice(sample), g.rng.choice([f[0] for f in FACILITIES]))))
        else:
            out.append(("new", g.registration(g.identity(start + i), g.rng.choice([f[0] for f in FACILITIES]))))
    return out


def time_matching(engine, regs: list[tuple[str, Registration]], message_id: int, warmup: int,
                  profile=None, warm: bool = False) -> dict:
    """Each registration as a batch of one, rolled back; ``profile`` (a cProfile.Profile) sees plan and write only.
    ``warm``: each registration is matched once untimed first, so the pages its candidates live
    on are in the database's cache when it is timed (a server whose cache holds the index)."""
    models = index.ModelCache()
    totals, plans, writes, saves = [], [], [], []
    parts_all = {"candidates": [], "decide": []}
    candidates, actions = [], {}
    for n, (_, reg) in enumerate(regs):
        if warm:
            _match_once(engine, models, reg, n, message_id, None)
        plan, parts, (t0, t1, t2, t3) = _match_once(engine, models, reg, n, message_id,
                                                    profile if n >= warmup else None)
        if n < warmup:
            continue
        plans.append(t1 - t0)
        saves.append(t2 - t1)
        writes.append(t3 - t2)
        totals.append((t1 - t0) + (t3 - t2))
        for label, seconds in parts.seconds.items():
            parts_all[label].append(seconds)
        candidates.append(parts.candidates)
        for link in plan.links.values():  # the new record's person: one of the index's, or a new one
            outcome = "linked" if isinstance(link.person, int) else "new person"
            actions[outcome] = actions.get(outcome, 0) + 1
        actions["review opened"] = actions.get("review opened", 0) + len(plan.reviews)
    return {"total": totals, "plan": plans, "write": writes, "save": saves, "parts": parts_all,
            "candidates": candidates, "actions": actions}


def _match_once(engine, models, reg: Registration, n: int, message_id: int, profile):
    """The writer's steps for one registration, rolled back: (plan, Parts, the four clock readings)."""
    raw = a28(reg, n)[0][1:-2]
    header = read_header(raw)
    msg = Message(raw.decode(), header.delimiters)
    ctx = CONTEXTS[reg.facility]
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(exchange_sqlite_begin="IMMEDIATE")
        tx = conn.begin()
        try:
            state = record_store.load(conn, [needs(msg, ctx)])
            state.apply(map_message(msg, header, ctx, state), message_id)
            model = models.get(conn)
            with Parts() as parts:
                if profile is not None:
                    profile.enable()
                t0 = time.perf_counter()
                plan = index.plan(conn, state, model)
                t1 = time.perf_counter()
                if profile is not None:
                    profile.disable()
            record_store.save(conn, state, NOW, links=plan.links)
            if profile is not None:
                profile.enable()
            t2 = time.perf_counter()
            index.write(conn, plan, state, model, NOW)
            t3 = time.perf_counter()
            if profile is not None:
                profile.disable()
        finally:
            tx.rollback()
    return plan, parts, (t0, t1, t2, t3)


def ms(values, q: float | None = None) -> float:
    if not values:
        return 0.0
    if q is None:
        return statistics.median(values) * 1000
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] * 1000


def report(backend: str, persons: int, records: int, keys: int, build: float, t: dict, warm: bool = False) -> None:
    backend += ", warm" if warm else ""
    ok = "meets" if ms(t["total"]) <= 2 and ms(t["total"], 0.99) <= 10 else "MISSES"
    target = f"  ({ok} median <= 2 ms, p99 <= 10 ms)" if persons >= 1_000_000 else ""
    print(f"  {backend:<10} {persons:>9,} persons ({records:,} records, {keys:,} keys; built in {build:.0f} s): "
          f"plan + write median {ms(t['total']):.2f} ms, p99 {ms(t['total'], 0.99):.2f} ms{target}", flush=True)
    parts = ", ".join(f"{label} {ms(v):.2f}" for label, v in t["parts"].items())
    print(f"  {'':<10} medians (ms): plan {ms(t['plan']):.2f} [{parts}], write {ms(t['write']):.2f}; "
          f"records.save {ms(t['save']):.2f} (not matching); candidates per record median "
          f"{statistics.median(t['candidates']):.0f}, p99 {sorted(t['candidates'])[int(len(t['candidates']) * .99)]}, "
          f"max {max(t['candidates'])}; decisions {t['actions']}", flush=True)


def run_on_index(url: str, args) -> None:
    """Time against an index generated before (``--keep``, or a PostgreSQL database kept by hand)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            persons = conn.exec_driver_sql("SELECT count(*) FROM person").scalar_one()
            records = conn.exec_driver_sql("SELECT count(*) FROM patient_record").scalar_one()
            keys = conn.exec_driver_sql("SELECT count(*) FROM record_key").scalar_one()
            message_id = conn.exec_driver_sql("SELECT min(id) FROM message").scalar_one()
        g = Generator(args.seed + 2)
        regs = new_registrations(g, sample_of(engine, 2000, args.seed), args.samples + args.warmup, persons + 1)
        profile = None
        if args.profile:
            import cProfile

            profile = cProfile.Profile()
        t = time_matching(engine, regs, message_id, args.warmup, profile, args.warm)
        report(engine.dialect.name, persons, records, keys, 0.0, t, args.warm)
        if profile is not None:
            import pstats

            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(18)
    finally:
        engine.dispose()


def run(backend: str, persons: int, args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    drop = None
    try:
        if backend == "sqlite":
            url = f"sqlite:///{workdir / 'index.db'}"
        else:
            url, drop, _ = create_pg_database()
        engine = make_engine(url)
        try:
            upgrade(engine)
            g = Generator(args.seed)
            t0 = time.monotonic()
            with bulk_loading(engine):
                sample, records, keys = fill(engine, persons, g, vacuum=not args.no_vacuum)
            build = time.monotonic() - t0
            with write_transaction(engine) as conn:
                (message_id,) = insert_messages(conn, [_message()])
            regs = new_registrations(g, sample, args.samples + args.warmup, persons)
            profile = None
            if args.profile:
                import cProfile

                profile = cProfile.Profile()
            t = time_matching(engine, regs, message_id, args.warmup, profile, args.warm)
            report(backend, persons, records, keys, build, t, args.warm)
            if profile is not None:
                import pstats

                print(f"  {'':<10} profile of plan + write ({args.samples} registrations), by own time:")
                pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(18)
            if args.reconcile:
                reconcile(url)
        finally:
            engine.dispose()
    finally:
        if args.keep:
            print(f"  kept {url} (delete it when done)")
        elif drop is not None:
            drop()
        if not (args.keep and backend == "sqlite"):
            shutil.rmtree(workdir, ignore_errors=True)


def reconcile(url: str) -> None:
    """``exchange reconcile`` (both jobs) on the generated index, as an operator runs it: how long they take."""
    import subprocess

    from bench.intake.runner import child_env

    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "exchange.cli", "reconcile", "--database", url, "--config",
                           str(REPO / "config" / "exchange.toml")], capture_output=True, text=True, env=child_env(),
                          cwd=REPO)
    print(f"  {'':<10} exchange reconcile: exit {done.returncode} after {time.monotonic() - t0:.0f} s", flush=True)
    for line in (done.stdout + done.stderr).splitlines():
        print(f"  {'':<10} | {line}", flush=True)


def _message() -> NewMessage:
    """The message row the timed registrations are applied as (record_event needs one)."""
    return NewMessage(raw=b"MSH|^~\\&|REG|HOSP|EXCHANGE|EXCHANGE|20261127120000||ADT^A28^ADT_A05|SPEED-1|P|2.5.1\r",
                      received_at=NOW, facility="HOSP", control_id="SPEED-1", sending_application="REG",
                      message_type="ADT", event="A28", structure="ADT_A05", version="2.5.1", processing_id="P",
                      state=MessageState.ACCEPTED, ack_code="AA", ack=b"", reason=None, peer="bench", dedup=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="persons in the index, comma-separated "
                                                               "(default 10000,100000; 1000000 takes ~10 min a backend)")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--samples", type=int, default=500, help="new registrations timed per size (default 500)")
    parser.add_argument("--warmup", type=int, default=50, help="registrations run first, not timed")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the database (its URL is printed; for --index)")
    parser.add_argument("--no-vacuum", action="store_true",
                        help="PostgreSQL: ANALYZE the loaded index only, no VACUUM (as a bulk load leaves it, "
                             "before autovacuum has run)")
    parser.add_argument("--profile", action="store_true", help="cProfile plan + write: where the time goes")
    parser.add_argument("--warm", action="store_true",
                        help="match each registration once untimed first: its candidates' pages in the database's "
                             "cache, as on a server whose cache holds the index (PostgreSQL's default "
                             "shared_buffers, 128 MB, holds little of a million persons)")
    parser.add_argument("--reconcile", action="store_true",
                        help="then run `exchange reconcile` (consistency, match-model) on the index and time it")
    parser.add_argument("--index", default=None, metavar="URL",
                        help="time against an index generated before (e.g. a file kept with --keep)")
    args = parser.parse_args(argv)
    if args.index:
        run_on_index(args.index, args)
        return 0
    check_record_of(Generator(args.seed + 1))
    print(f"Matching cost per message (index.plan + index.write for a batch of one new registration, rolled back); "
          f"{args.samples} registrations per size, half of them someone in the index", flush=True)
    for persons in (int(s) for s in args.sizes.split(",")):
        for backend in args.backends.split(","):
            try:
                run(backend, persons, args)
            except TargetSkipped as exc:
                print(f"  {backend:<10} skipped: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
