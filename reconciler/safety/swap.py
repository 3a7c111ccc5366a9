"""One column put in the place of another, shared by a dual column (dual_column.py) and its way back (way_back.py):
the indexes of the column built again on the incoming one, CONCURRENTLY; the cut-over, one short transaction; the
contract, the outgoing column dropped, a phase of its own (``apply --hold-contract`` leaves it for later).

The forward cut-over keeps the outgoing column in step with the incoming one (a trigger converts every write back,
as pgroll keeps its old column), so that until the contract ``reconciler rollback`` can swap back in one short
lock with no write lost. A value the old type cannot hold is kept as NULL there, never failing the application's
write: the way back checks every row first and refuses to lose one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import pglast
from pglast import ast
from psycopg import sql

from ..inspect import IdentityFact
from .carried_keys import CarriedKeys, added, dropped, validations
from .context import Context
from .drafts import BACKFILL, CUTOVER, EXPAND, POST_CUTOVER, POST_VALIDATE, Draft
from .indexes import index_columns
from .nodes import deparse, q, short, walk
from .steps import Hazard, HazardCode

CONTRACT = "contract"  # the step kind that drops the outgoing column: a policy can ask approval for it


def tag_of(table: str, column: str) -> str:
    """The helpers' names' suffix: the same for the same column in every plan (a later plan finds what an earlier
    one made)."""
    return hashlib.sha256(f"{table}.{column}".encode()).hexdigest()[:8]


def kept_name(column: str, tag: str) -> str:
    """The name a dual column's cut-over gives the column it replaces, until the contract."""
    return short(f"{column}_reconciler_old", tag)


@dataclass(frozen=True)
class Swap:
    table: str  # 'schema.table'
    parts: tuple[str, ...]  # (schema, table) as the statement names them
    column: str  # the name both have, one after the other
    incoming: str  # the column that takes the name
    outgoing: str  # the name the column that had it gets, until the contract drops it
    tag: str  # from the table and column: the helpers' names
    not_null: bool
    default: str | None
    check: str | None  # the incoming column's CHECK (... IS NOT NULL), validated before the cut-over
    keys: CarriedKeys
    stop_trigger: str  # the trigger (and function) that kept the incoming column in step: gone at the cut-over
    stop_function: str
    keep_in_step: str | None = None  # the type the outgoing column has: a trigger keeps it in step until contract
    sequence: str | None = None  # 'schema.sequence' the column owns (serial): owned by the incoming one after
    identity: IdentityFact | None = None  # the column's identity: the incoming one's after, going on where it stopped

    @property
    def t(self) -> sql.Identifier:
        return sql.Identifier(*self.parts)


def not_null_check(ctx: Context, table: str, parts: tuple[str, ...], column: str,
                   hazard: Hazard | None = None) -> tuple[str, list[Draft], Draft]:
    """A ``CHECK (column IS NOT NULL) NOT VALID`` on the incoming column, so the cut-over's SET NOT NULL needs no scan:
    (its name, its drafts for the table's expand transaction (dropped first: a run stopped part-way may have left it),
    its validation, a transaction of its own that does not block writes)."""
    t, name = sql.Identifier(*parts), short(f"{parts[-1]}_{column}", "notnull")
    check = sql.Identifier(name)
    expand = [Draft(sql=q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", t, check), kind="drop_constraint",
                    object=f"{table}.{name}", tables=(table,), rollback_sql="", reversible=True,
                    identity=(*parts, name), helper=True),
              Draft(sql=q("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID", t, check,
                          sql.Identifier(column)), kind="add_check_constraint", object=f"{table}.{name}",
                    tables=(table,), rollback_sql=q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", t, check),
                    reversible=True, identity=(*parts, name), helper=True, hazards=(hazard,) if hazard else ())]
    validate = Draft(sql=q("ALTER TABLE {} VALIDATE CONSTRAINT {}", t, check), kind="validate_constraint",
                     object=f"{table}.{name}", tables=(table,), isolated=True, stage=POST_VALIDATE, rollback_sql="",
                     reversible=True, identity=(*parts, name), helper=True)
    return name, [replace(d, stage=EXPAND, group=f"expand {table}") for d in expand], validate


