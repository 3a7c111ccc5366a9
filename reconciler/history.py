"""Run history in the target database itself: the only place a run's state lives.

The metadata schema is created on first use and versioned; each version is applied once, under
a transaction-level advisory lock so two first runs cannot race. Reading never creates or upgrades it:
a command that only looks (plan, history, cancel) writes nothing a newer or older tool would trip on.
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

from . import __version__, runlock
from .errors import ReconcilerError

SCHEMA_VERSION = 5
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
    4: """
    ALTER TABLE {schema}.runs
        ADD COLUMN backend_start timestamptz,
        ADD COLUMN cleanup jsonb NOT NULL DEFAULT '[]',
        ADD COLUMN temporaries jsonb NOT NULL DEFAULT '[]';
    COMMENT ON COLUMN {schema}.runs.backend_start IS
        'pg-reconciler: with backend_pid, the applying session: the run is alive while that session holds the apply lock';
    COMMENT ON COLUMN {schema}.runs.cleanup IS
        'pg-reconciler: what a stopped run left that is neither planned nor live before (an INVALID index, a helper '
        'constraint), each pending until a command holding the apply lock removes it';
    """,
    5: """
    ALTER TABLE {schema}.runs ADD COLUMN backfill jsonb;
    COMMENT ON COLUMN {schema}.runs.backfill IS
        'pg-reconciler: a running backfill: its progress, written by the applier before each batch, and what an '
        'operator asked of it (requested: paused, batch_seconds), read back by the applier';
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
    note: str | None = None  # how the status was learned, when not by running the step (e.g. after a crash)
    work: tuple[str, float] | None = None  # its class of work and how much (estimates.py learns rates from these)

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"index": self.index, "kind": self.kind, "object": self.object, "sql": self.sql,
                                 "status": self.status, "duration_ms": round(self.duration_ms, 3),
                                 "lock_wait_ms": round(self.lock_wait_ms, 1)}
        if self.note:
            found["note"] = self.note
        if self.work:
            found["work"] = {"class": self.work[0], "amount": self.work[1]}
        return found


@dataclass(frozen=True)
class Run:
    id: str
    plan_id: str
    environment: str
    status: str  # as recorded; see ``shown_status``
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
    backend_start: datetime | None = None
    cleanup: tuple[dict[str, Any], ...] = ()
    temporaries: tuple[dict[str, Any], ...] = ()
    alive: bool | None = None  # for a running row, read with it: does its applying session still hold the lock?
    backfill: dict[str, Any] | None = None  # version 5: a backfill's progress and what was asked of it

    @property
    def shown_status(self) -> str:
        """The truth when the row could not be corrected (a reader without write rights): a running row whose
        applier is gone is interrupted."""
        return "interrupted" if self.status == "running" and self.alive is False else self.status

    @property
    def applying(self) -> str:
        """A running run, said for whoever would plan or look beside it."""
        return (f"run {self.id} is applying plan {self.plan_id.removeprefix('sha256:')[:12]} to this database right "
                f"now (since {self.started_at:%H:%M:%S %Z})")

    @property
    def completed(self) -> list[int]:
        return [int(s["index"]) for s in self.statements if s.get("status") == "applied"]


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


@dataclass(frozen=True)
class Layout:
    """What the metadata schema holds now: readers adapt to an older one instead of upgrading it."""

    version: int  # 0: no metadata schema (the tool never applied here)

    @property
    def runs(self) -> bool:
        return self.version >= 1

    @property
    def progress(self) -> bool:  # version 3: run_progress
        return self.version >= 3

    @property
    def sessions(self) -> bool:  # version 4: backend_start, cleanup, temporaries
        return self.version >= 4


def layout(conn: psycopg.Connection[Any], schema: str) -> Layout:
    ident = sql.Identifier(schema).as_string(conn)
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
                       (ident + ".schema_version", ident + ".runs")).fetchone()
    if not row or not row[1]:
        return Layout(0)
    if not row[0]:
        return Layout(1)
    found = conn.execute(sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version").format(
        sql.Identifier(schema))).fetchone()
    return Layout(int(found[0]) if found else 0)


