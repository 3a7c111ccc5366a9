"""The first hour with the command line (issue 19): init, keygen and the trust file. Each through `reconciler.cli.main`."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from reconciler.cli import main
from reconciler.plan import read_plan
from reconciler.servers import Server
from reconciler.signing import load_trust, signature_valid

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
