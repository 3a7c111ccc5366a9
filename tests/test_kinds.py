"""Object kinds whose catalog state a plan used to get wrong on a real server: comments on objects the plan
creates, table inheritance, extension versions, domains whose CHECK holds a quoted regular expression. Each is
planned, rehearsed, applied and verified (live == desired afterwards), and drift sees what the plan fixes."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.config import load_config
from reconciler.inspect import ObjectDifference
from reconciler.pipeline import drift, open_servers
from reconciler.servers import Server
from tests.conftest import fetch_one
from tests.converge import converge, load_live, write_project


def _drift(config_path: Path) -> list[ObjectDifference]:
    config = load_config(config_path)
    with open_servers(config, config.environment("test")) as servers:
        return drift(config, servers)


# --- comments on objects the plan creates ----------------------------------------------------------

_TABLE = "CREATE TABLE t (id int PRIMARY KEY, a int);\n"
_TRIGGER_FUNCTION = "CREATE FUNCTION tf() RETURNS trigger LANGUAGE plpgsql AS 'begin return new; end';\n"

# kind -> (the objects and their comment, the comment read back from the target)
COMMENTED = {
    "trigger": (_TRIGGER_FUNCTION + "CREATE TRIGGER trg BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION tf();\n"
                "COMMENT ON TRIGGER trg ON t IS 'the trigger';",
                "SELECT obj_description(oid, 'pg_trigger') FROM pg_trigger WHERE tgname = 'trg'"),
    "policy": ("CREATE POLICY pol ON t USING (a > 0); COMMENT ON POLICY pol ON t IS 'the policy';",
               "SELECT obj_description(oid, 'pg_policy') FROM pg_policy WHERE polname = 'pol'"),
    "rule": ("CREATE RULE r AS ON UPDATE TO t DO ALSO NOTIFY t;\nCOMMENT ON RULE r ON t IS 'the rule';",
             "SELECT obj_description(oid, 'pg_rewrite') FROM pg_rewrite WHERE rulename = 'r'"),
    "check constraint": ("ALTER TABLE t ADD CONSTRAINT a_positive CHECK (a > 0);\n"
                         "COMMENT ON CONSTRAINT a_positive ON t IS 'the check';",
                         "SELECT obj_description(oid, 'pg_constraint') FROM pg_constraint WHERE conname = 'a_positive'"),
    "index": ("CREATE INDEX t_a ON t (a); COMMENT ON INDEX t_a IS 'the index';",
              "SELECT obj_description('t_a'::regclass, 'pg_class')"),
    "function": ("CREATE FUNCTION twice(x int) RETURNS int LANGUAGE sql AS 'select 2 * x';\n"
                 "COMMENT ON FUNCTION twice(int) IS 'the function';",
                 "SELECT obj_description('twice(int)'::regprocedure, 'pg_proc')"),
    "enum type": ("CREATE TYPE mood AS ENUM ('ok'); COMMENT ON TYPE mood IS 'the enum';",
                  "SELECT obj_description('mood'::regtype, 'pg_type')"),
    "domain": ("CREATE DOMAIN positive AS int CONSTRAINT positive_check CHECK (VALUE > 0);\n"
               "COMMENT ON DOMAIN positive IS 'the domain';\n"
               "COMMENT ON CONSTRAINT positive_check ON DOMAIN positive IS 'the domain check';",
               "SELECT obj_description('positive'::regtype, 'pg_type') || ' / ' || obj_description(oid, 'pg_constraint') "
               "FROM pg_constraint WHERE conname = 'positive_check'"),
    "sequence": ("CREATE SEQUENCE counter; COMMENT ON SEQUENCE counter IS 'the sequence';",
                 "SELECT obj_description('counter'::regclass, 'pg_class')"),
    "column of a new table": ("CREATE TABLE n (x int); COMMENT ON COLUMN n.x IS 'the column';",
                              "SELECT col_description('n'::regclass, 1)"),
    "operator": ("CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq);\n"
                 "CREATE OPERATOR !!! (RIGHTARG = int, FUNCTION = int4abs);\n"
                 "COMMENT ON OPERATOR === (int, int) IS 'infix'; COMMENT ON OPERATOR !!! (NONE, int) IS 'prefix';",
                 "SELECT string_agg(obj_description(oid, 'pg_operator'), ' / ' ORDER BY oprname DESC) FROM pg_operator "
                 "WHERE oprname IN ('===', '!!!')"),
}
EXPECTED = {"domain": "the domain / the domain check", "operator": "infix / prefix"}


# objects live has already (nothing creates rules yet: the rule's comment is set on one live has)
ALREADY = {"rule": "CREATE RULE r AS ON UPDATE TO t DO ALSO NOTIFY t;\n"}


@pytest.mark.parametrize("kind", sorted(COMMENTED))
def test_comment_on_an_object_the_plan_creates(kind: str, tmp_path: Path, database: str, pg_server: Server) -> None:
    objects, read_back = COMMENTED[kind]
    plan = converge(tmp_path, database, pg_server, _TABLE + ALREADY.get(kind, ""), _TABLE + objects)
    assert any(s.kind == "comment" for s in plan.body.steps)
    want = EXPECTED.get(kind) or objects.rsplit("'", 2)[-2]
    assert fetch_one(database, read_back) == want


@pytest.mark.parametrize("kind", ["trigger", "policy", "rule"])
def test_drift_sees_a_missing_comment_on_a_table_s_object(kind: str, tmp_path: Path, database: str,
                                                          pg_server: Server) -> None:
    """Triggers, policies and rules have no schema of their own in the catalog: their comments were left out."""
    objects = COMMENTED[kind][0]
    without_comment = objects[:objects.index("COMMENT ON")]
    load_live(tmp_path, database, _TABLE + without_comment)
    config = write_project(tmp_path, database, pg_server, _TABLE + objects)
    name = {"trigger": "trg", "policy": "pol", "rule": "r"}[kind]
    assert _drift(config) == [ObjectDifference("comment", f"{kind} {name} on public.t", "missing")]
