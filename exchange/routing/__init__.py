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
``route(event, config.facilities, records, config.routes, prior_records=, told=)`` -> :class:`Decision`
    ``records``: {facility code: MRN} of the person's active records (one
    per facility); ``prior_records``: only for merges (A40, A18, A34-A36),
    the same for the person the retired MRN was linked to before the merge;
    ``told``: only for cancels (``CANCELS``), the facilities sent a copy
    about the same visit before.
    ``Decision.destinations``: :class:`Destination` (facility, mrn, why,
    prior_mrn); ``Decision.skipped``: (facility, :class:`Reason`) for every
    other configured facility; ``Decision.reason``: one line when nothing goes.
``rewrite(message, event=, destination=, facility=, server=, control_id=, now=)`` -> :class:`Copy`
    The destination's copy (``Copy.text``, ``Copy.codec``, ``Copy.encode()``).
``recheck(event, destination, why, config.facilities, config.routes)`` -> :class:`Reason` | None
    Just before a queued copy goes out: why the configuration running now
    would not send it (exchange.store.outbox withholds it then).

What the wiring must call and store (exchange.store.outbox)
----------------------------------------------------------
In the writer transaction, per applied ADT/MDM message::

    event = Event.read(header, msg, person=None if person_id is None else str(person_id),
                       source_mrn=<the sender's MRN>, protected=<the person's opt-out>)
    decision = route(event, config.facilities, records, config.routes, prior_records=...)
    for i, dest in enumerate(decision.destinations):
        copy = rewrite(msg, event=event, destination=dest,
                       facility=config.facility(dest.facility), server=config.server,
                       control_id=copy_control_id(message_id, i + 1, now), now=now)
        NewCopy(destination=dest.facility, message_id=message_id,
                control_id=copy.control_id, payload=copy.encode(), created_at=now,
                person_id=person_id, facility=event.facility, mrn=event.source_mrn,
                reason=dest.why, destination_mrn=dest.mrn,
                document_type=event.document_type, document_types=event.document_types,
                visit=<PV1-19 of the message, else PV1-50; "" without them>)
    outbox.enqueue(conn, copies)

``control_id`` must be unique per destination (the delivery matches MSA-2
against it), unique across databases (receivers drop control ids they have
seen), and at most 20 characters (MSH-10 is ST(20) before 2.7): the routing
time, the inbound message id and the destination's index do
(``exchange.store.routing.copy_control_id``). ``records`` are the
person's active records after the message applied, one MRN per facility
(the caller picks one when a facility holds several); ``prior_records`` (merges
only) the records of the retired MRN's person taken before the merge.
The outbox row is the accounting of disclosures: who received (destination),
what (the inbound message, its type/event, a document's TXA-12), about whom
(person, the sender's record, and ``dest.mrn``: the delivery worker checks
again, just before it sends the copy, that the person has not opted out and
that this record is still the person's), why (``default`` or the rule's
name), when, and the event's document types (with the message's type and
event and ``why``, checked again by ``recheck`` against the configuration
the worker runs when it sends the copy).
``decision.skipped`` is for metrics and logs (facility and reason only: no PHI).

Decisions
---------
- A late link (a review resolved later, a merge of persons) resends nothing:
  routing is decided once per event from the links at that moment.
- Explicit ``[[route]]`` rules add destinations regardless of their
  ``subscribe``; they never override the opt-out, ``exclude_documents``, the
  sender rule or (without ``allow_without_record``) the record rule. When
  both a subscription and a rule reach a facility, ``why`` is ``default``.
- Events about the sender's own identifiers, accounts and visits (A24, A37,
  A41-A51) and the two-patient A17 are never copied; merges only where the
  destination holds both sides; cancels (A11, A13...) only where something
  about their visit went before; a multi-patient message keeps only the
  routed patient's PID group.
- The person id travels in PID-3 as type ``PI`` (patient internal
  identifier, as IHE PIX managers send the enterprise id) under
  ``server.person_authority``.
- Copies use original acknowledgement mode (MSH-15/16 cleared): one ACK each.
- ``version`` is meant for older versions; asking for a newer one changes
  MSH-12 and MSH-9.3 but invents no value the newer version requires.
"""
from exchange.routing.rewrite import Copy, rewrite
from exchange.routing.rules import (
    CANCELS,
    DEFAULT,
    Decision,
    Destination,
    Event,
    Reason,
    Skipped,
    protection,
    recheck,
    route,
    subscribed,
)

__all__ = [
    "CANCELS",
    "DEFAULT",
    "Copy",
    "Decision",
    "Destination",
    "Event",
    "Reason",
    "Skipped",
    "protection",
    "recheck",
    "rewrite",
    "route",
    "subscribed",
]
