"""Desired SQL is untrusted input: a schema file that tries to leave its scratch database is refused at its
file:line and leaves no trace, on an embedded shadow and on a shadow server given by a superuser's DSN."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql

from reconciler import servers as servers_module
from reconciler.config import load_config
from reconciler.errors import ReconcilerError, SchemaLoadError, ServerError
from reconciler.pipeline import lint_schema, make_plan, open_servers
from reconciler.sandbox import LOAD_ROLE, LoadLimits
from reconciler.sandbox import prepare as prepare_sandbox
from reconciler.servers import (
    SERVER_ENVIRONMENT_ADDED,
    SERVER_ENVIRONMENT_FIXED,
    SERVER_ENVIRONMENT_PASSED,
    EmbeddedCluster,
    Server,
    connect,
)

SHADOWS = ("embedded", "dsn")


@pytest.fixture(scope="module")
def cache_home() -> Iterator[Path]:
    """One embedded shadow for the module (its own cache folder), removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="reconciler-least-privilege-"))
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous
    for datadir in home.glob("reconciler/shadow-pg*"):
        EmbeddedCluster(datadir, durable=False).stop(delete=True)
    shutil.rmtree(home, ignore_errors=True)


class Project:
    def __init__(self, root: Path, database: str, server: Server, load: str = "") -> None:
        self.root = root
        (root / "schemas").mkdir(parents=True)
        (root / "policies").mkdir()
        (root / "reconciler.yaml").write_text(textwrap.dedent(f"""\
            environments:
              embedded:
                database: "{database}"
                require_signed_plans: false
              dsn:
                database: "{database}"
                shadow: "{server.dsn}"
                require_signed_plans: false
            safety:
              squawk: false
            """) + load)

    def plan(self, shadow: str, schema: str) -> None:
        (self.root / "schemas" / "schema.sql").write_text(schema)
        config = load_config(self.root / "reconciler.yaml")
        env = config.environment(shadow)
        with open_servers(config, env) as servers:
            make_plan(config, env, servers)

    def shadow_dsn(self, shadow: str) -> Iterator[str]:
        config = load_config(self.root / "reconciler.yaml")
        with open_servers(config, config.environment(shadow)) as servers:
            yield servers.shadow.dsn

    def refused(self, shadow: str, schema: str) -> SchemaLoadError:
        with pytest.raises(SchemaLoadError) as caught:
            self.plan(shadow, schema)
        return caught.value


@pytest.fixture
def project(tmp_path: Path, database: str, pg_server: Server, cache_home: Path) -> Project:
    return Project(tmp_path, database, pg_server)


@pytest.fixture
def marker() -> Iterator[Path]:
    """A file a server program could write (/tmp is anyone's), which must never appear."""
    path = Path(tempfile.gettempdir()) / f"reconciler-escape-{secrets.token_hex(6)}"
    yield path
    path.unlink(missing_ok=True)


def _superuser(server: Server) -> str:
    with connect(server.dsn) as conn:
        return str(conn.info.user)


# (name, statements): each tries to leave the database; {marker} a file it would write, {role} a role it would make,
# {superuser} the server's superuser. A program COPY writes to reads its input first: one that exits before the server
# has written makes the COPY fail with a broken pipe, at random.
ESCAPES = {
    "copy to program": "COPY (SELECT 1) TO PROGRAM 'cat >/dev/null; touch {marker}'",
    "copy from program": "COPY harmless (id) FROM PROGRAM 'touch {marker}'",
    "copy to a file": "COPY (SELECT 1) TO '{marker}'",
    "copy from a file": "COPY harmless (id) FROM '/proc/self/stat'",
    "pg_read_file": "SELECT pg_read_file('/proc/self/environ')",
    "lo_export": "SELECT lo_export(lo_from_bytea(0, '1'), '{marker}')",
    "alter system": "ALTER SYSTEM SET work_mem = '7777kB'",
    "superuser role": "CREATE ROLE {role} SUPERUSER",
    "set role": "SET ROLE {superuser};\nCOPY (SELECT 1) TO PROGRAM 'cat >/dev/null; touch {marker}'",
    "reset role": "RESET ROLE;\nCOPY (SELECT 1) TO PROGRAM 'cat >/dev/null; touch {marker}'",
    "session authorization": "SET SESSION AUTHORIZATION {superuser};\nCOPY (SELECT 1) TO PROGRAM 'cat >/dev/null; touch {marker}'",
    "extension": "CREATE EXTENSION file_fdw",
}


