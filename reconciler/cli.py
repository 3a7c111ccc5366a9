"""The command line: parse arguments, call the stages, format results, map errors to exit codes.

Exit codes (``cli_help.EXIT_CODES``): 0 success or nothing to do; 2 changes planned or drift found; 3 refused;
1 error; 64 usage error; 130 interrupted. Help texts live in ``cli_help``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__, cli_help, logs
from . import dsn as dsnlib
from .cli_help import EXIT_CHANGES, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from .config import (
    CONFIG_FILE,
    LOCAL,
    PASSPHRASE_ENV,
    PLANNER_KEY_ENV,
    WATCH_HOST,
    WATCH_PORT,
    Config,
    Environment,
    duration_seconds,
    find_config,
    load_config,
)
from .errors import ConfigError, ReconcilerError, RefusedError

if TYPE_CHECKING:
    from . import history
    from .apply import ApplyOptions, BackfillLimits
    from .plan import Plan
    from .render import ApprovalView
    from .safety import Step
    from .signing import PlannerKey, Requirements, Trust

# Start-up time: at module level only the light modules above (`--version`, `--help` and `init` need no more); each
# command imports the stages it uses inside its function (the pipeline pulls in psycopg, pglast, jsonschema and more).

log = logging.getLogger(__name__)



class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 64, not 2 (which means "changes planned"), and the global options may
    come after the command too: `-v` counts wherever it is given."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (exit {EXIT_USAGE}: usage error; see {self.prog} --help)\n")

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:  # typeshed's overloads, unchanged
        parsed, rest = super().parse_known_args(*args, **kwargs)
        if hasattr(parsed, "verbose") and hasattr(parsed, "verbose_after"):  # the top level: both counts known
            parsed.verbose += parsed.verbose_after
            del parsed.verbose_after
        return parsed, rest


def _global_options(p: argparse.ArgumentParser, *, after: bool) -> None:
    """Before the command they have their defaults; after it, an option given overrides the one before it and one
    not given leaves it alone (SUPPRESS), except `-v`, which adds up (its own dest, summed by _Parser)."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after else value

    p.add_argument("--config", "-c", type=Path, default=default(None), metavar="FILE",
                   help="path to reconciler.yaml (default: the nearest one in this folder or above)")
    p.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks of errors")
    p.add_argument("--verbose", "-v", action="count", dest="verbose_after" if after else "verbose", default=0,
                   help="more progress on stderr (-vv: debug logs)")
    p.add_argument("--log-format", choices=["text", "json"], default=default("text"),
                   help="logs as text, or one JSON object per line (default: text)")


def _target_options(p: argparse.ArgumentParser, env_default: str = "local") -> None:
    p.add_argument("--env", "-e", dest="env", help=f"environment from reconciler.yaml (default: {env_default})")
    p.add_argument("--database", "-d", dest="database", metavar="DSN", help="libpq DSN or URL of the target (overrides the environment's)")


def _schemas_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schemas", type=Path, metavar="DIR", help="folder of desired-schema .sql files (default: from reconciler.yaml)")


def _drops_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-mass-drops", action="store_true",
                   help="plan even when the plan drops every table of a schema, or most of the target's tables")


PLAN_FORMATS = ("text", "markdown", "json", "github", "sarif", "svg")  # reconciler.render's (not imported for --help)


