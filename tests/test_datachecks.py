"""Plan-time data checks on a real database: the counts each step gets, whether checks of one table share a
scan or, when that combined query fails, run one by one; steps on tables the plan creates are not checked."""

from __future__ import annotations

import logging

import pytest

from reconciler import inspect
from reconciler.datachecks import add_data_hazards
from reconciler.safety import Hazard, Step
from reconciler.servers import connect
from tests.conftest import run_sql

LIVE = """
CREATE TABLE people (id int PRIMARY KEY, name text, email text, nick text, age int, code text, boss int);
INSERT INTO people SELECT g, CASE WHEN g <= 3 THEN NULL ELSE 'n' || g END, 'e' || g,
       CASE WHEN g % 10 = 0 THEN 'same' ELSE 'k' || g END, CASE WHEN g <= 2 THEN -g ELSE g END,
       CASE WHEN g <= 5 THEN 'x' || g ELSE g::text END, CASE WHEN g <= 4 THEN 1000 + g ELSE 1 END
FROM generate_series(1, 100) g;
CREATE TABLE pets (id int PRIMARY KEY, owner int, name text);
INSERT INTO pets SELECT g, g, NULL FROM generate_series(1, 7) g;
ANALYZE people; ANALYZE pets;
"""


def _step(index: int, kind: str, statement: str, *tables: str) -> Step:
    return Step(index=index, sql=statement, kind=kind, object="", transactional=True, hazards=(), rollback_sql=None,
                tables=tables)


def _counts(steps: tuple[Step, ...]) -> dict[int, list[str]]:
    return {s.index: [h.message for h in s.hazards if h.code == "CORRECTNESS"] for s in steps}


STEPS = (
    _step(1, "set_not_null", "ALTER TABLE public.people ALTER COLUMN name SET NOT NULL", "public.people"),
    _step(2, "set_not_null", "ALTER TABLE public.people ALTER COLUMN email SET NOT NULL", "public.people"),
    _step(3, "add_check_constraint",
          "ALTER TABLE public.people ADD CONSTRAINT people_age_check CHECK (age >= 0) NOT VALID", "public.people"),
    _step(4, "alter_column_type", "ALTER TABLE public.people ALTER COLUMN code TYPE int USING code::int", "public.people"),
    _step(5, "create_index_concurrently", "CREATE UNIQUE INDEX CONCURRENTLY people_nick_key ON public.people (nick)",
          "public.people"),
    _step(6, "add_foreign_key", "ALTER TABLE public.people ADD CONSTRAINT people_boss_fkey FOREIGN KEY (boss) "
                                "REFERENCES public.people (id) NOT VALID", "public.people"),
    _step(7, "set_not_null", "ALTER TABLE public.pets ALTER COLUMN name SET NOT NULL", "public.pets"),
    _step(8, "create_table", "CREATE TABLE public.toys (id int, name text)", "public.toys"),
    _step(9, "set_not_null", "ALTER TABLE public.toys ALTER COLUMN name SET NOT NULL", "public.toys"),
)


def _expected(version: int) -> dict[int, list[str]]:
    return {
        1: ["3 rows with NULL in name: SET NOT NULL will fail (public.people)"],
        2: [],
        3: ["2 rows violating CHECK people_age_check: validating it will fail (public.people)"],
        4: ["5 values of code that do not convert to integer: the type change will fail (public.people)"
            if version >= 160000 else "existing values must convert to the new type (not checked before PostgreSQL 16)"],
        5: ["1 duplicate key values: the unique index build will fail (public.people)"],
        6: ["4 rows whose boss match no row of public.people: validating the foreign key will fail (public.people)"],
        7: ["7 rows with NULL in name: SET NOT NULL will fail (public.pets)"],
        8: [],
        9: [],
    }


def test_counts_for_each_step_with_checks_of_one_table_combined(database: str) -> None:
    run_sql(database, LIVE)
    with connect(database) as conn:
        facts = inspect.live_facts(conn)
        checked = add_data_hazards(conn, STEPS, facts)
        version = int(conn.info.server_version)
    assert _counts(checked) == _expected(version)
    (found,) = checked[0].hazards
    assert found == Hazard("CORRECTNESS", "3 rows with NULL in name: SET NOT NULL will fail (public.people)",
                           "public.people", 100, facts.tables["public.people"].bytes)
    assert [s.sql for s in checked] == [s.sql for s in STEPS]


def test_a_combined_query_that_fails_falls_back_to_one_check_at_a_time(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A CHECK naming a column the plan adds cannot be counted: the other checks of its table still are."""
    run_sql(database, LIVE)
    broken = _step(10, "add_check_constraint",
                   "ALTER TABLE public.people ADD CONSTRAINT people_later_check CHECK (later > 0) NOT VALID",
                   "public.people")
    with connect(database) as conn, caplog.at_level(logging.INFO, logger="reconciler.datachecks"):
        checked = add_data_hazards(conn, (*STEPS, broken), inspect.live_facts(conn))
        version = int(conn.info.server_version)
    assert _counts(checked) == {**_expected(version), 10: []}
    assert "the combined data checks of public.people could not run" in caplog.text
    assert "data check for step 10 (add_check_constraint) could not run" in caplog.text


def test_a_check_that_runs_out_of_time_says_so(database: str) -> None:
    run_sql(database, LIVE)
    slow = _step(11, "add_check_constraint",
                 "ALTER TABLE public.pets ADD CONSTRAINT pets_slow_check CHECK (pg_sleep(0.2) IS NULL) NOT VALID",
                 "public.pets")
    with connect(database) as conn:
        checked = add_data_hazards(conn, (STEPS[6], slow), inspect.live_facts(conn), timeout="100ms")
    assert _counts(checked) == {
        7: ["7 rows with NULL in name: SET NOT NULL will fail (public.pets)"],
        11: ["could not check within 100ms whether existing rows of public.pets allow this step"],
    }
