"""Plan-time checks of the live data: find the rows that would make a step fail, before apply.

SET NOT NULL where NULLs exist, a UNIQUE index over duplicates, a CHECK or foreign key the rows
violate, a type change whose values do not convert: each becomes a CORRECTNESS hazard that names
the table and the count. The queries run read-only with a statement timeout; a check that runs
out of time says so instead of guessing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pglast
import psycopg
from pglast import ast, enums
from pglast.stream import RawStream
from psycopg import sql

from .inspect import LiveFacts, qualify
from .safety import Hazard, Step

log = logging.getLogger(__name__)


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split("."))


def _rv(rv: ast.RangeVar | None) -> str:
    if rv is None:
        return ""
    return qualify(f"{rv.schemaname}.{rv.relname}" if rv.schemaname else str(rv.relname))


def _expr(node: ast.Node) -> sql.SQL:
    """A parsed expression back to SQL: it came from the diff engine's statement, not from data."""
    return sql.SQL(str(RawStream()(node)))


def _query(step: Step, facts: LiveFacts) -> tuple[sql.Composed, str, str] | None:
    """(counting query, table, what the count means) for a step that can fail on existing rows."""
    try:
        node = pglast.parse_sql(step.sql)[0].stmt
    except pglast.parser.ParseError:
        return None
    if isinstance(node, ast.IndexStmt) and node.unique:
        table = _rv(node.relation)
        if table not in facts.tables:
            return None
        keys: list[sql.Composable] = []
        for param in node.indexParams or ():
            if isinstance(param, ast.IndexElem) and param.name:
                keys.append(sql.Identifier(str(param.name)))
            elif isinstance(param, ast.IndexElem) and param.expr is not None:
                keys.append(_expr(param.expr))
        if not keys:
            return None
        where = [sql.SQL("({}) IS NOT NULL").format(k) for k in keys] if not node.nulls_not_distinct else []
        if node.whereClause is not None:
            where.append(sql.SQL("({})").format(_expr(node.whereClause)))
        query = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} {} GROUP BY {} HAVING count(*) > 1) AS duplicates").format(
            _ident(table), sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""), sql.SQL(", ").join(keys))
        return query, table, "duplicate key values: the unique index build will fail"
    if not isinstance(node, ast.AlterTableStmt) or not node.cmds or len(node.cmds) != 1:
        return None
    table = _rv(node.relation)
    if table not in facts.tables:
        return None
    cmd = node.cmds[0]
    subtype = enums.AlterTableType(int(cmd.subtype or 0))
    if subtype is enums.AlterTableType.AT_SetNotNull:
        return (sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(_ident(table), sql.Identifier(str(cmd.name))),
                table, f"rows with NULL in {cmd.name}: SET NOT NULL will fail")
    if subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint):
        con = cmd.def_
        contype = enums.ConstrType(int(con.contype or 0))
        if contype is enums.ConstrType.CONSTR_CHECK and con.raw_expr is not None:
            return (sql.SQL("SELECT count(*) FROM {} WHERE NOT ({})").format(_ident(table), _expr(con.raw_expr)),
                    table, f"rows violating CHECK {con.conname}: validating it will fail")
        if contype is enums.ConstrType.CONSTR_FOREIGN and con.pktable is not None and con.fk_attrs and con.pk_attrs:
            fk = [sql.Identifier(str(a.sval)) for a in con.fk_attrs]
            pk = [sql.Identifier(str(a.sval)) for a in con.pk_attrs]
            match = sql.SQL(" AND ").join(sql.SQL("r.{} = c.{}").format(p, f) for p, f in zip(pk, fk, strict=True))
            not_null = sql.SQL(" AND ").join(sql.SQL("c.{} IS NOT NULL").format(f) for f in fk)
            query = sql.SQL("SELECT count(*) FROM {} AS c WHERE {} AND NOT EXISTS (SELECT 1 FROM {} AS r WHERE {})").format(
                _ident(table), not_null, _ident(_rv(con.pktable)), match)
            return query, table, f"rows whose {', '.join(str(a.sval) for a in con.fk_attrs)} match no row of " \
                                 f"{_rv(con.pktable)}: validating the foreign key will fail"
    if (subtype is enums.AlterTableType.AT_AlterColumnType and isinstance(cmd.def_, ast.ColumnDef)
            and cmd.def_.typeName is not None):
        column = str(cmd.name)
        type_sql = str(RawStream()(cmd.def_.typeName))
        return (sql.SQL("SELECT count(*) FROM {} WHERE {} IS NOT NULL AND NOT pg_input_is_valid({}::text, {})").format(
                    _ident(table), sql.Identifier(column), sql.Identifier(column), sql.Literal(type_sql)),
                table, f"values of {column} that do not convert to {type_sql}: the type change will fail")
    return None


def add_data_hazards(conn: psycopg.Connection[Any], steps: Sequence[Step], facts: LiveFacts,
                     *, timeout: str = "30s") -> tuple[Step, ...]:
    """Steps with a CORRECTNESS hazard wherever live rows would make them fail."""
    out: list[Step] = []
    version = int(conn.info.server_version)
    for step in steps:
        previous = out[-1] if out else None
        if step.kind == "set_not_null" and previous is not None and previous.kind == "validate_constraint" \
                and previous.tables == step.tables:
            out.append(step)  # the validated CHECK before it was already counted
            continue
        found = _query(step, facts)
        if found is not None and step.kind == "alter_column_type" and version < 160000:
            out.append(replace(step, hazards=(*step.hazards, Hazard(  # pg_input_is_valid arrived in PostgreSQL 16
                "CORRECTNESS", "existing values must convert to the new type (not checked before PostgreSQL 16)", found[1]))))
            continue
        if found is None:
            out.append(step)
            continue
        query, table, meaning = found
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute("SELECT set_config('statement_timeout', %s, true)", (timeout,))
                row = conn.execute(query).fetchone()
            count = int(row[0]) if row else 0
        except psycopg.errors.QueryCanceled:
            out.append(replace(step, hazards=(*step.hazards, Hazard(
                "CORRECTNESS", f"could not check within {timeout} whether existing rows of {table} allow this step", table))))
            continue
        except psycopg.Error as exc:
            log.info("data check for step %d (%s) could not run: %s", step.index, step.kind, exc.diag.message_primary or exc)
            out.append(step)
            continue
        if count:
            size = facts.tables.get(table)
            out.append(replace(step, hazards=(*step.hazards, Hazard(
                "CORRECTNESS", f"{count:,} {meaning} ({table})", table, size.rows if size else None,
                size.bytes if size else None))))
        else:
            out.append(step)
    return tuple(out)
