"""Wires the stages together for one environment: servers, shadow, inspect, diff, safety, plan.

The command line calls these and only formats their results; watch and tests call them too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import conversions, estimates, history, inspect, massdrops, renames, roundtrip, sourcetext
from .apply import settle
from .config import EMBEDDED, Config, Environment
from .datachecks import add_data_hazards
from .diff.base import Change, DiffEngine
from .diff.engine import SupplementedEngine
from .diff.inspections import InspectionCache, catalog_state
from .diff.inspections import default_folder as default_inspection_folder
from .diff.supplements import Options as SupplementOptions
from .errors import ReconcilerError, RefusedError
from .lint import lint_steps
from .plan import Plan
from .planfile import build_plan
from .policy import Catalog, Finding, evaluate, load_policies, read_catalog
from .rehearsal import SKIPPED, LiveMoved, live_copy, prepare_live_copy, rehearse
from .safety import SafetySettings, compile_steps
from .sandbox import LoadLimits, Sandbox
from .sandbox import prepare as prepare_sandbox
from .servers import (
    EmbeddedCluster,
    Server,
    bindir_for_shadow,
    bindir_major,
    connect,
    server_for_dsn,
    throwaway_database,
)
from .shadow import create_roles, load_schema, roles_named, same_cluster
from .shadowcache import desired_database
from .source import DesiredSchema, load_source
from .sourcemap import with_sources

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "app"


@dataclass(frozen=True)
class Servers:
    target_dsn: str
    target_major: int
    shadow: Server
    sandbox: Sandbox | None = None  # the load role on the shadow server (None: no shadow wanted)

    @property
    def loader(self) -> Sandbox:
        if self.sandbox is None:
            raise ReconcilerError("no shadow server was prepared for desired SQL")
        return self.sandbox


def load_limits(config: Config) -> LoadLimits:
    return LoadLimits(statement_timeout=config.load.statement_timeout, temp_file_limit=config.load.temp_file_limit,
                      extensions=frozenset(config.load.extensions))


def shadow_cache_dir(major: int) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "reconciler" / f"shadow-pg{major}"


@contextlib.contextmanager
def open_servers(config: Config, env: Environment, *, need_shadow: bool = True) -> Iterator[Servers]:
    """Start what the environment needs (embedded clusters) and stop it afterwards."""
    with contextlib.ExitStack() as stack:
        database = env.database_dsn()
        local_server: Server | None = None
        if database == EMBEDDED:
            cluster = EmbeddedCluster(config.local_dir / env.name)
            stack.callback(cluster.stop)
            local_server = cluster.start()
            _ensure_database(local_server, EMBEDDED_DATABASE)
            target_dsn = local_server.database_dsn(EMBEDDED_DATABASE)
            target_major = local_server.major_version
        else:
            target = server_for_dsn(database)
            target_dsn, target_major = database, target.major_version
        shadow_spec = env.shadow_dsn() if need_shadow else EMBEDDED
        if not need_shadow:
            shadow = local_server or Server(dsn=target_dsn, major_version=target_major)
        elif shadow_spec != EMBEDDED:
            shadow = server_for_dsn(shadow_spec)
        elif local_server is not None:
            shadow = local_server
        else:
            shadow_cluster = EmbeddedCluster(
                shadow_cache_dir(target_major), bindir_for_shadow(target_major), durable=False
            )
            stack.callback(shadow_cluster.stop)
            shadow = shadow_cluster.start()
        loader = None
        if need_shadow:  # desired SQL never runs as the shadow's own role (README: threat model)
            loader = prepare_sandbox(shadow, load_limits(config),
                                     stand_ins=shadow.embedded or not same_cluster(target_dsn, shadow.dsn))
        yield Servers(target_dsn=target_dsn, target_major=target_major, shadow=shadow, sandbox=loader)


def _ensure_database(server: Server, name: str) -> None:
    with connect(server.dsn) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def default_engine(config: Config, *, remember: bool = False) -> DiffEngine:
    """Inspections are kept on disk with the shadow cache (``shadow_cache: 0`` turns both off). ``remember``: for
    an engine used by plan after plan (watch), which also keeps in memory what it read of an unchanged live
    database."""
    cache = InspectionCache(default_inspection_folder()) if config.shadow_cache > 0 else None
    return SupplementedEngine(options=SupplementOptions(manage_privileges=config.manage_privileges,
                                                        manage_owners=config.manage_owners),
                              remember=remember, cache=cache)


def safety_settings(config: Config, env: Environment) -> SafetySettings:
    return SafetySettings(switches=config.safety, lock_timeout=env.lock_timeout, statement_timeout=env.statement_timeout,
                          timeouts=env.timeouts)


def auto_apply_blockers(env: Environment, plan: Plan | None = None) -> list[str]:
    """Why a plan may not apply without a human here (empty: it may). Without a plan, the environment's own rules
    alone, so a command can refuse before planning. apply --auto, rollback and watch all ask this one question."""
    reasons = []
    if not env.auto_apply:
        reasons.append("auto_apply: false")
    if env.approvals or env.approval_groups:
        reasons.append(f"environment {env.name!r} requires approvals")
    if plan is None or not plan.body.steps:
        return reasons
    policy = plan.body.policy
    if policy.denied:
        reasons.append("denied by " + "; ".join(f"{f.rule} ({f.file}:{f.line}) {f.subject}" for f in policy.denied))
    if policy.approvals or policy.groups:
        reasons.append(f"policy requires approvals for this plan ({policy.approvals}"
                       f"{' from ' + ', '.join(policy.groups) if policy.groups else ''})")
    if policy.auto_apply_blocked_by:
        reasons.append("the auto-apply gate holds this plan back: " + "; ".join(policy.auto_apply_blocked_by))
    return reasons


def managed(config: Config) -> dict[str, bool]:
    """The snapshot's opt-in kinds, as ``inspect.snapshot`` keyword arguments."""
    return {"owners": config.manage_owners, "privileges": config.manage_privileges}


