"""Write availability during apply: how long does a busy table stop taking inserts?

A writer inserts into a large ``events`` table as fast as it can while a schema change adds an
index, a foreign key and a NOT NULL to it. The same change is applied twice, each time to a fresh
copy of the same database:

- ``migra raw``: migra's statements as migra's users run them, all in one transaction, no lock_timeout;
- ``compiled plan``: reconciler's plan (CONCURRENTLY, NOT VALID + VALIDATE, SET NOT NULL through a
  validated CHECK), applied by ``reconciler.apply.apply_plan``.

The figure that matters is the longest write stall: the longest single insert. This is a benchmark,
not a test: it prints what it measured and asserts nothing about timings.

    .venv/bin/python bench/write_availability.py              # 1,000,000 rows, embedded PostgreSQL
    .venv/bin/python bench/write_availability.py --rows 100000
    RECONCILER_BENCH_DSN='host=... user=postgres' .venv/bin/python bench/write_availability.py
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import random
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from reconciler import dsn as dsnlib
from reconciler.apply import ApplyOptions, apply_plan
from reconciler.config import load_config
from reconciler.diff.migra_engine import MigraEngine
from reconciler.pipeline import make_plan, open_servers
from reconciler.plan import Plan
from reconciler.render import render_text
from reconciler.servers import Server, connect, drop_database, scratch_server, throwaway_database

BENCH_DSN_ENV = "RECONCILER_BENCH_DSN"
METADATA_SCHEMA = "reconciler"
ENVIRONMENT = "bench"

LIVE_SQL = """\
CREATE TABLE accounts (
    id bigint PRIMARY KEY,
    name text
);

CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint,
    kind text,
    payload text
);
"""

DESIRED_SQL = """\
CREATE TABLE accounts (
    id bigint PRIMARY KEY,
    name text
);

CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint REFERENCES accounts (id),
    kind text NOT NULL,
    payload text
);

CREATE INDEX events_account_id_idx ON events (account_id);
"""

KINDS = ("click", "view", "purchase", "signup")
INSERT = "INSERT INTO events (account_id, kind, payload) VALUES (%s, %s, %s)"

log = logging.getLogger("bench.write_availability")


# --- the writer ------------------------------------------------------------------------------

@dataclass
class WriterLog:
    """One writer's inserts: when each started and how long it took (perf_counter seconds)."""

    started: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Writer(threading.Thread):
    """Inserts one row per statement, autocommit, back to back, until told to stop."""

    def __init__(self, dsn: str, accounts: int) -> None:
        super().__init__(name="bench writer", daemon=True)
        self.dsn = dsn
        self.accounts = accounts
        self.log = WriterLog()
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(20261124)
        try:
            with connect(self.dsn, application_name="bench writer") as conn:
                self.ready.set()
                while not self.stop.is_set():
                    params = (rng.randint(1, self.accounts), KINDS[rng.randrange(len(KINDS))], secrets.token_hex(16))
                    t0 = time.perf_counter()
                    try:
                        conn.execute(INSERT, params, prepare=True)
                    except psycopg.Error as exc:
                        self.log.errors.append(f"{type(exc).__name__}: {str(exc).strip()}")
                    t1 = time.perf_counter()
                    self.log.started.append(t0)
                    self.log.latencies.append(t1 - t0)
        except BaseException as exc:
            self.failure = exc
            raise
        finally:
            self.ready.set()


@dataclass(frozen=True)
class Result:
    mode: str
    apply_seconds: float
    inserts: int
    stall_ms: float  # the longest single insert
    p99_ms: float
    gap_ms: float  # the longest time between two completed inserts
    baseline_p99_ms: float  # inserts that started before the apply
    stall_from_ms: float  # when the longest insert started, from the start of the apply
    errors: int
    statements: tuple[tuple[str, float], ...]  # (sql, ms) as executed


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarise(mode: str, writer: WriterLog, apply_start: float, apply_end: float,
              statements: Sequence[tuple[str, float]]) -> Result:
    latencies = writer.latencies
    finished = sorted(s + d for s, d in zip(writer.started, latencies, strict=True))
    gaps = [b - a for a, b in itertools.pairwise(finished)]
    baseline = [d for s, d in zip(writer.started, latencies, strict=True) if s + d < apply_start]
    worst = max(range(len(latencies)), key=latencies.__getitem__, default=None)
    return Result(
        mode=mode,
        apply_seconds=apply_end - apply_start,
        inserts=len(latencies),
        stall_ms=max(latencies, default=math.nan) * 1000,
        p99_ms=_quantile(latencies, 0.99) * 1000,
        gap_ms=max(gaps, default=math.nan) * 1000,
        baseline_p99_ms=_quantile(baseline, 0.99) * 1000,
        stall_from_ms=(writer.started[worst] - apply_start) * 1000 if worst is not None else math.nan,
        errors=len(writer.errors),
        statements=tuple(statements),
    )


