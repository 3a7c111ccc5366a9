"""Object kinds whose catalog state a plan used to get wrong on a real server: comments on objects the plan
creates, table inheritance, extension versions, domains whose CHECK holds a quoted regular expression. Each is
planned, rehearsed, applied and verified (live == desired afterwards), and drift sees what the plan fixes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import psycopg
import pytest

from reconciler.config import load_config
from reconciler.errors import ReconcilerError, RefusedError
from reconciler.inspect import ObjectDifference
from reconciler.pipeline import drift, open_servers
from reconciler.servers import EmbeddedCluster, Server, connect
from tests.conftest import fetch_one, run_sql
from tests.converge import apply_and_verify, converge, load_live, plan_change, write_project


def _drift(config_path: Path) -> list[ObjectDifference]:
    config = load_config(config_path)
    with open_servers(config, config.environment("test")) as servers:
        return drift(config, servers)


# --- comments on objects the plan creates ----------------------------------------------------------

_TABLE = "CREATE TABLE t (id int PRIMARY KEY, a int);\n"
_TRIGGER_FUNCTION = "CREATE FUNCTION tf() RETURNS trigger LANGUAGE plpgsql AS 'begin return new; end';\n"

# kind -> (the objects and their comment, the comment read back from the target)
COMMENTED = {
    "trigger": (_TRIGGER_FUNCTION + "CREATE TRIGGER trg BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION tf();\n"
                "COMMENT ON TRIGGER trg ON t IS 'the trigger';",
                "SELECT obj_description(oid, 'pg_trigger') FROM pg_trigger WHERE tgname = 'trg'"),
    "policy": ("CREATE POLICY pol ON t USING (a > 0); COMMENT ON POLICY pol ON t IS 'the policy';",
               "SELECT obj_description(oid, 'pg_policy') FROM pg_policy WHERE polname = 'pol'"),
    "rule": ("CREATE RULE r AS ON UPDATE TO t DO ALSO NOTIFY t;\nCOMMENT ON RULE r ON t IS 'the rule';",
             "SELECT obj_description(oid, 'pg_rewrite') FROM pg_rewrite WHERE rulename = 'r'"),
    "check constraint": ("ALTER TABLE t ADD CONSTRAINT a_positive CHECK (a > 0);\n"
                         "COMMENT ON CONSTRAINT a_positive ON t IS 'the check';",
                         "SELECT obj_description(oid, 'pg_constraint') FROM pg_constraint WHERE conname = 'a_positive'"),
    "index": ("CREATE INDEX t_a ON t (a); COMMENT ON INDEX t_a IS 'the index';",
              "SELECT obj_description('t_a'::regclass, 'pg_class')"),
    "function": ("CREATE FUNCTION twice(x int) RETURNS int LANGUAGE sql AS 'select 2 * x';\n"
                 "COMMENT ON FUNCTION twice(int) IS 'the function';",
                 "SELECT obj_description('twice(int)'::regprocedure, 'pg_proc')"),
    "enum type": ("CREATE TYPE mood AS ENUM ('ok'); COMMENT ON TYPE mood IS 'the enum';",
                  "SELECT obj_description('mood'::regtype, 'pg_type')"),
    "domain": ("CREATE DOMAIN positive AS int CONSTRAINT positive_check CHECK (VALUE > 0);\n"
               "COMMENT ON DOMAIN positive IS 'the domain';\n"
               "COMMENT ON CONSTRAINT positive_check ON DOMAIN positive IS 'the domain check';",
               "SELECT obj_description('positive'::regtype, 'pg_type') || ' / ' || obj_description(oid, 'pg_constraint') "
               "FROM pg_constraint WHERE conname = 'positive_check'"),
    "sequence": ("CREATE SEQUENCE counter; COMMENT ON SEQUENCE counter IS 'the sequence';",
                 "SELECT obj_description('counter'::regclass, 'pg_class')"),
    "column of a new table": ("CREATE TABLE n (x int); COMMENT ON COLUMN n.x IS 'the column';",
                              "SELECT col_description('n'::regclass, 1)"),
    "operator": ("CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq);\n"
                 "CREATE OPERATOR !!! (RIGHTARG = int, FUNCTION = int4abs);\n"
                 "COMMENT ON OPERATOR === (int, int) IS 'infix'; COMMENT ON OPERATOR !!! (NONE, int) IS 'prefix';",
                 "SELECT string_agg(obj_description(oid, 'pg_operator'), ' / ' ORDER BY oprname DESC) FROM pg_operator "
                 "WHERE oprname IN ('===', '!!!')"),
}
EXPECTED = {"domain": "the domain / the domain check", "operator": "infix / prefix"}


# objects live has already (nothing creates rules yet: the rule's comment is set on one live has)
ALREADY = {"rule": "CREATE RULE r AS ON UPDATE TO t DO ALSO NOTIFY t;\n"}


@pytest.mark.parametrize("kind", sorted(COMMENTED))
def test_comment_on_an_object_the_plan_creates(kind: str, tmp_path: Path, database: str, pg_server: Server) -> None:
    objects, read_back = COMMENTED[kind]
    plan = converge(tmp_path, database, pg_server, _TABLE + ALREADY.get(kind, ""), _TABLE + objects)
    assert any(s.kind == "comment" for s in plan.body.steps)
    want = EXPECTED.get(kind) or objects.rsplit("'", 2)[-2]
    assert fetch_one(database, read_back) == want


@pytest.mark.parametrize("kind", ["trigger", "policy", "rule"])
def test_drift_sees_a_missing_comment_on_a_table_s_object(kind: str, tmp_path: Path, database: str,
                                                          pg_server: Server) -> None:
    """Triggers, policies and rules have no schema of their own in the catalog: their comments were left out."""
    objects = COMMENTED[kind][0]
    without_comment = objects[:objects.index("COMMENT ON")]
    load_live(tmp_path, database, _TABLE + without_comment)
    config = write_project(tmp_path, database, pg_server, _TABLE + objects)
    name = {"trigger": "trg", "policy": "pol", "rule": "r"}[kind]
    assert _drift(config) == [ObjectDifference("comment", f"{kind} {name} on public.t", "missing")]


# --- domains whose CHECK holds a long regular expression with quotes and backslashes ------------------

# longer than 63 bytes as pg_get_constraintdef prints it (array[name, text] is a name[]: it was cut there)
_EMAIL = r"""CREATE DOMAIN email AS text CONSTRAINT email_check CHECK (VALUE ~ '^[^@''\\ ]+@[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{2,}$');"""
_EMAIL_STRICTER = r"""CREATE DOMAIN email AS text CONSTRAINT email_check CHECK (VALUE ~ '^[^@''\\ ]+@[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{3,}$')
  CONSTRAINT "no 'quotes'" CHECK (VALUE !~ E'[\'\\\\]');"""
_PEOPLE = "CREATE TABLE people (id int, address email);\n"


def test_domain_with_a_quoted_regex_created(tmp_path: Path, database: str, pg_server: Server) -> None:
    plan = converge(tmp_path, database, pg_server, "", _EMAIL + _PEOPLE, replan=True)
    assert any(s.kind == "create_domain" for s in plan.body.steps)
    assert fetch_one(database, "SELECT 'ann.lee@mail.example.org'::email::text") == "ann.lee@mail.example.org"
    for bad in ("o''neil@example.org", "a\\b@example.org", "ann@example"):  # a quote, a backslash, no top level
        with pytest.raises(psycopg.errors.CheckViolation):
            fetch_one(database, f"SELECT '{bad}'::email")


def test_domain_with_a_quoted_regex_changed(tmp_path: Path, database: str, pg_server: Server) -> None:
    old = _EMAIL + _PEOPLE + "INSERT INTO people VALUES (1, 'ann@example.org');\n"
    plan = converge(tmp_path, database, pg_server, old, _EMAIL_STRICTER + _PEOPLE, replan=True)
    assert [s.kind for s in plan.body.steps].count("alter_domain") == 3  # drop, add, add
    assert fetch_one(database, "SELECT address::text FROM people") == "ann@example.org"
    with pytest.raises(psycopg.errors.CheckViolation):
        fetch_one(database, "SELECT 'ann@example.io'::email")


def test_long_composite_attribute_type(tmp_path: Path, database: str, pg_server: Server) -> None:
    """A composite type's attribute types were read through the same name[]: a long one was cut."""
    new = ('CREATE SCHEMA "a rather long schema name for types";\n'
           'CREATE TYPE "a rather long schema name for types"."an enum type with a long name" AS ENUM (\'x\');\n'
           'CREATE TYPE pair AS (label text, kind "a rather long schema name for types"."an enum type with a long name");')
    converge(tmp_path, database, pg_server, "", new, replan=True)
    assert fetch_one(database, "SELECT (('a', 'x')::pair).kind::text") == "x"


