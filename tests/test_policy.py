"""Policies on real plans: every rule kind firing and not, scoping, conflicts, bad files, assertions,
change windows and the auto-apply gate."""

from __future__ import annotations

import json
import shutil
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reconciler.apply import ApplyOptions, apply_plan
from reconciler.cli import main
from reconciler.config import load_config
from reconciler.errors import ApplyError, ConfigError, RefusedError
from reconciler.pipeline import make_plan, open_servers, shadow_cache_dir
from reconciler.plan import Plan
from reconciler.planfile import read_plan
from reconciler.policy import Catalog, evaluate, load_policies, read_catalog
from reconciler.servers import EmbeddedCluster, Server, bindir_for_shadow, bindir_major, connect
from tests.conftest import fetch_one, run_sql

LIVE = """
CREATE SCHEMA billing;
CREATE TABLE billing.invoices (id bigint PRIMARY KEY, amount numeric NOT NULL, memo text);
CREATE TABLE public.notes (id bigint PRIMARY KEY, body text, scratch text);
INSERT INTO billing.invoices SELECT g, g, 'm' FROM generate_series(1, 3000) g;
INSERT INTO public.notes SELECT g, 'b', 's' FROM generate_series(1, 10) g;
ANALYZE billing.invoices; ANALYZE public.notes;
"""
DESIRED_DROPS = """
CREATE SCHEMA billing;
CREATE TABLE billing.invoices (id bigint PRIMARY KEY, amount numeric NOT NULL);
CREATE TABLE public.notes (id bigint PRIMARY KEY, body text);
"""


class PolicyRepo:
    def __init__(self, root: Path, database: str, server: Server) -> None:
        self.root, self.database = root, database
        (root / "schemas").mkdir()
        (root / "policies").mkdir()
        run_sql(database, LIVE)
        envs = "".join(
            f"""  {name}:
    database: "{database}"
    shadow: "{server.dsn}"
    require_signed_plans: false
    auto_apply: true
""" for name in ("staging", "production"))
        (root / "reconciler.yaml").write_text("environments:\n" + envs)

    def policies(self, text: str, name: str = "rules.yaml") -> None:
        (self.root / "policies" / name).write_text(textwrap.dedent(text))

    def schema(self, sql: str) -> None:
        (self.root / "schemas" / "schema.sql").write_text(sql)

    def plan(self, env: str = "production") -> Plan:
        config = load_config(self.root / "reconciler.yaml")
        environment = config.environment(env)
        with open_servers(config, environment) as servers:
            return make_plan(config, environment, servers).plan

    def cli(self, *args: str) -> int:
        return main(["--config", str(self.root / "reconciler.yaml"), *args])


@pytest.fixture
def prepo(tmp_path: Path, database: str, pg_server: Server) -> PolicyRepo:
    return PolicyRepo(tmp_path, database, pg_server)


BILLING_DENY = """\
rules:
  - id: no-billing-data-loss
    description: Never lose billing data in production
    environments: [production]
    action: deny
    change:
      hazards: [DATA_LOSS]
      objects: ["billing.*"]
"""


