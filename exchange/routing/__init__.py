"""Routing: who receives a copy of an applied event, and what that copy says.

Pure functions over values (no SQL, no Twisted, no I/O); the writer calls
them inside the intake transaction, after the record model applied the
message and before the commit that precedes the ACK.

API
---
``Event.read(header, message, person=, source_mrn=, protected=)`` -> :class:`Event`
    The routing view of one applied message: MSH-4.1, MSH-9, PV1-2, TXA-2
    from the message; the enterprise person id, the sender's MRN and the
    person's opt-out from the record model.
``protection(message)`` -> True / False / None
    PD1-12 of the message (None: not given, no change). The record model
    stores it; ``Event.protected`` is the person's state after the event.
``route(event, config.facilities, records, config.routes, prior_records=)`` -> :class:`Decision`
    ``records``: {facility code: MRN} of the person's active records (one
    per facility); ``prior_records``: only for merges (A40, A18, A34-A36),
    the same for the person the retired MRN was linked to before the merge.
    ``Decision.destinations``: :class:`Destination` (facility, mrn, why,
    prior_mrn); ``Decision.skipped``: (facility, :class:`Reason`) for every
    other configured facility; ``Decision.reason``: one line when nothing goes.
``rewrite(message, event=, destination=, facility=, server=, control_id=, now=)`` -> :class:`Copy`
    The destination's copy (``Copy.text``, ``Copy.codec``, ``Copy.encode()``).

What the wiring must call and store (outbox, item 4 of issue 5)
---------------------------------------------------------------
In the writer transaction, per applied ADT/MDM message::

    event = Event.read(header, msg, person=..., source_mrn=..., protected=...)
    decision = route(event, config.facilities, records, config.routes, prior_records=...)
    for dest in decision.destinations:
        copy = rewrite(msg, event=event, destination=dest,
                       facility=config.facility(dest.facility), server=config.server,
                       control_id=<unique id of this outbox row>, now=<injected clock>)
        INSERT outbox(destination=dest.facility, control_id=copy.control_id,
                      payload=copy.encode(), source message id, person=event.person,
                      mrn=dest.mrn, why=dest.why, state=queued, created_at=now)

The outbox row is also the accounting of disclosures: who received (the
destination), what (the source message, its type/event, the TXA-12 of a
document), about whom (person, the destination's MRN), why (``default`` or
the rule's name) and when (created, delivered). ``decision.skipped`` is for
metrics and logs (facility and reason only: no PHI). The MSH-10 of each copy
must be unique per destination: the delivery matches MSA-2 against it.

Decisions
---------
- A late link (a review resolved later, a merge of persons) resends nothing:
  routing is decided once per event from the links at that moment.
- Explicit ``[[route]]`` rules add destinations regardless of their
  ``subscribe``; they never override the opt-out, ``exclude_documents``, the
  sender rule or (without ``allow_without_record``) the record rule.
- Events about the sender's own identifiers, accounts and visits (A24, A37,
  A41-A51) and the two-patient A17 are never copied; merges only where the destination holds both
  sides; multi-patient messages keep only the routed patient's PID group.
"""
from exchange.routing.rewrite import Copy, rewrite
from exchange.routing.rules import (
    DEFAULT,
    Decision,
    Destination,
    Event,
    Reason,
    Skipped,
    protection,
    route,
    subscribed,
)

__all__ = [
    "DEFAULT",
    "Copy",
    "Decision",
    "Destination",
    "Event",
    "Reason",
    "Skipped",
    "protection",
    "rewrite",
    "route",
    "subscribed",
]
