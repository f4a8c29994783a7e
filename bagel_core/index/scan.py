"""First tier of the indexer: DuckDB scans over a dataset's parquet shards accept the plain rows.

Why: a raw DuckDB scan of the T2I example reads ~1.5 M rows/s on two cores, while Arrow decoding
the same columns into this process costs ~4x that before a single check runs, and checking texts
in Python costs as much again. Here DuckDB decodes the pages on every core and reduces each row to
a few hundred bytes: the first :data:`HEAD_BYTES` and last 8 bytes of every image (enough for
:func:`bulk.probe_heads`: PNG IHDR + IEND, the JPEG marker walk up to SOFn, EOI) and, for the texts,
the ``(num_texts, text_chars)`` the per-row checks would compute, or NULL where the SQL below cannot
decide exactly.

Like :mod:`bulk`, this tier only *accepts*. A row is accepted only when :mod:`checks` would return
the same sizes, modes, byte and text counts with no problem; every other row (and every row of a
file DuckDB refuses: invalid UTF-8, a corrupt page, ...) goes to the next tiers, so reasons and
messages of bad input never depend on this tier. Captions are read with DuckDB's JSON functions
(yyjson), accepted only where that reader and ``json.loads`` provably agree:

* valid JSON whose last token is a string member closing the object (DuckDB's reader allows a
  trailing comma, Python's does not; yyjson rejects lone surrogate escapes, Python keeps them: such
  rows simply are not accepted here);
* keys distinct (``json.loads`` keeps the last duplicate, the count would differ), all values
  strings, one of them not blank by Python's ``str.isspace``;
* ``num_texts`` = keys, ``text_chars`` = code points of the decoded values (surrogate pairs are one
  code point in both readers).

Editing rows: list lengths, null and blank phrasings as :func:`checks.check_edit`, per phrasing.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import pairwise

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bagel_core.index import bulk

#: Leading bytes of each image handed to the header probe (the JPEG walk must reach SOFn within them).
HEAD_BYTES = 512
#: Rows per Arrow batch handed to numpy.
BATCH_ROWS = 8_192
#: Rows per DuckDB query: small files are scanned together up to this many rows, bigger ones in row
#: ranges of about this size. The tier's peak memory follows the rows per query, not the dataset
#: (T2I example, this tier alone: +50 MB at 20k rows, +60 MB at 80k, +66 MB at 320k: allocator
#: high-water, a few MB per 4x data); smaller queries cost more per row (8k rows/query ~25 % slower
#: than 32k, one more query ~5 ms).
QUERY_ROWS = 24_576

# Python's whitespace (str.isspace / str.strip) as an RE2 class: a string matching it is not blank.
# (every such code point is below U+3001; a test checks the whole range)
PY_SPACE = tuple(c for c in range(0x3001) if chr(c).isspace())
_NON_SPACE = "[^" + "".join(f"\\x{{{c:x}}}" for c in PY_SPACE) + "]"
#: A JSON text whose last token is a string closing an object: no trailing comma (DuckDB's JSON reader
#: accepts ``{"a": "b",}``, Python's does not). Only the last 16 characters are looked at.
_ENDS_WITH_STRING_MEMBER = r'"[ \t\n\r]*\}[ \t\n\r]*$'


def is_literal_path(path: str) -> bool:
    """False for paths DuckDB's ``read_parquet`` would expand as a glob (``a[1].parquet`` reads
    ``a1.parquet``): those files are read by Arrow only."""
    return not any(c in path for c in "*?[]{}")


def sql_literal(text: str) -> str:
    """A SQL string literal (DuckDB keeps backslashes literally)."""
    return "'" + text.replace("'", "''") + "'"


def _t2i_sql(source: str, first_row: int) -> str:
    return f"""
WITH s AS NOT MATERIALIZED (
  SELECT CASE WHEN file_row_number = {first_row} THEN filename END AS f, file_row_number AS r, image,
         CASE WHEN json_valid(captions) AND regexp_matches(right(captions, 16), {sql_literal(_ENDS_WITH_STRING_MEMBER)})
              THEN captions END AS c
  FROM {source}),
j AS NOT MATERIALIZED (SELECT f, r, image, json_keys(c) AS keys, json_type(c, '$.*') AS types,
             array_to_string(json_extract_string(c, '$.*'), '') AS joined FROM s)
