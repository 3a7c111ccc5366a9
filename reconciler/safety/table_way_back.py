"""A table built again (shadow_table.py) swapped back before its contract, by ``reconciler rollback`` or the desired
SQL reverted: the old table is still there, kept in step by the trigger the cut-over made, and it is what the desired
schema wants (diff/supplements/rebuilds.py compared them), so nothing is copied:

1. every row of the table (each of its partitions, a range of pages at a time) checked to be in the old one, as it
   is; where one is not, the way back stops before the swap, naming how many;
2. one short transaction: the trigger dropped, the table and its indexes renamed away (``_reconciler_gone_<tag>``),
   the old table and its indexes given their names back, the foreign keys to it re-pointed NOT VALID (validated
   after, writes going on), the sequences its columns own moved back;
3. the contract: the table given up dropped, a phase of its own.
"""

from __future__ import annotations

from psycopg import sql

from ..diff.base import Rebuild
from .context import Context
from .drafts import BACKFILL, CUTOVER, POST_CUTOVER, Draft
from .dual_column import VERIFY_KIND
from .nodes import q, short
from .shadow_table import renamed_away, repointed, rows_missing, sequences_away, sequences_on
from .steps import HazardCode
from .swap import CONTRACT


def swap_back(ctx: Context, rebuild: Rebuild) -> list[Draft]:
    assert rebuild.kept is not None
    table = rebuild.table
    schema, name = table.split(".", 1)
    kept_name = rebuild.kept.split(".", 1)[1]
    tag = kept_name.rsplit("_", 1)[1]
    suffix = f"_reconciler_old_{tag}"
    t, kept = sql.Identifier(schema, name), sql.Identifier(schema, kept_name)
    gone = short(f"{name}_reconciler_gone", tag)
    columns = rebuild.columns
    out = [Draft(sql=rows_missing(sql.Identifier(*source.split(".", 1)), kept, rebuild.key, columns), kind=VERIFY_KIND, object=source,
                 tables=(source,), transactional=False, stage=BACKFILL, rollback_sql="", reversible=True,
                 identity=tuple(source.split(".", 1)), helper=True) for source in rebuild.sources]
    referencing = tuple(dict.fromkeys(ref for ref, _name, _d in rebuild.references if ref != table))
    order = (*referencing, table, rebuild.kept)
    back = f"reconciler_back_{tag}"
    ctx.fill_helpers.update({f"{schema}.{back}()", f"{table}.{back}"})  # dropped here: not by the engine's drops too
    statements = [q("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                    sql.SQL(", ").join(sql.Identifier(*n.split(".", 1)) for n in order)),
                  q("DROP TRIGGER {} ON {}", sql.Identifier(back), t),
                  q("DROP FUNCTION {}()", sql.Identifier(schema, back))]
    statements += [q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", sql.Identifier(*ref.split(".", 1)),
                     sql.Identifier(con)) for ref, con, _d in rebuild.references]
    statements += [q("ALTER INDEX {} RENAME TO {}", sql.Identifier(*index.split(".", 1)),
                     sql.Identifier(short(f"{index.split('.', 1)[1]}_reconciler_gone", tag))) for index in rebuild.renamed]
    statements.append(q("ALTER TABLE {} RENAME TO {}", t, sql.Identifier(gone)))
    statements += [q("ALTER INDEX {} RENAME TO {}", sql.Identifier(*index.split(".", 1)),
                     sql.Identifier(index.split(".", 1)[1].removesuffix(suffix)))
                   for index in rebuild.kept_indexes if index.endswith(suffix)]
    statements += [q("ALTER TABLE {} RENAME TO {}", kept, sql.Identifier(name)),
                   q("ALTER TABLE {} ENABLE TRIGGER USER", t)]  # switched off while it was kept in step
    # the identity sequences: the table given up's renamed away, the kept table's given their names back and going on
    # from where the others stand (the rows kept in step were written with their values, drawing none)
    statements += sequences_away(rebuild.identities, tag, "reconciler_gone")
    statements += [q("ALTER SEQUENCE {} RENAME TO {}", sql.Identifier(seq.split(".", 1)[0],
                                                                    renamed_away(seq, "reconciler_old", tag)),
                     sql.Identifier(seq.split(".", 1)[1])) for _column, seq in rebuild.identities]
    statements += sequences_on(rebuild.identities, t, tag, "reconciler_gone")
    statements += rebuild.views  # read the table back
    added, validations, scans = repointed(ctx, rebuild, partitioned=False)  # the kept table is a plain one
    statements += added
    statements += [q("ALTER SEQUENCE {} OWNED BY {}", sql.Identifier(*seq.split(".", 1)),
                     sql.Identifier(schema, name, column)) for seq, column in rebuild.sequences]
    also = f" (and {', '.join(referencing)}, for the foreign keys re-pointed)" if referencing else ""
    lock = ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, f"the way back: a brief exclusive lock{also} to put back "
                      f"{rebuild.kept}, kept in step since the cut-over (nothing is copied), retried after lock_timeout",
                      table)
    out += [Draft(sql=s, kind="cutover", object=table, tables=order, stage=CUTOVER, group=f"cutover {table}",
                  rollback_sql=None, reversible=False, hazards=(lock, *scans) if i == 0 else (), helper=True)
            for i, s in enumerate(statements)]
    out += validations
    out.append(Draft(sql=q("DROP TABLE IF EXISTS {}", sql.Identifier(schema, gone)), kind=CONTRACT,
                     object=f"{schema}.{gone}", tables=(table,), stage=POST_CUTOVER, group=f"contract {tag}",
                     helper=True, hazards=(ctx.hazard(
                         HazardCode.DATA_LOSS, f"the contract: drops the table the way back gave up ({table} as it was "
                         f"built again; its rows were checked to be in {rebuild.kept}, which took its place)",
                         table),)))
    return out
