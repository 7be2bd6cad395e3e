"""An ACK is a promise: SIGKILL the server mid-stream, restart it, resend
everything; every message that got AA is stored, none is stored twice."""
from __future__ import annotations

import threading

from sqlalchemy import create_engine, text

from tests.support import ExchangeProcess, MLLPConnection, adt, msa, write_config

CONNECTIONS = 4
PER_CONNECTION = 500  # 2,000 messages in all


def sender(address, ids, acked: set, lock):
    try:
        with MLLPConnection(address, timeout=30) as conn:
            for cid in ids:
                reply = conn.request(adt(cid, mrn=cid))
                code, control_id = msa(reply)[:2]
                assert control_id == cid
                if code == "AA":
                    with lock:
                        acked.add(cid)
    except (ConnectionError, OSError):
        pass  # the server was killed under us


def test_sigkill_mid_stream_loses_no_acknowledged_message(tmp_path, database_url):
    config = write_config(tmp_path)
    ids = [[f"CRASH-{c}-{i:04d}" for i in range(PER_CONNECTION)] for c in range(CONNECTIONS)]
    every = [cid for chunk in ids for cid in chunk]

    server = ExchangeProcess(config, database_url).start()
    acked: set[str] = set()
    lock = threading.Lock()
    threads = [
        threading.Thread(target=sender, args=(server.address, chunk, acked, lock), daemon=True)
        for chunk in ids
    ]
    for t in threads:
        t.start()
    # Kill once a good part, but not all, of the stream is acknowledged.
    while True:
        with lock:
            if len(acked) >= 600:
                break
        if not any(t.is_alive() for t in threads):
            break
        threads[0].join(0.005)
    server.kill()
    for t in threads:
        t.join(30)
    first_run = set(acked)
    assert 600 <= len(first_run) < len(every), "the kill must land mid-stream"

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            stored_after_kill = {r[0] for r in conn.execute(text("select control_id from message"))}
        assert first_run <= stored_after_kill  # every AA survived the SIGKILL

        server = ExchangeProcess(config, database_url).start()
        try:
            acked.clear()
            threads = [
                threading.Thread(target=sender, args=(server.address, chunk, acked, lock), daemon=True)
                for chunk in ids
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert acked == set(every)  # resends of stored ones get their stored AA
        finally:
            server.stop()

        with engine.connect() as conn:
            counts = conn.execute(
                text("select control_id, count(*) from message group by control_id")
            ).all()
        assert {cid for cid, _ in counts} == set(every)
        assert all(n == 1 for _, n in counts), "a message was stored twice"
    finally:
        engine.dispose()
