"""The plan as a pull-request comment (GitHub-flavoured Markdown): the summary line first, then hazards, online
rewrites, policy and lint findings, the steps' SQL folded, and the approvals with the command that adds one."""

from __future__ import annotations

from typing import TextIO

from ..online import duration as describe_seconds
from ..online import online_rewrites, span
from ..plan import Plan
from ..policy import approvals_needed
from .common import POLICY_BLOCKS, ApprovalView, applies_to, phase_label, phases
from .common import cell as _cell
from .common import plural as _plural
from .review import NOTHING_BLOCKS, about, approvals_line, blocking_lines, phase_locking, risk, step_range
from .timeline import mermaid

MARKDOWN_SQL_BUDGET = 40_000  # characters of SQL in a comment; GitHub refuses comments over 65,536


def _policy_status(plan: Plan, approvals: ApprovalView | None) -> str:
    policy = plan.body.policy
    if policy.denied:
        return "**blocked** by " + ", ".join(f"`{rule}`" for rule in sorted({f.rule for f in policy.denied}))
    required = approvals.required if approvals is not None else policy.approvals
    groups = approvals.missing_groups if approvals is not None else policy.groups
    given = len(approvals.given) if approvals is not None else 0
    warnings = sum(1 for f in policy.findings if f.severity == "warn")
    if approvals is not None and approvals.complete and (required or given):
        status = f"approved ({given} of {required})"
    elif required or groups:
        status = f"needs {approvals_needed(required, groups)}"
        status += f" ({given} given)" if approvals is not None else ""
    else:
        status = "no approvals needed"
    return status + (f", {_plural(warnings, 'warning')}" if warnings else "")


def _rehearsal_status(plan: Plan) -> str:
    rehearsal = plan.body.rehearsal
    if rehearsal.status == "converged":
        return "converged"
    if rehearsal.status == "failed":
        return f"**failed** at step {rehearsal.failed_step}"
    if rehearsal.status == "skipped":
        return "not rehearsed"
    return f"**did not converge** ({_plural(len(rehearsal.differences), 'object')} differ)"


def markdown_summary(plan: Plan, approvals: ApprovalView | None = None) -> str:
    """The line a reviewer reads first: size, hazards, what policy requires, whether the rehearsal converged."""
    b = plan.body
    if not b.steps:
        if len(b.fleet) > 1:
            return f"**No changes**: {applies_to(plan)} already match the desired schema."
        return f"**No changes**: `{b.target.database}` already matches the desired schema."
    hazards = plan.hazards
    codes = sorted({h.code for _, h in hazards})
    return " · ".join([
        f"**{_plural(len(b.steps), 'step')}** in {_plural(len({s.phase for s in b.steps}), 'phase')}",
        f"{_plural(len(hazards), 'hazard')} ({', '.join(codes)})" if hazards else "no hazards",
        "policy: " + _policy_status(plan, approvals),
        "rehearsal: " + _rehearsal_status(plan),
    ])


def _markdown_steps(plan: Plan, budget: int) -> list[str]:
    """The steps' SQL by phase, folded; past the size budget only each step's kind and object (the plan file has all)."""
    b = plan.body
    phase_count = len({s.phase for s in b.steps})
    out = ["<details><summary>" + f"{_plural(len(b.steps), 'step')} in {_plural(phase_count, 'phase')} (SQL)</summary>",
           "", "```sql"]
    omitted = 0
    for phase, steps in phases(plan):
        out.append(f"-- Phase {phase}: {phase_label(steps)}")
        for step in steps:
            out.append(f"-- {step.index}. {step.kind} {step.object}" + ("" if step.reversible else " (irreversible)"))
            statement = step.sql.rstrip(";") + ";"
            if len(statement) <= budget:
                out.append(statement)
                budget -= len(statement)
            else:
                budget, omitted = 0, omitted + 1
        out.append("")
    out[-1:] = ["```", ""]  # the fence replaces the blank line after the last phase
    if omitted:
        out += [f"The SQL of {_plural(omitted, 'step')} is left out to keep this comment short: "
                "`reconciler show PLAN` prints it all.", ""]
    return [*out, "</details>"]


def _review(plan: Plan, approvals: ApprovalView | None) -> list[str]:
    """The four answers first: how risky and which rule says so, what blocks whom, who must approve, which plan."""
    level = risk(plan)
    said = f"**{level.level}**" + (f": {level.rule.split(' ', 1)[0]} `{level.rule.split(' ', 1)[1]}` "
                                    f"({_cell(level.where)})" if level.rule else "")
    blocks = "<br>".join(_cell(line) for line in blocking_lines(plan)) or NOTHING_BLOCKS
    signed = ", ".join(f"{_cell(s.signer)} ({s.role})" for s in plan.signatures) or "not signed"
    return ["| review | |", "|---|---|", f"| **Risk** | {said} |", f"| **Blocks** | {blocks} |",
            f"| **Approvals** | {_cell(approvals_line(plan, approvals))} |",
            f"| **Plan** | `{plan.id}`, {signed} |"]


def _phases(plan: Plan) -> list[str]:
    """Each phase: how it runs, what it locks and who waits, the tables' size, the estimate."""
    out = ["| phase | steps | runs as | locks (who waits) | tables | estimate |", "|---:|---|---|---|---|---|"]
    for p in phase_locking(plan):
        locks = "<br>".join(f"`{_cell(lock.table)}` {lock.mode.label} ({lock.mode.waits})" for lock in p.locks) or \
            "no table lock reads or writes wait for"
        sizes = "<br>".join(f"`{_cell(t)}` {size.describe()}" for t, size in sorted(p.sizes.items()))
        out.append(f"| {p.phase} | {step_range(p.steps)} | {p.runs_as} | {locks} | {sizes} | {about(p.seconds)} |")
    return out


