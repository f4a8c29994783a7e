"""``bagel data plan``: the sampling manifest (which units each rank and worker reads) and the packing
simulation over the token statistics (computed first when missing).

The parser is built from light imports only; polars and the planning code are imported inside the
command, so ``bagel --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bagel_core.plan.packing import PACKING_MODES, CfgDropout, PackingParams
from bagel_core.stats.cli import add_input_arguments, tokenizer_backend


def add_packing_arguments(parser: argparse.ArgumentParser) -> None:
    """The packer's knobs (upstream defaults) and the simulated CFG dropout."""
    defaults = PackingParams()
    parser.add_argument("--expected-num-tokens", type=int, default=defaults.expected_num_tokens)
    parser.add_argument("--max-num-tokens", type=int, default=defaults.max_num_tokens)
    parser.add_argument("--max-num-tokens-per-sample", type=int, default=defaults.max_num_tokens_per_sample)
    parser.add_argument("--prefer-buffer-before", type=int, default=defaults.prefer_buffer_before)
    parser.add_argument("--max-buffer-size", type=int, default=defaults.max_buffer_size)
    parser.add_argument(
        "--packing",
        choices=PACKING_MODES,
        default=defaults.mode,
        help="carry (default): a sample that does not fit opens the next pack; upstream: it is discarded, "
        "exactly as upstream (use the trainer's --packing value)",
    )
    dropout = CfgDropout()
    parser.add_argument(
        "--cfg-text-dropout",
        type=float,
        default=dropout.text,
        help="simulated CFG drop probability of text items (0 disables)",
    )
    parser.add_argument("--cfg-vit-dropout", type=float, default=dropout.vit)
    parser.add_argument("--cfg-vae-dropout", type=float, default=dropout.vae)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plan`` on the ``bagel data`` sub-parsers."""
    plan = subparsers.add_parser("plan", help="per-rank/worker sampling manifest + packing simulation")
    add_input_arguments(plan)
    plan.add_argument("--world-size", type=int, required=True)
    plan.add_argument("--num-workers", type=int, required=True)
    plan.add_argument("--seed", type=int, default=42, help="data_seed of the training run")
    plan.add_argument(
        "--stats", default=None, help="directory with token_stats.parquet (default: --out; computed there when missing)"
    )
    plan.add_argument("--no-simulation", action="store_true", help="write the manifest only")
    add_packing_arguments(plan)
    plan.set_defaults(func=run_plan)
    return plan


def run_plan(args: argparse.Namespace) -> int:
    """Build and write the manifest; refuse (exit 2) when a worker would get no data; simulate packing."""
    import polars as pl

    from bagel_core.config.dataset_config import load_dataset_config
    from bagel_core.config.errors import ConfigError, DataError
    from bagel_core.config.registry import Registry
    from bagel_core.plan.manifest import (
        ManifestCapacityError,
        build_manifest,
        format_manifest_table,
        format_packing_table,
        simulate_packing,
        write_manifest,
        write_simulation,
    )
    from bagel_core.stats.token_stats import STATS_FILE, compute_token_stats

    try:
        registry, config = Registry.load(args.registry), load_dataset_config(args.dataset_config)
        manifest = build_manifest(
            config,
            registry,
            args.world_size,
            args.num_workers,
            args.seed,
            strict=True,
            packing=args.packing,
            index=args.index,
        )
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
            compute_token_stats(
                registry,
                config,
                args.index,
                stats_dir,
                tokenizer_backend(args.tokenizer),
                max_num_tokens_per_sample=args.max_num_tokens_per_sample,
                max_latent_size=args.max_latent_size,
            )
        params = PackingParams(
            args.expected_num_tokens,
            args.max_num_tokens,
            args.max_num_tokens_per_sample,
            args.prefer_buffer_before,
            args.max_buffer_size,
            args.packing,
        )
        dropout = CfgDropout(args.cfg_text_dropout, args.cfg_vit_dropout, args.cfg_vae_dropout)
        report = simulate_packing(manifest, config, pl.read_parquet(stats_dir / STATS_FILE), params, dropout=dropout)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_packing_table(report))
    print(f"wrote {write_simulation(report, args.out)}")
    return 0