def test_change_rule_fires_scoped_by_environment_and_object(prepo: PolicyRepo, capsys: pytest.CaptureFixture[str]) -> None:
    prepo.policies(BILLING_DENY)
    prepo.schema(DESIRED_DROPS)
    plan = prepo.plan("production")
    (finding,) = plan.body.policy.findings
    assert (finding.rule, finding.file, finding.line, finding.severity) == ("no-billing-data-loss", "rules.yaml", 2, "deny")
    assert "drop_column billing.invoices.memo" in finding.subject  # public.notes.scratch is not billing
    assert prepo.plan("staging").body.policy.findings == ()  # environment scoping
    out_file = prepo.root / "p.json"
    assert prepo.cli("plan", "--env", "production", "-o", str(out_file)) == 3
    captured = capsys.readouterr()
    assert "BLOCKED by policy no-billing-data-loss" in captured.out
    assert "denied: deny: no-billing-data-loss (rules.yaml:2)" in captured.err
    assert prepo.cli("apply", str(out_file)) == 3  # apply refuses the blocked plan too
    assert "refused (policy): denied by no-billing-data-loss" in capsys.readouterr().err
    assert fetch_one(prepo.database, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'memo'") == 1


def test_conflicting_rules_deny_wins_and_approvals_merge(prepo: PolicyRepo) -> None:
    prepo.policies(BILLING_DENY + """\
  - id: drops-need-two
    description: Drops need two reviewers
    action: require_approval
    count: 2
    groups: [dba]
    change: {kinds: ["drop_*"]}
  - id: locks-need-three
    description: Locks need three
    action: require_approval
    count: 3
    groups: [sre]
    change: {hazards: [ACCESS_EXCLUSIVE_LOCK]}
  - id: just-saying
    description: Notes change
    action: warn
    change: {objects: ["public.notes*"]}
""")
    prepo.schema(DESIRED_DROPS)
    plan = prepo.plan("production")
    policy = plan.body.policy
    assert {f.severity for f in policy.findings} == {"deny", "require_approval", "warn"}
    assert policy.denied and policy.approvals == 3 and set(policy.groups) == {"dba", "sre"}
    with pytest.raises(RefusedError, match="policy"):
        apply_plan(plan, prepo.database, ApplyOptions(environment="production", metadata_schema="reconciler"))
    staging = prepo.plan("staging").body.policy  # no deny there; the approvals still merge
    assert not staging.denied and staging.approvals == 3 and set(staging.groups) == {"dba", "sre"}


def test_required_approvals_from_policy_are_enforced_at_apply(prepo: PolicyRepo, capsys: pytest.CaptureFixture[str]) -> None:
    prepo.policies("""\
rules:
  - id: drops-need-review
    description: Drops need a reviewer
    action: require_approval
    count: 1
    change: {kinds: [drop_column]}
""")
    prepo.schema(DESIRED_DROPS)
    plan = prepo.plan("staging")
    with pytest.raises(RefusedError, match=r"\(approvals\): 0 of 1"):
        apply_plan(plan, prepo.database, ApplyOptions(environment="staging", metadata_schema="reconciler"))
    out_file = prepo.root / "p.json"
    assert prepo.cli("plan", "--env", "staging", "-o", str(out_file)) == 2
    capsys.readouterr()
    assert prepo.cli("show", str(out_file)) == 0
    assert "Approvals: 0 of 1 given; 1 more needed" in capsys.readouterr().out


def test_data_rule_fires_only_above_the_threshold(prepo: PolicyRepo) -> None:
    prepo.policies("""\
rules:
  - id: big-locks
    description: No exclusive lock on a table over 1,000 rows
    action: deny
    data: {hazards: [ACCESS_EXCLUSIVE_LOCK], min_rows: 1000}
""")
    prepo.schema(DESIRED_DROPS)
    findings = prepo.plan().body.policy.findings
    assert [f.subject for f in findings] == ["step 1 (drop_column billing.invoices.memo)"]  # 3,000 rows, not notes' 10
    assert "billing.invoices (~3,000 rows" in findings[0].message
    prepo.policies("""\
rules:
  - id: big-locks
    description: No exclusive lock on a table over 100 MB
    action: deny
    data: {hazards: [ACCESS_EXCLUSIVE_LOCK], min_bytes: 100 MB}
""")
    assert prepo.plan().body.policy.findings == ()


def _catalog(database: str) -> Catalog:
    with connect(database) as conn:
        return read_catalog(conn, exclude_schemas=("reconciler",))


SCHEMA_RULES = """\
rules:
  - {id: pk, description: pk, action: deny, schema: {require_primary_key: true}}
  - id: names
    description: names
    action: warn
    schema: {naming: {tables: "[a-z_]+", columns: "[a-z_]+", indexes: "[a-z_]+_(idx|pkey|key)"}}
  - {id: types, description: types, action: deny, schema: {forbidden_types: [json, money, timestamp without time zone]}}
  - {id: created, description: created, action: warn, schema: {required_columns: [created_at], exclude: [public.ok*]}}
  - {id: fk-index, description: fk, action: warn, schema: {foreign_keys_indexed: true}}
  - {id: comments, description: comments, action: warn, schema: {table_comments: true, tables: [public.parent]}}
"""


def test_schema_rules_fire_and_do_not_fire(prepo: PolicyRepo, second_database: str) -> None:
    prepo.policies(SCHEMA_RULES)
    rules = load_policies(prepo.root / "policies")
    run_sql(second_database, """
        CREATE TABLE parent (id int PRIMARY KEY, created_at timestamptz);
        CREATE TABLE "Child" (id int, parent_id int REFERENCES parent (id), doc json, paid money, at timestamp,
                              "camelCol" text, created_at timestamptz);
        CREATE INDEX child_doc ON "Child" (id);
        CREATE TABLE ok_table (id int PRIMARY KEY, parent_id int REFERENCES parent (id));
        CREATE INDEX ok_table_parent_idx ON ok_table (parent_id);
    """)
    findings = {(f.rule, f.subject) for f in evaluate(rules, "any", (), _catalog(second_database)).findings}
    assert findings == {
        ("pk", 'table public.Child'),
        ("names", "table public.Child"),
        ("names", "column public.Child.camelCol"),
        ("names", "index public.child_doc"),
        ("types", "column public.Child.doc"),
        ("types", "column public.Child.paid"),
        ("types", "column public.Child.at"),
        ("fk-index", "foreign key public.Child.Child_parent_id_fkey"),
        ("comments", "table public.parent"),
    }
    run_sql(second_database, """COMMENT ON TABLE parent IS 'parents'; DROP TABLE "Child"; """)
    remaining = {(f.rule, f.subject) for f in evaluate(rules, "any", (), _catalog(second_database)).findings}
    assert remaining == set()


def test_lint_checks_the_desired_schema_without_a_database(prepo: PolicyRepo, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           request: pytest.FixtureRequest) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(prepo.root / "cache"))
    shadow_dir = shadow_cache_dir(bindir_major(bindir_for_shadow(None)))
    request.addfinalizer(lambda: shutil.rmtree(EmbeddedCluster(shadow_dir, durable=False).datadir, ignore_errors=True))
    prepo.policies(SCHEMA_RULES)
    prepo.schema("CREATE TABLE good (id int PRIMARY KEY, created_at timestamptz);\nCOMMENT ON TABLE good IS 'g';\n")
    assert prepo.cli("lint") == 0
    assert "No findings" in capsys.readouterr().out
    prepo.schema("CREATE TABLE bad (id int, doc json);\n")
    assert prepo.cli("lint") == 3
    out = capsys.readouterr().out
    assert "deny: pk (rules.yaml:2) table public.bad: has no primary key" in out
    assert "deny: types (rules.yaml:7) column public.bad.doc: uses forbidden type json" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules:\n  - id: x\n    description: d\n    action: deny\n    change: {hazards: [DATA_LOST]}\n",
         "p.yaml:5:24: rules.0.change.hazards.0: 'DATA_LOST' is not one of"),
        ("rules:\n  - id: x\n    description: d\n    action: deny\n    colour: red\n    change: {kinds: [x]}\n",
         "p.yaml:5:5: rules.0.colour: unknown key 'colour' (known keys: id, description, environments, action,"),
        ("rules:\n  - id: x\n    description: d\n    action: require_approval\n    count: two\n    change: {kinds: [x]}\n",
         "p.yaml:5:12: rules.0.count: 'two' is not of type 'integer'"),
        ("rules:\n  - id: x\n    description: d\n    action: warn\n    schema: {naming: {tables: '[a-z'}}\n",
         "p.yaml:5:31: rules.0.schema.naming.tables: '[a-z' is not a 'regex'"),
        ("rules:\n  - id: x\n    description: d\n    action: warn\n",
         "p.yaml:2:5: rules.0: needs exactly one of change, schema, data, assert, window, auto_apply (has none)"),
        ("rules:\n  - id: x\n   description: d\n", "p.yaml:3:4: invalid YAML"),
        ("rules:\n  - {id: a, description: d, action: warn, change: {kinds: [x]}}\n"
         "  - {id: a, description: d, action: warn, change: {kinds: [y]}}\n",
         "p.yaml:3: rule id 'a' is already used in p.yaml:2"),
    ],
)
def test_bad_policy_files_name_file_line_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_policies(tmp_path)
    assert expected in str(err.value)


