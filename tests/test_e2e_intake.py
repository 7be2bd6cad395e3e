"""End to end over loopback: `exchange serve` as a process, other projects'
MLLP clients as the facility (python-hl7's blocking and asyncio clients;
hl7apy builds messages and validates our ACKs), on SQLite and PostgreSQL."""
from __future__ import annotations

import asyncio
import json
import os
import textwrap
import time
import urllib.error
import urllib.request

import hl7
import hl7.mllp
import pytest
from hl7.client import MLLPClient
from sqlalchemy import create_engine, text

from tests.support import ExchangeProcess, MLLPConnection, adt, api_request, msa, write_config


def stored(database_url: str, sql: str, **params):
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql), params).all()
    finally:
        engine.dispose()


def test_python_hl7_client_gets_aa_and_the_message_is_stored_raw(exchange, database_url):
    message = adt("E2E-1")
    with MLLPClient(*exchange.address) as client:
        reply = client.send_message(message.decode())
    ack = hl7.parse(reply.decode() if isinstance(reply, bytes) else reply)
    assert str(ack.segment("MSA")[1]) == "AA"
    assert str(ack.segment("MSA")[2]) == "E2E-1"
    assert str(ack.segment("MSH")[9]) == "ACK^A01^ACK"
    rows = stored(database_url, "select raw, state, ack_code, ack from message where control_id = 'E2E-1'")
    assert len(rows) == 1
    raw, state, code, stored_ack = rows[0]
    assert bytes(raw) == message
    assert (state, code) == ("accepted", "AA")
    framed = reply.decode() if isinstance(reply, bytes) else reply
    assert framed.startswith("\x0b") and framed.endswith("\x1c\r")
    assert bytes(stored_ack).decode() == framed[1:-2]  # the exact ACK sent is the one stored


def test_resent_message_gets_the_same_ack_and_is_stored_once(exchange, database_url):
    with MLLPConnection(exchange.address) as conn:
        first = conn.request(adt("E2E-DUP"))
        second = conn.request(adt("E2E-DUP"))
    assert first == second  # the stored ACK, byte for byte (same MSH-10 and time)
    assert msa(first)[:2] == ["AA", "E2E-DUP"]
    rows = stored(database_url, "select id from message where control_id = 'E2E-DUP'")
    assert len(rows) == 1
    history = stored(database_url, "select state from message_event where message_id = :id order by id", id=rows[0][0])
    assert [h[0] for h in history] == ["accepted", "resent"]


def test_a_sender_that_half_closes_after_its_frames_gets_every_ack(exchange):
    """`printf ... | nc host port` and batch senders shut their side down after the last frame."""
    import socket

    with MLLPConnection(exchange.address) as conn:
        conn.send(adt("E2E-HALF-1"))
        conn.send(adt("E2E-HALF-2"))
        conn.sock.shutdown(socket.SHUT_WR)
        assert [msa(conn.read_frame())[:2] for _ in range(2)] == [["AA", "E2E-HALF-1"], ["AA", "E2E-HALF-2"]]
        assert conn.sock.recv(1) == b""  # then the exchange closes


def test_same_control_id_from_another_facility_is_a_different_message(exchange, database_url):
    with MLLPConnection(exchange.address) as conn:
        assert msa(conn.request(adt("E2E-SAME", facility="GENHOSP")))[0] == "AA"
        assert msa(conn.request(adt("E2E-SAME", facility="OAKNH")))[0] == "AA"
    assert len(stored(database_url, "select id from message where control_id = 'E2E-SAME'")) == 2


def test_asyncio_client_pipelines_many_messages_on_one_connection(exchange):
    async def run():
        reader, writer = await hl7.mllp.open_hl7_connection(*exchange.address)
        try:
            ids = [f"ASYNC-{i}" for i in range(50)]
            for cid in ids:  # all written before any ACK is read
                writer.writemessage(hl7.parse(adt(cid).decode()))
            await writer.drain()
            acks = [await asyncio.wait_for(reader.readmessage(), 30) for _ in ids]
        finally:
            writer.close()
        return ids, acks

    ids, acks = asyncio.run(run())
    assert [str(a.segment("MSA")[2]) for a in acks] == ids  # in order
    assert {str(a.segment("MSA")[1]) for a in acks} == {"AA"}


