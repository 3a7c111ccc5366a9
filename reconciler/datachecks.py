"""Plan-time checks of the live data: find the rows that would make a step fail, before apply.

SET NOT NULL where NULLs exist, a UNIQUE index over duplicates, a CHECK or foreign key the rows
violate, a type change whose values do not convert: each becomes a CORRECTNESS hazard that names
the table and the count. The queries run read-only with a statement timeout; a check that runs
out of time says so instead of guessing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class _Check:
    """One count of the rows that would make a step fail. ``rows`` is the condition of a plain count over the
    table (such checks of one table share a scan); ``query`` a counting query of its own."""

    step: Step
    table: str
    meaning: str
    rows: sql.Composable | None = None
    query: sql.Composed | None = None

    def counting_query(self) -> sql.Composed:
        if self.query is not None:
            return self.query
        return sql.SQL("SELECT count(*) FROM {} WHERE {}").format(_ident(self.table), self.rows)


def _check(step: Step, facts: LiveFacts) -> _Check | None:
    """The check for a step that can fail on existing rows, or None."""
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
        return _Check(step, table, "duplicate key values: the unique index build will fail", query=query)
    if not isinstance(node, ast.AlterTableStmt) or not node.cmds or len(node.cmds) != 1:
        return None
    table = _rv(node.relation)
    if table not in facts.tables:
        return None
    cmd = node.cmds[0]
    subtype = enums.AlterTableType(int(cmd.subtype or 0))
    if subtype is enums.AlterTableType.AT_SetNotNull:
        return _Check(step, table, f"rows with NULL in {cmd.name}: SET NOT NULL will fail",
                      rows=sql.SQL("{} IS NULL").format(sql.Identifier(str(cmd.name))))
    if subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint):
        con = cmd.def_
        contype = enums.ConstrType(int(con.contype or 0))
        if contype in (enums.ConstrType.CONSTR_CHECK, enums.ConstrType.CONSTR_FOREIGN) and not con.is_enforced:
            return None  # PostgreSQL 18's NOT ENFORCED: never checked against the rows
        if contype is enums.ConstrType.CONSTR_CHECK and con.raw_expr is not None:
            return _Check(step, table, f"rows violating CHECK {con.conname}: validating it will fail",
                          rows=sql.SQL("NOT ({})").format(_expr(con.raw_expr)))
        if contype is enums.ConstrType.CONSTR_FOREIGN and con.pktable is not None and con.fk_attrs and con.pk_attrs:
            fk = [sql.Identifier(str(a.sval)) for a in con.fk_attrs]
            pk = [sql.Identifier(str(a.sval)) for a in con.pk_attrs]
            match = sql.SQL(" AND ").join(sql.SQL("r.{} = c.{}").format(p, f) for p, f in zip(pk, fk, strict=True))
            not_null = sql.SQL(" AND ").join(sql.SQL("c.{} IS NOT NULL").format(f) for f in fk)
            query = sql.SQL("SELECT count(*) FROM {} AS c WHERE {} AND NOT EXISTS (SELECT 1 FROM {} AS r WHERE {})").format(
                _ident(table), not_null, _ident(_rv(con.pktable)), match)
            return _Check(step, table, f"rows whose {', '.join(str(a.sval) for a in con.fk_attrs)} match no row of "
                                 f"{_rv(con.pktable)}: validating the foreign key will fail", query=query)
    if (subtype is enums.AlterTableType.AT_AlterColumnType and isinstance(cmd.def_, ast.ColumnDef)
            and cmd.def_.typeName is not None and _casts_the_column(cmd.def_.raw_default, str(cmd.name))):
        column = str(cmd.name)
        type_sql = str(RawStream()(cmd.def_.typeName))
        return _Check(step, table, f"values of {column} that do not convert to {type_sql}: the type change will fail",
                      rows=sql.SQL("{} IS NOT NULL AND NOT pg_input_is_valid({}::text, {})").format(
                          sql.Identifier(column), sql.Identifier(column), sql.Literal(type_sql)))
    return None


def _casts_the_column(using: ast.Node | None, column: str) -> bool:
    """Is the conversion the column's own text input (no USING, or migra's ``column::type``)? A ``-- reconciler:
    using`` expression converts otherwise: its values cannot be checked by the new type's input function."""
    if using is None:
        return True
    if isinstance(using, ast.TypeCast):
        using = using.arg
    return isinstance(using, ast.ColumnRef) and [str(getattr(f, "sval", "")) for f in using.fields or ()] == [column]


