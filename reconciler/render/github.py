"""The plan as GitHub workflow commands: each finding an ``::error``, ``::warning`` or ``::notice`` on the desired
file and line that caused it, which GitHub shows on that line of the pull request's diff; then the summary."""

from __future__ import annotations

from typing import TextIO

from ..plan import Plan
from .annotate import annotate
from .common import ApprovalView, summary_line
from .review import approvals_line, risk


def write(plan: Plan, stream: TextIO, approvals: ApprovalView | None = None) -> None:
    for a in annotate(plan):
        where = ([f"file={_property(a.path)}"] if a.path else []) + ([f"line={a.line}"] if a.path and a.line else [])
        stream.write(f"::{a.level} {','.join([*where, f'title={_property(a.title)}'])}::{_data(a.message)}\n")
    said = f"{summary_line(plan)} Risk: {risk(plan).describe()}. Approvals: {approvals_line(plan, approvals)}."
    stream.write(f"::notice title={_property(f'pg-reconciler plan {plan.short_id}')}::{_data(said)}\n")


def _data(text: str) -> str:
    """A command's message: GitHub reads %, CR and LF escaped."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _property(text: str) -> str:
    """A property's value: its separators (: and ,) escaped too."""
    return _data(text).replace(":", "%3A").replace(",", "%2C")
