"""Generate upstream ``parquet_info`` JSON from the index, so nobody writes it by hand.

Upstream format (data-format.md 4.2): one object keyed by the **full parquet path string**, exactly
``os.path.join(data_dir, file_name)`` with ``data_dir`` as the registry gives it; each value holds
``num_row_groups`` (the only key the loader reads; it must equal the footer) plus the customary
``num_rows`` and ``num_columns``. A file missing from the JSON is silently dropped by the loader, so
we list every file whose footer is readable and whose columns are right, and report the others
(``files.parquet`` says why). :func:`check_parquet_info` diagnoses a hand-written JSON against it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bagel_core.config.registry import PLACEHOLDER, DatasetEntry, Registry
from bagel_core.index.schema import dataset_dir, dataset_key

#: ``files.parquet`` statuses whose files the loader can read row groups from.
_LISTED_STATUSES = ("ok", "all_quarantined")


def parquet_info_for(entry: DatasetEntry, files_path: str | Path) -> tuple[dict[str, dict[str, int]], list[str]]:
    """(parquet_info mapping, files left out with the reason) for one parquet dataset."""
    info: dict[str, dict[str, int]] = {}
    left_out: list[str] = []
    data_dir = str(entry.data_dir)
    for row in pq.read_table(files_path).to_pylist():
        if row["kind"] != "parquet":
            continue
        if row["status"] not in _LISTED_STATUSES or row["num_row_groups"] < 0:
            left_out.append(f"{row['source_file']}: {row['status']}: {row['error']}")
            continue
        key = os.path.join(data_dir, os.path.basename(row["source_file"]))
        info[key] = {
            "num_row_groups": int(row["num_row_groups"]),
            "num_rows": int(row["footer_rows"]),
            "num_columns": int(row["num_columns"]),
        }
    return info, left_out


def _file_names(registry: Registry) -> dict[str, str]:
    names = [e.name for e in registry.entries]
    return {
        dataset_key(e): (f"{e.name}.json" if names.count(e.name) == 1 else f"{dataset_key(e)}.json")
        for e in registry.entries
    }


def registry_file(registry: Registry) -> Path | None:
    """The YAML file the index updates in place; None for a registry held only in memory (or read
    from an upstream ``dataset_info.py``, which we never rewrite)."""
    source = registry.source
    if source is not None and Path(source).suffix in (".yaml", ".yml"):
        return Path(source)
    return None


def parquet_info_dir(registry: Registry, index_dir: str | Path) -> Path:
    """Where the generated JSON goes: beside the registry file that points at it (where
    ``bagel data registry`` writes it too), else in the index folder."""
    reg = registry_file(registry)
    return (reg.parent if reg is not None else Path(index_dir)) / "parquet_info"


def write_parquet_info_files(registry: Registry, index_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``out_dir/<name>.json`` for every parquet dataset indexed in ``index_dir``; key ``group.name``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file_names = _file_names(registry)
    written: dict[str, Path] = {}
    for entry in registry.entries:
        files_path = dataset_dir(Path(index_dir), entry) / "files.parquet"
        if not entry.is_parquet or not files_path.is_file():
            continue
        info, _ = parquet_info_for(entry, files_path)
        path = out / file_names[dataset_key(entry)]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        written[dataset_key(entry)] = path
    return written


def registry_with_parquet_info(
    registry: Registry, infos: dict[str, Path], counts: dict[str, tuple[int, int]] | None = None
) -> Registry:
    """A copy of ``registry`` pointing at the generated JSON, with sizes filled from the index.

    ``parquet_info_path`` is set for ``unified_edit`` entries (the upstream loader requires it) and
    for entries that already named one; a T2I entry without one is left without, because upstream
    passes a collected ``parquet_info`` to the group's class and the T2I class takes no such
    argument. ``counts`` (``group.name`` -> (files, samples)) fills ``num_files`` /
    ``num_total_samples``, the only place a human sees dataset sizes.
    """
    entries = []
    for e in registry.entries:
        key = dataset_key(e)
        changes: dict[str, Any] = {}
        if key in infos and (e.group == "unified_edit" or e.parquet_info_path is not None):
            changes["parquet_info_path"] = Path(infos[key]).resolve()
        if counts and key in counts:
            files, samples = counts[key]
            if e.is_parquet:
                changes["num_files"] = files
            changes["num_total_samples"] = samples
        entries.append(dataclasses.replace(e, **changes) if changes else e)
    return Registry(entries=entries, source=registry.source)


def check_registered_parquet_info(registry: Registry, out_dir: str | Path) -> dict[str, list[str]]:
    """For every parquet dataset whose registry entry names a ``parquet_info`` JSON (hand-written or
    from another tool), the problems of that JSON against the index; key ``group.name``."""
    found: dict[str, list[str]] = {}
    for entry in registry.entries:
        files_path = dataset_dir(Path(out_dir), entry) / "files.parquet"
        if not entry.is_parquet or entry.parquet_info_path is None or not files_path.is_file():
            continue
        path = Path(entry.parquet_info_path)
        try:
            existing = json.loads(path.read_text())
        except OSError as exc:
            found[dataset_key(entry)] = [f"{path}: cannot be read ({exc})"]
            continue
        except ValueError as exc:
            found[dataset_key(entry)] = [f"{path}: not valid JSON ({exc})"]
            continue
        if not isinstance(existing, dict):
            found[dataset_key(entry)] = [f"{path}: must be a JSON object keyed by parquet path"]
            continue
        generated, _ = parquet_info_for(entry, files_path)
        problems = [f"{path}: {p}" for p in check_parquet_info(entry, existing, generated)]
        if problems:
            found[dataset_key(entry)] = problems
    return found


def check_parquet_info(entry: DatasetEntry, existing: dict[str, Any], generated: dict[str, Any]) -> list[str]:
    """Problems of a hand-written ``parquet_info`` compared with the generated one (empty: consistent)."""
    problems: list[str] = []
    for key in existing:
        if PLACEHOLDER in key:
            problems.append(f"key {key!r} still carries the '{PLACEHOLDER}' placeholder")
        elif key not in generated:
            problems.append(f"key {key!r} is not a readable shard of data_dir {entry.data_dir}")
    for key, value in generated.items():
        if key not in existing:
            problems.append(f"{key} is missing: the upstream loader would silently drop this file")
            continue
        got = existing[key].get("num_row_groups") if isinstance(existing[key], dict) else None
        if got != value["num_row_groups"]:
            problems.append(f"{key}: num_row_groups is {got!r}, the footer has {value['num_row_groups']}")
    return problems
