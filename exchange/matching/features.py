"""What matching needs to know about a facility patient record, normalised once.

A record is compared with many candidates, and is itself a candidate for
many later records, so everything that does not depend on the other side
(case folding, accents, nickname look-up, phonetic codes, digits of SSN and
phones, house number split from the street) is done here, once, and kept in
a small frozen :class:`Features` value that pickles cheaply (it crosses to
the writer process and may be cached next to the record).

:func:`blocking_keys` gives the short strings under which a record is
indexed; two records become a candidate pair when they share one key.
"""
from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import Any

import jellyfish

from exchange.mapping.values import PersonName, Phone, Precision, Timestamp, primary_address
from exchange.matching.nicknames import canonical_given_names
from exchange.outcome import Value

# --- text normalisation ----------------------------------------------------------

_NOT_LETTER = re.compile(r"[^a-z ]+")
_NOT_ALNUM = re.compile(r"[^a-z0-9 ]+")
_SPACES = re.compile(r"\s+")
_DIGITS = re.compile(r"\D+")


def fold(text: str | None) -> str:
    """Lower case ASCII with accents removed ("Müller" -> "muller")."""
    if not text:
        return ""
    decomposed = unicodedata.normalize("NFKD", text)
    return decomposed.encode("ascii", "ignore").decode("ascii").lower()


def name_tokens(text: str | None) -> list[str]:
    """Words of a name: letters only; apostrophes join ("O'Brien" -> obrien), other marks split."""
    s = fold(text).replace("'", "").replace("`", "")
    return _NOT_LETTER.sub(" ", s).split()


def digits(text: str | None) -> str:
    return _DIGITS.sub("", text) if text else ""


# --- suffixes and titles -----------------------------------------------------------

_SUFFIXES = {
    "jr": "JR", "jnr": "JR", "junior": "JR",
    "sr": "SR", "snr": "SR", "senior": "SR",
    "i": "I", "1st": "I", "first": "I",
    "ii": "II", "2nd": "II", "second": "II",
    "iii": "III", "3rd": "III", "third": "III",
    "iv": "IV", "4th": "IV",
    "v": "V", "5th": "V",
}  # fmt: skip
# Generational suffixes that may also stand at the end of the family or given
# field ("Smith Jr"); single letters (I, V) only count in the suffix field.
_TRAILING_SUFFIXES = {k: v for k, v in _SUFFIXES.items() if len(k) > 1 and k not in ("first", "second", "third")}
_TITLES = frozenset({"mr", "mrs", "ms", "miss", "dr", "prof", "rev", "sir", "mx"})


def normalise_suffix(text: str | None) -> str:
    """PID-5.4 as JR, SR, I, II, III, IV or V; anything else (MD, PHD, ...) is no suffix."""
    for token in _NOT_ALNUM.sub(" ", fold(text)).split():
        found = _SUFFIXES.get(token)
        if found:
            return found
    return ""


def _split_trailing_suffix(tokens: list[str]) -> tuple[list[str], str]:
    if len(tokens) > 1 and tokens[-1] in _TRAILING_SUFFIXES:
        return tokens[:-1], _TRAILING_SUFFIXES[tokens[-1]]
    return tokens, ""


# --- streets -----------------------------------------------------------------------

_STREET_WORDS = {
    "street": "st", "str": "st", "avenue": "ave", "av": "ave", "road": "rd", "drive": "dr",
    "lane": "ln", "court": "ct", "place": "pl", "crescent": "cres", "cresent": "cres",
    "circuit": "cct", "boulevard": "blvd", "terrace": "tce", "parade": "pde", "highway": "hwy",
    "square": "sq", "close": "cl", "way": "wy", "circle": "cir", "parkway": "pkwy",
    "north": "n", "south": "s", "east": "e", "west": "w", "apartment": "apt", "unit": "unit",
}  # fmt: skip
_STREET_ABBREVIATIONS = frozenset(_STREET_WORDS.values())
_SQUASHED_STREET_WORDS = tuple(
    (long, short) for long, short in _STREET_WORDS.items() if len(long) >= 5 and long not in ("north", "south")
)
_HOUSE_NUMBER = re.compile(r"^\s*(\d+[a-z]?)(?:\s*[-/]\s*\d+[a-z]?)?\b\s*")


