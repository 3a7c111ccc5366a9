"""A column type change that rewrites a big table (``int`` to ``bigint``), done as a dual column instead of one ALTER
that blocks reads and writes for the whole rewrite:

1. (main transaction) a new column of the new type, and a trigger that sets it from the old one on every insert and
   update; a CHECK (new IS NOT NULL) NOT VALID when the old column is NOT NULL;
2. (backfill) the new column filled from the old, batch by batch (``apply/backfill.py``); the indexes on the old
   column built again on the new one, CONCURRENTLY; every row checked, batch by batch, to hold the conversion of
   its old value (``verify_copy``): the trigger keeps it so until the cut-over;
3. the CHECK validated; then the cut-over, one short transaction under ``lock_timeout`` (retried like any phase): the
   trigger dropped, NOT NULL and the default moved, the old indexes dropped and the new ones given their names, the
   columns renamed; then the old column dropped in a transaction of its own.

Only for a widening (an implicit cast: no value can fail to convert, so no write of the application's can fail in the
trigger), where nothing but its default and plain indexes depends on the column (``LiveFacts.busy_columns``: no
constraint, view, policy, trigger column list, owned sequence or statistics object), on a table that is not
partitioned, from ``safety.online_rewrite_rows`` rows; otherwise the plain ALTER stays, with its TABLE_REWRITE hazard.
The cut-over and the drop of the old column cannot be undone by SQL (the plan says so); everything before them can.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pglast
from pglast import ast, enums
from psycopg import sql

from .backfill import KIND as BACKFILL_KIND
from .backfill import _on_new_row
from .carried_keys import CarriedKeys, added, carried_keys, dropped, validations
from .context import Context
from .drafts import BACKFILL, CUTOVER, EXPAND, POST_CUTOVER, POST_VALIDATE, Draft
from .hazards import rewrites_type
from .indexes import index_columns
from .nodes import deparse, names, q, short, walk
from .steps import HazardCode

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
            or not _widening(ctx, fact.type_oid, col):
        return None
    parts = d.identity[:2] or tuple(table.split(".", 1))
    schema, name = parts[0], parts[-1]
    tag = hashlib.sha256(f"{table}.{column}".encode()).hexdigest()[:8]
    keys = carried_keys(ctx, table, column, tag)
    if keys is None:
        return None
    new, old, helper = f"reconciler_new_{tag}", short(f"{column}_reconciler_old", tag), f"reconciler_copy_{tag}"
    t, c, n = sql.Identifier(*parts), sql.Identifier(column), sql.Identifier(new)
    function, trigger = sql.Identifier(schema, helper), sql.Identifier(helper)
    type_sql = deparse(col.typeName)
    conversion = deparse(col.raw_default) if col.raw_default is not None else f"{c.as_string(None)}::{type_sql}"
    on_row = _on_new_row(conversion, {c for (tbl, c) in ctx.facts.columns if tbl == table})
    dollar = "reconciler_copy"
    while f"${dollar}$" in on_row:
        dollar += "_"
    check = sql.Identifier(short(f"{name}_{new}", "notnull"))  # (its name again below, as check_name)
    indexes = [(index, f) for index, f in sorted(ctx.facts.indexes.items())
               if f.table == table and not f.backs_constraint and column in _columns_of(f.definition)]
    drop_trigger = q("DROP TRIGGER IF EXISTS {} ON {}", trigger, t)
    drop_function = q("DROP FUNCTION IF EXISTS {}()", function)
    check_name = short(f"{name}_{new}", "notnull")
    # what a run stopped part-way may have left, as the engine's drops name them: made again here, not dropped
    ctx.fill_helpers.update({f"{schema}.{helper}()", f"{table}.{helper}", f"{table}.{new}", f"{table}.{check_name}"})
    out = [
        Draft(sql=q("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} ", t, n) + type_sql, kind="add_column", object=f"{table}.{new}",
              tables=(table,), original_sql=d.sql, rollback_sql=q("ALTER TABLE {} DROP COLUMN IF EXISTS {}", t, n),
              reversible=True, identity=(*parts, new), helper=True,
              hazards=(ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, f"a brief exclusive lock to add the new column "
                                  f"beside {column} (no rewrite: its rows are filled in batches)", table),)),
        Draft(sql=q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS ",
                    function) + f"${dollar}$BEGIN NEW.{n.as_string(None)} := {on_row}; RETURN NEW; END${dollar}$",
              kind="create_function", object=f"{schema}.{helper}()", tables=(), rollback_sql=drop_function,
              reversible=True, identity=(schema, helper), helper=True),
        # on every update (not UPDATE OF the old column): a row updated before it is filled would break the CHECK
        Draft(sql=q("CREATE OR REPLACE TRIGGER {} BEFORE INSERT OR UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()", trigger, t,
                    function), kind="create_trigger", object=f"{table}.{helper}", tables=(table,),
              rollback_sql=drop_trigger, reversible=True, identity=(schema, name, helper), helper=True),
    ]
    if fact.not_null:
        out.append(Draft(sql=q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", t, check), kind="drop_constraint",
                         object=f"{table}.{check_name}", tables=(table,), rollback_sql="", reversible=True,
                         identity=(*parts, check_name), helper=True))
        out.append(Draft(sql=q("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID", t, check, n),
                         kind="add_check_constraint", object=f"{table}.{check.as_string(None)}", tables=(table,),
                         rollback_sql=q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", t, check), reversible=True,
                         identity=(*parts, check_name), helper=True))
    out = [replace(d, stage=EXPAND, group=f"expand {table}") for d in out]  # a transaction of the table's own
    out.append(Draft(sql=q("UPDATE {} SET {} = ", t, n) + conversion + q(" WHERE {} IS DISTINCT FROM ", n)
                     + f"({conversion})", kind=BACKFILL_KIND, object=f"{table}.{new}", tables=(table,),
                     transactional=False, stage=BACKFILL, rollback_sql="", reversible=True, identity=(*parts, new),
                     helper=True))
    built = []
    for index, definition, temporary in [(index, f.definition, short(f"{index.split('.', 1)[1]}", tag))
                                         for index, f in indexes] + [
                                         (str(key.index), definition, temporary)
                                         for key, definition, temporary in keys.indexes]:
        if index not in (str(key.index) for key in keys.own):
            built.append((index, temporary))
        ctx.fill_helpers.add(f"{schema}.{temporary}")
        out.append(Draft(sql=_index_on(definition, column, new, temporary), kind="create_index_concurrently",
                         object=f"{schema}.{temporary}", tables=(table,), transactional=False, stage=BACKFILL,
                         index_name=f"{schema}.{temporary}", rollback_sql=q("DROP INDEX CONCURRENTLY IF EXISTS {}",
                                                                            sql.Identifier(schema, temporary)),
                         reversible=True, identity=(schema, temporary), helper=True))
    out.append(Draft(sql=q("SELECT count(*) FROM {} WHERE {} IS DISTINCT FROM ", t, n) + f"({conversion})",
                     kind=VERIFY_KIND, object=f"{table}.{new}", tables=(table,), transactional=False, stage=BACKFILL,
                     rollback_sql="", reversible=True, identity=(*parts, new), helper=True))
    if fact.not_null:
        out.append(Draft(sql=q("ALTER TABLE {} VALIDATE CONSTRAINT {}", t, check), kind="validate_constraint",
                         object=f"{table}.{check.as_string(None)}", tables=(table,), isolated=True, stage=POST_VALIDATE,
                         rollback_sql="", reversible=True, identity=(*parts, short(f"{name}_{new}", "notnull")),
                         helper=True))
    out += _cutover(ctx, table, parts, column, new, old, fact.not_null, fact.default, check, built, keys,
                    drop_trigger, drop_function)
    return out


def _cutover(ctx: Context, table: str, parts: tuple[str, ...], column: str, new: str, old: str, not_null: bool,
             default: str | None, check: sql.Identifier, built: list[tuple[str, str]], keys: CarriedKeys,
             drop_trigger: str, drop_function: str) -> list[Draft]:
    t, c, n, o = sql.Identifier(*parts), sql.Identifier(column), sql.Identifier(new), sql.Identifier(old)
    schema = parts[0]
    order = keys.locked(table)
    others = tuple(name for name in order if name != table)
    locked = sql.SQL(", ").join(sql.Identifier(*name.split(".", 1)) for name in order)
    statements = [q("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", locked), drop_trigger, drop_function, *dropped(keys)]
    if not_null:  # writes after the cut-over leave the old column out
        statements.append(q("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL", t, c))
    if default:
        statements.append(q("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT", t, c))
    statements += [q("DROP INDEX {}", sql.Identifier(*index.split(".", 1))) for index, _temporary in built]
    statements += [q("ALTER TABLE {} RENAME COLUMN {} TO {}", t, c, o), q("ALTER TABLE {} RENAME COLUMN {} TO {}", t, n, c)]
    if not_null:  # under its final name: PostgreSQL 18 names the NOT NULL constraint after the column it is set on
        statements += [q("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL", t, c), q("ALTER TABLE {} DROP CONSTRAINT {}", t, check)]
    if default:
        statements.append(q("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT ", t, c) + default)
    statements += [q("ALTER INDEX {} RENAME TO {}", sql.Identifier(schema, temporary), sql.Identifier(index.split(".", 1)[1]))
                   for index, temporary in built]
    statements += added(keys)
    also = f" (and {', '.join(others)}, for the foreign keys re-pointed)" if others else ""
    lock = ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, f"the cut-over: a brief exclusive lock{also} (no scan, no "
                      "rewrite) that waits behind running transactions, retried after lock_timeout", table)
    drafts = [Draft(sql=statement, kind="cutover", object=f"{table}.{column}", tables=(table, *others), stage=CUTOVER,
                    rollback_sql=None, reversible=False, hazards=(lock,) if i == 0 else (), helper=True)
              for i, statement in enumerate(statements)]
    drafts += validations(ctx, keys)
    drafts.append(Draft(sql=q("ALTER TABLE {} DROP COLUMN {}", t, o), kind="drop_column", object=f"{table}.{old}",
                        tables=(table,), stage=POST_CUTOVER, isolated=True, rollback_sql=None, reversible=False, helper=True,
                        hazards=(ctx.hazard(HazardCode.DATA_LOSS, f"drops the old {column} (its values live on, "
                                            "converted and checked, in the new one)", table),)))
    return drafts


def _widening(ctx: Context, source: int, col: ast.ColumnDef) -> bool:
    """Can no value fail to convert (an implicit cast: int4 to int8, int to numeric, float4 to float8), with no
    conversion of the schema's own (a ``using`` annotation)? The trigger converts every write the application makes
    while the fill runs: a conversion that can fail would fail the application's writes instead of the plan."""
    if col.raw_default is not None and not (isinstance(col.raw_default, ast.TypeCast)
                                            and isinstance(col.raw_default.arg, ast.ColumnRef)):
        return False  # an annotation's expression
    target_name = names(col.typeName.names) if col.typeName is not None else ""
    target = ctx.facts.type_oids.get(target_name) or ctx.facts.type_oids.get(target_name.removeprefix("pg_catalog."))
    return target is not None and (source, target) in ctx.facts.implicit_casts


def _columns_of(definition: str) -> set[str]:
    """The columns an index's definition (pg_get_indexdef) reads."""
    node = pglast.parse_sql(definition)[0].stmt
    return index_columns(node) if isinstance(node, ast.IndexStmt) else set()


def _index_on(definition: str, column: str, new: str, name: str) -> str:
    """An index's definition with ``column`` read as ``new``, named ``name``, built CONCURRENTLY."""
    node = pglast.parse_sql(definition)[0].stmt
    assert isinstance(node, ast.IndexStmt)

    def visit(item: ast.Node) -> bool:
        if isinstance(item, ast.IndexElem) and item.name == column:
            item.name = new
        if isinstance(item, ast.ColumnRef):
            fields = item.fields or ()
            if fields and isinstance(fields[-1], ast.String) and str(fields[-1].sval) == column:
                item.fields = (*fields[:-1], ast.String(sval=new))
        return not isinstance(item, ast.ColumnRef)

    walk(node, visit)
    node.idxname = name
    node.concurrent = True
    node.if_not_exists = True  # a run stopped part-way may have built it already
    return deparse(node)