def _select(schema: str, found: Layout, where: str, tail: str = "") -> sql.Composed:
    """Runs with the step records so far (a running run's are in run_progress; a run a version-2 tool started keeps
    its own in ``statements``) and, for a running row, whether its applier is alive."""
    alive = runlock.alive_predicate("r", with_start=found.sessions)
    if not found.progress:
        return sql.SQL("SELECT r.*, NULL::jsonb AS progress, CASE WHEN r.status = 'running' THEN " + alive
                       + " END AS alive FROM {} r WHERE " + where + tail).format(_table(schema))
    return sql.SQL(
        "SELECT r.*, CASE WHEN r.status = 'running' THEN r.statements || (SELECT coalesce(jsonb_agg(p.record "
        "ORDER BY p.position), '[]') FROM {} p WHERE p.run_id = r.id) END AS progress, "
        "CASE WHEN r.status = 'running' THEN " + alive + " END AS alive FROM {} r WHERE " + where + tail
    ).format(_progress(schema), _table(schema))


def ensure_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create or upgrade the metadata schema when it is not current; writes nothing when it is (so a role without
    CREATE on the database can apply once the schema exists)."""
    if layout(conn, schema).version == SCHEMA_VERSION:
        return
    ident = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        exists = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        if not (exists and exists[0]):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {}.schema_version (version integer PRIMARY KEY, "
                    "applied_at timestamptz NOT NULL DEFAULT now())").format(ident)
        )
        row = conn.execute(sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version").format(ident)).fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise ReconcilerError(
                f"the metadata schema {schema!r} is at version {current}, newer than this reconciler "
                f"({__version__}) knows ({SCHEMA_VERSION}): upgrade reconciler"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            conn.execute(sql.SQL(_MIGRATIONS[version]).format(schema=ident))
            conn.execute(sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(ident), (version,))


def writable(conn: psycopg.Connection[Any], schema: str) -> str | None:
    """Why this role cannot record a run here (None: it can), read without writing anything."""
    found = layout(conn, schema)
    if found.version > SCHEMA_VERSION:
        return (f"the metadata schema {schema!r} is at version {found.version}, newer than this reconciler "
                f"({__version__}) knows ({SCHEMA_VERSION}): upgrade reconciler")
    if found.version < SCHEMA_VERSION:
        row = conn.execute(
            "SELECT n.oid IS NULL, CASE WHEN n.oid IS NULL THEN has_database_privilege(current_database(), 'CREATE') "
            "ELSE pg_has_role(n.nspowner, 'USAGE') END FROM (SELECT 1) one LEFT JOIN pg_namespace n ON n.nspname = %s",
            (schema,)).fetchone()
        missing, allowed = (bool(row[0]), bool(row[1])) if row else (True, False)
        if allowed:
            return None
        if missing:
            return (f"the role {conn.info.user!r} may not create the metadata schema {schema!r}: it needs CREATE on "
                    f"database {conn.info.dbname!r} (once; or create the schema for it)")
        return (f"the metadata schema {schema!r} needs an upgrade to version {SCHEMA_VERSION}, which only its owner "
                f"can make; the role {conn.info.user!r} does not own it")
    lacking = [f"{privilege} on {schema}.{table}" for table, privilege in (
        ("runs", "INSERT"), ("runs", "UPDATE"), ("runs", "SELECT"), ("run_progress", "INSERT"), ("run_progress", "DELETE"))
        if not _has_table_privilege(conn, schema, table, privilege)]
    if lacking:
        return f"the role {conn.info.user!r} cannot record runs: it lacks {', '.join(lacking)}"
    return None


def _has_table_privilege(conn: psycopg.Connection[Any], schema: str, table: str, privilege: str) -> bool:
    name = sql.Identifier(schema, table).as_string(conn)
    row = conn.execute("SELECT has_schema_privilege(%s, 'USAGE') AND has_table_privilege(%s, %s)",
                       (schema, name, privilege)).fetchone()
    return bool(row and row[0])


def start_run(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    run_id: str | None = None,
    plan_id: str,
    environment: str,
    backend_pid: int,
    backend_start: datetime | None = None,
    git_commit: str | None,
    from_fingerprint: str,
    to_fingerprint: str,
    temporaries: Sequence[dict[str, Any]] = (),
) -> str:
    run_id = run_id or str(uuid.uuid4())
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, plan_id, environment, status, actor, client_host, tool_version, backend_pid, "
            "backend_start, git_commit, from_fingerprint, to_fingerprint, temporaries) "
            "VALUES (%s, %s, %s, 'running', %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
        ).format(_table(schema)),
        (run_id, plan_id, environment, actor(), socket.gethostname(), __version__, backend_pid, backend_start, git_commit,
         from_fingerprint, to_fingerprint, json.dumps(list(temporaries))),
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
    cleanup: Sequence[dict[str, Any]] | None = None,
    unless_cancelled: bool = False,
) -> bool:
    """The run's end, written only while the row still says running (and, ``unless_cancelled``, nobody has asked it
    to stop): False when another command had already settled it (its applier looked dead to it), which then
    stands, or when a cancel came first."""
    guard = " AND cancel_requested_at IS NULL" if unless_cancelled else ""
    row = conn.execute(
        sql.SQL("WITH done AS (DELETE FROM {} WHERE run_id = %s AND EXISTS (SELECT 1 FROM {} WHERE id = %s AND "
                "status = 'running'" + guard + ")) UPDATE {} SET status = %s, finished_at = clock_timestamp(), "
                "statements = %s::jsonb, error = %s, current_steps = NULL, cleanup = coalesce(%s::jsonb, cleanup) "
                "WHERE id = %s AND status = 'running'" + guard + " RETURNING id").format(
                    _progress(schema), _table(schema), _table(schema)),
        (run_id, run_id, status, json.dumps([s.to_json() for s in statements]), error,
         None if cleanup is None else json.dumps(list(cleanup)), run_id),
    ).fetchone()
    return row is not None


def list_runs(conn: psycopg.Connection[Any], schema: str, *, limit: int = 50) -> list[Run]:
    """Newest first; an empty list when the tool never ran against this database."""
    found = layout(conn, schema)
    if not found.runs:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_select(schema, found, "true", " ORDER BY started_at DESC LIMIT %s"), (limit,))
        rows = cur.fetchall()
    return [_run(r) for r in rows]


def recorded_work(conn: psycopg.Connection[Any], schema: str, *, runs: int = 50) -> list[dict[str, Any]]:
    """The applied step records of the last ``runs`` ended runs that say what work they did (``StepRecord.work``):
    what estimates learn this target's rates from, read without the rest of the runs' rows."""
    if not layout(conn, schema).runs:
        return []
    rows = conn.execute(sql.SQL(
        "SELECT e.value FROM (SELECT statements FROM {} WHERE status <> 'running' ORDER BY started_at DESC LIMIT %s) r, "
        "jsonb_array_elements(r.statements) e WHERE e.value ? 'work' AND e.value->>'status' = 'applied'").format(
            _table(schema)), (runs,)).fetchall()
    return [dict(row[0]) for row in rows]


def get_run(conn: psycopg.Connection[Any], schema: str, run_id: str) -> Run | None:
    found = layout(conn, schema)
    if not found.runs:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_select(schema, found, "id::text = %s"), (run_id,))
        row = cur.fetchone()
    return _run(row) if row else None


def held_contracts(conn: psycopg.Connection[Any], schema: str, *, limit: int = 200) -> dict[str, str]:
    """The tags (``_reconciler_old_<tag>``) of the contracts runs held (``apply --hold-contract``), each with the
    newest run that held it: what the kept column or table, its trigger and function belong to."""
    held: dict[str, str] = {}
    for run in reversed(list_runs(conn, schema, limit=limit)):  # oldest first: the newest run's name wins
        for step in run.statements:
            if step.get("status") == "held" and step.get("kind") == "contract":
                tag = str(step.get("object", "")).rsplit("_", 1)[-1]
                if len(tag) == 8:
                    held[tag] = run.id
    return held


def held_by(held: dict[str, str], name: str, change: str) -> str | None:
    """The run whose held contract kept this object (``held_contracts``), if it is one it kept: the drift it makes is
    there on purpose, for the way back."""
    if change != "unexpected":
        return None
    return next((run for tag, run in held.items() if tag in name), None)


MIN_PREFIX = 4  # as git: shorter prefixes match too much to be worth accepting


def find_run(conn: psycopg.Connection[Any], schema: str, given: str) -> Run:
    """The run a user named by its id or a unique prefix of it (as git accepts commit ids): ``history`` prints ids
    36 characters long, and nobody types them whole. An ambiguous prefix names its candidates; none is an error."""
    prefix = given.strip().lower()
    if len(prefix) < MIN_PREFIX or any(c not in "0123456789abcdef-" for c in prefix):
        raise ReconcilerError(f"{given!r} is not a run id: give the id `reconciler history` prints, or at least its "
                              f"first {MIN_PREFIX} characters")
    found = layout(conn, schema)
    runs: list[Run] = []
    if found.runs:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(_select(schema, found, "starts_with(r.id::text, %s)", " ORDER BY r.started_at DESC LIMIT 11"),
                        (prefix,))
            runs = [_run(r) for r in cur.fetchall()]
    if not runs:
        raise ReconcilerError(f"no run {given} in this database's history (database {conn.info.dbname}: `reconciler "
                              "history` lists its runs; `--env` names another environment's)")
    if len(runs) > 1:
        shown = ", ".join(f"{r.id} ({r.shown_status}, started {r.started_at:%Y-%m-%d %H:%M:%S})" for r in runs[:10])
        raise ReconcilerError(f"run id {given} is ambiguous: it begins the ids of "
                              f"{'more than 10' if len(runs) > 10 else len(runs)} runs: {shown}; give more of it")
    return runs[0]


def runs_for_plan(conn: psycopg.Connection[Any], schema: str, plan_id: str) -> list[Run]:
    found = layout(conn, schema)
    if not found.runs:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_select(schema, found, "plan_id = %s", " ORDER BY started_at"), (plan_id,))
        return [_run(r) for r in cur.fetchall()]


def running_runs(conn: psycopg.Connection[Any], schema: str) -> list[Run]:
    """Rows that say running, oldest first, each with whether its applier is alive."""
    found = layout(conn, schema)
    if not found.runs:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_select(schema, found, "status = 'running'", " ORDER BY started_at"))
        return [_run(r) for r in cur.fetchall()]


def with_cleanup(conn: psycopg.Connection[Any], schema: str) -> list[Run]:
    """Finished runs that left something to remove."""
    found = layout(conn, schema)
    if not found.sessions:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_select(schema, found, "status <> 'running' AND cleanup @> '[{{\"status\": \"pending\"}}]'",
                            " ORDER BY started_at"))
        return [_run(r) for r in cur.fetchall()]


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
        backend_start=row.get("backend_start"),
        cleanup=tuple(row.get("cleanup") or ()),
        temporaries=tuple(row.get("temporaries") or ()),
        alive=row.get("alive"),
        backfill=row.get("backfill"),
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


def insert_records(conn: psycopg.Connection[Any], schema: str, run_id: str, *, added: Sequence[StepRecord],
                   position: int) -> None:
    """Step records alone, no write to the run's row: what a transactional phase writes inside its own transaction,
    so its steps and their record commit together (the row stays free for ``cancel`` meanwhile)."""
    conn.execute(
        sql.SQL("INSERT INTO {} (run_id, position, record) SELECT %s, %s + e.ordinality - 1, e.value "
                "FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e").format(_progress(schema)),
        (run_id, position, json.dumps([s.to_json() for s in added])),
    )


def record_backup(conn: psycopg.Connection[Any], schema: str, run_id: str, *, path: str, sha256: str, size: int) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET backup_path = %s, backup_sha256 = %s, backup_bytes = %s WHERE id = %s").format(_table(schema)),
        (path, sha256, size, run_id),
    )


def record_verification(conn: psycopg.Connection[Any], schema: str, run_id: str, result: dict[str, Any]) -> None:
    conn.execute(sql.SQL("UPDATE {} SET verification = %s::jsonb WHERE id = %s").format(_table(schema)),
                 (json.dumps(result), run_id))


def record_cleanup(conn: psycopg.Connection[Any], schema: str, run_id: str, entries: Sequence[dict[str, Any]], *,
                   note: str = "") -> None:
    """The run's list of what it left and whether each is removed yet (the whole list: a few entries); ``note``, what
    was removed now, is added to the run's error, where history shows it."""
    conn.execute(sql.SQL("UPDATE {} SET cleanup = %s::jsonb, error = CASE WHEN %s = '' THEN error "
                         "ELSE coalesce(error || '; ', '') || %s END WHERE id = %s").format(_table(schema)),
                 (json.dumps(list(entries)), note, note, run_id))


