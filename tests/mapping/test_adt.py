from datetime import date, datetime

from exchange.mapping.events import (
    Changes,
    EncounterEvent,
    EncounterStatus as S,
    FacilityContext,
    MappingError,
    MergePatients,
    UpsertPatient,
    ChangeIdentifier,
    LinkAssertion,
    map_message,
    needs,
)
from exchange.mapping.state import MemoryState
from exchange.mapping.values import DELETE, Location, Precision

from .helpers import corpus, msh, run, synthetic

CTX = FacilityContext("HOSP", "HOSP")


def registered(ctx, *mrns):
    """A state holding records ``mrns`` of ``ctx``'s facility (as their registrations leave them)."""
    state = MemoryState()
    for mrn in mrns:
        run(state, ctx, synthetic(msh("ADT", "A04", facility=ctx.code), "EVN|A04",
                                  f"PID|1||{mrn}^^^{ctx.authority}^MR||Doe^Jane"))
    return state


def mapped(name, ctx=CTX, state=None):
    msg, header = corpus(name)
    return map_message(msg, header, ctx, state or MemoryState())


def ops_of(result, kind):
    assert isinstance(result, Changes), result
    return [op for op in result.operations if isinstance(op, kind)]


# --- corpus, per event and version -----------------------------------------------------------


def test_a01_v28_with_oids():
    result = mapped("msfc/ADT-A01-01.hl7", FacilityContext("GHHSFacility", "GOOD HEALTH HOSPITAL"))
    (up,) = ops_of(result, UpsertPatient)
    assert up.mrn == "PATID1234"
    d = up.demographics
    assert [i.value for i in d.identifiers] == ["PATID1234", "123456789"]
    assert d.identifiers[0].authority == "test1" and d.identifiers[0].authority_id == "2.16.1"
    assert d.identifiers[0].type_code == "MR"
    assert d.aliases[0].family == "EVERYMAN" and d.aliases[0].given == "ADAM" and d.aliases[0].suffix == "III"
    assert d.birth.value.tzinfo is not None and d.birth.precision is Precision.MINUTE
    assert d.sex == "M"
    (enc,) = ops_of(result, EncounterEvent)
    assert enc.status is S.ADMITTED and enc.patch.patient_class == "P"
    assert enc.patch.location.point_of_care == "HUH AE OMU"
    assert enc.patch.location.text == "HUH AE OMU^OMU B^Bed 03^HOMERTON UNIVER"
    assert enc.patch.attending.id == "1122334" and enc.patch.attending.name.family == "Alaz"


def test_legal_name_is_the_l_typed_repetition():
    result = mapped("msfc/ADT-A01-01.hl7")
    d = ops_of(result, UpsertPatient)[0].demographics
    # PID-5: EVERYMAN (type D) ~ Josh (type L)
    assert d.name.family == "Josh" and d.name.use == "L"
    assert [a.family for a in d.aliases] == ["EVERYMAN"]


def test_mrn_rule_authority_then_mr_then_first():
    assert ops_of(mapped("ipf/pixsource_A04.hl7", FacilityContext("ICW", "HZLN")), UpsertPatient)[0].mrn == "13278"
    assert ops_of(mapped("ipf/pixsource_A04.hl7", FacilityContext("ICW", "1.3.6.1.4.1.21367.2005.1.2")),
                  UpsertPatient)[0].mrn == "02777"  # universal id CX.4.2
    assert ops_of(mapped("ipf/pixsource_A04.hl7", FacilityContext("ICW", "OTHER")), UpsertPatient)[0].mrn == "305090"
    up = ops_of(mapped("ipf/pixsource_A04.hl7", FacilityContext("ICW", "HZLN")), UpsertPatient)[0]
    assert len(up.demographics.identifiers) == 3  # all kept
    assert ops_of(mapped("msfc/ADT-A01-01.hl7", FacilityContext("X", "nope")), UpsertPatient)[0].mrn == "PATID1234"


def test_a08_delete_and_no_change():
    result = mapped("ipf/pixsource_A08.hl7", FacilityContext("ICW", "MPI"))
    d = ops_of(result, UpsertPatient)[0].demographics
    assert ops_of(result, UpsertPatient)[0].mrn == "306567"
    assert d.removed_authorities == ("2.71",)
    assert d.ssn is None and d.account is None  # empty: no change
    msg = synthetic(msh("ADT", "A08"), "EVN|A08", 'PID|1||7^^^HOSP^MR||""||""|F|||""||""', "PV1|1|I")
    state = MemoryState()
    d = ops_of(map_message(*msg, CTX, state), UpsertPatient)[0].demographics
    assert d.name is DELETE and d.aliases is DELETE and d.birth is DELETE
    assert d.addresses is DELETE and d.phones is DELETE and d.sex == "F"


def test_a08_applies_patch_semantics():
    state = MemoryState()
    run(state, CTX, synthetic(msh("ADT", "A28"), "EVN|A28", "PID|1||7^^^HOSP^MR||Doe^Jane||19800102|F|||1 Main^^Town||555^PRN^PH^jane@example.org||||||123-45-6789"))
    rec = state.records[("HOSP", "7")]
    assert rec["phones"][0].email == "jane@example.org" and rec["ssn"] == "123-45-6789"
    run(state, CTX, synthetic(msh("ADT", "A31"), "EVN|A31", 'PID|1||7^^^HOSP^MR||Roe^Jane||||||||""'))
    assert rec["name"].family == "Roe" and rec["birth"].value == date(1980, 1, 2)
    assert rec["phones"] is None and rec["addresses"][0].city == "Town" and rec["ssn"] == "123-45-6789"


def test_a_ts_degree_of_precision_is_how_much_of_the_date_is_known():
    """Found by a time audit: a v2.3 PID-7 "19800101^Y" (born in 1980) was stored as
    1980-01-01, a full birth date, and linked a stranger born on New Year's Day."""
    state = MemoryState()
    for mrn, pid7, pv1_44 in (("Y", "19800101^Y", "202401011230^H"), ("L", "19800315^L", ""),
                              ("D", "198003152330-0500^D", ""), ("none", "19800315^", "")):
        run(state, CTX, synthetic(msh("ADT", "A01", version="2.3"), "EVN|A01",
                                  f"PID|1||{mrn}^^^HOSP^MR||Doe^Jane||{pid7}|F",
                                  "PV1|1|I" + "|" * 17 + "V1" + "|" * 25 + pv1_44))
    records = state.records
    assert (records[("HOSP", "Y")]["birth"].precision, records[("HOSP", "Y")]["birth"].isoformat()) == \
        (Precision.YEAR, "1980")
    assert records[("HOSP", "L")]["birth"].isoformat() == "1980-03"
    assert records[("HOSP", "D")]["birth"].isoformat() == "1980-03-15"  # the sender's day, no time invented
    assert records[("HOSP", "none")]["birth"].isoformat() == "1980-03-15"
    admitted = enc(state, "Y").admitted_at
    assert admitted.precision is Precision.HOUR and admitted.value == datetime(2024, 1, 1, 12)

