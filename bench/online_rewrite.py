"""Online column rewrites under write load: a big table's ``integer`` primary key becomes ``bigint``, with the
column of a second table that references it (``--case key``, the default), or an indexed ``integer`` column no key
involves (``--case column``), while writers keep updating the table and inserting rows that reference it.

The same change is applied twice, each time to a fresh copy of the same database:

- ``raw ALTER``: migra's statements as migra's users run them (ALTER TABLEs that rewrite the tables);
- ``compiled plan``: reconciler's plan (dual columns: filled in batches, checked, cut over in one short
  transaction, the keys rebuilt and re-pointed; see README "Changing a big table's column type without stopping
  writes"), applied by ``reconciler.apply.apply_plan``.

Each writer, back to back: one UPDATE of a random account's balance and one INSERT into the ledger that references
it, each timed. After each mode the databases are checked for every acknowledged write (ledger rows, balances'
sum), every ledger row still joined to its account, both keys valid, and the columns' types. The figures: the
longest single write (stall), p99, the longest gap between two completed writes, the apply's time. A benchmark,
not a test: it asserts nothing about timings.

    .venv/bin/python bench/online_rewrite.py                  # 5,000,000 accounts, 1,000,000 ledger rows, 4 writers
    .venv/bin/python bench/online_rewrite.py --case column
    .venv/bin/python bench/online_rewrite.py --rows 500000 --writers 2
"""

from __future__ import annotations

import argparse
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

import psycopg
from write_availability import WriterLog, benchmark_server, cloned_database, summarise

from reconciler.apply import ApplyOptions, BackfillLimits, apply_plan
from reconciler.config import load_config
from reconciler.pipeline import make_plan, open_servers
from reconciler.servers import connect, throwaway_database

log = logging.getLogger("bench.online_rewrite")

LIVE_SQL = """
CREATE TABLE accounts (id integer PRIMARY KEY, balance integer NOT NULL DEFAULT 0, note text);
CREATE INDEX accounts_balance_idx ON accounts (balance);
CREATE TABLE ledger (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     account_id integer NOT NULL REFERENCES accounts (id), amount integer NOT NULL);
CREATE INDEX ledger_account_id_idx ON ledger (account_id);
"""
# what changes, and migra's statements for it (what its users run)
CASES = {
    "key": (  # the primary key and the foreign key that references it
        LIVE_SQL.replace("id integer PRIMARY KEY", "id bigint PRIMARY KEY").replace("account_id integer", "account_id bigint"),
        ('alter table "public"."accounts" alter column "id" set data type bigint using "id"::bigint',
         'alter table "public"."ledger" alter column "account_id" set data type bigint using "account_id"::bigint')),
    "column": (  # an indexed column no key involves
        LIVE_SQL.replace("balance integer", "balance bigint"),
        ('alter table "public"."accounts" alter column "balance" set data type bigint using "balance"::bigint',)),
}
COLUMNS = {"key": (("accounts", "id"), ("ledger", "account_id")), "column": (("accounts", "balance"),)}


@dataclass
class Writes:
    """What the writers had acknowledged: ledger ids inserted, balance increments made."""

    ledger: list[int] = field(default_factory=list)
    increments: int = 0
    log: WriterLog = field(default_factory=WriterLog)
    lock: threading.Lock = field(default_factory=threading.Lock)


