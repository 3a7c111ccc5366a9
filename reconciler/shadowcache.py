"""Loaded desired schemas, and copies of live, kept on the shadow server so the next plan need not build them again.

Loading a big desired schema takes long (GitLab's 15,000 statements: many seconds even in batches), and so does the
rehearsal's copy of live (pg_dump, then its restore). A plan only reads its desired database, so the database it loaded
is not dropped afterwards: it is kept under a name made from its key, read-only by default, and later plans with the
same key read it directly, several at once (each holds a shared advisory lock on it while it reads; eviction takes the
lock exclusively, so it never drops a database under a reader). The rehearsal's copy of live is kept the same way:
rehearsal runs its steps in it inside a transaction it rolls back when it can, and otherwise asks for a copy of it
(``CREATE DATABASE ... TEMPLATE``, a file copy, made while nobody reads it).

The desired schema's key covers what decides the loaded result: the desired files' fingerprint, the tool's version,
the shadow server's exact version, the role that loads (it owns what the schema gives no owner) and whether the
schema's roles are created first. Keeping, copying and evicting run under one advisory lock in the shadow server's
``postgres`` database. A database takes a kept name only once complete (renaming is the last step): a load that
fails, or a plan cut short, leaves none. Each kept database's last use is in its own ``COMMENT ON DATABASE``, which
lives and dies with it: no table of ours on the shadow server, nothing stale when someone drops one by hand.

Only servers of ours keep databases: an embedded one, or a ``shadow:`` server other than the target's cluster (a
shadow on the target's cluster is often production). Whatever goes wrong with the cache is logged and the plan
builds what it needs as if there were no cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from . import __version__
from .dsn import database_name
from .errors import ReconcilerError
from .sandbox import LOAD_ROLE, Sandbox
from .servers import Server, connect, drop_database
from .shadow import same_cluster, statement_chain
from .source import DesiredSchema
from .splice import Splice, find_splice

log = logging.getLogger(__name__)

TEMPLATE_PREFIX = "reconciler_template_"
COPY_PURPOSE = "shadow"  # copies are named like throwaway shadows: reconciler_shadow_<hex>
MARKER = "reconciler shadow template"
LOCK_KEY = 0x7265636F6E636163  # one key for every process using the server's cache
READER_LOCK_CLASS = 0x7265  # (class, hashtext(name)): a plan reads that kept database (shared), eviction (exclusive)
LOCK_TIMEOUT = "120s"  # a copy takes seconds; past this the plan loads the schema instead of waiting
_LOCK_DATABASE = "postgres"  # advisory locks are per database: every process locks in the same one
# (server, kind, bound) to evict when a deferred_eviction block says so; None: evict at once
_DEFERRED: ContextVar[list[tuple[Server, str, int]] | None] = ContextVar("reconciler_deferred_eviction", default=None)


@dataclass(frozen=True)
class Prefix:
    """Where a kept desired database stands in its schema's statements: a later schema that starts with the same
    statements (``chain`` is the digest of the first ``count``) can be a copy of it plus the statements after."""

    base: str  # sha256 hex of the key's parts but the schema: tool, server, role, roles created
    count: int
    chain: str
    samples: tuple[tuple[int, str], ...] = ()  # (n, the start of the digest of the first n statements), every few

    def common(self, chain: list[str]) -> int:
        """How many of its first statements (to the nearest sample) another schema, by its ``chain``, shares."""
        return max((n for n, digest in self.samples if n < len(chain) and chain[n].startswith(digest)), default=0)


SAMPLES = 200  # digests kept per schema: where an edited schema parts from a kept one, to within 1/200 of its length
CHECKPOINT_MIN = 200  # statements in common worth a checkpoint (a copy of the database: a fraction of a second)


def _prefix(base: str, chain: list[str]) -> Prefix:
    count = len(chain) - 1
    every = max(1, -(-count // SAMPLES))
    return Prefix(base=base, count=count, chain=chain[-1],
                  samples=tuple((n, chain[n][:16]) for n in range(every, count + 1, every)))


@dataclass(frozen=True)
class CacheKey:
    digest: str  # sha256 hex of everything that decides the loaded result
    fingerprint: str  # the desired schema's, for people reading the template's comment
    kind: str = "desired"  # or "live copy": each kind keeps its own most recently used templates
    prefix: Prefix | None = None  # a desired schema's statements, for schemas that extend it
    checkpoint: bool = False  # the first statements of a schema (kept where an edited schema parted from it)

    @property
    def template(self) -> str:
        return TEMPLATE_PREFIX + self.digest[:16]


@dataclass(frozen=True)
class DesiredDatabase:
    dsn: str
    kept: bool  # a kept database, or one that will be once the block is done: it never changes afterwards
    built: bool = True  # loaded (whole or in part) by this plan, not a kept one found as it is


@dataclass(frozen=True)
class Template:
    name: str
    fingerprint: str
    kind: str
    tool: str
    last_used: datetime
    size_bytes: int | None  # read for ``reconciler cache list`` only: it walks every file of the database
    prefix: Prefix | None = None
    checkpoint: bool = False


@contextlib.contextmanager
def desired_database(
    server: Server,
    source: DesiredSchema,
    load: Callable[[str, int, int | None], int],
    *,
    target_dsn: str,
    keep: int,
    consume: bool = False,
    previous: DesiredSchema | None = None,
    sandbox: Sandbox | None = None,
) -> Iterator[DesiredDatabase]:
    """A database on ``server`` holding ``source``: the kept one when there is one, else loaded with ``load`` (given
    the database and the range of the schema's statements to run, [start, stop); it returns how many it ran) and
    kept. When a kept database holds the schema's first statements (a schema that was extended: statements added at
    the end, a file added last), the load starts from a copy of it. When a kept schema shares many first statements
    with this one but goes on differently (an edit in the middle), the load also keeps a checkpoint of where they
    part: the next edit after that point starts from it (watch: the same table edited again and again).

    ``consume`` (watch, whose next plan nearly always extends this one's schema): a kept schema this one extends
    is taken out of the cache and extended in place, not copied (a copy is a checkpoint of the server and a copy
    of every file: 0.15 s for 1,000 tables on a memory filesystem, seconds on a busy disk); the database this
    plan builds is kept in its place. Checkpoints are always copied: the next edit needs them as they are.

    ``previous`` (watch: the schema of its last plan, whose database it kept): when this schema is that one with an
    edit in the middle that ``splice.find_splice`` shows can be made in place, its kept database is taken, what the
    edit replaced is dropped and the edited statements are run; the statements after the edit are not run again.
    Should that fail, the schema is loaded as usual (and reports its own errors). ``sandbox``: the load role, which
    drops what the edit replaced (its own objects) as ``load`` runs the schema's SQL."""
    key: CacheKey | None = None
    chain: list[str] = []
    splice: Splice | None = None
    previous_key: CacheKey | None = None
    if keep > 0:
        chain = statement_chain(source)  # a file pglast cannot split fails here as its load would, at file:line
        try:
            parts = _key_parts(server, target_dsn)
            key = _desired_key(parts, source.fingerprint, chain) if parts is not None else None
            if parts is not None and consume and previous is not None and previous.fingerprint != source.fingerprint:
                previous_key = _desired_key(parts, previous.fingerprint)
        except Exception as exc:  # the cache is an optimisation: whatever fails, load as without it
            log.warning("shadow cache: %s; loading the desired schema instead", _describe(exc))
    held = checkpoint = 0
    loaded = False

    def seed(name: str) -> bool:
        nonlocal splice  # set once the previous schema's database is taken to be edited in place
        found: Splice | None = None
        if previous is not None and previous_key is not None:
            try:
                found = find_splice(previous, source)
            except Exception as exc:  # the cache is an optimisation: load as without it
                log.warning("shadow cache: %s; loading the desired schema instead", _describe(exc))
        if found is not None and previous_key is not None and _take_kept(server, name, previous_key):
            splice = found
            log.info("shadow cache: kept database %s holds the previous desired schema; editing it in place: %d of "
                     "its statements from number %d replaced by %d, the %d after them kept", previous_key.template,
                     found.old_stop - found.start, found.start + 1, found.new_stop - found.start, found.reused)
            return True
        return seed_prefix(name)

    def seed_prefix(name: str) -> bool:
        nonlocal held, checkpoint
        assert key is not None and key.prefix is not None
        found, checkpoint, taken = _copy_prefix(server, name, key.prefix, chain, consume=consume)
        if found is None or found.prefix is None:
            return False
        held = found.prefix.count
        log.info("shadow cache: kept database %s holds the first %d of the desired schema's %d statements; loading "
                 "the rest into %s", found.name, held, len(chain) - 1,
                 "it (taken from the cache)" if taken else "a copy of it")
        return True

    def build(dsn: str) -> None:
        nonlocal loaded
        loaded = True
        if splice is not None:
            try:
                count = _apply_splice(dsn, splice, load, sandbox)
                log.info("loaded %d statements from %d file(s) into the shadow database (the %d after them were "
                         "kept)", count, len(source.files), splice.reused)
                return
            except Exception as exc:
                log.info("shadow cache: editing the previous schema's database in place failed (%s); loading the "
                         "desired schema instead", _describe(exc))
                _start_over(server, _database_of(dsn), seed_prefix)
        start = held
        if key is not None and key.prefix is not None and checkpoint > held:
            load(dsn, held, checkpoint)
            _checkpoint_quietly(server, dsn, key.prefix, chain[:checkpoint + 1], key.fingerprint, keep)
            start = checkpoint
        count = start - held + load(dsn, start, None)
        log.info("loaded %d statements from %d file(s) into the shadow database", count, len(source.files))

    with cached_database(server, key, build, keep=keep, purpose=COPY_PURPOSE, shared=True, seed=seed,
                         what=f"the shadow database (desired schema {source.fingerprint})") as dsn:
        yield DesiredDatabase(dsn, kept=key is not None, built=loaded)


@contextlib.contextmanager
def cached_database(server: Server, key: CacheKey | None, build: Callable[[str], None], *, keep: int, purpose: str,
                    what: str, modifies: bool = False, shared: bool = False,
                    seed: Callable[[str], bool] | None = None) -> Iterator[str]:
    """A scratch database on ``server`` holding what ``build`` puts in it. ``shared`` (the block leaves it as it was):
    the key's kept database itself, read-only by default, given to as many blocks at once as ask for it. Otherwise
    a copy of it. When there is none it is built, and kept under the key afterwards instead of being dropped (when
    the block ends normally or with a refusal); a block that ``modifies`` it gets a copy of what was just kept.
    Without a key it is built and dropped, as any scratch database. ``seed`` may create the database to build in
    (True) as a copy holding part of what ``build`` adds, instead of an empty one."""
    if shared and key is not None:
        try:
            reader = _open_kept(server, key)
        except Exception as exc:  # the cache is an optimisation: whatever fails, build as without it
            log.warning("shadow cache: %s; building %s instead", _describe(exc), what)
            reader, key = None, None
        if reader is not None and key is not None:
            log.info("shadow cache: %s is kept database %s; not built again", what, key.template)
            with reader:  # holds the shared lock until the block is done
                yield server.database_dsn(key.template)
            return
    copy: str | None = None
    if key is not None and not shared:
        name = f"reconciler_{purpose}_{secrets.token_hex(5)}"
        try:
            copy = _copy_template(server, key, name)
        except Exception as exc:  # the cache is an optimisation: whatever fails, build as without it
            log.warning("shadow cache: %s; building %s instead", _describe(exc), what)
            key = None
        except BaseException:  # interrupted (Ctrl-C, watch's SIGTERM) once the copy may exist: none is left behind
            drop_database(server, name)
            raise
    if copy is not None and key is not None:
        log.info("shadow cache: %s is a copy of kept database %s; not built again", what, key.template)
        try:
            yield server.database_dsn(copy)
        finally:
            drop_database(server, copy)
        return
    name = f"reconciler_{purpose}_{secrets.token_hex(5)}"
    kept = False
    try:  # made inside: an interrupt just after it is made drops it too (IF EXISTS: also when it was not)
        if not (key is not None and seed is not None and _seed_quietly(seed, name, what)):
            _create_empty(server, name)
        build(server.database_dsn(name))
        if modifies and key is not None:
            kept = _keep_quietly(server, name, key, keep, what)
            if kept:  # the block changes what it is given: it gets a copy, the kept one stays as built
                with cached_database(server, key, build, keep=keep, purpose=purpose, what=what) as dsn:
                    yield dsn
                return
            key = None
        try:
            yield server.database_dsn(name)
        except ReconcilerError:  # a refusal: what was built is still what it was
            kept = not modifies and _keep_quietly(server, name, key, keep, what)
            raise
        kept = not modifies and _keep_quietly(server, name, key, keep, what)
    finally:
        if not kept:
            drop_database(server, name)


def _apply_splice(dsn: str, splice: Splice, load: Callable[[str, int, int | None], int],
                  sandbox: Sandbox | None) -> int:
    """Drop what the replaced statements created (one transaction, as the load role when there is one), then run the
    edited ones."""
    if splice.drops:
        with (sandbox.connect(dsn) if sandbox is not None else connect(dsn, application_name="reconciler shadow")) \
                as conn, conn.transaction():
            for drop in splice.drops:
                name = sql.Identifier(drop.schema, drop.name) if drop.schema else sql.Identifier(drop.name)
                conn.execute(sql.SQL("DROP {} IF EXISTS {}").format(sql.SQL(drop.kind), name))
    return load(dsn, splice.start, splice.new_stop) if splice.new_stop > splice.start else 0


def _start_over(server: Server, name: str, seed: Callable[[str], bool]) -> None:
    """Make database ``name`` anew: seeded, or empty."""
    drop_database(server, name)
    if not _seed_quietly(seed, name, "the shadow database"):
        _create_empty(server, name)


def _create_empty(server: Server, name: str) -> None:
    with connect(server.dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))


