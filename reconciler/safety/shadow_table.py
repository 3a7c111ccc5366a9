"""A table built again (diff/supplements/rebuilds.py: made partitioned or plain, a new partition key, logged or
unlogged) as a shadow table, without stopping writes:

1. (expand, one transaction) the old table's indexes renamed away (all of them carry the rebuild's suffix until the
   contract); the new table, with its partitions and constraints, empty, built under the final names in a
   schema of its own (``reconciler_shadow_<tag>``: every name PostgreSQL gives a partition's index is then the one
   the desired schema has); a log table, and a trigger on the old table that records every insert, update and delete
   there (the row before and after);
2. (backfill) the old table's rows copied, a range of its pages per transaction (``apply/backfill.py``); its other
   indexes built on them (each by one sort, not row by row during the copy; no one else writes to it); then the
   log replayed in the order the writes were made until little is left (``apply/catch_up.py``), each entry
   deleting the row's old version from the new table by live's primary key (by the new one where it holds live's
   and the partition key: see ``_replay_body``) and inserting its new one;
3. (cut-over, one short transaction under ``lock_timeout``) the rest of the log replayed under lock, the capture
   dropped, the old table (and its partitions) renamed away, the new one and its partitions moved to the table's
   schema, the shadow schema dropped, the foreign keys to the table re-pointed NOT VALID (validated after, writes going on),
   the sequences its columns own moved, its identity sequences set to where the old table's stood (those renamed
   away first: the new ones take their names), and a trigger that keeps the old table in step from then on;
4. every row of the old table checked to be in the new one, batch by batch; then the contract, the old table
   dropped, a phase of its own (``apply --hold-contract`` leaves it).

A copy that overlaps the replay is right whatever the order: the copy takes each row as its snapshot sees it, the
log holds every write committed after (the trigger was committed before the copy began), and replaying an entry
twice ends the same as once; ``ON CONFLICT DO NOTHING`` keeps the copy from failing on a row the replay put there
first. Below ``safety.online_rewrite_rows`` rows, or where live's table has no primary key to match rows by, the
table is built again in one transaction under an exclusive lock instead (a TABLE_REWRITE hazard says so).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pglast
from pglast import ast
from psycopg import sql

from ..diff.base import Rebuild
from .context import Context
from .drafts import BACKFILL, CUTOVER, EXPAND, MAIN, POST_CUTOVER, Draft
from .dual_column import VERIFY_KIND
from .nodes import deparse, q, short, walk
from .steps import Hazard, HazardCode
from .swap import CONTRACT

COPY_KIND = "copy_rows"  # apply runs it a range of the source's pages at a time, as a backfill
CATCH_UP_KIND = "catch_up"  # apply replays the log until little is left
VACUUM_KIND = "vacuum_analyze"
LOCK_KIND = "lock_table"  # a short lock_timeout, as a cut-over's (safety/phases.py)
REPLAY_BATCH = 10_000


def tag_of(rebuild: Rebuild) -> str:
    """The helpers' names' suffix: the same for the same rebuild in every plan (a run stopped part-way is gone on
    from), another for another definition."""
    text = "\n".join([rebuild.table, rebuild.create, *rebuild.partitions, *rebuild.keys, *rebuild.indexes])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def shadow_table(ctx: Context, rebuild: Rebuild) -> list[Draft] | None:
    """The steps that build ``rebuild.table`` again: online where it is big and has a primary key. None: a table too
    small takes the diff engine's own statements (``rebuild.original``), where they do it in place."""
    switches = ctx.settings.switches
    size = ctx.size(rebuild.table)
    big = size is not None and size.rows >= switches.online_rewrite_rows
    if switches.online_rewrites and big and rebuild.key:
        return _online(ctx, rebuild)
    if rebuild.original:
        return None  # the engine's own statements, as any plan takes them
    return _offline(ctx, rebuild, big)