def move_applier(conn: psycopg.Connection[Any], schema: str, run_id: str, pid: int, started: datetime) -> bool:
    """The run goes on in a new session (its first was lost): False when the row was settled meanwhile."""
    row = conn.execute(sql.SQL("UPDATE {} SET backend_pid = %s, backend_start = %s WHERE id = %s AND status = 'running' "
                               "RETURNING id").format(_table(schema)), (pid, started, run_id)).fetchone()
    return row is not None


def request_cancel(conn: psycopg.Connection[Any], schema: str, run_id: str) -> bool:
    """Ask a running run to stop; False when it had ended. With ``finish_run(unless_cancelled=True)`` exactly one of
    the two wins: a run asked to stop before it recorded its end ends cancelled, never applied."""
    row = conn.execute(sql.SQL("UPDATE {} SET cancel_requested_at = clock_timestamp() WHERE id = %s AND status = 'running' "
                               "RETURNING id").format(_table(schema)), (run_id,)).fetchone()
    return row is not None


def record_backfill(conn: psycopg.Connection[Any], schema: str, run_id: str, progress: dict[str, Any]
                    ) -> tuple[dict[str, Any], bool]:
    """A backfill's progress, written; returns what an operator asked of it (``request_backfill``) and whether the
    run was asked to stop, read in the same statement."""
    row = conn.execute(sql.SQL(
        "UPDATE {} SET backfill = jsonb_set(coalesce(backfill, '{{}}'), '{{progress}}', %s::jsonb) WHERE id = %s "
        "RETURNING coalesce(backfill->'requested', '{{}}'), cancel_requested_at IS NOT NULL").format(_table(schema)),
        (json.dumps(progress), run_id)).fetchone()
    return (dict(row[0]), bool(row[1])) if row else ({}, False)


