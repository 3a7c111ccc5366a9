"""What the tool hands to programs and reads back from disk: pg_dump and friends connect with the caller's libpq
settings (PGPASSFILE here), and saved inspections are unpickled only from the user's own private files."""

from __future__ import annotations

import os
import pickle
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from reconciler import dsn as dsnlib
from reconciler.diff.inspections import InspectionCache
from reconciler.servers import Server, connect, libpq_env, service_account
from tests.conftest import fetch_one, run_sql

EXE = str(Path(sys.executable).with_name("reconciler"))


def test_client_programs_keep_the_callers_libpq_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", "/etc/ca.pem"), ("PGPASSFILE", "/run/pgpass")):
        monkeypatch.setenv(name, value)
    conninfo, env = libpq_env("host=db.example user=app password=s3cret dbname=app")
    assert (env["PGSSLMODE"], env["PGSSLROOTCERT"], env["PGPASSFILE"]) == ("verify-full", "/etc/ca.pem", "/run/pgpass")
    assert env["PGPASSWORD"] == "s3cret" and "s3cret" not in conninfo  # the password in the environment, never argv
    assert psycopg.conninfo.conninfo_to_dict(conninfo)["connect_timeout"] == "10"  # as the tool's own connections


@pytest.mark.skipif(bool(os.environ.get("RECONCILER_TEST_DSN")), reason="edits the test server's pg_hba.conf")
def test_backup_uses_the_password_file_the_tool_connected_with(tmp_path: Path, database: str, pg_server: Server) -> None:
    """A role that must give a password, and the password in PGPASSFILE only: the tool connects with it, and so must
    pg_dump (it once ran with every PG* variable removed, and could not log in)."""
    role, password = f"pw_{secrets.token_hex(4)}", secrets.token_hex(12)
    run_sql(pg_server.dsn, f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
    hba = Path(str(fetch_one(pg_server.dsn, "SHOW hba_file")))
    original = hba.read_text()
    try:
        hba.write_text(f"local all {role} scram-sha-256\n" + original)  # first match: only this role needs a password
        run_sql(pg_server.dsn, "SELECT pg_reload_conf()")
        run_sql(database, "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (1), (2)")
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"*:*:*:{role}:{password}\n")
        passfile.chmod(0o600)
        dsn = psycopg.conninfo.make_conninfo(database, user=role)
        with pytest.raises(psycopg.OperationalError):  # the role does need its password
            psycopg.connect(dsn, autocommit=True).close()
        env = {**os.environ, "PGPASSFILE": str(passfile)}
        (tmp_path / "reconciler.yaml").write_text("schemas: schemas\n")
        out = tmp_path / "kept.dump"
        result = subprocess.run([EXE, "--config", str(tmp_path / "reconciler.yaml"), "backup", "--database", dsn,
                                 "-o", str(out)], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert out.stat().st_size > 0 and stat.S_IMODE(out.stat().st_mode) == 0o600
    finally:
        hba.write_text(original)
        run_sql(pg_server.dsn, "SELECT pg_reload_conf()")
        run_sql(pg_server.dsn, f"DROP ROLE {role}")


class _Planted:
    """Unpickling this runs code: it makes a folder, so the test sees whether the file was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


class _Inspected:
    """Stands for schemainspect's inspector class: a loaded inspection becomes one."""


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"planted": _Planted(marker)}))


def test_saved_inspections_are_read_only_from_private_files_of_the_user(tmp_path: Path) -> None:
    folder = tmp_path / "inspections"
    cache = InspectionCache(folder)
    key = "k" * 64
    marker = tmp_path / "ran"

    folder.mkdir(mode=0o700)
    _plant(folder / f"{key}.pickle", marker)
    (folder / f"{key}.pickle").chmod(0o666)  # anyone could have written it
    assert cache.load_answers(key, "dbname=x") == {} and not marker.exists()

    (folder / f"{key}.pickle").unlink()
    folder.chmod(0o777)
    _plant(folder / f"{key}.pickle", marker)
    (folder / f"{key}.pickle").chmod(0o600)
    assert cache.load_answers(key, "dbname=x") == {} and not marker.exists()  # in a folder anyone can write to

    folder.chmod(0o700)
    (folder / "answers").mkdir(mode=0o700)
    real = folder / "answers" / f"{key}.pickle"
    real.symlink_to(folder / f"{key}.pickle")
    assert cache.load_answers(key, "dbname=x") == {} and not marker.exists()  # a link is not the user's own file

    account = service_account()
    if os.geteuid() == 0 and account is not None:
        os.chown(folder / f"{key}.pickle", account.uid, account.gid)
        assert cache.load(key, _Inspected, "dbname=x") is None and not marker.exists()  # another user's file
        os.chown(folder / f"{key}.pickle", 0, 0)

    real.unlink()
    cache.store_answers(key, {"q": [1, 2]})  # what the tool saves itself reads back
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert cache.load_answers(key, "dbname=x") == {"q": [1, 2]}
    assert cache.load(key, _Inspected, "dbname=x") is not None and marker.is_dir()  # the control: a private file is read


@pytest.mark.skipif(bool(os.environ.get("RECONCILER_TEST_DSN")), reason="needs a server that trusts a new login role")
def test_preflight_matches_a_table_whose_name_holds_a_dot(target: object, database: str) -> None:
    """Ownership is checked for "my.items" too (it was skipped: its name did not split into two parts)."""
    from tests.target import Target

    assert isinstance(target, Target)
    role = f"app_{secrets.token_hex(4)}"
    run_sql(database, 'CREATE TABLE "my.items" (id int PRIMARY KEY, note text)')
    run_sql(database, f'CREATE ROLE {role} LOGIN; GRANT USAGE, CREATE ON SCHEMA public TO {role}; '
                      f'ALTER TABLE items OWNER TO {role}; ALTER TABLE parents OWNER TO {role}; '
                      f'GRANT CREATE ON DATABASE "{dsnlib.database_name(database)}" TO {role}')
    try:
        target.desired('CREATE TABLE parents (id bigint PRIMARY KEY, name text);\n'
                       'CREATE TABLE items (id bigint PRIMARY KEY, parent_id bigint, note text, legacy text);\n'
                       'CREATE TABLE "my.items" (id int PRIMARY KEY, note text, extra text);\n')
        plan = target.plan()
        app = psycopg.conninfo.make_conninfo(database, user=role)
        result = target.run("verify-plan", str(plan), "--database", app)
        assert "FAIL  ownership" in result.stdout and "public.my.items" in result.stdout, result.stdout
    finally:
        with connect(database) as conn:
            conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER; DROP OWNED BY {role}; DROP ROLE {role}".encode())
