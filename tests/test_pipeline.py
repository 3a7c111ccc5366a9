"""The stages wired together: shadow versions, what migra cannot express, verification inside apply."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pytest

from reconciler import history, inspect
from reconciler.apply import ApplyOptions, apply_plan
from reconciler.config import Environment, load_config
from reconciler.errors import ApplyError, ReconcilerError, RefusedError
from reconciler.pipeline import make_plan, open_servers, shadow_cache_dir
from reconciler.servers import EmbeddedCluster, Server, bindir_for_shadow, connect, find_bindir, wheel_bindir
from tests.conftest import fetch_one, run_sql

PG15 = Path("/usr/lib/postgresql/15/bin")


def _config(tmp_path: Path, schema_sql: str) -> Path:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "schema.sql").write_text(schema_sql)
    (tmp_path / "reconciler.yaml").write_text("schemas: schemas\n")
    return tmp_path / "reconciler.yaml"


def test_shadow_falls_back_to_the_wheel_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="reconciler"):
        chosen = bindir_for_shadow(9)
    assert chosen == wheel_bindir()
    assert "runs PostgreSQL 9" in caplog.text and "the shadow uses PostgreSQL 18" in caplog.text


@pytest.mark.skipif(not (PG15 / "postgres").exists(), reason="Debian's postgresql-15 is not installed")
def test_embedded_shadow_matches_target_major_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      request: pytest.FixtureRequest) -> None:
    """A PostgreSQL 15 target gets a PostgreSQL 15 shadow, and the whole plan/apply works on 15."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    request.addfinalizer(lambda: shutil.rmtree(EmbeddedCluster(shadow_cache_dir(15), PG15, durable=False).datadir,
                                                ignore_errors=True))
    assert find_bindir(15) == PG15
    target = EmbeddedCluster(Path(tempfile.mkdtemp()) / "pg15", PG15, durable=False)
    server = target.start()
    try:
        config = load_config(_config(tmp_path, "CREATE TABLE t (id int PRIMARY KEY, name text NOT NULL);\n"))
        env = Environment(name="pg15", database=server.dsn)
        with open_servers(config, env) as servers:
            assert servers.target_major == 15
            assert servers.shadow.major_version == 15
            assert servers.shadow.dsn != server.dsn
            plan = make_plan(config, env, servers).plan
            assert plan.body.target.server_version.startswith("15.")
            result = apply_plan(plan, servers.target_dsn, ApplyOptions(environment="pg15", metadata_schema="reconciler"))
        assert result.status == "applied"
        assert fetch_one(server.dsn, "SELECT count(*) FROM information_schema.columns WHERE table_name = 't'") == 2
    finally:
        target.stop(delete=True)


STORAGE_EXTERNAL = "CREATE TABLE t (id int PRIMARY KEY, body text);\nALTER TABLE t ALTER COLUMN body SET STORAGE EXTERNAL;\n"


def test_differences_migra_cannot_express_are_refused(tmp_path: Path, database: str, pg_server: Server) -> None:
    run_sql(database, "CREATE TABLE t (id int PRIMARY KEY, body text)")
    config = load_config(_config(tmp_path, STORAGE_EXTERNAL))
    env = Environment(name="test", database=database, shadow=pg_server.dsn)
    with open_servers(config, env) as servers, pytest.raises(ReconcilerError) as err:
        make_plan(config, env, servers)
    assert "cannot express" in str(err.value) and "column public.t.body (different)" in str(err.value)


