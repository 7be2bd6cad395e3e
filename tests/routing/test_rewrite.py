"""exchange.routing.rewrite: the copy a destination receives, as a pure function.

Copies are read back with python-hl7 and validated with hl7apy (strict
structure validation) wherever hl7apy knows the message structure.
"""
from __future__ import annotations

import importlib
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange.config import ROUTING_VERSIONS, FacilityConfig, ServerConfig, resolve_charset
from exchange.hl7.ack import version_tuple
from exchange.hl7.charset import canonical_codec, codec_for, decode_message
from exchange.hl7.header import Delimiters, read_header
from exchange.mapping.message import Message, escape, unescape
from exchange.routing.rewrite import CHARSET_NAMES, Copy, rewrite
from exchange.routing.rules import DEFAULT, Destination, Event
from tests.support import CORPUS_DIR

NOW = datetime(2024, 5, 1, 10, 30, 15, tzinfo=timezone(timedelta(hours=2)))
SERVER = ServerConfig(mllp=("tcp:2575",), http="tcp:8080")
OAKNH = FacilityConfig(code="OAKNH", name="Oakwood", kind="nursing_home", authority="OAKNH_AUTH", deliver_to="127.0.0.1:3576")
TO_OAKNH = Destination("OAKNH", "N200", DEFAULT)


def message(text: str) -> tuple[Message, Event]:
    """A decoded message as the writer holds it, and its routing event."""
    raw = text.replace("\n", "\r").encode("utf-8")
    header = read_header(raw)
    msg = Message(raw.decode("utf-8"), header.delimiters, header.codec)
    return msg, Event.read(header, msg, person="P1", source_mrn="H100", protected=False)


def copy_of(text: str, destination=TO_OAKNH, facility=OAKNH, server=SERVER, control_id="EX1", **event) -> Copy:
    msg, ev = message(text)
    return rewrite(
        msg, event=replace(ev, **event), destination=destination, facility=facility,
        server=server, control_id=control_id, now=NOW,
    )


def segments(copy: Copy) -> list[str]:
    assert copy.text.endswith("\r") and "\n" not in copy.text
    return copy.text[:-1].split("\r")


def validate(text: str) -> bool:
    """hl7apy: strict parse and structure validation."""
    return parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()


A01 = """\
MSH|^~\\&|HIS|GENHOSP|EXCHANGE|EXCHANGE|20240101120000||ADT^A01^ADT_A01|C1|P|2.5|42||AL|NE||UNICODE UTF-8
EVN|A01|20240101120000
PID|1|EXT7|H100^^^GENHOSP^MR~123-45-6789^^^SSA^SS|ALT1|O\\S\\BRIEN^MAIRE \\T\\ ANNE||19400101|F|||1 Main St^^Town^ST^12345|||||||ACC9
PD1||||||||||||N
ZPI|1|hospital secret
PV1|1|I|W1^101^A|||||||||||||||V123
ZPV|2|more"""


# -- the scenario: a nursing-home resident admitted at the hospital ----------------------


def test_a01_copy_for_the_nursing_home():
    copy = copy_of(A01)
    assert copy.facility == "OAKNH" and copy.control_id == "EX1" and copy.codec == "utf-8"
    assert segments(copy) == [
        "MSH|^~\\&|EXCHANGE|EXCHANGE||OAKNH|20240501103015+0200||ADT^A01^ADT_A01|EX1|P|2.5||||||UNICODE UTF-8",
        "EVN|A01|20240101120000",
        "PID|1||N200^^^OAKNH_AUTH^MR~P1^^^EXCHANGE^PI||O\\S\\BRIEN^MAIRE \\T\\ ANNE||19400101|F|||1 Main St^^Town^ST^12345",
        "PD1||||||||||||N",
        "PV1|1|I|W1^101^A|||||||||||||||V123",
    ]
    parsed = hl7.parse(copy.text)
    assert str(parsed.segment("PID")[3]) == "N200^^^OAKNH_AUTH^MR~P1^^^EXCHANGE^PI"
    assert str(parsed.segment("PID")[5]) == "O\\S\\BRIEN^MAIRE \\T\\ ANNE"  # escapes kept
    assert parsed.extract_field("PID", field_num=5, component_num=1) == "O^BRIEN"
    assert validate(copy.text)


def test_header_fields():
    server = ServerConfig(mllp=("tcp:2575",), http="tcp:8080", application="EXAPP", facility_name="EXFAC", person_authority="EMPI")
    facility = replace(OAKNH, application="NH_ADT")
    copy = copy_of(A01, facility=facility, server=server, control_id="OUT-77")
    msh = hl7.parse(copy.text).segment("MSH")
    assert [str(msh[n]) for n in (3, 4, 5, 6, 7, 9, 10, 11, 12)] == [
        "EXAPP", "EXFAC", "NH_ADT", "OAKNH", "20240501103015+0200", "ADT^A01^ADT_A01", "OUT-77", "P", "2.5",
    ]
    assert "P1^^^EMPI^PI" in segments(copy)[2]
    # original acknowledgement mode, no sequence number of the sender's link
    assert [str(msh[n]) for n in (13, 15, 16)] == ["", "", ""]


def test_naive_now_has_no_offset():
    msg, ev = message(A01)
    copy = rewrite(msg, event=ev, destination=TO_OAKNH, facility=OAKNH, server=SERVER, control_id="X", now=datetime(2024, 5, 1, 10, 30))
    assert segments(copy)[0].split("|")[6] == "20240501103000"


def test_identifiers_are_escaped_with_the_message_delimiters():
    copy = copy_of(A01, destination=Destination("OAKNH", "N&2^0|0", DEFAULT), person="P~1")
    pid3 = segments(copy)[2].split("|")[3]
    assert pid3 == "N\\T\\2\\S\\0\\F\\0^^^OAKNH_AUTH^MR~P\\R\\1^^^EXCHANGE^PI"
    parsed = hl7.parse(copy.text)
    assert unescape(parsed.extract_field("PID", field_num=3, repeat_num=1, component_num=1)) == "N&2^0|0"


