"""PostgreSQL 18's schema features on a real server: virtual generated columns, named / NOT VALID / NO INHERIT
NOT NULL constraints, NOT ENFORCED constraints, uuidv7() defaults and temporal keys, each created with a new table,
added to an existing one, changed and dropped: planned, rehearsed, applied, verified, and drift clean afterwards
(``converge``). migra and schemainspect know none of them. On an older server (RECONCILER_TEST_PG_BINDIR=
/usr/lib/postgresql/15/bin) the desired schema using them is refused at load, in one line naming the feature."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.config import load_config
from reconciler.errors import SchemaLoadError
from reconciler.pipeline import drift, open_servers
from reconciler.plan import Plan
from reconciler.servers import Server, connect
from tests.conftest import fetch_one, run_sql
from tests.converge import converge, load_live, plan_change, write_project


@pytest.fixture
def pg18(pg_server: Server) -> Server:
    if pg_server.major_version < 18:
        pytest.skip(f"PostgreSQL 18 features; the test server runs {pg_server.major_version}")
    return pg_server


def _statements(plan: Plan) -> list[str]:
    return [" ".join(s.sql.split()) for s in plan.body.steps]


def _rows(database: str, query: str) -> list[tuple[object, ...]]:
    with connect(database) as conn:
        return [tuple(r) for r in conn.execute(query.encode()).fetchall()]


def _generated(database: str) -> dict[str, str]:
    return {str(name): str(kind) for name, kind in _rows(
        database, "SELECT attname, attgenerated::text FROM pg_attribute "
                  "WHERE attrelid = 't'::regclass AND attnum > 0 AND NOT attisdropped")}


def _not_nulls(database: str, table: str = "t") -> set[tuple[object, ...]]:
    """(column, name, validated, no inherit) of the table's NOT NULL constraints."""
    return set(_rows(database, f"""SELECT a.attname, c.conname, c.convalidated, c.connoinherit FROM pg_constraint c
                                   JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
                                   WHERE c.contype = 'n' AND c.conrelid = '{table}'::regclass"""))


T = "CREATE TABLE t (id int PRIMARY KEY, a int, b int);\n"


def _with(column: str) -> str:
    return T.replace("b int", f"b int, {column}")


# --- virtual generated columns ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("old", "new", "kinds", "expected"), [
    pytest.param("", "CREATE TABLE t (a int, v int GENERATED ALWAYS AS (a * 2) VIRTUAL, "
                     "d int GENERATED ALWAYS AS (a * 3), s int GENERATED ALWAYS AS (a * 4) STORED);",
                 {"v": "v", "d": "v", "s": "s"}, "virtual",  # 18's default kind is virtual
                 id="new-table"),
    pytest.param(T, _with("v int GENERATED ALWAYS AS (a * 2) VIRTUAL"), {"v": "v"},
                 'add column "v" integer generated always as ((a * 2)) virtual', id="added"),
    pytest.param(_with("v int GENERATED ALWAYS AS (a * 2) VIRTUAL"), _with("v int GENERATED ALWAYS AS (a + b) VIRTUAL"),
                 {"v": "v"}, 'ALTER COLUMN "v" SET EXPRESSION AS ((a + b))', id="expression-changed"),
    pytest.param(_with("v int GENERATED ALWAYS AS (a * 2) STORED"), _with("v int GENERATED ALWAYS AS (a + b)"),
                 {"v": "v"}, 'DROP COLUMN "v", ADD COLUMN "v" integer GENERATED ALWAYS AS ((a + b)) VIRTUAL',
                 id="stored-to-virtual"),
    pytest.param(_with("v int GENERATED ALWAYS AS (a * 2) VIRTUAL"), _with("v int GENERATED ALWAYS AS (a * 2) STORED"),
                 {"v": "s"}, 'DROP COLUMN "v", ADD COLUMN "v" integer GENERATED ALWAYS AS ((a * 2)) STORED',
                 id="virtual-to-stored"),
    pytest.param(_with("v int GENERATED ALWAYS AS (a * 2) VIRTUAL"), T, {}, 'drop column "v"', id="dropped"),
])
def test_virtual_generated_columns(old: str, new: str, kinds: dict[str, str], expected: str, tmp_path: Path,
                                   database: str, pg18: Server) -> None:
    plan = converge(tmp_path, database, pg18, old, new, replan=True)
    assert any(expected in s for s in _statements(plan)), _statements(plan)
    assert {k: v for k, v in _generated(database).items() if v} == kinds


