"""A git repository holding a schemas/ folder of two files (accounts, ledger) and a reconciler.yaml whose 'test'
environment is a fresh test database built from them: for tests of what plans say about the desired files' lines."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

from reconciler.cli import main
from reconciler.plan import Plan
from reconciler.planfile import read_plan
from reconciler.servers import Server
from tests.conftest import run_sql

TABLES = """\
-- the accounts
CREATE TABLE accounts (
    id bigint PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text
);
"""
LEDGER = """\
CREATE TABLE ledger (
    id bigint PRIMARY KEY,
    account_id bigint REFERENCES accounts (id),
    amount int NOT NULL CHECK (amount > 0)
);
CREATE INDEX ledger_account_idx ON ledger (account_id);

CREATE TABLE old_audit (id int);
"""


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def plan_in(root: Path, name: str, *extra: str) -> Plan:
    """``reconciler plan`` in the repository's db/ folder, the plan file read back."""
    assert main(["--config", str(root / "reconciler.yaml"), "plan", "--env", "test", "-o", str(root / name),
                 *extra]) in (0, 2)
    return read_plan(root / name)


def make_repository(tmp_path: Path, database: str, pg_server: Server) -> Path:
    """A git repository whose schemas/ folder holds two files, committed, and a database built from them."""
    (tmp_path / "db" / "schemas").mkdir(parents=True)
    (tmp_path / "db" / "reconciler.yaml").write_text(textwrap.dedent(f"""\
        environments:
          test:
            database: "{database}"
            shadow: "{pg_server.dsn}"
            require_signed_plans: false
        shadow_cache: 0
        """))
    (tmp_path / "db" / "schemas" / "10_tables.sql").write_text(TABLES)
    (tmp_path / "db" / "schemas" / "20_ledger.sql").write_text(LEDGER)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    run_sql(database, TABLES + LEDGER)
    return tmp_path
