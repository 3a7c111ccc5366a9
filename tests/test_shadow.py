"""reconciler.shadow: loading schema files statement by statement, errors at file:line:column."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.errors import SchemaLoadError
from reconciler.shadow import line_column, load_schema
from reconciler.source import DesiredSchema, load_source
from tests.conftest import fetch_one


def source(tmp_path: Path, files: dict[str, str]) -> DesiredSchema:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return load_source(tmp_path)


def load_error(tmp_path: Path, database: str, files: dict[str, str]) -> SchemaLoadError:
    with pytest.raises(SchemaLoadError) as info:
        load_schema(source(tmp_path, files), database, sandbox=None)
    return info.value


def position(text: str, needle: str, occurrence: int = 1) -> tuple[int, int]:
    offset = -1
    for _ in range(occurrence):
        offset = text.index(needle, offset + 1)
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def test_multi_file_with_dollar_quoted_functions(tmp_path: Path, database: str) -> None:
    desired = source(tmp_path, {
        "01_tables.sql": "-- tables; with a semicolon in a comment\nCREATE TABLE t (id int);\nINSERT INTO t VALUES (1), (2);\n",
        "02/functions.sql": (
            "CREATE FUNCTION total() RETURNS bigint LANGUAGE plpgsql AS $$\n"
            "DECLARE n bigint;\nBEGIN\n  SELECT sum(id) INTO n FROM t;\n  RETURN n * 10;\nEND;\n$$;\n"
            "/* block; comment */\n"
            "CREATE FUNCTION label() RETURNS text LANGUAGE sql AS $body$ SELECT 'a;b' || $x$;$x$ $body$;\n"
        ),
    })
    assert load_schema(desired, database, sandbox=None) == 4
    assert fetch_one(database, "SELECT total()") == 30
    assert fetch_one(database, "SELECT label()") == "a;b;"


def test_syntax_error_in_second_file(tmp_path: Path, database: str) -> None:
    second = 'CREATE TABLE ok (id int);\n\n-- the broken one\nCREATE TABLE broken (\n    "café" text,,\n    id int\n);\n'
    error = load_error(tmp_path, database, {"a.sql": "CREATE TABLE first (id int);\n", "b.sql": second})
    assert error.path == "b.sql"
    assert (error.line, error.column) == position(second, ",", 2) == (5, 17)
    assert 'syntax error at or near ","' in error.pg_message
    assert str(error).startswith('b.sql:5:17: syntax error at or near ","')
    assert fetch_one(database, "SELECT to_regclass('public.ok') IS NOT NULL") is True


def test_a_parenthesis_never_closed_is_an_error_not_the_end_of_the_file(tmp_path: Path, database: str) -> None:
    """The scanner's split stops at an unbalanced parenthesis: the statements after it were left out of the schema,
    and lint and plan said nothing."""
    text = "CREATE TABLE events (id int PRIMARY KEY);\nCREATE TABLE broken (id int PRIMARY KEY;\nCREATE TABLE later (id int);\n"
    error = load_error(tmp_path, database, {"002.sql": text})
    assert (error.path, error.line, error.column) == ("002.sql", *position(text, ";", 2))
    assert 'syntax error at or near ";"' in error.pg_message


def test_missing_relation_points_at_its_name(tmp_path: Path, database: str) -> None:
    text = "CREATE TABLE t (id int);\n\nCREATE VIEW v AS\n  SELECT id\n  FROM missing;\n"
    error = load_error(tmp_path, database, {"views.sql": text})
    assert (error.path, error.line, error.column) == ("views.sql", *position(text, "missing"))
    assert 'relation "missing" does not exist' in str(error)


def test_error_without_position_points_at_statement(tmp_path: Path, database: str) -> None:
    text = "CREATE TABLE t (id int);\n-- again, by mistake\n/* twice */  CREATE TABLE t (id int);\n"
    error = load_error(tmp_path, database, {"dup.sql": text})
    assert (error.path, error.line, error.column) == ("dup.sql", 3, 14)
    assert 'relation "t" already exists' in error.pg_message
    assert "42P07" in error.pg_message
    assert error.statement is not None
    assert error.statement.endswith("CREATE TABLE t (id int)")


def test_a_failure_deep_in_a_batch_names_its_statement_and_keeps_the_ones_before(tmp_path: Path, database: str) -> None:
    tables = [f"CREATE TABLE t{i} (id int PRIMARY KEY);  -- table {i}" for i in range(250)]
    tables[170] = "CREATE TABLE t170 (id int REFERENCES nowhere (id));"
    text = "\n".join(tables) + "\n"
    error = load_error(tmp_path, database, {"many.sql": text})
    assert (error.path, error.line, error.column) == ("many.sql", *position(text, "CREATE TABLE t170"))
    assert "nowhere" in error.pg_message
    # as when statements ran one at a time: those before the failure are there, none after it
    assert fetch_one(database, "SELECT count(*) FROM pg_class WHERE relname ~ '^t[0-9]+$' AND relkind = 'r'") == 170


def test_statements_that_need_their_own_transaction_load(tmp_path: Path, database: str) -> None:
    text = ("CREATE TYPE mood AS ENUM ('sad');\nCREATE TABLE people (id int, m mood);\n"
            "ALTER TYPE mood ADD VALUE 'happy';\n"
            "CREATE TABLE defaults (m mood DEFAULT 'happy');\n"  # uses the value: a later transaction
            "CREATE INDEX CONCURRENTLY people_id ON people (id);\n"
            "BEGIN;\nCREATE TABLE inside (id int);\nCOMMIT;\n")
    assert load_schema(source(tmp_path, {"s.sql": text}), database, sandbox=None) == 8
    assert fetch_one(database, "SELECT count(*) FROM pg_class WHERE relname IN ('defaults', 'people_id', 'inside')") == 3


def test_psql_meta_command_refused(tmp_path: Path, database: str) -> None:
    text = "CREATE TABLE a (id int);\n\n\\connect other\nCREATE TABLE b (id int);\n"
    error = load_error(tmp_path, database, {"meta.sql": text})
    assert (error.path, error.line, error.column) == ("meta.sql", 3, 1)
    assert str(error).startswith("meta.sql:3:1: psql meta-command")
    assert "connect" in error.pg_message
    assert fetch_one(database, "SELECT to_regclass('public.a') IS NULL") is True  # nothing of the file ran


def test_indented_meta_command_message_shows_the_command_as_written(tmp_path: Path, database: str) -> None:
    text = "SELECT 1;\n  \\i other.sql\n"
    error = load_error(tmp_path, database, {"meta.sql": text})
    # The column of the backslash, and the command as the user wrote it (one backslash, not a repr).
    assert str(error).startswith("meta.sql:2:3: psql meta-command '\\i' is not SQL")


def test_pg_dump_restrict_lines_ignored(tmp_path: Path, database: str) -> None:
    dump = (
        "\\restrict abc123XYZ\n\nSET client_encoding = 'UTF8';\n"
        "CREATE TABLE public.t (id integer);\n\n\\unrestrict abc123XYZ\n"
    )
    assert load_schema(source(tmp_path, {"dump.sql": dump}), database, sandbox=None) == 2
    assert fetch_one(database, "SELECT to_regclass('public.t') IS NOT NULL") is True


@pytest.mark.parametrize(
    ("text", "offset", "expected"),
    [
        ("abc", 0, (1, 1)),
        ("abc", 2, (1, 3)),
        ("ab\ncd", 2, (1, 3)),  # the newline itself is still on line 1
        ("ab\ncd", 3, (2, 1)),
        ("a\n\n\nxyz", 5, (4, 2)),
        ("éé x", 3, (1, 4)),  # offsets count characters, not UTF-8 bytes
        ("café\nnaïve ü", 12, (2, 8)),
        ("abc", 99, (1, 4)),  # clamped to the end
        ("abc", -5, (1, 1)),
    ],
)
def test_line_column(text: str, offset: int, expected: tuple[int, int]) -> None:
    assert line_column(text, offset) == expected
