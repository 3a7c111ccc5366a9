"""Business rules in YAML: what is denied, what needs whose approval, what may apply on its own.

Rules live in ``policies/*.yaml`` (validated by ``formats/policy.schema.json``). Evaluating them is a
pure function of the plan's steps, the desired schema's catalog and the clock; reading the catalog
and running SQL assertions are the only I/O, kept in their own functions.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml

from .config import duration_seconds
from .errors import ConfigError
from .safety import Step
from .yamlfile import load_validated

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
KINDS = ("change", "schema", "data", "assert", "window", "auto_apply")
_SINGULAR = {"tables": "table", "columns": "column", "indexes": "index", "constraints": "constraint", "views": "view",
             "functions": "function", "sequences": "sequence", "types": "type"}
_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(B|kB|KB|MB|GB|TB)$")


def approvals_needed(count: int, groups: Sequence[str]) -> str:
    """What ``count`` and ``groups`` ask for together: that many distinct approvers, and at least one of them from
    each group ('2 approvals, at least 1 from dba'), never that many from the group."""
    if not groups:
        return f"{count} approval{'' if count == 1 else 's'}"
    where = groups[0] if len(groups) == 1 else "each of " + ", ".join(groups)
    if count == 0:
        return f"an approval from {where}"
    return f"{count} approval{'' if count == 1 else 's'}, at least 1 from {where}"


@dataclass(frozen=True)
class Rule:
    id: str
    description: str
    action: str  # deny, require_approval, warn
    kind: str  # one of KINDS
    spec: Mapping[str, Any]
    file: str
    line: int
    environments: tuple[str, ...] = ()
    count: int = 0
    groups: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def applies_to(self, environment: str) -> bool:
        return not self.environments or any(fnmatch.fnmatchcase(environment, g) for g in self.environments)


@dataclass(frozen=True)
class Finding:
    rule: str
    file: str
    line: int
    severity: str  # deny, require_approval, warn
    subject: str  # "step 3 (drop_column public.t.c)" or an object name
    message: str
    count: int = 0
    groups: tuple[str, ...] = ()

    def __str__(self) -> str:
        need = f" (needs {approvals_needed(self.count, self.groups)})" if self.severity == "require_approval" else ""
        return f"{self.severity}: {self.rule} ({self.file}:{self.line}) {self.subject}: {self.message}{need}"


@dataclass(frozen=True)
class Assertion:
    rule: str
    file: str
    line: int
    when: str  # before, after
    sql: str
    timeout: str
    action: str  # deny fails the apply; warn only reports


@dataclass(frozen=True)
class Window:
    rule: str
    file: str
    line: int
    days: tuple[str, ...]
    hours: tuple[int, int] | None  # [start, end) in minutes after midnight UTC

    def open_at(self, moment: datetime) -> bool:
        moment = moment.astimezone(UTC)
        if self.days and DAYS[moment.weekday()] not in self.days:
            return False
        if self.hours is None:
            return True
        minute = moment.hour * 60 + moment.minute
        start, end = self.hours
        return start <= minute < end if start <= end else minute >= start or minute < end

    def describe(self) -> str:
        days = ",".join(self.days) if self.days else "every day"
        if self.hours is None:
            return f"{days} (UTC)"
        (a, b) = self.hours
        return f"{days} {a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d} UTC"


@dataclass(frozen=True)
class PolicyResult:
    findings: tuple[Finding, ...]
    approvals: int
    groups: tuple[str, ...]
    assertions: tuple[Assertion, ...] = ()
    windows: tuple[Window, ...] = ()
    auto_apply_blocked_by: tuple[str, ...] = ()

    @property
    def denied(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "deny")


# --- loading -------------------------------------------------------------------------------------

def _rule_lines(text: str) -> list[int]:
    """1-based line of each item under ``rules:``, in order."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "rules" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def load_policies(folder: Path, *, skip: Iterable[Path] = ()) -> tuple[Rule, ...]:
    """Every rule of every ``*.yaml``/``*.yml`` file in the folder (the trust file excepted)."""
    if not folder.is_dir():
        return ()
    skipped = {p.resolve() for p in skip}
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        if path.resolve() in skipped:
            continue
        data = load_validated(path, "policy.schema.json")
        lines = _rule_lines(path.read_text(encoding="utf-8"))
        rel = path.name
        for i, raw in enumerate(data.get("rules") or []):
            line = lines[i] if i < len(lines) else 1
            if raw["id"] in seen:
                raise ConfigError(f"{rel}:{line}: rule id {raw['id']!r} is already used in {seen[raw['id']]}")
            seen[raw["id"]] = f"{rel}:{line}"
            kind = next(k for k in KINDS if k in raw)
            if kind == "window" and "hours" in raw[kind]:
                _parse_hours(raw[kind]["hours"], f"{rel}:{line}")
            if kind == "assert":
                duration_seconds(raw[kind].get("timeout", "10s"))
            rules.append(Rule(
                id=raw["id"], description=raw["description"], action=raw["action"], kind=kind, spec=raw[kind],
                file=rel, line=line, environments=tuple(raw.get("environments") or ()),
                count=int(raw.get("count", 0)), groups=tuple(raw.get("groups") or ()),
            ))
    return tuple(rules)


