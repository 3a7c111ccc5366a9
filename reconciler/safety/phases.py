"""Drafts into numbered steps: ordered by stage, grouped into transactions (phases), given their timeouts, and a
transaction split where it would take more of the server's lock table than is fair."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..config import duration_seconds
from ..conversions import ColumnNotes
from ..diff.base import Change
from ..inspect import LiveFacts, LockTable
from .compiler import Compiler
from .drafts import Draft
from .shadow_table import LOCK_KIND
from .steps import Hazard, HazardCode, SafetySettings, Step

# every write to the tables waits behind a cut-over's queued lock: it gives up soon and is retried; and before the
# server's deadlock_timeout (1s), so that where a writer takes the tables in the other order the cut-over is the one
# to give up, not the application's write
_CUTOVER_LOCK_TIMEOUT = "500ms"
_LOCK_SHARE = 4  # a transaction takes at most a quarter of the server's lock table: other sessions need theirs
_EMPTY_FACTS = LiveFacts(
    tables={}, partitioned=frozenset(), columns={}, indexes={}, enums={}, views={}, volatile_functions=frozenset(),
    binary_coercible=frozenset(), type_oids={},
)


def compile_steps(
    changes: Sequence[Change],
    facts: LiveFacts | None = None,
    settings: SafetySettings | None = None,
    *,
    engine: str = "migra",
    notes: ColumnNotes | None = None,
) -> tuple[Step, ...]:
    """Steps in order, numbered, in phases; see the package's docstring. ``notes``: the desired SQL's using and
    backfill annotations (conversions.py)."""
    facts = facts or _EMPTY_FACTS
    settings = settings or SafetySettings()
    compiled = [d for d in Compiler(facts, settings, engine, notes).compile(changes) if d.sql]
    drafts = sorted(compiled, key=lambda d: d.stage)  # stable: the engine's order within a stage
    budget = _lock_budget(facts.lock_table)
    steps: list[Step] = []
    phase = 0
    previous: Draft | None = None
    held: set[str] = set()  # what the current transaction locks, roughly
    pieces: list[list[int]] = []  # per transaction the compiler would make: the first step of each piece of it
    for i, d in enumerate(drafts, 1):
        alone = not d.transactional or d.isolated
        locks = _locks(d)
        if previous is None or alone or not previous.transactional or previous.isolated or previous.stage != d.stage \
                or previous.group != d.group:
            phase += 1
            held = set()
            pieces.append([i])
        elif budget is not None and len(held) + len(locks - held) > budget:
            phase += 1
            held = set()
            pieces[-1].append(i)
        held |= locks
        lock_timeout, statement_timeout = _timeouts(settings, d.kind)
        steps.append(Step(
            index=i, sql=d.sql, kind=d.kind, object=d.object, tables=d.tables, transactional=d.transactional,
            phase=phase, hazards=d.hazards, rollback_sql=d.rollback_sql, reversible=d.reversible,
            lock_timeout=lock_timeout, statement_timeout=statement_timeout, original_sql=d.original_sql,
            identity=d.identity,
        ))
        previous = d
    split = [p for p in pieces if len(p) > 1]
    if not split or facts.lock_table is None:
        return tuple(steps)
    return tuple(_split_hazards(steps, split, facts.lock_table))


def _timeouts(settings: SafetySettings, kind: str) -> tuple[str, str]:
    override = settings.timeouts.get(kind, {})
    lock_timeout = settings.lock_timeout
    if kind in ("cutover", LOCK_KIND) and duration_seconds(lock_timeout) > duration_seconds(_CUTOVER_LOCK_TIMEOUT):
        lock_timeout = _CUTOVER_LOCK_TIMEOUT
    return override.get("lock_timeout", lock_timeout), override.get("statement_timeout", settings.statement_timeout)


def _lock_budget(table: LockTable | None) -> int | None:
    return None if table is None else max(table.slots // _LOCK_SHARE, 1)


def _locks(d: Draft) -> set[str]:
    """What a step locks, roughly: the tables it names, the object it makes or changes (an index, a
    constraint, a function, a trigger), a new table's TOAST table and its index, and the index a foreign key
    checks. Each is one entry of the shared lock table, held until the transaction ends (measured on
    GitLab's schema: within 10% of pg_locks)."""
    found = set(d.tables)
    if d.object:
        found.add(d.object)
    if d.kind == "create_table":
        found.update((f"{d.object} (toast)", f"{d.object} (toast index)"))
    elif d.kind == "add_foreign_key" and len(d.tables) > 1:
        found.add(f"{d.tables[1]} (key index)")
    return found


def _split_hazards(steps: list[Step], split: list[list[int]], table: LockTable) -> list[Step]:
    """Name each transaction of a split one on its first step: a failure leaves the earlier ones committed."""
    firsts: dict[int, Hazard] = {}
    last_of_phase = {s.phase: s.index for s in steps}
    for starts in split:
        end = last_of_phase[steps[starts[-1] - 1].phase]
        for n, start in enumerate(starts, 1):
            firsts[start] = Hazard(HazardCode.SPLIT_TRANSACTION, (
                f"not atomic: steps {starts[0]}-{end} run as {len(starts)} transactions (transaction {n} of "
                f"{len(starts)} begins here) because they lock more objects than a quarter of the target's lock "
                f"table ({table.slots:,} locks: max_locks_per_transaction {table.max_locks_per_transaction} x "
                f"(max_connections {table.max_connections} + max_prepared_transactions "
                f"{table.max_prepared_transactions})); a failure leaves the earlier transactions committed"))
    return [replace(s, hazards=(*s.hazards, firsts[s.index])) if s.index in firsts else s for s in steps]
