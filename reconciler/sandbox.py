"""The load role: desired SQL is code from a pull request, so it runs as a role that cannot leave its database.

A schema file runs on the shadow server before anyone has reviewed it. Run as the server's superuser it could run a
program (``COPY ... TO PROGRAM``), read or write the server's files, or make itself a superuser for later; ``SET ROLE``
inside a superuser's session would not stop it (the file could ``RESET ROLE``). So the desired schema is loaded, read
and tried on connections that *log in* as ``reconciler_load``: no superuser, no CREATEDB or CREATEROLE, no membership
in any role but the stand-ins the tool made, owner of its scratch databases only. What schemas legitimately hold
and needs more (an extension that is not trusted, roles, event triggers) is recognised by ``privileged`` and done by
the tool itself, in the forms it knows.

The role is made (and put right, should anything have changed it) each time a plan prepares the server: its
attributes, its memberships, its settings, which bound every statement it runs (``statement_timeout``,
``temp_file_limit``, which only a superuser may change). A client-side deadline backs the timeout: the file may
``SET statement_timeout = 0``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from . import dsn as dsnlib
from .errors import ReconcilerError
from .servers import Server, connect

log = logging.getLogger(__name__)

LOAD_ROLE = "reconciler_load"
RESTORE_ROLE = "reconciler_restore"  # NOLOGIN superuser: a copy of live is restored as it, then given to the load role
_ATTRIBUTES = ("rolsuper", "rolcreaterole", "rolcreatedb", "rolreplication", "rolbypassrls")
_NO_ATTRIBUTES = sql.SQL("NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS")


@dataclass(frozen=True)
class LoadLimits:
    """What one statement of desired SQL may take (``load:`` in reconciler.yaml)."""

    statement_timeout: float = 60.0  # seconds
    temp_file_limit: str = "1GB"
    extensions: frozenset[str] = field(default_factory=frozenset)  # not trusted, and created by the tool for the schema


class SandboxError(ReconcilerError):
    """The load role cannot be made or used on the shadow server."""


@dataclass(frozen=True)
class Sandbox:
    """The load role on one shadow server, and how to log in as it."""

    server_dsn: str  # the configured (privileged) role's, server-wide
    role: str
    password: str | None  # None: the server lets it in without one (an embedded cluster's private socket)
    limits: LoadLimits
    stand_ins: bool  # may the load role join roles the tool creates (a server that is not the target's cluster)

    def login(self, database_dsn: str) -> str:
        """``database_dsn`` (a database on this server) as the load role logs in to it."""
        params = dsnlib.parse(database_dsn)
        params["user"] = self.role
        params.pop("password", None)
        if self.password is not None:
            params["password"] = self.password
        params.pop("passfile", None)
        return str(psycopg.conninfo.make_conninfo(**params))

    def connect(self, database_dsn: str, *, application_name: str = "reconciler shadow") -> psycopg.Connection[Any]:
        return connect(self.login(database_dsn), application_name=application_name)

    def own(self, database_dsn: str) -> None:
        """Make the load role the owner of the scratch database at ``database_dsn`` (and, before PostgreSQL 15, of
        its ``public`` schema, which 15 gives the database's owner), and clear the settings a previous load may have
        given the database: they would apply to the tool's own sessions in it."""
        database = sql.Identifier(dsnlib.database_name(database_dsn) or "")
        with connect(database_dsn, application_name="reconciler shadow") as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(database, sql.Identifier(self.role)))
            conn.execute(sql.SQL("ALTER DATABASE {} RESET ALL").format(database))
            if conn.info.server_version < 150000:
                conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(self.role)))

    @property
    def restoring(self) -> str:
        """The line a restore of live's schema starts with: what it makes belongs to the restore role, and only that
        (live's schema needs a superuser for its extensions), so ``adopt`` can give it all to the load role."""
        return sql.SQL("SET ROLE {};\n").format(sql.Identifier(RESTORE_ROLE)).as_string(None)

    def adopt(self, database_dsn: str) -> None:
        """Give the load role a copy of live restored after ``restoring``: the plan's steps run in it as the load role,
        which must own what they change. Event triggers and foreign-data wrappers must belong to a superuser: they
        go to the configured role."""
        with self.admin(database_dsn) as conn:
            me = sql.Identifier(str(conn.info.user))
            for (name,) in conn.execute("SELECT evtname FROM pg_event_trigger WHERE evtowner = %s::regrole",
                                        (RESTORE_ROLE,)).fetchall():
                conn.execute(sql.SQL("ALTER EVENT TRIGGER {} OWNER TO {}").format(sql.Identifier(name), me))
            for (name,) in conn.execute("SELECT fdwname FROM pg_foreign_data_wrapper WHERE fdwowner = %s::regrole",
                                        (RESTORE_ROLE,)).fetchall():
                conn.execute(sql.SQL("ALTER FOREIGN DATA WRAPPER {} OWNER TO {}").format(sql.Identifier(name), me))
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(sql.Identifier(RESTORE_ROLE),
                                                                   sql.Identifier(self.role)))
        self.own(database_dsn)

    def provide(self, database_dsn: str, extensions: list[tuple[str, str, str]]) -> None:
        """Make (name, schema, version) extensions in a copy of live before the plan's steps run in it: the steps
        create the desired schema's extensions, and those only a superuser may create (which loading it made for the
        schema, ``load.extensions``) the load role cannot. Made as the restore role, then given to the load role as
        the rest of the copy (``adopt``); a schema they go to that live lacks is the load role's, as loading made it."""
        if not extensions:
            return
        with self.admin(database_dsn) as conn:
            for name, schema, version in extensions:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
                    sql.Identifier(schema), sql.Identifier(self.role)))
                conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(RESTORE_ROLE)))
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {} VERSION {} CASCADE").format(
                    sql.Identifier(name), sql.Identifier(schema), sql.Literal(version)))
                conn.execute("RESET ROLE")
        self.adopt(database_dsn)

    def admin(self, database_dsn: str) -> psycopg.Connection[Any]:
        """A privileged session in a scratch database that desired SQL has run in: event triggers the schema made do
        not fire in it (they would run the schema's functions as this role), and names resolve in pg_catalog only."""
        conn = connect(database_dsn, application_name="reconciler shadow")
        try:
            conn.execute("SET session_replication_role = replica")
            conn.execute("SET search_path = pg_catalog, pg_temp")
        except BaseException:
            conn.close()
            raise
        return conn

    def join(self, roles: set[str]) -> None:
        """Let the load role act as these roles (``OWNER TO``, ``AUTHORIZATION``), those of them that can do nothing
        it cannot: stand-ins, or on the target's cluster its NOLOGIN owner roles, which reach nothing outside the
        scratch database from there."""
        if not roles:
            return
        with connect(self.server_dsn, application_name="reconciler shadow") as conn, _roles_locked(conn):
            member = {r[0] for r in conn.execute(
                "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
                "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s", (self.role,)).fetchall()}
            for name in sorted(harmless_roles(conn, sorted(roles - member))):
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(name), sql.Identifier(self.role)))



