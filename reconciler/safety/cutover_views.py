"""Views over a column a dual column replaces, made again inside its cut-over.

A view reads a column by its number, not its name: after the cut-over's renames it would go on reading the old
column, and the contract could not drop that. The diff engine drops such a view (and every view over it) before the
type change and creates it again after, with its comment and grants (diff/supplements/dependents.py); left in the
main transaction, those drops would leave the views gone for the whole backfill. Here they move into the cut-over:
dropped first, made again, with what hangs on them, after the last rename, in the same short transaction, so a
reader sees the old view or the new one and never none. A materialized view stays a reason for the plain ALTER
(``LiveFacts.busy_columns``): made again, it would compute its rows under the cut-over's lock.
"""

from __future__ import annotations

from dataclasses import replace

from .context import Context
from .drafts import CUTOVER, Draft

# a view's own statements, and those about what hangs on it (named '<view>' or '<view>.<name>')
_KINDS = frozenset({"drop_view", "create_view", "replace_view", "alter_view", "comment", "grant", "revoke",
                    "alter_owner", "create_trigger", "create_rule"})


def remade_in_cutover(ctx: Context, table: str, column: str) -> bool:
    """Does the plan drop and create again every view over the column (so its cut-over can)? Those views are then
    the cut-over's to make."""
    views = ctx.facts.column_views.get((table, column), ())
    if any(view not in ctx.dropped_views or view not in ctx.created_views for view in views):
        return False
    ctx.cutover_views.update(views)
    return True


def into_cutover(ctx: Context, drafts: list[Draft]) -> list[Draft]:
    """The views' drops first in the dual columns' cut-over, their creations (and their comments, grants, triggers,
    rules) after its last statement: all in the one cut-over transaction. Dropped before the tables are locked, the
    outermost first, the views are locked in the order a reader of them takes its locks (a query locks a view before
    the tables under it): the other order deadlocks with such a reader."""
    views = ctx.cutover_views
    if not views:
        return drafts

    def belongs(d: Draft) -> bool:
        return not d.helper and d.kind in _KINDS and (d.object in views or d.object.rsplit(".", 1)[0] in views)

    rest = [d for d in drafts if not belongs(d)]
    cut = [i for i, d in enumerate(rest) if d.kind == "cutover" and d.group is None]
    if not cut:
        return drafts

    def moved(d: Draft) -> Draft:
        return replace(d, stage=CUTOVER, group=None, transactional=True, isolated=False, rollback_sql=None,
                       reversible=False)

    drops = [moved(d) for d in drafts if belongs(d) and d.kind == "drop_view"]
    again = [moved(d) for d in drafts if belongs(d) and d.kind != "drop_view"]
    first, last = cut[0], cut[-1] + 1
    return [*rest[:first], *drops, *rest[first:last], *again, *rest[last:]]
