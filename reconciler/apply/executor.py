"""The executor: check, lock, record, back up, run the steps phase by phase, verify, record; and when a run stops
short (a failure, a cancel, a signal, a lost session), settle what it leaves before it reports.

Two connections: the executor runs the steps and holds the session advisory lock (so the lock goes with it if the
process dies); a second, autocommit connection (control) writes the history row, so the record survives the
rollback of the steps. A transactional phase's step records are written by the executor inside that phase's own
transaction: they commit with its steps or not at all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import FrameType
from typing import Any, NoReturn

import psycopg

from .. import backup, history, runlock
from ..diff.classify import recreated
from ..diff.inspections import catalog_token
from ..errors import ApplyError, LockTimeoutError, ReconcilerError, RefusedError
from ..history import StepRecord
from ..inspect import TargetIdentity, identity
from ..logs import current_run
from ..plan import Plan
from ..safety import Step
from ..safety.backfill import KIND as BACKFILL
from ..safety.dual_column import VERIFY_KIND
from ..safety.shadow_table import CATCH_UP_KIND, COPY_KIND
from ..safety.swap import CONTRACT
from ..servers import connect
from ..signing import enforce
from . import recovery
from .backfill import run_backfill
from .catch_up import run_catch_up
from .checks import freshness, plan_checks, refuse_unless_target
from .lock_order import other_order
from .monitor import LockWaitMonitor, lock_waits
from .options import ApplyOptions, ApplyResult
from .verification import (
    HELD_NOTE,
    Held,
    NotConverged,
    check_converged,
    held,
    held_objects,
    postcondition_failures,
    verification_failures,
    verify,
)

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """`reconciler cancel` asked this run to stop."""


class Interrupted(Exception):
    """SIGINT or SIGTERM asked this run to stop (see ``_Signals``)."""


class _Signals:
    """While an apply runs in the main thread, SIGINT and SIGTERM ask it to stop instead of raising wherever the
    interpreter happens to be: a KeyboardInterrupt raised between psycopg's sending a statement and its reading the
    answer leaves the connection busy, and the run could then neither clean up nor record its end. The statement
    under way is cancelled at the server instead (the connection stays usable) and the run stops at its next check.
    A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, sessions: _Sessions) -> None:
        self.sessions = sessions
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt  # asked twice: now
        self.received = signum
        log.warning("%s: stopping the run (the statement under way is cancelled; again to stop at once)",
                    signal.Signals(signum).name)
        with contextlib.suppress(Exception):
            self.sessions.executor.cancel()

    def check(self) -> None:
        if self.received is not None:
            raise Interrupted


def check_plan(plan: Plan, conn: psycopg.Connection[Any], options: ApplyOptions) -> str:
    """Refuse a plan that was altered, unapproved, expired, for another database, stale or replayed."""
    enforce(plan_checks(plan, options, conn), plan)
    return plan.body.target.fingerprint


def _holder(control: psycopg.Connection[Any], schema: str) -> str:
    """Who holds the apply lock, for the message of one who waits."""
    running = [r for r in history.running_runs(control, schema) if r.alive]
    if running:
        r = running[-1]
        return (f"run {r.id} (plan {r.plan_id.removeprefix('sha256:')[:12]}, {r.actor}@{r.client_host}, "
                f"since {r.started_at:%Y-%m-%d %H:%M:%S %Z})")
    pids = [h.pid if isinstance(h, runlock.Session) else h for h in runlock.holders(control)]
    return f"backend pid {', '.join(map(str, pids)) or 'unknown'}"


def _acquire_lock(executor: psycopg.Connection[Any], control: psycopg.Connection[Any], options: ApplyOptions) -> None:
    deadline = time.monotonic() + options.lock_wait_seconds
    announced = False
    while not runlock.try_lock(executor):
        who = _holder(control, options.metadata_schema)
        if time.monotonic() >= deadline:
            raise LockTimeoutError(
                f"another apply holds the lock on {executor.info.dbname}: {who}; gave up after {options.lock_wait_seconds:g}s"
            )
        if not announced:
            log.info("waiting up to %gs for the apply lock held by %s", options.lock_wait_seconds, who)
            announced = True
        time.sleep(0.2)


def _phases(steps: Sequence[Step]) -> list[list[Step]]:
    """The compiler's phases: one transaction each, or one statement that cannot run in one."""
    grouped: dict[int, list[Step]] = {}
    for step in steps:
        grouped.setdefault(step.phase, []).append(step)
    return [grouped[k] for k in sorted(grouped)]


