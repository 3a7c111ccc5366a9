"""Table properties migra ignores: storage parameters, row security (FORCE), replica identity, column
collations of new columns, generated-column expressions; and its phantom CREATE TABLE of a table
that has no columns (schemainspect cannot see it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from psycopg import sql

from ..base import Change
from . import Context, change, managed, not_extension_member, reloptions

_TABLES = f"""
SELECT n.nspname, c.relname, c.relkind::text, coalesce(c.reloptions, '{{}}'::text[]), c.relrowsecurity,
       c.relforcerowsecurity, c.relreplident::text,
       (SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
        WHERE i.indrelid = c.oid AND i.indisreplident)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND {managed('n')} AND {not_extension_member('pg_class', 'c.oid')}
"""

_COLUMNS = f"""
SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
       CASE WHEN a.attcollation <> t.typcollation THEN co.collname END,
       CASE WHEN co.collnamespace <> 'pg_catalog'::regnamespace THEN cn.nspname END,
       a.attgenerated::text, CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END,
       CASE WHEN a.attstattarget >= 0 THEN a.attstattarget::int END
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_collation co ON co.oid = a.attcollation LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
  AND a.attislocal  -- a partition's or child's inherited column follows its parent
  AND {managed('n')} AND {not_extension_member('pg_class', 'c.oid')}
