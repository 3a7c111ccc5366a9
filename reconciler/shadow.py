"""Load the desired schema into a scratch database, pointing every failure at file:line:column.

Statements are split by pglast's scanner (so dollar quotes and comments are understood) and sent in
batches: one round trip runs up to a hundred, as one implicit transaction. When a batch fails it has
left nothing behind, and its statements run again one at a time, so the failure names the exact
statement. Statements that cannot run in a transaction block, or whose effect a later statement of the
same transaction cannot use (CREATE INDEX CONCURRENTLY, ALTER TYPE ... ADD VALUE, transaction control),
run alone in autocommit.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pglast
import psycopg
from pglast import ast
from pglast.enums import RoleSpecType
from pglast.visitors import Visitor
from psycopg import sql

from .errors import ReconcilerError, SchemaLoadError
from .features import needs, newer_features
from .privileged import Privileged, Refused, carry_out, recognise
from .sandbox import Sandbox, deadline
from .servers import connect
from .source import DesiredSchema, SchemaFile
from .sqltext import statement_slices

log = logging.getLogger(__name__)

# pg_dump 17.6+/18 writes these psql-only lines; they carry no schema, so they are blanked out.
_HARMLESS_META = re.compile(r"^[ \t]*\\(?:restrict|unrestrict)\b[^\n]*", re.MULTILINE)
_META_LINE = re.compile(r"^[ \t]*\\[a-zA-Z!?]", re.MULTILINE)


@dataclass(frozen=True)
class Statement:
    path: str
    start: int  # character offset of the statement in its file
    text: str


def line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of a character offset."""
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


def _first_code_offset(statement: str) -> int:
    """Offset of the first character that is not blank or a comment, so errors point at the statement."""
    i = 0
    n = len(statement)
    while i < n:
        if statement[i].isspace():
            i += 1
        elif statement.startswith("--", i):
            end = statement.find("\n", i)
            i = n if end < 0 else end + 1
        elif statement.startswith("/*", i):
            end = statement.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            return i
    return 0


def split_file(schema_file: SchemaFile) -> Iterator[Statement]:
    """The statements of a file with their offsets; psql meta-commands other than \\restrict are refused."""
    return iter(_split(schema_file))


@functools.lru_cache(maxsize=64)
def _split(schema_file: SchemaFile) -> tuple[Statement, ...]:
    """Split once per file's content: a plan asks three times (the cache key's statement chain, the roles the
    schema names, the load itself)."""
    return tuple(_statements(schema_file))


def _statements(schema_file: SchemaFile) -> Iterator[Statement]:
    text = _HARMLESS_META.sub(lambda m: " " * len(m.group(0)), schema_file.text)
    meta = _META_LINE.search(text)
    if meta is not None:
        backslash = text.index("\\", meta.start())
        line, column = line_column(text, backslash)
        command = text[backslash:].split(None, 1)[0]
        raise SchemaLoadError(
            schema_file.path, line, column,
            f"psql meta-command '{command}' is not SQL",
            hint="schema files are plain SQL run statement by statement; remove psql commands such as \\connect or \\i",
        )
    try:
        slices = statement_slices(text)
    except pglast.parser.ParseError as exc:
        location = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else 0
        line, column = line_column(text, location)
        raise SchemaLoadError(schema_file.path, line, column, f"syntax error: {exc.args[0]}") from None
    for piece in slices:
        assert isinstance(piece, slice)
        body = text[piece]
        if body.strip():
            yield Statement(path=schema_file.path, start=piece.start, text=body)


BATCH_STATEMENTS = 100
BATCH_CHARACTERS = 200_000
# statements that run alone: transaction control and maintenance (by their first word), and those that cannot run
# in a transaction block or whose effect the same transaction cannot use (anywhere in the text: a false match in a
# function body only costs a round trip)
_ALONE_FIRST = re.compile(r"(BEGIN|START|COMMIT|END|ROLLBACK|ABORT|SAVEPOINT|RELEASE|PREPARE|VACUUM|CLUSTER|REINDEX"
                          r"|CHECKPOINT|LOCK|DISCARD)\b", re.IGNORECASE)