def manages(config: Config) -> tuple[str, ...]:
    """The opt-in kinds a plan records, so apply verifies the way the plan compared."""
    return tuple(k for k, on in (("owners", config.manage_owners), ("privileges", config.manage_privileges)) if on)


def load_desired(config: Config, source: DesiredSchema, shadow_dsn: str, servers: Servers, skip: int = 0,
                 stop: int | None = None) -> int:
    """Load the desired schema's statements [skip, stop) into the shadow database (the first ones may be there
    already), as the load role, which owns it; on a shadow server that is not the target, the roles the schema names
    are created first (NOLOGIN stand-ins, which the load role may act as): roles are cluster-wide, a shadow of our
    own has none."""
    sandbox = servers.loader
    sandbox.own(shadow_dsn)
    named = roles_named(source)
    if not same_cluster(servers.target_dsn, shadow_dsn):
        create_roles(shadow_dsn, named)
    sandbox.join(named)
    return load_schema(source, shadow_dsn, sandbox=sandbox, owners=config.manage_owners, progress=_report_progress,
                       skip=skip, stop=stop)


def _report_progress(path: str, done: int, total: int) -> None:
    log.info("loading %s: %d of %d statements", path, done, total)


@dataclass(frozen=True)
class Comparison:
    """The live and desired schemas side by side, read while the shadow exists."""

    source: DesiredSchema
    identity: inspect.TargetIdentity
    live: inspect.SchemaSnapshot
    desired: inspect.SchemaSnapshot
    plan: Plan


_GONE = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedObject,
         psycopg.errors.UndefinedFunction)


def make_plan(
    config: Config,
    env: Environment,
    servers: Servers,
    *,
    schemas_dir: Path | None = None,
    engine: DiffEngine | None = None,
    live_memo: LiveMemo | None = None,
    consume_kept: bool = False,
    previous: DesiredSchema | None = None,
) -> Comparison:
    """``consume_kept``: a kept desired database this schema extends is extended in place rather than copied, and
    one of ``previous`` (the last plan's schema) is edited in place when it can be (see
    ``shadowcache.desired_database``): for watch, whose next schema nearly always extends or edits this one.

    A plan reads live several times (its schema, its tables' sizes, its rows for the data checks, its copy): when an
    object it read is gone by a later read and live is no longer the schema it read, live moved under the plan (an
    apply running): that is said as such, not as an error of the tool."""
    read: list[str] = []
    try:
        return _make_plan(config, env, servers, schemas_dir=schemas_dir, engine=engine, live_memo=live_memo,
                          consume_kept=consume_kept, previous=previous, read=read)
    except _GONE as exc:
        if read and _live_fingerprint(config, servers.target_dsn) != read[0]:
            raise LiveMoved(f"the live schema changed while it was being planned ({exc.diag.message_primary or exc}); "
                            "is an apply running on it? `reconciler history` says: plan again") from None
        raise


