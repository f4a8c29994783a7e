"""``vae_latents``: every VAE image of the registered data encoded once by the training's frozen VAE.

The training run then reads posterior moments instead of encoding images in every step
(``--latent_cache``); the trainer checks the cache against its own VAE and transforms and encodes
live, saying why, when they differ. Incremental: shards of unchanged source files are kept.
"""

import dagster as dg

from assets.resources import PipelineWorkspace
from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.loader.latent_cache import SHARDS, build_latent_cache, vae_identity
from bagel_core.train.latents import training_vae


class VaeLatentsConfig(dg.Config):
    """The VAE to encode with: the same model_path / model_preset / global_seed as training_run's config (the
    trainer refuses a cache made with another VAE). Off by default: encoding every image once pays off from
    the second pass over the data, not in a run shorter than an epoch such as the example's (its 16 steps read
    33 of 378 images per rank: on 2 CPU cores the cache costs 4 minutes and saves seconds). Switch it on for
    multi-epoch training or repeated runs on the same data (``enabled: true``)."""

    enabled: bool = False
    model_preset: str = "tiny"
    model_path: str = ""
    global_seed: int = 4396
    workers: int = 2  # files encoded in parallel (forked processes, CPU)
    device: str = "cpu"


@dg.asset(
    group_name="data",
    deps=[dg.AssetKey("dataset_index")],
    kinds={"pytorch", "safetensors"},
    description="Posterior moments of every VAE image (frozen VAE, each group's image transform), keyed by the "
    "index's sample keys; the training run samples latents from them instead of encoding every step.",
)
def vae_latents(
    context: dg.AssetExecutionContext, config: VaeLatentsConfig, workspace: PipelineWorkspace
) -> dg.MaterializeResult:
    if not config.enabled:
        context.log.info("vae_latents disabled: the training run encodes every VAE image live")
        return dg.MaterializeResult(metadata={"enabled": False})
    dataset_config = load_dataset_config(workspace.dataset_config_path)
    dataset_config.check_against(Registry.load(workspace.registry_path))
    vae = training_vae(config.model_path, config.model_preset, config.global_seed, config.device)

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            context.log.info(f"vae_latents: {done}/{total} files encoded")

    result = build_latent_cache(
        vae, dataset_config, workspace.index_dir, workspace.latents_dir, workers=config.workers, on_shard=progress
    )
    context.log.info(result.summary())
    size = sum(p.stat().st_size for p in (workspace.latents_dir / SHARDS).glob("*.safetensors"))
    return dg.MaterializeResult(
        metadata={
            "enabled": True,
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
