"""Delivery end to end: the real worker in a process of its own (tests/delivery/node.py,
or ``exchange serve``), real loopback sockets, and receiving systems written by
others (python-hl7's asyncio server, hl7apy's MLLPServer; tests/delivery/peers.py).
Copies are queued straight into the outbox with ``enqueue``, as the writer does.

Waiting is polling the database (or a peer) with a deadline; nothing sleeps a
fixed time. Timings are shrunk (timeout 1-2 s, retries from 0.1 s, poll 0.2 s).
"""
from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from exchange.store.db import make_engine, upgrade, write_transaction
from exchange.store.messages import insert_messages
from exchange.store.outbox import NewCopy, enqueue, get_delivery, retry
from exchange.store.schema import delivery_table
from tests.delivery.peers import HL7apyPeer, Hl7Peer, free_port
from tests.support import ExchangeProcess, delivery_config, new_message, write_config
from tests.test_tls import pki  # noqa: F401 - the test CA, server and facility certificates (a fixture)

REPO = Path(__file__).resolve().parents[2]


def copy_text(destination: str, control_id: str, n: int) -> bytes:
    return (
        f"MSH|^~\\&|EXCHANGE|EXCHANGE|{destination}-ENGINE|{destination}|20261127120000||ADT^A01^ADT_A01|{control_id}|P|2.5\r"
        f"EVN|A01|20261127120000\r"
        f"PID|1||N{n:05d}^^^{destination}^MR~{n}^^^EXCHANGE^PI||TESTPATIENT^NUMBER{n}||19700101|F\r"
        f"PV1|1|I|W1^101^A||||||||||||||||V{n}\r"
    ).encode()