def writer(dsn: str, rows: int, seed: int, writes: Writes, stop: threading.Event, ready: threading.Barrier) -> None:
    rng = random.Random(seed)
    with connect(dsn, application_name="bench writer") as conn:
        ready.wait()
        while not stop.is_set():
            account = rng.randint(1, rows)
            for statement, params in (("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (account,)),
                                      ("INSERT INTO ledger (account_id, amount) VALUES (%s, 1) RETURNING id", (account,))):
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


def under_load(dsn: str, rows: int, writers: int, lead: float, tail: float, apply: Callable[[], None]
               ) -> tuple[Writes, float, float]:
    writes, stop = Writes(), threading.Event()
    ready = threading.Barrier(writers + 1)
    threads = [threading.Thread(target=writer, args=(dsn, rows, 1000 + i, writes, stop, ready), daemon=True)
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


def check_end(dsn: str, balance_before: int, ledger_before: int, writes: Writes, case: str) -> str:
    """Every acknowledged write there, every ledger row still joined to its account, the keys valid, the types."""
    with connect(dsn) as conn:
        found = conn.execute("SELECT count(*) FROM ledger WHERE id = ANY(%s)", (writes.ledger,)).fetchone()
        total = conn.execute("SELECT sum(balance) FROM accounts").fetchone()
        joined = conn.execute("SELECT count(*) FROM ledger l JOIN accounts a ON a.id = l.account_id").fetchone()
        kinds = [conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
                              "AND attname = %s", (table, column)).fetchone() for table, column in COLUMNS[case]]
        keys = conn.execute("SELECT count(*) FROM pg_constraint WHERE conname IN ('accounts_pkey', "
                            "'ledger_account_id_fkey') AND convalidated").fetchone()
    lost_inserts = len(writes.ledger) - int(found[0] if found else 0)
    lost_updates = balance_before + writes.increments - int(total[0] if total and total[0] is not None else 0)
    unjoined = ledger_before + len(writes.ledger) - int(joined[0] if joined else 0)
    types = ", ".join(f"{column} {kind[0] if kind else '?'}" for (_table, column), kind in zip(COLUMNS[case], kinds,
                                                                                                strict=True))
    return (f"{types}; {int(keys[0]) if keys else 0}/2 keys valid; writes lost: {lost_inserts} inserts, "
            f"{lost_updates} updates (of {len(writes.ledger):,} and {writes.increments:,} acknowledged); "
            f"ledger rows without their account: {unjoined}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--lead", type=float, default=2.0, help="seconds of writes before the change")
    parser.add_argument("--tail", type=float, default=2.0, help="seconds of writes after it")
    parser.add_argument("--batch", type=float, default=0.2, help="seconds each backfill batch should take (default 0.2, as apply's)")
    parser.add_argument("--case", choices=sorted(CASES), default="key",
                        help="key: accounts.id (the primary key) and ledger.account_id (its foreign key) int to bigint; "
                             "column: accounts.balance (indexed) int to bigint")
    parser.add_argument("--ledger-rows", type=int, default=None, help="ledger rows at the start (default: rows / 5)")
    parser.add_argument("--verbose", "-v", action="store_true", help="the apply's log: each step's time, the fill's progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if args.verbose:
        logging.getLogger("reconciler.apply").setLevel(logging.INFO)
    desired_sql, raw_alter = CASES[args.case]
    ledger_rows = args.rows // 5 if args.ledger_rows is None else args.ledger_rows
    with benchmark_server() as server, throwaway_database(server, "rewrite_live") as template, \
            throwaway_database(server, "rewrite_desired") as desired:
        print(f"loading {args.rows:,} accounts ...", file=sys.stderr)
        with connect(template) as conn:
            conn.execute(LIVE_SQL.encode())
            conn.execute("INSERT INTO accounts SELECT g, g %% 1000, 'n' FROM generate_series(1, %s) g", (args.rows,))
            conn.execute("INSERT INTO ledger (account_id, amount) SELECT 1 + g %% %s, 1 FROM generate_series(1, %s) g",
                         (args.rows, ledger_rows))
            conn.execute("VACUUM (ANALYZE) accounts, ledger")
        with connect(desired) as conn:
            conn.execute(desired_sql.encode())
        with connect(template) as conn:
            row = conn.execute("SELECT sum(balance) FROM accounts").fetchone()
            before = int(row[0]) if row else 0
        results = []
        with cloned_database(server, template, "raw") as live:
            print("raw ALTER under load ...", file=sys.stderr)

            def raw() -> None:
                with connect(live) as conn, conn.transaction():  # migra's output run as one script
                    for statement in raw_alter:
                        conn.execute(statement.encode())

            writes, started, ended = under_load(live, args.rows, args.writers, args.lead, args.tail, raw)
            results.append((summarise("raw ALTER", writes.log, started, ended, tuple((s, 0.0) for s in raw_alter)),
                            check_end(live, before, ledger_rows, writes, args.case)))
        with cloned_database(server, template, "plan") as live, tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            (root / "schemas").mkdir()
            (root / "schemas" / "schema.sql").write_text(desired_sql)
            (root / "reconciler.yaml").write_text(textwrap.dedent(f"""\
                environments:
                  bench:
                    database: "{live}"
                    shadow: "{server.dsn}"
                    require_signed_plans: false
                    backup: none
                """))
            config = load_config(root / "reconciler.yaml")
            env = config.environment("bench")
            print("planning ...", file=sys.stderr)
            planned = time.perf_counter()
            with open_servers(config, env) as servers:
                plan = make_plan(config, env, servers).plan
            planned = time.perf_counter() - planned
            print(f"planned in {planned:.1f}s: {', '.join(s.kind for s in plan.body.steps)}", file=sys.stderr)
            print("compiled plan under load ...", file=sys.stderr)

            def compiled() -> None:
                result = apply_plan(plan, live, ApplyOptions(environment="bench", metadata_schema="reconciler",
                                                             backfill=BackfillLimits(batch_seconds=args.batch)))
                if result.status != "applied":
                    raise RuntimeError(f"the plan ended {result.status}")

            writes, started, ended = under_load(live, args.rows, args.writers, args.lead, args.tail, compiled)
            results.append((summarise("compiled plan", writes.log, started, ended,
                                      tuple((s.sql, 0.0) for s in plan.body.steps)),
                            check_end(live, before, ledger_rows, writes, args.case)))
    print(f"\ncase {args.case}: {args.rows:,} accounts, {ledger_rows:,} ledger rows, {args.writers} writers (each: an UPDATE "
          f"of accounts.balance, an INSERT into ledger); backfill batches of about {args.batch}s")
    print(f"{'mode':<14} {'apply s':>8} {'writes':>8} {'stall ms':>9} {'p99 ms':>8} {'gap ms':>8} {'errors':>6}  end state")
    for result, end in results:
        print(f"{result.mode:<14} {result.apply_seconds:>8.1f} {result.inserts:>8,} {result.stall_ms:>9.0f} "
              f"{result.p99_ms:>8.1f} {result.gap_ms:>8.0f} {result.errors:>6}  {end}")
    raw_result, plan_result = results[0][0], results[1][0]
    print(f"\nlongest stall: {plan_result.stall_ms:.0f} ms vs raw ALTER's {raw_result.stall_ms:.0f} ms "
          f"({raw_result.stall_ms / plan_result.stall_ms:.0f}x shorter); total time {plan_result.apply_seconds:.1f} s vs "
          f"{raw_result.apply_seconds:.1f} s ({plan_result.apply_seconds / raw_result.apply_seconds:.1f}x)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
