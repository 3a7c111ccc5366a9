"""The safety compiler: diff statements in, plan steps out.

Every statement is parsed with pglast (never grepped) and knowing the live tables it:
- names its hazards, with the live size of the table they concern;
- rewrites it into an online-safe form where one exists (CONCURRENTLY, NOT VALID + VALIDATE,
  SET NOT NULL through a validated CHECK, ALTER TYPE ... ADD VALUE), each switchable off;
- derives the SQL that undoes it (a created object's DROP), or marks it irreversible;
- groups steps into phases: one transaction each, or a single statement that cannot run in one.
Statements that touch only objects created by the same plan keep their plain form, in the main
transaction: nobody uses those objects yet, a new table is empty (validating a constraint on it
is instant, so NOT VALID + VALIDATE becomes one validated ADD), and CONCURRENTLY cannot run in the
transaction that creates the table. What such a step does to an existing table (a foreign key's
lock on the table it references) keeps its hazard.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pglast
from pglast import ast, enums
from pglast.stream import RawStream, maybe_double_quote_name
from pglast.visitors import Visitor
from psycopg import sql

from .config import SafetyOptions
from .diff.base import Change
from .diff.classify import classify_node, identity_of
from .errors import ReconcilerError
from .inspect import LiveFacts, LockTable, TableSize, qualify


@dataclass(frozen=True)
class Hazard:
    code: str
    message: str
    table: str | None = None
    rows: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class LintFinding:
    rule: str
    message: str


@dataclass(frozen=True)
class Step:
    index: int
    sql: str
    kind: str
    object: str
    transactional: bool
    hazards: tuple[Hazard, ...]
    rollback_sql: str | None  # None: irreversible (see ``reversible``)
    tables: tuple[str, ...] = ()
    phase: int = 1
    reversible: bool = False
    lock_timeout: str = "5s"
    statement_timeout: str = "15min"
    lint: tuple[LintFinding, ...] = ()
    original_sql: str | None = None  # the diff engine's statement, when this step rewrites it
    identity: tuple[str, ...] = ()  # the object's name parts (schema first): how apply finds it in the catalog


@dataclass(frozen=True)
class SafetySettings:
    switches: SafetyOptions = field(default_factory=SafetyOptions)  # which rewrites are on (reconciler.yaml `safety:`)
    lock_timeout: str = "5s"
    statement_timeout: str = "15min"
    timeouts: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # kind -> {lock_timeout, statement_timeout}


# --- drafts: steps before numbering, phases and timeouts ---

# Stages, in execution order. Within a stage steps keep the diff engine's (dependency) order.
PRE, PRE_INDEX, MAIN, POST_INDEX, POST_DEPENDENT, POST_VALIDATE, POST_NOT_NULL, POST_DROP = range(8)
RENAME = -1  # renames from annotations (renames.py): before all, so every later step sees the new names
_RENAMES = frozenset({"rename_table", "rename_column", "rename_index", "rename_sequence", "rename_constraint"})
# PRE: new enum values (nothing needs them absent). PRE_INDEX: concurrent builds over columns that
# already exist, so the main transaction can use them (ADD CONSTRAINT ... USING INDEX). MAIN: one
# transaction with everything else. POST_INDEX: concurrent builds that need the main transaction's
# columns, then POST_DEPENDENT: the constraints that use those indexes. POST_VALIDATE: each
# VALIDATE CONSTRAINT in its own transaction (writes go on). POST_NOT_NULL: SET NOT NULL spared
# its scan by the validated CHECK. POST_DROP: indexes dropped concurrently, last.------------------------------------

@dataclass(frozen=True)
class _Draft:
    sql: str
    kind: str
    object: str
    tables: tuple[str, ...]
    transactional: bool = True
    isolated: bool = False  # a transaction of its own (VALIDATE: long, but does not block writes)
    stage: int = 2  # see _STAGES
    index_name: str | None = None  # for CREATE INDEX CONCURRENTLY: the index it builds
    uses_index: str | None = None  # for ADD CONSTRAINT ... USING INDEX: the index it needs
    hazards: tuple[Hazard, ...] = ()
    rollback_sql: str | None = None
    reversible: bool = False
    original_sql: str | None = None
    identity: tuple[str, ...] = ()  # the object's name parts, from the parse tree (see classify.identity_of)


_UNIQUE_ADDS = frozenset({"add_primary_key", "add_unique_constraint"})
_RELATION_TYPES = frozenset({enums.ObjectType.OBJECT_TABLE, enums.ObjectType.OBJECT_SEQUENCE, enums.ObjectType.OBJECT_VIEW,
                             enums.ObjectType.OBJECT_MATVIEW, enums.ObjectType.OBJECT_INDEX})
_CREATE_INDEX = re.compile(r"^CREATE (?:UNIQUE )?INDEX ")  # how pg_get_indexdef starts

# objects that live outside schemas, or statements about settings: their names are not schema-qualified
_UNQUALIFIED_KINDS = frozenset({"set", "create_schema", "drop_schema", "create_extension", "drop_extension",
                                "alter_extension"})


_NOT_VALID_END = re.compile(r"\s+NOT\s+VALID\s*;?\s*$", re.IGNORECASE)


def _valid_as(statement: str, valid: bool) -> str:
    """An ADD CONSTRAINT statement added validated, or NOT VALID, by its text: the constraint's expression stays as
    the statement wrote it (pglast's deparse spells some of them otherwise: TRIM(BOTH FROM x) as btrim(x), which
    PostgreSQL stores as another expression)."""
    text = _NOT_VALID_END.sub("", statement.rstrip().removesuffix(";").rstrip())
    return text if valid else f"{text} NOT VALID"


def _deparse(node: ast.Node) -> str:
    return str(RawStream()(node))


def _new_version(node: ast.AlterExtensionStmt) -> str | None:
    """The version ALTER EXTENSION ... UPDATE TO names (None: UPDATE to the default, or another ALTER EXTENSION)."""
    return next((str(o.arg.sval) for o in node.options or () if o.defname == "new_version" and isinstance(o.arg, ast.String)),
                None)


def _parse(statement: str, engine: str) -> ast.Node:
    try:
        parsed = pglast.parse_sql(statement)
    except pglast.parser.ParseError as exc:
        raise ReconcilerError(f"cannot parse a statement from {engine} ({exc.args[0]}): {statement.strip()[:300]}") from None
    if len(parsed) != 1:
        raise ReconcilerError(f"expected one statement from {engine}, got {len(parsed)}: {statement.strip()[:300]}")
    node = parsed[0].stmt
    assert node is not None
    return node


def _rv(rv: ast.RangeVar | None) -> str:
    if rv is None:
        return ""
    return qualify(f"{rv.schemaname}.{rv.relname}" if rv.schemaname else str(rv.relname))


def _ident(name: str) -> sql.Composable:
    return sql.Identifier(*name.split("."))


def _q(template: str, *parts: sql.Composable) -> str:
    return sql.SQL(template).format(*parts).as_string(None)


def _names(items: Iterable[ast.Node] | None) -> str:
    return ".".join(str(getattr(i, "sval", "")) for i in items or ())


def _tables_of(node: ast.Node) -> tuple[str, ...]:
    """Every table a statement names (the relation it alters plus referenced ones), in the breadth-first order
    of pglast's Visitor, walked here without the ancestry it keeps for each node (a third of compiling GitLab)."""
    found: dict[str, None] = {}
    queue: deque[ast.Node | tuple[Any, ...]] = deque([node])
    while queue:
        item = queue.popleft()
        for sub in item if isinstance(item, tuple) else (item,):
            if isinstance(sub, ast.Node):
                if isinstance(sub, ast.RangeVar):
                    found.setdefault(_rv(sub))
                queue.extend(v for v in (getattr(sub, m) for m in _branches(type(sub))) if isinstance(v, tuple | ast.Node))
            elif isinstance(sub, tuple):
                queue.extend(v for v in sub if isinstance(v, tuple | ast.Node))
    return tuple(found)


