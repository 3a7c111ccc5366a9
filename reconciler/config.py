"""``reconciler.yaml``: folders, the metadata schema and the environments, validated by a JSON Schema.

Environment variables in ``${NAME}`` form are interpolated only when an environment is used, so
a missing production secret does not stop a developer planning against ``local``; ``${NAME:-default}`` gives the
default when NAME is unset or empty (one config for CI's shadow service and a laptop's embedded shadow).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_FILE = "reconciler.yaml"
LOCAL = "local"
ADHOC = "adhoc"
EMBEDDED = "embedded"
# Environment variables the tool reads, here (a light module) so the command line's help can name them cheaply.
DATABASE_URL_ENV = "RECONCILER_DATABASE_URL"
PASSPHRASE_ENV = "RECONCILER_KEY_PASSPHRASE"
PLANNER_KEY_ENV = "RECONCILER_PLANNER_KEY"
# Where `watch` serves /healthz and /metrics unless told otherwise, here for the same reason.
WATCH_HOST = "127.0.0.1"
WATCH_PORT = 9187
# Where the docs have a reviewer keep the key `keygen` makes (its own file: never ssh's id_ed25519, which keygen would
# replace); the approve command printed under a plan names it, so it can be run as shown.
APPROVER_KEY_PATH = "~/.ssh/reconciler_ed25519"
DEFAULT_SHADOW_CACHE = 3
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^([0-9]+)(ms|s|min|h|d)?$")


@dataclass(frozen=True)
class BackfillSettings:
    """How a backfill goes easy on production: each batch sized to take ``batch``; paused while a streaming replica
    replays more than ``max_replica_lag`` (or ``max_replica_bytes``) behind, while more than ``max_lock_waiters``
    sessions wait for a lock on the table, or while a transaction of the database has been open longer than
    ``max_transaction_age`` (the rows the fill replaces cannot be vacuumed meanwhile)."""

    batch: str = "200ms"
    max_replica_lag: str = "30s"
    max_replica_bytes: str = "256MB"
    max_lock_waiters: int = 2
    max_transaction_age: str = "1h"
    workers: int = 2  # batches run side by side (a session each), so a fill is not held to one core


@dataclass(frozen=True)
class Environment:
    name: str
    database: str  # 'embedded' or a DSN, possibly with ${VARS}; empty for a fleet
    shadow: str = EMBEDDED
    approvals: int = 0
    auto_apply: bool = False
    lock_timeout: str = "5s"
    statement_timeout: str = "15min"
    lock_wait: str = "60s"
    backfill: BackfillSettings = field(default_factory=lambda: BackfillSettings())  # apply/backfill.py
    approval_groups: tuple[str, ...] = ()
    lock_retries: int = 3
    verify_before_commit: bool = True
    rehearse: bool = True
    backup: str = "full"
    auto_rollback: bool = True
    allow_unrehearsed: bool = False
    allow_version_mismatch: bool = False
    allow_mass_drops: bool = False  # plans may drop every table of a schema, or most tables (see massdrops)
    timeouts: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    require_signed_plans: bool = True
    plan_ttl: str = "7d"
    databases: tuple[str, ...] = ()  # a fleet, with ${VARS}
    databases_file: Path | None = None  # a fleet: one DSN per line
    concurrency: int = 4

    @property
    def is_fleet(self) -> bool:
        return bool(self.databases) or self.databases_file is not None

    def fleet_dsns(self) -> list[str]:
        """Every database of a fleet, in order, duplicates removed."""
        dsns = [interpolate(d, f"environments.{self.name}.databases") for d in self.databases]
        if self.databases_file is not None:
            try:
                lines = self.databases_file.read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"environments.{self.name}.databases_file: cannot read {self.databases_file}: "
                                  f"{exc.strerror}") from None
            for number, line in enumerate(lines, 1):
                text = line.strip()
                if text and not text.startswith("#"):
                    dsns.append(interpolate(text, f"{self.databases_file}:{number}"))
        return list(dict.fromkeys(dsns))

    @property
    def lock_wait_seconds(self) -> float:
        return duration_seconds(self.lock_wait)

    @property
    def plan_ttl_seconds(self) -> float:
        return duration_seconds(self.plan_ttl)

    def database_dsn(self) -> str:
        if not self.database:
            raise ConfigError(f"environment {self.name!r} is a fleet of databases: this command takes one database "
                              "(--database DSN), or use plan/apply, which handle fleets")
        return interpolate(self.database, f"environments.{self.name}.database")

    def shadow_dsn(self) -> str:
        return interpolate(self.shadow, f"environments.{self.name}.shadow")


@dataclass(frozen=True)
class SafetyOptions:
    concurrent_indexes: bool = True
    concurrent_index_drops: bool = True
    not_valid_constraints: bool = True
    safe_not_null: bool = True
    enum_add_value: bool = True
    data_checks: bool = True
    squawk: bool = True
    squawk_exclude: tuple[str, ...] = ()
    online_rewrites: bool = True  # a column rewrite on a big table as a dual column (safety/dual_column.py)
    online_rewrite_rows: int = 1_000_000  # from this many rows (live's estimate): smaller tables take the plain ALTER


@dataclass(frozen=True)
class LoadOptions:
    """How desired SQL is loaded (``load:``): the longest a statement may run, the temporary file space a session may
    use, and the untrusted extensions the tool creates for the schema."""

    statement_timeout: float = 60.0  # seconds
    temp_file_limit: str = "1GB"
    extensions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    root: Path
    path: Path | None  # None when running without a reconciler.yaml
    schemas_dir: Path
    policies_dir: Path
    plans_dir: Path
    metadata_schema: str
    trust_file: Path
    environments: Mapping[str, Environment]
    backups_dir: Path = Path(".reconciler/backups")
    safety: SafetyOptions = field(default_factory=SafetyOptions)
    manage_privileges: bool = False
    manage_owners: bool = False
    shadow_cache: int = DEFAULT_SHADOW_CACHE  # loaded desired schemas kept as templates per shadow server (0: none)
    load: LoadOptions = field(default_factory=LoadOptions)

    @property
    def local_dir(self) -> Path:
        """Where the ``local`` environment's embedded cluster lives."""
        return self.root / ".reconciler"

    def environment(self, name: str | None, database_override: str | None = None) -> Environment:
        """The environment to use; ``--database`` or RECONCILER_DATABASE_URL replaces its database."""
        override = database_override or os.environ.get(DATABASE_URL_ENV) or None
        if name is None:
            if override is None:
                return self.environments[LOCAL]
            return Environment(name=ADHOC, database=override, auto_apply=True)
        if name not in self.environments:
            known = ", ".join(sorted(self.environments))
            where = self.path or CONFIG_FILE
            raise ConfigError(f"unknown environment {name!r} (in {where}: {known})")
        env = self.environments[name]
        if override is not None:
            env = Environment(**{**env.__dict__, "database": override, "databases": (), "databases_file": None})
        return env


