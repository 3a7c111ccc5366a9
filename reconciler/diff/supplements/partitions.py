"""Partitioned tables: indexes and constraints migra handles as if partitions were plain tables."""

from __future__ import annotations

from psycopg import sql

from ..base import Change
from . import Context, change


def attach_partition_indexes(context: Context, changes: list[Change]) -> list[Change]:
    """migra creates a partitioned table's index ON ONLY the parent and each partition's own index, but
    never attaches them, so the parent index stays INVALID: attach every pair the desired schema has
    where either side is created by this plan."""
    created = {c.object for c in changes if c.kind in ("create_index", "create_index_concurrently")}
    if not created:
        return changes
    pairs = context.desired.execute(
        """SELECT pn.nspname, p.relname, cn.nspname, c.relname
           FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
           JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
           WHERE c.relkind IN ('i', 'I') ORDER BY 1, 2, 3, 4"""
    ).fetchall()
    out = list(changes)
    for parent_schema, parent, child_schema, child in pairs:
        if f"{parent_schema}.{parent}" in created or f"{child_schema}.{child}" in created:
            statement = sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
                sql.Identifier(parent_schema, parent), sql.Identifier(child_schema, child))
            out.append(change(statement, "attach_index_partition", f"{child_schema}.{child}"))
    return out
