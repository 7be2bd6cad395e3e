"""GET /api/records/{facility}/{mrn} and /api/persons/{person} over the real
routes and a real database (SQLite and PostgreSQL): contract fields, roles,
404s and the audit trail. The records are put there the way the intake will:
mapped from HL7 with the pure mapping, applied, saved by the record store."""
from __future__ import annotations

import json
from urllib.parse import quote

from tests.web.support import Harness, apply_hl7

PID = "PID|1||GH-44107^^^GENHOSP^MR~123-45-6789^^^SSA^SS||HANSON^ELIZABETH^A^^^^L||19470312|F|||12 ELM ST^^SPRINGFIELD^IL^62701||555-0100"
ADMIT = (
    "MSH|^~\\&|ADT|GENHOSP|EXCHANGE|EXCHANGE|20261127100000||ADT^A01^ADT_A01|REC-1|P|2.5.1\r"
    "EVN|A01|20261127100000\r" + PID + "\r"
    "PV1|1|I|W1^101^A||||1234^WELBY^MARCUS||||||||||||V1001|||||||||||||||||||||||||20261127100000\r"
)


def store_record(api: Harness, hl7: str) -> int:
    """Map and apply one message, save it (with its stored message as the reference)."""
    apply_hl7(api, hl7, "REC-1")
    with api.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT person_id FROM patient_record WHERE mrn = 'GH-44107'").scalar_one()


def test_a_technician_reads_a_record_with_the_contract_fields(api: Harness):
    store_record(api, ADMIT)
    token = api.token("tess", "technician")
    code, body, _ = api.get("/api/records/GENHOSP/GH-44107", token)
    assert code == 200
    assert {"facility", "authority", "mrn", "person", "active", "merged_into", "name", "birth_date", "sex",
            "address", "phones", "encounters", "documents"} <= body.keys()
    assert (body["facility"], body["mrn"], body["active"], body["merged_into"]) == ("GENHOSP", "GH-44107", True, None)
    assert body["name"]["family"] == "HANSON" and body["name"]["given"] == "ELIZABETH"
    assert (body["birth_date"], body["sex"]) == ("1947-03-12", "F")
    [encounter] = body["encounters"]
    assert {"visit_number", "class", "status", "location", "admitted_at", "discharged_at"} <= encounter.keys()
    assert (encounter["visit_number"], encounter["status"]) == ("V1001", "admitted")
    assert encounter["location"] == "W1^101^A"  # as PV1-3 says it (stored "W1^101^A^": a contract audit)
    # a social security number in PID-3 is shown by its last four digits, as everywhere else
    assert [(i["value"], i["type"]) for i in body["identifiers"]] == [("GH-44107", "MR"), ("***-**-6789", "SS")]
    assert "123-45" not in json.dumps(body)
    [row] = api.audit()
    assert (row["actor"], row["resource"], row["facility"], row["key"], row["outcome"]) == (
        "tess", "record", "GENHOSP", "GH-44107", "ok"
    )


def test_the_person_lists_the_record(api: Harness):
    person = store_record(api, ADMIT)
    token = api.token("tess", "technician")
    code, body, _ = api.get(f"/api/persons/{person}", token)
    assert code == 200
    assert body["person"] == person
    [record] = body["records"]
    assert {"facility", "mrn", "link", "score"} <= record.keys()
    assert (record["facility"], record["mrn"]) == ("GENHOSP", "GH-44107")
    # found by a black-box audit: the audit said "person N" only, so "who saw GENHOSP GH-44107"
    # missed every person page; each record shown has its own row now
    rows = [(r["resource"], r["facility"], r["key"]) for r in api.audit()]
    assert rows == [("person", None, str(person)), ("record", "GENHOSP", "GH-44107")]


def test_unknown_record_and_person_404_audited(api: Harness):
    token = api.token("tess", "technician")
    assert api.get("/api/records/GENHOSP/NOPE", token)[0] == 404
    assert api.get("/api/persons/999999", token)[0] == 404
    assert [r["outcome"] for r in api.audit()] == ["not-found", "not-found"]


def test_bad_person_id_400_and_no_token_401(api: Harness):
    token = api.token("tess", "technician")
    assert api.get("/api/persons/abc", token)[0] == 400
    # other scripts' digits are not an id: "١" would read person 1 and be audited as "١"; int("²") fails
    admin = api.token("ada", "admin")
    for text in ("\u0661", "\uff11", "\u00b2"):
        assert api.get(f"/api/persons/{quote(text)}", token)[0] == 400
        assert api.get(f"/api/deliveries?person={quote(text)}", admin)[0] == 400
    assert api.get("/api/records/GENHOSP/GH-44107")[0] == 401
    assert api.get("/api/persons/1")[0] == 401
