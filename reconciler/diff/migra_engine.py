"""migra as a ``DiffEngine``: schemainspect reads over psycopg 3 (no SQLAlchemy engine), unsafe statements allowed.

migra and schemainspect are unmaintained (last release 2022): they stay behind this module and
every plan is checked against our own catalog snapshot. Never vendor their code.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import threading
import time
import traceback
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

import pglast

from .. import dsn as dsnlib
from ..errors import ReconcilerError
from ..servers import connect
from ..sqltext import statement_slices
from .base import Change
from .classify import classify
from .inspections import InspectionCache, inspection_key
from .inspector import inspector_class

log = logging.getLogger(__name__)


class MigraEngine:
    name = "migra"

    def __init__(self, *, remember: bool = False, cache: InspectionCache | None = None) -> None:
        """Inspections of databases whose fingerprint a plan vouches for (``known``) are used again while their
        catalogs stay the same: from ``cache`` (on disk), and, ``remember``, from memory (an engine that outlives
        one plan: watch's)."""
        self._frozen: dict[tuple[str, ...], Future[Any]] | None = None  # excluded schemas -> desired's inspection
        self._frozen_dsn = ""
        self._remember = remember
        self._cache = cache
        self._known: dict[str, str] = {}  # dsn -> its schema's fingerprint, within a ``known`` block
        self._keys: dict[str, str] = {}  # dsn -> the key its inspection was last found or saved under
        self._remembered: OrderedDict[str, Any] = OrderedDict()  # key -> inspection, the last two (live, desired)
        self._keys_now: dict[tuple[str, tuple[str, ...]], str] = {}  # within a ``known`` block: its key, read once
        self._early: Future[Any] | None = None  # the frozen database's reading started early, until a diff uses it
        self._saving: list[threading.Thread] = []  # inspections being saved while the plan goes on (see ``saved``)

    @contextlib.contextmanager
    def known(self, dsn: str, fingerprint: str) -> Iterator[None]:
        """Within the block, the schema of ``dsn`` has this catalog-snapshot fingerprint (the caller just read it)."""
        if not (self._remember or self._cache):
            yield
            return
        self._known[dsn] = fingerprint
        try:
            yield
        finally:
            self._known.pop(dsn, None)
            for found in [k for k in self._keys_now if k[0] == dsn]:
                self._keys_now.pop(found, None)

    def warm_up(self) -> None:
        """Import migra in the background (a third of a second) while the plan loads and reads the databases."""
        # not a daemon: a process that ends sooner (a plan refused at once) waits for the import rather than
        # cutting it short at interpreter shutdown
        threading.Thread(target=_imported, name="import migra").start()

    def key_now(self, dsn: str, exclude_schemas: tuple[str, ...]) -> str | None:
        """The key ``dsn``'s inspection is found under now, when a plan vouches for its fingerprint (``known``) and
        inspections are kept; None otherwise."""
        fingerprint = self._known.get(dsn)
        if fingerprint is None or not (self._remember or self._cache):
            return None
        key = self._keys_now.get((dsn, exclude_schemas))
        if key is None:  # the database does not change within the block: its key is read once (supplements, _read)
            key = self._keys_now[(dsn, exclude_schemas)] = inspection_key(dsn, fingerprint, exclude_schemas)
        return key

    def key_for(self, dsn: str) -> str | None:
        """The key under which ``dsn``'s inspection was last used (None: it was read without one)."""
        return self._keys.get(dsn)

    @contextlib.contextmanager
    def frozen(self, desired_dsn: str, *, prefetch: tuple[str, ...] | None = None, eager: bool = False
               ) -> Iterator[None]:
        """Within the block ``desired_dsn`` does not change (a plan's shadow database): it is inspected once,
        however many diffs compare with it (the plan's own, then rehearsal's check for leftovers). A remembering
        engine (watch's: a saved file nearly always changes something), or one told the database is ``eager`` (just
        built: no saved inspection can be its), starts reading it at once, without the ``prefetch`` schemas, while
        the plan reads the rest. A reading no diff asked for by the end of the block (live was the desired schema)
        is cancelled, not waited for."""
        previous, self._frozen = self._frozen, {}
        self._frozen_dsn = desired_dsn
        self._early = None
        reading: _Cancellable | None = None
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
                if (self._remember or eager) and prefetch is not None:
                    reading = _Cancellable()
                    self._frozen[prefetch] = self._early = pool.submit(reading.run, desired_dsn, prefetch)
                try:
                    yield
                finally:
                    if reading is not None and self._early is not None:  # read, and no diff used it
                        reading.cancel()
        finally:
            self._frozen = previous
            self._early = None

    def diff(self, live_dsn: str, desired_dsn: str, *, exclude_schemas: tuple[str, ...]) -> list[Change]:
        from migra import Migration

        inspector = _imported()
        kept = self._frozen if self._frozen is not None and desired_dsn == self._frozen_dsn else None
        unsaved: list[tuple[str, Any]] = []
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="inspect") as pool:
            # both databases at once: each waits on its server as much as it computes
            live = pool.submit(self._read, inspector, live_dsn, exclude_schemas, unsaved)
            if kept is not None and exclude_schemas in kept:
                early, found = self._early, kept[exclude_schemas]
                desired = found.result()
                if early is found:  # read before the plan knew its fingerprint: saved now that it does
                    self._early = None
                    # (watch's engine, whose next schema is another, does not spend the pickling on it)
                    key = (self.key_now(desired_dsn, exclude_schemas)
                           if self._cache is not None and not self._remember else None)
                    if key is not None:
                        self._keys[desired_dsn] = key
                        unsaved.append((key, desired))
            else:
                reading = pool.submit(self._read, inspector, desired_dsn, exclude_schemas, unsaved)
                desired = reading.result()
                if kept is not None:
                    kept[exclude_schemas] = reading
            inspectors = [live.result(), desired]
            for inspected in inspectors:
                _rls_of_partitions_left_out(inspected)
            try:
                migration = Migration(inspectors[0], inspectors[1])
                migration.set_safety(False)
                migration.add_all_changes()
                raw = list(migration.statements)
            except Exception as exc:  # migra's own bugs on shapes it does not handle: a clear refusal, not a crash
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                raise ReconcilerError(f"the migra engine cannot diff these schemas ({detail}{_where(exc)}); "
                                      "this schema change is not supported yet") from exc
            finally:
                self._save(unsaved)
        return [self._change(piece) for statement in raw for piece in _split(statement)]

    def saved(self) -> None:
        """Wait until the inspections this engine read are saved (``diff`` saves them while the plan goes on)."""
        while self._saving:
            self._saving.pop().join()

    def _save(self, unsaved: list[tuple[str, Any]]) -> None:
        """Pickling GitLab's two inspections takes 0.3 s: done beside the plan's next stages (the supplements and
        the rehearsal, which mostly wait on the server), after migra's diff, which reads them but changes nothing."""
        if not unsaved or self._cache is None:
            return
        cache = self._cache

        def save() -> None:
            for key, inspected in unsaved:
                cache.store(key, inspected)

        # not a daemon: a process ending meanwhile waits for the files rather than cutting a write short
        thread = threading.Thread(target=save, name="save inspections")
        thread.start()
        self._saving.append(thread)

    def _read(self, inspector: type[Any], dsn: str, exclude_schemas: tuple[str, ...],
              unsaved: list[tuple[str, Any]]) -> Any:
        """``dsn``'s inspection: remembered, saved or read now (then added to ``unsaved``, to be saved)."""
        fingerprint = self._known.get(dsn)
        if fingerprint is None:
            self._keys.pop(dsn, None)
            return _inspect(inspector, dsn, exclude_schemas)
        key = self.key_now(dsn, exclude_schemas)
        assert key is not None  # known, and inspections are kept (``known`` records nothing otherwise)
        self._keys[dsn] = key
        found = self._remembered.get(key)
        if found is not None:
            log.debug("%s unchanged: its inspection is reused", dsnlib.describe(dsn))
        elif self._cache is not None:
            found = self._cache.load(key, inspector, dsn)
        if found is None:
            found = _inspect(inspector, dsn, exclude_schemas)
            if self._cache is not None:
                unsaved.append((key, found))
        if self._remember:
            with _remembered_lock:
                self._remembered[key] = found
                self._remembered.move_to_end(key)
                while len(self._remembered) > 2:  # memory is bounded: live's and the last desired's
                    self._remembered.popitem(last=False)
        return found

    def _change(self, statement: str) -> Change:
        kind, obj = classify(statement)
        return Change(sql=statement, kind=kind, object=obj, engine=self.name)


