"""exchange.matching.decide: link / review / new, and the rules that keep it safe. Synthetic people only."""
from __future__ import annotations

from datetime import date

from exchange.matching.decide import Action, Decision, Reason, Record, decide
from exchange.matching.model import default_model

from tests.test_matching_features import person

MODEL = default_model()
HOUSE = dict(street="12 Main Street", city="Springfield", postcode="62704", phone="217-555-0101")


def rec(facility, mrn, features, person_id=None):
    return Record(facility, mrn, person_id, features)


def test_the_same_woman_at_three_facilities_is_one_person():
    """Issue 4's example: "Elizabeth Hanson", "Liz Hansen" and "Elizabeth Hanson-Moore"."""
    nursing = rec("OAKNH", "OA917082", person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE), "P1")
    hospital = rec("GENHOSP", "GH-44107", person("Hansen", "Liz", birth="19500304", sex="F", **HOUSE))
    d = decide(hospital, [nursing], MODEL)
    assert (d.action, d.person) == (Action.LINK, "P1")
    assert d.reasons == (Reason.ABOVE_UPPER,)
    assert d.matches[0].score.level("given") == "nickname"
    moved = person("Hanson-Moore", "Elizabeth", birth="19500304", sex="F", street="40 Oak Ave", postcode="62711")
    home = rec("HHCARE", "HH-3391", moved)
    d = decide(home, [nursing, rec("GENHOSP", "GH-44107", hospital.features, "P1")], MODEL)
    assert (d.action, d.person) == (Action.LINK, "P1")
    assert {m.mrn for m in d.matches} == {"OA917082", "GH-44107"}


def test_twins_are_not_linked():
    john = rec("A", "1", person("Smith", "John", birth="19800512", sex="M", **HOUSE), "P1")
    james = rec("B", "2", person("Smith", "James", birth="19800512", sex="M", **HOUSE))
    d = decide(james, [john], MODEL)
    assert d.action is not Action.LINK
    assert d.score < MODEL.upper
    assert "household" in d.matches[0].score.rules[0]
    # fraternal twins of different sex, similar names
    daniel = rec("A", "3", person("Smith", "Daniel", birth="19800512", sex="M", **HOUSE), "P3")
    danielle = rec("B", "4", person("Smith", "Danielle", birth="19800512", sex="F", **HOUSE))
    assert decide(danielle, [daniel], MODEL).action is not Action.LINK
    # twins whose SSNs were issued in sequence
    a = rec("A", "5", person("Smith", "Emma", birth="19800512", sex="F", ssn="123456780", **HOUSE), "P5")
    b = rec("B", "6", person("Smith", "Olivia", birth="19800512", sex="F", ssn="123456781", **HOUSE))
    assert decide(b, [a], MODEL).action is not Action.LINK


def test_father_and_son_are_not_linked():
    father = rec("A", "1", person("Smith", "John", suffix="Sr", birth="19500304", sex="M", **HOUSE), "P1")
    son = rec("B", "2", person("Smith", "John", suffix="Jr", birth="19750611", sex="M", **HOUSE))
    d = decide(son, [father], MODEL)
    assert d.action is Action.NEW
    # without suffixes: the birth date tells them apart
    son = rec("B", "2", person("Smith", "John", birth="19750611", sex="M", **HOUSE))
    assert decide(son, [father], MODEL).action is Action.NEW


def test_jr_and_sr_disagreeing_is_never_an_automatic_link():
    """Even with the birth date copied from the father's chart."""
    father = rec("A", "1", person("Smith", "John", suffix="Sr", birth="19500304", sex="M", **HOUSE), "P1")
    son = rec("B", "2", person("Smith", "John", suffix="Jr", birth="19500304", sex="M", **HOUSE))
    d = decide(son, [father], MODEL)
    assert d.action is not Action.LINK
    assert d.matches[0].score.level("suffix") == "disagree"
    same = rec("B", "2", person("Smith", "John", suffix="Sr", birth="19500304", sex="M", **HOUSE))
    assert decide(same, [father], MODEL).action is Action.LINK


def test_spouses_are_not_linked():
    husband = rec("A", "1", person("Smith", "John", birth="19500304", sex="M", **HOUSE), "P1")
    wife = rec("B", "2", person("Smith", "Mary", birth="19520911", sex="F", **HOUSE))
    d = decide(wife, [husband], MODEL)
    assert d.action is Action.NEW
    assert d.score < MODEL.lower


def test_same_facility_duplicate_goes_to_review():
    first = rec("A", "1", person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE), "P1")
    duplicate = rec("A", "2", person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE))
    d = decide(duplicate, [first], MODEL)
    assert d.action is Action.REVIEW
    assert Reason.SAME_FACILITY in d.reasons
    assert d.person == "P1" and [m.mrn for m in d.matches] == ["1"]


def test_a_link_that_would_put_two_records_of_one_facility_in_a_person_goes_to_review():
    """Facility A's record 2 matches B's record, whose person already holds A's record 1."""
    strong = person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE)
    held_a = rec("A", "1", person("Hanson", "Beth", birth="19500304", sex="F"), "P1")
    held_b = rec("B", "7", strong, "P1")
    d = decide(rec("A", "2", strong), [held_a, held_b], MODEL)
    assert d.action is Action.REVIEW and Reason.SAME_FACILITY in d.reasons


def test_not_a_match_is_sticky():
    features = person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE)
    other = rec("A", "1", features, "P1")
    subject = rec("B", "2", features)
    assert decide(subject, [other], MODEL).action is Action.LINK
    d = decide(subject, [other], MODEL, not_a_match={("A", "1")})
    assert d.action is Action.NEW
    assert Reason.NOT_A_MATCH in d.reasons
    # the whole person is out, not just the record named
    sibling_record = rec("C", "9", features, "P1")
    assert decide(subject, [other, sibling_record], MODEL, not_a_match={("A", "1")}).action is Action.NEW
    # another person is still a candidate
    elsewhere = rec("C", "5", features, "P2")
    d = decide(subject, [other, elsewhere], MODEL, not_a_match={("A", "1")})
    assert (d.action, d.person) == (Action.LINK, "P2")


