"""The way back from a dual column's cut-over, and the contract that ends it.

Until its contract runs, a dual column's cut-over leaves the column it replaced (``<column>_reconciler_old_<tag>``)
kept in step by a trigger (swap.py). A plan whose desired column has that column's type again (``reconciler
rollback RUN_ID``, which plans back to the schema the run started from, or the desired SQL reverted) swaps back
instead of rewriting the table: every row checked to hold its value (a write the old type could not hold left it
NULL: then the way back refuses, naming how many rows it would lose), the column's indexes and keys built again on
it concurrently, one short cut-over, and the contract drops the column that is given up.

A plan made while a contract is held (``apply --hold-contract``) finds the kept column, its trigger and function:
the diff engine drops them, and here those drops become the contract, one transaction, after everything else.
"""

from __future__ import annotations

import re
from dataclasses import replace

from pglast import ast, enums
from psycopg import sql

from .carried_keys import carried_keys
from .context import Context
from .cutover_views import remade_in_cutover
from .drafts import BACKFILL, POST_CUTOVER, Draft
from .dual_column import VERIFY_KIND
from .hazards import rewrites_type
from .nodes import q, short
from .steps import HazardCode
from .swap import CONTRACT, Swap, cutover, index_builds, kept_name, not_null_check, tag_of

_KEPT = re.compile(r"_reconciler_(?:old|gone)_([0-9a-f]{8})$")
_BACK = re.compile(r"(?:^|\.)reconciler_back_([0-9a-f]{8})(?:\(\))?$")


def swap_back(ctx: Context, d: Draft, node: ast.AlterTableStmt, table: str,
              cmds: list[ast.AlterTableCmd]) -> list[Draft] | None:
    """The way back, where live keeps the column a cut-over replaced and the desired type is its type; else None."""
    if len(cmds) != 1 or enums.AlterTableType(int(cmds[0].subtype or 0)) is not enums.AlterTableType.AT_AlterColumnType:
        return None
    col, column = cmds[0].def_, str(cmds[0].name)
    if not isinstance(col, ast.ColumnDef) or col.typeName is None or not rewrites_type(ctx, table, column, col):
        return None
    tag = tag_of(table, column)
    kept, fact = kept_name(column, tag), ctx.facts.columns.get((table, column))
    kept_fact = ctx.facts.columns.get((table, kept))
    target = ctx.type_oid(col.typeName)
    parts = d.identity[:2] or tuple(table.split(".", 1))
    schema = parts[0]
    back = f"reconciler_back_{tag}"
    if fact is None or kept_fact is None or target is None or kept_fact.type_oid != target \
            or f"{schema}.{back}" not in ctx.facts.routines or (table, column) in ctx.facts.busy_columns \
            or not remade_in_cutover(ctx, table, column):
        return None
    keys = carried_keys(ctx, table, column, tag)
    if keys is None:
        return None
    t, c, k = sql.Identifier(*parts), sql.Identifier(column), sql.Identifier(kept)
    check_name, check_drafts, validate = not_null_check(ctx, table, parts, kept, ctx.hazard(
        HazardCode.ACCESS_EXCLUSIVE_LOCK, f"a brief exclusive lock: the way back to {kept} (kept in step since the "
        "cut-over) checks it has every value", table))
    ctx.fill_helpers.update({f"{table}.{kept}", f"{table}.{back}", f"{schema}.{back}()", f"{table}.{check_name}"})
    out = [replace(check_drafts[0], original_sql=d.sql), *check_drafts[1:]] if fact.not_null else []
    swap = Swap(table=table, parts=parts, column=column, incoming=kept, outgoing=short(f"{column}_reconciler_gone", tag),
                tag=tag, not_null=fact.not_null, default=fact.default, check=check_name if fact.not_null else None,
                keys=keys, stop_trigger=q("DROP TRIGGER IF EXISTS {} ON {}", sql.Identifier(back), t),
                stop_function=q("DROP FUNCTION IF EXISTS {}()", sql.Identifier(schema, back)),
                sequence=ctx.facts.owned_sequences.get((table, column)), identity=ctx.facts.identities.get((table, column)))
    builds, renamed = index_builds(ctx, swap)
    # widened back (the kept type to the current one never fails): a row the trigger left NULL, or that holds
    # another value, is counted, and the way back stops before it would lose it
    out.append(Draft(sql=q("SELECT count(*) FROM {} WHERE {}::", t, k) + fact.type + q(" IS DISTINCT FROM {}", c),
                     kind=VERIFY_KIND, object=f"{table}.{kept}", tables=(table,), transactional=False, stage=BACKFILL,
                     rollback_sql="", reversible=True, identity=(*parts, kept), helper=True, original_sql=d.sql))
    out += builds
    if fact.not_null:
        out.append(validate)
    return out + cutover(ctx, swap, renamed, "the way back")


def contracts(drafts: list[Draft]) -> list[Draft]:
    """The diff engine's drops of what a held contract kept (the column, its trigger and function): the contract,
    one transaction per column, after everything else (trigger, function, then the column)."""
    held: dict[str, list[Draft]] = {}
    out = []
    tables = {m.group(1) for d in drafts if d.kind == "drop_table" and not d.helper
              for m in [_KEPT.search(d.object)] if m is not None}
    own = {(d.kind, d.object) for d in drafts if d.helper}  # what the plan's own rewrites drop already
    for d in drafts:
        if not d.helper and (d.kind, d.object) in own:
            continue
        if d.kind in ("drop_constraint", "drop_index", "drop_index_concurrently") and not d.helper and any(
                f"_reconciler_old_{tag}" in d.object for tag in tables):
            continue  # of a shadow table's old table (or its partitions): the contract's DROP TABLE takes it
        match = None if d.helper else (_KEPT.search(d.object) if d.kind in ("drop_column", "drop_table") else
                                       _BACK.search(d.object) if d.kind in ("drop_trigger", "drop_function") else None)
        if match is None:
            out.append(d)
            continue
        if d.kind == "drop_table":  # a shadow table's old one or a partition of it (safety/shadow_table.py)
            d = replace(d, kind=CONTRACT, sql=q("DROP TABLE IF EXISTS {}", sql.Identifier(*d.object.split(".", 1))),
                        hazards=tuple(replace(h, message=f"the contract: drops {d.object}, the table a cut-over replaced "
                                              "(its rows live on, copied and checked, in the one that took its place)")
                                      if h.code == HazardCode.DATA_LOSS else h for h in d.hazards))
        elif d.kind == "drop_column":
            d = replace(d, kind=CONTRACT, hazards=tuple(
                replace(h, message=f"the contract: drops {d.object.rsplit('.', 1)[1]}, the column a cut-over replaced "
                        "(its values live on, converted and checked, in the one that took its place)")
                if h.code == HazardCode.DATA_LOSS else h for h in d.hazards))
        held.setdefault(match.group(1), []).append(d)
    order = {"drop_trigger": 0, "drop_function": 1, CONTRACT: 2}
    for tag, found in held.items():
        out += [replace(d, stage=POST_CUTOVER, group=f"contract {tag}") for d in sorted(found, key=lambda d: order[d.kind])]
    return out