def test_hl7apy_built_message_is_accepted_and_our_ack_validates_in_hl7apy(exchange):
    from hl7apy.core import Message
    from hl7apy.parser import parse_message

    m = Message("ADT_A01", version="2.5")
    m.msh.msh_3 = "HL7APY"
    m.msh.msh_4 = "HHCARE"
    m.msh.msh_5 = "EXCHANGE"
    m.msh.msh_6 = "EXCHANGE"
    m.msh.msh_9 = "ADT^A01^ADT_A01"
    m.msh.msh_10 = "HL7APY-1"
    m.msh.msh_11 = "P"
    m.evn.evn_2 = "20261127120000"
    m.pid.pid_3 = "HH-3391^^^HHCARE^MR"
    m.pid.pid_5 = "TESTPATIENT^BETA"
    m.pv1.pv1_2 = "O"
    with MLLPConnection(exchange.address) as conn:
        reply = conn.request(m.to_er7().encode())
    ack = parse_message(reply.decode(), find_groups=False)
    assert ack.msa.msa_1.value == "AA"
    assert ack.msa.msa_2.value == "HL7APY-1"
    assert ack.msh.msh_12.value == "2.5"
    assert ack.msh.msh_6.value == "HHCARE"  # the ACK goes back to the sender
    ack.validate()  # hl7apy's structural validation of our ACK


def test_rejections_and_errors_over_the_wire(exchange, database_url):
    with MLLPConnection(exchange.address) as conn:
        assert msa(conn.request(adt("R-1", facility="NOBODY")))[0] == "AR"
        assert msa(conn.request(adt("R-2", version="3.1")))[0] == "AR"
        assert msa(conn.request(adt("R-3", processing="T")))[0] == "AR"
        nak = msa(conn.request(adt("R-4").replace(b"ADT^A01^ADT_A01", b"ORU^R01^ORU_R01")))
        assert nak[:2] == ["AR", "R-4"]
        assert msa(conn.request(b"this is not HL7"))[:2] == ["AE", ""]
        assert msa(conn.request(adt("R-5")))[:2] == ["AA", "R-5"]  # still serving
    states = dict(stored(database_url, "select control_id, state from message where control_id like 'R-%'"))
    assert states == {"R-1": "rejected", "R-2": "rejected", "R-3": "rejected", "R-4": "rejected", "R-5": "accepted"}


def test_two_messages_run_together_in_one_frame_are_refused_not_half_applied(exchange, database_url):
    frame = adt("TWO-1", mrn="200001") + adt("TWO-2", mrn="200002")
    with MLLPConnection(exchange.address) as conn:
        nak = msa(conn.request(frame))
    assert nak[:2] == ["AE", "TWO-1"] and "2 messages" in nak[2]
    assert stored(database_url, "select state from message where control_id = 'TWO-1'") == [("error",)]
    assert stored(database_url, "select mrn from patient_record where mrn in ('200001', '200002')") == []


def test_a_rejected_message_is_processed_again_when_resent(exchange):
    with MLLPConnection(exchange.address) as conn:
        assert msa(conn.request(adt("FIX-1", processing="T")))[0] == "AR"
        assert msa(conn.request(adt("FIX-1")))[0] == "AA"


def test_inbound_ack_is_recorded_and_never_answered(exchange, database_url):
    ack = b"MSH|^~\\&|ADT|GENHOSP|EX|EX|20261127120000||ACK^A01^ACK|ACK-IN-1|P|2.5\rMSA|AA|X1\r"
    with MLLPConnection(exchange.address) as conn:
        conn.send(ack)
        assert conn.expect_silence(0.5)
        assert msa(conn.request(adt("AFTER-ACK")))[:2] == ["AA", "AFTER-ACK"]
    assert stored(database_url, "select state from message where control_id = 'ACK-IN-1'") == [("ignored",)]


def test_enhanced_mode_gets_a_commit_ack(exchange):
    with MLLPConnection(exchange.address) as conn:
        reply = conn.request(adt("ENH-1", extra="|||AL|NE"))
        assert msa(reply)[:2] == ["CA", "ENH-1"]
        assert msa(conn.request(adt("ENH-2", facility="NOBODY", extra="|||AL|AL")))[0] == "CR"


