"""The record model in the database: a unit of work over :class:`MemoryState`.

The writer handles a batch of messages in one transaction (the caller owns
it; nothing here commits):

1. ``needs(msg, ctx)`` of every message of the batch;
2. ``load(conn, needs_list)``: a :class:`MemoryState` seeded with exactly
   those records and documents, plus what the semantics touch beyond them:
   the ``merged_into`` survivor of a loaded record, the records merged into a
   loaded one, the record owning a loaded document; of their history only
   the encounters of the visits named and each document's current version,
   unless a merge or a rename in the batch moves all of it;
3. per message, ``map_message(..., state)`` then ``state.apply(changes, message_id)``:
   the reference semantics, so the database cannot disagree with the oracle;
4. ``save(conn, state)``: writes back only what ``state.dirty()`` reports,
   in a handful of driver-level statements per batch (one per table and
   kind, see "save" below), plus the history.

Message references given to ``apply`` must be ``message.id`` values (ints):
they become ``record_event.message_id`` and ``document_version.message_id``.

Each row keeps its exact value objects as JSON (``to_json``/``from_json``,
a tagged encoding that round-trips exactly); the plain columns are derived
from them for searching and for the API views (``record_view``,
``exchange.store.reviews.person_view``), which return plain dicts in CONTRACT.md's shapes.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import json
from collections.abc import Iterable
from datetime import date, datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import Connection, bindparam, select, text

from exchange.mapping.events import DocumentState, EncounterStatus, Needs
from exchange.mapping.state import MemoryState
from exchange.mapping.values import (
    Address,
    Content,
    Doctor,
    Identifier,
    Location,
    PersonName,
    Phone,
    Precision,
    Timestamp,
    primary_address,
)
from exchange.store.db import driver_cursor
from exchange.store.driver import Statement, Writer, in_ids, in_pairs, select_rows
from exchange.store.schema import (
    AUTHORITY_LEN,
    CONTENT_TYPE_LEN,
    DOCUMENT_CODE_LEN,
    DOCUMENT_NUMBER_LEN,
    ID_TYPE_LEN,
    LOCATION_LEN,
    MRN_LEN,
    NAME_LEN,
    PATIENT_CLASS_LEN,
    PHONE_LEN,
    POSTCODE_LEN,
    SEX_LEN,
    SSN_LEN,
    TS_LEN,
    document_table as document,
    document_version_table as document_version,
    encounter_table as encounter,
    link_assertion_table as link_assertion,
    patient_record_table as patient_record,
    person_table as person,
    record_event_table as record_event,
    record_identifier_table as record_identifier,
)

# --- JSON codec: value objects <-> portable JSON, exactly --------------------------------

_TYPES = {cls.__name__: cls for cls in (Identifier, PersonName, Address, Phone, Doctor, Location, Timestamp, Content)}
_ENUMS = {cls.__name__: cls for cls in (Precision, EncounterStatus, DocumentState)}
_ENUM_MEMBERS = {name: {m.value: m for m in cls} for name, cls in _ENUMS.items()}  # calling an Enum class
# to look a value up costs microseconds on Python 3.11; a record holds dozens of them


_PLAIN = frozenset({str, int, float, bool, type(None)})
_TYPE_TAGS = {cls: "@" + name for name, cls in _TYPES.items()}


def to_json(value: Any) -> Any:
    """A value object tree as JSON-able data: tuples become lists, the rest one-key ``{"@tag": ...}`` dicts."""
    t = type(value)  # fast paths by exact type; the general rules below decide everything else
    if t in _PLAIN:
        return value
    if t is tuple or t is list:
        return [to_json(v) for v in value]
    tag = _TYPE_TAGS.get(t)
    if tag is not None:
        return {tag: [to_json(getattr(value, f)) for f in value.__match_args__]}
    return _to_json(value)


def _to_json(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Enum):
        name = type(value).__name__
        if name not in _ENUMS:
            raise TypeError(f"cannot store enum {name}")
        return {"@" + name: value.value}
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, datetime):
        return {"@datetime": value.isoformat()}
    if isinstance(value, date):
        return {"@date": value.isoformat()}
    if isinstance(value, (bytes, bytearray)):
        return {"@bytes": base64.b64encode(value).decode("ascii")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if name not in _TYPES:
            raise TypeError(f"cannot store {name}")
        return {"@" + name: [to_json(getattr(value, f)) for f in value.__match_args__]}
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k.startswith("@"):
                raise TypeError(f"cannot store dict key {k!r}")
            out[k] = to_json(v)
        return out
    raise TypeError(f"cannot store {type(value).__name__}")


def _tagged(tag: str, v: Any) -> Any:
    """The value of a one-key ``{"@tag": v}`` dict (a value object's parts already decoded)."""
    cls = _TYPES.get(tag)
    if cls is not None:  # the stored types' fields are scalars or tagged objects
        return cls(*v)
    if tag == "datetime":
        return datetime.fromisoformat(v)
    if tag == "date":
        return date.fromisoformat(v)
    if tag == "bytes":
        return base64.b64decode(v)
    member = _ENUM_MEMBERS[tag].get(v)
    return member if member is not None else _ENUMS[tag](v)  # (an unknown value raises ValueError there)


def from_json(data: Any) -> Any:
    """The inverse of :func:`to_json` (lists come back as tuples)."""
    t = type(data)
    if t in _PLAIN:
        return data
    if isinstance(data, list):
        return tuple(from_json(v) for v in data)
    if isinstance(data, dict):
        if len(data) == 1:
            ((tag, v),) = data.items()
            if tag.startswith("@"):
                return _tagged(tag[1:], [from_json(x) for x in v] if tag[1:] in _TYPES else v)
        return {k: from_json(v) for k, v in data.items()}
    return data


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if type(value) is list else value


def _decode_object(data: dict) -> Any:
    """``json.loads`` object hook: :func:`from_json` done bottom-up by the C parser."""
    if len(data) == 1:
        ((tag, v),) = data.items()
        if tag[:1] == "@":
            return _tagged(tag[1:], v)
    for k, v in data.items():
        if type(v) is list:
            data[k] = _tuples(v)
    return data


def loads(text: str | bytes) -> Any:
    """``from_json(json.loads(text))``, several times faster (the record load path)."""
    return _tuples(json.loads(text, object_hook=_decode_object))


# --- rows <-> MemoryState entries -----------------------------------------------------------


def _cut(value: Any, limit: int) -> str | None:
    """Text made storable in a plain column: no NUL, at most ``limit`` characters."""
    if value is None:
        return None
    text = str(value).replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return text[:limit]


# Parents followed up a document's chain (a longer one, or a loop, is cut): a note replaced
# every day for years is thousands deep, and a change of its root (re-typed BH, made R) must
# reach its newest version. One index look-up a level, only as deep as the chain goes.
MAX_DOCUMENT_DEPTH = 10_000

_LINEAGE_SQL = text(
    "WITH RECURSIVE chain (number, parent, types, confidentiality, depth) AS ("
    " SELECT number, parent, types, confidentiality, 0 FROM document"
    " WHERE facility = :facility AND number IN :numbers"
    " UNION ALL SELECT d.number, d.parent, d.types, d.confidentiality, c.depth + 1 FROM document d JOIN chain c"
    " ON d.facility = :facility AND d.number = c.parent WHERE c.depth < :depth)"
    " SELECT types, confidentiality FROM chain"
).bindparams(bindparam("numbers", expanding=True))


@dataclasses.dataclass(frozen=True, slots=True)
class Lineage:
    """What routing reads of a document's stored chain of ancestors (TXA-13)."""

    types: frozenset[str] = frozenset()  # every type (upper case) each of them has had
    # each one's TXA-18 status: the most restricted of its own as last given and its parent's
    confidentiality: frozenset[str] = frozenset()


def document_lineage(conn: Connection, facility: str, numbers: Iterable[str]) -> Lineage:
    """The facility's documents ``numbers`` and all their ancestors as stored now, read up the
    parent chain: a parent re-typed BH, or made very restricted, after its addendum was filed
    makes the addendum so too, for routing and for a queued copy's send-time check."""
    wanted = sorted({n for n in numbers if n})
    if not wanted:
        return Lineage()
    types: set[str] = set()
    confidentiality: set[str] = set()
    for row in conn.execute(_LINEAGE_SQL, {"facility": facility, "numbers": wanted, "depth": MAX_DOCUMENT_DEPTH}):
        if row.types:
            types.update(t for t in json.loads(row.types) if isinstance(t, str))
        if row.confidentiality:
            confidentiality.add(row.confidentiality)
    return Lineage(frozenset(types), frozenset(confidentiality))


def _record_row(facility: str, mrn: str, rec: dict) -> dict[str, Any]:
    data = {k: v for k, v in rec.items() if k != "encounters"}
    data["identifiers"] = tuple(rec["identifiers"].values())
    authority = ""
    for ident in rec["identifiers"].values():
        if ident.value == mrn:
            authority = ident.authority or ident.authority_id
            break
    name: PersonName | None = rec["name"]
    birth: Timestamp | None = rec["birth"]
    birth_date = None
    if birth is not None and birth.precision not in (Precision.YEAR, Precision.MONTH):
        birth_date = birth.value.date() if isinstance(birth.value, datetime) else birth.value
    primary = primary_address(rec["addresses"])
    phones = rec["phones"] or ()
    return {
        "facility": facility,
        "mrn": mrn,
        "authority": _cut(authority, AUTHORITY_LEN),
        "active": rec["active"],
        "merged_into_mrn": rec["merged_into"],
        "data": to_json(data),
        "family_name": _cut(name.family, NAME_LEN) if name else None,
        "given_name": _cut(name.given, NAME_LEN) if name else None,
        "birth_date": birth_date,
        "sex": _cut(rec["sex"], SEX_LEN),
        "postcode": _cut(primary.postal_code, POSTCODE_LEN) if primary else None,
        "phone": _cut(phones[0].number, PHONE_LEN) if phones else None,
        "ssn": _cut(rec["ssn"], SSN_LEN),
    }


def _record_from_row(rec: dict[str, Any]) -> dict[str, Any]:
    """A decoded ``patient_record.data`` as a MemoryState record (changed in place)."""
    rec["identifiers"] = {i.key: i for i in rec["identifiers"]}
    rec["encounters"] = {}
    return rec


_IDENTIFIER_COLUMNS = ("record_id", "authority", "value", "type")


def _identifier_rows(record_id: int, identifiers: dict) -> list[dict[str, Any]]:
    """The record_identifier rows of a record's ``identifiers``."""
    return [{"record_id": record_id, "authority": _cut(key[0], AUTHORITY_LEN), "value": _cut(i.value, MRN_LEN),
             "type": _cut(i.type_code, ID_TYPE_LEN)} for key, i in identifiers.items()]


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["authority"], row["value"], row["type"])


