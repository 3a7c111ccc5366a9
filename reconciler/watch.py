"""``reconciler watch``: reconcile one environment continuously.

Every change under the schemas and policies folders (watchfiles, debounced) is planned; the plan is applied where
the environment and the policy's auto-apply gate allow it (the question ``apply --auto`` asks:
``pipeline.auto_apply_blockers``) and written to the plans folder otherwise. Every interval the live schema is
compared with the desired one; drift is reported, and reverted only where the plan may apply on its own.

The servers (an embedded target or shadow) stay up for the loop's lifetime. Several watchers on one database never
apply at once: apply's advisory lock admits one, and a watcher that waited finds its plan stale (or the lock held)
and plans again; while another apply holds that lock, the watcher waits for it before planning or checking
drift. A bad edit is reported and the loop goes on. SIGTERM or SIGINT stops the loop: a step under way
is cancelled the way Ctrl-C cancels it (apply records the run ``cancelled`` and rolls back what is open).
``/healthz`` and ``/metrics`` (Prometheus text format, a registry of the watcher's own) are served from a thread.

Plan files do not pile up: once the watcher has made a later plan for its environment (written, applied, or no
changes), the plan files it wrote before are superseded and removed, except one that someone may still act on: a
file that holds an approver's signature or no longer holds the plan as written (approved, or replaced: a review is
under way), or whose plan the target's history names (an apply ran it or is running it). Files it did not write
(another watcher's, a person's) are never touched; the check and the removal happen under the lock ``approve``
takes, so an approval under way is never lost.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import watchfiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import history, runlock, shadowcache
from .apply import ApplyOptions, apply_plan
from .config import WATCH_HOST, WATCH_PORT, Config, Environment
from .errors import ConfigError, LockTimeoutError, ReconcilerError, RefusedError
from .pipeline import LiveMemo, Servers, auto_apply_blockers, default_engine, drift, make_plan, open_servers
from .plan import Plan
from .planfile import read_plan, write_plan
from .safety.swap import CONTRACT
from .servers import connect
from .signing import PlanFileLock
from .source import DesiredSchema

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = WATCH_HOST, WATCH_PORT
PLAN_RESULTS = ("no_changes", "auto_apply", "written", "denied", "error")
APPLY_RESULTS = ("applied", "failed", "refused", "locked", "cancelled")
DRIFT_RESULTS = ("none", "found", "error")
RUN_STATUSES = ("running", "applied", "failed", "cancelled", "interrupted", "rolled back")


@dataclass(frozen=True)
class WatchOptions:
    plans_dir: Path
    interval_seconds: float = 300.0  # drift checks
    host: str = DEFAULT_HOST
    port: int | None = DEFAULT_PORT  # None: no HTTP endpoint; 0: any free port
    schemas_dir: Path | None = None  # default: the config's
    debounce_ms: int = 1600
    sign: Callable[[Plan], Plan] | None = None  # signs written plans as planner


@dataclass(frozen=True)
class Report:
    """One outcome of the loop, as logged: what set it off, what came of it."""

    trigger: str  # start, change or drift
    result: str  # no_changes, applied, written, denied, drift, no_drift, error, locked, refused, failed, cancelled,
    # waiting (another apply under way)
    message: str
    at: datetime
    plan_path: Path | None = None


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1); an IPv6 host in brackets: ``[::1]:9187``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.removeprefix("[").removesuffix("]") or DEFAULT_HOST
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {text!r}: give HOST:PORT, with a port from 0 to 65535")
    return host, int(port)


class Metrics:
    """The watcher's series, in a registry of its own (never the process-wide default one)."""

    def __init__(self, *, target: bool = True) -> None:
        """``target``: one database's series too (its newest run, what stopped runs left, its backfills); a fleet's
        watcher has series of its own instead (fleet/watching.py)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.last_run = Gauge("reconciler_last_run_timestamp_seconds",
                              "When the last plan or drift check finished (Unix time)", registry=r)
        self.last_success = Gauge("reconciler_last_run_success",
                                  "1 when the last plan or drift check succeeded, 0 when it failed", registry=r)
        self.drift = Gauge("reconciler_drift_detected",
                           "1 when the live schema differed from the desired one at the last look and was not brought "
                           "back (changed by hand, or a plan waiting for approval)", registry=r)
        self.plans = Counter("reconciler_plans", "Plans made, by result", ["result"], registry=r)
        self.applies = Counter("reconciler_applies", "Applies tried, by result", ["result"], registry=r)
        self.drift_checks = Counter("reconciler_drift_checks", "Drift checks, by result", ["result"], registry=r)
        self.stage_duration = Histogram("reconciler_stage_duration_seconds", "Time spent planning, applying and "
                                        "checking drift (a fleet's: reading its databases too)", ["stage"], registry=r,
                                        buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
        self.step_duration = Histogram("reconciler_step_duration_seconds", "Duration of each applied plan step, by "
                                       "step kind", ["kind"], registry=r,
                                       buckets=(0.005, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600))
        if target:
            self._target_series(r)
        for counter, results in ((self.plans, PLAN_RESULTS), (self.applies, APPLY_RESULTS),
                                 (self.drift_checks, DRIFT_RESULTS)):
            for result in results:  # every series from the start, at 0, so rate() and alerts see them
                counter.labels(result)
        for stage in ("plan", "apply", "drift") if target else ("survey", "plan", "apply"):
            self.stage_duration.labels(stage)

    def _target_series(self, r: CollectorRegistry) -> None:
        self.target_run = Gauge("reconciler_target_last_run", "1 for the status of the newest run in the target's history "
                                "(by anyone), as it truly is: a run whose applier is gone is interrupted", ["status"],
                                registry=r)
        self.left_behind = Gauge("reconciler_target_cleanup_pending", "What stopped runs left in the target (an INVALID "
                                 "index, a helper constraint) and no command could remove yet", registry=r)
        self.backfill_pages = Gauge("reconciler_backfill_pages", "Pages of the table a running backfill fills, and how "
                                    "many it has done", ["object", "of"], registry=r)
        self.backfill_rows = Gauge("reconciler_backfill_rows", "Rows a running backfill has filled", ["object"],
                                   registry=r)
        self.backfill_rate = Gauge("reconciler_backfill_rows_per_second", "A running backfill's rate", ["object"],
                                   registry=r)
        self.backfill_paused = Gauge("reconciler_backfill_paused", "1 while a backfill waits (a replica behind, lock "
                                     "waiters, an old transaction, an operator's pause)", ["object"], registry=r)
        self.backfill_left = Gauge("reconciler_backfill_seconds_left", "A running backfill's time left, as estimated "
                                   "from its rate", ["object"], registry=r)
        for status in RUN_STATUSES:
            self.target_run.labels(status)

    def backfill(self, progress: dict[str, Any]) -> None:
        """A backfill's progress (apply's ``on_backfill``), before each batch."""
        what = str(progress.get("object"))
        self.backfill_pages.labels(what, "total").set(float(progress.get("pages") or 0))
        self.backfill_pages.labels(what, "done").set(float(progress.get("pages_done") or 0))
        self.backfill_rows.labels(what).set(float(progress.get("rows") or 0))
        self.backfill_rate.labels(what).set(float(progress.get("rows_per_second") or 0))
        self.backfill_paused.labels(what).set(1.0 if progress.get("state") == "paused" else 0.0)
        self.backfill_left.labels(what).set(float(progress.get("seconds_left") or 0))

    def text(self) -> bytes:
        return generate_latest(self.registry)


def _files(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """The watched files' modification times and sizes."""
    wanted = _SourceFilter()
    found = {}
    for root in paths:
        for path in root.rglob("*"):
            with contextlib.suppress(OSError):
                if wanted(watchfiles.Change.modified, str(path)) and path.is_file():
                    stat = path.stat()
                    found[str(path)] = (stat.st_mtime_ns, stat.st_size)
    return found


