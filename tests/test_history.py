"""The run's progress in the history row: what a reader sees after each phase, what crash recovery makes of
it, and a run started by a tool that kept its progress in ``statements`` itself."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from psycopg import sql

from reconciler import history
from reconciler.apply import ApplyOptions, apply_plan, settle
from reconciler.config import Environment, load_config
from reconciler.history import StepRecord
from reconciler.pipeline import make_plan, open_servers
from reconciler.safety import Step
from reconciler.servers import Server, connect
from tests.conftest import fetch_one, run_sql

INDEXED = ("a", "b", "c", "d", "e", "f")
LIVE = f"""
CREATE TABLE t (id int PRIMARY KEY, {", ".join(f"{c} int" for c in INDEXED)});
INSERT INTO t SELECT g, g, g, g, g, g, g FROM generate_series(1, 50) g;
"""


def _desired() -> str:
    return (f"CREATE TABLE t (id int PRIMARY KEY, {', '.join(f'{c} int' for c in INDEXED)}, note text);\n"
            + "".join(f"CREATE INDEX t_{c}_idx ON t ({c});\n" for c in INDEXED))


def test_each_phase_sees_exactly_the_earlier_phases_recorded(tmp_path: Path, database: str, pg_server: Server) -> None:
    """Concurrent index builds run one phase each: at every step the row lists the steps of the phases before
    it, in order, and names the phase running now."""
    run_sql(database, LIVE)
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "schema.sql").write_text(_desired())
    (tmp_path / "reconciler.yaml").write_text("schemas: schemas\n")
    config = load_config(tmp_path / "reconciler.yaml")
    env = Environment(name="test", database=database, shadow=pg_server.dsn)
    with open_servers(config, env) as servers:
        plan = make_plan(config, env, servers).plan
    phases = sorted({s.phase for s in plan.body.steps})
    assert len(phases) >= len(INDEXED) + 1
    seen: list[tuple[Step, list[tuple[int, str]], list[int]]] = []
    reader = connect(database)

    def observe(step: Step) -> None:
        (run,) = history.running_runs(reader, "reconciler")
        seen.append((step, [(int(s["index"]), str(s["status"])) for s in run.statements],
                     [int(s["index"]) for s in run.current_steps]))

    try:
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler",
                                                         on_step=observe))
    finally:
        reader.close()
    assert result.status == "applied" and len(seen) == len(plan.body.steps)
    for step, recorded, current in seen:
        assert recorded == [(s.index, "applied") for s in plan.body.steps if s.phase < step.phase]
        assert current == [s.index for s in plan.body.steps if s.phase == step.phase]
    with connect(database) as conn:
        (run,) = history.list_runs(conn, "reconciler")
    assert [(s["index"], s["status"]) for s in run.statements] == [(s.index, "applied") for s in plan.body.steps]
    assert run.current_steps == ()
    assert fetch_one(database, "SELECT count(*) FROM reconciler.run_progress") == 0


def _record(index: int, status: str = "applied") -> StepRecord:
    return StepRecord(index, "create_index_concurrently", f"public.t_{index}_idx", f"CREATE INDEX t_{index}_idx ON t (a)",
                      status, 1.5)


def _dead_run(conn: Any) -> str:
    history.ensure_schema(conn, "reconciler")
    return history.start_run(conn, "reconciler", plan_id="sha256:" + "0" * 64, environment="test", backend_pid=-1,
                             git_commit=None, from_fingerprint="a", to_fingerprint="b")


def test_recovery_moves_the_recorded_steps_of_a_dead_run_into_its_row(database: str) -> None:
    with connect(database) as conn:
        run_id = _dead_run(conn)
        history.record_progress(conn, "reconciler", run_id, added=[_record(1), _record(2)], position=0,
                                current=[{"index": 3, "kind": "create_table", "object": "public.u", "transactional": True}])
        history.record_progress(conn, "reconciler", run_id, added=[_record(3, "rolled back"), _record(3)], position=2)
        running = history.get_run(conn, "reconciler", run_id)
        assert running is not None
        assert [(s["index"], s["status"]) for s in running.statements] == [(1, "applied"), (2, "applied"),
                                                                           (3, "rolled back"), (3, "applied")]
        assert running.statements[0] == _record(1).to_json()
        assert running.current_steps == ()
        (recovered,) = settle(conn, "reconciler").interrupted
        assert recovered.id == run_id
        after = history.get_run(conn, "reconciler", run_id)
    assert after is not None and after.status == "interrupted"
    assert "completed step(s): 1, 2, 3" in (after.error or "")
    assert after.statements == running.statements
    assert fetch_one(database, "SELECT count(*) FROM reconciler.run_progress") == 0
    assert fetch_one(database, "SELECT jsonb_array_length(statements) FROM reconciler.runs") == 4


def _version_2_run(conn: Any) -> str:
    """The metadata schema and a dead run's row as a version-2 reconciler left them: its progress in ``statements``."""
    conn.execute("CREATE SCHEMA reconciler")
    conn.execute("CREATE TABLE reconciler.schema_version (version integer PRIMARY KEY, applied_at timestamptz NOT NULL "
                 "DEFAULT now())")
    for version in (1, 2):
        conn.execute(sql.SQL(history._MIGRATIONS[version]).format(schema=sql.Identifier("reconciler")))
        conn.execute("INSERT INTO reconciler.schema_version (version) VALUES (%s)", (version,))
    run_id = str(uuid.uuid4())  # the row as that tool wrote it: its columns only
    conn.execute("INSERT INTO reconciler.runs (id, plan_id, environment, status, actor, client_host, tool_version, "
                 "backend_pid, from_fingerprint, to_fingerprint, statements) VALUES (%s, %s, 'test', 'running', 'a', "
                 "'h', '0.1.0', -1, 'a', 'b', %s::jsonb)",
                 (run_id, "sha256:" + "0" * 64, '[{"index": 1, "status": "applied"}, {"index": 2, "status": "applied"}]'))
    return run_id


def test_a_version_2_metadata_schema_is_read_and_recovered_without_upgrading_it(database: str) -> None:
    """plan, history and cancel read the history without upgrading it (only apply does)."""
    with connect(database) as conn:
        run_id = _version_2_run(conn)
        (running,) = history.running_runs(conn, "reconciler")
        assert [s["index"] for s in running.statements] == [1, 2]
        settle(conn, "reconciler")
        (after,) = history.list_runs(conn, "reconciler")
    assert after.id == run_id and after.status == "interrupted" and "completed step(s): 1, 2" in (after.error or "")
    assert [s["index"] for s in after.statements] == [1, 2]
    assert fetch_one(database, "SELECT max(version) FROM reconciler.schema_version") == 2


def test_a_run_a_version_2_reconciler_started_keeps_its_statements_after_the_upgrade(database: str) -> None:
    with connect(database) as conn:
        run_id = _version_2_run(conn)
        history.ensure_schema(conn, "reconciler")
        history.record_progress(conn, "reconciler", run_id, added=[_record(3)], position=0)
        running = history.get_run(conn, "reconciler", run_id)
        assert running is not None and [s["index"] for s in running.statements] == [1, 2, 3]
        settle(conn, "reconciler", holding_lock=True)
        after = history.get_run(conn, "reconciler", run_id)
    assert after is not None and after.status == "interrupted" and "completed step(s): 1, 2, 3" in (after.error or "")
    assert [s["index"] for s in after.statements] == [1, 2, 3]
    assert fetch_one(database, "SELECT max(version) FROM reconciler.schema_version") == history.SCHEMA_VERSION
