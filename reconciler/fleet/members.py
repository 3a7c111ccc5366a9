"""The databases of a fleet as they are now: who each is, its live schema's fingerprint, or why it could not be read."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg

from .. import dsn as dsnlib
from .. import inspect
from ..config import Config
from ..errors import ReconcilerError
from ..pipeline import managed
from ..servers import connect
from .placement import ServerShare, per_server


@dataclass(frozen=True)
class Member:
    """One database of the fleet as inspected now; ``dsn`` is never printed (``label`` is)."""

    dsn: str
    label: str
    identity: inspect.TargetIdentity | None = None
    fingerprint: str | None = None
    error: str | None = None

    @property
    def server(self) -> str:
        return dsnlib.server(self.dsn)


def listed(dsns: Sequence[str]) -> list[Member]:
    """The databases as the fleet list gives them, not yet read (an apply reads each over its own connection)."""
    return [Member(d, dsnlib.describe(d)) for d in dsns]


def member_key(dsn: str) -> str:
    """What places a database in a shard: its server and name, so that its shard stays the same whatever else joins
    or leaves the list, and whatever credentials reach it."""
    return f"{dsnlib.server(dsn)}/{dsnlib.database_name(dsn) or ''}"


def label_key(label: str) -> str:
    """``member_key`` of a plan's fleet target, from its label (``dsn.describe``'s ``[user@]host:port/db``)."""
    head, _, tail = label.partition("@")
    return tail if tail and "/" not in head else label


def in_shard(key: str, shard: str | None) -> bool:
    """Is the database of ``key`` in shard ``I/N`` (already checked by select_shard or the argument's parser)?"""
    if not shard:
        return True
    index, count = (int(x) for x in shard.split("/", 1))
    return shard_of(key, count) == index


def select_shard(dsns: Sequence[str], shard: str | None) -> list[str]:
    """``I/N``: the databases whose key hashes to I modulo N (0-based), e.g. a Kubernetes indexed Job's pod I of N.
    By hash, not by position: pods reading the list at different times (a database added or removed between) still
    take every database exactly once."""
    if not shard:
        return list(dsns)
    try:
        index_text, count_text = shard.split("/", 1)
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ReconcilerError(f"--shard {shard!r}: use I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ReconcilerError(f"--shard {shard!r}: I must be between 0 and N-1")
    return [d for d in dsns if in_shard(member_key(d), shard)]


def shard_of(key: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % count


def survey(config: Config, dsns: Sequence[str], found: dict[str, ServerShare], *,
           done: Callable[[Member], None] | None = None) -> list[Member]:
    """Identity and live schema fingerprint of every database, one connection each, within each server's share."""
    excluded = (config.metadata_schema,)

    def one(dsn: str) -> Member:
        label = dsnlib.describe(dsn)
        try:
            with connect(dsn, application_name="reconciler fleet") as conn:
                ident = inspect.identity(conn)
                snap = inspect.snapshot(conn, exclude_schemas=excluded, **managed(config))
        except (ReconcilerError, psycopg.Error) as exc:
            return Member(dsn, label, error=dsnlib.redact(" ".join(str(exc).split())))
        return Member(dsn, label, ident, snap.fingerprint)

    return per_server(dsns, lambda d: d, found, 1, one, done)
