"""Table inheritance (``CREATE TABLE child (...) INHERITS (parent)``), which migra gets wrong in two ways.

Its CREATE TABLE of a child restates every inherited column as a column of the child's own: PostgreSQL then
records those columns as local as well as inherited (``attislocal``), a catalog state the desired database does
not have, and one that changes what ``NO INHERIT`` and ``DROP COLUMN`` on the parent later do. The child is created
here with only the columns the desired database has as local ones (a column both local and inherited stays,
and is merged with the parent's as it was there), and with all its parents in their order (schemainspect reads one:
see ``inspector``). And it creates tables in name order, a child before its parent: a child is moved to right after
the last of its parents the plan creates.

A table that gains or loses parents is refused: ``ALTER TABLE ... INHERIT`` leaves the columns local (a table
created with INHERITS has them inherited only), and migra's statements around it drop inherited columns.
Partitions are the partitions supplement's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.stream import RawStream

from ...errors import ReconcilerError
from ..base import Change
from . import Context, change, managed, not_extension_member

# tables with parents (not partitions): parents in their order (schemas, names), and the columns the table has
# only by inheritance
_PARENTS = """ARRAY(SELECT {part} FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
             JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE i.inhrelid = c.oid ORDER BY i.inhseqno)"""
_CHILDREN = f"""
SELECT n.nspname || '.' || c.relname, c.oid::int,
       {_PARENTS.format(part="pn.nspname::text")}, {_PARENTS.format(part="p.relname::text")},
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND NOT a.attislocal ORDER BY a.attnum)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND NOT c.relispartition AND {managed('n')} AND {not_extension_member('pg_class', 'c.oid')}
  AND EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)
"""

# every ordinary table: a table migra does not create is one live has
_TABLES = f"""
SELECT n.nspname || '.' || c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND NOT c.relispartition AND {managed('n')} AND {not_extension_member('pg_class', 'c.oid')}
"""


@dataclass(frozen=True)
class Child:
    oid: int
    parents: tuple[tuple[str, str], ...]  # (schema, name), in their order
    inherited: frozenset[str]  # the columns it has only from its parents

    @property
    def parent_names(self) -> tuple[str, ...]:
        return tuple(f"{schema}.{name}" for schema, name in self.parents)


def _children(context: Context, side: str) -> dict[str, Child]:
    return {name: Child(int(oid), tuple(zip(schemas, names, strict=True)), frozenset(inherited))
            for name, oid, schemas, names, inherited in context.rows(side, _CHILDREN)}


def _local_only(statement: str, child: Child) -> str:
    """migra's CREATE TABLE without the columns the child has only from its parents, and with all its parents."""
    node = pglast.parse_sql(statement)[0].stmt
    if not isinstance(node, ast.CreateStmt) or not node.inhRelations:
        raise ReconcilerError(f"expected a CREATE TABLE ... INHERITS, got: {statement[:200]}")
    node.tableElts = tuple(e for e in node.tableElts or ()
                           if not (isinstance(e, ast.ColumnDef) and e.colname in child.inherited))
    node.inhRelations = tuple(ast.RangeVar(schemaname=schema, relname=name, inh=True, relpersistence="p")
                              for schema, name in child.parents)
    return str(RawStream()(node))


def inherited_tables(context: Context, changes: list[Change]) -> list[Change]:
    desired, live = _children(context, "desired"), _children(context, "live")
    live_tables = {r[0] for r in context.rows("live", _TABLES)}
    for name in sorted(live_tables & {r[0] for r in context.rows("desired", _TABLES)}):
        before = live[name].parent_names if name in live else ()
        after = desired[name].parent_names if name in desired else ()
        if before != after:
            raise ReconcilerError(
                f"table {name}: its parents change from ({', '.join(before) or 'none'}) to ({', '.join(after) or 'none'}), "
                "which is not supported yet (ALTER TABLE ... INHERIT leaves the inherited columns local to the table, "
                "unlike CREATE TABLE ... INHERITS); create the table anew")
    created = {c.object: i for i, c in enumerate(changes) if c.kind == "create_table"}
    children = sorted((child.oid, name, child) for name, child in desired.items()
                      if name in created and name not in live_tables)
    if not children:
        return changes
    out = list(changes)
    for _oid, name, child in children:  # parents before children: the desired database's order
        at = next(i for i, c in enumerate(out) if c.kind == "create_table" and c.object == name)
        mine = out.pop(at)
        mended = change(_local_only(mine.sql, child), mine.kind, mine.object)
        after_parents = [i for i, c in enumerate(out) if c.kind == "create_table" and c.object in child.parent_names]
        out.insert(max(after_parents) + 1 if after_parents and max(after_parents) >= at else at, mended)
    return out
