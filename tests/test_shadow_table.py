"""Tables built again as shadow tables: a plain table made partitioned, a new partition key, an unlogged table made
logged, while writes go on; a copy killed part-way goes on from its checkpoint; a held contract keeps the old table
in step; small tables are built again in one transaction; what cannot be taken over is refused."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import psycopg
import pytest

from reconciler.apply import ApplyOptions, BackfillLimits, apply_plan
from reconciler.errors import ReconcilerError
from reconciler.online import span
from reconciler.render import render_markdown, render_text
from reconciler.safety import Step
from reconciler.servers import Server, connect
from tests.conftest import fetch_one, run_sql
from tests.target import Target, apply_with_cutover_blocked
from tests.test_dual_column import _plan

LIVE = """
CREATE TABLE accounts (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, name text,
                       balance int NOT NULL DEFAULT 0);
CREATE INDEX accounts_name_idx ON accounts (name);
ALTER TABLE accounts ADD CONSTRAINT accounts_id_created_key UNIQUE (id, created_at);
CREATE TABLE ledger (id bigserial PRIMARY KEY, account_id bigint NOT NULL, account_created_at timestamptz NOT NULL,
                     amount int NOT NULL);
ALTER TABLE ledger ADD CONSTRAINT ledger_account_fkey FOREIGN KEY (account_id, account_created_at)
    REFERENCES accounts (id, created_at);
CREATE TABLE audit (account_id bigint NOT NULL);
CREATE FUNCTION audited() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NULL; END$$;
CREATE TRIGGER accounts_audit AFTER INSERT ON accounts FOR EACH ROW EXECUTE FUNCTION audited();
CREATE VIEW rich AS SELECT id, balance FROM accounts WHERE balance > 100;
"""
ROWS = """
INSERT INTO accounts SELECT g, timestamptz '2026-01-01 00:00+00' + g * interval '1 minute', 'n' || g, g
FROM generate_series(1, 20000) g;
INSERT INTO ledger (account_id, account_created_at, amount) SELECT id, created_at, 1 FROM accounts WHERE id % 10 = 0;
ANALYZE accounts, ledger;
"""
PARTITIONED = """
CREATE TABLE accounts (id bigint NOT NULL, created_at timestamptz NOT NULL, name text, balance int NOT NULL DEFAULT 0,
                       PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);
CREATE TABLE accounts_early PARTITION OF accounts FOR VALUES FROM (MINVALUE) TO ('2026-01-08 00:00+00');
CREATE TABLE accounts_late PARTITION OF accounts FOR VALUES FROM ('2026-01-08 00:00+00') TO (MAXVALUE);
CREATE INDEX accounts_name_idx ON accounts (name);
COMMENT ON TABLE accounts IS 'one row per account';
CREATE TABLE ledger (id bigserial PRIMARY KEY, account_id bigint NOT NULL, account_created_at timestamptz NOT NULL,
                     amount int NOT NULL);
ALTER TABLE ledger ADD CONSTRAINT ledger_account_fkey FOREIGN KEY (account_id, account_created_at)
    REFERENCES accounts (id, created_at);
