"""Brakes for bench/faults.py: holding one phase of an apply back, under its lock_timeout, so a fault lands inside it.

Kept apart from the campaign: each brake is a small piece of lock choreography that reads best on its own.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import faultcheck as fc
import psycopg
from psycopg import sql

# Most phases take milliseconds: a fault lands inside one only if the phase waits. A brake is a chain of gates, each
# a session holding a lock: gate 0 is taken before the apply starts; each next gate is requested once the apply waits
# on the one before (PostgreSQL queues a request behind a conflicting waiter, so a gate asked for while a phase waits
# is granted right after that phase ends, before the next phase asks), then the one before lets go. The apply waits
# on the last gate in the aimed phase; it lets go within CAP of that step's lock_timeout. Lock modes are chosen so
# each gate stops only what it is meant to stop (the plan's main transaction takes accounts, then orders, each ACCESS
# EXCLUSIVE, then events' expand; VALIDATE takes orders
# SHARE UPDATE EXCLUSIVE; SET NOT NULL orders ACCESS EXCLUSIVE; the concurrent drop waits for every holder of a lock on
# events; ACCESS SHARE conflicts with none of pg_dump, the writers' inserts, nor VALIDATE).
# (table, lock mode); mode SNAPSHOT: an old snapshot, which a concurrent build waits out; mode ENUM: the type's own
# lock, held by an ADD VALUE left uncommitted (rolled back after)
Gate = tuple[str, str]
AIMS: dict[str, tuple[Gate, ...]] = {
    "rename": (("audit_log_v1", "ACCESS SHARE"),),
    "add_enum_value": (("status", "ENUM"),),
    "create_index_concurrently": (("accounts", "SNAPSHOT"),),
    "main-transaction": (("accounts", "ACCESS SHARE"),),
    "validate 1": (("orders", "ACCESS SHARE"), ("orders", "SHARE UPDATE EXCLUSIVE")),
    "validate 2": (("orders", "ACCESS SHARE"), ("orders", "SHARE UPDATE EXCLUSIVE"), ("orders", "SHARE UPDATE EXCLUSIVE")),
    "set_not_null": (("orders", "ACCESS SHARE"), ("orders", "SHARE UPDATE EXCLUSIVE"), ("orders", "ACCESS SHARE")),
    "drop_index_concurrently": (("orders", "ACCESS SHARE"), ("orders", "SHARE UPDATE EXCLUSIVE"), ("events", "ACCESS SHARE"),
                                ("events", "ACCESS SHARE"), ("events", "ACCESS SHARE")),
    # events.attempts made bigint as a dual column: the expand takes events ACCESS EXCLUSIVE first (the main
    # transaction leaves it alone: the enum value is added in place, its column's default untouched); the fill's
    # batches take it ROW EXCLUSIVE (SHARE stops them, and the writers' inserts, for the hold); the next ACCESS
    # EXCLUSIVE after the expand is the cut-over's LOCK, the one after it the contract's DROP COLUMN, and the
    # concurrent drop of its index comes after those
    "expand": (("events", "ACCESS SHARE"),),
    "backfill": (("events", "ACCESS SHARE"), ("events", "SHARE")),
    "cutover": (("events", "ACCESS SHARE"), ("events", "ACCESS SHARE")),
    "contract": (("events", "ACCESS SHARE"), ("events", "ACCESS SHARE"), ("events", "ACCESS SHARE")),
    # sessions made partitioned, a shadow table: its expand takes sessions SHARE ROW EXCLUSIVE (a writer's ROW
    # EXCLUSIVE holds it); the copy and the catch-up only read it; the cut-over takes it ACCESS EXCLUSIVE
    "shadow expand": (("sessions", "ROW EXCLUSIVE"),),
    "shadow cutover": (("sessions", "ROW EXCLUSIVE"), ("sessions", "ROW EXCLUSIVE")),
}
CAP = 0.6  # of the caught step's lock_timeout: the hold never fails the step it brakes


def statement_key(statement: str) -> str:
    """A statement as pg_stat_activity shows it and as the plan holds it, alike: its first 60 characters, spaces
    folded."""
    return " ".join(statement.split())[:60]


BRAKE_HOLD = (0.4, 1.4)  # seconds the aimed phase is held, under the apply's lock_timeout (2s)
PASS_HOLD = (0.05, 0.2)  # how long a gate before the last keeps holding once the next one is asked for


class Brake(threading.Thread):
    """Runs one chain of gates (see AIMS). ``waiting`` is set while the apply waits on the last gate: the fault is
    injected then; the last gate lets go after ``hold`` seconds or when halted."""

    def __init__(self, dsn: str, aim: str, hold: float, rng: random.Random,
                 lock_timeouts: Mapping[str, float] | None = None) -> None:
        """``lock_timeouts``: each step's lock_timeout in seconds, by its statement (``statement_key``): the last gate
        holds the statement it catches for at most CAP of it (a cut-over waits 500 ms, not the plan's 2 s)."""
        super().__init__(name=f"brake {aim}", daemon=True)
        self.dsn, self.phase, self.hold, self.rng = dsn, aim, hold, rng
        self.lock_timeouts = dict(lock_timeouts or {})
        self.gates = AIMS[aim]
        self.holding, self.waiting, self.halt = threading.Event(), threading.Event(), threading.Event()
        self.note = ""
        self.error: str | None = None
        self.caught: list[str] = []  # what each gate held up, in order (the session and its statement)

    def run(self) -> None:
        sessions: list[psycopg.Connection[Any]] = []
        try:
            with fc.connect(self.dsn) as probe:
                self._chain(probe, sessions)
        except (psycopg.Error, RuntimeError) as exc:
            self.error = fc.short(str(exc), 120)
        finally:
            self.holding.set()  # never leaves the trial waiting for it
            for conn in sessions:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
                    conn.close()
        caught = f" (gates caught: {' / '.join(self.caught)})" if self.caught else ""
        self.note = (f"brake on {self.phase}: {self.error}{caught}" if self.error else
                     f"brake held {self.phase} back {self.hold:.2f}s{caught}" if self.waiting.is_set() else
                     f"brake on {self.phase}: the apply never waited on it{caught}")

    def _chain(self, probe: psycopg.Connection[Any], sessions: list[psycopg.Connection[Any]]) -> None:
        granted: list[threading.Event] = []
        for number, gate in enumerate(self.gates):
            conn = psycopg.connect(self.dsn, connect_timeout=5, application_name=f"faults brake {number}")
            sessions.append(conn)
            conn.execute("SET lock_timeout = '60s'")
            got = threading.Event()
            granted.append(got)
            if number == 0:
                self._take(conn, gate, got)
                self.holding.set()
            else:  # asked for while the apply waits on the gate before: granted when that phase is through
                threading.Thread(target=self._take, args=(conn, gate, got), daemon=True).start()
                self.halt.wait(self.rng.uniform(*PASS_HOLD))
                sessions[number - 1].rollback()
            last = number == len(self.gates) - 1
            if not self._apply_waits_on(probe, conn.info.backend_pid):
                return
            if last:
                self.waiting.set()
                self.halt.wait(self.hold)
                conn.rollback()

    def _take(self, conn: psycopg.Connection[Any], gate: Gate, got: threading.Event) -> None:
        table, mode = gate
        with contextlib.suppress(psycopg.Error):  # a failed gate shows as the apply never waiting on it
            if mode == "SNAPSHOT":
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            elif mode == "ENUM":
                conn.execute(sql.SQL("ALTER TYPE {} ADD VALUE 'faults brake'").format(sql.Identifier(table)))
            else:
                conn.execute(sql.SQL("LOCK TABLE {} IN {} MODE").format(sql.Identifier(table), sql.SQL(mode)))
            got.set()

    def _apply_waits_on(self, probe: psycopg.Connection[Any], gate_pid: int, seconds: float = 60.0) -> bool:
        """Until an apply session waits behind this gate (pg_blocking_pids names it), or the time is up."""
        deadline = time.monotonic() + seconds
        while not self.halt.is_set() and time.monotonic() < deadline:
            row = probe.execute("SELECT application_name, query FROM pg_stat_activity "
                                "WHERE datname = current_database() AND application_name NOT LIKE 'faults%%' "
                                "AND %s = ANY(pg_blocking_pids(pid)) LIMIT 1", (gate_pid,)).fetchone()
            if row:
                key = statement_key(str(row[1]))
                self.caught.append(f"{row[0]}: {key}")
                if key in self.lock_timeouts:
                    self.hold = min(self.hold, CAP * self.lock_timeouts[key])
                return True
            time.sleep(0.003)
        return False
