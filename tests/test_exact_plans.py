"""Exact plans: a plan re-creates only what PostgreSQL requires, and what it re-creates comes back with everything it
had (grants, owner, comment, options, indexes, triggers); apply refuses to commit a loss the plan did not foresee."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.apply import ApplyOptions, apply_plan
from reconciler.errors import ApplyError
from reconciler.servers import Server, connect
from tests.conftest import fetch_one, run_sql
from tests.converge import apply_and_verify, converge, load_live, plan_change, write_project


def _roles(server: Server, *names: str) -> None:
    with connect(server.dsn) as conn:
        for name in names:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                conn.execute(f'CREATE ROLE "{name}"'.encode())


def _acl(database: str, relation: str) -> str:
    return str(fetch_one(database, f"SELECT array_to_string(relacl, ',') FROM pg_class WHERE oid = '{relation}'::regclass"))


BASE = """
CREATE TABLE projects (id bigint PRIMARY KEY, name text, done int, archived boolean NOT NULL DEFAULT false);
CREATE VIEW names AS SELECT id, name FROM projects;
CREATE VIEW progress AS SELECT p.id, p.name, count(*) AS n FROM projects p GROUP BY p.id;
CREATE VIEW everything AS SELECT * FROM projects;
CREATE VIEW on_names AS SELECT name FROM names;
CREATE MATERIALIZED VIEW done AS SELECT id, done FROM projects;
CREATE INDEX done_id ON done (id);
"""


def test_adding_a_column_in_the_middle_recreates_no_view(tmp_path: Path, database: str, pg_server: Server) -> None:
    """migra re-creates every view over a table whose columns no longer start alike; PostgreSQL needs none of it.
    Only the view whose ``SELECT *`` now reads the new column changes (its columns move: dropped and created)."""
    _roles(pg_server, "reporting")
    new = BASE.replace("done int,", "done int, budget numeric,")
    load_live(tmp_path, database, BASE + "GRANT SELECT ON names, done, everything TO reporting;")
    config = write_project(tmp_path, database, pg_server, new)
    plan = plan_change(config)
    assert [(s.kind, s.object) for s in plan.body.steps if not s.kind.startswith("grant")] == [
        ("drop_view", "public.everything"), ("add_column", "public.projects.budget"),
        ("replace_view", "public.everything")]
    apply_and_verify(config, plan, database)
    for relation in ("names", "done", "everything"):
        assert "reporting=r/" in _acl(database, relation)


def test_a_view_recreated_because_a_column_changes_type_keeps_what_it_had(tmp_path: Path, database: str,
                                                                          pg_server: Server) -> None:
    """Only the views over the retyped column (and those over them) are re-created, and each comes back with its
    owner, table and column grants, comment, options, indexes and triggers; the others are not touched."""
    _roles(pg_server, "reporting", "view_owner")
    attached = """
    COMMENT ON VIEW names IS 'project names';
    ALTER VIEW names SET (security_barrier = true);
    CREATE FUNCTION names_insert() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
    CREATE TRIGGER names_insert INSTEAD OF INSERT ON names FOR EACH ROW EXECUTE FUNCTION names_insert();
    COMMENT ON MATERIALIZED VIEW done IS 'finished';
    """
    old = BASE.replace("CREATE MATERIALIZED VIEW done AS SELECT id, done", "CREATE MATERIALIZED VIEW done AS SELECT id, name")
    load_live(tmp_path, database, old + attached + """
        GRANT SELECT ON names, on_names, done, progress TO reporting;
        GRANT UPDATE (name) ON names TO reporting;
        ALTER VIEW on_names OWNER TO view_owner;
        REVOKE ALL ON progress FROM reporting;
        GRANT SELECT ON everything TO reporting WITH GRANT OPTION;
    """)
    new = old.replace("name text,", "name varchar(200),") + attached
    config = write_project(tmp_path, database, pg_server, new)
    plan = plan_change(config)
    recreated = sorted(s.object for s in plan.body.steps if s.kind in ("drop_view", "drop_matview"))
    # names, on_names (over names), done (uses name), everything (uses name); progress uses name too
    assert recreated == ["public.done", "public.everything", "public.names", "public.on_names", "public.progress"]
    apply_and_verify(config, plan, database)
    assert "reporting=r/" in _acl(database, "names") and "reporting=r/" in _acl(database, "done")
    assert "reporting=r*/" in _acl(database, "everything")
    assert "reporting" not in _acl(database, "progress")
    assert fetch_one(database, "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'on_names'::regclass") \
        == "view_owner"
    assert "reporting=r/view_owner" in _acl(database, "on_names")
    assert fetch_one(database, "SELECT array_to_string(attacl, ',') FROM pg_attribute "
                               "WHERE attrelid = 'names'::regclass AND attname = 'name'").startswith("reporting=w/")
    assert fetch_one(database, "SELECT obj_description('names'::regclass)") == "project names"
    assert fetch_one(database, "SELECT obj_description('done'::regclass)") == "finished"
    assert fetch_one(database, "SELECT reloptions::text FROM pg_class WHERE oid = 'names'::regclass") \
        == "{security_barrier=true}"
    assert fetch_one(database, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'names'::regclass") == 1
    assert fetch_one(database, "SELECT count(*) FROM pg_index WHERE indrelid = 'done'::regclass") == 1


def test_routines_and_types_recreated_keep_their_grants(tmp_path: Path, database: str, pg_server: Server) -> None:
    """A function whose result type changes, a procedure whose parameter is renamed, are dropped and created again;
    an enum that loses a value is rebuilt:
    both come back with EXECUTE / USAGE as live had them, PUBLIC's revoked default included."""
    _roles(pg_server, "reporting")
    grants = """
    REVOKE ALL ON FUNCTION total(int) FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION total(int) TO reporting;
    REVOKE ALL ON PROCEDURE tidy(int) FROM PUBLIC;
    GRANT EXECUTE ON PROCEDURE tidy(int) TO reporting;
    REVOKE ALL ON TYPE mood FROM PUBLIC;
    GRANT USAGE ON TYPE mood TO reporting;
    """
    old = """
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE FUNCTION total(a int) RETURNS int LANGUAGE sql AS 'SELECT a';
    CREATE PROCEDURE tidy(x int) LANGUAGE sql AS 'SELECT 1';
    """
    new = """
    CREATE TYPE mood AS ENUM ('sad', 'happy');
    CREATE FUNCTION total(a int) RETURNS bigint LANGUAGE sql AS 'SELECT a::bigint';
    CREATE PROCEDURE tidy(y int) LANGUAGE sql AS 'SELECT 1';
    """
    comments = "COMMENT ON TYPE mood IS 'feelings'; COMMENT ON FUNCTION total(int) IS 'sums';"
    load_live(tmp_path, database, old + grants + comments)
    config = write_project(tmp_path, database, pg_server, new + comments)
    plan = plan_change(config)
    assert {"drop_function", "drop_procedure"} <= {s.kind for s in plan.body.steps}
    apply_and_verify(config, plan, database)
    assert "reporting=X/" in str(fetch_one(database, "SELECT array_to_string(proacl, ',') FROM pg_proc "
                                                     "WHERE proname = 'total'"))
    assert not fetch_one(database, "SELECT has_function_privilege('public', 'total(int)', 'EXECUTE')")
    assert "reporting=X/" in str(fetch_one(database, "SELECT array_to_string(proacl, ',') FROM pg_proc "
                                                     "WHERE proname = 'tidy'"))
    assert not fetch_one(database, "SELECT has_function_privilege('public', 'tidy(int)', 'EXECUTE')")
    assert "reporting=U/" in str(fetch_one(database, "SELECT array_to_string(typacl, ',') FROM pg_type "
                                                     "WHERE typname = 'mood'"))
    assert not fetch_one(database, "SELECT has_type_privilege('public', 'mood', 'USAGE')")
    assert fetch_one(database, "SELECT obj_description('mood'::regtype, 'pg_type')") == "feelings"
    assert fetch_one(database, "SELECT obj_description('total(int)'::regprocedure, 'pg_proc')") == "sums"


