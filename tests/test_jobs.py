"""exchange.jobs: the reconciliation jobs, `exchange reconcile` as a user runs it, and
their scheduling in `exchange serve`. On SQLite and PostgreSQL."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from exchange.config import load_config
from exchange.jobs import JOBS, JobScheduler, consistency
from tests.support import ExchangeProcess, new_message, write_config
from tests.test_training import FAMILIES, GIVENS, a28, population, run

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
REPO = Path(__file__).resolve().parent.parent


def config_at(tmp_path: Path, server_extra: str = "", facilities: str | None = None):
    extra = {} if facilities is None else {"facilities": facilities}
    return load_config(write_config(tmp_path, server_extra=server_extra, **extra), environ={})


def registered(engine) -> dict[str, tuple[int, int]]:
    """mrn -> (record id, person id)."""
    with engine.connect() as conn:
        return {mrn: (rid, pid) for rid, mrn, pid in conn.execute(text("select id, mrn, person_id from patient_record"))}


def execute(engine, sql: str, **params) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def plant_problems(engine) -> dict[str, object]:
    """One of each problem the consistency job looks for; returns the ids it should name."""
    run(engine, [
        a28("OAKNH", "OA-1", "HANSON", "ELIZABETH", "19400304", "F", "12 OAK ST", "SPRINGFIELD", "62701", "2175550100",
            "271828182"),
        a28("OAKNH", "OA-2", "KOWALCZYK", "PIOTR", "19551111", "M", "9 ELM ST", "DENVER", "80201", "3035550199", ""),
        a28("OAKNH", "OA-3", "NAKAMURA", "JUNE", "19620707", "F", "3 PINE RD", "RENO", "89501", "7755550133", ""),
        a28("OAKNH", "OA-4", "BECKER", "KARL", "19710101", "M", "4 BIRCH LN", "AUSTIN", "73301", "5125550144", ""),
    ])
    ids = registered(engine)
    (r1, p1), (r2, p2), (r3, p3), (r4, p4) = ids["OA-1"], ids["OA-2"], ids["OA-3"], ids["OA-4"]
    execute(engine, "insert into person (created_at, protected) values (:at, :f)", at=NOW, f=False)
    execute(engine, "insert into person (created_at, protected) values (:at, :f)", at=NOW, f=False)
    with engine.connect() as conn:
        spare_a, spare_b = [r[0] for r in conn.execute(text("select id from person order by id desc limit 2"))][::-1]
    execute(engine, "update person set merged_into = :p where id = :q", p=p2, q=p1)  # OA-1's person merged away
    execute(engine, "update person set merged_into = :p where id = :q", p=p3, q=p2)  # ... into one merged again
    execute(engine, "update person set merged_into = :p where id = :q", p=spare_b, q=spare_a)  # a cycle
    execute(engine, "update person set merged_into = :p where id = :q", p=spare_a, q=spare_b)
    execute(engine, "update patient_record set active = :f where id = :r", f=False, r=r3)  # keys left behind
    execute(engine, "update patient_record set features = null where id = :r", r=r4)
    execute(engine, "insert into match_review (state, kind, facility, mrn, detail, created_at) "
                    "values ('open', 'candidate', 'OAKNH', 'OA-GONE', '{}', :at)", at=NOW)
    with engine.connect() as conn:
        review = conn.execute(text("select id from match_review where mrn = 'OA-GONE'")).scalar_one()
    from exchange.store.messages import insert_messages

    with engine.begin() as conn:
        (message_id,) = insert_messages(conn, [new_message("JOBS-1")])
    for destination in ("CLOSEDNH", "CLOSEDNH", "OAKNH"):
        execute(engine, "insert into delivery (destination, message_id, control_id, payload, created_at, state, "
                        "attempts) values (:d, :m, 'C1', :p, :at, 'queued', 0)",
                d=destination, m=message_id, p=b"MSH|", at=NOW)
    return {"merged_records": (r1, r2), "chained": (p1, p2), "cycle": (spare_a, spare_b), "inactive": r3,
            "no_features": r4, "review": review}


def test_consistency_is_quiet_on_a_sound_database(engine, tmp_path):
    run(engine, population(40))
    report = consistency(engine, config_at(tmp_path), NOW)
    assert report.errors == 0, report.lines
    assert all(line.endswith(": 0") for line in report.lines)


def test_consistency_finds_each_planted_problem_without_patient_data(engine, tmp_path):
    planted = plant_problems(engine)
    report = consistency(engine, config_at(tmp_path), NOW)
    lines = dict(line.split(": ", 1) for line in report.lines)
    assert lines["records whose person does not exist"] == "0"
    # OA-1 and OA-2 are in persons merged away (OA-1's through two merges)
    assert lines["records linked to a person merged into another"] == "2 (record ids {}, {})".format(
        *planted["merged_records"])
    p1, _ = planted["chained"]
    assert lines["persons merged into a person that was merged again"] == f"1 (not an error) (person ids {p1})"
    cycle = lines["merged persons whose merges do not end at a live person (missing, a cycle, or over 100 merges)"]
    assert cycle == "2 (person ids {}, {})".format(*sorted(planted["cycle"]))
    assert lines["blocking keys (record_key rows) of inactive records"].endswith(f"(record ids {planted['inactive']})")
    assert any(k.startswith("active records without stored matching features") and v == f"1 (record ids "
               f"{planted['no_features']})" for k, v in lines.items())
    assert lines["open reviews about a record that no longer exists"] == f"1 (review ids {planted['review']})"
    # OAKNH is configured but has no deliver_to in the test network: its copy is stranded too
    assert lines["copies queued for a facility not configured to receive them (deliver_to)"] == \
        "3 (destination and copies: CLOSEDNH 2, OAKNH 1)"
    keys_rows = int(lines["blocking keys (record_key rows) of inactive records"].split()[0])
    assert report.errors == 2 + 2 + keys_rows + 1 + 1 + 3
    text_ = "\n".join(report.lines).upper()
    assert not any(word in text_ for word in ("HANSON", "ELIZABETH", "KOWALCZYK", "1940", "271828182"))


def test_consistency_finds_a_person_holding_both_records_of_a_not_a_match_pair(engine, tmp_path):
    """Found by a black-box audit: an A40 had merged two persons across a technician's "not a
    match", and the consistency job said ok."""
    hanson = ("HANSON", "ELIZABETH", "19400304", "F", "12 OAK ST", "SPRINGFIELD", "62701", "2175550100", "271828182")
    piotr = ("KOWALCZYK", "PIOTR", "19551111", "M", "9 ELM ST", "DENVER", "80201", "3035550199", "")
    run(engine, [a28("OAKNH", "OA-1", *hanson), a28("GENHOSP", "GH-1", *hanson)])
    run(engine, [a28("OAKNH", "OA-2", *piotr), a28("GENHOSP", "GH-2", *piotr)])
    ids = registered(engine)
    assert ids["OA-1"][1] == ids["GH-1"][1] != ids["OA-2"][1] == ids["GH-2"][1]
    for (f, m), (of, om), active in ((("OAKNH", "OA-1"), ("GENHOSP", "GH-1"), True),
                                     (("OAKNH", "OA-2"), ("GENHOSP", "GH-2"), False)):  # an undone one: no problem
        for a, b in (((f, m), (of, om)), ((of, om), (f, m))):
            execute(engine, "insert into match_pair (facility, mrn, other_facility, other_mrn, active) "
                            "values (:f, :m, :of, :om, :a)", f=a[0], m=a[1], of=b[0], om=b[1], a=active)
    report = consistency(engine, config_at(tmp_path), NOW)
    lines = dict(line.split(": ", 1) for line in report.lines)
    assert lines["persons holding both records of an active not-a-match pair"] == f"1 (person ids {ids['OA-1'][1]})"
    assert report.errors == 1


