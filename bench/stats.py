"""Throughput of the token statistics vs a bare ``tokenizers`` batch call over the same texts.

Generates (once, cached in ``--dir``) an example dataset of at least ``--rows`` samples with the
project's generator, indexes it with the project's indexer, then times in the same process:

1. ``compute_token_stats`` end to end (read texts from parquet/JSONL, list every variant's texts,
   tokenise in batches, count every variant, write parquet + summary) -> samples/s;
2. ``Tokenizer.encode_batch(..., add_special_tokens=False)`` over exactly the texts step 1 sent to
   the tokenizer, in the same batches -> the floor set by tokenisation alone (the reference of the
   target: the statistics should run at >= half this rate); ``encode_batch_fast`` (no character
   offsets; what the statistics call when the tokenizer has it) is timed the same way, for context.

Usage: ``python bench/stats.py [--rows 20000] [--dir /tmp/bagel-bench-stats] [--repeat 3]``.
``encode_batch`` uses every core unless ``RAYON_NUM_THREADS`` / ``TOKENIZERS_PARALLELISM`` say otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bagel_core.config.discover import default_dataset_config, discover_registry
from bagel_core.data.example_generator import ExampleConfig, write_example_dataset
from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.index.indexer import index_registry
from bagel_core.stats.token_stats import compute_token_stats

#: Target of issue #13 item 5: end-to-end statistics at >= this fraction of the bare encode_batch rate.
TARGET_RATIO = 0.5


class RecordingBackend:
    """Delegates to the real tokenizer and remembers every batch it was asked to encode (either method)."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.batches: list[list[str]] = []

    def encode_batch(self, texts, add_special_tokens=False):
        self.batches.append(list(texts))
        return self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)

    def encode_batch_fast(self, texts, add_special_tokens=False):
        self.batches.append(list(texts))
        return self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


def prepare(root: Path, rows: int) -> tuple[Path, Path, Path]:
    """Example data of >= ``rows`` samples (half T2I, a quarter edit, a quarter VLM), registry, index."""
    t2i_per_file = max(1, rows // 2 // 10)
    edit_per_rg = max(1, rows // 4 // (10 * 10))
    vlm_lines = max(1, rows - 10 * t2i_per_file - 10 * 10 * edit_per_rg)
    config = ExampleConfig(
        t2i_files=10,
        t2i_rows_per_file=t2i_per_file,
        t2i_rows_per_row_group=100,
        edit_files=10,
        edit_row_groups_per_file=10,
        edit_rows_per_row_group=edit_per_rg,
        vlm_lines=vlm_lines,
        seed=1,
    )
    marker = root / f"ready-{config.t2i_samples + config.edit_samples + vlm_lines}"
    registry_path, groups_path, index_dir = root / "dataset_info.yaml", root / "groups.yaml", root / "index"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t0 = time.perf_counter()
        write_example_dataset(root / "data", config)
        registry = discover_registry(root / "data", parquet_info_dir=root / "parquet_info")
        registry.source = registry_path
        registry.save(registry_path)
        default_dataset_config(registry).save(groups_path)
        print(
            f"generated {config.t2i_samples + config.edit_samples + vlm_lines} samples in "
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        t0 = time.perf_counter()
        result = index_registry(registry, index_dir)
        print(f"indexed in {time.perf_counter() - t0:.0f}s -> {result.index_path}", flush=True)
        marker.touch()
    return registry_path, groups_path, index_dir  # the index updated the registry in place


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dir", default="/tmp/bagel-bench-stats")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2048)
    args = parser.parse_args()

    from bagel_core.config.dataset_config import load_dataset_config
    from bagel_core.config.registry import Registry

    registry_path, groups_path, index_dir = prepare(Path(args.dir), args.rows)
    registry, config = Registry.load(registry_path), load_dataset_config(groups_path)
    backend = load_tokenizer()[0].backend_tokenizer
    print(
        f"cpus available: {len(os.sched_getaffinity(0))}, RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS')}, "
        f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}"
    )

    stats_times, bare_times, fast_times = [], [], []
    recorder = RecordingBackend(backend)
    result = None
    for _ in range(args.repeat):
        recorder.batches.clear()
        t0 = time.perf_counter()
        result = compute_token_stats(
            registry, config, index_dir, Path(args.dir) / "stats", recorder, batch_size=args.batch_size
        )
        stats_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for batch in recorder.batches:
            backend.encode_batch(batch, add_special_tokens=False)
        bare_times.append(time.perf_counter() - t0)
        if hasattr(backend, "encode_batch_fast"):
            t0 = time.perf_counter()
            for batch in recorder.batches:
                backend.encode_batch_fast(batch, add_special_tokens=False)
            fast_times.append(time.perf_counter() - t0)
    assert result is not None
    samples = result.num_counted + result.num_skipped
    texts = sum(len(b) for b in recorder.batches)
    chars = sum(len(t) for b in recorder.batches for t in b)
    best_stats, best_bare = min(stats_times), min(bare_times)
    print(
        f"\nsamples: {samples} counted+skipped ({result.num_counted} counted), distinct texts tokenised per run: "
        f"{texts} ({chars / 1e6:.1f} M chars) in {len(recorder.batches)} tokenizer calls"
    )
    print(f"{'':<40} {'best s':>8} {'samples/s':>11} {'texts/s':>10}")
    print(
        f"{'token statistics (end to end)':<40} {best_stats:>8.2f} {samples / best_stats:>11.0f} "
        f"{texts / best_stats:>10.0f}"
    )
    print(
        f"{'bare tokenizers encode_batch, same texts':<40} {best_bare:>8.2f} {samples / best_bare:>11.0f} "
        f"{texts / best_bare:>10.0f}"
    )
    if fast_times:
        best_fast = min(fast_times)
        print(
            f"{'bare encode_batch_fast, same texts':<40} {best_fast:>8.2f} {samples / best_fast:>11.0f} "
            f"{texts / best_fast:>10.0f}"
        )
    print(
        f"statistics time beyond bare encode_batch: {best_stats - best_bare:.2f}s "
        f"({(best_stats - best_bare) / best_stats:.0%} of the statistics run); all runs: stats "
        f"{[round(t, 2) for t in stats_times]}, bare {[round(t, 2) for t in bare_times]}"
        + (f", fast {[round(t, 2) for t in fast_times]}" if fast_times else "")
    )
    ratio = best_bare / best_stats  # = (samples/s of the statistics) / (samples/s of bare encode_batch)
    print(
        f"statistics / bare encode_batch rate: {ratio:.2f} (target >= {TARGET_RATIO}: "
        f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})"
        + (f"; statistics / bare encode_batch_fast rate: {min(fast_times) / best_stats:.2f}" if fast_times else "")
    )


if __name__ == "__main__":
    main()
