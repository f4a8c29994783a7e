"""``bagel data stats``: exact token statistics per sample (``token_stats.parquet``) and their summary.

The parser is built from light imports only; the statistics code (polars, pyarrow, the tokenizer)
is imported inside the command, so ``bagel --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bagel_core.sequence.tokens import DEFAULT_MAX_LATENT_SIZE, DEFAULT_MAX_TOKENS_PER_SAMPLE


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``bagel data stats`` and ``bagel data plan``."""
    parser.add_argument("--registry", required=True, help="dataset registry YAML (upstream DATASET_INFO fields)")
    parser.add_argument("--dataset-config", required=True, help="dataset-group YAML (upstream example.yaml)")
    parser.add_argument("--index", required=True, help="index directory (index.parquet) or file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: bundled Qwen2.5)")
    parser.add_argument("--max-latent-size", type=int, default=DEFAULT_MAX_LATENT_SIZE)


def tokenizer_backend(path: str | None) -> Any:
    """The fast tokenizer (bundled Qwen2.5 unless ``path`` names a folder) the statistics use."""
    from bagel_core.data.tokenizer import load_tokenizer

    return load_tokenizer(path)[0].backend_tokenizer


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``stats`` on the ``bagel data`` sub-parsers."""
    stats = subparsers.add_parser("stats", help="exact token statistics per sample (token_stats.parquet)")
    add_input_arguments(stats)
    stats.add_argument("--max-num-tokens-per-sample", type=int, default=DEFAULT_MAX_TOKENS_PER_SAMPLE)
    stats.add_argument("--batch-size", type=int, default=2048, help="samples tokenised per batch")
    stats.set_defaults(func=run_stats)
    return stats


def run_stats(args: argparse.Namespace) -> int:
    """Compute and print the statistics; exit 1 on configuration/data errors."""
    import polars as pl

    from bagel_core.config.dataset_config import load_dataset_config
    from bagel_core.config.errors import ConfigError, DataError
    from bagel_core.config.registry import Registry
    from bagel_core.stats.token_stats import compute_token_stats, format_summary_table, over_cap_rows

    try:
        registry, config = Registry.load(args.registry), load_dataset_config(args.dataset_config)
        result = compute_token_stats(
            registry,
            config,
            args.index,
            args.out,
            tokenizer_backend(args.tokenizer),
            max_num_tokens_per_sample=args.max_num_tokens_per_sample,
            max_latent_size=args.max_latent_size,
            batch_size=args.batch_size,
        )
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary_table(result.summary))
    print(
        f"\ncounted {result.num_counted} samples in {result.seconds:.1f}s "
        f"({result.num_counted / max(result.seconds, 1e-9):.0f} samples/s); skipped {result.num_skipped} "
        f"{result.skipped_reasons or ''}; quarantined in index {result.num_quarantined}; "
        f"not in dataset config {result.num_not_configured}"
    )
    if result.num_over_cap or result.num_latent_overflow or result.num_vit_overflow:
        print(
            f"\n{result.num_over_cap} sample(s) over max_num_tokens_per_sample {args.max_num_tokens_per_sample}, "
            f"{result.num_latent_overflow} over max_latent_size {args.max_latent_size}, "
            f"{result.num_vit_overflow} over 70 ViT patches per side; first 20:"
        )
        print(over_cap_rows(pl.read_parquet(result.stats_path), 20))
    print(f"\nwrote {result.stats_path}")
    return 0
