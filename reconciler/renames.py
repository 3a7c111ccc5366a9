"""Rename annotations: ``-- reconciler: renamed from <old name>`` turns a drop and add into a rename.

The annotation is a comment on a line of its own, directly above the ``CREATE TABLE`` it renames,
or above a column definition (in ``CREATE TABLE`` or ``ALTER TABLE ... ADD COLUMN``). A table's old
name may be schema-qualified (same schema only); a column's old name is a bare column name.
Identifiers follow SQL: unquoted names fold to lower case, "quoted" ones are taken as written.

At plan time each annotation is resolved against the live database: the old name there and not the
new one means a rename step, the new name there already means it was applied before (nothing to do),
and anything else is an error that names the annotation's file and line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import psycopg
from psycopg import sql

from .annotations import Target, annotation_comments, starting_lines
from .diff.base import Change
from .diff.classify import classify
from .errors import ReconcilerError, SchemaLoadError
from .inspect import LiveFacts
from .source import DesiredSchema

ENGINE = "renames"
DEFAULT_SCHEMA = "public"

_MARKER = re.compile(r"^--\s*reconciler\s*:\s*renamed\b", re.IGNORECASE)
_ANNOTATION = re.compile(r"^--\s*reconciler\s*:\s*renamed\s+from\s+(?P<name>.+?)\s*$", re.IGNORECASE)
_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*)'


@cache
def _name_pattern() -> re.Pattern[str]:
    """Compiled on first use: its wide character ranges take 10 ms to compile, paid by every plan that imports us."""
    return re.compile(rf"^(?P<first>{_IDENT})(?:\s*\.\s*(?P<second>{_IDENT}))?$")


@dataclass(frozen=True)
class Rename:
    """One annotation: ``old`` becomes ``new``; for a column, in table ``schema.table`` (its new name)."""

    kind: str  # "table" or "column"
    schema: str
    table: str  # the table's name in the desired schema (for a table rename, the same as ``new``)
    old: str
    new: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def source(self) -> str:
        """The object the annotation renames, as it is named before the rename."""
        return f"{self.schema}.{self.old}" if self.kind == "table" else f"{self.schema}.{self.table}.{self.old}"

    @property
    def target(self) -> str:
        return f"{self.schema}.{self.new}" if self.kind == "table" else f"{self.schema}.{self.table}.{self.new}"

    def describe(self) -> str:
        return f"{self.kind} {self.source} to {self.target}"


# --- reading the annotations ---------------------------------------------------------------------

def _unquote(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident.lower()


def _parse_name(text: str) -> tuple[str | None, str] | None:
    match = _name_pattern().match(text.strip().rstrip(";").strip())
    if match is None:
        return None
    first, second = match.group("first"), match.group("second")
    return (None, _unquote(first)) if second is None else (_unquote(first), _unquote(second))


def read_renames(source: DesiredSchema) -> tuple[Rename, ...]:
    """Every rename annotation of the desired schema, checked for form and placement."""
    renames: list[Rename] = []
    for schema_file in source.files:
        annotations = list(annotation_comments(schema_file, _MARKER))
        if not annotations:
            continue
        targets = starting_lines(schema_file)
        for offset, line, comment in annotations:
            column = offset - schema_file.text.rfind("\n", 0, offset)
            if schema_file.text[offset - column + 1:offset].strip():
                raise SchemaLoadError(schema_file.path, line, column, "a rename annotation must be on a line of its own, "
                                      "directly above the CREATE TABLE or column definition it renames")
            match = _ANNOTATION.match(comment)
            name = _parse_name(match.group("name")) if match else None
            if name is None:
                raise SchemaLoadError(schema_file.path, line, column, f"cannot read the rename annotation {comment!r}: "
                                      "write '-- reconciler: renamed from <old name>' (a table name, optionally "
                                      "schema-qualified, or a column name)")
            try:
                renames.append(_rename(schema_file.path, line, name, targets.get(line + 1, [])))
            except _Misplaced as exc:
                raise SchemaLoadError(schema_file.path, line, column, str(exc)) from None
    _check_unique(renames)
    return tuple(renames)


class _Misplaced(Exception):
    """An annotation that cannot apply where it stands (read_renames adds file, line and column)."""


def _rename(path: str, line: int, name: tuple[str | None, str], candidates: list[Target]) -> Rename:
    tables = [t for t in candidates if t.kind == "table"]
    columns = [t for t in candidates if t.kind == "column"]
    if not tables and not columns:
        raise _Misplaced(f"the rename annotation is not directly above a CREATE TABLE statement or a column "
                         f"definition (line {line + 1} starts neither)")
    qualifier, old = name
    if tables:
        target = tables[0]
        if qualifier is not None and qualifier != target.schema:
            raise _Misplaced(f"table {target.schema}.{target.name} cannot be renamed from {qualifier}.{old}: "
                             "a rename annotation keeps a table in its schema (move it with ALTER TABLE ... SET SCHEMA)")
    else:
        if len(columns) > 1:
            names = ", ".join(c.name for c in columns)
            raise _Misplaced(f"line {line + 1} defines more than one column ({names}): put the renamed column "
                             "on a line of its own")
        target = columns[0]
        if qualifier is not None:
            raise _Misplaced(f"a column's old name is a bare column name, not {qualifier}.{old}")
    if old == target.name:
        raise _Misplaced(f"{target.kind} {target.name} is annotated as renamed from itself")
    return Rename(kind=target.kind, schema=target.schema, table=target.table, old=old, new=target.name,
                  file=path, line=line)


def _check_unique(renames: Sequence[Rename]) -> None:
    seen: dict[tuple[str, ...], Rename] = {}
    for r in renames:
        for key in ((r.kind, r.schema, r.table if r.kind == "column" else "", "old", r.old),
                    (r.kind, r.schema, r.table if r.kind == "column" else "", "new", r.new)):
            other = seen.get(key)
            if other is not None:
                raise ReconcilerError(f"{r.where}: {r.describe()} clashes with the rename annotation at {other.where} "
                                  f"({other.describe()})")
            seen[key] = r


# --- resolving them against a database -----------------------------------------------------------

def _table_oid(conn: psycopg.Connection[Any], schema: str, table: str) -> int | None:
    row = conn.execute(
        """SELECT c.oid::int FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'f')""", (schema, table)).fetchone()
    return int(row[0]) if row else None


def _has_column(conn: psycopg.Connection[Any], table_oid: int | None, column: str) -> bool:
    if table_oid is None:
        return False
    row = conn.execute("SELECT 1 FROM pg_attribute WHERE attrelid = %s AND attname = %s AND attnum > 0 AND NOT attisdropped",
                       (table_oid, column)).fetchone()
    return row is not None


def check_desired(conn: psycopg.Connection[Any], renames: Sequence[Rename]) -> None:
    """Each annotation's new name must exist in the desired schema (an unqualified name means public)."""
    for r in renames:
        oid = _table_oid(conn, r.schema, r.table)
        if oid is None or (r.kind == "column" and not _has_column(conn, oid, r.new)):
            raise ReconcilerError(f"{r.where}: the desired schema has no {r.kind} {r.target} for this rename annotation "
                              "(an unqualified table name means the public schema: qualify it)")