def _seed_quietly(seed: Callable[[str], bool], name: str, what: str) -> bool:
    try:
        return seed(name)
    except Exception as exc:
        log.warning("shadow cache: %s; building %s from the start", _describe(exc), what)
        return False


def _keep_quietly(server: Server, name: str, key: CacheKey | None, keep: int, what: str) -> bool:
    if key is None:
        return False
    try:
        return _keep(server, name, key, keep)
    except Exception as exc:
        log.warning("shadow cache: could not keep %s as a template: %s", what, _describe(exc))
        return False


def is_kept(server: Server, key: CacheKey) -> bool:
    """Is there a kept database under ``key`` on ``server`` now?"""
    with connect(_lock_dsn(server), application_name="reconciler shadow cache") as conn:
        return _comment_of(conn, key.template).get("key") == key.digest


def list_templates(server: Server) -> list[Template]:
    """The cached templates on ``server``, most recently used first."""
    with connect(_lock_dsn(server), application_name="reconciler shadow cache") as conn:
        return _templates(conn, droppable=False, sizes=True)


def clear(server: Server) -> list[str]:
    """Drop the kept databases this role may drop and no plan is reading, on ``server``; returns their names."""
    with _locked(server) as conn:
        names = [t.name for t in _templates(conn) if _drop(conn, t.name)]
    if names:
        log.info("shadow cache: dropped %s", ", ".join(names))
    return names