def _usable(conn: psycopg.Connection[Any]) -> bool:
    return not conn.closed and not conn.broken


def _answers(conn: psycopg.Connection[Any]) -> bool:
    """Usable, and answers a statement now (idle in autocommit: the control session)."""
    if not _usable(conn):
        return False
    try:
        conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


class _Sessions:
    """The run's two connections, and a new executing session when the first is lost (terminated, say): the
    leftovers of its step and the undoing of its committed steps need the lock, and the run's row must name the
    session that holds it."""

    def __init__(self, dsn: str, control: psycopg.Connection[Any], options: ApplyOptions) -> None:
        self.dsn, self.control, self.options = dsn, control, options
        self.executor = working_session(dsn, "reconciler apply")

    def start(self) -> None:
        _acquire_lock(self.executor, self.control, self.options)

    def regain(self, run_id: str) -> bool:
        """After losing the executing session: a new one, holding the lock, named in the run's row."""
        try:
            fresh = working_session(self.dsn, "reconciler apply")
        except (ReconcilerError, psycopg.Error) as exc:
            log.warning("cannot reconnect to settle the run: %s", exc)
            return False
        try:
            if runlock.lock_within(fresh, self.options.reconnect_seconds):
                session = runlock.this_session(fresh)
                if history.move_applier(self.control, self.options.metadata_schema, run_id, session.pid, session.started):
                    with contextlib.suppress(psycopg.Error):
                        self.executor.close()
                    self.executor = fresh
                    return True
                runlock.unlock(fresh)
        except psycopg.Error as exc:
            log.warning("cannot take the apply lock again to settle the run: %s", exc)
        fresh.close()
        return False

    def close(self) -> None:
        executor = self.executor
        if _usable(executor) and executor.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                runlock.unlock(executor)
        with contextlib.suppress(psycopg.Error):
            executor.close()


def apply_plan(plan: Plan | Callable[[TargetIdentity], Plan], target_dsn: str, options: ApplyOptions) -> ApplyResult:
    """Run an approved plan against the target; refuses, or records the run as applied, failed, rolled back or
    cancelled. Nothing is written to a target that refuses the plan. ``plan`` may be a choice made once the target
    says who it is (a fleet's databases, each with the plan naming it, over no connection but the run's own)."""
    schema = options.metadata_schema
    with connect(target_dsn, application_name="reconciler control") as control:
        # what it reads of the catalog waits for a table's lock no longer than for the apply lock: a DDL held for
        # hours elsewhere is an error naming the wait, not a hang
        control.execute("SELECT set_config('lock_timeout', %s, false)", (f"{max(1, int(options.lock_wait_seconds * 1000))}ms",))
        if not isinstance(plan, Plan):
            plan = plan(identity(control))
        refuse_unless_target(plan, control)
        sessions = _Sessions(target_dsn, control, options)
        try:
            sessions.start()
            recovery.settle(control, schema, holding_lock=True, lock_timeout=options.cleanup_lock_timeout)
            token = catalog_token(control)
            fingerprint = check_plan(plan, control, options)
            if not plan.body.steps:
                return ApplyResult(run_id=None, status="nothing", steps=(), fingerprint=fingerprint)
            history.ensure_schema(control, schema)
            run_id = str(uuid.uuid4())
            context = current_run.set(run_id)
            try:
                return _Run(plan, run_id, sessions, replace(options, target_dsn=target_dsn), token).run()
            finally:
                current_run.reset(context)
        finally:
            sessions.close()


