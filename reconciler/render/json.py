"""The plan as its file's JSON, indented for reading (the same document ``planfile`` writes)."""

from __future__ import annotations

import json
from typing import TextIO

from ..plan import Plan
from ..planfile import plan_to_json
from .common import ApprovalView


def write(plan: Plan, stream: TextIO, approvals: ApprovalView | None = None) -> None:
    """``approvals`` is not part of the document: the signatures are, and say the same."""
    json.dump(plan_to_json(plan), stream, indent=2, sort_keys=True, ensure_ascii=False)
    stream.write("\n")
