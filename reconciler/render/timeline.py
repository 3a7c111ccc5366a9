"""The plan's phases on a time axis, from their estimates: a Mermaid ``gantt`` block for the pull-request comment
(GitHub draws it) and the same picture as an SVG file for anywhere else. A phase that makes writes wait is marked
(Mermaid's ``crit``, red in the SVG): what a reviewer looks for first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO
from xml.sax.saxutils import escape

from ..plan import Plan
from .common import ApprovalView
from .review import PhaseLocks, about, phase_locking, step_range

MIN_SECONDS = 0.1  # a phase shorter than this is drawn this long, so it can be seen


@dataclass(frozen=True)
class Bar:
    phase: PhaseLocks
    start: float
    seconds: float
    blocks_writes: bool
    blocks_reads: bool

    @property
    def label(self) -> str:
        what = "reads and writes wait" if self.blocks_reads else "writes wait" if self.blocks_writes else "online"
        return f"Phase {self.phase.phase} (step{'s' if len(self.phase.steps) > 1 else ''} {step_range(self.phase.steps)}, " \
               f"{what}, {about(self.phase.seconds)})"


def bars(plan: Plan) -> list[Bar]:
    out, at = [], 0.0
    for p in phase_locking(plan):
        seconds = max(MIN_SECONDS, p.seconds or 0.0)
        out.append(Bar(p, at, seconds, any(lock.mode.blocks_writes for lock in p.locks),
                       any(lock.mode.blocks_reads for lock in p.locks)))
        at += seconds
    return out


def mermaid(plan: Plan) -> list[str]:
    """A ``gantt`` block: one task a phase, in milliseconds from the start (Mermaid reads ``dateFormat x``)."""
    # no title: the table above it says what it is (and Mermaid's parser sanitizes a title as HTML)
    lines = ["```mermaid", "gantt", "    dateFormat x", "    axisFormat %M:%S", "    section Phases, estimated"]
    for bar in bars(plan):
        tags = ["crit"] if bar.blocks_writes else []
        name = _task_name(bar.label)
        start, end = round(bar.start * 1000), round((bar.start + bar.seconds) * 1000)
        lines.append(f"    {name} :{', '.join([*tags, f'p{bar.phase.phase}', str(start), str(end)])}")
    return [*lines, "```"]


def _task_name(text: str) -> str:
    """Mermaid ends a task's name at its first colon, and reads # and ; as its own."""
    return text.replace(":", " ").replace(";", ",").replace("#", "")


def write_svg(plan: Plan, stream: TextIO, approvals: ApprovalView | None = None) -> None:
    """One row a phase: its bar on the time axis, its label beside; writes-waiting phases red."""
    found = bars(plan)
    total = max((b.start + b.seconds for b in found), default=MIN_SECONDS)
    left, width, row, top = 10, 520, 26, 40
    label_x = left + width + 10
    height = top + row * len(found) + 30
    stream.write('<?xml version="1.0" encoding="UTF-8"?>\n')
    stream.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_x + 520}" height="{height}" '
                 f'viewBox="0 0 {label_x + 520} {height}" font-family="sans-serif" font-size="12">\n')
    stream.write(f'  <title>{escape(f"Plan {plan.short_id}: estimated time by phase")}</title>\n')
    stream.write(f'  <text x="{left}" y="20" font-size="14" font-weight="bold">'
                 f'{escape(f"Plan {plan.short_id} for {plan.body.target.database}: {about(total)} in all")}</text>\n')
    for i, bar in enumerate(found):
        x = left + width * bar.start / total
        w = max(2.0, width * bar.seconds / total)
        y = top + i * row
        color = "#d73a49" if bar.blocks_reads else "#f66a0a" if bar.blocks_writes else "#2188ff"
        stream.write(f'  <g class="phase" data-phase="{bar.phase.phase}">\n')
        stream.write(f'    <rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 8}" fill="{color}"/>\n')
        stream.write(f'    <text x="{label_x}" y="{y + row - 13}">{escape(bar.label)}</text>\n')
        stream.write("  </g>\n")
    axis = top + row * len(found) + 4
    stream.write(f'  <line x1="{left}" y1="{axis}" x2="{left + width}" y2="{axis}" stroke="#444"/>\n')
    stream.write(f'  <text x="{left}" y="{axis + 16}">0 s</text>\n')
    stream.write(f'  <text x="{left + width}" y="{axis + 16}" text-anchor="end">{escape(about(total))}</text>\n')
    stream.write("</svg>\n")
