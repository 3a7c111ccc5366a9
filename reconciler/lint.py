"""Squawk's findings on the compiled SQL, attached to the steps they concern.

Rules about timeouts and retries are excluded by default: the executor sets lock_timeout and
statement_timeout on every step and retries lock timeouts itself.
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
    by_step: dict[int, list[LintFinding]] = {}
    for finding in findings:
        line = int(finding.get("line", 0))
        owner = max(bisect.bisect_right(starts, line) - 1, 0)  # the last step starting at or before the line
        message = finding.get("message", "")
        if finding.get("help"):
            message += f" {finding['help']}"
        by_step.setdefault(owner, []).append(LintFinding(rule=str(finding.get("rule_name", "squawk")), message=message))
    return tuple(replace(step, lint=tuple(by_step.get(i, ()))) for i, step in enumerate(steps))
