"""Reading config files with errors that say which file and how to fix it (one place for all), and
the one hard-link-or-copy used where a file is placed beside another."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bagel_core.config.errors import ConfigError


def _read(
    path: str | Path,
    what: str,
    create_hint: str,
    kind: str,
    parse: Callable[[str], Any],
    errors: tuple[type[Exception], ...],
) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {create_hint}")
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (*errors, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid {kind}: {exc}") from exc


def read_yaml(path: str | Path, what: str, create_hint: str) -> Any:
    """Parse a YAML file (PyYAML = YAML 1.1, as upstream) or raise a :class:`ConfigError` naming it."""
    return _read(path, what, create_hint, "YAML", yaml.safe_load, (yaml.YAMLError,))


def read_json(path: str | Path, what: str, create_hint: str) -> Any:
    """Parse a JSON file or raise a :class:`ConfigError` naming it."""
    return _read(path, what, create_hint, "JSON", json.loads, (json.JSONDecodeError,))


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard link ``src`` to ``dst`` (no extra space; safe because our writers replace files and never
    modify them in place), else a copy (another filesystem, or links not supported)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
