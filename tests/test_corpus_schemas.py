"""Whole third-party schemas (../shared/corpus/schemas): from an empty database to the full schema, planned,
rehearsed, applied and verified by the real pipeline.

A schema that needs what the test server lacks (an extension not in the build, ICU collations) is skipped,
saying what is missing; every other schema must converge, but for the engine gaps listed in KNOWN_GAPS.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from psycopg import sql

from reconciler.errors import RefusedError, SchemaLoadError
from reconciler.privileged import CreateRole, recognise
from reconciler.servers import Server, connect, throwaway_database
from reconciler.shadow import create_roles, load_schema, roles_named, split_file
from reconciler.source import DesiredSchema, load_source
from tests.converge import converge

SCHEMAS = Path(os.environ.get("RECONCILER_CORPUS") or Path(__file__).resolve().parents[2] / "shared" / "corpus") / "schemas"
_MISSING_FEATURE = re.compile(r"extension .* is not available|could not open extension control file|"
                              r"\bICU\b|is not supported by this build|needs? PostgreSQL \d+; the target runs")
# psql interpolates :"NAME" with the variable's value as an identifier; the corpus's PostgREST fixture grants
# a role to :"PGUSER", the user running the script (SOURCES.md).
_PSQL_PGUSER = re.compile(r':"PGUSER"')

# Engine gaps these schemas hit, as (what the refusal says, why), in the order a schema meets them. An expected
# failure only when the refusal says exactly that; a listed schema that converges fails, so the entry goes.
KNOWN_GAPS: dict[str, tuple[tuple[str, str], ...]] = {}

FILES = sorted(SCHEMAS.glob("*.sql")) if SCHEMAS.is_dir() else []


def _roles_created(source: DesiredSchema) -> set[str]:
    return {what.name for f in source.files for statement in split_file(f)
            if isinstance(what := recognise(statement.text.lstrip()), CreateRole)}


def _as_run_by_psql(text: str, user: str) -> str:
    """The schema as psql would send it when run by ``user``."""
    return _PSQL_PGUSER.sub(lambda _m: sql.Identifier(user).as_string(None), text)


@pytest.mark.skipif(not FILES, reason=f"no corpus schemas at {SCHEMAS}")
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_empty_database_converges_to_whole_schema(path: Path, tmp_path: Path, database: str,
                                                   pg_server: Server) -> None:
    with connect(pg_server.dsn) as conn:
        user = conn.info.user
    schema = _as_run_by_psql(path.read_text(), user)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / path.name).write_text(schema)
    source = load_source(alone)
    # Roles are cluster-wide: the target (this server, also the shadow) is expected to have the ones the schema names
    # and creates (on the target's cluster a schema file may not create roles).
    create_roles(pg_server.dsn, roles_named(source) | _roles_created(source))
    with throwaway_database(pg_server, "corpus") as scratch:
        try:
            load_schema(source, scratch, sandbox=None)
        except SchemaLoadError as exc:
            if _MISSING_FEATURE.search(exc.pg_message):
                pytest.skip(f"{path.name} needs what PostgreSQL {pg_server.major_version} here lacks: "
                            f"{exc.pg_message} ({exc.path}:{exc.line})")
            raise
    gaps = KNOWN_GAPS.get(path.stem, ())
    try:
        plan = converge(tmp_path, database, pg_server, "", schema, replan=True)
    except RefusedError as exc:
        for pattern, why in gaps:
            if re.search(pattern, str(exc)):
                pytest.xfail(f"known engine gap: {why}")
        raise
    if gaps:
        pytest.fail(f"{path.name} converges now: remove it from KNOWN_GAPS")
    assert plan.body.steps, f"{path.name}: no steps planned from an empty database"