def pending(conn: psycopg.Connection[Any], renames: Sequence[Rename], *, database: str = "the live database") -> tuple[Rename, ...]:
    """The renames the live database still needs, tables first; errors name the annotation's file:line."""
    to_apply: list[Rename] = []
    renamed_tables: dict[tuple[str, str], str] = {}  # (schema, new) -> live name, for tables renamed here
    for r in (r for r in renames if r.kind == "table"):
        has_old = _table_oid(conn, r.schema, r.old) is not None
        has_new = _table_oid(conn, r.schema, r.new) is not None
        if has_old and has_new:
            raise ReconcilerError(f"{r.where}: cannot rename {r.describe()}: {database} has both tables; drop one of "
                                  "them or remove the annotation")
        if has_old:
            to_apply.append(r)
            renamed_tables[(r.schema, r.new)] = r.old
        elif not has_new:
            raise ReconcilerError(f"{r.where}: cannot rename {r.describe()}: {database} has no table {r.source} "
                                  f"(nor {r.target}); correct the old name, or remove the annotation if the table is new")
    for r in (r for r in renames if r.kind == "column"):
        live_table = renamed_tables.get((r.schema, r.table), r.table)
        oid = _table_oid(conn, r.schema, live_table)
        has_old, has_new = _has_column(conn, oid, r.old), _has_column(conn, oid, r.new)
        if has_old and has_new:
            raise ReconcilerError(f"{r.where}: cannot rename {r.describe()}: {database} has both columns; drop one of "
                                  "them or remove the annotation")
        if has_old:
            to_apply.append(r)
        elif not has_new:
            missing = f"no table {r.schema}.{live_table}" if oid is None else f"no column {r.schema}.{live_table}.{r.old}"
            raise ReconcilerError(f"{r.where}: cannot rename {r.describe()}: {database} has {missing}; correct the old "
                                  "name, or remove the annotation if the column is new")
    return tuple(to_apply)


