"""What migra misses or gets wrong, mended: rewriters over its list of changes.

Each rewriter reads the live and the desired database's catalogs, and returns the list of changes
with statements removed (migra's wrong ones), replaced or added in the place they must run. They run
in the order of ``REWRITERS``; rehearsal proves the result converges, and the same rewriters run on
the rehearsal's leftover diff, so a statement migra would wrongly emit again is not counted twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ...errors import ReconcilerError
from ...servers import stream
from ..base import Change

ENGINE = "supplements"


@dataclass(frozen=True)
class Options:
    """Opt-in kinds: owners and grants name roles, which differ between environments."""

    manage_privileges: bool = False
    manage_owners: bool = False


@dataclass(frozen=True)
class Context:
    live: psycopg.Connection[Any]
    desired: psycopg.Connection[Any]
    options: Options
    exclude_schemas: tuple[str, ...]
    # each side's answers to the queries asked so far, kept for the next diff while its catalogs stay the same
    answers: dict[str, dict[str, list[tuple[Any, ...]]]] | None = None  # "live" / "desired" -> query -> rows
    # every distinct string the rows hold, once: names and types repeat on every row (a table's, per column)
    strings: dict[str, str] = field(default_factory=dict, compare=False)

    def rows(self, side: str, query: str) -> list[tuple[Any, ...]]:
        """Run a catalog query on ``live`` or ``desired``; ``%(excluded)s`` is the excluded schemas."""
        kept = self.answers.get(side) if self.answers is not None else None
        if kept is not None and query in kept:
            return kept[query]
        found = read_rows(self.live if side == "live" else self.desired, query, self.exclude_schemas, self.strings)
        if kept is not None:
            kept[query] = found
        return found

    def keyed(self, query: str) -> tuple[dict[Any, tuple[Any, ...]], dict[Any, tuple[Any, ...]]]:
        """(live, desired): the query's rows keyed by their first column."""
        live = {r[0]: tuple(r[1:]) for r in self.rows("live", query)}
        desired = {r[0]: tuple(r[1:]) for r in self.rows("desired", query)}
        return live, desired


def read_rows(conn: psycopg.Connection[Any], query: str, exclude_schemas: tuple[str, ...],
              strings: dict[str, str]) -> list[tuple[Any, ...]]:
    """A supplement's catalog query on ``conn`` (``%(excluded)s``: the excluded schemas), streamed (some answer a row
    per column of every table), each string held once through ``strings``."""
    keep = strings.setdefault
    with conn.cursor() as cur:
        return [tuple([keep(v, v) if type(v) is str else v for v in row])
                for row in stream(cur, query.encode(), {"excluded": list(exclude_schemas)})]


Rewriter = Callable[[Context, list[Change]], list[Change]]

# statements nothing in a plan can use a function, aggregate or operator before: schemas, extensions, types
# (text search objects once that rewriter has placed them); those go right after these
FOUNDATION_KINDS = frozenset({"create_schema", "create_extension", "alter_extension", "create_collation", "create_enum",
                              "create_sequence", "set", "create_domain", "create_composite_type", "create_type",
                              "create_range", "create_range_type", "create_text_search_dictionary",
                              "create_text_search_configuration", "alter_text_search_configuration"})

MANAGED = ("{n}.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
           "AND {n}.nspname NOT LIKE 'pg\\_temp\\_%%' AND {n}.nspname NOT LIKE 'pg\\_toast\\_temp\\_%%' "
           "AND {n}.nspname <> ALL(%(excluded)s::text[])")


def managed(alias: str) -> str:
    """SQL condition: the namespace ``alias`` holds user objects we reconcile."""
    return MANAGED.format(n=alias)


def not_extension_member(classid: str, objid: str) -> str:
    return (f"NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = '{classid}'::regclass "
            f"AND e.objid = {objid} AND e.deptype = 'e')")


_PARAMETER = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")


def reloptions(values: Sequence[str]) -> dict[str, str]:
    """Storage parameters and view options as name -> value; the names are keywords (fillfactor,
    toast.autovacuum_enabled, check_option), checked here because they are written into SQL as they are."""
    pairs = dict(v.split("=", 1) for v in values)
    for name in pairs:
        if not _PARAMETER.match(name):
            raise ReconcilerError(f"unexpected storage parameter or option name {name!r}")
    return pairs


