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
from bagel_core.index.indexer import dataset_dir, dataset_key

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


def write_parquet_info_files(registry: Registry, out_dir: str | Path) -> dict[str, Path]:
    """Write ``out_dir/parquet_info/<name>.json`` for every indexed parquet dataset; key: ``group.name``."""
    out = Path(out_dir) / "parquet_info"
    out.mkdir(parents=True, exist_ok=True)
    file_names = _file_names(registry)
    written: dict[str, Path] = {}
    for entry in registry.entries:
        files_path = dataset_dir(Path(out_dir), entry) / "files.parquet"
        if not entry.is_parquet or not files_path.is_file():
            continue
        info, _ = parquet_info_for(entry, files_path)
        path = out / file_names[dataset_key(entry)]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        written[dataset_key(entry)] = path
    return written


def registry_with_parquet_info(registry: Registry, infos: dict[str, Path]) -> Registry:
    """A copy of ``registry`` whose parquet entries point at the generated JSON files."""
    entries = [
        dataclasses.replace(e, parquet_info_path=Path(infos[dataset_key(e)]).resolve())
        if e.is_parquet and dataset_key(e) in infos
        else e
        for e in registry.entries
    ]
    return Registry(entries=entries, source=registry.source)


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
