"""The intake pipeline, top to bottom.

    receive (reactor thread, microseconds)
      frame ............ exchange.mllp.framing.MLLPDecoder
      read header ...... exchange.hl7.header.read_header      (MSH only)
      accept ........... exchange.acceptance.accept            (AR / AE rules)
    commit (the one writer thread, a batch of messages per transaction)
      dedup ............ store.messages.find_prior             (facility, MSH-10)
      decode/apply ..... per MSH-18 (mapping joins here)
      build ACK ........ exchange.hl7.ack.build_ack            (pure)
      store ............ store.messages.insert_messages        (raw, state, ACK)
      COMMIT
    answer (reactor thread): each ACK written once its batch has committed.

This module holds the writer-thread half: ``process_batch`` takes a
connection whose transaction the caller owns, and returns plain values.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from exchange.hl7.ack import ack_code, build_ack
from exchange.hl7.charset import CharsetError, decode_message
from exchange.hl7.header import Header
from exchange.outcome import Outcome, Value, Verdict, error
from exchange.store.messages import (
    NewMessage,
    find_prior,
    insert_messages,
    record_resent,
)


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


@dataclass(frozen=True, slots=True)
class Answer(Value):
    """What goes back to the sender, and what was stored."""

    ack: bytes | None  # the ACK payload (unframed); None: send nothing (inbound ACK)
    ack_code: str | None
    message_id: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class AckSettings:
    application: str = "EXCHANGE"  # MSH-3 of our ACKs when the sender left MSH-5 empty
    facility: str = "EXCHANGE"  # MSH-4 of our ACKs when the sender left MSH-6 empty


def apply(item: Received) -> tuple[Outcome, str]:
    """Decide the final outcome of an accepted message: (outcome, note).

    Today: the body must decode per MSH-18 (or the facility's charset, with
    the windows-1252/Latin-1 fallback when MSH-18 is empty, noted).
    The record-model mapping joins here, in the same transaction.
    """
    if item.decision.verdict is not Verdict.ACCEPT:
        return item.decision, ""
    try:
        _, codec = decode_message(item.raw, item.header)
    except CharsetError as exc:
        return error(102, "MSH-18", str(exc)), ""
    fell_back = codec != item.header.codec or item.header.charset_fallback
    note = f"MSH-18 empty and the bytes do not fit the facility's charset: decoded as {codec}" if fell_back else ""
    return item.decision, note


def encode_ack(header: Header, text: str) -> bytes:
    return text.encode(header.codec, errors="replace")


def process_batch(
    conn: Connection,
    items: Sequence[Received],
    *,
    new_control_id: Callable[[], str],
    now: Callable[[], datetime],
    settings: AckSettings = AckSettings(),
) -> list[Answer]:
    """Store a batch of messages and decide each one's answer.

    TRANSACTION (owned by the caller): one row per new message with its raw
    bytes, its state and the exact ACK to be sent; one history row each;
    one "resent" history row per duplicate. Nothing is sent before the
    caller commits.
    """
    prior = find_prior(conn, [k for k in (i.dedup_key for i in items) if k is not None])

    answers: list[Answer | None] = [None] * len(items)
    rows: list[NewMessage] = []
    row_of_item: dict[int, int] = {}  # item index -> index in rows
    first_in_batch: dict[tuple[str, str], int] = {}  # dedup key -> item index
    resent: list[tuple[int, int]] = []  # (item index, index of the item it repeats or -1)
    resent_prior: list[tuple[int, datetime, str]] = []

    for index, item in enumerate(items):
        key = item.dedup_key
        if key is not None and key in prior:
            # A resend of a message already stored: the stored answer, applied once.
            p = prior[key]
            answers[index] = Answer(p.ack, p.ack_code, p.message_id, duplicate=True)
            resent_prior.append((p.message_id, item.received_at, item.peer))
            continue
        if key is not None and key in first_in_batch:
            resent.append((index, first_in_batch[key]))
            continue
        if key is not None:
            first_in_batch[key] = index

        outcome, note = apply(item)
        header = item.header
        if outcome.verdict is Verdict.IGNORE:
            ack = None
            code = None
        else:
            text = build_ack(
                header,
                outcome,
                control_id=new_control_id(),
                now=now(),
                application=settings.application,
                facility=settings.facility,
            )
            ack = encode_ack(header, text)
            code = ack_code(header, outcome)
        reason = "; ".join(x for x in (outcome.text, item.note, note) if x) or None
        row_of_item[index] = len(rows)
        rows.append(
            NewMessage(
                raw=item.raw,
                received_at=item.received_at,
                facility=header.facility or None,
                control_id=header.control_id or None,
                sending_application=_first_component(header.sending_application_field, header),
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
                dedup=key is not None,
            )
        )

    ids = insert_messages(conn, rows) if rows else []
    for index, row_index in row_of_item.items():
        row = rows[row_index]
        answers[index] = Answer(row.ack, row.ack_code, ids[row_index])
    for index, original in resent:
        first = answers[original]
        assert first is not None
        answers[index] = Answer(first.ack, first.ack_code, first.message_id, duplicate=True)
        resent_prior.append((first.message_id, items[index].received_at, items[index].peer))
    if resent_prior:
        record_resent(conn, resent_prior)
    return answers  # type: ignore[return-value]


def _first_component(field: str, header: Header) -> str:
    return field.split(header.delimiters.component, 1)[0].strip()

