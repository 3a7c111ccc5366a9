"""schemainspect's PostgreSQL inspector with its dependency closure computed once per object, and its strings shared.

schemainspect (a dependency we keep, unmodified) lists each object's transitive dependents by walking every
path through the graph: exponential in chains of views (28 views each joining the previous two: 21 s and
775 MB). migra only asks whether an object is among them, so the reachable set, memoized per object, is the
same answer, found by one walk per object.

Memory: every value of every row is a new object, and the objects keep them: at 5,000 tables, 580,000 strings
for 45,000 distinct ones (a schema's name, each column's type, ...) and 52,000 lists for 2,400 distinct ones (an
index's key columns, options, ...): a third of an inspection's memory. The rows schemainspect reads here hold each
distinct string and list once, and come from the server a thousand at a time (libpq holding the whole answer to
the relations query, a row per column, costs 24 MiB at 5,000 tables). And a column (55,000 of an inspection's
90,000 objects) pickles as its attribute values, not as a dict of them: unpickling keeps every object's pickled
state until the end, and the dicts were two thirds of that. Everything else is schemainspect's own behaviour.
"""

from __future__ import annotations

import copyreg
import functools
import itertools
import warnings
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any


def closure(start: str, edges: Callable[[str], list[str] | None]) -> list[str]:
    """Every signature reachable from ``start`` by ``edges`` (None: not an object that has edges), sorted,
    without ``start`` unless a cycle leads back to it."""
    seen: set[str] = set()
    pending = list(edges(start) or [])
    while pending:
        signature = pending.pop()
        if signature in seen:
            continue
        seen.add(signature)
        pending.extend(edges(signature) or [])
    return sorted(seen)


@functools.cache
def _row_type(fields: tuple[str, ...]) -> Any:
    """A row with the query's columns as attributes, as schemainspect reads them (one type per query)."""
    return namedtuple("Row", fields)


def shared_rows(rows: Iterable[Any], fields: tuple[str, ...], shared: dict[Any, Any]) -> Iterator[Any]:
    """``rows`` with every string value replaced by the equal one already in ``shared`` (added when new), and every
    list of strings and numbers (an array: an index's key columns, options, ...) by the equal list already there:
    neither schemainspect nor migra changes a list read from a row."""
    make = _row_type(fields)._make
    keep = shared.setdefault

    def one(value: Any) -> Any:
        if type(value) is str:
            return keep(value, value)
        if type(value) is list:
            items = [keep(v, v) if type(v) is str else v for v in value]
            if all(type(v) is str or type(v) is int for v in items):
                return keep(tuple(items), items)
            return items
        return value

    for row in rows:
        yield make([one(v) for v in row])


def streamed_rows(conn: Any, query: Any, shared: dict[Any, Any]) -> Iterator[Any]:
    """``query``'s rows, as schemainspect reads them (attributes named after the columns, strings shared), streamed
    from the server."""
    from psycopg.rows import tuple_row

    from ..servers import stream

    with conn.cursor(row_factory=tuple_row) as cursor:
        rows = stream(cursor, query)
        first = next(rows, None)
        fields = tuple(column.name for column in cursor.description or ())
        if first is not None:
            yield from shared_rows(itertools.chain((first,), rows), fields, shared)


class _RawConnection:
    """What schemainspect asks of a connection it did not get from SQLAlchemy (its psycopg2 path): the server's
    version. Our ``execute`` does the reading, with psycopg 3: schemainspect needs no SQLAlchemy engine, whose
    import and connection set-up cost a plan a tenth of a second, twice."""

    def __init__(self, server_version: int) -> None:
        self.connection = self
        self.server_version = server_version


_layouts: dict[tuple[str, ...], tuple[str, ...]] = {}  # attribute names, one tuple per layout (pickled once)


def _column(cls: type[Any], names: tuple[str, ...], *values: Any) -> Any:
    """A column object from its pickled attributes (see ``_pickled_column``)."""
    column = object.__new__(cls)
    column.__dict__.update(zip(names, values, strict=True))
    return column


