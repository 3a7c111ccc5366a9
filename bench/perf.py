"""Plan performance against raw migra: time and peak memory of ``reconciler plan`` and of migra's own command line,
on the same two databases, in the same run, with the ratio printed. See bench/README.md.

    .venv/bin/python bench/perf.py all
    .venv/bin/python bench/perf.py synthetic --tables 200,1000
    .venv/bin/python bench/perf.py lattice --views 20,24,28
    .venv/bin/python bench/perf.py fanout --fanout-views 50
    .venv/bin/python bench/perf.py gitlab
    .venv/bin/python bench/perf.py watch --watch-tables 1000

This is a benchmark, not a test: it prints what it measured and asserts nothing about timings. It does stop,
with the command's stderr, when a command fails (a plan exiting 1, migra crashing, a plan that did not converge).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import measure
import psycopg
import schemagen
from measure import BenchError, LoggedProcess, Measured
from psycopg import sql
from rich.console import Console
from rich.table import Table

from reconciler import dsn as dsnlib
from reconciler.errors import ReconcilerError
from reconciler.servers import (
    EmbeddedCluster,
    Server,
    connect,
    drop_database,
    memory_dir,
    scratch_server,
    service_account,
)
from reconciler.shadow import create_roles, load_schema, roles_named
from reconciler.source import load_source

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.prefix) / "bin"
RECONCILER = BIN / "reconciler"
MIGRA = BIN / "migra"
GITLAB_SQL = REPO.parent / "shared" / "corpus" / "schemas" / "gitlab.sql"
ENVIRONMENT = "bench"
METADATA_SCHEMA = "reconciler"
BENCHMARKS = ("synthetic", "lattice", "fanout", "gitlab", "watch")
GITLAB_CASES = ("empty", "same", "changed", "restored")
EXIT_OK, EXIT_CHANGES = 0, 2
SYSTEM_DATABASES = frozenset({"postgres", "template0", "template1"})
# What a plan logs about its shadow database: taken from the shadow cache (a copy of a template, or a database the
# cache keeps), or loaded statement by statement.
_CACHED = re.compile(r"shadow cache: the shadow database\b[^\n]*\bnot built again")
_LOADED = re.compile(r"loaded \d+ statements from \d+ file\(s\) into the shadow database")

out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
progress = Console(stderr=True, highlight=False)


def say(text: str) -> None:
    progress.print(f"[dim]{datetime.now():%H:%M:%S}[/dim] {text}")


# ---- results --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Figure:
    """One measured command."""

    seconds: float
    peak_mib: float
    exit_code: int
    count: int  # migra: statements printed; plan: steps planned
    rehearsal_seconds: float | None = None  # plan: the rehearsal's share, from the plan file
    shadow: str = ""  # plan: "cache" (from the shadow cache) or "load" (statement by statement), as its log says


@dataclass
class CaseResult:
    benchmark: str
    case: str
    description: str
    prepare_seconds: float
    figures: dict[str, Figure] = field(default_factory=dict)  # "migra", "cold", "warm"
    notes: list[str] = field(default_factory=list)
    load_before: float = 0.0  # 1-minute load average of the machine when the case started
    load_after: float = 0.0


@dataclass(frozen=True)
class WatchResult:
    tables: int
    start_seconds: float  # watch started -> the first plan reported
    detect_seconds: tuple[float, ...]  # file written -> "changed:" logged
    latency_seconds: tuple[float, ...]  # file written -> the new plan reported
    kinds: tuple[str, ...]  # each edit's: "append" (a table added at the end) or "middle" (a table in the middle)
    peak_mib: float
    results: tuple[str, ...]  # what each report said (first words)
    load_before: float
    load_after: float


class Record:
    """What has been measured so far, written to the results file after every case (a run cut short keeps them)."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.header = header
        self.cases: list[CaseResult] = []
        self.watch: WatchResult | None = None

    def add(self, result: CaseResult) -> None:
        self.cases.append(result)
        self.save()

    def save(self, found: list[Goal] | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {**self.header, "results": [asdict(r) for r in self.cases],
                "watch": asdict(self.watch) if self.watch else None,
                "goals": [asdict(g) for g in found] if found is not None else None}
        self.path.write_text(json.dumps(data, indent=2) + "\n")


# ---- the server and its databases -----------------------------------------------------------------------------

class Bench:
    """Two servers: the target's, holding the live databases and migra's desired ones; and the shadow server our
    plans use (another cluster, as in a real setup, so the plans may keep their shadow cache there)."""

    def __init__(self, server: Server, shadow: Server, *, own_shadow: bool, workdir: Path, timeout: float) -> None:
        self.server = server
        self.shadow = shadow
        self.own_shadow = own_shadow
        self.workdir = workdir
        self.timeout = timeout
        self.tag = secrets.token_hex(3)
        with connect(server.dsn) as conn:
            self.server_version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        self.env = {**os.environ, "XDG_CACHE_HOME": str(workdir / "xdg-cache"), "PYTHONWARNINGS": "ignore"}
        self.env.pop("RECONCILER_DATABASE_URL", None)
        self.env.pop("RECONCILER_PLANNER_KEY", None)

    # databases

    def create_database(self, name: str, *, template: str = "template0") -> str:
        full = f"bench_{self.tag}_{name}"
        with connect(self.server.dsn) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(full), sql.Identifier(template)))
        return full

    def drop(self, *names: str) -> None:
        for name in names:
            drop_database(self.server, name)

    def dsn(self, name: str) -> str:
        return self.server.database_dsn(name)

    def run_sql(self, name: str, text: str) -> None:
        """Run SQL made of blank-line separated blocks (schemagen's), a hundred blocks per transaction: one
        transaction for all of 5,000 tables would run out of lock table."""
        blocks = [b for b in text.split("\n\n") if b.strip()]
        with connect(self.dsn(name)) as conn:
            conn.execute("SET synchronous_commit = off")
            for start in range(0, len(blocks), 100):
                try:
                    conn.execute("\n\n".join(blocks[start:start + 100]).encode())
                except psycopg.Error as exc:
                    raise BenchError(f"preparing database {name}: {exc}") from None

    def touch(self, name: str) -> None:
        """Write a catalog row of database ``name`` anew without changing its schema: a column's statistics target
        set to what it is (the default)."""
        with connect(self.dsn(name)) as conn:
            row = conn.execute(
                "SELECT n.nspname, c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND a.attnum > 0 "
                "AND NOT a.attisdropped AND n.nspname = 'public' ORDER BY c.oid LIMIT 1").fetchone()
            if row is None:
                raise BenchError(f"database {name} has no table to touch")
            conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STATISTICS -1").format(
                sql.Identifier(row[0], row[1]), sql.Identifier(row[2])))

    def load_file(self, name: str, folder: Path) -> None:
        """Load a schema folder the way a shadow is loaded (statement by statement; errors name file:line)."""
        load_schema(load_source(folder), self.dsn(name), sandbox=None)

    def clear_shadow_cache(self) -> list[str]:
        """Make the next plan cold: clear the shadow cache the way it documents (``reconciler.shadowcache.clear``,
        what ``reconciler cache clear`` runs), drop every other database left on the shadow server when it is ours
        (nothing else uses it), and empty the commands' XDG cache folder. Returns the databases dropped."""
        shutil.rmtree(self.workdir / "xdg-cache", ignore_errors=True)
        dropped: list[str] = []
        cache = _shadowcache()
        if cache is not None:
            dropped += cache.clear(self.shadow)
        if self.own_shadow:
            for name in sorted(self.shadow_databases()):
                drop_database(self.shadow, name)
                dropped.append(name)
        return dropped

    def shadow_databases(self) -> set[str]:
        """The databases on the shadow server, but the system ones (templates included)."""
        with connect(self.shadow.dsn) as conn:
            present = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
        return present - SYSTEM_DATABASES

    # commands

    def migra(self, live: str, desired: str, *, label: str, logs: Path) -> Figure:
        argv = [str(MIGRA), "--unsafe", "--exclude_schema", METADATA_SCHEMA,
                dsnlib.sqlalchemy_url(self.dsn(live)).render_as_string(hide_password=False),
                dsnlib.sqlalchemy_url(self.dsn(desired)).render_as_string(hide_password=False)]
        m = measure.run(argv, label=label, logs=logs, expect=(EXIT_OK, EXIT_CHANGES), timeout=self.timeout, env=self.env)
        text = m.stdout.read_text(errors="replace")
        statements = sum(1 for chunk in text.split("\n\n") if chunk.strip())
        return Figure(m.seconds, m.peak_mib, m.exit_code, statements)

    def project(self, root: Path, live: str, desired_sql: str) -> Path:
        """A project folder whose one environment plans ``live`` against ``desired_sql`` with this server as the
        shadow: rehearsal on, squawk on, data checks on (the defaults); unsigned plans, no backups."""
        (root / "schemas").mkdir(parents=True, exist_ok=True)
        (root / "policies").mkdir(exist_ok=True)
        (root / "schemas" / "desired.sql").write_text(desired_sql)
        config = root / "reconciler.yaml"
        config.write_text(textwrap.dedent(f"""\
            schemas: schemas
            policies: policies
            plans: plans
            environments:
              {ENVIRONMENT}:
                database: "{self.dsn(live)}"
                shadow: "{self.shadow.dsn}"
                require_signed_plans: false
                auto_apply: false
                backup: none
            """))
        return config

    def plan(self, config: Path, *, label: str, logs: Path, expect: Sequence[int]) -> Figure:
        plan_file = logs / f"{label}.plan.json"
        plan_file.unlink(missing_ok=True)
        argv = [str(RECONCILER), "--config", str(config), "--log-format", "json", "plan", "--env", ENVIRONMENT,
                "-o", str(plan_file)]
        m = measure.run(argv, label=label, logs=logs, expect=expect, timeout=self.timeout, env=self.env,
                        cwd=config.parent)
        return _plan_figure(m, plan_file, label)

    def plans(self, config: Path, *, label: str, logs: Path, expect: Sequence[int], result: CaseResult,
              live: str | None = None) -> None:
        """A cold plan (shadow cache cleared) and a warm one right after it; with ``live``, a third (``moved``)
        after a change to live's catalogs that changes no plan (a column's statistics target set to its default):
        the shadow is as warm, but nothing read of live before may be used again."""
        dropped = self.clear_shadow_cache()
        if dropped:
            result.notes.append(f"cold: dropped {len(dropped)} database(s) left on the shadow server: "
                                f"{', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''}")
        result.figures["cold"] = self.plan(config, label=f"{label}-cold", logs=logs, expect=expect)
        result.figures["warm"] = self.plan(config, label=f"{label}-warm", logs=logs, expect=expect)
        if live is not None:
            self.touch(live)
            result.figures["moved"] = self.plan(config, label=f"{label}-moved", logs=logs, expect=expect)
            result.notes.append(f"warm plan after live's catalogs moved (live read again): "
                                f"{result.figures['moved'].seconds:.2f} s / {result.figures['moved'].peak_mib:.0f} MiB")
        kept = sorted(self.shadow_databases())
        if kept:
            result.notes.append(f"after the warm plan the shadow server holds {', '.join(kept[:3])}"
                                f"{f' and {len(kept) - 3} more' if len(kept) > 3 else ''}")
        if _shadowcache() is None and not self.own_shadow:
            result.notes.append("cold: this version has no reconciler.shadowcache and the shadow server was given "
                                "with --shadow-dsn: nothing was cleared")
        cold, warm = result.figures["cold"], result.figures["warm"]
        if cold.count != warm.count:
            result.notes.append(f"the cold plan has {cold.count} steps, the warm one {warm.count}")


