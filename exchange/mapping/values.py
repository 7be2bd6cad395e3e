"""The record model as value objects, and the readers that build them from HL7 fields.

Every value here is a frozen dataclass (slots). A *patch* (``Demographics``,
``EncounterPatch``, ``DocumentPatch``) says what a message changes: a field
that is ``None`` means "no change" (the field was empty), :data:`DELETE`
means "delete the stored value" (the field was the HL7 null ``""``), anything
else is the new value. This is how A08/A31 updates are applied.

Timestamps keep their precision: ``parse_ts("1962")`` is the year 1962, not
1962-01-01. ``parse_ts`` never raises.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from enum import Enum, StrEnum

from exchange.outcome import Value

# Characters that show as nothing (Unicode's default-ignorable code points: a soft hyphen,
# zero-width spaces and joiners, direction marks and overrides, Hangul fillers, variation
# selectors, tags, the BOM), as a regular-expression class: "ID\u200b1" looks like "ID1",
# "\u202eNOSREDNA\u202c" like ANDERSON. No identifier takes one (mapping.events); the
# workbench shows each as a mark (web.pages).
INVISIBLE = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
             "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e0fff")

# The longest keys the record model keeps (the store's columns are this wide): an MRN (CX.1), a
# visit number (PV1-19, CX) and a document number (TXA-12, EI). A longer one is refused (AE 102):
# cut, two would become one.
MAX_MRN = 199
MAX_VISIT = 250
MAX_DOCUMENT_NUMBER = 427

# --- "no change" vs "delete" ---------------------------------------------------


class _Delete(Enum):
    """The HL7 null ``""``: delete the stored value."""

    DELETE = "delete"

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete.DELETE
"""Sentinel in a patch: the message sent ``""`` (delete the stored value)."""


def apply_patch_value(old, new):
    """What a stored value becomes under a patch value: None keeps, DELETE clears."""
    if new is None:
        return old
    if new is DELETE:
        return None
    return new


# --- timestamps ------------------------------------------------------------------


class Precision(StrEnum):
    YEAR = "year"
    MONTH = "month"
    DAY = "day"
    HOUR = "hour"
    MINUTE = "minute"
    SECOND = "second"
    FRACTION = "fraction"


_PRECISION_BY_DIGITS = {
    4: Precision.YEAR,
    6: Precision.MONTH,
    8: Precision.DAY,
    10: Precision.HOUR,
    12: Precision.MINUTE,
    14: Precision.SECOND,
}
_DATE_PRECISIONS = frozenset({Precision.YEAR, Precision.MONTH, Precision.DAY})


@dataclass(frozen=True, slots=True)
class Timestamp(Value):
    """A point in time as precise as the sender said.

    ``value`` is a ``date`` for year/month/day precision (missing parts are 1)
    and a ``datetime`` otherwise, timezone-aware when the sender gave an
    offset. ``text`` is the field as sent (for the record and for replays).
    """

    value: date | datetime
    precision: Precision
    text: str = ""

    def isoformat(self) -> str:
        if self.precision is Precision.YEAR:
            return f"{self.value.year:04d}"
        if self.precision is Precision.MONTH:
            return f"{self.value.year:04d}-{self.value.month:02d}"
        return self.value.isoformat()

    def date_isoformat(self) -> str:
        """The date alone, as precise as sent (a birth date: PID-7 may carry the time of birth)."""
        if self.precision in _DATE_PRECISIONS:
            return self.isoformat()
        return self.value.date().isoformat()

    @property
    def has_time(self) -> bool:
        return self.precision not in _DATE_PRECISIONS


_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?(?:[T ](\d{2})(?::?(\d{2})(?::?(\d{2}))?)?)?")
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})?$")


def parse_ts(text: str) -> tuple[date | datetime | None, Precision | None]:
    """Parse an HL7 DTM/TS/DT ``YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]``.

    Also reads 15–17 digit timestamps without the '.' (the digits after
    seconds are a fraction), ISO dates with dashes ("1928-01-01", optionally
    with a time) and a trailing "Z". Returns (value, precision), or
    (None, None) when the text is empty or not a timestamp. Never raises.
    """
    try:
        return _parse_ts(text)
    except (ValueError, OverflowError, TypeError):
        return None, None


def timestamp(text: str) -> Timestamp | None:
    """``parse_ts`` as a :class:`Timestamp` (None when empty or unparseable)."""
    value, precision = parse_ts(text)
    if value is None or precision is None:
        return None
    return Timestamp(value, precision, text.strip())


# TS.2, the degree of precision (v2.1-2.5; deprecated from 2.3, gone with DTM in 2.6): how much of
# TS.1 the sender knows. "19800101^Y" is a birth in 1980, not on 1 January.
DEGREE_OF_PRECISION = {"Y": Precision.YEAR, "L": Precision.MONTH, "D": Precision.DAY, "H": Precision.HOUR,
                       "M": Precision.MINUTE, "S": Precision.SECOND}
_FINER = {p: i for i, p in enumerate(Precision)}
DIGITS = {precision: n for n, precision in _PRECISION_BY_DIGITS.items()}  # of YYYYMMDDHHMMSS each precision has


def at_precision(ts: Timestamp, degree: str) -> Timestamp:
    """``ts`` cut to TS.2's ``degree`` of precision when that is coarser than its digits (an
    unknown or empty degree changes nothing)."""
    wanted = DEGREE_OF_PRECISION.get(degree.strip().upper())
    if wanted is None or _FINER[wanted] >= _FINER[ts.precision]:
        return ts
    v = ts.value
    if wanted in _DATE_PRECISIONS:
        day = v.date() if isinstance(v, datetime) else v
        if wanted is not Precision.DAY:
            day = day.replace(month=1 if wanted is Precision.YEAR else day.month, day=1)
        return Timestamp(day, wanted, ts.text)
    assert isinstance(v, datetime)
    v = v.replace(microsecond=0)
    if wanted is not Precision.SECOND:
        v = v.replace(second=0, minute=0 if wanted is Precision.HOUR else v.minute)
    return Timestamp(v, wanted, ts.text)


_TZ_CACHE: dict[str, timezone | None] = {}


def _offset(text: str) -> timezone | None:
    """'+hhmm' / '-hh' as a timezone (cached: there are few distinct offsets), None when invalid."""
    tz = _TZ_CACHE.get(text)
    if tz is None and text not in _TZ_CACHE:
        m = _OFFSET.match(text)
        if m is not None:
            hours, minutes = int(m.group(2)), int(m.group(3) or 0)
            if hours <= 23 and minutes <= 59:
                delta = timedelta(hours=hours, minutes=minutes)
                tz = timezone(-delta if m.group(1) == "-" else delta)
        if len(_TZ_CACHE) < 256:
            _TZ_CACHE[text] = tz
    return tz


def _parse_ts(text: str) -> tuple[date | datetime | None, Precision | None]:
    s = text.strip()
    if not s:
        return None, None
    n = len(s)
    if s.isdigit() and s.isascii():  # fast path: plain digits, no offset or fraction
        if n == 8:
            return date(int(s[:4]), int(s[4:6]), int(s[6:8])), Precision.DAY
        if n == 12 or n == 14:
            year = int(s[:4])
            if year < 1:
                return None, None
            if n == 12:
                return datetime(year, int(s[4:6]), int(s[6:8]), int(s[8:10]), int(s[10:12])), Precision.MINUTE
            second = int(s[12:14])
            if second == 60:  # leap second: keep the instant a second early
                second = 59
            return (
                datetime(year, int(s[4:6]), int(s[6:8]), int(s[8:10]), int(s[10:12]), second),
                Precision.SECOND,
            )
    if "^" in s:  # TS.1^TS.2 (degree of precision) in old versions
        s = s.split("^", 1)[0].strip()
    tz: timezone | None = None
    if s.endswith("Z") or s.endswith("z"):
        s = s[:-1]
        tz = timezone.utc
    if len(s) >= 7 and s[4] == "-":  # ISO date with dashes
        m = _ISO_DATE.match(s)
        if not m:
            return None, None
        rest = s[m.end():]
        s = "".join(g for g in m.groups() if g) + rest
    # Offset: +hhmm / -hhmm after at least a year.
    sign_at = max(s.rfind("+"), s.rfind("-"))
    if sign_at >= 0:
        if sign_at < 4:
            return None, None
        m = _OFFSET.match(s[sign_at:])
        if not m:
            return None, None
        tz = _offset(s[sign_at:])
        if tz is None:
            return None, None
        s = s[:sign_at]
    fraction = ""
    if "." in s:
        s, fraction = s.split(".", 1)
        if not fraction.isdigit() or not fraction.isascii():
            return None, None
    if not s.isdigit() or not s.isascii():
        return None, None
    digits = len(s)
    if digits > 14 and not fraction:  # 17-digit junk: YYYYMMDDHHMMSSfff
        s, fraction = s[:14], s[14:]
        digits = 14
    precision = _PRECISION_BY_DIGITS.get(digits)
    if precision is None:
        return None, None
    year = int(s[0:4])
    month = int(s[4:6]) if digits >= 6 else 1
    day = int(s[6:8]) if digits >= 8 else 1
    if year < 1:
        return None, None
    if precision in _DATE_PRECISIONS:
        if fraction:
            return None, None
        return date(year, month, day), precision
    hour = int(s[8:10])
    minute = int(s[10:12]) if digits >= 12 else 0
    second = int(s[12:14]) if digits >= 14 else 0
    micro = 0
    if fraction:
        if digits < 14:
            return None, None
        micro = int((fraction + "000000")[:6])
        precision = Precision.FRACTION
    if second == 60:  # leap second: keep the instant a second early
        second = 59
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz), precision


# --- identifiers, names, addresses, phones -------------------------------------------


@dataclass(frozen=True, slots=True)
class Identifier(Value):
    """CX: CX.1 id, CX.4 assigning authority (namespace and universal id), CX.5 type."""

    value: str
    authority: str = ""  # CX.4.1 namespace id
    authority_id: str = ""  # CX.4.2 universal id (an OID, ...)
    authority_id_type: str = ""  # CX.4.3 (ISO, DNS, ...)
    type_code: str = ""  # CX.5 (MR, PI, AN, SS, NH, ...)
    check_digit: str = ""  # CX.2
    facility: str = ""  # CX.6.1 assigning facility

    @property
    def key(self) -> tuple[str, ...]:
        """Where a record keeps it: one identifier per authority and type; without an authority
        (common before v2.3) the value itself tells two repetitions apart."""
        authority = self.authority or self.authority_id
        return (authority, self.type_code) if authority else ("", self.type_code, self.value)

    def issued_by(self, authority: str) -> bool:
        """True when CX.4 names ``authority`` (by namespace or universal id)."""
        return bool(authority) and (self.authority == authority or self.authority_id == authority)

    def same_authority(self, other: Identifier) -> bool:
        """True when both name the same authority (namespace or universal id), or both name none."""
        if not (self.authority or self.authority_id or other.authority or other.authority_id):
            return True
        if self.authority and self.authority == other.authority:
            return True
        return bool(self.authority_id) and self.authority_id == other.authority_id


@dataclass(frozen=True, slots=True)
class PersonName(Value):
    """XPN: family^given^middle^suffix^prefix^degree^type (XPN.7, table 0200: L legal, ...)."""

    family: str = ""
    given: str = ""
    middle: str = ""
    suffix: str = ""
    prefix: str = ""
    degree: str = ""
    use: str = ""

    @property
    def is_empty(self) -> bool:
        return not (self.family or self.given or self.middle or self.suffix or self.prefix or self.degree)


@dataclass(frozen=True, slots=True)
class Address(Value):
    """XAD: street^other^city^state^zip^country^type (XAD.7) ^other geographic^county."""

    street: str = ""
    other: str = ""
    city: str = ""
    state: str = ""
    postal_code: str = ""
    country: str = ""
    use: str = ""
    county: str = ""


# XAD.7 (table 0190) in the order a record's one address is chosen: where the patient lives first;
# a mailing address, a bad one or a birthplace only when there is nothing else.
_ADDRESS_PREFERENCE = {"H": 0, "L": 1, "P": 2, "C": 3, "": 4}
_ADDRESS_LAST = frozenset({"M", "BA", "BDL", "BR", "N", "F"})


def primary_address(addresses) -> Address | None:
    """The address that stands for the record (the API's ``address``, matching, the postcode
    column): the home address (XAD.7 H), else legal, permanent, current, untyped, any other; a
    mailing or bad address only when there is no other. None when there is none."""
    best, rank = None, None
    for i, a in enumerate(addresses or ()):
        if not isinstance(a, Address) or not any((a.street, a.other, a.city, a.state, a.postal_code, a.country)):
            continue
        use = a.use.upper()
        r = (_ADDRESS_PREFERENCE.get(use, 5) if use not in _ADDRESS_LAST else 6, i)
        if rank is None or r < rank:
            best, rank = a, r
    return best


@dataclass(frozen=True, slots=True)
class Phone(Value):
    """XTN: number (XTN.1, else built from XTN.5–8), use (XTN.2), equipment (XTN.3), e-mail (XTN.4)."""

    number: str = ""
    use: str = ""
    equipment: str = ""
    email: str = ""
    business: bool = False  # from PID-14 (business), not PID-13 (home): an update replaces each on its own


@dataclass(frozen=True, slots=True)
class Doctor(Value):
    """XCN: id (XCN.1) and name (XCN.2–7)."""

    id: str = ""
    name: PersonName = PersonName()
    authority: str = ""  # XCN.9.1


@dataclass(frozen=True, slots=True)
class Location(Value):
    """PL: point of care^room^bed^facility. ``text`` is "point of care^room^bed^facility"."""

    point_of_care: str = ""
    room: str = ""
    bed: str = ""
    facility: str = ""

    @property
    def text(self) -> str:
        return f"{self.point_of_care}^{self.room}^{self.bed}^{self.facility}"

    @property
    def is_empty(self) -> bool:
        return not (self.point_of_care or self.room or self.bed or self.facility)


# --- table 0001 -------------------------------------------------------------------

SEX_CODES = frozenset({"F", "M", "O", "U", "A", "N", "X"})


# --- patches -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Demographics(Value):
    """A patch of a facility patient record (from PID).

    None = no change, DELETE = delete, else the new value. ``identifiers`` are
    all PID-3 repetitions except the HL7 null ones; ``removed_authorities``
    are the authorities whose PID-3 repetition was ``""`` (delete that id).
    """

    identifiers: tuple[Identifier, ...] | None = None
    removed_authorities: tuple[str, ...] = ()
    name: PersonName | None | _Delete = None  # the legal name (XPN.7 = L, else the first)
    aliases: tuple[PersonName, ...] | None | _Delete = None  # every other PID-5 repetition
    mother_maiden_name: PersonName | None | _Delete = None  # PID-6
    birth: Timestamp | None | _Delete = None  # PID-7, with its precision
    sex: str | None | _Delete = None  # PID-8 (table 0001; unknown codes kept raw)
    addresses: tuple[Address, ...] | None | _Delete = None  # PID-11
    phones: tuple[Phone, ...] | None | _Delete = None  # PID-13 (home)
    business_phones: tuple[Phone, ...] | None | _Delete = None  # PID-14 (stored in phones, business=True)
    account: str | None | _Delete = None  # PID-18.1
    ssn: str | None | _Delete = None  # PID-19
    death: Timestamp | None | _Delete = None  # PID-29
    deceased: bool | None | _Delete = None  # PID-30 (Y/N)

    def fields_set(self) -> dict[str, object]:
        """The fields this patch changes (name -> value or DELETE)."""
        out = {}
        for name in self.__match_args__:
            v = getattr(self, name)
            if name == "removed_authorities":
                if v:
                    out[name] = v
            elif v is not None:
                out[name] = v
        return out


@dataclass(frozen=True, slots=True)
class EncounterPatch(Value):
    """A patch of one encounter (from PV1)."""

    patient_class: str | None | _Delete = None  # PV1-2
    location: Location | None | _Delete = None  # PV1-3
    prior_location: Location | None | _Delete = None  # PV1-6
    attending: Doctor | None | _Delete = None  # PV1-7 (first repetition)
    consulting: tuple[Doctor, ...] | None | _Delete = None  # PV1-9 (every repetition)
    admitted_at: Timestamp | None | _Delete = None  # PV1-44
    discharged_at: Timestamp | None | _Delete = None  # PV1-45

    def fields_set(self) -> dict[str, object]:
        return {n: getattr(self, n) for n in self.__match_args__ if getattr(self, n) is not None}


@dataclass(frozen=True, slots=True)
class Content(Value):
    """A document's content: text (OBX TX/FT/ST/CE lines) or bytes (OBX ED/RP)."""

    text: str | None = None
    data: bytes | None = None
    content_type: str = "text/plain"
    reference: str = ""  # RP.1 pointer when the content is a reference, not bytes

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        if self.text is not None:
            return len(self.text.encode("utf-8"))
        return 0