def test_domain_constraint_not_valid(tmp_path: Path, database: str, pg_server: Server) -> None:
    """CREATE DOMAIN takes no NOT VALID: a domain whose constraint is not validated is created, then the constraint
    added NOT VALID; validated later in place."""
    not_valid = "CREATE DOMAIN code AS text; ALTER DOMAIN code ADD CONSTRAINT code_check CHECK (VALUE <> '') NOT VALID;"
    valid = "CREATE DOMAIN code AS text CONSTRAINT code_check CHECK (VALUE <> '');"
    converge(tmp_path, database, pg_server, "", not_valid, replan=True)
    assert fetch_one(database, "SELECT convalidated FROM pg_constraint WHERE conname = 'code_check'") is False
    config = write_project(tmp_path / "again", database, pg_server, valid)
    plan = plan_change(config)
    apply_and_verify(config, plan, database)
    assert [s.sql for s in plan.body.steps] == ['ALTER DOMAIN "public"."code" VALIDATE CONSTRAINT "code_check"']
    assert fetch_one(database, "SELECT convalidated FROM pg_constraint WHERE conname = 'code_check'") is True


# --- extension versions ------------------------------------------------------------------------------

_HSTORE = "CREATE EXTENSION hstore VERSION '{}';\nCREATE TABLE t (h hstore);\n"


