"""The convergence suite: every schema-change case of stripe/pg-schema-diff (../shared/corpus), planned,
rehearsed and applied by the real pipeline, old.sql as the live database and new.sql as desired.

Each outcome is held to tests/convergence_expected.tsv (see tests/convergence_expectations.py): a case listed as
converging that is refused fails, a gap in the corpus's own expectations (hazards, empty plans) that is not listed
fails; a case that newly converges or closes a gap is reported in the terminal summary. Passed = converged;
xfailed = refused as listed; skipped = needs something this server lacks (with the reason); failed = a regression
or a bug (a rehearsed plan that does not apply).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
from psycopg import sql

from reconciler.errors import ReconcilerError, SchemaLoadError
from reconciler.servers import Server, connect
from tests import convergence_expectations as expectations
from tests.converge import apply_and_verify, load_live, plan_change, write_project

CORPUS = Path(os.environ.get("RECONCILER_CORPUS") or Path(__file__).resolve().parents[2] / "shared" / "corpus") / "pg-schema-diff"
_MISSING_FEATURE = re.compile(r"extension .* is not available|could not open extension control file|"
                              r"ICU|collation .* for encoding|is not supported by this build|"
                              r"needs? PostgreSQL \d+; the target runs", re.IGNORECASE)
EXPECTED = expectations.read_expected()


def _cases() -> list[tuple[str, dict[str, str]]]:
    index = CORPUS / "CASES.tsv"
    if not index.is_file():
        return []
    with index.open(newline="") as fh:
        return [(row["dir"], row) for row in csv.DictReader(fh, delimiter="\t")]


CASES = _cases()


def _roles(column: str) -> list[str]:
    """The roles a case needs, comma-separated (csv has already undone the quoting of `"evil""role"`)."""
    return [r.strip() for r in column.split(",") if r.strip()]


@pytest.mark.skipif(not CASES, reason=f"the corpus is not at {CORPUS}")
@pytest.mark.parametrize(("case", "meta"), CASES, ids=[c for c, _ in CASES])
def test_case_converges(case: str, meta: dict[str, str], tmp_path: Path, database: str, pg_server: Server,
                        request: pytest.FixtureRequest) -> None:
    folder = CORPUS / case
    major = pg_server.major_version
    roles = _roles(meta.get("roles") or "")
    for role in roles:
        with connect(pg_server.dsn) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        load_live(tmp_path, database, (folder / "old.sql").read_text())
    except SchemaLoadError as exc:
        if _MISSING_FEATURE.search(str(exc)):
            pytest.skip(f"the old schema needs what this server lacks: {exc.pg_message}")
        raise
    # a case that names roles is about what they may do: compare privileges, as pg-schema-diff always does
    config = write_project(tmp_path, database, pg_server, (folder / "new.sql").read_text(),
                           "manage_privileges: true\n" if roles else "",
                           safety=expectations.safety_switches(meta.get("planOpts") or ""))
    try:
        plan = plan_change(config)
    except SchemaLoadError as exc:
        if _MISSING_FEATURE.search(str(exc)):
            pytest.skip(f"the new schema needs what this server lacks: {exc.pg_message}")
        observed = expectations.observe_refusal(case, major, meta, exc)
    except ReconcilerError as exc:
        observed = expectations.observe_refusal(case, major, meta, exc)
    else:
        observed = expectations.observe_plan(case, major, meta, plan)
        result = apply_and_verify(config, plan, database)  # a rehearsed plan that fails here is a bug
        assert result.status in ("applied", "nothing")
    request.node.user_properties.append(("convergence", observed.to_json()))  # for the summary and the rewrite
    verdict = expectations.judge(observed, EXPECTED.get(case, major))
    if verdict.failures and not expectations.recording():
        pytest.fail("\n".join(verdict.failures), pytrace=False)
    if observed.outcome.startswith("refused"):
        pytest.xfail(f"{observed.outcome}: {observed.reason}")
