"""exchange.store.training: the matching model re-estimated by EM from the live index
(records written by the writer's own path, process_batch), stored, and used by the
writer; refused when there is too little data or the estimate is degenerate.
On SQLite and PostgreSQL."""
from __future__ import annotations

import itertools
import random
from collections import Counter
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from exchange.acceptance import AcceptancePolicy, FacilityRule, accept
from exchange.hl7.header import read_header
from exchange.mapping.events import FacilityContext
from exchange.matching.compare import Level as L
from exchange.matching.features import features_of
from exchange.matching.model import Model, default_model, score
from exchange.pipeline import Received, process_batch
from exchange.store import training
from exchange.store.index import ModelCache

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
CODES = ("GENHOSP", "OAKNH")
POLICY = AcceptancePolicy({code: FacilityRule(code) for code in CODES})
FACILITIES = {code: FacilityContext(code, code) for code in CODES}
_ids = itertools.count(1)

# --- a synthetic population with known error rates ----------------------------------------------------

FAMILIES = ("ABBOTT ACKERMAN ALVAREZ BARNES BECKER BISHOP BRENNAN CALDWELL CARDENAS CHANDLER CORTEZ DELGADO "
            "DUNCAN ELLISON ESPINOZA FERGUSON FLEMING GALLAGHER GREGORY HANSON HAWKINS HOLLOWAY IBARRA JENSEN "
            "KELLER KOWALCZYK LAMBERT LINDQVIST MADDOX MCKENZIE MONTOYA NAKAMURA NORRIS OCONNELL PACHECO "
            "PETERSEN QUINTERO RAMIREZ ROWLAND SANDOVAL SHEPHERD STRICKLAND TOBIAS UNDERWOOD VALENTINE WALLACE "
            "WHITAKER YAMAMOTO ZIMMERMAN").split()
GIVENS = ("ADA ALAN ANNA ARTHUR BEATRICE BORIS CLARA DMITRI EDITH ELENA FELIX FRIDA GUSTAV HELGA IGOR IRENE JONAS "
          "JUNE KARL LENA LEON MAGNUS MARTA NORA OSCAR OLGA PAVEL RUTH SILAS TILDA URSULA VIKTOR WANDA").split()
STREETS = ("OAK ELM PINE MAPLE CEDAR BIRCH ASPEN WILLOW HAZEL LAUREL").split()
TRUE_BIRTH_EXACT = 0.9  # share of true pairs whose birth dates agree exactly (else one digit off)
TRUE_ADDRESS_EXACT = 0.8  # share of true pairs at the same address (else the person moved)


def a28(facility: str, mrn: str, family: str, given: str, birth: str, sex: str, street: str, city: str, zip_: str,
        phone: str, ssn: str) -> bytes:
    control = f"TR{next(_ids)}"
    pid = (f"PID|1||{mrn}^^^{facility}^MR||{family}^{given}||{birth}|{sex}|||{street}^^{city}^IL^{zip_}||{phone}"
           f"||||||{ssn}")  # PID-19: SSN
    return (f"MSH|^~\\&|APP|{facility}|EX|EX|20261127120000||ADT^A28^ADT_A05|{control}|P|2.5\r"
            f"EVN|A28|20261127120000\r{pid}\r").encode()