def _shard(text: str) -> str:
    """``I/N`` with 0 <= I < N, checked as the arguments are read: a wrong one is a usage error."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(count) >= 1 and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r}: give I/N, shard I of N, with 0 <= I < N (e.g. 0/4)")
    return text


def _format_option(p: argparse.ArgumentParser, choices: Sequence[str] = ("text", "markdown", "json")) -> None:
    p.add_argument("--format", "-f", choices=list(choices), default="text", help="output format (default: text)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reconciler", description="Declarative schema reconciler for PostgreSQL.",
                     epilog=cli_help.exit_codes_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"reconciler {__version__}",
                        help="print the version and exit")
    _global_options(parser, after=False)
    after = _Parser(add_help=False)
    _global_options(after, after=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (`reconciler COMMAND --help` for its options, exit codes and an example)")

    def command(name: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[after], **cli_help.parser_options(name))

    p = command("init")
    p.add_argument("directory", nargs="?", type=Path, default=Path("."),
                   help="the project folder, made if missing (default: this one)")

    p = command("plan")
    _target_options(p)
    _schemas_option(p)
    _drops_option(p)
    p.add_argument("-o", "--out", type=Path, help="write the plan file here (a fleet: the folder for its plan files)")
    p.add_argument("--key", type=Path, help=f"sign the plan as planner with this key (or ${PLANNER_KEY_ENV})")
    _format_option(p, PLAN_FORMATS)

    p = command("show")
    p.add_argument("plan", type=Path, help="the plan file (a fleet's: the folder of its plan files)")
    _format_option(p, PLAN_FORMATS)

    p = command("approve")
    p.add_argument("plan", type=Path, help="the plan file (the signature is added to it)")
    p.add_argument("--key", type=Path, required=True, help="the approver's OpenSSH Ed25519 private key")

    p = command("verify-plan")
    p.add_argument("plan", type=Path, help="the plan file")
    _target_options(p, env_default="the plan's environment")
    p.add_argument("--offline", action="store_true", help="skip the checks that need the target database")

    p = command("backup")
    _target_options(p)
    p.add_argument("--scope", choices=["full", "touched"], default="full",
                   help="the whole database, or only the tables a plan would touch (default: full)")
    p.add_argument("-o", "--out", type=Path, help="archive path (default: the backups folder)")

    p = command("restore")
    p.add_argument("run_id", help="the run whose backup to restore (see `reconciler history`)")
    _target_options(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--into", help="DSN of the database to restore into (e.g. a fresh one)")
    where.add_argument("--into-target", action="store_true", help="overwrite the target itself (pg_restore --clean)")

    p = command("cancel")
    p.add_argument("run_id", nargs="?", help="the run to cancel (default: the one running)")
    p.add_argument("--wait", default="60s", metavar="DURATION", help="wait up to DURATION for the run to end and say how (0: do not wait)")
    _target_options(p)

    p = command("backfill")
    p.add_argument("action", choices=["status", "pause", "resume", "throttle"], help="what to do")
    p.add_argument("run_id", help="the run filling a column (see `reconciler history`; a unique prefix will do)")
    p.add_argument("--batch", metavar="DURATION", help="throttle: how long each batch should take (e.g. 100ms)")
    _target_options(p)

    p = command("verify")
    _target_options(p)
    _schemas_option(p)

    p = command("rollback")
    p.add_argument("run_id", help="the run whose starting schema to go back to (see `reconciler history`)")
    _target_options(p)
    p.add_argument("-o", "--out", type=Path, help="write the plan file here")
    p.add_argument("--plan-only", action="store_true", help="only plan, even where the environment may apply on its own")
    _drops_option(p)

    p = command("lint")
    p.add_argument("--env", "-e", dest="env", help="evaluate the rules scoped to this environment (default: local)")
    _schemas_option(p)

    p = command("keygen")
    p.add_argument("--out", type=Path, required=True, help="private key file; the public key goes to FILE.pub")
    p.add_argument("--comment", default="", help="comment for the public key (e.g. your e-mail)")
    p.add_argument("--encrypt", action="store_true", help=f"encrypt with a passphrase (${PASSPHRASE_ENV} or a prompt)")

    p = command("apply")
    p.add_argument("plan", type=Path, nargs="?", help="a plan file (for a fleet: a plan file or a folder of them)")
    p.add_argument("--auto", action="store_true", help="plan and apply in one go where the environment allows it")
    p.add_argument("--shard", metavar="I/N", type=_shard, help="fleets: shard I of N (0-based), e.g. an indexed Job's pod: each "
                                                  "database falls in one shard, by its server and name")
    p.add_argument("--concurrency", type=int, metavar="N", help="fleets: the most connections taken on each server "
                                                                   "(a database being applied holds two; default: the "
                                                                   "environment's concurrency, 4)")
    _format_option(p, ("text", "json"))
    p.add_argument("--hold-contract", action="store_true",
                   help="online rewrites: stop before each contract (the drop of the column or table a cut-over "
                        "replaced: `show` gives its steps); the old one is kept in step, so `reconciler rollback "
                        "RUN_ID` can still swap back in one short lock; a later plan drops it")
    _target_options(p, env_default="the plan's environment; with --auto, local")
    _schemas_option(p)
    _drops_option(p)

    p = command("diff")
    _target_options(p)
    _schemas_option(p)
    _drops_option(p)

    p = command("drift")
    _target_options(p)
    _schemas_option(p)
    _format_option(p, ("text", "json"))

    p = command("history")
    _target_options(p)
    _format_option(p, ("text", "json"))
    p.add_argument("--limit", type=int, default=20, help="the newest N runs (default: 20)")

    p = command("cache")
    p.add_argument("action", choices=["list", "clear"], help="list the templates, or drop them all")
    _target_options(p)

    p = command("watch")
    _target_options(p)
    _schemas_option(p)
    _drops_option(p)
    p.add_argument("--interval", default="5min", metavar="DURATION", help="check for drift every DURATION (300, 30s, 5min; default 5min)")
    p.add_argument("--listen", default=f"{WATCH_HOST}:{WATCH_PORT}", metavar="HOST:PORT",
                   help="HOST:PORT serving /healthz and /metrics (port 0: any free port; 'off': none; "
                        "default: %(default)s)")
    p.add_argument("--plans-dir", type=Path, help="where plans that may not apply on their own go (default: plans: folder)")
    p.add_argument("--key", type=Path, help=f"sign the plans it writes as planner with this key (or ${PLANNER_KEY_ENV})")
    return parser


def _project(args: argparse.Namespace) -> Config:
    """The project's config; outside a project (no reconciler.yaml here or above, no --config) a one-line error
    before anything is made (an embedded cluster under ./.reconciler would be the first thing)."""
    if args.config is None and find_config(Path.cwd()) is None:
        raise ConfigError(f"not in a reconciler project: no {CONFIG_FILE} in {Path.cwd()} or any folder above "
                          "(run `reconciler init` to start one here, or give --config FILE)")
    return load_config(args.config)


# --- commands ----------------------------------------------------------------------------------

def _env(config: Config, args: argparse.Namespace) -> Environment:
    env = config.environment(args.env, args.database)
    if getattr(args, "allow_mass_drops", False):
        env = dataclasses.replace(env, allow_mass_drops=True)
    return env


def cmd_init(args: argparse.Namespace) -> int:
    root: Path = args.directory.resolve()
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "reconciler.yaml": _INIT_CONFIG,
        "schemas/001_app.sql": _INIT_SCHEMA,
        "policies/README.md": "Policy files (YAML) go here, with trust.yaml for approvers' keys.\n",
        "policies/trust.yaml": _INIT_TRUST,
        "plans/.gitkeep": "",
    }
    for rel, content in files.items():
        path = root / rel
        if path.exists():
            print(f"kept     {rel} (exists)")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"created  {rel}")
    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    if ".reconciler/" not in lines:
        gitignore.write_text("\n".join([*lines, ".reconciler/"]) + "\n")
        print("updated  .gitignore (.reconciler/ holds the local embedded database)")
    print(f"\nNext: edit schemas/, then run `reconciler plan` in {root}")
    return EXIT_OK


def _requirements(env: Environment) -> Requirements:
    from .signing import Requirements

    return Requirements(approvals=env.approvals, groups=env.approval_groups, require_signed=env.require_signed_plans)


def _trust(config: Config, *, needed: bool) -> Trust | None:
    from .signing import load_trust

    if needed or config.trust_file.is_file():
        return load_trust(config.trust_file)
    return None


def _approval_view(config: Config, env: Environment, plan: Plan, plan_path: Path | None) -> ApprovalView | None:
    from .config import APPROVER_KEY_PATH
    from .render import ApprovalView
    from .signing import Requirements, approval_status

    base = _requirements(env)
    policy = plan.body.policy
    req = Requirements(approvals=max(base.approvals, policy.approvals),
                       groups=tuple(dict.fromkeys([*base.groups, *policy.groups])), require_signed=base.require_signed)
    if not req.approvals and not req.groups:
        return None
    status = approval_status(plan, _trust(config, needed=False), req)
    target = str(plan_path) if plan_path else "PLAN"
    return ApprovalView(
        given=status.approvers, required=req.approvals, missing_groups=status.missing_groups,
        command=f"reconciler approve {shlex.quote(target)} --key {APPROVER_KEY_PATH}",
    )


def cmd_plan(args: argparse.Namespace, config: Config) -> int:
    from .pipeline import make_plan, open_servers
    from .planfile import write_plan
    from .render import render
    from .signing import sign_as_planner

    env = _env(config, args)
    if env.is_fleet:
        from . import cli_fleet

        return cli_fleet.plan(args, config, env, _planner_key(args, config),
                              lambda plan, path: _approval_view(config, env, plan, path))
    key = _planner_key(args, config)
    with open_servers(config, env) as servers:
        plan = make_plan(config, env, servers, schemas_dir=args.schemas).plan
    if key is not None:
        plan = sign_as_planner(plan, key)
    if args.out:
        write_plan(plan, args.out)
    sys.stdout.write(render(plan, args.format, _approval_view(config, env, plan, args.out)))
    if plan.body.policy.denied:
        for finding in plan.body.policy.denied:
            print(f"denied: {finding}", file=sys.stderr)
        return EXIT_REFUSED
    if args.out:
        print(f"\nSaved plan {plan.short_id} to {args.out}", file=sys.stderr)
    elif plan.body.steps:
        print("\nSave it with -o FILE to approve and apply it later.", file=sys.stderr)
    return EXIT_CHANGES if plan.body.steps else EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """A plan file; a folder of them (a fleet's): each in turn, or in markdown one comment for them all."""
    from .planfile import read_plan
    from .render import render
    from .render.fleet import write_fleet

    paths = sorted(args.plan.glob("*.json")) if args.plan.is_dir() else [args.plan]
    if not paths:
        raise ConfigError(f"{args.plan}: no plan files (*.json) in this folder")
    config_path = args.config or find_config(Path.cwd())
    config = load_config(config_path) if config_path is not None else None
    shown = []
    for path in paths:
        plan = read_plan(path)
        env = config.environments.get(plan.body.environment) if config is not None else None
        shown.append((plan, _approval_view(config, env, plan, path) if config is not None and env is not None else None))
    if args.format == "markdown" and args.plan.is_dir():
        from .fleet.planning import current

        newest = {p.id for p in current([plan for plan, _view in shown])[0]}
        if len(newest) < len(shown):  # planned again: each database counted once, with its newest plan
            print(f"{len(shown) - len(newest)} older plan(s) in {args.plan} left out: each of their databases has a "
                  "newer plan there", file=sys.stderr)
        write_fleet([(plan, view) for plan, view in shown if plan.id in newest], sys.stdout)
    else:
        for plan, view in shown:
            sys.stdout.write(render(plan, args.format, view))
    return EXIT_OK


def cmd_approve(args: argparse.Namespace, config: Config) -> int:
    from .signing import approve_file, key_fingerprint, load_trust

    trust = load_trust(config.trust_file)
    plan, signature = approve_file(args.plan, args.key, trust)
    print(f"Approved plan {plan.short_id} as {signature.signer} ({key_fingerprint(signature.key)}).")
    if plan.body.environment in config.environments:
        view = _approval_view(config, config.environments[plan.body.environment], plan, args.plan)
        if view is not None:
            print(f"Approvals: {view.describe()}.")
    return EXIT_OK


def _env_for_plan(config: Config, args: argparse.Namespace, plan: Plan) -> Environment:
    """--env when given, else the environment the plan was made for (its rules come from our config)."""
    if args.env is None and plan.body.environment in config.environments:
        return config.environment(plan.body.environment, args.database)
    return _env(config, args)


def cmd_verify_plan(args: argparse.Namespace, config: Config) -> int:
    from .apply import plan_checks
    from .pipeline import open_servers
    from .planfile import read_plan
    from .servers import connect

    plan = read_plan(args.plan)
    env = _env_for_plan(config, args, plan)
    options = _apply_options(config, env, plan_file=True)
    if args.offline:
        checks = plan_checks(plan, options, None)
    else:
        with open_servers(config, env, need_shadow=False) as servers, connect(servers.target_dsn) as conn:
            checks = plan_checks(plan, options, conn)
    print(f"Plan {plan.short_id} for environment {env.name}:")
    for check in checks:
        print(f"  {'ok  ' if check.ok else 'FAIL'}  {check.name:<12} {check.message}")
    failed = [c for c in checks if not c.ok]
    print("All checks passed." if not failed else f"{len(failed)} check(s) failed: apply would refuse this plan.")
    return EXIT_REFUSED if failed else EXIT_OK


def cmd_lint(args: argparse.Namespace, config: Config) -> int:
    from .pipeline import lint_schema

    findings = lint_schema(config, args.env or LOCAL, schemas_dir=args.schemas)
    for finding in findings:
        print(finding)
    denied = [f for f in findings if f.severity == "deny"]
    print(f"{len(findings)} finding(s), {len(denied)} denied." if findings else "No findings: the schema follows the rules.")
    return EXIT_REFUSED if denied else EXIT_OK


def _run_by_id(conn: Any, config: Config, run_id: str) -> history.Run:
    """The run named by its id or a unique prefix of it."""
    from . import history

    return history.find_run(conn, config.metadata_schema, run_id)


def cmd_backfill(args: argparse.Namespace, config: Config) -> int:
    from . import history
    from .apply import settle
    from .pipeline import open_servers
    from .servers import connect

    wrong = ("backfill throttle needs --batch DURATION (how long each batch should take, e.g. 100ms)"
             if args.action == "throttle" and not args.batch else
             "--batch goes with backfill throttle" if args.batch and args.action != "throttle" else "")
    if wrong:
        print(f"reconciler backfill: error: {wrong} (exit {EXIT_USAGE}: usage error; see reconciler backfill --help)",
              file=sys.stderr)
        return EXIT_USAGE
    if args.batch:
        duration_seconds(args.batch)  # a malformed one is refused before anything is asked
    env = _env(config, args)
    with open_servers(config, env, need_shadow=False) as servers, connect(servers.target_dsn) as conn:
        settle(conn, config.metadata_schema)
        run = _run_by_id(conn, config, args.run_id)
        if args.action == "status":
            print(_backfill_status(run))
            return EXIT_OK
        changes: dict[str, Any] = {"paused": True, "by": history.actor()} if args.action == "pause" else \
            {"paused": False} if args.action == "resume" else {"batch_seconds": duration_seconds(args.batch)}
        if run.shown_status != "running" or not history.request_backfill(conn, config.metadata_schema, run.id, changes):
            raise RefusedError(f"run {run.id} is not running (it is {run.shown_status}): nothing to {args.action}")
    said = {"pause": "to pause before its next batch (what is filled stays; the trigger keeps filling new writes)",
            "resume": "to go on", "throttle": f"to make each batch take about {args.batch}"}[args.action]
    print(f"Asked run {run.id}'s backfill {said}.")
    if not (run.backfill or {}).get("progress"):
        print("It has not begun filling yet: it will see the request when it does.")
    return EXIT_OK


def _backfill_status(run: history.Run) -> str:
    from .apply.backfill import batch_time
    from .apply.backfill import describe as describe_backfill

    progress = (run.backfill or {}).get("progress")
    requested = (run.backfill or {}).get("requested") or {}
    if not progress:
        step = next((s for s in run.statements if s.get("kind") == "backfill"), None)
        if step is None:
            return f"Run {run.id} ({run.shown_status}): no backfill step has begun."
        return (f"Run {run.id} ({run.shown_status}): backfill {step.get('object')} (step {step.get('index')}) "
                f"{step.get('status')} in {float(step.get('duration_ms') or 0) / 1000:.1f}s (no progress was "
                "recorded: the metadata schema was older than version 5 then)")
    state = progress.get("state")
    if run.shown_status != "running" and state != "done":
        state = f"stopped ({run.shown_status})"
    lines = [f"Run {run.id} ({run.shown_status}): {describe_backfill(progress, str(state))} "
             f"(as of {progress.get('updated_at')})"]
    if progress.get("reason"):
        lines.append(f"  waiting: {progress['reason']}")
    if requested.get("batch_seconds"):
        lines.append(f"  batches of about {batch_time(float(requested['batch_seconds']))} (throttled)")
    return "\n".join(lines)


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    from datetime import UTC, datetime

    from . import backup
    from .pipeline import open_servers

    env = _env(config, args)
    with open_servers(config, env, need_shadow=False) as servers:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = args.out or config.backups_dir / f"{dsnlib.database_name(servers.target_dsn) or 'db'}-{stamp}.dump"
        result = backup.dump(servers.target_dsn, server_major=servers.target_major, path=path, scope=args.scope,
                             exclude_schemas=())
    print(f"Backup written to {result.path} ({result.size:,} bytes, sha256 {result.sha256})")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    from . import backup
    from .pipeline import open_servers
    from .servers import connect

    env = _env(config, args)
    with open_servers(config, env, need_shadow=False) as servers:
        with connect(servers.target_dsn) as conn:
            run = _run_by_id(conn, config, args.run_id)
        if not run.backup_path:
            raise ReconcilerError(f"run {run.id} has no backup (backup: none for environment {run.environment!r})")
        into = servers.target_dsn if args.into_target else args.into
        backup.restore(Path(run.backup_path), into, server_major=servers.target_major, expected_sha256=run.backup_sha256,
                       clean=bool(args.into_target))
    print(f"Restored the backup of run {run.id} ({run.backup_path}) into {dsnlib.describe(into)}.")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    import time

    from . import history, runlock
    from .apply import settle
    from .pipeline import open_servers
    from .servers import connect

    env = _env(config, args)
    schema = config.metadata_schema
    with open_servers(config, env, need_shadow=False) as servers, connect(servers.target_dsn) as conn:
        settle(conn, schema)
        if args.run_id:
            run = _run_by_id(conn, config, args.run_id)
            if run.shown_status != "running":
                raise RefusedError(f"run {run.id} is not running (it is {run.shown_status})")
        else:
            running = [r for r in history.running_runs(conn, schema) if r.alive]
            if not running:
                print("No apply is running on this database.")
                return EXIT_OK
            run = running[-1]
        if not history.request_cancel(conn, schema, run.id):
            ended = history.get_run(conn, schema, run.id)
            print(f"Run {run.id} had already ended ({ended.shown_status if ended else 'gone'}); nothing to stop.")
            return EXIT_OK
        sent = run.backend_pid is not None and runlock.cancel(conn, run.backend_pid, run.backend_start)
        print(f"Asked run {run.id} to stop" + (" and cancelled its running statement." if sent else
                                                " (it stops before its next step)."))
        deadline = time.monotonic() + duration_seconds(args.wait)
        ended = history.get_run(conn, schema, run.id)
        while ended is not None and ended.shown_status == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            ended = history.get_run(conn, schema, run.id)
    if ended is None or ended.shown_status == "running":
        if duration_seconds(args.wait) > 0:
            print(f"Run {run.id} is still running after {args.wait}; `reconciler history` shows how it ends.")
        return EXIT_OK
    print(f"Run {run.id} ended {ended.shown_status}" + (f": {ended.error}" if ended.error else "."))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    from .history import held_by, held_contracts
    from .pipeline import drift, open_servers
    from .policy import evaluate, load_policies, run_assertion
    from .servers import connect

    env = _env(config, args)
    if env.is_fleet:
        raise ConfigError(f"environment {env.name!r} is a fleet: verify checks one database (--database DSN); "
                          f"`reconciler drift --env {env.name}` compares every database with the desired schema")
    with open_servers(config, env) as servers:
        differences = drift(config, servers, schemas_dir=args.schemas)
        with connect(servers.target_dsn) as conn:
            held = held_contracts(conn, config.metadata_schema) if differences else {}
            kept = {str(d): run for d in differences for run in [held_by(held, d.name, d.change)] if run}
            differences = [d for d in differences if str(d) not in kept]
            invalid = [r[0] for r in conn.execute(
                "SELECT i.indexrelid::regclass::text FROM pg_index i WHERE NOT i.indisvalid ORDER BY 1").fetchall()]
            not_valid = [r[0] for r in conn.execute(
                "SELECT conrelid::regclass::text || '.' || conname FROM pg_constraint WHERE NOT convalidated "
                "AND conrelid <> 0 ORDER BY 1").fetchall()]
            rules = load_policies(config.policies_dir, skip=[config.trust_file])
            post = evaluate(rules, env.name, (), None).assertions
            failed = [f"{a.rule} ({a.file}:{a.line}) {why}" for a in post if a.when == "after" and a.action != "warn"
                      for why in [run_assertion(conn, a)] if why]
    print(f"{'ok  ' if not differences else 'FAIL'}  schema       "
          + ("matches the desired schema" + (" but for what a held contract kept (below)" if kept else "")
             if not differences else ", ".join(str(d) for d in differences[:10])))
    for run in sorted(set(kept.values())):  # there on purpose: not a failure, said so nobody drops them by hand
        mine = [name for name, r in kept.items() if r == run]
        print(f"held  contract     {len(mine)} object(s) the contract of run {run} held (apply --hold-contract), kept "
              f"in step for the way back: {', '.join(mine[:6])}{' ...' if len(mine) > 6 else ''}; `reconciler "
              f"rollback {run}` swaps back, the next applied plan drops them")
    print(f"{'ok  ' if not invalid else 'FAIL'}  indexes      " + ("none INVALID" if not invalid else "INVALID: " + ", ".join(invalid)))
    print("info  constraints  " + ("none NOT VALID" if not not_valid else "NOT VALID: " + ", ".join(not_valid)))
    print(f"{'ok  ' if not failed else 'FAIL'}  assertions   " + ("postconditions hold" if not failed else "; ".join(failed)))
    return EXIT_CHANGES if differences or invalid or failed else EXIT_OK


def cmd_rollback(args: argparse.Namespace, config: Config) -> int:
    import dataclasses
    import tempfile

    from . import backup
    from .apply import apply_plan
    from .pipeline import auto_apply_blockers, make_plan, open_servers
    from .planfile import write_plan
    from .render import render
    from .servers import connect

    env = _env(config, args)
    with open_servers(config, env) as servers:
        with connect(servers.target_dsn) as conn:
            run = _run_by_id(conn, config, args.run_id)
        if not run.backup_path:
            raise ReconcilerError(f"run {run.id} has no backup to take its starting schema from")
        with tempfile.TemporaryDirectory(prefix="reconciler-rollback-") as tmp:
            schemas = Path(tmp) / "schemas"
            backup.schema_sql(Path(run.backup_path), schemas / "before.sql", server_major=servers.target_major,
                              expected_sha256=run.backup_sha256)
            plan = make_plan(config, env, servers, schemas_dir=schemas).plan
        if args.out:
            write_plan(plan, args.out)
        sys.stdout.write(render(plan, "text", _approval_view(config, env, plan, args.out)))
        if not plan.body.steps:
            return EXIT_OK
        if plan.body.policy.denied:  # no approval makes it applicable: say so, not how to approve it
            for finding in plan.body.policy.denied:
                print(f"denied: {finding}", file=sys.stderr)
            print(f"\nThe way back to the schema run {run.id} started from is denied by policy; approvals do not "
                  "change that.", file=sys.stderr)
            return EXIT_REFUSED
        if args.plan_only or auto_apply_blockers(env, plan):
            print(f"\nThe way back to the schema run {run.id} started from: approve and apply it like any plan"
                  + ("" if args.out else " (save it with -o)") + ".", file=sys.stderr)
            return EXIT_CHANGES
        options = dataclasses.replace(_apply_options(config, env, plan_file=False), on_backup=_announce_backup)
        result = apply_plan(plan, servers.target_dsn, options)
    print(f"Rolled back to the schema run {run.id} started from: {len(result.steps)} step(s) (run {result.run_id}).")
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    import getpass

    from .signing import generate_keypair, key_fingerprint, trust_entries

    passphrase: bytes | None = None
    if args.encrypt:
        env_value = os.environ.get(PASSPHRASE_ENV)
        if env_value:
            passphrase = env_value.encode()
        elif not sys.stdin.isatty():  # as approve says it: getpass would warn, then fail on the closed input
            raise ConfigError(f"--encrypt needs a passphrase: set {PASSPHRASE_ENV} or run in a terminal")
        else:
            first = getpass.getpass("Passphrase: ")
            if first != getpass.getpass("Again: "):
                raise ReconcilerError("the passphrases differ")
            passphrase = first.encode()
        if not passphrase:
            raise ReconcilerError("an empty passphrase encrypts nothing; leave out --encrypt instead")
    public = generate_keypair(args.out, comment=args.comment, passphrase=passphrase)
    print(f"Wrote {args.out} (private, mode 0600) and {args.out}.pub")
    print(f"Fingerprint: {key_fingerprint(public)}")
    approver, planner = trust_entries(args.comment or args.out.name, public)
    print(f"\nTo approve plans with it, paste this under `approvers:` in policies/trust.yaml (groups: e.g. [dba]):\n"
          f"{approver}To sign plans as planner with it (CI's key), paste this under `planners:` instead:\n{planner}", end="")
    return EXIT_OK


def _apply_options(config: Config, env: Environment, *, plan_file: bool) -> ApplyOptions:
    """A plan made in this process (--auto) was never a file, so it needs no planner signature."""
    from .apply import ApplyOptions
    from .signing import Requirements

    req = _requirements(env)
    if not plan_file:
        req = Requirements(approvals=req.approvals, groups=req.groups, require_signed=False)
    return ApplyOptions(
        environment=env.name,
        metadata_schema=config.metadata_schema,
        lock_wait_seconds=env.lock_wait_seconds,
        lock_retries=env.lock_retries,
        backfill=_backfill_limits(env),
        verify_before_commit=env.verify_before_commit,
        allow_unrehearsed=env.allow_unrehearsed,
        auto_rollback=env.auto_rollback,
        backup_scope=env.backup,
        backups_dir=config.backups_dir,
        requirements=req,
        trust=_trust(config, needed=req.require_signed or bool(req.approvals or req.groups)),
    )


def _backfill_limits(env: Environment) -> BackfillLimits:
    from .apply import BackfillLimits
    from .config import duration_seconds, size_bytes

    settings = env.backfill
    return BackfillLimits(batch_seconds=duration_seconds(settings.batch),
                          max_replica_lag_seconds=duration_seconds(settings.max_replica_lag),
                          max_replica_bytes=size_bytes(settings.max_replica_bytes),
                          max_lock_waiters=settings.max_lock_waiters,
                          max_transaction_age_seconds=duration_seconds(settings.max_transaction_age),
                          workers=settings.workers)


def _announce_backup(taken: Any) -> None:
    print(f"Backup written to {taken.describe()}, private to its owner", file=sys.stderr)


@contextlib.contextmanager
def _progress(args: argparse.Namespace, options: ApplyOptions, total: int) -> Iterator[ApplyOptions]:
    """A live status line on a terminal (rich); nothing when output goes to a file or logs are JSON."""
    from dataclasses import replace

    from rich.console import Console

    from .apply.backfill import describe as describe_backfill

    console = Console(stderr=True)
    if not console.is_terminal or args.log_format == "json" or total == 0:
        yield options
        return
    with console.status(f"applying {total} steps") as status:
        def show(step: Step) -> None:
            status.update(f"step {step.index}/{total}: {step.kind} {step.object}")

        def filling(progress: dict[str, Any]) -> None:
            if options.on_backfill is not None:
                options.on_backfill(progress)
            reason = f"; waiting: {progress['reason']}" if progress.get("reason") else ""
            status.update(f"step {progress.get('step')}/{total}: {describe_backfill(progress)}{reason}")
        yield replace(options, on_step=show, on_backfill=filling)


def _planner_key(args: argparse.Namespace, config: Config) -> PlannerKey | None:
    from .signing import load_trust, planner_key

    key_path = args.key or (Path(os.environ[PLANNER_KEY_ENV]) if os.environ.get(PLANNER_KEY_ENV) else None)
    return planner_key(key_path, load_trust(config.trust_file)) if key_path else None


def _fleet_of_plans(config: Config, args: argparse.Namespace) -> Environment | None:
    """Without --env: the fleet environment a plan file (or a folder's first plan) was made for, if it is one."""
    from .planfile import read_plan

    if args.plan is None or args.database is not None:
        return None
    first = min(args.plan.glob("*.json"), default=None) if args.plan.is_dir() else args.plan
    if first is None:
        raise ReconcilerError(f"no plan file (*.json) in {args.plan}")
    made_for = config.environments.get(read_plan(first).body.environment)
    return made_for if made_for is not None and made_for.is_fleet else None


def cmd_apply(args: argparse.Namespace, config: Config) -> int:
    from dataclasses import replace

    from .apply import apply_plan
    from .pipeline import auto_apply_blockers, make_plan, open_servers
    from .planfile import read_plan
    from .render import render

    fleet_env = _env(config, args) if args.env is not None else _fleet_of_plans(config, args)
    if fleet_env is not None and fleet_env.is_fleet:
        from . import cli_fleet

        options = dataclasses.replace(_apply_options(config, fleet_env, plan_file=not args.auto),
                                      hold_contract=args.hold_contract)
        return cli_fleet.apply(args, config, fleet_env, options)
    for flag, value in (("--shard", args.shard), ("--concurrency", args.concurrency),
                        ("--format", None if args.format == "text" else args.format)):
        if value is not None:
            raise ConfigError(f"{flag} is for fleets (an environment with `databases:`); "
                              + (f"environment {args.env!r} has one database" if args.env else "give --env FLEET"))
    if args.auto == (args.plan is not None):
        raise ReconcilerError("give either a plan file or --auto")
    if args.auto:
        env = _env(config, args)
        blockers = auto_apply_blockers(env)
        if blockers:
            raise RefusedError(f"environment {env.name!r} does not allow --auto ({'; '.join(blockers)}): plan, approve, then apply")
        options = replace(_apply_options(config, env, plan_file=False), on_backup=_announce_backup,
                          hold_contract=args.hold_contract)
        with open_servers(config, env) as servers:
            plan = make_plan(config, env, servers, schemas_dir=args.schemas).plan
            sys.stdout.write(render(plan, "text"))
            sys.stdout.flush()
            blockers = auto_apply_blockers(env, plan)
            if blockers:
                raise RefusedError("; ".join(blockers) + ": plan -o, approve, apply")
            with _progress(args, options, len(plan.body.steps)) as shown:
                result = apply_plan(plan, servers.target_dsn, shown)
    else:
        plan = read_plan(args.plan)
        env = _env_for_plan(config, args, plan)
        options = replace(_apply_options(config, env, plan_file=True), on_backup=_announce_backup,
                          hold_contract=args.hold_contract)
        with open_servers(config, env, need_shadow=False) as servers, \
                _progress(args, options, len(plan.body.steps)) as shown:
            result = apply_plan(plan, servers.target_dsn, shown)
    if result.status == "nothing":
        print(f"Nothing to apply: {plan.body.target.database} already matches plan {plan.short_id}.")
        return EXIT_OK
    total_ms = sum(s.duration_ms for s in result.steps)
    held = [s for s in result.steps if s.status == "held"]
    done = len(result.steps) - len(held)
    print(f"Applied plan {plan.short_id}: {done} step(s) in {total_ms:.0f} ms (run {result.run_id}).")
    if held:
        contracts = [s for s in held if s.kind == "contract"]
        kept = ", ".join(s.object for s in contracts)
        what = " or ".join(sorted({"table" if s.sql.startswith("DROP TABLE") else "column" for s in contracts}))
        print(f"Contract held ({len(held)} step(s)): {kept} kept, in step with the {what} that took its place. "
              f"`reconciler rollback {result.run_id}` swaps back in one short lock; the next plan drops "
              f"{'it' if len(contracts) == 1 else 'them'}.")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, config: Config) -> int:
    from .pipeline import make_plan, open_servers

    env = _env(config, args)
    with open_servers(config, env) as servers:
        plan = make_plan(config, env, servers, schemas_dir=args.schemas).plan
    for step in plan.body.steps:
        print(step.sql.rstrip().rstrip(";") + ";\n")
    return EXIT_CHANGES if plan.body.steps else EXIT_OK


