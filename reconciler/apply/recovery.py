"""Runs whose applier is gone, and what stopped runs left behind: found and settled by whichever command looks
first (plan, diff, drift, verify, history, cancel, watch, or the next apply).

A running row whose session no longer holds the apply lock is marked interrupted (``runlock`` decides, never a
session's name). What its step under way did is read from the catalog, not guessed: a concurrent index build
found valid completed, one found INVALID left debris; a transactional phase's records commit with it, so a
phase missing from the row did not commit. What a stopped run left that is neither planned nor live before (an
INVALID index, the helper CHECK of a SET NOT NULL whose drop never ran) goes on the run's ``cleanup`` list and is
removed by a command holding the apply lock, at once when it can take it, else by the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from .. import history, runlock
from ..history import StepRecord
from ..safety import Step

log = logging.getLogger(__name__)

_CONSTRAINT_ADDS = frozenset({"add_check_constraint", "add_foreign_key", "add_unique_constraint", "add_primary_key",
                              "add_exclusion_constraint", "add_constraint"})
_INDEX_CREATES = frozenset({"create_index", "create_index_concurrently"})
_INDEX_DROPS = frozenset({"drop_index", "drop_index_concurrently"})


@dataclass(frozen=True)
class Outcome:
    """What a step under way when its run stopped turned out to have done."""

    records: tuple[StepRecord, ...] = ()  # steps found done (their record was never written)
    cleanup: tuple[dict[str, Any], ...] = ()  # what they left that must go
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settled:
    interrupted: tuple[history.Run, ...] = ()  # marked by this call
    removed: tuple[str, ...] = ()  # leftovers removed by this call
    pending: tuple[str, ...] = ()  # leftovers still there (the lock was busy, or removing failed)
    runs: tuple[str, ...] = field(default=())  # ids of the runs whose leftovers were looked at


def in_flight(step: Mapping[str, Any]) -> dict[str, Any]:
    """What the row says of a step under way: enough to find its object again after a crash."""
    return {"index": step["index"], "kind": step["kind"], "object": step["object"],
            "transactional": step["transactional"], "identity": list(step.get("identity") or ()), "sql": step["sql"]}


def step_entry(step: Step) -> dict[str, Any]:
    return in_flight({"index": step.index, "kind": step.kind, "object": step.object,
                      "transactional": step.transactional, "identity": step.identity, "sql": step.sql})


def temporaries(steps: Sequence[Step]) -> list[dict[str, Any]]:
    """Objects the plan makes only to drop them later (the validated CHECK that spares SET NOT NULL its scan): if
    the run stops between the two, the object is neither in the old schema nor the new one."""
    made: dict[tuple[str, tuple[str, ...]], Step] = {}
    found = []
    for step in steps:
        if not step.identity:
            continue
        if step.kind in _CONSTRAINT_ADDS or step.kind in _INDEX_CREATES:
            made[("constraint" if step.kind in _CONSTRAINT_ADDS else "index", step.identity)] = step
        elif step.kind == "drop_constraint" or step.kind in _INDEX_DROPS:
            what = "constraint" if step.kind == "drop_constraint" else "index"
            first = made.get((what, step.identity))
            if first is not None:
                found.append({"created_by": first.index, "dropped_by": step.index, "what": what,
                              "object": first.object, "identity": list(step.identity)})
    return found


def _entry(step: int, what: str, obj: str, identity: Sequence[str], reason: str) -> dict[str, Any]:
    if what == "index":
        statement = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(*identity))
    else:
        statement = sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
            sql.Identifier(*identity[:-1]), sql.Identifier(identity[-1]))
    return {"step": step, "action": f"drop_{what}", "object": obj, "identity": list(identity),
            "sql": statement.as_string(None), "status": "pending", "reason": reason}


def leftover_temporaries(found: Iterable[Mapping[str, Any]], completed: set[int]) -> list[dict[str, Any]]:
    return [_entry(int(t["created_by"]), str(t["what"]), str(t["object"]), t["identity"],
                   f"made by step {t['created_by']} to be dropped by step {t['dropped_by']}, which never ran")
            for t in found if int(t["created_by"]) in completed and int(t["dropped_by"]) not in completed]


def _index_state(conn: psycopg.Connection[Any], identity: Sequence[str], obj: str) -> tuple[str | None, list[str]]:
    """'valid', 'invalid' or None (no such index), and its name's parts as the catalog has them."""
    if len(identity) == 2:
        row = conn.execute(
            "SELECT i.indisvalid, n.nspname, c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (identity[0], identity[1])).fetchone()
    else:  # a plan from before steps had an identity: the name compared whole, never split
        row = conn.execute(
            "SELECT i.indisvalid, n.nspname, c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname || '.' || c.relname = %s", (obj,)).fetchone()
    if row is None:
        return None, list(identity)
    return ("valid" if row[0] else "invalid"), [row[1], row[2]]


def _constraint_exists(conn: psycopg.Connection[Any], identity: Sequence[str]) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND k.conname = %s", tuple(identity)).fetchone()
    return row is not None


def _enum_label_exists(conn: psycopg.Connection[Any], identity: Sequence[str], statement: str) -> bool | None:
    import pglast
    from pglast import ast

    try:
        node = pglast.parse_sql(statement)[0].stmt
    except pglast.parser.ParseError:
        return None
    if not isinstance(node, ast.AlterEnumStmt) or not node.newVal or len(identity) != 2:
        return None
    row = conn.execute(
        "SELECT 1 FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = %s AND t.typname = %s AND e.enumlabel = %s", (identity[0], identity[1], str(node.newVal))
    ).fetchone()
    return row is not None


def outcome_of(conn: psycopg.Connection[Any], steps: Sequence[Mapping[str, Any]], completed: set[int], why: str) -> Outcome:
    """What the steps under way did, read from the catalog (``steps`` as ``in_flight`` records them)."""
    records: list[StepRecord] = []
    cleanup: list[dict[str, Any]] = []
    notes: list[str] = []
    rolled_back = [str(s["index"]) for s in steps if s.get("transactional") and int(s["index"]) not in completed]
    if rolled_back:
        notes.append(f"step(s) {', '.join(rolled_back)} were under way in a transaction that did not commit")
    for step in (s for s in steps if not s.get("transactional") and int(s["index"]) not in completed):
        index, kind, obj = int(step["index"]), str(step["kind"]), str(step["object"])
        identity = [str(p) for p in step.get("identity") or ()]

        def done(how: str, step: Mapping[str, Any] = step, index: int = index, kind: str = kind, obj: str = obj) -> None:
            records.append(StepRecord(index, kind, obj, str(step.get("sql", "")), "applied", 0.0, note=f"{how} {why}"))
            notes.append(f"step {index} ({kind} {obj}) {how}")

        if kind in ("create_index_concurrently", "drop_index_concurrently"):
            state, names = _index_state(conn, identity, obj)
            building = kind == "create_index_concurrently"
            if state == "invalid":
                what = "the concurrent build" if building else "the interrupted concurrent drop"
                cleanup.append(_entry(index, "index", obj, names, f"INVALID index left by {what} of step {index}"))
            elif (state == "valid") == building:
                done("was found completed")
            else:
                notes.append(f"step {index} ({kind} {obj}) had not taken effect")
        elif kind == "add_enum_value":
            present = _enum_label_exists(conn, identity, str(step.get("sql", "")))
            if present:
                done("was found completed")
            elif present is False:
                notes.append(f"step {index} ({kind} {obj}) had not taken effect")
            else:
                notes.append(f"step {index} ({kind} {obj}) was under way: it may or may not have taken effect")
        else:
            notes.append(f"step {index} ({kind} {obj}) was under way: it may or may not have taken effect")
    return Outcome(tuple(records), tuple(cleanup), tuple(notes))


def settle(conn: psycopg.Connection[Any], schema: str, *, holding_lock: bool = False,
           lock_timeout: str = "5s") -> Settled:
    """Mark dead runs interrupted and remove what stopped runs left, where this role may: a reader without write
    rights still shows the truth (``history.Run.shown_status``), and changes nothing."""
    try:
        return _settle(conn, schema, holding_lock=holding_lock, lock_timeout=lock_timeout)
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction) as exc:
        log.warning("cannot record in %s.runs what was found there (%s); it is shown, not recorded",
                    schema, (exc.diag.message_primary or str(exc)).strip())
        return Settled()