def test_an_ssn_sent_in_pid3_typed_ss_is_the_records_ssn():
    """From v2.7 PID-19 is withdrawn: the SSN comes as a PID-3 repetition typed SS. Found by a
    soak audit: matching and the family rules never saw a v2.8 sender's SSN."""
    state = MemoryState()
    run(state, CTX, synthetic(msh("ADT", "A28", version="2.8"), "EVN|A28",
                              "PID|1||7^^^HOSP^MR~599987953^^^SSA^SS||Doe^Jane||19800102|F"))
    assert state.records[("HOSP", "7")]["ssn"] == "599987953"
    # PID-19, where given, wins; a PID-3 without an SS repetition changes nothing
    run(state, CTX, synthetic(msh("ADT", "A08"), "EVN|A08",
                              "PID|1||7^^^HOSP^MR~111223333^^^SSA^SS||Doe^Jane||19800102|F|||||||||||599-98-7953"))
    assert state.records[("HOSP", "7")]["ssn"] == "599-98-7953"
    run(state, CTX, synthetic(msh("ADT", "A08"), "EVN|A08", "PID|1||7^^^HOSP^MR||Doe^Jane||19800102|F"))
    assert state.records[("HOSP", "7")]["ssn"] == "599-98-7953"


def test_missing_pid3_is_an_error():
    result = mapped("nhapi/adt_a04_v27_minimal.hl7")
    assert isinstance(result, MappingError) and result.problem.location == "PID-3" and result.problem.code == 101
    result = mapped("ipf/iti8-a01-incomplete.hl7")
    assert isinstance(result, MappingError) and result.problem.location == "PID-3"


def test_an_mrn_with_a_control_character_is_refused():
    """Found by a black-box audit: C\\X0A\\7 made an MRN with a line break, which no copy, export
    or URL gave back as sent."""
    # ... and the C1 controls (NEL, \XC285\ in UTF-8) and Unicode's line separator (a later audit)
    for mrn in ("C\\X0A\\7", "C\\X09\\7", "C\\X7F\\7", "C\u00857", "C\u20287", "C\u009f7",
                # invisible: a look-alike of C7 (a verification audit)
                "C\u200b7", "C\ufeff7", "C\u202e7", "C\u00ad7", "C\u034f7", "C\u31647", "C\U000e00417", "C\ufe0f7"):
        result = run(MemoryState(), CTX, synthetic(msh("ADT", "A28"), "EVN|A28", f"PID|1||{mrn}^^^HOSP^MR||Doe^Jane"))
        assert isinstance(result, MappingError), mrn
        assert (result.problem.code, result.problem.location) == (102, "PID-3")
        assert "control character" in result.problem.text


def test_a40_two_pairs():
    ctx = FacilityContext("Ntierprise Clinic", "BCBS")
    result = mapped("msfc/ADT-A40-02.hl7", ctx, registered(ctx, "56789", "569"))
    merges = ops_of(result, MergePatients)
    assert [(m.survivor_mrn, m.retired_mrn) for m in merges] == [("12345", "56789"), ("145", "569")]
    assert not any(m.legacy for m in merges)


def test_a40_authority_mismatch_names_mrg1():
    msg = synthetic(msh("ADT", "A40"), "EVN|A40", "PID|1||1^^^HOSP^MR", "MRG|2^^^OTHER^MR")
    result = map_message(*msg, CTX, MemoryState())
    assert isinstance(result, MappingError) and result.problem.location == "MRG-1"
    # ISO-8859-1 A40 with namespace&OID&ISO: the MRG-1 repetition of PID-3's authority is used
    ctx = FacilityContext("X", "MPI-NS-P")
    result = mapped("ipf/iti8-a40-iso-8859-1.hl7", ctx, registered(ctx, "305010"))
    (merge,) = ops_of(result, MergePatients)
    assert (merge.survivor_mrn, merge.retired_mrn) == ("305014", "305010")


def test_a34_legacy_merge():
    ctx = FacilityContext("SENDING_FACILITY", "")
    result = mapped("lfh/adt_a34_v23.hl7", ctx, registered(ctx, "456"))
    (merge,) = ops_of(result, MergePatients)
    assert (merge.survivor_mrn, merge.retired_mrn, merge.legacy, merge.event) == ("123", "456", True, "A34")
    assert any("legacy" in w for w in result.warnings)


def test_a47_identifier_change():
    result = mapped("msfc/ADT-A47-01.hl7", FacilityContext("GHHSFacility", "GOOD HEALTH HOSPITAL"))
    assert isinstance(result, MappingError) and result.problem.location == "MRG-1"  # BCBS id is not ours
    state = MemoryState()
    run(state, CTX, synthetic(msh("ADT", "A01"), "EVN|A01", "PID|1||M1^^^HOSP^MR||Doe^J", pv1()))
    result = run(state, CTX, synthetic(msh("ADT", "A47"), "EVN|A47", "PID|1||M2^^^HOSP^MR||Doe^J", "MRG|M1^^^HOSP^MR"))
    assert ops_of(result, ChangeIdentifier) == [ChangeIdentifier("HOSP", "M1", "M2")]
    assert ("HOSP", "M1") not in state.records
    assert state.record("HOSP", "M2").encounters["V1"].status is S.ADMITTED
    assert state.records[("HOSP", "M2")]["previous_mrns"] == ("M1",)


def test_a24_a37_link_assertions():
    state = MemoryState()
    result = run(state, CTX, synthetic(msh("ADT", "A24"), "EVN|A24", "PID|1||A^^^HOSP^MR", "PID|1||B^^^HOSP^MR"))
    assert ops_of(result, LinkAssertion) == [LinkAssertion("HOSP", "A", "B", True)]
    run(state, CTX, synthetic(msh("ADT", "A37"), "EVN|A37", "PID|1||B^^^HOSP^MR", "PID|1||A^^^HOSP^MR"))
    assert state.links == {("HOSP", "A", "B"): False}
    result = map_message(*synthetic(msh("ADT", "A24"), "EVN|A24", "PID|1||A^^^HOSP^MR"), CTX, state)
    assert isinstance(result, MappingError)


def test_versions_v21_to_v28_map():
    for name in ("nhapi/adt_a01_v21_z01.hl7", "ipf/msg-01-utf8_a01_v22.hl7", "mirth/adt_a01_v23.hl7",
                 "ipf/pixsource_A04.hl7", "renalware/adt_a05_v24_medway_zu.hl7", "hapi/adt_a03_it.hl7",
                 "lfh/adt_a40_adt_a39_v26.hl7", "msfc/ADT-A04-02.hl7"):
        assert isinstance(mapped(name), Changes), name


def test_utf8_umlauts_decoded():
    d = ops_of(mapped("ipf/msg-01-utf8_a01_v22.hl7"), UpsertPatient)[0].demographics
    assert "ä" in d.name.family or "ö" in d.name.given


def test_route_on_msh9_not_msh93():
    # MSH-9.3 says ADT_A04 (non-standard); event comes from MSH-9.2
    assert ops_of(mapped("msfc/ADT-A04-02.hl7"), EncounterEvent)[0].status is S.REGISTERED


def test_needs():
    msg, _ = corpus("msfc/ADT-A40-02.hl7")
    n = needs(msg, FacilityContext("F", "BCBS"))
    assert n.records == {("F", "12345"), ("F", "56789"), ("F", "145"), ("F", "569")}
    msg, _ = corpus("pacsbridge/mdm_t06_v251.hl7")
    n = needs(msg, FacilityContext("F", "HOSPITAL"))
    assert n.documents == {("F", "DOC12346"), ("F", "DOC12345")} and n.records == {("F", "12345")}


