"""The writer child's side of the pipe: length-prefixed pickles in and out."""
from __future__ import annotations

import io
import pickle
import struct

from exchange.pipeline import Answer
from exchange.writer import serve_batches


def frame(items, outcomes=()) -> bytes:
    """One request as WriterProcess.run sends it: (items, delivery outcomes)."""
    data = pickle.dumps((items, list(outcomes)))
    return struct.pack(">I", len(data)) + data


def replies(out: bytes) -> list:
    found, pos = [], 0
    while pos < len(out):
        (n,) = struct.unpack_from(">I", out, pos)
        found.append(pickle.loads(out[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return found


def test_each_batch_is_answered_after_run_batch_returns_and_errors_keep_it_serving():
    calls = []

    def run_batch(items, outcomes):
        assert outcomes == (["delivered 7"] if items == ["c"] else [])
        calls.append(items)
        if items == ["boom"]:
            raise RuntimeError("constraint violated")
        return [Answer(b"ACK", "AA", n) for n, _ in enumerate(items)]

    stdin = io.BytesIO(frame(["a", "b"]) + frame(["boom"]) + frame(["c"], ["delivered 7"]))
    stdout = io.BytesIO()
    serve_batches(run_batch, stdin, stdout)
    assert calls == [["a", "b"], ["boom"], ["c"]]
    ok1, failed, ok2 = replies(stdout.getvalue())
    assert ok1 == ("ok", [Answer(b"ACK", "AA", 0), Answer(b"ACK", "AA", 1)])
    assert failed == ("error", "RuntimeError", True)  # its processing raised: a bug
    assert ok2[0] == "ok"


def test_a_batch_the_database_failed_is_no_bug_and_a_bugs_report_holds_no_data(capsys):
    import sqlite3

    from sqlalchemy.exc import OperationalError

    def run_batch(items, outcomes):
        if items == ["locked"]:
            raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
        mrn = "MRN-" + str(4711)
        raise TypeError(f"'<' not supported between {mrn!r} and 3")  # a value a bug's text may quote

    stdout = io.BytesIO()
    serve_batches(run_batch, io.BytesIO(frame(["locked"]) + frame(["bug"])), stdout)
    assert replies(stdout.getvalue()) == [("error", "OperationalError", False), ("error", "TypeError", True)]
    err = capsys.readouterr().err
    assert "rolled back: TypeError, raised at" in err and "test_writer.py" in err and "MRN-4711" not in err


def test_a_truncated_batch_at_eof_is_not_run():
    calls = []
    data = frame(["a"])
    serve_batches(lambda items, outcomes: calls.append(items), io.BytesIO(data[:-3]), io.BytesIO())
    assert calls == []


def test_a_batch_that_lost_a_unique_key_race_to_another_node_is_run_again():
    from sqlalchemy.exc import IntegrityError

    class UniqueViolation(Exception):
        sqlstate = "23505"

    calls = []

    def run_batch(items, outcomes):
        calls.append(items)
        if items == ["raced"] and len(calls) < 3 or items == ["always"]:
            raise IntegrityError("INSERT ...", {}, UniqueViolation("duplicate key"))
        return [Answer(b"ACK", "AA", 1)]

    stdout = io.BytesIO()
    serve_batches(run_batch, io.BytesIO(frame(["raced"]) + frame(["always"])), stdout)
    assert calls == [["raced"]] * 3 + [["always"]] * 4  # the second: given up after 3 more tries
    assert replies(stdout.getvalue()) == [("ok", [Answer(b"ACK", "AA", 1)]), ("error", "IntegrityError", True)]
