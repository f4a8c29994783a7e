"""Summaries of an index for people: image-size distribution and sample, duplicate keys.

Kept out of the indexer's hot path; returns plain data that the Dagster asset turns into tables and
figures (``assets/presentation.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb

from bagel_core.index.scan import sql_literal

#: Long-edge buckets (pixels) of the size table; BAGEL resizes to 512..1024 (VAE) / 378..980 (ViT).
SIZE_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("< 256", 0, 256),
    ("256-511", 256, 512),
    ("512-1023", 512, 1024),
    ("1024-2047", 1024, 2048),
    (">= 2048", 2048, 1 << 62),
)


def _sources(paths: Sequence[str | Path]) -> str:
    quoted = ", ".join(sql_literal(str(p)) for p in paths)
    return f"read_parquet([{quoted}])"


def _sizes_sql(paths: Sequence[str | Path]) -> str:
    return (
        f"SELECT s[1] AS w, s[2] AS h FROM (SELECT unnest(image_sizes) AS s FROM {_sources(paths)} "
        "WHERE status = 'ok') WHERE s[1] > 0"
    )


def image_size_distribution(index_paths: Sequence[str | Path]) -> dict[str, object]:
    """Counts per long-edge bucket, the most common exact sizes, and pixel statistics of ok images."""
    paths = [p for p in index_paths if Path(p).is_file()]
    empty: dict[str, object] = {
        "images": 0,
        "buckets": {b[0]: 0 for b in SIZE_BUCKETS},
        "top_sizes": [],
        "megapixels": {},
    }
    if not paths:
        return empty
    con = duckdb.connect(config={"threads": 1})
    try:
        sizes = _sizes_sql(paths)
        total = con.sql(f"SELECT count(*) FROM ({sizes})").fetchall()[0][0]
        if not total:
            return empty
        buckets = {
            label: con.sql(
                f"SELECT count(*) FROM ({sizes}) WHERE greatest(w, h) >= {lo} AND greatest(w, h) < {hi}"
            ).fetchall()[0][0]
            for label, lo, hi in SIZE_BUCKETS
        }
        top = con.sql(
            f"SELECT w, h, count(*) AS n FROM ({sizes}) GROUP BY w, h ORDER BY n DESC, w, h LIMIT 10"
        ).fetchall()
        stats = con.sql(f"SELECT min(w*h), quantile_cont(w*h, 0.5), max(w*h), avg(w*h) FROM ({sizes})").fetchall()[0]
    finally:
        con.close()
    return {
        "images": int(total),
        "buckets": {k: int(v) for k, v in buckets.items()},
        "top_sizes": [{"width": int(w), "height": int(h), "count": int(n)} for w, h, n in top],
        "megapixels": {
            "min": stats[0] / 1e6,
            "median": float(stats[1]) / 1e6,
            "max": stats[2] / 1e6,
            "mean": float(stats[3]) / 1e6,
        },
    }


def image_size_sample(index_paths: Sequence[str | Path], max_points: int = 20000) -> list[tuple[int, int]]:
    """Up to ``max_points`` (width, height) pairs of ok images, a repeatable reservoir sample (for plots)."""
    paths = [p for p in index_paths if Path(p).is_file()]
    if not paths:
        return []
    con = duckdb.connect(config={"threads": 1})
    try:
        sql = f"SELECT w, h FROM ({_sizes_sql(paths)}) USING SAMPLE reservoir({max_points} ROWS) REPEATABLE (42)"
        return [(int(w), int(h)) for w, h in con.sql(sql).fetchall()]
    finally:
        con.close()


def duplicate_keys(index_paths: Sequence[str | Path], limit: int = 10) -> tuple[int, list[tuple]]:
    """(number of duplicated sample keys, examples); a key is (dataset, source_file, file_row)."""
    paths = [p for p in index_paths if Path(p).is_file()]
    if not paths:
        return 0, []
    con = duckdb.connect(config={"threads": 1})
    try:
        dup = (
            f"SELECT dataset, source_file, file_row, count(*) AS n FROM {_sources(paths)} "
            "GROUP BY ALL HAVING count(*) > 1"
        )
        dup2 = (
            f"SELECT dataset, source_file, row_group, row_index, count(*) AS n FROM {_sources(paths)} "
            "GROUP BY ALL HAVING count(*) > 1"
        )
        n = con.sql(f"SELECT count(*) FROM ({dup})").fetchall()[0][0]
        n += con.sql(f"SELECT count(*) FROM ({dup2})").fetchall()[0][0]
        examples = con.sql(f"{dup} ORDER BY 1, 2, 3 LIMIT {limit}").fetchall()
    finally:
        con.close()
    return int(n), examples
