"""Intake benchmark: python-hl7's asyncio server against ``exchange serve``.

For each target the runner starts the server in its own process, waits until
it is ready, starts the load client (``bench.intake.client``, another process),
samples the server's RSS every 0.5 s, and stops the server. All targets get
the same pre-generated messages. See ``python -m bench.intake --help``.

Workloads (``--workload``, default all): ``adt`` (ADT^A01/A04/A08, against
the baseline too: the ratios and ``--check`` are about it), ``mdm-text``
(MDM^T02, a 30-line text document) and ``mdm-pdf`` (MDM^T02, a 200 KB PDF
in Base64), the MDM ones on the exchange targets only.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import pickle
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.intake.messages import DOCUMENT_LINES, FACILITY, PDF_BYTES, WORKLOADS

REPO = Path(__file__).resolve().parents[2]
ALL_TARGETS = ("baseline", "sqlite", "postgresql")
LABELS = {
    "baseline": "baseline (python-hl7)",
    "sqlite": "exchange sqlite",
    "postgresql": "exchange postgresql",
}
WORKLOAD_TITLES = {
    "adt": "ADT^A01/A04/A08",
    "mdm-text": f"MDM^T02, {DOCUMENT_LINES}-line text document (OBX TX)",
    "mdm-pdf": f"MDM^T02, {PDF_BYTES // 1024} KB PDF as Base64 (OBX ED)",
}
WARMUP_PREFIX = {"adt": "W", "mdm-text": "X", "mdm-pdf": "Y"}  # MSH-10 prefixes (timed: M, T, P)
TIMED_PREFIX = {"adt": "M", "mdm-text": "T", "mdm-pdf": "P"}
PDF_SHARE = 20  # mdm-pdf sends 1/20 of -n by default (200 KB each), at least PDF_MIN
PDF_MIN = 100
TARGET_RATIO = {"sqlite": 5.0, "postgresql": 3.0}  # msgs/s over the baseline's
TARGET_P99_MS = 50.0  # for the exchange targets
PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")

RSS_INTERVAL = 0.5
READY_TIMEOUT = 30.0
LINE_TIMEOUT = 30.0  # the client prints a progress line every second
STOP_TIMEOUT = 15.0
NOISE_CPU_PCT = 15.0  # CPU used by everything else during a run before we warn
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Every child process, so that nothing outlives the runner (see kill_children).
CHILDREN: list[subprocess.Popen | asyncio.subprocess.Process] = []


class TargetFailed(Exception):
    """The target could not be measured; the message says why."""


class TargetSkipped(Exception):
    """The target cannot run here (e.g. no PostgreSQL); the message says why."""


# -- child processes ---------------------------------------------------------

def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the runner dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    CHILDREN.append(proc)
    return proc


async def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def kill_children() -> None:
    """Last resort on the way out: nothing we started may survive us."""
    for proc in CHILDREN:
        pid = proc.pid
        alive = proc.returncode is None if isinstance(proc, asyncio.subprocess.Process) \
            else proc.poll() is None
        if alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    | " + line for line in text[-lines:])


# -- /proc readings ----------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return pids


def rss_mb(pid: int) -> float | None:
    """VmRSS of the process and its descendants, MB (None once it is gone)."""
    total_kb, found = 0, False
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        found = True
                        break
        except OSError:
            continue
    return total_kb / 1024 if found else None


def parse_targets(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """``--targets`` (comma-separated) as a list in ALL_TARGETS order; a usage error otherwise."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown or not targets:
        parser.error(f"--targets: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(ALL_TARGETS)}")
    return [t for t in ALL_TARGETS if t in targets]


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / CLK_TCK


