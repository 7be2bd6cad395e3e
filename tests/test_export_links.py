"""`exchange export links` as a user runs it (a subprocess) on SQLite and PostgreSQL:
the CSV header and rows of CONTRACT.md, and the exit codes."""
from __future__ import annotations

import csv
import io

from exchange.store.db import write_transaction
from tests.test_cli import exchange
from tests.test_reviews import add_record, hanson_scene
from tests.support import write_config


def test_export_links_prints_every_record_and_its_person(engine, database_url):
    with write_transaction(engine) as conn:
        s = hanson_scene(conn)
        add_record(conn, "GENHOSP", "GH-MERGED-AWAY", s["person"], active=False, family="A", given="B")
        add_record(conn, "OAKNH", "OA,QUOTE\"D", s["person"], family="C", given="D")
    done = exchange("export", "links", "--database", database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "facility,authority,mrn,person"
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["facility"], r["authority"], r["mrn"], int(r["person"])) for r in rows] == [
        ("GENHOSP", "GENHOSP", "GH-44107", s["person"]),
        ("HHCARE", "HHCARE", "HH-3391", s["person"]),
        ("OAKNH", "OAKNH", 'OA,QUOTE"D', s["person"]),
        ("OAKNH", "OAKNH", "OA917082", s["oa_person"]),
    ]
    assert done.stderr == ""


def test_export_links_of_an_empty_index_is_the_header(engine, database_url):
    done = exchange("export", "links", "--database", database_url)
    assert (done.returncode, done.stdout) == (0, "facility,authority,mrn,person\n")


def test_export_links_reads_the_database_from_the_config(tmp_path, engine, database_url):
    config = write_config(tmp_path, database=database_url)
    done = exchange("export", "links", "--config", str(config), env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "facility,authority,mrn,person\n"


def test_export_links_exit_2_for_a_bad_config_or_an_unmigrated_database(tmp_path):
    done = exchange("export", "links", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "nope.toml" in done.stderr
    done = exchange("export", "links", "--database", f"sqlite:///{tmp_path / 'empty.db'}")
    assert done.returncode == 2
    assert "exchange db upgrade" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""
