"""Renames from the desired SQL's annotations (and the indexes, constraints and sequences named after a renamed
table or column): first of all, undone by the reverse rename; no data moves."""

from __future__ import annotations

from dataclasses import replace

from pglast import ast
from psycopg import sql

from .context import Context
from .drafts import RENAME, Draft
from .nodes import q
from .steps import Hazard, HazardCode

KINDS = frozenset({"rename_table", "rename_column", "rename_index", "rename_sequence", "rename_constraint"})


def rename(ctx: Context, d: Draft, node: ast.RenameStmt, relation: ast.RangeVar) -> Draft:
    schema, name, new, sub = str(relation.schemaname or "public"), str(relation.relname), str(node.newname), str(node.subname)
    table, tables = f"{schema}.{name}", d.tables
    if d.kind in ("rename_table", "rename_index", "rename_sequence"):
        rollback = q("ALTER {} {} RENAME TO {}", sql.SQL(d.kind.removeprefix("rename_").upper()),
                     sql.Identifier(schema, new), sql.Identifier(name))
        if d.kind == "rename_table":
            table, tables = f"{schema}.{new}", (*d.tables, f"{schema}.{new}")
    else:
        rollback = q("ALTER TABLE {} RENAME {} {} TO {}", sql.Identifier(schema, name),
                     sql.SQL(d.kind.removeprefix("rename_").upper()), sql.Identifier(new), sql.Identifier(sub))
    hazards: tuple[Hazard, ...] = ()
    if d.kind in ("rename_table", "rename_column"):
        hazards = (ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, "a brief exclusive lock that waits behind running "
                              "transactions; clients that still use the old name fail", table),)
    elif d.kind != "rename_index":  # ALTER INDEX ... RENAME takes a lighter lock
        hazards = (ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, "a brief exclusive lock that waits behind running "
                              "transactions", table if d.kind == "rename_constraint" else None),)
    return replace(d, tables=tables, hazards=hazards, rollback_sql=rollback, reversible=True, stage=RENAME)