def _live_fingerprint(config: Config, target_dsn: str) -> str:
    with connect(target_dsn) as conn:
        return inspect.snapshot(conn, exclude_schemas=(config.metadata_schema,), **managed(config)).fingerprint


def _make_plan(
    config: Config,
    env: Environment,
    servers: Servers,
    *,
    schemas_dir: Path | None,
    engine: DiffEngine | None,
    live_memo: LiveMemo | None,
    consume_kept: bool,
    previous: DesiredSchema | None,
    read: list[str],
) -> Comparison:
    engine = engine or default_engine(config)
    warm_up = getattr(engine, "warm_up", None)
    if warm_up is not None:
        warm_up()  # its imports, while this thread loads and reads
    rules = load_policies(config.policies_dir, skip=[config.trust_file])  # a bad policy file fails before any work
    source = load_source(schemas_dir or config.schemas_dir)
    excluded = (config.metadata_schema,)
    catalog: Catalog | None = None
    annotated = renames.read_renames(source)
    notes = conversions.read_notes(source)
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="live")
    try:
        # live's schema and its tables' sizes are read while the desired schema loads, and then beside the reading
        # of it: reading a catalog is mostly waiting on its server
        sizes = pool.submit(_read_facts, servers.target_dsn, excluded, live_memo)
        reading = pool.submit(_read_live, config, servers.target_dsn, annotated, live_memo)
        with desired_database(servers.shadow, source, lambda dsn, skip, stop: load_desired(config, source, dsn, servers, skip, stop),
                              target_dsn=servers.target_dsn, keep=config.shadow_cache, consume=consume_kept,
                              previous=previous, sandbox=servers.loader) as shadow, \
                _frozen(engine, servers.loader.login(shadow.dsn), excluded, eager=shadow.built):
            shadow_dsn = servers.loader.login(shadow.dsn)  # read as the load role too: the schema's code is its own
            with connect(shadow_dsn) as conn:
                renames.check_desired(conn, annotated)
                desired = inspect.snapshot(conn, exclude_schemas=excluded, **managed(config))
                if any(r.kind == "schema" and r.applies_to(env.name) for r in rules):
                    catalog = read_catalog(conn, exclude_schemas=excluded)
            ident, live, pending = reading.result()
            read.append(live.fingerprint)
            facts = sizes.result()
            flags = managed(config)
            ahead = None
            if live != desired and env.rehearse and _same_major(servers, env) and not (flags["owners"] or flags["privileges"]):
                # the rehearsal's copy of live (pg_dump and restore, unless kept) is made while the engine diffs
                ahead = pool.submit(prepare_live_copy, target_dsn=servers.target_dsn, target_major=servers.target_major,
                                    shadow=servers.shadow, exclude_schemas=excluded, live_fingerprint=live.fingerprint,
                                    cache_keep=config.shadow_cache, sandbox=servers.loader)
                if pending:
                    ahead.result()  # renaming starts from a copy of it
            if pending:
                done, changes, equivalents = _diff_after_renames(engine, servers, shadow_dsn, desired, pending, excluded,
                                                                 flags, live.fingerprint, config.shadow_cache)
                facts = renames.renamed_facts(facts, done)
            else:
                with _known(engine, servers.target_dsn, live.fingerprint), \
                        _known(engine, shadow_dsn, desired.fingerprint) if shadow.kept else contextlib.nullcontext():
                    changes = (engine.diff(servers.target_dsn, shadow_dsn, exclude_schemas=excluded)
                               if live != desired else [])
                equivalents = _check_expressed(engine.name, shadow_dsn, desired, live, changes)
            if sourcetext.concerns(changes):
                with connect(shadow_dsn) as conn:  # the load role's: the trials run the desired files' text
                    changes = sourcetext.as_written(changes, source, conn)
            steps = compile_steps(changes, facts, safety_settings(config, env), engine=engine.name, notes=notes)
            dropped = massdrops.dropped_tables(steps) if not env.allow_mass_drops else set()
            if dropped:
                with connect(servers.target_dsn) as conn:
                    massdrops.check(conn, dropped, excluded, env.name)
            rehearsal = SKIPPED
            if steps and env.rehearse:
                if not _same_major(servers, env):
                    raise RefusedError(
                        f"the shadow server runs PostgreSQL {servers.shadow.major_version} and the target "
                        f"{servers.target_major}: install matching server binaries, point `shadow:` at a server like the "
                        "target, or set allow_version_mismatch for this environment")
                rehearsal = rehearse(steps, target_dsn=servers.target_dsn, target_major=servers.target_major,
                                     shadow=servers.shadow, desired_dsn=shadow_dsn, desired=desired, engine=engine,
                                     exclude_schemas=excluded, owners=flags["owners"], privileges=flags["privileges"],
                                     live_fingerprint=live.fingerprint, cache_keep=config.shadow_cache,
                                     copy_key=ahead.result() if ahead is not None else None, sandbox=servers.loader)
                if not rehearsal.converged:
                    raise RefusedError(f"the plan does not survive its rehearsal: {rehearsal.describe()}")
    finally:
        pool.shutdown(wait=True)
        _saved(engine)
    if steps and config.safety.data_checks:
        with connect(servers.target_dsn) as conn:
            steps = add_data_hazards(conn, steps, facts)
    if steps and config.safety.squawk:
        steps = lint_steps(steps, exclude=config.safety.squawk_exclude, pg_version=ident.server_version.split()[0])
    steps = with_sources(steps, source)
    if steps:
        with connect(servers.target_dsn) as conn:
            rates = estimates.rates_from_history(conn, config.metadata_schema)
        steps = estimates.estimate_steps(steps, facts.tables, rates)
    policy = evaluate(rules, env.name, steps, catalog, base_approvals=env.approvals, base_groups=env.approval_groups)
    plan = build_plan(
        environment=env.name,
        engine=engine.name,
        metadata_schema=config.metadata_schema,
        identity=ident,
        live=live,
        desired_source=source,
        desired=desired,
        steps=steps,
        ttl=timedelta(seconds=env.plan_ttl_seconds),
        policy=policy,
        rehearsal=rehearsal,
        manages=manages(config),
        equivalents={**equivalents, **{(k, n): d for k, n, d in rehearsal.equivalent}},
    )
    return Comparison(source=source, identity=ident, live=live, desired=desired, plan=plan)


