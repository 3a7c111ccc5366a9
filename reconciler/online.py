"""A plan's online rewrites as a reviewer reads them: for each column changed by a dual column (safety/dual_column.py)
or swapped back (safety/way_back.py), and each table built again as a shadow table (safety/shadow_table.py), which
steps expand, backfill, cut over and contract, how many rows the fill goes through, and about how long it takes. Read
off the plan's steps (their kinds, objects and hazards), so any plan file shows them, and ``show`` and the
pull-request comment say the same.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .safety import Step

# rows a second a fill goes through, for the estimate: bench/online_rewrite.py measured ~107,000 (5,000,000 rows, four
# writers at once, two cores); a guide to the order of magnitude, not a promise
FILL_ROWS_PER_SECOND = 100_000
_TAGGED = re.compile(r"_([0-9a-f]{8})$")


@dataclass(frozen=True)
class OnlineRewrite:
    column: str  # 'schema.table.column', or 'schema.table' for a table built again
    rows: int | None  # the table's live estimate, when the plan knows it
    bytes: int | None
    expand: tuple[int, ...]
    backfill: tuple[int, ...]  # fill, index builds, the check of every row
    cutover: tuple[int, ...]
    contract: tuple[int, ...]  # with what shares its transactions (the lock it takes first)
    locks: tuple[str, ...]  # the tables the cut-over locks
    reads: int = 0  # the batched passes over the table (the fill, the check of every row)
    change: str = ""  # what a table built again becomes ("becomes partitioned by RANGE (created_at)")
    checks: tuple[int, ...] = ()  # after the cut-over, before the contract: every row checked, foreign keys validated

    @property
    def subject(self) -> str:
        return f"{self.column} {self.change}" if self.change else self.column

    @property
    def seconds(self) -> float | None:
        """About how long the batched passes take."""
        return None if self.rows is None or not self.reads else self.reads * self.rows / FILL_ROWS_PER_SECOND


def online_rewrites(steps: Sequence[Step]) -> tuple[OnlineRewrite, ...]:
    """Each rewrite, found by its contract (the drop of ``<column>_reconciler_old_<tag>`` or ``_gone_<tag>``)."""
    found = []
    for contract in (s for s in steps if s.kind == "contract"):
        table, _, outgoing = contract.object.rpartition(".")
        match = _TAGGED.search(outgoing)
        if match is None:
            continue
        tag = match.group(1)
        column = re.sub(r"_reconciler_(?:old|gone)_[0-9a-f]{8}$", "", outgoing)
        whole = contract.sql.startswith("DROP TABLE")  # a shadow table's old table: 'schema.table_reconciler_old_<tag>'
        subject = f"{table}.{column}"  # a table built again: its old one is named after it, in its schema
        cutting = {s.phase for s in steps if s.kind == "cutover" and s.object == subject}
        cutover = tuple(s.index for s in steps if s.phase in cutting)  # with the views it makes again (cutover_views)
        # before the cut-over, what carries the tag (a plan that only drops what a held contract kept has none)
        tagged = [s for s in steps if cutover and s.index < cutover[0] and s.kind != "cutover"
                  and (tag in s.object or tag in s.sql)]
        fill_kinds = ("backfill", "verify_copy", "create_index_concurrently", "create_index", "copy_rows",
                      "vacuum_analyze", "catch_up")  # create_index: a shadow table's, built after its copy
        expanding = {s.phase for s in tagged if s.kind not in fill_kinds and s.kind != "validate_constraint"}
        expand = tuple(s.index for s in steps if s.phase in expanding)  # with what shares their transaction
        sized = next((h for s in steps if s.index in expand or s.index in cutover or s is contract for h in s.hazards
                      if h.table == table and h.rows is not None), None)
        first = next((s for s in steps if s.kind == "cutover" and s.object == subject), None)  # its LOCK
        change = next((h.message.split(": built again", 1)[0].removeprefix(f"{subject} ") for s in steps
                       if s.index in expand for h in s.hazards if ": built again" in h.message), "") if whole else ""
        sized = sized or next((h for s in steps if s.index in expand for h in s.hazards if h.rows is not None), None)
        after = cutover[-1] if cutover else 0
        ending = {s.phase for s in steps if s.index > after and tag in s.object
                  and s.kind in ("contract", "drop_trigger", "drop_function")}
        ends = tuple(s.index for s in steps if s.phase in ending)
        relation = subject if whole else table
        checks = tuple(s.index for s in steps if after and after < s.index < (ends[0] if ends else len(steps) + 1) and (
            (s.kind == "verify_copy" and (tag in s.object or tag in s.sql))
            or (s.kind == "validate_constraint" and relation in s.tables)))
        found.append(OnlineRewrite(
            column=subject, change=change, rows=sized.rows if sized else None, bytes=sized.bytes if sized else None,
            expand=expand, backfill=tuple(s.index for s in tagged if s.kind in fill_kinds), cutover=cutover,
            contract=ends, locks=first.tables if first else (table,), checks=checks,
            reads=sum(1 for s in tagged if s.kind in ("backfill", "verify_copy", "copy_rows"))))
    return tuple(found)


def span(indexes: Sequence[int]) -> str:
    """'steps 3-7', 'step 4', or 'none'."""
    if not indexes:
        return "none"
    low, high = min(indexes), max(indexes)
    return f"step {low}" if low == high else f"steps {low}-{high}"


def describe(rewrite: OnlineRewrite) -> str:
    """One line: what each phase is, the rows and the estimate."""
    size = f"~{rewrite.rows:,} rows" if rewrite.rows is not None else "rows not known"
    if not rewrite.cutover:
        return f"{rewrite.subject}: the contract of an earlier cut-over, {span(rewrite.contract)} ({size})"
    estimate = "under 1 s" if rewrite.seconds and rewrite.seconds < 1 else f"about {duration(rewrite.seconds)}"
    took = f", {estimate} at ~{FILL_ROWS_PER_SECOND:,} rows/s" if rewrite.seconds else ""
    checked = f"checked after it: {span(rewrite.checks)}; " if rewrite.checks else ""
    return (f"{rewrite.subject}: {size}; expand {span(rewrite.expand)}; backfill {span(rewrite.backfill)}{took}; "
            f"cut-over {span(rewrite.cutover)} (one short transaction, locks {', '.join(rewrite.locks)}); "
            f"{checked}contract {span(rewrite.contract)}")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