class _Run:
    """One run, from its row to its end."""

    def __init__(self, plan: Plan, run_id: str, sessions: _Sessions, options: ApplyOptions, token: str) -> None:
        self.plan, self.run_id, self.sessions, self.options, self.token = plan, run_id, sessions, options, token
        self.schema = options.metadata_schema
        self.records: list[StepRecord] = []
        self.signals = _Signals(sessions)
        self.progress = _Progress(sessions.control, self.schema, run_id, self.records, lambda: self.signals.check())
        self.steps = {s.index: s for s in plan.body.steps}
        self.backup: backup.Backup | None = None

    @property
    def control(self) -> psycopg.Connection[Any]:
        return self.sessions.control

    def run(self) -> ApplyResult:
        with _Signals(self.sessions) as self.signals:
            return self._run()

    def _run(self) -> ApplyResult:
        try:
            self._record_start()
            self._take_backup()
            self._still_fresh()
            log.info("applying plan %s (%d steps in %d phases)", self.plan.short_id, len(self.plan.body.steps),
                     len(_phases(self.plan.body.steps)))
            # what the objects hold that the plan does not manage, when it re-creates any (nothing else can lose it)
            before = held(self.plan, self.sessions.executor, self.schema) \
                if recreated((s.kind, s.object) for s in self.plan.body.steps) else {}
            with lock_waits(self.options.target_dsn, self.sessions.executor.info.backend_pid, self.options.lock_sampler) \
                    if self.options.target_dsn else contextlib.nullcontext() as monitor:
                _execute(self.plan, self.sessions.executor, self.options, self.records, self.progress, monitor,
                         before)
            self.signals.check()
            if history.cancel_requested(self.control, self.schema, self.run_id):
                raise Cancelled
            verification = verify(self.sessions.executor, self.plan, self.schema, before,
                                  kept=held_objects(r for r in self.records if r.status == "held"))
            history.record_verification(self.control, self.schema, self.run_id, verification)
            failures = postcondition_failures(self.plan, self.control) + verification_failures(verification)
            if failures:
                raise NotConverged("after the steps: " + "; ".join(failures))
            self.signals.check()  # one that landed while verifying between its statements: the run stops, as a cancel
            ended = history.finish_run(self.control, self.schema, self.run_id, status="applied", statements=self.records,
                                       unless_cancelled=True)
            if not ended and history.cancel_requested(self.control, self.schema, self.run_id):
                raise Cancelled  # asked to stop before its end was recorded: it stops, and undoes what it can
        except BaseException as exc:
            self._stopped(exc)
        if not ended:
            raise ApplyError(f"run {self.run_id}: every step applied and verified, but another command had already "
                             "recorded the run as ended (its session looked gone)", self.run_id)
        log.info("applied in %.0f ms of statements", sum(r.duration_ms for r in self.records))
        return ApplyResult(run_id=self.run_id, status="applied", steps=tuple(self.records),
                           fingerprint=str(verification["fingerprint"]), backup=self.backup)

    def _record_start(self) -> None:
        """Inside the guarded block: a Ctrl-C or SIGTERM landing just after the row is written still finishes it as
        cancelled instead of leaving it running."""
        session = runlock.this_session(self.sessions.executor)
        history.start_run(
            self.control, self.schema, run_id=self.run_id, plan_id=self.plan.id, environment=self.options.environment,
            backend_pid=session.pid, backend_start=session.started, git_commit=self.plan.body.desired.git_commit,
            from_fingerprint=self.plan.body.target.fingerprint, to_fingerprint=self.plan.body.desired.schema_fingerprint,
            temporaries=recovery.temporaries(self.plan.body.steps),
        )

    def _take_backup(self) -> None:
        """Under the run, so `history` shows it and `cancel` stops it; the metadata schema is left out of it, so a
        restored backup brings back no history row."""
        if self.options.backup_scope == "none" or self.options.backups_dir is None:
            return
        touched = sorted({h.table for s in self.plan.body.steps for h in s.hazards
                          if h.table and h.code in ("DATA_LOSS", "TABLE_REWRITE")})
        tables = [(str(r[0]), str(r[1])) for r in self.control.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')").fetchall()]
        path = self.options.backups_dir / f"{self.plan.body.target.database}-{self.run_id}.dump"
        last_look = [time.monotonic()]

        def stop() -> bool:  # a signal, or a cancel request looked for once a second
            if self.signals.received is not None:
                return True
            if time.monotonic() - last_look[0] < 1.0:
                return False
            last_look[0] = time.monotonic()
            return history.cancel_requested(self.control, self.schema, self.run_id)

        taken = backup.dump(self.sessions.dsn, server_major=int(self.control.info.server_version) // 10000, path=path,
                            scope=self.options.backup_scope, keep_data_of=touched, all_tables=tables,
                            exclude_schemas=(self.schema,), stop=stop, lock_wait_seconds=self.options.lock_wait_seconds)
        history.record_backup(self.control, self.schema, self.run_id, path=str(taken.path), sha256=taken.sha256,
                              size=taken.size)
        self.backup = taken
        if self.options.on_backup is not None:
            self.options.on_backup(taken)

    def _still_fresh(self) -> None:
        """The plan was checked against live before the backup, which may take hours: checked again, under the
        lock, right before the first step (the catalogs' change token first: a full look only when it moved)."""
        if catalog_token(self.control) == self.token:
            return
        check = freshness(self.control, self.plan, self.options)
        if not check.ok:
            raise RefusedError(f"plan {self.plan.short_id} refused (freshness): {check.message}", check="freshness")

    def _stopped(self, exc: BaseException) -> NoReturn:
        """Settle what the run leaves, record it, and raise: what the step under way did (read from the catalog),
        committed steps undone where each can be, debris removed, or named for the next command to remove."""
        stopped_statement = isinstance(exc, psycopg.errors.QueryCanceled) or isinstance(exc.__cause__, psycopg.errors.QueryCanceled)
        signalled = self.signals.received is not None or isinstance(exc, KeyboardInterrupt | Interrupted)
        # asked first, over a statement: a server that went down (or restarted) leaves the control session looking
        # usable until it is used, and nothing below can be recorded then
        control_alive = _answers(self.control)
        cancelled = signalled or isinstance(exc, Cancelled | backup.Stopped) or (
            stopped_statement and control_alive and history.cancel_requested(self.control, self.schema, self.run_id))
        message = "cancelled" if cancelled and not isinstance(exc, ApplyError) else _error_text(exc)
        if not control_alive:
            self._lost(message)
        try:
            self._settle(exc, message, cancelled=cancelled, signalled=signalled)
        except psycopg.OperationalError as again:
            if _answers(self.control):
                raise
            self._lost(f"{message}; then {_error_text(again)}")

    def _lost(self, message: str) -> NoReturn:
        raise ApplyError(
            f"run {self.run_id}: the connection to the target was lost ({message}); its history row says "
            "running until the next command (plan, history, apply...) finds its session gone and marks it "
            "interrupted, removing what its step under way left", self.run_id) from None

    def _settle(self, exc: BaseException, message: str, *, cancelled: bool, signalled: bool) -> NoReturn:
        lost = not _usable(self.sessions.executor)
        if lost and not self.sessions.regain(self.run_id):
            self._record_lost(message)
        held = self.sessions.executor
        outcome, status = self._step_under_way(held), "failed"
        try:
            undo, status = _after_failure(self.plan, self.records, held, self.options, self.run_id,
                                          keep=not cancelled and _cutover_gave_up(exc, self.plan, self.records))
        except BaseException as again:  # a second Ctrl-C while undoing: the rest is recorded as it stands
            undo = f"undoing was stopped ({_error_text(again)}); what was committed stays: see the steps"
        completed = {r.index for r in self.records if r.status == "applied"}
        cleanup = [*outcome.cleanup, *recovery.leftover_temporaries(recovery.temporaries(self.plan.body.steps), completed)]
        notes = list(outcome.notes)
        try:
            cleanup, removed = recovery.remove(held, cleanup, lock_timeout=self.options.cleanup_lock_timeout)
            notes += removed
        except BaseException as again:
            notes.append(f"removing what the step left was stopped ({_error_text(again)}): the next command removes it")
        pending = [str(e["object"]) for e in cleanup if e.get("status") == "pending"]
        if pending:
            notes.append(f"left for the next command to remove: {', '.join(pending)}")
        outcome_text = "; ".join([undo, *notes])
        status = "cancelled" if cancelled else status
        recorded = history.finish_run(self.control, self.schema, self.run_id, status=status, statements=self.records,
                                      error=f"{message}; {outcome_text}", cleanup=cleanup)
        log.info("%s: %s; %s", status, message, outcome_text)
        if not recorded:
            found = history.get_run(self.control, self.schema, self.run_id)
            if found is not None:  # else it stopped before its row was written: nothing to say of it
                outcome_text += f"; another command had already recorded the run as {found.status} (its session was gone)"
        if signalled:  # the command ends as an interrupted one does (exit 130), watch stops as it does on a signal
            raise KeyboardInterrupt from None
        if isinstance(exc, RefusedError):
            raise RefusedError(f"{exc}; nothing was changed (run {self.run_id} recorded as failed)",
                               check=exc.check) from None
        raise ApplyError(f"run {self.run_id} {'was cancelled' if cancelled else 'failed'}: {message}; {outcome_text}",
                         self.run_id) from None

    def _record_lost(self, message: str) -> NoReturn:
        """The executing session is gone and no new one could take the lock: the row says so now, and whatever the
        step left is removed by the next command that holds the lock."""
        failing = self._failing_step()
        found = recovery.outcome_of(self.control, [recovery.step_entry(failing)] if failing else [], set(),
                                    "after its session was lost") if failing else recovery.Outcome()
        self.records += found.records
        completed = {r.index for r in self.records if r.status == "applied"}
        cleanup = [*found.cleanup, *recovery.leftover_temporaries(recovery.temporaries(self.plan.body.steps), completed)]
        committed = [str(i) for i in sorted(completed)]
        text = (f"{message}; the session was lost and could not be taken up again; step(s) "
                f"{', '.join(committed) or 'none'} stay applied" + "".join(f"; {n}" for n in found.notes)
                + (f"; left for the next command to remove: {', '.join(str(e['object']) for e in cleanup)}" if cleanup else ""))
        history.finish_run(self.control, self.schema, self.run_id, status="failed", statements=self.records, error=text,
                           cleanup=cleanup)
        raise ApplyError(f"run {self.run_id} failed: {text}", self.run_id) from None

    def _failing_step(self) -> Step | None:
        last = self.records[-1] if self.records else None
        step = self.steps.get(last.index) if last is not None and last.status == "failed" else None
        return step if step is not None and not step.transactional else None

    def _step_under_way(self, conn: psycopg.Connection[Any]) -> recovery.Outcome:
        """A non-transactional step stopped mid-way may have finished (the cancel came late) or left an INVALID index."""
        failing = self._failing_step()
        if failing is None:
            return recovery.Outcome()
        found = recovery.outcome_of(conn, [recovery.step_entry(failing)], set(), "though the run was stopped")
        self.records += found.records
        return found


class _Progress:
    """Writes what has completed and what is running to the history row, for `cancel` and crash recovery.

    Only the records added since the last write are sent: a record, once written, is not changed before the
    run ends (a failed attempt marks its own records rolled back before the next write; undoing committed
    steps happens after the last one, and finish_run writes the whole list). A transactional phase writes its
    records itself, inside its transaction (``in_transaction``)."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str, run_id: str, records: list[StepRecord],
                 check: Callable[[], None] = lambda: None) -> None:
        self.conn, self.schema, self.run_id, self.records = conn, schema, run_id, records
        self.check = check  # raises when the run was asked to stop by a signal
        self.written = 0

    def starting(self, phase: Sequence[Step]) -> None:
        self.check()
        if history.cancel_requested(self.conn, self.schema, self.run_id):
            raise Cancelled
        self._write([recovery.step_entry(s) for s in phase])

    def backfill(self, progress: dict[str, Any]) -> dict[str, Any]:
        """A backfill's progress, recorded before each batch; returns what an operator asked of it. A signal, or a
        cancel request, stops the run here."""
        self.check()
        requested, cancelled = history.record_backfill(self.conn, self.schema, self.run_id, progress)
        if cancelled:
            raise Cancelled
        return requested

    def checkpoint(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """Where an earlier run's fill of the same step stopped (``backfill.run_backfill`` decides whether it can
        go on from there)."""
        return history.last_checkpoint(self.conn, self.schema, key)

    def in_transaction(self, executor: psycopg.Connection[Any]) -> int:
        """The phase's records, written by its own transaction just before it commits; returns how many, to count as
        written once it has committed."""
        added = self.records[self.written:]
        history.insert_records(executor, self.schema, self.run_id, added=added, position=self.written)
        return len(added)

    def committed(self, written_in_transaction: int = 0) -> None:
        self.written += written_in_transaction
        self._write([])

    def _write(self, current: list[dict[str, Any]]) -> None:
        added = self.records[self.written:]
        history.record_progress(self.conn, self.schema, self.run_id, added=added, position=self.written, current=current)
        self.written += len(added)


_FILLED = frozenset({BACKFILL, COPY_KIND, CATCH_UP_KIND, VERIFY_KIND})  # an online rewrite's hours of work


def _cutover_gave_up(exc: BaseException, plan: Plan, records: Sequence[StepRecord]) -> bool:
    """Did an online rewrite's cut-over give up on its lock after its rows were filled or copied? Undoing would
    throw away the work of hours for a lock that was busy for seconds."""
    applied = {r.index for r in records if r.status == "applied"}
    pending = next((s for s in plan.body.steps if s.index not in applied), None)
    return (_is_lock_timeout(exc) and pending is not None and pending.kind == "cutover"
            and any(s.kind in _FILLED for s in plan.body.steps if s.index in applied))


def _after_failure(plan: Plan, records: list[StepRecord], executor: psycopg.Connection[Any], options: ApplyOptions,
                   run_id: str, *, keep: bool = False) -> tuple[str, str]:
    """Undo what earlier phases committed, when every one of those steps can be undone by SQL; unless ``keep``: an
    online rewrite's filled rows stay, kept in step by its trigger, for the next plan to go on from."""
    committed = [r for r in records if r.status == "applied"]
    if not committed:
        return "nothing was changed (rolled back)", "failed"
    if keep:
        return (f"step(s) {', '.join(str(r.index) for r in committed)} were committed and stay: the rows filled or "
                "copied are kept, and kept in step with every write by their trigger; planning and applying again "
                "keeps them (its fill or copy finds the rows there and only reads them) and cuts over, or "
                f"`reconciler rollback {run_id}` removes them"), "failed"
    steps = {s.index: s for s in plan.body.steps}
    irreversible = [r.index for r in committed if not steps[r.index].reversible]
    restore_hint = f"reconciler restore {run_id}" if options.backup_scope != "none" and options.backups_dir else \
        f"reconciler rollback {run_id}"
    if irreversible or not options.auto_rollback or not _usable(executor):
        why = (f"step(s) {', '.join(map(str, irreversible))} cannot be undone by SQL" if irreversible else
               "auto_rollback is off" if options.auto_rollback is False else "the session to undo them with was lost")
        return (f"step(s) {', '.join(str(r.index) for r in committed)} were committed and stay applied ({why}); "
                f"the way back: {restore_hint}"), "failed"
    if executor.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        executor.rollback()
    undone = []
    try:
        for position in reversed([p for p, r in enumerate(records) if r.status == "applied"]):
            record = records[position]
            undo = steps[record.index].rollback_sql
            if undo:
                _set_timeouts(executor, steps[record.index], local=False)
                try:
                    executor.execute(undo.encode())
                finally:
                    if _usable(executor):
                        executor.execute("RESET lock_timeout")
                        executor.execute("RESET statement_timeout")
            undone.append(record.index)
            records[position] = replace(record, status="undone")
    except psycopg.Error as exc:
        done = set(undone)
        left = [r.index for r in committed if r.index not in done]
        return (f"undoing step {left[-1]} failed ({_error_text(exc)}); step(s) {', '.join(map(str, left))} stay applied; "
                f"the way back: {restore_hint}"), "failed"
    return f"step(s) {', '.join(map(str, sorted(undone)))} were committed, then undone by their rollback SQL", "rolled back"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error):
        diag = exc.diag
        text = diag.message_primary or str(exc).strip()
        if diag.sqlstate:
            text += f" [SQLSTATE {diag.sqlstate}]"
        if diag.message_detail:
            text += f" DETAIL: {diag.message_detail}"
        return text
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, Cancelled):
        return "cancelled"
    return str(exc)