def _same_major(servers: Servers, env: Environment) -> bool:
    """May the shadow server rehearse for the target (the same major version, or a mismatch allowed)?"""
    return servers.shadow.major_version == servers.target_major or env.allow_version_mismatch


class LiveMemo:
    """What a plan reads of live's catalogs, for a process that plans again and again (watch): its snapshot and
    the catalog part of its facts, read again only when live's catalogs, roles or the plan's settings have changed
    since (the key of saved inspections, without the fingerprint). Tables' sizes are read every time."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[str, Any]] = {}  # what -> (key, value)
        self._lock = threading.Lock()

    def snapshot(self, conn: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...], owners: bool,
                 privileges: bool) -> inspect.SchemaSnapshot:
        key, found = self._recall(conn, "snapshot", exclude_schemas, owners, privileges)
        if not isinstance(found, inspect.SchemaSnapshot):
            found = inspect.snapshot(conn, exclude_schemas=exclude_schemas, owners=owners, privileges=privileges)
            self._keep("snapshot", key, found)
        return found

    def facts(self, conn: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...]) -> inspect.LiveFacts:
        key, known = self._recall(conn, "facts", exclude_schemas)
        found = inspect.live_facts(conn, exclude_schemas=exclude_schemas,
                                   known=known if isinstance(known, inspect.LiveFacts) else None)
        self._keep("facts", key, found)
        return found

    def _recall(self, conn: psycopg.Connection[Any], what: str, *settings: object) -> tuple[str, object]:
        # the key is read first: a change made while the catalogs are read moves it, and the next plan reads again
        key = json.dumps([catalog_state(conn), settings], sort_keys=True)
        with self._lock:
            kept = self._kept.get(what)
        if kept is not None and kept[0] == key:
            log.debug("live's catalogs have not changed: its %s is reused", what)
            return key, kept[1]
        return key, None

    def _keep(self, what: str, key: str, value: object) -> None:
        with self._lock:
            self._kept[what] = (key, value)


def _read_live(config: Config, target_dsn: str, annotated: tuple[renames.Rename, ...], memo: LiveMemo | None = None,
               ) -> tuple[inspect.TargetIdentity, inspect.SchemaSnapshot, tuple[renames.Rename, ...]]:
    """What a plan reads of live's schema: who it is, its objects and the renames still to do."""
    excluded = (config.metadata_schema,)
    with connect(target_dsn) as conn:
        settle(conn, config.metadata_schema)  # runs whose applier is gone, and what they left
        for run in (r for r in history.running_runs(conn, config.metadata_schema) if r.alive):
            log.warning("%s: this plan sees it part-way", run.applying)
        ident = inspect.identity(conn)
        if memo is not None:
            live = memo.snapshot(conn, exclude_schemas=excluded, **managed(config))
        else:
            live = inspect.snapshot(conn, exclude_schemas=excluded, **managed(config))
        pending = renames.pending(conn, annotated, database=f"database {ident.database}")
    return ident, live, pending


