"""How long each step waited for a lock, and behind whom: sampled from a connection of its own (pg_stat_activity
says when a backend waits on a heavyweight lock, pg_blocking_pids who holds it up). A step that gives up on its
lock names those sessions, so an operator knows what to wait for or stop; never their statements' text, which may
hold data or secrets, only its first word.

An autovacuum (not one against wraparound) the step waits behind is cancelled, as PostgreSQL itself cancels it
for a waiter after ``deadlock_timeout`` (1 s): a cut-over waits 500 ms at most, and on a table writers keep busy
autovacuum is often there, so it would give up on its lock time after time. The vacuum starts again later."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from ..errors import ReconcilerError
from ..servers import connect

log = logging.getLogger(__name__)


class LockWaitMonitor:
    """How long one backend's current step has waited for a lock, and behind whom: fed by a LockWaitSampler."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.waited = 0.0
        self._blockers: dict[int, str] = {}  # pid -> the session as last seen holding this step up
        self.crossed = False  # a session it waited behind was waiting for a lock the step held: the two crossed
        self.active = False

    def begin(self) -> None:
        self.waited = 0.0
        self._blockers = {}
        self.crossed = False
        self.active = True

    def blockers(self) -> str:
        """The sessions the step waited behind (as last seen), for its error: empty when none was seen."""
        found = list(self._blockers.values())
        if not found:
            return ""
        return "; it waited behind " + ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")

    def end(self) -> float:
        self.active = False
        return self.waited * 1000


class LockWaitSampler:
    """Samples the backends of any number of applies on one server from a single connection of its own
    (pg_stat_activity and pg_blocking_pids see the whole server): a fleet's applies on a server share one, so
    watching their lock waits takes one connection there, not one per database. Measuring is best effort: a
    lost connection is opened again, at most once a second, while a step is watched."""

    INTERVAL = 0.02
    RECONNECT_SECONDS = 1.0

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._watched: dict[int, LockWaitMonitor] = {}
        self._guard = threading.Lock()
        # autovacuum passes asked to stop, once each: a worker cancelled on one table goes on to the next of its
        # list under the same pid, and may hold up the next step there
        self._cancelled: set[tuple[int, str]] = set()  # (pid, when its pass on the table began)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconciler-lock-wait", daemon=True)

    def __enter__(self) -> LockWaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @contextlib.contextmanager
    def watching(self, pid: int) -> Iterator[LockWaitMonitor]:
        monitor = LockWaitMonitor(pid)
        with self._guard:
            self._watched[pid] = monitor
        try:
            yield monitor
        finally:
            with self._guard:
                if self._watched.get(pid) is monitor:
                    del self._watched[pid]

    def _active(self) -> dict[int, LockWaitMonitor]:
        with self._guard:
            return {pid: m for pid, m in self._watched.items() if m.active}

    def _loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        tried = 0.0
        try:
            while not self._stop.wait(self.INTERVAL):
                active = self._active()
                if not active:
                    continue
                if conn is None or conn.closed or conn.broken:
                    if time.monotonic() - tried < self.RECONNECT_SECONDS:
                        continue
                    tried = time.monotonic()
                    try:
                        conn = connect(self.dsn, application_name="reconciler monitor")
                    except (psycopg.Error, ReconcilerError) as exc:
                        log.debug("lock-wait monitor cannot connect: %s", exc)
                        continue
                try:
                    self._sample(conn, active)
                except psycopg.Error as exc:
                    log.debug("lock-wait monitor lost its connection: %s", exc)
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()

    def _sample(self, conn: psycopg.Connection[Any], active: dict[int, LockWaitMonitor]) -> None:
        waiting = [int(r[0]) for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s) AND wait_event_type = 'Lock'",
            (list(active),)).fetchall()]
        for pid in waiting:
            monitor = active[pid]
            monitor.waited += self.INTERVAL
            found = _blocking(conn, pid)
            monitor._blockers.update((blocker, text) for blocker, (text, _vacuum, _began, _c) in found.items())
            monitor.crossed = monitor.crossed or any(crossed for *_f, crossed in found.values())
            for blocker, (_text, vacuum, began, _crossed) in found.items():
                if vacuum and (blocker, began) not in self._cancelled:
                    self._cancelled.add((blocker, began))
                    self._cancel_autovacuum(conn, monitor, blocker, vacuum)

    def _cancel_autovacuum(self, conn: psycopg.Connection[Any], monitor: LockWaitMonitor, pid: int, what: str) -> None:
        try:
            row = conn.execute("SELECT pg_cancel_backend(%s)", (pid,)).fetchone()
        except psycopg.Error as exc:  # not a member of pg_signal_backend (pg_signal_autovacuum_worker in 18)
            log.info("the step waits behind %s (pid %d), which this role may not cancel (%s): PostgreSQL cancels it "
                     "after deadlock_timeout", what, pid, (exc.diag.message_primary or str(exc)).strip())
            return
        if row and row[0]:
            monitor._blockers[pid] = f"pid {pid} ({what}, cancelled: it starts again later)"
            log.warning("cancelled %s (pid %d): the step waited behind it, as PostgreSQL itself cancels an autovacuum "
                        "a lock waits for (after deadlock_timeout); it starts again later", what, pid)


@contextlib.contextmanager
def lock_waits(dsn: str, pid: int, sampler: LockWaitSampler | None = None) -> Iterator[LockWaitMonitor]:
    """The lock waits of backend ``pid``, watched by ``sampler`` (a fleet's, shared per server) or by one of its own."""
    with contextlib.nullcontext(sampler) if sampler is not None else LockWaitSampler(dsn) as used, \
            used.watching(pid) as monitor:
        yield monitor


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
