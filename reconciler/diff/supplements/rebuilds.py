"""Tables PostgreSQL cannot change in place, built again: a plain table made partitioned (or a partitioned one made
plain), a new partition key, a table made logged or unlogged.

migra drops such a table and creates it again (its rows lost), or sets it LOGGED under a lock held through a rewrite
of every row. ``rebuilt_tables`` takes every statement about the table, its partitions and their indexes out of the
diff and puts one ``rebuild_table`` change in their place, carrying the desired definition read from the desired
database (``Rebuild``): the safety compiler builds the new table beside the old one, copies the rows while writes go
on, and swaps the names in one short lock (safety/shadow_table.py). ``rebuilds_last`` runs after every other
rewriter: what they added about those tables goes too, and the rebuild comes after everything it may need.

What the new table cannot take over by itself is refused, naming the table and what to do: a partition name the
live database already uses, a column the desired table drops, an identity column made or unmade (or one whose
sequence has a name of its own), triggers, row security, rules,
views over the table, a foreign key to itself, inheritance children.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pglast
import psycopg
from pglast import ast
from psycopg import sql

from ...errors import ReconcilerError
from ..base import Change, Rebuild
from . import Context, managed

KIND = "rebuild_table"
_KEPT = re.compile(r"_reconciler_old_([0-9a-f]{8})")

SHAPES = """
SELECT n.nspname || '.' || c.relname, c.relkind::text, pg_get_partkeydef(c.oid),
       CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END,
       (SELECT pn.nspname || '.' || p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE i.inhrelid = c.oid AND c.relispartition LIMIT 1)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND """ + managed("n")

_PERSISTENCE = """
SELECT n.nspname || '.' || c.relname, c.relpersistence::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND """ + managed("n")

# generated columns: stored ('s') and, on PostgreSQL 18, virtual ('v')
_GENERATED = """
SELECT n.nspname || '.' || c.relname, a.attname, a.attgenerated::text FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attgenerated <> '' AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND """ + managed("n")

# every relation's name, and the table an index is on ('' for others): names the new table's indexes may take
_NAMES = """
SELECT n.nspname || '.' || c.relname, coalesce((SELECT tn.nspname || '.' || t.relname FROM pg_index i
       JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace tn ON tn.oid = t.relnamespace
       WHERE i.indexrelid = c.oid), '')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'i', 'I', 'S', 'v', 'm', 'f', 'c') AND """ + managed("n")

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod),
       CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
            THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END,
       pg_get_expr(d.adbin, d.adrelid), a.attnotnull, a.attidentity::text, a.attgenerated::text,
       (SELECT k.conname FROM pg_constraint k WHERE k.conrelid = a.attrelid AND k.contype = 'n'
        AND k.conkey = ARRAY[a.attnum]::int2[] LIMIT 1),
       format('INCREMENT BY %%s MINVALUE %%s MAXVALUE %%s START WITH %%s CACHE %%s%%s', q.seqincrement, q.seqmin,
              q.seqmax, q.seqstart, q.seqcache, CASE WHEN q.seqcycle THEN ' CYCLE' ELSE '' END),
       qn.nspname || '.' || qc.relname
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_depend qd ON a.attidentity <> '' AND qd.classid = 'pg_class'::regclass AND qd.deptype = 'i'
     AND qd.refclassid = 'pg_class'::regclass AND qd.refobjid = a.attrelid AND qd.refobjsubid = a.attnum
LEFT JOIN pg_sequence q ON q.seqrelid = qd.objid
LEFT JOIN pg_class qc ON qc.oid = q.seqrelid LEFT JOIN pg_namespace qn ON qn.oid = qc.relnamespace
LEFT JOIN pg_collation co ON co.oid = a.attcollation LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"""