def cmd_drift(args: argparse.Namespace, config: Config) -> int:
    from .history import held_by, held_contracts
    from .inspect import DIFFERENCES
    from .pipeline import drift, open_servers
    from .servers import connect

    env = _env(config, args)
    if env.is_fleet:
        from . import cli_fleet

        return cli_fleet.drift(args, config, env)
    with open_servers(config, env) as servers:
        differences = drift(config, servers, schemas_dir=args.schemas)
        held: dict[str, str] = {}
        if differences:
            with connect(servers.target_dsn) as conn:
                held = held_contracts(conn, config.metadata_schema)
    if args.format == "json":
        print(json.dumps({"differences": [{"object": d.name, "change": d.change, "held_by": held_by(held, d.name, d.change)}
                                          for d in differences]}, indent=2))
        return EXIT_CHANGES if differences else EXIT_OK
    if not differences:
        print("No drift: the live schema matches the desired schema.")
        return EXIT_OK
    print(f"Drift: {len(differences)} object(s) differ from the desired schema:")
    kept: dict[str, int] = {}
    for diff in differences:
        run = held_by(held, diff.name, diff.change)
        if run is not None:
            kept[run] = kept.get(run, 0) + 1
        print(f"  {diff}" + (f" [held contract of run {run}]" if run else ""))
    print("(" + "; ".join(f"{word}: {meaning}" for word, meaning in DIFFERENCES.items()
                          if any(d.change == word for d in differences)) + ")")
    for run, count in kept.items():  # kept on purpose: said so, so that nobody drops them by hand
        print(f"{count} of them are the contract run {run} held (apply --hold-contract), kept in step for the way "
              f"back: `reconciler rollback {run}` swaps back; the next applied plan drops them")
    return EXIT_CHANGES