def _shadowcache() -> Any:
    """The shadow cache module when this version of reconciler has one (None otherwise)."""
    if importlib.util.find_spec("reconciler.shadowcache") is None:
        return None
    return importlib.import_module("reconciler.shadowcache")


def _plan_figure(m: Measured, plan_file: Path, label: str) -> Figure:
    log = m.stderr.read_text(errors="replace")
    shadow = "cache" if _CACHED.search(log) else "load" if _LOADED.search(log) else "?"
    if m.exit_code == EXIT_OK and not plan_file.exists():
        return Figure(m.seconds, m.peak_mib, m.exit_code, 0, shadow=shadow)
    try:
        body = json.loads(plan_file.read_text())["body"]
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(f"{label}: `{measure.shown(m.argv)}` exited {m.exit_code} but wrote no readable plan to "
                         f"{plan_file} ({exc})\n{m.stderr_tail()}") from None
    steps = len(body["steps"])
    rehearsal = body["rehearsal"]
    if steps and rehearsal["status"] != "converged":
        raise BenchError(f"{label}: the plan's rehearsal is {rehearsal['status']}: {rehearsal.get('error')} "
                         f"{rehearsal.get('differences')}")
    rehearsed = None if rehearsal["status"] == "skipped" else float(rehearsal["duration_ms"]) / 1000
    return Figure(m.seconds, m.peak_mib, m.exit_code, steps, rehearsed, shadow)