class _Names:
    def __init__(self, rebuild: Rebuild) -> None:
        self.schema, self.name = rebuild.table.split(".", 1)
        self.tag = tag = rebuild.tag
        self.shadow = rebuild.shadow_schema
        self.t = sql.Identifier(self.schema, self.name)
        self.new = sql.Identifier(self.shadow, self.name)
        self.old = short(f"{self.name}_reconciler_old", tag)
        self.log = sql.Identifier(self.shadow, "log")
        self.replay = sql.Identifier(self.shadow, "replay")
        self.capture = sql.Identifier(self.shadow, "capture")
        self.trigger, self.back = f"reconciler_capture_{tag}", f"reconciler_back_{tag}"
        # the new table and its partitions: 'schema.name' -> the shadow schema
        self.family = [rebuild.table, *(_created(p) for p in rebuild.partitions)]

    def at(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)


def _created(statement: str) -> str:
    node = pglast.parse_sql(statement)[0].stmt
    assert isinstance(node, ast.CreateStmt) and node.relation is not None
    return f"{node.relation.schemaname}.{node.relation.relname}"


def _definition(rebuild: Rebuild, moved: dict[str, str], *, indexes: bool = True) -> list[str]:
    """The new table, its partitions, keys, indexes (unless ``indexes`` is false), comments and grants, each table of
    ``moved`` ('schema.table' -> schema) in the schema given (each statement IF NOT EXISTS: what a run stopped
    part-way made is gone on with)."""
    statements = [rebuild.create, *rebuild.partitions, *rebuild.keys, *(rebuild.indexes if indexes else ()),
                  *rebuild.comments, *rebuild.grants]
    return [_retarget(statement, moved) for statement in statements]


def _index_name(statement: str) -> str:
    node = pglast.parse_sql(statement)[0].stmt
    assert isinstance(node, ast.IndexStmt) and node.relation is not None
    return f"{node.relation.schemaname}.{node.idxname}"


def _retarget(statement: str, moved: dict[str, str]) -> str:
    """``statement`` with the tables in ``moved`` ('schema.table' -> schema) in their new schema, made IF NOT EXISTS
    where it creates, and an index on a partitioned table made on its partitions too (not ON ONLY)."""
    node = pglast.parse_sql(statement)[0].stmt
    assert node is not None

    def visit(item: ast.Node) -> bool:
        if isinstance(item, ast.RangeVar) and f"{item.schemaname}.{item.relname}" in moved:
            item.schemaname = moved[f"{item.schemaname}.{item.relname}"]
        if isinstance(item, ast.CommentStmt) and isinstance(item.object, tuple):
            parts = [str(p.sval) for p in item.object if isinstance(p, ast.String)]
            if len(parts) >= 2 and f"{parts[0]}.{parts[1]}" in moved:
                item.object = (ast.String(sval=moved[f"{parts[0]}.{parts[1]}"]), *item.object[1:])
        return True

    walk(node, visit)
    if isinstance(node, ast.CreateStmt):
        node.if_not_exists = True
    elif isinstance(node, ast.IndexStmt):
        node.if_not_exists = True
        if node.relation is not None:
            node.relation.inh = True
    return deparse(node)


def _renames(ctx: Context, rebuild: Rebuild, n: _Names) -> list[tuple[str, str, str, str]]:
    """The old table's indexes (and the constraints they back) renamed away, so the new table's take their names at
    the swap: only those still named so (a run stopped part-way renamed them already)."""
    out: list[tuple[str, str, str, str]] = []
    for index in rebuild.renamed:
        fact = ctx.facts.indexes.get(index)
        if fact is None or fact.table not in (rebuild.table, *rebuild.retired) or index.endswith(
                f"_reconciler_old_{n.tag}"):
            continue
        schema, name = index.split(".", 1)
        away = short(f"{name}_reconciler_old", n.tag)
        out.append((q("ALTER INDEX {} RENAME TO {}", sql.Identifier(schema, name), sql.Identifier(away)), "rename_index",
                    index, q("ALTER INDEX IF EXISTS {} RENAME TO {}", sql.Identifier(schema, away), sql.Identifier(name))))
    return out


