"""Fellegi–Sunter scoring: the model, the score of a pair, and EM estimation.

For every field and agreement level the model holds *m* (how often a true
match lands in that level) and *u* (how often two different people do). A
pair's weight for a field is ``log2(m / u)``: positive when the level is
more typical of matches, negative when more typical of non-matches, 0 when
the field is missing on either side. The total is the sum, in bits.

Two corrections to independence make the total safe in a live feed:

* **Term frequency**: agreeing on a surname that one person in a hundred
  bears ("Smith") is weaker evidence than on one borne by one in a hundred
  thousand ("Kowalczyk"). An exact agreement on family or given name weighs
  ``log2(m / tf(value))`` instead of ``log2(m / u)`` (Splink's adjustment),
  clamped to ``±TF_CLAMP`` bits; ``tf`` comes from the index.
* **Household rule**: twins, spouses, and father and son share surname,
  address and phone, and these fields are not independent of one another.
  When a field that tells individuals apart (given name, birth date, name
  suffix, sex) *disagrees* (for the given name: is only similar, or an
  initial), agreements on the household fields (family name, address,
  place, phone) count 0; their disagreements still count.
  So a household member never reaches the link threshold on shared
  household facts, and the explanation says so. An SSN that agrees exactly
  (or with two adjacent digits swapped) suspends the rule: household
  members seldom share one, and the disagreeing field is then most often a
  typo or a replaced value. Seldom is not never (a parent's SSN copied
  onto a child's record, a guarantor's onto a spouse's): the score still
  counts the household then, and ``decide`` reviews the shapes of two
  people under one SSN (a birth date that is no typo of the other, JR
  against SR, another given name with another birth date or sex:
  ``ssn_only``) however high it is. An SSN one digit off does not suspend
  the rule and is itself not counted: twins' SSNs are often issued in
  sequence.

A :class:`Model` is a plain value, serialisable to JSON (it is stored in the
database next to the index and versioned there). :func:`default_model` is
hand-set and works before any data has been seen; :func:`estimate` refines
m and u by expectation maximisation over candidate pairs.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from exchange.matching.compare import FIELD_NAMES, FIELDS, Level, compare
from exchange.matching.features import Features
from exchange.outcome import Value

L = Level

TF_FIELDS = ("family", "given")
"""Fields whose exact agreement is adjusted by the value's frequency."""
TF_CLAMP = 5.0
"""Largest term-frequency adjustment, in bits, either way."""

HOUSEHOLD_FIELDS = frozenset({"family", "address", "place", "phone"})
INDIVIDUAL_FIELDS: dict[str, frozenset[Level]] = {
    "given": frozenset({L.DISAGREE, L.SIMILAR, L.INITIAL}),
    "birth": frozenset({L.DISAGREE}),
    "suffix": frozenset({L.DISAGREE}),
    "sex": frozenset({L.DISAGREE}),
}
"""Fields that tell household members apart, and the levels at which they do: any of
these drops the positive weights of HOUSEHOLD_FIELDS. A given name merely similar
(Aiden / Aidan, Jack / Jake) or reduced to an initial counts: twins' names often are."""
PAIRED_FIELDS: dict[str, frozenset[Level]] = {
    "birth": frozenset({L.OTHER_DAY}),
    "family": frozenset({L.CLOSE, L.SIMILAR, L.DISAGREE}),
    "given": frozenset({L.CLOSE}),
    "middle": frozenset({L.DISAGREE}),
    "ssn": frozenset({L.DISAGREE}),
}
"""Differences that each one person has now and then (a birth date entered as another day of
the year, a married name or a typo of the surname, a typo of the given name, a middle name
left as another, an SSN typed wrong) but that two by two tell two people of one home apart:
the birth date another day of the year with any other of them (sisters Maria and Mariah ten
months apart, two residents of one care home born in 1932, in-laws with SSNs of their own);
another surname with two SSNs or another middle name (Mary Ann Kowalski and Mary Louise
O'Brien). A married name with a typo of the given name stays one person."""
_INDIVIDUAL_INDEX = tuple((name, FIELD_NAMES.index(name), levels) for name, levels in INDIVIDUAL_FIELDS.items())
_SSN_INDEX = FIELD_NAMES.index("ssn")
_PAIRED_INDEX = tuple((name, FIELD_NAMES.index(name), levels) for name, levels in PAIRED_FIELDS.items())
_ADDRESS_INDEX = FIELD_NAMES.index("address")
_MOVE_INDEX = tuple(FIELD_NAMES.index(name) for name in ("address", "place", "phone"))
_HOUSEHOLD_INDEX = tuple((name, i) for i, name in enumerate(FIELD_NAMES) if name in HOUSEHOLD_FIELDS)
_HOUSEHOLD_AND_SSN_INDEX = _HOUSEHOLD_INDEX + (("ssn", _SSN_INDEX),)
_EXACT, _TRANSPOSED, _ONE_DIGIT, _DISAGREE = L.EXACT, L.TRANSPOSED, L.ONE_DIGIT, L.DISAGREE  # Enum class look-ups
# cost ~100 ns each on Python 3.11: score_levels runs for every candidate pair
MOVE_RULE = "move rule: {fields} disagree together (a move), counted once"
HOUSEHOLD_RULE = "household rule: {fields} tell(s) them apart, so shared surname, address and phone are not counted"

