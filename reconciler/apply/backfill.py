"""A backfill step (safety/backfill.py) run without holding a lock through the fill: its UPDATE restricted to a
range of the table's pages at a time, each range its own short transaction, sized so a batch takes about
``target_seconds``.

Pages, not keys: a table needs no key for it, every row existing when the fill starts lies in the pages counted
then, and with a TID range scan (PostgreSQL 14 and later) a batch reads only its pages. Rows written meanwhile, and
new versions of rows updated meanwhile, are filled by the step's trigger (the fill's own UPDATE leaves the column
set, so the trigger lets it be). The UPDATE touches only rows still NULL, so a fill that stopped part-way, planned
again, fills only what is left.

Before each batch the fill looks at what it would make worse, and waits while any is past its limit (``BackfillLimits``),
saying why: a streaming replica's replay lag (time, and WAL bytes still to replay, from ``pg_stat_replication``,
which needs a superuser or ``pg_monitor`` to show them), sessions waiting for a lock on the table, and the
oldest open transaction of the database (while it is open, the row versions the fill replaces cannot be vacuumed).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from ..errors import ApplyError
from ..safety import Step
from ..safety.dual_column import VERIFY_KIND
from .options import BackfillLimits

log = logging.getLogger(__name__)

FIRST_PAGES = 16
MAX_PAGES = 65536
REPORT_SECONDS = 5.0


Report = Callable[[dict[str, Any]], dict[str, Any]]


def run_backfill(conn: psycopg.Connection[Any], step: Step, *, limits: BackfillLimits, lock_retries: int,
                 check: Callable[[], None] = lambda: None, report: Report | None = None) -> int:
    """Fill the step's table batch by batch; returns the rows updated. ``check`` runs before each batch and while
    paused (a signal stops the fill between two batches: what is filled stays filled). ``report`` is given the
    progress before each batch and while paused (the run's history row: ``reconciler backfill status``) and returns
    what an operator asked (``paused``, ``batch_seconds``: ``reconciler backfill pause|resume|throttle``)."""
    schema, table = step.identity[0], step.identity[1]
    relation = sql.Identifier(schema, table).as_string(conn)
    row = conn.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int", (relation,)).fetchone()
    pages = int(row[0]) if row else 0
    batch = sql.SQL("{} AND ctid >= %s::tid AND ctid < %s::tid").format(sql.SQL(step.sql))  # the compiler's UPDATE
    fill = _Fill(step, pages, report or (lambda _progress: {}))
    watch = _Watch(conn, step.object, relation, limits)
    start, size = 0, FIRST_PAGES
    log.info("backfill %s: %s pages to %s in batches of about %.1fs", step.object, f"{pages:,}",
             "check" if step.kind == VERIFY_KIND else "fill", limits.batch_seconds)
    while start < pages:
        check()
        requested = fill.say("filling", start)
        reasons = watch.reasons(requested)
        if reasons:
            requested = watch.wait(reasons, check, functools.partial(fill.paused, start))
        target = float(requested.get("batch_seconds") or limits.batch_seconds)
        end = min(start + size, pages)
        took = _batch(conn, step, batch, start, end, lock_retries)
        fill.rows += took[1]
        if step.kind == VERIFY_KIND and fill.rows:
            raise ApplyError(f"step {step.index} ({step.kind} {step.object}): {fill.rows} row(s) of pages {start} to "
                             f"{end} do not hold the conversion of their old value: the cut-over does not go on")
        log.debug("backfill %s: pages %d to %d, %d rows in %.3fs", step.object, start, end, took[1], took[0])
        # the next batch sized to take about the target: at most twice this one's pages, at least one page
        scale = target / took[0] if took[0] > 0 else 2.0
        size = max(1, min(MAX_PAGES, int((end - start) * min(scale, 2.0))))
        start = end
        fill.log(start)
    fill.say("done", pages)
    return fill.rows


class _Fill:
    """A fill's counts, said to the log every few seconds and to the run's history row before each batch."""

    def __init__(self, step: Step, pages: int, report: Report) -> None:
        self.step, self.pages, self.report = step, pages, report
        self.rows = 0
        self.began = self.reported = time.monotonic()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.began
        return self.rows / elapsed if elapsed > 0 else 0.0

    def left(self, done: int) -> float:
        return (self.pages - done) * (time.monotonic() - self.began) / done if done else 0.0

    def say(self, state: str, done: int, reason: str | None = None) -> dict[str, Any]:
        return self.report({
            "step": self.step.index, "object": self.step.object, "state": state, "reason": reason,
            "pages": self.pages, "pages_done": done, "rows": self.rows, "rows_per_second": round(self.rate(), 1),
            "seconds_left": round(self.left(done), 1), "updated_at": datetime.now(UTC).isoformat(timespec="seconds")})

    def paused(self, done: int, reason: str) -> dict[str, Any]:
        return self.say("paused", done, reason)

    def log(self, done: int) -> None:
        now = time.monotonic()
        if now - self.reported >= REPORT_SECONDS or done >= self.pages:
            self.reported = now
            log.info("backfill %s: page %s of %s (%.0f%%), %s rows, %s rows/s, about %.0fs left", self.step.object,
                     f"{done:,}", f"{self.pages:,}", 100.0 * done / self.pages if self.pages else 100.0,
                     f"{self.rows:,}", f"{self.rate():,.0f}", self.left(done))


class _Watch:
    """What the fill would make worse, looked at before each batch; waits while any is past its limit."""

    def __init__(self, conn: psycopg.Connection[Any], what: str, relation: str, limits: BackfillLimits) -> None:
        self.conn, self.what, self.relation, self.limits = conn, what, relation, limits
        self.unseen_warned = False

    def wait(self, reasons: list[str], check: Callable[[], None], say: Callable[[str], dict[str, Any]]
             ) -> dict[str, Any]:
        """Wait while there are reasons to (each change of them logged and said to the history row); returns what
        an operator last asked."""
        paused, said = time.monotonic(), ""
        requested: dict[str, Any] = {}
        while reasons:
            text = "; ".join(reasons)
            if text != said:
                log.warning("backfill %s paused: %s", self.what, text)
                said = text
            check()
            requested = say(text)
            time.sleep(self.limits.pause_check_seconds)
            reasons = self.reasons(requested)
        log.info("backfill %s resumed after %.0fs paused", self.what, time.monotonic() - paused)
        return requested

    def reasons(self, requested: dict[str, Any] | None = None) -> list[str]:
        """Why the fill should wait now (empty: it need not); ``requested``: what an operator asked."""
        limits, found = self.limits, []
        if requested and requested.get("paused"):
            found.append(f"paused by {requested.get('by') or 'an operator'} (`reconciler backfill resume` goes on)")
        replicas = self.conn.execute(
            "SELECT coalesce(application_name, ''), extract(epoch FROM replay_lag)::float8, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8 FROM pg_stat_replication").fetchall()
        for name, lag, behind in replicas:
            if behind is None and not self.unseen_warned:
                log.warning("backfill %s: cannot see how far replica %r is behind (pg_stat_replication shows it to "
                            "superusers and pg_monitor members): its lag does not pause the fill", self.what, name)
                self.unseen_warned = True
            if lag is not None and lag > limits.max_replica_lag_seconds:
                found.append(f"replica {name!r} replays {lag:.0f}s behind (limit {limits.max_replica_lag_seconds:.0f}s)")
            elif behind is not None and behind > limits.max_replica_bytes:
                found.append(f"replica {name!r} has {_mib(behind)} of WAL still to replay (limit "
                             f"{_mib(limits.max_replica_bytes)})")
        row = self.conn.execute(
            # sessions waiting for a lock on the table, or for a row of it (those hold a lock on the table meanwhile)
            "SELECT (SELECT count(DISTINCT w.pid) FROM pg_locks w WHERE NOT w.granted AND (w.relation = %(t)s::regclass "
            " OR EXISTS (SELECT FROM pg_locks h WHERE h.pid = w.pid AND h.granted AND h.relation = %(t)s::regclass))), "
            "(SELECT extract(epoch FROM max(now() - xact_start))::float8 FROM pg_stat_activity "
            " WHERE datname = current_database() AND xact_start IS NOT NULL AND pid <> pg_backend_pid() "
            " AND backend_type = 'client backend' AND application_name NOT LIKE 'reconciler %%')",
            {"t": self.relation}).fetchone()
        waiters, oldest = (int(row[0]), row[1]) if row else (0, None)
        if waiters > limits.max_lock_waiters:
            found.append(f"{waiters} sessions wait for a lock on the table (limit {limits.max_lock_waiters})")
        if oldest is not None and oldest > limits.max_transaction_age_seconds:
            found.append(f"a transaction has been open {oldest:.0f}s (limit {limits.max_transaction_age_seconds:.0f}s): "
                         "the row versions the fill replaces cannot be vacuumed meanwhile")
        return found


def _mib(n: float) -> str:
    return f"{n / 1024**2:.1f} MiB"


def _batch(conn: psycopg.Connection[Any], step: Step, batch: sql.Composed, start: int, end: int,
           lock_retries: int) -> tuple[float, int]:
    """One range of pages in its own transaction, retried when it waits too long for a row lock; (seconds, rows)."""
    for attempt in range(lock_retries + 1):
        began = time.perf_counter()
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                              (step.lock_timeout, step.statement_timeout))
                cursor = conn.execute(batch, (f"({start},0)", f"({end},0)"))
                if step.kind == VERIFY_KIND:  # a count of the rows found wrong
                    found = cursor.fetchone()
                    return time.perf_counter() - began, int(found[0]) if found else 0
            return time.perf_counter() - began, max(cursor.rowcount, 0)
        except psycopg.errors.LockNotAvailable:
            if attempt == lock_retries:
                raise ApplyError(f"step {step.index} (backfill {step.object}) could not lock rows of pages {start} to "
                                 f"{end} within lock_timeout {step.lock_timeout} after {attempt + 1} attempts") from None
            time.sleep(min(0.5 * 2**attempt, 10.0))
        except psycopg.Error as exc:
            raise ApplyError(f"step {step.index} (backfill {step.object}) failed on pages {start} to {end}: "
                             f"{exc.diag.message_primary or exc}") from exc
    raise AssertionError("unreachable")