def _key_match(rebuild: Rebuild, alias: str, row: str) -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("{}.{} = ({}).{}").format(sql.Identifier(alias), sql.Identifier(k),
                                                                    sql.SQL(row), sql.Identifier(k))
                                 for k in rebuild.key)


def _helpers(rebuild: Rebuild, n: _Names) -> list[tuple[str, str, str, str]]:
    """The log, the function that replays it into the new table, and the trigger that fills it: (statement, kind,
    object, its undo)."""
    replay_body = _replay_body(rebuild, n)
    capture_body = sql.SQL(
        "BEGIN IF TG_OP = 'TRUNCATE' THEN TRUNCATE {new}; DELETE FROM {log}; RETURN NULL; END IF; "
        "INSERT INTO {log} (\"reconciler was\", \"reconciler now\") VALUES (CASE WHEN TG_OP <> 'INSERT' THEN OLD END, "
        "CASE WHEN TG_OP <> 'DELETE' THEN NEW END); RETURN NULL; END").format(new=n.new, log=n.log)
    table, trigger, truncate = rebuild.table, sql.Identifier(n.trigger), sql.Identifier(f"{n.trigger}_truncate")
    return [
        (q('CREATE TABLE IF NOT EXISTS {} ("reconciler entry" bigserial PRIMARY KEY, "reconciler was" {}, '
           '"reconciler now" {})', n.log, n.t, n.t), "create_table",
         f"{n.shadow}.log", q("DROP TABLE IF EXISTS {}", n.log)),
        (q("CREATE OR REPLACE FUNCTION {}(batch integer) RETURNS integer LANGUAGE plpgsql SET search_path FROM CURRENT "
           "AS ", n.replay) + _quoted(replay_body.as_string(None)), "create_function", f"{n.shadow}.replay(integer)",
         q("DROP FUNCTION IF EXISTS {}(integer)", n.replay)),
        (q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS ", n.capture)
         + _quoted(capture_body.as_string(None)), "create_function", f"{n.shadow}.capture()",
         q("DROP FUNCTION IF EXISTS {}()", n.capture)),
        # OR REPLACE keeps the trigger's oid: a copy goes on from a checkpoint only where it has been there all along
        (q("CREATE OR REPLACE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}()",
           trigger, n.t, n.capture), "create_trigger", f"{table}.{n.trigger}",
         q("DROP TRIGGER IF EXISTS {} ON {}", trigger, n.t)),
        (q("CREATE OR REPLACE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()", truncate, n.t,
           n.capture), "create_trigger", f"{table}.{n.trigger}_truncate", q("DROP TRIGGER IF EXISTS {} ON {}", truncate,
                                                                          n.t)),
    ]


