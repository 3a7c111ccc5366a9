"""How long each step waited for a lock: sampled from a connection of its own (pg_stat_activity says when a
backend waits on a heavyweight lock)."""

from __future__ import annotations

import logging
import threading
import time

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
        self._active.set()

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
                        time.sleep(self.INTERVAL)
        except (psycopg.Error, ReconcilerError) as exc:  # measuring is best effort; applying is not affected
            log.debug("lock-wait monitor stopped: %s", exc)
