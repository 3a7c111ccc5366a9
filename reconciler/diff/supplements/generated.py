"""PostgreSQL 18's virtual generated columns (pg_attribute.attgenerated 'v', the default kind in 18).

schemainspect reads any generated column as generated and migra writes every one ``... stored``; it never sees
a column change kind. Here: the columns migra creates are made virtual where the desired schema has them so, and a
column that changes kind (stored, virtual or plain) is dropped and added again in one statement (its values are
derived; a plain column's are lost, which the safety compiler reports). A virtual column cannot become a plain one
in place (no DROP EXPRESSION for virtual columns): refused, naming it. Expression changes of a column that keeps
its kind are ``tables.column_properties``'s (SET EXPRESSION).
"""

from __future__ import annotations

import re

from psycopg import sql

from ...errors import ReconcilerError
from ..base import Change
from . import Context, change, first_index, insert_at
from .tables import _COLUMNS

# statements that may need a column as the desired schema has it: the re-added columns go before the first
_USES_COLUMNS = frozenset({"create_index", "create_index_concurrently", "add_constraint", "add_check_constraint",
                           "add_exclusion_constraint", "add_foreign_key", "add_primary_key", "add_unique_constraint",
                           "create_view", "replace_view", "create_materialized_view", "create_trigger", "create_policy",
                           "alter_policy", "comment"})
_KINDS = {"s": "STORED", "v": "VIRTUAL"}


def virtual_columns(context: Context, changes: list[Change]) -> list[Change]:
    desired = context.rows("desired", _COLUMNS)
    if not any(r[6] == "v" for r in desired) and not any(r[6] == "v" for r in context.rows("live", _COLUMNS)):
        return changes
    live = {r[:3]: r for r in context.rows("live", _COLUMNS)}
    created_tables = {c.object for c in changes if c.kind == "create_table"}
    added_columns = {c.object for c in changes if c.kind == "add_column"}
    mended: dict[int, Change] = {}
    again: list[Change] = []
    for row in sorted(desired, key=lambda r: r[:3]):
        schema, table, column, type_, _collation, _collation_schema, kind, expression = row[:8]
        label = f"{schema}.{table}.{column}"
        if f"{schema}.{table}" in created_tables or label in added_columns:
            if kind == "v":
                for c in changes:
                    if (c.kind == "create_table" and c.object == f"{schema}.{table}") or (
                            c.kind == "add_column" and c.object == label):
                        mended[id(c)] = Change(sql=_virtual(mended.get(id(c), c).sql, column), kind=c.kind,
                                               object=c.object, engine=c.engine)
            continue
        have = live.get(row[:3])
        if have is None or have[6] == kind or "v" not in (kind, have[6]):
            continue
        if kind == "":
            raise ReconcilerError(
                f"column {label} is a virtual generated column in live and a plain column in the desired schema: "
                "PostgreSQL cannot drop a virtual column's expression in place; add a new column for its values instead")
        target, col = sql.Identifier(schema, table), sql.Identifier(column)
        again.append(change(sql.SQL("ALTER TABLE {} DROP COLUMN {}, ADD COLUMN {} {} GENERATED ALWAYS AS ({}) {}").format(
            target, col, col, sql.SQL(type_), sql.SQL(expression or ""), sql.SQL(_KINDS[kind])),
            "alter_generated_kind", label))
    out = [mended.get(id(c), c) for c in changes]
    return insert_at(out, first_index(out, lambda c: c.kind in _USES_COLUMNS, len(out)), again)


def _virtual(statement: str, column: str) -> str:
    """migra's CREATE TABLE or ADD COLUMN with the column's ``generated always as (...) stored`` made virtual."""
    quoted = '"' + column.replace('"', '""') + '"'
    clause = re.compile(r"(^[ \t]*|\badd column )" + re.escape(quoted) + r" [^\n]*", re.MULTILINE)
    found = clause.search(statement)
    if found is None:
        return statement
    text = found.group(0)
    at = text.rfind(") stored")  # the expression's own text comes before it; only a collation after
    if at < 0 or " generated always as (" not in text:
        return statement
    text = text[:at] + ") virtual" + text[at + len(") stored"):]
    return statement[:found.start()] + text + statement[found.end():]
