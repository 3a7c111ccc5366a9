"""The other order for a statement locking several tables. A cut-over locks its tables in the order a single write
takes them (a table holding a foreign key before the table it references); an application whose transaction
writes the referenced table first and the other after takes them in the opposite order. The two then wait for each
other until the cut-over's lock_timeout ends its attempt, and would again on every attempt in the same order: the
next attempt takes them in the application's order instead."""

from __future__ import annotations

import pglast
from pglast import ast
from pglast.stream import RawStream


def other_order(statement: str) -> str | None:
    """``statement`` with its tables locked in the reverse order; None unless it is a LOCK of two tables or more."""
    try:
        (parsed,) = pglast.parse_sql(statement)
    except (pglast.parser.ParseError, ValueError):
        return None
    lock = parsed.stmt
    if not isinstance(lock, ast.LockStmt) or len(tables := tuple(lock.relations or ())) < 2:
        return None
    lock.relations = tables[::-1]
    return str(RawStream()(lock))
