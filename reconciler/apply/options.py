"""What an apply is told (per environment) and what it reports back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..backup import Backup
from ..history import StepRecord
from ..safety import Step
from ..signing import NO_REQUIREMENTS, Requirements, Trust
from .monitor import LockWaitSampler


@dataclass(frozen=True)
class BackfillLimits:
    """config.BackfillSettings in numbers: the time each batch should take, and the limits that pause the fill."""

    batch_seconds: float = 0.2  # a write to a row of the batch waits for it: its longest stall
    max_replica_lag_seconds: float = 30.0
    max_replica_bytes: int = 256 * 1024**2
    max_lock_waiters: int = 2
    max_transaction_age_seconds: float = 3600.0
    workers: int = 2  # batches run side by side, each in a session of its own
    pause_check_seconds: float = 1.0  # while paused, how often the limits are looked at again


@dataclass(frozen=True)
class ApplyOptions:
    environment: str
    metadata_schema: str
    lock_wait_seconds: float = 60.0
    requirements: Requirements = NO_REQUIREMENTS
    trust: Trust | None = None
    lock_retries: int = 3
    retry_backoff_seconds: float = 1.0
    index_build_retries: int = 2
    verify_before_commit: bool = True  # the check inside the last transaction, when the plan ends with one
    allow_unrehearsed: bool = False
    auto_rollback: bool = True
    backup_scope: str = "none"  # full, touched or none
    backups_dir: Path | None = None
    now: datetime | None = None  # the clock for change windows (tests set it)
    on_step: Callable[[Step], None] | None = None  # progress display
    on_backup: Callable[[Backup], None] | None = None  # says where the backup went, as soon as it is written
    on_backfill: Callable[[dict[str, Any]], None] | None = None  # a backfill's progress, before each batch (watch)
    target_dsn: str | None = None  # set by apply_plan: where the lock-wait monitor and the fill's sessions connect
    reconnect_seconds: float = 10.0  # after losing its session: how long to try for a new one to clean up with
    cleanup_lock_timeout: str = "5s"  # removing what a stopped step left (an INVALID index) waits no longer
    backfill: BackfillLimits = field(default_factory=lambda: BackfillLimits())  # apply/backfill.py
    lock_sampler: LockWaitSampler | None = None  # a fleet's, one per server: else each apply opens its own
    hold_contract: bool = False  # leave the contract phases (the columns a cut-over replaced are kept, in step)


@dataclass(frozen=True)
class ApplyResult:
    run_id: str | None
    status: str  # applied, or nothing (no steps)
    steps: tuple[StepRecord, ...]
    fingerprint: str
    backup: Backup | None = None
