"""The intake pipeline, top to bottom.

    receive (reactor thread, microseconds)
      frame ............ exchange.mllp.framing.MLLPDecoder
      read header ...... exchange.hl7.header.read_header      (MSH only)
      accept ........... exchange.acceptance.accept            (AR / AE rules)
    commit (the writer process, a batch of messages per transaction)
      dedup ............ store.messages.find_prior             (facility, MSH-10)
      decode ........... per MSH-18                            (AE if it does not)
      load records ..... store.records.load                    (the batch's patients)
      map, apply ....... mapping.events.map_message, MemoryState.apply  (pure; AE if it cannot)
      build ACK ........ exchange.hl7.ack.build_ack            (pure)
                         a PIX query (QBP^Q23): exchange.pix, answered RSP^K23 from the index
      store ............ store.messages.insert_messages        (raw, state, ACK)
      match ............ store.index.carry_renames, plan / write  (A47 renames; new and changed records)
      save records ..... store.records.save                    (what the batch changed)
      route ............ store.routing.route_batch             (copies queued in the outbox)
      COMMIT
    answer (reactor thread): each ACK written once its batch has committed.

A message whose processing raises (a bug, not the database failing) is tried
again alone; failing again, it is stored as ``unapplied`` and answered AE 207
(exchange.intake.GroupCommitter): the ACK still leaves only after that commit.

This module holds the writer's half: ``process_batch`` takes a connection
whose transaction the caller owns, and returns plain values.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import Connection
from twisted.logger import Logger

from exchange.hl7.ack import ack_code, build_ack, version_tuple
from exchange.hl7.charset import CharsetError, decode_message
from exchange.hl7.header import Header
from exchange.mapping.events import FacilityContext, MappingError, MergePatients, data_problems, map_message, needs
from exchange.mapping.message import Message
from exchange.mapping.state import MemoryState, document_type
from exchange.outcome import Outcome, Problem, Value, Verdict, error
from exchange.config import Config
from exchange import pix
from exchange.store import index as patient_index
from exchange.store import pix as pix_store
from exchange.store.outbox import carry_merges as carry_merged_copies
from exchange.store.outbox import carry_renames as carry_renamed_copies
from exchange.store.db import hold_links
from exchange.store.routing import Applied, route_batch
from exchange.store.records import load as load_records
from exchange.store.records import save as save_records
from exchange.store.messages import (
    NewMessage,
    find_prior,
    insert_messages,
    record_resent,
    update_answer,
)

log = Logger()


@dataclass(frozen=True, slots=True)
class Received(Value):
    """One inbound message as the reactor thread saw it."""

    raw: bytes  # exactly as received (inside the MLLP frame)
    header: Header
    decision: Outcome  # the acceptance rules' verdict
    received_at: datetime
    peer: str  # remote address, plus the TLS subject when there is one
    note: str = ""  # e.g. "frame truncated at 65536 of max 16777216 bytes"

    @property
    def dedup_key(self) -> tuple[str, str] | None:
        """(facility, MSH-10) for messages that are applied at most once."""
        if self.decision.verdict is Verdict.ACCEPT:
            return (self.header.facility, self.header.control_id)
        return None


NOT_APPLIED = "the exchange could not apply this message (internal error; reported): nothing of it is applied"


def unapplied(item: Received) -> Received:
    """``item`` to be stored and answered AE 207 with nothing of it applied: processing it
    raised, alone, in two transactions (a bug; ``GroupCommitter``). Not deduplicated, as a
    rejected message: nothing of it was applied, so a resend (once the bug is fixed) is tried
    again, while a sender resending it in order would otherwise stall its feed on it."""
    return replace(item, decision=error(207, "", NOT_APPLIED))


@dataclass(frozen=True, slots=True)
class Answer(Value):
    """What goes back to the sender, and what was stored."""

    ack: bytes | None  # the ACK payload (unframed); None: send nothing (inbound ACK)
    ack_code: str | None
    message_id: int
    duplicate: bool = False
    routed: tuple[str, ...] = ()  # destinations that got a copy of it (their delivery is woken)
    matched: tuple[str, ...] = ()  # the patient index's decisions about the records it changed (metrics)


@dataclass(frozen=True, slots=True)
class AckSettings:
    application: str = "EXCHANGE"  # MSH-3 of our ACKs when the sender left MSH-5 empty
    facility: str = "EXCHANGE"  # MSH-4 of our ACKs when the sender left MSH-6 empty


MAPPED_TYPES = frozenset({"ADT", "MDM"})  # MSH-9.1 values the record model applies
PARSED_TYPES = MAPPED_TYPES | {"QBP"}  # parsed: a PIX query (QBP^Q23) is answered from the patient index


@dataclass(slots=True)
class _Decoded:
    """An accepted message on its way through the record model (one batch)."""

    index: int  # in the batch
    outcome: Outcome
    notes: list[str]
    message: Message | None = None  # parsed, for ADT/MDM
    subject: tuple[str, str] | None = None  # once applied: the record it is about (a merge's survivor)
    retired: tuple[str, str] | None = None  # a merge's retired record
    copied: bool = True  # routed to other facilities (not a resent original: Changes.copied)


def decode(index: int, item: Received, parse: bool = True) -> _Decoded:
    """The body must decode per MSH-18 (or the facility's charset, with the
    windows-1252/Latin-1 fallback when MSH-18 is empty, noted)."""
    if item.decision.verdict is not Verdict.ACCEPT:
        return _Decoded(index, item.decision, [])
    try:
        text, codec = decode_message(item.raw, item.header)
    except CharsetError as exc:
        return _Decoded(index, error(102, "MSH-18", str(exc)), [])
    notes = []
    if codec != item.header.codec or item.header.charset_fallback:
        notes.append(f"MSH-18 empty and the bytes do not fit the facility's charset: decoded as {codec}")
    message = None
    if parse and item.header.message_type in PARSED_TYPES:
        message = Message(text, item.header.delimiters, codec)
    return _Decoded(index, item.decision, notes, message)


def map_and_apply(d: _Decoded, item: Received, ctx: FacilityContext, state: MemoryState) -> None:
    """Map one message against the batch's state and apply it there (pure).

    A message that cannot be applied gets AE and changes nothing. The
    reference is a placeholder until the message has its row id.
    """
    try:
        mapped = map_message(d.message, item.header, ctx, state)
    except Exception:  # a bug in the mapping, not in the message: AE, and the batch goes on
        log.failure("mapping {facility}/{control_id} failed", facility=ctx.code, control_id=item.header.control_id)
        d.outcome = error(207, "", "the exchange could not map this message (internal error; reported)")
        return
    if isinstance(mapped, MappingError):
        d.outcome = Outcome(Verdict.ERROR, mapped.problem)
        return
    state.apply(mapped, pending_ref(d.index))
    d.notes.extend(mapped.warnings)
    d.copied = mapped.copied
    for op in mapped.operations:
        if isinstance(op, MergePatients):
            d.subject, d.retired = (op.facility, op.survivor_mrn), (op.facility, op.retired_mrn)
            break
        mrn = getattr(op, "mrn", None)
        if mrn is not None:
            d.subject = (op.facility, mrn)
            break


def pending_ref(index: int) -> tuple[str, int]:
    """The reference ``map_and_apply`` applies with until the message has its row id."""
    return ("pending message", index)


def encode_ack(header: Header, text: str) -> bytes:
    return text.encode(header.codec, errors="replace")


def _document_type(state, facility: str, message) -> str:
    """The type the record model routes an MDM's document as (after the batch): the current
    type of its document (TXA-12), else the one it inherited, else the parent's it names
    (TXA-13): an edit or a cancel with TXA-2 empty is still the note it edits. (Every type of
    its lineage routing reads from the database, saved by then: exchange.store.routing.)"""
    txa = message.first("TXA")
    if txa is None:
        return ""
    docs = [state.documents.get((facility, number)) for number in (txa.value(12), txa.value(13)) if number]
    docs = [doc for doc in docs if doc is not None and doc["versions"]]
    return document_type(docs[0]) if docs else ""


PIX_QUERY = ("QBP", "Q23")  # IHE ITI-9 (exchange.pix)


def _answer_pix(conn: Connection, message: Message, item: Received, config: Config, settings: AckSettings,
                control_id: str, at: datetime) -> tuple[bytes, Outcome]:
    """A PIX query's RSP^K23 and its verdict, from the index as the messages before it left it
    (``process_batch`` begins a part of the batch at each query)."""
    header = item.header
    query = pix.read_query(message)
    domain, result = None, None
    if query.problem is None:
        domains = pix.Domains({f.code: f.authority for f in config.facilities}, config.server.person_authority)
        domain = domains.of(query.authority)
        found = pix_store.find(conn, domain, query.id) if domain is not None else None
        result = pix.answer(query, header.facility, found, domains)
    pix_store.audit_answer(conn, querier=header.facility, query=query, domain=domain, answer=result, at=at,
                           peer=item.peer)
    header = pix.response_header(header, result)
    text = pix.response(header, query, result, control_id=control_id, now=at, application=settings.application,
                        facility=settings.facility)
    return encode_ack(header, text), pix.outcome(query, result)


def _warned(header: Header, outcome: Outcome, notes: list[str], more: Sequence[Problem] = ()
            ) -> tuple[Problem, ...]:
    """An accepted message's fields that could not be read (``data_problems``), and ``more``:
    ERR segments of severity W in its AA, from v2.5 (before it, ERR has no severity and would
    read as an error)."""
    if outcome.verdict is not Verdict.ACCEPT or not (notes or more) or version_tuple(header.version) < (2, 5):
        return ()
    return (*data_problems(notes), *more)


def _ack(header: Header, outcome: Outcome, notes: list[str], settings: AckSettings, control_id: str, at: datetime,
         more: Sequence[Problem] = ()) -> tuple[bytes, str]:
    """An answer's ACK (bytes) and its code: the outcome, and ERR segments of severity W for
    what could not be read and ``more`` (``_warned``)."""
    text = build_ack(header, outcome, control_id=control_id, now=at, application=settings.application,
                     facility=settings.facility, more_problems=_warned(header, outcome, notes, more))
    return encode_ack(header, text), ack_code(header, outcome)


def _reason(outcome: Outcome, item: Received, notes: list[str]) -> str | None:
    return "; ".join(x for x in (outcome.text, item.note, *notes) if x) or None


def process_batch(
    conn: Connection,
    items: Sequence[Received],
    *,
    new_control_id: Callable[[], str],
    now: Callable[[], datetime],
    facilities: Mapping[str, FacilityContext] | None = None,
    models: patient_index.ModelCache | None = None,
    routing: Config | None = None,
    settings: AckSettings = AckSettings(),
) -> list[Answer]:
    """Store a batch of messages, apply them to the record model, decide each answer
    (``_process``), in parts that each begin at a PIX query: a query is answered from the
    index as the messages before it left it, those of its own batch too (a sender pipelining
    an opt-out and then a query, or sending both in one BHS batch, was answered from the index
    as it was before the opt-out). One transaction all the same."""
    options = dict(new_control_id=new_control_id, now=now, facilities=facilities, models=models,
                   routing=routing, settings=settings)
    starts = [i for i, item in enumerate(items)
              if i and routing is not None and (item.header.message_type, item.header.event) == PIX_QUERY]
    if not starts:
        return _process(conn, items, **options)
    answers: list[Answer] = []
    for start, end in zip([0, *starts], [*starts, len(items)]):
        answers.extend(_process(conn, items[start:end], **options))
    return answers


def _process(
    conn: Connection,
    items: Sequence[Received],
    *,
    new_control_id: Callable[[], str],
    now: Callable[[], datetime],
    facilities: Mapping[str, FacilityContext] | None,
    models: patient_index.ModelCache | None,
    routing: Config | None,
    settings: AckSettings,
) -> list[Answer]:
    """Store messages, apply them to the record model, decide each answer.

    TRANSACTION (owned by the caller): one row per new message with its raw
    bytes, its state and the exact ACK to be sent; one history row each;
    one "resent" history row per duplicate; the record-model rows the
    accepted ADT/MDM messages change, with their event history. Nothing is
    sent before the caller commits.

    ``facilities`` (MSH-4 -> its context) switches the record model on;
    without it the messages are stored and answered, nothing is mapped.
    ``models`` (the matching model) switches the patient index on: every
    new or changed record is matched before the commit. ``routing`` (the
    configuration: facilities, rules) switches routing on: each applied
    event's copies are queued in the outbox before the commit.
    """
    prior = find_prior(conn, [k for k in (i.dedup_key for i in items) if k is not None])

    # 1. Resends: of a stored message (its stored answer) or of one earlier in this batch.
    answers: list[Answer | None] = [None] * len(items)
    new: list[int] = []  # indexes of the messages stored by this batch
    first_in_batch: dict[tuple[str, str], int] = {}
    resent: list[tuple[int, int]] = []  # (item index, index of the item it repeats)
    resent_prior: list[tuple[int, datetime, str]] = []
    for index, item in enumerate(items):
        key = item.dedup_key
        if key is not None and key in prior:
            p = prior[key]
            answers[index] = Answer(p.ack, p.ack_code, p.message_id, duplicate=True)
            resent_prior.append((p.message_id, item.received_at, item.peer))
        elif key is not None and key in first_in_batch:
            resent.append((index, first_in_batch[key]))
        else:
            if key is not None:
                first_in_batch[key] = index
            new.append(index)

    # 2. Decode, then map and apply in arrival order against the batch's records.
    decoded = [decode(index, items[index], facilities is not None) for index in new]
    to_map = [] if facilities is None else [
        d for d in decoded if d.message is not None and d.outcome.verdict is Verdict.ACCEPT
        and items[d.index].header.message_type in MAPPED_TYPES
    ]
    state = None
    if to_map:
        hold_links(conn, exclusive=False)  # before any record is read: no technician's decision in between
        contexts = [facilities[items[d.index].header.facility] for d in to_map]
        state = load_records(conn, [needs(d.message, ctx) for d, ctx in zip(to_map, contexts)])
        for d, ctx in zip(to_map, contexts):
            map_and_apply(d, items[d.index], ctx, state)

    # 3. The answers, stored with the raw messages.
    rows: list[NewMessage] = []
    for d in decoded:
        item, outcome = items[d.index], d.outcome
        header = item.header
        if outcome.verdict is Verdict.IGNORE:
            ack, code = None, None
        elif routing is not None and d.message is not None and outcome.verdict is Verdict.ACCEPT \
                and (header.message_type, header.event) == PIX_QUERY:
            ack, outcome = _answer_pix(conn, d.message, item, routing, settings, new_control_id(), now())
            d.outcome = outcome
            code = ack_code(pix.answering(header), outcome)
        else:
            ack, code = _ack(header, outcome, d.notes, settings, new_control_id(), now())
        reason = _reason(outcome, item, d.notes)
        rows.append(
            NewMessage(
                raw=item.raw,
                received_at=item.received_at,
                facility=header.facility or None,
                control_id=header.control_id or None,
                sending_application=header.sending_application,
                message_type=header.message_type,
                event=header.event,
                structure=header.structure,
                version=header.version,
                processing_id=header.processing_id,
                state=outcome.state,
                ack_code=code,
                ack=ack,
                reason=reason,
                peer=item.peer,
                dedup=item.dedup_key is not None,
            )
        )
    ids = insert_messages(conn, rows) if rows else []

    # 4. The record model's changes, each tied to the message that made it, the
    #    patient index's decisions about the records they created or changed, and
    #    the copies routed to other facilities.
    routed: dict[int, list[str]] = {}
    matched: dict[int, list[str]] = {}
    if state is not None:
        state.rebase_refs({pending_ref(d.index): id_ for d, id_ in zip(decoded, ids)})
        at = now()
        renames = patient_index.carry_renames(conn, state)  # A47: the index's rows follow the new MRN,
        merges = state.merges()
        if renames or merges:  # and the copies waiting; a facility's own merge: they name the survivor
            authorities = {code: ctx.authority for code, ctx in facilities.items()}
            carry_renamed_copies(conn, renames, authorities)
            carry_merged_copies(conn, merges, authorities)
        if models is None:
            save_records(conn, state, at)
        else:
            model = models.get(conn)
            plan = patient_index.plan(conn, state, model)
            save_records(conn, state, at, links=plan.links)
            patient_index.write(conn, plan, state, model, at)
            matched = plan.actions
            if plan.told:  # what the index did not do of a message, in its answer too (a merge held back)
                for i, d in enumerate(decoded):
                    problems = plan.told.get(ids[i])
                    if problems and rows[i].ack is not None:
                        header = items[d.index].header
                        d.notes.extend(p.text for p in problems)
                        ack, _ = _ack(header, d.outcome, d.notes, settings, new_control_id(), now(), problems)
                        rows[i] = replace(rows[i], ack=ack, reason=_reason(d.outcome, items[d.index], d.notes))
                        update_answer(conn, ids[i], ack, rows[i].reason)
        if routing is not None:
            persons = state.store_ids["records"]
            copies = route_batch(conn, [
                Applied(ids[i], items[d.index].header, d.message, d.subject, persons.get(d.subject, (0, None))[1],
                        d.retired, persons.get(d.retired, (0, None))[1] if d.retired else None,
                        _document_type(state, d.subject[0], d.message), d.copied)
                for i, d in enumerate(decoded)
                if d.message is not None and d.subject is not None and d.outcome.verdict is Verdict.ACCEPT
            ], routing, at)
            for copy in copies:
                routed.setdefault(copy.message_id, []).append(copy.destination)

    for d, row, id_ in zip(decoded, rows, ids):
        answers[d.index] = Answer(row.ack, row.ack_code, id_, routed=tuple(routed.get(id_, ())),
                                  matched=tuple(matched.get(id_, ())))
    for index, original in resent:
        first = answers[original]
        assert first is not None
        answers[index] = Answer(first.ack, first.ack_code, first.message_id, duplicate=True)
        resent_prior.append((first.message_id, items[index].received_at, items[index].peer))
    if resent_prior:
        record_resent(conn, resent_prior)
    return answers  # type: ignore[return-value]

