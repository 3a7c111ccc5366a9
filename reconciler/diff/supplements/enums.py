"""Enums, and the other names migra writes into SQL unquoted (policy roles).

migra writes enum labels and policy roles between quotes without doubling the quotes they hold, so a
label like ``O'Brien`` breaks the statement and a crafted one injects SQL: every such statement is
found by the exact text migra writes and replaced by one composed with ``psycopg.sql``.

migra changes an enum by renaming it away, creating the new one, recasting the columns and dropping
the old one. Here: a label renamed in place becomes ``ALTER TYPE ... RENAME VALUE``; column defaults
are dropped before the recast and the desired ones set after it (migra used the old default, or
``None``); array columns are recast too. Functions that use the enum are dropped and recreated around
it by ``routines``. New labels alone are left to safety's ``ADD VALUE`` rewrite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

from ..base import Change
from ..migra_engine import _split
from . import Context, change, managed, not_extension_member

OLD_SUFFIX = "__old_version_to_be_dropped"

_ENUMS = f"""SELECT n.nspname, t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder)::text[], t.oid, t.typarray
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_enum e ON e.enumtypid = t.oid
    WHERE {managed('n')} AND {not_extension_member('pg_type', 't.oid')}
    GROUP BY n.nspname, t.typname, t.oid, t.typarray ORDER BY 1, 2"""

_POLICIES = f"""SELECT n.nspname, c.relname, p.polname, p.polpermissive, p.polcmd::text,
           ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r) END
                 FROM unnest(p.polroles) WITH ORDINALITY AS u(r, i) ORDER BY i)::text[],
           pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
    FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE {managed('n')} ORDER BY 1, 2, 3"""

# columns of tables whose type is an enum or an array of one: (type oid, schema, table, column, default)
_ENUM_COLUMNS = f"""SELECT a.atttypid, n.nspname, c.relname, a.attname, pg_get_expr(d.adbin, d.adrelid)
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND NOT c.relispartition
      AND a.attgenerated = ''
      AND (t.typtype = 'e' OR EXISTS (SELECT 1 FROM pg_type el WHERE el.oid = t.typelem AND el.typtype = 'e'
                                                                 AND el.typarray = t.oid))
      AND {managed('n')} ORDER BY 2, 3, a.attnum"""

_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")  # a role name that needs no quotes
_COMMANDS = {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}


def _migra_quoted(*names: str) -> str:
    """An identifier as schemainspect quotes it (its quotes doubled: that part migra gets right)."""
    return ".".join('"{}"'.format(n.replace('"', '""')) for n in names)


@dataclass(frozen=True)
class Enum:
    schema: str
    name: str
    labels: tuple[str, ...]
    oid: int
    array_oid: int

    @property
    def key(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


def read_enums(context: Context, side: str) -> dict[str, Enum]:
    return {f"{s}.{n}": Enum(s, n, tuple(labels), oid, array_oid)
            for s, n, labels, oid, array_oid in context.rows(side, _ENUMS)}


def _replace_run(changes: list[Change], pieces: list[str], new: list[Change]) -> tuple[list[Change], int | None]:
    """Replace the first run of consecutive changes whose statements are ``pieces``; (changes, where)."""
    n = len(pieces)
    if not n:
        return changes, None
    for i in range(len(changes) - n + 1):
        if all(changes[i + k].sql == pieces[k] for k in range(n)):
            return [*changes[:i], *new, *changes[i + n:]], i
    return changes, None


def quote_labels(context: Context, changes: list[Change]) -> list[Change]:
    """migra's ``create type ... as enum ('O'Brien')``: replaced by a correctly quoted statement."""
    out = list(changes)
    for enum in read_enums(context, "desired").values():
        if not any("'" in label for label in enum.labels):
            continue
        bad = "create type {} as enum ({});".format(
            _migra_quoted(enum.schema, enum.name), ", ".join(f"'{label}'" for label in enum.labels))
        good = sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
            enum.ident, sql.SQL(", ").join(sql.Literal(label) for label in enum.labels))
        while True:
            out, where = _replace_run(out, _split(bad), [change(good, "create_enum", enum.key)])
            if where is None:
                break
    return out


def quote_policy_roles(context: Context, changes: list[Change]) -> list[Change]:
    """migra's ``create policy ... to evil"role``: roles written unquoted, replaced by a correctly
    quoted statement (a role name can hold any character, quotes and semicolons included)."""
    out = list(changes)
    for schema, table, name, permissive, cmd, roles, qual, check in context.rows("desired", _POLICIES):
        bad = ("create policy {name}\non {table}\nas {perm}\nfor {cmd}\nto {roles}{qual}{check};\n".format(
            name=_migra_quoted(name), table=_migra_quoted(schema, table),
            perm="permissive" if permissive else "restrictive", cmd=_COMMANDS.get(cmd, cmd).lower(),
            roles=", ".join(roles), qual=f"\nusing ({qual})" if qual else "",
            check=f"\nwith check ({check})" if check else ""))
        good = sql.SQL("CREATE POLICY {} ON {} AS {} FOR {} TO {}{}{}").format(
            sql.Identifier(name), sql.Identifier(schema, table),
            sql.SQL("PERMISSIVE" if permissive else "RESTRICTIVE"), sql.SQL(_COMMANDS.get(cmd, "ALL")),
            sql.SQL(", ").join(sql.SQL("PUBLIC") if r == "public" else sql.Identifier(r) for r in roles),
            sql.SQL(" USING ({})").format(sql.SQL(qual)) if qual else sql.SQL(""),
            sql.SQL(" WITH CHECK ({})").format(sql.SQL(check)) if check else sql.SQL(""))
        if all(_PLAIN.fullmatch(r) for r in roles):
            continue  # migra's statement is right
        out, _where = _replace_run(out, _split(bad), [change(good, "create_policy", f"{schema}.{table}.{name}")])
    return out


def _is_extension(old: tuple[str, ...], new: tuple[str, ...]) -> bool:
    """``new`` keeps every old label in order and only adds (safety turns that into ADD VALUE)."""
    it = iter(new)
    return all(label in it for label in old) and len(new) > len(old)


def renamed_labels(old: tuple[str, ...], new: tuple[str, ...]) -> list[tuple[str, str]] | None:
    """(old, new) label pairs when ``new`` is ``old`` with some labels renamed in place: same length,
    and every label that differs at a position is absent from the other side."""
    if len(old) != len(new) or old == new:
        return None
    pairs = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    if any(a in new or b in old for a, b in pairs):
        return None
    return pairs


@dataclass(frozen=True)
class Recreation:
    """migra's statements that rename an enum away, create it anew and drop the old one."""

    enum: str  # schema.name
    rename: int
    create: int | None
    drop: int | None


