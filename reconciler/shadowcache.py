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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from . import __version__
from .dsn import database_name
from .errors import ReconcilerError
from .servers import Server, connect, drop_database
from .shadow import same_cluster
from .source import DesiredSchema

log = logging.getLogger(__name__)

TEMPLATE_PREFIX = "reconciler_template_"
COPY_PURPOSE = "shadow"  # copies are named like throwaway shadows: reconciler_shadow_<hex>
MARKER = "reconciler shadow template"
LOCK_KEY = 0x7265636F6E636163  # one key for every process using the server's cache
READER_LOCK_CLASS = 0x7265  # (class, hashtext(name)): a plan reads that kept database (shared), eviction (exclusive)
LOCK_TIMEOUT = "120s"  # a copy takes seconds; past this the plan loads the schema instead of waiting
_LOCK_DATABASE = "postgres"  # advisory locks are per database: every process locks in the same one


@dataclass(frozen=True)
class CacheKey:
    digest: str  # sha256 hex of everything that decides the loaded result
    fingerprint: str  # the desired schema's, for people reading the template's comment
    kind: str = "desired"  # or "live copy": each kind keeps its own most recently used templates

    @property
    def template(self) -> str:
        return TEMPLATE_PREFIX + self.digest[:16]


@dataclass(frozen=True)
class Template:
    name: str
    fingerprint: str
    kind: str
    tool: str
    last_used: datetime
    size_bytes: int


@contextlib.contextmanager
def desired_database(
    server: Server,
    source: DesiredSchema,
    load: Callable[[str], int],
    *,
    target_dsn: str,
    keep: int,
) -> Iterator[str]:
    """A scratch database on ``server`` holding ``source``, dropped afterwards: a copy of the cached template when
    there is one, else loaded with ``load`` (which returns the number of statements run) and kept as a template."""
    key: CacheKey | None = None
    if keep > 0:
        try:
            key = _key_if_cacheable(server, source, target_dsn)
        except Exception as exc:  # the cache is an optimisation: whatever fails, load as without it
            log.warning("shadow cache: %s; loading the desired schema instead", _describe(exc))

    def build(dsn: str) -> None:
        count = load(dsn)
        log.info("loaded %d statements from %d file(s) into the shadow database", count, len(source.files))

    with cached_database(server, key, build, keep=keep, purpose=COPY_PURPOSE, shared=True,
                         what=f"the shadow database (desired schema {source.fingerprint})") as dsn:
        yield dsn


