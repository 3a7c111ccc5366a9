"""PostgreSQL 18's temporal keys: PRIMARY KEY / UNIQUE (..., period WITHOUT OVERLAPS).

migra adds every primary key and unique constraint as CREATE UNIQUE INDEX then ADD CONSTRAINT ... USING INDEX;
a temporal key's index is a GiST one that only the constraint can build ("access method gist does not support
unique indexes"), so both give way to ADD CONSTRAINT with the key's own definition. Temporal foreign keys
(PERIOD) migra writes from pg_get_constraintdef, as they are.
"""

from __future__ import annotations

from psycopg import sql

from ..base import Change
from . import Context, change, managed

# conperiod is PostgreSQL 18's: read through to_jsonb so the query runs on every version
_QUERY = f"""
SELECT n.nspname, c.relname, con.conname, ic.relname, con.contype::text, pg_get_constraintdef(con.oid)
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class ic ON ic.oid = con.conindid
WHERE con.contype IN ('p', 'u') AND (to_jsonb(con) ->> 'conperiod')::boolean AND {managed('n')}
"""

_ADDS = {"p": "add_primary_key", "u": "add_unique_constraint"}


def temporal_keys(context: Context, changes: list[Change]) -> list[Change]:
    desired = context.rows("desired", _QUERY)
    if not desired:
        return changes
    indexes = {f"{schema}.{index}" for schema, _table, _name, index, _kind, _definition in desired}
    keys = {f"{schema}.{table}.{name}": (schema, table, name, kind, definition)
            for schema, table, name, _index, kind, definition in desired}
    out: list[Change] = []
    for c in changes:
        if c.kind in ("create_index", "create_index_concurrently") and c.object in indexes:
            continue  # built by the constraint itself
        key = keys.get(c.object) if c.kind in _ADDS.values() else None
        if key is not None and " using index " in c.sql.lower():
            schema, table, name, kind, definition = key
            c = change(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                sql.Identifier(schema, table), sql.Identifier(name), sql.SQL(definition)), _ADDS[kind], c.object)
        out.append(c)
    return out
