"""Which line of the desired files asked for each step, so a reviewer sees it beside the change and GitHub can put
a finding on the changed line. Each desired statement is read for the objects it creates or changes (a table, its
columns and constraints, an index, a view, a routine ...), keyed by name parts as the steps' ``identity`` is; a
step's object is looked up, then its table's. An object the plan drops is no longer in the files: it is looked
up in the folder's git history, newest commit first, and named with the commit it was last seen in."""

from __future__ import annotations

import bisect
import dataclasses
import logging
import re
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pglast
from pglast import ast, enums

from .safety import SourceLine, Step
from .shadow import split_file
from .source import DesiredSchema, SchemaFile

log = logging.getLogger(__name__)

Key = tuple[str, ...]
HISTORY_COMMITS = 20  # how far back a dropped object is looked for


def with_sources(steps: Sequence[Step], desired: DesiredSchema) -> tuple[Step, ...]:
    """The steps, each with the desired line that asked for it where one is found."""
    if not steps:
        return tuple(steps)
    lines = desired_lines(desired.files, _names_of(steps))
    found = {s.index: _look_up(lines, s, exact=True) for s in steps}

    def from_history(dropped: bool) -> None:
        left = [s for s in steps if found[s.index] is None and _key(s) and (s.kind.startswith("drop_") or not dropped)]
        if left and desired.git_commit:
            found.update((s.index, line) for s, line in zip(left, _from_history(desired.root, left), strict=True))

    from_history(dropped=True)  # an object gone from the files: where git last had it, before its table's line now
    found.update((s.index, _look_up(lines, s)) for s in steps if found[s.index] is None)
    from_history(dropped=False)
    return tuple(dataclasses.replace(s, source=found[s.index]) if found[s.index] else s for s in steps)


def desired_lines(files: Iterable[SchemaFile], names: Iterable[str] | None = None) -> dict[Key, SourceLine]:
    """Each object the files' statements create or change, at its line. ``names``: only statements that name one
    of these are parsed (a plan of a few steps on GitLab's 14,000 statements parses a handful, not all: 2 s)."""
    wanted = _mentions(names) if names is not None else None
    out: dict[Key, SourceLine] = {}
    for schema_file in files:
        text = schema_file.text
        statements = list(split_file(schema_file))
        if wanted is not None:
            starts = [st.start for st in statements]
            chosen = sorted({bisect.bisect_right(starts, m.start()) - 1 for m in wanted.finditer(text)} - {-1})
            statements = [statements[i] for i in chosen]
        newlines = [m.start() for m in _NEWLINE.finditer(text)]
        for statement in statements:
            try:
                parsed = pglast.parse_sql(statement.text)
            except pglast.parser.ParseError:
                continue
            data = statement.text.encode()
            line = bisect.bisect_left(newlines, statement.start) + 1  # the statement's first character's line
            for raw in parsed:
                if raw.stmt is None:
                    continue
                first = _first_token(statement.text)
                for key, offset in _keys(raw.stmt):
                    at = offset if offset >= 0 else first
                    # the statement that creates an object names it first; later ones (ALTER ... OWNER) change it
                    out.setdefault(key, SourceLine(schema_file.path, line + data.count(b"\n", 0, at)))
    return out


_NEWLINE = re.compile("\n")


def _mentions(names: Iterable[str]) -> re.Pattern[str]:
    """Where any of ``names`` may be named (as a word, any case: a quoted name too)."""
    words = sorted({n for n in names if n}, key=len, reverse=True)
    if not words:
        return re.compile(r"(?!)")
    return re.compile(r"(?<![\w$])(?:" + "|".join(re.escape(w) for w in words) + r")(?![\w$])", re.IGNORECASE)


def _names_of(steps: Sequence[Step]) -> set[str]:
    """The names a statement must mention to be about one of the steps' objects (or their tables)."""
    return {part for step in steps for part in _key(step)[1:]}


def _first_token(text: str) -> int:
    """Byte offset of the statement's first token (past comments and blank lines)."""
    try:
        tokens = [t for t in pglast.parser.scan(text) if t.name not in ("SQL_COMMENT", "C_COMMENT")]
    except pglast.parser.ParseError:
        return 0
    return tokens[0].start if tokens else 0


