"""A new NOT NULL column whose default is volatile (``gen_random_uuid()``, ``clock_timestamp()``) on a big table: one
ADD COLUMN would compute the default for every row while it rewrites the table under an exclusive lock. Instead, the
column is added without it (no rewrite), the default is set for the rows written from then on (both in the main
transaction), and the rows already there are filled from the same expression in batches, as a ``backfill``
annotation fills a column (backfill.py: a trigger fills any row an update leaves without a value, then NOT NULL
through a validated CHECK). Each row then holds a value of its own, as the plain ALTER would have given it.

From ``safety.online_rewrite_rows`` rows; a nullable column keeps the plain ALTER (an application's NULL written
meanwhile could not be told apart from a row still to fill), as does one with other constraints.
"""

from __future__ import annotations

from dataclasses import replace

from pglast import ast, enums
from psycopg import sql

from .backfill import added_column, filled
from .context import Context
from .drafts import Draft
from .hazards import alter_hazards, volatile
from .nodes import deparse, q
from .rollback import alter_rollback

_SIMPLE = frozenset({enums.ConstrType.CONSTR_DEFAULT, enums.ConstrType.CONSTR_NOTNULL})


def volatile_default(ctx: Context, d: Draft, node: ast.AlterTableStmt, table: str,
                     cmds: list[ast.AlterTableCmd]) -> list[Draft] | None:
    """The steps, or None where the plain ALTER stays."""
    switches, parsed = ctx.settings.switches, added_column(cmds)
    if not switches.online_rewrites or parsed is None or table in ctx.facts.partitioned:
        return None
    col, constraints, kinds = parsed
    default = next((c.raw_expr for c in constraints
                    if enums.ConstrType(int(c.contype or 0)) is enums.ConstrType.CONSTR_DEFAULT), None)
    size = ctx.size(table)
    if (default is None or kinds != _SIMPLE or col.collClause is not None or not volatile(ctx, default)
            or size is None or size.rows < switches.online_rewrite_rows):
        return None
    column, expression = str(col.colname), deparse(default)
    col.constraints = ()
    added = alter_rollback(ctx, replace(d, sql=deparse(node), original_sql=d.sql,
                                        hazards=alter_hazards(ctx, table, cmds)), table, cmds)
    parts = d.identity[:2] or tuple(table.split(".", 1))
    set_default = Draft(sql=q("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT ", sql.Identifier(*parts),
                              sql.Identifier(column)) + expression, kind="set_default", object=f"{table}.{column}",
                        tables=(table,), rollback_sql="", reversible=True)
    return [added, set_default, *filled(ctx, d, table, column, expression)]
