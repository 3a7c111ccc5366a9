"""reconciler.source: ordered .sql files, fingerprint, git state."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reconciler.errors import ConfigError
from reconciler.source import load_source


def write(root: Path, rel: str, text: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=Test", *args],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


@pytest.fixture(autouse=True)
def no_outer_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never let git find a repository above tmp_path.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))


def test_files_in_sorted_relative_path_order_with_subfolders(tmp_path: Path) -> None:
    write(tmp_path, "b.sql", "select 2;")
    write(tmp_path, "a/z.sql", "select 1;")
    write(tmp_path, "a/b/c.sql", "select 0;")
    write(tmp_path, "a.sql", "select 3;")
    write(tmp_path, "notes.txt", "not sql")
    desired = load_source(tmp_path)
    assert [f.path for f in desired.files] == ["a.sql", "a/b/c.sql", "a/z.sql", "b.sql"]
    assert desired.files[0].text == "select 3;"


def test_hidden_folders_ignored(tmp_path: Path) -> None:
    write(tmp_path, "a.sql", "select 1;")
    write(tmp_path, ".hidden/b.sql", "select 2;")
    write(tmp_path, "x/.cache/c.sql", "select 3;")
    assert [f.path for f in load_source(tmp_path).files] == ["a.sql"]


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        write(root, "a.sql", "create table t (id int);")
        write(root, "sub/b.sql", "create table u (id int);")
    base = load_source(one).fingerprint
    assert base.startswith("sha256:")
    assert load_source(one).fingerprint == base
    assert load_source(two).fingerprint == base  # same content elsewhere

    write(two, "sub/b.sql", "create table u (id bigint);")
    assert load_source(two).fingerprint != base

    write(two, "sub/b.sql", "create table u (id int);")
    assert load_source(two).fingerprint == base
    (two / "sub/b.sql").rename(two / "sub/c.sql")
    assert load_source(two).fingerprint != base


def test_non_utf8_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "a.sql", "select 1;")
    write(tmp_path, "sub/bad.sql", b"select 1;\nselect 2;\nselect '\xff';\n")
    with pytest.raises(ConfigError, match=r"sub/bad\.sql:3: not valid UTF-8"):
        load_source(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_source(tmp_path / "nope")


def test_no_sql_files(tmp_path: Path) -> None:
    write(tmp_path, "readme.md", "hi")
    write(tmp_path, ".hidden/a.sql", "select 1;")
    with pytest.raises(ConfigError, match=r"no \.sql files"):
        load_source(tmp_path)


def test_git_commit_and_dirty(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    schemas = repo / "schemas"
    write(schemas, "a.sql", "create table t (id int);")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    clean = load_source(schemas)
    assert clean.git_commit == git(repo, "rev-parse", "HEAD")
    assert clean.dirty is False

    write(schemas, "a.sql", "create table t (id bigint);")
    dirty = load_source(schemas)
    assert dirty.git_commit == clean.git_commit
    assert dirty.dirty is True


def test_outside_git(tmp_path: Path) -> None:
    write(tmp_path, "a.sql", "select 1;")
    desired = load_source(tmp_path)
    assert (desired.git_commit, desired.dirty) == (None, False)
