"""The desired schema: the ``.sql`` files of a folder, in path order, fingerprinted and tied to git."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class SchemaFile:
    path: str  # relative to the schemas folder, with forward slashes
    sha256: str
    text: str


@dataclass(frozen=True)
class DesiredSchema:
    root: Path
    files: tuple[SchemaFile, ...]
    fingerprint: str
    git_commit: str | None
    dirty: bool
    folder: str = ""  # the folder's path in its git repository (where a file's line is shown in a pull request)


def load_source(root: Path) -> DesiredSchema:
    """Read every ``.sql`` file under ``root``; order is the sorted relative path, subfolders included."""
    root = root.resolve()
    if not root.is_dir():
        raise ConfigError(f"schemas folder {root} does not exist")
    paths = sorted(
        (p for p in root.rglob("*.sql") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not paths:
        raise ConfigError(f"no .sql files in {root}")
    files = []
    outer = hashlib.sha256()
    for path in paths:
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{rel}:{line}: not valid UTF-8 ({exc.reason})") from None
        digest = hashlib.sha256(data).hexdigest()
        files.append(SchemaFile(path=rel, sha256=digest, text=text))
        outer.update(f"{rel}\0{digest}\n".encode())
    commit, dirty = git_state(root)
    return DesiredSchema(
        root=root,
        files=tuple(files),
        fingerprint="sha256:" + outer.hexdigest(),
        git_commit=commit,
        dirty=dirty,
        folder=git_folder(root) if commit else "",
    )


def git_folder(folder: Path) -> str:
    """The folder's path from its repository's top ('' at the top)."""
    try:
        found = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-prefix"], capture_output=True, text=True,
                               check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return found.stdout.strip().rstrip("/") if found.returncode == 0 else ""


def git_state(folder: Path) -> tuple[str | None, bool]:
    """HEAD's commit and whether the folder has uncommitted changes; (None, False) outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True, text=True, check=False, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    if head.returncode != 0:
        return None, False
    status = subprocess.run(
        ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=normal", "--", "."],
        capture_output=True, text=True, check=False, timeout=60,
    )
    return head.stdout.strip(), bool(status.stdout.strip())
