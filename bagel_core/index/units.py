"""Tiers 2 and 3 of the indexer for one unit of work: a run of parquet row groups or a JSONL byte range.

A unit is what a worker process (or thread) indexes: its rows are read by Arrow (big row groups
streamed through DuckDB; either reader is the other's fallback), accepted in bulk where
:mod:`bagel_core.index.bulk` can, and checked row by row with :mod:`bagel_core.index.checks`
otherwise. A unit may name ``only_rows``: the rows the scan tier left, the others are done.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bagel_core.config.errors import DataError
from bagel_core.index import bulk, scan
from bagel_core.index.checks import SampleResult, check_edit, check_t2i, check_vlm_line
from bagel_core.index.schema import INDEX_SCHEMA, ROW_GROUP_UNREADABLE, WORKER_CRASHED, IndexOptions

_MODE_NAMES = pa.array(bulk.MODES, pa.string())

#: Fault injection for tests: a worker indexing a unit of this file path exits abruptly.
CRASH_ENV = "BAGEL_INDEX_TEST_CRASH_PATH"


@dataclass(frozen=True)
class Unit:
    """A run of parquet row groups or one JSONL byte range: what a worker process indexes.

    Small row groups are merged into one unit so the fixed cost of a DuckDB query is amortised.
    """

    dataset: str
    group: str
    task: str
    path: str
    kind: str  # "parquet" | "jsonl"
    row_groups: tuple[tuple[int, int, int], ...] = ()  # parquet: (row group id, first file row, rows)
    start: int = 0  # jsonl: byte range [start, end)
    end: int = 0
    first_line: int = 0
    data_dir: str = ""
    columns: tuple[str, ...] = ()
    row_group_bytes: tuple[int, ...] = ()  # parquet: uncompressed bytes per row group (reader choice)
    only_rows: tuple[int, ...] | None = None  # parquet: check just these file rows (the rest are done)

    @property
    def first_row(self) -> int:
        return self.row_groups[0][1] if self.row_groups else 0

    @property
    def row_span(self) -> int:
        """File rows from the first row group's first row to the last one's end (gaps allowed)."""
        return self.row_groups[-1][1] + self.row_groups[-1][2] - self.first_row if self.row_groups else 0

    @property
    def num_rows(self) -> int:
        return sum(n for _, _, n in self.row_groups)


class IndexRows:
    """Index rows of one unit: per-row results (Python values) plus fast-path chunks (columns).

    Constant columns are filled in at the end; :meth:`table` returns the rows sorted by file row.
    """

    _CONSTANT = ("dataset", "group", "task", "source_file")

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        self.cols: dict[str, list[Any]] = {f.name: [] for f in INDEX_SCHEMA if f.name not in self._CONSTANT}
        self.fast: list[tuple[np.ndarray, ...]] = []

    def add(self, row_group: int, row_index: int, file_row: int, res: SampleResult) -> None:
        c = self.cols
        c["row_group"].append(row_group)
        c["row_index"].append(row_index)
        c["file_row"].append(file_row)
        c["image_sizes"].append(res.sizes)
        c["num_images"].append(len(res.sizes))
        c["image_modes"].append(res.modes)
        c["image_bytes"].append(res.image_bytes)
        c["num_texts"].append(res.num_texts)
        c["text_chars"].append(res.text_chars)
        c["image_paths"].append(res.image_paths)
        c["video_path"].append(res.video_path)
        if res.problems:
            c["status"].append("quarantined")
            c["reason"].append(res.reason)
            c["message"].append(res.message)
        else:
            c["status"].append("ok")
            c["reason"].append(None)
            c["message"].append(None)

    def add_failed(self, row_group: int, row_index: int, file_row: int, reason: str, message: str) -> None:
        res = SampleResult()
        res.fail(reason, message)
        self.add(row_group, row_index, file_row, res)

    def add_fast(
        self,
        row_group: np.ndarray,
        first_row: np.ndarray,
        file_rows: np.ndarray,
        counts: np.ndarray,
        width: np.ndarray,
        height: np.ndarray,
        mode: np.ndarray,
        image_bytes: np.ndarray,
        num_texts: np.ndarray,
        text_chars: np.ndarray,
    ) -> None:
        """Rows the fast path accepted (status ok), one array element per row (``row_group``, the row
        group's ``first_row``, ...); each row has ``counts`` images whose width/height/mode codes follow
        in row order."""
        if len(file_rows):
            self.fast.append(
                (
                    row_group,
                    file_rows - first_row,
                    file_rows,
                    counts,
                    width,
                    height,
                    mode,
                    image_bytes,
                    num_texts,
                    text_chars,
                )
            )

    def _fast_table(self) -> pa.Table:
        rg, ri, fr, counts, width, height, mode, nbytes, ntexts, nchars = (
            np.concatenate([chunk[k] for chunk in self.fast]) for k in range(10)
        )
        n, m = len(fr), len(width)
        row_off = pa.array(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32))
        pairs = pa.array(np.stack([width, height], 1).astype(np.int32).ravel())
        sizes = pa.ListArray.from_arrays(
            row_off, pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * m + 1, 2, dtype=np.int32)), pairs)
        )
        modes = pa.ListArray.from_arrays(row_off, _MODE_NAMES.take(mode))
        u = self.unit
        none = pa.nulls(n, pa.string())
        data = {
            "dataset": pa.repeat(u.dataset, n),
            "group": pa.repeat(u.group, n),
            "task": pa.repeat(u.task, n),
            "source_file": pa.repeat(u.path, n),
            "row_group": rg,
            "row_index": ri,
            "file_row": fr,
            "image_sizes": sizes,
            "num_images": counts.astype(np.int32),
            "image_modes": modes,
            "image_bytes": nbytes.astype(np.int64),
            "num_texts": ntexts.astype(np.int32),
            "text_chars": nchars.astype(np.int64),
            "image_paths": pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string())),
            "video_path": none,
            "status": pa.repeat("ok", n),
            "reason": none,
            "message": none,
        }
        columns = []
        for f in INDEX_SCHEMA:
            col = data[f.name]
            if isinstance(col, np.ndarray):
                col = pa.array(col, f.type)
            elif col.type != f.type:
                col = col.cast(f.type)
            columns.append(col)
        return pa.table(columns, schema=INDEX_SCHEMA)

    def table(self) -> pa.Table:
        n = len(self.cols["file_row"])
        u = self.unit
        tables = []
        if n or not self.fast:
            data = {
                "dataset": [u.dataset] * n,
                "group": [u.group] * n,
                "task": [u.task] * n,
                "source_file": [u.path] * n,
                **self.cols,
            }
            tables.append(pa.Table.from_pydict(data, schema=INDEX_SCHEMA))
        if self.fast:
            tables.append(self._fast_table())
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        rows = table.column("file_row").to_numpy()
        if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():
            table = table.sort_by("file_row")
        return table


def _duckdb_batches(unit: Unit, rg_index: int, batch_rows: int, pf: pq.ParquetFile | None) -> Iterator[pa.RecordBatch]:
    """One row group streamed through DuckDB (pruned on ``file_row_number``; memory ~ one batch)."""
    if not scan.is_literal_path(unit.path):
        raise DataError("the path has glob characters that DuckDB would expand: Arrow reads this file")
    con = scan.connection(1)  # units may run on threads: a cursor each
    try:
        cols = ", ".join(f'"{c}"' for c in unit.columns)
        _, lo, n = unit.row_groups[rg_index]
        rel = con.sql(
            f"SELECT file_row_number, {cols} FROM read_parquet({scan.sql_literal(unit.path)}, file_row_number=true) "
            f"WHERE file_row_number >= {lo} AND file_row_number < {lo + n}"
        )
        yield from rel.to_arrow_reader(batch_rows)
    finally:
        con.close()


def _arrow_batches(unit: Unit, rg_index: int, batch_rows: int, pf: pq.ParquetFile) -> Iterator[pa.RecordBatch]:
    """One row group decoded by Arrow's reader straight into Arrow buffers.

    Why not DuckDB here: exporting BLOB columns from DuckDB to Arrow copies every byte and measured
    ~3x slower than Arrow decoding the pages itself. Strings are cast to binary so an invalid
    UTF-8 value is quarantined per row (DuckDB refuses the whole row group).
    """
    rg_id, first_row, _ = unit.row_groups[rg_index]
    table = pf.read_row_group(rg_id, columns=list(unit.columns))
    arrays = [table.column(name).cast(_stringless(table.column(name).type)) for name in unit.columns]
    rows = pa.array(range(first_row, first_row + table.num_rows), pa.int64())
    # the row group is in memory already: one batch per chunk, no re-slicing (batch_rows is for DuckDB)
    yield from pa.table([rows, *arrays], names=["file_row_number", *unit.columns]).combine_chunks().to_batches()


def _stringless(t: pa.DataType) -> pa.DataType:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.binary()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_stringless(t.value_type))
    return t


def _cells(arr: pa.Array) -> list[Any]:
    """Python values of a column; binary cells as zero-copy memoryviews (images are never copied)."""
    if pa.types.is_binary(arr.type) and arr.null_count == 0 and len(arr):
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4).tolist()
        data = arr.buffers()[2]
        view = memoryview(data).cast("B") if data is not None else memoryview(b"")  # Arrow exports "b"
        return [view[offsets[i] : offsets[i + 1]] for i in range(len(arr))]
    return arr.to_pylist()


def _check_rows(
    rows: IndexRows,
    unit: Unit,
    opts: IndexOptions,
    rg: np.ndarray,
    first: np.ndarray,
    batch: pa.RecordBatch,
    take: np.ndarray,
) -> None:
    """Per-row checks (:mod:`checks`) of the batch rows ``take``: the reference path."""
    if not len(take):
        return
    check = check_t2i if unit.task == "t2i" else check_edit
    file_rows = batch.column(0).to_numpy()
    if len(take) == batch.num_rows:
        a, b = _cells(batch.column(1)), batch.column(2).to_pylist()
    else:
        idx = pa.array(take)
        a, b = _cells(batch.column(1).take(idx)), batch.column(2).take(idx).to_pylist()
    for i, x, y in zip(take.tolist(), a, b):
        fr = int(file_rows[i])
        rows.add(int(rg[i]), fr - int(first[i]), fr, check(x, y, opts.max_pixels, opts.full_decode))


def _fast_rows(
    unit: Unit, opts: IndexOptions, batch: pa.RecordBatch, rows: IndexRows, rg: np.ndarray, first: np.ndarray
) -> np.ndarray:
    """Vectorised checks (:mod:`bulk`) of a whole batch; adds the rows they accept, returns their mask.

    ``rg`` / ``first``: per batch row, its row group and that row group's first file row.
    """
    n = batch.num_rows
    accepted = np.zeros(n, bool)
    if not opts.fast_path or opts.full_decode or n == 0:
        return accepted
    file_rows = batch.column(0).to_numpy()
    if unit.task == "t2i":
        images = bulk.probe_images(batch.column(1), opts.max_pixels)
        candidates = np.flatnonzero(images.ok)
        if not len(candidates):
            return accepted
        captions = batch.column(2)
        if len(candidates) != n:
            captions = captions.take(pa.array(candidates))
        texts = bulk.as_strings(captions)
        if texts is None:  # some caption is not UTF-8: the per-row path names it
            return accepted
        ok, num_texts, text_chars = bulk.captions_ok(texts)
        okm = np.asarray(ok, bool)
        sel = candidates[okm]
        accepted[sel] = True
        rows.add_fast(
            rg[sel],
            first[sel],
            file_rows[sel],
            np.ones(len(sel), np.int32),
            images.width[sel],
            images.height[sel],
            images.mode[sel],
            images.nbytes[sel],
            np.asarray(num_texts, np.int64)[okm],
            np.asarray(text_chars, np.int64)[okm],
        )
        return accepted
    lists = batch.column(1)
    if not (pa.types.is_list(lists.type) or pa.types.is_large_list(lists.type)):
        return accepted
    offsets = lists.offsets.to_numpy().astype(np.int64)
    counts = offsets[1:] - offsets[:-1]
    images = bulk.probe_images(lists.values, opts.max_pixels)
    all_ok, row_bytes = bulk.list_rows(images, offsets[:-1], offsets[1:])
    valid = np.ones(n, bool) if lists.null_count == 0 else lists.is_valid().to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(valid & (counts >= 2) & all_ok)
    if not len(candidates):
        return accepted
    instructions = bulk.as_strings(batch.column(2).take(pa.array(candidates)))
    if instructions is None:
        return accepted
    ok, num_texts, text_chars = bulk.instructions_ok(counts[candidates].tolist(), instructions)
    okm = np.asarray(ok, bool)
    sel = candidates[okm]
    accepted[sel] = True
    child = bulk.flat_indices(offsets[sel], counts[sel])
    rows.add_fast(
        rg[sel],
        first[sel],
        file_rows[sel],
        counts[sel].astype(np.int32),
        images.width[child],
        images.height[child],
        images.mode[child],
        row_bytes[sel],
        np.asarray(num_texts, np.int64)[okm],
        np.asarray(text_chars, np.int64)[okm],
    )
    return accepted


#: Consecutive small row groups are read by Arrow in one call up to this many (uncompressed) bytes.
MERGED_READ_BYTES = 16 << 20


def _read_span(unit: Unit, k: int, j: int, path: str) -> pa.RecordBatch:
    """Row groups ``k..j-1`` of a unit with one Arrow read, as one batch (strings cast to binary)."""
    pf = pq.ParquetFile(path, pre_buffer=False)
    spans = unit.row_groups[k:j]
    table = pf.read_row_groups([g for g, _, _ in spans], columns=list(unit.columns), use_threads=False)
    if table.num_rows != sum(n for _, _, n in spans):
        raise DataError(f"read {table.num_rows} rows, the footer declares {sum(n for _, _, n in spans)}")
    arrays = [table.column(name).cast(_stringless(table.column(name).type)) for name in unit.columns]
    rows = pa.array(np.concatenate([np.arange(f, f + n, dtype=np.int64) for _, f, n in spans]))
    return pa.table([rows, *arrays], names=["file_row_number", *unit.columns]).combine_chunks().to_batches()[0]


def _plan_reads(unit: Unit, opts: IndexOptions, arrow_ok: bool) -> list[tuple[int, int]]:
    """Runs ``[k, j)`` of the unit's row groups read in one go (small ones merged; others alone)."""
    out: list[tuple[int, int]] = []
    k, n = 0, len(unit.row_groups)
    sizes = unit.row_group_bytes or (0,) * n
    while k < n:
        j, total = k, 0
        while (
            arrow_ok
            and j < n
            and sizes[j] <= opts.arrow_row_group_bytes
            and (j == k or total + sizes[j] <= MERGED_READ_BYTES)
        ):
            total += sizes[j]
            j += 1
        out.append((k, max(j, k + 1)))
        k = max(j, k + 1)
    return out


def _index_parquet_unit(unit: Unit, opts: IndexOptions) -> pa.Table:
    """Index a run of row groups: merged Arrow reads (prefetched on a thread, so reading overlaps the
    checks), then per row group whatever those did not deliver, through both readers in turn."""
    rows = IndexRows(unit)
    try:
        pf: pq.ParquetFile | None = pq.ParquetFile(unit.path, pre_buffer=False)
    except Exception:  # noqa: BLE001 - Arrow cannot open it: DuckDB alone will try
        pf = None
    base = unit.first_row
    firsts = np.array([f for _, f, _ in unit.row_groups], np.int64)
    rg_ids = np.array([g for g, _, _ in unit.row_groups], np.int32)
    done = np.zeros(unit.row_span, bool)
    if unit.only_rows is not None:
        done[:] = True
        done[np.asarray(unit.only_rows, np.int64) - base] = False

    def consume(batch: pa.RecordBatch, lo: int, hi: int) -> bool:
        """Check the batch's rows in ``[lo, hi)`` not done yet; True if it held rows outside that range."""
        fr = batch.column(0).to_numpy().astype(np.int64)
        inside = (fr >= lo) & (fr < hi)
        fresh = np.flatnonzero(inside)
        fresh = fresh[~done[fr[fresh] - base]]
        if len(fresh) > 1 and not (fr[fresh][1:] > fr[fresh][:-1]).all():  # repeats: the first one counts
            _, keep = np.unique(fr[fresh], return_index=True)
            fresh = fresh[np.sort(keep)]
        if len(fresh) != batch.num_rows:
            batch = batch.take(pa.array(fresh))
        fr = fr[fresh]
        rgi = np.searchsorted(firsts, fr, side="right") - 1
        accepted = _fast_rows(unit, opts, batch, rows, rg_ids[rgi], firsts[rgi])
        _check_rows(rows, unit, opts, rg_ids[rgi], firsts[rgi], batch, np.flatnonzero(~accepted))
        done[fr - base] = True
        return not inside.all()

    reads = _plan_reads(unit, opts, pf is not None)
    with ThreadPoolExecutor(1, thread_name_prefix="index-read") as reader_thread:
        prefetched = [
            reader_thread.submit(_read_span, unit, k, j, unit.path)
            if pf is not None
            and (unit.row_group_bytes[k] <= opts.arrow_row_group_bytes if unit.row_group_bytes else True)
            else None
            for k, j in reads[:1]
        ]
        for i, (k, j) in enumerate(reads):
            fut = prefetched[i]
            if i + 1 < len(reads):  # start the next read before checking this one
                k2, j2 = reads[i + 1]
                small = unit.row_group_bytes[k2] <= opts.arrow_row_group_bytes if unit.row_group_bytes else True
                prefetched.append(
                    reader_thread.submit(_read_span, unit, k2, j2, unit.path) if pf is not None and small else None
                )
            if fut is not None:
                try:
                    batch = fut.result()
                except Exception:  # noqa: BLE001 - the per-row-group readers below retry and name the error
                    batch = None
                if batch is not None:
                    consume(batch, int(firsts[k]), int(firsts[j - 1]) + unit.row_groups[j - 1][2])
                prefetched[i] = None
            for r in range(k, j):
                _read_row_group(unit, opts, r, pf, done, base, consume, rows)
    return rows.table()


def _read_row_group(
    unit: Unit,
    opts: IndexOptions,
    k: int,
    pf: pq.ParquetFile | None,
    done: np.ndarray,
    base: int,
    consume: Callable[[pa.RecordBatch, int, int], bool],
    rows: IndexRows,
) -> None:
    """Row group ``k`` of the unit through the readers in turn (rows done already are skipped);
    rows no reader returns are quarantined as ``row_group_unreadable``."""
    rg_id, first, num_rows = unit.row_groups[k]
    if done[first - base : first - base + num_rows].all():
        return
    errors: list[str] = []
    outside = False
    small = unit.row_group_bytes[k] <= opts.arrow_row_group_bytes if unit.row_group_bytes else True
    readers = [_arrow_batches, _duckdb_batches] if small else [_duckdb_batches, _arrow_batches]
    if pf is None:
        readers = [_duckdb_batches]
    for reader in readers:  # the second reader only runs if the first fails; done rows are skipped
        try:
            for batch in reader(unit, k, opts.batch_rows, pf):
                outside |= consume(batch, first, first + num_rows)
            break
        except Exception as exc:  # noqa: BLE001 - any reader error: try the other reader, then quarantine
            errors.append(f"{reader.__name__.strip('_').split('_')[0]}: {type(exc).__name__}: {exc}")
    missing = np.flatnonzero(~done[first - base : first - base + num_rows])
    if len(missing):
        detail = "; ".join(errors)[:500] or "rows declared by the footer were not returned"
        for r in missing.tolist():
            rows.add_failed(rg_id, r, first + r, ROW_GROUP_UNREADABLE, f"row group {rg_id} cannot be read: {detail}")
        done[first - base : first - base + num_rows] = True
    if outside:
        raise DataError(f"{unit.path}: row group {rg_id} returned rows outside the footer's {num_rows} rows")


def _index_jsonl_unit(unit: Unit, opts: IndexOptions) -> pa.Table:
    rows = IndexRows(unit)
    with open(unit.path, "rb") as fp:
        fp.seek(unit.start)
        data = fp.read(unit.end - unit.start)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the range's last line
    for k, raw in enumerate(lines):
        line_no = unit.first_line + k
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        rows.add(-1, line_no, line_no, check_vlm_line(raw, unit.data_dir, opts.max_pixels, opts.full_decode))
    return rows.table()


def index_unit(unit: Unit, opts: IndexOptions) -> pa.Table:
    """Index one unit (runs in a worker process); rows sorted by file row, compute seconds in metadata."""
    if os.environ.get(CRASH_ENV) == unit.path and multiprocessing.parent_process() is not None:
        os._exit(70)  # simulate a decoder segfault in a worker (never in the main process)
    t0 = time.perf_counter()
    table = _index_parquet_unit(unit, opts) if unit.kind == "parquet" else _index_jsonl_unit(unit, opts)
    return table.replace_schema_metadata({"seconds": repr(time.perf_counter() - t0)})


def crashed_rows(unit: Unit) -> pa.Table:
    """Rows of a unit whose worker process died twice: every row quarantined, locations exact."""
    rows = IndexRows(unit)
    message = "the worker process indexing this row range died twice (segfault or out of memory)"
    if unit.kind == "parquet":
        only = None if unit.only_rows is None else set(unit.only_rows)
        for rg_id, first, num_rows in unit.row_groups:
            for r in range(num_rows):
                if only is None or first + r in only:
                    rows.add_failed(rg_id, r, first + r, WORKER_CRASHED, message)
    else:
        with open(unit.path, "rb") as fp:
            fp.seek(unit.start)
            data = fp.read(unit.end - unit.start)
        n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
        for k in range(n_lines):
            rows.add_failed(-1, unit.first_line + k, unit.first_line + k, WORKER_CRASHED, message)
    return rows.table()
