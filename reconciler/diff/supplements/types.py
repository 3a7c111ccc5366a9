"""Domains, composite types and range types, which migra skips (domains, ranges) or recreates in the
wrong place (composite types, after the columns that use them, and by drop and create).

New types are created first, in the order the desired schema created them (its OIDs: an order that
loaded, so one that respects their dependencies); removed ones are dropped last, newest first.
Changes are made in place (ALTER DOMAIN, ALTER TYPE ... ATTRIBUTE) so columns using them keep their data.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from ...errors import ReconcilerError
from ..base import Change
from . import Context, change, first_index, insert_at, managed, not_extension_member

_PRELUDE = ("create_schema", "create_extension", "create_enum")

# array[name, text] is a name[]: every element cut to 63 bytes (a long CHECK's definition, a long type's name); the
# names are cast to text first
_DOMAINS = f"""
SELECT n.nspname, t.typname, t.oid::int, format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typdefault,
       CASE WHEN t.typcollation <> bt.typcollation THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END,
       coalesce((SELECT array_agg(array[con.conname::text, pg_get_constraintdef(con.oid)] ORDER BY con.conname)
                 FROM pg_constraint con WHERE con.contypid = t.oid AND con.contype = 'c'), '{{}}')
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_type bt ON bt.oid = t.typbasetype
LEFT JOIN pg_collation co ON co.oid = t.typcollation LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
WHERE t.typtype = 'd' AND {managed('n')} AND {not_extension_member('pg_type', 't.oid')}
"""

_COMPOSITES = f"""
SELECT n.nspname, t.typname, t.oid::int,
       coalesce((SELECT array_agg(array[a.attname::text, format_type(a.atttypid, a.atttypmod),
                                        CASE WHEN a.attcollation <> at.typcollation
                                             THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END]
                                  ORDER BY a.attnum)
                 FROM pg_attribute a JOIN pg_type at ON at.oid = a.atttypid
                 LEFT JOIN pg_collation co ON co.oid = a.attcollation
                 LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
                 WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped), '{{}}')
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_class c ON c.oid = t.typrelid
WHERE t.typtype = 'c' AND c.relkind = 'c' AND {managed('n')} AND {not_extension_member('pg_type', 't.oid')}
"""

_ALL_COMPOSITES = f"""
SELECT n.nspname || '.' || t.typname
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_class c ON c.oid = t.typrelid
WHERE t.typtype = 'c' AND c.relkind = 'c' AND {managed('n')}
"""

_RANGES = f"""
SELECT n.nspname, t.typname, t.oid::int, format_type(r.rngsubtype, NULL),
       CASE WHEN r.rngsubdiff <> 0 THEN r.rngsubdiff::regprocedure::text END,
       CASE WHEN r.rngcollation <> 0 AND r.rngcollation <> st.typcollation
            THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END,
       CASE WHEN NOT oc.opcdefault THEN quote_ident(ocn.nspname) || '.' || quote_ident(oc.opcname) END,
       quote_ident(mn.nspname) || '.' || quote_ident(m.typname),
       CASE WHEN r.rngcanonical <> 0 THEN r.rngcanonical::regproc::text END
