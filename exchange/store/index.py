"""The patient index in the writer's transaction: every new or changed
facility record is matched before the ACK (issue 4).

    process_batch: ... map and apply every message of the batch (MemoryState)
      carry_renames(conn, state) ... A47: reviews, pairs, link history to the new MRN
      plan(conn, state, model) ..... which records to (re)match, their candidates
                                     from record_key (3 SELECTs per batch), and
                                     exchange.matching.decide per record, in order
      records.save(..., links=) .... records written with their person, link,
                                     score and features
      write(conn, plan, state) ..... record_key rows, link history, reviews
      COMMIT

A record is (re)matched when it is new, or when what matching reads of it
(``exchange.matching.features``) changed; an admit or a discharge that does
not touch the demographics costs nothing here, nor does an A47 that only
renames it. Candidates are the active
records sharing a blocking key, plus every record of their persons and of
the record's own person, as the database holds them overlaid with what this
batch decided before (a batch may hold both records of a new link). The
sticky facts come from ``match_pair`` (a technician's "not a match", an
A37) and ``patient_record.link`` ("manual": a technician linked it;
"source": its facility asserted it with A24): ``decide`` never overrides
them.

A facility's own assertions are applied as such: A24 puts the second record
in the first one's person (link "source"); A37 records a sticky
not-a-match pair both ways round and, if they share a person, gives the
second record a person of its own. A40 brings the retired record's person
to the survivor's, unless a sticky not-a-match stands between the two
persons: then nothing moves and a ``merge_conflict`` review of the survivor
stays open (a re-match does not supersede it) while they share a person
with a record that pair names.

Automatic changes of a record's person are written to ``link_event`` with
actor ``exchange`` and the message that caused them; reviews to
``match_review`` with every candidate's per-field explanation.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Text, and_, cast, delete, exists, func, insert, or_, select, text, tuple_
from twisted.logger import Logger

from exchange.mapping.state import MemoryState
from exchange.matching.decide import Action, Decision, Match, Reason, Record, decide
from exchange.matching.features import Features, blocking_keys, decode_features, encode_features, features_of
from exchange.matching.model import Model, default_model, score
from exchange.outcome import Problem
from exchange.store.consent import carry_opt_outs, merge_chains, retire_emptied
from exchange.store.db import advisory_key, driver_cursor
from exchange.store.driver import Statement, Writer, select_rows
from exchange.store.records import RecordLink
from exchange.store.schema import (
    MAX_MERGE_HOPS,
    link_event_table,
    match_model_table,
    match_pair_table,
    match_review_table,
    patient_record_table,
    person_table,
    record_key_table,
)

log = Logger()
Key = tuple[str, str]  # (facility, mrn)
ACTOR = "exchange"  # link_event.actor of automatic decisions
STOP_KEY = 100  # a blocking key with more active records than this finds no candidates
KEYS_PER_SELECT = 400  # SQLite: keys per compound SELECT (its limit is 500 terms)
MANUAL_LINKS = frozenset({"manual", "source"})  # links decide() must not break
MERGE_CONFLICT = "merge_conflict"  # match_review.kind: an A40 a sticky not-a-match stopped from merging persons


class ModelCache:
    """The newest stored model (``match_model``), re-read at most every ``ttl`` seconds;
    ``default_model()`` until one is stored."""

    def __init__(self, ttl: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._model = default_model()
        self._id: int | None = None
        self._checked = float("-inf")

    def get(self, conn: Connection) -> Model:
        now = self._clock()
        if now - self._checked >= self._ttl:
            self._checked = now
            row = _newest_model_row(conn)
            if row is not None and row.id != self._id:
                self._model, self._id = Model.from_json(row.model), row.id
        return self._model


def _newest_model_row(conn: Connection):
    return conn.execute(
        select(match_model_table.c.id, match_model_table.c.model).order_by(match_model_table.c.id.desc()).limit(1)
    ).first()


def stored_model(conn: Connection) -> Model:
    """The model the writer uses now: the newest ``match_model`` row, else the default (read
    afresh: ``ModelCache`` is the writer's cached view of the same)."""
    row = _newest_model_row(conn)
    return Model.from_json(row.model) if row is not None else default_model()


@dataclass(slots=True)
class _Known:
    """A record as the index sees it during a batch."""

    person: int | str  # a person id, or the placeholder of a person this batch creates
    features: Features | None
    link: str


@dataclass
class Plan:
    """What the batch decided, for ``records.save(links=)`` and :func:`write`."""

    links: dict[Key, RecordLink] = field(default_factory=dict)
    keys: dict[Key, frozenset[str]] = field(default_factory=dict)  # records whose key rows are replaced
    new_records: set[Key] = field(default_factory=set)  # nothing to delete for these
    events: list[dict[str, Any]] = field(default_factory=list)  # link_event rows (to_person resolved in write)
    reviews: list[dict[str, Any]] = field(default_factory=list)
    superseded: list[Key] = field(default_factory=list)  # open reviews of these records are superseded
    superseded_reviews: list[int] = field(default_factory=list)  # and these open reviews (answered by a merge)
    kept_reviews: list[int] = field(default_factory=list)  # but not these (a merge conflict that still stands)
    pairs: list[tuple[Key, Key]] = field(default_factory=list)  # new sticky not-a-match pairs (A37)
    moves: list[tuple[Key, int | str]] = field(default_factory=list)  # records outside the batch changing person
    actions: dict[Hashable, list[str]] = field(default_factory=dict)  # message ref -> decisions (for metrics)
    restored: dict[Key, LastLink] = field(default_factory=dict)  # replay: records placed by their link history
    replaced: dict[str, int | str] = field(default_factory=dict)  # a placeholder no record kept -> where it went
    told: dict[Hashable, list[Problem]] = field(default_factory=dict)  # message ref -> what its sender is told
    # (from person, to person, facility): opt-outs that follow a record of the facility without the
    # persons merging (its merge held back: the retired record lives on as the survivor)
    opt_outs: list[tuple[int | str, int | str, str]] = field(default_factory=list)


def plan(conn: Connection, state: MemoryState, model: Model) -> Plan:
    """Match the batch's new and changed records (before ``records.save``).

    The link history and the reviews name the message that last changed
    each record (from the batch's history: ``process_batch`` has rebased its
    references to message ids by then).
    """
    d = state.dirty()
    refs = _last_refs(d.history)
    ids: dict[Key, tuple[int, int]] = state.store_ids.get("records", {})
    stored: dict[Key, tuple[str, str | None]] = state.store_ids.get("match", {})
    out = Plan()
    old_key = {key: old for key, old in d.changed_records}
    todo: list[tuple[Key, Features, str]] = []
    known: dict[Key, _Known] = {}  # the batch's records, as decided so far
    for key in itertools.chain(d.new_records, old_key):
        rec = state.records[key]
        before = old_key.get(key)
        link, stored_features = stored.get(before, ("auto", None)) if before else ("auto", None)
        if before is None:
            out.new_records.add(key)
        if not rec["active"]:  # merged away: not a candidate any more, keeps its person
            out.keys[key] = frozenset()
            continue
        f = features_of(rec)
        encoded = encode_features(f)
        if before is not None and encoded == stored_features:
            continue  # nothing matching reads has changed (an A47 alone: carry_renames moved its reviews)
        todo.append((key, f, encoded))
        if before is not None:
            known[key] = _Known(ids[before][1], f, link)
    source = _source_assertions(state, d)
    merges = [(facility, key[0], key[1]) for _ref, kind, facility, key in d.history
              if kind == "MergePatients" and (facility, key[1]) in ids]
    if not todo and not source and not merges:
        return out

    wanted = {k: blocking_keys(f) for k, f, _ in todo}
    # a merge reads both persons' records, so it sees which facilities the survivor's person holds already
    own = ({p.person for p in known.values() if isinstance(p.person, int)}
           | {ids[k][1] for f, s, r in merges for k in ((f, s), (f, r)) if k in ids})
    postings, members, db_known, not_a_match = _read(conn, set().union(*wanted.values()) if wanted else set(), own,
                                                     [k for k, _, _ in todo])
    renamed = {old: key for key, old in d.changed_records if key != old}
    if renamed:  # the database holds them under their old MRN until records.save: the batch's names
        postings = {bk: {renamed.get(k, k) for k in keys} for bk, keys in postings.items()}
        members = {p: {renamed.get(k, k) for k in keys} for p, keys in members.items()}
        db_known = {renamed.get(k, k): kn for k, kn in db_known.items()}
    for key, k in db_known.items():  # the database's view, unless this batch holds the record
        known.setdefault(key, k)
    for person, keys in list(members.items()):
        members[person] = {k for k in keys if k not in old_key or known[k].person == person}
    for key, kn in known.items():
        members.setdefault(kn.person, set()).add(key)
    batch_postings: dict[str, set[Key]] = {}
    placeholders = itertools.count()

    for key, f, encoded in todo:
        current = known.get(key)
        cand_keys: set[Key] = set()
        for bk in wanted[key]:
            cand_keys |= postings.get(bk, set())
            cand_keys |= batch_postings.get(bk, set())
        cand_keys.discard(key)
        persons = {known[c].person for c in cand_keys if c in known}
        if current is not None:
            persons.add(current.person)
        for person in persons:
            cand_keys |= members.get(person, set())
        cand_keys.discard(key)
        candidates = [Record(c[0], c[1], _str(known[c].person), known[c].features)
                      for c in sorted(cand_keys) if c in known and known[c].features is not None]
        try:
            decision = decide(Record(key[0], key[1], _str(current.person) if current else None, f), candidates,
                              model, not_a_match=not_a_match.get(key, ()),
                              manual=current is not None and current.link in MANUAL_LINKS)
        except Exception:  # a bug in matching must not stop the intake: the record keeps (or gets) its own person
            log.failure("matching a record failed; it keeps its own person")
            decision = Decision(Action.KEEP if current else Action.NEW, _str(current.person) if current else None,
                                None, (), ())
        out.actions.setdefault(refs.get(key), []).append(str(decision.action))
        person = _apply(out, key, current, decision, encoded, refs.get(key), placeholders)
        if current is not None and current.person != person:
            members.get(current.person, set()).discard(key)
        members.setdefault(person, set()).add(key)
        known[key] = _Known(person, f, current.link if current and decision.action is not Action.LINK else "auto")
        out.keys[key] = wanted[key]
        for bk in wanted[key]:
            batch_postings.setdefault(bk, set()).add(key)
        if current is not None:
            out.superseded.append(key)

    if out.superseded:
        out.kept_reviews = _conflicts_standing(conn, out.superseded, known)
    for facility, a, b, linked in source:
        _assert_link(out, state, ids, stored, known, members, (facility, a), (facility, b), linked, refs, placeholders)
    joined: dict[Key, set[Key]] = {}  # survivor -> the records its person gained
    retired_into: dict[Key, set[Key]] = {}  # survivor -> the records merged into it
    if merges:
        involved = {p for f, s, r in merges for p in (known[(f, s)].person if (f, s) in known else ids[(f, s)][1],
                                                       ids[(f, r)][1])}
        sticky = _merge_pairs(conn, set().union(*(members.get(p, set()) for p in involved))
                              | {(f, r) for f, _, r in merges})
    for facility, survivor, retired in merges:
        joined.setdefault((facility, survivor), set()).update(_merge_persons(
            out, state, ids, stored, known, members, (facility, survivor), (facility, retired), refs, sticky, model))
        retired_into.setdefault((facility, survivor), set()).add((facility, retired))
        out.superseded.append((facility, retired))  # its facility has decided what it is
    if joined:
        out.superseded_reviews = _answered_by_merges(conn, joined, retired_into)
    return out


def carry_renames(conn: Connection, state: MemoryState) -> list[tuple[Key, Key]]:
    """A47 (``ChangeIdentifier``): what the patient index keeps under a record's old MRN follows
    it to the new one, in the batch's transaction, before :func:`plan` reads any of it. Returns
    the renames, (old key, new key).

    Its reviews, in every state (an undo reopens a resolved one), with the record in their
    detail; its name among the candidates of the open reviews of other records; its sticky
    not-a-match pairs, both ways round (else a re-match could link it where a technician said
    no); and its link history, which undoing a decision about it reads. A decided review of
    another record keeps naming it by the old MRN among its candidates (what was shown then).

    ``exchange replay`` does not call this: it re-applies the A47 to a model whose index rows
    name the new MRN already (and a record that took the old MRN since has its own)."""
    renames = sorted((old, key) for key, old in state.dirty().changed_records if key != old)
    if not renames:
        return []
    new_of = dict(renames)
    # Two steps, through a name no record has, so that a batch that renames H1 to H2 and H3 to
    # H1 (or swaps two MRNs) does not pour one record's rows into the other's.
    steps = [[(old, (old[0], f"~moving~{i}")) for i, (old, _) in enumerate(renames)],
             [((old[0], f"~moving~{i}"), new) for i, (old, new) in enumerate(renames)]]
    for step in steps:
        for (facility, old), (_, new) in step:
            for table in (match_review_table, link_event_table, match_pair_table):
                conn.execute(table.update().where(table.c.facility == facility, table.c.mrn == old).values(mrn=new))
            # the other side of its pairs (stored both ways round: found through its own side's index)
            others = select(match_pair_table.c.other_facility, match_pair_table.c.other_mrn).where(
                match_pair_table.c.facility == facility, match_pair_table.c.mrn == new)
            conn.execute(match_pair_table.update().where(
                tuple_(match_pair_table.c.facility, match_pair_table.c.mrn).in_(others),
                match_pair_table.c.other_facility == facility, match_pair_table.c.other_mrn == old,
            ).values(other_mrn=new))

    def renamed(entry: Any) -> Any:
        if isinstance(entry, dict) and (entry.get("facility"), entry.get("mrn")) in new_of:
            return {**entry, "mrn": new_of[(entry["facility"], entry["mrn"])][1]}
        return entry

    mentions = [json.dumps(mrn, ensure_ascii=escaped) for _, mrn in new_of for escaped in (True, False)]
    like = [cast(match_review_table.c.detail, Text).contains(m, autoescape=True) for m in sorted(set(mentions))]
    rows = conn.execute(select(match_review_table.c.id, match_review_table.c.detail).where(or_(
        tuple_(match_review_table.c.facility, match_review_table.c.mrn).in_(sorted(set(new_of.values()))),
        and_(match_review_table.c.state == "open", or_(*like)))))
    for review_id, detail in rows:
        if not isinstance(detail, dict):
            continue
        changed = dict(detail)
        if "record" in detail:
            changed["record"] = renamed(detail["record"])
        if isinstance(detail.get("candidates"), list):
            changed["candidates"] = [renamed(c) for c in detail["candidates"]]
        if changed != detail:
            conn.execute(match_review_table.update().where(match_review_table.c.id == review_id)
                         .values(detail=changed))
    return renames


_KEY_LOCK_NAMESPACE = 0x45584B59  # "EXKY": pg_advisory_xact_lock(int, int)'s first key (outbox's is "EXCH")


_LOCK_KEYS = "SELECT pg_advisory_xact_lock(%(ns)s, k) FROM (SELECT unnest(%(keys)s::int[]) AS k ORDER BY 1) AS s"
"""PostgreSQL, several nodes: a transaction lock on each blocking key the batch will search,
taken in one order (no deadlock between writers) before the candidates are read.

Two nodes registering the same new patient at once would otherwise each miss the other's
uncommitted record and make two persons, with no review. The second one now waits for the
first to commit, then finds its record (read committed: each statement sees what committed
before it began, and the read is the statement after the lock). A key's lock is its CRC-32
(``advisory_key``): a collision only makes two unrelated keys wait for each other."""


def _answered_by_merges(conn: Connection, joined: dict[Key, set[Key]], retired_into: dict[Key, set[Key]]) -> list[int]:
    """Open reviews of survivors whose every candidate has joined the survivor's person
    through the merge, or that name a record merged into the survivor as a candidate: the
    facility has answered them (a duplicate it has now merged; a decision on it would part
    the survivor from its retired record)."""
    sql = (select(match_review_table.c.id, match_review_table.c.facility, match_review_table.c.mrn,
                  match_review_table.c.detail)
           .where(match_review_table.c.state == "open",
                  match_review_table.c.mrn.in_(sorted({mrn for _, mrn in joined}))))
    out = []
    for row in conn.execute(sql):
        gained = joined.get((row.facility, row.mrn))
        detail = row.detail if isinstance(row.detail, dict) else {}
        candidates = {(c.get("facility"), c.get("mrn")) for c in detail.get("candidates") or () if isinstance(c, dict)}
        retired = retired_into.get((row.facility, row.mrn), set())
        if candidates and ((gained and candidates <= gained) or candidates & retired):
            out.append(row.id)
    return out


def _merge_pairs(conn: Connection, keys: set[Key]) -> dict[Key, list[tuple[Key, int | None, int | None]]]:
    """A batch with merges: the active sticky not-a-match pairs of ``keys`` (the records a merge
    may move), each with its other record's person as the database holds it and the decision
    that made the pair (None: an A37)."""
    out: dict[Key, list[tuple[Key, int | None, int | None]]] = {}
    for chunk in _chunks(sorted(keys), KEYS_PER_SELECT):
        for r in conn.execute(
            select(match_pair_table.c.facility, match_pair_table.c.mrn, match_pair_table.c.other_facility,
                   match_pair_table.c.other_mrn, match_pair_table.c.decision_id, patient_record_table.c.person_id)
            .outerjoin(patient_record_table, and_(patient_record_table.c.facility == match_pair_table.c.other_facility,
                                                  patient_record_table.c.mrn == match_pair_table.c.other_mrn))
            .where(match_pair_table.c.active,
                   or_(*(and_(match_pair_table.c.facility == f, match_pair_table.c.mrn == m) for f, m in chunk)))
        ):
            out.setdefault((r.facility, r.mrn), []).append(((r.other_facility, r.other_mrn), r.person_id,
                                                            r.decision_id))
    return out


def _conflicts_standing(conn: Connection, rematched: list[Key], known: dict[Key, _Known]) -> list[int]:
    """Open ``merge_conflict`` reviews of re-matched records that a re-match must not supersede:
    the record still shares its person with a candidate (a record marked not a match with one
    merged into it). One SELECT, in batches that re-match records the index held already."""
    keys = set(rematched)
    rows = conn.execute(
        select(match_review_table.c.id, match_review_table.c.facility, match_review_table.c.mrn,
               match_review_table.c.detail)
        .where(match_review_table.c.state == "open", match_review_table.c.kind == MERGE_CONFLICT,
               match_review_table.c.mrn.in_(sorted({mrn for _, mrn in keys})))
    )
    out = []
    for row in rows:
        key = (row.facility, row.mrn)
        if key not in keys or key not in known:
            continue
        detail = row.detail if isinstance(row.detail, dict) else {}
        candidates = {(c.get("facility"), c.get("mrn")) for c in detail.get("candidates") or () if isinstance(c, dict)}
        if any(c in known and known[c].person == known[key].person for c in candidates):
            out.append(row.id)
    return out


def _merge_persons(out, state, ids, stored, known, members, survivor: Key, retired: Key, refs, sticky,
                   model: Model) -> set[Key]:
    """A40 and the legacy merges: the facility says both records are one patient, so the
    retired record's person joins the survivor's: its records move over (link kept), unless
    the survivor's person already holds an active record of that facility (a review then).
    When a sticky not-a-match (``sticky``: :func:`_merge_pairs`) stands between a record of
    the retired record's person (the retired one included) and one of the survivor's, the
    persons conflict: nothing moves, and a ``merge_conflict`` review of the survivor asks
    about the records of its person that pair names.
    Returns the records now with the survivor's person (the ones there already included; none
    after a conflict)."""
    target = known[survivor].person if survivor in known else ids[survivor][1]
    source = ids[retired][1]
    there = set(members.get(target, set()))
    if source == target:
        return there
    ref = refs.get(survivor)

    def person_now(key: Key, db_person: int | None) -> int | str | None:
        if key in known:
            return known[key].person
        return out.links[key].person if key in out.links else db_person

    conflicts = sorted(((key, other, decision) for key in members.get(source, set()) | {retired}
                        for other, db_person, decision in sticky.get(key, ()) if person_now(other, db_person) == target),
                       key=lambda c: (c[0], c[1]))
    if conflicts:
        out.reviews.append(_conflict_review(survivor, retired, target, conflicts, known, model, ref))
        out.told.setdefault(ref, []).append(MERGE_HELD)
        out.opt_outs.append((source, target, survivor[0]))  # the patient's opt-out goes with the survivor
        return set()  # nothing joined the survivor's person
    taken = {k[0] for k in members.get(target, set()) if k in known and k != retired}
    theirs = set(members.get(target, set())) - {retired}  # the survivor's person before the merge
    for key in sorted(members.get(source, set()) | {retired}):
        if key != retired and key[0] in taken:
            out.reviews.append(_kept_apart(key, target, ref, None, [], f"merge at {survivor[0]}: the person"
                                                                         f" already holds a record of {key[0]}"))
            continue
        current = known.get(key)
        if key != retired and (current is None or current.link not in MANUAL_LINKS):
            # Linked by the patient index to the retired record's person: the facility's merge
            # says nothing about this record. It follows only if it matches the survivor's
            # person as well; else it stays, and a technician is asked (a wrong merge at one
            # site must not file its survivor's events in another site's other patient).
            best = _best_score(current.features if current else None, theirs, known, model)
            if best is None or best < model.upper:
                out.reviews.append(_kept_apart(
                    key, target, ref, best,
                    [{"facility": survivor[0], "mrn": survivor[1], "person": target, "score": best}],
                    f"merge at {survivor[0]} of {retired[1]} into {survivor[1]}: this record was matched to"
                    f" {retired[1]}'s person and does not match the survivor's person well enough to follow it;"
                    f" not moved"))
                continue
        if key == retired:
            link, features = stored.get(retired, ("auto", None))
        else:
            link = current.link if current else "auto"
            features = encode_features(current.features) if current and current.features is not None else None
        out.events.append(_event(key, _Known(source, None, link), target, "merge", link, None,
                                 f"{survivor[0]} merged {retired[1]} into {survivor[1]}", ref))
        if key in state.records:
            previous = out.links.get(key)
            out.links[key] = RecordLink(target, link, previous.score if previous else None,
                                        previous.features if previous else features)
        else:
            out.moves.append((key, target))
        members.get(source, set()).discard(key)
        members.setdefault(target, set()).add(key)
        there.add(key)
        if current is not None:
            current.person = target
    return there


def _kept_apart(key: Key, person: int | str, ref, best: float | None, candidates: list[dict], reason: str) -> dict:
    """The duplicate review of a record a facility's merge did not carry to the survivor's person."""
    return {"facility": key[0], "mrn": key[1], "kind": "duplicate", "person": person, "score": best, "message": ref,
            "detail": {"record": {"facility": key[0], "mrn": key[1]}, "candidates": candidates, "action": "review",
                       "reasons": [reason]}}


def _best_score(f: Features | None, records: set[Key], known, model: Model) -> float | None:
    """The best score of features ``f`` against ``records`` (those with features); None without any."""
    scores = [score(f, known[k].features, model).total for k in records
              if f is not None and k in known and known[k].features is not None]
    return max(scores) if scores else None


MERGE_HELD = Problem(0, "MRG-1", "the record is merged, its enterprise person is not: a 'not a match' decision"
                                 " keeps the two persons apart until a technician reviews it (merge_conflict)")
"""What the sender of a merge the index held back is told (no identifier: the answer's reason)."""


def _conflict_review(survivor: Key, retired: Key, person: int | str, conflicts, known, model: Model, ref) -> dict:
    """The review a merge opens instead of merging persons a sticky not-a-match keeps apart:
    the survivor against the records of its own person that pair names, scored."""
    a, b, decision = conflicts[0]
    who = f"decision {decision}" if decision is not None else "the facility (A37)"
    reason = (f"merge at {survivor[0]} of {retired[1]} into {survivor[1]}: {a[0]} {a[1]} and {b[0]} {b[1]} are marked "
              f"not a match by {who}; the persons were not merged")
    f = known[survivor].features if survivor in known else None
    candidates = []
    for other in sorted({b for _, b, _ in conflicts} - {survivor}):
        g = known[other].features if other in known else None
        s = score(f, g, model) if f is not None and g is not None else None
        candidates.append({"facility": other[0], "mrn": other[1], "person": person,
                           "score": s.total if s else None, "explain": s.explain() if s else {}})
    candidates.sort(key=lambda c: -(c["score"] if c["score"] is not None else float("-inf")))
    best = candidates[0]["score"] if candidates else None
    return {"facility": survivor[0], "mrn": survivor[1], "kind": MERGE_CONFLICT, "person": person, "score": best,
            "message": ref, "detail": {"record": {"facility": survivor[0], "mrn": survivor[1]},
                                       "retired": {"facility": retired[0], "mrn": retired[1]},
                                       "candidates": candidates, "action": "review", "reasons": [reason]}}


def saved_links(conn: Connection) -> dict[Key, RecordLink]:
    """Every record's person, link and score (``exchange replay`` keeps them across the rebuild)."""
    return {
        (r.facility, r.mrn): RecordLink(r.person_id, r.link, r.link_score)
        for r in conn.execute(text("SELECT facility, mrn, person_id, link, link_score FROM patient_record"))
    }


@dataclass(frozen=True, slots=True)
class LastLink:
    """Where a record's link history (``link_event``) left it: its last event's person and link,
    and the live person that person is now (``person.merged_into`` followed; None: gone)."""

    to_person: int
    link: str
    score: float | None
    person: int | None


def last_links(conn: Connection, keys: list[Key]) -> dict[Key, LastLink]:
    """``exchange replay``: the last link event of each of ``keys`` (records the rebuild meets
    that had no saved link: their facility or message was left out of an earlier replay)."""
    out: dict[Key, tuple[int, str, float | None]] = {}
    for i in range(0, len(keys), KEYS_PER_SELECT):
        chunk = keys[i:i + KEYS_PER_SELECT]
        last = (select(func.max(link_event_table.c.id))
                .where(or_(*(and_(link_event_table.c.facility == f, link_event_table.c.mrn == m) for f, m in chunk)))
                .group_by(link_event_table.c.facility, link_event_table.c.mrn))
        for r in conn.execute(select(link_event_table.c.facility, link_event_table.c.mrn, link_event_table.c.to_person,
                                     link_event_table.c.to_link, link_event_table.c.score)
                              .where(link_event_table.c.id.in_(last.scalar_subquery()))):
            if r.to_person is not None:
                out[(r.facility, r.mrn)] = (r.to_person, r.to_link or "auto", r.score)
    merged = {i: r.merged_into for i, r in merge_chains(conn, {p for p, _, _ in out.values()}).items()}
    return {key: LastLink(p, link, score, live_person(merged, p)) for key, (p, link, score) in out.items()}


def live_person(merged: dict[int, int | None], person: int) -> int | None:
    """``person`` followed through its merges (``merged``: person id -> merged_into) to the person
    holding its records now; None when it or a person on the way is gone, or the chain loops or
    is longer than MAX_MERGE_HOPS."""
    for _ in range(MAX_MERGE_HOPS + 1):
        if person not in merged:
            return None
        into = merged[person]
        if into is None:
            return person
        person = into
    return None


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def unsaved_records(state: MemoryState, saved: dict[Key, RecordLink]) -> list[Key]:
    """A replayed batch's new records that had no saved link: the ones to look up in :func:`last_links`."""
    return [key for key in state.dirty().new_records if key not in saved]


def restore(state: MemoryState, saved: dict[Key, RecordLink], history: dict[Key, LastLink] | None = None) -> Plan:
    """A replayed batch: records keep the person, link and score they had (``saved``); a record
    the rebuild meets without one goes back to the live person its link history names
    (``history``: :func:`last_links`), link and score kept; a record with neither (or whose
    person is gone) gets a person of its own. Features and keys are recomputed. Nothing is
    matched, no history or review is written; ``Plan.restored`` lists the records looked up in
    their history, for :func:`write_restored` at the end of the rebuild."""
    history = history or {}
    d = state.dirty()
    ids: dict[Key, tuple[int, int]] = state.store_ids.get("records", {})
    stored: dict[Key, tuple[str, str | None]] = state.store_ids.get("match", {})
    out = Plan(new_records=set(d.new_records))
    placeholders = itertools.count()
    for key, before in itertools.chain(((k, None) for k in d.new_records), d.changed_records):
        rec = state.records[key]
        f = features_of(rec)
        out.keys[key] = blocking_keys(f) if rec["active"] else frozenset()
        link = saved.get(key)
        if link is None and before is not None:
            link = RecordLink(ids[before][1], stored.get(before, ("auto", None))[0])
        last = history.get(key) if link is None else None
        if last is not None:
            out.restored[key] = last
            if last.person is not None:
                link = RecordLink(last.person, last.link, last.score)
        if link is None:
            link = RecordLink(f"new:{next(placeholders)}")
        out.links[key] = RecordLink(link.person, link.link, link.score, encode_features(f))
    return out


@dataclass(frozen=True, slots=True)
class RestoreCount:
    back: int = 0  # records back with the (live) person their link history names
    lost: int = 0  # records whose history's person no longer exists: a person of their own


def write_restored(conn: Connection, restored: dict[Key, LastLink], now: datetime) -> RestoreCount:
    """End of ``exchange replay``: the records now in the database that came back by their link
    history. The one whose person is not the one that history names (a merge followed, or that
    person gone: a person of its own) gets one link event saying so, and the opt-out follows.
    A record the rebuild met only on the way (renamed later, A47) is not there: nothing."""
    if not restored:
        return RestoreCount()
    now_at: dict[Key, tuple[int, str]] = {}
    for chunk in _chunks(sorted(restored), KEYS_PER_SELECT):
        now_at.update({(r.facility, r.mrn): (r.person_id, r.link) for r in conn.execute(
            select(patient_record_table.c.facility, patient_record_table.c.mrn, patient_record_table.c.person_id,
                   patient_record_table.c.link)
            .where(or_(*(and_(patient_record_table.c.facility == f, patient_record_table.c.mrn == m)
                         for f, m in chunk))))})
    events, count = [], RestoreCount()
    for key, last in sorted(restored.items()):
        if key not in now_at:
            continue
        person, link = now_at[key]
        if last.person is None:
            reason = f"replay: its link history's person {last.to_person} no longer exists: a person of its own"
            count = RestoreCount(count.back, count.lost + 1)
        elif last.person == person:
            reason = f"replay: back with its link history's person {last.to_person}, merged into {person}"
            count = RestoreCount(count.back + 1, count.lost)
        else:  # not placed by its history after all (renamed onto another record's key)
            continue
        if person != last.to_person:
            events.append({"facility": key[0], "mrn": key[1], "from_person": last.to_person, "to_person": person,
                           "from_link": last.link, "to_link": link, "kind": "auto", "score": None,
                           "reason": reason, "message_id": None, "actor": ACTOR, "at": now})
    if events:
        conn.execute(insert(link_event_table), events)
        carry_opt_outs(conn, [(e["from_person"], e["to_person"]) for e in events], now)
    return count


def drop_unused_persons(conn: Connection, ids: set[int]) -> int:
    """End of ``exchange replay``: delete the persons it created (``ids``) that hold no record any
    more: one given to a record that a later batch renamed (A47) onto a record with a saved link.
    Nothing else refers to them (a replay writes no review and no history for them)."""
    dropped = 0
    for chunk in _chunks(sorted(ids), KEYS_PER_SELECT):
        dropped += conn.execute(
            delete(person_table).where(person_table.c.id.in_(chunk), ~exists().where(
                patient_record_table.c.person_id == person_table.c.id))
        ).rowcount
    return dropped


def _apply(out: Plan, key: Key, current: _Known | None, d: Decision, encoded: str, ref, placeholders) -> int | str:
    """Record the decision for ``key``: its link, its history, its reviews. Returns its person."""
    if d.action is Action.LINK:
        person = _person(d.person)
        link, score = "auto", d.score
    elif d.action is Action.KEEP:
        assert current is not None
        person, link, score = current.person, current.link, d.score
    elif current is not None and current.link == "auto" and Reason.LINK_LOOKS_WRONG in d.reasons:
        # The writer's own link no longer holds (an update made the record someone else): undone
        # at once, so no copy crosses it while the review waits; the review suggests the old person.
        person, link, score = f"new:{next(placeholders)}", "auto", d.score
    else:  # NEW, or REVIEW of a record that has no person yet: one of its own until it is decided
        person = current.person if current is not None else f"new:{next(placeholders)}"
        link, score = (current.link if current is not None else "auto"), d.score if d.action is Action.REVIEW else None
    out.links[key] = RecordLink(person, link, score, encoded)
    if current is None or current.person != person:
        out.events.append(_event(key, current, person, "auto", link, score, ", ".join(d.reasons), ref))
    if d.action is Action.REVIEW:
        kind = ("link_looks_wrong" if Reason.LINK_LOOKS_WRONG in d.reasons
                else "duplicate" if Reason.SAME_FACILITY in d.reasons else "candidate")
        out.reviews.append(_review(key, kind, d, d.matches, person if d.person is None else _person(d.person), ref))
    elif d.duplicates:
        out.reviews.append(_review(key, "duplicate", d, d.duplicates, person, ref))
    return person


def _assert_link(out, state, ids, stored, known, members, a: Key, b: Key, linked: bool, refs, placeholders) -> None:
    """A24 (linked): ``b`` joins ``a``'s person, link "source". A37: a sticky pair, and ``b``
    gets a person of its own if they shared one."""
    if a not in state.records or b not in state.records:
        return  # the mapping applies it to records it knows; nothing to link otherwise

    def person_of(key: Key) -> int | str:
        if key in known:
            return known[key].person
        if key in out.links:
            return out.links[key].person
        return ids[key][1]

    # b as the batch left it; one it did not re-match is as stored (its link, its features)
    saved_link, saved_features = stored.get(b, ("auto", None)) if b not in out.new_records else ("auto", None)
    pa, pb = person_of(a), person_of(b)
    current = _Known(pb, None, known[b].link if b in known else saved_link)
    if linked:
        target = pa
    else:
        out.pairs.append((a, b))
        target = f"new:{next(placeholders)}" if pa == pb else pb
    if target == pb and (linked is False or current.link == "source"):
        return
    previous = out.links.get(b)
    features = previous.features if previous else None
    if features is None and b in known and known[b].features is not None:
        features = encode_features(known[b].features)
    if features is None:
        features = saved_features  # never wiped: a record without features is nobody's candidate
    out.links[b] = RecordLink(target, "source", None, features)
    members.get(pb, set()).discard(b)
    if isinstance(pb, str) and pb != target and not members.get(pb):
        # b alone held a person this batch was to create (b is new, or a re-match has just taken
        # it out of its person), and leaves it: that person is never created. b's history goes
        # from where it was before the batch straight to the facility's person, and whatever
        # the batch wrote naming the placeholder (a review of b) names that person instead.
        for i in range(len(out.events) - 1, -1, -1):
            e = out.events[i]
            if (e["facility"], e["mrn"]) == b and e["to_person"] == pb:
                del out.events[i]
                current = None if e["from_person"] is None else _Known(e["from_person"], None, e["from_link"])
                break
        out.replaced[pb] = target
    out.events.append(_event(b, current, target, "source", "source", None,
                             "A24 link asserted by the facility" if linked else "A37 unlink asserted by the facility",
                             refs.get(b)))
    members.setdefault(target, set()).add(b)
    known[b] = _Known(target, known[b].features if b in known else stored_features(saved_features), "source")


def _event(key: Key, current: _Known | None, person, kind: str, link: str, score, reason: str, ref) -> dict:
    return {"facility": key[0], "mrn": key[1], "from_person": current.person if current else None,
            "to_person": person, "from_link": current.link if current else None, "to_link": link,
            "kind": kind, "score": score, "reason": reason, "message": ref}


def review_candidate(m: Match) -> dict:
    """A scored candidate as a review's detail shows it: the record, its person, the score and why."""
    return {"facility": m.facility, "mrn": m.mrn, "person": _int_or_none(m.person), "score": m.total,
            "explain": m.score.explain()}


def _review(key: Key, kind: str, d: Decision, matches, person, ref) -> dict:
    return {
        "facility": key[0], "mrn": key[1], "kind": kind, "person": person, "score": d.score, "message": ref,
        "detail": {
            "record": {"facility": key[0], "mrn": key[1]},
            "candidates": [review_candidate(m) for m in matches],
            "reasons": [str(r) for r in d.reasons],
            "action": str(d.action),
        },
    }


def write(conn: Connection, plan_: Plan, state: MemoryState, model: Model, now: datetime) -> None:
    """After ``records.save(links=plan_.links)``: key rows, link history, reviews, sticky pairs."""
    ids: dict[Key, tuple[int, int]] = state.store_ids["records"]
    sqlite = conn.dialect.name == "sqlite"
    placeholder_person = {link.person: ids[key][1] for key, link in plan_.links.items()
                          if isinstance(link.person, str) and key in ids}

    def person(p, strict: bool = True):
        """A person id for what the plan names: an id, or a placeholder (of a person ``records.save``
        created, or one no record kept, through where its record went)."""
        for _ in range(len(plan_.replaced) + 1):
            if not isinstance(p, str):
                return p
            if p in placeholder_person:
                return placeholder_person[p]
            p = plan_.replaced.get(p, p)
        if not strict:
            return None
        # never into an integer column (SQLite would store the text; PostgreSQL refuses the batch)
        raise ValueError(f"patient index: person placeholder {p!r} stands for no person")

    def candidate(c: dict) -> dict:  # review JSON: the candidate's person as the batch left it
        return {**c, "person": person(c["person"], strict=False)} if isinstance(c.get("person"), str) else c

    with driver_cursor(conn, "patient index (exchange.store.index)") as cursor, _pipeline(cursor, sqlite):
        w = Writer(cursor, sqlite, _SQLITE_STATEMENTS if sqlite else _PG_STATEMENTS)
        replaced = [ids[k][0] for k in plan_.keys if k not in plan_.new_records and k in ids]
        w.delete_ids(record_key_table, "record_id", replaced)
        w.many("insert_key", [{"key": bk, "record_id": ids[k][0]} for k, keys in plan_.keys.items() if k in ids
                              for bk in sorted(keys)])
        if plan_.superseded:
            params: list = []
            where = " OR ".join(["(facility = ? AND mrn = ?)" if sqlite else "(facility = %s AND mrn = %s)"]
                                * len(plan_.superseded))
            for key in plan_.superseded:
                params.extend(key)
            if plan_.kept_reviews:
                where = f"({where}) AND id NOT IN ({', '.join(['?' if sqlite else '%s'] * len(plan_.kept_reviews))})"
                params.extend(plan_.kept_reviews)
            cursor.execute(f"UPDATE match_review SET state = 'superseded' WHERE state = 'open' AND ({where})", params)
        if plan_.superseded_reviews:
            marks = ", ".join(["?" if sqlite else "%s"] * len(plan_.superseded_reviews))
            cursor.execute(f"UPDATE match_review SET state = 'superseded' WHERE state = 'open' AND id IN ({marks})",
                           plan_.superseded_reviews)
        w.many("insert_event", [
            {**{k: e[k] for k in ("facility", "mrn", "from_link", "to_link", "kind", "score", "reason")},
             "from_person": person(e["from_person"]), "to_person": person(e["to_person"]),
             "message_id": e["message"], "actor": ACTOR, "at": now}
            for e in plan_.events
        ])
        thresholds = {"upper": model.upper, "lower": model.lower}
        w.many("insert_review", [
            {"state": "open", "kind": r["kind"], "facility": r["facility"], "mrn": r["mrn"],
             "person_id": person(r["person"]), "score": r["score"], "message_id": r["message"],
             "created_at": now,
             "detail": {**r["detail"], "thresholds": thresholds,
                        "record": {**r["detail"]["record"], "person": person(r["person"])},
                        "candidates": [candidate(c) for c in r["detail"]["candidates"]]}}
            for r in plan_.reviews
        ])
        if plan_.moves:
            sql = ("UPDATE patient_record SET person_id = ? WHERE facility = ? AND mrn = ?" if sqlite
                   else "UPDATE patient_record SET person_id = %s WHERE facility = %s AND mrn = %s")
            cursor.executemany(sql, [(person(p), key[0], key[1]) for key, p in plan_.moves])
        w.many("insert_pair", [
            {"facility": x[0], "mrn": x[1], "other_facility": y[0], "other_mrn": y[1], "active": True}
            for a, b in plan_.pairs for x, y in ((a, b), (b, a))
        ])
    moved = [(e["kind"], person(e["from_person"]), person(e["to_person"])) for e in plan_.events
             if e["from_person"] is not None]
    # a record that leaves a person who opted out takes the opt-out along (a merge, a new match)
    carry_opt_outs(conn, [(a, b) for _, a, b in moved], now)
    for a, b, facility in plan_.opt_outs:
        carry_opt_outs(conn, [(person(a), person(b))], now, record_of=facility)
    # a person a facility's merge (A40) emptied answers merged_into the survivor's person, as
    # after a technician's merge; undoing the merge clears it again
    merged: dict[int, set[int | None]] = {}
    for kind, a, b in moved:
        if kind == "merge":
            merged.setdefault(a, set()).add(b)
    retire_emptied(conn, merged)


def _pipeline(cursor, sqlite: bool):
    """PostgreSQL: the writes sent together, the server waited for once (nothing here reads back)."""
    return contextlib.nullcontext() if sqlite else cursor.connection.pipeline()


def _statements(sqlite: bool) -> dict[str, Statement]:
    s = functools.partial(Statement, sqlite)
    return {
        "insert_key": s(record_key_table, "insert", ("key", "record_id")),
        "insert_event": s(link_event_table, "insert", ("facility", "mrn", "from_person", "to_person", "from_link",
                                                        "to_link", "kind", "score", "reason", "message_id", "actor",
                                                        "at")),
        "insert_review": s(match_review_table, "insert", ("state", "kind", "facility", "mrn", "person_id", "score",
                                                           "message_id", "created_at", "detail")),
        "insert_pair": s(match_pair_table, "insert", ("facility", "mrn", "other_facility", "other_mrn", "active")),
    }


_SQLITE_STATEMENTS = _statements(True)
_PG_STATEMENTS = _statements(False)


# --- reading candidates ---------------------------------------------------------------------------


def _read(conn: Connection, keys: set[str], own_persons: set[int], subjects: list[Key]):
    """What the patient index holds for a batch: the postings of ``keys`` (blocking key ->
    record keys), the persons' members, the records found (each read once, however many keys
    found it: every active record of the persons the postings lead to and of ``own_persons``),
    and the active sticky not-a-match pairs of ``subjects``.

    A key shared by more than STOP_KEY records (a nursing home's switchboard number, a test
    patient's name) tells nothing and would make every message cost more than the last: it
    finds no candidates. (Only active records have keys: a merged-away record's are deleted.)

    On PostgreSQL the key locks (``_LOCK_KEYS``), the candidates (one statement) and the pairs
    are sent in one pipeline: the server is waited for once. On SQLite, where a statement costs
    no round trip, the postings and the records are two SELECTs, then the pairs.
    """
    if conn.dialect.name == "sqlite":
        rows = _sqlite_candidates(conn, keys, own_persons)
        pairs = select_rows(conn, None, _pairs_sql(True, subjects), [x for key in subjects for x in key]) \
            if subjects else []
    else:
        rows, pairs = _pg_read(conn, keys, own_persons, subjects)
    posted: dict[str, list[int]] = {}
    by_id: dict[int, Key] = {}
    known: dict[Key, _Known] = {}
    members: dict[int | str, set[Key]] = {}
    for bk, record_id, facility, mrn, person, link, features in rows:
        if bk is not None:
            posted.setdefault(bk, []).append(record_id)
            continue
        key = (facility, mrn)
        by_id[record_id] = key
        members.setdefault(person, set()).add(key)
        known[key] = _Known(person, stored_features(features), link)
    postings: dict[str, set[Key]] = {}
    for bk, hits in posted.items():
        found = {by_id[i] for i in hits if i in by_id}
        if found:
            postings[bk] = found
    not_a_match: dict[Key, set[Key]] = {}
    for facility, mrn, other_facility, other_mrn in pairs:
        not_a_match.setdefault((facility, mrn), set()).add((other_facility, other_mrn))
    return postings, members, known, not_a_match


def _sqlite_candidates(conn: Connection, keys: set[str], own_persons: set[int]) -> list[tuple]:
    """The postings of ``keys`` but the stop keys' as (key, record id, None x 5), then the
    records as (None, id, facility, mrn, person, link, features): one SELECT per
    KEYS_PER_SELECT keys (a compound SELECT takes at most 500 terms), each key's sub-select
    stopping after STOP_KEY + 1."""
    one = f"SELECT *, NULL, NULL, NULL, NULL, NULL FROM (SELECT key, record_id FROM record_key WHERE key = ? " \
          f"LIMIT {STOP_KEY + 1})"
    ordered = sorted(keys)
    rows: list[tuple] = []
    for i in range(0, len(ordered), KEYS_PER_SELECT):
        chunk = ordered[i:i + KEYS_PER_SELECT]
        rows += select_rows(conn, None, " UNION ALL ".join([one] * len(chunk)), chunk)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[0]] = counts.get(row[0], 0) + 1
    rows = [row for row in rows if counts[row[0]] <= STOP_KEY]
    ids = sorted({row[1] for row in rows})
    if ids or own_persons:  # json_each: any number of ids in one parameter
        rows += select_rows(conn, None, (
            "SELECT NULL, id, facility, mrn, person_id, link, features FROM patient_record WHERE active AND person_id"
            " IN (SELECT person_id FROM patient_record WHERE id IN (SELECT value FROM json_each(?))"
            " UNION SELECT value FROM json_each(?))"), [json.dumps(ids), json.dumps(sorted(own_persons))])
    return rows


