"""The answers a reviewer needs before reading any SQL, read off the plan value: how risky it is and which rule says
so, what each phase locks and who waits behind it, and who still has to approve. Text and Markdown put them first."""

from __future__ import annotations

from dataclasses import dataclass

from ..estimates import UNITS
from ..online import duration
from ..plan import Plan
from ..safety import HazardCode, Step
from ..safety.locks import TableLock, step_locks, strongest
from ..safety.nodes import human_bytes
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
BYTES_OF = {work_class: unit == "bytes" for work_class, unit in UNITS.items()}  # an estimate's work: bytes or rows


@dataclass(frozen=True)
class Risk:
    level: str  # one of LEVELS
    rule: str  # what set it: a policy rule's id, or a hazard code
    where: str  # the rule's file:line, or the step the hazard is on

    def describe(self) -> str:
        return f"{self.level} (set by {self.rule}, {self.where})" if self.rule else self.level


@dataclass(frozen=True)
class TableSize:
    rows: int | None
    bytes: int | None

    def describe(self) -> str:
        parts = ([f"~{self.rows:,} rows"] if self.rows is not None else []) + (
            [human_bytes(self.bytes)] if self.bytes is not None else [])
        return ", ".join(parts)


@dataclass(frozen=True)
class PhaseLocks:
    phase: int
    runs_as: str  # one transaction, its own transaction, outside a transaction
    steps: tuple[int, ...]
    locks: tuple[TableLock, ...]  # strongest first
    sizes: dict[str, TableSize]  # the live tables' sizes, where the plan knows them
    seconds: float | None  # estimated, when every step of it has an estimate
    causes: tuple[str, ...] = ()  # the desired lines that asked for its steps that make reads or writes wait

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
            line = f", {step.source.describe()}" if step.source else ""
            found = Risk(level, f"hazard {hazard.code}", f"step {step.index}, {step.object}{line}")
    return found


def hazard_level(code: str) -> str:
    """The level a hazard gives a plan (one this version does not know: medium)."""
    return _HAZARD_LEVELS.get(code, "medium")


def phase_locking(plan: Plan) -> tuple[PhaseLocks, ...]:
    """Each phase's locks, sizes, estimate and the lines that asked for its blocking steps: read once a plan (every
    step's statement parsed), though text and markdown ask for them three times."""
    key = (plan.id, id(plan.body.steps), len(plan.body.steps))
    found = _LOCKING.get(key)
    if found is None:
        if len(_LOCKING) >= 4:
            _LOCKING.pop(next(iter(_LOCKING)))
        found = _LOCKING[key] = _phase_locking(plan)
    return found


_LOCKING: dict[tuple[str, int, int], tuple[PhaseLocks, ...]] = {}  # by plan id (its body's hash) and steps held


def _phase_locking(plan: Plan) -> tuple[PhaseLocks, ...]:
    sizes = table_sizes(plan.body.steps)
    out = []
    for phase, steps in phases(plan):
        taken = [(step, step_locks(step)) for step in steps]
        locks = strongest(lock for _, held in taken for lock in held)
        estimated = [s.estimate.seconds for s in steps if s.estimate is not None]
        causes = dict.fromkeys(s.source.describe() for s, held in taken if s.source is not None
                               and any(lock.mode.blocks_writes for lock in held))
        out.append(PhaseLocks(phase, phase_label(steps), tuple(s.index for s in steps), locks,
                              {lock.table: sizes[lock.table] for lock in locks if lock.table in sizes},
                              sum(estimated) if len(estimated) == len(steps) else None, tuple(causes)))
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


def table_sizes(steps: tuple[Step, ...]) -> dict[str, TableSize]:
    """Live rows and bytes by table, as the plan measured them (its hazards, its estimates' work)."""
    rows: dict[str, int] = {}
    size: dict[str, int] = {}
    for step in steps:
        for hazard in step.hazards:
            if hazard.table and hazard.rows is not None:
                rows[hazard.table] = hazard.rows
            if hazard.table and hazard.bytes is not None:
                size[hazard.table] = hazard.bytes
        e = step.estimate
        if e is not None and e.table and e.work_class in BYTES_OF:
            (size if BYTES_OF[e.work_class] else rows).setdefault(e.table, int(e.work))
    return {t: TableSize(rows.get(t), size.get(t)) for t in {*rows, *size}}


def describe_lock(lock: TableLock, sizes: dict[str, TableSize]) -> str:
    size = f", {sizes[lock.table].describe()}" if lock.table in sizes else ""
    return f"{lock.table} {lock.mode.label} ({lock.mode.waits}{size})"


def about(seconds: float | None) -> str:
    if seconds is None:
        return "not estimated"
    if seconds < 0.1:
        return "under 0.1 s"
    if seconds < 10:
        return f"~{seconds:.1f} s"
    return f"~{duration(seconds)}"


NOTHING_BLOCKS = "nothing: no phase holds a lock reads or writes wait behind"


def blocking_lines(plan: Plan) -> list[str]:
    """One line per phase that holds a lock reads or writes wait behind; empty when none does."""
    return [f"phase {p.phase} (step{'s' if len(p.steps) > 1 else ''} {step_range(p.steps)}, {p.runs_as}, "
            f"{about(p.seconds)}): "
            + "; ".join(describe_lock(lock, p.sizes) for lock in p.blocking)
            + (f"; asked for by {', '.join(p.causes)}" if p.causes else "")
            for p in phase_locking(plan) if p.blocking]



def step_range(indexes: tuple[int, ...]) -> str:
    return str(indexes[0]) if len(indexes) == 1 else f"{indexes[0]}-{indexes[-1]}"