def _wrapped(how: str, statements: str) -> tuple[str, str]:
    """The schema file, and the text of the statement the refusal must point at."""
    head = "CREATE TABLE harmless (id int);\n"
    if how == "plain":  # RESET ROLE does nothing for a role that logged in as itself: what follows is refused
        return head + statements + ";\n", statements.split(";\n")[1 if statements.startswith("RESET") else 0]
    executes = "".join(f"    EXECUTE {sql.Literal(s.strip()).as_string(None)};\n" for s in statements.split(";\n"))
    if how == "do block":
        return head + f"DO $$\nBEGIN\n{executes}END\n$$;\n", "DO $$"
    return (head + f"CREATE FUNCTION public.innocent() RETURNS void LANGUAGE plpgsql AS $$\nBEGIN\n{executes}END\n$$;\n"
            "SELECT public.innocent();\n", "SELECT public.innocent()")


def _traces(project: Project, shadow: str, marker: Path, role: str) -> list[str]:
    with contextlib.contextmanager(project.shadow_dsn)(shadow) as dsn:
        return _traces_on(dsn, marker, role)


def _traces_on(dsn: str, marker: Path, role: str) -> list[str]:
    found = []
    if marker.exists():
        found.append(f"{marker} was written")
    with connect(dsn) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            found.append(f"role {role} exists")
        if conn.execute("SELECT 1 FROM pg_file_settings WHERE name = 'work_mem' AND setting = '7777kB'").fetchone():
            found.append("ALTER SYSTEM changed work_mem")
        if conn.execute("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = %s", (LOAD_ROLE,)).fetchone() \
                not in (None, (False,)):
            found.append(f"{LOAD_ROLE} gained attributes")
    return found


def test_the_traces_are_real(pg_server: Server, marker: Path) -> None:
    """What the escapes below try does work for a superuser on this server, and leaves the traces looked for: a
    missing trace there means refused."""
    role = f"escaped_{secrets.token_hex(4)}"
    with connect(pg_server.dsn) as conn:
        conn.execute(sql.SQL("COPY (SELECT 1) TO PROGRAM {}").format(sql.Literal(f"cat >/dev/null; touch {marker}")))
        conn.execute(sql.SQL("CREATE ROLE {} SUPERUSER").format(sql.Identifier(role)))
        conn.execute("ALTER SYSTEM SET work_mem = '7777kB'")
        try:
            assert _traces_on(pg_server.dsn, marker, role) == [
                f"{marker} was written", f"role {role} exists", "ALTER SYSTEM changed work_mem"]
        finally:
            conn.execute("ALTER SYSTEM RESET work_mem")
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("shadow", SHADOWS)
@pytest.mark.parametrize("how", ["plain", "do block", "function"])
@pytest.mark.parametrize("escape", list(ESCAPES))
def test_an_escape_is_refused_at_its_line_and_leaves_no_trace(project: Project, pg_server: Server, marker: Path,
                                                              escape: str, how: str, shadow: str) -> None:
    role = f"escaped_{secrets.token_hex(4)}"
    statements = ESCAPES[escape].format(marker=marker, role=role, superuser=_superuser(pg_server))
    schema, culprit = _wrapped(how, statements)
    error = project.refused(shadow, schema)
    assert error.path == "schema.sql"
    assert error.line == schema[:schema.index(culprit)].count("\n") + 1, str(error)
    assert _traces(project, shadow, marker, role) == []


@pytest.mark.parametrize("shadow", SHADOWS)
@pytest.mark.parametrize("how", ["do block", "function"])
def test_an_endless_loop_ends_at_its_line(tmp_path: Path, database: str, pg_server: Server, cache_home: Path,
                                          shadow: str, how: str) -> None:
    project = Project(tmp_path, database, pg_server, load="load:\n  statement_timeout: 1s\n")
    schema, culprit = _wrapped(how, "SELECT 1 FROM pg_sleep(0.01)")
    schema = schema.replace("BEGIN\n", "BEGIN\n  LOOP\n").replace("END\n$$", "  END LOOP;\nEND\n$$")
    schema = "SET statement_timeout = 0;\n" + schema  # the file cannot lift the limit
    error = project.refused(shadow, schema)
    assert error.line == schema[:schema.index(culprit)].count("\n") + 1
    assert "time limit (1 s" in str(error)


