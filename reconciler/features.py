"""SQL features newer than a server, found in a statement's parse tree (pglast parses PostgreSQL 18's grammar).

A desired schema written for PostgreSQL 18 loads into a shadow of the target's major version; on an older one
it fails with "syntax error at or near ..." or "function uuidv7() does not exist". The load names the feature
and the version it needs instead (``shadow``), so the user reads why, not only where.
"""

from __future__ import annotations

from dataclasses import dataclass

import pglast
from pglast import ast, enums
from pglast.visitors import Visitor


@dataclass(frozen=True)
class Feature:
    name: str  # as the message says it: "virtual generated columns need ..."
    since: int  # the first major version that has it
    plural: bool = True



VIRTUAL_COLUMNS = Feature("virtual generated columns (VIRTUAL, or GENERATED ALWAYS AS (...) without STORED)", 18)
NOT_NULL_CONSTRAINTS = Feature("named NOT NULL constraints (CONSTRAINT name NOT NULL column)", 18)
NOT_NULL_OPTIONS = Feature("NOT NULL constraints NOT VALID or NO INHERIT", 18)
NOT_ENFORCED = Feature("NOT ENFORCED constraints", 18)
TEMPORAL_KEYS = Feature("temporal keys (WITHOUT OVERLAPS)", 18)
TEMPORAL_FOREIGN_KEYS = Feature("temporal foreign keys (PERIOD)", 18)
# functions: only when the server says the function does not exist (a schema may define its own)
FUNCTIONS = {"uuidv7": Feature("uuidv7()", 18, plural=False), "uuidv4": Feature("uuidv4()", 18, plural=False)}
UNDEFINED_FUNCTION = "42883"


class _Uses(Visitor):
    def __init__(self) -> None:
        self.found: list[Feature] = []

    def _add(self, feature: Feature) -> None:
        if feature not in self.found:
            self.found.append(feature)

    def visit_Constraint(self, _ancestors: object, node: ast.Constraint) -> None:
        contype = enums.ConstrType(int(node.contype or 0))
        if contype is enums.ConstrType.CONSTR_GENERATED and node.generated_kind == "v":
            self._add(VIRTUAL_COLUMNS)
        elif contype is enums.ConstrType.CONSTR_NOTNULL:
            if node.keys:  # a table constraint (or ALTER TABLE ... ADD CONSTRAINT): a column's own has no keys
                self._add(NOT_NULL_CONSTRAINTS)
            if node.skip_validation or node.is_no_inherit:
                self._add(NOT_NULL_OPTIONS)
        elif contype in (enums.ConstrType.CONSTR_CHECK, enums.ConstrType.CONSTR_FOREIGN) and not node.is_enforced:
            self._add(NOT_ENFORCED)
        if node.without_overlaps:
            self._add(TEMPORAL_KEYS)
        if node.fk_with_period or node.pk_with_period:
            self._add(TEMPORAL_FOREIGN_KEYS)

    def visit_FuncCall(self, _ancestors: object, node: ast.FuncCall) -> None:
        names = [str(getattr(n, "sval", "")) for n in node.funcname or ()]
        if names and names[-1] in FUNCTIONS and names[:-1] in ([], ["pg_catalog"]):
            self._add(FUNCTIONS[names[-1]])


def newer_features(statement: str, major: int, sqlstate: str | None) -> list[Feature]:
    """The features ``statement`` uses that a PostgreSQL ``major`` server lacks (the server refused it with
    ``sqlstate``); empty when none, or when it does not parse."""
    try:
        tree = pglast.parse_sql(statement)
    except pglast.parser.ParseError:
        return []
    uses = _Uses()
    uses(tree)
    return [f for f in uses.found if f.since > major
            and (f not in FUNCTIONS.values() or sqlstate == UNDEFINED_FUNCTION)]


def needs(features: list[Feature], major: int) -> str:
    """One line: what the statement uses, the version it needs, and what the server runs."""
    since = max(f.since for f in features)
    names = " and ".join(f.name for f in features)
    verb = "needs" if len(features) == 1 and not features[0].plural else "need"
    return f"{names} {verb} PostgreSQL {since}; the target runs {major}"
