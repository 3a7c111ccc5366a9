"""``reconciler watch`` on a real database: file changes applied, a bad edit survived, drift reported (and reverted
only where auto-apply allows), several watchers applying once, SIGTERM exiting 0, /metrics and /healthz served.
Every wait is on a condition with a deadline; nothing asserts on elapsed time."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.apply import ApplyOptions
from reconciler.config import load_config
from reconciler.servers import connect
from reconciler.watch import Report, Watcher, WatchOptions, parse_listen
from tests.conftest import fetch_one, run_sql
from tests.repo import Repo

DEADLINE = 180.0


class Running:
    """A watcher looping in a thread, with waits that fail when it dies or the deadline passes."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.watcher.run()
        except BaseException as exc:
            self.errors.append(exc)

    def wait(self, condition: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not condition():
            assert self.thread.is_alive(), f"the watcher stopped while waiting for {what}: {self.errors}"
            assert time.monotonic() < deadline, f"gave up waiting for {what}; reports: {self.watcher.reports}"
            time.sleep(0.1)

    def reported(self, result: str, trigger: str | None = None, after: int = 0) -> Report | None:
        found = [r for r in list(self.watcher.reports)[after:]
                 if r.result == result and (trigger is None or r.trigger == trigger)]
        return found[-1] if found else None

    def get(self, path: str) -> tuple[int, str]:
        assert self.watcher.address is not None
        host, port = self.watcher.address
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@contextlib.contextmanager
def watching(repo: Repo, *, interval: float = 300.0) -> Iterator[Running]:
    config = load_config(repo.config)
    env = config.environment("test")
    options = WatchOptions(plans_dir=repo.root / "plans", interval_seconds=interval, port=0, debounce_ms=200)
    apply_options = ApplyOptions(environment=env.name, metadata_schema=config.metadata_schema,
                                 lock_wait_seconds=env.lock_wait_seconds)
    running = Running(Watcher(config, env, options, apply_options))
    running.thread.start()
    try:
        yield running
    finally:
        running.watcher.stop()
        running.thread.join(120)
    assert not running.thread.is_alive(), "the watcher did not stop"
    assert not running.errors, running.errors


def has_column(dsn: str, table: str, column: str) -> bool:
    return fetch_one(dsn, f"SELECT count(*) FROM information_schema.columns WHERE table_name = '{table}' "
                          f"AND column_name = '{column}'") == 1


def runs(dsn: str, status: str) -> object:
    return fetch_one(dsn, f"SELECT count(*) FROM reconciler.runs WHERE status = '{status}'")


def test_file_change_is_applied_and_metrics_say_so(repo: Repo) -> None:
    with watching(repo) as w:
        w.wait(lambda: w.reported("applied", "start"), "the first plan applied")
        assert fetch_one(repo.database, "SELECT to_regclass('public.orders') IS NOT NULL") is True

        repo.write({"40_extra.sql": "ALTER TABLE customers ADD COLUMN nickname text;\n"})
        w.wait(lambda: has_column(repo.database, "customers", "nickname"), "the new column")
        w.wait(lambda: w.reported("applied", "change"), "the change reported as applied")
        assert runs(repo.database, "applied") == 2

        status, health = w.get("/healthz")
        assert status == 200 and health.startswith("ok")
        status, metrics = w.get("/metrics")
        assert status == 200
        for series in ('reconciler_applies_total{result="applied"} 2.0',
                       'reconciler_plans_total{result="auto_apply"} 2.0',
                       'reconciler_plans_total{result="error"} 0.0',
                       'reconciler_applies_total{result="locked"} 0.0',
                       "reconciler_last_run_success 1.0",
                       "reconciler_drift_detected 0.0",
                       'reconciler_stage_duration_seconds_count{stage="plan"} 2.0',
                       'reconciler_stage_duration_seconds_count{stage="apply"} 2.0',
                       'reconciler_step_duration_seconds_count{kind="add_column"} 1.0'):
            assert series in metrics, series
        stamp = re.search(r"^reconciler_last_run_timestamp_seconds (\S+)$", metrics, re.MULTILINE)
        assert stamp and float(stamp.group(1)) > 1.7e9
        assert re.search(r'^reconciler_step_duration_seconds_bucket\{kind="create_table",le="\+Inf"\} 2\.0$', metrics,
                         re.MULTILINE)
        assert w.get("/nothing")[0] == 404


def test_a_file_saved_while_the_first_plan_runs_is_planned_next(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file watcher starts after the first plan: what was saved meanwhile is found by comparing the files."""
    cycle = Watcher._cycle

    def saving_during_start(self: Watcher, servers: object, trigger: str, changed: str = "") -> None:
        cycle(self, servers, trigger, changed)  # type: ignore[arg-type]
        if trigger == "start":
            repo.write({"40_extra.sql": "ALTER TABLE customers ADD COLUMN nickname text;\n"})

    monkeypatch.setattr(Watcher, "_cycle", saving_during_start)
    with watching(repo) as w:
        w.wait(lambda: w.reported("applied", "change"), "the file saved during the first plan applied")
        assert has_column(repo.database, "customers", "nickname") and runs(repo.database, "applied") == 2


def test_syntax_error_is_reported_and_the_loop_goes_on(repo: Repo) -> None:
    with watching(repo) as w:
        w.wait(lambda: w.reported("applied", "start"), "the first plan applied")
        seen = len(w.watcher.reports)
        repo.write({"50_bad.sql": "CREATE TABLE fine (id int);\nCREATE TABLEE broken (id int);\n"})
        w.wait(lambda: w.reported("error", "change", after=seen), "the syntax error reported")
        error = w.reported("error", "change", after=seen)
        assert error is not None and "50_bad.sql:2" in error.message and "syntax error" in error.message
        assert fetch_one(repo.database, "SELECT to_regclass('public.fine') IS NULL") is True

        repo.write({"50_bad.sql": "CREATE TABLE fine (id int);\nCREATE TABLE fixed (id int PRIMARY KEY);\n"})
        w.wait(lambda: fetch_one(repo.database, "SELECT to_regclass('public.fixed') IS NOT NULL"), "the fix applied")
        assert fetch_one(repo.database, "SELECT to_regclass('public.fine') IS NOT NULL") is True
        assert 'reconciler_plans_total{result="error"} 1.0' in w.watcher.metrics.text().decode()


def test_metrics_show_a_dead_run_as_interrupted(repo: Repo) -> None:
    """A run left `running` by an applier that died is what watch's metrics show as the target's last run: interrupted
    (the watcher's first look records it so)."""
    assert repo.run("apply", "--auto") == 0
    with connect(repo.database) as conn:
        conn.execute("INSERT INTO reconciler.runs (id, plan_id, environment, status, actor, client_host, tool_version, "
                     "backend_pid, backend_start, from_fingerprint, to_fingerprint) VALUES (gen_random_uuid(), %s, 'test', "
                     "'running', 'a', 'h', '0', pg_backend_pid(), now(), 'a', 'b')", ("sha256:" + "0" * 64,))
    with watching(repo) as w:
        w.wait(lambda: w.reported("no_changes", "start"), "the first plan")
    metrics = w.watcher.metrics.text().decode()  # the watcher has stopped: its first cycle is complete
    assert 'reconciler_target_last_run{status="interrupted"} 1.0' in metrics
    assert 'reconciler_target_last_run{status="running"} 0.0' in metrics
    assert "reconciler_target_cleanup_pending 0.0" in metrics
    assert runs(repo.database, "interrupted") == 1


def test_drift_is_reported_and_not_reverted_without_auto_apply(repo: Repo) -> None:
    assert repo.run("apply", "--auto") == 0
    repo.config.write_text(repo.config.read_text().replace("auto_apply: true", "auto_apply: false"))
    with watching(repo, interval=1) as w:
        w.wait(lambda: w.reported("no_changes", "start"), "the first plan")
        run_sql(repo.database, "ALTER TABLE customers ADD COLUMN nickname text")
        w.wait(lambda: w.reported("drift", "drift"), "drift reported")
        report = w.reported("drift", "drift")
        assert report is not None and "public.customers" in report.message and "not reverted" in report.message
        assert "reconciler_drift_detected 1.0" in w.watcher.metrics.text().decode()
    assert has_column(repo.database, "customers", "nickname")
    assert runs(repo.database, "applied") == 1


def test_drift_is_reverted_where_auto_apply_allows(repo: Repo) -> None:
    assert repo.run("apply", "--auto") == 0
    with watching(repo, interval=1) as w:
        w.wait(lambda: w.reported("no_changes", "start"), "the first plan")
        run_sql(repo.database, "ALTER TABLE customers ADD COLUMN nickname text")
        w.wait(lambda: not has_column(repo.database, "customers", "nickname"), "the drift reverted")
        w.wait(lambda: w.reported("applied", "drift"), "the revert reported")
        assert w.reported("drift", "drift") is not None


def test_a_plan_that_may_not_apply_alone_is_written(repo: Repo) -> None:
    repo.config.write_text(repo.config.read_text().replace("auto_apply: true", "auto_apply: false"))
    with watching(repo) as w:
        w.wait(lambda: w.reported("written", "start"), "the plan written")
        report = w.reported("written", "start")
        assert report is not None and report.plan_path is not None and report.plan_path.is_file()
        assert "auto_apply: false" in report.message
    assert fetch_one(repo.database, "SELECT to_regclass('public.orders') IS NULL") is True
    assert repo.run("apply", str(report.plan_path)) == 0


def test_several_watchers_on_one_database_apply_once(repo: Repo) -> None:
    with watching(repo) as first, watching(repo) as second:
        first.wait(lambda: first.watcher.cycles >= 1 and second.watcher.cycles >= 1, "both first plans")
        second.wait(lambda: fetch_one(repo.database, "SELECT to_regclass('public.orders') IS NOT NULL"), "the schema")
        repo.write({"40_extra.sql": "ALTER TABLE customers ADD COLUMN nickname text;\n"})
        first.wait(lambda: first.watcher.cycles >= 2 and second.watcher.cycles >= 2, "both plans of the change")
        first.wait(lambda: has_column(repo.database, "customers", "nickname"), "the change applied")
    results = [r.result for w in (first, second) for r in w.watcher.reports]
    assert runs(repo.database, "applied") == results.count("applied") == 2
    assert runs(repo.database, "failed") == 0 and "failed" not in results
    for w in (first, second):  # a plan that raced the other watcher's apply may fail, and is then planned again
        assert w.watcher.reports[-1].result not in ("error", "failed"), w.watcher.reports
    with connect(repo.database) as conn:
        spans = conn.execute("SELECT started_at, finished_at FROM reconciler.runs ORDER BY started_at").fetchall()
    assert spans[0][1] <= spans[1][0]  # one after the other, never at once


def start_watch(repo: Repo) -> tuple[subprocess.Popen[str], list[str]]:
    """`reconciler watch` in a process of its own; its stderr lines are collected as they come."""
    exe = Path(sys.executable).with_name("reconciler")
    proc = subprocess.Popen([str(exe), "--config", str(repo.config), "watch", "--env", "test", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        lines.extend(iter(proc.stderr.readline, ""))

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def wait_process(proc: subprocess.Popen[str], lines: list[str], condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert proc.poll() is None, f"reconciler watch exited ({proc.returncode}) before {what}: {''.join(lines)}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}: {''.join(lines)}"
        time.sleep(0.1)


def test_sigterm_stops_an_idle_watcher_with_exit_0(repo: Repo) -> None:
    proc, lines = start_watch(repo)
    try:
        wait_process(proc, lines, lambda: any("applied plan" in line for line in lines), "the first apply")
        served = next(re.search(r"http://127\.0\.0\.1:(\d+)", line) for line in lines if "/metrics" in line)
        assert served is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{served.group(1)}/healthz", timeout=30) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines)
    assert any("stopped watching" in line for line in lines)


def test_sigterm_cancels_an_apply_under_way_and_exits_0(repo: Repo) -> None:
    assert repo.run("apply", "--auto") == 0
    repo.write({"40_extra.sql": "ALTER TABLE customers ADD COLUMN nickname text;\n"})
    blocker = connect(repo.database, autocommit=False)
    blocker.execute("LOCK TABLE customers IN SHARE MODE")  # the watcher's ALTER TABLE waits on it
    proc, lines = start_watch(repo)
    try:
        wait_process(proc, lines, lambda: runs(repo.database, "running") == 1, "the apply under way")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        blocker.rollback()
        blocker.close()
    assert proc.returncode == 0, "".join(lines)
    assert runs(repo.database, "cancelled") == 1 and runs(repo.database, "running") == 0, "".join(lines)
    assert not has_column(repo.database, "customers", "nickname")


def test_a_watcher_waits_for_an_apply_under_way_before_planning(repo: Repo) -> None:
    """A plan made beside a running apply would see its work part-way, and its copy of live for the rehearsal would
    hold every table's lock while pg_dump reads: the apply's cut-overs would wait behind it. The watcher waits."""
    assert repo.run("apply", "--auto") == 0
    repo.write({"40_extra.sql": "ALTER TABLE customers ADD COLUMN nickname text;\n"})
    blocker = connect(repo.database, autocommit=False)
    blocker.execute("LOCK TABLE customers IN SHARE MODE")  # the apply's ALTER TABLE waits on it
    exe = Path(sys.executable).with_name("reconciler")
    applier = subprocess.Popen([str(exe), "--config", str(repo.config), "apply", "--auto", "--env", "test"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + DEADLINE
        while runs(repo.database, "running") != 1:
            assert applier.poll() is None and time.monotonic() < deadline, applier.communicate()
            time.sleep(0.1)
        with watching(repo) as w:
            w.wait(lambda: w.reported("waiting", "start"), "the watcher waiting")
            report = w.reported("waiting", "start")
            assert report is not None and "is applying plan" in report.message, report
            assert [r.result for r in w.watcher.reports] == ["waiting"], w.watcher.reports  # no plan made meanwhile
            assert w.watcher.cycles == 0
            blocker.rollback()
            out, err = applier.communicate(timeout=120)
            assert applier.returncode == 0, out + err
            w.wait(lambda: w.reported("no_changes", "start"), "the plan made once the apply had ended")
            assert [r.result for r in w.watcher.reports] == ["waiting", "no_changes"], w.watcher.reports
    finally:
        blocker.close()
        applier.kill()
    assert runs(repo.database, "applied") == 2 and has_column(repo.database, "customers", "nickname")


@pytest.mark.parametrize(("text", "expected"), [("127.0.0.1:9187", ("127.0.0.1", 9187)), (":0", ("127.0.0.1", 0)),
                                                 ("9100", ("127.0.0.1", 9100)), ("[::1]:9187", ("::1", 9187)),
                                                 ("0.0.0.0:80", ("0.0.0.0", 80))])
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


def test_listen_address_refused() -> None:
    with pytest.raises(Exception, match="HOST:PORT"):
        parse_listen("localhost:http")