# roles that may do nothing beyond what the load role may: no attributes, no login, no part in anything shared (owner
# of, or granted rights on, a database, tablespace or parameter: DROP OWNED by a member revokes those cluster-wide),
# and in no role (however indirectly) that is otherwise
_HARMLESS = """
WITH RECURSIVE up(start, role) AS (
    SELECT oid, oid FROM pg_roles WHERE rolname = ANY(%(names)s)
    UNION SELECT up.start, m.roleid FROM up JOIN pg_auth_members m ON m.member = up.role
)
SELECT s.rolname FROM pg_roles s
WHERE s.rolname = ANY(%(names)s) AND s.rolname <> %(load)s
  AND NOT EXISTS (
    SELECT FROM up JOIN pg_roles r ON r.oid = up.role
    WHERE up.start = s.oid
      AND (r.rolname LIKE 'pg\\_%%' OR r.rolname = %(load)s OR r.rolsuper OR r.rolcreaterole OR r.rolcreatedb
           OR r.rolreplication OR r.rolbypassrls OR r.rolcanlogin
           OR EXISTS (SELECT FROM pg_shdepend d WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = r.oid
                      AND d.dbid = 0)))
"""


def harmless_roles(conn: psycopg.Connection[Any], names: list[str]) -> set[str]:
    """Of ``names``, the roles the load role may join and the tool may grant between: see ``_HARMLESS``."""
    return {r[0] for r in conn.execute(_HARMLESS, {"names": names, "load": LOAD_ROLE}).fetchall()}


def prepare(server: Server, limits: LoadLimits, *, stand_ins: bool) -> Sandbox:
    """The load role on ``server``, made or put right, and a way to log in as it."""
    with connect(server.dsn, application_name="reconciler shadow") as conn:
        me = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        if me is None or not me[0]:
            raise SandboxError(
                f"the shadow server's role ({dsnlib.describe(server.dsn)}) is not a superuser: desired SQL runs as a "
                f"role the tool makes and keeps unprivileged there ({LOAD_ROLE}), and what schemas need a superuser for "
                "(extensions, the copy of live) the tool does itself; use a server of the tool's own (shadow: embedded) "
                "or a superuser's DSN")
        with _roles_locked(conn):
            _ensure_role(conn, limits=limits)
            _ensure_restore_role(conn)
        password = None if server.embedded else _password(server.dsn)
    sandbox = Sandbox(server_dsn=server.dsn, role=LOAD_ROLE, password=password, limits=limits, stand_ins=stand_ins)
    if password is not None:
        _check_login(sandbox, server)
    return sandbox


ROLES_LOCK = 0x726C6F6164  # one process at a time changes the tool's roles on a server (concurrent ALTER ROLE fails)


@contextlib.contextmanager
def _roles_locked(conn: psycopg.Connection[Any]) -> Iterator[None]:
    conn.execute("SELECT pg_advisory_lock(%s)", (ROLES_LOCK,))
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELECT pg_advisory_unlock(%s)", (ROLES_LOCK,))