def test_healthz_and_metrics(exchange):
    with MLLPConnection(exchange.address) as conn:
        conn.request(adt("MET-1"))
    host, port = exchange.http
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10) as r:
        assert r.status == 200
        body = json.load(r)
    assert body["status"] == "ok"
    if body["database"] == "sqlite":  # room beside the database file; a PostgreSQL server's is its own
        assert isinstance(body["disk_free_bytes"], int) and body["disk_free_bytes"] > 16 * 1024 * 1024
    else:
        assert body["disk_free_bytes"] is None
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'exchange_acks_total{code="AA"}' in metrics
    assert 'exchange_messages_received_total{facility="GENHOSP"}' in metrics
    assert "exchange_commit_batch_size_bucket" in metrics
    assert 'exchange_match_decisions_total{action="new"}' in metrics  # MET-1's patient: a new person


def test_healthz_says_disk_full_while_the_next_message_may_not_fit(tmp_path):
    """Found by a failure audit: with the SQLite disk full, /healthz went back to ok 30 s after
    the last failed commit if nothing more arrived. A node with less room than the largest
    message it accepts says so (here: a max_frame_bytes no disk has)."""
    config = write_config(tmp_path, server_extra=f"max_frame_bytes = {2 ** 60}")
    proc = ExchangeProcess(config, f"sqlite:///{tmp_path / 'full.db'}").start()
    try:
        host, port = proc.http
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10)
        assert answer.value.code == 503
        body = json.load(answer.value)
        assert body["status"] == "disk_full" and 0 < body["disk_free_bytes"] < 2 ** 60
    finally:
        proc.stop()


def healthz(exchange) -> dict:
    host, port = exchange.http
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10) as r:
        return json.load(r)


def test_healthz_shows_a_commit_waiting_on_a_lock(exchange, database_url):
    """A writer behind a lock it cannot get acknowledges nothing; /healthz shows how long the
    commit in flight has waited (and answers 503 "stalled" past app.COMMIT_STALLED)."""
    assert healthz(exchange)["writer"]["commit_seconds"] == 0.0
    engine = create_engine(database_url)
    try:
        with engine.connect() as locker, MLLPConnection(exchange.address) as conn:
            if engine.dialect.name == "sqlite":
                locker.exec_driver_sql("BEGIN IMMEDIATE")  # the one write lock (the writer waits busy_timeout)
            else:
                locker.execute(text("BEGIN"))
                locker.execute(text("LOCK TABLE message IN EXCLUSIVE MODE"))  # reads pass, inserts wait
            conn.send(adt("LOCKED-1"))
            deadline = time.monotonic() + 10
            while (body := healthz(exchange))["writer"]["commit_seconds"] < 1.0:
                assert time.monotonic() < deadline, body
                time.sleep(0.1)
            assert body["status"] == "ok" and conn.expect_silence(0.1)  # no ACK before the commit
            host, port = exchange.http
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
                gauge = [line for line in r.read().decode().splitlines()
                         if line.startswith("exchange_commit_in_flight_seconds ")]
            assert len(gauge) == 1 and float(gauge[0].split()[1]) >= 1.0
            locker.rollback()
            assert msa(conn.read_frame())[:2] == ["AA", "LOCKED-1"]
    finally:
        engine.dispose()
    assert healthz(exchange)["writer"]["commit_seconds"] == 0.0