def index_builds(ctx: Context, swap: Swap) -> tuple[list[Draft], list[tuple[str, str]]]:
    """The column's indexes and keys' indexes built on the incoming column, CONCURRENTLY, under temporary names; and
    (index, temporary name) of the plain ones, swapped by name in the cut-over (the keys' are swapped in by
    ``ADD CONSTRAINT ... USING INDEX``)."""
    schema = swap.parts[0]
    plain = [(index, f.definition, short(index.split(".", 1)[1], swap.tag)) for index, f in sorted(ctx.facts.indexes.items())
             if f.table == swap.table and not f.backs_constraint and swap.column in columns_of(f.definition)]
    keyed = [(str(key.index), definition, temporary) for key, definition, temporary in swap.keys.indexes]
    drafts, renamed = [], [(index, temporary) for index, _definition, temporary in plain]
    for _index, definition, temporary in plain + keyed:
        ctx.fill_helpers.add(f"{schema}.{temporary}")
        drafts.append(Draft(sql=index_on(definition, swap.column, swap.incoming, temporary),
                            kind="create_index_concurrently", object=f"{schema}.{temporary}", tables=(swap.table,),
                            transactional=False, stage=BACKFILL, index_name=f"{schema}.{temporary}",
                            rollback_sql=q("DROP INDEX CONCURRENTLY IF EXISTS {}", sql.Identifier(schema, temporary)),
                            reversible=True, identity=(schema, temporary), helper=True))
    return drafts, renamed


def cutover(ctx: Context, swap: Swap, renamed: list[tuple[str, str]], what: str) -> list[Draft]:
    """The cut-over transaction, the foreign keys' validations after it, then the contract."""
    t, c = swap.t, sql.Identifier(swap.column)
    incoming, outgoing = sql.Identifier(swap.incoming), sql.Identifier(swap.outgoing)
    schema = swap.parts[0]
    order = swap.keys.locked(swap.table)
    others = tuple(name for name in order if name != swap.table)
    locked = sql.SQL(", ").join(sql.Identifier(*name.split(".", 1)) for name in order)
    statements = [q("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", locked), swap.stop_trigger, swap.stop_function,
                  *dropped(swap.keys)]
    sequence = sql.Identifier(*swap.identity.sequence.split(".", 1)) if swap.identity else None
    held = sql.Identifier(f"reconciler_seq_{swap.tag}")
    if swap.identity and sequence:  # its value kept for the transaction: DROP IDENTITY drops the sequence
        statements += [q("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT last_value, is_called FROM {}", held,
                         sequence), q("ALTER TABLE {} ALTER COLUMN {} DROP IDENTITY", t, c)]
    if swap.not_null:  # writes after the cut-over leave the outgoing column out (or the trigger fills it)
        statements.append(q("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL", t, c))
    if swap.default:
        statements.append(q("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT", t, c))
    statements += [q("DROP INDEX {}", sql.Identifier(*index.split(".", 1))) for index, _temporary in renamed]
    statements += [q("ALTER TABLE {} RENAME COLUMN {} TO {}", t, c, outgoing),
                   q("ALTER TABLE {} RENAME COLUMN {} TO {}", t, incoming, c)]
    if swap.not_null and swap.check:  # under its final name: PostgreSQL 18 names NOT NULL after the column
        statements += [q("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL", t, c),
                       q("ALTER TABLE {} DROP CONSTRAINT {}", t, sql.Identifier(swap.check))]
    if swap.default:
        statements.append(q("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT ", t, c) + swap.default)
    if swap.identity and sequence:  # the same name, the incoming type's bounds, from the value the old one had
        statements += [q("ALTER TABLE {} ALTER COLUMN {} ADD GENERATED ", t, c)
                       + ("ALWAYS" if swap.identity.always else "BY DEFAULT")
                       + q(" AS IDENTITY (SEQUENCE NAME {} ", sequence) + swap.identity.options() + ")",
                       q("SELECT setval({}, last_value, is_called) FROM pg_temp.{}",
                         sql.Literal(sequence.as_string(None)), held)]
    if swap.sequence:  # else the contract's DROP COLUMN would take the sequence (and fail: the default uses it)
        statements.append(q("ALTER SEQUENCE {} OWNED BY {}", sql.Identifier(*swap.sequence.split(".", 1)),
                            sql.Identifier(*swap.parts, swap.column)))
    statements += [q("ALTER INDEX {} RENAME TO {}", sql.Identifier(schema, temporary), sql.Identifier(index.split(".", 1)[1]))
                   for index, temporary in renamed]
    statements += added(swap.keys)
    back, back_trigger = sql.Identifier(schema, f"reconciler_back_{swap.tag}"), sql.Identifier(f"reconciler_back_{swap.tag}")
    if swap.keep_in_step is not None:
        body = (q("BEGIN BEGIN NEW.{} := NEW.{}::", outgoing, c) + swap.keep_in_step
                + q("; EXCEPTION WHEN data_exception THEN NEW.{} := NULL; END; RETURN NEW; END", outgoing))
        statements += [q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT "
                         "AS ", back) + f"$reconciler_back${body}$reconciler_back$",
                       q("CREATE OR REPLACE TRIGGER {} BEFORE INSERT OR UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()",
                         back_trigger, t, back)]
    also = f" (and {', '.join(others)}, for the foreign keys re-pointed)" if others else ""
    lock = ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, f"{what}: a brief exclusive lock{also} (no scan, no "
                      "rewrite) that waits behind running transactions, retried after lock_timeout", swap.table)
    drafts = [Draft(sql=statement, kind="cutover", object=f"{swap.table}.{swap.column}", tables=order,  # lock order
                    stage=CUTOVER, rollback_sql=None, reversible=False, hazards=(lock,) if i == 0 else (), helper=True)
              for i, statement in enumerate(statements)]
    drafts += validations(ctx, swap.keys)
    return drafts + contract(ctx, swap.table, swap.parts, swap.outgoing, swap.tag, swap.column,
                             kept=swap.keep_in_step is not None)


