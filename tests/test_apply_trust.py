"""Apply under fire: kill -9 at several points, cancellation, two appliers, backups and restores,
undoing committed steps when a later phase fails."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from pathlib import Path

import psycopg
import pytest

from reconciler import dsn as dsnlib
from reconciler.servers import Server, connect, throwaway_database
from tests.conftest import fetch_one, run_sql
from tests.target import DESIRED, LIVE, Target


def _kill_when_waiting(target: Target, proc: subprocess.Popen[str], wait_query: str, *, until_gone: bool = False) -> None:
    """kill -9 the applying process once it waits; optionally until the server has noticed and ended its session
    (the executor sets client_connection_check_interval, so a waiting statement is stopped, not finished)."""
    target.wait_for(wait_query)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    if until_gone:
        target.wait_for("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'reconciler apply'", 0, seconds=20)


def test_kill_9_during_a_transactional_group(target: Target) -> None:
    target.desired(DESIRED.replace("CREATE INDEX items_note_idx ON items (note);", ""))
    plan = target.plan()
    before = target.fingerprint()
    blocker = connect(target.database, autocommit=False)
    blocker.execute("LOCK TABLE items IN SHARE MODE")  # the main phase's ALTER TABLE waits on it
    proc = target.start_apply(plan)
    try:
        _kill_when_waiting(target, proc, "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = "
                                         "'reconciler apply' AND wait_event_type = 'Lock'")
    finally:
        blocker.rollback()
        blocker.close()
    target.wait_for("SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('reconciler apply', 'reconciler control')", 0)
    assert target.fingerprint() == before  # the open transaction died with the process
    assert target.lock_is_free()
    again = target.run("apply", str(plan))
    assert again.returncode == 3 and "was interrupted" in again.stderr and "completed step(s): none" in again.stderr
    assert "plan again from the database as it is now" in again.stderr
    (run,) = target.runs()
    assert run["status"] == "interrupted" and "backend" in str(run["error"])
    fresh = target.plan("fresh.json")  # re-planned from the real state, it applies
    assert target.run("apply", str(fresh)).returncode == 0


def test_kill_9_during_a_concurrent_index_build_leaves_no_invalid_index(target: Target) -> None:
    target.desired(DESIRED)
    plan = target.plan()
    holder = connect(target.database, autocommit=False)
    holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    holder.execute("SELECT count(*) FROM parents")  # an old snapshot: CREATE INDEX CONCURRENTLY waits for it
    proc = target.start_apply(plan)
    try:
        _kill_when_waiting(target, proc, "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = "
                                         "'reconciler apply' AND query LIKE 'CREATE INDEX CONCURRENTLY%'", until_gone=True)
    finally:
        holder.rollback()
        holder.close()
    target.wait_for("SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('reconciler apply', 'reconciler control')", 0)
    assert fetch_one(target.database, "SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 1  # the crash's leftover
    fresh = target.plan("fresh.json")
    assert target.run("apply", str(fresh)).returncode == 0
    runs = target.runs()
    assert [r["status"] for r in runs] == ["applied", "interrupted"]
    assert "dropped the INVALID index public.items_note_idx" in str(runs[1]["error"])
    assert fetch_one(target.database, "SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
    assert target.lock_is_free()


def test_kill_9_between_phases_leaves_exactly_the_recorded_steps(target: Target) -> None:
    """The main transaction commits, then the build of an index over its new column waits on an old
    snapshot and the process dies: what stays is exactly the steps the history row lists."""
    target.desired(DESIRED.replace("CREATE INDEX items_note_idx ON items (note);",
                                   "CREATE INDEX items_extra_idx ON items (extra);"))
    plan = target.plan()
    holder = connect(target.database, autocommit=False)
    holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    holder.execute("SELECT count(*) FROM parents")
    proc = target.start_apply(plan)
    try:
        _kill_when_waiting(target, proc, "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = "
                                         "'reconciler apply' AND query LIKE 'CREATE INDEX CONCURRENTLY items_extra_idx%'",
                          until_gone=True)
    finally:
        holder.rollback()
        holder.close()
    target.wait_for("SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('reconciler apply', "
                    "'reconciler control')", 0)
    assert fetch_one(target.database, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'extra'") == 1
    fresh = target.plan("fresh.json")
    kinds = [s["kind"] for s in json.loads(fresh.read_text())["body"]["steps"]]
    assert "add_column" not in kinds and "create_index_concurrently" in kinds  # the rest, and only the rest
    assert target.run("apply", str(fresh)).returncode == 0
    interrupted = target.runs()[1]
    completed = [s["index"] for s in interrupted["statements"] if s["status"] == "applied"]  # type: ignore[union-attr]
    main_steps = [s["index"] for s in json.loads(plan.read_text())["body"]["steps"] if s["kind"] == "add_column"]
    assert set(main_steps) <= set(completed)
    assert f"completed step(s): {', '.join(map(str, completed))}" in str(interrupted["error"])
    assert "dropped the INVALID index public.items_extra_idx" in str(interrupted["error"])
    assert target.fingerprint() == target.fingerprint() and target.lock_is_free()


def test_two_processes_applying_the_same_plan_exactly_one_applies(target: Target) -> None:
    target.desired(DESIRED)
    plan = target.plan()
    procs = [target.start_apply(plan) for _ in range(2)]
    codes = sorted(p.wait(120) for p in procs)
    assert codes == [0, 3], [p.stderr.read() if p.stderr else "" for p in procs]
    assert [r["status"] for r in target.runs()] == ["applied"]
    assert target.lock_is_free()


def test_cancel_from_another_process_and_by_signal(target: Target) -> None:
    target.desired(DESIRED)
    plan = target.plan()
    before = target.fingerprint()
    for how in ("command", "signal"):
        blocker = connect(target.database, autocommit=False)
        blocker.execute("LOCK TABLE items IN SHARE MODE")
        proc = target.start_apply(plan)
        try:
            target.wait_for("SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = 'reconciler apply' "
                            "AND wait_event_type = 'Lock'")
            if how == "command":
                cancelled = target.run("cancel")
                assert cancelled.returncode == 0 and "cancelled its running statement" in cancelled.stdout
            else:
                proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            blocker.rollback()
            blocker.close()
        assert proc.returncode == (1 if how == "command" else 130), err
        assert target.fingerprint() == before
        assert target.runs()[0]["status"] == "cancelled"
        assert target.lock_is_free()


def test_backup_then_restore_into_a_fresh_database(target: Target, pg_server: Server) -> None:
    target.desired(DESIRED.replace(", legacy text", ""))  # drops a column: the backup keeps its data
    plan = target.plan()
    assert target.run("apply", str(plan)).returncode == 0
    (run,) = target.runs()
    assert run["backup_path"] and Path(str(run["backup_path"])).is_file() and run["backup_bytes"]
    assert len(str(run["backup_sha256"])) == 64
    with throwaway_database(pg_server, "restore") as fresh:
        restored = target.run("restore", str(run["id"]), "--into", fresh)
        assert restored.returncode == 0, restored.stderr
        assert fetch_one(fresh, "SELECT count(*) FROM items WHERE legacy = 'l'") == 500
        assert fetch_one(fresh, "SELECT count(*) FROM parents") == 50
        # the metadata schema is left out: a restored backup brings back no history row, not even its own run's
        assert fetch_one(fresh, "SELECT count(*) FROM pg_namespace WHERE nspname = 'reconciler'") == 0
    rollback = target.run("rollback", str(run["id"]), "--plan-only", "-o", str(target.root / "back.json"))
    assert rollback.returncode == 2, rollback.stderr
    assert "add_column public.items.legacy" in rollback.stdout
    applied = target.run("rollback", str(run["id"]))  # auto_apply is on for this environment
    assert applied.returncode == 0 and "Rolled back to the schema run" in applied.stdout, applied.stderr
    assert fetch_one(target.database, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'legacy'") == 1
    assert fetch_one(target.database, "SELECT to_regclass('public.items_note_idx')") is None


def test_failed_later_phase_undoes_committed_steps_by_their_rollback_sql(target: Target) -> None:
    run_sql(target.database, "UPDATE items SET parent_id = 9999 WHERE id = 1")  # the foreign key cannot validate
    before = target.fingerprint()
    target.desired(DESIRED.replace("CREATE INDEX items_note_idx ON items (note);", ""))
    plan = target.plan()
    result = target.run("apply", str(plan))
    assert result.returncode == 1
    assert "were committed, then undone by their rollback SQL" in result.stderr
    assert target.fingerprint() == before
    (run,) = target.runs()
    assert run["status"] == "rolled back"
    assert {s["status"] for s in run["statements"]} >= {"undone", "failed"}  # type: ignore[union-attr]


def test_irreversible_committed_steps_are_named_with_the_way_back(target: Target) -> None:
    run_sql(target.database, "UPDATE items SET parent_id = 9999 WHERE id = 1")
    target.desired(DESIRED.replace(", legacy text", "").replace("CREATE INDEX items_note_idx ON items (note);", ""))
    plan = target.plan()
    result = target.run("apply", str(plan))
    assert result.returncode == 1
    run = target.runs()[0]
    assert "cannot be undone by SQL" in result.stderr and f"reconciler restore {run['id']}" in result.stderr
    assert run["status"] == "failed"


def test_verify_on_demand(target: Target) -> None:
    target.desired(LIVE.split("INSERT")[0])
    assert target.run("verify").returncode == 0
    run_sql(target.database, "CREATE INDEX items_bad ON items (note)")
    result = target.run("verify")
    assert result.returncode == 2 and "index public.items_bad" in result.stdout
    assert os.path.isdir(target.root)


@pytest.mark.skipif(bool(os.environ.get("RECONCILER_TEST_DSN")), reason="needs a server that trusts a new login role")
def test_preflight_names_what_the_applying_role_lacks(target: Target) -> None:
    role = f"app_{secrets.token_hex(4)}"
    dbname = dsnlib.database_name(target.database)
    run_sql(target.database, f'CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA public TO {role}; '
                             f'GRANT CREATE ON DATABASE "{dbname}" TO {role}')
    try:
        target.desired(DESIRED)
        plan = target.plan()  # planned by the owner; applied by a role that owns nothing
        app = psycopg.conninfo.make_conninfo(target.database, user=role)
        result = target.run("apply", str(plan), "--database", app)
        assert result.returncode == 3, result.stderr
        assert f"refused (ownership): the role '{role}' does not own (nor belong to the owner of): public.items, public.parents" \
            in result.stderr
        checks = target.run("verify-plan", str(plan), "--database", app)
        assert "FAIL  privileges" in checks.stdout and "lacks CREATE on: public" in checks.stdout
        assert "FAIL  backup" in checks.stdout and "cannot read: public.items" in checks.stdout
    finally:
        run_sql(target.database, f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_touched_backup_keeps_only_the_data_the_plan_can_lose(target: Target, pg_server: Server) -> None:
    config = target.root / "reconciler.yaml"
    config.write_text(config.read_text().replace("lock_wait: 30s", "lock_wait: 30s\n    backup: touched"))
    target.desired(DESIRED.replace(", legacy text", "").replace("CREATE INDEX items_note_idx ON items (note);", ""))
    assert target.run("apply", str(target.plan())).returncode == 0
    (run,) = target.runs()
    with throwaway_database(pg_server, "restore") as fresh:
        assert target.run("restore", str(run["id"]), "--into", fresh).returncode == 0
        assert fetch_one(fresh, "SELECT count(*) FROM items") == 500  # dropped a column: its data is kept
        assert fetch_one(fresh, "SELECT count(*) FROM parents") == 0  # untouched: schema only


def test_an_interrupt_just_after_the_run_is_recorded_finishes_it_as_cancelled(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM or Ctrl-C can land between writing the run's row and the first step: the row must not stay
    `running` (the watch test saw this under load)."""
    from reconciler import apply, history
    from reconciler.planfile import read_plan

    target.desired(DESIRED)
    plan = read_plan(target.plan())
    before = target.fingerprint()
    real_start = history.start_run

    def start_then_interrupted(*args: object, **kwargs: object) -> str:
        real_start(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(history, "start_run", start_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        apply.apply_plan(plan, target.database, apply.ApplyOptions(environment="test", metadata_schema="reconciler"))
    assert [r["status"] for r in target.runs()] == ["cancelled"]
    assert target.fingerprint() == before and target.lock_is_free()
