"""Fleets: one desired schema, several databases; a plan per distinct live state; apply to all, a failure
in one database reported without stopping the others."""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.fleet.members import member_key, select_shard, shard_of
from reconciler.servers import Server, throwaway_database
from tests.conftest import fetch_one, run_sql

DESIRED = "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL, CHECK (balance >= 0));\n"
OLD = "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);\n"


@pytest.fixture
def tenants(pg_server: Server) -> Iterator[list[str]]:
    with ExitStack() as stack:
        yield [stack.enter_context(throwaway_database(pg_server, "tenant")) for _ in range(3)]


def _project(tmp_path: Path, server: Server, fleet_yaml: str) -> Path:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "app.sql").write_text(DESIRED)
    (tmp_path / "policies").mkdir()
    config = tmp_path / "reconciler.yaml"
    fleet = "".join(f"    {line}\n" for line in fleet_yaml.splitlines())
    config.write_text("environments:\n  tenants:\n" + fleet + textwrap.dedent(f"""\
            shadow: "{server.dsn}"
            require_signed_plans: false
            backup: none
            concurrency: 2
        safety:
          squawk: false
        """))
    return config


def test_fleet_plans_once_per_state_and_applies_to_all_reporting_the_one_that_fails(
        tmp_path: Path, pg_server: Server, tenants: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    first, second, third = tenants
    run_sql(first, OLD)
    run_sql(second, OLD)  # same state as the first: shares its plan
    (tmp_path / "tenants.txt").write_text(f"# one DSN per line\n{second}\n\n{third}\n")
    config = _project(tmp_path, pg_server, f'databases: ["{first}"]\ndatabases_file: tenants.txt')

    assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
    err = capsys.readouterr().err
    assert "3 database(s): 2 distinct state(s), 0 unreachable" in err
    plans = sorted((tmp_path / "plans").glob("*.json"))
    fleets = sorted(len(json.loads(p.read_text())["body"]["fleet"]) for p in plans)
    assert fleets == [1, 2]
    shared = next(p for p in plans if len(json.loads(p.read_text())["body"]["fleet"]) == 2)
    assert "password" not in shared.read_text()

    run_sql(second, "INSERT INTO accounts VALUES (1, -5)")  # this tenant's data breaks the new CHECK
    code = main(["--config", str(config), "apply", str(tmp_path / "plans"), "--env", "tenants"])
    out, err = capsys.readouterr()
    assert code == 1
    assert re.search(r"^applying: 2 done, 1 failed, 0 left of 3 \(", err, re.M), err  # no terminal: a line
    lines = {line.split()[0]: line for line in out.splitlines()[1:4]}
    assert len(lines) == 3 and all(db.startswith("postgres@") for db in lines)
    statuses = {db: line.split()[1] for db, line in lines.items()}
    assert sorted(statuses.values()) == ["applied", "applied", "failed"]
    failed_line = next(line for line in lines.values() if " failed " in line)
    assert "accounts_balance_check" in failed_line and "is violated by some row" in failed_line
    assert "What to do:\n  - 1 database(s) failed (failed: " in out and "apply again to retry only them" in out
    assert re.search(r"^3 database\(s\) in [\d.]+ s: 2 applied, 1 failed$", out, re.M)
    for dsn in (first, third):
        assert fetch_one(dsn, "SELECT count(*) FROM pg_constraint WHERE conname = 'accounts_balance_check'") == 1
    assert fetch_one(second, "SELECT status FROM reconciler.runs") == "rolled back"  # its NOT VALID step undone
    assert fetch_one(second, "SELECT count(*) FROM pg_constraint WHERE conname = 'accounts_balance_check'") == 0


def test_fleet_apply_takes_only_its_shard(tmp_path: Path, pg_server: Server, tenants: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    quoted = ", ".join(f'"{t}"' for t in tenants)
    config = _project(tmp_path, pg_server, f"databases: [{quoted}]")
    assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
    capsys.readouterr()
    index = shard_of(member_key(tenants[1]), 2)  # the shard holding the second tenant: one at least
    ours = select_shard(tenants, f"{index}/2")
    assert main(["--config", str(config), "apply", str(tmp_path / "plans"), "--env", "tenants", "--shard", f"{index}/2"]) == 0
    out = capsys.readouterr().out
    assert f"{len(ours)} database(s) in " in out and f"s: {len(ours)} applied" in out
    created = [fetch_one(t, "SELECT to_regclass('public.accounts') IS NOT NULL") for t in tenants]
    assert created == [t in ours for t in tenants]
    assert sorted(select_shard(tenants, f"{1 - index}/2") + ours) == sorted(tenants)  # the shards split the fleet


def test_a_database_missing_from_the_plan_is_skipped_and_named(tmp_path: Path, pg_server: Server,
                                                              tenants: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    first, second, _third = tenants
    config = _project(tmp_path, pg_server, f'databases: ["{first}"]')
    assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
    config.write_text(config.read_text().replace(f'databases: ["{first}"]', f'databases: ["{first}", "{second}"]'))
    capsys.readouterr()
    assert main(["--config", str(config), "apply", str(tmp_path / "plans"), "--env", "tenants"]) == 1
    out = capsys.readouterr().out
    assert "skipped" in out and "no plan names this database" in out
    assert fetch_one(first, "SELECT to_regclass('public.accounts') IS NOT NULL") is True


def test_fleet_auto_plans_and_applies_each_state(tmp_path: Path, pg_server: Server, tenants: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_sql(tenants[0], OLD)
    quoted = ", ".join(f'"{t}"' for t in tenants)
    config = _project(tmp_path, pg_server, f"databases: [{quoted}]\nauto_apply: true")
    assert main(["--config", str(config), "apply", "--auto", "--env", "tenants"]) == 0
    assert "s: 3 applied" in capsys.readouterr().out
    for dsn in tenants:
        assert fetch_one(dsn, "SELECT count(*) FROM pg_constraint WHERE conname = 'accounts_balance_check'") == 1
    assert main(["--config", str(config), "apply", "--auto", "--env", "tenants"]) == 0
    assert "s: 3 nothing" in capsys.readouterr().out


def test_a_fleet_plan_is_one_comment_a_row_per_state_with_each_plan_folded(
        tmp_path: Path, pg_server: Server, tenants: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Two tenants in the old state, one already as desired: one comment, parsed as GitHub parses it, whose table
    has a row per state (databases, steps, risk, approvals) and whose changing state's own comment is folded;
    `show` of the plans' folder gives the same."""
    from markdown_it import MarkdownIt

    first, second, third = tenants
    run_sql(first, OLD)
    run_sql(second, OLD)
    run_sql(third, DESIRED)
    config = _project(tmp_path, pg_server, f'databases: ["{first}", "{second}", "{third}"]')
    assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans"),
                 "--format", "markdown"]) == 2
    comment = capsys.readouterr().out
    assert comment.count("### pg-reconciler fleet plan") == 1
    tokens = MarkdownIt("commonmark").enable("table").parse(comment)
    rows, row = [], None
    for token in tokens[next(i for i, t in enumerate(tokens) if t.type == "table_open"):]:
        if token.type == "table_close":
            break
        if token.type == "tr_open":
            rows.append(row := [])
        elif token.type == "inline" and row is not None:
            row.append(token.content)
    assert rows[0] == ["plan", "databases", "steps", "risk", "approvals"]
    by_count = {r[1].split(":")[0]: r for r in rows[1:]}
    assert sorted(by_count) == ["1", "2"]
    assert by_count["2"][2] == "2 steps in 2 phases" and by_count["2"][3] == "**medium**"
    assert by_count["1"][2:4] == ["no changes", "**none**"]
    assert "**3 databases** in 2 states: 2 databases to change by 1 plan, 1 already as desired." in comment
    folded = [t.content for t in tokens if t.type == "html_block" and "<details><summary>Plan" in t.content]
    assert len(folded) == 1 and "for 2 databases: 2 steps, risk medium" in folded[0]
    assert comment.index("| plan | databases |") < comment.index("### pg-reconciler plan `")  # the groups' own after

    assert main(["--config", str(config), "show", str(tmp_path / "plans"), "--format", "markdown"]) == 0
    assert capsys.readouterr().out.count("### pg-reconciler fleet plan") == 1

    made = max(json.loads(p.read_text())["body"]["created_at"] for p in (tmp_path / "plans").glob("*.json"))
    while datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") <= made:  # plans are stamped to the second: a later one
        time.sleep(0.05)
    assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2  # again
    assert len(list((tmp_path / "plans").glob("*.json"))) == 4
    capsys.readouterr()
    assert main(["--config", str(config), "show", str(tmp_path / "plans"), "--format", "markdown"]) == 0
    again = capsys.readouterr()
    assert "**3 databases** in 2 states: 2 databases to change by 1 plan, 1 already as desired." in again.out
    assert "2 older plan(s) in " in again.err  # each database counted once, with its newest plan


def test_a_fleets_plans_apply_without_naming_the_environment_and_verify_points_to_drift(
        tmp_path: Path, pg_server: Server, tenants: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    quoted = ", ".join(f'"{t}"' for t in tenants)
    config = _project(tmp_path, pg_server, f"databases: [{quoted}]")
    assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
    capsys.readouterr()
    assert main(["--config", str(config), "apply", str(tmp_path / "plans")]) == 0  # the plans' environment: a fleet
    assert "s: 3 applied" in capsys.readouterr().out
    assert main(["--config", str(config), "verify", "--env", "tenants"]) == 1
    assert "verify checks one database (--database DSN); `reconciler drift --env tenants`" in capsys.readouterr().err


def test_one_plan_file_of_a_fleet_applies_to_the_databases_it_names_only(
        tmp_path: Path, pg_server: Server, tenants: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    first, second, _third = tenants
    run_sql(first, OLD)
    run_sql(second, OLD)  # two states: the first two, and the empty third
    quoted = ", ".join(f'"{t}"' for t in tenants)
    config = _project(tmp_path, pg_server, f"databases: [{quoted}]")
    assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
    pair = next(p for p in (tmp_path / "plans").glob("*.json") if len(json.loads(p.read_text())["body"]["fleet"]) == 2)
    capsys.readouterr()
    assert main(["--config", str(config), "apply", str(pair), "--env", "tenants"]) == 0
    out, err = capsys.readouterr()
    assert "s: 2 applied" in out and "1 database(s) of the fleet are not named by" in err
    assert [fetch_one(t, "SELECT to_regclass('reconciler.runs') IS NOT NULL") for t in tenants] == [True, True, False]