def system_busy_seconds() -> float:
    """CPU time all CPUs spent not idle since boot (the first line of /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass
class CpuSnapshot:
    """CPU seconds so far of the server, the database backends and the whole machine.

    The client is not read here: it may have exited by the time the runner
    reads its last mark; it reports its own CPU time instead.
    """
    at: float
    server: float
    database: dict[int, float]
    system: float

    @classmethod
    def take(cls, server_pid: int, db_pids: list[int]) -> "CpuSnapshot":
        return cls(time.perf_counter(), cpu_seconds(server_pid),
                   {p: cpu_seconds(p) for p in db_pids}, system_busy_seconds())


def cpu_use(before: CpuSnapshot, after: CpuSnapshot, client_cpu_pct: float) -> dict[str, float]:
    """Percent of one CPU used by each party between two snapshots."""
    wall = after.at - before.at
    if wall <= 0:
        return {}
    database = sum(after.database[p] - before.database.get(p, 0.0) for p in after.database)
    use = {
        "client": client_cpu_pct,
        "server": 100.0 * (after.server - before.server) / wall,
        "database": 100.0 * database / wall,
    }
    use["rest"] = max(0.0, 100.0 * (after.system - before.system) / wall - sum(use.values()))
    return use


# -- readiness ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(proc: subprocess.Popen, probe, what: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TargetFailed(f"server exited with status {proc.returncode} before "
                               f"{what}; its output ends with:\n{tail(log)}")
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            async with asyncio.timeout(1.0):
                if await probe():
                    return
        await asyncio.sleep(0.2)
    raise TargetFailed(f"no {what} within {READY_TIMEOUT:.0f} s; output ends with:\n{tail(log)}")


def tcp_probe(port: int):
    async def probe() -> bool:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        return True
    return probe


def healthz_probe(port: int):
    async def probe() -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            status = await reader.readline()
            return status.split(b" ")[1:2] == [b"200"]
        finally:
            writer.close()
    return probe


# -- targets -----------------------------------------------------------------

@dataclass
class Server:
    proc: subprocess.Popen
    mllp_port: int
    log: Path
    cleanup: list = field(default_factory=list)  # sync callables, run after stop
    db_pids: object = None  # callable -> pids of the database server's backends for us
    database: str | None = None  # the exchange's SQLAlchemy URL (None for the baseline)


async def start_baseline(workdir: Path) -> Server:
    port = free_port()
    log = workdir / "baseline.log"
    proc = spawn([sys.executable, "-m", "bench.intake.baseline", "--port", str(port)], log)
    server = Server(proc, port, log)
    await wait_ready(proc, tcp_probe(port), "MLLP listener", log)
    return server


def write_config(workdir: Path, mllp_port: int, http_port: int,
                 facilities: str | None = None) -> Path:
    """The exchange's config: the listeners, then ``facilities`` (TOML tables:
    [[facility]], [[route]]; default the one sending facility)."""
    path = workdir / "exchange.toml"
    if facilities is None:
        facilities = ("[[facility]]\n"
                      f'code = "{FACILITY}"\n'
                      'name = "General Hospital"\n'
                      'kind = "hospital"\n'
                      f'authority = "{FACILITY}"\n')
    path.write_text(
        "[server]\n"
        f'mllp = "tcp:{mllp_port}:interface=127.0.0.1"\n'
        f'http = "tcp:{http_port}:interface=127.0.0.1"\n'
        + facilities)
    return path


async def start_exchange(workdir: Path, key: str, database: str, cleanup: list,
                         db_pids=None, facilities: str | None = None) -> Server:
    mllp_port, http_port = free_port(), free_port()
    config = write_config(workdir / key, mllp_port, http_port, facilities)
    log = workdir / key / "serve.log"
    cli = [sys.executable, "-m", "exchange.cli"]
    # `exchange serve` may migrate by itself; `db upgrade` first does no harm.
    upgrade = spawn(cli + ["db", "upgrade", "--config", str(config), "--database", database],
                    workdir / key / "upgrade.log")
    deadline = time.monotonic() + 120
    while upgrade.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if await stop(upgrade) != 0:
        print(f"  note: `exchange db upgrade` failed for {key} (status {upgrade.returncode}); "
              "trying `serve` anyway", flush=True)
    proc = spawn(cli + ["serve", "--config", str(config), "--database", database], log)
    server = Server(proc, mllp_port, log, cleanup, db_pids, database)
    try:
        await wait_ready(proc, healthz_probe(http_port), "200 from /healthz", log)
    except BaseException:
        await stop(proc)
        raise
    return server


def create_pg_database() -> tuple[str, callable, callable]:
    try:
        import psycopg
    except ImportError as error:
        raise TargetSkipped(f"psycopg is not installed ({error})") from None
    name = f"bench_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(**PG_ADMIN, connect_timeout=5, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TargetSkipped(f"PostgreSQL on {PG_ADMIN['host']}:{PG_ADMIN['port']} "
                            f"is unreachable: {reason}") from None

    def drop() -> None:
        with psycopg.connect(**PG_ADMIN, connect_timeout=5, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def backends() -> list[int]:
        """PostgreSQL backends serving the bench database (local server: their CPU counts)."""
        try:
            with psycopg.connect(**PG_ADMIN, connect_timeout=5, autocommit=True) as conn:
                rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                    (name,)).fetchall()
        except psycopg.Error:
            return []
        return [pid for (pid,) in rows if os.path.exists(f"/proc/{pid}")]

    url = (f"postgresql+psycopg://{PG_ADMIN['user']}@{PG_ADMIN['host']}:"
           f"{PG_ADMIN['port']}/{name}")
    return url, drop, backends


async def start_target(key: str, workdir: Path, facilities: str | None = None) -> Server:
    if key == "baseline":
        return await start_baseline(workdir)
    shutil.rmtree(workdir / key, ignore_errors=True)  # every round starts from an empty database
    (workdir / key).mkdir()
    cleanup: list = []
    backends = None
    if key == "sqlite":
        database = f"sqlite:///{workdir / key / 'bench.db'}"
    else:
        database, drop, backends = create_pg_database()
        cleanup.append(drop)
    try:
        return await start_exchange(workdir, key, database, cleanup, backends, facilities)
    except BaseException:
        run_cleanup(cleanup)
        raise


def run_cleanup(cleanup: list) -> None:
    while cleanup:
        action = cleanup.pop()
        try:
            action()
        except Exception as error:  # report and carry on: the rest must still run
            print(f"  warning: cleanup failed: {type(error).__name__}: {error}", flush=True)


# -- one measurement ---------------------------------------------------------

async def sample_rss(pid: int, samples: list[float]) -> None:
    while True:
        value = rss_mb(pid)
        if value is not None:
            samples.append(value)
        await asyncio.sleep(RSS_INTERVAL)


async def drive(server: Server, args, messages_path: Path, client_args: tuple[str, ...] = (),
                on_line=None) -> dict:
    """Run the load client against a ready server; return its figures plus RSS and CPU.

    ``client_args``: more options for the client; ``on_line(kind, rest)``: called
    with each line the client prints (start, progress, mark, result)."""
    pid = server.proc.pid
    samples: list[float] = []
    marks: dict[str, float | None] = {}
    sampler = asyncio.create_task(sample_rss(pid, samples))
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.intake.client", "--port", str(server.mllp_port),
        "--messages", str(messages_path), "--connections", str(args.connections),
        "--ack-timeout", str(args.ack_timeout), *client_args,
        cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        start_new_session=True, preexec_fn=_die_with_parent)
    CHILDREN.append(client)
    result: dict | None = None
    cpu0 = cpu1 = None

    def snapshot(db_pids: list[int]) -> CpuSnapshot:
        return CpuSnapshot.take(pid, db_pids)

    try:
        while True:
            try:
                async with asyncio.timeout(LINE_TIMEOUT + args.ack_timeout):
                    line = await client.stdout.readline()
            except TimeoutError:
                raise TargetFailed(f"load client silent for {LINE_TIMEOUT + args.ack_timeout:.0f} s")
            if not line:
                break
            kind, _, rest = line.decode().strip().partition(" ")
            if on_line is not None:
                on_line(kind, rest)
            if kind == "start":
                db_pids = server.db_pids() if server.db_pids else []
                cpu0 = snapshot(db_pids)
                samples.clear()  # peak over the timed run, warm-up excluded
            elif kind == "mark":
                marks[rest] = rss_mb(pid)
                if marks[rest] is not None:
                    samples.append(marks[rest])
                if rest == "100" and cpu0 is not None:
                    cpu1 = snapshot(sorted(set(db_pids) | set(
                        server.db_pids() if server.db_pids else [])))
            elif kind == "result":
                result = json.loads(rest)
        async with asyncio.timeout(10):
            await client.wait()
    finally:
        sampler.cancel()
        if client.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                client.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await client.wait()
    if result is None:
        raise TargetFailed(f"load client exited with status {client.returncode} without a result")
    if "error" in result:
        alive = "still running" if server.proc.poll() is None else \
            f"exited with status {server.proc.returncode}"
        raise TargetFailed(f"load client: {result['error']} (server {alive}); server output "
                           f"ends with:\n{tail(server.log)}")
    result["rss_peak_mb"] = max(samples) if samples else None
    result["rss_mb"] = {pct: marks.get(pct) for pct in ("10", "50", "100")}
    result["rss_samples"] = len(samples)
    if cpu0 is not None and cpu1 is not None:
        # percent of one CPU; "rest" is everything else on the machine (the runner too)
        result["cpu_pct"] = cpu_use(cpu0, cpu1, result["client_cpu_pct"])
    return result


async def measure(key: str, args, workdir: Path, messages_path: Path, workload: str = "adt",
                  counts: tuple[int, int] | None = None) -> dict:
    label = LABELS[key] if workload == "adt" else f"{LABELS[key]} [{workload}]"
    warmup, messages = counts or (args.warmup, args.messages)
    print(f"{label}: starting", flush=True)
    server = await start_target(key, workdir)
    try:
        print(f"{label}: ready (pid {server.proc.pid}), sending "
              f"{warmup} warm-up + {messages} messages over "
              f"{args.connections} connections", flush=True)
        result = await drive(server, args, messages_path)
    finally:
        try:
            status = await stop(server.proc)
        finally:
            run_cleanup(server.cleanup)  # even if a second Ctrl-C cuts the wait short
    result["server_exit"] = status
    if status != 0:
        print(f"  note: the server exited with status {status} after SIGTERM; its output "
              f"ends with:\n{tail(server.log)}", flush=True)
    result["status"] = "ok"
    print(f"{label}: {result['msgs_per_s']:.0f} msgs/s, p99 {result['p99_ms']:.1f} ms, "
          f"client CPU {result['client_cpu_pct']:.0f}%", flush=True)
    if result.get("rejected") or result.get("warmup_rejected"):
        print(f"  {result.get('rejected', 0)} timed and {result.get('warmup_rejected', 0)} warm-up "
              f"ACKs were not AA/CA; the first: {result.get('first_rejection')}", flush=True)
    return result


# -- report ------------------------------------------------------------------

def fmt(value, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def table(results: dict[str, dict]) -> str:
    lines = [f"{'target':<22} {'msgs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'peak RSS MB':>12}"
             f"  {'RSS 10%/50%/100% MB':<20} {'CPU% client/server/db/rest':>26}"]
    for key, r in results.items():
        label = LABELS[key]
        if r["status"] != "ok":
            lines.append(f"{label:<22} {r['status']}: {r['reason'].splitlines()[0]}")
            continue
        rss = "/".join("-" if r["rss_mb"][p] is None else f"{r['rss_mb'][p]:.1f}"
                       for p in ("10", "50", "100"))
        use = r.get("cpu_pct") or {}
        cpu = "/".join("-" if use.get(k) is None or (k == "database" and key != "postgresql")
                       else f"{use[k]:.0f}" for k in ("client", "server", "database", "rest"))
        line = (f"{label:<22} {fmt(r['msgs_per_s'], '.0f', 8)} {fmt(r['p50_ms'], '.1f', 8)} "
                f"{fmt(r['p99_ms'], '.1f', 8)} {fmt(r['rss_peak_mb'], '.1f', 12)}  "
                f"{rss:<20} {cpu:>26}")
        if r.get("rejected"):
            line += f"  ({r['rejected']} not accepted)"
        if len(r.get("rounds_msgs_per_s", ())) > 1:
            line += "  rounds: " + "/".join(str(v) for v in r["rounds_msgs_per_s"])
        lines.append(line)
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> dict[str, float | None]:
    base = results.get("baseline", {})
    out = {}
    for key in ("sqlite", "postgresql"):
        r = results.get(key)
        if r is None:
            continue
        if base.get("status") == "ok" and r["status"] == "ok" and base["msgs_per_s"] > 0:
            out[key] = r["msgs_per_s"] / base["msgs_per_s"]
        else:
            out[key] = None
    return out


def check(results: dict[str, dict], ratio: dict[str, float | None]) -> list[str]:
    """What misses the targets (empty: all met). A target that was not measured misses."""
    misses = []
    for key, goal in TARGET_RATIO.items():
        r = results.get(key)
        if r is None:
            misses.append(f"{LABELS[key]}: not run (--targets)")
        elif r["status"] != "ok":
            misses.append(f"{LABELS[key]}: {r['status']}")
        elif ratio.get(key) is None:
            misses.append(f"{LABELS[key]}: no baseline to compare with")
        else:
            if ratio[key] < goal:
                misses.append(f"{LABELS[key]}: {ratio[key]:.1f}x the baseline, target {goal:g}x")
            if not r["p99_ms"] < TARGET_P99_MS:
                misses.append(f"{LABELS[key]}: p99 {r['p99_ms']:.1f} ms, target < {TARGET_P99_MS:g} ms")
            if r.get("rejected") or r["acked"] != r["messages"]:
                misses.append(f"{LABELS[key]}: {r.get('rejected', 0)} ACKs not AA/CA")
    return misses


def source_version() -> dict:
    """The commit measured, and whether exchange/ had uncommitted changes."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "exchange_dirty": bool(git("status", "--porcelain", "--", "exchange"))}


