"""Prove a plan before it touches the target: run its steps on a schema-only copy of live.

The copy is made with pg_dump (a version at least as new as the target) into a scratch database on
the shadow server. After the steps, the copy must equal the desired schema by our catalog snapshot, so
a change migra silently skips is caught here; and where the snapshots still differ as text (definitions
PostgreSQL prints differently, see ``roundtrip``), the diff engine must also have nothing left to emit,
or the next plan would emit it again.

With owners or privileges managed the copy keeps them: the roles live's objects name are created
(NOLOGIN) on a shadow server that is not the target, and the copy's database records the target's
role as the applying one (``reconciler.applying_role``) so owners compare as they would on the target.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql

from . import dsn as dsnlib
from . import inspect, roundtrip, runlock, shadowcache
from .diff.base import DiffEngine
from .errors import ReconcilerError
from .privileged import ChangeOwner, CreateExtension, hand_over, recognise
from .safety import Step
from .safety.backfill import KIND as BACKFILL
from .safety.dual_column import VERIFY_KIND
from .sandbox import Sandbox
from .servers import Server, client_bindir, connect, libpq_env
from .shadow import create_roles, same_cluster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RehearsalResult:
    status: str  # converged, diverged, failed, skipped
    differences: tuple[str, ...] = ()
    failed_step: int | None = None
    error: str | None = None
    server_version: str = ""
    duration_ms: float = 0.0
    # (kind, name, definition) of the copy's objects that equal the desired ones only after a round trip
    # (reconciler.roundtrip): what the target will read back, for the plan's verification; not kept in the file
    equivalent: tuple[tuple[str, str, str], ...] = field(default=(), compare=False)

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    def describe(self) -> str:
        if self.status == "converged":
            return f"converged on PostgreSQL {self.server_version} in {self.duration_ms:.0f} ms"
        if self.status == "failed":
            return f"step {self.failed_step} failed on the rehearsal copy: {self.error}"
        if self.status == "skipped":
            return "not rehearsed"
        shown = ", ".join(self.differences[:10])
        more = f" and {len(self.differences) - 10} more" if len(self.differences) > 10 else ""
        return f"after the steps these still differ from the desired schema: {shown}{more}"


SKIPPED = RehearsalResult(status="skipped")


class LiveMoved(ReconcilerError):
    """Live's schema changed after the plan read it: a copy made now would not be the schema the plan was made for."""


class ApplyUnderWay(ReconcilerError):
    """An apply holds the target's lock: pg_dump would lock every table while it reads, and the apply's cut-overs
    (an exclusive lock each, with a short lock_timeout) would wait behind it and give up."""