def _look_up(lines: dict[Key, SourceLine], step: Step, *, exact: bool = False) -> SourceLine | None:
    """The step's object's line; unless ``exact``, else its table's (a helper step of a column's rewrite)."""
    key = _key(step)
    if step.kind == "comment" and ("comment", *key) in lines:
        return lines[("comment", *key)]
    if step.kind in ("grant", "revoke") and ("grant", *key) in lines:
        return lines[("grant", *key)]
    for end in range(len(key), len(key) - 1 if exact else 1, -1):  # a column's, then its table's
        if key[:end] in lines:
            return lines[key[:end]]
    return None


def _key(step: Step) -> Key:
    if step.kind.startswith("rename_"):  # the desired files name it by its new name
        renamed = _new_name(step)
        if renamed:
            return renamed
    if step.identity:
        return step.identity
    name = step.object.split("(", 1)[0].split(",", 1)[0].strip()
    parts = tuple(p for p in name.split(".") if p)
    return ("public", *parts) if len(parts) == 1 and step.kind not in ("create_schema", "create_extension") else parts


def _new_name(step: Step) -> Key:
    try:
        (raw,) = pglast.parse_sql(step.sql)
    except (pglast.parser.ParseError, ValueError):
        return ()
    node = raw.stmt
    if not isinstance(node, ast.RenameStmt) or not node.newname:
        return ()
    if node.relation is not None and node.subname:  # a column or constraint
        return (*_relation(node.relation), str(node.newname))
    if node.relation is not None:
        return (_relation(node.relation)[0], str(node.newname))
    return ()


def _relation(rv: ast.RangeVar | None) -> Key:
    if rv is None or not rv.relname:
        return ()
    return (str(rv.schemaname or "public"), str(rv.relname))


def _names(items: object) -> Key:
    parts = tuple(str(getattr(i, "sval", "")) for i in items or ()) if isinstance(items, tuple | list) else ()
    return ("public", *parts) if len(parts) == 1 else parts


def _keys(node: ast.Node) -> Iterator[tuple[Key, int]]:
    """The objects a statement creates or changes, each with the byte offset in it that names it (-1: its start)."""
    if isinstance(node, ast.CreateStmt):
        table = _relation(node.relation)
        yield table, -1
        for element in node.tableElts or ():
            if isinstance(element, ast.ColumnDef) and element.colname:
                yield (*table, str(element.colname)), int(element.location or 0)
                for constraint in element.constraints or ():
                    if isinstance(constraint, ast.Constraint):
                        yield from _constraint(table, constraint, (str(element.colname),))
            elif isinstance(element, ast.Constraint):
                yield from _constraint(table, element, ())
    elif isinstance(node, ast.AlterTableStmt):
        table = _relation(node.relation)
        for cmd in node.cmds or ():
            if isinstance(cmd, ast.AlterTableCmd) and isinstance(cmd.def_, ast.ColumnDef) and cmd.def_.colname:
                yield (*table, str(cmd.def_.colname)), int(cmd.def_.location or 0)
            elif isinstance(cmd, ast.AlterTableCmd) and isinstance(cmd.def_, ast.Constraint):
                yield from _constraint(table, cmd.def_, ())
        yield table, -1
    elif isinstance(node, ast.IndexStmt):
        table = _relation(node.relation)
        if table:
            name = str(node.idxname) if node.idxname else "_".join(
                [table[1], *[str(e.name) for e in node.indexParams or () if isinstance(e, ast.IndexElem) and e.name],
                 "idx"])
            yield (table[0], name), -1
    elif isinstance(node, ast.ViewStmt):
        yield _relation(node.view), -1
    elif isinstance(node, ast.CreateTableAsStmt) and node.into is not None:
        yield _relation(node.into.rel), -1
    elif isinstance(node, ast.CreateSeqStmt | ast.AlterSeqStmt):
        yield _relation(node.sequence), -1
    elif isinstance(node, ast.CreateEnumStmt | ast.AlterEnumStmt):
        yield _names(node.typeName), -1
    elif isinstance(node, ast.CompositeTypeStmt):
        yield _relation(node.typevar), -1
    elif isinstance(node, ast.CreateDomainStmt):
        yield _names(node.domainname), -1
    elif isinstance(node, ast.CreateFunctionStmt):
        yield _names(node.funcname), -1
    elif isinstance(node, ast.CreateTrigStmt) and node.trigname:
        yield (*_relation(node.relation), str(node.trigname)), -1
    elif isinstance(node, ast.CreatePolicyStmt | ast.AlterPolicyStmt) and node.policy_name:
        yield (*_relation(node.table), str(node.policy_name)), -1
    elif isinstance(node, ast.CreateSchemaStmt) and node.schemaname:
        yield (str(node.schemaname),), -1
    elif isinstance(node, ast.CreateExtensionStmt) and node.extname:
        yield (str(node.extname),), -1
    elif isinstance(node, ast.CommentStmt):
        named = node.object
        parts = _names(named) if isinstance(named, tuple | list) else _names((named,)) if named is not None else ()
        if parts:
            yield ("comment", *parts), -1
    elif isinstance(node, ast.GrantStmt):
        for target in node.objects or ():
            parts = _relation(target) if isinstance(target, ast.RangeVar) else _names(target)
            if parts:
                yield ("grant", *parts), -1


