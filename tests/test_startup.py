"""Start-up: commands that need no database import none of the heavy stages (issue 9).

Checked by the modules loaded in a fresh interpreter, not by time.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reconciler import cli

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


_MIGRA_IMPORT = """
import json, sys
from reconciler.diff.migra_engine import _imported
_imported()
from schemainspect.pg import obj
loaded = {"sqlalchemy": "sqlalchemy" in sys.modules, "pkg_resources": "pkg_resources" in sys.modules}
import pkg_resources  # the real one, now that migra is imported
print(json.dumps({"loaded": loaded, "query": obj.INDEXES_QUERY, "file": obj.__file__,
                  "real": hasattr(pkg_resources, "working_set")}))
"""


def test_migra_imports_without_sqlalchemy_or_pkg_resources(tmp_path: Path) -> None:
    """schemainspect reads over psycopg (no SQLAlchemy), and reads its SQL files through a stand-in for
    pkg_resources that is gone after the import: the same queries, and the real pkg_resources for later imports."""
    out = subprocess.run([sys.executable, "-c", _MIGRA_IMPORT], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == {"sqlalchemy": False, "pkg_resources": False}
    assert result["query"] == (Path(result["file"]).parent / "sql" / "indexes.sql").read_text()
    assert result["real"]


_EXIT_PROBE = """
import atexit, sys, threading, time
from reconciler import cli

class Noisy:  # says so when the interpreter frees the module that holds it
    def __del__(self):
        sys.__stderr__.write("freed at teardown\\n")

keep = Noisy()
atexit.register(lambda: sys.__stderr__.write("exit handler ran\\n"))
if sys.argv[1] == "busy":  # a thread still working when the command returns
    threading.Thread(target=lambda: (time.sleep(0.3), sys.__stderr__.write("thread finished\\n"))).start()
sys.argv = ["reconciler", "init", sys.argv[2]]
print("x" * 200_000, end="")  # buffered output a pipe must still receive in full
cli.run()
"""


@pytest.mark.parametrize("case", ["done", "busy"])
def test_the_command_exits_without_interpreter_teardown(case: str, tmp_path: Path) -> None:
    """Once the command is done and nothing else runs, the process ends without freeing every module (a tenth of
    a second after a plan), but only after exit handlers and with every byte of output flushed; with a thread
    still working it exits as usual, after the thread."""
    out = subprocess.run([sys.executable, "-c", _EXIT_PROBE, case, str(tmp_path / "repo")], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("x" * 200_000) and "repo" in out.stdout[200_000:]
    assert "exit handler ran" in out.stderr
    if case == "done":
        assert "freed at teardown" not in out.stderr
    else:
        assert "thread finished" in out.stderr and "freed at teardown" in out.stderr


_ARENAS = """
import ctypes, sys, threading
if sys.argv[1] == "fewer":
    from reconciler.cli import fewer_malloc_arenas
    assert fewer_malloc_arenas()
kept, ready = [], threading.Barrier(8)
def allocate():  # eight threads allocating at once: glibc would give each an arena of its own
    kept.append([bytearray(2_000) for _ in range(100)])
    ready.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()  # a section per arena, on stderr
"""


def _calls_in_order(function: object, *names: str) -> bool:
    """Whether ``function``'s body calls each of ``names`` (plain calls by name), the first call of each in this order."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    first: dict[str, tuple[int, int]] = {}
    for call in sorted(calls, key=lambda c: (c.lineno, c.col_offset), reverse=True):
        assert isinstance(call.func, ast.Name)
        first[call.func.id] = (call.lineno, call.col_offset)
    if any(name not in first for name in names):
        return False
    positions = [first[name] for name in names]
    return positions == sorted(positions)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_the_command_keeps_malloc_to_two_arenas() -> None:
    """A plan's reader threads would each get a malloc arena of their own (the 5,000-table plan's peak memory
    20 to 40 MiB higher, varying run to run): the command asks glibc for two, before any thread starts."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def arenas(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _ARENAS, mode], capture_output=True, text=True, check=True, env=env)
        return sum(line.startswith("Arena ") for line in out.stderr.splitlines())

    assert arenas("as-is") > 2  # what the threads get otherwise
    assert arenas("fewer") == 2
    assert _calls_in_order(cli.run, "fewer_malloc_arenas", "main")  # the console command asks before any work
