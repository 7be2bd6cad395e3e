"""DestinationWorker driven without sockets or sleeping: StringTransport peers,
task.Clock for time, the store on a real SQLite database with its calls run
inline (the thread pool's place)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from twisted.internet.defer import fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from exchange.delivery.policy import Settings
from exchange.delivery.worker import DeliveryProtocol, DestinationStore, DestinationWorker
from exchange.mllp.framing import MLLPDecoder, encode
from exchange.store.db import make_engine, upgrade, write_transaction
from exchange.store.messages import insert_messages
from exchange.store.outbox import SUPERSEDED, DeliveryState, NewCopy, RetryResult, enqueue, get_delivery, retry
from exchange.store.schema import delivery_table, patient_record_table, person_table
from tests.support import delivery_config, new_message

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
SETTINGS = Settings(timeout=10.0, retry_initial=1.0, retry_max=8.0, poll=2.0, batch=100)


def copy_payload(control_id: str) -> bytes:
    return f"MSH|^~\\&|EXCHANGE|EXCHANGE|NH|OAKNH|20261127120000||ADT^A01^ADT_A01|{control_id}|P|2.5\rPID|1||N1^^^OAKNH^MR\r".encode()


def ack(control_id: str, code: str = "AA", text: str = "") -> bytes:
    return f"MSH|^~\\&|NH|OAKNH|EXCHANGE|EXCHANGE|20261127120001||ACK^A01^ACK|R{control_id}|P|2.5\rMSA|{code}|{control_id}|{text}\r".encode()


class Peers:
    """The destination: each connect() makes a StringTransport connection the test plays."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.connections: list[tuple[DeliveryProtocol, StringTransport]] = []
        self.refuse = False

    def connect(self):
        if self.refuse:
            return fail(ConnectionRefusedError("refused"))
        protocol = DeliveryProtocol(self.clock, timeout=SETTINGS.timeout)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    @property
    def current(self) -> tuple[DeliveryProtocol, StringTransport]:
        return self.connections[-1]

    def sent(self, index: int = -1) -> list[bytes]:
        """Payloads written on connection ``index``."""
        return MLLPDecoder().feed(self.connections[index][1].value())

    def all_sent(self) -> list[str]:
        """MSH-10 of everything written, on every connection, in order."""
        return [p.split(b"\r")[0].split(b"|")[9].decode() for i in range(len(self.connections)) for p in self.sent(i)]

    def reply(self, payload: bytes) -> None:
        self.current[0].dataReceived(encode(payload))

    def settle(self) -> None:
        """What the reactor does after the worker dropped or closed a connection."""
        for protocol, transport in self.connections:
            if transport.disconnecting and not protocol.closed:
                protocol.connectionLost(Failure(ConnectionDone("closed")))

    def hang_up(self) -> None:
        protocol, transport = self.current
        transport.disconnecting = True
        protocol.connectionLost(Failure(ConnectionDone("closed by peer")))


