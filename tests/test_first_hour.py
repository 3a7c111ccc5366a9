"""The first hour with the command line (issue 19): init, keygen and the trust file, outside a project, --help,
global options after the command, usage errors. Each through `reconciler.cli.main` or the installed command."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from reconciler import cli, cli_help
from reconciler.cli import build_parser, main
from reconciler.config import find_config
from reconciler.planfile import read_plan
from reconciler.servers import Server
from reconciler.signing import load_trust, signature_valid
from reconciler.watch import DEFAULT_HOST, DEFAULT_PORT

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).with_name("reconciler"))
PLAN_RESULTS = {cli_help.EXIT_OK, cli_help.EXIT_CHANGES, cli_help.EXIT_REFUSED}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


# --- init, keygen and the trust file ------------------------------------------------------------------

def printed_entries(out: str) -> dict[str, str]:
    """The two entries keygen prints, by the list each goes under, as printed (indented for pasting)."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        found = re.search(r"under `(approvers|planners):`", line)
        if found:
            current = entries.setdefault(found.group(1), [])
        elif current is not None and line.startswith("  "):
            current.append(line)
        else:
            current = None
    return {name: "\n".join(lines) + "\n" for name, lines in entries.items()}


def paste(trust: Path, under: str, entry: str) -> None:
    """What a user does: the entry pasted on the line after `approvers:` or `planners:`."""
    text = trust.read_text()
    assert f"\n{under}:\n" in text
    trust.write_text(text.replace(f"\n{under}:\n", f"\n{under}:\n{entry}", 1))


def test_init_scaffolds_a_trust_file_the_loader_accepts(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "app")]) == 0
    trust = load_trust(tmp_path / "app" / "policies" / "trust.yaml")
    assert trust.approvers == () and trust.planners == ()
    text = (tmp_path / "app" / "policies" / "trust.yaml").read_text()
    assert "reconciler keygen" in text and "approvers:" in text and "planners:" in text  # says how to fill it


