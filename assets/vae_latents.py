"""``vae_latents``: the VAE images the training run will use, encoded once by the training's frozen VAE.

The training run then reads posterior moments instead of encoding images in every step
(``--latent_cache``); the trainer checks the cache against its own VAE and transforms and encodes
live, saying why, when they differ. ``scope: planned`` (default) encodes the samples the training's
first ``steps`` steps read (the trainer's own packed dataset replayed under the ``launch`` layout);
``scope: all`` every VAE image of the data. Incremental: what a shard already holds is kept.
"""

import time

import dagster as dg
import torch
from pydantic import Field

from assets.resources import PipelineWorkspace, TrainingLaunch
from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.loader.latent_cache import SHARDS, build_latent_cache, vae_identity
from bagel_core.train.latents import planned_reads, training_vae

SCOPES = ("planned", "all")


class VaeLatentsConfig(dg.Config):
    """The VAE to encode with: the same model_path / model_preset / global_seed as training_run's config (the
    trainer refuses a cache made with another VAE). ``scope``: "planned" encodes what the training's first
    ``steps`` steps read (keep ``steps`` equal to training_run's ``total_steps``, and ``extra_args`` to its
    extra_args when they change the data it reads: dropout, budgets; for a training that continues one
    checkpoint folder, ``["--checkpoint_dir", DIR, "--auto_resume", "True"]`` too, so the replay starts
    where it resumes); "all" encodes every VAE image, which pays off for multi-epoch training and repeated
    runs on the same data. A sample the cache lacks is encoded live by the trainer (counted in its log)."""

    enabled: bool = True
    scope: str = "planned"
    steps: int = 16
    model_preset: str = "tiny"
    model_path: str = ""
    global_seed: int = 4396
    extra_args: list[str] = Field(default_factory=list)
    workers: int = 2  # files encoded in parallel (forked processes, CPU)
    # "auto": the GPU when this machine has one (a local GPU training runs its VAE in bf16 there, and refuses a
    # cache encoded in fp32 on CPU), else the CPU; or "cpu" / "cuda"
    device: str = "auto"


def encode_device(config: VaeLatentsConfig) -> str:
    """The device the cache is encoded on (see ``VaeLatentsConfig.device``)."""
    if config.device != "auto":
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def planned_training_args(config: VaeLatentsConfig, launch: TrainingLaunch, workspace: PipelineWorkspace) -> list[str]:
    """The trainer arguments of the training whose reads ``scope: planned`` encodes (training_run's, for its data)."""
    model = ["--model_path", config.model_path] if config.model_path else ["--model_preset", config.model_preset]
    return [
        *workspace.trainer_data_args(), "--total_steps", str(config.steps), "--global_seed", str(config.global_seed),
        *launch.train_args(), *model, *config.extra_args,
    ]  # fmt: skip


@dg.asset(
    group_name="data",
    deps=[dg.AssetKey("dataset_index"), dg.AssetKey("sampling_manifest")],
    kinds={"pytorch", "safetensors"},
    description="Posterior moments of the VAE images the training reads (frozen VAE, each group's image "
    "transform), keyed by the index's sample keys; the training run samples latents from them instead of "
    "encoding every step.",
)
def vae_latents(
    context: dg.AssetExecutionContext, config: VaeLatentsConfig, workspace: PipelineWorkspace, launch: TrainingLaunch
) -> dg.MaterializeResult:
    if not config.enabled:
        context.log.info("vae_latents disabled: the training run encodes every VAE image live")
        return dg.MaterializeResult(metadata={"enabled": False})
    if config.scope not in SCOPES:
        raise dg.Failure(f"vae_latents: scope {config.scope!r} must be one of {', '.join(SCOPES)}")
    dataset_config = load_dataset_config(workspace.dataset_config_path)
    dataset_config.check_against(Registry.load(workspace.registry_path))
    only, coverage, replay_s = None, None, None
    if config.scope == "planned":
        started = time.monotonic()
        reads = planned_reads(planned_training_args(config, launch, workspace), launch.world_size)
        only, coverage, replay_s = reads.samples, reads.coverage(), round(time.monotonic() - started, 1)
        context.log.info(
            f"vae_latents: the training's steps {reads.from_step + 1}-{reads.steps} on {reads.world_size} rank(s) "
            f"read {len(only)} sample(s) (replayed in {replay_s} s); encoding their VAE images"
        )
    vae = training_vae(config.model_path, config.model_preset, config.global_seed, encode_device(config))

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            context.log.info(f"vae_latents: {done}/{total} files encoded")

    result = build_latent_cache(
        vae,
        dataset_config,
        workspace.index_dir,
        workspace.latents_dir,
        workers=config.workers,
        on_shard=progress,
        only=only,
        coverage=coverage,
    )
    context.log.info(result.summary())
    size = sum(p.stat().st_size for p in (workspace.latents_dir / SHARDS).glob("*.safetensors"))
    return dg.MaterializeResult(
        metadata={
            "enabled": True,
            "scope": config.scope,
            "planned_steps": config.steps if config.scope == "planned" else None,
            "planned_samples": len(only) if only is not None else None,
            "replay_seconds": replay_s,
            "path": dg.MetadataValue.path(str(workspace.latents_dir)),
            "vae_sha256": vae_identity(vae)["sha256"],
            "shards_encoded": result.shards_written,
            "shards_kept": result.shards_kept,
            "samples_encoded": result.samples,
            "images_encoded": result.images,
            "images_rejected": len(result.rejected),
            "seconds": round(result.seconds, 1),
            "images_per_s": round(result.images / result.seconds, 2) if result.seconds else None,
            "size_mb": round(size / 1e6, 1),
        }
    )
