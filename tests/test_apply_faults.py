"""Apply off the happy path, through the real command line: a run judged by its session and lock (never by a name),
crashes and cancels that leave nothing behind, progress recorded with its transaction, a refused target left
untouched, a cancel that hits only its run. Every test here failed on the tool before these were fixed."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from reconciler import dsn as dsnlib
from reconciler.plan import Plan
from reconciler.servers import Server, connect, throwaway_database
from tests.conftest import fetch_one, run_sql
from tests.target import DESIRED, Target

WITH_INDEX = DESIRED  # one concurrent index build on items
INVALID = "SELECT count(*) FROM pg_index WHERE NOT indisvalid"
LOCK_KEY = 0x7265636F6E63_00  # the apply lock (reconciler.runlock), as any session can take it
BUILDING = "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%'"


def _old_snapshot(target: Target) -> psycopg.Connection[object]:
    """A transaction holding an old snapshot: CREATE INDEX CONCURRENTLY waits for it, so the build is caught mid-way."""
    holder = connect(target.database, autocommit=False)
    holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    holder.execute("SELECT count(*) FROM parents")
    return holder


def _release(conn: psycopg.Connection[object]) -> None:
    conn.rollback()
    conn.close()


@contextlib.contextmanager
def _mid_build(target: Target, plan: Path) -> Iterator[subprocess.Popen[str]]:
    """An apply of ``plan`` caught in its concurrent index build (an old snapshot holds the build), let go after."""
    holder = _old_snapshot(target)
    proc = target.start_apply(plan)
    try:
        target.wait_for(BUILDING)
        yield proc
    finally:
        _release(holder)


def _no_applier(target: Target) -> None:
    """Wait until the killed applier's sessions are gone (the server notices the closed socket)."""
    target.wait_for("SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('reconciler apply', "
                    "'reconciler control', 'myapp') AND pid <> pg_backend_pid()", 0, seconds=30)


def _named(target: Target, application_name: str) -> None:
    """The environment's DSN carries its own application_name, as a user's may."""
    config = target.root / "reconciler.yaml"
    named = psycopg.conninfo.make_conninfo(target.database, application_name=application_name)
    config.write_text(config.read_text().replace(f'database: "{target.database}"', f'database: "{named}"'))