def test_keygen_entries_pasted_into_the_scaffolded_trust_file_sign_and_approve(
        tmp_path: Path, database: str, pg_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "app"
    assert main(["init", str(root)]) == 0
    config = root / "reconciler.yaml"
    config.write_text(config.read_text() + textwrap.indent(textwrap.dedent(f"""\
        test:
          database: "{database}"
          shadow: "{pg_server.dsn}"
          approvals: 1
        """), "  "))
    capsys.readouterr()
    entries = {}
    for name in ("ci", "alice"):
        assert main(["keygen", "--out", str(tmp_path / name), "--comment", name]) == 0
        entries[name] = printed_entries(capsys.readouterr().out)
        assert set(entries[name]) == {"approvers", "planners"}
        (planner,) = yaml.safe_load(textwrap.dedent(entries[name]["planners"]))
        assert set(planner) == {"name", "key"}  # a planner has no groups
        (approver,) = yaml.safe_load(textwrap.dedent(entries[name]["approvers"]))
        assert set(approver) == {"name", "groups", "key"} and approver["name"] == name
    trust = root / "policies" / "trust.yaml"
    plan_file = root / "plan.json"
    base = ["--config", str(config)]

    # the scaffolded file is there: the first plan --key is refused for the key, not failed for a missing file
    assert main([*base, "plan", "--env", "test", "--key", str(tmp_path / "ci")]) == 3
    assert "is not a planner key in" in capsys.readouterr().err

    paste(trust, "planners", entries["ci"]["planners"])
    assert main([*base, "plan", "--env", "test", "-o", str(plan_file), "--key", str(tmp_path / "ci")]) == 2
    plan = read_plan(plan_file)
    (signature,) = plan.signatures
    loaded = load_trust(trust)
    assert signature.role == "planner" and signature_valid(plan.id, signature)
    assert loaded.planner_for(signature.key) is not None

    paste(trust, "approvers", entries["alice"]["approvers"])
    capsys.readouterr()
    assert main([*base, "approve", str(plan_file), "--key", str(tmp_path / "alice")]) == 0
    assert "Approvals: 1 of 1" in capsys.readouterr().out
    # every check apply makes passes: the planner's signature verifies and alice's approval counts
    assert main([*base, "verify-plan", str(plan_file)]) == 0, capsys.readouterr()
    assert "All checks passed." in capsys.readouterr().out


# --- outside a project --------------------------------------------------------------------------------

# the least each command needs to get as far as looking for its project
ARGUMENTS = {
    "plan": [], "apply": ["plan.json"], "diff": [], "drift": [], "history": [], "approve": ["plan.json", "--key", "k"],
    "verify-plan": ["plan.json"], "lint": [], "backup": [], "restore": ["r1", "--into-target"], "cancel": [],
    "verify": [], "rollback": ["r1"], "watch": [], "cache": ["list"], "backfill": ["status", "r1"],
}


def test_every_command_that_needs_a_project_is_listed_here() -> None:
    assert set(ARGUMENTS) == set(subparsers(build_parser())) - {"init", "show", "keygen"}
    assert set(ARGUMENTS) == set(cli._COMMANDS)


@pytest.mark.parametrize("command", sorted(ARGUMENTS))
def test_outside_a_project_one_line_exit_1_and_nothing_made(
        command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_config(empty) is None
    monkeypatch.chdir(empty)
    monkeypatch.delenv("RECONCILER_DATABASE_URL", raising=False)
    assert main([command, *ARGUMENTS[command]]) == cli_help.EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert "not in a reconciler project" in captured.err and "reconciler init" in captured.err
    assert list(empty.iterdir()) == []


def test_outside_a_project_the_installed_command_says_so_too(tmp_path: Path) -> None:
    result = subprocess.run([EXE, "plan"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == cli_help.EXIT_ERROR
    assert result.stderr.startswith("error: not in a reconciler project") and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# --- --help -------------------------------------------------------------------------------------------

def test_every_argument_and_option_has_help_text() -> None:
    parser = build_parser()
    for name, p in {"": parser, **subparsers(parser)}.items():
        for action in p._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings or action.dest)


@pytest.mark.parametrize("command", sorted(cli_help.COMMANDS))
def test_every_command_has_a_description_exit_codes_and_an_example_that_parses(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    words = cli_help.COMMANDS[command]
    assert words.description.split()[0] in text and len(words.description) > 40
    codes = re.findall(r"^  (\d+) +\S", text.split("exit codes:\n", 1)[1].split("\n\n")[0], re.MULTILINE)
    assert set(map(int, codes)) <= {code for code, _ in cli_help.EXIT_CODES}
    assert {cli_help.EXIT_ERROR, cli_help.EXIT_USAGE} <= set(map(int, codes))
    example = text.split("example:\n", 1)[1].strip()
    assert example.startswith(f"reconciler {command} ")
    argv = shlex.split(example)[1:]
    cut = next((i for i, t in enumerate(argv) if t in {"&&", ">"}), len(argv))
    assert build_parser().parse_args(argv[:cut]).command == command  # the example is a real command line


def test_the_commands_list_and_the_exit_codes_in_the_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command, words in cli_help.COMMANDS.items():
        assert re.search(rf"^    {re.escape(command)} +{re.escape(words.summary.split()[0])}", text, re.MULTILINE), command
    for code, meaning in cli_help.EXIT_CODES:
        assert f"  {code:<3} {meaning}" in text


@pytest.mark.parametrize("command", ["apply", "verify-plan"])
def test_env_defaults_to_the_plans_environment(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert "(default: the plan's environment" in " ".join(capsys.readouterr().out.split())


def test_watch_listen_shows_its_default_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["watch", "--help"]) == 0
    assert f"default: {DEFAULT_HOST}:{DEFAULT_PORT}" in " ".join(capsys.readouterr().out.split())
    assert build_parser().parse_args(["watch"]).listen == f"{DEFAULT_HOST}:{DEFAULT_PORT}"


# --- global options after the command -----------------------------------------------------------------

@pytest.mark.parametrize(("argv", "expected"), [
    (["plan"], {"verbose": 0, "debug": False, "config": None, "log_format": "text"}),
    (["-v", "plan"], {"verbose": 1}),
    (["plan", "-v"], {"verbose": 1}),
    (["-v", "plan", "-vv"], {"verbose": 3}),
    (["--config", "a.yaml", "--debug", "--log-format", "json", "plan"],
     {"config": Path("a.yaml"), "debug": True, "log_format": "json"}),
    (["plan", "--config", "a.yaml", "--debug", "--log-format", "json"],
     {"config": Path("a.yaml"), "debug": True, "log_format": "json"}),
    (["--config", "a.yaml", "plan", "-v"], {"config": Path("a.yaml"), "verbose": 1, "debug": False}),
    (["--log-format", "json", "plan", "--debug"], {"log_format": "json", "debug": True}),
    (["--config", "a.yaml", "plan", "-c", "b.yaml"], {"config": Path("b.yaml")}),  # the later one, as usual
])
def test_global_options_before_and_after_the_command(argv: list[str], expected: dict[str, object]) -> None:
    args = build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected
    assert not hasattr(args, "verbose_after")


def test_global_options_after_the_command_take_effect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`plan --config FILE` reads FILE: the option is used, not only accepted."""
    assert main(["plan", "-v", "--config", str(tmp_path / "missing.yaml")]) == cli_help.EXIT_ERROR
    assert f"config file {tmp_path / 'missing.yaml'} does not exist" in capsys.readouterr().err


# --- usage errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [[], ["nosuch"], ["plan", "--nosuch"], ["plan", "--format", "xml"], ["approve", "p.json"],
                                  ["restore", "r1"], ["--log-format", "xml", "plan"]])
def test_usage_errors_exit_with_a_code_no_plan_result_uses(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == cli_help.EXIT_USAGE
    assert cli_help.EXIT_USAGE not in PLAN_RESULTS
    assert f"(exit {cli_help.EXIT_USAGE}: usage error" in capsys.readouterr().err


def test_the_installed_command_exits_64_on_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run([EXE, "plan", "--nosuch"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == cli_help.EXIT_USAGE, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_readme_documents_every_exit_code() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Exit codes\n", 1)[1].split("\n\n", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", table, re.MULTILINE))
    assert {int(code) for code in rows} == {code for code, _ in cli_help.EXIT_CODES}
