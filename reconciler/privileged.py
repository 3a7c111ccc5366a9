"""Statements of a schema that need more than the load role has, recognised from their parse tree.

Schemas legitimately hold a few things only a superuser may make: an extension that is not trusted, roles, event
triggers, objects handed to a role the load role is not. The tool does those itself, rebuilt from the parse tree (never
the file's text) in the forms it knows, or refuses them with a reason; anything else runs as the load role, and what
needs more fails there, at its file:line. What a ``DO`` block or a function does is never seen here: it runs as the
load role.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import pglast
import psycopg
from pglast import ast
from pglast.enums import AlterTableType, ObjectType, RoleSpecType
from psycopg import sql

from .sandbox import Sandbox, harmless_roles
from .servers import connect

log = logging.getLogger(__name__)

# the statements worth parsing: those whose parse tree may be one of the kinds below (a false match costs a parse)
_MAY_NEED_MORE = re.compile(
    r"(?:CREATE|ALTER)\s+(?:OR\s+REPLACE\s+)?(?:ROLE|USER|GROUP|EXTENSION|EVENT\s+TRIGGER"
    r"|(?:TRUSTED\s+)?(?:PROCEDURAL\s+)?LANGUAGE)\b|(?:GRANT|REVOKE)\b|ALTER\b.*\bOWNER\s+TO\b"
    r"|COMMENT\s+ON\s+EXTENSION\b|DROP\s+(?:ROLE|USER|GROUP)\b",
    re.IGNORECASE | re.DOTALL)

_ROLE_ATTRIBUTES = {"superuser": "SUPERUSER", "createdb": "CREATEDB", "createrole": "CREATEROLE",
                    "isreplication": "REPLICATION", "bypassrls": "BYPASSRLS"}
_ROLE_MEMBERSHIPS = {"addroleto": "IN ROLE", "rolemembers": "ROLE", "adminmembers": "ADMIN"}


@dataclass(frozen=True)
class CreateExtension:
    name: str
    schema: str | None
    version: str | None
    cascade: bool
    if_not_exists: bool


@dataclass(frozen=True)
class CreateRole:
    name: str
    refused: tuple[str, ...]  # what the statement asks that no role of a shadow may have


@dataclass(frozen=True)
class GrantRoles:
    roles: tuple[str, ...]
    grantees: tuple[str, ...]
    grant: bool  # False: REVOKE


@dataclass(frozen=True)
class ChangeOwner:
    owner: str



@dataclass(frozen=True)
class CreateEventTrigger:
    name: str
    event: str
    tags: tuple[str, ...]
    function: tuple[str, ...]  # its qualified name's parts


@dataclass(frozen=True)
class DropRoles:
    names: tuple[str, ...]


@dataclass(frozen=True)
class CommentOnExtension:
    name: str
    comment: str | None


Privileged = CreateExtension | CreateRole | GrantRoles | ChangeOwner | CreateEventTrigger | CommentOnExtension | DropRoles


_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)


def recognise(code: str) -> Privileged | None:
    """What ``code`` (one statement) is, when it is one of the kinds the tool does itself."""
    if not _MAY_NEED_MORE.match(code, _LEADING.match(code).end()):  # type: ignore[union-attr]
        return None
    try:
        parsed = pglast.parse_sql(code)
    except pglast.parser.ParseError:
        return None  # the load reports it, at its file:line
    if len(parsed) != 1:
        return None
    return _kind(parsed[0].stmt)


def _kind(node: ast.Node | None) -> Privileged | None:
    if isinstance(node, ast.CreateExtensionStmt):
        options = {o.defname: o.arg for o in node.options or ()}
        schema, version, cascade = options.get("schema"), options.get("new_version"), options.get("cascade")
        return CreateExtension(
            name=str(node.extname),
            schema=str(schema.sval) if isinstance(schema, ast.String) else None,
            version=str(version.sval) if isinstance(version, ast.String) else None,
            cascade=bool(isinstance(cascade, ast.Boolean) and cascade.boolval),
            if_not_exists=bool(node.if_not_exists))
    if isinstance(node, ast.CreateRoleStmt):
        refused = []
        for option in node.options or ():
            if option.defname in _ROLE_ATTRIBUTES and not (isinstance(option.arg, ast.Boolean) and not option.arg.boolval):
                refused.append(_ROLE_ATTRIBUTES[option.defname])
            elif option.defname in _ROLE_MEMBERSHIPS:
                refused.append(f"{_ROLE_MEMBERSHIPS[option.defname]} {', '.join(_role_names(option.arg))}")
        return CreateRole(name=str(node.role), refused=tuple(refused))
    if isinstance(node, ast.GrantRoleStmt):
        return GrantRoles(roles=tuple(str(r.priv_name) for r in node.granted_roles or ()),
                          grantees=tuple(_role_names(node.grantee_roles)), grant=bool(node.is_grant))
    if isinstance(node, ast.AlterOwnerStmt) or (isinstance(node, ast.AlterTableStmt) and node.cmds and all(
            isinstance(c, ast.AlterTableCmd) and c.subtype == AlterTableType.AT_ChangeOwner for c in node.cmds)):
        names = {_owner_name(spec) for spec in _owner_specs(node)}
        name = names.pop() if len(names) == 1 else None
        return ChangeOwner(owner=name) if name is not None else None
    if isinstance(node, ast.CommentStmt) and node.objtype == ObjectType.OBJECT_EXTENSION \
            and isinstance(node.object, ast.String):
        return CommentOnExtension(name=str(node.object.sval),
                                  comment=None if node.comment is None else str(node.comment))
    if isinstance(node, ast.DropRoleStmt):
        return DropRoles(names=tuple(_role_names(node.roles)))
    if isinstance(node, ast.CreateEventTrigStmt):
        tags: tuple[str, ...] = ()
        for clause in node.whenclause or ():
            if clause.defname.lower() == "tag" and clause.arg:
                tags += tuple(str(t.sval) for t in clause.arg)
        return CreateEventTrigger(name=str(node.trigname), event=str(node.eventname), tags=tags,
                                  function=tuple(str(p.sval) for p in node.funcname or ()))
    return None


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _owner_specs(node: ast.Node) -> list[ast.RoleSpec]:
    if isinstance(node, ast.AlterOwnerStmt):
        return [node.newowner] if node.newowner is not None else []
    assert isinstance(node, ast.AlterTableStmt)
    return [c.newowner for c in node.cmds or () if c.newowner is not None]


def _owner_name(spec: ast.RoleSpec | None) -> str | None:
    """A role by name; CURRENT_USER and the like are the load role itself, which needs nothing more (None)."""
    if isinstance(spec, ast.RoleSpec) and spec.roletype == RoleSpecType.ROLESPEC_CSTRING and spec.rolename:
        return str(spec.rolename)
    return None


def _role_names(specs: object) -> list[str]:
    names = []
    for spec in specs or ():  # type: ignore[attr-defined]
        if isinstance(spec, ast.RoleSpec):
            names.append(str(spec.rolename) if spec.rolename else str(spec.roletype).removeprefix("RoleSpecType.ROLESPEC_"))
    return names


# --- carrying them out ------------------------------------------------------------------------------------------


class Refused(Exception):
    """A statement the tool will not do for a schema, and why."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def carry_out(what: Privileged, sandbox: Sandbox, database_dsn: str, *, loader: psycopg.Connection[Any],
              owners: bool, statement: str, strangers: set[str]) -> bool:
    """Do ``what`` (``statement``, as the file has it) for the schema loading into ``database_dsn`` (True), or leave
    it to the load role on ``loader`` (False: it needs nothing more, or PostgreSQL will say what it lacks). Raises
    ``Refused``. ``strangers``: roles found, in this load, to be ones the load role may not act as (pg_dump's
    ``OWNER TO postgres`` comes once per object), added to here."""
    if isinstance(what, CreateExtension):
        return _extension(what, sandbox, database_dsn, loader)
    if isinstance(what, (CreateRole, GrantRoles)):
        strangers.clear()  # what the load role may act as may change
        return _role(what, sandbox) if isinstance(what, CreateRole) else _grant(what, sandbox)
    if isinstance(what, ChangeOwner):
        return _hand_over(what, sandbox, owners, loader, statement, strangers)
    if isinstance(what, DropRoles):
        log.info("kept role(s) %s on the shadow server: roles are cluster-wide and stand in for the target's there",
                 ", ".join(what.names))
        return True
    if isinstance(what, CommentOnExtension):
        return _comment_on_extension(what, sandbox, database_dsn)
    return _event_trigger(what, sandbox, database_dsn, loader)


