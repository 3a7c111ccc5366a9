"""The answers a reviewer needs before reading any SQL, read off the plan value: how risky it is and which rule says
so, what each phase locks and who waits behind it, and who still has to approve. Text and Markdown put them first."""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import Plan
from ..safety import HazardCode, Step
from ..safety.locks import TableLock, phase_locks
from .common import ApprovalView, phase_label, phases

LEVELS = ("low", "medium", "high", "critical")
_HAZARD_LEVELS: dict[str, str] = {
    HazardCode.DATA_LOSS: "critical", HazardCode.CORRECTNESS: "critical",
    HazardCode.TABLE_REWRITE: "high", HazardCode.FULL_SCAN_UNDER_LOCK: "high", HazardCode.BLOCKS_WRITES: "high",
    HazardCode.ACCESS_EXCLUSIVE_LOCK: "medium", HazardCode.INDEX_DROPPED: "medium", HazardCode.AUTHZ_CHANGE: "medium",
    HazardCode.EXTENSION_CHANGE: "medium", HazardCode.REPLICA_IDENTITY_CHANGE: "medium",
    HazardCode.SPLIT_TRANSACTION: "medium", HazardCode.FOREIGN_KEY_TYPE_MISMATCH: "medium",
    HazardCode.STATISTICS_RESET: "low",
}
_POLICY_LEVELS = {"deny": "critical", "require_approval": "high", "warn": "medium"}


@dataclass(frozen=True)
class Risk:
    level: str  # one of LEVELS
    rule: str  # what set it: a policy rule's id, or a hazard code
    where: str  # the rule's file:line, or the step the hazard is on

    def describe(self) -> str:
        return f"{self.level} (set by {self.rule}, {self.where})" if self.rule else self.level


@dataclass(frozen=True)
class PhaseLocks:
    phase: int
    runs_as: str  # one transaction, its own transaction, outside a transaction
    steps: tuple[int, ...]
    locks: tuple[TableLock, ...]  # strongest first
    rows: dict[str, int]  # live rows of the tables, where the plan knows them

    @property
    def blocking(self) -> tuple[TableLock, ...]:
        """The locks someone waits behind: reads or writes."""
        return tuple(lock for lock in self.locks if lock.mode.blocks_writes)


def risk(plan: Plan) -> Risk:
    """The highest level any policy finding or hazard gives; a policy rule wins a tie (it names a file and line)."""
    found = Risk("low", "", "")
    for f in plan.body.policy.findings:
        level = _POLICY_LEVELS.get(f.severity, "low")
        if LEVELS.index(level) > LEVELS.index(found.level) or not found.rule:
            found = Risk(level, f"policy {f.rule}", f"{f.file}:{f.line}")
    for step, hazard in plan.hazards:
        level = hazard_level(hazard.code)
        if LEVELS.index(level) > LEVELS.index(found.level):
            found = Risk(level, f"hazard {hazard.code}", f"step {step.index}, {step.object}")
    return found


def hazard_level(code: str) -> str:
    """The level a hazard gives a plan (one this version does not know: medium)."""
    return _HAZARD_LEVELS.get(code, "medium")


def phase_locking(plan: Plan) -> tuple[PhaseLocks, ...]:
    rows = _rows(plan.body.steps)
    out = []
    for phase, steps in phases(plan):
        locks = phase_locks(steps)
        out.append(PhaseLocks(phase, phase_label(steps), tuple(s.index for s in steps), locks,
                              {lock.table: rows[lock.table] for lock in locks if lock.table in rows}))
    return tuple(out)


def approvals_line(plan: Plan, approvals: ApprovalView | None) -> str:
    policy = plan.body.policy
    if policy.denied:
        return "blocked by policy: approvals do not change that"
    if approvals is not None:
        return approvals.describe()
    if policy.approvals or policy.groups:
        groups = f" (from group(s): {', '.join(policy.groups)})" if policy.groups else ""
        return f"{policy.approvals} needed{groups}"
    return "none needed"


def _rows(steps: tuple[Step, ...]) -> dict[str, int]:
    """Live rows by table, as the hazards measured them at plan time."""
    found: dict[str, int] = {}
    for step in steps:
        for hazard in step.hazards:
            if hazard.table and hazard.rows is not None:
                found[hazard.table] = hazard.rows
    return found


def describe_lock(lock: TableLock, rows: dict[str, int]) -> str:
    size = f", ~{rows[lock.table]:,} rows" if lock.table in rows else ""
    return f"{lock.table} {lock.mode.label} ({lock.mode.waits}{size})"


def blocking_lines(plan: Plan) -> list[str]:
    """One line per phase that holds a lock reads or writes wait behind; empty when none does."""
    return [f"phase {p.phase} (steps {_span(p.steps)}, {p.runs_as}): "
            + "; ".join(describe_lock(lock, p.rows) for lock in p.blocking)
            for p in phase_locking(plan) if p.blocking]


def _span(indexes: tuple[int, ...]) -> str:
    return str(indexes[0]) if len(indexes) == 1 else f"{indexes[0]}-{indexes[-1]}"
