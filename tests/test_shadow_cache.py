"""The shadow cache on real servers: a loaded desired schema kept as a template database and copied by later plans
with the same key; a new template for changed files; the least recently used evicted past the bound; nothing kept
from a failed load; off with 0 and on the target's own cluster; plan and drift agreeing; two plans at once; a cache
failure never failing a plan; ``reconciler cache``; and watch keeping its embedded shadow running between cycles.

The target is a database on the test server; the shadow, unless a test says otherwise, is a second server of the
tests' own (a ``shadow:`` server that is not the target's cluster, where templates may be kept)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from reconciler import inspect, pipeline, shadowcache
from reconciler.config import load_config
from reconciler.diff import inspections, migra_engine
from reconciler.diff.engine import SupplementedEngine
from reconciler.errors import ConfigError, ReconcilerError, SchemaLoadError
from reconciler.pipeline import Comparison, drift, make_plan, open_servers
from reconciler.servers import EmbeddedCluster, Server, bindir_major, connect, scratch_server, wheel_bindir
from reconciler.shadow import load_schema, split_file, statement_chain
from reconciler.source import DesiredSchema, load_source
from tests.conftest import TEST_BINDIR_ENV, fetch_one, run_sql
from tests.repo import Repo
from tests.test_watch import watching

EXTRA = {"40_extra.sql": "ALTER TABLE customers ADD COLUMN nickname text;\n"}


@pytest.fixture(scope="module")
def shadow_server() -> Iterator[Server]:
    bindir = os.environ.get(TEST_BINDIR_ENV)
    with scratch_server(None, prefix="reconciler-shadow-cache-", bindir=Path(bindir) if bindir else None) as server:
        yield server


@pytest.fixture
def shadow(shadow_server: Server) -> Iterator[Server]:
    """The shadow server with an empty cache, emptied again afterwards."""
    shadowcache.clear(shadow_server)
    yield shadow_server
    shadowcache.clear(shadow_server)


class Messages(logging.Handler):
    """What the cache logs, caught on its own logger (the command line turns propagation off)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


@pytest.fixture
def messages() -> Iterator[Messages]:
    logger = logging.getLogger("reconciler.shadowcache")
    handler, level = Messages(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every time the plan's loader runs the desired SQL (the real loader, counted)."""
    calls: list[str] = []

    def counted(*args: Any, **kwargs: Any) -> int:
        calls.append(str(args[1]))
        return load_schema(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_schema", counted)
    return calls


def configure(repo: Repo, shadow: str, keep: int | None = None) -> Path:
    """Point the repo's 'test' environment at ``shadow``, with ``shadow_cache: keep`` when given."""
    repo.config.write_text(textwrap.dedent(f"""\
        {'' if keep is None else f'shadow_cache: {keep}'}
        environments:
          test:
            database: "{repo.database}"
            shadow: "{shadow}"
            auto_apply: true
            require_signed_plans: false
            backup: none
            lock_wait: 2s
            lock_timeout: 20s
        safety:
          squawk: false
        """))
    return repo.config


def plan(repo: Repo, *, consume: bool = False, previous: DesiredSchema | None = None) -> Comparison:
    config = load_config(repo.config)
    env = config.environment("test")
    with open_servers(config, env) as servers:
        return make_plan(config, env, servers, consume_kept=consume, previous=previous)


def drift_of(repo: Repo) -> list[str]:
    config = load_config(repo.config)
    with open_servers(config, config.environment("test")) as servers:
        return sorted(f"{d.kind} {d.name}" for d in drift(config, servers))


def fingerprint(repo: Repo) -> str:
    return load_source(repo.schemas).fingerprint


def templates(server: Server) -> dict[str, shadowcache.Template]:
    """The cached templates by desired-schema fingerprint."""
    return {t.fingerprint: t for t in shadowcache.list_templates(server) if t.kind == "desired"}


def databases(server: Server, prefix: str) -> list[str]:
    with connect(server.dsn) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                           (prefix,)).fetchall()]


def sql_of(comparison: Comparison) -> list[str]:
    return [step.sql for step in comparison.plan.body.steps]


