"""Load a BAGEL directory for inference: model (bf16), VAE (fp32, CPU), tokenizer, special ids."""

from __future__ import annotations

from pathlib import Path

import torch

from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.model.autoencoder import AutoEncoder
from bagel_core.model.bagel import Bagel
from bagel_core.model.checkpoint_io import load_model_dir, load_vae


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_models(
    model_path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    vae_device: torch.device | str = "cpu",
    max_latent_size: int | None = None,
    attn_backend: str = "sdpa",
) -> tuple[Bagel, AutoEncoder, object, dict[str, int]]:
    """Return ``(model, vae_model, tokenizer, new_token_ids)`` like upstream's setup.

    The model is loaded strictly from ``ema.safetensors`` (or ``model.safetensors``) in ``dtype``;
    the VAE stays fp32 on ``vae_device`` (the CPU by default, as upstream's app does).
    """
    device = torch.device(device) if device is not None else default_device()
    model = load_model_dir(
        model_path, device=device, dtype=dtype, max_latent_size=max_latent_size, attn_backend=attn_backend
    ).eval()
    model.requires_grad_(False)
    vae = load_vae(model_path, model.cfg, device=vae_device)
    tokenizer, ids = load_tokenizer(str(model_path))
    return model, vae, tokenizer, ids.as_dict()
