import base64

from exchange.mapping.events import (
    Changes,
    DocumentAction,
    DocumentEvent,
    DocumentState as D,
    FacilityContext,
    MappingError,
    MarkDocument,
    map_message,
)
from exchange.mapping.state import MemoryState

from .helpers import corpus, msh, run, synthetic

CTX = FacilityContext("HOSP", "HOSP")


def doc_op(result):
    assert isinstance(result, Changes), result
    (op,) = [o for o in result.operations if isinstance(o, DocumentEvent)]
    return op


def test_base64_html_70kb():
    msg, header = corpus("ipf/msg-02_mdm_t02_base64.hl7")
    op = doc_op(map_message(msg, header, CTX, MemoryState()))
    content = op.patch.content
    assert content.content_type == "text/html"
    assert content.data and content.size == len(content.data) > 50_000
    assert content.data.lstrip()[:1] == b"<"
    assert op.patch.completion_status == "PA"
    assert op.action is DocumentAction.CREATE and op.state is D.CURRENT


def test_pdf_with_empty_data():
    msg, header = corpus("msfc/MDM-T02-01.hl7")
    content = doc_op(map_message(msg, header, CTX, MemoryState())).patch.content
    assert content.content_type == "application/pdf" and content.data == b""


def test_29_text_lines_joined_in_order():
    msg, header = corpus("msfc/MDM-T02-03.hl7")
    op = doc_op(map_message(msg, header, FacilityContext("SFAC", "SIMULATOR MRN"), MemoryState()))
    assert op.number == "2RWRVAJ627408" and op.patch.type == "DS" and op.patch.completion_status == "IP"
    lines = op.patch.content.text.split("\n")
    assert len(lines) == 29
    assert lines[0].startswith("Toilet cylinder") and lines[3] == "Naming grandmother ruth"
    assert op.patch.content.content_type == "text/plain"
    assert op.patch.author is None  # TXA-9 empty (C006 is TXA-5, the activity provider)
    assert op.patch.activity_at.text == "20210801090642+0215"


def test_escapes_and_errors_without_txa():
    for name in ("nhapi/mdm_t02_escapes_v231.hl7", "ipf/tpl_mdm_t11_no_txa.hl7"):
        msg, header = corpus(name)
        result = map_message(msg, header, CTX, MemoryState())
        assert isinstance(result, MappingError) and result.problem.code == 101
        assert result.problem.location == "TXA-12"


def test_text_escapes_decoded():
    m = synthetic(msh("MDM", "T02"), "EVN|T02", "PID|1||1^^^HOSP^MR", "TXA|1|NOTE|TX|||||||||D1||||AU",
                  r"OBX|1|FT|||a\T\b\.br\c\S\d", "OBX|2|TX|||second~third", "OBX|3|CE|||C^Coded text")
    text = doc_op(map_message(*m, CTX, MemoryState())).patch.content.text
    assert text == "a&b\nc^d\nsecond\nthird\nCoded text"


def test_content_size_limit():
    small = FacilityContext("HOSP", "HOSP", max_document_bytes=1000)
    data = base64.b64encode(b"x" * 2000).decode()
    m = synthetic(msh("MDM", "T02"), "EVN|T02", "PID|1||1^^^HOSP^MR", "TXA|1|NOTE|TX|||||||||D1||||AU",
                  f"OBX|1|ED|||^application^pdf^Base64^{data}")
    r = map_message(*m, small, MemoryState())
    assert isinstance(r, MappingError) and r.problem.location == "OBX-5"
    m = synthetic(msh("MDM", "T02"), "EVN|T02", "PID|1||1^^^HOSP^MR", "TXA|1|NOTE|TX|||||||||D1||||AU",
                  *[f"OBX|{i}|TX|||{'y' * 100}" for i in range(20)])
    r = map_message(*m, small, MemoryState())
    assert isinstance(r, MappingError) and r.problem.location == "OBX-5"
    assert isinstance(map_message(*m, CTX, MemoryState()), Changes)


def _t02(*obx: str):
    return synthetic(msh("MDM", "T02"), "EVN|T02", "PID|1||1^^^HOSP^MR", "TXA|1|NOTE|TX|||||||||D1||||AU", *obx)


