"""Indexer throughput vs the raw DuckDB scan ceiling, and peak memory at 1x and 4x the data.

    .venv/bin/python bench/index.py [--rows 20000] [--data DIR] [--workers 2]

Data: the built-in example generator's T2I part scaled to ``--rows`` rows (generated once under
``--data`` and reused); 4x is the same shards hard-linked four times under new names.

Printed side by side, in one run, on the same files (warm page cache for both):

* raw ceiling: ``SELECT count(*), sum(octet_length(image))`` with DuckDB on all cores;
* the scan tier's SQL alone (``bagel_core.index.scan``: image head/tail slices and the caption JSON
  checks, exported to Arrow): the DuckDB share of the checks, a floor for any end-to-end figure;
* indexer: ``index_registry`` (``force=True``: every file re-read), full validation per sample,
  end to end (planning, checks, parts, dataset and combined tables, parquet_info, registry); best
  of 3 runs in one fresh process, like the raw scan's best of 3 warm runs (first run in the JSON);
* the same on photo-sized images (~150 KB noise JPEGs), where reading the bytes dominates;
* peak RSS of the indexer (main process and largest worker) in a fresh process at 1x and 4x:
  memory must not grow with dataset size (the scan tier queries at most ``scan.QUERY_ROWS`` rows at
  a time; units stream per row group; results per file).

The scan tier accepts every row of this data, so no units run: "RSS worker" is 0. (Units, for the
rows the scan leaves, run as threads below ``min_rows_for_pool`` rows, else on a process pool.)
Timings vary run to run on a shared machine: run it a few times and take the median.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _ensure_data(data: Path, rows: int) -> tuple[Path, Path]:
    """(1x T2I dir, 4x T2I dir); generated with the example generator, cached by row count."""
    from bagel_core.data.example_generator import ExampleConfig, write_example_dataset

    one, four = data / f"t2i_{rows}", data / f"t2i_{rows}_x4"
    marker = one / ".complete"
    if not marker.exists():
        shutil.rmtree(data / "gen", ignore_errors=True)
        files = 20
        cfg = ExampleConfig(
            t2i_files=files,
            t2i_rows_per_file=-(-rows // files),
            t2i_rows_per_row_group=250,
            edit_files=1,
            edit_row_groups_per_file=1,
            edit_rows_per_row_group=1,
            vlm_lines=1,
        )
        t0 = time.perf_counter()
        root = write_example_dataset(data / "gen", cfg)
        shutil.rmtree(one, ignore_errors=True)
        shutil.copytree(root / "t2i", one)
        marker.write_text(json.dumps({"rows": cfg.t2i_samples}))
        print(f"generated {cfg.t2i_samples:,} T2I rows in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if not (four / ".complete").exists():
        shutil.rmtree(four, ignore_errors=True)
        four.mkdir(parents=True)
        for copy in range(4):
            for src in sorted(one.glob("*.parquet")):
                os.link(src, four / f"x{copy}_{src.name}")
        (four / ".complete").write_text("")
    return one, four


def _ensure_photo_like(data: Path, rows: int) -> Path:
    """T2I shards of photo-sized images (noise JPEGs, ~100 KB like real training images), cached."""
    import io
    import json as _json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out = data / f"t2i_photo_{rows}"
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_file = 500
    for f in range(-(-rows // per_file)):
        images, captions = [], []
        for i in range(min(per_file, rows - f * per_file)):
            w, h = (512, 384) if i % 2 else (384, 512)
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
            images.append(buf.getvalue())
            captions.append(_json.dumps({"short": f"photo {f}-{i}", "long": f"a noisy photo number {i}"}))
        table = pa.table({"image": pa.array(images, pa.binary()), "captions": pa.array(captions, pa.string())})
        pq.write_table(table, out / f"chunk_{f}.parquet", row_group_size=100)
    (out / ".complete").write_text("")
    return out


def _registry_yaml(t2i_dir: Path, path: Path) -> Path:
    from bagel_core.config.registry import Registry

    Registry.from_dict({"t2i_pretrain": {"t2i": {"data_dir": str(t2i_dir)}}}).save(path)
    return path


def raw_scan(t2i_dir: Path, threads: int) -> tuple[int, int, float]:
    import duckdb

    con = duckdb.connect(config={"threads": threads})
    q = f"SELECT count(*), sum(octet_length(image)) FROM read_parquet('{t2i_dir}/*.parquet')"
    con.sql(q).fetchall()  # warm the page cache
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        n, nbytes = con.sql(q).fetchall()[0]
        best = min(best, time.perf_counter() - t0)
    return int(n), int(nbytes), best


def scan_floor(t2i_dir: Path, threads: int) -> float:
    """The scan tier's DuckDB query alone (image head/tail + caption JSON checks, into Arrow; no
    Python): the least per-row work DuckDB can do for the checks, whatever surrounds it."""
    import duckdb

    from bagel_core.index import scan

    files = sorted(str(p) for p in t2i_dir.glob("*.parquet"))
    source = "read_parquet([" + ", ".join(f"'{p}'" for p in files) + "], filename=true, file_row_number=true)"
    q = scan._t2i_sql(source, 0)
    con = duckdb.connect(config={"threads": threads})
    con.sql(q).to_arrow_table()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        con.sql(q).to_arrow_table()
        best = min(best, time.perf_counter() - t0)
    con.close()
    return best


class _RssSampler:
    """Peak RSS of this process and of its descendants (pool workers, fork server), sampled from /proc."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_total = self.peak_worker = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _status(pid: int) -> tuple[float, float]:
        """(current RSS, peak RSS) of a process in MB."""
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return (int(fields.get("VmRSS", "0 kB").split()[0]) / 1024, int(fields.get("VmHWM", "0 kB").split()[0]) / 1024)

    @classmethod
    def _tree(cls) -> dict[int, tuple[float, float]]:
        """pid -> (current RSS, peak RSS) in MB for this process and its descendants.

        Walks ``/proc/<pid>/task/<tid>/children`` from this process down (a few small reads), not
        all of ``/proc``: the sampler runs in the indexer's process and must not compete with it.
        """
        out: dict[int, tuple[float, float]] = {}
        todo = [os.getpid()]
        while todo:
            pid = todo.pop()
            try:
                out[pid] = cls._status(pid)
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as fh:
                        todo.extend(int(c) for c in fh.read().split())
            except (OSError, ValueError):
                continue
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            tree = self._tree()
            workers = [peak for pid, (_, peak) in tree.items() if pid != os.getpid()]
            self.peak_total = max(self.peak_total, sum(now for now, _ in tree.values()))
            self.peak_worker = max([self.peak_worker, *workers])
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _own_peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _child(registry: str, out: str, workers: int, repeats: int) -> None:
    """Run the indexer ``repeats`` times in this fresh process and print JSON figures (used for RSS)."""
    from bagel_core.config.registry import Registry
    from bagel_core.index.indexer import IndexOptions, index_registry

    reg = Registry.load(registry)
    with _RssSampler() as sampler:
        times = []
        for _ in range(repeats):  # like the raw scan: warm runs, best time (the first run is reported too)
            t0 = time.perf_counter()
            result = index_registry(reg, out, IndexOptions(workers=workers, force=True))
            times.append(time.perf_counter() - t0)
    s = result.datasets[0]
    print(
        json.dumps(
            {
                "rows": s.rows,
                "ok": s.ok,
                "quarantined": s.quarantined,
                "seconds": min(times),
                "first_seconds": times[0],
                "index_seconds": s.seconds,
                "rss_main_mb": _own_peak_mb(),  # VmHWM: ru_maxrss would include the parent's RSS from before exec
                "rss_worker_mb": sampler.peak_worker,
                "rss_total_mb": sampler.peak_total,
            }
        )
    )