_remembered_lock = threading.Lock()


# schemainspect imports pkg_resources, which newer setuptools deprecate with a warning; said once, for all threads
# (warnings.catch_warnings changes process-wide state, unsafe while another thread imports)
warnings.filterwarnings("ignore", message=r".*pkg_resources", category=Warning)


def _imported() -> type[Any]:
    """migra, and our inspector class: imported before any thread inspects."""
    if "migra" not in sys.modules:
        _place_import_frames()
        with _resources_without_pkg_resources():
            import migra  # noqa: F401

    return inspector_class()


@contextlib.contextmanager
def _resources_without_pkg_resources() -> Iterator[None]:
    """schemainspect reads its SQL files with ``pkg_resources.resource_stream``, and only that, while it is
    imported. Importing ``pkg_resources`` (deprecated by setuptools) scans every installed distribution: half of
    migra's import. For the duration of the import that name is a module with that one function, reading the file
    beside the named module as pkg_resources would; then it is gone, and a later ``import pkg_resources`` gets the
    real one. None of our modules imports pkg_resources, so no other thread asks for it meanwhile."""
    if "pkg_resources" in sys.modules:  # already paid for
        yield
        return
    stand_in = types.ModuleType("pkg_resources", "stand-in while migra is imported: resource_stream only")
    stand_in.resource_stream = _resource_stream  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]