def _replay_body(rebuild: Rebuild, n: _Names) -> sql.Composed:
    """Up to ``batch`` entries of the log (all: NULL), oldest first, replayed set-wise: every key they touch deleted
    from the new table, then each key's last entry's row inserted where that entry leaves a row under the key. The
    batch is read once into a temporary table: each statement of a function sees the commits made meanwhile, and
    all of them must work on the same entries.

    Where the new table's key holds live's and more (a partitioned table's holds its partition key), the rows deleted
    are found by it, each version the entries name looked for in its one partition, not in every partition. A row
    whose partition key changed may then stay under its old version a while, until the entry that replaced that
    version is replayed and deletes it: the copy, done before the replay begins, put in a version that was current
    then (the one its last entry left, or the row before its first), and each version after is the old row of the
    next entry, so every version but the last is deleted by the time the cut-over has replayed the whole log."""
    keys = [sql.Identifier(k) for k in rebuild.key]
    first = keys[0]
    tmp = sql.Identifier(f"reconciler_replay_{n.tag}")
    entry, was, now = (sql.Identifier(f"reconciler {c}") for c in ("entry", "was", "now"))

    def touched_by(columns: Sequence[sql.Identifier]) -> sql.Composable:
        def key_of(row: sql.Identifier) -> sql.Composable:
            return sql.SQL(", ").join(sql.SQL("({}).{} AS {}").format(row, k, k) for k in columns)
        return sql.SQL("SELECT {entry}, {now}, {was_key} FROM {tmp} WHERE ({was}).{first} IS NOT NULL UNION ALL "
                       "SELECT {entry}, {now}, {now_key} FROM {tmp} WHERE ({now}).{first} IS NOT NULL").format(
            entry=entry, was=was, now=now, was_key=key_of(was), now_key=key_of(now), tmp=tmp, first=first)

    touched = touched_by(keys)
    narrower = set(rebuild.key) < set(rebuild.new_key) <= set(rebuild.columns)
    found_by = [sql.Identifier(k) for k in rebuild.new_key] if narrower else keys
    key_list = sql.SQL(", ").join(keys)
    return sql.SQL(
        "DECLARE done integer; BEGIN "
        "CREATE TEMP TABLE IF NOT EXISTS {tmp} ({entry} bigint, {was} {t}, {now} {t}) ON COMMIT DROP; TRUNCATE {tmp}; "
        "INSERT INTO {tmp} SELECT {entry}, {was}, {now} FROM {log} ORDER BY {entry} LIMIT batch; "
        "GET DIAGNOSTICS done = ROW_COUNT; IF done = 0 THEN RETURN 0; END IF; "
        "DELETE FROM {new} n USING (SELECT DISTINCT {found_by} FROM ({versions}) x) k WHERE {match}; "
        "INSERT INTO {new} ({columns}){overriding} SELECT {values} FROM (SELECT DISTINCT ON ({keys}) {entry}, {now}, {keys} "
        "FROM ({touched}) x ORDER BY {keys}, {entry} DESC) last WHERE {stays}; "
        "DELETE FROM {log} l USING {tmp} b WHERE l.{entry} = b.{entry}; RETURN done; END").format(
        tmp=tmp, t=n.t, log=n.log, new=n.new, keys=key_list, touched=touched, entry=entry, was=was, now=now,
        found_by=sql.SQL(", ").join(found_by), versions=touched_by(found_by),
        match=sql.SQL(" AND ").join(sql.SQL("n.{} = k.{}").format(k, k) for k in found_by),
        columns=sql.SQL(", ").join(sql.Identifier(c) for c in rebuild.columns), overriding=_overriding(rebuild),
        values=sql.SQL(", ").join(sql.SQL("(last.{}).{}").format(now, sql.Identifier(c)) for c in rebuild.columns),
        stays=sql.SQL(" AND ").join(sql.SQL("(last.{}).{} = last.{}").format(now, k, k) for k in keys))


def _overriding(rebuild: Rebuild) -> sql.Composable:
    """Rows copied keep their identity values (an identity GENERATED ALWAYS refuses them without it)."""
    return sql.SQL(" OVERRIDING SYSTEM VALUE" if rebuild.identities else "")


def sequences_away(identities: Sequence[tuple[str, str]], tag: str, suffix: str) -> list[str]:
    """A table's identity sequences ('schema.name') renamed away (``<name>_<suffix>_<tag>``), so the table taking its
    place has theirs."""
    return [q("ALTER SEQUENCE {} RENAME TO {}", sql.Identifier(*seq.split(".", 1)),
              sql.Identifier(renamed_away(seq, suffix, tag))) for _column, seq in identities]


def sequences_on(identities: Sequence[tuple[str, str]], table: sql.Identifier, tag: str, suffix: str) -> list[str]:
    """Each identity sequence of ``table`` going on from where the one renamed away stands: under the swap's lock no
    value is drawn meanwhile, so none is given twice."""
    return [q("SELECT setval(pg_get_serial_sequence({}, {}), s.last_value, s.is_called) FROM {} s",
              sql.Literal(table.as_string(None)), sql.Literal(column),
              sql.Identifier(seq.split(".", 1)[0], renamed_away(seq, suffix, tag))) for column, seq in identities]


