"""read_header: the MSH fast path, on synthetic messages and the shared corpus."""
from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.hl7.header import DEFAULT_DELIMITERS, Delimiters, Header, read_header
from exchange.outcome import Problem
from tests.support import CORPUS_DIR

CORPUS = CORPUS_DIR  # tests/corpus: a copy of ../shared/corpus (see its SOURCES.md)
CORPUS_FILES = sorted(CORPUS.glob("*/*.hl7"))

ADT = (
    b"MSH|^~\\&|SENDAPP^1.2.3^ISO|FAC^2.16.840^ISO|RECAPP|RECFAC|20240101120000+0100|SEC|"
    b"ADT^A01^ADT_A01| CTRL-1 |P^T|2.5.1^DEU^x|||AL|NE|DEU|UNICODE UTF-8~8859/1\r"
    b"EVN|A08|20240101120000\r"
    b"PID|1||123^^^FAC^MR||DOE^JANE\r"
)


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def msh(*fields: str, sep: str = "|", enc: str = "^~\\&", rest: str = "") -> bytes:
    """MSH with MSH-3 onwards given as ``fields``."""
    return ("MSH" + sep + enc + sep + sep.join(fields) + "\r" + rest).encode()


# --- fields ----------------------------------------------------------------------


def test_every_field():
    h = read_header(ADT)
    assert h.problem is None
    assert h.delimiters == DEFAULT_DELIMITERS
    assert h.segment_start == "MSH"
    assert h.sending_application_field == "SENDAPP^1.2.3^ISO"
    assert h.sending_facility_field == "FAC^2.16.840^ISO"
    assert h.facility == "FAC"
    assert h.receiving_application_field == "RECAPP"
    assert h.receiving_facility_field == "RECFAC"
    assert h.timestamp == "20240101120000+0100"
    assert (h.message_type, h.event, h.structure) == ("ADT", "A01", "ADT_A01")
    assert h.control_id == "CTRL-1"  # surrounding spaces stripped
    assert (h.processing_id, h.processing_id_field) == ("P", "P^T")
    assert (h.version, h.version_field) == ("2.5.1", "2.5.1^DEU^x")
    assert (h.accept_ack_type, h.application_ack_type) == ("AL", "NE")
    assert h.enhanced_mode
    assert h.charset_field == "UNICODE UTF-8"  # first repetition only
    assert h.codec == "utf-8" and not h.charset_fallback
    assert not h.is_ack


def test_short_msh_gives_empty_fields():
    h = read_header(b"MSH|^~\\&|A|B|C|D|20240101||ACK|1|P|2.3")
    assert h.problem is None
    assert (h.message_type, h.event, h.control_id, h.version) == ("ACK", "", "1", "2.3")
    assert h.is_ack and not h.enhanced_mode
    assert h.accept_ack_type == h.charset_field == ""


def test_msh15_single_space_is_empty():
    h = read_header(corpus("msfc/ADT01-23.hl7"))
    assert h.accept_ack_type == ""
    assert not h.enhanced_mode


def test_msh7_first_component():
    h = read_header(msh("A", "F", "", "", "20240101^S", "", "ADT^A01", "1", "P", "2.3"))
    assert h.timestamp == "20240101"


def test_msh9_components_stripped():
    h = read_header(msh("A", "F", "", "", "", "", " ADT ^ A04 ^ ADT_A01 ", "1", "P", "2.5"))
    assert (h.message_type, h.event, h.structure) == ("ADT", "A04", "ADT_A01")


def test_control_id_may_contain_component_separator():
    h = read_header(corpus("lfh/mdm_t02_hnam_v26.hl7"))
    assert h.control_id == "MDM^T02"
    assert (h.message_type, h.event) == ("MDM", "T02")


def test_unknown_version_is_not_a_problem_here():
    h = read_header(corpus("ipf/tpl_mdm_t01_bad_version.hl7"))
    assert h.version == "3.1415926"
    assert h.problem is None


def test_msa_glued_to_msh12_is_read_as_is():
    h = read_header(corpus("pyhl7/test_mllp_inbound_ack.hl7"))
    assert h.is_ack
    assert h.version == "2.3\\rMSA"


# --- framing of the payload -------------------------------------------------------


