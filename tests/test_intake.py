"""Group commit: batching, ACK release only after the commit, failures,
shutdown drain and backpressure. The thread hop is injected: the test holds
each "transaction" open until it decides it has committed."""
from __future__ import annotations

from datetime import datetime, timezone

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from exchange.acceptance import AcceptancePolicy, FacilityRule
from exchange.hl7.header import read_header
from exchange.intake import AckIds, CommitFailed, GroupCommitter, Intake, Peer
from exchange.outcome import ACCEPTED
from exchange.pipeline import Answer, Received

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def item(n: int, peer: str = "127.0.0.1:1") -> Received:
    raw = f"MSH|^~\\&|A|GENHOSP|B|C|20261127||ADT^A01|C{n}|P|2.5\r".encode()
    return Received(raw, read_header(raw), ACCEPTED, NOW, peer)


def sender(n: int, k: int) -> Received:
    """Message ``n`` from connection ``k``."""
    return item(n, f"127.0.0.1:{1000 + k}")


class Writer:
    """Stands in for the writer thread: records each batch and lets the test commit it."""

    def __init__(self):
        self.batches: list[list[Received]] = []
        self.outcomes: list[list] = []  # delivery outcomes that rode with each batch
        self.commits: list[Deferred] = []

    def __call__(self, items, outcomes=()):
        self.batches.append(list(items))
        self.outcomes.append(list(outcomes))
        d = Deferred()
        self.commits.append(d)
        return d

    def commit(self, index: int = -1):
        batch = self.batches[index]
        self.commits[index].callback(
            [Answer(f"ACK {i.header.control_id}".encode(), "AA", n) for n, i in enumerate(batch)]
        )

    def fail(self, index: int = -1, exc=RuntimeError("database down")):
        self.commits[index].errback(exc)


def results_of(ds):
    out = []
    for d in ds:
        d.addBoth(out.append)
    return out


def test_a_lone_message_is_committed_at_once():
    w = Writer()
    c = GroupCommitter(w)
    got = results_of([c.submit(item(1))])
    assert [len(b) for b in w.batches] == [1]
    assert got == []  # nothing answered before the commit
    w.commit()
    assert got[0].ack == b"ACK C1"


def test_messages_arriving_during_a_commit_share_the_next_transaction():
    w = Writer()
    c = GroupCommitter(w)
    first = results_of([c.submit(item(1))])
    rest = results_of([c.submit(item(n)) for n in range(2, 6)])
    assert [len(b) for b in w.batches] == [1]  # waiting for the first commit
    assert c.pending == 4
    w.commit(0)
    assert [len(b) for b in w.batches] == [1, 4]
    assert len(first) == 1 and rest == []
    w.commit(1)
    assert [a.ack for a in rest] == [b"ACK C2", b"ACK C3", b"ACK C4", b"ACK C5"]


def test_senders_just_answered_share_the_next_batch():
    """Eight senders, each waiting for its ACK: the first to send again does not
    get a batch of its own while the other seven wait for it."""
    w, clock = Writer(), Clock()
    c = GroupCommitter(w, clock=clock, gather=0.002)
    results_of([c.submit(sender(1, 1))])  # a lone message: at once
    results_of([c.submit(sender(n, n)) for n in range(2, 9)])  # the other seven, during its commit
    w.commit(0)
    assert [len(b) for b in w.batches] == [1]  # waiting for sender 1, just answered
    results_of([c.submit(sender(9, 1))])
    assert [len(b) for b in w.batches] == [1, 8]  # at once, no timer needed
    w.commit(1)
    results_of([c.submit(sender(10 + k, k)) for k in range(1, 8)])
    assert [len(b) for b in w.batches] == [1, 8]
    results_of([c.submit(sender(18, 8))])
    assert [len(b) for b in w.batches] == [1, 8, 8]
    assert clock.getDelayedCalls() == []


def test_a_batch_waits_for_senders_at_most_the_gather_time():
    w, clock = Writer(), Clock()
    c = GroupCommitter(w, clock=clock, gather=0.002)
    results_of([c.submit(sender(n, n)) for n in range(4)])
    w.commit(0)  # sender 0 was answered and does not send again
    clock.advance(0.0019)
    assert [len(b) for b in w.batches] == [1]
    clock.advance(0.0001)
    assert [len(b) for b in w.batches] == [1, 3]


