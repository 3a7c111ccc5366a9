"""Partitioned tables: indexes and constraints migra handles as if partitions were plain tables.

PostgreSQL propagates what is declared on a partitioned table to its partitions: an index, a primary
key, a unique, check or foreign key constraint (and row triggers: routines.cloned_triggers). The
partitions' copies are *derived*: an index that is a partition of the parent's index (``pg_inherits``),
a constraint with ``conparentid`` set or inherited only (``coninhcount > 0 AND NOT conislocal``); a
foreign key that references a partitioned table has derived copies too, one for each partition it
references. migra sees the copies as objects of their own, so it creates and drops them beside the
parent's statement that already does: "already exists", "does not exist", "cannot drop ... because
... requires it". ``mend_partitions`` removes those statements, makes primary keys and unique
constraints of partitioned tables in the one way PostgreSQL accepts, attaches the partitions' indexes
to their parent's, mends partitions' own NOT NULL, and refuses clearly what cannot change in place
(partitioned or not, the partition key, a partition's bounds or parent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from psycopg import sql

from ...errors import ReconcilerError
from ..base import Change
from . import Context, change, managed
from .rebuilds import SHAPES, rebuilt_families

INDEX_CREATES = ("create_index", "create_index_concurrently")
INDEX_DROPS = ("drop_index", "drop_index_concurrently")
CONSTRAINT_ADDS = ("add_primary_key", "add_unique_constraint", "add_check_constraint", "add_foreign_key",
                    "add_exclusion_constraint", "add_constraint")
UNIQUE_ADDS = ("add_primary_key", "add_unique_constraint")


@dataclass(frozen=True)
class Side:
    """One database's derived objects, each mapped to the object it derives from (``schema.table.name``
    for constraints, ``schema.name`` for indexes), and what backs what."""

    constraint_parent: dict[str, str]
    constraint_table: dict[str, str]  # every constraint -> its table
    constraint_type: dict[str, str]
    constraint_index: dict[str, str]  # constraint -> the index that enforces it
    index_parent: dict[str, str]
    index_table: dict[str, str]  # every index -> its table
    index_constraint: dict[str, str]  # index -> the constraint it enforces
    table_parent: dict[str, str]  # partition -> partitioned table
    partitioned: frozenset[str]
    tables: frozenset[str]

    def ancestors(self, mapping: dict[str, str], key: str) -> list[str]:
        found: list[str] = []
        while key in mapping and mapping[key] not in found:
            key = mapping[key]
            found.append(key)
        return found


_CONSTRAINTS = """
SELECT n.nspname || '.' || t.relname || '.' || c.conname, n.nspname || '.' || t.relname, c.contype::text,
       CASE WHEN c.conparentid <> 0 THEN pn.nspname || '.' || pt.relname || '.' || p.conname
            WHEN c.coninhcount > 0 AND NOT c.conislocal THEN
                 (SELECT inn.nspname || '.' || it.relname || '.' || c.conname
                  FROM pg_inherits i JOIN pg_class it ON it.oid = i.inhparent
                  JOIN pg_namespace inn ON inn.oid = it.relnamespace
                  WHERE i.inhrelid = c.conrelid ORDER BY i.inhseqno LIMIT 1) END,
       CASE WHEN c.conindid <> 0 THEN xn.nspname || '.' || x.relname END
FROM pg_constraint c
JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
LEFT JOIN pg_constraint p ON p.oid = c.conparentid
LEFT JOIN pg_class pt ON pt.oid = p.conrelid LEFT JOIN pg_namespace pn ON pn.oid = pt.relnamespace
LEFT JOIN pg_class x ON x.oid = c.conindid LEFT JOIN pg_namespace xn ON xn.oid = x.relnamespace
WHERE c.contype <> 'n' AND """ + managed("n")

_INDEXES = """
SELECT xn.nspname || '.' || x.relname, n.nspname || '.' || t.relname,
       (SELECT pn.nspname || '.' || p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE i.inhrelid = x.oid LIMIT 1)
