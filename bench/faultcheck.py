"""The invariants bench/faults.py checks after each fault, and the reading of the run history they need.

Kept apart from the campaign so each check reads as the rule it enforces. A check returns one line per broken rule
(an empty list: it holds). The run history and the catalogs are read with plain SQL, never through
``reconciler.history`` or ``reconciler.apply``: a defect in the code under test must not hide itself from its own
check. Only fingerprints come from ``reconciler.inspect.snapshot``, the definition the plan binds to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from reconciler import inspect

METADATA = "reconciler"
CONCURRENT = ("plan", "drift", "watch", "apply2")
# the applier's exit code after each signal; -2 is a death by SIGINT before the command could catch it (a shell says 130)
# -15 likewise: a SIGTERM before the interpreter ran the command's handler (no run can exist then: checked below)
SIGNALS = {"sigkill": {-9}, "sigterm": {130, -15}, "sigint": {130, -2}}
EARLY = ("before-run", "backup")  # phases in which the run had no row yet, or none of its steps had started
APPLY_LOCK = 0x7265636F6E63_00  # the apply's session advisory lock (reconciler.runlock.LOCK_KEY, written out: see above)
HELPER_SUFFIX = "notnull_check"  # the compiler's CHECK (col IS NOT NULL) NOT VALID on the way to SET NOT NULL


def connect(dsn: str, *, timeout: int = 5) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=timeout, application_name="faults harness")


def short(text: str, width: int = 240) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def last_line(text: str) -> str:
    """The line that says what happened: the last 'error: ...' line (a DETAIL or HINT may follow it), else the last."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return short((errors or lines)[-1], 200) if lines else "(no output)"


# --- the run history, read by SQL ----------------------------------------------------------

def _tables(conn: psycopg.Connection[Any]) -> tuple[bool, bool]:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
                       (f"{METADATA}.runs", f"{METADATA}.run_progress")).fetchone()
    return (bool(row[0]), bool(row[1])) if row else (False, False)