# --- key and eligibility -------------------------------------------------------------------------

def _key_parts(server: Server, target_dsn: str) -> dict[str, Any] | None:
    """What decides a loaded result besides the schema, or None when this shadow server keeps no databases."""
    shared = same_cluster(target_dsn, server.dsn)
    if shared and not server.embedded:
        log.debug("shadow cache: off, the shadow server is the target's cluster (templates are kept on shadow servers "
                  "of ours only)")
        return None
    with connect(_lock_dsn(server), application_name="reconciler shadow cache") as conn:
        row = conn.execute("SELECT current_setting('server_version_num'), current_user").fetchone()
    assert row is not None
    return {
        "tool": __version__,
        "server_version_num": row[0],
        "role": row[1],
        "loaded_by": LOAD_ROLE,  # desired SQL runs as the load role (and a database loaded otherwise is never reused)
        "creates_roles": not shared,  # pipeline.load_desired creates the schema's roles on a server not the target's
    }


def _desired_key(parts: dict[str, Any], fingerprint: str, chain: list[str] | None = None) -> CacheKey:
    """The key of a loaded desired schema; ``chain`` (its statement chain) for the prefix later schemas match."""
    base = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    digest = hashlib.sha256(json.dumps({**parts, "fingerprint": fingerprint}, sort_keys=True).encode()).hexdigest()
    return CacheKey(digest=digest, fingerprint=fingerprint, prefix=_prefix(base, chain) if chain else None)