# --- synthetic sequences ---------------------------------------------------------------------


def pv1(visit="V1", cls="I", loc="W1^101^A", prior="", admit="", discharge=""):
    fields = ["PV1", "1", cls, loc, "", "", prior] + [""] * 12 + [visit] + [""] * 24 + [admit, discharge]
    return "|".join(fields)


def adt(state, event, mrn="100", ctx=CTX, **kw):
    return run(state, ctx, synthetic(msh("ADT", event), f"EVN|{event}|20240101120000", f"PID|1||{mrn}^^^HOSP^MR||Doe^Jane||19800102|F", pv1(**kw)))


def enc(state, mrn="100", visit="V1"):
    return state.record("HOSP", mrn).encounters[visit]


def test_register_admit_transfer_update_discharge():
    s = MemoryState()
    adt(s, "A04", cls="O", loc="CLINIC^^")
    assert enc(s).status is S.REGISTERED
    adt(s, "A01", loc="W1^101^A", admit="20240102080000")
    e = enc(s)
    assert e.status is S.ADMITTED and e.location == Location("W1", "101", "A")
    assert e.admitted_at.value == datetime(2024, 1, 2, 8)
    adt(s, "A02", loc="W2^202^B")
    e = enc(s)
    assert e.location == Location("W2", "202", "B") and e.prior_location == Location("W1", "101", "A")
    adt(s, "A08", loc="W2^202^C")
    assert enc(s).status is S.ADMITTED and enc(s).location.bed == "C"
    adt(s, "A03", loc="", discharge="20240105100000")
    e = enc(s)
    assert e.status is S.DISCHARGED and e.discharged_at.value == datetime(2024, 1, 5, 10)
    assert e.admitted_at.value == datetime(2024, 1, 2, 8)
    adt(s, "A13", loc="")
    e = enc(s)
    assert e.status is S.ADMITTED and e.discharged_at is None
    history = [h for h in s.history if h[1] == "EncounterEvent"]
    assert [h[3][2] for h in history] == ["A04", "A01", "A02", "A08", "A03", "A13"]


def test_admit_then_cancel_admit():
    s = MemoryState()
    adt(s, "A01")
    adt(s, "A11")
    assert enc(s).status is S.CANCELLED


def test_preadmit_then_cancel_preadmit():
    s = MemoryState()
    adt(s, "A05", cls="P")
    assert enc(s).status is S.PREADMITTED
    adt(s, "A38", cls="P")
    assert enc(s).status is S.CANCELLED


def test_transfer_then_cancel_transfer():
    s = MemoryState()
    adt(s, "A01", loc="W1^1^A")
    adt(s, "A02", loc="W2^2^B")
    adt(s, "A12", loc="")
    e = enc(s)
    assert e.location == Location("W1", "1", "A") and e.prior_location is None


def test_outpatient_inpatient_switch():
    s = MemoryState()
    adt(s, "A04", cls="O")
    adt(s, "A06", cls="")
    assert enc(s).status is S.ADMITTED and enc(s).patient_class == "I"
    adt(s, "A07", cls="")
    assert enc(s).status is S.REGISTERED and enc(s).patient_class == "O"


def test_discharge_before_admit_keeps_both():
    s = MemoryState()
    adt(s, "A03", discharge="20240105100000", loc="W2^2^B")
    e = enc(s)
    assert e.status is S.DISCHARGED and e.discharged_at.value == datetime(2024, 1, 5, 10)
    adt(s, "A01", admit="20240102080000", loc="W1^1^A")
    e = enc(s)
    assert e.status is S.DISCHARGED
    assert e.admitted_at.value == datetime(2024, 1, 2, 8)
    assert e.discharged_at.value == datetime(2024, 1, 5, 10)
    assert e.location == Location("W2", "2", "B")


def test_older_news_of_a_closed_visit_changes_nothing_and_is_not_copied():
    """Found by a time audit: a late A03 after the cancel (A11) made the visit discharged, a late
    A06 after it made it admitted again, and their copies went to every site."""
    s = MemoryState()
    adt(s, "A01", cls="I", loc="W1^1^A")
    adt(s, "A11")
    cancelled = enc(s)
    for event in ("A03", "A06", "A07", "A02"):
        late = adt(s, event, cls="O" if event == "A07" else "I", loc="W9^9^Z", discharge="20240105100000")
        assert isinstance(late, Changes) and not late.copied, event
        assert any("(late)" in w for w in late.warnings), event
        e = enc(s)
        assert (e.status, e.discharged_at, e.location, e.patient_class) == (S.CANCELLED, None, cancelled.location,
                                                                            "I"), event
    s = MemoryState()
    adt(s, "A04", cls="O")
    adt(s, "A03", cls="O", discharge="20240105100000")
    late = adt(s, "A06", cls="")
    assert not late.copied and (enc(s).status, enc(s).patient_class) == (S.DISCHARGED, "O")
    again = adt(s, "A03", discharge="20240105110000")  # a discharge corrected: applied and copied
    assert again.copied and enc(s).discharged_at.value == datetime(2024, 1, 5, 11)
    # found by a verification audit: an A04 or A05 after the discharge went out (and changed the
    # class), and a late A01 replaced the admit time stored
    before = enc(s)
    for event in ("A04", "A05"):
        late = adt(s, event, cls="E" if before.patient_class != "E" else "O")
        assert not late.copied and enc(s) == before, event
    s = MemoryState()
    adt(s, "A01", admit="20240102080000")
    adt(s, "A03")
    late = adt(s, "A01", admit="20240102090000", loc="W9^9^Z")
    assert not late.copied and enc(s).admitted_at.value == datetime(2024, 1, 2, 8)
    s = MemoryState()
    adt(s, "A03", discharge="20240105100000")  # the discharge first: the late admit fills its time
    adt(s, "A01", admit="20240102090000")
    assert enc(s).admitted_at.value == datetime(2024, 1, 2, 9)
    s = MemoryState()
    adt(s, "A01")
    adt(s, "A11")
    assert adt(s, "A04", cls="O").copied and enc(s).status is S.REGISTERED  # a cancelled visit starts again


def test_cancels_and_visit_events_of_a_closed_visit_are_late_too():
    """Found by a second verification audit: an A12 after the discharge put the visit back in its
    old bed, an A13 of a cancelled visit, an A38 of an admitted one and a leave of absence after the
    discharge were copied to every site."""
    s = MemoryState()
    adt(s, "A01", loc="W1^1^A")
    adt(s, "A02", loc="W2^2^B")
    assert adt(s, "A21").copied  # a leave of absence of an open visit goes out
    adt(s, "A03")
    closed = enc(s)
    for event in ("A12", "A38", "A21", "A22", "A52", "A16", "A25"):
        late = adt(s, event, loc="W9^9^Z")
        assert isinstance(late, Changes) and not late.copied and late.warnings[-1].endswith("not copied (late)"), event
        assert enc(s) == closed, event
    s = MemoryState()
    adt(s, "A01")
    adt(s, "A11")
    cancelled = enc(s)
    for event in ("A13", "A38"):
        late = adt(s, event)
        assert not late.copied and enc(s) == cancelled, event
    s = MemoryState()
    adt(s, "A01")
    assert not adt(s, "A38").copied and enc(s).status is S.ADMITTED  # the pre-admission was admitted since


