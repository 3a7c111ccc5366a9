"""What every rendering of a plan shares: the approvals as a reviewer sees them, the steps by phase, the one-line
summary, and small text helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..plan import Plan
from ..safety import Step


@dataclass(frozen=True)
class ApprovalView:
    """What a reviewer needs to know: who approved, what is still missing, the command to approve."""

    given: tuple[str, ...]
    required: int
    missing_groups: tuple[str, ...]
    command: str

    @property
    def complete(self) -> bool:
        return len(self.given) >= self.required and not self.missing_groups

    def describe(self) -> str:
        text = f"{len(self.given)} of {self.required} given" + (f" ({', '.join(self.given)})" if self.given else "")
        missing = max(0, self.required - len(self.given))
        if missing:
            text += f"; {missing} more needed"
        if self.missing_groups:
            text += f"; still needed from group(s): {', '.join(self.missing_groups)}"
        return text


def indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line if line.strip() else line for line in text.strip().splitlines())


def phases(plan: Plan) -> list[tuple[int, list[Step]]]:
    grouped: dict[int, list[Step]] = {}
    for step in plan.body.steps:
        grouped.setdefault(step.phase, []).append(step)
    return sorted(grouped.items())


def phase_label(steps: Sequence[Step]) -> str:
    if not steps[0].transactional:
        return "outside a transaction"
    return "one transaction" if len(steps) > 1 else "its own transaction"


def applies_to(plan: Plan) -> str:
    """What the plan is for: its database, or a fleet group's databases (three named, then how many more)."""
    names = [t.database for t in plan.body.fleet] or [plan.body.target.database]
    if len(names) == 1:
        return names[0]
    return f"{len(names)} databases ({', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''})"


def summary_line(plan: Plan) -> str:
    steps = plan.body.steps
    if not steps:
        verb = "match" if len(plan.body.fleet) > 1 else "matches"
        return f"No changes: {applies_to(plan)} already {verb} the desired schema."
    codes = sorted({h.code for _, h in plan.hazards})
    hazards = f", hazards: {', '.join(codes)}" if codes else ", no hazards"
    count = len({s.phase for s in steps})
    denied = plan.body.policy.denied
    if denied:
        return (f"BLOCKED by policy {', '.join(sorted({f.rule for f in denied}))}: {len(steps)} step(s) "
                f"for {applies_to(plan)} may not be applied.")
    return (f"{len(steps)} step{'s' if len(steps) != 1 else ''} in {count} phase{'s' if count != 1 else ''} "
            f"to apply to {applies_to(plan)}{hazards}.")


POLICY_BLOCKS = "Policy blocks this plan: approvals do not change that; change the schema or the policy."


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")
