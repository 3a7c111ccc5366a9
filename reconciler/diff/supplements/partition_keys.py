"""A partition's own keys where its parent has an index or key of the same columns.

PostgreSQL pairs a partitioned table's index with one of each partition's at three moments: CREATE TABLE
... PARTITION OF clones every index of the parent; ATTACH PARTITION adopts a matching index the table
already has (cloning only where it has none); ADD CONSTRAINT ... UNIQUE or PRIMARY KEY on the parent adopts
a matching constraint of each partition. Which index ends up paired therefore depends on the order the
desired files made things in, and migra's fixed order gets it wrong in two ways:

- a new partition whose own primary key or unique constraint is, in the desired schema, the partition of
  an index the parent already has in live. PARTITION OF would clone the parent's index first, and the
  partition's key could never be attached. The partition is made as a plain table of the parent's shape,
  given its keys, then attached (``attach_with_own_keys``), which is also the lighter lock on the parent;
- a partition's own primary key or unique constraint that, in the desired schema, stands beside the key
  its parent's constraint cloned. Added before the parent's constraint, it would be adopted in place of
  the clone, so it waits until the parent's constraint is made (``own_keys_after_parent_keys``).
"""

from __future__ import annotations

from psycopg import sql

from ..base import Change
from . import Context, change
from .partitions import CONSTRAINT_ADDS, INDEX_CREATES, INDEX_DROPS, UNIQUE_ADDS, Side, objects, read_side

_LIKE_OPTIONS = "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING STORAGE"

_SHAPE = """
SELECT pg_get_expr(c.relpartbound, c.oid), CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
       current_setting('server_version_num')::int
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s"""


def partition_keys(context: Context, changes: list[Change]) -> list[Change]:
    """Both orderings, read from the catalogs only when the plan makes a partition, or a key by ADD CONSTRAINT with
    its definition (how ``partitions`` makes a partitioned table's; migra makes other tables' keys USING INDEX): a
    plan adding keys to plain tables does not pay for reading every constraint and index of a big schema again."""
    if not any((c.kind == "create_table" and " partition of " in c.sql.lower())
               or (c.kind in UNIQUE_ADDS and "using index" not in c.sql.lower()) for c in changes):
        return changes
    desired = read_side(context, "desired")
    if not desired.partitioned:
        return changes
    out = attach_with_own_keys(context, read_side(context, "live"), desired, changes)
    return own_keys_after_parent_keys(desired, out)


def own_keys_after_parent_keys(desired: Side, changes: list[Change]) -> list[Change]:
    """Move a partition's own (not derived) primary key or unique constraint after every ADD CONSTRAINT
    that makes a key on one of its ancestors, which would otherwise adopt it."""
    recursing: dict[str, int] = {}  # partitioned table -> position of its last key made by ADD CONSTRAINT
    for i, c in enumerate(changes):
        table = desired.constraint_table.get(c.object)
        if c.kind in UNIQUE_ADDS and table in desired.partitioned and "using index" not in c.sql.lower():
            recursing[table] = i
    if not recursing:
        return changes
    moved: dict[int, list[Change]] = {}  # position -> the constraints that follow it
    keep: list[tuple[int, Change]] = []
    for i, c in enumerate(changes):
        table = desired.constraint_table.get(c.object)
        if c.kind in UNIQUE_ADDS and table is not None and c.object not in desired.constraint_parent:
            later = max((recursing[a] for a in desired.ancestors(desired.table_parent, table) if a in recursing), default=-1)
            if later > i:
                moved.setdefault(later, []).append(c)
                continue
        keep.append((i, c))
    return [x for i, c in keep for x in (c, *moved.get(i, ()))]


def attach_with_own_keys(context: Context, live: Side, desired: Side, changes: list[Change]) -> list[Change]:
    """Make a new partition as a plain table, give it the keys the desired schema pairs with its parent's
    existing indexes, and then ATTACH PARTITION, which adopts them (migra's ALTER INDEX ... ATTACH PARTITION
    for them goes); the partition's other indexes and keys follow the attach."""
    created = objects(changes, INDEX_CREATES)
    dropped = objects(changes, INDEX_DROPS)
    out = changes
    for c in changes:
        if c.kind != "create_table" or " partition of " not in c.sql.lower() or c.object not in desired.table_parent:
            continue
        table, parent = c.object, desired.table_parent[c.object]
        own = {index for index, parent_index in desired.index_parent.items()
               if desired.index_table.get(index) == table and index in created
               and parent_index in live.index_table and parent_index not in dropped}
        if own:
            out = _attach(context, desired, out, table, parent, own)
    return out


def _attach(context: Context, desired: Side, changes: list[Change], table: str, parent: str,
            own: set[str]) -> list[Change]:
    schema, name = table.split(".", 1)
    row = context.desired.execute(_SHAPE, (schema, name)).fetchone()
    if row is None or row[0] is None:
        return changes
    bound, partition_key, version = row
    options = _LIKE_OPTIONS + (" INCLUDING COMPRESSION" if version >= 140000 else "")
    create = sql.SQL("CREATE TABLE {} (LIKE {} {})").format(
        sql.Identifier(schema, name), sql.Identifier(*parent.split(".", 1)), sql.SQL(options)).as_string(None)
    if partition_key:
        create += f" PARTITION BY {partition_key}"
    attach = change(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} ").format(
        sql.Identifier(*parent.split(".", 1)), sql.Identifier(schema, name)).as_string(None) + str(bound),
        "attach_partition", table)
    own_constraints = {desired.index_constraint[i] for i in own if i in desired.index_constraint}

    def makes_own(c: Change) -> bool:
        return (c.kind in INDEX_CREATES and c.object in own) or (c.kind in CONSTRAINT_ADDS and c.object in own_constraints)

    start = next(i for i, c in enumerate(changes) if c.kind == "create_table" and c.object == table)
    at = max(i for i, c in enumerate(changes) if makes_own(c))
    before, after = [], []
    for i, c in enumerate(changes):
        if c.kind == "attach_index_partition" and c.object in own:
            continue  # the attach adopts it
        if i == start:
            before.append(Change(sql=create, kind=c.kind, object=c.object, engine=c.engine))
        elif start < i <= at and not makes_own(c) and _on(desired, c) == table:
            after.append(c)  # adopted by the attach otherwise, or needs the table to be a partition
        elif i <= at:
            before.append(c)
    rest = [c for c in changes[at + 1:] if not (c.kind == "attach_index_partition" and c.object in own)]
    return [*before, attach, *after, *rest]


def _on(desired: Side, c: Change) -> str | None:
    """The table an index or constraint statement is on."""
    if c.kind in INDEX_CREATES or c.kind == "attach_index_partition":
        return desired.index_table.get(c.object)
    if c.kind in CONSTRAINT_ADDS:
        return desired.constraint_table.get(c.object)
    return None