def test_a_late_event_is_as_old_as_its_visit_news_and_changes_no_demographics():
    """Found by an audit of session 12's seams: an engine's error queue replayed the original A01
    (the old address) after the A08 and A03 with the new one; the record went back to the old
    address while every other site kept the new (the late event is not copied). Nor does it fill
    what the record lacks: a verification audit's phone, deleted by the A08 (PID-13 ""), came back."""
    def with_pid(state, event, pid, **kw):
        return run(state, CTX, synthetic(msh("ADT", event), f"EVN|{event}|20240101120000", pid, pv1(**kw)))

    old = "PID|1||100^^^HOSP^MR||Doe^Jane||19800102|F|||1 Old Rd^^Salem^OR^97301"
    new = "PID|1||100^^^HOSP^MR||Doe^Jane||19800102|F|||5 New Ave^^Chicago^IL^60601||^PRN^PH^^^312^5550142"
    s = MemoryState()
    with_pid(s, "A01", old)
    with_pid(s, "A08", new)
    with_pid(s, "A03", new)
    late = with_pid(s, "A01", old.replace("Doe^Jane", "Doe-Smith^Jane") + "||^PRN^PH^^^503^5550100")
    assert not late.copied
    rec = s.records[("HOSP", "100")]
    assert (rec["addresses"][0].city, rec["name"].family, [p.number for p in rec["phones"]]) == (
        "Chicago", "Doe", ["312 5550142"])
    s = MemoryState()
    with_pid(s, "A01", old + "||^PRN^PH^^^503^5550100")
    with_pid(s, "A08", new.replace("||^PRN^PH^^^312^5550142", '||""'))
    with_pid(s, "A03", new.replace("||^PRN^PH^^^312^5550142", ""))
    with_pid(s, "A01", old + "||^PRN^PH^^^503^5550100")
    rec = s.records[("HOSP", "100")]
    assert rec["phones"] is None and rec["addresses"][0].city == "Chicago"


def test_discharge_without_time_uses_event_time():
    s = MemoryState()
    adt(s, "A03")
    assert enc(s).discharged_at.value == datetime(2024, 1, 1, 12)


def test_merge_moves_visits_and_keeps_retired_answerable():
    s = MemoryState()
    adt(s, "A01", mrn="OLD", visit="V-OLD")
    adt(s, "A01", mrn="NEW", visit="V-NEW")
    result = run(s, CTX, synthetic(msh("ADT", "A40"), "EVN|A40", "PID|1||NEW^^^HOSP^MR||Doe^Jane", "MRG|OLD^^^HOSP^MR"))
    assert isinstance(result, Changes)
    retired = s.record("HOSP", "OLD")
    assert retired.active is False and retired.merged_into == "NEW" and retired.encounters == {}
    survivor = s.record("HOSP", "NEW")
    assert survivor.active and set(survivor.encounters) == {"V-OLD", "V-NEW"}
    # later messages for the retired MRN land on the survivor
    result = adt(s, "A08", mrn="OLD", visit="V-OLD", loc="X^1^1")
    assert any("merged" in w for w in result.warnings)
    assert s.record("HOSP", "NEW").encounters["V-OLD"].location.point_of_care == "X"
    assert s.record("HOSP", "OLD").encounters == {}
    # ... without the retired MRN taking the place of the survivor's own
    ids = s.records[("HOSP", "NEW")]["identifiers"]
    assert [i.value for i in ids.values()] == ["NEW"] and s.records[("HOSP", "NEW")]["merged_identifiers"] == ("OLD",)


def a40(s, survivor, retired, name="Doe^Jane", birth=""):
    return run(s, CTX, synthetic(msh("ADT", "A40"), "EVN|A40", f"PID|1||{survivor}^^^HOSP^MR||{name}||{birth}",
                                 f"MRG|{retired}^^^HOSP^MR"))


def test_a_merge_reversed_by_the_sender_brings_the_retired_record_back():
    """A40 OLD->NEW, then NEW->OLD (the registrar merged the wrong way round): OLD lives again
    and holds everything; before, both records were left inactive, OLD 'merged into' itself,
    and the patient's record dropped out of routing and export."""
    s = MemoryState()
    adt(s, "A01", mrn="OLD", visit="V-OLD")
    adt(s, "A01", mrn="NEW", visit="V-NEW")
    a40(s, "NEW", "OLD")
    result = a40(s, "OLD", "NEW")
    assert "PID-3: was merged into MRG-1 before; that merge is reversed" in result.warnings
    old, new = s.record("HOSP", "OLD"), s.record("HOSP", "NEW")
    assert old.active and old.merged_into is None and set(old.encounters) == {"V-OLD", "V-NEW"}
    assert not new.active and new.merged_into == "OLD" and new.encounters == {}
    adt(s, "A08", mrn="NEW", visit="V-NEW", loc="X^1^1")  # the retired MRN lands on the survivor
    assert s.record("HOSP", "OLD").encounters["V-NEW"].location.point_of_care == "X"


def test_a_merge_into_a_record_merged_away_before_lands_on_its_survivor():
    s = MemoryState()
    for mrn in ("A", "B", "C"):
        adt(s, "A01", mrn=mrn, visit=f"V-{mrn}")
    a40(s, "C", "B")  # B lives on as C
    result = a40(s, "B", "A")  # the sender still calls the patient B
    assert "PID-3: identifier was merged; applied to the surviving record" in result.warnings
    assert [(m.survivor_mrn, m.retired_mrn) for m in ops_of(result, MergePatients)] == [("C", "A")]
    a, b, c = (s.record("HOSP", m) for m in "ABC")
    assert c.active and set(c.encounters) == {"V-A", "V-B", "V-C"}
    assert (a.active, a.merged_into, b.active, b.merged_into) == (False, "C", False, "C")
    # another patient's demographics under the retired MRN merge nothing
    adt(s, "A01", mrn="D", visit="V-D")
    result = a40(s, "B", "D", name="Quinn^Oscar", birth="20010909")
    assert isinstance(result, MappingError) and result.problem.code == 205
    assert s.record("HOSP", "D").active


def test_a40_whose_prior_mrn_is_unknown_merges_nothing():
    """A tombstone for an MRN never seen would send a later registration under it -- perhaps
    another patient -- to the survivor, and the survivor's copies to its facilities."""
    s = MemoryState()
    adt(s, "A04", mrn="KNOWN")
    result = run(s, CTX, synthetic(msh("ADT", "A40"), "EVN|A40", "PID|1||KNOWN^^^HOSP^MR||Doe^Jane",
                                   "MRG|NEVER^^^HOSP^MR"))
    assert ops_of(result, MergePatients) == []
    assert "MRG-1: prior identifier is not known here, nothing merged" in result.warnings
    assert s.record("HOSP", "NEVER") is None
    run(s, CTX, synthetic(msh("ADT", "A04"), "EVN|A04", "PID|1||NEVER^^^HOSP^MR||Quinn^Oscar||20010909|M"))
    assert s.records[("HOSP", "NEVER")]["active"] and s.records[("HOSP", "NEVER")]["name"].family == "Quinn"
    assert s.records[("HOSP", "KNOWN")]["name"].family == "Doe"


