"""A fleet's plans as one pull-request comment: a row per plan group (a distinct live state: its databases, steps,
risk and approvals), then each group's own comment folded, the SQL budget shared among them (GitHub refuses
comments over 65,536 characters)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TextIO

from ..plan import Plan
from .common import ApprovalView, cell, plural
from .markdown import MARKDOWN_SQL_BUDGET, write_comment
from .review import approvals_line, risk

SHOWN_DATABASES = 3  # named in a group's row; the rest counted


def write_fleet(plans: Sequence[tuple[Plan, ApprovalView | None]], stream: TextIO,
                unreachable: Sequence[str] = ()) -> None:
    environment = plans[0][0].body.environment if plans else "?"
    counts = [max(1, len(plan.body.fleet)) for plan, _ in plans]
    changing = [(plan, view) for plan, view in plans if plan.body.steps]
    out = [f"### pg-reconciler fleet plan for **{environment}**", "",
           f"**{plural(sum(counts), 'database')}** in {plural(len(plans), 'state')}: "
           f"{plural(sum(c for c, (p, _) in zip(counts, plans, strict=True) if p.body.steps), 'database')} to change "
           f"by {plural(len(changing), 'plan')}, "
           f"{sum(c for c, (p, _) in zip(counts, plans, strict=True) if not p.body.steps)} already as desired"
           + (f", **{len(unreachable)} unreachable**" if unreachable else "") + ".", "",
           "| plan | databases | steps | risk | approvals |", "|---|---|---|---|---|"]
    for (plan, view), count in zip(plans, counts, strict=True):
        labels = [m.label for m in plan.body.fleet] or [plan.body.target.database]
        named = ", ".join(f"`{cell(label)}`" for label in labels[:SHOWN_DATABASES])
        more = f" and {count - SHOWN_DATABASES} more" if count > SHOWN_DATABASES else ""
        steps = (f"{plural(len(plan.body.steps), 'step')} in {plural(len({s.phase for s in plan.body.steps}), 'phase')}"
                 if plan.body.steps else "no changes")
        level = risk(plan).level if plan.body.steps else "none"
        out.append(f"| `{plan.short_id}` | {count}: {named}{more} | {steps} | **{level}** | "
                   f"{cell(approvals_line(plan, view)) if plan.body.steps else ''} |")
    if unreachable:
        out += ["", "Unreachable (not planned): " + ", ".join(f"`{cell(label)}`" for label in unreachable) + "."]
    budget = MARKDOWN_SQL_BUDGET // max(1, len(changing))
    for plan, view in changing:
        inner = io.StringIO()
        write_comment(plan, inner, view, sql_budget=budget)
        databases = plural(max(1, len(plan.body.fleet)), "database")
        out += ["", f"<details><summary>Plan <code>{plan.short_id}</code> for {databases}: "
                    f"{plural(len(plan.body.steps), 'step')}, risk {risk(plan).level}</summary>", "",
                inner.getvalue().rstrip(), "", "</details>"]
    stream.write("\n".join(out) + "\n")