def renamed_away(seq: str, suffix: str, tag: str) -> str:
    """The name ``sequences_away`` gives the sequence 'schema.name'."""
    return short(f"{seq.split('.', 1)[1]}_{suffix}", tag)


def _quoted(body: str) -> str:
    tag = "reconciler"
    while f"${tag}$" in body:
        tag += "_"
    return f"${tag}${body}${tag}$"


def _online(ctx: Context, rebuild: Rebuild) -> list[Draft]:
    n = _Names(rebuild)
    table = rebuild.table
    moved = dict.fromkeys(n.family, n.shadow)
    # the table locked first, in the mode the trigger needs: a write holds it, then its indexes (which the renames
    # lock); taken the other way round, the expand and a write could each wait for the other
    made: list[tuple[str, str, str, str]] = [
        (q("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE", n.t), LOCK_KIND, table, ""),
        *_renames(ctx, rebuild, n),
        (q("CREATE SCHEMA IF NOT EXISTS {}", sql.Identifier(n.shadow)), "create_schema", n.shadow,
         q("DROP SCHEMA IF EXISTS {} CASCADE", sql.Identifier(n.shadow))),
        *((text, "rebuild_table", table, "") for text in _definition(rebuild, moved, indexes=False)),
        *_helpers(rebuild, n)]
    hazard = ctx.hazard(HazardCode.BLOCKS_WRITES, f"{table} {rebuild.why}: built again beside it as a shadow table "
                        "while writes go on (expand, copy, catch-up, cut-over, contract); writes wait for the brief lock "
                        "that adds the trigger recording them (reads do not)", table)
    out = [Draft(sql=text, kind=kind, object=obj, tables=(table,), rollback_sql=undo, reversible=True, helper=True, stage=EXPAND,
                 group=f"expand {table}", hazards=(hazard,) if i == 0 else ())
           for i, (text, kind, obj, undo) in enumerate(made)]
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in rebuild.columns)
    for source in rebuild.sources:
        parts = tuple(source.split(".", 1))
        out.append(Draft(sql=q("INSERT INTO {} ({}){} SELECT {} FROM ONLY {} ON CONFLICT DO NOTHING", n.new, columns,
                               _overriding(rebuild), columns, sql.Identifier(*parts)), kind=COPY_KIND, object=source, tables=(source,),
                         transactional=False, stage=BACKFILL, rollback_sql="", reversible=True, identity=parts,
                         helper=True))
    # the indexes other than the keys built once the rows are there, each by one sort as CREATE INDEX does, not
    # row by row as the copy went: only this run's steps write to the new table (the trigger writes to the log), so
    # the lock a plain build takes stops no one (the keys come with the table: the copy's ON CONFLICT and the
    # replay find rows by them)
    for text in rebuild.indexes:
        index = _retarget(text, moved)
        out.append(Draft(sql=index, kind="create_index", object=_index_name(index), tables=(table,), stage=BACKFILL,
                         rollback_sql="", reversible=True, helper=True))
    # the rows copied vacuumed and analysed before the table goes live: it has statistics for the application's
    # queries from the swap on, and autovacuum, whose threshold the copy passed, does not start on it just as the
    # cut-over needs it (the cut-over gives up in 500 ms, before autovacuum would let go of it)
    out.append(Draft(sql=q("VACUUM (ANALYZE) {}", n.new), kind=VACUUM_KIND, object=table, tables=(),
                     transactional=False, stage=BACKFILL, rollback_sql="", reversible=True, helper=True))
    out.append(Draft(sql=q("SELECT {}({})", n.replay, sql.Literal(REPLAY_BATCH)), kind=CATCH_UP_KIND,
                     object=table, tables=(table,), transactional=False, stage=BACKFILL, rollback_sql="",
                     reversible=True, helper=True))
    return out + _cutover(ctx, rebuild, n) + _contract(ctx, rebuild, n)


def _references(rebuild: Rebuild) -> tuple[str, ...]:
    return tuple(dict.fromkeys(ref for ref, _name, _d in rebuild.references if ref != rebuild.table))


