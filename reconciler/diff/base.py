"""The diff engine interface: two databases in, ordered changes out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Change:
    """One SQL statement that moves the live database towards the desired one."""

    sql: str
    kind: str  # e.g. create_table, add_column, drop_index (see diff.classify)
    object: str  # the object it acts on, schema-qualified where it has a schema
    engine: str
    rebuild: Rebuild | None = None  # kind rebuild_table: what the table is built again as


@dataclass(frozen=True)
class Rebuild:
    """A table PostgreSQL cannot change in place (made partitioned or plain, a new partition key, logged or unlogged),
    to be built again beside the old one from the desired schema's definition (diff/supplements/rebuilds.py). The
    statements name the final names; the safety compiler (safety/shadow_table.py) decides what runs where, and under
    which names until the swap."""

    table: str  # 'schema.table'
    why: str  # what changes, said in the plan: "becomes partitioned by RANGE (created_at)"
    key: tuple[str, ...]  # live's primary key columns (rows are matched by them); () when it has none
    columns: tuple[str, ...]  # the columns copied: live's, which the desired table has too (not generated there)
    sources: tuple[str, ...]  # the live tables that hold the rows: the table, or its leaf partitions
    create: str  # CREATE TABLE with its columns and constraints (and PARTITION BY)
    new_key: tuple[str, ...] = ()  # the desired table's primary key (a partitioned one's holds its partition key)
    partitions: tuple[str, ...] = ()  # CREATE TABLE ... PARTITION OF, each after its parent
    keys: tuple[str, ...] = ()  # ALTER TABLE ... ADD CONSTRAINT: its primary key, unique and exclusion constraints
    indexes: tuple[str, ...] = ()  # CREATE INDEX of the table's and its partitions' own indexes
    comments: tuple[str, ...] = ()
    grants: tuple[str, ...] = ()  # the table's grants (live's, unless the plan manages privileges)
    references: tuple[tuple[str, str, str], ...] = ()  # (table, constraint, definition): foreign keys to it
    sequences: tuple[tuple[str, str], ...] = ()  # ('schema.sequence', column): sequences its columns own
    # (column, live's 'schema.sequence'): its identity columns, whose new sequences go on from the old ones at the swap
    identities: tuple[tuple[str, str], ...] = ()
    triggers: tuple[str, ...] = ()  # CREATE TRIGGER: its own, made at the swap (not firing on the rows copied)
    views: tuple[str, ...] = ()  # CREATE OR REPLACE VIEW: the views that read it, made again at the swap
    renamed: tuple[str, ...] = ()  # 'schema.index': the old table's and its partitions', renamed away
    retired: tuple[str, ...] = ()  # 'schema.table': the old table's partitions, renamed away at the swap
    # the diff engine's own statements, where they do it in place, rewriting under lock (SET LOGGED, a stored
    # generated column added): a table too small to build again takes them, as any plan would
    original: tuple[Change, ...] = ()
    # 'schema.table': the table a held contract kept, in step, that is the desired one: swapped back, not built
    kept: str | None = None
    kept_indexes: tuple[str, ...] = ()  # its indexes, under the names the rebuild gave them

    @property
    def tag(self) -> str:
        """The helpers' names' suffix: the same for the same rebuild in every plan (a run stopped part-way is gone on
        from), another for another definition."""
        text = "\n".join([self.table, self.create, *self.partitions, *self.keys, *self.indexes])
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def shadow_schema(self) -> str:
        """Where the new table is built under its final names (and its partitions, with the names their indexes
        take), until the swap moves them to the table's schema."""
        return f"reconciler_shadow_{self.tag}"


class DiffEngine(Protocol):
    """Anything that can say, as SQL, how to turn ``live`` into ``desired``."""

    name: str

    def diff(self, live_dsn: str, desired_dsn: str, *, exclude_schemas: tuple[str, ...]) -> list[Change]:
        """Ordered changes; applying them in order to ``live`` should make it equal ``desired``."""
        ...
