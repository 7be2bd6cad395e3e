"""exchange.matching.model: weights, term frequencies, the household rule, JSON, EM. Synthetic people only."""
from __future__ import annotations

import math
import pickle
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.matching.compare import FIELD_NAMES, FIELDS, Level as L
from exchange.matching.model import (
    Model,
    default_model,
    estimate,
    estimate_by_sessions,
    estimate_u,
    sample_random_pairs,
    score,
    term_frequencies,
)

from tests.test_matching_features import person


def word(i: int) -> str:
    """A distinct letters-only name for a number (names lose their digits)."""
    return "Q" + "".join("abcdefghij"[int(d)] for d in str(i))


def test_default_model_weights_have_the_expected_signs():
    model = default_model()
    for name in FIELD_NAMES:
        assert model.weight(name, L.MISSING) == 0
        assert model.weight(name, L.DISAGREE) < 0
        if name not in ("suffix", "sex"):
            assert model.weight(name, FIELDS[name][0]) > 3
    assert model.weight("suffix", L.DISAGREE) < -7  # JR vs SR: strong evidence of two people
    assert model.weight("ssn", L.EXACT) > model.weight("birth", L.EXACT) > model.weight("family", L.EXACT)
    assert model.upper > model.lower


def test_score_sums_the_field_weights_and_explains_them():
    model = default_model()
    a = person("Hanson", "Elizabeth", birth="19500304", sex="F")
    b = person("Hansen", "Liz", birth="19500304", sex="F", phone="2175550101")
    s = score(a, b, model)
    assert s.level("family") is L.CLOSE and s.level("given") is L.NICKNAME and s.level("phone") is L.MISSING
    assert s.total == pytest.approx(sum(fs.weight for fs in s.fields))
    assert s.weight("birth") == model.weight("birth", L.EXACT)
    explained = s.explain()
    assert [f["field"] for f in explained["fields"]] == list(FIELD_NAMES)
    assert explained["total"] == round(s.total, 2) and explained["rules"] == []


def test_household_rule_drops_shared_household_agreement():
    model = default_model()
    house = dict(family="Smith", street="12 Main St", city="Springfield", postcode="62704", phone="2175550101")
    husband = person(given="John", birth="19500304", sex="M", **house)
    wife = person(given="Mary", birth="19520911", sex="F", **house)
    s = score(husband, wife, model)
    assert s.rules and "household" in s.rules[0]
    assert set(s.discounted) == {"family", "address", "place", "phone"}
    assert all(s.weight(name) == 0 for name in s.discounted)
    assert s.total < model.lower
    # an agreeing SSN suspends it: the disagreeing field is then an error
    same_ssn = score(
        person(given="John", birth="19500304", ssn="123456780", **house),
        person(given="Jon", birth="19800304", ssn="123456780", **house),
        model,
    )
    assert not same_ssn.rules and same_ssn.total > model.upper


def test_term_frequency_adjustment_orders_common_below_rare_surnames():
    population = [person("Smith", word(i)) for i in range(500)] + [person("Kowalczyk", "Ann")]
    population += [person(word(i), word(i)) for i in range(2000)]
    tf, floor = term_frequencies(population)
    model = default_model().replace(tf=tf, tf_floor=floor)
    smith = score(person("Smith", "Ann", birth="19500304"), person("Smith", "Ann", birth="19500304"), model)
    kowalczyk = score(
        person("Kowalczyk", "Ann", birth="19500304"), person("Kowalczyk", "Ann", birth="19500304"), model
    )
    assert smith.total < kowalczyk.total
    assert smith.fields[0].tf_adjustment < 0 < kowalczyk.fields[0].tf_adjustment
    plain = score(person("Smith", "Ann", birth="19500304"), person("Smith", "Ann", birth="19500304"), default_model())
    assert smith.weight("family") < plain.weight("family") < kowalczyk.weight("family")


def test_term_frequencies_keep_the_top_values_and_a_floor():
    population = [person("Smith", "Ann")] * 30 + [person(word(i), "Bo") for i in range(70)]
    tf, floor = term_frequencies(population, top=5)
    assert len(tf["family"]) == 5 and tf["family"]["smith"] == pytest.approx(0.3)
    assert floor["family"] == pytest.approx(0.01)
    assert tf["given"]["ann"] == pytest.approx(0.3)