@dataclass(frozen=True, slots=True)
class DocumentPatch(Value):
    """What a TXA (+ OBX) says about a document. ``number`` is TXA-12.1 (the key)."""

    number: str
    number_field: str = ""  # TXA-12 whole (EI: entity^namespace^universal id^type), unescaped
    type: str | None = None  # TXA-2.1
    type_text: str | None = None  # TXA-2.2
    parent: str | None = None  # TXA-13.1
    completion_status: str | None = None  # TXA-17
    availability: str | None = None  # TXA-19
    confidentiality: str | None = None  # TXA-18.1 (table 0272: V very restricted, R restricted, U usual)
    author: Doctor | None = None  # TXA-9 (first repetition)
    authenticator: Doctor | None = None  # TXA-22 (first repetition)
    activity_at: Timestamp | None = None  # TXA-4
    originated_at: Timestamp | None = None  # TXA-6
    content: Content | None = None  # None: the message carried no content (T01/T03/...)

    def fields_set(self) -> dict[str, object]:
        return {n: getattr(self, n) for n in self.__match_args__ if getattr(self, n) is not None}


# --- readers: raw HL7 pieces -> values ------------------------------------------------


_PAD = tuple([""] * k for k in range(10))  # _PAD[k]: k empty components (never mutated)


def _padded(components: list[str], n: int) -> list[str]:
    """``components`` with at least ``n`` items (missing ones are "")."""
    k = n - len(components)
    return components + _PAD[k] if k > 0 else components