@pytest.mark.parametrize("lead", [b"\xef\xbb\xbf", b"\r\n", b"  \r", b"\xef\xbb\xbf\n \r\n", b"\r\n\xef\xbb\xbf"])
def test_bom_and_leading_whitespace_skipped(lead):
    h = read_header(lead + ADT)
    assert h.problem is None
    assert h.control_id == "CTRL-1"


def test_bom_corpus_file():
    h = read_header(corpus("msfc/VXU.hl7"))
    assert h.problem is None
    assert (h.message_type, h.event, h.accept_ack_type, h.application_ack_type) == ("VXU", "V04", "ER", "AL")


@pytest.mark.parametrize("eol", [b"\r", b"\n", b"\r\n"])
def test_segment_endings(eol):
    payload = ADT.replace(b"\r", eol)
    h = read_header(payload)
    assert h == read_header(ADT)
    assert h.charset_field == "UNICODE UTF-8"  # MSH-18 did not swallow the line ending


def test_msh_without_segment_terminator():
    h = read_header(b"MSH|^~\\&|A|F|||20240101||ADT^A01|77|P|2.4")
    assert (h.control_id, h.version) == ("77", "2.4")


def test_long_msh_beyond_scan_window():
    long_app = "A" * 10_000
    h = read_header(msh(long_app, "F", "", "", "", "", "ADT^A01", "1", "P", "2.5", rest="PID|1\n"))
    assert h.sending_application_field == long_app
    assert h.version == "2.5"


# --- delimiters -------------------------------------------------------------------


def test_underscore_field_separator():
    h = read_header(corpus("medplum/ack_underscore_separator.hl7"))
    assert h.problem is None
    assert h.delimiters.field == "_"
    assert (h.message_type, h.control_id, h.version) == ("ACK", "9B38584D", "2.6.1")
    assert h.sending_application_field == "Main"


@pytest.mark.parametrize(
    ("name", "enc"),
    [("hapi/messages_bar_p01_brace_enc.hl7", "^~\\}"), ("nhapi/oru_dollar_subcomp_v231.hl7", "^~\\$")],
)
def test_unusual_subcomponent_separator(name, enc):
    h = read_header(corpus(name))
    assert h.problem is None
    assert h.delimiters.encoding_characters == enc
    assert h.delimiters.subcomponent == enc[3]


def test_truncation_character_v27():
    h = read_header(corpus("hl7apy/rsp_k22_v27_truncation_char.hl7"))
    assert h.problem is None
    assert h.delimiters == Delimiters("|", "^", "~", "\\", "&", "#")
    assert h.delimiters.encoding_characters == "^~\\&#"
    assert (h.message_type, h.event, h.version) == ("RSP", "K22", "2.7")


def test_custom_delimiters_used_for_components():
    h = read_header(msh("A", "FAC#X", "", "", "", "", "ADT#A01", "1", "P#T", "2.5", sep="!", enc="#*%@"))
    assert h.delimiters == Delimiters("!", "#", "*", "%", "@")
    assert (h.message_type, h.event, h.processing_id, h.facility) == ("ADT", "A01", "P", "FAC")


MSH2_INVALID = Problem(102, "MSH-2", "MSH-2 encoding characters are invalid")


@pytest.mark.parametrize(
    "enc", ["", "^", "^~", "^~\\", "^&&^", "^~\\&#!", "^~a&", "^~1&", "^~ &", "^~\t&", "^~\\\\&", "^~\\\xe9"]
)
def test_invalid_msh2_still_reads_fields(enc):
    payload = ("MSH|" + enc + "|APP|FAC|R|RF|2024||ADT^A01|CTRL9|P|2.5\r").encode("latin-1")
    h = read_header(payload)
    assert h.problem == MSH2_INVALID
    assert h.delimiters.field == "|"
    assert h.delimiters.encoding_characters == "^~\\&"  # defaults for the NAK
    assert (h.control_id, h.message_type, h.event, h.version) == ("CTRL9", "ADT", "A01", "2.5")
    assert (h.sending_application_field, h.sending_facility_field) == ("APP", "FAC")