def recreations(changes: list[Change]) -> dict[str, Recreation]:
    """The enums migra recreates in ``changes``, by ``schema.name``."""
    found: dict[str, Recreation] = {}
    for i, c in enumerate(changes):
        if c.kind == "rename_type" and c.sql.rstrip(";").endswith(f'{OLD_SUFFIX}"'):
            create = next((j for j, o in enumerate(changes) if o.kind == "create_enum" and o.object == c.object), None)
            drop = next((j for j, o in enumerate(changes) if o.kind == "drop_type" and o.object == c.object + OLD_SUFFIX), None)
            found[c.object] = Recreation(c.object, i, create, drop)
    return found


def recreated_not_extended(context: Context, changes: list[Change]) -> dict[str, Recreation]:
    """Recreations that stay recreations: not a pure addition of labels (safety's ADD VALUE)."""
    live, desired = read_enums(context, "live"), read_enums(context, "desired")
    return {k: r for k, r in recreations(changes).items()
            if k in live and k in desired and not _is_extension(live[k].labels, desired[k].labels)}


def _column_default(table_ident: sql.Composable, column: str, default: str | None) -> sql.Composable:
    if default is None:
        return sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT").format(table_ident, sql.Identifier(column))
    return sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
        table_ident, sql.Identifier(column), sql.SQL(default))