class Outbox:
    """The test's side of the database: queue copies, watch their states."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = make_engine(url)
        upgrade(self.engine)
        with write_transaction(self.engine) as conn:
            self.message_id = insert_messages(conn, [new_message("SRC-1")])[0]
        self.ids: dict[str, int] = {}

    def enqueue(self, destination: str, control_ids: list[str]) -> None:
        now = datetime.now(timezone.utc)
        copies = [
            NewCopy(destination, self.message_id, c, copy_text(destination, c, i), now, person_id=1, reason="default")
            for i, c in enumerate(control_ids)
        ]
        with write_transaction(self.engine) as conn:
            self.ids.update(zip(control_ids, enqueue(conn, copies)))

    def states(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return dict(conn.execute(select(delivery_table.c.control_id, delivery_table.c.state)).all())

    def get(self, control_id: str):
        with self.engine.connect() as conn:
            return get_delivery(conn, self.ids[control_id])

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; states: {self.states()}")
            time.sleep(0.05)

    def all_delivered(self) -> bool:
        states = self.states()
        return bool(states) and set(states.values()) == {"delivered"}

    def close(self) -> None:
        self.engine.dispose()


class Node:
    """tests/delivery/node.py in a subprocess."""

    def __init__(self, url: str, destinations: dict[str, str], log: Path, **settings: float) -> None:
        args = [sys.executable, "-m", "tests.delivery.node", "--database", url]
        for code, endpoint in destinations.items():
            args += ["--dest", f"{code}={endpoint}"]
        for name, value in settings.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self.log = log
        self._log_file = open(log, "ab")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log_file)
        line = self.proc.stdout.readline()
        assert line.strip() == b"node ready", f"node did not start: {line!r}\n{self.output()}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError("node did not stop on SIGTERM:\n" + self.output())
        self._log_file.close()
        return self.proc.returncode


@pytest.fixture
def outbox(database_url: str):
    box = Outbox(database_url)
    yield box
    box.close()


@pytest.fixture
def nodes(tmp_path):
    started: list[Node] = []

    def start(url: str, destinations: dict[str, str], **settings: float) -> Node:
        node = Node(url, destinations, tmp_path / f"node{len(started) + 1}.log", **settings)
        started.append(node)
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            node.stop()


def ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(count)]


def first_seen(received: list[str]) -> list[str]:
    return list(dict.fromkeys(received))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def increasing_runs(received: list[str]) -> list[list[str]]:
    runs: list[list[str]] = []
    for control_id in received:
        if runs and control_id > runs[-1][-1]:
            runs[-1].append(control_id)
        else:
            runs.append([control_id])
    return runs


def test_copies_are_delivered_in_order_to_python_hl7_and_hl7apy(outbox: Outbox, nodes) -> None:
    nh, hh = Hl7Peer().start(), HL7apyPeer().start()
    try:
        to_nh, to_hh = ids("N", 30), ids("H", 15)
        outbox.enqueue("OAKNH", to_nh[:10])
        outbox.enqueue("HHCARE", to_hh)
        node = nodes(outbox.url, {"OAKNH": nh.endpoint, "HHCARE": hh.endpoint})
        outbox.enqueue("OAKNH", to_nh[10:])  # while it runs: found by the poll
        outbox.wait(outbox.all_delivered, "every copy delivered")
        assert nh.received == to_nh  # in order, each once
        assert hh.received == to_hh
        assert nh.connections == 1  # python-hl7's server keeps the connection
        h0 = outbox.get("H0000")
        assert (h0.attempts, h0.ack_code, h0.last_error) == (1, "AA", None)
        assert node.stop() == 0
    finally:
        nh.stop()
        hh.stop()


def test_a_destination_down_for_a_while_gets_everything_in_order(outbox: Outbox, nodes) -> None:
    port = free_port()  # nothing listens there yet
    sent = ids("D", 40)
    outbox.enqueue("OAKNH", sent[:20])
    node = nodes(outbox.url, {"OAKNH": f"127.0.0.1:{port}"}, timeout=1, retry_initial=0.1, retry_max=0.4, poll=0.2)
    outbox.wait(lambda: outbox.get("D0000").attempts >= 3, "three failed attempts")
    head = outbox.get("D0000")
    assert head.state == "queued" and head.last_error.startswith("cannot connect")
    assert outbox.get("D0001").attempts == 0  # the head holds the rest back
    outbox.enqueue("OAKNH", sent[20:])
    peer = Hl7Peer(port=port).start()  # the destination comes back
    try:
        outbox.wait(outbox.all_delivered, "every copy delivered")
        assert peer.received == sent
        assert node.stop() == 0
    finally:
        peer.stop()


def test_ae_fails_the_copy_with_the_reason_and_an_operator_retry_delivers_it(outbox: Outbox, nodes) -> None:
    peer = Hl7Peer(answer=lambda control_id, seen: "AE" if control_id == "D0002" and seen == 0 else "AA").start()
    try:
        sent = ids("D", 5)
        outbox.enqueue("OAKNH", sent)
        nodes(outbox.url, {"OAKNH": peer.endpoint})
        outbox.wait(lambda: outbox.states().get("D0004") == "delivered", "the queue to move past the failed copy")
        failed = outbox.get("D0002")
        assert (failed.state, failed.ack_code, failed.last_error, failed.attempts) == ("failed", "AE", "AE: MRN not on file", 1)
        assert peer.received == sent
        with write_transaction(outbox.engine) as conn:
            retry(conn, failed.id, "ops", datetime.now(timezone.utc), config=delivery_config({"OAKNH": peer.endpoint}),
                  force=True)  # D0003 and D0004 went out since
        outbox.wait(outbox.all_delivered, "the requeued copy delivered")  # found by the poll (another process)
        assert peer.received == sent + ["D0002"]
        again = outbox.get("D0002")
        assert (again.attempts, again.ack_code, again.last_error, again.retried_by) == (2, "AA", None, "ops")
    finally:
        peer.stop()


def test_a_wrong_msa2_or_no_answer_closes_the_connection_and_the_copy_goes_again(outbox: Outbox, nodes) -> None:
    def answer(control_id: str, seen: int) -> str:
        if seen == 0 and control_id == "D0001":
            return "wrong-msa2"
        if seen == 0 and control_id == "D0003":
            return "silent"
        return "AA"

    peer = Hl7Peer(answer=answer).start()
    try:
        sent = ids("D", 6)
        outbox.enqueue("OAKNH", sent)
        nodes(outbox.url, {"OAKNH": peer.endpoint}, timeout=1.5, retry_initial=0.1, retry_max=0.2, poll=0.2)
        outbox.wait(outbox.all_delivered, "every copy delivered")
        # each copy that got no usable answer went again, right after itself: nothing overtook it
        assert peer.received == ["D0000", "D0001", "D0001", "D0002", "D0003", "D0003", "D0004", "D0005"]
        assert peer.connections == 3  # a new connection after each of the two
        d1, d3 = outbox.get("D0001"), outbox.get("D0003")
        assert (d1.attempts, d3.attempts) == (2, 2)
    finally:
        peer.stop()


# Several nodes share a PostgreSQL database (SQLite: one node).
@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True)
def test_two_nodes_on_postgresql_one_killed_mid_run(outbox: Outbox, nodes) -> None:
    nh, hh = Hl7Peer().start(), Hl7Peer().start()
    try:
        to_nh, to_hh = ids("N", 300), ids("H", 300)
        outbox.enqueue("OAKNH", to_nh)
        outbox.enqueue("HHCARE", to_hh)
        destinations = {"OAKNH": nh.endpoint, "HHCARE": hh.endpoint}
        first = nodes(outbox.url, destinations, timeout=30)  # no retry while the destinations hold their answers
        # the first node serves both destinations...
        wait_for(lambda: len(nh.received) > 50 and len(hh.received) > 50, "the first node to deliver")
        nh.gate.clear()  # ...the destinations stop answering: a copy in flight for each...
        hh.gate.clear()
        second = nodes(outbox.url, destinations)  # ...the second node waits for their locks...
        first.kill()  # ...and the first dies mid-delivery, outcomes not all recorded
        at_kill = (len(nh.received), len(hh.received))
        nh.gate.set()
        hh.gate.set()
        assert at_kill[0] < 300 and at_kill[1] < 300
        outbox.wait(outbox.all_delivered, "the second node to take over and finish")
        assert second.output().count("serving it on this node") == 2
        for peer, sent in ((nh, to_nh), (hh, to_hh)):
            assert first_seen(peer.received) == sent  # every copy, in order
            # What each node sent is one run of consecutive copies, in order. The second
            # node starts at the first copy whose outcome the killed one had not recorded
            # (sent again, same MSH-10: at least once), and goes on to the end.
            runs = increasing_runs(peer.received)
            assert len(runs) <= 2, [(r[0], r[-1], len(r)) for r in runs]
            for run in runs:
                start = sent.index(run[0])
                assert run == sent[start : start + len(run)]
            if len(runs) == 2:
                first_run, second_run = runs
                assert second_run[-1] == sent[-1]
                resent = sent.index(first_run[-1]) - sent.index(second_run[0]) + 1
                assert 0 <= resent <= 10, resent  # outcomes recorded while the next copies went out
        assert second.stop() == 0
    finally:
        nh.stop()
        hh.stop()


def test_exchange_serve_delivers_and_stops_cleanly(tmp_path) -> None:
    peer = Hl7Peer().start()
    url = f"sqlite:///{tmp_path / 'exchange.db'}"
    box = Outbox(url)  # migrated here; serve migrates too
    try:
        facilities = f"""
