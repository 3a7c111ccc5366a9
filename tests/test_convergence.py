"""The convergence suite: every schema-change case of stripe/pg-schema-diff (../shared/corpus), planned,
rehearsed and applied by the real pipeline, old.sql as the live database and new.sql as desired.

Outcomes: passed = converged (apply verified live == desired); xfailed = refused with a clear error
(the engine cannot express it, or rehearsal caught a divergence); skipped = needs something this
server lacks (with the reason); failed = a bug.
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
from tests.converge import apply_and_verify, load_live, plan_change, write_project

CORPUS = Path(os.environ.get("RECONCILER_CORPUS") or Path(__file__).resolve().parents[2] / "shared" / "corpus") / "pg-schema-diff"
_MISSING_FEATURE = re.compile(r"extension .* is not available|could not open extension control file|"
                              r"ICU|collation .* for encoding|is not supported by this build|"
                              r"needs? PostgreSQL \d+; the target runs", re.IGNORECASE)


def _cases() -> list[tuple[str, dict[str, str]]]:
    index = CORPUS / "CASES.tsv"
    if not index.is_file():
        return []
    with index.open(newline="") as fh:
        return [(row["dir"], row) for row in csv.DictReader(fh, delimiter="\t")]


CASES = _cases()


@pytest.mark.skipif(not CASES, reason=f"the corpus is not at {CORPUS}")
@pytest.mark.parametrize(("case", "meta"), CASES, ids=[c for c, _ in CASES])
def test_case_converges(case: str, meta: dict[str, str], tmp_path: Path, database: str, pg_server: Server) -> None:
    folder = CORPUS / case
    for role in filter(None, (r.strip() for r in (meta.get("roles") or "").split(","))):
        with connect(pg_server.dsn) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        load_live(tmp_path, database, (folder / "old.sql").read_text())
    except SchemaLoadError as exc:
        if _MISSING_FEATURE.search(str(exc)):
            pytest.skip(f"the old schema needs what this server lacks: {exc.pg_message}")
        raise
    config = write_project(tmp_path, database, pg_server, (folder / "new.sql").read_text())
    try:
        plan = plan_change(config)
    except SchemaLoadError as exc:
        if _MISSING_FEATURE.search(str(exc)):
            pytest.skip(f"the new schema needs what this server lacks: {exc.pg_message}")
        pytest.xfail(f"refused: {exc}")
    except ReconcilerError as exc:
        pytest.xfail(f"refused: {' '.join(str(exc).split())[:300]}")
    result = apply_and_verify(config, plan, database)  # a rehearsed plan that fails here is a bug
    assert result.status in ("applied", "nothing")
