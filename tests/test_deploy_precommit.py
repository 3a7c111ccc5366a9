"""deploy/pre-commit/ and .pre-commit-hooks.yaml, run by pre-commit on a sample project.

The example config is copied as a user would copy it into a git repository with reconciler.yaml,
schemas/ and policies/; `pre-commit run --all-files` passes on a good schema and fails on a bad one,
naming the file and line. The repository's own hook file is tried the way pre-commit installs it for
others (`pre-commit try-repo`: a virtualenv of its own with the package in it).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reconciler.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "pre-commit" / ".pre-commit-config.yaml"
HOOKS = ROOT / ".pre-commit-hooks.yaml"
VENV_BIN = Path(sys.executable).parent

GOOD_SCHEMA = "CREATE TABLE accounts (\n    id bigint PRIMARY KEY,\n    email text NOT NULL\n);\n"
RULES = """\
rules:
  - id: tables-have-primary-keys
    description: Every table has a primary key
    action: deny
    schema: {require_primary_key: true}
"""


def pre_commit() -> str:
    """pre-commit from the test extra, beside this Python: missing under CI fails."""
    found = VENV_BIN / "pre-commit"
    if not found.is_file() or shutil.which("git") is None:
        message = "pre-commit (the test extra) and git are needed"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return str(found)


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(project), *args],
                   check=True, capture_output=True)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project as `reconciler init` leaves it, under git, with the example config copied in as it is."""
    root = tmp_path / "project"
    root.mkdir()
    assert subprocess.run([str(VENV_BIN / "reconciler"), "init", str(root)], capture_output=True).returncode == 0
    (root / "schemas" / "001_app.sql").write_text(GOOD_SCHEMA)
    (root / "policies" / "schema.yaml").write_text(RULES)
    shutil.copy(EXAMPLE, root / ".pre-commit-config.yaml")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", ".")
    git(root, "commit", "-q", "--no-verify", "-m", "schema")
    return root


def run(project: Path, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """pre-commit as a user runs it: the project's virtualenv first on PATH (where `reconciler` is)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home")}
    return subprocess.run([pre_commit(), *argv], cwd=project, env=env, capture_output=True, text=True, timeout=600)


def test_hook_files_agree_and_run_reconciler_lint() -> None:
    """The example's local hook and the repository's hook file run the same command on the same files."""
    (example,) = [doc for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc]
    ((local,),) = [r["hooks"] for r in example["repos"]]
    assert [r["repo"] for r in example["repos"]] == ["local"] and local["language"] == "system"
    (published,) = yaml.safe_load(HOOKS.read_text())
    assert published["language"] == "python"  # pre-commit installs this repository's package for it
    shared = ("id", "name", "entry", "pass_filenames", "files")
    assert {k: local[k] for k in shared} == {k: published[k] for k in shared}
    program, *argv = shlex.split(local["entry"])
    assert program == "reconciler" and build_parser().parse_args(argv).command == "lint"
    files = re.compile(local["files"])
    assert files.search("schemas/10_tables.sql") and files.search("policies/schema.yaml")
    assert files.search("reconciler.yaml") and not files.search("README.md")


def test_example_config_passes_a_good_schema_and_names_a_bad_line(project: Path, tmp_path: Path) -> None:
    passed = run(project, tmp_path, "run", "--all-files")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert re.search(r"reconciler lint\.+Passed", passed.stdout), passed.stdout
    # a table without a primary key: the deny rule fires, naming the rule's file and line and the table
    (project / "schemas" / "002_events.sql").write_text("CREATE TABLE events (id bigint, body text);\n")
    git(project, "add", ".")
    denied = run(project, tmp_path, "run", "--all-files")
    assert denied.returncode == 1 and re.search(r"reconciler lint\.+Failed", denied.stdout), denied.stdout
    assert "exit code: 3" in denied.stdout
    assert "deny: tables-have-primary-keys (schema.yaml:2) table public.events: has no primary key" in denied.stdout
    # SQL that does not parse: the file and line
    (project / "schemas" / "002_events.sql").write_text("CREATE TABLE events (id bigint PRIMARY KEY);\n"
                                                        "CREATE TABLEX broken (id int);\n")
    git(project, "add", ".")
    broken = run(project, tmp_path, "run", "--all-files")
    assert broken.returncode == 1 and "002_events.sql:2:" in broken.stdout, broken.stdout


def test_example_config_runs_only_when_the_schema_changes(project: Path, tmp_path: Path) -> None:
    """A commit that touches neither schemas/, policies/ nor reconciler.yaml skips the hook."""
    (project / "schemas" / "002_events.sql").write_text("CREATE TABLE events (id bigint, body text);\n")
    (project / "NOTES.md").write_text("notes\n")
    git(project, "add", "NOTES.md")
    skipped = run(project, tmp_path, "run")  # the staged files only
    assert skipped.returncode == 0 and re.search(r"reconciler lint\.+\(no files to check\)Skipped", skipped.stdout), \
        skipped.stdout


def test_repository_hook_file_installs_reconciler_itself(project: Path, tmp_path: Path) -> None:
    """`repo: <pg-reconciler>` with its .pre-commit-hooks.yaml: pre-commit builds a virtualenv with the
    package in it, so the hook works where no reconciler is on PATH."""
    env_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                               if not (Path(p) / "reconciler").exists())
    env = {**os.environ, "PATH": env_path, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home")}
    command = [pre_commit(), "try-repo", str(ROOT), "reconciler-lint", "--all-files"]
    tried = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert tried.returncode == 0 and re.search(r"reconciler lint\.+Passed", tried.stdout), tried.stdout + tried.stderr