def live_copy_key(server: Server, target_dsn: str, live_fingerprint: str,
                  exclude_schemas: tuple[str, ...]) -> CacheKey | None:
    """The key of a schema-only copy of live (rehearsal's): live's catalog snapshot fingerprint, which database it
    is, its extensions' versions (a copy has the versions live has; the snapshot does not list them), both servers'
    versions (pg_dump's output, the copy's catalogs) and the tool's."""
    if same_cluster(target_dsn, server.dsn) and not server.embedded:
        return None
    with connect(target_dsn, application_name="reconciler shadow cache") as conn:
        target = conn.execute(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()), current_database(), "
            "current_setting('server_version_num'), "
            "(SELECT string_agg(extname || ' ' || extversion, ',' ORDER BY extname) FROM pg_extension)").fetchone()
    with connect(_lock_dsn(server), application_name="reconciler shadow cache") as conn:
        shadow = conn.execute("SELECT current_setting('server_version_num'), current_user").fetchone()
    assert target is not None and shadow is not None
    parts = {"kind": "live copy", "live": live_fingerprint, "target": list(target), "shadow": list(shadow),
             "excluded": sorted(exclude_schemas), "tool": __version__, "owned_by": LOAD_ROLE}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return CacheKey(digest=digest, fingerprint=live_fingerprint, kind="live copy")