def test_unsupported_event_and_type():
    r = map_message(*synthetic(msh("ADT", "A99"), "PID|1||1^^^HOSP^MR"), CTX, MemoryState())
    assert isinstance(r, MappingError) and r.problem.code == 201
    r = map_message(*synthetic(msh("ORU", "R01"), "PID|1||1^^^HOSP^MR"), CTX, MemoryState())
    assert isinstance(r, MappingError) and r.problem.code == 200


def test_two_messages_run_together_are_one_error_not_the_first_applied():
    one = "MSH|^~\\&|APP|HOSP|EX|EX|20240101120000||ADT^A04|C1|P|2.5\rEVN|A04\rPID|1||1^^^HOSP^MR||Doe^Jane\r"
    two = one.replace("|C1|", "|C2|").replace("1^^^HOSP", "2^^^HOSP")
    s = MemoryState()
    result = map_message(*synthetic(*(one + two).rstrip("\r").split("\r")), CTX, s)
    assert isinstance(result, MappingError)
    assert (result.problem.code, result.problem.location) == (100, "MSH") and "2 messages" in result.problem.text


def test_a_retired_mrn_reused_for_another_patient_is_refused_not_applied_to_the_survivor():
    """Found by a black-box audit: after an A40, a registration reusing the retired MRN for a new
    patient overwrote the survivor's name and birth date with the stranger's."""
    s = MemoryState()
    run(s, CTX, synthetic(msh("ADT", "A04"), "EVN|A04", "PID|1||OLD^^^HOSP^MR||Doe^Jane||19800101|F"))
    run(s, CTX, synthetic(msh("ADT", "A04"), "EVN|A04", "PID|1||NEW^^^HOSP^MR||Doe^Jane||19800101|F"))
    run(s, CTX, synthetic(msh("ADT", "A40"), "EVN|A40", "PID|1||NEW^^^HOSP^MR||Doe^Jane||19800101|F",
                          "MRG|OLD^^^HOSP^MR"))
    for pid in ("PID|1||OLD^^^HOSP^MR||Quinn^Oscar||20010909|M",  # another name and birth date
                "PID|1||OLD^^^HOSP^MR||Doe^Jane||19800102|F",  # another birth date
                "PID|1||OLD^^^HOSP^MR||Quinn^Oscar",  # another family and given name
                "PID|1||OLD^^^HOSP^MR||Doe^Olivia||19800101|F"):  # her twin: another given name
        refused = run(s, CTX, synthetic(msh("ADT", "A04"), "EVN|A04", pid))
        assert isinstance(refused, MappingError), pid
        assert (refused.problem.code, refused.problem.location) == (205, "PID-3")
        survivor = s.records[("HOSP", "NEW")]
        assert (survivor["name"].family, survivor["birth"].value) == ("Doe", date(1980, 1, 1))
    # the same patient under the retired MRN still lands on the survivor, a married name included
    for pid in ("PID|1||OLD^^^HOSP^MR||Doe^Jane||19800101|F|||1 Main St^^Town",
                "PID|1||OLD^^^HOSP^MR||Doe^Janie||19800101|F", "PID|1||OLD^^^HOSP^MR||Doe^J||19800101|F",
                "PID|1||OLD^^^HOSP^MR||Doe^Jnae||19800101|F",  # a nickname, an initial, a typo
                "PID|1||OLD^^^HOSP^MR||Smith^Jane||19800101|F", "PID|1||OLD^^^HOSP^MR||Smith^Jane||1980"):
        applied = run(s, CTX, synthetic(msh("ADT", "A08"), "EVN|A08", pid))
        assert isinstance(applied, Changes), pid
        assert ops_of(applied, UpsertPatient)[0].mrn == "NEW"
        if "Smith" not in pid:  # the next one compares with Jane again
            run(s, CTX, synthetic(msh("ADT", "A08"), "EVN|A08", "PID|1||NEW^^^HOSP^MR||Doe^Jane||19800101|F"))
    assert s.records[("HOSP", "NEW")]["name"].family == "Smith"


def test_home_and_business_phones_are_updated_each_on_its_own():
    """Found by a black-box audit: an update with PID-13 only dropped the PID-14 phones, and
    PID-14 = "" deleted the home phones too (HL7: empty = no change, "" = delete, field by field)."""
    s = MemoryState()

    def a31(p13, p14):
        run(s, CTX, synthetic(msh("ADT", "A31"), "EVN|A31", f"PID|1||P1^^^HOSP^MR||Doe^Jane||||||||{p13}|{p14}"))
        return [(p.number or p.email, p.business) for p in s.records[("HOSP", "P1")]["phones"] or ()]

    assert a31("^PRN^PH^^1^617^5550001~^NET^Internet^anna@x.org", "^WPN^PH^^1^617^5550002") == [
        ("+1 617 5550001", False), ("anna@x.org", False), ("+1 617 5550002", True)]
    assert a31("^PRN^PH^^1^617^5559999", "") == [("+1 617 5559999", False), ("+1 617 5550002", True)]
    assert a31("", '""') == [("+1 617 5559999", False)]
    assert a31("", "^WPN^PH^^1^617^5550003") == [("+1 617 5559999", False), ("+1 617 5550003", True)]
    assert a31('""', "") == [("+1 617 5550003", True)]
    assert a31('""', '""') == []


def test_identifiers_without_an_authority_are_each_kept():
    """Found by a black-box audit: PID-3 repetitions without CX.4 and of one type overwrote each other."""
    s = MemoryState()
    run(s, CTX, synthetic(msh("ADT", "A08"), "EVN|A08", "PID|1||R1^^^HOSP^MR~777^^^^MR~888^^^^MR||Doe^Jane"))
    assert sorted(i.value for i in s.records[("HOSP", "R1")]["identifiers"].values()) == ["777", "888", "R1"]


def test_a17_swaps_the_two_patients_beds():
    """Found by a black-box audit: A17 was answered AA and only the first PID's demographics applied."""
    s = MemoryState()
    adt(s, "A01", mrn="S1", visit="VS1", loc="W1^10^A")
    adt(s, "A01", mrn="S2", visit="VS2", loc="W1^10^B")
    swap = run(s, CTX, synthetic(msh("ADT", "A17"), "EVN|A17|20240101130000",
                                 "PID|1||S1^^^HOSP^MR||Doe^Jane||19800102|F", pv1(visit="VS1", loc="W1^10^B"),
                                 "PID|1||S2^^^HOSP^MR||Roe^Ann||19700101|F", pv1(visit="VS2", loc="W1^10^A")))
    assert isinstance(swap, Changes)
    one, two = enc(s, "S1", "VS1"), enc(s, "S2", "VS2")
    assert (one.location, one.prior_location) == (Location("W1", "10", "B"), Location("W1", "10", "A"))
    assert (two.location, two.prior_location) == (Location("W1", "10", "A"), Location("W1", "10", "B"))
    assert one.status is two.status is S.ADMITTED
    half = run(s, CTX, synthetic(msh("ADT", "A17"), "EVN|A17", "PID|1||S1^^^HOSP^MR", pv1(visit="VS1")))
    assert isinstance(half, MappingError) and half.problem.location == "PV1"


