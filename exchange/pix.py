"""IHE PIX Query (ITI-9): a facility asks for a patient's identifiers in the other domains.

``QBP^Q23^QBP_Q21`` in, ``RSP^K23^RSP_K23`` out, on the same MLLP connection (the response
is the message's acknowledgement: stored with it, given again to a resend)::

    QPD|IHE PIX Query|<tag>|<id>^^^<authority>|^^^<wanted authority>~...
    RCP|I

A *domain* is an assigning authority (CX.4: namespace id, or universal id): each
facility's ``authority``, and ``server.person_authority`` for the enterprise person ids
the exchange issues (CX.5 ``PI``). The answer, per ITI-9's cases:

- the identifier is known and the person has identifiers in the wanted domains (every
  domain when QPD-4 is empty), the queried one aside: AA, QAK-2 ``OK``, one PID whose PID-3
  lists them (``MR`` for a facility's record, ``PI`` for the person), PID-5 an empty name
  and a second one of type ``S`` (a pseudonym: domains' names disagree);
- known, none in the wanted domains: AA, QAK-2 ``NF``, no PID;
- QPD-3's authority, or one of QPD-4's, is no domain: AE, QAK-2 ``AE``, ERR 204 at
  ``QPD-3.4`` (``QPD-4[n]``);
- the identifier is not known: AE, ERR 204 at ``QPD-3.1``.

What the querying facility may learn (the exchange's own rules beyond ITI-9): only about a
patient it holds an active record of -- to any other facility the identifier is "not known"
(where else a stranger's patient is cared for is not its business, and an answer would
confirm the identifier exists); and nothing of a patient who has opted out of sharing (the
copies' rule): ``NF``. A merged-away MRN or person id answers for whom it was merged into.

Pure: parsing, the rules and the response text; ``exchange.store.pix`` reads the index.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from exchange.hl7.ack import build_ack, escape_text, mirror_field
from exchange.hl7.charset import UTF8_CHARSET
from exchange.hl7.header import Header
from exchange.mapping.message import Message, Segment
from exchange.outcome import ACCEPTED, Outcome, Problem, Value, error

PERSON = ""  # the domain of the enterprise person ids, in ``Domains`` (facility codes are never empty)
UNKNOWN_KEY = 204  # HL7 table 0357: unknown key identifier


@dataclass(frozen=True, slots=True)
class Query(Value):
    """QPD of a PIX query: the tag, the identifier and its authority (HD.1, HD.2), the wanted authorities;
    ``problem`` when it cannot be answered (the tag and the QPD are still echoed)."""

    tag: str
    id: str
    authority: tuple[str, ...]
    wanted: tuple[tuple[str, ...], ...]  # QPD-4's repetitions' CX.4, in order (("", "") for an empty one)
    qpd: str  # the segment as sent (echoed in the response); "" without one
    problem: Problem | None = None


@dataclass(frozen=True, slots=True)
class Found(Value):
    """The patient the queried identifier names, as the index holds it now."""

    person: int
    protected: bool  # opted out of sharing
    records: tuple[tuple[str, str], ...]  # its active records: (facility, mrn)


@dataclass(frozen=True, slots=True)
class Answer(Value):
    identifiers: tuple[tuple[str, str, str], ...] = ()  # PID-3: (id, authority, type)
    problems: tuple[Problem, ...] = ()  # AE, one ERR each
    named: tuple[tuple[str, str], ...] = ()  # the facility records whose MRNs it lists (the audit's)

    @property
    def status(self) -> str:
        """QAK-2."""
        return "AE" if self.problems else "OK" if self.identifiers else "NF"


class Domains:
    """Authority (case-folded) -> facility code, or PERSON; and each facility's authority."""

    def __init__(self, authorities: Mapping[str, str], person_authority: str) -> None:
        self.authority_of = dict(authorities)  # facility code -> its authority
        self.person_authority = person_authority
        self._by_name = {a.casefold(): code for code, a in authorities.items()}
        self._by_name[person_authority.casefold()] = PERSON

    def of(self, hd: tuple[str, ...]) -> str | None:
        """The domain CX.4 names by its namespace id or its universal id (the one we know; both,
        they must agree); None if no domain."""
        known = {self._by_name[name.casefold()] for name in hd if name and name.casefold() in self._by_name}
        return known.pop() if len(known) == 1 else None


MAX_WANTED = 100  # QPD-4 repetitions: a site asks for a few domains
_PIX_NAMES = frozenset({"ihe pix query", "q23"})  # QPD-1 (CE: identifier, text), in any case


def read_query(message: Message) -> Query:
    """The QPD of a QBP^Q23 (with RCP-1, immediate), and why it cannot be answered if it cannot."""
    qpd = message.first("QPD")
    if qpd is None:
        return Query("", "", (), (), "", Problem(101, "QPD", "the PIX query has no QPD segment"))
    raw = message.delimiters.field.join(qpd.fields)
    tag = qpd.fields[2] if len(qpd.fields) > 2 else ""  # QAK-1 echoes QPD-2 as sent (escapes, spaces and all)
    unanswerable = functools.partial(Query, tag, "", (), (), raw)
    name = {qpd.value(1, 1).casefold(), qpd.value(1, 2).casefold()} - {""}
    if name and not name & _PIX_NAMES:
        return unanswerable(Problem(103, "QPD-1", "QPD-1 names another query than the IHE PIX Query"))
    rcp = message.first("RCP")
    if rcp is not None and rcp.value(1) not in ("", "I"):
        return unanswerable(Problem(103, "RCP-1", "only an immediate response is given (RCP-1 I)"))
    query_id = qpd.value(3)
    if not query_id:
        return unanswerable(Problem(101, "QPD-3.1", "the PIX query names no patient identifier (QPD-3.1)"))
    authority = _hd(qpd, qpd.repetitions(3)[0])
    if not any(authority):
        return unanswerable(Problem(101, "QPD-3.4", "the patient identifier has no assigning authority (QPD-3.4)"))
    reps = qpd.repetitions(4)
    if len(reps) > MAX_WANTED:
        return unanswerable(Problem(104, "QPD-4", f"more than {MAX_WANTED} domains asked for"))
    return Query(tag, query_id, authority, tuple(_hd(qpd, rep) for rep in reps), raw)


