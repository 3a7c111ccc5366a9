"""The plan as text, for a terminal: where it is for, what it does phase by phase with each step's hazards and
SQL, the signatures and the approvals."""

from __future__ import annotations

from typing import TextIO

from ..online import describe as describe_rewrite
from ..online import online_rewrites
from ..plan import Plan
from .common import POLICY_BLOCKS, ApprovalView, applies_to, indent, phase_label, phases, summary_line
from .review import NOTHING_BLOCKS, about, approvals_line, blocking_lines, phase_locking, risk


def write(plan: Plan, out: TextIO, approvals: ApprovalView | None = None) -> None:
    b = plan.body
    git = f"at {b.desired.git_commit[:12]}" if b.desired.git_commit else "not in git"
    lines = [
        f"Plan {plan.short_id}  ({plan.id})",
        f"  environment  {b.environment}",
        *([f"  target       {b.target.database} (PostgreSQL {b.target.server_version}, system "
             f"{b.target.system_identifier})"] if len(b.fleet) < 2 else
          [f"  fleet        {applies_to(plan)}, in one state",
           f"  read from    {b.target.database} (PostgreSQL {b.target.server_version}, system "
           f"{b.target.system_identifier}): the sizes and estimates below are its"]),
        f"  desired      {len(b.desired.files)} file(s) {git}{' + uncommitted changes' if b.desired.dirty else ''}",
        f"  created      {b.created_at} by reconciler {b.tool_version} ({b.engine})",
        *([f"  manages      {', '.join(b.manages)}"] if b.manages else []),
        "",
        summary_line(plan),
    ]
    if b.steps:
        blocks = blocking_lines(plan) or [NOTHING_BLOCKS]
        lines += ["", "Review:", f"  risk       {risk(plan).describe()}", f"  blocks     {blocks[0]}",
                  *[f"             {line}" for line in blocks[1:]],
                  f"  approvals  {approvals_line(plan, approvals)}", "", f"Rehearsal: {b.rehearsal.describe()}"]
    rewrites = online_rewrites(b.steps)
    if rewrites:
        lines += ["", "Online rewrites (expand, backfill, cut-over, contract; apply --hold-contract stops before the "
                  "contract):"]
        lines += [f"  {describe_rewrite(r)}" for r in rewrites]
    if b.policy.findings:
        lines += ["", "Policy findings:"]
        lines += [f"  {f}" for f in b.policy.findings]
    if b.policy.windows:
        lines += ["", "Apply only within: " + "; ".join(w.describe() for w in b.policy.windows)]
    locking = {p.phase: p for p in phase_locking(plan)}
    for phase, steps in phases(plan):
        held = locking[phase]
        locks = "; ".join(f"{lock.table} {lock.mode.label} ({lock.mode.waits})" for lock in held.locks)
        lines += ["", f"  Phase {phase}: {phase_label(steps)}, {about(held.seconds)}" + (f"; locks {locks}" if locks else "")]
        for step in steps:
            lines.append(f"  {step.index:>4}. {step.kind} {step.object}")
            if step.source is not None:
                lines.append(f"        from {step.source.describe()}")
            for hazard in step.hazards:
                lines.append(f"        ! {hazard.code}: {hazard.message}")
            for finding in step.lint:
                lines.append(f"        ~ squawk {finding.rule}: {finding.message}")
            if step.original_sql:
                lines.append("        (rewritten from the diff engine's: " + " ".join(step.original_sql.split())[:100] + ")")
            if not step.reversible:
                lines.append("        (irreversible: no SQL undoes this step)")
            if step.kind == "backfill":
                lines.append("        (apply runs it over the table's pages a range at a time, each its own short "
                             "transaction; `reconciler backfill` sees, pauses or throttles it)")
            lines.append(indent(step.sql.rstrip(";") + ";", "        "))
    if plan.signatures:
        lines += ["", "Signatures:"]
        lines += [f"  {s.role:<8} {s.signer}  {s.signed_at}" for s in plan.signatures]
    if approvals is not None and plan.body.steps:
        lines += ["", f"Approvals: {approvals.describe()}"]
        if plan.body.policy.denied:
            lines.append(f"  {POLICY_BLOCKS}")
        elif not approvals.complete:
            lines.append(f"  approve with: {approvals.command}")
    out.write("\n".join(lines) + "\n")
