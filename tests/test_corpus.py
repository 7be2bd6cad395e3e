"""Every message of the corpus (tests/corpus, a copy of ../shared/corpus), its MSH-4 set to a configured
facility, sent to the running exchange over one MLLP connection: exactly
one answer each (none for an inbound ACK), the right MSA-2 and the right
code; and the server keeps serving.

The expected answer of each file is written down below, with the reason
for every one that is not accepted.
"""
from __future__ import annotations

import re

import pytest

from tests.support import ExchangeProcess, MLLPConnection, adt, msa, write_config
from tests.support import CORPUS_DIR

CORPUS = CORPUS_DIR  # tests/corpus: a copy of ../shared/corpus (see its SOURCES.md)

# A = accepted, E = error (AE/CE), R = rejected (AR/CR), N = no answer (an inbound ACK),
# B = a batch: one batch acknowledgement holding one ACK per message.
EXPECTED = {
    "hapi/adt_a03_it.hl7": "A",
    "hapi/escapetest_oru_ft_formatting.hl7": "R",  # ORU not accepted
    "hapi/messages_bar_p01_brace_enc.hl7": "R",  # BAR not accepted
    "hapi/messages_orm_o01_v22.hl7": "R",
    "hapi/messages_oru_r01_v22.hl7": "R",
    "hl7apy/adt_a01_v26.hl7": "A",
    "hl7apy/dup_encoding_chars.hl7": "E",  # MSH-2 "^&&^" repeats a delimiter
    "hl7apy/missing_msh9.hl7": "E",  # MSH-9 empty
    "hl7apy/rsp_k22_v27_truncation_char.hl7": "R",
    "hl7apy/zdt_z01_custom_type.hl7": "R",
    "ipf/adt-a31-1.hl7": "A",
    "ipf/hl7v2message_a01.hl7": "A",
    "ipf/iti-10_a31.hl7": "A",
    "ipf/iti-8_a40_adt_a39.hl7": "A",
    "ipf/iti8-a01-incomplete.hl7": "E",  # record model: no PID segment: nothing to apply it to
    "ipf/iti8-a40-iso-8859-1.hl7": "A",  # no MSH-18, Latin-1 bytes: decoded by the fallback
    "ipf/msg-01-utf8_a01_v22.hl7": "A",
    "ipf/msg-02_mdm_t02_base64.hl7": "A",
    "ipf/msg-03_mdm_t01_deu.hl7": "A",
    "ipf/msg-07_oru_r01.hl7": "R",
    "ipf/msg-08_mdm_t02_zbe.hl7": "A",
    "ipf/msg-09_mdm_t01_zbe.hl7": "A",
    "ipf/pixsource_A04.hl7": "A",
    "ipf/pixsource_A08.hl7": "A",
    "ipf/pixsource_A40.hl7": "A",
    "ipf/tpl_mdm_t01_bad_version.hl7": "R",  # MSH-12 3.1415926
    "ipf/tpl_mdm_t11_no_txa.hl7": "E",  # record model: MDM without TXA: no document number
    "lfh/adt_a34_v23.hl7": "E",  # MSH-10 empty
    "lfh/adt_a40_adt_a39_v26.hl7": "A",
    "lfh/adt_a40_two_mrg_v26.hl7": "A",
    "lfh/mdm_t02_hnam_v26.hl7": "A",
    "lfh/oru_multiline_short.hl7": "R",
    "lfh/sample_win_malformed.hl7": "E",  # MSH-2 "^~\\&" repeats a delimiter
    "medplum/ack_underscore_separator.hl7": "N",
    "medplum/adt_v21_no_trigger.hl7": "E",  # record model: v2.1 "ADT" with no EVN: no trigger event
    "medplum/epic_adt_a04_v25.hl7": "A",
    "medplum/qbp_q11_utf8_registered.hl7": "R",
    "mirth/adt_a01_v23.hl7": "A",
    "mirth/adt_a08_v23_gt1_in1.hl7": "A",
    "mirth/adt_a40_v23.hl7": "A",
    "mirth/fhs_bhs_batch_crlf.hl7": "B",
    "mirth/orm_o01_v24_crlf.hl7": "R",
    "mirth/orm_whitespace_malformed.hl7": "R",
    "mirth/siu_s15_v23.hl7": "R",
    "msfc/ADT-A01-01.hl7": "A",
    "msfc/ADT-A02-01.hl7": "A",
    "msfc/ADT-A03-01.hl7": "A",
    "msfc/ADT-A04-02.hl7": "A",
    "msfc/ADT-A05-01.hl7": "A",
    "msfc/ADT-A06-01.hl7": "A",
    "msfc/ADT-A07-02.hl7": "A",
    "msfc/ADT-A08-01.hl7": "A",
    "msfc/ADT-A11-01.hl7": "A",
    "msfc/ADT-A13-01.hl7": "A",
    "msfc/ADT-A28-01.hl7": "A",
    "msfc/ADT-A31-01.hl7": "A",
    "msfc/ADT-A40-01.hl7": "A",
    "msfc/ADT-A40-02.hl7": "A",
    "msfc/ADT-A47-01.hl7": "E",  # record model: MRG-1 is another authority's (BCBS) id, not an MRN
    "msfc/ADT01-23.hl7": "A",
    "msfc/ADT04-251.hl7": "A",
    "msfc/ADT04-28.hl7": "A",
    "msfc/MDM-T01-01.hl7": "A",
    "msfc/MDM-T02-01.hl7": "A",
    "msfc/MDM-T02-03.hl7": "A",
    "msfc/MDM-T05-01.hl7": "E",  # record model: addendum to a parent (TXA-13) never received
    "msfc/MDM-T06-02.hl7": "E",  # record model: addendum to a parent never received
    "msfc/MDM-T09-01.hl7": "E",  # record model: replaces a parent never received
    "msfc/MDM-T10-01.hl7": "E",  # record model: replaces a parent never received
    "msfc/MDM_01.hl7": "A",
    "msfc/ORM-O01-01.hl7": "R",
    "msfc/ORU-R01-01.hl7": "R",
    "msfc/SIU-S12-01.hl7": "R",
    "msfc/VXU.hl7": "R",
    "nhapi/adt_a01_v21_z01.hl7": "A",
    "nhapi/adt_a04_v27_minimal.hl7": "E",  # record model: PID-3 empty: no patient identifier
    "nhapi/adt_a08_v22_zin.hl7": "A",
    "nhapi/adt_a08_v23_cerner_8859.hl7": "A",
    "nhapi/adt_a08_v23_orbis_de.hl7": "A",
    "nhapi/fuzz_hang1.hl7": "E",  # MSH-2 is a lone "^"
    "nhapi/fuzz_id000123_binary.hl7": "E",  # MSH-2 "^ \\E": a space and a letter
    "nhapi/fuzz_stackoverflow1.hl7": "E",  # MSH-2 is a lone "^"
    "nhapi/mdm_t02_escapes_v231.hl7": "E",  # record model: MSH and OBX only: no TXA
    "nhapi/oru_dollar_subcomp_v231.hl7": "R",
    "nhapi/oru_olis_escapes_v23.hl7": "R",
    "pacsbridge/mdm_t02_radiology_v251.hl7": "A",
    "pacsbridge/mdm_t04_v251.hl7": "A",
    "pacsbridge/mdm_t06_v251.hl7": "A",
    "pacsbridge/mdm_t08_v251.hl7": "A",
    "pacsbridge/mdm_t10_v251.hl7": "A",
    "pyhl7/sample_bad_batch_no_msh.hl7": "E",  # a batch without a message
    "pyhl7/sample_batch1_two_msgs.hl7": "B",
    "pyhl7/sample_file_fhs_bhs.hl7": "B",
    "pyhl7/sample_hl7_oru.hl7": "R",
    "pyhl7/sample_msh_adt_a01.hl7": "A",
    "pyhl7/test_mllp_inbound_ack.hl7": "N",
    "renalware/adt_a05_v24_medway_zu.hl7": "A",
    "renalware/adt_a28_v24_z01.hl7": "A",
    "renalware/adt_a38_v24_medway_cancel.hl7": "A",
}