def _parse_hours(text: str, where: str) -> tuple[int, int]:
    try:
        start, end = text.split("-")
        return _minutes(start), _minutes(end)
    except ValueError:
        raise ConfigError(f"{where}: window hours {text!r}: use HH-HH or HH:MM-HH:MM (UTC)") from None


def _minutes(text: str) -> int:
    hours, _, minutes = text.partition(":")
    value = int(hours) * 60 + int(minutes or 0)
    if not 0 <= value <= 24 * 60:
        raise ValueError(text)
    return value


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    match = _SIZE.match(value.strip())
    if not match:
        raise ConfigError(f"invalid size {value!r}")
    factor = {"B": 1, "kB": 1024, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}[match.group(2)]
    return int(float(match.group(1)) * factor)


# --- the desired schema's catalog ------------------------------------------------------------------

@dataclass(frozen=True)
class Catalog:
    """What schema rules look at, read from the shadow database holding the desired schema."""

    tables: Mapping[str, bool] = field(default_factory=dict)  # 'schema.table' -> has a primary key
    table_comments: Mapping[str, str | None] = field(default_factory=dict)
    columns: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (table, column) -> format_type
    foreign_keys: Mapping[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # 'table.fk' -> (table, cols)
    index_prefixes: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)  # table -> index key cols
    names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # kind -> qualified names


def read_catalog(conn: psycopg.Connection[Any], *, exclude_schemas: Sequence[str]) -> Catalog:
    excluded = list(exclude_schemas)
    managed = ("n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND n.nspname NOT LIKE 'pg\\_%%' "
               "AND n.nspname <> ALL(%(x)s::text[])")
    params = {"x": excluded}

    def rows(query: str) -> list[tuple[Any, ...]]:
        return conn.execute(query.encode(), params).fetchall()

    tables = rows(f"""SELECT n.nspname || '.' || c.relname, EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid
                        AND k.contype = 'p'), obj_description(c.oid, 'pg_class')
                      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND {managed}""")
    columns = rows(f"""SELECT n.nspname || '.' || c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
                       FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND {managed}""")
    fks = rows(f"""SELECT n.nspname || '.' || c.relname, k.conname,
                          array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, o)
                                JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.o)
                   FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE k.contype = 'f' AND {managed}""")
    indexes = rows(f"""SELECT n.nspname || '.' || c.relname,
                              array(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY u(n, o)
                                    LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.n
                                    WHERE u.o <= i.indnkeyatts ORDER BY u.o)
                       FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE {managed}""")
    named = rows(f"""SELECT 'indexes', n.nspname || '.' || c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                       JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {managed}
                     UNION ALL SELECT 'constraints', n.nspname || '.' || k.conname FROM pg_constraint k
                       JOIN pg_namespace n ON n.oid = k.connamespace WHERE k.contype <> 'n' AND {managed}
                     UNION ALL SELECT CASE c.relkind WHEN 'S' THEN 'sequences' ELSE 'views' END, n.nspname || '.' || c.relname
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('v', 'm', 'S') AND {managed}
                     UNION ALL SELECT 'functions', n.nspname || '.' || p.proname FROM pg_proc p
                       JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {managed}
                     UNION ALL SELECT 'types', n.nspname || '.' || t.typname
                       FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                       WHERE (t.typtype IN ('e', 'd', 'r')
                              OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
                         AND {managed}""")
    by_kind: dict[str, list[str]] = {}
    for kind, name in named:
        by_kind.setdefault(kind, []).append(name)
    by_kind["tables"] = [t for t, _, _ in tables]
    by_kind["columns"] = [f"{t}.{c}" for t, c, _ in columns]
    prefixes: dict[str, list[tuple[str, ...]]] = {}
    for table, cols in indexes:
        prefixes.setdefault(table, []).append(tuple(c for c in cols if c))
    return Catalog(
        tables={t: bool(pk) for t, pk, _ in tables},
        table_comments={t: comment for t, _, comment in tables},
        columns={(t, c): typ for t, c, typ in columns},
        foreign_keys={f"{t}.{name}": (t, tuple(cols)) for t, name, cols in fks},
        index_prefixes={t: tuple(v) for t, v in prefixes.items()},
        names={k: tuple(sorted(v)) for k, v in by_kind.items()},
    )


