"""The convergence suite's bookkeeping (tests/convergence_expectations.py): a regression fails, an improvement is
only reported, and recording on one major keeps what the others were last seen to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import reconciler
from tests.convergence_expectations import (
    EMPTY_PLAN,
    HAZARDS,
    Expected,
    ExpectedList,
    Observation,
    expected_hazards,
    gist,
    judge,
    read_expected,
    safety_switches,
)
from tests.test_convergence import CASES


def test_a_case_listed_as_converging_that_is_refused_fails() -> None:
    verdict = judge(Observation("c", 18, "refused", reason="cannot"), Expected("converged"))
    assert verdict.failures and "listed as converged, now refused: cannot" in verdict.failures[0]


def test_a_case_that_newly_converges_is_reported_not_failed() -> None:
    verdict = judge(Observation("c", 18, "converged"), Expected("refused", reason="partition key"))
    assert verdict.failures == ()
    assert verdict.notes == ("c: newly converges (listed as refused: partition key)",)


def test_a_new_gap_fails_and_a_closed_one_is_reported() -> None:
    listed = Expected("converged", ("IndexBuild",))
    worse = judge(Observation("c", 18, "converged", unmet=("IndexBuild", EMPTY_PLAN)), listed)
    assert len(worse.failures) == 1 and EMPTY_PLAN in worse.failures[0]
    better = judge(Observation("c", 18, "converged"), listed)
    assert better.failures == () and "now meets the corpus's IndexBuild" in better.notes[0]


def test_an_unlisted_refusal_fails() -> None:
    assert judge(Observation("c", 18, "refused-as-expected", reason="x"), None).failures


def test_recording_on_the_base_major_pins_the_old_outcome_for_the_others(tmp_path: Path) -> None:
    expected = ExpectedList(majors=[18, 15])
    expected.record(Observation("c", 18, "refused", reason="no cast"))
    expected.record(Observation("c", 18, "converged"))
    assert expected.get("c", 18) == Expected("converged")
    assert expected.get("c", 15) == Expected("refused", reason="no cast")  # not seen converging there yet
    expected.record(Observation("c", 15, "converged"))
    assert expected.rows["c"] == {"all": Expected("converged")}  # the same everywhere: one row again

    expected.record(Observation("d", 15, "converged", unmet=("IndexBuild",)))
    path = tmp_path / "expected.tsv"
    expected.write(path)
    again = read_expected(path)
    assert again.majors == [18, 15] and again.rows == expected.rows


def test_the_hazard_table_names_real_codes_and_every_plan_option_is_known() -> None:
    schema = json.loads((Path(reconciler.__file__).parent / "formats" / "plan.schema.json").read_text())
    codes = set(_find_enum(schema, "code"))
    assert codes and {c for ours in HAZARDS.values() for c in ours} <= codes
    if CASES:  # the corpus at hand: every hazard type it expects is in the table, with a counterpart or a reason
        assert {h for _, meta in CASES for h in expected_hazards(meta)} <= set(HAZARDS)
    assert safety_switches("[ ] diff.PlanOpt { diff.WithNoConcurrentIndexOps ( ) }") == {
        "concurrent_indexes": False, "concurrent_index_drops": False}
    with pytest.raises(AssertionError, match="WithSomethingNew"):
        safety_switches("diff.WithSomethingNew()")


def test_a_refusal_gist_drops_what_changes_from_run_to_run() -> None:
    assert gist("cannot load /tmp/pytest-7/x/new.sql:3 into reconciler_shadow_ab12\n  (oid 16384, LIST a/b)") == \
        "cannot load <path>:<n> into <db> (oid <n>, LIST a/b)"


def _find_enum(node: Any, key: str) -> list[str]:
    """The enum of the first property called ``key`` in a JSON Schema."""
    if isinstance(node, dict):
        if isinstance(node.get(key), dict) and "enum" in node[key]:
            return list(node[key]["enum"])
        return next((found for v in node.values() if (found := _find_enum(v, key))), [])
    if isinstance(node, list):
        return next((found for v in node if (found := _find_enum(v, key))), [])
    return []
