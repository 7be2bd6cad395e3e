"""Decide whether an inbound message is accepted, from its header alone (pure).

``accept(header, policy, peer)`` runs on the reactor thread for every frame,
before anything is stored, and answers with an :class:`Outcome`; the ACK code
follows from it (REJECT -> AR/CR, ERROR -> AE/CE, ACCEPT -> AA/CA, IGNORE ->
no answer). The rules run in a fixed order; the first that fires decides:

1. structural header problem (no MSH, bad MSH-1/MSH-2) -> ERROR with it
2. the message is itself an ACK                       -> IGNORE
3. MSH-4 is not a configured facility                 -> REJECT 103 (101 if empty)
4. the client certificate does not fit MSH-4          -> REJECT 103
5. MSH-12 missing                                     -> ERROR 101
   MSH-12 not 2.1-2.8                                 -> REJECT 203
6. MSH-11 missing                                     -> ERROR 101
   MSH-11.1 not an accepted processing id             -> REJECT 202
7. MSH-9 missing                                      -> ERROR 101
   message type not accepted                          -> REJECT 200
   event not accepted for an accepted type            -> REJECT 201 (MSH-9.2)
8. MSH-10 missing                                     -> ERROR 101
9. any other header problem (e.g. MSH-18)             -> ERROR with it
10. otherwise                                         -> ACCEPT

Why 103 for an unknown or mismatched facility: MSH-4.1 (HD namespace id) is
coded from user-defined table 0362 "Facility"; the configured facilities are
our table 0362, so a code outside it is exactly "table value not found".
0357 has no authentication code; a facility the certificate may not send as
is the same condition seen from that certificate.

Texts name codes and fields only (the facility code and version are fine,
they are not about a patient); they never quote message content beyond that.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache

from exchange.hl7.ack import version_tuple
from exchange.hl7.header import MAX_CONTROL_ID, Header
from exchange.outcome import ACCEPTED, IGNORED, Outcome, Verdict, error, rejected

__all__ = [
    "AcceptancePolicy",
    "FacilityRule",
    "PeerIdentity",
    "accept",
    "matches",
    "normalize_fingerprint",
    "normalize_subject",
]

# Header problems at these locations mean the MSH itself cannot be read.
STRUCTURAL_LOCATIONS = frozenset({"MSH", "MSH-1", "MSH-2"})

# Supported versions: major 2, minor 1..8, any patch ("2.3.1", "2.5.1", "2.8.2").
_VERSION = re.compile(r"\d+(?:\.\d+)*")

# Longest sender-supplied code quoted back in a text (keeps texts short).
_MAX_QUOTED = 40


@dataclass(frozen=True, slots=True)
class FacilityRule:
    """One configured facility: its MSH-4 code and optional TLS binding.

    ``tls_subject`` is an RFC 4514-style DN ("CN=x,O=y") or a bare CN;
    ``tls_fingerprint`` a SHA-256 fingerprint (any case, colons and a
    "sha256:" prefix allowed). When set, a message claiming this facility
    must come over TLS with a client certificate that matches all of them.
    """

    code: str
    tls_subject: str | None = None
    tls_fingerprint: str | None = None

    @property
    def is_bound(self) -> bool:
        return bool(self.tls_subject or self.tls_fingerprint)


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The client certificate of the connection; None values on plain TCP."""

    tls_subject: str | None = None
    tls_fingerprint: str | None = None


@dataclass(frozen=True)
class AcceptancePolicy:
    facilities: Mapping[str, FacilityRule]
    accept: tuple[str, ...] = ("ADT^*", "MDM^*", "QBP^Q23")  # config.DEFAULT_ACCEPT
    processing_ids: tuple[str, ...] = ("P",)
    # Derived once: the TLS bindings, normalised, for the per-message checks.
    _bindings: dict[str, _Binding] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        bindings = {code: _Binding.of(rule) for code, rule in self.facilities.items() if rule.is_bound}
        object.__setattr__(self, "_bindings", bindings)

    def certificate_fits(self, code: str, peer: PeerIdentity | None) -> bool:
        """May a connection with ``peer``'s certificate send as facility ``code``?

        A facility bound to a certificate sends only over that certificate,
        and a certificate bound to other facilities never sends as this one.
        """
        if not self._bindings:
            return True
        cert = _Certificate.of(peer)
        binding = self._bindings.get(code)
        if binding is not None:
            return binding.matches(cert)
        if cert is None:
            return True
        return not any(b.matches(cert) for b in self._bindings.values())


@dataclass(frozen=True, slots=True)
class _Certificate:
    """A peer certificate, normalised once per check."""

    subject: tuple[tuple[str, str], ...] | None
    fingerprint: str | None

    @classmethod
    def of(cls, peer: PeerIdentity | None) -> _Certificate | None:
        if peer is None or not (peer.tls_subject or peer.tls_fingerprint):
            return None
        return cls(
            normalize_subject(peer.tls_subject) if peer.tls_subject else None,
            normalize_fingerprint(peer.tls_fingerprint) if peer.tls_fingerprint else None,
        )


