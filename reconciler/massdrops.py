"""A plan that would drop most of what live holds is refused unless asked for.

An empty or commented-out file as the whole desired schema, a `schemas:` folder pointed at the wrong place, a
file lost in a merge: each reads as "drop every table", and a plan carries it out as faithfully as any other. The
tables' rows are the one thing a plan cannot give back, so a plan that drops every table of a schema live has, or
more than half of live's tables, stops here, naming the count and how to allow it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import psycopg

from .errors import RefusedError
from .safety import Step

ALLOW_FLAG = "--allow-mass-drops"
ALLOW_SETTING = "allow_mass_drops"

_TABLES = """
SELECT n.nspname, n.nspname || '.' || c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
  AND n.nspname <> ALL(%s)
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_class'::regclass AND e.objid = c.oid
                  AND e.deptype = 'e')
"""


def dropped_tables(steps: Sequence[Step]) -> set[str]:
    """The tables the steps drop (a plan that drops none needs no look at the target)."""
    return {s.object for s in steps if s.kind == "drop_table"}


def check(conn: psycopg.Connection[Any], dropped: set[str], exclude_schemas: tuple[str, ...],
          environment: str) -> None:
    """Refuse when ``dropped`` (``dropped_tables``) is every table of one of live's schemas, or most of live's
    tables (partitions count with their parent)."""
    by_schema: dict[str, set[str]] = defaultdict(set)
    for schema, table in conn.execute(_TABLES, (list(exclude_schemas),)).fetchall():
        by_schema[str(schema)].add(str(table))
    tables = set().union(*by_schema.values()) if by_schema else set()
    gone = dropped & tables
    emptied = sorted(schema for schema, names in by_schema.items() if names and names <= gone)
    if not emptied and len(gone) * 2 <= len(tables):
        return
    where = (f"every table of schema{'s' if len(emptied) > 1 else ''} {', '.join(emptied)}" if emptied
             else "most of live's tables")
    raise RefusedError(
        f"the plan drops {len(gone)} of the target's {len(tables)} table(s), {where}: is the desired schema complete "
        f"(an empty or commented-out file, a wrong `schemas:` folder)? If this is meant, run again with {ALLOW_FLAG}, "
        f"or set {ALLOW_SETTING}: true for environment {environment!r}")