def test_manual_links_are_never_broken_automatically():
    mine = person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE)
    stranger = person("Kowalczyk", "Jan", birth="19801111", sex="M", street="1 Elm Rd", postcode="10001")
    linked = rec("B", "2", mine, "P1")
    d = decide(linked, [rec("A", "1", mine, "P1")], MODEL, manual=True)
    assert (d.action, d.person, d.reasons) == (Action.KEEP, "P1", (Reason.MANUAL_KEPT,))
    # the technician linked it to a record that no longer looks like it: review, link kept
    d = decide(linked, [rec("A", "1", stranger, "P1")], MODEL, manual=True)
    assert (d.action, d.person) == (Action.REVIEW, "P1")
    assert Reason.LINK_LOOKS_WRONG in d.reasons and d.matches
    # a better person elsewhere does not move it either
    d = decide(linked, [rec("A", "1", mine, "P1"), rec("C", "3", mine, "P2")], MODEL, manual=True)
    assert (d.action, d.person) == (Action.KEEP, "P1")
    # split off by a technician (manual, alone in its person): stays alone
    d = decide(rec("B", "2", mine, "P9"), [rec("A", "1", mine, "P1")], MODEL, manual=True)
    assert (d.action, d.person) == (Action.KEEP, "P9")


def test_an_update_that_makes_an_automatic_link_look_wrong_opens_a_review():
    """A08/A31 re-score a record: the link stays until a technician decides."""
    mine = person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE)
    changed = person("Kowalczyk", "Jan", birth="19801111", sex="M", street="1 Elm Rd", postcode="10001")
    others = [rec("A", "1", mine, "P1")]
    d = decide(rec("B", "2", mine, "P1"), others, MODEL)
    assert (d.action, d.person, d.reasons) == (Action.KEEP, "P1", (Reason.LINK_KEPT,))
    d = decide(rec("B", "2", changed, "P1"), others, MODEL)
    assert (d.action, d.person) == (Action.REVIEW, "P1") and Reason.LINK_LOOKS_WRONG in d.reasons


def test_a_record_alone_in_its_person_can_still_be_linked_on_update():
    features = person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE)
    d = decide(rec("B", "2", features, "P9"), [rec("A", "1", features, "P1")], MODEL)
    assert (d.action, d.person) == (Action.LINK, "P1")
    d = decide(rec("B", "2", features, "P9"), [], MODEL)
    assert (d.action, d.person) == (Action.KEEP, "P9")


def test_two_persons_above_the_upper_threshold_go_to_review():
    features = person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE)
    d = decide(rec("C", "3", features), [rec("A", "1", features, "P1"), rec("B", "2", features, "P2")], MODEL)
    assert d.action is Action.REVIEW and Reason.TWO_PERSONS in d.reasons
    assert {m.person for m in d.matches} == {"P1", "P2"}


def test_the_best_person_wins_and_thresholds_decide():
    target = person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE)
    near = person("Hanson", "Elizabeth", birth="19500304", sex="F")
    weak = person("Hanson", "Elizabeth", birth="1950")
    far = person("Jones", "Mary", birth="19701212", sex="F")
    d = decide(rec("B", "9", target), [rec("A", "1", far, "P1"), rec("A", "2", target, "P2")], MODEL)
    assert (d.action, d.person) == (Action.LINK, "P2")
    d = decide(rec("B", "9", weak), [rec("A", "2", near, "P2")], MODEL)
    assert d.action is Action.REVIEW and d.reasons == (Reason.BETWEEN,)
    assert MODEL.lower <= d.score < MODEL.upper
    d = decide(rec("B", "9", target), [rec("A", "1", far, "P1")], MODEL)
    assert (d.action, d.person, d.reasons) == (Action.NEW, None, (Reason.BELOW_LOWER,))
    d = decide(rec("B", "9", target), [], MODEL)
    assert (d.action, d.score, d.reasons) == (Action.NEW, None, (Reason.NO_CANDIDATES,))


def test_the_record_itself_is_never_its_own_candidate():
    features = person("Hanson", "Elizabeth", birth="19500304")
    d = decide(rec("A", "1", features), [rec("A", "1", features, "P1")], MODEL)
    assert d.action is Action.NEW and d.matches == ()


def test_decisions_pickle():
    import pickle

    features = person("Hanson", "Elizabeth", birth="19500304", sex="F", **HOUSE)
    d = decide(rec("B", "2", features), [rec("A", "1", features, "P1")], MODEL)
    again = pickle.loads(pickle.dumps(d))
    assert again == d and isinstance(again, Decision)


def test_a_weaker_same_facility_look_alike_comes_back_as_a_duplicate_to_review():
    """B's John Smith links to A's; another, weaker, John Smith of B is reported, not linked, and does not block."""
    features = person("Smith", "John", birth="19500304", sex="M", ssn="123456780", **HOUSE)
    namesake = person("Smith", "John", birth="1950", sex="M")
    d = decide(rec("B", "2", features), [rec("A", "1", features, "P1"), rec("B", "7", namesake, "P7")], MODEL)
    assert (d.action, d.person) == (Action.LINK, "P1")
    assert Reason.SAME_FACILITY in d.reasons
    assert [m.mrn for m in d.duplicates] == ["7"]
    assert [m.mrn for m in d.matches] == ["1"]


# --- cautions: above upper, but shaped like two people of one family (a black-box audit's cases) ---------


def test_a_decade_apart_with_the_same_name_and_address_is_parent_and_child_not_a_typo():
    home = dict(street="300 Elm Street", city="Fresno", postcode="93701", phone="559-555-0190")
    father = rec("GENHOSP", "G1", person("Okonkwo", "Samuel", birth="19500704", sex="M", **home), "P1")
    son = rec("HHCARE", "H1", person("Okonkwo", "Samuel", birth="19800704", sex="M", **home))
    d = decide(son, [father], MODEL)
    assert d.action is Action.REVIEW and Reason.PARENT_AND_CHILD in d.reasons
    # a typo in the year's last digit still links
    typo = rec("HHCARE", "H2", person("Okonkwo", "Samuel", birth="19510704", sex="M", **home))
    assert decide(typo, [father], MODEL).action is Action.LINK


def test_twins_with_sequential_ssns_and_near_names_are_not_linked():
    john = rec("GENHOSP", "G1", person("Pemberton", "John", birth="19900612", sex="M", ssn="366025510", **HOUSE), "P1")
    jon = rec("OAKNH", "O1", person("Pemberton", "Jon", birth="19900612", sex="M", ssn="366025511", **HOUSE))
    d = decide(jon, [john], MODEL)
    assert d.action is Action.REVIEW and Reason.POSSIBLE_TWIN in d.reasons


def test_twins_born_either_side_of_midnight_with_sequential_ssns_are_not_linked():
    """Found by a soak audit: Kristen (1 September) and Kirsten (31 August) with SSNs ...952 and
    ...953 and one phone linked as one person, and Kirsten's notes were filed in Kristen's chart."""
    kristen = rec("GENHOSP", "G1", person("Delacroix", "Kristen", birth="20170901", ssn="599987952", **HOUSE), "P1")
    kirsten = rec("RIVCLINIC", "C1", person("Delacroix", "Kirsten", birth="20170831", ssn="599987953", **HOUSE))
    d = decide(kirsten, [kristen], MODEL)
    assert d.action is Action.REVIEW and Reason.POSSIBLE_TWIN in d.reasons
    # one person with a typo in the SSN and a birth date a day off (the same given name) still links
    typo = rec("RIVCLINIC", "C2", person("Delacroix", "Kristen", birth="20170831", ssn="599987953", **HOUSE))
    assert decide(typo, [kristen], MODEL).action is Action.LINK


