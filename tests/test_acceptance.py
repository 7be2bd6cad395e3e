"""accept(): one test (at least) per rule, in the order the rules run."""
from __future__ import annotations

import dataclasses

import pytest

from exchange.acceptance import (
    AcceptancePolicy,
    FacilityRule,
    PeerIdentity,
    accept,
    matches,
    normalize_fingerprint,
    normalize_subject,
)
from exchange.hl7.header import Header
from exchange.outcome import ACCEPTED, IGNORED, Outcome, Problem, Verdict

FP_A = "ab" * 32
FP_B = "cd" * 32

POLICY = AcceptancePolicy(
    facilities={
        "HOSP1": FacilityRule("HOSP1"),
        "HOSP2": FacilityRule("HOSP2"),
        "TLSFP": FacilityRule("TLSFP", tls_fingerprint=FP_A),
        "TLSDN": FacilityRule("TLSDN", tls_subject="CN=nh.example.org, O=Nursing Home"),
        "TLSCN": FacilityRule("TLSCN", tls_subject="hh.example.org"),
        "TLSBOTH": FacilityRule("TLSBOTH", tls_subject="both.example.org", tls_fingerprint=FP_B),
    }
)


def header(**overrides) -> Header:
    values = dict(
        sending_application_field="APP",
        sending_facility_field="HOSP1^1.2.3^ISO",
        receiving_application_field="EXCHANGE",
        receiving_facility_field="EXCHANGE",
        message_type="ADT",
        event="A01",
        control_id="MSG1",
        processing_id="P",
        processing_id_field="P",
        version="2.5",
        version_field="2.5",
    )
    values.update(overrides)
    return Header(**values)


def assert_outcome(outcome: Outcome, verdict: Verdict, code: int, location: str) -> None:
    assert outcome.verdict is verdict
    assert outcome.problem is not None
    assert (outcome.problem.code, outcome.problem.location) == (code, location)


def test_a_good_message_is_accepted():
    assert accept(header(), POLICY) == ACCEPTED
    assert accept(header(message_type="MDM", event="T02"), POLICY) == ACCEPTED


# 1. structural problems ------------------------------------------------------


@pytest.mark.parametrize("location", ["MSH", "MSH-2", "MSH-1"])
def test_1_structural_problem_is_an_error(location):
    problem = Problem(100, location, "no usable MSH")
    # wins over everything else, even an ACK from an unknown sender
    h = header(problem=problem, message_type="ACK", sending_facility_field="NOBODY", control_id="")
    outcome = accept(h, POLICY)
    assert outcome == Outcome(Verdict.ERROR, problem)


# 2. ACKs ---------------------------------------------------------------------


def test_2_an_ack_is_ignored():
    assert accept(header(message_type="ACK", event="A01"), POLICY) == IGNORED


def test_2_an_ack_is_ignored_even_from_an_unknown_sender_or_version():
    h = header(message_type="ACK", event="", sending_facility_field="NOBODY", version="2.6.1")
    assert accept(h, POLICY) == IGNORED


# 3. sending facility -----------------------------------------------------------


def test_3_unknown_facility_is_rejected():
    outcome = accept(header(sending_facility_field="OTHER^1.2^ISO"), POLICY)
    assert_outcome(outcome, Verdict.REJECT, 103, "MSH-4")
    assert outcome.text == "sending facility OTHER is not a configured facility"


def test_3_facility_codes_are_case_sensitive():
    outcome = accept(header(sending_facility_field="hosp1"), POLICY)
    assert_outcome(outcome, Verdict.REJECT, 103, "MSH-4")


def test_3_facility_code_is_stripped():
    # Header.facility strips MSH-4.1
    assert accept(header(sending_facility_field=" HOSP1 ^x"), POLICY) == ACCEPTED


def test_3_missing_facility_is_rejected():
    outcome = accept(header(sending_facility_field=""), POLICY)
    assert_outcome(outcome, Verdict.REJECT, 101, "MSH-4")


def test_3_facility_code_quoted_in_text_is_bounded():
    outcome = accept(header(sending_facility_field="X" * 500), POLICY)
    assert len(outcome.text) < 120