def test_keep_source_identifiers():
    copy = copy_of(A01, facility=replace(OAKNH, keep_source_identifiers=True))
    pid = segments(copy)[2].split("|")
    assert pid[3] == "N200^^^OAKNH_AUTH^MR~P1^^^EXCHANGE^PI~H100^^^GENHOSP^MR~123-45-6789^^^SSA^SS"
    assert pid[2] == "EXT7" and pid[4] == "ALT1" and pid[18] == "ACC9"


def test_source_identifiers_of_our_own_authorities_are_never_duplicated():
    text = A01.replace("H100^^^GENHOSP^MR", "H100^^^GENHOSP^MR~OLD9^^^OAKNH_AUTH^MR~P0^^^EXCHANGE^PI")
    copy = copy_of(text, facility=replace(OAKNH, keep_source_identifiers=True))
    reps = segments(copy)[2].split("|")[3].split("~")
    assert reps == ["N200^^^OAKNH_AUTH^MR", "P1^^^EXCHANGE^PI", "H100^^^GENHOSP^MR", "123-45-6789^^^SSA^SS"]


CLINIC = FacilityConfig(code="CLINIC", name="Clinic", kind="clinic", authority="CLINICAUTH", deliver_to="x:1",
                        keep_source_identifiers=True)
TO_CLINIC = Destination("CLINIC", "CL100", DEFAULT)
# The sender quotes identifiers in the clinic's authority and the exchange's (the audit's PID):
# PID-2, a PID-3 repetition and PID-4 in CLINICAUTH (one by its universal id, CX.4.2), a person
# id of ours in PID-3, an account (PID-18) in CLINICAUTH.
QUOTING = A01.replace(
    "PID|1|EXT7|H100^^^GENHOSP^MR~123-45-6789^^^SSA^SS|ALT1|",
    "PID|1|CL998^^^CLINICAUTH|H100^^^GENHOSP^MR~CL999^^^CLINICAUTH^MR~P0^^^EXCHANGE^PI"
    "|CL997^^^&CLINICAUTH&ISO~ALT1^^^GENHOSP|",
).replace("|||||||ACC9", "|||||||ACC8^^^CLINICAUTH~ACC9")


def test_kept_identifiers_never_include_one_of_our_authorities():
    """PID-2, PID-4 and PID-18 follow PID-3's rule: an identifier in the destination's
    authority or the person authority is the exchange's to give; the sender's is dropped."""
    pid = segments(copy_of(QUOTING, destination=TO_CLINIC, facility=CLINIC))[2].split("|")
    assert pid[2] == ""
    assert pid[3] == "CL100^^^CLINICAUTH^MR~P1^^^EXCHANGE^PI~H100^^^GENHOSP^MR"
    assert pid[4] == "ALT1^^^GENHOSP" and pid[18] == "ACC9"
    # without keep_source_identifiers: none of the sender's, ours alone
    pid = segments(copy_of(QUOTING, destination=TO_CLINIC, facility=replace(CLINIC, keep_source_identifiers=False)))[2]
    assert pid.split("|")[:5] == ["PID", "1", "", "CL100^^^CLINICAUTH^MR~P1^^^EXCHANGE^PI", ""]
    assert "CLINICAUTH~" not in pid and "ACC9" not in pid


def test_our_authorities_are_recognised_in_any_case():
    """Found by a verification audit: clinicauth and exchange in lower case passed through."""
    lower = QUOTING.replace("CLINICAUTH", "clinicauth").replace("P0^^^EXCHANGE^PI", "P0^^^exchange^PI")
    pid = segments(copy_of(lower, destination=TO_CLINIC, facility=CLINIC))[2].split("|")
    assert pid[2] == "" and pid[18] == "ACC9"
    assert pid[3] == "CL100^^^CLINICAUTH^MR~P1^^^EXCHANGE^PI~H100^^^GENHOSP^MR"


def test_our_authorities_are_recognised_escaped():
    text = QUOTING.replace("|", "_").replace("^ADT_A01", "")  # "_" as MSH-1: OAKNH_AUTH is written OAKNH\F\AUTH
    text = text.replace("CL998^^^CLINICAUTH", "N9^^^OAKNH\\F\\AUTH")
    pid = segments(copy_of(text, facility=replace(OAKNH, keep_source_identifiers=True)))[2].split("_")
    assert pid[2] == ""
    assert pid[3].startswith("N200^^^OAKNH\\F\\AUTH^MR~P1^^^EXCHANGE^PI~H100^^^GENHOSP^MR~")


def test_without_a_record_or_a_person_only_the_senders_own_identifiers_stay():
    """PID-3 keeps the sender's identifiers (it is required), but not those of our
    authorities; PID-2/4/18 go unless the destination keeps the sender's identifiers."""
    nobody = Destination("CLINIC", None, "a rule")
    pid = segments(copy_of(QUOTING, destination=nobody, facility=replace(CLINIC, keep_source_identifiers=False), person=None))[2]
    assert pid.split("|")[:5] == ["PID", "1", "", "H100^^^GENHOSP^MR", ""] and "ACC" not in pid
    pid = segments(copy_of(QUOTING, destination=nobody, facility=CLINIC, person=None))[2].split("|")
    assert pid[:5] == ["PID", "1", "", "H100^^^GENHOSP^MR", "ALT1^^^GENHOSP"] and pid[18] == "ACC9"
    only_ours = A01.replace("H100^^^GENHOSP^MR~123-45-6789^^^SSA^SS", "CL999^^^CLINICAUTH^MR")
    pid = segments(copy_of(only_ours, destination=nobody, facility=CLINIC, person=None))[2].split("|")
    assert pid[3] == "CL999^^^CLINICAUTH^MR"  # nothing else to put in a required field