def test_a_spouses_ssn_on_the_wrong_chart_does_not_link_two_people():
    """PID-19 filled with the guarantor's SSN: given name, birth date and sex all another person's."""
    home = dict(street="1201 Prairie Ave", city="Wichita", postcode="67202", phone="316-555-0789")
    richard = rec("GENHOSP", "G1", person("Blackwood", "Richard", birth="19530611", sex="M", ssn="509123384", **home),
                  "P1")
    dorothy = rec("OAKNH", "O1", person("Blackwood", "Dorothy", birth="19560224", sex="F", ssn="509123384", **home))
    d = decide(dorothy, [richard], MODEL)
    assert d.action is Action.REVIEW and Reason.SSN_ONLY in d.reasons


def test_no_birth_date_and_a_generational_suffix_is_not_enough_to_link():
    senior = rec("GENHOSP", "G1", person("Delaney", "Patrick", suffix="Sr", birth="19490803", sex="M",
                                         ssn="255104471", **HOUSE), "P1")
    unknown = rec("HHCARE", "H1", person("Delaney", "Patrick", sex="M", **HOUSE))
    d = decide(unknown, [senior], MODEL)
    assert d.action is not Action.LINK
    assert d.action is Action.NEW or Reason.NO_BIRTH_DATE in d.reasons


def test_a_record_like_one_of_a_persons_records_but_contradicting_another_is_not_linked():
    """A ~ B (B has A's SSN: a birth date typed wrong), C ~ B, but C is not A: no chain."""
    home = dict(street="640 Juniper Hollow", city="Flagstaff", postcode="86001", phone="928-555-0642")
    mother = rec("GENHOSP", "G1", person("Brannigan", "Katherine", birth="19450316", sex="F", ssn="433218765", **home),
                 "P1")
    mixed = rec("OAKNH", "O1", person("Brannigan", "Katherine", birth="19790622", sex="F", ssn="433218765", **home),
                "P1")
    daughter = rec("HHCARE", "H1", person("Brannigan", "Katherine", birth="19790622", sex="F", **home))
    d = decide(daughter, [mother, mixed], MODEL)
    assert d.action is Action.REVIEW and Reason.CONFLICTING_MEMBER in d.reasons


# -- found by a black-box audit of the live exchange: false automatic links ------------------------


def review_because(record, candidates, reason):
    d = decide(record, candidates, MODEL)
    assert d.action is Action.REVIEW and reason in d.reasons, (d.action, d.reasons, d.score)
    return d


def test_one_ssn_on_two_birth_dates_is_a_family_members_ssn():
    """A newborn under the mother's SSN, brothers, a son under his father's (same name), spouses."""
    mother = rec("GENHOSP", "G1", person("Okafor", "Adaeze", birth="19920411", sex="F", ssn="512448811", **HOUSE), "P1")
    baby = rec("HHCARE", "H1", person("Okafor", "Chioma", birth="20260301", sex="F", ssn="512448811", **HOUSE))
    review_because(baby, [mother], Reason.SSN_ONLY)
    father = rec("GENHOSP", "G2", person("Kingsford", "Thomas", birth="19550607", sex="M", ssn="401223344"), "P2")
    son = rec("OAKNH", "O2", person("Kingsford", "Thomas", birth="19830607", sex="M", ssn="401223344"))
    review_because(son, [father], Reason.SSN_ONLY)
    # the same person with a typo in the birth date still links on the SSN
    typo = rec("OAKNH", "O3", person("Kingsford", "Thomas", birth="19550706", sex="M", ssn="401223344"))
    assert decide(typo, [father], MODEL).action is Action.LINK


def test_twins_with_close_given_names_and_newborns_are_reviewed():
    kristen = rec("GENHOSP", "G1", person("Lindqvist", "Kristen", birth="20010203", sex="F", **HOUSE), "P1")
    kirsten = rec("OAKNH", "O1", person("Lindqvist", "Kirsten", birth="20010203", sex="F", **HOUSE))
    review_because(kirsten, [kristen], Reason.POSSIBLE_TWIN)
    isabel = rec("GENHOSP", "G2", person("Moreau", "Isabel", birth="20010203", sex="F", **HOUSE), "P2")
    isabella = rec("OAKNH", "O2", person("Moreau", "Isabella", birth="20010203", sex="F", **HOUSE))
    review_because(isabella, [isabel], Reason.POSSIBLE_TWIN)
    a = rec("GENHOSP", "G3", person("Okafor", "Baby Girl", "A", birth="20260301", sex="F", **HOUSE), "P3")
    b = rec("HHCARE", "H3", person("Okafor", "Baby Girl", "B", birth="20260301", sex="F", **HOUSE))
    review_because(b, [a], Reason.NEWBORN)
    c = rec("HHCARE", "H4", person("Okafor", "Babygirl", "B", birth="20260301", sex="F", **HOUSE))
    review_because(c, [a], Reason.NEWBORN)
    # a nickname is the same person, not a twin
    liz = rec("OAKNH", "O5", person("Moreau", "Liz", birth="19700203", sex="F", **HOUSE))
    assert decide(liz, [rec("GENHOSP", "G5", person("Moreau", "Elizabeth", birth="19700203", sex="F", **HOUSE),
                            "P5")], MODEL).action is Action.LINK


def test_a_common_name_and_a_birthday_in_two_towns_are_two_people():
    albany = rec("GENHOSP", "G1", person("Smith", "John", birth="19700101", sex="M", street="5 Elm St", city="Albany",
                                         postcode="12203", phone="518-555-0101"), "P1")
    tucson = rec("OAKNH", "O1", person("Smith", "John", birth="19700101", sex="M", street="9 Cactus Rd",
                                       city="Tucson", postcode="85701", phone="520-555-0199"))
    review_because(tucson, [albany], Reason.NAME_AND_BIRTH_DATE_ONLY)
    # an uncommon surname (issue 4's married, moved Elizabeth Hanson-Moore) still links
    hanson = rec("OAKNH", "O2", person("Hanson", "Elizabeth", birth="19500304", sex="F", street="12 Main Street",
                                       city="Springfield", postcode="62704"), "P2")
    moved = rec("HHCARE", "H2", person("Hanson-Moore", "Elizabeth", birth="19500304", sex="F", street="40 Oak Ave",
                                       postcode="62711"))
    assert decide(moved, [hanson], MODEL).action is Action.LINK
    # the index's own frequencies decide once the match-model job has measured them
    rare_here = MODEL.replace(tf={"family": {"smith": 0.0001}}, tf_floor={"family": 0.0001})
    assert Reason.NAME_AND_BIRTH_DATE_ONLY not in decide(tucson, [albany], rare_here).reasons


