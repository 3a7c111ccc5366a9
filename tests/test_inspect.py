"""reconciler.inspect: catalog snapshots, fingerprints, comparison, identity, table sizes."""

from __future__ import annotations

import hashlib
import secrets

import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from reconciler import dsn as dsnlib
from reconciler.inspect import (
    ObjectDifference,
    Objects,
    SchemaSnapshot,
    compare,
    identity,
    live_facts,
    snapshot,
    table_sizes,
)
from reconciler.servers import Server, connect
from tests.conftest import run_sql

BASE = """
CREATE TABLE t (id int PRIMARY KEY, b int DEFAULT 1);
CREATE VIEW v AS SELECT id FROM t;
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1';
CREATE FUNCTION tf() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE SEQUENCE s;
"""


def snap(dsn: str) -> SchemaSnapshot:
    with connect(dsn) as conn:
        return snapshot(conn)


def test_same_sql_same_fingerprint(database: str, second_database: str) -> None:
    run_sql(database, BASE)
    run_sql(second_database, BASE)
    one, two = snap(database), snap(second_database)
    assert one.fingerprint.startswith("sha256:")
    assert one.fingerprint == two.fingerprint
    assert compare(one, two) == []
    assert ("table", "public.t") in one.objects


@pytest.mark.parametrize(
    ("change", "kind", "name", "difference"),
    [
        ("ALTER TABLE t ADD COLUMN c text", "column", "public.t.c", "missing"),
        ("ALTER TABLE t ALTER COLUMN b SET DEFAULT 5", "column", "public.t.b", "different"),
        ("CREATE INDEX t_b_idx ON t (b)", "index", "public.t_b_idx", "missing"),
        ("CREATE OR REPLACE VIEW v AS SELECT id FROM t WHERE id > 0", "view", "public.v", "different"),
        ("ALTER TYPE mood ADD VALUE 'ecstatic'", "enum", "public.mood", "different"),
        ("CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 2'", "function", "public.f()", "different"),
        (
            "CREATE TRIGGER trg BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION tf()",
            "trigger", "public.t.trg", "missing",
        ),
        ("ALTER TABLE t ADD CONSTRAINT t_b_check CHECK (b > 0)", "constraint", "public.t.t_b_check", "missing"),
        ("COMMENT ON TABLE t IS 'hello'", "comment", "table public.t", "missing"),
        ("ALTER SEQUENCE s INCREMENT BY 5", "sequence", "public.s", "different"),
        ("ALTER TABLE t ENABLE ROW LEVEL SECURITY", "table", "public.t", "different"),
    ],
)
def test_change_is_detected_and_named(
    database: str, second_database: str, change: str, kind: str, name: str, difference: str
) -> None:
    run_sql(database, BASE + change)
    run_sql(second_database, BASE)
    desired, live = snap(database), snap(second_database)
    assert desired.fingerprint != live.fingerprint
    assert compare(desired, live) == [ObjectDifference(kind, name, difference)]
    if difference == "missing":
        assert compare(live, desired) == [ObjectDifference(kind, name, "unexpected")]


def test_column_order_does_not_matter(database: str, second_database: str) -> None:
    run_sql(database, "CREATE TABLE t (a int NOT NULL, b text DEFAULT 'x', c numeric(10, 2))")
    run_sql(second_database, "CREATE TABLE t (c numeric(10, 2), b text DEFAULT 'x', a int NOT NULL)")
    assert snap(database).fingerprint == snap(second_database).fingerprint


def test_metadata_schema_is_excluded(database: str, second_database: str) -> None:
    run_sql(database, "CREATE TABLE t (id int)")
    run_sql(second_database, "CREATE TABLE t (id int)")
    before = snap(second_database)
    run_sql(
        second_database,
        "CREATE SCHEMA reconciler; CREATE TABLE reconciler.runs (id int PRIMARY KEY);"
        "COMMENT ON TABLE reconciler.runs IS 'history'; COMMENT ON SCHEMA reconciler IS 'meta'",
    )
    after = snap(second_database)
    assert after == before
    assert after.fingerprint == snap(database).fingerprint
    assert not [key for key in after.objects if "reconciler" in key[1]]
    with connect(second_database) as conn:
        included = snapshot(conn, exclude_schemas=())
    assert ("schema", "reconciler") in included.objects
    assert ("table", "reconciler.runs") in included.objects


