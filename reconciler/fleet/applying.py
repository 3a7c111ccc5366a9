"""Applying a fleet: each database with the newest plan naming it, under its own lock and history, within each
server's share of connections. One database failing, for whatever reason, never stops the others or hides its
error; a database its plan was already applied to is done, so a retried shard (an indexed Job's pod) succeeds."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg

from .. import dsn as dsnlib
from ..apply import ApplyOptions, apply_plan
from ..apply.monitor import LockWaitSampler
from ..errors import ApplyError, ReconcilerError, RefusedError
from ..inspect import TargetIdentity
from ..logs import current_database
from ..plan import Plan
from .members import Member
from .placement import ServerShare, per_server
from .planning import plan_for

log = logging.getLogger(__name__)

OK_STATUSES = ("applied", "done", "nothing")
_APPLIED_BY = re.compile(r"already applied to this database by run (\S+?):")
# what a refused connection says (the server is down, restarting, or stopping), or one lost before the run began
_SERVER_GONE = re.compile(r"connection refused|no such file or directory|the database system is (starting up|shutting "
                          r"down|in recovery mode|not yet accepting connections)|could not connect|timeout expired|"
                          r"terminating connection due to administrator command|the connection is lost|server closed "
                          r"the connection unexpectedly", re.IGNORECASE)
_LOST = "the connection to the target was lost"
_DATABASE_GONE = re.compile(r'database "[^"]*" does not exist')


@dataclass(frozen=True)
class Outcome:
    """What happened to one database. ``cause`` sorts the failures into what an operator does about them: server
    (not reached: down or restarting), lost (its connection went mid-run), gone (the database no longer exists), or
    the plan check that refused it (freshness: changed since it was planned; interrupted: a run stopped half-way
    since; unplanned: no plan names it), else failed."""

    label: str
    server: str
    status: str  # applied, done (before), nothing (no steps), refused, failed, skipped
    plan_id: str | None = None
    steps: int = 0
    duration_ms: float = 0.0
    error: str | None = None
    run_id: str | None = None
    cause: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


def connections_per_database(plans: Sequence[Plan], options: ApplyOptions) -> int:
    """What one database's apply holds at once: its control and applying sessions, pg_dump while it backs up, and
    the fill's own sessions while a batched fill runs (the lock-wait monitor is the server's, shared)."""
    fills = any(s.kind == "backfill" for p in plans for s in p.body.steps)
    backup = options.backup_scope != "none" and options.backups_dir is not None
    return 2 + max(int(backup), options.backfill.workers if fills else 0)


def apply_fleet(plans: Sequence[Plan], members: Sequence[Member], options: ApplyOptions,
                found: dict[str, ServerShare], *, done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Each database with the newest plan made for it; the outcomes in the members' order."""
    need = connections_per_database(plans, options)
    with contextlib.ExitStack() as stack:
        samplers = {}
        for member in members:
            if member.server not in samplers:
                samplers[member.server] = stack.enter_context(LockWaitSampler(member.dsn))
        base = replace(options, on_step=None)  # progress lines of several databases would interleave

        def one(member: Member) -> Outcome:
            return apply_one(plans, member, replace(base, lock_sampler=samplers[member.server]))

        return per_server(members, lambda m: m.dsn, found, need, one, done)


def apply_one(plans: Sequence[Plan], member: Member, options: ApplyOptions) -> Outcome:
    """Never raises: whatever goes wrong is this database's outcome. The plan is chosen once the database, over the
    run's own connection, says who it is: a database needs no connection of its own before its apply."""
    if member.error is not None:
        return Outcome(member.label, member.server, "failed", error=member.error, cause=cause_of(member.error))
    chosen: list[Plan] = []

    def choose(identity: TargetIdentity) -> Plan:
        plan = plan_for(plans, identity)
        if plan is None:
            raise RefusedError("no plan names this database (it joined the fleet, or changed state, after planning): "
                               "plan again", check="unplanned")
        chosen.append(plan)
        return plan

    started = time.perf_counter()

    def outcome(status: str, **fields: Any) -> Outcome:
        return Outcome(member.label, member.server, status, chosen[0].short_id if chosen else None,
                       duration_ms=(time.perf_counter() - started) * 1000, **fields)

    named = current_database.set(member.label)  # its log lines name it: a fleet's interleave
    try:
        result = apply_plan(choose, member.dsn, options)
    except RefusedError as exc:
        if exc.check == "replay":
            found = _APPLIED_BY.search(str(exc))
            return outcome("done", run_id=found.group(1) if found else None)
        if exc.check == "unplanned":
            return outcome("skipped", error=str(exc), cause="unplanned")
        return outcome("refused", error=_one_line(str(exc)), cause=exc.check or "refused")
    except ApplyError as exc:
        return outcome("failed", run_id=exc.run_id, error=_one_line(str(exc)), cause=cause_of(str(exc)))
    except (ReconcilerError, psycopg.Error) as exc:
        return outcome("failed", error=_one_line(str(exc)), cause=cause_of(str(exc)))
    except Exception as exc:  # a bug of ours in one database's apply must not stop the others: shown with its type
        log.debug("apply to %s raised", member.label, exc_info=True)
        return outcome("failed", error=_one_line(f"{type(exc).__name__}: {exc}"), cause="failed")
    finally:
        current_database.reset(named)
    return outcome(result.status, steps=len(result.steps), run_id=result.run_id)


def _one_line(text: str) -> str:
    return dsnlib.redact(" ".join(text.split()))


def cause_of(error: str) -> str:
    """Which of the outcome's causes an error message tells (server, lost, gone), else failed."""
    if _LOST in error:
        return "lost"
    if _DATABASE_GONE.search(error):
        return "gone"
    if _SERVER_GONE.search(error):
        return "server"
    return "failed"