def test_extension_updated_to_the_desired_version(tmp_path: Path, database: str, pg_server: Server) -> None:
    old = _HSTORE.format("1.7") + "INSERT INTO t VALUES ('a=>1');\n"
    plan = converge(tmp_path, database, pg_server, old, _HSTORE.format("1.8"), replan=True)
    [step] = plan.body.steps
    assert step.sql == """ALTER EXTENSION "hstore" UPDATE TO '1.8'"""
    assert [h.code for h in step.hazards] == ["EXTENSION_CHANGE"]
    assert "update script" in step.hazards[0].message
    assert fetch_one(database, "SELECT extversion FROM pg_extension WHERE extname = 'hstore'") == "1.8"
    assert fetch_one(database, "SELECT h -> 'a' FROM t") == "1"


def test_drift_sees_an_extension_version(tmp_path: Path, database: str, pg_server: Server) -> None:
    load_live(tmp_path, database, _HSTORE.format("1.7"))
    config = write_project(tmp_path, database, pg_server, _HSTORE.format("1.8"))
    assert _drift(config) == [ObjectDifference("extension", "hstore", "different")]


def test_extension_downgrade_without_a_path_is_refused(tmp_path: Path, database: str, pg_server: Server) -> None:
    load_live(tmp_path, database, _HSTORE.format("1.8"))
    config = write_project(tmp_path, database, pg_server, _HSTORE.format("1.7"))
    with pytest.raises(RefusedError, match=r"extension hstore: the target's server has no update from version 1\.8 "
                                           r"to 1\.7") as refused:
        plan_change(config)
    assert refused.value.exit_code == 3


PG15 = Path("/usr/lib/postgresql/15/bin")


@pytest.mark.skipif(not (PG15 / "postgres").exists(), reason="Debian's postgresql-15 is not installed")
def test_extension_version_the_target_server_lacks_is_refused(tmp_path: Path, pg_server: Server) -> None:
    """A PostgreSQL 15 target has citext 1.6 at most; the desired schema, loaded on the test server, asks for a
    version only that server ships."""
    shadow_versions = {r[0] for r in _rows(pg_server.dsn, "SELECT version FROM pg_available_extension_versions "
                                                          "WHERE name = 'citext'")}
    target = EmbeddedCluster(Path(tempfile.mkdtemp()) / "pg15", PG15, durable=False)
    server = target.start()
    try:
        lacking = sorted(shadow_versions - {r[0] for r in _rows(server.dsn, "SELECT version FROM "
                                                                "pg_available_extension_versions WHERE name = 'citext'")})
        if not lacking:
            pytest.skip("the test server ships no citext version PostgreSQL 15 lacks")
        run_sql(server.dsn, "CREATE EXTENSION citext")
        # shadow_cache 0: the test server, shared by every test, keeps no copy of this target
        config = write_project(tmp_path, server.dsn, pg_server, f"CREATE EXTENSION citext VERSION '{lacking[-1]}';",
                               "shadow_cache: 0\n", environment_extra="    allow_version_mismatch: true\n")
        with pytest.raises(RefusedError, match=rf"extension citext: the desired schema has version {lacking[-1]}, "
                                               r"which the target's server does not have \(versions there: .*1\.6"):
            plan_change(config)
    finally:
        target.stop(delete=True)