_SIZE = re.compile(r"^([0-9]+)(B|kB|MB|GB|TB)?$")


def size_bytes(text: str) -> int:
    """'256MB' -> bytes (PostgreSQL's units: kB is 1024 bytes)."""
    match = _SIZE.match(str(text).strip())
    if match is None:
        raise ConfigError(f"invalid size {text!r}: use a number with an optional unit (B, kB, MB, GB, TB), e.g. 256MB")
    return int(match.group(1)) * {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4, None: 1}[match.group(2)]


def duration_seconds(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise ConfigError(f"invalid duration {text!r}: use a number with ms, s, min, h or d")
    value = int(match.group(1))
    return value * {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}[match.group(2)]


def interpolate(value: str, field: str) -> str:
    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if default is not None and not os.environ.get(name):
            return default
        if name not in os.environ:
            raise ConfigError(f"{field} uses ${{{name}}} but the environment variable {name} is not set")
        return os.environ[name]

    return _VAR.sub(repl, value)


def find_config(start: Path) -> Path | None:
    """reconciler.yaml in ``start`` or the nearest parent, like git finds its repository."""
    for folder in [start, *start.parents]:
        candidate = folder / CONFIG_FILE
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path | None = None, *, cwd: Path | None = None) -> Config:
    from .yamlfile import load_validated  # jsonschema and yaml: not needed by `--version` or `--help`

    cwd = (cwd or Path.cwd()).resolve()
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    path = path.resolve() if path is not None else find_config(cwd)
    data: dict[str, Any] = load_validated(path, "config.schema.json") if path is not None else {}
    root = path.parent if path is not None else cwd
    environments: dict[str, Environment] = {
        LOCAL: Environment(name=LOCAL, database=EMBEDDED, auto_apply=True, require_signed_plans=False, backup="none"),
    }
    for name, raw in (data.get("environments") or {}).items():
        fields = dict(raw)
        fields.setdefault("require_signed_plans", name != LOCAL)
        fields.setdefault("backup", "none" if name == LOCAL else "full")
        fields["approval_groups"] = tuple(fields.get("approval_groups") or ())
        if "database" in fields and ("databases" in fields or "databases_file" in fields):
            raise ConfigError(f"{path}: environments.{name}: give database (one) or databases/databases_file (a fleet), "
                              "not both")
        fields.setdefault("database", "")
        fields["databases"] = tuple(fields.get("databases") or ())
        if "databases_file" in fields:
            fields["databases_file"] = root / fields["databases_file"]
        if "backfill" in fields:
            fields["backfill"] = BackfillSettings(**fields["backfill"])
        for limits in (fields.get("timeouts") or {}).values():
            for value in limits.values():
                duration_seconds(value)
        environments[name] = Environment(name=name, **fields)
    for env in environments.values():
        for name in ("lock_timeout", "statement_timeout", "lock_wait", "plan_ttl"):
            duration_seconds(getattr(env, name))
        for name in ("batch", "max_replica_lag", "max_transaction_age"):
            duration_seconds(getattr(env.backfill, name))
        size_bytes(env.backfill.max_replica_bytes)
    policies_dir = root / data.get("policies", "policies")
    return Config(
        root=root,
        path=path,
        schemas_dir=root / data.get("schemas", "schemas"),
        policies_dir=policies_dir,
        trust_file=root / data["trust"] if "trust" in data else policies_dir / "trust.yaml",
        backups_dir=root / data.get("backups", ".reconciler/backups"),
        safety=SafetyOptions(**{**data.get("safety", {}),
                                "squawk_exclude": tuple(data.get("safety", {}).get("squawk_exclude", ()))}),
        plans_dir=root / data.get("plans", "plans"),
        metadata_schema=data.get("metadata_schema", "reconciler"),
        environments=environments,
        manage_privileges=bool(data.get("manage_privileges", False)),
        manage_owners=bool(data.get("manage_owners", False)),
        shadow_cache=int(data.get("shadow_cache", DEFAULT_SHADOW_CACHE)),
        load=_load_options(data.get("load") or {}),
    )


def _load_options(data: dict[str, Any]) -> LoadOptions:
    return LoadOptions(
        statement_timeout=duration_seconds(data.get("statement_timeout", "60s")),
        temp_file_limit=data.get("temp_file_limit", "1GB"),
        extensions=tuple(data.get("extensions") or ()),
    )