# --- under the lock --------------------------------------------------------------------------------

def _copy_template(server: Server, key: CacheKey, copy: str) -> str | None:
    """``copy``, a new database copied from the key's kept database, or None when there is none or a plan is reading
    it (``CREATE DATABASE ... TEMPLATE`` needs it to have no connection; new readers wait for the lock held here)."""
    with _locked(server) as conn:
        if _comment_of(conn, key.template).get("key") != key.digest or not _copy_unread(conn, copy, key.template):
            return None
        _comment(conn, key.template, key)
    return copy


def _copy_unread(conn: psycopg.Connection[Any], name: str, template: str) -> bool:
    """Create database ``name`` as a copy of kept database ``template`` unless a plan is reading it (False)."""
    if not _exclusive(conn, template):
        return False
    try:
        _create_from(conn, name, template)
    except BaseException:
        with contextlib.suppress(psycopg.Error):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        raise
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (READER_LOCK_CLASS, template))
    return True


def _copy_prefix(server: Server, name: str, prefix: Prefix, chain: list[str], *,
                 consume: bool = False) -> tuple[Template | None, int, bool]:
    """Create database ``name`` as a copy of the kept desired database that holds the most of the schema's first
    statements (``chain``: its digests) under the same ``prefix.base`` (None when no kept database is a start of it
    or the ones that are are being read), and say where a checkpoint is worth keeping: as far as a kept schema that
    goes on differently shares this one's statements (0: nowhere), and whether the kept database was taken (renamed
    ``name``, ``consume``) rather than copied."""
    with _locked(server) as conn:
        kept = [t for t in _templates(conn) if t.kind == "desired" and t.prefix is not None
                and t.prefix.base == prefix.base]
        starts = [t for t in kept if t.prefix is not None and t.prefix.count < len(chain)
                  and chain[t.prefix.count] == t.prefix.chain]
        held = max((t.prefix.count for t in starts if t.prefix is not None), default=0)
        shared = max((t.prefix.common(chain) for t in kept if t.prefix is not None), default=0)
        checkpoint = shared if shared - held >= CHECKPOINT_MIN and shared < len(chain) - 1 else 0
        for template in sorted(starts, key=lambda t: t.prefix.count if t.prefix else 0, reverse=True):
            at = checkpoint if template.prefix and checkpoint > template.prefix.count else 0
            if consume and not template.checkpoint and _take_unread(conn, name, template.name):
                return template, at, True
            if _copy_unread(conn, name, template.name):
                _touch(conn, template.name)
                return template, at, False
    return None, checkpoint, False