def test_without_a_visit_number_updates_apply_and_a_readmission_is_a_new_stay():
    """Found by a black-box audit: with PV1-19 empty (common before v2.4) an A08's new location
    was dropped, and a readmission after a discharge stayed 'discharged'."""
    s = MemoryState()
    adt(s, "A01", mrn="O11", visit="", loc="W5^5^5", admit="20240101080000")
    adt(s, "A08", mrn="O11", visit="", loc="W6^6^6")
    assert enc(s, "O11", "").location == Location("W6", "6", "6")
    adt(s, "A03", mrn="O11", visit="", loc="W6^6^6", discharge="20240103100000")
    assert enc(s, "O11", "").status is S.DISCHARGED
    readmit = adt(s, "A01", mrn="O11", visit="", loc="W7^7^7", admit="20240201090000")
    e = enc(s, "O11", "")
    assert (e.status, e.location, e.discharged_at) == (S.ADMITTED, Location("W7", "7", "7"), None)
    assert e.admitted_at.value == datetime(2024, 2, 1, 9) and e.prior_location is None
    assert any("new stay" in w for w in readmit.warnings)
    # without PV1-44 the new stay's admit time is the event's, as for any admit (found by a black-box audit)
    adt(s, "A03", mrn="O11", visit="", loc="W7^7^7")
    adt(s, "A01", mrn="O11", visit="", loc="W8^8^8")
    assert enc(s, "O11", "").admitted_at.value == datetime(2024, 1, 1, 12)
    # a patient update with a placeholder PV1 creates no encounter
    adt(s, "A08", mrn="P2", visit="", loc="")
    assert s.record("HOSP", "P2").encounters == {}
    # with a visit number an admit after the discharge is still a late message for that stay
    adt(s, "A03", mrn="O12", visit="V9", discharge="20240103100000")
    adt(s, "A01", mrn="O12", visit="V9", admit="20240101080000")
    assert enc(s, "O12", "V9").status is S.DISCHARGED


def test_a13_restores_an_outpatient_visit_to_registered():
    s = MemoryState()
    adt(s, "A04", mrn="O2", visit="V2", cls="O", loc="CLINIC^^")
    adt(s, "A03", mrn="O2", visit="V2", cls="O", loc="CLINIC^^")
    adt(s, "A13", mrn="O2", visit="V2", cls="", loc="")
    assert (enc(s, "O2", "V2").status, enc(s, "O2", "V2").discharged_at) == (S.REGISTERED, None)
    adt(s, "A01", mrn="I2", visit="V3")
    adt(s, "A03", mrn="I2", visit="V3")
    adt(s, "A13", mrn="I2", visit="V3", cls="", loc="")
    assert enc(s, "I2", "V3").status is S.ADMITTED


def test_a_null_component_is_no_value():
    """Found by a black-box audit: PID-5 = SMITH^ANNA^"" stored the middle name as the text \"\"."""
    s = MemoryState()
    run(s, CTX, synthetic(msh("ADT", "A08"), "EVN|A08",
                          'PID|1||N1^^^HOSP^MR||SMITH^ANNA^""||||||1 MAIN ST^""^TOWN'))
    rec = s.records[("HOSP", "N1")]
    assert (rec["name"].family, rec["name"].given, rec["name"].middle) == ("SMITH", "ANNA", "")
    assert (rec["addresses"][0].other, rec["addresses"][0].city) == ("", "TOWN")


def test_an_identifier_of_another_facilitys_authority_is_not_taken_as_this_facilitys_mrn():
    """Found by a black-box audit: an A24 from GENHOSP naming SL2^^^OAKNH^MR made a GENHOSP
    record SL2 (another site's number in this site's namespace, a phantom record)."""
    ctx = FacilityContext("GENHOSP", "GENHOSP", foreign_authorities=frozenset({"OAKNH", "EXCHANGE"}))
    s = MemoryState()
    link = run(s, ctx, synthetic(msh("ADT", "A24", facility="GENHOSP"), "EVN|A24",
                                 "PID|1||G1^^^GENHOSP^MR||Doe^Jane", "PID|1||SL2^^^OAKNH^MR||Doe^Jane"))
    assert isinstance(link, MappingError) and (link.problem.code, link.problem.location) == (102, "PID(2)-3")
    assert s.records == {}
    person_id_only = run(s, ctx, synthetic(msh("ADT", "A08", facility="GENHOSP"), "EVN|A08",
                                           "PID|1||7^^^EXCHANGE^PI||Doe^Jane"))
    assert isinstance(person_id_only, MappingError)
    # its own MRN beside them is taken; an authority no facility uses still falls back as before
    ok = run(s, ctx, synthetic(msh("ADT", "A08", facility="GENHOSP"), "EVN|A08",
                               "PID|1||7^^^EXCHANGE^PI~G1^^^GENHOSP^MR~X9^^^LAB^MR||Doe^Jane"))
    assert isinstance(ok, Changes) and ops_of(ok, UpsertPatient)[0].mrn == "G1"
    other = run(s, ctx, synthetic(msh("ADT", "A08", facility="GENHOSP"), "EVN|A08", "PID|1||H5^^^HOSP^MR||Roe^Ann"))
    assert isinstance(other, Changes) and ops_of(other, UpsertPatient)[0].mrn == "H5"


def test_visit_merge_move_and_renumber_events_are_applied():
    """Found by a black-box audit: A42, A45, A50 (and A39, A41, A44, A51) were answered AE 201."""
    s = MemoryState()
    adt(s, "A01", mrn="M1", visit="VM1", loc="W1^1^A")
    adt(s, "A04", mrn="M1", visit="VM2", cls="O", loc="CLINIC^^")
    merge = run(s, CTX, synthetic(msh("ADT", "A42"), "EVN|A42", "PID|1||M1^^^HOSP^MR||Doe^Jane",
                                  "MRG|M1^^^HOSP^MR||||VM2", pv1(visit="VM1", loc="")))
    assert isinstance(merge, Changes)
    assert set(s.record("HOSP", "M1").encounters) == {"VM1"}
    assert enc(s, "M1", "VM1").location == Location("W1", "1", "A")  # the surviving visit's own values
    renumber = run(s, CTX, synthetic(msh("ADT", "A50"), "EVN|A50", "PID|1||M1^^^HOSP^MR||Doe^Jane",
                                     "MRG|M1^^^HOSP^MR||||VM1", pv1(visit="VM9", loc="")))
    assert isinstance(renumber, Changes) and set(s.record("HOSP", "M1").encounters) == {"VM9"}
    adt(s, "A04", mrn="M2")
    move = run(s, CTX, synthetic(msh("ADT", "A45"), "EVN|A45", "PID|1||M2^^^HOSP^MR||Roe^Ann",
                                 "MRG|M1^^^HOSP^MR||||VM9", pv1(visit="VM9", loc="")))
    assert isinstance(move, Changes)
    assert "VM9" not in s.record("HOSP", "M1").encounters and enc(s, "M2", "VM9").status is S.ADMITTED
    unknown = run(s, CTX, synthetic(msh("ADT", "A50"), "EVN|A50", "PID|1||M2^^^HOSP^MR",
                                    "MRG|M2^^^HOSP^MR||||NOPE", pv1(visit="VX", loc="")))
    assert isinstance(unknown, Changes) and any("not known here" in w for w in unknown.warnings)
    missing = run(s, CTX, synthetic(msh("ADT", "A42"), "EVN|A42", "PID|1||M2^^^HOSP^MR", "MRG|M2^^^HOSP^MR"))
    assert isinstance(missing, MappingError)