def test_the_audited_copy():
    """The audit's case, the whole copy: a sender declaring UNICODE UTF-8 quotes the
    clinic's identifiers; the clinic reads 2.3 in Latin-1 and keeps source identifiers."""
    text = QUOTING.replace("O\\S\\BRIEN^MAIRE", "MÜLLER^ANNE")
    clinic = replace(CLINIC, charset="iso8859-1", version="2.3")
    copy = copy_of(text, destination=TO_CLINIC, facility=clinic)
    assert copy.codec == "iso8859-1"
    assert copy.encode() == "\r".join([
        "MSH|^~\\&|EXCHANGE|EXCHANGE||CLINIC|20240501103015+0200||ADT^A01|EX1|P|2.3||||||8859/1",
        "EVN|A01|20240101120000",
        "PID|1||CL100^^^CLINICAUTH^MR~P1^^^EXCHANGE^PI~H100^^^GENHOSP^MR|ALT1^^^GENHOSP|MÜLLER^ANNE \\T\\ ANNE"
        "||19400101|F|||1 Main St^^Town^ST^12345|||||||ACC9",
        "PD1||||||||||||N",
        "PV1|1|I|W1^101^A|||||||||||||||V123",
        "",
    ]).encode("latin-1")


def test_keep_z_segments():
    copy = copy_of(A01, facility=replace(OAKNH, keep_z_segments=True))
    assert [s[:3] for s in segments(copy)] == ["MSH", "EVN", "PID", "PD1", "ZPI", "PV1", "ZPV"]


def test_a_line_that_is_no_segment_is_not_passed_on():
    """Found by a black-box audit: stray text between two messages in a sender's file reached a
    destination as a "segment" of the first one's copy."""
    stray = A01.replace("PD1|", "garbage between messages\nPD1|").replace("\n", "\r")
    copy = copy_of(stray, facility=replace(OAKNH, keep_z_segments=True))
    assert [s[:3] for s in segments(copy)] == ["MSH", "EVN", "PID", "PD1", "ZPI", "PV1", "ZPV"]
    assert b"garbage" not in copy.encode()


def test_without_a_record_only_the_person_id():
    copy = copy_of(A01, destination=Destination("OAKNH", None, "a rule"))
    assert segments(copy)[2].split("|")[3] == "P1^^^EXCHANGE^PI"


def test_without_a_record_or_a_person_the_senders_identifiers_stay():
    copy = copy_of(A01, destination=Destination("OAKNH", None, "a rule"), person=None)
    assert segments(copy)[2].split("|")[3] == "H100^^^GENHOSP^MR~123-45-6789^^^SSA^SS"


def test_sender_delimiters_are_kept():
    # "_" as MSH-1 (the corpus has it): MSH-9.3 "ADT_A01" could not be written unescaped
    text = A01.replace("^ADT_A01", "").replace("|", "_").replace("^~\\&", "^~\\}").replace("O\\S\\BRIEN", "O\\F\\BRIEN")
    copy = copy_of(text)
    assert segments(copy)[0].startswith("MSH_^~\\}_EXCHANGE_EXCHANGE__OAKNH_")
    # our values are escaped with the sender's delimiters: OAKNH_AUTH holds its field separator
    assert segments(copy)[2] == "PID_1__N200^^^OAKNH\\F\\AUTH^MR~P1^^^EXCHANGE^PI__O\\F\\BRIEN^MAIRE \\T\\ ANNE__19400101_F___1 Main St^^Town^ST^12345"
    parsed = hl7.parse(copy.text)
    assert str(parsed.segment("MSH")[10]) == "EX1"
    assert validate(copy.text)


def test_lf_and_crlf_input_become_cr():
    for eol in ("\n", "\r\n"):
        msg_text = A01.replace("\n", eol)
        header = read_header(msg_text.encode())
        msg = Message(msg_text, header.delimiters)
        copy = rewrite(msg, event=Event("GENHOSP", "ADT", "A01", "P1", "H100"), destination=TO_OAKNH,
                       facility=OAKNH, server=SERVER, control_id="EX1", now=NOW)
        assert copy.text == copy_of(A01).text


# -- documents -------------------------------------------------------------------------

T02 = """\
MSH|^~\\&|DOCS|GENHOSP|||20240102090000||MDM^T02^MDM_T02|D1|P|2.5
EVN|T02|20240102090000
PID|1||H100^^^GENHOSP^MR||DOE^JANE||19400101|F
PV1|1|I|W1^101^A|||||||||||||||V123
TXA|1|DS|TX|||||||||DOC-9|||||AU||AV
OBX|1|TX|DS^Discharge summary||Discharged home.\\.br\\Follow-up with home health \\E\\ GP.||||||F
OBX|2|TX|DS^Discharge summary||Diet: 50\\X25\\ less salt||||||F
ZDS|local"""


def test_discharge_summary_for_home_health():
    hhcare = FacilityConfig(code="HHCARE", name="Home", kind="home_health", authority="HHCARE", deliver_to="x:1")
    copy = copy_of(T02, destination=Destination("HHCARE", "C300", DEFAULT), facility=hhcare, control_id="EX2")
    lines = segments(copy)
    assert [s[:3] for s in lines] == ["MSH", "EVN", "PID", "PV1", "TXA", "OBX", "OBX"]
    assert lines[2] == "PID|1||C300^^^HHCARE^MR~P1^^^EXCHANGE^PI||DOE^JANE||19400101|F"
    assert lines[4:] == T02.split("\n")[4:7]  # document key and text untouched, escapes included
    assert validate(copy.text) is True