def test_virtual_column_values_follow_the_new_expression(tmp_path: Path, database: str, pg18: Server) -> None:
    converge(tmp_path, database, pg18, _with("v int GENERATED ALWAYS AS (a * 2) STORED") + "INSERT INTO t VALUES (1, 5, 7);",
             _with("v int GENERATED ALWAYS AS (a + b)"))
    assert fetch_one(database, "SELECT v FROM t") == 12


def test_virtual_column_made_plain_is_refused_naming_it(tmp_path: Path, database: str, pg18: Server) -> None:
    load_live(tmp_path, database, _with("v int GENERATED ALWAYS AS (a * 2) VIRTUAL"))
    config = write_project(tmp_path, database, pg18, _with("v int"))
    with pytest.raises(Exception, match=r"column public\.t\.v is a virtual generated column in live and a plain column"):
        plan_change(config)


# --- NOT NULL constraints: named, NOT VALID, NO INHERIT ------------------------------------------------------------

@pytest.mark.parametrize(("old", "new", "expected"), [
    pytest.param("", "CREATE TABLE t (id int PRIMARY KEY, a int CONSTRAINT \"A nn\" NOT NULL DEFAULT 1, b int, "
                     "c int NOT NULL, CONSTRAINT id_nn NOT NULL id, d int NOT NULL NO INHERIT);",
                 {("id", "id_nn", True, False), ("a", "A nn", True, False), ("c", "t_c_not_null", True, False),
                  ("d", "t_d_not_null", True, True)}, id="new-table"),
    pytest.param(T, _with("c int CONSTRAINT c_nn NOT NULL DEFAULT 0, d int")
                 + "ALTER TABLE t ADD CONSTRAINT d_nn NOT NULL d NOT VALID;",
                 {("id", "t_id_not_null", True, False), ("c", "c_nn", True, False), ("d", "d_nn", False, False)},
                 id="new-columns"),
    pytest.param(T, T + "ALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a; ALTER TABLE t ADD CONSTRAINT b_nn NOT NULL b NOT VALID;",
                 {("id", "t_id_not_null", True, False), ("a", "a_nn", True, False), ("b", "b_nn", False, False)},
                 id="added-to-existing-columns"),
    pytest.param(T + "ALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a; ALTER TABLE t ALTER b SET NOT NULL;",
                 T + "ALTER TABLE t ADD CONSTRAINT a_renamed NOT NULL a NO INHERIT; ALTER TABLE t ADD CONSTRAINT b_nn NOT NULL b;",
                 {("id", "t_id_not_null", True, False), ("a", "a_renamed", True, True), ("b", "b_nn", True, False)},
                 id="renamed-and-no-inherit"),
    pytest.param(T + "ALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a NOT VALID; ALTER TABLE t ADD CONSTRAINT b_nn NOT NULL b;",
                 T + "ALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a; ALTER TABLE t ADD CONSTRAINT b_nn NOT NULL b NOT VALID;",
                 {("id", "t_id_not_null", True, False), ("a", "a_nn", True, False), ("b", "b_nn", False, False)},
                 id="validated-and-made-not-valid"),
    pytest.param(T + "ALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a; ALTER TABLE t ADD CONSTRAINT b_nn NOT NULL b NOT VALID;",
                 T.replace("a int, b int", "a int NOT NULL, b int NOT NULL"),
                 {("id", "t_id_not_null", True, False), ("a", "t_a_not_null", True, False), ("b", "t_b_not_null", True, False)},
                 id="back-to-plain"),
    pytest.param("CREATE TABLE t (id int PRIMARY KEY, old int NOT NULL); ALTER TABLE t RENAME old TO a;",
                 "CREATE TABLE t (id int PRIMARY KEY, a int NOT NULL);",
                 {("id", "t_id_not_null", True, False), ("a", "t_a_not_null", True, False)}, id="stale-default-name"),
    pytest.param(T + "ALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a; ALTER TABLE t ADD CONSTRAINT b_nn NOT NULL b NOT VALID;", T,
                 {("id", "t_id_not_null", True, False)}, id="dropped"),
])
def test_not_null_constraints(old: str, new: str, expected: set[tuple[object, ...]], tmp_path: Path, database: str,
                              pg18: Server) -> None:
    converge(tmp_path, database, pg18, old, new, replan=True)
    assert _not_nulls(database) == expected