def test_invalid_msh2_with_separator_clashing_with_defaults():
    h = read_header(b"MSH^~\\^A^B^^^2024^^ADT^C1^P^2.5\r")
    assert h.problem == MSH2_INVALID
    assert h.delimiters == DEFAULT_DELIMITERS
    assert (h.message_type, h.control_id) == ("ADT", "C1")


@pytest.mark.parametrize(
    "name",
    [
        "hl7apy/dup_encoding_chars.hl7",
        "nhapi/fuzz_hang1.hl7",
        "nhapi/fuzz_stackoverflow1.hl7",
        "nhapi/fuzz_id000123_binary.hl7",
        "lfh/sample_win_malformed.hl7",
    ],
)
def test_invalid_msh2_corpus(name):
    assert read_header(corpus(name)).problem == MSH2_INVALID


def test_dup_encoding_chars_keeps_control_id_for_the_nak():
    h = read_header(corpus("hl7apy/dup_encoding_chars.hl7"))
    assert (h.control_id, h.message_type, h.event, h.version) == ("0123456789", "ADT", "A01", "2.6")


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"MSH", Problem(101, "MSH-1", "MSH-1 field separator is required")),
        (b"MSH\r", Problem(101, "MSH-1", "MSH-1 field separator is required")),
        (b"MSHA^~\\&A", Problem(102, "MSH-1", "MSH-1 field separator is invalid")),
        (b"MSH ^~\\& ", Problem(102, "MSH-1", "MSH-1 field separator is invalid")),
        (b"MSH\xa6^~\\&\xa6", Problem(102, "MSH-1", "MSH-1 field separator is invalid")),
    ],
)
def test_invalid_msh1(payload, problem):
    h = read_header(payload)
    assert h.problem == problem
    assert h.control_id == ""


@pytest.mark.parametrize("payload", [b"", b"   \r\n", b"\xef\xbb\xbf", b"PID|1||2", b"msh|^~\\&|x", b"\x00MSH|^~\\&|"])
def test_no_msh(payload):
    h = read_header(payload)
    assert h.problem == Problem(100, "MSH", "message does not start with an MSH segment")
    assert h == Header(problem=h.problem)


# --- batches ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "start", "control_id"),
    [
        ("mirth/fhs_bhs_batch_crlf.hl7", "FHS", "12345678"),
        ("pyhl7/sample_file_fhs_bhs.hl7", "FHS", "12334456778890"),
        ("pyhl7/sample_batch1_two_msgs.hl7", "BHS", "12334456778890"),
    ],
)
def test_batch_reports_first_msh(name, start, control_id):
    h = read_header(corpus(name))
    assert h.segment_start == start
    assert h.control_id == control_id
    assert h.problem is None


def test_batch_with_crlf_and_lf():
    payload = b"FHS|^~\\&|A\r\nBHS|^~\\&|A\r\nMSH|^~\\$|S|F|||2024||ADT^A04|X1|P|2.5\r\nEVN|A04\r\nBTS|1\r\nFTS|1"
    h = read_header(payload)
    assert (h.segment_start, h.control_id, h.delimiters.subcomponent) == ("FHS", "X1", "$")
    assert h == read_header(payload.replace(b"\r\n", b"\n"))


def test_batch_without_msh():
    h = read_header(corpus("pyhl7/sample_bad_batch_no_msh.hl7"))
    assert h.segment_start == "BHS"
    assert h.problem is None  # an empty batch is the batch module's business
    assert h.control_id == ""


def test_batch_without_msh_reports_its_own_delimiters():
    h = read_header(b"BHS|^~\\$|APP\rBTS|0\r")
    assert (h.segment_start, h.delimiters.subcomponent) == ("BHS", "$")
    assert read_header(b"BHS").delimiters == DEFAULT_DELIMITERS
    assert read_header(b"FHS|bad|x").delimiters == DEFAULT_DELIMITERS


# --- required fields and precedence -------------------------------------------------


def test_missing_msh9():
    h = read_header(corpus("hl7apy/missing_msh9.hl7"))
    assert h.problem == Problem(101, "MSH-9", "MSH-9 message type is required")
    assert h.control_id == "0123456789"


def test_missing_msh10():
    h = read_header(corpus("lfh/adt_a34_v23.hl7"))
    assert h.problem == Problem(101, "MSH-10", "MSH-10 message control id is required")
    assert h.event == "A34"  # MSH-9.2 wins over EVN-1 (A40 there)


