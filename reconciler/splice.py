"""When an edit in the middle of the desired schema can be made to the previous schema's loaded database in place.

Loading runs every statement in order, so an edit in the middle of a big schema costs loading everything after it
again (1,500 statements: over half a second). Watch edits the same table again and again, and the database of the
schema before the edit is at hand. It already holds what the statements after the edit made; what the edit
replaced is dropped and what it says now is run last. That gives what loading in order gives only when the edit and
the statements after it cannot see each other, so this module says yes only when it can show that from their parse
trees; otherwise the schema is loaded as usual:

- the edited statements create tables, views and sequences, and do nothing else but index, alter, comment on and
  grant on what they create, or add named indexes to earlier tables (so dropping what the old ones created undoes
  them exactly);
- every statement after the edit is one whose effect stays on the objects it names (tables, indexes, views,
  sequences, comments, grants on named objects, triggers, policies), and none of them mentions anything the edit
  creates, even in a string or a comment;
- no name the statements after the edit create or touch is the start of a name the edit uses, or the other way
  round (PostgreSQL names implicit indexes, constraints, sequences and types after their table and avoids names in
  use: this keeps both orders choosing the same names);
- no statement changes the session (SET, set_config, search_path, temporary objects) or the settings sessions
  start with (ALTER DATABASE or ROLE), since the edit runs in a session of its own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pglast import parser

from .shadow import split_file
from .source import DesiredSchema

log = logging.getLogger(__name__)

MAX_EDITED = 100  # statements on either side of an edit: a bigger rewrite loads as usual

# what the edit itself may be: creating relations (dropped to undo) and statements on what it creates
_CREATES = {"CreateStmt": ("relation", "TABLE"), "CreateSeqStmt": ("sequence", "SEQUENCE"), "ViewStmt": ("view", "VIEW")}
_ON_CREATED = {"IndexStmt", "AlterTableStmt", "CommentStmt", "GrantStmt"}
# what may follow the edit: statements whose effect stays on the objects they name
_AFTER = set(_CREATES) | _ON_CREATED | {"AlterSeqStmt", "CreateTrigStmt", "CreatePolicyStmt"}
_NAME_KEYS = ("relname", "idxname", "conname", "trigname", "policy_name")
_SET_LINE = re.compile(r"^[ \t]*(?:set|reset)\b", re.MULTILINE)
_TEMP = re.compile(r"\btemp(?:orary)?\b")
_SESSION_WORDS = ("set_config", "search_path", "alter database", "alter role", "alter user")
# in the JSON text of parse trees: each statement's kind; what may act beyond the named objects; the names given or
# acted on (a foreign key's table is only referred to)
_KINDS = re.compile(r'\{"stmt":\{"(\w+)"')
_FLAGS = ('"if_not_exists":true', '"replace":true', '"concurrent":true', '"missing_ok":true', '"relpersistence":"t"',
          '"targtype":"ACL_TARGET_ALL_IN_SCHEMA"', '"targtype":"ACL_TARGET_DEFAULTS"')
_TOUCHED = re.compile(r'"(?:relname|idxname|conname|trigname|policy_name)":"([^"\\]*(?:\\.[^"\\]*)*)"')
_REFERRED = ('"pktable":{"relname":', '"pktable":{"referred":')  # not matched by _TOUCHED
_COMMENT_TARGETS = {"OBJECT_TABLE": 1, "OBJECT_VIEW": 1, "OBJECT_SEQUENCE": 1, "OBJECT_COLUMN": 2}


@dataclass(frozen=True)
class Drop:
    kind: str  # TABLE, VIEW or SEQUENCE
    schema: str | None  # None: as the schema named it, found by the search path
    name: str


@dataclass(frozen=True)
class Splice:
    """Statements [start, old_stop) of the previous schema became [start, new_stop) of this one; the ``reused``
    statements after them are the same in both."""

    start: int
    old_stop: int
    new_stop: int
    reused: int
    drops: tuple[Drop, ...]  # what the replaced statements created, last first


def find_splice(old: DesiredSchema, new: DesiredSchema) -> Splice | None:
    """How ``new`` can be made from a database holding ``old``, or None (load it as usual: the reason is logged)."""
    found = _splice(old, new)
    if isinstance(found, str):
        log.debug("shadow cache: the previous schema's database is not edited in place: %s", found)
        return None
    return found


def _splice(old: DesiredSchema, new: DesiredSchema) -> Splice | str:
    """The splice, or why there is none."""
    before, after = _statements(old), _statements(new)
    start = 0
    for a, b in zip(before, after, strict=False):
        if a != b:
            break
        start += 1
    reused = 0
    limit = min(len(before), len(after)) - start
    while reused < limit and before[-1 - reused] == after[-1 - reused]:
        reused += 1
    old_stop, new_stop = len(before) - reused, len(after) - reused
    if old_stop == start and reused == 0:
        return "statements were only added at the end (a copy of the kept database gets them)"
    if old_stop == start and new_stop == start:
        return "the statements are the same"
    if start == 0 and reused == 0:
        return "the schemas have no statement in common at either end"
    if old_stop - start > MAX_EDITED or new_stop - start > MAX_EDITED:
        return f"{max(old_stop, new_stop) - start} statements changed"
    if any(_changes_session(f.text.lower()) for f in (*old.files, *new.files)):  # either: the old one was loaded
        return "a statement changes the session (SET, set_config, search_path, ALTER DATABASE or ROLE, or a temporary object)"
    try:
        replaced = _parse(before[start:old_stop])
        edited = _parse(after[start:new_stop])
        following = _tree(after[new_stop:])
    except ValueError as exc:
        return str(exc)
    drops: list[Drop] = []
    for label, group in (("replaced", replaced), ("edited", edited)):
        reason = _edit_problem(group, drops if label == "replaced" else [], undo=label == "replaced")
        if reason:
            return f"the {label} statements {reason}"
    kinds = _KINDS.findall(following)
    if len(kinds) != len(after) - new_stop:
        return "the statements after the edit parse to a different number of statements"
    odd = next((k for k in kinds if k not in _AFTER), None) or next((f for f in _FLAGS if f in following), None)
    if odd:
        return f"a statement after the edit ({odd}) may reach beyond the objects it names"
    created = {n for group in (replaced, edited) for node in group for n in _creates(node)}
    text = "\n".join(t for _, t in after[new_stop:]).lower()
    seen = next((n for n in created if n in text), None)
    if seen is not None:
        return f"a statement after the edit mentions {seen!r}"
    touched = {_unescape(n).lower().lstrip("_") for n in _TOUCHED.findall(following.replace(*_REFERRED))}
    used = {n.lstrip("_") for group in (replaced, edited) for node in group
            for n in _values(node, (*_NAME_KEYS, "sval")) if n.strip("_")}
    ordered = sorted(touched)  # the first clash in name order: the same message every time
    clash = next(((u, t) for u in sorted(used) for t in ordered if u.startswith(t) or t.startswith(u)), None)
    if clash is not None:
        return f"the edit's name {clash[0]!r} and the name {clash[1]!r} after it could be confused"
    return Splice(start=start, old_stop=old_stop, new_stop=new_stop, reused=reused, drops=tuple(reversed(drops)))


def _statements(desired: DesiredSchema) -> list[tuple[str, str]]:
    return [(f.path, s.text) for f in desired.files for s in split_file(f)]


def _changes_session(text: str) -> bool:
    """Might this (lower-cased) file change its session's state, or the settings later sessions start with (ALTER
    DATABASE or ROLE ... SET)? Plain substring tests first: they are fast."""
    return (any(word in text for word in _SESSION_WORDS) or ("temp" in text and _TEMP.search(text) is not None)
            or _SET_LINE.search(text) is not None)


def _tree(statements: list[tuple[str, str]]) -> str:
    """The statements' parse trees as JSON text: what follows an edit is read with regular expressions, as decoding
    a thousand trees takes longer than the load this saves."""
    if not statements:
        return ""
    try:
        return parser.parse_sql_json("\n;\n".join(text for _, text in statements))
    except parser.ParseError as exc:
        raise ValueError(f"a statement does not parse ({exc.args[0]})") from None


def _parse(statements: list[tuple[str, str]]) -> list[dict[str, Any]]:
    nodes = [s["stmt"] for s in json.loads(_tree(statements) or "{}").get("stmts", [])]
    if len(nodes) != len(statements):
        raise ValueError("the statements parse to a different number of statements")
    return nodes


def _unescape(name: str) -> str:
    return str(json.loads(f'"{name}"')) if "\\" in name else name


def _kind(node: dict[str, Any]) -> str:
    return next(iter(node))


def _unsafe(kind: str, body: dict[str, Any]) -> bool:
    """Could this statement act beyond the objects it names, or depend on what exists beside them?"""
    if body.get("if_not_exists") or body.get("replace") or body.get("concurrent") or body.get("missing_ok"):
        return True
    if kind == "GrantStmt":
        return bool(body.get("targtype") != "ACL_TARGET_OBJECT")
    if kind == "CreateStmt":
        return bool(body.get("relation", {}).get("relpersistence") == "t")
    return False


def _edit_problem(group: list[dict[str, Any]], drops: list[Drop], *, undo: bool) -> str | None:
    """Why these statements cannot be undone by dropping what they create (``undo``: the replaced ones), or redone
    after what follows them. Besides creating relations and acting on those, they may index an earlier table."""
    created: set[str] = set()
    for node in group:
        kind = _kind(node)
        body = node[kind]
        if kind in _CREATES:
            field, word = _CREATES[kind]
            relation = body.get(field, {})
            if _unsafe(kind, body) or not relation.get("relname"):
                return f"include {kind} this cannot undo"
            created.add(relation["relname"].lower())
            drops.append(Drop(word, relation.get("schemaname"), relation["relname"]))
        elif kind == "IndexStmt" and not _unsafe(kind, body) and body.get("relation", {}).get("relname"):
            name = body.get("idxname")
            if body["relation"]["relname"].lower() in created:
                continue  # dropped with its table
            if name is None and undo:
                return "include an index with no name on a table they do not create"
            if name is not None:
                drops.append(Drop("INDEX", body["relation"].get("schemaname"), name))
        elif kind in _ON_CREATED:
            targets = _targets(kind, body)
            if _unsafe(kind, body) or targets is None or not targets <= created:
                return f"include {kind} on an object they do not create"
        else:
            return f"include {kind}"
    return None


def _targets(kind: str, body: dict[str, Any]) -> set[str] | None:
    """The relations a statement on created objects acts on, or None when they cannot be told."""
    if kind in ("IndexStmt", "AlterTableStmt"):
        name = body.get("relation", {}).get("relname")
        return {name.lower()} if name else None
    if kind == "GrantStmt":
        names = [o.get("RangeVar", {}).get("relname") for o in body.get("objects", [])]
        ok = body.get("objtype") in ("OBJECT_TABLE", "OBJECT_SEQUENCE") and names and all(names)
        return {n.lower() for n in names} if ok else None
    back = _COMMENT_TARGETS.get(body.get("objtype", ""))
    parts = [p.get("String", {}).get("sval") for p in body.get("object", {}).get("List", {}).get("items", [])]
    if back is None or len(parts) < back or not all(parts):
        return None
    return {parts[-back].lower()}


def _creates(node: dict[str, Any]) -> Iterator[str]:
    """The names a statement of the edit gives or acts on: the relation it creates or indexes, its indexes',
    constraints', triggers' and policies' names."""
    kind = _kind(node)
    field = _CREATES[kind][0] if kind in _CREATES else "relation" if kind == "IndexStmt" else None
    name = node[kind].get(field, {}).get("relname") if field else None
    if name:
        yield name.lower()  # an index's table too: what follows may not see it indexed or not
    yield from _values(node, _NAME_KEYS[1:])


def _values(node: object, keys: tuple[str, ...]) -> Iterator[str]:
    """Every string under one of ``keys`` anywhere in a parse tree, lower-cased."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value.lower()
            else:
                yield from _values(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _values(item, keys)
