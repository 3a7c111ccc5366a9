"""What every strategy asks while one plan is compiled: live's facts, the settings, and what the whole plan does."""

from __future__ import annotations

from collections.abc import Sequence

from pglast import ast, enums

from ..conversions import ColumnNotes
from ..diff.base import Change
from ..inspect import LiveFacts, TableSize, qualify
from .nodes import human_bytes, names, rv
from .steps import Hazard, HazardCode, SafetySettings


class Context:
    def __init__(self, facts: LiveFacts, settings: SafetySettings, engine: str, notes: ColumnNotes | None = None) -> None:
        self.facts = facts
        self.notes = notes or ColumnNotes()  # the desired SQL's using and backfill annotations
        self.settings = settings
        self.engine = engine
        self.created_tables: set[str] = set()
        self.created_partitioned: set[str] = set()
        self.folded: set[tuple[str, str]] = set()  # (new table, constraint) added validated: its VALIDATE is dropped
        self.dropped_indexes: set[str] = set()
        self.created_indexes: set[str] = set()
        self.created_relations: set[str] = set()
        self.new_or_retyped_columns: set[tuple[str, str]] = set()
        self.validated: set[tuple[str, str]] = set()  # (table, constraint) a VALIDATE CONSTRAINT step names
        self.fill_helpers: set[str] = set()  # the backfill triggers and functions made, named as the engine names them
        self.changed_constraints: set[tuple[str, str]] = set()  # (table, constraint) the plan drops or adds
        self.repointed: set[tuple[str, str]] = set()  # (table, foreign key) a cut-over re-adds: validated once
        self.dropped_views: set[str] = set()
        self.created_views: set[str] = set()  # CREATE (OR REPLACE) VIEW
        self.cutover_identities: set[tuple[str, str]] = set()  # (table, column) a cut-over gives a new identity
        self.cutover_views: set[str] = set()  # views a dual column's cut-over drops and makes again (cutover_views.py)

    def existing(self, table: str) -> bool:
        """A table that exists in live and is not created by this plan: someone may be using it."""
        return table in self.facts.tables and table not in self.created_tables

    def size(self, table: str) -> TableSize | None:
        return self.facts.tables.get(table)

    def type_oid(self, type_name: ast.TypeName | None) -> int | None:
        """The oid of the type a statement names (``pg_catalog.int8`` or ``bigint``), when live has it."""
        if type_name is None:
            return None
        name = names(type_name.names)
        return self.facts.type_oids.get(name) or self.facts.type_oids.get(name.removeprefix("pg_catalog."))

    def partitioned(self, table: str) -> bool:
        return table in self.facts.partitioned or table in self.created_partitioned

    def hazard(self, code: HazardCode, message: str, table: str | None = None) -> Hazard:
        size = self.size(table) if table else None
        if size is not None:
            message = f"{message} ({table}: ~{size.rows:,} rows, {human_bytes(size.bytes)})"
        return Hazard(code, message, table, size.rows if size else None, size.bytes if size else None)

    def learn(self, statements: Sequence[tuple[Change, ast.Node]]) -> None:
        """What the whole plan does that decides where a step may move: the relations it creates, dropped and
        created index names, columns added or retyped, constraints it validates."""
        for _change, node in statements:
            if isinstance(node, ast.CreateStmt):
                self.created_tables.add(rv(node.relation))
                if node.partspec is not None:
                    self.created_partitioned.add(rv(node.relation))
            elif isinstance(node, ast.CreateTableAsStmt) and node.into is not None:
                self.created_tables.add(rv(node.into.rel))
        self.created_relations.update(self.created_tables)
        for _change, node in statements:
            if isinstance(node, ast.DropStmt) and enums.ObjectType(int(node.removeType or 0)) is enums.ObjectType.OBJECT_INDEX:
                self.dropped_indexes.update(qualify(names(o)) for o in node.objects or ())
            elif isinstance(node, ast.IndexStmt) and node.idxname:
                self.created_indexes.add(f"{rv(node.relation).split('.')[0]}.{node.idxname}")
                self.created_relations.add(f"{rv(node.relation).split('.')[0]}.{node.idxname}")
            elif isinstance(node, ast.CreateSeqStmt):
                self.created_relations.add(rv(node.sequence))
            elif isinstance(node, ast.ViewStmt):
                self.created_views.add(rv(node.view))
                if rv(node.view) not in self.facts.views:
                    self.created_relations.add(rv(node.view))
            elif isinstance(node, ast.DropStmt) and enums.ObjectType(int(node.removeType or 0)) is enums.ObjectType.OBJECT_VIEW:
                self.dropped_views.update(qualify(names(o)) for o in node.objects or ())
            elif isinstance(node, ast.AlterTableStmt):
                table = rv(node.relation)
                for cmd in node.cmds or ():
                    subtype = enums.AlterTableType(int(cmd.subtype or 0))
                    if subtype is enums.AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
                        self.new_or_retyped_columns.add((table, str(cmd.def_.colname)))
                    elif subtype is enums.AlterTableType.AT_AlterColumnType:
                        self.new_or_retyped_columns.add((table, str(cmd.name)))
                    elif subtype is enums.AlterTableType.AT_ValidateConstraint:
                        self.validated.add((table, str(cmd.name)))
                    elif subtype is enums.AlterTableType.AT_DropConstraint:
                        self.changed_constraints.add((table, str(cmd.name)))
                    elif subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint):
                        self.changed_constraints.add((table, str(cmd.def_.conname)))
