"""The whole pipeline under load (issue 5): intake, mapping, matching, routing and
delivery to two receiving facilities, beside the python-hl7 baseline of the intake
benchmark, measured in the same run.

    .venv/bin/python bench/pipeline.py                 # -n 6000 --rounds 3, all targets
    .venv/bin/python bench/pipeline.py -n 2000 --rounds 1 --targets baseline,sqlite --check

Each round, for each exchange target (SQLite, a fresh PostgreSQL database):

1. two receiving systems are started, each in a process of its own
   (``bench/pipeline_peer.py``: python-hl7's asyncio MLLP server, ACKing AA and
   recording every copy's MSH-10 and when it came), then ``exchange serve`` with
   three facilities: GENHOSP (hospital, the sender), OAKNH (nursing home,
   subscribes ADT^A01/A04/A08) and HHCARE (home health, ADT^*), the last two
   delivering to the receivers;
2. warm-up, untimed: every synthetic patient of the run is registered at OAKNH,
   then at HHCARE (ADT^A28 with their own MRNs and the same demographics), over
   the same 8 connections, so that the patient index links the hospital's records
   to them as they arrive and the hospital's events have two destinations;
3. timed: the hospital's N ADT^A01/A04/A08 (``bench.intake.messages.generate``)
   over 8 connections, one message in flight each (``bench.intake.client``);
   meanwhile the outbox (table ``delivery``) is sampled every 0.5 s; then the
   benchmark waits until it has drained (no copy queued) or ``--drain-timeout``.

The baseline (``bench.intake.baseline``) gets the same messages, A28s included.
Figures: intake msgs/s and p50/p99 ACK latency (the intake benchmark's table);
copies routed and delivered per second during the feed, the outbox depth at the
end of the feed and its maximum, the time to drain; the delay from the sender's
ACK (the load client's clock) to the destination's ACK of the copy (the
receiver's clock: both CLOCK_MONOTONIC, joined by control ids: a copy's MSH-10
is "<message id>-<n>", table ``message`` maps the id to the sender's MSH-10),
and from ``message.received_at`` to ``delivery.delivered_at`` (the database's
view). ``--check`` exits 1 unless the issue's targets are met: on both backends
3x the baseline's msgs/s, p99 ACK latency < 50 ms, two copies per message, and
"the outbox does not grow": >= 95 % of the copies delivered during the feed,
never more than one second's worth of copies queued, all delivered in the end.
"""
from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import pickle
import platform
import secrets
import shutil
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.intake.messages import FACILITY, Patient, generate, patient_pool  # noqa: E402
from bench.intake.runner import (  # noqa: E402
    ALL_TARGETS,
    LABELS,
    NOISE_CPU_PCT,
    RSS_INTERVAL,
    TargetFailed,
    TargetSkipped,
    cpu_seconds,
    drive,
    fmt,
    free_port,
    run_in_workdir,
    measure,
    median_round,
    parse_targets,
    ratios,
    run_cleanup,
    source_version,
    spawn,
    start_target,
    stop,
    table,
    tail,
    tcp_probe,
    wait_ready,
)
from bench.intake.client import percentile  # noqa: E402

TARGET_RATIO = 3.0  # intake msgs/s over the baseline's, both backends
TARGET_P99_MS = 50.0
TARGET_KEEP_UP = 0.95  # copies delivered during the feed / copies routed during it
TARGET_BACKLOG_S = 1.0  # the outbox never holds more than this many seconds of routed copies
RECEIVERS = (  # code, name, kind, subscribe
    ("OAKNH", "Oakwood Nursing Home", "nursing_home", ["ADT^A01", "ADT^A04", "ADT^A08"]),
    ("HHCARE", "Sunrise Home Health", "home_health", ["ADT^*"]),
)
MRN_PREFIX = {"OAKNH": "OA", "HHCARE": "HH"}
A28_PREFIX = {"OAKNH": "R", "HHCARE": "S"}  # MSH-10 prefixes of the registrations (timed: M)
TIMED_PREFIX = "M"


