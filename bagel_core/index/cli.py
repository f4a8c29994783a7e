"""``bagel data index``: validate and index every registered dataset from the command line.

    bagel data index --registry REGISTRY.yaml --out DIR [--dataset NAME ...] [--workers N]

writes ``DIR/index.parquet``, ``DIR/quarantine.parquet``, ``DIR/files.parquet`` and the generated
``parquet_info/<name>.json`` beside REGISTRY.yaml, and updates REGISTRY.yaml in place (edit entries
point at the generated JSON; sizes are the indexed counts), with a progress bar on stderr and a
summary table on stdout. Exit status: 0 when every file's
accounting holds and the quarantine ratio is within ``--max-quarantine-ratio``, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bagel_core.index.indexer import IndexResult


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``index`` on the sub-parsers of ``bagel data``."""
    p = subparsers.add_parser(
        "index",
        help="validate and index every sample (DuckDB); quarantine bad ones; generate parquet_info",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--registry", required=True, help="dataset registry YAML (upstream DATASET_INFO fields)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        metavar="NAME",
        help="index only this dataset (name or group.name; repeatable); others keep earlier results",
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all usable CPUs)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="declared width*height above which an image is quarantined (decompression bombs; "
        "default: the indexer's cap, 200,000,000)",
    )
    p.add_argument("--full-decode", action="store_true", help="decode every image instead of header probes")
    p.add_argument("--force", action="store_true", help="re-read every file even if its identity is unchanged")
    p.add_argument(
        "--max-quarantine-ratio",
        type=float,
        default=None,
        help="exit 1 when quarantined/rows exceeds this for any dataset",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from bagel_core.config.registry import Registry
    from bagel_core.index.indexer import IndexOptions, index_registry

    registry = Registry.load(args.registry)
    caps = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
    opts = IndexOptions(full_decode=args.full_decode, workers=args.workers, force=args.force, **caps)
    bar = None
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="row", unit_scale=True, desc="indexing", file=sys.stderr, dynamic_ncols=True)

        def progress(event: str, n: int) -> None:
            if event == "rows_total":
                bar.total = n
                bar.refresh()
            else:
                bar.update(n)

    try:
        result = index_registry(registry, Path(args.out), opts, datasets=args.dataset, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(summary_table(result))
    for key, problems in result.parquet_info_problems.items():
        print(
            f"warning: {key}: the registered parquet_info disagrees with the shards "
            f"({len(problems)} problem(s)); {args.registry} now points at the generated one",
            file=sys.stderr,
        )
        for problem in problems[:10]:
            print(f"  {problem}", file=sys.stderr)
    failed = False
    for s in result.datasets:
        for failure in s.invariant_failures:
            print(f"error: accounting: {failure}", file=sys.stderr)
            failed = True
        ratio = s.quarantine_ratio
        if args.max_quarantine_ratio is not None and ratio > args.max_quarantine_ratio:
            print(
                f"error: {s.group}/{s.dataset}: quarantine ratio {ratio:.2%} exceeds "
                f"{args.max_quarantine_ratio:.2%}; see {result.quarantine_path}",
                file=sys.stderr,
            )
            failed = True
    return 1 if failed else 0


def summary_table(result: IndexResult) -> str:
    """Plain-text table: one line per dataset indexed in this run, then the output paths."""
    header = (
        f"{'group/dataset':<34} {'files':>5} {'reread':>6} {'rows':>9} {'ok':>9} {'quar.':>7} "
        f"{'MB':>8} {'rows/s':>9}  top reasons"
    )
    lines = [header, "-" * len(header)]
    for s in result.datasets:
        top = ", ".join(f"{k}={v}" for k, v in list(s.reasons.items())[:3]) or "-"
        lines.append(
            f"{s.group + '/' + s.dataset:<34} {s.files:>5} {s.files_reindexed:>6} {s.rows:>9,} {s.ok:>9,} "
            f"{s.quarantined:>7,} {s.file_bytes / 1e6:>8.1f} {s.rows_per_s:>9,.0f}  {top}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<34} {sum(s.files for s in result.datasets):>5} "
        f"{sum(s.files_reindexed for s in result.datasets):>6} {result.rows:>9,} "
        f"{result.rows - result.quarantined:>9,} {result.quarantined:>7,}   in {result.seconds:.1f} s"
    )
    lines.append(f"index       {result.index_path}")
    lines.append(f"quarantine  {result.quarantine_path}")
    for key, path in result.parquet_info.items():
        lines.append(f"parquet_info {key}: {path}")
    if result.registry_path is not None:
        lines.append(f"registry    {result.registry_path}")
    return "\n".join(lines)
