"""Every refusal apply can make, as results: ``verify-plan`` prints them, apply enforces them.

All of them only read the target: a refused apply writes nothing there.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import psycopg

from .. import history, inspect
from ..plan import Plan, object_digests, parse_time
from ..policy import closed_windows, run_assertion
from ..signing import Check, Requirements, enforce, offline_checks
from .options import ApplyOptions


def describe_differences(expected: dict[str, str], actual: dict[str, str], limit: int = 10) -> str:
    """'kind name (missing)' for objects whose digests differ, for one-line errors (in drift's words)."""
    names = [inspect.describe_difference(key, change) for key in sorted(set(expected) | set(actual))
             for change in [inspect.difference(expected, actual, key)] if change]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def target_check(plan: Plan, conn: psycopg.Connection[Any]) -> Check:
    """Is this the database the plan was made for? Asked first: nothing is written to any other."""
    ident = inspect.identity(conn)
    target = plan.body.target
    same = plan.body.is_for(ident.system_identifier, ident.database)
    intended = (f"database {target.database!r} on system {target.system_identifier}" if not plan.body.fleet else
                f"{len(plan.body.fleet)} database(s) of a fleet")
    return Check("target", same, f"database {ident.database!r} on system {ident.system_identifier}" if same else
                 f"the plan is for {intended}, not {ident.database!r} on system {ident.system_identifier}")


def plan_checks(plan: Plan, options: ApplyOptions, conn: psycopg.Connection[Any] | None) -> list[Check]:
    """Every refusal apply can make, as results; the database checks run only with a connection."""
    policy = plan.body.policy
    req = Requirements(
        approvals=max(options.requirements.approvals, policy.approvals),
        groups=tuple(dict.fromkeys([*options.requirements.groups, *policy.groups])),
        require_signed=options.requirements.require_signed,
    )
    checks = offline_checks(plan, options.trust, req)
    denied = policy.denied
    # right after integrity: a denied plan is refused for that, whatever else it lacks
    checks.insert(1, Check("policy", not denied, "no deny rule fires" if not denied else
                           "denied by " + "; ".join(f"{f.rule} ({f.file}:{f.line}) {f.subject}" for f in denied)))
    if policy.windows:
        closed = closed_windows(policy.windows, options.now)
        checks.append(Check("window", not closed, "inside the change window(s)" if not closed else
                            "outside the change window " + "; ".join(f"{w.rule}: {w.describe()}" for w in closed)))
    if plan.body.steps and not options.allow_unrehearsed:
        rehearsed = plan.body.rehearsal.converged
        checks.append(Check("rehearsal", rehearsed, plan.body.rehearsal.describe() if rehearsed else
                            f"the plan was not proven on a copy ({plan.body.rehearsal.describe()}); "
                            "plan again with rehearsal on, or set allow_unrehearsed"))
    same_env = plan.body.environment == options.environment
    checks.append(Check("environment", same_env, f"made for {plan.body.environment!r}" if same_env else
                        f"made for environment {plan.body.environment!r}, not {options.environment!r}"))
    if conn is None:
        return checks
    target = target_check(plan, conn)
    checks.append(target)
    for assertion in (a for a in policy.assertions if a.when == "before"):
        failure = run_assertion(conn, assertion)
        ok = failure is None or assertion.action == "warn"
        checks.append(Check(f"precondition {assertion.rule}", ok, "holds" if failure is None else
                            f"{failure} ({assertion.file}:{assertion.line})"))
    checks += preflight_checks(conn, plan, options)
    runs = history.runs_for_plan(conn, options.metadata_schema, plan.id)
    applied = [r for r in runs if r.status == "applied"]
    # right after integrity: a plan already applied here says so first, whatever else it fails now (expired, say),
    # and a fleet counts the database done
    checks.insert(1, Check("replay", not applied, "not applied before" if not applied else
                           f"already applied to this database by run {applied[0].id}: plans are not replayed"))
    interrupted = interrupted_since(conn, options.metadata_schema, plan)
    checks.append(Check("interrupted", interrupted is None, "no run was interrupted since it was made"
                        if interrupted is None else f"run {interrupted.id} was interrupted after this plan was made; "
                        "plan again from the database as it is now"))
    if target.ok:
        checks.append(freshness(conn, plan, options))
    return checks


def freshness(conn: psycopg.Connection[Any], plan: Plan, options: ApplyOptions) -> Check:
    live = inspect.snapshot(conn, exclude_schemas=(options.metadata_schema,), **plan.body.snapshot_options)
    target = plan.body.target
    fresh = live.fingerprint == target.fingerprint
    changed = "" if fresh else describe_differences(dict(target.objects), object_digests(live))
    return Check("freshness", fresh, "the live schema is as planned" if fresh else
                 f"stale: the database changed since it was planned ({changed}); plan again")


def interrupted_since(conn: psycopg.Connection[Any], schema: str, plan: Plan) -> history.Run | None:
    """A run that stopped half-way after this plan was made (by anyone's notice): the plan may assume what it undid."""
    made = parse_time(plan.body.created_at)
    return next((r for r in history.list_runs(conn, schema, limit=20)
                 if r.shown_status == "interrupted" and r.started_at > made), None)


def preflight_checks(conn: psycopg.Connection[Any], plan: Plan, options: ApplyOptions) -> list[Check]:
    """Can this role do what the plan asks, and record it? Each failure names what is missing."""
    steps = plan.body.steps
    if not steps:
        return []
    # names compared whole, as schema.name text on both sides: a name holding a dot is never split
    touched = sorted({t for s in steps for t in (*s.tables, s.object) if t})
    not_owned = [r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname || '.' || c.relname = ANY(%s) AND NOT pg_has_role(c.relowner, 'USAGE') ORDER BY 1",
        (touched,)).fetchall()]
    created_in = sorted({s.identity[0] for s in steps
                         if s.kind.startswith("create_") and s.kind != "create_schema" and len(s.identity) > 1})
    no_create = [r[0] for r in conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s) AND NOT has_schema_privilege(oid, 'CREATE') ORDER BY 1",
        (created_in,)).fetchall()]
    if any(s.kind == "create_schema" for s in steps):
        row = conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()
        if not (row and row[0]):
            no_create.append("the database (CREATE SCHEMA)")
    why_not = history.writable(conn, options.metadata_schema)
    checks = [
        Check("ownership", not not_owned, "the role owns what the plan alters" if not not_owned else
              f"the role {conn.info.user!r} does not own (nor belong to the owner of): {', '.join(not_owned)}"),
        Check("privileges", not no_create, "CREATE where the plan creates" if not no_create else
              f"the role {conn.info.user!r} lacks CREATE on: {', '.join(no_create)}"),
        Check("history", why_not is None, f"runs are recorded in {options.metadata_schema}.runs" if why_not is None
              else why_not),
    ]
    if options.backup_scope != "none" and options.backups_dir is not None:
        unreadable = [r[0] for r in conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p', 'S', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_%%' AND n.nspname <> %s AND NOT has_table_privilege(c.oid, 'SELECT') ORDER BY 1",
            (options.metadata_schema,)).fetchall()]
        problem = backup_folder_problem(options.backups_dir)
        checks.append(Check("backup", not unreadable and problem is None,
                            "pg_dump can read every table" if not unreadable and problem is None else
                            problem or f"the backup cannot read: {', '.join(unreadable[:10])} "
                                       "(grant SELECT or set backup: none)"))
    extensions = sorted({s.object for s in steps if s.kind == "create_extension"})
    if extensions:
        rows = conn.execute(
            "SELECT e.name, e.trusted OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) "
            "FROM pg_available_extension_versions e WHERE e.name = ANY(%s) AND e.version = "
            "(SELECT default_version FROM pg_available_extensions a WHERE a.name = e.name)", (extensions,)).fetchall()
        allowed = {name for name, ok in rows if ok}
        missing = [e for e in extensions if e not in {name for name, _ in rows}]
        refused = [e for e in extensions if e not in allowed and e not in missing]
        problems = ([f"not installed on the server: {', '.join(missing)}"] if missing else []) + \
            ([f"not trusted and the role is not a superuser: {', '.join(refused)}"] if refused else [])
        checks.append(Check("extensions", not problems, "the role may create them" if not problems else "; ".join(problems)))
    return checks


def backup_folder_problem(folder: os.PathLike[str] | str) -> str | None:
    """Can a backup be written into ``folder`` (made if missing)? Tried for real, by creating a file there: the
    permission bits do not stop root, and a read-only filesystem or a file in the way stops everyone."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".reconciler-probe-"):
            pass
    except OSError as exc:
        return f"the backups folder {os.fspath(folder)} cannot be written: {exc.strerror or exc}"
    return None


def refuse_unless_target(plan: Plan, conn: psycopg.Connection[Any]) -> None:
    """Refuse a plan made for another database before anything else happens there."""
    enforce([target_check(plan, conn)], plan)
