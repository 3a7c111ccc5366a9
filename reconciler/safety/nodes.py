"""Reading pglast's parse trees and writing SQL back: the small tools every strategy uses."""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pglast
from pglast import ast
from pglast.stream import RawStream
from psycopg import sql

from ..errors import ReconcilerError
from ..inspect import qualify

_NOT_VALID_END = re.compile(r"\s+NOT\s+VALID\s*;?\s*$", re.IGNORECASE)


def valid_as(statement: str, valid: bool) -> str:
    """An ADD CONSTRAINT statement added validated, or NOT VALID, by its text: the constraint's expression stays as
    the statement wrote it (pglast's deparse spells some of them otherwise: TRIM(BOTH FROM x) as btrim(x), which
    PostgreSQL stores as another expression)."""
    text = _NOT_VALID_END.sub("", statement.rstrip().removesuffix(";").rstrip())
    return text if valid else f"{text} NOT VALID"


def deparse(node: ast.Node) -> str:
    return str(RawStream()(node))


def parse(statement: str, engine: str) -> ast.Node:
    try:
        parsed = pglast.parse_sql(statement)
    except pglast.parser.ParseError as exc:
        raise ReconcilerError(f"cannot parse a statement from {engine} ({exc.args[0]}): {statement.strip()[:300]}") from None
    if len(parsed) != 1:
        raise ReconcilerError(f"expected one statement from {engine}, got {len(parsed)}: {statement.strip()[:300]}")
    node = parsed[0].stmt
    assert node is not None
    return node


def expression(text: str) -> ast.Node:
    """One SQL expression's parse tree (conversions.py has checked the annotation is one)."""
    select = pglast.parse_sql(f"SELECT {text}")[0].stmt
    assert isinstance(select, ast.SelectStmt) and select.targetList
    target = select.targetList[0]
    assert isinstance(target, ast.ResTarget) and target.val is not None
    return target.val


def walk(node: object, visit: Callable[[ast.Node], bool]) -> None:
    """Every node under ``node``, depth first; ``visit`` returns False to leave a node's children unvisited."""
    if isinstance(node, ast.Node):
        if visit(node):
            for name in node:
                walk(getattr(node, name), visit)
    elif isinstance(node, tuple | list):
        for item in node:
            walk(item, visit)


def rv(relation: ast.RangeVar | None) -> str:
    """'schema.table' (unquoted, public when unqualified) of a RangeVar."""
    if relation is None:
        return ""
    return qualify(f"{relation.schemaname}.{relation.relname}" if relation.schemaname else str(relation.relname))


def relation_parts(relation: ast.RangeVar) -> tuple[str, str]:
    return str(relation.schemaname or "public"), str(relation.relname)


def ident(name: str) -> sql.Composable:
    return sql.Identifier(*name.split("."))


def q(template: str, *parts: sql.Composable) -> str:
    return sql.SQL(template).format(*parts).as_string(None)


def names(items: Iterable[ast.Node] | None) -> str:
    return ".".join(str(getattr(i, "sval", "")) for i in items or ())


def tables_of(node: ast.Node) -> tuple[str, ...]:
    """Every table a statement names (the relation it alters plus referenced ones), in the breadth-first order
    of pglast's Visitor, walked here without the ancestry it keeps for each node (a third of compiling GitLab)."""
    found: dict[str, None] = {}
    queue: deque[ast.Node | tuple[Any, ...]] = deque([node])
    while queue:
        item = queue.popleft()
        for sub in item if isinstance(item, tuple) else (item,):
            if isinstance(sub, ast.Node):
                if isinstance(sub, ast.RangeVar):
                    found.setdefault(rv(sub))
                queue.extend(v for v in (getattr(sub, m) for m in _branches(type(sub))) if isinstance(v, tuple | ast.Node))
            elif isinstance(sub, tuple):
                queue.extend(v for v in sub if isinstance(v, tuple | ast.Node))
    return tuple(found)


_BRANCHES: dict[type, tuple[str, ...]] = {}


def _branches(cls: type) -> tuple[str, ...]:
    """The members of a node class that can hold nodes or lists of them (not names, flags, enums, locations)."""
    known = _BRANCHES.get(cls)
    if known is None:
        def may_branch(py_type: Any) -> bool:
            types = py_type if isinstance(py_type, tuple) else (py_type,)
            return any(t in (tuple, list, dict) or (isinstance(t, type) and issubclass(t, ast.Node)) for t in types)

        slots = vars(cls).get("__slots__", ())  # a node class's members, each with the types it may hold
        known = _BRANCHES[cls] = tuple(name for name, info in slots.items() if may_branch(info.py_type)) \
            if isinstance(slots, Mapping) else tuple(slots)
    return known


def short(name: str, suffix: str) -> str:
    """A constraint name within PostgreSQL's 63 bytes, stable for the same input."""
    candidate = f"{name}_{suffix}"
    if len(candidate.encode()) <= 63:
        return candidate
    digest = hashlib.sha256(candidate.encode()).hexdigest()[:8]
    return f"{name.encode()[: 63 - len(suffix) - 10].decode(errors='ignore')}_{digest}_{suffix}"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