def test_3_unknown_facility_comes_before_version_and_type():
    h = header(sending_facility_field="OTHER", version="9.9", message_type="ORU")
    assert_outcome(accept(h, POLICY), Verdict.REJECT, 103, "MSH-4")


# 4. TLS binding ----------------------------------------------------------------

MISMATCH = "sending facility does not match the authenticated client certificate"


def test_4_bound_facility_without_certificate_is_rejected():
    for peer in (None, PeerIdentity()):
        outcome = accept(header(sending_facility_field="TLSFP"), POLICY, peer)
        assert_outcome(outcome, Verdict.REJECT, 103, "MSH-4")
        assert outcome.text == MISMATCH


@pytest.mark.parametrize(
    "fingerprint",
    [FP_A, FP_A.upper(), ":".join(FP_A[i : i + 2] for i in range(0, 64, 2)), "sha256:" + FP_A, "SHA256:" + FP_A.upper()],
)
def test_4_fingerprint_matches_normalised(fingerprint):
    peer = PeerIdentity(tls_subject="CN=whatever", tls_fingerprint=fingerprint)
    assert accept(header(sending_facility_field="TLSFP"), POLICY, peer) == ACCEPTED


def test_4_wrong_fingerprint_is_rejected():
    peer = PeerIdentity(tls_fingerprint=FP_B)
    outcome = accept(header(sending_facility_field="TLSFP"), POLICY, peer)
    assert_outcome(outcome, Verdict.REJECT, 103, "MSH-4")
    assert outcome.text == MISMATCH


@pytest.mark.parametrize(
    "subject",
    [
        "CN=nh.example.org,O=Nursing Home",
        "cn=nh.example.org, o=Nursing Home",
        "O=Nursing Home,CN=nh.example.org",  # RFC 4514 order is reversed vs. OpenSSL
        "/O=Nursing Home/CN=nh.example.org",  # OpenSSL one-line form
        "commonName=nh.example.org,organizationName=Nursing Home",
    ],
)
def test_4_full_subject_matches_normalised(subject):
    peer = PeerIdentity(tls_subject=subject)
    assert accept(header(sending_facility_field="TLSDN"), POLICY, peer) == ACCEPTED


@pytest.mark.parametrize(
    "subject",
    [
        "CN=nh.example.org",  # O missing
        "CN=nh.example.org,O=Nursing Home,OU=Extra",  # an extra attribute
        "CN=nh.example.org,O=nursing home",  # values keep their case
        "CN=other.example.org,O=Nursing Home",
    ],
)
def test_4_full_subject_mismatch_is_rejected(subject):
    outcome = accept(header(sending_facility_field="TLSDN"), POLICY, PeerIdentity(tls_subject=subject))
    assert_outcome(outcome, Verdict.REJECT, 103, "MSH-4")


def test_4_bare_cn_rule_matches_the_certificate_cn():
    h = header(sending_facility_field="TLSCN")
    assert accept(h, POLICY, PeerIdentity(tls_subject="CN=hh.example.org,O=Home Health,C=US")) == ACCEPTED
    assert accept(h, POLICY, PeerIdentity(tls_subject="hh.example.org")) == ACCEPTED
    outcome = accept(h, POLICY, PeerIdentity(tls_subject="CN=evil.example.org,OU=hh.example.org"))
    assert_outcome(outcome, Verdict.REJECT, 103, "MSH-4")
    outcome = accept(h, POLICY, PeerIdentity(tls_subject="CN=evil.example.org,CN=hh.example.org"))
    assert_outcome(outcome, Verdict.REJECT, 103, "MSH-4")