FROM pg_index ix JOIN pg_class x ON x.oid = ix.indexrelid JOIN pg_namespace xn ON xn.oid = x.relnamespace
JOIN pg_class t ON t.oid = ix.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE """ + managed("n")

_TABLES = """
SELECT n.nspname || '.' || c.relname, c.relkind::text,
       (SELECT pn.nspname || '.' || p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE i.inhrelid = c.oid AND c.relispartition LIMIT 1)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND """ + managed("n")


def read_side(context: Context, side: str) -> Side:
    constraint_parent: dict[str, str] = {}
    constraint_table: dict[str, str] = {}
    constraint_type: dict[str, str] = {}
    constraint_index: dict[str, str] = {}
    index_constraint: dict[str, str] = {}
    for key, table, contype, parent, index in context.rows(side, _CONSTRAINTS):
        constraint_table[key] = table
        constraint_type[key] = contype
        if parent:
            constraint_parent[key] = parent
        if index and contype in ("p", "u", "x"):
            constraint_index[key] = index
            index_constraint[index] = key
    index_parent: dict[str, str] = {}
    index_table: dict[str, str] = {}
    for key, table, parent in context.rows(side, _INDEXES):
        index_table[key] = table
        if parent:
            index_parent[key] = parent
    table_parent: dict[str, str] = {}
    partitioned: set[str] = set()
    tables: set[str] = set()
    for key, relkind, parent in context.rows(side, _TABLES):
        tables.add(key)
        if relkind == "p":
            partitioned.add(key)
        if parent:
            table_parent[key] = parent
    return Side(
        constraint_parent=constraint_parent, constraint_table=constraint_table, constraint_type=constraint_type,
        constraint_index=constraint_index, index_parent=index_parent, index_table=index_table,
        index_constraint=index_constraint,
        table_parent=table_parent, partitioned=frozenset(partitioned), tables=frozenset(tables),
    )


def objects(changes: Iterable[Change], kinds: Iterable[str]) -> set[str]:
    wanted = set(kinds)
    return {part for c in changes if c.kind in wanted for part in c.object.split(", ")}


def mend_partitions(context: Context, changes: list[Change]) -> list[Change]:
    """Every partition rewriter, in order."""
    refuse_partitioning_changes(context)
    live, desired = read_side(context, "live"), read_side(context, "desired")
    if not (live.partitioned or desired.partitioned or live.constraint_parent or desired.constraint_parent):
        return changes
    out = partitions_after_parents(desired, changes)
    out = foreign_keys_dropped_first(live, out)
    out = skip_derived_drops(context, live, desired, out)
    out = skip_derived_creates(live, desired, out)
    out = attach_partition_indexes(live, desired, out)
    out = partitioned_unique_constraints(context, live, desired, out)
    return partition_not_null(context, out)


def partitions_after_parents(desired: Side, changes: list[Change]) -> list[Change]:
    """migra orders CREATE TABLE by schema and name, so a partition in another schema (or named before
    its parent) can come before the partitioned table it is a partition of: move each partition's
    creation right after its parent's (keeping the partitions' own order; nested partitions follow)."""
    created = {c.object for c in changes if c.kind == "create_table"}
    waiting: dict[str, list[Change]] = {}  # parent created later -> its partitions' creates
    seen: set[str] = set()
    out: list[Change] = []

    def emit(c: Change) -> None:
        out.append(c)
        if c.kind == "create_table":
            seen.add(c.object)
            for child in waiting.pop(c.object, ()):
                emit(child)

    for c in changes:
        parent = desired.table_parent.get(c.object) if c.kind == "create_table" else None
        if parent is not None and parent in created and parent not in seen:
            waiting.setdefault(parent, []).append(c)
        else:
            emit(c)
    return out  # every waiting partition's parent is created later in the list, which emptied ``waiting``


def foreign_keys_dropped_first(live: Side, changes: list[Change]) -> list[Change]:
    """A foreign key to a partitioned table depends on its unique constraint or index through every
    partition: drop foreign keys before the other constraints and indexes migra drops beside them."""
    fks = [c for c in changes if c.kind == "drop_constraint" and live.constraint_type.get(c.object) == "f"]
    out: list[Change] = []
    for c in changes:
        if c.kind in ("drop_constraint", *INDEX_DROPS) and fks:
            out.extend(fks)
            fks = []
        if not (c.kind == "drop_constraint" and live.constraint_type.get(c.object) == "f"):
            out.append(c)
    return out


def skip_derived_drops(context: Context, live: Side, desired: Side, changes: list[Change]) -> list[Change]:
    """A derived object goes with the object it derives from: drop the statements that drop it again
    (they fail, or stand in the way), and create again the partitions' indexes the desired schema keeps
    as indexes of their own."""
    dropped_tables = objects(changes, ("drop_table",))
    dropped_constraints = objects(changes, ("drop_constraint",))
    dropped_indexes = objects(changes, INDEX_DROPS)

    def constraint_goes(key: str) -> bool:
        return key in dropped_constraints or live.constraint_table.get(key) in dropped_tables

    def index_goes(key: str) -> bool:
        return (key in dropped_indexes or live.index_table.get(key) in dropped_tables
                or (key in live.index_constraint and constraint_goes(live.index_constraint[key])))

    def goes_with_parent(mapping: dict[str, str], key: str, goes: Callable[[str], bool]) -> bool:
        return any(goes(a) for a in live.ancestors(mapping, key))

    def dropped_by(key: str, kinds: tuple[str, ...]) -> Change | None:
        return next((c for c in changes if c.kind in kinds and key in c.object.split(", ")), None)

    def dropping_statement(index: str) -> Change | None:
        """The statement that drops a derived index's ancestor (its index, constraint or table)."""
        for a in live.ancestors(live.index_parent, index):
            found = (dropped_by(a, INDEX_DROPS) or dropped_by(live.index_table.get(a, ""), ("drop_table",))
                     or dropped_by(live.index_constraint.get(a, ""), ("drop_constraint",)))
            if found is not None:
                return found
        return None

    created = objects(changes, INDEX_CREATES)
    after: dict[int, list[Change]] = {}  # id of a dropping statement -> what must follow it
    out: list[Change] = []
    for c in changes:
        if c.kind == "drop_constraint" and goes_with_parent(live.constraint_parent, c.object, constraint_goes):
            continue
        if c.kind == "drop_table" and c.object in live.table_parent and any(
                a in dropped_tables for a in live.ancestors(live.table_parent, c.object)):
            continue  # dropping the partitioned table drops its partitions
        if c.kind in INDEX_DROPS and goes_with_parent(live.index_parent, c.object, index_goes):
            dropper = dropping_statement(c.object)
            if c.object in created and dropper is not None:  # so the compiler knows the name is free again
                after.setdefault(id(dropper), []).append(_drop_if_exists(c.object))
            continue
        out.append(c)
    # a partition's index kept on its own in the desired schema, dropped here with its parent's index
    for index, parent in sorted(live.index_parent.items()):
        if (index_goes(parent) and not index_goes(index) and index in desired.index_table
                and desired.index_table[index] == live.index_table[index]
                and desired.index_parent.get(index) != parent and index not in desired.index_constraint
                and index not in created):
            row = context.desired.execute(
                "SELECT pg_get_indexdef(x.oid) FROM pg_class x JOIN pg_namespace n ON n.oid = x.relnamespace "
                "WHERE n.nspname || '.' || x.relname = %s AND x.relkind = 'i'", (index,)).fetchone()
            dropper = dropping_statement(index)
            if row is not None and dropper is not None:
                after.setdefault(id(dropper), []).extend([_drop_if_exists(index), change(str(row[0]), "create_index", index)])
    if not after:
        return out
    return [x for c in out for x in (c, *after.get(id(c), ()))]


