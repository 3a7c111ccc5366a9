"""A backfill step (safety/backfill.py) run without holding a lock through the fill: its UPDATE restricted to a
range of the table's pages at a time, each range its own short transaction, sized so a batch takes about
``target_seconds``.

Pages, not keys: a table needs no key for it, every row existing when the fill starts lies in the pages counted
then, and with a TID range scan (PostgreSQL 14 and later) a batch reads only its pages. Rows written meanwhile, and
new versions of rows updated meanwhile, are filled by the step's trigger (the fill's own UPDATE leaves the column
set, so the trigger lets it be). The UPDATE touches only rows still NULL (or not yet equal to their conversion), so a fill that
stopped part-way, planned again, fills only what is left.

Resumable: the progress written to the run's history row before each batch is a checkpoint (``key``: the step's
SQL; ``pages_done``: every page before it filled). A later run of the same step goes on from the newest one an
ended run left, never from page 0, when it can prove nothing before that page has been missed since: the table's
file is the same (``pg_relation_filenode``: no VACUUM FULL or CLUSTER moved rows between pages) and so are its
helper triggers (their oids: the one that kept each insert and update filled has been there all along; a plan made
again replaces it OR REPLACE, which keeps the oid). Otherwise it starts from page 0 and says why.

Before each batch the fill looks at what it would make worse, and waits while any is past its limit (``BackfillLimits``),
saying why: a streaming replica's replay lag (time, and WAL bytes still to replay, from ``pg_stat_replication``,
which needs a superuser or ``pg_monitor`` to show them), sessions waiting for a lock on the table, and the
oldest open transaction of the database (while it is open, the row versions the fill replaces cannot be vacuumed).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import queue
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from ..errors import ApplyError, ReconcilerError
from ..safety import Step
from ..safety.dual_column import VERIFY_KIND
from ..safety.shadow_table import COPY_KIND
from .options import BackfillLimits

log = logging.getLogger(__name__)

FIRST_PAGES = 16
MAX_PAGES = 65536
REPORT_SECONDS = 5.0
_NO_CONFLICT = " ON CONFLICT DO NOTHING"


Report = Callable[[dict[str, Any]], dict[str, Any]]
Checkpoints = Callable[[str], "tuple[str, dict[str, Any]] | None"]


def run_backfill(conn: psycopg.Connection[Any], step: Step, *, limits: BackfillLimits, lock_retries: int,
                 check: Callable[[], None] = lambda: None, report: Report | None = None,
                 resume: Checkpoints | None = None,
                 session: Callable[[], psycopg.Connection[Any]] | None = None) -> int:
    """Fill the step's table batch by batch; returns the rows updated. ``check`` runs before each batch and while
    paused (a signal stops the fill between two batches: what is filled stays filled). ``report`` is given the
    progress before each batch and while paused (the run's history row: ``reconciler backfill status``) and returns
    what an operator asked (``paused``, ``batch_seconds``: ``reconciler backfill pause|resume|throttle``).
    ``resume`` finds an earlier run's checkpoint of the same step (see the module's docstring). ``session`` opens
    another session to the target: with it, ``limits.workers`` batches run side by side, each in a session of its
    own (``conn`` then only looks at the limits), so a fill is not held to one core of the server."""
    schema, table = step.identity[0], step.identity[1]
    relation = sql.Identifier(schema, table).as_string(conn)
    row = conn.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int", (relation,)).fetchone()
    pages = int(row[0]) if row else 0
    batch = _ranged(step)
    continuity = _continuity(conn, relation)
    fill = _Fill(step, pages, report or (lambda _progress: {}), continuity)
    watch = _Watch(conn, step.object, relation, limits)
    start, size = _resumed(step, fill.key, continuity, pages, resume), FIRST_PAGES
    fill.resumed_from = start
    count = max(1, limits.workers) if session is not None and pages - start > FIRST_PAGES else 1
    done, target = _Done(start), limits.batch_seconds
    with _Workers(conn, count, session, step.object) as workers:
        watch.ours, fill.workers = workers.pids, workers.count
        log.info("backfill %s: %s pages to %s in batches of about %s%s", step.object, f"{pages - start:,}",
                 {VERIFY_KIND: "check", COPY_KIND: "copy"}.get(step.kind, "fill"), batch_time(limits.batch_seconds),
                 f", {workers.count} at a time" if workers.count > 1 else "")
        while start < pages or workers.busy:
            if start < pages and workers.free:
                check()
                requested = fill.say("filling", done.before)
                reasons = watch.reasons(requested)
                if reasons:
                    requested = watch.wait(reasons, check, functools.partial(fill.paused, done.before))
                target = float(requested.get("batch_seconds") or limits.batch_seconds)
                end = min(start + size, pages)
                workers.run(start, end, functools.partial(_batch, step=step, batch=batch, start=start, end=end,
                                                          lock_retries=lock_retries))
                start = end
                continue
            for (first, last), took in workers.finished():
                fill.rows += took[1]
                if step.kind == VERIFY_KIND and took[1]:
                    raise ApplyError(f"step {step.index} ({step.kind} {step.object}): {took[1]} row(s) of pages "
                                     f"{first} to {last} do not hold the conversion of their old value: the cut-over "
                                     "does not go on")
                log.debug("backfill %s: pages %d to %d, %d rows in %.3fs", step.object, first, last, took[1], took[0])
                # the next batch sized to take about the target: at most twice this one's pages, at least one page
                scale = target / took[0] if took[0] > 0 else 2.0
                size = max(1, min(MAX_PAGES, int((last - first) * min(scale, 2.0))))
                before = done.before
                fill.log(done.add(first, last))
                if start >= pages and done.before > before:  # no batch left to say it before: the checkpoint now
                    fill.say("filling", done.before)
    fill.say("done", pages)
    return fill.rows


class _Done:
    """Which pages are done when batches end out of order: ``before``, the page every page before which is done,
    is what a checkpoint may say (a later run goes on from it; the pages done past it are done again, which
    changes nothing)."""

    def __init__(self, start: int) -> None:
        self.before = start
        self.ahead: dict[int, int] = {}  # ranges done past ``before``: first page -> the page after the last

    def add(self, first: int, last: int) -> int:
        self.ahead[first] = last
        while self.before in self.ahead:
            self.before = self.ahead.pop(self.before)
        return self.before


class _Workers:
    """The sessions batches run in: ``conn`` itself for one at a time; for more, a session of its own for each,
    each batch run by a thread (psycopg waits for the server without holding the interpreter). A batch that fails
    stops the fill: the ones running end first (each commits or rolls back on its own), then its error is raised."""

    def __init__(self, conn: psycopg.Connection[Any], count: int,
                 session: Callable[[], psycopg.Connection[Any]] | None, what: str) -> None:
        self.conn, self.count, self.session, self.what = conn, count, session, what
        self.idle: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()
        self.own: list[psycopg.Connection[Any]] = []
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.running: dict[concurrent.futures.Future[tuple[float, int]], tuple[int, int]] = {}
        self.pids: list[int] = []  # the sessions of its own: their waits for a row are not a reason to pause

    def __enter__(self) -> _Workers:
        if self.count > 1 and self.session is not None:
            try:
                for _ in range(self.count):
                    self.own.append(self.session())
            except (ReconcilerError, psycopg.Error) as exc:  # the role's or the server's connection limit, say
                log.warning("backfill %s: cannot open %d sessions to fill side by side (%s); one batch at a time",
                            self.what, self.count, exc)
                self._close()
                self.own, self.count = [], 1
                return self
            except BaseException:
                self._close()
                raise
            for conn in self.own:
                self.idle.put(conn)
            self.pids = [conn.info.backend_pid for conn in self.own]
            self.pool = concurrent.futures.ThreadPoolExecutor(self.count, thread_name_prefix="backfill")
        return self

    def __exit__(self, *exc: object) -> None:
        concurrent.futures.wait(self.running)
        self.running.clear()
        self._close()

    def _close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for conn in self.own:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    @property
    def busy(self) -> bool:
        return bool(self.running)

    @property
    def free(self) -> bool:
        return len(self.running) < self.count

    def run(self, first: int, last: int, batch: Callable[[psycopg.Connection[Any]], tuple[float, int]]) -> None:
        if self.pool is None:  # one at a time, in this thread
            future: concurrent.futures.Future[tuple[float, int]] = concurrent.futures.Future()
            try:
                future.set_result(batch(self.conn))
            except BaseException as exc:
                future.set_exception(exc)
            self.running[future] = (first, last)
            return

        def in_a_session() -> tuple[float, int]:
            conn = self.idle.get()
            try:
                return batch(conn)
            finally:
                self.idle.put(conn)

        self.running[self.pool.submit(in_a_session)] = (first, last)

    def finished(self) -> list[tuple[tuple[int, int], tuple[float, int]]]:
        """The batches that have ended (waiting for one at least), in the order of their pages."""
        ended, _ = concurrent.futures.wait(self.running, return_when=concurrent.futures.FIRST_COMPLETED)
        out = []
        for future in sorted(ended, key=lambda f: self.running[f]):
            pages = self.running.pop(future)
            out.append((pages, future.result()))
        return out


def _ranged(step: Step) -> sql.Composed:
    """The step's statement restricted to a range of pages: the compiler's UPDATE or count ends in its WHERE clause;
    a shadow table's copy (an INSERT ... SELECT with no WHERE) in ON CONFLICT DO NOTHING."""
    pages = "ctid >= %s::tid AND ctid < %s::tid"
    if step.kind == COPY_KIND:
        head = step.sql.removesuffix(_NO_CONFLICT)
        assert head != step.sql, step.sql
        return sql.SQL("{} WHERE {}{}").format(sql.SQL(head), sql.SQL(pages), sql.SQL(_NO_CONFLICT))
    return sql.SQL("{} AND {}").format(sql.SQL(step.sql), sql.SQL(pages))


