"""The BAGEL training loop under torchrun + FSDP2, readable top to bottom (training.md 3-10).

Per optimizer step: fetch ``gradient_accumulation_steps`` packed batches from this rank's
``PackedDataset``; all-reduce their loss-bearing token counts once; for each micro-batch encode the
images with the frozen VAE (no grad), forward, take its share of the step loss (``loss.py``) and
backward; clip; optimizer and schedule step; EMA update on the local shards; record the batches'
data state; log; save. Nothing per step is kept in memory.

Step convention: ``step`` counts completed optimizer steps; ``step_<N>/`` holds the state after N
steps and resuming from it trains step N next. Per-step randomness (VAE posterior sample, flow
noise) comes from generators seeded by (global_seed, step, slot) with slot = rank * G + micro-step,
so a resumed run draws exactly what a straight run draws, and one process with G = 2 draws what
two processes with G = 1 draw.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.utils.data import DataLoader

from bagel_core.config.errors import NonFiniteLossError
from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.loader.latent_cache import LatentCache, open_latent_cache, pack_latents, vae_identity, vae_transforms
from bagel_core.loader.packed_dataset import PackedDataset, collate_packed, model_inputs, normalise_pixels
from bagel_core.plan.manifest import write_manifest
from bagel_core.plan.packing import CfgDropout, PackingParams
from bagel_core.train.args import TrainConfig
from bagel_core.train.build import build_models, build_vae, model_files_writer
from bagel_core.train.checkpoint import MARKER, TrainingState, load_checkpoint, save_checkpoint, step_dir
from bagel_core.train.distributed import (
    Distributed,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown,
)
from bagel_core.train.ema import update_ema
from bagel_core.train.export import export_checkpoint
from bagel_core.train.lock import CheckpointDirLock
from bagel_core.train.lora import describe_plan as describe_lora
from bagel_core.train.loss import StepTokens, local_token_counts, micro_loss, pack_samples
from bagel_core.train.metrics import (
    MetricsLogger,
    MetricsWindow,
    WandbSettings,
    peak_memory_mib,
    resolve_peak_tflops,
    vae_sources_line,
)
from bagel_core.train.observer import GuardedObserver, NullObserver, TrainingObserver, load_observer
from bagel_core.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from bagel_core.train.preflight import LaunchPlan


def step_generator(seed: int, step: int, slot: int, stream: int, device: torch.device) -> torch.Generator:
    """The generator of one (step, slot, stream): 0 = VAE posterior sample, 1 = flow noise."""
    gen = torch.Generator(device=device)
    return gen.manual_seed((seed * 1_000_003 + step * 4099 + slot * 8 + stream) % (2**63))


def seed_process(global_seed: int, dist_info: Distributed) -> None:
    """Upstream's process seed: global_seed * world_size + rank."""
    seed = global_seed * dist_info.world_size + dist_info.rank
    torch.manual_seed(seed)
    random.seed(seed)


def build_packed_dataset(
    cfg: TrainConfig,
    launch: LaunchPlan,
    manifest_dir: Path,
    rank: int,
    world_size: int,
    tokenizer: Any,
    latents: LatentCache | None = None,
) -> PackedDataset:
    """One rank's packed dataset as the training reads it (budgets, packing mode, CFG dropout, seed, positions);
    also what :func:`bagel_core.train.latents.planned_reads` replays to know which samples a run reads."""
    d, m, t = cfg.data, cfg.model, cfg.training
    params = PackingParams(
        expected_num_tokens=t.expected_num_tokens,
        max_num_tokens=d.max_num_tokens,
        max_num_tokens_per_sample=d.max_num_tokens_per_sample,
        prefer_buffer_before=d.prefer_buffer_before,
        max_buffer_size=d.max_buffer_size,
        mode=d.packing,
    )
    dropout = (
        CfgDropout(m.text_cond_dropout_prob, m.vit_cond_dropout_prob, m.vae_cond_dropout_prob)
        if t.visual_gen
        else CfgDropout(0.0, 0.0, 0.0)
    )
    return PackedDataset(
        launch.dataset_config,
        launch.registry,
        manifest_dir,
        rank=rank,
        world_size=world_size,
        num_workers=d.num_workers,
        params=params,
        dropout=dropout,
        seed=d.data_seed,
        tokenizer=tokenizer,
        max_latent_size=launch.model.max_latent_size,
        interpolate_pos=m.interpolate_pos,
        flex_padding=m.attn_backend == "flex",
        max_bad_files=d.max_bad_files,
        latent_cache=latents,
        pixels_as_bytes=True,  # a quarter of the bytes through shared memory and to the device; see _inputs
    )