def _drop_if_exists(index: str) -> Change:
    return change(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(*index.split("."))), "drop_index", index)


def skip_derived_creates(live: Side, desired: Side, changes: list[Change]) -> list[Change]:
    """A derived object is made by the statement that makes what it derives from, or by creating or
    attaching the partition: drop migra's statements that make it a second time. A unique index and
    constraint of a partition that exists in live stay: built on the partition first (concurrently), they
    are attached by the parent's new constraint, or to the parent's index."""
    created_indexes = objects(changes, INDEX_CREATES)
    added_constraints = objects(changes, CONSTRAINT_ADDS)
    out: list[Change] = []
    skipped_indexes: set[str] = set()
    skipped_constraints: set[str] = set()
    for c in changes:
        if c.kind in CONSTRAINT_ADDS and c.object in desired.constraint_parent:
            if c.kind in UNIQUE_ADDS and desired.constraint_table.get(c.object) in live.tables:
                out.append(c)
            else:
                skipped_constraints.add(c.object)
                if c.object in desired.constraint_index:
                    skipped_indexes.add(desired.constraint_index[c.object])
            continue
        if c.kind in INDEX_CREATES and c.object in desired.index_parent and (
                desired.index_constraint.get(c.object) not in added_constraints) and not any(
                a in created_indexes or a not in live.index_table for a in desired.ancestors(desired.index_parent, c.object)):
            continue
        out.append(c)
    return [c for c in out if not (c.kind in INDEX_CREATES and c.object in skipped_indexes)
            and not (c.kind == "validate_constraint" and c.object in skipped_constraints)]


