"""The plan as SARIF 2.1.0, for code scanning: each hazard, policy finding and squawk finding a result on the
desired file and line that caused it, under a rule of its own (``DATA_LOSS``, ``policy/<id>``, ``squawk/<rule>``)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, TextIO

from .. import __version__
from ..plan import Plan
from .annotate import annotate
from .common import ApprovalView

SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
_LEVEL = {"error": "error", "warning": "warning", "notice": "note"}


def write(plan: Plan, stream: TextIO, approvals: ApprovalView | None = None) -> None:
    found = annotate(plan)
    rules: dict[str, int] = {}
    described: list[dict[str, Any]] = []
    results = []
    for a in found:
        if a.rule not in rules:
            rules[a.rule] = len(described)
            described.append({"id": a.rule, "shortDescription": {"text": a.rule_text}})
        result: dict[str, Any] = {
            "ruleId": a.rule, "ruleIndex": rules[a.rule], "level": _LEVEL[a.level],
            "message": {"text": f"{a.title}: {a.message}"},
            # the same finding on the same object is the same alert from one plan to the next
            "partialFingerprints": {"reconcilerFinding/v1": hashlib.sha256(a.title.encode()).hexdigest()[:32]},
        }
        if a.path:
            region = {"region": {"startLine": a.line}} if a.line else {}
            result["locations"] = [{"physicalLocation": {
                "artifactLocation": {"uri": a.path, "uriBaseId": "%SRCROOT%"}, **region}}]
        results.append(result)
    document = {
        "$schema": SCHEMA, "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "pg-reconciler", "version": __version__, "rules": described}},
            "automationDetails": {"id": f"pg-reconciler/{plan.body.environment}/"},
            "results": results,
            "properties": {"planId": plan.id, "target": plan.body.target.database},
        }],
    }
    json.dump(document, stream, indent=2, ensure_ascii=False)
    stream.write("\n")