class Harness:
    def __init__(self, tmp_path) -> None:
        self.engine = make_engine(f"sqlite:///{tmp_path / 'exchange.db'}")
        upgrade(self.engine)
        with write_transaction(self.engine) as conn:
            self.message_id = insert_messages(conn, [new_message("SRC-1")])[0]
        self.clock = Clock()
        self.clock.advance(1)
        self.peers = Peers(self.clock)
        self.store = DestinationStore(self.engine, "OAKNH", delivery_config())
        self.worker = DestinationWorker(
            "OAKNH",
            None,
            reactor=self.clock,
            call=lambda fn, *args: maybeDeferred(fn, *args),
            store=self.store,
            settings=SETTINGS,
            now=self.now,
            rand=lambda: 1.0,  # the full ceiling: 1, 2, 4, 8, 8 ... seconds
            connect=self.peers.connect,
        )
        self.ids: dict[str, int] = {}

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.clock.seconds())

    def enqueue(self, *control_ids: str, wake: bool = True, **about) -> None:
        with write_transaction(self.engine) as conn:
            ids = enqueue(
                conn,
                [NewCopy("OAKNH", self.message_id, c, copy_payload(c), self.now(), **about) for c in control_ids],
            )
        self.ids.update(zip(control_ids, ids))
        if wake:
            self.worker.wake()

    def state(self, control_id: str):
        with self.engine.connect() as conn:
            return get_delivery(conn, self.ids[control_id])

    def states(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(delivery_table.c.control_id, delivery_table.c.state)).all()
        return dict(rows)

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def test_copies_go_one_at_a_time_in_order(h: Harness) -> None:
    h.enqueue("D1", "D2", "D3", wake=False)
    done = h.worker.start()
    assert h.peers.sent() == [copy_payload("D1")]  # only the first: one in flight
    h.peers.reply(ack("D1"))
    assert h.peers.all_sent() == ["D1", "D2"]
    h.peers.reply(ack("D2", "CA"))
    h.peers.reply(ack("D3"))
    assert h.peers.all_sent() == ["D1", "D2", "D3"]
    assert h.states() == {"D1": "delivered", "D2": "delivered", "D3": "delivered"}
    d2 = h.state("D2")
    assert (d2.attempts, d2.ack_code, d2.delivered_at) == (1, "CA", h.now())
    assert len(h.peers.connections) == 1  # the connection is kept
    assert h.worker.serving

    # idle: a wake-up sends new copies at once, without waiting for the poll
    h.enqueue("D4")
    assert h.peers.all_sent()[-1] == "D4"
    h.peers.reply(ack("D4"))
    # without a wake-up, the poll finds them
    h.enqueue("D5", wake=False)
    assert h.peers.all_sent()[-1] == "D4"
    h.clock.advance(SETTINGS.poll)
    assert h.peers.all_sent()[-1] == "D5"
    h.peers.reply(ack("D5"))

    stopped = h.worker.stop()
    h.peers.settle()
    assert stopped is done and done.called
    assert h.peers.current[1].disconnecting  # closed at stop


def test_a_refusal_fails_the_copy_and_the_queue_moves_on(h: Harness) -> None:
    h.enqueue("D1", "D2", wake=False)
    h.worker.start()
    h.peers.reply(ack("D1", "AE", "Unknown patient"))
    assert h.peers.all_sent() == ["D1", "D2"]
    h.peers.reply(ack("D2"))
    d1 = h.state("D1")
    assert (d1.state, d1.last_error, d1.ack_code, d1.attempts) == (DeliveryState.FAILED, "AE: Unknown patient", "AE", 1)

    # the operator requeues it, knowing D2 went out since: it goes out at once (an urgent wake-up)
    with write_transaction(h.engine) as conn:
        retry(conn, h.ids["D1"], "ops", h.now(), config=delivery_config(), force=True)
    h.worker.wake(urgent=True)
    assert h.peers.all_sent() == ["D1", "D2", "D1"]
    h.peers.reply(ack("D1"))
    d1 = h.state("D1")
    assert (d1.state, d1.attempts, d1.last_error) == (DeliveryState.DELIVERED, 2, None)
    h.worker.stop()


def test_a_copy_the_running_configuration_no_longer_sends_is_withheld_and_the_queue_moves_on(h: Harness) -> None:
    """The worker checks each copy against the configuration it was started with: a copy routed by a
    [[route]] that the restart removed is recorded withheld, never sent; the copies behind it go on."""
    with write_transaction(h.engine) as conn:
        ids = enqueue(conn, [NewCopy("OAKNH", h.message_id, c, copy_payload(c), h.now(), reason=why)
                             for c, why in (("D1", "default"), ("D2", "residents' admissions"), ("D3", "default"))])
    h.ids.update(zip(("D1", "D2", "D3"), ids))
    h.worker.start()
    h.peers.reply(ack("D1"))
    h.peers.reply(ack("D3"))
    assert h.peers.all_sent() == ["D1", "D3"]
    assert h.states() == {"D1": "delivered", "D2": "withheld", "D3": "delivered"}
    d2 = h.state("D2")
    assert (d2.attempts, d2.last_error) == (0, "withheld: the [[route]] that sent it is gone or no longer names"
                                                " the destination")
    h.worker.stop()


