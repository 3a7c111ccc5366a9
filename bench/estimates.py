"""The estimator against the clock: for tables of 10^4 to 10^7 rows (``--sizes``), a plan of each class of work a
step does on its table's data, planned by the real pipeline and applied by ``apply_plan`` on one target database,
then each step's estimate beside the time its record says it took.

Per size, one database table ``t_<rows>`` (an id, a referencing column, an integer, a text), and one plan that
adds to it at once: an index (built CONCURRENTLY), a foreign key to a parent table (validated after), a CHECK
(validated after), a NOT NULL through a validated CHECK, and a column filled by its ``backfill`` annotation in
batches. Sizes run smallest first on the same target, so a later plan's estimates take the rates the earlier runs
recorded (README "Estimates"): the first size is estimated at the defaults, the rest by this target's history.

    .venv/bin/python bench/estimates.py                            # 10^4, 10^5, 10^6 rows
    .venv/bin/python bench/estimates.py --sizes 10000 100000 1000000 10000000

A benchmark, not a test: it asserts nothing about timings; the ratio column is estimate over actual.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from online_rewrite import plan_for
from write_availability import benchmark_server

from reconciler.apply import ApplyOptions, apply_plan
from reconciler.servers import connect, throwaway_database

log = logging.getLogger("bench.estimates")

LIVE = """
CREATE TABLE IF NOT EXISTS parents (id bigint PRIMARY KEY);
CREATE TABLE t_{n} (id bigint PRIMARY KEY, parent_id bigint, amount int, note text);
INSERT INTO parents SELECT g FROM generate_series(1, 100000) g ON CONFLICT DO NOTHING;
INSERT INTO t_{n} SELECT g, 1 + (g::bigint * 7919) % 100000, (g * 31) % 1000, 'note ' || g FROM generate_series(1, {n}) g;
ANALYZE parents, t_{n};
"""
DESIRED = """
CREATE TABLE t_{n} (
    id bigint PRIMARY KEY,
    parent_id bigint REFERENCES parents (id),
    amount int NOT NULL CHECK (amount >= 0),
    note text,
    -- reconciler: backfill amount * 2
    doubled int NOT NULL
);
CREATE INDEX t_{n}_amount_idx ON t_{n} (amount);
"""


def _desired(sizes: Sequence[int], upto: int) -> str:
    """Every table up to ``upto`` rows in its desired form (the larger ones are not made yet)."""
    return "CREATE TABLE parents (id bigint PRIMARY KEY);\n" + "".join(DESIRED.format(n=n) for n in sizes if n <= upto)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    sizes = sorted(args.sizes)
    print(f"{'rows':>10}  {'step':<26} {'class':<19} {'basis':<40} {'estimate':>9} {'actual':>9} {'ratio':>6}")
    with benchmark_server() as server, throwaway_database(server, "estimates") as target, \
            tempfile.TemporaryDirectory() as folder:
        for n in sizes:
            started = time.perf_counter()
            with connect(target) as conn:
                conn.execute(LIVE.format(n=n).encode())
            log.info("t_%d loaded in %.1fs", n, time.perf_counter() - started)
            plan = plan_for(server.dsn, target, _desired(sizes, n), Path(folder), online_rows=0)
            steps = {s.index: s for s in plan.body.steps}
            result = apply_plan(plan, target, ApplyOptions(environment="bench", metadata_schema="reconciler"))
            for record in result.steps:
                step = steps[record.index]
                e = step.estimate
                if e is None or e.work_class == "catalog" or record.status != "applied":
                    continue
                actual = (record.duration_ms - record.lock_wait_ms) / 1000
                print(f"{n:>10,}  {step.kind[:26]:<26} {e.work_class:<19} {e.basis[:40]:<40} {e.seconds:>8.2f}s "
                      f"{actual:>8.2f}s {e.seconds / actual if actual else float('inf'):>6.2f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
