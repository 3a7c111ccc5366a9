"""The plan file: a plan's encoding, its content id, its validation, and reading and writing it.

A plan file is ``{"format", "id", "body", "signatures"}`` where ``id`` is the sha256 of the canonical JSON of
``body`` (sorted keys, no spaces, UTF-8). Signatures sit outside the body so adding one never changes the id.
Files are validated by ``formats/plan.schema.json`` on read and on write. ``build_plan`` makes a new plan, its id
taken from this encoding.
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
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema

from . import __version__
from .errors import PlanFileError
from .inspect import SchemaSnapshot, TargetIdentity
from .plan import (
    FORMAT,
    NO_POLICY,
    FleetTarget,
    Plan,
    PlanBody,
    PlanDesired,
    PlanTarget,
    Signature,
    iso_utc,
    object_digests,
)
from .policy import Assertion, Finding, PolicyResult, Window
from .rehearsal import SKIPPED, RehearsalResult
from .safety import Estimate, Hazard, LintFinding, SourceLine, Step
from .source import DesiredSchema


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
            folder=desired_source.folder,
        ),
        steps=tuple(steps),
        policy=policy or NO_POLICY,
        rehearsal=rehearsal,
        manages=tuple(sorted(manages)),
    )
    return Plan(id=content_id(body_to_json(body)), body=body)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_id(body_json: Mapping[str, Any]) -> str:
    """sha256 of ``canonical_json(body_json)``, hashed piece by piece (a 5,000-table plan's body is 10 MB of JSON,
    twice over as text and as bytes when encoded whole)."""
    digest = hashlib.sha256()
    for piece in _canonical_pieces(body_json):
        digest.update(piece)
    return "sha256:" + digest.hexdigest()


_BODY_IDS: dict[int, tuple[weakref.ref[PlanBody], str]] = {}
_BODY_IDS_LOCK = threading.Lock()


def body_id(body: PlanBody) -> str:
    """``content_id`` of a body, kept while the body lives: a fleet checks one plan's integrity for each of its
    databases, and a big body takes a while to hash."""
    with _BODY_IDS_LOCK:
        kept = _BODY_IDS.get(id(body))
    if kept is not None and kept[0]() is body:
        return kept[1]
    digest = content_id(body_to_json(body))
    key = id(body)

    def forget(_: object) -> None:
        with _BODY_IDS_LOCK:
            _BODY_IDS.pop(key, None)

    with _BODY_IDS_LOCK:
        _BODY_IDS[key] = (weakref.ref(body, forget), digest)
    return digest


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
            **({"folder": body.desired.folder} if body.desired.folder else {}),
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
        **({"source": {"path": s.source.path, "line": s.source.line, "commit": s.source.commit}} if s.source else {}),
        **({"estimate": {"class": e.work_class, "work": e.work, "seconds": round(e.seconds, 3), "basis": e.basis,
                         "table": e.table}} if (e := s.estimate) else {}),
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
        source=SourceLine(s["source"]["path"], s["source"]["line"], s["source"]["commit"]) if s.get("source") else None,
        estimate=Estimate(e["class"], e["work"], e["seconds"], e["basis"], e["table"]) if (e := s.get("estimate")) else None,
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
            folder=d.get("folder", ""),
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
