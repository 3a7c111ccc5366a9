"""Data annotations: `-- reconciler: using <expression>` says how a column's values convert to its new type, and a
type change with no implicit cast on a table with rows is refused without one."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from reconciler.conversions import ColumnNote, read_notes
from reconciler.errors import SchemaLoadError
from reconciler.servers import Server
from reconciler.source import load_source
from tests.conftest import fetch_one, run_sql
from tests.repo import Repo


def _notes(tmp_path: Path, text: str) -> tuple[ColumnNote, ...]:
    root = tmp_path / "schemas"
    root.mkdir(exist_ok=True)
    (root / "a.sql").write_text(textwrap.dedent(text))
    return read_notes(load_source(root)).notes


# --- reading (no database) ---

def test_annotations_are_read_with_their_column_and_place(tmp_path: Path) -> None:
    found = _notes(tmp_path, """\
        CREATE TABLE app_events (
            id bigint PRIMARY KEY,
            -- reconciler: using to_timestamp(happened_at)
            happened_at timestamptz NOT NULL,
            --   Reconciler:  backfill  lower(email)
            email_key text NOT NULL
        );
        ALTER TABLE app_events
            -- reconciler: backfill 'n/a'
            ADD COLUMN note text NOT NULL;
        CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$ SELECT '-- reconciler: using x' $$;
        """)
    assert found == (
        ColumnNote("using", "public", "app_events", "happened_at", "to_timestamp(happened_at)", "a.sql", 3),
        ColumnNote("backfill", "public", "app_events", "email_key", "lower(email)", "a.sql", 5),
        ColumnNote("backfill", "public", "app_events", "note", "'n/a'", "a.sql", 9),
    )


@pytest.mark.parametrize(("text", "line", "words"), [
    ("CREATE TABLE t (\n    -- reconciler: using\n    a int\n);\n", 2, "cannot read the annotation"),
    ("CREATE TABLE t (\n    -- reconciler: using a +\n    a int\n);\n", 2, "is not an SQL expression"),
    ("CREATE TABLE t (\n    -- reconciler: using 1; DROP TABLE t\n    a int\n);\n", 2, "is not one SQL expression"),
    ("CREATE TABLE t (\n    -- reconciler: using (SELECT 1 FROM t)\n    a int\n);\n", 2, None),
    ("-- reconciler: backfill 1\nCREATE TABLE t (a int);\n", 1, "directly above a CREATE TABLE (line 2)"),
    ("-- reconciler: backfill 1\nCREATE INDEX ON t (a);\n", 1, "line 2 does not start a column definition"),
    ("CREATE TABLE t (\n    -- reconciler: backfill 1\n    a int, b int\n);\n", 2, "defines more than one column (a, b)"),
    ("CREATE TABLE t (a int); -- reconciler: using 1\n", 1, "on a line of its own"),
    ("CREATE TABLE t (\n    -- reconciler: using 1\n    -- reconciler: using 2\n    a int\n);\n", 2,
     "line 3 does not start a column definition"),
])
def test_a_malformed_or_misplaced_annotation_names_its_file_and_line(tmp_path: Path, text: str, line: int,
                                                                      words: str | None) -> None:
    if words is None:  # a scalar subquery is one expression: the rehearsal decides whether it runs
        assert _notes(tmp_path, text)[0].expression == "(SELECT 1 FROM t)"
        return
    with pytest.raises(SchemaLoadError) as raised:
        _notes(tmp_path, text)
    assert raised.value.path == "a.sql" and raised.value.line == line, str(raised.value)
    assert words in str(raised.value)


def test_a_column_annotated_twice_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SchemaLoadError, match=r"second using annotation \(the first is at a.sql:2\)"):
        _notes(tmp_path, """\
            CREATE TABLE t (
                -- reconciler: using 1
                a int
            );
            ALTER TABLE t
                -- reconciler: using 2
                ADD COLUMN a int;
            """)


# --- planning and applying ---

EVENTS = """\
CREATE TABLE events (
    id bigint PRIMARY KEY,
    {annotation}happened_at {type} NOT NULL,
    label text
);
"""


def _events(tmp_path: Path, database: str, server: Server) -> Repo:
    run_sql(database, "CREATE TABLE events (id bigint PRIMARY KEY, happened_at bigint NOT NULL, label text);"
                      "INSERT INTO events SELECT g, 1700000000 + g, 'e' || g FROM generate_series(1, 50) g; ANALYZE events;")
    return Repo(tmp_path, database, server)


def _plan(repo: Repo, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[dict[str, object]]]:
    plan_file = repo.root / "plan.json"
    plan_file.unlink(missing_ok=True)
    code = repo.run("plan", "-o", str(plan_file))
    captured = capsys.readouterr()
    steps = json.loads(plan_file.read_text())["body"]["steps"] if plan_file.exists() else []
    return code, captured.out + captured.err, steps


def test_a_type_change_without_an_implicit_cast_is_refused_naming_the_column(
        tmp_path: Path, database: str, pg_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    repo = _events(tmp_path, database, pg_server)
    repo.write({"10_events.sql": EVENTS.format(annotation="", type="timestamptz")})
    code, out, steps = _plan(repo, capsys)
    assert code == 3 and not steps, out
    assert "the type of column public.events.happened_at changes from bigint to timestamp with time zone (defined at " \
           "10_events.sql:3), which has no implicit cast" in out
    assert "-- reconciler: using happened_at::timestamp with time zone" in out


def test_the_using_annotation_converts_the_rows(tmp_path: Path, database: str, pg_server: Server,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    repo = _events(tmp_path, database, pg_server)
    annotated = "-- reconciler: using to_timestamp(happened_at)\n    "
    repo.write({"10_events.sql": EVENTS.format(annotation=annotated, type="timestamptz")})
    code, out, steps = _plan(repo, capsys)
    assert code == 2, out
    (step,) = [s for s in steps if s["kind"] == "alter_column_type"]
    assert "USING to_timestamp(happened_at)" in str(step["sql"]) and "::" in str(step["original_sql"])
    # the data check counts values the new type's input rejects: not what this conversion does
    assert not [h for h in step["hazards"] if h["code"] == "CORRECTNESS"], step["hazards"]  # type: ignore[union-attr]
    assert repo.run("apply", str(repo.root / "plan.json")) == 0
    assert fetch_one(database, "SELECT extract(epoch FROM happened_at)::bigint FROM events WHERE id = 7") == 1700000007
    assert repo.run("plan") == 0  # converged


def test_an_implicit_cast_needs_no_annotation(tmp_path: Path, database: str, pg_server: Server,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    repo = _events(tmp_path, database, pg_server)
    repo.write({"10_events.sql": EVENTS.format(annotation="", type="numeric")})  # bigint -> numeric: implicit
    code, out, steps = _plan(repo, capsys)
    assert code == 2 and any(s["kind"] == "alter_column_type" for s in steps), out
    repo.write({"10_events.sql": EVENTS.format(annotation="", type="text")})  # any type -> a string type
    code, out, _ = _plan(repo, capsys)
    assert code == 2, out


def test_an_empty_table_needs_an_annotation_only_where_no_cast_exists(
        tmp_path: Path, database: str, pg_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    run_sql(database, "CREATE TABLE events (id bigint PRIMARY KEY, happened_at text NOT NULL, label text);")
    repo = Repo(tmp_path, database, pg_server)
    repo.write({"10_events.sql": EVENTS.format(annotation="", type="bigint")})  # text::bigint: nothing to convert
    code, out, _ = _plan(repo, capsys)
    assert code == 2 and "no implicit cast" not in out, out
    assert repo.run("apply", str(repo.root / "plan.json")) == 0
    repo.write({"10_events.sql": EVENTS.format(annotation="", type="timestamptz")})  # bigint to timestamptz: no cast
    code, out, _ = _plan(repo, capsys)
    assert code == 3 and "changes from bigint to timestamp with time zone" in out, out
