"""migra as a ``DiffEngine``: psycopg 3 driver, no connection pool, unsafe statements allowed.

migra and schemainspect are unmaintained (last release 2022): they stay behind this module and
every plan is checked against our own catalog snapshot. Never vendor their code.
"""

from __future__ import annotations

import logging
import traceback
import warnings
from contextlib import ExitStack
from typing import Any

import pglast

from .. import dsn as dsnlib
from ..errors import ReconcilerError
from .base import Change
from .classify import classify

log = logging.getLogger(__name__)


class MigraEngine:
    name = "migra"

    def diff(self, live_dsn: str, desired_dsn: str, *, exclude_schemas: tuple[str, ...]) -> list[Change]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # schemainspect imports pkg_resources, deprecated
            from migra import Migration
            from schemainspect import get_inspector
            from sqlalchemy import create_engine
            from sqlalchemy.pool import NullPool

        with ExitStack() as stack:
            inspectors: list[Any] = []
            for dsn in (live_dsn, desired_dsn):
                engine = create_engine(dsnlib.sqlalchemy_url(dsn), poolclass=NullPool)
                stack.callback(engine.dispose)
                try:
                    connection = stack.enter_context(engine.connect())
                except Exception as exc:  # SQLAlchemy wraps the driver's error
                    raise ReconcilerError(
                        f"migra cannot connect to {dsnlib.describe(dsn)}: {dsnlib.redact(str(getattr(exc, 'orig', exc)))}"
                    ) from None
                try:
                    inspected = get_inspector(connection)
                    for schema in exclude_schemas:
                        inspected.exclude_schema(schema)
                except Exception as exc:  # schemainspect's bugs: refuse clearly
                    raise ReconcilerError(f"schemainspect cannot read {dsnlib.describe(dsn)} "
                                          f"({type(exc).__name__}: {exc})") from exc
                inspectors.append(inspected)
            try:
                migration = Migration(inspectors[0], inspectors[1])
                migration.set_safety(False)
                migration.add_all_changes()
                raw = list(migration.statements)
            except Exception as exc:  # migra's own bugs on shapes it does not handle: a clear refusal, not a crash
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                raise ReconcilerError(f"the migra engine cannot diff these schemas ({detail}{_where(exc)}); "
                                      "this schema change is not supported yet") from exc
        return [self._change(piece) for statement in raw for piece in _split(statement)]

    def _change(self, statement: str) -> Change:
        kind, obj = classify(statement)
        return Change(sql=statement, kind=kind, object=obj, engine=self.name)


def _where(exc: BaseException) -> str:
    """Where in migra or schemainspect it failed (e.g. 'alter_rls_statement'): names what it cannot do."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/migra/" in f.filename or "/schemainspect/" in f.filename]
    if not frames:
        return ""
    names = [f.name for f in frames[-3:] if not f.name.startswith("_") and f.name != "<module>"]
    return f" in {' > '.join(names)}" if names else ""


def _split(statement: str) -> list[str]:
    """migra's entries may hold several statements (enum changes): one change per statement."""
    text = statement.strip()
    if not text:
        return []
    try:
        pieces = [text[s].strip() for s in pglast.split(text, with_parser=False, only_slices=True)]
    except pglast.parser.ParseError:
        return [text.rstrip(";").strip()]
    return [p for p in pieces if p]
