"""libpq connection strings: pointing one at another database, and showing one without its secrets."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

_URL_PASSWORD = re.compile(r"(postgres(?:ql)?(?:\+\w+)?://[^:/@\s]*:)([^@\s]*)@")
_KV_PASSWORD = re.compile(r"(\b(?:password|sslpassword)\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def parse(dsn: str) -> dict[str, str]:
    """Parse a libpq DSN or URL; a malformed one is a config error that does not echo the secret."""
    from psycopg import conninfo  # psycopg takes a tenth of a second to import; redact() (every error line) needs none of it

    try:
        return {k: str(v) for k, v in conninfo.conninfo_to_dict(dsn).items() if v is not None}
    except Exception as exc:  # psycopg raises ProgrammingError with the raw text
        raise ConfigError(f"invalid database DSN {redact(dsn)!r}: {redact(str(exc))}") from None


def with_database(dsn: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    from psycopg import conninfo

    params = parse(dsn)
    params["dbname"] = dbname
    return conninfo.make_conninfo(**params)


def database_name(dsn: str) -> str | None:
    return parse(dsn).get("dbname")


def redact(text: str) -> str:
    """Hide passwords in a DSN or in any message that may quote one."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _KV_PASSWORD.sub(r"\1***", text)


def describe(dsn: str) -> str:
    """A short, secret-free name for a server and database, for logs and history rows."""
    try:
        params = parse(dsn)
    except ConfigError:
        return "<invalid dsn>"
    user = params.get("user", "")
    return f"{user + '@' if user else ''}{_server(params)}/{params.get('dbname', '')}"


def server(dsn: str) -> str:
    """The server a DSN points at, as ``host:port`` (a socket's folder as ``socket:/path``): the databases of a fleet
    that share it share its connections."""
    try:
        return _server(parse(dsn))
    except ConfigError:
        return "<invalid dsn>"


def _server(params: dict[str, str]) -> str:
    host = params.get("host", "localhost")
    if host.startswith("/"):
        host = f"socket:{host}"
    return f"{host}:{params.get('port', '5432')}"


def sqlalchemy_url(dsn: str) -> URL:
    """A SQLAlchemy URL with the psycopg 3 driver, as migra needs, for the same connection.

    Built with ``URL.create`` so names need no percent-quoting (SQLAlchemy does not unquote them).
    """
    from sqlalchemy.engine import URL

    params = parse(dsn)
    user = params.pop("user", None)
    password = params.pop("password", None)
    host = params.pop("host", None)
    port = params.pop("port", None)
    dbname = params.pop("dbname", None)
    if host is not None and (host.startswith("/") or "," in host):
        params["host"] = host  # a socket directory or several hosts: libpq reads them from the query
        if port is not None:
            params["port"] = port
        host, port = None, None
    return URL.create(
        "postgresql+psycopg",
        username=user,
        password=password,
        host=host,
        port=int(port) if port else None,
        database=dbname,
        query=params,
    )
