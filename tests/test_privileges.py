"""Owners and privileges (manage_owners, manage_privileges): planned, rehearsed, applied and verified on a real
PostgreSQL; left alone when the options are off. Roles are cluster-wide: each test makes its own, uniquely
named, and drops them afterwards."""

from __future__ import annotations

import secrets
import shutil
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg import sql

from reconciler import inspect
from reconciler.apply import ApplyOptions, apply_plan
from reconciler.config import EMBEDDED, Environment, load_config
from reconciler.pipeline import drift, make_plan, open_servers, shadow_cache_dir
from reconciler.plan import Plan
from reconciler.planfile import plan_to_json, read_plan, write_plan
from reconciler.servers import EmbeddedCluster, Server, bindir_for_shadow, connect, throwaway_database
from reconciler.shadow import create_roles, roles_named, same_cluster
from reconciler.source import load_source
from tests.conftest import fetch_one


@dataclass(frozen=True)
class Roles:
    reader: str
    writer: str
    owner: str

    def fill(self, text: str) -> str:
        return text.format(reader=self.reader, writer=self.writer, owner=self.owner)


def _drop_roles(server: Server, names: list[str]) -> None:
    with connect(server.dsn) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def roles(pg_server: Server) -> Iterator[Roles]:
    """Three NOLOGIN roles with unique names; requested before ``database`` so they are dropped after it."""
    tag = secrets.token_hex(4)
    made = Roles(reader=f"rp_{tag}_reader", writer=f"rp_{tag}_writer", owner=f"rp_{tag}_owner")
    names = [made.reader, made.writer, made.owner]
    with connect(pg_server.dsn) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
    try:
        yield made
    finally:
        _drop_roles(pg_server, names)


class Project:
    """A schemas folder and a reconciler.yaml, planned and applied against the test database."""

    def __init__(self, root: Path, database: str, server: Server | None, *, privileges: bool, owners: bool) -> None:
        self.database = database
        (root / "schemas").mkdir()
        self.schema_file = root / "schemas" / "schema.sql"
        config = root / "reconciler.yaml"
        config.write_text(f"schemas: schemas\nmanage_privileges: {str(privileges).lower()}\n"
                          f"manage_owners: {str(owners).lower()}\n")
        self.config = load_config(config)
        # no server: the shadow is an embedded cluster of its own
        self.env = Environment(name="test", database=database, shadow=server.dsn if server else EMBEDDED)

    def plan(self, schema_sql: str) -> Plan:
        self.schema_file.write_text(textwrap.dedent(schema_sql))
        with open_servers(self.config, self.env) as servers:
            return make_plan(self.config, self.env, servers).plan

    def drift(self) -> list[inspect.ObjectDifference]:
        with open_servers(self.config, self.env) as servers:
            return drift(self.config, servers)

    def converge(self, schema_sql: str) -> Plan:
        """Plan (with its rehearsal), apply (with its verification), then: no drift and nothing left to plan."""
        plan = self.plan(schema_sql)
        if plan.body.steps:
            assert plan.body.rehearsal.converged, plan.body.rehearsal.describe()
            result = apply_plan(plan, self.database, ApplyOptions(environment="test", metadata_schema="reconciler"))
            assert result.status == "applied"
        assert self.drift() == []
        assert self.plan(schema_sql).body.steps == ()
        return plan


def _sql(plan: Plan) -> list[str]:
    return [" ".join(s.sql.split()) for s in plan.body.steps]


@pytest.fixture
def managed(tmp_path: Path, roles: Roles, database: str, pg_server: Server) -> Project:
    return Project(tmp_path, database, pg_server, privileges=True, owners=True)


@pytest.mark.parametrize(
    ("base", "granted", "expected"),
    [
        pytest.param("CREATE TABLE t (id int, b text);", "GRANT SELECT, INSERT ON t TO {reader};",
                     'GRANT INSERT, SELECT ON TABLE public.t TO "{reader}"', id="table"),
        pytest.param("CREATE TABLE t (id int, b text);", "GRANT SELECT ON t TO {reader} WITH GRANT OPTION;",
                     'GRANT SELECT ON TABLE public.t TO "{reader}" WITH GRANT OPTION', id="grant-option"),
        pytest.param("CREATE FUNCTION f(a int) RETURNS int LANGUAGE sql AS 'select 1';",
                     "REVOKE EXECUTE ON FUNCTION f(int) FROM PUBLIC; GRANT EXECUTE ON FUNCTION f(int) TO {writer};",
                     "REVOKE EXECUTE ON FUNCTION public.f(integer) FROM PUBLIC", id="function"),
        pytest.param("CREATE SEQUENCE s;", "GRANT USAGE, SELECT ON SEQUENCE s TO {writer};",
                     'GRANT SELECT, USAGE ON SEQUENCE public.s TO "{writer}"', id="sequence"),
        pytest.param("CREATE SCHEMA app;", "GRANT USAGE ON SCHEMA app TO {reader};",
                     'GRANT USAGE ON SCHEMA app TO "{reader}"', id="schema"),
        pytest.param("CREATE TABLE t (id int, b text);", "GRANT UPDATE (b), SELECT (id) ON t TO {writer};",
                     'GRANT UPDATE (b) ON TABLE public.t TO "{writer}"', id="column"),
        pytest.param("CREATE TYPE mood AS ENUM ('sad', 'happy');", "REVOKE USAGE ON TYPE mood FROM PUBLIC;",
                     "REVOKE USAGE ON TYPE public.mood FROM PUBLIC", id="type"),
    ],
)
def test_a_grant_added_then_removed(managed: Project, roles: Roles, base: str, granted: str, expected: str) -> None:
    managed.converge(base)
    added = managed.converge(base + "\n" + roles.fill(granted))
    assert roles.fill(expected) in _sql(added)
    assert all(s.kind in ("grant", "revoke") for s in added.body.steps)
    assert added.body.manages == ("owners", "privileges")
    removed = managed.converge(base)
    assert removed.body.steps and all(s.kind in ("grant", "revoke") for s in removed.body.steps)


