"""The executor: check the plan still fits the target, lock, record, run the steps, verify, record.

Two connections: the executor runs the steps and holds the session advisory lock (so the lock
goes with it if the process dies); a second, autocommit connection writes the history row, so
the record survives the rollback of the steps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import backup, history, inspect
from .errors import ApplyError, LockTimeoutError, ReconcilerError, RefusedError
from .history import StepRecord
from .logs import current_run
from .plan import Plan, object_digests, parse_time
from .policy import closed_windows, run_assertion
from .safety import Step
from .servers import connect
from .signing import NO_REQUIREMENTS, Check, Requirements, Trust, enforce, offline_checks

log = logging.getLogger(__name__)

LOCK_KEY = 0x7265636F6E63_00  # "recon": one apply at a time per database


@dataclass(frozen=True)
class ApplyOptions:
    environment: str
    metadata_schema: str
    lock_wait_seconds: float = 60.0
    requirements: Requirements = NO_REQUIREMENTS
    trust: Trust | None = None
    lock_retries: int = 3
    retry_backoff_seconds: float = 1.0
    index_build_retries: int = 2
    verify_before_commit: bool = False
    allow_unrehearsed: bool = False
    auto_rollback: bool = True
    backup_scope: str = "none"  # full, touched or none
    backups_dir: Path | None = None
    now: datetime | None = None  # the clock for change windows (tests set it)
    on_step: Callable[[Step], None] | None = None  # progress display
    monitor_dsn: str | None = None  # set by apply_plan: where the lock-wait monitor connects


@dataclass(frozen=True)
class ApplyResult:
    run_id: str | None
    status: str  # applied, or nothing (no steps)
    steps: tuple[StepRecord, ...]
    fingerprint: str


def describe_differences(expected: dict[str, str], actual: dict[str, str], limit: int = 10) -> str:
    """'kind name (missing)' for objects whose digests differ, for one-line errors."""
    names = []
    for key in sorted(set(expected) | set(actual)):
        if key not in actual:
            names.append(f"{key} (missing)")
        elif key not in expected:
            names.append(f"{key} (unexpected)")
        elif expected[key] != actual[key]:
            names.append(f"{key} (different)")
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan_checks(plan: Plan, options: ApplyOptions, conn: psycopg.Connection[Any] | None) -> list[Check]:
    """Every refusal apply can make, as results; the database checks run only with a connection."""
    policy = plan.body.policy
    req = Requirements(
        approvals=max(options.requirements.approvals, policy.approvals),
        groups=tuple(dict.fromkeys([*options.requirements.groups, *policy.groups])),
        require_signed=options.requirements.require_signed,
    )
    checks = offline_checks(plan, options.trust, req)
    denied = policy.denied
    # right after integrity: a denied plan is refused for that, whatever else it lacks
    checks.insert(1, Check("policy", not denied, "no deny rule fires" if not denied else
                           "denied by " + "; ".join(f"{f.rule} ({f.file}:{f.line}) {f.subject}" for f in denied)))
    if policy.windows:
        closed = closed_windows(policy.windows, options.now)
        checks.append(Check("window", not closed, "inside the change window(s)" if not closed else
                            "outside the change window " + "; ".join(f"{w.rule}: {w.describe()}" for w in closed)))
    if plan.body.steps and not options.allow_unrehearsed:
        rehearsed = plan.body.rehearsal.converged
        checks.append(Check("rehearsal", rehearsed, plan.body.rehearsal.describe() if rehearsed else
                            f"the plan was not proven on a copy ({plan.body.rehearsal.describe()}); "
                            "plan again with rehearsal on, or set allow_unrehearsed"))
    same_env = plan.body.environment == options.environment
    checks.append(Check("environment", same_env, f"made for {plan.body.environment!r}" if same_env else
                        f"made for environment {plan.body.environment!r}, not {options.environment!r}"))
    if conn is None:
        return checks
    ident = inspect.identity(conn)
    target = plan.body.target
    same_target = plan.body.is_for(ident.system_identifier, ident.database)
    intended = (f"database {target.database!r} on system {target.system_identifier}" if not plan.body.fleet else
                f"{len(plan.body.fleet)} database(s) of a fleet")
    checks.append(Check(
        "target", same_target,
        f"database {ident.database!r} on system {ident.system_identifier}" if same_target else
        f"the plan is for {intended}, not {ident.database!r} on system {ident.system_identifier}",
    ))
    for assertion in (a for a in policy.assertions if a.when == "before"):
        failure = run_assertion(conn, assertion)
        ok = failure is None or assertion.action == "warn"
        checks.append(Check(f"precondition {assertion.rule}", ok, "holds" if failure is None else
                            f"{failure} ({assertion.file}:{assertion.line})"))
    checks += preflight_checks(conn, plan, options)
    applied = [r for r in history.runs_for_plan(conn, options.metadata_schema, plan.id) if r.status == "applied"]
    checks.append(Check("replay", not applied, "not applied before" if not applied else
                        f"already applied to this database by run {applied[0].id}: plans are not replayed"))
    if same_target:
        live = inspect.snapshot(conn, exclude_schemas=(options.metadata_schema,), **plan.body.snapshot_options)
        fresh = live.fingerprint == target.fingerprint
        changed = "" if fresh else describe_differences(dict(target.objects), object_digests(live))
        checks.append(Check("freshness", fresh, "the live schema is as planned" if fresh else
                            f"stale: the database changed since it was planned ({changed}); plan again"))
    return checks


def preflight_checks(conn: psycopg.Connection[Any], plan: Plan, options: ApplyOptions) -> list[Check]:
    """Can this role do what the plan asks? Each failure names what is missing."""
    steps = plan.body.steps
    if not steps:
        return []
    touched = sorted({t for s in steps for t in (*s.tables, s.object) if t.count(".") == 1})
    not_owned = [r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname || '.' || c.relname = ANY(%s) AND NOT pg_has_role(c.relowner, 'USAGE') ORDER BY 1",
        (touched,)).fetchall()]
    created_in = sorted({s.object.split(".")[0] for s in steps
                         if s.kind.startswith("create_") and s.kind != "create_schema" and "." in s.object})
    no_create = [r[0] for r in conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s) AND NOT has_schema_privilege(oid, 'CREATE') ORDER BY 1",
        (created_in,)).fetchall()]
    if any(s.kind == "create_schema" for s in steps):
        row = conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()
        if not (row and row[0]):
            no_create.append("the database (CREATE SCHEMA)")
    checks = [
        Check("ownership", not not_owned, "the role owns what the plan alters" if not not_owned else
              f"the role {conn.info.user!r} does not own (nor belong to the owner of): {', '.join(not_owned)}"),
        Check("privileges", not no_create, "CREATE where the plan creates" if not no_create else
              f"the role {conn.info.user!r} lacks CREATE on: {', '.join(no_create)}"),
    ]
    if options.backup_scope != "none" and options.backups_dir is not None:
        unreadable = [r[0] for r in conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p', 'S', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_%%' AND NOT has_table_privilege(c.oid, 'SELECT') ORDER BY 1").fetchall()]
        checks.append(Check("backup", not unreadable, "pg_dump can read every table" if not unreadable else
                            f"the backup cannot read: {', '.join(unreadable[:10])} (grant SELECT or set backup: none)"))
    extensions = sorted({s.object for s in steps if s.kind == "create_extension"})
    if extensions:
        rows = conn.execute(
            "SELECT e.name, e.trusted OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) "
            "FROM pg_available_extension_versions e WHERE e.name = ANY(%s) AND e.version = "
            "(SELECT default_version FROM pg_available_extensions a WHERE a.name = e.name)", (extensions,)).fetchall()
        allowed = {name for name, ok in rows if ok}
        missing = [e for e in extensions if e not in {name for name, _ in rows}]
        refused = [e for e in extensions if e not in allowed and e not in missing]
        problems = ([f"not installed on the server: {', '.join(missing)}"] if missing else []) + \
            ([f"not trusted and the role is not a superuser: {', '.join(refused)}"] if refused else [])
        checks.append(Check("extensions", not problems, "the role may create them" if not problems else "; ".join(problems)))
    return checks


def check_plan(plan: Plan, conn: psycopg.Connection[Any], options: ApplyOptions) -> str:
    """Refuse a plan that was altered, unapproved, expired, for another database, stale or replayed."""
    enforce(plan_checks(plan, options, conn), plan)
    return plan.body.target.fingerprint


def _acquire_lock(executor: psycopg.Connection[Any], control: psycopg.Connection[Any], options: ApplyOptions) -> None:
    deadline = time.monotonic() + options.lock_wait_seconds
    announced = False
    while True:
        row = executor.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        if row and row[0]:
            return
        holders = [
            int(r[0])
            for r in control.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND ((classid::bigint << 32) | objid::bigint) = %s",
                (LOCK_KEY,),
            ).fetchall()
        ]
        holder = history.running_with_pid(control, options.metadata_schema, holders)
        who = (
            f"run {holder.id} (plan {holder.plan_id.removeprefix('sha256:')[:12]}, {holder.actor}@{holder.client_host}, "
            f"since {holder.started_at:%Y-%m-%d %H:%M:%S %Z})"
            if holder else f"backend pid {', '.join(map(str, holders)) or 'unknown'}"
        )
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


class Cancelled(Exception):
    """`reconciler cancel` asked this run to stop."""


def apply_plan(plan: Plan, target_dsn: str, options: ApplyOptions) -> ApplyResult:
    """Run an approved plan against the target; refuses, or records the run as applied, failed,
    rolled back or cancelled."""
    schema = options.metadata_schema
    with connect(target_dsn, application_name="reconciler control") as control, \
            connect(target_dsn, application_name="reconciler apply") as executor:
        _acquire_lock(executor, control, options)
        if int(executor.info.server_version) >= 140000:
            # If this process dies mid-statement, the server stops the statement instead of finishing it
            # for nobody (a concurrent index build would otherwise complete after a kill -9).
            executor.execute("SET client_connection_check_interval = '1s'")
        try:
            history.ensure_schema(control, schema)
            _recover_interrupted(plan, control, options)
            fingerprint = check_plan(plan, control, options)
            if not plan.body.steps:
                return ApplyResult(run_id=None, status="nothing", steps=(), fingerprint=fingerprint)
            run_id = str(uuid.uuid4())
            if options.backup_scope != "none" and options.backups_dir is not None:
                # before the run is recorded, so a restored backup holds no half-written history row
                taken = _take_backup(plan, run_id, target_dsn, control, options)
            else:
                taken = None

            def start() -> None:
                history.start_run(
                    control, schema, run_id=run_id,
                    plan_id=plan.id, environment=options.environment, backend_pid=executor.info.backend_pid,
                    git_commit=plan.body.desired.git_commit, from_fingerprint=plan.body.target.fingerprint,
                    to_fingerprint=plan.body.desired.schema_fingerprint,
                )
                if taken is not None:
                    history.record_backup(control, schema, run_id, path=str(taken.path), sha256=taken.sha256,
                                          size=taken.size)

            token = current_run.set(run_id)
            try:
                return _run(plan, run_id, control, executor, replace(options, monitor_dsn=target_dsn), start)
            finally:
                current_run.reset(token)
        finally:
            if not executor.closed and executor.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                executor.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def _run(plan: Plan, run_id: str, control: psycopg.Connection[Any], executor: psycopg.Connection[Any],
         options: ApplyOptions, start: Callable[[], None]) -> ApplyResult:
    """`start` records the run inside the guarded block: a Ctrl-C or SIGTERM landing just after the row is
    written still finishes it as cancelled instead of leaving it running."""
    schema = options.metadata_schema
    records: list[StepRecord] = []
    progress = _Progress(control, schema, run_id, records)
    try:
        start()
        log.info("applying plan %s (%d steps in %d phases)", plan.short_id, len(plan.body.steps),
                 len(_phases(plan.body.steps)))
        with LockWaitMonitor(options.monitor_dsn, executor.info.backend_pid) if options.monitor_dsn else \
                contextlib.nullcontext() as monitor:
            _execute(plan, executor, options, records, progress, monitor)
    except BaseException as exc:
        cancelled = isinstance(exc, KeyboardInterrupt | Cancelled) or (
            isinstance(exc.__cause__, psycopg.errors.QueryCanceled) and history.cancel_requested(control, schema, run_id))
        message = "cancelled" if cancelled and not isinstance(exc, ApplyError) else _error_text(exc)
        outcome, status = _after_failure(plan, records, control, executor, options, run_id)
        status = "cancelled" if cancelled else status
        history.finish_run(control, schema, run_id, status=status, statements=records, error=f"{message}; {outcome}")
        log.info("%s: %s; %s", status, message, outcome)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ApplyError(f"run {run_id} {'was cancelled' if cancelled else 'failed'}: {message}; {outcome}", run_id) from None
    verification = verify(executor, plan, options.metadata_schema)
    fingerprint = str(verification["fingerprint"])
    history.record_verification(control, schema, run_id, verification)
    failures = _postconditions(plan, control) + verification_failures(verification)
    if failures:
        message = "; ".join(failures)
        history.finish_run(control, schema, run_id, status="failed", statements=records, error=message)
        raise ApplyError(f"run {run_id} failed verification: {message}; the steps were committed and stay applied "
                         f"(reconciler rollback {run_id} plans the way back)", run_id)
    history.finish_run(control, schema, run_id, status="applied", statements=records)
    log.info("applied in %.0f ms of statements", sum(r.duration_ms for r in records))
    return ApplyResult(run_id=run_id, status="applied", steps=tuple(records), fingerprint=fingerprint)


class _Progress:
    """Writes what has completed and what is running to the history row, for `cancel` and crash recovery.

    Only the records added since the last write are sent: a record, once written, is not changed before the
    run ends (a failed attempt marks its own records rolled back before the next write; undoing committed
    steps happens after the last one, and finish_run writes the whole list)."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str, run_id: str, records: list[StepRecord]) -> None:
        self.conn, self.schema, self.run_id, self.records = conn, schema, run_id, records
        self.written = 0

    def starting(self, phase: Sequence[Step]) -> None:
        if history.cancel_requested(self.conn, self.schema, self.run_id):
            raise Cancelled
        self._write([{"index": s.index, "kind": s.kind, "object": s.object, "transactional": s.transactional}
                     for s in phase])

    def committed(self) -> None:
        self._write([])

    def _write(self, current: list[dict[str, Any]]) -> None:
        added = self.records[self.written:]
        history.record_progress(self.conn, self.schema, self.run_id, added=added, position=self.written, current=current)
        self.written += len(added)


