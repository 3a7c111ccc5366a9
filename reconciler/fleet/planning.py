"""One plan per distinct live state of a fleet, naming every database in that state: one review covers them all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg

from ..config import EMBEDDED, Config, Environment
from ..errors import ReconcilerError
from ..inspect import TargetIdentity, identity
from ..pipeline import make_plan, open_servers
from ..plan import FleetTarget, Plan
from ..planfile import body_id
from ..servers import connect
from .members import Member, in_shard, label_key, member_key


@dataclass(frozen=True)
class FleetPlan:
    plan: Plan
    members: tuple[Member, ...]


def plan_fleet(config: Config, env: Environment, members: Sequence[Member], *,
               schemas_dir: Path | None = None) -> list[FleetPlan]:
    """One plan per distinct live fingerprint, made against the group's first database, for all of them."""
    groups: dict[str, list[Member]] = {}
    for member in members:
        if member.fingerprint is not None:
            groups.setdefault(member.fingerprint, []).append(member)
    if _shadow_holds_members(env, members):  # keep nothing there: it holds the fleet's own databases
        config = replace(config, shadow_cache=0)
    out = []
    for group in groups.values():
        single = replace(env, database=group[0].dsn, databases=(), databases_file=None)
        with open_servers(config, single) as servers:
            plan = make_plan(config, single, servers, schemas_dir=schemas_dir).plan
        fleet = tuple(FleetTarget(m.identity.system_identifier, m.identity.database, m.label)
                      for m in group if m.identity is not None)
        body = replace(plan.body, fleet=fleet)
        out.append(FleetPlan(Plan(id=body_id(body), body=body), tuple(group)))
    return out


def _shadow_holds_members(env: Environment, members: Sequence[Member]) -> bool:
    """Is the shadow server one of the fleet's? A plan keeps no template there, as on a single target's own cluster."""
    shadow_dsn = env.shadow_dsn()
    if shadow_dsn == EMBEDDED:
        return False
    try:
        with connect(shadow_dsn, application_name="reconciler fleet") as conn:
            shadow = identity(conn).system_identifier
    except (ReconcilerError, psycopg.Error):
        return False  # the plan says why the shadow cannot be reached
    return any(m.identity is not None and m.identity.system_identifier == shadow for m in members)


def plan_for(plans: Sequence[Plan], identity: TargetIdentity) -> Plan | None:
    """The newest plan naming the database: a folder may keep an older plan beside the one made after it changed."""
    naming = [p for p in plans if p.body.is_for(identity.system_identifier, identity.database)]
    return max(naming, key=lambda p: p.body.created_at, default=None)


def current(plans: Sequence[Plan]) -> tuple[list[Plan], list[Plan]]:
    """The plans newest for at least one database they name, and the others: a folder planned again keeps older
    plans whose databases all have a newer one. A plan naming no fleet (one database's) is current."""
    newest: dict[tuple[str, str], str] = {}
    for p in plans:
        for t in p.body.fleet:
            key = (t.system_identifier, t.database)
            newest[key] = max(newest.get(key, ""), p.body.created_at)
    kept: list[Plan] = []
    older: list[Plan] = []
    for p in plans:
        fresh = not p.body.fleet or any(newest[(t.system_identifier, t.database)] == p.body.created_at
                                        for t in p.body.fleet)
        (kept if fresh else older).append(p)
    return kept, older


def not_listed(plans: Sequence[Plan], dsns: Sequence[str], shard: str | None) -> list[str]:
    """Databases the plans name, of this shard, that the fleet list no longer has (by server and name); a plan
    whose listed databases all have a newer plan is left out (it was made before they left, and planned again)."""
    listed = {member_key(d) for d in dsns}
    newest: dict[str, str] = {}
    for p in plans:
        for t in p.body.fleet:
            key = label_key(t.label)
            newest[key] = max(newest.get(key, ""), p.body.created_at)
    missing: dict[str, str] = {}
    for p in plans:
        keys = [label_key(t.label) for t in p.body.fleet]
        still = [k for k in keys if k in listed]
        if still and all(newest[k] > p.body.created_at for k in still):
            continue
        missing.update((k, t.label) for k, t in zip(keys, p.body.fleet, strict=True)
                       if k not in listed and in_shard(k, shard))
    return sorted(missing.values())
