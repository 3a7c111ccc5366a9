"""migra re-creates views and CHECK constraints whose definitions differ only as PostgreSQL prints them
(see ``reconciler.roundtrip``): after any plan, and on a database built from the original SQL, it would
re-emit them for ever. Those re-creations go; a real change of definition stays, and so does a re-creation
migra asks for with the same text (something the object depends on changes: a function's result type)."""

from __future__ import annotations

from ...roundtrip import RoundTrip
from ..base import Change
from . import Context, managed

_VIEWS = f"""
SELECT n.nspname || '.' || c.relname, pg_get_viewdef(c.oid),
       ARRAY(SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 ORDER BY a.attnum)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'v' AND {managed('n')}
"""

_CHECKS = f"""
SELECT n.nspname || '.' || c.relname || '.' || con.conname, n.nspname, c.relname, pg_get_constraintdef(con.oid)
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'c' AND {managed('n')}
"""

_CONSTRAINT_KINDS = frozenset({"drop_constraint", "add_check_constraint", "validate_constraint"})


def reprinted(context: Context, changes: list[Change]) -> list[Change]:
    """Remove migra's CREATE OR REPLACE VIEW, and its drop, add and validate of a CHECK constraint, where
    the live and the desired definition are one after a round trip."""
    replaced = {c.object for c in changes if c.kind == "replace_view"}
    dropped = {c.object for c in changes if c.kind == "drop_constraint"}
    readded = {c.object for c in changes if c.kind == "add_check_constraint"} & dropped
    if not replaced and not readded:
        return changes
    trip = RoundTrip(context.desired)
    same: set[tuple[str, str]] = set()
    if replaced:
        live, desired = context.keyed(_VIEWS)
        same |= {("view", name) for name in replaced if name in live and name in desired
                 and live[name][0] != desired[name][0] and live[name][1] == desired[name][1]  # same columns
                 and trip.same_view(live[name][0], desired[name][0])}
    if readded:
        live, desired = context.keyed(_CHECKS)
        same |= {("check", name) for name in readded if name in live and name in desired
                 and live[name][2] != desired[name][2]
                 and trip.same_check((desired[name][0], desired[name][1]), live[name][2], desired[name][2])}
    if not same:
        return changes
    return [c for c in changes if not ((("view", c.object) in same and c.kind == "replace_view")
                                       or (("check", c.object) in same and c.kind in _CONSTRAINT_KINDS))]
