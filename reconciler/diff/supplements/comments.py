"""Comments on every object kind (migra compares none): set, changed or removed, last of all, once
the objects exist. An object the plan creates again (migra drops and creates views, for instance)
loses its comment, so its comment is set again."""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

from ...errors import ReconcilerError
from ...inspect import COMMENTED_SCHEMA
from ..base import Change
from . import Context, change

# pg_identify_object_as_address: names unquoted (types: format_type text), arguments as type names. Triggers,
# policies and rules have no schema of their own (pg_identify_object's is NULL): their table's, the first name.
_QUERY = f"""
SELECT o.type, o.object_names, o.object_args, d.description
FROM pg_description d
CROSS JOIN LATERAL pg_identify_object_as_address(d.classoid, d.objoid, d.objsubid) o
CROSS JOIN LATERAL (SELECT {COMMENTED_SCHEMA} AS schema) s
WHERE d.classoid <> 'pg_database'::regclass AND s.schema IS NOT NULL
  AND s.schema NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND s.schema <> ALL(%(excluded)s::text[])
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = d.classoid AND e.objid = d.objoid AND e.deptype = 'e')
  AND NOT (d.classoid = 'pg_namespace'::regclass AND s.schema = 'public' AND d.description = 'standard public schema')
"""

_RELATIONS = {"table": "TABLE", "view": "VIEW", "materialized view": "MATERIALIZED VIEW", "foreign table": "FOREIGN TABLE",
              "sequence": "SEQUENCE", "index": "INDEX", "statistics object": "STATISTICS", "collation": "COLLATION",
              "conversion": "CONVERSION", "text search configuration": "TEXT SEARCH CONFIGURATION",
              "text search dictionary": "TEXT SEARCH DICTIONARY", "text search parser": "TEXT SEARCH PARSER",
              "text search template": "TEXT SEARCH TEMPLATE"}
_ON_TABLE = {"table constraint": "CONSTRAINT", "trigger": "TRIGGER", "policy": "POLICY", "rule": "RULE"}
_ROUTINES = {"function": "FUNCTION", "procedure": "PROCEDURE", "aggregate": "AGGREGATE"}
_OPERATOR_CLASSES = {"operator class": "OPERATOR CLASS", "operator family": "OPERATOR FAMILY"}
_OPERATOR_NAME = re.compile(r"^[-+*/<>=~!@#%^&|`?]+$")

Key = tuple[str, tuple[str, ...], tuple[str, ...]]


def _target(kind: str, names: tuple[str, ...], args: tuple[str, ...]) -> sql.Composable:
    """The object part of COMMENT ON; type names come from format_type (quoted by PostgreSQL)."""
    if kind in _RELATIONS:
        return sql.SQL("{} {}").format(sql.SQL(_RELATIONS[kind]), sql.Identifier(*names))
    if kind.endswith(" column"):
        return sql.SQL("COLUMN {}").format(sql.Identifier(*names))
    if kind in _ON_TABLE:
        return sql.SQL("{} {} ON {}").format(sql.SQL(_ON_TABLE[kind]), sql.Identifier(names[-1]), sql.Identifier(*names[:-1]))
    if kind in _ROUTINES:
        return sql.SQL("{} {}({})").format(sql.SQL(_ROUTINES[kind]), sql.Identifier(*names),
                                           sql.SQL(", ").join(sql.SQL(a) for a in args))
    if kind == "operator":  # an operator's name is its symbols, never quoted: checked to be only those
        if not _OPERATOR_NAME.match(names[1]):
            raise ReconcilerError(f"unexpected operator name {names[1]!r}")
        left, right = ("NONE", args[0]) if len(args) == 1 else args  # a prefix operator: its right argument only
        return sql.SQL("OPERATOR {}.{}({}, {})").format(sql.Identifier(names[0]), sql.SQL(names[1]),
                                                       sql.SQL(left), sql.SQL(right))
    if kind in _OPERATOR_CLASSES:  # names: access method, schema, name
        return sql.SQL("{} {} USING {}").format(sql.SQL(_OPERATOR_CLASSES[kind]), sql.Identifier(*names[1:]),
                                                sql.Identifier(names[0]))
    if kind == "type":
        return sql.SQL("TYPE {}").format(sql.SQL(names[0]))
    if kind == "domain constraint":
        return sql.SQL("CONSTRAINT {} ON DOMAIN {}").format(sql.Identifier(args[0]), sql.SQL(names[0]))
    if kind in ("schema", "extension"):
        return sql.SQL("{} {}").format(sql.SQL(kind.upper()), sql.Identifier(names[0]))
    raise ReconcilerError(f"cannot write a comment on a {kind} ({'.'.join(names)}): not supported yet")


def _read(context: Context, side: str) -> dict[Key, str]:
    return {(kind, tuple(names), tuple(args)): text for kind, names, args, text in context.rows(side, _QUERY)}


def _recreated(key: Key, created: set[str]) -> bool:
    """The object the comment is on is created by the plan: itself (a trigger, policy or constraint dropped and
    created again, an enum rebuilt), or the relation (or routine) it hangs on."""
    kind, names, _args = key
    if kind in ("schema", "extension", "domain constraint"):
        return False
    if ".".join(names) in created:
        return True
    return kind != "type" and ".".join(names[:2]) in created


def comments(context: Context, changes: list[Change]) -> list[Change]:
    live, desired = _read(context, "live"), _read(context, "desired")
    created = {c.object.split("(")[0] for c in changes
               if c.kind.startswith(("create", "add_")) or c.kind in ("replace_view", "replace_function")}
    tail: list[Change] = []
    for key in sorted(set(live) | set(desired)):
        want = desired.get(key)
        if want == live.get(key) and not (want is not None and _recreated(key, created)):
            continue
        if want is None and not _exists_in_desired(context, key):
            continue
        label = ".".join(key[1])
        tail.append(change(sql.SQL("COMMENT ON {} IS {}").format(_target(*key), sql.Literal(want)), "comment", label))
    return [*changes, *tail]


def _exists_in_desired(context: Context, key: Key) -> bool:
    """A comment that goes because its object goes needs no statement (and could not run one)."""
    kind, names, args = key
    try:
        context.desired.execute("SELECT pg_get_object_address(%s, %s, %s)", (kind, list(names), list(args)))
    except psycopg.errors.UndefinedObject:
        return False
    except psycopg.Error as exc:  # other kinds of "does not exist" (function, schema, column)
        if exc.sqlstate and (exc.sqlstate.startswith("42") or exc.sqlstate == "3F000"):  # 3F000: no such schema
            return False
        raise
    return True