def _set_timeouts(conn: psycopg.Connection[Any], step: Step, *, local: bool) -> None:
    conn.execute(
        "SELECT set_config('lock_timeout', %s, %s), set_config('statement_timeout', %s, %s)",
        (step.lock_timeout, local, step.statement_timeout, local),
    )


def _run_step(conn: psycopg.Connection[Any], step: Step, records: list[StepRecord],
              on_step: Callable[[Step], None] | None = None, monitor: LockWaitMonitor | None = None,
              check: Callable[[], None] = lambda: None, text: str | None = None) -> None:
    """``text``: the statement as run, when not the step's own (its tables locked in the other order)."""
    check()
    if on_step is not None:
        on_step(step)
    if monitor is not None:
        monitor.begin()
    started = time.perf_counter()
    text = text or step.sql
    try:
        conn.execute(text.encode(), prepare=False)
    except BaseException as exc:
        waited = monitor.end() if monitor is not None else 0.0
        records.append(StepRecord(step.index, step.kind, step.object, text, "failed",
                                  (time.perf_counter() - started) * 1000, waited))
        if isinstance(exc, psycopg.Error):
            behind = monitor.blockers() if monitor is not None and isinstance(exc, psycopg.errors.LockNotAvailable) \
                else ""
            raise ApplyError(f"step {step.index} ({step.kind} {step.object}) failed: {_error_text(exc)}{behind}") from exc
        raise
    took = (time.perf_counter() - started) * 1000
    waited = monitor.end() if monitor is not None else 0.0
    records.append(StepRecord(step.index, step.kind, step.object, text, "applied", took, waited, work=_work(step)))
    log.info("step %d %s %s: %.1f ms (lock wait %.0f ms)", step.index, step.kind, step.object, took, waited)