def test_no_birth_date_and_no_ssn_is_never_enough():
    brown = rec("GENHOSP", "G1", person("Brown", "James", sex="M", street="1 Oak St", postcode="30301"), "P1")
    other = rec("OAKNH", "O1", person("Brown", "James", sex="M", street="7 Pine St", postcode="30301"))
    d = decide(other, [brown], MODEL)
    assert d.action is not Action.LINK


def test_an_update_that_makes_a_linked_record_a_twin_takes_the_link_back():
    emma = rec("GENHOSP", "G1", person("Castellano", "Emma", birth="20050101", sex="F", **HOUSE), "P1")
    olivia = rec("OAKNH", "O1", person("Castellano", "Olivia", birth="20050101", sex="F", **HOUSE), "P1")
    d = decide(olivia, [emma], MODEL)
    assert d.action is Action.REVIEW and Reason.LINK_LOOKS_WRONG in d.reasons
    henri_sr = rec("OAKNH", "O2", person("Laurent", "Henri", suffix="SR", birth="19500101", sex="M", **HOUSE), "P2")
    henri = rec("GENHOSP", "G2", person("Laurent", "Henri", birth="19800101", sex="M", **HOUSE), "P2")
    d = decide(henri_sr, [henri], MODEL)
    assert d.action is Action.REVIEW and Reason.LINK_LOOKS_WRONG in d.reasons


# -- a later black-box audit: relatives under one SSN, twins told apart by their middle names --------------


def test_a_relatives_ssn_on_another_birth_date_is_reviewed_even_at_the_same_home():
    """An SSN copied onto a relative's record (an overlay): the birth date, no typo of the other, tells them apart
    whatever the names, surname and home share; so does JR against SR."""
    home = dict(street="27 Linden St", city="Boise", postcode="83702", phone="208-555-0101")
    cases = [
        (("Kessler", "Nora", "19800101", "F"), ("Kessler", "Nina", "19830606", "F")),  # sisters
        (("Mbeki", "Sofia", "19990101", "F"), ("Mbeki", "Sara", "20030505", "F")),
        (("Brannigan", "Robert", "19550410", "M"), ("Brannigan", "Robert", "19830922", "M")),  # father and son
        (("Delacroix", "Marie", "19680704", "F"), ("Delacroix", "Marie", "19940211", "F")),  # mother and daughter
        (("Santos", "Maria", "19680704", "F"), ("Okafor", "Chioma", "19940211", "F")),  # another surname too
    ]
    for (fa, ga, ba, sa), (fb, gb, bb, sb) in cases:
        a = rec("GENHOSP", "G1", person(fa, ga, birth=ba, sex=sa, ssn="412557001", **home), "P1")
        b = rec("OAKNH", "O1", person(fb, gb, birth=bb, sex=sb, ssn="412557001", **home))
        d = review_because(b, [a], Reason.SSN_ONLY)
        assert d.score >= MODEL.upper  # the score alone would have linked them
    junior = rec("GENHOSP", "G2", person("Jablonski", "Thomas", suffix="JR", birth="19580101", sex="M",
                                         ssn="733221000", **home), "P2")
    review_because(rec("OAKNH", "O2", person("Jablonski", "Thomas", birth="19861130", sex="M", ssn="733221000",
                                             **home)), [junior], Reason.SSN_ONLY)
    senior = rec("OAKNH", "O3", person("Jablonski", "Thomas", suffix="SR", birth="19580101", sex="M",
                                       ssn="733221000", **home))
    review_because(senior, [junior], Reason.SSN_ONLY)  # the son's chart under his father's birth date and SSN


def test_one_person_with_a_typo_in_the_birth_date_still_links_on_the_ssn():
    home = dict(street="27 Linden St", city="Boise", postcode="83702", phone="208-555-0101")
    robert = rec("GENHOSP", "G1", person("Brannigan", "Robert", birth="19550410", sex="M", ssn="412557001", **home),
                 "P1")
    for typo in ("19550401",  # the day's two digits swapped
                 "19550411",  # one digit
                 "19551004",  # day and month swapped
                 "19550612"):  # the same year, another day
        d = decide(rec("OAKNH", "O1", person("Brannigan", "Robert", birth=typo, sex="M", ssn="412557001", **home)),
                   [robert], MODEL)
        assert (d.action, d.person) == (Action.LINK, "P1"), (typo, d.reasons)
    # one digit of the decade, at the same home: the daughter or son of one name under the parent's SSN as
    # well as a typo (found by two audits: linked); a review
    review_because(rec("OAKNH", "O4", person("Brannigan", "Robert", birth="19850410", sex="M", ssn="412557001",
                                             **home)), [robert], Reason.SSN_ONLY)
    bob = rec("OAKNH", "O2", person("Brannigan", "Bob", birth="19550410", sex="M", ssn="412557001", **home))
    assert decide(bob, [robert], MODEL).action is Action.LINK  # a nickname
    sex_typo = rec("OAKNH", "O3", person("Brannigan", "Robert", birth="19550410", sex="F", ssn="412557001", **home))
    assert decide(sex_typo, [robert], MODEL).action is Action.LINK  # the sex alone: a typo


def test_one_ssn_on_a_girl_and_a_boy_of_other_names_is_two_people():
    """Anna and Adam under their parent's SSN: the sex and the given name disagree, whatever the birth dates."""
    home = dict(street="27 Linden St", city="Boise", postcode="83702", phone="208-555-0101")
    anna = rec("GENHOSP", "G1", person("Lundgren", "Anna", birth="20010303", sex="F", ssn="845123001", **home), "P1")
    for birth in ("20040707", "20010303"):  # siblings; twins with their mother's SSN
        adam = rec("OAKNH", "O1", person("Lundgren", "Adam", birth=birth, sex="M", ssn="845123001", **home))
        review_because(adam, [anna], Reason.SSN_ONLY)
    daniel = rec("GENHOSP", "G2", person("Lundgren", "Daniel", birth="20010303", sex="M", ssn="845123001", **home),
                 "P2")
    danielle = rec("OAKNH", "O2", person("Lundgren", "Danielle", birth="20010303", sex="F", ssn="845123001", **home))
    review_because(danielle, [daniel], Reason.SSN_ONLY)


