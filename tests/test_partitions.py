"""Partitioned tables: plans that converge, planned, rehearsed and applied on real PostgreSQL.

What a partitioned table declares, PostgreSQL propagates to its partitions; migra sees the copies as
objects of their own. These cases fail without reconciler/diff/supplements/partitions.py and the
partition handling in reconciler/safety/.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from reconciler.errors import ReconcilerError
from reconciler.safety import Step
from reconciler.servers import Server
from tests.conftest import fetch_one
from tests.converge import converge as converge_plan

PARTITIONED = """
CREATE TABLE foobar (id int, foo varchar(255), bar int) PARTITION BY LIST (foo);
CREATE TABLE foobar_1 PARTITION OF foobar FOR VALUES IN ('foo_1');
CREATE TABLE foobar_2 PARTITION OF foobar FOR VALUES IN ('foo_2');
"""


def converge(tmp_path: Path, database: str, server: Server, old: str, new: str) -> tuple[Step, ...]:
    """Load ``old``, plan towards ``new`` (rehearsed), apply, verify; the plan's steps."""
    plan = converge_plan(tmp_path, database, server, old, new)
    assert plan.body.rehearsal.status == "converged"
    return plan.body.steps


def sqls(steps: tuple[Step, ...]) -> list[str]:
    return [" ".join(s.sql.split()) for s in steps]


def position(steps: tuple[Step, ...], fragment: str) -> int:
    return next(i for i, text in enumerate(sqls(steps)) if fragment in text)


def test_primary_key_on_a_partitioned_table_is_built_on_each_partition_then_attached(
        tmp_path: Path, database: str, pg_server: Server) -> None:
    steps = converge(tmp_path, database, pg_server, PARTITIONED,
                     PARTITIONED.replace("bar int)", "bar int, PRIMARY KEY (foo, id))"))
    texts = sqls(steps)
    assert any("CREATE UNIQUE INDEX CONCURRENTLY foobar_1_pkey ON public.foobar_1" in t for t in texts)
    assert not any("ON ONLY" in t for t in texts), "ADD CONSTRAINT ... USING INDEX fails on a partitioned table"
    parent = position(steps, 'ALTER TABLE "public"."foobar" ADD CONSTRAINT "foobar_pkey" PRIMARY KEY (foo, id)')
    assert parent > position(steps, '"public"."foobar_2" add constraint "foobar_2_pkey"')
    assert fetch_one(database, "SELECT conislocal FROM pg_constraint WHERE conname = 'foobar_1_pkey'") is False


