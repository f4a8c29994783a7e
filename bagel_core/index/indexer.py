"""Validate and index every sample of every registered dataset (DuckDB scan + Pillow header probes).

Why: broken shards, wrong column types and bad samples must be found *before* GPU time is spent,
counted, and quarantined with a reason instead of crashing training at step N.

Outputs under ``out_dir`` (all parquet, streamed; nothing holds a whole dataset in memory):

* ``index.parquet`` -- one row per sample; schema (the token-statistics step relies on it):

  ============  ====================  ===========================================================
  column        type                  meaning
  ============  ====================  ===========================================================
  dataset       string                registry dataset name
  group         string                ``t2i_pretrain`` | ``unified_edit`` | ``vlm_sft``
  task          string                ``t2i`` | ``edit`` | ``vlm``
  source_file   string                absolute path of the parquet / JSONL file
  row_group     int32                 parquet row group; -1 for JSONL
  row_index     int64                 row within the row group (upstream resume cursor); JSONL: 0-based line
  file_row      int64                 row within the file (JSONL: the line number again)
  image_sizes   list<list<int32>>     ``[width, height]`` per image in sample order; ``[-1, -1]`` when unreadable
  num_images    int32                 images referenced by the sample
  image_modes   list<string>          Pillow mode per image ("" when unreadable)
  image_bytes   int64                 encoded bytes of the sample's images
  num_texts     int32                 T2I captions / edit phrasings / VLM turns
  text_chars    int64                 characters over those texts
  image_paths   list<string>          VLM: resolved image paths in order; empty otherwise
  video_path    string                VLM video records: resolved video file/frame folder; else null
  status        string                ``ok`` | ``quarantined``
  reason        string                quarantine reason class; null when ok
  message       string                detail naming the column/key; null when ok
  ============  ====================  ===========================================================

* ``quarantine.parquet`` -- every quarantined sample plus one row per file that could not be opened
  (``row_group``/``row_index``/``file_row`` = -1, reason ``file_unreadable``).
* ``files.parquet`` -- per file: identity (size, mtime, footer hash), footer facts, rows read,
  ok, quarantined, status, error; the accounting invariant ``ok + quarantined == rows_read`` holds
  per file, and ``rows_read == footer_rows`` (the parquet footer's row count, or the JSONL's line
  count) whenever the file could be opened. An unopenable file has status ``unreadable``.
* ``parquet_info/<dataset>.json`` beside the registry file -- upstream ``parquet_info``, generated
  from the footers (see :mod:`bagel_core.index.parquet_info`).
* ``datasets/<group>/<name>/`` -- the same three tables per dataset (the unit Dagster partitions
  on) and ``parts/<run>.arrow``: the index rows of the dataset's latest run as Arrow IPC record
  batches per source file (a cache: cheap to write and read); a later run reads a
  file's batches back instead of re-checking it when the file's identity is unchanged.

* the registry itself, updated in place (there is one registry, never a second copy): edit entries'
  ``parquet_info_path`` point at the generated JSON, ``num_files`` / ``num_total_samples`` are the
  indexed counts.

Three tiers, each only *accepting* what the next would accept with the same values, so reasons
and messages of bad input never depend on which tier saw a row (``IndexOptions(fast_path=False)``
sends every row through the last one; differential tests compare):

1. **Scan** (:mod:`bagel_core.index.scan`, parquet only): DuckDB queries over all files to index,
   on every core, reduce each row to its images' first bytes and last 8 bytes plus the caption /
   instruction verdict computed in SQL; numpy probes the headers. Small files share a query, big
   ones go in unit-aligned row ranges (``scan.QUERY_ROWS``): memory is bounded whatever the
   dataset size. Accepted rows go straight to the file's part.
2. **Bulk** (:mod:`bagel_core.index.bulk`): for the row groups holding rows the scan left (or all
   of a file DuckDB refuses, e.g. invalid UTF-8 or a corrupt page), Arrow decodes the rows and numpy
   checks PNG/JPEG headers, trailers and the pixel cap on whole images, texts in a tight loop.
3. **Per row** (:mod:`bagel_core.index.checks`): everything else, with the exact reason and message.

Footers are read once per file with Arrow (row groups, row counts, sizes, schema). Tiers 2-3 run
per unit (:mod:`bagel_core.index.units`, on :mod:`bagel_core.index.pool`): a run of row groups
(up to ``unit_rows`` rows) or a JSONL byte range, read by Arrow (row
groups larger than ``arrow_row_group_bytes``: streamed through DuckDB with ``file_row_number``;
either reader is the other's fallback, so a row group only one of them can read still gets
indexed). JSONL is read as bytes in Python (DuckDB's JSON reader either aborts on a bad line or
silently skips it with ``ignore_errors``).

Parallelism: DuckDB's threads for the scan; for units, with enough work (``min_rows_for_pool``) a
fork-server process pool (``workers``, default: every usable CPU), else ``workers`` threads in this
process (Arrow decoding and numpy release the GIL; worker start-up would cost more than it saves).
Results stream back in order with a bounded number in flight and are written per file, so peak
memory depends on row-group and query sizes, never on dataset size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bagel_core.config.errors import DataError
from bagel_core.config.files import link_or_copy
from bagel_core.config.registry import DatasetEntry, Registry
from bagel_core.index import scan
from bagel_core.index.parquet_info import (
    check_registered_parquet_info,
    parquet_info_dir,
    registry_file,
    registry_with_parquet_info,
    write_parquet_info_files,
)
from bagel_core.index.pool import Pool
from bagel_core.index.schema import (
    COLUMN_TYPE,
    FILE_UNREADABLE,
    FILES_SCHEMA,
    INDEX_SCHEMA,
    MISSING_COLUMN,
    PARQUET_COLUMNS,
    QUARANTINE_SCHEMA,
    IndexOptions,
    arrow_type_name,
    dataset_dir,
    dataset_key,
)
from bagel_core.index.units import IndexRows, Unit


# ---- planning: identity, footer facts, units -------------------------------------------------------
@dataclass
class FileRecord:
    """One row of ``files.parquet`` while it is being built."""

    entry: DatasetEntry
    path: str
    kind: str
    size: int = -1
    mtime_ns: int = -1
    footer_hash: str = ""
    deps_digest: str = ""
    num_row_groups: int = -1
    num_columns: int = -1
    footer_rows: int = -1
    rows_read: int = 0
    ok: int = 0
    quarantined: int = 0
    status: str = "ok"
    error: str | None = None
    reused: bool = False
    part: str = ""
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)
    units: list[Unit] = field(default_factory=list)
    pre_rows: tuple[list[tuple[int, int, int]], tuple[str, str]] | None = None  # (spans, problem): schema error
    written: list[pa.Table] = field(default_factory=list)  # this run's tables, kept while they fit KEEP_ROWS
    in_memory: bool = True  # ``written`` holds all of them (else: read back from the part)
    column_types: dict[str, str] = field(default_factory=dict)  # parquet: arrow_type_name per column
    batches: list[int] = field(default_factory=list)  # record batches of ``part`` with this file's rows


def file_identity(path: str, kind: str) -> tuple[int, int, str]:
    """(size, mtime_ns, footer hash): what decides whether a file must be re-read."""
    st = os.stat(path)
    h = hashlib.sha1()
    with open(path, "rb") as fp:
        if kind == "parquet" and st.st_size >= 12:
            fp.seek(st.st_size - 8)
            tail = fp.read(8)
            footer_len = int.from_bytes(tail[:4], "little")
            if tail[4:] == b"PAR1" and footer_len + 8 <= st.st_size:
                fp.seek(st.st_size - 8 - footer_len)
                h.update(fp.read(footer_len + 8))
                return st.st_size, st.st_mtime_ns, "footer:" + h.hexdigest()
        # no parquet footer (or JSONL): head and tail
        h.update(fp.read(1 << 16))
        fp.seek(max(0, st.st_size - (1 << 16)))
        h.update(fp.read(1 << 16))
    return st.st_size, st.st_mtime_ns, "headtail:" + h.hexdigest()


FooterFacts = tuple[list[tuple[int, int, int]], int, pa.Schema]  # ([(row group, rows, bytes)], rows, schema)


def _footer_facts(path: str) -> FooterFacts | str:
    """Row groups (id, rows, uncompressed bytes), declared rows and schema from one read of the footer,
    or the error that stopped it."""
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
        groups = [
            (i, meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)
        ]
    except Exception as exc:  # noqa: BLE001 - any footer error means the file cannot be opened
        return f"{type(exc).__name__}: {exc}"
    return groups, meta.num_rows, schema


def _plan_parquet(rec: FileRecord, facts: FooterFacts | str, opts: IndexOptions) -> None:
    entry, path = rec.entry, rec.path
    if isinstance(facts, str):
        rec.status, rec.error = "unreadable", f"cannot open parquet footer: {facts}"
        return
    groups, rec.footer_rows, schema = facts
    types = rec.column_types = {f.name: arrow_type_name(f.type) for f in schema}
    rec.num_columns = len(types)
    rec.num_row_groups = len(groups)
    first = 0
    spans: list[tuple[int, int, int]] = []
    sizes: list[int] = []
    for rg_id, num_rows, nbytes in groups:
        spans.append((rg_id, first, num_rows))
        sizes.append(nbytes)
        first += num_rows
    if first != rec.footer_rows:
        rec.error = f"row groups hold {first} rows but the footer declares {rec.footer_rows}"
    expected = PARQUET_COLUMNS[entry.task]
    problem: tuple[str, str] | None = None
    for col, accepted in expected.items():
        if col not in types:
            problem = (
                MISSING_COLUMN,
                (
                    f"column '{col}' is missing (found: {', '.join(types) or 'none'}); "
                    f"a {entry.group} file needs columns {', '.join(expected)}"
                ),
            )
            break
        if types[col] not in accepted:
            problem = (
                COLUMN_TYPE,
                f"column '{col}' has type {types[col]}, expected {' or '.join(accepted)}",
            )
            break
    if problem is not None:
        # Every row is known from the footer: quarantine each one without reading data.
        rec.pre_rows = (spans, problem)
        rec.status = "schema_error"
        rec.error = problem[1]
        return
    run: list[tuple[int, int, int]] = []
    run_sizes: list[int] = []

    def flush() -> None:
        rec.units.append(
            Unit(
                entry.name,
                entry.group,
                entry.task,
                path,
                "parquet",
                tuple(run),
                columns=tuple(expected),
                row_group_bytes=tuple(run_sizes),
            )
        )
        run.clear()
        run_sizes.clear()

    for span, nbytes in zip(spans, sizes):
        if not span[2]:
            continue
        if run and (sum(r[2] for r in run) + span[2] > opts.unit_rows or sum(run_sizes) + nbytes > opts.unit_bytes):
            flush()
        run.append(span)
        run_sizes.append(nbytes)
    if run:
        flush()


def _schema_error_rows(
    rec: FileRecord, spans: list[tuple[int, int, int]], problem: tuple[str, str]
) -> Iterator[pa.Table]:
    """Quarantine every footer-declared row of a file with wrong columns, one row group at a time."""
    entry = rec.entry
    for rg_id, first_row, num_rows in spans:
        rows = IndexRows(Unit(entry.name, entry.group, entry.task, rec.path, "parquet"))
        for r in range(num_rows):
            rows.add_failed(rg_id, r, first_row + r, problem[0], problem[1])
        yield rows.table()


def _plan_jsonl(rec: FileRecord, opts: IndexOptions) -> None:
    """Cut the JSONL into line-aligned byte ranges; count lines so each range knows its first line."""
    entry = rec.entry
    try:
        _scan_jsonl(rec, entry, opts)
    except OSError as exc:
        rec.status, rec.error = "unreadable", f"cannot read JSONL: {exc}"
        rec.units.clear()
    rec.num_row_groups = -1
    rec.num_columns = -1


def _scan_jsonl(rec: FileRecord, entry: DatasetEntry, opts: IndexOptions) -> None:
    last_byte = b""
    with open(rec.path, "rb") as fp:
        start, line, pos = 0, 0, 0
        lines_in_range = 0
        while True:
            block = fp.read(1 << 20)
            if not block:
                break
            last_byte = block[-1:]
            search_from = 0
            while True:
                nl = block.find(b"\n", search_from)
                if nl < 0:
                    break
                lines_in_range += 1
                search_from = nl + 1
                end = pos + nl + 1
                if end - start >= opts.jsonl_chunk_bytes:
                    rec.units.append(_jsonl_unit(entry, rec.path, start, end, line))
                    line += lines_in_range
                    lines_in_range, start = 0, end
            pos += len(block)
        if pos > start:
            rec.units.append(_jsonl_unit(entry, rec.path, start, pos, line))
            tail = 0 if last_byte == b"\n" else 1  # a last line without its newline still counts
        else:
            tail = 0
        rec.footer_rows = line + lines_in_range + tail  # lines in the file: what the index must hold


def _jsonl_unit(entry: DatasetEntry, path: str, start: int, end: int, first_line: int) -> Unit:
    return Unit(
        entry.name,
        entry.group,
        entry.task,
        path,
        "jsonl",
        start=start,
        end=end,
        first_line=first_line,
        data_dir=str(entry.data_dir),
    )


def _deps_digest(image_paths: Iterable[str]) -> str:
    """Digest of the stat of every image a JSONL references (VLM rows depend on those files too)."""
    h = hashlib.sha1()
    for p in sorted(set(image_paths)):
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def _part_image_paths(tables: Iterable[pa.Table]) -> Iterator[str]:
    """Every file a JSONL file's index rows depend on (images and videos)."""
    for table in tables:
        for paths in table.column("image_paths").to_pylist():
            yield from paths
        yield from (v for v in table.column("video_path").to_pylist() if v)