def attach_partition_indexes(live: Side, desired: Side, changes: list[Change]) -> list[Change]:
    """migra creates a partitioned table's index ON ONLY the parent and each partition's own index, but
    never attaches them, so the parent index stays INVALID; nor does it see a partition's index that
    the desired schema attaches and live does not. Attach every pair the desired schema has where
    either side is created by this plan, or both exist in live unattached."""
    created = objects(changes, INDEX_CREATES)
    index_at: dict[str, int] = {}  # index -> position of the last statement that creates it
    constraint_at: dict[str, int] = {}  # constraint -> position of the last statement that adds it
    for i, c in enumerate(changes):
        if c.kind in INDEX_CREATES:
            index_at[c.object] = i
        elif c.kind in CONSTRAINT_ADDS:
            constraint_at[c.object] = i
    after: dict[int, list[Change]] = {}  # position of the later of the two creates -> attaches that follow it
    for child, parent in sorted(desired.index_parent.items()):
        if parent in created or child in created or (
                child in live.index_table and parent in live.index_table and live.index_parent.get(child) != parent):
            statement = sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
                sql.Identifier(*parent.split(".", 1)), sql.Identifier(*child.split(".", 1)))
            constraint = desired.index_constraint.get(child)  # a constraint's index attaches once it is one
            position = max(index_at.get(parent, -1), index_at.get(child, -1),
                           constraint_at.get(constraint, -1) if constraint is not None else -1)
            after.setdefault(position, []).append(change(statement, "attach_index_partition", child))
    return [*after.get(-1, ()), *(x for i, c in enumerate(changes) for x in (c, *after.get(i, ())))]


def partitioned_unique_constraints(context: Context, live: Side, desired: Side, changes: list[Change]) -> list[Change]:
    """migra adds a primary key or unique constraint by building its index first (ON ONLY, for a
    partitioned table) and then ADD CONSTRAINT ... USING INDEX, which PostgreSQL refuses on partitioned
    tables. Instead: ADD CONSTRAINT with the constraint's definition, after the partitions' own
    constraints, which it attaches (it builds the index of a partition that has none). A plain index of
    the constraint's name goes first, with its partitions' indexes."""
    targets = [c for c in changes if c.kind in UNIQUE_ADDS and desired.constraint_table.get(c.object) in desired.partitioned
               and "using index" in c.sql.lower()]
    if not targets:
        return changes
    children: dict[str, list[str]] = {}
    for key, parent in desired.constraint_parent.items():
        children.setdefault(parent, []).append(key)
    dropped_indexes = objects(changes, INDEX_DROPS)
    last_unique_add = {c.object: i for i, c in enumerate(changes) if c.kind in UNIQUE_ADDS}
    replaced: dict[int, list[Change]] = {}  # id of migra's statement -> what stands in its place ([] when it goes)
    follows: dict[str, list[Change]] = {}  # constraint -> the new statements placed right after its own
    attach_heads: dict[str, str] = {}  # "ALTER INDEX <parent index> ATTACH" -> the parent index (attaches that go)
    gone_indexes: set[str] = set()  # indexes whose ON ONLY creates go
    for c in targets:
        table = desired.constraint_table[c.object]
        schema, name = table.split(".", 1)[0], c.object[len(table) + 1:]
        row = context.desired.execute(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname || '.' || t.relname = %s AND c.conname = %s",
            (table, name)).fetchone()
        if row is None:
            continue
        index = desired.constraint_index.get(c.object, f"{schema}.{name}")
        new = [change(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(
            sql.Identifier(*table.split(".", 1)), sql.Identifier(name)).as_string(None) + str(row[0]), c.kind, c.object)]
        if live.index_table.get(index) == table and index not in live.index_constraint and index not in dropped_indexes:
            new.insert(0, _drop_if_exists(index))
        gone_indexes.add(index)
        attach_heads[_attach_head(index)] = index
        derived, pending = [], list(children.get(c.object, ()))
        while pending:
            key = pending.pop()
            derived.append(key)
            pending.extend(children.get(key, ()))
        anchor = max((last_unique_add[k] for k in derived if k in last_unique_add), default=None)
        if anchor is None:  # in its own place
            replaced[id(c)] = new
        else:  # after the partitions' constraints it attaches
            replaced[id(c)] = []
            follows.setdefault(changes[anchor].object, []).extend(new)
    out: list[Change] = []

    def emit(c: Change) -> None:
        out.append(c)
        if c.kind in UNIQUE_ADDS:
            for x in follows.pop(c.object, ()):
                emit(x)

    for c in changes:
        if id(c) in replaced:
            for x in replaced[id(c)]:
                emit(x)
        elif not ((c.kind in INDEX_CREATES and c.object in gone_indexes)
                  or (c.kind == "attach_index_partition" and c.sql[:c.sql.find(" ATTACH ") + 7] in attach_heads)):
            emit(c)
    return out


