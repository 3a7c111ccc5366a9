"""Supplements for functions, triggers, enums and quoting: each case plans live -> desired with the
supplemented engine, applies the steps in order and checks nothing is left to do."""

from __future__ import annotations

import secrets

import pytest
from psycopg import sql

from reconciler import inspect
from reconciler.diff.base import Change
from reconciler.diff.engine import SupplementedEngine
from reconciler.diff.supplements.enums import renamed_labels
from reconciler.errors import ReconcilerError
from reconciler.servers import Server, connect
from tests.conftest import fetch_one, run_sql


def converge(live: str, desired: str, old: str, new: str) -> list[Change]:
    """Plan ``old`` -> ``new``, apply the plan to ``live`` and check it now equals ``desired``."""
    if old.strip():
        run_sql(live, old)
    run_sql(desired, new)
    engine = SupplementedEngine()
    changes = engine.diff(live, desired, exclude_schemas=())
    with connect(live) as conn:
        for c in changes:
            conn.execute(c.sql.encode())
    assert engine.diff(live, desired, exclude_schemas=()) == []
    with connect(live) as a, connect(desired) as b:
        assert inspect.compare(inspect.snapshot(b, exclude_schemas=()), inspect.snapshot(a, exclude_schemas=())) == []
    return changes


def kinds(changes: list[Change]) -> list[str]:
    return [c.kind for c in changes]


def test_functions_come_before_what_uses_them(database: str, second_database: str) -> None:
    changes = converge(database, second_database, "CREATE TABLE a (id int);", """
        CREATE FUNCTION pos(x int) RETURNS boolean LANGUAGE sql IMMUTABLE RETURN x > 0;
        CREATE FUNCTION dflt() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 7; END $$;
        CREATE FUNCTION twice(x int) RETURNS int LANGUAGE sql IMMUTABLE RETURN x * 2;
        CREATE FUNCTION pos_twice(x int) RETURNS boolean LANGUAGE sql IMMUTABLE RETURN pos(twice(x));
        CREATE TABLE a (id int DEFAULT dflt() CHECK (pos_twice(id)));
        CREATE INDEX a_pos ON a (pos(id));
        CREATE TABLE b (id int DEFAULT dflt());
        CREATE FUNCTION cnt() RETURNS bigint LANGUAGE sql RETURN (SELECT count(*) FROM b);
        CREATE VIEW bv AS SELECT cnt();
    """)
    order = [c.object for c in changes]
    assert order.index("public.twice(integer)") < order.index("public.pos_twice(integer)")
    assert order.index("public.b") < order.index("public.cnt()")  # a body that reads a table comes after it


def test_sql_standard_bodies_and_overloads_are_compared(database: str, second_database: str) -> None:
    changes = converge(database, second_database, """
        CREATE FUNCTION add(a integer, b integer) RETURNS integer LANGUAGE sql RETURN a + b;
        CREATE FUNCTION add(a text, b text) RETURNS text LANGUAGE sql RETURN a || b;
    """, """
        CREATE FUNCTION add(a integer, b integer) RETURNS integer LANGUAGE sql RETURN a + a + b;
        CREATE FUNCTION add(a text, b text) RETURNS text LANGUAGE sql RETURN a || a || b;
    """)
    assert kinds(changes).count("create_function") == 2


def test_a_function_no_longer_used_is_dropped_after_its_user_changes(database: str, second_database: str) -> None:
    changes = converge(database, second_database, """
        CREATE FUNCTION inc(i integer) RETURNS integer LANGUAGE sql RETURN i + 1;
        CREATE FUNCTION user_of(a integer) RETURNS integer LANGUAGE sql RETURN inc(a) * 2;
        CREATE SCHEMA gone;
        CREATE FUNCTION gone.f(i integer) RETURNS integer LANGUAGE sql RETURN i;
        CREATE FUNCTION gone.g(i integer) RETURNS integer LANGUAGE sql RETURN gone.f(i);
    """, "CREATE FUNCTION user_of(a integer) RETURNS integer LANGUAGE sql RETURN a * 2;")
    order = [c.object for c in changes]
    assert order.index("public.user_of(integer)") < order.index("public.inc(integer)")
    assert order.index("gone.g(integer)") < order.index("gone.f(integer)")


def test_return_type_change_drops_and_recreates_with_dependent_views(database: str, second_database: str) -> None:
    old = """
        CREATE TABLE t (id int, v int);
        CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql RETURN x + 1;
        CREATE VIEW v1 AS SELECT id, f(v) AS fv FROM t;
        CREATE VIEW v2 AS SELECT * FROM v1;
        CREATE FUNCTION g(x int) RETURNS int LANGUAGE sql RETURN f(x) * 2;
        CREATE FUNCTION p(a int, b int DEFAULT 1) RETURNS int LANGUAGE sql RETURN a + b;
    """
    changes = converge(database, second_database, old, old.replace("RETURNS int LANGUAGE sql RETURN x + 1",
                                                                   "RETURNS bigint LANGUAGE sql RETURN x + 1")
                       .replace("b int DEFAULT 1", "b int"))
    order = [(c.kind, c.object) for c in changes]
    assert order.index(("drop_function", "public.f(integer)")) < order.index(("create_function", "public.f(integer)"))
    assert order.index(("drop_view", "public.v1")) < order.index(("drop_function", "public.f(integer)"))
    assert ("drop_function", "public.g(integer)") in order  # g uses f: it goes and comes back with it
    assert ("drop_function", "public.p(integer, integer)") in order  # a default removed