def test_a_sender_not_waiting_for_its_acks_is_not_waited_for():
    """One connection streaming without waiting: its next messages are pending already."""
    w, clock = Writer(), Clock()
    c = GroupCommitter(w, clock=clock, gather=0.002)
    results_of([c.submit(sender(n, 1)) for n in range(6)])
    w.commit(0)
    assert [len(b) for b in w.batches] == [1, 5] and clock.getDelayedCalls() == []


def test_without_gather_the_next_batch_starts_with_what_is_pending():
    w, clock = Writer(), Clock()
    c = GroupCommitter(w, clock=clock, gather=0.0)
    results_of([c.submit(sender(n, n)) for n in range(4)])
    w.commit(0)
    assert [len(b) for b in w.batches] == [1, 3]


def test_delivery_outcomes_do_not_wait_for_senders():
    w, clock = Writer(), Clock()
    c = GroupCommitter(w, clock=clock, gather=0.002)
    results_of([c.submit(sender(n, n)) for n in range(4)])
    w.commit(0)
    assert [len(b) for b in w.batches] == [1]  # waiting for sender 0
    c.record_outcomes(["an outcome"])
    assert [len(b) for b in w.batches] == [1, 3] and w.outcomes[-1] == ["an outcome"]
    assert clock.getDelayedCalls() == []


def test_batches_are_capped():
    w = Writer()
    c = GroupCommitter(w, batch_max=3)
    results_of([c.submit(item(n)) for n in range(8)])
    w.commit(0)
    w.commit(1)
    w.commit(2)
    assert [len(b) for b in w.batches] == [1, 3, 3, 1]


def test_a_failed_batch_is_retried_one_message_at_a_time():
    w = Writer()
    c = GroupCommitter(w)
    results_of([c.submit(item(0))])
    got = results_of([c.submit(item(n)) for n in (1, 2, 3)])
    w.commit(0)
    w.fail(1)  # the batch of three rolled back
    assert [len(b) for b in w.batches[2:]] == [1]
    w.commit(2)
    w.fail(3)  # message 2 fails alone as well: no ACK for it
    w.commit(4)
    assert [g.ack if isinstance(g, Answer) else "failed" for g in got] == [b"ACK C1", "failed", b"ACK C3"]
    for g in got:
        if not isinstance(g, Answer):
            assert g.check(RuntimeError)


def test_a_batch_of_one_that_fails_is_tried_once_more():
    """Two nodes of one PostgreSQL, the same message sent to both: the loser's insert violates the
    unique (facility, MSH-10) index; tried again, it finds the winner's row and its stored answer."""
    w = Writer()
    c = GroupCommitter(w)
    got = results_of([c.submit(item(0))])
    w.fail(0)
    assert [len(b) for b in w.batches] == [1, 1] and got == []
    w.commit(1)
    assert [g.ack for g in got] == [b"ACK C0"]
    again = results_of([c.submit(item(5))])
    w.fail(2)
    w.fail(3)  # failing twice: no ACK, the connection closes, the sender resends
    (failure,) = again
    assert not isinstance(failure, Answer) and failure.check(RuntimeError)


def test_a_message_whose_processing_raises_alone_too_is_stored_unapplied_and_answered():
    """Found by a black-box audit: an A24 the patient index could not write (a bug) rolled back
    every batch it was in, alone too, so it was never answered and its sender, resending in
    order, stalled. A bug fails it the same way at every resend: it is stored with nothing of it
    applied, answered AE 207 once that commits, and the messages after it go on."""
    w = Writer()
    c = GroupCommitter(w)
    results_of([c.submit(item(0))])
    got = results_of([c.submit(item(n)) for n in (1, 2, 3)])
    w.commit(0)
    bug = CommitFailed("TypeError", bug=True)
    w.fail(1, bug)  # the batch of three
    w.commit(2)
    w.fail(3, bug)  # message 2 alone: the same
    (stored,) = w.batches[4]  # stored unapplied: an error outcome, answered AE 207, not deduplicated
    assert stored.header.control_id == "C2" and stored.raw == item(2).raw
    assert stored.decision.verdict.value == "error" and stored.decision.problem.code == 207
    assert stored.dedup_key is None
    assert len(got) == 1  # no ACK before that commit
    w.commit(4)
    w.commit(5)
    assert [g.ack for g in got] == [b"ACK C1", b"ACK C2", b"ACK C3"]


