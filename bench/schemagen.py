"""Schemas for bench/perf.py: synthetic application schemas with a few changed tables, the chained-views
lattice, and a handful of changes appended to a real schema (GitLab's).

Everything is deterministic: the same size and seed give the same SQL, so runs compare.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

# ---- synthetic application schemas -----------------------------------------------------------------------

_NOUNS = ("account", "order", "invoice", "shipment", "product", "customer", "payment", "ticket", "event", "session",
          "review", "coupon", "address", "warehouse", "supplier", "refund", "subscription", "device", "report", "task")

# (type, widened type or None, default or None): the column types a table draws from.
_TYPES: tuple[tuple[str, str | None, str | None], ...] = (
    ("text", None, None),
    ("text", None, "''"),
    ("varchar(40)", "varchar(80)", None),
    ("integer", "bigint", "0"),
    ("integer", "bigint", None),
    ("smallint", "integer", "1"),
    ("bigint", None, None),
    ("numeric(10,2)", "numeric(14,2)", "0"),
    ("boolean", None, "false"),
    ("timestamptz", None, "now()"),
    ("date", None, None),
    ("jsonb", None, "'{}'::jsonb"),
    ("uuid", None, None),
    ("inet", None, None),
)
_NUMERIC = ("integer", "smallint", "bigint", "numeric(10,2)", "numeric(14,2)")

CHANGE_KINDS = ("add_column", "drop_column", "add_index", "change_default", "add_check", "widen_type")


@dataclass
class Column:
    name: str
    type: str
    widened: str | None = None
    default: str | None = None
    not_null: bool = False
    pinned: bool = False  # used by a key, an index, a check or a view: left alone by the changes


@dataclass
class Table:
    name: str
    columns: list[Column]
    foreign_keys: list[tuple[str, str]] = field(default_factory=list)  # (column, parent table)
    indexes: list[tuple[str, str]] = field(default_factory=list)  # (index name, column list)
    checks: list[tuple[str, str]] = field(default_factory=list)  # (constraint name, expression)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


@dataclass
class View:
    name: str
    sql: str


@dataclass(frozen=True)
class SyntheticSchemas:
    old_sql: str
    new_sql: str
    tables: int
    views: int
    indexes: int
    foreign_keys: int
    checks: int
    changes: tuple[str, ...]  # one line per change, e.g. "add_index on invoice_00042"

    def describe(self) -> str:
        return (f"{self.tables} tables, {self.indexes} indexes, {self.foreign_keys} foreign keys, {self.checks} checks, "
                f"{self.views} views; {len(self.changes)} tables changed")


def synthetic(tables: int, *, changed_share: float = 0.05, seed: int = 1) -> SyntheticSchemas:
    """An application schema of ``tables`` tables and the same schema with ``changed_share`` of them changed,
    one change each, the kinds of CHANGE_KINDS in turn."""
    rng = random.Random(f"{seed}:{tables}")
    model: list[Table] = []
    for number in range(1, tables + 1):
        model.append(_table(rng, number, model))
    views = _views(rng, model)
    new_model = copy.deepcopy(model)
    count = max(1, round(tables * changed_share))
    chosen = sorted(rng.sample(range(tables), count))
    changes = [_change(rng, new_model[i], CHANGE_KINDS[k % len(CHANGE_KINDS)]) for k, i in enumerate(chosen)]
    return SyntheticSchemas(
        old_sql=_render(model, views),
        new_sql=_render(new_model, views),
        tables=tables,
        views=len(views),
        indexes=sum(len(t.indexes) for t in model),
        foreign_keys=sum(len(t.foreign_keys) for t in model),
        checks=sum(len(t.checks) for t in model),
        changes=tuple(changes),
    )


def _table(rng: random.Random, number: int, earlier: list[Table]) -> Table:
    name = f"{_NOUNS[number % len(_NOUNS)]}_{number:05d}"
    columns = [Column("id", "bigint GENERATED ALWAYS AS IDENTITY", pinned=True)]
    table = Table(name, columns)
    if earlier and rng.random() < 0.4:
        for parent in rng.sample(earlier[-200:], min(len(earlier[-200:]), rng.randint(1, 2))):
            fk = f"{parent.name}_id"
            columns.append(Column(fk, "bigint", not_null=rng.random() < 0.5, pinned=True))
            table.foreign_keys.append((fk, parent.name))
            table.indexes.append((f"{name}_{fk}_idx", fk))
    for position in range(rng.randint(5, 15) - len(columns)):
        kind, widened, default = rng.choice(_TYPES)
        columns.append(Column(f"c{position:02d}_{kind.split('(')[0]}", kind, widened, default,
                              not_null=default is not None and rng.random() < 0.6))
    columns.append(Column("created_at", "timestamptz", default="now()", not_null=True, pinned=True))
    table.indexes.append((f"{name}_created_at_idx", "created_at"))
    free = [c for c in columns if not c.pinned]
    if free and rng.random() < 0.5:
        indexed = rng.choice(free)
        indexed.pinned = True
        table.indexes.append((f"{name}_{indexed.name}_idx", indexed.name))
    numeric = [c for c in columns if not c.pinned and c.type in _NUMERIC]
    if numeric and rng.random() < 0.25:
        checked = rng.choice(numeric)
        checked.pinned = True
        table.checks.append((f"{name}_{checked.name}_check", f"{checked.name} >= 0"))
    return table


def _views(rng: random.Random, model: list[Table]) -> list[View]:
    """One view per 25 tables: a table's first columns, joined to its parent where it has one."""
    views = []
    for table in model[::25]:
        shown = [c for c in table.columns if c.type != "jsonb"][:4]
        for c in shown:
            c.pinned = True
        select = ", ".join(f"t.{c.name}" for c in shown)
        if table.foreign_keys:
            fk, parent = table.foreign_keys[0]
            body = f"SELECT {select}, p.created_at AS parent_created_at FROM {table.name} t JOIN {parent} p ON p.id = t.{fk}"
        else:
            body = f"SELECT {select} FROM {table.name} t WHERE t.created_at > now() - interval '{rng.randint(1, 90)} days'"
        views.append(View(f"{table.name}_v", body))
    return views


