"""Config validation against workflow/schemas/config.schema.yaml, with one-line errors."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


def _location(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate_config(config: dict, schema_path: Path = SCHEMA_PATH) -> None:
    """Raise ConfigError naming the first offending key and what is allowed there."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        raise ConfigError(f"{_location(error)}: {error.message}")
    patterns = [(f"layers.{key}", p) for key in ("include", "exclude") for p in config["layers"][key]]
    patterns += [(f"tie_groups.{i}", p) for i, group in enumerate(config["tie_groups"]) for p in group]
    for where, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}: bad regular expression {pattern!r}: {exc}") from None


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