# -- main --------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.intake",
        description="MLLP intake throughput, ACK latency and server RSS: python-hl7's "
                    "asyncio server (baseline) against `exchange serve` on SQLite and PostgreSQL.")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("-n", "--messages", type=int, default=20000,
                        help="timed messages per target (default %(default)s)")
    parser.add_argument("--connections", type=int, default=8,
                        help="concurrent connections, one message in flight each (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="untimed messages sent first (default %(default)s)")
    parser.add_argument("--ack-timeout", type=float, default=10.0,
                        help="seconds to wait for any one ACK (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every target this many times, interleaved; report each "
                             "target's median round (default 3)")
    parser.add_argument("--workload", default="all",
                        help="adt, mdm-text, mdm-pdf or all (default), or a comma-separated list; "
                             "the MDM workloads run on the exchange targets only")
    parser.add_argument("--pdf-messages", type=int, default=None, metavar="N",
                        help=f"timed messages of the mdm-pdf workload (default 1/{PDF_SHARE} of -n, "
                             f"at least {PDF_MIN}: each is ~{PDF_BYTES * 4 // 3 // 1024} KB)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 unless sqlite >= {TARGET_RATIO['sqlite']:g}x and postgresql >= "
                             f"{TARGET_RATIO['postgresql']:g}x the baseline's msgs/s, with "
                             f"p99 < {TARGET_P99_MS:g} ms")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, logs, SQLite file)")
    args = parser.parse_args(argv)
    args.targets = parse_targets(parser, args.targets)
    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    if "all" in workloads:
        workloads = list(WORKLOADS)
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown or not workloads:
        parser.error(f"--workload: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(WORKLOADS)} or all")
    args.workloads = [w for w in WORKLOADS if w in workloads]
    if args.messages < 1 or args.connections < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--messages and --connections must be >= 1, --warmup >= 0")
    if args.pdf_messages is not None and args.pdf_messages < 1:
        parser.error("--pdf-messages must be >= 1")
    return args