_TABLE = """
SELECT c.relpersistence::text, CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
       array_to_string(c.reloptions, ', '), obj_description(c.oid, 'pg_class'), c.relowner::regrole::text,
       (SELECT count(*) FROM pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal AND g.tgparentid = 0
        AND g.tgname NOT LIKE 'reconciler\\_%%'),
       c.relrowsecurity OR EXISTS (SELECT FROM pg_policy p WHERE p.polrelid = c.oid),
       EXISTS (SELECT FROM pg_rewrite r WHERE r.ev_class = c.oid AND r.rulename <> '_RETURN'),
       (SELECT string_agg(DISTINCT CASE WHEN v.relkind = 'm' THEN 'materialized view ' ELSE '' END
                               || vn.nspname || '.' || v.relname, ', ') FROM pg_depend dp
        JOIN pg_rewrite r ON r.oid = dp.objid AND dp.classid = 'pg_rewrite'::regclass
        JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace vn ON vn.oid = v.relnamespace
        WHERE dp.refclassid = 'pg_class'::regclass AND dp.refobjid = c.oid AND v.oid <> c.oid),
       EXISTS (SELECT FROM pg_inherits i JOIN pg_class ch ON ch.oid = i.inhrelid
               WHERE i.inhparent = c.oid AND NOT ch.relispartition),
       (SELECT array_agg(a.attname ORDER BY array_position(k.conkey, a.attnum)) FROM pg_constraint k
        JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY(k.conkey)
        WHERE k.conrelid = c.oid AND k.contype = 'p'),
       c.relacl IS NOT NULL
FROM pg_class c WHERE c.oid = %s::regclass"""

_CONSTRAINTS = """
SELECT k.conname, pg_get_constraintdef(k.oid), k.contype::text, k.confrelid = k.conrelid
FROM pg_constraint k WHERE k.conrelid = %s::regclass AND k.contype IN ('p', 'u', 'x', 'c', 'f') AND k.conislocal
ORDER BY position(k.contype::text IN 'puxcf'), k.conname"""

# the family's indexes: (name, definition or NULL where a constraint or a parent's index makes it)
_INDEXES = """
SELECT xn.nspname || '.' || x.relname,
       CASE WHEN NOT EXISTS (SELECT FROM pg_constraint k WHERE k.conindid = x.oid AND k.conrelid = i.indrelid)
             AND NOT EXISTS (SELECT FROM pg_inherits h WHERE h.inhrelid = x.oid)
            THEN pg_get_indexdef(x.oid) END
FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid JOIN pg_namespace xn ON xn.oid = x.relnamespace
WHERE i.indrelid = ANY(%s::regclass[]) ORDER BY array_position(%s::regclass[], i.indrelid::regclass), x.relname"""

_REFERENCES = """
SELECT n.nspname || '.' || t.relname, k.conname, pg_get_constraintdef(k.oid)
FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE k.contype = 'f' AND k.confrelid = %s::regclass AND k.conrelid <> ALL(%s::regclass[]) AND k.conparentid = 0
ORDER BY 1, 2"""

_REFERRING = """
SELECT n.nspname || '.' || t.relname || '.' || k.conname
FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE k.contype = 'f' AND k.confrelid = ANY(%s::regclass[])"""

_TRIGGERS = """
SELECT pg_get_triggerdef(oid) FROM pg_trigger
WHERE tgrelid = %s::regclass AND NOT tgisinternal AND tgparentid = 0 AND tgname NOT LIKE 'reconciler\\_%%'
ORDER BY tgname"""

# the plain views that read the table directly (a view over them follows the view, which keeps its oid)
_VIEWS = """
SELECT vn.nspname, v.relname, pg_get_viewdef(v.oid), array_to_string(v.reloptions, ', ')
FROM pg_class v JOIN pg_namespace vn ON vn.oid = v.relnamespace
WHERE v.relkind = 'v' AND v.oid <> %s::regclass AND EXISTS (
    SELECT FROM pg_depend dp JOIN pg_rewrite r ON r.oid = dp.objid AND dp.classid = 'pg_rewrite'::regclass
    WHERE r.ev_class = v.oid AND dp.refclassid = 'pg_class'::regclass AND dp.refobjid = %s::regclass)
ORDER BY v.oid"""

