"""Aggregates, which migra never sees: schemainspect leaves ``prokind = 'a'`` out on PostgreSQL 11+, so
no CREATE AGGREGATE is emitted and every view or function that uses one fails.

Each aggregate is rebuilt from pg_aggregate. A new one is created right after the functions it uses
(the routines supplement creates functions early, so that is before the views that use it); a removed
one is dropped late, but before the functions it uses go; a changed one (CREATE AGGREGATE has no OR
REPLACE that changes support functions or the state type in every version) is dropped and recreated,
which is refused while a view or function not recreated in this plan uses it. Ordered-set and
hypothetical-set aggregates are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from ...errors import ReconcilerError
from ..base import Change
from . import FOUNDATION_KINDS, Context, change, first_index, managed, not_extension_member


def _support(column: str) -> str:
    """SQL: (support function as CREATE AGGREGATE names it, its key as the routines supplement names it)."""
    return (f"CASE WHEN ag.{column} <> 0 THEN ag.{column}::regproc::text END, "
            f"(SELECT fn.nspname || '.' || f.proname || '(' || oidvectortypes(f.proargtypes) || ')' "
            f"FROM pg_proc f JOIN pg_namespace fn ON fn.oid = f.pronamespace WHERE f.oid = ag.{column})")


_AGGREGATES = f"""
SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), p.oid::int, ag.aggkind::text,
       {_support('aggtransfn')}, format_type(ag.aggtranstype, NULL), ag.aggtransspace, ag.agginitval,
       {_support('aggfinalfn')}, ag.aggfinalextra, ag.aggfinalmodify::text,
       {_support('aggcombinefn')}, {_support('aggserialfn')}, {_support('aggdeserialfn')},
       {_support('aggmtransfn')}, {_support('aggminvtransfn')},
       CASE WHEN ag.aggmtranstype <> 0 THEN format_type(ag.aggmtranstype, NULL) END, ag.aggmtransspace, ag.aggminitval,
       {_support('aggmfinalfn')}, ag.aggmfinalextra, ag.aggmfinalmodify::text,
       CASE WHEN ag.aggsortop <> 0 THEN
         (SELECT 'OPERATOR(' || quote_ident(opn.nspname) || '.' || o.oprname || ')'
          FROM pg_operator o JOIN pg_namespace opn ON opn.oid = o.oprnamespace WHERE o.oid = ag.aggsortop) END,
       p.proparallel::text
FROM pg_aggregate ag JOIN pg_proc p ON p.oid = ag.aggfnoid JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE {managed('n')} AND {not_extension_member('pg_proc', 'p.oid')}
ORDER BY 1, 2, 3
"""

# what uses each aggregate: (aggregate oid, view or materialized view as schema.name or NULL, description)
_DEPENDENTS = """
SELECT d.refobjid::int,
       CASE WHEN d.classid = 'pg_rewrite'::regclass THEN
              (SELECT n.nspname || '.' || c.relname FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE r.oid = d.objid AND c.relkind IN ('v', 'm')) END,
       pg_describe_object(d.classid, d.objid, d.objsubid)