def cmd_history(args: argparse.Namespace, config: Config) -> int:
    from . import history
    from .apply import settle
    from .pipeline import open_servers
    from .servers import connect

    env = _env(config, args)
    if env.is_fleet:
        from . import cli_fleet

        return cli_fleet.history(args, config, env)
    with open_servers(config, env, need_shadow=False) as servers, connect(servers.target_dsn) as conn:
        settle(conn, config.metadata_schema)
        runs = history.list_runs(conn, config.metadata_schema, limit=args.limit)
    if args.format == "json":
        print(json.dumps([_run_json(r) for r in runs], indent=2, default=str))
        return EXIT_OK
    if not runs:
        print("No runs recorded in this database yet.")
        return EXIT_OK
    print(f"{'RUN':<36}  {'STATUS':<11}  {'STARTED (UTC)':<19}  {'TOOK':>7}  {'STEPS':>5}  {'PLAN':<12}  BY")
    for r in runs:
        took = f"{(r.finished_at - r.started_at).total_seconds():.1f}s" if r.finished_at else "-"
        print(f"{r.id:<36}  {r.shown_status:<11}  {r.started_at:%Y-%m-%d %H:%M:%S}  {took:>7}  {len(r.statements):>5}  "
              f"{r.plan_id.removeprefix('sha256:')[:12]:<12}  {r.actor}@{r.client_host}")
        if r.error:
            print(f"{'':<38}error: {r.error.splitlines()[0][:300]}")
        elif r.shown_status != r.status:
            print(f"{'':<38}its applying session is gone (not yet recorded: this role may not write the history)")
        pending = [str(e["object"]) for e in r.cleanup if e.get("status") == "pending"]
        if pending:
            print(f"{'':<38}left to remove (by the next command that can): {', '.join(pending)}")
        held = [str(s.get("object")) for s in r.statements if s.get("status") == "held" and s.get("kind") == "contract"]
        if held:
            print(f"{'':<38}contract held (apply --hold-contract): {', '.join(held)} kept in step; "
                  f"`reconciler rollback {r.id}` swaps back, the next plan drops {'it' if len(held) == 1 else 'them'}")
        if r.backup_path:
            print(f"{'':<38}backup: {r.backup_path} ({r.backup_bytes or 0:,} bytes)")
        if (r.backfill or {}).get("progress") and (r.shown_status == "running"
                                                   or (r.backfill or {})["progress"].get("state") != "done"):
            print(f"{'':<38}" + _backfill_status(r).split(": ", 1)[1].split("\n")[0])
    return EXIT_OK