def test_a_wrong_msa2_drops_the_connection_and_the_copy_goes_again(h: Harness) -> None:
    h.enqueue("D1", "D2", wake=False)
    h.worker.start()
    first_protocol, first_transport = h.peers.current
    h.peers.reply(ack("D0"))  # an answer to something else
    assert first_transport.disconnected  # aborted: a late answer is never read
    h.peers.settle()
    d1 = h.state("D1")
    assert (d1.state, d1.attempts) == (DeliveryState.QUEUED, 1)
    assert "MSA-2 'D0'" in d1.last_error and d1.ack_code is None  # not the copy's: never shown as AA
    assert h.peers.all_sent() == ["D1"]  # D2 does not overtake it
    # a new copy committed meanwhile does not cut the wait short either
    h.enqueue("D3")
    assert h.peers.all_sent() == ["D1"]
    h.clock.advance(1.0)  # the first retry: after retry_initial
    assert len(h.peers.connections) == 2 and h.peers.all_sent() == ["D1", "D1"]
    h.peers.reply(ack("D1"))
    h.peers.reply(ack("D2"))
    h.peers.reply(ack("D3"))
    assert h.peers.all_sent() == ["D1", "D1", "D2", "D3"]
    assert h.states() == {"D1": "delivered", "D2": "delivered", "D3": "delivered"}
    assert h.state("D1").attempts == 2
    h.worker.stop()


def test_an_answer_the_peer_repeats_is_skipped_and_the_copy_in_flight_still_waits_for_its_own(h: Harness) -> None:
    """Found by an audit of the copies: a receiver that sends its AA twice (or an engine that
    sends a commit ACK and then its application ACK) had each next copy take the stale answer,
    drop the connection and go again: every copy delivered twice."""
    h.enqueue("D1", "D2", "D3", wake=False)
    h.worker.start()
    protocol, transport = h.peers.current
    h.peers.reply(ack("D1", "CA"))
    h.peers.reply(ack("D1", "AE", "no such ward"))  # its application ACK, while D2 is in flight: not D2's
    assert not transport.disconnected and h.peers.all_sent() == ["D1", "D2"]
    h.peers.reply(ack("D2"))
    h.peers.reply(ack("D2"))
    h.peers.reply(ack("D3"))
    assert h.states() == {"D1": "delivered", "D2": "delivered", "D3": "delivered"}
    assert [h.state(c).attempts for c in ("D1", "D2", "D3")] == [1, 1, 1] and len(h.peers.connections) == 1
    # an answer to a copy this connection never sent is still no answer: dropped, sent again
    h.enqueue("D4")
    h.peers.reply(ack("D9"))
    assert transport.disconnected and h.state("D4").attempts == 1
    h.worker.stop()


def test_no_answer_times_out_drops_the_connection_and_backs_off(h: Harness) -> None:
    h.enqueue("D1", "D2", wake=False)
    h.worker.start()
    protocol, transport = h.peers.current
    h.clock.advance(SETTINGS.timeout)
    assert transport.disconnected
    h.peers.settle()
    d1 = h.state("D1")
    assert (d1.state, d1.attempts, d1.last_error) == (DeliveryState.QUEUED, 1, "no answer within 10 s")
    assert d1.next_attempt_at == h.now() + timedelta(seconds=1)
    # the late answer on the dropped connection is never taken for anything
    protocol.dataReceived(encode(ack("D1")))
    assert h.state("D1").state is DeliveryState.QUEUED
    # again and again: the waits double up to retry_max (1, 2, 4, 8, 8 s with this jitter)
    waits = []
    for _ in range(4):
        before = h.now()
        h.clock.advance((h.state("D1").next_attempt_at - before).total_seconds())
        assert h.peers.all_sent()[-1] == "D1"
        h.clock.advance(SETTINGS.timeout)
        h.peers.settle()
        waits.append((h.state("D1").next_attempt_at - h.now()).total_seconds())
    assert waits == pytest.approx([2.0, 4.0, 8.0, 8.0], rel=1e-4)
    assert h.state("D1").attempts == 5
    h.clock.advance(8.0)
    h.peers.reply(ack("D1"))
    h.peers.reply(ack("D2"))
    assert h.states() == {"D1": "delivered", "D2": "delivered"}
    assert h.peers.all_sent() == ["D1"] * 6 + ["D2"]
    h.worker.stop()