@pytest.mark.parametrize("shadow", SHADOWS)
def test_temporary_files_are_bounded(tmp_path: Path, database: str, pg_server: Server, cache_home: Path,
                                     shadow: str) -> None:
    project = Project(tmp_path, database, pg_server, load="load:\n  temp_file_limit: 1MB\n")
    schema = ("CREATE TABLE t (id int);\n"
              "CREATE MATERIALIZED VIEW sorted AS SELECT g FROM generate_series(1, 2000000) g ORDER BY g DESC;\n")
    error = project.refused(shadow, schema)
    assert error.line == 2 and "temp_file_limit" in str(error)


def test_an_untrusted_extension_is_made_by_the_tool_only_when_listed(tmp_path: Path, database: str,
                                                                      pg_server: Server, cache_home: Path) -> None:
    schema = "CREATE SCHEMA checks;\nCREATE EXTENSION amcheck WITH SCHEMA checks;\nCREATE TABLE t (id int);\n"
    unlisted = Project(tmp_path / "unlisted", database, pg_server)
    error = unlisted.refused("embedded", schema)
    assert error.line == 2 and 'extension "amcheck"' in str(error) and "load.extensions" in str(error)
    listed = Project(tmp_path / "listed", database, pg_server, load="load:\n  extensions: [amcheck]\n")
    listed.plan("embedded", schema)
    listed.plan("dsn", schema)
    # a trusted one needs no listing: PostgreSQL lets the database's owner make it
    unlisted.plan("dsn", "CREATE EXTENSION pg_trgm;\nCREATE TABLE t (name text);\n")


def test_a_listed_extension_is_not_made_where_the_schema_planted_functions(tmp_path: Path, database: str,
                                                                            pg_server: Server,
                                                                            cache_home: Path) -> None:
    """An extension's install script runs as a superuser with its schema first on the search path: a function the
    schema put there first (lower(varchar) would win over pg_catalog's lower(text)) would run as the superuser."""
    project = Project(tmp_path, database, pg_server, load="load:\n  extensions: [amcheck]\n")
    schema = ("CREATE SCHEMA checks;\n"
              "CREATE FUNCTION checks.lower(varchar) RETURNS text LANGUAGE sql AS 'SELECT current_user::text';\n"
              "CREATE EXTENSION amcheck WITH SCHEMA checks;\n")
    error = project.refused("dsn", schema)
    assert error.line == 3 and "checks.lower(character varying)" in str(error)


def test_roles_the_schema_creates_are_stand_ins_on_a_shadow_of_its_own(project: Project, pg_server: Server) -> None:
    name = f"app_{secrets.token_hex(4)}"
    schema = (f"CREATE ROLE {name} LOGIN PASSWORD 'secret';\nCREATE TABLE t (id int);\n"
              f"ALTER TABLE t OWNER TO {name};\nGRANT SELECT ON t TO {name};\n")
    project.plan("embedded", schema)
    config = load_config(project.root / "reconciler.yaml")
    with open_servers(config, config.environment("embedded")) as servers, connect(servers.shadow.dsn) as conn:
        row = conn.execute("SELECT rolcanlogin, rolpassword IS NULL FROM pg_authid WHERE rolname = %s",
                           (name,)).fetchone()
    assert row == (False, True)  # NOLOGIN, no password: a stand-in
    # on the target's own cluster a schema file may not create roles
    error = project.refused("dsn", schema)
    assert error.line == 1 and "target's cluster" in str(error)
    with connect(pg_server.dsn) as conn:
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is None


def test_objects_are_never_handed_to_a_superuser(project: Project, pg_server: Server) -> None:
    """pg_dump's ``OWNER TO postgres`` is skipped when owners are not compared, and refused when they are: a
    superuser that owns a view or function of the schema's would run its code as a superuser."""
    superuser = _superuser(pg_server)
    schema = f"CREATE TABLE t (id int);\nALTER TABLE t OWNER TO {superuser};\n"
    project.plan("dsn", schema)
    config = project.root / "reconciler.yaml"
    config.write_text(config.read_text() + "manage_owners: true\n")
    error = project.refused("dsn", schema)
    assert error.line == 2 and f"role {superuser}" in str(error)