def test_healthz_says_failing_while_messages_go_unanswered(exchange, database_url):
    """Found by an audit: a SQLite database another process held locked answered nothing for
    40 s, each commit giving up after the busy timeout (5 s), while /healthz said ok."""
    if not database_url.startswith("sqlite"):
        return  # PostgreSQL waits on the lock: "stalled" (above)
    host, port = exchange.http
    engine = create_engine(database_url)
    try:
        with engine.connect() as locker:
            locker.exec_driver_sql("BEGIN IMMEDIATE")
            with MLLPConnection(exchange.address) as conn:
                conn.send(adt("LOCKED-OUT"))
                with pytest.raises((ConnectionError, OSError)):
                    conn.read_frame()  # no ACK: the sender keeps the message
            try:
                urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10)
                raise AssertionError("200 while messages went unanswered")
            except urllib.error.HTTPError as exc:
                body = json.load(exc)
                assert exc.code == 503 and body["status"] == "failing" and body["writer"]["unanswered_seconds"] >= 0
            locker.rollback()
        with MLLPConnection(exchange.address) as conn:
            assert msa(conn.request(adt("LOCKED-OUT")))[:2] == ["AA", "LOCKED-OUT"]  # the resend
        body = healthz(exchange)
        assert body["status"] == "ok" and body["writer"]["unanswered_seconds"] is None
    finally:
        engine.dispose()


def test_a_stopped_nodes_session_holding_the_links_lock_is_ended_by_this_node(tmp_path, database_url):
    """Found by the multi-node audits: a node stopped in the middle of a pipeline (PostgreSQL
    counts it active, waiting for the client: no idle timeout ends it) held the links lock, and
    every node's intake waited as long as it stayed stopped; then the look for such sessions
    died at its first run (a TypeError), and no test ran it through `exchange serve`."""
    import psycopg

    from exchange.store.db import LINKS_LOCK

    if not database_url.startswith("postgresql"):
        return  # one node on SQLite: nothing to look for
    node = ExchangeProcess(write_config(tmp_path, server_extra="stale_session = 2"), database_url).start()
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    stopped = psycopg.connect(dsn, application_name="exchange writer elsewhere:1", autocommit=True)
    try:
        stopped.execute("BEGIN")
        pg = stopped.pgconn  # the other node stops between two statements of a pipeline
        pg.enter_pipeline_mode()
        pg.send_query_params(b"SELECT pg_advisory_xact_lock(%d, %d)" % LINKS_LOCK, None)
        pg.send_flush_request()
        pg.flush()
        started = time.monotonic()
        with MLLPConnection(node.address) as conn:
            assert msa(conn.request(adt("AFTER-STALE")))[:2] == ["AA", "AFTER-STALE"]
        assert 2.0 <= time.monotonic() - started < 20
        node.expect(r"ended 1 database session\(s\) of a stopped node", timeout=10)  # counted by then
        host, port = node.http
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
            assert 'exchange_stale_sessions_ended_total{role="writer"} 1.0' in r.read().decode()
    finally:
        stopped.close()
        node.stop()


def test_sigterm_finishes_in_flight_work_and_exits_cleanly(exchange, database_url):
    conns = [MLLPConnection(exchange.address) for _ in range(4)]
    for i, c in enumerate(conns):
        for j in range(20):
            c.send(adt(f"TERM-{i}-{j}"))
    acked = set()
    for c in conns:  # read some answers, then stop the server while others are in flight
        for _ in range(5):
            acked.add(msa(c.read_frame())[1])
    assert exchange.terminate() == 0
    for c in conns:
        while True:
            try:
                acked.add(msa(c.read_frame())[1])
            except (ConnectionError, OSError):
                break
        c.close()
    stored_ids = {r[0] for r in stored(database_url, "select control_id from message where control_id like 'TERM-%'")}
    assert acked <= stored_ids
    assert "exchange stopped cleanly" in "".join(exchange.output)