_SEQUENCES = """
SELECT sn.nspname || '.' || s.relname, a.attname FROM pg_depend d
JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' JOIN pg_namespace sn ON sn.oid = s.relnamespace
JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = %s::regclass
  AND d.deptype = 'a' ORDER BY 1"""

_GRANTS = """
SELECT CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.grantee::regrole::text) END, g.privilege_type,
       g.is_grantable
FROM pg_class c, aclexplode(c.relacl) g WHERE c.oid = %s::regclass AND g.grantee <> c.relowner ORDER BY 1, 2"""

_COMMENTS = """
SELECT a.attname, col_description(a.attrelid, a.attnum) FROM pg_attribute a
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
  AND col_description(a.attrelid, a.attnum) IS NOT NULL ORDER BY a.attnum"""


@dataclass(frozen=True)
class _Shape:
    kind: str  # relkind: 'r' or 'p'
    key: str | None  # pg_get_partkeydef
    bound: str | None
    parent: str | None


def rebuilt_tables(context: Context, changes: list[Change]) -> list[Change]:
    """The diff's statements about each table to build again replaced by one ``rebuild_table`` change, at the end."""
    found = _rebuilds(context, changes)
    if not found:
        return changes
    return [*_without(context, found, changes), *(c for c in found.values())]


def rebuilds_last(context: Context, changes: list[Change]) -> list[Change]:
    """What later rewriters added about the tables built again goes, and each rebuild moves to the end."""
    found = {c.object: c for c in changes if c.kind == KIND}
    if not found:
        return changes
    return [*_without(context, found, [c for c in changes if c.kind != KIND]), *found.values()]


def rebuilt_families(context: Context) -> set[str]:
    """Every table of a family built again, on either side: partitioning changes to them are not refused."""
    live, desired = _shapes(context, "live"), _shapes(context, "desired")
    return {t for table in _changed(context, live, desired) for t in (*_family(live, table), *_family(desired, table))}


def _shapes(context: Context, side: str) -> dict[str, _Shape]:
    return {r[0]: _Shape(r[1], r[2], r[3], r[4]) for r in context.rows(side, SHAPES)}


def _family(shapes: dict[str, _Shape], table: str) -> list[str]:
    """The table and its partitions, at every level, each after its parent."""
    out, i = [table], 0
    while i < len(out):
        out += sorted(name for name, shape in shapes.items() if shape.parent == out[i])
        i += 1
    return out


def _changed(context: Context, live: dict[str, _Shape], desired: dict[str, _Shape]) -> dict[str, str]:
    """Tables (not partitions) to build again -> what changes, said in the plan."""
    persistence = {}
    if live.keys() & desired.keys():
        was, becomes = (dict(context.rows(side, _PERSISTENCE)) for side in ("live", "desired"))
        persistence = {t: (was[t], becomes[t]) for t in was.keys() & becomes.keys() if was[t] != becomes[t]}
    generated: dict[str, set[str]] = {}
    if live.keys() & desired.keys():  # a stored generated column a table gains: computed for every row under lock
        # a column generated in live already (a virtual one made stored: generated.py) is not built again
        had = {(table, column) for table, column, _kind in context.rows("live", _GENERATED)}
        for table, column, kind in context.rows("desired", _GENERATED):
            if kind == "s" and (table, column) not in had:
                generated.setdefault(table, set()).add(column)
    out: dict[str, str] = {}
    for table in sorted(live.keys() & desired.keys()):
        old, new = live[table], desired[table]
        if old.parent or new.parent:
            continue  # a partition: its bounds and parent are refused by partitions.refuse_partitioning_changes
        if old.kind != new.kind:
            out[table] = (f"becomes partitioned by {new.key}" if new.kind == "p" else "becomes a plain table")
        elif old.kind == "p" and old.key != new.key:
            out[table] = f"changes its partition key from {old.key} to {new.key}"
        elif table in persistence and "t" not in persistence[table]:
            out[table] = "becomes unlogged" if persistence[table][1] == "u" else "becomes logged"
        elif generated.get(table):
            out[table] = f"gains the stored generated column {', '.join(sorted(generated[table]))}"
    return out