def _retyped_defaults(context: Context, changes: list[Change]) -> list[Change]:
    """A column changing to or from an enum: migra sets the new default before the new type, which
    fails (the default must have the column's type). The old default goes before, the new one after."""
    live = {f"{s}.{t}.{c}": (s, t, c, d) for _oid, s, t, c, d in context.rows("live", _ENUM_COLUMNS)}
    desired = {f"{s}.{t}.{c}" for _oid, s, t, c, _d in context.rows("desired", _ENUM_COLUMNS)}
    out = list(changes)
    for c in list(out):
        if (c.kind != "alter_column_type" or (c.object not in live and c.object not in desired)
                or "::text::" in c.sql):  # migra's recast into a recreated enum: enum_changes sees to it
            continue
        at = out.index(c)
        moved = [o for o in out[:at] if o.kind == "set_default" and o.object == c.object
                 and not o.sql.rstrip(";").endswith(" drop default")]
        if not moved:
            continue
        rest = [o for o in out if o not in moved]
        at = rest.index(c)
        first: list[Change] = []
        if c.object in live and live[c.object][3] is not None:
            s, t, col, _d = live[c.object]
            first.append(change(_column_default(sql.Identifier(s, t), col, None), "set_default", c.object))
        out = [*rest[:at], *first, c, *moved, *rest[at + 1:]]
    return out


def enum_changes(context: Context, changes: list[Change]) -> list[Change]:
    """Renamed labels in place; defaults and array columns around migra's recreation of an enum."""
    # migra restores a default that was never there as "set default None"
    out = [c for c in changes if not (c.kind == "set_default" and c.sql.rstrip(";").endswith(" set default None"))]
    out = _retyped_defaults(context, out)
    found = recreations(out)
    if not found:
        return out
    live, desired = read_enums(context, "live"), read_enums(context, "desired")
    live_columns = context.rows("live", _ENUM_COLUMNS)
    desired_defaults = {(s, t, c): d for _oid, s, t, c, d in context.rows("desired", _ENUM_COLUMNS)}
    for key in found:
        old, new = live.get(key), desired.get(key)
        if old is None or new is None:
            continue
        rec = recreations(out)[key]
        columns = [(oid, s, t, col, d) for oid, s, t, col, d in live_columns if oid in (old.oid, old.array_oid)]
        column_keys = {f"{s}.{t}.{col}" for _oid, s, t, col, _d in columns}
        recast_suffix = f"::text::{_migra_quoted(new.schema, new.name)}"
        recasts = [i for i, c in enumerate(out) if c.kind == "alter_column_type" and c.sql.rstrip(";").endswith(recast_suffix)]
        # migra's own drop/restore of these columns' defaults around the recreation
        drop_defaults = [i for i, c in enumerate(out[:rec.rename]) if c.kind == "set_default" and c.object in column_keys
                         and c.sql.rstrip(";").endswith(" drop default")]
        end = rec.drop if rec.drop is not None else len(out)
        restores = [i for i in range(rec.rename, end) if out[i].kind == "set_default" and out[i].object in column_keys]
        pairs = renamed_labels(old.labels, new.labels)
        group = {rec.rename, *recasts, *drop_defaults, *restores}
        group.update(i for i in (rec.create, rec.drop) if i is not None)
        if pairs is not None:
            renames = [change(sql.SQL("ALTER TYPE {} RENAME VALUE {} TO {}").format(old.ident, sql.Literal(a), sql.Literal(b)),
                              "rename_enum_value", key) for a, b in pairs]
            rest = [c for i, c in enumerate(out) if i not in group]
            at = sum(1 for i in range(rec.rename) if i not in group)
            out = [*rest[:at], *renames, *rest[at:]]
            continue
        if _is_extension(old.labels, new.labels):
            continue  # safety's ADD VALUE rewrite replaces the recreation
        before: list[Change] = []
        after: list[Change] = []
        for oid, s, t, col, default in columns:
            table = sql.Identifier(s, t)
            if default is not None:
                before.append(change(_column_default(table, col, None), "set_default", f"{s}.{t}.{col}"))
            if oid == old.array_oid:
                after.append(change(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}[] USING {}::text[]::{}[]").format(
                    table, sql.Identifier(col), new.ident, sql.Identifier(col), new.ident), "alter_column_type", f"{s}.{t}.{col}"))
            wanted = desired_defaults.get((s, t, col))
            if wanted is not None:
                after.append(change(_column_default(table, col, wanted), "set_default", f"{s}.{t}.{col}"))
        kept_recasts = [out[i] for i in recasts]
        create = [out[rec.create]] if rec.create is not None else []
        drop = [out[rec.drop]] if rec.drop is not None else []
        rest = [c for i, c in enumerate(out) if i not in group]
        at = sum(1 for i in range(rec.rename) if i not in group)
        out = [*rest[:at], *before, out[rec.rename], *create, *kept_recasts, *after, *drop, *rest[at:]]
    return out