# -- messages -----------------------------------------------------------------------

def a28(facility: str, number: int, p: Patient, control_id: str, when: datetime) -> bytes:
    """ADT^A28 registering ``p`` at ``facility`` under its own MRN, same demographics."""
    ts = when.strftime("%Y%m%d%H%M%S")
    city, state, zip_code = p.city
    segments = (
        f"MSH|^~\\&|REGSYS|{facility}|EXCHANGE|EXCHANGE|{ts}||ADT^A28^ADT_A05|{control_id}|P|2.5.1",
        f"EVN|A28|{ts}",
        f"PID|1||{MRN_PREFIX[facility]}{number:08d}^^^{facility}^MR~{p.national_id}^^^SSA^SS||"
        f"{p.family}^{p.given}^{p.middle}^^^^L||{p.birth_date}|{p.sex}|||"
        f"{p.street}^Apt {p.apartment}^{city}^{state}^{zip_code}^USA^H||"
        f"^PRN^PH^^1^{p.phone[:3]}^{p.phone[3:]}|^WPN^PH^^1^555^{p.work_phone}",
        "PV1|1|N",
    )
    return ("\r".join(segments) + "\r").encode("ascii")


def registrations(pool: list[Patient], run_id: str) -> list[tuple[bytes, bytes]]:
    """Every patient at OAKNH, then every patient at HHCARE, as (frame, control id)."""
    out = []
    start = datetime(2024, 2, 1, 8, 0, 0)
    for facility, _name, _kind, _subscribe in RECEIVERS:
        for i, p in enumerate(pool):
            control_id = f"{run_id}{A28_PREFIX[facility]}{i:07d}"
            payload = a28(facility, i, p, control_id, start + timedelta(seconds=i))
            out.append((b"\x0b" + payload + b"\x1c\x0d", control_id.encode("ascii")))
    return out


def facilities_toml(ports: dict[str, int]) -> str:
    text = ("[[facility]]\n"
            f'code = "{FACILITY}"\nname = "General Hospital"\nkind = "hospital"\n'
            f'authority = "{FACILITY}"\n')
    for code, name, kind, subscribe in RECEIVERS:
        text += (f'\n[[facility]]\ncode = "{code}"\nname = "{name}"\nkind = "{kind}"\n'
                 f'authority = "{code}"\ndeliver_to = "127.0.0.1:{ports[code]}"\n'
                 f"subscribe = {json.dumps(subscribe)}\n")
    return text


# -- receivers ----------------------------------------------------------------------

async def start_peers(workdir: Path, key: str, parse: bool) -> list[dict]:
    directory = workdir / f"{key}-peers"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    peers = []
    try:
        for code, *_ in RECEIVERS:
            port = free_port()
            out, log = directory / f"{code}.pickle", directory / f"{code}.log"
            argv = [sys.executable, "-m", "bench.pipeline_peer", "--port", str(port),
                    "--name", code, "--out", str(out)] + (["--parse"] if parse else [])
            peer = {"code": code, "port": port, "out": out, "log": log, "proc": spawn(argv, log)}
            peers.append(peer)
            await wait_ready(peer["proc"], tcp_probe(port), f"{code} receiver", log)
    except BaseException:
        await stop_peers(peers)
        raise
    return peers


async def stop_peers(peers: list[dict]) -> dict[str, dict]:
    """SIGTERM each receiver (it writes what it received) and read that back."""
    got = {}
    for peer in peers:
        await stop(peer["proc"])
    for peer in peers:
        try:
            with open(peer["out"], "rb") as f:
                got[peer["code"]] = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError) as error:
            raise TargetFailed(f"receiver {peer['code']} left no record ({error}); its "
                               f"output ends with:\n{tail(peer['log'])}") from None
    return got


# -- the database's view ------------------------------------------------------------