def test_partitions_in_schemas_that_sort_before_their_parent_s_are_created_after_it(
        tmp_path: Path, database: str, pg_server: Server) -> None:
    """migra orders CREATE TABLE by schema: "a" and "archive" come before "public"."""
    schema = textwrap.dedent("""\
        CREATE SCHEMA a;
        CREATE SCHEMA archive;
        CREATE TABLE events (id bigint, at date, kind text, PRIMARY KEY (id, at, kind)) PARTITION BY RANGE (at);
        CREATE INDEX events_kind ON events (kind);
        CREATE TABLE archive.events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        CREATE TABLE a.events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        """)
    steps = converge(tmp_path, database, pg_server, "", schema)
    parent = position(steps, 'create table "public"."events"')
    assert parent < position(steps, '"archive"."events_2024" partition of')
    assert parent < position(steps, '"a"."events_2025" partition of')
    assert fetch_one(database, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'public.events_kind'::regclass") == 2
    assert fetch_one(database, "SELECT count(*) FROM pg_constraint WHERE conparentid <> 0 AND contype = 'p'") == 2


def test_dropping_a_partitioned_primary_key_leaves_the_partitions_alone(
        tmp_path: Path, database: str, pg_server: Server) -> None:
    steps = converge(tmp_path, database, pg_server,
                     PARTITIONED.replace("bar int)", "bar int, PRIMARY KEY (foo, id))"), PARTITIONED)
    assert not any(s.kind == "drop_constraint" and "foobar_1" in s.object for s in steps)
    assert fetch_one(database, "SELECT count(*) FROM pg_constraint WHERE contype = 'p' "
                                "AND connamespace = 'public'::regnamespace") == 0


def test_a_partitioned_index_rebuilt_attaches_the_partitions_indexes_after_they_are_built(
        tmp_path: Path, database: str, pg_server: Server) -> None:
    old = PARTITIONED + "CREATE INDEX some_idx ON foobar (foo);\n"
    steps = converge(tmp_path, database, pg_server, old, old.replace("ON foobar (foo)", "ON foobar USING hash (foo)"))
    attach = position(steps, 'ATTACH PARTITION "public"."foobar_1_foo_idx"')
    built = position(steps, "CREATE INDEX CONCURRENTLY foobar_1_foo_idx")
    assert attach > built
    assert steps[attach].kind == "attach_index_partition" and steps[attach].phase > steps[built].phase
    assert fetch_one(database, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'some_idx'::regclass") is True
    assert fetch_one(database, "SELECT amname FROM pg_class JOIN pg_am ON pg_am.oid = relam "
                               "WHERE relname = 'foobar_2_foo_idx'") == "hash"


def test_an_unattached_partition_index_is_attached(tmp_path: Path, database: str, pg_server: Server) -> None:
    old = PARTITIONED + textwrap.dedent("""\
        CREATE INDEX parted_idx ON ONLY foobar (foo);
        CREATE INDEX foobar_1_part ON foobar_1 (foo);
        ALTER INDEX parted_idx ATTACH PARTITION foobar_1_part;
        CREATE INDEX foobar_2_part ON foobar_2 (foo);
        """)
    steps = converge(tmp_path, database, pg_server, old, old + "ALTER INDEX parted_idx ATTACH PARTITION foobar_2_part;\n")
    assert sqls(steps) == ['ALTER INDEX "public"."parted_idx" ATTACH PARTITION "public"."foobar_2_part"']


def test_a_partitioned_index_switched_to_a_partition_local_index_is_built_again(
        tmp_path: Path, database: str, pg_server: Server) -> None:
    old = PARTITIONED + "CREATE INDEX foobar_some_idx ON foobar (foo, id);\n"
    new = PARTITIONED + "CREATE INDEX foobar_1_foo_id_idx ON foobar_1 (foo, id);\n"
    steps = converge(tmp_path, database, pg_server, old, new)
    assert position(steps, "CREATE INDEX CONCURRENTLY foobar_1_foo_id_idx") > position(steps, '"public"."foobar_some_idx"')


def test_foreign_keys_to_a_partitioned_table_are_added_and_dropped_once(
        tmp_path: Path, database: str, pg_server: Server) -> None:
    base = PARTITIONED.replace("bar int)", "bar int, PRIMARY KEY (foo, id))") + \
        "CREATE TABLE refs (fk_foo varchar(255), fk_id int);\n"
    with_fk = base + "ALTER TABLE refs ADD CONSTRAINT refs_fk FOREIGN KEY (fk_foo, fk_id) REFERENCES foobar (foo, id);\n"
    added = converge(tmp_path / "add", database, pg_server, base, with_fk)
    assert [s.object for s in added if s.kind == "add_foreign_key"] == ["public.refs.refs_fk"]
    assert fetch_one(database, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'refs'::regclass") == 3
    dropped = converge(tmp_path / "drop", database, pg_server, "", base)
    assert [s.object for s in dropped if s.kind == "drop_constraint"] == ["public.refs.refs_fk"]
    assert fetch_one(database, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'refs'::regclass") == 0


def test_a_partitioned_table_is_dropped_with_its_partitions_triggers_and_indexes(
        tmp_path: Path, database: str, pg_server: Server) -> None:
    old = PARTITIONED + textwrap.dedent("""\
        ALTER TABLE foobar ADD CHECK (bar > 0);
        CREATE INDEX foobar_bar_idx ON foobar (bar);
        CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        CREATE TRIGGER touch BEFORE UPDATE ON foobar FOR EACH ROW EXECUTE FUNCTION touch();
        """)
    steps = converge(tmp_path, database, pg_server, old, "CREATE TABLE other (id int);\n")
    assert [s.object for s in steps if s.kind == "drop_table"] == ["public.foobar"]
    assert fetch_one(database, "SELECT count(*) FROM pg_class WHERE relname LIKE 'foobar%'") == 0


def test_a_partition_s_own_primary_key_dropped_frees_its_columns(
        tmp_path: Path, database: str, pg_server: Server) -> None:
    steps = converge(tmp_path, database, pg_server, PARTITIONED + "ALTER TABLE foobar_2 ADD PRIMARY KEY (foo, bar);\n",
                     PARTITIONED)
    assert {s.object for s in steps if s.kind == "drop_not_null"} == {"public.foobar_2.foo", "public.foobar_2.bar"}
    assert fetch_one(database, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'foobar_2'::regclass "
                               "AND attname = 'bar'") is False


def test_a_table_made_partitioned_is_built_again_with_its_rows(tmp_path: Path, database: str,
                                                              pg_server: Server) -> None:
    """A small table (below safety.online_rewrite_rows): built again in one transaction (safety/shadow_table.py;
    tests/test_shadow_table.py has the online form)."""
    steps = converge(tmp_path, database, pg_server, "CREATE TABLE t (id int, k text); INSERT INTO t VALUES (1, 'a'), (2, 'b');",
                     "CREATE TABLE t (id int, k text) PARTITION BY LIST (k);\n"
                     "CREATE TABLE t_a PARTITION OF t FOR VALUES IN ('a');\nCREATE TABLE t_rest PARTITION OF t DEFAULT;\n")
    assert "TABLE_REWRITE" in {h.code for s in steps for h in s.hazards}
    assert fetch_one(database, "SELECT string_agg(tableoid::regclass || ':' || id, ',' ORDER BY id) FROM t") == \
        "t_a:1,t_rest:2"


@pytest.mark.parametrize(("old", "new", "message"), [
    (PARTITIONED, PARTITIONED.replace("LIST (foo)", "LIST (bar)").replace("'foo_1'", "1").replace("'foo_2'", "2"),
     "cannot rebuild table public.foobar, which changes its partition key from LIST (foo) to LIST (bar): its new "
     "partition public.foobar_1 has a name live already uses"),
    (PARTITIONED, PARTITIONED.replace("'foo_2'", "'foo_3'"),
     "partition public.foobar_2 of public.foobar changes its bounds from FOR VALUES IN ('foo_2') to FOR VALUES IN ('foo_3')"),
    # migra itself crashes on this one (schemainspect: no attribute 'partition_spec')
    ("CREATE TABLE p (id int, k text) PARTITION BY LIST (k);\nCREATE TABLE c (id int, k text);\n",
     "CREATE TABLE p (id int, k text) PARTITION BY LIST (k);\nCREATE TABLE c (id int, k text);\n"
     "ALTER TABLE p ATTACH PARTITION c FOR VALUES IN ('a');\n",
     "table public.c becomes a partition of public.p FOR VALUES IN ('a')"),
], ids=["partition_key_same_names", "partition_bounds", "attach"])
def test_what_cannot_change_in_place_is_refused_naming_the_table(
        tmp_path: Path, database: str, pg_server: Server, old: str, new: str, message: str) -> None:
    with pytest.raises(ReconcilerError, match=r"cannot (change partitioning in place|rebuild table)") as refused:
        converge(tmp_path, database, pg_server, old, new)
    assert message in str(refused.value)