def under_write_load(mode: str, dsn: str, accounts: int, lead: float, tail: float,
                     apply: Callable[[], Sequence[tuple[str, float]]]) -> Result:
    """Start the writer, wait ``lead`` seconds, apply, keep writing ``tail`` seconds, stop."""
    writer = Writer(dsn, accounts)
    writer.start()
    writer.ready.wait()
    if writer.failure is not None:
        raise RuntimeError(f"the writer could not start: {writer.failure}")
    try:
        time.sleep(lead)
        apply_start = time.perf_counter()
        statements = apply()
        apply_end = time.perf_counter()
        time.sleep(tail)
    finally:
        writer.stop.set()
        writer.join()
    if writer.failure is not None:
        raise RuntimeError(f"the writer failed: {writer.failure}")
    for message in sorted(set(writer.log.errors))[:5]:
        log.warning("%s: insert failed: %s", mode, message)
    return summarise(mode, writer.log, apply_start, apply_end, statements)


# --- databases -------------------------------------------------------------------------------

@contextlib.contextmanager
def benchmark_server() -> Iterator[Server]:
    """RECONCILER_BENCH_DSN (a superuser) or an embedded, non-durable cluster of our own."""
    with scratch_server(os.environ.get(BENCH_DSN_ENV), prefix="reconciler-bench-", in_memory=False) as server:
        yield server


@contextlib.contextmanager
def cloned_database(server: Server, template_dsn: str, purpose: str) -> Iterator[str]:
    """A copy of the template database (CREATE DATABASE ... TEMPLATE), dropped afterwards."""
    template = dsnlib.database_name(template_dsn)
    assert template is not None
    name = f"reconciler_bench_{purpose}_{secrets.token_hex(4)}"
    with connect(server.dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    try:
        yield server.database_dsn(name)
    finally:
        drop_database(server, name)


def load_live(dsn: str, rows: int, accounts: int) -> None:
    with connect(dsn) as conn:
        conn.execute(LIVE_SQL.encode())
        conn.execute("INSERT INTO accounts (id, name) SELECT g, 'account ' || g FROM generate_series(1, %s) g",
                     (accounts,))
        # account ids in a scattered order, so the index build and the FK check do real work
        conn.execute(
            "INSERT INTO events (account_id, kind, payload) "
            "SELECT 1 + (g::bigint * 7919) %% %(accounts)s, (%(kinds)s::text[])[1 + g %% 4], md5(g::text) "
            "FROM generate_series(1, %(rows)s) g",
            {"accounts": accounts, "kinds": list(KINDS), "rows": rows},
        )
        # VACUUM too, so autovacuum has nothing to start in the middle of a measurement
        conn.execute("VACUUM (ANALYZE) accounts, events")


def describe_end_state(dsn: str) -> str:
    """The three changes, as the catalog has them after an apply."""
    with connect(dsn) as conn:
        index = conn.execute(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass('public.events_account_id_idx')"
        ).fetchone()
        fk = conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conrelid = 'public.events'::regclass AND contype = 'f'"
        ).fetchone()
        not_null = conn.execute(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'public.events'::regclass AND attname = 'kind'"
        ).fetchone()
    return (f"index {'valid' if index and index[0] else 'MISSING or INVALID'}, "
            f"foreign key {'validated' if fk and fk[0] else 'MISSING or NOT VALID'}, "
            f"kind {'NOT NULL' if not_null and not_null[0] else 'nullable'}")


# --- the two modes ---------------------------------------------------------------------------

def run_migra(server: Server, template_dsn: str, desired_dsn: str, args: argparse.Namespace) -> Result:
    with cloned_database(server, template_dsn, "migra") as live_dsn:
        changes = MigraEngine().diff(live_dsn, desired_dsn, exclude_schemas=(METADATA_SCHEMA,))
        print("\n== migra raw: one transaction, no lock_timeout ==")
        for change in changes:
            print(f"  {change.sql.strip()}")

        def apply() -> list[tuple[str, float]]:
            timings = []
            with connect(live_dsn, application_name="bench migra") as conn, conn.transaction():
                for change in changes:
                    t0 = time.perf_counter()
                    conn.execute(change.sql.encode())
                    timings.append((change.sql.strip(), (time.perf_counter() - t0) * 1000))
            return timings

        result = under_write_load("migra raw", live_dsn, args.accounts, args.lead, args.tail, apply)
        print(f"  end state: {describe_end_state(live_dsn)}")
        return result


def write_config(folder: Path, live_dsn: str, shadow_dsn: str) -> Path:
    (folder / "schemas").mkdir()
    (folder / "schemas" / "schema.sql").write_text(DESIRED_SQL)
    config = {
        "schemas": "schemas",
        "metadata_schema": METADATA_SCHEMA,
        "environments": {
            ENVIRONMENT: {
                "database": live_dsn,
                "shadow": shadow_dsn,
                "require_signed_plans": False,
                "lock_timeout": "2s",
                "statement_timeout": "30min",
            }
        },
    }
    path = folder / "reconciler.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    path.chmod(0o600)  # it holds the DSNs
    return path


