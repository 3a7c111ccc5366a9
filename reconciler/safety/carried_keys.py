"""The one-column keys a dual column (dual_column.py) carries over to the new column, so that an ``int`` primary key
and the foreign keys that reference it can become ``bigint`` online:

- its primary key or unique constraint: the same unique index built again on the new column, CONCURRENTLY, while
  writes go on; in the cut-over the old constraint dropped and the new one added ``USING INDEX`` (no scan);
- the foreign keys from it or to it: dropped in the cut-over and added again, by their own definition (the column
  names are the same after the swap), ``NOT VALID`` (no scan under the lock: new writes are checked at once); then
  each validated in a transaction of its own that does not block writes.

A plan that retypes both ends of a foreign key re-points it in both cut-overs (they share one transaction) and
validates it once.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from ..inspect import KeyFact
from .context import Context
from .drafts import POST_CUTOVER, Draft
from .nodes import q, short, valid_as

_FOREIGN = "f"


@dataclass(frozen=True)
class CarriedKeys:
    own: tuple[KeyFact, ...]  # the column's primary key and unique constraints
    foreign: tuple[KeyFact, ...]  # foreign keys from the column or to it
    indexes: tuple[tuple[KeyFact, str, str], ...]  # (key, its index's definition, the name it is built under first)

    def locked(self, table: str) -> tuple[str, ...]:
        """The tables the cut-over locks, in the order a write takes them: each table holding a foreign key before
        the table it references (an insert locks its table, then checks the key), so that every cut-over of a plan
        takes them in the same order."""
        order = [table]
        for key in self.foreign:
            referenced = str(key.ref_table)
            if key.table not in order:
                order.insert(order.index(referenced) if referenced in order else 0, key.table)
            if referenced not in order:
                order.append(referenced)
        return tuple(order)


def carried_keys(ctx: Context, table: str, column: str, tag: str) -> CarriedKeys | None:
    """None: a key the plan itself drops or adds (its cut-over would put back the old one)."""
    keys = ctx.facts.keys.get((table, column), ())
    if any((k.table, k.name) in ctx.changed_constraints for k in keys):
        return None
    own = tuple(k for k in keys if k.kind != _FOREIGN)
    indexes = []
    for key in own:
        fact = ctx.facts.indexes.get(key.index or "")
        if fact is not None and key.index is not None:
            schema, name = key.index.split(".", 1)
            temporary = short(name, tag)
            ctx.fill_helpers.add(f"{schema}.{temporary}")
            indexes.append((key, fact.definition, temporary))
    return CarriedKeys(own, tuple(k for k in keys if k.kind == _FOREIGN), tuple(indexes))


def dropped(keys: CarriedKeys) -> list[str]:
    """First in the cut-over: the foreign keys (they need the unique index), then the column's own keys."""
    return [q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", _table(k.table), sql.Identifier(k.name))
            for k in (*keys.foreign, *keys.own)]


def added(keys: CarriedKeys) -> list[str]:
    """Last in the cut-over, once the new column has the name and its NOT NULL: the keys again, on it."""
    out = []
    for key, _definition, temporary in keys.indexes:
        kind = sql.SQL("PRIMARY KEY" if key.kind == "p" else "UNIQUE")
        out.append(q("ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}", _table(key.table), sql.Identifier(key.name),
                     kind, sql.Identifier(temporary)))
    for key in keys.foreign:
        add = q("ALTER TABLE {} ADD CONSTRAINT {} ", _table(key.table), sql.Identifier(key.name)) + key.definition
        out.append(valid_as(add, False))
    return out


def validations(ctx: Context, keys: CarriedKeys) -> list[Draft]:
    """After the cut-overs: each foreign key that was valid validated again, once however many cut-overs re-add it."""
    out = []
    for key in keys.foreign:
        if not key.validated or (key.table, key.name) in ctx.repointed:
            continue
        ctx.repointed.add((key.table, key.name))
        out.append(Draft(sql=q("ALTER TABLE {} VALIDATE CONSTRAINT {}", _table(key.table), sql.Identifier(key.name)),
                         kind="validate_constraint", object=f"{key.table}.{key.name}",
                         tables=(key.table, str(key.ref_table)), isolated=True, stage=POST_CUTOVER, rollback_sql="",
                         reversible=True, identity=(*key.table.split(".", 1), key.name), helper=True))
    return out


def _table(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split(".", 1))