def test_4_certificate_subjects_match_the_forms_the_configuration_documents():
    """Found by a black-box audit: a CN with a comma, bound as the bare CN, and an OpenSSL-printed
    subject with emailAddress (compared as its OID in hex) each locked their own facility out."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from exchange.mllp.protocol import subject_text

    cert_subject = subject_text(x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Audit"),
        x509.NameAttribute(NameOID.COMMON_NAME, "Mercy Hospital, North"),
        x509.NameAttribute(NameOID.EMAIL_ADDRESS, "it@lab3.example"),
    ]))
    peer = PeerIdentity(tls_subject=cert_subject)
    for bound in ("Mercy Hospital, North", "/O=Audit/CN=Mercy Hospital, North/emailAddress=it@lab3.example",
                  "CN=Mercy Hospital\\, North,O=Audit,emailAddress=it@lab3.example",
                  "E=it@lab3.example,CN=Mercy Hospital\\2C North,O=Audit"):
        policy = AcceptancePolicy(facilities={"MERCY": FacilityRule("MERCY", tls_subject=bound)})
        assert accept(header(sending_facility_field="MERCY"), policy, peer) == ACCEPTED, bound
    for other in ("Mercy Hospital", "/O=Audit/CN=Mercy Hospital, North", "CN=Mercy Hospital\\, South,O=Audit"):
        policy = AcceptancePolicy(facilities={"MERCY": FacilityRule("MERCY", tls_subject=other)})
        assert_outcome(accept(header(sending_facility_field="MERCY"), policy, peer), Verdict.REJECT, 103, "MSH-4")


def test_4_subject_and_fingerprint_must_both_match():
    h = header(sending_facility_field="TLSBOTH")
    good = PeerIdentity(tls_subject="CN=both.example.org", tls_fingerprint=FP_B)
    assert accept(h, POLICY, good) == ACCEPTED
    for peer in (
        PeerIdentity(tls_subject="CN=both.example.org", tls_fingerprint=FP_A),
        PeerIdentity(tls_subject="CN=other", tls_fingerprint=FP_B),
        PeerIdentity(tls_fingerprint=FP_B),
    ):
        assert_outcome(accept(h, POLICY, peer), Verdict.REJECT, 103, "MSH-4")


def test_4_certificate_of_another_facility_cannot_claim_an_unbound_one():
    # HOSP1 has no binding, but this certificate belongs to TLSFP.
    peer = PeerIdentity(tls_subject="CN=x", tls_fingerprint=FP_A)
    outcome = accept(header(sending_facility_field="HOSP1"), POLICY, peer)
    assert_outcome(outcome, Verdict.REJECT, 103, "MSH-4")
    assert outcome.text == MISMATCH


def test_4_certificate_of_another_facility_cannot_claim_a_bound_one():
    peer = PeerIdentity(tls_subject="CN=nh.example.org,O=Nursing Home")  # TLSDN's
    assert_outcome(accept(header(sending_facility_field="TLSCN"), POLICY, peer), Verdict.REJECT, 103, "MSH-4")


def test_4_unbound_facility_over_plain_tcp_or_unknown_certificate_is_fine():
    h = header(sending_facility_field="HOSP2")
    assert accept(h, POLICY, None) == ACCEPTED
    assert accept(h, POLICY, PeerIdentity()) == ACCEPTED
    assert accept(h, POLICY, PeerIdentity(tls_subject="CN=unrelated", tls_fingerprint="00" * 32)) == ACCEPTED


def test_4_one_certificate_may_be_bound_to_two_facilities():
    policy = AcceptancePolicy(
        facilities={
            "SITE_A": FacilityRule("SITE_A", tls_subject="engine.example.org"),
            "SITE_B": FacilityRule("SITE_B", tls_subject="engine.example.org"),
        }
    )
    peer = PeerIdentity(tls_subject="CN=engine.example.org")
    assert accept(header(sending_facility_field="SITE_A"), policy, peer) == ACCEPTED
    assert accept(header(sending_facility_field="SITE_B"), policy, peer) == ACCEPTED


def test_4_tls_check_comes_before_version():
    h = header(sending_facility_field="TLSFP", version="9.9")
    assert_outcome(accept(h, POLICY, None), Verdict.REJECT, 103, "MSH-4")


def test_normalisers():
    assert normalize_fingerprint(" SHA256:AB:CD ") == "abcd"
    assert normalize_subject("CN = a , O = b") == (("CN", "a"), ("O", "b"))
    assert normalize_subject("O=Acme\\, Inc,CN=a") == (("CN", "a"), ("O", "Acme, Inc"))
    assert normalize_subject("CN=Caf\\C3\\A9 \\+ Bar") == (("CN", "Café + Bar"),)
    assert normalize_subject("CN=a+UID=7") == (("CN", "a"), ("UID", "7"))
    assert normalize_subject("justacn") == (("CN", "justacn"),)


# 5. version --------------------------------------------------------------------


@pytest.mark.parametrize(
    "version",
    ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"],
)
def test_5_supported_versions(version):
    assert accept(header(version=version, version_field=version), POLICY) == ACCEPTED


@pytest.mark.parametrize("version", ["2.0", "2.9", "3.1415926", "1.5", "2", "2.5a", "V2.5", "2.x", "3.0"])
def test_5_unsupported_version_is_rejected(version):
    outcome = accept(header(version=version, version_field=version), POLICY)
    assert_outcome(outcome, Verdict.REJECT, 203, "MSH-12")
    assert outcome.text == f"version id {version} is not supported"


def test_5_version_with_country_component():
    assert accept(header(version="2.5", version_field="2.5^DEU"), POLICY) == ACCEPTED


def test_5_missing_version_is_an_error():
    assert_outcome(accept(header(version="", version_field=""), POLICY), Verdict.ERROR, 101, "MSH-12")


# 6. processing id ----------------------------------------------------------------


@pytest.mark.parametrize("processing_id", ["T", "D", "p"])
def test_6_processing_id_not_accepted(processing_id):
    outcome = accept(header(processing_id=processing_id), POLICY)
    assert_outcome(outcome, Verdict.REJECT, 202, "MSH-11")
    assert outcome.text == f"processing id {processing_id} is not accepted"


def test_6_processing_ids_are_configurable():
    policy = dataclasses.replace(POLICY, processing_ids=("P", "T"))
    assert accept(header(processing_id="T", processing_id_field="T"), policy) == ACCEPTED


def test_6_processing_mode_component_is_ignored():
    assert accept(header(processing_id="P", processing_id_field="P^T"), POLICY) == ACCEPTED


def test_6_missing_processing_id_is_an_error():
    h = header(processing_id="", processing_id_field="")
    assert_outcome(accept(h, POLICY), Verdict.ERROR, 101, "MSH-11")


def test_6_version_is_checked_before_processing_id():
    assert_outcome(accept(header(version="9.9", processing_id="T"), POLICY), Verdict.REJECT, 203, "MSH-12")


# 7. message type and event -------------------------------------------------------


def test_7_missing_message_type_is_an_error():
    assert_outcome(accept(header(message_type="", event=""), POLICY), Verdict.ERROR, 101, "MSH-9")


@pytest.mark.parametrize("message_type", ["ORU", "ORM", "SIU", "RSP", "ZDT", "adt"])
def test_7_unaccepted_type_is_rejected_200(message_type):
    outcome = accept(header(message_type=message_type, event="R01"), POLICY)
    assert_outcome(outcome, Verdict.REJECT, 200, "MSH-9")
    assert outcome.text == f"message type {message_type} is not accepted"


def test_7_the_pix_query_is_accepted_other_queries_are_not():
    assert accept(header(message_type="QBP", event="Q23"), POLICY) == ACCEPTED
    outcome = accept(header(message_type="QBP", event="Q22"), POLICY)  # PDQ: not answered
    assert_outcome(outcome, Verdict.REJECT, 201, "MSH-9.2")


def test_7_unaccepted_event_of_an_accepted_type_is_rejected_201():
    policy = dataclasses.replace(POLICY, accept=("ADT^A0?", "ADT^A40", "MDM^*"))
    assert accept(header(event="A04"), policy) == ACCEPTED
    assert accept(header(event="A40"), policy) == ACCEPTED
    outcome = accept(header(event="A47"), policy)
    assert_outcome(outcome, Verdict.REJECT, 201, "MSH-9.2")
    assert outcome.text == "event A47 of message type ADT is not accepted"
    outcome = accept(header(event=""), policy)
    assert_outcome(outcome, Verdict.REJECT, 201, "MSH-9.2")
    assert outcome.text == "message type ADT without an event is not accepted"
    assert_outcome(accept(header(message_type="ORU", event="R01"), policy), Verdict.REJECT, 200, "MSH-9")


def test_7_type_without_event_is_accepted_by_a_wildcard():
    # v2.1 "ADT" with no trigger event (medplum sample)
    assert accept(header(event="", version="2.1", version_field="2.1"), POLICY) == ACCEPTED


def test_7_processing_id_is_checked_before_type():
    assert_outcome(accept(header(processing_id="T", message_type="ORU"), POLICY), Verdict.REJECT, 202, "MSH-11")


# 8. control id -------------------------------------------------------------------


@pytest.mark.parametrize("control_id", ["", "  "])
def test_8_missing_control_id_is_an_error(control_id):
    assert_outcome(accept(header(control_id=control_id), POLICY), Verdict.ERROR, 101, "MSH-10")


def test_8_an_over_long_control_id_is_an_error():
    """Found by a black-box audit: a 100,000-character MSH-10 was accepted, stored cut to 199
    characters (so two such ids could dedup as one) and echoed whole in every MSA-2 and log line."""
    assert accept(header(control_id="C" * 199), POLICY) is ACCEPTED
    assert_outcome(accept(header(control_id="C" * 200), POLICY), Verdict.ERROR, 102, "MSH-10")


@pytest.mark.parametrize("control_id", ["W1-A\x00B", "W1-A\udcffB"])
def test_8_a_control_id_that_would_be_stored_as_another_is_an_error(control_id):
    """Found by an audit: MSH-10 W1-A<NUL>B was stored as W1-A\uFFFDB, so a later message with
    that id got the first one's ACK and was never applied."""
    assert_outcome(accept(header(control_id=control_id), POLICY), Verdict.ERROR, 102, "MSH-10")
    assert accept(header(control_id="W1-A\ufffdB"), POLICY) == ACCEPTED