_ALONE_ANYWHERE = re.compile(r"\b(CONCURRENTLY|ADD\s+VALUE|DATABASE|TABLESPACE|SYSTEM|SUBSCRIPTION)\b", re.IGNORECASE)


def statement_chain(desired: DesiredSchema) -> list[str]:
    """Digests of the schema's first 0, 1, 2 ... n statements (file and text of each, in loading order). A database
    loaded with a schema whose digest at its own length appears in another schema's chain holds the start of that
    schema: running the rest into a copy of it gives what loading the whole would."""
    running = hashlib.sha256()
    chain = [running.hexdigest()]
    for schema_file in desired.files:
        for statement in split_file(schema_file):
            running.update(f"{len(schema_file.path)}:{schema_file.path}{len(statement.text)}:".encode())
            running.update(statement.text.encode())
            chain.append(running.hexdigest())
    return chain


def load_schema(
    desired: DesiredSchema,
    database_dsn: str,
    *,
    sandbox: Sandbox | None,
    owners: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    skip: int = 0,
    stop: int | None = None,
) -> int:
    """Run every file into ``database_dsn``: its statements from number ``skip`` (a database that holds the first
    ones already) up to ``stop`` (not included; None: to the end). Returns the number of statements run.

    ``sandbox``: desired SQL, run as the load role, each statement within the load's time limit, and the statements
    that need more done by the tool (``privileged``); ``owners``: whether owners are compared (a hand-over the load
    role may not make is then refused rather than skipped). None: SQL the caller trusts (a test's live schema), run
    as the DSN's role."""
    files: list[tuple[SchemaFile, list[Statement]]] = []
    seen = 0  # statements of the files before this one
    for schema_file in desired.files:
        if stop is not None and seen >= stop:
            break
        every = list(split_file(schema_file))
        first, last = max(0, skip - seen), len(every) if stop is None else min(len(every), stop - seen)
        seen += len(every)
        if every[first:last]:
            files.append((schema_file, every[first:last]))
    if not files:
        return 0
    total = 0
    with (sandbox.connect(database_dsn) if sandbox is not None
          else connect(database_dsn, application_name="reconciler shadow")) as conn:
        conn.execute("SET synchronous_commit = off")
        runner = _Runner(conn, database_dsn, sandbox, owners)
        for schema_file, statements in files:
            done = 0
            for batch in _batches(statements, privileged=sandbox is not None):
                runner.batch(schema_file, batch)
                if progress is not None and (done + len(batch)) // 500 > done // 500:
                    progress(schema_file.path, done + len(batch), len(statements))
                done += len(batch)
            total += len(statements)
            log.debug("loaded %s (%d statements)", schema_file.path, len(statements))
    return total


def _code(statement: Statement) -> str:
    return statement.text[_first_code_offset(statement.text):]


def _alone(statement: Statement) -> bool:
    code = _code(statement)
    return bool(_ALONE_FIRST.match(code) or _ALONE_ANYWHERE.search(code))