def test_model_json_round_trip():
    population = [person("Smith", "Ann"), person("Kowalczyk", "Jan"), person("Smith", "Bo")]
    tf, floor = term_frequencies(population)
    model = default_model().replace(tf=tf, tf_floor=floor, upper=21.5, lower=7.25, prior=0.02, note="x")
    again = Model.from_json(model.to_json())
    assert again == model
    assert again.to_json() == model.to_json()
    a, b = person("Smith", "Ann", birth="19500304"), person("Smith", "Ann", birth="19500305")
    assert score(a, b, again) == score(a, b, model)
    with pytest.raises(ValueError):
        Model.from_json('{"version": 99}')
    assert pickle.loads(pickle.dumps(model)) == model  # it crosses to the writer process


# --- EM ---------------------------------------------------------------------------

_TRUE_M = {
    "family": {L.EXACT: 0.85, L.CLOSE: 0.10, L.DISAGREE: 0.05},
    "given": {L.EXACT: 0.80, L.NICKNAME: 0.10, L.DISAGREE: 0.10},
    "birth": {L.EXACT: 0.90, L.ONE_DIGIT: 0.07, L.DISAGREE: 0.03},
    "address": {L.EXACT: 0.60, L.STREET: 0.10, L.DISAGREE: 0.30},
    "ssn": {L.EXACT: 0.95, L.DISAGREE: 0.05},
}
_TRUE_U = {
    "family": {L.EXACT: 0.05, L.CLOSE: 0.05, L.DISAGREE: 0.90},
    "given": {L.EXACT: 0.10, L.NICKNAME: 0.02, L.DISAGREE: 0.88},
    "birth": {L.EXACT: 0.02, L.ONE_DIGIT: 0.03, L.DISAGREE: 0.95},
    "address": {L.EXACT: 0.03, L.STREET: 0.07, L.DISAGREE: 0.90},
    "ssn": {L.EXACT: 0.01, L.DISAGREE: 0.99},
}