def test_content_over_the_limit_is_an_error_naming_its_size():
    small = FacilityContext("HOSP", "HOSP", max_document_bytes=1000)
    state = MemoryState()
    pdf = base64.b64encode(b"%PDF" + b"x" * 997).decode()  # 1001 bytes decoded
    for m, size in ((_t02(f"OBX|1|ED|||^application^pdf^Base64^{pdf}"), 1001),
                    (_t02("OBX|1|TX|||" + "é" * 500, "OBX|2|TX|||"), 1001),  # 1000 bytes of UTF-8 + a newline
                    (_t02("OBX|1|ED|||^AP^PDF^Hex^" + "00" * 1001), 1001)):
        r = map_message(*m, small, state)
        assert isinstance(r, MappingError), r
        assert (r.problem.code, r.problem.location) == (104, "OBX-5")
        assert r.problem.text == f"document content of {size} bytes exceeds the limit of 1000 bytes"
    assert state.snapshot(history=True) == MemoryState().snapshot(history=True)  # nothing applied


def test_content_at_the_limit_is_applied():
    small = FacilityContext("HOSP", "HOSP", max_document_bytes=1000)
    pdf = base64.b64encode(b"%PDF" + b"x" * 996).decode()  # exactly 1000 bytes
    s = MemoryState()
    assert isinstance(run(s, small, _t02(f"OBX|1|ED|||^application^pdf^Base64^{pdf}")), Changes)
    assert len(s.documents[("HOSP", "D1")]["versions"][0]["content"].data) == 1000
    lines = [f"OBX|{i}|TX|||{'y' * 99}" for i in range(1, 11)]  # 10 x 99 + 9 newlines = 999
    lines.append("OBX|11|TX|||é")  # + newline + 2 bytes = 1002: one too many
    assert isinstance(map_message(*_t02(*lines), small, MemoryState()), MappingError)
    lines[-1] = "OBX|11|TX|||"  # + newline = 1000
    op = doc_op(map_message(*_t02(*lines), small, MemoryState()))
    assert len(op.patch.content.text.encode("utf-8")) == 1000


def test_bad_base64_is_an_error():
    m = synthetic(msh("MDM", "T02"), "EVN|T02", "PID|1||1^^^HOSP^MR", "TXA|1|NOTE|TX|||||||||D1||||AU",
                  "OBX|1|ED|||^AP^PDF^Base64^abcde")
    r = map_message(*m, CTX, MemoryState())
    assert isinstance(r, MappingError) and r.problem.location == "OBX-5"


def test_pacsbridge_chain():
    s = MemoryState()
    ctx = FacilityContext("HOSPITAL", "HOSPITAL")
    for name in ("mdm_t02_radiology_v251", "mdm_t04_v251", "mdm_t06_v251", "mdm_t08_v251", "mdm_t10_v251"):
        result = run(s, ctx, corpus(f"pacsbridge/{name}.hl7"), name)
        assert isinstance(result, Changes), (name, result)
    assert s.document("HOSPITAL", "RAD001").state is D.CURRENT
    parent = s.document("HOSPITAL", "DOC12345")
    assert parent.state is D.REPLACED and parent.version == 2  # T04 created it, T08 a new version
    assert s.document("HOSPITAL", "DOC12346").parent == "DOC12345"  # addendum
    assert s.document("HOSPITAL", "DOC12347").state is D.CURRENT
    versions = s.documents[("HOSPITAL", "DOC12345")]["versions"]
    assert versions[1]["content"].text.startswith("History and physical examination completed")
    assert versions[1]["availability"] == "OB" and versions[1]["event"] == "T08"
    assert versions[0]["message"] == "mdm_t04_v251"


def test_unknown_parent_is_an_error():
    msg, header = corpus("pacsbridge/mdm_t06_v251.hl7")
    r = map_message(msg, header, CTX, MemoryState())
    assert isinstance(r, MappingError) and r.problem.location == "TXA-13" and r.problem.code == 204


def mdm(s, event, number, parent="", text="body", status="AU", availability=""):
    txa = f"TXA|1|NOTE|TX|20240101||||||||{number}|{parent}||||{status}||{availability}"
    segs = [msh("MDM", event), f"EVN|{event}", "PID|1||100^^^HOSP^MR||Doe^Jane", txa]
    if text:
        segs.append(f"OBX|1|TX|||{text}")
    return run(s, CTX, synthetic(*segs))


def test_t02_t08_t06_t10_t11_lifecycle():
    s = MemoryState()
    mdm(s, "T02", "D1", text="first", status="IP")
    d1 = s.document("HOSP", "D1")
    assert (d1.state, d1.version) == (D.CURRENT, 1)
    mdm(s, "T08", "D1", text="edited", status="AU")
    d1 = s.document("HOSP", "D1")
    assert (d1.state, d1.version) == (D.CURRENT, 2)
    versions = s.documents[("HOSP", "D1")]["versions"]
    assert [v["content"].text for v in versions] == ["first", "edited"]
    assert [v["completion_status"] for v in versions] == ["IP", "AU"]
    r = mdm(s, "T06", "D1-A", parent="D1", text="addendum")
    assert isinstance(r, Changes)
    assert s.document("HOSP", "D1-A").parent == "D1" and s.document("HOSP", "D1").state is D.CURRENT
    r = mdm(s, "T10", "D2", parent="D1", text="replacement")
    assert [type(o) for o in r.operations][-1] is MarkDocument
    assert s.document("HOSP", "D1").state is D.REPLACED
    assert s.document("HOSP", "D2").state is D.CURRENT
    mdm(s, "T11", "D2", text="")
    assert s.document("HOSP", "D2").state is D.CANCELLED
    assert s.documents[("HOSP", "D2")]["versions"][-1]["availability"] == "CA"
    assert s.document("HOSP", "D1-A").state is D.CURRENT