def test_second_plan_reads_the_kept_database_instead_of_loading(repo: Repo, shadow: Server, messages: Messages,
                                                            loads: list[str]) -> None:
    configure(repo, shadow.dsn)
    first = plan(repo)
    assert len(loads) == 1
    kept = templates(shadow)
    assert list(kept) == [fingerprint(repo)]
    template = kept[fingerprint(repo)]
    with connect(shadow.dsn) as conn:
        row = conn.execute("SELECT datistemplate, datallowconn FROM pg_database WHERE datname = %s",
                           (template.name,)).fetchone()
    assert row == (False, True)  # plans read it where it is
    with connect(shadow.database_dsn(template.name)) as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("CREATE TABLE oops (id int)")  # and nothing writes into it by mistake

    second = plan(repo)
    assert len(loads) == 1, "the second plan ran the desired SQL again"
    assert messages.count(f"is kept database {template.name}") == 1
    assert sql_of(second) == sql_of(first) and sql_of(first)
    assert second.desired == first.desired  # the copy is what loading produces, object for object
    assert second.plan.body.desired.fingerprint == first.plan.body.desired.fingerprint
    assert templates(shadow)[fingerprint(repo)].last_used > template.last_used
    assert databases(shadow, "reconciler_shadow_") == []  # the plans' copies are dropped


def test_changed_files_make_a_new_template(repo: Repo, shadow: Server, loads: list[str]) -> None:
    configure(repo, shadow.dsn)
    plan(repo)
    before = fingerprint(repo)
    repo.write(EXTRA)
    changed = plan(repo)
    assert len(loads) == 2
    assert set(templates(shadow)) == {before, fingerprint(repo)}
    assert any("nickname" in s for s in sql_of(changed))


def test_the_least_recently_used_template_is_evicted(repo: Repo, shadow: Server, loads: list[str]) -> None:
    configure(repo, shadow.dsn, keep=2)
    variants = {name: {"50_variant.sql": f"CREATE TABLE {name} (id int);\n"} for name in ("a", "b", "c")}
    prints = {}
    for name in ("a", "b", "a", "c"):
        repo.write(variants[name])
        plan(repo)
        prints[name] = fingerprint(repo)
    assert len(loads) == 3  # a, b, c loaded; a's second plan copied its template
    # b was made after a but a was used after b: b goes, although a is the oldest
    assert set(templates(shadow)) == {prints["a"], prints["c"]}


def test_a_kept_database_being_read_is_not_evicted(repo: Repo, shadow: Server, loads: list[str]) -> None:
    configure(repo, shadow.dsn, keep=1)
    plan(repo)
    first = templates(shadow)[fingerprint(repo)].name
    with connect(shadow.database_dsn("postgres")) as reader:  # a plan reading it right now, as plans mark it
        reader.execute("SELECT pg_advisory_lock_shared(%s, hashtext(%s))", (shadowcache.READER_LOCK_CLASS, first))
        repo.write(EXTRA)
        plan(repo)  # keeps a second one: one too many, but the first is in use
        assert len(templates(shadow)) == 2 and first in {t.name for t in templates(shadow).values()}
    repo.write({"50_more.sql": "CREATE TABLE more (id int);\n"})
    plan(repo)  # nobody reads them now: back to one
    assert list(templates(shadow)) == [fingerprint(repo)] and len(loads) == 3


def test_a_failed_load_keeps_no_template(repo: Repo, shadow: Server) -> None:
    configure(repo, shadow.dsn)
    repo.write({"40_broken.sql": "ALTER TABLE no_such_table ADD COLUMN x int;\n"})
    with pytest.raises(SchemaLoadError):
        plan(repo)
    assert templates(shadow) == {}
    assert databases(shadow, "reconciler_shadow_") == []

    (repo.schemas / "40_broken.sql").unlink()
    plan(repo)
    assert list(templates(shadow)) == [fingerprint(repo)]
    assert databases(shadow, "reconciler_shadow_") == []  # the loaded database became the template: no copy left


def test_a_refused_plan_still_keeps_what_it_loaded(repo: Repo, shadow: Server, loads: list[str]) -> None:
    configure(repo, shadow.dsn)
    repo.write({"40_retype.sql": "ALTER TABLE customers ALTER COLUMN email TYPE int USING length(email);\n"})
    run_sql(repo.database, "CREATE TABLE customers (id bigint PRIMARY KEY, email date NOT NULL)")
    with pytest.raises(ReconcilerError):  # date to int does not cast: the rehearsal refuses the plan
        plan(repo)
    assert list(templates(shadow)) == [fingerprint(repo)] and len(loads) == 1
    with pytest.raises(ReconcilerError):
        plan(repo)
    assert len(loads) == 1  # the second attempt copied the template


def test_zero_turns_the_cache_off(repo: Repo, shadow: Server, loads: list[str]) -> None:
    configure(repo, shadow.dsn, keep=0)
    first, second = plan(repo), plan(repo)
    assert len(loads) == 2
    assert templates(shadow) == {}
    assert sql_of(first) == sql_of(second)