_PG_CANDIDATES = (
    "WITH posted AS MATERIALIZED (SELECT u.key, p.record_id FROM unnest(%(keys)s::text[]) AS u (key)"
    " CROSS JOIN LATERAL (SELECT k.record_id FROM record_key k WHERE k.key = u.key LIMIT %(stop)s + 1) AS p),"
    " found AS MATERIALIZED (SELECT key, record_id FROM posted WHERE key IN"
    " (SELECT key FROM posted GROUP BY key HAVING count(*) <= %(stop)s))"
    " SELECT key, record_id, NULL::text, NULL::text, NULL::bigint, NULL::text, NULL::text FROM found"
    " UNION ALL"
    " SELECT NULL, r.id, r.facility, r.mrn, r.person_id, r.link, r.features"
    " FROM (SELECT person_id FROM patient_record WHERE id = ANY(ARRAY(SELECT record_id FROM found))"
    " UNION SELECT unnest(%(own)s::bigint[])) AS s (person_id) CROSS JOIN LATERAL"
    " (SELECT id, facility, mrn, person_id, link, features FROM patient_record"
    " WHERE person_id = s.person_id AND active OFFSET 0) AS r"
)
"""PostgreSQL: the postings (rows with a key) and the records they lead to (rows without), in
one statement. One LATERAL look-up per key, stopping after STOP_KEY + 1 postings; one index
look-up per person (the LATERAL sub-select, kept apart by OFFSET 0: planned as a join, without
statistics -- autovacuum off -- the table was scanned)."""


