"""reconciler.servers: throwaway databases, embedded clusters as root, secret-free connection errors."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler import servers
from reconciler.dsn import database_name
from reconciler.errors import ServerError
from reconciler.servers import (
    MEMORY_DIR_ENV,
    EmbeddedCluster,
    Server,
    connect,
    memory_dir,
    service_account,
    throwaway_database,
)
from tests.conftest import fetch_one


def database_exists(server: Server, name: str) -> bool:
    with connect(server.dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone() == (1,)


def test_throwaway_database_dropped_after_block(pg_server: Server) -> None:
    with throwaway_database(pg_server, "unit") as dsn:
        name = database_name(dsn)
        assert name is not None
        assert name.startswith("reconciler_unit_")
        assert fetch_one(dsn, "SELECT current_database()") == name
        held = connect(dsn)  # an open session must not keep the database alive
    try:
        assert not database_exists(pg_server, name)
    finally:
        held.close()


def test_throwaway_database_dropped_when_block_raises(pg_server: Server) -> None:
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), throwaway_database(pg_server, "unit") as dsn:
        names.append(str(database_name(dsn)))
        assert database_exists(pg_server, names[0])
        raise RuntimeError("boom")
    assert not database_exists(pg_server, names[0])


def test_embedded_cluster_as_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only as root does the cluster run under a service account")
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    before = private.stat()
    cluster = EmbeddedCluster(private / "pg", durable=False)
    try:
        assert cluster.account is not None
        assert cluster.account.uid != 0
        assert cluster.requested_datadir == (private / "pg").resolve()
        assert cluster.datadir != cluster.requested_datadir
        assert private not in cluster.datadir.parents

        server = cluster.start()
        assert fetch_one(server.dsn, "SELECT 1") == 1
        assert cluster.datadir.stat().st_uid == cluster.account.uid
        pid = int((cluster.datadir / "postmaster.pid").read_text().splitlines()[0])
        assert Path(f"/proc/{pid}").stat().st_uid == cluster.account.uid  # the postmaster itself

        after = private.stat()
        assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode) == 0o700
        assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
        assert not (private / "pg").exists()  # nothing written into the user's folder
    finally:
        cluster.stop(delete=True)
    assert not cluster.datadir.exists()


def test_connect_failure_is_secret_free() -> None:
    with pytest.raises(ServerError) as info:
        connect("host=127.0.0.1 port=1 dbname=x user=u password=hunter2 connect_timeout=2")
    message = str(info.value)
    assert "hunter2" not in message
    assert message.startswith("cannot connect to u@127.0.0.1:1/x")


@pytest.mark.parametrize(("libpq", "size"), [(180000, 1000), (160000, 1)])
def test_catalog_queries_stream_in_chunks_where_libpq_can(database: str, monkeypatch: pytest.MonkeyPatch,
                                                          libpq: int, size: int) -> None:
    """Chunks of rows need libpq 17: with an older one, rows come one at a time rather than failing."""
    import psycopg

    from reconciler import servers

    if size > 1 and psycopg.pq.version() < 170000:
        pytest.skip("this libpq has no chunked mode")
    sizes: list[int] = []
    real = psycopg.Cursor.stream

    def spied(self: psycopg.Cursor[object], query: object, params: object = None, **kwargs: int) -> object:
        sizes.append(kwargs["size"])
        return real(self, query, params, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(psycopg.pq, "version", lambda: libpq)
    monkeypatch.setattr(psycopg.Cursor, "stream", spied)
    with connect(database) as conn, conn.cursor() as cur:
        rows = list(servers.stream(cur, "SELECT g FROM generate_series(1, %s) g", (2500,)))
    assert sizes == [size] and [r[0] for r in rows] == list(range(1, 2501))


# --- caches' clusters on a memory filesystem -----------------------------------------------------

@pytest.fixture
def memory_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder standing for /dev/shm (anyone may traverse it, as /dev/shm), named by RECONCILER_MEMORY_DIR."""
    root = Path(tempfile.mkdtemp(prefix="reconciler-memory-test-"))
    root.chmod(0o755)
    monkeypatch.setenv(MEMORY_DIR_ENV, str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _owner() -> int:
    account = service_account()
    return account.uid if account is not None else os.geteuid()


def test_memory_dir_is_a_private_folder_of_whoever_runs_the_servers(memory_root: Path) -> None:
    folder = memory_dir(service_account())
    assert folder == memory_root / f"reconciler-{_owner()}"
    st = folder.lstat()
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == _owner() and stat.S_IMODE(st.st_mode) == 0o700
    assert memory_dir(service_account()) == folder  # found again as it is


def test_memory_dir_refuses_a_folder_it_cannot_trust(memory_root: Path) -> None:
    other = memory_root / "elsewhere"
    other.mkdir()
    (memory_root / f"reconciler-{_owner()}").symlink_to(other)  # planted by someone else on a shared filesystem
    assert memory_dir(service_account()) is None
    (memory_root / f"reconciler-{_owner()}").unlink()
    (memory_root / f"reconciler-{_owner()}").mkdir(mode=0o777)
    (memory_root / f"reconciler-{_owner()}").chmod(0o777)  # anyone could write into it
    assert memory_dir(service_account()) is None


def test_memory_dir_off_or_full(memory_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "MEMORY_MIN_FREE", 1 << 62)  # more than any filesystem has free
    assert memory_dir(service_account()) is None
    monkeypatch.undo()
    monkeypatch.setenv(MEMORY_DIR_ENV, "off")
    assert memory_dir(service_account()) is None
    monkeypatch.setenv(MEMORY_DIR_ENV, str(memory_root / "missing"))
    assert memory_dir(service_account()) is None


def test_non_durable_clusters_live_in_memory_and_leave_nothing_behind(memory_root: Path, tmp_path: Path) -> None:
    folder = memory_root / f"reconciler-{_owner()}"
    durable = EmbeddedCluster(tmp_path / "local")
    assert folder not in durable.datadir.parents  # a user's local database stays on disk
    assert folder not in EmbeddedCluster(tmp_path / "bench-target", durable=False, in_memory=False).datadir.parents
    cluster = EmbeddedCluster(tmp_path / "shadow", durable=False)
    assert cluster.datadir.parent == folder
    assert EmbeddedCluster(tmp_path / "shadow", durable=False).datadir == cluster.datadir  # shared by its path
    try:
        server = cluster.start()
        assert fetch_one(server.dsn, "SELECT current_setting('data_directory')") == str(cluster.datadir)
    finally:
        cluster.stop(delete=True)
    assert list(folder.iterdir()) == []  # the data and the lock file both gone
