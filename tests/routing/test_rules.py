"""exchange.routing.rules: who receives a copy, as a pure function."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.config import FacilityConfig, RouteConfig, load_config
from exchange.hl7.header import read_header
from exchange.mapping.message import Message
from exchange.routing.rules import (DEFAULT, Decision, Destination, Event, Reason, protection, recheck, route,
                                    subscribed)
from exchange.routing.rules import CANCELS, LOCAL_EVENTS, MERGES
from exchange.mapping.events import protection_unreadable

REPO = Path(__file__).resolve().parents[2]
DEMO = load_config(REPO / "config" / "exchange.toml", environ={})
NETWORK = DEMO.facilities  # GENHOSP hospital, OAKNH nursing home, HHCARE home health

# Records of person P1 at each site: a nursing-home resident who is also a
# home-health patient and is known at the hospital.
EVERYWHERE = {"GENHOSP": "H100", "OAKNH": "N200", "HHCARE": "C300"}


def event(message_type="ADT", trigger="A01", facility="GENHOSP", **kw) -> Event:
    kw.setdefault("person", "P1")
    kw.setdefault("source_mrn", "H100")
    return Event(facility, message_type, trigger, **kw)


def where(decision: Decision) -> dict[str, str]:
    return {d.facility: d.why for d in decision.destinations}


def reasons(decision: Decision) -> dict[str, Reason]:
    return {s.facility: s.reason for s in decision.skipped}


def facility(code, kind="hospital", **kw) -> FacilityConfig:
    kw.setdefault("deliver_to", f"127.0.0.1:{3000 + len(code)}")
    return FacilityConfig(code=code, name=code, kind=kind, authority=code, **kw)


# -- the scenarios on the shipped demo network ---------------------------


def test_nursing_home_resident_admitted_at_the_hospital():
    decision = route(event("ADT", "A01", patient_class="I"), NETWORK, EVERYWHERE, DEMO.routes)
    assert decision.destinations == (Destination("OAKNH", "N200", DEFAULT),)
    assert reasons(decision) == {"GENHOSP": Reason.SENDER, "HHCARE": Reason.NOT_SUBSCRIBED}
    assert decision.reason is None


def test_discharge_gets_to_both():
    decision = route(event("ADT", "A03"), NETWORK, EVERYWHERE, DEMO.routes)
    assert where(decision) == {"OAKNH": DEFAULT, "HHCARE": DEFAULT}


def test_discharge_summary_goes_to_home_health():
    ds = event("MDM", "T02", document_type="DS")
    decision = route(ds, NETWORK, {"GENHOSP": "H100", "HHCARE": "C300"}, DEMO.routes)
    assert decision.destinations == (Destination("HHCARE", "C300", DEFAULT),)
    assert reasons(decision)["OAKNH"] is Reason.NO_RECORD


def test_home_health_gets_no_other_documents():
    for doc in ("HP", "OP"):
        decision = route(event("MDM", "T02", document_type=doc), NETWORK, EVERYWHERE, DEMO.routes)
        assert where(decision) == {"OAKNH": DEFAULT}, doc
        assert reasons(decision)["HHCARE"] is Reason.NOT_SUBSCRIBED


def test_a_document_of_no_known_type_goes_to_no_facility_that_excludes_any():
    """TXA-2 empty on the message and on everything stored about the document: it could be
    the BH note the nursing home must not see."""
    decision = route(event("MDM", "T02", document_type=""), NETWORK, EVERYWHERE, DEMO.routes)
    assert reasons(decision)["OAKNH"] is Reason.EXCLUDED_DOCUMENT
    everything = [RouteConfig("all documents", messages=("MDM^*",), to_codes=("OAKNH", "HHCARE"))]
    open_ = facility("OPEN", subscribe=("MDM^*",))  # excludes nothing: gets it
    decision = route(event("MDM", "T02", document_type=""), (*NETWORK, open_), {**EVERYWHERE, "OPEN": "X1"},
                     everything)
    assert where(decision) == {"OPEN": DEFAULT}
    assert reasons(decision)["HHCARE"] is Reason.EXCLUDED_DOCUMENT  # it excludes BH too, rules included
    # an ADT carries no document: exclusions never apply to it
    assert "OAKNH" in where(route(event("ADT", "A03"), NETWORK, EVERYWHERE, DEMO.routes))


def test_opted_out_person_goes_nowhere_rules_included():
    rules = [RouteConfig("everything everywhere", to_kinds=("nursing_home", "home_health"), allow_without_record=True)]
    for trigger, doc in (("A01", ""), ("A03", ""), ("T02", "DS")):
        kind = "MDM" if doc else "ADT"
        decision = route(event(kind, trigger, document_type=doc, protected=True), NETWORK, EVERYWHERE, rules)
        assert decision.destinations == ()
        assert reasons(decision) == {"GENHOSP": Reason.SENDER, "OAKNH": Reason.PROTECTED, "HHCARE": Reason.PROTECTED}
        assert decision.reason == "the person opted out"


def test_excluded_document_type_never_goes_rules_included():
    rules = [RouteConfig("all documents", messages=("MDM^*",), to_codes=("OAKNH", "HHCARE"))]
    decision = route(event("MDM", "T02", document_type="BH"), NETWORK, EVERYWHERE, rules)
    assert decision.destinations == ()
    assert reasons(decision) == {
        "GENHOSP": Reason.SENDER,
        "OAKNH": Reason.EXCLUDED_DOCUMENT,
        "HHCARE": Reason.EXCLUDED_DOCUMENT,
    }
    # the document type is compared in upper case
    assert route(event("MDM", "T02", document_type="bh"), NETWORK, EVERYWHERE, rules).destinations == ()


def _mdm(trigger, txa18, txa2="DS", parent=""):
    raw = (f"MSH|^~\\&|DOC|GENHOSP|EX|EX|20261127||MDM^{trigger}|C1|P|2.5\rEVN|{trigger}\r"
           f"PID|1||H100^^^GENHOSP^MR\rTXA|1|{txa2}|TX|||||||||D1|{parent}|||||{txa18}|AU\r"
           "OBX|1|TX|||note\r").encode()
    header = read_header(raw)
    return Message(raw.decode(), header.delimiters), header


def test_a_restricted_document_goes_only_where_its_confidentiality_status_is_received():
    """TXA-18 (table 0272): V very restricted and R restricted documents, and any status routing
    does not know, go to no facility unless its receive_confidentiality names the status, rules
    included; usual control (U, and HL7 v3's N/L/M) goes as any document."""
    rules = [RouteConfig("all documents", messages=("MDM^*",), to_codes=("OAKNH", "HHCARE"))]
    network = [facility("GENHOSP"), facility("OAKNH", "nursing_home", receive_confidentiality=("R",)),
               facility("HHCARE", "home_health", receive_confidentiality=("R", "V"))]

    def sent(txa18, **kw):
        msg, header = _mdm("T02", txa18)
        ev = Event.read(header, msg, person="P1", source_mrn="H100", protected=False, **kw)
        return set(where(route(ev, network, EVERYWHERE, rules))), reasons(route(ev, network, EVERYWHERE, rules))

    assert sent("V") == ({"HHCARE"}, {"GENHOSP": Reason.SENDER, "OAKNH": Reason.CONFIDENTIAL})
    assert sent("r")[0] == {"OAKNH", "HHCARE"}  # compared in upper case
    assert sent("XX")[1]["OAKNH"] is Reason.CONFIDENTIAL  # a status routing does not know: fail closed
    # every repetition counts, the most restricted wins; text without a code is unreadable: closed
    assert sent("U~R")[0] == sent("~R")[0] == {"OAKNH", "HHCARE"}
    assert sent("~V^very restricted^HL70272")[0] == {"HHCARE"}
    assert sent("^Restricted^HL70272")[0] == sent("&R")[0] == sent("U&R")[0] == set()
    assert sent('""~R')[0] == {"OAKNH", "HHCARE"}  # a null repetition says nothing
    for usual in ("", "U", "N", "L", "M", '""'):
        assert sent(usual)[0] == {"OAKNH", "HHCARE"}, usual
    # the status the document (or an ancestor) was last given counts when the message says none
    assert sent("", confidentiality=("V",))[0] == {"HHCARE"}
    assert sent("U", confidentiality=("R",))[0] == {"OAKNH", "HHCARE"}
    assert route(event("MDM", "T02", confidentiality=("V",)), DEMO.facilities, EVERYWHERE, rules).destinations == ()


def test_recheck_a_queued_copy_of_a_document_restricted_since():
    hh = facility("HHCARE", "home_health")
    assert recheck(queued_event(confidentiality=("V",)), "HHCARE", DEFAULT, [hh]) is Reason.CONFIDENTIAL
    assert recheck(queued_event(confidentiality=("V",)), "HHCARE", DEFAULT,
                   [replace(hh, receive_confidentiality=("V",))]) is None
    assert recheck(queued_event(confidentiality=("U",)), "HHCARE", DEFAULT, [hh]) is None


def test_an_edit_or_an_addendum_of_an_excluded_document_is_excluded_too():
    """T08/T11 often leave TXA-2 empty ("no change"): the stored type counts; and an addendum
    (T06) of a BH note is about the same thing, whatever its own TXA-2."""
    rules = [RouteConfig("all documents", messages=("MDM^*",), to_codes=("OAKNH", "HHCARE"))]

    def mdm(trigger, txa2, parent=""):
        raw = (f"MSH|^~\\&|DOC|GENHOSP|EX|EX|20261127||MDM^{trigger}|C1|P|2.5\rEVN|{trigger}\r"
               f"PID|1||H100^^^GENHOSP^MR\rTXA|1|{txa2}|TX|||||||||D1|{parent}||||AU\rOBX|1|TX|||note\r").encode()
        header = read_header(raw)
        return Message(raw.decode(), header.delimiters), header

    msg, header = mdm("T08", "")
    edit = Event.read(header, msg, person="P1", source_mrn="H100", protected=False, stored_type="bh")
    assert edit.document_type == "BH"
    assert route(edit, NETWORK, EVERYWHERE, rules).destinations == ()
    msg, header = mdm("T06", "CN", parent="D0")
    addendum = Event.read(header, msg, person="P1", source_mrn="H100", protected=False, stored_type="CN",
                          lineage=("BH", "CN"))
    assert (addendum.document_type, addendum.document_types) == ("CN", ("CN", "BH"))
    assert route(addendum, NETWORK, EVERYWHERE, rules).destinations == ()
    plain = Event.read(header, msg, person="P1", source_mrn="H100", protected=False, stored_type="CN",
                       lineage=("CN", "DS"))
    assert set(where(route(plain, NETWORK, EVERYWHERE, rules))) == {"OAKNH", "HHCARE"}
    # a notice that re-types the note DS is still the BH note: its lineage says so
    msg, header = mdm("T03", "DS")
    retyped = Event.read(header, msg, person="P1", source_mrn="H100", protected=False, stored_type="DS",
                         lineage=("BH", "DS"))
    assert retyped.document_type == "DS" and route(retyped, NETWORK, EVERYWHERE, rules).destinations == ()


def test_facility_without_a_record_gets_nothing():
    decision = route(event("ADT", "A01"), NETWORK, {"GENHOSP": "H100"}, DEMO.routes)
    assert decision.destinations == ()
    assert reasons(decision) == {"GENHOSP": Reason.SENDER, "OAKNH": Reason.NO_RECORD, "HHCARE": Reason.NO_RECORD}
    assert decision.reason == "no destination (OAKNH: no_record; HHCARE: no_record)"


def test_a_rule_may_allow_a_facility_without_a_record():
    without = RouteConfig("admits to home health", messages=("ADT^A01",), to_codes=("HHCARE",))
    decision = route(event("ADT", "A01"), NETWORK, {"GENHOSP": "H100"}, [without])
    assert reasons(decision)["HHCARE"] is Reason.NO_RECORD
    allowed = RouteConfig("admits to home health", messages=("ADT^A01",), to_codes=("HHCARE",), allow_without_record=True)
    decision = route(event("ADT", "A01"), NETWORK, {"GENHOSP": "H100"}, [allowed])
    assert decision.destinations == (Destination("HHCARE", None, "admits to home health"),)
    assert reasons(decision)["OAKNH"] is Reason.NO_RECORD


def test_the_sender_never_gets_its_own_copy():
    rules = [RouteConfig("back to the hospital", to_codes=("GENHOSP",), allow_without_record=True)]
    for sender in ("GENHOSP", "OAKNH", "HHCARE"):
        decision = route(event("ADT", "A03", facility=sender), NETWORK, EVERYWHERE, rules)
        assert sender not in where(decision)
        assert reasons(decision)[sender] is Reason.SENDER


def test_a_nursing_home_update_reaches_the_hospital():
    decision = route(event("ADT", "A08", facility="OAKNH", source_mrn="N200"), NETWORK, EVERYWHERE, DEMO.routes)
    assert decision.destinations == (Destination("GENHOSP", "H100", DEFAULT),)


def test_demo_rule_emergency_visits_of_residents():
    er = event("ADT", "A04", patient_class="E")
    assert where(route(er, NETWORK, EVERYWHERE, DEMO.routes)) == {"OAKNH": "emergency visits of residents"}
    # an outpatient registration is not an emergency visit; nobody subscribes to A04
    outpatient = event("ADT", "A04", patient_class="O")
    decision = route(outpatient, NETWORK, EVERYWHERE, DEMO.routes)
    assert decision.destinations == ()
    assert reasons(decision) == {"GENHOSP": Reason.SENDER, "OAKNH": Reason.NOT_SUBSCRIBED, "HHCARE": Reason.NOT_SUBSCRIBED}
    # the rule names hospitals as senders only
    from_nh = event("ADT", "A04", facility="OAKNH", patient_class="E")
    assert route(from_nh, NETWORK, EVERYWHERE, DEMO.routes).destinations == ()


# -- rules: every condition given must match --------------------------------------


@pytest.mark.parametrize(
    "rule, hit",
    [
        (RouteConfig("r", to_kinds=("home_health",)), True),
        (RouteConfig("r", messages=("ADT^A0*",), to_kinds=("home_health",)), True),
        (RouteConfig("r", messages=("MDM^*",), to_kinds=("home_health",)), False),
        (RouteConfig("r", from_codes=("GENHOSP",), to_codes=("HHCARE",)), True),
        (RouteConfig("r", from_codes=("OAKNH",), to_codes=("HHCARE",)), False),
        (RouteConfig("r", from_kinds=("hospital",), to_codes=("HHCARE",)), True),
        (RouteConfig("r", from_kinds=("clinic",), to_codes=("HHCARE",)), False),
        (RouteConfig("r", patient_classes=("I", "E"), to_codes=("HHCARE",)), True),
        (RouteConfig("r", patient_classes=("O",), to_codes=("HHCARE",)), False),
        (RouteConfig("r", document_types=("DS",), to_codes=("HHCARE",)), False),  # an ADT has no TXA-2
        (RouteConfig("r", to_codes=("OAKNH",)), False),  # names another destination
        (RouteConfig("r", to_codes=("OAKNH",), to_kinds=("home_health",)), True),  # to plus to_kind
        (
            RouteConfig("r", messages=("ADT^A01",), from_codes=("GENHOSP",), from_kinds=("hospital",),
                        patient_classes=("I",), to_kinds=("home_health",)),
            True,
        ),
    ],
)
def test_rule_conditions(rule, hit):
    # HHCARE holds a record but does not subscribe to A01: only a rule sends it
    decision = route(event("ADT", "A01", patient_class="I"), NETWORK, EVERYWHERE, [rule])
    assert ("HHCARE" in where(decision)) is hit
    if hit:
        assert where(decision)["HHCARE"] == "r"
    else:
        assert reasons(decision)["HHCARE"] is Reason.NOT_SUBSCRIBED


def test_rule_by_document_type_and_kind():
    rule = RouteConfig("history and physicals", messages=("MDM^T02",), document_types=("HP",), to_kinds=("home_health",))
    assert where(route(event("MDM", "T02", document_type="HP"), NETWORK, EVERYWHERE, [rule])) == {
        "OAKNH": DEFAULT,
        "HHCARE": "history and physicals",
    }
    assert "HHCARE" not in where(route(event("MDM", "T02", document_type="OP"), NETWORK, EVERYWHERE, [rule]))


def test_default_wins_over_a_rule_and_the_first_rule_wins():
    rules = [RouteConfig("first", to_kinds=("home_health",)), RouteConfig("second", to_codes=("HHCARE", "OAKNH"))]
    assert where(route(event("ADT", "A03"), NETWORK, EVERYWHERE, rules)) == {"OAKNH": DEFAULT, "HHCARE": DEFAULT}
    assert where(route(event("ADT", "A02"), NETWORK, EVERYWHERE, rules)) == {"OAKNH": DEFAULT, "HHCARE": "first"}


def test_no_deliver_to_no_copy_whatever_the_rule():
    network = (facility("GENHOSP"), facility("OAKNH", "nursing_home", deliver_to=None))
    rules = [RouteConfig("r", to_codes=("OAKNH",), allow_without_record=True)]
    decision = route(event(), network, EVERYWHERE, rules)
    assert reasons(decision) == {"GENHOSP": Reason.SENDER, "OAKNH": Reason.NO_ENDPOINT}


def test_unknown_sender_matches_no_kind_rule():
    rules = [RouteConfig("r", from_kinds=("hospital",), to_codes=("HHCARE",))]
    decision = route(event("ADT", "A02", facility="ELSEWHERE"), NETWORK, EVERYWHERE, rules)
    assert where(decision) == {"OAKNH": DEFAULT}


# -- subscriptions -------------------------------------------------------------------


def test_subscriptions_with_document_types():
    f = facility("X", subscribe=("ADT^A0*", "MDM^T02^DS", "MDM^T1?^*", "MDM^T04^D?"))
    assert subscribed(f, "ADT", "A03")
    assert subscribed(f, "ADT", "A03", "DS")  # a TYPE^EVENT pattern ignores the document type
    assert subscribed(f, "MDM", "T02", "DS")
    assert not subscribed(f, "MDM", "T02", "HP")
    assert not subscribed(f, "MDM", "T02", "")
    assert subscribed(f, "MDM", "T10", "")
    assert subscribed(f, "MDM", "T04", "DI")
    assert not subscribed(f, "MDM", "T04", "HP")
    assert not subscribed(f, "MDM", "T01", "DS")


# -- merges and local events -----------------------------------------------------


def test_merge_goes_where_the_destination_holds_both_sides():
    merge = event("ADT", "A40", source_mrn="H100")
    survivor = {"GENHOSP": "H100", "OAKNH": "N200", "HHCARE": "C300"}
    retired = {"GENHOSP": "H999", "OAKNH": "N201", "HHCARE": "C300"}  # HHCARE already has one record
    # the demo nursing home and home-health agency do not subscribe to A40
    assert route(merge, NETWORK, survivor, DEMO.routes, prior_records=retired).destinations == ()
    everything = [replace(f, subscribe=("ADT^*",)) for f in NETWORK]
    decision = route(merge, everything, survivor, prior_records=retired)
    assert decision.destinations == (Destination("OAKNH", "N200", DEFAULT, prior_mrn="N201"),)
    assert reasons(decision)["HHCARE"] is Reason.MERGE_NOT_AT_DESTINATION
    # no record of the retired side at the destination, or no prior records at all: nothing
    assert route(merge, everything, survivor, prior_records={"GENHOSP": "H999"}).destinations == ()
    assert route(merge, everything, survivor).destinations == ()
    for legacy in ("A18", "A30", "A34", "A35", "A36", "A39"):
        assert legacy in MERGES


@pytest.mark.parametrize("trigger", sorted(CANCELS))
def test_a_cancel_goes_only_where_something_about_its_visit_went(trigger):
    """A site that joined the person's care after the admit would get a cancel of a stay it
    never heard of, and answer AE: a failed copy for an operator, and a disclosure for nothing."""
    network = [facility("GENHOSP"), facility("OAKNH", "nursing_home"), facility("HHCARE", "home_health")]
    everyone = RouteConfig("all", to_kinds=("nursing_home", "home_health"), allow_without_record=True)
    decision = route(event("ADT", trigger), network, EVERYWHERE, [everyone], told={"OAKNH"})
    assert where(decision) == {"OAKNH": DEFAULT}
    assert reasons(decision) == {"GENHOSP": Reason.SENDER, "HHCARE": Reason.NOT_TOLD}
    assert where(route(event("ADT", trigger), network, EVERYWHERE, told=None)) == {"OAKNH": DEFAULT,
                                                                                  "HHCARE": DEFAULT}
    # what is not a cancel goes by subscription whatever was sent before
    assert where(route(event("ADT", "A08"), network, EVERYWHERE, told=set())) == {"OAKNH": DEFAULT,
                                                                                  "HHCARE": DEFAULT}


def test_every_cancel_takes_back_an_event_of_a_visit():
    assert CANCELS.isdisjoint(LOCAL_EVENTS | MERGES)
    assert {"A11", "A12", "A13", "A38"} <= CANCELS and "A08" not in CANCELS and "A03" not in CANCELS


@pytest.mark.parametrize("trigger", sorted(LOCAL_EVENTS))
def test_local_events_are_never_copied(trigger):
    rules = [RouteConfig("all", to_kinds=("nursing_home", "home_health"), allow_without_record=True)]
    decision = route(event("ADT", trigger), NETWORK, EVERYWHERE, rules)
    assert decision.destinations == ()
    assert decision.reason == "a local event of the sender (never copied)"


# -- properties ----------------------------------------------------------------------------

CODES = ["GENHOSP", "OAKNH", "HHCARE", "CLINIC1", "LAB1"]
KINDS = ["hospital", "nursing_home", "home_health", "clinic", "lab"]


@st.composite
def networks(draw):
    out = []
    for code, kind in zip(CODES, KINDS):
        if draw(st.booleans()) or code == "GENHOSP":
            out.append(
                FacilityConfig(
                    code=code, name=code, kind=kind, authority=code,
                    deliver_to=draw(st.sampled_from([None, "127.0.0.1:1"])),
                    subscribe=tuple(draw(st.lists(st.sampled_from(["ADT^*", "ADT^A01", "MDM^*", "MDM^T02^DS", "*^*"]), max_size=3))),
                    exclude_documents=tuple(draw(st.lists(st.sampled_from(["BH", "DS"]), max_size=1))),
                )
            )
    return tuple(out)


rules_strategy = st.lists(
    st.builds(
        RouteConfig,
        name=st.sampled_from(["r1", "r2", "r3"]),
        messages=st.sampled_from([(), ("ADT^*",), ("MDM^T02",)]),
        from_kinds=st.sampled_from([(), ("hospital",), ("lab",)]),
        patient_classes=st.sampled_from([(), ("I",)]),
        document_types=st.sampled_from([(), ("DS",)]),
        to_codes=st.sampled_from([(), ("OAKNH",), ("GENHOSP", "LAB1")]),
        to_kinds=st.sampled_from([("home_health",), ("clinic", "hospital"), ()]),
        allow_without_record=st.booleans(),
    ),
    max_size=3,
)


@given(
    network=networks(),
    rules=rules_strategy,
    sender=st.sampled_from(CODES),
    message=st.sampled_from([("ADT", "A01"), ("ADT", "A03"), ("ADT", "A08"), ("MDM", "T02"), ("MDM", "T01")]),
    document=st.sampled_from(["", "DS", "BH", "HP"]),
    patient_class=st.sampled_from(["", "I", "E"]),
    protected=st.booleans(),
    records=st.dictionaries(st.sampled_from(CODES), st.sampled_from(["M1", "M2", "M3"])),
)
def test_privacy_invariants(network, rules, sender, message, document, patient_class, protected, records):
    ev = Event(sender, *message, person="P1", source_mrn="S1", patient_class=patient_class,
               document_type=document if message[0] == "MDM" else "", protected=protected)
    decision = route(ev, network, records, rules)
    by_code = {f.code: f for f in network}
    # every configured facility is decided exactly once
    decided = [d.facility for d in decision.destinations] + [s.facility for s in decision.skipped]
    assert sorted(decided) == sorted(by_code)
    if protected:
        assert decision.destinations == ()
    allowing = {r.name for r in rules if r.allow_without_record}
    for d in decision.destinations:
        f = by_code[d.facility]
        assert d.facility != sender
        assert f.deliver_to
        assert ev.document_type not in f.exclude_documents
        assert d.mrn == records.get(d.facility)
        if d.mrn is None:
            assert d.why in allowing
        if d.why == DEFAULT:
            assert subscribed(f, ev.message_type, ev.event, ev.document_type)


@given(
    network=networks(),
    rules=rules_strategy,
    sender=st.sampled_from(CODES),
    message=st.sampled_from([("ADT", "A01"), ("ADT", "A08"), ("MDM", "T02"), ("MDM", "T08")]),
    document=st.sampled_from(["", "DS", "BH"]),
    parent=st.sampled_from(["", "DS", "BH"]),
    records=st.dictionaries(st.sampled_from(CODES), st.sampled_from(["M1", "M2"])),
)
def test_recheck_under_the_same_configuration_withholds_nothing_routing_sent(
        network, rules, sender, message, document, parent, records):
    rules = list({r.name: r for r in reversed(rules)}.values())[::-1]  # names are unique in a config
    types = tuple(dict.fromkeys(t for t in (document, parent) if t)) if message[0] == "MDM" else ()
    ev = Event(sender, *message, person="P1", source_mrn="S1", patient_class="I",
               document_type=document if message[0] == "MDM" else "", document_types=types)
    for d in route(ev, network, records, rules).destinations:
        assert recheck(ev, d.facility, d.why, network, rules) is None


# -- checking a queued copy again under the configuration running now ------------------


def queued_event(message_type="MDM", trigger="T02", document_type="BH", document_types=None,
                 confidentiality=()) -> Event:
    if document_types is None:
        document_types = (document_type,) if document_type else ()
    return Event("GENHOSP", message_type, trigger, document_type=document_type, document_types=document_types,
                 confidentiality=confidentiality)


def test_recheck_a_copy_the_configuration_still_sends():
    hh = facility("HHCARE", "home_health", subscribe=("MDM^*",))
    assert recheck(queued_event(), "HHCARE", DEFAULT, [hh]) is None
    assert recheck(queued_event("ADT", "A08", ""), "HHCARE", None, [hh]) is None  # why unknown: not checked


def test_recheck_a_facility_removed_or_without_deliver_to():
    hh = facility("HHCARE", "home_health")
    assert recheck(queued_event(), "HHCARE", DEFAULT, [facility("OAKNH")]) is Reason.NOT_CONFIGURED
    assert recheck(queued_event(), "HHCARE", DEFAULT, []) is Reason.NOT_CONFIGURED
    assert recheck(queued_event(), "HHCARE", DEFAULT, [replace(hh, deliver_to=None)]) is Reason.NO_ENDPOINT


def test_recheck_an_excluded_document_type_whatever_the_route():
    """The audit's case: five BH notes queued for HHCARE, restarted with exclude_documents = ["BH"]."""
    hh = facility("HHCARE", "home_health", exclude_documents=("BH",))
    rule = RouteConfig("notes", messages=("MDM^*",), to_codes=("HHCARE",))
    assert recheck(queued_event(), "HHCARE", DEFAULT, [hh]) is Reason.EXCLUDED_DOCUMENT
    assert recheck(queued_event(), "HHCARE", "notes", [hh], [rule]) is Reason.EXCLUDED_DOCUMENT
    # an edit with TXA-2 empty (the stored type), an addendum of a BH note (the parent's type)
    edit = queued_event(trigger="T08", document_type="BH")
    addendum = queued_event(trigger="T02", document_type="DS", document_types=("DS", "BH"))
    orphan = queued_event(trigger="T08", document_type="", document_types=("BH",))
    for ev in (edit, addendum, orphan):
        assert recheck(ev, "HHCARE", DEFAULT, [hh]) is Reason.EXCLUDED_DOCUMENT
    assert recheck(queued_event(document_type="DS"), "HHCARE", DEFAULT, [hh]) is None


def test_recheck_a_subscription_dropped():
    gh = facility("GENHOSP", subscribe=("ADT^A08", "ADT^A31"))
    a08 = queued_event("ADT", "A08", "")
    assert recheck(a08, "GENHOSP", DEFAULT, [gh]) is None
    assert recheck(a08, "GENHOSP", DEFAULT, [replace(gh, subscribe=("ADT^A31",))]) is Reason.NOT_SUBSCRIBED
    # a document-type subscription is matched against the copy's own type
    hh = facility("HHCARE", "home_health", subscribe=("MDM^T02^DS",))
    assert recheck(queued_event(document_type="DS"), "HHCARE", DEFAULT, [hh]) is None
    assert recheck(queued_event(document_type="HP"), "HHCARE", DEFAULT, [hh]) is Reason.NOT_SUBSCRIBED
    # a rule's copy does not need a subscription
    rule = RouteConfig("admissions", messages=("ADT^A01",), to_codes=("GENHOSP",))
    assert recheck(queued_event("ADT", "A01", ""), "GENHOSP", "admissions", [gh], [rule]) is None


def test_recheck_a_rule_removed_or_no_longer_naming_the_facility():
    oak = facility("OAKNH", "nursing_home", subscribe=())
    by_code = RouteConfig("emergency", messages=("ADT^A04",), to_codes=("OAKNH",))
    by_kind = RouteConfig("emergency", to_kinds=("nursing_home",))
    ev = queued_event("ADT", "A04", "")
    assert recheck(ev, "OAKNH", "emergency", [oak], [by_code]) is None
    assert recheck(ev, "OAKNH", "emergency", [oak], [by_kind]) is None
    assert recheck(ev, "OAKNH", "emergency", [oak], []) is Reason.RULE_REMOVED
    assert recheck(ev, "OAKNH", "emergency", [oak], [RouteConfig("other", to_codes=("OAKNH",))]) is Reason.RULE_REMOVED
    assert recheck(ev, "OAKNH", "emergency", [oak], [replace(by_code, to_codes=("HHCARE",))]) is Reason.RULE_REMOVED


# -- reading an event from a message -------------------------------------------------


def read(text: str) -> tuple:
    raw = text.replace("\n", "\r").encode()
    header = read_header(raw)
    return header, Message(raw.decode(), header.delimiters)


def test_event_read_from_a_message():
    header, msg = read(
        "MSH|^~\\&|APP|GENHOSP|||20240101||MDM^T02^MDM_T02|C1|P|2.5\n"
        "EVN|T02|20240101\nPID|1||H100^^^GENHOSP^MR||DOE^JANE\nPD1||||||||||||Y\n"
        "PV1|1|i\nTXA|1|ds|TX|||||||||DOC1|||||AU||AV\nOBX|1|TX|||text"
    )
    ev = Event.read(header, msg, person="P1", source_mrn="H100", protected=bool(protection(msg)))
    assert ev == Event("GENHOSP", "MDM", "T02", "P1", "H100", "I", "DS", True, ("DS",))


@pytest.mark.parametrize(
    "pd1, expected",
    [(None, None), ("PD1|1", None), ("PD1||||||||||||Y", True), ("PD1||||||||||||y", True),
     ("PD1||||||||||||N", False), ('PD1||||||||||||""', False), ("PD1||||||||||||Y^Yes^HL70136", True),
     # anything else is read as Y, and the sender told (a W ERR): an opt-out must not fail open
     ("PD1||||||||||||X", True), ("PD1||||||||||||YES", True), ("PD1||||||||||||1", True),
     # Y and N repeated, or N with a subcomponent (a verification audit: read as N, silently)
     ("PD1||||||||||||N~Y", True), ("PD1||||||||||||Y~N", True), ("PD1||||||||||||N&Y", True),
     ("PD1||||||||||||N~N", False), ("PD1||||||||||||\\X59\\", True)],
)
def test_protection_indicator(pd1, expected):
    lines = ["MSH|^~\\&|APP|GENHOSP|||20240101||ADT^A08|C1|P|2.5", "EVN|A08|20240101", "PID|1||H100"]
    if pd1:
        lines.append(pd1)
    _, msg = read("\n".join(lines))
    assert protection(msg) is expected
    assert protection_unreadable(msg) is (pd1 is not None and pd1.startswith("PD1|||||||||||")
                                          and pd1[15:] in ("X", "YES", "1", "N~Y", "Y~N", "N&Y"))