def test_default_privileges_and_the_objects_they_cover(managed: Project, roles: Roles) -> None:
    managed.converge("CREATE TABLE t (id int);\n")
    with_defaults = roles.fill("""
        ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {reader};
        ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE ON SEQUENCES TO {writer};
        ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
        CREATE TABLE t (id int);
        CREATE TABLE u (id int GENERATED ALWAYS AS IDENTITY);
        CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1';
        """)
    plan = managed.converge(with_defaults)
    statements = _sql(plan)
    assert roles.fill('ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO "{reader}"') in statements
    assert roles.fill('ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE ON SEQUENCES TO "{writer}"') in statements
    assert "ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC" in statements
    # the desired schema creates t after its default privileges, so it has them: live's t gets them by GRANT
    assert roles.fill('GRANT SELECT ON TABLE public.t TO "{reader}"') in statements
    for table in ("public.t", "public.u"):
        assert fetch_one(managed.database, roles.fill(f"SELECT has_table_privilege('{{reader}}', '{table}', 'SELECT')"))
    assert fetch_one(managed.database, roles.fill("SELECT has_sequence_privilege('{writer}', 'public.u_id_seq', 'USAGE')"))
    assert not fetch_one(managed.database, "SELECT has_function_privilege('public', 'public.f()', 'EXECUTE')")
    assert statements.index("ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC") > \
        next(i for i, s in enumerate(statements) if s.startswith(("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")))
    reverted = managed.converge("CREATE TABLE t (id int);\n")
    assert any(s.startswith("ALTER DEFAULT PRIVILEGES REVOKE SELECT ON TABLES FROM") for s in _sql(reverted))


def test_owner_changes(managed: Project, roles: Roles) -> None:
    base = "CREATE SCHEMA app;\nCREATE TABLE app.t (id int GENERATED ALWAYS AS IDENTITY);\n" \
           "CREATE FUNCTION app.f() RETURNS int LANGUAGE sql AS 'select 1';\nCREATE VIEW app.v AS SELECT 1 AS one;\n"
    managed.converge(base)
    owned = managed.converge(base + roles.fill(
        "ALTER SCHEMA app OWNER TO {owner};\nALTER TABLE app.t OWNER TO {owner};\n"
        "ALTER FUNCTION app.f() OWNER TO {owner};\nALTER VIEW app.v OWNER TO {owner};\n"))
    statements = _sql(owned)
    assert roles.fill('ALTER SCHEMA app OWNER TO "{owner}"') in statements
    assert roles.fill('ALTER TABLE app.t OWNER TO "{owner}"') in statements
    assert roles.fill('ALTER FUNCTION app.f() OWNER TO "{owner}"') in statements
    assert roles.fill('ALTER VIEW app.v OWNER TO "{owner}"') in statements
    assert not any("t_id_seq" in s for s in statements)  # an identity sequence follows its table
    assert fetch_one(managed.database, "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'app.t'::regclass") \
        == roles.owner
    back = managed.converge(base)
    assert "ALTER TABLE app.t OWNER TO CURRENT_USER" in _sql(back)


def test_a_new_table_gets_its_grants(managed: Project, roles: Roles) -> None:
    plan = managed.converge(roles.fill("""
        CREATE TABLE t (id int PRIMARY KEY, b text);
        GRANT SELECT ON t TO {reader};
        GRANT SELECT, INSERT, UPDATE (b) ON t TO {writer};
        CREATE TABLE owned (id int);
        ALTER TABLE owned OWNER TO {owner};
        """))
    statements = _sql(plan)
    assert statements[0].lower().startswith("create table")
    assert roles.fill('GRANT SELECT ON TABLE public.t TO "{reader}"') in statements
    assert roles.fill('GRANT UPDATE (b) ON TABLE public.t TO "{writer}"') in statements
    assert roles.fill('ALTER TABLE public.owned OWNER TO "{owner}"') in statements
    assert fetch_one(managed.database, roles.fill("SELECT has_column_privilege('{writer}', 'public.t', 'b', 'UPDATE')"))
    assert not fetch_one(managed.database, roles.fill("SELECT has_column_privilege('{writer}', 'public.t', 'id', 'UPDATE')"))


