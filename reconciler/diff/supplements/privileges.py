"""Owners and privileges: ALTER ... OWNER TO, GRANT / REVOKE and ALTER DEFAULT PRIVILEGES.

Both are opt-in (``manage_owners``, ``manage_privileges`` in reconciler.yaml) because they name the
environment's roles. Off means we do not touch them at all: migra's own GRANT / REVOKE statements
(it emits them for tables only) are removed whatever the options say, and when privileges are managed
ours replace them, for every kind that holds an ACL.

ACLs are compared per (grantee, privilege, grantable) with aclexplode(), a NULL ACL read as its
acldefault(), grantors left out and the owner's own privileges as held by "the owner" (so a change of
owner is not a change of privileges). The owner of an object the plan creates is the applying role,
and "the applying role" is what the shadow's loading role reads as, so a schema that names no owner
means "whoever applies it". An object the plan creates starts with the built-in default ACL, or with
the default privileges the live database gives the applying role (the rehearsal copy runs the steps as
another role, where those do not apply): statements are computed so both starts end at the desired ACL.

Every statement goes at the end, after the objects exist: owners first (owners' privileges move with
ownership), then privileges, then default privileges (so they do not act on the objects the plan creates).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from ... import inspect
from ...errors import ReconcilerError
from ...inspect import APPLYING_ROLE, OWNER, PUBLIC, Grant, Secured, Security
from ..base import Change
from . import Context, change

MIGRA_KINDS = frozenset({"grant", "revoke"})

_GRANT_ON = {"table": "TABLE", "view": "TABLE", "materialized view": "TABLE", "foreign table": "TABLE",
             "sequence": "SEQUENCE", "schema": "SCHEMA", "function": "FUNCTION", "aggregate": "FUNCTION",
             "procedure": "PROCEDURE", "type": "TYPE", "domain": "DOMAIN"}
_ALTER = {"table": "TABLE", "view": "VIEW", "materialized view": "MATERIALIZED VIEW", "foreign table": "FOREIGN TABLE",
          "sequence": "SEQUENCE", "schema": "SCHEMA", "function": "FUNCTION", "procedure": "PROCEDURE",
          "aggregate": "AGGREGATE", "type": "TYPE", "domain": "DOMAIN", "statistics": "STATISTICS"}
_RELATIONS = frozenset({"table", "view", "materialized view", "foreign table", "sequence"})
_DEFAULT_ON = {"r": "TABLES", "S": "SEQUENCES", "f": "FUNCTIONS", "T": "TYPES", "n": "SCHEMAS"}
_ORDER = ("schema", "type", "domain", "sequence", "table", "foreign table", "view", "materialized view", "function",
          "procedure", "aggregate", "statistics", "column")

Acl = frozenset[Grant]
_NOTHING = sql.SQL("")


def reconcile(context: Context, changes: list[Change]) -> list[Change]:
    """Drop migra's GRANT / REVOKE; when owners or privileges are managed, add ours at the end."""
    out = [c for c in changes if c.kind not in MIGRA_KINDS]
    options = context.options
    if not (options.manage_privileges or options.manage_owners):
        return out
    live = inspect.security(context.live, exclude_schemas=context.exclude_schemas)
    desired = inspect.security(context.desired, exclude_schemas=context.exclude_schemas)
    planner = Planner(live, desired, default_grants(context.live), recreated_names(changes), options.manage_owners)
    added: list[Change] = []
    if options.manage_owners:
        added += planner.owners()
    if options.manage_privileges:
        added += planner.privileges()
        added += planner.default_privileges()
    _require_roles(context.live, planner.roles)
    return out + added


def default_grants(conn: psycopg.Connection[Any]) -> dict[str, Acl]:
    """acldefault() per ACL type letter, the owner's privileges as OWNER."""
    rows = conn.execute(
        """SELECT t, (SELECT coalesce(json_agg(json_build_array(
                         CASE WHEN a.grantee = 0 THEN %(public)s ELSE %(owner)s END, a.privilege_type, a.is_grantable)), '[]')
                      FROM aclexplode(acldefault(t::"char", 10)) a)
           FROM unnest(ARRAY['r', 's', 'f', 'n', 'T']) t""",
        {"public": PUBLIC, "owner": OWNER}).fetchall()
    return {letter: frozenset(Grant(str(g), str(p), bool(o)) for g, p, o in grants) for letter, grants in rows}