SCORE_CACHE_SIZE = 100_000
"""Comparison vectors whose score a model keeps (score_levels); a few thousand occur in practice."""

M_RANGE = (1e-4, 1 - 1e-6)
U_RANGE = (1e-7, 1 - 1e-6)
"""Clamps for estimated probabilities: no level can weigh more than ~23 bits."""


# --- the model ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Model:
    """m and u per field and level, the decision thresholds and term-frequency tables.

    ``probabilities[field][level] = (m, u)`` for every level of
    :data:`~exchange.matching.compare.FIELDS` (MISSING is implicit, weight 0).
    ``upper``/``lower`` are total weights in bits: at or above ``upper`` link
    automatically, at or above ``lower`` open a review. ``tf[field]`` maps a
    normalised value to its relative frequency among records (only the
    frequent values are kept); values not in it have ``tf_floor[field]``.
    ``prior`` is the estimated share of candidate pairs that are matches
    (informative only: the thresholds are on the sum of field weights).
    """

    probabilities: Mapping[str, Mapping[str, tuple[float, float]]]
    upper: float
    lower: float
    tf: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    tf_floor: Mapping[str, float] = field(default_factory=dict)
    prior: float = 0.01
    note: str = ""
    _weights: tuple[dict[str, float], ...] = field(init=False, repr=False, compare=False)
    _tf_u: tuple[tuple[int, str, dict[str, float], float, float], ...] = field(init=False, repr=False, compare=False)
    _scores: dict[tuple[Level, ...], Score] = field(init=False, repr=False, compare=False)  # see score_levels

    def __post_init__(self) -> None:
        weights = []
        for name in FIELD_NAMES:
            levels = self.probabilities.get(name, {})
            w = {str(L.MISSING): 0.0}
            for level in FIELDS[name]:
                m, u = levels.get(level, (1.0, 1.0))
                w[str(level)] = math.log2(m / u)
            weights.append(w)
        object.__setattr__(self, "_weights", tuple(weights))
        tf_u = []
        for name in TF_FIELDS:
            table = self.tf.get(name)
            if table:
                u_exact = self.probabilities.get(name, {}).get(L.EXACT, (1.0, 1.0))[1]
                floor = self.tf_floor.get(name) or min(table.values())
                tf_u.append((FIELD_NAMES.index(name), name, dict(table), u_exact, floor))
        object.__setattr__(self, "_tf_u", tuple(tf_u))
        object.__setattr__(self, "_scores", {})

    def weight(self, field_name: str, level: Level | str) -> float:
        """log2(m/u) of one field's level (0 for MISSING), without term-frequency adjustment."""
        return self._weights[FIELD_NAMES.index(field_name)][str(level)]

    def to_json(self) -> str:
        """The model as JSON text (stable key order), for the database."""
        return json.dumps(
            {
                "version": 1,
                "probabilities": {
                    f: {str(lv): [m, u] for lv, (m, u) in levels.items()} for f, levels in self.probabilities.items()
                },
                "upper": self.upper,
                "lower": self.lower,
                "prior": self.prior,
                "tf": {f: dict(t) for f, t in self.tf.items()},
                "tf_floor": dict(self.tf_floor),
                "note": self.note,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Model:
        data = json.loads(text)
        if data.get("version") != 1:
            raise ValueError(f"unknown model version {data.get('version')!r}")
        # a level newer than the stored model (other_day, 11-29) gets the default model's m and u
        return cls(
            probabilities={
                f: {**_DEFAULT_PROBABILITIES.get(f, {}),
                    **{Level(lv): (float(m), float(u)) for lv, (m, u) in levels.items()}}
                for f, levels in data["probabilities"].items()
            },
            upper=float(data["upper"]),
            lower=float(data["lower"]),
            tf={f: {v: float(x) for v, x in t.items()} for f, t in data.get("tf", {}).items()},
            tf_floor={f: float(x) for f, x in data.get("tf_floor", {}).items()},
            prior=float(data.get("prior", 0.01)),
            note=data.get("note", ""),
        )

    def replace(self, **changes) -> Model:
        """A copy with some fields changed (thresholds, tf tables, note)."""
        values = {n: getattr(self, n) for n in ("probabilities", "upper", "lower", "tf", "tf_floor", "prior", "note")}
        values.update(changes)
        return Model(**values)


_DEFAULT_PROBABILITIES: dict[str, dict[Level, tuple[float, float]]] = {
    # Hand-set from registration data folklore and FEBRL-like error rates;
    # EM replaces them once there is data. (m, u) per level.
    "family": {L.EXACT: (0.88, 0.004), L.PART: (0.03, 0.0005), L.CLOSE: (0.05, 0.003),
               L.SIMILAR: (0.02, 0.01), L.DISAGREE: (0.02, 0.9825)},
    "given": {L.EXACT: (0.86, 0.01), L.NICKNAME: (0.03, 0.002), L.CLOSE: (0.05, 0.004),
              L.SIMILAR: (0.02, 0.02), L.INITIAL: (0.02, 0.03), L.DISAGREE: (0.02, 0.934)},
    "middle": {L.EXACT: (0.80, 0.02), L.INITIAL: (0.15, 0.08), L.DISAGREE: (0.05, 0.90)},
    "suffix": {L.EXACT: (0.97, 0.5), L.DISAGREE: (0.002, 0.5)},
    "birth": {L.EXACT: (0.90, 0.0001), L.SWAPPED: (0.01, 0.00001), L.ONE_DIGIT: (0.05, 0.002),
              L.YEAR_ONLY: (0.004, 0.0024), L.OTHER_DAY: (0.016, 0.0096), L.DISAGREE: (0.02, 0.9859)},
    "ssn": {L.EXACT: (0.92, 1e-6), L.TRANSPOSED: (0.02, 1e-6), L.ONE_DIGIT: (0.03, 1e-5),
            L.DISAGREE: (0.03, 0.999989)},
    "address": {L.EXACT: (0.75, 0.0005), L.STREET: (0.05, 0.002), L.SIMILAR: (0.03, 0.01),
                L.DISAGREE: (0.17, 0.9875)},
    "place": {L.EXACT: (0.80, 0.004), L.POSTCODE: (0.05, 0.002), L.CITY: (0.05, 0.002),
              L.DISAGREE: (0.10, 0.992)},
    "phone": {L.EXACT: (0.80, 0.0002), L.DISAGREE: (0.20, 0.9998)},
    "sex": {L.EXACT: (0.98, 0.5), L.DISAGREE: (0.02, 0.5)},
}  # fmt: skip

DEFAULT_UPPER = 20.0
DEFAULT_LOWER = 8.0


def default_model() -> Model:
    """A hand-set model that works before EM has seen any data (no term-frequency tables)."""
    return Model(
        probabilities={f: dict(levels) for f, levels in _DEFAULT_PROBABILITIES.items()},
        upper=DEFAULT_UPPER,
        lower=DEFAULT_LOWER,
        note="default",
    )


# --- scoring ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldScore(Value):
    """One field's part of a score: its level and the weight counted (the explanation)."""

    field: str
    level: Level
    weight: float  # bits counted in the total (0 when discounted)
    tf_adjustment: float = 0.0  # part of weight due to the value's frequency
    discounted: bool = False  # a positive weight not counted (household rule)


@dataclass(frozen=True, slots=True)
class Score(Value):
    """A pair's total weight in bits and why: every field's level and weight, and the rules applied.

    Kept as parallel tuples (cheap to build for every candidate); ``fields``
    gives the per-field view and :meth:`explain` a JSON-ready one.
    """

    total: float
    levels: tuple[Level, ...]  # one per field of FIELD_NAMES
    weights: tuple[float, ...]  # bits counted per field (0 when discounted)
    tf_adjustments: tuple[float, ...] = ()  # per field, the part due to the value's frequency; () when none
    discounted: tuple[str, ...] = ()  # fields whose positive weight was not counted (household rule)
    moved: tuple[int, ...] = ()  # indexes of the move fields that disagreed together (move rule), or ()
    telling: tuple[str, ...] = ()  # individual fields that disagreed with no shared SSN (household rule), or ()
    # the total before the household rule, when differences that one person has now and then
    # (PAIRED_FIELDS) told the two apart: a pair it kept from a link is a review (decide), or None
    paired_before: float | None = None

    @property
    def rules(self) -> tuple[str, ...]:
        """The rules applied, in words (formatted only when asked: most pairs are never explained)."""
        rules = []
        if self.moved:
            rules.append(MOVE_RULE.format(fields=", ".join(FIELD_NAMES[i] for i in self.moved)))
        if self.telling:
            rules.append(HOUSEHOLD_RULE.format(fields=", ".join(self.telling)))
        return tuple(rules)

    @property
    def fields(self) -> tuple[FieldScore, ...]:
        adjustments = self.tf_adjustments or (0.0,) * len(self.levels)
        return tuple(
            FieldScore(name, level, weight, adj, name in self.discounted)
            for name, level, weight, adj in zip(FIELD_NAMES, self.levels, self.weights, adjustments)
        )

    def level(self, field_name: str) -> Level:
        return self.levels[FIELD_NAMES.index(field_name)]

    def weight(self, field_name: str) -> float:
        return self.weights[FIELD_NAMES.index(field_name)]

    def explain(self) -> dict:
        """JSON-ready explanation: total, rules, and per field level, weight, tf part, discounted."""
        return {
            "total": round(self.total, 2),
            "rules": list(self.rules),
            "fields": [
                {
                    "field": fs.field,
                    "level": str(fs.level),
                    "weight": round(fs.weight, 2),
                    "tf_adjustment": round(fs.tf_adjustment, 2),
                    "discounted": fs.discounted,
                }
                for fs in self.fields
            ],
        }


def score(a: Features, b: Features, model: Model) -> Score:
    """Fellegi–Sunter weight of the pair (a, b), with its explanation. Symmetric in a and b."""
    return score_levels(compare(a, b), model, a, b)


def score_levels(levels: Sequence[Level], model: Model, a: Features | None = None, b: Features | None = None) -> Score:
    """The score of a comparison vector (a, b give the values for term-frequency adjustment).

    Without a term-frequency adjustment a score depends on the vector alone, and few
    vectors occur (most candidate pairs disagree in the same few ways): those scores
    come from the model's cache.
    """
    levels = tuple(levels)
    if a is not None and b is not None:
        for index, name, _table, _u, _floor in model._tf_u:
            if levels[index] is _EXACT and getattr(a, name) == getattr(b, name):
                return _score(levels, model, a, b)
    cached = model._scores.get(levels)
    if cached is None:
        cached = _score(levels, model, None, None)
        if len(model._scores) < SCORE_CACHE_SIZE:
            model._scores[levels] = cached
    return cached


def _score(levels: tuple[Level, ...], model: Model, a: Features | None, b: Features | None) -> Score:
    weights = [w[lv] for w, lv in zip(model._weights, levels)]
    adjustments: tuple[float, ...] = ()
    if a is not None and b is not None and model._tf_u:
        adjusted = [0.0] * len(weights)
        for index, name, table, u_exact, floor in model._tf_u:
            if levels[index] is _EXACT:
                value = getattr(a, name)
                if value == getattr(b, name):
                    adj = math.log2(u_exact / table.get(value, floor))
                    adj = max(-TF_CLAMP, min(TF_CLAMP, adj))
                    adjusted[index] = adj
                    weights[index] += adj
        if any(adjusted):
            adjustments = tuple(adjusted)
    moved: tuple[int, ...] = ()
    if levels[_ADDRESS_INDEX] is _DISAGREE:  # a move is one event: its disagreements count once
        moved = tuple(i for i in _MOVE_INDEX if levels[i] is _DISAGREE)
        worst = min(moved, key=weights.__getitem__)
        for i in moved:
            if i != worst:
                weights[i] = 0.0
    telling: tuple[str, ...] = ()
    discounted: tuple[str, ...] = ()
    before = None
    ssn = levels[_SSN_INDEX]
    if ssn is not _EXACT and ssn is not _TRANSPOSED:
        telling = tuple(name for name, i, tells in _INDIVIDUAL_INDEX if levels[i] in tells)
        if not telling:
            telling = _paired(levels)
            before = sum(weights) if telling else None
        if telling:
            shared = _HOUSEHOLD_INDEX if ssn is not _ONE_DIGIT else _HOUSEHOLD_AND_SSN_INDEX  # siblings' SSNs
            discounted = tuple(n for n, i in shared if weights[i] > 0)  # are often issued in sequence
            for _, i in shared:
                if weights[i] > 0:
                    weights[i] = 0.0
    return Score(sum(weights), levels, tuple(weights), adjustments, discounted, moved if len(moved) > 1 else (),
                 telling, before)


def _paired(levels: tuple[Level, ...]) -> tuple[str, ...]:
    """The PAIRED_FIELDS differences of a pair when two of them tell two people apart, else ()."""
    found = tuple(name for name, i, tells in _PAIRED_INDEX if levels[i] in tells)
    if len(found) < 2:
        return ()
    if "birth" in found or "family" in found and ("ssn" in found or "middle" in found):
        return found
    return ()


# --- term frequencies ----------------------------------------------------------------


def term_frequencies(records: Iterable[Features], top: int = 2000) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(tf, tf_floor) for :data:`TF_FIELDS` from the records of an index.

    Keeps the ``top`` most frequent values per field (the ones whose
    adjustment is negative or small); rarer values get ``tf_floor``, the
    frequency of the rarest kept value or one record in the index, whichever
    is larger, so the table stays small enough to store as JSON.
    """
    counts = {name: Counter() for name in TF_FIELDS}
    totals = dict.fromkeys(TF_FIELDS, 0)
    for f in records:
        for name in TF_FIELDS:
            value = getattr(f, name)
            if value:
                counts[name][value] += 1
                totals[name] += 1
    tf: dict[str, dict[str, float]] = {}
    floor: dict[str, float] = {}
    for name in TF_FIELDS:
        n = totals[name]
        if not n:
            continue
        kept = counts[name].most_common(top)
        tf[name] = {v: c / n for v, c in kept}
        rarest = kept[-1][1] / n if len(counts[name]) > top else 1 / n
        floor[name] = max(rarest, 1 / n)
    return tf, floor


# --- EM ---------------------------------------------------------------------------------


def level_counts(pairs: Iterable[tuple[Features, Features]]) -> Counter[tuple[Level, ...]]:
    """How many pairs share each comparison vector (EM works on these, not on pairs)."""
    return Counter(compare(a, b) for a, b in pairs)


def estimate_u(random_pairs: Iterable[tuple[Features, Features]], start: Model | None = None,
               pseudo: float = 1.0) -> dict[str, dict[Level, float]]:
    """u per field and level from pairs drawn at random (almost all non-matches).

    ``pseudo`` pairs distributed as ``start``'s u are added so a level never
    seen (an exact SSN among random pairs) keeps a small, non-zero u.
    """
    start = start or default_model()
    counts = level_counts(random_pairs)
    return _u_from_counts(counts, start, pseudo)


def _u_from_counts(counts, start: Model, pseudo: float) -> dict[str, dict[Level, float]]:
    out = {}
    for i, name in enumerate(FIELD_NAMES):
        levels = FIELDS[name]
        c = Counter()
        for vector, n in counts.items():
            if vector[i] is not L.MISSING:
                c[vector[i]] += n
        total = sum(c.values()) + pseudo
        out[name] = {
            lv: _clamp((c[lv] + pseudo * start.probabilities[name][lv][1]) / total, U_RANGE) for lv in levels
        }
    return out


def sample_random_pairs(records: Sequence[Features], n: int, seed: int = 0) -> list[tuple[Features, Features]]:
    """``n`` pairs of distinct records drawn at random (for :func:`estimate_u`)."""
    rng = random.Random(seed)
    size = len(records)
    if size < 2:
        return []
    out = []
    for _ in range(n):
        i, j = rng.randrange(size), rng.randrange(size - 1)
        if j >= i:
            j += 1
        out.append((records[i], records[j]))
    return out


def estimate(
    pairs: Iterable[tuple[Features, Features]] | Counter,
    start: Model | None = None,
    *,
    u: Mapping[str, Mapping[Level, float]] | None = None,
    fixed: Iterable[str] = (),
    iterations: int = 200,
    tolerance: float = 1e-7,
    pseudo: float = 10.0,
) -> Model:
    """m (and u, and the prior) by expectation maximisation over candidate pairs.

    ``pairs`` are candidate pairs (or their :func:`level_counts`); no labels
    are used. ``u``: fixed u probabilities (from :func:`estimate_u` over
    random pairs); without it u is estimated too, as u *among candidates*,
    which makes the fields used for blocking look uninformative. ``fixed``:
    fields left out of the estimation (their m and u are kept from ``start``
    and they do not vote in the E step) — the fields of the blocking key that
    produced the pairs, which agree in every pair whatever the class (see
    :func:`estimate_by_sessions`). ``pseudo`` pairs distributed as ``start``
    are added to each class as a prior, which keeps rare levels sensible and
    the two classes from swapping. Thresholds and tf tables are kept from
    ``start`` (default: :func:`default_model`).
    """
    start = start or default_model()
    counts = pairs if isinstance(pairs, Counter) else level_counts(pairs)
    skip = {FIELD_NAMES.index(name) for name in fixed}
    total = sum(counts.values())
    if not total:
        return start
    m = {f: {lv: start.probabilities[f][lv][0] for lv in FIELDS[f]} for f in FIELD_NAMES}
    uu = {f: {lv: start.probabilities[f][lv][1] for lv in FIELDS[f]} for f in FIELD_NAMES}
    if u is not None:
        uu = {f: {lv: float(u[f][lv]) for lv in FIELDS[f]} for f in FIELD_NAMES}
    prior = min(max(start.prior, 1e-4), 0.5)
    # Each distinct vector once, as (field index, level) of the fields that vote.
    patterns = Counter()
    for vector, n in counts.items():
        patterns[tuple((i, lv) for i, lv in enumerate(vector) if lv is not L.MISSING and i not in skip)] += n
    indexed = list(patterns.items())
    previous = None
    for _ in range(iterations):
        # E step: the probability that each comparison vector is a match.
        logm = [{lv: math.log(p) for lv, p in m[f].items()} for f in FIELD_NAMES]
        logu = [{lv: math.log(p) for lv, p in uu[f].items()} for f in FIELD_NAMES]
        lp, lq = math.log(prior), math.log(1 - prior)
        posts = []
        for vec, _ in indexed:
            d = (lq + sum(logu[i][lv] for i, lv in vec)) - (lp + sum(logm[i][lv] for i, lv in vec))
            posts.append(1.0 / (1.0 + math.exp(d)) if d < 700 else 0.0)
        # M step: expected level counts in each class.
        cm = [Counter() for _ in FIELD_NAMES]
        cu = [Counter() for _ in FIELD_NAMES]
        matches = 0.0
        for g, (vec, n) in zip(posts, indexed):
            matches += g * n
            for i, lv in vec:
                cm[i][lv] += g * n
                cu[i][lv] += (1 - g) * n
        prior = _clamp(matches / total, (1e-6, 1 - 1e-6))
        for i, name in enumerate(FIELD_NAMES):
            if i in skip:
                continue
            sm_total = sum(cm[i].values()) + pseudo
            su_total = sum(cu[i].values()) + pseudo
            m[name] = {
                lv: _clamp((cm[i][lv] + pseudo * start.probabilities[name][lv][0]) / sm_total, M_RANGE)
                for lv in FIELDS[name]
            }
            if u is None:
                uu[name] = {
                    lv: _clamp((cu[i][lv] + pseudo * start.probabilities[name][lv][1]) / su_total, U_RANGE)
                    for lv in FIELDS[name]
                }
        flat = [p for f in FIELD_NAMES for p in m[f].values()] + [prior]
        if previous is not None and max(abs(x - y) for x, y in zip(flat, previous)) < tolerance:
            break
        previous = flat
    return start.replace(
        probabilities={f: {lv: (m[f][lv], uu[f][lv]) for lv in FIELDS[f]} for f in FIELD_NAMES},
        prior=prior,
        note=f"em: {total} pairs",
    )


def estimate_by_sessions(
    sessions: Iterable[tuple[Iterable[str], Iterable[tuple[Features, Features]] | Counter]],
    start: Model | None = None,
    *,
    u: Mapping[str, Mapping[Level, float]],
    pseudo: float = 10.0,
) -> Model:
    """m by EM over several sets of candidate pairs, each from one kind of blocking key (as Splink does).

    Each session is (fields of its blocking key, its pairs): pairs sharing a
    birth date say nothing about how often matches agree on birth date, so
    that session estimates every field's m but birth's; a session blocked
    on names gives birth's m. A field's m is the mean of the sessions that
    estimated it (``start``'s where none did); ``u`` is fixed (from random
    pairs). The prior reported is the mean of the sessions'.
    """
    start = start or default_model()
    estimates: dict[str, list[dict[Level, float]]] = {f: [] for f in FIELD_NAMES}
    priors = []
    for fields, pairs in sessions:
        fields = frozenset(fields)
        model = estimate(pairs, start, u=u, fixed=fields, pseudo=pseudo)
        priors.append(model.prior)
        for name in FIELD_NAMES:
            if name not in fields:
                estimates[name].append({lv: model.probabilities[name][lv][0] for lv in FIELDS[name]})
    probabilities = {}
    for name in FIELD_NAMES:
        found = estimates[name]
        levels = FIELDS[name]
        if found:
            mean = {lv: sum(e[lv] for e in found) / len(found) for lv in levels}
        else:
            mean = {lv: start.probabilities[name][lv][0] for lv in levels}
        probabilities[name] = {lv: (mean[lv], float(u[name][lv])) for lv in levels}
    return start.replace(
        probabilities=probabilities,
        prior=sum(priors) / len(priors) if priors else start.prior,
        note=f"em: {len(priors)} sessions",
    )


def _clamp(x: float, bounds: tuple[float, float]) -> float:
    return min(max(x, bounds[0]), bounds[1])