def _swap(rebuild: Rebuild, n: _Names, *, moved_from: str | None) -> list[str]:
    """The old table (and its partitions) renamed away, and the new one in its place: moved from the shadow schema
    (``moved_from``), or made in place."""
    out = [q("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", sql.Identifier(*ref.split(".", 1)),
                                   sql.Identifier(name)) for ref, name, _d in rebuild.references]
    out += [q("ALTER TABLE {} RENAME TO {}", sql.Identifier(*part.split(".", 1)),
              sql.Identifier(short(f"{part.split('.', 1)[1]}_reconciler_old", n.tag))) for part in rebuild.retired]
    out.append(q("ALTER TABLE {} RENAME TO {}", n.t, sql.Identifier(n.old)))
    if moved_from is not None:
        out += [q("ALTER TABLE {} SET SCHEMA {}", sql.Identifier(moved_from, name.split(".", 1)[1]),
                  sql.Identifier(name.split(".", 1)[0])) for name in n.family]
    return out


def _cutover(ctx: Context, rebuild: Rebuild, n: _Names) -> list[Draft]:
    table, t = rebuild.table, n.t
    referencing = _references(rebuild)
    order = (*referencing, table)  # as a write takes them: the table holding a foreign key first
    statements = [q("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                    sql.SQL(", ").join(sql.Identifier(*name.split(".", 1)) for name in order)),
                  q("SELECT {}(NULL)", n.replay),
                  q("DROP TRIGGER {} ON {}", sql.Identifier(n.trigger), t),
                  q("DROP TRIGGER {} ON {}", sql.Identifier(f"{n.trigger}_truncate"), t),
                  q("DROP FUNCTION {}()", n.capture), q("DROP FUNCTION {}(integer)", n.replay), q("DROP TABLE {}", n.log),
                  *sequences_away(rebuild.identities, n.tag, "reconciler_old"),
                  *_swap(rebuild, n, moved_from=n.shadow),
                  *sequences_on(rebuild.identities, n.t, n.tag, "reconciler_old"),
                  q("DROP SCHEMA {}", sql.Identifier(n.shadow))]  # empty by now: nothing of the rebuild is left there
    added, validations, scans = repointed(ctx, rebuild, partitioned=" PARTITION BY " in rebuild.create)
    statements += added
    statements += [q("ALTER SEQUENCE {} OWNED BY {}", sql.Identifier(*seq.split(".", 1)),
                     sql.Identifier(n.schema, n.name, column)) for seq, column in rebuild.sequences]
    # the old table's own triggers stay, switched off: the trigger that keeps it in step must not set them off again
    statements.append(q("ALTER TABLE {} DISABLE TRIGGER USER", n.at(n.old)))
    statements += remade(rebuild)
    old, back = n.at(n.old), n.at(n.back)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in rebuild.columns)
    values = sql.SQL(", ").join(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in rebuild.columns)
    body = sql.SQL("BEGIN IF TG_OP <> 'INSERT' THEN DELETE FROM {old} o WHERE {was}; END IF; "
                   "IF TG_OP <> 'DELETE' THEN DELETE FROM {old} o WHERE {now}; INSERT INTO {old} ({columns}){overriding} "
                   "VALUES ({values}); END IF; RETURN NULL; END").format(
        old=old, was=_key_match(rebuild, "o", "OLD"), now=_key_match(rebuild, "o", "NEW"), columns=columns,
        values=values, overriding=_overriding(rebuild))
    statements += [q("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS ",
                     back) + _quoted(body.as_string(None)),
                   q("CREATE OR REPLACE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION "
                     "{}()", sql.Identifier(n.back), t, back)]
    also = f" (and {', '.join(referencing)}, for the foreign keys re-pointed)" if referencing else ""
    lock = ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, f"the cut-over: a brief exclusive lock{also} to replay the last "
                      "writes and swap the names, retried after lock_timeout", table)
    drafts = [Draft(sql=s, kind="cutover", object=table, tables=order, stage=CUTOVER,
                    group=f"cutover {table}", rollback_sql=None, reversible=False,
                    hazards=(lock, *scans) if i == 0 else (), helper=True)
              for i, s in enumerate(statements)]
    if len(rebuild.sources) == 1 and rebuild.sources[0] == table:  # the old table's pages, checked against the new
        # by the new table's key where it has one of the copied columns (a partitioned table's holds its partition
        # key: each row looked for in its one partition), else by the old one's
        probe = rebuild.new_key if rebuild.new_key and set(rebuild.new_key) <= set(rebuild.columns) else rebuild.key
        drafts.append(Draft(sql=rows_missing(old, t, probe, rebuild.columns), kind=VERIFY_KIND, object=f"{n.schema}.{n.old}",
                            tables=(table,), transactional=False, stage=POST_CUTOVER, rollback_sql="", reversible=True,
                            identity=(n.schema, n.old), helper=True))
    return drafts + validations