def identifier(components: list[str], sub: str, text) -> Identifier | None:
    """CX from its raw components; ``text`` unescapes. None when CX.1 is empty or ""."""
    if not components:
        return None
    value = text(components[0]).strip()
    if not value or value == '""':
        return None
    c = _padded(components, 6)
    hd = c[3].split(sub) if len(components) > 3 else ()
    nhd = len(hd)
    if text is str:  # nothing to unescape
        return Identifier(
            value,
            hd[0].strip() if nhd else "",
            hd[1].strip() if nhd > 1 else "",
            hd[2].strip() if nhd > 2 else "",
            c[4].strip(),
            c[1].strip(),
            c[5].split(sub)[0].strip(),
        )
    return Identifier(
        value,
        text(hd[0]).strip() if nhd else "",
        text(hd[1]).strip() if nhd > 1 else "",
        text(hd[2]).strip() if nhd > 2 else "",
        text(c[4]).strip(),
        text(c[1]).strip(),
        text(c[5].split(sub)[0]).strip(),
    )


def _part(components: list[str], i: int, text) -> str:
    return text(components[i]).strip() if len(components) > i and components[i] else ""


def person_name(components: list[str], sub: str, text) -> PersonName:
    """XPN from raw components. XPN.1 is FN: its first subcomponent is the surname."""
    c = _padded(components, 7)
    family = c[0]
    if sub in family:
        family = family.split(sub, 1)[0]
    return PersonName(*_stripped((family, c[1], c[2], c[3], c[4], c[5], c[6]), text))


