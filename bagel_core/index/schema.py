"""What the index says: version, reason classes, the tables' schemas and the options that change them.

Shared by the planner (:mod:`bagel_core.index.indexer`), the unit workers (:mod:`bagel_core.index.units`)
and everything reading the index (token statistics, Dagster assets).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from bagel_core.config.registry import DatasetEntry
from bagel_core.index.probe import DEFAULT_MAX_PIXELS

INDEX_VERSION = 4

# File / row-group level reason classes.
FILE_UNREADABLE = "file_unreadable"
ROW_GROUP_UNREADABLE = "row_group_unreadable"
MISSING_COLUMN = "missing_column"
COLUMN_TYPE = "column_type"
WORKER_CRASHED = "worker_crashed"


#: Columns each parquet task reads and the (normalised) Arrow types accepted for them.
PARQUET_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "t2i": {"image": ("binary",), "captions": ("string", "binary")},
    "edit": {"image_list": ("list<binary>",), "instruction_list": ("list<list<string>>", "list<list<binary>>")},
}


def arrow_type_name(t: pa.DataType) -> str:
    """Arrow type as ``binary`` / ``string`` / ``list<...>``, folding large/view variants together."""
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or (pa.types.is_fixed_size_binary(t))
    ):
        return "binary"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return f"list<{arrow_type_name(t.value_type)}>"
    return str(t)


#: Where a sample is: the leading columns of the index and quarantine tables (and of the token statistics).
SAMPLE_LOCATION = [
    ("dataset", pa.string()),
    ("group", pa.string()),
    ("task", pa.string()),
    ("source_file", pa.string()),
    ("row_group", pa.int32()),
    ("row_index", pa.int64()),
    ("file_row", pa.int64()),
]
_VERDICT = [("reason", pa.string()), ("message", pa.string())]

INDEX_SCHEMA = pa.schema(
    [
        *SAMPLE_LOCATION,
        ("image_sizes", pa.list_(pa.list_(pa.int32()))),
        ("num_images", pa.int32()),
        ("image_modes", pa.list_(pa.string())),
        ("image_bytes", pa.int64()),
        ("num_texts", pa.int32()),
        ("text_chars", pa.int64()),
        ("image_paths", pa.list_(pa.string())),
        ("video_path", pa.string()),
        ("status", pa.string()),
        *_VERDICT,
    ]
)

QUARANTINE_SCHEMA = pa.schema([*SAMPLE_LOCATION, *_VERDICT])

FILES_SCHEMA = pa.schema(
    [
        *SAMPLE_LOCATION[:4],
        ("kind", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("footer_hash", pa.string()),
        ("deps_digest", pa.string()),
        ("options_digest", pa.string()),
        ("num_row_groups", pa.int32()),
        ("num_columns", pa.int32()),
        ("footer_rows", pa.int64()),
        ("rows_read", pa.int64()),
        ("ok", pa.int64()),
        ("quarantined", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("reused", pa.bool_()),
        ("part", pa.string()),
        ("part_batches", pa.list_(pa.int32())),  # record batches of ``part`` holding this file's rows
        ("seconds", pa.float64()),  # worker compute time spent on the file in this run
    ]
)


@dataclass(frozen=True)
class IndexOptions:
    """Knobs that change what the index says (they are part of the cache key) and how it runs."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    full_decode: bool = False
    workers: int | None = None  # None: every CPU this process may use
    batch_rows: int = 128
    arrow_row_group_bytes: int = 256 << 20  # bigger row groups are streamed through DuckDB instead
    unit_rows: int = 4096  # parquet row groups are merged up to this many rows per unit
    unit_bytes: int = 256 << 20  # ... and this many (uncompressed) bytes
    jsonl_chunk_bytes: int = 4 << 20
    force: bool = False  # ignore the incremental cache
    # below this much work (rows; 10 KB of row-group data counts as a row too: ~5 us each on the fast
    # path, so ~1.5 s), starting worker processes costs more than it saves: threads in this process
    min_rows_for_pool: int = 300_000
    fast_path: bool = True  # vectorised checks accept common rows in bulk (same results; False: all per row)
    sql_scan: bool = True  # with fast_path: first one DuckDB scan per dataset (scan.py), then units for the rest

    def digest(self) -> str:
        key = {"v": INDEX_VERSION, "max_pixels": self.max_pixels, "full_decode": self.full_decode}
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return max(1, self.workers)
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - non-Linux
            return max(1, os.cpu_count() or 1)


# ---- units of work ---------------------------------------------------------------------------------


def dataset_key(entry: DatasetEntry) -> str:
    """Stable folder / partition name of a dataset."""
    return f"{entry.group}.{entry.name}"


def dataset_dir(out_dir: Path, entry: DatasetEntry) -> Path:
    """The per-dataset folder of an index directory."""
    return Path(out_dir) / "datasets" / entry.group / entry.name