def split_street(text: str | None) -> tuple[str, str]:
    """(house number, street name squashed) from a street line: "12 Pinkerton Circuit" -> ("12", "pinkertoncct").

    The name is squashed (no spaces) because typists split and join words
    ("ginganastreet"); common street words are abbreviated one way.
    """
    s = _NOT_ALNUM.sub(" ", fold(text))
    number = ""
    m = _HOUSE_NUMBER.match(s)
    if m:
        number = m.group(1)
        s = s[m.end():]
    words = [_STREET_WORDS.get(w, w) for w in s.split()]
    if words and words[-1] not in _STREET_ABBREVIATIONS:  # "westonstreet": a word typed onto the name
        last = words[-1]
        for long, short in _SQUASHED_STREET_WORDS:
            if last.endswith(long) and len(last) > len(long) + 2:
                words[-1] = last[: -len(long)] + short
                break
    return number, "".join(words)


def normalise_phone(text: str | None) -> str:
    """Digits of a phone number, the last 10 (drops a country code); '' when fewer than 7."""
    d = digits(text)
    return d[-10:] if len(d) >= 7 else ""


def normalise_ssn(text: str | None) -> str:
    """Digits of an SSN; '' for fewer than 4 digits, an obvious filler (one digit repeated, or all
    but one; a run such as 123456789 or 1234; 078-05-1120) or a number the SSA never issues (area
    000 or 666, group 00, serial 0000: 999-00-0000 and the like are what registration clerks type
    for "unknown", and strangers share them)."""
    d = digits(text)
    if len(d) < 4 or d in "0123456789" or d in "9876543210" or d in _SSN_FILLERS:
        return ""
    if max(d.count(c) for c in set(d)) >= len(d) - 1:  # 999999999, and 999999998 or 000000001
        return ""
    if len(d) == 9 and (d[:3] in ("000", "666") or d[3:5] == "00" or d[5:] == "0000"):
        return ""
    return d


# An SSN thousands have used: the one printed in the 1938 Woolworth wallet insert.
_SSN_FILLERS = frozenset({"078051120"})


def normalise_postcode(text: str | None) -> str:
    """Letters and digits upper case; a US ZIP+4 keeps its first five digits."""
    s = re.sub(r"[^A-Z0-9]", "", fold(text).upper())
    if len(s) == 9 and s.isdigit():
        return s[:5]
    return s


@lru_cache(maxsize=65536)
def phonetic(name: str) -> str:
    """NYSIIS code of a (squashed) name, '' for none. Cached: names repeat a lot."""
    return jellyfish.nysiis(name) if name else ""


@lru_cache(maxsize=65536)
def soundex(name: str) -> str:
    return jellyfish.soundex(name) if name else ""


# --- the value ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Features(Value):
    """A record's matching fields, normalised (lower case ASCII, squashed names).

    Empty string / None / () mean "not known": a missing value never counts
    for or against a match.
    """

    family: str = ""  # squashed family name ("hansonmoore")
    family_parts: tuple[str, ...] = ()  # other surnames: parts of a compound name, alias (maiden) names
    given: str = ""  # first given name ("mary" of "Mary Ann")
    given_full: str = ""  # all given names squashed ("maryann")
    given_canon: tuple[str, ...] = ()  # formal names the first given name stands for (liz -> elizabeth)
    middle: str = ""  # first middle name
    suffix: str = ""  # JR, SR, II, III, ...
    family_code: str = ""  # NYSIIS of family
    family_soundex: str = ""
    given_code: str = ""  # NYSIIS of given
    given_soundex: str = ""
    birth_year: int | None = None
    birth_month: int | None = None  # None when the sender gave only a year
    birth_day: int | None = None  # None when the sender gave no day
    birth_digits: str = ""  # YYYYMMDD when the full birth date is known
    sex: str = ""  # "M" or "F"; other codes count as unknown
    ssn: str = ""  # digits
    phones: tuple[str, ...] = ()  # digits, last 10, sorted
    number: str = ""  # house number
    street: str = ""  # street name squashed, street words abbreviated
    other: str = ""  # second address line squashed
    city: str = ""  # squashed
    postcode: str = ""
    state: str = ""


