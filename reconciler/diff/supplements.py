"""What migra misses, added to its changes. Each supplement reads the desired (shadow) database and
the changes so far, and returns statements to append; rehearsal proves the result converges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from .base import Change

ENGINE = "supplements"


def partition_index_attachments(changes: Sequence[Change], desired: psycopg.Connection[Any]) -> list[Change]:
    """migra creates a partitioned table's index ON ONLY the parent and each partition's own index, but
    never attaches them, so the parent index stays INVALID: attach every pair the desired schema has
    where either side is created by this plan."""
    created = {c.object for c in changes if c.kind in ("create_index", "create_index_concurrently")}
    if not created:
        return []
    pairs = desired.execute(
        """SELECT pn.nspname, p.relname, cn.nspname, c.relname
           FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
           JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
           WHERE c.relkind IN ('i', 'I') ORDER BY 1, 2, 3, 4"""
    ).fetchall()
    out = []
    for parent_schema, parent, child_schema, child in pairs:
        if f"{parent_schema}.{parent}" in created or f"{child_schema}.{child}" in created:
            statement = sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
                sql.Identifier(parent_schema, parent), sql.Identifier(child_schema, child)).as_string(None)
            out.append(Change(sql=statement, kind="attach_index_partition", object=f"{child_schema}.{child}", engine=ENGINE))
    return out


def supplement(changes: Sequence[Change], desired: psycopg.Connection[Any]) -> list[Change]:
    return [*changes, *partition_index_attachments(changes, desired)]
