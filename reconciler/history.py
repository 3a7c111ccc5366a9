"""Run history in the target database itself: the only place a run's state lives.

The metadata schema is created on first use and versioned; each version is applied once, under
a transaction-level advisory lock so two first runs cannot race.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from . import __version__

SCHEMA_VERSION = 3
_MIGRATION_LOCK = 0x7265636F6E63_01  # "recon" + 1: serialises metadata schema upgrades

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE {schema}.runs (
        id uuid PRIMARY KEY,
        plan_id text NOT NULL,
        environment text NOT NULL,
        status text NOT NULL CHECK (status IN ('running', 'applied', 'failed', 'cancelled')),
        actor text NOT NULL,
        client_host text NOT NULL,
        tool_version text NOT NULL,
        backend_pid integer,
        started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished_at timestamptz,
        git_commit text,
        from_fingerprint text NOT NULL,
        to_fingerprint text NOT NULL,
        statements jsonb NOT NULL DEFAULT '[]',
        error text
    );
    CREATE INDEX runs_started_at_idx ON {schema}.runs (started_at DESC);
    CREATE INDEX runs_plan_id_idx ON {schema}.runs (plan_id);
    COMMENT ON TABLE {schema}.runs IS 'pg-reconciler: one row per apply run';
    """,
    2: """
    ALTER TABLE {schema}.runs DROP CONSTRAINT runs_status_check;
    ALTER TABLE {schema}.runs ADD CONSTRAINT runs_status_check
        CHECK (status IN ('running', 'applied', 'failed', 'cancelled', 'interrupted', 'rolled back'));
    ALTER TABLE {schema}.runs
        ADD COLUMN current_steps jsonb,
        ADD COLUMN cancel_requested_at timestamptz,
        ADD COLUMN backup_path text,
        ADD COLUMN backup_sha256 text,
        ADD COLUMN backup_bytes bigint,
        ADD COLUMN verification jsonb;
    """,
    3: """
    CREATE TABLE {schema}.run_progress (
        run_id uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
        position integer NOT NULL,
        record jsonb NOT NULL,
        PRIMARY KEY (run_id, position)
    );
    COMMENT ON TABLE {schema}.run_progress IS
        'pg-reconciler: step records of a running run, one row each; moved into runs.statements when it ends';
    """,
}


@dataclass(frozen=True)
class StepRecord:
    index: int
    kind: str
    object: str
    sql: str
    status: str  # applied, failed, rolled back, undone
    duration_ms: float
    lock_wait_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "object": self.object, "sql": self.sql,
                "status": self.status, "duration_ms": round(self.duration_ms, 3),
                "lock_wait_ms": round(self.lock_wait_ms, 1)}


@dataclass(frozen=True)
class Run:
    id: str
    plan_id: str
    environment: str
    status: str
    actor: str
    client_host: str
    tool_version: str
    backend_pid: int | None
    started_at: datetime
    finished_at: datetime | None
    git_commit: str | None
    from_fingerprint: str
    to_fingerprint: str
    statements: tuple[dict[str, Any], ...]
    error: str | None
    current_steps: tuple[dict[str, Any], ...] = ()
    cancel_requested_at: datetime | None = None
    backup_path: str | None = None
    backup_sha256: str | None = None
    backup_bytes: int | None = None
    verification: dict[str, Any] | None = None


def actor() -> str:
    """Who runs this: RECONCILER_ACTOR (set it in CI), else the operating-system user."""
    explicit = os.environ.get("RECONCILER_ACTOR")
    if explicit:
        return explicit
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _table(schema: str) -> sql.Composed:
    return sql.SQL("{}.runs").format(sql.Identifier(schema))


def _progress(schema: str) -> sql.Composed:
    return sql.SQL("{}.run_progress").format(sql.Identifier(schema))


def _select(schema: str, progress: bool, where: str, tail: str = "") -> sql.Composed:
    """Runs with the step records so far: a running run's are in run_progress (a run a version-2 tool
    started keeps its own in ``statements``). Reading does not upgrade the metadata schema: before version 3
    there is no run_progress (``progress`` False)."""
    if not progress:
        return sql.SQL("SELECT r.*, NULL::jsonb AS progress FROM {} r WHERE " + where + tail).format(_table(schema))
    return sql.SQL(
        "SELECT r.*, CASE WHEN r.status = 'running' THEN r.statements || (SELECT coalesce(jsonb_agg(p.record "
        "ORDER BY p.position), '[]') FROM {} p WHERE p.run_id = r.id) END AS progress FROM {} r WHERE " + where + tail
    ).format(_progress(schema), _table(schema))