@pytest.mark.parametrize("value", ["-1", "yes"])
def test_shadow_cache_must_be_a_count(repo: Repo, value: str) -> None:
    configure(repo, "embedded")
    repo.config.write_text(f"shadow_cache: {value}\n" + repo.config.read_text())
    with pytest.raises(ConfigError, match="shadow_cache"):
        load_config(repo.config)


def test_no_templates_on_the_targets_own_cluster(repo: Repo, pg_server: Server, loads: list[str],
                                                 messages: Messages) -> None:
    configure(repo, pg_server.dsn)  # shadow: the target's server (production, say)
    plan(repo)
    plan(repo)
    assert len(loads) == 2
    assert shadowcache.list_templates(pg_server) == []
    assert databases(pg_server, shadowcache.TEMPLATE_PREFIX) == []
    assert messages.count("the shadow server is the target's cluster") == 2


def test_plan_and_drift_agree(repo: Repo, shadow: Server, loads: list[str]) -> None:
    configure(repo, shadow.dsn)
    run_sql(repo.database, "CREATE TABLE customers (id bigint PRIMARY KEY)")
    planned = plan(repo)  # loads, and keeps the template
    drifted = drift_of(repo)  # copies it
    assert len(loads) == 1
    assert drifted == sorted(f"{d.kind} {d.name}" for d in inspect.compare(planned.desired, planned.live))
    assert any("public.orders" in d for d in drifted) and any("public.customers." in d for d in drifted)

    assert repo.run("apply", "--auto") == 0
    assert drift_of(repo) == []
    assert sql_of(plan(repo)) == []
    assert len(loads) == 1


def test_two_plans_at_once_share_one_template(repo: Repo, shadow: Server) -> None:
    configure(repo, shadow.dsn)
    results: list[Comparison] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(plan(repo))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 2 and sql_of(results[0]) == sql_of(results[1])
    assert list(templates(shadow)) == [fingerprint(repo)]
    assert databases(shadow, "reconciler_shadow_") == []