def _work(step: Step) -> tuple[str, float] | None:
    """What the step did, as its plan estimated it, for the next plan to learn this target's rates from."""
    return (step.estimate.work_class, step.estimate.work) if step.estimate and step.estimate.work else None


def _is_lock_timeout(exc: BaseException) -> bool:
    """A lock not had in time, or a deadlock broken by the server (a cut-over locking two tables a writer also takes
    in the other order): the transaction was rolled back whole, and is tried again."""
    cause = exc.__cause__ if isinstance(exc, ApplyError) else exc
    return isinstance(cause, psycopg.errors.LockNotAvailable | psycopg.errors.DeadlockDetected)


def _retrying(options: ApplyOptions, what: str, attempt_phase: Callable[[], None],
              next_attempt: Callable[[ApplyError], str] = lambda exc: "") -> None:
    """Run a phase; a lock timeout is retried with exponential backoff, a bounded number of times.
    ``next_attempt`` readies the next attempt after a lock timeout, saying how it differs."""
    for attempt in range(options.lock_retries + 1):
        try:
            attempt_phase()
            return
        except ApplyError as exc:
            if not _is_lock_timeout(exc) or attempt == options.lock_retries:
                if _is_lock_timeout(exc):
                    raise ApplyError(f"{exc} (gave up after {attempt + 1} attempt{'s' if attempt else ''})") from exc.__cause__
                raise
            delay = min(options.retry_backoff_seconds * 2**attempt, 30.0)
            reason = "a deadlock" if isinstance(exc.__cause__, psycopg.errors.DeadlockDetected) else "lock_timeout"
            behind = str(exc).partition("; it waited behind ")[2]
            log.warning("%s hit %s%s; retrying in %.1fs (attempt %d of %d%s)", what, reason,
                        f" behind {behind}" if behind else "", delay, attempt + 2, options.lock_retries + 1,
                        next_attempt(exc))
            time.sleep(delay)