def last_checkpoint(conn: psycopg.Connection[Any], schema: str, key: str) -> tuple[str, dict[str, Any]] | None:
    """The newest ended run's progress through the fill ``key`` names, where it stopped before the end: (run id,
    progress)."""
    row = conn.execute(sql.SQL(
        "SELECT id::text, backfill->'progress' FROM {} WHERE status <> 'running' AND backfill->'progress'->>'key' = %s "
        "AND backfill->'progress'->>'state' <> 'done' ORDER BY started_at DESC LIMIT 1").format(_table(schema)),
        (key,)).fetchone()
    return (str(row[0]), dict(row[1])) if row else None


def request_backfill(conn: psycopg.Connection[Any], schema: str, run_id: str, changes: dict[str, Any]) -> bool:
    """Ask a running run's backfill to pause, go on, or take batches of another length; False when it had ended."""
    row = conn.execute(sql.SQL(
        "UPDATE {} SET backfill = jsonb_set(coalesce(backfill, '{{}}'), '{{requested}}', "
        "coalesce(backfill->'requested', '{{}}') || %s::jsonb) WHERE id = %s AND status = 'running' RETURNING id"
    ).format(_table(schema)), (json.dumps(changes), run_id)).fetchone()
    return row is not None


def cancel_requested(conn: psycopg.Connection[Any], schema: str, run_id: str) -> bool:
    row = conn.execute(sql.SQL("SELECT cancel_requested_at IS NOT NULL FROM {} WHERE id = %s").format(_table(schema)),
                       (run_id,)).fetchone()
    return bool(row and row[0])


