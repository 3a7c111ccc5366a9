"""A way back: ``pg_dump -Fc`` of the target before the first step, and ``pg_restore`` to use it.

pg_dump must be at least as new as the server; the embedded wheel's pg_dump 18 dumps any server
from 9.2 on. The password travels in the environment, never on a command line.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import dsn as dsnlib
from .errors import ReconcilerError
from .rehearsal import client_bindir, libpq_env

log = logging.getLogger(__name__)

SCOPES = ("full", "touched", "none")


@dataclass(frozen=True)
class Backup:
    path: Path
    sha256: str
    size: int


def _quote(name: str) -> str:
    """A pg_dump pattern that matches exactly this schema-qualified name."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split(".", 1))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dump(
    target_dsn: str,
    *,
    server_major: int,
    path: Path,
    scope: str = "full",
    keep_data_of: Sequence[str] = (),
    all_tables: Sequence[str] = (),
    exclude_schemas: Sequence[str] = (),
) -> Backup:
    """``full``: the whole database. ``touched``: the whole schema plus the data of ``keep_data_of``
    (the tables the plan drops or rewrites)."""
    if scope not in ("full", "touched"):
        raise ReconcilerError(f"unknown backup scope {scope!r}: use full, touched or none")
    bindir = client_bindir(server_major)
    conninfo, env = libpq_env(target_dsn)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [str(bindir / "pg_dump"), "--format=custom", f"--file={path}", f"--dbname={conninfo}"]
    args += [f"--exclude-schema={_quote(s)}" for s in exclude_schemas]
    if scope == "touched":  # --exclude-table-data, not --filter: pg_dump before 17 has no --filter
        keep = set(keep_data_of)
        args += [f"--exclude-table-data={_quote(t)}" for t in all_tables if t not in keep]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=24 * 3600, check=False)
    if result.returncode != 0:
        path.unlink(missing_ok=True)
        raise ReconcilerError(f"backup with pg_dump failed: {dsnlib.redact(result.stderr.strip())[:500]}")
    backup = Backup(path=path, sha256=file_sha256(path), size=path.stat().st_size)
    log.info("backup %s: %d bytes, sha256 %s", path, backup.size, backup.sha256[:16])
    return backup


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