def contract(ctx: Context, table: str, parts: tuple[str, ...], outgoing: str, tag: str, column: str, *,
             kept: bool) -> list[Draft]:
    """The outgoing column dropped (and the trigger that kept it in step): one transaction, after every cut-over."""
    t, schema = sql.Identifier(*parts), parts[0]
    group = f"contract {tag}"
    drafts = []
    if kept:
        back = f"reconciler_back_{tag}"
        drafts += [Draft(sql=q("DROP TRIGGER IF EXISTS {} ON {}", sql.Identifier(back), t), kind="drop_trigger",
                         object=f"{table}.{back}", tables=(table,), stage=POST_CUTOVER, group=group, rollback_sql=None,
                         reversible=False, identity=(*parts, back), helper=True),
                   Draft(sql=q("DROP FUNCTION IF EXISTS {}()", sql.Identifier(schema, back)), kind="drop_function",
                         object=f"{schema}.{back}()", tables=(), stage=POST_CUTOVER, group=group, rollback_sql=None,
                         reversible=False, identity=(schema, back), helper=True)]
    drafts.append(Draft(sql=q("ALTER TABLE {} DROP COLUMN IF EXISTS {}", t, sql.Identifier(outgoing)), kind=CONTRACT,
                        object=f"{table}.{outgoing}", tables=(table,), stage=POST_CUTOVER, group=group,
                        rollback_sql=None, reversible=False, identity=(*parts, outgoing), helper=True,
                        hazards=(ctx.hazard(HazardCode.DATA_LOSS, f"the contract: drops the column {column} had before "
                                            "(its values live on, converted and checked, in the one that took its "
                                            "place); after it there is no way back in one short lock", table),)))
    return drafts


def columns_of(definition: str) -> set[str]:
    """The columns an index's definition (pg_get_indexdef) reads."""
    node = pglast.parse_sql(definition)[0].stmt
    return index_columns(node) if isinstance(node, ast.IndexStmt) else set()


def index_on(definition: str, column: str, new: str, name: str) -> str:
    """An index's definition with ``column`` read as ``new``, named ``name``, built CONCURRENTLY."""
    node = pglast.parse_sql(definition)[0].stmt
    assert isinstance(node, ast.IndexStmt)

    def visit(item: ast.Node) -> bool:
        if isinstance(item, ast.IndexElem) and item.name == column:
            item.name = new
        if isinstance(item, ast.ColumnRef):
            fields = item.fields or ()
            if fields and isinstance(fields[-1], ast.String) and str(fields[-1].sval) == column:
                item.fields = (*fields[:-1], ast.String(sval=new))
        return not isinstance(item, ast.ColumnRef)

    walk(node, visit)
    node.idxname = name
    node.concurrent = True
    node.if_not_exists = True  # a run stopped part-way may have built it already
    return deparse(node)
