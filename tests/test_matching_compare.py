"""exchange.matching.compare: every comparator level, symmetry, and robustness. Synthetic people only."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.matching.compare import (
    FIELD_NAMES,
    FIELDS,
    Level as L,
    compare,
    compare_address,
    compare_birth,
    compare_family,
    compare_given,
    compare_middle,
    compare_names,
    compare_phone,
    compare_place,
    compare_sex,
    compare_ssn,
    compare_suffix,
)
from exchange.matching.features import Features

from tests.test_matching_features import person


def both(cmp, a, b):
    """The level, checked to be the same both ways round."""
    there, back = cmp(a, b), cmp(b, a)
    assert there == back
    return there


@pytest.mark.parametrize(
    "one, other, level",
    [
        (("Hanson", "Ann"), ("Hanson", "Ann"), L.EXACT),
        (("Hanson", "Ann"), ("Hanson-Moore", "Ann"), L.PART),  # married, hyphenated
        (("Hansen", "Ann"), ("Hanson-Moore", "Ann"), L.PART),  # ... with a typo in the part
        (("Hansen", "Ann"), ("Hanson", "Ann"), L.CLOSE),
        (("Kowalczyk", "Ann"), ("Kowalcik", "Ann"), L.CLOSE),
        (("Smyth", "Ann"), ("Smithe", "Ann"), L.SIMILAR),
        (("Smith", "Ann"), ("Jones", "Ann"), L.DISAGREE),
        (("", "Ann"), ("Jones", "Ann"), L.MISSING),
    ],
)
def test_family_levels(one, other, level):
    assert both(compare_family, person(*one), person(*other)) is level


def test_family_alias_counts_as_part():
    maiden = person("Hanson", "Elizabeth")
    married = person("Moore", "Elizabeth", aliases=("Hanson",))
    assert both(compare_family, maiden, married) is L.PART


@pytest.mark.parametrize(
    "one, other, level",
    [
        ("Elizabeth", "Elizabeth", L.EXACT),
        ("Liz", "Elizabeth", L.NICKNAME),
        ("Bob", "Robert", L.NICKNAME),
        ("Bill", "William", L.NICKNAME),
        ("Peggy", "Margaret", L.NICKNAME),
        ("Jonathon", "Jonathan", L.CLOSE),
        ("Ja Yde", "Jayde", L.EXACT),  # a space typed inside the name
        ("Stephen", "Steven", L.SIMILAR),
        ("Sean", "Shaun", L.SIMILAR),  # same phonetic code
        ("E", "Elizabeth", L.INITIAL),
        ("J", "Elizabeth", L.DISAGREE),
        ("John", "Mary", L.DISAGREE),
        ("", "Mary", L.MISSING),
    ],
)
def test_given_levels(one, other, level):
    assert both(compare_given, person("Doe", one), person("Doe", other)) is level


def test_swapped_name_fields_agree_as_close():
    assert both(compare_names, person("Fitzpatrick", "Lucy"), person("Lucy", "Fitzpatrick")) == (L.CLOSE, L.CLOSE)
    assert both(compare_names, person("Fitzpatrick", "Lucy"), person("Jones", "Mary")) == (L.DISAGREE, L.DISAGREE)


def test_middle_and_suffix_levels():
    assert both(compare_middle, person("D", "J", "Ann"), person("D", "J", "Ann")) is L.EXACT
    assert both(compare_middle, person("D", "J", "A"), person("D", "J", "Ann")) is L.INITIAL
    assert both(compare_middle, person("D", "J", "Beth"), person("D", "J", "Ann")) is L.DISAGREE
    assert both(compare_middle, person("D", "J"), person("D", "J", "Ann")) is L.MISSING
    assert both(compare_suffix, person("D", "J", suffix="Jr"), person("D", "J", suffix="JR.")) is L.EXACT
    assert both(compare_suffix, person("D", "J", suffix="Jr"), person("D", "J", suffix="Sr")) is L.DISAGREE
    assert both(compare_suffix, person("D", "J", suffix="III"), person("D", "J", suffix="II")) is L.DISAGREE
    assert both(compare_suffix, person("D", "J", suffix="Jr"), person("D", "J")) is L.MISSING


@pytest.mark.parametrize(
    "one, other, level",
    [
        ("19500304", "19500304", L.EXACT),
        ("19500304", "19500403", L.SWAPPED),
        ("19500304", "19500305", L.ONE_DIGIT),
        ("19500304", "19510304", L.ONE_DIGIT),
        ("19501203", "19501230", L.ONE_DIGIT),  # two adjacent digits swapped
        ("19501203", "19501231", L.OTHER_DAY),  # two digits wrong
        ("19501203", "19500921", L.OTHER_DAY),
        ("19500831", "19500901", L.ONE_DIGIT),  # a day apart (a birth at midnight)
        ("19491231", "19500101", L.ONE_DIGIT),
        ("19500831", "19500902", L.OTHER_DAY),
        ("1950", "19500921", L.YEAR_ONLY),
        ("195009", "19500921", L.YEAR_ONLY),
        ("195008", "19500921", L.DISAGREE),
        ("19501203", "19620921", L.DISAGREE),
        (None, "19620921", L.MISSING),
    ],
)
def test_birth_levels(one, other, level):
    assert both(compare_birth, person("D", "J", birth=one), person("D", "J", birth=other)) is level


def test_transposed_birth_digits_are_one_digit_off():
    assert both(compare_birth, person(birth="19500312"), person(birth="19500321")) is L.ONE_DIGIT


@pytest.mark.parametrize(
    "one, other, level",
    [
        ("123456780", "123456780", L.EXACT),
        ("123456780", "123465780", L.TRANSPOSED),
        ("123456780", "123456781", L.ONE_DIGIT),
        ("123456780", "987654320", L.DISAGREE),
        ("123456780", "6780", L.MISSING),  # different lengths: not comparable
        (None, "123456780", L.MISSING),
    ],
)
def test_ssn_levels(one, other, level):
    assert both(compare_ssn, person(ssn=one), person(ssn=other)) is level


def test_phone_and_sex_levels():
    assert both(compare_phone, person(phone="217-555-0101"), person(phone="+1 217 555 0101")) is L.EXACT
    assert both(compare_phone, person(phone="217-555-0101"), person(phone="217-555-0102")) is L.DISAGREE
    assert both(compare_phone, person(), person(phone="217-555-0102")) is L.MISSING
    assert both(compare_sex, person(sex="F"), person(sex="F")) is L.EXACT
    assert both(compare_sex, person(sex="F"), person(sex="M")) is L.DISAGREE
    assert both(compare_sex, person(sex="U"), person(sex="M")) is L.MISSING


@pytest.mark.parametrize(
    "one, other, level",
    [
        ("12 Weston Street", "12 Weston St", L.EXACT),
        ("12 Weston Street", "12 westonstreet", L.EXACT),
        ("12 Weston Street", "14 Weston Street", L.STREET),
        ("12 Weston Street", "Weston Street", L.STREET),
        ("12 Weston Street", "12 Westen Road", L.SIMILAR),
        ("12 Weston Street", "3 Pinkerton Circuit", L.DISAGREE),
        ("", "3 Pinkerton Circuit", L.MISSING),
    ],
)
def test_address_levels(one, other, level):
    assert both(compare_address, person(street=one), person(street=other)) is level


@pytest.mark.parametrize(
    "one, other, level",
    [
        (("Dapto", "2530"), ("Dapto", "2530"), L.EXACT),
        (("Dapto", "2530"), ("Kela", "2530"), L.POSTCODE),
        (("Dapto", "2530"), ("", "2530"), L.POSTCODE),
        (("Dapto", "2530"), ("Dapt0", "2531"), L.CITY),
        (("Dapto", "2530"), ("Kela", "4566"), L.DISAGREE),
        (("Dapto", ""), ("", "4566"), L.MISSING),
    ],
)
def test_place_levels(one, other, level):
    a = person(city=one[0], postcode=one[1])
    b = person(city=other[0], postcode=other[1])
    assert both(compare_place, a, b) is level


def test_the_vector_has_one_level_per_field_from_its_list():
    a = person("Hanson", "Liz", birth="19500304", sex="F", phone="2175550101", street="1 Main St", postcode="1")
    b = person("Hanson-Moore", "Elizabeth", birth="19500403", sex="F", ssn="123456789")
    vector = compare(a, b)
    assert len(vector) == len(FIELD_NAMES)
    for name, level in zip(FIELD_NAMES, vector):
        assert level is L.MISSING or level in FIELDS[name]
    assert compare(Features(), Features()) == (L.MISSING,) * len(FIELD_NAMES)


_text = st.text(max_size=20)
_features = st.builds(
    Features,
    family=_text, family_parts=st.tuples(_text), given=_text, given_full=_text,
    given_canon=st.tuples(_text), middle=_text, suffix=_text, family_code=_text, given_code=_text,
    birth_year=st.none() | st.integers(1, 9999), birth_month=st.none() | st.integers(1, 12),
    birth_day=st.none() | st.integers(1, 31), birth_digits=st.text("0123456789", max_size=9),
    sex=_text, ssn=_text, phones=st.tuples(_text), number=_text, street=_text, other=_text,
    city=_text, postcode=_text,
)  # fmt: skip


@given(_features, _features)
def test_comparators_are_symmetric_and_never_raise_on_arbitrary_values(a, b):
    """Even on values features_of would never make (unnormalised, any unicode)."""
    vector = compare(a, b)
    assert vector == compare(b, a)
    assert len(vector) == len(FIELD_NAMES)


def test_an_abbreviated_middle_name_or_a_nickname_of_it_is_no_other_middle_name():
    """A fourth matching audit: ELIZ against ELIZABETH (or WM against WILLIAM) read as another middle
    name, which with a typo in the birth date split one person."""
    for one, other in (("Elizabeth", "Eliz"), ("William", "Wm"), ("Margaret", "Peggy"), ("James", "J")):
        assert both(compare_middle, person("D", "Mary", one), person("D", "Mary", other)) is L.INITIAL, other
    assert both(compare_middle, person("D", "Mary", "Ann"), person("D", "Mary", "Louise")) is L.DISAGREE
