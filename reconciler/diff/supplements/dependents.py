"""Views and materialized views migra drops and creates again only because a table under them changed.

migra re-creates every view over a table whose columns no longer start the same way (a column added in the middle
of the desired table, any change it cannot express as a replacement), and every view over those. PostgreSQL needs
that only when something the view's query uses goes away or changes type: a column dropped or given a new type, a
table dropped, a constraint the query leans on dropped (GROUP BY a primary key), a type or function it calls
replaced, or a view under it re-created. A re-created view loses what was granted on it, its comment, its triggers
and rules; a re-created materialized view its rows, which it computes again under lock, and its indexes. So the
re-creations PostgreSQL does not need go, judged from live's own dependency records (``pg_depend``), and those it
needs stay (``survivors`` keeps what they would lose).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from psycopg import sql

from ...roundtrip import RoundTrip
from ..base import Change
from . import Context, change, managed

# each view and materialized view: its query as PostgreSQL prints it, its columns with their types
_DEFINITIONS = f"""
SELECT n.nspname || '.' || c.relname, c.relkind::text, pg_get_viewdef(c.oid),
       ARRAY(SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND {managed('n')}
"""

# what each view's query uses, named as the plan's changes name objects: a relation (schema.name), one of its
# columns (schema.table.column), a table constraint (schema.table.constraint), anything else by its identity
_USES = f"""
SELECT vn.nspname || '.' || v.relname, d.refclassid::regclass::text,
       CASE d.refclassid
         WHEN 'pg_class'::regclass THEN
           (SELECT rn.nspname || '.' || rc.relname || coalesce('.' || a.attname, '')
            FROM pg_class rc JOIN pg_namespace rn ON rn.oid = rc.relnamespace
            LEFT JOIN pg_attribute a ON a.attrelid = rc.oid AND a.attnum = d.refobjsubid AND d.refobjsubid > 0
            WHERE rc.oid = d.refobjid)
         WHEN 'pg_constraint'::regclass THEN
           (SELECT kn.nspname || '.' || coalesce(kc.relname || '.', '') || k.conname
            FROM pg_constraint k JOIN pg_namespace kn ON kn.oid = k.connamespace
            LEFT JOIN pg_class kc ON kc.oid = k.conrelid WHERE k.oid = d.refobjid)
         ELSE (pg_identify_object(d.refclassid, d.refobjid, 0)).identity
       END
FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace vn ON vn.oid = v.relnamespace
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.deptype = 'n'
WHERE v.relkind IN ('v', 'm') AND d.refobjid <> v.oid AND {managed('vn')}
"""

_DROPS = frozenset({"drop_view", "drop_matview"})
_CREATES = frozenset({"create_view", "replace_view", "create_materialized_view"})
# changes to a column or a table that a view over it cannot survive
_COLUMN_GONE = frozenset({"drop_column", "alter_column_type"})
_TABLE_GONE = frozenset({"drop_table", "drop_foreign_table"})
# changes to a type, function or other object a view uses that leave the view as it is
_HARMLESS = frozenset({"add_enum_value", "comment", "grant", "revoke", "alter_owner"})


def needless_recreations(context: Context, changes: list[Change]) -> list[Change]:
    dropped = {c.object for c in changes if c.kind in _DROPS}
    created = {c.object for c in changes if c.kind in _CREATES}
    candidates = dropped & created
    if not candidates:
        return changes
    live = {r[0]: r[1:] for r in context.rows("live", _DEFINITIONS)}
    desired = {r[0]: r[1:] for r in context.rows("desired", _DEFINITIONS)}
    trip = RoundTrip(context.desired)
    unchanged = {name for name in candidates if name in live and name in desired
                 and live[name][0] == desired[name][0] and live[name][2] == desired[name][2]  # kind, columns
                 and trip.same_view(live[name][1], desired[name][1])}
    if not unchanged:
        return changes
    uses: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for view, refclass, name in context.rows("live", _USES):
        if view in unchanged:
            uses[view].append((refclass, name or ""))
    # a view migra drops and creates again that nothing required to change: neither statement is needed
    spare = unchanged - _needed(unchanged, uses, changes, candidates)
    return [c for c in changes if not ((c.kind in _DROPS or c.kind in _CREATES) and c.object in spare)]


def _needed(unchanged: set[str], uses: dict[str, list[tuple[str, str]]], changes: Iterable[Change],
            candidates: set[str]) -> set[str]:
    """The unchanged views PostgreSQL still requires to be dropped and created again, to a fixed point: a view over
    a view that must be re-created must be re-created too."""
    columns_gone = {c.object for c in changes if c.kind in _COLUMN_GONE}
    tables_gone = {c.object for c in changes if c.kind in _TABLE_GONE}
    constraints_gone = {c.object for c in changes if c.kind == "drop_constraint"}
    touched = {_base(c.object) for c in changes
               if c.kind not in _HARMLESS and c.kind not in _DROPS and c.kind not in _CREATES}
    # re-created for certain: views whose definition changes, and views dropped for good
    recreated = (candidates - unchanged) | {c.object for c in changes if c.kind in _DROPS} - candidates
    needed: set[str] = set()

    def requires(refclass: str, name: str) -> bool:
        if refclass == "pg_class":
            return (name in columns_gone or name in tables_gone or name in recreated or name in needed
                    or _table_of(name) in tables_gone)
        if refclass == "pg_constraint":
            return name in constraints_gone or _table_of(name) in tables_gone
        return _base(name) in touched

    while True:
        more = {view for view in unchanged - needed if any(requires(k, n) for k, n in uses.get(view, ()))}
        if not more:
            return needed
        needed |= more


def _base(name: str) -> str:
    """A routine's name without its arguments (overloads count as one: a change to either keeps the view)."""
    return name.split("(", 1)[0]


def _table_of(name: str) -> str:
    """schema.table of a column's or constraint's schema.table.name."""
    return name.rsplit(".", 1)[0]


# what hangs on a view or materialized view and goes with it when it is dropped, as the desired database defines it
_ATTACHED = f"""
SELECT n.nspname || '.' || c.relname, 'create_index', n.nspname || '.' || i.relname, pg_get_indexdef(i.oid)
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class c ON c.oid = x.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'm' AND {managed('n')}
UNION ALL
SELECT n.nspname || '.' || c.relname, 'create_trigger', n.nspname || '.' || c.relname || '.' || t.tgname,
       pg_get_triggerdef(t.oid)
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND NOT t.tgisinternal AND {managed('n')}
UNION ALL
SELECT n.nspname || '.' || c.relname, 'create_rule', n.nspname || '.' || c.relname || '.' || r.rulename,
       pg_get_ruledef(r.oid)
FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND r.rulename <> '_RETURN' AND {managed('n')}
"""


def reattached(context: Context, changes: list[Change]) -> list[Change]:
    """A view or materialized view the plan drops and creates again comes back bare: its indexes, triggers and rules
    (those the desired schema gives it) are created again right after it, unless the plan creates them already."""
    dropped = {c.object for c in changes if c.kind in _DROPS}
    again = {c.object for c in changes if c.kind in _CREATES} & dropped
    if not again:
        return changes
    planned = {(c.kind, c.object) for c in changes}
    by_relation: dict[str, list[Change]] = defaultdict(list)
    for relation, kind, name, definition in context.rows("desired", _ATTACHED):
        if relation in again and (kind, name) not in planned:
            by_relation[relation].append(change(definition, kind, name))
    if not by_relation:
        return changes
    out: list[Change] = []
    for c in changes:
        out.append(c)
        if c.kind in _CREATES and c.object in by_relation:
            out.extend(by_relation.pop(c.object))
    return out


# foreign keys and the unique index they lean on (conindid), by that index and by its constraint
_KEYS_USED = f"""
SELECT n.nspname || '.' || c.relname || '.' || k.conname, xn.nspname || '.' || x.relname,
       rn.nspname || '.' || r.relname || '.' || coalesce(kc.conname, '')
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class x ON x.oid = k.conindid JOIN pg_namespace xn ON xn.oid = x.relnamespace
JOIN pg_class r ON r.oid = k.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
LEFT JOIN pg_constraint kc ON kc.conindid = k.conindid AND kc.conrelid = k.confrelid AND kc.contype IN ('p', 'u')
WHERE k.contype = 'f' AND {managed('n')}
"""

_FOREIGN_KEYS = f"""
SELECT n.nspname || '.' || c.relname || '.' || k.conname, n.nspname, c.relname, k.conname, pg_get_constraintdef(k.oid)
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE k.contype = 'f' AND {managed('n')}
"""


def foreign_keys_moved(context: Context, changes: list[Change]) -> list[Change]:
    """A foreign key leans on the referenced table's unique index: replacing that index or its constraint (a UNIQUE
    constraint becoming the PRIMARY KEY) cannot drop it while the key uses it. Such a key, unchanged in the desired
    schema, is dropped before its index goes and added again afterwards, where it then leans on the new one."""
    gone = {c.object for c in changes if c.kind in ("drop_index", "drop_index_concurrently", "drop_constraint")}
    if not gone:
        return changes
    dropped = {c.object for c in changes if c.kind == "drop_constraint"}
    moved = sorted({fk for fk, index, key in context.rows("live", _KEYS_USED)
                    if (index in gone or key in gone) and fk not in dropped})
    if not moved:
        return changes
    desired = {r[0]: r[1:] for r in context.rows("desired", _FOREIGN_KEYS)}
    moved = [fk for fk in moved if fk in desired]
    if not moved:
        return changes
    first = next(i for i, c in enumerate(changes)
                 if c.kind in ("drop_index", "drop_index_concurrently", "drop_constraint") and c.object in gone
                 and any(c.object in (index, key) for fk, index, key in context.rows("live", _KEYS_USED) if fk in moved))
    drops, adds = [], []
    for fk in moved:
        schema, table, name, definition = desired[fk]
        target = sql.Identifier(schema, table)
        drops.append(change(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(target, sql.Identifier(name)),
                            "drop_constraint", fk))
        adds.append(change(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            target, sql.Identifier(name), sql.SQL(definition)), "add_foreign_key", fk))
    return [*changes[:first], *drops, *changes[first:], *adds]