def statement(r: Rename) -> str:
    if r.kind == "table":
        composed = sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(r.schema, r.old), sql.Identifier(r.new))
    elif r.kind == "column":
        composed = sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
            sql.Identifier(r.schema, r.table), sql.Identifier(r.old), sql.Identifier(r.new))
    elif r.kind == "constraint":
        composed = sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
            sql.Identifier(r.schema, r.table), sql.Identifier(r.old), sql.Identifier(r.new))
    else:  # index, sequence: in the table's schema
        composed = sql.SQL("ALTER {} {} RENAME TO {}").format(
            sql.SQL(r.kind.upper()), sql.Identifier(r.schema, r.old), sql.Identifier(r.new))
    return composed.as_string(None)


_ORDER = {"table": 0, "column": 1}


def changes(renames: Sequence[Rename]) -> list[Change]:
    """The rename statements, in order: tables, then columns (whose table has its new name by then), then
    the rest (derived renames) as given."""
    out = []
    for r in sorted(renames, key=lambda r: _ORDER.get(r.kind, 2)):
        text = statement(r)
        kind, obj = classify(text)
        out.append(Change(sql=text, kind=kind, object=obj, engine=ENGINE))
    return out


# --- names that follow a renamed table or column -------------------------------------------------

# (kind, query): rows of (table schema, table, object name, signature) for the given tables; an object
# whose name PostgreSQL derived from the table or column name (orders_pkey, orders_id_seq) keeps the
# old one after a rename, so it is renamed too where the desired schema has one object of the same
# signature under a new name.
_DERIVED = (
    ("index", """SELECT tn.nspname, tc.relname, ic.relname,
                        replace(pg_get_indexdef(i.indexrelid), ' INDEX ' || quote_ident(ic.relname) || ' ON ', ' INDEX ON ')
                 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                 JOIN pg_class tc ON tc.oid = i.indrelid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
                 WHERE (tn.nspname, tc.relname) IN (SELECT * FROM unnest(%(schemas)s::text[], %(tables)s::text[]))
                 ORDER BY 1, 2, 3"""),
    ("constraint", """SELECT n.nspname, c.relname, k.conname, k.contype::text || ' ' || pg_get_constraintdef(k.oid)
                      FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE k.contype IN ('c', 'f', 'n')  -- 'n': PostgreSQL 18's NOT NULL constraints
                        AND (n.nspname, c.relname) IN (SELECT * FROM unnest(%(schemas)s::text[], %(tables)s::text[]))
                 ORDER BY 1, 2, 3"""),
    ("sequence", """SELECT tn.nspname, tc.relname, s.relname, sn.nspname || ' ' || d.deptype::text || ' ' || quote_ident(a.attname)
                    FROM pg_depend d
                    JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' JOIN pg_namespace sn ON sn.oid = s.relnamespace
                    JOIN pg_class tc ON tc.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
                    JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                    WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                      AND d.deptype IN ('a', 'i') AND sn.oid = tn.oid
                      AND (tn.nspname, tc.relname) IN (SELECT * FROM unnest(%(schemas)s::text[], %(tables)s::text[]))
                 ORDER BY 1, 2, 3"""),
)