def test_named_not_null_on_a_full_table_is_added_online(tmp_path: Path, database: str, pg18: Server) -> None:
    """The CHECK validated first spares the new constraint's scan under the exclusive lock, as for SET NOT NULL."""
    plan = converge(tmp_path, database, pg18, T + "INSERT INTO t SELECT g, g, g FROM generate_series(1, 100) g;",
                    T + "ALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a;")
    statements = _statements(plan)
    check = next(i for i, s in enumerate(statements) if 'CHECK ("a" IS NOT NULL) NOT VALID' in s)
    validate = next(i for i, s in enumerate(statements) if s.startswith("ALTER TABLE") and "VALIDATE CONSTRAINT" in s)
    add = statements.index('ALTER TABLE "public"."t" ADD CONSTRAINT "a_nn" NOT NULL "a"')
    assert check < validate < add
    assert plan.body.steps[add].phase > plan.body.steps[validate].phase


def test_not_valid_not_null_keeps_existing_nulls(tmp_path: Path, database: str, pg18: Server) -> None:
    plan = converge(tmp_path, database, pg18, T + "INSERT INTO t VALUES (1, NULL, NULL);",
                    T + "ALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a NOT VALID;", replan=True)
    assert not [h for s in plan.body.steps for h in s.hazards if h.code == "CORRECTNESS"]
    assert _not_nulls(database) >= {("a", "a_nn", False, False)}
    assert fetch_one(database, "SELECT count(*) FROM t WHERE a IS NULL") == 1


def test_drift_sees_a_not_null_constraint_renamed_or_made_not_valid(tmp_path: Path, database: str, pg18: Server) -> None:
    schema = T + "ALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a;"
    load_live(tmp_path, database, schema)
    config = load_config(write_project(tmp_path, database, pg18, schema))
    with open_servers(config, config.environment("test")) as servers:
        assert drift(config, servers) == []
        run_sql(database, "ALTER TABLE t RENAME CONSTRAINT a_nn TO other")
        assert [str(d) for d in drift(config, servers)] == ["column public.t.a (different)"]
        run_sql(database, "ALTER TABLE t DROP CONSTRAINT other, ADD CONSTRAINT a_nn NOT NULL a NOT VALID")
        assert [str(d) for d in drift(config, servers)] == ["column public.t.a (different)"]
        run_sql(database, "ALTER TABLE t DROP CONSTRAINT a_nn, ADD CONSTRAINT a_nn NOT NULL a")
        assert drift(config, servers) == []


# --- NOT ENFORCED, uuidv7() --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("old", "new", "expected"), [
    pytest.param("", "CREATE TABLE u (id int PRIMARY KEY); CREATE TABLE t (id int, a int, CONSTRAINT c CHECK (a > 0) "
                     "NOT ENFORCED, CONSTRAINT f FOREIGN KEY (id) REFERENCES u NOT ENFORCED);",
                 {("c", False), ("f", False)}, id="new-table"),
    pytest.param("CREATE TABLE u (id int PRIMARY KEY); CREATE TABLE t (id int, a int); INSERT INTO t VALUES (1, -1);",
                 "CREATE TABLE u (id int PRIMARY KEY); CREATE TABLE t (id int, a int, CONSTRAINT c CHECK (a > 0) "
                 "NOT ENFORCED, CONSTRAINT f FOREIGN KEY (id) REFERENCES u NOT ENFORCED);",
                 {("c", False), ("f", False)}, id="added-over-rows-that-break-them"),
    pytest.param("CREATE TABLE u (id int PRIMARY KEY); CREATE TABLE t (id int, a int, CONSTRAINT c CHECK (a > 0) "
                 "NOT ENFORCED, CONSTRAINT f FOREIGN KEY (id) REFERENCES u NOT ENFORCED);",
                 "CREATE TABLE u (id int PRIMARY KEY); CREATE TABLE t (id int, a int, CONSTRAINT c CHECK (a > 0), "
                 "CONSTRAINT f FOREIGN KEY (id) REFERENCES u);",
                 {("c", True), ("f", True)}, id="enforced"),
    pytest.param("CREATE TABLE u (id int PRIMARY KEY); CREATE TABLE t (id int, a int, CONSTRAINT c CHECK (a > 0), "
                 "CONSTRAINT f FOREIGN KEY (id) REFERENCES u);",
                 "CREATE TABLE u (id int PRIMARY KEY); CREATE TABLE t (id int, a int, CONSTRAINT c CHECK (a > 0) "
                 "NOT ENFORCED, CONSTRAINT f FOREIGN KEY (id) REFERENCES u NOT ENFORCED);",
                 {("c", False), ("f", False)}, id="no-longer-enforced"),
    pytest.param("CREATE TABLE u (id int PRIMARY KEY); CREATE TABLE t (id int, a int, CONSTRAINT c CHECK (a > 0) "
                 "NOT ENFORCED, CONSTRAINT f FOREIGN KEY (id) REFERENCES u NOT ENFORCED);",
                 "CREATE TABLE u (id int PRIMARY KEY); CREATE TABLE t (id int, a int);", set(), id="dropped"),
])
def test_not_enforced_constraints(old: str, new: str, expected: set[tuple[object, ...]], tmp_path: Path, database: str,
                                  pg18: Server) -> None:
    plan = converge(tmp_path, database, pg18, old, new, replan=True)
    assert not [h for s in plan.body.steps for h in s.hazards if h.code == "CORRECTNESS"]  # nothing is checked
    assert set(_rows(database, "SELECT conname, conenforced FROM pg_constraint "
                               "WHERE conrelid = 't'::regclass AND contype IN ('c', 'f')")) == expected


