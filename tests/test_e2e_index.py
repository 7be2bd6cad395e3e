"""The patient index's decision rules end to end: `exchange serve` as a process,
facilities sending over MLLP, the outcome read through the HTTP API as a
technician sees it (on SQLite and PostgreSQL)."""
from __future__ import annotations

import itertools

from tests.support import MLLPConnection, api_request, msa

_ids = itertools.count(1)


def pid(facility: str, mrn: str, name: str, birth: str, sex: str = "F", ssn: str = "",
        address: str = "12 OAK ST^^SPRINGFIELD^IL^62701", phone: str = "555-0100") -> str:
    return f"PID|1||{mrn}^^^{facility}^MR||{name}||{birth}|{sex}|||{address}||{phone}||||||{ssn}"


def message(facility: str, event: str, *segments: str) -> bytes:
    control = f"E2EIX-{next(_ids)}"
    return ("\r".join([f"MSH|^~\\&|APP|{facility}|EXCHANGE|EXCHANGE|20261127120000||ADT^{event}^ADT_A01|{control}|P|2.5.1",
                       f"EVN|{event}|20261127120000", *segments]) + "\r").encode()


def send(exchange, *messages: bytes) -> None:
    with MLLPConnection(exchange.address) as conn:
        for m in messages:
            assert msa(conn.request(m))[0] == "AA"


def person_of(exchange, database_url, facility: str, mrn: str) -> int:
    return api_request(exchange, database_url, "GET", f"/api/records/{facility}/{mrn}")["person"]


ELIZABETH = dict(name="HANSON^ELIZABETH^M", birth="19400304", ssn="219-09-9999")


def test_the_same_patient_at_three_facilities_is_one_person_with_auto_links(exchange, database_url):
    send(exchange,
         message("OAKNH", "A28", pid("OAKNH", "OA917082", **ELIZABETH)),
         message("GENHOSP", "A01", pid("GENHOSP", "GH-44107", "HANSEN^LIZ", "19400304", ssn="219099999"),
                 "PV1|1|I|W1^1^A" + "|" * 16 + "|V1"),
         message("HHCARE", "A28", pid("HHCARE", "HH-3391", "HANSON-MOORE^ELIZABETH", "19400304")))
    p = person_of(exchange, database_url, "OAKNH", "OA917082")
    view = api_request(exchange, database_url, "GET", f"/api/persons/{p}")
    assert sorted((r["facility"], r["mrn"], r["link"]) for r in view["records"]) == [
        ("GENHOSP", "GH-44107", "auto"), ("HHCARE", "HH-3391", "auto"), ("OAKNH", "OA917082", "auto")]
    assert all(r["score"] is None or r["score"] > 0 for r in view["records"])


def test_a_second_registration_at_one_facility_is_reviewed_not_linked(exchange, database_url):
    send(exchange, message("GENHOSP", "A04", pid("GENHOSP", "GH-1", **ELIZABETH)),
         message("GENHOSP", "A04", pid("GENHOSP", "GH-2", **ELIZABETH)))
    assert person_of(exchange, database_url, "GENHOSP", "GH-1") != person_of(exchange, database_url, "GENHOSP", "GH-2")
    (review,) = api_request(exchange, database_url, "GET", "/api/reviews?state=open")["reviews"]
    assert {(r["facility"], r["mrn"]) for r in review["records"]} == {("GENHOSP", "GH-1"), ("GENHOSP", "GH-2")}
    assert review["state"] == "open" and review["score"] > 0 and review["reasons"]
    detail = api_request(exchange, database_url, "GET", f"/api/reviews/{review['id']}")
    assert detail["id"] == review["id"]


def test_twins_father_and_son_and_spouses_are_not_linked(exchange, database_url):
    household = dict(address="7 ELM ST^^SALEM^MA^01970", phone="555-0142")
    send(exchange,
         message("GENHOSP", "A28", pid("GENHOSP", "T-1", "PARKER^ANNA", "19900512", ssn="111-22-3331", **household)),
         message("OAKNH", "A28", pid("OAKNH", "T-2", "PARKER^HANNAH", "19900512", ssn="111-22-3332", **household)),
         message("GENHOSP", "A28", pid("GENHOSP", "F-1", "PARKER^JOHN^^JR", "19650101", sex="M", **household)),
         message("OAKNH", "A28", pid("OAKNH", "F-2", "PARKER^JOHN^^SR", "19380101", sex="M", **household)),
         message("HHCARE", "A28", pid("HHCARE", "S-1", "PARKER^MARY", "19400101", **household)))
    persons = {person_of(exchange, database_url, f, m)
               for f, m in (("GENHOSP", "T-1"), ("OAKNH", "T-2"), ("GENHOSP", "F-1"), ("OAKNH", "F-2"), ("HHCARE", "S-1"))}
    assert len(persons) == 5


def test_a24_links_and_a37_unlinks_as_the_facility_says(exchange, database_url):
    doe = pid("GENHOSP", "GH-10", "DOE^JANE", "19700101")
    roe = pid("GENHOSP", "GH-11", "ROE^ANN", "19800202", address="5 BIRCH LN^^RENO^NV^89501", phone="555-0333")
    send(exchange, message("GENHOSP", "A28", doe), message("GENHOSP", "A28", roe), message("GENHOSP", "A24", doe, roe))
    assert person_of(exchange, database_url, "GENHOSP", "GH-10") == person_of(exchange, database_url, "GENHOSP", "GH-11")
    p = person_of(exchange, database_url, "GENHOSP", "GH-10")
    links = {r["mrn"]: r["link"] for r in api_request(exchange, database_url, "GET", f"/api/persons/{p}")["records"]}
    assert links["GH-11"] == "source"
    send(exchange, message("GENHOSP", "A37", doe, roe))
    assert person_of(exchange, database_url, "GENHOSP", "GH-10") != person_of(exchange, database_url, "GENHOSP", "GH-11")


def test_an_a24_naming_a_new_mrn_is_answered_and_applied(exchange, database_url):
    """Found by a black-box audit: on PostgreSQL no such A24 was ever answered (the connection
    closed; the sender resending it in order stalled its feed)."""
    doe = pid("GENHOSP", "GH-20", "DOE^JANE", "19700101")
    send(exchange, message("GENHOSP", "A28", doe),
         message("GENHOSP", "A24", doe, pid("GENHOSP", "GH-21", "DOE^JANE", "19700101")))
    assert person_of(exchange, database_url, "GENHOSP", "GH-21") == person_of(exchange, database_url, "GENHOSP", "GH-20")


def test_a40_merges_the_persons_of_the_two_records(exchange, database_url):
    send(exchange,
         message("OAKNH", "A28", pid("OAKNH", "OA-40", **ELIZABETH)),
         message("GENHOSP", "A28", pid("GENHOSP", "GH-40", **ELIZABETH)),
         message("GENHOSP", "A28", pid("GENHOSP", "GH-41", **ELIZABETH)))  # duplicate registration
    send(exchange, message("GENHOSP", "A40", pid("GENHOSP", "GH-41", **ELIZABETH), "MRG|GH-40^^^GENHOSP^MR"))
    survivor = person_of(exchange, database_url, "GENHOSP", "GH-41")
    assert person_of(exchange, database_url, "OAKNH", "OA-40") == survivor
    retired = api_request(exchange, database_url, "GET", "/api/records/GENHOSP/GH-40")
    assert retired["active"] is False and retired["merged_into"] == "GH-41" and retired["person"] == survivor