def rows_missing(checked: sql.Identifier, against: sql.Identifier, key: Sequence[str], columns: Sequence[str]) -> str:
    """How many rows of ``checked`` (apply adds a range of its pages) ``against`` lacks, looked up by ``key``, with
    every column the same. The lookup stays one per row (OFFSET 0 keeps the planner from making it a join): a hash
    join would read the whole of ``against`` for every range of pages, the check's time growing as the square of
    the table's size."""
    match = sql.SQL(" AND ").join(sql.SQL("a.{} = c.{}").format(sql.Identifier(k), sql.Identifier(k)) for k in key)
    same = sql.SQL("({}) IS NOT DISTINCT FROM ({})").format(
        sql.SQL(", ").join(sql.SQL("a.{}").format(sql.Identifier(c)) for c in columns),
        sql.SQL(", ").join(sql.SQL("c.{}").format(sql.Identifier(c)) for c in columns))
    return q("SELECT count(*) FROM ONLY {} c WHERE NOT EXISTS (SELECT FROM {} a WHERE {} AND {} OFFSET 0)", checked,
             against, match, same)


def remade(rebuild: Rebuild) -> list[str]:
    """The table's own triggers, made on the table now in its place (not before: they would fire on every row
    copied), and the views that read it made again (a view reads a table by its oid: until then they read the old
    one)."""
    return [*rebuild.triggers, *rebuild.views]


def repointed(ctx: Context, rebuild: Rebuild, *, partitioned: bool) -> tuple[list[str], list[Draft], list[Hazard]]:
    """The foreign keys to the table added again, to the table now in its place: NOT VALID, each validated after in a
    transaction of its own while writes go on; to a partitioned table before PostgreSQL 18 (whose VALIDATE does not
    reach the copies a key to a partitioned table has), validated as they are added, in the cut-over, which then
    holds its lock while the referencing table is read. (the statements, the validations, the hazards)"""
    table, statements, validations, hazards = rebuild.table, [], [], []
    checked_now = partitioned and ctx.facts.server_version_num < 180000
    for ref, name, definition in rebuild.references:
        valid = not definition.endswith(" NOT VALID")
        head = q("ALTER TABLE {} ADD CONSTRAINT {} ", sql.Identifier(*ref.split(".", 1)), sql.Identifier(name))
        if checked_now and valid:
            statements.append(head + definition)
            hazards.append(ctx.hazard(HazardCode.FULL_SCAN_UNDER_LOCK, f"the foreign key {name} of {ref} to the "
                                      "partitioned table is checked as it is added, under the cut-over's lock (before "
                                      "PostgreSQL 18 one to a partitioned table cannot be validated later)", ref))
            continue
        statements.append(head + definition.removesuffix(" NOT VALID") + " NOT VALID")
        ctx.repointed.add((ref, name))
        if valid:
            validations.append(Draft(sql=q("ALTER TABLE {} VALIDATE CONSTRAINT {}", sql.Identifier(*ref.split(".", 1)),
                                           sql.Identifier(name)), kind="validate_constraint", object=f"{ref}.{name}",
                                     tables=(ref, table), isolated=True, stage=POST_CUTOVER, rollback_sql="",
                                     reversible=True, helper=True))
    return statements, validations, hazards


