"""Rename annotations: `-- reconciler: renamed from <old>` turns a drop and add into a rename that keeps the data."""

from __future__ import annotations

import json
import secrets
import textwrap
from pathlib import Path

import pytest

from reconciler.apply import ApplyOptions, apply_plan
from reconciler.config import Environment, load_config
from reconciler.errors import ReconcilerError, SchemaLoadError
from reconciler.pipeline import make_plan, open_servers
from reconciler.renames import Rename, read_renames
from reconciler.render import render_markdown, render_text
from reconciler.servers import Server, throwaway_database
from reconciler.source import load_source
from tests.conftest import fetch_one, run_sql
from tests.repo import Repo

ORDERS = textwrap.dedent("""\
    CREATE TABLE old_orders (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        email text NOT NULL UNIQUE,
        total numeric(12, 2) NOT NULL CHECK (total >= 0),
        note text
    );
    CREATE INDEX ON old_orders (note);
    """)


def _renames(tmp_path: Path, files: dict[str, str]) -> tuple[Rename, ...]:
    root = tmp_path / "schemas"
    root.mkdir(exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return read_renames(load_source(root))


def _repo(tmp_path: Path, database: str, server: Server, files: dict[str, str]) -> Repo:
    repo = Repo(tmp_path, database, server)
    repo.write(files)
    return repo


def _plan_json(repo: Repo, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[dict[str, object]]]:
    """Exit code, text output and the steps of `reconciler plan`."""
    plan_file = repo.root / "plan.json"
    plan_file.unlink(missing_ok=True)
    code = repo.run("plan", "-o", str(plan_file))
    out = capsys.readouterr().out
    steps = json.loads(plan_file.read_text())["body"]["steps"] if plan_file.exists() else []
    return code, out, steps


# --- reading annotations (no database) ---

def test_annotations_are_read_with_their_place(tmp_path: Path) -> None:
    found = _renames(tmp_path, {"a.sql": textwrap.dedent("""\
        CREATE SCHEMA app;
        -- reconciler: renamed from app.old_items
        CREATE TABLE app.items (
            id int,
            -- reconciler: renamed from "Old Label"
            label text
        );
        -- a function body may mention the annotation without being one
        CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$ SELECT '-- reconciler: renamed from x' $$;
        --   Reconciler:  renamed from Legacy_Notes
        CREATE TABLE notes (body text);
        ALTER TABLE notes
            -- reconciler: renamed from text
            ADD COLUMN content text;
        """)})
    assert found == (
        Rename("table", "app", "items", "old_items", "items", "a.sql", 2),
        Rename("column", "app", "items", "Old Label", "label", "a.sql", 5),
        Rename("table", "public", "notes", "legacy_notes", "notes", "a.sql", 10),
        Rename("column", "public", "notes", "text", "content", "a.sql", 13),
    )


@pytest.mark.parametrize(("text", "message"), [
    ("-- reconciler: renamed from old_t\n\nCREATE TABLE t (id int);\n", "not directly above a CREATE TABLE"),
    ("-- reconciler: renamed from old_t\nCREATE INDEX i ON t (id);\nCREATE TABLE t (id int);\n", "not directly above"),
    ("CREATE TABLE t (id int); -- reconciler: renamed from old_t\n", "on a line of its own"),
    ("-- reconciler: renamed from\nCREATE TABLE t (id int);\n", "cannot read the rename annotation"),
    ("-- reconciler: renamed from a b\nCREATE TABLE t (id int);\n", "cannot read the rename annotation"),
    ("-- reconciler: renamed from other.old_t\nCREATE TABLE t (id int);\n", "keeps a table in its schema"),
    ("CREATE TABLE t (\n-- reconciler: renamed from x\n a int, b int);\n", "more than one column (a, b)"),
    ("CREATE TABLE t (\n-- reconciler: renamed from t.x\n a int);\n", "bare column name"),
    ("-- reconciler: renamed from T\nCREATE TABLE t (id int);\n", "renamed from itself"),
])
def test_misplaced_or_malformed_annotations_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SchemaLoadError) as err:
        _renames(tmp_path, {"10_t.sql": text})
    assert message in str(err.value)
    line = 2 if text.startswith("CREATE TABLE t (\n") else 1
    assert str(err.value).startswith(f"10_t.sql:{line}:")


