"""View options (check option, security_barrier, security_invoker), materialized views' storage
parameters and extended statistics: migra compares none of them."""

from __future__ import annotations

from psycopg import sql

from ..base import Change
from . import Context, change, first_index, insert_at, managed, not_extension_member, reloptions

_VIEWS = f"""
SELECT n.nspname, c.relname, c.relkind::text, coalesce(c.reloptions, '{{}}'::text[])
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND {managed('n')} AND {not_extension_member('pg_class', 'c.oid')}
"""

_STATISTICS = f"""
SELECT n.nspname, s.stxname, pg_get_statisticsobjdef(s.oid)
FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace
WHERE {managed('n')} AND {not_extension_member('pg_statistic_ext', 's.oid')}
"""

def view_options(context: Context, changes: list[Change]) -> list[Change]:
    live = {(s, n): (k, reloptions(o)) for s, n, k, o in context.rows("live", _VIEWS)}
    desired = {(s, n): (k, reloptions(o)) for s, n, k, o in context.rows("desired", _VIEWS)}
    recreated = {c.object for c in changes if c.kind.startswith("create") or c.kind == "replace_view"}  # options reset
    tail: list[Change] = []
    for (schema, name), (kind, want) in sorted(desired.items()):
        label = f"{schema}.{name}"
        have_kind, have = live.get((schema, name), (kind, {}))
        if label in recreated or have_kind != kind:
            have = {}
        keyword = sql.SQL("ALTER VIEW" if kind == "v" else "ALTER MATERIALIZED VIEW")
        target = sql.Identifier(schema, name)
        gone = sorted(set(have) - set(want))
        if gone:
            tail.append(change(sql.SQL("{} {} RESET ({})").format(keyword, target, sql.SQL(", ").join(map(sql.SQL, gone))),
                               "alter_view_options", label))
        changed = {k: v for k, v in want.items() if have.get(k) != v}
        if changed:
            tail.append(change(sql.SQL("{} {} SET ({})").format(keyword, target, sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.SQL(k), sql.Literal(v)) for k, v in sorted(changed.items()))),
                "alter_view_options", label))
    return [*changes, *tail]


def statistics(context: Context, changes: list[Change]) -> list[Change]:
    """Extended statistics: dropped first (they would block nothing, but a changed one keeps its name),
    created last, once their columns exist."""
    live = {(s, n): d for s, n, d in context.rows("live", _STATISTICS)}
    desired = {(s, n): d for s, n, d in context.rows("desired", _STATISTICS)}
    dropped_tables = {c.object for c in changes if c.kind == "drop_table"}
    drops: list[Change] = []
    creates: list[Change] = []
    for key in sorted(set(live) | set(desired)):
        schema, name = key
        label = f"{schema}.{name}"
        if key in live and live[key] != desired.get(key):
            drops.append(change(sql.SQL("DROP STATISTICS IF EXISTS {}").format(sql.Identifier(schema, name)),
                                "drop_statistics", label))
        if key in desired and (live.get(key) != desired[key] or _on_recreated_table(desired[key], dropped_tables)):
            creates.append(change(desired[key], "create_statistics", label))
    start = first_index(changes, lambda c: c.kind not in ("create_schema", "create_extension"), len(changes))
    return [*insert_at(changes, start, drops), *creates]


def _on_recreated_table(definition: str, dropped_tables: set[str]) -> bool:
    """A table migra drops and creates again loses its statistics with it."""
    target = definition.rsplit(" FROM ", 1)[-1].strip()
    return target in dropped_tables
