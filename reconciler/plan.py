"""The plan: a value you save, show, sign and apply.

What it holds: the target it was made for (and the fleet's other members), the desired schema it was made from,
the steps, what policy and rehearsal said, and the signatures. Its file format (``planfile``) and each way of
showing it (``render``) are kept apart, each a function of this value.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .inspect import Objects, SchemaSnapshot
from .policy import PolicyResult
from .rehearsal import SKIPPED, RehearsalResult
from .safety import Hazard, Step

FORMAT = "reconciler.plan/v1"
NO_POLICY = PolicyResult(findings=(), approvals=0, groups=())


@dataclass(frozen=True)
class PlanTarget:
    system_identifier: str
    database: str
    server_version: str
    fingerprint: str
    objects: Mapping[str, str]


@dataclass(frozen=True)
class FleetTarget:
    """One database of a fleet this plan is for (all in the state ``target.fingerprint`` describes)."""

    system_identifier: str
    database: str
    label: str  # where it is (host, port, database), never a password


@dataclass(frozen=True)
class PlanDesired:
    fingerprint: str
    schema_fingerprint: str
    git_commit: str | None
    dirty: bool
    files: tuple[tuple[str, str], ...]  # (path, sha256)
    objects: Mapping[str, str]
    # digests that also count as desired: definitions equal to the desired ones once PostgreSQL re-creates
    # them (reconciler.roundtrip), as the target will read back after this plan
    equivalents: Mapping[str, str] = field(default_factory=dict)
    folder: str = ""  # the schemas folder's path in its git repository: steps' source paths are relative to it

    def unmatched(self, actual: Mapping[str, str]) -> dict[str, str]:
        """The digests ``actual`` must have to match, counting an equivalent where it has that one."""
        expected = dict(self.objects)
        for key, digest in self.equivalents.items():
            if actual.get(key) == digest:
                expected[key] = digest
        return expected


@dataclass(frozen=True)
class PlanBody:
    created_at: str
    expires_at: str
    tool_version: str
    environment: str
    engine: str
    metadata_schema: str
    target: PlanTarget
    desired: PlanDesired
    steps: tuple[Step, ...]
    policy: PolicyResult = NO_POLICY
    rehearsal: RehearsalResult = SKIPPED
    manages: tuple[str, ...] = ()  # opt-in kinds compared: "owners", "privileges" (apply verifies the same way)
    fleet: tuple[FleetTarget, ...] = ()  # a fleet plan: every database it may be applied to (target is the first)

    def is_for(self, system_identifier: str, database: str) -> bool:
        """Whether this plan was made for that database (its target, or a member of its fleet)."""
        pairs = {(self.target.system_identifier, self.target.database)}
        pairs |= {(m.system_identifier, m.database) for m in self.fleet}
        return (system_identifier, database) in pairs

    @property
    def snapshot_options(self) -> dict[str, bool]:
        """``inspect.snapshot`` keyword arguments that read the target as this plan compared it."""
        return {"owners": "owners" in self.manages, "privileges": "privileges" in self.manages}


@dataclass(frozen=True)
class Signature:
    """An Ed25519 signature over the plan id plus who signed, in which role and when (all signed)."""

    signer: str
    role: str  # planner or approver
    key: str  # "ssh-ed25519 AAAA..." without comment
    signed_at: str
    signature: str  # base64

    def to_json(self) -> dict[str, str]:
        return {"signer": self.signer, "role": self.role, "key": self.key, "signed_at": self.signed_at,
                "signature": self.signature}


@dataclass(frozen=True)
class Plan:
    id: str
    body: PlanBody
    signatures: tuple[Signature, ...] = ()

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]

    @property
    def hazards(self) -> list[tuple[Step, Hazard]]:
        return [(step, hazard) for step in self.body.steps for hazard in step.hazards]


_DIGESTED: dict[int, tuple[SchemaSnapshot, dict[str, str]]] = {}  # by id, the snapshot held: watch's live one
_DIGESTED_LOCK = threading.Lock()


def object_digests(snap: SchemaSnapshot | Mapping[tuple[str, str], str]) -> dict[str, str]:
    """Per-object digests: enough to name what differs later without carrying whole definitions. A snapshot's are
    remembered for the next call (watch plans against the same snapshot of live again and again: 20 ms each at
    1,000 tables) and shared, not copied (a map is 20 MB at 5,000 tables): callers only read them."""
    if isinstance(snap, SchemaSnapshot):
        with _DIGESTED_LOCK:
            found = _DIGESTED.pop(id(snap), None)
            if found is not None and found[0] is snap:
                _DIGESTED[id(snap)] = found  # the most recently used last
                return found[1]
        digests = _digests(snap.objects)
        with _DIGESTED_LOCK:
            if len(_DIGESTED) >= 2:
                _DIGESTED.pop(next(iter(_DIGESTED)))
            _DIGESTED[id(snap)] = (snap, digests)
        return digests
    return _digests(snap)


def _digests(snap: Mapping[tuple[str, str], str]) -> dict[str, str]:
    objects = Objects.of(snap)
    digests: dict[str, str] = {}  # by definition: many objects share one (each computed and held once)
    out: dict[str, str] = {}
    for (kind, name), definition in objects.sorted_items():
        digest = digests.get(definition)
        if digest is None:
            digest = digests[definition] = hashlib.sha256(definition.encode()).hexdigest()[:16]
        out[f"{kind} {name}"] = digest
    return out


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
