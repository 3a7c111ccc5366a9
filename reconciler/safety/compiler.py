"""The compiler's core: each diff statement parsed and handed to the strategy for its kind, then the plan-wide
moves (a constraint after the index it uses, a partitioned table's key after its partitions')."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pglast import ast, enums

from ..diff.base import Change
from ..diff.classify import classify_node, identity_of
from ..inspect import qualify
from . import (
    backfill,
    constraints,
    cutover_views,
    dual_column,
    enum_values,
    generic,
    indexes,
    not_null,
    renaming,
    shadow_table,
    table_way_back,
    type_change,
    volatile_default,
    way_back,
)
from .context import Context
from .drafts import CUTOVER, MAIN, POST_DEPENDENT, POST_INDEX, POST_NOT_NULL, Draft
from .hazards import alter_hazards
from .nodes import names, parse, rv, tables_of
from .rollback import alter_rollback

_UNIQUE_ADDS = frozenset({"add_primary_key", "add_unique_constraint"})
_RELATION_TYPES = frozenset({enums.ObjectType.OBJECT_TABLE, enums.ObjectType.OBJECT_SEQUENCE,
                             enums.ObjectType.OBJECT_VIEW, enums.ObjectType.OBJECT_MATVIEW,
                             enums.ObjectType.OBJECT_INDEX})
# objects that live outside schemas, or statements about settings: their names are not schema-qualified
_UNQUALIFIED_KINDS = frozenset({"set", "create_schema", "drop_schema", "create_extension", "drop_extension",
                                "alter_extension"})


class Compiler(Context):
    def compile(self, changes: Sequence[Change]) -> list[Draft]:
        statements = [(c, parse(c.sql, self.engine)) for c in changes if c.rebuild is None]
        self.learn(statements)
        skipped, out = enum_values.enum_rewrites(self, statements)  # new enum values first: nothing needs them absent
        for i, (change, node) in enumerate(statements):
            if i in skipped:
                continue
            out.extend(self._undone_by_drop(d, node) for d in self._statement(change, node))
        for change in changes:  # tables built again: after everything they may need (the engine puts them last)
            if change.rebuild is None:
                continue
            rebuilt = (table_way_back.swap_back(self, change.rebuild) if change.rebuild.kept is not None
                       else shadow_table.shadow_table(self, change.rebuild))
            if rebuilt is None:  # small: the engine's own statements
                originals = [(c, parse(c.sql, self.engine)) for c in change.rebuild.original]
                self.learn(originals)
                rebuilt = [self._undone_by_drop(d, node) for c, node in originals for d in self._statement(c, node)]
            out.extend(rebuilt)
        return self._dependents(way_back.contracts(cutover_views.into_cutover(self, self._helpers_kept(out))))

    def _helpers_kept(self, drafts: list[Draft]) -> list[Draft]:
        """A backfill's trigger and function (and a dual column's new column, CHECK and indexes) left by a run
        stopped part-way are the ones this plan makes again (OR REPLACE, or IF NOT EXISTS) or keeps, and drops at
        its end: the diff engine's drops of them go (in the main transaction, in the engine's order, one could come
        after the trigger is made again and stop filling new writes before the fill is done)."""
        if not self.fill_helpers:
            return drafts
        return [d for d in drafts if d.helper or d.object not in self.fill_helpers or d.kind not in (
            "drop_trigger", "drop_function", "drop_column", "drop_constraint", "drop_index", "drop_index_concurrently")]

    def _statement(self, change: Change, node: ast.Node) -> list[Draft]:
        kind, obj = classify_node(node)
        if obj and "(" not in obj and "," not in obj and kind not in _UNQUALIFIED_KINDS:
            obj = qualify(obj)
        base = Draft(sql=change.sql, kind=kind, object=obj, tables=tables_of(node), identity=identity_of(node))
        if isinstance(node, ast.IndexStmt):
            return [indexes.create_index(self, base, node)]
        if isinstance(node, ast.DropStmt) and kind in {"drop_index", "drop_index_concurrently"}:
            return [indexes.drop_index(self, base, node)]
        if isinstance(node, ast.AlterTableStmt) and enums.ObjectType(int(node.objtype or 0)) is enums.ObjectType.OBJECT_TABLE:
            return self._alter_table(base, node)
        if isinstance(node, ast.RenameStmt) and kind in renaming.KINDS and node.relation is not None:
            return [renaming.rename(self, base, node, node.relation)]
        if isinstance(node, ast.AlterTableStmt) and indexes.attached_index(node):
            return [indexes.attach_index(base, node)]
        return [generic.generic(self, base, node)]

    def _alter_table(self, d: Draft, node: ast.AlterTableStmt) -> list[Draft]:
        table = rv(node.relation)
        cmds = [c for c in node.cmds or () if isinstance(c, ast.AlterTableCmd)]
        switches = self.settings.switches
        partitioned_fk = constraints.partitioned_foreign_key(self, d, table, cmds)
        if partitioned_fk is not None:
            return [partitioned_fk]
        if self.existing(table):
            d = type_change.converted(self, d, node, table)
            filled = (backfill.new_not_null_column(self, d, node, table, cmds)
                      or volatile_default.volatile_default(self, d, node, table, cmds))
            if filled is not None:
                return filled
            online = way_back.swap_back(self, d, node, table, cmds) or dual_column.dual_column(self, d, node, table, cmds)
            if online is not None:
                return online
        if not self.existing(table):
            fresh = constraints.fresh_constraint(self, d, table, cmds)
            if fresh is not None:
                return fresh
            if (len(cmds) == 1 and switches.not_valid_constraints
                    and enums.AlterTableType(int(cmds[0].subtype or 0)) is enums.AlterTableType.AT_ValidateConstraint):
                # after its ADD, which may wait for an index built concurrently (POST_DEPENDENT); a new table is
                # empty, so its validations are instant and share a transaction (not one each: thousands of phases)
                return [constraints.validate(d, isolated=table not in self.created_tables)]
            return [alter_rollback(self, d, table, cmds)]
        if len(cmds) == 1:
            cmd = cmds[0]
            subtype = enums.AlterTableType(int(cmd.subtype or 0))
            if subtype is enums.AlterTableType.AT_SetNotNull:
                filled = backfill.not_null_filled(self, d, table, str(cmd.name))
                if filled is not None:
                    return filled
            if subtype is enums.AlterTableType.AT_SetNotNull and switches.safe_not_null:
                return not_null.safe_not_null(self, d, table, str(cmd.name))
            if (subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint)
                    and switches.not_valid_constraints):
                con = cmd.def_
                online = constraints.not_valid_then_validate(self, d, table, con, cmds)
                if online is not None:
                    return online
                if (enums.ConstrType(int(con.contype or 0)) is enums.ConstrType.CONSTR_NOTNULL and not con.skip_validation
                        and con.keys and switches.safe_not_null):
                    # PostgreSQL 18's named NOT NULL: added once a validated CHECK spares its scan, as SET NOT NULL is
                    return not_null.safe_not_null(self, d, table, str(con.keys[0].sval), final=d.sql)
            if subtype is enums.AlterTableType.AT_SetIdentity and (table, str(cmd.name)) in self.cutover_identities:
                # the identity a dual column's cut-over made: its options set there, after it (a transaction undone)
                return [replace(alter_rollback(self, d, table, cmds), stage=CUTOVER, rollback_sql=None, reversible=False)]
            if subtype is enums.AlterTableType.AT_AddIdentity and switches.safe_not_null:
                # needs the column NOT NULL, which the safe form sets in POST_NOT_NULL
                return [replace(alter_rollback(self, replace(d, hazards=alter_hazards(self, table, cmds)), table, cmds),
                                stage=POST_NOT_NULL)]
            if subtype is enums.AlterTableType.AT_ValidateConstraint and switches.not_valid_constraints:
                return [constraints.validate(d)]
        uses_index = next((f"{table.split('.')[0]}.{c.def_.indexname}" for c in cmds
                           if isinstance(c.def_, ast.Constraint) and c.def_.indexname), None)
        uses_index = uses_index or next((f"{table.split('.')[0]}.{c.def_.name}" for c in cmds  # REPLICA IDENTITY USING INDEX
                                         if isinstance(c.def_, ast.ReplicaIdentityStmt) and c.def_.name), None)
        return [alter_rollback(self, replace(d, hazards=alter_hazards(self, table, cmds), uses_index=uses_index),
                               table, cmds)]

    def _undone_by_drop(self, d: Draft, node: ast.Node) -> Draft:
        """A change to relations this plan creates (ALTER, OWNED BY, COMMENT, GRANT) needs no undo of its own: undone
        last first, the plan's DROP of each of them comes after and takes the change with it."""
        if d.reversible or isinstance(node, ast.DropStmt):
            return d
        if isinstance(node, ast.AlterTableStmt | ast.AlterSeqStmt) or (
                isinstance(node, ast.GrantStmt) and enums.ObjectType(int(node.objtype or 0)) in _RELATION_TYPES
                and enums.GrantTargetType(int(node.targtype or 0)) is enums.GrantTargetType.ACL_TARGET_OBJECT):
            touched = set(d.tables)
        elif isinstance(node, ast.CommentStmt) and enums.ObjectType(int(node.objtype or 0)) in _RELATION_TYPES | {
                enums.ObjectType.OBJECT_COLUMN} and isinstance(node.object, tuple):
            parts = names(node.object[:-1] if enums.ObjectType(int(node.objtype or 0)) is enums.ObjectType.OBJECT_COLUMN
                          else node.object)
            touched = {qualify(parts)} if parts else set()
        else:
            return d
        if not touched or not touched <= self.created_relations:
            return d
        return replace(d, rollback_sql="", reversible=True)

    def _dependents(self, drafts: list[Draft]) -> list[Draft]:
        """Constraints that use an index built after the main transaction move after it too, and so do
        foreign keys to their tables."""
        late = {d.index_name for d in drafts if d.stage == POST_INDEX and d.index_name}
        if not late:
            return drafts
        late_tables = {d.tables[0] for d in drafts if d.stage == POST_INDEX and d.tables}
        out = []
        for d in drafts:
            references_late = d.kind == "add_foreign_key" and bool(set(d.tables[1:]) & late_tables)
            if d.stage == MAIN and (d.uses_index in late or references_late):
                d = replace(d, stage=POST_DEPENDENT)
            out.append(d)
        # a partitioned table's primary key or unique constraint attaches its partitions' constraints: after them
        if any(d.stage == POST_DEPENDENT and d.kind in _UNIQUE_ADDS for d in out):
            moved = {d.tables[0] for d in out if d.stage == MAIN and d.kind in _UNIQUE_ADDS and d.tables
                     and self.partitioned(d.tables[0]) and d.uses_index is None}
            out = [replace(d, stage=POST_DEPENDENT) if d.stage == MAIN and (
                (d.kind in _UNIQUE_ADDS and d.tables and d.tables[0] in moved and d.uses_index is None)
                or (d.kind == "add_foreign_key" and bool(set(d.tables[1:]) & moved))) else d for d in out]
        return out