class Outbox:
    """Reads of the exchange's database from the benchmark (a connection of its own)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool
        self.engine = create_engine(url, poolclass=NullPool)
        self.samples: list[tuple[int, dict[str, int]]] = []  # (perf_counter_ns, {state: count})

    def counts(self) -> dict[str, int]:
        from sqlalchemy import text
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT state, count(*) FROM delivery GROUP BY state")).all()
        return {state: n for state, n in rows}

    async def sample(self) -> dict[str, int]:
        at = time.perf_counter_ns()
        counts = await asyncio.to_thread(self.counts)
        self.samples.append((at, counts))
        return counts

    async def sample_forever(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(RSS_INTERVAL)

    def copies(self) -> list[tuple]:
        """(copy MSH-10, destination, state, sender MSH-10, received_at, delivered_at) of GENHOSP's messages."""
        from sqlalchemy import text
        with self.engine.connect() as conn:
            return conn.execute(text(
                "SELECT d.control_id, d.destination, d.state, m.control_id, m.received_at, "
                "d.delivered_at FROM delivery d JOIN message m ON m.id = d.message_id "
                "WHERE m.facility = :facility"), {"facility": FACILITY}).all()

    def links(self) -> dict[str, int]:
        from sqlalchemy import text
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT person_id, facility FROM patient_record WHERE active")).all()
            reviews = conn.execute(text("SELECT count(*) FROM match_review WHERE state = 'open'")).scalar()
        persons: dict[int, set[str]] = {}
        for person, facility in rows:
            persons.setdefault(person, set()).add(facility)
        receivers = {code for code, *_ in RECEIVERS}
        return {
            "records": len(rows),
            "persons": len(persons),
            "hospital_records": sum(FACILITY in f for f in persons.values()),
            "persons_at_receivers": sum(receivers <= f for f in persons.values()),
            "persons_at_all_three": sum(receivers | {FACILITY} <= f for f in persons.values()),
            "open_reviews": reviews,
        }

    def close(self) -> None:
        self.engine.dispose()


def _ms(values: list[float], pct: int) -> float | None:
    return percentile(values, pct) if values else None


