"""Enum values added in place (ALTER TYPE ... ADD VALUE) where migra recreates the type and retypes every column
that uses it (a rewrite of each table)."""

from __future__ import annotations

from collections.abc import Sequence

from pglast import ast, enums
from psycopg import sql

from ..diff.base import Change
from ..inspect import qualify
from .context import Context
from .drafts import PRE, Draft
from .nodes import deparse, expression, ident, names, q, rv


def enum_rewrites(ctx: Context, statements: Sequence[tuple[Change, ast.Node]]) -> tuple[set[int], list[Draft]]:
    """migra's statement groups that recreate an enum only to add values, and the ADD VALUE steps that replace
    them (first: nothing needs the values absent). Removed or reordered values keep migra's form."""
    skipped: set[int] = set()
    hoisted: list[Draft] = []
    if not ctx.settings.switches.enum_add_value:
        return skipped, hoisted
    for i, (_change, node) in enumerate(statements):
        if not (isinstance(node, ast.RenameStmt)
                and enums.ObjectType(int(node.renameType or 0)) is enums.ObjectType.OBJECT_TYPE
                and str(node.newname).endswith("__old_version_to_be_dropped")):
            continue
        target = node.object
        type_names = target.names if isinstance(target, ast.TypeName) else target
        enum_name = qualify(names(type_names if isinstance(type_names, tuple) else ()))
        old_name = f"{enum_name.split('.')[0]}.{node.newname}"
        group = [i]
        new_labels: tuple[str, ...] | None = None
        for j, (_c, other) in enumerate(statements):
            if isinstance(other, ast.CreateEnumStmt) and qualify(names(other.typeName)) == enum_name:
                new_labels = tuple(str(v.sval) for v in other.vals or ())
                group.append(j)
            elif (isinstance(other, ast.AlterTableStmt) and _alters_type_to(other, enum_name)) or (
                    isinstance(other, ast.DropStmt)
                    and enums.ObjectType(int(other.removeType or 0)) is enums.ObjectType.OBJECT_TYPE
                    and any(qualify(names(o.names if isinstance(o, ast.TypeName) else o)) == old_name
                            for o in other.objects or ())):
                group.append(j)
        old_labels = ctx.facts.enums.get(enum_name)
        if old_labels is None or new_labels is None or not _is_extension(old_labels, new_labels):
            continue
        group += _defaults_kept(ctx, statements, {c for k in group for c in _retyped_columns(statements[k][1])})
        original = ";\n".join(statements[k][0].sql for k in sorted(group))
        parts = tuple(str(getattr(n, "sval", "")) for n in (type_names if isinstance(type_names, tuple) else ()))
        identity = ("public", *parts) if len(parts) == 1 else parts
        for n, statement in enumerate(_add_value_statements(enum_name, old_labels, new_labels)):
            hoisted.append(Draft(sql=statement, kind="add_enum_value", object=enum_name, tables=(), identity=identity,
                                 transactional=False, original_sql=original if n == 0 else None, stage=PRE))
        skipped.update(group)
    return skipped, hoisted


def _retyped_columns(node: ast.Node) -> list[tuple[str, str]]:
    if not isinstance(node, ast.AlterTableStmt):
        return []
    return [(rv(node.relation), str(c.name)) for c in node.cmds or () if isinstance(c, ast.AlterTableCmd)
            and enums.AlterTableType(int(c.subtype or 0)) is enums.AlterTableType.AT_AlterColumnType]


def _default_set(node: ast.Node) -> tuple[str, str, str | None] | None:
    """(table, column, the default's text or None for DROP DEFAULT) of an ALTER TABLE that only sets one default."""
    if not isinstance(node, ast.AlterTableStmt) or len(node.cmds or ()) != 1:
        return None
    cmd = (node.cmds or ())[0]
    if not (isinstance(cmd, ast.AlterTableCmd)
            and enums.AlterTableType(int(cmd.subtype or 0)) is enums.AlterTableType.AT_ColumnDefault):
        return None
    return rv(node.relation), str(cmd.name), deparse(cmd.def_) if isinstance(cmd.def_, ast.Node) else None


def _defaults_kept(ctx: Context, statements: Sequence[tuple[Change, ast.Node]],
                   retyped: set[tuple[str, str]]) -> list[int]:
    """The engine drops the defaults of the columns it retypes and sets them again after: with the type kept (values
    added in place) only the last one counts, and not even that when it is the default live has (two ACCESS
    EXCLUSIVE locks on each table for nothing). The indexes of those that go, to skip with the recreation."""
    found: dict[tuple[str, str], list[tuple[int, str | None]]] = {}
    for j, (_c, node) in enumerate(statements):
        default = _default_set(node)
        if default is not None and default[:2] in retyped:
            found.setdefault(default[:2], []).append((j, default[2]))
    kept = []
    for column, sets in found.items():
        fact = ctx.facts.columns.get(column)
        if fact is None or column[0] in ctx.created_tables:
            continue
        kept += [j for j, _text in sets[:-1]]
        last = sets[-1][1]
        if (last is None and fact.default is None) or (
                last is not None and fact.default is not None and last == deparse(expression(fact.default))):
            kept.append(sets[-1][0])
    return kept


def _alters_type_to(node: ast.AlterTableStmt, enum_name: str) -> bool:
    cmds = [c for c in node.cmds or () if isinstance(c, ast.AlterTableCmd)]
    return bool(cmds) and all(
        enums.AlterTableType(int(c.subtype or 0)) is enums.AlterTableType.AT_AlterColumnType
        and isinstance(c.def_, ast.ColumnDef) and c.def_.typeName is not None
        and qualify(names(c.def_.typeName.names)) == enum_name
        for c in cmds
    )


def _is_extension(old: tuple[str, ...], new: tuple[str, ...]) -> bool:
    """True when ``new`` keeps every old label in the same order and only adds."""
    it = iter(new)
    return all(label in it for label in old) and len(new) > len(old)


def _add_value_statements(enum_name: str, old: tuple[str, ...], new: tuple[str, ...]) -> list[str]:
    out = []
    present = list(old)
    for i, label in enumerate(new):
        if label in present:
            continue
        following = next((n for n in new[i + 1:] if n in present), None)
        if following is not None:
            out.append(q("ALTER TYPE {} ADD VALUE {} BEFORE {}", ident(enum_name), sql.Literal(label),
                         sql.Literal(following)))
            present.insert(present.index(following), label)
        else:
            out.append(q("ALTER TYPE {} ADD VALUE {}", ident(enum_name), sql.Literal(label)))
            present.append(label)
    return out
