"""reconciler.dsn: redaction, descriptions, switching database, SQLAlchemy URLs."""

from __future__ import annotations

import pytest
from psycopg import sql
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from reconciler import dsn
from reconciler.servers import Server, connect

SECRET = "hunter2"


@pytest.mark.parametrize(
    "value",
    [
        f"postgresql://app:{SECRET}@db.example:5432/app",
        f"postgres://app:{SECRET}@db.example/app?sslmode=require",
        f"postgresql+psycopg://app:{SECRET}@db.example/app",  # what sqlalchemy_url() produces
        f"postgresql://:{SECRET}@db.example/app",  # empty user name, valid for libpq
        f"host=db.example user=app password={SECRET} dbname=app",
        f"host=db.example password = {SECRET} dbname=app",
        f"host=db.example password='{SECRET} with \\' quote' dbname=app",
        f"host=db.example sslpassword={SECRET}",
    ],
)
def test_redact_hides_password(value: str) -> None:
    redacted = dsn.redact(value)
    assert SECRET not in redacted
    assert "***" in redacted
    assert "db.example" in redacted


def test_redact_inside_longer_message() -> None:
    message = (
        f'connection to "postgresql://app:{SECRET}@h/db" failed; retried with '
        f"host=h user=app password={SECRET} dbname=db: timeout"
    )
    redacted = dsn.redact(message)
    assert SECRET not in redacted
    assert redacted.startswith('connection to "postgresql://app:***@h/db" failed')
    assert redacted.endswith("password=*** dbname=db: timeout")


def test_redact_leaves_secret_free_text_alone() -> None:
    text_ = "host=h user=app dbname=db and postgresql://app@h/db"
    assert dsn.redact(text_) == text_


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"postgresql://app:{SECRET}@db.example:6543/app", "app@db.example:6543/app"),
        (f"host=/tmp/sock port=5433 user=postgres password={SECRET} dbname=x", "postgres@socket:/tmp/sock:5433/x"),
        ("dbname=x", "localhost:5432/x"),
    ],
)
def test_describe(value: str, expected: str) -> None:
    described = dsn.describe(value)
    assert described == expected
    assert SECRET not in described


def test_describe_invalid_dsn_has_no_secret() -> None:
    assert dsn.describe(f"host=h password={SECRET} dbname") == "<invalid dsn>"


def test_with_database_keeps_credentials() -> None:
    for value in (
        f"postgresql://app:{SECRET}@db.example:6543/app?sslmode=require",
        f"host=db.example port=6543 user=app password={SECRET} dbname=app sslmode=require",
    ):
        params = dsn.parse(dsn.with_database(value, "other db"))
        assert params == {
            "host": "db.example", "port": "6543", "user": "app", "password": SECRET,
            "dbname": "other db", "sslmode": "require",
        }
        assert dsn.database_name(dsn.with_database(value, "other db")) == "other db"


def test_sqlalchemy_url_round_trips_special_characters() -> None:
    password = "p@ss:w/rd %é"
    url = make_url(dsn.sqlalchemy_url(f"host=db.example port=6543 user=app password='{password}' dbname=app"))
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.host, url.port, url.database) == ("app", password, "db.example", 6543, "app")


def _select_through_sqlalchemy(database_dsn: str) -> tuple[int, str]:
    url = dsn.sqlalchemy_url(database_dsn)
    assert url.drivername == "postgresql+psycopg"
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("select 1, current_database()")).one()
    finally:
        engine.dispose()
    return int(row[0]), str(row[1])


def test_sqlalchemy_url_connects_through_unix_socket(database: str) -> None:
    if not dsn.parse(database).get("host", "").startswith("/"):
        pytest.skip("the test server is not reached through a unix socket")
    assert _select_through_sqlalchemy(database) == (1, dsn.database_name(database))


def test_sqlalchemy_url_database_name_needing_quotes(pg_server: Server) -> None:
    name = "reconciler test é"
    with connect(pg_server.dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        assert _select_through_sqlalchemy(pg_server.database_dsn(name)) == (1, name)
    finally:
        with connect(pg_server.dsn) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
