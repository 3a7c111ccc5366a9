"""The JSON Schemas bundled in reconciler/formats/ are valid against their metaschemas.

The tool trusts its own schemas at run time (checking them cost tens of milliseconds on every command), so
this is where a broken one is caught.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

import jsonschema
import pytest

FORMATS = resources.files("reconciler.formats")
SCHEMAS = sorted(f.name for f in FORMATS.iterdir() if f.name.endswith(".schema.json"))


def _load(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(FORMATS.joinpath(name).read_text())
    return schema


def _check(schema: dict[str, Any]) -> None:
    """What the tool used to do on every load: the metaschema named by $schema, with its "regex" format check."""
    cls = jsonschema.validators.validator_for(schema, default=None)  # type: ignore[arg-type]
    assert cls is not None, f"unknown $schema {schema.get('$schema')!r}"
    cls.check_schema(schema)


def test_the_schemas_the_tool_loads_are_all_here() -> None:
    assert {"config.schema.json", "plan.schema.json", "policy.schema.json", "trust.schema.json"} <= set(SCHEMAS)


@pytest.mark.parametrize("name", SCHEMAS)
def test_bundled_schema_is_valid(name: str) -> None:
    _check(_load(name))


@pytest.mark.parametrize("name", SCHEMAS)
def test_a_broken_schema_fails_the_check(name: str) -> None:
    """The check above has teeth: a wrong keyword value, a bad regex or an unknown $schema each fail it."""
    wrong_type = copy.deepcopy(_load(name))
    wrong_type["type"] = "objekt"
    with pytest.raises(jsonschema.SchemaError):
        _check(wrong_type)
    bad_pattern = copy.deepcopy(_load(name))
    bad_pattern.setdefault("properties", {})["extra"] = {"type": "string", "pattern": "(["}
    with pytest.raises(jsonschema.SchemaError, match="regex"):
        _check(bad_pattern)
    unknown = copy.deepcopy(_load(name))
    unknown["$schema"] = "https://example.invalid/no-such-draft"
    with pytest.raises(AssertionError, match="unknown"):
        _check(unknown)