# ---- orchestration ---------------------------------------------------------------------------------
@dataclass
class DatasetSummary:
    """Numbers reported for one dataset (CLI table, Dagster metadata)."""

    dataset: str
    group: str
    task: str
    files: int = 0
    files_reindexed: int = 0
    files_reused: int = 0
    files_unreadable: int = 0
    rows: int = 0
    ok: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0
    image_bytes: int = 0
    scan_accepted: int = 0  # rows the DuckDB scan tier accepted (the rest went through units)
    seconds: float = 0.0
    index_path: str = ""
    quarantine_path: str = ""
    files_path: str = ""
    invariant_ok: bool = True
    invariant_failures: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def unreadable_rows_estimate(self) -> int:
        """Samples lost in files that could not be opened (their row count is unknown): the mean rows of this
        dataset's readable files per unreadable file, at least one each."""
        readable = self.files - self.files_unreadable
        per_file = self.rows / readable if readable > 0 else 1.0
        return self.files_unreadable * max(1, round(per_file))

    @property
    def quarantine_ratio(self) -> float:
        """Quarantined share of the dataset's samples, counting unreadable files at their estimated size (a whole
        file lost would otherwise be invisible: it has no rows in the index)."""
        lost = self.unreadable_rows_estimate
        total = self.rows + lost
        return (self.quarantined + lost) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rows_per_s"] = self.rows_per_s
        d["unreadable_rows_estimate"] = self.unreadable_rows_estimate
        d["quarantine_ratio"] = self.quarantine_ratio
        return d


