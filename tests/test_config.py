"""reconciler.config: reconciler.yaml, environments, interpolation, durations."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.config import ADHOC, DATABASE_URL_ENV, EMBEDDED, LOCAL, duration_seconds, load_config
from reconciler.errors import ConfigError

VALID = """\
schemas: db/schemas
metadata_schema: recon_meta
environments:
  staging:
    database: postgresql://app@staging.example/app
    approvals: 1
  prod:
    database: "host=${PROD_HOST} dbname=app user=app password=${PROD_PASSWORD}"
    shadow: postgresql://shadow.example/postgres
    approvals: 2
    auto_apply: false
    lock_timeout: 2s
    statement_timeout: 30min
    lock_wait: 1h
"""


@pytest.fixture(autouse=True)
def no_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "reconciler.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(cwd=tmp_path)
    assert config.path is None
    assert config.root == tmp_path.resolve()
    assert config.schemas_dir == tmp_path.resolve() / "schemas"
    assert config.metadata_schema == "reconciler"
    assert list(config.environments) == [LOCAL]
    local = config.environments[LOCAL]
    assert local.database == EMBEDDED
    assert local.auto_apply is True
    assert config.environment(None) == local


def test_valid_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, VALID)
    sub = tmp_path / "deep" / "er"
    sub.mkdir(parents=True)
    config = load_config(cwd=sub)  # found in a parent folder, like git
    assert config.path == path.resolve()
    assert config.schemas_dir == tmp_path.resolve() / "db" / "schemas"
    assert config.metadata_schema == "recon_meta"
    assert set(config.environments) == {LOCAL, "staging", "prod"}
    prod = config.environment("prod")
    assert (prod.approvals, prod.auto_apply, prod.lock_timeout) == (2, False, "2s")
    assert prod.shadow == "postgresql://shadow.example/postgres"
    assert prod.lock_wait_seconds == 3600.0
    staging = config.environment("staging")
    assert (staging.approvals, staging.auto_apply, staging.shadow) == (1, False, EMBEDDED)


def test_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(config_file(tmp_path, VALID))
    monkeypatch.setenv("PROD_HOST", "db.internal")
    monkeypatch.setenv("PROD_PASSWORD", "s3cret")
    assert config.environment("prod").database_dsn() == "host=db.internal dbname=app user=app password=s3cret"


def test_interpolation_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """${NAME:-default}: the default when NAME is unset or empty (CI sets the shadow service, a laptop does not)."""
    text = "environments:\n  staging:\n    database: ${DB}\n    shadow: ${SHADOW_URL:-embedded}\n"
    config = load_config(config_file(tmp_path, text))
    monkeypatch.setenv("DB", "postgresql://db/app")
    monkeypatch.delenv("SHADOW_URL", raising=False)
    assert config.environment("staging").shadow_dsn() == EMBEDDED
    monkeypatch.setenv("SHADOW_URL", "")
    assert config.environment("staging").shadow_dsn() == EMBEDDED
    monkeypatch.setenv("SHADOW_URL", "postgresql://postgres@localhost:5432/postgres")
    assert config.environment("staging").shadow_dsn() == "postgresql://postgres@localhost:5432/postgres"


def test_missing_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROD_HOST", "db.internal")
    monkeypatch.delenv("PROD_PASSWORD", raising=False)
    config = load_config(config_file(tmp_path, VALID))  # loading alone does not need the secret
    with pytest.raises(ConfigError, match=r"environments\.prod\.database.*PROD_PASSWORD"):
        config.environment("prod").database_dsn()


def test_schema_violation_points_at_line_and_field(tmp_path: Path) -> None:
    text = "environments:\n  prod:\n    database: postgresql://x/y\n    approvals: two\n"
    config_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path)
    message = str(info.value)
    assert "reconciler.yaml:4:16:" in message
    assert "environments.prod.approvals" in message
    assert "'two'" in message


def test_unknown_key_refused(tmp_path: Path) -> None:
    config_file(tmp_path, "schemas: s\nschemaz: typo\n")
    with pytest.raises(ConfigError, match=r"reconciler\.yaml:2:1: schemaz: unknown key 'schemaz' \(did you mean 'schemas'\?\)"):
        load_config(cwd=tmp_path)
    config_file(tmp_path, "environments:\n  prod:\n    database: x\n    aprovals: 2\n")
    with pytest.raises(ConfigError, match=r"reconciler\.yaml:4:5: environments\.prod\.aprovals: unknown key 'aprovals' "
                                          r"\(did you mean 'approvals'\?\)"):
        load_config(cwd=tmp_path)


def test_invalid_yaml_gives_line(tmp_path: Path) -> None:
    config_file(tmp_path, "schemas: s\nenvironments:\n  prod: [unclosed\n")
    with pytest.raises(ConfigError, match=r"reconciler\.yaml:\d+:\d+: invalid YAML"):
        load_config(cwd=tmp_path)
    config_file(tmp_path, "schemas: s\n  bad: indent\n")
    with pytest.raises(ConfigError, match=r"reconciler\.yaml:2:\d+: invalid YAML"):
        load_config(cwd=tmp_path)


def test_adhoc_environment_from_override(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, VALID))
    adhoc = config.environment(None, "postgresql://u@h/db")
    assert (adhoc.name, adhoc.database, adhoc.auto_apply) == (ADHOC, "postgresql://u@h/db", True)
    prod = config.environment("prod", "postgresql://u@h/other")
    assert (prod.name, prod.database, prod.approvals) == ("prod", "postgresql://u@h/other", 2)


def test_database_url_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(cwd=tmp_path)
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://env@h/db")
    env = config.environment(None)
    assert (env.name, env.database) == (ADHOC, "postgresql://env@h/db")
    assert config.environment(None, "postgresql://flag@h/db").database == "postgresql://flag@h/db"


def test_unknown_environment_lists_known(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, VALID))
    with pytest.raises(ConfigError, match=r"unknown environment 'qa'.*local, prod, staging"):
        config.environment("qa")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("15min", 900.0), ("2h", 7200.0), ("7", 7.0), (" 3s ", 3.0)],
)
def test_duration_seconds(text: str, seconds: float) -> None:
    assert duration_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5 s", "1.5s", "-1s", "10w", "s"])
def test_invalid_duration(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        duration_seconds(text)


def test_invalid_duration_in_file(tmp_path: Path) -> None:
    config_file(tmp_path, "environments:\n  prod:\n    database: x\n    lock_timeout: 5 seconds\n")
    with pytest.raises(ConfigError, match=r"reconciler\.yaml:4:19: environments\.prod\.lock_timeout"):
        load_config(cwd=tmp_path)
