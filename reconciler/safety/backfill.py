"""A column that must become NOT NULL on a table with rows, filled from the row's other columns by its
``-- reconciler: backfill <expression>`` annotation (conversions.py), without holding a lock through the fill:

1. (main transaction) the column added nullable; a trigger that fills it on every insert and update that leaves
   it NULL; a CHECK (column IS NOT NULL) NOT VALID, which new writes (filled by the trigger) already satisfy;
2. (backfill) ``UPDATE ... SET column = expression WHERE column IS NULL``, run by apply in batches of the table's
   pages, each batch its own short transaction (``apply/backfill.py``);
3. the CHECK validated (writes go on), SET NOT NULL spared its scan by it, the CHECK dropped, then the trigger
   and its function dropped: the table ends as the desired schema has it.

The same holds for a column live has already, nullable, that the desired schema makes NOT NULL (a backfill that an
earlier apply could not finish: planning again fills only the rows still NULL). Without an annotation, adding a NOT
NULL column without a default to a table with rows is refused, naming the column and the annotation that would
make it possible.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from pglast import ast, enums
from psycopg import sql

from ..conversions import BACKFILL
from ..errors import RefusedError
from .context import Context
from .drafts import BACKFILL as BACKFILL_STAGE
from .drafts import POST_NOT_NULL, Draft
from .hazards import alter_hazards
from .nodes import deparse, q, walk
from .nodes import expression as parsed
from .not_null import safe_not_null
from .rollback import alter_rollback

KIND = "backfill"  # the step apply runs in batches


def new_not_null_column(ctx: Context, d: Draft, node: ast.AlterTableStmt, table: str,
                        cmds: list[ast.AlterTableCmd]) -> list[Draft] | None:
    """ADD COLUMN ... NOT NULL without a default on a table someone may be using: filled by its annotation, or
    refused when the table has rows. None for any other statement."""
    parsed = added_column(cmds)
    if parsed is None:
        return None
    col, constraints, kinds = parsed
    if enums.ConstrType.CONSTR_NOTNULL not in kinds or kinds & {enums.ConstrType.CONSTR_DEFAULT,
                                                                enums.ConstrType.CONSTR_IDENTITY,
                                                                enums.ConstrType.CONSTR_GENERATED}:
        return None
    column = str(col.colname)
    note = ctx.notes.of(BACKFILL, table, column)
    if note is None:
        size = ctx.size(table)
        if size is not None and size.rows > 0:
            raise RefusedError(
                f"new column {table}.{column}{ctx.notes.where(table, column)} is NOT NULL without a default, and "
                f"{table} has ~{size.rows:,} rows: say what they hold with an annotation on the line above the "
                f"column's definition, '-- reconciler: backfill <expression>' (an expression of the row's other "
                "columns), or give the column a default")
        return None
    col.constraints = tuple(c for c in constraints if enums.ConstrType(int(c.contype or 0)) is not enums.ConstrType.CONSTR_NOTNULL)
    added = alter_rollback(ctx, replace(d, sql=deparse(node), original_sql=d.sql,
                                        hazards=alter_hazards(ctx, table, cmds)), table, cmds)
    return [added, *filled(ctx, d, table, column, note.expression)]


def added_column(cmds: list[ast.AlterTableCmd]
                 ) -> tuple[ast.ColumnDef, list[ast.Constraint], set[enums.ConstrType]] | None:
    """The column an ALTER TABLE's one ADD COLUMN adds, its constraints and their kinds; None for any other."""
    if len(cmds) != 1 or enums.AlterTableType(int(cmds[0].subtype or 0)) is not enums.AlterTableType.AT_AddColumn:
        return None
    col = cmds[0].def_
    if not isinstance(col, ast.ColumnDef):
        return None
    constraints = [c for c in col.constraints or () if isinstance(c, ast.Constraint)]
    return col, constraints, {enums.ConstrType(int(c.contype or 0)) for c in constraints}


def not_null_filled(ctx: Context, d: Draft, table: str, column: str) -> list[Draft] | None:
    """SET NOT NULL on a column with a backfill annotation: its NULL rows filled first. None without one."""
    note = ctx.notes.of(BACKFILL, table, column)
    if note is None:
        return None
    return filled(ctx, d, table, column, note.expression, final=d.sql)


