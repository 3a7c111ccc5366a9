"""The lock a step takes on each table, as the review shows it, checked against the locks PostgreSQL itself takes:
each statement run in a transaction and pg_locks read before it ends; a CONCURRENTLY statement (which cannot run in
one) started behind a session holding the table, and the lock it waits for read."""

from __future__ import annotations

import re
import threading
import time

import psycopg
import pytest

from reconciler.safety import Step
from reconciler.safety.locks import LockMode, TableLock, phase_locks, step_locks
from reconciler.servers import connect
from tests.conftest import run_sql

SCHEMA = """
CREATE TABLE t (id int PRIMARY KEY, v text, n int);
CREATE INDEX t_v_idx ON t (v);
ALTER TABLE t ADD CONSTRAINT t_n_check CHECK (n > 0) NOT VALID;
CREATE TABLE p (id int PRIMARY KEY);
CREATE TABLE c (id int, p_id int);
CREATE TABLE pt (id int) PARTITION BY RANGE (id);
CREATE TABLE pt_1 PARTITION OF pt FOR VALUES FROM (0) TO (100);
CREATE TABLE pt_x (id int);
CREATE VIEW vw AS SELECT id FROM t;
CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER t_trg BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f();
"""
IN_A_TRANSACTION = [
    ("ALTER TABLE t ADD COLUMN x int", "public.t"),
    ("ALTER TABLE t ALTER COLUMN n SET NOT NULL", "public.t"),
    ("ALTER TABLE t ADD CONSTRAINT t_n_pos CHECK (n > 0) NOT VALID", "public.t"),
    ("ALTER TABLE t VALIDATE CONSTRAINT t_n_check", "public.t"),
    ("ALTER TABLE c ADD CONSTRAINT c_fk FOREIGN KEY (p_id) REFERENCES p (id) NOT VALID", "public.c"),
    ("ALTER TABLE t ALTER COLUMN v SET STATISTICS 500", "public.t"),
    ("ALTER TABLE t DISABLE TRIGGER t_trg", "public.t"),
    ("ALTER TABLE t REPLICA IDENTITY FULL", "public.t"),
    ("ALTER TABLE t RENAME COLUMN v TO w", "public.t"),
    ("ALTER INDEX t_v_idx RENAME TO t_v_idx_b", "public.t"),
    ("ALTER TABLE pt ATTACH PARTITION pt_x FOR VALUES FROM (200) TO (300)", "public.pt"),
    ("ALTER TABLE pt DETACH PARTITION pt_1", "public.pt"),
    ("CREATE INDEX t_n_idx ON t (n)", "public.t"),
    ("DROP INDEX t_v_idx", "public.t"),
    ("CREATE TRIGGER t_trg2 AFTER UPDATE ON t FOR EACH ROW EXECUTE FUNCTION f()", "public.t"),
    ("DROP TRIGGER t_trg ON t", "public.t"),
    ("CREATE POLICY t_pol ON t USING (true)", "public.t"),
    ("LOCK TABLE t, p IN SHARE ROW EXCLUSIVE MODE", "public.t"),
    ("TRUNCATE t", "public.t"),
    ("CREATE OR REPLACE VIEW vw AS SELECT id, v FROM t", "public.vw"),
    ("CREATE TABLE pt_2 PARTITION OF pt FOR VALUES FROM (100) TO (200)", "public.pt_2"),
    ("CREATE TABLE d (id int, p_id int REFERENCES p (id))", "public.d"),
    ("COMMENT ON TABLE t IS 'rows'", "public.t"),
    ("COMMENT ON COLUMN t.v IS 'a value'", "public.t"),
    ("UPDATE t SET n = 1 WHERE id = 1", "public.t"),
    ("ANALYZE t", "public.t"),
    ("DROP TABLE c", "public.c"),
    ("DROP VIEW vw", "public.vw"),
    ("GRANT SELECT ON t TO PUBLIC", "public.t"),
]
CONCURRENTLY = [
    ("CREATE INDEX CONCURRENTLY t_n_idx ON t (n)", "public.t"),
    ("DROP INDEX CONCURRENTLY t_v_idx", "public.t"),
    ("ALTER TABLE pt DETACH PARTITION pt_1 CONCURRENTLY", "public.pt"),
]
_TABLES = """
SELECT c.oid, n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""


def _step(statement: str, table: str) -> Step:
    return Step(index=1, sql=statement, kind="test", object=table, transactional=True, hazards=(), rollback_sql=None,
                tables=(table,))


def _mode(pg_name: str) -> LockMode:
    """pg_locks's 'ShareUpdateExclusiveLock' as LockMode.SHARE_UPDATE_EXCLUSIVE."""
    return LockMode[re.sub(r"(?<!^)(?=[A-Z])", "_", pg_name.removesuffix("Lock")).upper()]