def _run_json(run: history.Run) -> dict[str, Any]:
    """The row as recorded, with ``status`` the truth (see Run.shown_status) and the recorded one beside it."""
    found = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in run.__dict__.items()}
    found["recorded_status"], found["status"] = run.status, run.shown_status
    return found


def cmd_cache(args: argparse.Namespace, config: Config) -> int:
    from . import shadowcache
    from .pipeline import open_servers

    env = _env(config, args)
    with open_servers(config, env) as servers:
        if args.action == "clear":
            from .diff.inspections import InspectionCache, default_folder

            dropped = shadowcache.clear(servers.shadow)
            print(f"Dropped {len(dropped)} shadow template(s)" + (f": {', '.join(dropped)}" if dropped else "."))
            removed = InspectionCache(default_folder()).clear()
            print(f"Removed {removed} saved inspection file(s) from {default_folder()}.")
            return EXIT_OK
        templates = shadowcache.list_templates(servers.shadow)
    if not templates:
        print("No shadow templates on this shadow server.")
        return EXIT_OK
    print(f"{'TEMPLATE':<36}  {'LAST USED (UTC)':<19}  {'SIZE':>9}  {'TOOL':<8}  {'HOLDS':<9}  SCHEMA FINGERPRINT")
    for t in templates:
        print(f"{t.name:<36}  {t.last_used:%Y-%m-%d %H:%M:%S}  {(t.size_bytes or 0) / 1048576:>7.1f}MB  {t.tool:<8}  "
              f"{t.kind:<9}  {t.fingerprint}")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, config: Config) -> int:
    import functools

    from .signing import sign_as_planner
    from .watch import DEFAULT_HOST, DEFAULT_PORT, Watcher, WatchOptions, parse_listen

    env = _env(config, args)
    interval = duration_seconds(args.interval)
    if interval <= 0:
        raise ConfigError(f"--interval {args.interval!r}: give a duration over 0")
    listen = args.listen or f"{DEFAULT_HOST}:{DEFAULT_PORT}"
    host, port = (DEFAULT_HOST, None) if listen == "off" else parse_listen(listen)
    key = _planner_key(args, config)
    options = WatchOptions(plans_dir=args.plans_dir or config.plans_dir, interval_seconds=interval, host=host, port=port,
                           schemas_dir=args.schemas, sign=None if key is None else functools.partial(sign_as_planner, key=key))
    reports = logging.getLogger("reconciler.watch")
    if reports.getEffectiveLevel() > logging.INFO:
        reports.setLevel(logging.INFO)  # what the watcher reports is its output
    if env.is_fleet:
        from .fleet.watching import FleetWatcher

        FleetWatcher(config, env, options, _apply_options(config, env, plan_file=False)).run()
    else:
        Watcher(config, env, options, _apply_options(config, env, plan_file=False)).run()
    return EXIT_OK