def test_missing_msh12():
    h = read_header(msh("A", "F", "", "", "", "", "ADT^A01", "1", "P", "^DEU"))
    assert h.problem == Problem(101, "MSH-12", "MSH-12 version id is required")


@pytest.mark.parametrize(
    ("fields", "enc", "location"),
    [
        (("A", "F", "", "", "", "", "", "", "P", ""), "^~\\", "MSH-2"),
        (("A", "F", "", "", "", "", "", "", "P", ""), "^~\\&", "MSH-9"),
        (("A", "F", "", "", "", "", "ADT^A01", "", "P", ""), "^~\\&", "MSH-10"),
        (("A", "F", "", "", "", "", "ADT^A01", "", "P", "", "", "", "", "", "", "BOGUS"), "^~\\&", "MSH-18"),
        (("A", "F", "", "", "", "", "ADT^A01", "1", "P", ""), "^~\\&", "MSH-12"),
    ],
)
def test_problem_precedence(fields, enc, location):
    assert read_header(msh(*fields, enc=enc)).problem.location == location


# --- event from EVN-1 (v2.1/2.2) ----------------------------------------------------


@pytest.mark.parametrize("eol", ["\r", "\n", "\r\n"])
def test_event_from_evn1_when_msh9_2_empty(eol):
    payload = f"MSH|^~\\&|A|F|||198808181126||ADT|MSG1|P|2.1{eol}EVN|A04^x|198808181126{eol}PID|1".encode()
    h = read_header(payload)
    assert (h.message_type, h.event) == ("ADT", "A04")


def test_event_from_evn_not_directly_after_msh():
    payload = b"MSH|^~\\&|A|F|||1988||ADT|MSG1|P|2.1\rZSTEVN|1\rNTE|STEVEN|EVN\rEVN|A08|1988\r"
    assert read_header(payload).event == "A08"


def test_no_evn_leaves_event_empty():
    h = read_header(corpus("medplum/adt_v21_no_trigger.hl7"))
    assert (h.message_type, h.event, h.version) == ("ADT", "", "2.1")
    assert h.problem is None
    assert read_header(b"MSH|^~\\&|A|F|||1||ADT|1|P|2.1\rEVN").event == ""
    assert read_header(b"MSH|^~\\&|A|F|||1||ADT|1|P|2.1\rEVN|").event == ""


def test_v21_corpus_event_in_msh9():
    h = read_header(corpus("nhapi/adt_a01_v21_z01.hl7"))
    assert (h.message_type, h.event, h.version) == ("ADT", "A01", "2.1")


def test_msh9_2_wins_over_evn1():
    h = read_header(corpus("msfc/MDM-T02-01.hl7"))  # EVN-1 says T10
    assert h.event == "T02"


# --- character sets -----------------------------------------------------------------


def test_undeclared_iso_8859_1_falls_back():
    h = read_header(corpus("ipf/iti8-a40-iso-8859-1.hl7"))
    assert h.problem is None
    assert h.charset_fallback
    assert h.codec == "cp1252"
    assert h.receiving_application_field == "BLÄH"


def test_fallback_to_latin1_when_cp1252_fails():
    h = read_header(b"MSH|^~\\&|APP\x81\xc4|F|||2024||ADT^A01|1|P|2.5\r")  # 0x81: not in cp1252
    assert h.charset_fallback
    assert h.codec == "latin-1"
    assert h.sending_application_field == "APP\x81Ä"


def test_undeclared_utf8():
    h = read_header(msh("Gerät", "Köln", "", "", "", "", "ADT^A01", "1", "P", "2.5"))
    assert (h.codec, h.charset_fallback, h.problem) == ("utf-8", False, None)
    assert h.facility == "Köln"


def test_declared_8859_1():
    h = read_header(corpus("nhapi/adt_a08_v23_cerner_8859.hl7"))
    assert (h.charset_field, h.codec, h.problem) == ("8859/1", "iso8859-1", None)
    payload = "MSH|^~\\&|BLÄH|F|||2024||ADT^A01|1|P|2.5||||||8859/1\r".encode("latin-1")
    h = read_header(payload)
    assert (h.codec, h.sending_application_field, h.charset_fallback) == ("iso8859-1", "BLÄH", False)


