"""exchange.matching.features: normalisation and blocking keys. Synthetic people only."""
from __future__ import annotations

import pickle
from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.mapping.values import Address, PersonName, Phone, Precision, Timestamp
from exchange.matching.features import Features, blocking_keys, features_of, normalise_suffix, split_street
from exchange.matching.nicknames import canonical_given_names, nickname_table


def person(
    family="",
    given="",
    middle="",
    suffix="",
    birth: str | None = None,
    sex=None,
    street="",
    city="",
    postcode="",
    state="",
    phone="",
    ssn=None,
    aliases=(),
) -> Features:
    """Features of a record dict shaped like MemoryState.records entries (birth as YYYY[MM[DD]])."""
    ts = None
    if birth:
        precision = {4: Precision.YEAR, 6: Precision.MONTH, 8: Precision.DAY}[len(birth)]
        ts = Timestamp(date(int(birth[:4]), int(birth[4:6] or 1), int(birth[6:8] or 1)), precision, birth)
    record = {
        "name": PersonName(family, given, middle, suffix),
        "aliases": tuple(PersonName(a) for a in aliases),
        "birth": ts,
        "sex": sex,
        "addresses": (Address(street, "", city, state, postcode),) if street or city or postcode else (),
        "phones": (Phone(phone),) if phone else (),
        "ssn": ssn,
        "identifiers": {},
    }
    return features_of(record)


def test_names_are_folded_squashed_and_coded():
    f = person("O'Brien-Müller", "Mary Ann", birth="19500304")
    assert f.family == "obrienmuller"
    assert f.family_parts == ("muller", "obrien")
    assert (f.given, f.given_full, f.middle) == ("mary", "maryann", "ann")
    assert f.family_code and f.given_code and f.family_soundex
    assert (f.birth_year, f.birth_month, f.birth_day, f.birth_digits) == (1950, 3, 4, "19500304")


def test_suffix_from_its_field_or_the_end_of_a_name():
    assert normalise_suffix("Jr.") == "JR"
    assert normalise_suffix("SENIOR") == "SR"
    assert normalise_suffix("3rd") == "III"
    assert normalise_suffix("MD") == ""
    assert person("Smith", "John", suffix="Jr").suffix == "JR"
    assert person("Smith Sr", "John").suffix == "SR"
    f = person("Smith", "John III")
    assert (f.given, f.suffix) == ("john", "III")


def test_nicknames_map_to_formal_names():
    assert "elizabeth" in canonical_given_names("liz")
    assert "robert" in canonical_given_names("bob")
    assert "william" in canonical_given_names("bill")
    assert "margaret" in canonical_given_names("peggy")
    assert canonical_given_names("") == ()
    assert len({(f, n) for n, fs in nickname_table().items() for f in fs}) >= 400


def test_partial_birth_dates_keep_their_precision():
    f = person("Smith", "Ann", birth="1962")
    assert (f.birth_year, f.birth_month, f.birth_day, f.birth_digits) == (1962, None, None, "")
    f = person("Smith", "Ann", birth="196203")
    assert (f.birth_year, f.birth_month, f.birth_day) == (1962, 3, None)


def test_identifiers_phones_addresses():
    f = person(
        "Doe", "Jane", ssn="123-45-6780", phone="+1 (217) 555-0101", street="12 Pinkerton Circuit",
        city="Bega Flats", postcode="62704-1234", sex="f",
    )  # fmt: skip
    assert f.ssn == "123456780"
    assert f.phones == ("2175550101",)
    assert (f.number, f.street, f.city, f.postcode) == ("12", "pinkertoncct", "begaflats", "62704")
    assert f.sex == "F"
    assert person("Doe", "Jane", ssn="000-00-0000").ssn == ""
    # numbers the SSA never issues, typed for "unknown" and shared by strangers
    for filler in ("999-00-0000", "999990000", "666-12-3456", "000-12-3456", "123-00-4567", "123-45-0000"):
        assert person("Doe", "Jane", ssn=filler).ssn == "", filler
    assert person("Doe", "Jane", ssn="912-70-1234").ssn == "912701234"  # an ITIN is a person's own number
    assert person("Doe", "Jane", sex="U").sex == ""
    assert split_street("ginganastreet") == ("", "ginganast")  # a street word typed onto the name
    assert split_street("12a Weston St") == ("12a", "westonst")


def test_features_pickle_and_compare_by_value():
    f = person("Hanson-Moore", "Elizabeth", birth="19500304", phone="2175550101")
    assert pickle.loads(pickle.dumps(f)) == f
    assert hash(f) == hash(person("Hanson-Moore", "Elizabeth", birth="19500304", phone="2175550101"))


def test_blocking_keys_are_short_and_shared_by_typical_variants():
    liz = person("Hansen", "Liz", birth="19500304", postcode="62704")
    elizabeth = person("Hanson-Moore", "Elizabeth", birth="19500403", postcode="62711")
    swapped = person("Liz", "Hansen", birth="19510304")
    assert blocking_keys(liz) & blocking_keys(elizabeth)  # nickname + compound surname
    assert blocking_keys(liz) & blocking_keys(swapped)  # family and given swapped
    keys = blocking_keys(person("Doe", "Jane", birth="19800101", ssn="123456780", phone="2175550101", postcode="1"))
    assert {"dob:19800101", "ssn:123456780", "ph:2175550101"} <= keys
    assert all(len(k) <= 32 for k in keys)
    assert blocking_keys(Features()) == frozenset()


@given(
    st.text(max_size=30), st.text(max_size=30), st.text(max_size=10), st.text(max_size=10),
    st.text(max_size=30), st.text(max_size=20), st.text(max_size=12),
)  # fmt: skip
def test_features_of_never_raises_on_arbitrary_text(family, given_, suffix, sex, street, phone, ssn):
    record = {
        "name": PersonName(family, given_, given_, suffix),
        "aliases": (PersonName(street),),
        "birth": None,
        "sex": sex,
        "addresses": (Address(street, street, street, street, street),),
        "phones": (Phone(phone),),
        "ssn": ssn,
    }
    f = features_of(record)
    blocking_keys(f)
    assert f.family == f.family.lower()


def test_features_encode_compactly_and_decode_to_the_same_value():
    from exchange.matching.features import KEY_FIELDS, decode_features, encode_features

    f = person("Hanson-Moore", "Liz", "A", "Jr", birth="19500304", sex="F", phone="2175550101", ssn="123456780",
               street="12 Main St", city="Springfield", postcode="62704")  # fmt: skip
    text = encode_features(f)
    assert decode_features(text) == f
    assert len(text) < 400
    assert decode_features(encode_features(Features())) == Features()
    with pytest.raises(ValueError):
        decode_features("[0]")
    assert {k.split(":")[0] for k in blocking_keys(f)} <= set(KEY_FIELDS)
