"""Is the target what the plan promised? Asked before the last transaction commits, after the last step, and by
``reconciler verify``: live equals desired, no INVALID index, and the policy's postconditions hold."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import psycopg

from .. import inspect
from ..errors import ApplyError
from ..history import StepRecord
from ..plan import Plan, object_digests
from ..policy import run_assertion
from ..safety.swap import CONTRACT
from .checks import describe_differences

log = logging.getLogger(__name__)


class NotConverged(ApplyError):
    """The steps ran, but the target is not the desired schema (or a postcondition fails): undone like a failure."""


_RETIRED = re.compile(r"_reconciler_(?:old|gone)_[0-9a-f]{8}$")
HELD_NOTE = "held by apply --hold-contract: the column it drops is kept, in step, until a later plan drops it"


def held_objects(records: Iterable[StepRecord]) -> frozenset[str]:
    """What held contract steps would have dropped, as the schema's objects are named: live has them besides the
    desired schema, and nothing else."""
    kinds = {CONTRACT: "column", "drop_trigger": "trigger", "drop_function": "function"}
    return frozenset(f"{'table' if r.kind == CONTRACT and r.sql.startswith('DROP TABLE') else kinds[r.kind]} {r.object}"
                     for r in records if r.kind in kinds)


def _retired(kept: frozenset[str]) -> tuple[str, ...]:
    """The suffixes of the tables a held shadow-table contract keeps: their columns, constraints, indexes and
    partitions all carry it (safety/shadow_table.py renames them so)."""
    return tuple(m.group(0) for name in kept if name.startswith("table ")
                 for m in [_RETIRED.search(name)] if m is not None)


def unlike_desired(plan: Plan, live: inspect.SchemaSnapshot, *, limit: int, kept: frozenset[str] = frozenset()) -> str:
    """'' when live is the desired schema (counting the plan's equivalents) besides the ``kept`` objects (a held
    contract's), which it must have, else what differs."""
    if live.fingerprint == plan.body.desired.schema_fingerprint and not kept:
        return ""
    actual = object_digests(live)
    missing = [f"{name} (held, but gone)" for name in sorted(kept) if name not in actual]
    if kept:
        retired = _retired(kept)
        actual = {name: digest for name, digest in actual.items()
                  if name not in kept and not any(suffix in name for suffix in retired)}
    found = describe_differences(plan.body.desired.unmatched(actual), actual, limit=limit)
    return ", ".join([*missing, *([found] if found else [])])


Held = dict[tuple[str, str, str | None], tuple[str | None, frozenset[inspect.Grant] | None]]


def held(plan: Plan, conn: psycopg.Connection[Any], metadata_schema: str) -> Held:
    """The owner and grants of every object, where the plan does not manage them (they are not in the desired
    snapshot, so only a comparison with the target before the steps can tell they were kept)."""
    manages = plan.body.snapshot_options
    if manages["owners"] and manages["privileges"]:
        return {}
    security = inspect.security(conn, exclude_schemas=(metadata_schema,))
    return {key: (None if manages["owners"] else obj.owner, None if manages["privileges"] else obj.grants)
            for key, obj in security.objects.items()}


def lost(before: Held, after: Held, *, limit: int) -> str:
    """'' when every object there before and after kept its owner and grants, else what changed: a plan that does not
    manage them never changes them, and one that re-creates an object gives it back what it had."""
    changed = []
    for key in sorted(set(before) & set(after), key=lambda k: (k[1], k[2] or "", k[0])):
        (owner, grants), (owner_now, grants_now) = before[key], after[key]
        label = f"{key[0]} {key[1]}{'.' + key[2] if key[2] else ''}"
        if owner != owner_now:
            changed.append(f"{label} owner {_who(owner)} -> {_who(owner_now)}")
        if grants != grants_now and grants is not None and grants_now is not None:
            gone = ", ".join(g.describe() for g in sorted(grants - grants_now))
            added = ", ".join(g.describe() for g in sorted(grants_now - grants))
            changed.append(f"{label} privileges{' lost ' + gone if gone else ''}{' gained ' + added if added else ''}")
    shown = changed[:limit]
    return ", ".join(shown) + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


def _who(owner: str | None) -> str:
    return "the applying role" if owner == inspect.APPLYING_ROLE else str(owner)


def check_converged(plan: Plan, conn: psycopg.Connection[Any], metadata_schema: str,
                    before: Held | None = None, *, kept: frozenset[str] = frozenset()) -> None:
    """Inside the last transaction, before COMMIT: what it sees is what would be committed. ``before``: ``held``
    before the first step; ``kept``: what held contracts keep."""
    live = inspect.snapshot(conn, exclude_schemas=(metadata_schema,), **plan.body.snapshot_options)
    changed = unlike_desired(plan, live, limit=10, kept=kept)
    if changed:
        raise NotConverged(f"after the steps the database does not match the desired schema: {changed}")
    gone = lost(before, held(plan, conn, metadata_schema), limit=10) if before else ""
    if gone:
        raise NotConverged(f"after the steps objects have lost what the plan does not manage: {gone}")


def verify(conn: psycopg.Connection[Any], plan: Plan, metadata_schema: str, before: Held | None = None, *,
           kept: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The checks after an apply, as stored in the history row: live equals desired (besides what a held contract
    keeps), no INVALID index, and the NOT VALID constraints (each must be in the desired schema to pass the first
    check); with ``before`` (``held`` before the first step), no object lost its owner or grants."""
    live = inspect.snapshot(conn, exclude_schemas=(metadata_schema,), **plan.body.snapshot_options)
    unlike = unlike_desired(plan, live, limit=50, kept=kept)
    differences = unlike.split(", ") if unlike else []
    gone = lost(before, held(plan, conn, metadata_schema), limit=50) if before else ""
    differences += [f"not kept: {d}" for d in gone.split(", ")] if gone else []
    invalid = [r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT i.indisvalid ORDER BY 1").fetchall()]
    not_valid = [r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || k.conname FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace "
        "WHERE NOT k.convalidated AND n.nspname <> %s ORDER BY 1", (metadata_schema,)).fetchall()]
    result = {"converged": not differences, "fingerprint": live.fingerprint, "differences": differences,
              "invalid_indexes": invalid, "not_valid_constraints": not_valid}
    return result | ({"held": sorted(kept)} if kept else {})


def verification_failures(result: dict[str, Any]) -> list[str]:
    failures = []
    if result["differences"]:
        failures.append("the database does not match the desired schema: " + ", ".join(result["differences"][:10]))
    if result["invalid_indexes"]:
        failures.append("INVALID index(es) left: " + ", ".join(result["invalid_indexes"]))
    return failures


def postcondition_failures(plan: Plan, conn: psycopg.Connection[Any]) -> list[str]:
    failures = []
    for assertion in (a for a in plan.body.policy.assertions if a.when == "after"):
        failure = run_assertion(conn, assertion)
        if failure is not None:
            if assertion.action == "warn":
                log.warning("postcondition %s %s", assertion.rule, failure)
            else:
                failures.append(f"postcondition {assertion.rule} ({assertion.file}:{assertion.line}) {failure}")
    return failures