def _run_child(registry: Path, out: Path, workers: int, repeats: int = 3) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(registry), str(out), str(workers), str(repeats)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def parallel_calibration(workers: int) -> float:
    """Speed-up of a pure-CPU task on ``workers`` processes right now (shared machines vary)."""
    from concurrent.futures import ProcessPoolExecutor

    n = 3_000_000
    t0 = time.perf_counter()
    for _ in range(workers):
        _spin(n)
    serial = time.perf_counter() - t0
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_spin, [1] * workers))
        t0 = time.perf_counter()
        list(ex.map(_spin, [n] * workers))
        parallel = time.perf_counter() - t0
    return serial / parallel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--data", default="/tmp/bagel_bench_index")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument(
        "--photo-rows", type=int, default=8000, help="also compare on photo-sized (~100 KB) images; 0 to skip"
    )
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return

    workers = args.workers or len(os.sched_getaffinity(0))
    data = Path(args.data)
    one, four = _ensure_data(data, args.rows)
    reg1 = _registry_yaml(one, data / "registry_1x.yaml")
    reg4 = _registry_yaml(four, data / "registry_4x.yaml")

    speedup = parallel_calibration(workers)
    n_raw, raw_bytes, raw_s = raw_scan(one, workers)
    n_raw4, _, raw4_s = raw_scan(four, workers)
    floor_s = scan_floor(one, workers)
    r1 = _run_child(reg1, data / "out_1x", workers)
    r1_serial = _run_child(reg1, data / "out_1x_serial", 1)
    r4 = _run_child(reg4, data / "out_4x", workers)
    assert r1["rows"] == n_raw and r4["rows"] == n_raw4, "indexer and raw scan disagree on the row count"

    def rate(n: int, s: float) -> str:
        return f"{n / s:>12,.0f}"

    print(
        f"T2I example scaled: {n_raw:,} rows, {raw_bytes / 1e6:,.1f} MB of image bytes, "
        f"{len(list(one.glob('*.parquet')))} files; {workers} worker(s) on {os.cpu_count()} CPUs; "
        f"pure-CPU speed-up on {workers} processes right now: {speedup:.2f}x (load {os.getloadavg()[0]:.1f})"
    )
    print(
        f"{'':<34}{'rows':>10}{'seconds':>10}{'rows/s':>13}{'x raw':>8}{'RSS main MB':>13}"
        f"{'RSS worker MB':>15}{'RSS tree MB':>13}"
    )
    print(f"{'raw DuckDB scan 1x':<34}{n_raw:>10,}{raw_s:>10.3f}{rate(n_raw, raw_s)}{1.0:>8.1f}")
    print(
        f"{'scan tier SQL alone 1x':<34}{n_raw:>10,}{floor_s:>10.3f}{rate(n_raw, floor_s)}{floor_s / raw_s:>8.1f}"
        "   (DuckDB part of the checks, no Python: the floor)"
    )
    print(
        f"{'indexer 1x (' + str(workers) + ' workers)':<34}{r1['rows']:>10,}{r1['seconds']:>10.3f}"
        f"{rate(r1['rows'], r1['seconds'])}{r1['seconds'] / raw_s:>8.1f}{r1['rss_main_mb']:>13.0f}"
        f"{r1['rss_worker_mb']:>15.0f}{r1['rss_total_mb']:>13.0f}"
    )
    print(
        f"{'indexer 1x (1 worker)':<34}{r1_serial['rows']:>10,}{r1_serial['seconds']:>10.3f}"
        f"{rate(r1_serial['rows'], r1_serial['seconds'])}{r1_serial['seconds'] / raw_s:>8.1f}"
        f"{r1_serial['rss_main_mb']:>13.0f}{r1_serial['rss_worker_mb']:>15.0f}{r1_serial['rss_total_mb']:>13.0f}"
    )
    print(f"{'raw DuckDB scan 4x':<34}{n_raw4:>10,}{raw4_s:>10.3f}{rate(n_raw4, raw4_s)}{1.0:>8.1f}")
    print(
        f"{'indexer 4x (' + str(workers) + ' workers)':<34}{r4['rows']:>10,}{r4['seconds']:>10.3f}"
        f"{rate(r4['rows'], r4['seconds'])}{r4['seconds'] / raw4_s:>8.1f}{r4['rss_main_mb']:>13.0f}"
        f"{r4['rss_worker_mb']:>15.0f}{r4['rss_total_mb']:>13.0f}"
    )
    if args.photo_rows:
        photo = _ensure_photo_like(data, args.photo_rows)
        n_p, p_bytes, p_raw = raw_scan(photo, workers)
        rp = _run_child(_registry_yaml(photo, data / "registry_photo.yaml"), data / "out_photo", workers)
        print(
            f"{'raw DuckDB scan, photo-sized':<34}{n_p:>10,}{p_raw:>10.3f}{rate(n_p, p_raw)}{1.0:>8.1f}"
            f"   ({p_bytes / 1e6:,.0f} MB of images, {p_bytes / n_p / 1e3:.0f} KB each)"
        )
        print(
            f"{'indexer, photo-sized':<34}{rp['rows']:>10,}{rp['seconds']:>10.3f}{rate(rp['rows'], rp['seconds'])}"
            f"{rp['seconds'] / p_raw:>8.1f}{rp['rss_main_mb']:>13.0f}{rp['rss_worker_mb']:>15.0f}"
            f"{rp['rss_total_mb']:>13.0f}"
        )
    print(
        f"peak RSS growth 1x -> 4x: main {r4['rss_main_mb'] - r1['rss_main_mb']:+.0f} MB, "
        f"worker {r4['rss_worker_mb'] - r1['rss_worker_mb']:+.0f} MB, "
        f"whole tree {r4['rss_total_mb'] - r1['rss_total_mb']:+.0f} MB "
        f"(target: flat); indexing cost {r1['seconds'] / raw_s:.1f}x raw (target <= 3x; the scan tier's SQL "
        f"alone is {floor_s / raw_s:.1f}x)"
    )


if __name__ == "__main__":
    main()