def _execute(plan: Plan, conn: psycopg.Connection[Any], options: ApplyOptions, records: list[StepRecord],
             progress: _Progress, monitor: LockWaitMonitor | None = None, before: Held | None = None) -> None:
    """``before``: what the objects held before the first step that the plan does not manage (``held``)."""
    phases = _phases(plan.body.steps)
    for number, phase in enumerate(phases, 1):
        last = number == len(phases)
        if options.hold_contract and any(s.kind == CONTRACT for s in phase):
            records.extend(StepRecord(s.index, s.kind, s.object, s.sql, "held", 0.0, note=HELD_NOTE) for s in phase)
            log.info("phase %d (the contract of %s) held: apply --hold-contract", phase[0].phase,
                     ", ".join(s.object for s in phase if s.kind == CONTRACT))
            continue
        progress.starting(phase)
        if phase[0].transactional:
            written = [0]
            reordered: dict[int, str] = {}  # step index -> its LOCK with the tables in the other order, while in use

            def run_transaction(phase: list[Step] = phase, last: bool = last, written: list[int] = written,
                                reordered: dict[int, str] = reordered) -> None:
                done_before = len(records)
                try:
                    with conn.transaction():
                        timeouts: tuple[str, str] | None = None
                        for step in phase:
                            if (step.lock_timeout, step.statement_timeout) != timeouts:  # once while they stay the same
                                _set_timeouts(conn, step, local=True)
                                timeouts = (step.lock_timeout, step.statement_timeout)
                            _run_step(conn, step, records, options.on_step, monitor, progress.check,
                                      reordered.get(step.index))
                        if last and options.verify_before_commit:
                            # what would be committed is checked before it is: the phase's locks are held meanwhile
                            check_converged(plan, conn, options.metadata_schema, before,
                                            kept=held_objects(r for r in records if r.status == "held"))
                        written[0] = progress.in_transaction(conn)
                except BaseException:
                    records[done_before:] = [r if r.status != "applied" else replace(r, status="rolled back")
                                             for r in records[done_before:]]
                    raise

            def crossed(exc: ApplyError, phase: list[Step] = phase, reordered: dict[int, str] = reordered) -> str:
                """A writer took the tables the phase locks in the other order: the next attempt takes them in its."""
                deadlock = isinstance(exc.__cause__, psycopg.errors.DeadlockDetected)
                if not (deadlock or (monitor is not None and monitor.crossed)):
                    return ""
                flipped = {s.index: other for s in phase if (other := other_order(s.sql))}
                if not flipped:
                    return ""
                if reordered:
                    reordered.clear()
                else:
                    reordered.update(flipped)
                return ", locking the tables in the other order: a writer takes them in that order"

            _retrying(options, f"phase {phase[0].phase}", run_transaction, crossed)
            progress.committed(written[0])
        else:
            step = phase[0]

            def run_alone(step: Step = step) -> None:
                _set_timeouts(conn, step, local=False)
                try:
                    _run_step(conn, step, records, options.on_step, monitor, progress.check)
                except ApplyError:
                    if step.kind == "create_index_concurrently" and _usable(conn):
                        # before a retry: the failed build's INVALID index must go (what is left when this
                        # cannot run is found by the run's settling, from the catalog)
                        recovery.remove(conn, recovery.outcome_of(conn, [recovery.step_entry(step)], set(), "").cleanup,
                                        lock_timeout=options.cleanup_lock_timeout)
                    raise
                finally:
                    if _usable(conn):
                        conn.execute("RESET lock_timeout")
                        conn.execute("RESET statement_timeout")

            if step.kind in (BACKFILL, VERIFY_KIND, COPY_KIND):
                _fill(conn, step, records, options, progress)
            elif step.kind == CATCH_UP_KIND:
                _catch_up(conn, step, records, options, progress)
            elif step.kind == "create_index_concurrently":
                _retry_index_build(options, step, conn, run_alone)
            else:
                _retrying(options, f"step {step.index}", run_alone)
            progress.committed()