def _read_facts(target_dsn: str, excluded: tuple[str, ...], memo: LiveMemo | None = None) -> inspect.LiveFacts:
    """Live's tables' sizes and what the safety compiler asks of its catalog."""
    with connect(target_dsn) as conn:
        if memo is not None:
            return memo.facts(conn, exclude_schemas=excluded)
        return inspect.live_facts(conn, exclude_schemas=excluded)


def _frozen(engine: DiffEngine, desired_dsn: str, excluded: tuple[str, ...], *, eager: bool
            ) -> contextlib.AbstractContextManager[None]:
    """The shadow does not change while a plan uses it: an engine that can, inspects it once (and may start now;
    ``eager``: the plan just built it, so no saved inspection is its)."""
    frozen = getattr(engine, "frozen", None)
    return frozen(desired_dsn, prefetch=excluded, eager=eager) if frozen is not None else contextlib.nullcontext()


def _saved(engine: DiffEngine) -> None:
    """What an engine saves for later plans (its inspections) is on disk before the plan is made."""
    saved = getattr(engine, "saved", None)
    if saved is not None:
        saved()


def _known(engine: DiffEngine, dsn: str, fingerprint: str) -> contextlib.AbstractContextManager[None]:
    """``dsn``'s schema has this fingerprint now: an engine that remembers may reuse its reading of it."""
    known = getattr(engine, "known", None)
    return known(dsn, fingerprint) if known is not None else contextlib.nullcontext()


def _check_expressed(engine: str, desired_dsn: str, desired: inspect.SchemaSnapshot, live: inspect.SchemaSnapshot,
                     changes: list[Change]) -> dict[tuple[str, str], str]:
    """Refuse differences the engine found no statements for; returns live's definitions that are the desired
    ones as PostgreSQL re-prints them (the plan's verification counts them as desired)."""
    differences = inspect.compare(desired, live)
    if not differences:
        return {}
    with connect(desired_dsn) as conn:
        settled = roundtrip.settle(conn, desired, live, differences)
    if settled.remaining and not changes:
        names = ", ".join(str(d) for d in settled.remaining[:10])
        raise ReconcilerError(f"the {engine} engine found no statements for differences it cannot express: {names}")
    return dict(settled.equivalent)