def change(statement: sql.Composable | str, kind: str, obj: str) -> Change:
    text = statement if isinstance(statement, str) else statement.as_string(None)
    return Change(sql=text, kind=kind, object=obj, engine=ENGINE)


def first_index(changes: Sequence[Change], predicate: Callable[[Change], bool], default: int) -> int:
    return next((i for i, c in enumerate(changes) if predicate(c)), default)


def last_index(changes: Sequence[Change], predicate: Callable[[Change], bool], default: int) -> int:
    return next((i for i in range(len(changes) - 1, -1, -1) if predicate(changes[i])), default)


def insert_at(changes: list[Change], index: int, new: Sequence[Change]) -> list[Change]:
    return [*changes[:index], *new, *changes[index:]]


def common_questions() -> tuple[str, ...]:
    """The catalog queries the rewriters ask of every plan's desired database, whatever changed: a plan asks them
    ahead, beside the base engine's diff (``SupplementedEngine``). Those asked only for some changes are asked when
    the rewriter comes to them; a test checks that the rewriters still ask each of these."""
    from . import (
        aggregates,
        comments,
        enums,
        extensions,
        inheritance,
        not_null,
        operators,
        partitions,
        rebuilds,
        routines,
        sequences,
        tables,
        temporal,
        textsearch,
        types,
        views,
    )

    return (aggregates._AGGREGATES, comments._QUERY, enums._ENUMS, extensions._EXTENSIONS,
            inheritance._CHILDREN, inheritance._TABLES, enums._ENUM_COLUMNS, enums._POLICIES,
            operators._OPERATORS, partitions._CONSTRAINTS, partitions._INDEXES, rebuilds.SHAPES, rebuilds._PERSISTENCE, rebuilds._GENERATED,
            partitions._TABLES,
            routines._CLONED_TRIGGERS, routines._DEPENDENCIES, routines._FUNCTIONS, sequences._QUERY, tables._COLUMNS,
            tables._NOT_VALID, tables._TABLES, textsearch._COLLATIONS, textsearch._CONFIGURATIONS,
            textsearch._DICTIONARIES, types._ALL_COMPOSITES, types._COMPOSITES, types._DOMAINS, types._RANGES,
            views._STATISTICS, views._VIEWS, not_null._QUERY, temporal._QUERY)


def supplement(context: Context, changes: Sequence[Change]) -> list[Change]:
    from . import (
        aggregates,
        comments,
        dependents,
        enums,
        extensions,
        generated,
        inheritance,
        kept,
        not_null,
        operators,
        order,
        partition_keys,
        partitions,
        privileges,
        rebuilds,
        reprints,
        routines,
        sequences,
        tables,
        temporal,
        textsearch,
        types,
        views,
    )

    out = list(changes)
    for rewrite in (rebuilds.rebuilt_tables,  # first: no other rewriter sees what a table built again makes anew
                    dependents.needless_recreations,  # first: no other rewriter sees a re-creation not needed
                    reprints.reprinted,  # no other rewriter sees a re-creation that changes nothing
                    enums.quote_labels, enums.quote_policy_roles, enums.enum_changes,  # first: migra's text made parsable
                    inheritance.inherited_tables,  # before those that read or place CREATE TABLE
                    routines.cloned_triggers, routines.functions,
                    partitions.mend_partitions, partition_keys.partition_keys, types.user_types, aggregates.aggregates, operators.operators,
                    sequences.sequence_options,
                    tables.table_properties, tables.column_properties, tables.not_valid_constraints,
                    tables.default_after_type,
                    generated.virtual_columns, not_null.not_null_constraints, temporal.temporal_keys,  # PostgreSQL 18
                    textsearch.text_search,  # after the rewriters that place types and columns: before and after them
                    views.view_options, views.statistics,
                    dependents.reattached,  # after the rewriters that move or add view re-creations
                    dependents.foreign_keys_moved,
                    extensions.extension_versions,  # after those that put what they make first: goes before them
                    order.ordered,  # after every rewriter that places statements: only ever moves one later
                    comments.comments,
                    privileges.reconcile,  # last: owners and grants go after everything else
                    kept.kept,
                    rebuilds.rebuilds_last):  # and what re-created objects had, that the desired schema does not manage
        out = rewrite(context, out)
    return out