SELECT f, r, octet_length(image) AS n, image[1:{HEAD_BYTES}] AS head, image[-8:] AS tail,
  CASE WHEN len(keys) >= 1 AND len(list_distinct(keys)) = len(keys) AND list_unique(types) = 1
        AND types[1] = 'VARCHAR' AND regexp_matches(joined, {sql_literal(_NON_SPACE)}) THEN len(keys) END AS num_texts,
  length(joined) AS text_chars
FROM j"""


def _edit_sql(source: str, first_row: int) -> str:
    return f"""
SELECT CASE WHEN file_row_number = {first_row} THEN filename END AS f, file_row_number AS r,
  list_transform(image_list, lambda b: octet_length(b)) AS n,
  list_transform(image_list, lambda b: b[1:{HEAD_BYTES}]) AS head,
  list_transform(image_list, lambda b: b[-8:]) AS tail,
  CASE WHEN len(image_list) >= 2 AND len(instruction_list) = len(image_list) - 1
        AND list_bool_and(list_transform(instruction_list, lambda alts: coalesce(
              len(alts) >= 1 AND list_count(alts) = len(alts)
              AND list_bool_or(list_transform(alts, lambda t: regexp_matches(t, {sql_literal(_NON_SPACE)}))), false)))
       THEN list_sum(list_transform(instruction_list, lambda alts: len(alts)))::BIGINT END AS num_texts,
  list_sum(list_transform(instruction_list, lambda alts: list_sum(list_transform(alts, lambda t: length(t)))))::BIGINT
    AS text_chars
