"""Constraints added without holding a lock through their scan: NOT VALID, then VALIDATE in a transaction of its
own (writes go on); on a table the plan creates, added validated at once (it is empty)."""

from __future__ import annotations

from dataclasses import replace

from pglast import ast, enums
from psycopg import sql

from .context import Context
from .drafts import POST_VALIDATE, Draft
from .hazards import alter_hazards, referenced_lock
from .nodes import q, rv, valid_as
from .rollback import alter_rollback


def not_valid_then_validate(ctx: Context, d: Draft, table: str, con: ast.Constraint,
                            cmds: list[ast.AlterTableCmd]) -> list[Draft] | None:
    """A foreign key or CHECK on a table someone may be using: added NOT VALID (a brief lock, no scan), then
    validated under a lock that lets writes go on. None for any other constraint, or one added NOT VALID already."""
    contype = enums.ConstrType(int(con.contype or 0))
    if contype not in (enums.ConstrType.CONSTR_FOREIGN, enums.ConstrType.CONSTR_CHECK) or con.skip_validation:
        return None
    con.skip_validation = True
    con.initially_valid = False
    name = str(con.conname)
    add = alter_rollback(ctx, replace(d, sql=valid_as(d.sql, False), original_sql=d.sql,
                                      hazards=alter_hazards(ctx, table, cmds)), table, cmds)
    validate = Draft(
        sql=q("ALTER TABLE {} VALIDATE CONSTRAINT {}", sql.Identifier(*d.identity[:2]), sql.Identifier(name)),
        kind="validate_constraint", object=f"{table}.{name}", tables=(table,), isolated=True, identity=d.identity,
        stage=POST_VALIDATE, rollback_sql="", reversible=True,
    )
    return [add, validate]


def validate(d: Draft, *, isolated: bool = True) -> Draft:
    """VALIDATE CONSTRAINT after the main transaction, in its own (``isolated``); nothing to undo."""
    return replace(d, isolated=isolated, rollback_sql="", reversible=True, stage=POST_VALIDATE)


def fresh_constraint(ctx: Context, d: Draft, table: str, cmds: list[ast.AlterTableCmd]) -> list[Draft] | None:
    """A foreign key or CHECK the plan adds NOT VALID to a table it creates, then validates: added validated
    instead (the table is empty), and its VALIDATE dropped. A foreign key to an existing table keeps the hazard
    of its lock there. None for any other statement."""
    if len(cmds) != 1 or table not in ctx.created_tables:
        return None
    cmd, subtype = cmds[0], enums.AlterTableType(int(cmds[0].subtype or 0))
    if subtype is enums.AlterTableType.AT_ValidateConstraint:
        return [] if (table, str(cmd.name)) in ctx.folded else None
    con = cmd.def_
    if not (subtype is enums.AlterTableType.AT_AddConstraint and isinstance(con, ast.Constraint)
            and enums.ConstrType(int(con.contype or 0)) in (enums.ConstrType.CONSTR_FOREIGN, enums.ConstrType.CONSTR_CHECK)):
        return None
    original = None
    if con.skip_validation and (table, str(con.conname)) in ctx.validated:
        con.skip_validation, con.initially_valid, original = False, True, d.sql
        ctx.folded.add((table, str(con.conname)))
    return [alter_rollback(ctx, replace(d, sql=valid_as(d.sql, True) if original else d.sql, original_sql=original,
                                        hazards=referenced_lock(ctx, table, con)), table, cmds)]


def partitioned_foreign_key(ctx: Context, d: Draft, table: str, cmds: list[ast.AlterTableCmd]) -> Draft | None:
    """A foreign key on or to a partitioned table, added validated: before PostgreSQL 18 it cannot be
    added NOT VALID on one, and VALIDATE does not reach the partitions' copies of one to one. None
    for any other statement, or one the desired schema wants NOT VALID (no VALIDATE follows)."""
    con = cmds[0].def_ if len(cmds) == 1 else None
    if not (isinstance(con, ast.Constraint) and enums.ConstrType(int(con.contype or 0)) is enums.ConstrType.CONSTR_FOREIGN
            and enums.AlterTableType(int(cmds[0].subtype or 0)) is enums.AlterTableType.AT_AddConstraint):
        return None
    if not (ctx.partitioned(table) or (con.pktable is not None and ctx.partitioned(rv(con.pktable)))):
        return None
    if con.skip_validation and (table, str(con.conname)) not in ctx.validated:
        return None
    original = None
    if con.skip_validation:
        con.skip_validation, con.initially_valid, original = False, True, d.sql
        if table in ctx.created_tables:
            ctx.folded.add((table, str(con.conname)))
    hazards = alter_hazards(ctx, table, cmds) if ctx.existing(table) else referenced_lock(ctx, table, con)
    return alter_rollback(ctx, replace(d, sql=valid_as(d.sql, True) if original else d.sql, original_sql=original,
                                       hazards=hazards), table, cmds)