def _fill(conn: psycopg.Connection[Any], step: Step, records: list[StepRecord], options: ApplyOptions,
          progress: _Progress) -> None:
    """A backfill step, batch by batch (``backfill.run_backfill``), recorded as one step."""
    def report(said: dict[str, Any]) -> dict[str, Any]:
        if options.on_backfill is not None:
            options.on_backfill(said)
        return progress.backfill(said)

    dsn = options.target_dsn
    _batched(step, records, options, "rows", lambda: run_backfill(
        conn, step, limits=options.backfill, lock_retries=options.lock_retries, check=progress.check, report=report,
        resume=progress.checkpoint,
        session=functools.partial(working_session, dsn, "reconciler fill") if dsn else None))


def working_session(dsn: str, application_name: str) -> psycopg.Connection[Any]:
    """A session that runs the plan's statements (the executor's, or one a fill's batches run in beside others).
    If this process dies mid-statement, the server stops the statement instead of finishing it for nobody (a
    concurrent index build would otherwise complete after a kill -9)."""
    conn = connect(dsn, application_name=application_name)
    if int(conn.info.server_version) >= 140000:
        conn.execute("SET client_connection_check_interval = '1s'")
    return conn


def _catch_up(conn: psycopg.Connection[Any], step: Step, records: list[StepRecord], options: ApplyOptions,
              progress: _Progress) -> None:
    """A shadow table's catch-up (``catch_up.run_catch_up``), recorded as one step."""
    _batched(step, records, options, "writes replayed", lambda: run_catch_up(conn, step, check=progress.check))