"""


@dataclass(frozen=True)
class TableState:
    kind: str
    options: tuple[str, ...]
    rls: bool
    force_rls: bool
    replica_identity: str  # d, n, f or i
    replica_index: str | None

    @classmethod
    def new(cls, kind: str) -> TableState:
        return cls(kind, (), False, False, "d", None)


def _tables(context: Context, side: str) -> dict[tuple[str, str], TableState]:
    return {(schema, name): TableState(kind, tuple(sorted(options)), bool(rls), bool(force), ident, index)
            for schema, name, kind, options, rls, force, ident, index in context.rows(side, _TABLES)}


def table_properties(context: Context, changes: list[Change]) -> list[Change]:
    live, desired = _tables(context, "live"), _tables(context, "desired")
    engine_rls = {(c.object, c.kind) for c in changes if c.kind in ("enable_rls", "disable_rls")}
    out = [c for c in changes if not _phantom_create(c, live)]
    tail: list[Change] = []
    for (schema, name), want in sorted(desired.items()):
        have = live.get((schema, name))
        if have is None or have.kind != want.kind:
            have = TableState.new(want.kind)
        label = f"{schema}.{name}"
        table = sql.Identifier(schema, name)

        def alter(action: sql.Composable, kind: str) -> None:
            tail.append(change(sql.SQL("ALTER TABLE {} {}").format(table, action), kind, label))  # noqa: B023

        if want.options != have.options:
            wanted, current = reloptions(want.options), reloptions(have.options)
            gone = sorted(set(current) - set(wanted))
            if gone:
                alter(sql.SQL("RESET ({})").format(sql.SQL(", ").join(sql.SQL(o) for o in gone)), "set_storage_parameters")
            changed = {k: v for k, v in wanted.items() if current.get(k) != v}
            if changed:
                alter(sql.SQL("SET ({})").format(sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.SQL(k), sql.Literal(v)) for k, v in sorted(changed.items()))),
                    "set_storage_parameters")
        if want.rls != have.rls and (label, "enable_rls" if want.rls else "disable_rls") not in engine_rls:
            alter(sql.SQL("ENABLE ROW LEVEL SECURITY" if want.rls else "DISABLE ROW LEVEL SECURITY"),
                  "enable_rls" if want.rls else "disable_rls")
        if want.force_rls != have.force_rls:
            alter(sql.SQL("FORCE ROW LEVEL SECURITY" if want.force_rls else "NO FORCE ROW LEVEL SECURITY"), "force_rls")
        if (want.replica_identity, want.replica_index) != (have.replica_identity, have.replica_index):
            if want.replica_identity == "i" and want.replica_index:
                action = sql.SQL("REPLICA IDENTITY USING INDEX {}").format(sql.Identifier(want.replica_index))
            else:
                action = sql.SQL("REPLICA IDENTITY {}").format(
                    sql.SQL({"d": "DEFAULT", "n": "NOTHING", "f": "FULL"}.get(want.replica_identity, "DEFAULT")))
            alter(action, "set_replica_identity")
    return [*out, *tail]


def _phantom_create(c: Change, live: dict[tuple[str, str], TableState]) -> bool:
    """schemainspect misses tables with no columns: migra re-creates them though they exist."""
    if c.kind != "create_table" or "." not in c.object:
        return False
    schema, name = c.object.split(".", 1)
    return (schema, name) in live and not c.sql.split("(", 1)[-1].strip(" \n)")


class ColumnState(NamedTuple):
    type: str
    collation: str | None
    collation_schema: str | None
    generated: str
    expression: str | None
    statistics: int | None  # None: the default target


def column_properties(context: Context, changes: list[Change]) -> list[Change]:
    """Collations of columns migra adds (it leaves COLLATE out of CREATE TABLE), generated-column
    expressions and statistics targets, which it does not compare. The rows are compared as read: a state is
    made only for a column that differs (125,000 columns a side at 5,000 tables)."""
    live = {row[:3]: row[3:] for row in context.rows("live", _COLUMNS)}
    desired = context.rows("desired", _COLUMNS)
    generated = {f"{r[0]}.{r[1]}.{r[2]}" for r in desired if r[6]}
    changes = [c for c in changes if not (c.kind in ("set_default", "drop_default") and c.object in generated)]
    tail: list[Change] = []
    for row in sorted((r for r in desired if r[3:] != live.get(r[:3]) and (
            r[:3] in live or r[4] is not None or r[8] is not None)), key=lambda r: r[:3]):
        want, found = ColumnState._make(row[3:]), live.get(row[:3])
        have = ColumnState._make(found) if found is not None else None
        schema, table, column = row[:3]
        label = f"{schema}.{table}.{column}"
        target = sql.Identifier(schema, table)
        col = sql.Identifier(column)
        if have is None and want.collation is not None:
            collation = (sql.Identifier(want.collation_schema, want.collation) if want.collation_schema
                         else sql.Identifier(want.collation))
            tail.append(change(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} COLLATE {}").format(
                target, col, sql.SQL(want.type), collation), "alter_column_collation", label))
        if (have is not None and want.generated != "" and have.generated == want.generated  # stored or virtual (18)
                and want.expression != have.expression
                and want.type == have.type):
            expression = sql.SQL(want.expression or "")
            if context.live.info.server_version >= 170000:
                statement = sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET EXPRESSION AS ({})").format(target, col, expression)
            else:  # before PostgreSQL 17 a generated column's expression is fixed: add it again (values are derived)
                statement = sql.SQL("ALTER TABLE {} DROP COLUMN {}, ADD COLUMN {} {} GENERATED ALWAYS AS ({}) STORED").format(
                    target, col, col, sql.SQL(want.type), expression)
            tail.append(change(statement, "alter_generated_expression", label))
        if want.statistics != (have.statistics if have is not None else None):
            tail.append(change(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STATISTICS {}").format(
                target, col, sql.Literal(-1 if want.statistics is None else want.statistics)), "set_statistics", label))
    return [*changes, *tail]


_NOT_VALID = f"""
SELECT n.nspname || '.' || c.relname || '.' || con.conname
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT con.convalidated AND {managed('n')}
"""


def not_valid_constraints(context: Context, changes: list[Change]) -> list[Change]:
    """A constraint the desired schema keeps NOT VALID stays so: migra validates every constraint it adds."""
    wanted = {r[0] for r in context.rows("desired", _NOT_VALID)}
    out = []
    for c in changes:
        if c.kind == "validate_constraint" and c.object in wanted:
            continue
        if c.kind.startswith("add_") and c.object in wanted:
            c = Change(sql=_once_not_valid(c.sql), kind=c.kind, object=c.object, engine=c.engine)
        out.append(c)
    return out


def _once_not_valid(statement: str) -> str:
    """migra appends 'not valid' to a definition that already ends with NOT VALID."""
    text = statement.rstrip().rstrip(";")
    if text.lower().endswith("not valid not valid"):
        return text[: -len(" not valid")]
    return statement


def default_after_type(context: Context, changes: list[Change]) -> list[Change]:
    """migra sets a column's new default before changing its type, so a default of the new type fails;
    and the old default must be cast with the column. Both go: drop the default, change the type, set
    the new default."""
    del context
    retyped = {c.object for c in changes if c.kind == "alter_column_type"}
    defaults = {c.object: c for c in changes if c.kind == "set_default" and c.object in retyped}
    if not defaults:
        return changes
    out: list[Change] = []
    for c in changes:
        if c.kind == "set_default" and c.object in defaults:
            continue
        if c.kind == "alter_column_type" and c.object in defaults:
            schema, table, column = _split_column(c.object)
            out.append(change(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT").format(
                sql.Identifier(schema, table), sql.Identifier(column)), "drop_default", c.object))
            out += [c, defaults[c.object]]
            continue
        out.append(c)
    return out


def _split_column(label: str) -> tuple[str, str, str]:
    """'schema.table.column' as migra's changes name it (names unquoted; a table name may hold dots,
    so split the schema off the left and the column off the right)."""
    schema, rest = label.split(".", 1)
    table, column = rest.rsplit(".", 1)
    return schema, table, column