ProgressFn = Callable[[str, int], None]  # (event, rows): ("rows_total", n) once per dataset, ("rows_done", n)


def _load_previous(files_path: Path) -> dict[str, dict[str, Any]]:
    if not files_path.is_file():
        return {}
    try:
        table = pq.read_table(files_path)
    except Exception:  # noqa: BLE001 - a damaged cache only means re-reading everything
        return {}
    return {row["source_file"]: row for row in table.to_pylist()}


def _can_reuse(rec: FileRecord, prev: dict[str, Any] | None, opts: IndexOptions, parts: _PartReaders) -> bool:
    if prev is None or opts.force:
        return False
    if (prev["size"], prev["mtime_ns"], prev["footer_hash"], prev["options_digest"]) != (
        rec.size,
        rec.mtime_ns,
        rec.footer_hash,
        opts.digest(),
    ):
        return False
    if prev["status"] == "unreadable":
        return True
    part = prev["part"]
    if not part or not Path(part).is_file():
        return False
    return rec.kind != "jsonl" or prev["deps_digest"] == _deps_digest(
        _part_image_paths(parts.tables(part, prev["part_batches"]))
    )


def _files_for(entry: DatasetEntry) -> list[tuple[str, str]]:
    if entry.is_parquet:
        if not entry.data_dir.is_dir():
            raise DataError(
                f"{entry.group}.{entry.name}: data_dir {entry.data_dir} is not a directory; "
                "fix data_dir in the registry"
            )
        files = [(str(p), "parquet") for p in entry.parquet_files()]
        if not files:
            raise DataError(
                f"{entry.group}.{entry.name}: no *.parquet files directly in {entry.data_dir} "
                "(upstream would divide by zero); point data_dir at the folder of shards"
            )
        return files
    if entry.jsonl_path is None:
        raise DataError(f"{entry.group}.{entry.name}: a vlm_sft entry needs 'jsonl_path' in the registry")
    return [(str(entry.jsonl_path), "jsonl")]


