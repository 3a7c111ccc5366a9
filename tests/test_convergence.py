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
import textwrap
from pathlib import Path

import pytest
from psycopg import sql

from reconciler.apply import ApplyOptions, apply_plan
from reconciler.config import load_config
from reconciler.errors import ApplyError, ReconcilerError, SchemaLoadError
from reconciler.pipeline import make_plan, open_servers
from reconciler.servers import Server, connect
from reconciler.shadow import load_schema
from reconciler.source import load_source

CORPUS = Path(os.environ.get("RECONCILER_CORPUS") or Path(__file__).resolve().parents[2] / "shared" / "corpus") / "pg-schema-diff"
_MISSING_FEATURE = re.compile(r"extension .* is not available|could not open extension control file|"
                              r"ICU|collation .* for encoding|is not supported by this build", re.IGNORECASE)


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
    old = tmp_path / "old"
    old.mkdir()
    (old / "old.sql").write_text((folder / "old.sql").read_text())
    try:
        load_schema(load_source(old), database)
    except SchemaLoadError as exc:
        if _MISSING_FEATURE.search(str(exc)):
            pytest.skip(f"the old schema needs what this server lacks: {exc.pg_message}")
        raise
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "new.sql").write_text((folder / "new.sql").read_text())
    (tmp_path / "policies").mkdir()
    (tmp_path / "reconciler.yaml").write_text(textwrap.dedent(f"""\
        environments:
          test:
            database: "{database}"
            shadow: "{pg_server.dsn}"
            require_signed_plans: false
            backup: none
            lock_timeout: 10s
        safety:
          squawk: false
        """))
    config = load_config(tmp_path / "reconciler.yaml")
    env = config.environment("test")
    try:
        with open_servers(config, env) as servers:
            plan = make_plan(config, env, servers).plan
    except SchemaLoadError as exc:
        if _MISSING_FEATURE.search(str(exc)):
            pytest.skip(f"the new schema needs what this server lacks: {exc.pg_message}")
        pytest.xfail(f"refused: {exc}")
    except ReconcilerError as exc:
        pytest.xfail(f"refused: {' '.join(str(exc).split())[:300]}")
    try:
        result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler"))
    except ApplyError as exc:
        pytest.fail(f"rehearsed plan failed on the target: {exc}")
    assert result.status in ("applied", "nothing")