def test_precondition_refuses_and_postcondition_fails_the_run(prepo: PolicyRepo) -> None:
    prepo.policies("""\
rules:
  - id: notes-not-empty
    description: There are notes before we touch them
    action: deny
    assert: {when: before, sql: "SELECT count(*) > 100 FROM public.notes", timeout: 2s}
""")
    prepo.schema(DESIRED_DROPS)
    plan = prepo.plan("staging")
    options = ApplyOptions(environment="staging", metadata_schema="reconciler")
    with pytest.raises(RefusedError, match=r"precondition notes-not-empty\): returned False, not true \(rules.yaml:2\)"):
        apply_plan(plan, prepo.database, options)
    prepo.policies("""\
rules:
  - id: memo-kept
    description: The memo column must survive
    action: deny
    assert: {when: after, sql: "SELECT count(*) = 1 FROM information_schema.columns WHERE column_name = 'memo'"}
""")
    plan = prepo.plan("staging")
    with pytest.raises(ApplyError, match=r"failed: after the steps: postcondition memo-kept \(rules.yaml:2\) returned False"):
        apply_plan(plan, prepo.database, options)
    assert fetch_one(prepo.database, "SELECT status FROM reconciler.runs") == "failed"
    assert "memo-kept" in str(fetch_one(prepo.database, "SELECT error FROM reconciler.runs"))


