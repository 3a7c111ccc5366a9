"""A column type change that rewrites a big table (``int`` to ``bigint``), done as a dual column instead of one ALTER
that blocks reads and writes for the whole rewrite:

1. (main transaction) a new column of the new type, and a trigger that sets it from the old one on every insert and
   update; a CHECK (new IS NOT NULL) NOT VALID when the old column is NOT NULL;
2. (backfill) the new column filled from the old, batch by batch (``apply/backfill.py``); the indexes on the old
   column built again on the new one, CONCURRENTLY; every row checked, batch by batch, to hold the conversion of
   its old value (``verify_copy``): the trigger keeps it so until the cut-over;
3. the CHECK validated; then the cut-over (swap.py), one short transaction under ``lock_timeout`` (retried like any
   phase): the trigger dropped, keys, NOT NULL and the default moved, the old indexes dropped and the new ones given
   their names, the columns renamed, and a trigger that keeps the old column in step from then on;
4. the contract: the old column dropped, a transaction of its own (``apply --hold-contract`` leaves it; until it
   runs, ``reconciler rollback`` swaps back in one short lock: way_back.py).

Only for a widening (an implicit cast: no value can fail to convert, so no write of the application's can fail in the
trigger), where nothing but its default, plain indexes, one-column keys and a sequence it owns depends on the column
(``LiveFacts.busy_columns``: no constraint of more columns, materialized view, policy, trigger column list or
statistics object; an identity moves to the incoming column, going on from where it stopped; views are made again in
the cut-over: cutover_views.py), on a table that is not partitioned, from ``safety.online_rewrite_rows`` rows;
otherwise the plain ALTER stays, with its TABLE_REWRITE hazard. The cut-over and the contract cannot be undone by SQL
in the plan (the plan says so); everything before them can.
"""

from __future__ import annotations

from dataclasses import replace

from pglast import ast, enums
from psycopg import sql

from .backfill import KIND as BACKFILL_KIND
from .backfill import _on_new_row
from .carried_keys import carried_keys
from .context import Context
from .cutover_views import remade_in_cutover
from .drafts import BACKFILL, EXPAND, Draft
from .hazards import references_left_behind, rewrites_type
from .nodes import deparse, q
from .steps import HazardCode
from .swap import Swap, cutover, index_builds, kept_name, not_null_check, tag_of

VERIFY_KIND = "verify_copy"  # apply runs it batch by batch too, and fails on any row found


