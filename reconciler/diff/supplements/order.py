"""Every statement after the objects it needs, by the desired database's own dependency records.

migra, and the rewriters before this one, place statements by kind: types first, then tables, functions early,
views late. Dependencies cross those lines: a domain whose CHECK calls a function, a domain or composite type or
function built on a table's row type, a table with a column of such a type. PostgreSQL recorded in the desired
database (``pg_depend``) what each object needs; a statement that comes before an object the plan makes and it
needs waits until that object is made (it only ever moves later, with what needs it in turn, so every order that
was right stays as it was).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import psycopg

from ..base import Change
from . import Context

# an object (class, oid, sub-id) named as the plan's changes name it: schema.relation[.column], schema.type (a table's
# row type and an array type by what they stand for), schema.function(argument types), schema.table.constraint (a
# domain's constraint by its domain), schema.table.trigger or .policy, a view's rule by its view
_NAME = """CASE {c}
  WHEN 'pg_class'::regclass THEN
    (SELECT n.nspname || '.' || r.relname || coalesce('.' || a.attname, '')
     FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
     LEFT JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum = {s} AND {s} > 0 AND NOT {whole} WHERE r.oid = {o})
  WHEN 'pg_type'::regclass THEN
    (SELECT coalesce(rn.nspname || '.' || r.relname, n.nspname || '.' || b.typname)
     FROM pg_type t JOIN pg_type b ON b.oid = CASE WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN t.typelem
                                                   ELSE t.oid END
     JOIN pg_namespace n ON n.oid = b.typnamespace
     LEFT JOIN pg_class r ON r.oid = b.typrelid LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
     WHERE t.oid = {o})
  WHEN 'pg_proc'::regclass THEN
    (SELECT n.nspname || '.' || p.proname || '(' || oidvectortypes(p.proargtypes) || ')'
     FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = {o})
  WHEN 'pg_constraint'::regclass THEN
    (SELECT n.nspname || '.' || coalesce(r.relname || CASE WHEN {whole} AND k.contype = 'c' THEN ''
                                                              ELSE '.' || k.conname END, dt.typname)
     FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace
     LEFT JOIN pg_class r ON r.oid = k.conrelid LEFT JOIN pg_type dt ON dt.oid = k.contypid WHERE k.oid = {o})
  WHEN 'pg_attrdef'::regclass THEN
    (SELECT n.nspname || '.' || r.relname || CASE WHEN {whole} THEN '' ELSE '.' || a.attname END
     FROM pg_attrdef x JOIN pg_class r ON r.oid = x.adrelid JOIN pg_namespace n ON n.oid = r.relnamespace
     JOIN pg_attribute a ON a.attrelid = x.adrelid AND a.attnum = x.adnum WHERE x.oid = {o})
  WHEN 'pg_rewrite'::regclass THEN
    (SELECT n.nspname || '.' || r.relname
     FROM pg_rewrite w JOIN pg_class r ON r.oid = w.ev_class JOIN pg_namespace n ON n.oid = r.relnamespace
     WHERE w.oid = {o} AND w.rulename = '_RETURN')
  WHEN 'pg_trigger'::regclass THEN
    (SELECT n.nspname || '.' || r.relname || '.' || g.tgname
     FROM pg_trigger g JOIN pg_class r ON r.oid = g.tgrelid JOIN pg_namespace n ON n.oid = r.relnamespace
     WHERE g.oid = {o})
  WHEN 'pg_policy'::regclass THEN
    (SELECT n.nspname || '.' || r.relname || '.' || y.polname
     FROM pg_policy y JOIN pg_class r ON r.oid = y.polrelid JOIN pg_namespace n ON n.oid = r.relnamespace
     WHERE y.oid = {o})