def workload_counts(args, workload: str) -> tuple[int, int]:
    """(warm-up, timed) messages of a workload: mdm-pdf sends fewer, 200 KB each."""
    if workload != "mdm-pdf":
        return args.warmup, args.messages
    timed = args.pdf_messages or max(PDF_MIN, args.messages // PDF_SHARE)
    return min(args.warmup, max(1, timed // 10)), timed


def workload_targets(args, workload: str) -> list[str]:
    return list(args.targets) if workload == "adt" else [t for t in args.targets if t != "baseline"]


async def run(args, workdir: Path) -> int:
    run_id = secrets.token_hex(4)  # in every MSH-10: reruns against one database never dedup
    paths: dict[str, Path] = {}
    all_sizes: dict[str, list[int]] = {}
    for workload in args.workloads:
        if not workload_targets(args, workload):
            continue
        t0 = time.perf_counter()
        generate = WORKLOADS[workload]
        n_warmup, n_timed = workload_counts(args, workload)
        warmup = generate(n_warmup, run_id, prefix=WARMUP_PREFIX[workload])
        timed = generate(n_timed, run_id, prefix=TIMED_PREFIX[workload])
        sizes = all_sizes[workload] = [len(frame) - 3 for frame, _ in timed]
        paths[workload] = workdir / f"messages-{workload}.pickle"
        with open(paths[workload], "wb") as f:
            pickle.dump({"warmup": warmup, "timed": timed}, f, protocol=pickle.HIGHEST_PROTOCOL)
        print(f"run {run_id}: {len(timed)} {WORKLOAD_TITLES[workload]} messages, {min(sizes)}-{max(sizes)} bytes "
              f"(mean {sum(sizes) / len(sizes):.0f}), generated in {time.perf_counter() - t0:.1f} s; "
              f"{os.cpu_count()} CPUs", flush=True)
        del warmup, timed

    # Rounds interleave the targets (baseline, sqlite, postgresql, baseline, ...)
    # so that a noisy neighbour on a shared machine hits them alike; each
    # target reports its median round by throughput.
    rounds: dict[str, dict[str, list[dict]]] = {
        w: {key: [] for key in workload_targets(args, w)} for w in paths
    }
    for round_no in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"-- round {round_no} of {args.rounds}", flush=True)
        for workload, by_target in rounds.items():
            for key, runs in by_target.items():
                if runs and runs[-1]["status"] != "ok":
                    continue  # skipped or failed once: not again
                try:
                    runs.append(await measure(key, args, workdir, paths[workload], workload,
                                              workload_counts(args, workload)))
                except TargetSkipped as why:
                    print(f"{LABELS[key]}: skipped: {why}", flush=True)
                    runs.append({"status": "skipped", "reason": str(why)})
                except TargetFailed as why:
                    print(f"{LABELS[key]}: FAILED: {why}", flush=True)
                    runs.append({"status": "failed", "reason": str(why)})
    by_workload = {w: {key: median_round(runs) for key, runs in by_target.items()}
                   for w, by_target in rounds.items()}
    results = by_workload.get("adt", {})
    sizes = all_sizes.get("adt", [0])

    ratio = ratios(results)
    for workload, workload_results in by_workload.items():
        print()
        print(f"{WORKLOAD_TITLES[workload]}:")
        print(table(workload_results))
        if workload == "adt" and ratio:
            print("   ".join(
                f"{LABELS[k]} / baseline: " + (f"{v:.1f}x" if v is not None else "n/a")
                + f" (target {TARGET_RATIO[k]:g}x)" for k, v in ratio.items()))
    measured = {f"{k} [{w}]" if w != "adt" else k: r
                for w, workload_results in by_workload.items() for k, r in workload_results.items()
                if r["status"] == "ok"}
    busy = [_label(k) for k, r in measured.items() if r["client_cpu_pct"] > 85]
    if busy:
        print(f"warning: the load client was above 85% CPU for {', '.join(busy)}: "
              "it may be the bottleneck there")
    noisy = [f"{_label(k)} {r['cpu_pct']['rest']:.0f}%" for k, r in measured.items()
             if r.get("cpu_pct", {}).get("rest", 0) > NOISE_CPU_PCT]
    if noisy:
        print(f"warning: other processes used CPU during the run ({', '.join(noisy)} of a "
              f"core, on {os.cpu_count()} CPUs): these figures are not from a quiet machine")
    misses = check(results, ratio)
    if args.json:
        doc = {
            "run_id": run_id, "messages": args.messages, "connections": args.connections,
            "warmup": args.warmup, "message_bytes": {"min": min(sizes), "max": max(sizes),
                                                      "mean": sum(sizes) / len(sizes)},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "source": source_version(), "targets": results, "ratio_to_baseline": ratio,
            "workloads": {
                w: {"title": WORKLOAD_TITLES[w], "messages": workload_counts(args, w)[1],
                    "message_bytes": {"min": min(all_sizes[w]), "max": max(all_sizes[w]),
                                      "mean": sum(all_sizes[w]) / len(all_sizes[w])},
                    "targets": r}
                for w, r in by_workload.items() if w != "adt"
            },
            "goals": {"ratio": TARGET_RATIO, "p99_ms": TARGET_P99_MS}, "misses": misses,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    if args.check:
        if misses:
            print("check FAILED:\n  " + "\n  ".join(misses))
            return 1
        print("check passed")
    return 0


def _label(key: str) -> str:
    """LABELS of a target, keeping a " [workload]" suffix."""
    target, _, rest = key.partition(" ")
    return f"{LABELS[target]} {rest}".strip()


def median_round(runs: list[dict]) -> dict:
    """The round with the median throughput, with every round's msgs/s beside it."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["msgs_per_s"])
    chosen = dict(ok[len(ok) // 2])
    chosen["rounds_msgs_per_s"] = [round(r["msgs_per_s"]) for r in runs if r["status"] == "ok"]
    return chosen


async def run_cancellable(run, args, workdir: Path) -> int:
    """``run(args, workdir)``, cancelled on SIGINT or SIGTERM so that the finally blocks clean up."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await run(args, workdir)


def run_in_workdir(run, args, prefix: str) -> int:
    """A benchmark's main: ``run(args, workdir)`` in a temporary directory (kept with
    ``--keep``), its child processes killed whatever happens; 130 when interrupted."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return asyncio.run(run_cancellable(run, args, workdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        kill_children()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    return run_in_workdir(run, parse_args(argv), "bench-intake-")
