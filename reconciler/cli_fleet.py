"""The fleet forms of plan, apply, drift and history: an environment with ``databases:`` (one schema, many
databases). Each works on every database within each server's share of connections (fleet/placement.py), shows
its progress, and ends with one table (or JSON) and one line per problem saying what to do."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from . import dsn as dsnlib
from .apply import ApplyOptions
from .cli_help import EXIT_CHANGES, EXIT_ERROR, EXIT_OK, EXIT_REFUSED
from .config import Config, Environment
from .errors import ReconcilerError, RefusedError
from .fleet.applying import Outcome, apply_fleet, cause_of
from .fleet.members import Member, label_key, listed, member_key, select_shard, survey
from .fleet.placement import ServerShare, shares
from .fleet.planning import not_listed, plan_fleet
from .fleet.report import FleetProgress, actions, as_json, write_table
from .plan import Plan
from .render.common import ApprovalView
from .signing import PlannerKey


def _progress(args: argparse.Namespace, what: str, total: int) -> FleetProgress:
    """A live line on a terminal; elsewhere a line every few seconds: a JSON log line, or plain text on stderr
    (a CI job's log, where text logs show only warnings)."""
    console = Console(stderr=True)
    if args.log_format == "json":
        return FleetProgress(what, total)
    if console.is_terminal:
        return FleetProgress(what, total, console.status(what))
    return FleetProgress(what, total, emit=lambda line: print(line, file=sys.stderr, flush=True))


def _list_name(env: Environment) -> str:
    return str(env.databases_file) if env.databases_file is not None else f"environments.{env.name}.databases"


def _surveyed(args: argparse.Namespace, config: Config, env: Environment, dsns: Sequence[str],
              concurrency: int) -> tuple[list[Member], dict[str, ServerShare]]:
    found = shares(dsns, concurrency)
    with _progress(args, "reading the fleet", len(dsns)) as progress:
        members = survey(config, dsns, found, done=lambda m: progress.tick(m.error is None))
    return members, found


def plan(args: argparse.Namespace, config: Config, env: Environment, key: PlannerKey | None,
         view: Callable[[Plan, Path], ApprovalView | None]) -> int:
    """One plan file per distinct live state, each naming its databases; unreachable databases reported."""
    from .planfile import write_plan
    from .render import render
    from .render.fleet import write_fleet
    from .signing import sign_as_planner

    members, _found = _surveyed(args, config, env, env.fleet_dsns(), env.concurrency)
    plans = plan_fleet(config, env, members, schemas_dir=args.schemas)
    folder: Path = args.out or config.plans_dir
    folder.mkdir(parents=True, exist_ok=True)
    status = EXIT_OK
    shown = []
    for group in plans:
        made = sign_as_planner(group.plan, key) if key is not None else group.plan
        path = folder / f"{env.name}-{made.short_id}.json"
        write_plan(made, path)
        shown.append((made, view(made, path)))
        if args.format != "markdown":  # markdown: one comment for the fleet, below
            sys.stdout.write(render(made, args.format, shown[-1][1]))
        print(f"\nSaved plan {made.short_id} for {len(group.members)} database(s) to {path}", file=sys.stderr)
        if made.body.policy.denied:
            status = EXIT_REFUSED
        elif made.body.steps and status == EXIT_OK:
            status = EXIT_CHANGES
    failed = [m for m in members if m.error is not None]
    if args.format == "markdown":
        write_fleet(shown, sys.stdout, unreachable=[m.label for m in failed])
    _unreachable(failed)
    print(f"{len(members)} database(s): {len(plans)} distinct state(s), {len(failed)} unreachable", file=sys.stderr)
    return EXIT_ERROR if failed else status


def _unreachable(failed: Sequence[Member]) -> None:
    """One error line per database, or one per server for those a server down (or restarting) kept out."""
    down: dict[str, list[Member]] = {}
    for member in failed:
        if member.error is not None and cause_of(member.error) == "server":
            down.setdefault(member.server, []).append(member)
    for server, members in down.items():
        print(f"error: server {server} could not be reached: {len(members)} database(s) not read "
              f"({members[0].error})", file=sys.stderr)
    told = {m.dsn for members in down.values() for m in members}
    for member in failed:
        if member.dsn not in told:
            print(f"error: {member.label}: {member.error}", file=sys.stderr)


def apply(args: argparse.Namespace, config: Config, env: Environment, options: ApplyOptions) -> int:
    """Plan files (one per state) or --auto (plan and apply where allowed), to every database of the shard."""
    from .pipeline import auto_apply_blockers
    from .planfile import read_plan

    if args.auto == (args.plan is not None):
        raise ReconcilerError("give either a plan file (or a folder of them) or --auto")
    started = time.monotonic()
    dsns = select_shard(env.fleet_dsns(), args.shard)
    concurrency = args.concurrency or env.concurrency
    if args.auto:  # planning reads every database first; plan files need no such pass
        members, found = _surveyed(args, config, env, dsns, concurrency)
    else:
        members, found = listed(dsns), shares(dsns, concurrency)
    if args.auto:
        blockers = auto_apply_blockers(env)
        if blockers:
            raise RefusedError(f"environment {env.name!r} does not apply on its own ({'; '.join(blockers)}): "
                               "plan, approve, then apply")
        plans = []
        for group in plan_fleet(config, env, members, schemas_dir=args.schemas):
            blockers = auto_apply_blockers(env, group.plan)
            if blockers:  # its databases are reported as skipped below, with the plan named
                print(f"plan {group.plan.short_id} ({len(group.members)} database(s)) needs a human: "
                      f"{'; '.join(blockers)}", file=sys.stderr)
                continue
            plans.append(group.plan)
    else:
        paths = sorted(args.plan.glob("*.json")) if args.plan.is_dir() else [args.plan]
        plans = [p for p in map(read_plan, paths) if p.body.environment == env.name]
        if not plans:
            raise ReconcilerError(f"no plan for environment {env.name!r} in {args.plan}")
        if not args.plan.is_dir():  # one group's plan file: the databases it names, the others left alone
            named = {label_key(t.label) for p in plans for t in p.body.fleet}
            others = [m for m in members if member_key(m.dsn) not in named]
            members = [m for m in members if member_key(m.dsn) in named]
            if others:
                print(f"{len(others)} database(s) of the fleet are not named by {args.plan}: not touched (apply the "
                      "folder of the fleet's plans for all of them)", file=sys.stderr)
    with _progress(args, "applying", len(members)) as progress:
        outcomes = apply_fleet(plans, members, options, found, done=lambda o: progress.tick(o.ok))
    notes = actions(outcomes, missing=not_listed(plans, dsns, args.shard), fleet_list=_list_name(env))
    _write(args, outcomes, time.monotonic() - started, notes)
    if all(o.ok for o in outcomes):
        return EXIT_OK
    return EXIT_REFUSED if all(o.ok or o.status == "refused" for o in outcomes) else EXIT_ERROR


def _write(args: argparse.Namespace, outcomes: Sequence[Outcome], seconds: float, notes: Sequence[str]) -> None:
    if getattr(args, "format", "text") == "json":
        print(json.dumps(as_json(outcomes, seconds=seconds, notes=notes), indent=2))
        return
    write_table(outcomes, sys.stdout, seconds=seconds, notes=notes)


def drift(args: argparse.Namespace, config: Config, env: Environment) -> int:
    """Every database compared with the desired schema, loaded once."""
    from .fleet.placement import per_server
    from .pipeline import desired_snapshot, drift_of, open_servers

    started = time.monotonic()
    members, found = _surveyed(args, config, env, env.fleet_dsns(), env.concurrency)
    reachable = [m for m in members if m.error is None]
    if not reachable:
        raise ReconcilerError(f"none of the {len(members)} database(s) of {env.name!r} could be reached: "
                              + "; ".join(f"{m.label}: {m.error}" for m in members[:3]))
    single = dataclasses.replace(env, database=reachable[0].dsn, databases=(), databases_file=None)
    rows: list[dict[str, Any]] = []
    with open_servers(config, single) as servers, \
            desired_snapshot(config, servers, schemas_dir=args.schemas) as (shadow_dsn, desired), \
            _progress(args, "comparing", len(members)) as progress:
        def one(member: Member) -> dict[str, Any]:
            row: dict[str, Any] = {"database": member.label, "server": member.server}
            if member.error is not None:
                return row | {"status": "unreachable", "error": member.error}
            if member.fingerprint == desired.fingerprint:
                return row | {"status": "matches", "differences": []}
            try:
                found_now = drift_of(config, shadow_dsn, desired, member.dsn)
            except (ReconcilerError, OSError) as exc:
                return row | {"status": "unreachable", "error": dsnlib.redact(" ".join(str(exc).split()))}
            except Exception as exc:  # psycopg's errors and any of ours: this database's row, not the command's end
                return row | {"status": "unreachable", "error": dsnlib.redact(f"{type(exc).__name__}: {exc}")}
            return row | {"status": "drifted" if found_now else "matches", "differences": [str(d) for d in found_now]}

        rows = per_server(members, lambda m: m.dsn, found, 1, one, lambda r: progress.tick(r["status"] != "unreachable"))

    def line(r: dict[str, Any]) -> list[str]:
        shown = r.get("differences", [])
        return [r["status"], r.get("error") or ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5
                                                                       else "")]

    counted = _write_rows(args, rows, time.monotonic() - started, ["STATUS", "DIFFERENCES"], line)
    if counted.get("drifted") and args.format != "json":
        print(f"What to do: plan again (`reconciler plan --env {env.name}`) to bring the drifted ones back")
    if counted.get("unreachable"):
        return EXIT_ERROR
    return EXIT_CHANGES if counted.get("drifted") else EXIT_OK


