"""splice.find_splice: which edits in the middle of a schema may be made to the previous schema's loaded database in
place (the statements after the edit kept), and which must load as usual: from parse trees, then on a real server
(random edits of a random schema: every database made in place is the one loading in order makes). The plans of
watch's edits in place are compared with plans that load everything in test_shadow_cache."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import pytest

from reconciler import inspect, shadowcache
from reconciler.errors import SchemaLoadError
from reconciler.servers import Server, connect, throwaway_database
from reconciler.shadow import load_schema
from reconciler.source import DesiredSchema, SchemaFile
from reconciler.splice import Drop, find_splice
from tests.conftest import run_sql

BEFORE = ["CREATE TABLE users (id bigint PRIMARY KEY, email text);"]
EDITED = ["CREATE TABLE edited (id int);"]
AFTER = [
    "CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint REFERENCES users (id));",
    "CREATE INDEX orders_user ON orders (user_id);",
    "COMMENT ON TABLE orders IS 'what was bought';",
    "CREATE VIEW recent_orders AS SELECT id FROM orders;",
]


def schema(*statements: str, path: str = "schema.sql") -> DesiredSchema:
    text = "\n".join(statements) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    return DesiredSchema(root=Path("."), files=(SchemaFile(path=path, sha256=digest, text=text),),
                         fingerprint=f"sha256:{digest}", git_commit=None, dirty=False)


OLD = schema(*BEFORE, *EDITED, *AFTER)


def test_a_changed_table_is_dropped_and_created_again_the_rest_kept() -> None:
    new = schema(*BEFORE, "CREATE TABLE edited (id int, note text DEFAULT 'x');",
                 "CREATE INDEX edited_note ON edited (note);", *AFTER)
    assert find_splice(OLD, new) == find_splice(OLD, new)  # a pure function of the two schemas
    found = find_splice(OLD, new)
    assert found is not None
    assert (found.start, found.old_stop, found.new_stop, found.reused) == (1, 2, 3, len(AFTER))
    assert found.drops == (Drop("TABLE", None, "edited"),)


def test_insertions_and_removals_in_the_middle() -> None:
    inserted = find_splice(schema(*BEFORE, *AFTER), OLD)
    assert inserted is not None and inserted.drops == () and (inserted.start, inserted.new_stop) == (1, 2)
    removed = find_splice(OLD, schema(*BEFORE, *AFTER))
    assert removed is not None and removed.new_stop == removed.start == 1
    assert removed.drops == (Drop("TABLE", None, "edited"),)


def test_what_the_replaced_statements_created_is_dropped_last_first() -> None:
    old = schema(*BEFORE, "CREATE SEQUENCE app.counter;", "CREATE TABLE app.edited (id int);",
                 "CREATE VIEW app.edited_view AS SELECT id FROM app.edited;", *AFTER)
    found = find_splice(old, schema(*BEFORE, *AFTER))
    assert found is not None
    assert found.drops == (Drop("VIEW", "app", "edited_view"), Drop("TABLE", "app", "edited"),
                           Drop("SEQUENCE", "app", "counter"))


def test_a_foreign_key_to_an_earlier_table_on_both_sides_is_no_obstacle() -> None:
    new = schema(*BEFORE, "CREATE TABLE edited (id int, user_id bigint REFERENCES users (id));", *AFTER)
    assert find_splice(OLD, new) is not None


EDIT = "CREATE TABLE edited (id int, x int);"


@pytest.mark.parametrize(("old", "new", "reason"), [
    pytest.param(OLD, schema(*BEFORE, *EDITED, *AFTER, "CREATE TABLE appended (id int);"), "only added at the end",
                 id="only-appended"),
    pytest.param(schema(*BEFORE, *EDITED, *AFTER, "CREATE INDEX orders_edited ON orders (user_id);"),
                 schema(*BEFORE, EDIT, *AFTER, "CREATE INDEX orders_edited ON orders (user_id);"),
                 "after the edit mentions 'edited'", id="later-name-mentions-it"),
    pytest.param(schema(*BEFORE, *EDITED, *AFTER, "COMMENT ON COLUMN orders.id IS 'see edited';"),
                 schema(*BEFORE, EDIT, *AFTER, "COMMENT ON COLUMN orders.id IS 'see edited';"),
                 "after the edit mentions 'edited'", id="comment-mentions"),
    pytest.param(schema(*BEFORE, *EDITED, "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';", *AFTER),
                 schema(*BEFORE, EDIT, "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';", *AFTER),
                 "(CreateFunctionStmt) may reach beyond", id="function-after"),
    pytest.param(schema(*BEFORE, *EDITED, *AFTER, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC;"),
                 schema(*BEFORE, EDIT, *AFTER, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC;"),
                 "ACL_TARGET_ALL_IN_SCHEMA", id="grant-all"),
    pytest.param(schema(*BEFORE, *EDITED, *AFTER, "CREATE TABLE IF NOT EXISTS spare (id int);"),
                 schema(*BEFORE, EDIT, *AFTER, "CREATE TABLE IF NOT EXISTS spare (id int);"),
                 "if_not_exists", id="if-not-exists"),
    pytest.param(schema(*BEFORE, *EDITED, *AFTER, "ALTER TABLE users ADD CONSTRAINT users_email UNIQUE (email);"),
                 schema(*BEFORE, "CREATE TABLE edited (id int, user_id bigint REFERENCES users (id));", *AFTER,
                        "ALTER TABLE users ADD CONSTRAINT users_email UNIQUE (email);"),
                 "'users' and the name", id="later-alters-referenced"),
    pytest.param(schema("SET search_path = public;", *BEFORE, *EDITED, *AFTER),
                 schema("SET search_path = public;", *BEFORE, EDIT, *AFTER), "changes the session", id="session"),
    pytest.param(schema("SET search_path = app, public;", *BEFORE, *EDITED, *AFTER), schema(*BEFORE, EDIT, *AFTER),
                 "changes the session", id="session-before"),
    pytest.param(schema("ALTER DATABASE CURRENT SET default_table_access_method = heap;", *BEFORE, *EDITED, *AFTER),
                 schema("ALTER DATABASE CURRENT SET default_table_access_method = heap;", *BEFORE, EDIT, *AFTER),
                 "changes the session", id="database-settings"),
    pytest.param(OLD, schema(*BEFORE, "ALTER TABLE users ADD COLUMN x int;", *AFTER),
                 "AlterTableStmt on an object they do not create", id="edit-alters-earlier"),
    pytest.param(OLD, schema(*BEFORE, "CREATE TABLE orders_archive (id int);", *AFTER),
                 "'orders_archive' and the name 'orders'", id="name-prefix"),
    pytest.param(OLD, schema(*BEFORE, "CREATE TABLE edited (id int, o bigint REFERENCES orders (id));", *AFTER),
                 "'orders' and the name 'orders'", id="refers-to-a-later-table"),
    pytest.param(OLD, schema(*BEFORE, "CREATE TEMP TABLE edited (id int);", *AFTER), "changes the session",
                 id="temporary"),
    pytest.param(OLD, schema(*BEFORE, *EDITED, *AFTER, path="a.sql"), "no statement in common",
                 id="renamed-file"),
])
def test_edits_that_load_as_usual(old: DesiredSchema, new: DesiredSchema, reason: str,
                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="reconciler.splice"):
        assert find_splice(old, new) is None
    assert [r.getMessage() for r in caplog.records if reason in r.getMessage()], caplog.text


def test_an_edit_of_the_last_statements_needs_nothing_after_it() -> None:
    found = find_splice(OLD, schema(*BEFORE, *EDITED, *AFTER[:-1], "CREATE VIEW recent_orders AS SELECT 1 AS id;"))
    assert found is not None and found.reused == 0 and found.drops == (Drop("VIEW", None, "recent_orders"),)


def test_an_index_added_to_an_earlier_table_is_dropped_by_its_name() -> None:
    after = ["CREATE TABLE notes (id int, body text);", "CREATE INDEX notes_body ON notes (body);"]
    old = schema(*BEFORE, "CREATE INDEX users_email ON users (email);", *after)
    found = find_splice(old, schema(*BEFORE, "CREATE INDEX users_email ON users (lower(email));", *after))
    assert found is not None and found.drops == (Drop("INDEX", None, "users_email"),)
    unnamed = schema(*BEFORE, "CREATE INDEX ON users (email);", *after)
    assert find_splice(schema(*BEFORE, *after), unnamed) is not None  # added: nothing to drop
    assert find_splice(unnamed, schema(*BEFORE, *after)) is None  # its name is PostgreSQL's choice: not dropped
    # a foreign key after it to the indexed table: which unique index it uses may depend on the order
    assert find_splice(schema(*BEFORE, *AFTER), schema(*BEFORE, "CREATE UNIQUE INDEX u ON users (id);", *AFTER)) is None


# --- on a real server: whatever it accepts gives what loading in order gives -----------------------------------

def _table(rng: random.Random, name: str, earlier: list[str]) -> list[str]:
    """A table's statements, at random: foreign keys only to earlier tables, named and unnamed indexes, comments,
    a view over it, a sequence of its own."""
    columns = ["id bigint PRIMARY KEY", f"note text DEFAULT '{rng.choice(['a', 'b', 'c'])}'"]
    if earlier and rng.random() < 0.5:
        columns.append(f"ref bigint REFERENCES {rng.choice(earlier)} (id)")
    if rng.random() < 0.5:
        columns.append(f"n int CHECK (n > {rng.randint(0, 3)})")
    if rng.random() < 0.3:
        columns.append("UNIQUE (note)")
    statements = []
    if rng.random() < 0.3:
        statements.append(f"CREATE SEQUENCE {name}_seq;")
        columns.append(f"counter bigint DEFAULT nextval('{name}_seq')")
    statements.append(f"CREATE TABLE {name} ({', '.join(columns)});")
    if rng.random() < 0.4:
        statements.append(f"CREATE INDEX {name}_note ON {name} (note);")
    if rng.random() < 0.3:
        statements.append(f"CREATE INDEX ON {name} (id, note);")
    if rng.random() < 0.3:
        statements.append(f"COMMENT ON TABLE {name} IS 'table {name}';")
    if rng.random() < 0.2:
        statements.append(f"CREATE VIEW {name}_view AS SELECT * FROM {name};")
    if earlier and rng.random() < 0.1:
        statements.append(f"CREATE INDEX {name}_on_{earlier[0]} ON {earlier[0]} (note);")
    return statements


def _text(blocks: list[tuple[str, list[str]]]) -> str:
    return "\n".join(s for _, block in blocks for s in block)


SEED = 20261202


def test_random_edits_in_place_give_what_loading_in_order_gives(pg_server: Server) -> None:
    rng = random.Random(SEED)
    prefixes = ["item", "items", "order", "order_line", "user", "user_account", "log"]
    blocks: list[tuple[str, list[str]]] = []
    for i in range(24):
        name = f"{rng.choice(prefixes)}_{i}"
        blocks.append((name, _table(rng, name, [n for n, _ in blocks])))
    spliced = 0
    with throwaway_database(pg_server, "test") as kept_dsn:
        old = schema(_text(blocks))
        load_schema(old, kept_dsn, sandbox=None)
        for k in range(30):
            edited = list(blocks)
            at = rng.randrange(len(edited))
            move = rng.choice(["change", "insert", "remove"])
            name = f"{rng.choice(prefixes)}_{100 + k}" if move == "insert" else edited[at][0]
            earlier = [n for n, _ in edited[:at]]
            if move == "remove":
                del edited[at]
            else:
                edited[at:at + (move == "change")] = [(name, _table(rng, name, earlier))]
            new = schema(_text(edited))
            found = find_splice(old, new)
            with throwaway_database(pg_server, "test") as whole_dsn:
                try:
                    load_schema(new, whole_dsn, sandbox=None)
                except SchemaLoadError:  # removed a table a later one refers to: not a schema, not made in place
                    assert found is None
                    continue
                if found is not None:
                    shadowcache._apply_splice(kept_dsn, found, lambda dsn, start, stop, new=new: load_schema(
                        new, dsn, sandbox=None, skip=start, stop=stop), None)
                    spliced += 1
                else:
                    run_sql(kept_dsn, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
                    load_schema(new, kept_dsn, sandbox=None)
                with connect(kept_dsn) as a, connect(whole_dsn) as b:
                    assert inspect.snapshot(a) == inspect.snapshot(b), (move, name, found)
            blocks, old = edited, new
    assert spliced >= 10  # the edits made in place were many, not a lucky few
