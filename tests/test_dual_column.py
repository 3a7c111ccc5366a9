"""Online column rewrites: a type change that would rewrite a big table (`int` to `bigint`) is done as a dual column,
filled in batches while writes go on, checked row by row, and cut over in one short transaction."""

from __future__ import annotations

import signal
import textwrap
import threading
from pathlib import Path

import psycopg
import pytest

from reconciler.apply import ApplyOptions, BackfillLimits, apply_plan
from reconciler.config import load_config
from reconciler.pipeline import make_plan, open_servers
from reconciler.plan import Plan, render_text
from reconciler.servers import Server, connect
from tests.conftest import fetch_one, run_sql
from tests.target import Target

LIVE = """
CREATE TABLE events (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0, note text);
CREATE INDEX events_counter_idx ON events (counter);
INSERT INTO events SELECT g, g * 3, 'n' FROM generate_series(1, 30000) g;
ANALYZE events;
"""
TARGET_LIVE_TABLES = """
CREATE TABLE parents (id bigint PRIMARY KEY, name text);
CREATE TABLE items (id bigint PRIMARY KEY, parent_id bigint, note text, legacy text);
"""  # tests/target.py's, kept as they are
DESIRED = """\
CREATE TABLE events (id bigint PRIMARY KEY, counter bigint NOT NULL DEFAULT 0, note text);
CREATE INDEX events_counter_idx ON events (counter);
{extra}"""


def _plan(root: Path, database: str, server: Server, desired: str, rows: int = 1000) -> Plan:
    (root / "schemas").mkdir(exist_ok=True)
    (root / "schemas" / "events.sql").write_text(desired)
    (root / "reconciler.yaml").write_text(textwrap.dedent(f"""\
        safety:
          online_rewrite_rows: {rows}
        environments:
          test:
            database: "{database}"
            shadow: "{server.dsn}"
            require_signed_plans: false
        """))
    config = load_config(root / "reconciler.yaml")
    env = config.environment("test")
    with open_servers(config, env) as servers:
        return make_plan(config, env, servers).plan


def test_a_big_tables_int_column_becomes_bigint_while_writes_go_on(tmp_path: Path, database: str,
                                                                     pg_server: Server) -> None:
    run_sql(database, LIVE)
    plan = _plan(tmp_path, database, pg_server, DESIRED.format(extra=""))
    kinds = [s.kind for s in plan.body.steps]
    assert kinds[:3] == ["add_column", "create_function", "create_trigger"], kinds
    assert kinds.index("backfill") < kinds.index("create_index_concurrently") < kinds.index("verify_copy") \
        < kinds.index("validate_constraint") < kinds.index("cutover") < kinds.index("drop_column"), kinds
    assert not [h for s in plan.body.steps for h in s.hazards if h.code == "TABLE_REWRITE"]
    cutover = [s for s in plan.body.steps if s.kind == "cutover"]
    assert len({s.phase for s in cutover}) == 1 and cutover[0].sql.startswith("LOCK TABLE")  # one short transaction
    assert plan.body.rehearsal.status == "converged"
    assert "(irreversible: no SQL undoes this step)" in render_text(plan)

    acknowledged: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        with connect(database) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    conn.execute("INSERT INTO events (id, counter) VALUES (%s, %s)", (1_000_000 + n, n))
                    acknowledged.append(1_000_000 + n)
                    conn.execute("UPDATE events SET counter = counter + 1 WHERE id = %s", (1 + n % 50,))
                except psycopg.Error as exc:
                    failures.append(str(exc))
                    return

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                         backfill=BackfillLimits(batch_seconds=0.01)))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert result.status == "applied" and not failures, failures
    assert fetch_one(database, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                               "'events'::regclass AND attname = 'counter'") == "bigint"
    assert fetch_one(database, "SELECT count(*) FROM events WHERE id > 50 AND id <= 30000 AND counter <> id * 3") == 0
    assert fetch_one(database, f"SELECT count(*) FROM events WHERE id = ANY(ARRAY{acknowledged})") == len(acknowledged)
    assert fetch_one(database, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'events'::regclass AND attnum > 0 "
                               "AND NOT attisdropped") == 3  # no helper column left
    assert fetch_one(database, "SELECT pg_get_indexdef('events_counter_idx'::regclass)") == \
        "CREATE INDEX events_counter_idx ON public.events USING btree (counter)"
    assert _plan(tmp_path, database, pg_server, DESIRED.format(extra="")).body.steps == ()  # converged


