"""Online column rewrites: a type change that would rewrite a big table (`int` to `bigint`) is done as a dual column,
filled in batches while writes go on, checked row by row, and cut over in one short transaction."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from reconciler.apply import ApplyOptions, BackfillLimits, apply_plan
from reconciler.config import load_config
from reconciler.pipeline import make_plan, open_servers
from reconciler.plan import Plan
from reconciler.render import render_markdown, render_text
from reconciler.servers import Server, connect
from tests.conftest import fetch_one, run_sql
from tests.target import Target, apply_with_cutover_blocked

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


@contextlib.contextmanager
def _writing(database: str, write: Callable[[psycopg.Connection[Any], int], int]) -> Iterator[tuple[list[int], list[str]]]:
    """A writer thread calling ``write(conn, n)`` for n = 1, 2, ... until the block ends: what each call returned
    (an acknowledged write), and the error that stopped it, if any."""
    acknowledged: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        with connect(database) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    acknowledged.append(write(conn, n))
                except psycopg.Error as exc:
                    failures.append(str(exc))
                    return

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        yield acknowledged, failures
    finally:
        stop.set()
        thread.join(timeout=60)


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
        < kinds.index("validate_constraint") < kinds.index("cutover") < kinds.index("contract"), kinds
    assert not [h for s in plan.body.steps for h in s.hazards if h.code == "TABLE_REWRITE"]
    cutover = [s for s in plan.body.steps if s.kind == "cutover"]
    assert len({s.phase for s in cutover}) == 1 and cutover[0].sql.startswith("LOCK TABLE")  # one short transaction
    assert plan.body.rehearsal.status == "converged"
    assert "(irreversible: no SQL undoes this step)" in render_text(plan)

    def write(conn: psycopg.Connection[Any], n: int) -> int:
        conn.execute("INSERT INTO events (id, counter) VALUES (%s, %s)", (1_000_000 + n, n))
        conn.execute("UPDATE events SET counter = counter + 1 WHERE id = %s", (1 + n % 50,))
        return 1_000_000 + n

    with _writing(database, write) as (acknowledged, failures):
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                         backfill=BackfillLimits(batch_seconds=0.01)))
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
    # a materialized view: made again in the cut-over, it would compute its rows under the lock
    ("CREATE MATERIALIZED VIEW big_counters AS SELECT id, counter FROM events WHERE counter > 100;\n", 1000, "bigint"),
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
    run = target.kill_while_waiting(proc, "SELECT 1 FROM events WHERE id = 200000 FOR UPDATE",
                                    'UPDATE "public"."events" SET "reconciler_new_%')
    # the trigger copies them: a new row, and a row of a page filled before the kill, which the fill does not read
    # again (it goes on from the killed run's checkpoint)
    run_sql(target.database, "INSERT INTO events (id, counter) VALUES (300000, 7); "
                             "UPDATE events SET counter = counter + 1 WHERE id = 1")
    again = target.run("apply", str(target.plan("again.json")), "-v")
    assert again.returncode == 0, again.stderr
    assert f"going on from run {run['id']}'s checkpoint, page " in again.stderr, again.stderr
    assert fetch_one(target.database, "SELECT counter FROM events WHERE id = 1") == 4
    assert fetch_one(target.database, "SELECT count(*) FROM events WHERE id > 1 AND id <= 200000 AND counter <> id * 3") == 0
    assert fetch_one(target.database, "SELECT counter FROM events WHERE id = 300000") == 7
    assert fetch_one(target.database, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                                      "'events'::regclass AND attname = 'counter'") == "bigint"
    assert target.run("drift").returncode == 0
    assert fetch_one(target.database, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'reconciler_%'") == 0


KEYED_LIVE = """
CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL DEFAULT 0);
CREATE TABLE ledger (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     account_id int NOT NULL REFERENCES accounts (id), amount int NOT NULL);
CREATE INDEX ledger_account_idx ON ledger (account_id);
"""
KEYED_ROWS = """
INSERT INTO accounts SELECT g, g FROM generate_series(1, 20000) g;
INSERT INTO ledger (account_id, amount) SELECT g, 1 FROM generate_series(1, 20000) g;
ANALYZE accounts, ledger;
"""
KEYED_DESIRED = KEYED_LIVE.replace("id int PRIMARY KEY", "id bigint PRIMARY KEY").replace("account_id int", "account_id bigint")


def test_an_int_primary_key_and_the_foreign_key_to_it_become_bigint_while_writes_go_on(
        tmp_path: Path, database: str, pg_server: Server) -> None:
    """Both ends of the foreign key are dual columns: the primary key's index is built again on the new column,
    the cut-over (one transaction for both) swaps the key in USING INDEX and re-points the foreign key NOT VALID,
    and the key is validated after, while writers insert accounts and ledger rows that reference them."""
    run_sql(database, KEYED_LIVE + KEYED_ROWS)
    # the key alone made bigint: the integer column referencing it is left as the desired SQL says, and said so
    alone = _plan(tmp_path, database, pg_server, KEYED_LIVE.replace("id int PRIMARY KEY", "id bigint PRIMARY KEY"))
    (behind,) = [h for s in alone.body.steps for h in s.hazards if h.code == "FOREIGN_KEY_TYPE_MISMATCH"]
    assert behind.message.startswith("public.ledger.account_id stays integer while id, the key its foreign key "
                                     "ledger_account_id_fkey references, becomes bigint"), behind.message
    plan = _plan(tmp_path, database, pg_server, KEYED_DESIRED)
    steps = plan.body.steps
    assert not [h for s in steps for h in s.hazards if h.code in ("TABLE_REWRITE", "FOREIGN_KEY_TYPE_MISMATCH")], render_text(plan)
    # each table's new column in a transaction of its own: one locking both could deadlock with the writers
    assert len({s.phase for s in steps if s.kind == "add_column"}) == 2, render_text(plan)
    cutover = [s for s in steps if s.kind == "cutover"]
    assert len({s.phase for s in cutover}) == 1, render_text(plan)  # both columns' cut-overs: one short transaction
    assert cutover[0].sql == 'LOCK TABLE "public"."ledger", "public"."accounts" IN ACCESS EXCLUSIVE MODE'
    assert any(s.sql.endswith('USING INDEX "accounts_pkey_' + s.sql.rsplit("_", 1)[-1]) and "PRIMARY KEY" in s.sql
               for s in cutover), render_text(plan)
    shown, comment = render_text(plan), render_markdown(plan)  # each rewrite's phases, rows and estimate
    assert re.search(r"public\.accounts\.id: ~20,000 rows; expand steps \d+-\d+; backfill steps \d+-\d+, under 1 s at "
                     r"~100,000 rows/s; cut-over steps \d+-\d+ \(one short transaction, locks public\.ledger, "
                     r"public\.accounts\); checked after it: step \d+; contract steps \d+-\d+", shown), shown
    assert re.search(r"\| `public\.ledger\.account_id` \| 20,000 \| steps \d+-\d+ \| steps \d+-\d+", comment), comment
    validations = [s for s in steps if s.kind == "validate_constraint" and s.object == "public.ledger.ledger_account_id_fkey"]
    assert len(validations) == 1 and validations[0].phase > cutover[-1].phase  # once, after the cut-over
    assert plan.body.rehearsal.status == "converged", plan.body.rehearsal

    def write(conn: psycopg.Connection[Any], n: int) -> int:
        conn.execute("INSERT INTO accounts (id) VALUES (%s)", (100_000 + n,))
        row = conn.execute("INSERT INTO ledger (account_id, amount) VALUES (%s, 2) RETURNING id", (100_000 + n,)).fetchone()
        assert row is not None
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (1 + n % 50,))
        return int(row[0])

    with _writing(database, write) as (acknowledged, failures):
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                         backfill=BackfillLimits(batch_seconds=0.01)))
    assert result.status == "applied" and not failures, failures
    assert acknowledged
    types = "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '{}'::regclass AND attname = '{}'"
    assert fetch_one(database, types.format("accounts", "id")) == fetch_one(database, types.format("ledger", "account_id")) \
        == "bigint"
    assert fetch_one(database, "SELECT pg_get_constraintdef(oid) || ' ' || convalidated FROM pg_constraint "
                               "WHERE conname = 'ledger_account_id_fkey'") == "FOREIGN KEY (account_id) REFERENCES accounts(id) true"
    assert fetch_one(database, "SELECT conindid::regclass::text FROM pg_constraint WHERE conname = 'accounts_pkey'") \
        == "accounts_pkey"
    assert fetch_one(database, f"SELECT count(*) FROM ledger WHERE id = ANY(ARRAY{acknowledged}::bigint[])") == len(acknowledged)
    assert fetch_one(database, "SELECT count(*) FROM ledger l JOIN accounts a ON a.id = l.account_id") == \
        20000 + len(acknowledged)
    with pytest.raises(psycopg.errors.ForeignKeyViolation):  # the key is enforced
        run_sql(database, "INSERT INTO ledger (account_id, amount) VALUES (5000000000, 1)")
    assert _plan(tmp_path, database, pg_server, KEYED_DESIRED).body.steps == ()  # converged


@pytest.mark.parametrize("when", ["in", "after"])
def test_a_key_rewrite_killed_in_its_cut_over_or_after_is_finished_by_planning_again(target: Target, when: str) -> None:
    """Killed while the cut-over waits for its lock (its transaction rolled back whole), or right after it committed
    (the new key NOT VALID, the old columns still there): the next plan finishes it, every row right."""
    run_sql(target.database, KEYED_LIVE + KEYED_ROWS)
    config = target.root / "reconciler.yaml"
    config.write_text("safety:\n  online_rewrite_rows: 1000\n" + config.read_text().replace(
        "    lock_wait: 30s\n", "    lock_wait: 30s\n    backfill: {batch: 5ms}\n"))
    target.desired(TARGET_LIVE_TABLES + KEYED_DESIRED)
    proc = target.start_apply(target.plan())
    row, table, runs = (connect(target.database, autocommit=False) for _ in range(3))
    try:
        # the ledger's fill held up by a row lock, long enough to take a lock only the cut-over waits for
        target.wait_for("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'reconciler_copy_%'", 2, seconds=60)
        row.execute("SELECT 1 FROM ledger WHERE id = 20000 FOR UPDATE")
        target.wait_for("SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE 'UPDATE \"public\".\"ledger\" SET "
                        "\"reconciler_new_%' AND wait_event_type = 'Lock'", seconds=60)
        table.execute("LOCK TABLE ledger IN ACCESS SHARE MODE")
        row.rollback()
        target.wait_for("SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE 'LOCK TABLE %' "
                        "AND wait_event_type = 'Lock'", seconds=60)
        if when == "after":  # the cut-over commits; the run's record of it waits for the row
            runs.execute("SELECT 1 FROM reconciler.runs WHERE status = 'running' FOR NO KEY UPDATE")
            table.rollback()
            target.wait_for("SELECT count(*) FROM pg_attribute WHERE attname LIKE '%reconciler_old%' "
                            "AND NOT attisdropped", 2, seconds=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        for conn in (row, table, runs):
            conn.rollback()
            conn.close()
    target.wait_for("SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('reconciler apply', "
                    "'reconciler control') AND pid <> pg_backend_pid()", 0, seconds=30)
    assert fetch_one(target.database, "SELECT count(*) FROM pg_attribute WHERE attname LIKE '%reconciler_old%' "
                                      "AND NOT attisdropped") == (2 if when == "after" else 0)
    run_sql(target.database, "INSERT INTO accounts (id) VALUES (30000); INSERT INTO ledger (account_id, amount) "
                             "VALUES (30000, 5)")  # kept in step by the trigger, or written after the cut-over
    again = target.run("apply", str(target.plan("again.json")))
    assert again.returncode == 0, again.stderr
    assert fetch_one(target.database, "SELECT count(*) FROM ledger l JOIN accounts a ON a.id = l.account_id "
                                      "WHERE l.amount = 1 AND a.balance = l.account_id") == 20000
    assert fetch_one(target.database, "SELECT amount FROM ledger WHERE account_id = 30000") == 5
    assert fetch_one(target.database, "SELECT string_agg(format_type(atttypid, atttypmod), ',' ORDER BY attrelid) "
                                      "FROM pg_attribute WHERE (attrelid, attname) IN (('accounts'::regclass, 'id'), "
                                      "('ledger'::regclass, 'account_id'))") == "bigint,bigint"
    assert fetch_one(target.database, "SELECT convalidated FROM pg_constraint WHERE conname = 'ledger_account_id_fkey'")
    assert target.run("drift").returncode == 0
    assert fetch_one(target.database, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'reconciler_%'") == 0


def _held(target: Target) -> dict[str, object]:
    """The keyed rewrite applied with its contract held; the run."""
    run_sql(target.database, KEYED_LIVE + KEYED_ROWS)
    config = target.root / "reconciler.yaml"
    config.write_text("safety:\n  online_rewrite_rows: 1000\n" + config.read_text())
    target.desired(TARGET_LIVE_TABLES + KEYED_DESIRED)
    applied = target.run("apply", str(target.plan()), "--hold-contract")
    assert applied.returncode == 0, applied.stderr
    assert "Contract held (6 step(s)): public.accounts.id_reconciler_old_" in applied.stdout, applied.stdout
    (run,) = target.runs()
    assert run["status"] == "applied", run
    shown = target.run("history").stdout
    assert "contract held (apply --hold-contract): public.accounts.id_reconciler_old_" in shown, shown
    held = [s for s in run["statements"] if s["status"] == "held"]  # type: ignore[attr-defined]
    assert [s["kind"] for s in held] == ["drop_trigger", "drop_function", "contract"] * 2, held
    tags = [str(s["object"]).rsplit("_", 1)[1] for s in held if s["kind"] == "contract"]
    assert fetch_one(target.database, "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' "
                                      "ORDER BY attrelid, attname) FROM pg_attribute WHERE attrelid IN "
                                      "('accounts'::regclass, 'ledger'::regclass) AND attname LIKE '%id%' "
                                      "AND attnum > 0 AND NOT attisdropped") \
        == (f"id bigint, id_reconciler_old_{tags[0]} integer, account_id bigint, "
            f"account_id_reconciler_old_{tags[1]} integer, id bigint")
    return run


def test_a_watcher_leaves_a_held_contract_to_a_person(target: Target) -> None:
    """The loop neither counts what a held contract kept as drift nor applies the plan that would drop it: that would
    end the way back an operator kept on purpose. It writes that plan for a person instead."""
    run = _held(target)
    kept = "SELECT count(*) FROM pg_attribute WHERE attname LIKE '%\\_reconciler\\_old\\_%' AND NOT attisdropped"
    assert fetch_one(target.database, kept) == 2
    proc = subprocess.Popen(target.args("--log-format", "json", "watch", "--env", "test", "--listen", "off",
                                        "--interval", "1s"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")) if proc.stderr else None,
                     daemon=True).start()

    def said(trigger: str) -> list[str]:
        return [m for m in (json.loads(line).get("message", "") for line in list(lines) if line.startswith("{"))
                if m.startswith(f"{trigger}: ")]

    try:
        deadline = time.monotonic() + 180
        while not (said("start") and said("drift")):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    start, drift = said("start")[0], said("drift")[0]
    assert "written to" in start and f"it would finish the contract run {run['id']} held" in start, start
    assert drift.startswith(f"drift: no drift but what the contract of run(s) {run['id']} held (6 object(s)"), drift
    assert "reverting" not in "".join(lines)
    assert fetch_one(target.database, kept) == 2 and len(target.runs()) == 1  # nothing applied: the way back stays
    assert target.run("rollback", str(run["id"])).returncode == 0


def test_a_held_contract_keeps_the_old_column_in_step_and_rollback_swaps_back_without_losing_a_write(
        target: Target) -> None:
    run = _held(target)
    # written after the cut-over: kept in step in the old columns by their triggers
    run_sql(target.database, "INSERT INTO accounts (id, balance) VALUES (40000, 7); "
                             "INSERT INTO ledger (account_id, amount) VALUES (40000, 9); "
                             "UPDATE accounts SET balance = -5 WHERE id = 5")
    def write(conn: psycopg.Connection[Any], n: int) -> int:  # all through the way back
        conn.execute("INSERT INTO accounts (id) VALUES (%s)", (50_000 + n,))
        conn.execute("INSERT INTO ledger (account_id, amount) VALUES (%s, 3)", (50_000 + n,))
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (50_000 + n,))
        return 50_000 + n

    with _writing(target.database, write) as (acknowledged, failures):
        back = target.run("rollback", str(run["id"]))
    assert back.returncode == 0 and not failures, (back.stderr, failures)
    assert acknowledged and fetch_one(target.database, "SELECT count(*) FROM accounts a JOIN ledger l ON l.account_id "
                                                       "= a.id WHERE a.id > 50000 AND a.balance = 1") == len(acknowledged)
    run_sql(target.database, "DELETE FROM ledger WHERE account_id > 50000; DELETE FROM accounts WHERE id > 50000")
    assert "TABLE_REWRITE" not in back.stdout and "the way back: a brief exclusive lock" in back.stdout, back.stdout
    assert fetch_one(target.database, "SELECT string_agg(format_type(atttypid, atttypmod), ',' ORDER BY attrelid) "
                                      "FROM pg_attribute WHERE (attrelid, attname) IN (('accounts'::regclass, 'id'), "
                                      "('ledger'::regclass, 'account_id'))") == "integer,integer"
    assert fetch_one(target.database, "SELECT string_agg(attname, ', ') FROM pg_attribute WHERE attname LIKE "
                                      "'%reconciler%' AND NOT attisdropped AND attrelid IN ('accounts'::regclass, "
                                      "'ledger'::regclass)") is None
    assert fetch_one(target.database, "SELECT count(*) FROM ledger l JOIN accounts a ON a.id = l.account_id") == 20001
    assert fetch_one(target.database, "SELECT balance FROM accounts WHERE id = 5") == -5
    assert fetch_one(target.database, "SELECT amount FROM ledger WHERE account_id = 40000") == 9
    assert fetch_one(target.database, "SELECT string_agg(conname || ' ' || convalidated, ', ' ORDER BY conname) FROM "
                                      "pg_constraint WHERE contype IN ('p', 'f') AND conrelid = ANY('{accounts,ledger}'"
                                      "::regclass[])") == "accounts_pkey true, ledger_account_id_fkey true, ledger_pkey true"
    assert fetch_one(target.database, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'reconciler_%'") == 0


def test_a_held_contract_is_dropped_by_the_next_plan_and_the_way_back_refuses_to_lose_a_value(target: Target) -> None:
    run = _held(target)
    run_sql(target.database, "INSERT INTO accounts (id) VALUES (3000000000)")  # beyond the old column's integer
    back = target.run("rollback", str(run["id"]))
    assert back.returncode != 0 and "1 row(s)" in back.stderr, back.stderr  # nothing swapped back, nothing lost
    assert fetch_one(target.database, "SELECT count(*) FROM accounts WHERE id = 3000000000") == 1
    (target.root / "policies").mkdir()
    (target.root / "policies" / "contracts.yaml").write_text(
        "rules:\n  - id: contracts-need-a-reviewer\n    description: the end of the way back\n"
        "    action: require_approval\n    count: 1\n    change: {kinds: [contract]}\n")
    plan = target.plan("contract.json")
    shown = target.run("show", str(plan))
    assert "contract public.accounts.id_reconciler_old_" in shown.stdout and "DATA_LOSS: the contract" in shown.stdout
    assert "contracts-need-a-reviewer" in shown.stdout and "Approvals: 0 of 1 given" in shown.stdout, shown.stdout
    assert "public.accounts.id: the contract of an earlier cut-over, steps " in shown.stdout, shown.stdout
    refused = target.run("apply", str(plan))
    assert refused.returncode == 3 and "0 of 1" in refused.stderr, refused.stderr
    (target.root / "policies" / "contracts.yaml").unlink()
    applied = target.run("apply", str(target.plan("contract.json")))
    assert applied.returncode == 0, applied.stderr
    assert target.run("drift").returncode == 0
    assert fetch_one(target.database, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'reconciler_%'") == 0


def test_a_serial_primary_key_becomes_bigserial_while_rows_are_inserted(tmp_path: Path, database: str,
                                                                         pg_server: Server) -> None:
    """The sequence the column owns is owned by the new one from the cut-over (the contract's DROP COLUMN would take
    it otherwise), its default moves with it, and the sequence becomes bigint."""
    run_sql(database, "CREATE TABLE tickets (id serial PRIMARY KEY, note text);"
                      "INSERT INTO tickets (note) SELECT 'n' FROM generate_series(1, 20000); ANALYZE tickets;")
    desired = "CREATE TABLE tickets (id bigserial PRIMARY KEY, note text);\n"
    plan = _plan(tmp_path, database, pg_server, desired)
    assert "cutover" in [s.kind for s in plan.body.steps], render_text(plan)
    assert any(s.sql == 'ALTER SEQUENCE "public"."tickets_id_seq" OWNED BY "public"."tickets"."id"'
               for s in plan.body.steps if s.kind == "cutover"), render_text(plan)

    def write(conn: psycopg.Connection[Any], n: int) -> int:
        # not prepared: a statement prepared before the cut-over that returns the column fails once after it
        # ("cached plan must not change result type"), as after any ALTER ... TYPE (README)
        row = conn.execute("INSERT INTO tickets (note) VALUES (%s) RETURNING id", (f"w{n}",), prepare=False).fetchone()
        assert row is not None
        return int(row[0])

    with _writing(database, write) as (acknowledged, failures):
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                         backfill=BackfillLimits(batch_seconds=0.01)))
    assert result.status == "applied" and not failures and acknowledged, failures
    assert fetch_one(database, "SELECT pg_get_serial_sequence('tickets', 'id') || ' ' || format_type(s.seqtypid, NULL) "
                               "|| ' ' || pg_get_expr(d.adbin, d.adrelid) FROM pg_sequence s, pg_attrdef d "
                               "WHERE s.seqrelid = 'tickets_id_seq'::regclass AND d.adrelid = 'tickets'::regclass") \
        == "public.tickets_id_seq bigint nextval('tickets_id_seq'::regclass)"
    assert fetch_one(database, "SELECT count(DISTINCT id) FROM tickets") == 20000 + len(acknowledged)
    assert fetch_one(database, f"SELECT count(*) FROM tickets WHERE id = ANY(ARRAY{acknowledged})") == len(acknowledged)
    run_sql(database, "INSERT INTO tickets (note) VALUES ('after')")  # the default goes on from the sequence
    assert _plan(tmp_path, database, pg_server, desired).body.steps == ()


IDENTITY_LIVE = """
CREATE TABLE orders (id int GENERATED ALWAYS AS IDENTITY (INCREMENT BY 3) PRIMARY KEY, note text);
CREATE TABLE lines (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, order_id int REFERENCES orders (id));
"""


def test_an_identity_key_becomes_bigint_while_rows_are_inserted_and_rolls_back_without_losing_one(
        target: Target) -> None:
    """An identity's sequence cannot change columns: the cut-over gives the new column an identity of its own, under
    the same name, going on from the old one's value (the new type's bounds), and the way back does the same."""
    run_sql(target.database, IDENTITY_LIVE + "INSERT INTO orders (note) SELECT 'n' FROM generate_series(1, 5000);"
                             "INSERT INTO lines (order_id) SELECT id FROM orders; ANALYZE orders, lines;")
    config = target.root / "reconciler.yaml"
    config.write_text("safety:\n  online_rewrite_rows: 1000\n" + config.read_text())
    desired = TARGET_LIVE_TABLES + IDENTITY_LIVE.replace("id int GENERATED", "id bigint GENERATED").replace(
        "order_id int", "order_id bigint")
    target.desired(desired)
    shown = target.run("show", str(target.plan())).stdout
    assert "TABLE_REWRITE" not in shown and 'ALTER TABLE "public"."orders" ALTER COLUMN "id" DROP IDENTITY' in shown
    assert ('ALTER TABLE "public"."orders" ALTER COLUMN "id" ADD GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME '
            '"public"."orders_id_seq" START WITH 1 INCREMENT BY 3 CACHE 1 NO CYCLE)') in shown, shown

    def write(conn: psycopg.Connection[Any], n: int) -> int:  # ids from the identity, whichever column has it
        row = conn.execute("INSERT INTO orders (note) VALUES (%s) RETURNING id", (f"w{n}",), prepare=False).fetchone()
        assert row is not None
        conn.execute("INSERT INTO lines (order_id) VALUES (%s)", (row[0],))
        return int(row[0])

    def identity() -> str:
        return str(fetch_one(target.database, "SELECT a.attidentity::text || ' ' || format_type(a.atttypid, NULL) || ' ' || "
                                              "pg_get_serial_sequence('orders', 'id') || ' ' || s.seqmax || ' ' || "
                                              "s.seqincrement FROM pg_attribute a, pg_sequence s WHERE a.attrelid = "
                                              "'orders'::regclass AND a.attname = 'id' AND s.seqrelid = "
                                              "pg_get_serial_sequence('orders', 'id')::regclass"))

    with _writing(target.database, write) as (forward, failures):
        applied = target.run("apply", str(target.root / "plan.json"), "--hold-contract")
    assert applied.returncode == 0 and not failures and forward, (applied.stderr, failures)
    assert identity() == "a bigint public.orders_id_seq 9223372036854775807 3"
    assert fetch_one(target.database, "SELECT count(*) FROM pg_class WHERE relkind = 'S' AND relname LIKE 'orders%'") == 1
    drift = target.run("drift").stdout  # the held contract's column, trigger and function, nothing else, named so
    assert "6 object(s) differ" in drift and "sequence" not in drift and "(different)" not in drift, drift
    run_id = target.runs()[0]["id"]
    assert drift.count(f"[held contract of run {run_id}]") == 6, drift
    assert f"6 of them are the contract run {run_id} held (apply --hold-contract)" in drift, drift
    verified = target.run("verify")  # a held contract is no failure of the target: said as such
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ok    schema       matches the desired schema but for what a held contract kept" in verified.stdout
    assert f"held  contract     6 object(s) the contract of run {run_id} held" in verified.stdout, verified.stdout
    with _writing(target.database, write) as (back, failures):
        rolled = target.run("rollback", str(target.runs()[0]["id"]))
    assert rolled.returncode == 0 and not failures and back, (rolled.stderr, failures)
    assert "TABLE_REWRITE" not in rolled.stdout, rolled.stdout
    assert identity() == "a integer public.orders_id_seq 2147483647 3"
    written = forward + back
    assert len(set(written)) == len(written) and all(b > f for f in forward for b in back[:1])  # never a value again
    assert fetch_one(target.database, f"SELECT count(*) FROM orders o JOIN lines l ON l.order_id = o.id "
                                      f"WHERE o.id = ANY(ARRAY{written})") == len(written)
    assert fetch_one(target.database, "SELECT count(*) FROM orders") == 5000 + len(written)
    after = fetch_one(target.database, "INSERT INTO orders (note) VALUES ('after') RETURNING id")
    assert isinstance(after, int) and after == max(written) + 3
    target.desired(TARGET_LIVE_TABLES + IDENTITY_LIVE)  # the schema the run started from
    drift = target.run("drift")
    assert drift.returncode == 0, drift.stdout


VIEWED = """
CREATE VIEW big_counters AS SELECT id, counter FROM events WHERE counter > 100;
CREATE VIEW bigger_counters AS SELECT id, counter * 2 AS twice FROM big_counters;
COMMENT ON VIEW big_counters IS 'the big ones';
GRANT SELECT ON big_counters TO PUBLIC;
"""


def test_views_over_the_column_are_made_again_in_the_cut_over_and_never_missing(target: Target) -> None:
    """A view reads a column by number: the cut-over drops it and its dependents after its lock and makes them again,
    comment and grant too, after its renames; a reader of the view never finds it missing, forward or back."""
    run_sql(target.database, LIVE + VIEWED)
    config = target.root / "reconciler.yaml"
    config.write_text("safety:\n  online_rewrite_rows: 1000\n" + config.read_text())
    target.desired(TARGET_LIVE_TABLES + DESIRED.format(extra=VIEWED))
    plan = target.plan()
    shown = target.run("show", str(plan)).stdout
    assert "TABLE_REWRITE" not in shown, shown
    steps = json.loads(plan.read_text())["body"]["steps"]
    cut = [s for s in steps if s["phase"] == next(s["phase"] for s in steps if s["kind"] == "cutover")]
    assert [s["kind"] for s in cut][:3] == ["drop_view", "drop_view", "cutover"], cut  # a reader's lock order
    assert [s["kind"] for s in cut][-4:] == ["replace_view", "replace_view", "comment", "grant"], cut
    assert f"cut-over steps {cut[0]['index']}-{cut[-1]['index']} (one short transaction, locks public.events)" \
        in shown, shown
    assert not [s for s in steps if s["kind"] in ("drop_view", "replace_view") and s not in cut]

    def read(conn: psycopg.Connection[Any], n: int) -> int:
        return int(conn.execute("SELECT count(*) FROM bigger_counters WHERE twice > %s", (n % 7,)).fetchone()[0])  # type: ignore[index]

    with _writing(target.database, read) as (counted, failures):
        applied = target.run("apply", str(plan), "--hold-contract")
    assert applied.returncode == 0 and not failures and counted, (applied.stderr, failures)
    assert set(counted) == {29967}

    def view_types() -> object:
        return fetch_one(target.database, "SELECT string_agg(attrelid::regclass || '.' || attname || ' ' || "
                                          "format_type(atttypid, NULL), ', ' ORDER BY attrelid::regclass::text, attnum) "
                                          "FROM pg_attribute WHERE attrelid IN ('big_counters'::regclass, "
                                          "'bigger_counters'::regclass) AND attnum > 0")

    assert view_types() == "big_counters.id bigint, big_counters.counter bigint, bigger_counters.id bigint, " \
                           "bigger_counters.twice bigint"
    assert fetch_one(target.database, "SELECT obj_description('big_counters'::regclass) || ' ' || "
                                      "has_table_privilege('public', 'big_counters', 'SELECT')") == "the big ones true"
    with _writing(target.database, read) as (counted, failures):
        back = target.run("rollback", str(target.runs()[0]["id"]))
    assert back.returncode == 0 and not failures and counted and set(counted) == {29967}, (back.stderr, failures)
    assert "TABLE_REWRITE" not in back.stdout, back.stdout
    assert view_types() == "big_counters.id bigint, big_counters.counter integer, bigger_counters.id bigint, " \
                           "bigger_counters.twice integer"
    target.desired(TARGET_LIVE_TABLES + LIVE.split("INSERT")[0] + VIEWED)
    drift = target.run("drift")
    assert drift.returncode == 0, drift.stdout


def test_an_identitys_new_options_are_set_on_the_identity_its_cut_over_makes(tmp_path: Path, database: str,
                                                                              pg_server: Server) -> None:
    """Set before the cut-over, they would be set on the old column's identity, which the cut-over drops."""
    run_sql(database, IDENTITY_LIVE + "INSERT INTO orders (note) SELECT 'n' FROM generate_series(1, 2000); ANALYZE orders;")
    desired = IDENTITY_LIVE.replace("id int GENERATED ALWAYS AS IDENTITY (INCREMENT BY 3)",
                                    "id bigint GENERATED ALWAYS AS IDENTITY (INCREMENT BY 5 CACHE 20)")
    plan = _plan(tmp_path, database, pg_server, desired)
    steps = plan.body.steps
    options = next(s for s in steps if "SET INCREMENT BY 5" in s.sql)
    cutover = next(s for s in steps if s.kind == "cutover" and "ADD GENERATED ALWAYS AS IDENTITY" in s.sql)
    assert options.phase == cutover.phase and options.index > cutover.index, render_text(plan)
    assert plan.body.rehearsal.status == "converged", render_text(plan)
    result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler"))
    assert result.status == "applied"
    assert fetch_one(database, "SELECT seqincrement || ' ' || seqcache || ' ' || format_type(seqtypid, NULL) FROM "
                               "pg_sequence WHERE seqrelid = 'orders_id_seq'::regclass") == "5 20 bigint"
    assert _plan(tmp_path, database, pg_server, desired).body.steps == ()


