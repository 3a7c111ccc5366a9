"""Squawk's findings on the compiled SQL, attached to the steps they concern.

Rules about timeouts and retries are excluded by default: the executor sets lock_timeout and
statement_timeout on every step and retries lock timeouts itself. Rules about locks and scans of
tables with rows and traffic are dropped on steps whose tables the plan creates: a new table is
empty and nobody uses it yet (the safety compiler gives such steps their plain form on purpose).
"""

from __future__ import annotations

import bisect
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .errors import ReconcilerError
from .safety import LintFinding, Step

log = logging.getLogger(__name__)

HANDLED_BY_EXECUTOR = ("require-lock-timeout", "require-statement-timeout", "require-timeout-settings",
                       "prefer-robust-stmts", "transaction-nesting")

# online-safety rules about the table a statement alters or indexes: moot when the plan creates that table
ABOUT_OWN_TABLE = frozenset({
    "require-concurrent-index-creation", "require-concurrent-index-deletion", "constraint-missing-not-valid",
    "disallowed-unique-constraint", "adding-not-nullable-field", "adding-required-field", "adding-field-with-default",
    "adding-serial-primary-key-field", "adding-primary-key-constraint", "changing-column-type",
})
# about every table a statement names (a foreign key locks the table it references too): moot when the plan
# creates all of them
ABOUT_ALL_TABLES = frozenset({"adding-foreign-key-constraint"})

_CREATES_TABLE = frozenset({"create_table", "create_materialized_view"})


def squawk_binary() -> str | None:
    beside = Path(sys.executable).with_name("squawk")
    return str(beside) if beside.exists() else shutil.which("squawk")


def lint_steps(steps: Sequence[Step], *, exclude: Sequence[str] = (), pg_version: str | None = None) -> tuple[Step, ...]:
    binary = squawk_binary()
    if binary is None:
        log.warning("squawk is not installed (pip install squawk-cli): the plan is not linted")
        return tuple(steps)
    if not steps:
        return ()
    starts: list[int] = []
    lines: list[str] = []
    for step in steps:
        starts.append(len(lines))
        lines.extend((step.sql.rstrip().rstrip(";") + ";").splitlines())
    with tempfile.TemporaryDirectory(prefix="reconciler-squawk-") as tmp:
        path = Path(tmp) / "plan.sql"
        path.write_text("\n".join(lines) + "\n")
        args = [binary, "--reporter", "json", "--exclude", ",".join([*HANDLED_BY_EXECUTOR, *exclude])]
        if pg_version:
            args += ["--pg-version", pg_version]
        result = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=120, check=False)
    try:
        findings = json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        raise ReconcilerError(f"squawk failed (exit {result.returncode}): {result.stderr.strip()[:300]}") from None
    created = frozenset(s.object for s in steps if s.kind in _CREATES_TABLE)
    by_step: dict[int, list[LintFinding]] = {}
    for finding in findings:
        line = int(finding.get("line", 0))
        owner = max(bisect.bisect_right(starts, line) - 1, 0)  # the last step starting at or before the line
        message = finding.get("message", "")
        if finding.get("help"):
            message += f" {finding['help']}"
        rule = str(finding.get("rule_name", "squawk"))
        if not _moot(rule, steps[owner], created):
            by_step.setdefault(owner, []).append(LintFinding(rule=rule, message=message))
    return tuple(replace(step, lint=tuple(by_step.get(i, ()))) for i, step in enumerate(steps))


def _moot(rule: str, step: Step, created: frozenset[str]) -> bool:
    """A rule about busy tables, on a step whose tables (the ones the rule is about) the plan creates."""
    if rule in ABOUT_OWN_TABLE:
        return bool(step.tables) and step.tables[0] in created
    if rule in ABOUT_ALL_TABLES:
        return bool(step.tables) and all(t in created for t in step.tables)
    return False