def test_plan_file_records_what_was_managed(managed: Project, roles: Roles, tmp_path: Path) -> None:
    plan = managed.plan(roles.fill("CREATE TABLE t (id int);\nGRANT SELECT ON t TO {reader};\n"))
    assert any(key.startswith("privileges table public.t") for key in plan.body.desired.objects)
    assert any(key.startswith("owner table public.t") for key in plan.body.desired.objects)
    write_plan(plan, tmp_path / "plan.json")
    again = read_plan(tmp_path / "plan.json")
    assert again.id == plan.id and again.body.manages == ("owners", "privileges")


def test_options_off_leave_privileges_alone(tmp_path: Path, roles: Roles, database: str, pg_server: Server) -> None:
    project = Project(tmp_path, database, pg_server, privileges=False, owners=False)
    plan = project.converge(roles.fill("""
        CREATE TABLE t (id int);
        GRANT SELECT ON t TO {reader};
        ALTER TABLE t OWNER TO {owner};
        """))
    assert [s.kind for s in plan.body.steps] == ["create_table"]  # migra's GRANT is dropped too
    assert "manages" not in plan_to_json(plan)["body"]
    assert not any(key.startswith(("privileges ", "owner ")) for key in plan.body.desired.objects)
    assert not fetch_one(database, roles.fill("SELECT has_table_privilege('{reader}', 'public.t', 'SELECT')"))
    with connect(database) as conn:
        conn.execute(roles.fill("GRANT INSERT ON t TO {writer}").encode())  # live-only grant: not drift either
    assert project.drift() == []
    assert project.plan(roles.fill("CREATE TABLE t (id int);\n")).body.steps == ()


def test_roles_the_desired_schema_names(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text(textwrap.dedent("""\
        CREATE ROLE made_here;
        CREATE SCHEMA s AUTHORIZATION schema_owner;
        GRANT SELECT ON t TO reader, PUBLIC, CURRENT_USER;
        ALTER TABLE t OWNER TO "Table Owner";
        ALTER FUNCTION f() OWNER TO made_here;
        ALTER DEFAULT PRIVILEGES FOR ROLE definer IN SCHEMA s GRANT SELECT ON TABLES TO pg_read_all_data;
        CREATE POLICY p ON t TO policy_role USING (true);
        """))
    assert roles_named(load_source(tmp_path)) == {"schema_owner", "reader", "Table Owner", "definer", "policy_role"}


def test_create_roles_makes_only_the_missing_ones(pg_server: Server, roles: Roles) -> None:
    extra = f"rp_{secrets.token_hex(4)}_extra"
    try:
        with throwaway_database(pg_server, "roles") as dsn:
            assert same_cluster(dsn, pg_server.dsn)
            assert create_roles(dsn, {roles.reader, extra}) == [extra]
            assert fetch_one(dsn, f"SELECT NOT rolcanlogin FROM pg_roles WHERE rolname = '{extra}'")
    finally:
        _drop_roles(pg_server, [extra])


def test_a_shadow_server_of_its_own_gets_the_roles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   request: pytest.FixtureRequest, roles: Roles, database: str,
                                                   pg_server: Server) -> None:
    """An embedded shadow (another cluster, another superuser): the roles the desired schema and live name are
    created there (NOLOGIN) before loading and before the rehearsal copy, and owners compare by applying role."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    major = pg_server.major_version
    shadow_dir = EmbeddedCluster(shadow_cache_dir(major), bindir_for_shadow(major), durable=False).datadir
    request.addfinalizer(lambda: shutil.rmtree(shadow_dir, ignore_errors=True))
    project = Project(tmp_path, database, None, privileges=True, owners=True)
    with open_servers(project.config, project.env) as servers:
        assert not same_cluster(servers.target_dsn, servers.shadow.dsn)
    with connect(database) as conn:
        conn.execute(roles.fill("CREATE TABLE live_only (id int); GRANT SELECT ON live_only TO {writer}").encode())
    plan = project.converge(roles.fill("""
        ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {reader};
        CREATE TABLE live_only (id int);
        CREATE TABLE t (id int);
        ALTER TABLE t OWNER TO {owner};
        GRANT SELECT ON live_only TO {writer};
        """))
    assert plan.body.rehearsal.converged
    assert roles.fill('ALTER TABLE public.t OWNER TO "{owner}"') in _sql(plan)


def test_privileges_without_owners(tmp_path: Path, roles: Roles, database: str, pg_server: Server) -> None:
    """manage_privileges alone: grants are reconciled, owners are not (nor the owner's own privileges moved)."""
    project = Project(tmp_path, database, pg_server, privileges=True, owners=False)
    plan = project.converge(roles.fill("""
        CREATE TABLE t (id int);
        ALTER TABLE t OWNER TO {owner};
        GRANT SELECT ON t TO {reader};
        """))
    assert roles.fill('GRANT SELECT ON TABLE public.t TO "{reader}"') in _sql(plan)
    assert not any("OWNER TO" in s for s in _sql(plan))
    assert plan.body.manages == ("privileges",)