def _batched(step: Step, records: list[StepRecord], options: ApplyOptions, what: str, run: Callable[[], int]) -> None:
    """A step apply runs a transaction at a time (``run`` returns how many rows or writes), recorded as one step."""
    if options.on_step is not None:
        options.on_step(step)
    started = time.perf_counter()
    try:
        done = run()
    except BaseException:
        records.append(StepRecord(step.index, step.kind, step.object, step.sql, "failed",
                                  (time.perf_counter() - started) * 1000, 0.0))
        raise
    took = (time.perf_counter() - started) * 1000
    records.append(StepRecord(step.index, step.kind, step.object, step.sql, "applied", took, 0.0, work=_work(step)))
    log.info("step %d %s %s: %d %s in %.1f ms", step.index, step.kind, step.object, done, what, took)


def _retry_index_build(options: ApplyOptions, step: Step, conn: psycopg.Connection[Any],
                       build: Callable[[], None]) -> None:
    """A concurrent build can fail for passing reasons (deadlock, lock timeout): retry it a bounded number of times."""
    for attempt in range(options.index_build_retries + 1):
        try:
            _retrying(options, f"step {step.index}", build)
            return
        except ApplyError as exc:
            cause = exc.__cause__
            permanent = not _usable(conn) or isinstance(
                cause, psycopg.errors.UniqueViolation | psycopg.errors.SyntaxError | psycopg.errors.UndefinedColumn
                | psycopg.errors.UndefinedTable | psycopg.errors.QueryCanceled)  # cancelled or statement_timeout
            if permanent or attempt == options.index_build_retries:
                raise
            log.warning("concurrent index build of %s failed (%s); retrying", step.object, exc)
            time.sleep(options.retry_backoff_seconds)
