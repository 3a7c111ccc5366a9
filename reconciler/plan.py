"""The plan: a value you save, show, sign and apply.

A plan file is ``{"format", "id", "body", "signatures"}`` where ``id`` is the sha256 of the
canonical JSON of ``body`` (sorted keys, no spaces, UTF-8). Signatures sit outside the body so
adding one never changes the id. Files are validated by ``formats/plan.schema.json`` on read
and on write.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema

from . import __version__
from .errors import PlanFileError
from .inspect import Objects, SchemaSnapshot, TargetIdentity
from .online import describe as describe_rewrite
from .online import duration as describe_seconds
from .online import online_rewrites, span
from .policy import Assertion, Finding, PolicyResult, Window, approvals_needed
from .rehearsal import SKIPPED, RehearsalResult
from .safety import Hazard, LintFinding, Step
from .source import DesiredSchema

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


def build_plan(
    *,
    environment: str,
    engine: str,
    metadata_schema: str,
    identity: TargetIdentity,
    live: SchemaSnapshot,
    desired_source: DesiredSchema,
    desired: SchemaSnapshot,
    steps: Sequence[Step],
    ttl: timedelta = timedelta(days=7),
    now: datetime | None = None,
    policy: PolicyResult | None = None,
    rehearsal: RehearsalResult = SKIPPED,
    manages: Sequence[str] = (),
    equivalents: Mapping[tuple[str, str], str] | None = None,
) -> Plan:
    created = now or datetime.now(UTC)
    body = PlanBody(
        created_at=iso_utc(created),
        expires_at=iso_utc(created + ttl),
        tool_version=__version__,
        environment=environment,
        engine=engine,
        metadata_schema=metadata_schema,
        target=PlanTarget(
            system_identifier=identity.system_identifier,
            database=identity.database,
            server_version=identity.server_version,
            fingerprint=live.fingerprint,
            objects=object_digests(live),
        ),
        desired=PlanDesired(
            fingerprint=desired_source.fingerprint,
            schema_fingerprint=desired.fingerprint,
            git_commit=desired_source.git_commit,
            dirty=desired_source.dirty,
            files=tuple((f.path, f.sha256) for f in desired_source.files),
            objects=object_digests(desired),
            equivalents=object_digests(equivalents or {}),
        ),
        steps=tuple(steps),
        policy=policy or NO_POLICY,
        rehearsal=rehearsal,
        manages=tuple(sorted(manages)),
    )
    return Plan(id=content_id(body_to_json(body)), body=body)


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- JSON --------------------------------------------------------------------------------------

def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_id(body_json: Mapping[str, Any]) -> str:
    """sha256 of ``canonical_json(body_json)``, hashed piece by piece (a 5,000-table plan's body is 10 MB of JSON,
    twice over as text and as bytes when encoded whole)."""
    digest = hashlib.sha256()
    for piece in _canonical_pieces(body_json):
        digest.update(piece)
    return "sha256:" + digest.hexdigest()


_SLICE = 2000  # entries of a large dict encoded at a time


def _canonical_pieces(value: Any) -> Iterator[bytes]:
    """``canonical_json(value)`` in consecutive pieces: a dict entry by entry (a large one ``_SLICE`` entries at a
    time), anything else whole. Keys sorted, separators as ``json.dumps`` writes them."""
    if not isinstance(value, dict) or not value or not all(type(key) is str for key in value):
        yield canonical_json(value)  # json.dumps turns other keys into strings: left to it
        return
    keys = sorted(value)
    yield b"{"
    if len(keys) > _SLICE:
        for start in range(0, len(keys), _SLICE):
            if start:
                yield b","
            yield canonical_json({key: value[key] for key in keys[start:start + _SLICE]})[1:-1]
    else:
        for position, key in enumerate(keys):
            yield (b"," if position else b"") + canonical_json(key) + b":"
            yield from _canonical_pieces(value[key])
    yield b"}"


def _as_dict(mapping: Mapping[str, str]) -> dict[str, str]:
    """A plan's per-object digests for JSON: the dict itself when it is one (100,000 of them: no copy)."""
    return mapping if isinstance(mapping, dict) else dict(mapping)


