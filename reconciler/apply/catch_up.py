"""A shadow table's catch-up (safety/shadow_table.py): the writes its trigger recorded while the rows were copied,
replayed into the new table a batch per transaction, until a batch finds little left. What is left then the cut-over
replays under its short lock: the longer the log at the cut-over, the longer writes wait."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg

from ..errors import ApplyError
from ..safety import Step
from ..safety.shadow_table import REPLAY_BATCH

log = logging.getLogger(__name__)

REPORT_SECONDS = 5.0


def run_catch_up(conn: psycopg.Connection[Any], step: Step, *, check: Callable[[], None] = lambda: None) -> int:
    """Replay batch by batch (the step's statement replays up to ``REPLAY_BATCH`` entries, oldest first) until one
    replays fewer than half that; returns the entries replayed. ``check`` runs between batches (a signal stops it
    there: what is replayed stays replayed)."""
    total, began = 0, time.monotonic()
    reported = began
    while True:
        check()
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                             (step.lock_timeout, step.statement_timeout))
                row = conn.execute(step.sql.encode()).fetchone()
        except psycopg.Error as exc:
            raise ApplyError(f"step {step.index} (catch-up {step.object}) failed after replaying {total:,} writes: "
                             f"{exc.diag.message_primary or exc}") from exc
        done = int(row[0]) if row and row[0] is not None else 0
        total += done
        now = time.monotonic()
        if now - reported >= REPORT_SECONDS:
            reported = now
            log.info("catch-up %s: %s writes replayed, %s writes/s", step.object, f"{total:,}",
                     f"{total / (now - began):,.0f}")
        if done < REPLAY_BATCH // 2:
            log.info("catch-up %s: %s writes replayed in %.1fs; the cut-over replays the rest", step.object,
                     f"{total:,}", now - began)
            return total