def test_a_latin1_destination_gets_utf8_when_its_charset_cannot_carry_the_text():
    latin = replace(OAKNH, charset="iso8859-1")
    assert copy_of(A01.replace("|UNICODE UTF-8", "")).codec == "utf-8"  # OAKNH's default charset
    plain = copy_of(A01.replace("|UNICODE UTF-8", ""), facility=latin)
    assert plain.codec == "iso8859-1" and segments(plain)[0].endswith("|8859/1")
    accented = copy_of(A01.replace("|UNICODE UTF-8", "").replace("MAIRE", "MÁIRE"), facility=latin)
    assert accented.codec == "iso8859-1" and accented.encode().decode("latin-1").count("MÁIRE") == 1
    polish = copy_of(A01.replace("|UNICODE UTF-8", "").replace("MAIRE", "ŁUCJA"), facility=latin)
    assert polish.codec == "utf-8"
    assert segments(polish)[0].endswith("|UNICODE UTF-8")
    assert read_header(polish.encode()).codec == "utf-8"


@pytest.mark.parametrize("declared", ["", "8859/1", "UNICODE UTF-8", "ASCII", "8859/1~ISO IR87"])
def test_the_senders_msh18_never_reaches_a_copy(declared):
    """Whatever the sender declared, a copy is in the destination's charset and
    says so; only MSH-18 and the bytes differ from the copy of the same text
    sent without MSH-18."""
    text = A01.replace("MAIRE", "MÜLLER \\X41\\")
    latin, utf8 = replace(OAKNH, charset="iso8859-1", version="2.3"), OAKNH
    for facility, codec, msh18 in ((latin, "iso8859-1", "8859/1"), (utf8, "utf-8", "UNICODE UTF-8")):
        copy = copy_of(text.replace("UNICODE UTF-8", declared), facility=facility)
        assert copy.codec == codec and segments(copy)[0].split("|")[17] == msh18
        assert copy.text == copy_of(text.replace("|UNICODE UTF-8", ""), facility=facility).text
        assert "|O\\S\\BRIEN^MÜLLER \\X41\\ \\T\\ ANNE|" in segments(copy)[2]  # the sender's escapes, as sent
        header = read_header(copy.encode())
        assert header.codec == codec and decode_message(copy.encode(), header)[0] == copy.text
    assert b"|O\\S\\BRIEN^M\xdcLLER" in copy_of(text.replace("UNICODE UTF-8", declared), facility=latin).encode()
    assert "|O\\S\\BRIEN^MÜLLER".encode() in copy_of(text.replace("UNICODE UTF-8", declared), facility=utf8).encode()


def test_a_declared_charset_that_does_not_fit_falls_back_to_utf8():
    text = A01.replace("UNICODE UTF-8", "8859/2").replace("MAIRE", "ŁUCJA")  # fits 8859/2, not 8859/1
    copy = copy_of(text, facility=replace(OAKNH, charset="iso8859-1"))
    assert copy.codec == "utf-8" and segments(copy)[0].endswith("|UNICODE UTF-8")
    copy = copy_of(text, facility=replace(OAKNH, charset="iso8859-2"))
    assert copy.codec == "iso8859-2" and segments(copy)[0].endswith("|8859/2")
    assert "ŁUCJA".encode("iso8859-2") in copy.encode()


@pytest.mark.parametrize("version", ROUTING_VERSIONS)
def test_msh18_names_the_charset_in_every_version(version):
    """MSH-18 holds table 0211's code for the copy's charset. From 2.5 every code we
    write is in the version's table (hl7apy's copy of it; it has no 2.3 tables, whose
    0211 is 2.3.1's); before 2.5 only UTF-8 and Latin-9 have none, and are named
    the 2.5 way (README, Configuration: charset)."""
    table = None if version == "2.3" else importlib.import_module(f"hl7apy.v{version.replace('.', '_')}.tables")
    codes = set((table or importlib.import_module("hl7apy.v2_3_1.tables")).TABLES["HL70211"][1])
    for charset in ("8859/1", "8859/15", "UNICODE UTF-8", "ASCII"):
        copy = copy_of(A01, facility=replace(OAKNH, charset=resolve_charset(charset), version=version))
        msh18 = segments(copy)[0].split("|")[17]
        assert msh18 == charset
        assert msh18 in codes or (version_tuple(version) < (2, 5) and msh18 in ("UNICODE UTF-8", "8859/15"))
    assert set(CHARSET_NAMES) == {canonical_codec(codec_for(name)) for name in CHARSET_NAMES.values()}


def test_without_a_table_0211_code_or_an_msh18_the_copy_is_in_the_sites_default():
    copy = copy_of(A01.replace("MAIRE", "MÁIRE"), facility=replace(OAKNH, charset="cp1252"))
    assert copy.codec == "cp1252" and len(segments(copy)[0].split("|")) == 12  # MSH-13.. trimmed away
    v22 = A01.replace("|2.5|", "|2.2|").replace("^ADT_A01", "")
    for facility, codec in ((replace(OAKNH, charset="iso8859-1"), "iso8859-1"), (OAKNH, "utf-8")):
        copy = copy_of(v22, facility=facility)  # 2.2 has no MSH-18
        assert copy.codec == codec and len(segments(copy)[0].split("|")) == 12
    copy = copy_of(v22.replace("MAIRE", "ŁUCJA"), facility=replace(OAKNH, charset="iso8859-1"))
    assert copy.codec == "utf-8" and segments(copy)[0].endswith("|UNICODE UTF-8")  # the one way to say it


# -- merges and several patients --------------------------------------------------------

A40 = """\
MSH|^~\\&|HIS|GENHOSP|||20240103||ADT^A40^ADT_A39|M1|P|2.5
EVN|A40|20240103
PID|1||H100^^^GENHOSP^MR||DOE^JANE
MRG|H999^^^GENHOSP^MR|ALT9|ACC9
PID|2||H500^^^GENHOSP^MR||ROE^RICHARD
MRG|H501^^^GENHOSP^MR"""


