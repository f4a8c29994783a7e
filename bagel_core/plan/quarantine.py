"""The index's quarantine list as the training loader uses it: known-bad samples, looked up by key.

Why: the index already found the samples that cannot be trained on (corrupt images, bad captions,
unreadable files). Without this list the loader re-discovers each of them by failing to decode it,
once per pass, on every worker. ``bagel data plan --index`` copies the quarantined rows of the
configured datasets into the manifest folder (:data:`QUARANTINE_FILE`), so the plan is the one input
training needs; :meth:`Quarantine.reason` then answers "is this sample known bad?" without reading it.

Keys follow the index (``bagel_core.index.schema.SAMPLE_LOCATION``): ``(dataset, source_file,
row_group, row_index)``, with ``row_group = -1`` and ``row_index`` = the line for JSONL, and
``row_group = row_index = -1`` for a whole file that could not be opened. Paths are compared after
``os.path.realpath``, so a registry spelling a path through a symlink still matches.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bagel_core.config.errors import DataError
from bagel_core.index.schema import QUARANTINE_SCHEMA

QUARANTINE_FILE = "quarantine.parquet"
INDEX_FILE = "index.parquet"
#: The columns kept in the manifest's copy (location + the index's reason class).
COLUMNS = ("dataset", "group", "task", "source_file", "row_group", "row_index", "reason")
WHOLE_FILE = (-1, -1)


def _index_quarantine_files(index: Path) -> list[Path]:
    """The quarantine table(s) of an index directory or of the folder holding an index file."""
    folder = index if index.is_dir() else index.parent
    if (folder / QUARANTINE_FILE).is_file():
        return [folder / QUARANTINE_FILE]
    return sorted(folder.glob(f"datasets/*/*/{QUARANTINE_FILE}"))


def _index_files(index: Path) -> list[Path]:
    if index.is_file():
        return [index]
    if (index / INDEX_FILE).is_file():
        return [index / INDEX_FILE]
    return sorted(index.glob(f"datasets/*/*/{INDEX_FILE}"))


def _read(path: Path, status_column: bool) -> pa.Table:
    """One table's quarantined rows with :data:`COLUMNS`; an index table is filtered on ``status``."""
    try:
        names = pq.read_schema(path).names
        wanted = [*COLUMNS, "status"] if status_column else list(COLUMNS)
        missing = sorted(set(wanted) - set(names))
        if missing:
            raise DataError(f"{path} lacks column(s) {missing}; rebuild the index with `bagel data index`")
        table = pq.read_table(path, columns=wanted)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path}: cannot read the quarantine list ({exc}); rebuild the index") from exc
    if status_column:
        table = table.filter(pc.equal(table.column("status"), "quarantined")).select(list(COLUMNS))
    return table.cast(schema())


def schema() -> pa.Schema:
    """The quarantine columns kept, typed as in the index."""
    return pa.schema([QUARANTINE_SCHEMA.field(name) for name in COLUMNS])


def read_index_quarantine(index: str | Path, datasets: Iterable[tuple[str, str]] | None = None) -> pa.Table:
    """Quarantined samples of an index (its ``quarantine.parquet``; an index without one, such as a
    hand-made ``index.parquet``, gives its rows whose status is ``quarantined``), restricted to the
    ``(group, dataset)`` pairs given."""
    path = Path(index)
    if not path.exists():
        raise DataError(f"no index at {path}; build it with `bagel data index` or leave the index out")
    files = _index_quarantine_files(path)
    status_column = not files
    files = files or _index_files(path)
    if not files:
        raise DataError(f"no {QUARANTINE_FILE} or {INDEX_FILE} at {path}; build the index with `bagel data index`")
    table = pa.concat_tables([_read(f, status_column) for f in files])
    if datasets is not None:
        keys = [f"{g}\0{d}" for g, d in datasets]
        joined = pc.binary_join_element_wise(table.column("group"), table.column("dataset"), "\0")
        table = table.filter(pc.is_in(joined, value_set=pa.array(keys, pa.string())))
    return table


def write_quarantine(table: pa.Table, out_dir: str | Path) -> Path:
    """The manifest's copy of the quarantine list (``out_dir/quarantine.parquet``)."""
    path = Path(out_dir) / QUARANTINE_FILE
    pq.write_table(table.cast(schema()), path)
    return path


def summarise(table: pa.Table) -> dict[str, Any]:
    """Counts for ``manifest.json``: samples (and whole files) per group and per index reason."""
    groups = Counter(table.column("group").to_pylist())
    reasons = Counter(table.column("reason").to_pylist())
    return {
        "samples": table.num_rows,
        "by_group": dict(sorted(groups.items())),
        "by_reason": dict(sorted(reasons.items())),
    }


class Quarantine:
    """Known-bad sample keys with their index reason (module docstring for the key convention)."""

    def __init__(self, rows: Iterable[tuple[str, str, int, int, str]]) -> None:
        self._files: dict[tuple[str, str], dict[tuple[int, int], str]] = {}
        self._real: dict[str, str] = {}
        self.size = 0
        for dataset, source_file, row_group, row_index, reason in rows:
            key = (dataset, self._norm(source_file))
            self._files.setdefault(key, {})[(int(row_group), int(row_index))] = reason or "quarantined"
            self.size += 1

    def _norm(self, path: str) -> str:
        real = self._real.get(path)
        if real is None:
            real = self._real[path] = os.path.realpath(path)
        return real

    @classmethod
    def from_table(cls, table: pa.Table) -> Quarantine:
        cols = [table.column(c).to_pylist() for c in ("dataset", "source_file", "row_group", "row_index", "reason")]
        return cls(zip(*cols))

    @classmethod
    def read(cls, path: str | Path) -> Quarantine:
        """A quarantine list written by :func:`write_quarantine` (or an index's ``quarantine.parquet``)."""
        return cls.from_table(_read(Path(path), status_column=False))

    def __len__(self) -> int:
        return self.size

    def reason(self, dataset: str, source_file: str, row_group: int, row_index: int) -> str | None:
        """The index's reason when the sample (or its whole file) is quarantined, else ``None``."""
        rows = self._files.get((dataset, self._norm(source_file)))
        if rows is None:
            return None
        return rows.get((row_group, row_index)) or rows.get(WHOLE_FILE)