# creations that replace what is there in place, keeping its owner and grants
_REPLACING = frozenset({"replace_view", "create_function", "create_procedure"})


def recreated_names(changes: Sequence[Change]) -> frozenset[str]:
    """Unquoted names of what the changes drop or create: an object the plan drops, or renames away (an enum migra
    rebuilds), and creates again starts afresh. CREATE OR REPLACE keeps what the object had."""
    names: set[str] = set()
    for c in changes:
        if c.kind.startswith("drop_") or (c.kind.startswith("create_") and c.kind not in _REPLACING
                                          and not c.kind.startswith("create_index")):
            # drop_column's object is table.column; drop_function's carries its arguments
            names.update(part.split("(")[0].strip() for part in c.object.split(", ") if part.strip())
    return frozenset(names)


def _role(name: str) -> sql.Composable:
    if name == APPLYING_ROLE:
        return sql.SQL("CURRENT_USER")
    if name == PUBLIC:
        return sql.SQL("PUBLIC")
    return sql.Identifier(name)


class Planner:
    def __init__(self, live: Security, desired: Security, defaults: dict[str, Acl], dropped: frozenset[str],
                 manage_owners: bool) -> None:
        self.live, self.desired, self.defaults, self.dropped = live, desired, defaults, dropped
        self.manage_owners = manage_owners
        self.roles: set[str] = set()  # real role names the statements name

    def _named(self, role: str) -> sql.Composable:
        if role not in (APPLYING_ROLE, PUBLIC):
            self.roles.add(role)
        return _role(role)

    def _recreated(self, obj: Secured) -> bool:
        return any(obj.bare == d or obj.bare.startswith(d + ".") for d in self.dropped)

    def _ordered(self, objects: Iterable[Secured]) -> list[Secured]:
        return sorted(objects, key=lambda o: (_ORDER.index(o.kind), o.name, o.column or ""))

    # -- owners

    def owners(self) -> list[Change]:
        out = []
        for obj in self._ordered(self.desired.objects.values()):
            if obj.owner is None or obj.linked:
                continue
            before = self.live.objects.get((obj.kind, obj.name, obj.column))
            now = {APPLYING_ROLE} if before is None else {before.owner or APPLYING_ROLE}
            if before is not None and self._recreated(obj):
                now.add(APPLYING_ROLE)
            if now == {obj.owner}:
                continue
            statement = sql.SQL("ALTER {} {} OWNER TO {}").format(
                sql.SQL(_ALTER[obj.kind]), sql.SQL(obj.name), self._named(obj.owner))
            out.append(change(statement, "alter_owner", obj.name))
        return out

    # -- privileges on objects

    def _owner_after(self, obj: Secured) -> str:
        """Who owns the object (a column: its table) once the plan has run."""
        if obj.column is not None:
            table = next((o for o in self.desired.objects.values()
                          if o.column is None and o.kind in _RELATIONS and o.name == obj.name), None)
            return self._owner_after(table) if table is not None else APPLYING_ROLE
        if self.manage_owners and obj.owner is not None:
            return obj.owner
        before = self.live.objects.get((obj.kind, obj.name, obj.column))
        if before is None or before.owner is None or self._recreated(obj):
            return APPLYING_ROLE
        return before.owner

    def _initial(self, obj: Secured) -> tuple[Acl, Acl]:
        """(surely, possibly) the ACL of the object when the plan creates it."""
        if obj.column is not None:
            return frozenset(), frozenset()
        letter = inspect.ACL_TYPES[obj.kind]
        default_type = "S" if letter == "s" else letter
        built_in = self.defaults[letter]
        everywhere = self.live.default_acls.get((APPLYING_ROLE, None, default_type))
        in_schema = self.live.default_acls.get((APPLYING_ROLE, obj.schema, default_type)) if obj.schema else None
        applied = (everywhere.grants if everywhere else built_in) | (in_schema.grants if in_schema else frozenset())
        return built_in & applied, built_in | applied

    def privileges(self) -> list[Change]:
        out = []
        for obj in self._ordered(self.desired.objects.values()):
            if obj.grants is None:
                continue
            before = self.live.objects.get((obj.kind, obj.name, obj.column))
            if before is None or before.grants is None:
                surely, possibly = self._initial(obj)
            elif self._recreated(obj):
                fresh_surely, fresh_possibly = self._initial(obj)
                surely, possibly = before.grants & fresh_surely, before.grants | fresh_possibly
            else:
                surely = possibly = before.grants
            if obj.column is None:
                target = sql.SQL("{} {}").format(sql.SQL(_GRANT_ON[obj.kind]), sql.SQL(obj.name))
            else:
                target = sql.SQL("TABLE {}").format(sql.SQL(obj.name))
            owner = self._owner_after(obj)
            for statement, kind in self._acl_statements(surely, possibly, obj.grants, target, owner, obj.column):
                out.append(change(statement, kind, obj.name))
        return out

    def _acl_statements(self, surely: Acl, possibly: Acl, wanted: Acl, target: sql.Composable, owner: str,
                        column: str | None, prefix: sql.Composable = _NOTHING) -> list[tuple[sql.Composable, str]]:
        """REVOKE what may be there and is not wanted, GRANT what is wanted and not surely there."""
        revokes: dict[tuple[str, bool], list[str]] = defaultdict(list)  # (grantee, grant option only) -> privileges
        for g in sorted(possibly - wanted):
            if Grant(g.grantee, g.privilege, not g.grantable) not in wanted:
                revokes[(g.grantee, False)].append(g.privilege)
            elif g.grantable:
                revokes[(g.grantee, True)].append(g.privilege)
        grants: dict[tuple[str, bool], list[str]] = defaultdict(list)  # (grantee, with grant option) -> privileges
        for g in sorted(wanted - surely):
            if not g.grantable and Grant(g.grantee, g.privilege, True) in surely:
                continue  # only the grant option goes, by the REVOKE GRANT OPTION above
            grants[(g.grantee, g.grantable)].append(g.privilege)

        def privileges(names: list[str]) -> sql.Composable:
            if column is None:
                return sql.SQL(", ").join(sql.SQL(p) for p in names)
            return sql.SQL(", ").join(sql.SQL("{} ({})").format(sql.SQL(p), sql.SQL(column)) for p in names)

        out: list[tuple[sql.Composable, str]] = []
        for (grantee, option_only), names in revokes.items():
            out.append((sql.SQL("{}REVOKE {}{} ON {} FROM {}").format(
                prefix, sql.SQL("GRANT OPTION FOR " if option_only else ""), privileges(names), target,
                self._named(owner if grantee == OWNER else grantee)), "revoke"))
        for (grantee, grantable), names in grants.items():
            out.append((sql.SQL("{}GRANT {} ON {} TO {}{}").format(
                prefix, privileges(names), target, self._named(owner if grantee == OWNER else grantee),
                sql.SQL(" WITH GRANT OPTION" if grantable else "")), "grant"))
        return out

    # -- default privileges

    def default_privileges(self) -> list[Change]:
        out = []
        for key in sorted(set(self.live.default_acls) | set(self.desired.default_acls),
                          key=lambda k: (k[0], k[1] or "", k[2])):
            role, schema, objtype = key
            letter = "s" if objtype == "S" else objtype
            base = self.defaults.get(letter, frozenset()) if schema is None else frozenset()
            have = self.live.default_acls[key].grants if key in self.live.default_acls else base
            want = self.desired.default_acls[key].grants if key in self.desired.default_acls else base
            if have == want:
                continue
            prefix = sql.SQL("ALTER DEFAULT PRIVILEGES {}{}").format(
                sql.SQL("") if role == APPLYING_ROLE else sql.SQL("FOR ROLE {} ").format(self._named(role)),
                sql.SQL("IN SCHEMA {} ").format(sql.SQL(schema)) if schema else sql.SQL(""))
            target = sql.SQL(_DEFAULT_ON[objtype])
            for statement, _kind in self._acl_statements(have, have, want, target, role, None, prefix):
                out.append(change(statement, "alter_default_privileges", schema or ""))
        return out


def _require_roles(conn: psycopg.Connection[Any], roles: set[str]) -> None:
    """Roles are cluster-wide and plans do not create them: refuse, naming them, before any step runs."""
    if not roles:
        return
    present = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                                          (sorted(roles),)).fetchall()}
    missing = sorted(roles - present)
    if missing:
        raise ReconcilerError(
            f"the desired schema names role(s) the target does not have: {', '.join(missing)} "
            "(roles are cluster-wide and plans do not create them: create them on the target first)")