def test_a_cut_over_that_cannot_get_its_lock_keeps_the_filled_column_for_the_next_plan(
        tmp_path: Path, database: str, pg_server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """A reader holding the table past every retry of the cut-over: the run fails, but the filled column, its
    trigger and its index stay (undoing them would throw the fill away for a lock busy a few seconds); the next
    plan keeps them (its fill finds every row filled and writes none) and cuts over."""
    import logging

    run_sql(database, LIVE)
    failed = apply_with_cutover_blocked(_plan(tmp_path, database, pg_server, DESIRED.format(extra="")), database, "events")
    assert "gave up after 2 attempts" in failed and "the rows filled or copied are kept" in failed, failed
    new = fetch_one(database, "SELECT attname FROM pg_attribute WHERE attrelid = 'events'::regclass AND attname LIKE "
                              "'reconciler_new_%' AND NOT attisdropped")
    assert isinstance(new, str)
    run_sql(database, "INSERT INTO events (id, counter) VALUES (40000, 5)")  # kept in step meanwhile
    assert fetch_one(database, f'SELECT count(*) FROM events WHERE "{new}" IS DISTINCT FROM counter::bigint') == 0
    again = _plan(tmp_path, database, pg_server, DESIRED.format(extra=""))
    with caplog.at_level(logging.INFO, logger="reconciler.apply"):
        result = apply_plan(again, database, ApplyOptions(environment="test", metadata_schema="reconciler"))
    assert result.status == "applied"
    assert re.search(r"step \d+ backfill public\.events\.reconciler_new_\w+: 0 rows in", caplog.text), caplog.text
    assert fetch_one(database, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                               "'events'::regclass AND attname = 'counter'") == "bigint"
    assert fetch_one(database, "SELECT count(*) FROM events WHERE id <= 30000 AND counter <> id * 3") == 0
    assert fetch_one(database, "SELECT counter FROM events WHERE id = 40000") == 5