def test_another_given_name_under_one_ssn_needs_the_birth_date_to_agree():
    home = dict(street="27 Linden St", city="Boise", postcode="83702", phone="208-555-0101")
    sofia = rec("GENHOSP", "G1", person("Mbeki", "Sofia", birth="19990101", sex="F", ssn="845123002", **home), "P1")
    for birth in (None, "1999", "19990909"):  # no birth date, only the year, another day of the year
        sara = rec("OAKNH", "O1", person("Mbeki", "Sara", birth=birth, sex="F", ssn="845123002", **home))
        review_because(sara, [sofia], Reason.SSN_ONLY)
    # with the birth date the same, another given name under one SSN is twins under their parent's SSN (found
    # by a soak audit: linked, and each twin's admissions went to the other's sites); FEBRL 4's corruption
    # that replaces a given name makes ~250 true pairs of this shape, which go to a review
    same_day = rec("OAKNH", "O2", person("Mbeki", "Thandiwe", birth="19990101", sex="F", ssn="845123002", **home))
    review_because(same_day, [sofia], Reason.POSSIBLE_TWIN)


def test_relatives_under_one_ssn_with_other_middle_names_are_reviewed():
    """Found by a soak audit: a father and son (THOMAS M 1955, THOMAS E 1985), a mother and daughter, and twins
    (ELIZABETH A, MARGARET B) under one household SSN at one home were linked automatically."""
    home = dict(street="2328 Cedar St", city="Bloomington", postcode="61701", phone="217-555-7838")
    for (given, middle, birth), (given2, middle2, birth2), sex in (
            (("Thomas", "M", "19550625"), ("Thomas", "E", "19850625"), "M"),
            (("Susan", "R", "19620314"), ("Susan", "K", "19920314"), "F"),
            (("Elizabeth", "A", "19900312"), ("Margaret", "B", "19900312"), "F")):
        a = rec("GENHOSP", "G1", person("Fairweather", given, middle, birth=birth, sex=sex, ssn="499391408", **home),
                "P1")
        b = rec("OAKNH", "O1", person("Fairweather", given2, middle2, birth=birth2, sex=sex, ssn="499391408", **home))
        review_because(b, [a], Reason.SSN_ONLY)
    # a middle name given in full on one side, as its initial or not at all on the other: one person
    thomas = rec("GENHOSP", "G2", person("Fairweather", "Thomas", "Michael", birth="19550625", sex="M",
                                         ssn="499391408", **home), "P2")
    for middle in ("M", "", "Michael"):
        again = rec("OAKNH", "O2", person("Fairweather", "Thomas", middle, birth="19550625", sex="M", ssn="499391408",
                                          **home))
        assert decide(again, [thomas], MODEL).action is Action.LINK, middle


def test_twins_told_apart_only_by_their_middle_names_are_reviewed():
    """The same surname, given name, birth date and home; the middle names disagree (not an initial of the other)."""
    home = dict(street="18 Vine St", city="Tulsa", postcode="74103", phone="918-555-0100")
    for family, given, sex, one, two in (("Lindqvist", "John", "M", "Paul", "Michael"),
                                         ("Garza", "María", "F", "José", "Luisa"),
                                         ("Whitaker", "Anne", "F", "Marie", "Louise")):
        a = rec("GENHOSP", "G1", person(family, given, one, birth="20010420", sex=sex, **home), "P1")
        b = rec("OAKNH", "O1", person(family, given, two, birth="20010420", sex=sex, **home))
        d = review_because(b, [a], Reason.POSSIBLE_TWIN)
        assert d.score >= MODEL.upper
        # each with an SSN of their own: those do not tell them apart by much either
        a = rec("GENHOSP", "G2", person(family, given, one, birth="20010420", sex=sex, ssn="601112345", **home), "P2")
        b = rec("OAKNH", "O2", person(family, given, two, birth="20010420", sex=sex, ssn="733981111", **home))
        assert decide(b, [a], MODEL).action is not Action.LINK
        # as initials, or one as an initial the other's name cannot have, and SSNs issued in sequence
        a = rec("GENHOSP", "G5", person(family, given, one[0], birth="20010420", sex=sex, ssn="601112345", **home),
                "P5")
        for middle in (two[0], two):
            b = rec("OAKNH", "O5", person(family, given, middle, birth="20010420", sex=sex, ssn="601112346", **home))
            review_because(b, [a], Reason.POSSIBLE_TWIN)
    # a middle initial against the name, or a middle name left out: one person
    john = rec("GENHOSP", "G3", person("Lindqvist", "John", "Paul", birth="20010420", sex="M", **home), "P3")
    for middle in ("P", ""):
        d = decide(rec("OAKNH", "O3", person("Lindqvist", "John", middle, birth="20010420", sex="M", **home)), [john],
                   MODEL)
        assert (d.action, d.person) == (Action.LINK, "P3"), middle
    # one SSN does not make them one: twins under their parent's SSN (found by a soak audit)
    paul = rec("GENHOSP", "G4", person("Lindqvist", "John", "Paul", birth="20010420", sex="M", ssn="601112345",
                                       **home), "P4")
    michael = rec("OAKNH", "O4", person("Lindqvist", "John", "Michael", birth="20010420", sex="M", ssn="601112345",
                                        **home))
    review_because(michael, [paul], Reason.SSN_ONLY)


def test_an_update_that_gives_a_linked_record_a_relatives_birth_date_takes_the_link_back():
    """A08: the nursing home's record of Anna becomes her brother Adam, under the same SSN and home."""
    home = dict(street="27 Linden St", city="Boise", postcode="83702", phone="208-555-0101")
    anna = person("Sandberg", "Anna", birth="20010303", sex="F", ssn="845123002", **home)
    hospital = rec("GENHOSP", "G1", anna, "P1")
    assert decide(rec("OAKNH", "O1", anna, "P1"), [hospital], MODEL).action is Action.KEEP
    for changed in (person("Sandberg", "Adam", birth="20040707", sex="M", ssn="845123002", **home),
                    person("Sandberg", "Anna", birth="19720915", sex="F", ssn="845123002", **home)):  # her mother
        d = decide(rec("OAKNH", "O1", changed, "P1"), [hospital], MODEL)
        assert d.action is Action.REVIEW and d.person == "P1"
        assert Reason.LINK_LOOKS_WRONG in d.reasons and Reason.SSN_ONLY in d.reasons