# --- table inheritance -------------------------------------------------------------------------------

_FAMILY = """CREATE TABLE parent (id int PRIMARY KEY, a int NOT NULL DEFAULT 3, c int CHECK (c > 0));
CREATE TABLE audit (id int, changed_at timestamptz);
CREATE TABLE child (b int CHECK (b > 1), a int) INHERITS (parent, audit);
CREATE TABLE grandchild (x int) INHERITS (child);
"""
_INHERITANCE = """SELECT string_agg(format('%s.%s local=%s inherited=%s', a.attrelid::regclass, a.attname, a.attislocal,
                                     a.attinhcount), '; ' ORDER BY a.attrelid::regclass::text, a.attname)
                  FROM pg_attribute a WHERE a.attrelid IN ('child'::regclass, 'grandchild'::regclass) AND a.attnum > 0
                  UNION ALL
                  SELECT string_agg(format('%s.%s local=%s inherited=%s', conrelid::regclass, conname, conislocal,
                                           coninhcount), '; ' ORDER BY conrelid::regclass::text, conname)
                  FROM pg_constraint WHERE contype = 'c' AND conrelid = ANY('{parent,child,grandchild}'::regclass[])
                  UNION ALL
                  SELECT string_agg(format('%s < %s #%s', inhrelid::regclass, inhparent::regclass, inhseqno), '; '
                                    ORDER BY inhrelid::regclass::text, inhseqno) FROM pg_inherits"""


def _rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    with connect(dsn) as conn:
        return conn.execute(query.encode()).fetchall()


def test_children_created_as_the_desired_schema_has_them(tmp_path: Path, database: str, second_database: str,
                                                          pg_server: Server) -> None:
    """Inherited columns only inherited (attislocal false), a column stated in the child too both, two parents in
    their order, parents before children: the target reads as a database loaded from the desired file."""
    plan = converge(tmp_path, database, pg_server, "", _FAMILY, replan=True)
    creates = [s.object for s in plan.body.steps if s.kind == "create_table"]
    assert creates.index("public.parent") < creates.index("public.child") < creates.index("public.grandchild")
    load_live(tmp_path / "desired", second_database, _FAMILY)
    assert _rows(database, _INHERITANCE) == _rows(second_database, _INHERITANCE)
    assert "child.a local=t inherited=1" in str(_rows(database, _INHERITANCE)[0][0])
    assert "child.id local=f inherited=2" in str(_rows(database, _INHERITANCE)[0][0])
    assert "child < audit #2" in str(_rows(database, _INHERITANCE)[2][0])


def test_drift_sees_an_inherited_column_made_local(tmp_path: Path, database: str, pg_server: Server) -> None:
    """A child whose parent's columns were restated (as migra's CREATE TABLE did) has them local too."""
    load_live(tmp_path, database, "CREATE TABLE parent (id int, note text);\n"
                                  "CREATE TABLE child (id int, note text, b int) INHERITS (parent);")
    config = write_project(tmp_path, database, pg_server, "CREATE TABLE parent (id int, note text);\n"
                                                          "CREATE TABLE child (b int) INHERITS (parent);")
    assert _drift(config) == [ObjectDifference("column", "public.child.id", "different"),
                              ObjectDifference("column", "public.child.note", "different")]


def test_drift_sees_an_inherited_constraint_made_local(tmp_path: Path, database: str, pg_server: Server) -> None:
    load_live(tmp_path, database, "CREATE TABLE parent (id int CONSTRAINT positive CHECK (id > 0));\n"
                                  "CREATE TABLE child (b int, CONSTRAINT positive CHECK (id > 0)) INHERITS (parent);")
    config = write_project(tmp_path, database, pg_server, "CREATE TABLE parent (id int CONSTRAINT positive CHECK (id > 0));\n"
                                                          "CREATE TABLE child (b int) INHERITS (parent);")
    assert _drift(config) == [ObjectDifference("constraint", "public.child.positive", "different")]


def test_a_table_gaining_a_parent_is_refused(tmp_path: Path, database: str, pg_server: Server) -> None:
    load_live(tmp_path, database, "CREATE TABLE parent (id int); CREATE TABLE child (id int, b int);")
    config = write_project(tmp_path, database, pg_server,
                           "CREATE TABLE parent (id int); CREATE TABLE child (b int) INHERITS (parent);")
    with pytest.raises(ReconcilerError, match=r"table public\.child: its parents change from \(none\) to "
                                              r"\(public\.parent\)"):
        plan_change(config)
