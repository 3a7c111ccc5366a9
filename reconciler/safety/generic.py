"""Every other statement: its hazards (drops, extensions, who may see what) and the SQL that undoes a creation."""

from __future__ import annotations

from dataclasses import replace

from pglast import ast
from psycopg import sql

from ..inspect import qualify
from .context import Context
from .drafts import Draft
from .nodes import ident, q, relation_parts, rv
from .rollback import drop_routine
from .steps import Hazard, HazardCode

# a created object's way back when its name alone says how to drop it
_DROP_OF = {
    "create_table": "DROP TABLE {}", "create_view": "DROP VIEW {}", "create_materialized_view": "DROP MATERIALIZED VIEW {}",
    # IF EXISTS: a sequence OWNED BY a column of a table this plan creates goes with that table's DROP
    "create_enum": "DROP TYPE {}", "create_sequence": "DROP SEQUENCE IF EXISTS {}", "create_schema": "DROP SCHEMA {}",
    "create_domain": "DROP DOMAIN {}", "create_composite_type": "DROP TYPE {}",
}
_AUTHZ = frozenset({"grant", "revoke", "create_policy", "alter_policy", "drop_policy", "alter_default_privileges",
                    "grant_role"})


def generic(ctx: Context, d: Draft, node: ast.Node) -> Draft:
    hazards: list[Hazard] = []
    rollback: str | None = None
    kind, obj = d.kind, d.object
    if isinstance(node, ast.DropStmt):
        if kind in ("drop_table", "drop_materialized_view"):
            for table in obj.split(", "):
                hazards.append(ctx.hazard(HazardCode.DATA_LOSS, "drops the table and all its rows", qualify(table)))
        elif kind == "drop_schema":
            hazards.append(ctx.hazard(HazardCode.DATA_LOSS, "drops the schema and everything in it"))
        elif kind == "drop_sequence":
            hazards.append(ctx.hazard(HazardCode.DATA_LOSS, "drops the sequence and its current value"))
        elif kind in ("drop_type", "drop_domain"):
            hazards.append(ctx.hazard(HazardCode.DATA_LOSS, "drops the type; columns of that type go with it"))
        elif kind == "drop_view" and qualify(obj) in ctx.facts.views:
            rollback = q("CREATE VIEW {} AS ", ident(qualify(obj))) + ctx.facts.views[qualify(obj)]
        elif kind == "drop_extension":
            hazards.append(ctx.hazard(HazardCode.EXTENSION_CHANGE, "drops an extension and the objects that use it"))
    if kind == "alter_extension" and isinstance(node, ast.AlterExtensionStmt) and _new_version(node) is not None:
        hazards.append(ctx.hazard(HazardCode.EXTENSION_CHANGE, f"updates the extension to version {_new_version(node)}: "
                                  "runs the extension's own update script, which may change or rewrite its objects "
                                  "and what uses them; extensions are seldom downgraded"))
    elif kind in ("create_extension", "alter_extension"):
        hazards.append(ctx.hazard(HazardCode.EXTENSION_CHANGE, "extensions change server-wide behaviour and need "
                                  "privileges"))
        if kind == "create_extension":
            rollback = q("DROP EXTENSION IF EXISTS {}", sql.Identifier(obj))
    if kind in _AUTHZ:
        hazards.append(ctx.hazard(HazardCode.AUTHZ_CHANGE, "changes who may read or write what"))
    if kind == "create_enum" and isinstance(node, ast.CreateEnumStmt):
        old = ctx.facts.enums.get(qualify(obj))
        new = tuple(str(v.sval) for v in node.vals or ())
        if old is not None and set(old) - set(new):
            removed = ", ".join(sorted(set(old) - set(new)))
            hazards.append(ctx.hazard(HazardCode.DATA_LOSS, f"the recreated type drops value(s) {removed}: rows "
                                      "holding them cannot convert"))
    if kind in _DROP_OF and obj and "," not in obj and not (kind == "create_enum" and qualify(obj) in ctx.facts.enums):
        rollback = q(_DROP_OF[kind], sql.Identifier(*d.identity) if d.identity else ident(obj))
    if kind == "replace_view" and qualify(obj) in ctx.facts.views:
        rollback = q("CREATE OR REPLACE VIEW {} AS ", ident(qualify(obj))) + ctx.facts.views[qualify(obj)]
    elif kind == "replace_view":
        rollback = q("DROP VIEW IF EXISTS {}", ident(qualify(obj)))
    if isinstance(node, ast.CreateFunctionStmt) and qualify(obj) not in ctx.facts.routines:
        rollback = drop_routine(node)
    if kind == "create_policy" and isinstance(node, ast.CreatePolicyStmt) and node.table is not None:
        rollback = q("DROP POLICY IF EXISTS {} ON {}", sql.Identifier(str(node.policy_name)),
                     sql.Identifier(*relation_parts(node.table)))
    if kind == "create_trigger" and isinstance(node, ast.CreateTrigStmt):
        rollback = q("DROP TRIGGER IF EXISTS {} ON {}", sql.Identifier(str(node.trigname)), ident(rv(node.relation)))
    if kind == "set":
        rollback = ""
    return replace(d, hazards=tuple(hazards), rollback_sql=rollback, reversible=rollback is not None)


def _new_version(node: ast.AlterExtensionStmt) -> str | None:
    """The version ALTER EXTENSION ... UPDATE TO names (None: UPDATE to the default, or another ALTER EXTENSION)."""
    return next((str(o.arg.sval) for o in node.options or () if o.defname == "new_version"
                 and isinstance(o.arg, ast.String)), None)
