"""The engine plans use: migra for what it handles, mended by the supplements for what it does not."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..errors import ReconcilerError
from ..servers import connect
from .base import Change, DiffEngine
from .migra_engine import MigraEngine
from .supplements import Context, Options, supplement
from .supplements.partitions import refuse_partitioning_changes


class SupplementedEngine:
    """A ``DiffEngine`` whose output is the base engine's, rewritten by every supplement."""

    def __init__(self, base: DiffEngine | None = None, options: Options | None = None, *,
                 remember: bool = False) -> None:
        """``remember``: an engine used by plan after plan (watch's) keeps live's answers to the supplements'
        catalog queries while live's fingerprint (``known``) stays the same."""
        self.base = base or MigraEngine(remember=remember)
        self.name = self.base.name
        self.options = options or Options()
        self._remember = remember
        self._known: dict[str, str] = {}
        self._live_rows: tuple[tuple[str, str, tuple[str, ...]], dict[str, list[Any]]] | None = None

    def frozen(self, desired_dsn: str, *, prefetch: tuple[str, ...] | None = None
               ) -> contextlib.AbstractContextManager[None]:
        """The base engine's (see ``MigraEngine.frozen``), when it has one."""
        frozen = getattr(self.base, "frozen", None)
        return frozen(desired_dsn, prefetch=prefetch) if frozen is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def known(self, dsn: str, fingerprint: str) -> Iterator[None]:
        """Within the block ``dsn``'s schema has this fingerprint (see ``MigraEngine.known``)."""
        known = getattr(self.base, "known", None)
        with known(dsn, fingerprint) if known is not None else contextlib.nullcontext():
            self._known[dsn] = fingerprint
            try:
                yield
            finally:
                self._known.pop(dsn, None)

    def _remembered_rows(self, live_dsn: str, exclude_schemas: tuple[str, ...]) -> dict[str, list[Any]] | None:
        fingerprint = self._known.get(live_dsn)
        if not self._remember or fingerprint is None:
            return None
        key = (live_dsn, fingerprint, exclude_schemas)
        if self._live_rows is None or self._live_rows[0] != key:
            self._live_rows = (key, {})  # the last live only: memory is bounded
        return self._live_rows[1]

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
            return supplement(Context(live, desired, self.options, exclude_schemas,
                                      self._remembered_rows(live_dsn, exclude_schemas)), changes)
