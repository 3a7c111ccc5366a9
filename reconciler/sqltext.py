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
            return _covering(text, [s for s in pglast.split(text, with_parser=True, only_slices=True)
                                    if isinstance(s, slice)])
        except pglast.parser.ParseError:
            pass
    return _covering(text, [s for s in pglast.split(text, with_parser=False, only_slices=True) if isinstance(s, slice)])


_BETWEEN = frozenset({"SQL_COMMENT", "C_COMMENT", "ASCII_59"})  # what may stand between statements: comments and ;


def _covering(text: str, slices: list[slice]) -> list[slice]:
    """The scanner's split stops at a parenthesis never closed and says nothing of the text after it: every statement
    there would be left out of the schema without a word. Any text outside the slices that is more than comments and
    semicolons becomes a statement of its own, for the server to report where it goes wrong."""
    out: list[slice] = []
    start = 0
    for s in [*slices, slice(len(text), len(text))]:
        gap = text[start:s.start]
        if gap.strip() and not _only_separators(gap):
            out.append(slice(start + len(gap) - len(gap.lstrip(" \t\r\n;")), s.start))
        if s.start < s.stop:
            out.append(s)
        start = max(start, s.stop or 0)
    return out


def _only_separators(gap: str) -> bool:
    try:
        return all(token.name in _BETWEEN for token in pglast.parser.scan(gap))
    except pglast.parser.ParseError:
        return False
