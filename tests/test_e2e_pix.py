"""The PIX query (IHE ITI-9) end to end: `exchange serve` as a process, python-hl7's MLLP
client as the Patient Identifier Cross-reference Consumer (on SQLite and PostgreSQL)."""
from __future__ import annotations

import itertools

import hl7
import pytest
from hl7.client import MLLPClient
from sqlalchemy import create_engine, text

from tests.support import api_request
from tests.test_e2e_index import ELIZABETH, message, pid
from tests.test_e2e_index import send as register

_ids = itertools.count(1)


def qbp(facility: str, qpd: str, control: str | None = None) -> str:
    control = control or f"PIX-{next(_ids)}"
    return (f"MSH|^~\\&|EHR|{facility}|EXCHANGE|EXCHANGE|20261128120000||QBP^Q23^QBP_Q21|{control}|P|2.5\r"
            f"{qpd}\rRCP|I\r")


def ask(exchange, facility: str, qpd: str, control: str | None = None):
    with MLLPClient(*exchange.address) as client:
        reply = client.send_message(qbp(facility, qpd, control))
    return hl7.parse(reply.decode() if isinstance(reply, bytes) else reply)


def identifiers(rsp) -> set[str]:
    return {str(rep) for rep in rsp.segment("PID")[3]}


@pytest.fixture
def elizabeth(exchange, database_url):
    """One patient at three sites (linked automatically) and a patient of the hospital alone."""
    register(exchange,
             message("OAKNH", "A28", pid("OAKNH", "OA917082", **ELIZABETH)),
             message("GENHOSP", "A28", pid("GENHOSP", "GH-44107", "HANSEN^LIZ", "19400304", ssn="219099999")),
             message("HHCARE", "A28", pid("HHCARE", "HH-3391", "HANSON-MOORE^ELIZABETH", "19400304")),
             message("GENHOSP", "A28", pid("GENHOSP", "GH-500", "QUILL^OTTO", "19770707", sex="M",
                                           address="9 PINE RD^^DOVER^DE^19901", phone="555-0900")))
    return api_request(exchange, database_url, "GET", "/api/records/OAKNH/OA917082")["person"]


def test_a_facility_gets_its_patients_identifiers_at_the_other_sites(exchange, database_url, elizabeth):
    rsp = ask(exchange, "OAKNH", "QPD|IHE PIX Query|Q1|OA917082^^^OAKNH")
    assert str(rsp.segment("MSH")[9]) == "RSP^K23^RSP_K23"
    assert str(rsp.segment("MSA")[1]) == "AA" and str(rsp.segment("QAK")[2]) == "OK"
    assert identifiers(rsp) == {f"{elizabeth}^^^EXCHANGE^PI", "GH-44107^^^GENHOSP^MR", "HH-3391^^^HHCARE^MR"}
    rsp = ask(exchange, "OAKNH", "QPD|IHE PIX Query|Q2|OA917082^^^OAKNH|^^^HHCARE")
    assert identifiers(rsp) == {"HH-3391^^^HHCARE^MR"}
    # by the enterprise id a copy carried
    rsp = ask(exchange, "HHCARE", f"QPD|IHE PIX Query|Q3|{elizabeth}^^^EXCHANGE|^^^OAKNH")
    assert identifiers(rsp) == {"OA917082^^^OAKNH^MR"}
    # each answer is audited under the asking facility, with every record it named
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("select actor, role, resource, facility, key, outcome from audit_event"
                                     " where role = 'facility' order by id")).all()
    finally:
        engine.dispose()
    assert ("OAKNH", "facility", "record", "OAKNH", "OA917082", "ok") in rows
    assert ("OAKNH", "facility", "record", "HHCARE", "HH-3391", "ok") in rows
    assert ("HHCARE", "facility", "person", None, str(elizabeth), "ok") in rows
    # Q1 gave the enterprise id too: a person row (found by a privacy audit), only for Q1
    assert [r for r in rows if r[0] == "OAKNH" and r[2] == "person"] == [
        ("OAKNH", "facility", "person", None, str(elizabeth), "ok")]


def test_unknown_identifiers_and_strangers_patients_are_answered_ae_204(exchange, elizabeth):
    for facility, qpd in (("OAKNH", "QPD|IHE PIX Query|Q4|NOPE^^^OAKNH"),
                          ("OAKNH", "QPD|IHE PIX Query|Q5|GH-500^^^GENHOSP")):  # OAKNH holds no record of him
        rsp = ask(exchange, facility, qpd)
        assert str(rsp.segment("MSA")[1]) == "AE" and str(rsp.segment("QAK")[2]) == "AE"
        assert str(rsp.segment("ERR")[2]) == "QPD^1^3^1^1" and str(rsp.segment("ERR")[3][0][0]) == "204"
        assert not [s for s in rsp if str(s[0]) == "PID"]
    rsp = ask(exchange, "OAKNH", "QPD|IHE PIX Query|Q6|OA917082^^^OAKNH|^^^GENHOSP~^^^NOWHERE")
    assert str(rsp.segment("ERR")[2]) == "QPD^1^4^2"


def test_a_resent_query_gets_its_first_answer_and_an_opt_out_hides_the_other_sites(exchange, database_url,
                                                                                   elizabeth):
    first = ask(exchange, "OAKNH", "QPD|IHE PIX Query|Q7|OA917082^^^OAKNH", control="PIX-RESENT")
    api_request(exchange, database_url, "POST", f"/api/persons/{elizabeth}/opt-out",
                {"protected": True, "reason": "asked at the front desk"})
    again = ask(exchange, "OAKNH", "QPD|IHE PIX Query|Q7|OA917082^^^OAKNH", control="PIX-RESENT")
    assert str(again) == str(first)  # the stored answer: a resend is never answered twice
    rsp = ask(exchange, "OAKNH", "QPD|IHE PIX Query|Q8|OA917082^^^OAKNH")
    assert str(rsp.segment("MSA")[1]) == "AA" and str(rsp.segment("QAK")[2]) == "NF"
    assert not [s for s in rsp if str(s[0]) == "PID"]


def test_a_merged_away_mrn_answers_for_its_survivor(exchange, elizabeth):
    register(exchange,
             message("GENHOSP", "A28", pid("GENHOSP", "GH-DUP", "HANSON^ELIZABETH", "19400304")),
             message("GENHOSP", "A40", pid("GENHOSP", "GH-44107", "HANSEN^LIZ", "19400304"),
                     "MRG|GH-DUP^^^GENHOSP^MR"))
    rsp = ask(exchange, "OAKNH", "QPD|IHE PIX Query|Q9|GH-DUP^^^GENHOSP|^^^OAKNH~^^^GENHOSP")
    assert identifiers(rsp) == {"OA917082^^^OAKNH^MR", "GH-44107^^^GENHOSP^MR"}


def test_a_person_id_beyond_any_the_exchange_issues_is_not_known(exchange, elizabeth):
    rsp = ask(exchange, "OAKNH", "QPD|IHE PIX Query|Q10|9223372036854775808^^^EXCHANGE")
    assert str(rsp.segment("MSH")[9]) == "RSP^K23^RSP_K23" and str(rsp.segment("MSA")[1]) == "AE"
    assert str(rsp.segment("ERR")[2]) == "QPD^1^3^1^1" and str(rsp.segment("QAK")[1]) == "Q10"