def test_declared_utf8_corpus():
    h = read_header(corpus("medplum/qbp_q11_utf8_registered.hl7"))
    assert (h.charset_field, h.codec, h.problem) == ("UNICODE UTF-8", "utf-8", None)
    assert h.sending_application_field == "cobas® pro"


def test_declared_utf8_but_invalid():
    payload = "MSH|^~\\&|BLÄH|F|||2024||ADT^A01|C1|P|2.5||||||UNICODE UTF-8\r".encode("latin-1")
    h = read_header(payload)
    assert h.problem == Problem(102, "MSH-18", "message is not valid UNICODE UTF-8")
    assert not h.charset_fallback
    assert h.control_id == "C1"  # still readable for the NAK


def test_declared_ascii_but_8bit():
    payload = "MSH|^~\\&|BLÄH|F|||2024||ADT^A01|C1|P|2.5||||||ASCII\r".encode("latin-1")
    assert read_header(payload).problem == Problem(102, "MSH-18", "message is not valid ASCII")
    assert read_header(payload.replace("Ä".encode("latin-1"), b"A")).problem is None


def test_unsupported_charset():
    h = read_header(msh("A", "F", "", "", "", "", "ADT^A01", "C1", "P", "2.5", "", "", "", "", "", "EBCDIC~ASCII"))
    assert h.problem == Problem(103, "MSH-18", "unsupported character set EBCDIC")
    assert h.charset_field == "EBCDIC"
    assert h.control_id == "C1"


def test_declared_utf16_with_single_byte_msh():
    h = read_header(msh("A", "F", "", "", "", "", "ADT^A01", "C1", "P", "2.5", "", "", "", "", "", "UNICODE UTF-16"))
    assert h.problem == Problem(102, "MSH-18", "message is not valid UNICODE UTF-16")
    assert h.control_id == "C1"


def test_declared_charset_case_and_spaces():
    h = read_header(msh("A", "F", "", "", "", "", "ADT^A01", "C1", "P", "2.5", "", "", "", "", "", " unicode  utf-8 "))
    assert (h.codec, h.problem) == ("utf-8", None)


def test_declared_multibyte_charset_decodes_before_splitting():
    # Big5 "許" is 0xB3 0x5C: its second byte is a backslash.
    app = "許功蓋"
    payload = ("MSH|^~\\&|" + app + "|F|||2024||ADT^A01|C1|P|2.5||||||BIG-5\r").encode("big5")
    h = read_header(payload)
    assert (h.codec, h.sending_application_field, h.control_id, h.problem) == ("big5", app, "C1", None)


def test_default_charset_name():
    payload = "MSH|^~\\&|BLÄH|F|||2024||ADT^A01|C1|P|2.5\r".encode("latin-1")
    h = read_header(payload, default_charset="iso8859-1")
    assert (h.codec, h.charset_fallback, h.sending_application_field) == ("iso8859-1", False, "BLÄH")


def test_default_charset_per_facility():
    seen: list[str] = []

    def by_facility(facility: str) -> str:
        seen.append(facility)
        return "iso8859-1" if facility == "Köln" else "utf-8"

    payload = "MSH|^~\\&|BLÄH|Köln^1.2^ISO|||2024||ADT^A01|C1|P|2.5\r"
    h = read_header(payload.encode("utf-8"), default_charset=by_facility)
    assert h.codec == "iso8859-1"  # the configured default is used, even if odd
    h = read_header(payload.encode("latin-1"), default_charset=by_facility)
    assert (h.codec, h.sending_application_field) == ("iso8859-1", "BLÄH")
    assert seen == ["Köln", "Köln"]
    h = read_header(payload.replace("Köln", "Bonn").encode("latin-1"), default_charset=by_facility)
    assert (h.codec, h.charset_fallback) == ("cp1252", True)


def test_default_charset_not_called_when_declared():
    def boom(facility: str) -> str:
        raise AssertionError("called")

    assert read_header(ADT, default_charset=boom).codec == "utf-8"


