"""SQL text cut into statements: where one statement ends and the next begins."""

from __future__ import annotations

import re

import pglast

_ATOMIC_BODY = re.compile(r"\bBEGIN\s+ATOMIC\b", re.IGNORECASE)


def statement_slices(text: str) -> list[slice]:
    """Statement boundaries by the scanner (fast, and the server reports syntax errors at their place), except in a
    text holding SQL-standard bodies (``BEGIN ATOMIC ... END``), whose inner semicolons only the parser can tell
    from the ones that end statements; a text the parser rejects is cut by the scanner, for the server to say why.
    Raises ``pglast.parser.ParseError`` when even the scanner cannot read it (an unterminated quote)."""
    if _ATOMIC_BODY.search(text):
        try:
            return [s for s in pglast.split(text, with_parser=True, only_slices=True) if isinstance(s, slice)]
        except pglast.parser.ParseError:
            pass
    return [s for s in pglast.split(text, with_parser=False, only_slices=True) if isinstance(s, slice)]