_BRANCHES: dict[type, tuple[str, ...]] = {}


def _branches(cls: type) -> tuple[str, ...]:
    """The members of a node class that can hold nodes or lists of them (not names, flags, enums, locations)."""
    known = _BRANCHES.get(cls)
    if known is None:
        def may_branch(py_type: Any) -> bool:
            types = py_type if isinstance(py_type, tuple) else (py_type,)
            return any(t in (tuple, list, dict) or (isinstance(t, type) and issubclass(t, ast.Node)) for t in types)

        slots = vars(cls).get("__slots__", ())  # a node class's members, each with the types it may hold
        known = _BRANCHES[cls] = tuple(name for name, info in slots.items() if may_branch(info.py_type)) \
            if isinstance(slots, Mapping) else tuple(slots)
    return known


def _short(name: str, suffix: str) -> str:
    """A constraint name within PostgreSQL's 63 bytes, stable for the same input."""
    candidate = f"{name}_{suffix}"
    if len(candidate.encode()) <= 63:
        return candidate
    digest = hashlib.sha256(candidate.encode()).hexdigest()[:8]
    return f"{name.encode()[: 63 - len(suffix) - 10].decode(errors='ignore')}_{digest}_{suffix}"


class _Compiler:
    def __init__(self, facts: LiveFacts, settings: SafetySettings, engine: str) -> None:
        self.facts = facts
        self.settings = settings
        self.engine = engine
        self.created_tables: set[str] = set()
        self.created_partitioned: set[str] = set()
        self.folded: set[tuple[str, str]] = set()  # (new table, constraint) added validated: its VALIDATE is dropped

    # -- helpers

    def existing(self, table: str) -> bool:
        """A table that exists in live and is not created by this plan: someone may be using it."""
        return table in self.facts.tables and table not in self.created_tables

    def size(self, table: str) -> TableSize | None:
        return self.facts.tables.get(table)

    def hazard(self, code: str, message: str, table: str | None = None) -> Hazard:
        size = self.size(table) if table else None
        if size is not None:
            message = f"{message} ({table}: ~{size.rows:,} rows, {_human_bytes(size.bytes)})"
        return Hazard(code, message, table, size.rows if size else None, size.bytes if size else None)

    # -- the pass over all changes

    def compile(self, changes: Sequence[Change]) -> list[_Draft]:
        statements = [(c, _parse(c.sql, self.engine)) for c in changes]
        for _change, node in statements:
            if isinstance(node, ast.CreateStmt):
                self.created_tables.add(_rv(node.relation))
                if node.partspec is not None:
                    self.created_partitioned.add(_rv(node.relation))
            elif isinstance(node, ast.CreateTableAsStmt) and node.into is not None:
                self.created_tables.add(_rv(node.into.rel))
        self._plan_wide_facts(statements)
        skipped, out = self._enum_rewrites(statements)  # new enum values first: nothing needs them absent
        for i, (change, node) in enumerate(statements):
            if i in skipped:
                continue
            out.extend(self._undone_by_drop(d, node) for d in self._statement(change, node))
        return self._dependents(out)

    def _undone_by_drop(self, d: _Draft, node: ast.Node) -> _Draft:
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
            parts = _names(node.object[:-1] if enums.ObjectType(int(node.objtype or 0)) is enums.ObjectType.OBJECT_COLUMN
                           else node.object)
            touched = {qualify(parts)} if parts else set()
        else:
            return d
        if not touched or not touched <= self.created_relations:
            return d
        return replace(d, rollback_sql="", reversible=True)

    def _plan_wide_facts(self, statements: list[tuple[Change, ast.Node]]) -> None:
        """What the whole plan does that decides where a step may move: dropped and created index
        names, columns added or retyped; the relations it creates."""
        self.dropped_indexes: set[str] = set()
        self.created_indexes: set[str] = set()
        self.created_relations: set[str] = set(self.created_tables)
        self.new_or_retyped_columns: set[tuple[str, str]] = set()
        self.validated: set[tuple[str, str]] = set()  # (table, constraint) a VALIDATE CONSTRAINT step names
        for _change, node in statements:
            if isinstance(node, ast.DropStmt) and enums.ObjectType(int(node.removeType or 0)) is enums.ObjectType.OBJECT_INDEX:
                self.dropped_indexes.update(qualify(_names(o)) for o in node.objects or ())
            elif isinstance(node, ast.IndexStmt) and node.idxname:
                self.created_indexes.add(f"{_rv(node.relation).split('.')[0]}.{node.idxname}")
                self.created_relations.add(f"{_rv(node.relation).split('.')[0]}.{node.idxname}")
            elif isinstance(node, ast.CreateSeqStmt):
                self.created_relations.add(_rv(node.sequence))
            elif isinstance(node, ast.ViewStmt) and _rv(node.view) not in self.facts.views:
                self.created_relations.add(_rv(node.view))
            elif isinstance(node, ast.AlterTableStmt):
                table = _rv(node.relation)
                for cmd in node.cmds or ():
                    subtype = enums.AlterTableType(int(cmd.subtype or 0))
                    if subtype is enums.AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
                        self.new_or_retyped_columns.add((table, str(cmd.def_.colname)))
                    elif subtype is enums.AlterTableType.AT_AlterColumnType:
                        self.new_or_retyped_columns.add((table, str(cmd.name)))
                    elif subtype is enums.AlterTableType.AT_ValidateConstraint:
                        self.validated.add((table, str(cmd.name)))

    def _dependents(self, drafts: list[_Draft]) -> list[_Draft]:
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
                     and self._partitioned(d.tables[0]) and d.uses_index is None}
            out = [replace(d, stage=POST_DEPENDENT) if d.stage == MAIN and (
                (d.kind in _UNIQUE_ADDS and d.tables and d.tables[0] in moved and d.uses_index is None)
                or (d.kind == "add_foreign_key" and bool(set(d.tables[1:]) & moved))) else d for d in out]
        return out

    def _partitioned(self, table: str) -> bool:
        return table in self.facts.partitioned or table in self.created_partitioned

    # -- enum values added in place instead of recreating the type

    def _enum_rewrites(self, statements: list[tuple[Change, ast.Node]]) -> tuple[set[int], list[_Draft]]:
        """migra recreates an enum to add a value (a table rewrite); find those statement groups and
        the ADD VALUE steps that replace them. Removed or reordered values keep migra's form."""
        skipped: set[int] = set()
        hoisted: list[_Draft] = []
        if not self.settings.switches.enum_add_value:
            return skipped, hoisted
        for i, (_change, node) in enumerate(statements):
            if not (isinstance(node, ast.RenameStmt)
                    and enums.ObjectType(int(node.renameType or 0)) is enums.ObjectType.OBJECT_TYPE
                    and str(node.newname).endswith("__old_version_to_be_dropped")):
                continue
            target = node.object
            names = target.names if isinstance(target, ast.TypeName) else target
            enum_name = qualify(_names(names if isinstance(names, tuple) else ()))
            old_name = f"{enum_name.split('.')[0]}.{node.newname}"
            group = [i]
            new_labels: tuple[str, ...] | None = None
            for j, (_c, other) in enumerate(statements):
                if isinstance(other, ast.CreateEnumStmt) and qualify(_names(other.typeName)) == enum_name:
                    new_labels = tuple(str(v.sval) for v in other.vals or ())
                    group.append(j)
                elif (isinstance(other, ast.AlterTableStmt) and _alters_type_to(other, enum_name)) or (isinstance(other, ast.DropStmt)
                      and enums.ObjectType(int(other.removeType or 0)) is enums.ObjectType.OBJECT_TYPE
                      and any(qualify(_names(o.names if isinstance(o, ast.TypeName) else o)) == old_name
                              for o in other.objects or ())):
                    group.append(j)
            old_labels = self.facts.enums.get(enum_name)
            if old_labels is None or new_labels is None or not _is_extension(old_labels, new_labels):
                continue
            original = ";\n".join(statements[k][0].sql for k in sorted(group))
            parts = tuple(str(getattr(n, "sval", "")) for n in (names if isinstance(names, tuple) else ()))
            identity = ("public", *parts) if len(parts) == 1 else parts
            for n, statement in enumerate(_add_value_statements(enum_name, old_labels, new_labels)):
                hoisted.append(_Draft(sql=statement, kind="add_enum_value", object=enum_name, tables=(), identity=identity,
                                      transactional=False, original_sql=original if n == 0 else None, stage=PRE))
            skipped.update(group)
        return skipped, hoisted

    # -- one statement

    def _statement(self, change: Change, node: ast.Node) -> list[_Draft]:
        kind, obj = classify_node(node)
        if obj and "(" not in obj and "," not in obj and kind not in _UNQUALIFIED_KINDS:
            obj = qualify(obj)
        tables = _tables_of(node)
        base = _Draft(sql=change.sql, kind=kind, object=obj, tables=tables, identity=identity_of(node))
        if isinstance(node, ast.IndexStmt):
            return [self._create_index(base, node)]
        if isinstance(node, ast.DropStmt) and kind in {"drop_index", "drop_index_concurrently"}:
            return [self._drop_index(base, node)]
        if isinstance(node, ast.AlterTableStmt) and enums.ObjectType(int(node.objtype or 0)) is enums.ObjectType.OBJECT_TABLE:
            return self._alter_table(base, node)
        if isinstance(node, ast.RenameStmt) and kind in _RENAMES and node.relation is not None:
            return [self._rename(base, node, node.relation)]
        if isinstance(node, ast.AlterTableStmt) and _attached_index(node):
            return [self._attach_index(base, node)]
        return [self._generic(base, node)]

    def _attach_index(self, d: _Draft, node: ast.AlterTableStmt) -> _Draft:
        """ALTER INDEX parent ATTACH PARTITION child: after the partition's index is built (concurrently,
        perhaps after the main transaction); it only records the link, and cannot be undone."""
        child = _attached_index(node)
        return replace(d, kind="attach_index_partition", object=child, uses_index=child, rollback_sql=None,
                       reversible=False, identity=())

    def _rename(self, d: _Draft, node: ast.RenameStmt, rv: ast.RangeVar) -> _Draft:
        """A rename from renames.py (annotated, or an index, constraint or sequence named after a renamed table or
        column): first, undone by the reverse rename; no data moves."""
        schema, name, new, sub = str(rv.schemaname or "public"), str(rv.relname), str(node.newname), str(node.subname)
        table, tables = f"{schema}.{name}", d.tables
        if d.kind in ("rename_table", "rename_index", "rename_sequence"):
            rollback = _q("ALTER {} {} RENAME TO {}", sql.SQL(d.kind.removeprefix("rename_").upper()),
                          sql.Identifier(schema, new), sql.Identifier(name))
            if d.kind == "rename_table":
                table, tables = f"{schema}.{new}", (*d.tables, f"{schema}.{new}")
        else:
            rollback = _q("ALTER TABLE {} RENAME {} {} TO {}", sql.Identifier(schema, name),
                          sql.SQL(d.kind.removeprefix("rename_").upper()), sql.Identifier(new), sql.Identifier(sub))
        hazards: tuple[Hazard, ...] = ()
        if d.kind in ("rename_table", "rename_column"):
            hazards = (self.hazard("ACCESS_EXCLUSIVE_LOCK", "a brief exclusive lock that waits behind running "
                                                            "transactions; clients that still use the old name fail", table),)
        elif d.kind != "rename_index":  # ALTER INDEX ... RENAME takes a lighter lock
            hazards = (self.hazard("ACCESS_EXCLUSIVE_LOCK", "a brief exclusive lock that waits behind running transactions",
                                   table if d.kind == "rename_constraint" else None),)
        return replace(d, tables=tables, hazards=hazards, rollback_sql=rollback, reversible=True, stage=RENAME)

    def _create_index(self, d: _Draft, node: ast.IndexStmt) -> _Draft:
        table = _rv(node.relation)
        index = f"{table.split('.')[0]}.{node.idxname}" if node.idxname else ""
        named = sql.Identifier(*d.identity) if d.identity else None
        rollback = _q("DROP INDEX IF EXISTS {}", named) if named else None  # undone in reverse: a constraint
        # using it (ADD ... USING INDEX) may have taken it with it
        if not self.existing(table):
            return replace(d, rollback_sql=rollback, reversible=rollback is not None)
        if node.concurrent or (self.settings.switches.concurrent_indexes and table not in self.facts.partitioned):
            node.concurrent = True
            columns = _index_columns(node)
            early = index not in self.dropped_indexes and not _names_objects(node) and not any(
                (table, c) in self.new_or_retyped_columns or (table, c) not in self.facts.columns for c in columns)
            return replace(
                d, sql=_deparse(node), kind="create_index_concurrently", transactional=False, index_name=index,
                stage=PRE_INDEX if early else POST_INDEX,
                original_sql=None if d.sql.upper().find("CONCURRENTLY") >= 0 else d.sql,
                rollback_sql=_q("DROP INDEX CONCURRENTLY IF EXISTS {}", named) if named else None,
                reversible=named is not None,
            )
        if table in self.facts.partitioned:
            if node.relation is not None and not node.relation.inh:  # ON ONLY: an empty, invalid index until attached
                return replace(d, rollback_sql=rollback, reversible=rollback is not None)
            return replace(d, hazards=(self.hazard(
                "BLOCKS_WRITES", "builds the index on every partition without CONCURRENTLY, which partitioned tables do "
                "not allow: writes wait (online: CREATE INDEX ON ONLY, each partition's CONCURRENTLY, then ATTACH)", table),),
                rollback_sql=rollback, reversible=rollback is not None)
        return replace(d, hazards=(self.hazard("BLOCKS_WRITES", "builds the index without CONCURRENTLY: writes wait", table),),
                       rollback_sql=rollback, reversible=rollback is not None)

    def _drop_index(self, d: _Draft, node: ast.DropStmt) -> _Draft:
        names = [qualify(_names(o)) for o in node.objects or ()]
        facts = [self.facts.indexes.get(n) for n in names]
        table = facts[0].table if facts and facts[0] else None
        hazards = (self.hazard("INDEX_DROPPED", "queries that use this index may become slow", table),)
        rollback = "; ".join(f.definition for f in facts if f) if all(facts) else None
        safe = (self.settings.switches.concurrent_index_drops and len(names) == 1 and facts[0] is not None
                and not facts[0].backs_constraint and not facts[0].on_partitioned and names[0] not in self.created_indexes)
        if safe and not node.concurrent:
            node.concurrent = True
            # undone the way it was done: built again without blocking writes
            online = _CREATE_INDEX.sub(r"\g<0>CONCURRENTLY ", rollback, count=1) if rollback else None
            return replace(d, sql=_deparse(node), kind="drop_index_concurrently", transactional=False, hazards=hazards,
                           rollback_sql=online, reversible=online is not None, original_sql=d.sql, stage=POST_DROP)
        return replace(d, hazards=(*hazards, *self._drop_index_lock(table, bool(node.concurrent))), rollback_sql=rollback,
                       reversible=rollback is not None, transactional=not node.concurrent)

    def _drop_index_lock(self, table: str | None, concurrent: bool) -> tuple[Hazard, ...]:
        """DROP INDEX without CONCURRENTLY (an index on a partitioned table, one a constraint owns, one replaced under
        its name, or the switch off) takes ACCESS EXCLUSIVE on its table until the transaction ends."""
        if concurrent or table is None or not self.existing(table):
            return ()
        return (self.hazard("ACCESS_EXCLUSIVE_LOCK", "dropping an index without CONCURRENTLY blocks reads and writes of "
                                                     "its table while held, and waits behind running transactions", table),)

    def _alter_table(self, d: _Draft, node: ast.AlterTableStmt) -> list[_Draft]:
        table = _rv(node.relation)
        cmds = [c for c in node.cmds or () if isinstance(c, ast.AlterTableCmd)]
        partitioned_fk = self._partitioned_foreign_key(d, node, table, cmds)
        if partitioned_fk is not None:
            return [partitioned_fk]
        if not self.existing(table):
            fresh = self._fresh_constraint(d, node, table, cmds)
            if fresh is not None:
                return fresh
            if (len(cmds) == 1 and enums.AlterTableType(int(cmds[0].subtype or 0)) is enums.AlterTableType.AT_ValidateConstraint
                    and self.settings.switches.not_valid_constraints):
                # after its ADD, which may wait for an index built concurrently (POST_DEPENDENT); a new table is
                # empty, so its validations are instant and share a transaction (not one each: thousands of phases)
                return [replace(d, isolated=table not in self.created_tables, rollback_sql="", reversible=True,
                                stage=POST_VALIDATE)]
            return [self._alter_rollback(d, table, cmds)]
        if len(cmds) == 1:
            cmd = cmds[0]
            subtype = enums.AlterTableType(int(cmd.subtype or 0))
            if subtype is enums.AlterTableType.AT_SetNotNull and self.settings.switches.safe_not_null:
                return self._safe_not_null(d, table, str(cmd.name))
            if (subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint)
                    and self.settings.switches.not_valid_constraints):
                con = cmd.def_
                contype = enums.ConstrType(int(con.contype or 0))
                if contype in (enums.ConstrType.CONSTR_FOREIGN, enums.ConstrType.CONSTR_CHECK) and not con.skip_validation:
                    con.skip_validation = True
                    con.initially_valid = False
                    name = str(con.conname)
                    add = self._alter_rollback(
                        replace(d, sql=_valid_as(d.sql, False), original_sql=d.sql, hazards=self._alter_hazards(table, cmds)),
                        table, cmds)
                    validate = _Draft(
                        sql=_q("ALTER TABLE {} VALIDATE CONSTRAINT {}", sql.Identifier(*d.identity[:2]), sql.Identifier(name)),
                        kind="validate_constraint", object=f"{table}.{name}", tables=(table,), isolated=True, identity=d.identity,
                        stage=POST_VALIDATE,
                        rollback_sql="", reversible=True,
                    )
                    return [add, validate]
                if (contype is enums.ConstrType.CONSTR_NOTNULL and not con.skip_validation and con.keys
                        and self.settings.switches.safe_not_null):
                    # PostgreSQL 18's named NOT NULL: added once a validated CHECK spares its scan, as SET NOT NULL is
                    return self._safe_not_null(d, table, str(con.keys[0].sval), final=d.sql)
            if subtype is enums.AlterTableType.AT_AddIdentity and self.settings.switches.safe_not_null:
                # needs the column NOT NULL, which the safe form sets in POST_NOT_NULL
                return [replace(self._alter_rollback(replace(d, hazards=self._alter_hazards(table, cmds)), table, cmds),
                                stage=POST_NOT_NULL)]
            if subtype is enums.AlterTableType.AT_ValidateConstraint and self.settings.switches.not_valid_constraints:
                return [replace(d, isolated=True, rollback_sql="", reversible=True, stage=POST_VALIDATE)]
        uses_index = next((f"{table.split('.')[0]}.{c.def_.indexname}" for c in cmds
                           if isinstance(c.def_, ast.Constraint) and c.def_.indexname), None)
        uses_index = uses_index or next((f"{table.split('.')[0]}.{c.def_.name}" for c in cmds  # REPLICA IDENTITY USING INDEX
                                         if isinstance(c.def_, ast.ReplicaIdentityStmt) and c.def_.name), None)
        return [self._alter_rollback(replace(d, hazards=self._alter_hazards(table, cmds), uses_index=uses_index), table, cmds)]

    def _fresh_constraint(self, d: _Draft, node: ast.AlterTableStmt, table: str,
                          cmds: list[ast.AlterTableCmd]) -> list[_Draft] | None:
        """A foreign key or CHECK the plan adds NOT VALID to a table it creates, then validates: added validated
        instead (the table is empty), and its VALIDATE dropped. A foreign key to an existing table keeps the hazard
        of its lock there. None for any other statement."""
        if len(cmds) != 1 or table not in self.created_tables:
            return None
        cmd, subtype = cmds[0], enums.AlterTableType(int(cmds[0].subtype or 0))
        if subtype is enums.AlterTableType.AT_ValidateConstraint:
            return [] if (table, str(cmd.name)) in self.folded else None
        con = cmd.def_
        if not (subtype is enums.AlterTableType.AT_AddConstraint and isinstance(con, ast.Constraint)
                and enums.ConstrType(int(con.contype or 0)) in (enums.ConstrType.CONSTR_FOREIGN, enums.ConstrType.CONSTR_CHECK)):
            return None
        original = None
        if con.skip_validation and (table, str(con.conname)) in self.validated:
            con.skip_validation, con.initially_valid, original = False, True, d.sql
            self.folded.add((table, str(con.conname)))
        return [self._alter_rollback(replace(d, sql=_valid_as(d.sql, True) if original else d.sql, original_sql=original,
                                             hazards=self._referenced_lock(table, con)), table, cmds)]

    def _referenced_lock(self, table: str, con: ast.Constraint) -> tuple[Hazard, ...]:
        """Adding a foreign key locks the table it references in SHARE ROW EXCLUSIVE mode until the transaction
        commits: writes to that table wait, however new the referencing table is."""
        referenced = _rv(con.pktable) if enums.ConstrType(int(con.contype or 0)) is enums.ConstrType.CONSTR_FOREIGN else ""
        if not referenced or referenced == table or not self.existing(referenced):
            return ()
        return (self.hazard("BLOCKS_WRITES", f"the foreign key locks {referenced} in SHARE ROW EXCLUSIVE mode until the "
                            "transaction commits: writes to it wait, and queue behind running transactions", referenced),)

    def _partitioned_foreign_key(self, d: _Draft, node: ast.AlterTableStmt, table: str,
                                 cmds: list[ast.AlterTableCmd]) -> _Draft | None:
        """A foreign key on or to a partitioned table, added validated: before PostgreSQL 18 it cannot be
        added NOT VALID on one, and VALIDATE does not reach the partitions' copies of one to one. None
        for any other statement, or one the desired schema wants NOT VALID (no VALIDATE follows)."""
        con = cmds[0].def_ if len(cmds) == 1 else None
        if not (isinstance(con, ast.Constraint) and enums.ConstrType(int(con.contype or 0)) is enums.ConstrType.CONSTR_FOREIGN
                and enums.AlterTableType(int(cmds[0].subtype or 0)) is enums.AlterTableType.AT_AddConstraint):
            return None
        if not (self._partitioned(table) or (con.pktable is not None and self._partitioned(_rv(con.pktable)))):
            return None
        if con.skip_validation and (table, str(con.conname)) not in self.validated:
            return None
        original = None
        if con.skip_validation:
            con.skip_validation, con.initially_valid, original = False, True, d.sql
            if table in self.created_tables:
                self.folded.add((table, str(con.conname)))
        hazards = self._alter_hazards(table, cmds) if self.existing(table) else self._referenced_lock(table, con)
        return self._alter_rollback(replace(d, sql=_valid_as(d.sql, True) if original else d.sql, original_sql=original,
                                            hazards=hazards), table, cmds)

    def _safe_not_null(self, d: _Draft, table: str, column: str, *, final: str | None = None) -> list[_Draft]:
        """SET NOT NULL (or ``final``: PostgreSQL 18's ADD CONSTRAINT ... NOT NULL) after a CHECK validated
        without the exclusive lock, which spares its scan."""
        # not "<table>_<col>_not_null": PostgreSQL 18 gives that name to the NOT NULL constraint itself
        parts = d.identity[:2] or tuple(table.split(".", 1))  # (schema, table) from the parse tree: either may hold a dot
        check = _short(f"{parts[-1]}_{column}", "notnull_check")
        t, c, k = sql.Identifier(*parts), sql.Identifier(column), sql.Identifier(check)
        helper = (*parts, check)
        return [
            _Draft(sql=_q("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID", t, k, c),
                   kind="add_check_constraint", object=f"{table}.{check}", tables=(table,), original_sql=d.sql,
                   rollback_sql=_q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", t, k), reversible=True, identity=helper),
            _Draft(sql=_q("ALTER TABLE {} VALIDATE CONSTRAINT {}", t, k), kind="validate_constraint",
                   object=f"{table}.{check}", tables=(table,), isolated=True, rollback_sql="", reversible=True,
                   stage=POST_VALIDATE, identity=helper),
            _Draft(sql=final or _q("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL", t, c), kind="set_not_null",
                   object=f"{table}.{column}", tables=(table,), stage=POST_NOT_NULL, identity=d.identity,
                   hazards=(self.hazard("ACCESS_EXCLUSIVE_LOCK", "brief exclusive lock: the validated CHECK spares the scan",
                                        table),),
                   rollback_sql=_q("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL", t, c), reversible=True),
            _Draft(sql=_q("ALTER TABLE {} DROP CONSTRAINT {}", t, k), kind="drop_constraint",
                   object=f"{table}.{check}", tables=(table,), rollback_sql="", reversible=True, stage=POST_NOT_NULL,
                   identity=helper),
        ]

    def _alter_hazards(self, table: str, cmds: list[ast.AlterTableCmd]) -> tuple[Hazard, ...]:
        found: list[Hazard] = []
        for cmd in cmds:
            subtype = enums.AlterTableType(int(cmd.subtype or 0))
            column = str(cmd.name) if cmd.name else None
            if subtype is enums.AlterTableType.AT_DropColumn:
                found.append(self.hazard("DATA_LOSS", f"drops column {column} and its values", table))
            elif subtype is enums.AlterTableType.AT_AlterColumnType and isinstance(cmd.def_, ast.ColumnDef):
                if self._rewrites_type(table, column or "", cmd.def_):
                    found.append(self.hazard("TABLE_REWRITE", f"changing the type of {column} rewrites the table and its indexes "
                                                              "under an exclusive lock", table))
                found.append(self.hazard("STATISTICS_RESET", f"changing the type or collation of {column} discards its "
                                         f"statistics: queries may plan badly until ANALYZE {table} ({column})", table))
            elif subtype is enums.AlterTableType.AT_ReplicaIdentity:
                found.append(self.hazard("REPLICA_IDENTITY_CHANGE", "changes what logical replication and change data "
                                         "capture receive for updated and deleted rows; on a published table, REPLICA "
                                         "IDENTITY NOTHING makes UPDATE and DELETE fail", table))
            elif subtype is enums.AlterTableType.AT_SetNotNull:
                found.append(self.hazard("FULL_SCAN_UNDER_LOCK", f"SET NOT NULL on {column} scans the table under an "
                                                                 "exclusive lock", table))
            elif subtype is enums.AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
                found.extend(self._add_column_hazards(table, cmd.def_))
            elif subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint):
                con = cmd.def_
                contype = enums.ConstrType(int(con.contype or 0))
                if (contype in (enums.ConstrType.CONSTR_PRIMARY, enums.ConstrType.CONSTR_UNIQUE) and not con.indexname
                        and self._partitioned(table)):
                    found.append(self.hazard("FULL_SCAN_UNDER_LOCK", "attaches each partition's matching unique index "
                                             "(built before, concurrently, where this plan can); a partition without one "
                                             "has it built under an exclusive lock", table))
                elif contype in (enums.ConstrType.CONSTR_PRIMARY, enums.ConstrType.CONSTR_UNIQUE) and not con.indexname:
                    found.append(self.hazard("FULL_SCAN_UNDER_LOCK", "builds the constraint's index under an exclusive lock",
                                             table))
                elif contype in (enums.ConstrType.CONSTR_FOREIGN, enums.ConstrType.CONSTR_CHECK,
                                 enums.ConstrType.CONSTR_EXCLUSION, enums.ConstrType.CONSTR_NOTNULL) and not con.skip_validation:
                    found.append(self.hazard("FULL_SCAN_UNDER_LOCK", "validates every row while holding the lock", table))
                found.extend(self._referenced_lock(table, con))
            elif subtype in (enums.AlterTableType.AT_EnableRowSecurity, enums.AlterTableType.AT_DisableRowSecurity,
                             enums.AlterTableType.AT_ForceRowSecurity, enums.AlterTableType.AT_NoForceRowSecurity):
                found.append(self.hazard("AUTHZ_CHANGE", "changes who can see which rows", table))
        if any(not _lighter_lock(c) for c in cmds):
            found.append(self.hazard("ACCESS_EXCLUSIVE_LOCK", "blocks reads and writes while held, and waits behind running "
                                                              "transactions", table))
        return tuple(found)

    def _add_column_hazards(self, table: str, col: ast.ColumnDef) -> list[Hazard]:
        found: list[Hazard] = []
        constraints = [c for c in col.constraints or () if isinstance(c, ast.Constraint)]
        default = next((c.raw_expr for c in constraints if enums.ConstrType(int(c.contype or 0)) is enums.ConstrType.CONSTR_DEFAULT), None)
        not_null = any(enums.ConstrType(int(c.contype or 0)) is enums.ConstrType.CONSTR_NOTNULL for c in constraints)
        identity = any(enums.ConstrType(int(c.contype or 0)) in (enums.ConstrType.CONSTR_IDENTITY,
                                                                   enums.ConstrType.CONSTR_GENERATED) for c in constraints)
        if (default is not None and self._volatile(default)) or identity:
            found.append(self.hazard("TABLE_REWRITE", f"a volatile default or generated value for {col.colname} rewrites "
                                                      "the table under an exclusive lock", table))
        size = self.size(table)
        if not_null and default is None and not identity and size is not None and size.rows > 0:
            found.append(self.hazard("CORRECTNESS", f"adding NOT NULL column {col.colname} without a default fails on a "
                                                    "table with rows", table))
        return found

    def _volatile(self, expr: ast.Node) -> bool:
        volatile = False

        class _V(Visitor):
            def visit_FuncCall(self, _ancestors: object, node: ast.FuncCall) -> None:
                nonlocal volatile
                if node.funcname and str(node.funcname[-1].sval) in facts.volatile_functions:
                    volatile = True

        facts = self.facts
        _V()(expr)
        return volatile

    def _rewrites_type(self, table: str, column: str, col: ast.ColumnDef) -> bool:
        current = self.facts.columns.get((table, column))
        if current is None or col.typeName is None:
            return True
        target_name = _names(col.typeName.names)
        target_oid = self.facts.type_oids.get(target_name) or self.facts.type_oids.get(target_name.removeprefix("pg_catalog."))
        if target_oid is None:
            return True
        if target_oid == current.type_oid:
            # same type, new modifier: widening varchar/numeric keeps the data in place
            mods = [getattr(m.val, "ival", None) for m in col.typeName.typmods or () if isinstance(m, ast.A_Const)]
            return not mods or not _widens(current.type, mods)
        return (current.type_oid, target_oid) not in self.facts.binary_coercible or _coerces_length(col.typeName)

    def _alter_rollback(self, d: _Draft, table: str, cmds: list[ast.AlterTableCmd]) -> _Draft:
        """The draft with the SQL that undoes a single-command ALTER TABLE, when it can be derived."""
        if len(cmds) != 1:
            return replace(d, rollback_sql=None, reversible=False)
        cmd = cmds[0]
        subtype = enums.AlterTableType(int(cmd.subtype or 0))
        t = _ident(table)
        column = str(cmd.name) if cmd.name else ""
        fact = self.facts.columns.get((table, column)) if table not in self.created_tables else None
        rollback: str | None = None
        if subtype is enums.AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
            rollback = _q("ALTER TABLE {} DROP COLUMN {}", t, sql.Identifier(str(cmd.def_.colname)))
        elif subtype is enums.AlterTableType.AT_SetNotNull:
            rollback = _q("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL", t, sql.Identifier(column))
        elif subtype is enums.AlterTableType.AT_DropNotNull:
            rollback = _q("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL", t, sql.Identifier(column))
        elif subtype is enums.AlterTableType.AT_ColumnDefault and fact is not None:
            rollback = (_q("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT ", t, sql.Identifier(column)) + fact.default
                        if fact.default else _q("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT", t, sql.Identifier(column)))
        elif subtype is enums.AlterTableType.AT_AlterColumnType and fact is not None:
            rollback = _q("ALTER TABLE {} ALTER COLUMN {} TYPE ", t, sql.Identifier(column)) + fact.type + \
                _q(" USING {}::", sql.Identifier(column)) + fact.type
        elif subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint) and cmd.def_.conname:
            rollback = _q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", t, sql.Identifier(str(cmd.def_.conname)))
        elif subtype is enums.AlterTableType.AT_ValidateConstraint:
            rollback = ""
        elif subtype is enums.AlterTableType.AT_EnableRowSecurity:
            rollback = _q("ALTER TABLE {} DISABLE ROW LEVEL SECURITY", t)
        elif subtype is enums.AlterTableType.AT_DisableRowSecurity:
            rollback = _q("ALTER TABLE {} ENABLE ROW LEVEL SECURITY", t)
        return replace(d, rollback_sql=rollback, reversible=rollback is not None)

    def _generic(self, d: _Draft, node: ast.Node) -> _Draft:
        hazards: list[Hazard] = []
        rollback: str | None = None
        kind, obj = d.kind, d.object
        if isinstance(node, ast.DropStmt):
            if kind in ("drop_table", "drop_materialized_view"):
                for table in obj.split(", "):
                    hazards.append(self.hazard("DATA_LOSS", "drops the table and all its rows", qualify(table)))
            elif kind == "drop_schema":
                hazards.append(self.hazard("DATA_LOSS", "drops the schema and everything in it"))
            elif kind == "drop_sequence":
                hazards.append(self.hazard("DATA_LOSS", "drops the sequence and its current value"))
            elif kind in ("drop_type", "drop_domain"):
                hazards.append(self.hazard("DATA_LOSS", "drops the type; columns of that type go with it"))
            elif kind == "drop_view" and qualify(obj) in self.facts.views:
                rollback = _q("CREATE VIEW {} AS ", _ident(qualify(obj))) + self.facts.views[qualify(obj)]
            elif kind == "drop_extension":
                hazards.append(self.hazard("EXTENSION_CHANGE", "drops an extension and the objects that use it"))
        if kind == "alter_extension" and isinstance(node, ast.AlterExtensionStmt) and _new_version(node) is not None:
            hazards.append(self.hazard("EXTENSION_CHANGE", f"updates the extension to version {_new_version(node)}: runs "
                                       "the extension's own update script, which may change or rewrite its objects and "
                                       "what uses them; extensions are seldom downgraded"))
        elif kind in ("create_extension", "alter_extension"):
            hazards.append(self.hazard("EXTENSION_CHANGE", "extensions change server-wide behaviour and need privileges"))
            if kind == "create_extension":
                rollback = _q("DROP EXTENSION IF EXISTS {}", sql.Identifier(obj))
        if kind in ("grant", "revoke", "create_policy", "alter_policy", "drop_policy", "alter_default_privileges",
                    "grant_role"):
            hazards.append(self.hazard("AUTHZ_CHANGE", "changes who may read or write what"))
        if kind == "create_enum" and isinstance(node, ast.CreateEnumStmt):
            old = self.facts.enums.get(qualify(obj))
            new = tuple(str(v.sval) for v in node.vals or ())
            if old is not None and set(old) - set(new):
                removed = ", ".join(sorted(set(old) - set(new)))
                hazards.append(self.hazard("DATA_LOSS", f"the recreated type drops value(s) {removed}: rows holding them "
                                                        "cannot convert"))
        simple = {
            "create_table": "DROP TABLE {}", "create_view": "DROP VIEW {}", "create_materialized_view": "DROP MATERIALIZED VIEW {}",
            # IF EXISTS: a sequence OWNED BY a column of a table this plan creates goes with that table's DROP
            "create_enum": "DROP TYPE {}", "create_sequence": "DROP SEQUENCE IF EXISTS {}", "create_schema": "DROP SCHEMA {}",
            "create_domain": "DROP DOMAIN {}", "create_composite_type": "DROP TYPE {}",
        }
        if kind in simple and obj and "," not in obj and not (kind == "create_enum" and qualify(obj) in self.facts.enums):
            rollback = _q(simple[kind], sql.Identifier(*d.identity) if d.identity else _ident(obj))
        if kind == "replace_view" and qualify(obj) in self.facts.views:
            rollback = _q("CREATE OR REPLACE VIEW {} AS ", _ident(qualify(obj))) + self.facts.views[qualify(obj)]
        elif kind == "replace_view":
            rollback = _q("DROP VIEW IF EXISTS {}", _ident(qualify(obj)))
        if isinstance(node, ast.CreateFunctionStmt) and qualify(obj) not in self.facts.routines:
            rollback = _drop_routine(node)
        if kind == "create_policy" and isinstance(node, ast.CreatePolicyStmt) and node.table is not None:
            rollback = _q("DROP POLICY IF EXISTS {} ON {}", sql.Identifier(str(node.policy_name)),
                          sql.Identifier(*_relation_parts(node.table)))
        if kind == "create_trigger" and isinstance(node, ast.CreateTrigStmt):
            rollback = _q("DROP TRIGGER IF EXISTS {} ON {}", sql.Identifier(str(node.trigname)), _ident(_rv(node.relation)))
        if kind == "set":
            rollback = ""
        return replace(d, hazards=tuple(hazards), rollback_sql=rollback, reversible=rollback is not None)