def _pg_read(conn: Connection, keys: set[str], own_persons: set[int], subjects: list[Key]):
    with (driver_cursor(conn, "patient index: key locks") as lock,
          driver_cursor(conn, "patient index: candidates") as candidates,
          driver_cursor(conn, "patient index: sticky pairs") as pairs,
          conn.connection.driver_connection.pipeline()):
        if keys:
            lock.execute(_LOCK_KEYS, {"ns": _KEY_LOCK_NAMESPACE, "keys": sorted({advisory_key(k) for k in keys})})
        if keys or own_persons:  # never a generic plan made on a small table (driver.select_rows)
            candidates.execute(_PG_CANDIDATES, {"keys": sorted(keys), "stop": STOP_KEY, "own": sorted(own_persons)},
                               prepare=False)
        if subjects:
            pairs.execute(_pairs_sql(False, subjects), [x for key in subjects for x in key], prepare=False)
        return (candidates.fetchall() if keys or own_persons else [],
                pairs.fetchall() if subjects else [])


def _pairs_sql(sqlite: bool, subjects: list[Key]) -> str:
    """Active sticky not-a-match pairs of ``subjects`` (their (facility, mrn) as parameters)."""
    where = " OR ".join(["(facility = ? AND mrn = ?)" if sqlite else "(facility = %s AND mrn = %s)"] * len(subjects))
    return f"SELECT facility, mrn, other_facility, other_mrn FROM match_pair WHERE active AND ({where})"