def _ts_text(ts: Timestamp | None) -> str | None:
    return None if ts is None else _cut(ts.isoformat(), TS_LEN)


def _encounter_row(visit: str, enc: dict) -> dict[str, Any]:
    loc: Location | None = enc["location"]
    prior: Location | None = enc["prior_location"]
    return {
        "visit_number": visit,
        "patient_class": _cut(enc["patient_class"], PATIENT_CLASS_LEN),
        "status": enc["status"].value,
        "location": _cut(loc.text, LOCATION_LEN) if loc else None,
        "prior_location": _cut(prior.text, LOCATION_LEN) if prior else None,
        "attending": to_json(enc["attending"]),
        "admitted_at": _ts_text(enc["admitted_at"]),
        "discharged_at": _ts_text(enc["discharged_at"]),
        "data": to_json(enc),
    }


def _document_row(doc: dict, record_id: int) -> dict[str, Any]:
    current = doc["versions"][-1]
    return {
        "record_id": record_id,
        "type": _cut(current["type"], DOCUMENT_CODE_LEN),
        "parent": _cut(current["parent"], DOCUMENT_NUMBER_LEN),
        "completion_status": _cut(current["completion_status"], DOCUMENT_CODE_LEN),
        "availability": _cut(current["availability"], DOCUMENT_CODE_LEN),
        "confidentiality": _cut(doc.get("confidentiality"), DOCUMENT_CODE_LEN),
        "inherited_confidentiality": _cut(doc.get("inherited_confidentiality"), DOCUMENT_CODE_LEN),
        "state": doc["state"].value,
        "version": current["version"],
        "types": json.dumps([_cut(t, DOCUMENT_CODE_LEN) for t in doc.get("types", ())]),
        "inherited_type": _cut(doc.get("inherited"), DOCUMENT_CODE_LEN),
    }


