"""The patient index's side of a PIX query (``exchange.pix``): whom an identifier names now,
and the audit rows of the answer. In the writer's batch transaction."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from sqlalchemy import Connection, select

from exchange import audit
from exchange.pix import PERSON, Answer, Found, Query, person_id
from exchange.store.consent import live_persons, record_owners
from exchange.store.schema import patient_record_table as patient_record

ACTOR_ROLE = "facility"  # audit_event.role of a facility's query (the actor is its code)


def find(conn: Connection, domain: str, value: str) -> Found | None:
    """The patient ``value`` names in ``domain`` (a facility code, or PERSON for the enterprise
    person ids), followed through merges (a retired MRN, a person merged into another); None
    when it names no record or person with an active record."""
    if "\x00" in value:  # (an escaped \X00\) names nothing, and PostgreSQL refuses it as a parameter
        return None
    if domain == PERSON:
        start = person_id(value)
    else:
        start = record_owners(conn, {(domain, value)}).get((domain, value))
    if start is None:
        return None
    live, protected = live_persons(conn, {start})[start]
    if live is None:
        return None
    records = tuple(sorted((r.facility, r.mrn) for r in conn.execute(
        select(patient_record.c.facility, patient_record.c.mrn)
        .where(patient_record.c.person_id == live, patient_record.c.active))))
    return Found(live, protected, records) if records else None


def audit_answer(conn: Connection, *, querier: str, query: Query, domain: str | None, answer: Answer | None,
                 at: datetime, peer: str) -> None:
    """Who asked about whom (``domain``: the queried identifier's, None when unknown; ``answer`` None
    for a query that could not be read), and one row more for each facility record the answer
    named, as for a read through the API."""
    resource = audit.Resource.PERSON if domain == PERSON else audit.Resource.RECORD
    found = answer is not None and not answer.problems
    key = query.id.replace("\x00", "\\X00\\")  # as sent (PostgreSQL keeps no NUL)
    if domain == PERSON and person_id(key) is not None:
        key = str(person_id(key))  # person 7, asked for as 0007: "who looked up person 7" finds it
    event = audit.AuditEvent(at, querier, ACTOR_ROLE, audit.Action.READ, resource,
                             None if domain in (None, PERSON) else domain, key or None,
                             audit.Outcome.OK if found else audit.Outcome.NOT_FOUND, peer)
    audit.record_read(conn, event, [{"facility": f, "mrn": m} for f, m in (answer.named if found else ())])
    if found and domain != PERSON:  # the enterprise person id it gave: a row of its own, as a person read
        for value, _, kind in answer.identifiers:
            if kind == "PI":
                audit.record(conn, replace(event, resource=audit.Resource.PERSON, facility=None, key=value))
