"""The engine plans use: migra for what it handles, mended by the supplements for what it does not."""

from __future__ import annotations

from ..servers import connect
from .base import Change, DiffEngine
from .migra_engine import MigraEngine
from .supplements import Context, Options, supplement


class SupplementedEngine:
    """A ``DiffEngine`` whose output is the base engine's, rewritten by every supplement."""

    def __init__(self, base: DiffEngine | None = None, options: Options | None = None) -> None:
        self.base = base or MigraEngine()
        self.name = self.base.name
        self.options = options or Options()

    def diff(self, live_dsn: str, desired_dsn: str, *, exclude_schemas: tuple[str, ...]) -> list[Change]:
        changes = self.base.diff(live_dsn, desired_dsn, exclude_schemas=exclude_schemas)
        with connect(live_dsn, application_name="reconciler inspect") as live, \
                connect(desired_dsn, application_name="reconciler inspect") as desired:
            return supplement(Context(live, desired, self.options, exclude_schemas), changes)