def test_a_person_is_not_joined_by_the_relative_of_any_of_its_records():
    """A link joins every record of the person: the best one may have left the middle name out, another has it."""
    home = dict(street="18 Vine St", city="Tulsa", postcode="74103", phone="918-555-0100")
    paul = rec("GENHOSP", "G1", person("Lindqvist", "John", "Paul", birth="20010420", sex="M", **home), "P1")
    plain = rec("HHCARE", "H1", person("Lindqvist", "John", birth="20010420", sex="M", **home), "P1")
    michael = rec("OAKNH", "O1", person("Lindqvist", "John", "Michael", birth="20010420", sex="M", **home))
    d = review_because(michael, [paul, plain], Reason.POSSIBLE_TWIN)
    assert d.matches[0].mrn == "H1"  # the best record alone would have linked
    assert decide(michael, [plain], MODEL).action is Action.LINK
    # what another record has too little of does not hold a link back (its birth date missing, say)
    sparse = rec("HHCARE", "H2", person("Lindqvist", "John", "Paul", sex="M", **home), "P1")
    again = rec("OAKNH", "O2", person("Lindqvist", "John", "Paul", birth="20010420", sex="M", **home))
    assert decide(again, [paul, sparse], MODEL).action is Action.LINK


def test_family_and_stranger_shapes_a_false_link_audit_found():
    """Found by a false-link audit of the live exchange: each pair was linked automatically, and each
    one's admissions and notes were copied to the other's sites."""
    home = dict(street="12 Elm St", city="Springfield", postcode="62701", phone="217-555-1234")
    # twins named alike, each with an SSN of their own (or sequential ones, their own phones)
    kristen = rec("GENHOSP", "G1", person("Olsen", "Kristen", birth="19900512", sex="F", ssn="401223344", **home), "P1")
    kirsten = rec("OAKNH", "O1", person("Olsen", "Kirsten", birth="19900512", sex="F", ssn="517880921", **home))
    review_because(kirsten, [kristen], Reason.POSSIBLE_TWIN)
    sequential = rec("OAKNH", "O2", person("Olsen", "Kirsten", birth="19900512", sex="F", ssn="401223345",
                                           street="12 Elm St", city="Springfield", postcode="62701",
                                           phone="217-555-9876"))
    review_because(sequential, [kristen], Reason.POSSIBLE_TWIN)
    # siblings ten months apart, named alike
    maria = rec("GENHOSP", "G3", person("Lopez", "Maria", birth="20010115", sex="F", **home), "P3")
    review_because(rec("OAKNH", "O3", person("Lopez", "Mariah", birth="20011115", sex="F", **home)), [maria],
                   Reason.POSSIBLE_TWIN)
    # two John Smiths born the same day in one town, each with his own SSN, address and phone
    smith = rec("GENHOSP", "G4", person("Smith", "John", birth="19800101", sex="M", ssn="321654987",
                                        street="400 Oak Ave", city="Springfield", postcode="62701",
                                        phone="217-555-9001"), "P4")
    other = rec("OAKNH", "O4", person("Smith", "John", birth="19800101", sex="M", ssn="456123789",
                                      street="77 Pine Rd", city="Springfield", postcode="62704", phone="217-555-8002"))
    review_because(other, [smith], Reason.NAME_AND_BIRTH_DATE_ONLY)
    # newborn twins without a given name yet, or an unusual placeholder
    nguyen = rec("GENHOSP", "G5", person("Nguyen", "", birth="20261120", sex="F", **home), "P5")
    review_because(rec("OAKNH", "O5", person("Nguyen", "", birth="20261120", sex="F", **home)), [nguyen],
                   Reason.NEWBORN)
    infant = rec("GENHOSP", "G6", person("Nguyen", "Infantgirl", birth="20261120", sex="F", **home), "P6")
    review_because(rec("OAKNH", "O6", person("Nguyen", "Infantgirl", birth="20261120", sex="F", **home)), [infant],
                   Reason.NEWBORN)


def test_a_generation_apart_from_any_record_of_the_person_is_parent_and_child():
    """Found by a false-link audit: the father was linked through his son's record that had no birth
    date (the person's best record for him); the son's other record, born 30 years later, said nothing."""
    home = dict(street="5 Birch Ln", city="Dover", postcode="19901", phone="302-555-0100")
    son_old_address = rec("GENHOSP", "G1", person("Farley", "James", birth="19850610", sex="M",
                                                  street="9 Old Rd", city="Dover", postcode="19901"), "P1")
    son_no_birth = rec("OAKNH", "O1", person("Farley", "James", sex="M", **home), "P1")
    father = rec("HHCARE", "H1", person("Farley", "James", birth="19550610", sex="M", **home))
    d = decide(father, [son_no_birth, son_old_address], MODEL)
    assert d.action is Action.REVIEW and {Reason.PARENT_AND_CHILD, Reason.NO_BIRTH_DATE} & set(d.reasons), d.reasons
    # a best record with a birth date of its own, the son's other record born a generation after
    son_typo = rec("OAKNH", "O2", person("Farley", "James", birth="19550601", sex="M", **home), "P2")
    son = rec("GENHOSP", "G2", person("Farley", "James", birth="19850610", sex="M", street="9 Old Rd", city="Dover",
                                      postcode="19901"), "P2")
    d = decide(father, [son_typo, son], MODEL)
    assert d.action is Action.REVIEW and Reason.PARENT_AND_CHILD in d.reasons, (d.action, d.reasons)


def test_more_shapes_a_second_false_link_audit_found():
    """Found by a second false-link audit: each was linked automatically."""
    home = dict(street="102 Poplar St", city="Peoria", postcode="60102", phone="217-555-0102")
    # newborn twins, neither named yet, under their mother's SSN
    a = rec("GENHOSP", "G1", person("Achterberg", "", birth="20261105", sex="F", ssn="521334455", **home), "P1")
    review_because(rec("OAKNH", "O1", person("Achterberg", "", birth="20261105", sex="F", ssn="521334455", **home)),
                   [a], Reason.NEWBORN)
    # placeholders of other sites
    for placeholder in ("Bebe", "RN", "Inf", "Boya", "Girl B", "BB1"):
        b = rec("GENHOSP", "G2", person("Bjornstad", placeholder, birth="20261105", sex="F", **home), "P2")
        review_because(rec("OAKNH", "O2", person("Bjornstad", placeholder, birth="20261105", sex="F", **home)), [b],
                       Reason.NEWBORN)
    # a son's record without a birth date, at his father's home and phone
    erik = rec("GENHOSP", "G3", person("Rasmussen", "Erik", birth="19550505", sex="M", **home), "P3")
    review_because(rec("OAKNH", "O3", person("Rasmussen", "Erik", sex="M", **home)), [erik], Reason.NO_BIRTH_DATE)
    # two John Smiths born the same day in one town, another street and phone, an SSN on one side
    smith = rec("GENHOSP", "G4", person("Smith", "John", birth="19751113", sex="M", ssn="521334470",
                                        street="1 Main St", city="Peoria", postcode="60102", phone="217-555-0001"),
                "P4")
    review_because(rec("OAKNH", "O4", person("Smith", "John", birth="19751113", sex="M", street="9 Elm St",
                                             city="Peoria", postcode="60102", phone="217-555-0999")), [smith],
                   Reason.NAME_AND_BIRTH_DATE_ONLY)
    # "Boyd" is a name, not a placeholder: the same man links
    boyd = rec("GENHOSP", "G5", person("Tanner", "Boyd", birth="19700101", sex="M", ssn="521334471", **home), "P5")
    assert decide(rec("OAKNH", "O5", person("Tanner", "Boyd", birth="19700101", sex="M", ssn="521334471", **home)),
                  [boyd], MODEL).action is Action.LINK