def body_to_json(body: PlanBody) -> dict[str, Any]:
    data: dict[str, Any] = {
        "created_at": body.created_at,
        "expires_at": body.expires_at,
        "tool_version": body.tool_version,
        "environment": body.environment,
        "engine": body.engine,
        "metadata_schema": body.metadata_schema,
        "target": {
            "system_identifier": body.target.system_identifier,
            "database": body.target.database,
            "server_version": body.target.server_version,
            "fingerprint": body.target.fingerprint,
            "objects": _as_dict(body.target.objects),
        },
        "desired": {
            "fingerprint": body.desired.fingerprint,
            "schema_fingerprint": body.desired.schema_fingerprint,
            "git_commit": body.desired.git_commit,
            "dirty": body.desired.dirty,
            "files": [{"path": p, "sha256": s} for p, s in body.desired.files],
            "objects": _as_dict(body.desired.objects),
            **({"equivalents": dict(body.desired.equivalents)} if body.desired.equivalents else {}),
        },
        "steps": [step_to_json(s) for s in body.steps],
        "policy": policy_to_json(body.policy),
        "rehearsal": {
            "status": body.rehearsal.status,
            "differences": list(body.rehearsal.differences),
            "failed_step": body.rehearsal.failed_step,
            "error": body.rehearsal.error,
            "server_version": body.rehearsal.server_version,
            "duration_ms": round(body.rehearsal.duration_ms, 1),
        },
    }
    if body.manages:  # absent when nothing opt-in is managed: such plans keep the ids they always had
        data["manages"] = list(body.manages)
    if body.fleet:
        data["fleet"] = [{"system_identifier": m.system_identifier, "database": m.database, "label": m.label}
                         for m in body.fleet]
    return data


def policy_to_json(p: PolicyResult) -> dict[str, Any]:
    return {
        "findings": [
            {"rule": f.rule, "file": f.file, "line": f.line, "severity": f.severity, "subject": f.subject,
             "message": f.message, "count": f.count, "groups": list(f.groups)} for f in p.findings
        ],
        "approvals": p.approvals,
        "groups": list(p.groups),
        "assertions": [
            {"rule": a.rule, "file": a.file, "line": a.line, "when": a.when, "sql": a.sql, "timeout": a.timeout,
             "action": a.action} for a in p.assertions
        ],
        "windows": [
            {"rule": w.rule, "file": w.file, "line": w.line, "days": list(w.days), "hours": list(w.hours) if w.hours else None}
            for w in p.windows
        ],
        "auto_apply_blocked_by": list(p.auto_apply_blocked_by),
    }


def policy_from_json(d: Mapping[str, Any]) -> PolicyResult:
    return PolicyResult(
        findings=tuple(Finding(f["rule"], f["file"], f["line"], f["severity"], f["subject"], f["message"], f["count"],
                               tuple(f["groups"])) for f in d["findings"]),
        approvals=d["approvals"],
        groups=tuple(d["groups"]),
        assertions=tuple(Assertion(a["rule"], a["file"], a["line"], a["when"], a["sql"], a["timeout"], a["action"])
                         for a in d["assertions"]),
        windows=tuple(Window(w["rule"], w["file"], w["line"], tuple(w["days"]),
                             (w["hours"][0], w["hours"][1]) if w["hours"] else None) for w in d["windows"]),
        auto_apply_blocked_by=tuple(d["auto_apply_blocked_by"]),
    )


def step_to_json(s: Step) -> dict[str, Any]:
    return {
        "index": s.index,
        "phase": s.phase,
        "sql": s.sql,
        "kind": s.kind,
        "object": s.object,
        "tables": list(s.tables),
        "transactional": s.transactional,
        "hazards": [
            {"code": h.code, "message": h.message, "table": h.table, "rows": h.rows, "bytes": h.bytes} for h in s.hazards
        ],
        "rollback_sql": s.rollback_sql,
        "reversible": s.reversible,
        "lock_timeout": s.lock_timeout,
        "statement_timeout": s.statement_timeout,
        "lint": [{"rule": f.rule, "message": f.message} for f in s.lint],
        "original_sql": s.original_sql,
        "identity": list(s.identity),
    }