END"""

# the objects the names given stand for, as (class, oid, sub-id or 0 for the whole object, name); a table's name also
# stands for its row type and that type's array, a type's for its array
_NAMED = """
SELECT 'pg_class'::regclass, c.oid, 0, n.nspname || '.' || c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname || '.' || c.relname = ANY(%(names)s)
UNION ALL
SELECT 'pg_class'::regclass, c.oid, a.attnum, n.nspname || '.' || c.relname || '.' || a.attname
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND n.nspname || '.' || c.relname || '.' || a.attname = ANY(%(names)s)
UNION ALL
SELECT 'pg_type'::regclass, t.oid, 0, coalesce(rn.nspname || '.' || r.relname, n.nspname || '.' || b.typname)
FROM pg_type t JOIN pg_type b ON b.oid = CASE WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN t.typelem ELSE t.oid END
JOIN pg_namespace n ON n.oid = b.typnamespace
LEFT JOIN pg_class r ON r.oid = b.typrelid LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE coalesce(rn.nspname || '.' || r.relname, n.nspname || '.' || b.typname) = ANY(%(names)s)
UNION ALL
SELECT 'pg_proc'::regclass, p.oid, 0, n.nspname || '.' || p.proname || '(' || oidvectortypes(p.proargtypes) || ')'
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname || '.' || p.proname || '(' || oidvectortypes(p.proargtypes) || ')' = ANY(%(names)s)
UNION ALL
SELECT 'pg_constraint'::regclass, k.oid, 0, n.nspname || '.' || c.relname || '.' || k.conname
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname || '.' || c.relname || '.' || k.conname = ANY(%(names)s)
"""

# (what needs, what it needs) for what the names given stand for: the dependent as itself and as its whole object
# (a column as its table; a table's CHECK constraint and column default as the table, whose CREATE TABLE holds
# them). Not the dependency of a sequence on the column that owns it: the column's default needs the sequence first.
_NEEDS = f"""
WITH named (classid, objid, objsubid, name) AS ({_NAMED})
SELECT DISTINCT who, named.name
FROM pg_depend d
JOIN named ON d.refclassid = named.classid AND d.refobjid = named.objid
          AND (named.objsubid = 0 OR d.refobjsubid = named.objsubid)
CROSS JOIN LATERAL (VALUES ({_NAME.format(c='d.classid', o='d.objid', s='d.objsubid', whole='false')}),
                           ({_NAME.format(c='d.classid', o='d.objid', s='0', whole='true')})) w(who)
WHERE d.deptype IN ('n', 'a') AND who IS NOT NULL AND who <> named.name
  AND NOT starts_with(named.name, who || '.')  -- a table never waits for its own columns (their finishing touches)
  AND NOT (d.deptype = 'a' AND d.classid = 'pg_class'::regclass
           AND (SELECT relkind FROM pg_class WHERE oid = d.objid) = 'S')
"""


_MAKING = ("create_", "add_", "replace_")
# changes that finish making an object another change began: a new column's collation (migra leaves it out)
_FINISHING = frozenset({"alter_column_collation"})


def _made(c: Change) -> bool:
    return c.kind.startswith(_MAKING) or c.kind in _FINISHING


def _dropped(c: Change) -> bool:
    return c.kind.startswith("drop_")


def ordered(context: Context, changes: list[Change]) -> list[Change]:
    made = sorted({c.object for c in changes if _made(c) and c.object})
    dropped = sorted({c.object for c in changes if _dropped(c) and c.object})
    if not made and not dropped:
        return changes
    needs: dict[str, set[str]] = defaultdict(set)  # desired: object -> objects the plan makes that it needs
    if made:
        for who, what in _edges(context.desired, made):
            needs[who].add(what)
    users: dict[str, set[str]] = defaultdict(set)  # live: dropped object -> objects the plan drops that need it
    if dropped:
        for who, what in _edges(context.live, dropped):
            if who in dropped:
                users[what].add(who)
    if not needs and not users:
        return changes
    return _in_order(changes, needs, users)


def _edges(conn: psycopg.Connection[Any], names: list[str]) -> list[tuple[str, str]]:
    with conn.cursor() as cur:
        cur.execute(_NEEDS.encode(), {"names": names})
        return [(str(who), str(what)) for who, what in cur.fetchall()]


def _in_order(changes: list[Change], needs: dict[str, set[str]], users: dict[str, set[str]]) -> list[Change]:
    """The changes in their order, except that one waits while a later change has still to make an object it needs,
    to drop an object that needs what it drops, or to drop the object it makes again (and what waits releases what
    waits on it). What is left waiting at the end (a cycle) keeps its order, at the end."""
    to_make: dict[str, int] = defaultdict(int)  # object -> changes still to come that make it
    to_drop: dict[str, int] = defaultdict(int)  # object -> changes still to come that drop it
    for c in changes:
        if _made(c):
            to_make[c.object] += 1
        elif _dropped(c):
            to_drop[c.object] += 1
    out: list[Change] = []
    waiting: list[Change] = []

    def ready(c: Change) -> bool:
        if _dropped(c):
            return not any(to_drop.get(u, 0) for u in users.get(c.object, ()) if u != c.object)
        if _made(c) and to_drop.get(c.object, 0):
            return False
        return not any(to_make.get(n, 0) for n in needs.get(c.object, ()) if n != c.object)

    def emit(c: Change) -> None:
        out.append(c)
        if _made(c):
            to_make[c.object] -= 1
        elif _dropped(c):
            to_drop[c.object] -= 1

    for c in changes:  # a change still waiting counts as not done yet: what needs it waits too
        if ready(c):
            emit(c)
            released = True
            while released and waiting:
                released = False
                for w in list(waiting):
                    if ready(w):
                        waiting.remove(w)
                        emit(w)
                        released = True
        else:
            waiting.append(c)
    out.extend(waiting)
    return out