def test_status_change_keeps_content_and_late_original_fills_only():
    s = MemoryState()
    mdm(s, "T02", "D1", text="body", status="IP")
    mdm(s, "T03", "D1", text="", status="LA")
    v = s.documents[("HOSP", "D1")]["versions"]
    assert len(v) == 1 and v[0]["completion_status"] == "LA" and v[0]["content"].text == "body"
    s = MemoryState()
    mdm(s, "T08", "D9", text="edited", status="AU")  # the edit arrives before the original
    mdm(s, "T02", "D9", text="original", status="IP")
    v = s.documents[("HOSP", "D9")]["versions"][-1]
    assert v["content"].text == "edited" and v["completion_status"] == "AU"


def test_documents_move_on_merge():
    s = MemoryState()
    mdm(s, "T02", "D1")
    run(s, CTX, synthetic(msh("ADT", "A40"), "EVN|A40", "PID|1||200^^^HOSP^MR", "MRG|100^^^HOSP^MR"))
    assert s.document("HOSP", "D1").mrn == "200"


def test_an_edit_or_replacement_naming_another_patients_document_is_refused():
    """Found by a black-box audit: a T08 for doc X under patient B turned A's document into B's text."""
    s = MemoryState()
    mdm(s, "T02", "X", text="Ann: chest x-ray normal")

    def under(event, number, parent=""):
        txa = f"TXA|1|NOTE|TX|20240101||||||||{number}|{parent}||||AU"
        return run(s, CTX, synthetic(msh("MDM", event), f"EVN|{event}", "PID|1||999^^^HOSP^MR||Beta^Bob", txa,
                                     "OBX|1|TX|||Bob's text"))

    edit = under("T08", "X")
    assert isinstance(edit, MappingError) and (edit.problem.code, edit.problem.location) == (205, "TXA-12")
    replacement = under("T10", "Y", parent="X")
    assert isinstance(replacement, MappingError) and replacement.problem.location == "TXA-13"
    versions = s.documents[("HOSP", "X")]["versions"]
    assert len(versions) == 1 and versions[0]["content"].text == "Ann: chest x-ray normal"
    assert s.document("HOSP", "X").state is D.CURRENT
    # after a merge the survivor owns the retired record's documents: its edits are its own
    run(s, CTX, synthetic(msh("ADT", "A40"), "EVN|A40", "PID|1||999^^^HOSP^MR", "MRG|100^^^HOSP^MR"))
    assert isinstance(under("T08", "X"), Changes)


def test_base64_wrapped_in_escaped_line_breaks_decodes_exactly_and_junk_is_refused():
    """Found by a black-box audit: the escape letters of \\X0D\\\\X0A\\ were decoded as Base64 data."""
    pdf = bytes(range(256)) * 12
    b64 = base64.b64encode(pdf).decode()
    wrapped = "\\X0D\\\\X0A\\".join(b64[i:i + 76] for i in range(0, len(b64), 76))

    def ed(data, *before):
        return map_message(*synthetic(msh("MDM", "T02"), "EVN|T02", "PID|1||1^^^HOSP^MR",
                                      "TXA|1|NOTE|AP|||||||||D1||||AU", *before,
                                      f"OBX|{len(before) + 1}|ED|||^application^pdf^Base64^{data}"), CTX, MemoryState())

    assert doc_op(ed(wrapped)).patch.content.data == pdf
    assert doc_op(ed(wrapped.replace("\\X0D\\\\X0A\\", "\\.br\\"))).patch.content.data == pdf
    junk = ed("!!!this is not base64 at all ###")
    assert isinstance(junk, MappingError) and junk.problem.location == "OBX-5"
    # a cover note in TX lines before the ED is kept beside it
    content = doc_op(ed(b64, "OBX|1|TX|||Cover: scanned consent form")).patch.content
    assert (content.data, content.text) == (pdf, "Cover: scanned consent form")


