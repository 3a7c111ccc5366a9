"""What the convergence suite expects of each pg-schema-diff case, and the corpus's own expectations checked.

`convergence_expected.tsv` lists every case's outcome as last recorded (per server major where they differ), so a
regression fails while an improvement is only reported (the list is rewritten with
RECONCILER_CONVERGENCE_RECORD=1). A case's `unmet` column names the corpus expectations it is known not to meet:
pg-schema-diff hazards our plan does not report (through HAZARDS below) and `EmptyPlan` (steps planned where the
corpus expects none); a new gap fails, a closed one is reported.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from reconciler.plan import Plan

EXPECTED_FILE = Path(__file__).with_name("convergence_expected.tsv")
RECORD_ENV = "RECONCILER_CONVERGENCE_RECORD"
TEST_NAME = "test_case_converges"

# pg-schema-diff's hazard types -> the hazard codes of ours that report the same risk (any one of them counts).
# An empty tuple: we have no counterpart, and the comment says why; such expectations are counted, not checked.
# Where a counterpart exists but a case's plan lacks it, the case lists the type as unmet in convergence_expected.tsv.
HAZARDS: Mapping[str, tuple[str, ...]] = {
    "AcquiresAccessExclusiveLock": ("ACCESS_EXCLUSIVE_LOCK",),
    "DeletesData": ("DATA_LOSS",),
    # theirs flags every index build for its I/O and CPU. Ours build CONCURRENTLY (writes go on), the online-safe
    # form, which names no hazard: a build's load is not a risk we report. A blocking build is BLOCKS_WRITES,
    # checked under AcquiresShareLock.
    "IndexBuild": (),
    "IndexDropped": ("INDEX_DROPPED",),
    "AuthzUpdate": ("AUTHZ_CHANGE",),
    # theirs: a rewrite, a scan, or the ANALYZE it runs after any type change. Ours name the rewrite, the scan, and
    # the column statistics any type or collation change discards (until ANALYZE)
    "ImpactsDatabasePerformance": ("TABLE_REWRITE", "FULL_SCAN_UNDER_LOCK", "STATISTICS_RESET"),
    # theirs cannot see what a function body uses, so it flags every function and trigger change; we load the
    # desired schema whole and rehearse each plan on a copy of live, which catches a dependency a step breaks
    "HasUntrackableDependencies": (),
    # a foreign key added validated (a partitioned table's cannot be NOT VALID) holds SHARE ROW EXCLUSIVE on both
    # tables through its scan, which ours call FULL_SCAN_UNDER_LOCK; added NOT VALID, the lock is brief
    "AcquiresShareRowExclusiveLock": ("FULL_SCAN_UNDER_LOCK",),
    # theirs also flags REPLICA IDENTITY changes (what logical replication sends), ours apart from rows that make a
    # step fail
    "Correctness": ("CORRECTNESS", "REPLICA_IDENTITY_CHANGE"),
    "ExtensionVersionUpgrade": ("EXTENSION_CHANGE",),
    "AcquiresShareLock": ("BLOCKS_WRITES",),  # CREATE INDEX without CONCURRENTLY: SHARE lock, writes wait
}

# planOpts of the corpus -> our reconciler.yaml `safety:` switches; None: no counterpart (why in the comment)
PLAN_OPTIONS: Mapping[str, Mapping[str, bool] | None] = {
    "WithNoConcurrentIndexOps": {"concurrent_indexes": False, "concurrent_index_drops": False},
    "WithDataPackNewTables": None,  # we keep a new table's columns in the order the desired schema gives them
    "WithDoNotValidatePlan": None,  # every plan is rehearsed; there is no switch to skip it
}

EMPTY_PLAN = "EmptyPlan"
OUTCOMES = ("converged", "converged-beyond-expectation", "refused", "refused-as-expected")


def safety_switches(plan_opts: str) -> dict[str, bool]:
    """The `safety:` switches a case's planOpts ask for (unknown options are an error: map them above)."""
    switches: dict[str, bool] = {}
    for name in re.findall(r"diff\.(With\w+)", plan_opts):
        if name not in PLAN_OPTIONS:
            raise AssertionError(f"planOpts {name} is not mapped in PLAN_OPTIONS")
        switches.update(PLAN_OPTIONS[name] or {})
    return switches


