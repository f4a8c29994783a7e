"""Reading config files with errors that say which file and how to fix it (one place for all)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bagel_core.config.errors import ConfigError


def read_yaml(path: str | Path, what: str, create_hint: str) -> Any:
    """Parse a YAML file (PyYAML = YAML 1.1, as upstream) or raise a :class:`ConfigError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {create_hint}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def read_json(path: str | Path, what: str, create_hint: str) -> Any:
    """Parse a JSON file or raise a :class:`ConfigError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {create_hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