def _as_utc(value):
    """A timestamp as read back (aware on PostgreSQL; naive UTC text or datetime on SQLite)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        from datetime import timezone
        value = value.replace(tzinfo=timezone.utc)
    return value


def delivery_figures(timed: list[tuple[bytes, bytes]], clock: dict, copies: list[tuple],
                     received: dict[str, dict], samples: list, end_counts: dict[str, int],
                     end_counts_at: int, drained_at: int | None) -> dict:
    """Join the client's ACK times, the outbox and the receivers' records."""
    start_ns, end_ns, acked_ns = clock["start_ns"], clock["end_ns"], clock["acked_ns"]
    index = {control_id.decode(): i for i, (_, control_id) in enumerate(timed)}
    first: dict[str, int] = {}  # copy MSH-10 -> when the receiver ACKed it first
    seen = duplicates = 0
    during_feed = 0
    for peer in received.values():
        for control_id, ack_ns in zip(peer["control_ids"], peer["acked_ns"]):
            seen += 1
            if control_id in first:
                duplicates += 1
                continue
            first[control_id] = ack_ns
            if start_ns <= ack_ns <= end_ns:
                during_feed += 1
    ack_to_ack: list[float] = []  # ns
    db_delay: list[float] = []
    routed = delivered = missing_at_receiver = 0
    per_destination: dict[str, int] = {}
    states: dict[str, int] = {}
    for copy_id, destination, state, sender_id, received_at, delivered_at in copies:
        i = index.get(sender_id)
        if i is None:
            continue  # a warm-up message's copy (none expected)
        routed += 1
        per_destination[destination] = per_destination.get(destination, 0) + 1
        states[state] = states.get(state, 0) + 1
        at_receiver = first.get(copy_id)
        if at_receiver is None:
            missing_at_receiver += 1
        elif acked_ns[i]:
            ack_to_ack.append(at_receiver - acked_ns[i])
        if state == "delivered" and delivered_at is not None and received_at is not None:
            delivered += 1
            db_delay.append((_as_utc(delivered_at) - _as_utc(received_at)).total_seconds() * 1e9)
    ack_to_ack.sort()
    db_delay.sort()
    feed_s = (end_ns - start_ns) / 1e9
    depths = [c.get("queued", 0) for at, c in samples if start_ns <= at <= end_ns]
    depths.append(end_counts.get("queued", 0))
    return {
        "copies_routed": routed,
        "copies_per_message": routed / len(timed) if timed else 0.0,
        "per_destination": per_destination,
        "states": states,
        "received_by_receivers": seen,
        "duplicates_at_receivers": duplicates,
        "not_at_receivers": missing_at_receiver,
        "feed_s": feed_s,
        "routed_per_s": routed / feed_s if feed_s else 0.0,
        "delivered_during_feed": during_feed,
        "delivered_per_s": during_feed / feed_s if feed_s else 0.0,
        "keep_up": during_feed / routed if routed else None,
        "outbox_end_of_feed": end_counts.get("queued", 0),
        "outbox_end_of_feed_after_ms": (end_counts_at - end_ns) / 1e6,
        "outbox_max": max(depths),
        "outbox_max_s": max(depths) / (routed / feed_s) if routed and feed_s else None,
        "outbox_samples": [[(at - start_ns) / 1e9, c.get("queued", 0), c.get("delivered", 0)]
                           for at, c in samples],
        "drained_after_s": None if drained_at is None else (drained_at - end_ns) / 1e9,
        "ack_to_copy_ack_p50_ms": _ms(ack_to_ack, 50),
        "ack_to_copy_ack_p99_ms": _ms(ack_to_ack, 99),
        "ack_to_copy_ack_max_ms": ack_to_ack[-1] / 1e6 if ack_to_ack else None,
        "received_to_delivered_p50_ms": _ms(db_delay, 50),
        "received_to_delivered_p99_ms": _ms(db_delay, 99),
        "delivered": delivered,
    }


# -- one exchange measurement -------------------------------------------------------

async def measure_pipeline(key: str, args, workdir: Path, messages_path: Path,
                           timed: list[tuple[bytes, bytes]]) -> dict:
    label = LABELS[key]
    print(f"{label}: starting (with two receivers)", flush=True)
    peers = await start_peers(workdir, key, args.peer_parse)
    received: dict[str, dict] = {}
    try:
        ports = {p["code"]: p["port"] for p in peers}
        server = await start_target(key, workdir, facilities_toml(ports))
        outbox = Outbox(server.database)
        try:
            print(f"{label}: ready (pid {server.proc.pid}), sending {args.warmup} registrations "
                  f"(warm-up) + {args.messages} messages over {args.connections} connections",
                  flush=True)
            peer_cpu: dict[str, float] = {}

            def on_line(kind: str, rest: str) -> None:
                if kind == "start" or (kind == "mark" and rest == "100"):
                    peer_cpu[kind] = sum(cpu_seconds(p["proc"].pid) for p in peers)
                    peer_cpu[kind + "_at"] = time.perf_counter()

            clock_path = workdir / f"{key}-ack-times.pickle"
            sampler = asyncio.create_task(outbox.sample_forever())
            try:
                result = await drive(server, args, messages_path,
                                     ("--ack-times", str(clock_path)), on_line)
                end_counts = await outbox.sample()
                end_counts_at = outbox.samples[-1][0]
                deadline = time.monotonic() + args.drain_timeout
                drained_at = None
                counts = end_counts
                while True:
                    if not counts.get("queued"):
                        drained_at = outbox.samples[-1][0]
                        break
                    if time.monotonic() > deadline or server.proc.poll() is not None:
                        break
                    await asyncio.sleep(0.1)
                    counts = await outbox.sample()
            finally:
                sampler.cancel()
            if drained_at is None:
                print(f"  the outbox did not drain within {args.drain_timeout:.0f} s: "
                      f"{counts}", flush=True)
            copies = await asyncio.to_thread(outbox.copies)
            links = await asyncio.to_thread(outbox.links)
        finally:
            outbox.close()
            try:
                status = await stop(server.proc)
            finally:
                run_cleanup(server.cleanup)
    finally:
        received = await stop_peers(peers)
    with open(clock_path, "rb") as f:
        clock = pickle.load(f)
    result["server_exit"] = status
    result["status"] = "ok"
    if status != 0:
        print(f"  note: the server exited with status {status} after SIGTERM; its output "
              f"ends with:\n{tail(server.log)}", flush=True)
    figures = delivery_figures(timed, clock, copies, received, outbox.samples, end_counts,
                               end_counts_at, drained_at)
    figures["links"] = links
    if "start_at" in peer_cpu and "mark_at" in peer_cpu:
        wall = peer_cpu["mark_at"] - peer_cpu["start_at"]
        figures["receivers_cpu_pct"] = 100.0 * (peer_cpu["mark"] - peer_cpu["start"]) / wall
        use = result.get("cpu_pct")
        if use:  # the intake benchmark counts the receivers in "rest": take them out
            use["receivers"] = figures["receivers_cpu_pct"]
            use["rest"] = max(0.0, use["rest"] - use["receivers"])
    result["pipeline"] = figures
    print(f"{label}: {result['msgs_per_s']:.0f} msgs/s, p99 {result['p99_ms']:.1f} ms; "
          f"{figures['copies_routed']} copies, {figures['delivered_per_s']:.0f}/s delivered "
          f"during the feed, outbox {figures['outbox_end_of_feed']} at its end "
          f"(max {figures['outbox_max']}); ACK -> copy ACK p50 "
          f"{fmt(figures['ack_to_copy_ack_p50_ms'], '.1f', 0)} p99 "
          f"{fmt(figures['ack_to_copy_ack_p99_ms'], '.1f', 0)} ms; persons at all three "
          f"{links['persons_at_all_three']}", flush=True)
    if result.get("rejected") or result.get("warmup_rejected"):
        print(f"  {result.get('rejected', 0)} timed and {result.get('warmup_rejected', 0)} warm-up "
              f"ACKs were not AA/CA; the first: {result.get('first_rejection')}", flush=True)
    return result


# -- report -------------------------------------------------------------------------

def delivery_table(results: dict[str, dict]) -> str:
    head = (f"{'target':<22} {'copies':>7} {'routed/s':>9} {'deliv/s':>8} {'outbox end/max':>15} "
            f"{'max s':>6} "
            f"{'drain s':>8} {'ACK->copy ACK p50/p99 ms':>25} {'rcvd->dlvd p50/p99 ms':>22} "
            f"{'persons 3/2 sites':>18} {'rcvr CPU%':>9}")
    lines = [head]
    for key, r in results.items():
        if key == "baseline":
            continue
        if r["status"] != "ok":
            lines.append(f"{LABELS[key]:<22} {r['status']}: {r['reason'].splitlines()[0]}")
            continue
        p = r["pipeline"]
        links = p["links"]
        lines.append(
            f"{LABELS[key]:<22} {p['copies_routed']:>7} {fmt(p['routed_per_s'], '.0f', 9)} "
            f"{fmt(p['delivered_per_s'], '.0f', 8)} "
            f"{str(p['outbox_end_of_feed']) + '/' + str(p['outbox_max']):>15} "
            f"{fmt(p['outbox_max_s'], '.1f', 6)} "
            f"{fmt(p['drained_after_s'], '.1f', 8)} "
            f"{fmt(p['ack_to_copy_ack_p50_ms'], '.1f', 0) + ' / ' + fmt(p['ack_to_copy_ack_p99_ms'], '.1f', 0):>25} "
            f"{fmt(p['received_to_delivered_p50_ms'], '.1f', 0) + ' / ' + fmt(p['received_to_delivered_p99_ms'], '.1f', 0):>22} "
            f"{str(links['persons_at_all_three']) + '/' + str(links['persons_at_receivers']):>18} "
            f"{fmt(p.get('receivers_cpu_pct'), '.0f', 9)}")
    return "\n".join(lines)


def check(results: dict[str, dict], ratio: dict[str, float | None], messages: int) -> list[str]:
    misses = []
    for key in ("sqlite", "postgresql"):
        r = results.get(key)
        label = LABELS[key]
        if r is None:
            misses.append(f"{label}: not run (--targets)")
            continue
        if r["status"] != "ok":
            misses.append(f"{label}: {r['status']}")
            continue
        p = r["pipeline"]
        if ratio.get(key) is None:
            misses.append(f"{label}: no baseline to compare with")
        elif ratio[key] < TARGET_RATIO:
            misses.append(f"{label}: {ratio[key]:.1f}x the baseline, target {TARGET_RATIO:g}x")
        if not r["p99_ms"] < TARGET_P99_MS:
            misses.append(f"{label}: p99 {r['p99_ms']:.1f} ms, target < {TARGET_P99_MS:g} ms")
        if r.get("rejected") or r["acked"] != r["messages"]:
            misses.append(f"{label}: {r.get('rejected', 0)} ACKs not AA/CA")
        if p["copies_routed"] != 2 * messages:
            misses.append(f"{label}: {p['copies_routed']} copies routed, expected {2 * messages} "
                          "(two per message)")
        if p["keep_up"] is None or p["keep_up"] < TARGET_KEEP_UP:
            misses.append(f"{label}: {p['delivered_during_feed']} of {p['copies_routed']} copies "
                          f"delivered during the feed (target >= {TARGET_KEEP_UP:.0%}): the outbox grows")
        if p["outbox_max_s"] is None or p["outbox_max_s"] > TARGET_BACKLOG_S:
            misses.append(f"{label}: the outbox held up to {p['outbox_max']} copies during the feed, "
                          f"{fmt(p['outbox_max_s'], '.1f', 0)} s of copies (target <= {TARGET_BACKLOG_S:g} s)")
        if p["drained_after_s"] is None or p["states"].get("delivered", 0) != p["copies_routed"]:
            misses.append(f"{label}: not every copy delivered ({p['states']})")
    return misses


# -- main ---------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="bench/pipeline.py",
        description="The whole pipeline (intake, mapping, matching, routing, delivery to two "
                    "receiving facilities) against python-hl7's asyncio server (baseline).")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("-n", "--messages", type=int, default=6000,
                        help="timed hospital messages per target (default %(default)s); "
                             "a third as many patients, each registered at both receivers first")
    parser.add_argument("--connections", type=int, default=8,
                        help="concurrent connections, one message in flight each (default %(default)s)")
    parser.add_argument("--ack-timeout", type=float, default=10.0,
                        help="seconds to wait for any one ACK (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every target this many times, interleaved; report each "
                             "target's median round by intake msgs/s (default %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait after the feed for the outbox to drain (default %(default)s)")
    parser.add_argument("--peer-parse", action="store_true",
                        help="the receivers parse every copy with hl7.parse (default: bytes, MSH-10 by split)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 unless both backends reach {TARGET_RATIO:g}x the baseline's msgs/s "
                             f"with p99 < {TARGET_P99_MS:g} ms, two copies per message, "
                             f">= {100 * TARGET_KEEP_UP:g}%% of them delivered during the feed, never more than "
                             f"{TARGET_BACKLOG_S:g} s of copies queued, and all delivered by the end")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, logs, SQLite files)")
    args = parser.parse_args(argv)
    args.targets = parse_targets(parser, args.targets)
    if args.messages < 3 or args.connections < 1 or args.rounds < 1:
        parser.error("--messages must be >= 3, --connections and --rounds >= 1")
    return args


async def run(args, workdir: Path) -> int:
    run_id = secrets.token_hex(4)
    t0 = time.perf_counter()
    timed = generate(args.messages, run_id, prefix=TIMED_PREFIX)
    pool = patient_pool(args.messages, prefix=TIMED_PREFIX)
    warmup = registrations(pool, run_id)
    args.warmup = len(warmup)
    messages_path = workdir / "messages.pickle"
    with open(messages_path, "wb") as f:
        pickle.dump({"warmup": warmup, "timed": timed}, f, protocol=pickle.HIGHEST_PROTOCOL)
    load = os.getloadavg()
    print(f"run {run_id}: {len(pool)} patients registered at {' and '.join(c for c, *_ in RECEIVERS)} "
          f"({len(warmup)} ADT^A28, warm-up), then {len(timed)} ADT^A01/A04/A08 from {FACILITY}; "
          f"generated in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)

    rounds: dict[str, list[dict]] = {key: [] for key in args.targets}
    for round_no in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"-- round {round_no} of {args.rounds}", flush=True)
        for key, runs in rounds.items():
            if runs and runs[-1]["status"] != "ok":
                continue
            try:
                if key == "baseline":
                    runs.append(await measure(key, args, workdir, messages_path))
                else:
                    runs.append(await measure_pipeline(key, args, workdir, messages_path, timed))
            except TargetSkipped as why:
                print(f"{LABELS[key]}: skipped: {why}", flush=True)
                runs.append({"status": "skipped", "reason": str(why)})
            except TargetFailed as why:
                print(f"{LABELS[key]}: FAILED: {why}", flush=True)
                runs.append({"status": "failed", "reason": str(why)})
    results = {key: median_round(runs) for key, runs in rounds.items()}
    ratio = ratios(results)
    load_end = os.getloadavg()

    print()
    print(f"Intake, {args.messages} ADT^A01/A04/A08 from {FACILITY} over {args.connections} "
          f"connections (mapping, matching and routing on; receivers' CPU taken out of 'rest'):")
    print(table(results))
    if ratio:
        print("   ".join(f"{LABELS[k]} / baseline: " + (f"{v:.1f}x" if v is not None else "n/a")
                         + f" (target {TARGET_RATIO:g}x)" for k, v in ratio.items()))
    if any(k != "baseline" for k in results):
        print()
        print("Delivery to OAKNH and HHCARE (two copies per message), in the median round:")
        print(delivery_table(results))
    print(f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} "
          f"(at the start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}) on {os.cpu_count()} CPUs")
    measured = {k: r for k, r in results.items() if r["status"] == "ok"}
    busy = [LABELS[k] for k, r in measured.items() if r["client_cpu_pct"] > 85]
    if busy:
        print(f"warning: the load client was above 85% CPU for {', '.join(busy)}: "
              "it may be the bottleneck there")
    noisy = [f"{LABELS[k]} {r['cpu_pct']['rest']:.0f}%" for k, r in measured.items()
             if r.get("cpu_pct", {}).get("rest", 0) > NOISE_CPU_PCT]
    if noisy:
        print(f"warning: other processes used CPU during the run ({', '.join(noisy)} of a "
              f"core, on {os.cpu_count()} CPUs): these figures are not from a quiet machine")
    misses = check(results, ratio, args.messages)
    if args.json:
        doc = {
            "run_id": run_id, "messages": args.messages, "patients": len(pool),
            "registrations": len(warmup), "connections": args.connections, "rounds": args.rounds,
            "receivers_parse": args.peer_parse,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), "load_start": load, "load_end": load_end},
            "source": source_version(), "targets": results, "ratio_to_baseline": ratio,
            "goals": {"ratio": TARGET_RATIO, "p99_ms": TARGET_P99_MS, "keep_up": TARGET_KEEP_UP,
                      "backlog_s": TARGET_BACKLOG_S},
            "misses": misses,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
        print(f"results written to {args.json}")
    if args.check:
        if misses:
            print("check FAILED:\n  " + "\n  ".join(misses))
            return 1
        print("check passed")
    return 0


def _json_default(value):
    if isinstance(value, array.array):
        return list(value)
    raise TypeError(type(value).__name__)


def main(argv=None) -> int:
    return run_in_workdir(run, parse_args(argv), "bench-pipeline-")


if __name__ == "__main__":
    sys.exit(main())