def _continuity(conn: psycopg.Connection[Any], relation: str) -> dict[str, Any]:
    """What must not have changed since a checkpoint for a fill to go on from it: the table's file, and its helper
    triggers (they fill what is written meanwhile)."""
    row = conn.execute(
        "SELECT pg_relation_filenode(%s::regclass)::bigint, coalesce(array_agg(oid::bigint ORDER BY oid) FILTER (WHERE "
        "tgname LIKE 'reconciler\\_%%' AND tgenabled <> 'D'), '{}') FROM pg_trigger WHERE tgrelid = %s::regclass",
        (relation, relation)).fetchone()
    return {"filenode": int(row[0]) if row and row[0] is not None else None, "triggers": list(row[1]) if row else []}


def _resumed(step: Step, key: str, continuity: dict[str, Any], pages: int, resume: Checkpoints | None) -> int:
    """The page the fill goes on from: an earlier run's checkpoint of this step where it is provably safe, else 0."""
    found = resume(key) if resume is not None else None
    if found is None:
        return 0
    run_id, checkpoint = found
    done = int(checkpoint.get("pages_done") or 0)
    why = None
    if checkpoint.get("filenode") != continuity["filenode"]:
        why = "the table was rewritten since (its rows may have moved between pages)"
    elif not continuity["triggers"] or checkpoint.get("triggers") != continuity["triggers"]:
        why = "its trigger was not there all along (writes meanwhile may have been missed)"
    elif done > pages:
        why = "the table is smaller than it was"
    if why is not None:
        log.warning("backfill %s: not going on from run %s's checkpoint (page %s): %s; from page 0", step.object,
                    run_id, f"{done:,}", why)
        return 0
    if done:
        log.info("backfill %s: going on from run %s's checkpoint, page %s of %s (the pages before it were done, and "
                 "the trigger has filled every write to them since)", step.object, run_id, f"{done:,}", f"{pages:,}")
    return done


