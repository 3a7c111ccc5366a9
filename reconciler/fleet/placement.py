"""Where a fleet's databases live, and how many connections the fleet takes on each server.

Work on a fleet is bounded per server, never per fleet: each server gets its own workers, as many as its share of
connections allows for the connections one database's work holds at once. A share is ``concurrency`` connections,
or half of what the server has free when the command starts if that is fewer, so a server with a low
``max_connections`` (or busy with its applications) is never exhausted by a fleet however large.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import psycopg

from .. import dsn as dsnlib
from ..errors import ReconcilerError
from ..servers import connect

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

PROBES = 3  # members of a server tried in turn to read its free connections (one may be gone)

_FREE = """
SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
       - coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0)
       - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')
"""


@dataclass(frozen=True)
class ServerShare:
    """A server of the fleet and the most connections the fleet's work may hold on it at once."""

    server: str  # host:port, as dsn.server gives it
    connections: int
    free: int | None  # free connections when it was asked (None: it could not be asked)

    def workers(self, need: int) -> int:
        """Databases worked on at once here when each holds ``need`` connections: at least one."""
        return max(1, self.connections // max(1, need))


def shares(dsns: Sequence[str], concurrency: int) -> dict[str, ServerShare]:
    """Each server's share, asked of the server once, over one connection (closed before any work starts)."""
    by_server: dict[str, list[str]] = {}
    for dsn in dsns:
        by_server.setdefault(dsnlib.server(dsn), []).append(dsn)
    found = {}
    for server, members in by_server.items():
        free = _free_connections(members[:PROBES])
        limit = concurrency if free is None else max(1, min(concurrency, free // 2))
        if free is not None and limit < concurrency:
            log.warning("server %s has %d connection(s) free: the fleet takes at most %d there (half of them), not %d%s",
                        server, free, limit, concurrency,
                        "; still one database at a time, and an apply holds two: it fails there if none frees up"
                        if free < 4 else "")
        found[server] = ServerShare(server, limit, free)
    return found


def _free_connections(dsns: Sequence[str]) -> int | None:
    for dsn in dsns:
        try:
            with connect(dsn, application_name="reconciler fleet") as conn:
                row = conn.execute(_FREE).fetchone()
                return int(row[0]) if row else None
        except (ReconcilerError, psycopg.Error):
            continue  # the database may be gone, or the server down: its members say so when they are worked on
    return None


def per_server(items: Sequence[T], dsn_of: Callable[[T], str], found: dict[str, ServerShare], need: int,
               work: Callable[[T], R], done: Callable[[R], None] | None = None) -> list[R]:
    """``work`` on every item, on each server as many at a time as its share allows (``need`` connections each);
    the results in the items' order. ``done`` is told of each result as it comes (progress)."""
    queues: dict[str, list[int]] = {}
    for position, item in enumerate(items):
        queues.setdefault(dsnlib.server(dsn_of(item)), []).append(position)
    results: list[R | None] = [None] * len(items)
    guard = threading.Lock()

    def drain(server: str, positions: list[int]) -> None:
        while True:
            with guard:
                if not positions:
                    return
                position = positions.pop(0)
            result = work(items[position])
            results[position] = result
            if done is not None:
                done(result)

    jobs = [(server, positions, found[server].workers(need) if server in found else 1)
            for server, positions in queues.items()]
    with ThreadPoolExecutor(max_workers=max(1, sum(n for *_rest, n in jobs)), thread_name_prefix="fleet") as pool:
        futures = [pool.submit(drain, server, positions) for server, positions, n in jobs for _ in range(n)]
        for future in futures:
            future.result()
    return [r for r in results if r is not None]  # every position was filled: work returns, never raises