def _diff_after_renames(engine: DiffEngine, servers: Servers, desired_dsn: str, desired: inspect.SchemaSnapshot,
                        pending: tuple[renames.Rename, ...], excluded: tuple[str, ...],
                        flags: dict[str, bool], live_fingerprint: str,
                        cache_keep: int) -> tuple[tuple[renames.Rename, ...], list[Change], dict[tuple[str, str], str]]:
    """The renames (those asked for, then the indexes, constraints and sequences named after a renamed table or
    column), and the engine's diff from a schema-only copy of live with them applied: so the engine sees renamed
    objects as the same objects, not as one dropped and one added. Returns every rename and all the changes."""
    log.info("renaming first: %s", "; ".join(r.describe() for r in pending))
    with live_copy(servers.target_dsn, servers.shadow, target_major=servers.target_major, exclude_schemas=excluded,
                   owners=flags["owners"], privileges=flags["privileges"], live_fingerprint=live_fingerprint,
                   cache_keep=cache_keep, purpose="renamed", sandbox=servers.loader) as copy:  # owners and grants kept, as rehearsal's
        copy_dsn = servers.loader.login(copy)  # the load role's copy: it is the applying role there
        with connect(copy_dsn) as conn, connect(desired_dsn) as desired_conn:
            for change in renames.changes(pending):
                conn.execute(change.sql.encode())
            follow = renames.derived(conn, desired_conn, pending)
            for change in renames.changes(follow):
                conn.execute(change.sql.encode())
            renamed = inspect.snapshot(conn, exclude_schemas=excluded, **flags)
        rest = engine.diff(copy_dsn, desired_dsn, exclude_schemas=excluded) if renamed != desired else []
    equivalents = _check_expressed(engine.name, desired_dsn, desired, renamed, rest)
    done = (*pending, *follow)
    return done, [*renames.changes(done), *rest], equivalents


def drift(config: Config, servers: Servers, *, schemas_dir: Path | None = None) -> list[inspect.ObjectDifference]:
    """What differs between live and desired, by our catalog snapshot (no diff engine needed)."""
    with desired_snapshot(config, servers, schemas_dir=schemas_dir) as (shadow_dsn, desired):
        return drift_of(config, shadow_dsn, desired, servers.target_dsn)


@contextlib.contextmanager
def desired_snapshot(config: Config, servers: Servers, *,
                     schemas_dir: Path | None = None) -> Iterator[tuple[str, inspect.SchemaSnapshot]]:
    """The desired schema loaded in the shadow (its DSN) and its snapshot: what live databases are compared with,
    one or a fleet of them."""
    source = load_source(schemas_dir or config.schemas_dir)
    with desired_database(servers.shadow, source, lambda dsn, skip, stop: load_desired(config, source, dsn, servers, skip, stop),
                          target_dsn=servers.target_dsn, keep=config.shadow_cache, sandbox=servers.loader) as shadow:
        shadow_dsn = servers.loader.login(shadow.dsn)
        with connect(shadow_dsn) as conn:
            desired = inspect.snapshot(conn, exclude_schemas=(config.metadata_schema,), **managed(config))
        yield shadow_dsn, desired


def drift_of(config: Config, shadow_dsn: str, desired: inspect.SchemaSnapshot,
             target_dsn: str) -> list[inspect.ObjectDifference]:
    excluded = (config.metadata_schema,)
    with connect(target_dsn) as conn:
        settle(conn, config.metadata_schema)  # a dead run's INVALID index is debris, not drift
        live = inspect.snapshot(conn, exclude_schemas=excluded, **managed(config))
    differences = inspect.compare(desired, live)
    if not differences:
        return []
    with connect(shadow_dsn) as conn:  # what differs only as PostgreSQL prints it is no drift
        return list(roundtrip.settle(conn, desired, live, differences).remaining)


def lint_schema(config: Config, environment: str, *, schemas_dir: Path | None = None) -> list[Finding]:
    """Schema rules against the desired schema alone: an embedded shadow, no live database."""
    rules = [r for r in load_policies(config.policies_dir, skip=[config.trust_file])
             if r.kind == "schema" and r.applies_to(environment)]
    source = load_source(schemas_dir or config.schemas_dir)
    with contextlib.ExitStack() as stack:
        bindir = bindir_for_shadow(None)
        cluster = EmbeddedCluster(shadow_cache_dir(bindir_major(bindir)), bindir, durable=False)
        stack.callback(cluster.stop)
        shadow = cluster.start()
        sandbox = prepare_sandbox(shadow, load_limits(config), stand_ins=True)
        with throwaway_database(shadow, "lint") as shadow_dsn:
            sandbox.own(shadow_dsn)
            named = roles_named(source)
            create_roles(shadow_dsn, named)  # an embedded shadow of its own: no roles but its own
            sandbox.join(named)
            load_schema(source, shadow_dsn, sandbox=sandbox, owners=config.manage_owners, progress=_report_progress)
            if not rules:
                return []
            with sandbox.connect(shadow_dsn) as conn:
                catalog = read_catalog(conn, exclude_schemas=(config.metadata_schema,))
    return list(evaluate(rules, environment, (), catalog).findings)