def _relation_parts(rv: ast.RangeVar) -> tuple[str, str]:
    return str(rv.schemaname or "public"), str(rv.relname)


def _drop_routine(node: ast.CreateFunctionStmt) -> str:
    """DROP FUNCTION/PROCEDURE with the routine's identity arguments spelled as pg_get_function_identity_arguments
    spells them: modes, names and types without typmods or defaults, OUT arguments too (DROP FUNCTION ignores them,
    DROP PROCEDURE needs them), not RETURNS TABLE's columns. Other types are spelled as in the CREATE, so they resolve
    the same way."""
    kept = []
    for param in node.parameters or ():
        if not isinstance(param, ast.FunctionParameter) or param.mode == enums.FunctionParameterMode.FUNC_PARAM_TABLE:
            continue
        prefix = _MODE_WORDS.get(str(param.mode), "IN " if node.is_procedure else "")  # a procedure's marks them all
        named = f"{maybe_double_quote_name(str(param.name))} " if param.name else ""
        kept.append(prefix + named + (_identity_type(param.argType) if param.argType is not None else ""))
    parts = [str(getattr(n, "sval", "")) for n in node.funcname or ()]
    name = sql.Identifier(*(["public", *parts] if len(parts) == 1 else parts))
    return _q("DROP {} {}(", sql.SQL("PROCEDURE" if node.is_procedure else "FUNCTION"), name) + ", ".join(kept) + ")"