FROM pg_depend d JOIN pg_aggregate ag ON ag.aggfnoid = d.refobjid
WHERE d.refclassid = 'pg_proc'::regclass AND d.deptype = 'n'
"""

_MODIFY = {"r": "READ_ONLY", "s": "SHAREABLE", "w": "READ_WRITE"}
_PARALLEL = {"s": "SAFE", "r": "RESTRICTED", "u": "UNSAFE"}
_VIEW_DROPS = frozenset({"drop_view", "drop_materialized_view"})
_VIEW_CREATES = frozenset({"create_view", "replace_view", "create_materialized_view"})


@dataclass(frozen=True)
class Support:
    """A support function: as CREATE AGGREGATE names it, and by its routines-supplement key."""

    name: str
    key: str


@dataclass(frozen=True)
class Aggregate:
    schema: str
    name: str
    arguments: str
    kind: str
    transition: Support | None
    state_type: str
    state_space: int
    initial: str | None
    final: Support | None
    final_extra: bool
    final_modify: str
    combine: Support | None
    serial: Support | None
    deserial: Support | None
    moving_transition: Support | None
    moving_inverse: Support | None
    moving_state_type: str | None
    moving_state_space: int
    moving_initial: str | None
    moving_final: Support | None
    moving_final_extra: bool
    moving_final_modify: str
    sort_operator: str | None
    parallel: str

    @property
    def key(self) -> str:
        return f"{self.schema}.{self.name}({self.arguments})"

    def supports(self) -> tuple[Support, ...]:
        return tuple(s for s in (self.transition, self.final, self.combine, self.serial, self.deserial,
                                 self.moving_transition, self.moving_inverse, self.moving_final) if s is not None)

    def create(self) -> Change:
        if self.kind != "n" or self.transition is None:
            raise ReconcilerError(f"aggregate {self.key}: ordered-set and hypothetical-set aggregates are not supported; "
                                  "create it by hand before applying")
        options: list[sql.Composable] = []

        def option(name: str, value: sql.Composable) -> None:
            options.append(sql.SQL("{} = {}").format(sql.SQL(name), value))

        # names and types come from regproc / format_type / the operator's catalog row: already quoted
        option("SFUNC", sql.SQL(self.transition.name))
        option("STYPE", sql.SQL(self.state_type))
        if self.state_space:
            option("SSPACE", sql.Literal(self.state_space))
        if self.final is not None:
            option("FINALFUNC", sql.SQL(self.final.name))
            if self.final_extra:
                options.append(sql.SQL("FINALFUNC_EXTRA"))
            option("FINALFUNC_MODIFY", sql.SQL(_MODIFY[self.final_modify]))
        if self.combine is not None:
            option("COMBINEFUNC", sql.SQL(self.combine.name))
        if self.serial is not None:
            option("SERIALFUNC", sql.SQL(self.serial.name))
        if self.deserial is not None:
            option("DESERIALFUNC", sql.SQL(self.deserial.name))
        if self.initial is not None:
            option("INITCOND", sql.Literal(self.initial))
        if self.moving_transition is not None and self.moving_inverse is not None and self.moving_state_type:
            option("MSFUNC", sql.SQL(self.moving_transition.name))
            option("MINVFUNC", sql.SQL(self.moving_inverse.name))
            option("MSTYPE", sql.SQL(self.moving_state_type))
            if self.moving_state_space:
                option("MSSPACE", sql.Literal(self.moving_state_space))
            if self.moving_final is not None:
                option("MFINALFUNC", sql.SQL(self.moving_final.name))
                if self.moving_final_extra:
                    options.append(sql.SQL("MFINALFUNC_EXTRA"))
                option("MFINALFUNC_MODIFY", sql.SQL(_MODIFY[self.moving_final_modify]))
            if self.moving_initial is not None:
                option("MINITCOND", sql.Literal(self.moving_initial))
        if self.sort_operator is not None:
            option("SORTOP", sql.SQL(self.sort_operator))
        option("PARALLEL", sql.SQL(_PARALLEL[self.parallel]))
        statement = sql.SQL("CREATE AGGREGATE {}({}) ({})").format(
            sql.Identifier(self.schema, self.name), sql.SQL(self.arguments or "*"), sql.SQL(", ").join(options))
        return change(statement, "create_aggregate", self.key)

    def drop(self) -> Change:
        statement = sql.SQL("DROP AGGREGATE {}({})").format(sql.Identifier(self.schema, self.name),
                                                           sql.SQL(self.arguments or "*"))
        return change(statement, "drop_aggregate", self.key)

    def definition(self) -> tuple[object, ...]:
        """What must match for the live aggregate to be the desired one (support functions by key)."""
        return (self.kind, *(s.key if isinstance(s, Support) else s for s in (
            self.transition, self.state_type, self.state_space, self.initial, self.final, self.final_extra,
            self.final_modify, self.combine, self.serial, self.deserial, self.moving_transition, self.moving_inverse,
            self.moving_state_type, self.moving_state_space, self.moving_initial, self.moving_final,
            self.moving_final_extra, self.moving_final_modify, self.sort_operator, self.parallel)))


def _support_of(name: str | None, key: str | None) -> Support | None:
    return Support(name, key or name) if name is not None else None


def read_aggregates(context: Context, side: str) -> dict[str, tuple[int, Aggregate]]:
    """key -> (oid, aggregate)."""
    out: dict[str, tuple[int, Aggregate]] = {}
    for (schema, name, arguments, oid, kind, sfunc, sfunc_key, stype, sspace, initial, ffunc, ffunc_key, fextra, fmodify,
         cfunc, cfunc_key, serial, serial_key, deserial, deserial_key, msfunc, msfunc_key, minv, minv_key, mstype,
         msspace, minitial, mffunc, mffunc_key, mfextra, mfmodify, sortop, parallel) in context.rows(side, _AGGREGATES):
        agg = Aggregate(schema, name, arguments, kind, _support_of(sfunc, sfunc_key), stype, int(sspace), initial,
                        _support_of(ffunc, ffunc_key), bool(fextra), fmodify, _support_of(cfunc, cfunc_key),
                        _support_of(serial, serial_key), _support_of(deserial, deserial_key),
                        _support_of(msfunc, msfunc_key), _support_of(minv, minv_key), mstype, int(msspace), minitial,
                        _support_of(mffunc, mffunc_key), bool(mfextra), mfmodify, sortop, parallel)
        out[agg.key] = (int(oid), agg)
    return out


def _dependents(context: Context, side: str) -> dict[int, list[tuple[str | None, str]]]:
    """aggregate oid -> what uses it: (view or materialized view as schema.name or None, description)."""
    out: dict[int, list[tuple[str | None, str]]] = {}
    for oid, view, description in context.rows(side, _DEPENDENTS):
        out.setdefault(int(oid), []).append((view, f"view {view}" if view else description))
    return out


def _goes_with(c: Change, used: set[str], schema: str) -> bool:
    """``c`` drops a function an aggregate uses, or its schema: the aggregate must be dropped before."""
    return ((c.kind in ("drop_function", "drop_procedure") and c.object in used)
            or (c.kind == "drop_schema" and c.object == schema))


def aggregates(context: Context, changes: list[Change]) -> list[Change]:
    live, desired = read_aggregates(context, "live"), read_aggregates(context, "desired")
    keys = set(live) | set(desired)
    out = [c for c in changes if not (c.kind in ("create_aggregate", "drop_aggregate") and c.object in keys)]
    changed = sorted(k for k in desired if k in live and live[k][1].definition() != desired[k][1].definition())
    if not changed and set(live) == set(desired):
        return out

    dependents = _dependents(context, "live")
    dropped_views = {c.object for c in out if c.kind in _VIEW_DROPS}
    for key in changed:
        for view, description in dependents.get(live[key][0], ()):
            if view is None or view not in dropped_views:
                raise ReconcilerError(
                    f"aggregate {key} changes and must be dropped and recreated (its definition is not alterable), "
                    f"but {description} uses it and is not recreated with it; change it in two plans, or drop that "
                    "user first")

    # drops: after the views that use them are dropped or replaced, before the functions, types and schemas
    # they use go
    late = first_index(out, lambda c: c.kind == "drop_schema", len(out))
    drops: list[tuple[int, Change]] = []
    for key in sorted(k for k in live if k not in desired):
        agg = live[key][1]
        used = {s.key for s in agg.supports()}
        drops.append((min([late, *(i for i, c in enumerate(out) if _goes_with(c, used, agg.schema))]), agg.drop()))

    # creates: right after the functions they use, never before the foundation (schemas, types)
    early = first_index(out, lambda c: c.kind not in FOUNDATION_KINDS, len(out))
    users = _dependents(context, "desired")
    creates: list[tuple[int, Change]] = []
    for key in sorted(k for k in desired if k not in live or k in changed):
        oid, agg = desired[key]
        used = {s.key for s in agg.supports()}
        at = max([early, *(i + 1 for i, c in enumerate(out)
                           if c.kind in ("create_function", "create_procedure") and c.object in used)])
        if key in changed:  # after the views that use it are dropped, and its old self with them
            at = max([at, *(i + 1 for i, c in enumerate(out) if c.kind in _VIEW_DROPS)])
            drops.append((at, live[key][1].drop()))
        views = {view for view, _d in users.get(oid, ()) if view is not None}
        view_at = min((i for i, c in enumerate(out) if c.kind in _VIEW_CREATES and c.object in views), default=len(out))
        if at > view_at:
            raise ReconcilerError(f"aggregate {key}: view {out[view_at].object} uses it but is created before the "
                                  "functions the aggregate needs; create them in two plans")
        creates.append((at, agg.create()))

    result: list[Change] = []
    for i in range(len(out) + 1):
        result.extend(c for at, c in drops if at == i)
        result.extend(c for at, c in creates if at == i)
        if i < len(out):
            result.append(out[i])
    return result
