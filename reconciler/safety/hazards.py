"""The hazards of an ALTER TABLE on a table someone may be using: what it locks, scans, rewrites or loses."""

from __future__ import annotations

from pglast import ast, enums
from pglast.visitors import Visitor

from .context import Context
from .nodes import deparse, rv
from .steps import Hazard, HazardCode


def alter_hazards(ctx: Context, table: str, cmds: list[ast.AlterTableCmd]) -> tuple[Hazard, ...]:
    found: list[Hazard] = []
    for cmd in cmds:
        subtype = enums.AlterTableType(int(cmd.subtype or 0))
        column = str(cmd.name) if cmd.name else None
        if subtype is enums.AlterTableType.AT_DropColumn:
            found.append(ctx.hazard(HazardCode.DATA_LOSS, f"drops column {column} and its values", table))
        elif subtype is enums.AlterTableType.AT_AlterColumnType and isinstance(cmd.def_, ast.ColumnDef):
            if rewrites_type(ctx, table, column or "", cmd.def_):
                found.append(ctx.hazard(HazardCode.TABLE_REWRITE, f"changing the type of {column} rewrites the table and "
                                        "its indexes under an exclusive lock", table))
            found.append(ctx.hazard(HazardCode.STATISTICS_RESET, f"changing the type or collation of {column} discards "
                                    f"its statistics: queries may plan badly until ANALYZE {table} ({column})", table))
            found.extend(references_left_behind(ctx, table, column or "", cmd.def_))
        elif subtype in (enums.AlterTableType.AT_SetLogged, enums.AlterTableType.AT_SetUnLogged):
            found.append(ctx.hazard(HazardCode.TABLE_REWRITE, "SET LOGGED or UNLOGGED rewrites the table and its indexes "
                                    "under an exclusive lock (made logged: all of it written to the WAL too; from "
                                    "safety.online_rewrite_rows rows it is built again beside it instead)", table))
        elif subtype is enums.AlterTableType.AT_ReplicaIdentity:
            found.append(ctx.hazard(HazardCode.REPLICA_IDENTITY_CHANGE, "changes what logical replication and change "
                                    "data capture receive for updated and deleted rows; on a published table, REPLICA "
                                    "IDENTITY NOTHING makes UPDATE and DELETE fail", table))
        elif subtype is enums.AlterTableType.AT_SetNotNull:
            found.append(ctx.hazard(HazardCode.FULL_SCAN_UNDER_LOCK, f"SET NOT NULL on {column} scans the table under "
                                    "an exclusive lock", table))
        elif subtype is enums.AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
            found.extend(add_column_hazards(ctx, table, cmd.def_))
        elif subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint):
            con = cmd.def_
            contype = enums.ConstrType(int(con.contype or 0))
            if (contype in (enums.ConstrType.CONSTR_PRIMARY, enums.ConstrType.CONSTR_UNIQUE) and not con.indexname
                    and ctx.partitioned(table)):
                found.append(ctx.hazard(HazardCode.FULL_SCAN_UNDER_LOCK, "attaches each partition's matching unique "
                                        "index (built before, concurrently, where this plan can); a partition without "
                                        "one has it built under an exclusive lock", table))
            elif contype in (enums.ConstrType.CONSTR_PRIMARY, enums.ConstrType.CONSTR_UNIQUE) and not con.indexname:
                found.append(ctx.hazard(HazardCode.FULL_SCAN_UNDER_LOCK, "builds the constraint's index under an "
                                        "exclusive lock", table))
            elif contype in (enums.ConstrType.CONSTR_FOREIGN, enums.ConstrType.CONSTR_CHECK,
                             enums.ConstrType.CONSTR_EXCLUSION, enums.ConstrType.CONSTR_NOTNULL) and not con.skip_validation:
                found.append(ctx.hazard(HazardCode.FULL_SCAN_UNDER_LOCK, "validates every row while holding the lock",
                                        table))
            found.extend(referenced_lock(ctx, table, con))
        elif subtype in (enums.AlterTableType.AT_EnableRowSecurity, enums.AlterTableType.AT_DisableRowSecurity,
                         enums.AlterTableType.AT_ForceRowSecurity, enums.AlterTableType.AT_NoForceRowSecurity):
            found.append(ctx.hazard(HazardCode.AUTHZ_CHANGE, "changes who can see which rows", table))
    if any(not lighter_lock(c) for c in cmds):
        found.append(ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, "blocks reads and writes while held, and waits "
                                "behind running transactions", table))
    return tuple(found)


def add_column_hazards(ctx: Context, table: str, col: ast.ColumnDef) -> list[Hazard]:
    found: list[Hazard] = []
    constraints = [c for c in col.constraints or () if isinstance(c, ast.Constraint)]
    default = next((c.raw_expr for c in constraints
                    if enums.ConstrType(int(c.contype or 0)) is enums.ConstrType.CONSTR_DEFAULT), None)
    not_null = any(enums.ConstrType(int(c.contype or 0)) is enums.ConstrType.CONSTR_NOTNULL for c in constraints)
    identity = any(enums.ConstrType(int(c.contype or 0)) in (enums.ConstrType.CONSTR_IDENTITY,
                                                               enums.ConstrType.CONSTR_GENERATED) for c in constraints)
    if (default is not None and volatile(ctx, default)) or identity:
        found.append(ctx.hazard(HazardCode.TABLE_REWRITE, f"a volatile default or generated value for {col.colname} "
                                "rewrites the table under an exclusive lock", table))
    size = ctx.size(table)
    if not_null and default is None and not identity and size is not None and size.rows > 0:
        found.append(ctx.hazard(HazardCode.CORRECTNESS, f"adding NOT NULL column {col.colname} without a default "
                                "fails on a table with rows", table))
    return found