def test_identity(database: str) -> None:
    with connect(database) as conn:
        ident = identity(conn)
    assert ident.system_identifier.isdigit()
    assert int(ident.system_identifier) > 0
    assert ident.database == dsnlib.database_name(database)
    assert ident.server_version_num >= 100000
    assert ident.server_version.split(".")[0] == str(ident.server_version_num // 10000)


def test_table_sizes(database: str) -> None:
    run_sql(
        database,
        'CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, repeat(\'x\', 100) FROM generate_series(1, 500) g;'
        'CREATE SCHEMA "My Schema"; CREATE TABLE "My Schema"."T" (id int);'
        "CREATE SCHEMA reconciler; CREATE TABLE reconciler.runs (id int); ANALYZE",
    )
    with connect(database) as conn:
        sizes = table_sizes(conn)
    assert set(sizes) == {"public.t", '"My Schema"."T"'}
    assert sizes["public.t"].table == "public.t"
    assert sizes["public.t"].bytes > 0
    assert sizes["public.t"].rows == 500


def test_snapshot_as_non_superuser(pg_server: Server, database: str) -> None:
    run_sql(database, BASE + "CREATE SCHEMA private; CREATE TABLE private.secret (id int); REVOKE ALL ON SCHEMA private FROM PUBLIC;")
    role = f"reconciler_reader_{secrets.token_hex(4)}"
    with connect(pg_server.dsn) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with connect(make_conninfo(database, user=role)) as conn:
            assert conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (
                role, False,
            )
            as_role = snapshot(conn)
            ident = identity(conn)
        assert as_role == snap(database)
        assert ident.database == dsnlib.database_name(database)
    finally:
        with connect(pg_server.dsn) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_live_facts_count_never_analysed_tables_and_skip_empty_ones(database: str) -> None:
    run_sql(database, "CREATE TABLE filled (id int); INSERT INTO filled SELECT generate_series(1, 37);"
                      "CREATE TABLE emptied (id int); INSERT INTO emptied VALUES (1); DELETE FROM emptied;"
                      "CREATE TABLE never (id int);"
                      "CREATE TABLE parted (id int) PARTITION BY RANGE (id);"
                      "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);"
                      "INSERT INTO parted SELECT generate_series(1, 9)")
    with connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM pg_class WHERE reltuples >= 0 AND relname IN "
                            "('filled', 'emptied', 'never', 'parted', 'parted_1')").fetchone() == (0,)  # none analysed
        tables = live_facts(conn).tables
    assert tables["public.filled"].rows == 37  # counted
    assert tables["public.emptied"].rows == 0  # a page, no live row: counted
    assert tables["public.never"].rows == 0 and tables["public.never"].bytes == 0  # no page: nothing to count
    assert tables["public.parted"].rows == 9  # a partitioned table holds no page of its own: its rows are counted
    assert tables["public.parted_1"].rows == 9


def test_snapshot_objects_are_held_per_kind_and_behave_as_the_plain_mapping(database: str) -> None:
    run_sql(database, BASE + "CREATE TABLE u (id int PRIMARY KEY, b int DEFAULT 1);")
    taken = snap(database)
    plain = dict(taken.objects.items())
    assert isinstance(taken.objects, Objects)
    assert taken.objects == plain and plain == taken.objects and len(taken.objects) == len(plain)
    assert SchemaSnapshot(objects=plain) == taken  # a snapshot made from a plain dict is the same value
    assert list(taken.objects.sorted_items()) == sorted(plain.items())
    # the fingerprint as it always was: sorted lines of kind, name and definition
    lines = "".join(f"{kind}\t{name}\t{definition}\n" for (kind, name), definition in sorted(plain.items()))
    assert taken.fingerprint == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    assert ("column", "public.u.b") in taken.objects and ("column", "public.nope") not in taken.objects
    assert "table public.t" not in taken.objects  # not a (kind, name) key: simply absent
    assert taken.objects.get(("table", "public.nope")) is None
    assert taken.objects != {**plain, ("table", "public.nope"): ""}
    # each distinct definition held once: the two tables' identical columns share one string
    assert taken.objects[("column", "public.u.b")] is taken.objects[("column", "public.t.b")]


def test_live_facts_share_repeated_strings(database: str) -> None:
    run_sql(database, "CREATE TABLE a (x numeric(10,2) DEFAULT 0, y numeric(10,2) DEFAULT 0);")
    with connect(database) as conn:
        columns = live_facts(conn).columns
    x, y = columns[("public.a", "x")], columns[("public.a", "y")]
    assert (x.type, x.default) == ("numeric(10,2)", "0")
    assert x.type is y.type and x.default is y.default
    assert next(t for t, c in columns if c == "x") is next(t for t, c in columns if c == "y")  # the table's name