_MODE_WORDS = {"o": "OUT ", "b": "INOUT ", "v": "VARIADIC "}
# format_type's names for the built-in types the SQL grammar spells otherwise
_FORMAT_TYPE = {
    "int2": "smallint", "int4": "integer", "int8": "bigint", "float4": "real", "float8": "double precision",
    "bool": "boolean", "bpchar": "character", "varchar": "character varying", "varbit": "bit varying",
    "numeric": "numeric", "bit": "bit", "interval": "interval", "time": "time without time zone",
    "timetz": "time with time zone", "timestamp": "timestamp without time zone", "timestamptz": "timestamp with time zone",
}


def _identity_type(type_name: ast.TypeName) -> str:
    """An argument's type without its typmod (a signature has none), as format_type prints it."""
    names = [str(getattr(n, "sval", "")) for n in type_name.names or ()]
    arrays = "[]" * len(type_name.arrayBounds or ())
    if len(names) == 2 and names[0] == "pg_catalog" and names[1] in _FORMAT_TYPE and not type_name.pct_type:
        return ("SETOF " if type_name.setof else "") + _FORMAT_TYPE[names[1]] + arrays
    return _deparse(ast.TypeName(names=type_name.names, setof=type_name.setof, pct_type=type_name.pct_type,
                                 arrayBounds=type_name.arrayBounds))


