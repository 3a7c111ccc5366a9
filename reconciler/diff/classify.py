"""Name what a statement does (kind) and to what (object), from pglast's parse tree."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import pglast
from pglast import ast, enums

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")

_ALTER_TABLE_KINDS = {
    enums.AlterTableType.AT_AddColumn: "add_column",
    enums.AlterTableType.AT_DropColumn: "drop_column",
    enums.AlterTableType.AT_AlterColumnType: "alter_column_type",
    enums.AlterTableType.AT_SetNotNull: "set_not_null",
    enums.AlterTableType.AT_DropNotNull: "drop_not_null",
    enums.AlterTableType.AT_ColumnDefault: "set_default",
    enums.AlterTableType.AT_DropConstraint: "drop_constraint",
    enums.AlterTableType.AT_ValidateConstraint: "validate_constraint",
    enums.AlterTableType.AT_EnableRowSecurity: "enable_rls",
    enums.AlterTableType.AT_DisableRowSecurity: "disable_rls",
    enums.AlterTableType.AT_AttachPartition: "attach_partition",
    enums.AlterTableType.AT_DetachPartition: "detach_partition",
}

_CONSTRAINT_KINDS = {
    enums.ConstrType.CONSTR_FOREIGN: "add_foreign_key",
    enums.ConstrType.CONSTR_PRIMARY: "add_primary_key",
    enums.ConstrType.CONSTR_UNIQUE: "add_unique_constraint",
    enums.ConstrType.CONSTR_CHECK: "add_check_constraint",
    enums.ConstrType.CONSTR_EXCLUSION: "add_exclusion_constraint",
}


def _names(items: Any) -> str:
    parts = [getattr(i, "sval", None) for i in items or ()]
    return ".".join(p for p in parts if p)


def _range_var(rv: ast.RangeVar | None) -> str:
    if rv is None:
        return ""
    return f"{rv.schemaname}.{rv.relname}" if rv.schemaname else str(rv.relname)


def _object_name(obj: Any) -> str:
    if isinstance(obj, ast.ObjectWithArgs):
        # a prefix operator's missing left argument is None (NONE in SQL)
        return _names(obj.objname) + "(" + ", ".join(_names(a.names) if a is not None else "NONE"
                                                     for a in obj.objargs or ()) + ")"
    if isinstance(obj, ast.TypeName):
        return _names(obj.names)
    if isinstance(obj, ast.String):
        return str(obj.sval)
    if isinstance(obj, tuple):
        return _names(obj)
    return ""


def _object_type(value: Any) -> enums.ObjectType:
    return enums.ObjectType(int(value))


def _snake(name: str) -> str:
    return _CAMEL.sub("_", name).lower()


def classify(statement: str) -> tuple[str, str]:
    """(kind, object) of one SQL statement; statements pglast cannot parse are ("unparsed", "")."""
    try:
        parsed = pglast.parse_sql(statement)
    except pglast.parser.ParseError:
        return "unparsed", ""
    if len(parsed) != 1:
        return "multiple", ""
    return classify_node(parsed[0].stmt)


def classify_node(node: ast.Node | None) -> tuple[str, str]:
    """(kind, object) of one statement already parsed (the safety compiler parses each once)."""
    if isinstance(node, ast.CreateStmt):
        return "create_table", _range_var(node.relation)
    if isinstance(node, ast.AlterTableStmt):
        return _alter_table(node)
    if isinstance(node, ast.IndexStmt):
        schema = node.relation.schemaname if node.relation is not None else None
        index = f"{schema}.{node.idxname}" if schema and node.idxname else str(node.idxname or "")
        return ("create_index_concurrently" if node.concurrent else "create_index"), index
    if isinstance(node, ast.DropStmt):
        kind = _object_type(node.removeType).name.removeprefix("OBJECT_").lower()
        objects = ", ".join(_object_name(o) for o in node.objects or ())
        return f"drop_{kind}{'_concurrently' if node.concurrent else ''}", objects
    if isinstance(node, ast.ViewStmt):
        return ("replace_view" if node.replace else "create_view"), _range_var(node.view)
    if isinstance(node, ast.CreateTableAsStmt):
        return "create_materialized_view", _range_var(node.into.rel if node.into else None)
    if isinstance(node, ast.CreateFunctionStmt):
        kind = "create_procedure" if node.is_procedure else "create_function"
        return kind, _names(node.funcname)
    if isinstance(node, ast.CreateEnumStmt):
        return "create_enum", _names(node.typeName)
    if isinstance(node, ast.AlterEnumStmt):
        return ("rename_enum_value" if node.oldVal else "add_enum_value"), _names(node.typeName)
    if isinstance(node, ast.CreateTrigStmt):
        return "create_trigger", f"{_range_var(node.relation)}.{node.trigname}"
    if isinstance(node, ast.CreateSeqStmt):
        return "create_sequence", _range_var(node.sequence)
    if isinstance(node, ast.AlterSeqStmt):
        return "alter_sequence", _range_var(node.sequence)
    if isinstance(node, ast.CreateSchemaStmt):
        return "create_schema", str(node.schemaname or "")
    if isinstance(node, ast.CreateExtensionStmt):
        return "create_extension", str(node.extname)
    if isinstance(node, ast.AlterExtensionStmt):
        return "alter_extension", str(node.extname)
    if isinstance(node, ast.VariableSetStmt):
        return "set", str(node.name or "")
    if isinstance(node, ast.RenameStmt):
        kind = _object_type(node.renameType).name.removeprefix("OBJECT_").lower()
        target = _range_var(node.relation) if node.relation is not None else _object_name(node.object)
        if kind in ("column", "tabconstraint") and node.subname:
            target = f"{target}.{node.subname}"  # the column or constraint, by its old name
        return ("rename_constraint" if kind == "tabconstraint" else f"rename_{kind}"), target
    if isinstance(node, ast.CommentStmt):
        return "comment", _object_name(node.object)
    if isinstance(node, ast.GrantStmt):
        targets = (_range_var(o) if isinstance(o, ast.RangeVar) else _object_name(o) for o in node.objects or ())
        return ("grant" if node.is_grant else "revoke"), ", ".join(targets)
    if isinstance(node, ast.CreatePolicyStmt):
        return "create_policy", f"{_range_var(node.table)}.{node.policy_name}"
    if isinstance(node, ast.AlterPolicyStmt):
        return "alter_policy", f"{_range_var(node.table)}.{node.policy_name}"
    if isinstance(node, ast.CompositeTypeStmt):
        return "create_composite_type", _range_var(node.typevar)
    if isinstance(node, ast.CreateDomainStmt):
        return "create_domain", _names(node.domainname)
    if isinstance(node, ast.AlterDomainStmt):
        return "alter_domain", _names(node.typeName)
    if isinstance(node, ast.DefineStmt):  # CREATE OPERATOR, AGGREGATE, COLLATION, TEXT SEARCH ...
        return f"create_{_object_type(node.kind).name.removeprefix('OBJECT_').lower()}", _names(node.defnames)
    return _snake(type(node).__name__).removesuffix("_stmt"), ""


def _alter_table(node: ast.AlterTableStmt) -> tuple[str, str]:
    table = _range_var(node.relation)
    cmds = [c for c in node.cmds or () if isinstance(c, ast.AlterTableCmd)]
    if _object_type(node.objtype) is not enums.ObjectType.OBJECT_TABLE:
        kind = _object_type(node.objtype).name.removeprefix("OBJECT_").lower()
        return f"alter_{kind}", table
    if len(cmds) != 1:
        return "alter_table", table
    cmd = cmds[0]
    subtype = enums.AlterTableType(int(cmd.subtype or 0))
    if subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint):
        kind = _CONSTRAINT_KINDS.get(enums.ConstrType(int(cmd.def_.contype or 0)), "add_constraint")
        name = cmd.def_.conname
        return kind, f"{table}.{name}" if name else table
    if subtype is enums.AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
        return "add_column", f"{table}.{cmd.def_.colname}"
    kind = _ALTER_TABLE_KINDS.get(subtype, "alter_table")
    if cmd.name and kind != "alter_table":
        return kind, f"{table}.{cmd.name}"
    return kind, table


def _parts(items: Any) -> tuple[str, ...]:
    return tuple(str(p) for p in (getattr(i, "sval", None) for i in items or ()) if p)


def _qualified(parts: tuple[str, ...]) -> tuple[str, ...]:
    return ("public", *parts) if len(parts) == 1 else parts


def _relation_parts(rv: ast.RangeVar | None) -> tuple[str, ...]:
    if rv is None or not rv.relname:
        return ()
    return (str(rv.schemaname or "public"), str(rv.relname))


def identity_of(node: ast.Node | None) -> tuple[str, ...]:
    """The object a statement acts on as its name's parts (schema first; ``public`` where the statement names none,
    as migra's statements always do): the catalog is searched part by part, so a name holding a dot is still one
    name. Empty where the statement names no single object."""
    if isinstance(node, ast.IndexStmt):
        table = _relation_parts(node.relation)
        return (table[0], str(node.idxname)) if table and node.idxname else ()
    if isinstance(node, ast.DropStmt):
        objects = list(node.objects or ())
        if len(objects) != 1 or not isinstance(objects[0], tuple):
            return ()
        return _qualified(_parts(objects[0]))
    if isinstance(node, ast.AlterTableStmt):
        table = _relation_parts(node.relation)
        cmds = [c for c in node.cmds or () if isinstance(c, ast.AlterTableCmd)]
        if not table or len(cmds) != 1:
            return table
        cmd = cmds[0]
        if isinstance(cmd.def_, ast.Constraint) and cmd.def_.conname:
            return (*table, str(cmd.def_.conname))
        if isinstance(cmd.def_, ast.ColumnDef) and cmd.def_.colname:
            return (*table, str(cmd.def_.colname))
        return (*table, str(cmd.name)) if cmd.name else table
    if isinstance(node, ast.CreateStmt):
        return _relation_parts(node.relation)
    if isinstance(node, ast.ViewStmt):
        return _relation_parts(node.view)
    if isinstance(node, ast.CreateSeqStmt | ast.AlterSeqStmt):
        return _relation_parts(node.sequence)
    if isinstance(node, ast.CreateEnumStmt | ast.AlterEnumStmt):
        return _qualified(_parts(node.typeName))
    if isinstance(node, ast.RenameStmt) and node.relation is not None:
        table = _relation_parts(node.relation)
        return (*table, str(node.subname)) if node.subname else table
    return ()


def recreated(changes: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The objects (unquoted schema.name, a column's schema.table.column; a routine's without its arguments) that a
    list of (kind, object) drops, or renames away (an enum migra rebuilds), and makes again: they come back without
    what live had on them (grants, owner, comment). CREATE OR REPLACE keeps those, so it alone re-creates nothing."""
    pairs = list(changes)
    gone = {_bare(o) for k, o in pairs if k.startswith("drop_") or k in ("rename_type", "rename_enum")}
    made = {_bare(o) for k, o in pairs if k.startswith(("create_", "add_column", "replace_"))}
    return frozenset(gone & made)


def _bare(name: str) -> str:
    return name.split("(", 1)[0].strip()