def read_runs(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every run row, oldest first, as JSON (so a column added by a newer tool, ``cleanup`` say, comes along); a
    running run's step records are still in run_progress, and are appended to its ``statements`` here."""
    runs, progress = _tables(conn)
    if not runs:
        return []
    rows = [r[0] for r in conn.execute(
        sql.SQL("SELECT to_jsonb(r) FROM {}.runs r ORDER BY r.started_at").format(sql.Identifier(METADATA))).fetchall()]
    if progress:
        for row in rows:
            if row.get("status") == "running":
                extra = conn.execute(
                    sql.SQL("SELECT record FROM {}.run_progress WHERE run_id = %s ORDER BY position").format(
                        sql.Identifier(METADATA)), (row["id"],)).fetchall()
                row["statements"] = list(row.get("statements") or []) + [r[0] for r in extra]
    return rows


@dataclass(frozen=True)
class Observation:
    """What the newest run row said at one moment, and the phase of the apply that makes."""

    label: str
    run_id: str | None = None
    status: str | None = None
    backend_pid: int | None = None
    current: tuple[dict[str, Any], ...] = ()
    records: int = 0


def phase_label(current: Sequence[Mapping[str, Any]]) -> str:
    """A phase in flight, named by what it does: one step by its kind, several by the group they form."""
    kinds = [str(s.get("kind")) for s in current]
    if len(kinds) == 1:
        return kinds[0]
    if all(k.startswith("rename_") for k in kinds):
        return "rename"
    if "set_not_null" in kinds and set(kinds) <= {"set_not_null", "drop_constraint"}:
        return "set_not_null"
    if "cutover" in kinds:
        return "cutover"
    if "contract" in kinds:
        return "contract"
    if kinds and kinds[0] == "add_column" and "create_trigger" in kinds and "reconciler_new_" in str(current[0].get("object")):
        return "expand"
    if kinds and kinds[0] == "lock_table" and "create_schema" in kinds:
        return "shadow expand"
    return "main-transaction"


def observe(conn: psycopg.Connection[Any], total_steps: int) -> Observation:
    """The newest run row (tolerating no history table at all) classified into a phase. With no row yet, a pg_dump
    connected to the database means the apply is taking its backup (today's apply records the row after it)."""
    runs, progress = _tables(conn)
    row = None
    if runs:
        row = conn.execute(sql.SQL(
            "SELECT id::text, status, backend_pid, current_steps, jsonb_array_length(statements) "
            "FROM {}.runs ORDER BY started_at DESC LIMIT 1").format(sql.Identifier(METADATA))).fetchone()
    if row is None:
        dumping = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND application_name = 'pg_dump'").fetchone()
        return Observation("backup" if dumping and dumping[0] else "before-run")
    run_id, status, pid, current, records = row
    if progress:
        extra = conn.execute(sql.SQL("SELECT count(*) FROM {}.run_progress WHERE run_id = %s").format(
            sql.Identifier(METADATA)), (run_id,)).fetchone()
        records += int(extra[0]) if extra else 0
    current = tuple(current or ())
    if status != "running":
        label = "after-run"
    elif current:
        label = phase_label(current)
    elif records == 0:
        label = "backup"
    elif records >= total_steps:
        label = "verify"
    else:
        label = "between-steps"
    return Observation(label, run_id, status, pid, current, records)


# --- schemas ---------------------------------------------------------------------------------

def snapshot(dsn: str) -> inspect.SchemaSnapshot:
    with connect(dsn) as conn:
        return inspect.snapshot(conn, exclude_schemas=(METADATA,))


def _unlike(expected: Mapping[Any, str], actual: Mapping[Any, str]) -> list[str]:
    names = []
    for key in sorted(set(expected) | set(actual), key=str):
        label = " ".join(key) if isinstance(key, tuple) else str(key)
        if key not in actual:
            names.append(f"{label} (missing)")
        elif key not in expected:
            names.append(f"{label} (unexpected)")
        elif expected[key] != actual[key]:
            names.append(f"{label} (different)")
    return names


def differences(expected: Mapping[Any, str], actual: Mapping[Any, str], limit: int = 4) -> str:
    """'kind name (missing|unexpected|different)' for the objects two snapshots disagree on."""
    names = _unlike(expected, actual)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@contextlib.contextmanager
def scratch_copy(admin_dsn: str, template: str) -> Iterator[str]:
    """A throwaway copy of ``template`` on the target's server, dropped afterwards."""
    name = f"faults_replay_{int(time.time() * 1000) % 10**9}"
    with connect(admin_dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    try:
        yield psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    finally:
        with connect(admin_dsn) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def recorded_sql(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the runs' records say changed the database, run after run (they never overlap: apply's lock): every
    statement whose status is ``applied``, then every ``done`` entry of ``cleanup`` (a list the apply may add;
    absent today)."""
    found = []
    for run in runs:
        found += [str(s["sql"]) for s in run.get("statements") or () if s.get("status") == "applied"]
        cleanup = run.get("cleanup") or ()
        if isinstance(cleanup, str):
            cleanup = json.loads(cleanup)
        found += [str(c["sql"]) for c in cleanup if isinstance(c, Mapping) and c.get("status") == "done"]
    return found


def replay(admin_dsn: str, template: str, statements: Sequence[str]) -> tuple[inspect.SchemaSnapshot | None, str]:
    """Run ``statements`` on a copy of the template, each alone in autocommit (CREATE INDEX CONCURRENTLY and ALTER TYPE
    ... ADD VALUE cannot run in a transaction block), and snapshot the result; (None, why) when one fails."""
    with scratch_copy(admin_dsn, template) as dsn, connect(dsn) as conn:
        for number, statement in enumerate(statements, 1):
            if statement.lstrip().upper().startswith("LOCK TABLE"):  # a cut-over's first statement: no schema in it,
                continue  # and a LOCK outside a transaction block is refused
            try:
                conn.execute(statement.encode())
            except psycopg.Error as exc:
                return None, f"statement {number} of the record failed on a copy of the seed: {short(str(exc), 120)}"
        return inspect.snapshot(conn, exclude_schemas=(METADATA,)), ""


# --- the checks ------------------------------------------------------------------------------

@dataclass
class References:
    """What the campaign knows before any trial: the seed's and the desired schema's catalogs, and where to copy."""

    admin_dsn: str  # the target server's postgres database
    replay_template: str  # a database with the seed's schema (no rows needed to replay DDL)
    planned_fingerprint: str  # the plan's body.desired.schema_fingerprint
    desired: inspect.SchemaSnapshot  # DESIRED loaded into a database of its own
    not_valid_allowed: frozenset[str]  # NOT VALID constraints before or desired hold (table.constraint)
    helpers_allowed: frozenset[str]  # *_notnull_check constraints before or desired hold
    applied: inspect.SchemaSnapshot | None = None  # the trial database after an undisturbed apply


def check_schema(refs: References, before: inspect.SchemaSnapshot, live: inspect.SchemaSnapshot,
                 runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(a) live is the schema before, the planned one, the undisturbed apply's, or exactly what the run's record says.
    Returns (violations, notes); the notes say where the record and live disagree although live is a known state."""
    known = {before.fingerprint: "before", refs.planned_fingerprint: "planned"}
    if refs.applied is not None:
        known.setdefault(refs.applied.fingerprint, "applied")
    statements = recorded_sql(runs)
    replayed, why = replay(refs.admin_dsn, refs.replay_template, statements) if statements else (before, "")
    if live.fingerprint in known:
        if replayed is not None and replayed.fingerprint != live.fingerprint:
            return [], [f"live is the {known[live.fingerprint]} schema but the run's record replays to something else: "
                        + differences(replayed.objects, live.objects)]
        return [], ([f"the run's record cannot be replayed: {why}"] if replayed is None else [])
    if replayed is not None and replayed.fingerprint == live.fingerprint:
        return [], []
    nearest = min(((before, "before"), (refs.applied or refs.desired, "planned")),
                  key=lambda c: len(_unlike(c[0].objects, live.objects)))
    record = (f"the record ({len(statements)} statement(s)) cannot be replayed: {why}" if replayed is None else
              f"vs the run's record ({len(statements)} statement(s)): {differences(replayed.objects, live.objects)}")
    return [f"live schema is not before, planned, or what the run records; {record}; vs {nearest[1]}: "
            f"{differences(nearest[0].objects, live.objects)}"], []


def _validation_pending(runs: Sequence[Mapping[str, Any]], name: str) -> bool:
    """A run records the constraint added NOT VALID and its VALIDATE not done: a planned state on the way (the
    constraint is the desired one, enforced on new rows; the next plan validates it), not a half-made object."""
    constraint = name.rpartition(".")[2]
    added = validated = False
    for run in runs:
        for step in run.get("statements") or ():
            if step.get("status") != "applied" or not str(step.get("object", "")).endswith(f".{constraint}"):
                continue
            if step.get("kind") in ("add_foreign_key", "add_check_constraint"):
                added = True
            elif step.get("kind") == "validate_constraint":
                validated = True
    return added and not validated


def check_leftovers(refs: References, dsn: str, runs: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """(c) no INVALID index, no helper NOT NULL check and no NOT VALID constraint that neither before nor desired has,
    unless the run records it added NOT VALID with its validation still to come."""
    found = []
    with connect(dsn) as conn:
        invalid = [r[0] for r in conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid ORDER BY 1").fetchall()]
        constraints = conn.execute(
            "SELECT conrelid::regclass::text || '.' || conname, conname, convalidated FROM pg_constraint "
            "WHERE conrelid <> 0 AND connamespace <> coalesce(to_regnamespace(%s), 0) ORDER BY 1", (METADATA,)).fetchall()
    if invalid:
        found.append(f"INVALID index(es): {', '.join(invalid)}")
    helpers = [name for name, con, _ in constraints if con.endswith(HELPER_SUFFIX) and name not in refs.helpers_allowed]
    if helpers:
        found.append(f"leftover helper CHECK constraint(s): {', '.join(helpers)}")
    not_valid = [name for name, _, valid in constraints if not valid and name not in refs.not_valid_allowed
                 and name not in helpers and not _validation_pending(runs, name)]
    if not_valid:
        found.append(f"NOT VALID constraint(s) neither before nor desired has: {', '.join(not_valid)}")
    return found


def check_advisory_lock(dsn: str, database: str, grace: float = 5.0) -> list[str]:
    """(d) no granted advisory lock in the trial database once every command is done (a killed client's backend may
    take a moment to notice, so wait up to ``grace`` seconds before saying it is still held)."""
    deadline = time.monotonic() + grace
    while True:
        with connect(dsn) as conn:
            held = conn.execute(
                "SELECT l.pid, coalesce(a.application_name, '?'), coalesce(a.state, '?'), coalesce(left(a.query, 80), ''), "
                "(l.classid::bigint << 32) | l.objid::bigint FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = %s)",
                (database,)).fetchall()
        if not held or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return [f"advisory lock {key:#x} still held by pid {pid} ({app!r}, {state}, {short(query, 60)!r}) after every "
            f"command exited" for pid, app, state, query, key in held]


# --- rows no writer writes -------------------------------------------------------------------

def check_unwritten(dsn: str, sessions: int) -> list[str]:
    """``sessions``, which no writer writes and the plan builds again (a shadow table), holds every row it was seeded
    with, as seeded, whatever phase the fault stopped the apply in."""
    with connect(dsn) as conn:
        row = conn.execute("SELECT count(*), coalesce(sum(id), 0), count(*) FILTER (WHERE note <> 'session ' || id "
                           "OR started_at <> timestamptz '2025-01-01 00:00+00' + id * interval '12 hours') "
                           "FROM sessions").fetchone()
    count, total, changed = (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
    if (count, total, changed) != (sessions, sessions * (sessions + 1) // 2, 0):
        return [f"sessions holds {count} rows (id sum {total}, {changed} changed), seeded with {sessions}"]
    return []


# --- writers' acknowledged rows --------------------------------------------------------------

def row_digest(key: str, value: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\x1f{value}".encode(), digest_size=8).digest(), "big")


@dataclass
class WriterLog:
    """One writer's log: rows the server acknowledged (table -> key -> value) and inserts whose outcome is unknown
    (the connection broke before the answer: committed or not, nobody was told)."""

    acknowledged: dict[str, dict[str, str]] = field(default_factory=lambda: {"events": {}, "orders": {}})
    unknown: dict[str, set[str]] = field(default_factory=lambda: {"events": set(), "orders": set()})

    @classmethod
    def read(cls, path: Path) -> WriterLog:
        log = cls()
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[0] == "ack":
                log.acknowledged[parts[1]][parts[2]] = parts[3]
            elif len(parts) == 3 and parts[0] == "unknown":
                log.unknown[parts[1]].add(parts[2])
        return log


def writer_rows(conn: psycopg.Connection[Any], writer: int, orders_base: int, span: int) -> dict[str, dict[str, str]]:
    """The rows in the tables that this writer's inserts made (events by payload prefix, orders by id range), as
    key -> value in the log's terms (events: id -> payload, orders: id -> note|total, by unknown-key: payload/id)."""
    events = {str(i): str(p) for i, p in conn.execute(
        "SELECT id, payload FROM events WHERE payload LIKE %s", (f"w{writer}-%",)).fetchall()}
    orders = {str(i): f"{n}|{t}" for i, n, t in conn.execute(
        "SELECT id, note, total FROM orders WHERE id >= %s AND id < %s", (orders_base, orders_base + span)).fetchall()}
    return {"events": events, "orders": orders}


def check_writes(dsn: str, logs: Mapping[int, Path], orders_base: Mapping[int, int], span: int) -> tuple[list[str], int]:
    """(e) every insert the server acknowledged to a writer is in its table with the value written: per writer and
    table, count and checksum over the acknowledged keys must equal the log's; rows the log does not acknowledge
    are allowed only for inserts whose answer was lost. Returns (violations, acknowledged rows checked)."""
    found: list[str] = []
    checked = 0
    with connect(dsn) as conn:
        for writer, path in sorted(logs.items()):
            log = WriterLog.read(path)
            present = writer_rows(conn, writer, orders_base[writer], span)
            for table in ("events", "orders"):
                acked, rows = log.acknowledged[table], present[table]
                checked += len(acked)
                log_sum = sum(row_digest(k, v) for k, v in acked.items()) % 2**64
                held = {k: rows[k] for k in acked if k in rows}
                table_sum = sum(row_digest(k, v) for k, v in held.items()) % 2**64
                missing = [k for k in acked if k not in rows]
                changed = [k for k in held if held[k] != acked[k]]
                if missing or changed or table_sum != log_sum:
                    found.append(f"writer {writer} {table}: {len(acked)} acknowledged, {len(held)} present "
                                 f"(checksum {table_sum:#018x} vs log {log_sum:#018x}); missing {missing[:5]}"
                                 + (f", value changed {changed[:5]}" if changed else ""))
                unlogged = [k for k in rows if k not in acked]
                if table == "events":  # an event's id comes from the server: a lost answer is known by its payload
                    unlogged = [k for k in unlogged if rows[k] not in log.unknown[table]]
                else:
                    unlogged = [k for k in unlogged if k not in log.unknown[table]]
                if unlogged:
                    found.append(f"writer {writer} {table}: {len(unlogged)} row(s) nobody was told were written "
                                 f"and no insert lost its answer for: {unlogged[:5]}")
    return found, checked


# --- the run's final status ------------------------------------------------------------------

@dataclass
class Outcome:
    """Everything (b) needs to judge one trial: the fault as injected, the commands' results, the history after the
    recovering command, and the statuses the run went through while the trial ran."""

    fault: str  # the kind, with "+appname" for the variant
    phase: str
    reached: bool  # the fault met the applying process or its run (see faults.py: inject)
    row_at_fault: bool
    fault_done: float  # epoch seconds when the fault was over (server back, cancel returned)
    runs: list[dict[str, Any]]
    applier_code: int | None  # None: did not exit in time and was killed by the harness
    applier_out: str
    applier_err: str
    recovering: str
    second_code: int | None = None  # the concurrent command (apply2, plan, drift, watch, cancel), if any
    second_out: str = ""
    second_err: str = ""
    seen: dict[str, list[str]] = field(default_factory=dict)  # run id -> statuses in the order they were seen
    backups: str = ""  # the backups folder's path, left out when looking for the word "backup" in an error
    before_fingerprint: str = ""
    live_fingerprint: str = ""
    detail: str = ""  # what the fault did, as the harness saw it (the lock: who waited on it, how long it was held)
    desired_fingerprints: tuple[str, ...] = ()  # the planned schema's, and the undisturbed apply's result


def _started(run: Mapping[str, Any]) -> float:
    return datetime.fromisoformat(str(run["started_at"])).timestamp()


def _cancel_timing(run: Mapping[str, Any], said: str) -> str:
    """When the cancel request was recorded against when the run finished, and what `cancel` printed."""
    asked, ended = run.get("cancel_requested_at"), run.get("finished_at")
    timing = (f"cancel recorded {datetime.fromisoformat(str(ended)).timestamp() - datetime.fromisoformat(str(asked)).timestamp():.2f}s "
              "before the run finished" if asked and ended else f"cancel_requested_at {asked}, finished_at {ended}")
    return timing + "; `cancel` said: " + " / ".join(line.strip() for line in said.splitlines() if line.strip())


def _refused_or_waited(code: int | None, out: str, err: str) -> bool:
    return code == 3 or (code == 1 and "lock" in err.lower()) or (code == 0 and "Nothing to apply" in out)


def check_outcome(o: Outcome) -> list[str]:
    """(b) the run's final status and the applier's exit code fit the fault."""
    kind = o.fault.split("+")[0]
    found = []
    alive_left = [r["id"] for r in o.runs if r.get("status") == "running"]
    if alive_left:
        found.append(f"run(s) {', '.join(alive_left)} still 'running' in {METADATA}.runs after `{o.recovering}` "
                     f"although the applier exited ({o.applier_code})")
    if o.applier_code is None:
        found.append("the applier did not exit in time (killed by the harness)")
    run = o.runs[0] if o.runs else None
    status = run.get("status") if run else None
    statuses: set[str | None]
    codes: set[int]
    if kind in SIGNALS:
        if o.phase == "after-run" or not o.reached:  # the run had ended (the process may still have been exiting)
            statuses, codes = {"applied"}, ({0} | SIGNALS[kind] if o.reached else {0})
        else:
            statuses = {"interrupted" if kind == "sigkill" else "cancelled"}
            statuses |= {None} if not o.row_at_fault else set()
            codes = SIGNALS[kind]
    elif kind == "cancel":
        if not o.reached or o.phase == "after-run":  # `cancel` found no running apply: nothing to stop
            statuses, codes = {"applied"}, {0}
        else:
            statuses, codes = {"cancelled"}, {1}
    elif kind == "terminate":
        statuses, codes = ({"failed", "rolled back", "interrupted"}, {1}) if o.reached else ({"applied"}, {0})
    elif kind == "restart":
        if o.phase == "after-run" or not o.reached:
            statuses, codes = {"applied"}, {0}
        elif not o.row_at_fault:  # the apply may not have connected yet, or had not written its row
            statuses, codes = {None, "interrupted", "applied"}, {0, 1}
            if status == "applied" and run is not None and _started(run) < o.fault_done:
                found.append(f"run {run['id']} started before the server came back, yet says 'applied'")
        else:
            statuses, codes = {"interrupted"}, {1}
    elif kind in CONCURRENT:
        statuses, codes = {"applied"}, {0}
        found += _concurrent(o, kind)
    elif kind == "lock":  # reached: some session of the apply (its backend, its pg_dump) waited on the lock
        if o.reached:
            statuses, codes = {"failed", "rolled back", None}, {1}
        else:
            statuses, codes = {"applied"}, {0}
    elif kind == "backup-unwritable":
        statuses, codes = {None, "failed"}, {1, 3}
        error = o.applier_err.replace(o.backups, "") if o.backups else o.applier_err
        if o.applier_code in codes and "backup" not in error.lower():
            found.append(f"the apply's error does not name the backup: {last_line(error)}")
        if o.live_fingerprint != o.before_fingerprint:
            found.append("the schema changed although the backup could not be written")
        if run is not None and [s for s in run.get("statements") or () if s.get("status") == "applied"]:
            found.append(f"run {run['id']} records applied steps although the backup could not be written")
    else:
        statuses, codes = {"applied"}, {0}
    if kind == "apply2" and o.phase in EARLY and o.second_code == 0 and "Applied plan" in o.second_out:
        codes = {0, 1, 3}  # the second apply won the race for the lock: the first must have refused or waited (below)
    if status not in statuses and status != "running":  # a run left running is reported above
        shown = "no run recorded" if run is None else f"run {run['id']} is {status!r}"
        found.append(f"{shown}, expected {' or '.join(sorted(repr(s) if s else 'no run' for s in statuses))}"
                     + (f" (error: {short(str(run.get('error')), 160)})" if run and run.get("error") else "")
                     + (f" ({o.detail})" if kind == "lock" and o.detail else "")
                     + (f" ({_cancel_timing(run, o.second_out)})" if kind == "cancel" and run else ""))
    if status == "applied" and o.desired_fingerprints and o.live_fingerprint not in o.desired_fingerprints:
        found.append(f"run {run['id'] if run else '?'} says 'applied' but live is not the planned schema"
                     + (" (it is the schema from before)" if o.live_fingerprint == o.before_fingerprint else ""))
    if kind in ("sigterm", "sigint") and o.applier_code in (-15, -2) and run is not None:
        found.append(f"the applier died of the signal (exit {o.applier_code}) without finishing run {run['id']}")
    if o.applier_code is not None and o.applier_code not in codes:
        found.append(f"the applier exited {o.applier_code}, expected {' or '.join(map(str, sorted(codes)))}: "
                     f"{last_line(o.applier_err or o.applier_out)}")
    if kind not in ("apply2", "watch") and len(o.runs) > 1:
        found.append(f"{len(o.runs)} runs recorded for one apply")
    return found


def _concurrent(o: Outcome, kind: str) -> list[str]:
    """A command run beside the apply must not change its run, nor record a run of its own; a second apply refuses
    or waits (or finds nothing to do)."""
    found = []
    main = o.runs[0] if o.runs else None
    if main is not None:
        seen = [s for s in o.seen.get(str(main["id"]), []) if s != "running"]
        if len(set(seen)) > 1:
            found.append(f"run {main['id']} went through {' -> '.join(['running', *seen])} while `{o.fault}` ran beside it")
        if main.get("error"):
            found.append(f"run {main['id']} records an error: {short(str(main['error']), 160)}")
        # the monitor polls; what the command itself says it did to the run is not missed between two polls
        said = [line for line in o.second_err.splitlines() if str(main["id"]) in line and "interrupt" in line.lower()]
        if said:
            found.append(f"`{o.fault}` says it marked the live run interrupted: {short(said[0], 200)}")
    # a run of its own is harmless when it changed nothing (a refusal recorded, say); one that applied steps is not
    own = [r for r in o.runs[1:] if r.get("status") in ("applied", "running")
           or any(s.get("status") == "applied" for s in r.get("statements") or ())]
    if own:
        found.append(f"`{o.fault}` recorded run(s) of its own that applied steps: "
                     + ", ".join(f"{r['id']} ({r.get('status')})" for r in own))
    if kind == "apply2":
        first_won = o.applier_code == 0 and "Applied plan" in o.applier_out
        second_won = o.second_code == 0 and "Applied plan" in o.second_out
        if first_won and not _refused_or_waited(o.second_code, o.second_out, o.second_err):
            found.append(f"the second apply neither refused nor waited: exit {o.second_code}: "
                         f"{last_line(o.second_err or o.second_out)}")
        elif second_won and not (o.phase in EARLY and _refused_or_waited(o.applier_code, o.applier_out, o.applier_err)):
            found.append(f"the second apply applied the plan too (first apply exit {o.applier_code}, phase {o.phase})")
    return found
