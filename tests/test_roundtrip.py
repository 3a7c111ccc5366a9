"""Definitions PostgreSQL prints differently once it re-creates them (reconciler.roundtrip): a plan built from
the desired database's text must verify, leave no drift, and not be planned again; a real change still is."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler import inspect, roundtrip
from reconciler.servers import Server, connect
from tests.conftest import run_sql
from tests.converge import apply_and_verify, converge, plan_change, write_project

# CHECK (... IN ...) on varchar prints with the array cast outside; read back, the casts move inside
CHECKED = """
CREATE TABLE kinds (id int PRIMARY KEY, kind varchar(20) NOT NULL CONSTRAINT kind_known CHECK (kind IN ('area', 'artist')));
"""
# a NULL in a later UNION branch prints as NULL::integer, and read back gains a column alias
VIEWED = """
CREATE TABLE known (id int, year int);
CREATE TABLE unknown (id int);
CREATE VIEW events AS SELECT id, year FROM (SELECT id, year FROM known UNION ALL SELECT id, NULL FROM unknown) AS q;
"""


def _definitions(database: str, sql_text: str) -> tuple[inspect.SchemaSnapshot, inspect.SchemaSnapshot]:
    """The snapshot of ``sql_text`` loaded as written, and of the same objects re-created from their own
    printed text (what a plan builds)."""
    run_sql(database, sql_text)
    with connect(database) as conn:
        before = inspect.snapshot(conn)
        for (kind, name), definition in before.objects.items():
            if kind == "view":
                conn.execute(f"CREATE OR REPLACE VIEW {name} AS {roundtrip.split_view(definition)[0]}".encode())
            elif kind == "constraint" and definition.startswith("CHECK"):
                table, constraint = name.rsplit(".", 1)
                conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT {constraint}".encode())
                conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT {constraint} {definition}".encode())
        return before, inspect.snapshot(conn)


@pytest.mark.parametrize(("sql_text", "kind", "name"), [(CHECKED, "constraint", "public.kinds.kind_known"),
                                                        (VIEWED, "view", "public.events")])
def test_reprinted_definitions_are_the_same_after_a_round_trip(database: str, second_database: str, sql_text: str,
                                                               kind: str, name: str) -> None:
    written, reprinted = _definitions(database, sql_text)
    differences = inspect.compare(written, reprinted)
    assert [(d.kind, d.name) for d in differences] == [(kind, name)]  # PostgreSQL's deparse is no fixed point
    run_sql(second_database, sql_text)
    with connect(second_database) as conn:  # as the shadow: the desired schema loaded from the SQL as written
        settled = roundtrip.settle(conn, written, reprinted, differences)
    assert settled.remaining == () and dict(settled.equivalent) == {(kind, name): reprinted.objects[(kind, name)]}


def test_a_real_change_of_definition_is_not_settled(database: str, second_database: str) -> None:
    run_sql(database, CHECKED.replace("'artist'", "'label'") + VIEWED.replace("NULL", "0"))
    run_sql(second_database, CHECKED + VIEWED)
    with connect(database) as live_conn, connect(second_database) as desired_conn:
        live, desired = inspect.snapshot(live_conn), inspect.snapshot(desired_conn)
        differences = inspect.compare(desired, live)
        settled = roundtrip.settle(desired_conn, desired, live, differences)
    assert {(d.kind, d.name) for d in settled.remaining} >= {("constraint", "public.kinds.kind_known"),
                                                             ("view", "public.events")}
    assert settled.equivalent == {}


def test_a_trial_that_does_not_run_is_not_the_same(database: str) -> None:
    run_sql(database, CHECKED)
    with connect(database) as conn:
        trip = roundtrip.RoundTrip(conn)
        assert trip.view("SELECT no_such_column FROM kinds;") is None
        assert not trip.same_check(("public", "kinds"), "CHECK ((missing > 0))", "CHECK ((missing >= 1))")
        assert trip.check(("public", "kinds"), "CHECK ((id > 0)) NOT VALID") == "CHECK ((id > 0)) NOT VALID"
        assert not trip.same_check(("public", "kinds"), "CHECK ((id > 0)) NOT VALID", "CHECK ((id > 0))")
        # nothing stays behind: every trial is rolled back
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'reconciler_round_trip'").fetchone() == (0,)


def test_plan_from_empty_verifies_and_is_not_planned_again(tmp_path: Path, database: str, pg_server: Server) -> None:
    plan = converge(tmp_path, database, pg_server, "", CHECKED + VIEWED, replan=True)
    # created from the files' own text (reconciler.sourcetext), the target reads back as the desired database does:
    # nothing is merely equivalent
    assert not plan.body.desired.equivalents


def test_a_target_built_from_the_printed_text_is_equivalent(tmp_path: Path, database: str, pg_server: Server) -> None:
    """A target whose view and CHECK were created from PostgreSQL's printed text (by an earlier version of this
    tool, or by hand) reads back otherwise than the desired database: no plan re-creates them, and drift and
    apply's verification count them as the desired definitions."""
    before, after = _definitions(database, CHECKED + VIEWED)
    assert before.objects != after.objects  # the target differs as text
    config = write_project(tmp_path, database, pg_server, CHECKED + VIEWED + "ALTER TABLE kinds ADD COLUMN note text;\n")
    plan = plan_change(config)
    assert [s.kind for s in plan.body.steps] == ["add_column"]
    assert {key.split(" ", 1)[0] for key in plan.body.desired.equivalents} == {"constraint", "view"}
    apply_and_verify(config, plan, database)  # verification counts live's re-printed definitions as desired


def test_a_later_change_leaves_the_reprinted_objects_alone(tmp_path: Path, database: str, pg_server: Server) -> None:
    converge(tmp_path, database, pg_server, "", CHECKED + VIEWED)
    config = write_project(tmp_path, database, pg_server, CHECKED + VIEWED + "ALTER TABLE kinds ADD COLUMN note text;\n")
    plan = plan_change(config)
    assert [s.kind for s in plan.body.steps] == ["add_column"]
    apply_and_verify(config, plan, database)  # verification counts live's re-printed definitions as desired


def test_a_real_change_is_still_planned(tmp_path: Path, database: str, pg_server: Server) -> None:
    converge(tmp_path, database, pg_server, "", CHECKED + VIEWED)
    changed = CHECKED.replace("'artist'", "'label'") + VIEWED.replace("NULL", "0")
    config = write_project(tmp_path, database, pg_server, changed)
    plan = plan_change(config)
    kinds = {s.kind for s in plan.body.steps}
    assert {"replace_view", "add_check_constraint"} <= kinds
    apply_and_verify(config, plan, database)