_EXTENSION = """
SELECT v.trusted, v.superuser, v.schema::text, coalesce(v.requires::text[], '{}')
FROM pg_available_extension_versions v
WHERE v.name = %(name)s
  AND v.version = coalesce(%(version)s, (SELECT default_version FROM pg_available_extensions WHERE name = %(name)s))
"""

# what an extension's install script could call by mistake in the schema it goes to: functions and operators the
# schema's SQL made there (the script runs as a superuser, with that schema first on its search_path)
_PLANTED = """
SELECT format('function %%s', p.oid::regprocedure) FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
WHERE p.pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = %(schema)s) AND NOT r.rolsuper
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
UNION ALL
SELECT format('operator %%s', o.oid::regoperator) FROM pg_operator o JOIN pg_roles r ON r.oid = o.oprowner
WHERE o.oprnamespace = (SELECT oid FROM pg_namespace WHERE nspname = %(schema)s) AND NOT r.rolsuper
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_operator'::regclass AND d.objid = o.oid
                  AND d.deptype = 'e')
"""


def _extension(what: CreateExtension, sandbox: Sandbox, database_dsn: str, loader: psycopg.Connection[Any]) -> bool:
    with sandbox.admin(database_dsn) as conn:
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = %s", (what.name,)).fetchone():
            return False  # IF NOT EXISTS: nothing to do; otherwise PostgreSQL says it exists
        row = conn.execute(_EXTENSION, {"name": what.name, "version": what.version}).fetchone()
        if row is None:
            return False  # not available here: PostgreSQL says so
        trusted, superuser, fixed_schema, requires = row
        if trusted or not superuser:
            return False  # PostgreSQL lets the owner of the database create it (with CASCADE, it checks each one)
        if what.name not in sandbox.limits.extensions:
            raise Refused(f'extension "{what.name}" may only be created by a superuser (it is not trusted), and it is '
                          "not in load.extensions of reconciler.yaml",
                          hint="the tool creates an extension listed there for the schema: list it if you trust its "
                               "install script to run as a superuser")
        for required in requires if what.cascade else ():
            if conn.execute("SELECT 1 FROM pg_extension WHERE extname = %s", (required,)).fetchone():
                continue
            needed = conn.execute(_EXTENSION, {"name": required, "version": None}).fetchone()
            if needed is not None and needed[1] and not needed[0] and required not in sandbox.limits.extensions:
                raise Refused(f'extension "{what.name}" needs "{required}", which may only be created by a superuser '
                              "and is not in load.extensions of reconciler.yaml")
        schema = what.schema or fixed_schema
        if schema is None:
            current = loader.execute("SELECT current_schema()").fetchone()
            schema = current[0] if current else None
        if schema is not None and what.schema is None and fixed_schema is None:
            what = CreateExtension(what.name, schema, what.version, what.cascade, what.if_not_exists)
        planted = [r[0] for r in conn.execute(_PLANTED, {"schema": schema}).fetchall()] if schema else []
        if planted:
            raise Refused(f'extension "{what.name}" goes into schema {schema}, which holds {planted[0]}'
                          f"{f' and {len(planted) - 1} more' if len(planted) > 1 else ''} made by the schema's SQL: the "
                          "extension's install script runs as a superuser and could call it",
                          hint="create the extension before the functions and operators of that schema")
        parts: list[sql.Composable] = [sql.SQL("CREATE EXTENSION {}").format(sql.Identifier(what.name))]
        if what.schema is not None:
            parts.append(sql.SQL("WITH SCHEMA {}").format(sql.Identifier(what.schema)))
        if what.version is not None:
            parts.append(sql.SQL("VERSION {}").format(sql.Literal(what.version)))
        if what.cascade:
            parts.append(sql.SQL("CASCADE"))
        conn.execute(sql.SQL(" ").join(parts))
    log.info('created extension "%s" for the schema (load.extensions)', what.name)
    return True