def _take_kept(server: Server, name: str, key: CacheKey) -> bool:
    """Make the key's kept database the scratch database ``name``, if there is one and no plan is reading it."""
    with _locked(server) as conn:
        return _comment_of(conn, key.template).get("key") == key.digest and _take_unread(conn, name, key.template)


def _take_unread(conn: psycopg.Connection[Any], name: str, template: str) -> bool:
    """Make kept database ``template`` the scratch database ``name`` (no longer kept, writable), unless a plan is
    reading it (False)."""
    if not _exclusive(conn, template):
        return False
    try:
        _rename(conn, template, name, kept=None)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (READER_LOCK_CLASS, template))
    return True


def _checkpoint_quietly(server: Server, dsn: str, prefix: Prefix, chain: list[str], fingerprint: str,
                        keep: int) -> None:
    """Keep a copy of the database being loaded, which holds the schema's first ``len(chain) - 1`` statements."""
    count = len(chain) - 1
    key = CacheKey(digest=hashlib.sha256(f"{prefix.base} checkpoint {chain[-1]}".encode()).hexdigest(),
                   fingerprint=f"the first {count} statements of {fingerprint}", prefix=_prefix(prefix.base, chain),
                   checkpoint=True)
    name = f"reconciler_{COPY_PURPOSE}_{secrets.token_hex(5)}"
    try:
        with _locked(server) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (key.template,)).fetchone():
                return
            _create_from(conn, name, _database_of(dsn))
        if not _keep(server, name, key, keep):
            drop_database(server, name)
    except Exception as exc:  # the cache is an optimisation: the load goes on without a checkpoint
        log.warning("shadow cache: could not keep a checkpoint: %s", _describe(exc))
        with contextlib.suppress(Exception):
            drop_database(server, name)