def _settle(conn: psycopg.Connection[Any], schema: str, *, holding_lock: bool, lock_timeout: str) -> Settled:
    marked = []
    for run in history.running_runs(conn, schema):
        if run.alive is not False:
            continue
        completed = set(run.completed)
        found = outcome_of(conn, run.current_steps, completed, "after the applier stopped")
        completed |= {r.index for r in found.records}
        cleanup = [*run.cleanup, *found.cleanup, *leftover_temporaries(run.temporaries, completed)]
        message = (f"the applying process died (backend {run.backend_pid} is gone); completed step(s): "
                   f"{', '.join(map(str, sorted(completed))) or 'none'}" + "".join(f"; {n}" for n in found.notes))
        if history.mark_interrupted(conn, schema, run.id, message, added=found.records, cleanup=cleanup):
            log.warning("run %s was interrupted: %s", run.id, message)
            marked.append(run)
    if not holding_lock and not runlock.try_lock(conn):
        pending = [str(e["object"]) for r in history.with_cleanup(conn, schema) for e in r.cleanup
                   if e.get("status") == "pending"]
        if pending:
            log.info("an apply holds the lock: left for later: %s", ", ".join(pending))
        return Settled(tuple(marked), (), tuple(pending))
    try:
        removed, pending, runs = [], [], []
        for run in history.with_cleanup(conn, schema):
            entries, notes = remove(conn, run.cleanup, lock_timeout=lock_timeout)
            history.record_cleanup(conn, schema, run.id, entries, note="; ".join(notes))
            removed += [str(e["object"]) for e in entries if e["status"] == "done" and e not in run.cleanup]
            pending += [str(e["object"]) for e in entries if e["status"] == "pending"]
            runs.append(run.id)
        return Settled(tuple(marked), tuple(removed), tuple(pending), tuple(runs))
    finally:
        if not holding_lock:
            runlock.unlock(conn)