def _attached_index(node: ast.AlterTableStmt) -> str:
    """The index that ALTER INDEX ... ATTACH PARTITION attaches, or ""."""
    if enums.ObjectType(int(node.objtype or 0)) is not enums.ObjectType.OBJECT_INDEX:
        return ""
    for cmd in node.cmds or ():
        if (isinstance(cmd, ast.AlterTableCmd) and enums.AlterTableType(int(cmd.subtype or 0)) is enums.AlterTableType.AT_AttachPartition
                and isinstance(cmd.def_, ast.PartitionCmd) and cmd.def_.name is not None):
            return _rv(cmd.def_.name)
    return ""


def _lighter_lock(cmd: ast.AlterTableCmd) -> bool:
    """ALTER TABLE forms that take less than ACCESS EXCLUSIVE: VALIDATE CONSTRAINT (SHARE UPDATE
    EXCLUSIVE) and adding a foreign key (SHARE ROW EXCLUSIVE: reads go on)."""
    subtype = enums.AlterTableType(int(cmd.subtype or 0))
    if subtype is enums.AlterTableType.AT_ValidateConstraint:
        return True
    return (subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint)
            and enums.ConstrType(int(cmd.def_.contype or 0)) is enums.ConstrType.CONSTR_FOREIGN)


def _index_columns(node: ast.IndexStmt) -> set[str]:
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


