"""Annotations in the desired SQL: ``-- reconciler: ...`` comments on a line of their own, directly above the
``CREATE TABLE`` or column definition they speak of (renames.py reads ``renamed from``, conversions.py ``using``
and ``backfill``). Found with pglast's scanner, so a ``--`` inside a string or a function body is never one."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import pglast
from pglast import ast, enums

from .shadow import line_column, split_file
from .source import SchemaFile

DEFAULT_SCHEMA = "public"


@dataclass(frozen=True)
class Target:
    """What starts on a line: a CREATE TABLE (``kind`` "table") or a column definition ("column") and its table."""

    kind: str
    schema: str
    table: str
    name: str


def starting_lines(schema_file: SchemaFile) -> dict[int, list[Target]]:
    """What starts on each line: CREATE TABLE statements and column definitions (in CREATE TABLE and in
    ALTER TABLE ... ADD COLUMN)."""
    found: dict[int, list[Target]] = {}
    text = schema_file.text

    def add(offset: int, target: Target) -> None:
        found.setdefault(line_column(text, offset)[0], []).append(target)

    for statement in split_file(schema_file):
        try:
            parsed = pglast.parse_sql(statement.text)
        except pglast.parser.ParseError:
            continue  # the shadow database reports syntax errors with their position
        for raw in parsed:
            node = raw.stmt
            start = statement.start + int(raw.stmt_location or 0)
            if isinstance(node, ast.CreateStmt) and node.relation is not None:
                schema = str(node.relation.schemaname or DEFAULT_SCHEMA)
                table = str(node.relation.relname)
                add(start, Target("table", schema, table, table))
                for element in node.tableElts or ():
                    if isinstance(element, ast.ColumnDef) and element.location is not None and element.location >= 0:
                        add(statement.start + element.location, Target("column", schema, table, str(element.colname)))
            elif (isinstance(node, ast.AlterTableStmt) and node.relation is not None
                  and enums.ObjectType(int(node.objtype or 0)) is enums.ObjectType.OBJECT_TABLE):
                schema = str(node.relation.schemaname or DEFAULT_SCHEMA)
                table = str(node.relation.relname)
                for cmd in node.cmds or ():
                    col = getattr(cmd, "def_", None)
                    if (isinstance(cmd, ast.AlterTableCmd) and isinstance(col, ast.ColumnDef)
                            and enums.AlterTableType(int(cmd.subtype or 0)) is enums.AlterTableType.AT_AddColumn
                            and col.location is not None and col.location >= 0):
                        add(statement.start + col.location, Target("column", schema, table, str(col.colname)))
    return found


def annotation_comments(schema_file: SchemaFile, marker: re.Pattern[str]) -> Iterable[tuple[int, int, str]]:
    """(offset, line, text) of every ``--`` comment that ``marker`` matches."""
    text = schema_file.text
    if "reconciler" not in text.lower():
        return
    try:
        tokens = pglast.parser.scan(text)
    except pglast.parser.ParseError:
        return  # the shadow database reports the error with its position
    for token in tokens:
        if token.name != "SQL_COMMENT":
            continue
        comment = text[token.start: token.end + 1]
        if marker.match(comment):
            yield token.start, line_column(text, token.start)[0], comment.strip()


def column_of(schema_file: SchemaFile, offset: int) -> int:
    """The 1-based column of ``offset`` on its line."""
    return offset - schema_file.text.rfind("\n", 0, offset)


def on_own_line(schema_file: SchemaFile, offset: int) -> bool:
    """Is nothing but white space before ``offset`` on its line?"""
    return not schema_file.text[schema_file.text.rfind("\n", 0, offset) + 1:offset].strip()
