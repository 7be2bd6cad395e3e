"""The PIX query (IHE ITI-9) as pure functions: reading QPD, the rules of the answer, and
the RSP^K23 text, checked against hl7apy's v2.5 structure of RSP_K23."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from exchange.hl7.header import read_header
from exchange.mapping.message import Message
from exchange.outcome import Problem
from exchange.pix import PERSON, Answer, Domains, Found, Query, answer, outcome, person_id, read_query, response

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
DOMAINS = Domains({"GENHOSP": "GENHOSP", "OAKNH": "OAKNH", "HHCARE": "2.16.840.1.113883.3.72"}, "EXCHANGE")
ELIZABETH = Found(7, False, (("GENHOSP", "GH-44107"), ("HHCARE", "HH-3391"), ("OAKNH", "OA917082")))


def qbp(qpd: str, version: str = "2.5") -> tuple:
    raw = (f"MSH|^~\\&|EHR|OAKNH|EXCHANGE|EXCHANGE|20261128120000||QBP^Q23^QBP_Q21|Q-1|P|{version}\r"
           f"{qpd}\rRCP|I\r").encode()
    header = read_header(raw)
    return header, Message(raw.decode(), header.delimiters)


def query(qpd: str) -> Query:
    q = read_query(qbp(qpd)[1])
    assert q.problem is None, q.problem
    return q


def test_reading_qpd():
    q = query("QPD|IHE PIX Query|TAG-9|OA917082^^^OAKNH&1.2.3&ISO^MR|^^^GENHOSP~^^^&2.16.840.1.113883.3.72&ISO")
    assert (q.tag, q.id, q.authority) == ("TAG-9", "OA917082", ("OAKNH", "1.2.3"))
    assert q.wanted == (("GENHOSP", ""), ("", "2.16.840.1.113883.3.72"))
    assert q.qpd.startswith("QPD|IHE PIX Query|TAG-9|")


@pytest.mark.parametrize("qpd, code, location", [
    (None, 101, "QPD"),
    ("QPD|IHE PIX Query|T|", 101, "QPD-3.1"),
    ("QPD|IHE PIX Query|T|OA917082", 101, "QPD-3.4"),
    ("QPD|Q22^Find Candidates^HL7|T|OA917082^^^OAKNH", 103, "QPD-1"),  # PDQ's, not ours
    ("QPD|IHE PIX Query|T|OA917082^^^OAKNH|" + "~".join(["^^^GENHOSP"] * 101), 104, "QPD-4"),
])
def test_a_query_that_cannot_be_answered_says_why(qpd, code, location):
    _, message = qbp(qpd or "ZZZ|1")
    problem = read_query(message).problem
    assert isinstance(problem, Problem) and (problem.code, problem.location) == (code, location)


@pytest.mark.parametrize("name", ["", "IHE PIX Query", "Q23^IHE PIX Query^IHE", "ihe pix query"])
def test_the_query_name_may_be_left_out_or_written_either_way(name):
    assert query(f"QPD|{name}|T|OA917082^^^OAKNH").id == "OA917082"


def test_only_an_immediate_response_is_given():
    raw = ("MSH|^~\\&|EHR|OAKNH|EXCHANGE|EXCHANGE|20261128120000||QBP^Q23^QBP_Q21|Q-1|P|2.5\r"
           "QPD|IHE PIX Query|T|OA917082^^^OAKNH\rRCP|D\r")
    problem = read_query(Message(raw, read_header(raw.encode()).delimiters)).problem
    assert (problem.code, problem.location) == (103, "RCP-1")


def test_a_hundred_wanted_domains_are_read_in_one_pass():
    q = query("QPD|IHE PIX Query|T|OA917082^^^OAKNH|" + "~".join(["^^^GENHOSP&1.2&ISO"] * 100))
    assert q.wanted == (("GENHOSP", "1.2"),) * 100


def test_empty_repetitions_of_qpd4_ask_for_nothing():
    a = answer(query("QPD|IHE PIX Query|T|OA917082^^^OAKNH|~~"), "OAKNH", ELIZABETH, DOMAINS)
    assert a.status == "OK" and len(a.identifiers) == 3
    a = answer(query("QPD|IHE PIX Query|T|OA917082^^^OAKNH|~^^^GENHOSP"), "OAKNH", ELIZABETH, DOMAINS)
    assert a.identifiers == (("GH-44107", "GENHOSP", "MR"),)


def test_namespace_and_universal_id_must_not_name_two_domains():
    assert DOMAINS.of(("FOO", "OAKNH")) == "OAKNH"  # the one we know
    assert DOMAINS.of(("GENHOSP", "OAKNH")) is None


@pytest.mark.parametrize("value, expected", [("7", 7), ("0007", 7), ("0", None), ("-1", None), ("+1", None),
                                             ("9223372036854775807", 2 ** 63 - 1), ("9223372036854775808", None),
                                             ("1" * 26, None), ("\uff17", None), ("7.0", None)])
def test_person_ids(value, expected):
    assert person_id(value) == expected


def test_the_queried_person_id_is_left_out_however_it_is_written():
    a = answer(query("QPD|IHE PIX Query|T|0007^^^EXCHANGE"), "OAKNH", ELIZABETH, DOMAINS)
    assert ("7", "EXCHANGE", "PI") not in a.identifiers and len(a.identifiers) == 3


def test_every_other_identifier_of_the_person_by_default():
    a = answer(query("QPD|IHE PIX Query|T|OA917082^^^OAKNH"), "OAKNH", ELIZABETH, DOMAINS)
    assert a.status == "OK" and not a.problems
    assert a.identifiers == (("7", "EXCHANGE", "PI"), ("GH-44107", "GENHOSP", "MR"),
                             ("HH-3391", "2.16.840.1.113883.3.72", "MR"))
    assert a.named == (("GENHOSP", "GH-44107"), ("HHCARE", "HH-3391"))


def test_only_the_wanted_domains_matched_by_namespace_or_universal_id_in_any_case():
    a = answer(query("QPD|IHE PIX Query|T|OA917082^^^oaknh|^^^&2.16.840.1.113883.3.72"), "OAKNH", ELIZABETH,
               DOMAINS)
    assert a.identifiers == (("HH-3391", "2.16.840.1.113883.3.72", "MR"),)


def test_a_second_mrn_in_the_queried_domain_is_returned_the_queried_one_is_not():
    found = Found(7, False, ELIZABETH.records + (("OAKNH", "OA-DUP"),))
    a = answer(query("QPD|IHE PIX Query|T|OA917082^^^OAKNH|^^^OAKNH"), "OAKNH", found, DOMAINS)
    assert a.identifiers == (("OA-DUP", "OAKNH", "MR"),)


def test_the_person_id_is_a_domain_of_its_own():
    a = answer(query("QPD|IHE PIX Query|T|7^^^EXCHANGE|^^^GENHOSP"), "OAKNH", ELIZABETH, DOMAINS)
    assert a.identifiers == (("GH-44107", "GENHOSP", "MR"),)


def test_known_but_nothing_in_the_wanted_domains_is_nf():
    found = Found(7, False, (("OAKNH", "OA917082"),))
    a = answer(query("QPD|IHE PIX Query|T|OA917082^^^OAKNH|^^^GENHOSP"), "OAKNH", found, DOMAINS)
    assert (a.status, a.identifiers, a.problems) == ("NF", (), ())


def test_unknown_domains_are_each_an_error_204():
    a = answer(query("QPD|IHE PIX Query|T|X1^^^NOWHERE|^^^GENHOSP~^^^ELSEWHERE"), "OAKNH", ELIZABETH, DOMAINS)
    assert a.status == "AE"
    assert [(p.code, p.location) for p in a.problems] == [(204, "QPD-3.4"), (204, "QPD-4[2]")]


def test_an_unknown_identifier_is_an_error_204():
    a = answer(query("QPD|IHE PIX Query|T|NOPE^^^OAKNH"), "OAKNH", None, DOMAINS)
    assert [(p.code, p.location) for p in a.problems] == [(204, "QPD-3.1")]


def test_a_facility_holding_no_record_of_the_patient_learns_nothing_not_even_that_it_exists():
    found = Found(7, False, (("GENHOSP", "GH-44107"), ("HHCARE", "HH-3391")))
    a = answer(query("QPD|IHE PIX Query|T|GH-44107^^^GENHOSP"), "OAKNH", found, DOMAINS)
    unknown = answer(query("QPD|IHE PIX Query|T|GH-NOPE^^^GENHOSP"), "OAKNH", None, DOMAINS)
    assert a.problems == unknown.problems and not a.identifiers


def test_a_patient_who_opted_out_is_nf():
    found = Found(7, True, ELIZABETH.records)
    a = answer(query("QPD|IHE PIX Query|T|OA917082^^^OAKNH"), "OAKNH", found, DOMAINS)
    assert (a.status, a.identifiers) == ("NF", ())


def rsp(qpd: str, result: Answer | None, version: str = "2.5") -> list[list[str]]:
    header, message = qbp(qpd, version)
    q = read_query(message)
    text = response(header, q, result, control_id="R-1", now=NOW, application="EXCHANGE", facility="EXCHANGE")
    assert text.endswith("\r") and "\n" not in text
    return [segment.split("|") for segment in text.rstrip("\r").split("\r")]


def test_the_response_to_a_found_patient():
    qpd = "QPD|IHE PIX Query|TAG-1|OA917082^^^OAKNH"
    result = answer(query(qpd), "OAKNH", ELIZABETH, DOMAINS)
    segments = rsp(qpd, result)
    assert [s[0] for s in segments] == ["MSH", "MSA", "QAK", "QPD", "PID"]
    assert segments[0][8] == "RSP^K23^RSP_K23" and segments[0][2] == "EXCHANGE" and segments[0][4] == "EHR"
    assert segments[1][:3] == ["MSA", "AA", "Q-1"]
    assert segments[2] == ["QAK", "TAG-1", "OK"]
    assert "|".join(segments[3]) == qpd
    assert segments[4][3] == "7^^^EXCHANGE^PI~GH-44107^^^GENHOSP^MR~HH-3391^^^2.16.840.1.113883.3.72^MR"
    assert segments[4][5] == "~^^^^^^S"  # no name: a pseudonym's type, as ITI-9 asks


def test_the_response_parses_as_hl7apy_rsp_k23():
    qpd = "QPD|IHE PIX Query|TAG-1|OA917082^^^OAKNH"  # (hl7apy's QPD stops at QPD-3: the query's own fields)
    header, message = qbp(qpd)
    found = Found(7, False, (("GENHOSP", "GH-44107"), ("OAKNH", "OA917082")))  # (HD.1 holds 20 characters)
    result = answer(read_query(message), "OAKNH", found, DOMAINS)
    text = response(header, read_query(message), result, control_id="R-1", now=NOW, application="EXCHANGE",
                    facility="EXCHANGE")
    parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert parsed.name == "RSP_K23" and parsed.validate()
    assert parsed.qak.qak_2.value == "OK"


def test_errors_name_their_location_one_err_each():
    qpd = "QPD|IHE PIX Query|TAG-2|X1^^^NOWHERE|^^^GENHOSP~^^^ELSEWHERE"
    segments = rsp(qpd, answer(query(qpd), "OAKNH", ELIZABETH, DOMAINS))
    assert [s[0] for s in segments] == ["MSH", "MSA", "ERR", "ERR", "QAK", "QPD"]
    assert segments[1][1] == "AE"
    assert segments[2][2] == "QPD^1^3^1^4" and segments[2][3].startswith("204^")
    assert segments[3][2] == "QPD^1^4^2" and segments[3][3].startswith("204^")
    assert segments[4] == ["QAK", "TAG-2", "AE"]


def test_an_unreadable_query_is_answered_ae_with_its_tag_and_qpd():
    header, message = qbp("QPD|IHE PIX Query|T-5|")
    q = read_query(message)
    text = response(header, q, None, control_id="R-1", now=NOW, application="EXCHANGE", facility="EXCHANGE")
    segments = [s.split("|") for s in text.rstrip("\r").split("\r")]
    assert [s[0] for s in segments] == ["MSH", "MSA", "ERR", "QAK", "QPD"] and segments[1][1] == "AE"
    assert segments[3] == ["QAK", "T-5", "AE"] and "|".join(segments[4]) == "QPD|IHE PIX Query|T-5|"
    assert outcome(q, None).problem == q.problem


def test_values_we_write_are_escaped():
    qpd = "QPD|IHE PIX Query|T|OA917082^^^OAKNH"
    result = Answer(identifiers=(("A|B^C", "GENHOSP", "MR"),))
    pid = rsp(qpd, result)[-1]
    assert pid[0] == "PID" and pid[3] == "A\\F\\B\\S\\C^^^GENHOSP^MR"


def test_before_2_5_the_err_segment_is_the_old_one():
    qpd = "QPD|IHE PIX Query|T|NOPE^^^OAKNH"
    segments = rsp(qpd, answer(query(qpd), "OAKNH", None, DOMAINS), version="2.4")
    err = next(s for s in segments if s[0] == "ERR")
    assert err[1].startswith("QPD^1^3^204")


def test_person_is_the_empty_domain_code():
    assert DOMAINS.of(("exchange", "")) == PERSON and DOMAINS.of(("", "")) is None


def test_a_query_in_enhanced_mode_gets_the_application_answer_aa_not_a_commit_ca():
    raw = ("MSH|^~\\&|EHR|OAKNH|EXCHANGE|EXCHANGE|20261128120000||QBP^Q23^QBP_Q21|Q-1|P|2.5|||AL|AL\r"
           "QPD|IHE PIX Query|T|OA917082^^^OAKNH\rRCP|I\r").encode()
    header = read_header(raw)
    assert header.enhanced_mode
    q = read_query(Message(raw.decode(), header.delimiters))
    text = response(header, q, answer(q, "OAKNH", ELIZABETH, DOMAINS), control_id="R-1", now=NOW,
                    application="EXCHANGE", facility="EXCHANGE")
    assert text.split("\r")[1].startswith("MSA|AA|Q-1")


@pytest.mark.parametrize("tag", ["  TE3  ", "TE4^SUB", "T\\S\\5", ""])
def test_qak_1_echoes_qpd_2_as_sent(tag):
    qpd = f"QPD|IHE PIX Query|{tag}|OA917082^^^OAKNH"
    segments = rsp(qpd, answer(query(qpd), "OAKNH", ELIZABETH, DOMAINS))
    assert "|".join(segments[2][:2]) == f"QAK|{tag}" and "|".join(segments[3]) == qpd


def test_an_identifier_the_querys_charset_cannot_carry_turns_the_answer_to_utf_8():
    """Found by an audit: an MRN with an Ø, asked for in ASCII, came back with a '?' in its place."""
    from exchange.pix import response_header
    header, message = qbp("QPD|IHE PIX Query|T|OA917082^^^OAKNH")
    header = replace(header, charset_field="ASCII", codec="ascii")
    found = Found(7, False, (("GENHOSP", "GØ-44107"), ("OAKNH", "OA917082")))
    result = answer(read_query(message), "OAKNH", found, DOMAINS)
    chosen = response_header(header, result)
    assert (chosen.charset_field, chosen.codec) == ("UNICODE UTF-8", "utf-8")
    text = response(chosen, read_query(message), result, control_id="R-1", now=NOW, application="EXCHANGE",
                    facility="EXCHANGE")
    assert text.split("\r")[0].split("|")[17] == "UNICODE UTF-8" and "GØ-44107^^^GENHOSP^MR" in text
    plain = answer(read_query(message), "OAKNH", ELIZABETH, DOMAINS)
    assert response_header(header, plain) is header  # what ASCII carries stays ASCII
