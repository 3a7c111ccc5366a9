"""The diff engine interface: two databases in, ordered changes out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Change:
    """One SQL statement that moves the live database towards the desired one."""

    sql: str
    kind: str  # e.g. create_table, add_column, drop_index (see diff.classify)
    object: str  # the object it acts on, schema-qualified where it has a schema
    engine: str


class DiffEngine(Protocol):
    """Anything that can say, as SQL, how to turn ``live`` into ``desired``."""

    name: str

    def diff(self, live_dsn: str, desired_dsn: str, *, exclude_schemas: tuple[str, ...]) -> list[Change]:
        """Ordered changes; applying them in order to ``live`` should make it equal ``desired``."""
        ...