def test_two_annotations_for_the_same_old_name_clash(tmp_path: Path) -> None:
    with pytest.raises(ReconcilerError, match=r"b.sql:1: table public.old_t to public.u clashes .* a.sql:1"):
        _renames(tmp_path, {"a.sql": "-- reconciler: renamed from old_t\nCREATE TABLE t (id int);\n",
                            "b.sql": "-- reconciler: renamed from old_t\nCREATE TABLE u (id int);\n"})


# --- plans against a real database ---

def test_table_rename_keeps_rows_then_no_changes(tmp_path: Path, database: str, pg_server: Server,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    repo = _repo(tmp_path, database, pg_server, {"10_orders.sql": ORDERS})
    assert repo.run("apply", "--auto") == 0
    run_sql(database, "INSERT INTO old_orders (email, total, note) VALUES ('a@example.com', 5, 'first'), ('b@example.com', 7, NULL)")
    repo.write({"10_orders.sql": "-- reconciler: renamed from old_orders\n"
                                 + ORDERS.replace("old_orders", "orders")})
    capsys.readouterr()

    code, out, steps = _plan_json(repo, capsys)
    assert code == 2
    assert "rename_table public.old_orders" in out
    assert 'ALTER TABLE "public"."old_orders" RENAME TO "orders";' in out
    assert "drop" not in " ".join(str(s["kind"]) for s in steps)
    assert "DATA_LOSS" not in out
    # the names PostgreSQL derived from the table name follow it, so no constraint or index is rebuilt
    # (PostgreSQL 18 keeps NOT NULL constraints by name too: theirs follow as well)
    not_null = pg_server.major_version >= 18
    assert [(s["kind"], s["object"]) for s in steps] == [
        ("rename_table", "public.old_orders"),
        ("rename_index", "public.old_orders_email_key"),
        ("rename_index", "public.old_orders_note_idx"),
        ("rename_index", "public.old_orders_pkey"),
        *([("rename_constraint", "public.orders.old_orders_email_not_null"),
           ("rename_constraint", "public.orders.old_orders_id_not_null")] if not_null else []),
        ("rename_constraint", "public.orders.old_orders_total_check"),
        *([("rename_constraint", "public.orders.old_orders_total_not_null")] if not_null else []),
        ("rename_sequence", "public.old_orders_id_seq"),
    ]
    assert steps[0]["rollback_sql"] == 'ALTER TABLE "public"."orders" RENAME TO "old_orders"'
    assert all(s["reversible"] and s["phase"] == 1 for s in steps)

    assert repo.run("apply", str(repo.root / "plan.json")) == 0
    assert fetch_one(database, "SELECT string_agg(email || ':' || total, ',' ORDER BY id) FROM orders") \
        == "a@example.com:5.00,b@example.com:7.00"
    run_sql(database, "INSERT INTO orders (email, total) VALUES ('c@example.com', 1)")  # the identity goes on
    assert fetch_one(database, "SELECT max(id) FROM orders") == 3
    # the annotation stays in the file: the rename is already applied, so there is nothing to do
    capsys.readouterr()
    assert repo.run("plan") == 0
    assert "No changes" in capsys.readouterr().out
    assert repo.run("drift") == 0


def test_column_rename_keeps_data(tmp_path: Path, database: str, pg_server: Server,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    repo = _repo(tmp_path, database, pg_server, {"10_orders.sql": ORDERS})
    assert repo.run("apply", "--auto") == 0
    run_sql(database, "INSERT INTO old_orders (email, total, note) VALUES ('a@example.com', 5, 'keep me')")
    repo.write({"10_orders.sql": ORDERS.replace("    note text", "    -- reconciler: renamed from note\n    comment text")
                                       .replace("(note)", "(comment)")})
    capsys.readouterr()
    code, out, steps = _plan_json(repo, capsys)
    assert code == 2
    assert [(s["kind"], s["object"]) for s in steps] == [
        ("rename_column", "public.old_orders.note"),
        ("rename_index", "public.old_orders_note_idx"),
    ]
    assert 'ALTER TABLE "public"."old_orders" RENAME COLUMN "note" TO "comment";' in out
    assert steps[0]["rollback_sql"] == 'ALTER TABLE "public"."old_orders" RENAME COLUMN "comment" TO "note"'
    assert "drop_column" not in out and "add_column" not in out
    assert repo.run("apply", str(repo.root / "plan.json")) == 0
    assert fetch_one(database, "SELECT comment FROM old_orders") == "keep me"
    assert repo.run("plan") == 0


def test_table_and_column_renames_with_other_changes_in_one_plan(tmp_path: Path, database: str, pg_server: Server,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    customers = "CREATE TABLE clients (id int PRIMARY KEY, full_name text NOT NULL);\n"
    orders = "CREATE TABLE purchases (id int PRIMARY KEY, client_id int NOT NULL REFERENCES clients (id), total int);\n"
    repo = _repo(tmp_path, database, pg_server, {"10_clients.sql": customers, "20_orders.sql": orders})
    assert repo.run("apply", "--auto") == 0
    run_sql(database, "INSERT INTO clients VALUES (1, 'Ada'); INSERT INTO purchases VALUES (10, 1, 99)")
    repo.write({
        "10_clients.sql": textwrap.dedent("""\
            -- reconciler: renamed from clients
            CREATE TABLE customers (
                id int PRIMARY KEY,
                -- reconciler: renamed from full_name
                name text NOT NULL,
                email text
            );
            """),
        "20_orders.sql": textwrap.dedent("""\
            CREATE TABLE purchases (
                id int PRIMARY KEY,
                -- reconciler: renamed from client_id
                customer_id int NOT NULL REFERENCES customers (id),
                total int
            );
            CREATE INDEX purchases_customer_id_idx ON purchases (customer_id);
            """),
    })
    capsys.readouterr()
    code, _out, steps = _plan_json(repo, capsys)
    assert code == 2
    kinds = [(s["kind"], s["object"]) for s in steps]
    assert kinds[:3] == [("rename_table", "public.clients"), ("rename_column", "public.customers.full_name"),
                         ("rename_column", "public.purchases.client_id")]
    assert ("rename_index", "public.clients_pkey") in kinds
    assert ("rename_constraint", "public.purchases.purchases_client_id_fkey") in kinds
    assert ("add_column", "public.customers.email") in kinds
    # the new index is built concurrently on the (renamed, existing) table, after the renames
    assert ("create_index_concurrently", "public.purchases_customer_id_idx") in kinds
    assert not any("drop" in str(s["kind"]) for s in steps)
    assert repo.run("apply", str(repo.root / "plan.json")) == 0
    assert fetch_one(database, "SELECT c.name || ' ' || p.total FROM purchases p JOIN customers c ON c.id = p.customer_id") \
        == "Ada 99"
    assert repo.run("plan") == 0


def test_schema_qualified_table_rename(tmp_path: Path, database: str, pg_server: Server,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    repo = _repo(tmp_path, database, pg_server, {
        "00_schema.sql": "CREATE SCHEMA app;\n",
        "10_items.sql": "CREATE TABLE app.old_items (id int PRIMARY KEY, label text);\n",
    })
    assert repo.run("apply", "--auto") == 0
    run_sql(database, "INSERT INTO app.old_items VALUES (1, 'one')")
    repo.write({"10_items.sql": "-- reconciler: renamed from app.old_items\nCREATE TABLE app.items (id int PRIMARY KEY, label text);\n"})
    capsys.readouterr()
    code, out, steps = _plan_json(repo, capsys)
    assert code == 2
    assert [s["kind"] for s in steps] == ["rename_table", "rename_index",
                                          *(["rename_constraint"] if pg_server.major_version >= 18 else [])]  # id's NOT NULL
    assert 'ALTER TABLE "app"."old_items" RENAME TO "items";' in out
    assert repo.run("apply", str(repo.root / "plan.json")) == 0
    assert fetch_one(database, "SELECT label FROM app.items") == "one"
    assert fetch_one(database, "SELECT to_regclass('public.items')") is None
    assert repo.run("plan") == 0


def test_missing_source_is_an_error_with_file_and_line(tmp_path: Path, database: str, pg_server: Server,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    repo = _repo(tmp_path, database, pg_server, {"10_t.sql": "CREATE TABLE t (id int, a text);\n"})
    assert repo.run("apply", "--auto") == 0
    repo.write({"10_t.sql": "CREATE TABLE t (id int, a text);\n\n-- reconciler: renamed from ghosts\nCREATE TABLE spirits (id int);\n"})
    capsys.readouterr()
    assert repo.run("plan") == 1
    err = capsys.readouterr().err
    assert "10_t.sql:3:" in err and "no table public.ghosts" in err and "Traceback" not in err

    repo.write({"10_t.sql": "CREATE TABLE t (\n    id int,\n    -- reconciler: renamed from b\n    c text\n);\n"})
    assert repo.run("plan") == 1
    err = capsys.readouterr().err
    assert "10_t.sql:3:" in err and "no column public.t.b" in err


def test_both_names_present_is_an_error(tmp_path: Path, database: str, pg_server: Server,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    repo = _repo(tmp_path, database, pg_server, {"10_t.sql": "CREATE TABLE old_t (id int);\nCREATE TABLE t (id int);\n"})
    assert repo.run("apply", "--auto") == 0
    repo.write({"10_t.sql": "-- reconciler: renamed from old_t\nCREATE TABLE t (id int);\n"})
    capsys.readouterr()
    assert repo.run("plan") == 1
    err = capsys.readouterr().err
    assert "10_t.sql:1:" in err and "has both tables" in err
    assert fetch_one(database, "SELECT count(*) FROM pg_tables WHERE tablename IN ('t', 'old_t')") == 2


def test_pipeline_plan_renders_the_renames(tmp_path: Path, database: str, pg_server: Server) -> None:
    run_sql(database, "CREATE TABLE people (id int, nick text); INSERT INTO people VALUES (1, 'x')")
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "schema.sql").write_text(
        "-- reconciler: renamed from people\nCREATE TABLE persons (\n    id int,\n    -- reconciler: renamed from nick\n"
        "    handle text,\n    born date\n);\n")
    (tmp_path / "reconciler.yaml").write_text("schemas: schemas\n")
    config = load_config(tmp_path / "reconciler.yaml")
    env = Environment(name="test", database=database, shadow=pg_server.dsn)
    with open_servers(config, env) as servers:
        plan = make_plan(config, env, servers).plan
    assert [(s.kind, s.object) for s in plan.body.steps] == [
        ("rename_table", "public.people"), ("rename_column", "public.persons.nick"), ("add_column", "public.persons.born")]
    assert plan.body.rehearsal.converged
    assert not any(h.code == "DATA_LOSS" for _, h in plan.hazards)
    text = render_text(plan)
    assert "rename_table public.people" in text and 'RENAME TO "persons"' in text and "drop" not in text.lower()
    markdown = render_markdown(plan)
    assert "-- 1. rename_table public.people" in markdown and 'RENAME COLUMN "nick" TO "handle";' in markdown


def test_rename_with_owners_and_privileges_managed(tmp_path: Path, pg_server: Server, request: pytest.FixtureRequest) -> None:
    """The copy the diff runs on keeps owners and grants: only the new grant is planned, nothing is re-granted."""
    tag = secrets.token_hex(4)
    reader, writer = f"rn_{tag}_reader", f"rn_{tag}_writer"
    run_sql(pg_server.dsn, f'CREATE ROLE "{reader}" NOLOGIN; CREATE ROLE "{writer}" NOLOGIN')
    request.addfinalizer(lambda: run_sql(pg_server.dsn, f'DROP ROLE IF EXISTS "{reader}"; DROP ROLE IF EXISTS "{writer}"'))
    with throwaway_database(pg_server, "test") as database:
        run_sql(database, f'CREATE TABLE people (id int PRIMARY KEY, nick text); GRANT SELECT ON people TO "{reader}";'
                          "INSERT INTO people VALUES (1, 'x')")
        (tmp_path / "schemas").mkdir()
        (tmp_path / "schemas" / "schema.sql").write_text(
            "-- reconciler: renamed from people\nCREATE TABLE persons (id int PRIMARY KEY, nick text);\n"
            f'GRANT SELECT ON persons TO "{reader}";\nGRANT INSERT ON persons TO "{writer}";\n')
        (tmp_path / "reconciler.yaml").write_text("schemas: schemas\nmanage_privileges: true\nmanage_owners: true\n")
        config = load_config(tmp_path / "reconciler.yaml")
        env = Environment(name="test", database=database, shadow=pg_server.dsn)
        with open_servers(config, env) as servers:
            plan = make_plan(config, env, servers).plan
            assert plan.body.rehearsal.converged
            assert [s.kind for s in plan.body.steps] == [  # (PostgreSQL 18: and id's NOT NULL constraint)
                "rename_table", "rename_index", *(["rename_constraint"] if pg_server.major_version >= 18 else []), "grant"]
            assert writer in plan.body.steps[-1].sql
            assert apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler")).status == "applied"
            assert make_plan(config, env, servers).plan.body.steps == ()
        assert fetch_one(database, "SELECT nick FROM persons") == "x"
