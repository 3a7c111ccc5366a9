"""schemainspect's PostgreSQL inspector with its dependency closure computed once per object, and its strings shared.

schemainspect (a dependency we keep, unmodified) lists each object's transitive dependents by walking every
path through the graph: exponential in chains of views (28 views each joining the previous two: 21 s and
775 MB). migra only asks whether an object is among them, so the reachable set, memoized per object, is the
same answer, found by one walk per object.

Memory: every value of every row is a new string, and the objects keep them: at 5,000 tables, 400,000 strings
for 75,000 distinct ones (a schema's name, each column's type, ...), a third of an inspection's memory. The rows
schemainspect reads here hold each distinct value once. Everything else is schemainspect's own behaviour.
"""

from __future__ import annotations

import functools
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


def shared_rows(rows: Iterable[Any], fields: tuple[str, ...], shared: dict[str, str]) -> Iterator[Any]:
    """``rows`` with every string value replaced by the equal one already in ``shared`` (added when new)."""
    make = _row_type(fields)._make
    keep = shared.setdefault
    for row in rows:
        yield make([keep(v, v) if type(v) is str else v for v in row])


# schemainspect's queries (attributes of its inspector); each returns a ``schema`` column
_QUERIES = ("ALL_RELATIONS_QUERY", "COLLATIONS_QUERY", "RLSPOLICIES_QUERY", "INDEXES_QUERY", "SEQUENCES_QUERY",
            "CONSTRAINTS_QUERY", "FUNCTIONS_QUERY", "TYPES_QUERY", "DOMAINS_QUERY", "EXTENSIONS_QUERY", "ENUMS_QUERY",
            "DEPS_QUERY", "SCHEMAS_QUERY", "PRIVILEGES_QUERY", "TRIGGERS_QUERY")


@functools.cache
def inspector_class() -> type[Any]:
    """The subclass, made on first use: importing schemainspect is slow and warns (pkg_resources)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from schemainspect.pg.obj import PostgreSQL

    from sqlalchemy import bindparam, text

    class Inspector(PostgreSQL):  # type: ignore[misc]
        _shared: dict[str, str] | None = None  # while loading: each distinct string read so far

        def __init__(self, c: Any, *, exclude_schemas: tuple[str, ...] = ()) -> None:
            self.excluded_schemas = list(exclude_schemas)
            super().__init__(c)

        def execute(self, *args: Any, **kwargs: Any) -> Any:
            result = super().execute(*args, **kwargs)
            if self._shared is None or not hasattr(result, "keys"):
                return result
            return shared_rows(result, tuple(result.keys()), self._shared)

        def load_all(self) -> None:
            # every query has a schema column: the excluded schemas' rows are never fetched, and schemainspect's
            # own filter (in Python, after loading everything) has nothing left to do
            if self.excluded_schemas:
                for name in _QUERIES:
                    query = getattr(self, name, None)
                    if query is not None:
                        body = query.text.rstrip().rstrip(";")
                        setattr(self, name, text(
                            f"SELECT * FROM (\n{body}\n) AS reconciler_q "
                            "WHERE reconciler_q.schema <> ALL(:reconciler_excluded)"
                        ).bindparams(bindparam("reconciler_excluded", self.excluded_schemas)))
            self._shared = {}
            try:
                super().load_all()
            finally:
                del self._shared  # not part of the inspection (nor of its saved copy)

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
