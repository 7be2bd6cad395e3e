"""Batches in one frame: split_batch on the corpus batches, and the batch acknowledgement."""
from __future__ import annotations

from datetime import datetime

import hl7
import pytest

from exchange.hl7.ack import build_ack
from exchange.hl7.batch import (
    Batch,
    build_batch_ack,
    build_empty_batch_nak,
    is_batch,
    split_batch,
)
from exchange.hl7.header import DEFAULT_DELIMITERS, Delimiters, read_header
from exchange.outcome import ACCEPTED, rejected
from tests.support import CORPUS_DIR

CORPUS = CORPUS_DIR  # tests/corpus: a copy of ../shared/corpus (see its SOURCES.md)
NOW = datetime(2024, 3, 5, 14, 7, 9)



def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def segs(text: str) -> list[str]:
    assert text.endswith("\r") and "\n" not in text
    return text[:-1].split("\r")


def fields(segment: str) -> list[str]:
    """HL7 numbering for MSH/BHS/FHS: fields(s)[n] is XXX-n."""
    sep = segment[3]
    return [segment[:3], sep] + segment[4:].split(sep)


def acks_for(batch: Batch) -> list[str]:
    out = []
    for i, message in enumerate(batch.messages):
        header = read_header(message)
        out.append(build_ack(header, ACCEPTED, control_id=f"ACK{i}", now=NOW))
    return out


# --- is_batch ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "pyhl7/sample_batch1_two_msgs.hl7",
        "pyhl7/sample_file_fhs_bhs.hl7",
        "pyhl7/sample_bad_batch_no_msh.hl7",
        "mirth/fhs_bhs_batch_crlf.hl7",
    ],
)
def test_corpus_batches_are_batches(name):
    assert is_batch(corpus(name))


@pytest.mark.parametrize(
    "name", ["msfc/ADT01-23.hl7", "pyhl7/sample_msh_adt_a01.hl7", "medplum/ack_underscore_separator.hl7"]
)
def test_plain_messages_are_not_batches(name):
    assert not is_batch(corpus(name))


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"\xef\xbb\xbfBHS|^~\\&\rBTS|0\r", True),
        (b"\r\n  FHS|^~\\&\r", True),
        (b"\xef\xbb\xbf\r\nBHS|^~\\&", True),
        (b"MSH|^~\\&|\r", False),
        (b"", False),
        (b"BH", False),
        (b"XBHS|", False),
    ],
)
def test_is_batch(payload, expected):
    assert is_batch(payload) is expected


