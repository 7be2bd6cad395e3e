from hypothesis import given, strategies as st

from exchange.hl7.header import Delimiters
from exchange.mapping.message import Message, Segment, escape, is_delete, unescape

D = Delimiters()
TEXT = "MSH|^~\\&|APP|FAC^1.2.3^ISO|R|RF|20240101||ADT^A01^ADT_A01|42|P|2.5\rEVN|A01\r" \
       "PID|1||123^^^HOSP&1.2&ISO^MR~456^^^SSA^SS||Doe^John^Q~Smith^J^^^^^A||19700101|M\r" \
       "PV1|1|I|W1^R2^B3^F\rOBX|1|TX|||line\rOBX|2|TX|||two\r"


def test_segments_and_fields_use_standard_numbering():
    msg = Message(TEXT, D)
    msh = msg.first("MSH")
    assert msh.field(1) == "|"
    assert msh.field(2) == "^~\\&"
    assert msh.field(9) == "ADT^A01^ADT_A01"
    assert msh.component(9, 2) == "A01"
    assert msh.field(10) == "42"
    pid = msg.first("PID")
    assert pid.field(3).startswith("123")
    assert pid.repetitions(3) == ["123^^^HOSP&1.2&ISO^MR", "456^^^SSA^SS"]
    assert pid.components(3, 2) == ["456", "", "", "SSA", "SS"]
    assert pid.subcomponents(3, 4) == ["HOSP", "1.2", "ISO"]
    assert pid.value(3, 4, 2) == "1.2"
    assert pid.component(5, 1, repetition=2) == "Smith"
    assert pid.field(99) == "" and pid.component(99, 3) == "" and pid.components(3, 9) == []
    assert len(msg.segments("OBX")) == 2
    assert msg.first("ZZZ") is None
    assert [s.field(5) for s in msg.after(msg.first("PV1"), "OBX")] == ["line", "two"]


def test_line_ends_lf_crlf_and_blank_lines():
    for sep in ("\n", "\r\n", "\r", "\r\r\n"):
        msg = Message(TEXT.replace("\r", sep), D)
        assert msg.names() == ["MSH", "EVN", "PID", "PV1", "OBX", "OBX"]


def test_segment_name_prefix_does_not_match_longer_names():
    msg = Message("MSH|^~\\&\rPIDX|1\rPID|2", D)
    assert [s.field(1) for s in msg.segments("PID")] == ["2"]


def test_custom_delimiters():
    d = Delimiters(subcomponent="$")
    seg = Segment.parse("PID|1||1^^^A$B", d)
    assert seg.subcomponents(3, 4) == ["A", "B"]


def test_unescape():
    assert unescape(r"a\F\b\S\c\T\d\R\e\E\f") == "a|b^c&d~e\\f"
    assert unescape(r"x\.br\y") == "x\ny"
    assert unescape(r"\H\bold\N\ normal") == "bold normal"
    assert unescape(r"\X0D0A\ ") == "\r\n "
    assert unescape(r"\XC3A4\ ") == "ä "  # UTF-8 bytes
    assert unescape(r"\XE4\ ", codec="latin-1") == "ä "
    assert unescape(r"\XE4\ ") == "ä "  # not UTF-8: latin-1 fallback
    assert unescape(r"cut\P\ ", Delimiters(truncation="#")) == "cut# "
    assert unescape(r"\Zxyz\ \.sp\ \X0\ ") == r"\Zxyz\ \.sp\ \X0\ "  # unknown kept
    assert unescape("open\\") == "open\\"
    assert unescape(r"\E\X0A\E\ ") == "\\X0A\\ "


def test_corpus_escapes_mdm():
    from tests.mapping.helpers import corpus

    msg, _ = corpus("nhapi/mdm_t02_escapes_v231.hl7")
    text = msg.first("OBX").value(5)
    assert "Thirty days have September,\rApril\nJune," in text
    assert "\\X0A\\all the rest" in text
    assert text.startswith("&#39;")


def test_is_delete():
    assert is_delete('""') and is_delete(' "" ')
    assert not is_delete("") and not is_delete('"x"')


@given(st.text(max_size=300))
def test_reader_never_raises_on_garbage(text):
    msg = Message(text, D)
    for seg in msg.all():
        for n in range(0, 8):
            seg.field(n)
            seg.repetitions(n)
            seg.components(n, 2)
            seg.subcomponents(n, 2)
            seg.value(n, 2, 2)
    msg.segments("PID")
    msg.first("MSH")


@given(st.text(max_size=200))
def test_unescape_never_raises(text):
    unescape(text, Delimiters(truncation="#"))


delims = st.sampled_from([D, Delimiters(truncation="#"), Delimiters("|", "^", "~", "\\", "$"), Delimiters("_", "^", "~", "\\", "&")])


@given(st.text(max_size=200), delims)
def test_escape_round_trips(text, d):
    escaped = escape(text, d)
    for ch in (d.field, d.component, d.repetition, d.subcomponent, "\r", "\n"):
        assert ch not in escaped
    assert unescape(escaped, d) == text
