"""English and Spanish given-name nicknames (``nicknames.csv`` beside this module).

"Liz" and "Elizabeth" are the same name to a registration clerk but far
apart to Jaro-Winkler, so given names are also compared by the formal names
they stand for. A nickname may stand for several formal names ("al": alan,
albert, alexander, alfred ...); two given names agree by nickname when their
sets of formal names share one.
"""
from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def nickname_table() -> dict[str, tuple[str, ...]]:
    """nickname -> formal names, read once from the package data file."""
    table: dict[str, set[str]] = {}
    text = resources.files("exchange.matching").joinpath("nicknames.csv").read_text("utf-8")
    rows = csv.reader(line for line in text.splitlines() if line and not line.startswith("#"))
    next(rows)  # header: formal,nickname
    for formal, nickname in rows:
        table.setdefault(nickname.strip(), set()).add(formal.strip())
    return {nick: tuple(sorted(formals)) for nick, formals in table.items()}


@lru_cache(maxsize=65536)
def canonical_given_names(given: str) -> tuple[str, ...]:
    """The formal names ``given`` may stand for, itself included; () for ''.

    ``given`` is already folded (lower case ASCII, one word).
    """
    if not given:
        return ()
    formals = nickname_table().get(given, ())
    return tuple(sorted({given, *formals}))