def _scan_first(records: list[FileRecord], opts: IndexOptions, run: _RunPart, progress: ProgressFn | None) -> int:
    """First tier (:mod:`scan`): DuckDB queries over the files to index accept the plain rows, which
    go straight to the run's part; each file's units shrink to the row groups holding the rows the
    scan left, and check only those rows. Returns the rows accepted."""
    todo = [
        r
        for r in records
        if r.kind == "parquet"
        and r.units
        and r.pre_rows is None
        and scan.is_literal_path(r.path)
        and all(r.column_types.get(c) == t for c, t in scan.SCANNABLE[r.entry.task].items())
    ]
    if not todo:
        return 0
    accepted = 0
    by_path = {r.path: r for r in todo}
    files = {r.path: [(u.first_row, u.first_row + u.row_span) for u in r.units] for r in todo}
    con = scan.connection(opts.resolved_workers())
    try:
        for path, lo, hi, verdict in scan.scan_files(con, files, todo[0].entry.task, opts.max_pixels):
            if verdict is not None:
                table = _accept_rows(by_path[path], verdict, lo, hi)
                run.add(by_path[path], table)
                accepted += table.num_rows
                pa.default_memory_pool().release_unused()  # keep RSS flat: the allocator retains freed batches
                if progress:
                    progress("rows_done", table.num_rows)
    finally:
        con.close()
    return accepted


def _accept_rows(rec: FileRecord, verdict: scan.FileVerdict, lo: int, hi: int) -> pa.Table:
    """Index rows the scan accepted in file rows ``[lo, hi)``; the units there keep only the rest."""
    inside = [u for u in rec.units if lo <= u.first_row < hi]
    spans = [rg for u in inside for rg in u.row_groups]
    firsts = np.array([f for _, f, _ in spans], np.int64)
    ids = np.array([g for g, _, _ in spans], np.int32)
    accepted = verdict.file_rows[verdict.ok]
    k = np.searchsorted(firsts, accepted, side="right") - 1
    rows = IndexRows(rec.units[0])
    rows.add_fast(
        ids[k],
        firsts[k],
        accepted,
        verdict.counts,
        verdict.width,
        verdict.height,
        verdict.mode,
        verdict.image_bytes,
        verdict.num_texts,
        verdict.text_chars,
    )
    table = rows.table() if len(accepted) else INDEX_SCHEMA.empty_table()
    rec.rows_read += table.num_rows
    rec.ok += table.num_rows
    left = verdict.file_rows[~verdict.ok]
    units = [u for u in rec.units if not lo <= u.first_row < hi]
    for u in inside:
        mine = left[(left >= u.first_row) & (left < u.first_row + u.row_span)]
        if not len(mine):
            continue
        keep = [i for i, (_, first, n) in enumerate(u.row_groups) if ((mine >= first) & (mine < first + n)).any()]
        units.append(
            replace(
                u,
                row_groups=tuple(u.row_groups[i] for i in keep),
                row_group_bytes=tuple(u.row_group_bytes[i] for i in keep) if u.row_group_bytes else (),
                only_rows=tuple(mine.tolist()),
            )
        )
    rec.units = sorted(units, key=lambda u: u.first_row)
    return table