# --- evaluation ------------------------------------------------------------------------------------

def _any_glob(value: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, g) for g in globs)


def _finding(rule: Rule, subject: str, message: str) -> Finding:
    return Finding(rule=rule.id, file=rule.file, line=rule.line, severity=rule.action, subject=subject,
                   message=message, count=rule.count if rule.action == "require_approval" else 0,
                   groups=rule.groups if rule.action == "require_approval" else ())


def _step_subject(step: Step) -> str:
    return f"step {step.index} ({step.kind} {step.object})"


def _step_schemas(step: Step) -> set[str]:
    names = [step.object, *step.tables]
    return {n.split(".")[0] for n in names if "." in n}


def _change_matches(spec: Mapping[str, Any], step: Step) -> bool:
    if "kinds" in spec and not _any_glob(step.kind, spec["kinds"]):
        return False
    if "hazards" in spec and not {h.code for h in step.hazards} & set(spec["hazards"]):
        return False
    if "schemas" in spec and not any(_any_glob(s, spec["schemas"]) for s in _step_schemas(step)):
        return False
    return not ("objects" in spec and not any(_any_glob(n, spec["objects"]) for n in [step.object, *step.tables]))


def _data_matches(spec: Mapping[str, Any], step: Step) -> str | None:
    min_rows = spec.get("min_rows")
    min_bytes = parse_size(spec["min_bytes"]) if "min_bytes" in spec else None
    for hazard in step.hazards:
        if "hazards" in spec and hazard.code not in spec["hazards"]:
            continue
        if hazard.table is None or ("tables" in spec and not _any_glob(hazard.table, spec["tables"])):
            continue
        big_rows = min_rows is not None and hazard.rows is not None and hazard.rows >= min_rows
        big_bytes = min_bytes is not None and hazard.bytes is not None and hazard.bytes >= min_bytes
        if big_rows or big_bytes:
            return f"{hazard.code} on {hazard.table} (~{hazard.rows:,} rows, {hazard.bytes:,} bytes)"
    return None


def _in_scope(spec: Mapping[str, Any], table: str) -> bool:
    if "tables" in spec and not _any_glob(table, spec["tables"]):
        return False
    return not ("exclude" in spec and _any_glob(table, spec["exclude"]))


def _schema_findings(rule: Rule, catalog: Catalog) -> list[Finding]:
    spec = rule.spec
    out: list[Finding] = []
    tables = [t for t in sorted(catalog.tables) if _in_scope(spec, t)]
    if spec.get("require_primary_key"):
        out += [_finding(rule, f"table {t}", "has no primary key") for t in tables if not catalog.tables[t]]
    if spec.get("table_comments"):
        out += [_finding(rule, f"table {t}", "has no comment") for t in tables if not catalog.table_comments.get(t)]
    for kind, pattern in (spec.get("naming") or {}).items():
        regex = re.compile(pattern)
        for name in catalog.names.get(kind, ()):
            table = name.rsplit(".", 1)[0] if kind == "columns" else name
            if kind in ("tables", "columns") and not _in_scope(spec, table):
                continue
            short = name.rsplit(".", 1)[-1]
            if not regex.fullmatch(short):
                out.append(_finding(rule, f"{_SINGULAR[kind]} {name}", f"name {short!r} does not match {pattern!r}"))
    forbidden = [t.lower() for t in spec.get("forbidden_types") or ()]
    if forbidden:
        for (table, column), typ in sorted(catalog.columns.items()):
            base = typ.lower().split("(")[0].strip().removesuffix("[]")
            if _in_scope(spec, table) and (base in forbidden or typ.lower() in forbidden):
                out.append(_finding(rule, f"column {table}.{column}", f"uses forbidden type {typ}"))
    for required in spec.get("required_columns") or ():
        out += [_finding(rule, f"table {t}", f"has no column {required!r}") for t in tables
                if (t, required) not in catalog.columns]
    if spec.get("foreign_keys_indexed"):
        for name, (table, cols) in sorted(catalog.foreign_keys.items()):
            if not _in_scope(spec, table):
                continue
            covered = any(prefix[: len(cols)] == cols for prefix in catalog.index_prefixes.get(table, ()))
            if not covered:
                out.append(_finding(rule, f"foreign key {name}",
                                    f"no index starts with its column(s) {', '.join(cols)}: deletes on the referenced "
                                    "table scan this one"))
    return out


