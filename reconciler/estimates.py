"""How long each step will take: the work it does on its table (rows or bytes, from the live table's statistics at
plan time) over the rate this target did that class of work at before (its recorded runs), or a default rate where
it has none. Catalog-only steps take about nothing; what they wait for is a lock, which the review shows apart.

Each applied step's record keeps its class and work (``StepRecord.work``), so the next plan on the same target
learns the rate from it: the median over recent steps of each class that did enough work to measure (a small
table's step is all overhead)."""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from pglast import ast, enums

from . import history
from .errors import ReconcilerError
from .inspect import TableSize
from .safety import Estimate, HazardCode, Step
from .safety.nodes import parse

log = logging.getLogger(__name__)

# work classes: what a step does with its table's data, measured in rows or bytes
CATALOG, SCAN, REWRITE, INDEX, INDEX_CONCURRENTLY, KEY_CHECK, FILL = (
    "catalog", "scan", "rewrite", "index", "index_concurrently", "key_check", "fill")
UNITS = {SCAN: "bytes", REWRITE: "bytes", INDEX: "rows", INDEX_CONCURRENTLY: "rows", KEY_CHECK: "rows", FILL: "rows"}
# until this target's own runs say better: the order of magnitude, on the slow side of what bench/estimates.py
# measured on a small server (two cores, 10^7 rows, the table in memory: scan 1.2 GB/s, concurrent index build
# 2,000,000 rows/s, key check 3,000,000 rows/s, fill 170,000 rows/s), since a big table on a real server is read
# from disk; a rewrite (not in the bench) at what a disk writes
DEFAULT_RATES = {SCAN: 400e6, REWRITE: 100e6, INDEX: 1.5e6, INDEX_CONCURRENTLY: 1e6, KEY_CHECK: 1e6, FILL: 100e3}
CATALOG_SECONDS = 0.005
# the least work a record needs to teach a rate (below it, a step's time is its overhead)
MEASURABLE = {"rows": 50_000, "bytes": 8 << 20}
_FILLS = frozenset({"backfill", "copy_rows", "verify_copy"})


@dataclasses.dataclass(frozen=True)
class Rate:
    per_second: float
    basis: str  # "default", or "this target's last N steps of the class"


def default_rates() -> dict[str, Rate]:
    return {work: Rate(rate, "default") for work, rate in DEFAULT_RATES.items()}


def rates_from_history(conn: psycopg.Connection[Any], schema: str, *, runs: int = 50) -> dict[str, Rate]:
    """Each class's rate from this target's recorded steps, where it has measurable ones; the default elsewhere."""
    try:
        records = history.recorded_work(conn, schema, runs=runs)
    except psycopg.Error as exc:  # a role that may not read the history: the defaults
        log.debug("no recorded runs to learn rates from: %s", exc)
        conn.rollback()
        records = []
    found: dict[str, list[float]] = {}
    for record in records:
        work = record.get("work")
        if not isinstance(work, dict) or work.get("class") not in UNITS:
            continue
        amount = float(work.get("amount") or 0)
        seconds = (float(record.get("duration_ms") or 0) - float(record.get("lock_wait_ms") or 0)) / 1000
        if amount >= MEASURABLE[UNITS[work["class"]]] and seconds > 0:
            found.setdefault(work["class"], []).append(amount / seconds)
    rates = default_rates()
    for work_class, measured in found.items():
        rates[work_class] = Rate(statistics.median(measured), f"this target's last {len(measured)} "
                                 f"{'step' if len(measured) == 1 else 'steps'} of the kind")
    return rates


def estimate_steps(steps: Sequence[Step], sizes: Mapping[str, TableSize], rates: Mapping[str, Rate]) -> tuple[Step, ...]:
    """``steps`` in the order they run: the first step to read a table after a fill wrote every row of it in the same
    plan reads twice the work (it sets the hint bits of every row version the fill wrote; bench/estimates.py)."""
    keys = _foreign_keys(steps)
    filled: set[str] = set()
    out = []
    for step in steps:
        work_class, table = _work(step, keys)
        size = sizes.get(table) if table else None
        if work_class == CATALOG or size is None or table is None:
            estimate = Estimate(CATALOG, 0, CATALOG_SECONDS, "catalog only" if work_class == CATALOG else
                                "a table with no rows yet")
        else:
            amount = float(size.bytes if UNITS[work_class] == "bytes" else size.rows)
            if work_class != FILL and table in filled:
                amount, basis_note = amount * 2, ", twice the work: the first read after the fill"
                filled.discard(table)
            else:
                basis_note = ""
            rate = rates.get(work_class) or default_rates()[work_class]
            estimate = Estimate(work_class, amount, CATALOG_SECONDS + amount / rate.per_second, rate.basis + basis_note,
                                table)
            if work_class == FILL and step.kind == "backfill":
                filled.add(table)
        out.append(dataclasses.replace(step, estimate=estimate))
    return tuple(out)


def _work(step: Step, keys: frozenset[str]) -> tuple[str, str | None]:
    """The step's class of work and the table it does it on."""
    table = next((h.table for h in step.hazards if h.table), None) or (step.tables[0] if step.tables else None)
    codes = {h.code for h in step.hazards}
    if step.kind in _FILLS:
        return FILL, table
    if step.kind == "create_index_concurrently":
        return INDEX_CONCURRENTLY, table
    if step.kind == "create_index" or (step.kind.startswith("add_") and step.kind.endswith(("primary_key", "unique_constraint"))
                                       and HazardCode.FULL_SCAN_UNDER_LOCK in codes):
        return INDEX, table
    if HazardCode.TABLE_REWRITE in codes or (step.kind == "rebuild_table" and step.sql.startswith("INSERT")):
        return REWRITE, table
    if step.kind == "validate_constraint":
        return (KEY_CHECK if step.object in keys else SCAN), table
    if step.kind == "add_foreign_key" and not step.sql.rstrip().upper().endswith("NOT VALID"):
        return KEY_CHECK, table
    if HazardCode.FULL_SCAN_UNDER_LOCK in codes or step.kind in ("vacuum_analyze", "analyze"):
        return SCAN, table
    return CATALOG, None


def _foreign_keys(steps: Sequence[Step]) -> frozenset[str]:
    """The foreign keys the plan adds ('schema.table.name'): a validation of one checks keys, not expressions."""
    found = set()
    for step in steps:
        if step.kind == "add_foreign_key":
            found.add(step.object)
        elif "FOREIGN KEY" in step.sql and step.sql.lstrip().upper().startswith("ALTER TABLE"):
            try:
                node = parse(step.sql, "the plan")
            except ReconcilerError:  # a statement of many: only the simple form is looked into
                continue
            if isinstance(node, ast.AlterTableStmt):
                for cmd in node.cmds or ():
                    if (isinstance(cmd, ast.AlterTableCmd) and isinstance(cmd.def_, ast.Constraint)
                            and enums.ConstrType(int(cmd.def_.contype or 0)) is enums.ConstrType.CONSTR_FOREIGN
                            and node.relation is not None):
                        schema = node.relation.schemaname or "public"
                        found.add(f"{schema}.{node.relation.relname}.{cmd.def_.conname}")
    return frozenset(found)