def _load() -> float:
    return os.getloadavg()[0]


@contextlib.contextmanager
def case(benchmark: str, name: str, description: str, record: Record) -> Iterator[CaseResult]:
    result = CaseResult(benchmark, name, description, 0.0, load_before=_load())
    say(f"[bold]{benchmark} {name}[/bold]: {description}")
    yield result
    result.load_after = _load()
    record.add(result)
    say(_one_line(result))


def _one_line(r: CaseResult) -> str:
    parts = [f"{k} {f.seconds:.2f} s / {f.peak_mib:.0f} MiB" for k, f in r.figures.items()]
    return f"  {r.benchmark} {r.case}: " + "; ".join(parts)


# ---- the benchmarks -------------------------------------------------------------------------------------------

def _migra_then_plans(bench: Bench, result: CaseResult, logs: Path, prefix: str, old_sql: str, new_sql: str) -> None:
    """Live (old) and desired (new) databases; raw migra between them, then our plan cold and warm."""
    started = time.perf_counter()
    live, desired = bench.create_database(f"{prefix}_live"), bench.create_database(f"{prefix}_desired")
    try:
        bench.run_sql(live, old_sql)
        bench.run_sql(desired, new_sql)
        result.prepare_seconds = time.perf_counter() - started
        say(f"  prepared both databases in {result.prepare_seconds:.1f} s; migra ...")
        result.figures["migra"] = bench.migra(live, desired, label="migra", logs=logs)
        config = bench.project(logs / "project", live, new_sql)
        say("  reconciler plan, cold then warm ...")
        bench.plans(config, label="plan", logs=logs, expect=(EXIT_CHANGES,), result=result, live=live)
    finally:
        bench.drop(live, desired)


def _case_folder(bench: Bench, name: str, old_sql: str, new_sql: str) -> Path:
    """The case's folder in the run's, holding the old and new SQL it plans."""
    logs = bench.workdir / name
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "old.sql").write_text(old_sql)
    (logs / "new.sql").write_text(new_sql)
    return logs


def bench_synthetic(bench: Bench, sizes: Sequence[int], seed: int, record: Record) -> None:
    for tables in sizes:
        schemas = schemagen.synthetic(tables, seed=seed)
        with case("synthetic", f"{tables} tables", schemas.describe(), record) as result:
            logs = _case_folder(bench, f"synthetic-{tables}", schemas.old_sql, schemas.new_sql)
            (logs / "changes.txt").write_text("\n".join(schemas.changes) + "\n")
            _migra_then_plans(bench, result, logs, f"syn{tables}", schemas.old_sql, schemas.new_sql)


def bench_lattice(bench: Bench, sizes: Sequence[int], record: Record) -> None:
    for views in sizes:
        schemas = schemagen.lattice(views)
        with case("lattice", f"{views} views", f"{views} chained views; {schemas.change}", record) as result:
            logs = _case_folder(bench, f"lattice-{views}", schemas.old_sql, schemas.new_sql)
            _migra_then_plans(bench, result, logs, f"lat{views}", schemas.old_sql, schemas.new_sql)