def _role(what: CreateRole, sandbox: Sandbox) -> bool:
    if what.refused:
        raise Refused(f"role {what.name} may not have {', '.join(what.refused)} on the shadow server",
                      hint="a shadow stands roles in as NOLOGIN roles with no attributes; grant the target's roles "
                           "their powers outside the schema")
    with connect(sandbox.server_dsn, application_name="reconciler shadow") as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (what.name,)).fetchone():
            if not sandbox.stand_ins:
                raise Refused(f"role {what.name} does not exist, and the shadow server is the target's cluster: a "
                              "schema file may not create roles there (roles are cluster-wide)",
                              hint="create the role on the target by hand, or give the environment a shadow server of "
                                   "its own (shadow: embedded)")
            with contextlib.suppress(psycopg.errors.DuplicateObject):  # another plan made it meanwhile
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(what.name)))
                log.info("created role %s (NOLOGIN) on the shadow server", what.name)
    sandbox.join({what.name})
    return True


def _grant(what: GrantRoles, sandbox: Sandbox) -> bool:
    verb = "GRANT" if what.grant else "REVOKE"
    with connect(sandbox.server_dsn, application_name="reconciler shadow") as conn:
        held = conn.execute(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member "
            "WHERE g.rolname = ANY(%s) AND r.rolname = ANY(%s)", (list(what.roles), list(what.grantees))).fetchone()
    if held is not None and held[0] == (len(what.roles) * len(what.grantees) if what.grant else 0):
        return True  # the server is as the statement would make it
    if not sandbox.stand_ins:
        raise Refused(f"{verb} of role membership on the target's cluster: a schema file may not change its roles",
                      hint="give the environment a shadow server of its own (shadow: embedded)")
    involved = set(what.roles) | set(what.grantees)
    with connect(sandbox.server_dsn, application_name="reconciler shadow") as conn:
        plain = harmless_roles(conn, sorted(involved)) | {sandbox.role}
        for name in sorted(involved - plain):
            raise Refused(f"{verb} involves role {name}, which is not a stand-in of the shadow (it has attributes, a "
                          "login, membership in such a role, or owns a database): the tool grants only between roles "
                          "that can do nothing the load role cannot")
        statement = sql.SQL("GRANT {} TO {}" if what.grant else "REVOKE {} FROM {}").format(
            sql.SQL(", ").join(map(sql.Identifier, what.roles)), sql.SQL(", ").join(map(sql.Identifier, what.grantees)))
        conn.execute(statement)
    return True


