"""splice.find_splice: which edits in the middle of a schema may be made to the previous schema's loaded database in
place (the statements after the edit kept), and which must load as usual. Parse trees only, no database; the
databases it gives are compared with loading in order in test_shadow_cache."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from reconciler.source import DesiredSchema, SchemaFile
from reconciler.splice import Drop, find_splice

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
    pytest.param(OLD, schema(*BEFORE, "ALTER TABLE users ADD COLUMN x int;", *AFTER),
                 "AlterTableStmt on an object they do not create", id="edit-alters-earlier"),
    pytest.param(OLD, schema(*BEFORE, "CREATE TABLE orders_archive (id int);", *AFTER),
                 "'orders_archive' and the name 'orders'", id="name-prefix"),
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