def test_non_fallback_default_that_fails_is_a_problem():
    payload = b"MSH|^~\\&|A\x81|F|||2024||ADT^A01|C1|P|2.5\r"
    h = read_header(payload, default_charset="cp1252")
    assert h.problem is not None and (h.problem.code, h.problem.location) == (102, "MSH-18")
    assert h.control_id == "C1"


def test_default_charset_utf16_is_a_problem():
    h = read_header(ADT.replace(b"|DEU|UNICODE UTF-8~8859/1", b""), default_charset="utf-16")
    assert h.problem is not None and h.problem.location == "MSH-18"


def test_bad_default_codec_is_a_configuration_bug():
    with pytest.raises(LookupError):
        read_header(b"MSH|^~\\&|A|F|||2024||ADT^A01|C1|P|2.5\r", default_charset="no-such-codec")


# --- never raises -----------------------------------------------------------------


def test_corpus_present():
    assert len(CORPUS_FILES) >= 90


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_never_raises_on_corpus(path):
    data = path.read_bytes()
    variants = [data, data.replace(b"\r", b"\n"), data.replace(b"\r", b"\r\n")]
    variants += [data[:cut] for cut in range(0, min(len(data), 300))]
    for payload in variants:
        h = read_header(payload)
        assert isinstance(h, Header)
        assert h.problem is None or isinstance(h.problem, Problem)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_never_raises_on_garbage(data):
    read_header(data)
    read_header(b"MSH" + data)
    read_header(b"MSH|^~\\&|" + data)
    read_header(b"BHS|^~\\&|\rMSH" + data)


@settings(max_examples=300)
@given(st.text(alphabet="MSHEVN|^~\\&#_\r\n 0123AB\xc4\x81", max_size=80), st.sampled_from(["utf-8", "ascii", "cp1252"]))
def test_never_raises_on_msh_shaped_text(text, default):
    read_header(text.encode("utf-8"), default_charset=default)
    read_header(text.encode("latin-1", "replace"), default_charset=default)


# --- round trip -------------------------------------------------------------------

_PUNCT = "|^~\\&#!$%*@_+=:;?/"
_values = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)


@st.composite
def delimiter_sets(draw):
    chars = draw(st.lists(st.sampled_from(_PUNCT), min_size=6, max_size=6, unique=True))
    five = draw(st.booleans())
    return chars[0], "".join(chars[1:6] if five else chars[1:5])


@settings(max_examples=300)
@given(delimiter_sets(), st.lists(_values, min_size=14, max_size=14), st.sampled_from(["\r", "\n", "\r\n", ""]))
def test_round_trip(delims, values, eol):
    sep, enc = delims
    banned = set(sep + enc)
    v = ["".join(c for c in value if c not in banned) for value in values]
    app, fac, rapp, rfac, ts, mtype, event, struct, ctrl, pid, ver, ack1, ack2, country = v
    msh9 = enc[0].join([mtype, event, struct])
    fields = [app, fac, rapp, rfac, ts, "", msh9, ctrl, pid, ver, "", "", ack1, ack2, country, "UNICODE UTF-8"]
    rest = eol + "PID" + sep + "1" if eol else ""
    payload = ("MSH" + sep + enc + sep + sep.join(fields) + rest).encode("utf-8")
    h = read_header(payload)
    assert h.delimiters.field == sep
    assert h.delimiters.encoding_characters == enc
    assert (h.sending_application_field, h.sending_facility_field) == (app, fac)
    assert (h.receiving_application_field, h.receiving_facility_field) == (rapp, rfac)
    assert h.timestamp == ts.strip()
    assert (h.message_type, h.structure) == (mtype.strip(), struct.strip())
    if event.strip():
        assert h.event == event.strip()
    assert h.control_id == ctrl.strip()
    assert (h.processing_id, h.processing_id_field) == (pid.strip(), pid)
    assert (h.version, h.version_field) == (ver.strip(), ver)
    assert (h.accept_ack_type, h.application_ack_type) == (ack1.strip(), ack2.strip())
    assert (h.charset_field, h.codec) == ("UNICODE UTF-8", "utf-8")
    expected = None
    if not mtype.strip():
        expected = "MSH-9"
    elif not ctrl.strip():
        expected = "MSH-10"
    elif not ver.strip():
        expected = "MSH-12"
    assert (h.problem.location if h.problem else None) == expected
