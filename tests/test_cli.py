"""End-to-end: the command line against real databases, with the exit codes of the contract."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reconciler import history, inspect
from reconciler.cli import main
from reconciler.servers import EmbeddedCluster, Server, connect
from tests.conftest import fetch_one, run_sql
from tests.repo import BASE_SCHEMA, Repo


def snapshot_of(dsn: str) -> inspect.SchemaSnapshot:
    with connect(dsn) as conn:
        return inspect.snapshot(conn)


def test_empty_database_to_full_schema_then_no_changes(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = repo.root / "plan.json"
    assert repo.run("plan", "-o", str(plan_file)) == 2
    out = capsys.readouterr().out
    assert "create_table public.orders" in out
    assert json.loads(plan_file.read_text())["id"].startswith("sha256:")

    assert repo.run("apply", str(plan_file)) == 0
    assert "Applied plan" in capsys.readouterr().out
    assert fetch_one(repo.database, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 2
    assert fetch_one(repo.database, "SELECT to_regclass('public.open_orders') IS NOT NULL") is True

    assert repo.run("plan") == 0
    assert "No changes" in capsys.readouterr().out
    assert repo.run("drift") == 0


def test_schema_edits_plan_apply_and_converge(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    assert repo.run("apply", "--auto") == 0
    run_sql(repo.database, "INSERT INTO customers (email) VALUES ('a@example.com');"
                           "INSERT INTO orders (customer_id, total) SELECT id, 10 FROM customers")
    edited = dict(BASE_SCHEMA)
    edited["00_types.sql"] = "CREATE TYPE status AS ENUM ('open', 'shipped', 'closed');\n"
    edited["10_tables.sql"] = BASE_SCHEMA["10_tables.sql"].replace(
        "email text NOT NULL UNIQUE", "email text NOT NULL UNIQUE,\n    name text"
    ) + "CREATE INDEX orders_status_idx ON orders (status);\n"
    edited["20_views.sql"] = (
        "CREATE VIEW open_orders AS SELECT id, customer_id, total, status FROM orders WHERE status <> 'closed';\n"
    )
    edited["30_functions.sql"] = BASE_SCHEMA["30_functions.sql"].replace("1000000", "5000000")
    repo.write(edited)
    capsys.readouterr()

    plan_file = repo.root / "edit.json"
    assert repo.run("plan", "-o", str(plan_file)) == 2
    out = capsys.readouterr().out
    for expected in ("add_column public.customers.name", "create_index_concurrently public.orders_status_idx",
                     "public.open_orders", "order_total_guard"):
        assert expected in out
    assert repo.run("apply", str(plan_file)) == 0
    assert repo.run("drift") == 0
    assert repo.run("plan") == 0
    # data survived the enum change and the new value is usable
    assert fetch_one(repo.database, "SELECT count(*) FROM orders") == 1
    run_sql(repo.database, "UPDATE orders SET status = 'shipped'")
    assert fetch_one(repo.database, "SELECT pg_get_functiondef('order_total_guard'::regproc) LIKE '%5000000%'") is True


def test_drift_after_manual_alter(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    assert repo.run("apply", "--auto") == 0
    run_sql(repo.database, "ALTER TABLE customers ADD COLUMN nickname text; DROP INDEX orders_customer_id_idx")
    capsys.readouterr()
    assert repo.run("drift") == 2
    out = capsys.readouterr().out
    assert "column public.customers.nickname (unexpected)" in out
    assert "index public.orders_customer_id_idx (missing)" in out
    assert repo.run("drift", "--format", "json") == 2
    found = json.loads(capsys.readouterr().out)["differences"]
    assert {"object": "public.customers.nickname", "change": "unexpected", "held_by": None} in found
    assert {(d["object"], d["change"]) for d in found} >= {("public.orders_customer_id_idx", "missing")}
    assert repo.run("plan") == 2  # and the plan puts it back


def test_history_lists_runs(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    assert repo.run("history") == 0
    assert "No runs recorded" in capsys.readouterr().out
    assert repo.run("apply", "--auto") == 0
    repo.write({"40_extra.sql": "CREATE TABLE notes (id int PRIMARY KEY, body text);\n"})
    assert repo.run("apply", "--auto") == 0
    capsys.readouterr()
    assert repo.run("history", "--format", "json") == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in runs] == ["applied", "applied"]
    assert runs[0]["statements"][0]["sql"].lower().startswith("create")
    assert all(r["finished_at"] and r["from_fingerprint"].startswith("sha256:") for r in runs)
    assert repo.run("history") == 0
    text = capsys.readouterr().out
    assert text.count("applied") == 2 and runs[0]["id"] in text


def test_syntax_error_names_file_and_line(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    repo.write({"50_broken.sql": "-- a comment\nCREATE TABLE ok (id int);\n\nCREATE TABLE broken (id int,,);\n"})
    assert repo.run("plan") == 1
    err = capsys.readouterr().err
    assert "50_broken.sql:4:" in err
    assert "syntax error" in err
    assert "Traceback" not in err


def test_failing_step_rolls_back_and_is_recorded(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    assert repo.run("apply", "--auto") == 0
    run_sql(repo.database, "INSERT INTO customers (email) VALUES ('a@example.com')")
    before = snapshot_of(repo.database)
    # The rows do not convert (the rehearsal, on a copy without rows, cannot know): the step fails at apply.
    repo.write({
        "10_tables.sql": BASE_SCHEMA["10_tables.sql"].replace(
            "email text NOT NULL UNIQUE", "-- reconciler: using email::integer\n    email integer NOT NULL UNIQUE"
        ) + "CREATE TABLE audit (id int PRIMARY KEY);\n",
    })
    capsys.readouterr()
    assert repo.run("apply", "--auto") == 1
    err = capsys.readouterr().err
    assert "rolled back" in err and "email" in err
    after = snapshot_of(repo.database)
    assert after.fingerprint == before.fingerprint  # audit table was not left behind either
    with connect(repo.database) as conn:
        runs = history.list_runs(conn, "reconciler")
    assert runs[0].status == "failed"
    assert "email" in (runs[0].error or "") and "SQLSTATE 22P02" in (runs[0].error or "")
    assert {s["status"] for s in runs[0].statements} >= {"rolled back", "failed"}


def test_concurrent_applies_second_waits_then_names_holder(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    assert repo.run("apply", "--auto") == 0
    repo.write({"40_extra.sql": "ALTER TABLE customers ADD COLUMN nickname text;\n"})
    plan_file = repo.root / "p.json"
    assert repo.run("plan", "-o", str(plan_file)) == 2
    capsys.readouterr()

    blocker = connect(repo.database, autocommit=False)
    # SHARE lets catalog reads through but makes the first apply's ALTER TABLE wait
    blocker.execute("LOCK TABLE customers IN SHARE MODE")
    first_result: list[int] = []
    first = threading.Thread(target=lambda: first_result.append(repo.run("apply", str(plan_file))))
    first.start()
    try:
        deadline = time.monotonic() + 20
        while fetch_one(repo.database, "SELECT count(*) FROM reconciler.runs WHERE status = 'running'") != 1:
            assert time.monotonic() < deadline, "first apply never started"
            time.sleep(0.05)
        started = time.monotonic()
        assert repo.run("apply", str(plan_file)) == 1
        waited = time.monotonic() - started
        err = capsys.readouterr().err
        running_id = fetch_one(repo.database, "SELECT id::text FROM reconciler.runs WHERE status = 'running'")
        assert "another apply holds the lock" in err
        assert str(running_id) in err
        assert waited >= 1.5  # it waited (lock_wait is 2s) rather than failing at once
    finally:
        blocker.rollback()
        blocker.close()
        first.join(30)
    assert first_result == [0]
    assert fetch_one(repo.database, "SELECT count(*) FROM reconciler.runs WHERE status = 'applied'") == 2
    # the first apply's ALTER TABLE waited on the blocker's lock for seconds, and the run says so
    waited = fetch_one(repo.database, "SELECT max((s->>'lock_wait_ms')::float) FROM reconciler.runs, "
                                      "jsonb_array_elements(statements) s WHERE s->>'kind' = 'add_column'")
    assert isinstance(waited, float) and waited >= 1000


def test_unreachable_database_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "a.sql").write_text("CREATE TABLE a (id int);\n")
    code = main(["--config", str(_write_config(tmp_path)), "plan", "--database",
                 "postgresql://app:s3cret@127.0.0.1:1/app?connect_timeout=2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot connect to app@127.0.0.1:1/app" in err
    assert "s3cret" not in err and "Traceback" not in err


def _write_config(root: Path) -> Path:
    path = root / "reconciler.yaml"
    path.write_text("schemas: schemas\n")
    return path


def test_plan_file_not_matching_schema_is_refused(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = repo.root / "plan.json"
    assert repo.run("plan", "-o", str(plan_file)) == 2
    data = json.loads(plan_file.read_text())
    data["body"]["steps"][0]["transactional"] = "yes"
    plan_file.write_text(json.dumps(data))
    capsys.readouterr()
    assert repo.run("apply", str(plan_file)) == 1
    err = capsys.readouterr().err
    assert "body/steps/0/transactional" in err and "'yes' is not of type 'boolean'" in err
    assert repo.run("show", str(plan_file)) == 1


def test_tampered_stale_and_wrong_target_plans_are_refused(
    repo: Repo, second_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_file = repo.root / "plan.json"
    assert repo.run("plan", "-o", str(plan_file)) == 2
    original = plan_file.read_text()

    data = json.loads(original)
    data["body"]["steps"][0]["sql"] += " "  # any byte changed
    plan_file.write_text(json.dumps(data))
    capsys.readouterr()
    assert repo.run("apply", str(plan_file)) == 3
    assert "does not hash to the plan id" in capsys.readouterr().err

    plan_file.write_text(original)
    assert main(["--config", str(repo.config), "apply", str(plan_file), "--env", "test",
                 "--database", second_database]) == 3
    assert "is for database" in capsys.readouterr().err

    run_sql(repo.database, "CREATE TABLE sneaky (id int)")
    assert repo.run("apply", str(plan_file)) == 3
    err = capsys.readouterr().err
    assert "stale" in err and "table public.sneaky" in err
    assert fetch_one(repo.database, "SELECT to_regclass('public.orders')") is None


def test_applied_plan_is_not_replayed(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = repo.root / "plan.json"
    assert repo.run("plan", "-o", str(plan_file)) == 2
    assert repo.run("apply", str(plan_file)) == 0
    capsys.readouterr()
    assert repo.run("apply", str(plan_file)) == 3
    assert "already applied" in capsys.readouterr().err


def test_auto_refused_where_environment_forbids(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    repo.config.write_text(repo.config.read_text().replace("auto_apply: true", "auto_apply: false"))
    assert repo.run("apply", "--auto") == 3
    assert "does not allow --auto" in capsys.readouterr().err
    assert fetch_one(repo.database, "SELECT to_regclass('public.orders')") is None


def test_show_renders_markdown_and_json(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    assert repo.run("apply", "--auto") == 0
    repo.write({"20_views.sql": "", "10_tables.sql": BASE_SCHEMA["10_tables.sql"].replace(
        "total numeric(12, 2) NOT NULL CHECK (total >= 0)", "note text").replace(
        "CREATE INDEX orders_customer_id_idx ON orders (customer_id);", "")})
    plan_file = repo.root / "plan.json"
    assert repo.run("plan", "-o", str(plan_file)) == 2
    capsys.readouterr()
    assert repo.run("show", str(plan_file), "--format", "markdown") == 0
    md = capsys.readouterr().out
    assert md.startswith("### pg-reconciler plan") and "```sql" in md and "-- Phase 1: one transaction" in md
    assert "| `DATA_LOSS` | `public.orders.total` |" in md and "drop_index_concurrently" in md
    assert repo.run("show", str(plan_file), "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == json.loads(plan_file.read_text())


def test_diff_prints_sql_only(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    assert repo.run("diff") == 2
    out = capsys.readouterr().out
    assert 'create table "public"."orders"' in out
    assert "Plan " not in out


def test_console_script_init_and_local_environment(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The README's main job: init, then plan and apply on the embedded local environment."""
    exe = Path(sys.executable).with_name("reconciler")
    assert exe.exists()
    project = tmp_path / "proj"
    # as root the cluster may live outside the project (a 0700 tmp dir): remove it wherever it went
    request.addfinalizer(lambda: shutil.rmtree(EmbeddedCluster(project / ".reconciler" / "local").datadir,
                                               ignore_errors=True))
    subprocess.run([str(exe), "init", str(project)], check=True, capture_output=True, text=True)
    assert (project / "reconciler.yaml").is_file() and (project / "schemas" / "001_app.sql").is_file()
    plan = subprocess.run([str(exe), "plan", "-o", "p.json"], cwd=project, capture_output=True, text=True, timeout=240)
    assert plan.returncode == 2, plan.stderr
    assert "create_table public.accounts" in plan.stdout
    applied = subprocess.run([str(exe), "apply", "p.json"], cwd=project, capture_output=True, text=True, timeout=240)
    assert applied.returncode == 0, applied.stderr
    again = subprocess.run([str(exe), "plan"], cwd=project, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "No changes" in again.stdout


def test_interrupted_plan_drops_its_shadow_database(repo: Repo, pg_server: Server) -> None:
    """Ctrl-C while the shadow loads: exit 130 and no scratch database left on the server."""
    repo.write({"15_slow.sql": "SELECT pg_sleep(60);\n"})
    exe = Path(sys.executable).with_name("reconciler")
    before = fetch_one(pg_server.dsn, "SELECT count(*) FROM pg_database WHERE datname LIKE 'reconciler\\_shadow\\_%'")
    proc = subprocess.Popen([str(exe), "--config", str(repo.config), "plan", "--env", "test"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while fetch_one(pg_server.dsn, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%'") != 1:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    after = fetch_one(pg_server.dsn, "SELECT count(*) FROM pg_database WHERE datname LIKE 'reconciler\\_shadow\\_%'")
    assert after == before


def test_steps_run_under_lock_timeout(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    repo.config.write_text(repo.config.read_text().replace("lock_timeout: 20s", "lock_timeout: 300ms"))
    assert repo.run("apply", "--auto") == 0
    repo.write({"40_extra.sql": "ALTER TABLE customers ADD COLUMN nickname text;\n"})
    blocker = connect(repo.database, autocommit=False)
    blocker.execute("LOCK TABLE customers IN SHARE MODE")
    try:
        capsys.readouterr()
        assert repo.run("apply", "--auto") == 1
    finally:
        blocker.rollback()
        blocker.close()
    err = capsys.readouterr().err
    assert "lock timeout" in err and "55P03" in err
    assert fetch_one(repo.database, "SELECT status FROM reconciler.runs ORDER BY started_at DESC LIMIT 1") == "failed"
    assert fetch_one(repo.database, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'nickname'") == 0