def _exclusive(conn: psycopg.Connection[Any], name: str) -> bool:
    """Take the readers' lock of kept database ``name`` exclusively, if no plan reads it."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (READER_LOCK_CLASS, name)).fetchone()
    return bool(row and row[0])


def _open_kept(server: Server, key: CacheKey) -> psycopg.Connection[Any] | None:
    """A connection holding a reader's lock on the key's kept database (closing it lets go), or None if there is none."""
    conn = connect(_lock_dsn(server), application_name="reconciler shadow cache")
    try:
        with _lock(conn):
            if _comment_of(conn, key.template).get("key") != key.digest:
                conn.close()
                return None
            conn.execute("SELECT pg_advisory_lock_shared(%s, hashtext(%s))", (READER_LOCK_CLASS, key.template))
            _comment(conn, key.template, key)
        return conn
    except BaseException:
        conn.close()
        raise


def _keep(server: Server, name: str, key: CacheKey, keep: int) -> bool:
    """Give the built database ``name`` the key's name (unless another process just kept one: False, drop it), then
    evict the least recently used of its kind beyond ``keep``. No copy: the database is renamed in place, once closed
    to other connections, and renaming is the last step, so only a complete build carries the name. It stays open to
    connections, read-only by default (nothing writes into a kept database by mistake)."""
    with _locked(server) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (key.template,)).fetchone()
        if exists:
            return False
        _rename(conn, name, key.template, kept=key)
        log.info("shadow cache: kept %s %s as %s", key.kind, key.fingerprint, key.template)
        pending = _DEFERRED.get()
        if pending is None:
            _evict(conn, [t for t in _templates(conn) if t.kind == key.kind][keep:], keep)
        elif (server, key.kind, keep) not in pending:
            pending.append((server, key.kind, keep))
    return True


def _rename(conn: psycopg.Connection[Any], old: str, new: str, *, kept: CacheKey | None) -> None:
    """Rename database ``old`` once closed to other connections, as the key's kept database (marked, read-only by
    default) or, ``kept`` None, as a scratch database (unmarked, writable)."""
    closing = sql.Identifier(old)
    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(closing))
    # its users closed their connections; a straggler (a connection still closing) would block the rename
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                 "AND pid <> pg_backend_pid()", (old,))
    if kept is not None:
        _comment(conn, old, kept)
        conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(closing))
    else:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(closing))
        conn.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(closing))
    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(closing, sql.Identifier(new)))
    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(new)))


@contextlib.contextmanager
def deferred_eviction() -> Iterator[Callable[[], None]]:
    """Within the block, keeping a database does not yet drop the least recently used ones beyond the bound; the
    function it yields does (watch reports its plan first: dropping a big database takes the best part of a second,
    and nobody waits on it then)."""
    pending: list[tuple[Server, str, int]] = []
    token = _DEFERRED.set(pending)

    def evict() -> None:
        while pending:
            server, kind, keep = pending.pop(0)
            try:
                with _locked(server) as conn:
                    _evict(conn, [t for t in _templates(conn) if t.kind == kind][keep:], keep)
            except Exception as exc:  # the cache is an optimisation: the next keep evicts again
                log.warning("shadow cache: could not evict: %s", _describe(exc))

    try:
        yield evict
    finally:
        _DEFERRED.reset(token)


def _evict(conn: psycopg.Connection[Any], stale: list[Template], keep: int) -> None:
    for template in stale:
        if not _drop(conn, template.name):
            log.info("shadow cache: %s is being read; evicted later", template.name)
            continue
        log.info("shadow cache: dropped %s (%s), the least recently used of more than %d", template.name,
                 template.fingerprint, keep)


@contextlib.contextmanager
def _lock(conn: psycopg.Connection[Any]) -> Iterator[None]:
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):  # a broken session released it anyway
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


@contextlib.contextmanager
def _locked(server: Server) -> Iterator[psycopg.Connection[Any]]:
    with connect(_lock_dsn(server), application_name="reconciler shadow cache") as conn, _lock(conn):
        yield conn


def _create_from(conn: psycopg.Connection[Any], name: str, template: str) -> None:
    # FILE_COPY copies the files (GitLab's 100 MB: 2 s); 15's default WAL_LOG writes every block to WAL (10 s).
    strategy = sql.SQL(" STRATEGY FILE_COPY") if conn.info.server_version >= 150000 else sql.SQL("")
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}{}").format(sql.Identifier(name), sql.Identifier(template),
                                                                   strategy))


def _comment(conn: psycopg.Connection[Any], name: str, key: CacheKey) -> None:
    """Mark ``name`` as the key's template, used now (by the server's clock, the one every client shares)."""
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    data = {"marker": MARKER, "key": key.digest, "fingerprint": key.fingerprint, "kind": key.kind,
            "tool": __version__, "last_used": row[0]}
    if key.checkpoint:
        data["checkpoint"] = True
    if key.prefix is not None:
        data["prefix"] = {"base": key.prefix.base, "count": key.prefix.count, "chain": key.prefix.chain,
                          "samples": [list(s) for s in key.prefix.samples]}
    text = json.dumps(data, sort_keys=True)
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(text)))


def _touch(conn: psycopg.Connection[Any], name: str) -> None:
    """Mark kept database ``name`` used now."""
    data = _comment_of(conn, name)
    if data:
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        assert row is not None
        text = json.dumps({**data, "last_used": row[0]}, sort_keys=True)
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(text)))


def _comment_of(conn: psycopg.Connection[Any], name: str) -> dict[str, Any]:
    """The marker of kept database ``name``; empty when there is no such database (or it is not one of ours, or it is
    closed to connections: a rename under way)."""
    row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                       "WHERE datname = %s AND datallowconn", (name,)).fetchone()
    return _parse(row[0]) if row else {}


def _parse(comment: str | None) -> dict[str, Any]:
    try:
        data = json.loads(comment or "")
    except ValueError:
        return {}
    return data if isinstance(data, dict) and data.get("marker") == MARKER else {}


def _templates(conn: psycopg.Connection[Any], *, droppable: bool = True, sizes: bool = False) -> list[Template]:
    """Our templates, most recently used first; ``droppable``: only those this role may drop (another role sharing
    the shadow server keeps its own, under its own key); ``sizes``: with each one's size on disk (a plan, which
    lists them up to three times, does not wait for the server to add up GitLab's thousands of files each time)."""
    rows = conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database'), CASE WHEN %s THEN pg_database_size(oid) END "
        "FROM pg_database WHERE datname LIKE %s AND (NOT %s OR pg_has_role(datdba, 'MEMBER'))",
        (sizes, _prefixed(TEMPLATE_PREFIX), droppable)).fetchall()
    found = []
    for name, comment, size in rows:
        data = _parse(comment)
        if data and isinstance(data.get("last_used"), int | float):
            found.append(Template(name=name, fingerprint=str(data.get("fingerprint", "")),
                                  kind=str(data.get("kind", "desired")), tool=str(data.get("tool", "")),
                                  last_used=datetime.fromtimestamp(data["last_used"], UTC), size_bytes=None if size is None else int(size),
                                  prefix=_prefix_of(data.get("prefix")), checkpoint=data.get("checkpoint") is True))
    return sorted(found, key=lambda t: t.last_used, reverse=True)