def test_placeholder_ssns_strangers_share_are_no_ssn():
    from tests.test_matching_features import person as features

    for filler in ("000000001", "999999998", "078-05-1120", "1234", "4321", "999-00-0000"):
        assert features("Garcia", "Jose", ssn=filler).ssn == "", filler
    garcia = rec("GENHOSP", "G1", person("Garcia", "Jose", birth="19850310", sex="M", ssn="999999998",
                                         street="1 Oak St", city="Chicago", postcode="60608"), "P1")
    ramos = rec("OAKNH", "O1", person("Ramos", "Jose", birth="19850720", sex="M", ssn="999999998",
                                      street="7 Elm St", city="Chicago", postcode="60608"))
    assert decide(ramos, [garcia], MODEL).action is not Action.LINK


def test_records_without_a_given_name_are_newborns_only_while_the_person_is_a_child():
    """Two unnamed records of one birth date and family are newborn twins (a review) while they are
    children; an adult's records without a given name are a registration's gap: the SSN, the birth
    date, the family and the home agreeing are one person (FEBRL 4 has 71 such pairs)."""
    home = dict(street="28 May Maxwell Cres", city="Forest Hill", postcode="2342")
    hospital = rec("GENHOSP", "G1", person("Garanggar", "", birth="19921016", ssn="521366884", **home), "P1")
    home_health = rec("HHCARE", "H1", person("Garanggar", "", birth="19921016", ssn="521366884", **home))
    d = decide(home_health, [hospital], MODEL, today=date(2026, 11, 29))
    assert (d.action, d.person) == (Action.LINK, "P1"), d.reasons
    # the same records while the person is 17: twins not named yet under their mother's SSN
    d = decide(home_health, [hospital], MODEL, today=date(2009, 11, 29))
    assert d.action is Action.REVIEW and Reason.NEWBORN in d.reasons, d.reasons
    # a placeholder name stays a newborn's at any age (a review: the name tells nothing)
    baby = rec("GENHOSP", "G2", person("Garanggar", "Baby Girl", birth="19921016", ssn="521366884", **home), "P2")
    d = decide(rec("HHCARE", "H2", person("Garanggar", "Baby Girl", birth="19921016", ssn="521366884", **home)),
               [baby], MODEL, today=date(2026, 11, 29))
    assert d.action is Action.REVIEW and Reason.NEWBORN in d.reasons, d.reasons


def test_people_sharing_a_home_and_a_first_name_are_not_one_person():
    """Found by a third matching audit, each linked automatically: the home (address and phone)
    carried the pair past the upper threshold with the surname, the middle name, the birth date
    or the SSN telling them apart -- two residents of one care home, a shelter's guests,
    step-sisters, in-laws, sisters ten months apart."""
    home = dict(street="400 Oakwood Dr", city="Springfield", postcode="62704", phone="217-555-0100")
    shapes = [
        # two Marys of one nursing home born in 1932, each with her own SSN
        (person("Kowalski", "Mary", "Ann", birth="19320411", sex="F", ssn="318224455", **home),
         person("OBrien", "Mary", "Louise", birth="19321023", sex="F", ssn="412667788", **home)),
        # ... born ten days apart (one digit), each with her SSN
        (person("Kowalski", "Mary", birth="19320411", sex="F", ssn="318224455", **home),
         person("OBrien", "Mary", birth="19320421", sex="F", ssn="412667788", **home)),
        # surnames a typo apart (a fourth audit), two SSNs: Johnson and Johnston, Brown and Browne
        (person("Johnson", "Mary", birth="19320501", sex="F", ssn="219456781", **home),
         person("Johnston", "Mary", birth="19320511", sex="F", ssn="331572904", **home)),
        (person("Brown", "Michael", birth="19600501", sex="M", ssn="219456781", **home),
         person("Browne", "Michael", birth="19600501", sex="M", ssn="331572904", **home)),
        # two Michaels of one shelter, born in 1975
        (person("Nguyen", "Michael", "T", birth="19750102", sex="M", **home),
         person("Peterson", "Michael", "J", birth="19750930", sex="M", **home)),
        # step-sisters
        (person("Clark", "Ashley", "Nicole", birth="20090211", sex="F", **home),
         person("Ramirez", "Ashley", "Marie", birth="20091030", sex="F", **home)),
        # in-laws of one name, each with her SSN
        (person("Garcia", "Maria", birth="19850314", sex="F", ssn="318224455", **home),
         person("Garcia", "Maria", birth="19850822", sex="F", ssn="412667788", **home)),
        # sisters ten months apart, named alike
        (person("Smith", "Maria", birth="20010203", sex="F", **home),
         person("Smith", "Mariah", birth="20011220", sex="F", **home)),
        # an in-law with a typo's worth of another given name and her own SSN
        (person("Kowalski", "Marie", birth="19320411", sex="F", ssn="318224455", **home),
         person("OBrien", "Maria", birth="19320411", sex="F", ssn="412667788", **home)),
    ]
    for one, other in shapes:
        d = decide(rec("GENHOSP", "G1", other), [rec("OAKNH", "O1", one, "P1")], MODEL)
        assert d.action is not Action.LINK, (other.family, other.given, other.birth_digits, d.score)
        assert d.matches == () or d.matches[0].score.discounted, d.matches
    # one person: a married name at the same home, or a birth date entered wrong with the SSN agreeing
    mary = rec("OAKNH", "O2", person("Kowalski", "Mary", "Ann", birth="19320411", sex="F", ssn="318224455", **home),
               "P2")
    for same in (person("OBrien", "Mary", "Ann", birth="19320411", sex="F", **home),
                 person("Kowalski", "Mary", "Ann", birth="19320611", sex="F", ssn="318224455", **home),
                 person("Kowalski", "Mary", "A", birth="19320412", sex="F", **home),
                 # a fourth audit's regression of the first try at this: another day of the year
                 # with a nickname (no SSN on one side) -- one person, as before
                 person("Kowalski", "Molly", birth="19320513", sex="F", **home)):
        d = decide(rec("GENHOSP", "G2", same), [mary], MODEL)
        assert (d.action, d.person) == (Action.LINK, "P2"), (same.family, same.birth_digits, d.reasons, d.score)