def test_merge_rewrites_mrg1_and_keeps_only_the_routed_pair():
    copy = copy_of(A40, destination=Destination("OAKNH", "N200", DEFAULT, prior_mrn="N201"))
    assert segments(copy)[1:] == [
        "EVN|A40|20240103",
        "PID|1||N200^^^OAKNH_AUTH^MR~P1^^^EXCHANGE^PI||DOE^JANE",
        "MRG|N201^^^OAKNH_AUTH^MR",
    ]
    assert validate(copy.text)
    second = copy_of(A40, destination=Destination("OAKNH", "N500", DEFAULT, prior_mrn="N501"), source_mrn="H500")
    assert segments(second)[2:] == [
        "PID|2||N500^^^OAKNH_AUTH^MR~P1^^^EXCHANGE^PI||ROE^RICHARD",
        "MRG|N501^^^OAKNH_AUTH^MR",
    ]


def test_merge_keeping_source_identifiers():
    facility = replace(OAKNH, keep_source_identifiers=True)
    copy = copy_of(A40, destination=Destination("OAKNH", "N200", DEFAULT, prior_mrn="N201"), facility=facility)
    assert segments(copy)[3] == "MRG|N201^^^OAKNH_AUTH^MR~H999^^^GENHOSP^MR|ALT9|ACC9"
    # MRG-1..4 follow PID's rule: nothing of the destination's or the person authority from the sender
    quoting = A40.replace("MRG|H999^^^GENHOSP^MR|ALT9|ACC9",
                          "MRG|H999^^^GENHOSP^MR~N9^^^OAKNH_AUTH^MR~P0^^^EXCHANGE^PI|ALT9~N8^^^OAKNH_AUTH|ACC9|P0^^^EXCHANGE")
    copy = copy_of(quoting, destination=Destination("OAKNH", "N200", DEFAULT, prior_mrn="N201"), facility=facility)
    assert segments(copy)[3] == "MRG|N201^^^OAKNH_AUTH^MR~H999^^^GENHOSP^MR|ALT9|ACC9"
    copy = copy_of(quoting, destination=Destination("OAKNH", "N200", DEFAULT, prior_mrn="N201"))
    assert segments(copy)[3] == "MRG|N201^^^OAKNH_AUTH^MR"


def test_merge_without_the_destinations_prior_mrn_is_a_bug():
    with pytest.raises(ValueError, match="merge copy"):
        copy_of(A40)


def test_not_an_hl7_message_is_a_bug():
    msg = Message("EVN|A01\rPID|1\r")
    with pytest.raises(ValueError, match="MSH"):
        rewrite(msg, event=Event("GENHOSP", "ADT", "A01"), destination=TO_OAKNH, facility=OAKNH,
                server=SERVER, control_id="X", now=NOW)


# -- older versions ---------------------------------------------------------------------

A01_28 = "\n".join([
    "MSH|^~\\&#|HIS|GENHOSP|||20240101120000||ADT^A01^ADT_A01|C1|P|2.8|||AL|NE||UNICODE UTF-8|||||ORG^X|ORG^Y",
    "EVN||20240101120000|||||GENHOSP",
    # PID-3 with CX.7 (2.5+), PID-5 with a name type, PID-40 (2.7+)
    "PID|1||H100^^^GENHOSP^MR^^20200101||DOE^JANE^^^^^L||19400101|F|||1 Main St^^Town^ST^12345^^H||^PRN^PH^^^555^1234567"
    + "|" * 17 + "Y" + "|" * 10 + "^PRN^PH^^^555^7654321",
    "PD1" + "|" * 12 + "N" + "|" * 10 + "20240101",  # PD1-12 protection, PD1-22 (2.6+)
    "ROL|1|AD|AT|1234^DOC^A",
    "PV1|1|I|W1^101^A|||||||||||||||V123" + "|" * 35 + "54",  # PV1-54 (2.7+)
    "PV2|||^Reason",
    "DB1|1|PT",
    "NK1|1|DOE \\P\\ SONS^JOHN|SPO",
])


@pytest.mark.parametrize("version", ROUTING_VERSIONS)
def test_version_rewrite_gives_a_valid_message(version):
    copy = copy_of(A01_28, facility=replace(OAKNH, version=version))
    assert validate(copy.text), version
    msh = hl7.parse(copy.text).segment("MSH")
    assert str(msh[12]) == version
    assert str(msh[9]) == ("ADT^A01" if version == "2.3" else "ADT^A01^ADT_A01")
    if version < "2.7":
        assert str(msh[2]) == "^~\\&" and "\\P\\" not in copy.text and "#" in copy.text
    pid3 = hl7.parse(copy.text).segment("PID")[3]
    assert str(pid3) == "N200^^^OAKNH_AUTH^MR~P1^^^EXCHANGE^PI"


def test_version_23_drops_what_it_does_not_have():
    copy = copy_of(A01_28, facility=replace(OAKNH, version="2.3"))
    names = [s[:3] for s in segments(copy)]
    assert "ROL" not in names  # 2.3's ADT_A01 has ROL only in the procedure group
    assert "NK1|1|DOE # SONS^JOHN|SPO" in segments(copy)  # no truncation character before 2.7
    assert names[:3] == ["MSH", "EVN", "PID"]
    evn = segments(copy)[1].split("|")
    assert len(evn) <= 6  # EVN-7 (event facility) is 2.4+
    assert validate(copy.text)


