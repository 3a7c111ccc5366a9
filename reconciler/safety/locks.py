"""The table locks a step's statement takes, by PostgreSQL's rules (the "Explicit Locking" chapter and each
command's page), read from its parse tree: what a reviewer needs to know first is what will wait behind it. A lock
is held to the end of the step's transaction, so a phase holds the strongest each of its steps took."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import pglast
from pglast import ast, enums

from ..inspect import qualify
from .nodes import names, rv
from .steps import Step


class LockMode(IntEnum):
    """PostgreSQL's table lock modes, weakest first."""

    ACCESS_SHARE = 1
    ROW_SHARE = 2
    ROW_EXCLUSIVE = 3
    SHARE_UPDATE_EXCLUSIVE = 4
    SHARE = 5
    SHARE_ROW_EXCLUSIVE = 6
    EXCLUSIVE = 7
    ACCESS_EXCLUSIVE = 8

    @property
    def label(self) -> str:
        """As PostgreSQL names it (``LOCK TABLE ... IN <label> MODE``, pg_locks says ``<Camel>Lock``)."""
        return self.name.replace("_", " ")

    @property
    def blocks_reads(self) -> bool:
        return self is LockMode.ACCESS_EXCLUSIVE

    @property
    def blocks_writes(self) -> bool:
        """Conflicts with ROW EXCLUSIVE, which INSERT, UPDATE and DELETE take."""
        return self >= LockMode.SHARE

    @property
    def waits(self) -> str:
        return "reads and writes wait" if self.blocks_reads else "writes wait" if self.blocks_writes else \
            "reads and writes go on"


@dataclass(frozen=True)
class TableLock:
    table: str
    mode: LockMode


_LIGHTER_ALTERS = {  # ALTER TABLE forms below ACCESS EXCLUSIVE
    enums.AlterTableType.AT_ValidateConstraint: LockMode.SHARE_UPDATE_EXCLUSIVE,
    enums.AlterTableType.AT_SetStatistics: LockMode.SHARE_UPDATE_EXCLUSIVE,
    enums.AlterTableType.AT_ClusterOn: LockMode.SHARE_UPDATE_EXCLUSIVE,
    enums.AlterTableType.AT_DropCluster: LockMode.SHARE_UPDATE_EXCLUSIVE,
    enums.AlterTableType.AT_SetOptions: LockMode.SHARE_UPDATE_EXCLUSIVE,
    enums.AlterTableType.AT_ResetOptions: LockMode.SHARE_UPDATE_EXCLUSIVE,
    enums.AlterTableType.AT_AttachPartition: LockMode.SHARE_UPDATE_EXCLUSIVE,
    enums.AlterTableType.AT_EnableTrig: LockMode.SHARE_ROW_EXCLUSIVE,
    enums.AlterTableType.AT_EnableAlwaysTrig: LockMode.SHARE_ROW_EXCLUSIVE,
    enums.AlterTableType.AT_EnableReplicaTrig: LockMode.SHARE_ROW_EXCLUSIVE,
    enums.AlterTableType.AT_DisableTrig: LockMode.SHARE_ROW_EXCLUSIVE,
    enums.AlterTableType.AT_EnableTrigAll: LockMode.SHARE_ROW_EXCLUSIVE,
    enums.AlterTableType.AT_DisableTrigAll: LockMode.SHARE_ROW_EXCLUSIVE,
    enums.AlterTableType.AT_EnableTrigUser: LockMode.SHARE_ROW_EXCLUSIVE,
    enums.AlterTableType.AT_DisableTrigUser: LockMode.SHARE_ROW_EXCLUSIVE,
}
_DROPPED_RELATIONS = frozenset({enums.ObjectType.OBJECT_TABLE, enums.ObjectType.OBJECT_VIEW,
                                enums.ObjectType.OBJECT_MATVIEW, enums.ObjectType.OBJECT_FOREIGN_TABLE})
_ON_A_TABLE = frozenset({enums.ObjectType.OBJECT_TRIGGER, enums.ObjectType.OBJECT_POLICY, enums.ObjectType.OBJECT_RULE})
_ROW_WRITES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)


def step_locks(step: Step) -> tuple[TableLock, ...]:
    """The strongest lock on each table the step's statement takes; an index's statement locks the step's table."""
    try:
        parsed = pglast.parse_sql(step.sql)
    except pglast.parser.ParseError:
        return ()
    found: dict[str, LockMode] = {}
    for raw in parsed:
        if raw.stmt is not None:
            for lock in statement_locks(raw.stmt, step.tables):
                found[lock.table] = max(found.get(lock.table, lock.mode), lock.mode)
    return tuple(TableLock(table, mode) for table, mode in found.items())


def phase_locks(steps: Iterable[Step]) -> tuple[TableLock, ...]:
    """What a phase holds, strongest first: each table's strongest lock among its steps (a transaction holds every
    lock it took to its end; a phase outside one is a single step)."""
    return strongest(lock for step in steps for lock in step_locks(step))


def strongest(locks: Iterable[TableLock]) -> tuple[TableLock, ...]:
    """Each table's strongest of ``locks``, strongest first."""
    found: dict[str, LockMode] = {}
    for lock in locks:
        found[lock.table] = max(found.get(lock.table, lock.mode), lock.mode)
    return tuple(sorted((TableLock(t, m) for t, m in found.items()), key=lambda lock: (-lock.mode, lock.table)))