def features_of(record: Mapping[str, Any]) -> Features:
    """Features of a record dict shaped like ``MemoryState.records`` entries.

    Reads "name" (PersonName), "aliases" (PersonNames), "birth" (Timestamp),
    "sex", "addresses" (Addresses: the primary one counts, values.primary_address), "phones" (Phones)
    and "ssn"; ignores everything else. Never raises on odd text.
    """
    name: PersonName | None = record.get("name")
    aliases: Iterable[PersonName] = record.get("aliases") or ()
    family_tokens, family_suffix = _split_trailing_suffix(name_tokens(name.family if name else ""))
    given_tokens, given_suffix = _split_trailing_suffix(name_tokens(name.given if name else ""))
    if len(given_tokens) > 1 and given_tokens[0] in _TITLES:
        given_tokens = given_tokens[1:]
    middle_tokens = name_tokens(name.middle if name else "")
    family = "".join(family_tokens)
    given = given_tokens[0] if given_tokens else ""
    middle = given_tokens[1] if len(given_tokens) > 1 else (middle_tokens[0] if middle_tokens else "")

    parts: list[str] = [t for t in family_tokens if len(t) > 1] if len(family_tokens) > 1 else []
    for alias in aliases:
        if alias is None:
            continue
        alias_tokens, _ = _split_trailing_suffix(name_tokens(alias.family))
        if alias_tokens:
            parts.append("".join(alias_tokens))
            if len(alias_tokens) > 1:
                parts.extend(t for t in alias_tokens if len(t) > 1)
    family_parts = tuple(sorted({p for p in parts if p != family}))[:6]

    suffix = normalise_suffix(name.suffix if name else "") or family_suffix or given_suffix
    year, month, day = _birth(record.get("birth"))
    sex = (record.get("sex") or "").strip().upper()[:1] if isinstance(record.get("sex"), str) else ""
    phones = tuple(sorted({p for p in (normalise_phone(_phone_text(ph)) for ph in record.get("phones") or ()) if p}))
    address = primary_address(record.get("addresses"))
    number, street = split_street(address.street if address else "")
    other_number, other = split_street(address.other if address else "")
    if not number and not street and other:  # the whole street line is in XAD.2
        number, street, other = other_number, other, ""
    return Features(
        family=family,
        family_parts=family_parts,
        given=given,
        given_full="".join(given_tokens),
        given_canon=canonical_given_names(given),
        middle=middle,
        suffix=suffix,
        family_code=phonetic(family),
        family_soundex=soundex(family),
        given_code=phonetic(given),
        given_soundex=soundex(given),
        birth_year=year,
        birth_month=month,
        birth_day=day,
        birth_digits=f"{year:04d}{month:02d}{day:02d}" if day is not None else "",
        sex=sex if sex in ("M", "F") else "",
        ssn=normalise_ssn(record.get("ssn") if isinstance(record.get("ssn"), str) else ""),
        phones=phones,
        number=number,
        street=street,
        other=other,
        city="".join(name_tokens(address.city if address else "")),
        postcode=normalise_postcode(address.postal_code if address else ""),
        state="".join(name_tokens(address.state if address else "")),
    )


_FEATURES_VERSION = 1


def encode_features(f: Features) -> str:
    """Compact JSON (a versioned list of the field values) to store next to a record.

    Candidates are loaded by the dozen per message; reading this back is
    cheaper than rebuilding features from the full record.
    """
    return json.dumps([_FEATURES_VERSION, *(getattr(f, n) for n in Features.__match_args__)], separators=(",", ":"))