def test_a_component_withdrawn_in_a_newer_version_moves_where_the_standard_keeps_it():
    """Found by an audit of the copies: a 2.3 sender's phones travel in XTN.1, withdrawn in 2.7;
    the 2.8 copy emptied them (an A08 could blank the receiving site's numbers). XTN.1 goes to
    XTN.12, XON.3 to XON.10, a degree (XCN.7, XPN.6) to the professional suffix."""
    text = "\n".join([
        "MSH|^~\\&|OAKSYS|GENHOSP|EXCH|EXCH|20261129091000||ADT^A08|U1a|P|2.3",
        "EVN|A08|20261129091000",
        "PID|1||H100^^^GENHOSP^MR||SMITHERS^WAYLON^J^^^MD||19520314|M|||12 ELM ST^^SPRINGFIELD^IL^62701^USA^H"
        "||(217)555-0142~(217)555-7777^ORN^CP|(217)555-9999^WPN^PH",
        "PD1|||GOOD CLINIC^^12345",
        "NK1|1|SMITHERS^MAUDE|SPO|12 ELM ST^^SPRINGFIELD^IL^62701|(217)555-0001",
        "PV1|1|I|N1^101^A||||9999^NURSE^NANCY^^^^RN||||||||||||NV555",
    ])
    copy = segments(copy_of(text, facility=replace(OAKNH, version="2.8")))
    pid = next(s for s in copy if s.startswith("PID")).split("|")
    assert pid[13] == "^^^^^^^^^^^(217)555-0142~^ORN^CP^^^^^^^^^(217)555-7777"
    assert pid[14] == "^WPN^PH^^^^^^^^^(217)555-9999"
    assert pid[5] == "SMITHERS^WAYLON^J^^^^^^^^^^^MD"
    assert next(s for s in copy if s.startswith("PD1")).split("|")[3] == "GOOD CLINIC^^^^^^^^^12345"
    assert next(s for s in copy if s.startswith("NK1")).split("|")[5] == "^^^^^^^^^^^(217)555-0001"
    assert next(s for s in copy if s.startswith("PV1")).split("|")[7] == "9999^NURSE^NANCY" + "^" * 18 + "RN"
    # a version that still has them keeps them where they were
    same = segments(copy_of(text, facility=replace(OAKNH, version="2.5")))
    assert next(s for s in same if s.startswith("PID")).split("|")[13].startswith("(217)555-0142~")


def test_a_segment_of_a_group_goes_to_an_older_version_only_inside_that_group():
    """Found by an audit of the copies: 2.3's ADT_A01 has ROL only in the procedure group (after a
    PR1); the primary care provider's ROL after PD1 went to a 2.3 site, which a strict engine
    rejects (or files as a procedure's participant). The surgeon's ROL after the PR1 stays."""
    text = "\n".join([
        "MSH|^~\\&|ENGINE|GENHOSP|EXCH|EXCH|20261129130000||ADT^A01^ADT_A01|V4|P|2.5",
        "EVN|A01|20261129130000",
        "PID|1||H100^^^GENHOSP^MR||SMITHERS^WAYLON^J||19520314|M",
        "PD1|||GOOD CLINIC^^12345",
        "ROL|1|AD|PP^Primary care^HL70443|777^JONES^AMY",
        "PV1|1|I|W7^703^A||||1234^WELBY^MARCUS||||||||||||V703",
        "PR1|1|I10P|0JH60DZ^Pacemaker^I10P|Pacemaker insertion|20261129|P",
        "ROL|2|AD|SURG^Surgeon^HL70443|888^CUTTER^SAM",
    ])
    assert validate(text.replace("\n", "\r"))
    copy = copy_of(text, facility=replace(OAKNH, version="2.3"))
    assert [s[:5] for s in segments(copy)] == ["MSH|^", "EVN|A", "PID|1", "PD1||", "PV1|1", "PR1|1", "ROL|2"]
    assert validate(copy.text)
    kept = copy_of(text, facility=replace(OAKNH, version="2.5"))  # 2.5 has ROL after PD1: kept
    assert [s[:5] for s in segments(kept)].count("ROL|1") == 1 and validate(kept.text)


@pytest.mark.parametrize("version, birth, admitted", [
    ("2.8", "1980", "2024010112-0500"),  # DTM: TS.1 cut to the degree TS.2 gave
    ("2.6", "1980", "2024010112-0500"),
    ("2.5", "19800101^Y", "202401011230-0500^H"),  # TS still has TS.2: as sent
])
def test_a_degree_of_precision_survives_the_version(version, birth, admitted):
    """Found by a time audit: a v2.3 PID-7 "19800101^Y" (born in 1980) went to a v2.8 site as
    "19800101", a full and wrong birth date (DTM has no degree of precision)."""
    text = (A01.replace("|2.5|", "|2.3|").replace("|19400101|", "|19800101^Y|")
            .replace("ADT^A01^ADT_A01", "ADT^A01"))
    assert "^Y|" in text
    pv1 = next(s for s in text.split("\n") if s.startswith("PV1"))
    fields = pv1.split("|") + [""] * 46
    fields[44] = "202401011230-0500^H"
    text = text.replace(pv1, "|".join(fields[:46]))
    copy = copy_of(text, facility=replace(OAKNH, version=version))
    pid = next(s for s in segments(copy) if s.startswith("PID")).split("|")
    assert pid[7] == birth
    assert next(s for s in segments(copy) if s.startswith("PV1")).split("|")[44] == admitted
    assert validate(copy.text)

def test_same_version_is_left_alone():
    original = copy_of(A01_28)
    assert copy_of(A01_28, facility=replace(OAKNH, version="2.8")).text == original.text


def test_version_fills_in_the_structure_of_a_two_component_msh9():
    text = A01.replace("ADT^A01^ADT_A01", "ADT^A04").replace("|2.5|", "|2.3|")
    copy = copy_of(text, facility=replace(OAKNH, version="2.5"))
    assert "|ADT^A04^ADT_A01|" in segments(copy)[0]
    assert validate(copy.text)
    a28 = copy_of(A01.replace("ADT^A01^ADT_A01", "ADT^A28"), facility=replace(OAKNH, version="2.3.1"))
    assert "|ADT^A28^ADT_A01|" in segments(a28)[0]  # 2.3.1 has no ADT_A05
    assert validate(a28.text)


def test_the_doctor_and_leave_cancels_take_their_events_structure():
    """A53, A55 and A62 share the structure of the event they cancel (ADT_A52, ADT_A54, ADT_A61)."""
    for event, structure in (("A52", "ADT_A52"), ("A53", "ADT_A52"), ("A54", "ADT_A54"), ("A55", "ADT_A54"),
                             ("A61", "ADT_A61"), ("A62", "ADT_A61"), ("A60", "ADT_A60")):
        text = A01.replace("ADT^A01^ADT_A01", f"ADT^{event}").replace("|2.5|", "|2.4|")
        copy = copy_of(text, facility=replace(OAKNH, version="2.5"))
        assert f"|ADT^{event}^{structure}|" in segments(copy)[0], event


