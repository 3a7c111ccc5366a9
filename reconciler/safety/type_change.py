"""A column's type change on a table with rows: PostgreSQL converts each value by an implicit or assignment cast
when there is one; otherwise how values convert is the desired schema's to say, with a ``-- reconciler: using``
annotation (conversions.py), and a plan without one is refused rather than guessing (migra writes ``col::type``, an
explicit cast that may mean something else or fail on the rows there)."""

from __future__ import annotations

from dataclasses import replace

from pglast import ast, enums

from ..conversions import USING
from ..errors import RefusedError
from .context import Context
from .drafts import Draft
from .nodes import deparse, expression


def converted(ctx: Context, d: Draft, node: ast.AlterTableStmt, table: str) -> Draft:
    """The draft with each type change's USING taken from its annotation; refused when a change on a table with
    rows has no implicit cast and no annotation."""
    changed = False
    for cmd in node.cmds or ():
        if not (isinstance(cmd, ast.AlterTableCmd) and isinstance(cmd.def_, ast.ColumnDef)
                and enums.AlterTableType(int(cmd.subtype or 0)) is enums.AlterTableType.AT_AlterColumnType):
            continue
        column = str(cmd.name)
        note = ctx.notes.of(USING, table, column)
        if note is not None:
            cmd.def_.raw_default = expression(note.expression)
            changed = True
            continue
        missing = _no_implicit_cast(ctx, table, column, cmd.def_)
        if missing is not None:
            raise RefusedError(
                f"the type of column {table}.{column} changes from {missing[0]} to {missing[1]}{ctx.notes.where(table, column)}, "
                "which has no implicit cast: say how each value converts with an annotation "
                f"on the line above the column's definition, e.g. '-- reconciler: using {column}::{missing[1]}', or "
                "an expression of the column's old value")
    if not changed:
        return d
    return replace(d, sql=deparse(node), original_sql=d.original_sql or d.sql)


def _no_implicit_cast(ctx: Context, table: str, column: str, col: ast.ColumnDef) -> tuple[str, str] | None:
    """(old type, new type) when the change needs a conversion the schema must give: both types known plain types
    (not arrays or domains, whose casts go through their elements and base types: those are left to the
    rehearsal), different, with no binary-coercible, implicit or assignment cast between them nor a string type as
    the target, and either rows in the table or no cast at all (migra's ``::`` would not even parse to a plan
    that runs). None otherwise."""
    current = ctx.facts.columns.get((table, column))
    if current is None or col.typeName is None or col.typeName.arrayBounds or current.type.endswith("[]"):
        return None
    target = ctx.type_oid(col.typeName)
    source = current.type_oid
    if target is None or target == source or target in ctx.facts.domain_types or source in ctx.facts.domain_types:
        return None
    facts = ctx.facts
    if target in facts.string_types or (source, target) in facts.binary_coercible or (source, target) in facts.assignment_casts:
        return None
    size = ctx.size(table)
    has_rows = size is not None and size.rows > 0
    explicit = (source, target) in facts.explicit_casts or source in facts.string_types  # text::T: input function
    if not has_rows and explicit:
        return None
    return current.type, deparse(col.typeName)
