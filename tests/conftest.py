"""Test servers: a throwaway embedded PostgreSQL (or RECONCILER_TEST_DSN) and a fresh database per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.servers import Server, connect, scratch_server, throwaway_database
from tests.repo import BASE_SCHEMA, Repo

TEST_DSN_ENV = "RECONCILER_TEST_DSN"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """One server for the session; each test gets its own databases on it."""
    with scratch_server(os.environ.get(TEST_DSN_ENV), prefix="reconciler-tests-") as server:
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


