"""Functions, procedures and triggers: what migra orders wrongly, misses or cannot express.

migra creates functions after the tables, indexes and constraints that may use them, never sees a
change to a SQL-standard body (``RETURN ...``, ``BEGIN ATOMIC``) or to one of two overloads, drops a
function before the functions that use it, and replaces a function whose return type changed (which
``CREATE OR REPLACE`` refuses). Here every function statement comes from comparing the catalogs
(``pg_get_functiondef``): new and changed functions as early as their own dependencies allow (so the
objects that use them find them), dropped ones as late as the objects they depend on allow; those
``CREATE OR REPLACE`` cannot change are dropped and recreated, after migra drops the views that use
them (and before it recreates them), and so are the functions that use an enum migra recreates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from psycopg import sql

from ...errors import ReconcilerError
from ..base import Change
from . import FOUNDATION_KINDS, Context, change, managed, not_extension_member
from .enums import OLD_SUFFIX, recreated_not_extended

_FUNCTIONS = f"""SELECT p.oid, n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), p.prokind::text,
           pg_get_functiondef(p.oid), pg_get_function_result(p.oid), coalesce(p.proargnames, '{{}}')::text[],
           p.pronargdefaults, coalesce(p.proargmodes::text[], '{{}}')::text[], oidvectortypes(p.proargtypes)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.prokind IN ('f', 'p', 'w') AND {managed('n')} AND {not_extension_member('pg_proc', 'p.oid')}
      AND NOT EXISTS (SELECT 1 FROM pg_depend i WHERE i.classid = 'pg_proc'::regclass AND i.objid = p.oid
                      AND i.deptype = 'i')  -- a range type's constructors come and go with it
    ORDER BY 2, 3, 4"""

# what each function depends on: (function oid, referenced function oid or NULL, referenced object's
# schema.name: a relation, or a type by its element type or its relation)
_DEPENDENCIES = """SELECT d.objid, CASE WHEN d.refclassid = 'pg_proc'::regclass THEN d.refobjid END,
           CASE WHEN d.refclassid = 'pg_class'::regclass THEN
                  (SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.oid = d.refobjid)
                WHEN d.refclassid = 'pg_type'::regclass THEN
                  (SELECT n.nspname || '.' || coalesce(rc.relname, b.typname)
                   FROM pg_type t JOIN pg_type b ON b.oid = CASE WHEN t.typcategory = 'A' AND t.typelem <> 0
                                                                  THEN t.typelem ELSE t.oid END
                   JOIN pg_namespace n ON n.oid = b.typnamespace LEFT JOIN pg_class rc ON rc.oid = b.typrelid
                   WHERE t.oid = d.refobjid) END
    FROM pg_depend d
    WHERE d.classid = 'pg_proc'::regclass AND d.deptype = 'n'"""

# what depends on each function in live: (function oid, dependent function oid or NULL, view or
# materialized view as schema.name or NULL, description)
_DEPENDENTS = """SELECT d.refobjid, CASE WHEN d.classid = 'pg_proc'::regclass THEN d.objid END,
           CASE WHEN d.classid = 'pg_rewrite'::regclass THEN
                  (SELECT n.nspname || '.' || c.relname FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
                   JOIN pg_namespace n ON n.oid = c.relnamespace WHERE r.oid = d.objid AND c.relkind IN ('v', 'm')) END,
           pg_describe_object(d.classid, d.objid, d.objsubid)
    FROM pg_depend d
    WHERE d.refclassid = 'pg_proc'::regclass AND d.deptype = 'n'"""

_CLONED_TRIGGERS = f"""SELECT n.nspname || '.' || c.relname || '.' || t.tgname
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE t.tgparentid <> 0 AND NOT t.tgisinternal AND {managed('n')}"""

_FUNCTION_KINDS = frozenset({"create_function", "create_procedure", "drop_function", "drop_procedure"})
# statements that give an object the shape a function body may rely on
_SHAPING_KINDS = frozenset({"create_table", "add_column", "alter_column_type", "alter_table", "create_view", "replace_view",
                            "create_materialized_view", "create_enum", "create_domain", "create_composite_type",
                            "create_type", "create_sequence", "attach_partition", "rename_enum_value", "add_enum_value"})


@dataclass(frozen=True)
class Function:
    oid: int
    schema: str
    name: str
    arguments: str  # identity arguments, as PostgreSQL prints them
    kind: str  # f, p or w
    definition: str
    result: str
    argument_names: tuple[str, ...]
    defaults: int
    argument_modes: tuple[str, ...]
    signature: str  # the types it is called with: what makes it this function, whatever its parameters are named

    @property
    def key(self) -> str:
        return f"{self.schema}.{self.name}({self.signature})"

    def replaceable_by(self, new: Function) -> bool:
        """CREATE OR REPLACE can turn self into ``new``: same kind, result, parameter names and modes,
        and no parameter default removed."""
        return (self.kind == new.kind and self.result == new.result and self.argument_names == new.argument_names
                and self.argument_modes == new.argument_modes and self.defaults <= new.defaults)

    def create(self) -> Change:
        return change(self.definition, "create_procedure" if self.kind == "p" else "create_function", self.key)

    def drop(self) -> Change:
        word = "PROCEDURE" if self.kind == "p" else "FUNCTION"
        statement = sql.SQL("DROP {} {}({})").format(sql.SQL(word), sql.Identifier(self.schema, self.name), sql.SQL(self.arguments))
        return change(statement, f"drop_{word.lower()}", self.key)


def read_functions(context: Context, side: str) -> dict[str, Function]:
    functions = (Function(oid, s, n, args, kind, definition, result, tuple(names), defaults, tuple(modes), signature)
                 for oid, s, n, args, kind, definition, result, names, defaults, modes, signature
                 in context.rows(side, _FUNCTIONS))
    return {f.key: f for f in functions}


def _dependencies(context: Context, side: str, functions: dict[str, Function]) -> dict[str, tuple[set[str], set[str]]]:
    """key -> (functions it uses, by key; other objects it uses, by schema.name)."""
    by_oid = {f.oid: f.key for f in functions.values()}
    out: dict[str, tuple[set[str], set[str]]] = {k: (set(), set()) for k in functions}
    for oid, function_oid, name in context.rows(side, _DEPENDENCIES):
        key = by_oid.get(oid)
        if key is None:
            continue
        if function_oid is not None:
            if function_oid in by_oid and by_oid[function_oid] != key:
                out[key][0].add(by_oid[function_oid])
        elif name is not None:
            out[key][1].add(name)
    return out


def _ordered(keys: Iterable[str], uses: dict[str, set[str]]) -> list[str]:
    """``keys`` with every key after the keys it uses (name order otherwise)."""
    pending = sorted(set(keys))
    done: list[str] = []
    while pending:
        ready = [k for k in pending if not (uses.get(k, set()) & set(pending)) - {k}]
        if not ready:  # a cycle (impossible in PostgreSQL): keep name order
            ready = pending[:1]
        done.extend(ready)
        pending = [k for k in pending if k not in ready]
    return done


def _touches(c: Change, name: str) -> bool:
    return c.object == name or c.object.startswith(name + ".")


def functions(context: Context, changes: list[Change]) -> list[Change]:
    live, desired = read_functions(context, "live"), read_functions(context, "desired")
    names = {f"{f.schema}.{f.name}" for f in (*live.values(), *desired.values())}
    out = [c for c in changes
           if not (c.kind in _FUNCTION_KINDS and c.object.split("(")[0] in names)
           and not (c.kind == "set" and c.object == "check_function_bodies")]
    changed = {k for k in desired if k in live and live[k].definition != desired[k].definition}
    recreate = {k for k in changed if not live[k].replaceable_by(desired[k])}
    live_deps = _dependencies(context, "live", live)
    desired_deps = _dependencies(context, "desired", desired)

    # functions that use an enum migra recreates must go before it is renamed away, and come back after
    enum_recreations = recreated_not_extended(context, out)
    for key, (_uses, objects) in live_deps.items():
        if key in desired and objects & set(enum_recreations):
            recreate.add(key)

    # whatever uses a function dropped and recreated goes with it: functions, views migra drops
    by_oid = {f.oid: f.key for f in live.values()}
    dependents: dict[str, list[tuple[str | None, str | None, str]]] = {}
    for oid, function_oid, view, description in context.rows("live", _DEPENDENTS):
        if oid in by_oid:
            dependents.setdefault(by_oid[oid], []).append((by_oid.get(function_oid), view, description))
    dropped_views = {c.object for c in out if c.kind in ("drop_view", "drop_materialized_view")}
    work = sorted(recreate)
    while work:
        key = work.pop()
        for user, view, description in dependents.get(key, ()):
            if user is not None:
                if user in desired and user not in recreate:
                    recreate.add(user)
                    work.append(user)
            elif view is None or view not in dropped_views:
                raise ReconcilerError(
                    f"function {key} must be dropped and recreated (CREATE OR REPLACE cannot change it: "
                    f"{_why(live[key], desired.get(key))}), but {description} uses it and is not recreated with it; "
                    "change it in two plans, or drop that user first")

    creates = {k for k in desired if k not in live} | changed | recreate
    drops = {k for k in live if k not in desired} | recreate

    early = next((i for i, c in enumerate(out) if c.kind not in FOUNDATION_KINDS), len(out))
    late = next((i for i, c in enumerate(out) if c.kind == "drop_schema"), len(out))

    live_uses = {k: v[0] for k, v in live_deps.items()}
    drop_at: dict[str, int] = {}
    for key in sorted(recreate):  # after migra drops the views that use it
        drop_at[key] = max([early, *(i + 1 for i, c in enumerate(out) if c.kind in ("drop_view", "drop_materialized_view")
                                     and any(view == c.object for _u, view, _d in dependents.get(key, ())))])

    create_at: dict[str, int] = {}
    create_order = _ordered(creates, {k: v[0] for k, v in desired_deps.items()})
    for key in create_order:
        at = max(early, drop_at.get(key, 0))
        for name in desired_deps[key][1]:  # after what it uses takes its shape
            at = max([at, *(i + 1 for i, c in enumerate(out) if c.kind in _SHAPING_KINDS and _touches(c, name))])
        for used in desired_deps[key][0]:
            at = max(at, create_at.get(used, 0))
        create_at[key] = at

    for key in drops - recreate:  # late: after the functions that used it are replaced
        drop_at[key] = max([late, *(create_at[user] for user, _v, _d in dependents.get(key, ()) if user in create_at)])
    for key in drops:  # but before what it uses goes away
        for name in live_deps[key][1]:
            drop_at[key] = min([drop_at[key], *(i for i, c in enumerate(out)
                                                if (c.kind.startswith("drop_") and c.object in (name, name + OLD_SUFFIX))
                                                or (c.kind == "rename_type" and c.object == name))])
    first = set(recreate)  # at their place, these drops go before the creates
    for key in _ordered(drops, live_uses):  # what it uses first: its place is final
        for used in live_uses[key]:  # and a user before what it uses
            if used in drop_at and drop_at[used] <= drop_at[key]:
                drop_at[key] = drop_at[used]
                if used in first:
                    first.add(key)

    drop_order = _ordered(drops, live_uses)[::-1]
    result: list[Change] = []
    for i in range(len(out) + 1):  # at one place: drops of what is recreated, creates, other drops
        before = [live[k].drop() for k in drop_order if drop_at[k] == i and k in first]
        created = [desired[k].create() for k in create_order if create_at[k] == i]
        if created and not any(c.kind == "set" and c.object == "check_function_bodies" for c in result):
            before.append(change("SET check_function_bodies = off", "set", "check_function_bodies"))
        result.extend([*before, *created, *(live[k].drop() for k in drop_order if drop_at[k] == i and k not in first)])
        if i < len(out):
            result.append(out[i])
    return result


def _why(old: Function, new: Function | None) -> str:
    if new is None:
        return "it is dropped"
    if old.result != new.result:
        return f"its result changes from {old.result} to {new.result}"
    if old.argument_names != new.argument_names or old.argument_modes != new.argument_modes:
        return "its parameter names or modes change"
    if old.kind != new.kind:
        return "it changes kind"
    if old.defaults > new.defaults:
        return "it loses parameter defaults"
    return "it uses an enum that is recreated"


def cloned_triggers(context: Context, changes: list[Change]) -> list[Change]:
    """A trigger on a partitioned table is cloned onto its partitions: migra creates (and drops) the
    clones as if they were triggers of their own, which fails. They come and go with their parent."""
    desired = {r[0] for r in context.rows("desired", _CLONED_TRIGGERS)}
    live = {r[0] for r in context.rows("live", _CLONED_TRIGGERS)}
    return [c for c in changes if not ((c.kind == "create_trigger" and c.object in desired)
                                       or (c.kind == "drop_trigger" and c.object in live))]