def _take_backup(plan: Plan, run_id: str, target_dsn: str, control: psycopg.Connection[Any],
                 options: ApplyOptions) -> backup.Backup:
    assert options.backups_dir is not None
    touched = sorted({h.table for s in plan.body.steps for h in s.hazards
                      if h.table and h.code in ("DATA_LOSS", "TABLE_REWRITE")})
    tables = [r[0] for r in control.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')").fetchall()]
    path = options.backups_dir / f"{plan.body.target.database}-{run_id}.dump"
    return backup.dump(target_dsn, server_major=int(control.info.server_version) // 10000, path=path,
                       scope=options.backup_scope, keep_data_of=touched, all_tables=tables)


def _after_failure(plan: Plan, records: list[StepRecord], control: psycopg.Connection[Any],
                   executor: psycopg.Connection[Any], options: ApplyOptions, run_id: str) -> tuple[str, str]:
    """Undo what earlier phases committed, when every one of those steps can be undone by SQL."""
    committed = [r for r in records if r.status == "applied"]
    if not committed:
        return "nothing was changed (rolled back)", "failed"
    steps = {s.index: s for s in plan.body.steps}
    irreversible = [r.index for r in committed if not steps[r.index].reversible]
    restore_hint = f"reconciler restore {run_id}" if options.backup_scope != "none" and options.backups_dir else \
        f"reconciler rollback {run_id}"
    if irreversible or not options.auto_rollback:
        why = f"step(s) {', '.join(map(str, irreversible))} cannot be undone by SQL" if irreversible else "auto_rollback is off"
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
                executor.execute(undo.encode())
            undone.append(record.index)
            records[position] = StepRecord(record.index, record.kind, record.object, record.sql, "undone",
                                           record.duration_ms)
    except psycopg.Error as exc:
        done = set(undone)
        left = [r.index for r in committed if r.index not in done]
        return (f"undoing step {left[-1]} failed ({_error_text(exc)}); step(s) {', '.join(map(str, left))} stay applied; "
                f"the way back: {restore_hint}"), "failed"
    return f"step(s) {', '.join(map(str, sorted(undone)))} were committed, then undone by their rollback SQL", "rolled back"


def recover_interrupted(control: psycopg.Connection[Any], metadata_schema: str, *,
                        holding_lock: bool) -> list[history.Run]:
    """Runs marked running whose process is gone: mark them interrupted, say which steps completed, and
    drop what a half-done concurrent index build left. Any command may do this, plan included."""
    recovered = []
    alive = {int(r[0]) for r in control.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'reconciler apply'").fetchall()}
    for run in history.running_runs(control, metadata_schema):
        if not holding_lock and run.backend_pid in alive:
            continue  # still at work
        done = [str(s["index"]) for s in run.statements if s.get("status") == "applied"]
        cleaned = [str(step["object"]) for step in run.current_steps
                   if step.get("kind") == "create_index_concurrently" and _drop_invalid_index(control, str(step["object"]))]
        message = (f"the applying process died (backend {run.backend_pid} is gone); completed step(s): "
                   f"{', '.join(done) or 'none'}" + (f"; dropped the INVALID index {', '.join(cleaned)}" if cleaned else ""))
        history.mark_interrupted(control, metadata_schema, run.id, message)
        log.warning("run %s was interrupted: %s", run.id, message)
        recovered.append(run)
    return recovered


def _recover_interrupted(plan: Plan, control: psycopg.Connection[Any], options: ApplyOptions) -> None:
    """With the lock held every running row is dead; a plan made before such a run started is refused."""
    for run in recover_interrupted(control, options.metadata_schema, holding_lock=True):
        if parse_time(plan.body.created_at) < run.started_at:
            raise RefusedError(f"run {run.id} was interrupted; plan again from the database as it is now")


def _postconditions(plan: Plan, conn: psycopg.Connection[Any]) -> list[str]:
    failures = []
    for assertion in (a for a in plan.body.policy.assertions if a.when == "after"):
        failure = run_assertion(conn, assertion)
        if failure is not None:
            if assertion.action == "warn":
                log.warning("postcondition %s %s", assertion.rule, failure)
            else:
                failures.append(f"postcondition {assertion.rule} ({assertion.file}:{assertion.line}) {failure}")
    return failures


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
    return str(exc)


def _set_timeouts(conn: psycopg.Connection[Any], step: Step, *, local: bool) -> None:
    conn.execute(
        "SELECT set_config('lock_timeout', %s, %s), set_config('statement_timeout', %s, %s)",
        (step.lock_timeout, local, step.statement_timeout, local),
    )


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




def _run_step(conn: psycopg.Connection[Any], step: Step, records: list[StepRecord],
              on_step: Callable[[Step], None] | None = None, monitor: LockWaitMonitor | None = None) -> None:
    if on_step is not None:
        on_step(step)
    if monitor is not None:
        monitor.begin()
    started = time.perf_counter()
    try:
        conn.execute(step.sql.encode(), prepare=False)
    except BaseException as exc:
        waited = monitor.end() if monitor is not None else 0.0
        records.append(StepRecord(step.index, step.kind, step.object, step.sql, "failed",
                                  (time.perf_counter() - started) * 1000, waited))
        if isinstance(exc, psycopg.Error):
            raise ApplyError(f"step {step.index} ({step.kind} {step.object}) failed: {_error_text(exc)}") from exc
        raise
    took = (time.perf_counter() - started) * 1000
    waited = monitor.end() if monitor is not None else 0.0
    records.append(StepRecord(step.index, step.kind, step.object, step.sql, "applied", took, waited))
    log.info("step %d %s %s: %.1f ms (lock wait %.0f ms)", step.index, step.kind, step.object, took, waited)


def _verify(plan: Plan, conn: psycopg.Connection[Any], options: ApplyOptions) -> None:
    live = inspect.snapshot(conn, exclude_schemas=(options.metadata_schema,), **plan.body.snapshot_options)
    changed = _unlike_desired(plan, live, limit=10)
    if changed:
        raise ApplyError(f"after the steps the database does not match the desired schema: {changed}")


def _is_lock_timeout(exc: BaseException) -> bool:
    cause = exc.__cause__ if isinstance(exc, ApplyError) else exc
    return isinstance(cause, psycopg.errors.LockNotAvailable)


def _retrying(options: ApplyOptions, what: str, attempt_phase: Callable[[], str | None]) -> str | None:
    """Run a phase; a lock timeout is retried with exponential backoff, a bounded number of times."""
    for attempt in range(options.lock_retries + 1):
        try:
            return attempt_phase()
        except ApplyError as exc:
            if not _is_lock_timeout(exc) or attempt == options.lock_retries:
                if _is_lock_timeout(exc):
                    raise ApplyError(f"{exc} (gave up after {attempt + 1} attempts)") from exc.__cause__
                raise
            delay = min(options.retry_backoff_seconds * 2**attempt, 30.0)
            log.warning("%s hit lock_timeout; retrying in %.1fs (attempt %d of %d)", what, delay, attempt + 2,
                        options.lock_retries + 1)
            time.sleep(delay)
    return None


def _drop_invalid_index(conn: psycopg.Connection[Any], index: str) -> bool:
    """A failed CREATE INDEX CONCURRENTLY leaves an INVALID index behind: drop it before retrying or failing."""
    row = conn.execute(
        "SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT i.indisvalid AND n.nspname || '.' || c.relname = %s",
        (index,),
    ).fetchone()
    if row:
        log.warning("dropping the INVALID index %s left by a failed concurrent build", row[0])
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(*index.split("."))))
    return row is not None