def _stripped(values: tuple[str, ...], text) -> list[str]:
    """Each value unescaped by ``text`` (skipped for plain segments, where it is ``str``) and stripped."""
    if text is str:
        return [v.strip() for v in values]
    return [text(v).strip() for v in values]


def doctor(components: list[str], sub: str, text) -> Doctor | None:
    """XCN from raw components; None when empty."""
    if not any(components):
        return None
    name = person_name(components[1:], sub, text)
    auth = components[8].split(sub, 1)[0] if len(components) > 8 else ""
    return Doctor(text(components[0]).strip(), name, text(auth).strip())


def address(components: list[str], sub: str, text) -> Address:
    c = _padded(components, 9)
    street = c[0]
    if sub in street:
        street = street.split(sub, 1)[0]  # SAD.1
    return Address(*_stripped((street, c[1], c[2], c[3], c[4], c[5], c[6], c[8]), text))


def phone(components: list[str], sub: str, text) -> Phone | None:
    c = _padded(components, 8)
    number = text(c[0]).strip()
    if not number:  # v2.5+: country^area^local^extension in XTN.5-8
        local = text(c[6]).strip()
        if local:
            country = text(c[4]).strip()
            area = text(c[5]).strip()
            ext = text(c[7]).strip()
            number = " ".join(p for p in (f"+{country}" if country else "", area, local) if p)
            if ext:
                number += f" x{ext}"
    email = text(c[3]).strip()
    if not (number or email):
        return None
    return Phone(number, text(c[1]).strip(), text(c[2]).strip(), email)


def location(components: list[str], sub: str, text) -> Location | None:
    """PL from raw components (the first subcomponent of each); None when empty."""
    c = _padded(components, 4)
    first = [text(v.split(sub, 1)[0] if sub in v else v).strip() for v in c[:4]]
    if not (first[0] or first[1] or first[2] or first[3]):
        return None
    return Location(first[0], first[1], first[2], first[3])


__all__ = [
    "DELETE",
    "Address",
    "Content",
    "Demographics",
    "Doctor",
    "DocumentPatch",
    "EncounterPatch",
    "Identifier",
    "Location",
    "PersonName",
    "Phone",
    "Precision",
    "SEX_CODES",
    "primary_address",
    "Timestamp",
    "apply_patch_value",
    "parse_ts",
    "timestamp",
]