def test_apply_verifies_before_commit_and_rolls_back_a_plan_that_does_not_converge(
    tmp_path: Path, database: str, pg_server: Server
) -> None:
    """migra creates the table but not its column's storage mode: with verify_before_commit nothing is committed.
    (Rehearsal would refuse this plan at plan time; it is off here to reach apply's own check.)"""
    config = load_config(_config(tmp_path, STORAGE_EXTERNAL))
    env = Environment(name="test", database=database, shadow=pg_server.dsn, rehearse=False)
    with open_servers(config, env) as servers:
        plan = make_plan(config, env, servers).plan
    assert plan.body.steps[0].kind == "create_table"
    with pytest.raises(ApplyError) as err:
        apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler", verify_before_commit=True,
                                                allow_unrehearsed=True))
    assert "does not match the desired schema" in str(err.value) and "column public.t.body (different)" in str(err.value)
    assert "nothing was changed (rolled back)" in str(err.value)
    assert fetch_one(database, "SELECT to_regclass('public.t')") is None
    with connect(database) as conn:
        (run,) = history.list_runs(conn, "reconciler")
        assert run.status == "failed" and "column public.t.body" in (run.error or "")
        assert run.backend_pid is not None and run.finished_at is not None
        assert inspect.snapshot(conn).objects == {("schema", "public"): ""}


def test_apply_verifies_before_commit_by_default(tmp_path: Path, database: str, pg_server: Server) -> None:
    """README's promise, the default: a plan ending with a transaction is checked inside it, before COMMIT."""
    config = load_config(_config(tmp_path, STORAGE_EXTERNAL))
    env = Environment(name="test", database=database, shadow=pg_server.dsn, rehearse=False)
    with open_servers(config, env) as servers:
        plan = make_plan(config, env, servers).plan
    with pytest.raises(ApplyError) as err:
        apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler", allow_unrehearsed=True))
    assert "column public.t.body (different)" in str(err.value) and "nothing was changed (rolled back)" in str(err.value)
    assert fetch_one(database, "SELECT to_regclass('public.t')") is None
    assert fetch_one(database, "SELECT status FROM reconciler.runs") == "failed"


@pytest.mark.parametrize("ends_with", ["transaction", "concurrent drop"])
def test_a_result_short_of_desired_found_after_commit_is_undone(tmp_path: Path, database: str, pg_server: Server,
                                                               ends_with: str) -> None:
    """Checked after the last step (the check inside the transaction off, or a plan ending with a concurrent index
    drop): what was committed is undone by each step's rollback SQL, and the run is recorded rolled back."""
    run_sql(database, "CREATE TABLE u (id int PRIMARY KEY, note text)")
    if ends_with == "concurrent drop":
        run_sql(database, "CREATE INDEX u_note_idx ON u (note)")
    config = load_config(_config(tmp_path, STORAGE_EXTERNAL + "CREATE TABLE u (id int PRIMARY KEY, note text);\n"))
    env = Environment(name="test", database=database, shadow=pg_server.dsn, rehearse=False)
    with open_servers(config, env) as servers:
        plan = make_plan(config, env, servers).plan
    assert plan.body.steps[-1].transactional == (ends_with == "transaction")
    with pytest.raises(ApplyError) as err:
        apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler", allow_unrehearsed=True,
                                                verify_before_commit=ends_with == "concurrent drop"))
    assert "column public.t.body (different)" in str(err.value) and "undone by their rollback SQL" in str(err.value)
    assert fetch_one(database, "SELECT to_regclass('public.t')") is None
    if ends_with == "concurrent drop":  # dropped, then made again by its rollback SQL
        assert fetch_one(database, "SELECT to_regclass('public.u_note_idx') IS NOT NULL") is True
    assert fetch_one(database, "SELECT status FROM reconciler.runs") == "rolled back"


def test_metadata_schema_is_versioned_and_excluded(tmp_path: Path, database: str, pg_server: Server) -> None:
    config = load_config(_config(tmp_path, "CREATE TABLE t (id int PRIMARY KEY);\n"))
    env = Environment(name="test", database=database, shadow=pg_server.dsn)
    with open_servers(config, env) as servers:
        plan = make_plan(config, env, servers).plan
        apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler"))
        assert fetch_one(database, "SELECT max(version) FROM reconciler.schema_version") == history.SCHEMA_VERSION
        again = make_plan(config, env, servers).plan
    assert again.body.steps == ()  # the metadata schema is not ours to diff
    assert not any("reconciler" in key for key in again.body.target.objects)


