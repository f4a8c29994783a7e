"""Dataset registry: upstream's ``DATASET_INFO`` as a YAML file we can validate before anything runs.

The on-disk shape is exactly upstream's two-level mapping, so an upstream ``dataset_info.py`` can be
imported unchanged (its ``DATASET_INFO`` literal is parsed, never executed)::

    t2i_pretrain:
      t2i:
        data_dir: /data/bagel_example/t2i
        num_files: 10
        num_total_samples: 1000
    unified_edit:
      seedxedit_multi:
        data_dir: ...
        parquet_info_path: .../seedxedit_multi_nas.json
    vlm_sft:
      llava_ov:
        data_dir: .../vlm/images
        jsonl_path: .../llava_ov_si.jsonl

Relative paths are resolved against the registry file's directory (one place: ``resolve_path``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bagel_core.config.errors import ConfigError
from bagel_core.config.files import read_yaml

PLACEHOLDER = "your_data_path"

#: Upstream group key -> our short task name. Group order is upstream's registry order.
GROUP_TASKS: dict[str, str] = {
    "t2i_pretrain": "t2i",
    "unified_edit": "edit",
    "vlm_sft": "vlm",
}

ENTRY_KEYS = ("data_dir", "num_files", "num_total_samples", "parquet_info_path", "jsonl_path", "json_dir")
_PATH_KEYS = ("data_dir", "parquet_info_path", "jsonl_path", "json_dir")


def resolve_path(value: str | Path, base_dir: Path | None) -> Path:
    """The one rule for turning a path written in a config file into a real path.

    ``~`` is expanded; a relative path is taken relative to the directory of the file that holds it
    (not the process's cwd, which differs between the CLI, Dagster and torchrun).
    """
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


@dataclass(frozen=True)
class DatasetEntry:
    """One ``DATASET_INFO[group][name]`` entry with paths resolved."""

    group: str
    name: str
    data_dir: Path
    num_files: int | None = None
    num_total_samples: int | None = None
    parquet_info_path: Path | None = None
    jsonl_path: Path | None = None
    json_dir: Path | None = None

    @property
    def task(self) -> str:
        return GROUP_TASKS[self.group]

    @property
    def is_parquet(self) -> bool:
        return self.group in ("t2i_pretrain", "unified_edit")

    def parquet_files(self) -> list[Path]:
        """Shards the upstream loader would list: ``*.parquet`` directly in ``data_dir``, sorted."""
        if not self.is_parquet or not self.data_dir.is_dir():
            return []
        return sorted(p for p in self.data_dir.iterdir() if p.name.endswith(".parquet") and p.is_file())

    def to_yaml_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"data_dir": str(self.data_dir)}
        for key in ("num_files", "num_total_samples"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in ("parquet_info_path", "jsonl_path", "json_dir"):
            if getattr(self, key) is not None:
                out[key] = str(getattr(self, key))
        return out


@dataclass
class Registry:
    """All registered datasets, in group order then file order."""

    entries: list[DatasetEntry] = field(default_factory=list)
    source: Path | None = None

    def get(self, group: str, name: str) -> DatasetEntry:
        for entry in self.entries:
            if entry.group == group and entry.name == name:
                return entry
        known = ", ".join(f"{e.group}/{e.name}" for e in self.entries) or "none"
        raise ConfigError(
            f"{self._where()}: dataset '{name}' is not registered under group '{group}' (registered: {known})"
        )

    def by_name(self, name: str) -> DatasetEntry:
        matches = [e for e in self.entries if e.name == name]
        if len(matches) != 1:
            raise ConfigError(f"{self._where()}: expected exactly one dataset named '{name}', found {len(matches)}")
        return matches[0]

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def fingerprint(self) -> str:
        """Hash of every data file's name, size and mtime: cheap (no reads), changes when data does.

        Used by the re-training sensor; content-level identity (footer hashes) is the indexer's job.
        """
        digest = hashlib.sha256()
        for entry in self.entries:
            paths = entry.parquet_files() if entry.is_parquet else [entry.jsonl_path] if entry.jsonl_path else []
            for path in paths:
                try:
                    info = path.stat()
                except OSError:
                    digest.update(f"{path}|missing".encode())
                    continue
                digest.update(f"{path}|{info.st_size}|{info.st_mtime_ns}".encode())
        return digest.hexdigest()

    def _where(self) -> str:
        return str(self.source) if self.source else "<registry>"

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for entry in self.entries:
            out.setdefault(entry.group, {})[entry.name] = entry.to_yaml_dict()
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "# BAGEL dataset registry (upstream DATASET_INFO fields). Written by bagel-pipeline.\n"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)  # readers never see a half-written registry
        return path

    @classmethod
    def from_dict(cls, data: Any, source: Path | None = None, base_dir: Path | None = None) -> Registry:
        where = str(source) if source else "<registry>"
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: the registry must be a mapping of group -> dataset name -> entry")
        entries: list[DatasetEntry] = []
        for group, datasets in data.items():
            if group not in GROUP_TASKS:
                raise ConfigError(
                    f"{where}: unknown group '{group}'; known groups: {', '.join(GROUP_TASKS)}. "
                    "Move the dataset under one of them."
                )
            if not isinstance(datasets, dict):
                raise ConfigError(f"{where}: group '{group}' must map dataset names to entries")
            for name, raw in datasets.items():
                entries.append(_parse_entry(group, str(name), raw, where, base_dir))
        return cls(entries=entries, source=source)

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        path = Path(path)
        data = read_yaml(path, "registry file", "create it with `bagel data registry`")
        return cls.from_dict(data or {}, source=path, base_dir=path.parent.resolve())


def _parse_entry(group: str, name: str, raw: Any, where: str, base_dir: Path | None) -> DatasetEntry:
    key_path = f"{where}: {group}.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{key_path} must be a mapping with at least 'data_dir'")
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    if unknown:
        raise ConfigError(f"{key_path}: unknown key(s) {unknown}; allowed keys: {', '.join(ENTRY_KEYS)}")
    if "data_dir" not in raw:
        raise ConfigError(f"{key_path}: missing 'data_dir' (the upstream loader requires it)")
    values: dict[str, Any] = {}
    for key in ENTRY_KEYS:
        if key not in raw or raw[key] is None:
            continue
        value = raw[key]
        if key in _PATH_KEYS:
            if not isinstance(value, (str, Path)):
                raise ConfigError(f"{key_path}.{key} must be a path string, got {type(value).__name__}")
            values[key] = resolve_path(value, base_dir)
        else:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key_path}.{key} must be a non-negative integer, got {value!r}")
            values[key] = value
    return DatasetEntry(group=group, name=name, **values)


# ---- importing upstream's dataset_info.py ------------------------------------------------------
def parse_upstream_dataset_info(source: str, filename: str = "dataset_info.py") -> dict[str, Any]:
    """Return the ``DATASET_INFO`` literal of an upstream ``dataset_info.py`` without executing it.

    Upstream's file imports dataset classes and builds ``DATASET_REGISTRY`` from them; only the
    ``DATASET_INFO = {...}`` assignment is data, and it must be a pure literal.
    """
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise ConfigError(f"{filename}: not valid Python ({exc.msg} at line {exc.lineno})") from exc
    for node in tree.body:
        targets: Iterable[ast.expr] = []
        value = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if any(isinstance(t, ast.Name) and t.id == "DATASET_INFO" for t in targets):
            try:
                return ast.literal_eval(value)
            except ValueError as exc:
                raise ConfigError(
                    f"{filename}: line {node.lineno}: DATASET_INFO must be a plain literal "
                    f"(no variables or calls): {exc}"
                ) from exc
    raise ConfigError(f"{filename}: no top-level 'DATASET_INFO = {{...}}' assignment found")


def import_upstream_dataset_info(path: str | Path, data_root: str | Path | None = None) -> Registry:
    """Build a :class:`Registry` from an upstream ``dataset_info.py``.

    ``data_root`` replaces every ``your_data_path`` placeholder; without it, placeholders are kept
    and :func:`validate_registry` reports each one.
    """
    path = Path(path)
    info = parse_upstream_dataset_info(path.read_text(), filename=str(path))
    if data_root is not None:
        info = json.loads(json.dumps(info).replace(PLACEHOLDER, str(Path(data_root)).replace("\\", "/")))
    return Registry.from_dict(info, source=path, base_dir=None)