def population(persons: int, seed: int = 11) -> list[bytes]:
    """Each person registered at OAKNH; 70 % of them also at GENHOSP, with the birth date one
    digit off in 10 % and a new address in 20 % of those (the known m of birth and address)."""
    rng = random.Random(seed)
    out = []
    for i in range(persons):
        family, given = rng.choice(FAMILIES), rng.choice(GIVENS)
        year, month, day = rng.randint(1925, 1999), rng.randint(1, 12), rng.randint(10, 28)
        sex = rng.choice("FM")
        street = f"{rng.randint(1, 999)} {rng.choice(STREETS)} ST"
        zip_ = f"62{rng.randint(0, 999):03d}"
        phone = f"217{rng.randint(0, 9_999_999):07d}"
        ssn = f"{rng.randint(100, 899)}{rng.randint(10, 99)}{rng.randint(1000, 9999)}"
        out.append(a28("OAKNH", f"OA{i}", family, given, f"{year}{month:02d}{day:02d}", sex, street, "SPRINGFIELD",
                       zip_, phone, ssn))
        if rng.random() < 0.7:
            if rng.random() > TRUE_BIRTH_EXACT:
                day = day + 1 if day % 10 < 8 else day - 1  # one digit off, still a date
            if rng.random() > TRUE_ADDRESS_EXACT:
                street, zip_ = f"{rng.randint(1, 999)} {rng.choice(STREETS)} AVE", f"61{rng.randint(0, 999):03d}"
            out.append(a28("GENHOSP", f"GH{i}", family, given, f"{year}{month:02d}{day:02d}", sex, street,
                           "SPRINGFIELD", zip_, phone if rng.random() < 0.8 else "",
                           ssn if rng.random() < 0.6 else ""))
    return out


def run(engine, raws: list[bytes], models: ModelCache | None = None, batch: int = 25) -> None:
    """Through the writer's own path (process_batch), in batches."""
    models = models or ModelCache()
    for start in range(0, len(raws), batch):
        items = []
        for raw in raws[start:start + batch]:
            header = read_header(raw)
            items.append(Received(raw, header, accept(header, POLICY), NOW, "127.0.0.1:5000"))
        with engine.begin() as conn:
            answers = process_batch(conn, items, new_control_id=lambda: f"ACK{next(_ids)}", now=lambda: NOW,
                                    facilities=FACILITIES, models=models)
        assert {a.ack_code for a in answers} == {"AA"}


def models_stored(engine) -> list:
    with engine.connect() as conn:
        return conn.execute(text("select id, model, note from match_model order by id")).all()


# --- tests ------------------------------------------------------------------------------------------------


def test_em_on_the_live_index_recovers_the_known_m_and_the_writer_uses_the_model(engine):
    run(engine, population(900))
    report = training.train(engine, NOW, min_records=500)
    assert report.errors == 0 and report.kept is None, report.lines()
    assert report.records > 1400 and report.session_pairs["dob"] > 300 and report.session_pairs["ssn"] > 200
    ((model_id, stored, note),) = models_stored(engine)
    assert report.model_id == model_id
    model = Model.from_json(stored)
    assert note == model.note and note.startswith("em ") and "records" in note
    m = {name: {lv: mu[0] for lv, mu in levels.items()} for name, levels in model.probabilities.items()}
    assert m["birth"][L.EXACT] == pytest.approx(TRUE_BIRTH_EXACT, abs=0.05)
    assert m["birth"][L.ONE_DIGIT] == pytest.approx(1 - TRUE_BIRTH_EXACT, abs=0.05)
    assert m["address"][L.EXACT] == pytest.approx(TRUE_ADDRESS_EXACT, abs=0.07)
    assert m["ssn"][L.EXACT] > 0.95 and model.probabilities["ssn"][L.EXACT][1] < 1e-3
    assert model.tf["family"] and model.tf_floor["given"] > 0  # term frequencies of the index
    assert (model.upper, model.lower) == (default_model().upper, default_model().lower)  # kept
    # no patient data in the report or the note: counts, kinds of key, weights
    shown = "\n".join(report.lines()) + note
    assert not any(name in shown.upper() for name in FAMILIES + GIVENS)

    # The writer's model cache takes the newest row, and the writer scores with it.
    cache = ModelCache()
    with engine.connect() as conn:
        assert cache.get(conn) == model
    newcomer = a28("GENHOSP", "GH-NEW", "ZIMMERMAN", "OSCAR", "19440312", "M", "7 HAZEL ST", "SPRINGFIELD", "62001",
                   "2170000001", "")
    run(engine, [a28("OAKNH", "OA-NEW", "ZIMMERMAN", "OSCAR", "19440312", "M", "7 HAZEL ST", "SPRINGFIELD", "62001",
                     "2170000001", ""), newcomer], models=cache)
    with engine.connect() as conn:
        rows = {mrn: (p, s) for mrn, p, s in conn.execute(text(
            "select mrn, person_id, link_score from patient_record where mrn in ('OA-NEW', 'GH-NEW')"))}
    assert rows["OA-NEW"][0] == rows["GH-NEW"][0]
    from exchange.mapping.values import Address, PersonName, Phone, timestamp

    record = {"name": PersonName(family="ZIMMERMAN", given="OSCAR"), "birth": timestamp("19440312"), "sex": "M",
              "addresses": (Address(street="7 HAZEL ST", city="SPRINGFIELD", state="IL", postal_code="62001"),),
              "phones": (Phone("2170000001"),)}
    f = features_of(record)
    assert rows["GH-NEW"][1] == pytest.approx(score(f, f, model).total)
    assert rows["GH-NEW"][1] != pytest.approx(score(f, f, default_model()).total)


