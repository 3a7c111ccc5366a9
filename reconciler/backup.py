"""A way back: ``pg_dump -Fc`` of the target before the first step, and ``pg_restore`` to use it.

pg_dump must be at least as new as the server; the embedded wheel's pg_dump 18 dumps any server
from 9.2 on. The password travels in the environment, never on a command line. A backup holds the
data: its file is created private to its owner (0600), in a folder made private (0700), and written
under a ``.partial`` name until pg_dump has finished, so a cut-short dump is never taken for one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import dsn as dsnlib
from .errors import ReconcilerError
from .servers import client_bindir, libpq_env

log = logging.getLogger(__name__)

SCOPES = ("full", "touched", "none")
_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Backup:
    path: Path
    sha256: str
    size: int

    def describe(self) -> str:
        return f"{self.path} ({_size(self.size)}, sha256 {self.sha256[:16]})"


class Stopped(ReconcilerError):
    """The dump was stopped on request (``reconciler cancel``) before it finished."""


def _size(size: int) -> str:
    if size < 1024:
        return f"{size:,} bytes"
    value, units = size / 1024, ["KiB", "MiB", "GiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]}"


def _quote(parts: Sequence[str]) -> str:
    """A pg_dump pattern that matches exactly this name, each part quoted (a part may hold a dot)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in parts)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def private_folder(folder: Path) -> None:
    """Make ``folder`` (0700) if missing; say so when one that exists lets others in (its files are still 0600)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & 0o077:
        log.warning("the backups folder %s is open to others (mode %o): backups in it are private (0600), but their "
                    "names are listed; chmod 700 it", folder, mode)


def _private_file(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    os.close(fd)


def dump(
    target_dsn: str,
    *,
    server_major: int,
    path: Path,
    scope: str = "full",
    keep_data_of: Sequence[str] = (),
    all_tables: Sequence[tuple[str, str]] = (),
    exclude_schemas: Sequence[str] = (),
    stop: Callable[[], bool] | None = None,
    lock_wait_seconds: float | None = None,
) -> Backup:
    """``full``: the whole database. ``touched``: the whole schema plus the data of ``keep_data_of`` (the tables the
    plan drops or rewrites, as ``schema.table``), of ``all_tables`` (schema, table). ``stop`` is asked twice a second
    while pg_dump runs: True ends the dump (``Stopped``). ``lock_wait_seconds`` bounds pg_dump's wait for each table's
    lock."""
    if scope not in ("full", "touched"):
        raise ReconcilerError(f"unknown backup scope {scope!r}: use full, touched or none")
    bindir = client_bindir(server_major)
    conninfo, env = libpq_env(target_dsn)
    private_folder(path.parent)
    partial = path.with_name(path.name + ".partial")
    try:
        _private_file(partial)
    except OSError as exc:
        raise ReconcilerError(f"cannot write the backup {partial}: {exc.strerror or exc}") from None
    args = [str(bindir / "pg_dump"), "--format=custom", f"--file={partial}", f"--dbname={conninfo}"]
    if lock_wait_seconds is not None:  # a table locked elsewhere fails the dump after this wait, naming the table
        args.append(f"--lock-wait-timeout={max(1, int(lock_wait_seconds * 1000))}")
    args += [f"--exclude-schema={_quote([s])}" for s in exclude_schemas]
    if scope == "touched":  # --exclude-table-data, not --filter: pg_dump before 17 has no --filter
        keep = set(keep_data_of)
        args += [f"--exclude-table-data={_quote(t)}" for t in all_tables if f"{t[0]}.{t[1]}" not in keep]
    try:
        _run_pg_dump(args, env, stop)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    backup = Backup(path=path, sha256=file_sha256(path), size=path.stat().st_size)
    log.info("backup %s", backup.describe())
    return backup


def _run_pg_dump(args: list[str], env: dict[str, str], stop: Callable[[], bool] | None) -> None:
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, env=env,
                                   text=True, umask=0o077)
        deadline = time.monotonic() + 24 * 3600
        try:
            while True:
                try:
                    process.wait(_POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    if stop is not None and stop():
                        raise Stopped("the backup was stopped before it finished") from None
                    if time.monotonic() > deadline:
                        raise ReconcilerError("backup with pg_dump took over 24 hours: stopped") from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
            raise
        if process.returncode != 0:
            errors.seek(0)
            raise ReconcilerError(f"backup with pg_dump failed: {dsnlib.redact(errors.read().strip())[:500]}")


def restore(archive: Path, into_dsn: str, *, server_major: int, expected_sha256: str | None, clean: bool) -> None:
    """Restore an archive; refuses one whose checksum no longer matches the history row."""
    if not archive.is_file():
        raise ReconcilerError(f"backup {archive} does not exist")
    if expected_sha256 is not None and file_sha256(archive) != expected_sha256:
        raise ReconcilerError(f"backup {archive} does not match the sha256 recorded for its run: refusing to restore it")
    bindir = client_bindir(server_major)
    conninfo, env = libpq_env(into_dsn)
    args = [str(bindir / "pg_restore"), "--no-owner", "--exit-on-error", f"--dbname={conninfo}"]
    if clean:
        args += ["--clean", "--if-exists"]
    result = subprocess.run([*args, str(archive)], capture_output=True, text=True, env=env, timeout=24 * 3600,
                            check=False)
    if result.returncode != 0:
        raise ReconcilerError(f"pg_restore into {dsnlib.describe(into_dsn)} failed: {dsnlib.redact(result.stderr.strip())[:500]}")


def schema_sql(archive: Path, out: Path, *, server_major: int, expected_sha256: str | None) -> None:
    """The schema part of an archive as plain SQL (no owners or grants): a desired schema to go back to."""
    if expected_sha256 is not None and file_sha256(archive) != expected_sha256:
        raise ReconcilerError(f"backup {archive} does not match the sha256 recorded for its run")
    bindir = client_bindir(server_major)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([str(bindir / "pg_restore"), "--schema-only", "--no-owner", "--no-privileges",
                             f"--file={out}", str(archive)], capture_output=True, text=True, timeout=3600, check=False)
    if result.returncode != 0:
        raise ReconcilerError(f"pg_restore could not read {archive}: {result.stderr.strip()[:500]}")
