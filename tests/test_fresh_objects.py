"""New objects are not busy objects: what a plan creates gets plain DDL in the main transaction, no online-safety
lint, and a DROP to undo it; what it does to existing tables keeps its online form and hazards."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler import inspect
from reconciler.errors import ApplyError
from reconciler.lint import ABOUT_ALL_TABLES, ABOUT_OWN_TABLE, squawk_binary
from reconciler.plan import Plan
from reconciler.render import render_text
from reconciler.safety import Step
from reconciler.servers import Server, connect
from tests.conftest import fetch_one, run_sql
from tests.test_safety import BASE, Case, codes, step

NEW = """
CREATE SCHEMA shop;
CREATE TYPE shop.state AS ENUM ('new', 'paid');
CREATE DOMAIN shop.amount AS numeric(12, 2) CHECK (VALUE >= 0);
CREATE SEQUENCE shop.order_no;
CREATE TABLE shop.orders (
  id bigint PRIMARY KEY,
  account_id bigint NOT NULL REFERENCES public.accounts (id),
  code text NOT NULL UNIQUE,
  total shop.amount NOT NULL,
  state shop.state NOT NULL DEFAULT 'new',
  qty int NOT NULL CHECK (qty > 0),
  serial_no bigint NOT NULL DEFAULT nextval('shop.order_no')
);
CREATE INDEX orders_account_idx ON shop.orders (account_id);
CREATE TABLE shop.lines (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  order_id bigint NOT NULL REFERENCES shop.orders (id),
  sku varchar(20) NOT NULL,
  CONSTRAINT lines_sku_check CHECK (sku <> '')
);
CREATE TABLE shop.notes (id serial PRIMARY KEY, body text COLLATE "C");
COMMENT ON TABLE shop.notes IS 'free text';
CREATE VIEW shop.big_orders AS SELECT id, qty FROM shop.orders WHERE qty > 10;
CREATE MATERIALIZED VIEW shop.totals AS SELECT account_id, sum(qty) AS qty FROM shop.orders GROUP BY account_id;
CREATE UNIQUE INDEX totals_account ON shop.totals (account_id);
CREATE FUNCTION shop.touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE FUNCTION shop.price(a int, b varchar(10) DEFAULT 'x', OUT p numeric, VARIADIC c int[] DEFAULT '{}')
  LANGUAGE sql AS $$ SELECT a::numeric $$;
CREATE FUNCTION shop.by_code(code text) RETURNS TABLE (id bigint, qty int) LANGUAGE sql
  AS $$ SELECT id, qty FROM shop.orders WHERE orders.code = by_code.code $$;
