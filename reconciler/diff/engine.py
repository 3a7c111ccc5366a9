"""The engine plans use: migra for what it handles, mended by the supplements for what it does not."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ReconcilerError
from ..servers import connect
from .base import Change, DiffEngine
from .inspections import InspectionCache
from .migra_engine import MigraEngine
from .supplements import Context, Options, common_questions, read_rows, supplement
from .supplements.partitions import refuse_partitioning_changes
from .supplements.rebuilds import rebuilt_tables


class SupplementedEngine:
    """A ``DiffEngine`` whose output is the base engine's, rewritten by every supplement."""

    def __init__(self, base: DiffEngine | None = None, options: Options | None = None, *,
                 remember: bool = False, cache: InspectionCache | None = None) -> None:
        """``remember``: an engine used by plan after plan (watch's) keeps live's answers to the supplements'
        catalog queries while live's catalogs stay the same (see ``MigraEngine``, and its ``cache``)."""
        self.base = base or MigraEngine(remember=remember, cache=cache)
        self.name = self.base.name
        self.options = options or Options()
        self._remember = remember
        self._cache = cache
        self._answers: OrderedDict[str, dict[str, list[Any]]] = OrderedDict()  # key -> query -> rows, the last two
        self._asked: tuple[str, ...] = ()  # the queries the last diff asked of its desired database

    def frozen(self, desired_dsn: str, *, prefetch: tuple[str, ...] | None = None, eager: bool = False
               ) -> contextlib.AbstractContextManager[None]:
        """The base engine's (see ``MigraEngine.frozen``), when it has one."""
        frozen = getattr(self.base, "frozen", None)
        return (frozen(desired_dsn, prefetch=prefetch, eager=eager) if frozen is not None
                else contextlib.nullcontext())

    def warm_up(self) -> None:
        """The base engine's (see ``MigraEngine.warm_up``), when it has one."""
        warm_up = getattr(self.base, "warm_up", None)
        if warm_up is not None:
            warm_up()

    def saved(self) -> None:
        """The base engine's (see ``MigraEngine.saved``), when it has one."""
        saved = getattr(self.base, "saved", None)
        if saved is not None:
            saved()

    def known(self, dsn: str, fingerprint: str) -> contextlib.AbstractContextManager[None]:
        """The base engine's (see ``MigraEngine.known``), when it has one."""
        known = getattr(self.base, "known", None)
        return known(dsn, fingerprint) if known is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _kept_answers(self, live_dsn: str, desired_dsn: str, ahead: tuple[str | None, dict[str, list[Any]]],
                      ahead_live: tuple[str | None, dict[str, list[Any]]]) -> Iterator[dict[str, dict[str, list[Any]]]]:
        """Each side's answers to the supplements' queries from an earlier diff, while its catalogs are the same
        (by the key the base engine used for its inspection); saved again afterwards with what was added. ``ahead``,
        ``ahead_live``: what ``_answers_ahead`` found for each side (the key its answers were kept under, if they
        were)."""
        key_for = getattr(self.base, "key_for", None)
        keys = {side: key_for(dsn) if key_for is not None else None
                for side, dsn in (("live", live_dsn), ("desired", desired_dsn))}
        answers: dict[str, dict[str, list[Any]]] = {}
        before: dict[str, int] = {}
        for side, key in keys.items():
            if key is None:
                continue
            dsn = live_dsn if side == "live" else desired_dsn
            early = ahead if side == "desired" else ahead_live
            found = early[1] if key == early[0] else self._answers.get(key)
            if found is None:
                found = self._cache.load_answers(key, dsn) if self._cache is not None else {}
            answers[side], before[side] = found, len(found)
        yield answers
        for side, key in keys.items():
            if key is None:
                continue
            if self._cache is not None and len(answers[side]) > before[side]:
                self._cache.store_answers(key, answers[side])
            if self._remember:
                self._answers[key] = answers[side]
                self._answers.move_to_end(key)
                while len(self._answers) > 2:  # memory is bounded: live's and the last desired's
                    self._answers.popitem(last=False)

    def _answers_ahead(self, dsn: str, exclude_schemas: tuple[str, ...], questions: tuple[str, ...] | None = None,
                       ) -> tuple[str | None, dict[str, list[Any]]]:
        """One side's answers: kept from an earlier diff (in memory or saved) when its catalogs are the same (with
        the key they were kept under), else asked now (key None): ``questions``, or by default the questions the last
        diff asked of its desired database, or those every plan asks."""
        key_now = getattr(self.base, "key_now", None)
        key = key_now(dsn, exclude_schemas) if key_now is not None else None
        if key is not None:
            kept = self._answers.get(key)
            if kept is None and self._cache is not None:
                kept = self._cache.load_answers(key, dsn)
            if kept:
                return key, kept
        return None, _ask(dsn, questions or self._asked or common_questions(), exclude_schemas)

    def diff(self, live_dsn: str, desired_dsn: str, *, exclude_schemas: tuple[str, ...]) -> list[Change]:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="supplements") as pool:
            # each side's answers to the supplements' questions are found while the base engine diffs (migra's diff
            # is Python, the answers the server's work)
            ahead = pool.submit(self._answers_ahead, desired_dsn, exclude_schemas)
            ahead_live = pool.submit(self._answers_ahead, live_dsn, exclude_schemas, common_questions())
            try:
                changes = self.base.diff(live_dsn, desired_dsn, exclude_schemas=exclude_schemas)
            except ReconcilerError:  # the base engine's crash: say what it could not do, where a supplement knows
                with connect(live_dsn, application_name="reconciler inspect") as live, \
                        connect(desired_dsn, application_name="reconciler inspect") as desired:
                    context = Context(live, desired, self.options, exclude_schemas)
                    refuse_partitioning_changes(context)
                    rebuilt_tables(context, [])  # a table built again refuses what it cannot take over, clearly
                raise
            found_ahead = ahead.result()
            found_live = ahead_live.result()
        with connect(live_dsn, application_name="reconciler inspect") as live, \
                connect(desired_dsn, application_name="reconciler inspect") as desired, \
                self._kept_answers(live_dsn, desired_dsn, found_ahead, found_live) as answers:
            for conn in (live, desired):
                _catalog_names(conn)
            desired_answers = answers.setdefault("desired", {})
            for query, rows in found_ahead[1].items():  # nothing new when they were the kept ones
                desired_answers.setdefault(query, rows)
            live_answers = answers.setdefault("live", {})
            for query, rows in found_live[1].items():
                live_answers.setdefault(query, rows)
            result = supplement(Context(live, desired, self.options, exclude_schemas, answers), changes)
            if self._remember:
                self._asked = tuple(desired_answers)
            return result


def _catalog_names(conn: Any) -> None:
    """Catalog functions then name every object with its schema (the supplements' queries rely on it)."""
    conn.execute("SET search_path = pg_catalog")


def _ask(dsn: str, queries: tuple[str, ...], exclude_schemas: tuple[str, ...]) -> dict[str, list[Any]]:
    """The rows of ``queries`` on ``dsn``, as ``Context.rows`` reads them (a failure: nothing asked ahead; each
    question is asked again as the supplements come to it)."""
    found: dict[str, list[Any]] = {}
    strings: dict[str, str] = {}
    try:
        with connect(dsn, application_name="reconciler inspect") as conn:
            _catalog_names(conn)
            for query in queries:
                found[query] = read_rows(conn, query, exclude_schemas, strings)
    except Exception:
        return {}
    return found