def test_a_cache_failure_never_fails_the_plan(repo: Repo, shadow: Server, messages: Messages, loads: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    configure(repo, shadow.dsn)
    monkeypatch.setattr(shadowcache, "LOCK_TIMEOUT", "200ms")
    with connect(shadow.database_dsn("postgres")) as holder:  # another process holding the cache's lock
        holder.execute("SELECT pg_advisory_lock(%s)", (shadowcache.LOCK_KEY,))
        first = plan(repo)
    assert sql_of(first) and len(loads) == 1
    assert messages.count("building the shadow database") == 1  # the lock wait timed out: a warning
    assert templates(shadow) == {}
    plan(repo)  # the lock is free again: this one keeps a template
    assert list(templates(shadow)) == [fingerprint(repo)]


def test_cache_list_and_clear(repo: Repo, shadow: Server, capsys: pytest.CaptureFixture[str],
                              cache_home: Path) -> None:
    configure(repo, shadow.dsn)
    run_sql(repo.database, "CREATE TABLE customers (id bigint PRIMARY KEY)")
    plan(repo)
    name = templates(shadow)[fingerprint(repo)].name
    capsys.readouterr()
    assert repo.run("cache", "list", "--env", "test") == 0
    listed = capsys.readouterr().out
    assert name in listed and fingerprint(repo) in listed
    assert len(saved(cache_home)) == 2
    assert repo.run("cache", "clear", "--env", "test") == 0
    cleared = capsys.readouterr().out
    assert name in cleared and "Removed 4 saved inspection file(s)" in cleared  # two inspections, two answer sets
    assert saved(cache_home) == []
    assert templates(shadow) == {} and databases(shadow, shadowcache.TEMPLATE_PREFIX) == []
    assert repo.run("cache", "list", "--env", "test") == 0
    assert "No shadow templates" in capsys.readouterr().out


def test_the_copy_of_live_is_kept_and_rehearsed_in_place(repo: Repo, shadow: Server, messages: Messages) -> None:
    configure(repo, shadow.dsn)
    repo.write(EXTRA)
    run_sql(repo.database, "CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL)")
    first = plan(repo)
    assert first.plan.body.rehearsal.converged
    assert any(s.kind == "create_index_concurrently" for s in first.plan.body.steps)  # rehearsed without CONCURRENTLY
    live_copies = [t for t in shadowcache.list_templates(shadow) if t.kind == "live copy"]
    assert [t.fingerprint for t in live_copies] == [first.live.fingerprint]
    kept = live_copies[0].name
    # the steps ran in a transaction that was rolled back: the kept copy is still live as it was
    assert fetch_one(shadow.database_dsn(kept), "SELECT count(*) FROM pg_class WHERE relname = 'orders'") == 0
    second = plan(repo)  # live has not changed: its copy is not dumped and restored again
    assert second.plan.body.rehearsal.converged and sql_of(second) == sql_of(first)
    assert messages.count(f"is kept database {kept}") == 2  # each rehearsal read it: made ahead by the first plan
    assert messages.count(f"as {kept}") == 1  # kept once, by the first plan
    assert databases(shadow, "reconciler_rehearsal_") == []
    assert repo.run("apply", "--auto") == 0  # live changes: a new key, a new copy
    run_sql(repo.database, "ALTER TABLE customers ADD COLUMN extra int")
    plan(repo)
    assert len([t for t in shadowcache.list_templates(shadow) if t.kind == "live copy"]) == 2


def test_a_copy_of_live_that_moved_since_the_plan_read_it_is_neither_used_nor_kept(repo: Repo, shadow: Server) -> None:
    """An apply changes live between the plan's read and the copy's pg_dump: the copy would be another schema under
    the fingerprint the plan read (every later plan of that schema would rehearse on it). It is refused, and none kept."""
    from reconciler import rehearsal, sandbox

    configure(repo, shadow.dsn)
    run_sql(repo.database, "CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL)")
    with connect(repo.database) as conn:
        read = inspect.snapshot(conn, exclude_schemas=("reconciler",)).fingerprint
    run_sql(repo.database, "ALTER TABLE customers RENAME TO clients")  # an apply, meanwhile
    major = int(str(fetch_one(repo.database, "SHOW server_version_num"))) // 10000
    loader = sandbox.prepare(shadow, sandbox.LoadLimits(), stand_ins=True)
    assert rehearsal.prepare_live_copy(target_dsn=repo.database, target_major=major, shadow=shadow,
                                       exclude_schemas=("reconciler",), live_fingerprint=read, cache_keep=3,
                                       sandbox=loader) is None
    assert [t for t in shadowcache.list_templates(shadow) if t.kind == "live copy"] == []
    with pytest.raises(rehearsal.LiveMoved, match="changed while it was being planned"), \
            rehearsal.live_copy(repo.database, shadow, target_major=major, exclude_schemas=("reconciler",), owners=False,
                                privileges=False, live_fingerprint=read, cache_keep=3, purpose="rehearsal",
                                sandbox=loader):
        pass
    assert [t for t in shadowcache.list_templates(shadow) if t.kind == "live copy"] == []


def test_steps_that_need_their_own_transaction_rehearse_on_a_copy(repo: Repo, shadow: Server,
                                                                   messages: Messages) -> None:
    configure(repo, shadow.dsn)
    run_sql(repo.database, "CREATE TYPE mood AS ENUM ('sad'); CREATE TABLE people (id int PRIMARY KEY, m mood)")
    repo.write({"60_mood.sql": "CREATE TYPE mood AS ENUM ('sad', 'happy');\n"
                               "CREATE TABLE people (id int PRIMARY KEY, m mood DEFAULT 'happy');\n"})
    plan(repo)  # keeps the copy of live; an enum value added is not usable in the transaction that adds it
    first = plan(repo)
    assert first.plan.body.rehearsal.converged
    assert any(s.kind == "add_enum_value" for s in first.plan.body.steps)
    kept = next(t.name for t in shadowcache.list_templates(shadow) if t.kind == "live copy")
    assert messages.count(f"is a copy of kept database {kept}") == 2  # each rehearsal got a copy of its own
    assert databases(shadow, "reconciler_rehearsal_") == []


# --- watch: the embedded shadow stays up between cycles ---------------------------------------------------------

@pytest.fixture
def cache_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache folder of the test's own for the embedded shadow, one the service account can reach when running as
    root; the shadow cluster's files, wherever it placed them (a memory filesystem), go with it."""
    home = Path(tempfile.mkdtemp(prefix="reconciler-cache-home-"))
    home.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    yield home
    bindir = wheel_bindir()
    if bindir is not None:
        placed = EmbeddedCluster(pipeline.shadow_cache_dir(bindir_major(bindir)), durable=False).datadir
        shutil.rmtree(placed, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


def _postmaster(pidfile: Path) -> list[str]:
    """pid, data directory and start time of the running postmaster."""
    assert pidfile.exists(), f"the embedded shadow is not running ({pidfile} is missing)"
    return pidfile.read_text().splitlines()[:3]


def test_watch_keeps_its_embedded_shadow_running_and_reuses_the_template(repo: Repo, pg_server: Server,
                                                                         cache_home: Path, messages: Messages) -> None:
    if os.environ.get(TEST_BINDIR_ENV) or wheel_bindir() is None:
        pytest.skip("the embedded shadow uses the wheel's PostgreSQL")
    assert bindir_major(wheel_bindir()) == pg_server.major_version  # type: ignore[arg-type]
    configure(repo, "embedded")
    shadow_cluster = EmbeddedCluster(pipeline.shadow_cache_dir(pg_server.major_version), durable=False)
    pidfile = shadow_cluster.datadir / "postmaster.pid"  # on a memory filesystem where there is one
    with watching(repo, interval=1.0) as w:
        w.wait(lambda: w.reported("applied", "start"), "the first plan applied")
        started = len(w.watcher.reports)
        first = _postmaster(pidfile)  # between cycles: still running
        w.wait(lambda: w.reported("no_drift", "drift", after=started), "a drift check")
        w.wait(lambda: w.reported("no_drift", "drift", after=started + 1), "a second drift check")
        assert _postmaster(pidfile) == first
    assert messages.count(" statements from ") == 1  # the start's plan loaded; every drift check read what it kept
    assert messages.count("is kept database") >= 2
    assert not pidfile.exists()  # stopped with the watcher
    assert fetch_one(repo.database, "SELECT count(*) FROM reconciler.runs WHERE status = 'applied'") == 1



# --- schemas that start like a kept one -------------------------------------------------------------

MORE = {"90_more.sql": "CREATE TABLE more (id int);\nCREATE INDEX more_id ON more (id);\n"}


def statements(repo: Repo) -> int:
    return len(statement_chain(load_source(repo.schemas))) - 1


def fresh(repo: Repo, shadow: Server) -> Comparison:
    """The same plan with the cache off: the desired schema loaded from its first statement."""
    configure(repo, shadow.dsn, keep=0)
    try:
        return plan(repo)
    finally:
        configure(repo, shadow.dsn)


def test_an_extended_schema_loads_only_what_was_added(repo: Repo, shadow: Server, messages: Messages,
                                                      loads: list[str]) -> None:
    configure(repo, shadow.dsn)
    plan(repo)
    before = statements(repo)
    repo.write(MORE)
    extended = plan(repo)
    assert len(loads) == 2
    assert messages.count(f"holds the first {before} of the desired schema's {before + 2} statements") == 1
    assert messages.count("loaded 2 statements from") == 1
    whole = fresh(repo, shadow)
    assert extended.desired == whole.desired  # a copy plus the rest is what loading it all gives
    assert sql_of(extended) == sql_of(whole) and any("more_id" in s for s in sql_of(extended))
    assert set(templates(shadow)) >= {fingerprint(repo)}


def test_watch_extends_the_kept_database_in_place(repo: Repo, shadow: Server, messages: Messages,
                                                 loads: list[str]) -> None:
    """consume (watch's plans): the kept database the schema extends becomes the new one; nothing is copied."""
    configure(repo, shadow.dsn)
    plan(repo)
    before, base = statements(repo), fingerprint(repo)
    kept = templates(shadow)[base].name
    repo.write(MORE)
    extended = plan(repo, consume=True)
    assert len(loads) == 2
    assert messages.count(f"holds the first {before} of the desired schema's {before + 2} statements; loading the "
                          "rest into it (taken from the cache)") == 1
    assert messages.count("loaded 2 statements from") == 1
    assert set(templates(shadow)) == {fingerprint(repo)}  # the base was taken, not copied
    assert kept not in databases(shadow, "reconciler_")
    whole = fresh(repo, shadow)
    assert extended.desired == whole.desired and sql_of(extended) == sql_of(whole)
    with connect(shadow.database_dsn(templates(shadow)[fingerprint(repo)].name)) as conn:  # read-only as kept
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)


def test_watch_copies_checkpoints(repo: Repo, shadow: Server, messages: Messages,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint is where the next edit in the middle starts from: consume never takes it."""
    monkeypatch.setattr(shadowcache, "CHECKPOINT_MIN", 1)
    configure(repo, shadow.dsn)
    middle = "15_middle.sql"
    for columns in ("id int", "id int, note text", "id int, note text, done boolean"):
        repo.write({middle: f"CREATE TABLE edited ({columns});\n"})
        plan(repo, consume=True)
    shared = statements_before(repo, middle)
    assert messages.count(f"holds the first {shared} of the desired schema's {statements(repo)} statements; loading "
                          "the rest into a copy of it") == 1
    assert [t for t in shadowcache.list_templates(shadow) if t.checkpoint and t.prefix and t.prefix.count == shared]


def test_a_failure_in_the_added_statements_names_its_own_line(repo: Repo, shadow: Server) -> None:
    configure(repo, shadow.dsn)
    plan(repo)
    kept = set(templates(shadow))
    repo.write({"90_more.sql": "CREATE TABLE more (id int);\n\nALTER TABLE no_such_table ADD COLUMN x int;\n"})
    with pytest.raises(SchemaLoadError) as failed:
        plan(repo)
    assert failed.value.path.endswith("90_more.sql") and failed.value.line == 3
    assert set(templates(shadow)) == kept  # nothing kept from the failed load
    assert databases(shadow, "reconciler_shadow_") == []


def test_an_edit_in_the_middle_keeps_a_checkpoint_the_next_edit_starts_from(
        repo: Repo, shadow: Server, messages: Messages, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shadowcache, "CHECKPOINT_MIN", 1)  # the example schema is small
    configure(repo, shadow.dsn)
    middle = "15_middle.sql"  # between the tables and the views
    repo.write({middle: "CREATE TABLE edited (id int);\n"})
    plan(repo)
    repo.write({middle: "CREATE TABLE edited (id int, note text);\n"})
    shared = statements_before(repo, middle)
    plan(repo)  # parts from the kept schema at the edit: loads it all, keeping a checkpoint there
    assert messages.count(f"kept desired the first {shared} statements of") == 1
    assert messages.count("holds the first") == 0
    repo.write({middle: "CREATE TABLE edited (id int, note text, done boolean);\n"})
    third = plan(repo)
    total = statements(repo)
    assert messages.count(f"holds the first {shared} of the desired schema's {total} statements") == 1
    assert messages.count(f"loaded {total - shared} statements from") == 1
    whole = fresh(repo, shadow)
    assert third.desired == whole.desired and sql_of(third) == sql_of(whole)
    assert any("done" in s for s in sql_of(third))


def statements_before(repo: Repo, name: str) -> int:
    return sum(1 for f in load_source(repo.schemas).files if f.path < name for _ in split_file(f))


SPLICED = {  # an edit in 15_middle.sql; what follows it (17_after.sql, the view) may stay as it is
    "17_after.sql": textwrap.dedent("""\
        CREATE TABLE invoices (id bigint PRIMARY KEY, customer_id bigint REFERENCES customers (id), note text);
        CREATE INDEX invoices_customer ON invoices (customer_id);
        COMMENT ON TABLE invoices IS 'billed';
        """),
    "30_functions.sql": "",  # a function after the edit would make the schema load as usual
}
MIDDLE = [
    "CREATE TABLE edited (id int);\n",
    "CREATE TABLE edited (id int, note text DEFAULT 'x', customer_id bigint REFERENCES customers (id));\n"
    "CREATE INDEX edited_note ON edited (note);\nCOMMENT ON COLUMN edited.note IS 'said';\n",
    "CREATE TABLE edited (id int PRIMARY KEY, note text DEFAULT 'y');\nCREATE VIEW edited_notes AS SELECT note FROM edited;\n",
    "",  # removed
    "CREATE SEQUENCE edited_seq;\nCREATE TABLE edited (id bigint DEFAULT nextval('edited_seq'), status status);\n",
]


def test_watch_edits_the_previous_schemas_database_in_place(repo: Repo, shadow: Server, messages: Messages,
                                                            loads: list[str]) -> None:
    """Each edit in the middle drops what the edited statements made in the kept database of the schema before it
    and runs them as they are now, keeping the statements after them: the result is what loading in order gives."""
    configure(repo, shadow.dsn)
    repo.write(SPLICED)
    repo.write({"15_middle.sql": MIDDLE[0]})
    previous = plan(repo, consume=True).source
    after = statements(repo) - statements_before(repo, "16")
    for k, text in enumerate(MIDDLE[1:], 1):
        repo.write({"15_middle.sql": text})
        before = len(loads)
        edited = plan(repo, consume=True, previous=previous)
        assert messages.count("holds the previous desired schema; editing it in place") == k, text
        assert messages.count(f"the {after} after them kept") == k
        assert len(loads) == before + (1 if text else 0)  # only the edited statements ran
        whole = fresh(repo, shadow)
        assert edited.desired == whole.desired, text  # as loading it all in order
        assert sql_of(edited) == sql_of(whole)
        previous = edited.source
    assert set(templates(shadow)) == {fingerprint(repo)}  # each previous database was taken, not copied


def test_an_edit_that_fails_in_place_loads_as_usual_and_names_its_line(repo: Repo, shadow: Server,
                                                                      messages: Messages) -> None:
    configure(repo, shadow.dsn)
    repo.write(SPLICED)
    repo.write({"15_middle.sql": MIDDLE[0]})
    previous = plan(repo, consume=True).source
    repo.write({"15_middle.sql": "CREATE TABLE edited (id int);\n\nCREATE INDEX edited_x ON edited (x);\n"})
    with pytest.raises(SchemaLoadError) as failed:
        plan(repo, consume=True, previous=previous)
    assert failed.value.path.endswith("15_middle.sql") and failed.value.line == 3
    assert messages.count("editing it in place:") == 1 and messages.count("failed") == 1
    assert databases(shadow, "reconciler_shadow_") == []  # nothing left behind
    repo.write({"15_middle.sql": MIDDLE[2]})
    fixed = plan(repo, consume=True, previous=previous)  # the previous database was used up: loads as usual
    assert fixed.desired == fresh(repo, shadow).desired


def test_an_edit_the_statements_after_it_mention_loads_as_usual(repo: Repo, shadow: Server, messages: Messages,
                                                                loads: list[str]) -> None:
    configure(repo, shadow.dsn)
    repo.write(SPLICED)
    repo.write({"15_middle.sql": MIDDLE[0], "18_refers.sql": "CREATE VIEW edited_ids AS SELECT id FROM edited;\n"})
    previous = plan(repo, consume=True).source
    repo.write({"15_middle.sql": "CREATE TABLE edited (id bigint, note text);\n"})
    edited = plan(repo, consume=True, previous=previous)
    assert messages.count("editing it in place") == 0
    assert edited.desired == fresh(repo, shadow).desired


def test_deferred_eviction_drops_only_when_asked(repo: Repo, shadow: Server) -> None:
    configure(repo, shadow.dsn, keep=1)
    plan(repo)
    first = fingerprint(repo)
    with shadowcache.deferred_eviction() as evict:
        repo.write(MORE)
        plan(repo)
        assert set(templates(shadow)) == {first, fingerprint(repo)}  # one too many, until asked
        evict()
        assert list(templates(shadow)) == [fingerprint(repo)]
    repo.write(EXTRA)
    plan(repo)  # outside the block: at once
    assert list(templates(shadow)) == [fingerprint(repo)]


@pytest.fixture
def inspected(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The databases schemainspect reads (the real inspection, counted)."""
    calls: list[str] = []
    real = migra_engine._inspect

    def counted(inspector: Any, dsn: str, excluded: tuple[str, ...], **kwargs: Any) -> Any:
        calls.append(dsn)
        return real(inspector, dsn, excluded, **kwargs)

    monkeypatch.setattr(migra_engine, "_inspect", counted)
    return calls


def test_a_remembering_engine_reads_an_unchanged_live_database_once(repo: Repo, shadow: Server,
                                                                     inspected: list[str]) -> None:
    configure(repo, shadow.dsn)
    run_sql(repo.database, "CREATE TABLE customers (id bigint PRIMARY KEY)")
    config = load_config(repo.config)
    env = config.environment("test")
    engine = SupplementedEngine(remember=True)  # in memory only: nothing saved on disk
    with open_servers(config, env) as servers:
        make_plan(config, env, servers, engine=engine)
        reads = inspected.count(servers.target_dsn)
        repo.write(EXTRA)
        second = make_plan(config, env, servers, engine=engine)
        assert inspected.count(servers.target_dsn) == reads  # live unchanged: its reading reused
        assert sql_of(second) == sql_of(make_plan(config, env, servers))  # what a new engine plans
        run_sql(repo.database, "ALTER TABLE customers ADD COLUMN email text")
        reads = inspected.count(servers.target_dsn)
        third = make_plan(config, env, servers, engine=engine)
        assert inspected.count(servers.target_dsn) == reads + 1  # live changed: read again
        assert sql_of(third) == sql_of(make_plan(config, env, servers))
        assert sql_of(third) != sql_of(second)


# --- inspections kept on disk -----------------------------------------------------------------------------------

def saved(home: Path) -> list[Path]:
    return sorted((home / "reconciler" / "inspections").glob("*.pickle"))


def test_catalog_token_changes_with_ddl_only(database: str) -> None:
    def token() -> str:
        with connect(database) as conn:
            return inspections.catalog_token(conn)

    first = token()
    assert token() == first
    run_sql(database, "CREATE TABLE t (id int)")
    created = token()
    assert created != first
    run_sql(database, "INSERT INTO t SELECT generate_series(1, 1000)")
    run_sql(database, "ANALYZE t")
    run_sql(database, "VACUUM t")
    assert token() == created  # data, statistics and vacuum write no catalog row anew
    for ddl in ("COMMENT ON TABLE t IS 'kept'", "GRANT SELECT ON t TO PUBLIC", "ALTER TABLE t ALTER id SET NOT NULL",
                "DROP TABLE t"):
        before = token()
        run_sql(database, ddl)
        assert token() != before, ddl


def test_unchanged_databases_are_read_from_disk(repo: Repo, shadow: Server, cache_home: Path,
                                                inspected: list[str], messages: Messages) -> None:
    configure(repo, shadow.dsn)
    run_sql(repo.database, "CREATE TABLE customers (id bigint PRIMARY KEY)")
    first = plan(repo)
    assert len(inspected) == 2 and len(saved(cache_home)) == 2  # live and the desired database, kept from now on
    second = plan(repo)
    assert len(inspected) == 2, "an unchanged database was inspected again"
    assert sql_of(second) == sql_of(first)

    run_sql(repo.database, "ALTER TABLE customers ADD COLUMN email text")
    third = plan(repo)
    assert inspected[2:] == [repo.database]  # live changed: read again; the desired database was not
    assert sql_of(third) == sql_of(fresh(repo, shadow)) != sql_of(first)

    for path in saved(cache_home):
        path.write_bytes(b"not a pickle")
    logger = logging.getLogger("reconciler.diff.inspections")
    logger.addHandler(messages)
    try:
        fourth = plan(repo)
    finally:
        logger.removeHandler(messages)
    assert sql_of(fourth) == sql_of(third)
    assert messages.count("cannot read") == 2


def test_throwaway_databases_are_not_saved(repo: Repo, pg_server: Server, cache_home: Path,
                                           inspected: list[str]) -> None:
    configure(repo, pg_server.dsn)  # a shadow on the target's cluster: loaded for each plan, then dropped
    plan(repo)
    assert len(saved(cache_home)) == 1  # live's
    plan(repo)
    assert inspected.count(repo.database) == 1 and len(inspected) == 3


def test_no_inspections_saved_with_the_cache_off(repo: Repo, shadow: Server, cache_home: Path) -> None:
    configure(repo, shadow.dsn, keep=0)
    plan(repo)
    assert saved(cache_home) == []


def test_an_edited_index_on_an_earlier_table_is_dropped_and_made_again(repo: Repo, shadow: Server,
                                                                      messages: Messages) -> None:
    configure(repo, shadow.dsn)
    repo.write({"15_middle.sql": "CREATE INDEX orders_total ON orders (total);\n",
                "17_after.sql": "CREATE TABLE notes (id int, body text);\n", "20_views.sql": "", "30_functions.sql": ""})
    previous = plan(repo, consume=True).source
    repo.write({"15_middle.sql": "CREATE INDEX orders_total ON orders (total DESC) WHERE total > 0;\n"})
    edited = plan(repo, consume=True, previous=previous)
    assert messages.count("editing it in place: 1 of its statements") == 1
    assert edited.desired == fresh(repo, shadow).desired
    assert any("orders_total" in s and "DESC" in s for s in sql_of(edited))


def test_watch_edits_its_last_plans_database_in_place(repo: Repo, shadow: Server, messages: Messages) -> None:
    configure(repo, shadow.dsn)
    repo.write(SPLICED)
    repo.write({"15_middle.sql": MIDDLE[0]})
    with watching(repo) as w:
        w.wait(lambda: w.reported("applied", "start"), "the first plan applied")
        started = len(w.watcher.reports)
        repo.write({"15_middle.sql": MIDDLE[1]})
        w.wait(lambda: w.reported("applied", "change", after=started), "the edit applied")
    assert messages.count("holds the previous desired schema; editing it in place") == 1
    assert fetch_one(repo.database, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'edited' "
                                    "AND column_name = 'note'") == 1


def test_an_interrupt_just_as_a_scratch_database_is_made_leaves_none_behind(pg_server: Server) -> None:
    """A Ctrl-C (or watch's SIGTERM) lands between the CREATE DATABASE and the block that drops it on the way out:
    the database is dropped all the same. Here the seed makes the database, as a copy of a kept prefix would, and
    the interrupt comes right after."""
    from psycopg import sql as pgsql

    from reconciler.shadowcache import CacheKey, cached_database

    made: list[str] = []

    def seed(name: str) -> bool:
        with connect(pg_server.dsn) as conn:
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
        made.append(name)
        raise KeyboardInterrupt  # as a signal handler raises it, between two statements

    key = CacheKey(digest="0" * 64, fingerprint="none")  # no such kept database: built, seeded first
    with pytest.raises(KeyboardInterrupt), cached_database(pg_server, key, lambda dsn: None, keep=1, purpose="shadow",
                                                           what="the test's schema", seed=seed):
        pass
    assert made
    assert fetch_one(pg_server.dsn, f"SELECT count(*) FROM pg_database WHERE datname = '{made[0]}'") == 0