def test_the_load_role_is_put_right(project: Project, pg_server: Server, marker: Path) -> None:
    """Whatever gave the load role more (by hand, or a file through its own session defaults) is taken back."""
    project.plan("dsn", "CREATE TABLE t (id int);\n")
    with connect(pg_server.dsn) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} SUPERUSER CREATEROLE").format(sql.Identifier(LOAD_ROLE)))
        conn.execute(sql.SQL("GRANT pg_execute_server_program TO {}").format(sql.Identifier(LOAD_ROLE)))
        conn.execute(sql.SQL("ALTER ROLE {} SET statement_timeout = 0").format(sql.Identifier(LOAD_ROLE)))
    error = project.refused("dsn", f"COPY (SELECT 1) TO PROGRAM 'cat >/dev/null; touch {marker}';\n")
    assert error.line == 1 and not marker.exists()
    with connect(pg_server.dsn) as conn:
        row = conn.execute("SELECT rolsuper, rolcreaterole, pg_has_role(%s, 'pg_execute_server_program', 'MEMBER') "
                           "FROM pg_roles WHERE rolname = %s", (LOAD_ROLE, LOAD_ROLE)).fetchone()
        settings = conn.execute("SELECT setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                                "WHERE r.rolname = %s", (LOAD_ROLE,)).fetchall()
    assert row == (False, False, False)
    assert [sorted(s[0]) for s in settings] == [["statement_timeout=60000ms", "temp_file_limit=1GB"]]


def test_an_embedded_server_gets_nothing_of_the_callers_environment(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECONCILER_KEY_PASSPHRASE", "canary-passphrase")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-key")
    cluster = EmbeddedCluster(tmp_path / "pg", durable=False)
    try:
        cluster.start()
        names, values = _environment(cluster)
        assert names <= {*SERVER_ENVIRONMENT_PASSED, *SERVER_ENVIRONMENT_FIXED, *SERVER_ENVIRONMENT_ADDED}, names
        assert not any(b"canary" in v for v in values)
    finally:
        cluster.stop(delete=True)


def test_a_server_started_with_more_is_restarted_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shadow server left running by an older version, which passed the whole environment on, is restarted."""
    dirty = {**os.environ, "RECONCILER_KEY_PASSPHRASE": "canary-passphrase"}
    first = EmbeddedCluster(tmp_path / "pg", durable=False)
    with monkeypatch.context() as patched:
        patched.setattr(servers_module, "server_environment", lambda: dirty)
        first.start()
    second = EmbeddedCluster(tmp_path / "pg", durable=False)
    try:
        assert "RECONCILER_KEY_PASSPHRASE" in _environment(first)[0]
        first._release_lock()  # leave it running, as a process that ended would
        second.start()
        assert "RECONCILER_KEY_PASSPHRASE" not in _environment(second)[0]
    finally:
        second.stop(delete=True)


def _environment(cluster: EmbeddedCluster) -> tuple[set[str], list[bytes]]:
    pid = int((cluster.datadir / "postmaster.pid").read_text().splitlines()[0])
    items = [i for i in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if i]
    return {i.split(b"=", 1)[0].decode() for i in items}, items


def _as_superuser(marker: Path) -> str:
    """PL/pgSQL that writes ``marker`` when, and only when, it runs as a superuser."""
    return ("IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN\n"
            f"    EXECUTE 'COPY (SELECT 1) TO PROGRAM ''cat >/dev/null; touch {marker}''';\nEND IF;\n")


@pytest.mark.parametrize("shadow", SHADOWS)
def test_the_rehearsal_runs_the_steps_as_the_load_role(project: Project, marker: Path, shadow: str) -> None:
    """Code that behaves only when it runs as a superuser loads quietly as the load role; the plan's steps then run
    it again (a materialized view is filled when created) on the rehearsal's copy of live, as the load role too."""
    schema = ("CREATE FUNCTION public.patient() RETURNS int LANGUAGE plpgsql AS $$\nBEGIN\n" + _as_superuser(marker)
              + "RETURN 1;\nEND $$;\nCREATE MATERIALIZED VIEW public.filled AS SELECT public.patient() AS one;\n")
    project.plan(shadow, schema)
    assert not marker.exists()


def test_the_schemas_event_triggers_never_fire_in_the_tools_sessions(tmp_path: Path, database: str,
                                                                     pg_server: Server, cache_home: Path,
                                                                     marker: Path) -> None:
    """The tool makes an event trigger for the schema (only a superuser may); its function would run as whoever runs
    DDL there, and the tool itself does (the extension it makes later): its sessions run with event triggers off."""
    project = Project(tmp_path, database, pg_server, load="load:\n  extensions: [amcheck]\n")
    schema = ("CREATE FUNCTION public.watcher() RETURNS event_trigger LANGUAGE plpgsql AS $$\nBEGIN\n"
              + _as_superuser(marker) + "END $$;\n") + textwrap.dedent("""\
        CREATE EVENT TRIGGER watcher ON ddl_command_start EXECUTE FUNCTION watcher();
        CREATE TABLE t (id int);
        CREATE SCHEMA checks;
        CREATE EXTENSION amcheck WITH SCHEMA checks;
        """)
    for shadow in SHADOWS:
        with pytest.raises(ReconcilerError, match=r"event trigger watcher \(missing\)"):  # loaded, then refused
            project.plan(shadow, schema)
        assert not marker.exists()


def test_what_dumps_and_scripts_hold_still_loads(tmp_path: Path, database: str, pg_server: Server,
                                                 cache_home: Path) -> None:
    """pg_dump's and hand-written scripts' habits: an explicit transaction around extensions the tool makes (one
    needing another the file made in that transaction), comments on extensions the load role does not own, roles
    dropped and made again, and a membership among them."""
    project = Project(tmp_path, database, pg_server, load="load:\n  extensions: [earthdistance]\n")
    stand_in = f"web_{secrets.token_hex(4)}"
    schema = textwrap.dedent(f"""\
        BEGIN;
        CREATE EXTENSION IF NOT EXISTS cube WITH SCHEMA public;
        CREATE EXTENSION IF NOT EXISTS earthdistance WITH SCHEMA public;
        COMMIT;
        COMMENT ON EXTENSION earthdistance IS 'distances on the surface of the Earth';
        COMMENT ON EXTENSION plpgsql IS 'PL/pgSQL procedural language';
        CREATE TABLE places (id int PRIMARY KEY, at earth);
        DROP ROLE IF EXISTS {stand_in};
        CREATE ROLE {stand_in};
        CREATE ROLE {stand_in}_reader;
        GRANT {stand_in}_reader TO {stand_in};
        GRANT SELECT ON places TO {stand_in}_reader;
        """)
    project.plan("embedded", schema)
    project.plan("embedded", schema)  # again: the roles are there now, kept
    with contextlib.contextmanager(project.shadow_dsn)("embedded") as dsn, connect(dsn) as conn:
        assert conn.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (stand_in, f"{stand_in}_reader")).fetchone() == (True,)