def bench_fanout(bench: Bench, sizes: Sequence[int], record: Record) -> None:
    """Views re-created by a change none of them needs: migra's statements and ours, counted."""
    for views in sizes:
        schemas = schemagen.fanout(views)
        with case("fanout", f"{views} views", f"{views} views over one table; {schemas.change}", record) as result:
            logs = _case_folder(bench, f"fanout-{views}", schemas.old_sql, schemas.new_sql)
            _migra_then_plans(bench, result, logs, f"fan{views}", schemas.old_sql, schemas.new_sql)
            body = json.loads((logs / "plan-warm.plan.json").read_text())["body"]
            recreated = sum(1 for s in body["steps"] if s["kind"] in ("drop_view", "drop_matview"))
            migra_sql = (logs / "migra.out").read_text(errors="replace")
            migra_drops = len(re.findall(r"^drop (?:materialized )?view", migra_sql, re.IGNORECASE | re.MULTILINE))
            result.notes.append(f"views and materialized views re-created: {recreated} by the plan "
                                f"({len(body['steps'])} steps), {migra_drops} by raw migra")


def bench_gitlab(bench: Bench, cases: Sequence[str], source: Path, record: Record) -> None:
    if not source.is_file():
        raise BenchError(f"GitLab's schema is not at {source} (give --gitlab-sql)")
    full_sql = source.read_text()
    changed_sql, changes = schemagen.gitlab_changed(full_sql)
    logs = bench.workdir / "gitlab"
    (logs / "full").mkdir(parents=True, exist_ok=True)
    (logs / "changed").mkdir(parents=True, exist_ok=True)
    (logs / "full" / "gitlab.sql").write_text(full_sql)
    (logs / "changed" / "gitlab.sql").write_text(changed_sql)
    say(f"[bold]gitlab[/bold]: loading {source.name} ...")
    started = time.perf_counter()
    create_roles(bench.server.dsn, roles_named(load_source(logs / "full")))  # roles are cluster-wide
    full = bench.create_database("gitlab_full")
    made = [full]
    try:
        bench.load_file(full, logs / "full")
        loaded = time.perf_counter() - started
        say(f"  loaded in {loaded:.1f} s")
        statements = sum(1 for line in full_sql.splitlines() if line.startswith("CREATE "))
        plans: dict[str, tuple[str, str, str, str, int]] = {
            # case: (live, migra's desired, desired SQL, description, plan exit code expected)
        }
        if "empty" in cases:
            empty = bench.create_database("gitlab_empty")
            made.append(empty)
            plans["empty"] = (empty, full, full_sql, f"empty database -> GitLab ({statements} CREATE statements)",
                              EXIT_CHANGES)
        if "same" in cases:
            copy = bench.create_database("gitlab_copy", template=full)
            made.append(copy)
            plans["same"] = (full, copy, full_sql, "GitLab -> GitLab, no changes", EXIT_OK)
        if "changed" in cases or "restored" in cases:
            changed = bench.create_database("gitlab_changed", template=full)
            made.append(changed)
            bench.run_sql(changed, "\n".join(s for s, _ in schemagen.GITLAB_CHANGES))
            if "changed" in cases:
                plans["changed"] = (full, changed, changed_sql, f"GitLab -> GitLab with {len(changes)} changes: "
                                    + "; ".join(changes), EXIT_CHANGES)
        prepared = time.perf_counter() - started
        if "restored" in cases:
            with case("gitlab", "restored", f"GitLab -> GitLab with {len(changes)} changes on a fresh machine whose shadow "
                      "was restored from an archive of the state a plan of GitLab left (CI: main's cache)", record) as result:
                result.prepare_seconds = prepared
                _gitlab_restored(bench, result, logs / "restored", full, changed, full_sql, changed_sql)
        for name in GITLAB_CASES:
            if name not in plans or name == "restored":
                continue
            live, desired, desired_sql, description, expected = plans[name]
            with case("gitlab", name, description, record) as result:
                result.prepare_seconds = prepared
                case_logs = logs / name
                say("  migra ...")
                result.figures["migra"] = bench.migra(live, desired, label=f"{name}-migra", logs=case_logs)
                config = bench.project(case_logs / "project", live, desired_sql)
                say("  reconciler plan, cold then warm ...")
                bench.plans(config, label=f"{name}-plan", logs=case_logs, expect=(EXIT_OK, EXIT_CHANGES), result=result)
                for key in ("cold", "warm"):
                    if result.figures[key].exit_code != expected:
                        result.notes.append(f"UNEXPECTED: the {key} plan exited {result.figures[key].exit_code} "
                                            f"({result.figures[key].count} steps), expected {expected}")
    finally:
        bench.drop(*reversed(made))


