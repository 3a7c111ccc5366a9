"""Views and CHECK constraints created from the desired files' own text, where PostgreSQL's printed text would
build something else.

The diff engine writes each object from the desired database's printed definition (``pg_get_viewdef``,
``pg_get_constraintdef``). That text is not always a fixed point: ``CHECK (status IN ('a', 'b'))`` on a varchar
column prints with casts that, run again, read back moved. A target built from it would be equivalent to the
desired database, never identical (see ``roundtrip``). Where the printed text does not read back as the desired
definition, the statement is written from the text in the desired files that does: each candidate (the view's
query, the CHECK expressions written for that table) is tried on the desired database (temporary objects, rolled
back, as the load role) and the one that reads back as the desired definition is used.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pglast
import psycopg
from pglast import ast
from psycopg import sql

from .diff.base import Change
from .roundtrip import RoundTrip
from .shadow import split_file
from .source import DesiredSchema

log = logging.getLogger(__name__)

_VIEW_KINDS = frozenset({"create_view", "replace_view", "create_materialized_view"})
_MENTIONS = re.compile(r"\b(VIEW|CHECK)\b", re.IGNORECASE)
_NOT_VALID = " NOT VALID"
# what PostgreSQL prints where a text is not a fixed point: the casts it made explicit (a text without one reads
# back as it is; trying every definition would cost a round trip each on schemas of thousands)
_CAST = "::"
_NO_INHERIT = " NO INHERIT"

_VIEWS = """
SELECT n.nspname || '.' || c.relname, n.nspname, c.relname, c.relkind::text, pg_get_viewdef(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('v', 'm')
"""
_CHECKS = """
SELECT n.nspname || '.' || c.relname || '.' || k.conname, n.nspname, c.relname, k.conname, pg_get_constraintdef(k.oid)
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE k.contype = 'c'
"""


@dataclass(frozen=True)
class Written:
    """The desired files' views and CHECK expressions as written, by the relation's name as written there."""

    views: dict[tuple[str | None, str], list[str]] = field(default_factory=dict)  # (schema or None, name) -> queries
    checks: dict[tuple[str | None, str], list[str]] = field(default_factory=dict)  # -> CHECK expressions


def concerns(changes: Sequence[Change]) -> bool:
    """Whether ``changes`` create a view or add a CHECK constraint (the only ones ``as_written`` may rewrite)."""
    return any(c.kind in _VIEW_KINDS or c.kind == "add_check_constraint" for c in changes)


def as_written(changes: Sequence[Change], desired: DesiredSchema, desired_dsn_conn: psycopg.Connection[Any]
               ) -> list[Change]:
    """``changes`` with each view creation and CHECK constraint addition whose printed text is not a fixed point
    written from the desired files' text instead; ``desired_dsn_conn``: the desired database, as the load role."""
    wanted = [c for c in changes if c.kind in _VIEW_KINDS or c.kind == "add_check_constraint"]
    if not wanted:
        return list(changes)
    conn = desired_dsn_conn
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL search_path = pg_catalog")
        views = {r[0]: r[1:] for r in conn.execute(_VIEWS).fetchall()}
        checks = {r[0]: r[1:] for r in conn.execute(_CHECKS).fetchall()}
    trip = RoundTrip(conn)
    written: Written | None = None
    out: list[Change] = []
    for c in changes:
        replacement = None
        if c.kind in _VIEW_KINDS and c.object in views:
            schema, name, relkind, query = views[c.object]
            if _CAST in query and trip.view(query) != query:
                written = written or read_written(desired)
                replacement = _view_from_source(trip, written, c, schema, name, relkind, query)
        elif c.kind == "add_check_constraint" and c.object in checks:
            schema, table, name, definition = checks[c.object]
            if _CAST in definition and trip.check((schema, table), definition) != definition:
                written = written or read_written(desired)
                replacement = _check_from_source(trip, written, c, schema, table, name, definition)
        out.append(replacement or c)
    return out


def _candidates(found: dict[tuple[str | None, str], list[str]], schema: str, name: str) -> list[str]:
    return [*found.get((schema, name), ()), *found.get((None, name), ())]


def _view_from_source(trip: RoundTrip, written: Written, c: Change, schema: str, name: str, relkind: str,
                      query: str) -> Change | None:
    for text in _candidates(written.views, schema, name):
        if trip.view(text, written=True) == query:
            target = sql.Identifier(schema, name)
            if relkind == "m":
                statement = sql.SQL("CREATE MATERIALIZED VIEW {} AS {}").format(target, sql.SQL(text))
            else:
                statement = sql.SQL("CREATE OR REPLACE VIEW {} AS {}").format(target, sql.SQL(text))
            log.debug("view %s created from the desired file's text (its printed text reads back otherwise)",
                      c.object)
            return Change(sql=statement.as_string(None), kind=c.kind, object=c.object, engine=c.engine)
    return None


def _check_from_source(trip: RoundTrip, written: Written, c: Change, schema: str, table: str, name: str,
                       definition: str) -> Change | None:
    expression = definition.removesuffix(_NOT_VALID)
    no_inherit = expression.endswith(_NO_INHERIT)
    expression = expression.removesuffix(_NO_INHERIT)
    for text in _candidates(written.checks, schema, table):
        if trip.check((schema, table), f"CHECK ({text})", written=True) == expression:
            tail = (_NO_INHERIT if no_inherit else "") + (" NOT VALID" if "not valid" in c.sql.lower() else "")
            statement = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({}){}").format(
                sql.Identifier(schema, table), sql.Identifier(name), sql.SQL(text), sql.SQL(tail))
            log.debug("CHECK %s added from the desired file's text (its printed text reads back otherwise)", c.object)
            return Change(sql=statement.as_string(None), kind=c.kind, object=c.object, engine=c.engine)
    return None