def write(plan: Plan, stream: TextIO, approvals: ApprovalView | None = None) -> None:
    write_comment(plan, stream, approvals)


def write_comment(plan: Plan, stream: TextIO, approvals: ApprovalView | None = None, *,
                  sql_budget: int | None = None) -> None:
    """A pull-request comment: the summary line, then hazards and policy findings, the steps folded,
    approvals given and needed, and the command that adds one."""
    b = plan.body
    git = f"at `{b.desired.git_commit[:12]}`" if b.desired.git_commit else "not in git"
    out = [
        f"### pg-reconciler plan `{plan.short_id}` for **{b.environment}**",
        "",
        markdown_summary(plan, approvals),
        "",
        (f"Target `{b.target.database}`" if len(b.fleet) < 2 else
         f"For {applies_to(plan)}, in one state; read from `{b.target.database}`, whose sizes the estimates use")
        + f" (PostgreSQL {b.target.server_version}); desired schema {git}"
        + (" with uncommitted changes" if b.desired.dirty else "") + ".",
    ]
    if b.steps:
        out += ["", *_review(plan, approvals), "", *_phases(plan), "", *mermaid(plan)]
    if len(b.fleet) > 1:
        out += ["", f"Fleet: {_plural(len(b.fleet), 'database')} in this state: "
                + ", ".join(f"`{m.label}`" for m in b.fleet[:20]) + (", ..." if len(b.fleet) > 20 else "") + "."]
    if plan.hazards:
        out += ["", "#### Hazards", "", "| step | hazard | object | asked for by | why |", "|---:|---|---|---|---|"]
        for step, hazard in plan.hazards:
            asked = f"`{_cell(step.source.describe())}`" if step.source else ""
            out.append(f"| {step.index} | `{hazard.code}` | `{_cell(step.object)}` | {asked} | {_cell(hazard.message)} |")
    rewrites = online_rewrites(b.steps)
    if rewrites:
        out += ["", "#### Online rewrites", "",
                "| rewrite | rows | expand | backfill | cut-over | checked after it | contract |",
                "|---|---:|---|---|---|---|---|"]
        for r in rewrites:
            took = f" (about {describe_seconds(r.seconds)})" if r.seconds else ""
            change = f" {_cell(r.change)}" if r.change else ""
            out.append(f"| `{_cell(r.column)}`{change} | {'' if r.rows is None else f'{r.rows:,}'} | {span(r.expand)} | "
                       f"{span(r.backfill)}{took} | {span(r.cutover)}: one short transaction, locks "
                       f"{_cell(', '.join(f'`{t}`' for t in r.locks))} | {span(r.checks) if r.checks else ''} | "
                       f"{span(r.contract)} |")
    if b.policy.findings or b.policy.windows or b.policy.auto_apply_blocked_by:
        out += ["", "#### Policy"]
    if b.policy.findings:
        out += ["", "| policy | severity | subject | finding |", "|---|---|---|---|"]
        for f in b.policy.findings:
            need = f" (needs {approvals_needed(f.count, f.groups)})" if f.count or f.groups else ""
            out.append(f"| `{f.rule}` ({f.file}:{f.line}) | **{f.severity}**{need} | {_cell(f.subject)} | {_cell(f.message)} |")
    if b.policy.windows:
        out += ["", "Applies only within: " + "; ".join(w.describe() for w in b.policy.windows) + "."]
    if b.policy.auto_apply_blocked_by:
        out += ["", "Never applied without a human: " + "; ".join(b.policy.auto_apply_blocked_by) + "."]
    findings = [(step, f) for step in b.steps for f in step.lint]
    if findings:
        out += ["", "#### Lint", "", "| step | squawk rule | message |", "|---:|---|---|"]
        out += [f"| {step.index} | `{f.rule}` | {_cell(f.message)} |" for step, f in findings]
    if b.steps:
        out += ["", f"Rehearsal: {b.rehearsal.describe()}.", "", *_markdown_steps(plan, sql_budget or MARKDOWN_SQL_BUDGET)]
    if plan.signatures or (approvals is not None and b.steps):
        out += ["", "#### Approvals"]
    if plan.signatures:
        counted = set(approvals.given) if approvals is not None else set()
        out += ["", "| signer | role | signed at |" + (" counts |" if approvals is not None else ""),
                "|---|---|---|" + ("---|" if approvals is not None else "")]
        for s in plan.signatures:
            counts = "" if approvals is None else (" yes |" if s.role == "approver" and s.signer in counted else " no |")
            out.append(f"| {_cell(s.signer)} | {s.role} | {s.signed_at} |{counts}")
    if approvals is not None and b.steps:
        out += ["", f"**Approvals:** {approvals.describe()}."]
        if b.policy.denied:
            out += ["", POLICY_BLOCKS]
        elif not approvals.complete:
            out += ["", "To approve, run:", "", "```sh", approvals.command, "```"]
    out += ["", f"<sub>Plan id `{plan.id}` · made {b.created_at} by reconciler {b.tool_version} · expires {b.expires_at}</sub>",
            ""]
    stream.write("\n".join(out))
