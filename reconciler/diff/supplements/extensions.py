"""Extension versions: an extension live has at another version than the desired schema's is updated in place
(ALTER EXTENSION ... UPDATE TO) when live's server ships that version and a way there from live's; otherwise the
plan is refused, naming the extension and the version live's server lacks. migra's own update statement (its
version written unquoted into the text) is replaced, and a new extension at a version live's server does not ship
is refused the same way, at plan time rather than when the rehearsal fails.

What live's server ships is read at each plan, never kept with the catalog answers: installing a package changes it
and no catalog."""

from __future__ import annotations

from psycopg import sql

from ...errors import RefusedError
from ..base import Change
from . import Context, change, first_index, insert_at, managed

_EXTENSIONS = f"""
SELECT x.extname, x.extversion
FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace
WHERE x.extname <> 'plpgsql' AND {managed('n')}
"""

_SHIPPED = "SELECT version FROM pg_available_extension_versions WHERE name = %s"
_PATH = "SELECT path FROM pg_extension_update_paths(%s) WHERE source = %s AND target = %s"


def _missing(context: Context, name: str, version: str) -> RefusedError:
    shipped = [r[0] for r in context.live.execute(_SHIPPED, (name,)).fetchall()]
    have = ", ".join(sorted(shipped)) if shipped else "none"
    return RefusedError(f"extension {name}: the desired schema has version {version}, which the target's server does "
                        f"not have (versions there: {have}); install it on the target's server, or ask for one of those "
                        "in the schema's CREATE EXTENSION ... VERSION")


def _ships(context: Context, name: str, version: str) -> bool:
    return any(r[0] == version for r in context.live.execute(_SHIPPED, (name,)).fetchall())


def extension_versions(context: Context, changes: list[Change]) -> list[Change]:
    live, desired = context.keyed(_EXTENSIONS)
    updates: list[Change] = []
    for name, (want,) in sorted(desired.items()):
        have = live.get(name)
        if have is not None and have[0] == want:
            continue
        if not _ships(context, name, want):
            raise _missing(context, name, want)
        if have is None:
            continue  # migra creates it, at that version
        row = context.live.execute(_PATH, (name, have[0], want)).fetchone()
        if row is None or row[0] is None:
            raise RefusedError(f"extension {name}: the target's server has no update from version {have[0]} to "
                               f"{want}, the desired schema's (extensions are seldom downgraded); ask for {have[0]} or "
                               "a later version in the schema's CREATE EXTENSION ... VERSION")
        updates.append(change(sql.SQL("ALTER EXTENSION {} UPDATE TO {}").format(sql.Identifier(name), sql.Literal(want)),
                              "alter_extension", name))
    updated = {c.object for c in updates}
    out = [c for c in changes if not (c.kind == "alter_extension" and c.object in updated)]
    # right after schemas and new extensions: what the plan makes next may use the updated extension's objects
    start = first_index(out, lambda c: c.kind not in ("create_schema", "create_extension"), len(out))
    return insert_at(out, start, updates)
