"""Test servers: a throwaway embedded PostgreSQL (or RECONCILER_TEST_DSN) and a fresh database per test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.servers import EmbeddedCluster, Server, connect, server_for_dsn, throwaway_database
from tests.repo import BASE_SCHEMA, Repo

TEST_DSN_ENV = "RECONCILER_TEST_DSN"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """One server for the session; each test gets its own databases on it."""
    dsn = os.environ.get(TEST_DSN_ENV)
    if dsn:
        yield server_for_dsn(dsn)
        return
    base = Path(tempfile.mkdtemp(prefix="reconciler-tests-"))
    cluster = EmbeddedCluster(base / "pg", durable=False)
    try:
        yield cluster.start()
    finally:
        cluster.stop(delete=True)


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