def mark_interrupted(conn: psycopg.Connection[Any], schema: str, run_id: str, message: str, *,
                     added: Sequence[StepRecord] = (), cleanup: Sequence[dict[str, Any]] = ()) -> bool:
    """The run ends as interrupted, its recorded steps (and ``added``: in-flight steps found completed) moved into
    ``statements`` like any finished run's; only while it still says running and its applier is not alive, so a
    living run is never marked, whatever the caller believed. False: not marked."""
    found = layout(conn, schema)
    alive = runlock.alive_predicate("r", with_start=found.sessions)
    extra = json.dumps([s.to_json() for s in added])
    if not found.progress:  # version 2: the steps are in ``statements`` already
        row = conn.execute(
            sql.SQL("UPDATE {} r SET status = 'interrupted', finished_at = clock_timestamp(), error = %s, "
                    "current_steps = NULL, statements = statements || %s::jsonb WHERE id = %s AND status = 'running' "
                    "AND NOT " + alive + " RETURNING id").format(_table(schema)),
            (message, extra, run_id),
        ).fetchone()
        return row is not None
    set_cleanup = ", cleanup = %s::jsonb" if found.sessions else ""
    row = conn.execute(
        sql.SQL("WITH claimed AS (SELECT id FROM {} r WHERE id = %s AND status = 'running' AND NOT " + alive + " FOR UPDATE), "
                "done AS (DELETE FROM {} WHERE run_id IN (SELECT id FROM claimed) RETURNING position, record) "
                "UPDATE {} SET status = 'interrupted', finished_at = clock_timestamp(), error = %s, current_steps = NULL, "
                "statements = statements || (SELECT coalesce(jsonb_agg(record ORDER BY position), '[]') FROM done) "
                "|| %s::jsonb" + set_cleanup + " WHERE id IN (SELECT id FROM claimed) RETURNING id"
                ).format(_table(schema), _progress(schema), _table(schema)),
        (run_id, message, extra, *([json.dumps(list(cleanup))] if found.sessions else [])),
    ).fetchone()
    return row is not None