def step_from_json(s: Mapping[str, Any]) -> Step:
    return Step(
        index=s["index"],
        phase=s["phase"],
        sql=s["sql"],
        kind=s["kind"],
        object=s["object"],
        tables=tuple(s["tables"]),
        transactional=s["transactional"],
        hazards=tuple(Hazard(h["code"], h["message"], h["table"], h["rows"], h["bytes"]) for h in s["hazards"]),
        rollback_sql=s["rollback_sql"],
        reversible=s["reversible"],
        lock_timeout=s["lock_timeout"],
        statement_timeout=s["statement_timeout"],
        lint=tuple(LintFinding(f["rule"], f["message"]) for f in s["lint"]),
        original_sql=s["original_sql"],
        identity=tuple(s.get("identity", ())),
    )


def body_from_json(data: Mapping[str, Any]) -> PlanBody:
    t, d = data["target"], data["desired"]
    return PlanBody(
        created_at=data["created_at"],
        expires_at=data["expires_at"],
        tool_version=data["tool_version"],
        environment=data["environment"],
        engine=data["engine"],
        metadata_schema=data["metadata_schema"],
        target=PlanTarget(t["system_identifier"], t["database"], t["server_version"], t["fingerprint"], dict(t["objects"])),
        desired=PlanDesired(
            fingerprint=d["fingerprint"],
            schema_fingerprint=d["schema_fingerprint"],
            git_commit=d["git_commit"],
            dirty=d["dirty"],
            files=tuple((f["path"], f["sha256"]) for f in d["files"]),
            objects=dict(d["objects"]),
            equivalents=dict(d.get("equivalents", {})),
        ),
        steps=tuple(step_from_json(s) for s in data["steps"]),
        policy=policy_from_json(data["policy"]),
        rehearsal=RehearsalResult(
            status=data["rehearsal"]["status"], differences=tuple(data["rehearsal"]["differences"]),
            failed_step=data["rehearsal"]["failed_step"], error=data["rehearsal"]["error"],
            server_version=data["rehearsal"]["server_version"], duration_ms=data["rehearsal"]["duration_ms"],
        ),
        manages=tuple(data.get("manages", ())),
        fleet=tuple(FleetTarget(m["system_identifier"], m["database"], m["label"]) for m in data.get("fleet", ())),
    )