@dataclass(frozen=True, slots=True)
class _Binding:
    subject: tuple[tuple[str, str], ...] | None  # sorted (ATTR, value) pairs
    cn: str | None  # a bare CN, when the rule gave only that
    fingerprint: str | None

    @classmethod
    def of(cls, rule: FacilityRule) -> _Binding:
        subject = cn = None
        if rule.tls_subject:
            if "=" in rule.tls_subject:
                subject = normalize_subject(rule.tls_subject)
            else:
                cn = rule.tls_subject.strip()
        fingerprint = normalize_fingerprint(rule.tls_fingerprint) if rule.tls_fingerprint else None
        return cls(subject, cn, fingerprint)

    def matches(self, cert: _Certificate | None) -> bool:
        """All configured parts must match; no certificate never does."""
        if cert is None:
            return False
        if self.fingerprint is not None and cert.fingerprint != self.fingerprint:
            return False
        if self.subject is not None and cert.subject != self.subject:
            return False
        if self.cn is not None:
            if cert.subject is None or [v for k, v in cert.subject if k == "CN"] != [self.cn]:
                return False  # exactly one CN, and it is the configured one
        return True


def never_answered(header: Header) -> bool:
    """An ACK whose MSH can be read: recorded, never answered (HL7: never ACK an ACK).
    (An ACK whose MSH cannot be read is answered AE, as any such message.)"""
    problem = header.problem
    return header.is_ack and (problem is None or problem.location not in STRUCTURAL_LOCATIONS)


def accept(header: Header, policy: AcceptancePolicy, peer: PeerIdentity | None = None) -> Outcome:
    """The acceptance verdict for one message header (see the module docstring)."""
    problem = header.problem
    # 1. The MSH cannot be read: answer AE (MSA-2 is whatever MSH-10 we could find).
    if problem is not None and problem.location in STRUCTURAL_LOCATIONS:
        return Outcome(Verdict.ERROR, problem)

    # 2. Never answer an ACK; it is recorded only.
    if never_answered(header):
        return IGNORED

    # 3. The sender must be a configured facility (exact, case-sensitive MSH-4.1).
    code = header.facility
    if not code:
        return rejected(101, "MSH-4", "sending facility (MSH-4) is missing")
    rule = policy.facilities.get(code)
    if rule is None:
        return rejected(103, "MSH-4", f"sending facility {_quote(code)} is not a configured facility")

    # 4. A facility bound to a certificate only sends over that certificate,
    #    and a certificate bound to another facility never sends as this one.
    if not policy.certificate_fits(code, peer):
        return rejected(
            103, "MSH-4", "sending facility does not match the authenticated client certificate"
        )

    # 5. Version: HL7 v2.1 to v2.8 (any patch level).
    if not header.version:
        return error(101, "MSH-12", "version id (MSH-12) is missing")
    if not _supported_version(header.version):
        return rejected(203, "MSH-12", f"version id {_quote(header.version)} is not supported")

    # 6. Processing id: production only, unless configured otherwise.
    if not header.processing_id:
        return error(101, "MSH-11", "processing id (MSH-11) is missing")
    if header.processing_id not in policy.processing_ids:
        return rejected(
            202, "MSH-11", f"processing id {_quote(header.processing_id)} is not accepted"
        )

    # 7. Message type and event.
    if not header.message_type:
        return error(101, "MSH-9", "message type (MSH-9) is missing")
    outcome = _type_outcome(header.message_type, header.event, policy.accept)
    if outcome is not None:
        return outcome

    # 8. The control id is the duplicate-detection key and MSA-2.
    if not header.control_id.strip():
        return error(101, "MSH-10", "message control id (MSH-10) is missing")
    if len(header.control_id) > MAX_CONTROL_ID:  # it could not be told apart from another one
        return error(102, "MSH-10", f"message control id (MSH-10) is longer than {MAX_CONTROL_ID} characters")
    if any(c == "\x00" or "\ud800" <= c <= "\udfff" for c in header.control_id):
        # stored, it would read as another id (a NUL becomes U+FFFD in the database): that message's
        # answer, and nothing of this one applied (found by an audit)
        return error(102, "MSH-10", "message control id (MSH-10) contains a NUL or an unencodable character")

    # 9. Anything else read_header found (e.g. an unknown MSH-18 charset).
    if problem is not None:
        return Outcome(Verdict.ERROR, problem)

    return ACCEPTED