def _version_row(version: dict) -> dict[str, Any]:
    ref = version["message"]
    if ref is not None and not isinstance(ref, int):
        raise TypeError("message references applied to a stored state must be message ids (int)")
    fields = {k: v for k, v in version.items() if k not in ("content", "version", "event", "message")}
    content: Content | None = version["content"]
    row = {"version": version["version"], "event": version["event"], "message_id": ref,
           "content_type": None, "text": None, "data": None, "size": 0}
    stored = to_json(fields)
    if content is None:
        stored["content"] = None
    else:
        meta: dict[str, Any] = {"content_type": content.content_type, "reference": content.reference}
        if content.text is not None and "\x00" in content.text:
            meta["text"] = content.text  # PostgreSQL text refuses NUL; JSON escapes it
        else:
            row["text"] = content.text
        row.update(content_type=_cut(content.content_type, CONTENT_TYPE_LEN), data=content.data,
                   size=content.size)
        stored["content"] = meta
    row["fields"] = stored
    return row


def _version_from_row(row: Any) -> dict[str, Any]:
    stored = dict(row.fields)
    meta = stored.pop("content")
    version = from_json(stored)
    if meta is None:
        version["content"] = None
    else:
        text = meta.get("text", row.text)
        version["content"] = Content(text=text, data=row.data, content_type=meta["content_type"],
                                     reference=meta["reference"])
    version["version"] = row.version
    version["event"] = row.event
    version["message"] = row.message_id
    return version


# --- load ---------------------------------------------------------------------------------------


