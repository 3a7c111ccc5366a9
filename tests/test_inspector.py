"""Our schemainspect inspector: the same dependency closure as schemainspect's (without its exponential walk),
excluded schemas never fetched, a frozen desired database inspected once per plan, and the same answers from
rows whose strings are shared (and columns pickled as their values)."""

from __future__ import annotations

import logging
import pickle
import threading
import time
import warnings
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from reconciler import dsn as dsnlib
from reconciler.diff.inspector import closure, inspector_class
from reconciler.diff.migra_engine import MigraEngine
from reconciler.servers import connect
from tests.conftest import fetch_one, run_sql


def lattice(n: int) -> str:
    """Views each joining the previous two: the shape that makes schemainspect's walk exponential."""
    views = ["CREATE VIEW v0 AS SELECT id, a FROM base;", "CREATE VIEW v1 AS SELECT id, a FROM base;"]
    views += [f"CREATE VIEW v{i} AS SELECT x.id, y.a FROM v{i - 1} x JOIN v{i - 2} y USING (id);" for i in range(2, n)]
    return "CREATE TABLE base (id int PRIMARY KEY, a int);\n" + "\n".join(views)


def inspect_with(cls: type[Any], dsn: str, **kwargs: Any) -> Any:
    """``cls``'s reading of ``dsn``: ours over psycopg, schemainspect's own over SQLAlchemy (its usual way)."""
    if cls is inspector_class():
        with connect(dsn) as conn:
            return cls(conn, **kwargs)
    engine = create_engine(dsnlib.sqlalchemy_url(dsn), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return cls(connection, **kwargs)
    finally:
        engine.dispose()


def schemainspect_class() -> type[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from schemainspect.pg.obj import PostgreSQL
    return PostgreSQL  # type: ignore[no-any-return]


def test_closure_reaches_everything_once() -> None:
    graph = {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": [], "e": ["a"]}
    assert closure("e", graph.get) == ["a", "b", "c", "d"]
    assert closure("d", graph.get) == []
    assert closure("x", graph.get) == []  # not an object with edges
    assert closure("a", {"a": ["b"], "b": ["a"]}.get) == ["a", "b"]  # a cycle leads back to the start


def test_same_dependencies_as_schemainspect(database: str) -> None:
    run_sql(database, lattice(12) + "\nCREATE FUNCTION f() RETURNS int LANGUAGE sql RETURN 1;"
                                    "\nCREATE VIEW uses_f AS SELECT f() AS one, id FROM v11;")
    ours = inspect_with(inspector_class(), database)
    theirs = inspect_with(schemainspect_class(), database)
    assert set(ours.selectables) == set(theirs.selectables)
    for name, item in theirs.selectables.items():  # theirs lists an object once per path to it
        assert ours.selectables[name].dependents_all == sorted(set(item.dependents_all)), name
        assert ours.selectables[name].dependent_on_all == sorted(set(item.dependent_on_all)), name
    assert len(theirs.selectables['"public"."v0"'].dependents_all) > len(ours.selectables['"public"."v0"'].dependents_all)


def test_excluded_schemas_are_not_read(database: str) -> None:
    run_sql(database, """
        CREATE SCHEMA app; CREATE TABLE app.t (id int PRIMARY KEY); CREATE VIEW app.v AS SELECT id FROM app.t;
        CREATE SCHEMA meta; CREATE TABLE meta.runs (id int PRIMARY KEY); CREATE INDEX ON meta.runs (id);
        CREATE TYPE meta.state AS ENUM ('a'); CREATE FUNCTION meta.f() RETURNS int LANGUAGE sql RETURN 1;
        CREATE SEQUENCE meta.s;
    """)
    ours = inspect_with(inspector_class(), database, exclude_schemas=("meta",))
    theirs = inspect_with(schemainspect_class(), database)
    theirs.exclude_schema("meta")  # schemainspect's own filter, in Python after reading everything
    for prop in ("schemas", "relations", "indexes", "sequences", "constraints", "functions", "enums", "types"):
        assert set(getattr(ours, prop)) == set(getattr(theirs, prop)), prop
    assert '"app"."t"' in ours.relations and not any('"meta"' in k for k in ours.relations)


def test_a_frozen_desired_database_is_inspected_once(database: str, second_database: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    run_sql(database, "CREATE TABLE t (id int);")
    run_sql(second_database, "CREATE TABLE t (id int, note text); CREATE TABLE u (id int);")
    fresh = MigraEngine().diff(database, second_database, exclude_schemas=("reconciler",))
    engine = MigraEngine()
    caplog.set_level(logging.DEBUG, logger="reconciler.diff.migra_engine")
    with engine.frozen(second_database):
        first = engine.diff(database, second_database, exclude_schemas=("reconciler",))
        second = engine.diff(database, second_database, exclude_schemas=("reconciler",))
    after = engine.diff(database, second_database, exclude_schemas=("reconciler",))
    assert first == second == after == fresh and len(fresh) == 2
    desired_name = dsnlib.parse(second_database)["dbname"]
    inspected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("inspected")]
    assert sum(desired_name in m for m in inspected) == 2  # once inside the block, once after it
    assert len(inspected) == 5



def test_an_early_reading_no_diff_asks_for_is_called_off(database: str, second_database: str) -> None:
    """A plan that just built its desired database starts reading it at once; when live proves to be the desired
    schema, no diff asks for that reading, and the plan ends without waiting for it: its query is cancelled."""
    run_sql(second_database, "CREATE TABLE t (id int);")
    engine = MigraEngine()
    left: list[BaseException] = []

    def plan_with_nothing_to_diff() -> None:
        try:
            with engine.frozen(second_database, prefetch=("reconciler",), eager=True):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # the reading has begun, and waits for the lock below
                    if fetch_one(database, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                           "'reconciler inspect' AND state = 'active' AND wait_event_type = 'Lock'"):
                        return
                    time.sleep(0.05)
                raise AssertionError("the early reading never started")
        except BaseException as exc:
            left.append(exc)

    with connect(second_database) as holder, holder.transaction():
        holder.execute("LOCK TABLE pg_catalog.pg_depend IN ACCESS EXCLUSIVE MODE")  # the reading waits for it
        planner = threading.Thread(target=plan_with_nothing_to_diff)
        planner.start()
        planner.join(timeout=60)
        ended_while_locked = not planner.is_alive()
    planner.join(timeout=60)
    assert not left, left
    assert ended_while_locked, "the plan waited for a reading nothing used"
    with engine.frozen(second_database, prefetch=("reconciler",), eager=True):  # used: read, not called off
        assert len(engine.diff(database, second_database, exclude_schemas=("reconciler",))) == 1

SHAPES = """
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE a (id bigint PRIMARY KEY, note text DEFAULT '' NOT NULL, m mood, at timestamptz DEFAULT now());
CREATE TABLE b (id bigint PRIMARY KEY, a_id bigint REFERENCES a (id), note text DEFAULT '' NOT NULL,
                amount numeric(10,2) CHECK (amount >= 0));
CREATE INDEX b_a_id_idx ON b (a_id) INCLUDE (note) WHERE amount > 0;
CREATE VIEW v AS SELECT b.id, a.note FROM b JOIN a ON a.id = b.a_id;
CREATE FUNCTION f(x int, OUT y int) LANGUAGE sql AS 'select x';
CREATE SEQUENCE s;
"""


def migra_sql(source: Any, target: Any) -> str:
    from migra import Migration

    migration = Migration(source, target)
    migration.set_safety(False)
    migration.add_all_changes()
    return str(migration.sql)


def test_migra_says_the_same_from_our_rows_as_from_schemainspects(database: str, second_database: str) -> None:
    run_sql(second_database, SHAPES)
    ours = [inspect_with(inspector_class(), dsn) for dsn in (database, second_database)]
    theirs = [inspect_with(schemainspect_class(), dsn) for dsn in (database, second_database)]
    assert migra_sql(*ours) == migra_sql(*theirs) and "create table" in migra_sql(*ours)
    assert migra_sql(*reversed(ours)) == migra_sql(*reversed(theirs)) and "drop table" in migra_sql(*reversed(ours))


VARIED = SHAPES + """
CREATE SCHEMA app;
CREATE TYPE app.pair AS (left_part text, right_part int);
CREATE DOMAIN app.positive AS int CHECK (VALUE > 0);
CREATE TABLE app.items (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, qty app.positive, p app.pair,
                        tags text[] DEFAULT '{}', label text COLLATE "C", total int GENERATED ALWAYS AS (qty * 2) STORED,
                        UNIQUE (label) DEFERRABLE INITIALLY DEFERRED);
CREATE TABLE app.parted (id int, at date NOT NULL) PARTITION BY RANGE (at);
CREATE TABLE app.parted_2026 PARTITION OF app.parted FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER items_touch BEFORE UPDATE ON app.items FOR EACH ROW EXECUTE FUNCTION app.touch();
ALTER TABLE app.items ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON app.items USING (qty > 1);
CREATE MATERIALIZED VIEW app.mv AS SELECT id, qty FROM app.items;
CREATE INDEX mv_qty ON app.mv (qty);
GRANT SELECT ON app.items TO PUBLIC;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
COMMENT ON TABLE app.items IS 'items: with a comment';
"""


def _state(value: Any) -> Any:
    """Everything an inspected object holds, as plain values with their types (schemainspect's column types
    from SQLAlchemy, ``pytype``, aside: migra never reads them)."""
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return {k: _state(v) for k, v in vars(value).items() if k != "pytype"}
    if isinstance(value, dict):
        return {k: _state(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_state(v) for v in value]
    return type(value).__name__, value


def test_our_reading_over_psycopg_holds_what_schemainspect_reads_over_sqlalchemy(database: str) -> None:
    run_sql(database, VARIED)
    ours, theirs = inspect_with(inspector_class(), database), inspect_with(schemainspect_class(), database)
    compared = 0
    for name, value in vars(theirs).items():
        if name in ("c", "engine", "dialect", "is_raw_psyco_connection", "deps") or name.endswith("_QUERY"):
            continue  # the connection, the queries (ours filter schemas in SQL), the raw dependency rows
        assert _state(getattr(ours, name)) == _state(value), name
        compared += len(value) if isinstance(value, dict) else 1
    assert ours.c is None and theirs.tables['"app"."items"'].columns["qty"].pytype is not None
    assert {"rlspolicies", "triggers", "domains", "types", "extensions", "privileges"} <= set(vars(ours))
    assert compared >= 40


def test_strings_read_once_and_columns_pickled_as_values(database: str, second_database: str) -> None:
    run_sql(second_database, SHAPES)
    empty, ours = (inspect_with(inspector_class(), dsn) for dsn in (database, second_database))
    a, b = ours.tables['"public"."a"'], ours.tables['"public"."b"']
    assert a.columns["note"].default is b.columns["note"].default and a.schema is b.schema  # one string each
    assert ours.deps == []  # schemainspect's raw dependency rows: read once, never used by migra
    saved = pickle.dumps({k: v for k, v in vars(ours).items() if k not in ("c", "engine", "dialect")})
    assert b"_column" in saved  # columns as their values, not as a dict each
    back = object.__new__(inspector_class())
    back.__dict__.update(pickle.loads(saved))
    assert back.tables == ours.tables and back.views == ours.views
    assert vars(back.tables['"public"."a"'].columns["m"]) == vars(a.columns["m"])
    assert migra_sql(empty, back) == migra_sql(empty, ours)
