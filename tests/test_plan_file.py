"""reconciler.plan: building, content id, writing, reading, validating and rendering plan files."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from reconciler import plan as planvalue
from reconciler import planfile as planlib
from reconciler.config import SafetyOptions
from reconciler.diff.base import Change
from reconciler.dsn import database_name
from reconciler.errors import PlanFileError
from reconciler.inspect import identity, live_facts, snapshot
from reconciler.plan import FORMAT, Plan, Signature
from reconciler.planfile import build_plan, plan_from_json, plan_to_json, read_plan, write_plan
from reconciler.policy import Finding, PolicyResult, Window
from reconciler.rehearsal import RehearsalResult
from reconciler.render import ApprovalView, markdown_summary, render, summary_line
from reconciler.render import markdown as markdown_module
from reconciler.safety import SafetySettings, compile_steps
from reconciler.servers import Server, connect, throwaway_database
from reconciler.source import load_source
from tests.conftest import run_sql

LIVE = "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE old (id int);"
DESIRED = "CREATE TABLE t (id int PRIMARY KEY, v text, note text); CREATE INDEX t_v_idx ON t (v);"
CHANGES = (
    Change("ALTER TABLE public.t ADD COLUMN note text -- café", "add_column", "public.t.note", "test"),
    Change("CREATE INDEX t_v_idx ON public.t USING btree (v)", "create_index", "public.t_v_idx", "test"),
    Change("CREATE INDEX CONCURRENTLY t_id_v ON public.t (id, v)", "create_index_concurrently", "public.t_id_v", "test"),
    Change("DROP TABLE public.old", "drop_table", "public.old", "test"),
)


def canonical_id(body: Any) -> str:
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.fixture(scope="module")
def built_plan(pg_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Plan, str]]:
    """One plan for the module (building it takes two databases), with the live database's name."""
    with throwaway_database(pg_server, "plan") as live_dsn, throwaway_database(pg_server, "plan") as desired_dsn:
        run_sql(live_dsn, LIVE)
        run_sql(desired_dsn, DESIRED)
        schemas = tmp_path_factory.mktemp("plan") / "schemas"
        schemas.mkdir()
        (schemas / "app.sql").write_text(DESIRED, encoding="utf-8")
        with connect(live_dsn) as conn:
            ident, live, facts = identity(conn), snapshot(conn), live_facts(conn)
        with connect(desired_dsn) as conn:
            desired = snapshot(conn)
        built = build_plan(
            environment="prod-é",
            engine="test",
            metadata_schema="reconciler",
            identity=ident,
            live=live,
            desired_source=load_source(schemas),
            desired=desired,
            # plain CREATE INDEX kept (concurrent_indexes off) so the plan has a BLOCKS_WRITES step
            steps=compile_steps(CHANGES, facts, SafetySettings(switches=SafetyOptions(concurrent_indexes=False))),
            now=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        )
        yield built, str(database_name(live_dsn))


@pytest.fixture
def plan(built_plan: tuple[Plan, str]) -> Plan:
    return built_plan[0]


def test_build_plan(built_plan: tuple[Plan, str]) -> None:
    plan, dbname = built_plan
    body = plan.body
    assert body.created_at == "2024-01-02T03:04:05Z"
    assert body.target.database == dbname
    assert body.target.fingerprint != body.desired.schema_fingerprint
    assert "table public.old" in body.target.objects
    assert "table public.old" not in body.desired.objects
    assert "index public.t_v_idx" in body.desired.objects
    assert [path for path, _ in body.desired.files] == ["app.sql"]
    assert [s.index for s in body.steps] == [1, 2, 3, 4]
    # the explicitly concurrent build over existing columns runs first, outside a transaction
    assert [(s.kind, s.transactional, s.phase) for s in body.steps] == [
        ("create_index_concurrently", False, 1), ("add_column", True, 2), ("create_index", True, 2), ("drop_table", True, 2)]
    assert {h.code for _, h in plan.hazards} == {"ACCESS_EXCLUSIVE_LOCK", "BLOCKS_WRITES", "DATA_LOSS"}


