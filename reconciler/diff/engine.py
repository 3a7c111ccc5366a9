"""The engine plans use: migra for what it handles, mended by the supplements for what it does not."""

from __future__ import annotations

import contextlib

from ..errors import ReconcilerError
from ..servers import connect
from .base import Change, DiffEngine
from .migra_engine import MigraEngine
from .supplements import Context, Options, supplement
from .supplements.partitions import refuse_partitioning_changes


class SupplementedEngine:
    """A ``DiffEngine`` whose output is the base engine's, rewritten by every supplement."""

    def __init__(self, base: DiffEngine | None = None, options: Options | None = None) -> None:
        self.base = base or MigraEngine()
        self.name = self.base.name
        self.options = options or Options()

    def frozen(self, desired_dsn: str) -> contextlib.AbstractContextManager[None]:
        """The base engine's (see ``MigraEngine.frozen``), when it has one."""
        frozen = getattr(self.base, "frozen", None)
        return frozen(desired_dsn) if frozen is not None else contextlib.nullcontext()

    def diff(self, live_dsn: str, desired_dsn: str, *, exclude_schemas: tuple[str, ...]) -> list[Change]:
        try:
            changes = self.base.diff(live_dsn, desired_dsn, exclude_schemas=exclude_schemas)
        except ReconcilerError:  # the base engine's crash: say what it could not do, where a supplement knows
            with connect(live_dsn, application_name="reconciler inspect") as live, \
                    connect(desired_dsn, application_name="reconciler inspect") as desired:
                refuse_partitioning_changes(Context(live, desired, self.options, exclude_schemas))
            raise
        with connect(live_dsn, application_name="reconciler inspect") as live, \
                connect(desired_dsn, application_name="reconciler inspect") as desired:
            for conn in (live, desired):  # catalog functions then name every object with its schema
                conn.execute("SET search_path = pg_catalog")
            return supplement(Context(live, desired, self.options, exclude_schemas), changes)
