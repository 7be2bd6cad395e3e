"""What to do with one arriving record: link it to a person, open a review, or start a new person.

Pure: the wiring finds the candidates (records sharing a blocking key, plus
the other records of their persons and of the record's own person) and the
sticky facts, calls :func:`decide`, and applies the :class:`Decision`.

The rules, in order:

1. A record whose link a technician made or confirmed (``manual``), or that
   a facility asserted (A24), stays where it is; if it no longer scores
   even ``lower`` against its person's other records, a review opens (the
   link is kept until a technician decides).
2. A record already linked automatically to a person with other records is
   re-examined on update (A08/A31): it stays unless it now scores below
   ``lower`` against its person, or another person also scores ``upper`` —
   then a review opens. Below ``lower`` (the update made it someone else),
   the wiring also takes the automatic link back at once (a person of its
   own until the review is decided: no copy crosses a link that no longer
   holds); a technician's or a facility's link is kept.
3. Persons holding a record the technician (or an A37) said is "not a
   match" for this one are never candidates for an automatic link.
4. Two records of one facility are never linked automatically: that is a
   duplicate registration (the facility fixes it with A40). A person at or
   above ``upper`` that already holds a record of this facility: a review.
5. Two different persons at or above ``upper``: a review.
6. One person at or above ``upper``: link -- unless its best record agrees the way two
   people of one family do, another of its records contradicts this one the way a
   relative's does (one SSN, or disagreeing middle names on one birth date), or another
   does not even reach ``lower`` against this one (``_caution``): a review. Same-facility records of other
   persons that score at or above ``lower`` come back with the link as
   ``duplicates`` (possible duplicate registrations, to review apart).
7. Otherwise, any same-facility candidate at or above ``lower``: a review
   (duplicate registration). Best at or above ``lower``: a review.
   Otherwise: a new person.

A person's score is the best score of any of its records.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from exchange.matching.compare import FIELD_NAMES, Level, a_day_apart
from exchange.matching.features import Features
from exchange.matching.model import Model, Score, score
from exchange.outcome import Value


class Action(StrEnum):
    LINK = "link"  # link the record to ``person`` (automatically)
    KEEP = "keep"  # leave the record with its current person
    REVIEW = "review"  # open a review with ``matches``; ``person`` is the best suggestion
    NEW = "new"  # start a new person for the record


class Reason(StrEnum):
    ABOVE_UPPER = "above_upper"
    BETWEEN = "between_thresholds"
    BELOW_LOWER = "below_lower"
    NO_CANDIDATES = "no_candidates"
    SAME_FACILITY = "same_facility"  # duplicate registration within one facility
    TWO_PERSONS = "two_persons_above_upper"
    NOT_A_MATCH = "not_a_match_excluded"  # a sticky "not a match" kept a person out
    MANUAL_KEPT = "manual_link_kept"
    LINK_KEPT = "link_kept"
    LINK_LOOKS_WRONG = "link_looks_wrong"  # the record no longer scores against its own person
    # Above upper, but the evidence has the shape of two people (a review, never a link):
    POSSIBLE_TWIN = "possible_twin"  # the same surname and birth date, given or middle names not the same, no SSN
    # agreeing
    SSN_ONLY = "ssn_only"  # one SSN on two people: birth dates no typo apart, JR/SR, or another given name with
    # another birth date or sex (a relative's SSN: an overlay)
    NO_BIRTH_DATE = "no_birth_date"  # no birth date on one side, no SSN or phone agreeing: names and places only
    PARENT_AND_CHILD = "parent_and_child"  # birth dates one digit apart, in the decade: 1950 / 1980
    NEWBORN = "newborn_placeholder"  # "Baby Girl", "Infant", ...: a newborn's placeholder name (twins look alike)
    NAME_AND_BIRTH_DATE_ONLY = "name_and_birth_date_only"  # a common surname in another town, nothing else agreeing
    CONFLICTING_MEMBER = "conflicting_member"  # another record of that person contradicts this one
    # the home (address, phone) would link them, but their own details tell two people of one
    # home apart (two residents of one care home of one first name) or fit a second error of one
    # person's (a married name with a typo in the birth date): a technician tells
    SHARED_HOME = "shared_home"


@dataclass(frozen=True, slots=True)
class Record(Value):
    """A facility record as matching sees it: its key, its person (None before it has one) and features."""

    facility: str
    mrn: str
    person: str | None  # candidates should have one; a candidate without counts as a person of its own
    features: Features

    @property
    def key(self) -> tuple[str, str]:
        return (self.facility, self.mrn)


Candidate = Record


@dataclass(frozen=True, slots=True)
class Match(Value):
    """A scored candidate: which record, its person, and the score with its explanation."""

    facility: str
    mrn: str
    person: str | None
    score: Score

    @property
    def total(self) -> float:
        return self.score.total


@dataclass(frozen=True, slots=True)
class Decision(Value):
    """The outcome for one record.

    ``person``: the person to link to (LINK), kept (KEEP), or the best
    suggestion (REVIEW); None for NEW. ``matches``: the scored candidates
    that matter, best first (for a review: every candidate at or above
    ``lower``, plus the record's own person's records), so a technician sees
    them side by side with every field's level and weight. ``score``: the
    best person's score (None without candidates). ``duplicates``: with a
    LINK, records of the same facility (in other persons) that scored at or
    above ``lower``: possible duplicate registrations, for a review of their
    own (the link itself is sound: the person it joins holds no record of
    this facility).
    """

    action: Action
    person: str | None
    score: float | None
    matches: tuple[Match, ...]
    reasons: tuple[Reason, ...]
    duplicates: tuple[Match, ...] = ()  # LINK only: same-facility records at or above lower, to review


def decide(
    record: Record,
    candidates: Iterable[Record],
    model: Model,
    *,
    not_a_match: Collection[tuple[str, str]] = (),
    manual: bool = False,
    today: date | None = None,
) -> Decision:
    """Decide one record against its candidates (see the module doc for the rules).

    ``not_a_match``: keys (facility, mrn) of records a technician or an A37
    said are not this record. ``manual``: the record's current link was made
    or confirmed by a technician, or asserted by its facility (A24).
    ``today``: the day ages are counted to (default: the clock's).
    Candidates equal to the record itself are ignored.
    """
    minors_since = (today or date.today()).year - MINOR_YEARS
    candidates = [c for c in candidates if c.key != record.key]
    features = {c.key: c.features for c in candidates}
    matches = [Match(c.facility, c.mrn, c.person, score(record.features, c.features, model)) for c in candidates]
    matches.sort(key=lambda m: (-m.total, m.facility, m.mrn))
    by_person: dict[object, list[Match]] = {}
    for m in matches:
        by_person.setdefault(_group(m), []).append(m)
    blocked = {_group(m) for m in matches if (m.facility, m.mrn) in not_a_match}
    best = {p: ms[0].total for p, ms in by_person.items()}
    upper, lower = model.upper, model.lower
    reasons: list[Reason] = []
    if blocked:
        reasons.append(Reason.NOT_A_MATCH)

    current = record.person
    own = by_person.get(current, []) if current is not None else []
    if current is not None and (own or manual):
        return _linked(record, current, own, matches, best, blocked, manual, model, reasons, features, minors_since)

    eligible = [p for p in best if p not in blocked]
    eligible.sort(key=lambda p: -best[p])
    above = [p for p in eligible if best[p] >= upper]
    same_facility = [
        m for m in matches if m.facility == record.facility and m.total >= lower and _group(m) not in blocked
    ]
    if not eligible:
        return _new(current, matches, reasons + [Reason.NO_CANDIDATES if not matches else Reason.BELOW_LOWER])
    top = eligible[0]
    top_score = best[top]
    person = by_person[top][0].person
    if top_score >= upper:
        if any(m.facility == record.facility for m in by_person[top]):
            return _review(person, top_score, matches, lower, reasons + [Reason.SAME_FACILITY])
        if len(above) >= 2:
            return _review(person, top_score, matches, lower, reasons + [Reason.TWO_PERSONS])
        caution = _caution(record, by_person[top], features, model, minors_since)
        if caution is not None:
            return _review(person, top_score, matches, lower, reasons + [caution])
        # Weaker same-facility look-alikes (other persons, below upper) do not stop the
        # link; they are handed back as possible duplicate registrations to review.
        reasons.append(Reason.ABOVE_UPPER)
        if same_facility:
            reasons.append(Reason.SAME_FACILITY)
        return Decision(Action.LINK, person, top_score, tuple(by_person[top]), tuple(reasons), tuple(same_facility))
    if same_facility:
        return _review(person, top_score, matches, lower, reasons + [Reason.SAME_FACILITY])
    if top_score >= lower:  # and the technician is told the shape of two people, if the pair has one
        caution = _caution(record, by_person[top], features, model, minors_since)
        return _review(person, top_score, matches, lower, reasons + [Reason.BETWEEN] + ([caution] if caution else []))
    kept = [m for m in matches if m.score.paired_before is not None and m.score.paired_before >= upper
            and _group(m) not in blocked]
    if kept:  # the household rule kept a link from happening on small differences: not silently
        return _review(kept[0].person, kept[0].total, matches, lower, reasons + [Reason.SHARED_HOME], kept)
    return _new(current, matches, reasons + [Reason.BELOW_LOWER])


_F = {name: i for i, name in enumerate(FIELD_NAMES)}
_SSN_AGREES = frozenset({Level.EXACT, Level.TRANSPOSED})


def _caution(record: Record, members: list[Match], features, model: Model, minors_since: int, *,
             family_only: bool = False) -> Reason | None:
    """Why a person scoring at or above ``upper`` must still not be linked automatically:
    its best record agrees the way two people of one family do (or two strangers sharing a
    common name and birthday), another of its records contradicts the arriving one the way a
    relative's does (a link joins the record with every record of the person), or another of
    its records does not even reach ``lower`` against it (a chain: A like B, B like C, A not C;
    not with ``family_only``)."""
    for i, m in enumerate(members):
        reason = _family_shape(record.features, m, features[(m.facility, m.mrn)], model, minors_since, best=i == 0)
        if reason is not None:
            return reason
    if not family_only and any(m.total < model.lower for m in members[1:]):  # not even a candidate for review
        return Reason.CONFLICTING_MEMBER
    return None


def _family_shape(mine: Features, match: Match, other: Features, model: Model, minors_since: int, *,
                  best: bool) -> Reason | None:
    """The shape of two people of one family between the arriving record and one record of the
    person. Of the person's ``best`` record, also the shapes of too little evidence (a newborn's
    placeholder name, no birth date, twins named alike, a common name and birthday); of its
    other records, only what contradicts: a relative under one SSN, a generation apart, middle
    names that disagree on one birth date. ``minors_since``: the birth year from which a person
    is a child today."""
    levels = match.score.levels
    ssn, birth, given = levels[_F["ssn"]], levels[_F["birth"]], levels[_F["given"]]
    family = levels[_F["family"]] in _FAMILY_SAME
    if best and (_newborn(mine) or _newborn(other)):
        return Reason.NEWBORN
    born_together = birth is Level.EXACT or a_day_apart(mine, other)  # (either side of midnight)
    child = (mine.birth_year or 0) > minors_since
    if best and born_together and family and not mine.given and not other.given and child:
        # no given names yet, one birth date, one family: newborns (twins look alike). An adult's
        # records without a given name are a registration's gap, not a child's placeholder.
        return Reason.NEWBORN
    years_apart = abs((mine.birth_year or 0) - (other.birth_year or 0)) if mine.birth_year and other.birth_year else 0
    decades_apart = birth is Level.ONE_DIGIT and years_apart >= 10
    if ssn in _SSN_AGREES:
        # A parent's SSN is copied onto a child's record, a guarantor's onto a spouse's (an overlay):
        # one SSN does not tell relatives apart, and outweighs none of the fields that do. Two people
        # under one SSN: birth dates that are no typo of each other (not one digit off, swapped or in
        # the same year), or one digit but a generation apart (MARY ANN 1950 and MARY ANN 1980 at one
        # home under the mother's SSN: a typo of the decade or the daughter, nothing tells; a review);
        # JR against SR; another given name with the birth date not the same; another given name and
        # the other sex; another middle name (THOMAS E and THOMAS M, ELIZABETH A and MARGARET B);
        # and, born the same day, another given name: twins under their parent's SSN.
        if (birth is Level.DISAGREE or levels[_F["suffix"]] is Level.DISAGREE
                or decades_apart and years_apart >= 15 and family
                or given is Level.DISAGREE and birth is not Level.EXACT
                or given in _TWIN_GIVEN and birth is Level.OTHER_DAY  # Maria, Mariah: ten months apart
                or given in _TWIN_GIVEN and levels[_F["sex"]] is Level.DISAGREE
                or family and levels[_F["middle"]] is Level.DISAGREE):
            return Reason.SSN_ONLY
        if family and given is Level.DISAGREE and birth is Level.EXACT:
            return Reason.POSSIBLE_TWIN  # twins under their parent's SSN, named apart
        return None
    if best and birth is Level.MISSING:
        return Reason.NO_BIRTH_DATE  # names and places only (a phone is the household's: a son's, a father's)
    if birth in _TYPO_APART and family and levels[_F["middle"]] is Level.DISAGREE:
        return Reason.POSSIBLE_TWIN  # John Paul and John Michael (or John P. and John M.), born either side of
        # midnight too: twins
    if decades_apart:
        return Reason.PARENT_AND_CHILD  # of any record of the person: a link joins them all
    if not best:
        return None
    named_apart = given in _TWIN_GIVEN  # not the same name, a nickname or an initial of it
    if (given is not Level.EXACT and ssn is Level.ONE_DIGIT  # sequential SSNs
            and (birth is Level.EXACT or a_day_apart(mine, other))  # twins born either side of midnight
            or family and (birth is Level.EXACT and ssn in (Level.MISSING, Level.DISAGREE) and named_apart
                           or birth is Level.ONE_DIGIT and named_apart)):  # siblings months apart
        return Reason.POSSIBLE_TWIN  # no SSN tells them apart (or each has her own): twins are named alike
    if family and born_together and not (mine.given and other.given) and child:
        return Reason.NEWBORN  # one of them not named yet: a newborn, or her twin
    if (_common_family(mine, model) or ssn is Level.DISAGREE) and not any(
            levels[_F[f]] in agree for f, agree in _CORROBORATE):
        return Reason.NAME_AND_BIRTH_DATE_ONLY  # two John Smiths born the same day (in one town, too), or two SSNs
    if (levels[_F["family"]] in _OTHER_SURNAME and birth in (Level.ONE_DIGIT, Level.SWAPPED)
            and any(levels[_F[f]] in agree for f, agree in _CORROBORATE)):
        return Reason.SHARED_HOME  # Dorothy Kowalczyk and Dorothy Halverson, born ten days apart at one care home
    return None


MINOR_YEARS = 18  # born fewer years ago than this: a child (unnamed twins are children)
_FAMILY_SAME = frozenset({Level.EXACT, Level.PART})
_OTHER_SURNAME = frozenset({Level.CLOSE, Level.SIMILAR, Level.DISAGREE})  # not the same, nor a part or alias
_TYPO_APART = frozenset({Level.EXACT, Level.ONE_DIGIT, Level.SWAPPED})  # birth dates (a day apart is one digit)
_ADDRESS_SAME = frozenset({Level.EXACT, Level.STREET, Level.SIMILAR})
_TWIN_GIVEN = frozenset({Level.CLOSE, Level.SIMILAR, Level.DISAGREE})  # not a nickname or an initial: one person
# Fields that corroborate a name and a birth date (the levels at which they do).
_CORROBORATE = (
    ("phone", frozenset({Level.EXACT})),
    ("address", _ADDRESS_SAME),
)
# A newborn's placeholder given name (HL7 sites register "BABY GIRL", "BABYBOY", "INFANT" ...
# before the parents name the child): twins share it with their birth date and household.
_NEWBORN_GIVEN = frozenset({"baby", "babygirl", "babyboy", "infant", "newborn", "nb", "bg", "bb", "girl", "boy",
                            "twin", "female", "male", "unknown", "unk", "inf", "rn", "bebe"})


# The most frequent US surnames (Census 2010, each at least 0.13 % of people), used until the
# match-model job has measured the index's own frequencies (Model.tf).
COMMON_SURNAMES = frozenset("""
smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez gonzalez wilson
anderson thomas taylor moore jackson martin lee perez thompson white harris sanchez clark ramirez lewis robinson
walker young allen king wright scott torres nguyen hill flores green adams nelson baker hall rivera campbell
mitchell carter roberts
""".split())
COMMON_SHARE = 0.0013  # a surname at least this frequent in the index is a common one


def _common_family(f: Features, model: Model) -> bool:
    """Whether two people may well share this surname and a birthday: a frequent surname."""
    table = model.tf.get("family")
    if table:  # the index's own frequencies, once the match-model job has run
        return table.get(f.family, 0.0) >= COMMON_SHARE
    return f.family in COMMON_SURNAMES


def _newborn(f: Features) -> bool:
    return (f.given in _NEWBORN_GIVEN or f.given_full.startswith(("babygirl", "babyboy", "twin", "infant", "newborn"))
            or _NEWBORN_FULL.fullmatch(f.given_full) is not None)


# "BOYA", "GIRL B", "BB1", "TWIN 2", "INF": a placeholder and the letter or number telling twins apart;
# "JUDYS GIRL A", "MARIA'S BABY BOY": the mother's name, the sex and the letter (the Joint Commission's
# convention for newborns, multiple births above all)
_NEWBORN_FULL = re.compile(r"(?:(baby|boy|girl|bb|bg|nb|rn|inf|bebe|twin|female|male)|[a-z]+s(?:baby)?(?:girl|boy))"
                           r"(?:[abc]|[1-4]|one|two)?")


def _group(m: Match) -> object:
    """The person a match belongs to; a candidate without a person is a person of its own."""
    return m.person if m.person is not None else (m.facility, m.mrn)


def _linked(record, current, own, matches, best, blocked, manual, model, reasons, features, minors_since
            ) -> Decision:
    """Rules 1 and 2: a record that already belongs to a person with other records."""
    own_score = own[0].total if own else None
    others_above = [p for p, s in best.items() if p != current and p not in blocked and s >= model.upper]
    looks_wrong = own_score is not None and own_score < model.lower
    if manual:
        if looks_wrong:
            return _review(current, own_score, matches, model.lower, reasons + [Reason.LINK_LOOKS_WRONG], own)
        return Decision(Action.KEEP, current, own_score, tuple(own), tuple(reasons + [Reason.MANUAL_KEPT]))
    if looks_wrong:
        return _review(current, own_score, matches, model.lower, reasons + [Reason.LINK_LOOKS_WRONG], own)
    caution = _caution(record, own, features, model, minors_since, family_only=True) if own else None
    if caution is not None:  # an update made the records look like two members of one family
        return _review(current, own_score, matches, model.lower, reasons + [Reason.LINK_LOOKS_WRONG, caution], own)
    if others_above:
        return _review(current, own_score, matches, model.lower, reasons + [Reason.TWO_PERSONS], own)
    return Decision(Action.KEEP, current, own_score, tuple(own), tuple(reasons + [Reason.LINK_KEPT]))


def _review(person, top_score, matches, lower, reasons, always=()) -> Decision:
    shown = [m for m in matches if m.total >= lower]
    shown += [m for m in always if m not in shown]
    shown.sort(key=lambda m: (-m.total, m.facility, m.mrn))
    return Decision(Action.REVIEW, person, top_score, tuple(shown), tuple(reasons))


def _new(current, matches, reasons) -> Decision:
    """No person fits: a new one (or, for a record that has a person of its own, keep it)."""
    top = matches[0].total if matches else None
    action = Action.KEEP if current is not None else Action.NEW
    return Decision(action, current, top, tuple(matches[:3]), tuple(reasons))