def test_an_addendum_or_replacement_reusing_a_number_is_refused_and_a_cancel_is_unavailable():
    """Found by a black-box audit: a T10 whose TXA-12 existed marked the parent replaced and kept the
    old text (its own was dropped), while the copies carried the new one; a T11 with TXA-19 AV
    left a cancelled document 'available'."""
    s = MemoryState()
    mdm(s, "T02", "P", text="parent")
    mdm(s, "T02", "N", text="old")
    reused = mdm(s, "T10", "N", parent="P", text="replacement")
    assert isinstance(reused, MappingError) and (reused.problem.code, reused.problem.location) == (205, "TXA-12")
    assert s.document("HOSP", "P").state is D.CURRENT
    assert s.documents[("HOSP", "N")]["versions"][-1]["content"].text == "old"
    cancel = mdm(s, "T11", "N", text="", availability="AV")
    assert isinstance(cancel, Changes) and any("TXA-19" in w for w in cancel.warnings)
    assert s.documents[("HOSP", "N")]["versions"][-1]["availability"] == "CA"


def test_a_second_original_with_other_text_is_refused_and_a_cancelled_document_stays_cancelled():
    """Found by a black-box audit: a second T02 for a stored TXA-12 kept the stored text while the
    copies carried the new one, and a T08 edit of a cancelled document was applied."""
    s = MemoryState()
    mdm(s, "T01", "D", text="")  # a notification first, its content after: the usual two-step
    assert isinstance(mdm(s, "T02", "D", text="first text"), Changes)
    assert s.documents[("HOSP", "D")]["versions"][-1]["content"].text == "first text"
    assert isinstance(mdm(s, "T02", "D", text="first text"), Changes)  # a resend under a new MSH-10
    second = mdm(s, "T02", "D", text="other text")
    assert isinstance(second, MappingError) and (second.problem.code, second.problem.location) == (205, "TXA-12")
    assert s.documents[("HOSP", "D")]["versions"][-1]["content"].text == "first text"

    assert isinstance(mdm(s, "T11", "D", text=""), Changes)
    for event, number, parent in (("T08", "D", ""), ("T04", "D", ""), ("T02", "D", ""), ("T06", "A", "D"),
                                  ("T10", "R", "D")):
        refused = mdm(s, event, number, parent=parent, text="reinstated")
        assert isinstance(refused, MappingError) and refused.problem.code == 207, event
        assert refused.problem.location == ("TXA-13" if parent else "TXA-12")
    assert s.document("HOSP", "D").state is D.CANCELLED
    assert len(s.documents[("HOSP", "D")]["versions"]) == 1 and ("HOSP", "A") not in s.documents
    assert isinstance(mdm(s, "T11", "D", text=""), Changes)  # a resent cancel is harmless


def test_a_t02_after_its_t01_notice_carries_the_current_status():
    """Found by a black-box audit: the T02's AU/AV were dropped (fill-only) and the stored
    document stayed an unavailable draft (IP/UN) while the copies said AU/AV."""
    s = MemoryState()
    mdm(s, "T01", "D8", text="", status="IP", availability="UN")
    mdm(s, "T02", "D8", text="the note", status="AU", availability="AV")
    v = s.documents[("HOSP", "D8")]["versions"][-1]
    assert (v["completion_status"], v["availability"], v["content"].text) == ("AU", "AV", "the note")
    # an original arriving after an edit is late: it fills only what the edit left empty
    mdm(s, "T08", "D8", text="edited", status="LA")
    mdm(s, "T02", "D8", text="edited", status="AU", availability="AV")
    assert s.documents[("HOSP", "D8")]["versions"][-1]["completion_status"] == "LA"


def test_a_notice_arriving_after_its_document_is_late_and_not_copied():
    """Found by a time audit: a T01 notice (IP/UN) arriving after its T02 (AU/AV) made an
    authenticated note unavailable again, here and at every site it was copied to."""
    s = MemoryState()
    mdm(s, "T02", "D9", text="the note", status="AU", availability="AV")
    late = mdm(s, "T01", "D9", text="", status="IP", availability="UN")
    assert isinstance(late, Changes) and not late.copied
    assert any("(late)" in w for w in late.warnings)
    v = s.documents[("HOSP", "D9")]["versions"][-1]
    assert (v["completion_status"], v["availability"], v["content"].text) == ("AU", "AV", "the note")
    again = mdm(s, "T01", "D10", text="", status="IP", availability="UN")  # a notice first: copied
    assert isinstance(again, Changes) and again.copied
    later = mdm(s, "T01", "D10", text="", status="IP", availability="AV")  # a second notice says the status now
    assert later.copied and s.documents[("HOSP", "D10")]["versions"][-1]["availability"] == "AV"
