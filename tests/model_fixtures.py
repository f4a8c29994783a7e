"""Fixtures for model/inference tests: synthetic packed batches and tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from bagel_core.model.synthetic import MIXED_SAMPLES, make_packed_batch

__all__ = ["MIXED_SAMPLES", "make_packed_batch", "save_tiny_checkpoint"]


def save_tiny_checkpoint(out: Path, seed: int = 0, **cfg_overrides) -> Path:
    """Random tiny BAGEL + tiny VAE + the bundled tokenizer, saved in the release layout."""
    from bagel_core.data.tokenizer import load_tokenizer
    from bagel_core.model import AutoEncoder, build_model, preset, save_model_dir

    cfg = preset("tiny")
    for k, v in cfg_overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # non-zero head so generation depends on the weights
        model.llm2vae.weight.normal_(0, 0.02)
    vae = AutoEncoder(cfg.vae)
    tokenizer, _ = load_tokenizer()
    save_model_dir(out, model, vae, tokenizer)
    return out
