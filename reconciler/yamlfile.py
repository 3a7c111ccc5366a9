"""YAML files checked by a JSON Schema, with errors that point at file:line:column."""

from __future__ import annotations

import difflib
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError


@cache
def schema_validator(name: str) -> jsonschema.protocols.Validator:
    """Our bundled schemas are not re-checked against their metaschema here (tens of ms on every run):
    tests/test_formats.py checks each one once."""
    schema = json.loads(resources.files("reconciler.formats").joinpath(name).read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # "regex" is checked with re.compile


def _node_at(node: yaml.Node | None, path: list[str | int]) -> yaml.Node | None:
    """The deepest YAML node along a JSON path, for its position."""
    for part in path:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    node = value
                    break
            else:
                return node
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def load_validated(path: Path, schema_name: str) -> Any:
    """Parse and validate; the first error names the file, line, column and the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem}") from None
    if data is None:
        data = {}
    err = jsonschema.exceptions.best_match(schema_validator(schema_name).iter_errors(data))
    if err is not None:
        at: list[str | int] = list(err.absolute_path)
        node, message = _node_at(root, at), _message(err)
        unknown = _unknown_key(err, node)
        if unknown is not None:  # at the key itself, not the mapping holding it (line 1 for a top-level typo)
            node, message = unknown[0], unknown[1]
            at.append(str(node.value))
        where = f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}" if node is not None else str(path)
        field = ".".join(str(p) for p in at) or "(top level)"
        raise ConfigError(f"{where}: {field}: {message}")
    return data


def _unknown_key(err: jsonschema.ValidationError, node: yaml.Node | None) -> tuple[yaml.Node, str] | None:
    """For a key the schema does not allow: its own node, and the message naming the key most like it."""
    allowed = err.schema.get("properties") if isinstance(err.schema, dict) else None
    if err.validator != "additionalProperties" or not isinstance(node, yaml.MappingNode) or not isinstance(allowed, dict):
        return None
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value not in allowed:
            close = difflib.get_close_matches(key.value, list(allowed), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(allowed)
            return key, f"unknown key {key.value!r} ({hint})"
    return None


def _message(err: jsonschema.ValidationError) -> str:
    """jsonschema's words, except for "exactly one of these keys", which it says badly."""
    options = err.validator_value if err.validator == "oneOf" else None
    if isinstance(options, list) and all(isinstance(o, dict) and list(o) == ["required"] for o in options):
        keys = [o["required"][0] for o in options]
        present = [k for k in keys if isinstance(err.instance, dict) and k in err.instance]
        said = f"has {', '.join(present)}" if present else "has none"
        return f"needs exactly one of {', '.join(keys)} ({said})"
    return err.message
