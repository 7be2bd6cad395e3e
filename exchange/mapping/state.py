"""A reference, in-memory record store that applies :class:`Changes`.

It defines what applying each operation means, exactly as the database
layer must implement it, and is the oracle for the replay property test
(replaying every stored message gives the live state). It implements
:class:`StateView` so map_message can be driven with it.

Semantics in one place:

* records are keyed (facility, MRN); a record is created active by the
  first operation naming it;
* ``UpsertPatient``: identifiers are merged by (authority, type) - a new
  value for the same authority and type replaces the old one, identifiers
  not named are kept, ``removed_authorities`` drop theirs; every other field
  follows the patch rule (None keeps, DELETE clears, else replaces);
* ``EncounterEvent``: the encounter is created if missing (status
  ``registered`` if the operation gives none), ``status`` replaces the
  stored one unless None, then the patch is applied;
* ``MergePatients``: the survivor is created if missing, the retired record
  too (as a tombstone); the retired record becomes inactive with
  ``merged_into`` = survivor; its identifiers are kept on the survivor as
  merged identifiers; its encounters move (a visit number the survivor
  already has keeps the survivor's encounter); its documents move; records
  merged into it earlier now point at the survivor; a survivor that had been
  merged into the retired record (the sender reverses that merge) is active again;
* ``ChangeIdentifier``: the record moves to the new MRN with its
  encounters and documents (no tombstone: the old MRN was a typo); unknown
  old MRN: nothing happens;
* ``LinkAssertion``: the source-asserted link for the pair is set (A24) or
  replaced by "not linked" (A37);
* ``DocumentEvent`` / ``MarkDocument``: see :mod:`exchange.mapping.events`;
  every version is kept, with the event and the message that made it;
* every operation appends one history entry: (message_ref, operation kind,
  facility, key).

Unit of work (for the database layer, :mod:`exchange.store.records`): a
state can be *seeded* with rows loaded from a store (``seed``), and answers
what changed since then (``dirty``): records by object identity (so an A47
rename is a moved row, not a delete and an insert), encounters per record,
documents and their versions, links and the history entries appended.
``mark_clean`` makes the current contents the new baseline. Seeding and
dirty tracking never change what ``apply`` does.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from enum import Enum
from typing import Any

from exchange.mapping.events import (
    ChangeIdentifier,
    Changes,
    DocumentAction,
    DocumentEvent,
    DocumentState,
    DocumentView,
    EncounterEvent,
    EncounterStatus,
    EncounterView,
    LinkAssertion,
    MarkDocument,
    MergePatients,
    MoveVisit,
    RecordView,
    UpsertPatient,
    most_restricted,
)
from exchange.mapping.values import DELETE, Demographics, DocumentPatch, EncounterPatch

_DEMOGRAPHIC_FIELDS = (
    "name",
    "aliases",
    "mother_maiden_name",
    "birth",
    "sex",
    "addresses",
    "phones",
    "account",
    "ssn",
    "death",
    "deceased",
)
_ENCOUNTER_FIELDS = ("patient_class", "location", "prior_location", "attending", "consulting", "admitted_at",
                     "discharged_at")
_DOCUMENT_FIELDS = (
    "number_field",
    "type",
    "type_text",
    "parent",
    "completion_status",
    "availability",
    "confidentiality",
    "author",
    "authenticator",
    "activity_at",
    "originated_at",
    "content",
)


def _patched(old, new):
    if new is None:
        return old
    if new is DELETE:
        return None
    return new


class MemoryState:
    """Records, encounters, documents (all versions), links and history, in dicts."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.documents: dict[tuple[str, str], dict[str, Any]] = {}
        self.links: dict[tuple[str, str, str], bool] = {}
        self.history: list[tuple[Hashable, str, str, tuple]] = []
        # Opaque to this module: the store layer's row ids of seeded entries.
        self.store_ids: dict[str, dict] = {}
        self.mark_clean()

    # --- StateView -------------------------------------------------------------

    def record(self, facility: str, mrn: str) -> RecordView | None:
        rec = self.records.get((facility, mrn))
        if rec is None:
            return None
        return RecordView(
            facility=facility,
            mrn=mrn,
            active=rec["active"],
            merged_into=rec["merged_into"],
            encounters={
                visit: EncounterView(
                    visit_number=visit,
                    status=enc["status"],
                    patient_class=enc["patient_class"],
                    location=enc["location"],
                    prior_location=enc["prior_location"],
                    admitted_at=enc["admitted_at"],
                    discharged_at=enc["discharged_at"],
                )
                for visit, enc in rec["encounters"].items()
            },
            name=rec["name"],
            birth=rec["birth"],
            last_message=rec.get("last_message"),
        )

    def document(self, facility: str, number: str) -> DocumentView | None:
        doc = self.documents.get((facility, number))
        if doc is None:
            return None
        return DocumentView(
            facility=facility,
            number=number,
            mrn=doc["mrn"],
            state=doc["state"],
            version=doc["versions"][-1]["version"],
            parent=doc["versions"][-1]["parent"],
            content=doc["versions"][-1]["content"],
            event=doc["versions"][-1]["event"],
            stored=DocumentPatch(number, **{f: doc["versions"][-1].get(f) for f in _DOCUMENT_FIELDS}),
        )

    # --- apply -----------------------------------------------------------------

    def apply(self, changes: Changes, message_ref: Hashable) -> None:
        """Apply every operation of ``changes`` in order, recording ``message_ref``."""
        for op in changes.operations:
            handler = _HANDLERS[type(op)]
            key = handler(self, op, message_ref)
            self.history.append((message_ref, type(op).__name__, op.facility, key))

    def _record(self, facility: str, mrn: str) -> dict[str, Any]:
        rec = self.records.get((facility, mrn))
        if rec is not None:
            self._touch(rec)
        else:
            rec = {
                "active": True,
                "merged_into": None,
                "identifiers": {},
                "merged_identifiers": (),
                "previous_mrns": (),
                "encounters": {},
                **{f: None for f in _DEMOGRAPHIC_FIELDS},
            }
            self.records[(facility, mrn)] = rec
        return rec

    def _upsert(self, op: UpsertPatient, ref) -> tuple:
        rec = self._record(op.facility, op.mrn)
        d: Demographics = op.demographics
        ids = rec["identifiers"]
        if op.late:  # older news than the record: its demographics are too (a field the record
            rec["last_message"] = op.digest or None  # lacks may be one the sender deleted since)
            return (op.mrn,)
        for authority in d.removed_authorities:
            for key in [k for k, i in ids.items() if i.issued_by(authority)]:
                del ids[key]
        for ident in d.identifiers or ():
            ids[ident.key] = ident
        for f in _DEMOGRAPHIC_FIELDS:
            if f != "phones":
                rec[f] = _patched(rec[f], getattr(d, f))
        home, work = d.phones, d.business_phones
        if home is not None or work is not None:  # PID-13 and PID-14 each replace only their own
            stored = rec["phones"] or ()
            home = tuple(p for p in stored if not p.business) if home is None else () if home is DELETE else home
            work = tuple(p for p in stored if p.business) if work is None else () if work is DELETE else work
            rec["phones"] = home + work or None
        rec["last_message"] = op.digest or None
        return (op.mrn,)

    def _encounter(self, op: EncounterEvent, ref) -> tuple:
        rec = self._record(op.facility, op.mrn)
        enc = rec["encounters"].get(op.visit_number)
        if enc is None:
            enc = {"status": op.status or EncounterStatus.REGISTERED, **{f: None for f in _ENCOUNTER_FIELDS}}
            rec["encounters"][op.visit_number] = enc
        if op.status is not None:
            enc["status"] = op.status
        patch: EncounterPatch = op.patch
        for f in _ENCOUNTER_FIELDS:  # (an encounter stored before a field existed lacks it)
            enc[f] = _patched(enc.get(f), getattr(patch, f))
        return (op.mrn, op.visit_number, op.event)

    def _merge(self, op: MergePatients, ref) -> tuple:
        f = op.facility
        survivor = self._record(f, op.survivor_mrn)
        retired = self._record(f, op.retired_mrn)
        if not survivor["active"]:  # a merge into this record's own survivor, reversed: it lives again
            survivor["active"] = True
            survivor["merged_into"] = None
        for visit, enc in retired["encounters"].items():
            survivor["encounters"].setdefault(visit, enc)
        retired["encounters"] = {}
        survivor["merged_identifiers"] = survivor["merged_identifiers"] + (op.retired_mrn,) + tuple(
            i.value for i in retired["identifiers"].values() if i.value != op.retired_mrn
        )
        retired["active"] = False
        retired["merged_into"] = op.survivor_mrn
        for doc in self.documents.values():
            if doc["facility"] == f and doc["mrn"] == op.retired_mrn:
                self._touch_document(doc)
                doc["mrn"] = op.survivor_mrn
        for (fac, _), rec in self.records.items():
            if fac == f and rec["merged_into"] == op.retired_mrn:
                self._touch(rec)
                rec["merged_into"] = op.survivor_mrn
        return (op.survivor_mrn, op.retired_mrn, op.event)

    def _rename(self, op: ChangeIdentifier, ref) -> tuple:
        f = op.facility
        old = self.records.pop((f, op.old_mrn), None)
        if old is None:
            return (op.old_mrn, op.new_mrn, "unknown")
        self._touch(old)
        new = self.records.get((f, op.new_mrn))
        if new is not None:
            self._touch(new)
        if new is None:
            old["previous_mrns"] = old["previous_mrns"] + (op.old_mrn,)
            self.records[(f, op.new_mrn)] = old
        else:  # the mapping refuses this; kept total: fold the old record in
            for visit, enc in old["encounters"].items():
                new["encounters"].setdefault(visit, enc)
            new["previous_mrns"] = new["previous_mrns"] + (op.old_mrn,)
        for doc in self.documents.values():
            if doc["facility"] == f and doc["mrn"] == op.old_mrn:
                self._touch_document(doc)
                doc["mrn"] = op.new_mrn
        for (fac, _), rec in self.records.items():
            if fac == f and rec["merged_into"] == op.old_mrn:
                self._touch(rec)
                rec["merged_into"] = op.new_mrn
        return (op.old_mrn, op.new_mrn)

    def _move_visit(self, op: MoveVisit, ref) -> tuple:
        source = self.records.get((op.facility, op.from_mrn))
        if source is None or op.from_visit not in source["encounters"]:
            return (op.from_mrn, op.from_visit, "unknown")
        self._touch(source)
        enc = source["encounters"].pop(op.from_visit)
        target = self._record(op.facility, op.to_mrn)
        kept = target["encounters"].get(op.to_visit)
        if kept is not None:  # a visit merge: the surviving visit's own values first
            enc = {**enc, **{k: v for k, v in kept.items() if v is not None}}
        target["encounters"][op.to_visit] = enc
        return (op.from_mrn, op.from_visit, op.to_mrn, op.to_visit, op.event)

    def _link(self, op: LinkAssertion, ref) -> tuple:
        a, b = sorted((op.mrn_a, op.mrn_b))
        self.links[(op.facility, a, b)] = op.linked
        return (a, b, op.linked)

    def _document(self, op: DocumentEvent, ref) -> tuple:
        key = (op.facility, op.number)
        self._record(op.facility, op.mrn)
        doc = self.documents.get(key)
        patch: DocumentPatch = op.patch
        if doc is not None:
            self._touch_document(doc)
        if doc is None:
            doc = {"facility": op.facility, "mrn": op.mrn, "state": DocumentState.CURRENT, "versions": [],
                   "types": (), "inherited": None, "confidentiality": None, "inherited_confidentiality": None}
            self.documents[key] = doc
            doc["versions"].append(_version({}, patch, 1, op.event, ref, fill_only=False))
        elif op.action is DocumentAction.CREATE:
            current = doc["versions"][-1]
            doc["versions"][-1] = _version(current, patch, current["version"], current["event"],
                                           current["message"], fill_only=True)
        elif op.action is DocumentAction.UPDATE:
            current = doc["versions"][-1]
            doc["versions"][-1] = _version(current, patch, current["version"], current["event"],
                                           current["message"], fill_only=False)
        else:  # NEW_VERSION
            current = doc["versions"][-1]
            doc["versions"].append(_version(current, patch, current["version"] + 1, op.event, ref,
                                            fill_only=False))
        if op.state is not None:
            doc["state"] = op.state
        self._lineage(doc)
        return (op.number, op.event, doc["versions"][-1]["version"])

    def _lineage(self, doc: dict[str, Any]) -> None:
        """Keep what routing needs of a document's history: ``types``, every type it and its
        ancestors (TXA-13) ever had, so that no later notice, edit or addendum re-types a BH
        note out of a facility's ``exclude_documents``; ``inherited``, the type of the parent
        it was filed under, for a version that names none of its own."""
        current = doc["versions"][-1]
        parent = current.get("parent")
        parent_doc = self.documents.get((doc["facility"], parent)) if parent else None
        types = set(doc.get("types", ()))
        if parent_doc is not None and parent_doc is not doc:
            types.update(document_types(parent_doc))
            if not doc.get("inherited"):
                doc["inherited"] = document_type(parent_doc) or None
            doc["inherited_confidentiality"] = parent_doc.get("confidentiality") or None
        doc["types"] = tuple(sorted(types | set(document_types(doc))))
        # ``confidentiality``: the most restricted of its own TXA-18 as last stated and of what its
        # parent had when it was last read (its own ``confidentiality``, so a whole chain's)
        doc["confidentiality"] = most_restricted(current.get("confidentiality"),
                                                 doc.get("inherited_confidentiality")) or None

    def _mark(self, op: MarkDocument, ref) -> tuple:
        doc = self.documents.get((op.facility, op.number))
        if doc is None:
            return (op.number, op.event, "unknown")
        self._touch_document(doc)
        doc["state"] = op.state
        if op.availability is not None:
            doc["versions"][-1] = {**doc["versions"][-1], "availability": op.availability}
        return (op.number, op.event, op.state.value)

    # --- unit of work ------------------------------------------------------------

    def seed(
        self,
        records: dict[tuple[str, str], dict[str, Any]] | None = None,
        documents: dict[tuple[str, str], dict[str, Any]] | None = None,
        links: dict[tuple[str, str, str], bool] | None = None,
    ) -> None:
        """Add entries as they are stored (shapes as ``records``/``documents``/``links``), then mark clean.

        A record dict needs every key ``_record`` creates; a document dict
        ``facility``, ``mrn``, ``state`` and ``versions`` (dicts as ``_version`` makes).
        """
        self.records.update(records or {})
        self.documents.update(documents or {})
        self.links.update(links or {})
        self.mark_clean()

    def rebase_refs(self, refs: Mapping[Hashable, Hashable]) -> None:
        """Swap message references applied since the last ``mark_clean``.

        The writer maps and applies a batch before its messages have row
        ids; once they are stored it swaps each placeholder for the id.
        """
        for i in range(self._clean_history, len(self.history)):
            ref, kind, facility, key = self.history[i]
            if ref in refs:
                self.history[i] = (refs[ref], kind, facility, key)
        for doc in self.documents.values():
            for version in doc["versions"]:
                if version["message"] in refs:
                    version["message"] = refs[version["message"]]

    def merges(self) -> list[tuple[str, str, str]]:
        """(facility, survivor MRN, retired MRN) of every merge applied since the last ``mark_clean``."""
        return [(facility, key[0], key[1]) for _ref, kind, facility, key in self.history[self._clean_history:]
                if kind == "MergePatients"]

    def mark_clean(self) -> None:
        """The current contents become the baseline ``dirty`` compares with.

        Cheap: the baseline holds the entries themselves; an entry is copied
        (shallowly: value objects are immutable) only when ``apply`` first
        touches it, and ``dirty`` compares only touched entries.
        """
        self._base_records = dict(self.records)
        self._base_documents = dict(self.documents)
        self._base_links = dict(self.links)
        self._clean_history = len(self.history)
        self._touched_records: dict[int, tuple[dict, dict, dict]] = {}  # id(rec) -> (rec, fields, encounters)
        self._touched_documents: dict[int, tuple[dict, dict, list]] = {}  # id(doc) -> (doc, fields, versions)

    def _touch(self, rec: dict[str, Any]) -> None:
        """Keep a copy of ``rec`` as it was before this batch first changes it."""
        if id(rec) not in self._touched_records:
            fields = {k: v for k, v in rec.items() if k != "encounters"}
            fields["identifiers"] = dict(rec["identifiers"])
            self._touched_records[id(rec)] = (rec, fields, {v: dict(e) for v, e in rec["encounters"].items()})

    def _touch_document(self, doc: dict[str, Any]) -> None:
        if id(doc) not in self._touched_documents:
            fields = {k: v for k, v in doc.items() if k != "versions"}
            self._touched_documents[id(doc)] = (doc, fields, list(doc["versions"]))

    def dirty(self) -> Dirty:
        """What changed since the last ``seed``/``mark_clean``/construction."""
        by_identity = {id(rec): key for key, rec in self._base_records.items()}
        present: set[tuple[str, str]] = set()
        out = Dirty()
        for key, rec in self.records.items():
            old_key = by_identity.get(id(rec))
            if old_key is None:
                out.new_records.append(key)
                out.new_encounters.extend((key, visit) for visit in rec["encounters"])
                continue
            present.add(old_key)
            touched = self._touched_records.get(id(rec))
            if touched is None:
                if old_key != key:
                    out.changed_records.append((key, old_key))
                continue
            _, old_fields, old_encounters = touched
            if old_key != key or any(rec[k] != v for k, v in old_fields.items()):
                out.changed_records.append((key, old_key))
                if rec["identifiers"] != old_fields["identifiers"]:
                    out.changed_identifiers.append((key, old_fields["identifiers"]))
            encounters = rec["encounters"]
            for visit in old_encounters.keys() - encounters.keys():
                out.removed_encounters.append((key, visit))
            for visit, enc in encounters.items():
                old = old_encounters.get(visit)
                if old is None:
                    out.new_encounters.append((key, visit))
                elif old != enc:
                    out.changed_encounters.append((key, visit))
        out.removed_records = [k for k in self._base_records if k not in present]
        for key, doc in self.documents.items():
            versions = doc["versions"]
            if key not in self._base_documents:
                out.new_documents.append(key)
                out.new_versions.extend((key, i) for i in range(len(versions)))
                continue
            touched = self._touched_documents.get(id(doc))
            if touched is None:
                continue
            _, old_fields, old_versions = touched
            if any(doc[k] != v for k, v in old_fields.items()):
                out.changed_documents.append(key)
            for i, version in enumerate(versions):
                if i >= len(old_versions):
                    out.new_versions.append((key, i))
                elif version is not old_versions[i] and version != old_versions[i]:
                    out.changed_versions.append((key, i))
        out.links = [k for k, v in self.links.items() if self._base_links.get(k) is not v]
        out.history = self.history[self._clean_history:]
        return out

    # --- comparison ------------------------------------------------------------

    def snapshot(self, history: bool = False) -> dict[str, Any]:
        """Everything stored as plain dicts/tuples (value objects as tuples), for equality tests."""
        out = {
            "records": {k: _plain(v) for k, v in sorted(self.records.items())},
            "documents": {k: _plain(v) for k, v in sorted(self.documents.items())},
            "links": dict(sorted(self.links.items())),
        }
        if history:
            out["history"] = tuple(_plain(h) for h in self.history)
        return out