def test_apply_refuses_to_commit_a_grant_lost_that_the_plan_did_not_foresee(tmp_path: Path, database: str,
                                                                            pg_server: Server) -> None:
    """A grant given after the plan was made (privileges are not managed, so the plan is still fresh) would be lost
    when the plan re-creates its view: apply checks what every object held before the steps, and undoes."""
    _roles(pg_server, "reporting")
    old = "CREATE TABLE t (id bigint, a text); CREATE VIEW v AS SELECT id, a FROM t;"
    load_live(tmp_path, database, old)
    config = write_project(tmp_path, database, pg_server, old.replace("a text", "a varchar(10)"))
    plan = plan_change(config)
    assert "drop_view" in {s.kind for s in plan.body.steps}
    run_sql(database, "GRANT SELECT ON v TO reporting")
    with pytest.raises(ApplyError, match=r"view public\.v privileges lost \"?reporting\"?:SELECT"):
        apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler"))
    assert "reporting=r/" in _acl(database, "v")
    assert fetch_one(database, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                               "WHERE attrelid = 't'::regclass AND attname = 'a'") == "text"


def test_sql_standard_bodies_load_and_converge(tmp_path: Path, database: str, pg_server: Server) -> None:
    """BEGIN ATOMIC ... END holds semicolons that do not end the statement (PostgreSQL 14+)."""
    new = """
    CREATE TABLE counts (n int);
    CREATE FUNCTION bump(x int) RETURNS int LANGUAGE sql
    BEGIN ATOMIC
        SELECT x + 1;
        SELECT x + 2;
    END;
    CREATE PROCEDURE add_one() LANGUAGE sql BEGIN ATOMIC INSERT INTO counts VALUES (1); INSERT INTO counts VALUES (2); END;
    CREATE VIEW after_bump AS SELECT bump(n) FROM counts;
    """
    converge(tmp_path, database, pg_server, "", new, replan=True)
    assert fetch_one(database, "SELECT bump(1)") == 3
    run_sql(database, "CALL add_one()")
    assert fetch_one(database, "SELECT count(*) FROM counts") == 2