def _hand_over(what: ChangeOwner, sandbox: Sandbox, owners: bool, loader: psycopg.Connection[Any],
               statement: str, strangers: set[str]) -> bool:
    """``ALTER ... OWNER TO role``. A role that can do nothing the load role cannot (``harmless_roles``: stand-ins,
    or on the target's cluster its NOLOGIN owner roles) gets what the load role owns: the load role joins it and
    makes the statement itself (``hand_over``), so PostgreSQL checks that it owns what it gives. A role that can do
    more (a superuser, one that logs in) never gets the schema's objects: the hand-over is skipped when owners are not
    compared, else refused."""
    if what.owner == sandbox.role:
        return False
    if what.owner not in strangers:
        if not _acts_as(loader, what.owner):
            sandbox.join({what.owner})
        if _acts_as(loader, what.owner):
            hand_over(loader, what.owner, statement)
            return True
        strangers.add(what.owner)
    if not owners:
        log.debug("skipped a hand-over to role %s: the load role may not act as it, and owners are not compared",
                  what.owner)
        return True
    raise Refused(f"cannot hand objects to role {what.owner}: it can do more than the load role (a superuser, or a role "
                  "that logs in, holds attributes or memberships, or has a part in a database or tablespace), and "
                  "manage_owners compares owners",
                  hint="name an owner role that logs in to nothing and holds nothing (NOLOGIN, no attributes), or "
                       "leave owners out of the schema")