def _gitlab_restored(bench: Bench, result: CaseResult, logs: Path, full: str, changed: str, full_sql: str,
                     changed_sql: str) -> None:
    """The GitHub workflow's warm plan: a shadow server plans GitLab (main's schema) and is stopped; its data folder
    and the plans' saved readings (inspections) are archived (actions/cache), wiped, and restored into a fresh
    server's folder and an otherwise empty XDG cache (a fresh machine); the pull request's plan (GitLab and 7 changes
    appended) runs against it. Live is as main's plans left it (staging unchanged since). Beside it, in the same
    run: raw migra and the cold plan (the bench's own shadow, cleared)."""
    logs.mkdir(parents=True, exist_ok=True)
    result.figures["migra"] = bench.migra(full, changed, label="migra", logs=logs)
    config = bench.project(logs / "cold-project", full, changed_sql)
    bench.clear_shadow_cache()
    say("  cold plan ...")
    result.figures["cold"] = bench.plan(config, label="plan-cold", logs=logs, expect=(EXIT_CHANGES,))
    folder = Path(tempfile.mkdtemp(prefix="reconciler-bench-restored-"))
    folder.chmod(0o755)
    bindir = bench.shadow.bindir
    try:
        main_shadow = EmbeddedCluster(folder / "main" / "pg", bindir, durable=False)
        server = main_shadow.start()
        try:
            # what the workflow's push to main leaves: GitLab kept (its drift check: here a plan, GitLab to GitLab),
            # and a copy of live kept by its warm-up plan (main's schema and a table more: rehearsed, so a copy of
            # live is made and kept)
            say("  main's plans: GitLab, then the warm-up, keeping GitLab and a copy of live in the shadow ...")
            shutil.rmtree(bench.workdir / "xdg-cache", ignore_errors=True)
            main_config = _project_on(bench, logs / "main-project", full, full_sql, server)
            bench.plan(main_config, label="plan-main", logs=logs, expect=(EXIT_OK,))
            warm_config = _project_on(bench, logs / "warm-up-project", full, full_sql + WARM_UP_SQL, server)
            bench.plan(warm_config, label="plan-warm-up", logs=logs, expect=(EXIT_CHANGES,))
        finally:
            main_shadow.stop()
        archive, readings = folder / "shadow.tar", folder / "inspections.tar"
        cache = bench.workdir / "xdg-cache" / "reconciler"
        started = time.perf_counter()
        subprocess.run(["tar", "-C", str(main_shadow.datadir), "-cf", str(archive), "."], check=True)
        subprocess.run(["tar", "-C", str(cache), "-cf", str(readings), "inspections"], check=True)
        archived = time.perf_counter() - started
        size = (archive.stat().st_size + readings.stat().st_size) / 2**20
        main_shadow.stop(delete=True)
        shutil.rmtree(main_shadow.datadir, ignore_errors=True)
        restored = 0.0
        # first as when staging has changed since main's run (its reading is stale: not restored), then as when it
        # has not (the workflow's usual case, the warm column)
        for label, with_readings in (("plan-restored-live-changed", False), ("plan-restored", True)):
            fresh = EmbeddedCluster(folder / "fresh" / "pg", bindir, durable=False)
            shutil.rmtree(fresh.datadir, ignore_errors=True)
            fresh.datadir.mkdir(parents=True)
            shutil.rmtree(bench.workdir / "xdg-cache", ignore_errors=True)  # a fresh machine's home
            cache.mkdir(mode=0o700, parents=True)
            started = time.perf_counter()
            subprocess.run(["tar", "-C", str(fresh.datadir), "-xf", str(archive)], check=True)
            if with_readings:
                subprocess.run(["tar", "-C", str(cache), "-xf", str(readings)], check=True)
            restored = time.perf_counter() - started
            server = fresh.start()
            try:
                pr_config = _project_on(bench, logs / "pr-project", full, changed_sql, server)
                say(f"  the pull request's plan on the restored shadow{'' if with_readings else ', live changed'} ...")
                figure = bench.plan(pr_config, label=label, logs=logs, expect=(EXIT_CHANGES,))
            finally:
                fresh.stop(delete=True)
            if with_readings:
                result.figures["warm"] = figure
            else:
                changed_figure = figure
        log = (logs / "plan-restored.err").read_text(errors="replace")
        held = re.search(r"holds the first (\d+) of the desired schema's (\d+) statements", log)
        live_kept = re.search(r"the copy of live \([^)]*\) is kept database \w+; not built again", log)
        live_read = re.search(rf"inspection cache: \S+/{re.escape(full)} has the catalogs it had", log)
        result.notes.append(f"warm column: the plan on the restored shadow (archive {size:.0f} MiB, made in "
                            f"{archived:.1f} s, restored in {restored:.1f} s, not counted); "
                            + (f"it reused {held.group(1)} of {held.group(2)} statements" if held else
                               "it reused no kept desired database")
                            + ("; the copy of live was kept" if live_kept else "; it copied live (pg_dump)")
                            + ("; main's reading of live was used" if live_read else "; it read live again"))
        migra = result.figures["migra"].seconds
        result.notes.append(f"had staging changed since main's run (its saved reading not used, the rest as above): "
                            f"{changed_figure.seconds:.2f} s, {changed_figure.seconds / migra:.2f}x migra")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


WARM_UP_SQL = "\n\nCREATE TABLE reconciler_warm_up (id integer);\n"  # as deploy/github/reconciler.yml's


def _project_on(bench: Bench, root: Path, live: str, desired_sql: str, shadow: Server) -> Path:
    """bench.project with another shadow server."""
    config = bench.project(root, live, desired_sql)
    config.write_text(config.read_text().replace(f'shadow: "{bench.shadow.dsn}"', f'shadow: "{shadow.dsn}"'))
    assert shadow.dsn in config.read_text()
    return config