def evaluate(
    rules: Sequence[Rule],
    environment: str,
    steps: Sequence[Step],
    catalog: Catalog | None,
    *,
    base_approvals: int = 0,
    base_groups: Sequence[str] = (),
) -> PolicyResult:
    """Findings for one plan; approvals take the maximum count and the union of groups."""
    findings: list[Finding] = []
    assertions: list[Assertion] = []
    windows: list[Window] = []
    gate: list[str] = []
    for rule in rules:
        if not rule.applies_to(environment):
            continue
        if rule.kind == "change":
            findings += [_finding(rule, _step_subject(s), rule.description) for s in steps if _change_matches(rule.spec, s)]
        elif rule.kind == "data":
            for s in steps:
                matched = _data_matches(rule.spec, s)
                if matched:
                    findings.append(_finding(rule, _step_subject(s), f"{rule.description}: {matched}"))
        elif rule.kind == "schema" and catalog is not None:
            findings += _schema_findings(rule, catalog)
        elif rule.kind == "assert":
            assertions.append(Assertion(rule.id, rule.file, rule.line, rule.spec["when"], rule.spec["sql"],
                                        rule.spec.get("timeout", "10s"), rule.action))
        elif rule.kind == "window":
            hours = _parse_hours(rule.spec["hours"], rule.where) if "hours" in rule.spec else None
            windows.append(Window(rule.id, rule.file, rule.line, tuple(rule.spec.get("days") or ()), hours))
        elif rule.kind == "auto_apply":
            blocking = [s for s in steps if _gate_blocks(rule.spec, s)]
            if blocking:
                gate.append(f"{rule.id} ({rule.where}): {_step_subject(blocking[0])}")
    approvals = max([base_approvals, *(f.count for f in findings if f.severity == "require_approval")])
    groups = tuple(dict.fromkeys([*base_groups, *(g for f in findings if f.severity == "require_approval" for g in f.groups)]))
    return PolicyResult(findings=tuple(findings), approvals=approvals, groups=groups, assertions=tuple(assertions),
                        windows=tuple(windows), auto_apply_blocked_by=tuple(gate))


def _gate_blocks(spec: Mapping[str, Any], step: Step) -> bool:
    if "kinds" in spec and _any_glob(step.kind, spec["kinds"]):
        return True
    if "hazards" in spec and {h.code for h in step.hazards} & set(spec["hazards"]):
        return True
    if "max_rows" in spec:
        heavy = {"ACCESS_EXCLUSIVE_LOCK", "TABLE_REWRITE", "BLOCKS_WRITES", "FULL_SCAN_UNDER_LOCK"}
        return any(h.code in heavy and h.rows is not None and h.rows > spec["max_rows"] for h in step.hazards)
    return False


def closed_windows(windows: Sequence[Window], now: datetime | None = None) -> list[Window]:
    """The windows that do not allow an apply now (all must be open)."""
    moment = now or datetime.now(UTC)
    return [w for w in windows if not w.open_at(moment)]


# --- SQL assertions (I/O) --------------------------------------------------------------------------

def run_assertion(conn: psycopg.Connection[Any], assertion: Assertion) -> str | None:
    """None when the assertion holds; otherwise why not. Runs read-only, with its timeout."""
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (assertion.timeout,))
            row = conn.execute(assertion.sql.encode()).fetchone()
    except psycopg.errors.QueryCanceled:
        return f"did not finish within {assertion.timeout}"
    except psycopg.Error as exc:
        return f"failed: {exc.diag.message_primary or exc}"
    if row is None or row[0] is not True:
        return f"returned {row[0] if row else 'no row'!r}, not true"
    return None