def _acts_as(loader: psycopg.Connection[Any], role: str) -> bool:
    row = loader.execute("SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = %s",
                         (role,)).fetchone()
    return bool(row and row[0])


_SCHEMAS_TO_LEND = """
SELECT n.nspname FROM pg_namespace n
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
  AND has_schema_privilege(n.oid, 'CREATE WITH GRANT OPTION') AND NOT has_schema_privilege(%s, n.oid, 'CREATE')
"""


def hand_over(conn: psycopg.Connection[Any], role: str, statement: str) -> None:
    """Run ``statement`` (an ``ALTER ... OWNER TO role``) as the load role on ``conn``. Only a superuser may give a
    table to a role that may not create in the table's schema (the target's applying role often is one): for this
    one statement, ``role`` may create in the schemas the load role may grant that on, and no longer afterwards (a
    grant then revoke reads as the ACL it was)."""
    lent = [r[0] for r in conn.execute(_SCHEMAS_TO_LEND, (role,)).fetchall()]
    grantee = sql.Identifier(role)
    if lent:
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA {} TO {}").format(
            sql.SQL(", ").join(map(sql.Identifier, lent)), grantee))
    try:
        conn.execute(statement.encode(), prepare=False)
    finally:
        if lent and conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
            # a schema the statement gave the role is the role's: what it was lent there merged into its own rights
            still = [r[0] for r in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s) "
                "AND nspowner <> (SELECT oid FROM pg_roles WHERE rolname = %s)",
                (lent, role)).fetchall()]
            if still:
                conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA {} FROM {}").format(
                    sql.SQL(", ").join(map(sql.Identifier, still)), grantee))


def _comment_on_extension(what: CommentOnExtension, sandbox: Sandbox, database_dsn: str) -> bool:
    """pg_dump writes ``COMMENT ON EXTENSION`` after each extension; one the tool made (or plpgsql, made with the
    database) is not the load role's to comment on: the tool sets the comment, nothing else."""
    with sandbox.admin(database_dsn) as conn:
        row = conn.execute("SELECT extowner = (SELECT oid FROM pg_roles WHERE rolname = %s) FROM pg_extension "
                           "WHERE extname = %s", (sandbox.role, what.name)).fetchone()
        if row is None or row[0]:
            return False  # none (PostgreSQL says so), or its own
        conn.execute(sql.SQL("COMMENT ON EXTENSION {} IS {}").format(
            sql.Identifier(what.name), sql.Literal(what.comment) if what.comment is not None else sql.SQL("NULL")))
    return True


def _event_trigger(what: CreateEventTrigger, sandbox: Sandbox, database_dsn: str,
                   loader: psycopg.Connection[Any]) -> bool:
    """Made by the tool (only a superuser may): its function runs as whoever runs DDL in the database, which is the
    load role there; the tool's own privileged sessions run with event triggers off (``Sandbox.admin``). The function
    is the one the load role's search path finds, named whole for the tool's session."""
    row = loader.execute("SELECT n.nspname, p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                         "WHERE p.oid = to_regproc(%s)", (".".join(_quoted(part) for part in what.function),)).fetchone()
    if row is None:
        raise Refused(f"event trigger {what.name}: its function {'.'.join(what.function)}() does not exist")
    what = CreateEventTrigger(what.name, what.event, what.tags, (str(row[0]), str(row[1])))
    parts: list[sql.Composable] = [sql.SQL("CREATE EVENT TRIGGER {} ON {}").format(sql.Identifier(what.name), sql.Identifier(what.event))]
    if what.tags:
        parts.append(sql.SQL("WHEN TAG IN ({})").format(sql.SQL(", ").join(map(sql.Literal, what.tags))))
    parts.append(sql.SQL("EXECUTE FUNCTION {}()").format(sql.Identifier(*what.function)))
    with sandbox.admin(database_dsn) as conn:
        conn.execute(sql.SQL(" ").join(parts))
    return True
