"""Per-field agreement levels between two records' :class:`Features`.

Fellegi–Sunter does not weigh raw similarities; it weighs *levels*: each
field of a pair lands in one of a few named levels (exact, nickname, one
digit off, ...), and the model says how much more often true matches than
non-matches land there. Levels are named so a technician reading a review
sees what agreed and how.

Every comparator is symmetric (``cmp(a, b) == cmp(b, a)``), never raises,
and answers :attr:`Level.MISSING` when either side has no value: a missing
value is neither for nor against a match.
"""
from __future__ import annotations

from datetime import date
from enum import StrEnum

from rapidfuzz.distance import OSA, Hamming, JaroWinkler

from exchange.matching.features import Features
from exchange.matching.nicknames import canonical_given_names

_jw = JaroWinkler.similarity
_hamming = Hamming.distance
_osa = OSA.distance


class Level(StrEnum):
    """How two values of one field agree, best first within each field."""

    EXACT = "exact"
    PART = "part"  # one surname is part of the other or an alias (married, hyphenated)
    NICKNAME = "nickname"  # liz / elizabeth
    CLOSE = "close"  # Jaro-Winkler >= 0.92: a typo
    SIMILAR = "similar"  # Jaro-Winkler >= 0.85, or same phonetic code and >= 0.75
    INITIAL = "initial"  # one side is an initial of the other
    SWAPPED = "swapped"  # birth date with day and month swapped
    TRANSPOSED = "transposed"  # two adjacent digits swapped
    ONE_DIGIT = "one_digit"  # one digit different (or two adjacent swapped, or a day apart, for dates)
    YEAR_ONLY = "year_only"  # birth year agrees, month/day not known on one side
    OTHER_DAY = "other_day"  # full birth dates of one year, further apart than a typo
    STREET = "street"  # same street, house number differs or missing
    POSTCODE = "postcode"  # postcode agrees, city does not (or is missing)
    CITY = "city"  # city agrees, postcode does not (or is missing)
    DISAGREE = "disagree"
    MISSING = "missing"  # either side has no value: weight 0


L = Level

FIELDS: dict[str, tuple[Level, ...]] = {
    "family": (L.EXACT, L.PART, L.CLOSE, L.SIMILAR, L.DISAGREE),
    "given": (L.EXACT, L.NICKNAME, L.CLOSE, L.SIMILAR, L.INITIAL, L.DISAGREE),
    "middle": (L.EXACT, L.INITIAL, L.DISAGREE),
    "suffix": (L.EXACT, L.DISAGREE),
    "birth": (L.EXACT, L.SWAPPED, L.ONE_DIGIT, L.YEAR_ONLY, L.OTHER_DAY, L.DISAGREE),
    "ssn": (L.EXACT, L.TRANSPOSED, L.ONE_DIGIT, L.DISAGREE),
    "address": (L.EXACT, L.STREET, L.SIMILAR, L.DISAGREE),
    "place": (L.EXACT, L.POSTCODE, L.CITY, L.DISAGREE),
    "phone": (L.EXACT, L.DISAGREE),
    "sex": (L.EXACT, L.DISAGREE),
}
"""Compared fields and their levels (best first); MISSING is every field's extra level."""

FIELD_NAMES: tuple[str, ...] = tuple(FIELDS)

# The levels as module constants: the comparators run for every candidate pair, and on
# Python 3.11 an attribute of an Enum class costs ~100 ns a look-up.
EXACT, PART, NICKNAME, CLOSE, SIMILAR = L.EXACT, L.PART, L.NICKNAME, L.CLOSE, L.SIMILAR
INITIAL, SWAPPED, TRANSPOSED, ONE_DIGIT, YEAR_ONLY = L.INITIAL, L.SWAPPED, L.TRANSPOSED, L.ONE_DIGIT, L.YEAR_ONLY
STREET, POSTCODE, CITY, DISAGREE, MISSING = L.STREET, L.POSTCODE, L.CITY, L.DISAGREE, L.MISSING
OTHER_DAY = L.OTHER_DAY


CLOSE_JW = 0.92
SIMILAR_JW = 0.85
PHONETIC_FLOOR_JW = 0.75  # phonetic codes alone are too coarse: NYSIIS codes John and James alike

# --- strings --------------------------------------------------------------------


