"""Fleets at scale: `plan`, `apply` and `drift` of one desired schema over 100 to 1,000 databases spread over two
real PostgreSQL servers, with wall time, time per database, peak memory and the most connections the command held
on each server. See bench/README.md.

    .venv/bin/python bench/fleet.py                      # 100, 300 and 1000 databases
    .venv/bin/python bench/fleet.py --sizes 100 --concurrency 8

A benchmark, not a test: it prints what it measured and asserts nothing about timings. It stops, with the
command's stderr, when a command exits other than expected.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import measure
import schemagen
from measure import BenchError, Measured
from psycopg import sql
from rich.console import Console
from rich.table import Table

from reconciler.servers import EmbeddedCluster, Server, connect

BIN = Path(sys.prefix) / "bin"
RECONCILER = BIN / "reconciler"
TABLES = 50
DRIFTED_SHARE = 0.05  # of the fleet, split between two other states
SAMPLE_SECONDS = 0.02
CHANGED_TABLE_COLUMN = "note"

out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
progress = Console(stderr=True, highlight=False)


@dataclass(frozen=True)
class States:
    """The live states a fleet's databases are in, and the desired schema (the base plus one new column)."""

    base: str
    index_added: str  # drifted: an index nobody asked for
    column_added: str  # drifted: a column nobody asked for
    desired: str
    changed_table: str


def states() -> States:
    schemas = schemagen.synthetic(TABLES, changed_share=0.0)
    base = schemas.old_sql
    table = _first_table(base)
    other = _last_table(base)
    return States(
        base=base,
        index_added=base + f"\nCREATE INDEX drifted_idx ON {other} (id DESC);\n",
        column_added=base + f"\nALTER TABLE {other} ADD COLUMN drifted_flag boolean;\n",
        desired=base + f"\nALTER TABLE {table} ADD COLUMN {CHANGED_TABLE_COLUMN} text;\n",
        changed_table=table,
    )


def _tables(text: str) -> list[str]:
    return [line.split()[2] for line in text.splitlines() if line.startswith("CREATE TABLE ")]


def _first_table(text: str) -> str:
    return _tables(text)[0]


def _last_table(text: str) -> str:
    return _tables(text)[-1]


class ConnectionSampler:
    """The most client connections seen on each server while a command runs (this sampler's own left out)."""

    QUERY = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
             "AND pid <> pg_backend_pid() AND datname NOT IN ('postgres')")

    def __init__(self, servers: dict[str, Server]) -> None:
        self.servers = servers
        self.peak = dict.fromkeys(servers, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ConnectionSampler:
        self.peak = dict.fromkeys(self.servers, 0)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        with contextlib.ExitStack() as stack:
            conns = {name: stack.enter_context(connect(s.dsn, application_name="bench sampler"))
                     for name, s in self.servers.items()}
            while not self._stop.is_set():
                for name, conn in conns.items():
                    count = int(conn.execute(self.QUERY).fetchone()[0])  # type: ignore[index]
                    self.peak[name] = max(self.peak[name], count)
                time.sleep(SAMPLE_SECONDS)


@dataclass(frozen=True)
class Figure:
    size: int
    command: str
    seconds: float
    peak_mib: float
    connections: dict[str, int]

    @property
    def ms_per_database(self) -> float:
        return self.seconds * 1000 / self.size


def make_fleet(servers: dict[str, Server], size: int, schema: States) -> list[str]:
    """``size`` databases, alternately on each server, copied from a template per state: about DRIFTED_SHARE of
    them in the two drifted states."""
    names = list(servers)
    templates = {"base": schema.base, "index_added": schema.index_added, "column_added": schema.column_added}
    for server in servers.values():
        with connect(server.dsn) as conn:
            for state, text in templates.items():
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(f"tpl_{state}")))
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"tpl_{state}")))
                with connect(server.database_dsn(f"tpl_{state}")) as tpl:
                    tpl.execute(text.encode())
    drifted = max(2, round(size * DRIFTED_SHARE))
    plan = []
    for number in range(size):
        state = "base"
        if number % round(size / drifted) == 1:
            state = "index_added" if (number // round(size / drifted)) % 2 == 0 else "column_added"
        plan.append((names[number % len(names)], f"tenant_{size}_{number:04d}", state))

    def create(item: tuple[str, str, str]) -> str:
        server_name, name, state = item
        server = servers[server_name]
        with connect(server.dsn) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                          sql.Identifier(f"tpl_{state}")))
        return server.database_dsn(name)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(create, plan))


def drop_fleet(servers: dict[str, Server], size: int) -> None:
    for server in servers.values():
        with connect(server.dsn) as conn:
            names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                                (f"tenant_{size}_%",)).fetchall()]
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def project(folder: Path, dsns: Sequence[str], shadow: Server, schema: States, concurrency: int, backup: str) -> Path:
    (folder / "schemas").mkdir(parents=True, exist_ok=True)
    (folder / "schemas" / "app.sql").write_text(schema.desired)
    (folder / "policies").mkdir(exist_ok=True)
    (folder / "tenants.txt").write_text("\n".join(dsns) + "\n")
    config = folder / "reconciler.yaml"
    config.write_text(textwrap.dedent(f"""\
        environments:
          tenants:
            databases_file: tenants.txt
            shadow: "{shadow.dsn}"
            require_signed_plans: false
            backup: {backup}
            concurrency: {concurrency}
        """))
    return config


