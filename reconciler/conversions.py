"""Column annotations about data, which the desired schema alone cannot say:

- ``-- reconciler: using <expression>`` above a column whose type changes: how each old value becomes a new one,
  as ``ALTER COLUMN ... TYPE ... USING`` takes it (the expression names the column for its old value). A type change
  that has no implicit cast needs one; the plan is refused without it.
- ``-- reconciler: backfill <expression>`` above a new column: what it holds on the rows already there, computed
  from the row's other columns. A new NOT NULL column without a default on a table with rows needs one; the plan
  adds it nullable, fills new writes and the old rows, then makes it NOT NULL.

Like the rename annotation, each is a comment on a line of its own directly above the column's definition (in
``CREATE TABLE`` or ``ALTER TABLE ... ADD COLUMN``). The expression is checked to be one SQL expression here; the
rehearsal proves it runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pglast
from pglast import ast

from .annotations import annotation_comments, column_of, on_own_line, starting_lines
from .errors import SchemaLoadError
from .source import DesiredSchema

USING, BACKFILL = "using", "backfill"
_MARKER = re.compile(r"^--\s*reconciler\s*:\s*(using|backfill)\b", re.IGNORECASE)
_ANNOTATION = re.compile(r"^--\s*reconciler\s*:\s*(?P<kind>using|backfill)\s+(?P<expression>.+?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ColumnNote:
    """One annotation: for column ``schema.table.column`` (its desired name), ``kind`` (``using`` or ``backfill``)
    and its expression, as written."""

    kind: str
    schema: str
    table: str
    column: str
    expression: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def key(self) -> tuple[str, str]:
        """('schema.table', column), as the safety compiler names columns."""
        return f"{self.schema}.{self.table}", self.column


@dataclass(frozen=True)
class ColumnNotes:
    """The desired schema's data annotations; ``source``: the schema they were read from, to point a refusal at the
    line that defines a column (found only then: parsing every statement of a big schema costs a second)."""

    notes: tuple[ColumnNote, ...] = ()
    source: DesiredSchema | None = field(default=None, compare=False)

    def of(self, kind: str, table: str, column: str) -> ColumnNote | None:
        return next((n for n in self.notes if n.kind == kind and n.key == (table, column)), None)

    def where(self, table: str, column: str) -> str:
        """' (defined at file:line)' for a column of the desired files, else ''."""
        schema, _, name = table.partition(".")
        for schema_file in self.source.files if self.source is not None else ():
            if name not in schema_file.text or column not in schema_file.text:
                continue
            for line, targets in sorted(starting_lines(schema_file).items()):
                if any(t.kind == "column" and (t.schema, t.table, t.name) == (schema, name, column) for t in targets):
                    return f" (defined at {schema_file.path}:{line})"
        return ""


def read_notes(source: DesiredSchema) -> ColumnNotes:
    """Every ``using`` and ``backfill`` annotation of the desired schema, checked for form and placement."""
    notes: list[ColumnNote] = []
    for schema_file in source.files:
        annotations = list(annotation_comments(schema_file, _MARKER))
        lines = starting_lines(schema_file) if annotations else {}
        for offset, line, comment in annotations:
            column = column_of(schema_file, offset)
            if not on_own_line(schema_file, offset):
                raise SchemaLoadError(schema_file.path, line, column, "a using or backfill annotation must be on a "
                                      "line of its own, directly above the column definition it is for")
            match = _ANNOTATION.match(comment)
            if match is None:
                raise SchemaLoadError(schema_file.path, line, column, f"cannot read the annotation {comment!r}: write "
                                      "'-- reconciler: using <expression>' (how the column's old values convert) or "
                                      "'-- reconciler: backfill <expression>' (what a new column holds on existing rows)")
            kind, expression = match.group("kind").lower(), match.group("expression").strip()
            problem = _expression_problem(expression)
            if problem:
                raise SchemaLoadError(schema_file.path, line, column, f"the {kind} annotation's expression "
                                      f"{expression!r} {problem}")
            starting = lines.get(line + 1, [])
            columns = [t for t in starting if t.kind == "column"]
            if any(t.kind == "table" for t in starting):
                raise SchemaLoadError(schema_file.path, line, column, f"the {kind} annotation is directly above a "
                                      f"CREATE TABLE (line {line + 1}), not a column definition: put the column on "
                                      "a line of its own with the annotation above it")
            if len(columns) != 1:
                what = ("defines more than one column (" + ", ".join(t.name for t in columns) + "): put the annotated "
                        "column on a line of its own") if columns else "does not start a column definition"
                raise SchemaLoadError(schema_file.path, line, column, f"the {kind} annotation must be directly above "
                                      f"the column definition it is for; line {line + 1} {what}")
            target = columns[0]
            notes.append(ColumnNote(kind, target.schema, target.table, target.name, expression, schema_file.path, line))
    _check_unique(notes)
    return ColumnNotes(tuple(notes), source)


def _expression_problem(expression: str) -> str:
    """Why ``expression`` is not one SQL value expression ('' when it is)."""
    try:
        parsed = pglast.parse_sql(f"SELECT {expression}")
    except pglast.parser.ParseError as exc:
        return f"is not an SQL expression ({exc.args[0]})"
    select = parsed[0].stmt if len(parsed) == 1 else None
    if not (isinstance(select, ast.SelectStmt) and select.targetList and len(select.targetList) == 1
            and select.fromClause is None and select.whereClause is None and select.groupClause is None
            and select.sortClause is None and select.limitCount is None and select.op == 0):
        return "is not one SQL expression (a single value, no FROM, no second statement)"
    return ""


def _check_unique(notes: Sequence[ColumnNote]) -> None:
    seen: dict[tuple[str, str, str], ColumnNote] = {}
    for note in notes:
        key = (note.kind, *note.key)
        other = seen.get(key)
        if other is not None:
            raise SchemaLoadError(note.file, note.line, 1, f"column {'.'.join(note.key)} has a second {note.kind} "
                                  f"annotation (the first is at {other.where})")
        seen[key] = note