def filled(ctx: Context, d: Draft, table: str, column: str, expression: str, *,
            final: str | None = None) -> list[Draft]:
    """The trigger, the batched fill, the validated NOT NULL (``final``: the statement that sets it, when not the
    plain SET NOT NULL), and the trigger dropped."""
    parts = d.identity[:2] or tuple(table.split(".", 1))
    schema, name = parts[0], parts[-1]
    helper = f"reconciler_fill_{hashlib.sha256(f'{table}.{column}'.encode()).hexdigest()[:8]}"
    t, c = sql.Identifier(*parts), sql.Identifier(column)
    function, trigger = sql.Identifier(schema, helper), sql.Identifier(helper)
    ctx.fill_helpers.update({f"{schema}.{helper}()", f"{table}.{helper}"})  # as the engine's drops name them
    on_row = _on_new_row(expression, {c for (tbl, c) in ctx.facts.columns if tbl == table}
                         | {c for (tbl, c) in ctx.new_or_retyped_columns if tbl == table})
    tag = "reconciler_fill"
    while f"${tag}$" in on_row:
        tag += "_"
    body = f"BEGIN IF NEW.{c.as_string(None)} IS NULL THEN NEW.{c.as_string(None)} := {on_row}; END IF; RETURN NEW; END"
    # OR REPLACE: a run stopped part-way may have left the function and the trigger (they stay, filling new writes,
    # until a plan finishes the fill); the trigger replaced keeps its oid, which tells the next fill that it has been
    # there since the checkpoint it resumes from (apply/backfill.py)
    create_function = (q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT "
                         "AS ", function) + f"${tag}${body}${tag}$")
    drop_function = q("DROP FUNCTION IF EXISTS {}()", function)
    drop_trigger = q("DROP TRIGGER IF EXISTS {} ON {}", trigger, t)
    not_null = safe_not_null(ctx, replace(d, original_sql=d.original_sql or d.sql), table, column, final=final)
    return [
        Draft(sql=create_function, kind="create_function", object=f"{schema}.{helper}()", tables=(), stage=d.stage,
              rollback_sql=drop_function, reversible=True, identity=(schema, helper), helper=True),
        Draft(sql=q("CREATE OR REPLACE TRIGGER {} BEFORE INSERT OR UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()", trigger, t,
                    function),
              kind="create_trigger", object=f"{table}.{helper}", tables=(table,), rollback_sql=drop_trigger,
              reversible=True, identity=(schema, name, helper), helper=True),
        *not_null[:1],  # the CHECK NOT VALID, in the main transaction: new writes, filled by the trigger, obey it
        Draft(sql=q("UPDATE {} SET {} = ", t, c) + expression + q(" WHERE {} IS NULL", c), kind=KIND,
              object=f"{table}.{column}", tables=(table,), transactional=False, stage=BACKFILL_STAGE,
              rollback_sql="", reversible=True, identity=(*parts, column)),
        *not_null[1:],
        Draft(sql=drop_trigger, kind="drop_trigger", object=f"{table}.{helper}", tables=(table,), stage=POST_NOT_NULL,
              rollback_sql="", reversible=True, identity=(schema, name, helper), helper=True),
        Draft(sql=drop_function, kind="drop_function", object=f"{schema}.{helper}()", tables=(), stage=POST_NOT_NULL,
              rollback_sql="", reversible=True, identity=(schema, helper), helper=True),
    ]


def _on_new_row(expression: str, columns: set[str]) -> str:
    """The expression with its bare column names read from the row being written (``NEW.name``); names inside a
    subquery are the subquery's own."""
    tree = parsed(expression)

    def visit(node: ast.Node) -> bool:
        if isinstance(node, ast.ColumnRef):
            fields = node.fields or ()
            if len(fields) == 1 and isinstance(fields[0], ast.String) and str(fields[0].sval) in columns:
                node.fields = (ast.String(sval="new"), fields[0])
        return not isinstance(node, ast.SubLink | ast.ColumnRef)

    walk(tree, visit)
    return deparse(tree)