@pytest.mark.parametrize(("old", "new"), [
    pytest.param("", "CREATE TABLE t (id uuid DEFAULT uuidv7() PRIMARY KEY, n int);", id="new-table"),
    pytest.param("CREATE TABLE t (n int);", "CREATE TABLE t (n int, id uuid DEFAULT uuidv7());", id="added"),
    pytest.param("CREATE TABLE t (id uuid DEFAULT gen_random_uuid(), n int);",
                 "CREATE TABLE t (id uuid DEFAULT uuidv7(), n int);", id="changed"),
    pytest.param("CREATE TABLE t (id uuid DEFAULT uuidv7(), n int);", "CREATE TABLE t (id uuid, n int);", id="dropped"),
])
def test_uuidv7_defaults(old: str, new: str, tmp_path: Path, database: str, pg18: Server) -> None:
    converge(tmp_path, database, pg18, old, new, replan=True)
    wanted = "uuidv7()" if "uuidv7" in new else None
    assert fetch_one(database, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef "
                               "WHERE adrelid = 't'::regclass AND adnum = (SELECT attnum FROM pg_attribute "
                               "WHERE attrelid = 't'::regclass AND attname = 'id')") == wanted


# --- temporal keys ---------------------------------------------------------------------------------------------

_PARENT = "CREATE EXTENSION btree_gist; CREATE TABLE p (id int, valid_at daterange{});\n"
_CHILD = "CREATE TABLE c (id int, pid int, valid_at daterange{});\n"
_PK = ", PRIMARY KEY (id, valid_at WITHOUT OVERLAPS)"
_FK = ", FOREIGN KEY (pid, PERIOD valid_at) REFERENCES p (id, PERIOD valid_at)"
_UNIQUE = ", CONSTRAINT c_u UNIQUE (id, valid_at WITHOUT OVERLAPS)"


