"""The way back of the plain forms: the SQL that undoes one ALTER TABLE command, or drops a created routine."""

from __future__ import annotations

from dataclasses import replace

from pglast import ast, enums
from pglast.stream import maybe_double_quote_name
from psycopg import sql

from .context import Context
from .drafts import Draft
from .nodes import deparse, ident, q


def alter_rollback(ctx: Context, d: Draft, table: str, cmds: list[ast.AlterTableCmd]) -> Draft:
    """The draft with the SQL that undoes a single-command ALTER TABLE, when it can be derived."""
    if len(cmds) != 1:
        return replace(d, rollback_sql=None, reversible=False)
    cmd = cmds[0]
    subtype = enums.AlterTableType(int(cmd.subtype or 0))
    t = ident(table)
    column = str(cmd.name) if cmd.name else ""
    fact = ctx.facts.columns.get((table, column)) if table not in ctx.created_tables else None
    rollback: str | None = None
    if subtype is enums.AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
        rollback = q("ALTER TABLE {} DROP COLUMN {}", t, sql.Identifier(str(cmd.def_.colname)))
    elif subtype is enums.AlterTableType.AT_SetNotNull:
        rollback = q("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL", t, sql.Identifier(column))
    elif subtype is enums.AlterTableType.AT_DropNotNull:
        rollback = q("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL", t, sql.Identifier(column))
    elif subtype is enums.AlterTableType.AT_ColumnDefault and fact is not None:
        rollback = (q("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT ", t, sql.Identifier(column)) + fact.default
                    if fact.default else q("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT", t, sql.Identifier(column)))
    elif subtype is enums.AlterTableType.AT_AlterColumnType and fact is not None:
        rollback = q("ALTER TABLE {} ALTER COLUMN {} TYPE ", t, sql.Identifier(column)) + fact.type + \
            q(" USING {}::", sql.Identifier(column)) + fact.type
    elif subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint) and cmd.def_.conname:
        rollback = q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", t, sql.Identifier(str(cmd.def_.conname)))
    elif subtype is enums.AlterTableType.AT_ValidateConstraint:
        rollback = ""
    elif subtype is enums.AlterTableType.AT_EnableRowSecurity:
        rollback = q("ALTER TABLE {} DISABLE ROW LEVEL SECURITY", t)
    elif subtype is enums.AlterTableType.AT_DisableRowSecurity:
        rollback = q("ALTER TABLE {} ENABLE ROW LEVEL SECURITY", t)
    return replace(d, rollback_sql=rollback, reversible=rollback is not None)


def drop_routine(node: ast.CreateFunctionStmt) -> str:
    """DROP FUNCTION/PROCEDURE with the routine's identity arguments spelled as pg_get_function_identity_arguments
    spells them: modes, names and types without typmods or defaults, OUT arguments too (DROP FUNCTION ignores them,
    DROP PROCEDURE needs them), not RETURNS TABLE's columns. Other types are spelled as in the CREATE, so they resolve
    the same way."""
    kept = []
    for param in node.parameters or ():
        if not isinstance(param, ast.FunctionParameter) or param.mode == enums.FunctionParameterMode.FUNC_PARAM_TABLE:
            continue
        prefix = _MODE_WORDS.get(str(param.mode), "IN " if node.is_procedure else "")  # a procedure's marks them all
        named = f"{maybe_double_quote_name(str(param.name))} " if param.name else ""
        kept.append(prefix + named + (_identity_type(param.argType) if param.argType is not None else ""))
    parts = [str(getattr(n, "sval", "")) for n in node.funcname or ()]
    name = sql.Identifier(*(["public", *parts] if len(parts) == 1 else parts))
    return q("DROP {} {}(", sql.SQL("PROCEDURE" if node.is_procedure else "FUNCTION"), name) + ", ".join(kept) + ")"


_MODE_WORDS = {"o": "OUT ", "b": "INOUT ", "v": "VARIADIC "}
# format_type's names for the built-in types the SQL grammar spells otherwise
_FORMAT_TYPE = {
    "int2": "smallint", "int4": "integer", "int8": "bigint", "float4": "real", "float8": "double precision",
    "bool": "boolean", "bpchar": "character", "varchar": "character varying", "varbit": "bit varying",
    "numeric": "numeric", "bit": "bit", "interval": "interval", "time": "time without time zone",
    "timetz": "time with time zone", "timestamp": "timestamp without time zone", "timestamptz": "timestamp with time zone",
}


def _identity_type(type_name: ast.TypeName) -> str:
    """An argument's type without its typmod (a signature has none), as format_type prints it."""
    parts = [str(getattr(n, "sval", "")) for n in type_name.names or ()]
    arrays = "[]" * len(type_name.arrayBounds or ())
    if len(parts) == 2 and parts[0] == "pg_catalog" and parts[1] in _FORMAT_TYPE and not type_name.pct_type:
        return ("SETOF " if type_name.setof else "") + _FORMAT_TYPE[parts[1]] + arrays
    return deparse(ast.TypeName(names=type_name.names, setof=type_name.setof, pct_type=type_name.pct_type,
                                arrayBounds=type_name.arrayBounds))