def volatile(ctx: Context, expr: ast.Node) -> bool:
    """Does the expression call a function live knows as volatile (by bare name, in any schema)?"""
    found = False
    known = ctx.facts.volatile_functions

    class _V(Visitor):
        def visit_FuncCall(self, _ancestors: object, node: ast.FuncCall) -> None:
            nonlocal found
            if node.funcname and str(node.funcname[-1].sval) in known:
                found = True

    _V()(expr)
    return found


def rewrites_type(ctx: Context, table: str, column: str, col: ast.ColumnDef) -> bool:
    """Does changing ``column`` to ``col``'s type rewrite the table (not binary-coercible, or a length to check)?"""
    current = ctx.facts.columns.get((table, column))
    if current is None or col.typeName is None:
        return True
    target_oid = ctx.type_oid(col.typeName)
    if target_oid is None:
        return True
    if target_oid == current.type_oid:
        # same type, new modifier: widening varchar/numeric keeps the data in place
        mods = [getattr(m.val, "ival", None) for m in col.typeName.typmods or () if isinstance(m, ast.A_Const)]
        return not mods or not _widens(current.type, mods)
    return (current.type_oid, target_oid) not in ctx.facts.binary_coercible or _coerces_length(col.typeName)


def referenced_lock(ctx: Context, table: str, con: ast.Constraint) -> tuple[Hazard, ...]:
    """Adding a foreign key locks the table it references in SHARE ROW EXCLUSIVE mode until the transaction
    commits: writes to that table wait, however new the referencing table is."""
    referenced = rv(con.pktable) if enums.ConstrType(int(con.contype or 0)) is enums.ConstrType.CONSTR_FOREIGN else ""
    if not referenced or referenced == table or not ctx.existing(referenced):
        return ()
    return (ctx.hazard(HazardCode.BLOCKS_WRITES, f"the foreign key locks {referenced} in SHARE ROW EXCLUSIVE mode "
                       "until the transaction commits: writes to it wait, and queue behind running transactions",
                       referenced),)


def lighter_lock(cmd: ast.AlterTableCmd) -> bool:
    """ALTER TABLE forms that take less than ACCESS EXCLUSIVE: VALIDATE CONSTRAINT (SHARE UPDATE
    EXCLUSIVE) and adding a foreign key (SHARE ROW EXCLUSIVE: reads go on)."""
    subtype = enums.AlterTableType(int(cmd.subtype or 0))
    if subtype is enums.AlterTableType.AT_ValidateConstraint:
        return True
    return (subtype is enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint)
            and enums.ConstrType(int(cmd.def_.contype or 0)) is enums.ConstrType.CONSTR_FOREIGN)


def _coerces_length(target: ast.TypeName) -> bool:
    """A binary-coercible change to another type that gives a length (text -> varchar(n), varchar -> char(n)) still
    runs the target's length coercion on every value: PostgreSQL rewrites the table (only the same type widened
    keeps it, see ``_widens``)."""
    return bool(target.typmods)


def _widens(current_type: str, mods: list[int | None]) -> bool:
    """varchar(n) -> varchar(m >= n) and numeric(p, s) -> numeric(p' >= p, s) keep the stored data."""
    if "(" not in current_type or not mods or mods[0] is None:
        return False
    try:
        current = [int(x) for x in current_type[current_type.index("(") + 1: current_type.index(")")].split(",")]
    except ValueError:
        return False
    if current_type.startswith(("character varying", "varchar", "bit varying")):
        return mods[0] >= current[0]
    if current_type.startswith("numeric") and len(current) == 2 and len(mods) == 2 and mods[1] is not None:
        return mods[0] - mods[1] >= current[0] - current[1] and mods[1] == current[1]
    return False


def references_left_behind(ctx: Context, table: str, column: str, col: ast.ColumnDef) -> list[Hazard]:
    """The foreign keys to a column whose type changes, from columns the plan leaves as they are: an ``integer`` key
    made ``bigint`` still referenced from ``integer`` columns, which cannot hold the keys past integer's range (the
    plan is declarative: the desired SQL says which type each column has, so this is said, not changed)."""
    fact = ctx.facts.columns.get((table, column))
    target = ctx.type_oid(col.typeName)
    if fact is None or target is None or target == fact.type_oid or col.typeName is None:
        return []
    found = []
    for key in ctx.facts.keys.get((table, column), ()):
        if key.kind != "f" or (key.ref_table, key.ref_column) != (table, column) \
                or (key.table, key.column) in ctx.new_or_retyped_columns:
            continue
        source = ctx.facts.columns.get((key.table, key.column))
        if source is None or source.type_oid == target:
            continue
        found.append(ctx.hazard(
            HazardCode.FOREIGN_KEY_TYPE_MISMATCH, f"{key.table}.{key.column} stays {source.type} while {column}, the key its foreign "
            f"key {key.name} references, becomes {deparse(col.typeName)}: keys past what {source.type} holds cannot be "
            f"referenced from it; change its type in the desired SQL too", key.table))
    return found
