"""A PIX query answered in the same transaction as the messages before it (the writer's batch
runner, the test configuration's facilities, on SQLite and PostgreSQL)."""
from __future__ import annotations

import hl7
from sqlalchemy import text

from tests.test_e2e_index import ELIZABETH, message, pid
from tests.test_e2e_pix import qbp


def query(control: str, qpd: str = "QPD|IHE PIX Query|Q-1|OA917082^^^OAKNH") -> bytes:
    return qbp("OAKNH", qpd, control).encode()


def test_a_pix_query_is_answered_after_the_messages_before_it_in_its_batch(batch):
    """Found by an audit: a sender pipelining an opt-out (or a registration) and then a query got
    its answer from the index as it was before the batch: the opted-out patient's identifiers at
    the other sites (or 'not known' for the patient it had just registered)."""
    opt_out = "PD1" + "|" * 12 + "Y"
    answers = batch(
        message("OAKNH", "A28", pid("OAKNH", "OA917082", **ELIZABETH)),
        message("GENHOSP", "A28", pid("GENHOSP", "GH-44107", "HANSEN^LIZ", "19400304", ssn="219099999")),
        query("PIX-1"),
        message("OAKNH", "A08", pid("OAKNH", "OA917082", **ELIZABETH), opt_out),
        query("PIX-2"),
        query("PIX-1"),  # a resend: the first answer again
    )
    assert [a.ack_code for a in answers] == ["AA"] * 6
    first, second = (hl7.parse(answers[i].ack.decode()) for i in (2, 4))
    assert str(first.segment("QAK")[2]) == "OK"  # the registrations before it, not "not known"
    assert "GH-44107^^^GENHOSP^MR" in {str(rep) for rep in first.segment("PID")[3]}
    assert str(second.segment("QAK")[2]) == "NF"  # the opt-out before it
    assert answers[5].duplicate and answers[5].ack == answers[2].ack


def test_a_nul_in_an_identifier_is_not_known_on_both_databases(batch, engine):
    """Found by an audit: on PostgreSQL (no NUL in text) a QPD-3 of OA\\X00\\1 failed the batch,
    answered by the general AE 207 ACK, and so did an ADT with it in PID-3 (SQLite: AE 204, AE 102)."""
    answers = batch(
        message("OAKNH", "A28", pid("OAKNH", "OA917082", **ELIZABETH)),
        query("PIX-NUL", "QPD|IHE PIX Query|Q-9|OA\\X00\\1^^^OAKNH"),
        message("OAKNH", "A28", pid("OAKNH", "OA\\X00\\2", **ELIZABETH)),
        query("PIX-7", "QPD|IHE PIX Query|Q-7|0001^^^EXCHANGE"),
    )
    assert [a.ack_code for a in answers] == ["AA", "AE", "AE", "AA"]
    rsp = hl7.parse(answers[1].ack.decode())
    assert str(rsp.segment("MSH")[9]) == "RSP^K23^RSP_K23" and str(rsp.segment("QAK")[1]) == "Q-9"
    assert str(rsp.segment("ERR")[2]) == "QPD^1^3^1^1" and str(rsp.segment("ERR")[3]).startswith("204^")
    ack = hl7.parse(answers[2].ack.decode())
    assert str(ack.segment("ERR")[3]).startswith("102^")  # a data type error, as on SQLite
    with engine.connect() as conn:
        keys = conn.execute(text("select key, outcome from audit_event where role = 'facility' and resource in"
                                 " ('record', 'person') and actor = 'OAKNH' order by id")).all()
    assert ("OA\\X00\\1", "not-found") in keys
    assert ("1", "ok") in keys  # person 1, asked for as 0001: "who looked up person 1" finds it