def _alters_type_to(node: ast.AlterTableStmt, enum_name: str) -> bool:
    cmds = [c for c in node.cmds or () if isinstance(c, ast.AlterTableCmd)]
    return bool(cmds) and all(
        enums.AlterTableType(int(c.subtype or 0)) is enums.AlterTableType.AT_AlterColumnType
        and isinstance(c.def_, ast.ColumnDef) and c.def_.typeName is not None
        and qualify(_names(c.def_.typeName.names)) == enum_name
        for c in cmds
    )


def _is_extension(old: tuple[str, ...], new: tuple[str, ...]) -> bool:
    """True when ``new`` keeps every old label in the same order and only adds."""
    it = iter(new)
    return all(label in it for label in old) and len(new) > len(old)


def _add_value_statements(enum_name: str, old: tuple[str, ...], new: tuple[str, ...]) -> list[str]:
    out = []
    present = list(old)
    for i, label in enumerate(new):
        if label in present:
            continue
        following = next((n for n in new[i + 1:] if n in present), None)
        if following is not None:
            out.append(_q("ALTER TYPE {} ADD VALUE {} BEFORE {}", _ident(enum_name), sql.Literal(label), sql.Literal(following)))
            present.insert(present.index(following), label)
        else:
            out.append(_q("ALTER TYPE {} ADD VALUE {}", _ident(enum_name), sql.Literal(label)))
            present.append(label)
    return out


