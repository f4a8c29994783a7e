"""``bagel data latents``: encode every VAE image of the registered data once, with the run's frozen VAE.

    bagel data latents --registry R --index I --dataset-config D --out DIR \\
        [--model-path BAGEL-7B-MoT | --model-preset tiny --global-seed 4396] [--workers N] [--device cuda]

The VAE is built exactly as the trainer builds it from the same arguments (``--model_path``'s
``ae.safetensors``, or the preset's random VAE seeded by ``--global_seed``), so the cache's VAE hash
matches the training run's; then ``--latent_cache DIR`` makes the trainer use it. Writes
``DIR/latents.json`` and ``DIR/shards/`` (format in :mod:`bagel_core.loader.latent_cache`); a second
run keeps every shard whose source file is unchanged, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bagel_core.model.autoencoder import AutoEncoder


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``latents`` on the ``bagel data`` sub-parsers."""
    p = subparsers.add_parser(
        "latents",
        help="encode every VAE image once with the frozen VAE (the training's latent cache)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--registry", required=True, help="dataset registry YAML (checked against the dataset config)")
    p.add_argument("--index", required=True, help="index directory (index.parquet) or file: its ok rows are encoded")
    p.add_argument("--dataset-config", required=True, help="dataset-group YAML: each group's image transform")
    p.add_argument("--out", required=True, help="cache folder (created; resumed when it holds a matching cache)")
    p.add_argument("--model-path", default="", help="BAGEL model directory whose ae.safetensors the training uses")
    p.add_argument("--model-preset", default="tiny", help="without --model-path: the preset of the random VAE")
    p.add_argument("--global-seed", type=int, default=4396, help="without --model-path: the training's global_seed")
    p.add_argument("--workers", type=int, default=1, help="processes encoding files in parallel (CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the VAE then runs in bf16, as in training)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_latents)
    return p


def training_vae(model_path: str, model_preset: str, global_seed: int, device: str = "cpu") -> AutoEncoder:
    """The VAE a training run with these arguments builds (same resolution of paths, same seed, same dtype)."""
    import torch

    from bagel_core.train.args import parse_args
    from bagel_core.train.build import build_vae, model_config, plan_weights

    argv = ["--model_preset", model_preset, "--global_seed", str(global_seed)]
    if model_path:
        argv += ["--model_path", model_path]
    cfg = parse_args(argv, world_size=1, local_world_size=1)
    plan = plan_weights(cfg)
    return build_vae(plan, model_config(cfg, plan), torch.device(device), global_seed)


def run_latents(args: argparse.Namespace) -> int:
    from bagel_core.config.dataset_config import load_dataset_config
    from bagel_core.config.registry import Registry
    from bagel_core.loader.latent_cache import build_latent_cache

    if args.workers < 1:
        print(f"error: --workers {args.workers} must be >= 1", file=sys.stderr)
        return 2
    config = load_dataset_config(args.dataset_config)
    config.check_against(Registry.load(args.registry))
    vae = training_vae(args.model_path, args.model_preset, args.global_seed, args.device)
    result = build_latent_cache(vae, config, args.index, args.out, workers=args.workers, progress=not args.quiet)
    print(result.summary())
    for line in result.rejected[:20]:
        print(f"  rejected: {line}", file=sys.stderr)
    return 0