def expected_hazards(meta: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(h.strip() for h in (meta.get("expectedHazardTypes") or "").split(",") if h.strip())


@dataclass(frozen=True)
class Observation:
    """One case on one server: its outcome, the corpus expectations it does not meet, and the hazard tally."""

    case: str
    major: int
    outcome: str
    unmet: tuple[str, ...] = ()
    reason: str = ""
    hazards_met: int = 0
    hazards_missing: int = 0
    hazards_without_counterpart: int = 0
    hazards_unchecked: int = 0  # expected of a case we refuse: there is no plan to look in
    expects_empty_plan: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Observation:
        data = json.loads(text)
        return cls(**{**data, "unmet": tuple(data["unmet"])})


def observe_plan(case: str, major: int, meta: Mapping[str, str], plan: Plan) -> Observation:
    """A planned case (not yet applied): which of the corpus's expectations the plan meets."""
    reported = {h.code for s in plan.body.steps for h in s.hazards}
    unmet: list[str] = []
    met = missing = none = 0
    for name in expected_hazards(meta):
        ours = HAZARDS.get(name)
        if ours is None:
            raise AssertionError(f"hazard type {name} of case {case} is not in HAZARDS")
        if not ours:
            none += 1
        elif reported & set(ours):
            met += 1
        else:
            missing += 1
            unmet.append(name)
    if meta.get("expectEmptyPlan") == "yes" and plan.body.steps:
        unmet.append(EMPTY_PLAN)
    outcome = "converged-beyond-expectation" if meta.get("expectedError") else "converged"
    return Observation(case, major, outcome, tuple(sorted(set(unmet))), "", met, missing, none,
                       expects_empty_plan=meta.get("expectEmptyPlan") == "yes")


def observe_refusal(case: str, major: int, meta: Mapping[str, str], error: BaseException) -> Observation:
    outcome = "refused-as-expected" if meta.get("expectedError") else "refused"
    return Observation(case, major, outcome, (), gist(str(error)), hazards_unchecked=len(expected_hazards(meta)),
                       expects_empty_plan=meta.get("expectEmptyPlan") == "yes")


_VOLATILE = (  # parts of a message that change from run to run
    (re.compile(r"(?<![\w<])/[^\s:]+"), "<path>"),
    (re.compile(r"\breconciler[_-]\w+"), "<db>"),
    (re.compile(r"\b[0-9a-f]{12,}\b"), "<hex>"),
    (re.compile(r"\b\d+\b"), "<n>"),
)


def gist(message: str, limit: int = 160) -> str:
    """The stable part of a refusal: one line, without paths, scratch names and numbers, cut short."""
    text = " ".join(message.split())
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    text = text.replace("\t", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the committed list ---


@dataclass(frozen=True)
class Expected:
    outcome: str
    unmet: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class ExpectedList:
    """The rows of convergence_expected.tsv: per case, the row for every server (`all`) and the rows of majors
    where the outcome differs. `majors` lists the versions recorded, the first being the one `all` rows come from."""

    majors: list[int] = field(default_factory=list)
    rows: dict[str, dict[str, Expected]] = field(default_factory=dict)

    def get(self, case: str, major: int) -> Expected | None:
        per_server = self.rows.get(case, {})
        return per_server.get(str(major)) or per_server.get("all")

    def record(self, obs: Observation) -> None:
        """The observed outcome becomes the expectation on its major. Recorded on the base major, it replaces the
        `all` row; the old one stays pinned for the other majors (it was true there) until they are recorded."""
        if not self.majors or obs.major not in self.majors:
            self.majors.append(obs.major)
        new = Expected(obs.outcome, obs.unmet, obs.reason)
        per_server = self.rows.setdefault(obs.case, {})
        old = per_server.get("all")
        if old is None:
            per_server["all"] = new
        elif obs.major == self.majors[0]:
            if old != new:
                for other in self.majors[1:]:
                    per_server.setdefault(str(other), old)
                per_server["all"] = new
        else:
            per_server[str(obs.major)] = new
        for server in [s for s in per_server if s != "all" and per_server[s] == per_server["all"]]:
            del per_server[server]

    def write(self, path: Path) -> None:
        lines = [
            "# The convergence suite's expectations per pg-schema-diff case (tests/test_convergence.py; "
            "tests/convergence_expectations.py says how they are checked).",
            "# Rewrite from a run: RECONCILER_CONVERGENCE_RECORD=1 .venv/bin/python -m pytest tests/test_convergence.py "
            "-k test_case_converges (and again with RECONCILER_TEST_PG_BINDIR=/usr/lib/postgresql/15/bin).",
            "# server: all, or a major version where the outcome differs; unmet: corpus expectations known not met.",
            f"# majors: {' '.join(str(m) for m in self.majors)}",
            "\t".join(("case", "server", "outcome", "unmet", "reason")),
        ]
        for case in sorted(self.rows):
            per_server = self.rows[case]
            for server in sorted(per_server, key=lambda s: (s != "all", s)):
                e = per_server[server]
                lines.append("\t".join((case, server, e.outcome, ",".join(e.unmet), e.reason)))
        path.write_text("\n".join(lines) + "\n")


def read_expected(path: Path = EXPECTED_FILE) -> ExpectedList:
    found = ExpectedList()
    if not path.is_file():
        return found
    header: list[str] | None = None
    for line in path.read_text().splitlines():
        if line.startswith("# majors:"):
            found.majors = [int(m) for m in line.removeprefix("# majors:").split()]
        if not line.strip() or line.startswith("#"):
            continue
        cells = line.split("\t")
        if header is None:
            header = cells
            continue
        row = dict(zip(header, cells + [""] * (len(header) - len(cells)), strict=True))
        if row["outcome"] not in OUTCOMES:
            raise ValueError(f"{path}: case {row['case']}: unknown outcome {row['outcome']!r}")
        unmet = tuple(u for u in row["unmet"].split(",") if u)
        found.rows.setdefault(row["case"], {})[row["server"]] = Expected(row["outcome"], unmet, row["reason"])
    return found


# --- judging an observation against the list ---


@dataclass(frozen=True)
class Verdict:
    failures: tuple[str, ...]  # regressions: the test fails
    notes: tuple[str, ...]  # improvements and changes worth updating the list for: reported only


def judge(obs: Observation, expected: Expected | None) -> Verdict:
    failures: list[str] = []
    notes: list[str] = []
    converged = obs.outcome.startswith("converged")
    if expected is None:
        if converged:
            notes.append(f"{obs.case}: {obs.outcome}, not yet in {EXPECTED_FILE.name}")
        else:
            failures.append(f"{obs.case}: {obs.outcome} ({obs.reason}), and not in {EXPECTED_FILE.name}")
        return Verdict(tuple(failures), tuple(notes))
    if expected.outcome.startswith("converged") and not converged:
        failures.append(f"{obs.case}: listed as {expected.outcome}, now {obs.outcome}: {obs.reason}")
    elif not expected.outcome.startswith("converged") and converged:
        notes.append(f"{obs.case}: newly converges (listed as {expected.outcome}: {expected.reason})")
    elif not converged and obs.reason != expected.reason:
        notes.append(f"{obs.case}: refused for another reason: {obs.reason} (listed: {expected.reason})")
    if converged and expected.outcome.startswith("converged"):
        new_gaps = sorted(set(obs.unmet) - set(expected.unmet))
        closed = sorted(set(expected.unmet) - set(obs.unmet))
        if new_gaps:
            failures.append(f"{obs.case}: no longer meets the corpus's {', '.join(new_gaps)} "
                            f"({'; '.join(_explain(g) for g in new_gaps)})")
        if closed:
            notes.append(f"{obs.case}: now meets the corpus's {', '.join(closed)} (listed as unmet)")
    return Verdict(tuple(failures), tuple(notes))


def _explain(gap: str) -> str:
    if gap == EMPTY_PLAN:
        return "the corpus expects no step"
    return f"{gap} expects one of our hazards {'/'.join(HAZARDS.get(gap, ()))}"


# --- the session: outcomes gathered from the reports, the summary, the rewrite ---


@dataclass
class Session:
    observations: list[Observation] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    recorded: str = ""

    def collect(self, report: pytest.TestReport) -> None:
        """Called for every report; keeps those of the convergence test (its call phase, or a setup skip)."""
        if f"::{TEST_NAME}[" not in report.nodeid:
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.outcomes["xfailed" if hasattr(report, "wasxfail") else report.outcome] += 1
        if report.when == "call":
            self.observations.extend(Observation.from_json(str(v)) for k, v in report.user_properties
                                     if k == "convergence")

    def finish(self, expected: ExpectedList) -> None:
        if not os.environ.get(RECORD_ENV) or not self.observations:
            return
        for obs in self.observations:
            expected.record(obs)
        expected.write(EXPECTED_FILE)
        self.recorded = f"rewrote {EXPECTED_FILE} with {len(self.observations)} observed case(s)"

    def summary_lines(self, expected: ExpectedList) -> Iterable[str]:
        if not self.observations and not self.outcomes:
            return
        by_outcome = Counter(o.outcome for o in self.observations)
        yield ("cases: " + ", ".join(f"{by_outcome[o]} {o}" for o in OUTCOMES)
               + f"; {self.outcomes['skipped']} skipped, {self.outcomes['failed']} failed")
        total = _totals(self.observations)
        yield (f"pg-schema-diff hazard expectations: {total['hazards_met']} met, {total['hazards_missing']} missing, "
               f"{total['hazards_without_counterpart']} without a counterpart of ours, "
               f"{total['hazards_unchecked']} unchecked (case refused)")
        empty = [o for o in self.observations if o.expects_empty_plan]
        if empty:
            kept = sum(o.outcome.startswith("converged") and EMPTY_PLAN not in o.unmet for o in empty)
            yield f"cases the corpus expects to plan nothing: {kept} of {len(empty)} planned no step"
        for obs in self.observations:
            verdict = judge(obs, expected.get(obs.case, obs.major))
            yield from (*verdict.failures, *verdict.notes)
        if self.recorded:
            yield self.recorded
        elif any(v.notes or v.failures for v in (judge(o, expected.get(o.case, o.major)) for o in self.observations)):
            yield f"to update the list: {RECORD_ENV}=1 .venv/bin/python -m pytest tests/test_convergence.py -k {TEST_NAME}"


def _totals(observations: Sequence[Observation]) -> dict[str, int]:
    keys = ("hazards_met", "hazards_missing", "hazards_without_counterpart", "hazards_unchecked")
    return {k: sum(int(getattr(o, k)) for o in observations) for k in keys}


SESSION = Session()


def recording() -> bool:
    return bool(os.environ.get(RECORD_ENV))
