"""The audit trail: one ``audit_event`` row per attempt to read (or change)
patient-related data through the API or the workbench, written in the same
transaction as the read itself, one per workbench login and logout, and one
per API call that showed an unknown or revoked bearer token.

Audit rows are the only place request identifiers (facility, control id,
MRN, person) are written: the log never gets them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, insert

from exchange.store.schema import AUDIT_KEY_LEN, FACILITY_LEN, PEER_LEN, audit_event_table as audit_event


class Action(StrEnum):
    READ = "read"
    DECIDE = "decide"
    LOGIN = "login"  # a workbench login attempt (ok, or forbidden with the name tried)
    LOGOUT = "logout"
    AUTHENTICATE = "authenticate"  # an API call with an unknown or revoked bearer token (401)


class Resource(StrEnum):
    MESSAGE = "message"
    RECORD = "record"
    PERSON = "person"
    REVIEW = "review"
    DELIVERY = "delivery"
    SESSION = "session"  # a workbench login session
    TOKEN = "token"  # an API bearer token (key: the request's method and path)


class Outcome(StrEnum):
    OK = "ok"
    NOT_FOUND = "not-found"
    FORBIDDEN = "forbidden"
    INVALID = "invalid"  # a bad request (400/422) that still named a resource
    UNAUTHORIZED = "unauthorized"  # 401: the token is unknown or revoked


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: datetime  # timezone-aware
    actor: str  # the token's or the workbench user's name
    role: str
    action: Action
    resource: Resource
    facility: str | None
    key: str | None  # control id, MRN, person or review id
    outcome: Outcome
    remote: str | None  # the client's address


def _cut(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    value = value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return value[:limit]


def _row(event: AuditEvent) -> dict:
    return dict(
        at=event.at,
        actor=event.actor,
        role=str(event.role),
        action=Action(event.action).value,
        resource=Resource(event.resource).value,
        facility=_cut(event.facility, FACILITY_LEN),
        key=_cut(event.key, AUDIT_KEY_LEN),
        outcome=Outcome(event.outcome).value,
        remote=_cut(event.remote, PEER_LEN),
    )


def record(conn: Connection, event: AuditEvent) -> None:
    """Write one audit row in the caller's transaction."""
    conn.execute(insert(audit_event).values(**_row(event)))


def record_read(conn: Connection, event: AuditEvent, shown: Any) -> None:
    """The audit row of a read, and one more (resource ``record``, the same actor and time) for
    every facility record the answer ``shown`` names -- a person's records, a review's
    candidates, a list's rows -- so "who saw this patient" is answered by facility and MRN
    whatever page showed them."""
    rows = [_row(event)]
    if event.outcome is Outcome.OK or isinstance(shown, Named):
        subject = (event.facility, event.key) if event.resource is Resource.RECORD else None
        rows.extend(_row(replace(event, resource=Resource.RECORD, facility=f, key=m))
                    for f, m in sorted(records_named(shown)) if (f, m) != subject)
    conn.execute(insert(audit_event), rows)


class Named(tuple):
    """The (facility, mrn) keys a refusal names in its reason (a decision refused because two
    records are of one facility, say): audited with the refusal, as a read's answer is."""


def records_named(value: Any) -> set[tuple[str, str]]:
    """Every (facility, mrn) pair an answer names: dicts with both keys, or value objects with both
    attributes (a delivery's record), at any depth."""
    out: set[tuple[str, str]] = set()
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, Named):
            out.update((f, m) for f, m in v if isinstance(f, str) and isinstance(m, str) and m)
            continue
        if isinstance(v, dict):
            f, m = v.get("facility"), v.get("mrn")
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
            continue
        else:
            f, m = getattr(v, "facility", None), getattr(v, "mrn", None)
            if is_dataclass(v) and not isinstance(v, type):  # a message's deliveries, ...
                todo.extend(getattr(v, field.name) for field in fields(v))
            destination, theirs = getattr(v, "destination", None), getattr(v, "destination_mrn", None)
            if isinstance(destination, str) and isinstance(theirs, str) and theirs:
                out.add((destination, theirs))  # a copy: the destination's record, which its answer may quote
        if isinstance(f, str) and isinstance(m, str) and m:
            out.add((f, m))
    return out