def _contract(ctx: Context, rebuild: Rebuild, n: _Names) -> list[Draft]:
    table, group = rebuild.table, f"contract {n.tag}"
    return [
        # in the order a write takes them (the table, then the old one through the trigger), giving up soon
        Draft(sql=q("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE", n.t, n.at(n.old)), kind=LOCK_KIND, object=table,
              tables=(table,), stage=POST_CUTOVER, group=group, helper=True, rollback_sql=""),
        Draft(sql=q("DROP TRIGGER IF EXISTS {} ON {}", sql.Identifier(n.back), n.t), kind="drop_trigger",
              object=f"{table}.{n.back}", tables=(table,), stage=POST_CUTOVER, group=group, helper=True),
        Draft(sql=q("DROP FUNCTION IF EXISTS {}()", n.at(n.back)), kind="drop_function", object=f"{n.schema}.{n.back}()",
              tables=(), stage=POST_CUTOVER, group=group, helper=True),
        Draft(sql=q("DROP TABLE IF EXISTS {}", n.at(n.old)), kind=CONTRACT, object=f"{n.schema}.{n.old}", tables=(table,),
              stage=POST_CUTOVER, group=group, helper=True, hazards=(ctx.hazard(
                  HazardCode.DATA_LOSS, f"the contract: drops the table {table} was before it was built again (its rows "
                  "live on, copied and checked, in the new one); after it there is no way back in one short lock",
                  table),)),
    ]


def _offline(ctx: Context, rebuild: Rebuild, big: bool) -> list[Draft]:
    """One transaction under an exclusive lock: the old table renamed away, the new one made in its place, the rows
    copied, the foreign keys to it made again, the old table dropped."""
    table, n = rebuild.table, _Names(rebuild)
    why = ("" if not big else " (online needs a primary key on the live table to match rows by)" if not rebuild.key
           else " (online rewrites are switched off)")
    hazards = (ctx.hazard(HazardCode.TABLE_REWRITE, f"{table} {rebuild.why}: built again, every row copied, under an "
                          f"exclusive lock held to the end{why}", table),
               ctx.hazard(HazardCode.ACCESS_EXCLUSIVE_LOCK, "blocks reads and writes while held, and waits behind "
                          "running transactions", table))
    referencing = _references(rebuild)
    statements = [q("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", sql.SQL(", ").join(
        sql.Identifier(*name.split(".", 1)) for name in (*referencing, table)))]
    statements += [text for text, _kind, _object, _undo in _renames(ctx, rebuild, n)]
    statements += sequences_away(rebuild.identities, n.tag, "reconciler_old")
    statements += _swap(rebuild, n, moved_from=None)
    statements += _definition(rebuild, {})
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in rebuild.columns)
    statements.append(q("INSERT INTO {} ({}){} SELECT {} FROM {}", n.t, columns, _overriding(rebuild), columns,
                        n.at(n.old)))
    statements += sequences_on(rebuild.identities, n.t, n.tag, "reconciler_old")
    statements += [q("ALTER TABLE {} ADD CONSTRAINT {} ", sql.Identifier(*ref.split(".", 1)), sql.Identifier(name))
                   + definition for ref, name, definition in rebuild.references]
    statements += [q("ALTER SEQUENCE {} OWNED BY {}", sql.Identifier(*seq.split(".", 1)),
                     sql.Identifier(n.schema, n.name, column)) for seq, column in rebuild.sequences]
    statements += remade(rebuild)
    statements.append(q("DROP TABLE {}", n.at(n.old)))
    return [Draft(sql=s, kind="rebuild_table", object=table, tables=(*referencing, table), stage=MAIN,
                  hazards=hazards if i == 0 else (), rollback_sql=None) for i, s in enumerate(statements)]