def plan_to_json(plan: Plan) -> dict[str, Any]:
    return {"format": FORMAT, "id": plan.id, "body": body_to_json(plan.body), "signatures": [s.to_json() for s in plan.signatures]}


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(resources.files("reconciler.formats").joinpath("plan.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)  # checked against its metaschema by tests/test_formats.py
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@cache
def _accepts() -> Callable[[Any], bool]:
    """The quick yes for a whole plan: jsonschema walks thousands of steps with full error bookkeeping (seconds on
    GitLab's plan); fastjsonschema compiles the same schema to plain Python once. jsonschema words the errors."""
    # the schema uses nothing draft 7 lacks; its $id is a name, not a URL fastjsonschema could resolve refs against
    loaded = _validator().schema
    assert isinstance(loaded, Mapping)
    schema = {k: v for k, v in loaded.items() if k != "$id"}
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    compiled = fastjsonschema.compile(schema)  # where it is stricter, jsonschema has the last word

    def accepts(data: Any) -> bool:
        try:
            compiled(data)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    return accepts


QUICK_CHECK_STEPS = 10  # plans with more steps than this are checked by fastjsonschema first
QUICK_CHECK_OBJECTS = 2000  # and those whose snapshots hold more objects than this (GitLab's: 27,000 each side)


_DIGESTS = re.compile(r"(?:[0-9a-f]{16}\n)*")  # digests, each on a line of its own
_OBJECT_MAPS = (("target", "objects"), ("desired", "objects"), ("desired", "equivalents"))


def _accepts_quickly(data: dict[str, Any]) -> bool:
    """The compiled check, with the snapshots' digest maps (30,000 entries at 1,000 tables: most of a big plan)
    checked by one compiled pattern over their values a line each instead of entry by entry (30 ms against 3 ms at
    1,000 tables). Their schema: string values of 16 hex digits (a line per value, so no value spans two)."""
    body = dict(data["body"])
    for side, name in _OBJECT_MAPS:
        part = body.get(side)
        if not isinstance(part, dict) or name not in part:
            continue
        digests = part[name]
        if not isinstance(digests, dict) or not _all_digests(digests.values()):
            return False
        body[side] = {**part, name: {}}
    return _accepts()({**data, "body": body})


def _all_digests(values: Iterable[Any]) -> bool:
    """A few thousand at a time: the text of them all would be another 3 MB at 5,000 tables."""
    found = iter(values)
    while chunk := list(itertools.islice(found, 4096)):
        if not all(isinstance(v, str) for v in chunk):
            return False
        lines = "\n".join(chunk) + "\n"
        if len(lines) != 17 * len(chunk) or _DIGESTS.fullmatch(lines) is None:
            return False
    return True


def _object_count(body: dict[str, Any]) -> int:
    """How many entries the snapshots' digest maps hold: what makes a plan with few steps slow to check entry by
    entry (a few steps on GitLab's schema: 0.4 s in jsonschema)."""
    count = 0
    for side, name in _OBJECT_MAPS:
        part = body.get(side)
        found = part.get(name) if isinstance(part, dict) else None
        count += len(found) if isinstance(found, dict) else 0
    return count


def validate(data: Any, source: str) -> None:
    """Refuse a plan document that does not match the schema, naming the field that is wrong. jsonschema takes
    about 3 ms a step and 10 ms per thousand snapshot entries; fastjsonschema 40 ms to compile the schema (once per
    process), then next to nothing: a small plan is checked by jsonschema alone. Either way, a plan it rejects is
    explained by jsonschema, naming the field."""
    body = data.get("body") if isinstance(data, dict) else None
    steps = body.get("steps") if isinstance(body, dict) else None
    quick = isinstance(body, dict) and isinstance(steps, list) and (
        len(steps) > QUICK_CHECK_STEPS or _object_count(body) > QUICK_CHECK_OBJECTS)
    errors = [] if quick and _accepts_quickly(data) else sorted(
        _validator().iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        # jsonschema checks "date-time" only with an optional package; check it here instead.
        stamps = [("body/created_at", data["body"]["created_at"]), ("body/expires_at", data["body"]["expires_at"])]
        stamps += [(f"signatures/{i}/signed_at", sig["signed_at"]) for i, sig in enumerate(data["signatures"])]
        for where, value in stamps:
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise PlanFileError(f"{source}: invalid plan file at {where}: not an ISO 8601 date-time") from None
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise PlanFileError(f"{source}: invalid plan file at {where}: {err.message}{more}")


def plan_from_json(data: Any, source: str) -> Plan:
    validate(data, source)
    signatures = tuple(
        Signature(signer=s["signer"], role=s["role"], key=s["key"], signed_at=s["signed_at"], signature=s["signature"])
        for s in data["signatures"]
    )
    return Plan(id=data["id"], body=body_from_json(data["body"]), signatures=signatures)


def read_plan(path: Path) -> Plan:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanFileError(f"plan file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanFileError(f"cannot read plan file {path}: {exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PlanFileError(f"{path}:{exc.lineno}:{exc.colno}: not JSON: {exc.msg}") from None
    return plan_from_json(data, str(path))


def _plan_pieces(data: dict[str, Any]) -> Iterator[str]:
    """The plan's text, indented for people, in pieces: each digest map (``_OBJECT_MAPS``: a digest per object, 8 MB
    at 5,000 tables) on one line of its own, encoded when it is written (json's indenting encoder is Python, its
    compact one C: 70 ms against 20 ms at 1,000 tables; and the whole text is never held at once)."""
    body = data.get("body")
    if not isinstance(body, dict):
        yield json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)
        return
    maps: dict[str, dict[str, Any]] = {}
    outline = dict(body)
    for side, name in _OBJECT_MAPS:
        part = outline.get(side)
        if isinstance(part, dict) and isinstance(part.get(name), dict):
            mark = f"reconciler-{side}-{name}-{secrets.token_hex(16)}"
            maps[json.dumps(mark)] = part[name]
            outline[side] = {**part, name: mark}
    text = json.dumps({**data, "body": outline}, indent=2, sort_keys=True, ensure_ascii=False)
    at = 0
    for found in re.finditer("|".join(map(re.escape, maps)), text) if maps else ():
        yield text[at:found.start()]
        yield json.dumps(maps[found.group(0)], sort_keys=True, ensure_ascii=False)
        at = found.end()
    yield text[at:]


def write_plan(plan: Plan, path: Path) -> None:
    """Validate, then replace the file atomically so a reader never sees half a plan."""
    data = plan_to_json(plan)
    validate(data, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for piece in _plan_pieces(data):
                fh.write(piece)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise



# --- rendering ---

@dataclass(frozen=True)
class ApprovalView:
    """What a reviewer needs to know: who approved, what is still missing, the command to approve."""

    given: tuple[str, ...]
    required: int
    missing_groups: tuple[str, ...]
    command: str

    @property
    def complete(self) -> bool:
        return len(self.given) >= self.required and not self.missing_groups

    def describe(self) -> str:
        text = f"{len(self.given)} of {self.required} given" + (f" ({', '.join(self.given)})" if self.given else "")
        missing = max(0, self.required - len(self.given))
        if missing:
            text += f"; {missing} more needed"
        if self.missing_groups:
            text += f"; still needed from group(s): {', '.join(self.missing_groups)}"
        return text


def _indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line if line.strip() else line for line in text.strip().splitlines())


def phases(plan: Plan) -> list[tuple[int, list[Step]]]:
    grouped: dict[int, list[Step]] = {}
    for step in plan.body.steps:
        grouped.setdefault(step.phase, []).append(step)
    return sorted(grouped.items())


def phase_label(steps: Sequence[Step]) -> str:
    if not steps[0].transactional:
        return "outside a transaction"
    return "one transaction" if len(steps) > 1 else "its own transaction"


def summary_line(plan: Plan) -> str:
    steps = plan.body.steps
    if not steps:
        return f"No changes: {plan.body.target.database} already matches the desired schema."
    codes = sorted({h.code for _, h in plan.hazards})
    hazards = f", hazards: {', '.join(codes)}" if codes else ", no hazards"
    count = len({s.phase for s in steps})
    denied = plan.body.policy.denied
    if denied:
        return (f"BLOCKED by policy {', '.join(sorted({f.rule for f in denied}))}: {len(steps)} step(s) "
                f"for {plan.body.target.database} may not be applied.")
    return (f"{len(steps)} step{'s' if len(steps) != 1 else ''} in {count} phase{'s' if count != 1 else ''} "
            f"to apply to {plan.body.target.database}{hazards}.")


POLICY_BLOCKS = "Policy blocks this plan: approvals do not change that; change the schema or the policy."


def render_text(plan: Plan, approvals: ApprovalView | None = None) -> str:
    b = plan.body
    git = f"at {b.desired.git_commit[:12]}" if b.desired.git_commit else "not in git"
    lines = [
        f"Plan {plan.short_id}  ({plan.id})",
        f"  environment  {b.environment}",
        f"  target       {b.target.database} (PostgreSQL {b.target.server_version}, system {b.target.system_identifier})",
        f"  desired      {len(b.desired.files)} file(s) {git}{' + uncommitted changes' if b.desired.dirty else ''}",
        f"  created      {b.created_at} by reconciler {b.tool_version} ({b.engine})",
        *([f"  manages      {', '.join(b.manages)}"] if b.manages else []),
        "",
        summary_line(plan),
    ]
    if b.steps:
        lines += ["", f"Rehearsal: {b.rehearsal.describe()}"]
    rewrites = online_rewrites(b.steps)
    if rewrites:
        lines += ["", "Online rewrites (expand, backfill, cut-over, contract; apply --hold-contract stops before the "
                  "contract):"]
        lines += [f"  {describe_rewrite(r)}" for r in rewrites]
    if b.policy.findings:
        lines += ["", "Policy findings:"]
        lines += [f"  {f}" for f in b.policy.findings]
    if b.policy.windows:
        lines += ["", "Apply only within: " + "; ".join(w.describe() for w in b.policy.windows)]
    for phase, steps in phases(plan):
        lines += ["", f"  Phase {phase}: {phase_label(steps)}"]
        for step in steps:
            lines.append(f"  {step.index:>4}. {step.kind} {step.object}")
            for hazard in step.hazards:
                lines.append(f"        ! {hazard.code}: {hazard.message}")
            for finding in step.lint:
                lines.append(f"        ~ squawk {finding.rule}: {finding.message}")
            if step.original_sql:
                lines.append("        (rewritten from the diff engine's: " + " ".join(step.original_sql.split())[:100] + ")")
            if not step.reversible:
                lines.append("        (irreversible: no SQL undoes this step)")
            if step.kind == "backfill":
                lines.append("        (apply runs it over the table's pages a range at a time, each its own short "
                             "transaction; `reconciler backfill` sees, pauses or throttles it)")
            lines.append(_indent(step.sql.rstrip(";") + ";", "        "))
    if plan.signatures:
        lines += ["", "Signatures:"]
        lines += [f"  {s.role:<8} {s.signer}  {s.signed_at}" for s in plan.signatures]
    if approvals is not None and plan.body.steps:
        lines += ["", f"Approvals: {approvals.describe()}"]
        if plan.body.policy.denied:
            lines.append(f"  {POLICY_BLOCKS}")
        elif not approvals.complete:
            lines.append(f"  approve with: {approvals.command}")
    return "\n".join(lines) + "\n"


MARKDOWN_SQL_BUDGET = 40_000  # characters of SQL in a comment; GitHub refuses comments over 65,536


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _policy_status(plan: Plan, approvals: ApprovalView | None) -> str:
    policy = plan.body.policy
    if policy.denied:
        return "**blocked** by " + ", ".join(f"`{rule}`" for rule in sorted({f.rule for f in policy.denied}))
    required = approvals.required if approvals is not None else policy.approvals
    groups = approvals.missing_groups if approvals is not None else policy.groups
    given = len(approvals.given) if approvals is not None else 0
    warnings = sum(1 for f in policy.findings if f.severity == "warn")
    if approvals is not None and approvals.complete and (required or given):
        status = f"approved ({given} of {required})"
    elif required or groups:
        status = f"needs {approvals_needed(required, groups)}"
        status += f" ({given} given)" if approvals is not None else ""
    else:
        status = "no approvals needed"
    return status + (f", {_plural(warnings, 'warning')}" if warnings else "")


def _rehearsal_status(plan: Plan) -> str:
    rehearsal = plan.body.rehearsal
    if rehearsal.status == "converged":
        return "converged"
    if rehearsal.status == "failed":
        return f"**failed** at step {rehearsal.failed_step}"
    if rehearsal.status == "skipped":
        return "not rehearsed"
    return f"**did not converge** ({_plural(len(rehearsal.differences), 'object')} differ)"


def markdown_summary(plan: Plan, approvals: ApprovalView | None = None) -> str:
    """The line a reviewer reads first: size, hazards, what policy requires, whether the rehearsal converged."""
    b = plan.body
    if not b.steps:
        return f"**No changes**: `{b.target.database}` already matches the desired schema."
    hazards = plan.hazards
    codes = sorted({h.code for _, h in hazards})
    return " · ".join([
        f"**{_plural(len(b.steps), 'step')}** in {_plural(len({s.phase for s in b.steps}), 'phase')}",
        f"{_plural(len(hazards), 'hazard')} ({', '.join(codes)})" if hazards else "no hazards",
        "policy: " + _policy_status(plan, approvals),
        "rehearsal: " + _rehearsal_status(plan),
    ])


def _markdown_steps(plan: Plan) -> list[str]:
    """The steps' SQL by phase, folded; past the size budget only each step's kind and object (the plan file has all)."""
    b = plan.body
    phase_count = len({s.phase for s in b.steps})
    out = ["<details><summary>" + f"{_plural(len(b.steps), 'step')} in {_plural(phase_count, 'phase')} (SQL)</summary>",
           "", "```sql"]
    budget, omitted = MARKDOWN_SQL_BUDGET, 0
    for phase, steps in phases(plan):
        out.append(f"-- Phase {phase}: {phase_label(steps)}")
        for step in steps:
            out.append(f"-- {step.index}. {step.kind} {step.object}" + ("" if step.reversible else " (irreversible)"))
            statement = step.sql.rstrip(";") + ";"
            if len(statement) <= budget:
                out.append(statement)
                budget -= len(statement)
            else:
                budget, omitted = 0, omitted + 1
        out.append("")
    out[-1:] = ["```", ""]  # the fence replaces the blank line after the last phase
    if omitted:
        out += [f"The SQL of {_plural(omitted, 'step')} is left out to keep this comment short: "
                "`reconciler show PLAN` prints it all.", ""]
    return [*out, "</details>"]


def render_markdown(plan: Plan, approvals: ApprovalView | None = None) -> str:
    """A pull-request comment: the summary line, then hazards and policy findings, the steps folded,
    approvals given and needed, and the command that adds one."""
    b = plan.body
    git = f"at `{b.desired.git_commit[:12]}`" if b.desired.git_commit else "not in git"
    out = [
        f"### pg-reconciler plan `{plan.short_id}` for **{b.environment}**",
        "",
        markdown_summary(plan, approvals),
        "",
        f"Target `{b.target.database}` (PostgreSQL {b.target.server_version}); desired schema {git}"
        + (" with uncommitted changes" if b.desired.dirty else "") + ".",
    ]
    if len(b.fleet) > 1:
        out += ["", f"Fleet: {_plural(len(b.fleet), 'database')} in this state: "
                + ", ".join(f"`{m.label}`" for m in b.fleet[:20]) + (", ..." if len(b.fleet) > 20 else "") + "."]
    if plan.hazards:
        out += ["", "#### Hazards", "", "| step | hazard | object | why |", "|---:|---|---|---|"]
        for step, hazard in plan.hazards:
            out.append(f"| {step.index} | `{hazard.code}` | `{_cell(step.object)}` | {_cell(hazard.message)} |")
    rewrites = online_rewrites(b.steps)
    if rewrites:
        out += ["", "#### Online rewrites", "", "| rewrite | rows | expand | backfill | cut-over | contract |",
                "|---|---:|---|---|---|---|"]
        for r in rewrites:
            took = f" (about {describe_seconds(r.seconds)})" if r.seconds else ""
            change = f" {_cell(r.change)}" if r.change else ""
            out.append(f"| `{_cell(r.column)}`{change} | {'' if r.rows is None else f'{r.rows:,}'} | {span(r.expand)} | "
                       f"{span(r.backfill)}{took} | {span(r.cutover)}: one short transaction, locks "
                       f"{_cell(', '.join(f'`{t}`' for t in r.locks))} | {span(r.contract)} |")
    if b.policy.findings or b.policy.windows or b.policy.auto_apply_blocked_by:
        out += ["", "#### Policy"]
    if b.policy.findings:
        out += ["", "| policy | severity | subject | finding |", "|---|---|---|---|"]
        for f in b.policy.findings:
            need = f" (needs {approvals_needed(f.count, f.groups)})" if f.count or f.groups else ""
            out.append(f"| `{f.rule}` ({f.file}:{f.line}) | **{f.severity}**{need} | {_cell(f.subject)} | {_cell(f.message)} |")
    if b.policy.windows:
        out += ["", "Applies only within: " + "; ".join(w.describe() for w in b.policy.windows) + "."]
    if b.policy.auto_apply_blocked_by:
        out += ["", "Never applied without a human: " + "; ".join(b.policy.auto_apply_blocked_by) + "."]
    findings = [(step, f) for step in b.steps for f in step.lint]
    if findings:
        out += ["", "#### Lint", "", "| step | squawk rule | message |", "|---:|---|---|"]
        out += [f"| {step.index} | `{f.rule}` | {_cell(f.message)} |" for step, f in findings]
    if b.steps:
        out += ["", f"Rehearsal: {b.rehearsal.describe()}.", "", *_markdown_steps(plan)]
    if plan.signatures or (approvals is not None and b.steps):
        out += ["", "#### Approvals"]
    if plan.signatures:
        counted = set(approvals.given) if approvals is not None else set()
        out += ["", "| signer | role | signed at |" + (" counts |" if approvals is not None else ""),
                "|---|---|---|" + ("---|" if approvals is not None else "")]
        for s in plan.signatures:
            counts = "" if approvals is None else (" yes |" if s.role == "approver" and s.signer in counted else " no |")
            out.append(f"| {_cell(s.signer)} | {s.role} | {s.signed_at} |{counts}")
    if approvals is not None and b.steps:
        out += ["", f"**Approvals:** {approvals.describe()}."]
        if b.policy.denied:
            out += ["", POLICY_BLOCKS]
        elif not approvals.complete:
            out += ["", "To approve, run:", "", "```sh", approvals.command, "```"]
    out += ["", f"<sub>Plan id `{plan.id}` · made {b.created_at} by reconciler {b.tool_version} · expires {b.expires_at}</sub>",
            ""]
    return "\n".join(out)


def render_json(plan: Plan, approvals: ApprovalView | None = None) -> str:
    return json.dumps(plan_to_json(plan), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render(plan: Plan, fmt: str, approvals: ApprovalView | None = None) -> str:
    renderers = {"text": render_text, "markdown": render_markdown, "json": render_json}
    return renderers[fmt](plan, approvals)