def test_a_fourth_matching_audits_family_shapes_are_reviews():
    home = dict(street="12 Main St", city="Springfield", postcode="62704", phone="217-555-0101")
    # sisters of one year, named a letter apart, under their mother's SSN
    maria = rec("GENHOSP", "G1", person("Garcia", "Maria", birth="19900105", sex="F", ssn="219456781", **home), "P1")
    review_because(rec("OAKNH", "O1", person("Garcia", "Mariah", birth="19901220", sex="F", ssn="219456781",
                                             **home)), [maria], Reason.SSN_ONLY)
    # newborn twins not named yet, born either side of midnight
    twin = rec("GENHOSP", "G2", person("Garcia", "", birth="20261127", sex="F", **home), "P2")
    review_because(rec("HHCARE", "H2", person("Garcia", "", birth="20261128", sex="F", **home)), [twin],
                   Reason.NEWBORN)
    # adults without a given name are no newborns (one side or both): one person
    for given in ("", "Stanislaw"):
        adult = rec("GENHOSP", "G3", person("Kowalski", given, birth="19700501", sex="M", **home), "P3")
        d = decide(rec("OAKNH", "O3", person("Kowalski", "", birth="19700501", sex="M", **home)), [adult], MODEL)
        assert (d.action, d.person) == (Action.LINK, "P3"), (given, d.reasons)


def test_what_one_home_cannot_tell_apart_is_a_review_not_a_link_nor_nothing():
    """A fifth matching audit: another surname with a birth date a typo apart is a married woman
    with a typo, or a namesake of one care home (a review, not a link); with the birth date on
    another day of the year it is no link, but not nothing either (a review); twins of one given
    name and other middle names born either side of midnight are twins."""
    home = dict(street="1100 Maple Ave", city="Joliet", postcode="60435", phone="815-555-0190")
    dorothy = rec("GENHOSP", "G1", person("Kowalczyk", "Dorothy", "Ann", birth="19320311", sex="F", ssn="318224471",
                                          **home), "P1")
    for other, birth in (("Halverson", "19320321"), ("Halverson", "19321103"), ("Kowalcyk", "19320313")):
        d = decide(rec("OAKNH", "O1", person(other, "Dorothy", birth=birth, sex="F", **home)), [dorothy], MODEL)
        assert d.action is Action.REVIEW and Reason.SHARED_HOME in d.reasons, (other, birth, d.action, d.reasons)
    mary = rec("GENHOSP", "G2", person("Kowalski", "Mary", "Ann", birth="19320411", sex="F", ssn="318224455", **home),
               "P2")
    review_because(rec("OAKNH", "O2", person("OBrien", "Mary", birth="19320412", sex="F", **home)), [mary],
                   Reason.SHARED_HOME)  # married, with a typo -- or another Mary of the home
    maria = rec("GENHOSP", "G3", person("Zabrowski", "Maria", "Elena", birth="19610311", sex="F", ssn="287415530",
                                        **home), "P3")
    for ssn in ("287415531", ""):
        review_because(rec("OAKNH", "O3", person("Zabrowski", "Maria", "Luisa", birth="19610312", sex="F", ssn=ssn,
                                                 **home)), [maria], Reason.POSSIBLE_TWIN)


def test_an_update_that_makes_a_linked_record_another_resident_takes_the_link_back():
    """The third matching audit's A08: the hospital's record, linked to Mary Kowalski's, became
    Mary O'Brien (another surname, middle name, birth date and SSN, the same home): kept linked."""
    home = dict(street="400 Oakwood Dr", city="Springfield", postcode="62704", phone="217-555-0100")
    kowalski = rec("OAKNH", "O1", person("Kowalski", "Mary", "Ann", birth="19320411", sex="F", ssn="318224455",
                                         **home), "P1")
    updated = rec("GENHOSP", "G1", person("OBrien", "Mary", "Louise", birth="19321023", sex="F", ssn="412667788",
                                          **home), "P1")
    d = decide(updated, [kowalski], MODEL)
    assert d.action is Action.REVIEW and Reason.LINK_LOOKS_WRONG in d.reasons, (d.action, d.reasons)


def test_newborns_named_after_their_mother_are_placeholders():
    """The Joint Commission's convention for newborns, multiple births above all: the mother's
    name, the sex and a letter ("JUDYS GIRL A" / "JUDYS GIRL B"); the third matching audit found
    such twins linked."""
    home = dict(street="12 Oak St", city="Springfield", postcode="62704", phone="217-555-1234")
    for one, two in (("Judys Girl A", "Judys Girl B"), ("JudysGirl", "JudysGirl"), ("Maria's Baby Boy", "Marias Boy")):
        a = rec("GENHOSP", "G1", person("Smith", one, birth="20241101", sex="F", **home), "P1")
        review_because(rec("HHCARE", "H1", person("Smith", two, birth="20241101", sex="F", **home)), [a],
                       Reason.NEWBORN)
    # a given name ending in an S is no placeholder
    thomas = rec("GENHOSP", "G2", person("Smith", "Thomas", birth="20241101", sex="M", **home), "P2")
    assert decide(rec("HHCARE", "H2", person("Smith", "Thomas", birth="20241101", sex="M", **home)), [thomas],
                  MODEL).action is Action.LINK


def test_a_patient_who_goes_by_her_middle_name_or_a_spanish_nickname_is_found():
    """The third matching audit's missed matches (two persons and no review): MARIA GUADALUPE at
    the hospital is GUADALUPE (or LUPE) at the nursing home she moved into; THI MAI is MAI."""
    old_home = dict(street="12 Oak St", city="Springfield", postcode="62704", phone="217-555-1234")
    nursing_home = dict(street="400 Oakwood Dr", city="Springfield", postcode="62704", phone="217-555-0100")
    for hospital, there in ((("Maria", "Guadalupe"), ("Guadalupe", "")), (("Guadalupe", ""), ("Lupe", "")),
                            (("Maria", "Guadalupe"), ("Lupe", "")), (("Thi Mai", ""), ("Mai", "")),
                            (("J", "Paul"), ("Paul", ""))):
        a = rec("GENHOSP", "G1", person("Okonkwo", *hospital, birth="19500704", sex="F", **old_home), "P1")
        d = decide(rec("OAKNH", "O1", person("Okonkwo", *there, birth="19500704", sex="F", **nursing_home)), [a],
                   MODEL)
        assert d.action is not Action.NEW and d.person == "P1", (hospital, there, d.action, d.score)
        assert d.matches[0].score.level("given") == "nickname"