def _string_level(a: str, b: str, code_a: str = "", code_b: str = "") -> Level:
    """EXACT / CLOSE / SIMILAR / DISAGREE for two non-empty strings (and their phonetic codes)."""
    if a == b:
        return EXACT
    sim = _jw(a, b)
    if sim >= CLOSE_JW:
        return CLOSE
    if sim >= SIMILAR_JW or (code_a and code_a == code_b and sim >= PHONETIC_FLOOR_JW):
        return SIMILAR
    return DISAGREE


def compare_family(a: Features, b: Features) -> Level:
    if not a.family or not b.family:
        return MISSING
    if a.family == b.family:
        return EXACT
    if (a.family_parts or b.family_parts) and _part_of(a, b):
        return PART
    return _string_level(a.family, b.family, a.family_code, b.family_code)


def _part_of(a: Features, b: Features) -> bool:
    """One's surname is (close to) one of the other's other surnames, or they share one."""
    if a.family in b.family_parts or b.family in a.family_parts:
        return True
    if any(p in b.family_parts for p in a.family_parts):
        return True
    # "Hansen" / "Hanson-Moore": a typo in a part
    return any(_jw(a.family, p) >= CLOSE_JW for p in b.family_parts) or any(
        _jw(b.family, p) >= CLOSE_JW for p in a.family_parts
    )


def compare_given(a: Features, b: Features) -> Level:
    ga, gb = a.given, b.given
    if not ga or not gb:
        return MISSING
    if ga == gb or a.given_full == b.given_full:
        return EXACT
    if len(a.middle) > 1 and a.middle in b.given_canon or len(b.middle) > 1 and b.middle in a.given_canon:
        return NICKNAME  # the name one goes by is the other's middle name (MARIA GUADALUPE / LUPE, J PAUL / PAUL)
    if len(ga) == 1 or len(gb) == 1:
        return INITIAL if ga[0] == gb[0] else DISAGREE
    if a.given_canon and b.given_canon and any(name in b.given_canon for name in a.given_canon):
        return NICKNAME
    level = _string_level(ga, gb, a.given_code, b.given_code)
    if level is DISAGREE and (a.given_full != ga or b.given_full != gb):  # more than one given name
        if _jw(a.given_full, b.given_full) >= CLOSE_JW:
            return CLOSE  # a space typed inside the name ("ja yde")
    return level


def compare_names(a: Features, b: Features) -> tuple[Level, Level]:
    """(family level, given level), reading a family/given swap as a weaker agreement.

    Clerks swap the two fields; when the crossed comparison (a's family with
    b's given and the other way) agrees and the straight one does not, both
    fields take the worse of the two crossed levels (so the result stays
    symmetric).
    """
    family, given = compare_family(a, b), compare_given(a, b)
    if (
        family is DISAGREE
        and given in (DISAGREE, SIMILAR)
        and a.family
        and b.family
        and a.given_full
        and b.given_full
    ):
        one = _string_level(a.family, b.given_full, a.family_code, b.given_code)
        two = _string_level(a.given_full, b.family, a.given_code, b.family_code)
        order = FIELDS["family"]
        worse = max(one, two, key=order.index)
        if worse in (EXACT, CLOSE):
            return CLOSE, CLOSE
    return family, given


def compare_middle(a: Features, b: Features) -> Level:
    """exact (or a typo) / initial (an initial, an abbreviation -- ELIZ for ELIZABETH -- or a
    nickname of the other) / disagree."""
    ma, mb = a.middle, b.middle
    if not ma or not mb:
        return MISSING
    if ma == mb or _jw(ma, mb) >= CLOSE_JW and min(len(ma), len(mb)) > 1:
        return EXACT
    if ma.startswith(mb) or mb.startswith(ma):
        return INITIAL
    canon_b = canonical_given_names(mb)
    if any(name in canon_b for name in canonical_given_names(ma)):  # as compare_given reads nicknames
        return INITIAL
    return DISAGREE


def compare_suffix(a: Features, b: Features) -> Level:
    """JR vs SR (or II vs III) is DISAGREE, strong evidence of father and son; one missing is MISSING."""
    if not a.suffix or not b.suffix:
        return MISSING
    return EXACT if a.suffix == b.suffix else DISAGREE


# --- digits ------------------------------------------------------------------------


def _digit_typo(a: str, b: str) -> Level | None:
    """TRANSPOSED (two adjacent characters swapped), ONE_DIGIT (one differs) or None, for equal-length strings."""
    if len(a) != len(b):
        return None
    differ = _hamming(a, b)
    if differ == 1:
        return ONE_DIGIT
    if differ == 2 and _osa(a, b) == 1:
        return TRANSPOSED
    return None