def test_a_destination_that_is_down_gets_everything_in_order_once_back(h: Harness) -> None:
    h.peers.refuse = True
    h.enqueue("D1", "D2", "D3", wake=False)
    h.worker.start()
    for i in range(5):
        h.clock.advance(8.0)
        h.enqueue(f"N{i}")
    d1 = h.state("D1")
    assert d1.state is DeliveryState.QUEUED and d1.attempts >= 3 and d1.last_error.startswith("cannot connect")
    assert h.state("D2").attempts == 0  # never tried: the head holds them back
    h.peers.refuse = False
    h.clock.advance(8.0)
    for control_id in ["D1", "D2", "D3", "N0", "N1", "N2", "N3", "N4"]:
        assert h.peers.all_sent()[-1] == control_id
        h.peers.reply(ack(control_id))
    assert set(h.states().values()) == {"delivered"}
    h.worker.stop()


def test_a_kept_connection_closed_by_the_peer_is_replaced_without_an_attempt(h: Harness) -> None:
    h.enqueue("D1", wake=False)
    h.worker.start()
    h.peers.reply(ack("D1"))
    h.peers.hang_up()  # one message per connection, like hl7apy's MLLPServer
    h.enqueue("D2")
    assert len(h.peers.connections) == 2 and h.peers.sent() == [copy_payload("D2")]
    h.peers.reply(ack("D2"))
    assert h.state("D2").attempts == 1

    # closed just as the next copy goes out: sent again on a new connection at once
    protocol, transport = h.peers.current
    h.enqueue("D3")
    assert h.peers.sent() == [copy_payload("D2"), copy_payload("D3")]
    h.peers.hang_up()
    assert len(h.peers.connections) == 3 and h.peers.sent() == [copy_payload("D3")]
    h.peers.reply(ack("D3"))
    assert (h.state("D3").state, h.state("D3").attempts) == (DeliveryState.DELIVERED, 1)
    # but a new connection lost before the answer is an attempt, and waits
    h.enqueue("D4")
    h.peers.hang_up()  # a kept connection again: replaced at once
    assert len(h.peers.connections) == 4 and h.state("D4").attempts == 0
    h.peers.hang_up()
    d4 = h.state("D4")
    assert (d4.state, d4.attempts) == (DeliveryState.QUEUED, 1) and d4.last_error.startswith("connection lost")
    h.worker.stop()


def test_stop_abandons_the_copy_in_flight_without_losing_it(h: Harness) -> None:
    h.enqueue("D1", "D2", wake=False)
    done = h.worker.start()
    h.peers.reply(ack("D1"))
    assert h.peers.all_sent() == ["D1", "D2"]
    h.worker.stop()
    assert not done.called  # D2 gets a grace period to be answered
    h.clock.advance(5.0)
    assert h.peers.current[1].disconnected
    h.peers.settle()
    assert done.called
    d2 = h.state("D2")
    assert (d2.state, d2.attempts, d2.last_error) == (DeliveryState.QUEUED, 0, None)  # as it was
    assert h.state("D1").state is DeliveryState.DELIVERED


def test_stop_waits_for_an_answer_in_the_grace_period(h: Harness) -> None:
    h.enqueue("D1", "D2", wake=False)
    done = h.worker.start()
    h.worker.stop()
    h.peers.reply(ack("D1"))
    assert done.called and h.peers.all_sent() == ["D1"]  # nothing new goes out
    assert h.states() == {"D1": "delivered", "D2": "queued"}


def test_stop_while_idle_or_backing_off(h: Harness) -> None:
    done = h.worker.start()
    h.worker.stop()
    assert done.called
    assert h.clock.getDelayedCalls() == []


def test_outcomes_not_recorded_are_sent_again(h: Harness) -> None:
    h.enqueue("D1", "D2", wake=False)
    real_record = h.store.record
    calls = []

    def broken(outcomes):
        calls.append(outcomes)
        raise RuntimeError("database went away")

    h.store.record = broken
    h.worker.start()
    h.peers.reply(ack("D1"))  # recorded: fails; D2 is not sent
    assert h.peers.all_sent() == ["D1"] and len(calls) == 1
    assert not h.worker.serving
    h.store.record = real_record
    h.clock.advance(SETTINGS.poll)
    assert h.peers.all_sent() == ["D1", "D1"]  # at least once: same MSH-10 again
    h.peers.reply(ack("D1"))
    h.peers.reply(ack("D2"))
    assert h.states() == {"D1": "delivered", "D2": "delivered"}
    h.worker.stop()


