"""Ed25519 keys in OpenSSH format, the trust file, plan signatures and the checks that use them.

What is signed is the canonical JSON of ``{format, plan_id, signer, role, key, signed_at}``: the
plan id binds the body, and the signer's name, role and time cannot be swapped after the fact.
"""

from __future__ import annotations

import base64
import fcntl
import getpass
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .config import PASSPHRASE_ENV
from .errors import ConfigError, RefusedError
from .plan import Plan, Signature, iso_utc, parse_time
from .planfile import body_id, canonical_json, read_plan, write_plan
from .yamlfile import load_validated

if TYPE_CHECKING:  # cryptography is imported where keys are used: every plan and apply imports this module
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_FORMAT = "reconciler.signature/v1"


# --- keys ----------------------------------------------------------------------------------------

def public_key_line(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def normalize_public_key(line: str) -> str:
    """'ssh-ed25519 AAAA... comment' -> 'ssh-ed25519 AAAA...' (the comment is not part of the key)."""
    parts = line.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519":
        raise ConfigError(f"not an OpenSSH Ed25519 public key: {line[:40]!r}")
    return f"{parts[0]} {parts[1]}"


def parse_public_key(line: str) -> Ed25519PublicKey:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_ssh_public_key(normalize_public_key(line).encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"invalid Ed25519 public key {line[:40]!r}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"only Ed25519 keys are supported, not {line.split()[0]}")
    return key


def key_fingerprint(line: str) -> str:
    """SHA256:... as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(normalize_public_key(line).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def generate_keypair(out: Path, *, comment: str, passphrase: bytes | None = None) -> str:
    """Write FILE (private, 0600) and FILE.pub; refuses to overwrite. Returns the public key line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub_path = out.with_name(out.name + ".pub")
    for path in (out, pub_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    public = public_key_line(key.public_key())
    pub_path.write_text(f"{public} {comment}\n" if comment else public + "\n")
    return public


def _ask_passphrase(path: Path) -> bytes | None:
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        return env.encode()
    if sys.stdin.isatty():
        return getpass.getpass(f"Passphrase for {path}: ").encode()
    return None


def load_private_key(path: Path, ask: Callable[[Path], bytes | None] = _ask_passphrase) -> Ed25519PrivateKey:
    """An OpenSSH Ed25519 private key; an encrypted one asks for its passphrase (or reads the env)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key {path}: {exc.strerror}") from None
    password: bytes | None = None
    for attempt in range(2):
        try:
            key = serialization.load_ssh_private_key(data, password=password)
            break
        except TypeError:  # encrypted and no password given (or the reverse)
            if attempt:
                raise ConfigError(f"key {path} is encrypted: set {PASSPHRASE_ENV} or run in a terminal") from None
            password = ask(path)
            if password is None:
                raise ConfigError(f"key {path} is encrypted: set {PASSPHRASE_ENV} or run in a terminal") from None
        except ValueError as exc:
            if password is not None:
                raise ConfigError(f"cannot decrypt key {path}: wrong passphrase") from None
            raise ConfigError(f"{path} is not an OpenSSH private key: {exc}") from None
        except UnsupportedAlgorithm as exc:
            raise ConfigError(f"cannot load key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key; create one with `reconciler keygen` or ssh-keygen -t ed25519")
    return key


# --- trust -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Approver:
    name: str
    groups: tuple[str, ...]
    key: str  # normalized


@dataclass(frozen=True)
class Planner:
    name: str
    key: str


@dataclass(frozen=True)
class Trust:
    path: Path
    approvers: tuple[Approver, ...]
    planners: tuple[Planner, ...]

    def approver_for(self, key: str) -> Approver | None:
        return next((a for a in self.approvers if a.key == key), None)

    def planner_for(self, key: str) -> Planner | None:
        return next((p for p in self.planners if p.key == key), None)


def trust_entries(name: str, public_key: str) -> tuple[str, str]:
    """The entries of one key as the trust file takes them, indented to paste under ``approvers:`` and
    ``planners:``: an approver's with its groups (none yet), a planner's without (planners have none)."""
    name_text, key_text = json.dumps(name), json.dumps(public_key.strip())  # a JSON string is a YAML string
    return (f"  - name: {name_text}\n    groups: []\n    key: {key_text}\n",
            f"  - name: {name_text}\n    key: {key_text}\n")


def load_trust(path: Path) -> Trust:
    if not path.is_file():
        raise ConfigError(f"trust file {path} does not exist (it lists the approvers' and planners' public keys)")
    data = load_validated(path, "trust.schema.json")
    approvers = []
    for entry in data.get("approvers") or []:
        parse_public_key(entry["key"])
        approvers.append(Approver(entry["name"], tuple(entry.get("groups") or ()), normalize_public_key(entry["key"])))
    planners = []
    for entry in data.get("planners") or []:
        parse_public_key(entry["key"])
        planners.append(Planner(entry["name"], normalize_public_key(entry["key"])))
    return Trust(path=path, approvers=tuple(approvers), planners=tuple(planners))


# --- signatures ------------------------------------------------------------------------------------

def signed_payload(plan_id: str, signer: str, role: str, key: str, signed_at: str) -> bytes:
    return canonical_json(
        {"format": SIGNATURE_FORMAT, "plan_id": plan_id, "signer": signer, "role": role, "key": key, "signed_at": signed_at}
    )


def sign(plan_id: str, private_key: Ed25519PrivateKey, *, signer: str, role: str, now: datetime | None = None) -> Signature:
    key = public_key_line(private_key.public_key())
    signed_at = iso_utc(now or datetime.now(UTC))
    raw = private_key.sign(signed_payload(plan_id, signer, role, key, signed_at))
    return Signature(signer=signer, role=role, key=key, signed_at=signed_at, signature=base64.b64encode(raw).decode())


def signature_valid(plan_id: str, sig: Signature) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public = parse_public_key(sig.key)
        public.verify(base64.b64decode(sig.signature, validate=True), signed_payload(plan_id, sig.signer, sig.role, sig.key, sig.signed_at))
    except (InvalidSignature, ConfigError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class PlannerKey:
    private_key: Ed25519PrivateKey
    planner: Planner


def planner_key(key_path: Path, trust: Trust) -> PlannerKey:
    """Load and vet the planner's key before any planning work is done."""
    private = load_private_key(key_path)
    planner = trust.planner_for(public_key_line(private.public_key()))
    if planner is None:
        raise RefusedError(f"the key {key_path} is not a planner key in {trust.path}")
    return PlannerKey(private_key=private, planner=planner)


def sign_as_planner(plan: Plan, key: PlannerKey) -> Plan:
    signature = sign(plan.id, key.private_key, signer=key.planner.name, role="planner")
    return replace(plan, signatures=(*[s for s in plan.signatures if s.role != "planner"], signature))


def approve_file(plan_path: Path, key_path: Path, trust: Trust) -> tuple[Plan, Signature]:
    """Add an approver's signature to a plan file, atomically, safe against concurrent approvals."""
    private = load_private_key(key_path)
    key = public_key_line(private.public_key())
    approver = trust.approver_for(key)
    if approver is None:
        raise RefusedError(f"the key {key_path} ({key_fingerprint(key)}) is not an approver in {trust.path}")
    with PlanFileLock(plan_path):
        plan = read_plan(plan_path)
        if body_id(plan.body) != plan.id:
            raise RefusedError(f"plan {plan.short_id}: the body does not hash to the plan id: refusing to approve an altered plan")
        if any(s.role == "planner" and s.key == key for s in plan.signatures):
            raise RefusedError(f"{approver.name} signed this plan as its planner and cannot also approve it")
        signature = sign(plan.id, private, signer=approver.name, role="approver")
        others = tuple(s for s in plan.signatures if not (s.role == "approver" and s.key == key))
        plan = replace(plan, signatures=(*others, signature))
        write_plan(plan, plan_path)
    return plan, signature


class PlanFileLock:
    """An exclusive lock on a plan file that survives its atomic replacement (re-checks the inode): approvals take
    it, and so does watch before it removes a plan it wrote (so it never removes one being approved)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                raise ConfigError(f"plan file {self.path} does not exist") from None
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)  # replaced while we waited: lock the new file

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


# --- checks ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Requirements:
    approvals: int
    groups: tuple[str, ...]
    require_signed: bool


NO_REQUIREMENTS = Requirements(approvals=0, groups=(), require_signed=False)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str


@dataclass(frozen=True)
class ApprovalStatus:
    approvers: tuple[str, ...]  # distinct, trusted, valid
    missing_count: int
    missing_groups: tuple[str, ...]


def approval_status(plan: Plan, trust: Trust | None, req: Requirements) -> ApprovalStatus:
    planner_keys = {s.key for s in plan.signatures if s.role == "planner"}
    names: dict[str, Approver] = {}
    for sig in plan.signatures:
        if sig.role != "approver" or sig.key in planner_keys or trust is None:
            continue
        approver = trust.approver_for(sig.key)
        if approver is not None and signature_valid(plan.id, sig):
            names[approver.name] = approver
    groups_seen = {g for a in names.values() for g in a.groups}
    return ApprovalStatus(
        approvers=tuple(sorted(names)),
        missing_count=max(0, req.approvals - len(names)),
        missing_groups=tuple(g for g in req.groups if g not in groups_seen),
    )


def offline_checks(plan: Plan, trust: Trust | None, req: Requirements, now: datetime | None = None) -> list[Check]:
    """Every check that needs neither the database nor an apply, in the order apply runs them."""
    checks: list[Check] = []
    intact = body_id(plan.body) == plan.id
    checks.append(Check("integrity", intact, "the body hashes to the plan id" if intact
                        else "the body does not hash to the plan id: the file was altered"))
    bad: list[str] = []
    for sig in plan.signatures:
        if not signature_valid(plan.id, sig):
            bad.append(f"the {sig.role} signature of {sig.signer} does not verify")
        elif trust is None:
            bad.append(f"{sig.signer}'s signature cannot be checked: no trust file")
        elif (trust.approver_for(sig.key) if sig.role == "approver" else trust.planner_for(sig.key)) is None:
            bad.append(f"{sig.signer} ({key_fingerprint(sig.key)}) is not a trusted {sig.role} in {trust.path}")
    checks.append(Check("signatures", not bad, "; ".join(bad) if bad else f"{len(plan.signatures)} signature(s) verify"))
    planners = [s for s in plan.signatures if s.role == "planner"]
    if req.require_signed:
        signed = bool(planners) and not bad
        checks.append(Check("signed plan", signed, f"signed by planner {planners[0].signer}" if signed
                            else "the environment requires plans signed by a trusted planner (plan --key)"))
    status = approval_status(plan, trust, req)
    enough = status.missing_count == 0 and not status.missing_groups
    given = ", ".join(status.approvers) or "none"
    message = f"{len(status.approvers)} of {req.approvals} approval(s) ({given})"
    if status.missing_groups:
        message += f"; no approval yet from group(s) {', '.join(status.missing_groups)}"
    checks.append(Check("approvals", enough, message))
    expires = parse_time(plan.body.expires_at)
    current = now or datetime.now(UTC)
    fresh = current < expires
    checks.append(Check("expiry", fresh, f"valid until {plan.body.expires_at}" if fresh
                        else f"expired at {plan.body.expires_at}: plan again"))
    return checks


def enforce(checks: Sequence[Check], plan: Plan) -> None:
    for check in checks:
        if not check.ok:
            raise RefusedError(f"plan {plan.short_id} refused ({check.name}): {check.message}", check=check.name)