def test_a_plan_that_drops_every_table_is_refused_unless_asked_for(tmp_path: Path, database: str,
                                                                   pg_server: Server) -> None:
    """An empty (comments only) desired schema reads as "drop everything": refused, exit 3, naming the count and
    the way to allow it; the flag, or the environment's setting, lets it plan. Every table of one schema counts
    too; dropping one of several does not."""
    from tests.target import Target

    target = Target(tmp_path, database, pg_server)  # live: parents, items
    run_sql(database, "CREATE SCHEMA audit; CREATE TABLE audit.log (id int); CREATE TABLE c (id int);")
    kept = ("CREATE TABLE parents (id bigint PRIMARY KEY, name text);"
            "CREATE TABLE items (id bigint PRIMARY KEY, parent_id bigint, note text, legacy text);")
    target.desired("-- everything moved elsewhere\n")
    result = target.run("plan")
    assert result.returncode == 3, result.stderr
    assert "drops 4 of the target's 4 table(s)" in result.stderr and "--allow-mass-drops" in result.stderr
    assert "allow_mass_drops: true for environment 'test'" in result.stderr
    assert target.run("apply", "--auto").returncode == 3
    assert fetch_one(database, "SELECT count(*) FROM pg_tables WHERE tablename IN ('parents', 'items', 'c', 'log')") == 4
    assert target.run("plan", "--allow-mass-drops").returncode == 2

    target.desired(kept + "CREATE TABLE c (id int);")  # audit.log goes: every table of schema audit
    result = target.run("plan")
    assert result.returncode == 3 and "every table of schema audit" in result.stderr, result.stderr
    target.desired(kept + "CREATE SCHEMA audit; CREATE TABLE audit.log (id int);")  # c goes: one of four
    assert target.run("plan").returncode == 2, target.run("plan").stderr
    config = tmp_path / "reconciler.yaml"
    config.write_text(config.read_text() + "    allow_mass_drops: true\n")
    target.desired("")
    assert target.run("plan").returncode == 2


