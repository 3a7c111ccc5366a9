"""Indexes built and dropped without blocking writes (CONCURRENTLY), and a partition's index attached."""

from __future__ import annotations

import re
from dataclasses import replace

from pglast import ast, enums
from pglast.visitors import Visitor
from psycopg import sql

from ..inspect import qualify
from .context import Context
from .drafts import POST_DROP, POST_INDEX, PRE_INDEX, Draft
from .nodes import deparse, names, q, rv
from .steps import Hazard, HazardCode

_CREATE_INDEX = re.compile(r"^CREATE (?:UNIQUE )?INDEX ")  # how pg_get_indexdef starts


def create_index(ctx: Context, d: Draft, node: ast.IndexStmt) -> Draft:
    """CREATE INDEX CONCURRENTLY on a table someone may be using: before the main transaction when it reads only
    columns that exist already (a constraint there may use it), after it otherwise. Undone by its DROP."""
    table = rv(node.relation)
    index = f"{table.split('.')[0]}.{node.idxname}" if node.idxname else ""
    named = sql.Identifier(*d.identity) if d.identity else None
    rollback = q("DROP INDEX IF EXISTS {}", named) if named else None  # undone in reverse: a constraint
    # using it (ADD ... USING INDEX) may have taken it with it
    if not ctx.existing(table):
        return replace(d, rollback_sql=rollback, reversible=rollback is not None)
    if node.concurrent or (ctx.settings.switches.concurrent_indexes and table not in ctx.facts.partitioned):
        node.concurrent = True
        columns = index_columns(node)
        early = index not in ctx.dropped_indexes and not _names_objects(node) and not any(
            (table, c) in ctx.new_or_retyped_columns or (table, c) not in ctx.facts.columns for c in columns)
        return replace(
            d, sql=deparse(node), kind="create_index_concurrently", transactional=False, index_name=index,
            stage=PRE_INDEX if early else POST_INDEX,
            original_sql=None if d.sql.upper().find("CONCURRENTLY") >= 0 else d.sql,
            rollback_sql=q("DROP INDEX CONCURRENTLY IF EXISTS {}", named) if named else None,
            reversible=named is not None,
        )
    if table in ctx.facts.partitioned:
        if node.relation is not None and not node.relation.inh:  # ON ONLY: an empty, invalid index until attached
            return replace(d, rollback_sql=rollback, reversible=rollback is not None)
        return replace(d, hazards=(ctx.hazard(
            HazardCode.BLOCKS_WRITES, "builds the index on every partition without CONCURRENTLY, which partitioned "
            "tables do not allow: writes wait (online: CREATE INDEX ON ONLY, each partition's CONCURRENTLY, then "
            "ATTACH)", table),), rollback_sql=rollback, reversible=rollback is not None)
    return replace(d, hazards=(ctx.hazard(HazardCode.BLOCKS_WRITES, "builds the index without CONCURRENTLY: writes "
                                          "wait", table),),
                   rollback_sql=rollback, reversible=rollback is not None)


def drop_index(ctx: Context, d: Draft, node: ast.DropStmt) -> Draft:
    """DROP INDEX CONCURRENTLY, last, where PostgreSQL allows it; undone by building it again the same way."""
    dropped = [qualify(names(o)) for o in node.objects or ()]
    facts = [ctx.facts.indexes.get(n) for n in dropped]
    table = facts[0].table if facts and facts[0] else None
    hazards = (ctx.hazard(HazardCode.INDEX_DROPPED, "queries that use this index may become slow", table),)
    rollback = "; ".join(f.definition for f in facts if f) if all(facts) else None
    safe = (ctx.settings.switches.concurrent_index_drops and len(dropped) == 1 and facts[0] is not None
            and not facts[0].backs_constraint and not facts[0].on_partitioned and dropped[0] not in ctx.created_indexes)
    if safe and not node.concurrent:
        node.concurrent = True
        # undone the way it was done: built again without blocking writes
        online = _CREATE_INDEX.sub(r"\g<0>CONCURRENTLY ", rollback, count=1) if rollback else None
        return replace(d, sql=deparse(node), kind="drop_index_concurrently", transactional=False, hazards=hazards,
                       rollback_sql=online, reversible=online is not None, original_sql=d.sql, stage=POST_DROP)
    return replace(d, hazards=(*hazards, *_drop_index_lock(ctx, table, bool(node.concurrent))), rollback_sql=rollback,
                   reversible=rollback is not None, transactional=not node.concurrent)


def attach_index(d: Draft, node: ast.AlterTableStmt) -> Draft:
    """ALTER INDEX parent ATTACH PARTITION child: after the partition's index is built (concurrently,
    perhaps after the main transaction); it only records the link, and cannot be undone."""
    child = attached_index(node)
    return replace(d, kind="attach_index_partition", object=child, uses_index=child, rollback_sql=None,
                   reversible=False, identity=())


def attached_index(node: ast.AlterTableStmt) -> str:
    """The index that ALTER INDEX ... ATTACH PARTITION attaches, or ""."""
    if enums.ObjectType(int(node.objtype or 0)) is not enums.ObjectType.OBJECT_INDEX:
        return ""
    for cmd in node.cmds or ():
        if (isinstance(cmd, ast.AlterTableCmd)
                and enums.AlterTableType(int(cmd.subtype or 0)) is enums.AlterTableType.AT_AttachPartition
                and isinstance(cmd.def_, ast.PartitionCmd) and cmd.def_.name is not None):
            return rv(cmd.def_.name)
    return ""


def _drop_index_lock(ctx: Context, table: str | None, concurrent: bool) -> tuple[Hazard, ...]:
    """DROP INDEX without CONCURRENTLY (an index on a partitioned table, one a constraint owns, one replaced under
    its name, or the switch off) takes ACCESS EXCLUSIVE on its table until the transaction ends."""
    if concurrent or table is None or not ctx.existing(table):
        return ()
    return (ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, "dropping an index without CONCURRENTLY blocks reads and "
                       "writes of its table while held, and waits behind running transactions", table),)


def index_columns(node: ast.IndexStmt) -> set[str]:
    """Columns an index reads, in its keys, expressions and predicate."""
    found: set[str] = set()

    class _V(Visitor):
        def visit_ColumnRef(self, _ancestors: object, ref: ast.ColumnRef) -> None:
            last = (ref.fields or ())[-1:]
            if last and isinstance(last[0], ast.String):
                found.add(str(last[0].sval))

    for param in node.indexParams or ():
        if isinstance(param, ast.IndexElem) and param.name:
            found.add(str(param.name))
        elif isinstance(param, ast.IndexElem) and param.expr is not None:
            _V()(param.expr)
    if node.whereClause is not None:
        _V()(node.whereClause)
    return found


def _names_objects(node: ast.IndexStmt) -> bool:
    """The index calls a function, casts (``'cfg'::regconfig``), or names a collation or operator class: any of
    them may be created in the main transaction, so it cannot be built before it."""
    found = False

    class _V(Visitor):
        def visit_FuncCall(self, _ancestors: object, _node: ast.FuncCall) -> None:
            nonlocal found
            found = True

        def visit_TypeCast(self, _ancestors: object, _node: ast.TypeCast) -> None:
            nonlocal found
            found = True

        def visit_CollateClause(self, _ancestors: object, _node: ast.CollateClause) -> None:
            nonlocal found
            found = True

    for param in node.indexParams or ():
        if isinstance(param, ast.IndexElem) and (param.collation or param.opclass):
            return True
        if isinstance(param, ast.IndexElem) and param.expr is not None:
            _V()(param.expr)
    if node.whereClause is not None:
        _V()(node.whereClause)
    return found