def copy_schema(source_dsn: str, target_dsn: str, *, source_major: int, exclude_schemas: Sequence[str],
                owners: bool = False, privileges: bool = False, expected_fingerprint: str | None = None,
                sandbox: Sandbox | None = None) -> None:
    """Schema only; owners and grants only when asked (the shadow server needs the roles they name). ``sandbox``: the
    copy is the load role's (what it does not give to other roles), so the plan's steps, which come from the
    desired schema, run in it as the load role.

    pg_dump reads the snapshot of a transaction held open here, in which live's fingerprint is checked against
    ``expected_fingerprint`` (what the plan read): a copy of a schema that moved meanwhile (an apply under way) is
    refused, so it is never rehearsed on, nor kept under the fingerprint it does not have."""
    bindir = client_bindir(source_major)
    source, source_env = libpq_env(source_dsn)
    target, target_env = libpq_env(target_dsn)
    dump_args = [str(bindir / "pg_dump"), "--schema-only", *([] if owners else ["--no-owner"]),
                 *([] if privileges else ["--no-privileges"]), "--no-security-labels",
                 "--no-publications", "--no-subscriptions", f"--dbname={source}"]
    dump_args += ['--exclude-schema="' + s.replace('"', '""') + '"' for s in exclude_schemas]
    with connect(source_dsn, application_name="reconciler rehearsal") as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        exported = conn.execute("SELECT pg_export_snapshot(), quote_ident(current_user)").fetchone()
        assert exported is not None
        _no_apply_under_way(conn, source_dsn)
        if expected_fingerprint is not None:
            now = inspect.snapshot(conn, exclude_schemas=tuple(exclude_schemas), owners=owners, privileges=privileges)
            if now.fingerprint != expected_fingerprint:
                raise LiveMoved(f"the live schema of {dsnlib.describe(source_dsn)} changed while it was being planned "
                                "(is an apply running on it? `reconciler history` says): plan again")
        dump = subprocess.run([*dump_args, f"--snapshot={exported[0]}"], capture_output=True, text=True, env=source_env,
                              timeout=3600, check=False)
    if dump.returncode != 0:
        raise ReconcilerError(f"pg_dump of {dsnlib.describe(source_dsn)} failed: {dsnlib.redact(dump.stderr.strip())}")
    script = dump.stdout
    if sandbox is not None:  # the applying role's part in live is the load role's in the copy (see _as_restorer)
        script = sandbox.restoring + (_as_loader(script, str(exported[1]), sandbox.role) if owners or privileges
                                      else script)
    restore = subprocess.run(
        [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", f"--dbname={target}"],
        input=script, capture_output=True, text=True,
        env=target_env, timeout=3600, check=False,
    )
    if restore.returncode != 0:
        raise ReconcilerError(
            f"the live schema does not load on the shadow server: {dsnlib.redact(restore.stderr.strip())[:500]} "
            "(a missing extension? point `shadow:` at a server like the target)")
    if sandbox is not None:
        sandbox.adopt(target_dsn)


def _no_apply_under_way(conn: psycopg.Connection[Any], source_dsn: str) -> None:
    """Looked at right before pg_dump starts: an apply that starts after still waits only for the dump (seconds)."""
    holding = runlock.held_on(conn)
    if not holding:
        return
    pids = ", ".join(str(h.pid if isinstance(h, runlock.Session) else h) for h in holding)
    raise ApplyUnderWay(
        f"an apply is under way on {dsnlib.describe(source_dsn)} (the session of pid {pids} holds its apply lock): "
        "copying live for the rehearsal would lock every table while pg_dump reads them, and the apply's cut-overs "
        "would wait behind those locks; plan again when it has ended (`reconciler history` shows the run)")


_ROLE_LINE = r"^((?:ALTER|GRANT|REVOKE) [^\n]* (?:TO|FROM|FOR ROLE) ){role}((?: [^\n]*)?;)$"


def _as_loader(script: str, applying_role: str, loader: str) -> str:
    """pg_dump's ownership, grant and default privilege lines naming the target's applying role (as pg_dump quotes
    it) name the load role instead: the load role runs the steps in the copy, so it is the applying role there, and
    what the applying role owns in live it owns in the copy. pg_dump writes each such statement on a line of its
    own."""
    pattern = re.compile(_ROLE_LINE.format(role=re.escape(applying_role)), re.MULTILINE)
    quoted = sql.Identifier(loader).as_string(None)
    return pattern.sub(lambda m: f"{m.group(1)}{quoted}{m.group(2)}", script)


def _superuser_extensions(desired_dsn: str) -> list[tuple[str, str, str]]:
    """The desired schema's extensions that only a superuser may create, as (name, schema, version), in the order
    they were made."""
    with connect(desired_dsn, application_name="reconciler rehearsal") as conn:
        return [(str(r[0]), str(r[1]), str(r[2])) for r in conn.execute(
            """SELECT e.extname, n.nspname, e.extversion FROM pg_extension e
               JOIN pg_namespace n ON n.oid = e.extnamespace
               JOIN pg_available_extension_versions v ON v.name = e.extname AND v.version = e.extversion
               WHERE v.superuser AND NOT v.trusted ORDER BY e.oid""").fetchall()]


def _execute(conn: psycopg.Connection[object], statement: str) -> None:
    """A step, as the load role: one that hands objects to another role as ``privileged.hand_over`` makes it (the
    target applies it as its own role, which may create where the load role may not)."""
    what = recognise(statement.lstrip())
    if isinstance(what, ChangeOwner) and what.owner != conn.info.user:
        hand_over(conn, what.owner, statement)
    else:
        conn.execute(statement.encode())


def _gives_back(step: Step, *, owners: bool, privileges: bool) -> bool:
    """An owner or grant step where the copy holds none of live's owners or grants (not managed): such a step only
    gives a re-created object back what live had (``supplements.kept``), which the copy never had; apply checks on
    the target that every surviving object keeps its owner and grants."""
    if isinstance(recognise(step.sql.lstrip()), ChangeOwner):
        return not owners
    return step.kind in ("grant", "revoke") and not privileges


def _run_steps(conn: psycopg.Connection[object], steps: Sequence[Step]) -> tuple[int, str] | None:
    """Run the steps phase by phase, as apply does; the first failure as (step index, message)."""
    phases: dict[int, list[Step]] = {}
    for step in steps:
        phases.setdefault(step.phase, []).append(step)
    for phase in sorted(phases):
        group = phases[phase]
        current = group[0]
        try:
            if current.transactional:
                with conn.transaction():
                    for current in group:
                        _execute(conn, current.sql)
            else:
                _execute(conn, current.sql)
        except psycopg.Error as exc:
            return current.index, exc.diag.message_primary or str(exc)
    return None


def rehearse(
    steps: Sequence[Step],
    *,
    target_dsn: str,
    target_major: int,
    shadow: Server,
    desired_dsn: str,
    desired: inspect.SchemaSnapshot,
    engine: DiffEngine,
    exclude_schemas: tuple[str, ...],
    owners: bool = False,
    privileges: bool = False,
    live_fingerprint: str | None = None,
    cache_keep: int = 0,
    copy_key: shadowcache.CacheKey | None = None,
    sandbox: Sandbox,
) -> RehearsalResult:
    """``live_fingerprint`` (live's snapshot as planned) and ``cache_keep`` > 0: the copy of live is kept on the shadow
    server (see ``shadowcache``), so the next plan against the same live schema need not dump and restore it; and a
    plan that can run as one transaction is rehearsed in that kept copy, then rolled back (no copy at all).
    ``copy_key``: the kept copy's key, when the plan has it already (``prepare_live_copy``). The steps come from
    the desired schema: they run, and the copy is read, as the load role (``sandbox``)."""
    started = time.perf_counter()
    steps = [s for s in steps if not _gives_back(s, owners=owners, privileges=privileges)]
    extensions = _superuser_extensions(desired_dsn)
    creates = {w.name for w in (recognise(s.sql.lstrip()) for s in steps) if isinstance(w, CreateExtension)}
    if cache_keep > 0 and live_fingerprint is not None and not (owners or privileges) \
            and not creates & {e[0] for e in extensions}:  # those are made before the steps, in a copy of its own
        quick = _rehearse_in_place(steps, target_dsn=target_dsn, target_major=target_major, shadow=shadow,
                                   desired=desired, exclude_schemas=exclude_schemas,
                                   live_fingerprint=live_fingerprint, cache_keep=cache_keep, copy_key=copy_key,
                                   sandbox=sandbox)
        if quick is not None:
            quick = replace(quick, duration_ms=(time.perf_counter() - started) * 1000)
            log.info("rehearsal %s in %.0f ms (in a rolled-back transaction)", quick.status, quick.duration_ms)
            return quick
    with live_copy(target_dsn, shadow, target_major=target_major, exclude_schemas=exclude_schemas, owners=owners,
                   privileges=privileges, live_fingerprint=live_fingerprint, cache_keep=cache_keep,
                   purpose="rehearsal", sandbox=sandbox) as copy:
        sandbox.provide(copy, [e for e in extensions if e[0] in creates])
        scratch = sandbox.login(copy)
        with connect(scratch, application_name="reconciler rehearsal") as conn:
            version = conn.info.parameter_status("server_version") or ""
            failure = _run_steps(conn, steps)
            elapsed = (time.perf_counter() - started) * 1000
            if failure is not None:
                return RehearsalResult("failed", failed_step=failure[0], error=failure[1], server_version=version,
                                       duration_ms=elapsed)
            after = inspect.snapshot(conn, exclude_schemas=exclude_schemas, owners=owners, privileges=privileges)
        compared = inspect.compare(desired, after)
        with connect(desired_dsn, application_name="reconciler rehearsal") as conn:
            settled = roundtrip.settle(conn, desired, after, compared)
        differences = [str(d) for d in settled.remaining]
        # The engine's own check finds what it would still emit. When the snapshots are equal a plan never asks the
        # engine (make_plan diffs only what differs), so nothing it could say would reach a plan: skipped.
        leftover = engine.diff(scratch, desired_dsn, exclude_schemas=exclude_schemas) if compared else []
        differences += [f"{engine.name} still emits: {' '.join(c.sql.split())[:120]}" for c in leftover]
    elapsed = (time.perf_counter() - started) * 1000
    status = "converged" if not differences else "diverged"
    log.info("rehearsal %s in %.0f ms", status, elapsed)
    return RehearsalResult(status, differences=tuple(differences), server_version=version, duration_ms=elapsed,
                           equivalent=tuple((k, n, d) for (k, n), d in sorted(settled.equivalent.items())))


IN_PLACE_MAX_STEPS = 500  # beyond this one transaction may not fit the shadow server's lock table
_CONCURRENTLY = re.compile(r"\bCONCURRENTLY\b\s*", re.IGNORECASE)


def _in_one_transaction(step: Step) -> str | None:
    """The step as it can run inside a transaction (an index built or dropped without CONCURRENTLY ends the same),
    or None if it cannot (an enum value added is not usable before its transaction commits)."""
    if step.transactional:
        return step.sql
    if step.kind in ("create_index_concurrently", "drop_index_concurrently"):
        return _CONCURRENTLY.sub("", step.sql, count=1)
    if step.kind in (BACKFILL, VERIFY_KIND):  # apply runs them in batches; whole, they end the same
        return step.sql
    return None


def _rehearse_in_place(steps: Sequence[Step], *, target_dsn: str, target_major: int, shadow: Server,
                       desired: inspect.SchemaSnapshot, exclude_schemas: tuple[str, ...], live_fingerprint: str,
                       cache_keep: int, sandbox: Sandbox,
                       copy_key: shadowcache.CacheKey | None = None) -> RehearsalResult | None:
    """The steps in the kept copy of live, in one transaction rolled back afterwards. Only a clean result counts
    (every step ran and the snapshot equals the desired one); anything else returns None and the rehearsal runs
    again on a copy of its own, phase by phase as apply runs them, to say what went wrong."""
    statements = [_in_one_transaction(step) for step in steps]
    if len(steps) > IN_PLACE_MAX_STEPS or any(s is None for s in statements):
        return None
    kept_copy = _kept_copy(target_dsn=target_dsn, target_major=target_major, shadow=shadow,
                           exclude_schemas=exclude_schemas, live_fingerprint=live_fingerprint, cache_keep=cache_keep,
                           key=copy_key, sandbox=sandbox)
    if kept_copy is None:
        return None
    with kept_copy as kept, sandbox.connect(kept, application_name="reconciler rehearsal") as conn:
        version = conn.info.parameter_status("server_version") or ""
        try:
            with conn.transaction(force_rollback=True):
                conn.execute("SET TRANSACTION READ WRITE")  # a kept database is read-only by default
                conn.execute("SET LOCAL lock_timeout = '5s'")  # another plan rehearsing in it: do not queue behind it
                for statement in statements:
                    assert statement is not None
                    _execute(conn, statement)
                after = inspect.snapshot(conn, exclude_schemas=exclude_schemas)
        except psycopg.Error as exc:
            log.info("rehearsal in place did not finish (%s); rehearsing on a copy of live",
                     exc.diag.message_primary or exc)
            return None
    if after.objects != desired.objects:
        return None
    return RehearsalResult("converged", server_version=version)


def _kept_copy(*, target_dsn: str, target_major: int, shadow: Server, exclude_schemas: tuple[str, ...],
               live_fingerprint: str, cache_keep: int, sandbox: Sandbox, missing: bool = False,
               key: shadowcache.CacheKey | None = None) -> contextlib.AbstractContextManager[str] | None:
    """The kept schema-only copy of live, read in place (made and kept first when there is none); None when the
    shadow server keeps none (or, ``missing``, when it is there already). ``key``: its key, when known."""
    try:
        key = key or shadowcache.live_copy_key(shadow, target_dsn, live_fingerprint, exclude_schemas)
        if key is not None and missing and shadowcache.is_kept(shadow, key):
            return None
    except Exception as exc:  # the cache is an optimisation: whatever fails, rehearse on a copy
        log.warning("shadow cache: %s; rehearsing on a copy of live", exc)
        return None
    if key is None:
        return None

    def build(scratch: str) -> None:
        copy_schema(target_dsn, scratch, source_major=target_major, exclude_schemas=exclude_schemas,
                    expected_fingerprint=live_fingerprint, sandbox=sandbox)

    return shadowcache.cached_database(shadow, key, build, keep=cache_keep, purpose="rehearsal", shared=True,
                                       what=f"the copy of live ({live_fingerprint})")


def prepare_live_copy(*, target_dsn: str, target_major: int, shadow: Server, exclude_schemas: tuple[str, ...],
                      live_fingerprint: str, cache_keep: int, sandbox: Sandbox) -> shadowcache.CacheKey | None:
    """Make the kept copy of live now if there is none (pg_dump and its restore run while the plan diffs), so the
    rehearsal finds it; returns its key for the rehearsal (None: no kept copy). Whatever fails is logged, and the
    rehearsal makes its copy as it would have."""
    if cache_keep <= 0:
        return None
    try:
        key = shadowcache.live_copy_key(shadow, target_dsn, live_fingerprint, exclude_schemas)
        kept_copy = _kept_copy(target_dsn=target_dsn, target_major=target_major, shadow=shadow,
                               exclude_schemas=exclude_schemas, live_fingerprint=live_fingerprint,
                               cache_keep=cache_keep, missing=True, key=key, sandbox=sandbox)
        if kept_copy is not None:
            with kept_copy:
                pass
        return key
    except ApplyUnderWay:
        raise  # the rehearsal would refuse for the same reason: said once, by the plan
    except Exception as exc:
        log.warning("could not copy live ahead of the rehearsal: %s", exc)
        return None


def live_copy(target_dsn: str, shadow: Server, *, target_major: int, exclude_schemas: tuple[str, ...], owners: bool,
              privileges: bool, live_fingerprint: str | None, cache_keep: int, purpose: str,
              sandbox: Sandbox) -> contextlib.AbstractContextManager[str]:
    """A schema-only copy of live on the shadow server, for the caller to change, dropped afterwards: the load
    role's, which may act as the roles owning what it does not own (those that can do nothing more than it). Cached
    as a template when asked and possible: not with owners or privileges (the roles and the database setting they
    need are made per copy)."""
    def build(scratch: str) -> None:
        roles: tuple[str, set[str]] | None = None
        if owners or privileges:
            roles = _prepare_roles(target_dsn, shadow)
        copy_schema(target_dsn, scratch, source_major=target_major, exclude_schemas=exclude_schemas,
                    owners=owners, privileges=privileges, expected_fingerprint=live_fingerprint, sandbox=sandbox)
        if roles is not None:
            _name_applying_role(scratch, roles[0])
            sandbox.join(roles[1])

    key = None
    if cache_keep > 0 and live_fingerprint is not None and not (owners or privileges):
        try:
            key = shadowcache.live_copy_key(shadow, target_dsn, live_fingerprint, exclude_schemas)
        except Exception as exc:  # the cache is an optimisation: whatever fails, copy as without it
            log.warning("shadow cache: %s; copying live's schema instead", exc)
    return _owned(shadowcache.cached_database(shadow, key, build, keep=cache_keep, purpose=purpose, modifies=True,
                                              what=f"the copy of live ({live_fingerprint})"), sandbox)


@contextlib.contextmanager
def _owned(copy: contextlib.AbstractContextManager[str], sandbox: Sandbox) -> Iterator[str]:
    """A copy of a kept copy is the configured role's database (``CREATE DATABASE ... TEMPLATE``): the load role,
    which owns what is in it, owns it too (in 15 and later, its ``public`` schema is the database owner's)."""
    with copy as dsn:
        sandbox.own(dsn)
        yield dsn


def _name_applying_role(copy_dsn: str, applying_role: str) -> None:
    """The copy's database names the target's role as the applying one (``reconciler.applying_role``)."""
    with connect(copy_dsn, application_name="reconciler rehearsal") as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(conn.info.dbname), sql.Identifier(*inspect.APPLYING_ROLE_SETTING.split(".")),
            sql.Literal(applying_role)))


