"""How long each step waited for a lock, and behind whom: sampled from a connection of its own (pg_stat_activity
says when a backend waits on a heavyweight lock, pg_blocking_pids who holds it up). A step that gives up on its
lock names those sessions, so an operator knows what to wait for or stop; never their statements' text, which may
hold data or secrets, only its first word."""

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
                            self._blockers.update(_blocking(conn, self.pid))
                        time.sleep(self.INTERVAL)
        except (psycopg.Error, ReconcilerError) as exc:  # measuring is best effort; applying is not affected
            log.debug("lock-wait monitor stopped: %s", exc)


_BLOCKING = """
SELECT b.pid, coalesce(nullif(b.application_name, ''), b.backend_type), b.state,
       extract(epoch FROM clock_timestamp() - coalesce(b.xact_start, b.backend_start))::float8,
       upper(substring(ltrim(b.query) FROM '^[A-Za-z]+'))
FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(%s))
"""


def _blocking(conn: psycopg.Connection[Any], pid: int) -> dict[int, str]:
    found = {}
    for blocker, name, state, age, verb in conn.execute(_BLOCKING, (pid,)).fetchall():
        doing = f"{state}, {verb}" if state == "active" and verb else str(state or "?")
        found[int(blocker)] = f"pid {blocker} ('{name}', {doing}, in its transaction for {float(age or 0):.1f} s)"
    return found
