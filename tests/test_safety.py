"""The safety compiler on real databases with rows: every hazard code, every rewrite, phases,
timeouts and retries, data checks, rollback SQL and squawk findings."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import threading
import time
from pathlib import Path

import pytest

from reconciler import inspect
from reconciler.apply import ApplyOptions, ApplyResult, apply_plan
from reconciler.config import load_config
from reconciler.diff.base import Change
from reconciler.errors import ApplyError, ReconcilerError, RefusedError
from reconciler.pipeline import make_plan, open_servers
from reconciler.plan import Plan
from reconciler.render import render_text
from reconciler.safety import HazardCode, Step, compile_steps
from reconciler.servers import Server, connect
from tests.conftest import fetch_one, run_sql

BASE = """
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE accounts (id bigint PRIMARY KEY, name text, code varchar(10), score int, legacy text);
CREATE INDEX accounts_legacy_idx ON accounts (legacy);
CREATE TABLE visits (id bigint PRIMARY KEY, account_id bigint, mood mood NOT NULL DEFAULT 'happy', note text);
"""
DATA = """
INSERT INTO accounts SELECT g, 'n' || g, 'c' || g, g, 'l' FROM generate_series(1, 2000) g;
INSERT INTO visits SELECT g, 1 + g % 2000, 'happy', NULL FROM generate_series(1, 5000) g;
ANALYZE accounts; ANALYZE visits;
"""


class Case:
    """A live database loaded with BASE and DATA, planned against a desired schema by the real pipeline."""

    def __init__(self, root: Path, database: str, server: Server) -> None:
        self.root, self.database, self.server = root, database, server
        run_sql(database, BASE + DATA)

    def plan(self, desired: str, *, safety: str = "", env_extra: str = "") -> Plan:
        schemas = self.root / "schemas"
        schemas.mkdir(exist_ok=True)
        (schemas / "schema.sql").write_text(desired)
        (self.root / "reconciler.yaml").write_text(
            textwrap.dedent(f"""\
                environments:
                  test:
                    database: "{self.database}"
                    shadow: "{self.server.dsn}"
                    require_signed_plans: false
                """) + textwrap.indent(textwrap.dedent(env_extra), "    ") + textwrap.dedent(safety))
        config = load_config(self.root / "reconciler.yaml")
        env = config.environment("test")
        with open_servers(config, env) as servers:
            return make_plan(config, env, servers).plan

    def apply(self, plan: Plan, **options: float) -> ApplyResult:
        return apply_plan(plan, self.database, ApplyOptions(environment="test", metadata_schema="reconciler", **options))

    def converged(self, desired: str) -> bool:
        return self.plan(desired).body.steps == ()


@pytest.fixture
def case(tmp_path: Path, database: str, pg_server: Server) -> Case:
    return Case(tmp_path, database, pg_server)


def step(plan: Plan, kind: str, obj: str | None = None) -> Step:
    found = [s for s in plan.body.steps if s.kind == kind and (obj is None or s.object == obj)]
    assert found, f"no {kind} {obj or ''} step in:\n{render_text(plan)}"
    return found[0]


def codes(s: Step) -> set[str]:
    return {h.code for h in s.hazards}


def desired_with(*replacements: tuple[str, str], extra: str = "") -> str:
    text = BASE
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return text + extra


# --- hazards ---------------------------------------------------------------------------------------

def test_data_loss_names_the_table_and_its_size(case: Case) -> None:
    plan = case.plan(desired_with((", legacy text", ""), ("CREATE INDEX accounts_legacy_idx ON accounts (legacy);", "")))
    drop = step(plan, "drop_column", "public.accounts.legacy")
    (loss,) = [h for h in drop.hazards if h.code == "DATA_LOSS"]
    assert loss.table == "public.accounts" and loss.rows == 2000 and loss.bytes and loss.bytes > 0
    assert "~2,000 rows" in loss.message
    assert not drop.reversible and drop.rollback_sql is None
    plan = case.plan(BASE.split("CREATE TABLE visits")[0])
    assert "DATA_LOSS" in codes(step(plan, "drop_table", "public.visits"))


def test_table_rewrite_for_type_change_and_volatile_default_but_not_for_widening(case: Case) -> None:
    plan = case.plan(desired_with(("score int", "score bigint"), ("code varchar(10)", "code varchar(40)"),
                                  ("note text)", "note text, seen_at timestamptz DEFAULT clock_timestamp())")))
    assert "TABLE_REWRITE" in codes(step(plan, "alter_column_type", "public.accounts.score"))
    assert "TABLE_REWRITE" not in codes(step(plan, "alter_column_type", "public.accounts.code"))
    assert "TABLE_REWRITE" in codes(step(plan, "add_column", "public.visits.seen_at"))
    plan = case.plan(desired_with(("code varchar(10)", "code text")))  # binary coercible
    assert "TABLE_REWRITE" not in codes(step(plan, "alter_column_type", "public.accounts.code"))


def test_table_rewrite_for_a_binary_coercible_type_that_gives_a_length(case: Case) -> None:
    """text -> char(n) / varchar(n) casts without a function, but the length coercion runs on every value: the
    table is rewritten (its relfilenode changes), and the plan says so."""
    def relfilenode() -> object:
        return fetch_one(case.database, "SELECT relfilenode FROM pg_class WHERE oid = 'accounts'::regclass")

    for new_type in ("char(12)", "varchar(40)"):
        plan = case.plan(desired_with(("name text,", f"name {new_type},")))
        assert "TABLE_REWRITE" in codes(step(plan, "alter_column_type", "public.accounts.name")), new_type
        before = relfilenode()
        assert case.apply(plan).status == "applied"
        assert relfilenode() != before, new_type
        run_sql(case.database, "ALTER TABLE accounts ALTER COLUMN name TYPE text")
    plan = case.plan(desired_with(("code varchar(10)", "code text")))  # no length: kept in place
    before = relfilenode()
    assert "TABLE_REWRITE" not in codes(step(plan, "alter_column_type", "public.accounts.code"))
    assert case.apply(plan).status == "applied" and relfilenode() == before


def test_dropping_an_index_without_concurrently_takes_an_exclusive_lock(case: Case) -> None:
    desired = desired_with(("CREATE INDEX accounts_legacy_idx ON accounts (legacy);", ""))
    plain = case.plan(desired, safety="safety:\n  concurrent_index_drops: false\n")
    drop = step(plain, "drop_index", "public.accounts_legacy_idx")
    assert {"INDEX_DROPPED", "ACCESS_EXCLUSIVE_LOCK"} <= codes(drop)
    assert [h.table for h in drop.hazards if h.code == "ACCESS_EXCLUSIVE_LOCK"] == ["public.accounts"]
    online = step(case.plan(desired), "drop_index_concurrently", "public.accounts_legacy_idx")
    assert codes(online) == {"INDEX_DROPPED"}


def test_lock_hazards(case: Case) -> None:
    plan = case.plan(desired_with(("note text)", "note text, extra text)")))
    assert "ACCESS_EXCLUSIVE_LOCK" in codes(step(plan, "add_column", "public.visits.extra"))
    plain = case.plan(desired_with(extra="CREATE INDEX visits_note_idx ON visits (note);\n"),
                      safety="safety:\n  concurrent_indexes: false\n")
    assert "BLOCKS_WRITES" in codes(step(plain, "create_index", "public.visits_note_idx"))
    scan = case.plan(desired_with(("name text,", "name text NOT NULL,")), safety="safety:\n  safe_not_null: false\n")
    assert "FULL_SCAN_UNDER_LOCK" in codes(step(scan, "set_not_null", "public.accounts.name"))
    dropped = case.plan(desired_with(("CREATE INDEX accounts_legacy_idx ON accounts (legacy);", "")))
    assert "INDEX_DROPPED" in codes(step(dropped, "drop_index_concurrently", "public.accounts_legacy_idx"))


def test_authz_and_extension_changes(case: Case) -> None:
    plan = case.plan(BASE + "ALTER TABLE accounts ENABLE ROW LEVEL SECURITY;\n"
                            "CREATE POLICY accounts_read ON accounts FOR SELECT USING (true);\n"
                            "CREATE EXTENSION IF NOT EXISTS pg_trgm;\n")
    assert any("AUTHZ_CHANGE" in codes(s) for s in plan.body.steps)
    assert "AUTHZ_CHANGE" in codes(step(plan, "create_policy"))
    assert "EXTENSION_CHANGE" in codes(step(plan, "create_extension", "pg_trgm"))


def test_the_json_schemas_list_every_hazard_code_and_no_other() -> None:
    """A plan file may carry, and a policy may name, exactly the hazards the compiler knows."""
    formats = Path(__file__).resolve().parents[1] / "reconciler" / "formats"
    plan_schema = json.loads((formats / "plan.schema.json").read_text())
    policy_schema = json.loads((formats / "policy.schema.json").read_text())
    hazard = plan_schema["properties"]["body"]["properties"]["steps"]["items"]["properties"]["hazards"]["items"]
    assert hazard["properties"]["code"]["enum"] == [c.value for c in HazardCode]
    assert policy_schema["$defs"]["hazard"]["enum"] == [c.value for c in HazardCode]


def test_statistics_reset_and_replica_identity_change(case: Case) -> None:
    """A type or collation change in place rewrites nothing but discards the column's statistics; a replica identity
    change alters what logical replication sends (and with NOTHING, UPDATE and DELETE fail on a published table)."""
    plan = case.plan(desired_with(("code varchar(10)", "code varchar(20)"), ("name text,", 'name text COLLATE "C",'),
                                  extra="ALTER TABLE visits REPLICA IDENTITY FULL;\n"))
    retyped = step(plan, "alter_column_type", "public.accounts.code")
    assert {"ACCESS_EXCLUSIVE_LOCK", "STATISTICS_RESET"} <= codes(retyped)  # and CORRECTNESS before PostgreSQL 16
    assert "TABLE_REWRITE" not in codes(retyped)  # varchar(10) -> (20) rewrites nothing
    assert any("ANALYZE public.accounts (code)" in h.message and h.rows == 2000 for h in retyped.hazards)
    assert "STATISTICS_RESET" in {c for s in plan.body.steps if s.object == "public.accounts.name" for c in codes(s)}
    assert any("REPLICA_IDENTITY_CHANGE" in codes(s) for s in plan.body.steps if "visits" in s.object)


def test_correctness_found_in_live_data_at_plan_time(case: Case) -> None:
    run_sql(case.database, "UPDATE accounts SET name = NULL WHERE id <= 3; UPDATE accounts SET code = 'dup' WHERE id <= 4;"
                           "UPDATE accounts SET score = -1 WHERE id <= 5; UPDATE visits SET account_id = 99999 WHERE id <= 6;"
                           "UPDATE visits SET note = 'x' || id; UPDATE visits SET note = 'oops' WHERE id <= 7")
    plan = case.plan(desired_with(
        ("name text,", "name text NOT NULL,"), ("code varchar(10)", "code varchar(10) UNIQUE"),
        ("score int", "score int CHECK (score >= 0)"), ("account_id bigint", "account_id bigint REFERENCES accounts (id)"),
    ))
    messages = [h.message for s in plan.body.steps for h in s.hazards if h.code == "CORRECTNESS"]
    assert any(m.startswith("3 rows violating CHECK") or m.startswith("3 rows with NULL in name") for m in messages), messages
    assert any(m.startswith("1 duplicate key values") for m in messages), messages  # one duplicated value ('dup')
    assert any(m.startswith("5 rows violating CHECK accounts_score_check") for m in messages), messages
    assert any(m.startswith("6 rows whose account_id match no row of public.accounts") for m in messages), messages
    retype = case.plan(desired_with(("note text)", "\n-- reconciler: using note::int\nnote int)")))
    (bad,) = [h for h in step(retype, "alter_column_type", "public.visits.note").hazards if h.code == "CORRECTNESS"]
    if case.server.major_version >= 16:  # pg_input_is_valid
        assert bad.message.startswith("5,000 values of note that do not convert to int")
    else:
        assert bad.message == "existing values must convert to the new type (not checked before PostgreSQL 16)"
    with pytest.raises(RefusedError, match=r"new column public.visits.required .*is NOT NULL without a default"):
        case.plan(desired_with(("note text)", "note text, required text NOT NULL)")))


# --- rewrites --------------------------------------------------------------------------------------

def test_create_and_drop_index_concurrently(case: Case) -> None:
    desired = desired_with(("CREATE INDEX accounts_legacy_idx ON accounts (legacy);", ""),
                           extra="CREATE INDEX visits_account_idx ON visits (account_id);\n")
    plan = case.plan(desired)
    create = step(plan, "create_index_concurrently", "public.visits_account_idx")
    assert not create.transactional and create.sql.startswith("CREATE INDEX CONCURRENTLY")
    assert create.original_sql and "CONCURRENTLY" not in create.original_sql
    assert create.rollback_sql == 'DROP INDEX CONCURRENTLY IF EXISTS "public"."visits_account_idx"'
    drop = step(plan, "drop_index_concurrently", "public.accounts_legacy_idx")
    assert not drop.transactional and drop.rollback_sql  # undone without blocking writes either
    assert drop.rollback_sql.startswith("CREATE INDEX CONCURRENTLY accounts_legacy_idx")
    assert drop.phase == max(s.phase for s in plan.body.steps)  # indexes are dropped last
    assert case.apply(plan).status == "applied"
    assert fetch_one(case.database, "SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
    assert case.converged(desired)


def test_foreign_key_and_check_validated_in_their_own_transactions(case: Case) -> None:
    desired = desired_with(("score int", "score int CHECK (score >= 0)"),
                           ("account_id bigint", "account_id bigint REFERENCES accounts (id)"))
    plan = case.plan(desired)
    fk = step(plan, "add_foreign_key", "public.visits.visits_account_id_fkey")
    assert fk.sql.lower().endswith("not valid")
    assert "ACCESS_EXCLUSIVE_LOCK" not in codes(fk)  # SHARE ROW EXCLUSIVE: reads go on
    validates = [s for s in plan.body.steps if s.kind == "validate_constraint"]
    assert {s.object for s in validates} == {"public.visits.visits_account_id_fkey", "public.accounts.accounts_score_check"}
    for v in validates:
        assert v.transactional and [s for s in plan.body.steps if s.phase == v.phase] == [v]
        assert v.phase > fk.phase
    assert case.apply(plan).status == "applied"
    assert fetch_one(case.database, "SELECT bool_and(convalidated) FROM pg_constraint WHERE contype IN ('f', 'c')") is True
    assert case.converged(desired)


def test_set_not_null_through_a_validated_check(case: Case) -> None:
    desired = desired_with(("name text,", "name text NOT NULL,"))
    plan = case.plan(desired)
    kinds = [(s.kind, s.phase) for s in plan.body.steps]
    assert [k for k, _ in kinds] == ["add_check_constraint", "validate_constraint", "set_not_null", "drop_constraint"]
    assert len({p for _, p in kinds}) == 3  # add | validate alone | set not null + drop check
    assert "IS NOT NULL) NOT VALID" in plan.body.steps[0].sql
    assert plan.body.steps[0].original_sql == 'alter table "public"."accounts" alter column "name" set not null'
    assert case.apply(plan).status == "applied"
    helper_checks = "SELECT count(*) FROM pg_constraint WHERE contype = 'c' AND conrelid = 'accounts'::regclass"
    assert fetch_one(case.database, helper_checks) == 0  # the helper CHECK is gone
    assert fetch_one(case.database, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'accounts'::regclass "
                                    "AND attname = 'name'") is True
    assert case.converged(desired)


def test_unique_on_existing_table_builds_its_index_concurrently(case: Case) -> None:
    desired = desired_with(("code varchar(10)", "code varchar(10) UNIQUE"))
    plan = case.plan(desired)
    build = step(plan, "create_index_concurrently", "public.accounts_code_key")
    attach = step(plan, "add_unique_constraint", "public.accounts.accounts_code_key")
    assert build.phase < attach.phase and "using index" in attach.sql.lower()
    assert case.apply(plan).status == "applied"
    assert case.converged(desired)


def test_new_enum_values_are_added_in_place_without_a_rewrite(case: Case) -> None:
    desired = desired_with(("('happy', 'sad')", "('calm', 'happy', 'sad', 'angry')"))
    before = fetch_one(case.database, "SELECT pg_relation_filenode('visits')")
    plan = case.plan(desired)
    adds = [s for s in plan.body.steps if s.kind == "add_enum_value"]
    assert [s.sql for s in adds] == [
        """ALTER TYPE "public"."mood" ADD VALUE 'calm' BEFORE 'happy'""", """ALTER TYPE "public"."mood" ADD VALUE 'angry'"""]
    assert all(not s.transactional for s in adds) and adds[0].phase == 1
    assert not any(s.kind in ("create_enum", "rename_type", "alter_column_type") for s in plan.body.steps)
    # the engine's DROP DEFAULT and SET DEFAULT around its recast go with it: the column's default stays as it is
    assert [s.kind for s in plan.body.steps] == ["add_enum_value", "add_enum_value"], [s.sql for s in plan.body.steps]
    assert "set default" in (adds[0].original_sql or "").lower()
    # a default that does change (to a value added now) is still set, once the value is committed
    moved = case.plan(desired_with(("('happy', 'sad')", "('calm', 'happy', 'sad', 'angry')"),
                                   ("DEFAULT 'happy'", "DEFAULT 'calm'")))
    (default,) = [s for s in moved.body.steps if s.kind == "set_default"]
    assert "'calm'" in default.sql and default.phase > max(s.phase for s in moved.body.steps if s.kind == "add_enum_value")
    assert case.apply(plan).status == "applied"
    assert fetch_one(case.database, "SELECT pg_relation_filenode('visits')") == before  # no table rewrite
    assert fetch_one(case.database, "SELECT count(*) FROM visits") == 5000
    assert case.converged(desired)
    # removing a value is not an addition: migra's recreate stays, and says it loses data
    shrink = case.plan(desired_with(("('happy', 'sad')", "('happy')")))
    assert "DATA_LOSS" in codes(step(shrink, "create_enum", "public.mood"))


def test_a_key_retyped_without_the_columns_referencing_it_says_so(case: Case) -> None:
    """Declarative: the referencing column keeps the type the desired SQL gives it, and the plan says what that
    leaves (a plain ALTER here: the table is small); retyped together, nothing is said."""
    keyed = ("CREATE TABLE tickets (id int PRIMARY KEY);\n"
             "CREATE TABLE replies (id int PRIMARY KEY, ticket_id int REFERENCES tickets (id));\n")
    run_sql(case.database, keyed + "INSERT INTO tickets SELECT generate_series(1, 10);")
    alone = case.plan(BASE + keyed.replace("tickets (id int", "tickets (id bigint"))
    (behind,) = [h for h in step(alone, "alter_column_type", "public.tickets.id").hazards if h.code == "FOREIGN_KEY_TYPE_MISMATCH"]
    assert behind.table == "public.replies" and "public.replies.ticket_id stays integer while id" in behind.message
    both = case.plan(BASE + keyed.replace("tickets (id int", "tickets (id bigint").replace("ticket_id int", "ticket_id bigint"))
    assert not [h for s in both.body.steps for h in s.hazards if h.code == "FOREIGN_KEY_TYPE_MISMATCH"], render_text(both)


def test_every_rewrite_can_be_switched_off(case: Case) -> None:
    desired = desired_with(("name text,", "name text NOT NULL,"), ("('happy', 'sad')", "('happy', 'sad', 'angry')"),
                           ("account_id bigint", "account_id bigint REFERENCES accounts (id)"),
                           ("CREATE INDEX accounts_legacy_idx ON accounts (legacy);", "CREATE INDEX a_name ON accounts (name);"))
    plan = case.plan(desired, safety=textwrap.dedent("""\
        safety:
          concurrent_indexes: false
          concurrent_index_drops: false
          not_valid_constraints: false
          safe_not_null: false
          enum_add_value: false
        """))
    kinds = {s.kind for s in plan.body.steps}
    assert {"create_index", "drop_index", "set_not_null", "create_enum"} <= kinds
    assert not kinds & {"create_index_concurrently", "drop_index_concurrently", "add_enum_value"}
    assert all(s.transactional for s in plan.body.steps) and {s.phase for s in plan.body.steps} == {1}
    assert case.apply(plan).status == "applied"
    assert case.converged(desired)


# --- phases, timeouts, retries, failures -----------------------------------------------------------

def test_phases_are_shown_and_per_kind_timeouts_apply(case: Case) -> None:
    plan = case.plan(desired_with(extra="CREATE INDEX visits_note_idx ON visits (note);\n"),
                     env_extra="lock_timeout: 3s\ntimeouts:\n  create_index_concurrently:\n    statement_timeout: 2h\n")
    build = step(plan, "create_index_concurrently")
    assert (build.lock_timeout, build.statement_timeout) == ("3s", "2h")
    assert "Phase 1: outside a transaction" in render_text(plan)


def test_lock_timeout_is_retried_with_backoff_then_fails_clearly(case: Case) -> None:
    desired = desired_with(("note text)", "note text, extra text)"))
    plan = case.plan(desired, env_extra="lock_timeout: 200ms\n")
    blocker = connect(case.database, autocommit=False, application_name="nightly report")
    blocker.execute("LOCK TABLE visits IN SHARE MODE")
    pid = blocker.info.backend_pid
    try:
        with pytest.raises(ApplyError) as err:
            case.apply(plan, lock_retries=2, retry_backoff_seconds=0.1)
    finally:
        blocker.rollback()
        blocker.close()
    assert "lock timeout" in str(err.value) and "gave up after 3 attempts" in str(err.value)
    # who held it up, so an operator knows what to wait for or stop (never what it ran: that may hold data)
    assert f"it waited behind pid {pid} ('nightly report', idle in transaction, in its transaction for" \
        in str(err.value), err.value
    assert "LOCK TABLE" not in str(err.value)
    # released during the backoff: the retry succeeds
    blocker = connect(case.database, autocommit=False)
    blocker.execute("LOCK TABLE visits IN SHARE MODE")
    releaser = threading.Timer(0.5, lambda: (blocker.rollback(), blocker.close()))
    releaser.start()
    started = time.monotonic()
    result = case.apply(plan, lock_retries=5, retry_backoff_seconds=0.2)
    releaser.join()
    assert result.status == "applied" and time.monotonic() - started >= 0.4
    assert case.converged(desired)


def test_failed_concurrent_index_build_leaves_no_invalid_index(case: Case) -> None:
    run_sql(case.database, "UPDATE accounts SET code = 'same' WHERE id <= 2")
    plan = case.plan(desired_with(extra="CREATE UNIQUE INDEX accounts_code_uq ON accounts (code);\n"))
    build = step(plan, "create_index_concurrently", "public.accounts_code_uq")
    assert any(h.code == "CORRECTNESS" and "duplicate" in h.message for h in build.hazards)
    with pytest.raises(ApplyError) as err:
        case.apply(plan)
    assert "could not create unique index" in str(err.value)
    assert fetch_one(case.database, "SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
    assert fetch_one(case.database, "SELECT to_regclass('public.accounts_code_uq')") is None
    assert fetch_one(case.database, "SELECT status FROM reconciler.runs") == "failed"


def test_rollback_sql_undoes_the_reversible_steps(case: Case) -> None:
    with connect(case.database) as conn:
        original = inspect.snapshot(conn).fingerprint
    desired = desired_with(("note text)", "note text DEFAULT 'none', extra text)"), ("code varchar(10)", "code varchar(20)"),
                           extra="CREATE INDEX visits_note_idx ON visits (note);\n"
                                 "ALTER TABLE visits ADD CONSTRAINT visits_account_fk FOREIGN KEY (account_id) "
                                 "REFERENCES accounts (id);\nCREATE VIEW recent AS SELECT id FROM visits;\n")
    plan = case.plan(desired)
    assert all(s.reversible for s in plan.body.steps), [s.kind for s in plan.body.steps if not s.reversible]
    assert case.apply(plan).status == "applied"
    with connect(case.database) as conn:
        for s in reversed(plan.body.steps):
            if s.rollback_sql:
                conn.execute(s.rollback_sql.encode())
        assert inspect.snapshot(conn).fingerprint == original


def test_a_transaction_that_would_fill_the_lock_table_is_split_and_named(case: Case) -> None:
    changes = [Change(f"CREATE TABLE public.t{i} (id int, note text)", "create_table", f"public.t{i}", "migra")
               for i in range(12)]
    changes += [Change(f"CREATE INDEX t{i}_note ON public.t{i} (note)", "create_index", f"public.t{i}_note", "migra")
                for i in range(12)]
    with connect(case.database) as conn:
        facts = inspect.live_facts(conn)
        settings = conn.execute("SELECT current_setting('max_locks_per_transaction')::int, "
                                "current_setting('max_connections')::int, "
                                "current_setting('max_prepared_transactions')::int").fetchone()
    assert settings is not None and facts.lock_table == inspect.LockTable(*settings)
    whole = compile_steps(changes, facts)
    assert {s.phase for s in whole} == {1} and not any("SPLIT_TRANSACTION" in codes(s) for s in whole)

    small = dataclasses.replace(facts, lock_table=inspect.LockTable(8, 6, 2))  # 64 slots: 16 per transaction
    steps = compile_steps(changes, small)
    phases: dict[int, list[Step]] = {}
    for s in steps:
        phases.setdefault(s.phase, []).append(s)
    assert len(phases) > 3 and all(s.transactional for s in steps)
    assert [s.sql for s in steps] == [c.sql for c in changes]  # same order, only committed in between
    for number, group in enumerate(phases.values(), 1):
        hazard = next(h for h in group[0].hazards if h.code == "SPLIT_TRANSACTION")
        assert f"run as {len(phases)} transactions (transaction {number} of {len(phases)}" in hazard.message
        assert "64 locks" in hazard.message and "not atomic" in hazard.message
        assert not any("SPLIT_TRANSACTION" in codes(s) for s in group[1:])
    with connect(case.database, autocommit=True) as conn:  # run as apply and rehearsal do: phase by phase
        for group in phases.values():
            with conn.transaction():
                for s in group:
                    conn.execute(s.sql.encode())
                held = conn.execute("SELECT count(DISTINCT relation) FROM pg_locks WHERE pid = pg_backend_pid() "
                                    "AND locktype = 'relation' AND relation >= 16384").fetchone()
                assert held is not None and held[0] <= 16, held  # a table, its TOAST table and index; an index
    assert fetch_one(case.database, "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 't%_note'") == 12


def test_unparseable_statement_is_an_error_that_shows_it() -> None:
    with pytest.raises(ReconcilerError) as err:
        compile_steps([Change("CREATE TABLEX nope (id int)", "unparsed", "", "migra")])
    assert "cannot parse a statement from migra" in str(err.value) and "CREATE TABLEX nope" in str(err.value)


def test_squawk_findings_are_attached_and_can_be_disabled(case: Case) -> None:
    desired = desired_with((", legacy text", ""), ("CREATE INDEX accounts_legacy_idx ON accounts (legacy);", ""))
    plan = case.plan(desired)
    drop = step(plan, "drop_column", "public.accounts.legacy")
    assert "ban-drop-column" in {f.rule for f in drop.lint}
    assert "ban-drop-column" in json.dumps([f.rule for s in plan.body.steps for f in s.lint])
    quiet = case.plan(desired, safety="safety:\n  squawk: false\n")
    assert all(not s.lint for s in quiet.body.steps)
    excluded = case.plan(desired, safety="safety:\n  squawk_exclude: [ban-drop-column]\n")
    assert "ban-drop-column" not in {f.rule for s in excluded.body.steps for f in s.lint}