def test_change_window_that_closes_between_plan_and_apply(prepo: PolicyRepo, capsys: pytest.CaptureFixture[str]) -> None:
    prepo.policies("""\
rules:
  - id: weekday-mornings
    description: Weekday mornings only
    action: deny
    window: {days: [mon, tue, wed, thu, fri], hours: "08-12"}
""")
    prepo.schema(DESIRED_DROPS)
    plan = prepo.plan("staging")  # planning is allowed at any time
    (window,) = plan.body.policy.windows
    assert window.describe() == "mon,tue,wed,thu,fri 08:00-12:00 UTC"
    tuesday_9 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    tuesday_13 = datetime(2026, 11, 24, 13, 0, tzinfo=UTC)
    with pytest.raises(RefusedError, match=r"\(window\): outside the change window weekday-mornings"):
        apply_plan(plan, prepo.database, ApplyOptions(environment="staging", metadata_schema="reconciler", now=tuesday_13))
    result = apply_plan(plan, prepo.database, ApplyOptions(environment="staging", metadata_schema="reconciler",
                                                           now=tuesday_9))
    assert result.status == "applied"


def test_auto_apply_gate(prepo: PolicyRepo, capsys: pytest.CaptureFixture[str]) -> None:
    prepo.policies("""\
rules:
  - id: staging-gate
    description: Staging applies alone only without data loss and on small tables
    environments: [staging]
    action: deny
    auto_apply: {hazards: [DATA_LOSS], max_rows: 1000}
""")
    prepo.schema(DESIRED_DROPS)
    assert prepo.cli("apply", "--auto", "--env", "staging") == 3
    assert "auto-apply gate holds this plan back: staging-gate" in capsys.readouterr().err
    # an additive change on the small table passes the gate
    prepo.schema(LIVE.split("INSERT")[0].replace("scratch text", "scratch text, extra text"))
    assert prepo.cli("apply", "--auto", "--env", "staging") == 0
    assert fetch_one(prepo.database, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'extra'") == 1
    # the gate is scoped to staging: production (auto_apply in this test config) applies the drops
    prepo.schema(DESIRED_DROPS)
    assert prepo.cli("apply", "--auto", "--env", "production") == 0
    assert fetch_one(prepo.database, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'memo'") == 0


def test_findings_are_recorded_in_the_plan_file(prepo: PolicyRepo, capsys: pytest.CaptureFixture[str]) -> None:
    prepo.policies(BILLING_DENY.replace("action: deny", "action: warn"))
    prepo.schema(DESIRED_DROPS)
    out_file = prepo.root / "p.json"
    assert prepo.cli("plan", "--env", "production", "-o", str(out_file), "--format", "markdown") == 2
    md = capsys.readouterr().out
    assert "| `no-billing-data-loss` (rules.yaml:2) | **warn** |" in md
    data = json.loads(out_file.read_text())
    assert data["body"]["policy"]["findings"][0]["rule"] == "no-billing-data-loss"
    assert read_plan(out_file).body.policy.findings[0].line == 2