def _change(rng: random.Random, table: Table, kind: str) -> str:
    """Change ``table`` in place; a kind the table has no column for falls back to adding a column."""
    free = [c for c in table.columns if not c.pinned]
    if kind == "drop_column" and free:
        column = rng.choice(free)
        table.columns.remove(column)
        return f"drop_column {column.name} on {table.name}"
    if kind == "add_index" and free:
        column = rng.choice(free)
        column.pinned = True
        table.indexes.append((f"{table.name}_{column.name}_idx", column.name))
        return f"add_index on {table.name} ({column.name})"
    if kind == "change_default" and free:
        column = rng.choice(free)
        column.default = _other_default(column)
        return f"change_default of {table.name}.{column.name}"
    numeric = [c for c in free if c.type in _NUMERIC]
    if kind == "add_check" and numeric:
        column = rng.choice(numeric)
        column.pinned = True
        table.checks.append((f"{table.name}_{column.name}_check", f"{column.name} >= 0"))
        return f"add_check on {table.name}.{column.name}"
    widenable = [c for c in free if c.widened]
    if kind == "widen_type" and widenable:
        column = rng.choice(widenable)
        before = column.type
        column.type, column.widened = column.widened or column.type, None
        return f"widen_type of {table.name}.{column.name} {before} -> {column.type}"
    column = Column("note", "text", default="''", not_null=True, pinned=True)
    table.columns.insert(len(table.columns) - 1, column)
    return f"add_column note on {table.name}" + ("" if kind == "add_column" else f" (no column for {kind})")


def _other_default(column: Column) -> str | None:
    base = column.type.split("(")[0]
    if column.default is not None and base not in ("integer", "smallint", "bigint", "numeric", "text", "varchar"):
        return None  # drop the default
    return {"integer": "42", "smallint": "2", "bigint": "7", "numeric": "1.50", "boolean": "true",
            "timestamptz": "'2000-01-01 00:00:00+00'::timestamptz", "date": "CURRENT_DATE", "jsonb": "'[]'::jsonb",
            "uuid": "'00000000-0000-0000-0000-000000000000'::uuid", "inet": "'127.0.0.1'::inet"}.get(base, "'n/a'")


def _render(model: list[Table], views: list[View]) -> str:
    out = []
    for table in model:
        lines = []
        for c in table.columns:
            line = f"    {c.name} {c.type}"
            if c.default is not None:
                line += f" DEFAULT {c.default}"
            if c.not_null:
                line += " NOT NULL"
            lines.append(line)
        lines.append(f"    CONSTRAINT {table.name}_pkey PRIMARY KEY (id)")
        for column, parent in table.foreign_keys:
            lines.append(f"    CONSTRAINT {table.name}_{column}_fkey FOREIGN KEY ({column}) REFERENCES {parent} (id)")
        for name, expression in table.checks:
            lines.append(f"    CONSTRAINT {name} CHECK ({expression})")
        out.append(f"CREATE TABLE {table.name} (\n" + ",\n".join(lines) + "\n);\n")
        for name, columns in table.indexes:
            out.append(f"CREATE INDEX {name} ON {table.name} ({columns});\n")
        out.append("\n")
    for view in views:
        out.append(f"CREATE VIEW {view.name} AS {view.sql};\n")
    return "".join(out)


# ---- the chained-views lattice ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LatticeSchemas:
    old_sql: str
    new_sql: str
    views: int
    change: str


