"""Run K optimizer steps on fixed packs, for the world-size equivalence test.

Packs come from a world-2 sampling manifest: "data rank" r's stream. Under torchrun with 2 processes
each rank trains on its own stream (gradient accumulation 1); in one process the trainer takes both
streams as 2 micro-batches. The same global batch, so losses and weights must agree.

    torchrun --nproc_per_node 2 -m train_equivalence <trainer args>   (env: EQUIV_GROUPS, EQUIV_REGISTRY,
    EQUIV_MANIFEST, EQUIV_STEPS, EQUIV_OUT)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file
from train_fixtures import full_state

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.loader.packed_dataset import PackedDataset
from bagel_core.train.args import parse_args
from bagel_core.train.distributed import init_distributed, shutdown
from bagel_core.train.preflight import preflight
from bagel_core.train.trainer import Trainer


def streams(trainer: Trainer, data_ranks: list[int], groups: str, registry: str, manifest: str) -> list:
    """One packed-batch iterator per data rank of the world-2 manifest (dataset as the trainer builds it)."""
    ds = trainer.dataset
    out = []
    for r in data_ranks:
        packed = PackedDataset(
            load_dataset_config(groups),
            Registry.load(registry),
            manifest,
            rank=r,
            world_size=2,
            num_workers=0,
            params=ds.params,
            dropout=ds.dropout,
            seed=ds.seed,
            tokenizer=trainer.tokenizer,
            max_latent_size=ds.max_latent_size,
        )
        out.append(iter(packed))
    return out


def run_steps(trainer: Trainer, data_ranks: list[int], steps: int, env: dict[str, str]) -> list[dict[str, float]]:
    iters = streams(trainer, data_ranks, env["EQUIV_GROUPS"], env["EQUIV_REGISTRY"], env["EQUIV_MANIFEST"])
    stats = []
    for _ in range(steps):
        stats.append(trainer.train_step([next(it) for it in iters]))
        trainer.step += 1
    return stats


def main(argv: list[str]) -> None:
    env = dict(os.environ)
    world = int(env.get("WORLD_SIZE", "1"))
    cfg = parse_args(argv, world_size=world)
    launch = preflight(cfg, world)
    dist_info = init_distributed(cfg.training.sharding_strategy, cfg.training.num_replicate, cfg.training.num_shard)
    try:
        trainer = Trainer(cfg, launch, dist_info)
        data_ranks = [dist_info.rank] if world == 2 else [0, 1]
        stats = run_steps(trainer, data_ranks, int(env["EQUIV_STEPS"]), env)
        state = full_state(trainer.model)
        trainer.metrics.close()
        if dist_info.is_main:
            out = Path(env["EQUIV_OUT"])
            out.mkdir(parents=True, exist_ok=True)
            (out / "stats.json").write_text(json.dumps(stats))
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    finally:
        shutdown(dist_info)


if __name__ == "__main__":
    main(sys.argv[1:])
