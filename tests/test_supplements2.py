"""Aggregates, collations and text search objects on a real server: planned, rehearsed, applied and
verified (live == desired afterwards). migra emits nothing for aggregates and text search objects and a
wrong locale for ICU collations, so without the supplements these plans are refused or fail rehearsal;
kinds the snapshot sees but nothing creates (event triggers here) are refused, naming the object."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from reconciler.errors import ReconcilerError
from reconciler.plan import Plan
from reconciler.servers import Server
from tests.conftest import fetch_one, run_sql
from tests.converge import converge, load_live, plan_change, write_project

_CONCAT = """CREATE FUNCTION _concat(a text, b text) RETURNS text LANGUAGE sql IMMUTABLE
  AS $$ SELECT CASE WHEN a = '' THEN b ELSE a || ', ' || b END $$;
"""


def _statements(plan: Plan) -> list[str]:
    return [" ".join(s.sql.split()) for s in plan.body.steps]


def _has(plan: Plan, prefix: str) -> bool:
    return any(s.startswith(prefix) for s in _statements(plan))


def test_new_aggregate_used_by_a_view(tmp_path: Path, database: str, pg_server: Server) -> None:
    new = (_CONCAT + "CREATE AGGREGATE concat_all(text) (SFUNC = _concat, STYPE = text, INITCOND = '');\n"
           "CREATE AGGREGATE total(int) (SFUNC = int4pl, STYPE = int, COMBINEFUNC = int4pl, INITCOND = '0', "
           "PARALLEL = SAFE);\n"
           "CREATE TABLE t (name text, n int);\n"
           "CREATE VIEW v AS SELECT concat_all(name ORDER BY name) AS names, total(n) AS n FROM t;")
    plan = converge(tmp_path, database, pg_server, "", new)
    statements = _statements(plan)
    aggregate = next(i for i, s in enumerate(statements) if s.startswith('CREATE AGGREGATE "public"."concat_all"(text)'))
    function = next(i for i, s in enumerate(statements) if "FUNCTION public._concat" in s)
    view = next(i for i, s in enumerate(statements) if 'view "public"."v"' in s)
    assert function < aggregate < view
    run_sql(database, "INSERT INTO t VALUES ('b', 2), ('a', 3)")
    assert fetch_one(database, "SELECT names || ' ' || n FROM v") == "a, b 5"


def test_aggregate_changed_and_dropped(tmp_path: Path, database: str, pg_server: Server) -> None:
    old = (_CONCAT + "CREATE AGGREGATE concat_all(text) (SFUNC = _concat, STYPE = text, INITCOND = '');\n"
           "CREATE AGGREGATE gone(int) (SFUNC = int4pl, STYPE = int);")
    new = (_CONCAT + "CREATE FUNCTION _finish(s text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT '[' || s || ']' $$;\n"
           "CREATE AGGREGATE concat_all(text) (SFUNC = _concat, STYPE = text, FINALFUNC = _finish, INITCOND = '');")
    plan = converge(tmp_path, database, pg_server, old, new)
    assert _has(plan, 'DROP AGGREGATE "public"."gone"(integer)')
    assert _has(plan, 'DROP AGGREGATE "public"."concat_all"(text)')
    assert fetch_one(database, "SELECT concat_all(x) FROM (VALUES ('a'), ('b')) v(x)") == "[a, b]"


def test_changed_aggregate_used_by_a_kept_view_is_refused(tmp_path: Path, database: str, pg_server: Server) -> None:
    view = "CREATE VIEW v AS SELECT concat_all(x) FROM (VALUES ('a')) t(x);"
    load_live(tmp_path, database, _CONCAT + "CREATE AGGREGATE concat_all(text) (SFUNC = _concat, STYPE = text);" + view)
    config = write_project(tmp_path, database, pg_server,
                           _CONCAT + "CREATE AGGREGATE concat_all(text) (SFUNC = _concat, STYPE = text, INITCOND = '');"
                           + view)
    with pytest.raises(ReconcilerError, match=r"aggregate public\.concat_all\(text\) changes .* but view public\.v uses it"):
        plan_change(config)


def test_text_search_configuration_and_dictionary(tmp_path: Path, database: str, pg_server: Server) -> None:
    new = ("CREATE TEXT SEARCH DICTIONARY english_stop (TEMPLATE = simple, STOPWORDS = english, ACCEPT = false);\n"
           "CREATE TEXT SEARCH CONFIGURATION docs (COPY = pg_catalog.simple);\n"
           "ALTER TEXT SEARCH CONFIGURATION docs ALTER MAPPING FOR asciiword, word WITH english_stop, simple;\n"
           "CREATE FUNCTION doc_vector(body text) RETURNS tsvector LANGUAGE sql IMMUTABLE\n"
           "  AS $$ SELECT to_tsvector('public.docs', body) $$;\n"
           "CREATE TABLE doc (id int, body text);\n"
           "CREATE INDEX doc_fts ON doc USING gin (to_tsvector('public.docs'::regconfig, body));\n"
           "CREATE INDEX doc_fts2 ON doc USING gin (doc_vector(body));")
    plan = converge(tmp_path, database, pg_server, "CREATE TABLE doc (id int, body text);", new)
    assert _has(plan, 'CREATE TEXT SEARCH CONFIGURATION "public"."docs"')
    assert fetch_one(database, "SELECT doc_vector('the cat')::text") == "'cat':2"


def test_text_search_changed_in_place(tmp_path: Path, database: str, pg_server: Server) -> None:
    old = ("CREATE TEXT SEARCH DICTIONARY stop (TEMPLATE = simple, STOPWORDS = english, ACCEPT = false);\n"
           "CREATE TEXT SEARCH DICTIONARY gone (TEMPLATE = simple);\n"
           "CREATE TEXT SEARCH CONFIGURATION docs (COPY = pg_catalog.simple);\n"
           "ALTER TEXT SEARCH CONFIGURATION docs ALTER MAPPING FOR asciiword WITH stop, simple;\n"
           "ALTER TEXT SEARCH CONFIGURATION docs DROP MAPPING FOR email;\n"
           "CREATE TEXT SEARCH CONFIGURATION old_cfg (PARSER = default);\n"
           "CREATE TABLE doc (body text); CREATE INDEX doc_fts ON doc USING gin (to_tsvector('public.docs'::regconfig, body));")
    new = ("CREATE TEXT SEARCH DICTIONARY stop (TEMPLATE = simple, STOPWORDS = english);\n"
           "CREATE TEXT SEARCH CONFIGURATION docs (COPY = pg_catalog.simple);\n"
           "ALTER TEXT SEARCH CONFIGURATION docs ALTER MAPPING FOR word WITH stop, simple;\n"
           "ALTER TEXT SEARCH CONFIGURATION docs DROP MAPPING FOR url;\n"
           "CREATE TABLE doc (body text); CREATE INDEX doc_fts ON doc USING gin (to_tsvector('public.docs'::regconfig, body));")
    plan = converge(tmp_path, database, pg_server, old, new)
    assert _has(plan, 'ALTER TEXT SEARCH DICTIONARY "public"."stop"')
    assert _has(plan, 'DROP TEXT SEARCH CONFIGURATION "public"."old_cfg"')
    assert not any(s.startswith('DROP TEXT SEARCH CONFIGURATION "public"."docs"') for s in _statements(plan))


def test_libc_collation(tmp_path: Path, database: str, pg_server: Server) -> None:
    old = "CREATE COLLATION gone (provider = libc, locale = 'C'); CREATE TABLE t (id int);"
    new = ("CREATE COLLATION bytewise (provider = libc, lc_collate = 'C', lc_ctype = 'POSIX');\n"
           "CREATE DOMAIN code AS text COLLATE bytewise;\n"
           "CREATE TABLE t (id int, name text COLLATE bytewise, c code);\n"
           "CREATE INDEX t_name ON t (name COLLATE bytewise);")
    plan = converge(tmp_path, database, pg_server, old, new)
    assert _has(plan, """CREATE COLLATION "public"."bytewise" (PROVIDER = libc, LC_COLLATE = 'C', LC_CTYPE = 'POSIX')""")
    assert _has(plan, 'DROP COLLATION "public"."gone"')


def test_icu_collation(tmp_path: Path, database: str, pg_server: Server) -> None:
    try:
        run_sql(database, "CREATE COLLATION icu_probe (provider = icu, locale = 'und'); DROP COLLATION icu_probe")
    except psycopg.errors.FeatureNotSupported:
        pytest.skip(f"PostgreSQL {pg_server.major_version} here is built without ICU")
    new = ("CREATE COLLATION numeric_first (provider = icu, locale = '@colCaseFirst=lower;colNumeric=yes');\n"
           "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);\n"
           "CREATE TABLE t (name text COLLATE numeric_first, tag text COLLATE ci);")
    plan = converge(tmp_path, database, pg_server, "", new)
    assert _has(plan, 'CREATE COLLATION "public"."ci" (PROVIDER = icu, LOCALE = ')
    assert fetch_one(database, "SELECT 'a10' > 'a9' COLLATE numeric_first")


def test_event_trigger_is_refused_naming_it(tmp_path: Path, database: str, pg_server: Server) -> None:
    """The snapshot sees event triggers, nothing creates them: refused at plan time, never skipped."""
    load_live(tmp_path, database, "")
    config = write_project(tmp_path, database, pg_server,
                           "CREATE FUNCTION audit_ddl() RETURNS event_trigger LANGUAGE plpgsql AS 'BEGIN END';\n"
                           "CREATE EVENT TRIGGER audit_ddl ON ddl_command_end EXECUTE FUNCTION audit_ddl();")
    with pytest.raises(ReconcilerError, match=r"event trigger audit_ddl \(missing\)"):
        plan_change(config)
