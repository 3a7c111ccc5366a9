"""Sequences and identity columns: migra creates them with default options and never alters options.

The state a sequence will have after migra's statements is its live state, or PostgreSQL's defaults
when migra creates it (plain CREATE SEQUENCE, serial, or an identity column added without options);
every option the desired sequence has otherwise is set explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from psycopg import sql

from ...inspect import SEQUENCE_TYPES, SequenceOptions, default_bounds
from ..base import Change
from . import Context, change, first_index, insert_at, managed, not_extension_member

_QUERY = f"""
SELECT n.nspname, c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
       s.seqcache, s.seqcycle, d.deptype, tn.nspname, t.relname, a.attname
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')
     AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0
LEFT JOIN pg_class t ON t.oid = d.refobjid LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
WHERE {managed('n')} AND {not_extension_member('pg_class', 'c.oid')}
"""


@dataclass(frozen=True)
class SequenceState(SequenceOptions):
    identity: bool
    owner: tuple[str, str, str] | None  # schema, table, column

    @classmethod
    def default(cls, type_: str, *, identity: bool, owner: tuple[str, str, str] | None) -> SequenceState:
        low, high = default_bounds(type_)
        return cls(type_, low, 1, low, high, 1, False, identity, owner)


def _read(context: Context, side: str) -> dict[tuple[str, str], SequenceState]:
    out = {}
    for schema, name, type_, start, inc, low, high, cache, cycle, deptype, tschema, table, column in context.rows(side, _QUERY):
        owner = (tschema, table, column) if table is not None else None
        out[(schema, name)] = SequenceState(type_, int(start), int(inc), int(low), int(high), int(cache), bool(cycle),
                                            deptype == "i", owner)
    return out


def _retyped(have: SequenceState, type_: str) -> SequenceState:
    """An identity's sequence after its column's ALTER ... TYPE: of the column's new type, and a bound that was the old
    type's own is the new type's (PostgreSQL's ALTER SEQUENCE ... AS)."""
    old_low, old_high = default_bounds(have.type, have.increment)
    new_low, new_high = default_bounds(type_, have.increment)
    return replace(have, type=type_, minimum=new_low if have.minimum == old_low else have.minimum,
                   maximum=new_high if have.maximum == old_high else have.maximum)


def _options(current: SequenceState, desired: SequenceState, *, with_type: bool, new: bool) -> list[sql.Composable]:
    """The options that differ; a sequence created by this plan also restarts at its START (its current
    value, the default start, may be outside the new bounds)."""
    parts: list[sql.Composable] = []
    if with_type and desired.type != current.type and desired.type in SEQUENCE_TYPES:
        parts.append(sql.SQL("AS {}").format(sql.SQL(desired.type)))
    for label, attr in (("INCREMENT BY", "increment"), ("MINVALUE", "minimum"), ("MAXVALUE", "maximum"),
                        ("START WITH", "start"), ("CACHE", "cache")):
        if getattr(desired, attr) != getattr(current, attr):
            parts.append(sql.SQL(label + " {}").format(sql.Literal(getattr(desired, attr))))
    if desired.cycle != current.cycle:
        parts.append(sql.SQL("CYCLE" if desired.cycle else "NO CYCLE"))
    if new and parts:
        parts.append(sql.SQL("RESTART"))
    return parts


def sequence_options(context: Context, changes: list[Change]) -> list[Change]:
    live, desired = _read(context, "live"), _read(context, "desired")
    created_by_engine = {c.object for c in changes if c.kind == "create_sequence"}
    front: list[Change] = []  # sequences migra does not create: before anything uses them
    after_create: dict[str, list[Change]] = {}  # options of sequences migra creates: right after its CREATE
    tail: list[Change] = []  # identity options and OWNED BY: once the columns exist
    detach: list[Change] = []
    for (schema, name), want in sorted(desired.items()):
        label = f"{schema}.{name}"
        ident = sql.Identifier(schema, name)
        have = live.get((schema, name))
        if have is not None and have.identity != want.identity:
            have = None  # a plain sequence replaced by an identity (or back): migra recreates it
        create = have is None and not want.identity and label not in created_by_engine
        new = have is None
        if have is None:
            have = SequenceState.default(want.type if want.identity else "bigint", identity=want.identity,
                                         owner=want.owner if want.identity else None)
        if want.identity and have.identity and have.type != want.type and want.type in SEQUENCE_TYPES:
            have = _retyped(have, want.type)
        if want.identity:
            assert want.owner is not None
            tschema, table, column = want.owner
            parts = _options(have, want, with_type=False, new=new)
            if parts:
                tail.append(change(sql.SQL("ALTER TABLE {} ALTER COLUMN {} {}").format(
                    sql.Identifier(tschema, table), sql.Identifier(column),
                    sql.SQL(" ").join(p if p.as_string(None) == "RESTART" else sql.SQL("SET ") + p for p in parts)),
                    "alter_identity", f"{tschema}.{table}.{column}"))
            continue
        parts = _options(have, want, with_type=True, new=new)
        if create:
            front.append(change(sql.SQL("CREATE SEQUENCE {} {}").format(ident, sql.SQL(" ").join(parts)),
                                "create_sequence", label))
        elif parts:
            after_create.setdefault(label, []).append(
                change(sql.SQL("ALTER SEQUENCE {} {}").format(ident, sql.SQL(" ").join(parts)), "alter_sequence", label))
        if want.owner != have.owner:
            # detached first, so dropping the old owning table or column does not drop the sequence;
            # attached last, once the new owning column exists
            if have.owner is not None:
                detach.append(change(sql.SQL("ALTER SEQUENCE {} OWNED BY NONE").format(ident), "alter_sequence", label))
            if want.owner is not None:
                tail.append(change(sql.SQL("ALTER SEQUENCE {} OWNED BY {}").format(ident, sql.Identifier(*want.owner)),
                                   "alter_sequence", label))
    out: list[Change] = []
    for c in changes:
        if c.kind == "alter_sequence" and " owned by " in c.sql.lower():
            continue  # ours, above, in the right places
        out.append(c)
        if c.kind == "create_sequence" and c.object in after_create:
            out.extend(after_create.pop(c.object))
    altered = [s for statements in after_create.values() for s in statements]
    start = first_index(out, lambda c: c.kind not in ("create_schema", "create_extension"), len(out))
    return [*insert_at(out, start, [*front, *detach]), *altered, *tail]