def _pickled_column(column: Any) -> tuple[Any, ...]:
    """How pickle saves a schemainspect column: its class, attribute names (shared) and values, in one tuple
    (pickle keeps each until the end, as it keeps a state dict). A column refers to no object that refers back
    to it, so it can be rebuilt from values alone."""
    attributes = vars(column)
    names = tuple(attributes)
    return _column, (type(column), _layouts.setdefault(names, names), *attributes.values())


# schemainspect's queries (attributes of its inspector); each returns a ``schema`` column
_QUERIES = ("ALL_RELATIONS_QUERY", "COLLATIONS_QUERY", "RLSPOLICIES_QUERY", "INDEXES_QUERY", "SEQUENCES_QUERY",
            "CONSTRAINTS_QUERY", "FUNCTIONS_QUERY", "TYPES_QUERY", "DOMAINS_QUERY", "EXTENSIONS_QUERY", "ENUMS_QUERY",
            "DEPS_QUERY", "SCHEMAS_QUERY", "PRIVILEGES_QUERY", "TRIGGERS_QUERY")


# in schemainspect's relations query: a scalar subquery that reads one row of pg_inherits per table, which fails on
# a table with two parents; it reads the first (schemainspect looks one parent up by that name; the inheritance
# supplement writes a new child's INHERITS with all of them)
_ONE_PARENT = """'"' || nmsp_parent.nspname || '"."' || parent.relname || '"' as parent"""
_FIRST_PARENT = """(array_agg('"' || nmsp_parent.nspname || '"."' || parent.relname || '"'
                               ORDER BY pg_inherits.inhseqno))[1] as parent"""


@functools.cache
def inspector_class() -> type[Any]:
    """The subclass, made on first use: importing schemainspect is slow and warns (pkg_resources)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from schemainspect.inspected import ColumnInfo
        from schemainspect.pg.obj import PostgreSQL

    from psycopg import sql

    copyreg.pickle(ColumnInfo, _pickled_column)

    class Inspector(PostgreSQL):  # type: ignore[misc]
        """Reads over a psycopg connection (``conn``), which it does not keep."""

        def __init__(self, conn: Any, *, exclude_schemas: tuple[str, ...] = ()) -> None:
            self.excluded_schemas = list(exclude_schemas)
            self._conn = conn
            self._shared: dict[Any, Any] = {}  # while loading: each distinct string (and list) read so far
            try:
                super().__init__(_RawConnection(conn.info.server_version))
            finally:
                del self._conn, self._shared  # neither is part of the inspection (nor of its saved copy)
            self.c = None

        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs:
                raise TypeError("schemainspect's queries take no parameters here")
            return streamed_rows(self._conn, query, self._shared)

        def load_all(self) -> None:
            query = getattr(self, "ALL_RELATIONS_QUERY", None)
            if isinstance(query, str) and _ONE_PARENT in query:
                self.ALL_RELATIONS_QUERY = query.replace(_ONE_PARENT, _FIRST_PARENT, 1)
            # every query has a schema column: the excluded schemas' rows are never fetched, and schemainspect's
            # own filter (in Python, after loading everything) has nothing left to do
            if self.excluded_schemas:
                excluded = sql.Literal(self.excluded_schemas)
                for name in _QUERIES:
                    query = getattr(self, name, None)
                    if query is not None:
                        body = query.rstrip().rstrip(";")
                        setattr(self, name, sql.SQL(
                            "SELECT * FROM (\n{}\n) AS reconciler_q WHERE reconciler_q.schema <> ALL({}::text[])"
                        ).format(sql.SQL(body), excluded))
            super().load_all()

        def load_deps(self) -> None:
            super().load_deps()
            self.deps: list[Any] = []  # the raw rows, read once above: migra never looks at them

        def load_deps_all(self) -> None:
            tables: tuple[Mapping[str, Any], ...] = (self.selectables, self.enums, self.triggers)

            def find(signature: str) -> Any:
                return next((t[signature] for t in tables if signature in t), None)

            for attribute, target in (("dependent_on", "dependent_on_all"), ("dependents", "dependents_all")):
                def edges(signature: str, attribute: str = attribute) -> list[str] | None:
                    item = find(signature)
                    return None if item is None else list(getattr(item, attribute))

                for signature, item in self.selectables.items():
                    setattr(item, target, closure(signature, edges))

    return Inspector
