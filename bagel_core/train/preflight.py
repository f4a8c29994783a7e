"""Everything a launch can get wrong, checked before any process group starts (and printed by
``--dry_run``): the registry and dataset YAML, the branches the data needs, the sampling manifest
for this world size, the model files and table sizes, where every weight comes from, the device.

Each problem is a :class:`ConfigError` naming both sides of the contradiction and the fix; a plain
``torchrun`` needs no Dagster step first (without ``--manifest`` the plan is built here, exactly as
the trainer will build it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bagel_core.config.dataset_config import DatasetConfig, load_dataset_config
from bagel_core.config.errors import ConfigError
from bagel_core.config.registry import Registry, import_upstream_dataset_info
from bagel_core.config.validate import require_valid
from bagel_core.model.config import BagelConfig
from bagel_core.plan.manifest import Manifest, build_manifest, read_manifest_meta
from bagel_core.sequence.tokens import VAE_DOWNSAMPLE
from bagel_core.train.args import TrainConfig, parse_args
from bagel_core.train.build import (
    CHECKPOINT,
    MODEL_DIR,
    RANDOM,
    RESUME,
    WeightsPlan,
    check_weights,
    model_config,
    plan_weights,
)
from bagel_core.train.lock import check_free, check_writable
from bagel_core.train.lora import LoRA
from bagel_core.train.lora import check_launch as check_lora_launch
from bagel_core.train.lora import describe_plan as describe_lora
from bagel_core.train.memory import MemoryPlan, MemoryPlanError, inputs_from_config, plan_memory

log = logging.getLogger(__name__)

#: Upstream's script imports this module when no registry is given (``data/dataset_info.py``).
UPSTREAM_DATASET_INFO = Path("data/dataset_info.py")


@dataclass
class LaunchPlan:
    """The resolved launch: printed by ``--dry_run``, used by the trainer."""

    registry: Registry
    dataset_config: DatasetConfig
    weights: WeightsPlan
    model: BagelConfig  # the model's configuration with the run's flags (model_config)
    world_size: int
    manifest: Manifest | None  # built here when --manifest was not given
    memory: MemoryPlan | None = None  # what every rank will hold (check_memory)

    def describe(self, cfg: TrainConfig) -> dict[str, Any]:
        t, d, bcfg = cfg.training, cfg.data, self.model
        return {
            "world_size": self.world_size,
            "mesh": {"strategy": t.sharding_strategy, "num_replicate": t.num_replicate, "num_shard": t.num_shard},
            "registry": str(self.registry.source),
            "dataset_config": str(self.dataset_config.source),
            "groups": {name: g.task for name, g in self.dataset_config.groups.items()},
            "manifest": d.manifest or f"built at start-up for world {self.world_size} x {d.num_workers} workers",
            "packing": d.packing,
            "model": {
                "layers": bcfg.llm.num_hidden_layers,
                "hidden": bcfg.llm.hidden_size,
                "visual_gen": bcfg.visual_gen,
                "visual_und": bcfg.visual_und,
                "max_latent_size": bcfg.max_latent_size,
                "attn_backend": cfg.model.attn_backend,
            },
            "state": describe_lora(self.weights.describe(cfg.model.model_preset), t),
            "memory": self.memory.to_dict() if self.memory is not None else None,
        }


def load_registry(cfg: TrainConfig) -> Registry:
    """``--dataset_info`` (our YAML registry), else upstream's ``./data/dataset_info.py`` read without
    executing it; placeholders and missing paths are errors naming the key."""
    given = cfg.data.dataset_info
    if given:
        registry = Registry.load(given)
    elif UPSTREAM_DATASET_INFO.is_file():
        registry = import_upstream_dataset_info(UPSTREAM_DATASET_INFO)
    else:
        raise ConfigError(
            "no dataset registry: pass --dataset_info REGISTRY.yaml (make one with `bagel data registry --root "
            "DATA --out REGISTRY.yaml`, or materialise the dataset_registry asset), or run from a folder with "
            f"upstream's {UPSTREAM_DATASET_INFO}"
        )
    require_valid(registry)
    return registry


def check_branches(cfg: TrainConfig, config: DatasetConfig) -> None:
    """The model must have the branch each dataset group trains (upstream asserts mid-step, #264)."""
    t = cfg.training
    tasks = {name: g.task for name, g in config.groups.items()}
    if not t.visual_und:
        vlm = [n for n, task in tasks.items() if task == "vlm"]
        if vlm:
            raise ConfigError(
                f"--visual_und False builds no ViT, but {config.source} has understanding group(s) {vlm}: "
                "remove them from the dataset YAML or drop --visual_und False"
            )
    if not t.visual_gen:
        gen = [n for n, task in tasks.items() if task in ("t2i", "edit")]
        if gen:
            raise ConfigError(
                f"--visual_gen False builds no generation branch, but {config.source} has group(s) {gen} "
                "that train it: remove them from the dataset YAML or drop --visual_gen False"
            )


def check_latent_table(cfg: TrainConfig, config: DatasetConfig, max_latent_size: int) -> None:
    """The largest VAE image the dataset YAML allows must fit the latent position table (else the
    forward indexes past it: upstream's IndexError, TRAIN.md / #131)."""
    for name, group in config.groups.items():
        if group.task not in ("t2i", "edit"):
            continue
        args = group.image_transform_args
        side = -(-args.max_image_size // VAE_DOWNSAMPLE)
        if side > max_latent_size:
            raise ConfigError(
                f"{config.source}: group {name} allows images up to {args.max_image_size} px, i.e. {side} latent "
                f"tokens per side, but the model's latent table has max_latent_size {max_latent_size}: pass "
                f"--max_latent_size {side} (64 for the BAGEL-7B-MoT release) or lower max_image_size"
            )


def check_manifest(cfg: TrainConfig, world_size: int) -> None:
    """A given manifest must have been planned for this world size and ``num_workers``."""
    d = cfg.data
    meta = read_manifest_meta(d.manifest)
    for key, mine in (("world_size", world_size), ("num_workers", d.num_workers)):
        if meta.get(key) != mine:
            raise ConfigError(
                f"--manifest {d.manifest} was planned for {key}={meta.get(key)}, this launch has {key}={mine}: "
                f"rebuild it (`bagel data plan --world-size {world_size} --num-workers {d.num_workers} ...`) or "
                "drop --manifest and the trainer plans the data itself"
            )
    if meta.get("problems"):
        raise ConfigError(f"--manifest {d.manifest}: some workers get no data:\n  " + "\n  ".join(meta["problems"]))
    check_packing(cfg, meta)


def check_packing(cfg: TrainConfig, meta: dict[str, Any]) -> None:
    """A manifest simulated with another ``--packing`` is still right about who reads what (the assignment
    does not depend on the mode), only its simulation figures describe another run: a warning, not an error."""
    planned, mine = meta.get("packing"), cfg.data.packing
    if planned is not None and planned != mine:
        log.warning(
            "--manifest %s was simulated with --packing %s, this launch packs with --packing %s: every rank and "
            "worker reads the same data, but the plan's packing figures (drawn/trained shares, discards) do not "
            "describe this run; `bagel data plan --packing %s` shows them",
            cfg.data.manifest,
            planned,
            mine,
            mine,
        )


def check_device(cfg: TrainConfig) -> None:
    backend = cfg.model.attn_backend
    if backend in ("flex", "flash") and not torch.cuda.is_available():
        raise ConfigError(
            f"--attn_backend {backend} (or --use_flex True) needs a GPU: FlexAttention has no CPU backward and "
            "flash-attn is CUDA only; use --attn_backend sdpa on CPU"
        )
    if backend == "flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError as exc:
            raise ConfigError("--attn_backend flash needs flash-attn: pip install '.[gpu]'") from exc


def plan_launch_memory(
    cfg: TrainConfig, weights: WeightsPlan, bcfg: BagelConfig, world_size: int, local_world_size: int | None = None
) -> MemoryPlan:
    """The memory plan of this launch (``bagel_core.train.memory``): ``local_world_size`` processes per node
    (``LOCAL_WORLD_SIZE``; all of them on one node when unknown); budgets as ``inputs_from_config`` says."""
    per_node = local_world_size if local_world_size and world_size % local_world_size == 0 else world_size
    loads = {RANDOM: "random", RESUME: "dcp", CHECKPOINT: "dcp"}.get(weights.kind, "full")
    name = f"preset {cfg.model.model_preset}" if weights.kind == RANDOM else str(weights.config_dir or weights.source)
    lora = LoRA.from_args(cfg.training).memory_spec(bcfg.llm)
    inputs = inputs_from_config(cfg, bcfg, world_size // per_node, per_node, loads, model_name=name, lora=lora)
    return plan_memory(inputs)


def plan_for_arguments(argv: list[str], nnodes: int = 1, nproc_per_node: int = 1) -> MemoryPlan:
    """The memory plan of ``python -m bagel_core.train ARGV`` on ``nnodes`` x ``nproc_per_node`` processes,
    from the arguments and the model's configuration only (no data, no weights): ``bagel plan-memory`` and the
    Dagster check call this. A ``--model_path`` that does not exist here is planned as the released
    BAGEL-7B-MoT (configs of the release, weights read on rank 0), so a cluster's command plans anywhere."""
    world = nnodes * nproc_per_node
    cfg = parse_args(argv, world_size=world, local_world_size=nproc_per_node)
    try:
        weights = plan_weights(cfg)
    except ConfigError:
        if "model_path" not in cfg.given or Path(cfg.model.model_path).exists():
            raise
        cfg.model.model_preset = "7b-mot"
        weights = WeightsPlan(MODEL_DIR, Path(cfg.model.model_path), None, True, True)
    return plan_launch_memory(cfg, weights, model_config(cfg, weights), world, nproc_per_node)


def check_memory(cfg: TrainConfig, plan: MemoryPlan) -> None:
    """Refuse a launch the plan says will not fit (``--memory_check``), before any weight is loaded, naming the
    smallest change that fits. ``auto`` refuses on GPUs and whenever a budget was given; on a CPU it warns: host
    memory is elastic there (swap) and CPU runs are tests and examples planned for the worst pack."""
    t = cfg.training
    if plan.fits or t.memory_check == "off":
        return
    given = t.device_memory_gb > 0 or t.host_memory_gb > 0
    if t.memory_check == "error" or (t.memory_check == "auto" and (plan.inputs.device == "cuda" or given)):
        raise MemoryPlanError(
            f"{plan.summary()}\n(`bagel plan-memory` with these arguments prints the whole table; "
            "--memory_check warn launches anyway)"
        )
    log.warning("%s", plan.summary())


def check_checkpoint_dir(cfg: TrainConfig) -> None:
    """Writable, and not held by another live training (the trainer takes the lock on rank 0)."""
    check_writable(cfg.training.checkpoint_dir)
    check_free(cfg.training.checkpoint_dir)


def preflight(cfg: TrainConfig, world_size: int, local_world_size: int | None = None) -> LaunchPlan:
    """Run every check; returns the launch plan (raises ConfigError on the first contradiction). The memory
    plan is made for ``local_world_size`` processes per node (``LOCAL_WORLD_SIZE``)."""
    registry = load_registry(cfg)
    config = load_dataset_config(cfg.data.dataset_config_file)
    config.check_against(registry)
    check_branches(cfg, config)
    check_device(cfg)
    check_checkpoint_dir(cfg)
    manifest = None
    if cfg.data.manifest:
        check_manifest(cfg, world_size)
    else:
        manifest = build_manifest(
            config, registry, world_size, cfg.data.num_workers, seed=cfg.data.data_seed, packing=cfg.data.packing
        )
    weights = plan_weights(cfg)
    bcfg = model_config(cfg, weights)
    check_weights(weights, bcfg)
    check_lora_launch(cfg.training, weights, bcfg.llm)
    if bcfg.visual_gen:
        check_latent_table(cfg, config, bcfg.max_latent_size)
    memory = plan_launch_memory(cfg, weights, bcfg, world_size, local_world_size)
    check_memory(cfg, memory)
    return LaunchPlan(registry, config, weights, bcfg, world_size, manifest, memory)
