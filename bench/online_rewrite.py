"""Online rewrites under write load: a big table's ``integer`` primary key becomes ``bigint``, with the column of a
second table that references it (``--case key``, the default), or an indexed ``integer`` column no key involves
(``--case column``), or the table becomes partitioned by range on a timestamp column (``--case partition``; the
second table's foreign key references its (id, created_at)), while writers keep updating the table and inserting rows
that reference it.

The same change is applied twice, each time to a fresh copy of the same database:

- ``raw ALTER``: migra's statements as migra's users run them (ALTER TABLEs that rewrite the tables). No ALTER makes
  a table partitioned (migra's own statements drop it and its rows), so for ``partition`` the raw side is the same
  rebuild done in one transaction under an exclusive lock, as a person would run it by hand (reconciler's plan for a
  table below ``safety.online_rewrite_rows``: rename, create, INSERT ... SELECT, re-point the key, drop);
- ``compiled plan``: reconciler's plan (dual columns: filled in batches, checked, cut over in one short
  transaction, the keys rebuilt and re-pointed; a shadow table: copied by page ranges while a trigger logs writes,
  the log replayed, swapped in one short transaction; see README "Changing a big table's column type without
  stopping writes"), applied by ``reconciler.apply.apply_plan``.

Each writer, back to back: one UPDATE of a random account's balance and one INSERT into the ledger that references
it, each timed. After each mode the databases are checked for every acknowledged write (ledger rows, balances'
sum), every ledger row still joined to its account, both keys valid, and the columns' types. The figures: the
longest single write (stall), p99, the longest gap between two completed writes, the apply's time. A benchmark,
not a test: it asserts nothing about timings.

    .venv/bin/python bench/online_rewrite.py                  # 5,000,000 accounts, 1,000,000 ledger rows, 4 writers
    .venv/bin/python bench/online_rewrite.py --case column
    .venv/bin/python bench/online_rewrite.py --case partition
    .venv/bin/python bench/online_rewrite.py --rows 500000 --writers 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import random
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from write_availability import WriterLog, benchmark_server, cloned_database, summarise

from reconciler.apply import ApplyOptions, BackfillLimits, apply_plan
from reconciler.config import load_config
from reconciler.pipeline import make_plan, open_servers
from reconciler.plan import Plan
from reconciler.servers import connect, throwaway_database

log = logging.getLogger("bench.online_rewrite")

LIVE_SQL = """
CREATE TABLE accounts (id integer PRIMARY KEY, balance integer NOT NULL DEFAULT 0, note text);
CREATE INDEX accounts_balance_idx ON accounts (balance);
CREATE TABLE ledger (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     account_id integer NOT NULL REFERENCES accounts (id), amount integer NOT NULL);
CREATE INDEX ledger_account_id_idx ON ledger (account_id);
"""
PARTITION_LIVE_SQL = """
CREATE TABLE accounts (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, balance integer NOT NULL DEFAULT 0,
                       note text, CONSTRAINT accounts_id_created_at_key UNIQUE (id, created_at));
CREATE INDEX accounts_balance_idx ON accounts (balance);
CREATE TABLE ledger (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, account_id bigint NOT NULL,
                     account_created_at timestamptz NOT NULL, amount integer NOT NULL,
                     CONSTRAINT ledger_account_id_fkey FOREIGN KEY (account_id, account_created_at)
                         REFERENCES accounts (id, created_at));