FROM {source}"""


_SQL = {"t2i": _t2i_sql, "edit": _edit_sql}
#: Column types (``schema.arrow_type_name``) this tier reads; files typed otherwise go to the per-row path.
SCANNABLE = {
    "t2i": {"image": "binary", "captions": "string"},
    "edit": {"image_list": "list<binary>", "instruction_list": "list<list<string>>"},
}


@dataclass
class FileVerdict:
    """This tier's verdict on every row of one file or row range (what it accepted, and their index
    values); also used for the part of a batch that belongs to one file (``path`` empty)."""

    path: str
    file_rows: np.ndarray  # int64, every row in order
    ok: np.ndarray  # bool per row: accepted here
    counts: np.ndarray  # int32 per accepted row: images
    width: np.ndarray  # int32 per image of the accepted rows, in row order
    height: np.ndarray
    mode: np.ndarray  # int8 code into bulk.MODES
    image_bytes: np.ndarray  # int64 per accepted row
    num_texts: np.ndarray  # int64 per accepted row
    text_chars: np.ndarray  # int64 per accepted row


def _ints(arr: pa.Array, dtype: type = np.int64) -> np.ndarray:
    return np.asarray(arr.fill_null(-1).to_numpy(zero_copy_only=False), dtype)


def _verdicts(batch: pa.RecordBatch, task: str, max_pixels: int) -> FileVerdict:
    """Accept/leave per row of a batch, plus the index values of the accepted rows."""
    rows = _ints(batch.column("r"))
    num_texts = _ints(batch.column("num_texts"))
    text_chars = _ints(batch.column("text_chars"))
    if task == "t2i":
        nbytes = _ints(batch.column("n"))
        images = bulk.probe_heads(batch.column("head"), batch.column("tail"), nbytes, max_pixels)
        ok = images.ok & (num_texts >= 1)
        counts = np.ones(len(rows), np.int32)
        per_row_bytes = nbytes
        child = np.flatnonzero(ok)
    else:
        head, tail, n = batch.column("head"), batch.column("tail"), batch.column("n")
        counts = _ints(pc.list_value_length(head), np.int32)
        nbytes = _ints(pc.list_flatten(n))
        images = bulk.probe_heads(pc.list_flatten(head), pc.list_flatten(tail), nbytes, max_pixels)
        ends = np.cumsum(np.maximum(counts, 0), dtype=np.int64)
        starts = ends - np.maximum(counts, 0)
        all_ok, per_row_bytes = bulk.list_rows(images, starts, ends)
        ok = (counts >= 2) & all_ok & (num_texts >= 1)
        sel = np.flatnonzero(ok)
        child = bulk.flat_indices(starts[sel], counts[sel])
    return FileVerdict(
        "",
        rows,
        ok,
        counts[ok],
        images.width[child],
        images.height[child],
        images.mode[child],
        per_row_bytes[ok],
        num_texts[ok],
        text_chars[ok],
    )


def _finish(path: str, chunks: list[FileVerdict]) -> FileVerdict:
    if len(chunks) == 1:
        return replace(chunks[0], path=path)

    def cat(name: str, dtype: type) -> np.ndarray:
        parts = [getattr(c, name) for c in chunks]
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    return FileVerdict(
        path,
        cat("file_rows", np.int64),
        cat("ok", bool),
        cat("counts", np.int32),
        cat("width", np.int32),
        cat("height", np.int32),
        cat("mode", np.int8),
        cat("image_bytes", np.int64),
        cat("num_texts", np.int64),
        cat("text_chars", np.int64),
    )


def _rebatched(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    """DuckDB's batches (one per row group or vector) merged to ~BATCH_ROWS rows: numpy's per-call cost
    is paid per merged batch, not per 2,048 rows."""
    pending: list[pa.RecordBatch] = []
    size = 0
    for batch in reader:
        if batch.num_rows:
            pending.append(batch)
            size += batch.num_rows
        if size >= BATCH_ROWS:
            yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
            pending, size = [], 0
    if pending:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _stream(
    con: duckdb.DuckDBPyConnection,
    paths: list[str],
    task: str,
    max_pixels: int,
    first_row: int = 0,
    end_row: int | None = None,
) -> Iterator[FileVerdict]:
    """Verdicts per file, in ``paths`` order, from one query (one path: optionally rows
    ``[first_row, end_row)`` only, pruned by row group).

    DuckDB keeps the scan's order; the query names the file only on its first row, and every other
    row must continue its predecessor (row number + 1), so a reordered result is an error, never a
    row credited to the wrong file.
    """
    source = "read_parquet([" + ", ".join(sql_literal(p) for p in paths) + "], filename=true, file_row_number=true)"
    if end_row is not None:
        source += f" WHERE file_row_number >= {first_row} AND file_row_number < {end_row}"
    position = {p: i for i, p in enumerate(paths)}
    current, last_row, chunks = -1, -1, []
    for batch in _rebatched(con.sql(_SQL[task](source, first_row)).to_arrow_reader(BATCH_ROWS)):
        rows = _ints(batch.column("r"))
        names = batch.column("f")
        starts = np.asarray(names.is_valid().to_numpy(zero_copy_only=False), bool)
        previous = np.concatenate([[last_row], rows[:-1]])
        new_files = [position.get(str(v), -1) for v in names.drop_null().to_pylist()]
        if (
            not (starts | (rows == previous + 1)).all()
            or (starts & (rows != first_row)).any()
            or (np.diff([current, *new_files]) <= 0).any()
        ):
            raise RuntimeError("DuckDB returned rows out of file order")
        seg = np.cumsum(starts) - 1
        which = np.where(seg >= 0, np.asarray(new_files + [0], np.int64)[np.maximum(seg, 0)], current)
        chunk = _verdicts(batch, task, max_pixels)
        for k, piece in _per_file(chunk, which):
            if k != current:
                if current >= 0:
                    yield _finish(paths[current], chunks)
                current, chunks = k, []
            chunks.append(piece)
        last_row = int(rows[-1])
    if current >= 0:
        yield _finish(paths[current], chunks)


def _per_file(chunk: FileVerdict, which: np.ndarray) -> Iterator[tuple[int, FileVerdict]]:
    """Split a batch's verdict into its files' pieces: ``which`` (file per row) is non-decreasing, so
    each piece is a run of rows, of accepted rows and of their images: views, no copies."""
    bounds = [0, *(np.flatnonzero(np.diff(which)) + 1).tolist(), len(which)]
    ok_cum = np.concatenate([[0], np.cumsum(chunk.ok)])
    image_cum = np.concatenate([[0], np.cumsum(chunk.counts, dtype=np.int64)])
    for a, b in pairwise(bounds):
        oa, ob = int(ok_cum[a]), int(ok_cum[b])
        ia, ib = int(image_cum[oa]), int(image_cum[ob])
        yield (
            int(which[a]),
            FileVerdict(
                "",
                chunk.file_rows[a:b],
                chunk.ok[a:b],
                chunk.counts[oa:ob],
                chunk.width[ia:ib],
                chunk.height[ia:ib],
                chunk.mode[ia:ib],
                chunk.image_bytes[oa:ob],
                chunk.num_texts[oa:ob],
                chunk.text_chars[oa:ob],
            ),
        )


Scanned = tuple[str, int, int, FileVerdict | None]  # (path, first row, end row, verdict)


def scan_files(
    con: duckdb.DuckDBPyConnection,
    files: dict[str, list[tuple[int, int]]],
    task: str,
    max_pixels: int,
    query_rows: int = QUERY_ROWS,
) -> Iterator[Scanned]:
    """Verdicts for ``files`` (path -> the row ranges its units cover, ascending and contiguous), in
    order, as ``(path, first_row, end_row, verdict)``; each range is whole units. The verdict is None
    where DuckDB cannot read the rows or returns another number of them (the per-row path then reads
    them and names the problem).

    Small files share a query (up to ``query_rows`` rows); a bigger file is scanned in ranges of
    whole units of about ``query_rows`` rows. A multi-file query that fails part-way is retried one
    file at a time for the files it had not finished, so one bad shard costs only itself.
    """
    group: list[str] = []
    group_rows = 0
    for path, ranges in files.items():
        if not ranges:
            continue
        rows = ranges[-1][1] - ranges[0][0]
        if group and group_rows + rows > query_rows:
            yield from _scan_whole(con, group, files, task, max_pixels)
            group, group_rows = [], 0
        if rows <= query_rows:
            group.append(path)
            group_rows += rows
            continue
        lo = ranges[0][0]
        for k, (_, hi) in enumerate(ranges):
            if k + 1 == len(ranges) or ranges[k + 1][1] - lo > query_rows:
                yield from _scan_range(con, path, lo, hi, task, max_pixels)
                lo = hi
    if group:
        yield from _scan_whole(con, group, files, task, max_pixels)


def _expected(files: dict[str, list[tuple[int, int]]], path: str) -> tuple[int, int]:
    return files[path][0][0], files[path][-1][1]


def _scan_range(
    con: duckdb.DuckDBPyConnection, path: str, lo: int, hi: int, task: str, max_pixels: int
) -> Iterator[Scanned]:
    try:
        verdicts = list(_stream(con, [path], task, max_pixels, lo, hi))
    except _SCAN_ERRORS:
        verdicts = []
    ok = len(verdicts) == 1 and verdicts[0].file_rows.tolist() == list(range(lo, hi))
    yield path, lo, hi, verdicts[0] if ok else None


def _scan_whole(
    con: duckdb.DuckDBPyConnection,
    paths: list[str],
    files: dict[str, list[tuple[int, int]]],
    task: str,
    max_pixels: int,
) -> Iterator[Scanned]:
    if len(paths) == 1 or any(_expected(files, p)[0] != 0 for p in paths):
        for p in paths:
            yield from _scan_range(con, p, *_expected(files, p), task, max_pixels)
        return
    done: set[str] = set()
    try:
        for verdict in _stream(con, paths, task, max_pixels):
            lo, hi = _expected(files, verdict.path)
            done.add(verdict.path)
            yield verdict.path, lo, hi, verdict if len(verdict.file_rows) == hi - lo else None
    except _SCAN_ERRORS:
        pass
    for p in paths:  # not finished (the query failed part-way) or not returned at all: alone
        if p not in done:
            yield from _scan_range(con, p, *_expected(files, p), task, max_pixels)


#: Reader and order errors (DuckDB's reader errors surface as OSError through Arrow's stream).
_SCAN_ERRORS = (duckdb.Error, RuntimeError, pa.ArrowException, OSError)


_CONNECTIONS: dict[tuple[int, int], duckdb.DuckDBPyConnection] = {}
_CONNECTIONS_LOCK = threading.Lock()


def connection(threads: int) -> duckdb.DuckDBPyConnection:
    """A cursor (thread-safe, ~0.1 ms; close it after use) on this process's cached database with
    ``threads`` threads (connecting costs ~15-20 ms; raising ``threads`` on an existing
    single-threaded database measured ~25 % slower than a database created with them)."""
    key = (os.getpid(), threads)
    with _CONNECTIONS_LOCK:
        if key not in _CONNECTIONS:
            _CONNECTIONS[key] = duckdb.connect(config={"threads": threads})
        return _CONNECTIONS[key].cursor()


@atexit.register
def _close_connections() -> None:
    """Close the cached databases before interpreter shutdown (else DuckDB's bindings report leaks)."""
    with _CONNECTIONS_LOCK:
        for key in list(_CONNECTIONS):
            _CONNECTIONS.pop(key).close()