def run_command(label: str, argv: Sequence[str], *, size: int, sampler: ConnectionSampler, logs: Path,
                expect: Sequence[int], cwd: Path) -> tuple[Figure, Measured]:
    progress.print(f"  {label} ...")
    with sampler:
        measured = measure.run(argv, label=f"{size}-{label}", logs=logs, expect=expect, timeout=3600, cwd=cwd)
    figure = Figure(size, label, measured.seconds, measured.peak_mib, dict(sampler.peak))
    progress.print(f"  {label}: {measured.seconds:.1f} s, {measured.peak_mib:.0f} MiB, connections {figure.connections}")
    return figure, measured


COMMANDS = ("plan", "apply", "apply again", "drift", "history")


def one_size(size: int, servers: dict[str, Server], shadow: Server, schema: States, work: Path, concurrency: int,
             backup: str, commands: Sequence[str]) -> list[Figure]:
    progress.print(f"[bold]{size} databases[/bold]: creating")
    started = time.perf_counter()
    dsns = make_fleet(servers, size, schema)
    progress.print(f"  created in {time.perf_counter() - started:.1f} s")
    folder = work / f"fleet-{size}"
    config = project(folder, dsns, shadow, schema, concurrency, backup)
    sampler = ConnectionSampler(servers)
    logs = work / "logs"
    base = [str(RECONCILER), "--config", str(config), "--log-format", "json"]
    figures = []
    plans = str(folder / "plans")
    steps = (("plan", ["plan", "--env", "tenants", "-o", plans], 2, None),
             # an earlier version's totals line had no time: a baseline is run with the same script
             ("apply", ["apply", plans, "--env", "tenants"], 0, rf"^{size} database\(s\)( in [\d.]+ s)?: {size} applied$"),
             ("apply again", ["apply", plans, "--env", "tenants"], 0, rf"^{size} database\(s\) in [\d.]+ s: {size} done$"),
             ("drift", ["drift", "--env", "tenants"], 0, rf"^{size} database\(s\) in [\d.]+ s: {size} matches$"),
             ("history", ["history", "--env", "tenants"], 0, rf"^{size} database\(s\) in [\d.]+ s: {size} applied$"))
    for label, command, code, expected in (step for step in steps if step[0] in commands):
        figure, measured = run_command(label, [*base, *command], size=size, sampler=sampler, logs=logs, expect=[code],
                                       cwd=folder)
        if expected and not re.search(expected, measured.stdout.read_text(), re.M):
            raise BenchError(f"{size}-{label}: its output lacks {expected!r}; see {measured.stdout}")
        figures.append(figure)
    if "apply" in commands:
        _check_applied(servers, size, schema)
    drop_fleet(servers, size)
    return figures


def _check_applied(servers: dict[str, Server], size: int, schema: States) -> None:
    """Every database has the new column: the apply did what it said."""
    missing = 0
    for server in servers.values():
        with connect(server.dsn) as conn:
            names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                                (f"tenant_{size}_%",)).fetchall()]
        for name in names:
            with connect(server.database_dsn(name)) as db:
                found = db.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = %s "
                                   "AND column_name = %s", (schema.changed_table.split(".")[-1],
                                                            CHANGED_TABLE_COLUMN)).fetchone()
                missing += 0 if found and found[0] == 1 else 1
    if missing:
        raise BenchError(f"{missing} database(s) of {size} lack the new column after apply")


def report(figures: Sequence[Figure], concurrency: int) -> None:
    table = Table(title=f"fleet of N databases on two servers, concurrency {concurrency}")
    for column in ("databases", "command", "wall", "per database", "peak memory", "connections (a / b)"):
        table.add_column(column, justify="right")
    for f in figures:
        table.add_row(str(f.size), f.command, f"{f.seconds:.1f} s", f"{f.ms_per_database:.0f} ms",
                      f"{f.peak_mib:.0f} MiB", " / ".join(str(v) for v in f.connections.values()))
    out.print(table)
    sizes = sorted({f.size for f in figures})
    if len(sizes) > 1:
        small, big = sizes[0], sizes[-1]
        for command in dict.fromkeys(f.command for f in figures):
            a = next(f for f in figures if f.size == small and f.command == command)
            b = next(f for f in figures if f.size == big and f.command == command)
            out.print(f"{command}: {small} -> {big} databases ({big / small:.0f}x): time x{b.seconds / a.seconds:.2f}, "
                      f"memory x{b.peak_mib / a.peak_mib:.2f}, connections {a.connections} -> {b.connections}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,300,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--backup", default="none", choices=("none", "schema", "full"))
    parser.add_argument("--commands", default=",".join(COMMANDS),
                        help=f"which commands to run and time, in this order: {', '.join(COMMANDS)} (a baseline of an "
                             "earlier version: plan,apply)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep the projects and logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="reconciler-fleet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    schema = states()
    figures: list[Figure] = []
    clusters = {name: EmbeddedCluster(work / f"pg-{name}", durable=False, in_memory=False) for name in ("a", "b")}
    shadow_cluster = EmbeddedCluster(work / "pg-shadow", durable=False)
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(c) for name, c in clusters.items()}
        shadow = stack.enter_context(shadow_cluster)
        out.print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; PostgreSQL {next(iter(servers.values())).major_version}; "
                  f"{TABLES}-table schema; about {DRIFTED_SHARE:.0%} of each fleet drifted into two other states; "
                  f"backup {args.backup}")
        for size in sizes:
            figures += one_size(size, servers, shadow, schema, work, args.concurrency, args.backup,
                                args.commands.split(","))
    report(figures, args.concurrency)
    if args.json:
        args.json.write_text(json.dumps([f.__dict__ | {"ms_per_database": f.ms_per_database} for f in figures],
                                        indent=2) + "\n")
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM too: the servers are stopped on the way out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
