"""The command line's words: exit codes, and each command's summary, description, exit codes and example.

Kept out of ``cli.py`` so the parser stays readable; light (no imports beyond the standard library), since
``--help`` loads it.
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_CHANGES, EXIT_REFUSED = 0, 1, 2, 3
# Not argparse's 2, which means "changes planned" here: a CI script must never read a typo as a plan. 64 is
# EX_USAGE of sysexits.h.
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success, or nothing to do"),
    (EXIT_ERROR, "error (one line on stderr), also outside a project"),
    (EXIT_CHANGES, "changes planned, drift or problems found"),
    (EXIT_REFUSED, "refused: denied by policy, a check failed, a key not trusted"),
    (EXIT_USAGE, "usage error: unknown command or option, missing or bad argument"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C, SIGTERM)"),
)
# What every command may also exit with, beside its own codes.
_COMMON = ((EXIT_ERROR, "error"), (EXIT_USAGE, "usage error"))


@dataclass(frozen=True)
class CommandHelp:
    summary: str  # one line, in the list of commands
    description: str  # what it does, at the top of its --help
    exits: tuple[tuple[int, str], ...]  # its own exit codes; 1 and 64 are added
    example: str  # one command line, with a comment

    def epilog(self) -> str:
        own = {code for code, _meaning in self.exits}
        codes = "\n".join(f"  {code:<3} {meaning}" for code, meaning in sorted(
            (*self.exits, *((c, m) for c, m in _COMMON if c not in own))))
        return f"exit codes:\n{codes}\n\nexample:\n  {self.example}"


COMMANDS: dict[str, CommandHelp] = {
    "init": CommandHelp(
        "scaffold reconciler.yaml, schemas/, policies/ (with trust.yaml) and plans/",
        "Start a project: a reconciler.yaml with a 'local' environment (an embedded PostgreSQL under .reconciler/), "
        "an example schema, policies/trust.yaml with no keys yet and plans/. Files that exist are kept.",
        ((EXIT_OK, "scaffolded (existing files kept)"),),
        "reconciler init myapp && cd myapp && reconciler plan"),
    "plan": CommandHelp(
        "compare desired and live, write a plan",
        "Load the desired schema into a shadow database, compare it with the target, and print the plan: its steps, "
        "hazards, phases and the approvals it needs. With -o it is saved for approve and apply; with --key it is "
        "signed as planner. A fleet writes one plan per distinct live state into -o FOLDER.",
        ((EXIT_OK, "no changes"), (EXIT_CHANGES, "changes planned"),
         (EXIT_REFUSED, "denied by policy, or --key is not a planner key in the trust file")),
        "reconciler plan --env staging -o plans/staging.json --key ci_ed25519"),
    "show": CommandHelp(
        "render a saved plan, with approvals given and needed",
        "Print a saved plan as text, markdown (a pull-request comment: risk, what blocks and for how long, which "
        "line asked for it, approvals), JSON, github (workflow commands on the desired lines), sarif (SARIF 2.1.0 "
        "for code scanning) or svg (the phases on a time axis), with the approvals it has and those it still needs "
        "when a reconciler.yaml is found. A folder of a fleet's plans: each in turn, or in markdown one comment. "
        "Needs no database and no project.",
        ((EXIT_OK, "shown"),),
        "reconciler show plans/staging.json --format markdown"),
    "approve": CommandHelp(
        "add a reviewer's signature to a plan file",
        "Sign the plan file's id with an approver's key listed in the trust file and add the signature to the file "
        "(atomically: reviewers may approve at once).",
        ((EXIT_OK, "approved"), (EXIT_REFUSED, "the key is not an approver's in the trust file")),
        "reconciler approve plans/staging.json --key ~/.ssh/reconciler_ed25519"),
    "verify-plan": CommandHelp(
        "run every check apply would make, without applying",
        "Print each check apply makes (integrity, signatures, approvals, policy, target, freshness...) and whether it "
        "passes, changing nothing. Made for a required CI status check.",
        ((EXIT_OK, "every check passes"), (EXIT_REFUSED, "some check fails: apply would refuse the plan")),
        "reconciler verify-plan plans/staging.json"),
    "backup": CommandHelp(
        "pg_dump the target now",
        "Take a pg_dump custom-format archive of the target now, into the backups folder or -o FILE.",
        ((EXIT_OK, "written"),),
        "reconciler backup --env staging -o staging.dump"),
    "restore": CommandHelp(
        "restore the backup taken before a run",
        "Restore the archive taken before the run RUN_ID (see `reconciler history`) into another database, or over "
        "the target itself.",
        ((EXIT_OK, "restored"),),
        "reconciler restore 3f2a9c1e-6b0d-4e8a-9c55-2d7b1f0e4a61 --env staging --into postgresql://localhost/restored"),
    "cancel": CommandHelp(
        "cancel a running apply from anywhere",
        "Ask the running apply (or RUN_ID) on the target to stop: its running statement is cancelled, it undoes what "
        "it can and records how it ended. Waits for the end and says how.",
        ((EXIT_OK, "asked to stop, or nothing running"), (EXIT_REFUSED, "RUN_ID is not running")),
        "reconciler cancel --env staging --wait 2min"),
    "backfill": CommandHelp(
        "see, pause, resume or throttle a running backfill",
        "A backfill step fills a column batch by batch (README: Converting and filling columns). From any shell: "
        "`status` says how far the run RUN_ID's fill is and why it waits, if it does; `pause` stops it before its "
        "next batch (what is filled stays, the trigger keeps filling new writes) until `resume`; `throttle --batch` "
        "sets how long each batch should take.",
        ((EXIT_OK, "said, or asked"), (EXIT_REFUSED, "RUN_ID is not running (pause, resume, throttle)")),
        "reconciler backfill pause 3f2a9c1e --env production"),
    "verify": CommandHelp(
        "check the live database now: desired schema, INVALID indexes, NOT VALID constraints",
        "Check the target now: does it match the desired schema, are there INVALID indexes or NOT VALID "
        "constraints, do the policies' postconditions hold.",
        ((EXIT_OK, "all good"), (EXIT_CHANGES, "a problem found")),
        "reconciler verify --env production"),
    "rollback": CommandHelp(
        "plan, and where allowed apply, the way back to the schema a run started from",
        "Plan the way back to the schema the run RUN_ID started from (read from its backup); apply it where the "
        "environment may apply on its own, else print it to approve and apply like any plan. A column type change "
        "applied online with its contract held (apply --hold-contract) goes back in one short lock, to the old "
        "column it kept in step.",
        ((EXIT_OK, "rolled back, or nothing to do"), (EXIT_CHANGES, "a plan to approve and apply"),
         (EXIT_REFUSED, "the way back is denied by policy (no plan to approve)")),
        "reconciler rollback 3f2a9c1e --env staging -o plans/rollback.json --plan-only"),
    "lint": CommandHelp(
        "check the desired schema against the schema rules (no live database)",
        "Check the desired schema's files against the schema rules of the policies, with no live database.",
        ((EXIT_OK, "no finding denied"), (EXIT_REFUSED, "a finding denied")),
        "reconciler lint --env production"),
    "keygen": CommandHelp(
        "create an Ed25519 key pair in OpenSSH format",
        "Write an Ed25519 key pair (FILE, private, mode 0600, and FILE.pub) and print the entries to paste into "
        "policies/trust.yaml: under approvers to approve plans, under planners to sign them as planner (CI).",
        ((EXIT_OK, "written"),),
        "reconciler keygen --out ~/.ssh/reconciler_ed25519 --comment alice"),
    "apply": CommandHelp(
        "apply a saved plan, or plan and apply with --auto",
        "Apply exactly the saved plan, after every check verify-plan prints (to the environment it was made for, "
        "unless --env says otherwise); or with --auto plan and apply in one go where the environment allows it. "
        "For a fleet: a plan file (its databases) or a folder of them (each database with the newest plan naming "
        "it), at most --concurrency connections on each server; a database already applied is done; the end is a "
        "table, the totals and one line per problem saying what to do.",
        ((EXIT_OK, "applied, or nothing to apply (a fleet: every database applied, done or unchanged)"),
         (EXIT_ERROR, "error; a fleet: some database failed (the others went on)"),
         (EXIT_REFUSED, "refused (a check failed, --auto not allowed)")),
        "reconciler apply plans/staging.json"),
    "diff": CommandHelp(
        "print the SQL that would make live equal desired",
        "Print only the SQL of the plan's steps, like migra: no plan file, no checks.",
        ((EXIT_OK, "no changes"), (EXIT_CHANGES, "changes")),
        "reconciler diff --env staging > changes.sql"),
    "drift": CommandHelp(
        "is the live schema equal to the desired one?",
        "Compare the live schema with the desired one and list the objects that differ. Only reads the target. "
        "For a fleet: every database against the desired schema, loaded once, one line each.",
        ((EXIT_OK, "no drift"), (EXIT_CHANGES, "drift found"), (EXIT_ERROR, "error; a fleet: some database unreachable")),
        "reconciler drift --env production"),
    "history": CommandHelp(
        "list apply runs recorded in the target",
        "List the apply runs recorded in the target's metadata schema, newest first: status, time, steps, plan, who, "
        "errors, leftovers and backups. For a fleet: each database's latest run, one line each.",
        ((EXIT_OK, "listed"), (EXIT_ERROR, "error; a fleet: some database unreachable")),
        "reconciler history --env staging --limit 5"),
    "cache": CommandHelp(
        "list or clear the desired schemas kept as templates on the shadow server",
        "List the desired schemas kept as template databases on the shadow server, or drop them all (and the saved "
        "inspections).",
        ((EXIT_OK, "listed or cleared"),),
        "reconciler cache clear --env staging"),
    "watch": CommandHelp(
        "plan on every change, apply where allowed, check for drift; serve /healthz and /metrics",
        "Keep running: plan whenever the desired schema changes, apply where the environment allows it (else write "
        "the plan to the plans folder), check for drift every --interval, and serve /healthz and /metrics.",
        ((EXIT_OK, "stopped (SIGTERM or Ctrl-C between runs)"),),
        "reconciler watch --env staging --listen 0.0.0.0:9187"),
}


def parser_options(command: str) -> dict[str, Any]:
    """The keyword arguments of ``add_parser`` for a command: its summary, description and epilog, kept as written."""
    words = COMMANDS[command]
    return {"help": words.summary, "description": textwrap.fill(words.description, 78), "epilog": words.epilog(),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def exit_codes_epilog() -> str:
    codes = "\n".join(f"  {code:<3} {meaning}" for code, meaning in EXIT_CODES)
    return (f"exit codes:\n{codes}\n\nStart a project with `reconciler init`. `reconciler COMMAND --help` says what\n"
            "a command does, its options, its exit codes and an example.\nGlobal options may come after the command too.")