class _Failed(Exception):
    """A check that could not run (not a timeout): the step keeps no hazard for it."""


def _count(conn: psycopg.Connection[Any], query: sql.Composed, timeout: str) -> tuple[int, ...]:
    """One read-only counting query under the statement timeout; QueryCanceled passes through."""
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (timeout,))
            row = conn.execute(query).fetchone()
    except psycopg.errors.QueryCanceled:
        raise
    except psycopg.Error as exc:
        raise _Failed(exc.diag.message_primary or str(exc)) from exc
    return tuple(int(v) for v in row) if row else (0,)


def _run_checks(conn: psycopg.Connection[Any], checks: Mapping[int, _Check], timeout: str) -> dict[int, int | None]:
    """Each check's count (None: it ran out of time; absent: it could not run). The plain counts of one table run
    as one scan; if that one query fails or runs out of time, they run one by one as if never combined."""
    counts: dict[int, int | None] = {}
    single: list[int] = []
    shared: dict[str, list[int]] = {}
    for key, check in checks.items():
        if check.rows is None:
            single.append(key)
        else:
            shared.setdefault(check.table, []).append(key)
    for table, keys in shared.items():
        if len(keys) == 1:
            single.extend(keys)
            continue
        query = sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(
            sql.SQL("count(*) FILTER (WHERE {})").format(checks[k].rows) for k in keys), _ident(table))
        try:
            counts.update(zip(keys, _count(conn, query, timeout), strict=True))
        except (psycopg.errors.QueryCanceled, _Failed) as exc:
            log.info("the combined data checks of %s could not run (%s); checking one by one", table, exc)
            single.extend(keys)
    for key in sorted(single):
        try:
            counts[key] = _count(conn, checks[key].counting_query(), timeout)[0]
        except psycopg.errors.QueryCanceled:
            counts[key] = None
        except _Failed as exc:
            step = checks[key].step
            log.info("data check for step %d (%s) could not run: %s", step.index, step.kind, exc)
    return counts


def add_data_hazards(conn: psycopg.Connection[Any], steps: Sequence[Step], facts: LiveFacts,
                     *, timeout: str = "30s") -> tuple[Step, ...]:
    """Steps with a CORRECTNESS hazard wherever live rows would make them fail. Only steps on tables that exist
    in live are looked at (a table the plan creates has no rows)."""
    out: list[Step] = list(steps)
    version = int(conn.info.server_version)
    checks: dict[int, _Check] = {}  # position in ``out`` -> its check
    for i, step in enumerate(steps):
        if not any(t in facts.tables for t in step.tables):
            continue
        previous = steps[i - 1] if i else None
        if step.kind == "set_not_null" and previous is not None and previous.kind == "validate_constraint" \
                and previous.tables == step.tables:
            continue  # the validated CHECK before it was already counted
        found = _check(step, facts)
        if found is not None and step.kind == "alter_column_type" and version < 160000:
            out[i] = replace(step, hazards=(*step.hazards, Hazard(  # pg_input_is_valid arrived in PostgreSQL 16
                "CORRECTNESS", "existing values must convert to the new type (not checked before PostgreSQL 16)", found.table)))
        elif found is not None:
            checks[i] = found
    for i, count in _run_checks(conn, checks, timeout).items():
        step, table = out[i], checks[i].table
        if count is None:
            out[i] = replace(step, hazards=(*step.hazards, Hazard(
                "CORRECTNESS", f"could not check within {timeout} whether existing rows of {table} allow this step", table)))
        elif count:
            size = facts.tables.get(table)
            out[i] = replace(step, hazards=(*step.hazards, Hazard(
                "CORRECTNESS", f"{count:,} {checks[i].meaning} ({table})", table, size.rows if size else None,
                size.bytes if size else None)))
    return tuple(out)