def _ensure_restore_role(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (RESTORE_ROLE,)).fetchone()
    if row is None:
        with contextlib.suppress(psycopg.errors.DuplicateObject):
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN SUPERUSER").format(sql.Identifier(RESTORE_ROLE)))
    elif row[0]:
        conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(RESTORE_ROLE)))


def _ensure_role(conn: psycopg.Connection[Any], *, limits: LoadLimits) -> None:
    role = sql.Identifier(LOAD_ROLE)
    row = conn.execute(f"SELECT oid, {', '.join(_ATTRIBUTES)}, rolcanlogin FROM pg_roles WHERE rolname = %s",
                       (LOAD_ROLE,)).fetchone()
    if row is None:
        with contextlib.suppress(psycopg.errors.DuplicateObject):  # another plan made it meanwhile
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN {}").format(role, _NO_ATTRIBUTES))
            log.info("created the load role %s on the shadow server", LOAD_ROLE)
        row = conn.execute(f"SELECT oid, {', '.join(_ATTRIBUTES)}, rolcanlogin FROM pg_roles WHERE rolname = %s",
                           (LOAD_ROLE,)).fetchone()
        assert row is not None
    oid, *attributes, can_login = row
    if any(attributes) or not can_login:
        log.warning("the load role %s had attributes it must not have; removed", LOAD_ROLE)
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN {}").format(role, _NO_ATTRIBUTES))
    # memberships: none but roles that can do nothing more than it (the stand-ins it joined)
    granted = [r[0] for r in conn.execute(
        "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = %s",
        (oid,)).fetchall()]
    for name in sorted(set(granted) - harmless_roles(conn, granted)):
        log.warning("the load role %s was a member of %s; revoked", LOAD_ROLE, name)
        conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(name), role))
    # its settings: only the tool's (the role may change its own session defaults, and a file could)
    wanted = {"statement_timeout": f"{int(limits.statement_timeout * 1000)}ms", "temp_file_limit": limits.temp_file_limit}
    settings = conn.execute("SELECT setdatabase, setconfig FROM pg_db_role_setting WHERE setrole = %s",
                            (oid,)).fetchall()
    current = {item.split("=", 1)[0]: item.split("=", 1)[1] for d, config in settings if d == 0 for item in config}
    if any(d != 0 for d, _ in settings) or set(current) - set(wanted):
        for database, _config in settings:
            if database == 0:
                conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(role))
            else:
                name = conn.execute("SELECT datname FROM pg_database WHERE oid = %s", (database,)).fetchone()
                if name is not None:
                    conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(role, sql.Identifier(name[0])))
        current = {}
    for name, value in wanted.items():
        if current.get(name) != value:
            conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(role, sql.Identifier(name), sql.Literal(value)))


def _password(server_dsn: str) -> str | None:
    """The load role's password on a server given by DSN: derived from the configured role's, so every process with
    the same DSN logs in with the same one (a random one per process would lock the others out). Without a password
    in the DSN (a passfile, PGPASSWORD), from what libpq has of the connection."""
    params = dsnlib.parse(server_dsn)
    secret = params.get("password") or ""
    with connect(server_dsn, application_name="reconciler shadow") as conn:
        secret = secret or (conn.info.password or "")
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    if not secret:
        return None  # a server that lets the configured role in without a password lets the load role in alike (trust)
    material = f"reconciler load role\0{row[0] if row else ''}\0{secret}".encode()
    return hashlib.sha256(material).hexdigest()


def _check_login(sandbox: Sandbox, server: Server) -> None:
    """Log in as the load role once; when the password is not (or no longer) the one derived, set it (hashed by the
    client, so the server's statement log never holds it) and try again."""
    dsn = server.database_dsn("postgres")
    try:
        with sandbox.connect(dsn):
            return
    except ReconcilerError:
        pass
    with connect(server.dsn, application_name="reconciler shadow") as conn:
        if sandbox.password:
            hashed = conn.pgconn.encrypt_password(sandbox.password.encode(), LOAD_ROLE.encode())
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(LOAD_ROLE),
                                                                    sql.Literal(hashed.decode())))
    try:
        with sandbox.connect(dsn):
            return
    except ReconcilerError as exc:
        raise SandboxError(f"cannot log in as the load role {LOAD_ROLE} on the shadow server: {exc}; desired SQL runs "
                           "as that role: let it log in with a password (pg_hba.conf) from where the tool runs") from None


@contextlib.contextmanager
def deadline(conn: psycopg.Connection[Any], seconds: float) -> Iterator[threading.Event]:
    """Cancel what ``conn`` runs once ``seconds`` have passed (the event says it was cancelled): the server's own
    statement_timeout is the role's default, which the statement may have changed."""
    fired = threading.Event()

    def cancel() -> None:
        fired.set()
        with contextlib.suppress(Exception):
            conn.cancel_safe(timeout=5)

    timer = threading.Timer(seconds, cancel)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()