_TUPLE_FIELDS = tuple(i for i, f in enumerate(dataclasses.fields(Features), 1) if f.default == ())  # in the list


def decode_features(text: str) -> Features:
    """The inverse of :func:`encode_features`; raises ValueError for another version (recompute then).

    A few dozen candidates are decoded per message: the tuple fields are
    converted by position, not found by testing every value (7 -> 5 us)."""
    values = json.loads(text)
    if type(values) is not list or len(values) != len(Features.__match_args__) + 1 or values[0] != _FEATURES_VERSION:
        raise ValueError("stored features are of another version")
    for i in _TUPLE_FIELDS:
        if type(values[i]) is not list:
            raise ValueError("stored features are of another version")
        values[i] = tuple(values[i])
    return Features(*values[1:])


def _phone_text(phone: Any) -> str:
    if isinstance(phone, Phone):
        return phone.number
    return phone if isinstance(phone, str) else ""


def _birth(birth: Any) -> tuple[int | None, int | None, int | None]:
    if not isinstance(birth, Timestamp) or not isinstance(birth.value, date):
        return None, None, None
    v = birth.value
    if birth.precision is Precision.YEAR:
        return v.year, None, None
    if birth.precision is Precision.MONTH:
        return v.year, v.month, None
    return v.year, v.month, v.day


# --- blocking ---------------------------------------------------------------------------


KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "ssn": ("ssn",),
    "ph": ("phone",),
    "dob": ("birth",),
    "pb": ("family", "birth"),
    "fg": ("family", "given"),
    "gp": ("given", "place"),
    "fp": ("family", "place"),
}
"""Kind of blocking key (the text before the first ':') -> the compared fields it
fixes. Pairs found through one kind say nothing about how often matches agree on
those fields: EM leaves them out (``model.estimate_by_sessions``)."""


def blocking_keys(f: Features) -> frozenset[str]:
    """The index keys of a record: a candidate is any record sharing at least one.

    Each key pairs two fields (or one very selective field), so a true match
    is missed only when every pair has an error, and a key's posting list
    stays short (tens of records in a million):

    - ``ssn:<digits>`` and ``ph:<phone>``: one field, nearly unique;
    - ``dob:<yyyymmdd>``: about 30 persons per date in a million;
    - ``pb:<family code>:<birth year>``: phonetic surname and year (a typo in
      the day, month or given name);
    - ``fg:<code>:<code>``: phonetic family and given names in sorted order
      (a wrong birth date; swapped name fields);
    - ``gp:<given code>:<postcode>`` and ``fp:<family code>:<postcode>``
      (a new surname, a swapped or wrong birth date);
    - ``fg`` and ``pb`` keys also for the other surnames (compound and alias
      names) and the formal forms of a nickname, so "Liz Hansen" and
      "Elizabeth Hanson-Moore" share keys.

    Keys hold codes and digits, not names in clear, and are short.
    """
    keys: set[str] = set()
    if f.ssn:
        keys.add("ssn:" + f.ssn)
    for p in f.phones:
        keys.add("ph:" + p)
    dob = f.birth_digits
    if dob:
        keys.add("dob:" + dob)
    families = {f.family_code} if f.family_code else set()
    families.update(phonetic(p) for p in f.family_parts[:3])
    givens = {f.given_code} if f.given_code else set()
    givens.update(phonetic(c) for c in f.given_canon[:6])
    families.discard("")
    givens.discard("")
    for fam in families:
        if f.birth_year is not None:
            keys.add(f"pb:{fam}:{f.birth_year}")
        for giv in givens:
            keys.add("fg:" + ":".join(sorted((fam, giv))))  # in either order: clerks swap the fields
    if f.postcode:
        for giv in givens:
            keys.add(f"gp:{giv}:{f.postcode}")
        if f.family_code:
            keys.add(f"fp:{f.family_code}:{f.postcode}")
    return frozenset(keys)
