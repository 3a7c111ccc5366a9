"""deploy/: every YAML file parses. What each file does is tested by running it: the GitHub workflow in
test_deploy_github.py, the Kubernetes manifests, git-sync.sh and the Dockerfile in test_deploy_kube.py, the
pre-commit hook in test_deploy_precommit.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def test_every_yaml_file_under_deploy_parses() -> None:
    paths = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})
    names = {p.relative_to(DEPLOY).as_posix() for p in paths}
    assert {"github/reconciler.yml", "kubernetes/kustomization.yaml", "kubernetes/watch-staging.yaml",
            "kubernetes/drift-production.yaml", "pre-commit/.pre-commit-config.yaml"} <= names
    for path in paths:
        assert documents(path), path