def _plan_files(
    entry: DatasetEntry, previous: dict[str, dict[str, Any]], opts: IndexOptions, parts: _PartReaders
) -> list[FileRecord]:
    """One record per file: identity, reuse decision, and for files to read the units of work."""
    records: list[FileRecord] = []
    for path, kind in _files_for(entry):
        rec = FileRecord(entry=entry, path=path, kind=kind)
        records.append(rec)
        try:
            rec.size, rec.mtime_ns, rec.footer_hash = file_identity(path, kind)
        except OSError as exc:
            rec.status, rec.error = "unreadable", f"cannot open: {exc}"
            continue
        prev = previous.get(path)
        if _can_reuse(rec, prev, opts, parts):
            assert prev is not None
            for key in (
                "deps_digest",
                "num_row_groups",
                "num_columns",
                "footer_rows",
                "rows_read",
                "ok",
                "quarantined",
                "status",
                "error",
                "part",
            ):
                setattr(rec, key, prev[key])
            rec.batches = list(prev["part_batches"] or [])
            rec.reused = True
            continue
        if kind == "jsonl":
            _plan_jsonl(rec, opts)
        else:
            _plan_parquet(rec, _footer_facts(path), opts)
    return records


def _run_units(
    records: list[FileRecord], opts: IndexOptions, pool: Pool | None, run: _RunPart, progress: ProgressFn | None
) -> None:
    """Tiers 2-3 for every unit left, on the pool; their rows go to the run's part as they arrive."""
    units = [u for r in records for u in r.units]
    if not units:
        return
    by_path = {r.path: r for r in records}
    own_pool = pool is None
    pool = pool or Pool(opts.resolved_workers())
    try:
        for unit, table in pool.map(units, opts):
            rec = by_path[unit.path]
            rec.seconds += float((table.schema.metadata or {}).get(b"seconds", b"0"))
            table = table.replace_schema_metadata(None)
            run.add(rec, table)
            ok = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
            rec.rows_read += table.num_rows
            rec.ok += ok
            rec.quarantined += table.num_rows - ok
            if progress:
                progress("rows_done", table.num_rows)
    finally:
        if own_pool:
            pool.close()


class _RunPart:
    """The index rows of one run over a dataset: one Arrow IPC file, record batches per source file.

    ``files.parquet`` lists each file's batches (``part_batches``); a later run that reuses the file
    reads those batches and copies them into its own part, so only the newest part
    is referenced and older ones are deleted. Tables are also kept in memory up to ``KEEP_ROWS``
    rows for the dataset tables, which then need not read them back.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.writer = pa.ipc.new_file(str(path), INDEX_SCHEMA)
        self.batches = 0
        self.kept = 0

    def add(self, rec: FileRecord, table: pa.Table) -> None:
        rec.part = str(self.path)
        for batch in table.to_batches():
            if batch.num_rows:
                self.writer.write_batch(batch)
                rec.batches.append(self.batches)
                self.batches += 1
        if rec.in_memory and self.kept + table.num_rows <= KEEP_ROWS:
            rec.written.append(table)
            self.kept += table.num_rows
        elif rec.in_memory:  # this file is read back from the part: its tables leave memory
            self.kept -= sum(t.num_rows for t in rec.written)
            rec.in_memory, rec.written = False, []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _PartReaders:
    """Open parts, one reader per file however many source files it holds. Batches are read, not
    memory-mapped: mapped pages would count as resident for as long as the part is open, so peak
    RSS would grow with the dataset."""

    def __init__(self) -> None:
        self.readers: dict[str, tuple[pa.OSFile, pa.ipc.RecordBatchFileReader]] = {}

    def tables(self, part: str, batches: Iterable[int]) -> Iterator[pa.Table]:
        if part not in self.readers:
            source = pa.OSFile(part, "rb")
            self.readers[part] = (source, pa.ipc.open_file(source))
        reader = self.readers[part][1]
        for i in batches:
            yield pa.Table.from_batches([reader.get_batch(i)])

    def close(self) -> None:
        for source, _ in self.readers.values():
            source.close()
        self.readers.clear()


def _file_tables(rec: FileRecord, parts: _PartReaders) -> list[pa.Table]:
    """A file's index rows of this run (from memory or the closed part), in file-row order: the scan's
    accepted rows and the units' rows arrive separately and are merged here."""
    tables = rec.written if rec.in_memory else list(parts.tables(rec.part, rec.batches))
    if len(tables) > 1:
        merged = pa.concat_tables(tables)
        rows = merged.column("file_row").to_numpy()
        if not (rows[1:] > rows[:-1]).all():
            return [merged.sort_by("file_row")]
    return tables