def _prefix_of(data: object) -> Prefix | None:
    if not isinstance(data, dict):
        return None
    base, count, chain, samples = data.get("base"), data.get("count"), data.get("chain"), data.get("samples", [])
    if not (isinstance(base, str) and isinstance(count, int) and isinstance(chain, str) and isinstance(samples, list)):
        return None
    pairs = tuple((n, d) for n, d in (s for s in samples if isinstance(s, list) and len(s) == 2)
                  if isinstance(n, int) and isinstance(d, str))
    return Prefix(base=base, count=count, chain=chain, samples=pairs)


def _drop(conn: psycopg.Connection[Any], name: str) -> bool:
    """Drop a kept database unless a plan is reading it (False)."""
    if not _exclusive(conn, name):
        return False
    try:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (READER_LOCK_CLASS, name))
    return True


def _prefixed(prefix: str) -> str:
    """A LIKE pattern for names starting with ``prefix`` (its underscores taken literally)."""
    return prefix.replace("_", "\\_") + "%"


def _lock_dsn(server: Server) -> str:
    return server.database_dsn(_LOCK_DATABASE)


def _database_of(dsn: str) -> str:
    name = database_name(dsn)
    if name is None:
        raise ValueError("the loaded database's DSN names no database")
    return name


def _describe(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        return exc.diag.message_primary
    if isinstance(exc, ReconcilerError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"
