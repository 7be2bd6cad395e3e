"""HL7 character sets (MSH-18, table 0211) and the Python codecs that decode them.

``codec_for("8859/1") == "iso8859-1"``; unknown names give ``None`` so the
caller can answer "unsupported character set" instead of guessing.
``decode_message(payload, header)`` decodes a whole message strictly with the
codec ``read_header`` chose. Pure functions: no Twisted, no SQLAlchemy.
"""
from __future__ import annotations

import codecs
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # header.py imports this module; avoid the cycle at run time
    from exchange.hl7.header import Header

UTF8_BOM = b"\xef\xbb\xbf"
UTF8_CHARSET = "UNICODE UTF-8"  # MSH-18 of what the exchange writes in UTF-8 when the asked charset cannot carry it

# HL7 table 0211 (plus "UTF-8", which senders write for "UNICODE UTF-8").
# Keys are upper case with single spaces; see _normalise().
_CODECS: dict[str, str | None] = {
    "": "ascii",
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO IR100": "iso8859-1",
    "ISO IR101": "iso8859-2",
    "ISO IR144": "iso8859-5",
    "ISO IR127": "iso8859-6",
    "ISO IR126": "iso8859-7",
    "ISO IR138": "iso8859-8",
    "ISO IR148": "iso8859-9",
    "ISO IR192": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UNICODE": "utf-16",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc-kr",
    "BIG-5": "big5",
    "ISO IR87": "iso2022_jp",
    "JIS X 0208": "iso2022_jp",
    # Table 0211 lists it, but Python has no CNS 11643 (EUC-TW) codec.
    "CNS 11643-1992": None,
}


class CharsetError(ValueError):
    """The message bytes are not valid in the character set it was read with.

    The text names the character set and a byte offset, never message content.
    """


def _normalise(name: str) -> str:
    return " ".join(name.split()).upper()


def codec_for(hl7_charset: str) -> str | None:
    """The Python codec for an HL7 MSH-18 value, or None when unsupported.

    Case-insensitive and tolerant of extra spaces ("unicode  utf-8"). Also
    accepts the common non-standard spellings "ISO-8859-n" / "ISO8859-n".
    """
    if len(hl7_charset) > 64:  # MSH-18 comes from the wire: keep the cache small
        return None
    return _codec_for(hl7_charset)


@lru_cache(maxsize=128)
def _codec_for(hl7_charset: str) -> str | None:
    key = _normalise(hl7_charset)
    if key in _CODECS:
        return _CODECS[key]
    for prefix in ("ISO-8859-", "ISO8859-", "ISO_8859-"):
        if key.startswith(prefix):
            return _CODECS.get("8859/" + key[len(prefix):])
    return None


@lru_cache(maxsize=64)
def ascii_compatible(codec: str) -> bool:
    """True when ASCII text (such as "MSH|^~\\&") encodes to the same bytes.

    False for UTF-16/UTF-32: a message whose MSH reads as single bytes cannot
    be in those. Raises LookupError for a name that is not a Python codec.
    """
    return "MSH|^~\\&".encode(codec) == b"MSH|^~\\&"


@lru_cache(maxsize=64)
def canonical_codec(codec: str) -> str:
    """Python's own name for a codec ("UTF8" -> "utf-8", "latin-1" -> "iso8859-1")."""
    return codecs.lookup(codec).name


FALLBACK_CODECS = ("cp1252", "latin-1")


def decode_message(payload: bytes, header: Header) -> tuple[str, str]:
    """Decode a whole message strictly with ``header.codec``: (text, codec used).

    A leading UTF-8 byte order mark is dropped (``read_header`` skips it too).
    When MSH-18 is empty and the sender's default (UTF-8 or ASCII) does not
    fit the bytes, windows-1252 and then Latin-1 are tried, as for the header:
    real senders omit MSH-18 and send 8-bit text. A declared MSH-18 that does
    not fit raises :class:`CharsetError` naming the character set.
    """
    start = 3 if payload.startswith(UTF8_BOM) and ascii_compatible(header.codec) else 0
    body = payload[start:] if start else payload
    try:
        return body.decode(header.codec), header.codec
    except UnicodeDecodeError as exc:
        if not header.charset_field and canonical_codec(header.codec) in ("utf-8", "ascii"):
            for codec in FALLBACK_CODECS:
                try:
                    return body.decode(codec), codec
                except UnicodeDecodeError:
                    continue
        if header.charset_field:
            name = f"{header.charset_field} (MSH-18)"
        else:
            name = f"{header.codec} (MSH-18 empty: the sender's default)"
        raise CharsetError(f"message is not valid {name} at byte {start + exc.start}") from None