def test_account_events_and_a39_person_merge():
    s = MemoryState()
    run(s, CTX, synthetic(msh("ADT", "A04"), "EVN|A04", "PID|1||P1^^^HOSP^MR||Doe^Jane|||||||||||||ACC1"))
    run(s, CTX, synthetic(msh("ADT", "A04"), "EVN|A04", "PID|1||P2^^^HOSP^MR||Roe^Ann|||||||||||||ACC2"))
    a41 = run(s, CTX, synthetic(msh("ADT", "A41"), "EVN|A41", "PID|1||P1^^^HOSP^MR|||||||||||||||ACC9",
                                "MRG|P1^^^HOSP^MR||ACC1"))
    assert isinstance(a41, Changes) and s.records[("HOSP", "P1")]["account"] == "ACC9"
    a44 = run(s, CTX, synthetic(msh("ADT", "A44"), "EVN|A44", "PID|1||P1^^^HOSP^MR", "MRG|P2^^^HOSP^MR||ACC2"))
    assert isinstance(a44, Changes)
    assert (s.records[("HOSP", "P1")]["account"], s.records[("HOSP", "P2")]["account"]) == ("ACC2", None)
    a39 = run(s, CTX, synthetic(msh("ADT", "A39"), "EVN|A39", "PID|1||P1^^^HOSP^MR", "MRG||||P2^^^HOSP^MR"))
    assert ops_of(a39, MergePatients) and s.record("HOSP", "P2").merged_into == "P1"


def test_the_record_address_is_the_home_one_not_a_mailing_address_listed_first():
    """Found by a black-box audit: a PO box (XAD.7 M) listed first stood for the record."""
    from exchange.mapping.values import Address, primary_address

    po = Address("PO BOX 12", city="SALEM", use="M")
    home = Address("1 ELM ST", city="SALEM", use="H")
    untyped = Address("9 FIR CT", city="BEND")
    assert primary_address((po, home)) == home
    assert primary_address((po, untyped)) == untyped
    assert primary_address((untyped, home)) == home
    assert primary_address((po,)) == po
    assert primary_address((Address(use="H"),)) is None and primary_address(None) is None


# --- the events a black-box sweep found answered AE 201 "not mapped" -------------------------------------


def pv1_doctors(visit="V1", attending="", consulting="", cls="I", loc="W1^101^A"):
    """A PV1 with PV1-7 (attending) and PV1-9 (consulting, repeating) as given."""
    fields = ["PV1", "1", cls, loc, "", "", "", attending, "", consulting] + [""] * 9 + [visit]
    return "|".join(fields)


def doctors_of(state, mrn="100", visit="V1"):
    e = state.records[("HOSP", mrn)]["encounters"][visit]
    return (e["attending"].id if e["attending"] else None), tuple(d.id for d in e["consulting"] or ())


def event(state, ev, *segments, mrn="100", ctx=CTX):
    return run(state, ctx, synthetic(msh("ADT", ev), f"EVN|{ev}|20240101130000",
                                     f"PID|1||{mrn}^^^HOSP^MR||Doe^Jane||19800102|F", *segments))


def test_a54_a55_change_the_attending_doctor_and_a61_a62_the_consulting_ones():
    s = MemoryState()
    event(s, "A01", pv1_doctors(attending="D1^Who^Al"))
    assert doctors_of(s) == ("D1", ())
    a54 = event(s, "A54", pv1_doctors(attending="D2^Two^Bo"))
    assert isinstance(a54, Changes)
    (op,) = ops_of(a54, EncounterEvent)
    assert (op.event, op.status) == ("A54", None)  # an update: the visit stays admitted
    assert doctors_of(s) == ("D2", ()) and enc(s).status is S.ADMITTED
    event(s, "A55", pv1_doctors(attending="D1^Who^Al"))  # the cancel names the doctor before the change
    assert doctors_of(s) == ("D1", ())
    event(s, "A61", pv1_doctors(consulting="C1^Con^Cy~C2^Sul^Sy"))
    assert doctors_of(s) == ("D1", ("C1", "C2"))
    event(s, "A62", pv1_doctors(consulting="C1^Con^Cy"))
    assert doctors_of(s) == ("D1", ("C1",))
    # PV1-7 left empty changes no doctor, and says so
    empty = event(s, "A54", pv1_doctors())
    assert doctors_of(s) == ("D1", ("C1",)) and "A54: PV1-7 is empty, the doctor is not changed" in empty.warnings
    # a discharged visit stays discharged; a visit first heard of in a doctor change is created as its PV1 says
    event(s, "A03", pv1_doctors())
    event(s, "A54", pv1_doctors(attending="D3"))
    assert enc(s).status is S.DISCHARGED and doctors_of(s)[0] == "D3"
    event(s, "A61", pv1_doctors(visit="V2", consulting="C9", cls="O", loc="CLINIC^^"))
    assert enc(s, visit="V2").status is S.REGISTERED and doctors_of(s, visit="V2") == (None, ("C9",))


def test_leave_of_absence_cancels_and_adverse_reactions_apply_the_demographics_only():
    """A52/A53 take back A21/A22, which change no visit (the record model has no leave status);
    A60's adverse reactions (IAM) are not in the record model: the PID is applied, the copies carry the rest."""
    s = MemoryState()
    event(s, "A01", pv1_doctors())
    for ev in ("A21", "A52", "A22", "A53"):
        result = event(s, ev, pv1_doctors(loc="LOA^^"))
        assert isinstance(result, Changes) and ops_of(result, EncounterEvent) == []
        assert f"{ev}: only the demographics are applied" in result.warnings
    assert (enc(s).status, enc(s).location) == (S.ADMITTED, Location("W1", "101", "A"))
    a60 = run(s, CTX, synthetic(msh("ADT", "A60"), "EVN|A60", "PID|1||100^^^HOSP^MR||Doe^Janet||19800102|F",
                                pv1_doctors(), "IAM|1|DA|PCN^Penicillin^L|SV|Hives|A"))
    assert [type(op) for op in a60.operations] == [UpsertPatient]
    assert s.records[("HOSP", "100")]["name"].given == "Janet"
    assert any("adverse reactions (IAM) are not kept" in w for w in a60.warnings)


def test_a46_is_read_as_a47_and_without_mrg1_changes_only_pid2():
    s = registered(CTX, "OLD", "OTHER")
    a46 = run(s, CTX, synthetic(msh("ADT", "A46"), "EVN|A46", "PID|1|P2|NEW^^^HOSP^MR||Doe^Jane",
                                "MRG|OLD^^^HOSP^MR|||P1"))
    assert ops_of(a46, ChangeIdentifier) == [ChangeIdentifier("HOSP", "OLD", "NEW")]
    assert s.record("HOSP", "OLD") is None and s.record("HOSP", "NEW") is not None
    assert any(w.startswith("A46: read as A47") for w in a46.warnings)
    # the change of PID-2 alone (MRG-1 empty, MRG-4 the prior patient ID) names no MRN: nothing renamed
    only_pid2 = run(s, CTX, synthetic(msh("ADT", "A46"), "EVN|A46", "PID|1|P3|NEW^^^HOSP^MR||Doe^Janet",
                                      "MRG||||P2"))
    assert [type(op) for op in only_pid2.operations] == [UpsertPatient]
    assert s.record("HOSP", "NEW") is not None and s.record("HOSP", "P2") is None
    assert s.records[("HOSP", "NEW")]["name"].given == "Janet"
    # as for A47: renaming onto another record is a merge, refused
    clash = run(s, CTX, synthetic(msh("ADT", "A46"), "EVN|A46", "PID|1||OTHER^^^HOSP^MR", "MRG|NEW^^^HOSP^MR"))
    assert isinstance(clash, MappingError) and clash.problem.code == 205
    missing = run(s, CTX, synthetic(msh("ADT", "A46"), "EVN|A46", "PID|1||NEW^^^HOSP^MR"))
    assert isinstance(missing, MappingError) and missing.problem.location == "MRG-1"