@contextlib.contextmanager
def cached_database(server: Server, key: CacheKey | None, build: Callable[[str], None], *, keep: int, purpose: str,
                    what: str, modifies: bool = False, shared: bool = False) -> Iterator[str]:
    """A scratch database on ``server`` holding what ``build`` puts in it. ``shared`` (the block leaves it as it was):
    the key's kept database itself, read-only by default, given to as many blocks at once as ask for it. Otherwise
    a copy of it. When there is none it is built, and kept under the key afterwards instead of being dropped (when
    the block ends normally or with a refusal); a block that ``modifies`` it gets a copy of what was just kept.
    Without a key it is built and dropped, as any scratch database."""
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
        try:
            copy = _copy_template(server, key, purpose)
        except Exception as exc:  # the cache is an optimisation: whatever fails, build as without it
            log.warning("shadow cache: %s; building %s instead", _describe(exc), what)
            key = None
    if copy is not None and key is not None:
        log.info("shadow cache: %s is a copy of kept database %s; not built again", what, key.template)
        try:
            yield server.database_dsn(copy)
        finally:
            drop_database(server, copy)
        return
    name = f"reconciler_{purpose}_{secrets.token_hex(5)}"
    with connect(server.dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    kept = False
    try:
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


def _keep_quietly(server: Server, name: str, key: CacheKey | None, keep: int, what: str) -> bool:
    if key is None:
        return False
    try:
        return _keep(server, name, key, keep)
    except Exception as exc:
        log.warning("shadow cache: could not keep %s as a template: %s", what, _describe(exc))
        return False


def list_templates(server: Server) -> list[Template]:
    """The cached templates on ``server``, most recently used first."""
    with connect(_lock_dsn(server), application_name="reconciler shadow cache") as conn:
        return _templates(conn, droppable=False)


def clear(server: Server) -> list[str]:
    """Drop the kept databases this role may drop and no plan is reading, on ``server``; returns their names."""
    with _locked(server) as conn:
        names = [t.name for t in _templates(conn) if _drop(conn, t.name)]
    if names:
        log.info("shadow cache: dropped %s", ", ".join(names))
    return names


# --- key and eligibility -------------------------------------------------------------------------

def _key_if_cacheable(server: Server, source: DesiredSchema, target_dsn: str) -> CacheKey | None:
    shared = same_cluster(target_dsn, server.dsn)
    if shared and not server.embedded:
        log.debug("shadow cache: off, the shadow server is the target's cluster (templates are kept on shadow servers "
                  "of ours only)")
        return None
    with connect(_lock_dsn(server), application_name="reconciler shadow cache") as conn:
        row = conn.execute("SELECT current_setting('server_version_num'), current_user").fetchone()
    assert row is not None
    parts = {
        "fingerprint": source.fingerprint,
        "tool": __version__,
        "server_version_num": row[0],
        "role": row[1],
        "creates_roles": not shared,  # pipeline.load_desired creates the schema's roles on a server not the target's
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return CacheKey(digest=digest, fingerprint=source.fingerprint)


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
             "excluded": sorted(exclude_schemas), "tool": __version__}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return CacheKey(digest=digest, fingerprint=live_fingerprint, kind="live copy")


# --- under the lock --------------------------------------------------------------------------------

def _copy_template(server: Server, key: CacheKey, purpose: str) -> str | None:
    """A new database copied from the key's kept database, or None when there is none or a plan is reading it
    (``CREATE DATABASE ... TEMPLATE`` needs it to have no connection; new readers wait for the lock held here)."""
    copy = f"reconciler_{purpose}_{secrets.token_hex(5)}"
    with _locked(server) as conn:
        if _comment_of(conn, key.template).get("key") != key.digest or not _exclusive(conn, key.template):
            return None
        try:
            _create_from(conn, copy, key.template)
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(copy)))
            raise
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (READER_LOCK_CLASS, key.template))
        _comment(conn, key.template, key)
    return copy


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
        target = sql.Identifier(name)
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(target))
        # the plan closed its connections; a straggler (a connection still closing) would block the rename
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                     "AND pid <> pg_backend_pid()", (name,))
        _comment(conn, name, key)
        conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(target))
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(target, sql.Identifier(key.template)))
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(key.template)))
        log.info("shadow cache: kept %s %s as %s", key.kind, key.fingerprint, key.template)
        _evict(conn, [t for t in _templates(conn) if t.kind == key.kind][keep:], keep)
    return True


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
    text = json.dumps({"marker": MARKER, "key": key.digest, "fingerprint": key.fingerprint, "kind": key.kind,
                       "tool": __version__, "last_used": row[0]}, sort_keys=True)
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


def _templates(conn: psycopg.Connection[Any], *, droppable: bool = True) -> list[Template]:
    """Our templates, most recently used first; ``droppable``: only those this role may drop (another role sharing
    the shadow server keeps its own, under its own key)."""
    rows = conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database'), pg_database_size(oid) FROM pg_database "
        "WHERE datname LIKE %s AND (NOT %s OR pg_has_role(datdba, 'MEMBER'))",
        (_prefixed(TEMPLATE_PREFIX), droppable)).fetchall()
    found = []
    for name, comment, size in rows:
        data = _parse(comment)
        if data and isinstance(data.get("last_used"), int | float):
            found.append(Template(name=name, fingerprint=str(data.get("fingerprint", "")),
                                  kind=str(data.get("kind", "desired")), tool=str(data.get("tool", "")),
                                  last_used=datetime.fromtimestamp(data["last_used"], UTC), size_bytes=int(size)))
    return sorted(found, key=lambda t: t.last_used, reverse=True)


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
