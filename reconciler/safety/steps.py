"""What the safety compiler hands on: steps with their hazards, and the settings it compiles with.

These values travel into the plan file, the policy checks, apply and rollback; the compiler's workings do not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from ..config import SafetyOptions


class HazardCode(StrEnum):
    """Every hazard a plan can name: the plan and policy JSON Schemas list the same (a test holds them equal), so a
    policy can only name hazards that exist."""

    DATA_LOSS = "DATA_LOSS"
    TABLE_REWRITE = "TABLE_REWRITE"
    ACCESS_EXCLUSIVE_LOCK = "ACCESS_EXCLUSIVE_LOCK"
    BLOCKS_WRITES = "BLOCKS_WRITES"
    FULL_SCAN_UNDER_LOCK = "FULL_SCAN_UNDER_LOCK"
    INDEX_DROPPED = "INDEX_DROPPED"
    AUTHZ_CHANGE = "AUTHZ_CHANGE"
    EXTENSION_CHANGE = "EXTENSION_CHANGE"
    CORRECTNESS = "CORRECTNESS"
    STATISTICS_RESET = "STATISTICS_RESET"
    REPLICA_IDENTITY_CHANGE = "REPLICA_IDENTITY_CHANGE"
    SPLIT_TRANSACTION = "SPLIT_TRANSACTION"
    FOREIGN_KEY_TYPE_MISMATCH = "FOREIGN_KEY_TYPE_MISMATCH"


@dataclass(frozen=True)
class Hazard:
    code: str  # a HazardCode (a plain string once read back from a plan file)
    message: str
    table: str | None = None
    rows: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class LintFinding:
    rule: str
    message: str


@dataclass(frozen=True)
class SourceLine:
    """The desired file and line that asked for a step; ``commit`` when the object is gone from the files (a drop)
    and was found in the folder's git history: the newest commit that still had it."""

    path: str  # relative to the schemas folder
    line: int
    commit: str | None = None

    def describe(self) -> str:
        return f"{self.path}:{self.line}" + (f" (removed; last in {self.commit[:12]})" if self.commit else "")


@dataclass(frozen=True)
class Estimate:
    """How long a step should take: its class of work (``estimates.py``), how much (rows or bytes of ``table``),
    and the seconds at the rate it was estimated with, which ``basis`` names."""

    work_class: str  # catalog, scan, rewrite, index, index_concurrently, key_check, fill
    work: float
    seconds: float
    basis: str
    table: str | None = None


@dataclass(frozen=True)
class Step:
    index: int
    sql: str
    kind: str
    object: str
    transactional: bool
    hazards: tuple[Hazard, ...]
    rollback_sql: str | None  # None: irreversible (see ``reversible``)
    tables: tuple[str, ...] = ()
    phase: int = 1
    reversible: bool = False
    lock_timeout: str = "5s"
    statement_timeout: str = "15min"
    lint: tuple[LintFinding, ...] = ()
    original_sql: str | None = None  # the diff engine's statement, when this step rewrites it
    identity: tuple[str, ...] = ()  # the object's name parts (schema first): how apply finds it in the catalog
    source: SourceLine | None = None  # the desired line that asked for it
    estimate: Estimate | None = None


@dataclass(frozen=True)
class SafetySettings:
    switches: SafetyOptions = field(default_factory=SafetyOptions)  # which rewrites are on (reconciler.yaml `safety:`)
    lock_timeout: str = "5s"
    statement_timeout: str = "15min"
    timeouts: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # kind -> {lock_timeout, statement_timeout}