def _resource_stream(module_name: str, resource: str) -> BinaryIO:
    """``pkg_resources.resource_stream`` for a module's name: the file ``resource`` in that module's folder."""
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        raise FileNotFoundError(f"{resource} (module {module_name} has no folder)")
    return open(os.path.join(os.path.dirname(path), resource), "rb")  # the caller closes it


def _place_import_frames() -> None:
    """schemainspect finds its SQL files by walking the whole call stack (``inspect.stack()``), once per file, while
    it is imported. ``inspect.getmodule`` cannot place the import system's own frames (frozen: no file), and for
    each such frame scans every loaded module again: 0.15 s of the import in a process that has loaded ours. Saying
    which module those frames belong to (true, and what the scan would conclude) spares the scans."""
    known = getattr(inspect, "modulesbyfile", None)
    if not isinstance(known, dict):
        return
    for name in ("importlib._bootstrap", "importlib._bootstrap_external"):
        known.setdefault(os.path.normcase(os.path.abspath(f"<frozen {name}>")), name)


def _inspect(inspector: type[Any], dsn: str, exclude_schemas: tuple[str, ...],
             opened: Callable[[Any], None] | None = None) -> Any:
    """schemainspect's reading of one database (our subclass: linear dependency closure, schemas
    filtered in SQL, read over psycopg). ``opened`` is given the connection before it reads."""
    started = time.perf_counter()
    try:
        with connect(dsn, application_name="reconciler inspect") as connection:  # its errors name the database
            if opened is not None:
                opened(connection)
            inspected = inspector(connection, exclude_schemas=exclude_schemas)
    except ReconcilerError:
        raise
    except Exception as exc:  # schemainspect's bugs: refuse clearly
        raise ReconcilerError(f"schemainspect cannot read {dsnlib.describe(dsn)} "
                              f"({type(exc).__name__}: {exc})") from exc
    log.debug("inspected %s in %.0f ms", dsnlib.describe(dsn), (time.perf_counter() - started) * 1000)
    return inspected


class _Cancellable:
    """An inspection that can be called off from another thread: its query is cancelled on the server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connection: Any = None
        self._cancelled = False

    def run(self, dsn: str, exclude_schemas: tuple[str, ...]) -> Any:
        return _inspect(_imported(), dsn, exclude_schemas, opened=self._opened)

    def _opened(self, connection: Any) -> None:
        with self._lock:
            if self._cancelled:
                raise ReconcilerError("inspection called off")
            self._connection = connection

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):  # already done, or closed: nothing to call off
                connection.cancel_safe(timeout=5)


def _rls_of_partitions_left_out(inspected: Any) -> None:
    """migra cannot write row level security for a partition (schemainspect raises NotImplementedError for any
    ALTER TABLE of one): it is left to the tables supplement, which compares every table's flags itself."""
    for table in inspected.tables.values():
        if table.rowsecurity and table.is_table and not table.is_alterable:
            table.rowsecurity = False


def _where(exc: BaseException) -> str:
    """Where in migra or schemainspect it failed (e.g. 'alter_rls_statement'): names what it cannot do."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/migra/" in f.filename or "/schemainspect/" in f.filename]
    if not frames:
        return ""
    names = [f.name for f in frames[-3:] if not f.name.startswith("_") and f.name != "<module>"]
    return f" in {' > '.join(names)}" if names else ""


def _split(statement: str) -> list[str]:
    """migra's entries may hold several statements (enum changes): one change per statement."""
    text = statement.strip()
    if not text:
        return []
    try:
        pieces = [text[s].strip() for s in statement_slices(text)]
    except pglast.parser.ParseError:
        return [text.rstrip(";").strip()]
    return [p for p in pieces if p]