CREATE TABLE audit (account_id bigint NOT NULL);
CREATE FUNCTION audited() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NULL; END$$;
CREATE TRIGGER accounts_audit AFTER INSERT ON accounts FOR EACH ROW EXECUTE FUNCTION audited();
CREATE VIEW rich AS SELECT id, balance FROM accounts WHERE balance > 100;
"""
TARGET_LIVE_TABLES = """
CREATE TABLE parents (id bigint PRIMARY KEY, name text);
CREATE TABLE items (id bigint PRIMARY KEY, parent_id bigint, note text, legacy text);
"""  # tests/target.py's, kept as they are


class _Writers:
    """Writer threads, each on rows of its own: inserts (half with a ledger row), updates of old rows' balance, moves
    of new rows to the other partition, deletes; every acknowledged write recorded as the state its row must end in
    (``expected``: id -> (balance, moved) or None for deleted)."""

    def __init__(self, database: str, threads: int = 2) -> None:
        self.database, self.stop = database, threading.Event()
        self.expected: dict[int, tuple[int, bool] | None] = {}
        self.ledger = 0
        self.inserted: list[int] = []
        self.moved: set[int] = set()
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._write, args=(k,)) for k in range(threads)]
        self.lock = threading.Lock()

    def __enter__(self) -> _Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _write(self, k: int) -> None:
        base, rng = 1_000_000 * (k + 1), random.Random(k)
        with connect(self.database) as conn:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    new = base + n
                    with conn.transaction():
                        conn.execute("INSERT INTO accounts (id, created_at, name, balance) VALUES (%s, timestamptz "
                                     "'2026-01-02 00:00+00' + %s * interval '1 hour', 'w', %s)", (new, n % 300, n))
                        if n % 2:
                            conn.execute("INSERT INTO ledger (account_id, account_created_at, amount) SELECT id, "
                                         "created_at, 5 FROM accounts WHERE id = %s", (new,))
                    self._saw(new, (n, False), ledger=n % 2)
                    self.inserted.append(new)
                    old = 5000 * k + rng.randint(1, 5000)
                    conn.execute("UPDATE accounts SET balance = %s WHERE id = %s", (-n, old))
                    self._saw(old, (-n, False))
                    if n % 4 == 2:  # a new row without a ledger row moves to the other partition
                        conn.execute("UPDATE accounts SET created_at = timestamptz '2026-02-01 00:00+00' WHERE id = %s",
                                     (new,))
                        self._saw(new, (n, True))
                        self.moved.add(new)
                    if n % 8 == 4 and n > 8:  # and one without a ledger row, made earlier, is deleted
                        conn.execute("DELETE FROM accounts WHERE id = %s", (base + n - 8,))
                        self._saw(base + n - 8, None)
                except psycopg.Error as exc:
                    self.failures.append(str(exc))
                    return

    def _saw(self, key: int, state: tuple[int, bool] | None, ledger: int = 0) -> None:
        with self.lock:
            self.expected[key] = state
            self.ledger += ledger

    def check(self, database: str) -> None:
        """Every acknowledged write is there, as written last; the rows nobody wrote are as they were."""
        assert not self.failures, self.failures[:3]
        assert len(self.expected) > 20, "the writers made too few writes to show anything"
        with connect(database) as conn:
            found = {int(r[0]): (int(r[1]), bool(r[2])) for r in conn.execute(
                "SELECT id, balance, created_at = timestamptz '2026-02-01 00:00+00' FROM accounts WHERE id = ANY(%s)",
                (list(self.expected),)).fetchall()}
            wrong = {k: (v, found.get(k)) for k, v in self.expected.items()
                     if (v is None and k in found) or (v is not None and found.get(k, (None, None))[0] != v[0])
                     or (v is not None and v[1] and not found[k][1])}
            assert not wrong, list(wrong.items())[:10]
            # one row per account: a row moved to another partition has left none behind under its old partition key
            assert conn.execute("SELECT count(*) - count(DISTINCT id) FROM accounts").fetchone() == (0,)
            untouched = [k for k in range(1, 20001) if k not in self.expected]
            assert conn.execute("SELECT count(*) FROM accounts WHERE id = ANY(%s) AND balance = id",
                                (untouched,)).fetchone() == (len(untouched),)
            assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (2000 + self.ledger,)
            # the table's trigger fired once for each insert: not for a row copied, nor again by the old table's (a row
            # moved to another partition counts as inserted there too: PostgreSQL's own)
            audited = [int(r[0]) for r in conn.execute("SELECT account_id FROM audit WHERE account_id > 1000000 "
                                                       "ORDER BY 1").fetchall()]
            assert set(audited) == set(self.inserted), (len(audited), len(self.inserted))
            once = sorted(k for k in audited if k not in self.moved)
            assert once == sorted(k for k in self.inserted if k not in self.moved)


def test_a_plain_table_becomes_partitioned_while_writes_go_on(tmp_path: Path, database: str,
                                                             pg_server: Server) -> None:
    run_sql(database, LIVE + ROWS)
    plan = _plan(tmp_path, database, pg_server, PARTITIONED)
    kinds = [s.kind for s in plan.body.steps]
    assert kinds.index("create_trigger") < kinds.index("copy_rows") < kinds.index("catch_up") < kinds.index("cutover") \
        < kinds.index("verify_copy") < kinds.index("contract"), kinds
    # the replay finds the rows it deletes by the new key, which holds the partition key: in one partition each
    (replay,) = [s.sql for s in plan.body.steps if s.kind == "create_function" and "replay" in s.object]
    assert ' k WHERE n."id" = k."id" AND n."created_at" = k."created_at"; INSERT' in replay, replay
    # the index that is no key built once the rows are copied, by one sort, not row by row as the copy goes
    (index,) = [s for s in plan.body.steps if "accounts_name_idx" in s.sql and s.sql.startswith("CREATE INDEX")]
    assert index.kind == "create_index" and kinds.index("copy_rows") < index.index - 1 < kinds.index("catch_up"), kinds
    assert index.sql.startswith('CREATE INDEX IF NOT EXISTS accounts_name_idx ON reconciler_shadow_'), index.sql
    assert not [h for s in plan.body.steps for h in s.hazards if h.code == "TABLE_REWRITE"]
    cutover = [s for s in plan.body.steps if s.kind == "cutover"]
    assert len({s.phase for s in cutover}) == 1 and cutover[0].sql.startswith('LOCK TABLE "public"."ledger", '
                                                                              '"public"."accounts"')
    assert plan.body.rehearsal.status == "converged"
    text, markdown = render_text(plan), render_markdown(plan)
    expand, catch_up = max(i for i, k in enumerate(kinds, 1) if k == "create_trigger"), kinds.index("catch_up") + 1
    assert (f"public.accounts becomes partitioned by RANGE (created_at): ~20,000 rows; expand steps 1-{expand}; "
            f"backfill steps {expand + 1}-{catch_up}, ") in text, text  # the index built after the copy is the fill's
    # every row checked and (from PostgreSQL 18, which can validate a key to a partitioned table later) the foreign
    # key validated after the cut-over; the contract's transaction whole, from the lock it takes first
    checked, locked = kinds.index("verify_copy") + 1, max(i for i, k in enumerate(kinds, 1) if k == "lock_table")
    assert kinds[checked - 1:locked - 1] == ["verify_copy", *(["validate_constraint"] if pg_server.major_version >= 18
                                                              else [])], kinds
    assert f"checked after it: {span(range(checked, locked))}; contract steps {locked}-{len(kinds)}" in text, text
    assert plan.body.steps[locked - 1].phase == plan.body.steps[-1].phase
    assert f"phase {index.phase} (step {index.index}, its own transaction" in text, text  # one step: "step"
    assert "| `public.accounts` becomes partitioned by RANGE (created_at) | 20,000 |" in markdown, markdown

    with _Writers(database) as writers:
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                         backfill=BackfillLimits(batch_seconds=0.01)))
    assert result.status == "applied", result
    writers.check(database)
    assert fetch_one(database, "SELECT relkind::text FROM pg_class WHERE oid = 'accounts'::regclass") == "p"
    assert fetch_one(database, "SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_inherits i JOIN pg_class "
                               "c ON c.oid = i.inhrelid WHERE i.inhparent = 'accounts'::regclass") == \
        "accounts_early,accounts_late"
    assert fetch_one(database, "SELECT count(*) FROM accounts_late WHERE created_at < '2026-01-08'") == 0
    assert fetch_one(database, "SELECT convalidated FROM pg_constraint WHERE conname = 'ledger_account_fkey'") is True
    assert fetch_one(database, "SELECT confrelid = 'accounts'::regclass FROM pg_constraint "
                               "WHERE conname = 'ledger_account_fkey'") is True
    assert fetch_one(database, "SELECT obj_description('accounts'::regclass, 'pg_class')") == "one row per account"
    assert fetch_one(database, "SELECT count(*) FROM rich") == fetch_one(database, "SELECT count(*) FROM accounts "
                                                                                  "WHERE balance > 100")
    assert fetch_one(database, "SELECT count(*) FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid WHERE "
                               "r.ev_class = 'rich'::regclass AND d.refobjid = 'accounts'::regclass") > 0
    assert fetch_one(database, "SELECT count(*) FROM pg_class WHERE relname LIKE '%reconciler%'") == 0
    assert fetch_one(database, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'reconciler_%'") == 0
    assert _plan(tmp_path, database, pg_server, PARTITIONED).body.steps == ()  # converged


def test_a_cut_over_crossed_by_a_writer_taking_its_tables_in_the_other_order_takes_them_in_that_order(
        tmp_path: Path, database: str, pg_server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """The cut-over locks ledger, then accounts (the order of an insert into ledger, which then checks its key); an
    application's transaction inserts an account, then its ledger row. Each attempt of the cut-over, such a
    transaction has its account inserted; the cut-over gets ledger and waits for accounts, the writer's ledger row
    waits for the cut-over: both wait until the cut-over's lock_timeout. Locking in the same order again would cross
    the writer again every time; the next attempt takes accounts first, and goes through."""
    import logging

    run_sql(database, LIVE + ROWS)
    plan = _plan(tmp_path, database, pg_server, PARTITIONED)
    lock = next(s for s in plan.body.steps if s.kind == "cutover")
    assert lock.sql == 'LOCK TABLE "public"."ledger", "public"."accounts" IN ACCESS EXCLUSIVE MODE'
    writer = connect(database, autocommit=False)
    written: list[int] = []
    crossing: list[threading.Thread] = []

    def ledger_row_when_the_cut_over_waits(account: int) -> None:
        with connect(database) as watcher:
            for _ in range(250):
                if watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'reconciler apply' "
                                   "AND wait_event_type = 'Lock'").fetchone() == (1,):
                    break
                time.sleep(0.02)
        writer.execute("INSERT INTO ledger (account_id, account_created_at, amount) SELECT id, created_at, 7 FROM "
                       "accounts WHERE id = %s", (account,))
        writer.commit()
        written.append(account)

    def on_step(step: Step) -> None:
        if step.index != lock.index:
            return
        for thread in crossing:
            thread.join(30)
        account = 900_000 + len(crossing)
        writer.execute("INSERT INTO accounts (id, created_at, name) VALUES (%s, '2026-01-20', 'x')", (account,))
        crossing.append(threading.Thread(target=ledger_row_when_the_cut_over_waits, args=(account,)))
        crossing[-1].start()

    try:
        with caplog.at_level(logging.WARNING, logger="reconciler.apply"):
            result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                             retry_backoff_seconds=0.1, on_step=on_step))
    finally:
        for thread in crossing:
            thread.join(30)
        writer.close()
    assert result.status == "applied", result
    assert "waiting for a lock this step holds" in caplog.text and \
        "locking the tables in the other order: a writer takes them in that order" in caplog.text, caplog.text
    assert len(crossing) == 2 and written == [900_000, 900_001]  # crossed once, then not
    applied = next(r for r in result.steps if r.index == lock.index and r.status == "applied")
    assert applied.sql == "LOCK public.accounts, public.ledger IN ACCESS EXCLUSIVE MODE"  # as it ran
    assert fetch_one(database, "SELECT count(*) FROM ledger WHERE amount = 7 AND account_id >= 900000") == 2
    assert fetch_one(database, "SELECT relkind::text FROM pg_class WHERE oid = 'accounts'::regclass") == "p"


def test_a_copy_killed_part_way_goes_on_from_its_checkpoint(target: Target) -> None:
    """The applier killed while its copy waits for a lock: the new table, the log and the trigger stay (the trigger
    records every write meanwhile); the next plan keeps them, copies the rest from the checkpoint, and swaps."""
    run_sql(target.database, LIVE + ROWS)
    config = target.root / "reconciler.yaml"
    config.write_text("safety:\n  online_rewrite_rows: 1000\n" + config.read_text().replace(
        "    lock_wait: 30s\n", "    lock_wait: 30s\n    backfill: {batch: 5ms}\n"))
    target.desired(TARGET_LIVE_TABLES + PARTITIONED)
    proc = target.start_apply(target.plan())
    target.wait_for("SELECT to_regclass('reconciler.runs') IS NOT NULL", seconds=60)
    target.wait_for("SELECT coalesce(max((backfill->'progress'->>'pages_done')::int), 0) > 0 FROM reconciler.runs "
                    "WHERE status = 'running' AND backfill->'progress'->>'kind' = 'copy_rows'", seconds=60)
    shadow = fetch_one(target.database, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'reconciler_shadow_%'")
    run = target.kill_while_waiting(proc, f'LOCK TABLE "{shadow}".accounts IN SHARE MODE',
                                    'INSERT INTO "reconciler_shadow_%')
    # recorded by the trigger: a new row, a row of a page copied before the kill changed, another deleted
    run_sql(target.database, "INSERT INTO accounts (id, created_at) VALUES (300000, '2026-01-20'); "
                             "UPDATE accounts SET balance = -1 WHERE id = 1; DELETE FROM accounts WHERE id = 2")
    again = target.run("apply", str(target.plan("again.json")), "-v")
    assert again.returncode == 0, again.stderr
    assert f"going on from run {run['id']}'s checkpoint, page " in again.stderr, again.stderr
    assert fetch_one(target.database, "SELECT relkind::text FROM pg_class WHERE oid = 'accounts'::regclass") == "p"
    assert fetch_one(target.database, "SELECT balance FROM accounts WHERE id = 1") == -1
    assert fetch_one(target.database, "SELECT count(*) FROM accounts WHERE id = 2") == 0
    assert fetch_one(target.database, "SELECT count(*) FROM accounts WHERE id = 300000") == 1
    assert fetch_one(target.database, "SELECT count(*) FROM accounts WHERE id > 2 AND id <= 20000 AND balance = id") \
        == 19998
    assert target.run("drift").returncode == 0
    assert fetch_one(target.database, "SELECT count(*) FROM pg_class WHERE relname LIKE '%reconciler%'") == 0
    assert fetch_one(target.database, "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'reconciler_shadow_%'") == 0


def _held(target: Target) -> dict[str, object]:
    """The table made partitioned with its contract held, and a write of each kind made after the cut-over; the run."""
    run_sql(target.database, LIVE + ROWS)
    config = target.root / "reconciler.yaml"
    config.write_text("safety:\n  online_rewrite_rows: 1000\n" + config.read_text())
    target.desired(TARGET_LIVE_TABLES + PARTITIONED)
    applied = target.run("apply", str(target.plan()), "--hold-contract")
    assert applied.returncode == 0, applied.stderr
    assert "Contract held (4 step(s)): public.accounts_reconciler_old_" in applied.stdout, applied.stdout
    assert "in step with the table that took its place" in applied.stdout, applied.stdout
    old = str(fetch_one(target.database, "SELECT relname FROM pg_class WHERE relname LIKE 'accounts_reconciler_old_%' "
                                         "AND relkind = 'r'"))
    run_sql(target.database, "INSERT INTO accounts (id, created_at) VALUES (300000, '2026-01-20'); "
                             "UPDATE accounts SET balance = -1 WHERE id = 19999; DELETE FROM accounts WHERE id = 19998")
    # kept in step in the old table by its trigger
    assert fetch_one(target.database, "SELECT string_agg(id || ':' || balance, ',' ORDER BY id) "
                                      f'FROM "{old}" WHERE id IN (19998, 19999, 300000)') == "19999:-1,300000:0"
    (run,) = target.runs()
    return run


def test_a_held_contract_keeps_the_old_table_in_step_and_rollback_swaps_it_back(target: Target) -> None:
    run = _held(target)
    writers = _Writers(target.database, threads=1)
    with writers:
        back = target.run("rollback", str(run["id"]))
    assert back.returncode == 0, back.stderr
    assert "the way back: a brief exclusive lock" in back.stdout and "copy_rows" not in back.stdout, back.stdout
    assert fetch_one(target.database, "SELECT relkind::text FROM pg_class WHERE oid = 'accounts'::regclass") == "r"
    assert fetch_one(target.database, "SELECT balance FROM accounts WHERE id = 19999") == -1
    assert fetch_one(target.database, "SELECT count(*) FROM accounts WHERE id IN (19998, 300000)") == 1
    assert not writers.failures, writers.failures[:3]
    with connect(target.database) as conn:  # every write made through the way back is there
        for key, state in writers.expected.items():
            row = conn.execute("SELECT balance FROM accounts WHERE id = %s", (key,)).fetchone()
            assert (row is None) if state is None else (row is not None and row[0] == state[0]), (key, state, row)
    assert fetch_one(target.database, "SELECT string_agg(conname || ' ' || convalidated, ', ' ORDER BY conname) FROM "
                                      "pg_constraint WHERE contype IN ('p', 'u', 'f') AND conrelid = "
                                      "ANY('{accounts,ledger}'::regclass[])") == \
        "accounts_id_created_key true, accounts_pkey true, ledger_account_fkey true, ledger_pkey true"
    assert fetch_one(target.database, "SELECT count(*) FROM pg_class WHERE relname LIKE '%reconciler%'") == 0
    assert fetch_one(target.database, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'reconciler_%'") == 0


def test_a_held_contract_is_dropped_by_the_next_plan(target: Target) -> None:
    _held(target)
    again = target.run("apply", str(target.plan("again.json")))
    assert again.returncode == 0, again.stderr
    assert fetch_one(target.database, "SELECT count(*) FROM pg_class WHERE relname LIKE '%reconciler%'") == 0
    assert fetch_one(target.database, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'reconciler_%'") == 0
    assert fetch_one(target.database, "SELECT count(*) FROM accounts") == 20000
    assert fetch_one(target.database, "SELECT relkind::text FROM pg_class WHERE oid = 'accounts'::regclass") == "p"


def test_an_unlogged_table_becomes_logged_while_writes_go_on(tmp_path: Path, database: str,
                                                            pg_server: Server) -> None:
    live = LIVE.replace("CREATE TABLE accounts", "CREATE UNLOGGED TABLE accounts").replace(
        "CREATE TABLE ledger", "CREATE UNLOGGED TABLE ledger")
    run_sql(database, live + ROWS)
    desired = LIVE.replace("CREATE TABLE ledger", "CREATE UNLOGGED TABLE ledger")
    plan = _plan(tmp_path, database, pg_server, desired)
    assert "copy_rows" in [s.kind for s in plan.body.steps]
    assert not [s for s in plan.body.steps if "SET LOGGED" in s.sql]
    with _Writers(database) as writers:
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                         backfill=BackfillLimits(batch_seconds=0.01)))
    assert result.status == "applied", result
    writers.check(database)
    assert fetch_one(database, "SELECT relpersistence::text FROM pg_class WHERE oid = 'accounts'::regclass") == "p"
    small = _plan(tmp_path, database, pg_server, LIVE.replace("CREATE TABLE ledger", "CREATE UNLOGGED TABLE ledger")
                  .replace("CREATE TABLE accounts", "CREATE UNLOGGED TABLE accounts"), rows=1_000_000)
    (step,) = small.body.steps  # a table below the threshold: the plain ALTER, its rewrite named
    assert step.sql.lower() == 'alter table "public"."accounts" set unlogged', step.sql
    assert "TABLE_REWRITE" in {h.code for h in step.hazards}


def test_a_stored_generated_column_is_added_to_a_big_table_while_writes_go_on(tmp_path: Path, database: str,
                                                                           pg_server: Server) -> None:
    run_sql(database, LIVE + ROWS)
    desired = LIVE.replace("balance int NOT NULL DEFAULT 0);", "balance int NOT NULL DEFAULT 0,\n"
                           "    doubled bigint GENERATED ALWAYS AS (balance * 2) STORED);")
    small = _plan(tmp_path, database, pg_server, desired, rows=1_000_000)  # the plain ALTER, its rewrite named
    assert [s.kind for s in small.body.steps] == ["add_column"], [s.sql for s in small.body.steps]
    assert "TABLE_REWRITE" in {h.code for h in small.body.steps[0].hazards}
    plan = _plan(tmp_path, database, pg_server, desired)
    assert "copy_rows" in [s.kind for s in plan.body.steps]
    assert "public.accounts gains the stored generated column doubled: ~20,000 rows" in render_text(plan)
    with _Writers(database) as writers:
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                         backfill=BackfillLimits(batch_seconds=0.01)))
    assert result.status == "applied", result
    writers.check(database)
    assert fetch_one(database, "SELECT count(*) FROM accounts WHERE doubled IS DISTINCT FROM balance * 2") == 0


def test_a_small_table_is_built_again_in_one_transaction(tmp_path: Path, database: str, pg_server: Server) -> None:
    run_sql(database, LIVE + ROWS)
    plan = _plan(tmp_path, database, pg_server, PARTITIONED, rows=1_000_000)
    assert len({s.phase for s in plan.body.steps}) == 1 and "copy_rows" not in [s.kind for s in plan.body.steps]
    assert "TABLE_REWRITE" in {h.code for s in plan.body.steps for h in s.hazards}
    result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler"))
    assert result.status == "applied", result
    assert fetch_one(database, "SELECT count(*) FROM accounts WHERE balance = id") == 20000
    assert fetch_one(database, "SELECT count(*) FROM ledger l JOIN accounts a ON (a.id, a.created_at) = "
                               "(l.account_id, l.account_created_at)") == 2000


def test_a_new_partition_key_is_taken_from_the_old_partitions(tmp_path: Path, database: str, pg_server: Server) -> None:
    live = PARTITIONED.replace("accounts_early", "accounts_a").replace("accounts_late", "accounts_b")
    run_sql(database, live + ROWS)
    desired = PARTITIONED.replace("PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at)",
                                  "PRIMARY KEY (id, created_at)) PARTITION BY HASH (id)").replace(
        "FOR VALUES FROM (MINVALUE) TO ('2026-01-08 00:00+00')", "FOR VALUES WITH (MODULUS 2, REMAINDER 0)").replace(
        "FOR VALUES FROM ('2026-01-08 00:00+00') TO (MAXVALUE)", "FOR VALUES WITH (MODULUS 2, REMAINDER 1)")
    plan = _plan(tmp_path, database, pg_server, desired)
    assert [s.object for s in plan.body.steps if s.kind == "copy_rows"] == ["public.accounts_a", "public.accounts_b"]
    with _Writers(database) as writers:
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                         backfill=BackfillLimits(batch_seconds=0.01)))
    assert result.status == "applied", result
    writers.check(database)
    assert fetch_one(database, "SELECT pg_get_partkeydef('accounts'::regclass)") == "HASH (id)"


@pytest.mark.parametrize(("desired", "message"), [
    (PARTITIONED.replace("name text, ", "").replace("CREATE INDEX accounts_name_idx ON accounts (name);", ""),
     "the desired table has no column name"),
    (PARTITIONED.replace("CREATE INDEX accounts_name_idx ON accounts (name);",
                         "CREATE MATERIALIZED VIEW named AS SELECT id, name FROM accounts;"),
     "materialized view public.named"),
    (PARTITIONED.replace("balance int NOT NULL DEFAULT 0,", "balance bigint NOT NULL DEFAULT 0,"),
     "changes the type of balance too"),
    (PARTITIONED.replace("balance int NOT NULL DEFAULT 0,", "balance int NOT NULL DEFAULT 0, region text NOT NULL,"),
     "its new column region is NOT NULL without a default"),
    (PARTITIONED.replace("CREATE TABLE ledger (", "CREATE TABLE ledger_x (").replace("ALTER TABLE ledger ", "ALTER TABLE "
                         "ledger_x ").replace("CREATE TABLE accounts_late PARTITION", "CREATE TABLE ledger PARTITION"),
     "its new partition public.ledger has a name live already uses"),
])
def test_what_the_new_table_cannot_take_over_is_refused(tmp_path: Path, database: str, pg_server: Server,
                                                        desired: str, message: str) -> None:
    run_sql(database, LIVE + ROWS)
    with pytest.raises(ReconcilerError, match=r"cannot rebuild table public\.accounts, which becomes partitioned") as err:
        _plan(tmp_path, database, pg_server, desired)
    assert message in str(err.value), err.value
    assert fetch_one(database, "SELECT count(*) FROM accounts") == 20000


def test_the_row_check_counts_each_row_missing_or_different_in_a_range_of_pages(database: str) -> None:
    """The check a cut-over's copy must pass (and the way back's): a row the new table lacks, or holds otherwise,
    is counted, NULLs compare equal, and only the range of pages apply adds is looked at."""
    from psycopg import sql

    from reconciler.safety.shadow_table import rows_missing

    run_sql(database, """
        CREATE TABLE old_rows (id bigint PRIMARY KEY, at date NOT NULL, note text);
        INSERT INTO old_rows SELECT g, date '2025-01-01' + g % 300, CASE WHEN g % 3 = 0 THEN NULL ELSE 'n' || g END
        FROM generate_series(1, 5000) g;
        CREATE TABLE new_rows (id bigint, at date NOT NULL, note text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
        CREATE TABLE new_rows_a PARTITION OF new_rows FOR VALUES FROM ('2025-01-01') TO ('2025-06-01');
        CREATE TABLE new_rows_b PARTITION OF new_rows DEFAULT;
        INSERT INTO new_rows SELECT * FROM old_rows;
        DELETE FROM new_rows WHERE id = 10; UPDATE new_rows SET note = 'changed' WHERE id = 20;
        UPDATE new_rows SET note = NULL WHERE id = 4001; ANALYZE old_rows, new_rows;""")
    check = rows_missing(sql.Identifier("public", "old_rows"), sql.Identifier("public", "new_rows"), ("id", "at"),
                         ("id", "at", "note"))
    pages = "SELECT (ctid::text::point)[0]::int FROM old_rows WHERE id = %s"
    first, last = (fetch_one(database, pages % n) for n in (20, 4001))
    assert isinstance(first, int) and isinstance(last, int) and first < last
    assert fetch_one(database, check) == 3  # rows 10 (missing), 20 and 4001; not the 1,666 NULL notes
    assert fetch_one(database, check + f" AND ctid >= '({first},0)'::tid AND ctid < '({first + 1},0)'::tid") == 2
    assert fetch_one(database, check + f" AND ctid >= '({last},0)'::tid AND ctid < '({last + 1},0)'::tid") == 1
    assert fetch_one(database, check + f" AND ctid >= '({last + 1},0)'::tid") == 0


def test_a_cut_over_that_cannot_get_its_lock_keeps_the_copy_for_the_next_plan(tmp_path: Path, database: str,
                                                                               pg_server: Server) -> None:
    """A reader holds the table past every retry of the cut-over: the run fails and the copy stays, its trigger
    logging every write; the next plan goes on with it, replays what was written meanwhile, and swaps."""
    run_sql(database, LIVE + ROWS)
    failed = apply_with_cutover_blocked(_plan(tmp_path, database, pg_server, PARTITIONED), database, "accounts")
    assert "gave up after 2 attempts" in failed and "the rows filled or copied are kept" in failed, failed
    shadow = fetch_one(database, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'reconciler_shadow_%'")
    assert isinstance(shadow, str) and fetch_one(database, f'SELECT count(*) FROM "{shadow}".accounts') == 20000
    run_sql(database, "INSERT INTO accounts (id, created_at) VALUES (300000, '2026-01-20'); "
                      "UPDATE accounts SET balance = -1 WHERE id = 1; DELETE FROM accounts WHERE id = 2")
    again = _plan(tmp_path, database, pg_server, PARTITIONED, rows=1000)
    assert apply_plan(again, database, ApplyOptions(environment="test", metadata_schema="reconciler")).status == "applied"
    assert fetch_one(database, "SELECT relkind::text FROM pg_class WHERE oid = 'accounts'::regclass") == "p"
    assert fetch_one(database, "SELECT balance FROM accounts WHERE id = 1") == -1
    assert fetch_one(database, "SELECT count(*) FROM accounts WHERE id IN (2, 300000)") == 1
    assert fetch_one(database, "SELECT count(*) FROM accounts WHERE id > 2 AND id <= 20000 AND balance = id") == 19998
    assert fetch_one(database, "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'reconciler_shadow_%'") == 0


# --- identity columns: the new table's sequence goes on from the old one's ----------------------------------------

EVENTS = """
CREATE {persistence}TABLE events (id bigint GENERATED ALWAYS AS IDENTITY (START WITH 7 INCREMENT BY 3), at timestamptz
    NOT NULL DEFAULT '2026-01-05 00:00+00', note text, PRIMARY KEY (id{key})){partitioned};
{partitions}"""
BY_TIME = dict(persistence="", key=", at", partitioned=" PARTITION BY RANGE (at)", partitions=(
    "CREATE TABLE events_early PARTITION OF events FOR VALUES FROM (MINVALUE) TO ('2026-01-03 00:00+00');\n"
    "CREATE TABLE events_late PARTITION OF events FOR VALUES FROM ('2026-01-03 00:00+00') TO (MAXVALUE);\n"))


def _inserting(database: str, stop: threading.Event, ids: list[int], failures: list[str]) -> None:
    with connect(database) as conn:
        while not stop.is_set():
            try:
                row = conn.execute("INSERT INTO events (note) VALUES ('w') RETURNING id").fetchone()
                ids.append(int(row[0]) if row else 0)
            except psycopg.Error as exc:
                failures.append(str(exc))
                return


@pytest.mark.parametrize("change", ["made logged", "made partitioned", "made partitioned, small",
                                    "made partitioned, held, then swapped back"])
def test_an_identity_column_goes_on_from_its_sequence_through_the_swap(tmp_path: Path, database: str,
                                                                       pg_server: Server, change: str) -> None:
    """A table with an identity key (GENERATED ALWAYS), built again while an application inserts, leaving the key to
    it: the rows keep their values, the new table's sequence (its name the same) goes on from the old one's, so no
    key is given twice; the same through the way back, and for a table small enough to be built in one transaction."""
    partitioned = "partitioned" in change
    with connect(database) as conn:
        if partitioned and conn.info.server_version < 170000:
            pytest.skip("a partitioned table takes an identity column from PostgreSQL 17")
    live = EVENTS.format(persistence="UNLOGGED " if not partitioned else "", key="", partitioned="", partitions="")
    run_sql(database, live + "INSERT INTO events (note) SELECT 'n' || g FROM generate_series(1, 20000) g; ANALYZE events;")
    desired = EVENTS.format(**BY_TIME) if partitioned else live.replace("UNLOGGED ", "")
    plan = _plan(tmp_path, database, pg_server, desired, rows=1_000_000 if "small" in change else 1000)
    kinds = [s.kind for s in plan.body.steps]
    assert ("rebuild_table" in kinds and "copy_rows" not in kinds) if "small" in change else "copy_rows" in kinds, kinds
    assert plan.body.rehearsal.status == "converged", plan.body.rehearsal
    stop, ids, failures = threading.Event(), [], []
    writer = threading.Thread(target=_inserting, args=(database, stop, ids, failures))
    writer.start()
    try:
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                         backfill=BackfillLimits(batch_seconds=0.01),
                                                         hold_contract="held" in change))
        assert result.status == "applied", result
        if "swapped back" in change:
            back = _plan(tmp_path, database, pg_server, live)
            assert "copy_rows" not in [s.kind for s in back.body.steps], [s.sql for s in back.body.steps]
            assert apply_plan(back, database, ApplyOptions(environment="test", metadata_schema="reconciler")).status \
                == "applied"
    finally:
        stop.set()
        writer.join(timeout=60)
    assert not failures and ids, failures[:3]
    final = live if "swapped back" in change else desired
    assert fetch_one(database, "SELECT relkind::text FROM pg_class WHERE oid = 'events'::regclass") == \
        ("p" if partitioned and "swapped back" not in change else "r")
    assert fetch_one(database, "SELECT pg_get_serial_sequence('events', 'id')") == "public.events_id_seq"
    assert fetch_one(database, f"SELECT count(*) FROM events WHERE id = ANY('{{{','.join(map(str, ids))}}}'::bigint[])") \
        == len(ids)  # every insert acknowledged
    assert fetch_one(database, f"SELECT count(*) = count(DISTINCT id) AND count(*) = {20000 + len(ids)} FROM events") is True
    after = fetch_one(database, "INSERT INTO events (note) VALUES ('after') RETURNING id")
    assert isinstance(after, int) and after > max(ids) and (after - 7) % 3 == 0, (after, max(ids))
    assert fetch_one(database, "SELECT count(*) FROM pg_class WHERE relname LIKE '%reconciler%'") == 0
    assert _plan(tmp_path, database, pg_server, final).body.steps == ()  # converged


@pytest.mark.parametrize(("live", "desired", "message"), [
    ("id bigint PRIMARY KEY", "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
     "the desired table makes id an identity column too"),
    ("id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "id bigint PRIMARY KEY",
     "the desired table no longer makes id an identity column too"),
    ("id bigint GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME events_ids) PRIMARY KEY",
     "id bigint GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME events_ids) PRIMARY KEY",
     "the sequence of its identity column id is public.events_ids, not events_id_seq"),
])
def test_an_identity_column_the_rebuild_cannot_carry_over_is_refused(tmp_path: Path, database: str, pg_server: Server,
                                                                     live: str, desired: str, message: str) -> None:
    run_sql(database, f"CREATE UNLOGGED TABLE events ({live}, note text);"
                      "INSERT INTO events OVERRIDING SYSTEM VALUE SELECT g, 'n' FROM generate_series(1, 2000) g;")
    with pytest.raises(ReconcilerError, match=r"cannot rebuild table public\.events, which becomes logged") as err:
        _plan(tmp_path, database, pg_server, f"CREATE TABLE events ({desired}, note text);")
    assert message in str(err.value), err.value
    assert fetch_one(database, "SELECT count(*) FROM events") == 2000