FROM pg_range r JOIN pg_type t ON t.oid = r.rngtypid JOIN pg_namespace n ON n.oid = t.typnamespace
JOIN pg_type st ON st.oid = r.rngsubtype
JOIN pg_opclass oc ON oc.oid = r.rngsubopc JOIN pg_namespace ocn ON ocn.oid = oc.opcnamespace
LEFT JOIN pg_collation co ON co.oid = r.rngcollation LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
LEFT JOIN pg_type m ON m.oid = r.rngmultitypid LEFT JOIN pg_namespace mn ON mn.oid = m.typnamespace
WHERE {managed('n')} AND {not_extension_member('pg_type', 't.oid')}
"""


@dataclass(frozen=True)
class Domain:
    oid: int
    base: str
    not_null: bool
    default: str | None
    collation: str | None
    constraints: tuple[tuple[str, str], ...]  # (name, definition)


@dataclass(frozen=True)
class Composite:
    oid: int
    attributes: tuple[tuple[str, str, str | None], ...]  # (name, type, collation)


@dataclass(frozen=True)
class Range:
    oid: int
    subtype: str
    subtype_diff: str | None
    collation: str | None
    opclass: str | None
    multirange: str | None
    canonical: str | None


def _domains(context: Context, side: str) -> dict[tuple[str, str], Domain]:
    return {(s, n): Domain(oid, base, bool(nn), default, coll, tuple((c[0], c[1]) for c in cons))
            for s, n, oid, base, nn, default, coll, cons in context.rows(side, _DOMAINS)}


def _composites(context: Context, side: str) -> dict[tuple[str, str], Composite]:
    return {(s, n): Composite(oid, tuple((a[0], a[1], a[2]) for a in attrs))
            for s, n, oid, attrs in context.rows(side, _COMPOSITES)}


def _ranges(context: Context, side: str) -> dict[tuple[str, str], Range]:
    return {(s, n): Range(oid, *rest) for s, n, oid, *rest in context.rows(side, _RANGES)}


def _collate(collation: str | None) -> sql.Composable:
    # collation names come from quote_ident on the catalog: already quoted
    return sql.SQL(" COLLATE {}").format(sql.SQL(collation)) if collation else sql.SQL("")


_NOT_VALID = " NOT VALID"  # how pg_get_constraintdef ends an unvalidated constraint's definition


def _create_domain(name: sql.Identifier, label: str, d: Domain) -> list[Change]:
    """CREATE DOMAIN, then its NOT VALID constraints added by ALTER DOMAIN (CREATE DOMAIN takes no NOT VALID)."""
    parts: list[sql.Composable] = [sql.SQL("CREATE DOMAIN {} AS {}").format(name, sql.SQL(d.base)), _collate(d.collation)]
    if d.default is not None:
        parts.append(sql.SQL(" DEFAULT {}").format(sql.SQL(d.default)))
    if d.not_null:
        parts.append(sql.SQL(" NOT NULL"))
    later: list[Change] = []
    for con, definition in d.constraints:
        if definition.endswith(_NOT_VALID):
            later.append(change(sql.SQL("ALTER DOMAIN {} ADD CONSTRAINT {} {}").format(
                name, sql.Identifier(con), sql.SQL(definition)), "alter_domain", label))
        else:
            parts.append(sql.SQL(" CONSTRAINT {} {}").format(sql.Identifier(con), sql.SQL(definition)))
    return [change(sql.Composed(parts), "create_domain", label), *later]


def _alter_domain(name: sql.Identifier, label: str, have: Domain, want: Domain) -> tuple[list[Change], list[Change]]:
    """(statements that loosen, statements that tighten): constraints dropped before columns change,
    added after."""
    if have.base != want.base or have.collation != want.collation:
        raise ReconcilerError(
            f"domain {label}: its base type changes from {have.base}{_collate(have.collation).as_string(None)} to "
            f"{want.base}{_collate(want.collation).as_string(None)}, which PostgreSQL cannot alter; create a new "
            "domain, move the columns to it, then drop this one")
    loosen: list[Change] = []
    tighten: list[Change] = []

    def alter(action: sql.Composable, into: list[Change]) -> None:
        into.append(change(sql.SQL("ALTER DOMAIN {} {}").format(name, action), "alter_domain", label))

    if have.default != want.default:
        alter(sql.SQL("SET DEFAULT {}").format(sql.SQL(want.default)) if want.default is not None
              else sql.SQL("DROP DEFAULT"), loosen)
    if have.not_null != want.not_null:
        alter(sql.SQL("SET NOT NULL" if want.not_null else "DROP NOT NULL"), tighten if want.not_null else loosen)
    wanted, current = dict(want.constraints), dict(have.constraints)
    validated = {con for con, definition in current.items() if definition == wanted.get(con, "") + _NOT_VALID}
    for con, definition in sorted(current.items()):
        if wanted.get(con) != definition and con not in validated:
            alter(sql.SQL("DROP CONSTRAINT {}").format(sql.Identifier(con)), loosen)
    for con, definition in sorted(wanted.items()):
        if con in validated:  # the same check, now to hold for every value: validated in place
            alter(sql.SQL("VALIDATE CONSTRAINT {}").format(sql.Identifier(con)), tighten)
        elif current.get(con) != definition:
            alter(sql.SQL("ADD CONSTRAINT {} {}").format(sql.Identifier(con), sql.SQL(definition)), tighten)
    return loosen, tighten


def _attribute(name: str, type_: str, collation: str | None) -> sql.Composable:
    return sql.SQL("{} {}{}").format(sql.Identifier(name), sql.SQL(type_), _collate(collation))


def _alter_composite(name: sql.Identifier, label: str, have: Composite, want: Composite) -> list[Change]:
    current = {a[0]: a for a in have.attributes}
    wanted = {a[0]: a for a in want.attributes}
    actions: list[sql.Composable] = []
    for attr in have.attributes:
        if attr[0] not in wanted:
            actions.append(sql.SQL("DROP ATTRIBUTE {}").format(sql.Identifier(attr[0])))
    for attr in want.attributes:
        old = current.get(attr[0])
        if old is None:
            actions.append(sql.SQL("ADD ATTRIBUTE {}").format(_attribute(*attr)))
        elif old != attr:
            actions.append(sql.SQL("ALTER ATTRIBUTE {} TYPE {}{}").format(
                sql.Identifier(attr[0]), sql.SQL(attr[1]), _collate(attr[2])))
    if not actions:
        return []
    # CASCADE: the change reaches the columns of that type (PostgreSQL refuses it without)
    return [change(sql.SQL("ALTER TYPE {} {} CASCADE").format(name, sql.SQL(", ").join(actions)), "alter_composite_type", label)]


def _create_range(name: sql.Identifier, r: Range) -> sql.Composable:
    options: list[sql.Composable] = [sql.SQL("SUBTYPE = {}").format(sql.SQL(r.subtype))]
    if r.opclass:
        options.append(sql.SQL("SUBTYPE_OPCLASS = {}").format(sql.SQL(r.opclass)))
    if r.collation:
        options.append(sql.SQL("COLLATION = {}").format(sql.SQL(r.collation)))
    if r.canonical:
        options.append(sql.SQL("CANONICAL = {}").format(sql.SQL(r.canonical)))
    if r.subtype_diff:
        options.append(sql.SQL("SUBTYPE_DIFF = {}").format(sql.SQL(r.subtype_diff.split("(", 1)[0])))
    if r.multirange:
        options.append(sql.SQL("MULTIRANGE_TYPE_NAME = {}").format(sql.SQL(r.multirange)))
    return sql.SQL("CREATE TYPE {} AS RANGE ({})").format(name, sql.SQL(", ").join(options))


def user_types(context: Context, changes: list[Change]) -> list[Change]:
    live_domains, desired_domains = _domains(context, "live"), _domains(context, "desired")
    live_composites, desired_composites = _composites(context, "live"), _composites(context, "desired")
    live_ranges, desired_ranges = _ranges(context, "live"), _ranges(context, "desired")
    # every composite type, an extension's too: migra recreates those, which their extension already made
    composite_names = {r[0] for side in ("live", "desired") for r in context.rows(side, _ALL_COMPOSITES)}
    out = [c for c in changes
           if not (c.kind in ("create_composite_type", "drop_type") and c.object in composite_names)]

    creates: list[tuple[int, Change]] = []
    drops: list[tuple[int, Change]] = []
    loosen: list[Change] = []
    tighten: list[Change] = []
    for (schema, name), want_d in desired_domains.items():
        label, ident = f"{schema}.{name}", sql.Identifier(schema, name)
        have_d = live_domains.get((schema, name))
        if have_d is None:
            creates += [(want_d.oid, c) for c in _create_domain(ident, label, want_d)]  # in order: sorted() is stable
        else:
            less, more = _alter_domain(ident, label, have_d, want_d)
            loosen += less
            tighten += more
    for (schema, name), want_c in desired_composites.items():
        label, ident = f"{schema}.{name}", sql.Identifier(schema, name)
        have_c = live_composites.get((schema, name))
        if have_c is None:
            statement = sql.SQL("CREATE TYPE {} AS ({})").format(
                ident, sql.SQL(", ").join(_attribute(*a) for a in want_c.attributes))
            creates.append((want_c.oid, change(statement, "create_composite_type", label)))
        else:
            tighten += _alter_composite(ident, label, have_c, want_c)
    for (schema, name), want_r in desired_ranges.items():
        label, ident = f"{schema}.{name}", sql.Identifier(schema, name)
        have_r = live_ranges.get((schema, name))
        if have_r is None:
            creates.append((want_r.oid, change(_create_range(ident, want_r), "create_range_type", label)))
        elif (have_r.subtype, have_r.subtype_diff, have_r.collation, have_r.opclass, have_r.canonical) != \
                (want_r.subtype, want_r.subtype_diff, want_r.collation, want_r.opclass, want_r.canonical):
            raise ReconcilerError(f"range type {label}: its definition changes, which PostgreSQL cannot alter; "
                                  "create a new range type, move the columns to it, then drop this one")
    for kind, live_side, desired_side in (("DOMAIN", live_domains, desired_domains),
                                          ("TYPE", live_composites, desired_composites),
                                          ("TYPE", live_ranges, desired_ranges)):
        for (schema, name), have in live_side.items():
            if (schema, name) not in desired_side:
                drops.append((have.oid, change(sql.SQL("DROP {} {}").format(sql.SQL(kind), sql.Identifier(schema, name)),
                                               "drop_domain" if kind == "DOMAIN" else "drop_type", f"{schema}.{name}")))
    start = first_index(out, lambda c: c.kind not in _PRELUDE, len(out))
    front = [c for _, c in sorted(creates, key=lambda p: p[0])] + loosen + tighten
    return [*insert_at(out, start, front), *(c for _, c in sorted(drops, key=lambda p: -p[0]))]
