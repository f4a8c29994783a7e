"""``bagel data stats`` and ``bagel data plan``: token statistics, sampling manifest, packing simulation.

``add_parser(subparsers)`` registers both commands on the ``bagel data`` sub-parsers (each with a
``func`` that takes the parsed namespace and returns an exit code). Also runnable on its own:
``python -m bagel_core.index.stats_cli stats ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.errors import ConfigError, DataError
from bagel_core.config.registry import Registry
from bagel_core.data.packing import CfgDropout, PackingParams
from bagel_core.data.tokens import DEFAULT_MAX_LATENT_SIZE
from bagel_core.index.manifest import (
    ManifestCapacityError,
    build_manifest,
    format_manifest_table,
    format_packing_table,
    simulate_packing,
    write_manifest,
    write_simulation,
)
from bagel_core.index.token_stats import (
    DEFAULT_MAX_TOKENS_PER_SAMPLE,
    STATS_FILE,
    compute_token_stats,
    format_summary_table,
    over_cap_rows,
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help="dataset registry YAML (upstream DATASET_INFO fields)")
    parser.add_argument("--dataset-config", required=True, help="dataset-group YAML (upstream example.yaml)")
    parser.add_argument("--index", required=True, help="index directory (index.parquet) or file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: bundled Qwen2.5)")
    parser.add_argument("--max-latent-size", type=int, default=DEFAULT_MAX_LATENT_SIZE)


def _packing_args(parser: argparse.ArgumentParser) -> None:
    defaults = PackingParams()
    parser.add_argument("--expected-num-tokens", type=int, default=defaults.expected_num_tokens)
    parser.add_argument("--max-num-tokens", type=int, default=defaults.max_num_tokens)
    parser.add_argument("--max-num-tokens-per-sample", type=int, default=defaults.max_num_tokens_per_sample)
    parser.add_argument("--prefer-buffer-before", type=int, default=defaults.prefer_buffer_before)
    parser.add_argument("--max-buffer-size", type=int, default=defaults.max_buffer_size)
    dropout = CfgDropout()
    parser.add_argument("--cfg-text-dropout", type=float, default=dropout.text,
                        help="simulated CFG drop probability of text items (0 disables)")
    parser.add_argument("--cfg-vit-dropout", type=float, default=dropout.vit)
    parser.add_argument("--cfg-vae-dropout", type=float, default=dropout.vae)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``stats`` and ``plan`` on the ``bagel data`` sub-parsers."""
    stats = subparsers.add_parser("stats", help="exact token statistics per sample (token_stats.parquet)")
    _common(stats)
    stats.add_argument("--max-num-tokens-per-sample", type=int, default=DEFAULT_MAX_TOKENS_PER_SAMPLE)
    stats.add_argument("--batch-size", type=int, default=2048, help="samples tokenised per batch")
    stats.set_defaults(func=run_stats)

    plan = subparsers.add_parser("plan", help="per-rank/worker sampling manifest + packing simulation")
    _common(plan)
    plan.add_argument("--world-size", type=int, required=True)
    plan.add_argument("--num-workers", type=int, required=True)
    plan.add_argument("--seed", type=int, default=42, help="data_seed of the training run")
    plan.add_argument("--stats", default=None,
                      help="directory with token_stats.parquet (default: --out; computed there when missing)")
    plan.add_argument("--no-simulation", action="store_true", help="write the manifest only")
    _packing_args(plan)
    plan.set_defaults(func=run_plan)


def _load(args: argparse.Namespace):
    return Registry.load(args.registry), load_dataset_config(args.dataset_config)


def _backend(path: str | None):
    from bagel_core.data.tokenizer import load_tokenizer

    return load_tokenizer(path)[0].backend_tokenizer


def run_stats(args: argparse.Namespace) -> int:
    """Compute and print the statistics; exit 1 on configuration/data errors."""
    try:
        registry, config = _load(args)
        result = compute_token_stats(
            registry, config, args.index, args.out, _backend(args.tokenizer),
            max_num_tokens_per_sample=args.max_num_tokens_per_sample, max_latent_size=args.max_latent_size,
            batch_size=args.batch_size,
        )
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary_table(result.summary))
    print(f"\ncounted {result.num_counted} samples in {result.seconds:.1f}s "
          f"({result.num_counted / max(result.seconds, 1e-9):.0f} samples/s); skipped {result.num_skipped} "
          f"{result.skipped_reasons or ''}; quarantined in index {result.num_quarantined}; "
          f"not in dataset config {result.num_not_configured}")
    if result.num_over_cap or result.num_latent_overflow or result.num_vit_overflow:
        print(f"\n{result.num_over_cap} sample(s) over max_num_tokens_per_sample {args.max_num_tokens_per_sample}, "
              f"{result.num_latent_overflow} over max_latent_size {args.max_latent_size}, "
              f"{result.num_vit_overflow} over 70 ViT patches per side; first 20:")
        print(over_cap_rows(pl.read_parquet(result.stats_path), 20))
    print(f"\nwrote {result.stats_path}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """Build and write the manifest; refuse (exit 2) when a worker would get no data; simulate packing."""
    try:
        registry, config = _load(args)
        manifest = build_manifest(config, registry, args.world_size, args.num_workers, args.seed, strict=True)
    except ManifestCapacityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    parquet_path, json_path = write_manifest(manifest, args.out)
    print(format_manifest_table(manifest))
    print(f"wrote {parquet_path} and {json_path}")
    if args.no_simulation:
        return 0
    stats_dir = Path(args.stats or args.out)
    try:
        if not (stats_dir / STATS_FILE).is_file():
            print(f"no {STATS_FILE} in {stats_dir}: computing statistics first")
            compute_token_stats(registry, config, args.index, stats_dir, _backend(args.tokenizer),
                                max_num_tokens_per_sample=args.max_num_tokens_per_sample,
                                max_latent_size=args.max_latent_size)
        params = PackingParams(args.expected_num_tokens, args.max_num_tokens, args.max_num_tokens_per_sample,
                               args.prefer_buffer_before, args.max_buffer_size)
        dropout = CfgDropout(args.cfg_text_dropout, args.cfg_vit_dropout, args.cfg_vae_dropout)
        report = simulate_packing(manifest, config, pl.read_parquet(stats_dir / STATS_FILE), params,
                                  dropout=dropout)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_packing_table(report))
    print(f"wrote {write_simulation(report, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagel data")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