@pytest.mark.parametrize(("old", "new", "expected"), [
    pytest.param("", _PARENT.format(_PK) + _CHILD.format(_FK + _UNIQUE),
                 {"p_pkey": "PRIMARY KEY (id, valid_at WITHOUT OVERLAPS)", "c_u": "UNIQUE (id, valid_at WITHOUT OVERLAPS)",
                  "c_pid_valid_at_fkey": "FOREIGN KEY (pid, PERIOD valid_at) REFERENCES p(id, PERIOD valid_at)"},
                 id="new-tables"),
    pytest.param(_PARENT.format("") + _CHILD.format(""), _PARENT.format(_PK) + _CHILD.format(_FK + _UNIQUE),
                 {"p_pkey": "PRIMARY KEY (id, valid_at WITHOUT OVERLAPS)", "c_u": "UNIQUE (id, valid_at WITHOUT OVERLAPS)",
                  "c_pid_valid_at_fkey": "FOREIGN KEY (pid, PERIOD valid_at) REFERENCES p(id, PERIOD valid_at)"},
                 id="added"),
    pytest.param(_PARENT.format(_PK) + _CHILD.format(_UNIQUE),
                 _PARENT.format(", PRIMARY KEY (id, valid_at)") + _CHILD.format(", CONSTRAINT c_u UNIQUE (id, valid_at)"),
                 {"p_pkey": "PRIMARY KEY (id, valid_at)", "c_u": "UNIQUE (id, valid_at)"}, id="no-longer-temporal"),
    pytest.param(_PARENT.format(", PRIMARY KEY (id, valid_at)") + _CHILD.format(""),
                 _PARENT.format(_PK) + _CHILD.format(""),
                 {"p_pkey": "PRIMARY KEY (id, valid_at WITHOUT OVERLAPS)"}, id="made-temporal"),
    pytest.param(_PARENT.format(_PK) + _CHILD.format(_FK + _UNIQUE), _PARENT.format("") + _CHILD.format(""), {},
                 id="dropped"),
])
def test_temporal_keys(old: str, new: str, expected: dict[str, str], tmp_path: Path, database: str,
                       pg18: Server) -> None:
    converge(tmp_path, database, pg18, old, new, replan=True)
    assert dict(_rows(database, "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                                "WHERE conrelid IN ('p'::regclass, 'c'::regclass) AND contype <> 'n'")) == expected


def test_temporal_key_is_enforced_after_apply(tmp_path: Path, database: str, pg18: Server) -> None:
    converge(tmp_path, database, pg18, _PARENT.format(""), _PARENT.format(_PK))
    run_sql(database, "INSERT INTO p VALUES (1, '[2025-01-01,2025-06-01)')")
    with pytest.raises(Exception, match="conflicting key value violates exclusion constraint"):
        run_sql(database, "INSERT INTO p VALUES (1, '[2025-03-01,2025-09-01)')")


# --- an older target: refused at load, naming the feature -----------------------------------------------------------

_NEWER = [
    pytest.param("CREATE TABLE t (a int,\n  v int GENERATED ALWAYS AS (a * 2) VIRTUAL);", 2, "virtual generated columns",
                 id="virtual"),
    pytest.param("CREATE TABLE t (a int,\n  v int GENERATED ALWAYS AS (a * 2));", 2, "virtual generated columns",
                 id="generated-without-stored"),
    pytest.param("CREATE TABLE t (a int);\nALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a;", 2,
                 r"named NOT NULL constraints \(CONSTRAINT name NOT NULL column\)", id="named-not-null"),
    pytest.param("CREATE TABLE t (a int);\n\nALTER TABLE t ADD CONSTRAINT a_nn NOT NULL a NOT VALID;", 3,
                 "named NOT NULL constraints .* and NOT NULL constraints NOT VALID or NO INHERIT", id="not-valid-not-null"),
    pytest.param("CREATE TABLE t (a int, CONSTRAINT c CHECK (a > 0) NOT ENFORCED);", 1, "NOT ENFORCED constraints",
                 id="not-enforced"),
    pytest.param("CREATE EXTENSION IF NOT EXISTS btree_gist;\nCREATE TABLE t (id int, r daterange,\n"
                 "  PRIMARY KEY (id, r WITHOUT OVERLAPS));", 3, r"temporal keys \(WITHOUT OVERLAPS\)", id="temporal-key"),
    pytest.param("CREATE TABLE t (id uuid DEFAULT uuidv7());", 1, r"uuidv7\(\) needs", id="uuidv7"),
]


@pytest.mark.parametrize(("schema", "line", "feature"), _NEWER)
def test_older_target_refuses_naming_file_line_and_feature(schema: str, line: int, feature: str, tmp_path: Path,
                                                           database: str, pg_server: Server) -> None:
    if pg_server.major_version >= 18:
        pytest.skip("an older target's refusal: run with RECONCILER_TEST_PG_BINDIR=/usr/lib/postgresql/15/bin")
    config = write_project(tmp_path, database, pg_server, schema)
    with pytest.raises(SchemaLoadError) as caught:
        plan_change(config)
    text = str(caught.value)
    assert "\n" not in text
    assert caught.value.line == line
    pattern = rf"^{feature}.* PostgreSQL 18; the target runs {pg_server.major_version}$"
    assert re.search(pattern, caught.value.pg_message), caught.value.pg_message
    assert text.startswith(f"new.sql:{line}:")


def test_older_target_refusal_is_one_line_on_the_command_line(tmp_path: Path, database: str, pg_server: Server,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    if pg_server.major_version >= 18:
        pytest.skip("an older target's refusal: run with RECONCILER_TEST_PG_BINDIR=/usr/lib/postgresql/15/bin")
    config = write_project(tmp_path, database, pg_server, "CREATE TABLE t (a int);\n"
                           "CREATE TABLE u (a int, v int GENERATED ALWAYS AS (a * 2) VIRTUAL);\n")
    assert main(["--config", str(config), "plan", "--env", "test"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: new.sql:2:58: virtual generated columns (VIRTUAL, or GENERATED ALWAYS AS (...) without STORED) "
        f"need PostgreSQL 18; the target runs {pg_server.major_version}"]