def _rebuilds(context: Context, changes: list[Change]) -> dict[str, Change]:
    live, desired = _shapes(context, "live"), _shapes(context, "desired")
    changed = _changed(context, live, desired)
    if not changed:
        return {}
    names = {"live": dict(context.rows("live", _NAMES)), "desired": dict(context.rows("desired", _NAMES))}
    out = {}
    for table, why in changed.items():
        # where the engine's statements do it in place (not a partitioning change: those drop the table), a table too
        # small to build again takes them
        in_place = live[table].kind == desired[table].kind and live[table].key == desired[table].key
        original = tuple(c for c in _without(context, {table: Change("", KIND, table, "")}, changes, keep=True)
                         ) if in_place else ()
        rebuild = _read(context, table, why, _family(live, table), _family(desired, table), names, original)
        out[table] = Change(sql=_script(rebuild), kind=KIND, object=table, engine="supplements", rebuild=rebuild)
    return out


def _refuse(table: str, why: str, problem: str) -> ReconcilerError:
    return ReconcilerError(f"cannot rebuild table {table}, which {why}: {problem}")


def _read(context: Context, table: str, why: str, live_family: list[str], desired_family: list[str],
          names: dict[str, dict[str, str]], original: tuple[Change, ...]) -> Rebuild:
    """The desired definition of ``table`` and its partitions, and what live has that the new table takes over."""
    live, desired = context.live, context.desired
    ident = _ident(table)
    for name in desired_family[1:]:
        if name in names["live"]:
            raise _refuse(table, why, f"its new partition {name} has a name live already uses (give the new "
                          "partitions names of their own; the old ones go with the old table)")
    for name in live_family[1:]:
        if name in names["desired"] and name not in desired_family:
            raise _refuse(table, why, f"its partition {name} is a table of its own in the desired schema (DETACH "
                          "PARTITION it in a plan of its own first: the old partitions go with the old table)")
    checks = {}
    for side, conn, family in (("live", live, live_family), ("desired", desired, desired_family)):
        for member in family:
            row = conn.execute(_TABLE, (_ident(member),)).fetchone()
            assert row is not None
            checks[(side, member)] = row
            triggers, secured, rules, views, children = row[5], row[6], row[7], row[8], row[9]
            # the table's own triggers and plain views over it are made again at the swap; a partition's are not
            whole = member == table
            what = (f"{triggers} trigger(s)" if triggers and side == "desired" and not whole else
                    "row level security" if secured else "rules" if rules else
                    f"views over it ({views})" if views and (not whole or "materialized view" in views) else
                    "inheritance children" if children else None)
            if what:
                raise _refuse(table, why, f"{member} has {what} in the {side} schema, which the new table cannot take "
                              "over (change them in a plan of their own, before or after)")
    desired_columns = desired.execute(_COLUMNS, (ident,)).fetchall()
    live_columns = live.execute(_COLUMNS, (ident,)).fetchall()
    wanted = {c[0]: c for c in desired_columns}
    gone = [c[0] for c in live_columns if c[0] not in wanted]
    if gone:
        raise _refuse(table, why, f"the desired table has no column {', '.join(gone)} (drop it in a plan of its own "
                      "first)")
    had = {c[0]: c for c in live_columns}
    retyped = [c[0] for c in desired_columns if c[0] in had and (c[1], c[2]) != (had[c[0]][1], had[c[0]][2])]
    if retyped:
        raise _refuse(table, why, f"the desired table changes the type of {', '.join(retyped)} too (change it in a "
                      "plan of its own)")
    unfilled = [c[0] for c in desired_columns if c[0] not in had and c[4] and c[3] is None and not c[6] and not c[5]]
    if unfilled:
        raise _refuse(table, why, f"its new column {', '.join(unfilled)} is NOT NULL without a default: the rows "
                      "copied would have no value for it (add it in a plan of its own first)")
    identities = []  # the new table's identity columns take their sequence's state from the old one's at the swap
    for c in desired_columns:
        was = had.get(c[0])
        if was is not None and bool(c[5]) != bool(was[5]):
            raise _refuse(table, why, f"the desired table {'makes' if c[5] else 'no longer makes'} {c[0]} an identity column "
                          "too (change it in a plan of its own)")
        if not c[5]:
            continue
        if was is None:
            raise _refuse(table, why, f"its new column {c[0]} is an identity column (add it in a plan of its own)")
        default = f"{table.split('.', 1)[1]}_{c[0]}_seq"
        if str(c[9]).split(".", 1)[1] != default or len(default) > 63:
            raise _refuse(table, why, f"the sequence of its identity column {c[0]} is {c[9]}, not {default}, the "
                          "name the new table's would take (rename it in a plan of its own)")
        identities.append((str(c[0]), str(was[9])))
    persistence, partkey, options, comment = checks[("desired", table)][:4]
    key = tuple(checks[("live", table)][10] or ())
    new_key = tuple(checks[("desired", table)][10] or ())
    parts = [sql.SQL("{} {}").format(sql.Identifier(c[0]), sql.SQL(_column(c))) for c in desired_columns]
    keys = []  # each by an ALTER of its own: CREATE TABLE would leave out one that repeats another's columns
    for name, definition, contype, self_reference in desired.execute(_CONSTRAINTS, (ident,)).fetchall():
        if self_reference:
            raise _refuse(table, why, f"its foreign key {name} references the table itself")
        if contype in ("p", "u", "x"):
            # dropped first if there: a run stopped part-way may have made it (the statement is made again the same)
            keys.append(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}, ADD CONSTRAINT {} {}").format(
                _name(table), sql.Identifier(name), sql.Identifier(name), sql.SQL(definition)).as_string(None))
        else:
            parts.append(sql.SQL("CONSTRAINT {} {}").format(sql.Identifier(name), sql.SQL(definition)))
    create = sql.SQL("CREATE {}TABLE {} ({})").format(sql.SQL("UNLOGGED " if persistence == "u" else ""),
                                                      _name(table), sql.SQL(", ").join(parts))
    if partkey:
        create += sql.SQL(" PARTITION BY {}").format(sql.SQL(partkey))
    if options:
        create += sql.SQL(" WITH ({})").format(sql.SQL(options))
    partitions = [_partition(context, name) for name in desired_family[1:]]
    family_ids = [_ident(m) for m in desired_family]
    indexes = []
    for index, definition in desired.execute(_INDEXES, (family_ids, family_ids)).fetchall():
        if definition:
            indexes.append(definition)
        holder = names["live"].get(index)
        if holder is not None and holder not in live_family:
            raise _refuse(table, why, f"the new table's index {index} has the name of a relation live has elsewhere")
    # every index of the old table renamed away (not only those whose names the new one's take): until the contract
    # drops it, all the old table has carries the rebuild's suffix
    taken = sorted(index for index, holder in names["live"].items() if holder in live_family)
    comments = [sql.SQL("COMMENT ON TABLE {} IS {}").format(_name(table), sql.Literal(comment))] if comment else []
    comments += [sql.SQL("COMMENT ON COLUMN {} IS {}").format(sql.Identifier(*table.split(".", 1), column),
                                                             sql.Literal(text))
                 for column, text in desired.execute(_COMMENTS, (ident,)).fetchall()]
    privileges = desired if context.options.manage_privileges else live
    grants = [sql.SQL("GRANT {} ON TABLE {} TO {}{}").format(sql.SQL(privilege), _name(table), sql.SQL(grantee),
                                                           sql.SQL(" WITH GRANT OPTION" if grantable else ""))
              for grantee, privilege, grantable in privileges.execute(_GRANTS, (ident,)).fetchall()]
    triggers = tuple(str(t) for (t,) in desired.execute(_TRIGGERS, (ident,)).fetchall())
    views = tuple(sql.SQL("CREATE OR REPLACE VIEW {}{} AS {}").format(
        sql.Identifier(schema, view), sql.SQL(f" WITH ({options})" if options else ""),
        sql.SQL(str(definition).strip().removesuffix(";"))).as_string(None)
        for schema, view, definition, options in desired.execute(_VIEWS, (ident, ident)).fetchall())
    references = tuple((ref, name, definition) for ref, name, definition in
                       desired.execute(_REFERENCES, (ident, family_ids)).fetchall())
    sequences = tuple((s, c) for s, c in live.execute(_SEQUENCES, (ident,)).fetchall() if c in wanted)
    shapes = _shapes(context, "live")
    sources = tuple(m for m in live_family if shapes[m].kind == "r")
    copied = tuple(c[0] for c in live_columns if not wanted[c[0]][6])
    return Rebuild(table=table, why=why, key=key, new_key=new_key, columns=copied, sources=sources, create=create.as_string(None),
                   partitions=tuple(partitions), keys=tuple(keys), indexes=tuple(indexes),
                   comments=tuple(c.as_string(None) for c in comments),
                   grants=tuple(g.as_string(None) for g in grants), references=references, sequences=sequences,
                   renamed=tuple(taken), retired=tuple(live_family[1:]), original=original, triggers=triggers,
                   views=views, identities=tuple(identities),
                   **_kept(context, table, names["live"]))


