"""Fleets under an operator's eye: each server's connections bounded, shards run as processes at once, a fault
reported in one line with what to do and nothing else affected, history and drift of every database in one table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import psycopg
import pytest

from reconciler.cli import main
from reconciler.servers import EmbeddedCluster, Server, connect, throwaway_database
from tests.conftest import fetch_one, run_sql

EXE = str(Path(sys.executable).with_name("reconciler"))
OLD = "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);\n"
DESIRED = "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL, CHECK (balance >= 0));\n"
OURS = "application_name LIKE 'reconciler%%'"


@pytest.fixture
def small(tmp_path: Path) -> Iterator[tuple[EmbeddedCluster, Server]]:
    """A second server, of its own, with max_connections 20 (3 of them reserved for superusers)."""
    bindir = Path(os.environ["RECONCILER_TEST_PG_BINDIR"]) if os.environ.get("RECONCILER_TEST_PG_BINDIR") else None
    cluster = EmbeddedCluster(tmp_path / "small", bindir, in_memory=True)
    try:
        server = cluster.start()
        run_sql(server.dsn, "ALTER SYSTEM SET max_connections = 20")
        _pg_ctl(cluster, server, "restart")
        yield cluster, server
    finally:
        cluster.stop(delete=True)


def _pg_ctl(cluster: EmbeddedCluster, server: Server, action: str) -> None:
    """pg_ctl on the cluster as its own account; started again in the same socket folder, so DSNs stay good."""
    socket = re.search(r"host=(\S+)", server.dsn)
    assert socket is not None
    options = ["-l", str(cluster.datadir / "server.log"), "-o", f"-k {socket.group(1)}"] if action != "stop" else []
    result = cluster._run([str(cluster.bindir / "pg_ctl"), "-D", str(cluster.datadir), "-m", "fast", "-w", *options,
                           action])
    assert result.returncode == 0, result.stderr


def _tenants(stack: ExitStack, server: Server, count: int, schema: str = OLD) -> list[str]:
    dsns = [stack.enter_context(throwaway_database(server, "tenant")) for _ in range(count)]
    for dsn in dsns:
        run_sql(dsn, schema)
    return dsns


def _project(tmp_path: Path, shadow: Server, dsns: list[str], concurrency: int, extra: str = "") -> Path:
    (tmp_path / "schemas").mkdir(exist_ok=True)
    (tmp_path / "schemas" / "app.sql").write_text(DESIRED)
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "tenants.txt").write_text("".join(f"{d}\n" for d in dsns))
    config = tmp_path / "reconciler.yaml"
    # the shadow is the session's test server, another cluster than the small one: no template kept there
    config.write_text("shadow_cache: 0\nenvironments:\n  tenants:\n" + textwrap.indent(textwrap.dedent(f"""\
        databases_file: tenants.txt
        shadow: "{shadow.dsn}"
        require_signed_plans: false
        backup: none
        concurrency: {concurrency}
        """) + extra, "    "))
    return config


class PeakConnections:
    """The most connections of ours (application_name reconciler...) seen on each server while it runs."""

    def __init__(self, servers: dict[str, Server]) -> None:
        self.servers, self.peak = servers, dict.fromkeys(servers, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        with ExitStack() as stack:
            conns = {name: stack.enter_context(connect(s.dsn, application_name="test sampler"))
                     for name, s in self.servers.items()}
            while not self._stop.is_set():
                for name, conn in conns.items():
                    row = conn.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {OURS}").fetchone()
                    self.peak[name] = max(self.peak[name], int(row[0]) if row else 0)
                time.sleep(0.005)


def _applied_runs(dsn: str) -> int:
    return int(fetch_one(dsn, "SELECT count(*) FROM reconciler.runs WHERE status = 'applied'"))  # type: ignore[arg-type]


def test_a_fleet_takes_no_more_than_its_share_of_each_servers_connections(
        tmp_path: Path, pg_server: Server, small: tuple[EmbeddedCluster, Server],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Concurrency 8 on two servers: the shared test server gives the fleet 8 connections, so 4 databases at once
    (two connections each) plus the server's lock-wait monitor; the small one, with 17 usable connections of which
    the applications hold 9, gives half of what is free (3), so one database at a time, never exhausting it."""
    _cluster, server = small
    with ExitStack() as stack:
        held = [stack.enter_context(closing(psycopg.connect(server.dsn, application_name="app", autocommit=True)))
                for _ in range(9)]
        dsns = _tenants(stack, pg_server, 4) + _tenants(stack, server, 4)
        config = _project(tmp_path, pg_server, dsns, 8)
        assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
        capsys.readouterr()
        with PeakConnections({"shared": pg_server, "small": server}) as peak:
            code = main(["--config", str(config), "apply", str(tmp_path / "plans"), "--env", "tenants"])
        out, err = capsys.readouterr()
        assert code == 0, out
        assert re.search(r"^8 database\(s\) in [\d.]+ s: 8 applied$", out, re.M)
        assert 1 <= peak.peak["small"] <= 3 + 2, peak.peak
        assert 1 <= peak.peak["shared"] <= 8 + 2, peak.peak
        assert re.search(r"server socket:\S+ has [67] connection\(s\) free: the fleet takes at most 3 there \(half of them\), "
                         "not 8", err), err
        assert all(not c.closed for c in held)  # the applications kept theirs
        assert all(_applied_runs(d) == 1 for d in dsns)