def checkpoint_key(step: Step) -> str:
    """The same fill in another plan: the same step SQL (its helper names come from the table and column)."""
    return hashlib.sha256(f"{step.kind}\n{step.object}\n{step.sql}".encode()).hexdigest()[:16]


class _Fill:
    """A fill's counts, said to the log every few seconds and to the run's history row before each batch (the
    checkpoint a later run goes on from)."""

    def __init__(self, step: Step, pages: int, report: Report, continuity: dict[str, Any]) -> None:
        self.step, self.pages, self.report, self.continuity = step, pages, report, continuity
        self.key = checkpoint_key(step)
        self.rows = 0
        self.resumed_from = 0  # the page an earlier run's checkpoint let this one begin at
        self.workers = 1  # batches side by side
        self.began = self.reported = time.monotonic()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.began
        return self.rows / elapsed if elapsed > 0 else 0.0

    def left(self, done: int) -> float:
        here = done - self.resumed_from
        return (self.pages - done) * (time.monotonic() - self.began) / here if here > 0 else 0.0

    def say(self, state: str, done: int, reason: str | None = None) -> dict[str, Any]:
        return self.report({
            "step": self.step.index, "kind": self.step.kind, "object": self.step.object, "key": self.key,
            **self.continuity,
            "state": state, "reason": reason, "resumed_from": self.resumed_from, "workers": self.workers,
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
        self.ours: list[int] = []  # the fill's own sessions

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
            # sessions waiting for a lock on the table, or for a row of it (those hold a lock on the table meanwhile),
            # but not those waiting only for a batch of the fill's own: that batch commits on its own within its
            # time, and a pause before the next (other pages, other rows) would not let them go sooner
            "SELECT (SELECT count(DISTINCT w.pid) FROM pg_locks w WHERE NOT w.granted AND w.pid <> ALL(%(ours)s) "
            " AND (w.relation = %(t)s::regclass "
            " OR EXISTS (SELECT FROM pg_locks h WHERE h.pid = w.pid AND h.granted AND h.relation = %(t)s::regclass)) "
            " AND NOT pg_blocking_pids(w.pid) <@ %(ours)s::int[]), "
            "(SELECT extract(epoch FROM max(now() - xact_start))::float8 FROM pg_stat_activity "
            " WHERE datname = current_database() AND xact_start IS NOT NULL AND pid <> pg_backend_pid() "
            " AND backend_type = 'client backend' AND application_name NOT LIKE 'reconciler %%')",
            {"t": self.relation, "ours": self.ours}).fetchone()
        waiters, oldest = (int(row[0]), row[1]) if row else (0, None)
        if waiters > limits.max_lock_waiters:
            found.append(f"{waiters} sessions wait for a lock on the table (limit {limits.max_lock_waiters})")
        if oldest is not None and oldest > limits.max_transaction_age_seconds:
            found.append(f"a transaction has been open {oldest:.0f}s (limit {limits.max_transaction_age_seconds:.0f}s): "
                         "the row versions the fill replaces cannot be vacuumed meanwhile")
        return found


def describe(progress: dict[str, Any], state: str | None = None) -> str:
    """A fill's progress in a line (``reconciler backfill status``, apply's status line on a terminal)."""
    pages, done = int(progress.get("pages") or 0), int(progress.get("pages_done") or 0)
    share = f" ({100.0 * done / pages:.0f}%)" if pages else ""
    state = state or str(progress.get("state"))
    resumed = int(progress.get("resumed_from") or 0)
    what = {VERIFY_KIND: "check", COPY_KIND: "copy"}.get(str(progress.get("kind")), "backfill")
    return (f"{what} {progress.get('object')} (step "
            f"{progress.get('step')}): {state}, page {done:,} of {pages:,}{share}, {int(progress.get('rows') or 0):,} "
            f"rows, {float(progress.get('rows_per_second') or 0):,.0f} rows/s"
            + (f", about {float(progress.get('seconds_left') or 0):.0f}s left" if state == "filling" else "")
            + (f", {int(progress.get('workers') or 1)} batches at a time" if int(progress.get("workers") or 1) > 1
               else "")
            + (f", went on from an earlier run's checkpoint at page {resumed:,}" if resumed else ""))


def batch_time(seconds: float) -> str:
    """A batch time as the configuration says it (``batch: 50ms``)."""
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _mib(n: float) -> str:
    return f"{n / 1024**2:.1f} MiB"


def _batch(conn: psycopg.Connection[Any], *, step: Step, batch: sql.Composed, start: int, end: int,
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