def _watch_edits(new_sql: str, edits: int) -> Iterator[tuple[str, str]]:
    """The desired file's text after each edit, with its kind: ``edits`` saves that each add a table at the end of
    the file, then ``edits`` saves that each change a table in the middle of it (its column's default)."""
    appended = ""
    for i in range(1, edits + 1):
        appended += f"\nCREATE TABLE watch_edit_{i:03d} (\n    id bigint PRIMARY KEY,\n    note text\n);\n"
        yield "append", new_sql + appended
    cut = new_sql.index(";\n", len(new_sql) // 2) + 2  # a statement's end about halfway through
    for i in range(1, edits + 1):
        middle = f"\nCREATE TABLE watch_middle (\n    id bigint PRIMARY KEY,\n    note text DEFAULT 'edit {i}'\n);\n"
        yield "middle", new_sql[:cut] + middle + new_sql[cut:] + appended


def bench_watch(bench: Bench, tables: int, edits: int, seed: int, settle: float) -> WatchResult:
    """``reconciler watch`` on a project of ``tables`` tables (5% changed, so every plan has steps). ``edits`` saves
    each add a table at the end of the desired schema file, then ``edits`` saves each change a table in the middle
    of it; the latency is from the write to the watcher's report of the new plan (auto_apply is off: the plan is
    written for approval, the live database stays as it was)."""
    schemas = schemagen.synthetic(tables, seed=seed)
    logs = bench.workdir / f"watch-{tables}"
    logs.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    say(f"[bold]watch {tables} tables[/bold]: {schemas.describe()}; {edits} edit(s)")
    live = bench.create_database(f"watch{tables}_live")
    watcher: LoggedProcess | None = None
    try:
        bench.run_sql(live, schemas.old_sql)
        config = bench.project(logs / "project", live, schemas.new_sql)
        schema_file = config.parent / "schemas" / "desired.sql"
        bench.clear_shadow_cache()
        argv = [str(RECONCILER), "--config", str(config), "--log-format", "json", "watch", "--env", ENVIRONMENT,
                "--listen", "off", "--interval", "24h", "--plans-dir", str(logs / "plans")]
        watcher = LoggedProcess(argv, label="watch", logs=logs, cwd=config.parent, env=bench.env)
        first = watcher.wait_for("start: ", timeout=bench.timeout, what="first plan")
        _check_report(first, watcher)
        start_seconds = first.at - watcher.started
        say(f"  first plan reported {start_seconds:.2f} s after starting the watcher")
        detects, latencies, kinds, said = [], [], [], [first.message.split(" (")[0]]
        for k, (kind, text) in enumerate(_watch_edits(schemas.new_sql, edits), 1):
            time.sleep(settle)
            written = time.perf_counter()
            schema_file.write_text(text)
            changed = watcher.wait_for("changed: ", timeout=bench.timeout, what=f"change {k} noticed")
            report = watcher.wait_for("change: ", timeout=bench.timeout, what=f"plan for change {k}")
            _check_report(report, watcher)
            detects.append(changed.at - written)
            latencies.append(report.at - written)
            kinds.append(kind)
            said.append(report.message.split(" (")[0])
            say(f"  edit {k} ({kind}): noticed after {detects[-1]:.2f} s, plan reported after {latencies[-1]:.2f} s")
        code, peak = watcher.stop()
        watcher = None
        if code != EXIT_OK:
            raise BenchError(f"watch exited {code} on SIGTERM (expected 0)\n{measure.tail(logs / 'watch.err')}")
        return WatchResult(tables, start_seconds, tuple(detects), tuple(latencies), tuple(kinds), peak, tuple(said),
                           load_before, _load())
    finally:
        if watcher is not None:
            watcher.stop()
        bench.drop(live)


def _check_report(line: measure.LogLine, watcher: LoggedProcess) -> None:
    if line.level == "error":
        raise BenchError(f"watch reported a failure: {line.message}\n{measure.tail(watcher.err_path)}")


# ---- goals and output -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Goal:
    text: str
    measured: str  # what was measured, or "not run"
    met: bool | None  # None: not run


def goals(results: list[CaseResult], watch: WatchResult | None) -> list[Goal]:
    by = {(r.benchmark, r.case): r for r in results}
    found: list[Goal] = []

    def figure(benchmark: str, name: str, key: str) -> Figure | None:
        r = by.get((benchmark, name))
        return r.figures.get(key) if r else None

    cold, warm = figure("lattice", "28 views", "cold"), figure("lattice", "28 views", "warm")
    if cold and warm:
        found.append(Goal("lattice of 28 views: plan under 1 s (judged on the cold plan)",
                          f"cold {cold.seconds:.2f} s, warm {warm.seconds:.2f} s", cold.seconds < 1.0))
    else:
        found.append(Goal("lattice of 28 views: plan under 1 s (judged on the cold plan)", "not run", None))
    warm, migra = figure("synthetic", "1000 tables", "warm"), figure("synthetic", "1000 tables", "migra")
    text = "1,000 tables: warm-shadow plan time <= raw migra's diff time"
    moved = figure("synthetic", "1000 tables", "moved")
    if warm and migra:
        also = f"; live moved {moved.seconds:.2f} s ({moved.seconds / migra.seconds:.2f}x)" if moved else ""
        found.append(Goal(text, f"warm {warm.seconds:.2f} s vs migra {migra.seconds:.2f} s "
                                f"({warm.seconds / migra.seconds:.2f}x){also}", warm.seconds <= migra.seconds))
    else:
        found.append(Goal(text, "not run", None))
    warm = figure("gitlab", "same", "warm")
    text = "GitLab, no changes: warm-shadow plan under 10 s"
    found.append(Goal(text, f"warm {warm.seconds:.2f} s", warm.seconds < 10.0) if warm else Goal(text, "not run", None))
    restored, migra = figure("gitlab", "restored", "warm"), figure("gitlab", "restored", "migra")
    text = "GitLab, 7 changes, shadow restored from an archive (CI): plan within 1.5x raw migra"
    found.append(Goal(text, f"{restored.seconds:.2f} s vs migra {migra.seconds:.2f} s "
                            f"({restored.seconds / migra.seconds:.2f}x)", restored.seconds <= 1.5 * migra.seconds)
                 if restored and migra else Goal(text, "not run", None))
    cold, warm = figure("synthetic", "5000 tables", "cold"), figure("synthetic", "5000 tables", "warm")
    text = "5,000 tables: plan's peak memory under 300 MiB (the larger of cold and warm)"
    if cold and warm:
        peak = max(cold.peak_mib, warm.peak_mib)
        found.append(Goal(text, f"cold {cold.peak_mib:.0f} MiB, warm {warm.peak_mib:.0f} MiB", peak < 300.0))
    else:
        found.append(Goal(text, "not run", None))
    text = "watch, 1,000 tables: file saved -> new plan reported under 2 s (judged on the median of every edit)"
    if watch and watch.tables == 1000 and watch.latency_seconds:
        median = statistics.median(watch.latency_seconds)
        by_kind = "; ".join(f"{kind} median {statistics.median(s):.2f} s"
                            for kind in dict.fromkeys(watch.kinds)
                            for s in [[t for t, k in zip(watch.latency_seconds, watch.kinds, strict=True) if k == kind]])
        found.append(Goal(text, f"median {median:.2f} s, max {max(watch.latency_seconds):.2f} s ({by_kind})",
                          median < 2.0))
    else:
        found.append(Goal(text, "not run", None))
    return found


def _ratio(ours: Figure | None, migra: Figure | None, attr: str) -> str:
    if ours is None or migra is None or not getattr(migra, attr):
        return "-"
    return f"{getattr(ours, attr) / getattr(migra, attr):.2f}x"


def _cell(f: Figure | None, attr: str, fmt: str) -> str:
    return "-" if f is None else format(getattr(f, attr), fmt)


def print_results(results: list[CaseResult], watch: WatchResult | None, found: list[Goal],
                  header: dict[str, Any]) -> None:
    out.print(f"\n[bold]reconciler plan vs raw migra[/bold]  ({header['started_at']}, {header['machine']['cpus']} cores, "
              f"PostgreSQL {header['server_version']}, commit {header['git']['commit'][:12]}"
              f"{' + uncommitted changes' if header['git']['dirty'] else ''})")
    start = header["cli_start"]
    out.print(f"Target server's files on disk; shadow server's: {header.get('shadow_files', '?')}")
    out.print(f"CLI start-up alone: reconciler --version {start['reconciler']['seconds']:.2f} s / "
              f"{start['reconciler']['peak_mib']:.0f} MiB, migra --help {start['migra']['seconds']:.2f} s / "
              f"{start['migra']['peak_mib']:.0f} MiB (included in every figure below)")
    for benchmark in BENCHMARKS:
        rows = [r for r in results if r.benchmark == benchmark]
        if not rows:
            continue
        table = Table(title=f"{benchmark}: wall seconds and peak RSS MiB", title_justify="left")
        for column in ("case", "migra s", "cold s", "warm s", "cold x", "warm x", "migra MiB", "cold MiB", "warm MiB",
                       "warm MiB x", "rehearsal s", "shadow", "steps", "stmts", "load"):
            table.add_column(column, justify="left" if column == "case" else "right")
        for r in rows:
            m, c, w = r.figures.get("migra"), r.figures.get("cold"), r.figures.get("warm")
            rehearsal = "-" if w is None or w.rehearsal_seconds is None else f"{w.rehearsal_seconds:.2f}"
            table.add_row(r.case, _cell(m, "seconds", ".2f"), _cell(c, "seconds", ".2f"), _cell(w, "seconds", ".2f"),
                          _ratio(c, m, "seconds"), _ratio(w, m, "seconds"), _cell(m, "peak_mib", ".0f"),
                          _cell(c, "peak_mib", ".0f"), _cell(w, "peak_mib", ".0f"), _ratio(w, m, "peak_mib"), rehearsal,
                          f"{c.shadow if c else '-'}/{w.shadow if w else '-'}",
                          _cell(w, "count", "d"), _cell(m, "count", "d"), f"{r.load_before:.1f}/{r.load_after:.1f}")
        out.print(table)
        out.print("  x: ours / migra's.  rehearsal s: the warm plan's rehearsal.  shadow: cold/warm plan's shadow database, "
                  "loaded or from the shadow cache.  steps: the warm plan's.  stmts: migra's.  load: 1-min load "
                  "average before/after")
        for r in rows:
            out.print(f"  {r.case}: {r.description}; databases prepared in {r.prepare_seconds:.1f} s")
            for note in r.notes:
                out.print(f"    note: {note}")
    if watch is not None:
        table = Table(title=f"watch: {watch.tables} tables, file saved -> new plan reported", title_justify="left")
        for column in ("first plan s", "edit", "noticed s", "plan reported s", "report", "watch peak MiB", "load"):
            table.add_column(column, justify="right")
        edits = zip(watch.detect_seconds, watch.latency_seconds, watch.kinds, strict=True)
        for i, (detect, latency, kind) in enumerate(edits, 1):
            table.add_row(f"{watch.start_seconds:.2f}" if i == 1 else "", f"{i} {kind}", f"{detect:.2f}",
                          f"{latency:.2f}", watch.results[i], f"{watch.peak_mib:.0f}" if i == 1 else "",
                          f"{watch.load_before:.1f}/{watch.load_after:.1f}" if i == 1 else "")
        out.print(table)
    table = Table(title="goals", title_justify="left")
    for column in ("goal", "measured", "status"):
        table.add_column(column)
    for g in found:
        status = "not run" if g.met is None else "[green]met[/green]" if g.met else "[red]not met[/red]"
        table.add_row(g.text, g.measured, status)
    out.print(table)


# ---- main -----------------------------------------------------------------------------------------------------

def _sizes(text: str) -> list[int]:
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers")
    return values


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False).stdout

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "HEAD").strip() or "unknown", "dirty": bool(changed), "changed_files": changed}