_COMMANDS = {
    "plan": cmd_plan, "apply": cmd_apply, "diff": cmd_diff, "drift": cmd_drift, "history": cmd_history,
    "approve": cmd_approve, "verify-plan": cmd_verify_plan, "lint": cmd_lint, "backup": cmd_backup,
    "restore": cmd_restore, "cancel": cmd_cancel, "backfill": cmd_backfill, "verify": cmd_verify, "rollback": cmd_rollback,
    "watch": cmd_watch, "cache": cmd_cache,
}
_NO_CONFIG = {"init": cmd_init, "show": cmd_show, "keygen": cmd_keygen}


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


M_ARENA_MAX = -8  # glibc's mallopt parameter


def fewer_malloc_arenas(count: int = 2) -> bool:
    """At most ``count`` malloc arenas, as MALLOC_ARENA_MAX would (unless that is set): glibc gives each thread
    that allocates an arena of its own (up to eight per core), and memory freed in one is not reused by another. A
    plan reads in several threads (live, desired, migra's two inspections): the 5,000-table plan's peak was 20 to
    40 MiB higher, by how the threads happened to interleave (296 against 255 MiB in one pair of runs). Call it
    before any thread starts. False where there is no glibc (musl, macOS) or the variable decides."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, count))
    except (OSError, AttributeError):
        return False


def run() -> NoReturn:
    """The ``reconciler`` command. Once a command has finished, the interpreter would free every module and object
    one by one before the process ends: a tenth of a second after a plan (600 modules), longer after a big one.
    So when the command is done, no other thread is working, exit handlers have run and the output is flushed,
    the process ends at once. Anything else (an exception, a thread still working, a failed flush) exits as usual."""
    if threading.current_thread() is threading.main_thread():  # first: a SIGTERM from now on is a clean cancel
        signal.signal(signal.SIGTERM, _on_sigterm)
    fewer_malloc_arenas()
    try:
        code = main()
    except KeyboardInterrupt:  # before main's own handling began (parsing the arguments): nothing was done yet
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()  # logging's shutdown (flushes log files), finalizers registered to run at exit
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe or stream: the interpreter's own exit reports it
        sys.exit(code)
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (EXIT_USAGE): a code, as for any command
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logs.setup(args.log_format, args.verbose)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command in _NO_CONFIG:
            return _NO_CONFIG[args.command](args)
        return _COMMANDS[args.command](args, _project(args))
    except ReconcilerError as exc:
        if args.debug:
            log.exception("failed")
        print(f"error: {dsnlib.redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader stopped reading (`| head`): nothing left to say, and nowhere to say it
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush must not fail again
        return EXIT_ERROR
    except Exception as exc:  # a bug: say so in one line unless --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {dsnlib.redact(str(exc))} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


_INIT_CONFIG = """\
# pg-reconciler configuration. Folders are relative to this file.
schemas: schemas
policies: policies
plans: plans

environments:
  # 'local' is an embedded PostgreSQL kept under .reconciler/ (no setup needed).
  local:
    database: embedded
    auto_apply: true
  # staging:
  #   database: ${STAGING_DATABASE_URL}
  #   shadow: embedded
  #   approvals: 1
  #   lock_timeout: 5s
  #   statement_timeout: 15min
"""

_INIT_TRUST = """\
# Who may approve plans, and who may sign them as planner, by OpenSSH Ed25519 public key.
# `reconciler keygen --out FILE --comment NAME` prints both entries for a new key: paste the one you need
# under its list (an ssh-keygen -t ed25519 key works too: its .pub line is the key).
#
# approvers: whose signatures count as approvals (`reconciler approve PLAN --key KEY`); groups name the
# teams an environment's approval_groups asks for. For example:
#   - name: "alice"
#     groups: [dba]
#     key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... alice@example.com"
approvers:

# planners: keys that sign plans as they are made (`reconciler plan --key KEY`, CI's key); no groups.
#   - name: "ci"
#     key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... ci"
planners:
"""

_INIT_SCHEMA = """\
-- The desired schema: edit this file (or add more .sql files), then run `reconciler plan`.
CREATE TABLE accounts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


if __name__ == "__main__":
    sys.exit(main())