def test_8_type_is_checked_before_control_id():
    assert_outcome(accept(header(control_id="", message_type="ORU"), POLICY), Verdict.REJECT, 200, "MSH-9")


# 9. other header problems --------------------------------------------------------


def test_9_other_header_problem_is_an_error():
    problem = Problem(103, "MSH-18", "character set (MSH-18) is not supported")
    assert accept(header(problem=problem), POLICY) == Outcome(Verdict.ERROR, problem)


def test_9_rejections_win_over_other_problems():
    problem = Problem(103, "MSH-18", "character set (MSH-18) is not supported")
    assert_outcome(accept(header(problem=problem, message_type="ORU"), POLICY), Verdict.REJECT, 200, "MSH-9")


# matches ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, message_type, event, expected",
    [
        ("ADT^*", "ADT", "A01", True),
        ("ADT^*", "ADT", "", True),
        ("ADT", "ADT", "A40", True),
        ("ADT^A01", "ADT", "A01", True),
        ("ADT^A01", "ADT", "A04", False),
        ("ADT^A0?", "ADT", "A04", True),
        ("ADT^A0?", "ADT", "A40", False),
        ("ADT^A[0-3]*", "ADT", "A31", True),
        ("MDM^*", "ADT", "A01", False),
        ("*", "ORU", "R01", True),
        ("*^A01", "ADT", "A01", True),
        ("*^A01", "ADT", "A02", False),
        (" ADT ^ A01 ", "ADT", "A01", True),
        ("ADT^A01^ADT_A01", "ADT", "A01", True),
        ("adt^a01", "ADT", "A01", False),
    ],
)
def test_matches(pattern, message_type, event, expected):
    assert matches(pattern, message_type, event) is expected


def test_policy_defaults():
    policy = AcceptancePolicy(facilities={})
    assert policy.accept == ("ADT^*", "MDM^*", "QBP^Q23")
    assert policy.processing_ids == ("P",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.accept = ()  # type: ignore[misc]
