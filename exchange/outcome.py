"""The shared vocabulary of what happened to a message.

Every stage (acceptance, mapping, storage) answers with an :class:`Outcome`;
the ACK is a pure function of it (``exchange.ack.build_ack``) and the stored
state is derived from it. Plain values: no Twisted, no SQLAlchemy.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Value:
    """Base of the frozen dataclasses that cross to the writer process.

    Pickles as (class, positional fields): dataclass(slots=True)'s own
    ``__getstate__`` calls ``dataclasses.fields()`` per object, which made
    pickling a batch cost ~200 us.
    """

    __slots__ = ()

    def __reduce__(self):
        return (type(self), tuple(getattr(self, name) for name in self.__match_args__))


class Verdict(StrEnum):
    """What the exchange decided about one inbound message."""

    ACCEPT = "accept"  # stored (and applied): AA / CA
    ERROR = "error"  # understood but cannot be applied: AE / CE
    REJECT = "reject"  # not accepted from this sender/type/version/processing id: AR / CR
    IGNORE = "ignore"  # an inbound ACK: recorded, never answered


class MessageState(StrEnum):
    """States a stored message moves through (its history is kept)."""

    ACCEPTED = "accepted"
    ERROR = "error"
    REJECTED = "rejected"
    IGNORED = "ignored"
    RESENT = "resent"  # history entry: the same (facility, MSH-10) arrived again


STATE_OF_VERDICT = {
    Verdict.ACCEPT: MessageState.ACCEPTED,
    Verdict.ERROR: MessageState.ERROR,
    Verdict.REJECT: MessageState.REJECTED,
    Verdict.IGNORE: MessageState.IGNORED,
}


@dataclass(frozen=True, slots=True)
class Problem(Value):
    """Why a message was not accepted, in HL7 terms.

    ``code`` is from HL7 table 0357 (101 required field missing, 102 data type
    error, 103 table value not found, 200 unsupported message type, 201
    unsupported event code, 202 unsupported processing id, 203 unsupported
    version id, 207 application internal error).
    ``location`` names the field the way the standard does ("MSH-12",
    "PID-3.4"), or "" when no field is to blame.
    """

    code: int
    location: str
    text: str


@dataclass(frozen=True, slots=True)
class Outcome(Value):
    verdict: Verdict
    problem: Problem | None = None

    @property
    def text(self) -> str:
        return self.problem.text if self.problem else ""

    @property
    def state(self) -> MessageState:
        return STATE_OF_VERDICT[self.verdict]


ACCEPTED = Outcome(Verdict.ACCEPT)
IGNORED = Outcome(Verdict.IGNORE)


def rejected(code: int, location: str, text: str) -> Outcome:
    return Outcome(Verdict.REJECT, Problem(code, location, text))


def error(code: int, location: str, text: str) -> Outcome:
    return Outcome(Verdict.ERROR, Problem(code, location, text))