def lattice(views: int) -> LatticeSchemas:
    """``views`` views over one table, view N joining views N-1 and N-2 (views 1 and 2 read the table).

    Following every path down from the top view visits a Fibonacci number of views: schemainspect's dependency
    closure walks them all. The change: the top view gains a column, and a new table appears."""
    if views < 3:
        raise ValueError("a lattice needs at least 3 views")
    base = "CREATE TABLE lattice_base (\n    id bigint PRIMARY KEY,\n    a integer NOT NULL,\n    b text\n);\n\n"

    def render(top_extra: str) -> str:
        parts = [base]
        for n in range(1, views + 1):
            if n <= 2:
                body = f"SELECT id, a + {n} AS a, b FROM lattice_base"
            else:
                extra = top_extra if n == views else ""
                body = (f"SELECT x.id, x.a + y.a AS a, x.b{extra} FROM lattice_v{n - 1:02d} x "
                        f"JOIN lattice_v{n - 2:02d} y ON y.id = x.id")
            parts.append(f"CREATE VIEW lattice_v{n:02d} AS {body};\n")
        return "".join(parts)

    new = render(", y.b AS b2") + "\nCREATE TABLE lattice_note (\n    id bigint PRIMARY KEY,\n    note text\n);\n"
    return LatticeSchemas(old_sql=render(""), new_sql=new, views=views,
                          change=f"lattice_v{views:02d} gains a column; table lattice_note added")


@dataclass(frozen=True)
class FanoutSchemas:
    old_sql: str
    new_sql: str
    views: int
    change: str


def fanout(views: int) -> FanoutSchemas:
    """``views`` views over one table (column lists, joins, GROUP BY its key, one in five a materialized view with an
    index, one in ten over another view); the change: a column added in the middle of the table, which no view reads.
    PostgreSQL re-creates none of them; migra drops and creates them all."""
    table = ("CREATE TABLE fanout_base (\n    id bigint PRIMARY KEY,\n    a integer NOT NULL,\n{extra}"
             "    b text,\n    c timestamptz\n);\nCREATE TABLE fanout_other (id bigint PRIMARY KEY, note text);\n")
    parts = []
    for n in range(1, views + 1):
        name = f"fanout_v{n:02d}"
        if n % 10 == 0:
            body = f"SELECT id FROM fanout_v{n - 1:02d} WHERE id > {n}"
        elif n % 3 == 0:
            body = "SELECT t.id, t.b, count(*) AS n FROM fanout_base t GROUP BY t.id"
        elif n % 3 == 1:
            body = f"SELECT t.id, t.a + {n} AS a, o.note FROM fanout_base t JOIN fanout_other o ON o.id = t.id"
        else:
            body = f"SELECT id, a, b, c FROM fanout_base WHERE a > {n}"
        if n % 5 == 0 and n % 10 != 0:
            parts.append(f"CREATE MATERIALIZED VIEW {name} AS {body};\nCREATE INDEX {name}_id ON {name} (id);\n")
        else:
            parts.append(f"CREATE VIEW {name} AS {body};\n")
    old = table.format(extra="") + "".join(parts)
    new = table.format(extra="    added numeric,\n") + "".join(parts)
    return FanoutSchemas(old_sql=old, new_sql=new, views=views,
                         change="a column added in the middle of the table every view reads")


# ---- a few changes to a real schema ----------------------------------------------------------------------

# One change of each synthetic kind (and a second added column), on regular (not partitioned) GitLab tables.
# A dump that lacks one of these tables or columns fails clearly when the desired database is loaded.
GITLAB_CHANGES: tuple[tuple[str, str], ...] = (
    ("ALTER TABLE users ADD COLUMN bench_nickname text;", "add_column users.bench_nickname"),
    ("ALTER TABLE projects ADD COLUMN bench_flag boolean DEFAULT false NOT NULL;", "add_column projects.bench_flag"),
    ("ALTER TABLE labels DROP COLUMN description_html;", "drop_column labels.description_html"),
    ("CREATE INDEX bench_issues_updated_at_idx ON issues USING btree (updated_at);", "add_index on issues (updated_at)"),
    ("ALTER TABLE ONLY namespaces ALTER COLUMN description SET DEFAULT 'none';",
     "change_default of namespaces.description"),
    ("ALTER TABLE labels ADD CONSTRAINT bench_labels_title_length CHECK ((char_length(title) <= 512));",
     "add_check on labels.title"),
    ("ALTER TABLE labels ALTER COLUMN cached_markdown_version TYPE bigint;",
     "widen_type of labels.cached_markdown_version integer -> bigint"),
)


def gitlab_changed(full_sql: str) -> tuple[str, tuple[str, ...]]:
    """GitLab's schema with GITLAB_CHANGES appended (the dump's statements are left as they are)."""
    statements = [sql for sql, _ in GITLAB_CHANGES]
    described = tuple(what for _, what in GITLAB_CHANGES)
    return full_sql.rstrip() + "\n\n-- bench/perf.py: a few changes\n" + "\n".join(statements) + "\n", described