def _execute(plan: Plan, conn: psycopg.Connection[Any], options: ApplyOptions, records: list[StepRecord],
             progress: _Progress, monitor: LockWaitMonitor | None = None) -> None:
    phases = _phases(plan.body.steps)
    for number, phase in enumerate(phases, 1):
        last = number == len(phases)
        progress.starting(phase)
        if phase[0].transactional:
            def run_transaction(phase: list[Step] = phase, last: bool = last) -> None:
                done_before = len(records)
                try:
                    with conn.transaction():
                        timeouts: tuple[str, str] | None = None
                        for step in phase:
                            if (step.lock_timeout, step.statement_timeout) != timeouts:  # once while they stay the same
                                _set_timeouts(conn, step, local=True)
                                timeouts = (step.lock_timeout, step.statement_timeout)
                            _run_step(conn, step, records, options.on_step, monitor)
                        if last and options.verify_before_commit:
                            # Nothing is left behind by a plan that does not converge, but the phase's
                            # locks are held while the catalog is read: opt-in per environment.
                            _verify(plan, conn, options)
                except BaseException:
                    records[done_before:] = [
                        StepRecord(r.index, r.kind, r.object, r.sql, "rolled back" if r.status == "applied" else r.status,
                                   r.duration_ms)
                        for r in records[done_before:]
                    ]
                    raise

            _retrying(options, f"phase {phase[0].phase}", run_transaction)
        else:
            step = phase[0]

            def run_alone(step: Step = step) -> None:
                _set_timeouts(conn, step, local=False)
                try:
                    _run_step(conn, step, records, options.on_step, monitor)
                except ApplyError:
                    if step.kind == "create_index_concurrently":
                        _drop_invalid_index(conn, step.object)
                    raise
                finally:
                    conn.execute("RESET lock_timeout")
                    conn.execute("RESET statement_timeout")

            if step.kind == "create_index_concurrently":
                _retry_index_build(options, step, run_alone)
            else:
                _retrying(options, f"step {step.index}", run_alone)
        progress.committed()