def test_links_opens_a_review_for_each_automatic_link_the_index_would_not_make_now(engine, tmp_path):
    """Links an older release (or an older model) made and the rules of now refuse -- here twins
    linked before the family rules -- get a link_looks_wrong review, once; the link stays until
    a technician decides; sound links and a technician's links are left alone."""
    from exchange.jobs import links

    run(engine, [
        a28("OAKNH", "OA-1", "HANSON", "ELIZABETH", "19400304", "F", "12 OAK ST", "SPRINGFIELD", "62701", "2175550100",
            "271828182"),
        a28("GENHOSP", "GH-1", "HANSON", "ELIZABETH", "19400304", "F", "12 OAK ST", "SPRINGFIELD", "62701",
            "2175550100", "271828182"),  # the same woman: linked
        a28("OAKNH", "OA-2", "BRANNIGAN", "ALICE", "19850601", "F", "7 ASH CT", "SALEM", "97301", "5035550111", ""),
        a28("GENHOSP", "GH-2", "BRANNIGAN", "BEATRICE", "19850601", "F", "7 ASH CT", "SALEM", "97301", "5035550111",
            ""),  # her twin sister: kept apart now
        a28("OAKNH", "OA-3", "BRANNIGAN", "CARA", "19850601", "F", "7 ASH CT", "SALEM", "97301", "5035550111", ""),
    ])
    ids = registered(engine)
    assert ids["OA-1"][1] == ids["GH-1"][1] and len({ids[m][1] for m in ("OA-2", "GH-2", "OA-3")}) == 3
    # as an older release left them: the twins GH-2 and OA-2 linked automatically, OA-3 by a technician
    execute(engine, "update patient_record set person_id = :p, link = 'auto' where mrn = 'GH-2'", p=ids["OA-2"][1])
    execute(engine, "update patient_record set person_id = :p, link = 'manual' where mrn = 'OA-3'", p=ids["OA-2"][1])
    execute(engine, "delete from match_review")

    report = links(engine, config_at(tmp_path), NOW)
    with engine.connect() as conn:
        reviews = conn.execute(text("select id, kind, facility, mrn, person_id, state from match_review")).all()
    assert [tuple(r)[1:] for r in reviews] == [("link_looks_wrong", "GENHOSP", "GH-2", ids["OA-2"][1], "open")]
    assert report.errors == 0 and report.lines == (  # a technician's work, not an error
        "automatic links checked: 2",
        f"automatic links the patient index would not make now (a link_looks_wrong review opened): 1"
        f" (not an error) (review ids {reviews[0].id})",
        "such links with an open review already: 0")
    assert registered(engine)["GH-2"][1] == ids["OA-2"][1]  # the link stays until a technician decides
    again = links(engine, config_at(tmp_path), NOW)
    assert again.errors == 0 and again.lines[-1] == "such links with an open review already: 1"



