"""Is the target what the plan promised? Asked before the last transaction commits, after the last step, and by
``reconciler verify``: live equals desired, no INVALID index, and the policy's postconditions hold."""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from .. import inspect
from ..errors import ApplyError
from ..plan import Plan, object_digests
from ..policy import run_assertion
from .checks import describe_differences

log = logging.getLogger(__name__)


class NotConverged(ApplyError):
    """The steps ran, but the target is not the desired schema (or a postcondition fails): undone like a failure."""


def unlike_desired(plan: Plan, live: inspect.SchemaSnapshot, *, limit: int) -> str:
    """'' when live is the desired schema (counting the plan's equivalents), else what differs."""
    if live.fingerprint == plan.body.desired.schema_fingerprint:
        return ""
    actual = object_digests(live)
    return describe_differences(plan.body.desired.unmatched(actual), actual, limit=limit)


def check_converged(plan: Plan, conn: psycopg.Connection[Any], metadata_schema: str) -> None:
    """Inside the last transaction, before COMMIT: what it sees is what would be committed."""
    live = inspect.snapshot(conn, exclude_schemas=(metadata_schema,), **plan.body.snapshot_options)
    changed = unlike_desired(plan, live, limit=10)
    if changed:
        raise NotConverged(f"after the steps the database does not match the desired schema: {changed}")


def verify(conn: psycopg.Connection[Any], plan: Plan, metadata_schema: str) -> dict[str, Any]:
    """The checks after an apply, as stored in the history row: live equals desired, no INVALID index,
    and the NOT VALID constraints (each must be in the desired schema to pass the first check)."""
    live = inspect.snapshot(conn, exclude_schemas=(metadata_schema,), **plan.body.snapshot_options)
    unlike = unlike_desired(plan, live, limit=50)
    differences = unlike.split(", ") if unlike else []
    invalid = [r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT i.indisvalid ORDER BY 1").fetchall()]
    not_valid = [r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || k.conname FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace "
        "WHERE NOT k.convalidated AND n.nspname <> %s ORDER BY 1", (metadata_schema,)).fetchall()]
    return {"converged": not differences, "fingerprint": live.fingerprint, "differences": differences,
            "invalid_indexes": invalid, "not_valid_constraints": not_valid}


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