def ensure_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create or upgrade the metadata schema; safe to call on every run."""
    ident = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {}.schema_version (version integer PRIMARY KEY, "
                    "applied_at timestamptz NOT NULL DEFAULT now())").format(ident)
        )
        row = conn.execute(sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version").format(ident)).fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            from .errors import ReconcilerError

            raise ReconcilerError(
                f"the metadata schema {schema!r} is at version {current}, newer than this reconciler "
                f"({__version__}) knows ({SCHEMA_VERSION}): upgrade reconciler"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            conn.execute(sql.SQL(_MIGRATIONS[version]).format(schema=ident))
            conn.execute(sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(ident), (version,))


def start_run(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    run_id: str | None = None,
    plan_id: str,
    environment: str,
    backend_pid: int,
    git_commit: str | None,
    from_fingerprint: str,
    to_fingerprint: str,
) -> str:
    run_id = run_id or str(uuid.uuid4())
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, plan_id, environment, status, actor, client_host, tool_version, backend_pid, "
            "git_commit, from_fingerprint, to_fingerprint) VALUES (%s, %s, %s, 'running', %s, %s, %s, %s, %s, %s, %s)"
        ).format(_table(schema)),
        (run_id, plan_id, environment, actor(), socket.gethostname(), __version__, backend_pid, git_commit,
         from_fingerprint, to_fingerprint),
    )
    return run_id


def finish_run(
    conn: psycopg.Connection[Any],
    schema: str,
    run_id: str,
    *,
    status: str,
    statements: Sequence[StepRecord],
    error: str | None = None,
) -> None:
    conn.execute(
        sql.SQL("WITH done AS (DELETE FROM {} WHERE run_id = %s) "
                "UPDATE {} SET status = %s, finished_at = clock_timestamp(), statements = %s::jsonb, error = %s, "
                "current_steps = NULL WHERE id = %s").format(_progress(schema), _table(schema)),
        (run_id, status, json.dumps([s.to_json() for s in statements]), error, run_id),
    )


def _exists(conn: psycopg.Connection[Any], schema: str) -> tuple[bool, bool]:
    """Whether the runs table exists, and run_progress (version 3) with it."""
    ident = sql.Identifier(schema).as_string(conn)
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
                       (ident + ".runs", ident + ".run_progress")).fetchone()
    return (bool(row[0]), bool(row[1])) if row else (False, False)


def list_runs(conn: psycopg.Connection[Any], schema: str, *, limit: int = 50) -> list[Run]:
    """Newest first; an empty list when the tool never ran against this database."""
    runs, progress = _exists(conn, schema)
    if not runs:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_select(schema, progress, "true", " ORDER BY started_at DESC LIMIT %s"), (limit,))
        rows = cur.fetchall()
    return [_run(r) for r in rows]


def get_run(conn: psycopg.Connection[Any], schema: str, run_id: str) -> Run | None:
    runs, progress = _exists(conn, schema)
    if not runs:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_select(schema, progress, "id::text = %s"), (run_id,))
        row = cur.fetchone()
    return _run(row) if row else None


def runs_for_plan(conn: psycopg.Connection[Any], schema: str, plan_id: str) -> list[Run]:
    runs, progress = _exists(conn, schema)
    if not runs:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_select(schema, progress, "plan_id = %s", " ORDER BY started_at"), (plan_id,))
        return [_run(r) for r in cur.fetchall()]


def running_with_pid(conn: psycopg.Connection[Any], schema: str, pids: Sequence[int]) -> Run | None:
    if not pids:
        return None
    runs, progress = _exists(conn, schema)
    if not runs:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            _select(schema, progress, "status = 'running' AND backend_pid = ANY(%s)", " ORDER BY started_at DESC LIMIT 1"),
            (list(pids),),
        )
        row = cur.fetchone()
    return _run(row) if row else None


def _run(row: dict[str, Any]) -> Run:
    return Run(
        id=str(row["id"]),
        plan_id=row["plan_id"],
        environment=row["environment"],
        status=row["status"],
        actor=row["actor"],
        client_host=row["client_host"],
        tool_version=row["tool_version"],
        backend_pid=row["backend_pid"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        git_commit=row["git_commit"],
        from_fingerprint=row["from_fingerprint"],
        to_fingerprint=row["to_fingerprint"],
        statements=tuple((row["statements"] if row["progress"] is None else row["progress"]) or ()),
        error=row["error"],
        current_steps=tuple(row.get("current_steps") or ()),
        cancel_requested_at=row.get("cancel_requested_at"),
        backup_path=row.get("backup_path"),
        backup_sha256=row.get("backup_sha256"),
        backup_bytes=row.get("backup_bytes"),
        verification=row.get("verification"),
    )


def record_progress(
    conn: psycopg.Connection[Any], schema: str, run_id: str, *, added: Sequence[StepRecord], position: int,
    current: Sequence[dict[str, Any]] = (),
) -> None:
    """What has completed since the last call (``added``, the run's records from ``position`` on) and what runs
    now: all a crash leaves to go by. Only the new records are sent and stored, one row each, so a run of
    thousands of phases writes each record once instead of rewriting the whole list every phase."""
    conn.execute(
        sql.SQL("WITH added AS (INSERT INTO {} (run_id, position, record) SELECT %s, %s + e.ordinality - 1, e.value "
                "FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e) "
                "UPDATE {} SET current_steps = %s::jsonb WHERE id = %s").format(_progress(schema), _table(schema)),
        (run_id, position, json.dumps([s.to_json() for s in added]), json.dumps(list(current)) if current else None,
         run_id),
    )


def record_backup(conn: psycopg.Connection[Any], schema: str, run_id: str, *, path: str, sha256: str, size: int) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET backup_path = %s, backup_sha256 = %s, backup_bytes = %s WHERE id = %s").format(_table(schema)),
        (path, sha256, size, run_id),
    )


def record_verification(conn: psycopg.Connection[Any], schema: str, run_id: str, result: dict[str, Any]) -> None:
    conn.execute(sql.SQL("UPDATE {} SET verification = %s::jsonb WHERE id = %s").format(_table(schema)),
                 (json.dumps(result), run_id))


def request_cancel(conn: psycopg.Connection[Any], schema: str, run_id: str) -> None:
    conn.execute(sql.SQL("UPDATE {} SET cancel_requested_at = clock_timestamp() WHERE id = %s").format(_table(schema)),
                 (run_id,))


def cancel_requested(conn: psycopg.Connection[Any], schema: str, run_id: str) -> bool:
    row = conn.execute(sql.SQL("SELECT cancel_requested_at IS NOT NULL FROM {} WHERE id = %s").format(_table(schema)),
                       (run_id,)).fetchone()
    return bool(row and row[0])


def running_runs(conn: psycopg.Connection[Any], schema: str) -> list[Run]:
    runs, progress = _exists(conn, schema)
    if not runs:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_select(schema, progress, "status = 'running'", " ORDER BY started_at"))
        return [_run(r) for r in cur.fetchall()]


def mark_interrupted(conn: psycopg.Connection[Any], schema: str, run_id: str, message: str) -> None:
    """The run ends as interrupted, its recorded steps moved into ``statements`` like any finished run's."""
    if not _exists(conn, schema)[1]:  # version 2: the steps are in ``statements`` already
        conn.execute(
            sql.SQL("UPDATE {} SET status = 'interrupted', finished_at = clock_timestamp(), error = %s, "
                    "current_steps = NULL WHERE id = %s AND status = 'running'").format(_table(schema)),
            (message, run_id),
        )
        return
    conn.execute(
        sql.SQL("WITH done AS (DELETE FROM {} WHERE run_id = %s RETURNING position, record) "
                "UPDATE {} SET status = 'interrupted', finished_at = clock_timestamp(), error = %s, current_steps = NULL, "
                "statements = statements || (SELECT coalesce(jsonb_agg(record ORDER BY position), '[]') FROM done) "
                "WHERE id = %s AND status = 'running'").format(_progress(schema), _table(schema)),
        (run_id, message, run_id),
    )