def test_links_opens_no_review_for_a_link_a_technician_changed_while_it_read(engine, tmp_path, monkeypatch):
    """The job reads every link without the links lock (seconds at a million persons), then
    takes it and decides each link it found again as it is now: a technician's split made in
    between leaves no stale link_looks_wrong review (whose "link" would have offered to undo it)."""
    from exchange.jobs import links
    from exchange.store import reviews

    run(engine, [
        a28("OAKNH", "OA-2", "BRANNIGAN", "ALICE", "19850601", "F", "7 ASH CT", "SALEM", "97301", "5035550111", ""),
        a28("GENHOSP", "GH-2", "BRANNIGAN", "BEATRICE", "19850601", "F", "7 ASH CT", "SALEM", "97301", "5035550111",
            ""),
    ])
    ids = registered(engine)
    execute(engine, "update patient_record set person_id = :p, link = 'auto' where mrn = 'GH-2'", p=ids["OA-2"][1])
    execute(engine, "delete from match_review")
    real = reviews.hold_links

    def split_first(conn, *, exclusive):
        if not exclusive:  # the job, about to open its reviews: the technician was quicker
            reviews.split_record(conn, ids["OA-2"][1], "GENHOSP", "GH-2", actor="tech", now=NOW)
        real(conn, exclusive=exclusive)

    monkeypatch.setattr(reviews, "hold_links", split_first)
    report = links(engine, config_at(tmp_path), NOW)
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from match_review")).scalar() == 0
    assert report.lines[:2] == (
        "automatic links checked: 1",
        "automatic links the patient index would not make now (a link_looks_wrong review opened): 0")
    assert registered(engine)["GH-2"][1] != ids["OA-2"][1]

