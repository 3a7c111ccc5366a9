"""Operators, which migra never creates: created right after the functions they call (before the
indexes, constraints and views that use them), dropped last; a changed operator is dropped and
created again when nothing in live uses it, and refused otherwise."""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

from ...errors import ReconcilerError
from ..base import Change
from . import FOUNDATION_KINDS, Context, change, first_index, managed, not_extension_member

_SYMBOLS = re.compile(r"^[+\-*/<>=~!@#%^&|`?]{1,63}$")

# argument types and functions as PostgreSQL writes them (format_type, regproc: quoted where needed)
_OPERATORS = f"""
SELECT n.nspname, o.oprname,
       CASE WHEN o.oprleft = 0 THEN 'NONE' ELSE format_type(o.oprleft, NULL) END,
       CASE WHEN o.oprright = 0 THEN 'NONE' ELSE format_type(o.oprright, NULL) END,
       o.oprcode::regprocedure::text, o.oprcode::regproc::text,
       (SELECT cn.nspname || '.' || c.oprname FROM pg_operator c JOIN pg_namespace cn ON cn.oid = c.oprnamespace
        WHERE c.oid = o.oprcom),
       (SELECT gn.nspname || '.' || g.oprname FROM pg_operator g JOIN pg_namespace gn ON gn.oid = g.oprnamespace
        WHERE g.oid = o.oprnegate),
       CASE WHEN o.oprrest <> 0 THEN o.oprrest::regproc::text END,
       CASE WHEN o.oprjoin <> 0 THEN o.oprjoin::regproc::text END,
       o.oprcanhash, o.oprcanmerge,
       EXISTS (SELECT 1 FROM pg_depend d WHERE d.refclassid = 'pg_operator'::regclass AND d.refobjid = o.oid
               AND d.deptype = 'n')
FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace
WHERE {managed('n')} AND {not_extension_member('pg_operator', 'o.oid')}
"""


@dataclass(frozen=True)
class Operator:
    schema: str
    name: str
    left: str
    right: str
    function: str  # regprocedure: schema.name(args), to find the function's creation
    function_name: str
    commutator: str | None
    negator: str | None
    restrict: str | None
    join: str | None
    hashes: bool
    merges: bool
    used: bool

    @property
    def key(self) -> str:
        return f"{self.schema}.{self.name}({self.left},{self.right})"

    def definition(self) -> tuple[object, ...]:
        return (self.function, self.commutator, self.negator, self.restrict, self.join, self.hashes, self.merges)

    def _name(self) -> sql.Composable:
        if not _SYMBOLS.match(self.name):
            raise ReconcilerError(f"operator {self.key}: unexpected characters in its name")
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.SQL(self.name))

    def create(self) -> Change:
        options: list[sql.Composable] = [sql.SQL("FUNCTION = {}").format(sql.SQL(self.function_name))]
        if self.left != "NONE":
            options.append(sql.SQL("LEFTARG = {}").format(sql.SQL(self.left)))
        if self.right != "NONE":
            options.append(sql.SQL("RIGHTARG = {}").format(sql.SQL(self.right)))
        for label, other in (("COMMUTATOR", self.commutator), ("NEGATOR", self.negator)):
            if other:
                schema, name = other.split(".", 1)
                if not _SYMBOLS.match(name):
                    raise ReconcilerError(f"operator {self.key}: unexpected characters in its {label.lower()}'s name")
                options.append(sql.SQL("{} = OPERATOR({}.{})").format(sql.SQL(label), sql.Identifier(schema), sql.SQL(name)))
        for label, function in (("RESTRICT", self.restrict), ("JOIN", self.join)):
            if function:
                options.append(sql.SQL("{} = {}").format(sql.SQL(label), sql.SQL(function)))
        options += [sql.SQL("HASHES")] if self.hashes else []
        options += [sql.SQL("MERGES")] if self.merges else []
        return change(sql.SQL("CREATE OPERATOR {} ({})").format(self._name(), sql.SQL(", ").join(options)),
                      "create_operator", self.key)

    def drop(self) -> Change:
        return change(sql.SQL("DROP OPERATOR {} ({}, {})").format(self._name(), sql.SQL(self.left), sql.SQL(self.right)),
                      "drop_operator", self.key)


def _read(context: Context, side: str) -> dict[str, Operator]:
    operators = (Operator(*row) for row in context.rows(side, _OPERATORS))
    return {o.key: o for o in operators}


def operators(context: Context, changes: list[Change]) -> list[Change]:
    live, desired = _read(context, "live"), _read(context, "desired")
    if not live and not desired:
        return changes
    out = list(changes)
    early = first_index(out, lambda c: c.kind not in FOUNDATION_KINDS, len(out))
    creates: list[tuple[int, Change]] = []
    drops: list[Change] = []
    for key, want in sorted(desired.items()):
        have = live.get(key)
        if have is not None and have.definition() == want.definition():
            continue
        if have is not None:
            if have.used:
                raise ReconcilerError(f"operator {key} changes its definition and must be dropped and created again, "
                                      "but objects in live use it; change it in two plans")
            creates.append((early, have.drop()))
        # after the function it calls, when the plan creates that function
        at = max([early, *(i + 1 for i, c in enumerate(out)
                           if c.kind in ("create_function", "create_or_replace_function")
                           and c.object.replace(" ", "") == want.function.replace(" ", ""))])
        creates.append((at, want.create()))
    for key, have in sorted(live.items()):
        if key not in desired:
            drops.append(have.drop())
    placed: dict[int, list[Change]] = {}
    for at, created in creates:
        placed.setdefault(at, []).append(created)
    merged = [c for i, existing in enumerate(out) for c in (*placed.get(i, ()), existing)]
    return [*merged, *placed.get(len(out), ()), *drops]