def _batches(statements: list[Statement], *, privileged: bool) -> Iterator[list[Statement]]:
    """Batches of statements; one alone when it must be, or when the tool may do it (``privileged``)."""
    batch: list[Statement] = []
    size = 0
    for statement in statements:
        if _alone(statement) or (privileged and recognise(_code(statement)) is not None):
            if batch:
                yield batch
            yield [statement]
            batch, size = [], 0
            continue
        batch.append(statement)
        size += len(statement.text)
        if len(batch) >= BATCH_STATEMENTS or size >= BATCH_CHARACTERS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _Runner:
    """Runs batches on one connection; with a sandbox, within the time limit and with the tool's part done."""

    def __init__(self, conn: psycopg.Connection[object], database_dsn: str, sandbox: Sandbox | None,
                 owners: bool) -> None:
        self.conn, self.database_dsn, self.sandbox, self.owners = conn, database_dsn, sandbox, owners
        self.strangers: set[str] = set()  # roles the load role may not act as (see ``privileged.carry_out``)

    def batch(self, schema_file: SchemaFile, batch: list[Statement]) -> None:
        if len(batch) == 1:
            self.statement(schema_file, batch[0])
            return
        try:
            # one simple query: one implicit transaction; "\n;\n" so a statement's trailing line comment ends first
            self._execute("\n;\n".join(s.text for s in batch))
        except psycopg.Error:
            for statement in batch:  # the batch left nothing behind: again one at a time, to name the statement
                self.statement(schema_file, statement)

    def statement(self, schema_file: SchemaFile, statement: Statement) -> None:
        if self.sandbox is not None:
            what = recognise(_code(statement))
            if what is not None and self._carry_out(schema_file, statement, what):
                return
        try:
            self._execute(statement.text)
        except psycopg.Error as exc:
            raise _load_error(schema_file, statement, exc, self.sandbox,
                              major=self.conn.info.server_version // 10000) from None

    def _execute(self, text: str) -> None:
        if self.sandbox is None:
            self.conn.execute(text.encode(), prepare=False)
            return
        with deadline(self.conn, self.sandbox.limits.statement_timeout):
            self.conn.execute(text.encode(), prepare=False)

    def _carry_out(self, schema_file: SchemaFile, statement: Statement, what: Privileged) -> bool:
        """The tool's part of a statement, in a session of its own: inside a transaction the file opened (``BEGIN``),
        what the file made so far is committed first, or that session would not see it, and a transaction opened
        again afterwards for the file's ``COMMIT``."""
        assert self.sandbox is not None
        offset = statement.start + _first_code_offset(statement.text)
        reopen = self.conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        if reopen:
            log.info("%s:%d: committed the file's transaction before the tool's part of this statement",
                     schema_file.path, line_column(schema_file.text, offset)[0])
            self.conn.execute("COMMIT")
        try:
            return carry_out(what, self.sandbox, self.database_dsn, loader=self.conn, owners=self.owners,
                             statement=statement.text, strangers=self.strangers)
        except Refused as refused:
            line, column = line_column(schema_file.text, offset)
            raise SchemaLoadError(schema_file.path, line, column, f"refused: {refused.message}", hint=refused.hint,
                                  statement=statement.text.strip()) from None
        except psycopg.Error as exc:
            raise _load_error(schema_file, statement, exc, self.sandbox, major=self.conn.info.server_version // 10000,
                              position=False) from None
        finally:
            if reopen and self.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                self.conn.execute("BEGIN")


def _load_error(schema_file: SchemaFile, statement: Statement, exc: psycopg.Error, sandbox: Sandbox | None, *,
                major: int = 0, position: bool = True) -> SchemaLoadError:
    """The failure at file:line:column; a statement using what the server's ``major`` version lacks says so."""
    diag = exc.diag
    if position and diag.statement_position:
        # statement_position counts characters from 1 within the statement we sent.
        offset = statement.start + int(diag.statement_position) - 1
    else:
        offset = statement.start + _first_code_offset(statement.text)
    line, column = line_column(schema_file.text, offset)
    newer = newer_features(statement.text, major, diag.sqlstate) if major else []
    if newer:  # written for a newer PostgreSQL than the target's: say that, in one line
        return SchemaLoadError(schema_file.path, line, column, needs(newer, major), statement=statement.text.strip())
    message = diag.message_primary or str(exc).strip()
    if isinstance(exc, psycopg.errors.QueryCanceled) and sandbox is not None:
        message = (f"statement ran past the load's time limit ({sandbox.limits.statement_timeout:g} s, "
                   "load.statement_timeout in reconciler.yaml)")
    if diag.sqlstate:
        message = f"{message} [SQLSTATE {diag.sqlstate}]"
    context = diag.context
    detail = diag.message_detail
    if context and not detail:
        detail = context.strip().splitlines()[0]
    hint = diag.message_hint
    if sandbox is not None and diag.sqlstate == "42501":  # insufficient_privilege
        hint = hint or (f"desired SQL runs as {sandbox.role}, a role that owns its scratch database and nothing more: "
                        "what needs a superuser is done by the tool only in the forms it knows (README: threat model)")
    return SchemaLoadError(schema_file.path, line, column, message, hint=hint, detail=detail,
                           statement=statement.text.strip())


# --- roles: cluster-wide, so a shadow server of our own needs the ones the schema names ----------

class _RoleNames(Visitor):
    def __init__(self) -> None:
        self.named: set[str] = set()
        self.created: set[str] = set()

    def visit_RoleSpec(self, _ancestors: object, node: ast.RoleSpec) -> None:
        if node.roletype == RoleSpecType.ROLESPEC_CSTRING and node.rolename:
            self.named.add(str(node.rolename))

    def visit_CreateRoleStmt(self, _ancestors: object, node: ast.CreateRoleStmt) -> None:
        self.created.add(str(node.role))


# every statement that can name a role has one of these words; parsing only those saves most of the time on a
# big schema (parsing 3,000 statements one by one takes most of a second)
# OWNED only as DROP / REASSIGN OWNED: a sequence's OWNED BY names a column (GitLab has 800 of them, each parsed
# for nothing: 0.4 s of every plan's load)
_MAY_NAME_ROLE = re.compile(r"\b(OWNER|(?:DROP|REASSIGN)\s+OWNED|AUTHORIZATION|GRANT|REVOKE|PRIVILEGES|POLICY|ROLE|USER|GROUP)\b",
                            re.IGNORECASE)


def roles_named(desired: DesiredSchema) -> set[str]:
    """Roles the desired SQL names (GRANT / REVOKE, OWNER TO, AUTHORIZATION, ALTER DEFAULT PRIVILEGES,
    CREATE POLICY ... TO), less the ones it creates itself and the predefined pg_* roles."""
    names = _RoleNames()
    for schema_file in desired.files:
        hits = [m.start() for m in _MAY_NAME_ROLE.finditer(schema_file.text)]  # one pass over the file, not one a statement
        if not hits:
            continue
        statements = list(split_file(schema_file))
        starts = [s.start for s in statements]
        near = sorted({bisect.bisect_right(starts, hit) - 1 for hit in hits} - {-1})  # each hit's statement, or a gap
        for statement in (statements[i] for i in near):
            if not _MAY_NAME_ROLE.search(statement.text):
                continue
            try:
                parsed = pglast.parse_sql(statement.text)
            except pglast.parser.ParseError:
                continue  # loading the schema reports it, with its file and line
            names(parsed)
    return {n for n in names.named - names.created if not n.startswith("pg_")}


def same_cluster(one_dsn: str, other_dsn: str) -> bool:
    """Do both DSNs reach the same PostgreSQL cluster (by system identifier)?"""
    identifiers = []
    for dsn in (one_dsn, other_dsn):
        with connect(dsn, application_name="reconciler inspect") as conn:
            row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
            identifiers.append(row[0] if row else None)
    return identifiers[0] == identifiers[1]


def create_roles(dsn: str, names: set[str]) -> list[str]:
    """Create, NOLOGIN, the roles of ``names`` the server at ``dsn`` lacks; returns those created.

    Only for a shadow server that is not the target: there the roles stand in for the target's."""
    if not names:
        return []
    created = []
    with connect(dsn, application_name="reconciler shadow") as conn:
        present = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                                              (sorted(names),)).fetchall()}
        for name in sorted(names - present):
            try:
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateObject:
                continue  # another run created it meanwhile
            except psycopg.Error as exc:
                raise ReconcilerError(
                    f"cannot create role {name!r} on the shadow server ({exc.diag.message_primary or exc}): roles are "
                    "cluster-wide, and the schema's grants and owners need them there; create it, or give the shadow "
                    "role CREATEROLE") from None
            created.append(name)
    if created:
        log.info("created role(s) %s (NOLOGIN) on the shadow server", ", ".join(created))
    return created