def test_every_job_is_registered_under_its_configured_name():
    from exchange.config import RECONCILE_JOBS

    assert tuple(JOBS) == RECONCILE_JOBS
    assert all(job.name == name and job.summary for name, job in JOBS.items())


# --- exchange reconcile, as a user runs it -------------------------------------------------------------------


def reconcile(tmp_path: Path, database: str, *args: str) -> subprocess.CompletedProcess:
    config = write_config(tmp_path)
    env = dict(os.environ)
    env.pop("EXCHANGE_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "exchange.cli", "reconcile", *args, "--config", str(config),
                           "--database", database], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_reconcile_command_exit_codes_and_reports(engine, database_url, tmp_path):
    run(engine, population(30))
    done = reconcile(tmp_path, database_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("consistency: ok (") and "\nmatch-model: ok (" in done.stdout
    assert "kept the current model: " in done.stdout  # too few records to estimate
    assert done.stderr == ""

    planted = plant_problems(engine)
    done = reconcile(tmp_path, database_url, "consistency")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith("consistency: ") and " errors (" in done.stdout.splitlines()[0]
    assert f"(review ids {planted['review']})" in done.stdout and "match-model" not in done.stdout
    assert not any(name in done.stdout.upper() for name in [*FAMILIES, *GIVENS, "HANSON", "ELIZABETH"])

    done = reconcile(tmp_path, database_url, "nightly")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "exchange: unknown job 'nightly': use one of consistency, match-model, links"


def test_reconcile_match_model_stores_a_model_the_next_start_uses(engine, database_url, tmp_path):
    run(engine, population(700))
    done = reconcile(tmp_path, database_url, "match-model")
    # 700 persons make ~1,190 records: enough to estimate
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stored match_model 1" in done.stdout
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from match_model")).scalar_one() == 1


# --- scheduling --------------------------------------------------------------------------------------------


def test_the_scheduler_runs_each_job_as_a_child_process_and_reports_its_lines(engine, database_url, tmp_path):
    config = load_config(write_config(tmp_path), database=database_url, environ={})
    lines: list[tuple[str, str]] = []
    jobs = JobScheduler(config, reactor=None, emit=lambda level, line: lines.append((level, line)))
    assert jobs.run("consistency") == 0
    assert lines[0][0] == "info" and lines[0][1].startswith("reconcile consistency: ok (")
    assert ("debug", "reconcile consistency: records whose person does not exist: 0") in lines
    plant_problems(engine)
    lines.clear()
    assert jobs.run("consistency") == 1
    assert all(level == "warn" for level, _ in lines) and " errors (" in lines[0][1]
    jobs.stop()
    assert jobs.run("consistency") is None  # stopped: nothing runs any more


def test_scheduled_runs_use_the_configuration_the_server_runs(engine, database_url, tmp_path):
    """Found by a black-box audit: each run re-read the file, so an edit made for the next
    restart (or a typo) changed or stopped the running server's jobs."""
    path = write_config(tmp_path)
    config = load_config(path, database=database_url, environ={})
    lines: list[tuple[str, str]] = []
    jobs = JobScheduler(config, reactor=None, emit=lambda level, line: lines.append((level, line)))
    jobs.start()
    try:
        path.write_text("garbage = [\n", encoding="utf-8")
        assert jobs.run("consistency") == 0, lines
        snapshot = jobs._config_path
        assert snapshot and oct(os.stat(snapshot).st_mode & 0o777) == "0o600"
    finally:
        jobs.stop()
    assert not os.path.exists(snapshot)


def test_a_scheduled_run_that_cannot_start_logs_its_failure_without_its_text(tmp_path):
    """Found by a privacy audit: a database error while the schedule lock was taken went to
    APScheduler, which logged its traceback, SQL and parameters included."""
    config = load_config(write_config(tmp_path), database="postgresql+psycopg://postgres@127.0.0.1:1/none",
                         environ={})
    lines: list[tuple[str, str]] = []
    jobs = JobScheduler(config, reactor=None, emit=lambda level, line: lines.append((level, line)))
    assert jobs.scheduled("links", 60.0) is None
    assert lines == [("error", "reconcile links: not run (OperationalError)")]
    jobs.stop()


def test_the_scheduler_takes_the_configured_schedules(tmp_path):
    config = config_at(tmp_path, 'reconcile.consistency = "90s"\nreconcile.match-model = "15 4 * * 1"')
    jobs = JobScheduler(config, reactor=None, emit=lambda level, line: None)
    jobs.start()
    try:
        scheduled = {job.id: job.trigger for job in jobs.scheduler.get_jobs()}
        assert scheduled["consistency"].interval.total_seconds() == 90
        assert str(scheduled["match-model"]) == "cron[month='*', day='*', day_of_week='1', hour='4', minute='15']"
        assert str(scheduled["links"]) == "cron[month='*', day='*', day_of_week='*', hour='3', minute='30']"
    finally:
        jobs.stop()
    assert not jobs.scheduler.running
    config = config_at(tmp_path, 'reconcile.consistency = "off"\nreconcile.match-model = "off"\nreconcile.links = "off"')
    jobs = JobScheduler(config, reactor=None, emit=lambda level, line: None)
    jobs.start()
    assert jobs.scheduler.get_jobs() == []
    jobs.stop()


def test_exchange_serve_runs_a_scheduled_job_and_logs_its_report(database_url, tmp_path):
    config = write_config(tmp_path, server_extra='log_level = "info"\nreconcile.consistency = "1s"\n'
                                                 'reconcile.match-model = "off"')
    server = ExchangeProcess(config, database_url).start()
    try:
        deadline = time.monotonic() + 60
        runs = 0
        while runs < 2:  # every second, while the exchange serves
            line = server._readline(deadline)
            assert line is not None, "".join(server.output)
            runs += "[exchange.jobs#info] reconcile consistency: ok (" in line
        assert server.terminate() == 0
    finally:
        server.stop()


def test_a_job_runs_on_one_node_at_a_time(engine, tmp_path):
    """Every node schedules the jobs; on PostgreSQL only the node holding the job's
    advisory lock runs it, the other skips (SQLite has one node)."""
    from datetime import datetime, timezone

    from exchange.config import load_config
    from exchange.jobs import JOBS
    from tests.support import write_config

    config = load_config(write_config(tmp_path))
    now = datetime(2026, 11, 28, tzinfo=timezone.utc)
    skipped = ("another node is running it: skipped",)
    if engine.dialect.name == "postgresql":
        with engine.connect() as other:  # another node, in the middle of a run
            other.exec_driver_sql("SELECT pg_advisory_lock(hashtext('exchange reconcile consistency'))")
            assert JOBS["consistency"].run(engine, config, now).lines == skipped
            other.exec_driver_sql("SELECT pg_advisory_unlock(hashtext('exchange reconcile consistency'))")
    report = JOBS["consistency"].run(engine, config, now)
    assert report.lines != skipped and report.errors == 0


# --- never while `exchange replay` rebuilds the record model ------------------------------------------------


def _open_review_of_a_record(engine) -> None:
    """An open review about a record that exists (the consistency job finds nothing wrong in it)."""
    execute(engine, "insert into match_review (state, kind, facility, mrn, detail, created_at) "
                    "values ('open', 'candidate', 'OAKNH', 'OA1', '{}', :at)", at=NOW)


def _until_done_or_waiting_for_a_lock(engine, job, seconds: float = 30) -> None:
    """Until the job's thread has ended or (PostgreSQL) a session of the job waits for a lock."""
    deadline = time.monotonic() + seconds
    while job.is_alive() and time.monotonic() < deadline:
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                if conn.execute(text("select count(*) from pg_stat_activity where datname = current_database() "
                                     "and wait_event_type = 'Lock'")).scalar_one():
                    return
        job.join(0.05)


def test_a_job_started_during_a_replay_never_reports_a_half_rebuilt_model(engine, tmp_path, monkeypatch):
    """consistency starts after replay's first batch: on PostgreSQL it skips and says so (without
    the rebuild lock its snapshot saw TRUNCATEd tables: "open reviews about a record that no longer
    exists"); on SQLite it reads the model as it was before the replay (WAL snapshot), all well."""
    import itertools
    import threading

    import exchange.replay as replay_module
    from exchange.jobs import REPLAYING
    from tests.test_training import FACILITIES

    run(engine, population(30))
    _open_review_of_a_record(engine)
    config = config_at(tmp_path)
    reports, jobs = [], []
    calls = itertools.count()
    replay_batch = replay_module._replay_batch

    def batch_then_job(conn, rows, *args):
        out = replay_batch(conn, rows, *args)
        if next(calls) == 0:  # the record model is half rebuilt, not committed
            job = threading.Thread(target=lambda: reports.append(JOBS["consistency"].run(engine, config, NOW)))
            jobs.append(job)
            job.start()
            _until_done_or_waiting_for_a_lock(engine, job)
        return out

    monkeypatch.setattr(replay_module, "_replay_batch", batch_then_job)
    report = replay_module.replay(engine, FACILITIES, batch=10)
    assert report.messages > 10 and report.not_applied == ()
    jobs[0].join(60)
    [during] = reports
    if engine.dialect.name == "postgresql":
        assert (during.skipped, during.lines, during.errors) == ("exchange replay is running", (REPLAYING,), 0)
        assert during.summary() == "consistency: skipped (exchange replay is running)"
    else:
        assert during.errors == 0 and not during.skipped, during.lines
    after = JOBS["consistency"].run(engine, config, NOW)
    assert after.errors == 0 and not after.skipped, after.lines


def test_a_replay_waits_for_a_job_reading_the_model(engine, database_url):
    """PostgreSQL: a job holds the rebuild lock (shared) while it reads: a replay waits for it, at
    most lock_timeout, then is refused with nothing changed. SQLite: the job's read transaction
    keeps its snapshot while the replay commits."""
    import exchange.replay as replay_module
    from exchange.store.db import make_engine, try_share_rebuild, unshare_rebuild
    from tests.test_training import FACILITIES

    run(engine, population(10))
    with engine.connect() as conn:
        records = conn.execute(text("select count(*) from patient_record")).scalar_one()
    job = make_engine(database_url)
    try:
        with job.connect() as reading:
            if engine.dialect.name == "postgresql":
                assert try_share_rebuild(reading)  # as JOBS[...].run holds it
                try:
                    with pytest.raises(replay_module.DatabaseBusy, match="reconciliation job"):
                        replay_module.replay(engine, FACILITIES, lock_timeout=0.2)
                finally:
                    unshare_rebuild(reading)
                    reading.commit()
            else:
                with reading.begin():
                    assert reading.execute(text("select count(*) from patient_record")).scalar_one() == records
                    replay_module.replay(engine, {})  # every record goes: no facility is configured
                    assert reading.execute(text("select count(*) from patient_record")).scalar_one() == records
                with engine.connect() as conn:
                    assert conn.execute(text("select count(*) from patient_record")).scalar_one() == 0
    finally:
        job.dispose()
    assert replay_module.replay(engine, FACILITIES).records == records


@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True)
def test_on_postgresql_a_scheduled_job_runs_once_a_period_whatever_the_number_of_nodes(engine, database_url, tmp_path):
    """Found by a black-box audit: each node ran every scheduled job (the job's lock is held only
    while a run lasts, and each node's timer fires at its own time)."""
    import threading

    config = load_config(write_config(tmp_path), database=database_url, environ={})
    lines: list[tuple[str, str]] = []
    nodes = [JobScheduler(config, reactor=None, emit=lambda level, line: lines.append((level, line))) for _ in range(2)]
    results: list = []
    first = threading.Thread(target=lambda: results.append(nodes[0].scheduled("consistency", 6.0)))
    first.start()
    time.sleep(1.0)  # the second node's timer fires a moment later, in the same period
    assert nodes[1].scheduled("consistency", 6.0) is None
    first.join()
    assert results == [0]
    ran = [line for _, line in lines if line.startswith("reconcile consistency: ok")]
    skipped = [line for _, line in lines if "skipped (another node runs it this period)" in line]
    assert len(ran) == 1 and len(skipped) == 1
    assert nodes[1].scheduled("consistency", 0.1) == 0  # the next period: the lock is free again
    for node in nodes:
        node.stop()