def _coerces_length(target: ast.TypeName) -> bool:
    """A binary-coercible change to another type that gives a length (text -> varchar(n), varchar -> char(n)) still
    runs the target's length coercion on every value: PostgreSQL rewrites the table (only the same type widened
    keeps it, see ``_widens``)."""
    return bool(target.typmods)


def _widens(current_type: str, mods: list[int | None]) -> bool:
    """varchar(n) -> varchar(m >= n) and numeric(p, s) -> numeric(p' >= p, s) keep the stored data."""
    if "(" not in current_type or not mods or mods[0] is None:
        return False
    try:
        current = [int(x) for x in current_type[current_type.index("(") + 1: current_type.index(")")].split(",")]
    except ValueError:
        return False
    if current_type.startswith(("character varying", "varchar", "bit varying")):
        return mods[0] >= current[0]
    if current_type.startswith("numeric") and len(current) == 2 and len(mods) == 2 and mods[1] is not None:
        return mods[0] - mods[1] >= current[0] - current[1] and mods[1] == current[1]
    return False


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _timeouts(settings: SafetySettings, kind: str) -> tuple[str, str]:
    override = settings.timeouts.get(kind, {})
    return override.get("lock_timeout", settings.lock_timeout), override.get("statement_timeout", settings.statement_timeout)


