"""A target database for apply tests driven through the real command line: the tables below, a reconciler.yaml
whose 'test' environment points at it (the test server as shadow, backups on), and the commands run as
subprocesses, as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from reconciler import inspect
from reconciler.plan import Plan
from reconciler.safety import Step
from reconciler.servers import Server, connect
from tests.conftest import fetch_one, run_sql

EXE = str(Path(sys.executable).with_name("reconciler"))
LIVE = """
CREATE TABLE parents (id bigint PRIMARY KEY, name text);
CREATE TABLE items (id bigint PRIMARY KEY, parent_id bigint, note text, legacy text);
INSERT INTO parents SELECT g, 'p' || g FROM generate_series(1, 50) g;
INSERT INTO items SELECT g, 1 + g % 50, 'n', 'l' FROM generate_series(1, 500) g;
"""


class Target:
    def __init__(self, root: Path, database: str, server: Server, *, lock_timeout: str = "60s") -> None:
        self.root, self.database, self.server = root, database, server
        run_sql(database, LIVE)
        (root / "schemas").mkdir()
        (root / "reconciler.yaml").write_text(textwrap.dedent(f"""\
            backups: backups
            environments:
              test:
                database: "{database}"
                shadow: "{server.dsn}"
                require_signed_plans: false
                auto_apply: true
                lock_timeout: {lock_timeout}
                lock_wait: 30s
            """))

    def desired(self, sql: str) -> None:
        (self.root / "schemas" / "schema.sql").write_text(sql)

    def args(self, *args: str) -> list[str]:
        return [EXE, "--config", str(self.root / "reconciler.yaml"), *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if command[0] in {"plan", "apply", "cancel", "history", "restore", "rollback", "verify", "backup", "verify-plan",
                          "drift", "diff"}:
            command += ["--env", "test"]
        return subprocess.run(self.args(*command), capture_output=True, text=True, timeout=240)

    def plan(self, name: str = "plan.json") -> Path:
        path = self.root / name
        result = self.run("plan", "-o", str(path))
        assert result.returncode == 2, result.stderr
        return path

    def start_apply(self, plan: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(self.args("apply", str(plan), "--env", "test"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def fingerprint(self) -> str:
        with connect(self.database) as conn:
            return inspect.snapshot(conn).fingerprint

    def runs(self) -> list[dict[str, object]]:
        result = self.run("history", "--format", "json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def wait_for(self, query: str, expected: object = True, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while fetch_one(self.database, query) != expected:
            assert time.monotonic() < deadline, f"timed out waiting for: {query}"
            time.sleep(0.05)

    def kill_while_waiting(self, proc: subprocess.Popen[str], hold: str, waiting: str) -> dict[str, object]:
        """SIGKILL the applier ``proc`` once it waits for a lock that a session running ``hold`` has (``waiting``: a
        pattern of its statement, for pg_stat_activity); the run it leaves, recorded as interrupted."""
        holder = connect(self.database, autocommit=False)
        holder.execute(hold.encode())
        try:
            self.wait_for(f"SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE '{waiting}' "
                          "AND wait_event_type = 'Lock'")
            proc.send_signal(signal.SIGKILL)
            proc.wait(60)
        finally:
            holder.rollback()
            holder.close()
        self.wait_for("SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('reconciler apply', "
                      "'reconciler control') AND pid <> pg_backend_pid()", 0, seconds=30)
        (run,) = self.runs()
        assert run["status"] == "interrupted", run
        return run

    def lock_is_free(self) -> bool:
        return fetch_one(self.database, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0




DESIRED = """
CREATE TABLE parents (id bigint PRIMARY KEY, name text);
CREATE TABLE items (id bigint PRIMARY KEY, parent_id bigint REFERENCES parents (id), note text, legacy text, extra text);
CREATE INDEX items_note_idx ON items (note);
"""


def apply_with_cutover_blocked(plan: Plan, database: str, table: str) -> str:
    """Apply ``plan`` while a reader holds ``table`` from the first cut-over step on, past both of its attempts (the
    cut-over waits 500 ms for its lock each time); the error the run failed with."""
    from reconciler.apply import ApplyOptions, apply_plan
    from reconciler.errors import ApplyError

    first_cutover = next(s.index for s in plan.body.steps if s.kind == "cutover")
    holder = connect(database, autocommit=False)

    def on_step(step: Step) -> None:
        if step.index == first_cutover:
            holder.execute(f"SELECT 1 FROM {table} LIMIT 1".encode())  # its ACCESS SHARE lock, held until rolled back

    try:
        apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler", lock_retries=1,
                                                retry_backoff_seconds=0.1, on_step=on_step))
    except ApplyError as exc:
        return str(exc)
    finally:
        holder.rollback()
        holder.close()
    raise AssertionError("the run went through: the reader did not hold up its cut-over")