@dataclasses.dataclass
class Dirty:
    """What changed since the baseline, as keys into a :class:`MemoryState`.

    ``changed_records`` pairs (current key, key at baseline): they differ for
    a renamed record (A47). ``removed_records`` are baseline keys whose record
    is gone (folded into another by a rename). Encounters are (record key,
    visit number) under the record's current key; versions are (document
    key, index into ``versions``).
    """

    new_records: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    changed_records: list[tuple[tuple[str, str], tuple[str, str]]] = dataclasses.field(default_factory=list)
    # (current key, the identifiers at baseline) of changed records whose identifiers changed
    changed_identifiers: list[tuple[tuple[str, str], dict]] = dataclasses.field(default_factory=list)
    removed_records: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    new_encounters: list[tuple[tuple[str, str], str]] = dataclasses.field(default_factory=list)
    changed_encounters: list[tuple[tuple[str, str], str]] = dataclasses.field(default_factory=list)
    removed_encounters: list[tuple[tuple[str, str], str]] = dataclasses.field(default_factory=list)
    new_documents: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    changed_documents: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    new_versions: list[tuple[tuple[str, str], int]] = dataclasses.field(default_factory=list)
    changed_versions: list[tuple[tuple[str, str], int]] = dataclasses.field(default_factory=list)
    links: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    history: list[tuple[Hashable, str, str, tuple]] = dataclasses.field(default_factory=list)