def derived(renamed: psycopg.Connection[Any], desired: psycopg.Connection[Any], done: Sequence[Rename]) -> tuple[Rename, ...]:
    """Renames of the indexes, constraints and owned sequences whose names followed the old table or column
    name, read from a copy of live with ``done`` applied (``renamed``) and from the desired schema."""
    cause: dict[tuple[str, str], Rename] = {}
    for r in done:
        cause.setdefault((r.schema, r.table), r)
    params = {"schemas": [s for s, _ in cause], "tables": [t for _, t in cause]}
    out: list[Rename] = []
    for kind, query in _DERIVED:
        have: dict[tuple[str, str], dict[str, str]] = {}
        want: dict[tuple[str, str], dict[str, str]] = {}
        for conn, into in ((renamed, have), (desired, want)):
            for schema, table, name, signature in conn.execute(query.encode(), params).fetchall():
                into.setdefault((schema, table), {})[name] = signature
        for key, objects in have.items():
            wanted = want.get(key, {})
            gone = [n for n in objects if n not in wanted]
            added = [n for n in wanted if n not in objects]
            for old in gone:
                same = [n for n in added if wanted[n] == objects[old]]
                twins = [n for n in gone if objects[n] == objects[old]]
                if len(same) == 1 and len(twins) == 1 and not _name_taken(renamed, kind, key, same[0]):
                    r = cause[key]
                    out.append(Rename(kind=kind, schema=key[0], table=key[1], old=old, new=same[0], file=r.file, line=r.line))
    return tuple(out)


def _name_taken(conn: psycopg.Connection[Any], kind: str, key: tuple[str, str], name: str) -> bool:
    if kind == "constraint":
        query = """SELECT 1 FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = %s AND c.relname = %s AND k.conname = %s"""
        return conn.execute(query, (key[0], key[1], name)).fetchone() is not None
    query = "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
    return conn.execute(query, (key[0], name)).fetchone() is not None


def renamed_facts(facts: LiveFacts, renames: Sequence[Rename]) -> LiveFacts:
    """The live facts as they will be after the renames, so later steps about the new names know the
    tables, columns and indexes they act on exist and hold rows."""
    tables = {(r.schema, r.old): f"{r.schema}.{r.new}" for r in renames if r.kind == "table"}
    columns = {(f"{r.schema}.{r.table}", r.old): r.new for r in renames if r.kind == "column"}
    indexes = {f"{r.schema}.{r.old}": f"{r.schema}.{r.new}" for r in renames if r.kind == "index"}

    def table(name: str) -> str:
        schema, _, rel = name.partition(".")
        return tables.get((schema, rel), name)

    new_columns = {}
    for (t, c), fact in facts.columns.items():
        t = table(t)
        new_columns[(t, columns.get((t, c), c))] = fact
    return replace(
        facts,
        tables={table(name): replace(size, table=table(size.table)) for name, size in facts.tables.items()},
        partitioned=frozenset(table(name) for name in facts.partitioned),
        columns=new_columns,
        indexes={indexes.get(name, name): replace(fact, table=table(fact.table)) for name, fact in facts.indexes.items()},
    )