def _shards(config: Path, plans: Path, count: int) -> list[subprocess.CompletedProcess[str]]:
    """Every shard at once, each a process of its own, as an indexed Job's pods run."""
    procs = [subprocess.Popen([EXE, "--config", str(config), "apply", str(plans), "--env", "tenants", "--shard",
                               f"{i}/{count}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(count)]
    return [subprocess.CompletedProcess(p.args, p.wait(120), *p.communicate()) for p in procs]


def test_shards_run_at_once_apply_each_database_once_and_a_rerun_retries_only_what_did_not_apply(
        tmp_path: Path, pg_server: Server) -> None:
    with ExitStack() as stack:
        dsns = _tenants(stack, pg_server, 6)
        config = _project(tmp_path, pg_server, dsns, 4)
        assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
        broken = dsns[2]
        run_sql(broken, "INSERT INTO accounts VALUES (1, -5)")  # this tenant's data breaks the new CHECK

        first = _shards(config, tmp_path / "plans", 3)
        failing = [r for r in first if r.returncode != 0]
        assert len(failing) == 1 and failing[0].returncode == 1, [(r.returncode, r.stderr[-500:]) for r in first]
        assert "accounts_balance_check" in failing[0].stdout
        assert all(r.returncode == 0 for r in first if r is not failing[0])
        assert [_applied_runs(d) for d in dsns] == [0 if d == broken else 1 for d in dsns]  # once each, by one shard
        lines = [line for r in first for line in r.stdout.splitlines() if line.startswith("postgres@")]
        assert len(lines) == 6  # every database in exactly one shard

        run_sql(broken, "DELETE FROM accounts WHERE balance < 0")
        second = _shards(config, tmp_path / "plans", 3)
        assert [r.returncode for r in second] == [0, 0, 0], [r.stdout for r in second]
        statuses = sorted(line.split()[1] for r in second for line in r.stdout.splitlines()
                          if line.startswith("postgres@"))
        assert statuses == ["applied", "done", "done", "done", "done", "done"]
        assert all(_applied_runs(d) == 1 for d in dsns)

        third = _shards(config, tmp_path / "plans", 3)
        assert [r.returncode for r in third] == [0, 0, 0]
        for result in third:  # a retried pod: nothing to do, and says so
            assert ("Nothing to apply: every database already has its plan applied." in result.stdout
                    or "No database to work on" in result.stdout), result.stdout
        assert all(_applied_runs(d) == 1 for d in dsns)


def test_faults_during_a_fleet_apply_are_each_one_line_with_what_to_do(
        tmp_path: Path, pg_server: Server, small: tuple[EmbeddedCluster, Server],
        capsys: pytest.CaptureFixture[str]) -> None:
    """During one apply: the small server is restarted while its first database waits for a lock, one database
    drifted after planning, one left the fleet list. Each is one line of what to do; the rest applies; applying
    again retries only what did not apply, and after planning again, everything converges."""
    cluster, server = small
    with ExitStack() as stack:
        on_small = _tenants(stack, server, 3)
        kept, drifted, left = _tenants(stack, pg_server, 3)
        config = _project(tmp_path, pg_server, [*on_small, kept, drifted, left], 2)
        assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
        run_sql(drifted, "ALTER TABLE accounts ADD COLUMN note text")
        (tmp_path / "tenants.txt").write_text("".join(f"{d}\n" for d in [*on_small, kept, drifted]))
        holder = psycopg.connect(on_small[0], autocommit=False)
        holder.execute("INSERT INTO accounts VALUES (99, 1)")  # a write under way: its apply's step waits for it...

        def restart_once_it_waits() -> None:  # ...and the server restarts under it
            with connect(server.dsn, application_name="test watcher") as conn:
                for _ in range(600):
                    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                       "'reconciler apply' AND wait_event_type = 'Lock'").fetchone()
                    if row and row[0]:
                        break
                    time.sleep(0.02)
            _pg_ctl(cluster, server, "stop")

        fault = threading.Thread(target=restart_once_it_waits)
        fault.start()
        capsys.readouterr()
        code = main(["--config", str(config), "apply", str(tmp_path / "plans"), "--env", "tenants"])
        fault.join()
        holder.close()
        out = capsys.readouterr().out
        assert code == 1, out
        todo = out.split("What to do:\n", 1)[1].splitlines()
        port = re.search(r"port=(\d+)", server.dsn)
        assert port is not None
        assert len(todo) == 3, todo
        assert re.match(rf"  - server socket:\S+:{port.group(1)} went away or could not be reached \(down or restarting\): 2 "
                        r"database\(s\) not applied; when it is back, run the same apply again: what applied is done, "
                        r"only these are tried; 1 database\(s\) lost their connection mid-run \(.+\): the next command "
                        r"marks those runs interrupted, so plan again for them, then apply$", todo[0])
        assert re.match(r"  - 1 database\(s\) named by the plans are no longer in "
                        r"\S*tenants.txt \(.+\): not applied; if they left the fleet there is nothing to do", todo[1])
        assert re.match(r"  - 1 database\(s\) changed since they were planned \(.+\): plan again", todo[2])
        assert _applied_runs(kept) == 1  # nothing else affected
        assert fetch_one(drifted, "SELECT count(*) FROM pg_constraint WHERE conname = 'accounts_balance_check'") == 0

        assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "while-down")]) == 1
        err = capsys.readouterr().err
        assert re.search(r"^error: server socket:\S+ could not be reached: 3 database\(s\) not read \(", err, re.M)
        assert err.count("error: ") == 1, err  # one line for the server, not one per database

        _pg_ctl(cluster, server, "start")
        code = main(["--config", str(config), "apply", str(tmp_path / "plans"), "--env", "tenants"])
        out = capsys.readouterr().out
        status = {line.split()[0].rsplit("/", 1)[1]: line.split()[1] for line in out.splitlines()
                  if line.startswith("postgres@")}
        name = {dsn: dsn.rsplit("dbname=", 1)[1].split()[0] for dsn in [*on_small, kept, drifted]}
        assert status == {name[on_small[0]]: "refused", name[on_small[1]]: "applied", name[on_small[2]]: "applied",
                          name[kept]: "done", name[drifted]: "refused"}, out
        assert "need a new plan" in out and "a run stopped half-way there since" in out

        assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
        code = main(["--config", str(config), "apply", str(tmp_path / "plans"), "--env", "tenants"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert re.search(r"s: 2 applied, 3 nothing$", out, re.M), out[-1500:]  # the others: a plan of no steps now
        assert "What to do" not in out  # the plan naming the one that left is superseded: not named again
        assert fetch_one(left, "SELECT to_regclass('reconciler.runs')") is None  # never touched once it left


def test_history_drift_and_apply_of_a_fleet_are_one_table_each_or_json(
        tmp_path: Path, pg_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    with ExitStack() as stack:
        dsns = _tenants(stack, pg_server, 3)
        config = _project(tmp_path, pg_server, dsns, 4)
        base = ["--config", str(config), "--log-format", "json"]
        assert main([*base, "history", "--env", "tenants"]) == 0
        assert out_lines(capsys)[-1].endswith("s: 3 no runs")
        assert main([*base, "drift", "--env", "tenants"]) == 2
        out = capsys.readouterr()
        assert re.search(r"s: 3 drifted$", out.out, re.M) and "accounts_balance_check" in out.out
        assert "plan again" in out.out
        assert main([*base, "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
        capsys.readouterr()
        assert main([*base, "apply", str(tmp_path / "plans"), "--env", "tenants", "--format", "json"]) == 0
        captured = capsys.readouterr()
        report = json.loads(captured.out)
        assert report["totals"] == {"applied": 3} and report["actions"] == []
        assert {d["status"] for d in report["databases"]} == {"applied"} and all(d["run"] for d in report["databases"])
        started = [json.loads(line) for line in captured.err.splitlines() if '"message": "applying plan ' in line]
        assert sorted(e["database"] for e in started) == sorted(d["database"] for d in report["databases"])  # named
        progress = [json.loads(line)["message"] for line in captured.err.splitlines() if '"applying: ' in line]
        assert progress and progress[-1].startswith("applying: 3 done, 0 failed, 0 left of 3")

        assert main([*base, "history", "--env", "tenants"]) == 0
        table = out_lines(capsys)
        assert table[0].split()[:4] == ["DATABASE", "STATUS", "STARTED", "(UTC)"]
        runs = {fetch_one(d, "SELECT id::text FROM reconciler.runs") for d in dsns}
        assert {line.split()[1] for line in table[1:4]} == {"applied"} and len(table) == 5
        assert {line.split()[-1] for line in table[1:4]} == runs
        assert main([*base, "history", "--env", "tenants", "--format", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert rows["totals"] == {"applied": 3} and {r["run"] for r in rows["databases"]} == runs

        run_sql(dsns[1], "ALTER TABLE accounts ADD COLUMN note text")
        assert main([*base, "drift", "--env", "tenants", "--format", "json"]) == 2
        found = json.loads(capsys.readouterr().out)
        assert found["totals"] == {"drifted": 1, "matches": 2}
        drifted = [d for d in found["databases"] if d["status"] == "drifted"]
        assert len(drifted) == 1 and drifted[0]["database"].endswith(dsns[1].rsplit("dbname=", 1)[1].split()[0])
        assert any("note" in d for d in drifted[0]["differences"])


def out_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def _metric(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def test_watch_keeps_a_fleet_in_step_with_its_series_in_metrics(tmp_path: Path, pg_server: Server) -> None:
    """`watch --env FLEET`: the first cycle applies to every database; a database changed by hand is brought back
    at the next look; /metrics counts the fleet's databases by state and its database applies by outcome."""
    import urllib.request

    with ExitStack() as stack:
        dsns = _tenants(stack, pg_server, 3)
        config = _project(tmp_path, pg_server, dsns, 4, "auto_apply: true\n")
        proc = subprocess.Popen([EXE, "--config", str(config), "watch", "--env", "tenants", "--listen", "127.0.0.1:0",
                                 "--interval", "1s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()  # type: ignore[union-attr]

        def metrics() -> str:
            served = next((re.search(r"http://127\.0\.0\.1:(\d+)", line) for line in lines if "/metrics" in line), None)
            if served is None:
                return ""
            with urllib.request.urlopen(f"http://127.0.0.1:{served.group(1)}/metrics", timeout=30) as response:
                return str(response.read().decode())

        def wait_for(what: str, test: object) -> str:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, f"watch exited ({proc.returncode}) before {what}: {''.join(lines)}"
                assert time.monotonic() < deadline, f"gave up waiting for {what}: {''.join(lines)}"
                text = metrics()
                if text and test(text):  # type: ignore[operator]
                    return text
                time.sleep(0.2)

        try:
            text = wait_for("the fleet in step", lambda t: _metric(t, "reconciler_fleet_databases", fleet="tenants",
                                                                    state="matches") == 3)
            assert _metric(text, "reconciler_fleet_database_applies_total", fleet="tenants", status="applied") == 3
            assert _metric(text, "reconciler_fleet_states", fleet="tenants") == 1
            assert "reconciler_target_last_run" not in text  # one database's series: not a fleet's
            assert all(_applied_runs(d) == 1 for d in dsns)
            run_sql(dsns[1], "ALTER TABLE accounts DROP CONSTRAINT accounts_balance_check")  # changed by hand
            text = wait_for("the changed one brought back", lambda t: _metric(
                t, "reconciler_fleet_database_applies_total", fleet="tenants", status="applied") == 4)
            assert _metric(text, "reconciler_applies_total", result="applied") == 4  # the loop's own count too
            assert (_metric(text, "reconciler_drift_checks_total", result="found") or 0) >= 1
            assert _metric(text, "reconciler_fleet_last_apply_databases", fleet="tenants", status="applied") == 1
            assert fetch_one(dsns[1], "SELECT count(*) FROM pg_constraint WHERE conname = 'accounts_balance_check'") == 1
            assert [_applied_runs(d) for d in dsns] == [1, 2, 1]
            proc.send_signal(15)
            proc.wait(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0, "".join(lines)
        assert any("3 database(s) in 1 state(s): 3 match the desired schema" in line for line in lines), "".join(lines)


def test_a_terminal_sees_the_fleets_progress_as_it_goes(tmp_path: Path, pg_server: Server) -> None:
    import pty

    with ExitStack() as stack:
        dsns = _tenants(stack, pg_server, 2)
        config = _project(tmp_path, pg_server, dsns, 4)
        assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
        leader, follower = pty.openpty()
        proc = subprocess.Popen([EXE, "--config", str(config), "apply", str(tmp_path / "plans"), "--env", "tenants"],
                                stdout=subprocess.PIPE, stderr=follower, text=True)
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end closed: the command ended
                break
            if not chunk:
                break
            seen += chunk
        os.close(leader)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))
    assert re.search(r"applying: [12] done, 0 failed, [01] left of 2 \([\d.]+/s", text), text
    assert re.search(r"^2 database\(s\) in [\d.]+ s: 2 applied$", out, re.M)


def test_a_shadow_on_one_of_the_fleets_servers_keeps_no_copies_there(
        tmp_path: Path, pg_server: Server, small: tuple[EmbeddedCluster, Server],
        capsys: pytest.CaptureFixture[str]) -> None:
    """The shadow cache keeps templates and copies of live on a shadow server of ours, never on a target's cluster:
    nor on a server holding any of a fleet's databases, though the plan is made against one on another server."""
    query = "SELECT count(*) FROM pg_database WHERE datname LIKE 'reconciler\\_template\\_%'"
    with ExitStack() as stack:
        dsns = _tenants(stack, small[1], 1) + _tenants(stack, pg_server, 1)  # planned against the first: on small
        config = _project(tmp_path, pg_server, dsns, 4)
        config.write_text(config.read_text().replace("shadow_cache: 0\n", ""))  # the default: kept where allowed
        before = fetch_one(pg_server.dsn, query)
        assert main(["--config", str(config), "plan", "--env", "tenants", "-o", str(tmp_path / "plans")]) == 2
        assert fetch_one(pg_server.dsn, query) == before
        capsys.readouterr()