ROW_TYPES = """
CREATE TABLE t (id bigint PRIMARY KEY, n int);
CREATE FUNCTION first_t() RETURNS t LANGUAGE sql AS 'SELECT * FROM t LIMIT 1';
CREATE DOMAIN t_dom AS t;
CREATE TABLE holder (id int, item t);
CREATE TYPE pair AS (a t, b t);
CREATE FUNCTION is_even(x int) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT x % 2 = 0';
CREATE DOMAIN even_int AS int CHECK (is_even(VALUE));
CREATE TABLE t2 (id bigint PRIMARY KEY, n even_int DEFAULT 2, m int CHECK (is_even(m)));
CREATE FUNCTION cnt() RETURNS bigint LANGUAGE sql BEGIN ATOMIC SELECT count(*) FROM t2; END;
CREATE VIEW counted AS SELECT cnt();
"""


def test_objects_are_made_and_dropped_in_the_order_they_need_each_other(tmp_path: Path, database: str,
                                                                         pg_server: Server) -> None:
    """A domain whose CHECK calls a function, a domain, composite type and function over a table's row type, a
    table with a column of such a domain, a SQL-standard body over a table: made after what they need (the desired
    database's pg_depend), and dropped before what they need (live's)."""
    converge(tmp_path / "make", database, pg_server, "", ROW_TYPES, replan=True)
    assert fetch_one(database, "SELECT (first_t()).id IS NULL")
    plan = converge(tmp_path / "drop", database, pg_server, "", "CREATE TABLE other (id int);", replan=True)
    assert {s.kind for s in plan.body.steps} >= {"drop_domain", "drop_type", "drop_table", "drop_function"}


def test_a_unique_constraint_replaced_by_a_primary_key_that_foreign_keys_use(tmp_path: Path, database: str,
                                                                              pg_server: Server) -> None:
    """The foreign key leans on the UNIQUE constraint's index, which cannot go while it does: the key is dropped
    first and added again (NOT VALID, then validated) once the primary key is there."""
    old = """
    CREATE TABLE a (id bigint NOT NULL, CONSTRAINT a_id_key UNIQUE (id));
    CREATE TABLE b (id bigint, a_id bigint REFERENCES a (id));
    INSERT INTO a VALUES (1), (2); INSERT INTO b VALUES (1, 1), (2, 2);
    """
    new = """
    CREATE TABLE a (id bigint NOT NULL, CONSTRAINT a_pkey PRIMARY KEY (id));
    CREATE TABLE b (id bigint, a_id bigint REFERENCES a (id));
    """
    plan = converge(tmp_path, database, pg_server, old, new, replan=True)
    kinds = [(s.kind, s.object) for s in plan.body.steps]
    assert kinds.index(("drop_constraint", "public.b.b_a_id_fkey")) < kinds.index(("drop_constraint", "public.a.a_id_key"))
    assert fetch_one(database, "SELECT conindid::regclass::text FROM pg_constraint WHERE conname = 'b_a_id_fkey'") \
        == "a_pkey"
    assert fetch_one(database, "SELECT convalidated FROM pg_constraint WHERE conname = 'b_a_id_fkey'") is True


