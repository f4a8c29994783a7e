"""Single-process training loop (training.md 3-6, 9): data -> VAE encode -> forward -> loss -> step.

Step convention: ``step`` counts completed optimizer steps; ``step_<N>/`` holds the state after N
steps and resuming from it trains step N next (the upstream off-by-one of training.md 9.1 is not
reproduced). Per-step randomness (VAE posterior sample, flow noise) comes from generators seeded
by (global_seed, step), so a resumed run draws exactly what a straight run draws.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.utils.data import DataLoader

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.errors import ConfigError
from bagel_core.config.registry import Registry
from bagel_core.loader.packed_dataset import PackedDataset, collate_packed, model_inputs
from bagel_core.model import AutoEncoder, Bagel, BagelLossTerms, build_model, load_model_dir, load_vae, preset
from bagel_core.plan.packing import CfgDropout, PackingParams
from bagel_core.train.args import TrainConfig
from bagel_core.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from bagel_core.train.ema import build_ema, update_ema
from bagel_core.train.optim import build_optimizer, build_scheduler, clip_grad_norm

log = logging.getLogger(__name__)


def reduce_loss(
    terms: BagelLossTerms, batch: dict[str, Any], ce_weight: float, mse_weight: float, reweighting: bool
) -> tuple[torch.Tensor, float, float]:
    """training.md 4.2 at world size 1: per-token CE mean (or weighted), MSE mean over channels then
    tokens. Returns (loss, ce value, mse value); absent terms contribute 0."""
    loss: torch.Tensor | None = None
    ce_v = mse_v = 0.0
    if terms.ce is not None and terms.ce.numel() > 0:
        if reweighting:
            w = batch["ce_loss_weights"].to(terms.ce.dtype)
            ce = (terms.ce * w).sum() / w.sum()
        else:
            ce = terms.ce.sum() / terms.ce.numel()
        ce_v = float(ce.detach())
        loss = ce_weight * ce
    if terms.mse is not None and terms.mse.numel() > 0:
        mse = terms.mse.mean(dim=-1).sum() / terms.mse.shape[0]
        mse_v = float(mse.detach())
        loss = mse_weight * mse if loss is None else loss + mse_weight * mse
    if loss is None:
        raise RuntimeError("batch produced neither CE nor MSE terms")
    return loss, ce_v, mse_v


def _step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 8 + stream) % (2**63))


class Trainer:
    """Everything one training process holds; ``run()`` trains until ``total_steps``."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: Bagel | None = None,
        vae: AutoEncoder | None = None,
        dataset: PackedDataset | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.cfg = cfg
        t = cfg.training
        if not (t.visual_gen and t.visual_und):
            raise ConfigError("--visual_gen False / --visual_und False are not supported by this trainer yet")
        self.out = out if out is not None else sys.stdout
        torch.manual_seed(t.global_seed)
        random.seed(t.global_seed)
        self.model = model if model is not None else self._build_model()
        self.model.train()
        self.vae = vae if vae is not None else self._build_vae()
        self.vae.eval().requires_grad_(False)
        self.ema = build_ema(self.model)
        self.dataset = dataset if dataset is not None else self._build_dataset()
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._resume()

    # ---- construction ------------------------------------------------------------------------
    def _build_model(self) -> Bagel:
        m, t = self.cfg.model, self.cfg.training
        if Path(m.model_path).is_dir():
            model = load_model_dir(m.model_path, dtype=torch.float32, max_latent_size=m.max_latent_size)
            model.cfg.timestep_shift = t.timestep_shift
            return model
        bcfg = dataclasses.replace(preset(m.model_preset), timestep_shift=t.timestep_shift)
        return build_model(bcfg)

    def _build_vae(self) -> AutoEncoder:
        m = self.cfg.model
        if Path(m.model_path).is_dir() and (Path(m.model_path) / "ae.safetensors").is_file():
            return load_vae(m.model_path, self.model.cfg)
        return AutoEncoder(self.model.cfg.vae)

    def _build_dataset(self) -> PackedDataset:
        d, m, t = self.cfg.data, self.cfg.model, self.cfg.training
        params = PackingParams(
            expected_num_tokens=t.expected_num_tokens,
            max_num_tokens=d.max_num_tokens,
            max_num_tokens_per_sample=d.max_num_tokens_per_sample,
            prefer_buffer_before=d.prefer_buffer_before,
            max_buffer_size=d.max_buffer_size,
        )
        dropout = (
            CfgDropout(m.text_cond_dropout_prob, m.vit_cond_dropout_prob, m.vae_cond_dropout_prob)
            if t.visual_gen
            else CfgDropout(0.0, 0.0, 0.0)
        )
        return PackedDataset(
            load_dataset_config(d.dataset_config_file),
            Registry.load(d.dataset_info),
            d.manifest,
            num_workers=d.num_workers,
            params=params,
            dropout=dropout,
            seed=d.data_seed,
            max_latent_size=self.model.cfg.max_latent_size,
            interpolate_pos=m.interpolate_pos,
        )

    def _resume(self) -> None:
        t = self.cfg.training
        source = latest_checkpoint(t.checkpoint_dir) if t.auto_resume else None
        model_only = False
        if source is None and t.resume_from:
            source, model_only = Path(t.resume_from), t.resume_model_only
        if source is None:
            return
        step, data_state = load_checkpoint(
            source,
            self.model,
            self.ema,
            self.optimizer,
            self.scheduler,
            model_only=model_only,
            from_ema=t.finetune_from_ema,
        )
        self.step = step
        if data_state is not None:
            self.dataset.load_state_dict(data_state)
        print(f"resumed from {source} at step {step}" + (" (model only)" if model_only else ""), file=self.out)

    # ---- loop --------------------------------------------------------------------------------
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
        )
        return iter(loader)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        t = self.cfg.training
        inputs = model_inputs(batch)
        if "padded_images" in inputs:
            images = inputs.pop("padded_images")
            with torch.no_grad():
                latent = self.vae.encode(
                    images.to(self.vae.dtype), generator=_step_generator(t.global_seed, self.step, 0)
                )
            inputs["padded_latent"] = latent.to(self.model.dtype)
        terms = self.model(**inputs, noise_generator=_step_generator(t.global_seed, self.step, 1))
        loss, ce, mse = reduce_loss(terms, batch, t.ce_weight, t.mse_weight, t.ce_loss_reweighting)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}")
        loss.backward()
        grad_norm = clip_grad_norm(self.model, t.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        update_ema(self.ema, self.model, t.ema)
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "step": float(self.step),
            "loss": float(loss.detach()),
            "ce": ce,
            "mse": mse,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": float(batch["sequence_length"]),
        }

    def save(self) -> Path:
        t = self.cfg.training
        return save_checkpoint(
            t.checkpoint_dir,
            self.step,
            self.model,
            self.ema,
            self.optimizer,
            self.scheduler,
            self.dataset.state_dict(),
            keep_last_k=t.keep_last_k,
            extra={"config": self.cfg.to_dict()},
        )

    def run(self) -> list[dict[str, float]]:
        t = self.cfg.training
        if self.step >= t.total_steps:
            return self.history
        batches = self._batches()
        saved_at = -1
        t0 = time.perf_counter()
        while self.step < t.total_steps:
            batch = next(batches)
            stats = self.train_step(batch)
            self.dataset.record(batch)
            self.step += 1
            self.history.append(stats)
            if self.step % t.log_every == 0 or self.step == 1:
                dt = time.perf_counter() - t0
                print(
                    f"(step={int(stats['step']):07d}) train_loss_ce: {stats['ce']:.4f}, "
                    f"train_loss_mse: {stats['mse']:.4f}, loss: {stats['loss']:.4f}, lr: {stats['lr']:.3e}, "
                    f"grad_norm: {stats['grad_norm']:.4f}, tokens: {int(stats['tokens'])}, "
                    f"step_time: {dt:.3f}s",
                    file=self.out,
                    flush=True,
                )
                t0 = time.perf_counter()
            if self.step % t.save_every == 0:
                self.save()
                saved_at = self.step
        if saved_at != self.step:
            self.save()
        return self.history


def main(cfg: TrainConfig) -> list[dict[str, float]]:
    Path(cfg.training.results_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.training.results_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    history = Trainer(cfg).run()
    if history and not all(math.isfinite(h["loss"]) for h in history):
        raise FloatingPointError("non-finite loss")
    return history