def _source_assertions(state: MemoryState, d) -> list[tuple[str, str, str, bool]]:
    return [(f, a, b, state.links[(f, a, b)]) for f, a, b in d.links]


def _last_refs(history) -> dict[Key, Hashable]:
    """The message that last changed each record, from the batch's history."""
    out: dict[Key, Hashable] = {}
    for ref, _kind, facility, key in history:
        for part in key:
            if isinstance(part, str):
                out[(facility, part)] = ref
    return out


def stored_features(text: str | None) -> Features | None:
    """A record's stored matching features, decoded (cached); None without them or for features
    stored by another version (recomputed by a re-match or ``exchange replay``)."""
    if text is None:
        return None
    return _decode(text)


@functools.lru_cache(maxsize=50_000)
def _decode(text: str) -> Features | None:
    """Decoded stored features, cached: the same candidates come back batch after batch
    (features are immutable values; the text is the key, so a changed record misses).
    None for features stored by another version."""
    try:
        return decode_features(text)
    except ValueError:
        return None  # stored by another version: not a candidate until re-matched


def _str(person: int | str) -> str:
    return person if isinstance(person, str) else str(person)


def _person(person: str | None) -> int | str:
    assert person is not None
    return int(person) if person.isdigit() else person


def _int_or_none(person: str | None) -> int | str | None:
    return None if person is None else _person(person)