def test_a_running_apply_whose_dsn_names_its_session_is_not_declared_dead(target: Target) -> None:
    """Liveness is the lock held by the recorded session: a plan and a history meanwhile leave the run (and the
    index it builds) alone, whatever application_name the DSN gives its sessions."""
    _named(target, "myapp")
    target.desired(WITH_INDEX)
    plan = target.plan()
    with _mid_build(target, plan) as proc:
        looked = target.run("plan")  # another command looks at the target meanwhile
        assert "is applying plan" in looked.stderr and "this plan sees it part-way" in looked.stderr, looked.stderr
        # ... and makes no copy of it for the rehearsal: pg_dump would lock every table the apply may need
        assert looked.returncode == 1 and "an apply is under way" in looked.stderr, looked.stderr
        assert fetch_one(target.database, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_dump'") == 0
        (run,) = target.runs()
        assert run["status"] == "running" and run["recorded_status"] == "running", run
        assert fetch_one(target.database, BUILDING) is True  # its build goes on
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [r["status"] for r in target.runs()] == ["applied"]
    assert fetch_one(target.database, INVALID) == 0


def test_history_shows_a_crashed_run_as_interrupted_and_removes_its_invalid_index(target: Target) -> None:
    target.desired(WITH_INDEX)
    plan = target.plan()
    with _mid_build(target, plan) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        target.wait_for(BUILDING, False)  # the server stopped the build for the dead client
    _no_applier(target)
    assert fetch_one(target.database, INVALID) == 1  # what the crash left
    (run,) = target.runs()  # `history` is the first command to look
    assert run["status"] == "interrupted" and run["recorded_status"] == "interrupted"
    assert "completed step(s)" in str(run["error"]) and "dropped the INVALID index public.items_note_idx" in str(run["error"])
    assert [e["status"] for e in run["cleanup"]] == ["done"]  # type: ignore[union-attr]
    assert fetch_one(target.database, INVALID) == 0
    assert target.lock_is_free()


@pytest.mark.parametrize("how", ["sigint", "command", "terminate"])
def test_a_build_stopped_mid_way_leaves_no_invalid_index(target: Target, how: str) -> None:
    """Ctrl-C, `reconciler cancel`, or the applier's backend terminated by an operator: the run removes the half-built
    index before it reports (after a terminate it takes a new session and the lock again to do so)."""
    target.desired(WITH_INDEX)
    plan = target.plan()
    with _mid_build(target, plan) as proc:
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
        elif how == "command":
            cancelled = target.run("cancel")
            assert "cancelled its running statement" in cancelled.stdout and "ended cancelled" in cancelled.stdout, \
                cancelled.stdout + cancelled.stderr
        else:
            run_sql(target.database, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE query LIKE 'CREATE INDEX CONCURRENTLY%'")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if how == "sigint" else 1), err
    (run,) = target.runs()
    assert run["status"] == ("failed" if how == "terminate" else "cancelled"), run
    assert fetch_one(target.database, INVALID) == 0, run
    assert target.lock_is_free()
    fresh = target.plan("fresh.json")
    assert target.run("apply", str(fresh)).returncode == 0
    assert target.run("drift").returncode == 0


def test_a_phase_is_recorded_with_its_transaction(target: Target) -> None:
    """The main transaction commits, then its record cannot be written to the run's row (a test session holds the
    row), and the applier is killed: the steps that committed are the steps the history lists, exactly."""
    target.desired(DESIRED.replace("CREATE INDEX items_note_idx ON items (note);", ""))
    plan = target.plan()
    blocker = connect(target.database, autocommit=False)
    blocker.execute("LOCK TABLE items IN SHARE MODE")  # the main phase waits here
    proc = target.start_apply(plan)
    row_holder = connect(target.database, autocommit=False)
    try:
        target.wait_for("SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = 'reconciler apply' "
                        "AND wait_event_type = 'Lock'")
        row_holder.execute("SELECT 1 FROM reconciler.runs WHERE status = 'running' FOR NO KEY UPDATE")
        blocker.rollback()
        target.wait_for("SELECT count(*) FROM information_schema.columns WHERE column_name = 'extra'", 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        row_holder.rollback()
        row_holder.close()
        blocker.close()
    _no_applier(target)
    (run,) = target.runs()
    steps = {int(s["index"]): s["kind"] for s in plan_steps(plan)}
    completed = [int(s["index"]) for s in run["statements"] if s["status"] == "applied"]  # type: ignore[union-attr]
    assert run["status"] == "interrupted"
    assert "add_column" in [steps[i] for i in completed], (completed, run["error"])


def plan_steps(plan: Path) -> list[dict[str, object]]:
    import json

    return list(json.loads(plan.read_text())["body"]["steps"])


def test_freshness_is_checked_again_right_before_the_first_step(target: Target) -> None:
    """The schema changes while the backup runs (pg_dump waits behind the change): the plan is refused then, under
    the lock, before any step, and nothing is changed."""
    run_sql(target.database, "CREATE TABLE notes (body text)")  # no index: reading the schema takes no lock on it
    target.desired(WITH_INDEX + "CREATE TABLE notes (body text);\n")
    plan = target.plan()
    sneaky = connect(target.database, autocommit=False)
    sneaky.execute("ALTER TABLE notes ADD COLUMN sneaky int")  # uncommitted: the apply's first checks pass
    proc = target.start_apply(plan)
    try:
        target.wait_for("SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = 'pg_dump' "
                        "AND wait_event_type = 'Lock'")
        sneaky.commit()
    finally:
        sneaky.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "stale" in err and "column public.notes.sneaky" in err, err
    assert fetch_one(target.database, "SELECT to_regclass('public.items_note_idx')") is None
    (run,) = target.runs()
    assert run["status"] == "failed" and not [s for s in run["statements"] if s["status"] == "applied"]  # type: ignore[union-attr]


def test_a_refused_target_is_not_written_to(target: Target, pg_server: Server) -> None:
    target.desired(WITH_INDEX)
    plan = target.plan()
    with throwaway_database(pg_server, "wrong") as wrong:
        result = target.run("apply", str(plan), "--database", wrong)
        assert result.returncode == 3 and "refused (target)" in result.stderr, result.stderr
        assert fetch_one(wrong, "SELECT count(*) FROM pg_namespace WHERE nspname = 'reconciler'") == 0


@pytest.mark.skipif(bool(os.environ.get("RECONCILER_TEST_DSN")), reason="needs a server that trusts a new login role")
def test_an_applying_role_without_create_on_the_database(target: Target) -> None:
    """Once the metadata schema exists, applying needs no CREATE on the database; before, the refusal names it."""
    role = f"app_{secrets.token_hex(4)}"
    dbname = dsnlib.database_name(target.database)
    run_sql(target.database, f'CREATE ROLE {role} LOGIN; GRANT USAGE, CREATE ON SCHEMA public TO {role}; '
                             f'ALTER TABLE items OWNER TO {role}; ALTER TABLE parents OWNER TO {role}; '
                             f'REVOKE CREATE ON DATABASE "{dbname}" FROM PUBLIC')
    app = psycopg.conninfo.make_conninfo(target.database, user=role)
    try:
        target.desired(WITH_INDEX)
        plan = target.plan()
        first = target.run("apply", str(plan), "--database", app)
        assert first.returncode == 3, first.stderr
        assert f"may not create the metadata schema 'reconciler': it needs CREATE on database {dbname!r}" in first.stderr
        assert fetch_one(target.database, "SELECT count(*) FROM pg_namespace WHERE nspname = 'reconciler'") == 0
        config = target.root / "reconciler.yaml"
        config.write_text(config.read_text().replace("lock_wait: 30s", "lock_wait: 30s\n    backup: none"))
        target.desired(DESIRED.replace("CREATE INDEX items_note_idx ON items (note);", ""))
        assert target.run("apply", str(target.plan("other.json"))).returncode == 0  # the owner makes the schema
        run_sql(target.database, f"GRANT USAGE ON SCHEMA reconciler TO {role}; "
                                 f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA reconciler TO {role}")
        target.desired(WITH_INDEX)
        again = target.run("apply", str(target.plan("again.json")), "--database", app)
        assert again.returncode == 0, again.stderr
    finally:
        run_sql(target.database, f"REASSIGN OWNED BY {role} TO CURRENT_USER; DROP OWNED BY {role}; DROP ROLE {role}")


def test_cancel_reaches_only_the_session_the_run_recorded(target: Target) -> None:
    """A running row whose pid now belongs to another session (which even holds the apply lock, as a later apply
    would): `cancel` sends nothing to it, and the row, whose session is gone, is settled as interrupted."""
    target.desired(WITH_INDEX)
    assert target.run("apply", str(target.plan())).returncode == 0  # the metadata schema exists
    other = connect(target.database)
    other.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    pid = other.info.backend_pid
    run_sql(target.database, f"INSERT INTO reconciler.runs (id, plan_id, environment, status, actor, client_host, "
                             f"tool_version, backend_pid, backend_start, from_fingerprint, to_fingerprint) VALUES "
                             f"(gen_random_uuid(), 'sha256:{'0' * 64}', 'test', 'running', 'a', 'h', '0', {pid}, "
                             f"'2001-01-01', 'a', 'b')")
    outcome: list[BaseException | None] = []

    def sleep() -> None:
        try:
            other.execute("SELECT pg_sleep(8)")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    try:
        target.wait_for(f"SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = {pid}")
        result = target.run("cancel")
    finally:
        sleeper.join(30)
        other.close()
    assert result.returncode == 0 and "No apply is running" in result.stdout, result.stdout + result.stderr
    assert outcome == [None]  # its statement ran to the end
    assert [r["status"] for r in target.runs()] == ["interrupted", "applied"]


def test_backups_are_private_and_announced(target: Target) -> None:
    target.desired(WITH_INDEX)
    result = target.run("apply", str(target.plan()))
    assert result.returncode == 0, result.stderr
    (run,) = target.runs()
    path = Path(str(run["backup_path"]))
    assert f"Backup written to {path} (" in result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not list(path.parent.glob("*.partial"))


def test_apply_refuses_fleet_flags_for_a_single_database(target: Target) -> None:
    target.desired(WITH_INDEX)
    plan = target.plan()
    for flag, value in (("--shard", "0/2"), ("--concurrency", "2")):
        result = target.run("apply", str(plan), flag, value)
        assert result.returncode == 1 and f"{flag} is for fleets" in result.stderr, result.stderr
    assert target.runs() == []


def test_debug_prints_the_traceback_of_an_expected_error(target: Target) -> None:
    result = subprocess.run(target.args("--debug", "apply", str(target.root / "missing.json"), "--env", "test"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr, result.stderr


def test_names_holding_a_dot_are_never_split(target: Target) -> None:
    """An index named "items.note" on a table "my.items": the build is killed, and the INVALID index removed is that
    one, found by its name's parts."""
    run_sql(target.database, 'CREATE TABLE "my.items" (id int PRIMARY KEY, note text); '
                             'INSERT INTO "my.items" SELECT g, \'n\' FROM generate_series(1, 100) g')
    target.desired(DESIRED.replace("CREATE INDEX items_note_idx ON items (note);", "")
                   + 'CREATE TABLE "my.items" (id int PRIMARY KEY, note text);\n'
                   + 'CREATE INDEX "items.note" ON "my.items" (note);\n')
    plan = target.plan()
    steps = plan_steps(plan)
    build = next(s for s in steps if s["kind"] == "create_index_concurrently")
    assert build["identity"] == ["public", "items.note"]
    with _mid_build(target, plan) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        target.wait_for(BUILDING, False)
    _no_applier(target)
    assert fetch_one(target.database, INVALID) == 1
    (run,) = target.runs()
    assert 'dropped the INVALID index public.items.note' in str(run["error"]), run["error"]
    assert fetch_one(target.database, INVALID) == 0
    assert fetch_one(target.database, "SELECT to_regclass('public.\"my.items\"') IS NOT NULL") is True


def test_a_cancel_that_lands_after_the_last_step_still_ends_the_run_cancelled(target: Target) -> None:
    """The last step is done and the check after it reads the catalog (held up here by a lock on items) when
    `cancel` arrives: the run ends cancelled, committed steps undone by their rollback SQL, never failed or applied."""
    from reconciler.apply import ApplyOptions, apply_plan
    from reconciler.errors import ApplyError
    from reconciler.planfile import read_plan

    target.desired(WITH_INDEX)
    plan = read_plan(target.plan())
    last = plan.body.steps[-1].index
    locker = connect(target.database, autocommit=False)

    def lock_once_done() -> None:
        target.wait_for(f"SELECT count(*) >= {len(plan.body.steps)} FROM reconciler.run_progress")
        locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")

    threads: list[threading.Thread] = []

    def on_step(step: object) -> None:
        if getattr(step, "index", None) == last:
            threads.append(threading.Thread(target=lock_once_done, daemon=True))
            threads[-1].start()

    outcome: list[BaseException] = []

    def apply() -> None:
        try:
            apply_plan(plan, target.database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                           verify_before_commit=False, on_step=on_step))
        except BaseException as exc:
            outcome.append(exc)

    applying = threading.Thread(target=apply)
    applying.start()
    try:
        target.wait_for("SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = 'reconciler apply' "
                        "AND wait_event_type = 'Lock'")
        cancelled = target.run("cancel", "--wait", "0")
        assert "Asked run" in cancelled.stdout, cancelled.stdout + cancelled.stderr
    finally:
        locker.rollback()  # undoing needs items too
        locker.close()
    applying.join(120)
    assert outcome and isinstance(outcome[0], ApplyError) and "was cancelled" in str(outcome[0]), outcome
    (run,) = target.runs()
    assert run["status"] == "cancelled", run
    assert "undone by their rollback SQL" in str(run["error"])
    assert fetch_one(target.database, "SELECT to_regclass('public.items_note_idx')") is None


def test_a_signal_while_the_result_is_verified_ends_the_run_cancelled(target: Target,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGTERM to the applying process lands after the last step, between the verification's statements
    (nothing of the run's is under way at the server to cancel): the run still stops there, cancelled, its
    committed steps undone, never recorded applied (found by the fault campaign)."""
    from reconciler.apply import ApplyOptions, apply_plan, executor
    from reconciler.planfile import read_plan

    target.desired(WITH_INDEX)
    plan = read_plan(target.plan())
    real_verify = executor.verify

    def verify_then_signalled(*args: object, **kwargs: object) -> object:
        found = real_verify(*args, **kwargs)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGTERM)
        return found

    monkeypatch.setattr(executor, "verify", verify_then_signalled)
    with pytest.raises(KeyboardInterrupt):  # as a signalled command ends (exit 130), once the run is recorded
        apply_plan(plan, target.database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                       verify_before_commit=False))
    (run,) = target.runs()
    assert run["status"] == "cancelled", run
    assert fetch_one(target.database, "SELECT to_regclass('public.items_note_idx')") is None


CRAWL = ("WITH (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_cost_delay = "
         "100, autovacuum_vacuum_cost_limit = 1, autovacuum_analyze_threshold = 1000000000)")  # a vacuum that crawls


@contextlib.contextmanager
def _vacuumed(tmp_path: Path, pg_server: Server, live: str, desired: str, *,
              one_worker: bool = False) -> Iterator[tuple[str, Plan]]:
    """A cluster of its own whose autovacuum looks every second (``one_worker``: and has one worker), its database
    ``app`` holding ``live``, and a plan to ``desired`` made with a 300 ms lock_timeout."""
    from reconciler.config import load_config
    from reconciler.pipeline import make_plan, open_servers
    from reconciler.servers import EmbeddedCluster

    bindir = Path(os.environ["RECONCILER_TEST_PG_BINDIR"]) if os.environ.get("RECONCILER_TEST_PG_BINDIR") else None
    cluster = EmbeddedCluster(tmp_path / "vacuumed", bindir, in_memory=True)
    try:
        server = cluster.start()
        run_sql(server.dsn, "ALTER SYSTEM SET autovacuum_naptime = '1s'")
        if one_worker:
            run_sql(server.dsn, "ALTER SYSTEM SET autovacuum_max_workers = 1")
            cluster.stop()
            server = cluster.start()
        run_sql(server.dsn, "SELECT pg_reload_conf()")
        run_sql(server.dsn, "CREATE DATABASE app")
        app = server.database_dsn("app")
        run_sql(app, live)
        (tmp_path / "schemas").mkdir()
        (tmp_path / "schemas" / "t.sql").write_text(desired)
        # the shadow is the session's test server, another cluster than this target: no template kept there
        (tmp_path / "reconciler.yaml").write_text(
            f'shadow_cache: 0\nenvironments:\n  test:\n    database: "{app}"\n    shadow: "{pg_server.dsn}"\n'
            "    require_signed_plans: false\n    lock_timeout: 300ms\n")
        config = load_config(tmp_path / "reconciler.yaml")
        env = config.environment("test")
        with open_servers(config, env) as servers:
            yield app, make_plan(config, env, servers).plan
    finally:
        cluster.stop(delete=True)


def _wait_for_autovacuum(app: str, table: str) -> None:
    deadline = time.monotonic() + 60
    while fetch_one(app, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' "
                         f"AND query LIKE 'autovacuum: VACUUM public.{table}%'") != 1:
        assert time.monotonic() < deadline, fetch_one(app, "SELECT string_agg(query, '; ') FROM pg_stat_activity "
                                                           "WHERE backend_type = 'autovacuum worker'")
        time.sleep(0.1)


def test_a_step_waiting_behind_an_autovacuum_cancels_it_as_postgresql_would(tmp_path: Path, pg_server: Server,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A real autovacuum worker, slowed to a crawl, holds the table: the step's lock_timeout (300 ms, no retry) is
    under deadlock_timeout, after which PostgreSQL would cancel the vacuum for the waiter itself. The apply cancels
    it at once and the step goes through; without that it gives up on its lock."""
    from reconciler.apply import ApplyOptions, apply_plan

    table = f"CREATE TABLE t (id int PRIMARY KEY, v text) {CRAWL};\n"
    with _vacuumed(tmp_path, pg_server, table + "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 20000) g;",
                   table.replace("v text)", "v text, w text)")) as (app, plan):
        assert [s.kind for s in plan.body.steps] == ["add_column"], [s.sql for s in plan.body.steps]
        run_sql(app, "DELETE FROM t WHERE id % 2 = 0")  # dead rows: the launcher sends a worker within a second
        _wait_for_autovacuum(app, "t")
        with caplog.at_level("WARNING", logger="reconciler.apply.monitor"):
            result = apply_plan(plan, app, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                        lock_retries=0))
        assert result.status == "applied"
        assert any(r.getMessage().startswith("cancelled autovacuum: VACUUM public.t") for r in caplog.records), \
            caplog.text
        assert fetch_one(app, "SELECT count(*) FROM information_schema.columns WHERE table_name = 't' "
                              "AND column_name = 'w'") == 1


def test_an_autovacuum_worker_is_cancelled_again_on_the_next_table_it_holds_up(tmp_path: Path, pg_server: Server,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """An autovacuum worker cancelled on one table goes on, under the same pid, to the next table of its list: when a
    later step of the same run waits behind it there, it is cancelled again (a bench run stalled writers 1,055 ms
    when it was not, PostgreSQL cancelling it only after deadlock_timeout). One worker (autovacuum_max_workers = 1)
    crawls through a then b; the run's concurrent index build waits for it on a, its main transaction later on b."""
    from reconciler.apply import ApplyOptions, apply_plan

    live = f"CREATE TABLE a (id int PRIMARY KEY, v text) {CRAWL};\nCREATE TABLE b (id int PRIMARY KEY, v text) {CRAWL};\n"
    desired = live.replace("b (id int PRIMARY KEY, v text)", "b (id int PRIMARY KEY, v text, w text)") \
        + "CREATE INDEX a_v_idx ON a (v);\n"
    rows = "INSERT INTO a SELECT g, 'v' FROM generate_series(1, 20000) g; INSERT INTO b SELECT * FROM a;"
    with _vacuumed(tmp_path, pg_server, live + rows, desired, one_worker=True) as (app, plan):
        assert [(s.kind, s.tables) for s in plan.body.steps] == [
            ("create_index_concurrently", ("public.a",)), ("add_column", ("public.b",))], plan.body.steps
        run_sql(app, "DELETE FROM a WHERE id % 2 = 0; DELETE FROM b WHERE id % 2 = 0")  # one worker's list: a, b
        _wait_for_autovacuum(app, "a")
        with caplog.at_level("WARNING", logger="reconciler.apply.monitor"):
            result = apply_plan(plan, app, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                        lock_retries=0, index_build_retries=0))
        assert result.status == "applied"
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cancelled autovacuum")]
        assert [re.sub(r"\(pid [0-9]+\)", "(pid N)", m).split(":")[1] for m in said] == [
            " VACUUM public.a (pid N)", " VACUUM public.b (pid N)"], caplog.text
        assert len({re.findall(r"\(pid ([0-9]+)\)", m)[0] for m in said}) == 1, said  # one worker, cancelled twice
        assert fetch_one(app, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'a_v_idx'::regclass") is True
