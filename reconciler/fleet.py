"""Fleets: one desired schema, many databases (one per tenant, say).

Planning inspects every database, groups them by live schema fingerprint and plans once per group: the
plan names every database of its group (``PlanBody.fleet``), so one review and one set of signatures
covers them all. Applying runs each database under its own lock and history, a bounded number at a time;
one database failing never stops the others or hides its error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg

from . import dsn as dsnlib
from . import inspect
from .apply import ApplyOptions, apply_plan
from .config import Config, Environment
from .errors import ReconcilerError, RefusedError
from .pipeline import make_plan, managed, open_servers
from .plan import FleetTarget, Plan
from .planfile import body_to_json, content_id
from .servers import connect


@dataclass(frozen=True)
class Member:
    """One database of the fleet as inspected now; ``dsn`` is never printed (``label`` is)."""

    dsn: str
    label: str
    identity: inspect.TargetIdentity | None = None
    fingerprint: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class FleetPlan:
    plan: Plan
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Outcome:
    label: str
    status: str  # applied, nothing, refused, failed, skipped
    plan_id: str | None = None
    steps: int = 0
    duration_ms: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("applied", "nothing")


def select_shard(dsns: Sequence[str], shard: str | None) -> list[str]:
    """``I/N``: every N-th database starting at I (0-based), e.g. a Kubernetes indexed Job's pod I of N."""
    if not shard:
        return list(dsns)
    try:
        index_text, count_text = shard.split("/", 1)
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ReconcilerError(f"--shard {shard!r}: use I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ReconcilerError(f"--shard {shard!r}: I must be between 0 and N-1")
    return [d for position, d in enumerate(dsns) if position % count == index]


def survey(config: Config, env: Environment, dsns: Sequence[str]) -> list[Member]:
    """Identity and live schema fingerprint of every database, ``env.concurrency`` at a time."""
    excluded = (config.metadata_schema,)

    def one(dsn: str) -> Member:
        label = dsnlib.describe(dsn)
        try:
            with connect(dsn, application_name="reconciler fleet") as conn:
                ident = inspect.identity(conn)
                snap = inspect.snapshot(conn, exclude_schemas=excluded, **managed(config))
        except (ReconcilerError, psycopg.Error) as exc:
            return Member(dsn, label, error=dsnlib.redact(" ".join(str(exc).split())))
        return Member(dsn, label, ident, snap.fingerprint)

    with ThreadPoolExecutor(max_workers=env.concurrency, thread_name_prefix="fleet") as pool:
        return list(pool.map(one, dsns))


def plan_fleet(config: Config, env: Environment, members: Sequence[Member], *,
               schemas_dir: Path | None = None) -> list[FleetPlan]:
    """One plan per distinct live fingerprint, made against the group's first database, for all of them."""
    groups: dict[str, list[Member]] = {}
    for member in members:
        if member.fingerprint is not None:
            groups.setdefault(member.fingerprint, []).append(member)
    out = []
    for group in groups.values():
        single = replace(env, database=group[0].dsn, databases=(), databases_file=None)
        with open_servers(config, single) as servers:
            plan = make_plan(config, single, servers, schemas_dir=schemas_dir).plan
        fleet = tuple(FleetTarget(m.identity.system_identifier, m.identity.database, m.label)
                      for m in group if m.identity is not None)
        body = replace(plan.body, fleet=fleet)
        out.append(FleetPlan(Plan(id=content_id(body_to_json(body)), body=body), tuple(group)))
    return out


def apply_fleet(plans: Sequence[Plan], members: Sequence[Member], options: ApplyOptions,
                concurrency: int) -> list[Outcome]:
    """Each database with the plan made for it; the outcomes in the members' order."""
    quiet = replace(options, on_step=None)  # progress lines of several databases would interleave

    def one(member: Member) -> Outcome:
        if member.error is not None or member.identity is None:
            return Outcome(member.label, "failed", error=member.error or "not inspected")
        plan = next((p for p in plans if p.body.is_for(member.identity.system_identifier, member.identity.database)),
                    None)
        if plan is None:
            return Outcome(member.label, "skipped",
                           error="no plan names this database (it joined the fleet after planning?): plan again")
        started = time.perf_counter()
        try:
            result = apply_plan(plan, member.dsn, quiet)
        except RefusedError as exc:
            return Outcome(member.label, "refused", plan.short_id, error=str(exc))
        except ReconcilerError as exc:
            return Outcome(member.label, "failed", plan.short_id, error=str(exc),
                           duration_ms=(time.perf_counter() - started) * 1000)
        return Outcome(member.label, result.status, plan.short_id, len(result.steps),
                       (time.perf_counter() - started) * 1000)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fleet") as pool:
        return list(pool.map(one, members))


def summary_table(outcomes: Sequence[Outcome]) -> str:
    """A plain table: one line per database, then the totals."""
    rows = [("DATABASE", "STATUS", "PLAN", "STEPS", "TIME", "ERROR")]
    rows += [(o.label, o.status, o.plan_id or "-", str(o.steps), f"{o.duration_ms:.0f} ms",
              " ".join((o.error or "").split())[:400]) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 5 else cell for i, cell in enumerate(row)).rstrip() for row in rows]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    lines.append(f"{len(outcomes)} database(s): " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return "\n".join(lines) + "\n"
