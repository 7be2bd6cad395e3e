"""A PIX query answered in the same transaction as the messages before it (the writer's batch
runner, the test configuration's facilities, on SQLite and PostgreSQL)."""
from __future__ import annotations

import itertools
from datetime import datetime, timezone

import hl7

from exchange.acceptance import accept
from exchange.app import acceptance_policy
from exchange.config import facility_contexts, load_config
from exchange.hl7.header import read_header
from exchange.pipeline import Received
from exchange.writer import make_batch_runner
from tests.support import write_config
from tests.test_e2e_index import ELIZABETH, message, pid

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def test_a_pix_query_is_answered_after_the_messages_before_it_in_its_batch(tmp_path, engine):
    """Found by an audit: a sender pipelining an opt-out (or a registration) and then a query got
    its answer from the index as it was before the batch: the opted-out patient's identifiers at
    the other sites (or 'not known' for the patient it had just registered)."""
    config = load_config(write_config(tmp_path), database=engine.url.render_as_string(hide_password=False))
    ids = itertools.count(1)
    run = make_batch_runner(engine, facilities=facility_contexts(config), routing=config,
                            new_control_id=lambda: f"W{next(ids)}", now=lambda: NOW)
    policy = acceptance_policy(config)

    def item(raw: bytes) -> Received:
        header = read_header(raw)
        return Received(raw, header, accept(header, policy), NOW, "127.0.0.1:5000")

    def query(control: str) -> bytes:
        return (f"MSH|^~\\&|EHR|OAKNH|EXCHANGE|EXCHANGE|20261128120000||QBP^Q23^QBP_Q21|{control}|P|2.5\r"
                "QPD|IHE PIX Query|Q-1|OA917082^^^OAKNH\rRCP|I\r").encode()

    opt_out = "PD1" + "|" * 12 + "Y"
    answers = run([
        item(message("OAKNH", "A28", pid("OAKNH", "OA917082", **ELIZABETH))),
        item(message("GENHOSP", "A28", pid("GENHOSP", "GH-44107", "HANSEN^LIZ", "19400304", ssn="219099999"))),
        item(query("PIX-1")),
        item(message("OAKNH", "A08", pid("OAKNH", "OA917082", **ELIZABETH), opt_out)),
        item(query("PIX-2")),
        item(query("PIX-1")),  # a resend: the first answer again
    ])
    assert [a.ack_code for a in answers] == ["AA"] * 6
    first, second, resent = (hl7.parse(answers[i].ack.decode()) for i in (2, 4, 5))
    assert str(first.segment("QAK")[2]) == "OK"  # the registrations before it, not "not known"
    assert "GH-44107^^^GENHOSP^MR" in {str(rep) for rep in first.segment("PID")[3]}
    assert str(second.segment("QAK")[2]) == "NF"  # the opt-out before it
    assert answers[5].duplicate and answers[5].ack == answers[2].ack