def remove(conn: psycopg.Connection[Any], entries: Sequence[Mapping[str, Any]], *,
           lock_timeout: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Remove the pending leftovers (the caller holds the apply lock): each still checked against the catalog, so
    an index valid by now or a constraint already gone is left alone. Returns the entries as they stand and notes."""
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    for entry in entries:
        entry = dict(entry)
        out.append(entry)
        if entry.get("status") != "pending":
            continue
        identity = [str(p) for p in entry["identity"]]
        if entry["action"] == "drop_index":
            state, _ = _index_state(conn, identity, str(entry["object"]))
            there = state == "invalid"
            if state == "valid":
                entry.update(status="kept", reason=f"{entry['reason']}; valid by the time it was looked at again")
                continue
        else:
            there = _constraint_exists(conn, identity)
        if not there:
            entry["status"] = "gone"
            continue
        try:
            saved = conn.execute("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')").fetchone()
            conn.execute("SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', '10min', false)",
                         (lock_timeout,))
            try:
                conn.execute(str(entry["sql"]).encode())
            finally:
                if saved is not None and not conn.broken:  # the caller's own settings, as they were
                    conn.execute("SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)",
                                 saved)
        except psycopg.Error as exc:
            if conn.broken:
                raise
            entry["last_error"] = (exc.diag.message_primary or str(exc)).strip()
            log.warning("could not remove %s (%s): the next command tries again", entry["object"], entry["last_error"])
            continue
        entry.update(status="done", at=datetime.now(UTC).isoformat(timespec="seconds"))
        kind = "the INVALID index" if entry["action"] == "drop_index" else "the helper constraint"
        notes.append(f"dropped {kind} {entry['object']}")
        log.warning("dropped %s %s (%s)", kind, entry["object"], entry["reason"])
    return out, notes