def test_a_dead_writer_costs_no_acknowledged_message_and_is_replaced(exchange, database_url):
    import os
    import signal
    import subprocess
    import time

    with MLLPConnection(exchange.address) as conn:
        assert msa(conn.request(adt("W-1")))[0] == "AA"
    children = subprocess.run(["pgrep", "-P", str(exchange.proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1, children  # the writer process
    # Found by a black-box audit: the new writer read the file as edited since (here: broken),
    # not the configuration the server runs, and crashed in a loop, every message unanswered.
    exchange.config.write_text("garbage = [\n", encoding="utf-8")
    os.kill(int(children[0]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # a new writer takes over; until then frames get no ACK and the connection closes
        try:
            with MLLPConnection(exchange.address, timeout=10) as conn:
                reply = conn.request(adt("W-2"))
            break
        except (ConnectionError, OSError):
            assert time.monotonic() < deadline, "no new writer"
    assert msa(reply)[:2] == ["AA", "W-2"]
    assert stored(database_url, "select count(*) from message where control_id in ('W-1', 'W-2')") == [(2,)]


def test_an_aa_means_applied_the_record_answers_as_soon_as_the_ack_arrives(exchange, database_url):
    with MLLPConnection(exchange.address) as conn:
        assert msa(conn.request(adt("REC-1", mrn="GH-1")))[0] == "AA"
        renamed = adt("REC-2", event="A08", mrn="GH-1").replace(b"TESTPATIENT^ALPHA^Q", b"RENAMED^BETA")
        assert msa(conn.request(renamed))[0] == "AA"
        record = api_request(exchange, database_url, "GET", "/api/records/GENHOSP/GH-1")
        assert record["name"]["family"] == "RENAMED" and record["name"]["given"] == "BETA"
        assert [(e["visit_number"], e["status"]) for e in record["encounters"]] == [("VREC-1", "admitted"),
                                                                                    ("VREC-2", "admitted")]
        assert msa(conn.request(adt("REC-3", event="A03", mrn="GH-1").replace(b"VREC-3", b"VREC-1")))[0] == "AA"
        no_patient = adt("REC-4", mrn="")
        answer = msa(conn.request(no_patient))
    assert answer[:2] == ["AE", "REC-4"] and "PID-3" in conn_text(answer)
    record = api_request(exchange, database_url, "GET", "/api/records/GENHOSP/GH-1")
    assert dict((e["visit_number"], e["status"]) for e in record["encounters"])["VREC-1"] == "discharged"
    state = stored(database_url, "select state, reason from message where control_id = 'REC-4'")
    assert state[0][0] == "error" and "PID-3" in state[0][1]


def conn_text(fields: list[str]) -> str:
    return "|".join(fields)


BUGGY_WRITER = textwrap.dedent("""
    # Loaded by every Python process of this test's exchange (PYTHONPATH): the writer's patient
    # index fails, as a bug would, on any batch holding the record GENHOSP BUG-1.
    import exchange.store.index as index

    _write = index.write

    def write(conn, plan, state, *args, **kwargs):
        if ("GENHOSP", "BUG-1") in state.records:
            raise TypeError("a bug in the patient index")
        return _write(conn, plan, state, *args, **kwargs)

    index.write = write
""")


def test_a_message_the_exchange_fails_to_apply_is_answered_ae_and_the_feed_goes_on(tmp_path, database_url,
                                                                                 monkeypatch):
    """Found by a black-box audit: an A24 the patient index could not write (a bug) rolled back its
    batch, alone too, and got no ACK; the connection closed, and the sender, resending in order,
    stalled its whole feed on it. Now it is stored with nothing of it applied and answered AE 207
    (after that commit), on the same connection, and the next message is applied."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(BUGGY_WRITER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "inject"), os.environ.get("PYTHONPATH", "")]))
    proc = ExchangeProcess(write_config(tmp_path), database_url).start()
    try:
        with MLLPConnection(proc.address) as conn:
            assert msa(conn.request(adt("E2E-BUG-0", mrn="OK-0")))[:2] == ["AA", "E2E-BUG-0"]
            answer = conn.request(adt("E2E-BUG-1", mrn="BUG-1"))
            assert msa(answer)[:2] == ["AE", "E2E-BUG-1"] and b"207" in answer
            assert msa(conn.request(adt("E2E-BUG-2", mrn="OK-2")))[:2] == ["AA", "E2E-BUG-2"]
        proc.expect(r"rolled back: TypeError, raised at")  # the writer reports where (not what: no data)
        assert stored(database_url, "select control_id, state, ack_code, dedup from message order by id") in (
            [("E2E-BUG-0", "accepted", "AA", True), ("E2E-BUG-1", "error", "AE", False),
             ("E2E-BUG-2", "accepted", "AA", True)],
            [("E2E-BUG-0", "accepted", "AA", 1), ("E2E-BUG-1", "error", "AE", 0), ("E2E-BUG-2", "accepted", "AA", 1)])
        assert stored(database_url, "select mrn from patient_record order by mrn") == [("OK-0",), ("OK-2",)]
    finally:
        proc.stop()