def test_views_and_checks_end_identical_to_a_database_loaded_from_the_files(tmp_path: Path, database: str,
                                                                           pg_server: Server) -> None:
    """PostgreSQL's printed text of these reads back with its casts moved: created from the files' own text, the
    target's catalog is the one a database loaded from the files has, not an equivalent one."""
    from reconciler.servers import throwaway_database

    new = """
    CREATE TABLE a (id bigint PRIMARY KEY, status varchar(10), kind varchar(5),
                    CONSTRAINT status_ok CHECK (status IN ('a', 'b')));
    ALTER TABLE a ADD CONSTRAINT kind_ok CHECK (kind IN ('x', 'y')) NOT VALID;
    CREATE VIEW w AS SELECT id FROM a WHERE status IN ('a', 'b') WITH CHECK OPTION;
    CREATE MATERIALIZED VIEW m AS SELECT id, kind FROM a WHERE kind IN ('x') WITH NO DATA;
    """
    read = ("SELECT string_agg(x, ' | ' ORDER BY x) FROM ("
            "SELECT conname || ': ' || pg_get_constraintdef(oid) AS x FROM pg_constraint WHERE contype = 'c' "
            "AND connamespace = 'public'::regnamespace "
            "UNION ALL SELECT relname || ': ' || pg_get_viewdef(oid) FROM pg_class WHERE relname IN ('w', 'm')) d")
    plan = converge(tmp_path, database, pg_server, "CREATE TABLE a (id bigint PRIMARY KEY);", new, replan=True)
    assert any("status IN ('a', 'b')" in s.sql for s in plan.body.steps)
    with throwaway_database(pg_server, "reference") as reference:
        run_sql(reference, new)
        assert fetch_one(database, read) == fetch_one(reference, read)


def test_triggers_and_policies_recreated_keep_their_comments(tmp_path: Path, database: str, pg_server: Server) -> None:
    """A trigger whose definition changes and a policy that becomes restrictive are dropped and created again: the
    comments the desired schema gives them come back with them."""
    body = """
    CREATE TABLE t (id int, n int);
    ALTER TABLE t ENABLE ROW LEVEL SECURITY;
    CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
    COMMENT ON TRIGGER touch_t ON t IS 'keeps n fresh';
    COMMENT ON POLICY only_positive ON t IS 'no negatives';
    """
    old = body.replace("COMMENT ON TRIGGER", """
    CREATE TRIGGER touch_t BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION touch();
    CREATE POLICY only_positive ON t AS PERMISSIVE USING (n > 0);
    COMMENT ON TRIGGER""")
    new = body.replace("COMMENT ON TRIGGER", """
    CREATE TRIGGER touch_t BEFORE INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION touch();
    CREATE POLICY only_positive ON t AS RESTRICTIVE USING (n > 0);
    COMMENT ON TRIGGER""")
    plan = converge(tmp_path, database, pg_server, old, new, replan=True)
    assert {"drop_trigger", "drop_policy"} <= {s.kind for s in plan.body.steps}
    assert fetch_one(database, "SELECT obj_description(oid, 'pg_trigger') FROM pg_trigger WHERE tgname = 'touch_t'") \
        == "keeps n fresh"
    assert fetch_one(database, "SELECT obj_description(oid, 'pg_policy') FROM pg_policy WHERE polname = 'only_positive'") \
        == "no negatives"


def test_the_example_schema_converges_and_checks_keep_their_spelling(tmp_path: Path, database: str,
                                                                      pg_server: Server) -> None:
    """The repository's own schemas/ (what README's first command applies) from an empty database; and a CHECK whose
    expression a deparse would spell otherwise (TRIM(BOTH FROM x) becomes btrim(x), another stored expression),
    added to a new table validated and to an existing one NOT VALID then validated, reads back as written."""
    example = Path(__file__).resolve().parents[1] / "schemas"
    new = "\n".join(p.read_text() for p in sorted(example.glob("*.sql")))
    converge(tmp_path / "example", database, pg_server, "", new, replan=True)
    with connect(database) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    checks = "CHECK (length(trim(title)) > 0)"
    old = "CREATE TABLE old_t (id int, title text);"
    new = (f"CREATE TABLE old_t (id int, title text, CONSTRAINT old_title {checks});"
           f"CREATE TABLE new_t (id int, title text, CONSTRAINT new_title {checks});")
    converge(tmp_path / "trim", database, pg_server, old, new, replan=True)
    assert fetch_one(database, "SELECT count(*) FROM pg_constraint WHERE pg_get_constraintdef(oid) "
                               "= 'CHECK ((length(TRIM(BOTH FROM title)) > 0))'") == 2