def compare_birth(a: Features, b: Features) -> Level:
    """exact / day-month swapped / one digit off (or two adjacent swapped) / year only / other day / disagree.

    A date known only to the year or month agrees at most as YEAR_ONLY; two full dates of
    one year further apart than a typo are OTHER_DAY (two people, or a date entered wrong).
    """
    if a.birth_year is None or b.birth_year is None:
        return MISSING
    da, db = a.birth_digits, b.birth_digits
    if not da or not db:
        if a.birth_year != b.birth_year:
            return DISAGREE
        if a.birth_month is not None and b.birth_month is not None and a.birth_month != b.birth_month:
            return DISAGREE
        return YEAR_ONLY
    if da == db:
        return EXACT
    if a.birth_year == b.birth_year and a.birth_month == b.birth_day and a.birth_day == b.birth_month:
        return SWAPPED
    if _digit_typo(da, db) is not None or a_day_apart(a, b):
        return ONE_DIGIT
    if a.birth_year == b.birth_year:
        return OTHER_DAY
    return DISAGREE


def a_day_apart(a: Features, b: Features) -> bool:
    """Full birth dates one day apart (a birth at midnight, a time converted to another zone)."""
    if a.birth_day is None or b.birth_day is None or abs(a.birth_year - b.birth_year) > 1:
        return False  # (cheap first: most candidates are born in other years)
    try:
        days = (date(a.birth_year, a.birth_month, a.birth_day) - date(b.birth_year, b.birth_month, b.birth_day)).days
    except (TypeError, ValueError):
        return False
    return abs(days) == 1


def compare_ssn(a: Features, b: Features) -> Level:
    """exact / one adjacent transposition / one digit / disagree; different lengths are not comparable."""
    if not a.ssn or not b.ssn or len(a.ssn) != len(b.ssn):
        return MISSING
    if a.ssn == b.ssn:
        return EXACT
    return _digit_typo(a.ssn, b.ssn) or DISAGREE


def compare_phone(a: Features, b: Features) -> Level:
    if not a.phones or not b.phones:
        return MISSING
    return EXACT if not set(a.phones).isdisjoint(b.phones) else DISAGREE


def compare_sex(a: Features, b: Features) -> Level:
    if not a.sex or not b.sex:
        return MISSING
    return EXACT if a.sex == b.sex else DISAGREE


# --- address ------------------------------------------------------------------------


def _street_similarity(a: Features, b: Features) -> float:
    """Best Jaro-Winkler of the street lines, also across line 1/line 2 (clerks swap them)."""
    best = _jw(a.street, b.street) if a.street and b.street else 0.0
    if a.street and b.other:
        best = max(best, _jw(a.street, b.other))
    if a.other and b.street:
        best = max(best, _jw(a.other, b.street))
    return best


def compare_address(a: Features, b: Features) -> Level:
    """Street and house number: exact / same street (number differs or missing) / similar / disagree."""
    if not (a.street or a.other) or not (b.street or b.other):
        return MISSING
    sim = 1.0 if a.street and a.street == b.street else _street_similarity(a, b)
    if sim >= 0.95 and a.number and a.number == b.number:
        return EXACT
    if sim >= 0.9:
        return STREET
    if sim >= 0.8:
        return SIMILAR
    return DISAGREE


def compare_place(a: Features, b: Features) -> Level:
    """Postcode and city: both agree / postcode only / city only / disagree."""
    postcode = city = None
    if a.postcode and b.postcode:
        postcode = a.postcode == b.postcode
    if a.city and b.city:
        city = a.city == b.city or _jw(a.city, b.city) >= CLOSE_JW
    if postcode is None and city is None:
        return MISSING
    if postcode and city:
        return EXACT
    if postcode:
        return POSTCODE
    if city:
        return CITY
    return DISAGREE


def compare(a: Features, b: Features) -> tuple[Level, ...]:
    """The comparison vector of a pair: one level per field of :data:`FIELDS`, in order."""
    family, given = compare_names(a, b)
    return (
        family,
        given,
        compare_middle(a, b),
        compare_suffix(a, b),
        compare_birth(a, b),
        compare_ssn(a, b),
        compare_address(a, b),
        compare_place(a, b),
        compare_phone(a, b),
        compare_sex(a, b),
    )