def compile_plan(live_dsn: str, shadow_dsn: str) -> Plan:
    with tempfile.TemporaryDirectory(prefix="reconciler-bench-config-") as tmp:
        config = load_config(write_config(Path(tmp), live_dsn, shadow_dsn))
        env = config.environment(ENVIRONMENT)
        with open_servers(config, env) as servers:
            return make_plan(config, env, servers).plan


def run_compiled(server: Server, template_dsn: str, args: argparse.Namespace) -> Result:
    with cloned_database(server, template_dsn, "plan") as live_dsn:
        t0 = time.perf_counter()
        plan = compile_plan(live_dsn, server.dsn)
        plan_seconds = time.perf_counter() - t0
        print(f"\n== compiled plan (planned in {plan_seconds:.1f}s, not part of the apply time) ==")
        if args.show_plan:
            print(render_text(plan))
        else:
            for step in plan.body.steps:
                print(f"  [phase {step.phase}] {step.sql.strip()}")
        options = ApplyOptions(environment=ENVIRONMENT, metadata_schema=METADATA_SCHEMA)

        def apply() -> list[tuple[str, float]]:
            outcome = apply_plan(plan, live_dsn, options)
            if outcome.status != "applied":
                raise RuntimeError(f"the plan was not applied: {outcome.status}")
            return [(r.sql.strip(), r.duration_ms) for r in outcome.steps]

        result = under_write_load("compiled plan", live_dsn, args.accounts, args.lead, args.tail, apply)
        print(f"  end state: {describe_end_state(live_dsn)}")
        return result


# --- output ----------------------------------------------------------------------------------

def _one_line(text: str, width: int = 96) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def print_results(results: Sequence[Result]) -> None:
    for r in results:
        print(f"\n{r.mode}: statements as executed")
        for statement, ms in r.statements:
            print(f"  {ms:10.1f} ms  {_one_line(statement)}")
        print(f"  longest stall: {r.stall_ms:.1f} ms, from +{r.stall_from_ms:.0f} ms to "
              f"+{r.stall_from_ms + r.stall_ms:.0f} ms of an apply that took {r.apply_seconds * 1000:.0f} ms")
        if r.errors:
            print(f"  {r.errors} insert(s) failed")
    header = ("mode", "apply s", "inserts", "longest stall ms", "p99 ms", "longest gap ms", "before-apply p99 ms")
    rows = [
        (r.mode, f"{r.apply_seconds:.2f}", f"{r.inserts:,}", f"{r.stall_ms:.1f}", f"{r.p99_ms:.2f}",
         f"{r.gap_ms:.1f}", f"{r.baseline_p99_ms:.2f}")
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    print()
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    by_mode = {r.mode: r for r in results}
    if "migra raw" in by_mode and "compiled plan" in by_mode:
        migra, ours = by_mode["migra raw"], by_mode["compiled plan"]
        print(f"\nlongest write stall, migra raw / compiled plan: {migra.stall_ms / ours.stall_ms:.1f}x "
              f"({migra.stall_ms:.1f} ms vs {ours.stall_ms:.1f} ms)")


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in events (default 1,000,000)")
    parser.add_argument("--accounts", type=int, default=10_000, help="rows in accounts (default 10,000)")
    parser.add_argument("--lead", type=float, default=1.0, help="seconds of writing before the apply (default 1)")
    parser.add_argument("--tail", type=float, default=1.0, help="seconds of writing after the apply (default 1)")
    parser.add_argument("--mode", choices=("migra", "plan"), action="append",
                        help="run only this mode (repeatable; default: both, migra first)")
    parser.add_argument("--show-plan", action="store_true", help="print the whole compiled plan, not only its SQL")
    parser.add_argument("-v", "--verbose", action="store_true", help="reconciler's INFO logs")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.accounts < 1:
        parser.error("--rows and --accounts must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The writer shares the interpreter with the apply: switch threads often so the GIL adds
    # at most about a millisecond to an insert's latency.
    sys.setswitchinterval(0.001)
    modes = args.mode or ["migra", "plan"]
    results: list[Result] = []
    with benchmark_server() as server:
        print(f"PostgreSQL {server.major_version} at {dsnlib.describe(server.dsn)}; "
              f"events: {args.rows:,} rows, accounts: {args.accounts:,} rows; {os.cpu_count()} CPU(s)")
        with throwaway_database(server, "bench_template") as template_dsn, \
                throwaway_database(server, "bench_desired") as desired_dsn:
            t0 = time.perf_counter()
            load_live(template_dsn, args.rows, args.accounts)
            with connect(desired_dsn) as conn:
                conn.execute(DESIRED_SQL.encode())
            print(f"loaded the template database in {time.perf_counter() - t0:.1f}s")
            for mode in modes:
                if mode == "migra":
                    results.append(run_migra(server, template_dsn, desired_dsn, args))
                else:
                    results.append(run_compiled(server, template_dsn, args))
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