def index_dataset(
    entry: DatasetEntry,
    out_dir: str | Path,
    opts: IndexOptions | None = None,
    pool: Pool | None = None,
    progress: ProgressFn | None = None,
) -> DatasetSummary:
    """Index one dataset into ``out_dir/datasets/<group>/<name>/`` (incremental per file)."""
    opts = opts or IndexOptions()
    ddir = dataset_dir(Path(out_dir), entry)
    parts_dir = ddir / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    with open(ddir / ".lock", "w") as lock:  # two runs of one dataset (two Dagster runs) take turns
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _index_dataset_locked(entry, ddir, opts, pool, progress)


def _index_dataset_locked(
    entry: DatasetEntry, ddir: Path, opts: IndexOptions, pool: Pool | None, progress: ProgressFn | None
) -> DatasetSummary:
    t0 = time.perf_counter()
    parts_dir = ddir / "parts"
    previous = {} if opts.force else _load_previous(ddir / "files.parquet")
    summary = DatasetSummary(entry.name, entry.group, entry.task)

    parts = _PartReaders()
    run = _RunPart(parts_dir / f"{time.time_ns():x}-{os.getpid()}.arrow")
    try:
        records = _plan_files(entry, previous, opts, parts)
        if progress:
            progress("rows_total", sum(max(r.footer_rows, 0) for r in records if r.units))
        for rec in records:  # rows known without reading data: reused files, schema errors, empty files
            if rec.reused and rec.status != "unreadable":
                old_part, old_batches, rec.batches = rec.part, rec.batches, []
                for table in parts.tables(old_part, old_batches):
                    run.add(rec, table)
            elif rec.pre_rows is not None:
                for table in _schema_error_rows(rec, *rec.pre_rows):
                    run.add(rec, table)
                rec.rows_read = rec.quarantined = sum(n for _, _, n in rec.pre_rows[0])
            elif rec.status != "unreadable" and not rec.units:
                run.add(rec, INDEX_SCHEMA.empty_table())
        if opts.fast_path and opts.sql_scan and not opts.full_decode:
            summary.scan_accepted = _scan_first(records, opts, run, progress)
        _run_units(records, opts, pool, run, progress)
    finally:
        run.close()

    # accounting per file, from the rows actually written
    for rec in records:
        if rec.status == "unreadable" and not rec.reused:
            rec.rows_read = rec.ok = rec.quarantined = 0
            rec.part, rec.batches = "", []
        elif not rec.reused:  # rows_read / ok / quarantined were counted from the tables written
            if rec.kind == "jsonl":
                rec.deps_digest = _deps_digest(_part_image_paths(_file_tables(rec, parts)))
            if rec.status == "ok" and rec.quarantined == rec.rows_read and rec.rows_read:
                rec.status = "all_quarantined"
        summary.files += 1
        summary.files_reused += int(rec.reused)
        summary.files_reindexed += int(not rec.reused)
        summary.files_unreadable += int(rec.status == "unreadable")
        summary.file_bytes += max(rec.size, 0)
        if rec.footer_rows >= 0 and rec.rows_read != rec.footer_rows:
            declared = "the footer declares" if rec.kind == "parquet" else "the file has lines:"
            summary.invariant_failures.append(f"{rec.path}: {rec.rows_read} rows read, {declared} {rec.footer_rows}")
        if rec.ok + rec.quarantined != rec.rows_read:
            summary.invariant_failures.append(
                f"{rec.path}: ok {rec.ok} + quarantined {rec.quarantined} != {rec.rows_read}"
            )

    counts = _write_dataset_tables(ddir, entry, records, opts, parts)
    parts.close()
    for stale in parts_dir.iterdir():  # earlier runs' parts (reused rows were copied into this one)
        if stale != run.path:
            stale.unlink()
    summary.index_path = str(ddir / "index.parquet")
    summary.quarantine_path = str(ddir / "quarantine.parquet")
    summary.files_path = str(ddir / "files.parquet")
    _fill_counts(summary, counts)
    summary.invariant_ok = not summary.invariant_failures
    summary.seconds = time.perf_counter() - t0
    return summary


def _row_groups(path: str | Path) -> Iterator[pa.Table]:
    """A parquet file one row group at a time (bounded memory: our writers keep row groups small)."""
    pf = pq.ParquetFile(path)
    for i in range(pf.metadata.num_row_groups):
        yield pf.read_row_group(i)