def _cli_start(bench: Bench) -> dict[str, dict[str, float]]:
    logs = bench.workdir / "start-up"
    ours = measure.run([str(RECONCILER), "--version"], label="reconciler-version", logs=logs, expect=(0,),
                       timeout=60, env=bench.env)
    theirs = measure.run([str(MIGRA), "--help"], label="migra-help", logs=logs, expect=(0,), timeout=60, env=bench.env)
    return {"reconciler": {"seconds": ours.seconds, "peak_mib": ours.peak_mib},
            "migra": {"seconds": theirs.seconds, "peak_mib": theirs.peak_mib}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", nargs="+", choices=[*BENCHMARKS, "all"], help="which benchmarks to run")
    parser.add_argument("--tables", type=_sizes, default=[200, 1000, 5000], help="synthetic sizes (default 200,1000,5000)")
    parser.add_argument("--views", type=_sizes, default=[20, 24, 28], help="lattice sizes (default 20,24,28)")
    parser.add_argument("--fanout-views", type=_sizes, default=[50], help="fanout sizes (default 50)")
    parser.add_argument("--gitlab-cases", default=",".join(GITLAB_CASES),
                        help="empty (empty -> full), same (full -> full), changed (full -> full with a few changes)")
    parser.add_argument("--gitlab-sql", type=Path, default=GITLAB_SQL, help=f"default {GITLAB_SQL}")
    parser.add_argument("--watch-tables", type=int, default=1000, help="watch: schema size (default 1000)")
    parser.add_argument("--watch-edits", type=int, default=3, help="watch: edits of each kind to time (end, middle; default 3)")
    parser.add_argument("--watch-settle", type=float, default=2.0,
                        help="watch: seconds to wait after a plan before the next edit (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="synthetic schemas' seed (default 1)")
    parser.add_argument("--dsn", help="superuser DSN of an existing server for the live databases and migra's desired "
                                      "ones (default: a throwaway embedded PostgreSQL)")
    parser.add_argument("--shadow-dsn", help="superuser DSN of an existing server, not --dsn's, for the plans' shadow "
                                             "(default: a second throwaway embedded PostgreSQL)")
    parser.add_argument("--shadow-on-disk", action="store_true",
                        help="keep the throwaway shadow server's files on disk, not on a memory filesystem (the "
                             "tool's embedded shadow uses one when there is one: see servers.memory_dir)")
    parser.add_argument("--pg-bindir", type=Path, help="server binaries for the throwaway servers (default: the wheel's)")
    parser.add_argument("--out", type=Path, help="results JSON (default: <workdir>/results.json)")
    parser.add_argument("--workdir", type=Path, help="where projects, plans and logs go (default: a new folder in /tmp)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds any one command may take (default 1800)")
    args = parser.parse_args(argv)
    if "all" in args.benchmarks:
        args.benchmarks = list(BENCHMARKS)
    args.gitlab_cases = [c.strip() for c in args.gitlab_cases.split(",") if c.strip()]
    unknown = set(args.gitlab_cases) - set(GITLAB_CASES)
    if unknown:
        parser.error(f"--gitlab-cases: unknown {', '.join(sorted(unknown))} (give {', '.join(GITLAB_CASES)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (RECONCILER, MIGRA):
        if not tool.is_file():
            print(f"error: {tool} not found: run with the project's venv (.venv/bin/python bench/perf.py)",
                  file=sys.stderr)
            return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"reconciler-bench-{datetime.now():%Y%m%d-%H%M%S}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"working in {workdir}")
    record: Record | None = None
    failed: BaseException | None = None
    try:
        # the target stands for a production server: on disk; the shadow is placed as the tool places an embedded
        # shadow (servers.memory_dir: on a memory filesystem where there is one) unless --shadow-on-disk
        with scratch_server(args.dsn, prefix="reconciler-bench-", bindir=args.pg_bindir, in_memory=False) as server, \
                scratch_server(args.shadow_dsn, prefix="reconciler-bench-shadow-", bindir=args.pg_bindir,
                               in_memory=not args.shadow_on_disk) as shadow:
            bench = Bench(server, shadow, own_shadow=not args.shadow_dsn, workdir=workdir, timeout=args.timeout)
            record = Record(args.out or workdir / "results.json", {
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
                "server_version": bench.server_version,
                "shadow_files": ("given by --shadow-dsn" if args.shadow_dsn else "disk" if args.shadow_on_disk
                                 or memory_dir(service_account()) is None else "memory filesystem"),
                "git": _git(),
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "cli_start": _cli_start(bench),
            })
            for name in args.benchmarks:
                if name == "synthetic":
                    bench_synthetic(bench, args.tables, args.seed, record)
                elif name == "lattice":
                    bench_lattice(bench, args.views, record)
                elif name == "fanout":
                    bench_fanout(bench, args.fanout_views, record)
                elif name == "gitlab":
                    bench_gitlab(bench, args.gitlab_cases, args.gitlab_sql, record)
                else:
                    record.watch = bench_watch(bench, args.watch_tables, args.watch_edits, args.seed, args.watch_settle)
    except (BenchError, ReconcilerError, psycopg.Error) as exc:
        failed = exc
    if record is not None:
        found = goals(record.cases, record.watch)
        record.header["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        if failed is not None:
            record.header["failed"] = str(failed)
        print_results(record.cases, record.watch, found, record.header)
        record.save(found)
        out.print(f"\nresults: {record.path}")
    out.print(f"logs, projects and plans: {workdir}")
    if failed is not None:
        print(f"\nerror: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
