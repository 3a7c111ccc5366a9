"""Definitions that mean the same but print differently after PostgreSQL re-creates them.

PostgreSQL's deparse is not a fixed point. ``CHECK (kind IN ('a', 'b'))`` on a varchar column prints as
``((kind)::text = ANY ((ARRAY['a'::character varying, 'b'::character varying])::text[]))``; that text, run
again, reads back with the casts moved inside the array. A NULL in a UNION branch prints as ``NULL::integer``
and reads back as ``NULL::integer AS int4``. A plan runs the desired database's text, so the target it builds
never equals the desired database as text, and a database built from the original SQL never equals the
target: each comparison would call the other different for ever.

Two texts are the same definition when both read back alike after being created once more (one round trip
reaches the fixed point). The trial runs on the desired database, where the names the texts use resolve as
the desired schema means them: temporary objects, in a transaction that is rolled back, so nothing stays.
Views, materialized views (their query, as a view) and CHECK constraints of tables are the kinds it tries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .inspect import ObjectDifference, SchemaSnapshot

log = logging.getLogger(__name__)

_TRIAL = "reconciler_round_trip"
_VIEW_KINDS = frozenset({"view", "materialized view"})
_NOT_VALID = " NOT VALID"

# table CHECK constraints as the snapshot names them (search_path = pg_catalog), with their table's names
_CHECKS = """
SELECT con.conrelid::regclass::text || '.' || quote_ident(con.conname), n.nspname, c.relname
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'c'
"""


@dataclass(frozen=True)
class Settled:
    """What still differs, and the objects whose other definition is the desired one after a round trip."""

    remaining: tuple[ObjectDifference, ...]
    equivalent: Mapping[tuple[str, str], str]  # (kind, name) -> the other side's definition


def split_view(definition: str) -> tuple[str, str]:
    """A snapshot's view definition is the query (ending in ';') then its options: (query, options)."""
    end = definition.rfind(";")
    return (definition[: end + 1], definition[end + 1:]) if end >= 0 else (definition, "")


class RoundTrip:
    """Trials on one connection to the desired database; each text is tried once."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._views: dict[str, str | None] = {}
        self._checks: dict[tuple[str, str, str], str | None] = {}
        self._tables: dict[str, tuple[str, str]] | None = None

    def same_view(self, a: str, b: str) -> bool:
        """Two view queries (pg_get_viewdef text) that define the same view."""
        if a == b:
            return True
        first, second = self.view(a), self.view(b)
        return first is not None and first == second

    def same_check(self, table: tuple[str, str], a: str, b: str) -> bool:
        """Two CHECK constraint definitions (pg_get_constraintdef text) on ``table`` (schema, name) that
        make the same constraint; NOT VALID must match as written."""
        if a == b:
            return True
        if a.endswith(_NOT_VALID) != b.endswith(_NOT_VALID):
            return False
        first, second = self.check(table, a), self.check(table, b)
        return first is not None and first == second

    def view(self, query: str, *, written: bool = False) -> str | None:
        """The query as PostgreSQL prints it once created again; None if it does not create here. ``written``: the
        query as the desired files wrote it, whose names resolve by the session's own search path."""
        key = ("written " if written else "") + query
        if key not in self._views:
            self._views[key] = self._trial(
                [sql.SQL("CREATE TEMPORARY VIEW {} AS {}").format(
                    sql.Identifier(_TRIAL), sql.SQL(query.rstrip().removesuffix(";")))],
                "SELECT pg_get_viewdef(c.oid) FROM pg_class c "
                "WHERE c.relname = %s AND c.relnamespace = pg_my_temp_schema()", written=written)
        return self._views[key]

    def check(self, table: tuple[str, str], definition: str, *, written: bool = False) -> str | None:
        """The CHECK as PostgreSQL prints it once added again to a copy of the table's columns (``written``: as in
        ``view``)."""
        key = (*table, ("written " if written else "") + definition)
        if key not in self._checks:
            expression = definition.removesuffix(_NOT_VALID)
            printed = self._trial(
                [sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {})").format(sql.Identifier(_TRIAL), sql.Identifier(*table)),
                 sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID").format(
                     sql.Identifier(_TRIAL), sql.Identifier(_TRIAL), sql.SQL(expression))],
                "SELECT pg_get_constraintdef(k.oid) FROM pg_constraint k "  # the copy's NOT NULLs are constraints too on 18
                "WHERE k.conname = %s AND k.connamespace = pg_my_temp_schema()", written=written)
            if printed is not None:
                printed = printed.removesuffix(_NOT_VALID) + (_NOT_VALID if definition.endswith(_NOT_VALID) else "")
            self._checks[key] = printed
        return self._checks[key]

    def table_of(self, constraint: str) -> tuple[str, str] | None:
        """The table (schema, name) of a CHECK constraint named as the snapshot names it."""
        if self._tables is None:
            with self.conn.transaction(force_rollback=True):
                self.conn.execute("SET LOCAL search_path = pg_catalog")
                self._tables = {r[0]: (r[1], r[2]) for r in self.conn.execute(_CHECKS).fetchall()}
        return self._tables.get(constraint)

    def _trial(self, statements: Sequence[sql.Composed], read: str, *, written: bool = False) -> str | None:
        """Run ``statements`` (under the session's own search path when ``written``) and ``read`` (taking the
        trial object's name) under the snapshot's search path, then roll everything back."""
        try:
            with self.conn.transaction(force_rollback=True):
                # a kept shadow database is read-only by default (shadowcache); temporary objects are allowed
                self.conn.execute("SET TRANSACTION READ WRITE")
                self.conn.execute("SET LOCAL search_path TO DEFAULT" if written else "SET LOCAL search_path = pg_catalog")
                for statement in statements:
                    self.conn.execute(statement)
                if written:
                    self.conn.execute("SET LOCAL search_path = pg_catalog")
                row = self.conn.execute(read, (_TRIAL,)).fetchone()
        except psycopg.Error as exc:
            log.debug("round trip did not run here: %s", exc.diag.message_primary or exc)
            return None
        return None if row is None else str(row[0])


def settle(conn: psycopg.Connection[Any], desired: SchemaSnapshot, other: SchemaSnapshot,
           differences: Iterable[ObjectDifference]) -> Settled:
    """Drop from ``differences`` the views and CHECK constraints that differ only as PostgreSQL prints
    them; ``conn`` is a connection to the desired database."""
    trip = RoundTrip(conn)
    remaining: list[ObjectDifference] = []
    equivalent: dict[tuple[str, str], str] = {}
    for difference in differences:
        key = (difference.kind, difference.name)
        if difference.change == "different" and same(trip, key, desired.objects[key], other.objects[key]):
            equivalent[key] = other.objects[key]
        else:
            remaining.append(difference)
    if equivalent:
        log.info("%d definition(s) differ only as PostgreSQL prints them: %s", len(equivalent),
                 ", ".join(f"{k} {n}" for k, n in sorted(equivalent)[:5]))
    return Settled(remaining=tuple(remaining), equivalent=equivalent)


def same(trip: RoundTrip, key: tuple[str, str], desired: str, other: str) -> bool:
    """Whether two snapshot definitions of the object ``key`` are one definition."""
    kind, name = key
    if kind in _VIEW_KINDS:
        (query, options), (other_query, other_options) = split_view(desired), split_view(other)
        return options == other_options and trip.same_view(query, other_query)
    if kind == "constraint" and desired.startswith("CHECK ") and other.startswith("CHECK "):
        table = trip.table_of(name)
        return table is not None and trip.same_check(table, desired, other)
    return False