def _kept(context: Context, table: str, live_names: dict[str, str]) -> dict[str, Any]:
    """The old table a held contract kept (``<table>_reconciler_old_<tag>``, kept in step by the trigger
    ``reconciler_back_<tag>`` on the table), where it is what the desired schema wants: the rebuild swaps it back."""
    schema, name = table.split(".", 1)
    for candidate, holder in sorted(live_names.items()):
        match = _KEPT.fullmatch(candidate.removeprefix(f"{schema}.{name}"))
        if holder or not candidate.startswith(f"{schema}.") or match is None:
            continue
        row = context.live.execute("SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s)",
                                   (_ident(table), f"reconciler_back_{match.group(1)}")).fetchone()
        shape = _shape(context.live, candidate)
        if row and row[0] and shape[0] and shape[0][0] == "r" and shape == _shape(context.desired, table):
            return {"kept": candidate, "kept_indexes": tuple(i for i, h in sorted(live_names.items()) if h == candidate)}
    return {}


def _shape(conn: psycopg.Connection[Any], table: str) -> tuple[Any, ...]:
    """A table's definition with the names of its constraints and indexes left out (the rebuild renamed them)."""
    ident = _ident(table)
    row = conn.execute("SELECT relkind::text, pg_get_partkeydef(oid), relpersistence::text FROM pg_class "
                       "WHERE oid = %s::regclass", (ident,)).fetchone()
    columns = tuple(tuple(c[:7]) for c in conn.execute(_COLUMNS, (ident,)).fetchall())
    constraints = sorted((str(c[2]), str(c[1])) for c in conn.execute(_CONSTRAINTS, (ident,)).fetchall())
    indexes = sorted(_unnamed(str(d)) for (d,) in conn.execute(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s::regclass", (ident,)).fetchall())
    return (row, columns, tuple(constraints), tuple(indexes))


def _unnamed(definition: str) -> str:
    node = pglast.parse_sql(definition)[0].stmt
    assert isinstance(node, ast.IndexStmt) and node.relation is not None
    node.idxname, node.relation.relname = "i", "t"
    return str(pglast.stream.RawStream()(node))


def _partition(context: Context, name: str) -> str:
    shape = _shapes(context, "desired")[name]
    assert shape.parent is not None and shape.bound is not None
    statement = sql.SQL("CREATE TABLE {} PARTITION OF {}").format(_name(name), _name(shape.parent))
    own = [sql.SQL("CONSTRAINT {} {}").format(sql.Identifier(n), sql.SQL(d))
           for n, d, contype, _self in context.desired.execute(_CONSTRAINTS, (_ident(name),)).fetchall()
           if contype == "c"]
    if own:
        statement += sql.SQL(" ({})").format(sql.SQL(", ").join(own))
    statement += sql.SQL(" {}").format(sql.SQL(shape.bound))
    if shape.kind == "p" and shape.key:
        statement += sql.SQL(" PARTITION BY {}").format(sql.SQL(shape.key))
    return statement.as_string(None)


def _column(c: tuple[object, ...]) -> str:
    """A column's definition after its name (``_COLUMNS``' row)."""
    type_, collation, default, not_null, identity, generated, not_null_name, sequence, _named = c[1:]
    text = str(type_)
    if collation:
        text += f" COLLATE {collation}"
    if identity:
        text += f" GENERATED {'ALWAYS' if identity == 'a' else 'BY DEFAULT'} AS IDENTITY ({sequence})"
    elif generated == "s":
        text += f" GENERATED ALWAYS AS ({default}) STORED"
    elif generated == "v":
        text += f" GENERATED ALWAYS AS ({default}) VIRTUAL"
    elif default is not None:
        text += f" DEFAULT {default}"
    if not_null:
        text += (sql.SQL(" CONSTRAINT {} NOT NULL").format(sql.Identifier(str(not_null_name))).as_string(None)
                 if not_null_name else " NOT NULL")
    return text


def _name(table: str) -> sql.Identifier:
    return sql.Identifier(*table.split(".", 1))


def _ident(table: str) -> str:
    return _name(table).as_string(None)


def _script(rebuild: Rebuild) -> str:
    """The rebuild as one script, for the record of what the diff said (the compiler makes the steps)."""
    return ";\n".join([rebuild.create, *rebuild.partitions, *rebuild.keys, *rebuild.indexes, *rebuild.comments, *rebuild.grants]) + ";"


def _without(context: Context, found: dict[str, Change], changes: list[Change], *, keep: bool = False) -> list[Change]:
    """``changes`` without those about the rebuilt tables, their partitions, their indexes and the foreign keys to
    them (the rebuild makes each of them)."""
    live, desired = _shapes(context, "live"), _shapes(context, "desired")
    family: set[str] = set()
    for table, c in found.items():
        family |= {*_family(live, table), *_family(desired, table)}
        if c.rebuild and c.rebuild.kept:
            family.add(c.rebuild.kept)
    indexes = {name for side in ("live", "desired") for name, holder in context.rows(side, _NAMES)
               if holder in family}
    references = {f"{ref}.{name}" for c in found.values() if c.rebuild for ref, name, _d in c.rebuild.references}
    # and live's foreign keys to them, with the copies PostgreSQL makes of one to a partitioned table (re-pointed)
    present = [_ident(t) for t in sorted(family) if t in live]
    references |= {str(r[0]) for r in context.live.execute(_REFERRING, (present,)).fetchall()}
    # what a run stopped part-way left in the shadow schema: the rebuild goes on with it
    shadows = {c.rebuild.shadow_schema for c in found.values() if c.rebuild}

    def about(change: Change) -> bool:
        for part in change.object.split(", "):
            if part in family or part in indexes or part in references or part.split(".", 1)[0] in shadows:
                return True
            if "." in part and part.rsplit(".", 1)[0] in family:  # a column, constraint or trigger of one
                return True
        return False

    return [c for c in changes if about(c) == keep]