def _blocking(locks: tuple[TableLock, ...] | list[TableLock]) -> dict[str, LockMode]:
    """Locks that hold anyone up (ACCESS SHARE waits only for ACCESS EXCLUSIVE: every query takes it)."""
    return {lock.table: lock.mode for lock in locks if lock.mode > LockMode.ACCESS_SHARE}


@pytest.mark.parametrize(("statement", "table"), IN_A_TRANSACTION, ids=[s for s, _ in IN_A_TRANSACTION])
def test_the_locks_a_statement_takes_are_the_ones_postgresql_takes(database: str, statement: str, table: str) -> None:
    run_sql(database, SCHEMA)
    with connect(database, autocommit=False) as conn:
        names = dict(conn.execute(_TABLES).fetchall())
        conn.execute(statement.encode())
        taken: dict[str, LockMode] = {}
        for oid, mode in conn.execute("SELECT relation, mode FROM pg_locks WHERE pid = pg_backend_pid() AND "
                                      "locktype = 'relation' AND granted").fetchall():
            if oid in names:
                taken[names[oid]] = max(taken.get(names[oid], _mode(mode)), _mode(mode))
        conn.rollback()
    assert _blocking(step_locks(_step(statement, table))) == _blocking(
        [TableLock(name, mode) for name, mode in taken.items()])


@pytest.mark.parametrize(("statement", "table"), CONCURRENTLY, ids=[s for s, _ in CONCURRENTLY])
def test_the_lock_a_concurrent_statement_waits_for_is_the_one_named(database: str, statement: str, table: str) -> None:
    run_sql(database, SCHEMA)
    failures: list[str] = []
    with connect(database, autocommit=False) as holder, connect(database) as watcher:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE".encode())

        def run() -> None:
            try:
                with connect(database, application_name="lock under test") as conn:
                    conn.execute(statement.encode())
            except psycopg.Error as exc:
                failures.append(str(exc))

        worker = threading.Thread(target=run)
        worker.start()
        waited_for = None
        for _ in range(500):
            waited_for = watcher.execute(
                "SELECT l.mode FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE a.application_name = "
                "'lock under test' AND NOT l.granted AND l.relation = %s::regclass", (table,)).fetchone()
            if waited_for:
                break
            time.sleep(0.01)
        holder.rollback()
        worker.join(30)
    assert not failures, failures
    assert waited_for is not None, "the statement never waited for the table"
    assert _blocking(step_locks(_step(statement, table)))[table] == _mode(str(waited_for[0]))


def test_a_phase_holds_the_strongest_lock_each_of_its_steps_took() -> None:
    steps = [_step("ALTER TABLE c ADD CONSTRAINT c_fk FOREIGN KEY (p_id) REFERENCES p (id) NOT VALID", "public.c"),
             _step("CREATE INDEX t_n_idx ON t (n)", "public.t"), _step("ALTER TABLE t ADD COLUMN x int", "public.t")]
    assert phase_locks(steps) == (TableLock("public.t", LockMode.ACCESS_EXCLUSIVE),
                                  TableLock("public.c", LockMode.SHARE_ROW_EXCLUSIVE),
                                  TableLock("public.p", LockMode.SHARE_ROW_EXCLUSIVE))
    assert [lock.mode.waits for lock in phase_locks(steps)] == ["reads and writes wait", "writes wait", "writes wait"]
    assert LockMode.SHARE_UPDATE_EXCLUSIVE.waits == "reads and writes go on"