def matches(pattern: str, message_type: str, event: str) -> bool:
    """Does a "TYPE^EVENT" pattern match? ``*``/``?``/``[...]`` per part, fnmatch-style.

    "ADT" alone means "ADT^*"; "*" means everything. Case-sensitive (HL7 codes
    are upper case). Shared with the routing subscriptions.
    """
    type_pattern, event_pattern = _split_pattern(pattern)
    return _match_part(type_pattern, message_type) and _match_part(event_pattern, event)


def normalize_fingerprint(value: str) -> str:
    """Lower-case hex without colons or spaces; an optional "sha256:" prefix dropped."""
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[len("sha256:"):]
    return v.replace(":", "").replace(" ", "")


_ATTRIBUTE_ALIASES = {
    "COMMONNAME": "CN",
    "ORGANIZATIONNAME": "O",
    "ORGANIZATIONALUNITNAME": "OU",
    "COUNTRYNAME": "C",
    "LOCALITYNAME": "L",
    "STATEORPROVINCENAME": "ST",
    "S": "ST",
    "EMAIL": "EMAILADDRESS",
    "E": "EMAILADDRESS",
}


def normalize_subject(value: str) -> tuple[tuple[str, str], ...]:
    """A distinguished name as sorted (ATTRIBUTE, value) pairs.

    Accepts "CN=x, O=y" (RFC 4514, ``\\,`` escapes and ``+`` multi-valued
    RDNs kept apart) and OpenSSL's "/O=y/CN=x". Attribute names are upper-cased
    (with a few long names mapped to their short form), spaces around names
    and values dropped; values keep their case. The order of attributes does
    not matter (RFC 4514 and OpenSSL print them in opposite orders). A value
    without "=" is taken as a bare CN.
    """
    text = value.strip()
    if "=" not in text:
        return (("CN", text),)
    if text.startswith("/"):
        parts = [p for p in text[1:].split("/") if p]
    else:
        parts = _split_unescaped(text, ",+;")
    pairs = []
    for part in parts:
        name, sep, val = part.partition("=")
        if not sep:
            continue
        name = name.strip().upper()
        pairs.append((_ATTRIBUTE_ALIASES.get(name, name), _unescape(val.strip())))
    return tuple(sorted(pairs))


_HEX = frozenset("0123456789abcdefABCDEF")


def _unescape(value: str) -> str:
    """An RFC 4514 value without its escapes: ``\\,`` is ",", ``\\C3\\A9`` is "é" (UTF-8 bytes)."""
    if "\\" not in value:
        return value
    out, i = bytearray(), 0
    while i < len(value):
        c, pair = value[i], value[i + 1:i + 3]
        if c == "\\" and len(pair) == 2 and set(pair) <= _HEX:
            out.append(int(pair, 16))
            i += 3
        elif c == "\\" and i + 1 < len(value):
            out.extend(value[i + 1].encode())
            i += 2
        else:
            out.extend(c.encode())
            i += 1
    return out.decode("utf-8", "replace")


def _split_unescaped(text: str, separators: str) -> list[str]:
    parts, current, escaped = [], [], False
    for c in text:
        if escaped:
            current.append(c)
            escaped = False
        elif c == "\\":
            current.append(c)
            escaped = True
        elif c in separators:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


@lru_cache(maxsize=256)
def _supported_version(version: str) -> bool:
    if not _VERSION.fullmatch(version):
        return False
    vt = version_tuple(version)
    return len(vt) >= 2 and vt[0] == 2 and 1 <= vt[1] <= 8


def _type_outcome(message_type: str, event: str, patterns: tuple[str, ...]) -> Outcome | None:
    """None when accepted; else REJECT 200 (type) or 201 (event of an accepted type)."""
    type_known = False
    for pattern in patterns:
        type_pattern, event_pattern = _split_pattern(pattern)
        if _match_part(type_pattern, message_type):
            if _match_part(event_pattern, event):
                return None
            type_known = True
    if not type_known:
        return rejected(200, "MSH-9", f"message type {_quote(message_type)} is not accepted")
    if not event:
        return rejected(
            201, "MSH-9.2", f"message type {_quote(message_type)} without an event is not accepted"
        )
    return rejected(
        201, "MSH-9.2", f"event {_quote(event)} of message type {_quote(message_type)} is not accepted"
    )


@lru_cache(maxsize=256)
def _split_pattern(pattern: str) -> tuple[str, str]:
    type_pattern, _, event_pattern = pattern.strip().partition("^")
    event_pattern = event_pattern.partition("^")[0]  # a structure part is ignored
    return type_pattern.strip() or "*", event_pattern.strip() or "*"


def _match_part(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if not any(c in pattern for c in "*?["):
        return pattern == value
    return fnmatchcase(value, pattern)


def _quote(code: str) -> str:
    """A sender-supplied code for a text: bounded in length, control characters dropped."""
    code = "".join(c for c in code if c >= " ")
    return code if len(code) <= _MAX_QUOTED else code[:_MAX_QUOTED] + "..."