# -- properties ----------------------------------------------------------------------------

DELIMITERS = [
    Delimiters(),
    Delimiters(escape="\\", subcomponent="}"),
    Delimiters(escape="\\", subcomponent="$"),
    Delimiters(field="_"),
]
VERSIONS = ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"]
# (type, event, structure, what follows PID)
SHAPES = [
    ("ADT", "A01", "ADT_A01", ["PD1", "PV1"]),
    ("ADT", "A04", "ADT_A01", ["PV1"]),
    ("ADT", "A08", "ADT_A01", ["PD1", "NK1", "PV1"]),
    ("ADT", "A02", "ADT_A02", ["PV1"]),
    ("ADT", "A03", "ADT_A03", ["PV1"]),
    ("MDM", "T01", "MDM_T01", ["PV1", "TXA"]),
    ("MDM", "T02", "MDM_T02", ["PV1", "TXA", "OBX"]),
]
text_values = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")) | st.sampled_from("|^~\\&}$_\n"),
    max_size=12,
)
codes = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=1, max_size=8)


@st.composite
def hl7_messages(draw, hl7apy_knows: bool = False) -> tuple[str, Delimiters, str]:
    """A well-formed ADT or MDM message: its text, its delimiters and its sender MRN.

    With ``hl7apy_knows``, one that hl7apy can validate: MSH-9.3 readable
    (no "_" as MSH-1, which the structure name would have to escape).
    """
    d = draw(st.sampled_from([x for x in DELIMITERS if x.field != "_"] if hl7apy_knows else DELIMITERS))
    version = draw(st.sampled_from(VERSIONS))
    shapes = SHAPES
    if hl7apy_knows and version == "2.3":  # no MSH-9.3 in 2.3: hl7apy guesses TYPE_EVENT
        shapes = [shape for shape in SHAPES if shape[2] == f"{shape[0]}_{shape[1]}"]
    kind, event, structure, body = draw(st.sampled_from(shapes))
    withdrawn = version >= "2.7"  # EVN-1 and PID-2 are withdrawn in 2.7
    f, c, r = d.field, d.component, d.repetition

    def e(value: str) -> str:
        return escape(value, d)

    msh9 = f"{kind}{c}{event}" if version == "2.3" else f"{kind}{c}{event}{c}{e(structure)}"
    mrn = draw(codes)
    others = draw(st.lists(st.tuples(codes, st.sampled_from(["SSA", "GENHOSP", "OTHER"]), st.sampled_from(["SS", "MR", "PI"])), max_size=2))
    pid3 = r.join([f"{e(mrn)}{c}{c}{c}GENHOSP{c}MR"] + [f"{e(i)}{c}{c}{c}{a}{c}t" .replace("t", t) for i, a, t in others])
    name = f"{e(draw(text_values)) or 'X'}{c}{e(draw(text_values))}"
    lines = [
        f"MSH{f}{c}{r}{d.escape}{d.subcomponent}{f}HIS{f}GENHOSP{f}{f}{f}20240101120000{f}{f}{msh9}{f}{e(draw(codes))}{f}P{f}{version}",
        f"EVN{f}{'' if withdrawn else event}{f}20240101120000",
        f"PID{f}1{f}{'' if withdrawn else e(draw(codes))}{f}{pid3}{f}{f}{name}{f}{f}19400101{f}F",
    ]
    zs = draw(st.lists(st.sampled_from(["ZPI", "ZXX", "ZZ1"]), max_size=3))
    for segment in body:
        if segment == "PD1":
            lines.append(f"PD1" + f * 12 + draw(st.sampled_from(["Y", "N", ""])))
        elif segment == "NK1":
            lines.append(f"NK1{f}1{f}{e(draw(text_values))}")
        elif segment == "PV1":
            lines.append(f"PV1{f}1{f}{draw(st.sampled_from('IEO'))}{f}W1{c}{e(draw(text_values))}")
        elif segment == "TXA":
            lines.append(f"TXA{f}1{f}{draw(st.sampled_from(['DS', 'HP']))}{f}TX" + f * 9 + e(draw(codes)) + f * 5 + "AU" + f * 2 + "AV")
        elif segment == "OBX":
            for i in range(draw(st.integers(1, 3))):
                lines.append(f"OBX{f}{i + 1}{f}TX{f}DS{f}{i + 1}{f}{e(draw(text_values))}" + f * 6 + "F")
        if zs and draw(st.booleans()):
            lines.append(f"{zs.pop()}{f}{e(draw(text_values))}")
    lines += [f"{z}{f}1" for z in zs]
    return "\r".join(lines) + "\r", d, mrn


def z_free(names: list[str]) -> list[str]:
    return [n for n in names if not n.startswith("Z")]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(original=hl7_messages(), mrn=codes, person=codes, control_id=codes, keep_z=st.booleans())
