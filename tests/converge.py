"""Plan, rehearse, apply and verify one schema change on a real server: old SQL loaded as the live
database, new SQL as the desired schema. Shared by the convergence suite and the supplement tests."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

from reconciler.apply import ApplyOptions, ApplyResult, apply_plan
from reconciler.config import load_config
from reconciler.pipeline import drift, make_plan, open_servers
from reconciler.plan import Plan
from reconciler.servers import Server
from reconciler.shadow import load_schema
from reconciler.source import load_source


def load_live(tmp_path: Path, database: str, old_sql: str) -> None:
    old = tmp_path / "old"
    old.mkdir(parents=True)
    (old / "old.sql").write_text(old_sql)
    load_schema(load_source(old), database, sandbox=None)  # live: trusted


def write_project(tmp_path: Path, database: str, server: Server, new_sql: str, extra_config: str = "",
                  safety: Mapping[str, bool] | None = None, *, environment_extra: str = "") -> Path:
    """A project planning ``new_sql`` against ``database``. ``extra_config``: top-level YAML added at the end;
    ``safety``: switches of the `safety:` section; ``environment_extra``: lines of the test environment's."""
    (tmp_path / "schemas").mkdir(parents=True, exist_ok=True)
    (tmp_path / "schemas" / "new.sql").write_text(new_sql)
    (tmp_path / "policies").mkdir(exist_ok=True)
    config = tmp_path / "reconciler.yaml"
    config.write_text(textwrap.dedent(f"""\
        environments:
          test:
            database: "{database}"
            shadow: "{server.dsn}"
            require_signed_plans: false
            backup: none
            lock_timeout: 10s
            allow_mass_drops: true  # the cases drop whole schemas' tables on purpose
        load:
          extensions: [amcheck, pgstattuple, earthdistance, pg_partman, postgis]  # the corpus's untrusted ones
        safety:
          squawk: false
        """).replace("\nload:", f"\n{environment_extra}load:", 1)
        + "".join(f"  {k}: {str(v).lower()}\n" for k, v in (safety or {}).items()) + extra_config)
    return config


def plan_change(config_path: Path) -> Plan:
    config = load_config(config_path)
    env = config.environment("test")
    with open_servers(config, env) as servers:
        return make_plan(config, env, servers).plan


def apply_and_verify(config_path: Path, plan: Plan, database: str) -> ApplyResult:
    """Apply, then check with a fresh comparison that live equals desired."""
    result = apply_plan(plan, database, ApplyOptions(environment="test", metadata_schema="reconciler"))
    config = load_config(config_path)
    with open_servers(config, config.environment("test")) as servers:
        remaining = drift(config, servers)
    assert remaining == [], f"still differs after apply: {remaining}"
    return result


def converge(tmp_path: Path, database: str, server: Server, old_sql: str, new_sql: str, *,
             replan: bool = False) -> Plan:
    """The plan that took ``old_sql`` to ``new_sql`` (asserted converged; with ``replan``, a plan made
    after it must have no steps)."""
    load_live(tmp_path, database, old_sql)
    config = write_project(tmp_path, database, server, new_sql)
    plan = plan_change(config)
    result = apply_and_verify(config, plan, database)
    assert result.status in ("applied", "nothing")
    if replan:
        again = plan_change(config).body.steps
        assert not again, f"a plan after the apply still has steps: {[s.sql for s in again[:5]]}"
    return plan