CREATE PROCEDURE shop.settle(order_id bigint, INOUT done boolean) LANGUAGE sql AS $$ SELECT true $$;
CREATE TRIGGER orders_touch BEFORE UPDATE ON shop.orders FOR EACH ROW EXECUTE FUNCTION shop.touch();
ALTER TABLE shop.orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY orders_read ON shop.orders FOR SELECT USING (true);
"""
EXISTING_INDEX = "CREATE INDEX visits_note_idx ON visits (note);\n"
ONLINE_RULES = ABOUT_OWN_TABLE | ABOUT_ALL_TABLES


@pytest.fixture
def case(tmp_path: Path, database: str, pg_server: Server) -> Case:
    return Case(tmp_path, database, pg_server)


def fresh(s: Step) -> bool:
    return bool(s.tables) and all(t.startswith("shop.") for t in s.tables)


def test_new_tables_get_plain_ddl_in_the_main_transaction_without_online_lint(case: Case) -> None:
    assert squawk_binary() is not None  # squawk-cli is a test dependency: the plan below is linted
    desired = BASE + NEW + EXISTING_INDEX
    plan = case.plan(desired)
    text = render_text(plan)
    shop = [s for s in plan.body.steps if fresh(s)]
    assert {s.kind for s in shop} >= {"create_table", "create_index", "add_foreign_key", "add_check_constraint",
                                      "add_unique_constraint", "add_primary_key"}, text
    for s in shop:
        upper = s.sql.upper()
        assert "CONCURRENTLY" not in upper and "NOT VALID" not in upper and "VALIDATE" not in upper, s
        assert s.transactional and s.kind not in ("validate_constraint", "create_index_concurrently"), s
        assert not {f.rule for f in s.lint} & ONLINE_RULES, (s.kind, s.object, s.lint)
    assert not [s for s in plan.body.steps if s.kind == "validate_constraint"], text
    # all of them in the first transactional phase, with everything else but the concurrent build
    main = min(s.phase for s in plan.body.steps if s.transactional)
    assert {s.phase for s in plan.body.steps if s.kind != "create_index_concurrently"} == {main}, text
    for kind, name in (("add_check_constraint", "shop.orders.orders_qty_check"),
                       ("add_foreign_key", "shop.lines.lines_order_id_fkey")):
        folded = step(plan, kind, name)
        assert folded.original_sql and "not valid" in folded.original_sql.lower()  # migra's form, rewritten
    # squawk ran: its findings that are not about busy tables stay on the new tables' steps
    assert "prefer-bigint-over-int" in {f.rule for s in shop for f in s.lint}, text

    # a foreign key from a new table to an existing one still locks the existing one
    to_accounts = step(plan, "add_foreign_key", "shop.orders.orders_account_id_fkey")
    assert "NOT VALID" not in to_accounts.sql.upper()
    (lock,) = [h for h in to_accounts.hazards if h.code == "BLOCKS_WRITES"]
    assert lock.table == "public.accounts" and lock.rows == 2000 and "SHARE ROW EXCLUSIVE" in lock.message
    assert "adding-foreign-key-constraint" in {f.rule for f in to_accounts.lint}
    assert "constraint-missing-not-valid" not in {f.rule for f in to_accounts.lint}  # the scan is of the new table

    # an index on an existing table is still built concurrently, outside the transaction
    build = step(plan, "create_index_concurrently", "public.visits_note_idx")
    assert not build.transactional and build.sql.startswith("CREATE INDEX CONCURRENTLY")

    assert case.apply(plan).status == "applied"
    assert fetch_one(case.database, "SELECT bool_and(convalidated) FROM pg_constraint c JOIN pg_namespace n "
                                    "ON n.oid = c.connamespace WHERE n.nspname = 'shop'") is True
    assert case.converged(desired)


def test_existing_tables_keep_their_online_forms(case: Case) -> None:
    """No regression: constraints added to an existing table, even beside new tables, keep NOT VALID + VALIDATE."""
    desired = BASE.replace("account_id bigint", "account_id bigint REFERENCES accounts (id)").replace(
        "score int", "score int CHECK (score >= 0)") + NEW
    plan = case.plan(desired)
    fk = step(plan, "add_foreign_key", "public.visits.visits_account_id_fkey")
    assert fk.sql.lower().endswith("not valid") and "FULL_SCAN_UNDER_LOCK" not in codes(fk)
    (lock,) = [h for h in fk.hazards if h.code == "BLOCKS_WRITES"]
    assert lock.table == "public.accounts"
    validates = {s.object for s in plan.body.steps if s.kind == "validate_constraint"}
    assert validates == {"public.visits.visits_account_id_fkey", "public.accounts.accounts_score_check"}
    assert case.apply(plan).status == "applied"
    assert case.converged(desired)


def expected_rollbacks(database: str) -> dict[tuple[str, str], str]:
    """Each created object's DROP, routines with their identity arguments read from the server."""
    def identity(name: str) -> str:
        found = fetch_one(database, f"SELECT pg_get_function_identity_arguments('shop.{name}'::regproc)")
        assert isinstance(found, str)
        return found

    return {
        ("create_schema", "shop"): 'DROP SCHEMA "shop"',
        ("create_enum", "shop.state"): 'DROP TYPE "shop"."state"',
        ("create_domain", "shop.amount"): 'DROP DOMAIN "shop"."amount"',
        ("create_sequence", "shop.order_no"): 'DROP SEQUENCE IF EXISTS "shop"."order_no"',
        ("create_table", "shop.orders"): 'DROP TABLE "shop"."orders"',
        ("create_table", "shop.lines"): 'DROP TABLE "shop"."lines"',
        ("create_index", "shop.orders_account_idx"): 'DROP INDEX IF EXISTS "shop"."orders_account_idx"',
        ("create_trigger", "shop.orders.orders_touch"): 'DROP TRIGGER IF EXISTS "orders_touch" ON "shop"."orders"',
        ("create_policy", "shop.orders.orders_read"): 'DROP POLICY IF EXISTS "orders_read" ON "shop"."orders"',
        ("create_function", "shop.touch"): 'DROP FUNCTION "shop"."touch"()',
        ("create_function", "shop.price"): f'DROP FUNCTION "shop"."price"({identity("price")})',
        ("create_function", "shop.by_code"): f'DROP FUNCTION "shop"."by_code"({identity("by_code")})',
        ("create_procedure", "shop.settle"): f'DROP PROCEDURE "shop"."settle"({identity("settle")})',
    }


def test_created_objects_are_undone_by_their_drop(case: Case) -> None:
    plan = case.plan(BASE + NEW)
    assert all(s.reversible for s in plan.body.steps), [(s.kind, s.object) for s in plan.body.steps if not s.reversible]
    assert case.apply(plan).status == "applied"
    expected = expected_rollbacks(case.database)
    assert expected[("create_function", "shop.price")] == \
        'DROP FUNCTION "shop"."price"(a integer, b character varying, OUT p numeric, VARIADIC c integer[])'  # no typmod, default
    by_object = {(s.kind, s.object): s.rollback_sql for s in plan.body.steps}
    for key, drop in expected.items():
        assert by_object.get(key) == drop, key
    view = step(plan, "replace_view", "shop.big_orders")
    assert view.rollback_sql == 'DROP VIEW IF EXISTS "shop"."big_orders"'


def test_a_failed_run_undoes_the_created_objects_in_reverse(case: Case) -> None:
    """The main transaction creates everything and commits; a later phase fails (a CHECK that rows of the
    existing table violate, validated on its own): apply undoes the committed steps by their rollback SQL, last
    first, and the database is as before."""
    run_sql(case.database, "UPDATE accounts SET score = -1 WHERE id = 7")
    with connect(case.database) as conn:
        before = inspect.snapshot(conn).fingerprint
    plan: Plan = case.plan(BASE.replace("score int", "score int CHECK (score >= 0)") + NEW)
    validate = step(plan, "validate_constraint", "public.accounts.accounts_score_check")
    assert validate.phase > step(plan, "create_table", "shop.orders").phase
    with pytest.raises(ApplyError) as err:
        case.apply(plan)
    assert "undone by their rollback SQL" in str(err.value), err.value
    assert fetch_one(case.database, "SELECT status FROM reconciler.runs") == "rolled back"
    assert fetch_one(case.database, "SELECT to_regnamespace('shop')") is None
    with connect(case.database) as conn:
        assert inspect.snapshot(conn).fingerprint == before