def test_rehearsal_refuses_a_plan_that_relies_on_a_change_migra_skips(
    tmp_path: Path, database: str, pg_server: Server
) -> None:
    """No engine sets a column's storage mode: the rehearsal copy shows it and the plan is refused untouched."""
    run_sql(database, "CREATE TABLE t (id int PRIMARY KEY, body text)")
    desired = "CREATE TABLE t (id int PRIMARY KEY, note text, body text);\nALTER TABLE t ALTER COLUMN body SET STORAGE EXTERNAL;\n"
    config = load_config(_config(tmp_path, desired))
    env = Environment(name="test", database=database, shadow=pg_server.dsn)
    with connect(database) as conn:
        before = inspect.snapshot(conn).fingerprint
    with open_servers(config, env) as servers, pytest.raises(RefusedError) as err:
        make_plan(config, env, servers)
    assert "does not survive its rehearsal" in str(err.value)
    assert "column public.t.body (different)" in str(err.value)
    with connect(database) as conn:
        assert inspect.snapshot(conn).fingerprint == before


def test_plan_records_its_rehearsal_and_apply_refuses_unrehearsed_plans(
    tmp_path: Path, database: str, pg_server: Server
) -> None:
    config = load_config(_config(tmp_path, "CREATE TABLE t (id int PRIMARY KEY);\n"))
    env = Environment(name="test", database=database, shadow=pg_server.dsn)
    with open_servers(config, env) as servers:
        plan = make_plan(config, env, servers).plan
        unrehearsed = make_plan(config, Environment(name="test", database=database, shadow=pg_server.dsn,
                                                    rehearse=False), servers).plan
    assert plan.body.rehearsal.status == "converged"
    assert plan.body.rehearsal.server_version.startswith(f"{pg_server.major_version}.")
    assert unrehearsed.body.rehearsal.status == "skipped"
    options = ApplyOptions(environment="test", metadata_schema="reconciler")
    with pytest.raises(RefusedError, match=r"\(rehearsal\): the plan was not proven on a copy"):
        apply_plan(unrehearsed, database, options)
    assert apply_plan(plan, database, options).status == "applied"