def test_a_message_failing_for_the_database_or_unable_to_store_its_ae_gets_no_ack():
    w = Writer()
    c = GroupCommitter(w)
    down = results_of([c.submit(item(0))])
    w.fail(0, CommitFailed("OperationalError"))
    w.fail(1, CommitFailed("OperationalError"))  # the database, not the message: the sender resends
    assert len(w.batches) == 2 and down[0].check(CommitFailed)
    broken = results_of([c.submit(item(1))])
    w.fail(2, CommitFailed("TypeError", bug=True))
    w.fail(3, CommitFailed("TypeError", bug=True))
    w.fail(4, CommitFailed("OperationalError"))  # its AE could not be stored either
    assert len(w.batches) == 5 and len(broken) == 1 and broken[0].check(CommitFailed)
    results_of([c.submit(item(2))])
    assert len(w.batches) == 6  # the committer goes on


def test_wait_idle_fires_after_the_last_commit():
    w = Writer()
    c = GroupCommitter(w)
    results_of([c.submit(item(1)), c.submit(item(2))])
    idle = results_of([c.wait_idle()])
    w.commit(0)
    assert idle == []
    w.commit(1)
    assert idle == [None]


def test_backlog_limit_and_resume():
    w = Writer()
    c = GroupCommitter(w, max_pending=4, batch_max=2)
    results_of([c.submit(item(n)) for n in range(6)])  # 1 in flight, 5 pending
    assert c.overloaded
    resumed = []
    c.on_capacity(lambda: resumed.append(True))
    w.commit(0)  # 3 pending: still above half
    assert resumed == []
    w.commit(1)  # 1 pending
    assert resumed == [True]


def big(n: int, size: int) -> Received:
    raw = f"MSH|^~\\&|A|GENHOSP|B|C|20261127||ADT^A01|B{n}|P|2.5\rNTE|1||".encode() + b"x" * size + b"\r"
    return Received(raw, read_header(raw), ACCEPTED, NOW, "127.0.0.1:1")


def test_the_backlog_and_each_batch_are_bounded_in_bytes_too(monkeypatch):
    """Found by a black-box audit: 1,200 frames of 200 KB each were all read and held (240 MB)
    because the backlog counted messages only; one batch carried them all to the writer."""
    import exchange.intake as intake

    monkeypatch.setattr(intake, "MAX_PENDING_BYTES", 1000)
    monkeypatch.setattr(intake, "MAX_BATCH_BYTES", 500)
    w = Writer()
    c = GroupCommitter(w, max_pending=100, batch_max=50)
    results_of([c.submit(big(n, 200)) for n in range(8)])  # the first goes at once; 7 x ~250 bytes wait
    assert c.overloaded
    resumed = []
    c.on_capacity(lambda: resumed.append(True))
    w.commit(0)
    assert [len(b) for b in w.batches] == [1, 1]  # two would pass 500 bytes
    size = len(big(0, 200).raw)
    while c.pending * size > 500:  # resumed only once the bytes waiting are under half the limit
        assert resumed == []
        w.commit()
        assert len(w.batches[-1]) == 1
    assert resumed == [True]
    results_of([c.submit(big(99, 2000))])  # one message over the batch limit still goes, alone
    while len(w.batches) < 9 or w.batches[-1][0].header.control_id != "B99":
        w.commit()
    assert len(w.batches[-1]) == 1


def test_intake_rejects_before_commit_and_stores_every_frame():
    w = Writer()
    c = GroupCommitter(w)
    policy = AcceptancePolicy({"GENHOSP": FacilityRule("GENHOSP")})
    intake = Intake(c, policy, lambda f: "utf-8", new_control_id=AckIds(), now=lambda: NOW)
    got = results_of([intake.receive(item(1).raw.replace(b"GENHOSP", b"NOBODY"), Peer("127.0.0.1:9"))])
    (stored,) = w.batches[0]
    assert stored.decision.verdict.value == "reject"
    assert stored.peer == "127.0.0.1:9"
    w.commit()
    assert got == [b"ACK C1"]


def test_ack_ids_are_unique_and_short():
    ids = AckIds(clock=lambda: 1_800_000_000.0)
    many = [ids() for _ in range(10_000)]
    assert len(set(many)) == len(many)
    assert max(map(len, many)) <= 20
    assert AckIds(clock=lambda: 1_800_000_001.0)() != AckIds(clock=lambda: 1_800_000_000.0)()