def test_every_other_corpus_file_is_not_a_batch():
    batches = {p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*.hl7") if is_batch(p.read_bytes())}
    assert batches == {
        "pyhl7/sample_batch1_two_msgs.hl7",
        "pyhl7/sample_file_fhs_bhs.hl7",
        "pyhl7/sample_bad_batch_no_msh.hl7",
        "mirth/fhs_bhs_batch_crlf.hl7",
    }


# --- split_batch -----------------------------------------------------------------


def test_split_bhs_batch_with_two_messages():
    batch = split_batch(corpus("pyhl7/sample_batch1_two_msgs.hl7"))
    assert len(batch.header_segments) == 1
    assert batch.header_segments[0].startswith(b"BHS|^~\\&||ABCHS||AUSDHSV|")
    assert batch.file_header is None
    assert batch.batch_header is not None
    assert batch.control_id == "abchs20070101123401-1"
    assert batch.delimiters == DEFAULT_DELIMITERS
    assert len(batch.messages) == 2
    assert batch.trailer_segments == (b"BTS|2",)
    assert batch.declared_count == 2
    assert batch.complete
    assert batch.stray_segments == ()
    for message, control_id in zip(batch.messages, ["12334456778890", "12334456778891"]):
        assert message.startswith(b"MSH|")
        assert message.endswith(b"\r")
        assert b"\n" not in message
        assert b"BTS" not in message and b"BHS" not in message
        ids = [s[:3] for s in message[:-1].split(b"\r")]
        assert ids == [b"MSH", b"EVN", b"PID", b"PD1", b"NK1", b"PV1"]
        header = read_header(message)
        assert header.problem is None
        assert header.control_id == control_id
        assert (header.message_type, header.event) == ("ADT", "A04")
        parsed = hl7.parse(message.decode("ascii"))
        assert str(parsed.segment("MSH")[10]) == control_id


def test_split_file_with_fhs_and_bhs():
    batch = split_batch(corpus("pyhl7/sample_file_fhs_bhs.hl7"))
    assert [s[:3] for s in batch.header_segments] == [b"FHS", b"BHS"]
    assert batch.has_file_header
    assert batch.file_header.control_id == ""  # FHS-11 empty in this sample
    assert batch.control_id == "abchs20070101123401-1"  # BHS-11
    assert len(batch.messages) == 1
    assert [s[:3] for s in batch.trailer_segments] == [b"BTS", b"FTS"]
    assert batch.declared_count == 1
    assert batch.complete


def test_split_batch_without_msh():
    batch = split_batch(corpus("pyhl7/sample_bad_batch_no_msh.hl7"))
    assert batch.messages == ()
    assert batch.control_id == "abchs20070101123401-1"
    assert [s[:3] for s in batch.stray_segments] == [b"EVN", b"PID", b"PD1", b"NK1", b"PV1"]
    assert batch.declared_count == 1  # the sender claims one; there is none


def test_split_mirth_batch_without_trailer():
    batch = split_batch(corpus("mirth/fhs_bhs_batch_crlf.hl7"))
    assert [s[:3] for s in batch.header_segments] == [b"FHS", b"BHS"]
    assert batch.control_id == ""
    assert len(batch.messages) == 1
    assert batch.trailer_segments == ()
    assert batch.declared_count is None
    assert not batch.complete
    header = read_header(batch.messages[0])
    assert (header.message_type, header.event, header.control_id) == ("ORM", "O01", "12345678")
    ids = [s[:3] for s in batch.messages[0][:-1].split(b"\r")]
    assert ids[:4] == [b"MSH", b"PID", b"PV1", b"ORC"]
    assert ids.count(b"OBX") == 17


@pytest.mark.parametrize("newline", [b"\r", b"\n", b"\r\n"])
def test_split_accepts_any_segment_end(newline):
    raw = corpus("pyhl7/sample_batch1_two_msgs.hl7")
    lines = [s for s in raw.replace(b"\r\n", b"\r").split(b"\r") if s]
    payload = b"\xef\xbb\xbf" + newline.join(lines) + newline + newline  # BOM, trailing blank line
    batch = split_batch(payload)
    assert batch == split_batch(raw)
    assert all(b"\n" not in m for m in batch.messages)


def test_split_without_final_segment_end():
    batch = split_batch(b"BHS|^~\\&|||||||||B1\rMSH|^~\\&|A|F|||||ADT^A01|M1|P|2.5\rPID|1")
    assert batch.messages == (b"MSH|^~\\&|A|F|||||ADT^A01|M1|P|2.5\rPID|1\r",)
    assert batch.control_id == "B1"
    assert not batch.complete


def test_split_reads_batch_delimiters():
    payload = b"BHS_^~\\}_APP_FAC_____ _ _B7\rMSH_^~\\}_A_F_____ADT^A01_M1_P_2.5\rBTS_1\r"
    batch = split_batch(payload)
    assert batch.delimiters == Delimiters(field="_", subcomponent="}")
    assert batch.control_id == "B7"
    assert batch.batch_header.sending_application_field == "APP"
    assert batch.batch_header.sending_facility_field == "FAC"
    assert batch.declared_count == 1
    assert len(batch.messages) == 1


def test_split_falls_back_to_default_delimiters():
    batch = split_batch(b"BHS|^^\rMSH|^~\\&|A\r")
    assert batch.delimiters == DEFAULT_DELIMITERS
    assert len(batch.messages) == 1


def test_fhs_control_id_is_used_without_bhs_control_id():
    batch = split_batch(b"FHS|^~\\&|||||||||F9\rBHS|^~\\&\rMSH|^~\\&|A\rBTS|1\rFTS|1\r")
    assert batch.control_id == "F9"


def test_batch_is_frozen():
    batch = split_batch(corpus("pyhl7/sample_batch1_two_msgs.hl7"))
    with pytest.raises(AttributeError):
        batch.messages = ()  # type: ignore[misc]


# --- build_batch_ack ---------------------------------------------------------------


def test_batch_ack_for_bhs_batch():
    batch = split_batch(corpus("pyhl7/sample_batch1_two_msgs.hl7"))
    acks = acks_for(batch)
    text = build_batch_ack(batch, acks, control_id="BATCHACK1", now=NOW)
    lines = segs(text)
    assert [s[:3] for s in lines] == ["BHS", "MSH", "MSA", "MSH", "MSA", "BTS"]
    bhs = fields(lines[0])
    assert bhs[2] == "^~\\&"
    assert bhs[3] == "EXCHANGE"  # inbound BHS-5 was empty
    assert bhs[4] == "AUSDHSV"  # inbound BHS-6
    assert bhs[5] == ""  # inbound BHS-3
    assert bhs[6] == "ABCHS"  # inbound BHS-4
    assert bhs[7] == "20240305140709"
    assert bhs[11] == "BATCHACK1"
    assert bhs[12] == "abchs20070101123401-1"
    # MSH-15/16 = NE/NE in this sample: enhanced mode, commit ACKs
    assert lines[2] == "MSA|CA|12334456778890"
    assert lines[4] == "MSA|CA|12334456778891"
    assert lines[5] == "BTS|2"
    # python-hl7 reads it back as a batch
    parsed = hl7.parse_hl7(text)
    assert isinstance(parsed, hl7.Batch)
    assert len(parsed) == 2
    assert [str(m.segment("MSA")[2]) for m in parsed] == ["12334456778890", "12334456778891"]
    assert str(parsed.header[12]) == "abchs20070101123401-1"
    assert str(parsed.trailer[1]) == "2"


def test_batch_ack_for_file_is_wrapped_in_fhs_fts():
    batch = split_batch(corpus("pyhl7/sample_file_fhs_bhs.hl7"))
    text = build_batch_ack(batch, acks_for(batch), control_id="F1", now=NOW)
    lines = segs(text)
    assert [s[:3] for s in lines] == ["FHS", "BHS", "MSH", "MSA", "BTS", "FTS"]
    fhs = fields(lines[0])
    assert (fhs[3], fhs[4], fhs[5], fhs[6], fhs[11]) == ("EXCHANGE", "AUSDHSV", "", "ABCHS", "F1")
    assert len(fhs) == 12 or fhs[12] == ""  # inbound FHS-11 was empty
    bhs = fields(lines[1])
    assert (bhs[11], bhs[12]) == ("F1", "abchs20070101123401-1")
    assert lines[-2:] == ["BTS|1", "FTS|1"]
    parsed = hl7.parse_hl7(text)
    assert isinstance(parsed, hl7.File)
    assert len(parsed) == 1 and len(parsed[0]) == 1


def test_batch_ack_for_mirth_batch_with_enhanced_mode_and_rejection():
    batch = split_batch(corpus("mirth/fhs_bhs_batch_crlf.hl7"))
    header = read_header(batch.messages[0])
    assert header.enhanced_mode  # MSH-15/16 = AL/NE
    ack = build_ack(header, rejected(200, "MSH-9", "message type ORM is not accepted"), control_id="A1", now=NOW)
    text = build_batch_ack(batch, [ack], control_id="B1", now=NOW)
    lines = segs(text)
    assert [s[:3] for s in lines] == ["FHS", "BHS", "MSH", "MSA", "ERR", "BTS", "FTS"]
    assert lines[0] == "FHS|^~\\&|EXCHANGE|EXCHANGE|||20240305140709||||B1"
    assert lines[1] == "BHS|^~\\&|EXCHANGE|EXCHANGE|||20240305140709||||B1"
    assert lines[3] == "MSA|CR|12345678|message type ORM is not accepted"
    assert lines[-2:] == ["BTS|1", "FTS|1"]


def test_batch_ack_counts_the_acks_not_the_messages():
    # an inbound ACK inside a batch is not answered
    batch = split_batch(corpus("pyhl7/sample_batch1_two_msgs.hl7"))
    text = build_batch_ack(batch, acks_for(batch)[:1], control_id="B1", now=NOW, application="HUB", facility="HUBFAC")
    lines = segs(text)
    assert lines[-1] == "BTS|1"
    assert fields(lines[0])[3] == "HUB"


def test_batch_ack_mirrors_batch_delimiters():
    payload = b"BHS_^~\\}_APP_FAC_ME_MYFAC_____B7\rMSH_^~\\}_A_F_____ADT^A01_M1_P_2.5\rBTS_1\r"
    batch = split_batch(payload)
    ack = build_ack(read_header(batch.messages[0]), ACCEPTED, control_id="A1", now=NOW)
    text = build_batch_ack(batch, [ack], control_id="X_1", now=NOW)
    lines = segs(text)
    assert lines[0] == "BHS_^~\\}_ME_MYFAC_APP_FAC_20240305140709____X\\F\\1_B7"
    assert lines[1].startswith("MSH_^~\\}_")
    assert lines[-1] == "BTS_1"


# --- a batch without messages ---------------------------------------------------------


def test_empty_batch_gets_one_ae():
    batch = split_batch(corpus("pyhl7/sample_bad_batch_no_msh.hl7"))
    assert batch.messages == ()
    text = build_empty_batch_nak(batch, control_id="N1", now=NOW)
    lines = segs(text)
    assert [s[:3] for s in lines] == ["MSH", "MSA", "ERR"]
    msh = fields(lines[0])
    assert (msh[3], msh[4], msh[5], msh[6]) == ("EXCHANGE", "AUSDHSV", "", "ABCHS")
    assert msh[9] == "ACK"
    assert msh[10] == "N1"
    assert lines[1] == "MSA|AE|abchs20070101123401-1|batch contains no MSH message"
    assert lines[2] == "ERR|||100^Segment sequence error^HL70357|E||||batch contains no MSH message"
    parsed = hl7.parse(text)
    assert str(parsed.segment("MSA")[1]) == "AE"