class _BatchedWriter:
    """A parquet writer that merges small tables into row groups of up to ``rows`` rows (fewer, larger
    row groups write and read faster; memory stays bounded by ``rows``). ``on_flush`` sees each
    merged table before it is written (counting per batch, not per small table)."""

    def __init__(
        self,
        path: str | Path,
        schema: pa.Schema,
        rows: int = 16_384,
        on_flush: Callable[[pa.Table], None] | None = None,
    ) -> None:
        self.writer = pq.ParquetWriter(path, schema)
        self.schema, self.rows, self.on_flush = schema, rows, on_flush
        self.pending: list[pa.Table] = []
        self.n = 0

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.pending.append(table)
        self.n += table.num_rows
        if self.n >= self.rows:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            table = pa.concat_tables(self.pending).combine_chunks().cast(self.schema)
            self.pending, self.n = [], 0
            pa.default_memory_pool().release_unused()  # keep RSS flat: the allocator retains freed tables
            if self.on_flush is not None:
                self.on_flush(table)
            self.writer.write_table(table)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.flush()
        finally:
            self.writer.close()


@dataclass
class _Counts:
    """Row counts of a dataset's index, gathered while its tables are written."""

    ok: int = 0
    quarantined: int = 0
    image_bytes: int = 0
    reasons: Counter = field(default_factory=Counter)


#: Index rows of a dataset's freshly indexed files kept in memory to build its tables (bounded memory).
KEEP_ROWS = 16_384


def _write_dataset_tables(
    ddir: Path, entry: DatasetEntry, records: list[FileRecord], opts: IndexOptions, parts: _PartReaders
) -> _Counts:
    """Concatenate parts into the dataset's index/quarantine and write its files table (atomically)."""
    counts = _Counts()
    tmp_index, tmp_quar = ddir / f".index.{os.getpid()}.tmp", ddir / f".quarantine.{os.getpid()}.tmp"
    with _BatchedWriter(tmp_quar, QUARANTINE_SCHEMA) as qw:

        def count(table: pa.Table) -> None:
            status = table.column("status")
            ok = pc.sum(pc.equal(status, "ok")).as_py() or 0
            counts.ok += ok
            counts.quarantined += table.num_rows - ok - status.null_count
            counts.image_bytes += pc.sum(table.column("image_bytes")).as_py() or 0
            quarantined = table.filter(pc.equal(status, "quarantined"))
            if quarantined.num_rows:
                qw.write(quarantined.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA))
                for vc in pc.value_counts(quarantined.column("reason")).to_pylist():
                    counts.reasons[vc["values"]] += vc["counts"]

        with _BatchedWriter(tmp_index, INDEX_SCHEMA, on_flush=count) as iw:
            for rec in records:
                if rec.status == "unreadable":
                    iw.flush()  # quarantine rows stay in file order
                    qw.write(
                        pa.Table.from_pylist(
                            [
                                {
                                    "dataset": entry.name,
                                    "group": entry.group,
                                    "task": entry.task,
                                    "source_file": rec.path,
                                    "row_group": -1,
                                    "row_index": -1,
                                    "file_row": -1,
                                    "reason": FILE_UNREADABLE,
                                    "message": rec.error or "file cannot be opened",
                                }
                            ],
                            schema=QUARANTINE_SCHEMA,
                        )
                    )
                    counts.reasons[FILE_UNREADABLE] += 1
                    continue
                for table in _file_tables(rec, parts):
                    iw.write(table)
    os.replace(tmp_index, ddir / "index.parquet")
    os.replace(tmp_quar, ddir / "quarantine.parquet")
    digest = opts.digest()
    rows = [
        {
            "dataset": entry.name,
            "group": entry.group,
            "task": entry.task,
            "source_file": r.path,
            "kind": r.kind,
            "size": r.size,
            "mtime_ns": r.mtime_ns,
            "footer_hash": r.footer_hash,
            "deps_digest": r.deps_digest,
            "options_digest": digest,
            "num_row_groups": r.num_row_groups,
            "num_columns": r.num_columns,
            "footer_rows": r.footer_rows,
            "rows_read": r.rows_read,
            "ok": r.ok,
            "quarantined": r.quarantined,
            "status": r.status,
            "error": r.error,
            "reused": r.reused,
            "part": r.part,
            "part_batches": r.batches,
            "seconds": r.seconds,
        }
        for r in records
    ]
    tmp_files = ddir / f".files.{os.getpid()}.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=FILES_SCHEMA), tmp_files)
    os.replace(tmp_files, ddir / "files.parquet")
    return counts


def _fill_counts(summary: DatasetSummary, counts: _Counts) -> None:
    summary.ok, summary.quarantined, summary.image_bytes = counts.ok, counts.quarantined, counts.image_bytes
    summary.rows = summary.ok + summary.quarantined
    summary.reasons = {str(r): int(n) for r, n in sorted(counts.reasons.items(), key=lambda kv: (-kv[1], str(kv[0])))}


@dataclass
class IndexResult:
    """What :func:`index_registry` produced."""

    out_dir: Path
    datasets: list[DatasetSummary]
    index_path: Path
    quarantine_path: Path
    files_path: Path
    parquet_info: dict[str, Path]
    registry: Registry  # the registry updated with the generated parquet_info and the indexed counts
    registry_path: Path | None  # the registry file updated in place (None: the registry has no YAML file)
    seconds: float
    parquet_info_problems: dict[str, list[str]] = field(default_factory=dict)  # registered JSON vs index

    @property
    def rows(self) -> int:
        return sum(d.rows for d in self.datasets)

    @property
    def quarantined(self) -> int:
        return sum(d.quarantined for d in self.datasets)