def _attach_head(parent_index: str) -> str:
    """How the statement that attaches a partition's index to ``parent_index`` begins."""
    return sql.SQL("ALTER INDEX {} ATTACH").format(sql.Identifier(*parent_index.split(".", 1))).as_string(None)


_PARTITION_COLUMNS = """
SELECT n.nspname || '.' || c.relname, a.attname, a.attnotnull, pa.attnotnull
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_inherits i ON i.inhrelid = c.oid
LEFT JOIN pg_attribute pa ON pa.attrelid = i.inhparent AND pa.attname = a.attname AND NOT pa.attisdropped
WHERE c.relispartition AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND """ + managed("n")


def partition_not_null(context: Context, changes: list[Change]) -> list[Change]:
    """migra leaves the columns of partitions alone, but a partition's column may be NOT NULL on its own
    (its primary key's, or declared): set or drop that where live (or, for a partition the plan creates, its
    parent) and desired differ and the parent's column does not decide it, after the statements that drop the
    constraints needing it."""
    live = {(t, col): (nn, parent) for t, col, nn, parent in context.rows("live", _PARTITION_COLUMNS)}
    desired = {(t, col): (nn, parent) for t, col, nn, parent in context.rows("desired", _PARTITION_COLUMNS)}
    dropped_tables = objects(changes, ("drop_table",))
    planned = objects(changes, ("set_not_null", "drop_not_null"))
    new: list[Change] = []
    for (table, column), (want, parent_wants) in sorted(desired.items()):
        if table in dropped_tables:
            continue
        # a partition the plan creates (PARTITION OF) starts with its parent's NOT NULLs
        have = live[(table, column)][0] if (table, column) in live else bool(parent_wants)
        if have == want or (want and parent_wants):  # the parent's SET NOT NULL reaches the partition
            continue
        if f"{table}.{column}" in planned:
            continue
        verb = sql.SQL("SET NOT NULL" if want else "DROP NOT NULL")
        statement = sql.SQL("ALTER TABLE {} ALTER COLUMN {} {}").format(
            sql.Identifier(*table.split(".", 1)), sql.Identifier(column), verb)
        new.append(change(statement, "set_not_null" if want else "drop_not_null", f"{table}.{column}"))
    return [*changes, *new]




def refuse_partitioning_changes(context: Context) -> None:
    """What PostgreSQL cannot change on a table in place: whether it is partitioned, its partition key,
    a partition's bounds or parent. Refuse clearly, naming the table and what changes, rather than
    dropping the table and its rows."""
    live, desired = context.keyed(SHAPES)
    problems: list[str] = []
    rebuilt = rebuilt_families(context)
    for table in sorted((live.keys() & desired.keys()) - rebuilt):
        (kind, key, bound, parent), (kind2, key2, bound2, parent2) = live[table], desired[table]
        if kind != kind2:
            was, becomes = ("partitioned", "a plain table") if kind == "p" else ("a plain table", "partitioned")
            problems.append(f"table {table} is {was} in live and {becomes} in the desired schema (a table cannot be "
                            "converted in place: create the new table beside it, move the rows, then swap names)")
        elif key != key2:
            problems.append(f"partitioned table {table} changes its partition key from {key} to {key2} (a partition "
                            "key cannot be changed in place: create a new partitioned table and move the rows)")
        if parent != parent2:
            if parent and parent2:
                problems.append(f"partition {table} moves from {parent} to {parent2} (DETACH PARTITION, then ATTACH "
                                "PARTITION by hand)")
            elif parent2:
                problems.append(f"table {table} becomes a partition of {parent2} {bound2} (ATTACH PARTITION by hand: "
                                "it checks every row under lock)")
            else:
                problems.append(f"partition {table} of {parent} becomes a table of its own (DETACH PARTITION "
                                "[CONCURRENTLY] by hand)")
        elif bound != bound2:
            problems.append(f"partition {table} of {parent} changes its bounds from {bound} to {bound2} (DETACH "
                            "PARTITION, then ATTACH PARTITION with the new bounds by hand: it checks every row)")
    if problems:
        raise ReconcilerError("cannot change partitioning in place: " + "; ".join(problems))