def test_too_little_data_keeps_the_current_model(engine):
    run(engine, population(60))
    report = training.train(engine, NOW)
    assert report.kept and "at least 1,000" in report.kept and report.errors == 0
    assert models_stored(engine) == []
    report = training.train(engine, NOW, min_records=10, min_session_pairs=10_000)
    assert report.kept and "no kind of key" in report.kept
    assert models_stored(engine) == []


def test_a_degenerate_estimate_is_refused_and_the_current_model_kept(engine, monkeypatch):
    run(engine, population(300))
    real = training.estimate_by_sessions

    def swapped(*args, **kwargs):  # EM that swapped its classes: agreement counts against
        model = real(*args, **kwargs)
        return model.replace(probabilities={f: {lv: (u, m) for lv, (m, u) in levels.items()}
                                            for f, levels in model.probabilities.items()})

    monkeypatch.setattr(training, "estimate_by_sessions", swapped)
    report = training.train(engine, NOW, min_records=100)
    assert report.errors == 1 and report.model_id is None
    assert any("an exact family counts" in why for why in report.degenerate)
    assert any(line.startswith("REFUSED") for line in report.lines())
    assert models_stored(engine) == []


def test_the_guard_compares_decisions_and_flags_a_collapsed_model():
    from exchange.mapping.values import PersonName, timestamp

    a = features_of({"name": PersonName(family="KOWALCZYK", given="PIOTR"), "birth": timestamp("19551111"),
                     "ssn": "271828182"})
    pairs = [(a, a)] * 10
    current = default_model()
    flat = current.replace(probabilities={f: {lv: (0.5, 0.5) for lv in levels}
                                          for f, levels in current.probabilities.items()})
    changes = training.compare_decisions(current, flat, pairs)
    assert changes == {("link", "none"): 10}
    report = training.TrainingReport(changes=training.compare_decisions(current, current, pairs))
    assert list(training._degenerate(current, report)) == []
    report = training.TrainingReport(changes=Counter({("link", "none"): 6, ("link", "link"): 4}))
    assert any("changes 6 of the 10 automatic links" in why for why in training._degenerate(current, report))
    report = training.TrainingReport(random_checked=1000, random_linked=2)
    assert any("random pairs" in why for why in training._degenerate(current, report))


def test_a_run_asked_to_stop_stores_nothing(engine):
    run(engine, population(50))
    with pytest.raises(training.Cancelled):
        training.train(engine, NOW, min_records=10, stopping=lambda: True)
    assert models_stored(engine) == []



def test_no_partial_agreement_weighs_more_than_the_exact_one():
    model = default_model()
    inflated = model.replace(probabilities={**model.probabilities,
                                            "ssn": {**model.probabilities["ssn"], L.ONE_DIGIT: (0.2, 1e-7)}})
    fixed, lowered = training.monotone(inflated)
    assert fixed.weight("ssn", L.ONE_DIGIT) == pytest.approx(fixed.weight("ssn", L.EXACT))
    assert lowered == [f"ssn one_digit {inflated.weight('ssn', L.ONE_DIGIT):+.1f} -> "
                       f"{inflated.weight('ssn', L.EXACT):+.1f}"]
    assert training.monotone(model) == (model, [])  # the hand-set model is monotone already