def statement_locks(node: ast.Node, tables: Sequence[str] = ()) -> list[TableLock]:
    """``tables``: the table an index statement is on (its parse tree names only the index)."""
    def on(names: Iterable[str], mode: LockMode) -> list[TableLock]:
        return [TableLock(name, mode) for name in names]

    if isinstance(node, ast.AlterTableStmt):
        return _alter_locks(node)
    if isinstance(node, ast.IndexStmt):
        return on([rv(node.relation)], LockMode.SHARE_UPDATE_EXCLUSIVE if node.concurrent else LockMode.SHARE)
    if isinstance(node, ast.DropStmt):
        removed = enums.ObjectType(int(node.removeType or 0))
        if removed is enums.ObjectType.OBJECT_INDEX:
            return on(tables, LockMode.SHARE_UPDATE_EXCLUSIVE if node.concurrent else LockMode.ACCESS_EXCLUSIVE)
        if removed in _DROPPED_RELATIONS or removed in _ON_A_TABLE:
            return on(tables if removed in _ON_A_TABLE else [qualify(names(o)) for o in node.objects or ()
                                                             if isinstance(o, tuple | list)],
                      LockMode.ACCESS_EXCLUSIVE)
        return []
    if isinstance(node, ast.LockStmt):
        return on([rv(r) for r in node.relations or () if isinstance(r, ast.RangeVar)], LockMode(int(node.mode or 1)))
    if isinstance(node, ast.RenameStmt) and node.relation is not None:  # an index's: its own, which no one waits on
        renamed = enums.ObjectType(int(node.renameType or 0))
        return [] if renamed is enums.ObjectType.OBJECT_INDEX else on([rv(node.relation)], LockMode.ACCESS_EXCLUSIVE)
    if isinstance(node, ast.CreateTrigStmt):
        return on([rv(node.relation)], LockMode.SHARE_ROW_EXCLUSIVE)
    if isinstance(node, ast.CreatePolicyStmt | ast.AlterPolicyStmt):
        return on([rv(node.table)], LockMode.ACCESS_EXCLUSIVE)
    if isinstance(node, ast.TruncateStmt):
        return on([rv(r) for r in node.relations or () if isinstance(r, ast.RangeVar)], LockMode.ACCESS_EXCLUSIVE)
    if isinstance(node, ast.ViewStmt) and node.replace:
        return on([rv(node.view)], LockMode.ACCESS_EXCLUSIVE)
    if isinstance(node, ast.CreateStmt):
        return _create_locks(node)
    if isinstance(node, ast.CommentStmt) and enums.ObjectType(int(node.objtype or 0)) in (
            enums.ObjectType.OBJECT_TABLE, enums.ObjectType.OBJECT_COLUMN):
        return on(tables, LockMode.SHARE_UPDATE_EXCLUSIVE)
    if isinstance(node, _ROW_WRITES):
        return on([rv(node.relation)], LockMode.ROW_EXCLUSIVE)
    if isinstance(node, ast.VacuumStmt):
        return on([rv(r.relation) for r in node.rels or () if isinstance(r, ast.VacuumRelation)],
                  LockMode.SHARE_UPDATE_EXCLUSIVE)
    return []


def _alter_locks(node: ast.AlterTableStmt) -> list[TableLock]:
    table, mode = rv(node.relation), LockMode.ACCESS_SHARE
    found: list[TableLock] = []
    for cmd in node.cmds or ():
        if not isinstance(cmd, ast.AlterTableCmd):
            continue
        subtype = enums.AlterTableType(int(cmd.subtype or 0))
        constraint = cmd.def_ if isinstance(cmd.def_, ast.Constraint) else None
        if constraint is not None and subtype is enums.AlterTableType.AT_AddConstraint and \
                enums.ConstrType(int(constraint.contype or 0)) is enums.ConstrType.CONSTR_FOREIGN:
            mode = max(mode, LockMode.SHARE_ROW_EXCLUSIVE)  # reads go on; the referenced table the same
            found.append(TableLock(rv(constraint.pktable), LockMode.SHARE_ROW_EXCLUSIVE))
        elif subtype is enums.AlterTableType.AT_AttachPartition and isinstance(cmd.def_, ast.PartitionCmd):
            mode = max(mode, LockMode.SHARE_UPDATE_EXCLUSIVE)
            found.append(TableLock(rv(cmd.def_.name), LockMode.ACCESS_EXCLUSIVE))
        elif subtype is enums.AlterTableType.AT_DetachPartition and isinstance(cmd.def_, ast.PartitionCmd):
            detached = LockMode.SHARE_UPDATE_EXCLUSIVE if cmd.def_.concurrent else LockMode.ACCESS_EXCLUSIVE
            mode = max(mode, detached)
            found.append(TableLock(rv(cmd.def_.name), detached))
        else:
            mode = max(mode, _LIGHTER_ALTERS.get(subtype, LockMode.ACCESS_EXCLUSIVE))
    return [TableLock(table, mode), *found]


def _create_locks(node: ast.CreateStmt) -> list[TableLock]:
    """A new table locks none of its own that anyone waits on; the table it is a partition of, and the tables its
    foreign keys reference, it does."""
    found = [TableLock(rv(parent), LockMode.ACCESS_EXCLUSIVE) for parent in node.inhRelations or ()
             if node.partbound is not None and isinstance(parent, ast.RangeVar)]
    constraints = [c for c in node.constraints or () if isinstance(c, ast.Constraint)]
    for element in node.tableElts or ():
        if isinstance(element, ast.ColumnDef):
            constraints += [c for c in element.constraints or () if isinstance(c, ast.Constraint)]
    found += [TableLock(rv(c.pktable), LockMode.SHARE_ROW_EXCLUSIVE) for c in constraints
              if enums.ConstrType(int(c.contype or 0)) is enums.ConstrType.CONSTR_FOREIGN and c.pktable is not None]
    return found