def _prepare_roles(target_dsn: str, shadow: Server) -> tuple[str, set[str]]:
    """Before a copy of live that keeps owners or grants: the target's applying role, and the roles live's objects
    name; on a shadow server of its own, those are created (NOLOGIN) so the copy keeps its owners and grants."""
    with connect(target_dsn, application_name="reconciler rehearsal") as conn:
        row = conn.execute("SELECT current_user::text").fetchone()
        assert row is not None
        named = {r[0] for r in conn.execute(
            """SELECT DISTINCT a.rolname FROM pg_shdepend d JOIN pg_roles a ON a.oid = d.refobjid
               WHERE d.refclassid = 'pg_authid'::regclass
                 AND d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())""").fetchall()}
        if same_cluster(target_dsn, shadow.dsn):
            return str(row[0]), named
        roles = {r[0] for r in conn.execute(
            """SELECT a.rolname FROM pg_shdepend d JOIN pg_roles a ON a.oid = d.refobjid
               WHERE d.refclassid = 'pg_authid'::regclass
                 AND d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())""").fetchall()}
        security = inspect.security(conn)
    roles |= {o.owner for o in security.objects.values() if o.owner and o.owner != inspect.APPLYING_ROLE}
    roles |= {str(row[0])}
    create_roles(shadow.dsn, {r for r in roles if not r.startswith("pg_")})
    return str(row[0]), roles | named