def document_type(doc: dict[str, Any]) -> str:
    """The type a document is routed as, upper case: its current version's (TXA-2), else the
    one it inherited from its parent; "" when neither is known."""
    own = doc["versions"][-1].get("type") if doc["versions"] else None
    return (own or doc.get("inherited") or "").upper()


def document_types(doc: dict[str, Any]) -> tuple[str, ...]:
    """Every type a document and its ancestors had (see ``MemoryState._lineage``), upper case."""
    types = set(doc.get("types", ()))
    current = document_type(doc)
    if current:
        types.add(current)
    return tuple(sorted(types))


def _version(base: dict, patch: DocumentPatch, number: int, event: str, ref, fill_only: bool) -> dict:
    v = dict(base) if base else {f: None for f in _DOCUMENT_FIELDS}
    for f in _DOCUMENT_FIELDS:
        new = getattr(patch, f)
        if new is None or new == "":
            continue
        if fill_only and v.get(f) is not None:
            continue
        v[f] = new
    v["version"] = number
    v["event"] = event
    v["message"] = ref
    return v


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,) + tuple(_plain(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


_HANDLERS = {
    UpsertPatient: MemoryState._upsert,
    EncounterEvent: MemoryState._encounter,
    MergePatients: MemoryState._merge,
    ChangeIdentifier: MemoryState._rename,
    MoveVisit: MemoryState._move_visit,
    LinkAssertion: MemoryState._link,
    DocumentEvent: MemoryState._document,
    MarkDocument: MemoryState._mark,
}

__all__ = ["Dirty", "MemoryState"]
