"""Load client for the intake benchmark: raw asyncio streams, no HL7 parsing.

Runs in its own process (the runner starts it) so that it does not share a
core's worth of Python with the server under test. Each connection keeps one
message in flight: write a frame, read until ``0x1C 0x0D``, check the ACK with
a bytes search, take the next message.

It reads a pickle ``{"warmup": [(frame, control_id), ...], "timed": [...]}``
and talks to the runner through lines on stdout:

    start                    warm-up done, timed run begins
    progress <done>          every second (during the warm-up too)
    mark <pct>               when <pct>% (10, 50, 100) of the timed messages are ACKed
    result <json>            summary, last line

With ``--ack-times PATH`` it also writes, as a pickle, when each timed
message's ACK arrived: ``{"start_ns", "end_ns", "acked_ns"}`` on the
``time.perf_counter_ns`` clock (CLOCK_MONOTONIC on Linux, the same in every
process), ``acked_ns`` an ``array('q')`` in the order of the timed messages.

    python -m bench.intake.client --port 2575 --messages msgs.pickle
"""
from __future__ import annotations

import argparse
import array
import asyncio
import gc
import json
import pickle
import sys
import time

MARKS = (10, 50, 100)
END = b"\x1c\x0d"


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ack_accepts(reply: bytes, control_id: bytes) -> bool:
    """True if ``reply`` holds a segment ``MSA|AA|<control_id>`` (or CA).

    The search includes the segment terminator: an ACK's own MSH-10 may
    contain "MSA|" (python-hl7's random ids do, now and then).
    """
    p = reply.find(b"\rMSA|")
    if p < 0:
        p = reply.find(b"\nMSA|")
    if p < 0 or reply[p + 5:p + 7] not in (b"AA", b"CA") or reply[p + 7:p + 8] != b"|":
        return False
    start = p + 8
    end = start + len(control_id)
    return reply[start:end] == control_id and reply[end:end + 1] in (b"|", b"\r", b"\n", b"\x1c")


class Run:
    """Shared state of one pass over a list of messages."""

    def __init__(self, messages: list[tuple[bytes, bytes]], report: bool,
                 ack_times: bool = False) -> None:
        self.messages = messages
        self.latency_ns = array.array("q", bytes(8 * len(messages)))
        self.acked_ns = array.array("q", bytes(8 * len(messages))) if ack_times else None
        self.next = 0
        self.done = 0
        self.rejected = 0
        self.first_rejection: str | None = None
        self.report = report
        marks = [(-(-len(messages) * pct // 100), pct) for pct in MARKS]
        self.marks = [m for m in marks if m[0] > 0]


async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 run: Run, ack_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    messages = run.messages
    latency = run.latency_ns
    acked = run.acked_ns
    total = len(messages)
    clock = time.perf_counter_ns
    async with asyncio.timeout(None) as deadline:
        while run.next < total:
            i = run.next
            run.next = i + 1
            frame, control_id = messages[i]
            deadline.reschedule(loop.time() + ack_timeout)
            t0 = clock()
            writer.write(frame)  # one small frame in flight: the buffer cannot grow
            reply = await reader.readuntil(END)
            t1 = clock()
            latency[i] = t1 - t0
            if acked is not None:
                acked[i] = t1
            if not ack_accepts(reply, control_id):
                run.rejected += 1
                if run.first_rejection is None:
                    run.first_rejection = f"{control_id.decode()}: {reply[:300]!r}"
            run.done += 1
            if run.report and run.done >= run.marks[0][0]:
                emit(f"mark {run.marks.pop(0)[1]}")
                if not run.marks:
                    run.report = False


async def heartbeat(run: Run) -> None:
    while True:
        await asyncio.sleep(1.0)
        emit(f"progress {run.done}")


async def pass_over(conns, messages, ack_timeout: float, report: bool,
                    ack_times: bool = False) -> Run:
    """One pass; a progress line every second either way (the runner takes a silent
    client for a stuck one: a long warm-up must beat too), marks only with ``report``."""
    run = Run(messages, report, ack_times)
    beat = asyncio.create_task(heartbeat(run))
    try:
        async with asyncio.TaskGroup() as group:
            for reader, writer in conns:
                group.create_task(worker(reader, writer, run, ack_timeout))
    finally:
        beat.cancel()
    return run


def percentile(sorted_ns: list[int], pct: int) -> float:
    """Nearest-rank percentile of nanosecond values, in ms."""
    if not sorted_ns:
        return float("nan")
    rank = max(0, (pct * len(sorted_ns) + 99) // 100 - 1)
    return sorted_ns[rank] / 1e6


def first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def main_async(args) -> dict:
    with open(args.messages, "rb") as f:
        data = pickle.load(f)
    warmup, timed = data["warmup"], data["timed"]
    conns = []
    result: dict = {"messages": len(timed), "connections": args.connections}
    try:
        for _ in range(args.connections):
            async with asyncio.timeout(args.connect_timeout):
                conns.append(await asyncio.open_connection(args.host, args.port))
        if warmup:
            run = await pass_over(conns, warmup, args.ack_timeout, report=False)
            if run.rejected:
                result["warmup_rejected"] = run.rejected
                result["first_rejection"] = run.first_rejection
        gc.collect()
        gc.freeze()
        emit("start")
        cpu0, wall0 = time.process_time(), time.perf_counter_ns()
        run = await pass_over(conns, timed, args.ack_timeout, report=True,
                              ack_times=bool(args.ack_times))
        wall1 = time.perf_counter_ns()
        wall = (wall1 - wall0) / 1e9
        cpu = time.process_time() - cpu0
    finally:
        for _, writer in conns:
            writer.close()
    lat = sorted(run.latency_ns)
    result.update(
        acked=run.done,
        rejected=run.rejected,
        elapsed_s=wall,
        msgs_per_s=run.done / wall if wall else 0.0,
        p50_ms=percentile(lat, 50),
        p90_ms=percentile(lat, 90),
        p99_ms=percentile(lat, 99),
        max_ms=lat[-1] / 1e6 if lat else float("nan"),
        mean_ms=sum(lat) / len(lat) / 1e6 if lat else float("nan"),
        client_cpu_s=cpu,
        client_cpu_pct=100.0 * cpu / wall if wall else 0.0,
    )
    if run.first_rejection and "first_rejection" not in result:
        result["first_rejection"] = run.first_rejection
    if args.ack_times:
        with open(args.ack_times, "wb") as f:
            pickle.dump({"start_ns": wall0, "end_ns": wall1, "acked_ns": run.acked_ns}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="intake benchmark load client")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", required=True, help="pickle written by the runner")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--ack-timeout", type=float, default=10.0)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--ack-times", metavar="PATH",
                        help="write when each timed ACK arrived (perf_counter_ns) to PATH, a pickle")
    args = parser.parse_args()
    try:
        result = asyncio.run(main_async(args))
    except* (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as group:
        error = first_leaf(group)
        emit("result " + json.dumps({"error": f"{type(error).__name__}: {error}"}))
        sys.exit(1)
    emit("result " + json.dumps(result))


if __name__ == "__main__":
    main()
