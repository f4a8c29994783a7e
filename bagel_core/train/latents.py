"""``bagel data latents``: encode the VAE images of the registered data once, with the run's frozen VAE.

    bagel data latents --registry R --index I --dataset-config D --out DIR \\
        [--model-path BAGEL-7B-MoT | --model-preset tiny --global-seed 4396] [--workers N] [--device cuda]
        [--for-training "<training arguments>" --world-size W [--steps N]]

The VAE is built exactly as the trainer builds it from the same arguments (``--model_path``'s
``ae.safetensors``, or the preset's random VAE seeded by ``--global_seed``), so the cache's VAE hash
matches the training run's; then ``--latent_cache DIR`` makes the trainer use it. Writes
``DIR/latents.json`` and ``DIR/shards/`` (format in :mod:`bagel_core.loader.latent_cache`); a second
run keeps every shard whose source file is unchanged, so a killed run resumes where it stopped.

Every ok sample by default. With ``--for-training``, only the samples that training reads in its first
``--steps`` steps (default its ``--total_steps``) on ``--world-size`` ranks: :func:`planned_reads` builds each
rank's packed dataset exactly as the trainer does and replays it (decoding and resizing, no VAE), so a run
shorter than an epoch encodes what it will use and nothing else. A sample the replay did not foresee (the
training resumed elsewhere, other arguments) is encoded live by the trainer, which counts them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
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
    p.add_argument(
        "--for-training",
        default=None,
        metavar="ARGS",
        help="only the samples the training with these trainer arguments (one quoted string) reads",
    )
    p.add_argument("--world-size", type=int, default=1, help="with --for-training: the training's process count")
    p.add_argument("--steps", type=int, default=None, help="with --for-training: its first N steps (default all)")
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


@dataclass
class PlannedReads:
    """What a training reads: its samples (cache keys) and how far the replay went."""

    samples: set[tuple[str, str, int, int]]
    steps: int  # up to this step
    packs_per_rank: int
    world_size: int
    from_step: int = 0  # the step the training resumes from (0: the start of its data)

    def coverage(self) -> dict[str, Any]:
        """The cache manifest's record of this scope."""
        return {
            "scope": "planned",
            "from_step": self.from_step,
            "steps": self.steps,
            "packs_per_rank": self.packs_per_rank,
            "world_size": self.world_size,
            "samples": len(self.samples),
        }


def planned_reads(argv: list[str], world_size: int, steps: int | None = None) -> PlannedReads:
    """The samples the training that ``argv`` (trainer arguments, upstream names) reads up to step ``steps``
    (default ``--total_steps``) on ``world_size`` ranks: from the start of its data, or, when it resumes fully
    (``--auto_resume`` finding a step, ``--resume_from`` a step directory saved at this world size), from the
    data position that checkpoint restores.

    Each rank's dataset is built by the trainer's own :func:`~bagel_core.train.trainer.build_packed_dataset`
    after the trainer's preflight, and each logical worker is replayed for the packs the DataLoader takes from
    it (pack ``k`` from worker ``(k + next_worker) % num_workers``; ``gradient_accumulation_steps`` packs per
    step). The attention backend is set to SDPA for the replay (flex padding never changes what is read;
    FlexAttention would need a GPU here), and the checkpoint folder to a temporary one (a running training may
    hold its own).
    """
    from bagel_core.config.errors import ConfigError
    from bagel_core.data.tokenizer import load_tokenizer
    from bagel_core.plan.manifest import write_manifest
    from bagel_core.train.args import parse_args
    from bagel_core.train.build import CHECKPOINT, RESUME, plan_weights
    from bagel_core.train.checkpoint import saved_data_positions
    from bagel_core.train.preflight import preflight
    from bagel_core.train.trainer import build_packed_dataset

    if world_size < 1 or (steps is not None and steps < 1):
        raise ConfigError(
            f"planned reads need a world size >= 1 and steps >= 1 (got world size {world_size}, steps {steps})"
        )
    start = plan_weights(parse_args(argv, world_size, world_size))
    resumed = None
    if start.kind in (RESUME, CHECKPOINT) and not start.model_only and start.source is not None:
        resumed = saved_data_positions(start.source, world_size)
    with tempfile.TemporaryDirectory(prefix="bagel-planned-reads-") as tmp:
        cfg = parse_args([*argv, "--memory_check", "off", "--checkpoint_dir", tmp], world_size, world_size)
        cfg.model.attn_backend = "sdpa"
        launch = preflight(cfg, world_size, world_size)
        manifest = Path(cfg.data.manifest) if cfg.data.manifest else Path(tmp) / "manifest"
        if launch.manifest is not None:
            write_manifest(launch.manifest, manifest)
        tokenizer_dir = launch.weights.tokenizer_dir
        tokenizer, _ = load_tokenizer(str(tokenizer_dir) if tokenizer_dir else None)
        steps = cfg.training.total_steps if steps is None else steps
        first = resumed[0] if resumed is not None else 0
        packs = max(steps - first, 0) * cfg.training.gradient_accumulation_steps
        workers = max(cfg.data.num_workers, 1)
        samples: set[tuple[str, str, int, int]] = set()
        for rank in range(world_size):
            dataset = build_packed_dataset(cfg, launch, manifest, rank, world_size, tokenizer)
            rotation = 0
            if resumed is not None:
                dataset.load_state_dict(resumed[1][rank])
                rotation = dataset.state_dict()["next_worker"]
            for worker in range(workers):
                count = len(range((worker - rotation) % workers, packs, workers))
                for batch in itertools.islice(dataset.worker_packs(worker), count):
                    for entry in batch["batch_data_indexes"]:
                        real = os.path.realpath(entry["source_file"])
                        samples.add((entry["dataset_name"], real, entry["row_group"], entry["row_index"]))
    return PlannedReads(samples, steps, packs, world_size, first)


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
    only, coverage = None, None
    if args.for_training is not None:
        reads = planned_reads(shlex.split(args.for_training), args.world_size, args.steps)
        only, coverage = reads.samples, reads.coverage()
        print(f"the training reads {len(only)} sample(s) in {reads.steps} step(s) on {reads.world_size} rank(s)")
    result = build_latent_cache(
        vae, config, args.index, args.out, workers=args.workers, progress=not args.quiet, only=only, coverage=coverage
    )
    print(result.summary())
    for line in result.rejected[:20]:
        print(f"  rejected: {line}", file=sys.stderr)
    return 0