def _hd(segment: Segment, cx: str) -> tuple[str, str]:
    """HD.1 and HD.2 of CX.4 of one raw CX repetition, unescaped."""
    d = segment.delimiters
    components = cx.split(d.component)
    parts = [segment.text(part).strip() for part in components[3].split(d.subcomponent)[:2]] \
        if len(components) > 3 else []
    parts += [""] * (2 - len(parts))
    return parts[0], parts[1]


def person_id(value: str) -> int | None:
    """An enterprise person id as the exchange issues them (a positive 64-bit integer), or None."""
    if not value.isascii() or not value.isdigit():
        return None
    number = int(value)
    return number if 0 < number < 2 ** 63 else None


def domain_problems(query: Query, domains: Domains) -> tuple[Problem, ...]:
    """ITI-9 cases 4 and 5: QPD-3's or QPD-4's authorities that are no domain (an empty
    repetition of QPD-4 asks for nothing)."""
    out = []
    if domains.of(query.authority) is None:
        out.append(Problem(UNKNOWN_KEY, "QPD-3.4", "the assigning authority of the patient identifier is unknown"))
    for n, hd in enumerate(query.wanted, 1):
        if any(hd) and domains.of(hd) is None:
            # ITI-9 case 5: ERR-2 QPD^1^4^n, the repetition (no component, unlike case 4's QPD-3.4)
            out.append(Problem(UNKNOWN_KEY, f"QPD-4[{n}]", f"what domains returned: repetition {n} is unknown"))
    return tuple(out)


def answer(query: Query, querier: str, found: Found | None, domains: Domains) -> Answer:
    """The answer for ``querier`` (its facility code) once the index has looked the identifier up."""
    problems = domain_problems(query, domains)
    if problems:
        return Answer(problems=problems)
    if found is None or querier not in {facility for facility, _ in found.records}:
        return Answer(problems=(Problem(UNKNOWN_KEY, "QPD-3.1", "the patient identifier is not known"),))
    if found.protected:
        return Answer()
    queried = domains.of(query.authority)
    asked = str(person_id(query.id)) if queried == PERSON else query.id  # 0007 is person 7
    wanted = {domains.of(hd) for hd in query.wanted if any(hd)}
    ids = [(str(found.person), domains.person_authority, "PI", PERSON)]
    ids += [(mrn, domains.authority_of[facility], "MR", facility) for facility, mrn in sorted(found.records)
            if facility in domains.authority_of]
    given = [(value, authority, kind, domain) for value, authority, kind, domain in ids
             if (not wanted or domain in wanted) and not (domain == queried and value == asked)]
    return Answer(identifiers=tuple((value, authority, kind) for value, authority, kind, _ in given),
                  named=tuple((domain, value) for value, _, kind, domain in given if kind == "MR"))


def outcome(query: Query, result: Answer | None) -> Outcome:
    """MSA-1's verdict (AA, or AE with the first problem) of the answer to ``query``."""
    problems = _problems(query, result)
    return error(problems[0].code, problems[0].location, problems[0].text) if problems else ACCEPTED


def _problems(query: Query, result: Answer | None) -> tuple[Problem, ...]:
    return (query.problem,) if query.problem is not None else result.problems if result else ()


def answering(header: Header) -> Header:
    """The header a response is built for: MSA-1 is AA or AE, the application's answer, even when the
    query asked for enhanced acknowledgment mode (MSH-15/16), whose commit codes (CA, CE) it is not."""
    return replace(header, accept_ack_type="", application_ack_type="")


def response_header(header: Header, result: Answer | None) -> Header:
    """The header the response is written for (MSH-18 and the bytes' charset): the query's, or
    UTF-8 with MSH-18 ``UNICODE UTF-8`` when an identifier of the answer cannot be written in the
    query's charset (a copy's rule: never a ``?`` in place of a character of an identifier)."""
    if result is None or not result.identifiers:
        return header
    try:
        for value, authority, _ in result.identifiers:
            value.encode(header.codec)
            authority.encode(header.codec)
    except UnicodeEncodeError:
        return replace(header, charset_field=UTF8_CHARSET, codec="utf-8")
    return header


def response(header: Header, query: Query, result: Answer | None, *, control_id: str, now: datetime,
             application: str, facility: str) -> str:
    """RSP^K23 as text with CR segment ends: MSH, MSA, ERR..., QAK, QPD (as sent), PID when found."""
    problems = _problems(query, result)
    text = build_ack(answering(header), outcome(query, result), control_id=control_id, now=now,
                     application=application, facility=facility, message_type="RSP^K23^RSP_K23",
                     more_problems=problems[1:])
    d = header.delimiters
    segments = text.rstrip("\r").split("\r")
    segments.append(d.field.join(["QAK", mirror_field(query.tag, d), "AE" if problems else result.status]))
    if query.qpd:
        segments.append(query.qpd)
    if not problems and result.identifiers:
        c = d.component
        pid3 = d.repetition.join(f"{escape_text(value, d)}{c}{c}{c}{escape_text(authority, d)}{c}{kind}"
                                 for value, authority, kind in result.identifiers)
        segments.append(d.field.join(["PID", "", "", pid3, "", d.repetition + c * 6 + "S"]))
    return "\r".join(segments) + "\r"