_PARTITIONED = """
CREATE TABLE events (id int, kind text, at date, CHECK (id > 0)) PARTITION BY LIST (kind);
CREATE UNIQUE INDEX events_kind_id ON events (kind, id);
"""


def _index_partitions(database: str, table: str) -> list[tuple[str, str | None, str | None]]:
    """Each index of ``table``: its name, the parent index it is a partition of, its constraint's type."""
    with connect(database) as conn:
        return [(str(r[0]), r[1], r[2]) for r in conn.execute(
            "SELECT x.relname, (SELECT p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent"
            "                   WHERE i.inhrelid = x.oid), (SELECT c.contype::text FROM pg_constraint c"
            "                   WHERE c.conindid = x.oid AND c.conrelid = ix.indrelid)"
            " FROM pg_index ix JOIN pg_class x ON x.oid = ix.indexrelid WHERE ix.indrelid = %s::regclass"
            " ORDER BY 1", (table,)).fetchall()]


def test_a_new_partition_whose_own_key_backs_the_parents_index_is_attached(tmp_path: Path, database: str,
                                                                          pg_server: Server) -> None:
    """The desired partition was made with its own primary key before the parent's index, which adopted it.
    PARTITION OF would clone the parent's index first and the key could never be attached: the partition is
    made as a plain table of the parent's shape, keyed, then attached."""
    load_live(tmp_path, database, _PARTITIONED)
    new = _PARTITIONED.replace("CREATE UNIQUE INDEX", """
        CREATE TABLE events_a PARTITION OF events (PRIMARY KEY (kind, id)) FOR VALUES IN ('a');
        CREATE UNIQUE INDEX""")
    config = write_project(tmp_path, database, pg_server, new)
    plan = plan_change(config)
    assert not any("PARTITION OF" in s.sql.upper() for s in plan.body.steps)
    kinds = [s.kind for s in plan.body.steps]
    assert kinds.index("add_primary_key") < kinds.index("attach_partition")
    assert "attach_index_partition" not in kinds  # the attach adopts the key
    apply_and_verify(config, plan, database)
    assert _index_partitions(database, "events_a") == [("events_a_pkey", "events_kind_id", "p")]
    assert fetch_one(database, "SELECT conislocal::text FROM pg_constraint WHERE conname = 'events_id_check'"
                               " AND conrelid = 'events_a'::regclass") == "false"


def test_a_partitions_own_key_waits_for_the_parents_key_it_stands_beside(tmp_path: Path, database: str,
                                                                       pg_server: Server) -> None:
    """The desired parent's UNIQUE constraint cloned a key onto the partition, which then got a primary key of
    its own on the same columns. Added first, the primary key would be adopted by the parent's constraint."""
    load_live(tmp_path, database, "CREATE TABLE other (id int);")
    new = """
    CREATE TABLE other (id int);
    CREATE TABLE events (id int NOT NULL, kind text NOT NULL, UNIQUE (kind, id)) PARTITION BY LIST (kind);
    CREATE TABLE events_a PARTITION OF events (PRIMARY KEY (kind, id)) FOR VALUES IN ('a');
    """
    config = write_project(tmp_path, database, pg_server, new)
    plan = plan_change(config)
    objects = [s.object for s in plan.body.steps]
    assert objects.index("public.events.events_kind_id_key") < objects.index("public.events_a.events_a_pkey")
    apply_and_verify(config, plan, database)
    assert _index_partitions(database, "events_a") == [
        ("events_a_kind_id_key", "events_kind_id_key", "u"), ("events_a_pkey", None, "p")]