def _write_rows(args: argparse.Namespace, rows: Sequence[dict[str, Any]], seconds: float, header: list[str],
                line: Callable[[dict[str, Any]], list[str]]) -> dict[str, int]:
    """A row per database as a table (DATABASE, then ``header``'s columns, the last one unpadded) and the totals by
    status, or all of it as JSON; the totals returned."""
    counted: dict[str, int] = {}
    for row in rows:
        counted[row["status"]] = counted.get(row["status"], 0) + 1
    if args.format == "json":
        print(json.dumps({"databases": list(rows), "totals": counted, "seconds": round(seconds, 3)}, indent=2))
        return counted
    table = [["DATABASE", *header], *([r["database"], *line(r)] for r in rows)]
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    for cells in table:
        print("  ".join(c.ljust(widths[i]) if i < len(widths) else c for i, c in enumerate(cells)).rstrip())
    print(f"{len(rows)} database(s) in {seconds:.1f} s: " + ", ".join(f"{n} {s}" for s, n in sorted(counted.items())))
    return counted


def history(args: argparse.Namespace, config: Config, env: Environment) -> int:
    """Each database's latest run and its status, in one table."""
    from . import history as runs
    from .apply import settle
    from .fleet.placement import per_server
    from .servers import connect

    started = time.monotonic()
    dsns = env.fleet_dsns()
    found = shares(dsns, env.concurrency)

    def one(dsn: str) -> dict[str, Any]:
        row: dict[str, Any] = {"database": dsnlib.describe(dsn)}
        try:
            with connect(dsn, application_name="reconciler fleet") as conn:
                settle(conn, config.metadata_schema)
                latest = runs.list_runs(conn, config.metadata_schema, limit=1)
        except Exception as exc:  # one database's error is its row, never the command's end
            return row | {"status": "unreachable", "error": dsnlib.redact(" ".join(str(exc).split()))}
        if not latest:
            return row | {"status": "no runs"}
        r = latest[0]
        return row | {"status": r.shown_status, "run": r.id, "plan": r.plan_id.removeprefix("sha256:")[:12],
                      "started_at": r.started_at.isoformat(), "finished_at": r.finished_at.isoformat()
                      if r.finished_at else None, "steps": len(r.statements),
                      "error": (r.error or "").splitlines()[0][:300] if r.error else None}

    with _progress(args, "reading history", len(dsns)) as progress:
        rows = per_server(dsns, lambda d: d, found, 1, one, lambda r: progress.tick(r["status"] != "unreachable"))

    def line(r: dict[str, Any]) -> list[str]:
        when = r["started_at"][:19].replace("T", " ") if r.get("started_at") else "-"
        return [r["status"], when, r.get("plan") or "-", r.get("run") or "-", r.get("error") or ""]

    counted = _write_rows(args, rows, time.monotonic() - started, ["STATUS", "STARTED (UTC)", "PLAN", "RUN", "ERROR"],
                          line)
    return EXIT_ERROR if counted.get("unreachable") else EXIT_OK
