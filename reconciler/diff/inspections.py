"""What schemainspect read of a database, kept on disk and used again while the database's catalogs stay the same.

Inspecting a big schema is most of a diff's time (half a second for 1,000 tables, seconds for GitLab's). A kept
shadow database never changes, and a live one seldom does between two plans: so each inspection is saved under a
key made of what decides it. The catalogs' change token (per catalog, how many rows and the sum of the transaction
ids that wrote them: DDL writes catalog rows, ANALYZE and VACUUM update them in place) catches every change,
including any our snapshot does not look at; with it go our snapshot's fingerprint, the cluster, the server version,
the role that reads and the roles' names (shared catalogs), the excluded schemas and the versions of the tool, migra
and schemainspect. Not the database's name: a copy made with ``CREATE DATABASE ... TEMPLATE`` has the same catalogs,
and the same inspection (a desired database loaded under a scratch name, then kept under its own).

The files are pickles of schemainspect's objects, in the user's own cache folder (created private to the user). Unpickling
runs code, so a file is read only when it and every folder of the cache down to it are the user's own and private (as
the memory folder is checked, ``servers.memory_dir``); anything else is refused with a warning and the database read
again. A file that cannot be read is a miss. The most recently used few are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import stat
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from psycopg import sql

from .. import __version__
from .. import dsn as dsnlib
from ..servers import connect

log = logging.getLogger(__name__)

KEEP = 8  # inspections kept on disk: a few targets and their shadows
FORMAT = 2  # what a saved inspection holds; 2: read over psycopg (no SQLAlchemy type objects in its columns)
# every catalog schemainspect (or a supplement) reads: any DDL writes rows in some of them
_CATALOGS = ("pg_namespace", "pg_class", "pg_attribute", "pg_attrdef", "pg_constraint", "pg_index", "pg_type",
             "pg_enum", "pg_range", "pg_proc", "pg_aggregate", "pg_operator", "pg_cast", "pg_depend", "pg_rewrite",
             "pg_trigger", "pg_event_trigger", "pg_policy", "pg_sequence", "pg_extension", "pg_collation",
             "pg_description", "pg_inherits", "pg_default_acl", "pg_statistic_ext", "pg_ts_config", "pg_ts_dict",
             "pg_foreign_table", "pg_partitioned_table", "pg_publication_rel")
_UNSAVED = ("c", "engine", "dialect")  # schemainspect's connection attributes: not data


def default_folder() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "reconciler" / "inspections"


def catalog_token(conn: Any) -> str:
    """Changes whenever a catalog row is written (per catalog: row count and the sum of the writers' ids)."""
    parts = [sql.SQL("SELECT {}, count(*), coalesce(sum(xmin::text::bigint), 0) FROM {}").format(
        sql.Literal(name), sql.Identifier("pg_catalog", name)) for name in _CATALOGS]
    rows = conn.execute(sql.SQL(" UNION ALL ").join(parts)).fetchall()  # in any order: a parallel append
    return hashlib.sha256(json.dumps(sorted([list(map(str, r)) for r in rows])).encode()).hexdigest()


def catalog_state(conn: Any) -> dict[str, Any]:
    """What every reading of a database's schema depends on, now: the cluster, the roles (shared catalogs: their
    names in grants and owners, and memberships) and the catalog change token."""
    row = conn.execute("SELECT (SELECT system_identifier::text FROM pg_control_system()), "
                       "current_setting('server_version_num'), current_user, current_database(), "
                       "(SELECT md5(string_agg(oid::text || ' ' || rolname, ',' ORDER BY oid)) FROM pg_roles), "
                       "(SELECT md5(string_agg(roleid::text || ' ' || member::text, ',' ORDER BY roleid, member)) "
                       " FROM pg_auth_members)").fetchone()
    cluster = list(row or ())
    del cluster[3]  # the database's name: a template's copy has the same catalogs, and the same inspection
    return {"cluster": cluster, "database": (row or (None,) * 4)[3], "token": catalog_token(conn)}


def inspection_key(dsn: str, fingerprint: str, exclude_schemas: tuple[str, ...]) -> str:
    """What the inspection of ``dsn`` (whose snapshot has ``fingerprint``) depends on, now."""
    with connect(dsn, application_name="reconciler inspect") as conn:
        state = catalog_state(conn)
    parts = {"cluster": state["cluster"], "token": state["token"], "fingerprint": fingerprint,
             "excluded": sorted(exclude_schemas), "format": FORMAT, "tool": __version__, "migra": _version("migra"),
             "schemainspect": _version("schemainspect")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class InspectionCache:
    """Inspections by key, in ``folder``."""

    def __init__(self, folder: Path, keep: int = KEEP) -> None:
        self.folder, self.keep = folder, keep

    def load(self, key: str, inspector: type[Any], dsn: str) -> Any | None:
        """schemainspect's inspection saved under ``key``, as an instance of ``inspector`` (None: none saved)."""
        state = self._read(self.folder / f"{key}.pickle", dsn)
        if not isinstance(state, dict):
            return None
        log.info("inspection cache: %s has the catalogs it had when it was last read: that reading is used",
                 dsnlib.describe(dsn))
        inspected = object.__new__(inspector)
        inspected.__dict__.update(state)
        inspected.c, inspected.engine, inspected.dialect = None, None, "postgresql"
        return inspected

    def store(self, key: str, inspected: Any) -> None:
        self._write(self.folder / f"{key}.pickle", {k: v for k, v in vars(inspected).items() if k not in _UNSAVED})

    def load_answers(self, key: str, dsn: str) -> dict[str, list[Any]]:
        """The supplements' catalog queries and their rows, saved under ``key`` (empty: none saved)."""
        answers = self._read(self.folder / "answers" / f"{key}.pickle", dsn)
        return answers if isinstance(answers, dict) else {}

    def store_answers(self, key: str, answers: dict[str, list[Any]]) -> None:
        self._write(self.folder / "answers" / f"{key}.pickle", answers)

    def clear(self) -> int:
        """Remove every saved inspection and answer; returns how many files."""
        removed = 0
        for path in [*self.folder.glob("*.pickle"), *self.folder.glob("answers/*.pickle")]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed

    def untrusted(self, path: Path) -> str | None:
        """Why ``path`` must not be unpickled (None: it may): it, and each folder from the cache's own down to it,
        must be a real folder or file (no symbolic link) of this user's, which no one else can read or write."""
        owner = os.geteuid()
        places = [self.folder, *reversed(path.relative_to(self.folder).parents[:-1]), path]
        for place in (self.folder / p if not p.is_absolute() else p for p in places):
            st = os.lstat(place)
            kind_ok = stat.S_ISREG(st.st_mode) if place == path else stat.S_ISDIR(st.st_mode)
            if not kind_ok:
                return f"{place} is not a {'file' if place == path else 'folder'} (a link?)"
            if st.st_uid != owner:
                return f"{place} belongs to uid {st.st_uid}, not {owner}"
            if stat.S_IMODE(st.st_mode) & 0o077:
                return f"{place} is open to others (mode {stat.S_IMODE(st.st_mode):o})"
        return None

    def _read(self, path: Path, dsn: str) -> object:
        try:
            refused = self.untrusted(path)
            if refused is not None:
                log.warning("inspection cache: not reading %s: %s; reading %s again", path, refused, dsnlib.describe(dsn))
                return None
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                found = pickle.load(f)  # checked above: the user's own file, in the user's own private folders
            os.utime(path)
        except FileNotFoundError:
            return None
        except Exception as exc:  # a damaged or foreign file: read the database again
            log.warning("inspection cache: cannot read %s (%s); reading %s again", path, exc, dsnlib.describe(dsn))
            return None
        log.debug("inspection cache: %s read from %s", dsnlib.describe(dsn), path)
        return found

    def _write(self, path: Path, value: object) -> None:
        written = ""
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            for folder in {self.folder, path.parent}:
                folder.chmod(0o700)  # the tool's own cache folders (made above; an older tool made them with the umask)
            with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=".tmp", delete=False) as f:
                written = f.name
                pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(written, path)  # whole or not at all, for a reader at the same time
            kept = sorted(path.parent.glob("*.pickle"), key=lambda p: p.stat().st_mtime, reverse=True)
            for stale in kept[self.keep:]:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        except Exception as exc:  # the cache is an optimisation: the plan goes on without it
            log.warning("inspection cache: cannot save in %s (%s)", path.parent, exc)
            if written:
                with contextlib.suppress(OSError):
                    os.unlink(written)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""
