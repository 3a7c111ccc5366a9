"""How long each step waited for a lock, and behind whom: sampled from a connection of its own (pg_stat_activity
says when a backend waits on a heavyweight lock, pg_blocking_pids who holds it up). A step that gives up on its
lock names those sessions, so an operator knows what to wait for or stop; never their statements' text, which may
hold data or secrets, only its first word.

An autovacuum (not one against wraparound) the step waits behind is cancelled, as PostgreSQL itself cancels it
for a waiter after ``deadlock_timeout`` (1 s): a cut-over waits 500 ms at most, and on a table writers keep busy
autovacuum is often there, so it would give up on its lock time after time. The vacuum starts again later."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg

from ..errors import ReconcilerError
from ..servers import connect

log = logging.getLogger(__name__)


class LockWaitMonitor:
    """Samples the executor's backend from a connection of its own to measure each step's lock wait
    (pg_stat_activity says when a backend waits on a heavyweight lock)."""

    INTERVAL = 0.02

    def __init__(self, dsn: str, pid: int) -> None:
        self.dsn, self.pid = dsn, pid
        self.waited = 0.0
        self._blockers: dict[int, str] = {}  # pid -> the session as last seen holding this step up
        self.crossed = False  # a session it waited behind was waiting for a lock the step held: the two crossed
        # autovacuum passes asked to stop, once each: a worker cancelled on one table goes on to the next of its
        # list under the same pid, and may hold up the next step there
        self._cancelled: set[tuple[int, str]] = set()  # (pid, when its pass on the table began)
        self._active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconciler-lock-wait", daemon=True)

    def __enter__(self) -> LockWaitMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def begin(self) -> None:
        self.waited = 0.0
        self._blockers = {}
        self.crossed = False
        self._active.set()

    def blockers(self) -> str:
        """The sessions the step waited behind (as last seen), for its error: empty when none was seen."""
        found = list(self._blockers.values())
        if not found:
            return ""
        return "; it waited behind " + ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")

    def end(self) -> float:
        self._active.clear()
        return self.waited * 1000

    def _loop(self) -> None:
        try:
            with connect(self.dsn, application_name="reconciler monitor") as conn:
                while not self._stop.is_set():
                    if self._active.wait(0.1) and not self._stop.is_set():
                        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                           (self.pid,)).fetchone()
                        if row and row[0] == "Lock":
                            self.waited += self.INTERVAL
                            found = _blocking(conn, self.pid)
                            self._blockers.update((pid, text) for pid, (text, _vacuum, _began, _c) in found.items())
                            self.crossed = self.crossed or any(crossed for *_f, crossed in found.values())
                            for pid, (_text, vacuum, began, _crossed) in found.items():
                                if vacuum and (pid, began) not in self._cancelled:
                                    self._cancelled.add((pid, began))
                                    self._cancel_autovacuum(conn, pid, vacuum)
                        time.sleep(self.INTERVAL)
        except (psycopg.Error, ReconcilerError) as exc:  # measuring is best effort; applying is not affected
            log.debug("lock-wait monitor stopped: %s", exc)


    def _cancel_autovacuum(self, conn: psycopg.Connection[Any], pid: int, what: str) -> None:
        try:
            row = conn.execute("SELECT pg_cancel_backend(%s)", (pid,)).fetchone()
        except psycopg.Error as exc:  # not a member of pg_signal_backend (pg_signal_autovacuum_worker in 18)
            log.info("the step waits behind %s (pid %d), which this role may not cancel (%s): PostgreSQL cancels it "
                     "after deadlock_timeout", what, pid, (exc.diag.message_primary or str(exc)).strip())
            return
        if row and row[0]:
            self._blockers[pid] = f"pid {pid} ({what}, cancelled: it starts again later)"
            log.warning("cancelled %s (pid %d): the step waited behind it, as PostgreSQL itself cancels an autovacuum "
                        "a lock waits for (after deadlock_timeout); it starts again later", what, pid)


_BLOCKING = """
SELECT b.pid, coalesce(nullif(b.application_name, ''), b.backend_type), b.state,
       extract(epoch FROM clock_timestamp() - coalesce(b.xact_start, b.backend_start))::float8,
       upper(substring(ltrim(b.query) FROM '^[A-Za-z]+')),
       CASE WHEN b.backend_type = 'autovacuum worker' AND b.query NOT LIKE '%%(to prevent wraparound)%%'
            THEN b.query END, b.query_start, %(pid)s = ANY(pg_blocking_pids(b.pid))
FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(%(pid)s))
"""


def _blocking(conn: psycopg.Connection[Any], pid: int) -> dict[int, tuple[str, str | None, str, bool]]:
    """Each blocker described, with what it vacuums when it is an autovacuum that may be cancelled (the worker's
    query names only the table: 'autovacuum: VACUUM public.t'), when its statement began (a worker's pass on each
    table is a statement of its own), and whether it waits in turn for a lock the step holds."""
    found = {}
    for blocker, name, state, age, verb, vacuum, began, crossed in conn.execute(_BLOCKING, {"pid": pid}).fetchall():
        doing = f"{state}, {verb}" if state == "active" and verb else str(state or "?")
        waits = ", waiting for a lock this step holds" if crossed else ""
        found[int(blocker)] = (f"pid {blocker} ('{name}', {doing}, in its transaction for {float(age or 0):.1f} s{waits})",
                               str(vacuum) if vacuum else None, str(began), bool(crossed))
    return found