_SIGNATURE = Signature(
    signer="alice", role="approver", key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPyiUANo2V0jixIRL4E7JnU/+rUNyk6HPYpMZpM7K3RL",
    signed_at="2026-01-02T03:04:05Z", signature="c2lnbmF0dXJl",
)


def test_id_is_sha256_of_canonical_body(plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    write_plan(plan, path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == FORMAT
    assert data["id"] == plan.id == canonical_id(data["body"])
    assert plan.short_id == plan.id.removeprefix("sha256:")[:12]
    # Signatures live outside the body: adding one does not change the id.
    signed = Plan(id=plan.id, body=plan.body, signatures=(_SIGNATURE,))
    assert canonical_id(plan_to_json(signed)["body"]) == plan.id


def test_write_read_round_trip(plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "plan.json"
    write_plan(plan, path)
    assert read_plan(path) == plan
    signed = Plan(id=plan.id, body=plan.body, signatures=(_SIGNATURE,))
    write_plan(signed, path)
    assert read_plan(path) == signed
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary files left


def test_plan_file_is_indented_but_each_snapshot_on_one_line(plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    write_plan(plan, path)
    text = path.read_text()
    assert json.loads(text) == planlib.plan_to_json(plan)  # the same JSON as before, laid out differently
    for side in ("target", "desired"):
        objects = plan_to_json_objects(plan, side)
        assert objects, f"the example plan's {side} has objects"
        line = next(line for line in text.splitlines() if line.lstrip().startswith('"objects": '))
        assert line.strip().endswith(("},", "}"))  # the whole map on its line
        assert json.dumps(objects, sort_keys=True, ensure_ascii=False) in text
    assert text.startswith('{\n  "body": {\n')


def plan_to_json_objects(plan: Plan, side: str) -> dict[str, str]:
    found = planlib.plan_to_json(plan)["body"][side]["objects"]
    assert isinstance(found, dict)
    return found


def _set(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        node: Any = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return edit


def _delete(path: tuple[str | int, ...]) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        node: Any = data
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]

    return edit


@pytest.mark.parametrize(
    ("edit", "where", "why"),
    [
        (_set(("body", "steps", 0, "transactional"), "yes"), "body/steps/0/transactional", "is not of type 'boolean'"),
        (_set(("body", "steps", 2, "index"), 0), "body/steps/2/index", "less than the minimum"),
        (_set(("body", "target", "system_identifier"), 42), "body/target/system_identifier", "not of type 'string'"),
        (_delete(("body", "engine"),), "body", "'engine' is a required property"),
        (_delete(("body", "steps", 1, "rollback_sql")), "body/steps/1", "'rollback_sql' is a required property"),
        (_set(("format",), "reconciler.plan/v2"), "format", "'reconciler.plan/v1' was expected"),
        (_set(("id",), "md5:abc"), "id", "does not match"),
        (_set(("body", "steps", 3, "hazards", 0, "code"), "data loss"), "body/steps/3/hazards/0/code", "is not one of"),
        (_set(("body", "extra"), 1), "body", "Additional properties are not allowed"),
    ],
)
def test_read_refuses_invalid_plan(
    plan: Plan, tmp_path: Path, edit: Callable[[dict[str, Any]], None], where: str, why: str
) -> None:
    data = copy.deepcopy(plan_to_json(plan))
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PlanFileError) as info:
        read_plan(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid plan file at {where}: ")
    assert why in message


def test_read_refuses_malformed_created_at(plan: Plan, tmp_path: Path) -> None:
    # The schema declares created_at a date-time; a prefix that merely looks like one is not enough.
    data = plan_to_json(plan)
    data["body"]["created_at"] = "2024-01-02Tnot a time at all"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PlanFileError, match="invalid plan file at body/created_at"):
        read_plan(path)


def test_read_refuses_non_json(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{\n  "format": oops\n}\n', encoding="utf-8")
    with pytest.raises(PlanFileError, match=rf"^{path}:2:13: not JSON"):
        read_plan(path)


def test_read_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanFileError, match="does not exist"):
        read_plan(tmp_path / "nope.json")


def test_write_refuses_invalid_plan(plan: Plan, tmp_path: Path) -> None:
    broken = Plan(id="not-an-id", body=plan.body)
    path = tmp_path / "out" / "plan.json"
    with pytest.raises(PlanFileError, match="invalid plan file at id"):
        write_plan(broken, path)
    assert not path.parent.exists()


def _nodes(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    yield path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _nodes(item, (*path, key))


_REPLACEMENTS: tuple[Any, ...] = (None, True, False, 0, -1, 1.0, 2.5, "", "x", "sha256:" + "0" * 64, [], ["x", "x"],
                                  {}, {"x": 1})


def test_quick_check_never_accepts_what_the_schema_refuses(plan: Plan) -> None:
    """Every node of a signed plan replaced by values of every type, every member deleted, an unknown member added
    to every object: where jsonschema finds an error, the quick check says no as well."""
    valid = plan_to_json(Plan(id=plan.id, body=plan.body, signatures=(_SIGNATURE,)))
    accepts = planlib._accepts()
    assert accepts(valid)
    edits: list[Callable[[dict[str, Any]], None]] = []
    for path, value in _nodes(valid):
        if isinstance(value, dict):
            edits.append(_set((*path, "unknown_member"), 1))
        if path:
            edits.append(_delete(path))
            edits.extend(_set(path, r) for r in _REPLACEMENTS if r != value or type(r) is not type(value))
    refused = 0
    for edit in edits:
        data = copy.deepcopy(valid)
        edit(data)
        if any(planlib._validator().iter_errors(data)):
            refused += 1
            assert not accepts(data), data
    assert refused > len(edits) // 2


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
def test_render_contains_steps_hazards_and_summary(plan: Plan, fmt: str) -> None:
    out = render(plan, fmt)
    for change in CHANGES:
        assert change.sql in out
    assert "BLOCKS_WRITES" in out
    assert "DATA_LOSS" in out
    assert "ACCESS_EXCLUSIVE_LOCK" in out
    assert plan.id in out
    if fmt == "text":
        assert summary_line(plan) in out
        assert summary_line(plan) == (
            f"4 steps in 2 phases to apply to {plan.body.target.database}, "
            "hazards: ACCESS_EXCLUSIVE_LOCK, BLOCKS_WRITES, DATA_LOSS."
        )
    if fmt == "markdown":
        assert out.splitlines()[2] == markdown_summary(plan) == (
            "**4 steps** in 2 phases · 3 hazards (ACCESS_EXCLUSIVE_LOCK, BLOCKS_WRITES, DATA_LOSS) · "
            "policy: no approvals needed · rehearsal: not rehearsed"
        )


def test_render_json_parses_back(plan: Plan) -> None:
    data = json.loads(render(plan, "json"))
    assert data == plan_to_json(plan)
    assert plan_from_json(data, "rendered") == plan


_WARN = Finding("wide-rows", "rules.yaml", 4, "warn", "public.t", "a | pipe\nand a newline")
_NEEDS_DBA = Finding("locks-need-a-dba", "rules.yaml", 9, "require_approval", "step 4 (drop_table public.old)",
                     "Exclusive locks need a DBA", 2, ("dba",))
_DENY = Finding("no-drops", "rules.yaml", 14, "deny", "step 4 (drop_table public.old)", "Never drop tables")


def _reviewed(plan: Plan, *findings: Finding, signatures: tuple[Signature, ...] = ()) -> Plan:
    """The module's plan as a pull request would show it: policy findings, a converged rehearsal, signatures."""
    policy = PolicyResult(findings=findings, approvals=max((f.count for f in findings), default=0),
                          groups=tuple(g for f in findings for g in f.groups),
                          windows=(Window("weekdays", "rules.yaml", 20, ("mon", "tue"), (8, 16)),))
    body = dataclasses.replace(plan.body, policy=policy,
                               rehearsal=RehearsalResult("converged", server_version="18.1", duration_ms=42.0))
    return Plan(id=plan.id, body=body, signatures=signatures)


def test_markdown_is_a_pull_request_comment(plan: Plan) -> None:
    planner = dataclasses.replace(_SIGNATURE, signer="ci", role="planner")
    reviewed = _reviewed(plan, _WARN, _NEEDS_DBA, signatures=(planner, _SIGNATURE))
    view = ApprovalView(given=("alice",), required=2, missing_groups=("dba",),
                        command="reconciler approve plans/staging.json --key ~/.ssh/id_ed25519")
    md = render(reviewed, "markdown", view)
    lines = md.splitlines()
    assert lines[0] == f"### pg-reconciler plan `{plan.short_id}` for **prod-é**"
    assert lines[2] == ("**4 steps** in 2 phases · 3 hazards (ACCESS_EXCLUSIVE_LOCK, BLOCKS_WRITES, DATA_LOSS) · "
                        "policy: needs 2 approvals, at least 1 from dba (1 given), 1 warning · rehearsal: converged")
    # hazards and policy findings come before the folded steps, approvals after them
    order = [md.index(marker) for marker in ("#### Hazards", "#### Policy", "<details>", "```sql", "</details>",
                                              "#### Approvals", "```sh")]
    assert order == sorted(order)
    assert "| 4 | `DATA_LOSS` | `public.old` |" in md
    assert "| `locks-need-a-dba` (rules.yaml:9) | **require_approval** (needs 2 approvals, at least 1 from dba) |" in md
    assert "| a \\| pipe and a newline |" in md  # a cell stays one cell
    assert "Applies only within: " in md
    steps = md[md.index("<details>"):md.index("</details>")]
    assert "<summary>4 steps in 2 phases (SQL)</summary>" in steps
    assert all(change.sql in steps for change in CHANGES)
    assert "| ci | planner | 2026-01-02T03:04:05Z | no |" in md and "| alice | approver | 2026-01-02T03:04:05Z | yes |" in md
    assert "**Approvals:** 1 of 2 given (alice); 1 more needed; still needed from group(s): dba." in md
    assert "```sh\nreconciler approve plans/staging.json --key ~/.ssh/id_ed25519\n```" in md
    assert plan.id in lines[-1]


def test_markdown_of_a_blocked_plan_offers_no_approval(plan: Plan) -> None:
    view = ApprovalView(given=(), required=2, missing_groups=("dba",), command="reconciler approve p.json --key k")
    md = render(_reviewed(plan, _DENY, _NEEDS_DBA), "markdown", view)
    assert " · policy: **blocked** by `no-drops` · " in md.splitlines()[2]
    assert "reconciler approve" not in md and "approvals do not change that" in md


def test_markdown_when_approved_and_when_unchanged(plan: Plan) -> None:
    view = ApprovalView(given=("alice", "bob"), required=2, missing_groups=(), command="reconciler approve p.json --key k")
    md = render(_reviewed(plan, _NEEDS_DBA), "markdown", view)
    assert " · policy: approved (2 of 2) · rehearsal: converged" in md.splitlines()[2]
    assert "reconciler approve" not in md
    empty = Plan(id=plan.id, body=dataclasses.replace(plan.body, steps=()))
    md = render(empty, "markdown")
    assert md.splitlines()[2] == f"**No changes**: `{plan.body.target.database}` already matches the desired schema."
    assert "<details>" not in md and "#### Hazards" not in md


def test_markdown_leaves_out_sql_past_its_budget(plan: Plan, monkeypatch: pytest.MonkeyPatch) -> None:
    """GitHub refuses comments over 65,536 characters: past the budget a step shows its kind and object only."""
    monkeypatch.setattr(markdown_module, "MARKDOWN_SQL_BUDGET", len(CHANGES[2].sql) + 1)
    md = render(plan, "markdown")
    assert CHANGES[2].sql in md  # step 1 fits
    assert CHANGES[0].sql not in md and "-- 2. add_column public.t.note" in md
    assert "The SQL of 3 steps is left out" in md


def test_id_hashed_piece_by_piece_is_the_id_of_the_whole_body(plan: Plan) -> None:
    body = planlib.body_to_json(plan.body)
    big = {f"column public.t{i:05d}.c": hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(4999, -1, -1)}
    body = {**body, "target": {**body["target"], "objects": big}, "ünïcode": {"\u2028": None, "b": [1, {"z": 2, "a": ""}]}}
    whole = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pieces = list(planlib._canonical_pieces(body))
    assert len(pieces) > 3 and max(map(len, pieces)) < len(whole) // 2  # never the whole text at once
    assert b"".join(pieces) == whole
    assert planlib.content_id(body) == "sha256:" + hashlib.sha256(whole).hexdigest() == canonical_id(body)


def test_small_plans_are_checked_without_compiling_the_quick_check(plan: Plan) -> None:
    """Compiling fastjsonschema's check costs a process 40 ms: a plan of a few steps on a small schema is checked by
    jsonschema alone (errors worded the same), a big one, or one whose snapshots are big, by the compiled check
    first."""
    valid = plan_to_json(Plan(id=plan.id, body=plan.body, signatures=(_SIGNATURE,)))
    assert 0 < len(valid["body"]["steps"]) <= planlib.QUICK_CHECK_STEPS
    planlib._accepts.cache_clear()
    planlib.validate(valid, "small.json")
    assert planlib._accepts.cache_info().currsize == 0
    broken = copy.deepcopy(valid)
    broken["body"]["steps"][0]["phase"] = "first"
    with pytest.raises(PlanFileError, match=r"small\.json: invalid plan file at body/steps/0/phase"):
        planlib.validate(broken, "small.json")
    big = copy.deepcopy(valid)
    big["body"]["steps"] = [valid["body"]["steps"][0]] * (planlib.QUICK_CHECK_STEPS + 1)
    planlib.validate(big, "big.json")
    assert planlib._accepts.cache_info().currsize == 1
    wide = copy.deepcopy(valid)  # a few steps on a big schema: its snapshots' entries are what jsonschema is slow on
    objects = {f"table public.t{i}": "0123456789abcdef" for i in range(planlib.QUICK_CHECK_OBJECTS + 1)}
    wide["body"]["target"]["objects"] = objects
    planlib._accepts.cache_clear()
    planlib.validate(wide, "wide.json")
    assert planlib._accepts.cache_info().currsize == 1
    wide["body"]["target"]["objects"] = {**objects, "table public.t0": "not-a-digest"}
    with pytest.raises(PlanFileError, match=r"wide\.json: invalid plan file at body/target/objects/table public\.t0"):
        planlib.validate(wide, "wide.json")
    for side, field in (("target", "objects"), ("desired", "objects")):  # the digests, checked apart, still checked
        wrong = copy.deepcopy(big)
        name = next(iter(wrong["body"][side][field]))
        for bad in ("not-a-digest", "0123456789abcdef\n0123456789abcdef", "0123456789abcde", 16):
            wrong["body"][side][field][name] = bad
            with pytest.raises(PlanFileError, match=rf"big\.json: invalid plan file at body/{side}/{field}/"):
                planlib.validate(wrong, "big.json")


def test_a_snapshots_digests_are_remembered() -> None:
    from reconciler.inspect import SchemaSnapshot

    live = SchemaSnapshot({("table", "public.a"): "a", ("table", "public.b"): "b"})
    first = planvalue.object_digests(live)
    for other in range(3):  # other snapshots in between: the one used last stays remembered
        planvalue.object_digests(SchemaSnapshot({("table", f"public.t{other}"): "t"}))
        assert planvalue.object_digests(live) is first
    assert first == planvalue.object_digests(dict(live.objects))  # what a mapping that is no snapshot gets
    assert len(planvalue._DIGESTED) == 2 and planvalue._DIGESTED[id(live)][0] is live


def test_the_first_screen_of_the_comment_answers_the_four_questions(plan: Plan) -> None:
    """Before any SQL, parsed as GitHub parses it (CommonMark with tables): how risky and which rule says so, what
    blocks whom (lock mode, who waits, on which table), who must approve, and which plan this is."""
    from markdown_it import MarkdownIt

    policy = PolicyResult(findings=(Finding("locks-need-a-dba", "policies/changes.yaml", 12, "require_approval",
                                            "step 2", "exclusive locks need a DBA", 2, ("dba",)),),
                          approvals=2, groups=("dba",))
    reviewed = Plan(id=plan.id, body=dataclasses.replace(plan.body, policy=policy), signatures=(_SIGNATURE,))
    comment = render(reviewed, "markdown", ApprovalView(given=("alice",), required=2, missing_groups=("dba",),
                                                        command="reconciler approve plan.json"))
    tokens = MarkdownIt("commonmark").enable("table").parse(comment)
    first_table = next(i for i, t in enumerate(tokens) if t.type == "table_open")
    assert not [t for t in tokens[:first_table] if t.type == "fence"]  # no SQL before it
    cells = [t.content for t in tokens[first_table:] if t.type == "inline"]
    rows = dict(zip(cells[2:cells.index("**Plan**") + 1:2], cells[3:cells.index("**Plan**") + 2:2], strict=True))
    # DROP TABLE's DATA_LOSS outranks the policy's require_approval
    assert rows["**Risk**"] == "**critical**: hazard `DATA_LOSS` (step 4, public.old)"
    # built without the pipeline: no estimates
    assert rows["**Blocks**"] == ("phase 2 (steps 2-4, one transaction, not estimated): public.old ACCESS EXCLUSIVE "
                                  "(reads and writes wait, ~0 rows, 0 B); public.t ACCESS EXCLUSIVE (reads and writes "
                                  "wait, ~0 rows, 16.0 kB)")
    assert rows["**Approvals**"] == "1 of 2 given (alice); 1 more needed; still needed from group(s): dba"
    assert rows["**Plan**"] == f"`{plan.id}`, alice (approver)"
    text = render(reviewed, "text")
    assert "  risk       critical (set by hazard DATA_LOSS, step 4, public.old)" in text, text
    assert text.index("Review:") < text.index("Phase 1")

    commands = render(Plan(id=plan.id, body=dataclasses.replace(plan.body, policy=PolicyResult(findings=(
        *policy.findings, Finding("fks-indexed", "schema.yaml", 24, "warn", "foreign key public.t.fk", "no index")),
        approvals=2, groups=("dba",)))),
        "github").splitlines()
    # on no file: the steps here name no desired line, and a finding about the schema as a whole names none either
    assert "::warning title=policy locks-need-a-dba (require_approval)%3A step 2::exclusive locks need a DBA (needs 2 " \
           "approvals, at least 1 from dba)" in commands, commands
    assert "::warning title=policy fks-indexed (warn)%3A foreign key public.t.fk::no index" in commands, commands

    without_drop = Plan(id=plan.id, body=dataclasses.replace(
        plan.body, policy=policy, steps=tuple(s for s in plan.body.steps if s.kind != "drop_table")))
    cells = [t.content for t in MarkdownIt("commonmark").enable("table").parse(render(without_drop, "markdown"))
             if t.type == "inline"]
    assert "**high**: policy `locks-need-a-dba` (policies/changes.yaml:12)" in cells
    assert "2 needed (from group(s): dba)" in cells
