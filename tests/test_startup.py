"""Start-up: commands that need no database import none of the heavy stages (issue 9).

Checked by the modules loaded in a fresh interpreter, not by time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("psycopg", "pglast", "jsonschema", "yaml", "cryptography", "rich", "migra", "schemainspect", "sqlalchemy",
         "prometheus_client", "watchfiles", "reconciler.pipeline", "reconciler.plan", "reconciler.signing")

_PROBE = """
import json, sys
from reconciler.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _loaded(*argv: str, cwd: Path) -> tuple[object, set[str]]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["code"], set(result["modules"])


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["plan", "--help"]])
def test_version_and_help_import_no_stage(argv: list[str], tmp_path: Path) -> None:
    code, modules = _loaded(*argv, cwd=tmp_path)
    assert code == 0
    assert _heavy(modules) == []


def test_init_imports_no_stage(tmp_path: Path) -> None:
    code, modules = _loaded("init", str(tmp_path / "repo"), cwd=tmp_path)
    assert code == 0 and (tmp_path / "repo" / "reconciler.yaml").is_file()
    assert _heavy(modules) == []


def test_show_loads_the_plan_stage_but_not_watch_fleet_or_migra(tmp_path: Path) -> None:
    """A command imports what it uses: `show` of a missing file gets as far as reading plans, and no further."""
    code, modules = _loaded("show", str(tmp_path / "missing.json"), cwd=tmp_path)
    assert code == 1
    assert "reconciler.plan" in modules
    assert not {"reconciler.watch", "reconciler.fleet", "reconciler.pipeline", "migra", "cryptography"} & modules
