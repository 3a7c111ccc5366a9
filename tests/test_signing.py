"""Signed, content-addressed plans: real keys, a real trust file, real databases, every refusal."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.plan import parse_time
from reconciler.planfile import read_plan, write_plan
from reconciler.servers import Server
from reconciler.signing import (
    PASSPHRASE_ENV,
    Requirements,
    approval_status,
    approve_file,
    load_private_key,
    load_trust,
    sign,
    signature_valid,
)
from tests.conftest import fetch_one, run_sql
from tests.repo import BASE_SCHEMA, Repo

PEOPLE = {"alice": ["dba"], "bob": ["dev"], "carol": ["dev"], "dave": ["dba"]}


class SignedRepo(Repo):
    """A repo whose 'test' environment needs a planner signature and two approvals, one from dba."""

    def __init__(self, root: Path, database: str, server: Server, ttl: str = "7d") -> None:
        super().__init__(root, database, server)
        self.keys = root / "keys"
        for name in [*PEOPLE, "ci", "mallory"]:
            assert main(["keygen", "--out", str(self.keys / name), "--comment", name]) == 0
        config = self.config.read_text().replace("require_signed_plans: false", "require_signed_plans: true")
        self.config.write_text(config.replace("auto_apply: true", textwrap.dedent(f"""\
            auto_apply: false
                approvals: 2
                approval_groups: [dba]
                plan_ttl: {ttl}""")))
        self.write_trust(list(PEOPLE))

    def public(self, name: str) -> str:
        return (self.keys / f"{name}.pub").read_text().strip()

    def write_trust(self, approvers: list[str], extra_approver_keys: dict[str, str] | None = None) -> None:
        trust = self.root / "policies" / "trust.yaml"
        trust.parent.mkdir(exist_ok=True)
        entries = [{"name": n, "groups": PEOPLE.get(n, []), "key": self.public(n)} for n in approvers]
        entries += [{"name": n, "groups": [], "key": k} for n, k in (extra_approver_keys or {}).items()]
        trust.write_text(json.dumps({"approvers": entries, "planners": [{"name": "ci", "key": self.public("ci")}]}))

    def signed_plan(self, name: str = "plan.json") -> Path:
        path = self.root / name
        assert self.run("plan", "-o", str(path), "--key", str(self.keys / "ci")) == 2
        return path

    def approve(self, plan: Path, *names: str) -> None:
        for n in names:
            assert self.run("approve", str(plan), "--key", str(self.keys / n)) == 0


@pytest.fixture
def srepo(tmp_path: Path, database: str, pg_server: Server) -> SignedRepo:
    r = SignedRepo(tmp_path, database, pg_server)
    r.write(BASE_SCHEMA)
    return r


def refused(repo: Repo, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert repo.run(*args) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: plan ") and err.count("\n") == 1  # one line saying why
    return err


def test_keygen_writes_openssh_pair_with_private_mode_0600(srepo: SignedRepo) -> None:
    private = srepo.keys / "alice"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert srepo.public("alice").startswith("ssh-ed25519 ") and srepo.public("alice").endswith(" alice")
    assert main(["keygen", "--out", str(private)]) == 1  # never overwrites a key


def test_happy_path_two_approvers_from_the_trust_file(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    plan_id = json.loads(plan_file.read_text())["id"]
    srepo.approve(plan_file, "alice", "bob")
    data = json.loads(plan_file.read_text())
    assert data["id"] == plan_id  # signatures never change the body or the id
    assert [(s["role"], s["signer"]) for s in data["signatures"]] == [("planner", "ci"), ("approver", "alice"),
                                                                     ("approver", "bob")]
    capsys.readouterr()
    assert srepo.run("verify-plan", str(plan_file)) == 0
    out = capsys.readouterr().out
    assert "All checks passed" in out and "FAIL" not in out
    assert srepo.run("apply", str(plan_file)) == 0
    assert fetch_one(srepo.database, "SELECT status FROM reconciler.runs") == "applied"


def test_refused_when_body_altered(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    srepo.approve(plan_file, "alice", "bob")
    data = json.loads(plan_file.read_text())
    data["body"]["steps"][0]["sql"] = data["body"]["steps"][0]["sql"].replace("'open'", "'opened'")
    plan_file.write_text(json.dumps(data))
    assert "(integrity): the body does not hash to the plan id" in refused(srepo, capsys, "apply", str(plan_file))
    assert fetch_one(srepo.database, "SELECT to_regtype('public.status')") is None


def test_refused_when_a_signature_does_not_verify(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    srepo.approve(plan_file, "alice", "bob")
    data = json.loads(plan_file.read_text())
    data["signatures"][2]["signer"] = "carol"  # claims another name: the signed payload no longer matches
    plan_file.write_text(json.dumps(data))
    err = refused(srepo, capsys, "apply", str(plan_file))
    assert "(signatures): the approver signature of carol does not verify" in err


def test_refused_when_signer_not_in_trust_file(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    srepo.approve(plan_file, "alice", "bob")
    plan = read_plan(plan_file)
    forged = sign(plan.id, load_private_key(srepo.keys / "mallory"), signer="mallory", role="approver")
    assert signature_valid(plan.id, forged)  # cryptographically fine, just not trusted
    write_plan(replace(plan, signatures=(*plan.signatures, forged)), plan_file)
    assert "mallory (SHA256:" in refused(srepo, capsys, "apply", str(plan_file))
    # and approve refuses an untrusted key outright
    assert srepo.run("approve", str(plan_file), "--key", str(srepo.keys / "mallory")) == 3
    assert "is not an approver" in capsys.readouterr().err


def test_refused_with_too_few_approvals_or_a_missing_group(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    srepo.approve(plan_file, "alice")
    assert "(approvals): 1 of 2 approval(s) (alice)" in refused(srepo, capsys, "apply", str(plan_file))
    other = srepo.signed_plan("other.json")
    srepo.approve(other, "bob", "carol")  # two approvals, but nobody from dba
    assert "no approval yet from group(s) dba" in refused(srepo, capsys, "apply", str(other))
    srepo.approve(other, "bob")  # approving twice does not count twice
    assert len(json.loads(other.read_text())["signatures"]) == 3


def test_planner_key_never_counts_as_an_approval(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    srepo.write_trust(list(PEOPLE), extra_approver_keys={"ci-bot": srepo.public("ci")})
    plan_file = srepo.signed_plan()
    assert srepo.run("approve", str(plan_file), "--key", str(srepo.keys / "ci")) == 3
    assert "cannot also approve it" in capsys.readouterr().err
    plan = read_plan(plan_file)
    self_approval = sign(plan.id, load_private_key(srepo.keys / "ci"), signer="ci-bot", role="approver")
    write_plan(replace(plan, signatures=(*plan.signatures, self_approval)), plan_file)
    srepo.approve(plan_file, "alice")
    status = approval_status(read_plan(plan_file), load_trust(srepo.root / "policies" / "trust.yaml"),
                             Requirements(approvals=2, groups=("dba",), require_signed=True))
    assert status.approvers == ("alice",) and status.missing_count == 1
    assert "1 of 2 approval(s) (alice)" in refused(srepo, capsys, "apply", str(plan_file))


def test_refused_on_another_database(srepo: SignedRepo, second_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    srepo.approve(plan_file, "alice", "bob")
    capsys.readouterr()
    code = main(["--config", str(srepo.config), "apply", str(plan_file), "--env", "test", "--database", second_database])
    err = capsys.readouterr().err
    assert code == 3 and "(target): the plan is for database" in err
    assert fetch_one(second_database, "SELECT to_regclass('public.orders')") is None


def test_refused_when_stale_naming_what_changed(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    srepo.approve(plan_file, "alice", "bob")
    run_sql(srepo.database, "CREATE TABLE sneaky (id int)")
    err = refused(srepo, capsys, "apply", str(plan_file))
    assert "(freshness): stale" in err and "table public.sneaky (unexpected)" in err


def test_refused_after_expiry(tmp_path: Path, database: str, pg_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    repo = SignedRepo(tmp_path, database, pg_server, ttl="2s")
    repo.write(BASE_SCHEMA)
    plan_file = repo.signed_plan()
    repo.approve(plan_file, "alice", "bob")
    expires = read_plan(plan_file).body.expires_at
    deadline = parse_time(expires).timestamp()
    while time.time() <= deadline + 0.1:
        time.sleep(0.2)
    assert f"(expiry): expired at {expires}" in refused(repo, capsys, "apply", str(plan_file))


def test_refused_replay(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    srepo.approve(plan_file, "alice", "bob")
    assert srepo.run("apply", str(plan_file)) == 0
    err = refused(srepo, capsys, "apply", str(plan_file))
    assert "(replay): already applied to this database by run" in err
    assert fetch_one(srepo.database, "SELECT count(*) FROM reconciler.runs") == 1


def test_refused_unsigned_plan_where_signatures_required(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.root / "unsigned.json"
    assert srepo.run("plan", "-o", str(plan_file)) == 2
    srepo.approve(plan_file, "alice", "bob")
    err = refused(srepo, capsys, "apply", str(plan_file))
    assert "(signed plan): the environment requires plans signed by a trusted planner" in err


def test_passphrase_protected_key(srepo: SignedRepo, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    secret_key = srepo.keys / "alice-encrypted"
    assert main(["keygen", "--out", str(secret_key), "--encrypt"]) == 0
    assert "-----BEGIN OPENSSH PRIVATE KEY-----" in secret_key.read_text()
    srepo.write_trust(list(PEOPLE), extra_approver_keys={"alice2": (srepo.keys / "alice-encrypted.pub").read_text()})
    plan_file = srepo.signed_plan()
    assert srepo.run("approve", str(plan_file), "--key", str(secret_key)) == 0
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    capsys.readouterr()
    assert srepo.run("approve", str(plan_file), "--key", str(secret_key)) == 1
    assert "wrong passphrase" in capsys.readouterr().err
    monkeypatch.delenv(PASSPHRASE_ENV)
    assert srepo.run("approve", str(plan_file), "--key", str(secret_key)) == 1  # no terminal to ask on
    assert f"set {PASSPHRASE_ENV}" in capsys.readouterr().err
    assert [s["signer"] for s in json.loads(plan_file.read_text())["signatures"]] == ["ci", "alice2"]


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_existing_openssh_key_from_ssh_keygen(srepo: SignedRepo) -> None:
    key = srepo.keys / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "erin@laptop", "-f", str(key)], check=True)
    srepo.write_trust(list(PEOPLE), extra_approver_keys={"erin": (srepo.keys / "id_ed25519.pub").read_text()})
    plan_file = srepo.signed_plan()
    assert srepo.run("approve", str(plan_file), "--key", str(key)) == 0
    assert read_plan(plan_file).signatures[-1].signer == "erin"


def test_approver_dropped_from_trust_file_is_refused(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    srepo.approve(plan_file, "alice", "bob", "dave")
    srepo.write_trust(["alice", "carol", "dave"])  # bob leaves the team
    assert "bob (SHA256:" in refused(srepo, capsys, "apply", str(plan_file))


def test_concurrent_approvals_keep_every_signature(srepo: SignedRepo) -> None:
    plan_file = srepo.signed_plan()
    trust = load_trust(srepo.root / "policies" / "trust.yaml")
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(PEOPLE))

    def approve(name: str) -> None:
        try:
            barrier.wait()
            approve_file(plan_file, srepo.keys / name, trust)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=approve, args=(n,)) for n in PEOPLE]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    plan = read_plan(plan_file)  # still valid against the JSON Schema
    assert sorted(s.signer for s in plan.signatures if s.role == "approver") == sorted(PEOPLE)
    assert all(signature_valid(plan.id, s) for s in plan.signatures)
    # and as separate processes, the way two reviewers would run it
    second = srepo.signed_plan("second.json")
    exe = str(Path(sys.executable).with_name("reconciler"))
    procs = [subprocess.Popen([exe, "--config", str(srepo.config), "approve", str(second), "--key", str(srepo.keys / n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in PEOPLE]
    assert all(p.wait(60) == 0 for p in procs)
    assert sorted(s.signer for s in read_plan(second).signatures if s.role == "approver") == sorted(PEOPLE)


def test_show_and_markdown_list_approvals_and_the_command(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    srepo.approve(plan_file, "bob")
    capsys.readouterr()
    assert main(["--config", str(srepo.config), "show", str(plan_file)]) == 0
    text = capsys.readouterr().out
    assert "Approvals: 1 of 2 given (bob); 1 more needed; still needed from group(s): dba" in text
    assert f"reconciler approve {plan_file} --key" in text
    assert main(["--config", str(srepo.config), "show", str(plan_file), "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert "**Approvals:** 1 of 2 given (bob)" in md and "reconciler approve" in md and "| ci | planner | " in md
    assert "policy: needs 2 approvals, at least 1 from dba (1 given)" in md.splitlines()[2]


def test_verify_plan_prints_each_check(srepo: SignedRepo, capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = srepo.signed_plan()
    capsys.readouterr()
    assert srepo.run("verify-plan", str(plan_file)) == 3
    out = capsys.readouterr().out
    for name in ("integrity", "signatures", "signed plan", "approvals", "expiry", "environment", "target", "replay",
                 "freshness"):
        assert f" {name} " in out or f" {name}  " in out, name
    assert "FAIL  approvals" in out and "ok    integrity" in out
    assert srepo.run("verify-plan", str(plan_file), "--offline") == 3
    assert "target" not in capsys.readouterr().out
    srepo.approve(plan_file, "alice", "bob")
    capsys.readouterr()
    assert srepo.run("verify-plan", str(plan_file)) == 0
    assert fetch_one(srepo.database, "SELECT to_regclass('public.orders')") is None  # verify never applies


def test_planner_key_from_environment_variable(srepo: SignedRepo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECONCILER_PLANNER_KEY", str(srepo.keys / "ci"))
    plan_file = srepo.root / "env-signed.json"
    assert srepo.run("plan", "-o", str(plan_file)) == 2
    (signature,) = read_plan(plan_file).signatures
    assert (signature.role, signature.signer) == ("planner", "ci")
    monkeypatch.setenv("RECONCILER_PLANNER_KEY", str(srepo.keys / "mallory"))
    assert srepo.run("plan", "-o", str(plan_file)) == 3  # not a trusted planner: refused before writing
    assert read_plan(plan_file).signatures == (signature,)