CREATE INDEX ledger_account_id_idx ON ledger (account_id, account_created_at);
"""
PARTITIONED_SQL = PARTITION_LIVE_SQL.replace(
    "id bigint PRIMARY KEY, created_at timestamptz NOT NULL", "id bigint NOT NULL, created_at timestamptz NOT NULL").replace(
    "CONSTRAINT accounts_id_created_at_key UNIQUE (id, created_at));",
    "CONSTRAINT accounts_pkey PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);\n" + "".join(
        f"CREATE TABLE accounts_2025_q{q} PARTITION OF accounts FOR VALUES FROM ('2025-{3 * q - 2:02d}-01 00:00+00') "
        f"TO ('{'2026-01' if q == 4 else f'2025-{3 * q + 1:02d}'}-01 00:00+00');\n" for q in range(1, 5))
    + "CREATE TABLE accounts_later PARTITION OF accounts DEFAULT;")
CREATED_AT = "timestamptz '2025-01-01 00:00+00' + ({} %% 365) * interval '1 day'"  # an account's, from its id


@dataclass(frozen=True)
class Case:
    live_sql: str
    desired_sql: str
    raw: tuple[str, ...]  # migra's statements; () where none does it: the rebuild in one transaction instead
    columns: tuple[tuple[str, str], ...]  # (table, column) whose types the end state shows
    load: str  # the accounts' rows (%s: how many)
    ledger_load: str  # (%s: accounts, ledger rows)
    ledger_insert: str  # a writer's (%s: the account)
    join: str  # a ledger row with its account
    keys: tuple[str, str]  # the primary key and the foreign key, by name


_INTEGER: dict[str, Any] = dict(load="INSERT INTO accounts SELECT g, g %% 1000, 'n' FROM generate_series(1, %s) g",
                ledger_load="INSERT INTO ledger (account_id, amount) SELECT 1 + g %% %s, 1 FROM generate_series(1, %s) g",
                ledger_insert="INSERT INTO ledger (account_id, amount) VALUES (%s, 1) RETURNING id",
                join="a.id = l.account_id", keys=("accounts_pkey", "ledger_account_id_fkey"))
# what changes, and migra's statements for it (what its users run)
CASES = {
    "key": Case(  # the primary key and the foreign key that references it
        LIVE_SQL, LIVE_SQL.replace("id integer PRIMARY KEY", "id bigint PRIMARY KEY").replace("account_id integer",
                                                                                              "account_id bigint"),
        ('alter table "public"."accounts" alter column "id" set data type bigint using "id"::bigint',
         'alter table "public"."ledger" alter column "account_id" set data type bigint using "account_id"::bigint'),
        (("accounts", "id"), ("ledger", "account_id")), **_INTEGER),
    "column": Case(  # an indexed column no key involves
        LIVE_SQL, LIVE_SQL.replace("balance integer", "balance bigint"),
        ('alter table "public"."accounts" alter column "balance" set data type bigint using "balance"::bigint',),
        (("accounts", "balance"),), **_INTEGER),
    "partition": Case(  # the table partitioned by range on created_at (a quarter of 2025 each, and a default one)
        PARTITION_LIVE_SQL, PARTITIONED_SQL, (), (),
        load=f"INSERT INTO accounts SELECT g, {CREATED_AT.format('g')}, g %% 1000, 'n' FROM generate_series(1, %s) g",
        ledger_load=f"INSERT INTO ledger (account_id, account_created_at, amount) SELECT 1 + g %% %s, "
                    f"{CREATED_AT.format('(1 + g %% %s)')}, 1 FROM generate_series(1, %s) g",
        ledger_insert=f"INSERT INTO ledger (account_id, account_created_at, amount) VALUES (%s, "
                      f"{CREATED_AT.format('%s::bigint')}, 1) RETURNING id",
        join="(a.id, a.created_at) = (l.account_id, l.account_created_at)",
        keys=("accounts_pkey", "ledger_account_id_fkey")),
}


@dataclass
class Writes:
    """What the writers had acknowledged: ledger ids inserted, balance increments made."""

    ledger: list[int] = field(default_factory=list)
    increments: int = 0
    log: WriterLog = field(default_factory=WriterLog)
    lock: threading.Lock = field(default_factory=threading.Lock)


def writer(dsn: str, case: Case, rows: int, seed: int, writes: Writes, stop: threading.Event,
           ready: threading.Barrier, rate: float = 0.0) -> None:
    """Back to back (``rate`` 0), or ``rate`` pairs of writes a second: a pair due while the last one waited is
    not made up for after (a client that gave up), so the writers never queue a burst."""
    rng = random.Random(seed)
    with connect(dsn, application_name="bench writer") as conn:
        ready.wait()
        due = time.perf_counter()
        while not stop.is_set():
            if rate > 0:
                due = max(due + 1.0 / rate, time.perf_counter())
                time.sleep(max(0.0, due - time.perf_counter()))
            account = rng.randint(1, rows)
            inserted = (account, account) if "account_created_at" in case.ledger_insert else (account,)
            for statement, params in (("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (account,)),
                                      (case.ledger_insert, inserted)):
                t0 = time.perf_counter()
                try:
                    cursor = conn.execute(statement, params, prepare=True)
                    row = cursor.fetchone() if statement.startswith("INSERT") else None
                except psycopg.Error as exc:
                    with writes.lock:
                        writes.log.errors.append(f"{type(exc).__name__}: {str(exc).strip()}")
                    continue
                t1 = time.perf_counter()
                with writes.lock:
                    writes.log.started.append(t0)
                    writes.log.latencies.append(t1 - t0)
                    if row is not None:
                        writes.ledger.append(int(row[0]))
                    else:
                        writes.increments += 1


def under_load(dsn: str, case: Case, rows: int, writers: int, lead: float, tail: float, apply: Callable[[], None],
               rate: float = 0.0) -> tuple[Writes, float, float]:
    writes, stop = Writes(), threading.Event()
    ready = threading.Barrier(writers + 1)
    threads = [threading.Thread(target=writer, args=(dsn, case, rows, 1000 + i, writes, stop, ready, rate), daemon=True)
               for i in range(writers)]
    for thread in threads:
        thread.start()
    ready.wait()
    try:
        time.sleep(lead)
        started = time.perf_counter()
        apply()
        ended = time.perf_counter()
        time.sleep(tail)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return writes, started, ended


def check_end(dsn: str, balance_before: int, ledger_before: int, writes: Writes, case: Case) -> str:
    """Every acknowledged write there, every ledger row still joined to its account, the keys valid, the types (or
    the partitions)."""
    with connect(dsn) as conn:
        found = conn.execute("SELECT count(*) FROM ledger WHERE id = ANY(%s)", (writes.ledger,)).fetchone()
        total = conn.execute("SELECT sum(balance) FROM accounts").fetchone()
        joined = conn.execute(f"SELECT count(*) FROM ledger l JOIN accounts a ON {case.join}".encode()).fetchone()
        kinds = [conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
                              "AND attname = %s", (table, column)).fetchone() for table, column in case.columns]
        keys = conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = ANY(%s) AND convalidated AND "
                            "conparentid = 0", (list(case.keys),)).fetchone()
        parts = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'accounts'::regclass").fetchone()
    lost_inserts = len(writes.ledger) - int(found[0] if found else 0)
    lost_updates = balance_before + writes.increments - int(total[0] if total and total[0] is not None else 0)
    unjoined = ledger_before + len(writes.ledger) - int(joined[0] if joined else 0)
    shape = ", ".join(f"{column} {kind[0] if kind else '?'}" for (_table, column), kind in zip(case.columns, kinds,
                                                                                                strict=True))
    shape = shape or f"accounts in {int(parts[0]) if parts else 0} partitions"
    return (f"{shape}; {int(keys[0]) if keys else 0}/2 keys valid; writes lost: {lost_inserts} inserts, "
            f"{lost_updates} updates (of {len(writes.ledger):,} and {writes.increments:,} acknowledged); "
            f"ledger rows without their account: {unjoined}")


def plan_for(server_dsn: str, live: str, desired_sql: str, root: Path, *, online_rows: int | None = None) -> Plan:
    """reconciler's plan from ``live`` to ``desired_sql`` (``online_rows``: safety.online_rewrite_rows)."""
    (root / "schemas").mkdir(exist_ok=True)
    (root / "schemas" / "schema.sql").write_text(desired_sql)
    safety = f"safety:\n  online_rewrite_rows: {online_rows}\n" if online_rows is not None else ""
    (root / "reconciler.yaml").write_text(safety + textwrap.dedent(f"""\
        environments:
          bench:
            database: "{live}"
            shadow: "{server_dsn}"
            require_signed_plans: false
            backup: none
        """))
    config = load_config(root / "reconciler.yaml")
    env = config.environment("bench")
    with open_servers(config, env) as servers:
        return make_plan(config, env, servers).plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="pairs of writes a second per writer (default 0: back to back, as fast as the server takes them)")
    parser.add_argument("--lead", type=float, default=2.0, help="seconds of writes before the change")
    parser.add_argument("--tail", type=float, default=2.0, help="seconds of writes after it")
    parser.add_argument("--batch", type=float, default=0.2, help="seconds each backfill batch should take (default 0.2, as apply's)")
    parser.add_argument("--fill-workers", type=int, default=BackfillLimits().workers,
                        help="backfill batches run side by side (default as apply's, backfill.workers)")
    parser.add_argument("--case", choices=sorted(CASES), default="key",
                        help="key: accounts.id (the primary key) and ledger.account_id (its foreign key) int to bigint; "
                             "column: accounts.balance (indexed) int to bigint; partition: accounts partitioned by "
                             "range on created_at")
    parser.add_argument("--ledger-rows", type=int, default=None, help="ledger rows at the start (default: rows / 5)")
    parser.add_argument("--verbose", "-v", action="store_true", help="the apply's log: each step's time, the fill's progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if args.verbose:
        logging.getLogger("reconciler.apply").setLevel(logging.INFO)
    case = CASES[args.case]
    ledger_rows = args.rows // 5 if args.ledger_rows is None else args.ledger_rows
    with benchmark_server() as server, throwaway_database(server, "rewrite_live") as template:
        print(f"loading {args.rows:,} accounts ...", file=sys.stderr)
        with connect(template) as conn:
            conn.execute(case.live_sql.encode())
            conn.execute(case.load.encode(), (args.rows,))
            ledger_params = (args.rows, args.rows, ledger_rows) if case.ledger_load.count("%s") == 3 \
                else (args.rows, ledger_rows)
            conn.execute(case.ledger_load.encode(), ledger_params)
            conn.execute("VACUUM (ANALYZE) accounts, ledger")
        with connect(template) as conn:
            row = conn.execute("SELECT sum(balance) FROM accounts").fetchone()
            before = int(row[0]) if row else 0

        def apply(plan: Plan, live: str) -> Callable[[], None]:
            def run() -> None:
                result = apply_plan(plan, live, ApplyOptions(environment="bench", metadata_schema="reconciler",
                                                             backfill=BackfillLimits(batch_seconds=args.batch,
                                                                                      workers=args.fill_workers)))
                if result.status != "applied":
                    raise RuntimeError(f"the plan ended {result.status}")
            return run

        results, errors = [], []
        with cloned_database(server, template, "raw") as live, tempfile.TemporaryDirectory() as folder:
            print("raw ALTER under load ...", file=sys.stderr)
            if case.raw:
                def raw() -> None:
                    with connect(live) as conn, conn.transaction():  # migra's output run as one script
                        for statement in case.raw:
                            conn.execute(statement.encode())
                statements = case.raw
            else:  # the rebuild in one transaction: the plan for a table below the online threshold
                offline = plan_for(server.dsn, live, case.desired_sql, Path(folder), online_rows=10**12)
                raw, statements = apply(offline, live), tuple(s.sql for s in offline.body.steps)
            writes, started, ended = under_load(live, case, args.rows, args.writers, args.lead, args.tail, raw, args.rate)
            results.append((summarise("raw ALTER", writes.log, started, ended, tuple((s, 0.0) for s in statements)),
                            check_end(live, before, ledger_rows, writes, case)))
            errors.append(writes.log.errors)
        with cloned_database(server, template, "plan") as live, tempfile.TemporaryDirectory() as folder:
            print("planning ...", file=sys.stderr)
            planned = time.perf_counter()
            plan = plan_for(server.dsn, live, case.desired_sql, Path(folder))
            planned = time.perf_counter() - planned
            print(f"planned in {planned:.1f}s: {', '.join(s.kind for s in plan.body.steps)}", file=sys.stderr)
            print("compiled plan under load ...", file=sys.stderr)
            writes, started, ended = under_load(live, case, args.rows, args.writers, args.lead, args.tail,
                                                apply(plan, live), args.rate)
            results.append((summarise("compiled plan", writes.log, started, ended,
                                      tuple((s.sql, 0.0) for s in plan.body.steps)),
                            check_end(live, before, ledger_rows, writes, case)))
            errors.append(writes.log.errors)
    pace = f"{args.rate:g} pairs/s each" if args.rate > 0 else "back to back"
    print(f"\ncase {args.case}: {args.rows:,} accounts, {ledger_rows:,} ledger rows, {args.writers} writers (each: an UPDATE "
          f"of accounts.balance, an INSERT into ledger; {pace}); backfill batches of about {args.batch}s, "
          f"{args.fill_workers} at a time")
    print(f"{'mode':<14} {'apply s':>8} {'writes':>8} {'stall ms':>9} {'p99 ms':>8} {'gap ms':>8} {'errors':>6}  end state")
    for result, end in results:
        print(f"{result.mode:<14} {result.apply_seconds:>8.1f} {result.inserts:>8,} {result.stall_ms:>9.0f} "
              f"{result.p99_ms:>8.1f} {result.gap_ms:>8.0f} {result.errors:>6}  {end}")
    for (result, _end), failed in zip(results, errors, strict=True):
        for message, count in collections.Counter(m.splitlines()[0] for m in failed).most_common():
            print(f"  {result.mode} writers' error, {count}x: {message}")
    raw_result, plan_result = results[0][0], results[1][0]
    print(f"\nlongest stall: {plan_result.stall_ms:.0f} ms vs raw ALTER's {raw_result.stall_ms:.0f} ms "
          f"({raw_result.stall_ms / plan_result.stall_ms:.0f}x shorter); total time {plan_result.apply_seconds:.1f} s vs "
          f"{raw_result.apply_seconds:.1f} s ({plan_result.apply_seconds / raw_result.apply_seconds:.1f}x)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