_DEFAULT_SUFFIX = {enums.ConstrType.CONSTR_PRIMARY: "pkey", enums.ConstrType.CONSTR_UNIQUE: "key",
                   enums.ConstrType.CONSTR_FOREIGN: "fkey", enums.ConstrType.CONSTR_CHECK: "check",
                   enums.ConstrType.CONSTR_EXCLUSION: "excl"}


def _constraint(table: Key, constraint: ast.Constraint, column: tuple[str, ...]) -> Iterator[tuple[Key, int]]:
    """A constraint by its name, or by the name PostgreSQL gives one left unnamed (the table, its columns, a
    suffix: ``orders_pkey``, ``orders_customer_id_fkey``)."""
    kind = enums.ConstrType(int(constraint.contype or 0))
    if constraint.conname:
        name = str(constraint.conname)
    elif kind in _DEFAULT_SUFFIX and len(table) == 2:
        keys = tuple(str(getattr(k, "sval", "")) for k in constraint.fk_attrs or constraint.keys or ()) or column
        name = "_".join([table[1], *(() if kind is enums.ConstrType.CONSTR_PRIMARY else keys),
                         _DEFAULT_SUFFIX[kind]])[:63]
    else:
        return
    yield (*table, name), int(constraint.location or 0)


def _from_history(root: Path, steps: list[Step]) -> list[SourceLine | None]:
    """Each step's object in the newest of the folder's last commits whose files name it."""
    found: list[SourceLine | None] = [None] * len(steps)
    try:
        commits = _git(root, "log", f"-n{HISTORY_COMMITS}", "--format=%H", "--", ".").split()
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("no git history for the dropped objects' lines: %s", exc)
        return found
    # the object's own line in any of them before its table's line in the newest (a column dropped commits ago)
    tables: list[SourceLine | None] = [None] * len(steps)
    for commit in commits:
        left = [i for i, line in enumerate(found) if line is None]
        if not left:
            break
        try:
            lines = desired_lines(_files_at(root, commit), _names_of([steps[i] for i in left]))
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("cannot read the schemas folder at %s: %s", commit, exc)
            break
        for i in left:
            line, table = _look_up(lines, steps[i], exact=True), _look_up(lines, steps[i])
            if line is not None:
                found[i] = dataclasses.replace(line, commit=commit)
            elif table is not None and tables[i] is None:
                tables[i] = dataclasses.replace(table, commit=commit)
    return [line or table for line, table in zip(found, tables, strict=True)]


def _files_at(root: Path, commit: str) -> list[SchemaFile]:
    """The folder's ``.sql`` files at a commit, by their paths in the folder (ls-tree names them from there)."""
    names = [n for n in _git(root, "ls-tree", "-r", "--name-only", commit, "--", ".").splitlines() if n.endswith(".sql")]
    out = []
    for name in names:
        try:
            text = _git(root, "show", f"{commit}:./{name}")
        except subprocess.SubprocessError:
            continue
        out.append(SchemaFile(path=name, sha256="", text=text))
    return out


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=60)
    return done.stdout