def test_lint_loads_as_the_load_role(project: Project, marker: Path) -> None:
    """`reconciler lint` loads the schema into an embedded shadow of its own: as the load role too."""
    (project.root / "schemas" / "schema.sql").write_text(f"CREATE TABLE t (id int);\n"
                                                         f"COPY (SELECT 1) TO PROGRAM 'cat >/dev/null; touch {marker}';\n")
    with pytest.raises(SchemaLoadError) as caught:
        lint_schema(load_config(project.root / "reconciler.yaml"), "embedded")
    assert caught.value.line == 2 and not marker.exists()


def test_a_shadow_server_that_asks_for_passwords(tmp_path: Path) -> None:
    """A shadow server given by DSN with a password (scram, as most are): the load role logs in with a password
    derived from that one (every process with the DSN derives the same), set hashed by the client; without it the
    load role cannot log in."""
    cluster = EmbeddedCluster(tmp_path / "pg", durable=False)
    try:
        server = cluster.start()
        secret = f"pw-{secrets.token_hex(8)}"
        with connect(server.dsn) as conn:
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(secret)))
        (cluster.datadir / "pg_hba.conf").write_text("local all all scram-sha-256\n")
        with connect(server.dsn) as conn:
            conn.execute("SELECT pg_reload_conf()")
        with_password = Server(dsn=f"{server.dsn} password={secret}", major_version=server.major_version,
                               bindir=server.bindir, embedded=False)
        loader = prepare_sandbox(with_password, LoadLimits(), stand_ins=True)
        assert loader.password and loader.password != secret
        with loader.connect(with_password.database_dsn("postgres")) as conn:
            assert conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
                                ).fetchone() == (LOAD_ROLE, False)
        again = prepare_sandbox(with_password, LoadLimits(), stand_ins=True)
        assert again.password == loader.password  # no reset: another process's sessions keep working
        with pytest.raises(ServerError, match="password"):
            connect(f"{server.database_dsn('postgres')} user={LOAD_ROLE}").close()
        with connect(with_password.dsn) as conn:
            hashed = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (LOAD_ROLE,)).fetchone()
        assert hashed is not None and str(hashed[0]).startswith("SCRAM-SHA-256$")
    finally:
        cluster.stop(delete=True)