def read_written(desired: DesiredSchema) -> Written:
    views: dict[tuple[str | None, str], list[str]] = defaultdict(list)
    checks: dict[tuple[str | None, str], list[str]] = defaultdict(list)
    for text in _statements(desired):
        try:
            parsed = pglast.parse_sql(text)
        except pglast.parser.ParseError:
            continue
        for raw in parsed:
            node = raw.stmt
            if isinstance(node, ast.ViewStmt) or (isinstance(node, ast.CreateTableAsStmt) and node.into is not None
                                                  and node.objtype == pglast.enums.ObjectType.OBJECT_MATVIEW):
                query = _query_text(text)
                relation = node.view if isinstance(node, ast.ViewStmt) else node.into.rel if node.into else None
                if query:
                    views[_key(relation)].append(query)
            elif isinstance(node, ast.CreateStmt):
                for element in node.tableElts or ():
                    constraints = element.constraints if isinstance(element, ast.ColumnDef) else (element,)
                    for constraint in constraints or ():
                        checks[_key(node.relation)].extend(_check_text(text, constraint))
            elif isinstance(node, ast.AlterTableStmt):
                for cmd in node.cmds or ():
                    if isinstance(cmd, ast.AlterTableCmd) and isinstance(cmd.def_, ast.Constraint):
                        checks[_key(node.relation)].extend(_check_text(text, cmd.def_))
    return Written(dict(views), dict(checks))


def _statements(desired: DesiredSchema) -> Iterator[str]:
    for schema_file in desired.files:
        if not _MENTIONS.search(schema_file.text):
            continue
        for statement in split_file(schema_file):
            if _MENTIONS.search(statement.text):
                yield statement.text


def _key(relation: ast.RangeVar | None) -> tuple[str | None, str]:
    if relation is None:
        return (None, "")
    return (str(relation.schemaname) if relation.schemaname else None, str(relation.relname))


_VIEW_TAIL = re.compile(r"\s+WITH\s+(?:(?:CASCADED|LOCAL)\s+)?CHECK\s+OPTION\s*$|\s+WITH\s+(?:NO\s+)?DATA\s*$",
                        re.IGNORECASE)


def _query_text(text: str) -> str | None:
    """The statement's query as written: after its first AS outside parentheses (CREATE [MATERIALIZED] VIEW name
    [(columns)] [WITH (options)] AS query) to its end, without a trailing WITH CHECK OPTION or WITH [NO] DATA."""
    for token, depth in _depths(text):
        if token.name == "AS" and depth == 0:
            body = text[token.end + 1:].strip().removesuffix(";").rstrip()
            return _VIEW_TAIL.sub("", body)
    return None


def _check_text(text: str, constraint: Any) -> list[str]:
    """A CHECK constraint's expression as written (between the parentheses after CHECK)."""
    if not isinstance(constraint, ast.Constraint) or constraint.contype is None \
            or pglast.enums.ConstrType(int(constraint.contype)) is not pglast.enums.ConstrType.CONSTR_CHECK:
        return []
    at = constraint.location if isinstance(constraint.location, int) and constraint.location >= 0 else 0
    found = re.compile(r"\bCHECK\s*\(", re.IGNORECASE).search(text, at)
    if found is None:
        return []
    end = _closing(text, found.end() - 1)
    return [text[found.end():end].strip()] if end is not None else []


def _closing(text: str, opening: int) -> int | None:
    """The offset of the parenthesis closing the one at ``opening`` (strings, quoted names and comments holding
    parentheses do not count)."""
    for token, depth in _depths(text[opening:]):
        if token.name == "ASCII_41" and depth == 0:
            return opening + int(token.start)
    return None


def _depths(text: str) -> Iterator[tuple[Any, int]]:
    """Each of the scanner's tokens with the depth of parentheses it stands at (a closing one at its opening's);
    nothing when the scanner cannot read the text."""
    try:
        tokens = pglast.parser.scan(text)
    except pglast.parser.ParseError:
        return
    depth = 0
    for token in tokens:
        if token.name == "ASCII_41":
            depth -= 1
        yield token, depth
        if token.name == "ASCII_40":
            depth += 1