def test_partitioned_index_is_attached_to_every_partition(tmp_path: Path, database: str, pg_server: Server) -> None:
    """migra builds the parent index ON ONLY and the partitions' indexes but never attaches them."""
    table = ("CREATE TABLE m (id int, region text) PARTITION BY LIST (region);\n"
             "CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');\nCREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');\n")
    run_sql(database, table)
    config = load_config(_config(tmp_path, table + "CREATE INDEX m_region_idx ON m (region);\n"))
    env = Environment(name="test", database=database, shadow=pg_server.dsn)
    with open_servers(config, env) as servers:
        plan = make_plan(config, env, servers).plan
    attaches = [s.sql for s in plan.body.steps if "ATTACH PARTITION" in s.sql]
    assert attaches == ['ALTER INDEX "public"."m_region_idx" ATTACH PARTITION "public"."m_eu_region_idx"',
                        'ALTER INDEX "public"."m_region_idx" ATTACH PARTITION "public"."m_us_region_idx"']
    assert plan.body.rehearsal.converged
    assert apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler")).status == "applied"
    assert fetch_one(database, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'm_region_idx'::regclass") is True


def test_live_memo_reads_live_again_only_after_a_catalog_change(database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """watch's memo of live's snapshot: the same snapshot while live's catalogs stay as they were (statistics
    aside), a new reading after DDL, and a separate reading per setting of what the snapshot includes."""
    from reconciler import pipeline

    run_sql(database, "CREATE TABLE t (id int PRIMARY KEY, note text);")
    reads: list[tuple[bool, bool]] = []
    real = inspect.snapshot

    def counted(conn: object, **kwargs: object) -> inspect.SchemaSnapshot:
        reads.append((bool(kwargs.get("owners")), bool(kwargs.get("privileges"))))
        return real(conn, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inspect, "snapshot", counted)
    memo = pipeline.LiveMemo()
    excluded = ("reconciler",)
    with connect(database) as conn:
        first = memo.snapshot(conn, exclude_schemas=excluded, owners=False, privileges=False)
        run_sql(database, "INSERT INTO t VALUES (1, 'x'); ANALYZE t;")  # data and statistics: no catalog change
        again = memo.snapshot(conn, exclude_schemas=excluded, owners=False, privileges=False)
        assert again is first and len(reads) == 1
        with_owners = memo.snapshot(conn, exclude_schemas=excluded, owners=True, privileges=False)
        assert reads[-1] == (True, False) and with_owners != first
        run_sql(database, "ALTER TABLE t ADD COLUMN at timestamptz;")
        after = memo.snapshot(conn, exclude_schemas=excluded, owners=True, privileges=False)
        assert after == real(conn, exclude_schemas=excluded, owners=True)
    assert len(reads) == 3 and after != with_owners


def test_live_memo_reads_sizes_every_time_and_catalog_facts_after_a_change(database: str) -> None:
    from reconciler import pipeline

    run_sql(database, "CREATE TABLE t (id int PRIMARY KEY, note text);")
    memo = pipeline.LiveMemo()
    excluded = ("reconciler",)
    with connect(database) as conn:
        first = memo.facts(conn, exclude_schemas=excluded)
        run_sql(database, "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 500) g; ANALYZE t;")
        again = memo.facts(conn, exclude_schemas=excluded)
        assert first.tables["public.t"].rows == 0 and again.tables["public.t"].rows == 500  # sizes: read again
        assert again.columns is first.columns and again.indexes is first.indexes  # the catalogs': kept
        run_sql(database, "ALTER TABLE t ADD COLUMN at timestamptz; CREATE INDEX t_note ON t (note);")
        after = memo.facts(conn, exclude_schemas=excluded)
        fresh = inspect.live_facts(conn, exclude_schemas=excluded)
    assert ("public.t", "at") in after.columns and "public.t_note" in after.indexes
    assert after == fresh


def test_a_plan_whose_live_schema_moves_under_it_says_so(tmp_path: Path, database: str, pg_server: Server,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An apply renames a table after the plan read live and before live's copy is dumped (found by
    bench/faults.py: a plan beside an apply): the plan says live changed while it was planned, and keeps no copy of
    the renamed schema under the fingerprint it read (every later plan of that schema would have failed on it with an
    unexpected "relation does not exist")."""
    from reconciler import pipeline, shadowcache
    from reconciler.rehearsal import LiveMoved

    run_sql(database, "CREATE TABLE audit_log_v1 (id int PRIMARY KEY, note text)")
    config = load_config(_config(tmp_path, "-- reconciler: renamed from audit_log_v1\n"
                                           "CREATE TABLE audit_log (id int PRIMARY KEY, note text);\n"))
    env = Environment(name="test", database=database, shadow=pg_server.dsn)
    copy_ahead = pipeline.prepare_live_copy

    def renamed_meanwhile(**kwargs: object) -> object:
        run_sql(database, "ALTER TABLE audit_log_v1 RENAME TO audit_log")  # what a concurrent apply does, now
        return copy_ahead(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "prepare_live_copy", renamed_meanwhile)
    with open_servers(config, env) as servers:
        with pytest.raises(LiveMoved, match="changed while it was being planned"):
            make_plan(config, env, servers)
        kept = [t.fingerprint for t in shadowcache.list_templates(servers.shadow) if t.kind == "live copy"]
        monkeypatch.setattr(pipeline, "prepare_live_copy", copy_ahead)
        assert make_plan(config, env, servers).plan.body.rehearsal.converged  # planned again from live as it is
    assert kept == []
