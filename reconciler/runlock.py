"""The apply lock, and what it says about a run: one apply at a time per database, alive while its lock is held.

An apply holds a session advisory lock on its target for as long as it runs; the lock goes with the session when
the process or its server session dies. A run's row records the pid *and* start time of that session, so a row
is alive exactly when the session it names, and no other that reused its pid, holds the lock. Names never count:
a DSN may set any ``application_name``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

LOCK_KEY = 0x7265636F6E63_00  # "recon": one apply at a time per database

# pg_try_advisory_lock(bigint) shows in pg_locks as classid = the high 32 bits, objid = the low ones, objsubid = 1
_HELD_BY = (
    "SELECT l.pid, a.backend_start FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    f"AND l.classid = {LOCK_KEY >> 32} AND l.objid = {LOCK_KEY & 0xFFFFFFFF} "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def alive_predicate(run: str, *, with_start: bool) -> str:
    """SQL that is true when the row ``run`` (an alias of the runs table) names a session holding the apply lock.

    The session's start time is compared when the row has one and the reader may see it (pg_stat_activity shows
    another role's ``backend_start`` only to members of pg_read_all_stats): a pid alone could have been reused."""
    start = (f" AND (h.backend_start IS NULL OR {run}.backend_start IS NULL OR h.backend_start = {run}.backend_start)"
             if with_start else "")
    return f"EXISTS (SELECT 1 FROM ({_HELD_BY}) h WHERE h.pid = {run}.backend_pid{start})"


@dataclass(frozen=True)
class Session:
    """A backend, as pg_stat_activity names it for as long as it lives."""

    pid: int
    started: datetime


def this_session(conn: psycopg.Connection[Any]) -> Session:
    row = conn.execute("SELECT pg_backend_pid(), backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()
    assert row is not None
    return Session(int(row[0]), row[1])


def holders(conn: psycopg.Connection[Any]) -> list[Session | int]:
    """Who holds the apply lock on this database: sessions, or bare pids where their start cannot be read."""
    return [Session(int(pid), start) if start is not None else int(pid) for pid, start in conn.execute(_HELD_BY).fetchall()]


def held_on(conn: psycopg.Connection[Any], seconds: float = 2.0) -> list[Session | int]:
    """Who holds the apply lock and still holds it ``seconds`` later (empty as soon as nobody does): a plan's
    settling of a dead run's leftovers takes the lock for a moment, and is no apply under way."""
    deadline = time.monotonic() + seconds
    while True:
        found = holders(conn)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def try_lock(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
    return bool(row and row[0])


def unlock(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def lock_within(conn: psycopg.Connection[Any], seconds: float) -> bool:
    """Take the lock, waiting up to ``seconds`` (polling, so the wait can be interrupted)."""
    deadline = time.monotonic() + seconds
    while not try_lock(conn):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def cancel(conn: psycopg.Connection[Any], pid: int, started: datetime | None) -> bool:
    """pg_cancel_backend of the run's session, and of no other: the pid must hold the apply lock and, when the row
    recorded it, the session must have started when the row says (a pid can be reused by any later session)."""
    same = "h.backend_start = %s::timestamptz" if started is not None else "true"
    row = conn.execute(f"SELECT bool_or(pg_cancel_backend(h.pid)) FROM ({_HELD_BY}) h WHERE h.pid = %s AND {same}",
                       (pid, started) if started is not None else (pid,)).fetchone()
    return bool(row and row[0])