def verify(conn: psycopg.Connection[Any], plan: Plan, metadata_schema: str) -> dict[str, Any]:
    """The checks after an apply, as stored in the history row: live equals desired, no INVALID index,
    and the NOT VALID constraints (each must be in the desired schema to pass the first check)."""
    live = inspect.snapshot(conn, exclude_schemas=(metadata_schema,), **plan.body.snapshot_options)
    unlike = _unlike_desired(plan, live, limit=50)
    differences = unlike.split(", ") if unlike else []
    invalid = [r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT i.indisvalid ORDER BY 1").fetchall()]
    not_valid = [r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || k.conname FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace "
        "WHERE NOT k.convalidated AND n.nspname <> %s ORDER BY 1", (metadata_schema,)).fetchall()]
    return {"converged": not differences, "fingerprint": live.fingerprint, "differences": differences,
            "invalid_indexes": invalid, "not_valid_constraints": not_valid}


def _unlike_desired(plan: Plan, live: inspect.SchemaSnapshot, *, limit: int) -> str:
    """'' when live is the desired schema (counting the plan's equivalents), else what differs."""
    if live.fingerprint == plan.body.desired.schema_fingerprint:
        return ""
    actual = object_digests(live)
    return describe_differences(plan.body.desired.unmatched(actual), actual, limit=limit)


def verification_failures(result: dict[str, Any]) -> list[str]:
    failures = []
    if result["differences"]:
        failures.append("the database does not match the desired schema: " + ", ".join(result["differences"][:10]))
    if result["invalid_indexes"]:
        failures.append("INVALID index(es) left: " + ", ".join(result["invalid_indexes"]))
    return failures


def _retry_index_build(options: ApplyOptions, step: Step, build: Callable[[], str | None]) -> None:
    """A concurrent build can fail for passing reasons (deadlock, lock timeout): retry it a bounded number of times."""
    for attempt in range(options.index_build_retries + 1):
        try:
            _retrying(options, f"step {step.index}", build)
            return
        except ApplyError as exc:
            cause = exc.__cause__
            permanent = isinstance(cause, psycopg.errors.UniqueViolation | psycopg.errors.SyntaxError
                                   | psycopg.errors.UndefinedColumn | psycopg.errors.UndefinedTable
                                   | psycopg.errors.QueryCanceled)  # cancelled or statement_timeout: not passing
            if permanent or attempt == options.index_build_retries:
                raise
            log.warning("concurrent index build of %s failed (%s); retrying", step.object, exc)
            time.sleep(options.retry_backoff_seconds)
