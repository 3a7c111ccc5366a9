"""NOT NULL on a table someone may be using, without its scan under the exclusive lock: a CHECK (column IS NOT
NULL) added NOT VALID and validated first, which PostgreSQL then accepts as proof."""

from __future__ import annotations

from psycopg import sql

from .context import Context
from .drafts import POST_NOT_NULL, POST_VALIDATE, Draft
from .nodes import q, short
from .steps import HazardCode


def safe_not_null(ctx: Context, d: Draft, table: str, column: str, *, final: str | None = None) -> list[Draft]:
    """SET NOT NULL (or ``final``: PostgreSQL 18's ADD CONSTRAINT ... NOT NULL) after a CHECK validated
    without the exclusive lock, which spares its scan; the helper CHECK is dropped afterwards."""
    # not "<table>_<col>_not_null": PostgreSQL 18 gives that name to the NOT NULL constraint itself
    parts = d.identity[:2] or tuple(table.split(".", 1))  # (schema, table) from the parse tree: either may hold a dot
    check = short(f"{parts[-1]}_{column}", "notnull_check")
    t, c, k = sql.Identifier(*parts), sql.Identifier(column), sql.Identifier(check)
    helper = (*parts, check)
    return [
        Draft(sql=q("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID", t, k, c),
              kind="add_check_constraint", object=f"{table}.{check}", tables=(table,), original_sql=d.sql,
              rollback_sql=q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", t, k), reversible=True, identity=helper),
        Draft(sql=q("ALTER TABLE {} VALIDATE CONSTRAINT {}", t, k), kind="validate_constraint",
              object=f"{table}.{check}", tables=(table,), isolated=True, rollback_sql="", reversible=True,
              stage=POST_VALIDATE, identity=helper),
        Draft(sql=final or q("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL", t, c), kind="set_not_null",
              object=f"{table}.{column}", tables=(table,), stage=POST_NOT_NULL, identity=d.identity,
              hazards=(ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, "brief exclusive lock: the validated CHECK spares "
                                  "the scan", table),),
              rollback_sql=q("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL", t, c), reversible=True),
        Draft(sql=q("ALTER TABLE {} DROP CONSTRAINT {}", t, k), kind="drop_constraint",
              object=f"{table}.{check}", tables=(table,), rollback_sql="", reversible=True, stage=POST_NOT_NULL,
              identity=helper),
    ]