@pytest.mark.parametrize("change", ["split", "opt-out", "sender split"])
def test_a_split_or_an_opt_out_after_the_claim_stops_the_copies_not_yet_sent(h: Harness, change: str) -> None:
    """Found by a black-box audit: the worker checked a batch (up to 100 copies) only when it
    claimed it, so while a backlog drained to a slow destination, copies went out for up to
    100 ACKs after a technician split the destination's record off the person (filed under
    that record at OAKNH), or after the patient opted out. Each copy is checked again just
    before it is written: only the copy in flight at the change still goes."""
    from tests.test_reviews import HANSON, add_record, new_person

    with write_transaction(h.engine) as conn:
        person = add_record(conn, "GENHOSP", "G1", **HANSON)
        add_record(conn, "OAKNH", "O1", person, **HANSON)
        other = new_person(conn)
    h.enqueue("D1", "D2", "D3", wake=False, person_id=person, facility="GENHOSP", mrn="G1", destination_mrn="O1")
    checks = []
    real_check = h.store.check
    h.store.check = lambda copy: checks.append(copy.control_id) or real_check(copy)
    h.worker.start()
    assert h.peers.all_sent() == ["D1"]  # claimed all three; D1 in flight
    with write_transaction(h.engine) as conn:
        if change == "split":  # a technician splits OAKNH's O1 off (a false link)
            conn.execute(patient_record_table.update().where(patient_record_table.c.mrn == "O1")
                         .values(person_id=other))
        elif change == "sender split":  # ... or the hospital's G1, the record the copies are about
            conn.execute(patient_record_table.update().where(patient_record_table.c.mrn == "G1")
                         .values(person_id=other))
        else:
            conn.execute(person_table.update().where(person_table.c.id == person).values(protected=True))
    h.peers.reply(ack("D1"))
    assert h.peers.all_sent() == ["D1"]  # D2 and D3 never written to the destination
    reason = {"split": "withheld: the destination's record is no longer linked to this person",
              "sender split": "withheld: the record it is about is no longer linked to this person",
              "opt-out": "withheld: the person has opted out"}[change]
    assert {c: (h.state(c).state, h.state(c).last_error, h.state(c).attempts) for c in ("D2", "D3")} == {
        "D2": (DeliveryState.WITHHELD, reason, 0), "D3": (DeliveryState.WITHHELD, reason, 0)}
    assert h.state("D1").state is DeliveryState.DELIVERED
    assert checks == ["D1", "D2", "D3"]  # D1 too: the claim's check was older than its new connection
    h.worker.stop()


def test_a_copy_its_destination_renamed_after_the_claim_goes_as_rewritten(h: Harness) -> None:
    """Found by the session-9 two-node audit: OAKNH's A47 (or A40) rewrote the waiting copies in
    the database while a claimed batch drained, and the worker sent the text it had claimed:
    69 copies named the MRN the site had just retired."""
    from exchange.store.outbox import carry_renames
    from tests.test_reviews import HANSON, add_record

    with write_transaction(h.engine) as conn:
        person = add_record(conn, "GENHOSP", "G1", **HANSON)
        add_record(conn, "OAKNH", "N1", person, **HANSON)
    h.enqueue("D1", "D2", "D3", wake=False, person_id=person, facility="GENHOSP", mrn="G1", destination_mrn="N1")
    h.worker.start()
    assert h.peers.all_sent() == ["D1"]  # claimed all three; D1 in flight
    with write_transaction(h.engine) as conn:  # OAKNH renames N1 to N1X, as the A47's batch does
        conn.execute(patient_record_table.update().where(patient_record_table.c.mrn == "N1").values(mrn="N1X"))
        assert carry_renames(conn, [(("OAKNH", "N1"), ("OAKNH", "N1X"))], {"OAKNH": "OAKNH"}) == 3  # D1 too
    h.peers.reply(ack("D1"))
    h.peers.reply(ack("D2"))
    sent = [p for i in range(len(h.peers.connections)) for p in h.peers.sent(i)]
    assert [p.split(b"\r")[1] for p in sent] == [b"PID|1||N1^^^OAKNH^MR", b"PID|1||N1X^^^OAKNH^MR",
                                                  b"PID|1||N1X^^^OAKNH^MR"]
    h.peers.reply(ack("D3"))
    assert h.states() == {"D1": "delivered", "D2": "delivered", "D3": "delivered"}
    h.worker.stop()


