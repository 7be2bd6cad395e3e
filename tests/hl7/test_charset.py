"""HL7 table 0211 names -> Python codecs, and strict body decoding."""
from __future__ import annotations

import codecs

import pytest

from exchange.hl7.charset import CharsetError, ascii_compatible, codec_for, decode_message
from exchange.hl7.header import Header, read_header

TABLE_0211 = {
    "": "ascii",
    "ASCII": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UNICODE": "utf-16",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "ISO IR6": "ascii",
    "ISO IR100": "iso8859-1",
    "ISO IR101": "iso8859-2",
    "ISO IR144": "iso8859-5",
    "ISO IR127": "iso8859-6",
    "ISO IR126": "iso8859-7",
    "ISO IR138": "iso8859-8",
    "ISO IR148": "iso8859-9",
    "ISO IR192": "utf-8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc-kr",
    "BIG-5": "big5",
    "ISO IR87": "iso2022_jp",
    "JIS X 0208": "iso2022_jp",
}


@pytest.mark.parametrize(("name", "codec"), sorted(TABLE_0211.items()))
def test_table_0211(name, codec):
    assert codec_for(name) == codec
    codecs.lookup(codec)  # a real Python codec


@pytest.mark.parametrize("name", ["unicode utf-8", "  UNICODE   UTF-8 ", "Unicode\tUTF-8", "utf-8"])
def test_case_and_spaces_tolerated(name):
    assert codec_for(name) == "utf-8"


@pytest.mark.parametrize(("name", "codec"), [("ISO-8859-1", "iso8859-1"), ("iso8859-15", "iso8859-15")])
def test_common_non_standard_spellings(name, codec):
    assert codec_for(name) == codec


@pytest.mark.parametrize("name", ["CNS 11643-1992", "EBCDIC", "8859/10", "ISO-8859-99", "UTF8X", "x" * 1000])
def test_unknown(name):
    assert codec_for(name) is None


def decode_body(payload: bytes, header: Header) -> str:
    return decode_message(payload, header)[0]


def test_ascii_compatible():
    assert ascii_compatible("utf-8") and ascii_compatible("iso8859-1") and ascii_compatible("big5")
    assert not ascii_compatible("utf-16") and not ascii_compatible("utf-32")


def test_decode_body_uses_header_codec():
    payload = "MSH|^~\\&|A|Köln|||2024||ADT^A01|1|P|2.5||||||8859/1\rPID|1||1||MÜLLER\r".encode("latin-1")
    header = read_header(payload)
    assert decode_body(payload, header).endswith("MÜLLER\r")


def test_decode_body_after_fallback():
    payload = "MSH|^~\\&|BLÄH|F|||2024||ADT^A40|1|P|2.3.1\rPID|1||1||MÜLLER\r".encode("latin-1")
    header = read_header(payload)
    assert header.charset_fallback
    assert "MÜLLER" in decode_body(payload, header)


def test_decode_body_drops_bom():
    payload = b"\xef\xbb\xbfMSH|^~\\&|A|F|||2024||ADT^A01|1|P|2.5\r"
    assert decode_body(payload, read_header(payload)).startswith("MSH|")


def test_undeclared_8bit_body_falls_back_to_windows_1252():
    payload = b"MSH|^~\\&|A|F|||2024||ADT^A01|1|P|2.5\rPID|1||1||M\xdcLLER\r"
    header = read_header(payload)  # MSH is ASCII: utf-8 default, no fallback yet
    assert header.codec == "utf-8"
    text, codec = decode_message(payload, header)
    assert codec == "cp1252"
    assert "MÜLLER" in text


def test_decode_body_strict_when_declared_and_phi_free():
    payload = b"MSH|^~\\&|A|F|||2024||ADT^A01|1|P|2.5||||||UNICODE UTF-8\rPID|1||1||M\xdcLLER\r"
    header = read_header(payload)
    assert header.codec == "utf-8"
    with pytest.raises(CharsetError) as info:
        decode_body(payload, header)
    message = str(info.value)
    assert "UTF-8" in message
    assert "LLER" not in message and "\\xdc" not in message.lower()
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert isinstance(info.value, ValueError)


def test_decode_body_error_names_declared_charset():
    payload = b"MSH|^~\\&|A|F|||2024||ADT^A01|1|P|2.5||||||ASCII\rPID|1||1||M\xdcLLER\r"
    with pytest.raises(CharsetError, match="ASCII"):
        decode_body(payload, read_header(payload))


def test_decode_body_with_plain_header():
    assert decode_body(b"MSH|x", Header(codec="ascii")) == "MSH|x"