def test_a_batch_acknowledgement_keeps_the_senders_charset():
    w = Writer()
    policy = AcceptancePolicy({"GENHOSP": FacilityRule("GENHOSP")})
    intake = Intake(GroupCommitter(w), policy, lambda f: "utf-8", new_control_id=AckIds(), now=lambda: NOW)
    msh = "MSH|^~\\&|A|GENHOSP|BLÄH|C|20261127||ADT^A01|C1|P|2.5||||||8859/1"
    payload = f"BHS|^~\\&|A|GENHOSP|BLÄH|C|20261127||||B1\r{msh}\rBTS|1\r".encode("latin-1")
    got = results_of([intake.receive(payload, Peer("127.0.0.1:9"))])
    (item,) = w.batches[0]
    assert item.header.codec == "iso8859-1"
    ack = "MSH|^~\\&|BLÄH|C|A|GENHOSP|20261127||ACK^A01^ACK|X1|P|2.5||||||8859/1\rMSA|AA|C1\r"
    w.commits[0].callback([Answer(ack.encode("latin-1"), "AA", 1)])
    (reply,) = got
    assert b"BL\xc4H" in reply and "Ä".encode() not in reply


def test_delivery_outcomes_ride_with_the_next_transaction():
    """SQLite has one writer: the delivery workers' outcomes are written by it, in the
    transaction after the one in flight (or alone when no message waits)."""
    w = Writer()
    c = GroupCommitter(w)
    results_of([c.submit(item(1))])
    recorded = results_of([c.record_outcomes(["delivered 1"]), c.record_outcomes(["failed 2", "retry 3"])])
    results_of([c.submit(item(2))])
    assert w.outcomes == [[]]  # the first batch was already in flight
    w.commit(0)
    assert [len(b) for b in w.batches] == [1, 1] and w.outcomes[1] == ["delivered 1", "failed 2", "retry 3"]
    assert recorded == []  # not before that transaction commits
    w.commit(1)
    assert recorded == [None, None]
    alone = results_of([c.record_outcomes(["delivered 4"])])
    assert w.batches[2] == [] and w.outcomes[2] == ["delivered 4"]
    w.fail(2)
    assert len(alone) == 1 and alone[0].check(RuntimeError)  # the worker sends those copies again
    idle = results_of([c.wait_idle()])
    assert idle == [None]


def test_commit_seconds_tells_how_long_the_commit_in_flight_has_taken():
    """What /healthz reports (and turns into 503 "stalled"): a writer waiting on a lock held by a
    stopped node acknowledges nothing, and nothing else said so."""
    w, clock = Writer(), Clock()
    c = GroupCommitter(w, clock=clock, gather=0.002)
    assert c.commit_seconds() == 0.0
    results_of([c.submit(item(1))])
    clock.advance(12.5)
    assert c.commit_seconds() == 12.5
    w.commit()
    assert c.commit_seconds() == 0.0
    results_of([c.submit(item(2)), c.submit(item(3))])
    clock.advance(1)
    w.fail()  # retried one by one: each single's own commit is timed
    clock.advance(3)
    assert c.commit_seconds() == 3
    w.commit()
    clock.advance(4)
    assert c.commit_seconds() == 4
    w.commit()
    assert c.commit_seconds() == 0.0


def test_a_batch_the_database_failed_is_a_warning_without_a_traceback_and_a_bug_is_critical():
    """Found by a verification audit: a node resumed after its stale session was ended logged the
    retry of its batch at critical level with a traceback, as if it were a bug."""
    from twisted.logger import LogLevel, globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for exc in (CommitFailed("OperationalError"), CommitFailed("TypeError", bug=True)):
            w = Writer()
            c = GroupCommitter(w)
            results_of([c.submit(item(1))])
            w.fail(exc=exc)
    finally:
        globalLogPublisher.removeObserver(events.append)
    retries = [e for e in events if "retrying one by one" in e.get("log_format", "")]
    assert [(e["log_level"], "log_failure" in e) for e in retries] == [(LogLevel.warn, False), (LogLevel.critical, True)]


def test_unanswered_seconds_tell_since_when_messages_go_unanswered_until_one_commits():
    """What /healthz turns into 503 "failing": found by an audit, a SQLite database another process
    held locked for 40 s answered nothing, each commit giving up after 5 s, while /healthz said ok."""
    w, clock = Writer(), Clock()
    c = GroupCommitter(w, clock=clock)
    assert c.unanswered_seconds() is None
    got = results_of([c.submit(item(1))])
    w.fail()  # the batch, then the message alone: no ACK
    w.fail()
    assert len(got) == 1 and got[0].check(RuntimeError)
    clock.advance(4)
    assert c.unanswered_seconds() == 4
    results_of([c.submit(item(2))])
    w.commit()
    assert c.unanswered_seconds() is None
