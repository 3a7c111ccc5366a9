"""One plan per distinct live state of a fleet, naming every database in that state: one review covers them all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import Config, Environment
from ..inspect import TargetIdentity
from ..pipeline import make_plan, open_servers
from ..plan import FleetTarget, Plan
from ..planfile import body_id
from .members import Member


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


def plan_for(plans: Sequence[Plan], identity: TargetIdentity) -> Plan | None:
    """The newest plan naming the database: a folder may keep an older plan beside the one made after it changed."""
    naming = [p for p in plans if p.body.is_for(identity.system_identifier, identity.database)]
    return max(naming, key=lambda p: p.body.created_at, default=None)
