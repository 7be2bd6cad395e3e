"""A fast, lazy HL7 v2 message reader over already decoded text.

``Message(text, delimiters)`` splits the text into segment lines once (CR, LF
or CRLF); a segment's fields are split only when the segment is asked for,
and a field's components only when they are asked for. Field numbers are the
standard's (1-based): ``seg.field(3)`` is PID-3, and for MSH field 1 is the
field separator itself, so ``msh.field(9)`` is MSH-9.

Accessors return raw text (escape sequences intact); ``value()`` and
``unescape()`` decode escapes. Nothing here raises on malformed input: a
missing field, repetition or component is "".

Pure: no Twisted, no SQLAlchemy.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field as _dc_field

from exchange.hl7.header import DEFAULT_DELIMITERS, Delimiters

__all__ = [
    "HL7_NULL",
    "Message",
    "Segment",
    "escape",
    "is_delete",
    "unescape",
]

HL7_NULL = '""'  # the HL7 null: "delete this value" (an empty field means "no change")


def is_delete(value: str) -> bool:
    """True when ``value`` is the HL7 null ``""`` (delete), surrounding spaces ignored."""
    return value == HL7_NULL or (len(value) > 2 and value.strip() == HL7_NULL)


_LINE_SPLIT = re.compile(r"\r\n|\r|\n")
_NONE: list[int] = []  # shared "no such segment" (never mutated)


class Message:
    """A decoded HL7 message, split into segment lines and nothing more.

    ``codec`` is the Python codec the message was decoded with; ``\\Xhh\\``
    escapes are decoded with it.
    """

    __slots__ = ("text", "delimiters", "codec", "_lines", "_cache", "_index")

    def __init__(self, text: str, delimiters: Delimiters = DEFAULT_DELIMITERS, codec: str = "utf-8"):
        self.text = text
        self.delimiters = delimiters
        self.codec = codec
        if text.startswith("\ufeff"):
            text = text[1:]
        if "\n" in text:
            lines = _LINE_SPLIT.split(text)
        else:
            lines = text.split("\r")
        # Keep non-blank lines; leading whitespace before a segment name is junk.
        self._lines: list[str] = [
            ln if ln[:1] > " " else ln.lstrip() for ln in lines if ln and not ln.isspace()
        ]
        self._cache: dict[int, Segment] = {}
        self._index: dict[str, list[int]] | None = None

    def _indices(self, name: str) -> list[int] | None:
        """Indices of the lines whose name (text before the first field separator) is ``name``.

        None when ``name`` contains the separator (the caller scans instead).
        """
        sep = self.delimiters.field
        if sep in name:
            return None
        index = self._index
        if index is None:
            index = {}
            for i, ln in enumerate(self._lines):
                key = ln.partition(sep)[0]
                found = index.get(key)
                if found is None:
                    index[key] = [i]
                else:
                    found.append(i)
            self._index = index
        return index.get(name, _NONE)

    def __len__(self) -> int:
        return len(self._lines)

    def _segment(self, index: int) -> Segment:
        seg = self._cache.get(index)
        if seg is None:
            line = self._lines[index]
            same = self._indices(line.partition(self.delimiters.field)[0])
            occurrence = same.index(index) + 1 if same and same[0] != index else 1
            seg = Segment.parse(line, self.delimiters, self.codec, occurrence)
            self._cache[index] = seg
        return seg

    def names(self) -> list[str]:
        """Segment names in order (cheap: no field is split)."""
        return [ln[:3] for ln in self._lines]

    def body_digest(self, kind: str) -> str:
        """A digest of every segment after MSH, with ``kind`` (MSH-9): two messages with the same
        one say the same thing, whatever their MSH-7 and MSH-10 (an engine's resend)."""
        text = kind + "\r" + "\r".join(self._lines[1:])
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()

    def all(self) -> list[Segment]:
        return [self._segment(i) for i in range(len(self._lines))]

    def segments(self, name: str) -> list[Segment]:
        """Every segment called ``name``, in order."""
        found = self._indices(name)
        if found is not None:
            return [self._segment(i) for i in found]
        sep = self.delimiters.field
        return [
            self._segment(i)
            for i, ln in enumerate(self._lines)
            if ln.startswith(name) and (len(ln) == len(name) or ln[len(name)] == sep)
        ]

    def first(self, name: str) -> Segment | None:
        found = self._indices(name)
        if found is not None:
            return self._segment(found[0]) if found else None
        sep = self.delimiters.field
        for i, ln in enumerate(self._lines):
            if ln.startswith(name) and (len(ln) == len(name) or ln[len(name)] == sep):
                return self._segment(i)
        return None

    def index_of(self, segment: Segment) -> int:
        """Position of ``segment`` (as returned by this message) among all segments, or -1."""
        for i, seg in self._cache.items():
            if seg is segment:
                return i
        return -1

    def after(self, segment: Segment, name: str) -> list[Segment]:
        """Segments called ``name`` that come after ``segment``."""
        start = self.index_of(segment)
        found = self._indices(name)
        if found is not None:
            return [self._segment(i) for i in found if i > start]
        sep = self.delimiters.field
        return [
            self._segment(i)
            for i in range(start + 1, len(self._lines))
            if self._lines[i].startswith(name)
            and (len(self._lines[i]) == len(name) or self._lines[i][len(name)] == sep)
        ]


@dataclass(frozen=True, slots=True, eq=False)
class Segment:
    """One segment; ``fields[n]`` is field n as the standard numbers it."""

    name: str
    fields: tuple[str, ...]
    delimiters: Delimiters = DEFAULT_DELIMITERS
    codec: str = "utf-8"
    # True when the segment has no escape character at all (``text`` is then the identity);
    # False means "not known", never "has escapes".
    plain: bool = _dc_field(default=False, compare=False, repr=False)
    # Per-segment memo of values read from it (readers share them: needs() and map_message()).
    memo: dict = _dc_field(default_factory=dict, compare=False, repr=False)
    # Which segment of its name in its message (1: the first PID, 2: the second of an A17, ...).
    occurrence: int = _dc_field(default=1, compare=False, repr=False)

    def where(self, n: int) -> str:
        """Field ``n`` of this segment as a problem's location: "PID-3", or "PID(2)-3" for the
        second PID of its message (ERR-2's set ID)."""
        return f"{self.name}-{n}" if self.occurrence == 1 else f"{self.name}({self.occurrence})-{n}"

    @classmethod
    def parse(cls, line: str, delimiters: Delimiters = DEFAULT_DELIMITERS, codec: str = "utf-8",
              occurrence: int = 1) -> Segment:
        sep = delimiters.field
        parts = line.split(sep)
        name = parts[0].strip()
        if name == "MSH" or name == "BHS" or name == "FHS":
            parts.insert(1, sep)  # MSH-1 is the separator itself
        return cls(name, tuple(parts), delimiters, codec, delimiters.escape not in line, occurrence=occurrence)

    def __len__(self) -> int:
        """Number of the last field present."""
        return len(self.fields) - 1

    def field(self, n: int) -> str:
        """Field n (1-based), raw, all repetitions; "" when absent."""
        f = self.fields
        return f[n] if 0 < n < len(f) else ""

    def repetitions(self, n: int) -> list[str]:
        """The repetitions of field n (raw); [] when the field is empty."""
        value = self.field(n)
        if not value:
            return []
        if self.name == "MSH" and n <= 2:
            return [value]
        return value.split(self.delimiters.repetition)

    def components(self, n: int, repetition: int = 1) -> list[str]:
        """The components of field n, repetition ``repetition`` (1-based); raw."""
        value = self.field(n)
        if not value:
            return []
        if self.name == "MSH" and n <= 2:
            return [value]
        rep = self.delimiters.repetition
        if rep in value:
            reps = value.split(rep)
            if repetition > len(reps):
                return []
            value = reps[repetition - 1]
        elif repetition != 1:
            return []
        return value.split(self.delimiters.component)

    def component(self, n: int, c: int = 1, repetition: int = 1) -> str:
        """Component c of field n (raw); "" when absent."""
        comps = self.components(n, repetition)
        return comps[c - 1] if 0 < c <= len(comps) else ""

    def subcomponents(self, n: int, c: int = 1, repetition: int = 1) -> list[str]:
        value = self.component(n, c, repetition)
        return value.split(self.delimiters.subcomponent) if value else []

    def value(self, n: int, c: int = 1, s: int = 1, repetition: int = 1) -> str:
        """Field n, component c, subcomponent s, unescaped and stripped."""
        if c == 1 and s == 1 and repetition == 1 and (n > 2 or self.name != "MSH"):
            # Fast path (the common call): the first component of the first repetition.
            f = self.fields
            value = f[n] if 0 < n < len(f) else ""
            if not value:
                return ""
            d = self.delimiters
            value = value.partition(d.repetition)[0].partition(d.component)[0].partition(d.subcomponent)[0]
            if not value:
                return ""
            if self.plain:
                return value.strip()
            return unescape(value, d, self.codec).strip()
        value = self.component(n, c, repetition)
        if value and self.delimiters.subcomponent in value:
            parts = value.split(self.delimiters.subcomponent)
            value = parts[s - 1] if 0 < s <= len(parts) else ""
        elif s != 1:
            return ""
        return unescape(value, self.delimiters, self.codec).strip() if value else ""

    def text(self, raw: str) -> str:
        """Unescape a piece of this segment (any level)."""
        if self.plain or self.delimiters.escape not in raw:
            return raw
        return unescape(raw, self.delimiters, self.codec)


# --- escapes -----------------------------------------------------------------

_HEX = frozenset("0123456789abcdefABCDEF")


def unescape(text: str, delimiters: Delimiters = DEFAULT_DELIMITERS, codec: str = "utf-8") -> str:
    """Decode HL7 escape sequences in ``text``.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` are the delimiters, ``\\P\\`` the
    truncation character, ``\\Xhh..\\`` bytes in the message's charset (UTF-8
    that does not decode falls back to latin-1), ``\\.br\\`` a line break;
    ``\\H\\`` and ``\\N\\`` (highlighting) are dropped. Unknown or unterminated
    escapes are kept literally. Never raises.
    """
    esc = delimiters.escape
    if esc not in text:
        return text
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        j = text.find(esc, i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        k = text.find(esc, j + 1)
        if k < 0:  # unterminated: literal
            out.append(text[j:])
            break
        seq = text[j + 1 : k]
        rep = _escape_value(seq, delimiters, codec)
        if rep is None:
            # Unknown: keep the opening escape literally and go on after it,
            # so that the closing character may open the next sequence.
            out.append(text[j : k])
            i = k
            continue
        out.append(rep)
        i = k + 1
    return "".join(out)


def _escape_value(seq: str, d: Delimiters, codec: str) -> str | None:
    if len(seq) == 1:
        c = seq
        if c == "F":
            return d.field
        if c == "S":
            return d.component
        if c == "T":
            return d.subcomponent
        if c == "R":
            return d.repetition
        if c == "E":
            return d.escape
        if c == "P":
            return d.truncation or "#"
        if c == "H" or c == "N":
            return ""
        return None
    if seq == ".br":
        return "\n"
    if seq[:1] == "X" and len(seq) > 1 and len(seq) % 2 == 1 and all(ch in _HEX for ch in seq[1:]):
        data = bytes.fromhex(seq[1:])
        try:
            return data.decode(codec)
        except (UnicodeDecodeError, LookupError):
            return data.decode("latin-1")
    return None


def escape(text: str, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Escape ``text`` so that :func:`unescape` gives it back exactly.

    Delimiters become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ (\\P\\)``, LF ``\\.br\\``
    and CR ``\\X0D\\``.
    """
    d = delimiters
    e = d.escape
    table = {
        d.escape: f"{e}E{e}",
        d.field: f"{e}F{e}",
        d.component: f"{e}S{e}",
        d.subcomponent: f"{e}T{e}",
        d.repetition: f"{e}R{e}",
        "\n": f"{e}.br{e}",
        "\r": f"{e}X0D{e}",
    }
    if d.truncation:
        table[d.truncation] = f"{e}P{e}"
    return "".join(table.get(ch, ch) for ch in text)
