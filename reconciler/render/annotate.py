"""A plan's findings as annotations on the desired files' lines: each hazard and squawk finding on the line that
asked for its step, each policy finding on its step's line (on none, when it is about no step). GitHub's
workflow commands and SARIF are two spellings of the same list."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..plan import Plan
from ..policy import approvals_needed
from ..safety import SourceLine
from .review import hazard_level

# a finding's level: GitHub's workflow command names, SARIF's "note" for notice
_LEVEL = {"critical": "error", "high": "warning", "medium": "warning", "low": "notice"}
_POLICY_LEVEL = {"deny": "error", "require_approval": "warning", "warn": "warning"}
_STEP_SUBJECT = re.compile(r"step (\d+) ")


@dataclass(frozen=True)
class Annotation:
    level: str  # error, warning, notice
    rule: str  # DATA_LOSS, policy/<id>, squawk/<rule>
    rule_text: str  # what the rule is about, said once per rule
    title: str
    message: str
    path: str | None  # from the repository's top
    line: int | None


def annotate(plan: Plan) -> list[Annotation]:
    steps = {s.index: s for s in plan.body.steps}
    out = []
    for step, hazard in plan.hazards:
        path, line, note = _where(plan, step.source)
        out.append(Annotation(_LEVEL[hazard_level(hazard.code)], hazard.code, f"hazard {hazard.code}",
                              f"{hazard.code}: step {step.index}, {step.kind} {step.object}", hazard.message + note,
                              path, line))
    for finding in plan.body.policy.findings:
        matched = _STEP_SUBJECT.match(finding.subject + " ")
        about = steps.get(int(matched.group(1))) if matched else None
        need = f" (needs {approvals_needed(finding.count, finding.groups)})" if finding.count or finding.groups else ""
        # a finding about no step (the schema as a whole) has no desired line: its rule's file is named in the text
        # (relative to the policies folder, which the plan does not place in the repository)
        path, line, note = _where(plan, about.source) if about is not None else (None, None, "")
        out.append(Annotation(_POLICY_LEVEL.get(finding.severity, "warning"), f"policy/{finding.rule}",
                              f"policy rule {finding.rule} ({finding.file}:{finding.line})",
                              f"policy {finding.rule} ({finding.severity}): {finding.subject}",
                              finding.message + need + note, path, line))
    for step in plan.body.steps:
        for lint in step.lint:
            path, line, note = _where(plan, step.source)
            out.append(Annotation("notice", f"squawk/{lint.rule}", f"squawk's {lint.rule}",
                                  f"squawk {lint.rule}: step {step.index}, {step.kind} {step.object}",
                                  lint.message + note, path, line))
    return out


def _where(plan: Plan, source: SourceLine | None) -> tuple[str | None, int | None, str]:
    """The file from the repository's top and the line; for a dropped object, where it was, said in the message."""
    if source is None:
        return None, None, ""
    folder = plan.body.desired.folder
    path = f"{folder}/{source.path}" if folder else source.path
    note = f" (it was here in {source.commit[:12]}; the plan drops it)" if source.commit else ""
    return path, source.line, note