def compile_steps(
    changes: Sequence[Change],
    facts: LiveFacts | None = None,
    settings: SafetySettings | None = None,
    *,
    engine: str = "migra",
) -> tuple[Step, ...]:
    """Steps in order, numbered, in phases; see the module docstring."""
    facts = facts or _EMPTY_FACTS
    settings = settings or SafetySettings()
    compiled = [d for d in _Compiler(facts, settings, engine).compile(changes) if d.sql]
    drafts = sorted(compiled, key=lambda d: d.stage)  # stable: the engine's order within a stage
    budget = _lock_budget(facts.lock_table)
    steps: list[Step] = []
    phase = 0
    previous: _Draft | None = None
    held: set[str] = set()  # what the current transaction locks, roughly
    pieces: list[list[int]] = []  # per transaction the compiler would make: the first step of each piece of it
    for i, d in enumerate(drafts, 1):
        alone = not d.transactional or d.isolated
        locks = _locks(d)
        if previous is None or alone or not previous.transactional or previous.isolated or previous.stage != d.stage:
            phase += 1
            held = set()
            pieces.append([i])
        elif budget is not None and len(held) + len(locks - held) > budget:
            phase += 1
            held = set()
            pieces[-1].append(i)
        held |= locks
        lock_timeout, statement_timeout = _timeouts(settings, d.kind)
        steps.append(Step(
            index=i, sql=d.sql, kind=d.kind, object=d.object, tables=d.tables, transactional=d.transactional,
            phase=phase, hazards=d.hazards, rollback_sql=d.rollback_sql, reversible=d.reversible,
            lock_timeout=lock_timeout, statement_timeout=statement_timeout, original_sql=d.original_sql,
            identity=d.identity,
        ))
        previous = d
    split = [p for p in pieces if len(p) > 1]
    if not split or facts.lock_table is None:
        return tuple(steps)
    return tuple(_split_hazards(steps, split, facts.lock_table))


_LOCK_SHARE = 4  # a transaction takes at most a quarter of the server's lock table: other sessions need theirs


def _lock_budget(table: LockTable | None) -> int | None:
    return None if table is None else max(table.slots // _LOCK_SHARE, 1)


def _locks(d: _Draft) -> set[str]:
    """What a step locks, roughly: the tables it names, the object it makes or changes (an index, a
    constraint, a function, a trigger), a new table's TOAST table and its index, and the index a foreign key
    checks. Each is one entry of the shared lock table, held until the transaction ends (measured on
    GitLab's schema: within 10% of pg_locks)."""
    found = set(d.tables)
    if d.object:
        found.add(d.object)
    if d.kind == "create_table":
        found.update((f"{d.object} (toast)", f"{d.object} (toast index)"))
    elif d.kind == "add_foreign_key" and len(d.tables) > 1:
        found.add(f"{d.tables[1]} (key index)")
    return found


def _split_hazards(steps: list[Step], split: list[list[int]], table: LockTable) -> list[Step]:
    """Name each transaction of a split one on its first step: a failure leaves the earlier ones committed."""
    firsts: dict[int, Hazard] = {}
    last_of_phase = {s.phase: s.index for s in steps}
    for starts in split:
        end = last_of_phase[steps[starts[-1] - 1].phase]
        for n, start in enumerate(starts, 1):
            firsts[start] = Hazard("SPLIT_TRANSACTION", (
                f"not atomic: steps {starts[0]}-{end} run as {len(starts)} transactions (transaction {n} of "
                f"{len(starts)} begins here) because they lock more objects than a quarter of the target's lock "
                f"table ({table.slots:,} locks: max_locks_per_transaction {table.max_locks_per_transaction} x "
                f"(max_connections {table.max_connections} + max_prepared_transactions "
                f"{table.max_prepared_transactions})); a failure leaves the earlier transactions committed"))
    return [replace(s, hazards=(*s.hazards, firsts[s.index])) if s.index in firsts else s for s in steps]


_EMPTY_FACTS = LiveFacts(
    tables={}, partitioned=frozenset(), columns={}, indexes={}, enums={}, views={}, volatile_functions=frozenset(),
    binary_coercible=frozenset(), type_oids={},
)
