"""The first hour with the command line, on a real database: run ids by prefix, a way back policy denies, keygen
without a terminal, the pull-request comment's approvals, watch's plan files, a typo in reconciler.yaml, and the
one set of words drift, verify and stale plans use for what differs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.config import APPROVER_KEY_PATH
from reconciler.inspect import DIFFERENCES
from reconciler.servers import Server
from tests.conftest import run_sql
from tests.repo import Repo
from tests.target import DESIRED, Target

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).with_name("reconciler"))
EXTRA = DESIRED + "CREATE TABLE extra (id bigint PRIMARY KEY);\n"


def cli(config: Path, *args: str) -> int:
    return main(["--config", str(config), *args])


def two_runs(target: Target, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Two applied runs, each with a backup: (the older's id, the newer's, which created table extra)."""
    config = target.root / "reconciler.yaml"
    for desired in (DESIRED, EXTRA):
        target.desired(desired)
        assert cli(config, "apply", "--auto", "--env", "test") == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli(config, "history", "--env", "test", "--format", "json") == 0
    newer, older = (r["id"] for r in json.loads(capsys.readouterr().out))
    return older, newer


def test_run_ids_are_taken_by_unique_prefix(target: Target, second_database: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = target.root / "reconciler.yaml"
    older, newer = two_runs(target, capsys)
    prefix = newer[:8]
    assert cli(config, "rollback", prefix, "--env", "test", "--plan-only") == 2
    assert f"The way back to the schema run {newer} started from" in capsys.readouterr().err
    assert cli(config, "restore", prefix, "--env", "test", "--into", second_database) == 0
    assert f"Restored the backup of run {newer}" in capsys.readouterr().out
    assert cli(config, "cancel", prefix.upper(), "--env", "test") == 3
    assert f"run {newer} is not running" in capsys.readouterr().err

    # both ids made to begin alike (uuids rarely do): a shared prefix names both, and nothing is done
    run_sql(target.database, "UPDATE reconciler.runs SET id = ('abcd' || substr(id::text, 5))::uuid")
    renamed = ["abcd" + run[4:] for run in (newer, older)]
    for command in (["rollback", "abcd"], ["restore", "abcd", "--into", second_database], ["cancel", "abcd"]):
        assert cli(config, *command, "--env", "test") == 1
        err = capsys.readouterr().err
        assert err.startswith("error: run id abcd is ambiguous") and err.count("\n") == 1, err
        assert all(run in err for run in renamed), err
    assert cli(config, "rollback", "0000", "--env", "test") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no run 0000 in this database's history (database ") and "`--env` names" in err, err
    assert cli(config, "rollback", "abc", "--env", "test") == 1
    assert "at least its first 4 characters" in capsys.readouterr().err
    assert cli(config, "rollback", renamed[1][:9], "--env", "test", "--plan-only") == 2  # the older run
    assert f"The way back to the schema run {renamed[1]} started from" in capsys.readouterr().err


def test_rollback_denied_by_policy_exits_3_without_an_approve_hint(target: Target,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = target.root / "reconciler.yaml"
    config.write_text(config.read_text() + textwrap.indent(textwrap.dedent(f"""\
        guarded:
          database: "{target.database}"
          shadow: "{target.server.dsn}"
          require_signed_plans: false
          approvals: 1
        """), "  "))
    (target.root / "policies").mkdir()
    (target.root / "policies" / "rules.yaml").write_text(textwrap.dedent("""\
        rules:
          - id: keep-tables
            description: Tables are never dropped in guarded
            environments: [guarded]
            action: deny
            change: {kinds: [drop_table]}
        """))
    _, newer = two_runs(target, capsys)
    assert cli(config, "rollback", newer, "--env", "guarded", "-o", str(target.root / "back.json")) == 3
    captured = capsys.readouterr()
    assert "BLOCKED by policy keep-tables" in captured.out and "drop_table public.extra" in captured.out
    assert "reconciler approve" not in captured.out and "approve with" not in captured.out
    assert "approve and apply" not in captured.err
    assert "Policy blocks this plan: approvals do not change that" in captured.out
    assert "denied: deny: keep-tables" in captured.err
    assert f"run {newer} started from is denied by policy" in captured.err


def test_keygen_encrypt_without_a_terminal_fails_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RECONCILER_KEY_PASSPHRASE"}
    key = tmp_path / "alice"
    result = subprocess.run([EXE, "keygen", "--out", str(key), "--encrypt"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, env=env, timeout=60, start_new_session=True)
    assert result.returncode == 1
    assert result.stderr == ("error: --encrypt needs a passphrase: set RECONCILER_KEY_PASSPHRASE or run in a "
                             "terminal\n")
    assert not key.exists() and not key.with_name("alice.pub").exists()
    # approve says it the same way of an encrypted key
    subprocess.run([EXE, "keygen", "--out", str(key), "--encrypt"], env={**env, "RECONCILER_KEY_PASSPHRASE": "pw"},
                   check=True, capture_output=True, timeout=60)
    (tmp_path / "reconciler.yaml").write_text("environments:\n  local: {database: embedded}\n")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "trust.yaml").write_text(json.dumps({"approvers": []}))
    approve = subprocess.run([EXE, "--config", str(tmp_path / "reconciler.yaml"), "approve", "plan.json", "--key",
                              str(key)], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                             timeout=60, start_new_session=True)
    assert approve.returncode == 1
    assert approve.stderr.endswith("set RECONCILER_KEY_PASSPHRASE or run in a terminal\n")
    assert approve.stderr.count("\n") == 1


def test_pull_request_comment_says_approvals_and_the_documented_key(repo: Repo,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    repo.config.write_text(repo.config.read_text().replace("auto_apply: true", "auto_apply: false\n    approvals: 2\n"
                                                                               "    approval_groups: [dba]"))
    plan = repo.root / "plans" / "staging.json"
    assert repo.run("plan", "-o", str(plan), "--format", "markdown") == 2
    comment = capsys.readouterr().out
    assert "policy: needs 2 approvals, at least 1 from dba (0 given)" in comment.splitlines()[2]
    documented = re.findall(r"reconciler keygen --out (~\S+)", (ROOT / "README.md").read_text())
    assert documented == [APPROVER_KEY_PATH]  # where the docs have a reviewer make the key
    assert f"```sh\nreconciler approve {plan} --key {APPROVER_KEY_PATH}\n```" in comment
    for doc in (ROOT / "README.md", ROOT / "deploy" / "github" / "reconciler.yml"):  # and every example approves with it
        keys = set(re.findall(r"reconciler approve \S+ --key (~\S+)", doc.read_text()))
        assert keys == {APPROVER_KEY_PATH}, doc


def test_unknown_top_level_key_is_reported_at_its_line(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    repo.config.write_text(repo.config.read_text() + "backup: backups\n")
    line = repo.config.read_text().splitlines().index("backup: backups") + 1
    assert repo.run("drift") == 1
    assert capsys.readouterr().err == (f"error: {repo.config}:{line}:1: backup: unknown key 'backup' "
                                       "(did you mean 'backups'?)\n")
    repo.config.write_text(repo.config.read_text().replace("backup: backups\n", "").replace(
        "    lock_wait: 2s\n", "    lock_wait: 2s\n    colour: red\n"))
    line = repo.config.read_text().splitlines().index("    colour: red") + 1
    assert repo.run("drift") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {repo.config}:{line}:5: environments.test.colour: unknown key 'colour' (known keys: ")


def test_drift_verify_and_stale_plans_say_alike_what_differs(repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    assert repo.run("apply", "--auto") == 0
    repo.write({"40_name.sql": "ALTER TABLE customers ADD COLUMN name text;\n"})
    plan = repo.root / "plan.json"
    assert repo.run("plan", "-o", str(plan)) == 2
    run_sql(repo.database, "ALTER TABLE customers ADD COLUMN nickname text; DROP INDEX orders_customer_id_idx;"
                           "ALTER TABLE orders ALTER COLUMN total SET DEFAULT 0")
    said = {"column public.customers.nickname": "unexpected", "index public.orders_customer_id_idx": "missing",
            "column public.orders.total": "different"}
    assert set(said.values()) == set(DIFFERENCES)
    capsys.readouterr()
    assert repo.run("drift") == 2
    drift = capsys.readouterr().out
    assert cli(repo.config, "verify", "--env", "test") == 2
    verify = next(line for line in capsys.readouterr().out.splitlines() if "schema" in line)
    assert repo.run("apply", str(plan)) == 3
    stale = capsys.readouterr().err
    assert "stale: the database changed since it was planned" in stale
    for text in (drift, verify, stale):
        for name, word in said.items():
            assert f"{name} ({word})" in text, text
    assert "column public.customers.name (missing)" in drift and "column public.customers.name (missing)" in verify
    assert "(missing: expected, not in the database; unexpected: in the database, not expected; different: in both, " \
           "defined otherwise)" in drift


def test_watch_removes_the_plan_files_later_plans_supersede(repo: Repo, pg_server: Server,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    repo.config.write_text(repo.config.read_text().replace("auto_apply: true", "auto_apply: false"))
    plans = repo.root / "plans"
    plans.mkdir()
    by_hand = plans / "test-by-hand.json"
    by_hand.write_text("{}\n")  # a person's file: never the watcher's to remove
    key = repo.root / "keys" / "alice"
    assert main(["keygen", "--out", str(key), "--comment", "alice"]) == 0
    (repo.root / "policies").mkdir()
    (repo.root / "policies" / "trust.yaml").write_text(json.dumps(
        {"approvers": [{"name": "alice", "groups": [], "key": key.with_name("alice.pub").read_text().strip()}]}))

    proc = subprocess.Popen([EXE, "--config", str(repo.config), "watch", "--env", "test", "--listen", "off",
                             "--interval", "1h"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")) if proc.stderr else None,
                     daemon=True).start()

    def wait(condition: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + 180
        while not condition():
            assert proc.poll() is None, f"watch exited before {what}: {''.join(lines)}"
            assert time.monotonic() < deadline, f"gave up waiting for {what}: {''.join(lines)}"
            time.sleep(0.1)

    def files() -> set[Path]:
        return set(plans.glob("test-*.json")) - {by_hand}

    def count(*words: str) -> int:
        return sum(any(w in line for w in words) for line in list(lines))

    def next_plan(table: str, before: set[Path], what: str) -> Path:
        written, swept = count("written to"), count("removed plan file", "kept plan file")
        repo.write({f"50_{table}.sql": f"CREATE TABLE {table} (id int PRIMARY KEY);\n"})
        wait(lambda: count("written to") > written and files() - before, what)
        wait(lambda: count("removed plan file", "kept plan file") > swept, f"{what}: the earlier plan's fate")
        (new,) = files() - before
        return new

    try:
        wait(lambda: files(), "the first plan written")
        (first,) = files()
        second = next_plan("a", {first}, "the second plan")
        assert files() == {second}  # the first was superseded: nobody approved or applied it
        assert any(f"removed plan file {first}" in line for line in lines)

        assert cli(repo.config, "apply", str(second), "--env", "test") == 0
        third = next_plan("b", {second}, "the third plan")
        assert files() == {second, third}  # the history names the second: kept
        assert any(f"kept plan file {second}: the target's history names" in line for line in lines)

        assert cli(repo.config, "approve", str(third), "--key", str(key)) == 0
        fourth = next_plan("c", {second, third}, "the fourth plan")
        assert files() == {second, third, fourth}  # approved: kept
        assert any(f"kept plan file {third}: it was approved" in line for line in lines)
        assert by_hand.read_text() == "{}\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