def test_copy_properties(original, mrn, person, control_id, keep_z):
    text, d, source_mrn = original
    header = read_header(text.encode())
    assert header.problem is None
    msg = Message(text, header.delimiters)
    ev = Event.read(header, msg, person=person, source_mrn=source_mrn, protected=False)
    facility = replace(OAKNH, keep_z_segments=keep_z)
    copy = rewrite(msg, event=ev, destination=Destination("OAKNH", mrn, DEFAULT), facility=facility,
                   server=SERVER, control_id=control_id, now=NOW)
    out = Message(copy.text, d)
    assert copy.text.endswith("\r") and "\n" not in copy.text
    # MSH-10 is the given id; the receiver is the destination
    copy_header = read_header(copy.encode())
    assert copy_header.control_id == control_id and copy_header.delimiters == header.delimiters
    assert out.first("MSH").value(6) == "OAKNH"
    # PID-3: exactly the destination's MRN and the person id
    pid = out.first("PID")
    reps = [pid.components(3, i + 1) for i in range(len(pid.repetitions(3)))]
    assert [(pid.text(x[0]), pid.text(x[3]), x[4]) for x in reps] == [(mrn, "OAKNH_AUTH", "MR"), (person, "EXCHANGE", "PI")]
    assert pid.field(2) == "" and pid.field(4) == ""
    # Z-segments only when asked; every other segment kept, in order
    names, original_names = out.names(), msg.names()
    assert z_free(names) == z_free(original_names)
    assert names == (original_names if keep_z else z_free(original_names))
    # segments other than MSH and PID are unchanged, escapes and all
    kept = [s for s in msg.all() if s.name not in ("MSH", "PID") and (keep_z or not s.name.startswith("Z"))]
    assert [s.fields for s in out.all() if s.name not in ("MSH", "PID")] == [s.fields for s in kept]
    # python-hl7 reads it back
    parsed = hl7.parse(copy.text)
    assert len(parsed) == len(names)
    assert unescape(str(parsed.segment("PID")[3][0][0]), d) == mrn


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(original=hl7_messages(hl7apy_knows=True), version=st.sampled_from([None, *ROUTING_VERSIONS]))
def test_copies_validate_with_hl7apy(original, version):
    text, d, source_mrn = original
    assert validate(text)  # the generator makes messages hl7apy accepts
    header = read_header(text.encode())
    msg = Message(text, header.delimiters)
    ev = Event.read(header, msg, person="P1", source_mrn=source_mrn, protected=False)
    copy = rewrite(msg, event=ev, destination=TO_OAKNH, facility=replace(OAKNH, version=version),
                   server=SERVER, control_id="EX9", now=NOW)
    copy_header = read_header(copy.encode())
    assert copy_header.version == (version or header.version)
    if copy_header.version == "2.3" and copy_header.event not in ("A01", "A02", "A03", "T01", "T02"):
        return  # 2.3 has no MSH-9.3: hl7apy looks for a structure named ADT_A04 and knows none
    assert validate(copy.text)


# -- the shared corpus -----------------------------------------------------------------

CORPUS = CORPUS_DIR  # tests/corpus: a copy of ../shared/corpus (see its SOURCES.md)


def corpus_messages() -> list[Path]:
    found = []
    for path in sorted(CORPUS.rglob("*")):
        if path.is_file() and path.suffix != ".md":
            header = read_header(path.read_bytes())
            if header.problem is None and header.segment_start == "MSH" and header.message_type in ("ADT", "MDM"):
                found.append(path)
    return found


def hl7apy_verdict(text: str) -> bool:
    try:
        return validate(text)
    except Exception:  # hl7apy raises for what it does not know or finds invalid
        return False


def test_corpus_copies():
    """Every ADT/MDM message of the corpus: its copy reads back with python-hl7
    and the header reader; where hl7apy validates the original, it validates
    the copy, also rewritten to 2.3 and 2.5 (unless 2.3 leaves hl7apy without
    a structure name: no MSH-9.3 there)."""
    paths = corpus_messages()
    assert len(paths) > 50
    validated = 0
    for path in paths:
        raw = path.read_bytes()
        header = read_header(raw)
        text, codec = decode_message(raw, header)
        msg = Message(text, header.delimiters, codec)
        ev = Event.read(header, msg, person="P1", source_mrn=None, protected=False)
        dest = Destination("OAKNH", "N1", DEFAULT, prior_mrn="N0")
        original_valid = hl7apy_verdict(text)
        for version in (None, "2.3", "2.5"):
            copy = rewrite(msg, event=ev, destination=dest, facility=replace(OAKNH, version=version),
                           server=SERVER, control_id="X1", now=NOW)
            parsed = hl7.parse(copy.text)
            assert str(parsed.segment("MSH")[10]) == "X1", path
            assert read_header(copy.encode()).problem is None, path
            two_three_unknown = version == "2.3" and f"{ev.message_type}_{ev.event}" not in ("ADT_A01", "ADT_A02", "ADT_A03", "MDM_T01", "MDM_T02")
            if original_valid and not two_three_unknown:
                assert hl7apy_verdict(copy.text), (path.name, version)
                validated += 1
    assert validated >= 10


# -- route, then rewrite: the scenarios on the shipped demo network ----------------


def test_demo_network_scenarios_end_to_end():
    from exchange.config import load_config
    from exchange.routing import route

    config = load_config(Path(__file__).resolve().parents[2] / "config" / "exchange.toml", environ={})
    records = {"GENHOSP": "H100", "OAKNH": "N200", "HHCARE": "C300"}
    sent = {}
    for text in (A01, T02):
        msg, ev = message(text)
        for i, dest in enumerate(route(ev, config.facilities, records, config.routes).destinations):
            copy = rewrite(msg, event=ev, destination=dest, facility=config.facility(dest.facility),
                           server=config.server, control_id=f"42-{i + 1}", now=NOW)
            sent.setdefault(dest.facility, []).append(hl7.parse(copy.text))
    assert sorted(sent) == ["HHCARE", "OAKNH"]
    oaknh_types = [str(m.segment("MSH")[9]) for m in sent["OAKNH"]]
    assert oaknh_types == ["ADT^A01^ADT_A01", "MDM^T02^MDM_T02"]
    assert all(str(m.segment("PID")[3]) == "N200^^^OAKNH^MR~P1^^^EXCHANGE^PI" for m in sent["OAKNH"])
    (summary,) = sent["HHCARE"]
    assert str(summary.segment("MSH")[9]) == "MDM^T02^MDM_T02"
    assert str(summary.segment("PID")[3]) == "C300^^^HHCARE^MR~P1^^^EXCHANGE^PI"
    assert str(summary.segment("TXA")[12]) == "DOC-9"
    # the opted-out person: nobody
    msg, ev = message(A01.replace("PD1||||||||||||N", "PD1||||||||||||Y"))
    ev = replace(ev, protected=True)
    assert route(ev, config.facilities, records, config.routes).destinations == ()