[[facility]]
code = "GENHOSP"
name = "General Hospital"
kind = "hospital"
authority = "GENHOSP"

[[facility]]
code = "OAKNH"
name = "Oakwood Nursing Home"
kind = "nursing_home"
authority = "OAKNH"
deliver_to = "{peer.endpoint}"
"""
        config = write_config(tmp_path, facilities=facilities, server_extra="delivery_poll = 0.2\nretry_initial = 0.1")
        exchange = ExchangeProcess(config, url).start()
        try:
            sent = ids("S", 5)
            box.enqueue("OAKNH", sent)
            box.wait(box.all_delivered, "copies delivered by exchange serve")
            assert peer.received == sent
            host, port = exchange.http
            metrics = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
            assert 'exchange_delivery_attempts_total{destination="OAKNH",outcome="delivered"} 5.0' in metrics
            assert 'exchange_delivery_latency_seconds_count{destination="OAKNH"} 5.0' in metrics
            assert 'exchange_delivery_serving{destination="OAKNH"} 1.0' in metrics
            assert 'exchange_delivery_queue_depth{destination="OAKNH"}' in metrics
        finally:
            assert exchange.terminate() == 0
    finally:
        box.close()
        peer.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_delivery_over_mutual_tls(outbox: Outbox, nodes, pki) -> None:  # noqa: F811
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_key, server_cert = pki["server"]
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(cafile=pki["ca"])
    context.verify_mode = ssl.CERT_REQUIRED  # the facility's engine wants our client certificate
    peer = Hl7Peer(ssl_context=context).start()
    try:
        key, cert = pki["oaknh"]
        endpoint = f"tls:host=127.0.0.1:port={peer.port}:trustRoots={pki['ca_dir']}:certificate={cert}:privateKey={key}"
        sent = ids("T", 3)
        outbox.enqueue("OAKNH", sent)
        nodes(outbox.url, {"OAKNH": endpoint})
        outbox.wait(outbox.all_delivered, "copies delivered over TLS")
        assert peer.received == sent and peer.client_subjects == ["oaknh-engine"]
    finally:
        peer.stop()


@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True)
def test_a_node_that_loses_its_database_connection_recovers_in_order(outbox: Outbox, nodes) -> None:
    peer = Hl7Peer().start()
    try:
        sent = ids("P", 200)
        outbox.enqueue("OAKNH", sent)
        node = nodes(outbox.url, {"OAKNH": peer.endpoint})
        wait_for(lambda: len(peer.received) > 30, "deliveries")
        peer.gate.clear()  # a copy in flight...
        with outbox.engine.connect() as conn:  # ...when the database drops the node's connections (and its lock)
            ended = conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).scalar()
        assert ended >= 1
        peer.gate.set()
        outbox.wait(outbox.all_delivered, "every copy delivered after the node reconnected")
        assert first_seen(peer.received) == sent
        runs = increasing_runs(peer.received)
        assert len(runs) <= 2, [(r[0], r[-1], len(r)) for r in runs]
        assert "database error" in node.output()
        assert node.stop() == 0
    finally:
        peer.stop()