def test_return_type_change_refused_when_a_column_default_uses_it(database: str, second_database: str) -> None:
    old = "CREATE FUNCTION f() RETURNS int LANGUAGE sql RETURN 1; CREATE TABLE t (id int DEFAULT f());"
    run_sql(database, old)
    run_sql(second_database, old.replace("RETURNS int", "RETURNS bigint").replace("id int", "id bigint"))
    with pytest.raises(ReconcilerError, match=r"function public\.f\(\) must be dropped and recreated .*result changes"):
        SupplementedEngine().diff(database, second_database, exclude_schemas=())


def test_triggers_cloned_onto_partitions_come_with_their_parent(database: str, second_database: str) -> None:
    tables = """CREATE TABLE "some foo" (id int, content text, version int) PARTITION BY LIST (content);
                CREATE TABLE "foobar 1" PARTITION OF "some foo" FOR VALUES IN ('a');"""
    triggers = """CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
                  CREATE TRIGGER "some trigger" BEFORE UPDATE ON "some foo" FOR EACH ROW EXECUTE FUNCTION bump();"""
    changes = converge(database, second_database, tables, tables + triggers)
    assert kinds(changes).count("create_trigger") == 1


def test_dropping_triggers_cloned_onto_partitions(database: str, second_database: str) -> None:
    tables = """CREATE TABLE "some foo" (id int, content text, version int) PARTITION BY LIST (content);
                CREATE TABLE "foobar 1" PARTITION OF "some foo" FOR VALUES IN ('a');"""
    triggers = """CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
                  CREATE TRIGGER "some trigger" BEFORE UPDATE ON "some foo" FOR EACH ROW EXECUTE FUNCTION bump();"""
    changes = converge(database, second_database, tables + triggers, tables)
    assert kinds(changes).count("drop_trigger") == 1


def test_renamed_labels() -> None:
    assert renamed_labels(("red", "green", "blue"), ("red", "emerald", "blue")) == [("green", "emerald")]
    assert renamed_labels(("a", "b"), ("b", "a")) is None  # a reorder, not a rename
    assert renamed_labels(("a", "b"), ("a", "b", "c")) is None
    assert renamed_labels(("a", "b"), ("a", "b")) is None


def test_enum_label_renamed_in_place_keeps_the_data(database: str, second_database: str) -> None:
    old = "CREATE TYPE color AS ENUM ('red', 'green', 'blue'); CREATE TABLE t (c color DEFAULT 'green', cs color[]);"
    run_sql(database, "SELECT 1")
    changes = converge(database, second_database, old + " INSERT INTO t VALUES ('green', '{green,red}');",
                       old.replace("green", "emerald"))
    assert [c.sql for c in changes if c.kind == "rename_enum_value"] == [
        """ALTER TYPE "public"."color" RENAME VALUE 'green' TO 'emerald'"""]
    assert "rename_type" not in kinds(changes)
    assert fetch_one(database, "SELECT c::text || ' ' || cs::text FROM t") == "emerald {emerald,red}"


def test_enum_recreated_with_array_columns_defaults_and_functions(database: str, second_database: str) -> None:
    old = """CREATE TYPE color AS ENUM ('red', 'green', 'blue');
             CREATE TABLE t (id int, c color DEFAULT 'green', cs color[] DEFAULT '{red}');
             CREATE FUNCTION is_red(c color) RETURNS boolean LANGUAGE sql RETURN c = 'red';
             INSERT INTO t VALUES (1, 'blue', '{red,blue}');"""
    new = """CREATE TYPE color AS ENUM ('blue', 'red');
             CREATE TABLE t (id int, c color DEFAULT 'red', cs color[] DEFAULT '{red}');
             CREATE FUNCTION is_red(c color) RETURNS boolean LANGUAGE sql RETURN c = 'red';"""
    changes = converge(database, second_database, old, new)
    order = [(c.kind, c.object) for c in changes]
    assert order.index(("drop_function", "public.is_red(public.color)")) < order.index(("rename_type", "public.color"))
    assert fetch_one(database, "SELECT c::text || ' ' || cs::text FROM t") == "blue {red,blue}"


def test_column_from_enum_to_text_with_a_default(database: str, second_database: str) -> None:
    converge(database, second_database,
             "CREATE TYPE color AS ENUM ('red', 'green'); CREATE TABLE foo (color color DEFAULT 'green');",
             "CREATE TABLE foo (color varchar(255) DEFAULT 'green');")


@pytest.mark.parametrize("labels", [("O'Brien", "it's", "plain"), ("x'); DROP TABLE foo; --",), ("a\"b", "c\\d")])
def test_enum_labels_are_quoted(database: str, second_database: str, labels: tuple[str, ...]) -> None:
    literal = ", ".join(sql.Literal(label).as_string(None) for label in labels)
    converge(database, second_database, "CREATE TABLE foo ();",
             f"CREATE TYPE quote_enum AS ENUM ({literal}); CREATE TABLE foo (val quote_enum);")
    assert fetch_one(database, "SELECT array_agg(enumlabel ORDER BY enumsortorder)::text[] FROM pg_enum") == list(labels)


def test_policy_roles_are_quoted(database: str, second_database: str, pg_server: Server) -> None:
    role = f'evil"role; DROP TABLE foobar; -- {secrets.token_hex(3)}'
    with connect(pg_server.dsn) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        policy = sql.SQL("CREATE POLICY p ON foobar TO {} USING (true)").format(sql.Identifier(role)).as_string(None)
        changes = converge(database, second_database, "CREATE TABLE foobar ();", f"CREATE TABLE foobar (); {policy};")
        assert [c.engine for c in changes if c.kind == "create_policy"] == ["supplements"]
    finally:
        for dsn in (database, second_database):
            run_sql(dsn, "DROP TABLE IF EXISTS foobar")
        with connect(pg_server.dsn) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
