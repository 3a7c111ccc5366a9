"""Ways of showing a plan, one module each (``text``, ``markdown``, ``json``, ``github``, ``sarif``, and ``svg`` in
``timeline``), each writing the plan value to a stream; the plan itself knows none of them."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TextIO

from ..plan import Plan
from . import github, json, markdown, sarif, text, timeline
from .common import POLICY_BLOCKS, ApprovalView, summary_line
from .markdown import markdown_summary

Writer = Callable[[Plan, TextIO, ApprovalView | None], None]
WRITERS: dict[str, Writer] = {"text": text.write, "markdown": markdown.write, "json": json.write,
                              "github": github.write, "sarif": sarif.write, "svg": timeline.write_svg}
FORMATS = tuple(WRITERS)

__all__ = ["FORMATS", "POLICY_BLOCKS", "ApprovalView", "markdown_summary", "render", "render_markdown", "render_text",
           "summary_line", "write"]


def write(plan: Plan, fmt: str, stream: TextIO, approvals: ApprovalView | None = None) -> None:
    WRITERS[fmt](plan, stream, approvals)


def render(plan: Plan, fmt: str, approvals: ApprovalView | None = None) -> str:
    buffer = io.StringIO()
    write(plan, fmt, buffer, approvals)
    return buffer.getvalue()


def render_text(plan: Plan, approvals: ApprovalView | None = None) -> str:
    return render(plan, "text", approvals)


def render_markdown(plan: Plan, approvals: ApprovalView | None = None) -> str:
    return render(plan, "markdown", approvals)