def _synthetic_vectors(n: int, prior: float, seed: int = 7) -> Counter:
    """Comparison vectors drawn from known m, u and prior (fields not listed are missing)."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    for _ in range(n):
        table = _TRUE_M if rng.random() < prior else _TRUE_U
        vector = []
        for name in FIELD_NAMES:
            if name in table:
                levels, weights = zip(*table[name].items())
                vector.append(rng.choices(levels, weights)[0])
            else:
                vector.append(L.MISSING)
        counts[tuple(vector)] += 1
    return counts


def test_em_recovers_known_m_u_and_prior():
    counts = _synthetic_vectors(40_000, prior=0.3)
    model = estimate(counts, default_model(), pseudo=1.0)
    assert model.prior == pytest.approx(0.3, abs=0.02)
    for name in _TRUE_M:
        for level in _TRUE_M[name]:
            m, u = model.probabilities[name][level]
            assert m == pytest.approx(_TRUE_M[name][level], abs=0.025), (name, level)
            assert u == pytest.approx(_TRUE_U[name][level], abs=0.025), (name, level)
    assert model.upper == default_model().upper and model.note.startswith("em")


def test_em_with_fixed_u_and_sessions():
    counts = _synthetic_vectors(20_000, prior=0.2, seed=3)
    u = {
        name: {lv: (_TRUE_U[name].get(lv, 1e-6) if name in _TRUE_U else 0.5) for lv in FIELDS[name]}
        for name in FIELD_NAMES
    }
    model = estimate(counts, default_model(), u=u, pseudo=1.0)
    assert model.probabilities["ssn"][L.EXACT][1] == u["ssn"][L.EXACT]  # u kept
    assert model.probabilities["birth"][L.EXACT][0] == pytest.approx(0.9, abs=0.03)
    # a session's fixed fields keep the start's m; the others are estimated
    sessions = [(("birth",), counts), (("family", "given"), counts)]
    combined = estimate_by_sessions(sessions, default_model(), u=u, pseudo=1.0)
    assert combined.probabilities["ssn"][L.EXACT][0] == pytest.approx(0.95, abs=0.03)
    assert combined.probabilities["birth"][L.EXACT][0] == pytest.approx(0.9, abs=0.03)


def test_u_from_random_pairs_is_smoothed_and_clamped():
    people = [person(word(i), word(i + 7), birth=f"19{i % 90 + 10:02d}0101") for i in range(200)]
    pairs = sample_random_pairs(people, 500, seed=1)
    assert all(a is not b for a, b in pairs)
    u = estimate_u(pairs)
    assert 0 < u["ssn"][L.EXACT] < 1e-5  # never seen: the start's u, shrunk
    assert u["family"][L.DISAGREE] > 0.5 and u["birth"][L.EXACT] < 0.05
    assert sample_random_pairs(people[:1], 10) == []


# --- properties -------------------------------------------------------------------

_names = st.sampled_from(["Smith", "Smyth", "Hanson", "Hansen", "Hanson-Moore", "Liz", "Elizabeth", ""]) | st.text(
    max_size=12
)
_dates = st.sampled_from([None, "1950", "195003", "19500304", "19500403", "19500305", "19510304"])
_people = st.builds(
    person,
    family=_names, given=_names, middle=_names, suffix=st.sampled_from(["", "Jr", "Sr", "III"]), birth=_dates,
    sex=st.sampled_from([None, "F", "M", "U"]), street=st.sampled_from(["", "12 Main St", "14 Main Street"]),
    postcode=st.sampled_from(["", "62704", "62705"]), phone=st.sampled_from(["", "2175550101"]),
    ssn=st.sampled_from([None, "123456780", "123456708", "123456781"]),
)  # fmt: skip
_TF_MODEL = default_model().replace(tf={"family": {"smith": 0.01}, "given": {"liz": 0.002}}, tf_floor={"family": 1e-5})


@given(_people, _people)
def test_score_is_symmetric(a, b):
    for model in (default_model(), _TF_MODEL):
        there, back = score(a, b, model), score(b, a, model)
        assert there == back
        assert math.isfinite(there.total)


def test_a_move_counts_as_one_disagreement_not_three():
    """A patient who moved disagrees on address, place and phone at once: one event, so
    only the most negative of the three counts (the others weigh 0)."""
    model = default_model()
    before = person("Hanson", "Elizabeth", birth="19500304", sex="F", street="12 Oak St", city="Springfield",
                    postcode="62701", phone="2175550100", ssn="219099999")
    after = person("Hanson", "Elizabeth", birth="19500304", sex="F", street="9 Elm Rd", city="Austin",
                   postcode="73301", phone="5125550199", ssn="219099999")
    s = score(before, after, model)
    moved = {name: s.weight(name) for name in ("address", "place", "phone")}
    assert all(s.level(name) is L.DISAGREE for name in moved)
    worst = min(model.weight(name, L.DISAGREE) for name in moved)
    assert sorted(moved.values()) == [worst, 0.0, 0.0]
    assert any(rule.startswith("move rule: address, place, phone") for rule in s.explain()["rules"])
    same_town = person("Hanson", "Elizabeth", birth="19500304", sex="F", street="9 Elm Rd", city="Springfield",
                       postcode="62701", phone="5125550199", ssn="219099999")
    t = score(before, same_town, model)  # moved house within the town: address and phone, one event
    assert t.level("place") is L.EXACT and t.weight("place") > 0
    assert sorted([t.weight("address"), t.weight("phone")]) == [
        min(model.weight("address", L.DISAGREE), model.weight("phone", L.DISAGREE)), 0.0]


def test_a_cached_score_is_the_score_a_fresh_model_gives():
    """score_levels keeps the scores of comparison vectors without a term-frequency part:
    a model that has scored many pairs answers exactly as a fresh one, and a pair whose
    exact name agreement is adjusted by frequency never gets a cached, unadjusted score."""
    rng = random.Random(5)
    people = [person(rng.choice(["Smith", "Kowalczyk", "Hanson"]), rng.choice(["Mary", "Ann", "Liz"]),
                     birth=f"19{rng.randrange(40, 60)}0{rng.randrange(1, 4)}1{rng.randrange(0, 3)}",
                     sex=rng.choice("FM"), phone=rng.choice(["", "2175550101", "2175550199"]))
              for _ in range(60)]
    tf = {"family": {"smith": 0.2, "kowalczyk": 0.001, "hanson": 0.01}}
    for base in (default_model(), default_model().replace(tf=tf, tf_floor={"family": 0.001})):
        warm = base.replace()
        pairs = [(a, b) for a in people for b in people[:20]]
        for a, b in pairs:
            score(a, b, warm)
        assert warm._scores, "vectors without a frequency part are cached"
        for a, b in pairs:
            assert score(a, b, warm) == score(a, b, base.replace())
    smiths = [p for p in people if p.family == "smith"][:2]
    rare = [p for p in people if p.family == "kowalczyk"][:2]
    model = default_model().replace(tf=tf, tf_floor={"family": 0.001})
    common, unusual = score(*smiths, model), score(*rare, model)
    assert common.tf_adjustments and unusual.tf_adjustments
    family = FIELD_NAMES.index("family")
    assert common.tf_adjustments[family] < 0 < unusual.tf_adjustments[family]  # Smith weighs less than Kowalczyk