@pytest.mark.parametrize(("extra", "rows", "type_"), [
    ("", 1_000_000, "bigint"),  # a small table: the plain ALTER
    ("CREATE VIEW big_counters AS SELECT id, counter FROM events WHERE counter > 100;\n", 1000, "bigint"),  # a view
    ("", 1000, "smallint"),  # a value may not fit: the trigger would fail the application's writes
])
def test_the_plain_alter_stays_where_a_dual_column_does_not_fit(tmp_path: Path, database: str, pg_server: Server,
                                                                extra: str, rows: int, type_: str) -> None:
    run_sql(database, LIVE.replace("g * 3", "g % 1000") + extra)
    plan = _plan(tmp_path, database, pg_server, DESIRED.format(extra=extra).replace("counter bigint", f"counter {type_}"),
                 rows=rows)
    assert "cutover" not in [s.kind for s in plan.body.steps]
    assert [h for s in plan.body.steps for h in s.hazards if h.code == "TABLE_REWRITE"]


def test_a_rewrite_killed_mid_fill_is_finished_by_planning_again(target: Target) -> None:
    """The applier killed while its fill waits on a row lock: the new column, its trigger and CHECK stay (the trigger
    keeps the new column in step); the next plan keeps them, fills the rest, checks every row and cuts over."""
    run_sql(target.database, "CREATE TABLE events (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0, note text);"
                             "CREATE INDEX events_counter_idx ON events (counter);"
                             "INSERT INTO events SELECT g, g * 3, 'n' FROM generate_series(1, 200000) g; ANALYZE events;")
    config = target.root / "reconciler.yaml"
    config.write_text("safety:\n  online_rewrite_rows: 1000\n" + config.read_text().replace(
        "    lock_wait: 30s\n", "    lock_wait: 30s\n    backfill: {batch: 5ms}\n"))
    target.desired(TARGET_LIVE_TABLES + DESIRED.format(extra=""))
    proc = target.start_apply(target.plan())
    target.wait_for("SELECT count(*) > 0 FROM pg_trigger WHERE tgname LIKE 'reconciler_copy_%'", seconds=60)
    holder = connect(target.database, autocommit=False)
    holder.execute("SELECT 1 FROM events WHERE id = 200000 FOR UPDATE")
    try:
        target.wait_for("SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE 'UPDATE \"public\".\"events\" SET "
                        "\"reconciler_new_%' AND wait_event_type = 'Lock'")
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        holder.rollback()
        holder.close()
    target.wait_for("SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('reconciler apply', "
                    "'reconciler control') AND pid <> pg_backend_pid()", 0, seconds=30)
    (run,) = target.runs()
    assert run["status"] == "interrupted", run
    run_sql(target.database, "INSERT INTO events (id, counter) VALUES (300000, 7)")  # the trigger copies it
    again = target.run("apply", str(target.plan("again.json")))
    assert again.returncode == 0, again.stderr
    assert fetch_one(target.database, "SELECT count(*) FROM events WHERE id <= 200000 AND counter <> id * 3") == 0
    assert fetch_one(target.database, "SELECT counter FROM events WHERE id = 300000") == 7
    assert fetch_one(target.database, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                                      "'events'::regclass AND attname = 'counter'") == "bigint"
    assert target.run("drift").returncode == 0
    assert fetch_one(target.database, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'reconciler_%'") == 0
