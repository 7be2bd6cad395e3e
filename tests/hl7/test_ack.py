"""build_ack: field by field, per version and mode; checked back with python-hl7 and hl7apy."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hypothesis import given
from hypothesis import strategies as st

from exchange.acceptance import AcceptancePolicy, FacilityRule, accept
from exchange.hl7.ack import (
    TABLE_0357,
    ack_code,
    build_ack,
    escape_text,
    format_timestamp,
    version_tuple,
)
from exchange.hl7.header import Delimiters, Header, read_header
from exchange.outcome import ACCEPTED, IGNORED, Outcome, Problem, Verdict, error, rejected
from tests.support import CORPUS_DIR

NOW = datetime(2024, 3, 5, 14, 7, 9)
NOW_TEXT = "20240305140709"

VERSIONS = ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"]
PRE_2_5 = {"2.1", "2.2", "2.3", "2.3.1", "2.4"}
MSH_9 = {
    "2.1": "ACK",
    "2.2": "ACK^A01",
    "2.3": "ACK^A01",
    "2.3.1": "ACK^A01^ACK",
    "2.4": "ACK^A01^ACK",
    "2.5": "ACK^A01^ACK",
    "2.5.1": "ACK^A01^ACK",
    "2.6": "ACK^A01^ACK",
    "2.7": "ACK^A01^ACK",
    "2.8": "ACK^A01^ACK",
}
# hl7apy has no ACK structure for v2.1-2.3, so strict validation starts at 2.3.1.
HL7APY_STRICT = {"2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"}

# (MSH-15, MSH-16) -> enhanced mode?
MODES = {
    "original": ("", ""),
    "enhanced-AL-NE": ("AL", "NE"),
    "enhanced-NE-NE": ("NE", "NE"),
    "enhanced-ER-AL": ("ER", "AL"),
    "enhanced-only-16-SU": ("", "SU"),
}
OUTCOMES = {
    "accept": ACCEPTED,
    "error": error(101, "PID-3", "patient identifier list (PID-3) is missing"),
    "reject": rejected(203, "MSH-12", "version id 9.9 is not supported"),
}
EXPECTED_CODE = {
    ("original", "accept"): "AA",
    ("original", "error"): "AE",
    ("original", "reject"): "AR",
    ("enhanced", "accept"): "CA",
    ("enhanced", "error"): "CE",
    ("enhanced", "reject"): "CR",
}


def make_header(version: str = "2.5", **overrides) -> Header:
    values = dict(
        sending_application_field="SENDAPP^1.2.3&x",
        sending_facility_field="HOSP1^2.16.840.1^ISO",
        receiving_application_field="EXCH_APP",
        receiving_facility_field="EXCH_FAC",
        timestamp="20240305120000",
        message_type="ADT",
        event="A01",
        structure="ADT_A01",
        control_id="MSG00001",
        processing_id="P",
        processing_id_field="P",
        version=version,
        version_field=version,
    )
    values.update(overrides)
    return Header(**values)


def fields(segment: str, sep: str = "|") -> list[str]:
    """HL7 numbering: fields(msh)[n] is MSH-n, fields(other)[n] is XXX-n."""
    parts = segment.split(sep)
    if parts[0] in ("MSH", "BHS", "FHS"):
        return [parts[0], sep] + parts[1:]
    return parts


def field(parts: list[str], n: int) -> str:
    return parts[n] if n < len(parts) else ""


def segments(ack: str) -> list[str]:
    assert ack.endswith("\r")
    assert "\n" not in ack
    return ack[:-1].split("\r")


# --- per version and mode -------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("which", list(OUTCOMES))
def test_ack_fields_per_version_and_mode(version, mode, which):
    accept_ack, app_ack = MODES[mode]
    header = make_header(version, accept_ack_type=accept_ack, application_ack_type=app_ack)
    outcome = OUTCOMES[which]
    ack = build_ack(header, outcome, control_id="ACK0001", now=NOW)
    segs = segments(ack)

    expected_code = EXPECTED_CODE[("original" if mode == "original" else "enhanced", which)]
    assert ack_code(header, outcome) == expected_code

    msh = fields(segs[0])
    assert msh[0] == "MSH"
    assert msh[1] == "|" and msh[2] == "^~\\&"
    assert msh[3] == "EXCH_APP"  # original MSH-5
    assert msh[4] == "EXCH_FAC"  # original MSH-6
    assert msh[5] == "SENDAPP^1.2.3&x"  # original MSH-3, raw
    assert msh[6] == "HOSP1^2.16.840.1^ISO"  # original MSH-4, raw
    assert msh[7] == NOW_TEXT
    assert msh[8] == ""
    assert msh[9] == MSH_9[version]
    assert msh[10] == "ACK0001"
    assert msh[11] == "P"
    assert msh[12] == version
    assert len(msh) == 13  # nothing after MSH-12: no MSH-15/16 in the ACK

    msa = fields(segs[1])
    assert msa[0] == "MSA"
    assert msa[1] == expected_code
    assert msa[2] == "MSG00001"
    assert field(msa, 3) == ("" if which == "accept" else outcome.text)

    if which == "accept":
        assert len(segs) == 2
    else:
        assert len(segs) == 3
        err = fields(segs[2])
        assert err[0] == "ERR"
        code, location = outcome.problem.code, outcome.problem.location
        description = TABLE_0357[code]
        segment, number = location.split("-")
        if version in PRE_2_5:
            assert err[1:] == [f"{segment}^1^{number}^{code}&{description}&HL70357"]
        else:
            assert err[1] == ""
            assert err[2] == f"{segment}^1^{number}"
            assert err[3] == f"{code}^{description}^HL70357"
            assert err[4] == "E"
            assert err[5:8] == ["", "", ""]
            assert err[8] == outcome.text
            assert len(err) == 9

    # python-hl7 reads it back
    parsed = hl7.parse(ack)
    assert str(parsed.segment("MSA")[1]) == expected_code
    assert str(parsed.segment("MSA")[2]) == "MSG00001"
    assert str(parsed.segment("MSH")[10]) == "ACK0001"


@pytest.mark.parametrize("version", sorted(HL7APY_STRICT))
@pytest.mark.parametrize("which", list(OUTCOMES))
@pytest.mark.parametrize("mode", ["original", "enhanced-AL-NE"])
def test_hl7apy_strict_validation(version, which, mode):
    accept_ack, app_ack = MODES[mode]
    header = make_header(
        version,
        accept_ack_type=accept_ack,
        application_ack_type=app_ack,
        sending_application_field="SENDAPP",  # a valid HD for the strict check
    )
    ack = build_ack(header, OUTCOMES[which], control_id="ACK0001", now=NOW)
    if version_tuple(version) >= (2, 7) and which != "accept":
        # MSA-3 was withdrawn in v2.7 (the text lives in ERR-8 there); we still
        # send it for receivers that show MSA-3, and hl7apy rejects a withdrawn
        # field. Validate everything else strictly.
        segs = segments(ack)
        segs[1] = "|".join(segs[1].split("|")[:3])
        ack = "\r".join(segs) + "\r"
    message = parse_message(ack, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate()
    assert message.msa.msa_1.value == EXPECTED_CODE[
        ("original" if mode == "original" else "enhanced", which)
    ]
    assert message.msa.msa_2.value == "MSG00001"


def test_hl7apy_reads_the_v25_err_segment():
    outcome = error(101, "PID-3.4", "assigning authority (PID-3.4) is missing")
    ack = build_ack(make_header("2.5", sending_application_field="SENDAPP"), outcome, control_id="A1", now=NOW)
    message = parse_message(ack, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate()
    err = message.err
    assert err.err_2.err_2_1.value == "PID"  # ERL segment id
    assert err.err_2.err_2_2.value == "1"  # sequence
    assert err.err_2.err_2_3.value == "3"  # field
    assert err.err_2.err_2_4.value == "1"  # field repetition
    assert err.err_2.err_2_5.value == "4"  # component
    assert err.err_3.err_3_1.value == "101"
    assert err.err_3.err_3_2.value == "Required field missing"
    assert err.err_3.err_3_3.value == "HL70357"
    assert err.err_4.value == "E"
    assert err.err_8.value == "assigning authority (PID-3.4) is missing"


def test_hl7apy_v24_err_is_an_eld():
    header = make_header("2.4", sending_application_field="SENDAPP")
    ack = build_ack(header, OUTCOMES["reject"], control_id="A1", now=NOW)
    message = parse_message(ack, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate()
    eld = message.err.err_1
    assert eld.err_1_1.value == "MSH"
    assert eld.err_1_2.value == "1"
    assert eld.err_1_3.value == "12"
    assert eld.err_1_4.to_er7() == "203&Unsupported version id&HL70357"


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.3"])
def test_old_versions_parse_tolerantly(version):
    ack = build_ack(make_header(version), OUTCOMES["error"], control_id="A1", now=NOW)
    message = parse_message(ack, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    assert [c.name for c in message.children] == ["MSH", "MSA", "ERR"]


# --- ACK code ---------------------------------------------------------------


def test_ignore_is_never_acked():
    with pytest.raises(ValueError, match="never ACK an ACK"):
        build_ack(make_header(message_type="ACK"), IGNORED, control_id="A1", now=NOW)
    with pytest.raises(ValueError):
        ack_code(make_header(), IGNORED)


@pytest.mark.parametrize(
    "verdict, original, enhanced",
    [(Verdict.ACCEPT, "AA", "CA"), (Verdict.ERROR, "AE", "CE"), (Verdict.REJECT, "AR", "CR")],
)
def test_ack_code(verdict, original, enhanced):
    outcome = Outcome(verdict)
    assert ack_code(make_header(), outcome) == original
    assert ack_code(make_header(accept_ack_type="AL"), outcome) == enhanced
    assert ack_code(make_header(application_ack_type="ER"), outcome) == enhanced


def test_enhanced_mode_with_never_still_gets_its_commit_ack():
    # MSH-15 = NE asks for no accept ACK; the contract answers every frame once.
    header = make_header(accept_ack_type="NE", application_ack_type="NE")
    ack = build_ack(header, ACCEPTED, control_id="A1", now=NOW)
    assert segments(ack)[1] == "MSA|CA|MSG00001"


# --- MSH -------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, event, expected",
    [
        ("2.1", "A01", "ACK"),
        ("2.2", "A01", "ACK^A01"),
        ("2.3", "A01", "ACK^A01"),
        ("2.3.1", "A01", "ACK^A01^ACK"),
        ("2.8.2", "A01", "ACK^A01^ACK"),
        ("2.5", "", "ACK"),
        ("2.3", "", "ACK"),
        ("3.1415926", "A01", "ACK^A01^ACK"),
        ("junk", "A01", "ACK^A01^ACK"),
        ("", "T02", "ACK^T02^ACK"),  # answered as 2.5
    ],
)
def test_msh_9(version, event, expected):
    ack = build_ack(make_header(version, event=event), ACCEPTED, control_id="A1", now=NOW)
    assert fields(segments(ack)[0])[9] == expected


def test_defaults_for_empty_receiver_processing_id_and_version():
    header = make_header(
        "",
        receiving_application_field="",
        receiving_facility_field="",
        processing_id="",
        processing_id_field="",
        version_field="",
    )
    msh = fields(segments(build_ack(header, ACCEPTED, control_id="A1", now=NOW))[0])
    assert msh[3] == "EXCHANGE"
    assert msh[4] == "EXCHANGE"
    assert msh[11] == "P"
    assert msh[12] == "2.5"


def test_own_application_and_facility_are_escaped():
    header = make_header(receiving_application_field="", receiving_facility_field="")
    ack = build_ack(header, ACCEPTED, control_id="A1", now=NOW, application="HUB|X", facility="F^1")
    msh = fields(segments(ack)[0])
    assert msh[3] == "HUB\\F\\X"
    assert msh[4] == "F\\S\\1"


def test_whole_fields_are_mirrored():
    header = make_header(
        "2.5",
        version_field="2.5^DEU^HL70399",
        processing_id="P",
        processing_id_field="P^T",
        charset_field="UNICODE UTF-8",
    )
    msh = fields(segments(build_ack(header, ACCEPTED, control_id="A1", now=NOW))[0])
    assert msh[11] == "P^T"
    assert msh[12] == "2.5^DEU^HL70399"
    assert msh[13:18] == ["", "", "", "", ""]
    assert msh[18] == "UNICODE UTF-8"
    assert len(msh) == 19


def test_unsupported_version_is_mirrored_as_sent():
    header = make_header("3.1415926")
    ack = build_ack(header, OUTCOMES["reject"], control_id="A1", now=NOW)
    segs = segments(ack)
    assert fields(segs[0])[12] == "3.1415926"
    # starts with a number >= 2.5: v2.5 ERR layout
    assert fields(segs[2])[2] == "MSH^1^12"


def test_unparseable_version_gets_the_pre_25_err():
    header = make_header("V2", version_field="V2")
    ack = build_ack(header, OUTCOMES["reject"], control_id="A1", now=NOW)
    segs = segments(ack)
    assert fields(segs[0])[12] == "V2"
    assert segs[2] == "ERR|MSH^1^12^203&Unsupported version id&HL70357"


def test_version_with_country_component_uses_component_1():
    header = make_header("2.4", version_field="2.4^DEU")
    ack = build_ack(header, OUTCOMES["error"], control_id="A1", now=NOW)
    assert segments(ack)[2].startswith("ERR|PID^1^3^101&")


@pytest.mark.parametrize(
    "now, expected",
    [
        (datetime(2024, 3, 5, 14, 7, 9), "20240305140709"),
        (datetime(2024, 3, 5, 14, 7, 9, 999999), "20240305140709"),
        (datetime(2024, 3, 5, 14, 7, 9, tzinfo=timezone.utc), "20240305140709+0000"),
        (datetime(2024, 3, 5, 14, 7, 9, tzinfo=timezone(timedelta(hours=2, minutes=15))), "20240305140709+0215"),
        (datetime(2024, 3, 5, 14, 7, 9, tzinfo=timezone(timedelta(hours=-5, minutes=-30))), "20240305140709-0530"),
    ],
)
def test_msh_7(now, expected):
    assert format_timestamp(now) == expected
    assert fields(segments(build_ack(make_header(), ACCEPTED, control_id="A1", now=now))[0])[7] == expected


def test_fresh_control_id_is_used_and_escaped():
    ack = build_ack(make_header(), ACCEPTED, control_id="X|1", now=NOW)
    assert fields(segments(ack)[0])[10] == "X\\F\\1"


# --- MSA -------------------------------------------------------------------


def test_msa_2_echoes_a_control_id_with_a_component_separator_verbatim():
    header = make_header("2.6", control_id="MDM^T02")
    ack = build_ack(header, ACCEPTED, control_id="A1", now=NOW)
    assert segments(ack)[1] == "MSA|AA|MDM^T02"
    parsed = hl7.parse(ack)
    assert str(parsed.segment("MSA")[2]) == "MDM^T02"


def test_msa_2_empty_when_control_id_missing():
    header = make_header(control_id="")
    ack = build_ack(header, error(101, "MSH-10", "message control id (MSH-10) is missing"), control_id="A1", now=NOW)
    assert segments(ack)[1] == "MSA|AE||message control id (MSH-10) is missing"


def test_text_is_escaped_so_it_cannot_break_the_structure():
    text = "bad | value ^ here & there ~ again \\ and\rnew segment"
    header = make_header("2.5")
    ack = build_ack(header, error(102, "PID-7", text), control_id="A1", now=NOW)
    segs = segments(ack)
    assert len(segs) == 3
    msa = fields(segs[1])
    assert len(msa) == 4
    assert msa[3] == (
        "bad \\F\\ value \\S\\ here \\T\\ there \\R\\ again \\E\\ and\\X0D\\new segment"
    )
    parsed = hl7.parse(ack)
    assert parsed.unescape(str(parsed.segment("MSA")[3])) == text
    assert parsed.unescape(str(parsed.segment("ERR")[8])) == text


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=80))
def test_any_text_round_trips_through_python_hl7(text):
    ack = build_ack(make_header("2.5"), error(207, "", text), control_id="A1", now=NOW)
    segs = segments(ack)
    assert [s[:3] for s in segs] == ["MSH", "MSA", "ERR"]
    assert "\x0b" not in ack and "\x1c" not in ack
    parsed = hl7.parse(ack)
    assert len(parsed) == 3
    assert parsed.unescape(str(parsed.segment("MSA")[3])) == text


# --- delimiters ------------------------------------------------------------


def test_brace_subcomponent_separator_is_mirrored():
    d = Delimiters(subcomponent="}")
    header = make_header("2.5", delimiters=d, sending_application_field="APP^1.2}x")
    ack = build_ack(header, error(101, "PID-3", "a & b } c"), control_id="A1", now=NOW)
    segs = segments(ack)
    msh = fields(segs[0])
    assert msh[2] == "^~\\}"
    assert msh[5] == "APP^1.2}x"
    assert fields(segs[1])[3] == "a & b \\T\\ c"  # '&' is plain text here
    parsed = hl7.parse(ack)
    assert parsed.unescape(str(parsed.segment("MSA")[3])) == "a & b } c"


def test_underscore_field_separator_is_mirrored():
    d = Delimiters(field="_")
    header = make_header("2.6", delimiters=d, sending_facility_field="HOSP_X")
    ack = build_ack(header, rejected(200, "MSH-9", "message type ORU is not accepted"), control_id="A_1", now=NOW)
    segs = segments(ack)
    assert segs[0].startswith("MSH_^~\\&_")
    msh = fields(segs[0], "_")
    assert msh[10] == "A\\F\\1"
    assert segs[1] == "MSA_AR_MSG00001_message type ORU is not accepted"
    assert segs[2] == "ERR__MSH^1^9_200^Unsupported message type^HL70357_E____message type ORU is not accepted"
    parsed = hl7.parse(ack)
    assert str(parsed.segment("MSA")[1]) == "AR"


def test_truncation_character_is_mirrored_and_escaped():
    d = Delimiters(truncation="#")
    header = make_header("2.7", delimiters=d)
    ack = build_ack(header, error(207, "", "item #3"), control_id="A1", now=NOW)
    segs = segments(ack)
    assert fields(segs[0])[2] == "^~\\&#"
    assert fields(segs[1])[3] == "item \\P\\3"


def test_msh_2_problem_falls_back_to_default_delimiters():
    d = Delimiters(component="^", repetition="^")  # duplicate: unusable
    problem = Problem(101, "MSH-2", "encoding characters (MSH-2) are invalid")
    header = make_header("2.5", delimiters=d, problem=problem, control_id="")
    ack = build_ack(header, Outcome(Verdict.ERROR, problem), control_id="A1", now=NOW)
    segs = segments(ack)
    assert segs[0].startswith("MSH|^~\\&|")
    assert segs[1] == "MSA|AE||encoding characters (MSH-2) are invalid"
    assert fields(segs[2])[2] == "MSH^1^2"


def test_mirrored_field_cannot_break_the_ack_after_a_delimiter_fallback():
    # MSH-1 was '_' but MSH-2 was bad: the ACK uses '|', and a raw field holding '|' is escaped.
    problem = Problem(101, "MSH-2", "encoding characters (MSH-2) are invalid")
    header = make_header(
        "2.5", delimiters=Delimiters(field="_"), problem=problem, sending_facility_field="A|B"
    )
    ack = build_ack(header, Outcome(Verdict.ERROR, problem), control_id="A1", now=NOW)
    msh = fields(segments(ack)[0])
    assert msh[6] == "A\\F\\B"
    assert len(msh) == 13


# --- ERR -------------------------------------------------------------------


@pytest.mark.parametrize(
    "location, pre_25, from_25",
    [
        ("MSH-12", "MSH^1^12", "MSH^1^12"),
        ("PID-3.4", "PID^1^3", "PID^1^3^1^4"),
        ("PID-3.4.2", "PID^1^3", "PID^1^3^1^4^2"),
        ("MSH", "MSH^1^", "MSH^1"),
        ("", "^^", ""),
    ],
)
def test_err_location(location, pre_25, from_25):
    outcome = error(101, location, "x")
    old = segments(build_ack(make_header("2.4"), outcome, control_id="A1", now=NOW))[2]
    assert old == f"ERR|{pre_25}^101&Required field missing&HL70357"
    new = fields(segments(build_ack(make_header("2.5.1"), outcome, control_id="A1", now=NOW))[2])
    assert new[2] == from_25


def test_err_code_without_description():
    ack = build_ack(make_header("2.5"), error(999, "", "odd"), control_id="A1", now=NOW)
    assert fields(segments(ack)[2])[3] == "999^^HL70357"


def test_accept_with_a_problem_is_a_warning():
    outcome = Outcome(Verdict.ACCEPT, Problem(103, "PV1-2", "patient class X unknown"))
    segs = segments(build_ack(make_header("2.5"), outcome, control_id="A1", now=NOW))
    assert segs[1] == "MSA|AA|MSG00001"
    assert fields(segs[2])[4] == "W"


def test_no_err_without_a_problem():
    segs = segments(build_ack(make_header("2.5"), Outcome(Verdict.ERROR), control_id="A1", now=NOW))
    assert segs == [segs[0], "MSA|AE|MSG00001"]


def test_table_0357():
    assert TABLE_0357[203] == "Unsupported version id"
    assert TABLE_0357[101] == "Required field missing"
    assert set(TABLE_0357) >= {0, 100, 101, 102, 103, 200, 201, 202, 203, 207}


# --- helpers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2.1", (2, 1)),
        ("2.3.1", (2, 3, 1)),
        ("2.5.1", (2, 5, 1)),
        ("2.8.2", (2, 8, 2)),
        ("2.5^DEU", (2, 5)),
        ("3.1415926", (3, 1415926)),
        (" 2.4 ", (2, 4)),
        ("2.3junk", (2, 3)),
        ("", ()),
        ("junk", ()),
        ("V2.5", ()),
    ],
)
def test_version_tuple(text, expected):
    assert version_tuple(text) == expected


def test_version_tuple_orders_versions():
    assert version_tuple("2.3") < version_tuple("2.3.1") < version_tuple("2.4") < version_tuple("2.5")
    assert version_tuple("2.10") > version_tuple("2.9")


def test_escape_text_leaves_plain_text_alone():
    assert escape_text("plain text 123") == "plain text 123"
    assert escape_text("\\") == "\\E\\"


# --- the corpus, through read_header and accept --------------------------------

CORPUS = CORPUS_DIR  # tests/corpus: a copy of ../shared/corpus (see its SOURCES.md)
CORPUS_FILES = sorted(CORPUS.rglob("*.hl7")) if CORPUS.is_dir() else []


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_corpus_message_gets_a_well_formed_ack(path):
    header = read_header(path.read_bytes())
    policy = AcceptancePolicy(facilities={header.facility: FacilityRule(header.facility)})
    outcome = accept(header, policy)
    if outcome.verdict is Verdict.IGNORE:
        assert header.is_ack
        return
    ack = build_ack(header, outcome, control_id="ACK-1", now=NOW)
    ack.encode(header.codec)  # the caller's encoding step must not fail
    segs = segments(ack)
    assert [s[:3] for s in segs] == ["MSH", "MSA"] + (["ERR"] if outcome.problem else [])
    parsed = hl7.parse(ack)
    assert str(parsed.segment("MSH")[10]) == "ACK-1"
    assert str(parsed.segment("MSA")[1]) == ack_code(header, outcome)
    assert str(parsed.segment("MSA")[2]) == header.control_id


def test_an_over_long_control_id_is_refused_and_not_echoed_whole():
    raw = (f"MSH|^~\\&|APP|GENHOSP|EX|EX|20240101||ADT^A01|{'Y' * 100_000}|P|2.5\rPID|1||1\r").encode()
    head = read_header(raw)
    outcome = accept(head, AcceptancePolicy({"GENHOSP": FacilityRule("GENHOSP")}))
    ack = build_ack(head, outcome, control_id="A1", now=NOW)
    msa = next(s for s in ack.split("\r") if s.startswith("MSA"))
    assert msa.split("|")[1] == "AE" and msa.split("|")[2] == "Y" * 199
    assert len(ack) < 1000 and "102" in ack