def test_the_copy_after_the_first_is_checked_on_a_kept_connection_and_a_failed_check_sends_nothing(h: Harness) -> None:
    """The first copy of a claim goes on the claim's check when the connection is open already (no
    second read); a check the database fails leaves the copy queued and unsent, tried again later."""
    from tests.test_reviews import HANSON, add_record

    with write_transaction(h.engine) as conn:
        person = add_record(conn, "GENHOSP", "G1", **HANSON)
        add_record(conn, "OAKNH", "O1", person, **HANSON)
    about = dict(person_id=person, facility="GENHOSP", mrn="G1", destination_mrn="O1")
    h.enqueue("D1", wake=False, **about)
    checks = []
    real_check = h.store.check

    def check(copy):
        checks.append(copy.control_id)
        if copy.control_id == "D3" and checks.count("D3") == 1:
            raise RuntimeError("database went away")
        return real_check(copy)

    h.store.check = check
    h.worker.start()
    h.peers.reply(ack("D1"))
    assert checks == ["D1"]  # a new connection
    h.enqueue("D2", "D3", **about)
    assert checks == ["D1"] and h.peers.all_sent() == ["D1", "D2"]  # D2: the claim's check, kept connection
    h.peers.reply(ack("D2"))
    assert checks == ["D1", "D3"] and h.peers.all_sent() == ["D1", "D2"]  # D3's check failed: not sent
    assert (h.state("D3").state, h.state("D3").attempts) == (DeliveryState.QUEUED, 0)
    assert h.state("D2").state is DeliveryState.DELIVERED and not h.worker.serving
    h.clock.advance(SETTINGS.poll)
    assert h.peers.all_sent() == ["D1", "D2", "D3"]
    h.peers.reply(ack("D3"))
    assert set(h.states().values()) == {"delivered"}
    h.worker.stop()


def test_a_requeued_copy_does_not_land_after_a_newer_copy_that_was_in_flight_at_the_requeue(h: Harness) -> None:
    """Found by a black-box audit: the retry API's 409 guard counts newer copies delivered, not one in
    flight; an old A08 requeued while the A01 after it was in flight was delivered after it. The
    worker gives such a copy back (failed, superseded) instead of sending it; forced, it goes."""
    about = dict(facility="GENHOSP", mrn="G1")  # one patient: the sender's record
    h.enqueue("OLD", wake=False, **about)
    h.worker.start()
    h.peers.reply(ack("OLD", "AE", "busy"))
    assert h.state("OLD").state is DeliveryState.FAILED
    h.enqueue("NEW1", "NEW2", **about)
    assert h.peers.all_sent() == ["OLD", "NEW1"]  # NEW1 in flight
    with write_transaction(h.engine) as conn:  # nothing newer delivered yet: the API's guard lets it through
        assert retry(conn, h.ids["OLD"], "ops", h.now(), config=delivery_config())[0] is RetryResult.REQUEUED
    h.worker.wake(urgent=True)
    h.peers.reply(ack("NEW1"))
    h.peers.reply(ack("NEW2"))
    assert h.peers.all_sent() == ["OLD", "NEW1", "NEW2"]  # OLD is not sent after them
    old = h.state("OLD")
    assert (old.state, old.last_error, old.attempts, old.retried_by) == (DeliveryState.FAILED, SUPERSEDED, 1, "ops")
    with write_transaction(h.engine) as conn:  # the operator sends it anyway
        assert retry(conn, h.ids["OLD"], "ops", h.now(), config=delivery_config(), force=True)[0] is RetryResult.REQUEUED
    h.worker.wake(urgent=True)
    assert h.peers.all_sent() == ["OLD", "NEW1", "NEW2", "OLD"]
    h.peers.reply(ack("OLD"))
    assert h.states() == {"OLD": "delivered", "NEW1": "delivered", "NEW2": "delivered"}
    h.worker.stop()