def _changed(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> set[tuple[watchfiles.Change, str]]:
    """The changes between two looks at the watched files."""
    return ({(watchfiles.Change.added, p) for p in after.keys() - before.keys()}
            | {(watchfiles.Change.deleted, p) for p in before.keys() - after.keys()}
            | {(watchfiles.Change.modified, p) for p in after.keys() & before.keys() if after[p] != before[p]})


class _SourceFilter(watchfiles.DefaultFilter):
    """Desired-schema and policy files only (editors' swap and backup files are left out by the default filter)."""

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        return path.endswith((".sql", ".yaml", ".yml")) and super().__call__(change, path)


class Watcher:
    def __init__(self, config: Config, env: Environment, options: WatchOptions, apply_options: ApplyOptions) -> None:
        self.config, self.env, self.options = config, env, options
        self.metrics = Metrics(target=not env.is_fleet)
        self.apply_options = apply_options if env.is_fleet else replace(apply_options, on_backfill=self.metrics.backfill)
        self.reports: deque[Report] = deque(maxlen=500)  # the recent ones, for /healthz and tests
        self.address: tuple[str, int] | None = None  # where /metrics is served, once listening
        self.listening = threading.Event()
        self.cycles = 0  # plans and drift checks done (start, changes, intervals)
        self._stop = threading.Event()
        self.engine = default_engine(config, remember=True)  # one for every plan: it rereads only what changed
        self.live_memo = LiveMemo()  # live's snapshot too
        self.planned: DesiredSchema | None = None  # the last plan's schema: its kept database may be edited in place
        self._working = False  # a plan, apply or drift check is under way
        self._interrupting = False
        self.written: dict[Path, Plan] = {}  # plan files this watcher wrote and has not yet removed, as written

    # --- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop after the step under way (from any thread)."""
        self._stop.set()

    def handle_signal(self, _signum: int, _frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: stop; a step under way is cancelled like Ctrl-C cancels it, once."""
        self._stop.set()
        if self._working and not self._interrupting:
            self._interrupting = True
            raise KeyboardInterrupt

    def health(self) -> tuple[bool, str]:
        """Alive while the loop runs; a failing plan or an unreachable database shows in /metrics, not here."""
        if self._stop.is_set():
            return False, "stopping\n"
        last = self.reports[-1] if self.reports else None
        if last is None:
            return True, "ok: starting\n"
        return True, f"ok: last {last.trigger} {last.result} at {last.at:%Y-%m-%dT%H:%M:%SZ}\n"

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Plan once, then on every change and check drift every interval, until stopped."""
        schemas = self.options.schemas_dir or self.config.schemas_dir
        if not schemas.is_dir():
            raise ConfigError(f"the schemas folder {schemas} does not exist")
        paths = [p for p in (schemas, self.config.policies_dir) if p.is_dir()]
        tick_ms = max(50, int(min(self.options.interval_seconds, 1.0) * 1000))
        with self._signals(), self._target() as servers, self._serving():
            log.info("watching %s for environment %s (drift checks every %gs)",
                     ", ".join(map(str, paths)), self.env.name, self.options.interval_seconds)
            before: dict[str, tuple[int, int]] | None = _files(paths)
            self._cycle(servers, "start")
            next_drift = time.monotonic() + self.options.interval_seconds
            for changes in watchfiles.watch(*paths, watch_filter=_SourceFilter(), debounce=self.options.debounce_ms,
                                            stop_event=self._stop, rust_timeout=tick_ms, yield_on_timeout=True):
                if self._stop.is_set():
                    break
                if before is not None:  # watching now: what changed before it did (during the first plan) counts
                    changes, before = changes | _changed(before, _files(paths)), None
                if changes:
                    self._cycle(servers, "change", self._describe(changes))
                elif time.monotonic() >= next_drift:
                    self._cycle(servers, "drift")
                else:
                    continue
                next_drift = time.monotonic() + self.options.interval_seconds
        log.info("stopped watching environment %s", self.env.name)

    def _target(self) -> contextlib.AbstractContextManager[Any]:
        """What every cycle works on, kept up for the loop's lifetime: the database's servers."""
        return open_servers(self.config, self.env)

    def _cycle(self, servers: Servers, trigger: str, changed: str = "") -> None:
        if self._stop.is_set() or not self._no_apply_under_way(servers, trigger):
            return
        try:
            with shadowcache.deferred_eviction() as evict:  # after the report: nobody waits on it then
                ok = self._check_drift(servers) if trigger == "drift" else self._reconcile(servers, trigger, changed)
                evict()
        except KeyboardInterrupt:
            self._stop.set()
            self._report(trigger, "cancelled", "stopping: the step under way was cancelled", logging.WARNING)
            ok = False
        self.metrics.last_run.set(time.time())
        self.metrics.last_success.set(1 if ok else 0)
        self._observe_history(servers)
        self.cycles += 1

    def _reconcile(self, servers: Servers, trigger: str, changed: str) -> bool:
        """Plan; apply where allowed, else write the plan. A plan that lost the race to another watcher (the lock
        was held, or the database moved on while it waited) is planned once more."""
        for attempt in (1, 2):
            if changed and attempt == 1:
                log.info("changed: %s", changed)
            before = self._latest_run(servers)
            try:
                with self._work("plan"):
                    comparison = make_plan(self.config, self.env, servers, schemas_dir=self.options.schemas_dir,
                                           engine=self.engine, live_memo=self.live_memo, consume_kept=True,
                                           previous=self.planned)
                    plan, self.planned = comparison.plan, comparison.source
            except Exception as exc:  # a bad edit (or a database away) is reported; the loop goes on
                self.metrics.plans.labels("error").inc()
                raced = attempt == 1 and self._latest_run(servers) != before
                self._report(trigger, "error", describe_error(exc) + ("; another apply ran meanwhile: planning again"
                                                                      if raced else ""), logging.ERROR)
                if raced:
                    continue
                return False
            if not plan.body.steps:
                self.metrics.plans.labels("no_changes").inc()
                self.metrics.drift.set(0)
                self._report(trigger, "no_changes", f"no changes: {plan.body.target.database} matches the desired schema")
                self._remove_superseded(servers, plan)
                return True
            self.metrics.drift.set(1)
            blockers = [*auto_apply_blockers(self.env, plan), *self._finishes_held(servers, plan)]
            if blockers:
                written = self._write(plan, trigger, blockers)
                if written:
                    self._remove_superseded(servers, plan)
                return written
            self.metrics.plans.labels("auto_apply").inc()
            outcome = self._apply(plan, servers, trigger, last_try=attempt == 2)
            if outcome == "applied":
                self._remove_superseded(servers, plan)
            if outcome not in ("locked", "refused"):
                return outcome == "applied"
        return False

    def _remove_superseded(self, servers: Servers, latest: Plan) -> None:
        """Remove the plan files this watcher wrote before ``latest`` that nobody may still act on (the rule is in the
        module's docstring); the others are kept, and forgotten: they are no longer the watcher's alone."""
        earlier = {path: plan for path, plan in self.written.items() if plan.id != latest.id}
        if not earlier:
            return
        try:
            with connect(servers.target_dsn) as conn:
                ran = {p.id for p in earlier.values() if history.runs_for_plan(conn, self.config.metadata_schema, p.id)}
        except (ReconcilerError, psycopg.Error) as exc:  # cannot tell whether an apply refers to them: keep all for now
            log.debug("could not read the target's history: %s", exc)
            return
        for path, plan in earlier.items():
            del self.written[path]
            if plan.id in ran:
                log.info("kept plan file %s: the target's history names plan %s", path, plan.short_id)
                continue
            try:
                with PlanFileLock(path):
                    found = read_plan(path)
                    if found.id != plan.id or any(s.role == "approver" for s in found.signatures):
                        log.info("kept plan file %s: it was approved or replaced since it was written", path)
                        continue
                    path.unlink()
            except ReconcilerError:  # removed or made unreadable by someone else: not ours to judge
                continue
            except OSError as exc:
                log.warning("could not remove the superseded plan file %s: %s", path, exc)
                continue
            log.info("removed plan file %s: plan %s supersedes plan %s", path, latest.short_id, plan.short_id)

    def _no_apply_under_way(self, servers: Servers, trigger: str) -> bool:
        """Waits while another apply holds the target's lock (False: stopped meanwhile). A plan or a drift check made
        now would see its work part-way, and the plan's copy of live for the rehearsal would lock every table while
        pg_dump reads them: the apply's cut-overs would wait behind those locks and give up."""
        said = ""
        while not self._stop.is_set():
            under_way = self._apply_under_way(servers)
            if under_way is None:
                return True
            if under_way != said:
                self._report(trigger, "waiting", f"waiting: {under_way}; planning once it has ended")
                said = under_way
            self._stop.wait(1.0)
        return False

    def _apply_under_way(self, servers: Servers) -> str | None:
        """Who holds the target's apply lock, said for the log; None when nobody does (or the database cannot be
        read: the plan then says what is wrong)."""
        try:
            with connect(servers.target_dsn) as conn:
                if not runlock.held_on(conn):
                    return None
                running = [r for r in history.running_runs(conn, self.config.metadata_schema) if r.alive]
        except (ReconcilerError, psycopg.Error):
            return None
        if not running:
            return "another session holds the database's apply lock (a rollback or restore?)"
        return running[0].applying

    def _held_contracts(self, servers: Servers) -> dict[str, str]:
        try:
            with connect(servers.target_dsn) as conn:
                return history.held_contracts(conn, self.config.metadata_schema)
        except (ReconcilerError, psycopg.Error):
            return {}

    def _finishes_held(self, servers: Servers, plan: Plan) -> list[str]:
        """A contract someone held (apply --hold-contract) is theirs to finish: a plan that would drop what it kept
        is written for a person, never applied by the loop (that would end the way back they kept)."""
        held = self._held_contracts(servers) if any(s.kind == CONTRACT for s in plan.body.steps) else {}
        runs = sorted({run for tag, run in held.items() for s in plan.body.steps
                       if s.kind == CONTRACT and f"_reconciler_old_{tag}" in s.object})
        return [f"it would finish the contract run {run} held (apply --hold-contract): apply it by hand to finish "
                f"it, or `reconciler rollback {run}` to swap back" for run in runs]

    def _observe_history(self, servers: Servers) -> None:
        """The target's newest run and what stopped runs left, as they are (each cycle settled them first)."""
        try:
            with connect(servers.target_dsn) as conn:
                latest = history.list_runs(conn, self.config.metadata_schema, limit=1)
                pending = sum(1 for r in history.with_cleanup(conn, self.config.metadata_schema) for e in r.cleanup
                              if e.get("status") == "pending")
        except (ReconcilerError, psycopg.Error) as exc:
            log.debug("could not read the target's history: %s", exc)
            return
        for status in RUN_STATUSES:
            self.metrics.target_run.labels(status).set(1 if latest and latest[0].shown_status == status else 0)
        self.metrics.left_behind.set(pending)

    def _latest_run(self, servers: Servers) -> tuple[str, str] | None:
        """The newest run in the target's history (id, status): when it moves while planning, another apply (another
        watcher) changed the database under the plan, and a failed plan is worth a second try."""
        try:
            with connect(servers.target_dsn) as conn:
                latest = history.list_runs(conn, self.config.metadata_schema, limit=1)
        except (ReconcilerError, psycopg.Error):
            return None
        return (latest[0].id, latest[0].status) if latest else None

    def _write(self, plan: Plan, trigger: str, blockers: list[str]) -> bool:
        denied = bool(plan.body.policy.denied)
        self.metrics.plans.labels("denied" if denied else "written").inc()
        try:
            if self.options.sign is not None:
                plan = self.options.sign(plan)
            self.options.plans_dir.mkdir(parents=True, exist_ok=True)
            path = self.options.plans_dir / f"{self.env.name}-{plan.short_id}.json"
            write_plan(plan, path)
            self.written[path] = plan
        except (ReconcilerError, OSError) as exc:
            self._report(trigger, "error", f"plan {plan.short_id} could not be written: {describe_error(exc)}",
                         logging.ERROR)
            return False
        self._report(trigger, "denied" if denied else "written",
                     f"plan {plan.short_id} ({len(plan.body.steps)} step(s)) written to {path}, not applied: "
                     + "; ".join(blockers), logging.WARNING, plan_path=path)
        return True

    def _apply(self, plan: Plan, servers: Servers, trigger: str, *, last_try: bool) -> str:
        again = "" if last_try else "; planning again"
        try:
            with self._work("apply"):
                result = apply_plan(plan, servers.target_dsn, self.apply_options)
        except KeyboardInterrupt:
            self.metrics.applies.labels("cancelled").inc()
            raise
        except LockTimeoutError as exc:  # another watcher (or apply) is at work on this database
            outcome, message, level = "locked", f"not applied: {exc}{again}", logging.WARNING
        except RefusedError as exc:  # e.g. stale: another watcher applied while this one waited for the lock
            outcome, message, level = "refused", f"not applied: {exc}{again}", logging.WARNING
        except Exception as exc:  # ApplyError: the run is recorded failed (or rolled back) in history
            outcome, message, level = "failed", f"apply failed: {describe_error(exc)}", logging.ERROR
        else:
            for step in result.steps:
                self.metrics.step_duration.labels(step.kind).observe(step.duration_ms / 1000)
            self.metrics.applies.labels("applied").inc()
            self.metrics.drift.set(0)
            self._report(trigger, "applied", f"applied plan {plan.short_id}: {len(result.steps)} step(s) "
                                             f"(run {result.run_id})")
            return "applied"
        self.metrics.applies.labels(outcome).inc()
        self._report(trigger, outcome, message, level)
        return outcome

    def _check_drift(self, servers: Servers) -> bool:
        try:
            with self._work("drift"):
                differences = drift(self.config, servers, schemas_dir=self.options.schemas_dir)
        except Exception as exc:
            self.metrics.drift_checks.labels("error").inc()
            self._report("drift", "error", describe_error(exc), logging.ERROR)
            return False
        held = self._held_contracts(servers) if differences else {}
        kept = {str(d): run for d in differences for run in [history.held_by(held, d.name, d.change)] if run}
        differences = [d for d in differences if str(d) not in kept]
        if not differences:
            self.metrics.drift_checks.labels("none").inc()
            self.metrics.drift.set(0)
            if kept:  # there on purpose: not drift, and not reverted (that would end the way back)
                runs = sorted(set(kept.values()))
                self._report("drift", "no_drift", f"no drift but what the contract of run(s) {', '.join(runs)} held "
                             f"({len(kept)} object(s), kept in step for the way back: `reconciler rollback` swaps back, "
                             "an applied plan finishes it)", logging.INFO)
            else:
                self._report("drift", "no_drift", "no drift: the live schema matches the desired schema", logging.DEBUG)
            return True
        self.metrics.drift_checks.labels("found").inc()
        self.metrics.drift.set(1)
        shown = ", ".join(str(d) for d in differences[:10]) + (f" and {len(differences) - 10} more"
                                                              if len(differences) > 10 else "")
        blockers = auto_apply_blockers(self.env)
        if blockers:
            self._report("drift", "drift", f"drift: {len(differences)} object(s) differ from the desired schema: "
                                           f"{shown}; not reverted ({'; '.join(blockers)})", logging.WARNING)
            return True
        self._report("drift", "drift", f"drift: {len(differences)} object(s) differ from the desired schema: {shown}; "
                                       "reverting", logging.WARNING)
        return self._reconcile(servers, "drift", "")

    # --- helpers -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _work(self, stage: str) -> Iterator[None]:
        """Marks a step under way (a signal cancels it) and times it."""
        started = time.perf_counter()
        self._working = True
        try:
            yield
        finally:
            self._working = False
            self.metrics.stage_duration.labels(stage).observe(time.perf_counter() - started)

    def _report(self, trigger: str, result: str, message: str, level: int = logging.INFO,
                plan_path: Path | None = None) -> None:
        self.reports.append(Report(trigger, result, message, datetime.now(UTC), plan_path))
        log.log(level, "%s: %s", trigger, message)

    def _describe(self, changes: set[tuple[watchfiles.Change, str]]) -> str:
        names = sorted({f"{_relative(Path(path), self.config.root)} ({change.name})" for change, path in changes})
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """Handle SIGTERM and SIGINT while running in the main thread (signals reach no other)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self.handle_signal)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        if self.options.port is None:
            yield
            return
        try:
            server = _HttpServer((self.options.host, self.options.port), self)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.options.host}:{self.options.port}: {exc.strerror or exc}") from exc
        thread = threading.Thread(target=server.serve_forever, name="reconciler-metrics", daemon=True)
        thread.start()
        bound, port = server.server_address[:2]
        host = bound if isinstance(bound, str) else bytes(bound).decode()
        self.address = (host, int(port))
        shown = f"[{host}]" if ":" in host else host
        log.info("serving /healthz and /metrics on http://%s:%d", shown, port)
        self.listening.set()
        try:
            yield
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], watcher: Watcher) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.watcher = watcher
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, self.server.watcher.metrics.text())
        elif path == "/healthz":
            healthy, text = self.server.watcher.health()
            self._send(200 if healthy else 503, "text/plain; charset=utf-8", text.encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: /healthz and /metrics are served here\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.address_string(), *args)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, ReconcilerError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"