def test_a48_changes_an_alternate_id_the_record_model_does_not_keep():
    s = registered(CTX, "P1")
    a48 = run(s, CTX, synthetic(msh("ADT", "A48"), "EVN|A48", "PID|1||P1^^^HOSP^MR|ALT2|Doe^Jane||19800102",
                                "MRG|P1^^^HOSP^MR|ALT1"))
    assert [type(op) for op in a48.operations] == [UpsertPatient]
    assert s.record("HOSP", "P1") is not None and s.records[("HOSP", "P1")]["birth"].value.year == 1980
    assert any(w.startswith("A48: PID-4 (alternate patient ID) is not kept") for w in a48.warnings)


def test_a49_changes_the_account_number_as_a41_merges_it():
    s = MemoryState()
    run(s, CTX, synthetic(msh("ADT", "A04"), "EVN|A04", "PID|1||P1^^^HOSP^MR||Doe^Jane|||||||||||||ACC1"))
    a49 = run(s, CTX, synthetic(msh("ADT", "A49"), "EVN|A49", "PID|1||P1^^^HOSP^MR|||||||||||||||ACC2",
                                "MRG|P1^^^HOSP^MR||ACC1"))
    assert isinstance(a49, Changes) and s.records[("HOSP", "P1")]["account"] == "ACC2"
    missing = run(s, CTX, synthetic(msh("ADT", "A49"), "EVN|A49", "PID|1||P1^^^HOSP^MR|||||||||||||||ACC3"))
    assert isinstance(missing, MappingError) and s.records[("HOSP", "P1")]["account"] == "ACC2"


def test_a30_merge_person_information_is_read_as_a40():
    s = registered(CTX, "P1", "P2")
    a30 = run(s, CTX, synthetic(msh("ADT", "A30", version="2.3"), "EVN|A30", "PID|1||P1^^^HOSP^MR||Doe^Jane",
                                "MRG|P2^^^HOSP^MR"))
    (merge,) = ops_of(a30, MergePatients)
    assert (merge.survivor_mrn, merge.retired_mrn, merge.event, merge.legacy) == ("P1", "P2", "A30", True)
    assert s.record("HOSP", "P2").merged_into == "P1"
    assert "A30: legacy merge event treated as A40" in a30.warnings


def test_a43_moves_an_mrn_between_the_senders_patients_the_record_takes_the_new_patients_demographics():
    s = registered(CTX, "X1")
    a43 = run(s, CTX, synthetic(msh("ADT", "A43"), "EVN|A43", "PID|1|PAT2|X1^^^HOSP^MR||Roe^Ann||19700101|F",
                                "MRG|X1^^^HOSP^MR|||PAT1"))
    assert [type(op) for op in a43.operations] == [UpsertPatient]
    rec = s.records[("HOSP", "X1")]
    assert (rec["name"].family, rec["name"].given, rec["birth"].value.year) == ("Roe", "Ann", 1970)
    assert any(w.startswith("A43: the identifier's move") for w in a43.warnings)
    # PID-3 and MRG-1 name the identifier moved: another MRN in MRG-1 is no A43
    other = run(s, CTX, synthetic(msh("ADT", "A43"), "EVN|A43", "PID|1||X1^^^HOSP^MR||Poe^Al", "MRG|X2^^^HOSP^MR"))
    assert isinstance(other, MappingError) and (other.problem.code, other.problem.location) == (102, "MRG-1")
    for bad in ("MRG||||PAT1", None):
        segs = [msh("ADT", "A43"), "EVN|A43", "PID|1||X1^^^HOSP^MR||Poe^Al"] + ([bad] if bad else [])
        result = run(s, CTX, synthetic(*segs))
        assert isinstance(result, MappingError) and (result.problem.code, result.problem.location) == (101, "MRG-1")
    assert s.records[("HOSP", "X1")]["name"].family == "Roe"


def test_a23_a_purge_of_the_senders_visit_is_accepted_and_changes_nothing():
    s = MemoryState()
    event(s, "A01", pv1_doctors(attending="D1"))
    before = s.records[("HOSP", "100")]["encounters"]["V1"].copy()
    a23 = event(s, "A23", pv1_doctors(), mrn="100")
    assert isinstance(a23, Changes) and a23.operations == ()
    assert any(w.startswith("A23: the sender deleted the visit from its own database") for w in a23.warnings)
    assert s.records[("HOSP", "100")]["encounters"]["V1"] == before
    unknown = event(s, "A23", pv1_doctors(), mrn="NEVER")
    assert unknown.operations == () and s.record("HOSP", "NEVER") is None


def test_a29_a19_and_a56_to_a59_are_refused_with_the_reason():
    s = registered(CTX, "100")
    for ev, words in [("A29", "no message deletes a record"), ("A19", "patient query"),
                      *((f"A{n}", "table 0003 has no A56-A59") for n in range(56, 60))]:
        result = event(s, ev, pv1_doctors())
        assert isinstance(result, MappingError), ev
        assert (result.problem.code, result.problem.location) == (201, "MSH-9.2") and words in result.problem.text
    assert s.records[("HOSP", "100")]["name"].family == "Doe"


def test_every_adt_event_of_table_0003_is_mapped_or_refused_with_its_own_reason():
    """Found by a black-box audit: A23, A29, A30, A43, A46, A48, A49, A52-A62 were answered
    AE 201 "not mapped", though the README said every ADT event was taken."""
    s = MemoryState()
    event(s, "A04", pv1_doctors(), mrn="100")
    event(s, "A04", pv1_doctors(), mrn="200")
    generic = []
    for n in range(1, 63):
        ev = f"A{n:02d}"
        segments = [f"PID|1||100^^^HOSP^MR||Doe^Jane||19800102|F"]
        if ev in ("A17", "A24", "A37"):
            segments += [pv1_doctors(), "PID|1||200^^^HOSP^MR||Doe^Jane||19800102|F"]
        elif ev in ("A30", "A34", "A35", "A36", "A39", "A40", "A41", "A42", "A43", "A44", "A45", "A46", "A47",
                    "A48", "A49", "A50", "A51", "A18"):
            segments += ["MRG|100^^^HOSP^MR||ACC||V1|V1"]
        segments.append(pv1_doctors())
        result = map_message(*synthetic(msh("ADT", ev), f"EVN|{ev}", *segments), CTX, s)
        if isinstance(result, MappingError) and "is not mapped" in result.problem.text:
            generic.append(ev)
    assert generic == []