def index_registry(
    registry: Registry,
    out_dir: str | Path,
    opts: IndexOptions | None = None,
    datasets: Iterable[str] | None = None,
    progress: ProgressFn | None = None,
) -> IndexResult:
    """Index the selected datasets (default: all), then rebuild the combined outputs for all indexed ones.

    ``datasets`` holds registry names or ``group.name`` keys. Datasets not selected keep their previous
    per-dataset outputs, so one Dagster partition can re-index one dataset and still refresh the union.
    """
    opts = opts or IndexOptions()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(datasets) if datasets is not None else None
    selected = [e for e in registry.entries if wanted is None or e.name in wanted or dataset_key(e) in wanted]
    if wanted is not None:
        known = {e.name for e in registry.entries} | {dataset_key(e) for e in registry.entries}
        unknown = sorted(wanted - known)
        if unknown:
            raise DataError(f"unknown dataset(s) {unknown}; registered: {', '.join(registry.names())}")
    summaries = []
    rows_total = 0
    with Pool(opts.resolved_workers()) as pool:
        if _estimated_rows(selected, scanned=opts.fast_path and opts.sql_scan) >= opts.min_rows_for_pool:
            pool.start()
        for entry in selected:

            def _progress(event: str, n: int) -> None:
                nonlocal rows_total
                if progress is None:
                    return
                if event == "rows_total":
                    rows_total += n
                    progress("rows_total", rows_total)
                else:
                    progress(event, n)

            summaries.append(index_dataset(entry, out, opts, pool, _progress if progress else None))
    with _output_lock(out):
        combined = combine(registry, out)
        problems = check_registered_parquet_info(registry, out)
        infos = write_parquet_info_files(registry, out, parquet_info_dir(registry, out))
        updated = registry_with_parquet_info(registry, infos, _registry_counts(combined["files"]))
        reg_path = registry_file(registry)
        if reg_path is not None:
            updated.save(reg_path)
    return IndexResult(
        out,
        summaries,
        combined["index"],
        combined["quarantine"],
        combined["files"],
        infos,
        updated,
        reg_path,
        time.perf_counter() - t0,
        problems,
    )


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Serialise the combined outputs and the registry update between concurrent partition runs."""
    with open(out / ".combine.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _registry_counts(files_path: Path) -> dict[str, tuple[int, int]]:
    """``group.name`` -> (files, samples in them) from the combined files table."""
    out: dict[str, tuple[int, int]] = {}
    for row in pq.read_table(files_path, columns=["group", "dataset", "rows_read"]).to_pylist():
        key = f"{row['group']}.{row['dataset']}"
        files, rows = out.get(key, (0, 0))
        out[key] = (files + 1, rows + row["rows_read"])
    return out


def _estimated_rows(entries: list[DatasetEntry], scanned: bool) -> int:
    """Cheap guess of the unit work ahead from file sizes (a row ~ 4 KB of parquet or 256 B of JSONL),
    to start the process pool early. With the scan tier on, parquet rows are left out: only what the
    scan leaves becomes units, and ``Pool.map`` decides on that."""
    total = 0
    for e in entries:
        try:
            if e.is_parquet and not scanned:
                total += sum(p.stat().st_size for p in e.parquet_files()) // 4096
            elif e.jsonl_path is not None and e.jsonl_path.is_file():
                total += e.jsonl_path.stat().st_size // 256
        except OSError:
            continue
    return total


def combine(registry: Registry, out_dir: str | Path) -> dict[str, Path]:
    """Union of the per-dataset tables (registry order) into ``out_dir/{index,quarantine,files}.parquet``.

    Written under temporary names; the caller holds ``_output_lock``, so concurrent per-dataset runs
    (Dagster partitions in parallel) never leave a torn file and the last one includes every dataset.
    """
    out = Path(out_dir)
    result: dict[str, Path] = {}
    for name, schema in (("index", INDEX_SCHEMA), ("quarantine", QUARANTINE_SCHEMA), ("files", FILES_SCHEMA)):
        tmp = out / f".{name}.parquet.{os.getpid()}.tmp"
        sources = [p for e in registry.entries if (p := dataset_dir(out, e) / f"{name}.parquet").is_file()]
        if len(sources) == 1 and pq.read_schema(sources[0]).equals(schema):
            link_or_copy(sources[0], tmp)  # the union of one table is that table
        else:
            with _BatchedWriter(tmp, schema) as writer:
                for src in sources:
                    for table in _row_groups(src):
                        writer.write(table.cast(schema))
        os.replace(tmp, out / f"{name}.parquet")
        result[name] = out / f"{name}.parquet"
    return result


def clear_dataset(out_dir: str | Path, entry: DatasetEntry) -> None:
    """Forget everything indexed for a dataset (next run re-reads every file)."""
    shutil.rmtree(dataset_dir(Path(out_dir), entry), ignore_errors=True)
