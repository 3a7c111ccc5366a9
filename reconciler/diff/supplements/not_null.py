"""NOT NULL constraints as PostgreSQL 18 keeps them: rows of pg_constraint (contype 'n') with a name, NOT VALID
and NO INHERIT. schemainspect reads only pg_attribute.attnotnull (true for a NOT VALID one too), so migra writes
every NOT NULL as the column's unnamed ``not null`` (or SET NOT NULL): the name comes out as PostgreSQL's default,
a NOT VALID one validated, and a name or validity that differs from live's is never seen.

Only a table's own constraints (not inherited, not a partition's) are read; before PostgreSQL 18 there are none.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from psycopg import sql

from ..base import Change
from . import Context, change, managed, not_extension_member

# only the constraints an unnamed ``not null`` would not make (a handful: a schema has one per NOT NULL column)
_QUERY = f"""
SELECT n.nspname, c.relname, a.attname, con.conname, con.convalidated, con.connoinherit
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]
WHERE con.contype = 'n' AND con.conislocal AND con.coninhcount = 0 AND NOT c.relispartition
  AND c.relkind IN ('r', 'p') AND {managed('n')} AND {not_extension_member('pg_class', 'c.oid')}
  AND NOT (con.convalidated AND NOT con.connoinherit AND con.conname::text = c.relname || '_' || a.attname || '_not_null')
"""


class NotNull(NamedTuple):
    name: str
    valid: bool
    no_inherit: bool

    @classmethod
    def plain(cls, table: str, column: str) -> NotNull:
        """What migra's unnamed ``not null`` makes: valid, inherited, PostgreSQL's default name (a longer one is
        shortened, and so never read as plain: its constraint is read, and named explicitly)."""
        return cls(f"{table}_{column}_not_null", True, False)


def _read(context: Context, side: str) -> dict[tuple[str, str, str], NotNull]:
    return {(schema, table, column): NotNull(name, bool(valid), bool(no_inherit))
            for schema, table, column, name, valid, no_inherit in context.rows(side, _QUERY)}


def not_null_constraints(context: Context, changes: list[Change]) -> list[Change]:
    """Only columns whose constraint is not plain on one side are looked at: where the other side reads none, it
    has a plain one, or none at all, which migra's statements for the column say (SET / DROP NOT NULL, a new or
    dropped column or table)."""
    live, desired = _read(context, "live"), _read(context, "desired")
    if not live and not desired:
        return changes
    created_tables = {c.object for c in changes if c.kind == "create_table"}
    added_columns = {c.object for c in changes if c.kind == "add_column"}
    set_not_null = {c.object: c for c in changes if c.kind == "set_not_null"}
    gone = {c.object for c in changes if c.kind in ("drop_not_null", "drop_column", "drop_table")}
    replaced: dict[int, list[Change]] = {}  # id of migra's change -> what takes its place
    tail: list[Change] = []
    for schema, table, column in sorted(set(desired) | set(live)):
        label = f"{schema}.{table}.{column}"
        new_column = f"{schema}.{table}" in created_tables or label in added_columns
        if (schema, table, column) not in desired:  # plain in the desired schema, or no NOT NULL at all
            if new_column or label in gone or f"{schema}.{table}" in gone:
                continue
            want = NotNull.plain(table, column)
        else:
            want = desired[(schema, table, column)]
        target, col, name = sql.Identifier(schema, table), sql.Identifier(column), sql.Identifier(want.name)
        add = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} NOT NULL {}{}{}").format(
            target, name, col, sql.SQL(" NO INHERIT" if want.no_inherit else ""), sql.SQL("" if want.valid else " NOT VALID"))
        if new_column:  # created by migra's statement, with an unnamed ``not null``
            for c in changes:
                if (c.kind == "create_table" and c.object == f"{schema}.{table}") or (c.kind == "add_column" and c.object == label):
                    now, *after = replaced.get(id(c), [c])  # a table's columns mend the same statement in turn
                    statement, inline = _named_inline(now.sql, column, want)
                    if not inline:
                        after.append(change(add, "add_constraint", f"{schema}.{table}.{want.name}"))
                    replaced[id(c)] = [Change(sql=statement, kind=c.kind, object=c.object, engine=c.engine), *after]
            continue
        migra = set_not_null.get(label)
        if migra is not None:  # an existing column made NOT NULL: the constraint as wanted, not migra's unnamed one
            replaced[id(migra)] = [change(add, "add_constraint", f"{schema}.{table}.{want.name}")]
            continue
        have = live.get((schema, table, column)) or NotNull.plain(table, column)
        if have.name != want.name:
            tail.append(change(sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
                target, sql.Identifier(have.name), name), "rename_constraint", f"{schema}.{table}.{want.name}"))
        if have.no_inherit != want.no_inherit:
            tail.append(change(sql.SQL("ALTER TABLE {} ALTER CONSTRAINT {} {}").format(
                target, name, sql.SQL("NO INHERIT" if want.no_inherit else "INHERIT")), "alter_constraint",
                f"{schema}.{table}.{want.name}"))
        if want.valid and not have.valid:
            tail.append(change(sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(target, name),
                               "validate_constraint", f"{schema}.{table}.{want.name}"))
        elif have.valid and not want.valid:  # a constraint cannot be made NOT VALID again: added again as one
            tail.append(change(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}, ADD CONSTRAINT {} NOT NULL {}{} NOT VALID").format(
                target, name, name, col, sql.SQL(" NO INHERIT" if want.no_inherit else "")),
                "alter_table", f"{schema}.{table}"))
    out: list[Change] = []
    for c in changes:
        out.extend(replaced.get(id(c), [c]))
    return [*out, *tail]


def _named_inline(statement: str, column: str, want: NotNull) -> tuple[str, bool]:
    """migra's CREATE TABLE or ADD COLUMN with the column's ``not null`` named (True), or left out when the
    constraint is NOT VALID, which only ALTER TABLE ... ADD CONSTRAINT can say (False)."""
    quoted = '"' + column.replace('"', '""') + '"'
    # the column's clause: a line of CREATE TABLE, or what follows ADD COLUMN (schemainspect quotes every name)
    clause = re.compile(r"(^[ \t]*|\badd column )" + re.escape(quoted) + r" [^\n]*", re.MULTILINE)
    found = clause.search(statement)
    if found is None:
        return statement, False
    text = found.group(0)
    at = text.find(" not null")  # the type and an identity clause come first; a default's text after it
    if at < 0:
        return statement, False
    if want.valid:
        named = sql.SQL(" constraint {} not null{}").format(
            sql.Identifier(want.name), sql.SQL(" no inherit" if want.no_inherit else "")).as_string(None)
    else:
        named = ""
    text = text[:at] + named + text[at + len(" not null"):]
    return statement[:found.start()] + text + statement[found.end():], want.valid