class Trainer:
    """Everything one training process holds; ``run()`` trains until ``total_steps``."""

    def __init__(
        self,
        cfg: TrainConfig,
        launch: LaunchPlan,
        dist_info: Distributed,
        out: TextIO | None = None,
        observer: TrainingObserver | None = None,
    ) -> None:
        self.cfg, self.launch, self.dist = cfg, launch, dist_info
        self.observer = observer if observer is not None else NullObserver()
        t = cfg.training
        self.out = out if out is not None else sys.stdout
        seed_process(t.global_seed, dist_info)
        self.plan = launch.weights
        self.model_cfg = launch.model
        self.model, self.ema, built = build_models(cfg, self.plan, self.model_cfg, dist_info)
        self.model.train()
        self.vae = build_vae(self.plan, self.model_cfg, dist_info.device, t.global_seed)
        tokenizer_dir = self.plan.tokenizer_dir
        self.tokenizer, _ = load_tokenizer(str(tokenizer_dir) if tokenizer_dir else None)
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.state = TrainingState(self.model, self.ema, self.optimizer, self.scheduler)
        self.write_model_files = model_files_writer(self.model_cfg, self.vae, self.plan, self.tokenizer)
        self.latents, latent_note = self._latent_cache()
        self.vae_images = {"cached": 0, "live": 0}  # this session's VAE images by source
        self.dataset = self._build_dataset()
        self.step = 0
        self.nonfinite_skipped = 0  # steps dropped by --nonfinite_loss skip (this session)
        self.metrics = MetricsLogger(
            dist_info.rank,
            t.results_dir,
            llm_cfg=self.model_cfg.llm,
            world_size=dist_info.world_size,
            peak_tflops=resolve_peak_tflops(t.peak_device_tflops, dist_info.device),
            wandb=WandbSettings.from_args(t),
            config=cfg.to_dict(),
            out=self.out,
            progress_total=t.total_steps,
        )
        self.metrics.info(built)
        if latent_note:
            self.metrics.info(latent_note)
        for what, where in describe_lora(self.plan.describe(cfg.model.model_preset), t).items():
            if where:
                self.metrics.info(f"{what}: {where}")
        try:
            self._resume()
        except BaseException:
            self.metrics.close()  # its files are open; run() would have closed them
            raise

    # ---- data --------------------------------------------------------------------------------------
    def _manifest_dir(self) -> Path:
        """``--manifest``, or the plan preflight built for this world size, ``num_workers`` and ``data_seed``,
        written by rank 0 under ``results_dir`` (every rank waits for it)."""
        d, t = self.cfg.data, self.cfg.training
        if self.launch.manifest is None:
            return Path(d.manifest)
        out = Path(t.results_dir) / f"manifest_w{self.dist.world_size}_n{d.num_workers}_s{d.data_seed}"
        if self.dist.is_main:
            write_manifest(self.launch.manifest, out)
        barrier(self.dist)
        return out

    def _build_dataset(self) -> PackedDataset:
        return build_packed_dataset(
            self.cfg,
            self.launch,
            self._manifest_dir(),
            self.dist.rank,
            self.dist.world_size,
            self.tokenizer,
            latents=self.latents,
        )

    def _latent_cache(self) -> tuple[LatentCache | None, str]:
        """``--latent_cache`` when it fits this run's VAE and transforms, with the line the log gets; a cache that
        does not fit is refused loudly and every VAE image is encoded live."""
        d, t = self.cfg.data, self.cfg.training
        if not d.latent_cache:
            return None, ""
        if not t.freeze_vae:
            return None, f"WARNING: --latent_cache {d.latent_cache} ignored: freeze_vae is off; encoding live"
        groups = vae_transforms(self.launch.dataset_config)
        cache, note = open_latent_cache(d.latent_cache, vae_identity(self.vae), groups, groups)
        return cache, note if cache is not None else f"WARNING: {note}; every VAE image is encoded live (slower)"

    def _batches(self) -> Iterator[dict[str, Any]]:
        d = self.cfg.data
        if d.num_workers == 0:
            return iter(self.dataset)
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=d.num_workers,
            collate_fn=collate_packed,
            prefetch_factor=d.prefetch_factor,
            pin_memory=self.dist.device.type == "cuda",
        )
        return iter(loader)

    # ---- resume and save ---------------------------------------------------------------------------
    def _resume(self) -> None:
        plan = self.plan
        if plan.kind not in ("resume", "checkpoint", "upstream"):
            return
        restored = load_checkpoint(plan.source, self.state, self.dist, plan.model_only, plan.from_ema)
        self.step = restored.step
        if restored.data_state is not None:
            self.dataset.load_state_dict(restored.data_state)
        self.metrics.info(restored.note)

    def save(self) -> Path:
        t = self.cfg.training
        self.metrics.info(f"Saving checkpoint to {Path(t.checkpoint_dir) / f'step_{self.step}'}.")
        path = save_checkpoint(
            t.checkpoint_dir,
            self.step,
            self.state,
            self.dataset.state_dict(),
            self.dist,
            self.write_model_files,
            keep_last_k=t.keep_last_k,
            extra={
                "config": self.cfg.to_dict(),
                "mesh": [t.num_replicate, t.num_shard],
                "sharding_strategy": t.sharding_strategy,
            },
        )
        self.observer.on_checkpoint(self.step, path)
        return path

    # ---- one optimizer step ------------------------------------------------------------------------
    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The pack's model inputs on this rank's device, images normalised there from the bytes the loader sent
        (a table lookup: the same bits on any device as the loader's own float32 packs)."""
        return normalise_pixels({k: _to(v, self.dist.device) for k, v in model_inputs(batch).items()})

    def _encode(self, inputs: dict[str, Any], slot: int) -> None:
        """Replace ``padded_images`` / ``padded_moments`` by VAE latents: each image encoded alone by the frozen VAE
        (or its cached moments), its posterior sampled from the (step, slot) generator in pack order."""
        shapes = inputs.get("patchified_vae_latent_shapes")
        if not shapes:
            return
        from_cache = inputs.pop("vae_from_cache", None)
        if from_cache is not None:
            self.vae_images["cached"] += sum(from_cache)
        self.vae_images["live"] += len(shapes) - (sum(from_cache) if from_cache is not None else 0)
        gen = step_generator(self.cfg.training.global_seed, self.step, slot, 0, self.dist.device)
        inputs["padded_latent"] = pack_latents(
            self.vae,
            shapes,
            gen,
            self.model_cfg.latent_patch_size,
            padded_images=inputs.pop("padded_images", None),
            padded_moments=inputs.pop("padded_moments", None),
            from_cache=from_cache,
        )

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (one tiny all-reduce), so all ranks take the same branch."""
        return all_reduce_max(0.0 if torch.isfinite(loss) else 1.0, self.dist) == 0.0

    def _nonfinite(self, loss: torch.Tensor, batch: dict[str, Any], micro: int) -> None:
        """``--nonfinite_loss stop``: raise naming the step and this rank's pack (when its loss is the bad one);
        ``skip``: drop the step's gradients and count it."""
        t = self.cfg.training
        loss = loss.detach()
        mine = not torch.isfinite(loss)
        where = (
            f"rank {self.dist.rank}, micro-batch {micro}: loss {loss.item()}; the pack held {pack_samples(batch)}"
            if mine
            else f"another rank's loss (rank {self.dist.rank}'s was {loss.item():.4g})"
        )
        if t.nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1} ({where}); pass --nonfinite_loss skip to drop such steps "
                "and go on, or lower --lr / check those samples"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_skipped += 1
        self.metrics.info(f"step {self.step + 1} skipped: non-finite loss ({where}); {self.nonfinite_skipped} so far")

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, float] | None:
        """One optimizer step over ``batches`` (this rank's micro-batches); returns global figures, or None when
        the step was skipped for a non-finite loss (``--nonfinite_loss skip``)."""
        t = self.cfg.training
        counts = [local_token_counts(b, t.ce_loss_reweighting) for b in batches]
        ce_n, mse_n = all_reduce_sum([sum(c for c, _ in counts), sum(m for _, m in counts)], self.dist)
        tokens = StepTokens(ce=ce_n, mse=int(mse_n))
        ce_sum = mse_sum = 0.0
        for micro, batch in enumerate(batches):
            slot = self.dist.rank * len(batches) + micro
            inputs = self._inputs(batch)
            self._encode(inputs, slot)
            noise = step_generator(t.global_seed, self.step, slot, 1, self.dist.device)
            terms = self.model(**inputs, noise_generator=noise, touch_unused=True)
            loss, ce, mse = micro_loss(
                terms, batch, tokens, self.dist.world_size, t.ce_weight, t.mse_weight, t.ce_loss_reweighting
            )
            if not self._all_finite(loss):
                self._nonfinite(loss, batch, micro)
                return None
            loss.backward()
            ce_sum, mse_sum = ce_sum + ce, mse_sum + mse
        grad_norm = clip_grad_norm(self.model, t.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        update_ema(self.ema, self.model, t.ema)
        self.optimizer.zero_grad(set_to_none=True)
        ce_total, mse_total, samples = all_reduce_sum(
            [ce_sum, mse_sum, sum(len(b["sample_lens"]) for b in batches)], self.dist
        )
        ce_mean = ce_total / ce_n if ce_n else 0.0
        mse_mean = mse_total / mse_n if mse_n else 0.0
        return {
            "loss": t.ce_weight * ce_mean + t.mse_weight * mse_mean,
            "ce": ce_mean,
            "mse": mse_mean,
            "lr": lr,
            "grad_norm": grad_norm,
            "total_ce_tokens": ce_n,
            "total_mse_tokens": mse_n,
            "total_samples": samples,
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        """Train until ``total_steps``; returns the last step. Saves every ``save_every`` steps and at the end."""
        t = self.cfg.training
        self.metrics.info(f"Training for {t.total_steps} steps, starting at {self.step}...")
        self.observer.on_start(
            {
                "step": self.step,
                "total_steps": t.total_steps,
                "world_size": self.dist.world_size,
                "checkpoint_dir": str(Path(t.checkpoint_dir).absolute()),
                "results_dir": str(Path(t.results_dir).absolute()),
                "wandb_url": self.metrics.wandb_url,
            }
        )
        try:
            self._loop()
        finally:
            self.metrics.close()
        return self.step

    def _loop(self) -> None:
        t = self.cfg.training
        if self.step < t.total_steps:
            self._train_until(t.total_steps)
        self.metrics.info(f"Reached total_steps={t.total_steps}, stopping training.")
        cached, live = all_reduce_sum([self.vae_images["cached"], self.vae_images["live"]], self.dist)
        self.metrics.info(vae_sources_line(int(cached), int(live)))
        last = step_dir(t.checkpoint_dir, self.step)
        if not (last / MARKER).is_file():
            last = self.save()
        self.export_final(last)

    def _train_until(self, total_steps: int) -> None:
        """Steps until ``total_steps``; the DataLoader's workers are shut down before returning, so no
        worker outlives the loop (they would otherwise keep prefetching during the final save)."""
        batches = self._batches()
        try:
            self._steps(batches, total_steps)
        finally:
            shutdown_workers = getattr(batches, "_shutdown_workers", None)
            if shutdown_workers is not None:
                shutdown_workers()
            del batches

    def _steps(self, batches: Iterator[dict[str, Any]], total_steps: int) -> None:
        t = self.cfg.training
        self.metrics.start(self.step)
        window = MetricsWindow()
        capacity = self.cfg.data.max_num_tokens
        while self.step < total_steps:
            waited = time.perf_counter()
            micro = [next(batches) for _ in range(t.gradient_accumulation_steps)]
            wait = time.perf_counter() - waited
            for batch in micro:
                window.add(int(batch["sequence_length"]), batch["sample_lens"], capacity_tokens=capacity)
            window.loader_wait_s += wait
            stats = self.train_step(micro)
            for batch in micro:
                self.dataset.record(batch)
            self.step += 1
            if stats is None:  # skipped (non-finite loss): the data is consumed, the weights are untouched
                self.scheduler.step()
            elif self.step % t.log_every == 0 or self.step == 1:
                window.all_reduce(self.dist.device)
                stats["peak_mem_mib"] = all_reduce_max(peak_memory_mib(self.dist.device).allocated_mib, self.dist)
                record = self.metrics.log(self.step, stats, window)
                self.observer.on_log(record)
            if self.step % t.save_every == 0:
                self.save()

    def export_final(self, last: Path) -> None:
        """``step_final/``: the EMA of the last step in the released inference layout (bf16), written by
        rank 0 from the step directory in memory-bounded chunks."""
        final = Path(self.cfg.training.checkpoint_dir) / "step_final"
        if self.dist.is_main:
            export_checkpoint(last, final, weights="ema", overwrite=True)
            self.metrics.info(
                f"Final checkpoint saved at step {self.step}: {final} (inference-ready, from {last.name})"
            )
            self.observer.on_export(final)
        barrier(self.dist)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def main(cfg: TrainConfig, launch: LaunchPlan, out: TextIO | None = None) -> int:
    """Train with the process group torchrun set up (or a one-process group); returns the last step.
    ``launch`` comes from :func:`bagel_core.train.preflight.preflight`, run before any group exists."""
    t = cfg.training
    dist_info = init_distributed(t.sharding_strategy, t.num_replicate, t.num_shard)
    # Rank 0 owns the checkpoint folder for the whole run and is the one that talks to the launcher.
    lock = CheckpointDirLock(t.checkpoint_dir) if dist_info.is_main else nullcontext()
    observer = GuardedObserver(load_observer(t.observer)) if dist_info.is_main else NullObserver()
    error: BaseException | None = None
    try:
        with lock:
            if isinstance(lock, CheckpointDirLock) and lock.stale_note:
                print(f"warning: {t.checkpoint_dir}: {lock.stale_note}", file=sys.stderr)
            if dist_info.is_main:
                Path(t.results_dir).mkdir(parents=True, exist_ok=True)
                (Path(t.results_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            return Trainer(cfg, launch, dist_info, out, observer).run()
    except BaseException as exc:
        error = exc
        raise
    finally:
        observer.close(error)
        shutdown(dist_info)
