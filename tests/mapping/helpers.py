"""Shared helpers for the mapping tests: corpus files and synthetic messages."""
from __future__ import annotations

import itertools

from exchange.hl7.charset import decode_message
from exchange.hl7.header import Header, read_header
from exchange.mapping.events import FacilityContext, Mapped, map_message
from exchange.mapping.message import Message
from exchange.mapping.state import MemoryState
from tests.support import CORPUS_DIR

CORPUS = CORPUS_DIR  # tests/corpus: a copy of ../shared/corpus (see its SOURCES.md)

_ids = itertools.count(1)


def read(raw: bytes) -> tuple[Message, Header]:
    header = read_header(raw)
    text, codec = decode_message(raw, header)
    return Message(text, header.delimiters, codec), header


def corpus(name: str) -> tuple[Message, Header]:
    return read((CORPUS / name).read_bytes())


def msh(kind: str, event: str, version: str = "2.5", facility: str = "HOSP") -> str:
    return f"MSH|^~\\&|APP|{facility}|EX|EX|20240101120000||{kind}^{event}|C{next(_ids)}|P|{version}"


def synthetic(*segments: str) -> tuple[Message, Header]:
    return read("\r".join(segments).encode("utf-8") + b"\r")


def run(state: MemoryState, ctx: FacilityContext, message: tuple[Message, Header], ref: str = "") -> Mapped:
    msg, header = message
    result = map_message(msg, header, ctx, state)
    if hasattr(result, "operations"):
        state.apply(result, ref or header.control_id)
    return result