def dual_column(ctx: Context, d: Draft, node: ast.AlterTableStmt, table: str,
                cmds: list[ast.AlterTableCmd]) -> list[Draft] | None:
    """The steps of a dual-column rewrite, or None where the plain ALTER stays."""
    switches = ctx.settings.switches
    if not switches.online_rewrites or len(cmds) != 1 or table in ctx.facts.partitioned:
        return None
    cmd = cmds[0]
    col = cmd.def_
    if enums.AlterTableType(int(cmd.subtype or 0)) is not enums.AlterTableType.AT_AlterColumnType \
            or not isinstance(col, ast.ColumnDef) or col.typeName is None:
        return None
    column = str(cmd.name)
    size, fact = ctx.size(table), ctx.facts.columns.get((table, column))
    if size is None or size.rows < switches.online_rewrite_rows or fact is None \
            or (table, column) in ctx.facts.busy_columns or not rewrites_type(ctx, table, column, col) \
            or not _widening(ctx, fact.type_oid, col) or not remade_in_cutover(ctx, table, column):
        return None
    parts = d.identity[:2] or tuple(table.split(".", 1))
    schema, name = parts[0], parts[-1]
    tag = tag_of(table, column)
    keys = carried_keys(ctx, table, column, tag)
    if keys is None:
        return None
    new, old, helper = f"reconciler_new_{tag}", kept_name(column, tag), f"reconciler_copy_{tag}"
    t, c, n = sql.Identifier(*parts), sql.Identifier(column), sql.Identifier(new)
    function, trigger = sql.Identifier(schema, helper), sql.Identifier(helper)
    type_sql = deparse(col.typeName)
    conversion = deparse(col.raw_default) if col.raw_default is not None else f"{c.as_string(None)}::{type_sql}"
    on_row = _on_new_row(conversion, {c for (tbl, c) in ctx.facts.columns if tbl == table})
    dollar = "reconciler_copy"
    while f"${dollar}$" in on_row:
        dollar += "_"
    drop_trigger = q("DROP TRIGGER IF EXISTS {} ON {}", trigger, t)
    drop_function = q("DROP FUNCTION IF EXISTS {}()", function)
    check_name, check_drafts, validate = not_null_check(ctx, table, parts, new)
    # what a run stopped part-way may have left, as the engine's drops name them: made again here, not dropped
    ctx.fill_helpers.update({f"{schema}.{helper}()", f"{table}.{helper}", f"{table}.{new}", f"{table}.{check_name}"})
    out = [
        Draft(sql=q("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} ", t, n) + type_sql, kind="add_column", object=f"{table}.{new}",
              tables=(table,), original_sql=d.sql, rollback_sql=q("ALTER TABLE {} DROP COLUMN IF EXISTS {}", t, n),
              reversible=True, identity=(*parts, new), helper=True,
              hazards=(ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, f"a brief exclusive lock to add the new column "
                                  f"beside {column} (no rewrite: its rows are filled in batches)", table),
                       *references_left_behind(ctx, table, column, col))),
        Draft(sql=q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS ",
                    function) + f"${dollar}$BEGIN NEW.{n.as_string(None)} := {on_row}; RETURN NEW; END${dollar}$",
              kind="create_function", object=f"{schema}.{helper}()", tables=(), rollback_sql=drop_function,
              reversible=True, identity=(schema, helper), helper=True),
        # on every update (not UPDATE OF the old column): a row updated before it is filled would break the CHECK;
        # called only where the new column does not hold the conversion already (not for the fill's own UPDATE: it
        # goes about a fifth faster, and so does every write once its row is filled)
        Draft(sql=q("CREATE OR REPLACE TRIGGER {} BEFORE INSERT OR UPDATE ON {} FOR EACH ROW WHEN (NEW.{} IS DISTINCT "
                    "FROM (", trigger, t, n) + on_row + q(")) EXECUTE FUNCTION {}()", function),
              kind="create_trigger", object=f"{table}.{helper}", tables=(table,),
              rollback_sql=drop_trigger, reversible=True, identity=(schema, name, helper), helper=True),
    ]
    if fact.not_null:
        out += check_drafts
    out = [replace(d, stage=EXPAND, group=f"expand {table}") for d in out]  # a transaction of the table's own
    out.append(Draft(sql=q("UPDATE {} SET {} = ", t, n) + conversion + q(" WHERE {} IS DISTINCT FROM ", n)
                     + f"({conversion})", kind=BACKFILL_KIND, object=f"{table}.{new}", tables=(table,),
                     transactional=False, stage=BACKFILL, rollback_sql="", reversible=True, identity=(*parts, new),
                     helper=True))
    swap = Swap(table=table, parts=parts, column=column, incoming=new, outgoing=old, tag=tag, not_null=fact.not_null,
                default=fact.default, check=check_name if fact.not_null else None, keys=keys, stop_trigger=drop_trigger,
                stop_function=drop_function, keep_in_step=fact.type,
                sequence=ctx.facts.owned_sequences.get((table, column)), identity=ctx.facts.identities.get((table, column)))
    if swap.identity:  # the identity's new options (sequences.py's ALTER), set on the one the cut-over makes
        ctx.cutover_identities.add((table, column))
    builds, renamed = index_builds(ctx, swap)
    out += builds
    out.append(Draft(sql=q("SELECT count(*) FROM {} WHERE {} IS DISTINCT FROM ", t, n) + f"({conversion})",
                     kind=VERIFY_KIND, object=f"{table}.{new}", tables=(table,), transactional=False, stage=BACKFILL,
                     rollback_sql="", reversible=True, identity=(*parts, new), helper=True))
    if fact.not_null:
        out.append(validate)
    return out + cutover(ctx, swap, renamed, "the cut-over")


def _widening(ctx: Context, source: int, col: ast.ColumnDef) -> bool:
    """Can no value fail to convert (an implicit cast: int4 to int8, int to numeric, float4 to float8), with no
    conversion of the schema's own (a ``using`` annotation)? The trigger converts every write the application makes
    while the fill runs: a conversion that can fail would fail the application's writes instead of the plan."""
    if col.raw_default is not None and not (isinstance(col.raw_default, ast.TypeCast)
                                            and isinstance(col.raw_default.arg, ast.ColumnRef)):
        return False  # an annotation's expression
    target = ctx.type_oid(col.typeName)
    return target is not None and (source, target) in ctx.facts.implicit_casts