def load(conn: Connection, needs_list: Iterable[Needs]) -> MemoryState:
    """A MemoryState seeded with what the batch needs (and what its semantics touch).

    A record comes without its history -- only the encounters of the visits
    the batch names, none of its documents, and of a document only its
    current version -- unless a message of the batch asks for it ``whole``
    (a merge or an identifier change moves everything). So an update for a
    patient with years of visits and notes costs what it costs for a new one.
    """
    want_records: set[tuple[str, str]] = set()
    want_documents: set[tuple[str, str]] = set()
    visits: set[str] = set()
    whole = False
    for n in needs_list:
        want_records |= n.records
        want_documents |= n.documents
        visits |= n.visits
        whole = whole or n.whole
    # A key with a NUL (an escaped \X00\) names nothing stored (the mapping refuses it, AE 102),
    # and PostgreSQL refuses the NUL in a parameter: the whole batch failed on it.
    want_records, want_documents = _without_nul(want_records), _without_nul(want_documents)
    visits = {v for v in visits if "\x00" not in v}
    return _load(conn, want_records, want_documents, None if whole else visits, whole=whole, all_versions=False,
                 lock=True)


def _without_nul(keys: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {k for k in keys if "\x00" not in k[0] and "\x00" not in k[1]}


def load_all(conn: Connection) -> MemoryState:
    """Everything stored, links and history included (replay checks and tests; not the hot path)."""
    keys = {(r.facility, r.mrn) for r in conn.execute(select(patient_record.c.facility, patient_record.c.mrn))}
    state = _load(conn, keys, set())
    links = {
        (r.facility, r.mrn_a, r.mrn_b): r.linked
        for r in conn.execute(select(link_assertion).order_by(link_assertion.c.id))
    }
    state.history.extend(
        (r.message_id, r.kind, r.facility, tuple(r.key))
        for r in conn.execute(select(record_event).order_by(record_event.c.id))
    )
    state.seed(links=links)
    return state


_RECORD_COLUMNS = ("id", "person_id", "facility", "mrn", "merged_into_mrn", "link", "features", "data")
# PostgreSQL: JSON as text, decoded by ``loads`` (psycopg's own json.loads + from_json is slower)
_PG_RECORD_SELECT = ", ".join(_RECORD_COLUMNS[:-1]) + ", data::text"
_DOCUMENT_COLUMNS = ("id", "facility", "number", "state", "types", "inherited_type", "confidentiality",
                     "inherited_confidentiality", "parent", "mrn")


def _json(value: Any) -> Any:
    """A JSON column's value decoded: SQLite hands over text, psycopg parsed data."""
    return loads(value) if isinstance(value, (str, bytes)) else from_json(value)


def _load(conn: Connection, want_records: set, want_documents: set, visits: set[str] | None = None, *,
          whole: bool = True, all_versions: bool = True, lock: bool = False) -> MemoryState:
    """Records and documents in rounds of one records SELECT and one documents SELECT.

    A round selects the wanted records and the records merged into them, and
    the wanted documents (and, ``whole``, the documents of the records found);
    the next round (rarely needed) follows ``merged_into`` targets, owners of
    found documents and records merged into retired ones found. Loading a
    record more than strictly needed is harmless: it is stored truth.

    Of the records found, the encounters of ``visits`` (None: all of them);
    of the documents, every version or (not ``all_versions``) the current one:
    the state's semantics read only the last version of a list. ``lock``: on
    PostgreSQL the records are read FOR UPDATE (a batch that will save them).
    """
    sqlite = conn.dialect.name == "sqlite"
    rows: dict[tuple[str, str], Any] = {}  # record key -> row
    docs: dict[tuple[str, str], Any] = {}  # document key -> row (+ owner mrn)
    queried_records: set[tuple[str, str]] = set()
    queried_documents: set[tuple[str, str]] = set()
    pending_records = set(want_records)
    pending_documents = set(want_documents)
    while pending_records or pending_documents:
        keys = sorted(pending_records - queried_records)
        queried_records.update(keys)
        pending_records = set()
        new_ids = []
        if keys:
            params: list = []
            by_key = in_pairs(sqlite, "facility, mrn", keys, params)
            by_survivor = in_pairs(sqlite, "facility, merged_into_mrn", keys, params)
            columns = ", ".join(_RECORD_COLUMNS) if sqlite else _PG_RECORD_SELECT
            if sqlite:  # a MULTI-INDEX OR: one index search per pair
                sql = f"SELECT {columns} FROM patient_record WHERE {by_key} OR {by_survivor}"
            elif lock:
                # OR over two IN-subqueries is a seq scan on PostgreSQL: two index look-ups instead.
                # Locked, in id order, until the batch commits: another node's batch changing one of
                # them (an A40 moving it to the survivor's person) waits, or is waited for and then
                # read as it left it -- never written over with what was read before it committed.
                sql = (f"SELECT {columns} FROM patient_record WHERE id = ANY(ARRAY("
                       f"SELECT id FROM patient_record WHERE {by_key}"
                       f" UNION ALL SELECT id FROM patient_record WHERE {by_survivor})) ORDER BY id FOR UPDATE")
            else:
                sql = (f"SELECT {columns} FROM patient_record WHERE {by_key}"
                       f" UNION ALL SELECT {columns} FROM patient_record WHERE {by_survivor}")
            found = select_rows(conn, _RECORD_COLUMNS, sql, params)
            for row in found:
                key = (row.facility, row.mrn)
                if key in rows:
                    continue
                rows[key] = row
                new_ids.append(row.id)
                if key not in queried_records:  # merged into a wanted one: records merged into it too
                    pending_records.add(key)
                if row.merged_into_mrn is not None:
                    pending_records.add((row.facility, row.merged_into_mrn))
        doc_keys = sorted(pending_documents - queried_documents)
        queried_documents.update(doc_keys)
        pending_documents = set()
        if doc_keys or (new_ids and whole):
            params = []
            conditions = []
            if doc_keys:
                conditions.append(in_pairs(sqlite, "d.facility, d.number", doc_keys, params))
            if new_ids and whole:
                conditions.append(in_ids(sqlite, "d.record_id", new_ids, params))
            select_ = ("SELECT d.id, d.facility, d.number, d.state, d.types, d.inherited_type, d.confidentiality,"
                       " d.inherited_confidentiality, d.parent, p.mrn"
                       " FROM document d JOIN patient_record p ON d.record_id = p.id WHERE ")
            # PostgreSQL: UNION ALL, not OR (a seq scan there); duplicates are skipped below
            sql = select_ + (" OR " if sqlite else " UNION ALL " + select_).join(conditions)
            for row in select_rows(conn, _DOCUMENT_COLUMNS, sql, params):
                key = (row.facility, row.number)
                if key not in docs:
                    docs[key] = row
                    queried_documents.add(key)
                    owner = (row.facility, row.mrn)
                    if owner not in rows:
                        pending_records.add(owner)
                    if row.parent and key in want_documents:  # its parent's status now (one level)
                        pending_documents.add((row.facility, row.parent))
        pending_records -= queried_records

    records = {key: _record_from_row(_json(row.data)) for key, row in rows.items()}
    by_id = {row.id: key for key, row in rows.items()}
    if by_id and (visits is None or visits):
        params = []
        where = in_ids(sqlite, "record_id", list(by_id), params)
        if visits is not None:
            ordered = sorted(visits)
            if sqlite:
                where += f" AND visit_number IN ({', '.join(['?'] * len(ordered))})"
                params.extend(ordered)
            else:
                where += " AND visit_number = ANY(%b::text[])"
                params.append(ordered)
        for record_id, visit, data in select_rows(
            conn, None, f"SELECT record_id, visit_number, data{'' if sqlite else '::text'} FROM encounter WHERE {where} ORDER BY id", params
        ):
            records[by_id[record_id]]["encounters"][visit] = _json(data)
    documents = {
        key: {"facility": row.facility, "mrn": row.mrn, "state": DocumentState(row.state), "versions": [],
              "types": tuple(json.loads(row.types)) if row.types else (), "inherited": row.inherited_type,
              "confidentiality": row.confidentiality, "inherited_confidentiality": row.inherited_confidentiality}
        for key, row in docs.items()
    }
    doc_by_id = {row.id: key for key, row in docs.items()}
    if doc_by_id:
        versions = select(document_version).where(document_version.c.document_id.in_(list(doc_by_id)))
        if not all_versions:
            versions = versions.join(document, (document.c.id == document_version.c.document_id)
                                     & (document.c.version == document_version.c.version))
        for row in conn.execute(versions.order_by(document_version.c.document_id, document_version.c.version)):
            documents[doc_by_id[row.document_id]]["versions"].append(_version_from_row(row))

    state = MemoryState()
    state.seed(records=records, documents=documents)
    state.store_ids = {
        "records": {key: (row.id, row.person_id) for key, row in rows.items()},
        # the patient index's view of each loaded record: how it is linked, its stored features
        # (none for a record merged away: it has no blocking keys, and if a reversed merge
        # brings it back it must be matched and keyed again)
        "match": {key: (row.link, row.features if records[key]["active"] else None) for key, row in rows.items()},
        "documents": {key: row.id for key, row in docs.items()},
    }
    return state


# --- save ---------------------------------------------------------------------------------------
#
_RECORD_ROW_COLUMNS = ("facility", "mrn", "authority", "active", "merged_into_mrn", "data", "family_name",
                       "given_name", "birth_date", "sex", "postcode", "phone", "ssn")
_ENCOUNTER_COLUMNS = ("patient_class", "status", "location", "prior_location", "attending", "admitted_at",
                      "discharged_at", "data")
_DOCUMENT_ROW_COLUMNS = ("record_id", "type", "parent", "completion_status", "availability", "confidentiality",
                         "inherited_confidentiality", "state", "version", "types", "inherited_type")
_VERSION_COLUMNS = ("event", "message_id", "content_type", "text", "data", "size", "fields")


def _statements(sqlite: bool) -> dict[str, Statement]:
    s = functools.partial(Statement, sqlite)
    return {
        "free_record": s(patient_record, "update", ("mrn",), ("id",)),
        "insert_person": s(person, "insert", ("created_at",), returning=True),
        "insert_record": s(patient_record, "insert",
                           _RECORD_ROW_COLUMNS + ("person_id", "created_at", "updated_at", "link", "link_score",
                                                  "features"), returning=True),
        "set_link": s(patient_record, "update", ("person_id", "link", "link_score", "features"), ("id",)),
        "update_record": s(patient_record, "update", _RECORD_ROW_COLUMNS + ("updated_at",), ("id",)),
        "insert_identifier": s(record_identifier, "insert", _IDENTIFIER_COLUMNS),
        "delete_identifier": s(record_identifier, "delete", (), _IDENTIFIER_COLUMNS),
        "delete_encounter": s(encounter, "delete", (), ("record_id", "visit_number")),
        "update_encounter": s(encounter, "update", _ENCOUNTER_COLUMNS, ("record_id", "visit_number")),
        "insert_encounter": s(encounter, "insert", ("record_id", "visit_number") + _ENCOUNTER_COLUMNS),
        "insert_document": s(document, "insert", ("facility", "number") + _DOCUMENT_ROW_COLUMNS, returning=True),
        "update_document": s(document, "update", _DOCUMENT_ROW_COLUMNS, ("id",)),
        "update_version": s(document_version, "update", _VERSION_COLUMNS, ("document_id", "version")),
        "insert_version": s(document_version, "insert", ("document_id", "version") + _VERSION_COLUMNS),
        "delete_link": s(link_assertion, "delete", (), ("facility", "mrn_a", "mrn_b")),
        "insert_link": s(link_assertion, "insert", ("facility", "mrn_a", "mrn_b", "linked", "message_id")),
        "insert_event": s(record_event, "insert", ("message_id", "at", "kind", "facility", "key")),
    }


_SQLITE_STATEMENTS = _statements(True)
_PG_STATEMENTS = _statements(False)


@dataclasses.dataclass(frozen=True, slots=True)
class RecordLink:
    """The patient index's decision for one record, written with it by :func:`save`.

    ``person``: a person id, or a placeholder string standing for a person
    created by this save (records given the same placeholder share it).
    """

    person: int | str
    link: str = "auto"  # auto / manual / source
    score: float | None = None
    features: str | None = None  # exchange.matching.features.encode_features


_UNDECIDED = RecordLink(person=0)  # a new record the patient index did not decide: defaults


def save(conn: Connection, state: MemoryState, now: datetime | None = None,
         links: dict[tuple[str, str], RecordLink] | None = None) -> None:
    """Write what changed in ``state`` since it was loaded (or last saved), and its new history.

    ``now`` (timezone-aware; default the clock) stamps created_at/updated_at
    and the history entries. ``links`` (record key -> RecordLink): the
    person, link kind, score and features of records the patient index
    decided; a new record without one gets a person of its own. Afterwards
    ``state`` is clean again and ``state.store_ids["records"]`` holds each
    record's (id, person id).
    """
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("naive datetime: the store only takes timezone-aware datetimes")
    d = state.dirty()
    sqlite = conn.dialect.name == "sqlite"
    with driver_cursor(conn, "save (exchange.store.records)") as cursor:
        if sqlite:
            _save(Writer(cursor, True, _SQLITE_STATEMENTS), state, d, now, links or {})
        else:
            with cursor.connection.pipeline():
                _save(Writer(cursor, False, _PG_STATEMENTS), state, d, now, links or {})
    state.mark_clean()


def _save(w: Writer, state: MemoryState, d: Any, now: datetime, links: dict) -> None:
    rec_ids: dict = state.store_ids.setdefault("records", {})
    doc_ids: dict = state.store_ids.setdefault("documents", {})
    moved = [(key, old) for key, old in d.changed_records if key != old]

    # 1. Free the keys of moved (A47) and removed records, so no unique key clashes below.
    freeing = [rec_ids[old] for _, old in moved] + [rec_ids[old] for old in d.removed_records]
    w.many("free_record", [{"id": rid, "mrn": f"~moving~{rid}"} for rid, _ in freeing])

    # 2. New persons (one per placeholder the patient index used, one per new record it did
    #    not decide), then the new records with theirs.
    current: dict[tuple[str, str], tuple[int, int]] = {}
    for key, old in d.changed_records:
        current[key] = rec_ids[old]
    for key in state.records:
        if key not in current and key in rec_ids and key not in d.new_records:
            current[key] = rec_ids[key]
    placeholders = sorted({link.person for link in links.values() if isinstance(link.person, str)})
    undecided = [key for key in d.new_records if key not in links]
    person_ids = w.insert_ids("insert_person", [{"created_at": now}] * (len(placeholders) + len(undecided)))
    resolved = dict(zip(placeholders, person_ids))
    person_of = dict(zip(undecided, person_ids[len(placeholders):]))
    for key, link in links.items():
        person_of[key] = resolved[link.person] if isinstance(link.person, str) else link.person
    if d.new_records:
        params = []
        for key in d.new_records:
            row = _record_row(*key, state.records[key])
            link = links.get(key) or _UNDECIDED
            row.update(person_id=person_of[key], created_at=now, updated_at=now, link=link.link,
                       link_score=link.score, features=link.features)
            params.append(row)
        new_ids = w.insert_ids("insert_record", params)
        for key, rid in zip(d.new_records, new_ids):
            current[key] = (rid, person_of[key])
    new_keys = set(d.new_records)
    relinked = [key for key in links if key not in new_keys]
    for key in relinked:
        current[key] = (current[key][0], person_of[key])
    w.many("set_link", [
        {"id": current[key][0], "person_id": person_of[key], "link": links[key].link, "link_score": links[key].score,
         "features": links[key].features}
        for key in relinked
    ])

    # 3. Changed records (moved ones get their new MRN here).
    if d.changed_records:
        params = []
        for key, _ in d.changed_records:
            row = _record_row(*key, state.records[key])
            row.update(id=current[key][0], updated_at=now)
            params.append(row)
        w.many("update_record", params)

    # 4. Identifiers: every row of a new record; of a changed record, the rows that differ
    #    (an A08 usually changes one account number of four: three rows left alone, and
    #    no dead rows left behind for PostgreSQL's indexes to step over).
    gone: list[dict] = []
    added = [row for key in d.new_records
             for row in _identifier_rows(current[key][0], state.records[key]["identifiers"])]
    replaced: list[int] = []
    for key, before in d.changed_identifiers:
        rid = current[key][0]
        old = _identifier_rows(rid, before)
        new = _identifier_rows(rid, state.records[key]["identifiers"])
        old_set, new_set = set(map(_row_key, old)), set(map(_row_key, new))
        if len(old_set) < len(old) or len(new_set) < len(new):  # two cut to the same row: replace them all
            replaced.append(rid)
            added.extend(new)
            continue
        gone.extend(row for row in old if _row_key(row) not in new_set)
        added.extend(row for row in new if _row_key(row) not in old_set)
    w.delete_ids(record_identifier, "record_id", replaced)
    w.many("delete_identifier", gone)
    w.many("insert_identifier", added)

    # 5. Encounters: removed (moved away by a merge, or of removed records), changed, new.
    removed_ids = [rec_ids[old][0] for old in d.removed_records]
    w.delete_ids(encounter, "record_id", removed_ids)
    w.many("delete_encounter", [{"record_id": current[key][0], "visit_number": visit}
                                for key, visit in d.removed_encounters])
    w.many("update_encounter", [
        {"record_id": current[key][0], **_encounter_row(visit, state.records[key]["encounters"][visit])}
        for key, visit in d.changed_encounters
    ])
    w.many("insert_encounter", [
        {"record_id": current[key][0], **_encounter_row(visit, state.records[key]["encounters"][visit])}
        for key, visit in d.new_encounters
    ])

    # 6. Documents: new ones, then the ones whose row (owner, state, current version) changed.
    def owner_id(doc: dict) -> int:
        return current[(doc["facility"], doc["mrn"])][0]

    if d.new_documents:
        new_doc_ids = w.insert_ids("insert_document", [
            {"facility": key[0], "number": key[1], **_document_row(state.documents[key], owner_id(state.documents[key]))}
            for key in d.new_documents
        ])
        doc_ids.update(zip(d.new_documents, new_doc_ids))
    new_docs = set(d.new_documents)
    changed_docs = (set(d.changed_documents) | {k for k, _ in d.new_versions} | {k for k, _ in d.changed_versions})
    changed_docs -= new_docs
    w.many("update_document", [
        {"id": doc_ids[key], **_document_row(state.documents[key], owner_id(state.documents[key]))}
        for key in sorted(changed_docs)
    ])

    # 7. Versions: the current one patched in place, appended ones.
    w.many("update_version", [
        {"document_id": doc_ids[key], **_version_row(state.documents[key]["versions"][i])}
        for key, i in d.changed_versions
    ])
    w.many("insert_version", [
        {"document_id": doc_ids[key], **_version_row(state.documents[key]["versions"][i])}
        for key, i in d.new_versions
    ])

    # 8. Records folded into another by a rename: nothing refers to them any more.
    w.delete_ids(record_identifier, "record_id", removed_ids)
    w.delete_ids(patient_record, "id", removed_ids)

    # 9. Links: the latest assertion per pair, with the message that made it.
    if d.links:
        link_message: dict[tuple, Any] = {}
        for ref, kind, facility, key in state.history:
            if kind == "LinkAssertion":
                link_message[(facility, key[0], key[1])] = ref
        w.many("delete_link", [{"facility": f, "mrn_a": a, "mrn_b": b} for f, a, b in sorted(d.links)])
        w.many("insert_link", [
            {"facility": f, "mrn_a": a, "mrn_b": b, "linked": state.links[(f, a, b)],
             "message_id": link_message.get((f, a, b))}
            for f, a, b in d.links
        ])

    # 10. History.
    w.many("insert_event", [
        {"message_id": ref, "at": now, "kind": kind, "facility": facility, "key": list(key)}
        for ref, kind, facility, key in d.history
    ])

    state.store_ids["records"] = {key: current[key] for key in state.records}


# --- API views ------------------------------------------------------------------------------------


def _name(name: PersonName | None) -> dict[str, str] | None:
    if name is None:
        return None
    return {"family": name.family, "given": name.given, "middle": name.middle, "suffix": name.suffix,
            "prefix": name.prefix, "use": name.use}


def _address(a: Address) -> dict[str, str]:
    return {"street": a.street, "other": a.other, "city": a.city, "state": a.state,
            "postal_code": a.postal_code, "country": a.country, "use": a.use, "county": a.county}


def _doctor(d: Doctor | None) -> dict[str, str] | None:
    if d is None:
        return None
    return {"id": d.id, "family": d.name.family, "given": d.name.given, "authority": d.authority}


def _pl_text(stored: str | None) -> str | None:
    """A location as PV1-3 writes it: point of care^room^bed^facility without the empty
    components at its end ("ICU^1^A", not the stored "ICU^1^A^")."""
    return stored.rstrip("^") or None if stored is not None else None


def record_view(conn: Connection, facility: str, mrn: str) -> dict[str, Any] | None:
    """``GET /api/records/{facility}/{mrn}`` as a plain dict; None when unknown."""
    row = conn.execute(
        select(patient_record).where(patient_record.c.facility == facility, patient_record.c.mrn == mrn)
    ).first()
    if row is None:
        return None
    rec = _record_from_row(from_json(row.data))
    birth: Timestamp | None = rec["birth"]
    death: Timestamp | None = rec["death"]
    encounters = []
    for e in conn.execute(select(encounter).where(encounter.c.record_id == row.id).order_by(encounter.c.id)):
        stored = _json(e.data) if e.data is not None else {}
        encounters.append({
            "visit_number": e.visit_number, "class": e.patient_class, "status": e.status,
            "location": _pl_text(e.location), "prior_location": _pl_text(e.prior_location),
            "admitted_at": e.admitted_at, "discharged_at": e.discharged_at,
            "attending": _doctor(stored.get("attending")),
            "consulting": [_doctor(d) for d in stored.get("consulting") or ()],
        })
    documents = [
        {"number": r.number, "type": r.type, "parent": r.parent, "completion_status": r.completion_status,
         "availability": r.availability, "state": r.state, "version": r.version,
         "content_type": r.content_type, "text": r.text, "size": r.size,
         "reference": ((r.fields or {}).get("content") or {}).get("reference") or None}
        for r in conn.execute(
            select(document, document_version.c.content_type, document_version.c.text, document_version.c.size,
                   document_version.c.fields)
            .join(document_version, (document_version.c.document_id == document.c.id)
                  & (document_version.c.version == document.c.version))
            .where(document.c.record_id == row.id).order_by(document.c.id)
        )
    ]
    primary = primary_address(rec["addresses"])
    return {
        "facility": row.facility,
        "authority": row.authority,
        "mrn": row.mrn,
        "person": row.person_id,
        "active": row.active,
        "merged_into": row.merged_into_mrn,
        "name": _name(rec["name"]),
        "aliases": [_name(a) for a in rec["aliases"] or ()],
        # an ISO date as precise as sent; PID-7 may carry the time of birth: that is birth_time
        "birth_date": birth.date_isoformat() if birth else None,
        "birth_time": birth.isoformat() if birth and birth.has_time else None,
        "sex": rec["sex"],
        "address": _address(primary) if primary else None,
        "addresses": [_address(a) for a in rec["addresses"] or ()],
        "phones": [{"number": p.number, "use": p.use, "equipment": p.equipment, "email": p.email, "business": p.business}
                   for p in rec["phones"] or ()],
        "death": death.isoformat() if death else None,
        "deceased": rec["deceased"],
        "identifiers": [{"value": _shown(i), "authority": i.authority or i.authority_id, "type": i.type_code}
                        for i in rec["identifiers"].values()],
        "encounters": encounters,
        "documents": documents,
    }


_SSN_TYPES = frozenset({"SS", "SSN"})  # table 0203 SS; "SSN" is seen in feeds
_SSN_AUTHORITIES = frozenset({"SSA", "USSSA"})


def _shown(ident: Identifier) -> str:
    """An identifier's value as a view shows it: a social security number by its last four digits,
    as everywhere else (PID-19's SSN is kept only as ``ssn_last4`` in the views)."""
    if ident.type_code.upper() in _SSN_TYPES or (ident.authority or ident.authority_id).upper() in _SSN_AUTHORITIES:
        digits = "".join(c for c in ident.value if c.isascii() and c.isdigit())
        return f"***-**-{digits[-4:]}" if len(digits) >= 4 else "***"
    return ident.value


__all__ = ["RecordLink", "from_json", "load", "load_all", "loads", "record_view", "save", "to_json"]