SEGMENT_END = re.compile(rb"\r\n|\r|\n")


def corpus_files() -> list[str]:
    return sorted(str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*.hl7"))


def with_facility(raw: bytes, facility: bytes = b"GENHOSP") -> bytes:
    """Set MSH-4 of every MSH segment to a configured facility, bytes untouched otherwise."""
    def fix(segment: bytes) -> bytes:
        stripped = segment.lstrip(b"\xef\xbb\xbf")
        if not stripped.startswith(b"MSH") or len(stripped) < 4:
            return segment
        sep = stripped[3:4]
        fields = stripped.split(sep)
        if len(fields) > 3:
            fields[3] = facility
        return segment[: len(segment) - len(stripped)] + sep.join(fields)

    pieces = re.split(rb"(\r\n|\r|\n)", raw)
    return b"".join(fix(p) if i % 2 == 0 else p for i, p in enumerate(pieces))


def unique_control_ids(raw: bytes, seen: set[bytes]) -> bytes:
    """Give each message an MSH-10 no earlier file used (suffix "-2", "-3", ...).

    Several corpus files reuse one control id (msfc's MSG00001); sent from one
    facility they would be resends of each other and get the first one's
    answer, so each file would not be judged on its own. An empty MSH-10
    stays empty.
    """
    def fix(segment: bytes) -> bytes:
        stripped = segment.lstrip(b"\xef\xbb\xbf")
        if not stripped.startswith(b"MSH") or len(stripped) < 4:
            return segment
        sep = stripped[3:4]
        fields = stripped.split(sep)
        if len(fields) <= 9 or not fields[9].strip():
            return segment
        control_id, n = fields[9], 1
        while control_id in seen:
            n += 1
            control_id = fields[9] + b"-%d" % n
        seen.add(control_id)
        fields[9] = control_id
        return segment[: len(segment) - len(stripped)] + sep.join(fields)

    pieces = re.split(rb"(\r\n|\r|\n)", raw)
    return b"".join(fix(p) if i % 2 == 0 else p for i, p in enumerate(pieces))


def headers(raw: bytes) -> list[list[bytes]]:
    """The MSH fields of every message in a file (split by its own MSH-1)."""
    out = []
    for segment in SEGMENT_END.split(raw.lstrip(b"\xef\xbb\xbf")):
        if segment.startswith(b"MSH") and len(segment) > 3:
            out.append([b"MSH"] + segment[4:].split(segment[3:4]))
    return out


def field(fields: list[bytes], n: int) -> bytes:
    """MSH-n (MSH-1 is the separator itself, so MSH-n is fields[n-1])."""
    return fields[n - 1].strip() if len(fields) > n - 1 else b""


def expected_code(letter: str, fields: list[bytes] | None) -> str:
    enhanced = fields is not None and (field(fields, 15) or field(fields, 16))
    return ("C" if enhanced else "A") + {"A": "A", "E": "E", "R": "R"}[letter]


def test_every_corpus_file_has_an_expectation():
    assert corpus_files() == sorted(EXPECTED), "a corpus file was added or removed: write down its answer"


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    # Processing ids T and D are allowed here so each file is judged on the rest.
    config = write_config(tmp, server_extra='processing_id = ["P", "T", "D"]')
    proc = ExchangeProcess(config, f"sqlite:///{tmp / 'corpus.db'}").start()
    yield proc
    proc.stop()


def test_the_corpus_gets_one_right_answer_each_and_the_server_keeps_serving(corpus_server):
    results = {}
    seen: set[bytes] = set()
    with MLLPConnection(corpus_server.address) as conn:
        for name in corpus_files():
            raw = unique_control_ids(with_facility((CORPUS / name).read_bytes()), seen)
            letter = EXPECTED[name]
            msh = headers(raw)
            conn.send(raw)
            if letter == "N":
                assert conn.expect_silence(0.5), f"{name}: an inbound ACK was answered"
                continue
            reply = conn.read_frame()
            fields = msa(reply)
            if letter == "B":
                segments = SEGMENT_END.split(reply)
                msas = [s for s in segments if s.startswith(b"MSA")]
                assert segments[0].startswith((b"BHS", b"FHS")), name
                assert len(msas) == len(msh), f"{name}: one ACK per message in the batch"
                for m, fields_of_msg in zip(msas, msh):
                    sep = m[3:4]
                    assert m.split(sep)[2] == field(fields_of_msg, 10), name
                results[name] = "batch"
                continue
            if msh:
                want_control_id = field(msh[0], 10).decode("latin-1")
            else:  # a batch without messages is answered for the batch: MSA-2 = BHS-11
                bhs = next(s for s in SEGMENT_END.split(raw) if s.startswith(b"BHS"))
                want_control_id = field([b"BHS"] + bhs[4:].split(bhs[3:4]), 11).decode("latin-1")
            want = expected_code(letter, msh[0] if msh else None)
            assert fields[0] == want, f"{name}: {fields[0]} != {want} ({fields[2:3]})"
            assert fields[1] == want_control_id, f"{name}: MSA-2 {fields[1]!r}"
            if letter != "A":
                assert len(fields) > 2 and fields[2], f"{name}: a NAK must say why (MSA-3)"
            assert conn.expect_silence(0.05), f"{name}: more than one answer"
            results[name] = fields[0]
        # still serving, on the same connection
        assert msa(conn.request(adt("CORPUS-AFTER")))[:2] == ["AA", "CORPUS-AFTER"]
    assert len(results) == len([v for v in EXPECTED.values() if v != "N"])
