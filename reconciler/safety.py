"""Turn diff changes into plan steps: transactional or not, named hazards, and the SQL to undo them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from .diff.base import Change


@dataclass(frozen=True)
class Hazard:
    code: str
    message: str


@dataclass(frozen=True)
class Step:
    index: int
    sql: str
    kind: str
    object: str
    transactional: bool
    hazards: tuple[Hazard, ...]
    rollback_sql: str | None


# Statements PostgreSQL refuses inside a transaction block.
_NON_TRANSACTIONAL = frozenset({"create_index_concurrently", "drop_index_concurrently", "vacuum", "reindex"})

_DATA_LOSS = {
    "drop_table": "drops the table and all its rows",
    "drop_column": "drops the column and its values",
    "drop_schema": "drops the schema and everything in it",
    "drop_type": "drops the type; columns of that type go with it",
    "drop_materialized_view": "drops the materialized view's stored rows",
    "drop_sequence": "drops the sequence and its current value",
}


def _qualified(name: str) -> sql.Composable:
    return sql.Identifier(*name.split(".")) if name else sql.SQL("")


def _rollback(change: Change) -> str | None:
    """The inverse of a creating statement, when it is certain; drops cannot be undone by SQL alone."""
    obj = change.object
    if not obj or "," in obj or "(" in obj:
        return None
    templates = {
        "create_table": "DROP TABLE {}",
        "create_index": "DROP INDEX {}",
        "create_view": "DROP VIEW {}",
        "create_materialized_view": "DROP MATERIALIZED VIEW {}",
        "create_enum": "DROP TYPE {}",
        "create_sequence": "DROP SEQUENCE {}",
        "create_schema": "DROP SCHEMA {}",
        "create_domain": "DROP DOMAIN {}",
        "create_composite_type": "DROP TYPE {}",
    }
    if change.kind in templates:
        return sql.SQL(templates[change.kind]).format(_qualified(obj)).as_string(None)
    if change.kind == "create_index_concurrently":
        return sql.SQL("DROP INDEX CONCURRENTLY {}").format(_qualified(obj)).as_string(None)
    if change.kind == "add_column" and obj.count(".") >= 1:
        table, column = obj.rsplit(".", 1)
        return sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(_qualified(table), sql.Identifier(column)).as_string(None)
    if change.kind == "create_trigger" and obj.count(".") >= 1:
        table, trigger = obj.rsplit(".", 1)
        return sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trigger), _qualified(table)).as_string(None)
    if change.kind in {"add_foreign_key", "add_primary_key", "add_unique_constraint", "add_check_constraint",
                       "add_exclusion_constraint"} and obj.count(".") >= 2:
        table, constraint = obj.rsplit(".", 1)
        return sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(_qualified(table), sql.Identifier(constraint)).as_string(None)
    return None


def _hazards(change: Change) -> tuple[Hazard, ...]:
    found: list[Hazard] = []
    if change.kind in _DATA_LOSS:
        found.append(Hazard("DATA_LOSS", _DATA_LOSS[change.kind]))
    if change.kind == "drop_index":
        found.append(Hazard("INDEX_DROPPED", "queries that use this index may become slow"))
    if change.kind == "create_index":
        found.append(Hazard("BLOCKS_WRITES", "builds the index without CONCURRENTLY: writes to the table wait"))
    if change.kind == "alter_column_type":
        found.append(Hazard("TABLE_REWRITE", "changing a column's type may rewrite the table under an exclusive lock"))
    if change.kind == "set_not_null":
        found.append(Hazard("FULL_SCAN_UNDER_LOCK", "SET NOT NULL scans the whole table under an exclusive lock"))
    if change.kind in {"create_extension", "drop_extension", "alter_extension"}:
        found.append(Hazard("EXTENSION_CHANGE", "extensions change server-wide behaviour and need privileges"))
    if change.kind in {"grant", "revoke"}:
        found.append(Hazard("AUTHZ_CHANGE", "changes who may read or write"))
    return tuple(found)


def compile_steps(changes: Sequence[Change]) -> tuple[Step, ...]:
    return tuple(
        Step(
            index=i,
            sql=change.sql,
            kind=change.kind,
            object=change.object,
            transactional=change.kind not in _NON_TRANSACTIONAL,
            hazards=_hazards(change),
            rollback_sql=_rollback(change),
        )
        for i, change in enumerate(changes, 1)
    )
